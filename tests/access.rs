//! Who may use the proxy: client networks, proxy passwords, DNS rebinding against local
//! endpoints, and cross-site browser requests. Each refusal is a clear 403 or 407.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use credproxy::fakes::FakeServer;
use support::*;

/// A TLS echo fake as api.example.com, also behind a local endpoint, and a proxy with the
/// `access` section given.
async fn start(env: &Env, access: &str) -> (FakeServer, credproxy::Running) {
    let fake = env.tls_echo().await;
    let proxy = env
        .proxy(&format!(
            "{access}
providers:
  p:
    headers: {{x-k: v}}
routes:
  - {{name: api, host: api.example.com, provider: p, connect_to: '{}'}}
local_endpoints:
  - {{listen: '127.0.0.1:0', route: api}}
",
            fake.addr
        ))
        .await;
    (fake, proxy)
}

async fn refused(r: reqwest::Response, status: u16, code: &str) {
    assert_refused(&r, status, code);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], code);
    assert!(!body["message"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn clients_outside_allow_clients_are_refused() {
    let env = Env::new();
    let (fake, proxy) = start(&env, "access: {allow_clients: ['127.0.0.2/32']}").await;
    let r = get(&client(proxy.addr), "http://api.example.com/x").await;
    refused(r, 403, "client_not_allowed").await;
    let from_two = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", proxy.addr)).unwrap())
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    assert_eq!(
        get(&from_two, "http://api.example.com/x").await.status(),
        200
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn the_forward_proxy_can_require_a_password() {
    let env = Env::new();
    let hash = credproxy::access::PasswordHash::make("proxy-pass-123").unwrap();
    let access = format!("access:\n  proxy_users: {{alice: '{hash}'}}");
    let (_fake, proxy) = start(&env, &access).await;

    let r = get(&client(proxy.addr), "http://api.example.com/x").await;
    assert_eq!(
        r.headers()["proxy-authenticate"],
        "Basic realm=\"credproxy\""
    );
    refused(r, 407, "proxy_auth_required").await;
    let with = |pass: &str| {
        reqwest::Client::builder()
            .proxy(
                reqwest::Proxy::all(format!("http://{}", proxy.addr))
                    .unwrap()
                    .basic_auth("alice", pass),
            )
            .tls_certs_only([env.proxy_ca()])
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let r = get(&with("wrong"), "http://api.example.com/x").await;
    refused(r, 407, "proxy_auth_required").await;
    let ok = with("proxy-pass-123");
    let echo = echoed(get(&ok, "http://api.example.com/__echo").await).await;
    assert!(
        header_values(&echo, "proxy-authorization").is_empty(),
        "the proxy password stays here"
    );
    // CONNECT is checked too, then the intercepted requests go through.
    assert_eq!(get(&ok, "https://api.example.com/x").await.status(), 200);
    assert!(
        with("wrong")
            .get("https://api.example.com/x")
            .send()
            .await
            .is_err()
    );
    // The local endpoint is not a proxy: no password there, only loopback clients.
    let local = proxy.local_endpoints[0].1;
    let r = get(&direct_client(), format!("http://{local}/x")).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn local_endpoints_refuse_rebinding_hosts_and_cross_site_browsers() {
    let env = Env::new();
    let (fake, proxy) = start(
        &env,
        "access: {allow_origins: ['https://tool.example.org']}",
    )
    .await;
    let local = proxy.local_endpoints[0].1;
    let c = direct_client();
    let url = format!("http://{local}/x");
    // A page on evil.example whose name now resolves to 127.0.0.1.
    refused(
        send(
            c.get(&url)
                .header("host", format!("evil.example:{}", local.port())),
        )
        .await,
        403,
        "host_not_allowed",
    )
    .await;
    assert_eq!(
        send(
            c.get(&url)
                .header("host", format!("localhost:{}", local.port()))
        )
        .await
        .status(),
        200
    );
    // Cross-site browser requests, marked either way, to the local endpoint and to the proxy.
    refused(
        send(c.get(&url).header("sec-fetch-site", "cross-site")).await,
        403,
        "browser_request_refused",
    )
    .await;
    refused(
        send(c.get(&url).header("origin", "https://evil.example")).await,
        403,
        "browser_request_refused",
    )
    .await;
    let from_evil = client(proxy.addr)
        .get("http://api.example.com/x")
        .header("origin", "https://evil.example");
    refused(send(from_evil).await, 403, "browser_request_refused").await;
    // An allowed origin, and a same-origin or user-initiated navigation, pass.
    assert_eq!(
        send(
            c.get(&url)
                .header("origin", "https://tool.example.org")
                .header("sec-fetch-site", "cross-site")
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        send(c.get(&url).header("sec-fetch-site", "none"))
            .await
            .status(),
        200
    );
    assert_eq!(fake.requests().len(), 3);

    // Over HTTP/2 the request's host is its :authority (there is no Host header): a same-origin
    // request passes, another origin and a rebinding authority do not.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let same = send(h2.get(&url).header("origin", format!("http://{local}"))).await;
    assert_eq!(same.version(), reqwest::Version::HTTP_2);
    assert_eq!(same.status(), 200);
    refused(
        send(h2.get(&url).header("origin", "http://evil.example")).await,
        403,
        "browser_request_refused",
    )
    .await;
    let rebound = format!("http://evil.example:{}/x", local.port());
    let rebinding = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .resolve("evil.example", local)
        .build()
        .unwrap();
    refused(send(rebinding.get(&rebound)).await, 403, "host_not_allowed").await;
    assert_eq!(fake.requests().len(), 4);
}

#[test]
fn listening_beyond_loopback_needs_access_rules() {
    let env = Env::new();
    let yaml = env
        .base_yaml()
        .replace("listen: 127.0.0.1:0", "listen: 0.0.0.0:0");
    let err = credproxy::config::from_yaml(&yaml, "c.yaml")
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains(
            "c.yaml: access: listening on 0.0.0.0:0 lets anyone who reaches it use your credentials"
        ),
        "{err}"
    );
    let ok = yaml + "access: {allow_clients: ['10.0.0.0/8']}\n";
    credproxy::config::from_yaml(&ok, "c.yaml").expect("allowed with rules");
    // The admin endpoints have no authentication: never beyond loopback.
    let admin = env.base_yaml().replace(
        "admin: {listen: '127.0.0.1:0'}",
        "admin: {listen: '0.0.0.0:0'}",
    );
    let err = credproxy::config::from_yaml(&admin, "c.yaml")
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("admin.listen: 0.0.0.0:0 is not a loopback address"),
        "{err}"
    );
}

#[test]
fn hash_password_prints_a_hash_the_config_accepts() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_credproxy"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hunter2-hunter2\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!hash.contains("hunter2"));
    assert!(
        credproxy::access::PasswordHash::parse(&hash)
            .unwrap()
            .verify("hunter2-hunter2")
    );
}
