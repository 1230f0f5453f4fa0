//! `basic`: `Authorization: Basic base64(user:password)`.
//!
//! 2tCloud uses it with `accountID:ApiKey`, one key per API (Customers, Billing, Cloudstore), so a
//! 2tCloud setup is several `basic` providers on path-prefixed routes of the same host.

use base64::Engine;
use http::{HeaderName, HeaderValue, header::AUTHORIZATION};

use super::sensitive_value;
use crate::secret::Secret;

pub fn header(username: &Secret, password: &Secret) -> Result<(HeaderName, HeaderValue), String> {
    if username.expose().contains(':') {
        // RFC 7617: the user-id cannot contain a colon; the server would split it wrongly.
        return Err("the username contains `:`, which HTTP Basic cannot carry".into());
    }
    let pair = format!("{}:{}", username.expose(), password.expose());
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair.as_bytes());
    Ok((AUTHORIZATION, sensitive_value(&format!("Basic {encoded}"))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_account_and_key() {
        let (name, value) = header(&Secret::new("100234"), &Secret::new("k3y")).expect("valid");
        assert_eq!(name, AUTHORIZATION);
        // base64("100234:k3y")
        assert_eq!(value.to_str().expect("ascii"), "Basic MTAwMjM0OmszeQ==");
        assert!(value.is_sensitive());
    }

    #[test]
    fn colon_in_username_is_refused() {
        assert!(header(&Secret::new("a:b"), &Secret::new("c")).is_err());
    }
}
