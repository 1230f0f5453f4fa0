//! Faults and limits: broken upstreams and clients, slowloris, too many connections, and many
//! idle connections. The proxy answers cleanly and keeps serving everyone else.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use credproxy::fakes;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn yaml(upstream: std::net::SocketAddr, extra: &str) -> String {
    format!("{extra}{}", http_route_yaml(upstream))
}

/// One request for `http://api.example.com/` on an open connection to the proxy.
const GET_ROOT: &[u8] = b"GET http://api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n";

/// Sends `GET_ROOT` on `s`; returns what the first read brings back (the answer's head).
async fn get_root_on(s: &mut TcpStream) -> String {
    s.write_all(GET_ROOT).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// An upstream that answers every request `200 ok`.
async fn ok_upstream() -> fakes::FakeServer {
    fakes::serve(listener().await, None, |_, _| async {
        fakes::respond(http::StatusCode::OK, "text/plain", "ok")
    })
}

/// A proxy with `limits` (a `limits: {…}` line) routing api.example.com to an `ok_upstream`.
async fn proxy_to_ok_upstream(env: &Env, limits: &str) -> (fakes::FakeServer, credproxy::Running) {
    let upstream = ok_upstream().await;
    let proxy = env.proxy(&yaml(upstream.addr, limits)).await;
    (upstream, proxy)
}

#[tokio::test]
async fn an_upstream_reset_mid_response_is_a_clean_error_and_the_proxy_keeps_serving() {
    let env = Env::new();
    let upstream = fakes::serve(listener().await, None, |req, _| async move {
        if req.uri().path() == "/broken" {
            use futures_util::StreamExt;
            // The head and a first chunk go out, then the upstream dies.
            let chunks = futures_util::stream::iter(0..2).then(|i| async move {
                if i == 0 {
                    Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
                        b"partial",
                    )))
                } else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Err::<_, credproxy::body::BoxError>("upstream died".into())
                }
            });
            let mut r = http::Response::new(credproxy::body::stream(
                http_body_util::StreamBody::new(chunks),
            ));
            r.headers_mut()
                .insert("content-length", "1000".parse().unwrap());
            r
        } else {
            fakes::respond(http::StatusCode::OK, "text/plain", "fine")
        }
    });
    let proxy = env.proxy(&yaml(upstream.addr, "")).await;
    let c = client(proxy.addr);
    let r = get(&c, "http://api.example.com/broken").await;
    assert_eq!(r.status(), 200, "the head had arrived");
    assert!(
        r.bytes().await.is_err(),
        "the client sees the body break, not a short success"
    );
    for _ in 0..3 {
        let r = get(&c, "http://api.example.com/ok").await;
        assert_eq!(r.text().await.unwrap(), "fine");
    }
}

#[tokio::test]
async fn a_client_gone_mid_upload_aborts_the_upstream_request_and_leaks_nothing() {
    let env = Env::new();
    let aborted = Arc::new(AtomicBool::new(false));
    let seen = aborted.clone();
    let upstream = fakes::serve(listener().await, None, move |req, _| {
        let seen = seen.clone();
        async move {
            use http_body_util::BodyExt;
            if req.into_body().collect().await.is_err() {
                seen.store(true, Ordering::SeqCst);
            }
            fakes::respond(http::StatusCode::OK, "text/plain", "stored")
        }
    });
    let proxy = env.proxy(&yaml(upstream.addr, "")).await;
    let metrics = proxy.state().metrics.clone();
    {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"POST http://api.example.com/upload HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 1000000\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[b'x'; 10_000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metrics.open_connections.get(), 1);
    } // gone
    for _ in 0..100 {
        if aborted.load(Ordering::SeqCst) && metrics.open_connections.get() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        aborted.load(Ordering::SeqCst),
        "the upstream saw its request body cut off"
    );
    assert_eq!(
        metrics.open_connections.get(),
        0,
        "the connection gauge is back to zero"
    );
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_by_the_header_timeout() {
    let env = Env::new();
    let (upstream, proxy) = proxy_to_ok_upstream(&env, "limits: {header_read_timeout: 1s}\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET http://api.example.com/ HTTP/1.1\r\nHost: api.exa")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    // Guard only: a proxy without the timeout would hold the connection forever.
    let read = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    let n = read.expect("the proxy closed the connection").unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn connections_over_the_limit_get_a_503_and_the_rest_keep_working() {
    let env = Env::new();
    let (_upstream, proxy) = proxy_to_ok_upstream(&env, "limits: {max_connections: 3}\n").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = raw(proxy.addr, GET_ROOT).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    // A held connection still works.
    assert!(get_root_on(&mut held[0]).await.starts_with("HTTP/1.1 200"));
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(&client(proxy.addr), "http://api.example.com/").await;
    assert_eq!(r.status(), 200);
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn five_thousand_idle_connections_with_bounded_memory() {
    let env = Env::new();
    let upstream = ok_upstream().await;
    let path = env.write_config(&yaml(upstream.addr, "limits: {header_read_timeout: 60s}\n"));
    let proxy = Binary::run(&path, &[]);
    let addr = proxy.addr;
    let before = rss_kib(proxy.child.id());
    let mut conns = Vec::with_capacity(5000);
    for _ in 0..5000 {
        conns.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with = rss_kib(proxy.child.id());
    // Still serving while they all sit there.
    let r = get(&client(addr), "http://api.example.com/").await;
    assert_eq!(r.status(), 200);
    drop(conns);
    drop(proxy);
    assert!(
        with < 200 * 1024,
        "RSS with 5,000 idle connections: {with} KiB (before: {before} KiB)"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_header_timeout() {
    let env = Env::new();
    let (_upstream, proxy) =
        proxy_to_ok_upstream(&env, "limits: {header_read_timeout: 2s}\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(get_root_on(&mut s).await.starts_with("HTTP/1.1 200"));
    // Half the timeout later the connection is still there for the next request.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(get_root_on(&mut s).await.starts_with("HTTP/1.1 200"));
    // Then silence on the kept-alive connection: it is closed, not held forever.
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the idle connection was closed: {read:?}"
    );
}

#[tokio::test]
async fn connect_tunnels_count_against_max_connections() {
    let env = Env::new();
    let (upstream, proxy) = proxy_to_ok_upstream(&env, "limits: {max_connections: 3}\n").await;
    let connect = format!(
        "CONNECT 127.0.0.1:{p} HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n",
        p = upstream.addr.port()
    );
    let mut tunnels = Vec::new();
    for i in 0..3i64 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(connect.as_bytes()).await.unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).to_string();
        // Each tunnel is its client connection, on that connection's one slot.
        assert!(answer.starts_with("HTTP/1.1 200"), "tunnel {i}: {answer}");
        open_connections_reach(&proxy, i + 1).await;
        tunnels.push(s);
    }
    // Three tunnels hold all three slots: a fourth connection is refused as it is accepted
    // (read without writing: the proxy reads nothing from it, and unread bytes would reset it).
    let mut fourth = TcpStream::connect(proxy.addr).await.unwrap();
    let answer = read_response(&mut fourth).await;
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("too_many_connections"),
        "{answer}"
    );
    // The tunnels work, and hold their slots until they close.
    for s in &mut tunnels {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(s).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert_eq!(proxy.state().metrics.open_connections.get(), 3);
    drop(tunnels);
    no_connection_left(&proxy).await;
}

/// Over HTTP/2 many tunnels share one client connection: each takes a slot of its own.
#[tokio::test]
async fn each_tunnel_of_an_http2_connection_takes_a_slot() {
    let env = Env::new();
    let (upstream, proxy) = proxy_to_ok_upstream(&env, "limits: {max_connections: 3}\n").await;
    let mut sender = h2_connection(proxy.addr).await;
    let mut tunnels = Vec::new();
    for i in 0..3i64 {
        let resp = h2_connect(&mut sender, &upstream.addr.to_string()).await;
        if i < 2 {
            assert_eq!(resp.status(), 200, "tunnel {i}");
            // The connection and its tunnels so far.
            open_connections_reach(&proxy, i + 2).await;
            tunnels.push(resp);
        } else {
            assert_eq!(resp.status(), 503);
            assert_eq!(resp.headers()["x-credproxy-error"], "too_many_connections");
        }
    }
    drop(tunnels);
    drop(sender);
    no_connection_left(&proxy).await;
}

#[tokio::test]
async fn a_client_that_never_sends_a_byte_is_closed_after_the_header_timeout() {
    let env = Env::new();
    let (upstream, proxy) = proxy_to_ok_upstream(&env, "limits: {header_read_timeout: 1s}\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(read_until_closed(&mut s).await.is_empty());
    assert!(upstream.requests().is_empty());
    // Its `max_connections` slot and its place in the gauge are given back.
    no_connection_left(&proxy).await;
}

/// The HTTP/2 frames in `bytes` (after the server's own preface), as (type, stream id).
fn h2_frames(bytes: &[u8]) -> Vec<(u8, u32)> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        frames.push((rest[3], stream));
        rest = &rest[(9 + len).min(rest.len())..];
    }
    frames
}

#[tokio::test]
async fn an_idle_http2_connection_gets_a_goaway_after_the_header_timeout() {
    let env = Env::new();
    let (_upstream, proxy) =
        proxy_to_ok_upstream(&env, "limits: {header_read_timeout: 1s}\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // The HTTP/2 preface (prior knowledge) and an empty SETTINGS frame, then silence.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let frames = h2_frames(&read_until_closed(&mut s).await);
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    assert_eq!(frames.first(), Some(&(SETTINGS, 0)), "{frames:?}");
    assert!(
        frames.contains(&(GOAWAY, 0)),
        "closed with a GOAWAY: {frames:?}"
    );
}

#[tokio::test]
async fn a_tunnel_whose_client_never_starts_tls_is_closed_after_the_header_timeout() {
    let env = Env::new();
    let (_upstream, proxy) =
        proxy_to_ok_upstream(&env, "limits: {header_read_timeout: 1s}\n").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut s).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    no_connection_left(&proxy).await;
}

#[tokio::test]
async fn a_response_longer_than_the_header_timeout_is_not_cut_and_the_connection_stays() {
    let env = Env::new();
    // 12 chunks, 250 ms apart: the answer takes three times `header_read_timeout`.
    let upstream = fakes::serve(listener().await, None, |req, _| async move {
        if req.uri().path() != "/slow" {
            return fakes::respond(http::StatusCode::OK, "text/plain", "ok");
        }
        use futures_util::StreamExt;
        let chunks = futures_util::stream::iter(0..12).then(|_| async {
            tokio::time::sleep(Duration::from_millis(250)).await;
            Ok::<_, credproxy::body::BoxError>(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"0123456789",
            )))
        });
        http::Response::new(credproxy::body::stream(http_body_util::StreamBody::new(
            chunks,
        )))
    });
    let proxy = env
        .proxy(&yaml(upstream.addr, "limits: {header_read_timeout: 1s}\n"))
        .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET http://api.example.com/slow HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    // Chunked: the answer ends with the zero-length chunk.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"0\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf))
            .await
            .expect("the answer keeps coming")
            .unwrap();
        assert!(n > 0, "cut after {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(text.matches("0123456789").count(), 12, "{text}");
    // The connection is still good for the next request.
    assert!(get_root_on(&mut s).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn an_http2_connect_tunnel_in_use_outlives_the_header_timeout() {
    let env = Env::new();
    let (upstream, proxy) = proxy_to_ok_upstream(&env, "limits: {header_read_timeout: 1s}\n").await;
    let mut send = h2_connection(proxy.addr).await;
    // A blind tunnel (the upstream is no route's) on a stream of the HTTP/2 connection: no
    // request of that connection is running while the tunnel carries bytes.
    let res = h2_connect(&mut send, &upstream.addr.to_string()).await;
    assert_eq!(res.status(), 200);
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(res).await.unwrap());
    // Requests through the tunnel for 4.5 s, four and a half times the timeout.
    for i in 0..15 {
        io.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("the tunnel was cut after {i} requests: {e}"));
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf))
            .await
            .expect("an answer through the tunnel")
            .unwrap_or(0);
        assert!(n > 0, "the tunnel was cut after {i} requests");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
