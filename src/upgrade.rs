//! Requests that switch protocols (RFC 9110 §7.8), for WebSocket: the request goes upstream with
//! its credentials like any other, over an HTTP/1.1 connection of its own; when the upstream
//! answers 101, the client's connection and that one are joined byte for byte (`relay`), like a
//! blind tunnel. Any other answer is relayed as usual, and the connection is not reused.
//!
//! Only `websocket` is passed on. After any switch the proxy sees bytes, not requests: a switch to
//! `h2c` (or to any protocol that carries HTTP) would let the client send requests past the
//! route's path checks, from the proxy's address. Other offers are dropped, as RFC 9110 §7.8 lets
//! an intermediary do, and the request is answered in HTTP/1.1.

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::body::{self, Body};
use crate::outbound::{Client, Conn, LocalAddr};
use crate::pinned::{Boxed, Failure};
use crate::relay::Keep;

/// The one protocol passed on (see the module's doc).
const WEBSOCKET: &str = "websocket";

/// A client's request to switch to WebSocket: its side of the switch, and its connection's
/// share of the slot the joined connections will hold.
pub struct Asked {
    client: OnUpgrade,
    keep: Keep,
}

/// Whether an `Upgrade` value offers WebSocket, alone or among other offers. Compared as bytes:
/// a value that is not text offers nothing else.
fn offers_websocket(protocols: &HeaderValue) -> bool {
    protocols
        .as_bytes()
        .split(|b| *b == b',')
        .any(|p| p.trim_ascii().eq_ignore_ascii_case(WEBSOCKET.as_bytes()))
}

/// The switch a request asks for (its `Connection` listed `upgrade`, and `protocols` is its
/// `Upgrade`), taking the client's side of it and its connection's `Keep` from `extensions`.
/// `None` when there is nothing to pass on: no WebSocket among the offers, or no client side
/// (HTTP/2 has no upgrades); the request then goes as a plain one.
pub fn asked(protocols: &HeaderValue, extensions: &mut http::Extensions) -> Option<Asked> {
    if !offers_websocket(protocols) {
        return None;
    }
    // Both put there by hyper and by the listener (or intercepted tunnel) with every request
    // that carries `Upgrade`.
    let client = extensions.remove::<OnUpgrade>()?;
    let keep = extensions.remove::<Keep>()?;
    Some(Asked { client, keep })
}

/// Puts the switch on a message whose hop-by-hop headers were removed: the request going
/// upstream, and the 101 going back to the client.
pub fn mark(headers: &mut http::HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(WEBSOCKET));
}

/// Sends `req` (origin-form URI, no Host) over a new HTTP/1.1 connection of its own. Boxed: a
/// rare path, kept out of every request's future.
pub fn request<'a>(
    client: &'a Client,
    req: Request<Body>,
    https: bool,
    authority: &'a Authority,
) -> Boxed<'a, Response<Body>> {
    Box::pin(send(client, req, https, authority))
}

async fn send(
    client: &Client,
    mut req: Request<Body>,
    https: bool,
    authority: &Authority,
) -> Result<Response<Body>, Failure> {
    let io = client
        .h1_connector()
        .open(https, authority.as_str())
        .await
        .map_err(Failure::Dial)?;
    let local = Conn::local_of(&io);
    if Conn::absolute_form_of(&io) {
        // Plain HTTP through an upstream proxy: the proxy needs the whole URL.
        let absolute = format!("http://{authority}{}", req.uri());
        if let Ok(uri) = absolute.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
    if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
        req.headers_mut().insert(header::HOST, host);
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(Failure::Http)?;
    let host = authority.to_string();
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(host, "upgrade connection ended: {e}");
        }
    });
    let mut resp = sender.send_request(req).await.map_err(Failure::Http)?;
    // For `forward::ip_bound_hint`, as over the other connections.
    if resp.status() == http::StatusCode::FORBIDDEN
        && let Some(local) = local
    {
        resp.extensions_mut().insert::<LocalAddr>(local);
    }
    Ok(resp.map(body::stream))
}

/// The upstream switched protocols (`response` is its 101, hop-by-hop headers removed): answers
/// the client the same, and joins the two connections once both sides have switched (counted in
/// `stats`).
pub fn join(
    asked: Asked,
    response: &mut Response<Body>,
    idle: std::time::Duration,
    what: String,
    stats: crate::metrics::RelayStats,
) {
    let upstream = hyper::upgrade::on(&mut *response);
    mark(response.headers_mut());
    let Asked { client, keep } = asked;
    tokio::spawn(async move {
        let _keep = keep;
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                let (client, upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                crate::relay::relay(client, upstream, idle, &what, &stats).await;
            }
            Err(e) => tracing::debug!(what, "the switch of protocols did not complete: {e}"),
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_a_websocket_offer_counts_in_any_case_and_list_position() {
        for v in ["websocket", "WebSocket", "h2c, websocket", " websocket ,x"] {
            assert!(offers_websocket(&HeaderValue::from_static(v)), "{v}");
        }
        for v in ["h2c", "H2C", "websockets", "web socket", "TLS/1.2", ""] {
            assert!(!offers_websocket(&HeaderValue::from_static(v)), "{v}");
        }
        let not_text = HeaderValue::from_bytes(b"h2c, \xff").unwrap();
        assert!(!offers_websocket(&not_text));
    }
}
