//! Credentials onto the request: the provider says which headers (static ones, or ones made from
//! a cached token), the route's `client_auth` says what happens to headers of the same name the
//! client sent itself.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};

use crate::error::ProxyError;
use crate::listen::State;
use crate::providers::{Kind, cleancloud, sensitive_value};
use crate::route::{ClientAuth, Route};

/// The token a request was sent with, so a 401 can invalidate exactly that one.
pub struct TokenUse {
    pub scope: String,
    pub generation: u64,
}

pub struct Request<'a> {
    pub host: &'a str,
    pub method: &'a Method,
    pub path_and_query: &'a str,
    /// The whole body when it was read first (replay buffer, or CleanCloud signing).
    pub body: Option<&'a Bytes>,
}

pub async fn apply(
    state: &State,
    route: &Route,
    req: &Request<'_>,
    headers: &mut HeaderMap,
) -> Result<Option<TokenUse>, ProxyError> {
    let provider = &route.provider;
    if is_trace(req.method) {
        return Err(ProxyError::TraceRefused {
            method: req.method.to_string(),
            route: route.name.clone(),
        });
    }
    // The provider's header names are listed only for the two settings that look at them.
    match route.client_auth {
        ClientAuth::Reject => {
            let names = provider.header_names();
            if let Some(n) = names.iter().find(|n| headers.contains_key(*n)) {
                return Err(ProxyError::ClientCredentials {
                    header: n.to_string(),
                });
            }
        }
        // The client brought everything this provider would add: nothing to do, no token needed.
        ClientAuth::Keep
            if provider
                .header_names()
                .iter()
                .all(|n| headers.contains_key(n)) =>
        {
            return Ok(None);
        }
        _ => {}
    }
    if let Kind::Static(list) = &provider.kind {
        set_all(route.client_auth, headers, list.iter().cloned());
        return Ok(None);
    }
    if matches!(provider.kind, Kind::CleanCloud(_)) && cleancloud::is_token_path(req.path_and_query)
    {
        // Signed with the access code it would be refused (a 401 that would also cost the proxy
        // its access code); signed with the user token it would hand the client credentials.
        return Err(ProxyError::bad_request(
            "token_endpoint",
            format!(
                "credproxy fetches CleanCloud access codes itself and signs every request on route `{}`: its token endpoint is not forwarded",
                route.name
            ),
        ));
    }
    let token_error = |cause: String| ProxyError::TokenUnavailable {
        provider: provider.name.clone(),
        cause,
    };
    let tokens = state
        .tokens
        .get(&provider.name)
        .ok_or_else(|| token_error("no token cache for this provider (a bug)".into()))?;
    let path = req.path_and_query.split('?').next().unwrap_or("/");
    let scope = provider.scope(req.host, path);
    let token = tokens
        .get(&scope)
        .await
        .map_err(|e| token_error(e.to_string()))?;
    let list: Vec<(HeaderName, HeaderValue)> = match &provider.kind {
        Kind::Static(_) => Vec::new(),
        Kind::OAuth2(_) => vec![(
            header::AUTHORIZATION,
            sensitive_value(&format!("Bearer {}", token.value.expose())).map_err(token_error)?,
        )],
        Kind::Exchange(recipe) => recipe.headers_for(&token.value).map_err(token_error)?,
        Kind::CleanCloud(_) => {
            let secret = token
                .signing_secret
                .as_ref()
                .ok_or_else(|| token_error("the access code came without its secret".into()))?;
            let body = req.body.map_or(&[][..], |b| &b[..]);
            let auth = cleancloud::authorization(
                token.value.expose(),
                secret.expose(),
                req.method.as_str(),
                req.path_and_query,
                body,
            );
            vec![(
                header::AUTHORIZATION,
                sensitive_value(&auth).map_err(token_error)?,
            )]
        }
    };
    if set_all(route.client_auth, headers, list) {
        // Some of the client's own headers went in place of the proxy's (`client_auth: keep`):
        // a 401 may be about those, so it must not cost the proxy its token, or a retry.
        return Ok(None);
    }
    Ok(Some(TokenUse {
        scope,
        generation: token.generation,
    }))
}

/// `TRACE` (and IIS's `TRACK`) asks the server to send the request back as it received it: with
/// the credentials the proxy added, to a client that must never hold them.
fn is_trace(method: &Method) -> bool {
    ["TRACE", "TRACK"]
        .iter()
        .any(|m| method.as_str().eq_ignore_ascii_case(m))
}

/// Sets the provider's headers; says whether any of the client's own was kept instead.
fn set_all(
    policy: ClientAuth,
    headers: &mut HeaderMap,
    list: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
) -> bool {
    let mut kept = false;
    for (name, value) in list {
        if policy == ClientAuth::Keep && headers.contains_key(&name) {
            kept = true;
            continue;
        }
        headers.insert(name, value);
    }
    kept
}
