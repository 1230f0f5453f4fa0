//! A fake upstream HTTP proxy (a corporate squid, say) that demands `Proxy-Authorization`:
//! CONNECT tunnels for HTTPS, absolute-form forwarding for plain HTTP (WebSocket handshakes
//! included), 407 without the right credentials. It records what it was asked, so tests can see
//! traffic really went through it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::body::{Body, empty, stream};

/// One request the proxy saw: method, target, and the peer it came from.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub target: String,
    pub peer: SocketAddr,
    pub authorized: bool,
}

pub struct FakeProxy {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeProxy {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for FakeProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `expected`: the whole `Proxy-Authorization` value it accepts (e.g. `Basic dTpw`).
pub fn start(listener: TcpListener, expected: String) -> FakeProxy {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let expected = Arc::new(expected);
    let task = tokio::spawn(async move {
        let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let (log, expected, client) = (log.clone(), expected.clone(), client.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (log, expected, client) = (log.clone(), expected.clone(), client.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            handle(req, peer, &log, &expected, &client).await,
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    FakeProxy { addr, seen, task }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = code;
    r
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    log: &Mutex<Vec<Seen>>,
    expected: &str,
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
) -> Response<Body> {
    let authorized = req
        .headers()
        .get(http::header::PROXY_AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
    if let Ok(mut l) = log.lock() {
        l.push(Seen {
            method: req.method().clone(),
            target: req.uri().to_string(),
            peer,
            authorized,
        });
    }
    if !authorized {
        let mut r = status(StatusCode::PROXY_AUTHENTICATION_REQUIRED);
        r.headers_mut().insert(
            "proxy-authenticate",
            http::HeaderValue::from_static("Basic realm=\"corp\""),
        );
        return r;
    }
    if req.method() == Method::CONNECT {
        let Some(target) = req.uri().authority().map(|a| a.to_string()) else {
            return status(StatusCode::BAD_REQUEST);
        };
        let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
            return status(StatusCode::BAD_GATEWAY);
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(up), &mut upstream).await;
            }
        });
        return status(StatusCode::OK);
    }
    if req.headers().contains_key(http::header::UPGRADE) {
        return switch(req).await;
    }
    // Absolute form: forward it, without our own credentials.
    let (mut parts, body) = req.into_parts();
    parts.headers.remove(http::header::PROXY_AUTHORIZATION);
    match client
        .request(Request::from_parts(parts, stream(body)))
        .await
    {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, stream(body))
        }
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

/// A request that switches protocols (WebSocket), in absolute form: sent on a connection of its
/// own, in origin form; after a 101 the two connections are joined, as squid's
/// `http_upgrade_request_protocols` does.
async fn switch(mut req: Request<Incoming>) -> Response<Body> {
    let Some(authority) = req.uri().authority().map(|a| a.to_string()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let Ok(tcp) = tokio::net::TcpStream::connect(&authority).await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
    else {
        return status(StatusCode::BAD_GATEWAY);
    };
    tokio::spawn(conn.with_upgrades());
    let client = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    parts.headers.remove(http::header::PROXY_AUTHORIZATION);
    if let Some(origin) = parts.uri.path_and_query() {
        parts.uri = origin.clone().into();
    }
    let Ok(mut resp) = sender
        .send_request(Request::from_parts(parts, stream(body)))
        .await
    else {
        return status(StatusCode::BAD_GATEWAY);
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let Ok((client, upstream)) = tokio::try_join!(client, upstream) {
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(upstream),
                )
                .await;
            }
        });
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, stream(body))
}
