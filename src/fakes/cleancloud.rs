//! Fake CleanCloud (`api.cleancloud.io`), per `shared/providers.md` §3:
//! - `GET /api_tokens`, signed with the user token (code + secret), returns a temporary
//!   `{"accessCode","secretCode"}` pair;
//! - every other request must carry `Authorization: Algorithm=SHA-256,Credential=<accessCode>,
//!   SignedHeaders=authorization,Signature=<hex>`, an HMAC over the method, the path (not the
//!   query) and the body's hash, made with a live access code's secret (see
//!   [`crate::providers::cleancloud::authorization`]). Anything else is 401
//!   `{"message":"Unauthorized"}`.

use std::sync::Arc;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::issuer::{Issuer, Mode, json_or_string, read_body, with_retry_after};
use super::json_response;
use crate::body::Body;
use crate::providers::cleancloud::authorization;

#[derive(Debug, Clone)]
pub struct Settings {
    /// The user token that signs `GET /api_tokens`.
    pub user_code: String,
    pub user_secret: String,
}

/// The scope of every access code: there is one API.
const SCOPE: &str = "api";

fn message(status: StatusCode, text: &str) -> Response<Body> {
    json_response(status, json!({ "message": text }))
}

fn unauthorized() -> Response<Body> {
    message(StatusCode::UNAUTHORIZED, "Unauthorized")
}

fn authorization_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// The `Credential=` field of a CleanCloud `Authorization` header.
fn credential(header: &str) -> Option<&str> {
    header
        .split(',')
        .find_map(|f| f.trim().strip_prefix("Credential="))
}

/// Answers one request; `fakes::serve_with_issuer(listener, tls, settings, issuer, handle)`
/// serves it.
pub async fn handle(
    settings: Arc<Settings>,
    issuer: Arc<Issuer>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (settings, issuer) = (&*settings, &*issuer);
    if req.uri().path() == "/api_tokens" && req.method() == Method::GET {
        return api_tokens(settings, issuer, req).await;
    }

    let content_type_is_octet_stream = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"));
    let (parts, body) = read_body(req).await;
    let Some(body) = body else {
        return message(StatusCode::BAD_REQUEST, "Bad Request");
    };
    let Some(header) = authorization_header(&parts.headers) else {
        return unauthorized();
    };
    let Some(code) = credential(header) else {
        return unauthorized();
    };
    let Some(secret) = issuer.secret_of(code).filter(|_| issuer.check(code, SCOPE)) else {
        return unauthorized();
    };
    let method = parts.method.as_str();
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let signed = |body: &[u8]| header == authorization(code, &secret, method, path_and_query, body);
    // The collection's script means to sign octet-stream uploads as if the body were empty.
    if !(signed(&body) || (content_type_is_octet_stream && signed(b""))) {
        return unauthorized();
    }

    match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/clouds") => json_response(
            StatusCode::OK,
            json!({"clouds": [{"code": "cl-1", "name": "Demo AWS"}]}),
        ),
        (&Method::POST, "/clouds") => json_response(
            StatusCode::CREATED,
            json!({"created": json_or_string(&body)}),
        ),
        _ => json_response(StatusCode::OK, json!({"ok": true})),
    }
}

async fn api_tokens(
    settings: &Settings,
    issuer: &Issuer,
    req: Request<Incoming>,
) -> Response<Body> {
    let mode = match issuer.token_request().await {
        Ok(mode) => mode,
        Err(refusal) => {
            return refusal.answer(
                |status| message(status, status.canonical_reason().unwrap_or("Error")),
                |secs| {
                    with_retry_after(
                        message(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests"),
                        secs,
                    )
                },
            );
        }
    };
    let expected = authorization(
        &settings.user_code,
        &settings.user_secret,
        "GET",
        "/api_tokens",
        b"",
    );
    if authorization_header(req.headers()) != Some(expected.as_str()) {
        return unauthorized();
    }
    if mode == Mode::MissingToken {
        return json_response(StatusCode::OK, json!({"secretCode": "SC"}));
    }
    let (code, secret) = issuer.issue_with_secret(SCOPE);
    json_response(
        StatusCode::OK,
        json!({"accessCode": code, "secretCode": secret}),
    )
}
