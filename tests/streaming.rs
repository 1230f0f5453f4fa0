//! Bodies stream through the proxy in both directions: a 256 MiB upload and download pass while
//! the proxy holds only a bounded window of bytes, never the whole body.
//!
//! How it is measured: one side counts bytes produced, the other bytes consumed. If the proxy
//! buffered the body, the producer would get all 256 MiB out before the consumer saw any, so the
//! gap between them (the bytes "in flight", held by sockets and the proxy) would reach the whole
//! body. Streaming keeps that gap at a few socket buffers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use credproxy::fakes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use support::*;

const TOTAL: u64 = 256 * 1024 * 1024;
const CHUNK: usize = 1024 * 1024;
/// Far above what sockets and hyper buffer (a few MiB), far below the body.
const MAX_IN_FLIGHT: u64 = 48 * 1024 * 1024;

fn chunk(i: u64) -> Bytes {
    Bytes::from(vec![(i % 251) as u8; CHUNK])
}

/// Gives the other side up to a second to catch up before producing more. A streaming proxy lets
/// it catch up at once; a buffering one never does, so the wait is not repeated once it failed.
async fn wait_for_peer(sent: u64, peer_count: &AtomicU64) {
    static GAVE_UP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if GAVE_UP.load(Ordering::SeqCst) {
        return;
    }
    for _ in 0..200 {
        if sent.saturating_sub(peer_count.load(Ordering::SeqCst)) < MAX_IN_FLIGHT / 2 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    GAVE_UP.store(true, Ordering::SeqCst);
}

/// Before producing chunk `i`: lets the peer catch up (`wait_for_peer`), then records in
/// `max_gap` how far ahead of the peer the producer still is.
async fn before_chunk(i: u64, peer_count: &AtomicU64, max_gap: &AtomicU64) {
    let sent = i * CHUNK as u64;
    wait_for_peer(sent, peer_count).await;
    let gap = sent.saturating_sub(peer_count.load(Ordering::SeqCst));
    max_gap.fetch_max(gap, Ordering::SeqCst);
}

/// How many bytes of `data`, found at `offset` in the body, are not what `chunk` made there.
fn wrong_bytes(offset: u64, data: &[u8]) -> u64 {
    let expected = |k: usize| (((offset + k as u64) / CHUNK as u64) % 251) as u8;
    let wrong = data.iter().enumerate().filter(|(k, b)| **b != expected(*k));
    wrong.count() as u64
}

fn route_yaml(upstream: std::net::SocketAddr) -> String {
    format!(
        "providers:
  p:
    headers: {{x-api-key: v}}
routes:
  - host: bulk.example.com
    provider: p
    upstream_scheme: http
    connect_to: {upstream}
"
    )
}

/// POSTs `body`, streamed, to bulk.example.com through the proxy.
async fn upload<S>(proxy: std::net::SocketAddr, body: S) -> reqwest::Response
where
    S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    send(
        client(proxy)
            .post("http://bulk.example.com/upload")
            .body(reqwest::Body::wrap_stream(body)),
    )
    .await
}

#[tokio::test]
async fn a_256_mib_upload_streams_through() {
    let env = Env::new();
    let received = Arc::new(AtomicU64::new(0));
    let bad_bytes = Arc::new(AtomicU64::new(0));
    let (r, b) = (received.clone(), bad_bytes.clone());
    let upstream = fakes::serve(listener().await, None, move |req, _peer| {
        let (received, bad) = (r.clone(), b.clone());
        async move {
            assert_eq!(req.headers()["x-api-key"], "v");
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(data) = frame.data_ref() {
                    // Content check: chunk i is all bytes (i % 251).
                    let offset = received.load(Ordering::SeqCst);
                    bad.fetch_add(wrong_bytes(offset, data), Ordering::SeqCst);
                    received.fetch_add(data.len() as u64, Ordering::SeqCst);
                }
            }
            fakes::respond(http::StatusCode::OK, "text/plain", "stored")
        }
    });
    let proxy = env.proxy(&route_yaml(upstream.addr)).await;

    let max_gap = Arc::new(AtomicU64::new(0));
    let (rc, gap) = (received.clone(), max_gap.clone());
    let body = futures_util::stream::iter(0..TOTAL / CHUNK as u64).then(move |i| {
        let (rc, gap) = (rc.clone(), gap.clone());
        async move {
            // Let the upstream catch up a little, so a streaming proxy shows a small gap; a
            // buffering one never lets the upstream see a byte before the end, whatever we wait.
            before_chunk(i, &rc, &gap).await;
            Ok::<_, std::io::Error>(chunk(i))
        }
    });
    let r = upload(proxy.addr, body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "stored");
    assert_eq!(received.load(Ordering::SeqCst), TOTAL, "every byte arrived");
    assert_eq!(
        bad_bytes.load(Ordering::SeqCst),
        0,
        "every byte arrived intact"
    );
    let gap = max_gap.load(Ordering::SeqCst);
    assert!(
        gap < MAX_IN_FLIGHT,
        "the upstream lagged the client by {gap} bytes: the proxy is buffering the upload"
    );
}

#[tokio::test]
async fn a_256_mib_download_streams_through() {
    let env = Env::new();
    let consumed = Arc::new(AtomicU64::new(0));
    let max_gap = Arc::new(AtomicU64::new(0));
    let (c, g) = (consumed.clone(), max_gap.clone());
    let upstream = fakes::serve(listener().await, None, move |_req, _peer| {
        let (consumed, gap) = (c.clone(), g.clone());
        async move {
            let stream = futures_util::stream::iter(0..TOTAL / CHUNK as u64).then(move |i| {
                let (consumed, gap) = (consumed.clone(), gap.clone());
                async move {
                    before_chunk(i, &consumed, &gap).await;
                    Ok::<_, credproxy::body::BoxError>(hyper::body::Frame::data(chunk(i)))
                }
            });
            let mut r = http::Response::new(credproxy::body::stream(
                http_body_util::StreamBody::new(stream),
            ));
            r.headers_mut().insert("content-length", TOTAL.into());
            r
        }
    });
    let proxy = env.proxy(&route_yaml(upstream.addr)).await;
    let r = get(&client(proxy.addr), "http://bulk.example.com/download").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], TOTAL.to_string().as_str());
    let mut stream = r.bytes_stream();
    let mut bad = 0u64;
    while let Some(data) = stream.next().await {
        let data = data.unwrap();
        bad += wrong_bytes(consumed.load(Ordering::SeqCst), &data);
        consumed.fetch_add(data.len() as u64, Ordering::SeqCst);
    }
    assert_eq!(consumed.load(Ordering::SeqCst), TOTAL);
    assert_eq!(bad, 0, "every byte arrived intact");
    let gap = max_gap.load(Ordering::SeqCst);
    assert!(
        gap < MAX_IN_FLIGHT,
        "the client lagged the upstream by {gap} bytes: the proxy is buffering the download"
    );
}

/// `upstream.response_timeout` is how long the upstream may take to answer, and it cannot answer
/// before it has the body: an upload that takes longer than the timeout passes, one that stops
/// for longer than it gets a 504 that says so.
#[tokio::test]
async fn a_slow_upload_outlasts_the_response_timeout_and_a_stalled_one_is_cut() {
    let env = Env::new();
    let upstream = fakes::serve(listener().await, None, |req, _peer| async move {
        let n = match req.into_body().collect().await {
            Ok(b) => b.to_bytes().len(),
            Err(_) => 0,
        };
        fakes::respond(http::StatusCode::OK, "text/plain", format!("stored {n}"))
    });
    let yaml = format!("  response_timeout: 1s\n{}", route_yaml(upstream.addr));
    let proxy = env.proxy(&yaml).await;

    // Eight pieces 300 ms apart: 2.1 s in all, with no gap as long as the timeout.
    let body = futures_util::stream::iter(0..8u8).then(|i| async move {
        if i > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        Ok::<_, std::io::Error>(Bytes::from(vec![i; 1000]))
    });
    let r = upload(proxy.addr, body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "stored 8000");

    // 10 of 1,000 promised bytes, then nothing.
    let answer = raw(
        proxy.addr,
        b"POST http://bulk.example.com/upload HTTP/1.1\r\nHost: bulk.example.com\r\nContent-Length: 1000\r\n\r\n0123456789",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("\"error\":\"upload_stalled\""), "{answer}");
    assert!(
        answer.contains("made no progress for 1s") && answer.contains("bulk.example.com"),
        "{answer}"
    );
}

/// Trailer fields (a checksum after a streamed body, say) reach a client that accepts them.
#[tokio::test]
async fn response_trailers_pass_through() {
    let env = Env::new();
    let upstream = fakes::serve(listener().await, None, |_req, _peer| async move {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("c0ffee"));
        let frames = futures_util::stream::iter([
            Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(b"payload"))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ]);
        let mut r = http::Response::new(credproxy::body::stream(http_body_util::StreamBody::new(
            frames,
        )));
        r.headers_mut()
            .insert("trailer", http::HeaderValue::from_static("x-checksum"));
        r
    });
    let proxy = env.proxy(&route_yaml(upstream.addr)).await;
    // Read until the proxy closes (`Connection: close`): the trailers come after the last chunk.
    let answer = raw(
        proxy.addr,
        b"GET http://bulk.example.com/t HTTP/1.1\r\nHost: bulk.example.com\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("payload"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nx-checksum: c0ffee\r\n"),
        "the trailer reached the client: {answer}"
    );
}

/// A client that breaks its upload off is the client's failure: the request is counted and
/// logged as a 400 `client_body`, not as an upstream failure (a 5xx someone would be paged for).
#[tokio::test]
async fn an_upload_the_client_breaks_off_counts_as_a_client_error() {
    use tokio::io::AsyncWriteExt;
    let env = Env::new();
    let upstream = fakes::serve(listener().await, None, |req, _peer| async move {
        let stored = req.into_body().collect().await.is_ok();
        fakes::respond(http::StatusCode::OK, "text/plain", format!("{stored}"))
    });
    let proxy = env.proxy(&route_yaml(upstream.addr)).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST http://bulk.example.com/upload HTTP/1.1\r\nHost: bulk.example.com\r\nContent-Length: 100000\r\n\r\n0123456789")
        .await
        .unwrap();
    // Once the upload has reached the upstream, the client goes away.
    for _ in 0..250 {
        if !upstream.requests().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.requests().len(), 1);
    drop(s);

    let count = |status: &str| {
        let labels = credproxy::metrics::RequestLabels {
            route: "bulk.example.com".into(),
            provider: "p".into(),
            status: status.into(),
        };
        proxy.state().metrics.requests.get_or_create(&labels).get()
    };
    for _ in 0..250 {
        if count("4xx") + count("5xx") > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!((count("4xx"), count("5xx")), (1, 0));
}
