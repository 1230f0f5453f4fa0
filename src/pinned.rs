//! An upstream connection pinned to one client connection. A keep-alive client that sends request
//! after request to the same API gets them all over one HTTP/1.1 upstream connection of its own,
//! instead of a pool checkout per request: that saves 11–13% of the proxy's user-space
//! instructions per request (bench/notes.md, "Pinned upstream connections").
//!
//! The first request of a client connection goes through the pool, unless a spare (below) is
//! waiting. If that answer came over HTTP/1.1, the next request to the same place dials a
//! connection for this client connection and keeps it (at most `MAX_DIALS` such dials at once per
//! client; past that, the pool carries the request and a later one pins). An upstream that speaks
//! HTTP/2 stays on the pool, where one connection serves every client; so does anything this
//! client connection sends elsewhere meanwhile, and anything it sends while its pinned connection
//! is busy. When dialling fails, the pool gets the request.
//! When a client connection closes, its idle pinned connection is kept as a spare for the next
//! client connection to that place (up to `SPARES` per client).
//! `upstream.pin_connections: false` turns this off.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use crate::body::{self, Body};
use crate::outbound::{Client, Conn, Connector, LocalAddr};

/// What one client connection keeps between its requests.
pub struct Pinned(Mutex<Slot>);

/// Most spare connections kept per client (dialer and pool).
const SPARES: usize = 32;

/// Most first pinned connections being dialled at once per client. Past it, a client connection
/// that would pin sends that request through the pool (which holds the connection its first
/// request used) and pins on a later one: a burst of new client connections does not turn into
/// a burst of new upstream connections while the pool's sit idle.
const MAX_DIALS: usize = 4;

/// How many first pinned connections are being dialled now, per client; clones share it.
#[derive(Clone, Default)]
pub struct Dials(Arc<AtomicUsize>);

impl Dials {
    fn start(&self) -> Option<Ticket> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_DIALS).then_some(n + 1)
            })
            .ok()?;
        Some(Ticket(self.0.clone()))
    }
}

/// One dial counted in `Dials`, until dropped.
struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Pinned connections whose client connections closed, ready for the next ones. One list per
/// client (dialer and pool); clones share it.
#[derive(Clone, Default)]
pub struct Spares(Arc<Mutex<Vec<Upstream>>>);

impl Spares {
    /// An idle connection to `https`/`authority` that is still usable, if any.
    fn take(&self, https: bool, authority: &str, max_idle: Duration) -> Option<Upstream> {
        let mut spares = self.0.lock().ok()?;
        // Spares that closed or idled too long are dropped on the way.
        spares.retain(|u| !u.sender.is_closed() && u.idle_since.elapsed() < max_idle);
        let i = spares.iter().position(|u| {
            u.key.https == https && u.key.authority == authority && u.sender.is_ready()
        })?;
        Some(spares.swap_remove(i))
    }

    fn put(&self, upstream: Upstream) {
        if let Ok(mut spares) = self.0.lock()
            && spares.len() < SPARES
        {
            spares.push(upstream);
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let slot = match self.0.get_mut() {
            Ok(slot) => std::mem::replace(slot, Slot::Empty),
            Err(_) => return,
        };
        if let Slot::Idle(u) = slot
            && u.sender.is_ready()
            && let Some(spares) = u.spares.upgrade()
        {
            Spares(spares).put(u);
        }
    }
}

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
    /// Leave this upstream to the pool: it speaks HTTP/2, or dialling it failed.
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
    /// When the connection last finished a response.
    idle_since: IdleSince,
    /// Where it goes when its client connection closes (weak: a reload drops the old list).
    spares: std::sync::Weak<Mutex<Vec<Upstream>>>,
}

enum Plan {
    Pool {
        learn: bool,
    },
    Reuse(Upstream),
    /// With a ticket when this is the client connection's first pinned connection.
    Dial(Option<Ticket>),
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
/// Not an `async fn`, to keep the request's future small: see `forward::serve`.
#[expect(clippy::manual_async_fn, reason = "an async fn's future is larger")]
pub fn request(
    pinned: &Pinned,
    client: &Client,
    mut req: Request<Body>,
    https: bool,
    authority: &Authority,
) -> impl std::future::Future<Output = Result<Response<Body>, Failure>> + Send {
    async move {
        let Some(connector) = client.pin_connector() else {
            return pooled_boxed(client, req, https, authority).await;
        };
        let authority_str = authority.as_str();
        let (kept, ticket) = match pinned.plan(client, https, authority_str) {
            Plan::Pool { learn } => {
                let resp = pooled_boxed(client, req, https, authority).await?;
                if learn {
                    pinned.learn(client.id(), https, authority_str, resp.version());
                }
                return Ok(resp);
            }
            Plan::Reuse(upstream) => (Some(upstream), None),
            Plan::Dial(ticket) => (None, ticket),
        };
        let mut claim = Claim {
            pinned,
            settled: false,
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
        // This client connection's kept connection, or a spare: either may have closed meanwhile.
        let reused = kept.is_some();
        // The rare paths (dialling, falling back to the pool) are boxed: inline, their futures
        // would make every request's future several kilobytes larger, and it is copied once per
        // request.
        let mut upstream = match kept {
            Some(u) => u,
            None => match dial_boxed(client, connector, key()).await {
                Ok(u) => u,
                Err(_) => {
                    // The pool may still hold a live connection (an API that takes no more of them,
                    // say): it gets this request, and this client connection's next ones.
                    drop(ticket);
                    claim.settle(Slot::Pooled(key()));
                    return pooled_boxed(client, req, https, authority).await;
                }
            },
        };
        drop(ticket);
        let mut result = upstream.sender.try_send_request(req).await;
        if reused
            && let Err(e) = &mut result
            && let Some(req) = e.take_message()
        {
            // The kept connection closed before the request went out: a new one, or the pool.
            match dial_boxed(client, connector, key()).await {
                Ok(u) => {
                    upstream = u;
                    result = upstream.sender.try_send_request(req).await;
                }
                Err(_) => {
                    claim.settle(Slot::Pooled(key()));
                    return pooled_boxed(client, req, https, authority).await;
                }
            }
        }
        match result {
            Ok(resp) => {
                let (mut parts, incoming) = resp.into_parts();
                // Only a 403 is looked at for the source address (`forward::ip_bound_hint`); on
                // every response it would allocate an extensions map per request.
                if parts.status == http::StatusCode::FORBIDDEN
                    && let Some(local) = upstream.local
                {
                    parts.extensions.insert(local);
                }
                upstream.idle_since.now();
                let watched = Watched {
                    inner: incoming,
                    idle_since: upstream.idle_since.clone(),
                };
                claim.settle(Slot::Idle(upstream));
                Ok(Response::from_parts(parts, body::stream(watched)))
            }
            Err(e) => {
                claim.settle(Slot::Empty);
                Err(Failure::Http(e.into_error()))
            }
        }
    }
}

pub(crate) type Boxed<'a, T> = Pin<Box<dyn Future<Output = Result<T, Failure>> + Send + 'a>>;

// The rare paths' futures are boxed by these plain functions, not by `Box::pin(..)` in place: in
// place, the caller's future would still keep room for the unboxed future it moves from.
fn dial_boxed<'a>(client: &'a Client, connector: &'a Connector, key: Key) -> Boxed<'a, Upstream> {
    Box::pin(dial(client, connector, key))
}

fn pooled_boxed<'a>(
    client: &'a Client,
    req: Request<Body>,
    https: bool,
    authority: &'a Authority,
) -> Boxed<'a, Response<Body>> {
    Box::pin(pooled(client, req, https, authority))
}

/// Through the pool, which takes absolute URIs (it picks its connection by scheme and authority).
async fn pooled(
    client: &Client,
    mut req: Request<Body>,
    https: bool,
    authority: &Authority,
) -> Result<Response<Body>, Failure> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if https { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(authority.clone());
    parts.path_and_query = req.uri().path_and_query().cloned();
    // Cannot fail with all three parts set.
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    let resp = client.request(req).await.map_err(Failure::Pool)?;
    Ok(resp.map(body::stream))
}

/// A request's hold on the slot while it uses the pinned connection (the slot is `Busy`).
/// However the request ends, even dropped by a timeout or a client gone away, the slot is
/// settled: a dropped claim leaves it `Empty`, so pinning starts over.
struct Claim<'a> {
    pinned: &'a Pinned,
    settled: bool,
}

impl Claim<'_> {
    fn settle(&mut self, slot: Slot) {
        self.settled = true;
        if let Ok(mut s) = self.pinned.0.lock() {
            *s = slot;
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.settle(Slot::Empty);
        }
    }
}

impl Pinned {
    fn plan(&self, client: &Client, https: bool, authority: &str) -> Plan {
        let Ok(mut slot) = self.0.lock() else {
            return Plan::Pool { learn: false };
        };
        let id = client.id();
        // A spare, wherever this client connection would dial (or could skip the pool): it was
        // pinned because its upstream answered over HTTP/1.1.
        let spare = || {
            client
                .spares()
                .take(https, authority, client.pool_idle_timeout)
        };
        let (plan, back) = match std::mem::replace(&mut *slot, Slot::Busy) {
            Slot::Busy => (Plan::Pool { learn: false }, Slot::Busy),
            Slot::Learnt(k) if k.is(id, https, authority) => {
                if let Some(u) = spare() {
                    (Plan::Reuse(u), Slot::Busy)
                } else if let Some(dial) = client.dials().start() {
                    (Plan::Dial(Some(dial)), Slot::Busy)
                } else {
                    // Many client connections pinning at once (a burst of new clients): this
                    // request takes the pool's idle connection, and a later one dials.
                    (Plan::Pool { learn: false }, Slot::Learnt(k))
                }
            }
            Slot::Pooled(k) if k.is(id, https, authority) => {
                (Plan::Pool { learn: false }, Slot::Pooled(k))
            }
            Slot::Idle(u) if u.key.is(id, https, authority) => {
                if u.sender.is_ready() {
                    // An upstream closes idle connections on its own schedule: don't reuse one
                    // it may be closing (the pool's rule, `upstream.pool_idle_timeout`).
                    if u.idle_since.elapsed() >= client.pool_idle_timeout {
                        (spare().map_or(Plan::Dial(None), Plan::Reuse), Slot::Busy)
                    } else {
                        (Plan::Reuse(u), Slot::Busy)
                    }
                } else if u.sender.is_closed() {
                    (spare().map_or(Plan::Dial(None), Plan::Reuse), Slot::Busy)
                } else {
                    // Still busy with an earlier response's body: never wait behind it.
                    (Plan::Pool { learn: false }, Slot::Idle(u))
                }
            }
            // With a spare there is nothing to learn: a new client connection starts on it rather
            // than on the pool, and does not open a second upstream connection later. (An idle
            // pinned connection to another host is kept: see `learn`.)
            other @ (Slot::Empty | Slot::Learnt(_) | Slot::Pooled(_)) => match spare() {
                Some(u) => (Plan::Reuse(u), Slot::Busy),
                None => (Plan::Pool { learn: true }, other),
            },
            // Its client went with a reload: no request will ask for it again, and keeping it
            // would hold its upstream socket and stop this connection from pinning anew.
            Slot::Idle(u) if u.spares.strong_count() == 0 => {
                drop(u);
                match spare() {
                    Some(u) => (Plan::Reuse(u), Slot::Busy),
                    None => (Plan::Pool { learn: true }, Slot::Empty),
                }
            }
            other => (Plan::Pool { learn: true }, other),
        };
        *slot = back;
        plan
    }

    /// After a request through the pool: pin this upstream next time if it answered over
    /// HTTP/1.1. A pinned connection (busy, or idle for another host) is kept.
    fn learn(&self, client: u64, https: bool, authority: &str, version: Version) {
        let Ok(mut slot) = self.0.lock() else { return };
        if matches!(*slot, Slot::Busy | Slot::Idle(_)) {
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
}

/// A time shared by a pinned connection and the body of its latest response, in microseconds
/// since the first use.
#[derive(Clone)]
struct IdleSince(Arc<AtomicU64>);

impl IdleSince {
    fn new() -> IdleSince {
        let t = IdleSince(Arc::new(AtomicU64::new(0)));
        t.now();
        t
    }

    fn clock() -> u64 {
        static START: OnceLock<Instant> = OnceLock::new();
        u64::try_from(START.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn now(&self) {
        self.0.store(Self::clock(), Ordering::Relaxed);
    }

    fn elapsed(&self) -> Duration {
        Duration::from_micros(Self::clock().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// A pinned connection's response body: when it is done with (read to its end, or dropped),
/// the connection's idle time starts. A long download does not count as idle.
struct Watched {
    inner: Incoming,
    idle_since: IdleSince,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.idle_since.now();
    }
}

async fn dial(client: &Client, connector: &Connector, key: Key) -> Result<Upstream, Failure> {
    let io = connector
        .open(key.https, &key.authority)
        .await
        .map_err(Failure::Dial)?;
    let local = Conn::local_of(&io);
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(Failure::Http)?;
    let host = key.authority.clone();
    // Ends when the client connection (and so this sender) goes away, or the upstream closes.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(host, "pinned upstream connection ended: {e}");
        }
    });
    Ok(Upstream {
        key,
        sender,
        local,
        idle_since: IdleSince::new(),
        spares: Arc::downgrade(&client.spares().0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_dials_first_dials_run_at_once_and_a_finished_one_frees_its_place() {
        let dials = Dials::default();
        let mut tickets: Vec<Ticket> = (0..MAX_DIALS).filter_map(|_| dials.start()).collect();
        assert_eq!(tickets.len(), MAX_DIALS);
        assert!(dials.start().is_none(), "one dial more than MAX_DIALS");
        // Clones share the count: every client connection of one client sees the same dials.
        assert!(dials.clone().start().is_none());
        drop(tickets.pop());
        let again = dials.start();
        assert!(again.is_some(), "a finished dial frees its place");
        assert!(dials.start().is_none());
        drop(again);
        assert_eq!(dials.0.load(Ordering::Acquire), MAX_DIALS - 1);
    }
}
