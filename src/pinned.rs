//! An upstream connection pinned to one client connection. A keep-alive client that sends request
//! after request to the same API gets them all over one HTTP/1.1 upstream connection of its own,
//! instead of a pool checkout per request: the pool's lookup, its check-in task and its
//! bookkeeping cost a third of a small request's user-space CPU (BENCHMARKS.md, "What was
//! optimised").
//!
//! The first request of a client connection goes through the pool. If that answer came over
//! HTTP/1.1, the next request to the same place dials a connection for this client connection and
//! keeps it. An upstream that speaks HTTP/2 stays on the pool, where one connection serves every
//! client. `upstream.pin_connections: false` turns this off.

use std::sync::Mutex;
use std::time::Instant;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use tower_service::Service;

use crate::body::Body;
use crate::outbound::{Client, Conn, Dialer, LocalAddr};

/// What one client connection keeps between its requests.
pub struct Pinned(Mutex<Slot>);

impl Pinned {
    pub fn new() -> Pinned {
        Pinned(Mutex::new(Slot::Empty))
    }
}

impl Default for Pinned {
    fn default() -> Self {
        Pinned::new()
    }
}

enum Slot {
    /// Nothing known yet.
    Empty,
    /// This upstream answered over HTTP/1.1 through the pool: pin on the next request.
    Learnt(Key),
    /// This upstream speaks HTTP/2: leave it to the pool.
    Pooled(Key),
    Idle(Upstream),
    /// A request is using the pinned connection (an HTTP/2 client sends requests concurrently;
    /// the others go through the pool meanwhile).
    Busy,
}

/// Where requests go: which client (dialer and pool), and which scheme and authority.
struct Key {
    client: u64,
    https: bool,
    authority: String,
}

impl Key {
    fn is(&self, client: u64, https: bool, authority: &str) -> bool {
        self.client == client && self.https == https && self.authority == authority
    }
}

struct Upstream {
    key: Key,
    sender: SendRequest<Body>,
    local: Option<LocalAddr>,
    idle_since: Instant,
}

enum Plan {
    Pool { learn: bool },
    Reuse(Upstream),
    Dial,
}

/// Why a request got no response. The errors keep their chain of causes for
/// `forward::upstream_error`.
pub enum Failure {
    Pool(hyper_util::client::legacy::Error),
    Dial(Box<dyn std::error::Error + Send + Sync>),
    Http(hyper::Error),
}

impl Failure {
    /// The error, and whether it happened while connecting.
    pub fn cause(&self) -> (&(dyn std::error::Error + 'static), bool) {
        match self {
            Failure::Pool(e) => (e, e.is_connect()),
            Failure::Dial(e) => (&**e, true),
            Failure::Http(e) => (e, false),
        }
    }
}

/// Sends `req` (origin-form URI, no Host header) to `authority` over this client connection's
/// pinned upstream connection when there is one for it, else through `client`'s pool.
pub async fn request(
    pinned: &Pinned,
    client: &Client,
    mut req: Request<Body>,
    https: bool,
    authority: &Authority,
) -> Result<Response<Incoming>, Failure> {
    let Some(connector) = client.pin_connector() else {
        absolute(&mut req, https, authority);
        return client.request(req).await.map_err(Failure::Pool);
    };
    let authority_str = authority.as_str();
    let upstream = match pinned.plan(client, https, authority_str) {
        Plan::Pool { learn } => {
            absolute(&mut req, https, authority);
            let resp = client.request(req).await.map_err(Failure::Pool)?;
            if learn {
                pinned.learn(client.id(), https, authority_str, resp.version());
            }
            return Ok(resp);
        }
        Plan::Reuse(upstream) => Some(upstream),
        Plan::Dial => None,
    };
    // The pool sets Host itself; a connection of our own needs it set.
    if let Ok(host) = HeaderValue::from_str(authority_str) {
        req.headers_mut().insert(header::HOST, host);
    }
    let key = || Key {
        client: client.id(),
        https,
        authority: authority_str.to_string(),
    };
    let reused = upstream.is_some();
    let mut upstream = match upstream {
        Some(u) => u,
        None => match dial(connector, key()).await {
            Ok(u) => u,
            Err(e) => {
                pinned.clear();
                return Err(e);
            }
        },
    };
    let mut result = upstream.sender.try_send_request(req).await;
    if reused && let Err(e) = &mut result {
        // The kept connection closed before the request went out: once on a new one.
        if let Some(req) = e.take_message() {
            match dial(connector, key()).await {
                Ok(u) => {
                    upstream = u;
                    result = upstream.sender.try_send_request(req).await;
                }
                Err(e) => {
                    pinned.clear();
                    return Err(e);
                }
            }
        }
    }
    match result {
        Ok(mut resp) => {
            if let Some(local) = upstream.local {
                resp.extensions_mut().insert(local);
            }
            pinned.keep(upstream);
            Ok(resp)
        }
        Err(e) => {
            pinned.clear();
            Err(Failure::Http(e.into_error()))
        }
    }
}

/// The pool takes absolute URIs (it picks its connection by scheme and authority).
fn absolute(req: &mut Request<Body>, https: bool, authority: &Authority) {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if https { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(authority.clone());
    parts.path_and_query = req.uri().path_and_query().cloned();
    // Cannot fail with all three parts set.
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

impl Pinned {
    fn plan(&self, client: &Client, https: bool, authority: &str) -> Plan {
        let Ok(mut slot) = self.0.lock() else {
            return Plan::Pool { learn: false };
        };
        let id = client.id();
        let (plan, back) = match std::mem::replace(&mut *slot, Slot::Busy) {
            Slot::Busy => (Plan::Pool { learn: false }, Slot::Busy),
            Slot::Learnt(k) if k.is(id, https, authority) => (Plan::Dial, Slot::Busy),
            Slot::Pooled(k) if k.is(id, https, authority) => {
                (Plan::Pool { learn: false }, Slot::Pooled(k))
            }
            Slot::Idle(u) if u.key.is(id, https, authority) => {
                // An upstream closes idle connections on its own schedule: don't reuse one it may
                // be closing (the pool's rule, `upstream.pool_idle_timeout`).
                if u.sender.is_closed() || u.idle_since.elapsed() >= client.pool_idle_timeout {
                    (Plan::Dial, Slot::Busy)
                } else if u.sender.is_ready() {
                    (Plan::Reuse(u), Slot::Busy)
                } else {
                    // Still busy with an earlier response's body: never wait behind it.
                    (Plan::Pool { learn: false }, Slot::Idle(u))
                }
            }
            other => (Plan::Pool { learn: true }, other),
        };
        *slot = back;
        plan
    }

    fn learn(&self, client: u64, https: bool, authority: &str, version: Version) {
        let Ok(mut slot) = self.0.lock() else { return };
        if matches!(*slot, Slot::Busy) {
            return;
        }
        let key = Key {
            client,
            https,
            authority: authority.to_string(),
        };
        *slot = match version {
            Version::HTTP_11 => Slot::Learnt(key),
            _ => Slot::Pooled(key),
        };
    }

    fn keep(&self, mut upstream: Upstream) {
        upstream.idle_since = Instant::now();
        if let Ok(mut slot) = self.0.lock() {
            *slot = Slot::Idle(upstream);
        }
    }

    fn clear(&self) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Slot::Empty;
        }
    }
}

async fn dial(connector: &HttpsConnector<Dialer>, key: Key) -> Result<Upstream, Failure> {
    let uri = Uri::builder()
        .scheme(if key.https { "https" } else { "http" })
        .authority(key.authority.as_str())
        .path_and_query("/")
        .build()
        .map_err(|e| Failure::Dial(Box::new(e)))?;
    let mut connector = connector.clone();
    std::future::poll_fn(|cx| connector.poll_ready(cx))
        .await
        .map_err(Failure::Dial)?;
    let io = connector.call(uri).await.map_err(Failure::Dial)?;
    let local = Conn::local_of(&io);
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(Failure::Http)?;
    // Ends when the client connection (and so this sender) goes away, or the upstream closes.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("pinned upstream connection ended: {e}");
        }
    });
    Ok(Upstream {
        key,
        sender,
        local,
        idle_since: Instant::now(),
    })
}
