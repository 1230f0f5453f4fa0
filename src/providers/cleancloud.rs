//! `cleancloud`: CleanCloud's HMAC request signing (per its Postman collection's pre-request
//! script). A user token (code + secret) signs `GET /api_tokens`, which returns a temporary
//! access code + secret; every API request is then signed with those, over its method, path and
//! body. No timestamp is signed, so the proxy must still sign each request: the body changes.

use std::time::Duration;

use aws_lc_rs::{digest, hmac};
use http::{Method, Request, header};

use crate::body::empty;
use crate::outbound::Client;
use crate::secret::Secret;
use crate::token::{self, Fetched, TokenError};

#[derive(Debug)]
pub struct Settings {
    /// `https://api.cleancloud.io`, no trailing slash.
    pub api_base: String,
    pub user_code: Secret,
    pub user_secret: Secret,
    /// CleanCloud does not say how long an access code lives.
    pub ttl: Duration,
    /// The signature covers the body, so it is read whole first; larger bodies get 413.
    pub max_body: usize,
}

/// `GET /api_tokens`, signed with the user token, answers `{"accessCode","secretCode"}`.
pub async fn fetch(
    s: &Settings,
    client: &Client,
    secrets: &[&Secret],
) -> Result<Fetched, TokenError> {
    let req = token_request(s)?;
    let answer = token::call(client, req, secrets).await?;
    let json = token::parse_json(&answer)?;
    let field = |name: &str| {
        json.get(name)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(Secret::new)
            .ok_or_else(|| token::missing_field(&answer, &json, name))
    };
    Ok(Fetched {
        value: field("accessCode")?,
        signing_secret: Some(field("secretCode")?),
        lifetime: s.ttl,
    })
}

/// The token endpoint, `{api_base}/api_tokens` (`api_base` may have a path).
fn token_uri(s: &Settings) -> Result<http::Uri, http::uri::InvalidUri> {
    format!("{}/api_tokens", s.api_base).parse()
}

/// Whether a request for `path_and_query` may reach the token endpoint: its last segment is
/// `api_tokens` however it is written (percent-encoded, in any case, with `;` parameters, after
/// `//` or a backslash, under any prefix), as servers differ in what they normalise.
pub fn is_token_path(path_and_query: &str) -> bool {
    let path = path_and_query.split('?').next().unwrap_or("");
    // Decoded only when it has escapes: a copy per signed request saved.
    let decoded;
    let path = if path.contains('%') {
        decoded = crate::providers::oauth2::decode(path);
        decoded.as_str()
    } else {
        path
    };
    path.split(['/', '\\'])
        .map(|seg| seg.split(';').next().unwrap_or(seg))
        .rfind(|seg| !seg.is_empty())
        .is_some_and(|seg| seg.eq_ignore_ascii_case("api_tokens"))
}

/// `GET` of the token endpoint, signed over the path it is sent to.
fn token_request(s: &Settings) -> Result<Request<crate::body::Body>, TokenError> {
    let uri = token_uri(s).map_err(|e| TokenError::Config(format!("api_base: {e}")))?;
    let auth = authorization(
        s.user_code.expose(),
        s.user_secret.expose(),
        "GET",
        uri.path(),
        b"",
    );
    Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header(
            header::AUTHORIZATION,
            crate::providers::sensitive_value(&auth).map_err(TokenError::Config)?,
        )
        .header(header::ACCEPT, "application/json")
        .body(empty())
        .map_err(|e| TokenError::Config(format!("api_base: {e}")))
}

/// The `Authorization` header value for one request.
///
/// canonical = "SHA-256\n" + METHOD + "\n" + path-without-query + "\n\nauthorization:\n" + hex(sha256(body))
/// signature = hex(hmac_sha256(secret, hex(sha256(canonical))))
pub fn authorization(
    code: &str,
    secret: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> String {
    let path = path_and_query.split('?').next().unwrap_or("/");
    let body_hash = hex(digest::digest(&digest::SHA256, body).as_ref());
    let canonical = format!(
        "SHA-256\n{}\n{path}\n\nauthorization:\n{body_hash}",
        method.to_ascii_uppercase()
    );
    let hashed = hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref());
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let signature = hex(hmac::sign(&key, hashed.as_bytes()).as_ref());
    format!("Algorithm=SHA-256,Credential={code},SignedHeaders=authorization,Signature={signature}")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_request_is_signed_over_the_path_it_goes_to() {
        for (api_base, path) in [
            ("https://api.cleancloud.io", "/api_tokens"),
            (
                "https://gw.example.com/cleancloud/v1",
                "/cleancloud/v1/api_tokens",
            ),
        ] {
            let s = Settings {
                api_base: api_base.into(),
                user_code: Secret::new("UTCODE123"),
                user_secret: Secret::new("utsecret456"),
                ttl: Duration::from_secs(60),
                max_body: 1024,
            };
            let req = token_request(&s).expect("a valid token request");
            assert_eq!(req.uri().to_string(), format!("{api_base}/api_tokens"));
            assert_eq!(
                req.headers()[header::AUTHORIZATION],
                authorization("UTCODE123", "utsecret456", "GET", path, b"").as_str()
            );
        }
    }

    #[test]
    fn published_test_vectors() {
        assert_eq!(
            authorization("UTCODE123", "utsecret456", "GET", "/api_tokens", b""),
            "Algorithm=SHA-256,Credential=UTCODE123,SignedHeaders=authorization,Signature=09f30c140deaaf542f4a7bf9a9e383127a274b1e28261061106e553dad04a8b0"
        );
        assert_eq!(
            authorization(
                "ACC789",
                "sec000",
                "POST",
                "/clouds?x=1",
                br#"{"name":"a"}"#
            ),
            "Algorithm=SHA-256,Credential=ACC789,SignedHeaders=authorization,Signature=df4d87d249829e2cfcfaec215f65aed1958eb938bc9bd7aef97b8be4b272471b"
        );
    }
}
