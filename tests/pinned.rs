//! Pinned upstream connections: a keep-alive client connection gets an HTTP/1.1 upstream
//! connection of its own from its second request on (`upstream.pin_connections`), or from its
//! first when a spare is waiting, and what goes over it is the same request the pool would send.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use credproxy::fakes::issuer::Issuer;
use credproxy::fakes::{echo, oauth, serve_with_issuer, twotcloud};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The test TLS server config, offering only HTTP/1.1 (as many APIs do).
fn http1_only(env: &Env) -> Arc<rustls::ServerConfig> {
    let mut config = (*env.tls).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn echo_yaml(fake: SocketAddr, extra_upstream: &str) -> String {
    format!(
        "{extra_upstream}providers:
  p:
    headers: {{x-api-key: injected-value}}
routes:
  - {{host: api.example.com, provider: p, connect_to: '{fake}'}}
"
    )
}

fn peers(fake: &credproxy::fakes::FakeServer) -> Vec<SocketAddr> {
    fake.requests().iter().map(|r| r.peer).collect()
}

#[tokio::test]
async fn a_keep_alive_client_gets_its_own_upstream_connection_from_its_second_request() {
    let env = Env::new();
    let fake = echo::start(listener().await, Some(http1_only(&env)));
    let proxy = env.proxy(&echo_yaml(fake.addr, "")).await;

    let first = client(proxy.addr);
    let mut echoes = Vec::new();
    for _ in 0..4 {
        echoes.push(echoed(get(&first, "http://api.example.com/v1/__echo?n=1").await).await);
    }
    let p = peers(&fake);
    assert_eq!(p.len(), 4);
    // The first request goes through the shared pool; the rest share one pinned connection.
    assert_ne!(p[0], p[1], "{p:?}");
    assert!(p[1..].iter().all(|x| *x == p[1]), "{p:?}");

    // Pooled or pinned, the upstream sees the same request: origin form, Host, credentials.
    for (echo, seen) in echoes.iter().zip(fake.requests()) {
        assert_eq!(echo["version"], "HTTP/1.1");
        assert_eq!(echo["authority"], "api.example.com");
        assert_eq!(echo["uri"], "/v1/__echo?n=1");
        assert_eq!(header_values(echo, "host"), ["api.example.com"]);
        assert_eq!(header_values(echo, "x-api-key"), ["injected-value"]);
        assert!(seen.uri.authority().is_none(), "{:?}", seen.uri);
    }

    // Another client connection starts on the pool's connection (still open and idle there),
    // then pins one of its own.
    let second = client(proxy.addr);
    for _ in 0..2 {
        echoed(get(&second, "http://api.example.com/v1/__echo").await).await;
    }
    let p = peers(&fake);
    assert_eq!(
        p[4], p[0],
        "the pool's connection serves first requests: {p:?}"
    );
    assert!(p[5] != p[0] && p[5] != p[1], "{p:?}");
}

#[tokio::test]
async fn a_keep_alive_client_pins_again_after_a_reload() {
    let env = Env::new();
    let fake = echo::start(listener().await, Some(http1_only(&env)));
    let proxy = env.proxy(&echo_yaml(fake.addr, "")).await;
    let c = client(proxy.addr);
    for _ in 0..3 {
        echoed(get(&c, "http://api.example.com/__echo").await).await;
    }
    proxy.reload().await.unwrap();
    for _ in 0..3 {
        echoed(get(&c, "http://api.example.com/__echo").await).await;
    }
    let p = peers(&fake);
    assert_eq!(p.len(), 6);
    // Before: the pool, then a pinned connection. After the reload (new clients, new pools):
    // the new pool, then a new pinned connection, not the pool for ever.
    assert!(p[1] == p[2] && p[0] != p[1], "{p:?}");
    assert!(p[3] != p[4] && p[4] == p[5], "{p:?}");
    assert!(p[4] != p[1], "the old pinned connection was let go: {p:?}");
}

#[tokio::test]
async fn a_new_client_connection_starts_on_a_spare_over_https() {
    let env = Env::new();
    let fake = echo::start(listener().await, Some(http1_only(&env)));
    let proxy = env.proxy(&echo_yaml(fake.addr, "")).await;
    for _ in 0..2 {
        let c = client(proxy.addr);
        for _ in 0..2 {
            echoed(get(&c, "http://api.example.com/__echo").await).await;
        }
        drop(c);
        // Let the proxy see the client connection close.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let p = peers(&fake);
    assert_eq!(p.len(), 4);
    // The first client connection: the pool, then its own connection (HTTP/1.1 learnt). The
    // second starts on that one, left as a spare, instead of the pool.
    assert_ne!(p[0], p[1], "{p:?}");
    assert!(p[1..].iter().all(|x| *x == p[1]), "{p:?}");
}

#[tokio::test]
async fn pin_connections_false_keeps_every_request_on_the_pool() {
    let env = Env::new();
    let fake = echo::start(listener().await, Some(http1_only(&env)));
    let proxy = env
        .proxy(&echo_yaml(fake.addr, "  pin_connections: false\n"))
        .await;
    let c = client(proxy.addr);
    for _ in 0..4 {
        echoed(get(&c, "http://api.example.com/__echo").await).await;
    }
    let p = peers(&fake);
    assert_eq!(p.len(), 4);
    assert!(p.iter().all(|x| *x == p[0]), "{p:?}");
}

#[tokio::test]
async fn a_403_on_a_pinned_connection_still_names_the_source_address() {
    let env = Env::new();
    let key = twotcloud::Key {
        bound_ip: Some("127.0.0.2".parse().unwrap()),
        ..billing_key("bound-key")
    };
    let fake = twotcloud::start(listener().await, Some(http1_only(&env)), vec![key]);
    let yaml = format!(
        "providers:
  billing:
    basic: {{username: '100234', password: bound-key}}
routes:
  - {{host: api.cloudnet.services, provider: billing, connect_to: '{}', ip_bound: true}}
",
        fake.addr
    );
    let proxy = env.proxy(&yaml).await;
    let c = client(proxy.addr);
    for _ in 0..2 {
        let r = get(&c, "http://api.cloudnet.services/v3/invoices").await;
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["x-credproxy-source-address"], "127.0.0.1");
    }
    let p = peers(&fake);
    assert_ne!(
        p[0], p[1],
        "the second request should go over the pinned connection"
    );
}

#[tokio::test]
async fn a_401_on_a_pinned_connection_refreshes_the_token_and_retries_once() {
    let env = Env::new();
    let issuer = Issuer::new(std::time::Duration::from_secs(3600));
    let settings = oauth::Settings {
        client_id: "cid".into(),
        client_secret: "cs".into(),
    };
    let fake = serve_with_issuer(
        listener().await,
        Some(http1_only(&env)),
        settings,
        issuer.clone(),
        oauth::handle,
    );
    let proxy = env.proxy(&connexa_yaml(fake.addr)).await;
    let c = client(proxy.addr);
    let url = "http://acme.api.openvpn.com/api/v1/networks";
    for _ in 0..2 {
        assert_eq!(get(&c, url).await.status(), 200);
    }
    // The token is revoked: the next request, on the pinned connection, gets a 401 upstream.
    issuer.revoke_all();
    for _ in 0..2 {
        let r = get(&c, url).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("x-credproxy-retry").is_none());
    }
    assert_eq!(issuer.token_requests(), 2);
    let tokens = proxy.tokens("connexa").unwrap();
    assert_eq!(tokens.stats.retries_after_401.load(Ordering::Relaxed), 1);
    let api: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.uri.path() == "/api/v1/networks")
        .collect();
    assert_eq!(api.len(), 5, "four requests and one retry");
    assert_ne!(
        api[0].peer, api[1].peer,
        "the second request is on the pinned connection"
    );
    assert!(
        api[2..].iter().all(|r| r.peer == api[1].peer),
        "the refused attempt, the retry and the next request stay on it"
    );
}

/// A proxy routing api.example.com to the plain-HTTP `upstream` (`upstream_settings`: lines of
/// the `upstream:` section, or ""), and a client that uses it.
async fn proxy_to(
    env: &Env,
    upstream_settings: &str,
    upstream: SocketAddr,
) -> (credproxy::Running, reqwest::Client) {
    let proxy = env
        .proxy(&format!("{upstream_settings}{}", http_route_yaml(upstream)))
        .await;
    let c = client(proxy.addr);
    (proxy, c)
}

#[tokio::test]
async fn a_pinned_connection_the_upstream_closed_is_replaced() {
    let env = Env::new();
    let (upstream, accepted) = fake_upstream(usize::MAX, 0, true).await;
    let (_proxy, c) = proxy_to(&env, "", upstream).await;
    for i in 0..5 {
        let r = get(&c, "http://api.example.com/x").await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
        // Let the upstream's close arrive before the next request, as after an idle period.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn an_upstream_gone_when_pinning_gets_a_502_naming_host_and_cause() {
    let env = Env::new();
    let (upstream, accepted) = fake_upstream(1, 0, true).await;
    let (_proxy, c) = proxy_to(&env, "", upstream).await;
    let r = get(&c, "http://api.example.com/x").await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    // The second request dials its pinned connection, and nothing listens any more.
    let r = get(&c, "http://api.example.com/x").await;
    assert_refused(&r, 502, "upstream_unreachable");
    let body = r.text().await.unwrap();
    assert!(body.contains("api.example.com"), "{body}");
    assert!(body.contains("connection refused"), "{body}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A plain-HTTP upstream that wants `x-k: v` (401 without). `/slow` answers after 2 s; `/stream`
/// sends half its body, waits `stream_ms`, then the rest. With `one_each`, it closes each
/// connection after one answer without saying so (as a server does when its keep-alive timer
/// fires); else it keeps them. It accepts `accept` connections, then stops listening (the
/// accepted ones are still served). Returns its address and the number of connections accepted.
async fn fake_upstream(
    accept: usize,
    stream_ms: u64,
    one_each: bool,
) -> (SocketAddr, Arc<AtomicUsize>) {
    fake_upstream_over(None, accept, stream_ms, one_each).await
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// `fake_upstream`, over TLS with `tls`.
async fn fake_upstream_over(
    tls: Option<Arc<rustls::ServerConfig>>,
    accept: usize,
    stream_ms: u64,
    one_each: bool,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        for _ in 0..accept {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut s: Box<dyn Stream> = match tls {
                    Some(config) => match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                    {
                        Ok(t) => Box::new(t),
                        Err(_) => return,
                    },
                    None => Box::new(tcp),
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let written = if !head.contains("x-k: v") {
                        s.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                            .await
                    } else if path == "/stream" {
                        let first = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
                            .await;
                        tokio::time::sleep(std::time::Duration::from_millis(stream_ms)).await;
                        first.and(s.write_all(b"cd").await)
                    } else {
                        if path == "/slow" {
                            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                        }
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                    };
                    if written.is_err() || one_each {
                        return;
                    }
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn when_dialling_fails_the_pool_carries_on() {
    let env = Env::new();
    // One connection, then no more: the pool's stays usable, a pinned one cannot be opened.
    let (upstream, accepted) = fake_upstream_over(Some(http1_only(&env)), 1, 0, false).await;
    let proxy = env
        .proxy(
            &http_route_yaml(upstream).replace("upstream_scheme: http", "upstream_scheme: https"),
        )
        .await;
    let c = client(proxy.addr);
    for i in 0..4 {
        let r = get(&c, "http://api.example.com/x").await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_cut_by_response_timeout_does_not_stop_pinning() {
    let env = Env::new();
    let (upstream, accepted) = fake_upstream(usize::MAX, 0, false).await;
    let (_proxy, c) = proxy_to(&env, "  response_timeout: 500ms\n", upstream).await;
    assert_eq!(get(&c, "http://api.example.com/x").await.status(), 200);
    // On the newly pinned connection, and cut at 500 ms.
    assert_refused(
        &get(&c, "http://api.example.com/slow").await,
        504,
        "upstream_timeout",
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // The pool, then a new pinned connection that the rest share.
    for _ in 0..5 {
        assert_eq!(get(&c, "http://api.example.com/x").await.status(), 200);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_long_response_body_does_not_count_as_idle_time() {
    let env = Env::new();
    let (upstream, accepted) = fake_upstream(usize::MAX, 1500, false).await;
    let (_proxy, c) = proxy_to(&env, "  pool_idle_timeout: 1s\n", upstream).await;
    for _ in 0..3 {
        let r = get(&c, "http://api.example.com/stream").await;
        assert_eq!(r.bytes().await.unwrap().as_ref(), b"abcd");
    }
    // The pool's connection and one pinned connection, though each body took 1.5 s.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// One request on a raw keep-alive client connection to the proxy; returns the status.
async fn raw_get(s: &mut tokio::net::TcpStream, host: &str) -> u16 {
    let req = format!("GET http://{host}/x HTTP/1.1\r\nHost: {host}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the proxy closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0usize);
            if body.len() >= len {
                return head.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
    }
}

#[tokio::test]
async fn a_client_connection_that_alternates_hosts_keeps_its_pinned_connection() {
    let env = Env::new();
    let (upstream, accepted) = fake_upstream(usize::MAX, 0, false).await;
    let yaml = http_route_yaml(upstream).replace(
        "routes:\n",
        &format!(
            "routes:\n  - {{host: other.example.com, provider: p, upstream_scheme: http, connect_to: '{upstream}'}}\n"
        ),
    );
    let proxy = env.proxy(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    for i in 0..12 {
        let host = if (i / 2) % 2 == 0 {
            "api.example.com"
        } else {
            "other.example.com"
        };
        assert_eq!(raw_get(&mut s, host).await, 200, "request {i}");
    }
    // api's pooled and pinned connections, and other's pooled one: nothing dialled again.
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_closed_client_connection_leaves_its_pinned_connection_to_the_next() {
    let env = Env::new();
    let (upstream, accepted) = fake_upstream(usize::MAX, 0, false).await;
    let proxy = env.proxy(&http_route_yaml(upstream)).await;
    for i in 0..5 {
        let c = client(proxy.addr);
        for _ in 0..2 {
            let r = get(&c, "http://api.example.com/x").await;
            assert_eq!(r.status(), 200, "client {i}");
            r.bytes().await.unwrap();
        }
        drop(c);
        // Let the proxy see the client connection close.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The pool's connection for the first client's first request, then one pinned connection,
    // handed down from each client connection to the next (from its first request on): no new
    // connection (or TIME_WAIT socket) per client.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn requests_inside_an_intercepted_tunnel_are_pinned_too() {
    for h2 in [false, true] {
        let env = Env::new();
        let fake = echo::start(listener().await, Some(http1_only(&env)));
        let proxy = env.proxy(&echo_yaml(fake.addr, "")).await;
        // HTTPS through CONNECT, over HTTP/1.1 or HTTP/2 inside the tunnel.
        let c = env.https_client(proxy.addr, vec![env.proxy_ca()], h2);
        for _ in 0..3 {
            let echo = echoed(get(&c, "https://api.example.com/__echo").await).await;
            assert_eq!(header_values(&echo, "x-api-key"), ["injected-value"]);
        }
        let p = peers(&fake);
        assert_eq!(p.len(), 3);
        assert_ne!(p[0], p[1], "h2 {h2}: {p:?}");
        assert_eq!(p[1], p[2], "h2 {h2}: {p:?}");
    }
}
