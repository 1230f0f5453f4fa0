//! The yardstick for BENCHMARKS.md: the smallest hyper forwarder that adds one header, with
//! nothing of credproxy's (no routing, metrics, logs, access checks). It shows what this
//! machine allows a hyper-based proxy, so credproxy's own cost can be told apart.
//!
//!   cargo run --release --example bare_forwarder -- LISTEN UPSTREAM [THREADS]
//!   e.g. 127.0.0.1:18485 127.0.0.1:18480 1
//!
//! Every request, whatever its URL, goes to UPSTREAM over plain HTTP with `x-api-key: bench-key`.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{HeaderValue, Request, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: bare_forwarder LISTEN UPSTREAM [THREADS]".into());
    }
    let listen: SocketAddr = args[1].parse()?;
    let upstream: SocketAddr = args[2].parse()?;
    let threads: usize = args.get(3).map_or(Ok(1), |t| t.parse())?;
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(serve(listen, upstream))
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            let client = client.clone();
            async move {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let uri: Uri = format!("http://{upstream}{path}")
                    .parse()
                    .unwrap_or_default();
                *req.uri_mut() = uri;
                req.headers_mut()
                    .insert("x-api-key", HeaderValue::from_static("bench-key"));
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
