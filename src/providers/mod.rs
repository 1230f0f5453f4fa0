//! Credential providers: one module per kind, one `Provider` value per configured provider.
//!
//! A provider answers one question for the forward stage: which headers go on this request.
//! Static kinds (`basic`, `headers`) compute them once at load time, so the hot path only clones
//! prepared `HeaderValue`s.

pub mod basic;
pub mod cleancloud;
pub mod headers;

use http::{HeaderName, HeaderValue};

#[derive(Debug)]
pub struct Provider {
    pub name: String,
    /// The kind as written in the config file (`basic`, `headers`, …), for logs and status.
    pub kind_name: &'static str,
    pub kind: Kind,
}

#[derive(Debug)]
pub enum Kind {
    /// Headers fixed at load time: `basic` and `headers` both end up here.
    Static(Vec<(HeaderName, HeaderValue)>),
}

impl Provider {
    pub fn new(name: impl Into<String>, kind_name: &'static str, kind: Kind) -> Provider {
        Provider {
            name: name.into(),
            kind_name,
            kind,
        }
    }

    /// The headers this provider sets on every request it handles.
    pub fn credentials(&self) -> &[(HeaderName, HeaderValue)] {
        match &self.kind {
            Kind::Static(h) => h,
        }
    }
}

/// A header value that holds a secret: marked sensitive so hyper and h2 never log it and HPACK
/// never indexes it.
pub fn sensitive_value(value: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| "the value contains a character that is not allowed in an HTTP header (such as a newline)".to_string())?;
    v.set_sensitive(true);
    Ok(v)
}
