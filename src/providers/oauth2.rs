//! `oauth2`: OAuth 2.0 client_credentials (RFC 6749 §4.4), as CloudConnexa uses it
//! (`POST https://{cloud_id}.api.openvpn.com/api/v1/oauth/token`) and any other OAuth API.
//!
//! Client authentication: HTTP Basic (RFC 6749 §2.3.1, the official CloudConnexa client), form
//! body fields, or query parameters (CloudConnexa's own docs). The parameters go in a form body
//! (RFC 6749) or a JSON one (the official CloudConnexa client); with `query`, everything goes in the
//! URL and the body is empty, as CloudConnexa's docs show. `expires_in` sets the lifetime.

use std::time::Duration;

use http::{Method, Request, header};

use crate::body::full;
use crate::outbound::Client;
use crate::secret::Secret;
use crate::token::{self, Fetched, TokenError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    /// HTTP Basic with id and secret form-encoded first (RFC 6749 §2.3.1).
    #[default]
    Basic,
    /// HTTP Basic with id and secret as they are, as most HTTP clients send it (curl `-u`, Go's
    /// `SetBasicAuth`, which CloudConnexa's own client uses) and servers that do not decode expect.
    BasicRaw,
    Form,
    /// Every parameter in the token URL's query, the body empty.
    Query,
}

/// How the token request's parameters are encoded in its body (`query` sends none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenBody {
    /// `application/x-www-form-urlencoded`, as RFC 6749 says.
    #[default]
    Form,
    /// A JSON object of strings, as CloudConnexa's official Go client sends.
    Json,
}

#[derive(Debug)]
pub struct Settings {
    /// May contain `{host}`: the host the request was routed for (wildcard routes).
    pub token_url: String,
    pub client_id: Secret,
    pub client_secret: Secret,
    pub auth: ClientAuthMethod,
    pub body: TokenBody,
    pub scope: Option<String>,
    pub extra_params: Vec<(String, String)>,
    /// Used when the answer has no `expires_in`.
    pub default_ttl: Duration,
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// application/x-www-form-urlencoded encoding of one component.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The reverse of percent-encoding: `%XX` escapes decoded; anything else (a lone `%`, and `+`,
/// which only a form turns into a space) kept as written.
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The token request's `Authorization` for `basic` and `basic_raw` (`None` for the others): the
/// `basic` provider's header, with id and secret form-encoded first for `basic`. The config
/// checks it at load (`Err` when `basic_raw` has a `:` in the client_id, which HTTP Basic cannot
/// carry).
pub fn basic_authorization(
    auth: ClientAuthMethod,
    id: &Secret,
    secret: &Secret,
) -> Result<Option<http::HeaderValue>, String> {
    let (id, secret) = match auth {
        // RFC 6749 §2.3.1: each part is form-encoded before the Basic encoding.
        ClientAuthMethod::Basic => (
            Secret::new(encode(id.expose())),
            Secret::new(encode(secret.expose())),
        ),
        ClientAuthMethod::BasicRaw => (id.clone(), secret.clone()),
        ClientAuthMethod::Form | ClientAuthMethod::Query => return Ok(None),
    };
    super::basic::header(&id, &secret).map(|(_, value)| Some(value))
}

pub async fn fetch(
    s: &Settings,
    client: &Client,
    host: &str,
    secrets: &[&Secret],
) -> Result<Fetched, TokenError> {
    let mut params: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
    if let Some(scope) = &s.scope {
        params.push(("scope", scope));
    }
    params.extend(s.extra_params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut url = s.token_url.replace("{host}", host);
    let mut req = Request::builder().method(Method::POST);
    match s.auth {
        ClientAuthMethod::Basic | ClientAuthMethod::BasicRaw => {
            let value = basic_authorization(s.auth, &s.client_id, &s.client_secret)
                .map_err(TokenError::Config)?;
            if let Some(value) = value {
                req = req.header(header::AUTHORIZATION, value);
            }
        }
        ClientAuthMethod::Form | ClientAuthMethod::Query => {
            params.push(("client_id", s.client_id.expose()));
            params.push(("client_secret", s.client_secret.expose()));
        }
    }
    let body = if s.auth == ClientAuthMethod::Query {
        let sep = if url.contains('?') { '&' } else { '?' };
        url = format!("{url}{sep}{}", form(&params));
        String::new()
    } else if s.body == TokenBody::Json {
        req = req.header(header::CONTENT_TYPE, "application/json");
        let object: serde_json::Map<String, serde_json::Value> = params
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        serde_json::Value::Object(object).to_string()
    } else {
        req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        form(&params)
    };
    let req = req
        .uri(&url)
        .header(header::ACCEPT, "application/json")
        .body(full(body))
        .map_err(|e| {
            TokenError::Config(format!(
                "token_url `{}`: {e}",
                url.split('?').next().unwrap_or("")
            ))
        })?;
    let answer = token::call(client, req, secrets).await?;
    let json = token::parse_json(&answer)?;
    let access = json
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| token::missing_field(&answer, &json, "access_token"))?;
    let lifetime = token::lifetime(
        &answer,
        json.get("expires_in"),
        "expires_in",
        access,
        s.default_ttl,
    );
    Ok(Fetched {
        value: Secret::new(access),
        signing_secret: None,
        lifetime,
    })
}
