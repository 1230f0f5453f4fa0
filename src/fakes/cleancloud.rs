//! Fake CleanCloud (`api.cleancloud.io`), per `shared/providers.md` §3:
//! - `GET /api_tokens`, signed with the user token (code + secret), returns a temporary
//!   `{"accessCode","secretCode"}` pair;
//! - every other request must carry `Authorization: Algorithm=SHA-256,Credential=<accessCode>,
//!   SignedHeaders=authorization,Signature=<hex>`, an HMAC over the method, the path (not the
//!   query) and the body's hash, made with a live access code's secret. Anything else is 401
//!   `{"message":"Unauthorized"}`.
//!
//! The signature is checked by [`signed_by`], written from the Postman collection's script apart
//! from the proxy's signer (`providers::cleancloud::authorization`), so that a mistake in the
//! signer fails the tests instead of agreeing with itself.

use std::sync::Arc;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::issuer::{Issuer, Mode, json_or_string, read_body, with_retry_after};
use super::json_response;
use crate::body::Body;

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

/// Whether `header` is `code`'s signature, with `secret`, of a request with this method, path
/// (without its query) and body. The collection's script: the body's SHA-256 in lower-case hex;
/// the canonical request `SHA-256`, the method, the path, an empty line, `authorization:` and that
/// hash, one per line; the canonical request's SHA-256 in hex; that hex string's HMAC-SHA256 with
/// the secret, in hex.
fn signed_by(
    header: &str,
    code: &str,
    secret: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> bool {
    use aws_lc_rs::{digest, hmac};
    let fields: Vec<(&str, &str)> = header
        .split(',')
        .filter_map(|f| f.split_once('='))
        .collect();
    let expected_fields = [
        ("Algorithm", "SHA-256"),
        ("Credential", code),
        ("SignedHeaders", "authorization"),
    ];
    if fields.len() != 4 || fields[..3] != expected_fields || fields[3].0 != "Signature" {
        return false;
    }
    let Some(signature) = lower_hex_bytes(fields[3].1) else {
        return false;
    };
    let sha256_hex = |data: &[u8]| -> String {
        digest::digest(&digest::SHA256, data)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let canonical = [
        "SHA-256",
        method,
        path,
        "",
        "authorization:",
        &sha256_hex(body),
    ]
    .join("\n");
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(
        &key,
        sha256_hex(canonical.as_bytes()).as_bytes(),
        &signature,
    )
    .is_ok()
}

/// 32 bytes from 64 lower-case hex digits; `None` for anything else.
fn lower_hex_bytes(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if s.len() != 64 {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? * 16 + digit(pair[1])?))
        .collect()
}

/// Answers one request; `fakes::serve_with_issuer(listener, tls, settings, issuer, handle)`
/// serves it.
pub async fn handle(
    settings: Arc<Settings>,
    issuer: Arc<Issuer>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (settings, issuer) = (&*settings, &*issuer);
    // Under any prefix, for an `api_base` with a path (a gateway in front, say).
    if req.uri().path().ends_with("/api_tokens") && req.method() == Method::GET {
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
    let (method, path) = (parts.method.as_str(), parts.uri.path());
    let signed = |body: &[u8]| signed_by(header, code, &secret, method, path, body);
    // The collection's script means to sign octet-stream uploads as if the body were empty.
    if !(signed(&body) || (content_type_is_octet_stream && signed(b""))) {
        return unauthorized();
    }

    // Signed over the method as sent (HEAD), answered as its GET.
    match (super::routed_method(&parts.method), parts.uri.path()) {
        (Method::GET, "/clouds") => json_response(
            StatusCode::OK,
            json!({"clouds": [{"code": "cl-1", "name": "Demo AWS"}]}),
        ),
        (Method::POST, "/clouds") => json_response(
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
    let signed = authorization_header(req.headers()).is_some_and(|header| {
        signed_by(
            header,
            &settings.user_code,
            &settings.user_secret,
            "GET",
            req.uri().path(),
            b"",
        )
    });
    if !signed {
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

#[cfg(test)]
mod tests {
    use super::signed_by;

    /// The two vectors computed from the collection's script (the proxy's signer has them too).
    #[test]
    fn the_scripts_vectors_verify_and_any_change_does_not() {
        let get = "Algorithm=SHA-256,Credential=UTCODE123,SignedHeaders=authorization,Signature=09f30c140deaaf542f4a7bf9a9e383127a274b1e28261061106e553dad04a8b0";
        assert!(signed_by(
            get,
            "UTCODE123",
            "utsecret456",
            "GET",
            "/api_tokens",
            b""
        ));
        let post = "Algorithm=SHA-256,Credential=ACC789,SignedHeaders=authorization,Signature=df4d87d249829e2cfcfaec215f65aed1958eb938bc9bd7aef97b8be4b272471b";
        let body = br#"{"name":"a"}"#;
        assert!(signed_by(post, "ACC789", "sec000", "POST", "/clouds", body));
        for (header, code, secret, method, path, body) in [
            (
                post,
                "ACC789",
                "sec000",
                "POST",
                "/clouds",
                &br#"{"name":"b"}"#[..],
            ),
            (post, "ACC789", "sec000", "PUT", "/clouds", body),
            (post, "ACC789", "sec000", "POST", "/clouds/", body),
            (post, "ACC789", "sec001", "POST", "/clouds", body),
            (post, "ACC780", "sec000", "POST", "/clouds", body),
            (
                &post.to_uppercase(),
                "ACC789",
                "sec000",
                "POST",
                "/clouds",
                body,
            ),
            (
                &post.replace(",Sig", ", Sig"),
                "ACC789",
                "sec000",
                "POST",
                "/clouds",
                body,
            ),
            (
                &format!("{post},x=y"),
                "ACC789",
                "sec000",
                "POST",
                "/clouds",
                body,
            ),
        ] {
            assert!(
                !signed_by(header, code, secret, method, path, body),
                "{header} {code} {secret} {method} {path}"
            );
        }
    }
}
