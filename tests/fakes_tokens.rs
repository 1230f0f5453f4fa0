//! The token-issuing fakes (Cloudneeti, CloudConnexa OAuth, CleanCloud) on their own: talked to
//! directly over plain HTTP, to pin down the wire behaviour the proxy is tested against.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use credproxy::fakes::issuer::{Issuer, Mode};
use credproxy::fakes::{cleancloud, cloudneeti, oauth, serve_with_issuer};
use credproxy::providers::cleancloud::authorization;
use serde_json::{Value, json};
use tokio::net::TcpListener;

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// Sends `request`: the status and the body, as JSON where it is JSON (else a JSON string).
async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    json_of(request.send().await.unwrap()).await
}

// ---------------------------------------------------------------------------------------------
// Cloudneeti

const SUB_KEY: &str = "apim-primary-key-0123456789";
const APP_ID: &str = "b7c1e5a2-app";
const APP_SECRET: &str = "s3cr3t-app";
const LICENSE: &str = "9085e05b-lic";
const ACC_A: &str = "7b227c87-aaa";
const ACC_B: &str = "1c9d0e11-bbb";
const ACC_OUT: &str = "ffffffff-out";

struct Neeti {
    fake: credproxy::fakes::FakeServer,
    issuer: Arc<Issuer>,
    http: reqwest::Client,
}

impl Neeti {
    async fn start() -> Neeti {
        let issuer = Issuer::new(Duration::from_secs(3600));
        let fake = serve_with_issuer(
            listener().await,
            None,
            cloudneeti::Settings {
                subscription_key: SUB_KEY.into(),
                app_id: APP_ID.into(),
                app_secret: APP_SECRET.into(),
                license_id: LICENSE.into(),
                accounts: vec![ACC_A.into(), ACC_B.into()],
            },
            issuer.clone(),
            cloudneeti::handle,
        );
        Neeti {
            fake,
            issuer,
            http: client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.fake.addr)
    }

    /// A request to `path` through the APIM gateway with the right subscription key.
    fn keyed(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("Ocp-Apim-Subscription-Key", SUB_KEY)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        answer(self.keyed(reqwest::Method::POST, path).json(&body)).await
    }

    async fn token(&self, path: &str, body: Value) -> String {
        let (status, v) = self.post(path, body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["statusCode"], 200);
        assert_eq!(v["message"], "Request Successful");
        v["result"]["token"].as_str().unwrap().to_string()
    }

    async fn license_token(&self) -> String {
        self.token(
            &format!("/authorize/license/{LICENSE}/token"),
            json!({"APIApplicationId": APP_ID, "Secret": APP_SECRET}),
        )
        .await
    }

    async fn account_token(&self, account: &str) -> String {
        self.token(
            &format!("/authorize/license/{LICENSE}/token?accountId={account}"),
            json!({"APIApplicationId": APP_ID, "Secret": APP_SECRET}),
        )
        .await
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        answer(self.keyed(reqwest::Method::GET, path).bearer_auth(token)).await
    }
}

fn unauthorized_envelope() -> Value {
    json!({"result": null, "statusCode": 401, "message": "Unauthorized"})
}

#[tokio::test]
async fn cloudneeti_apim_rejects_missing_and_wrong_subscription_keys_on_every_path() {
    let n = Neeti::start().await;
    let missing = json!({"statusCode": 401, "message": "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API."});
    let invalid = json!({"statusCode": 401, "message": "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription."});
    let token_path = format!("/authorize/license/{LICENSE}/token");
    let data_path = format!("/onboarding/license/{LICENSE}/licenseAccounts");
    let body = json!({"APIApplicationId": APP_ID, "Secret": APP_SECRET});

    for (key, expected) in [(None, &missing), (Some("wrong-key"), &invalid)] {
        let mut req = n.http.post(n.url(&token_path)).json(&body);
        if let Some(k) = key {
            req = req.header("Ocp-Apim-Subscription-Key", k);
        }
        assert_eq!(answer(req).await, (401, expected.clone()));

        let mut req = n.http.get(n.url(&data_path)).bearer_auth("whatever");
        if let Some(k) = key {
            req = req.header("Ocp-Apim-Subscription-Key", k);
        }
        assert_eq!(answer(req).await, (401, expected.clone()));

        let mut req = n.http.get(n.url("/no/such/path"));
        if let Some(k) = key {
            req = req.header("Ocp-Apim-Subscription-Key", k);
        }
        assert_eq!(answer(req).await, (401, expected.clone()));
    }
    // The gateway answered; the token endpoint never saw those requests.
    assert_eq!(n.issuer.token_requests(), 0);
}

#[tokio::test]
async fn cloudneeti_license_and_account_tokens_have_separate_scopes() {
    let n = Neeti::start().await;
    let license = n.license_token().await;
    let acc_a = n.account_token(ACC_A).await;
    assert_ne!(license, acc_a);
    assert_eq!(n.issuer.token_requests(), 2);

    let accounts = format!("/onboarding/license/{LICENSE}/licenseAccounts");
    let (status, v) = n.get(&accounts, &license).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"]["licenseId"], LICENSE);
    let ids: Vec<&str> = v["result"]["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["accountId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [ACC_A, ACC_B]);
    assert!(
        v["result"]["apis"]
            .as_array()
            .unwrap()
            .contains(&json!("Account.Audit"))
    );
    // An account token is not a license token.
    assert_eq!(
        n.get(&accounts, &acc_a).await,
        (401, unauthorized_envelope())
    );

    let health_a = format!("/audit/license/{LICENSE}/account/{ACC_A}/healthstatus");
    let health_b = format!("/audit/license/{LICENSE}/account/{ACC_B}/healthstatus");
    let (status, v) = n.get(&health_a, &acc_a).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"]["accountId"], ACC_A);
    // A's token on B's path, and the license token on an account path, are refused.
    assert_eq!(
        n.get(&health_b, &acc_a).await,
        (401, unauthorized_envelope())
    );
    assert_eq!(
        n.get(&health_a, &license).await,
        (401, unauthorized_envelope())
    );
    // No token, or one that was never issued.
    let no_token = n.keyed(reqwest::Method::GET, &health_a);
    assert_eq!(answer(no_token).await, (401, unauthorized_envelope()));
    assert_eq!(
        n.get(&health_a, "eyJforged.token.here").await,
        (401, unauthorized_envelope())
    );

    let rescan = format!("/compliance/license/{LICENSE}/account/{ACC_A}/rescan");
    let (status, v) = n.get(&rescan, &acc_a).await;
    assert_eq!(status, 200, "{v}");
    assert!(!v["result"]["jobId"].as_str().unwrap().is_empty());
    assert_eq!(v["message"], "Request Successful");

    // Unknown path → 404 envelope.
    let (status, v) = n.get("/nothing/here", &license).await;
    assert_eq!(status, 404);
    assert_eq!(v["statusCode"], 404);
}

#[tokio::test]
async fn cloudneeti_token_errors() {
    let n = Neeti::start().await;
    let good = json!({"APIApplicationId": APP_ID, "Secret": APP_SECRET});
    let invalid_app = json!({"result": null, "statusCode": 401, "message": "Invalid API application id or secret"});

    let (status, v) = n
        .post("/authorize/license/other-license/token", good.clone())
        .await;
    assert_eq!((status, &v["statusCode"]), (404, &json!(404)));

    let path = format!("/authorize/license/{LICENSE}/token");
    let wrong_secret = json!({"APIApplicationId": APP_ID, "Secret": "nope"});
    assert_eq!(
        n.post(&path, wrong_secret).await,
        (401, invalid_app.clone())
    );
    // The seed's legacy keys are not accepted on the current shape.
    let legacy_keys = json!({"appId": APP_ID, "secret": APP_SECRET});
    assert_eq!(n.post(&path, legacy_keys).await, (401, invalid_app.clone()));

    let (status, v) = n
        .post(&format!("{path}?accountId={ACC_OUT}"), good.clone())
        .await;
    assert_eq!((status, &v["statusCode"]), (403, &json!(403)));
    assert_eq!(v["result"], Value::Null);

    assert_eq!(n.issuer.token_requests(), 4);
}

#[tokio::test]
async fn cloudneeti_legacy_token_shape_from_the_seed() {
    let n = Neeti::start().await;
    let legacy = json!({"appId": APP_ID, "secret": APP_SECRET});
    let license = n.token("/api/authorize/license", legacy.clone()).await;
    let (status, _) = n
        .get(
            &format!("/onboarding/license/{LICENSE}/licenseAccounts"),
            &license,
        )
        .await;
    assert_eq!(status, 200);

    let acc_b = n
        .token(
            &format!("/api/authorize/license/{LICENSE}/token?accountId={ACC_B}"),
            legacy.clone(),
        )
        .await;
    let path = format!("/audit/license/{LICENSE}/account/{ACC_B}/healthstatus");
    assert_eq!(n.get(&path, &acc_b).await.0, 200);
    let path = format!("/audit/license/{LICENSE}/account/{ACC_A}/healthstatus");
    assert_eq!(n.get(&path, &acc_b).await.0, 401);

    // The current keys are not accepted on the legacy shape.
    let current = json!({"APIApplicationId": APP_ID, "Secret": APP_SECRET});
    assert_eq!(n.post("/api/authorize/license", current).await.0, 401);
    assert_eq!(n.issuer.token_requests(), 3);
}

#[tokio::test]
async fn cloudneeti_onboarding_echoes_the_received_body() {
    let n = Neeti::start().await;
    let license = n.license_token().await;
    let path = format!("/onboarding/license/{LICENSE}/account/azure");
    let sent = json!({"name": "prod", "tenantId": "t-1", "nested": [1, 2]});
    let post = || n.keyed(reqwest::Method::POST, &path);
    let (status, v) = answer(post().bearer_auth(&license).json(&sent)).await;
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"result": {"received": sent}, "statusCode": 200, "message": "Request Successful"})
    );

    let (_, v) = answer(post().bearer_auth(&license).body("not json")).await;
    assert_eq!(v["result"]["received"], "not json");

    // Onboarding takes the license token, not an account token.
    let acc = n.account_token(ACC_A).await;
    let r = answer(post().bearer_auth(&acc).json(&sent)).await;
    assert_eq!(r, (401, unauthorized_envelope()));
}

#[tokio::test]
async fn cloudneeti_revoke_and_expiry() {
    let n = Neeti::start().await;
    let accounts = format!("/onboarding/license/{LICENSE}/licenseAccounts");
    let t = n.license_token().await;
    assert_eq!(n.get(&accounts, &t).await.0, 200);
    n.issuer.revoke_all();
    assert_eq!(n.get(&accounts, &t).await, (401, unauthorized_envelope()));
    let fresh = n.license_token().await;
    assert_eq!(n.get(&accounts, &fresh).await.0, 200);

    n.issuer.set_ttl(Duration::from_millis(200));
    assert_eq!(n.issuer.ttl(), Duration::from_millis(200));
    let short = n.license_token().await;
    assert_eq!(n.get(&accounts, &short).await.0, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        n.get(&accounts, &short).await,
        (401, unauthorized_envelope())
    );
}

#[tokio::test]
async fn cloudneeti_token_endpoint_modes() {
    let n = Neeti::start().await;
    let path = format!("/authorize/license/{LICENSE}/token");
    let body = json!({"APIApplicationId": APP_ID, "Secret": APP_SECRET});

    n.issuer.set_mode(Mode::RateLimited {
        retry_after_secs: 7,
    });
    assert_eq!(
        n.issuer.mode(),
        Mode::RateLimited {
            retry_after_secs: 7
        }
    );
    let r = n
        .keyed(reqwest::Method::POST, &path)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(
        json_of(r).await,
        (
            429,
            json!({"statusCode": 429, "message": "Rate limit is exceeded. Try again in 7 seconds."})
        )
    );

    n.issuer.set_mode(Mode::Status(503));
    let (status, v) = n.post(&path, body.clone()).await;
    assert_eq!((status, &v["statusCode"]), (503, &json!(503)));

    n.issuer.set_mode(Mode::Garbage);
    let (status, v) = n.post(&path, body.clone()).await;
    assert_eq!(status, 200);
    assert!(v.as_str().unwrap().contains("<html>"));

    n.issuer.set_mode(Mode::MissingToken);
    let (status, v) = n.post(&path, body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(v["statusCode"], 200);
    assert!(v["result"].get("token").is_none());

    n.issuer.set_mode(Mode::Slow(Duration::from_millis(150)));
    let started = Instant::now();
    let (status, v) = n.post(&path, body.clone()).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(status, 200);
    assert!(v["result"]["token"].is_string());

    n.issuer.set_mode(Mode::Normal);
    n.license_token().await;
    assert_eq!(n.issuer.token_requests(), 6);
}

// ---------------------------------------------------------------------------------------------
// CloudConnexa OAuth

const CLIENT_ID: &str = "0123456789abcdef0123456789abcdef.acme";
const CLIENT_SECRET: &str = "client-secret-xyz";
const ACME: &str = "acme.api.openvpn.com";
const OTHER: &str = "other.api.openvpn.com";

async fn start_oauth() -> (credproxy::fakes::FakeServer, Arc<Issuer>) {
    let issuer = Issuer::new(Duration::from_secs(43199));
    let fake = serve_with_issuer(
        listener().await,
        None,
        oauth::Settings {
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
        },
        issuer.clone(),
        oauth::handle,
    );
    (fake, issuer)
}

fn token_url(addr: SocketAddr) -> String {
    format!("http://{addr}/api/v1/oauth/token")
}

/// A token request with the right client credentials as HTTP Basic, as the official Go client
/// sends them; the body is up to the caller.
fn basic_token_request(addr: SocketAddr) -> reqwest::RequestBuilder {
    client()
        .post(token_url(addr))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
}

/// A token for `host`, using HTTP Basic and a JSON body like the official Go client.
async fn oauth_token(addr: SocketAddr, host: &str) -> String {
    let request = basic_token_request(addr)
        .header(reqwest::header::HOST, host)
        .json(&json!({"grant_type": "client_credentials", "scope": "default"}));
    let (status, v) = answer(request).await;
    assert_eq!(status, 200, "{v}");
    v["access_token"].as_str().unwrap().to_string()
}

async fn networks(addr: SocketAddr, host: &str, token: &str) -> reqwest::Response {
    client()
        .get(format!("http://{addr}/api/v1/networks"))
        .header(reqwest::header::HOST, host)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn assert_invalid_token(r: reqwest::Response) {
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer error="invalid_token", error_description="Access token expired""#
    );
    assert_eq!(
        json_of(r).await,
        (
            401,
            json!({"error": "invalid_token", "error_description": "Access token expired"})
        )
    );
}

#[tokio::test]
async fn oauth_accepts_basic_query_and_form_client_auth_and_records_each() {
    let (fake, issuer) = start_oauth().await;
    let http = client();

    let basic = http
        .post(token_url(fake.addr))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .json(&json!({"grant_type": "client_credentials", "scope": "default"}));
    let query = http
        .post(format!(
            "{}?client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}&grant_type=client_credentials",
            token_url(fake.addr)
        ))
        .body("");
    let form = http.post(token_url(fake.addr)).form(&[
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
    ]);

    let mut tokens = Vec::new();
    for req in [basic, query, form] {
        let (status, v) = answer(req).await;
        assert_eq!(status, 200, "{v}");
        let token = v["access_token"].as_str().unwrap().to_string();
        assert!(token.starts_with("eyJ"), "{token}");
        assert_eq!(token.split('.').count(), 3);
        assert_eq!(v["token_type"], "bearer");
        assert_eq!(v["expires_in"], 43199);
        assert_eq!(v["scope"], "read write");
        tokens.push(token);
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 3);
    assert_eq!(issuer.auth_methods(), ["basic", "query", "form"]);
    assert_eq!(issuer.token_requests(), 3);

    // A token from this host works here.
    let r = networks(fake.addr, &fake.addr.to_string(), &tokens[0]).await;
    let (status, v) = json_of(r).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["success"], true);
    assert_eq!(v["numberOfElements"], 1);
    assert_eq!(v["content"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn oauth_token_errors() {
    let (fake, issuer) = start_oauth().await;
    let http = client();
    let bad = json!({"error": "unauthorized", "error_description": "Bad credentials"});

    let wrong_secret = http
        .post(token_url(fake.addr))
        .basic_auth(CLIENT_ID, Some("wrong"))
        .json(&json!({"grant_type": "client_credentials"}));
    assert_eq!(answer(wrong_secret).await, (401, bad.clone()));

    let no_credentials = http.post(format!(
        "{}?grant_type=client_credentials",
        token_url(fake.addr)
    ));
    assert_eq!(answer(no_credentials).await, (401, bad.clone()));

    let no_grant_type = basic_token_request(fake.addr).json(&json!({"scope": "default"}));
    assert_eq!(
        answer(no_grant_type).await,
        (400, json!({"error": "invalid_request"}))
    );

    assert_eq!(issuer.token_requests(), 3);
    assert_eq!(issuer.auth_methods(), ["basic", "basic"]);
}

#[tokio::test]
async fn oauth_tokens_are_scoped_to_the_host_they_were_requested_from() {
    let (fake, _issuer) = start_oauth().await;
    let acme = oauth_token(fake.addr, &format!("{ACME}:443")).await;

    let r = networks(fake.addr, ACME, &acme).await;
    assert_eq!(r.status(), 200);
    let users = client()
        .get(format!("http://{}/api/v1/users?page=2&size=10", fake.addr))
        .header(reqwest::header::HOST, "ACME.api.openvpn.com:8443")
        .bearer_auth(&acme);
    let (status, v) = answer(users).await;
    assert_eq!(status, 200);
    assert_eq!((&v["page"], &v["size"]), (&json!(2), &json!(10)));

    assert_invalid_token(networks(fake.addr, OTHER, &acme).await).await;
    assert_invalid_token(networks(fake.addr, ACME, "eyJnot.a.token").await).await;

    // acme's client id (it ends in `.acme`) is refused by another organisation's host...
    let at_other = basic_token_request(fake.addr)
        .header(reqwest::header::HOST, OTHER)
        .json(&json!({"grant_type": "client_credentials"}));
    assert_eq!(
        answer(at_other).await,
        (
            401,
            json!({"error": "unauthorized", "error_description": "Bad credentials"})
        )
    );
    // ...and a token from another host (the fake's address) is good there, not on acme's.
    let here = fake.addr.to_string();
    let elsewhere = oauth_token(fake.addr, &here).await;
    assert_eq!(networks(fake.addr, &here, &elsewhere).await.status(), 200);
    assert_invalid_token(networks(fake.addr, ACME, &elsewhere).await).await;

    // POST /networks reports the body it received.
    let post = client()
        .post(format!("http://{}/api/v1/networks", fake.addr))
        .header(reqwest::header::HOST, ACME)
        .bearer_auth(&acme)
        .json(&json!({"name": "n1"}));
    assert_eq!(
        answer(post).await,
        (201, json!({"received": {"name": "n1"}}))
    );
}

#[tokio::test]
async fn oauth_rate_limit_is_an_empty_429_with_gateway_headers() {
    let (fake, issuer) = start_oauth().await;
    issuer.set_mode(Mode::RateLimited {
        retry_after_secs: 15,
    });
    let r = basic_token_request(fake.addr)
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    assert_eq!(h["x-ratelimit-replenish-rate"], "1");
    assert_eq!(h["x-ratelimit-replenish-time"], "15");
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert_eq!(h["x-ratelimit-burst-capacity"], "20");
    assert!(h.get("retry-after").is_none());
    assert!(r.bytes().await.unwrap().is_empty());
    assert_eq!(issuer.token_requests(), 1);

    issuer.set_mode(Mode::Normal);
    oauth_token(fake.addr, ACME).await;
    assert_eq!(issuer.token_requests(), 2);
}

#[tokio::test]
async fn oauth_revoke_and_expiry() {
    let (fake, issuer) = start_oauth().await;
    let t = oauth_token(fake.addr, ACME).await;
    assert_eq!(networks(fake.addr, ACME, &t).await.status(), 200);
    issuer.revoke_all();
    assert_invalid_token(networks(fake.addr, ACME, &t).await).await;

    issuer.set_ttl(Duration::from_millis(200));
    let request = basic_token_request(fake.addr)
        .header(reqwest::header::HOST, ACME)
        .json(&json!({"grant_type": "client_credentials"}));
    let (_, v) = answer(request).await;
    assert_eq!(v["expires_in"], 1, "at least one second");
    let short = v["access_token"].as_str().unwrap().to_string();
    assert_eq!(networks(fake.addr, ACME, &short).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_invalid_token(networks(fake.addr, ACME, &short).await).await;
}

// ---------------------------------------------------------------------------------------------
// CleanCloud

const USER_CODE: &str = "UTCODE123";
const USER_SECRET: &str = "utsecret456";

async fn start_cleancloud() -> (credproxy::fakes::FakeServer, Arc<Issuer>) {
    let issuer = Issuer::new(Duration::from_secs(3600));
    let fake = serve_with_issuer(
        listener().await,
        None,
        cleancloud::Settings {
            user_code: USER_CODE.into(),
            user_secret: USER_SECRET.into(),
        },
        issuer.clone(),
        cleancloud::handle,
    );
    (fake, issuer)
}

/// `GET /api_tokens` signed with the user token, as every access code is asked for.
fn api_tokens_request(addr: SocketAddr) -> reqwest::RequestBuilder {
    let header = authorization(USER_CODE, USER_SECRET, "GET", "/api_tokens", b"");
    client()
        .get(format!("http://{addr}/api_tokens"))
        .header("Authorization", header)
}

async fn api_token(addr: SocketAddr) -> (String, String) {
    let (status, v) = answer(api_tokens_request(addr)).await;
    assert_eq!(status, 200, "{v}");
    (
        v["accessCode"].as_str().unwrap().to_string(),
        v["secretCode"].as_str().unwrap().to_string(),
    )
}

/// Sends `method path` with `body`, signed as if the body were `signed_body`.
async fn signed(
    addr: SocketAddr,
    (code, secret): (&str, &str),
    method: reqwest::Method,
    path: &str,
    body: &[u8],
    signed_body: &[u8],
) -> (u16, Value) {
    let header = authorization(code, secret, method.as_str(), path, signed_body);
    let request = client()
        .request(method, format!("http://{addr}{path}"))
        .header("Authorization", header)
        .header("Content-Type", "application/json")
        .body(body.to_vec());
    answer(request).await
}

#[tokio::test]
async fn cleancloud_api_tokens_needs_the_user_signature() {
    let (fake, issuer) = start_cleancloud().await;
    let (code, secret) = api_token(fake.addr).await;
    assert!(code.starts_with("AC") && secret.starts_with("SC"));
    let (code2, _) = api_token(fake.addr).await;
    assert_ne!(code, code2);

    let unauthorized = (401, json!({"message": "Unauthorized"}));
    for header in [
        Some(authorization(USER_CODE, "wrong", "GET", "/api_tokens", b"")),
        Some(authorization(
            "OTHER",
            USER_SECRET,
            "GET",
            "/api_tokens",
            b"",
        )),
        None,
    ] {
        let mut req = client().get(format!("http://{}/api_tokens", fake.addr));
        if let Some(h) = header {
            req = req.header("Authorization", h);
        }
        assert_eq!(answer(req).await, unauthorized);
    }
    assert_eq!(issuer.token_requests(), 5);
}

#[tokio::test]
async fn cleancloud_signature_covers_method_path_and_body() {
    let (fake, issuer) = start_cleancloud().await;
    let (code, secret) = api_token(fake.addr).await;
    let creds = (code.as_str(), secret.as_str());
    let unauthorized = (401, json!({"message": "Unauthorized"}));
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    assert_eq!(
        signed(fake.addr, creds, get.clone(), "/clouds", b"", b"").await,
        (
            200,
            json!({"clouds": [{"code": "cl-1", "name": "Demo AWS"}]})
        )
    );
    // The query is not signed.
    assert_eq!(
        signed(fake.addr, creds, get.clone(), "/clouds?page=2", b"", b"")
            .await
            .0,
        200
    );
    assert_eq!(
        signed(
            fake.addr,
            creds,
            get.clone(),
            "/clouds/cl-1/scores",
            b"",
            b""
        )
        .await,
        (200, json!({"ok": true}))
    );

    let body = br#"{"name":"a"}"#;
    assert_eq!(
        signed(fake.addr, creds, post.clone(), "/clouds", body, body).await,
        (201, json!({"created": {"name": "a"}}))
    );
    // Same signature, different body: refused.
    assert_eq!(
        signed(
            fake.addr,
            creds,
            post.clone(),
            "/clouds",
            br#"{"name":"b"}"#,
            body
        )
        .await,
        unauthorized
    );
    // A signature made with the wrong secret or for another path: refused.
    assert_eq!(
        signed(
            fake.addr,
            (code.as_str(), "wrong"),
            get.clone(),
            "/clouds",
            b"",
            b""
        )
        .await,
        unauthorized
    );
    let header = authorization(&code, &secret, "GET", "/clouds/other", b"");
    let request = client()
        .get(format!("http://{}/clouds", fake.addr))
        .header("Authorization", header);
    assert_eq!(answer(request).await, unauthorized);
    // HEAD is answered like GET, but signed over `HEAD`: a GET's signature does not open it.
    let head = client()
        .head(format!("http://{}/clouds", fake.addr))
        .header(
            "Authorization",
            authorization(&code, &secret, "HEAD", "/clouds", b""),
        );
    let head = head.send().await.unwrap();
    assert_eq!(head.status(), 200);
    let clouds = json!({"clouds": [{"code": "cl-1", "name": "Demo AWS"}]}).to_string();
    assert_eq!(
        head.headers()["content-length"],
        clouds.len().to_string().as_str()
    );
    let head_as_get = client()
        .head(format!("http://{}/clouds", fake.addr))
        .header(
            "Authorization",
            authorization(&code, &secret, "GET", "/clouds", b""),
        );
    assert_eq!(head_as_get.send().await.unwrap().status(), 401);
    // The user token itself is not an access code.
    assert_eq!(
        signed(
            fake.addr,
            (USER_CODE, USER_SECRET),
            get.clone(),
            "/clouds",
            b"",
            b""
        )
        .await,
        unauthorized
    );

    // Revoked and expired access codes are refused.
    issuer.revoke_all();
    assert_eq!(
        signed(fake.addr, creds, get.clone(), "/clouds", b"", b"").await,
        unauthorized
    );
    issuer.set_ttl(Duration::from_millis(200));
    let (code, secret) = api_token(fake.addr).await;
    let creds = (code.as_str(), secret.as_str());
    assert_eq!(
        signed(fake.addr, creds, get.clone(), "/clouds", b"", b"")
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        signed(fake.addr, creds, get, "/clouds", b"", b"").await,
        unauthorized
    );
    assert_eq!(issuer.token_requests(), 2);
}

#[tokio::test]
async fn cleancloud_token_endpoint_modes() {
    let (fake, issuer) = start_cleancloud().await;
    let fetch = || answer(api_tokens_request(fake.addr));

    issuer.set_mode(Mode::Status(500));
    assert_eq!(fetch().await.0, 500);
    issuer.set_mode(Mode::MissingToken);
    let (status, v) = fetch().await;
    assert_eq!(status, 200);
    assert!(v.get("accessCode").is_none());
    issuer.set_mode(Mode::Garbage);
    let (status, v) = fetch().await;
    assert_eq!(status, 200);
    assert!(v.is_string());
    issuer.set_mode(Mode::RateLimited {
        retry_after_secs: 3,
    });
    assert_eq!(fetch().await.0, 429);
    issuer.set_mode(Mode::Normal);
    assert_eq!(fetch().await.0, 200);
    assert_eq!(issuer.token_requests(), 5);
}
