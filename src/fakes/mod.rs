//! Local stand-ins for the real providers, faithful to what they do on the wire
//! (`shared/providers.md`): `credproxy demo` runs them, and so do the tests.
//!
//! Every fake records the requests it received ([`FakeServer::requests`]) and answers
//! `/__echo` (under any path prefix, e.g. `/v3/__echo`) with the request it saw as JSON, so a test
//! can assert exactly which headers arrived.

pub mod cleancloud;
pub mod cloudneeti;
pub mod echo;
pub mod issuer;
pub mod oauth;
pub mod proxy;
pub mod stackbill;
pub mod twotcloud;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::body::Body;

/// What a fake saw of one request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub peer: SocketAddr,
}

/// A running fake. Dropping it stops it.
pub struct FakeServer {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `handler` on `listener`, over TLS when `tls` is given (HTTP/1.1 and HTTP/2 either way).
pub fn serve<F, Fut>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: F,
) -> FakeServer
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let log = Arc::new(Mutex::new(Vec::new()));
    let task_log = log.clone();
    let task = tokio::spawn(async move {
        let acceptor = tls.map(TlsAcceptor::from);
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let log = task_log.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    if let Ok(mut l) = log.lock() {
                        l.push(Recorded {
                            method: req.method().clone(),
                            uri: req.uri().clone(),
                            headers: req.headers().clone(),
                            peer,
                        });
                    }
                    let response = if req.uri().path().ends_with("/__echo") {
                        futures_util::future::Either::Left(std::future::ready(echo_response(
                            &req, peer,
                        )))
                    } else {
                        futures_util::future::Either::Right(handler(req, peer))
                    };
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let server = auto::Builder::new(TokioExecutor::new());
                let result = match acceptor {
                    Some(a) => match a.accept(stream).await {
                        Ok(tls) => server.serve_connection(TokioIo::new(tls), service).await,
                        Err(_) => return,
                    },
                    None => server.serve_connection(TokioIo::new(stream), service).await,
                };
                drop(result);
            });
        }
    });
    FakeServer { addr, log, task }
}

/// Serves a token provider's fake: `handle` gets the fake's settings and its issuer with each
/// request.
pub fn serve_with_issuer<S, F, Fut>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    settings: S,
    issuer: Arc<issuer::Issuer>,
    handle: F,
) -> FakeServer
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Arc<issuer::Issuer>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let settings = Arc::new(settings);
    serve(listener, tls, move |req, _peer| {
        handle(settings.clone(), issuer.clone(), req)
    })
}

/// `{"method","version","authority","uri","headers":{name:[values]},"peer"}` for the request as
/// received.
pub fn echo_response(req: &Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let mut headers = serde_json::Map::new();
    for name in req.headers().keys() {
        let values: Vec<serde_json::Value> = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        headers.insert(name.as_str().to_string(), values.into());
    }
    // HTTP/2 carries the host in `:authority`, HTTP/1.1 in `Host`: report whichever arrived.
    let authority = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(String::from)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "version": format!("{:?}", req.version()),
        "authority": authority,
        // The request target as an origin server sees it, the same for HTTP/1.1 and HTTP/2.
        "uri": req.uri().path_and_query().map_or("/", |p| p.as_str()),
        "headers": headers,
        "peer": peer.to_string(),
    });
    json_response(StatusCode::OK, body)
}

pub use crate::body::respond;

/// A JSON answer, as the fake APIs give.
pub fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    respond(status, "application/json", body.to_string())
}

/// The method a fake API routes a request by: HEAD is answered as GET (hyper's server drops the
/// body), as on most web servers, so `curl -I` through the proxy shows the real headers.
pub fn routed_method(method: &Method) -> Method {
    match method {
        &Method::HEAD => Method::GET,
        m => m.clone(),
    }
}

/// True when the client asked for JSON (2tCloud answers XML otherwise).
pub fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/json"))
}
