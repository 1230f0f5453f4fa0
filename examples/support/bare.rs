//! The bare forwarder's server, shared by `examples/bare_forwarder.rs` and the scenario 5 bench
//! (`examples/cold_start.rs`): the smallest hyper forwarder that adds one header, with nothing of
//! credproxy's (no routing, metrics, logs, access checks, token cache). Its pinned upstream
//! connection ([`send_pinned`]) also serves `examples/bare_interceptor.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// How the bare forwarder reaches its upstream.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// hyper-util's pooled client, shared by every client connection.
    Pooled,
    /// One upstream connection per client connection, no pool: what credproxy does with
    /// `upstream.pin_connections` from a client connection's second request on.
    #[allow(dead_code)] // examples/cold_start.rs uses the pool only
    Pinned,
}

pub type Sender = hyper::client::conn::http1::SendRequest<Incoming>;
/// What the bare proxies answer: the upstream's response, or a status of their own.
pub type Body = Either<Incoming, Empty<Bytes>>;

/// Every request accepted on `listener`, whatever its URL, goes to `upstream` over plain HTTP
/// with the header `name: value` added.
pub async fn serve(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    name: HeaderName,
    value: HeaderValue,
    mode: Mode,
) -> std::io::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let (name, value) = (name.clone(), value.clone());
        // Pinned: this client connection's own upstream connection, dialled on first use (none in
        // pooled mode, so that the pooled yardstick pays nothing for it).
        let own: Option<Arc<Mutex<Option<Sender>>>> = (mode == Mode::Pinned).then(Arc::default);
        let service = service_fn(move |mut req: Request<Incoming>| {
            let client = client.clone();
            let own = own.clone();
            let (name, value) = (name.clone(), value.clone());
            async move {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let uri: Uri = match mode {
                    Mode::Pooled => format!("http://{upstream}{path}").parse(),
                    Mode::Pinned => path.parse(),
                }
                .unwrap_or_default();
                *req.uri_mut() = uri;
                req.headers_mut().insert(name, value);
                let answer = match own {
                    None => client.request(req).await.ok(),
                    Some(own) => send_pinned(&own, req, || dial(upstream)).await,
                };
                Ok::<_, Infallible>(match answer {
                    Some(resp) => resp.map(Either::Left),
                    None => status(StatusCode::BAD_GATEWAY),
                })
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Sends `req` over this client connection's own upstream connection, dialled with `dial` on
/// first use and again if the upstream closed it; `None` if dialling or sending failed.
pub async fn send_pinned<Fut>(
    own: &Mutex<Option<Sender>>,
    req: Request<Incoming>,
    dial: impl FnOnce() -> Fut,
) -> Option<Response<Incoming>>
where
    Fut: Future<Output = Result<Sender, Error>>,
{
    let mut own = own.lock().await;
    let ready = match own.as_mut() {
        Some(sender) => sender.ready().await.is_ok(),
        None => false,
    };
    if !ready {
        *own = dial().await.ok();
    }
    own.as_mut()?.send_request(req).await.ok()
}

/// HTTP/1 over a new upstream connection; the connection's driver runs as a task of its own.
pub async fn handshake<T>(io: T) -> Result<Sender, Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// An answer of the proxy's own: the status alone.
pub fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Empty::new()));
    *resp.status_mut() = code;
    resp
}

async fn dial(upstream: SocketAddr) -> Result<Sender, Error> {
    let stream = tokio::net::TcpStream::connect(upstream).await?;
    let _ = stream.set_nodelay(true);
    handshake(stream).await
}
