//! How traffic leaves this host: the one place that builds upstream connections and clients
//! (TLS roots, `connect_to`, timeouts, connection pools).
//!
//! Each distinct way of dialling (today: a route's `connect_to`) gets its own pooled client, so a
//! connection opened for one destination is never reused for another.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::Body;
use crate::config::{Config, Upstream};

pub type Client = HyperClient<HttpsConnector<Dialer>, Body>;

/// The crypto provider used everywhere: one place to change if aws-lc-rs ever has to go.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Trust for upstream TLS: the system's roots plus `upstream.extra_ca_files`.
pub fn tls_config(
    extra_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!("reading the system's CA certificates: {e}");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    for cert in extra_roots {
        roots.add(cert.clone()).map_err(|e| {
            format!("upstream.extra_ca_files: a certificate cannot be used as a root: {e}")
        })?;
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA certificates: the system store is empty (install the ca-certificates package) and upstream.extra_ca_files lists none"
                .into(),
        );
    }
    tracing::debug!(
        system = added,
        extra = extra_roots.len(),
        "upstream TLS roots loaded"
    );
    rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// The pooled clients of one config.
pub struct Outbound {
    passthrough: Client,
    by_route: HashMap<String, Client>,
    /// Token-endpoint clients of token providers.
    by_provider: HashMap<String, Client>,
}

impl Outbound {
    pub fn new(config: &Config) -> Result<Outbound, String> {
        let tls = tls_config(&config.upstream.extra_roots)?;
        let make = |connect_to: Option<(String, u16)>| {
            let dialer = Dialer {
                connect_to: connect_to.map(Arc::new),
                connect_timeout: config.upstream.connect_timeout,
            };
            build_client(dialer, tls.clone(), &config.upstream)
        };
        let passthrough = make(None);
        let mut shared: HashMap<Option<(String, u16)>, Client> = HashMap::new();
        shared.insert(None, passthrough.clone());
        let mut by_route = HashMap::new();
        for route in config.routes.iter() {
            let client = shared
                .entry(route.connect_to.clone())
                .or_insert_with(|| make(route.connect_to.clone()))
                .clone();
            by_route.insert(route.name.clone(), client);
        }
        let mut by_provider = HashMap::new();
        for p in config.providers.iter().filter(|p| p.uses_tokens()) {
            let client = shared
                .entry(p.connect_to.clone())
                .or_insert_with(|| make(p.connect_to.clone()))
                .clone();
            by_provider.insert(p.name.clone(), client);
        }
        Ok(Outbound {
            passthrough,
            by_route,
            by_provider,
        })
    }

    /// The client for a provider's token requests.
    pub fn for_provider(&self, provider: &str) -> &Client {
        self.by_provider.get(provider).unwrap_or(&self.passthrough)
    }

    /// The client for a route, or for unmapped passthrough traffic when `route` is `None`.
    pub fn client(&self, route: Option<&str>) -> &Client {
        route
            .and_then(|r| self.by_route.get(r))
            .unwrap_or(&self.passthrough)
    }
}

fn build_client(dialer: Dialer, tls: rustls::ClientConfig, settings: &Upstream) -> Client {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(dialer);
    HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// Opens TCP connections: to the URI's host, or to `connect_to` when the route sets one (the
/// request keeps its real Host and TLS SNI either way).
#[derive(Clone)]
pub struct Dialer {
    connect_to: Option<Arc<(String, u16)>>,
    connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("connecting to {addr}: {}", describe_io(.source))]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("no connection to {addr} within {}; raise `upstream.connect_timeout` if the network is just slow", humantime::format_duration(*.after))]
    Timeout { addr: String, after: Duration },
    #[error("the URL has no host")]
    NoHost,
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::ConnectionReset => "connection reset".into(),
        _ => e.to_string(),
    }
}

impl tower_service::Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let target = match &self.connect_to {
            Some(c) => Some((c.0.clone(), c.1)),
            None => uri.host().map(|h| {
                let default = if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                };
                (
                    h.trim_matches(['[', ']']).to_string(),
                    uri.port_u16().unwrap_or(default),
                )
            }),
        };
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let (host, port) = target.ok_or(DialError::NoHost)?;
            dial(&host, port, timeout).await.map(TokioIo::new)
        })
    }
}

/// A TCP connection to `host:port` within `timeout` (CONNECT tunnels use it directly).
pub async fn dial(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, DialError> {
    match tokio::time::timeout(timeout, dial_now(host, port)).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout {
            addr: format!("{host}:{port}"),
            after: timeout,
        }),
    }
}

async fn dial_now(host: &str, port: u16) -> Result<TcpStream, DialError> {
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| DialError::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                // Small API calls: don't let Nagle hold a request head back.
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(source) => {
                last = Some(DialError::Connect {
                    addr: addr.to_string(),
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or(DialError::NoAddress {
        host: host.to_string(),
    }))
}
