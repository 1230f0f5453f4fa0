//! Requests that switch protocols (WebSocket): the handshake gets the route's credentials, and
//! after the upstream's 101 the two connections are joined both ways, on the client connection's
//! own slot; no other protocol (h2c above all) is passed on; an idle switched connection or blind
//! tunnel is closed after `limits.tunnel_idle_timeout`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A WebSocket handshake for api.example.com, as a browser or Postman sends it (the key and
/// accept values are RFC 6455's example).
const HANDSHAKE: &str = "GET http://api.example.com/socket?room=1 HTTP/1.1\r\n\
Host: api.example.com\r\n\
Connection: keep-alive, Upgrade\r\n\
Upgrade: websocket\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

/// A plain-TCP upstream that keeps each request head it reads and answers `answer`; after a
/// 101 it sends back every byte it gets, upper-cased (so the client can tell the upstream's
/// answer from its own bytes).
async fn switching_upstream(answer: &'static str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    upstream_with(None, move |_| answer).await
}

/// As `switching_upstream`, behind TLS when `tls` is given, answering what `answer` says for
/// each request head.
async fn upstream_with<F>(
    tls: Option<Arc<rustls::ServerConfig>>,
    answer: F,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>)
where
    F: Fn(&str) -> &'static str + Send + Sync + 'static,
{
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (seen, answer, tls) = (seen.clone(), answer.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => serve_switching(s, &*answer, &seen).await,
                    Some(tls) => {
                        if let Ok(s) = tokio_rustls::TlsAcceptor::from(tls).accept(s).await {
                            serve_switching(s, &*answer, &seen).await;
                        }
                    }
                }
            });
        }
    });
    (addr, heads)
}

async fn serve_switching<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    answer: &(dyn Fn(&str) -> &'static str + Send + Sync),
    seen: &Mutex<Vec<String>>,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let answer = answer(&head);
    seen.lock().unwrap().push(head.to_ascii_lowercase());
    if s.write_all(answer.as_bytes()).await.is_err() || !answer.starts_with("HTTP/1.1 101") {
        return;
    }
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 || s.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
            return;
        }
        let _ = s.flush().await;
    }
}

const SWITCH: &str = "HTTP/1.1 101 Switching Protocols\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

/// Reads a response head (up to the blank line) from `s`, lower-cased.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("a response head within 10 s")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed in the head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// Sends `handshake` on a new connection to `addr`: the connection once the proxy answered 101,
/// and that answer's head (lower-cased).
async fn switched(addr: SocketAddr, handshake: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(handshake.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    (s, head)
}

/// Writes `msg` and reads as many bytes back.
async fn round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    back
}

/// A TLS client that trusts the proxy's CA (for intercepted tunnels).
fn client_tls(env: &Env) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(credproxy::outbound::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(env.proxy_roots())
        .with_no_client_auth()
}

#[tokio::test]
async fn a_websocket_handshake_gets_credentials_and_then_carries_bytes_both_ways() {
    let env = Env::new();
    let (upstream, heads) = switching_upstream(SWITCH).await;
    // One slot: the switched connection keeps the one its client connection had.
    let yaml = format!(
        "limits: {{max_connections: 1}}\n{}",
        http_route_yaml(upstream)
    );
    let proxy = env.proxy(&yaml).await;

    let (mut s, head) = switched(proxy.addr, HANDSHAKE).await;
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(
        head.contains("\r\nsec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{head}"
    );
    // Both ways, more than once: the upstream's upper-cased echo.
    assert_eq!(round_trip(&mut s, b"hello").await, b"HELLO");
    assert_eq!(round_trip(&mut s, b"again").await, b"AGAIN");

    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    let up = &heads[0];
    assert!(up.starts_with("get /socket?room=1 http/1.1\r\n"), "{up}");
    assert!(up.contains("\r\nx-k: v\r\n"), "credentials injected: {up}");
    assert!(up.contains("\r\nconnection: upgrade\r\n"), "{up}");
    assert!(up.contains("\r\nupgrade: websocket\r\n"), "{up}");
    assert!(
        up.contains("\r\nsec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n"),
        "{up}"
    );
    assert!(!up.contains("keep-alive"), "{up}");

    // The joined connection holds the slot, and gives it back when the client closes.
    open_connections_reach(&proxy, 1).await;
    let refused = raw(
        proxy.addr,
        b"GET http://api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    )
    .await;
    assert!(refused.contains("too_many_connections"), "{refused}");
    drop(s);
    no_connection_left(&proxy).await;
}

#[tokio::test]
async fn a_websocket_inside_an_intercepted_https_tunnel_gets_credentials() {
    let env = Env::new();
    // The upstream is TLS with the test CA's leaf, as routed hosts are.
    let (upstream, heads) = upstream_with(Some(env.tls.clone()), |_| SWITCH).await;
    // One slot: the tunnel is its client connection, and the WebSocket inside it too.
    let yaml = format!(
        "limits: {{max_connections: 1}}
providers:
  p:
    headers: {{x-api-key: injected-value}}
routes:
  - {{host: api.example.com, provider: p, connect_to: '{upstream}'}}
"
    );
    let proxy = env.proxy(&yaml).await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n")
        .await
        .unwrap();
    let connected = read_head(&mut tcp).await;
    assert!(connected.starts_with("http/1.1 200"), "{connected}");
    let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&env)))
        .connect(name, tcp)
        .await
        .unwrap();
    let handshake = HANDSHAKE.replace("GET http://api.example.com/", "GET /");
    tls.write_all(handshake.as_bytes()).await.unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(round_trip(&mut tls, b"wss").await, b"WSS");
    let up = heads.lock().unwrap()[0].clone();
    assert!(up.contains("\r\nx-api-key: injected-value\r\n"), "{up}");
    assert!(up.contains("\r\nupgrade: websocket\r\n"), "{up}");
    open_connections_reach(&proxy, 1).await;
    drop(tls);
    no_connection_left(&proxy).await;
}

#[tokio::test]
async fn a_refused_handshake_is_relayed_as_an_ordinary_answer() {
    let env = Env::new();
    let (upstream, heads) = switching_upstream(
        "HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nConnection: close\r\n\r\nno way",
    )
    .await;
    let proxy = env.proxy(&http_route_yaml(upstream)).await;
    let answer = raw(proxy.addr, HANDSHAKE.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.ends_with("no way"), "{answer}");
    assert_eq!(heads.lock().unwrap().len(), 1);
    // The slot taken for the switch was given back with the answer.
    no_connection_left(&proxy).await;
}

#[tokio::test]
async fn no_offer_but_websocket_is_passed_on_and_the_request_is_answered_in_http1() {
    let env = Env::new();
    let (upstream, heads) = switching_upstream(SWITCH).await;
    let fake = credproxy::fakes::echo::start(listener().await, None);
    let proxy = env.proxy(&http_route_yaml(fake.addr)).await;
    // What `curl --http2 http://…` sends; a value that is not text; another protocol.
    for upgrade in [&b"h2c"[..], b"h2c, \xff", b"TLS/1.2"] {
        let mut request =
            b"GET http://api.example.com/__echo HTTP/1.1\r\nHost: api.example.com\r\n\
Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nUpgrade: "
                .to_vec();
        request.extend_from_slice(upgrade);
        request.extend_from_slice(b"\r\n\r\n");
        let answer = raw(proxy.addr, &request).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        let echo: serde_json::Value = serde_json::from_str(body).unwrap();
        let headers = echo["headers"].as_object().unwrap();
        for gone in ["upgrade", "http2-settings", "connection"] {
            assert!(!headers.contains_key(gone), "{gone} went upstream: {echo}");
        }
        assert_eq!(header_values(&echo, "x-k"), ["v"]);
    }

    // WebSocket among other offers: only WebSocket goes on.
    let proxy = env.proxy(&http_route_yaml(upstream)).await;
    let offers = HANDSHAKE.replace("Upgrade: websocket", "Upgrade: h2c, WebSocket");
    let _switched = switched(proxy.addr, &offers).await;
    let up = heads.lock().unwrap()[0].clone();
    assert!(up.contains("\r\nupgrade: websocket\r\n"), "{up}");
}

#[tokio::test]
async fn idle_switched_connections_and_blind_tunnels_are_closed() {
    let env = Env::new();
    let (upstream, _heads) = switching_upstream(SWITCH).await;
    let yaml = format!(
        "limits: {{tunnel_idle_timeout: 1s}}\n{}",
        http_route_yaml(upstream)
    );
    let proxy = env.proxy(&yaml).await;

    let (mut ws, _) = switched(proxy.addr, HANDSHAKE).await;
    assert_eq!(round_trip(&mut ws, b"x").await, b"X");
    relays_reach(&proxy, [(1, 0), (0, 0)]).await;

    // A blind tunnel (the host has no route) to the same upstream.
    let mut tunnel = TcpStream::connect(proxy.addr).await.unwrap();
    tunnel
        .write_all(format!("CONNECT {upstream} HTTP/1.1\r\nHost: {upstream}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut tunnel).await.starts_with("http/1.1 200"));
    // The tunnel's relay starts once the client has its 200.
    relays_reach(&proxy, [(1, 0), (1, 0)]).await;

    // Then both stay quiet: the proxy closes them (or read_until_closed fails the test).
    assert!(read_until_closed(&mut ws).await.is_empty());
    assert!(read_until_closed(&mut tunnel).await.is_empty());
    no_connection_left(&proxy).await;
    relays_reach(&proxy, [(0, 1), (0, 1)]).await;
}

/// Waits until the relay metrics read `expected`: (open, closed for idling) of WebSockets, then
/// of blind tunnels.
async fn relays_reach(proxy: &credproxy::Running, expected: [(i64, u64); 2]) {
    let state = proxy.state();
    let relays = &state.metrics.relays;
    let counts =
        || [&relays.websocket, &relays.tunnel].map(|r| (r.open.get(), r.idle_closed.get()));
    for _ in 0..100 {
        if counts() == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(counts(), expected, "websocket, tunnel: (open, idle closed)");
}

/// An intercepted tunnel carried by an HTTP/2 connection (a CONNECT stream): a WebSocket inside
/// it outlives the tunnel's HTTP/1.1 connection, and the client's HTTP/2 connection must count
/// as busy for as long, not idle after `header_read_timeout`.
#[tokio::test]
async fn a_websocket_in_a_tunnel_over_http2_outlives_the_header_timeout() {
    let env = Env::new();
    let (upstream, _heads) = upstream_with(Some(env.tls.clone()), |_| SWITCH).await;
    let yaml = format!(
        "limits: {{header_read_timeout: 1s}}
providers:
  p:
    headers: {{x-api-key: injected-value}}
routes:
  - {{host: api.example.com, provider: p, connect_to: '{upstream}'}}
"
    );
    let proxy = env.proxy(&yaml).await;
    let mut sender = h2_connection(proxy.addr).await;
    let mut resp = h2_connect(&mut sender, "api.example.com:443").await;
    assert_eq!(resp.status(), 200);
    let tunnel = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&env)))
        .connect(
            rustls::pki_types::ServerName::try_from("api.example.com").unwrap(),
            hyper_util::rt::TokioIo::new(tunnel),
        )
        .await
        .unwrap();
    let handshake = HANDSHAKE.replace("GET http://api.example.com/", "GET /");
    tls.write_all(handshake.as_bytes()).await.unwrap();
    assert!(read_head(&mut tls).await.starts_with("http/1.1 101"));
    assert_eq!(round_trip(&mut tls, b"one").await, b"ONE");
    // Three header timeouts without a byte; the WebSocket is still there.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(round_trip(&mut tls, b"two").await, b"TWO");
}

const UNAUTHORIZED: &str = "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";

/// The bearer token of a request head.
fn bearer(head: &str) -> Option<&str> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        let value = value.trim();
        (name.eq_ignore_ascii_case("authorization") && value.len() > 7)
            .then(|| value.split_at(7))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer "))
            .map(|(_, token)| token)
    })
}

#[tokio::test]
async fn a_handshake_refused_for_a_stale_token_is_retried_once_with_a_fresh_one() {
    let env = Env::new();
    let (fake, issuer) = env.oauth_fake("cid", "cs").await;
    let check = issuer.clone();
    // The API: 101 for a live token of its host, 401 for any other.
    let (api, heads) = upstream_with(Some(env.tls.clone()), move |head| match bearer(head) {
        Some(token) if check.check(token, "acme.api.openvpn.com") => SWITCH,
        _ => UNAUTHORIZED,
    })
    .await;
    let yaml = connexa_yaml_apart(fake.addr, api);
    let proxy = env.proxy(&yaml).await;
    let handshake = HANDSHAKE.replace("api.example.com", "acme.api.openvpn.com");

    let (mut first, _) = switched(proxy.addr, &handshake).await;
    assert_eq!(issuer.token_requests(), 1);

    // The provider revokes the token the proxy holds: the next handshake is refused with it,
    // and sent once more with a fresh token.
    issuer.revoke_all();
    let (mut second, _) = switched(proxy.addr, &handshake).await;
    assert_eq!(round_trip(&mut second, b"fresh").await, b"FRESH");
    assert_eq!(issuer.token_requests(), 2, "one fresh token, no more");
    let heads = heads.lock().unwrap().clone();
    assert_eq!(
        heads.len(),
        3,
        "the first handshake, the refused one, its retry"
    );
    assert_eq!(
        heads[0], heads[1],
        "the refused one carried the cached token"
    );
    assert_ne!(heads[1], heads[2], "the retry carried another");
    for kept in [
        "\r\nupgrade: websocket\r\n",
        "\r\nsec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n",
        "\r\nsec-websocket-version: 13\r\n",
    ] {
        assert!(heads[2].contains(kept), "{}", heads[2]);
    }

    // Both switched connections still carry bytes.
    assert_eq!(round_trip(&mut first, b"old").await, b"OLD");
}

#[tokio::test]
async fn websockets_go_through_the_upstream_proxy_over_https_and_plain_http() {
    let env = Env::new();
    let corp = credproxy::fakes::proxy::start(listener().await, basic("svc", "pw"));
    let (tls_api, tls_heads) = upstream_with(Some(env.tls.clone()), |_| SWITCH).await;
    let (plain_api, plain_heads) = switching_upstream(SWITCH).await;
    let egress = format!(
        "egress: {{proxy: 'http://{}', proxy_username: svc, proxy_password: pw}}",
        corp.addr
    );
    let yaml = format!(
        "providers:
  p:
    headers: {{x-k: v}}
routes:
  - {{host: api.example.com, provider: p, connect_to: '{tls_api}', {egress}}}
  - {{host: '{plain_api}', provider: p, upstream_scheme: http, {egress}}}
"
    );
    // Plain HTTP goes to the upstream proxy by name (absolute form), so by the address here.
    let plain_host = plain_api.to_string();
    let proxy = env.proxy(&yaml).await;

    for (host, heads) in [
        ("api.example.com", &tls_heads),
        (plain_host.as_str(), &plain_heads),
    ] {
        let (mut s, _) = switched(proxy.addr, &HANDSHAKE.replace("api.example.com", host)).await;
        assert_eq!(round_trip(&mut s, b"via corp").await, b"VIA CORP");
        let up = heads.lock().unwrap()[0].clone();
        assert!(up.starts_with("get /socket?room=1 http/1.1\r\n"), "{up}");
        assert!(up.contains("\r\nx-k: v\r\n"), "{up}");
        assert!(up.contains("\r\nupgrade: websocket\r\n"), "{up}");
        assert!(!up.contains("proxy-authorization"), "{up}");
    }
    let seen = corp.seen();
    assert!(seen.iter().all(|s| s.authorized), "{seen:?}");
    assert!(
        seen.iter()
            .any(|s| s.method == http::Method::CONNECT
                && s.target.contains(&tls_api.port().to_string())),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|s| s.method == http::Method::GET
            && s.target.starts_with(&format!("http://{plain_api}/"))),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_websocket_on_a_local_endpoint_goes_to_its_route() {
    let env = Env::new();
    let (upstream, heads) = switching_upstream(SWITCH).await;
    let yaml = format!(
        "providers:
  p:
    headers: {{x-k: v}}
routes:
  - {{name: ws, host: api.example.com, provider: p, upstream_scheme: http, connect_to: '{upstream}'}}
local_endpoints:
  - {{listen: '127.0.0.1:0', route: ws}}
"
    );
    let proxy = env.proxy(&yaml).await;
    let (_, addr) = proxy.local_endpoints[0].clone();
    let handshake = HANDSHAKE
        .replace("GET http://api.example.com/", "GET /")
        .replace("Host: api.example.com", &format!("Host: {addr}"));
    let (mut s, _) = switched(addr, &handshake).await;
    assert_eq!(round_trip(&mut s, b"local").await, b"LOCAL");
    let up = heads.lock().unwrap()[0].clone();
    assert!(up.starts_with("get /socket?room=1 http/1.1\r\n"), "{up}");
    assert!(up.contains("\r\nhost: api.example.com\r\n"), "{up}");
    assert!(up.contains("\r\nx-k: v\r\n"), "{up}");
    drop(s);
    no_connection_left(&proxy).await;
}

#[tokio::test]
async fn a_ws_url_tunnelled_through_connect_to_port_80_gets_credentials() {
    // WebSocket libraries (Python's `websockets`, undici) CONNECT for `ws://` URLs too.
    let env = Env::new();
    let (upstream, heads) = switching_upstream(SWITCH).await;
    let proxy = env.proxy(&http_route_yaml(upstream)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"CONNECT api.example.com:80 HTTP/1.1\r\nHost: api.example.com:80\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let handshake = HANDSHAKE.replace("GET http://api.example.com/", "GET /");
    s.write_all(handshake.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(round_trip(&mut s, b"hello").await, b"HELLO");
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert!(
        heads[0].starts_with("get /socket?room=1 http/1.1\r\n"),
        "{}",
        heads[0]
    );
    assert!(
        heads[0].contains("\r\nx-k: v\r\n"),
        "credentials injected: {}",
        heads[0]
    );
}
