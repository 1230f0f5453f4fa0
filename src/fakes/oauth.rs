//! Fake CloudConnexa (OpenVPN, `https://{cloud_id}.api.openvpn.com`) OAuth 2.0
//! client-credentials API, per `shared/providers.md` §4:
//! - `POST /api/v1/oauth/token` takes the client credentials as HTTP Basic (the official Go
//!   client), as `client_id`/`client_secret` query parameters (the documentation's curl), or as
//!   form-body fields; `grant_type=client_credentials` may come in the query, a form body or a
//!   JSON body. The answer is Spring Security OAuth2's `{"access_token":"eyJ…","token_type":
//!   "bearer","expires_in":…,"scope":"read write"}`;
//! - a token is good only on the host it was requested from (each cloud id is its own tenant);
//! - the Spring Cloud Gateway in front answers 429 with an empty body and `X-RateLimit-*`
//!   headers (no `Retry-After`), and its own JSON envelope for other gateway errors.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::issuer::{Issuer, Mode, bearer, form_pairs, guid, json_or_string, read_body};
use super::json_response;
use crate::body::{Body, empty};

#[derive(Debug, Clone)]
pub struct Settings {
    pub client_id: String,
    pub client_secret: String,
}

const TOKEN_PATH: &str = "/api/v1/oauth/token";

/// The gateway's own error envelope (seen on 404s in the wild).
fn gateway_error(status: StatusCode, path: &str) -> Response<Body> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let request_id: String = guid().chars().filter(|c| *c != '-').take(16).collect();
    json_response(
        status,
        json!({
            "path": path,
            "requestId": request_id,
            "status": status.as_u16(),
            "statusError": status.canonical_reason().unwrap_or("Error"),
            "timestamp": timestamp,
        }),
    )
}

/// The host a request was sent to, lower-cased and without its port: the token's scope.
fn request_host(headers: &HeaderMap, uri: &Uri) -> String {
    let raw = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(String::from)
        .or_else(|| uri.authority().map(|a| a.as_str().to_string()))
        .unwrap_or_default();
    let raw = raw.rsplit('@').next().unwrap_or_default();
    let host = if raw.starts_with('[') {
        // An IPv6 literal keeps its brackets; only a port after `]` goes.
        raw.split_inclusive(']').next().unwrap_or(raw)
    } else {
        raw.split(':').next().unwrap_or(raw)
    };
    host.to_ascii_lowercase()
}

/// Answers one request; `fakes::serve_with_issuer(listener, tls, settings, issuer, handle)`
/// serves it.
pub async fn handle(
    settings: Arc<Settings>,
    issuer: Arc<Issuer>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (settings, issuer) = (&*settings, &*issuer);
    let path = req.uri().path().to_string();
    if path == TOKEN_PATH && req.method() == Method::POST {
        return token(settings, issuer, req).await;
    }
    if path == TOKEN_PATH {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({
                "error": "method_not_allowed",
                "error_description": format!("Request method '{}' not supported", req.method()),
            }),
        );
    }
    if !path.starts_with("/api/") {
        return gateway_error(StatusCode::NOT_FOUND, &path);
    }
    let host = request_host(req.headers(), req.uri());
    if !bearer(req.headers()).is_some_and(|t| issuer.check(t, &host)) {
        let mut r = json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_token", "error_description": "Access token expired"}),
        );
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(
                r#"Bearer error="invalid_token", error_description="Access token expired""#,
            ),
        );
        return r;
    }
    let (page, size) = paging(req.uri().query());
    match (super::routed_method(req.method()), path.as_str()) {
        (Method::GET, "/api/v1/networks") => list(
            page,
            size,
            json!({
                "id": "b1f2a3c4-0000-4000-8000-00000000a001",
                "name": "demo-network",
                "description": "Demo network",
                "egress": false,
                "internetAccess": "SPLIT_TUNNEL_ON",
                "systemSubnets": ["100.96.0.0/11"],
            }),
        ),
        (Method::GET, "/api/v1/users") => list(
            page,
            size,
            json!({
                "id": "b1f2a3c4-0000-4000-8000-00000000b001",
                "username": "demo",
                "email": "demo@example.com",
                "firstName": "Demo",
                "lastName": "User",
                "role": "OWNER",
                "status": "ACTIVE",
            }),
        ),
        (Method::POST, "/api/v1/networks") => {
            let (_, body) = read_body(req).await;
            json_response(
                StatusCode::CREATED,
                json!({"received": json_or_string(&body.unwrap_or_default())}),
            )
        }
        _ => gateway_error(StatusCode::NOT_FOUND, &path),
    }
}

fn paging(query: Option<&str>) -> (u64, u64) {
    let pairs = query.map(form_pairs).unwrap_or_default();
    let get = |k: &str, default: u64| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(default)
    };
    (get("page", 0), get("size", 100))
}

fn list(page: u64, size: u64, item: Value) -> Response<Body> {
    json_response(
        StatusCode::OK,
        json!({
            "content": [item],
            "numberOfElements": 1,
            "page": page,
            "size": size,
            "success": true,
            "totalElements": 1,
            "totalPages": 1,
        }),
    )
}

fn bad_credentials() -> Response<Body> {
    json_response(
        StatusCode::UNAUTHORIZED,
        json!({"error": "unauthorized", "error_description": "Bad credentials"}),
    )
}

/// `client_id:client_secret` from an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let pair = String::from_utf8(decoded).ok()?;
    let (id, secret) = pair.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

async fn token(settings: &Settings, issuer: &Issuer, req: Request<Incoming>) -> Response<Body> {
    let mode = match issuer.token_request().await {
        Ok(mode) => mode,
        Err(refusal) => {
            return refusal.answer(
                |status| gateway_error(status, TOKEN_PATH),
                |retry_after_secs| {
                    let mut r = Response::new(empty());
                    *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                    let h = r.headers_mut();
                    h.insert("x-ratelimit-replenish-rate", HeaderValue::from(1u32));
                    h.insert(
                        "x-ratelimit-replenish-time",
                        HeaderValue::from(retry_after_secs),
                    );
                    h.insert("x-ratelimit-remaining", HeaderValue::from(0u32));
                    h.insert("x-ratelimit-burst-capacity", HeaderValue::from(20u32));
                    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(0u32));
                    r
                },
            );
        }
    };

    let host = request_host(req.headers(), req.uri());
    let (parts, body) = read_body(req).await;
    let body = body.unwrap_or_default();
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let query = parts.uri.query().map(form_pairs).unwrap_or_default();
    let form = if content_type.starts_with("application/x-www-form-urlencoded") {
        form_pairs(&String::from_utf8_lossy(&body))
    } else {
        Vec::new()
    };
    let json_body: Option<Value> = if form.is_empty() {
        serde_json::from_slice(&body).ok()
    } else {
        None
    };
    issuer.record_token_body(if body.is_empty() {
        "empty"
    } else if !form.is_empty() {
        "form"
    } else if json_body.as_ref().is_some_and(Value::is_object)
        && content_type.starts_with("application/json")
    {
        "json"
    } else {
        "other"
    });
    let find = |pairs: &[(String, String)], k: &str| {
        pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    };
    let json_field = |k: &str| {
        json_body
            .as_ref()
            .and_then(|b| b.get(k))
            .and_then(Value::as_str)
            .map(String::from)
    };

    let credentials = if let Some(c) = basic_credentials(&parts.headers) {
        Some(("basic", c))
    } else if let Some(id) = find(&query, "client_id") {
        Some((
            "query",
            (id, find(&query, "client_secret").unwrap_or_default()),
        ))
    } else if let Some(id) = find(&form, "client_id") {
        Some((
            "form",
            (id, find(&form, "client_secret").unwrap_or_default()),
        ))
    } else {
        json_field("client_id").map(|id| {
            (
                "json",
                (id, json_field("client_secret").unwrap_or_default()),
            )
        })
    };
    let Some((method, (id, secret))) = credentials else {
        return bad_credentials();
    };
    issuer.record_auth_method(method);
    if id != settings.client_id || secret != settings.client_secret {
        return bad_credentials();
    }
    // A CloudConnexa client id ends in its organisation's cloud id (`<32 characters>.acme`) and
    // is good only on that organisation's host, not on another `*.api.openvpn.com`.
    if let (Some((_, cloud)), Some(asked)) = (
        settings.client_id.rsplit_once('.'),
        host.strip_suffix(".api.openvpn.com"),
    ) && asked != cloud.to_ascii_lowercase()
    {
        return bad_credentials();
    }

    let grant_type = find(&query, "grant_type")
        .or_else(|| find(&form, "grant_type"))
        .or_else(|| json_field("grant_type"));
    match grant_type.as_deref() {
        None => return json_response(StatusCode::BAD_REQUEST, json!({"error": "invalid_request"})),
        Some("client_credentials") => {}
        Some(other) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({
                    "error": "unsupported_grant_type",
                    "error_description": format!("Unsupported grant type: {other}"),
                }),
            );
        }
    }

    let expires_in = issuer.ttl().as_secs().max(1);
    if mode == Mode::BrokenToken {
        return json_response(
            StatusCode::OK,
            json!({"access_token": "abc\r\nX-Injected: yes", "token_type": "bearer", "expires_in": expires_in}),
        );
    }
    if mode == Mode::MissingToken {
        return json_response(
            StatusCode::OK,
            json!({"token_type": "bearer", "expires_in": expires_in, "scope": "read write"}),
        );
    }
    json_response(
        StatusCode::OK,
        json!({
            "access_token": issuer.issue(&host),
            "token_type": "bearer",
            "expires_in": expires_in,
            "scope": "read write",
        }),
    )
}
