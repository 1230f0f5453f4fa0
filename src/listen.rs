//! Listeners: the forward-proxy port and one port per local endpoint. Each connection is served by
//! hyper (HTTP/1.1 with keep-alive, or HTTP/2) and each request goes to [`forward::serve`].
//!
//! The running [`State`] sits behind an `ArcSwap`: a reload builds a whole new state and swaps it
//! in one store; each request takes the state current when it starts and finishes on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::forward;
use crate::mitm::Leaves;
use crate::outbound::Outbound;
use crate::pinned::Pinned;
use crate::route::Route;
use crate::token::Tokens;
use crate::watchdog::{Activity, Drain, Watcher};

/// What a request arriving on a listener is.
#[derive(Clone)]
pub enum Entry {
    /// The forward proxy: absolute-form requests for any host.
    Proxy,
    /// A local endpoint: origin-form requests, all for the route of this name.
    Local(Arc<str>),
    /// Requests inside an intercepted CONNECT tunnel.
    Intercepted(Arc<Tunnel>),
}

/// Where an intercepted CONNECT tunnel leads: the requests inside it may name only this host.
pub struct Tunnel {
    /// Normalised (see `route::normalize_host`).
    pub host: String,
    pub port: u16,
    /// `Https` when the client's TLS was decrypted; `Http` for plain HTTP tunnelled to port 80
    /// (clients that tunnel `http://` URLs too).
    pub scheme: crate::route::Scheme,
}

/// The current state; a reload replaces it.
pub type Shared = Arc<arc_swap::ArcSwap<State>>;

/// Everything a request needs, built once per config.
pub struct State {
    pub config: Config,
    pub outbound: Outbound,
    /// The token cache of each token provider, by provider name.
    pub tokens: HashMap<String, Arc<Tokens>>,
    /// Leaf certificates for HTTPS interception; `None` when no route needs one.
    pub leaves: Option<Arc<Leaves>>,
    /// (client address, host) pairs already warned about an untrusted CA.
    pub warned_untrusted: std::sync::Mutex<std::collections::HashSet<(std::net::IpAddr, String)>>,
    /// Process-wide: a reload hands the same registry on.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// When this state was built (start or reload), for `/status`.
    pub loaded_at: std::time::SystemTime,
    /// Intercepted CONNECT connections, drained on shutdown like the listeners' (process-wide:
    /// a reload hands it on; `None` once shutdown began).
    pub tunnels: Arc<std::sync::Mutex<Option<Drain>>>,
    /// `limits.max_connections`, shared by the listeners and the CONNECT tunnels of HTTP/2
    /// connections (an HTTP/1 tunnel keeps its connection's). Process-wide, fixed at start.
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    /// The swap this state lives in, so work that outlives a request (an intercepted tunnel)
    /// can find the current state after a reload.
    pub shared: std::sync::OnceLock<std::sync::Weak<arc_swap::ArcSwap<State>>>,
    /// Metric handles of each route (by `Route::index`), and for requests no route took.
    pub route_stats: Vec<crate::metrics::RouteStats>,
    pub unrouted_stats: crate::metrics::RouteStats,
    /// Digests of `Proxy-Authorization` values already verified (PBKDF2 is slow on purpose).
    pub verified_proxy_auth: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
    /// The threads client connections are served on (`runtime`). Process-wide, fixed at start.
    pub workers: Arc<crate::workers::Workers>,
}

impl State {
    /// The metric handles for requests on `route` (`None`: no route took the request).
    pub fn stats(&self, route: Option<&Route>) -> &crate::metrics::RouteStats {
        route
            .and_then(|r| self.route_stats.get(r.index))
            .unwrap_or(&self.unrouted_stats)
    }

    /// The state current now (after any reload), if this one is still part of a running proxy.
    pub fn current(&self) -> Option<Arc<State>> {
        self.shared.get()?.upgrade().map(|s| s.load_full())
    }

    pub fn new(config: Config) -> Result<State, String> {
        State::build(config, None)
    }

    /// A state for `config`. With the `previous` one (a reload), token caches of providers whose
    /// settings did not change, and the minted leaves when the CA did not change, carry over.
    pub fn build(config: Config, previous: Option<&State>) -> Result<State, String> {
        let outbound = Outbound::new(&config)?;
        let tokens = config
            .providers
            .iter()
            .filter(|p| p.uses_tokens())
            .map(|p| {
                let kept = previous
                    .and_then(|old| old.tokens.get(&p.name))
                    // Same provider, and the same way of fetching (timeouts, trust): keep its tokens.
                    .filter(|t| t.provider.fingerprint() == p.fingerprint())
                    .filter(|_| {
                        previous.is_some_and(|old| {
                            old.config.tokens == config.tokens
                                && old.config.upstream == config.upstream
                        })
                    })
                    .cloned();
                let tokens = kept.unwrap_or_else(|| {
                    let client = outbound.for_provider(&p.name).clone();
                    let tokens = Tokens::new(p.clone(), client, config.tokens.clone());
                    if config.tokens.prefetch && p.prefetchable() {
                        crate::token::keep_warm(&tokens);
                    }
                    tokens
                });
                (p.name.clone(), tokens)
            })
            .collect();
        let leaves = if config.routes.iter().next().is_some() {
            let kept = previous
                .filter(|old| old.config.ca == config.ca)
                .and_then(|old| old.leaves.clone());
            match kept {
                Some(kept) => Some(kept),
                None => {
                    let ca =
                        crate::ca::load_or_create(&config.ca.files).map_err(|e| e.to_string())?;
                    if let Some(w) = ca.expiry_warning() {
                        tracing::warn!("{w}");
                    }
                    Some(Arc::new(Leaves::new(
                        ca,
                        config.ca.leaf_days,
                        config.ca.leaf_cache,
                    )))
                }
            }
        } else {
            None
        };
        let metrics = previous.map_or_else(crate::metrics::Metrics::new, |old| old.metrics.clone());
        let route_stats = config
            .routes
            .iter()
            .map(|r| metrics.route_stats(&r.name, &r.provider.name))
            .collect();
        let unrouted_stats = metrics.route_stats("-", "-");
        let workers = previous.map_or_else(
            || Arc::new(crate::workers::Workers::current(&config)),
            |old| old.workers.clone(),
        );
        let connection_slots = previous.map_or_else(
            || Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections)),
            |old| old.connection_slots.clone(),
        );
        Ok(State {
            config,
            outbound,
            tokens,
            leaves,
            warned_untrusted: Default::default(),
            metrics,
            route_stats,
            unrouted_stats,
            loaded_at: std::time::SystemTime::now(),
            verified_proxy_auth: Default::default(),
            shared: std::sync::OnceLock::new(),
            connection_slots,
            workers,
            tunnels: previous.map_or_else(
                || Arc::new(std::sync::Mutex::new(Some(Drain::default()))),
                |old| old.tunnels.clone(),
            ),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        addr: SocketAddr,
        /// The setting that asked for it.
        key: String,
        source: std::io::Error,
    },
    /// TLS roots or the local CA could not be set up.
    #[error("{0}")]
    Tls(String),
    #[error("cannot start the threads of runtime.shape: per_core: {0}")]
    Threads(std::io::Error),
}

/// A started proxy: its bound addresses and a way to stop it.
pub struct Running {
    /// The forward-proxy listener's address (the real port when the config said port 0).
    pub addr: SocketAddr,
    /// Each local endpoint's route name and bound address, in config order.
    pub local_endpoints: Vec<(String, SocketAddr)>,
    /// The admin listener's address, when enabled.
    pub admin_addr: Option<SocketAddr>,
    state: Shared,
    /// `/readyz`: true from the end of start to the start of shutdown.
    ready: Arc<std::sync::atomic::AtomicBool>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Declared last: the other threads of `runtime.shape: per_core` end after the rest.
    _threads: crate::workers::Stop,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to `drain`), then returns.
    pub async fn shutdown(mut self, drain: Duration) {
        // A load balancer polling an admin keep-alive connection must see the drain.
        self.ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        let tunnels = self
            .state
            .load()
            .tunnels
            .lock()
            .ok()
            .and_then(|mut g| g.take());
        let all = async {
            let listeners = async { while self.tasks.join_next().await.is_some() {} };
            let tunnels = async {
                if let Some(t) = tunnels {
                    t.shutdown().await;
                }
            };
            tokio::join!(listeners, tunnels);
        };
        if tokio::time::timeout(drain, all).await.is_err() {
            tracing::warn!(
                open_connections = self.state.load().metrics.open_connections.get(),
                "in-flight requests still running after {drain:?} (limits.drain_timeout); closing them"
            );
            self.tasks.abort_all();
        }
    }

    /// Re-reads the config file the proxy was started from and swaps it in, or keeps the
    /// current one and says why not.
    pub async fn reload(&self) -> Result<Reloaded, String> {
        reload_off_runtime(self.state.clone()).await
    }

    /// The state requests currently run on.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// Leaves minted for interception so far.
    pub fn leaf_mints(&self) -> u64 {
        self.state
            .load()
            .leaves
            .as_ref()
            .map_or(0, |l| l.mints.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The token cache of a token provider (its counters say how many tokens were fetched).
    pub fn tokens(&self, provider: &str) -> Option<Arc<Tokens>> {
        self.state.load().tokens.get(provider).cloned()
    }
}

/// Binds every listener of `config` and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let (workers, threads) =
        crate::workers::Workers::start(&config).map_err(StartError::Threads)?;
    let mut state = State::new(config).map_err(StartError::Tls)?;
    state.workers = Arc::new(workers);
    let config = &state.config;
    let mut bound = Vec::new();
    bound.push((bind(config.listen, "listen").await?, Entry::Proxy));
    for (i, ep) in config.local_endpoints.iter().enumerate() {
        bound.push((
            bind(ep.listen, &format!("local_endpoints[{i}].listen")).await?,
            Entry::Local(ep.route.name.as_str().into()),
        ));
    }
    // Bound with the others, so that a port in use fails the start before any "listening" line.
    let admin_listener = match config.admin {
        Some(admin) => {
            Some(
                crate::admin::bind(admin)
                    .await
                    .map_err(|source| StartError::Bind {
                        addr: admin,
                        key: "admin.listen".into(),
                        source,
                    })?,
            )
        }
        None => None,
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let state: Shared = Arc::new(arc_swap::ArcSwap::from_pointee(state));
    let _ = state.load().shared.set(Arc::downgrade(&state));
    let (shutdown, stop) = watch::channel(false);
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One budget of connections for all listeners (fixed at start, like the listeners).
    let slots = state.load().connection_slots.clone();
    let mut tasks = JoinSet::new();
    let mut addr = None;
    let mut local_endpoints = Vec::new();
    for (listener, entry) in bound {
        let local = listener.local_addr().map_err(|source| StartError::Bind {
            addr: state.load().config.listen,
            key: "listen".into(),
            source,
        })?;
        match &entry {
            Entry::Proxy => {
                tracing::info!("forward proxy listening on http://{local}");
                addr = Some(local);
            }
            Entry::Local(route) => {
                tracing::info!("local endpoint for route `{route}` listening on http://{local}");
                local_endpoints.push((route.to_string(), local));
            }
            Entry::Intercepted(_) => {}
        }
        tasks.spawn(accept_loop(
            listener,
            entry,
            state.clone(),
            stop.clone(),
            slots.clone(),
        ));
    }
    let mut admin_addr = None;
    if let Some(listener) = admin_listener {
        let local = listener.local_addr().unwrap_or(
            state
                .load()
                .config
                .admin
                .unwrap_or(state.load().config.listen),
        );
        tracing::info!(
            "admin endpoints on http://{local} (/healthz /readyz /metrics /status, POST /reload)"
        );
        admin_addr = Some(local);
        tasks.spawn(crate::admin::serve(
            listener,
            state.clone(),
            ready.clone(),
            stop.clone(),
        ));
    }
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(Running {
        addr: addr.unwrap_or(state.load().config.listen),
        local_endpoints,
        admin_addr,
        state,
        ready,
        shutdown,
        tasks,
        _threads: threads,
    })
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr,
            key: key.to_string(),
            source,
        })
}

/// The HTTP/1.1 + HTTP/2 server settings every listener (and intercepted tunnel) uses.
pub fn http_server(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut server = auto::Builder::new(TokioExecutor::new());
    // `limits.header_read_timeout` is kept by the watchdog, not by hyper (see watchdog.rs).
    // The settings of `http1_server` but `max_header_size`, which the auto builder does not
    // offer (and hyper's builder cannot be handed to it).
    server
        .http1()
        .header_read_timeout(None)
        .max_buf_size(config.limits.max_header_bytes);
    server
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.limits.max_header_bytes as u32);
    server
}

/// `http_server`'s HTTP/1 settings alone, for a TLS tunnel whose client chose HTTP/1.x by ALPN.
pub fn http1_server(config: &Config) -> hyper::server::conn::http1::Builder {
    let mut server = hyper::server::conn::http1::Builder::new();
    server
        .header_read_timeout(None)
        .max_buf_size(config.limits.max_header_bytes)
        // The read buffer's cap alone is checked only while a head is incomplete, so one large
        // read can bring in a whole head past it; this checks the head itself (hyper-util's auto
        // server does not offer it).
        .max_header_size(config.limits.max_header_bytes);
    server
}

async fn refuse_busy(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"error":"too_many_connections","message":"credproxy has limits.max_connections connections open; retry shortly","route":null,"provider":null}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nx-credproxy-error: too_many_connections\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len() + 1
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream.write_all(b"\n").await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Counts a client connection in `credproxy_open_connections` while it lives.
pub(crate) struct OpenConnection(Arc<crate::metrics::Metrics>);

impl OpenConnection {
    pub(crate) fn new(metrics: Arc<crate::metrics::Metrics>) -> OpenConnection {
        metrics.open_connections.inc();
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}

/// Re-reads the config file of the current state and swaps in a state built from it. A file with
/// problems, or one that changes the listeners (they are bound once), leaves everything as it was.
/// [`reload`] on a blocking thread: it reads files and loads TLS roots, which must not hold up the
/// requests of a one-thread runtime meanwhile.
/// A refusal is logged here, so SIGHUP, `POST /reload` and `credproxy reload` all leave it in
/// the service's log, not only with the caller.
/// What a reload did: the file it read, and what the new config cannot change until a restart.
#[derive(Debug)]
pub struct Reloaded {
    pub file: String,
    pub warnings: Vec<String>,
}

pub async fn reload_off_runtime(shared: Shared) -> Result<Reloaded, String> {
    let result = tokio::task::spawn_blocking(move || reload(&shared))
        .await
        .unwrap_or_else(|e| Err(format!("the reload stopped: {e}")));
    if let Err(e) = &result {
        tracing::error!("reload refused, the running config stays:\n{e}");
    }
    result
}

fn reload(shared: &Shared) -> Result<Reloaded, String> {
    let old = shared.load_full();
    let path = std::path::PathBuf::from(&old.config.source);
    let config = crate::config::load(&path).map_err(|e| e.to_string())?;
    let listeners = |c: &Config| {
        let mut l: Vec<(SocketAddr, String)> = c
            .local_endpoints
            .iter()
            .map(|e| (e.listen, e.route.name.clone()))
            .collect();
        l.push((c.listen, String::new()));
        if let Some(a) = c.admin {
            l.push((a, "admin".into()));
        }
        l
    };
    if listeners(&config) != listeners(&old.config) {
        return Err(format!(
            "{}: `listen`, `local_endpoints` or `admin` changed: listeners are bound at start, so restart credproxy to change them; the running config stays",
            path.display()
        ));
    }
    let mut warnings: Vec<String> = config.warnings.iter().map(|w| w.to_string()).collect();
    if config.threads != old.config.threads || config.shape != old.config.shape {
        warnings.push(format!(
            "runtime.threads or runtime.shape changed: the runtime is built at start, so it keeps {} thread(s), {}, until a restart",
            old.config.threads,
            old.config.shape.built(old.config.threads)
        ));
    }
    let (was, now) = (&old.config.limits, &config.limits);
    for (key, changed) in [
        (
            "max_connections",
            was.max_connections != now.max_connections,
        ),
        (
            "max_header_bytes",
            was.max_header_bytes != now.max_header_bytes,
        ),
        (
            "header_read_timeout",
            was.header_read_timeout != now.header_read_timeout,
        ),
    ] {
        if changed {
            warnings.push(format!(
                "limits.{key} changed: it is fixed when the listeners start, so the old value holds until a restart"
            ));
        }
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let new = State::build(config, Some(&old))?;
    let _ = new.shared.set(Arc::downgrade(shared));
    shared.store(Arc::new(new));
    tracing::info!("reloaded {}", path.display());
    Ok(Reloaded {
        file: path.display().to_string(),
        warnings,
    })
}

/// After a failed `accept` (EMFILE and friends): back off instead of spinning, since the
/// listener stays ready and would fail again at once, and warn at most every 10 s, not 20 times a
/// second.
pub async fn accept_failed(e: &std::io::Error, errors: &mut (u64, Option<Instant>)) {
    errors.0 += 1;
    if errors
        .1
        .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
    {
        tracing::warn!(failures = errors.0, "accept failed: {e}");
        *errors = (0, Some(Instant::now()));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn accept_loop(
    listener: TcpListener,
    entry: Entry,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
    slots: Arc<tokio::sync::Semaphore>,
) {
    let server = Arc::new(http_server(&shared.load().config));
    let workers = shared.load().workers.clone();
    let idle = shared.load().config.limits.header_read_timeout;
    let drain = Drain::default();
    let mut accept_errors = (0, None);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(&e, &mut accept_errors).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Some(held) = crate::relay::Held::take(&slots, shared.load().metrics.clone()) else {
            // Over `limits.max_connections`: a clear answer and a closed socket, never a crash.
            tracing::warn!(%peer, "connection refused: limits.max_connections reached");
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            peer,
            entry: entry.clone(),
            shared: shared.clone(),
            server: server.clone(),
            watcher: drain.watcher(),
            idle,
            held,
        };
        match workers.pick() {
            None => {
                tokio::spawn(connection.serve(stream));
            }
            // `runtime.shape: per_core`: the socket moves to the other thread's reactor.
            Some(thread) => {
                let stream = stream.into_std();
                thread.spawn(async move {
                    match stream.and_then(tokio::net::TcpStream::from_std) {
                        Ok(stream) => connection.serve(stream).await,
                        Err(e) => tracing::warn!(%peer, "cannot hand the connection to another thread: {e}"),
                    }
                });
            }
        }
    }
    drop(listener);
    drain.shutdown().await;
}

/// An accepted client connection, and what serving it needs.
struct Connection {
    peer: SocketAddr,
    entry: Entry,
    shared: Shared,
    server: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    /// `limits.header_read_timeout` of the config the listener started with.
    idle: Duration,
    /// Held while the connection lives: a `max_connections` slot and its place in the gauge.
    held: crate::relay::Held,
}

impl Connection {
    async fn serve(self, stream: tokio::net::TcpStream) {
        let Connection {
            peer,
            entry,
            shared,
            server,
            watcher,
            idle,
            held,
        } = self;
        shared.load().workers.serving_here();
        // Shared with a request that switches protocols, which then keeps the slot (`upgrade`).
        let keep = crate::relay::Keep::new(held);
        let pinned = Arc::new(Pinned::new());
        let activity = Arc::new(Activity::default());
        let requests = activity.clone();
        let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let connect = req.method() == hyper::Method::CONNECT;
            if connect && req.version() == hyper::Version::HTTP_2 {
                // An HTTP/2 tunnel is a stream of this connection: the tunnel counts as a
                // request in flight for as long as it lives (`connect::handle`), and takes a
                // slot of its own (many share one connection).
                req.extensions_mut().insert(requests.clone());
            } else if connect || req.headers().contains_key(hyper::header::UPGRADE) {
                // An HTTP/1 tunnel, or a switch of protocols, *is* this connection, which ends
                // at the switch: it keeps the connection's slot.
                req.extensions_mut().insert(keep.clone());
            }
            // Each request runs on the state current when it arrives, to its end.
            let state = shared.load_full();
            let entry = entry.clone();
            let pinned = pinned.clone();
            crate::watchdog::track(&requests, forward::serve(state, entry, req, peer, pinned))
        });
        let conn =
            std::pin::pin!(server.serve_connection_with_upgrades(TokioIo::new(stream), service));
        let close = |c: std::pin::Pin<&mut _>| auto::UpgradeableConnection::graceful_shutdown(c);
        let served = crate::watchdog::serve(conn, close, &activity, idle, watcher).await;
        if let Err(e) = served {
            tracing::debug!(%peer, "connection ended: {e}");
        }
    }
}
