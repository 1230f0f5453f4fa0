//! The yardstick of scenario 4 in BENCHMARKS.md: the smallest hyper + rustls intercepting proxy
//! that adds one header, with nothing of credproxy's (no routing, metrics, logs, access checks,
//! leaf certificates minted per host). It shows what this machine allows a hyper-based
//! interceptor, so credproxy's own cost on HTTPS can be told apart.
//!
//!   cargo run --release --example bare_interceptor -- LISTEN UPSTREAM CERT KEY UPSTREAM_CA [THREADS]
//!
//! It answers every CONNECT with 200, terminates the client's TLS with CERT and KEY (PEM; TLS
//! session tickets on, as credproxy), and sends each request inside, with `x-api-key: bench-key`
//! added, over TLS to UPSTREAM (checked against UPSTREAM_CA, for the CONNECT's host name), on one
//! upstream connection per client connection, as credproxy's `upstream.pin_connections` does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::Mutex;
use tokio_rustls::{TlsAcceptor, TlsConnector};

// Only its pinned upstream connection is used here, not its plain-HTTP server.
#[allow(dead_code)]
#[path = "support/bare.rs"]
mod bare;

use bare::{Error, Sender, handshake, send_pinned, status};

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        return Err(
            "usage: bare_interceptor LISTEN UPSTREAM CERT KEY UPSTREAM_CA [THREADS]".into(),
        );
    }
    let listen: SocketAddr = args[1].parse()?;
    let upstream: SocketAddr = args[2].parse()?;
    let certs = CertificateDer::pem_file_iter(&args[3])?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&args[4])?;
    let roots = CertificateDer::pem_file_iter(&args[5])?.collect::<Result<Vec<_>, _>>()?;
    let threads: usize = args.get(6).map_or(Ok(1), |t| t.parse())?;

    let provider = credproxy::outbound::crypto_provider();
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let connector = TlsConnector::from(Arc::new(credproxy::outbound::tls_config(&roots)?));

    credproxy::runtime(threads, Default::default())?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            let service = service_fn(move |req: Request<Incoming>| {
                let (acceptor, connector) = (acceptor.clone(), connector.clone());
                async move {
                    if req.method() != Method::CONNECT {
                        return Ok::<_, Infallible>(status(StatusCode::BAD_REQUEST));
                    }
                    let Some(host) = req.uri().host().map(str::to_owned) else {
                        return Ok(status(StatusCode::BAD_REQUEST));
                    };
                    tokio::spawn(async move {
                        if let Ok(upgraded) = hyper::upgrade::on(req).await {
                            let _ = intercept(upgraded, acceptor, connector, upstream, host).await;
                        }
                    });
                    Ok(status(StatusCode::OK))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    })
}

/// Serves the requests inside one CONNECT tunnel, each over this tunnel's own upstream connection.
async fn intercept(
    upgraded: hyper::upgrade::Upgraded,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    upstream: SocketAddr,
    host: String,
) -> Result<(), Error> {
    let tls = acceptor.accept(TokioIo::new(upgraded)).await?;
    let own: Arc<Mutex<Option<Sender>>> = Arc::default();
    let service = service_fn(move |mut req: Request<Incoming>| {
        let (own, connector, host) = (own.clone(), connector.clone(), host.clone());
        async move {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
            req.headers_mut()
                .insert("x-api-key", HeaderValue::from_static("bench-key"));
            let answer = send_pinned(&own, req, || dial(&connector, upstream, &host)).await;
            Ok::<_, Infallible>(match answer {
                Some(resp) => resp.map(Either::Left),
                None => status(StatusCode::BAD_GATEWAY),
            })
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await?;
    Ok(())
}

async fn dial(connector: &TlsConnector, upstream: SocketAddr, host: &str) -> Result<Sender, Error> {
    let stream = tokio::net::TcpStream::connect(upstream).await?;
    let _ = stream.set_nodelay(true);
    let tls = connector
        .connect(ServerName::try_from(host.to_owned())?, stream)
        .await?;
    handshake(tls).await
}
