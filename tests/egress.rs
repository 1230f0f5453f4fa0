//! Egress control: a fixed source address per route or provider (2tCloud binds keys to one IP),
//! an upstream proxy with its own credentials, and `credproxy egress-check`. All addresses are
//! loopback: 127.0.0.2 and 127.0.0.3 are this host's too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use credproxy::fakes::{echo, proxy, twotcloud};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use support::*;

const TWO: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const THREE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

fn bound_key(ip: IpAddr) -> Vec<twotcloud::Key> {
    vec![twotcloud::Key {
        bound_ip: Some(ip),
        ..billing_key("bound-key")
    }]
}

#[tokio::test]
async fn a_bound_source_address_satisfies_an_ip_bound_key_and_token_requests_use_it_too() {
    let env = Env::new();
    let fake = twotcloud::start(listener().await, Some(env.tls.clone()), bound_key(TWO));
    let (connexa, _issuer) = env.oauth_fake("cid", "cs").await;
    let yaml = format!(
        "providers:
  billing:
    basic:
      username: '100234'
      password: bound-key
  connexa:
    oauth2:
      token_url: 'https://{{host}}/api/v1/oauth/token'
      client_id: cid
      client_secret: cs
      connect_to: '{c}'
      egress: {{bind: 127.0.0.2}}
routes:
  - {{name: bound, host: api.cloudnet.services, path_prefix: /v3, provider: billing, connect_to: '{f}', ip_bound: true, egress: {{bind: 127.0.0.2}}}}
  - {{name: unbound, host: api.cloudnet.services, path_prefix: /v1/customers, provider: billing, connect_to: '{f}', ip_bound: true}}
  - {{host: '*.api.openvpn.com', provider: connexa, connect_to: '{c}'}}
",
        f = fake.addr,
        c = connexa.addr
    );
    let proxy = env.proxy(&yaml).await;
    let c = client(proxy.addr);
    let ok = get(&c, "http://api.cloudnet.services/v3/invoices").await;
    assert_eq!(ok.status(), 200);
    assert!(fake.requests().iter().all(|r| r.peer.ip() == TWO));

    // The same key from the default address: 2tCloud's 403, with the address it came from.
    let denied = get(&c, "http://api.cloudnet.services/v1/customers").await;
    assert_eq!(denied.status(), 403);
    assert_eq!(denied.headers()["x-credproxy-source-address"], "127.0.0.1");

    // The provider's egress covers its token requests and (inherited) its routes' traffic.
    let r = get(&c, "http://acme.api.openvpn.com/api/v1/networks").await;
    assert_eq!(r.status(), 200);
    let peers: Vec<IpAddr> = connexa.requests().iter().map(|r| r.peer.ip()).collect();
    assert!(
        !peers.is_empty() && peers.iter().all(|ip| *ip == TWO),
        "{peers:?}"
    );
    assert!(
        connexa
            .requests()
            .iter()
            .any(|r| r.uri.path() == "/api/v1/oauth/token")
    );
}

#[tokio::test]
async fn routes_with_different_source_addresses_never_share_connections() {
    let env = Env::new();
    let fake = env.tls_echo().await;
    let yaml = format!(
        "providers:
  p:
    headers: {{x-k: v}}
routes:
  - {{host: api.example.com, path_prefix: /a, provider: p, connect_to: '{f}', egress: {{bind: 127.0.0.2}}}}
  - {{host: api.example.com, path_prefix: /b, provider: p, connect_to: '{f}', egress: {{bind: 127.0.0.3}}}}
",
        f = fake.addr
    );
    let proxy = env.proxy(&yaml).await;
    let c = client(proxy.addr);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let c = c.clone();
        let path = if i % 2 == 0 { "/a/__echo" } else { "/b/__echo" };
        tasks.spawn(async move {
            c.get(format!("http://api.example.com{path}"))
                .send()
                .await
                .map(|r| r.status())
        });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 200);
    }
    let requests = fake.requests();
    assert_eq!(requests.len(), 200);
    for r in requests {
        let want = if r.uri.path().starts_with("/a/") {
            TWO
        } else {
            THREE
        };
        assert_eq!(r.peer.ip(), want, "{} came from {}", r.uri, r.peer);
    }
}

#[test]
fn a_bind_address_that_is_not_local_fails_at_load() {
    let env = Env::new();
    let yaml = env.base_yaml() + "egress:\n  bind: 203.0.113.5\n";
    let err = credproxy::config::from_yaml(&yaml, "c.yaml")
        .expect_err("not local")
        .to_string();
    assert!(
        err.contains(
            "c.yaml:7:9: egress.bind: 203.0.113.5 is not an address of this host (addresses: "
        ),
        "{err}"
    );
    assert!(
        err.contains("127.0.0.1"),
        "the message lists this host's addresses: {err}"
    );
}

fn proxy_auth(user: &str, pass: &str) -> String {
    basic(user, pass)
}

/// Routes whose traffic leaves through `egress` (`egress: {proxy: …}`): api.example.com to the
/// TLS upstream `tls`, and the plain HTTP upstream `plain` by its own address.
fn routes_through(egress: &str, tls: SocketAddr, plain: SocketAddr) -> String {
    format!(
        "providers:
  p:
    headers: {{x-k: v}}
routes:
  - {{host: api.example.com, provider: p, connect_to: '{tls}', {egress}}}
  - {{host: '127.0.0.1:{pp}', provider: p, upstream_scheme: http, {egress}}}
",
        pp = plain.port()
    )
}

#[tokio::test]
async fn traffic_goes_through_the_upstream_proxy_with_its_credentials_only_there() {
    let env = Env::new();
    let corp = proxy::start(listener().await, proxy_auth("svc", "proxy-pass"));
    let tls_upstream = env.tls_echo().await;
    let plain_upstream = echo::start(listener().await, None);
    let pass_file = env.write("proxy-pass", "proxy-pass\n");
    let egress = format!(
        "egress: {{proxy: 'http://{}', proxy_username: svc, proxy_password: 'file:{}'}}",
        corp.addr,
        pass_file.display()
    );
    let yaml = routes_through(&egress, tls_upstream.addr, plain_upstream.addr);
    let proxy = env.proxy(&yaml).await;
    let c = client(proxy.addr);

    // HTTPS upstream: a CONNECT through the corporate proxy.
    let echo = echoed(get(&c, "http://api.example.com/__echo").await).await;
    assert_eq!(header_values(&echo, "x-k"), ["v"]);
    assert!(header_values(&echo, "proxy-authorization").is_empty());
    // HTTP upstream: absolute form through it.
    let url = format!("http://127.0.0.1:{}/__echo", plain_upstream.addr.port());
    let echo = echoed(get(&c, url).await).await;
    assert!(
        header_values(&echo, "proxy-authorization").is_empty(),
        "{echo}"
    );
    assert_eq!(header_values(&echo, "x-k"), ["v"]);

    let seen = corp.seen();
    assert!(seen.iter().any(|s| s.method == http::Method::CONNECT
        && s.target.contains(&tls_upstream.addr.port().to_string())));
    assert!(
        seen.iter()
            .any(|s| s.method == http::Method::GET && s.target.starts_with("http://127.0.0.1:"))
    );
    assert!(seen.iter().all(|s| s.authorized));
}

#[tokio::test]
async fn proxy_credentials_in_the_url_are_percent_decoded() {
    let env = Env::new();
    let corp = proxy::start(listener().await, proxy_auth("svc@corp", "p@ss:w/rd%"));
    let tls_upstream = env.tls_echo().await;
    let plain_upstream = echo::start(listener().await, None);
    let egress = format!(
        "egress: {{proxy: 'http://svc%40corp:p%40ss%3Aw%2Frd%25@{}'}}",
        corp.addr
    );
    let proxy = env
        .proxy(&routes_through(
            &egress,
            tls_upstream.addr,
            plain_upstream.addr,
        ))
        .await;
    let echo = echoed(get(&client(proxy.addr), "http://api.example.com/__echo").await).await;
    assert_eq!(header_values(&echo, "x-k"), ["v"]);
    let seen = corp.seen();
    assert!(
        !seen.is_empty() && seen.iter().all(|s| s.authorized),
        "{}",
        seen.len()
    );
}

#[tokio::test]
async fn a_wrong_proxy_password_is_a_502_naming_the_proxy() {
    let env = Env::new();
    let corp = proxy::start(listener().await, proxy_auth("svc", "right"));
    let tls_upstream = env.tls_echo().await;
    let plain_upstream = echo::start(listener().await, None);
    let egress = format!(
        "egress: {{proxy: 'http://{}', proxy_username: svc, proxy_password: wrong}}",
        corp.addr
    );
    let yaml = routes_through(&egress, tls_upstream.addr, plain_upstream.addr);
    let proxy = env.proxy(&yaml).await;
    let c = client(proxy.addr);
    for url in [
        "http://api.example.com/x".to_string(),
        format!("http://127.0.0.1:{}/x", plain_upstream.addr.port()),
    ] {
        let r = get(&c, &url).await;
        assert_eq!(r.status(), 502, "{url}");
        let body: serde_json::Value = r.json().await.unwrap();
        let msg = body["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("http://{}", corp.addr)) && msg.contains("407"),
            "{msg}"
        );
        assert!(!msg.contains("wrong"), "the password is not quoted: {msg}");
    }
    assert!(tls_upstream.requests().is_empty() && plain_upstream.requests().is_empty());
}

/// Runs `credproxy egress-check <args> --config <config>` to completion.
fn egress_check(args: &[&str], config: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_credproxy"))
        .arg("egress-check")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("credproxy runs")
}

#[test]
fn egress_check_prints_the_address_the_service_saw() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = Env::new();
    let whatismyip = rt.block_on(async { echo::start(listener().await, None) });
    let config = env.write_config(
        "providers:
  p:
    headers: {x-k: v}
routes:
  - {name: bound, host: a.example.com, provider: p, egress: {bind: 127.0.0.2}}
  - {name: default, host: b.example.com, provider: p}
",
    );
    let url = format!("http://{}/ip", whatismyip.addr);
    let out = egress_check(&["--url", &url], &config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "route bound: leaves from 127.0.0.2; {url} sees 127.0.0.2"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "route default: leaves direct; {url} sees 127.0.0.1"
        )),
        "{text}"
    );

    let out = egress_check(&["--route", "bound", "--url", &url], &config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "{text}");

    // A service that answers nothing is no evidence of the source address: a failure.
    let empty = format!("http://{}/status/204", whatismyip.addr);
    let out = egress_check(&["--route", "bound", "--url", &empty], &config);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("with an empty answer"), "{all}");
    let _: SocketAddr = whatismyip.addr;
}
