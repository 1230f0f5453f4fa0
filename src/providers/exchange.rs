//! `token_exchange`: a declarative recipe for portals that hand out a token for a key and secret,
//! and `cloudneeti`, which is one such recipe prepared from a few settings (one mechanism, not
//! two copies).
//!
//! Templates (`url`, header values, body strings, `send` values) may hold `{name}` placeholders
//! for the recipe's secrets, `{scope}` (the per-request scope, e.g. a Cloudneeti account id) and,
//! in `send` only, `{token}`.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request, header};

use crate::body::full;
use crate::outbound::Client;
use crate::secret::Secret;
use crate::token::{self, Fetched, TokenError};

#[derive(Debug)]
pub enum BodyTemplate {
    Json(serde_json::Value),
    Form(Vec<(String, String)>),
}

/// Requests whose path has `/{segment}/{value}/…` use a token scoped to `value`, fetched from
/// `url` (with `{scope}` = `value`). Cloudneeti: `/account/{accountId}/` → account token.
#[derive(Debug)]
pub struct Scoped {
    pub segment: String,
    pub url: String,
}

#[derive(Debug)]
pub struct Recipe {
    pub method: Method,
    pub url: String,
    pub scoped: Option<Scoped>,
    pub headers: Vec<(HeaderName, String)>,
    pub body: Option<BodyTemplate>,
    /// Values for `{name}` placeholders.
    pub vars: BTreeMap<String, Secret>,
    /// Dotted path to the token in the JSON answer, e.g. `result.token`.
    pub token_path: String,
    /// Dotted path to a lifetime in seconds, if the answer has one.
    pub expires_in_path: Option<String>,
    /// Lifetime when the answer gives none (and the token is not a JWT with `exp`).
    pub ttl: Duration,
    /// Headers put on each proxied request; values may use `{token}` and `{name}`.
    pub send: Vec<(HeaderName, String)>,
}

/// Replaces `{name}` placeholders; unknown names are left as they are (config validation
/// rejects them before this runs). Secrets go in first, request-derived values (`{scope}`,
/// `{token}`) last, so a crafted value can never pull a secret into a template.
pub fn fill(template: &str, vars: &BTreeMap<String, Secret>, extra: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{k}}}"), v.expose());
    }
    for (k, v) in extra {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// The placeholders a template uses, for validation.
pub fn placeholders(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    out.push(name.to_string());
                    rest = &after[end + 1..];
                } else {
                    // Not a placeholder (JSON punctuation, say): look again from the next `{`.
                    rest = after;
                }
            }
            None => break,
        }
    }
    out
}

fn fill_json(
    v: &serde_json::Value,
    vars: &BTreeMap<String, Secret>,
    extra: &[(&str, &str)],
) -> serde_json::Value {
    match v {
        serde_json::Value::String(s) => serde_json::Value::String(fill(s, vars, extra)),
        serde_json::Value::Array(a) => a.iter().map(|x| fill_json(x, vars, extra)).collect(),
        serde_json::Value::Object(o) => o
            .iter()
            .map(|(k, x)| (k.clone(), fill_json(x, vars, extra)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        other => other.clone(),
    }
}

impl Recipe {
    /// The scope of a request path, if the recipe has per-scope tokens.
    /// The scope a path names, percent-decoded: `acc%2F1` is the account `acc/1`, whose token
    /// URL then has it encoded once (`{scope}`), not twice.
    pub fn scope_of(&self, path: &str) -> Option<String> {
        let scoped = self.scoped.as_ref()?;
        // `/{segment}/{value}/…`: the value must be followed by more path, so Cloudneeti's
        // `/onboarding/license/{id}/account/aws` (a license-level call) is not an account scope.
        let segs: Vec<&str> = path.split('/').collect();
        segs.windows(3)
            .find(|w| w[0] == scoped.segment && !w[1].is_empty() && !w[2].is_empty())
            .map(|w| super::oauth2::decode(w[1]))
    }

    pub fn url_for(&self, scope: &str) -> String {
        match (&self.scoped, scope.is_empty()) {
            (Some(s), false) => s.url.replace("{scope}", &super::oauth2::encode(scope)),
            _ => self.url.clone(),
        }
    }

    /// The token URL for `scope` with the secrets in it, each percent-encoded as `{scope}` is:
    /// a `&`, `#` or `/` in a secret must stay inside its value.
    fn filled_url(&self, scope: &str) -> String {
        let encoded: BTreeMap<String, Secret> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), Secret::new(super::oauth2::encode(v.expose()))))
            .collect();
        fill(&self.url_for(scope), &encoded, &[("scope", scope)])
    }

    pub async fn fetch(
        &self,
        client: &Client,
        scope: &str,
        secrets: &[&Secret],
    ) -> Result<Fetched, TokenError> {
        let extra = [("scope", scope)];
        let url = self.filled_url(scope);
        let mut req = Request::builder().method(self.method.clone()).uri(&url);
        for (name, template) in &self.headers {
            let value = crate::providers::sensitive_value(&fill(template, &self.vars, &extra))
                .map_err(TokenError::Config)?;
            req = req.header(name, value);
        }
        let body = match &self.body {
            None => full(""),
            Some(BodyTemplate::Json(v)) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                full(fill_json(v, &self.vars, &extra).to_string())
            }
            Some(BodyTemplate::Form(pairs)) => {
                req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                let encoded: Vec<String> = pairs
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{}={}",
                            super::oauth2::encode(k),
                            super::oauth2::encode(&fill(v, &self.vars, &extra))
                        )
                    })
                    .collect();
                full(encoded.join("&"))
            }
        };
        let req = req
            .header(header::ACCEPT, "application/json")
            .body(body)
            .map_err(|e| TokenError::Config(format!("token url: {e}")))?;
        let answer = token::call(client, req, secrets).await?;
        let json = token::parse_json(&answer)?;
        let value = token::json_path(&json, &self.token_path)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| token::missing_field(&answer, &json, &self.token_path))?;
        let path = self.expires_in_path.as_deref();
        let lifetime = token::lifetime(
            &answer,
            path.and_then(|p| token::json_path(&json, p)),
            path.unwrap_or_default(),
            value,
            self.ttl,
        );
        Ok(Fetched {
            value: Secret::new(value),
            signing_secret: None,
            lifetime,
        })
    }

    /// The headers for one proxied request carrying `token`.
    pub fn headers_for(&self, token: &Secret) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        self.send
            .iter()
            .map(|(name, template)| {
                let v = fill(template, &self.vars, &[("token", token.expose())]);
                Ok((name.clone(), crate::providers::sensitive_value(&v)?))
            })
            .collect()
    }
}

/// Which Cloudneeti token endpoint generation to call (providers.md: it changed in 2020).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudneetiEndpoint {
    /// `POST /authorize/license/{licenseId}/token[?accountId=]`, body `{APIApplicationId, Secret}`.
    #[default]
    Current,
    /// The 2020 seed: `POST /api/authorize/license` (license token) and
    /// `POST /api/authorize/license/{licenseId}/token?accountId=` (account token), body `{appId, secret}`.
    Legacy,
}

/// Cloudneeti as a recipe: the subscription key on the token request and on every call, the
/// bearer token from `result.token`, account tokens for `/account/{accountId}/` paths.
pub fn cloudneeti(
    api_host: &str,
    license_id: &str,
    endpoint: CloudneetiEndpoint,
    app_id: Secret,
    app_secret: Secret,
    subscription_key: Secret,
    ttl: Duration,
) -> Recipe {
    let lic = super::oauth2::encode(license_id);
    let (license_url, account_url, body) = match endpoint {
        CloudneetiEndpoint::Current => (
            format!("https://{api_host}/authorize/license/{lic}/token"),
            format!("https://{api_host}/authorize/license/{lic}/token?accountId={{scope}}"),
            serde_json::json!({"APIApplicationId": "{app_id}", "Secret": "{app_secret}"}),
        ),
        CloudneetiEndpoint::Legacy => (
            format!("https://{api_host}/api/authorize/license"),
            format!("https://{api_host}/api/authorize/license/{lic}/token?accountId={{scope}}"),
            serde_json::json!({"appId": "{app_id}", "secret": "{app_secret}"}),
        ),
    };
    let key = HeaderName::from_static("ocp-apim-subscription-key");
    Recipe {
        method: Method::POST,
        url: license_url,
        scoped: Some(Scoped {
            segment: "account".into(),
            url: account_url,
        }),
        headers: vec![(key.clone(), "{subscription_key}".into())],
        body: Some(BodyTemplate::Json(body)),
        vars: BTreeMap::from([
            ("app_id".to_string(), app_id),
            ("app_secret".to_string(), app_secret),
            ("subscription_key".to_string(), subscription_key),
        ]),
        token_path: "result.token".into(),
        expires_in_path: None,
        ttl,
        send: vec![
            (header::AUTHORIZATION, "Bearer {token}".into()),
            (key, "{subscription_key}".into()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(host: &str) -> Recipe {
        cloudneeti(
            host,
            "L",
            CloudneetiEndpoint::Current,
            Secret::new("a"),
            Secret::new("b"),
            Secret::new("c"),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn account_scope_needs_a_segment_after_the_id() {
        let r = recipe("api.cloudneeti.com");
        assert_eq!(
            r.scope_of("/audit/license/L/account/acc-1/healthstatus"),
            Some("acc-1".into())
        );
        // Written percent-encoded, it is encoded once in the token URL, not twice.
        let scope = r.scope_of("/audit/license/L/account/acc%2F1/healthstatus");
        assert_eq!(scope.as_deref(), Some("acc/1"));
        assert_eq!(
            r.url_for(&scope.unwrap_or_default()),
            "https://api.cloudneeti.com/authorize/license/L/token?accountId=acc%2F1"
        );
        assert_eq!(r.scope_of("/onboarding/license/L/account/aws"), None);
        assert_eq!(r.scope_of("/onboarding/license/L/account/aws/"), None);
        assert_eq!(r.scope_of("/onboarding/license/L/licenseAccounts"), None);
        assert_eq!(
            r.url_for("acc 1"),
            "https://api.cloudneeti.com/authorize/license/L/token?accountId=acc+1"
        );
    }

    #[test]
    fn secrets_in_the_token_url_stay_inside_their_value() {
        let mut r = recipe("api.example.com");
        r.url = "https://api.example.com/auth/{key}/token?sig={sig}".into();
        r.vars.insert("key".into(), Secret::new("k/1"));
        r.vars.insert("sig".into(), Secret::new("a&b=c#d+e"));
        assert_eq!(
            r.filled_url(""),
            "https://api.example.com/auth/k%2F1/token?sig=a%26b%3Dc%23d%2Be"
        );
    }
}
