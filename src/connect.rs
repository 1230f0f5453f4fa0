//! CONNECT (HTTPS through the proxy). For a host some route covers: answer 200, terminate the
//! client's TLS with a leaf from the local CA, and serve the decrypted requests through the same
//! route → credentials → forward path as plain requests. A client that tunnels plain HTTP (a
//! CONNECT to port 80 of a routed host, as undici and `curl --proxytunnel` do for `http://`
//! URLs) has its requests served the same way, unencrypted. For any other host: a blind tunnel
//! (after the upstream connection is up, so an unreachable host gets a 502, not a dead 200), or
//! 403 with `unmapped: deny`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::body::{Body, empty};
use crate::config::Unmapped;
use crate::error::ProxyError;
use crate::forward;
use crate::listen::{Entry, State, Tunnel};
use crate::route::{Scheme, authority_port, normalize_host};

pub async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ProxyError> {
    let authority = req.uri().authority().ok_or_else(|| {
        ProxyError::bad_request("bad_connect", "CONNECT needs a host:port target")
    })?;
    let host = normalize_host(authority.host());
    // RFC 9110 §9.3.6: the target is host and port; a missing port is not taken to be 443.
    let port = authority_port(authority)
        .map_err(|e| ProxyError::bad_request("bad_connect", format!("CONNECT target: {e}")))?
        .ok_or_else(|| {
            ProxyError::bad_request(
                "bad_connect",
                format!("CONNECT needs a host:port target, `{authority}` has no port"),
            )
        })?;
    if host.is_empty() {
        return Err(ProxyError::bad_request(
            "bad_connect",
            "CONNECT needs a host:port target",
        ));
    }
    // Over HTTP/1 the client connection's own slot (the listener's `Keep`); over HTTP/2 one of
    // its own.
    let held = match req.extensions_mut().remove::<crate::relay::Keep>() {
        Some(keep) => keep,
        None => crate::relay::Keep::new(crate::relay::hold(&state)?),
    };
    // Over HTTP/2 the tunnel is a stream of the client's connection, which the watchdog must not
    // close while the tunnel lives. (Over HTTP/1 that connection ends at the upgrade.)
    let busy = req
        .extensions()
        .get::<Arc<crate::watchdog::Activity>>()
        .map(|a| a.begin());
    let upgrade = hyper::upgrade::on(&mut req);

    let tls_route = state.config.routes.intercepts(&host, port);
    if tls_route || state.config.routes.tunnels_http(&host, port) {
        // Port 80 carries plain HTTP: no CA is needed up front (a TLS hello there is refused
        // when it arrives).
        if tls_route {
            check_ca(&state, &host)?;
        }
        let keep = crate::relay::Keep::new((held, busy));
        spawn_intercept(state, upgrade, host, port, tls_route, peer, keep);
        return Ok(Response::new(empty()));
    }

    let target = format!("{host}:{port}");
    if state.config.unmapped == Unmapped::Deny {
        // With the port: a route without one covers 443 only, so `host:8443` may be the reason.
        return Err(ProxyError::Denied {
            host: if port == 443 { host } else { target },
        });
    }
    let upstream = state
        .outbound
        .tunnel(&host, port)
        .await
        .map_err(|e| match e {
            crate::outbound::DialError::Timeout { after, .. } => ProxyError::UpstreamTimeout {
                host: target.clone(),
                after,
                setting: "connect_timeout",
            },
            e => ProxyError::UpstreamConnect {
                host: target.clone(),
                cause: e.to_string(),
            },
        })?;
    let idle = state.config.limits.tunnel_idle_timeout;
    tokio::spawn(async move {
        let _held = (held, busy);
        let Ok(upgraded) = upgrade.await else { return };
        let what = format!("tunnel {peer} -> {target}");
        let stats = &state.metrics.relays.tunnel;
        crate::relay::relay(TokioIo::new(upgraded), upstream, idle, &what, stats).await;
    });
    Ok(Response::new(empty()))
}

/// Interception needs a CA whose name constraints cover the host.
fn check_ca(state: &State, host: &str) -> Result<(), ProxyError> {
    let refused = |cause: &str| ProxyError::InterceptRefused {
        host: host.to_string(),
        cause: cause.into(),
    };
    let leaves = state
        .leaves
        .as_ref()
        .ok_or_else(|| refused("no local CA is loaded"))?;
    if !leaves.ca.covers(host) {
        return Err(refused(
            "the local CA's name constraints do not cover it; run `credproxy ca rotate` after adding its route, and import the new CA",
        ));
    }
    Ok(())
}

/// Spawned from a plain function rather than in `handle`: the tunnel's requests are served by
/// `forward::serve`, whose future contains `handle`'s, and the compiler can check that such a
/// cycle is `Send` only across a function boundary like this one.
fn spawn_intercept(
    state: Arc<State>,
    upgrade: hyper::upgrade::OnUpgrade,
    host: String,
    port: u16,
    tls_route: bool,
    peer: SocketAddr,
    keep: crate::relay::Keep,
) {
    tokio::spawn(async move {
        intercept(state, upgrade, host, port, tls_route, peer, keep).await;
    });
}

/// `tls_route`: a route covers `host:port` for HTTPS (`handle` checked the CA for it).
async fn intercept(
    state: Arc<State>,
    upgrade: hyper::upgrade::OnUpgrade,
    host: String,
    port: u16,
    tls_route: bool,
    peer: SocketAddr,
    keep: crate::relay::Keep,
) {
    let upgraded = match upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%peer, host, "CONNECT upgrade failed: {e}");
            return;
        }
    };
    // A client that never speaks (or never finishes its handshake) does not hold the tunnel (and
    // a `max_connections` slot) for ever: it gets the time a request head gets.
    let idle = state.config.limits.header_read_timeout;
    // The first byte says what the client speaks: a TLS handshake record starts with 22.
    let mut io = TokioIo::new(upgraded);
    let mut first = [0u8; 1];
    let first = match tokio::time::timeout(idle, io.read(&mut first)).await {
        Ok(Ok(1)) => first[0],
        Ok(_) => return,
        Err(_) => {
            tracing::info!(%peer, host, "the client sent nothing into its tunnel within limits.header_read_timeout ({idle:?})");
            return;
        }
    };
    let io = Prefixed {
        first: Some(first),
        io,
    };
    if first != 22 {
        let entry = Entry::Intercepted(Arc::new(Tunnel {
            host: host.clone(),
            port,
            scheme: Scheme::Http,
        }));
        serve(&state, io, entry, peer, keep, &host, false).await;
        return;
    }
    if !tls_route {
        tracing::info!(%peer, host, port, "the client started TLS in a tunnel to port {port}, which carries plain HTTP for this host; refused with a TLS alert");
        refuse_tls(io).await;
        return;
    }
    // `handle` checked that a CA is loaded; a leaf that cannot be made is refused like the case
    // above, with an alert the client can report, rather than a reset.
    let config = match state.leaves.as_ref() {
        Some(leaves) => leaves.server_config(&host).await,
        None => Err(crate::ca::CaError::new("no local CA is loaded")),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, host, "cannot intercept: {e}");
            refuse_tls(io).await;
            return;
        }
    };
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(io);
    let tls = match tokio::time::timeout(idle, accept).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            handshake_failed(&state, peer, &host, &e);
            return;
        }
        Err(_) => {
            tracing::info!(%peer, host, "the client did not finish its TLS handshake within limits.header_read_timeout ({idle:?})");
            return;
        }
    };
    let entry = Entry::Intercepted(Arc::new(Tunnel {
        host: host.clone(),
        port,
        scheme: Scheme::Https,
    }));
    // RFC 9113 §3.2: HTTP/2 over TLS is chosen by ALPN, so without `h2` it is HTTP/1.x.
    let http1_only = tls.get_ref().1.alpn_protocol() != Some(b"h2");
    serve(&state, tls, entry, peer, keep, &host, http1_only).await;
}

/// Serves the requests inside an intercepted tunnel (decrypted, or plain HTTP). `http1_only`:
/// the client chose HTTP/1.x by ALPN (plain tunnels may still speak HTTP/2 with prior knowledge).
async fn serve<I>(
    state: &Arc<State>,
    io: I,
    entry: Entry,
    peer: SocketAddr,
    keep: crate::relay::Keep,
    host: &str,
    http1_only: bool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let idle = state.config.limits.header_read_timeout;
    let state2 = state.clone();
    let pinned = Arc::new(crate::pinned::Pinned::new());
    let activity = Arc::new(crate::watchdog::Activity::default());
    let requests = activity.clone();
    let service = service_fn(move |mut req: hyper::Request<Incoming>| {
        // A WebSocket inside the tunnel keeps the tunnel's slot (and, over HTTP/2, the client
        // connection's request in flight) for as long as it lives.
        if req.headers().contains_key(hyper::header::UPGRADE) {
            req.extensions_mut().insert(keep.clone());
        }
        // Like the listeners: each request runs on the config current when it arrives, so a
        // long-lived tunnel follows reloads.
        let state = state2.current().unwrap_or_else(|| state2.clone());
        let entry = entry.clone();
        let pinned = pinned.clone();
        crate::watchdog::track(&requests, forward::serve(state, entry, req, peer, pinned))
    });
    // Watched like the listeners' connections, so a shutdown lets in-flight requests finish.
    let watcher = state
        .tunnels
        .lock()
        .ok()
        .and_then(|g| g.as_ref().map(|g| g.watcher()));
    let Some(watcher) = watcher else { return };
    let ended = |e: &dyn std::fmt::Display| {
        tracing::debug!(%peer, host, "intercepted connection ended: {e}");
    };
    // With upgrades: a WebSocket inside the tunnel (`upgrade`).
    if http1_only {
        // hyper's HTTP/1 server itself: the auto server would first sniff for HTTP/2's preface
        // and then read every request through a rewind layer.
        let server = crate::listen::http1_server(&state.config);
        let conn = std::pin::pin!(
            server
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades()
        );
        let close = |c: std::pin::Pin<&mut _>| {
            hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(c)
        };
        if let Err(e) = crate::watchdog::serve(conn, close, &activity, idle, watcher).await {
            ended(&e);
        }
    } else {
        let server = crate::listen::http_server(&state.config);
        let conn = std::pin::pin!(server.serve_connection_with_upgrades(TokioIo::new(io), service));
        let close = |c: std::pin::Pin<&mut _>| {
            hyper_util::server::conn::auto::UpgradeableConnection::graceful_shutdown(c)
        };
        if let Err(e) = crate::watchdog::serve(conn, close, &activity, idle, watcher).await {
            ended(&*e);
        }
    }
}

/// The tunnel's bytes with its first byte, read to tell TLS from plain HTTP, put back in front.
struct Prefixed<I> {
    first: Option<u8>,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if buf.remaining() > 0
            && let Some(b) = self.first.take()
        {
            buf.put_slice(&[b]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A client that rejects our certificate says so with an alert: tell the user what to do, once
/// per client address and host. Anything else (a scanner, a client closing early) is routine.
fn handshake_failed(state: &State, peer: SocketAddr, host: &str, e: &std::io::Error) {
    use rustls::AlertDescription as A;
    let rejected = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::AlertReceived(
                    A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::DecryptError
                )
            )
        });
    if !rejected {
        tracing::info!(%peer, host, "TLS handshake with the client failed: {e}");
        return;
    }
    let first = state
        .warned_untrusted
        .lock()
        .map(|mut w| w.insert((peer.ip(), host.to_string())))
        .unwrap_or(true);
    if first {
        tracing::warn!(
            %peer,
            host,
            "the client does not trust the credproxy CA: import {} into it (see README, \"When a client does not trust the CA\")",
            state.config.ca.files.cert.display()
        );
    }
}

/// Ends a TLS handshake the proxy will not take with a fatal `handshake_failure` alert, so the
/// client reports a refused handshake rather than a reset connection. The client's hello is
/// read and dropped until it closes (for a second at most): closing with unread bytes makes the
/// kernel send a reset, which can overtake the alert.
async fn refuse_tls<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) {
    use tokio::io::AsyncWriteExt as _;
    const HANDSHAKE_FAILURE: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40];
    if io.write_all(&HANDSHAKE_FAILURE).await.is_err() || io.shutdown().await.is_err() {
        return;
    }
    // On the heap: an array here would make every tunnel's task 4 KiB larger for this rare path.
    let mut sink = vec![0u8; 4096];
    let drain = async { while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}
