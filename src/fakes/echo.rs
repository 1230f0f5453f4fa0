//! A generic upstream for tests: echoes every request (see [`super::echo_response`]),
//! `/redirect?to=URL` answers 302 to `URL`, `/status/NNN` answers that status, and `/ip` answers
//! the caller's source address, like a "what is my IP" service.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use super::{FakeServer, echo_response, respond, serve};
use crate::body::Body;

pub fn start(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> FakeServer {
    serve(listener, tls, |req, peer| async move { handle(req, peer) })
}

fn handle(req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path();
    if path == "/ip" {
        // A "what is my IP" service: the source address this request came from.
        return respond(StatusCode::OK, "text/plain", format!("{}\n", peer.ip()));
    }
    if path == "/redirect" {
        let to = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("to="))
            .unwrap_or("/");
        let mut r = respond(StatusCode::FOUND, "text/plain", "redirecting\n");
        if let Ok(v) = HeaderValue::from_str(to) {
            r.headers_mut().insert(http::header::LOCATION, v);
        }
        return r;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok());
        return match status {
            Some(s) => respond(s, "text/plain", format!("status {s}\n")),
            None => respond(StatusCode::BAD_REQUEST, "text/plain", "bad status\n"),
        };
    }
    echo_response(&req, peer)
}
