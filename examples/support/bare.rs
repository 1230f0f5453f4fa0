//! The bare forwarder's server, shared by `examples/bare_forwarder.rs` and the scenario 5 bench
//! (`examples/cold_start.rs`): the smallest hyper forwarder that adds one header, with nothing of
//! credproxy's (no routing, metrics, logs, access checks, token cache).

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{HeaderName, HeaderValue, Request, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Every request accepted on `listener`, whatever its URL, goes to `upstream` over plain HTTP
/// with the header `name: value` added; pooled upstream connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    name: HeaderName,
    value: HeaderValue,
) -> std::io::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let (name, value) = (name.clone(), value.clone());
        let service = service_fn(move |mut req: Request<Incoming>| {
            let client = client.clone();
            let (name, value) = (name.clone(), value.clone());
            async move {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let uri: Uri = format!("http://{upstream}{path}")
                    .parse()
                    .unwrap_or_default();
                *req.uri_mut() = uri;
                req.headers_mut().insert(name, value);
                Ok::<_, Infallible>(match client.request(req).await {
                    Ok(resp) => resp.map(http_body_util::Either::Left),
                    Err(_) => {
                        let mut resp = hyper::Response::new(http_body_util::Either::Right(
                            http_body_util::Empty::new(),
                        ));
                        *resp.status_mut() = http::StatusCode::BAD_GATEWAY;
                        resp
                    }
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
