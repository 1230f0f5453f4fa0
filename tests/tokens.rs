//! Token providers end to end: single flight, proactive refresh, retry once on 401, failures and
//! backoff, and each provider kind against its fake. Fakes count the token requests they serve.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use credproxy::fakes::issuer::{Issuer, Mode};
use credproxy::fakes::{FakeServer, cleancloud, cloudneeti, serve_with_issuer};
use support::*;

const CLIENT_ID: &str = "0123456789abcdef0123456789abcdef.acme";
const CLIENT_SECRET: &str = "oauth-client-secret-Zz9";
/// A client id that names no CloudConnexa organisation, good on any host of the fake.
const GENERIC_CLIENT_ID: &str = "generic-client-4711";

async fn oauth_fake(env: &Env) -> (FakeServer, Arc<Issuer>) {
    env.oauth_fake(CLIENT_ID, CLIENT_SECRET).await
}

/// A CloudConnexa-style route: the wildcard host, tokens per matched host.
fn oauth_yaml(fake: std::net::SocketAddr, client_auth: &str, extra: &str) -> String {
    format!(
        "tokens:
  timeout: 1s
  backoff_initial: 300ms
  backoff_max: 2s
{extra}providers:
  connexa:
    oauth2:
      token_url: 'https://{{host}}/api/v1/oauth/token'
      client_id: '{CLIENT_ID}'
      client_secret: '{CLIENT_SECRET}'
      client_auth: {client_auth}
      connect_to: '{fake}'
routes:
  - host: '*.api.openvpn.com'
    provider: connexa
    connect_to: '{fake}'
"
    )
}

/// The usual set-up: the OAuth fake (tokens for an hour) and a proxy with its route, `basic`
/// client authentication and no extra settings.
async fn oauth_proxy(env: &Env) -> (FakeServer, Arc<Issuer>, credproxy::Running) {
    let (fake, issuer) = oauth_fake(env).await;
    let proxy = env.proxy(&oauth_yaml(fake.addr, "basic", "")).await;
    (fake, issuer, proxy)
}

#[tokio::test]
async fn a_cold_cache_under_1000_concurrent_requests_fetches_one_token() {
    let env = Env::new();
    let (_fake, issuer, proxy) = oauth_proxy(&env).await;
    // The token endpoint takes its time, so every request arrives while the fetch is in flight.
    issuer.set_mode(Mode::Slow(Duration::from_millis(300)));
    let c = client(proxy.addr);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let c = c.clone();
        tasks.spawn(async move {
            c.get("http://acme.api.openvpn.com/api/v1/networks")
                .send()
                .await
                .map(|r| r.status())
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 200);
        ok += 1;
    }
    assert_eq!(ok, 1000);
    assert_eq!(
        issuer.token_requests(),
        1,
        "one token request for 1000 cold requests"
    );
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_before_they_expire() {
    let env = Env::new();
    let (_fake, issuer, proxy) = oauth_proxy(&env).await;
    issuer.set_ttl(Duration::from_secs(2));
    let c = client(proxy.addr);
    let started = Instant::now();
    let mut requests = 0;
    // Continuous traffic for 10 s (bounded in count too).
    while started.elapsed() < Duration::from_secs(10) && requests < 5000 {
        let r = get(&c, "http://acme.api.openvpn.com/api/v1/users").await;
        assert_eq!(r.status(), 200, "request {requests} failed");
        requests += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tokens = proxy.tokens("connexa").unwrap();
    let refreshed = tokens.stats.proactive_refreshes.load(Ordering::Relaxed);
    assert!(
        refreshed >= 3,
        "only {refreshed} proactive refreshes in 10 s of 2 s tokens"
    );
    assert_eq!(
        tokens.stats.retries_after_401.load(Ordering::Relaxed),
        0,
        "no request ever carried an expired token"
    );
    assert!(
        issuer.token_requests() <= 10,
        "{} token requests",
        issuer.token_requests()
    );
}

#[tokio::test]
async fn a_failed_refresh_is_retried_while_the_old_token_still_serves() {
    let env = Env::new();
    let (fake, issuer) = oauth_fake(&env).await;
    let proxy = env
        .proxy(&oauth_yaml(fake.addr, "basic", "  refresh_at: 0.5\n"))
        .await;
    issuer.set_ttl(Duration::from_secs(6));
    let c = client(proxy.addr);
    let url = "http://acme.api.openvpn.com/api/v1/users";
    assert_eq!(get(&c, url).await.status(), 200);
    assert_eq!(issuer.token_requests(), 1);
    // The refresh (about 3 s in) fails once; the endpoint is back straight after.
    issuer.set_mode(Mode::Status(500));
    let tokens = proxy.tokens("connexa").unwrap();
    let mut failed_once = false;
    for _ in 0..400 {
        // Traffic all along: the token is in use, so it is kept fresh.
        let r = get(&c, url).await;
        assert_eq!(r.status(), 200, "the old token keeps serving");
        if !failed_once && issuer.token_requests() == 2 {
            failed_once = true;
            issuer.set_mode(Mode::Normal);
        }
        if issuer.token_requests() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(failed_once, "the refresh was tried");
    assert_eq!(issuer.token_requests(), 3, "the refresh was tried again");
    // Counted once the answer is in (the fake counts the request as it arrives).
    for _ in 0..100 {
        if tokens.stats.proactive_refreshes.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        tokens.stats.proactive_refreshes.load(Ordering::Relaxed),
        1,
        "the second try was the refresh timer's, before the old token ran out, not a request's; the failed one counts as a failure, not as a refresh"
    );
    assert_eq!(tokens.stats.failures.load(Ordering::Relaxed), 1);
}

const LICENSE: &str = "9085e05b-0000-4000-8000-00000000c0de";
const SUB_KEY: &str = "apim-subscription-key-Qq1";
const APP_ID: &str = "app-id-7f3e";
const APP_SECRET: &str = "app-secret-Hh2";

async fn cloudneeti_fake(env: &Env) -> (FakeServer, Arc<Issuer>) {
    let issuer = Issuer::new(Duration::from_secs(3600));
    let fake = serve_with_issuer(
        listener().await,
        Some(env.tls.clone()),
        cloudneeti::Settings {
            subscription_key: SUB_KEY.into(),
            app_id: APP_ID.into(),
            app_secret: APP_SECRET.into(),
            license_id: LICENSE.into(),
            accounts: vec!["acc-1".into(), "acc-2".into()],
        },
        issuer.clone(),
        cloudneeti::handle,
    );
    (fake, issuer)
}

fn cloudneeti_yaml(fake: std::net::SocketAddr, endpoint: &str, extra: &str) -> String {
    format!(
        "{extra}providers:
  neeti:
    cloudneeti:
      license_id: '{LICENSE}'
      app_id: '{APP_ID}'
      app_secret: '{APP_SECRET}'
      subscription_key: '{SUB_KEY}'
      endpoint: {endpoint}
      connect_to: '{fake}'
routes:
  - host: api.cloudneeti.com
    provider: neeti
    connect_to: '{fake}'
"
    )
}

/// Cloudneeti documents no expiry, so an opaque token is kept for `token_ttl`; when the real
/// lifetime is shorter (an admin's "Token Expiry" setting), the stale token's 401 costs one fetch
/// and one retry, and the client sees only the 200.
#[tokio::test]
async fn an_opaque_cloudneeti_token_is_kept_for_token_ttl_and_a_shorter_life_costs_one_retry() {
    let env = Env::new();
    let (fake, issuer) = cloudneeti_fake(&env).await;
    issuer.set_opaque(true);
    issuer.set_ttl(Duration::from_secs(1));
    let proxy = env
        .proxy(&cloudneeti_yaml(fake.addr, "current", "").replace(
            "      endpoint: current\n",
            "      endpoint: current\n      token_ttl: 1h\n",
        ))
        .await;
    let c = client(proxy.addr);
    let url = format!("http://api.cloudneeti.com/onboarding/license/{LICENSE}/licenseAccounts");
    assert_eq!(get(&c, &url).await.status(), 200);
    let license = proxy.tokens("neeti").unwrap().snapshot();
    let valid_for = license[0].valid_for_s.unwrap_or(0);
    assert!(
        valid_for > 3000,
        "kept for token_ttl, not 1 s: {valid_for} s"
    );
    // The fake's token dies after 1 s; the proxy still holds it for an hour.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(&c, &url).await.status(), 200);
    let tokens = proxy.tokens("neeti").unwrap();
    assert_eq!(tokens.stats.retries_after_401.load(Ordering::Relaxed), 1);
    assert_eq!(issuer.token_requests(), 2);
}

#[tokio::test]
async fn cloudneeti_picks_license_or_account_tokens_by_path_for_both_endpoint_shapes() {
    for shape in ["current", "legacy"] {
        let env = Env::new();
        let (fake, issuer) = cloudneeti_fake(&env).await;
        let proxy = env.proxy(&cloudneeti_yaml(fake.addr, shape, "")).await;
        let c = client(proxy.addr);
        for _ in 0..2 {
            for path in [
                format!("/onboarding/license/{LICENSE}/licenseAccounts"),
                format!("/audit/license/{LICENSE}/account/acc-1/healthstatus"),
                format!("/compliance/license/{LICENSE}/account/acc-2/rescan"),
            ] {
                let r = get(&c, format!("http://api.cloudneeti.com{path}")).await;
                assert_eq!(
                    r.status(),
                    200,
                    "{shape} {path}: {}",
                    r.text().await.unwrap()
                );
            }
        }
        assert_eq!(
            issuer.token_requests(),
            3,
            "{shape}: one license token and one per account, each once"
        );
        let token_calls: Vec<_> = fake
            .requests()
            .into_iter()
            .filter(|r| r.uri.path().contains("authorize"))
            .collect();
        let expected_prefix = if shape == "legacy" {
            "/api/authorize/license"
        } else {
            "/authorize/license/"
        };
        assert!(
            token_calls
                .iter()
                .all(|r| r.uri.path().starts_with(expected_prefix)),
            "{shape}"
        );
        // The subscription key goes on every call, token calls included, next to the bearer.
        assert!(
            fake.requests()
                .iter()
                .all(|r| r.headers["ocp-apim-subscription-key"] == SUB_KEY)
        );
        let echo = echoed(get(&c, "http://api.cloudneeti.com/x/__echo").await).await;
        assert_eq!(header_values(&echo, "ocp-apim-subscription-key"), [SUB_KEY]);
        assert!(header_values(&echo, "authorization")[0].starts_with("Bearer "));
    }
}

#[tokio::test]
async fn a_revoked_token_is_replaced_and_the_post_replayed_byte_for_byte() {
    let env = Env::new();
    let (fake, issuer) = cloudneeti_fake(&env).await;
    let proxy = env.proxy(&cloudneeti_yaml(fake.addr, "current", "")).await;
    let c = client(proxy.addr);
    let path = format!("/onboarding/license/{LICENSE}/account/aws");
    let url = format!("http://api.cloudneeti.com{path}");
    let warm = get(
        &c,
        format!("http://api.cloudneeti.com/onboarding/license/{LICENSE}/licenseAccounts"),
    )
    .await;
    assert_eq!(warm.status(), 200);
    issuer.revoke_all();

    let body = r#"{"name":"prod-aws","roleArn":"arn:aws:iam::123:role/x","note":"ünïcode ✓"}"#;
    let r = send(
        c.post(&url)
            .header("content-type", "application/json")
            .body(body),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-credproxy-retry").is_none());
    let answer: serde_json::Value = r.json().await.unwrap();
    let sent: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        answer["result"]["received"], sent,
        "the replayed body arrived intact"
    );
    let attempts = fake
        .requests()
        .iter()
        .filter(|r| r.uri.path() == path)
        .count();
    assert_eq!(attempts, 2, "one refused attempt, one retry");
    assert_eq!(issuer.token_requests(), 2);
    assert_eq!(
        proxy
            .tokens("neeti")
            .unwrap()
            .stats
            .retries_after_401
            .load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_body_over_the_replay_buffer_is_streamed_and_not_retried() {
    let env = Env::new();
    let (fake, issuer) = cloudneeti_fake(&env).await;
    let proxy = env
        .proxy(&cloudneeti_yaml(
            fake.addr,
            "current",
            "limits:\n  replay_buffer: 1024\n",
        ))
        .await;
    let c = client(proxy.addr);
    let path = format!("/onboarding/license/{LICENSE}/account/azure");
    let url = format!("http://api.cloudneeti.com{path}");
    let small = send(c.post(&url).body("{}")).await;
    assert_eq!(small.status(), 200);
    issuer.revoke_all();
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(4096));
    let r = send(c.post(&url).body(big)).await;
    assert_eq!(
        r.status(),
        401,
        "the refusal is passed on: the body could not be replayed"
    );
    assert_eq!(r.headers()["x-credproxy-retry"], "skipped-body-too-large");
    let attempts = fake
        .requests()
        .iter()
        .filter(|r| r.uri.path() == path)
        .count();
    assert_eq!(
        attempts, 2,
        "the small request and one attempt of the big one"
    );
    // The next request still gets a fresh token and succeeds.
    let r = send(c.post(&url).body("{}")).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_persistent_401_is_passed_on_after_exactly_two_attempts() {
    let env = Env::new();
    // Tokens come from other.api.openvpn.com, so acme.api.openvpn.com refuses every one of them
    // (a client id without a cloud id, which that host's token endpoint takes).
    let (fake, issuer) = env.oauth_fake(GENERIC_CLIENT_ID, CLIENT_SECRET).await;
    let yaml = oauth_yaml(fake.addr, "basic", "")
        .replace("https://{host}/api", "https://other.api.openvpn.com/api")
        .replace(CLIENT_ID, GENERIC_CLIENT_ID);
    let proxy = env.proxy(&yaml).await;
    let r = get(
        &client(proxy.addr),
        "http://acme.api.openvpn.com/api/v1/networks",
    )
    .await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    let attempts = fake
        .requests()
        .iter()
        .filter(|r| r.uri.path() == "/api/v1/networks")
        .count();
    assert_eq!(attempts, 2);
    assert_eq!(
        issuer.token_requests(),
        2,
        "one token, one fresh token for the retry, no loop"
    );
    // The fresh token was refused too: the next requests' 401s are about the credentials, so
    // they cost no token request each (a missing permission would otherwise hammer the token
    // endpoint at the clients' rate), and are not retried.
    for _ in 0..5 {
        let r = get(
            &client(proxy.addr),
            "http://acme.api.openvpn.com/api/v1/networks",
        )
        .await;
        assert_eq!(r.status(), 401);
    }
    assert_eq!(issuer.token_requests(), 2);
    let attempts = fake
        .requests()
        .iter()
        .filter(|r| r.uri.path() == "/api/v1/networks")
        .count();
    assert_eq!(attempts, 7, "one attempt each");
}

/// A token with CR LF in it would be a header injection: it is a failed fetch, named, backed off
/// and fetched again, not a token kept (and every request refused) for its whole lifetime.
#[tokio::test]
async fn a_token_no_header_can_carry_is_a_failed_fetch_and_fetched_again() {
    let env = Env::new();
    let (fake, issuer, proxy) = oauth_proxy(&env).await;
    let c = client(proxy.addr);
    let url = "http://acme.api.openvpn.com/api/v1/networks";
    issuer.set_mode(Mode::BrokenToken);
    let (msg, _) = token_error(&c, url).await;
    assert!(msg.contains("characters a header cannot carry"), "{msg}");
    assert!(!msg.contains("X-Injected"), "{msg}");
    issuer.set_mode(Mode::Normal);
    // The backoff here is 300 ms, doubled at most once.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get(&c, url).await.status(), 200);
    assert_eq!(issuer.token_requests(), 2);
    assert!(
        fake.requests()
            .iter()
            .all(|r| !r.headers.contains_key("x-injected")),
        "nothing was injected"
    );
}

async fn token_error(c: &reqwest::Client, url: &str) -> (String, serde_json::Value) {
    let r = get(c, url).await;
    assert_refused(&r, 503, "token_unavailable");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["provider"], "connexa");
    (body["message"].as_str().unwrap().to_string(), body)
}

#[tokio::test]
async fn token_endpoint_failures_give_503_back_off_and_recover() {
    let env = Env::new();
    let (_fake, issuer, proxy) = oauth_proxy(&env).await;
    let c = client(proxy.addr);
    let url = "http://acme.api.openvpn.com/api/v1/networks";

    // A 500: the cause is named, then requests fail fast during the backoff.
    issuer.set_mode(Mode::Status(500));
    let (msg, _) = token_error(&c, url).await;
    assert!(
        msg.contains("HTTP 500") && msg.contains("acme.api.openvpn.com/api/v1/oauth/token"),
        "{msg}"
    );
    for _ in 0..5 {
        let (msg, _) = token_error(&c, url).await;
        assert!(msg.contains("retrying in"), "{msg}");
    }
    assert_eq!(
        issuer.token_requests(),
        1,
        "no hammering during the backoff"
    );

    // Recovery once the endpoint is back and the backoff (300 ms, doubled at most once) is over.
    issuer.set_mode(Mode::Normal);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get(&c, url).await.status(), 200);
    assert_eq!(issuer.token_requests(), 2);
}

#[tokio::test]
async fn slow_garbage_and_incomplete_token_answers_are_named() {
    let cases = [
        (
            Mode::Slow(Duration::from_secs(5)),
            "did not answer within 1s",
        ),
        // Described, never quoted: a 2xx body may be a token in another format.
        (
            Mode::Garbage,
            "the body is not JSON (text/html, 27 bytes): expected value at line 1 column 1",
        ),
        (Mode::MissingToken, "has no `access_token`"),
    ];
    for (mode, words) in cases {
        let env = Env::new();
        let (_fake, issuer, proxy) = oauth_proxy(&env).await;
        issuer.set_mode(mode);
        let (msg, body) = token_error(
            &client(proxy.addr),
            "http://acme.api.openvpn.com/api/v1/networks",
        )
        .await;
        assert!(msg.contains(words), "`{msg}` should say `{words}`");
        assert!(!body.to_string().contains(CLIENT_SECRET));
        assert!(!msg.contains("gateway error"), "{msg}");
    }
}

#[tokio::test]
async fn a_429_from_the_token_endpoint_honours_the_rate_limit_headers() {
    let env = Env::new();
    let (_fake, issuer, proxy) = oauth_proxy(&env).await;
    issuer.set_mode(Mode::RateLimited {
        retry_after_secs: 3,
    });
    let c = client(proxy.addr);
    let url = "http://acme.api.openvpn.com/api/v1/networks";
    let (msg, _) = token_error(&c, url).await;
    assert!(msg.contains("HTTP 429"), "{msg}");
    issuer.set_mode(Mode::Normal);
    // Well past the configured backoff (at most 2 s here would be 300 ms), but inside the 3 s the
    // endpoint asked for: still waiting.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (msg, _) = token_error(&c, url).await;
    assert!(msg.contains("retrying in"), "{msg}");
    assert_eq!(issuer.token_requests(), 1);
}

#[tokio::test]
async fn bad_client_credentials_and_an_unreachable_endpoint_are_named_without_the_secret() {
    let env = Env::new();
    let (fake, _issuer) = oauth_fake(&env).await;
    let yaml = oauth_yaml(fake.addr, "basic", "").replace(CLIENT_SECRET, "wrong-secret-Yy8");
    let proxy = env.proxy(&yaml).await;
    let (msg, body) = token_error(
        &client(proxy.addr),
        "http://acme.api.openvpn.com/api/v1/networks",
    )
    .await;
    assert!(
        msg.contains("HTTP 401") && msg.contains("Bad credentials"),
        "{msg}"
    );
    assert!(!body.to_string().contains("wrong-secret-Yy8"));

    let port = closed_port().await;
    let yaml = oauth_yaml(fake.addr, "query", "").replacen(
        &format!("connect_to: '{}'", fake.addr),
        &format!("connect_to: '127.0.0.1:{port}'"),
        1,
    );
    let proxy = env.proxy(&yaml).await;
    let (msg, body) = token_error(
        &client(proxy.addr),
        "http://acme.api.openvpn.com/api/v1/networks",
    )
    .await;
    assert!(msg.contains("connection refused"), "{msg}");
    assert!(
        !body.to_string().contains(CLIENT_SECRET),
        "the query string with the secret is not quoted"
    );
}

/// What the token request carries for each `client_auth` and `token_body`: `query` puts every
/// parameter in the URL and sends no body, as CloudConnexa's API docs show; `token_body: json`
/// sends a JSON object, as CloudConnexa's Go client does with HTTP Basic.
#[tokio::test]
async fn oauth2_client_authentication_and_token_body() {
    for (client_auth, token_body, method, body) in [
        ("basic", None, "basic", "form"),
        ("basic_raw", Some("json"), "basic", "json"),
        ("form", None, "form", "form"),
        ("form", Some("json"), "json", "json"),
        ("query", None, "query", "empty"),
    ] {
        let env = Env::new();
        let (fake, issuer) = oauth_fake(&env).await;
        let setting = match token_body {
            Some(b) => format!("{client_auth}\n      token_body: {b}"),
            None => client_auth.to_string(),
        };
        let proxy = env.proxy(&oauth_yaml(fake.addr, &setting, "")).await;
        let r = get(
            &client(proxy.addr),
            "http://acme.api.openvpn.com/api/v1/networks",
        )
        .await;
        assert_eq!(r.status(), 200, "{setting}");
        assert_eq!(issuer.auth_methods(), [method], "{setting}");
        assert_eq!(issuer.token_bodies(), [body], "{setting}");
        let token_request = fake
            .requests()
            .into_iter()
            .find(|r| r.uri.path() == "/api/v1/oauth/token")
            .expect("a token request");
        let query = token_request.uri.query().unwrap_or("");
        let content_type = token_request.headers.get("content-type");
        if client_auth == "query" {
            assert!(
                query.contains("grant_type=client_credentials")
                    && query.contains(&format!("client_secret={CLIENT_SECRET}")),
                "{query}"
            );
            assert_eq!(content_type, None);
        } else {
            assert_eq!(query, "", "{setting}");
            let expected = if body == "json" {
                "application/json"
            } else {
                "application/x-www-form-urlencoded"
            };
            assert_eq!(content_type.unwrap(), expected, "{setting}");
        }
    }
}

/// A secret with characters that form-encoding changes: `basic` sends `%2B`, `%2F` and `%3D`
/// (RFC 6749), `basic_raw` the characters themselves, which is what the fake takes (as servers
/// that do not decode the parts, and CloudConnexa's own client, do).
#[tokio::test]
async fn oauth2_basic_raw_sends_the_secret_as_it_is() {
    const SPECIAL: &str = "s3cr+t/with=signs";
    for (method, status) in [("basic_raw", 200), ("basic", 503)] {
        let env = Env::new();
        let (fake, issuer) = env.oauth_fake(CLIENT_ID, SPECIAL).await;
        let yaml = oauth_yaml(fake.addr, method, "").replace(CLIENT_SECRET, SPECIAL);
        let proxy = env.proxy(&yaml).await;
        let r = get(
            &client(proxy.addr),
            "http://acme.api.openvpn.com/api/v1/networks",
        )
        .await;
        assert_eq!(r.status(), status, "{method}");
        let methods = issuer.auth_methods();
        assert!(
            !methods.is_empty() && methods.iter().all(|m| *m == "basic"),
            "{method}: {methods:?}"
        );
    }
}

/// `{host}` in `token_url` under a wildcard route: a token per host, for an OAuth API whose one
/// client id is good on every host (not CloudConnexa's, which ends in one cloud id: the fake
/// refuses it on another organisation's host, as tests/fakes_tokens.rs checks).
#[tokio::test]
async fn wildcard_routes_get_one_token_per_matched_host() {
    let env = Env::new();
    let (fake, issuer) = env.oauth_fake(GENERIC_CLIENT_ID, CLIENT_SECRET).await;
    let proxy = env
        .proxy(&oauth_yaml(fake.addr, "basic", "").replace(CLIENT_ID, GENERIC_CLIENT_ID))
        .await;
    let c = client(proxy.addr);
    for _ in 0..3 {
        for host in ["acme.api.openvpn.com", "other.api.openvpn.com"] {
            let r = get(&c, format!("http://{host}/api/v1/networks")).await;
            assert_eq!(r.status(), 200, "{host}");
        }
    }
    assert_eq!(issuer.token_requests(), 2);
    let token_hosts: std::collections::BTreeSet<String> = fake
        .requests()
        .iter()
        .filter(|r| r.uri.path() == "/api/v1/oauth/token")
        .filter_map(|r| {
            r.uri.host().map(String::from).or_else(|| {
                r.headers
                    .get("host")
                    .map(|h| h.to_str().unwrap().to_string())
            })
        })
        .collect();
    assert_eq!(
        token_hosts.into_iter().collect::<Vec<_>>(),
        ["acme.api.openvpn.com", "other.api.openvpn.com"]
    );
}

const USER_CODE: &str = "UTCODE123";
const USER_SECRET: &str = "utsecret456";

/// The fake CleanCloud (access codes for an hour) and a proxy whose `cc` provider has
/// `max_body: 2048` and `settings` (more provider keys, each line indented by six spaces).
async fn cleancloud_proxy(
    env: &Env,
    settings: &str,
) -> (FakeServer, Arc<Issuer>, credproxy::Running) {
    let issuer = Issuer::new(Duration::from_secs(3600));
    let fake = serve_with_issuer(
        listener().await,
        Some(env.tls.clone()),
        cleancloud::Settings {
            user_code: USER_CODE.into(),
            user_secret: USER_SECRET.into(),
        },
        issuer.clone(),
        cleancloud::handle,
    );
    let proxy = env
        .proxy(&format!(
            "providers:
  cc:
    cleancloud:
      user_code: '{USER_CODE}'
      user_secret: '{USER_SECRET}'
      max_body: 2048
      connect_to: '{}'
{settings}routes:
  - host: api.cleancloud.io
    provider: cc
    connect_to: '{}'
",
            fake.addr, fake.addr
        ))
        .await;
    (fake, issuer, proxy)
}

/// With an `api_base` that has a path (a gateway in front), the token request goes there and is
/// signed over that whole path, which the fake checks with its own verifier.
#[tokio::test]
async fn a_cleancloud_api_base_with_a_path_is_signed_over_that_path() {
    let env = Env::new();
    let (fake, issuer, proxy) =
        cleancloud_proxy(&env, "      api_base: https://api.cleancloud.io/gw/v1\n").await;
    let c = client(proxy.addr);
    let r = get(&c, "http://api.cleancloud.io/clouds").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(issuer.token_requests(), 1);
    let paths: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r.uri.path().to_string())
        .collect();
    assert_eq!(paths, ["/gw/v1/api_tokens", "/clouds"]);
    // That token endpoint is the proxy's business too.
    assert_refused(
        &get(&c, "http://api.cleancloud.io/gw/v1/api_tokens").await,
        400,
        "token_endpoint",
    );
}

/// `curl -I` through the proxy to the fake APIs that sign or scope by method: a HEAD gets its
/// GET's headers (status, type, length) and no body. CleanCloud's HEAD is signed over `HEAD`,
/// which the fake checks against the method it received.
#[tokio::test]
async fn a_head_to_cleancloud_or_cloudneeti_gets_the_headers_of_its_get() {
    let env = Env::new();
    let (_cc_fake, cc_issuer, cc_proxy) = cleancloud_proxy(&env, "").await;
    let (neeti_fake, _) = cloudneeti_fake(&env).await;
    let neeti_proxy = env
        .proxy(&cloudneeti_yaml(neeti_fake.addr, "current", ""))
        .await;
    for (proxy, url) in [
        (&cc_proxy, "http://api.cleancloud.io/clouds".to_string()),
        (
            &neeti_proxy,
            format!("http://api.cloudneeti.com/onboarding/license/{LICENSE}/licenseAccounts"),
        ),
    ] {
        let c = client(proxy.addr);
        let full = get(&c, &url).await;
        assert_eq!(full.status(), 200, "{url}");
        let length = full.headers()["content-length"].clone();
        let kind = full.headers()["content-type"].clone();
        assert!(
            kind.to_str().unwrap().starts_with("application/json"),
            "{url}"
        );
        assert!(full.bytes().await.unwrap().len() > 2, "{url}");
        let head = send(c.head(&url)).await;
        assert_eq!(head.status(), 200, "{url}");
        assert_eq!(head.headers()["content-length"], length, "{url}");
        assert_eq!(head.headers()["content-type"], kind, "{url}");
        assert!(head.bytes().await.unwrap().is_empty(), "{url}");
    }
    assert_eq!(cc_issuer.token_requests(), 1);
}

#[tokio::test]
async fn cleancloud_requests_are_signed_and_oversized_bodies_refused() {
    let env = Env::new();
    let (fake, issuer, proxy) = cleancloud_proxy(&env, "").await;
    let c = client(proxy.addr);
    let r = get(&c, "http://api.cleancloud.io/clouds?page=1").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = send(
        c.post("http://api.cleancloud.io/clouds")
            .body(r#"{"name":"a"}"#),
    )
    .await;
    assert_eq!(r.status(), 201, "the signature covers the body");
    assert_eq!(issuer.token_requests(), 1);

    // Declared too large, and chunked too large: 413 before anything is sent.
    let before = fake.requests().len();
    let r = send(
        c.post("http://api.cleancloud.io/clouds")
            .body("x".repeat(4096)),
    )
    .await;
    assert_refused(&r, 413, "body_too_large");
    let msg: serde_json::Value = r.json().await.unwrap();
    assert!(
        msg["message"]
            .as_str()
            .unwrap()
            .contains("providers.cc.cleancloud.max_body"),
        "{msg}"
    );
    let chunks =
        futures_util::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 1024])));
    let r = send(
        c.post("http://api.cleancloud.io/clouds")
            .body(reqwest::Body::wrap_stream(chunks)),
    )
    .await;
    assert_eq!(r.status(), 413);
    assert_eq!(
        fake.requests().len(),
        before,
        "nothing oversized reached CleanCloud"
    );

    // An expired access code: refreshed on the 401 and the signed request retried.
    issuer.revoke_all();
    let r = send(
        c.post("http://api.cleancloud.io/clouds")
            .body(r#"{"name":"b"}"#),
    )
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(issuer.token_requests(), 2);

    // The token endpoint is the proxy's business: not forwarded, and no token spent on it.
    let before = fake.requests().len();
    // However it is spelt: servers differ in what they normalise.
    for path in [
        "/api_tokens",
        "/api_tokens/?x=1",
        "//api_tokens",
        "/API_TOKENS",
        "/api%5Ftokens",
        "/api_tokens;x",
        "/v1/api_tokens",
    ] {
        let r = get(&c, format!("http://api.cleancloud.io{path}")).await;
        assert_refused(&r, 400, "token_endpoint");
    }
    let r = send(c.head("http://api.cleancloud.io/api_tokens")).await;
    assert_eq!(r.status(), 400, "any method");
    assert_eq!(fake.requests().len(), before);
    assert_eq!(issuer.token_requests(), 2);
    let r = get(&c, "http://api.cleancloud.io/clouds").await;
    assert_eq!(r.status(), 200, "the access code is still good");
    assert_eq!(issuer.token_requests(), 2);
}

#[tokio::test]
async fn cloudneeti_is_expressible_as_a_generic_token_exchange() {
    let env = Env::new();
    let (fake, issuer) = cloudneeti_fake(&env).await;
    let secret_file = env.write("app-secret", &format!("{APP_SECRET}\n"));
    let proxy = env
        .proxy(&format!(
            "providers:
  generic:
    token_exchange:
      method: POST
      url: 'https://api.cloudneeti.com/authorize/license/{LICENSE}/token'
      scoped:
        segment: account
        url: 'https://api.cloudneeti.com/authorize/license/{LICENSE}/token?accountId={{scope}}'
      headers:
        Ocp-Apim-Subscription-Key: '{{key}}'
      json:
        APIApplicationId: '{{app}}'
        Secret: '{{secret}}'
      secrets:
        key: '{SUB_KEY}'
        app: '{APP_ID}'
        secret: 'file:{}'
      token_path: result.token
      ttl: 55m
      send:
        Authorization: 'Bearer {{token}}'
        Ocp-Apim-Subscription-Key: '{{key}}'
      connect_to: '{}'
routes:
  - host: api.cloudneeti.com
    provider: generic
    connect_to: '{}'
",
            secret_file.display(),
            fake.addr,
            fake.addr
        ))
        .await;
    let c = client(proxy.addr);
    for path in [
        format!("/onboarding/license/{LICENSE}/licenseAccounts"),
        format!("/audit/license/{LICENSE}/account/acc-1/healthstatus"),
    ] {
        let r = get(&c, format!("http://api.cloudneeti.com{path}")).await;
        assert_eq!(r.status(), 200, "{path}: {}", r.text().await.unwrap());
    }
    assert_eq!(issuer.token_requests(), 2);
}

#[test]
fn token_exchange_templates_are_checked_at_load() {
    let env = Env::new();
    let yaml = env.base_yaml()
        + "providers:
  g:
    token_exchange:
      url: 'https://portal.example.com/token'
      json: {key: '{api_key}'}
      secrets: {}
      token_path: token
      send:
        Authorization: 'Bearer {tok}'
";
    let err = credproxy::config::from_yaml(&yaml, "t.yaml").expect_err("invalid");
    let text = err.to_string();
    assert!(
        text.contains("providers.g.token_exchange.json: `{api_key}` is not defined"),
        "{text}"
    );
    assert!(
        text.contains("providers.g.token_exchange.send.Authorization: `{tok}` is not defined"),
        "{text}"
    );
    assert!(text.contains("no header uses `{token}`"), "{text}");
}

#[tokio::test]
async fn a_hundred_simultaneous_401s_cause_one_refresh() {
    let env = Env::new();
    let (_fake, issuer, proxy) = oauth_proxy(&env).await;
    let c = client(proxy.addr);
    let url = "http://acme.api.openvpn.com/api/v1/networks";
    assert_eq!(get(&c, url).await.status(), 200);
    issuer.revoke_all();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let c = c.clone();
        tasks.spawn(async move { c.get(url).send().await.map(|r| r.status()) });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 200);
    }
    assert_eq!(
        issuer.token_requests(),
        2,
        "the first token and a single refresh"
    );
}

/// `client_auth: keep` with a provider that adds two headers (Cloudneeti's subscription key and
/// token): a client that brings its own (stale) token gets the API's 401 as it is, and the proxy
/// keeps its own good token: the 401 was about the client's.
#[tokio::test]
async fn a_401_to_the_clients_own_token_does_not_cost_the_proxy_its_token() {
    let env = Env::new();
    let (fake, issuer) = cloudneeti_fake(&env).await;
    let yaml = cloudneeti_yaml(fake.addr, "current", "").replace(
        "    provider: neeti\n",
        "    provider: neeti\n    client_auth: keep\n",
    );
    let proxy = env.proxy(&yaml).await;
    let c = client(proxy.addr);
    let url = format!("http://api.cloudneeti.com/onboarding/license/{LICENSE}/licenseAccounts");
    assert_eq!(get(&c, &url).await.status(), 200);
    assert_eq!(issuer.token_requests(), 1);

    for _ in 0..3 {
        let r = send(
            c.get(&url)
                .header("authorization", "Bearer clients-own-stale-token"),
        )
        .await;
        assert_eq!(r.status(), 401, "the API's answer to the client's token");
        assert!(r.headers().get("x-credproxy-retry").is_none());
    }
    assert_eq!(
        issuer.token_requests(),
        1,
        "no token thrown away or fetched for the client's 401s"
    );
    assert_eq!(get(&c, &url).await.status(), 200);
    assert_eq!(issuer.token_requests(), 1);
}
