//! The forward proxy and local endpoints end to end: real sockets on 127.0.0.1, TLS fakes that
//! check credentials like the real providers do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use credproxy::fakes::{self, echo, stackbill, twotcloud};
use support::*;

const ACCOUNT: &str = "100234";
const CUSTOMERS_KEY: &str = "cust-key-AAA111";
const BILLING_KEY: &str = "bill-key-BBB222";

/// One key per API of account `ACCOUNT` (100234, as `billing_key` makes them).
fn twotcloud_keys() -> Vec<twotcloud::Key> {
    let customers = twotcloud::Key {
        api: twotcloud::Api::Customers,
        ..billing_key(CUSTOMERS_KEY)
    };
    vec![customers, billing_key(BILLING_KEY)]
}

/// Providers and routes for 2tCloud with one key per API, pointed at `fake`.
fn twotcloud_yaml(env: &Env, fake: std::net::SocketAddr, unmapped: &str) -> String {
    let c = env.write("customers.key", &format!("{CUSTOMERS_KEY}\n"));
    let b = env.write("billing.key", BILLING_KEY);
    format!(
        "unmapped: {unmapped}
providers:
  customers:
    basic: {{username: '{ACCOUNT}', password: 'file:{c}'}}
  billing:
    basic: {{username: '{ACCOUNT}', password: 'file:{b}'}}
routes:
  - name: customers
    host: api.cloudnet.services
    path_prefix: /v1/customers
    provider: customers
    connect_to: {fake}
  - name: billing
    host: api.cloudnet.services
    path_prefix: /v3
    provider: billing
    connect_to: {fake}
",
        c = c.display(),
        b = b.display()
    )
}

#[tokio::test]
async fn basic_credentials_are_chosen_by_path_and_replace_the_clients() {
    let env = Env::new();
    let fake = twotcloud::start(listener().await, Some(env.tls.clone()), twotcloud_keys());
    let proxy = env.proxy(&twotcloud_yaml(&env, fake.addr, "deny")).await;
    let c = client(proxy.addr);

    // Without the proxy's credentials the fake answers 403, as 2tCloud does.
    let bad = send(
        c.get("http://api.cloudnet.services/v1/customers")
            .header("authorization", basic(ACCOUNT, BILLING_KEY)),
    )
    .await;
    assert_eq!(
        bad.status(),
        200,
        "the client's own (wrong-API) header must be replaced"
    );

    let customers = send(
        c.get("http://api.cloudnet.services/v1/customers")
            .header("accept", "application/json"),
    )
    .await;
    assert_eq!(customers.status(), 200);
    assert!(customers.text().await.unwrap().contains("\"CompanyName\""));

    let invoices = get(&c, "http://api.cloudnet.services/v3/invoices").await;
    assert_eq!(invoices.status(), 200);
    assert!(
        invoices
            .text()
            .await
            .unwrap()
            .starts_with("<ConsolidatedInvoice>"),
        "XML by default"
    );

    // Exactly the right key arrived for each API, once, and the client's value is gone.
    let echo = echoed(
        send(
            c.get("http://api.cloudnet.services/v3/__echo")
                .header("authorization", "Basic c3RvbGVuOmtleQ=="),
        )
        .await,
    )
    .await;
    assert_eq!(
        header_values(&echo, "authorization"),
        [basic(ACCOUNT, BILLING_KEY)]
    );
    let echo = echoed(get(&c, "http://api.cloudnet.services/v1/customers/__echo").await).await;
    assert_eq!(
        header_values(&echo, "authorization"),
        [basic(ACCOUNT, CUSTOMERS_KEY)]
    );
    assert_eq!(echo["authority"], "api.cloudnet.services");

    // A path no route covers on the same host is not given either key.
    let other = get(&c, "http://api.cloudnet.services/v2/other").await;
    assert_refused(&other, 403, "host_denied");
    let body: serde_json::Value = other.json().await.unwrap();
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains(
            "api.cloudnet.services has routes, but none whose path_prefix covers `/v2/other`"
        ),
        "{msg}"
    );
}

#[tokio::test]
async fn static_headers_are_injected_and_replace_the_clients() {
    let env = Env::new();
    let keys = stackbill::Keys {
        api_key: "sb-api-key-123".into(),
        secret_key: "sb-secret-456".into(),
    };
    let fake = stackbill::start(listener().await, Some(env.tls.clone()), keys);
    let sk = env.write("sb-secret", "sb-secret-456\n");
    let proxy = env
        .proxy(&format!(
            "providers:
  stackbill:
    headers:
      apikey: sb-api-key-123
      secretKey: 'file:{}'
routes:
  - host: portal.stackbill.example
    provider: stackbill
    connect_to: {}
",
            sk.display(),
            fake.addr
        ))
        .await;
    let c = client(proxy.addr);
    let r = send(
        c.get("http://portal.stackbill.example/restapi/zone/zonelist")
            .header("apikey", "not-mine"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("listZoneResponse"));

    let echo = echoed(
        send(
            c.get("http://portal.stackbill.example/__echo")
                .header("APIKEY", "not-mine"),
        )
        .await,
    )
    .await;
    assert_eq!(header_values(&echo, "apikey"), ["sb-api-key-123"]);
    assert_eq!(header_values(&echo, "secretkey"), ["sb-secret-456"]);
}

fn echo_route_yaml(fake: std::net::SocketAddr, host: &str, client_auth: &str) -> String {
    format!(
        "providers:
  p:
    headers: {{x-api-key: injected-value}}
routes:
  - host: '{host}'
    provider: p
    connect_to: {fake}
    client_auth: {client_auth}
unmapped: deny
"
    )
}

/// A proxy that routes api.example.com to `mapped` and passes every other host through.
async fn passthrough_proxy(env: &Env, mapped: std::net::SocketAddr) -> credproxy::Running {
    let yaml = echo_route_yaml(mapped, "api.example.com", "replace")
        .replace("unmapped: deny", "unmapped: passthrough");
    env.proxy(&yaml).await
}

#[tokio::test]
async fn client_auth_keep_and_reject() {
    let env = Env::new();
    let fake = env.tls_echo().await;

    let keep = env
        .proxy(&echo_route_yaml(fake.addr, "api.example.com", "keep"))
        .await;
    let c = client(keep.addr);
    let echo = echoed(
        send(
            c.get("http://api.example.com/__echo")
                .header("x-api-key", "mine"),
        )
        .await,
    )
    .await;
    assert_eq!(header_values(&echo, "x-api-key"), ["mine"]);
    let echo = echoed(get(&c, "http://api.example.com/__echo").await).await;
    assert_eq!(header_values(&echo, "x-api-key"), ["injected-value"]);

    let reject = env
        .proxy(&echo_route_yaml(fake.addr, "api.example.com", "reject"))
        .await;
    let c = client(reject.addr);
    let seen_before = fake.requests().len();
    let r = send(
        c.get("http://api.example.com/__echo")
            .header("x-api-key", "mine"),
    )
    .await;
    assert_refused(&r, 400, "client_credentials_rejected");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["route"], "api.example.com");
    assert_eq!(body["provider"], "p");
    assert_eq!(
        fake.requests().len(),
        seen_before,
        "a rejected request never leaves the proxy"
    );
}

/// A server that answers TRACE sends the request back as it received it: with the key.
#[tokio::test]
async fn trace_is_refused_on_routes_and_passes_elsewhere_without_credentials() {
    let env = Env::new();
    let mapped = env.tls_echo().await;
    let proxy = passthrough_proxy(&env, mapped.addr).await;
    let c = client(proxy.addr);
    for method in ["TRACE", "TRACK", "trace"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = send(c.request(m, "http://api.example.com/__echo")).await;
        assert_refused(&r, 405, "trace_refused");
        assert!(r.headers()["allow"].to_str().unwrap().contains("GET"));
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["route"], "api.example.com");
        assert!(
            body["message"].as_str().unwrap().starts_with(method),
            "{body}"
        );
    }
    assert!(mapped.requests().is_empty(), "nothing reached the route");

    // An unmapped host gets no credentials, so TRACE is its own business.
    let plain = echo::start(listener().await, None);
    let r = send(c.request(
        reqwest::Method::TRACE,
        format!("http://{}/__echo", plain.addr),
    ))
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(plain.requests().len(), 1);
}

/// A route without a port is the web's ports, 80 and 443: another port on that host is another
/// service (another origin), which gets no credentials.
#[tokio::test]
async fn a_route_without_a_port_covers_only_80_and_443() {
    let env = Env::new();
    let fake = env.tls_echo().await;
    let proxy = env
        .proxy(&echo_route_yaml(fake.addr, "api.example.com", "replace"))
        .await;
    let c = client(proxy.addr);
    for url in [
        "http://api.example.com/__echo",
        "http://api.example.com:443/__echo",
    ] {
        let echo = echoed(get(&c, url).await).await;
        assert_eq!(
            header_values(&echo, "x-api-key"),
            ["injected-value"],
            "{url}"
        );
    }
    let r = get(&c, "http://api.example.com:8081/__echo").await;
    assert_refused(&r, 403, "host_denied");
    let msg: serde_json::Value = r.json().await.unwrap();
    assert!(
        msg["message"]
            .as_str()
            .unwrap()
            .starts_with("no route maps api.example.com:8081"),
        "{msg}"
    );
}

#[tokio::test]
async fn wildcard_routes_cover_one_label() {
    let env = Env::new();
    let fake = env.tls_echo().await;
    let proxy = env
        .proxy(&echo_route_yaml(fake.addr, "*.api.openvpn.com", "replace"))
        .await;
    let c = client(proxy.addr);
    for host in ["acme.api.openvpn.com", "OTHER.api.openvpn.com"] {
        let echo = echoed(get(&c, format!("http://{host}/api/v1/networks/__echo")).await).await;
        assert_eq!(
            header_values(&echo, "x-api-key"),
            ["injected-value"],
            "{host}"
        );
        assert_eq!(echo["authority"], host.to_ascii_lowercase());
    }
    for host in ["api.openvpn.com", "a.b.api.openvpn.com"] {
        let r = get(&c, format!("http://{host}/x")).await;
        assert_eq!(r.status(), 403, "{host} is not covered by the wildcard");
    }
}

#[tokio::test]
async fn unmapped_hosts_pass_through_without_credentials_or_are_denied() {
    let env = Env::new();
    let mapped = env.tls_echo().await;
    let plain = echo::start(listener().await, None);

    let proxy = passthrough_proxy(&env, mapped.addr).await;
    let c = client(proxy.addr);
    let echo = echoed(get(&c, format!("http://{}/__echo?q=1", plain.addr)).await).await;
    assert!(
        header_values(&echo, "x-api-key").is_empty(),
        "no credentials for an unmapped host"
    );
    assert_eq!(echo["uri"], "/__echo?q=1");

    let proxy = env
        .proxy(&echo_route_yaml(mapped.addr, "api.example.com", "replace"))
        .await;
    let c = client(proxy.addr);
    let before = plain.requests().len();
    let r = get(&c, format!("http://{}/__echo", plain.addr)).await;
    assert_refused(&r, 403, "host_denied");
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("127.0.0.1"),
        "{body}"
    );
    assert_eq!(plain.requests().len(), before);
}

#[tokio::test]
async fn hop_by_hop_headers_and_proxy_authorization_never_cross() {
    let env = Env::new();
    // An upstream that sends hop-by-hop headers of its own.
    let upstream = fakes::serve(
        listener().await,
        Some(env.tls.clone()),
        |_req, _peer| async {
            let mut r = fakes::respond(http::StatusCode::OK, "text/plain", "ok");
            let h = r.headers_mut();
            h.insert("connection", "x-up-hop".parse().unwrap());
            h.insert("x-up-hop", "1".parse().unwrap());
            h.insert("proxy-authenticate", "Basic realm=up".parse().unwrap());
            h.insert("x-up-normal", "kept".parse().unwrap());
            r
        },
    );
    let echo_fake = env.tls_echo().await;
    let yaml = format!(
        "providers:
  p:
    headers: {{x-api-key: injected-value}}
routes:
  - host: api.example.com
    provider: p
    connect_to: {}
  - host: portal.stackbill.example
    provider: p
    connect_to: {}
",
        echo_fake.addr, upstream.addr
    );
    let proxy = env.proxy(&yaml).await;

    let request = b"GET http://api.example.com/__echo HTTP/1.1\r\n\
Host: api.example.com\r\n\
Connection: keep-alive, X-Custom-Hop\r\n\
X-Custom-Hop: secret-ish\r\n\
Keep-Alive: timeout=5\r\n\
Proxy-Connection: keep-alive\r\n\
Proxy-Authorization: Basic cHJveHk6cGFzcw==\r\n\
TE: gzip;q=0.5, trailers\r\n\
Upgrade: websocket\r\n\
X-Normal: yes\r\n\r\n";
    let answer = raw(proxy.addr, request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    let headers = echo["headers"].as_object().unwrap();
    for gone in [
        "x-custom-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(
            !headers.contains_key(gone),
            "{gone} reached the upstream: {echo}"
        );
    }
    assert_eq!(header_values(&echo, "x-normal"), ["yes"]);
    // The client's codings are its own; that it takes trailers, the proxy (which passes them on)
    // says again in its own `TE`.
    assert_eq!(header_values(&echo, "te"), ["trailers"]);
    assert_eq!(header_values(&echo, "x-api-key"), ["injected-value"]);

    let r = get(&client(proxy.addr), "http://portal.stackbill.example/").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-up-hop").is_none());
    assert!(r.headers().get("proxy-authenticate").is_none());
    assert_eq!(r.headers()["x-up-normal"], "kept");
}

#[tokio::test]
async fn via_names_the_proxy_after_earlier_ones_both_ways_and_can_be_turned_off() {
    let env = Env::new();
    let fake = echo::start(listener().await, None);
    let proxy = env.proxy(&http_route_yaml(fake.addr)).await;
    let r = send(
        client(proxy.addr)
            .get("http://api.example.com/__echo")
            .header("via", "1.1 corp-gateway"),
    )
    .await;
    let via: Vec<_> = r.headers().get_all("via").iter().cloned().collect();
    assert_eq!(via, ["1.1 credproxy"], "on the response");
    let echo = echoed(r).await;
    assert_eq!(
        header_values(&echo, "via"),
        ["1.1 corp-gateway", "1.1 credproxy"],
        "on the request, after the proxy before it"
    );

    let quiet = env
        .proxy(&format!("  via: false\n{}", http_route_yaml(fake.addr)))
        .await;
    let r = get(&client(quiet.addr), "http://api.example.com/__echo").await;
    assert!(r.headers().get("via").is_none());
    assert!(header_values(&echoed(r).await, "via").is_empty());
}

#[tokio::test]
async fn redirects_go_back_to_the_client_and_credentials_stay_home() {
    let env = Env::new();
    let mapped = env.tls_echo().await;
    let elsewhere = echo::start(listener().await, None);
    let proxy = passthrough_proxy(&env, mapped.addr).await;
    let c = client(proxy.addr);

    let landing = format!("http://{}/landing/__echo", elsewhere.addr);
    let r = get(&c, format!("http://api.example.com/redirect?to={landing}")).await;
    assert_eq!(r.status(), 302, "the proxy must not follow redirects");
    assert_eq!(r.headers()["location"], landing.as_str());
    assert!(
        elsewhere.requests().is_empty(),
        "nothing reached the other host yet"
    );

    // The client follows it through the proxy: the other host is unmapped and gets no credential.
    let echo = echoed(get(&c, &landing).await).await;
    assert!(header_values(&echo, "x-api-key").is_empty());
    assert!(
        elsewhere
            .requests()
            .iter()
            .all(|r| !r.headers.contains_key("x-api-key")),
        "the other host never saw the credential"
    );
    assert_eq!(mapped.requests().len(), 1);
}

#[tokio::test]
async fn upstream_failures_are_502_or_504_json_naming_host_and_cause() {
    let env = Env::new();
    let port = closed_port().await;
    // A server whose certificate is for another name, one signed by an unknown CA, one that hangs.
    let wrong_name = echo::start(
        listener().await,
        Some(env.ca.server_config(&["wrong.example"]).unwrap()),
    );
    let other_ca = credproxy::ca::Ca::generate("someone else", 2).unwrap();
    let unknown_ca = echo::start(
        listener().await,
        Some(other_ca.server_config(&["api.example.com"]).unwrap()),
    );
    let hang = fakes::serve(listener().await, None, |_req, _peer| async {
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        fakes::respond(http::StatusCode::OK, "text/plain", "late")
    });
    let yaml = format!(
        "  response_timeout: 1s
providers:
  p:
    headers: {{x-api-key: v}}
routes:
  - {{host: down.example.com, provider: p, connect_to: '127.0.0.1:{port}'}}
  - {{host: api.example.com, provider: p, connect_to: '{}'}}
  - {{host: other.example.com, provider: p, connect_to: '{}'}}
  - {{host: slow.example.com, provider: p, connect_to: '{}', upstream_scheme: http}}
",
        wrong_name.addr, unknown_ca.addr, hang.addr
    );
    let proxy = env.proxy(&yaml).await;
    let c = client(proxy.addr);
    let check =
        |url: &'static str, status: u16, code: &'static str, words: &'static [&'static str]| {
            let c = c.clone();
            async move {
                let r = get(&c, url).await;
                assert_refused(&r, status, code);
                assert_eq!(r.headers()["content-type"], "application/json");
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(body["error"], code);
                assert_eq!(body["provider"], "p");
                let msg = body["message"].as_str().unwrap();
                for w in words {
                    assert!(msg.contains(w), "{url}: `{msg}` should mention `{w}`");
                }
            }
        };
    check(
        "http://down.example.com/x",
        502,
        "upstream_unreachable",
        &["down.example.com", "connection refused"],
    )
    .await;
    check(
        "http://api.example.com/x",
        502,
        "upstream_tls",
        &["certificate not valid for api.example.com"],
    )
    .await;
    check(
        "http://other.example.com/x",
        502,
        "upstream_tls",
        &["other.example.com", "unknown authority"],
    )
    .await;
    check(
        "http://slow.example.com/x",
        504,
        "upstream_timeout",
        &["slow.example.com", "response_timeout"],
    )
    .await;
}

/// A server that takes the TCP connection and never answers the TLS handshake is a connection
/// that did not happen (`connect_timeout`), not a slow answer (`response_timeout`).
#[tokio::test]
async fn a_tls_handshake_that_never_finishes_is_a_connect_timeout() {
    let env = Env::new();
    let silent = listener().await;
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let yaml = format!(
        "  connect_timeout: 1s\n  response_timeout: 60s\nproviders:\n  p:\n    headers: {{x-api-key: v}}\nroutes:\n  - {{host: mute.example.com, provider: p, connect_to: '{silent_addr}'}}\n"
    );
    let proxy = env.proxy(&yaml).await;
    let r = get(&client(proxy.addr), "http://mute.example.com/x").await;
    assert_refused(&r, 504, "upstream_timeout");
    let body: serde_json::Value = r.json().await.unwrap();
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("connect_timeout") && msg.contains("mute.example.com"),
        "{msg}"
    );
    held.abort();
}

#[tokio::test]
async fn ipv6_literals_and_explicit_default_ports_reach_their_route() {
    let env = Env::new();
    let fake = env.tls_echo().await;
    let plain = echo::start(listener().await, None);
    // No IPv6 socket is needed: `connect_to` sends the route's traffic to the fake on 127.0.0.1.
    let yaml = format!(
        "providers:
  p:
    headers: {{x-api-key: injected-value}}
routes:
  - {{host: '[2001:DB8::1]', provider: p, connect_to: '{}', upstream_scheme: http}}
  - {{host: api.example.com, provider: p, connect_to: '{}'}}
unmapped: deny
",
        plain.addr, fake.addr
    );
    let proxy = env.proxy(&yaml).await;
    let c = client(proxy.addr);

    for url in [
        "http://[2001:db8::1]/__echo",
        "http://[2001:db8:0::1]:80/__echo",
    ] {
        let r = get(&c, url).await;
        assert_eq!(r.status(), 200, "{url}");
        let echo = echoed(r).await;
        assert_eq!(
            header_values(&echo, "x-api-key"),
            ["injected-value"],
            "{url}"
        );
        assert_eq!(echo["authority"], "[2001:db8::1]", "{url}");
    }

    // `http://host:80/` is `http://host/`: an HTTPS route still goes to 443 (the fake's TLS),
    // instead of trying TLS on port 80.
    let r = get(&c, "http://api.example.com:80/__echo").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header_values(&echoed(r).await, "x-api-key"),
        ["injected-value"]
    );

    // A port that is not a port is refused, not replaced by the default one.
    for request in [
        &b"GET http://api.example.com:99999/__echo HTTP/1.1\r\nHost: api.example.com:99999\r\n\r\n"
            [..],
        &b"GET http://api.example.com:0/__echo HTTP/1.1\r\nHost: api.example.com:0\r\n\r\n"[..],
        &b"CONNECT api.example.com:70000 HTTP/1.1\r\nHost: api.example.com:70000\r\n\r\n"[..],
    ] {
        let answer = raw(proxy.addr, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("is not a port number"), "{answer}");
    }
    assert_eq!(
        fake.requests().len(),
        1,
        "only the good request reached the fake"
    );
}

#[tokio::test]
async fn malformed_requests_get_precise_4xx() {
    let env = Env::new();
    let fake = env.tls_echo().await;
    let proxy = env
        .proxy(&echo_route_yaml(fake.addr, "api.example.com", "replace"))
        .await;
    let cases: [(&[u8], &str, Option<&str>); 7] = [
        (
            b"GET http://[oops/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 400",
            None,
        ),
        (
            b"GET http://api.example.com/__echo HTTP/1.1\r\n\r\n",
            "HTTP/1.1 400",
            Some("missing_host"),
        ),
        (
            b"GET /__echo HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            "HTTP/1.1 400",
            Some("not_absolute_form"),
        ),
        (
            b"GET ftp://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            "HTTP/1.1 400",
            Some("unsupported_scheme"),
        ),
        (
            b"GET http://api.example.com/a/../b HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            "HTTP/1.1 400",
            Some("dot_segments"),
        ),
        (
            b"CONNECT other.example.com:443 HTTP/1.1\r\nHost: other.example.com:443\r\n\r\n",
            "HTTP/1.1 403",
            Some("host_denied"),
        ),
        (
            b"GET http://api.example.com/__echo HTTP/1.1\r\nHost: api.example.com\r\nHost: evil.example\r\n\r\n",
            "HTTP/1.1 400",
            Some("duplicate_host"),
        ),
    ];
    for (req, status, code) in cases {
        let answer = raw(proxy.addr, req).await;
        assert!(
            answer.starts_with(status),
            "{}: {answer}",
            String::from_utf8_lossy(req)
        );
        if let Some(code) = code {
            assert!(
                answer.contains(&format!("x-credproxy-error: {code}")),
                "{answer}"
            );
            assert!(
                answer.contains(&format!("\"error\":\"{code}\"")),
                "{answer}"
            );
        }
    }
    let mut huge =
        b"GET http://api.example.com/__echo HTTP/1.1\r\nHost: api.example.com\r\n".to_vec();
    huge.extend(format!("X-Big: {}\r\n\r\n", "a".repeat(100 * 1024)).as_bytes());
    let answer = raw(proxy.addr, &huge).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(
        fake.requests().is_empty(),
        "no malformed request reached the upstream"
    );

    // The proxy is still healthy afterwards.
    let r = get(&client(proxy.addr), "http://api.example.com/__echo").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn local_endpoint_forwards_to_its_route_with_host_rewritten() {
    let env = Env::new();
    let fake = twotcloud::start(listener().await, Some(env.tls.clone()), twotcloud_keys());
    let mut yaml = twotcloud_yaml(&env, fake.addr, "deny");
    yaml.push_str("local_endpoints:\n  - listen: 127.0.0.1:0\n    route: billing\n");
    let proxy = env.proxy(&yaml).await;
    let (name, addr) = proxy.local_endpoints[0].clone();
    assert_eq!(name, "billing");
    let c = direct_client();

    let r = get(&c, format!("http://{addr}/v3/invoices?startDate=20260101")).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("<Endpoint>invoices</Endpoint>")
    );

    let echo = echoed(get(&c, format!("http://{addr}/v3/__echo?x=1")).await).await;
    assert_eq!(echo["authority"], "api.cloudnet.services");
    assert_eq!(
        header_values(&echo, "authorization"),
        [basic(ACCOUNT, BILLING_KEY)]
    );
    assert_eq!(echo["uri"], "/v3/__echo?x=1");

    // HTTP/2 cleartext with prior knowledge (gRPC clients, `curl --http2-prior-knowledge`): its
    // requests always carry a scheme and authority, and are still plain local requests.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = get(&h2, format!("http://{addr}/v3/__echo?x=2")).await;
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let echo = echoed(r).await;
    assert_eq!(echo["uri"], "/v3/__echo?x=2");
    assert_eq!(
        header_values(&echo, "authorization"),
        [basic(ACCOUNT, BILLING_KEY)]
    );

    let r = get(&c, format!("http://{addr}/v1/customers")).await;
    assert_refused(&r, 404, "not_routed");
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_reused() {
    let env = Env::new();
    let fake = env.tls_echo().await;
    let proxy = env
        .proxy(&echo_route_yaml(fake.addr, "api.example.com", "replace"))
        .await;
    let c = client(proxy.addr);
    for _ in 0..5 {
        let r = get(&c, "http://api.example.com/__echo").await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let peers: std::collections::HashSet<_> = fake.requests().iter().map(|r| r.peer).collect();
    assert_eq!(
        peers.len(),
        1,
        "five sequential requests should share one upstream connection"
    );
}
