//! How traffic leaves this host: the one place that builds upstream connections and clients
//! (TLS roots, `connect_to`, source address, upstream proxy, timeouts, connection pools). Proxied
//! requests, CONNECT tunnels and token requests all leave through here, so they agree.
//!
//! Each distinct way of dialling (`connect_to` × egress) gets its own pooled client, so a
//! connection opened from one source address or through one proxy is never reused for another.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::body::Body;
use crate::config::{Config, Upstream};
use crate::route::Route;

/// One way of dialling (`connect_to` × egress) with its pool. Clones share the pool.
#[derive(Clone)]
pub struct Client {
    pool: HyperClient<Connector, Body>,
    /// Dials HTTP/1.1-only connections: those `pinned` keeps for one client connection, and
    /// those an upgrade (WebSocket) takes for itself.
    h1: Connector,
    /// Whether client connections may pin (see `pin_connector`).
    pin: bool,
    /// Tells clients apart (a reload builds new ones), for pinned connections.
    id: u64,
    pub(crate) pool_idle_timeout: Duration,
    /// Pinned connections left by closed client connections.
    spares: crate::pinned::Spares,
    /// Pinned connections being dialled for the first time now.
    dials: crate::pinned::Dials,
}

impl Client {
    /// A request through the shared pool.
    pub fn request(&self, req: http::Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
        self.pool.request(req)
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn spares(&self) -> &crate::pinned::Spares {
        &self.spares
    }

    pub(crate) fn dials(&self) -> &crate::pinned::Dials {
        &self.dials
    }

    /// The connector for a pinned connection, or `None` when this client must not pin
    /// (`upstream.pin_connections: false`, or an egress through an upstream proxy).
    pub(crate) fn pin_connector(&self) -> Option<&Connector> {
        self.pin.then_some(&self.h1)
    }

    /// The connector for an HTTP/1.1 connection of a request's own (an upgrade).
    pub(crate) fn h1_connector(&self) -> &Connector {
        &self.h1
    }
}

/// Where traffic leaves from: a source address, an upstream proxy, both or neither.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    pub bind: Option<std::net::IpAddr>,
    pub proxy: Option<Arc<UpstreamProxy>>,
}

/// An HTTP proxy between credproxy and the internet (`egress.proxy`).
#[derive(Debug)]
pub struct UpstreamProxy {
    pub host: String,
    pub port: u16,
    /// `Basic …`, sent to this proxy only (CONNECT, or absolute-form requests through it).
    pub authorization: Option<HeaderValue>,
    /// A short fingerprint of the credentials, so two routes with different ones never share
    /// a pooled connection.
    pub auth_fingerprint: String,
}

impl UpstreamProxy {
    /// `http://host:port`, without credentials: what messages show.
    pub fn display(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
}

impl Egress {
    /// Identifies the way out (credentials by fingerprint only).
    pub fn key(&self) -> String {
        format!(
            "{:?}|{}",
            self.bind,
            self.proxy
                .as_ref()
                .map(|p| format!("{}#{}", p.display(), p.auth_fingerprint))
                .unwrap_or_default()
        )
    }

    pub fn describe(&self) -> String {
        match (&self.bind, &self.proxy) {
            (None, None) => "direct".into(),
            (Some(b), None) => format!("from {b}"),
            (None, Some(p)) => format!("via {}", p.display()),
            (Some(b), Some(p)) => format!("from {b} via {}", p.display()),
        }
    }
}

/// The local address a response came over (set by the dialer, read for `ip_bound` hints).
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub std::net::SocketAddr);

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
    /// By `Route::index`.
    by_route: Vec<Client>,
    /// Token-endpoint clients of token providers.
    by_provider: HashMap<String, Client>,
    /// How unmapped traffic and tunnels leave.
    pub default_egress: Egress,
    connect_timeout: Duration,
}

impl Outbound {
    pub fn new(config: &Config) -> Result<Outbound, String> {
        let tls = tls_config(&config.upstream.extra_roots)?;
        let mut shared: HashMap<(Option<(String, u16)>, String), Client> = HashMap::new();
        let mut client_for = |connect_to: &Option<(String, u16)>, egress: &Egress| {
            shared
                .entry((connect_to.clone(), egress.key()))
                .or_insert_with(|| {
                    let dialer = Dialer {
                        connect_to: connect_to.clone().map(Arc::new),
                        egress: egress.clone(),
                    };
                    build_client(dialer, tls.clone(), &config.upstream)
                })
                .clone()
        };
        let passthrough = client_for(&None, &config.egress);
        let by_route = config
            .routes
            .iter()
            .map(|r| client_for(&r.connect_to, &r.egress))
            .collect();
        let by_provider = config
            .providers
            .iter()
            .filter(|p| p.uses_tokens())
            .map(|p| (p.name.clone(), client_for(&p.connect_to, &p.egress)))
            .collect();
        Ok(Outbound {
            passthrough,
            by_route,
            by_provider,
            default_egress: config.egress.clone(),
            connect_timeout: config.upstream.connect_timeout,
        })
    }

    /// The client for a provider's token requests.
    pub fn for_provider(&self, provider: &str) -> &Client {
        self.by_provider.get(provider).unwrap_or(&self.passthrough)
    }

    /// The client for a route, or for unmapped passthrough traffic when `route` is `None`.
    pub fn client(&self, route: Option<&Route>) -> &Client {
        route
            .and_then(|r| self.by_route.get(r.index))
            .unwrap_or(&self.passthrough)
    }

    /// A raw connection to `host:port` for a blind CONNECT tunnel, leaving like unmapped traffic.
    pub async fn tunnel(&self, host: &str, port: u16) -> Result<TcpStream, DialError> {
        let opening = open(&self.default_egress, host, port, true);
        within(self.connect_timeout, format!("{host}:{port}"), opening)
            .await
            .map(|(s, _)| s)
    }
}

/// A client that leaves like `egress` but goes where its URLs say (no `connect_to`), for
/// `credproxy egress-check`.
pub fn egress_client(config: &Config, egress: &Egress) -> Result<Client, String> {
    let dialer = Dialer {
        connect_to: None,
        egress: egress.clone(),
    };
    Ok(build_client(
        dialer,
        tls_config(&config.upstream.extra_roots)?,
        &config.upstream,
    ))
}

fn build_client(dialer: Dialer, tls: rustls::ClientConfig, settings: &Upstream) -> Client {
    static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // HTTP/1.1 only (no ALPN offered, so TLS servers pick HTTP/1.1): a pinned connection serves
    // one client connection's requests one at a time; HTTP/2's shared connection is the pool's.
    // An upgrade exists in HTTP/1.1 only.
    let after = settings.connect_timeout;
    let h1 = Connector {
        inner: hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(dialer.clone()),
        after,
    };
    // Not through an upstream proxy, where plain HTTP needs absolute-form requests.
    let pin = settings.pin_connections && dialer.egress.proxy.is_none();
    let inner = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(dialer);
    let connector = Connector { inner, after };
    let pool = HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector);
    Client {
        pool,
        h1,
        pin,
        id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        pool_idle_timeout: settings.pool_idle_timeout,
        spares: crate::pinned::Spares::default(),
        dials: crate::pinned::Dials::default(),
    }
}

/// TCP (and the upstream proxy's CONNECT), then TLS, all within `upstream.connect_timeout`: a
/// server that takes the connection but never answers the TLS handshake must not pass for a
/// slow response (`response_timeout`).
#[derive(Clone)]
pub struct Connector {
    inner: HttpsConnector<Dialer>,
    after: Duration,
}

impl Connector {
    /// One connection to `https`/`authority`, outside any pool.
    pub(crate) async fn open(
        &self,
        https: bool,
        authority: &str,
    ) -> Result<hyper_rustls::MaybeHttpsStream<Conn>, crate::body::BoxError> {
        use tower_service::Service;
        let uri = Uri::builder()
            .scheme(if https { "https" } else { "http" })
            .authority(authority)
            .path_and_query("/")
            .build()?;
        let mut connector = self.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
        connector.call(uri).await
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = <HttpsConnector<Dialer> as tower_service::Service<Uri>>::Response;
    type Error = crate::body::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let addr = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        Box::pin(within(self.after, addr, self.inner.call(uri)))
    }
}

/// Opens TCP connections: to the URI's host, or to `connect_to` when the route sets one (the
/// request keeps its real Host and TLS SNI either way), from the egress source address and
/// through the egress proxy when set.
#[derive(Clone)]
pub struct Dialer {
    connect_to: Option<Arc<(String, u16)>>,
    egress: Egress,
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
    #[error(
        "{host} has no address of the family of the source address {bind} (egress.bind): an IPv4 source reaches only IPv4 addresses, an IPv6 one only IPv6"
    )]
    NoAddressOfFamily {
        host: String,
        bind: std::net::IpAddr,
    },
    #[error("connecting to {addr}: {}", describe_io(.source))]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot use source address {bind}: {source}")]
    Bind {
        bind: std::net::IpAddr,
        source: std::io::Error,
    },
    #[error("no connection to {addr} within {}; raise `upstream.connect_timeout` if the network is just slow", humantime::format_duration(*.after))]
    Timeout { addr: String, after: Duration },
    #[error("the upstream proxy {proxy} refused CONNECT {target}: {status}{}", if *.status == 407 { " (proxy authentication failed: check egress.proxy_username/proxy_password)" } else { "" })]
    ProxyRefused {
        proxy: String,
        target: String,
        status: u16,
    },
    #[error("the upstream proxy {proxy} broke the CONNECT exchange: {cause}")]
    ProxyProtocol { proxy: String, cause: String },
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

/// A TCP connection as the pool sees it: whether it goes to a proxy in absolute form, and its
/// local address (so a 403 from an IP-bound API can say which address was used).
pub struct Conn {
    io: TokioIo<TcpStream>,
    absolute_form: bool,
    local: Option<std::net::SocketAddr>,
}

impl Conn {
    /// The local address of a connection as the pinned dialer returns it (plain or TLS).
    pub(crate) fn local_of(stream: &hyper_rustls::MaybeHttpsStream<Conn>) -> Option<LocalAddr> {
        let conn = match stream {
            hyper_rustls::MaybeHttpsStream::Http(c) => c,
            hyper_rustls::MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner(),
        };
        conn.local.map(LocalAddr)
    }

    /// Whether requests over this connection go in absolute form (plain HTTP to an upstream proxy).
    pub(crate) fn absolute_form_of(stream: &hyper_rustls::MaybeHttpsStream<Conn>) -> bool {
        match stream {
            hyper_rustls::MaybeHttpsStream::Http(c) => c.absolute_form,
            hyper_rustls::MaybeHttpsStream::Https(_) => false,
        }
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let c = Connected::new().proxy(self.absolute_form);
        match self.local {
            Some(a) => c.extra(LocalAddr(a)),
            None => c,
        }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl tower_service::Service<Uri> for Dialer {
    type Response = Conn;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = uri.scheme_str() == Some("https");
        let target = match &self.connect_to {
            Some(c) => Some((c.0.clone(), c.1)),
            None => uri.host().map(|h| {
                let default = if https { 443 } else { 80 };
                (
                    h.trim_matches(['[', ']']).to_string(),
                    uri.port_u16().unwrap_or(default),
                )
            }),
        };
        let egress = self.egress.clone();
        Box::pin(async move {
            let (host, port) = target.ok_or(DialError::NoHost)?;
            // Through a proxy: HTTPS upstreams get a CONNECT tunnel; plain HTTP goes to the
            // proxy itself in absolute form.
            // Within `upstream.connect_timeout`, with the TLS handshake: see `Connector`.
            let (stream, local) = open(&egress, &host, port, https).await?;
            Ok(Conn {
                io: TokioIo::new(stream),
                absolute_form: egress.proxy.is_some() && !https,
                local,
            })
        })
    }
}

/// `connecting`, or after `after` a `DialError::Timeout` naming `addr`.
async fn within<T, E: From<DialError>>(
    after: Duration,
    addr: String,
    connecting: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match tokio::time::timeout(after, connecting).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout { addr, after }.into()),
    }
}

/// A connection towards `host:port` as `egress` says: from its source address, and through its
/// proxy (a CONNECT tunnel when `tunnel`, else a plain connection to the proxy). The caller
/// bounds it in time (`within`).
async fn open(
    egress: &Egress,
    host: &str,
    port: u16,
    tunnel: bool,
) -> Result<(TcpStream, Option<std::net::SocketAddr>), DialError> {
    let Some(proxy) = &egress.proxy else {
        let s = dial_now(host, port, egress.bind).await?;
        let local = s.local_addr().ok();
        return Ok((s, local));
    };
    let mut s = dial_now(&proxy.host, proxy.port, egress.bind).await?;
    let local = s.local_addr().ok();
    if tunnel {
        proxy_connect(&mut s, proxy, host, port).await?;
    }
    Ok((s, local))
}

/// `CONNECT host:port` through an upstream proxy, with its credentials.
async fn proxy_connect(
    s: &mut TcpStream,
    proxy: &UpstreamProxy,
    host: &str,
    port: u16,
) -> Result<(), DialError> {
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let broken = |cause: String| DialError::ProxyProtocol {
        proxy: proxy.display(),
        cause,
    };
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(auth) = &proxy.authorization {
        head.extend_from_slice(b"Proxy-Authorization: ");
        head.extend_from_slice(auth.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    s.write_all(&head)
        .await
        .map_err(|e| broken(e.to_string()))?;
    // Read the answer's head byte by byte: nothing of the tunnel after it may be consumed.
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() > 16 * 1024 {
            return Err(broken("the answer's head is too long".into()));
        }
        let b = s
            .read_u8()
            .await
            .map_err(|e| broken(format!("closed before answering ({e})")))?;
        answer.push(b);
    }
    let status = String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| broken("the answer is not HTTP".into()))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(DialError::ProxyRefused {
            proxy: proxy.display(),
            target,
            status,
        })
    }
}

/// How long an attempt to connect to one address has before the next address is tried alongside
/// it (RFC 8305's "Connection Attempt Delay"): a blackholed IPv6 route must not use up all of
/// `connect_timeout` while IPv4 would have worked.
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

async fn dial_now(
    host: &str,
    port: u16,
    bind: Option<std::net::IpAddr>,
) -> Result<TcpStream, DialError> {
    let resolved: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| DialError::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    // A source address can only reach destinations of its own family.
    let addrs: Vec<_> = resolved
        .iter()
        .copied()
        .filter(|a| bind.is_none_or(|b| b.is_ipv4() == a.is_ipv4()))
        .collect();
    if addrs.is_empty() {
        return Err(match bind {
            Some(bind) if !resolved.is_empty() => DialError::NoAddressOfFamily {
                host: host.to_string(),
                bind,
            },
            _ => DialError::NoAddress {
                host: host.to_string(),
            },
        });
    }
    connect_any(addrs, bind).await.map_err(|e| {
        e.unwrap_or(DialError::NoAddress {
            host: host.to_string(),
        })
    })
}

/// "Happy eyeballs", simplified from RFC 8305: the families take turns, starting with the
/// resolver's first choice; each attempt gets `ATTEMPT_DELAY` before the next starts alongside
/// it, a failure starts the next at once, and the first connection wins. `Err(None)`: no address.
async fn connect_any(
    addrs: Vec<std::net::SocketAddr>,
    bind: Option<std::net::IpAddr>,
) -> Result<TcpStream, Option<DialError>> {
    let mut queue = interleave_families(addrs).into_iter();
    let mut attempts = futures_util::stream::FuturesUnordered::new();
    let mut last = None;
    loop {
        if attempts.is_empty() {
            match queue.next() {
                Some(addr) => attempts.push(connect_one(addr, bind)),
                None => break,
            }
        }
        tokio::select! {
            Some(result) = futures_util::StreamExt::next(&mut attempts) => match result {
                Ok(s) => return Ok(s),
                // The source address itself is unusable: no other destination will do better.
                Err(e @ DialError::Bind { .. }) => return Err(Some(e)),
                Err(e) => {
                    last = Some(e);
                    if let Some(addr) = queue.next() {
                        attempts.push(connect_one(addr, bind));
                    }
                }
            },
            () = tokio::time::sleep(ATTEMPT_DELAY), if queue.len() > 0 => {
                if let Some(addr) = queue.next() {
                    attempts.push(connect_one(addr, bind));
                }
            }
        }
    }
    Err(last)
}

/// `addrs` with IPv6 and IPv4 taking turns, starting with the family of the first.
fn interleave_families(addrs: Vec<std::net::SocketAddr>) -> Vec<std::net::SocketAddr> {
    let first_v6 = addrs.first().is_some_and(|a| a.is_ipv6());
    let (first, second): (Vec<_>, Vec<_>) =
        addrs.into_iter().partition(|a| a.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(first.len() + second.len());
    let (mut a, mut b) = (first.into_iter(), second.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

async fn connect_one(
    addr: std::net::SocketAddr,
    bind: Option<std::net::IpAddr>,
) -> Result<TcpStream, DialError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    let socket = socket.map_err(|source| DialError::Connect {
        addr: addr.to_string(),
        source,
    })?;
    if let Some(ip) = bind {
        socket
            .bind(std::net::SocketAddr::new(ip, 0))
            .map_err(|source| DialError::Bind { bind: ip, source })?;
    }
    let s = socket
        .connect(addr)
        .await
        .map_err(|source| DialError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    // Small API calls: don't let Nagle hold a request head back.
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// What a "what is my IP" service at `url` sees when asked through `egress` (first line of its
/// answer, cut short).
pub async fn check_source(config: &Config, egress: &Egress, url: &str) -> Result<String, String> {
    use http_body_util::BodyExt;
    let client = egress_client(config, egress)?;
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let mut req = http::Request::get(uri.clone())
        .body(crate::body::empty())
        .map_err(|e| e.to_string())?;
    if let Some(proxy) = &egress.proxy
        && uri.scheme_str() == Some("http")
        && let Some(auth) = &proxy.authorization
    {
        req.headers_mut()
            .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
    }
    let resp = tokio::time::timeout(config.upstream.response_timeout, client.request(req))
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| crate::forward::describe_client_error(uri.host().unwrap_or(""), &e))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), 4096)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    let first = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .take(200)
        .collect::<String>();
    if !status.is_success() {
        Err(format!("HTTP {status}: {first}"))
    } else if first.is_empty() {
        Err(format!(
            "HTTP {status} with an empty answer: the service must answer with the address it sees"
        ))
    } else {
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_families_take_turns_from_the_resolvers_first_choice() {
        let a = |s: &str| s.parse::<std::net::SocketAddr>().expect("address");
        let addrs = vec![
            a("[2001:db8::1]:443"),
            a("[2001:db8::2]:443"),
            a("192.0.2.1:443"),
            a("192.0.2.2:443"),
            a("192.0.2.3:443"),
        ];
        assert_eq!(
            interleave_families(addrs),
            [
                a("[2001:db8::1]:443"),
                a("192.0.2.1:443"),
                a("[2001:db8::2]:443"),
                a("192.0.2.2:443"),
                a("192.0.2.3:443")
            ]
        );
        let v4_first = vec![a("192.0.2.1:80"), a("[2001:db8::1]:80")];
        assert_eq!(interleave_families(v4_first.clone()), v4_first);
    }

    /// An address that takes SYNs and never answers (a blackholed route) must not hold up the
    /// next one: here, a loopback listener whose accept queue is full, so Linux drops new SYNs.
    #[tokio::test]
    async fn an_address_that_never_answers_does_not_hold_up_the_next() {
        let silent = TcpSocket::new_v4().expect("socket");
        silent
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let silent = silent.listen(1).expect("listen");
        let silent_addr = silent.local_addr().expect("addr");
        // Fill its queue (never accepted).
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(silent_addr))
                    .await
            {
                held.push(s);
            }
        }
        let good = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let good_addr = good.local_addr().expect("addr");
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            connect_any(vec![silent_addr, good_addr], None),
        )
        .await
        .expect("the second address was tried while the first hung")
        .map_err(|e| e.map(|e| e.to_string()))
        .expect("connected");
        assert_eq!(connected.peer_addr().expect("peer"), good_addr);
        drop(held);
    }
}
