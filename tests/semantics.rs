//! HTTP message semantics through the proxy (RFC 9110/9112): framing an upstream got wrong,
//! versions, `Max-Forwards`, and requests a proxy must refuse rather than pass on half-understood.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use credproxy::fakes::echo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The 44 bytes of the chunked body that `/clte` announces as 5 with `Content-Length`.
const LONG: &str = "all forty-four bytes of this body must pass.";

/// An upstream that answers each request head with the canned bytes for its path, on a
/// connection it keeps open (so the bytes alone frame the answer).
async fn raw_upstream() -> SocketAddr {
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
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
                    let path = head.split(' ').nth(1).unwrap_or("/");
                    if s.write_all(&answer(path)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn answer(path: &str) -> Vec<u8> {
    match path {
        "/clte" => format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{LONG}\r\n0\r\n\r\n",
            LONG.len()
        )
        .into_bytes(),
        "/gzip" => {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec()
        }
        // The same, with `Connection` naming Transfer-Encoding (which must not hide it).
        "/gzip-listed" => {
            b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec()
        }
        "/clte-listed" => format!(
            "HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{LONG}\r\n0\r\n\r\n",
            LONG.len()
        )
        .into_bytes(),
        "/http10" => b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        "/101" => {
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n"
                .to_vec()
        }
        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
    }
}

#[tokio::test]
async fn upstream_framing_and_versions_are_made_right_or_refused() {
    let env = Env::new();
    let proxy = env.proxy(&http_route_yaml(raw_upstream().await)).await;
    let c = client(proxy.addr);

    // Content-Length beside Transfer-Encoding: the chunked body wins, whole, and the stale
    // length does not reach the client (RFC 9112 §6.3).
    for path in ["/clte", "/clte-listed"] {
        let r = get(&c, format!("http://api.example.com{path}")).await;
        assert_eq!(r.status(), 200);
        assert_ne!(
            r.headers().get("content-length").map(|v| v.as_bytes()),
            Some(&b"5"[..]),
            "{path}"
        );
        assert_eq!(r.text().await.unwrap(), LONG, "{path}");
    }

    // A transfer coding the proxy cannot pass on: a 502 that names it, not gzip bytes with no
    // label.
    for path in ["/gzip", "/gzip-listed"] {
        let r = get(&c, format!("http://api.example.com{path}")).await;
        assert_refused(&r, 502, "upstream_error");
        let msg: serde_json::Value = r.json().await.unwrap();
        assert!(msg["message"].as_str().unwrap().contains("`gzip`"), "{msg}");
    }

    // A 101 nobody asked for would leave the connection in an unknown protocol.
    let r = get(&c, "http://api.example.com/101").await;
    assert_refused(&r, 502, "upstream_error");

    // An HTTP/1.0 upstream: the client hears HTTP/1.1, and its connection stays open.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = b"GET http://api.example.com/http10 HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    for _ in 0..2 {
        s.write_all(request).await.unwrap();
        let head = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // Via says what the proxy received: HTTP/1.0.
        assert!(head.contains("via: 1.0 credproxy\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\nok"), "{head}");
    }
}

#[tokio::test]
async fn requests_a_proxy_cannot_pass_on_faithfully_are_refused() {
    let env = Env::new();
    let upstream = echo::start(listener().await, None);
    let proxy = env.proxy(&http_route_yaml(upstream.addr)).await;

    // A body coding the upstream would get unlabelled: 501 (RFC 9112 §6.1).
    let answer = raw(
        proxy.addr,
        b"POST http://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(answer.contains("unsupported_transfer_coding"), "{answer}");
    // Also when `Connection` names Transfer-Encoding.
    let answer = raw(
        proxy.addr,
        b"POST http://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close, transfer-encoding\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    // An empty list item is no coding (RFC 9110 §5.6.1): `, chunked` is chunked.
    let answer = raw(
        proxy.addr,
        b"POST http://api.example.com/__echo HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: , chunked\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let before = upstream.requests().len();

    // User info makes a URL look like another host's (RFC 9110 §4.2.4).
    let answer = raw(
        proxy.addr,
        b"GET http://api.example.com@evil.example/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("bad_uri"), "{answer}");
    assert_eq!(
        upstream.requests().len(),
        before,
        "nothing refused reached the upstream"
    );

    // An HTTP/1.0 client's Expect means nothing (RFC 9110 §10.1.1): it is not passed on as
    // HTTP/1.1's.
    let answer = raw(
        proxy.addr,
        b"POST http://api.example.com/__echo HTTP/1.0\r\nHost: api.example.com\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let echo: serde_json::Value =
        serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert!(header_values(&echo, "expect").is_empty(), "{echo}");
    assert_eq!(header_values(&echo, "x-k"), ["v"]);
}

#[tokio::test]
async fn max_forwards_zero_and_options_star_are_answered_by_the_proxy() {
    let env = Env::new();
    let upstream = echo::start(listener().await, None);
    let proxy = env.proxy(&http_route_yaml(upstream.addr)).await;
    let c = client(proxy.addr);

    let r = send(
        c.request(reqwest::Method::OPTIONS, "http://api.example.com/x")
            .header("max-forwards", "0"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["allow"].to_str().unwrap().contains("OPTIONS"));

    // TRACE stops here too, and shows the request without the proxy's credentials or the
    // client's own.
    let r = send(
        c.request(reqwest::Method::TRACE, "http://api.example.com/t")
            .header("max-forwards", "0")
            .header("x-mine", "visible")
            .header("authorization", "Bearer client-own")
            .header("proxy-authorization", "Basic cHJveHk6cHJveHktb3du"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "message/http");
    let text = r.text().await.unwrap();
    assert!(text.starts_with("TRACE "), "{text}");
    assert!(text.contains("x-mine: visible"), "{text}");
    // As it arrived: its Host, and no Via of the proxy's own.
    assert!(text.contains("host: api.example.com"), "{text}");
    assert!(!text.contains("via:"), "{text}");
    assert!(
        !text.contains("client-own") && !text.contains("x-k") && !text.contains("cHJveHk6"),
        "{text}"
    );
    assert!(upstream.requests().is_empty(), "neither went upstream");

    // With hops left, it goes on with one less.
    let echo = echoed(
        send(
            c.request(reqwest::Method::OPTIONS, "http://api.example.com/__echo")
                .header("max-forwards", "3"),
        )
        .await,
    )
    .await;
    assert_eq!(header_values(&echo, "max-forwards"), ["2"]);
    assert_eq!(header_values(&echo, "x-k"), ["v"]);
    // A count too large for any counter still goes down (to the largest one kept).
    let echo = echoed(
        send(
            c.request(reqwest::Method::OPTIONS, "http://api.example.com/__echo")
                .header("max-forwards", "99999999999999999999999"),
        )
        .await,
    )
    .await;
    assert_eq!(
        header_values(&echo, "max-forwards"),
        [(u32::MAX - 1).to_string()]
    );
}

/// A route without a port sends to its scheme's port: `http://host:443/` is not for a plain-HTTP
/// route (its credentials would go in clear text to 443), and a denial names the port, as a
/// CONNECT's does. Max-Forwards does not get round a denial.
#[tokio::test]
async fn a_portless_route_takes_only_its_own_schemes_port_and_denials_name_the_port() {
    let env = Env::new();
    let upstream = echo::start(listener().await, None);
    let proxy = env
        .proxy(&(http_route_yaml(upstream.addr) + "unmapped: deny\n"))
        .await;
    let c = client(proxy.addr);
    let echo = echoed(get(&c, "http://api.example.com:80/__echo").await).await;
    assert_eq!(header_values(&echo, "x-k"), ["v"]);
    let r = get(&c, "http://api.example.com:443/__echo").await;
    assert_refused(&r, 403, "host_denied");
    let msg: serde_json::Value = r.json().await.unwrap();
    assert!(
        msg["message"]
            .as_str()
            .unwrap()
            .starts_with("no route maps api.example.com:443"),
        "{msg}"
    );
    let answer = raw(
        proxy.addr,
        b"CONNECT api.example.com:8443 HTTP/1.1\r\nHost: api.example.com:8443\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("no route maps api.example.com:8443"),
        "{answer}"
    );
    let r = send(
        c.request(reqwest::Method::OPTIONS, "http://elsewhere.example/")
            .header("max-forwards", "0"),
    )
    .await;
    assert_refused(&r, 403, "host_denied");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn a_proxy_request_sent_to_a_local_endpoint_is_named_as_such() {
    let env = Env::new();
    let upstream = echo::start(listener().await, None);
    let yaml = http_route_yaml(upstream.addr)
        .replace("routes:\n  - {", "routes:\n  - {name: api, ")
        + "local_endpoints:\n  - {listen: '127.0.0.1:0', route: api}\n";
    let proxy = env.proxy(&yaml).await;
    let (_, local) = proxy.local_endpoints[0].clone();
    // The client took the local endpoint for the proxy: its Host is the API's.
    let r = get(&client(local), "http://api.example.com/x").await;
    assert_refused(&r, 400, "not_a_local_request");
    // A foreign Host on a plain request is still rebinding.
    let r = send(
        direct_client()
            .get(format!("http://{local}/x"))
            .header("host", "evil.example"),
    )
    .await;
    assert_refused(&r, 403, "host_not_allowed");
}
