//! Credential providers: one module per kind, one `Provider` value per configured provider.
//!
//! A provider answers one question for the forward stage: which headers go on this request.
//! Static kinds (`basic`, `headers`) compute them once at load time, so the hot path only clones
//! prepared `HeaderValue`s. Token kinds (`oauth2`, `token_exchange`, `cloudneeti`, `cleancloud`)
//! fetch a token through [`crate::token`], which owns caching and refresh for all of them.

pub mod basic;
pub mod cleancloud;
pub mod exchange;
pub mod headers;
pub mod oauth2;

use http::{HeaderName, HeaderValue};

use crate::outbound::Client;
use crate::secret::Secret;
use crate::token::{Fetched, TokenError};

#[derive(Debug)]
pub struct Provider {
    pub name: String,
    /// The kind as written in the config file (`basic`, `headers`, …), for logs and status.
    pub kind_name: &'static str,
    pub kind: Kind,
    /// Token kinds: where token-endpoint connections go instead of the URL's host.
    pub connect_to: Option<(String, u16)>,
    /// Where token requests (and, by default, this provider's routes) leave from.
    pub egress: crate::outbound::Egress,
}

#[derive(Debug)]
pub enum Kind {
    /// Headers fixed at load time: `basic` and `headers` both end up here.
    Static(Vec<(HeaderName, HeaderValue)>),
    OAuth2(oauth2::Settings),
    /// `token_exchange`, and `cloudneeti`, which is a prepared recipe of it.
    Exchange(exchange::Recipe),
    CleanCloud(cleancloud::Settings),
}

impl Provider {
    pub fn new(name: impl Into<String>, kind_name: &'static str, kind: Kind) -> Provider {
        Provider {
            name: name.into(),
            kind_name,
            kind,
            connect_to: None,
            egress: Default::default(),
        }
    }

    pub fn uses_tokens(&self) -> bool {
        !matches!(self.kind, Kind::Static(_))
    }

    /// Whether a token can be fetched before any request: not when its URL depends on the
    /// request's host.
    pub fn prefetchable(&self) -> bool {
        match &self.kind {
            Kind::Static(_) => false,
            Kind::OAuth2(s) => !s.token_url.contains("{host}"),
            Kind::Exchange(_) | Kind::CleanCloud(_) => true,
        }
    }

    /// The token cache key for a request: tokens differ per matched host (oauth2 with `{host}`
    /// in its URL) or per account (Cloudneeti account tokens); otherwise one token serves all.
    pub fn scope(&self, host: &str, path: &str) -> String {
        match &self.kind {
            Kind::OAuth2(s) if s.token_url.contains("{host}") => host.to_string(),
            Kind::Exchange(r) => r.scope_of(path).unwrap_or_default(),
            _ => String::new(),
        }
    }

    /// Changes whenever anything about the provider changes, secrets included (a reload keeps
    /// the token cache of a provider whose fingerprint is the same). Never shown.
    pub fn fingerprint(&self) -> String {
        let mut text = format!(
            "{}|{:?}|{:?}|{}",
            self.kind_name,
            self.kind,
            self.connect_to,
            self.egress.key()
        );
        for s in self.secrets() {
            text.push('|');
            text.push_str(s.expose());
        }
        if let Kind::Static(list) = &self.kind {
            for (_, v) in list {
                text.push('|');
                text.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
        }
        crate::token::fingerprint(&Secret::new(text))
    }

    /// The headers this provider sets on requests.
    pub fn header_names(&self) -> Vec<HeaderName> {
        match &self.kind {
            Kind::Static(list) => list.iter().map(|(n, _)| n.clone()).collect(),
            Kind::OAuth2(_) | Kind::CleanCloud(_) => vec![http::header::AUTHORIZATION],
            Kind::Exchange(r) => r.send.iter().map(|(n, _)| n.clone()).collect(),
        }
    }

    /// Every secret of this provider, to blank out of error excerpts.
    pub fn secrets(&self) -> Vec<&Secret> {
        match &self.kind {
            Kind::Static(_) => Vec::new(),
            Kind::OAuth2(s) => vec![&s.client_id, &s.client_secret],
            Kind::Exchange(r) => r.vars.values().collect(),
            Kind::CleanCloud(s) => vec![&s.user_code, &s.user_secret],
        }
    }
}

/// Fetches a token for `scope` with this provider's recipe.
pub async fn fetch_token(
    p: &Provider,
    client: &Client,
    scope: &str,
) -> Result<Fetched, TokenError> {
    let secrets = p.secrets();
    match &p.kind {
        Kind::Static(_) => Err(TokenError::Config(format!(
            "provider `{}` has no token",
            p.name
        ))),
        Kind::OAuth2(s) => oauth2::fetch(s, client, scope, &secrets).await,
        Kind::Exchange(r) => r.fetch(client, scope, &secrets).await,
        Kind::CleanCloud(s) => cleancloud::fetch(s, client, &secrets).await,
    }
}

/// The token URL for error messages (no query string).
pub fn token_endpoint(p: &Provider, scope: &str) -> String {
    let url = match &p.kind {
        Kind::Static(_) => return String::new(),
        Kind::OAuth2(s) => s.token_url.replace("{host}", scope),
        Kind::Exchange(r) => r.url_for(scope),
        Kind::CleanCloud(s) => format!("{}/api_tokens", s.api_base),
    };
    url.split('?').next().unwrap_or_default().to_string()
}

/// A header value that holds a secret: marked sensitive so hyper and h2 never log it and HPACK
/// never indexes it.
pub fn sensitive_value(value: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        "the value contains a character that is not allowed in an HTTP header (such as a newline)"
            .to_string()
    })?;
    v.set_sensitive(true);
    Ok(v)
}
