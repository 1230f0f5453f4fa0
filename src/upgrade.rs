//! Requests that switch protocols (RFC 9110 §7.8), WebSocket above all: the request goes upstream
//! with its credentials like any other, over an HTTP/1.1 connection of its own; when the upstream
//! answers 101, the client's connection and that one are joined byte for byte (`relay`), like a
//! blind tunnel. Any other answer is relayed as usual, and the connection is not reused.
//!
//! `h2c` is not passed on: after it, the client would speak HTTP/2 straight to the upstream, and
//! the proxy could add credentials to none of its later requests. Dropping it is what RFC 9113
//! §3.1 lets a proxy do; the client goes on in HTTP/1.1.

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::listen::State;
use crate::outbound::{Client, Conn};
use crate::pinned::Failure;
use crate::relay::Held;

/// A client's request to switch protocols: what it asked for, its side of the switch, and the
/// connection slot the joined connections will hold.
pub struct Asked {
    protocols: HeaderValue,
    client: OnUpgrade,
    held: Held,
}

/// Whether `Upgrade` names h2c (a protocol the proxy does not pass on; see the module's doc).
fn is_h2c(protocols: &HeaderValue) -> bool {
    protocols
        .to_str()
        .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")))
}

/// The switch a request asks for (its `Connection` listed `upgrade`, and `protocols` is its
/// `Upgrade`), taking the client's side of it from `extensions`. `None` when there is nothing to
/// pass on: no client side (HTTP/2 has no upgrades) or h2c; the request then goes as a plain one.
pub fn asked(
    state: &State,
    protocols: HeaderValue,
    extensions: &mut http::Extensions,
) -> Result<Option<Asked>, ProxyError> {
    if is_h2c(&protocols) {
        return Ok(None);
    }
    let Some(client) = extensions.remove::<OnUpgrade>() else {
        return Ok(None);
    };
    let held = crate::relay::hold(state)?;
    Ok(Some(Asked {
        protocols,
        client,
        held,
    }))
}

/// Puts the switch back on an outgoing request whose hop-by-hop headers were removed.
pub fn mark(asked: &Asked, headers: &mut http::HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, asked.protocols.clone());
}

/// Sends `req` (origin-form URI, no Host) over a new HTTP/1.1 connection of its own. Boxed: a
/// rare path, kept out of every request's future.
pub fn request<'a>(
    client: &'a Client,
    req: Request<Body>,
    https: bool,
    authority: &'a Authority,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, Failure>> + Send + 'a>> {
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
    let resp = sender.send_request(req).await.map_err(Failure::Http)?;
    Ok(resp.map(body::stream))
}

/// The upstream switched protocols (`response` is its 101, hop-by-hop headers removed, `chosen`
/// its `Upgrade`): answers the client the same and joins the two connections once both sides
/// have switched.
pub fn join(
    asked: Asked,
    response: &mut Response<Body>,
    chosen: Option<HeaderValue>,
    idle: std::time::Duration,
    what: String,
) {
    let upstream = hyper::upgrade::on(&mut *response);
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, chosen.unwrap_or(asked.protocols));
    let Asked { client, held, .. } = asked;
    tokio::spawn(async move {
        let _held = held;
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                crate::relay::relay(TokioIo::new(client), TokioIo::new(upstream), idle, &what)
                    .await;
            }
            Err(e) => tracing::debug!(what, "the switch of protocols did not complete: {e}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2c_is_recognised_in_any_case_and_list_position() {
        for v in ["h2c", "H2C", "websocket, h2c", " h2c "] {
            assert!(is_h2c(&HeaderValue::from_static(v)), "{v}");
        }
        for v in ["websocket", "h2", "h2c-x", "TLS/1.2"] {
            assert!(!is_h2c(&HeaderValue::from_static(v)), "{v}");
        }
    }
}
