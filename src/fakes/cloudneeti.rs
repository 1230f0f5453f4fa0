//! Fake Cloudneeti / ZCSPM API (`api.cloudneeti.com`), per `shared/providers.md` §1:
//! - an Azure API Management gateway in front of everything: every path, token endpoints
//!   included, needs `Ocp-Apim-Subscription-Key`, or gets APIM's own 401 bodies;
//! - token endpoints, current shape `POST /authorize/license/{licenseId}/token[?accountId=…]`
//!   with `{"APIApplicationId","Secret"}`, and the legacy (2020 seed) shape
//!   `POST /api/authorize/license` / `POST /api/authorize/license/{licenseId}/token?accountId=…`
//!   with `{"appId","secret"}`; the token is at `result.token`, with no expiry field;
//! - data endpoints take `Authorization: Bearer <token>`: the license token for license-level
//!   APIs, the account token of exactly that account for `/account/{accountId}/…` APIs;
//! - every backend answer is the `{"result","statusCode","message"}` envelope.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::issuer::{
    Issuer, Mode, bearer, form_pairs, guid, json_or_string, read_body, with_retry_after,
};
use super::respond;
use crate::body::Body;

#[derive(Debug, Clone)]
pub struct Settings {
    /// The APIM subscription key (`Ocp-Apim-Subscription-Key`).
    pub subscription_key: String,
    /// The API application's id and secret, exchanged for tokens.
    pub app_id: String,
    pub app_secret: String,
    pub license_id: String,
    /// Accounts in the API application's scope; account tokens exist only for these.
    pub accounts: Vec<String>,
}

const SUCCESS: &str = "Request Successful";

fn envelope(status: StatusCode, result: Value, message: &str) -> Response<Body> {
    respond(
        status,
        "application/json; charset=utf-8",
        json!({"result": result, "statusCode": status.as_u16(), "message": message}).to_string(),
    )
}

fn ok(result: Value) -> Response<Body> {
    envelope(StatusCode::OK, result, SUCCESS)
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    envelope(status, Value::Null, message)
}

/// Azure API Management's own error body: no `result` field.
fn apim_error(status: StatusCode, message: &str) -> Response<Body> {
    respond(
        status,
        "application/json",
        json!({"statusCode": status.as_u16(), "message": message}).to_string(),
    )
}

fn unauthorized() -> Response<Body> {
    error(StatusCode::UNAUTHORIZED, "Unauthorized")
}

fn not_found() -> Response<Body> {
    error(StatusCode::NOT_FOUND, "Resource not found")
}

/// Which token a token request asks for, and which body keys its URL shape takes.
struct TokenRequest<'a> {
    license: Option<&'a str>,
    account: Option<String>,
    legacy: bool,
}

fn token_request<'a>(segs: &[&'a str], query: Option<&str>) -> Option<TokenRequest<'a>> {
    let account = || {
        query.and_then(|q| {
            form_pairs(q)
                .into_iter()
                .find(|(k, _)| k == "accountId")
                .map(|(_, v)| v)
        })
    };
    match segs {
        ["authorize", "license", lic, "token"] => Some(TokenRequest {
            license: Some(lic),
            account: account(),
            legacy: false,
        }),
        ["api", "authorize", "license"] => Some(TokenRequest {
            license: None,
            account: None,
            legacy: true,
        }),
        ["api", "authorize", "license", lic, "token"] => Some(TokenRequest {
            license: Some(lic),
            account: account(),
            legacy: true,
        }),
        _ => None,
    }
}

/// Answers one request; `fakes::serve_with_issuer(listener, tls, settings, issuer, handle)`
/// serves it.
pub async fn handle(
    settings: Arc<Settings>,
    issuer: Arc<Issuer>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (settings, issuer) = (&*settings, &*issuer);
    // The APIM gateway answers before the backend sees anything.
    match req.headers().get("ocp-apim-subscription-key") {
        None => {
            return apim_error(
                StatusCode::UNAUTHORIZED,
                "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.",
            );
        }
        Some(k) if k.as_bytes() != settings.subscription_key.as_bytes() => {
            return apim_error(
                StatusCode::UNAUTHORIZED,
                "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.",
            );
        }
        Some(_) => {}
    }

    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if req.method() == Method::POST
        && let Some(t) = token_request(&segs, req.uri().query())
    {
        return token(settings, issuer, t, req).await;
    }
    data(settings, issuer, &segs, req).await
}

async fn token(
    settings: &Settings,
    issuer: &Issuer,
    t: TokenRequest<'_>,
    req: Request<Incoming>,
) -> Response<Body> {
    let mode = match issuer.token_request().await {
        Ok(mode) => mode,
        Err(refusal) => {
            return refusal.answer(
                |status| error(status, status.canonical_reason().unwrap_or("Error")),
                |secs| {
                    with_retry_after(
                        apim_error(
                            StatusCode::TOO_MANY_REQUESTS,
                            &format!("Rate limit is exceeded. Try again in {secs} seconds."),
                        ),
                        secs,
                    )
                },
            );
        }
    };

    if t.license.is_some_and(|l| l != settings.license_id) {
        return error(StatusCode::NOT_FOUND, "License not found");
    }
    let (_, body) = read_body(req).await;
    let (id_key, secret_key) = if t.legacy {
        ("appId", "secret")
    } else {
        ("APIApplicationId", "Secret")
    };
    let body: Option<Value> = body.and_then(|b| serde_json::from_slice(&b).ok());
    let field = |k: &str| body.as_ref().and_then(|b| b.get(k)).and_then(Value::as_str);
    if field(id_key) != Some(settings.app_id.as_str())
        || field(secret_key) != Some(settings.app_secret.as_str())
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "Invalid API application id or secret",
        );
    }
    let scope = match t.account {
        None => "license".to_string(),
        Some(account) => {
            if !settings.accounts.contains(&account) {
                return error(
                    StatusCode::FORBIDDEN,
                    "Account is not in the API access scope of this application",
                );
            }
            format!("account:{account}")
        }
    };
    if mode == Mode::MissingToken {
        return ok(json!({}));
    }
    ok(json!({"token": issuer.issue(&scope)}))
}

async fn data(
    settings: &Settings,
    issuer: &Issuer,
    segs: &[&str],
    req: Request<Incoming>,
) -> Response<Body> {
    let method = super::routed_method(req.method());
    // (license in the path, scope the bearer token needs)
    let (license, scope) = match segs {
        ["onboarding", "license", lic, "licenseAccounts"] if method == Method::GET => {
            (*lic, "license".to_string())
        }
        [
            "onboarding",
            "license",
            lic,
            "account",
            "aws" | "azure" | "office",
        ] if method == Method::POST => (*lic, "license".to_string()),
        ["onboarding", "license", lic, "config"] if method == Method::PUT => {
            (*lic, "license".to_string())
        }
        [
            "audit" | "compliance",
            "license",
            lic,
            "account",
            acc,
            _,
            ..,
        ] => (*lic, format!("account:{acc}")),
        _ => return not_found(),
    };
    if !bearer(req.headers()).is_some_and(|t| issuer.check(t, &scope)) {
        return unauthorized();
    }
    if license != settings.license_id {
        return error(StatusCode::NOT_FOUND, "License not found");
    }

    match segs {
        ["onboarding", _, _, "licenseAccounts"] => {
            let accounts: Vec<Value> = settings
                .accounts
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    json!({
                        "accountId": a,
                        "accountName": format!("Azure {}", i + 1),
                        "isInApiScope": true,
                        "connectorType": "Azure",
                    })
                })
                .collect();
            ok(json!({
                "licenseId": settings.license_id,
                "accounts": accounts,
                "apis": [
                    "Account.Audit", "Account.Health", "Account.Rescan", "Account.GetJobstatus",
                    "License.AddAccount", "License.UpdateAPIAccess", "License.GetAPIAccess"
                ],
            }))
        }
        ["onboarding", ..] => {
            let (_, body) = read_body(req).await;
            ok(json!({"received": json_or_string(&body.unwrap_or_default())}))
        }
        ["audit", _, _, _, acc, rest @ ..] if method == Method::GET => match rest {
            ["healthstatus"] => ok(json!({
                "accountId": acc,
                "healthStatus": "Healthy",
                "lastScanStatus": "Success",
            })),
            ["benchmarks"] => ok(json!([
                {"benchmarkId": "CSBP", "benchmarkName": "Cloud Security Best Practices"},
                {"benchmarkId": "CIS", "benchmarkName": "CIS Microsoft Azure Foundations"},
            ])),
            ["benchmark", id, "summary"] => ok(json!({
                "accountId": acc,
                "benchmarkId": id,
                "passed": 42,
                "failed": 3,
                "notApplicable": 7,
            })),
            ["failedassets"] => ok(json!({
                "failedAssetCount": 0,
                "failedPolicyAssetsLists": [],
            })),
            _ => not_found(),
        },
        ["compliance", _, _, _, _, rest @ ..] if method == Method::GET => match rest {
            ["rescan"] => ok(json!({"jobId": guid()})),
            ["job", _, "status"] => ok(json!({"jobStatus": "Success"})),
            _ => not_found(),
        },
        _ => not_found(),
    }
}
