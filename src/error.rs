//! Every error the proxy itself answers with, and the one function that turns it into a response:
//! JSON `{"error","message","route","provider"}` plus `X-Credproxy-Error: <code>`.
//! Messages say what failed and where, never a secret.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};

use crate::body::{Body, full};
use crate::route::Route;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request itself is malformed; `code` says how.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error(
        "no route maps {host} and the config says `unmapped: deny`; add a route for it or set `unmapped: passthrough`"
    )]
    Denied { host: String },
    #[error(
        "{host} has routes, but none whose path_prefix covers `{path}`, and the config says `unmapped: deny`; add a route for this path or set `unmapped: passthrough`"
    )]
    PathDenied { host: String, path: String },
    #[error(
        "the request already carries `{header}`, and this route is set to `client_auth: reject`; remove the header, the proxy adds the credentials"
    )]
    ClientCredentials { header: String },
    #[error(
        "`{path}` is outside `{prefix}`, the path prefix of route `{route}` this local endpoint serves"
    )]
    NotRouted {
        path: String,
        prefix: String,
        route: String,
    },
    #[error("cannot connect to {host}: {cause}")]
    UpstreamConnect { host: String, cause: String },
    #[error("TLS with {host} failed: {cause}")]
    UpstreamTls { host: String, cause: String },
    #[error("{host} did not answer within {}; raise `upstream.{setting}` if it is just slow", humantime::format_duration(*.after))]
    UpstreamTimeout {
        host: String,
        after: Duration,
        setting: &'static str,
    },
    #[error("the request body for {host} made no progress for {} (the client stopped sending it, or {host} stopped reading it); raise `upstream.response_timeout` if it is just slow", humantime::format_duration(*.after))]
    UploadStalled { host: String, after: Duration },
    #[error("{host} broke the exchange: {cause}")]
    Upstream { host: String, cause: String },
    #[error("no token from provider `{provider}`: {cause}")]
    TokenUnavailable { provider: String, cause: String },
    #[error(
        "the request body is larger than {limit} bytes; provider `{provider}` {why}, so the body must be read whole first: raise `{setting}` if this is expected"
    )]
    BodyTooLarge {
        limit: usize,
        provider: String,
        why: &'static str,
        setting: String,
    },
    #[error("reading the request body failed: {cause}")]
    ClientBody { cause: String },
    #[error(
        "{method} is not forwarded on route `{route}`: the server would send back the request as it received it, with the credentials the proxy adds"
    )]
    TraceRefused { method: String, route: String },
    #[error(
        "the request body uses transfer coding `{coding}`, which credproxy cannot pass on: only chunked is supported (RFC 9112 §6.1)"
    )]
    UnsupportedCoding { coding: String },
    #[error("HTTPS to {host} cannot be intercepted: {cause}")]
    InterceptRefused { host: String, cause: String },
    #[error("{message}")]
    Refused { code: &'static str, message: String },
    #[error(
        "this proxy needs a user name and password: send Proxy-Authorization: Basic (in Postman: Settings → Proxy → Proxy Auth)"
    )]
    ProxyAuthRequired,
    #[error("credproxy has limits.max_connections connections and tunnels open; retry shortly")]
    TooManyConnections,
}

impl ProxyError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ProxyError {
        ProxyError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest { .. }
            | ProxyError::ClientCredentials { .. }
            | ProxyError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::InterceptRefused { .. } | ProxyError::Refused { .. } => {
                StatusCode::FORBIDDEN
            }
            ProxyError::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::TraceRefused { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnsupportedCoding { .. } => StatusCode::NOT_IMPLEMENTED,
            ProxyError::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Denied { .. } | ProxyError::PathDenied { .. } => StatusCode::FORBIDDEN,
            ProxyError::NotRouted { .. } => StatusCode::NOT_FOUND,
            ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamTls { .. }
            | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } | ProxyError::UploadStalled { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest { code, .. } => code,
            ProxyError::Denied { .. } | ProxyError::PathDenied { .. } => "host_denied",
            ProxyError::ClientCredentials { .. } => "client_credentials_rejected",
            ProxyError::NotRouted { .. } => "not_routed",
            ProxyError::UpstreamConnect { .. } => "upstream_unreachable",
            ProxyError::UpstreamTls { .. } => "upstream_tls",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::UploadStalled { .. } => "upload_stalled",
            ProxyError::Upstream { .. } => "upstream_error",
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::ClientBody { .. } => "client_body",
            ProxyError::InterceptRefused { .. } => "intercept_refused",
            ProxyError::Refused { code, .. } => code,
            ProxyError::ProxyAuthRequired => "proxy_auth_required",
            ProxyError::TraceRefused { .. } => "trace_refused",
            ProxyError::UnsupportedCoding { .. } => "unsupported_transfer_coding",
            ProxyError::TooManyConnections => "too_many_connections",
        }
    }

    pub fn into_response(self, route: Option<&Route>) -> Response<Body> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "route": route.map(|r| r.name.as_str()),
            "provider": route.map(|r| r.provider.name.as_str()),
        });
        let mut resp = Response::new(full(body.to_string() + "\n"));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("x-credproxy-error", HeaderValue::from_static(self.code()));
        if matches!(self, ProxyError::TooManyConnections) {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ProxyError::TraceRefused { .. }) {
            // RFC 9110 §15.5.6: a 405 lists the methods that are allowed.
            headers.insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        if matches!(self, ProxyError::ProxyAuthRequired) {
            headers.insert(
                http::header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"credproxy\""),
            );
        }
        resp
    }
}
