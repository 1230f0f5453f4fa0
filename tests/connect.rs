//! HTTPS through the proxy: CONNECT with TLS interception for routed hosts (the client trusts
//! only credproxy's local CA), blind tunnels for the rest, the CA's life cycle, and bad clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use credproxy::fakes::issuer::Issuer;
use credproxy::fakes::twotcloud;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "billing-key-over-tls";

fn yaml(two_t: SocketAddr, connexa: SocketAddr, echo: SocketAddr, extra: &str) -> String {
    format!(
        "{extra}providers:
  billing:
    basic: {{username: '100234', password: '{KEY}'}}
  connexa:
    oauth2:
      token_url: 'https://{{host}}/api/v1/oauth/token'
      client_id: cid
      client_secret: csecret
      connect_to: '{connexa}'
  static:
    headers: {{x-api-key: static-value}}
routes:
  - {{host: api.cloudnet.services, path_prefix: /v3, provider: billing, connect_to: '{two_t}'}}
  - {{host: '*.api.openvpn.com', provider: connexa, connect_to: '{connexa}'}}
  - {{host: api.example.com, provider: static, connect_to: '{echo}'}}
"
    )
}

struct Setup {
    env: Env,
    two_t: credproxy::fakes::FakeServer,
    connexa: credproxy::fakes::FakeServer,
    issuer: Arc<Issuer>,
    echo: credproxy::fakes::FakeServer,
}

async fn setup() -> Setup {
    let env = Env::new();
    let two_t = twotcloud::start(
        listener().await,
        Some(env.tls.clone()),
        vec![billing_key(KEY)],
    );
    let (connexa, issuer) = env.oauth_fake("cid", "csecret").await;
    let echo = env.tls_echo().await;
    Setup {
        env,
        two_t,
        connexa,
        issuer,
        echo,
    }
}

impl Setup {
    fn yaml(&self, extra: &str) -> String {
        yaml(self.two_t.addr, self.connexa.addr, self.echo.addr, extra)
    }
}

#[tokio::test]
async fn static_and_token_credentials_over_intercepted_http1_and_http2() {
    for h2 in [false, true] {
        let s = setup().await;
        let proxy = s.env.proxy(&s.yaml("")).await;
        // The client trusts credproxy's CA and nothing else.
        let c = s.env.https_client(proxy.addr, vec![s.env.proxy_ca()], h2);
        let want = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };

        let r = get(&c, "https://api.cloudnet.services/v3/invoices").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), want);
        assert!(r.text().await.unwrap().starts_with("<ConsolidatedInvoice>"));
        let echo = echoed(get(&c, "https://api.cloudnet.services/v3/__echo").await).await;
        assert_eq!(
            header_values(&echo, "authorization"),
            [basic("100234", KEY)]
        );

        let r = get(&c, "https://acme.api.openvpn.com/api/v1/networks").await;
        assert_eq!(r.status(), 200);
        // The 401 → fresh token → replay path, inside the intercepted connection.
        s.issuer.revoke_all();
        let body = r#"{"name":"over-tls"}"#;
        let r = send(
            c.post("https://acme.api.openvpn.com/api/v1/networks")
                .body(body),
        )
        .await;
        assert_eq!(r.status(), 201);
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(answer["received"]["name"], "over-tls");
        assert_eq!(s.issuer.token_requests(), 2);
        assert_eq!(proxy.leaf_mints(), 2, "one leaf per intercepted host");
    }
}

#[tokio::test]
async fn an_ipv6_literal_route_is_intercepted_with_a_leaf_for_its_address() {
    let s = setup().await;
    let plain = credproxy::fakes::echo::start(listener().await, None);
    // The route's traffic goes to a plain fake on 127.0.0.1: no IPv6 socket is needed.
    let extra = format!(
        "routes:\n  - {{host: '[2001:db8::7]', provider: static, connect_to: '{}', upstream_scheme: http}}\n",
        plain.addr
    );
    let yaml = s.yaml("").replace("routes:\n", &extra);
    let proxy = s.env.proxy(&yaml).await;
    // `CONNECT [2001:db8::7]:443`, then TLS that checks the leaf's IP address name (reqwest
    // cannot: it refuses an IPv6 literal as a TLS server name).
    let roots = s.env.proxy_roots();
    let (answer, mut tls) = tls_tunnel(proxy.addr, "[2001:db8::7]", &roots).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tls.write_all(b"GET /__echo HTTP/1.1\r\nHost: [2001:db8::7]\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("static-value"),
        "the credential was injected: {text}"
    );
    assert_eq!(proxy.leaf_mints(), 1);
    assert_eq!(plain.requests().len(), 1);
}

#[tokio::test]
async fn unmapped_hosts_are_tunnelled_untouched() {
    let s = setup().await;
    let proxy = s.env.proxy(&s.yaml("")).await;
    // Trusting only the fake's own CA proves the TLS session is the fake's, not credproxy's.
    let c = s.env.https_client(proxy.addr, vec![s.env.test_ca()], true);
    let plain = s.env.tls_echo().await;
    let url = format!("https://localhost:{}/__echo", plain.addr.port());
    let echo = echoed(get(&c, url).await).await;
    assert!(header_values(&echo, "x-api-key").is_empty());
    assert!(header_values(&echo, "authorization").is_empty());
    assert_eq!(proxy.leaf_mints(), 0, "nothing was intercepted");

    // A tunnel to a port nobody listens on: 502 before any 200.
    let port = closed_port().await;
    let answer = raw(
        proxy.addr,
        format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("connection refused"), "{answer}");

    // A target without a port (or with an empty or non-numeric one) is refused, not taken as 443.
    for target in ["localhost", "localhost:", "localhost:abc", ":443"] {
        let answer = raw(
            proxy.addr,
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(answer.contains("bad_connect"), "{target}: {answer}");
    }
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Opens CONNECT to `host` and starts TLS inside, trusting `roots`; returns the proxy's answer
/// to the CONNECT and the TLS stream.
async fn tls_tunnel(
    proxy: SocketAddr,
    host: &str,
    roots: &rustls::RootCertStore,
) -> (String, ClientTls) {
    tls_tunnel_offering(proxy, host, roots, &[]).await
}

/// `tls_tunnel` with these ALPN protocols offered.
async fn tls_tunnel_offering(
    proxy: SocketAddr,
    host: &str,
    roots: &rustls::RootCertStore,
    alpn: &[&[u8]],
) -> (String, ClientTls) {
    let mut config =
        rustls::ClientConfig::builder_with_provider(credproxy::outbound::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tls_tunnel_with(proxy, host, Arc::new(config)).await
}

/// `tls_tunnel` with this client configuration (and its session cache).
async fn tls_tunnel_with(
    proxy: SocketAddr,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> (String, ClientTls) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    // `[2001:db8::7]` is the IP address name `2001:db8::7`.
    let name =
        rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    (answer, tls)
}

/// A proxy with `setup`'s routes and an intercepted tunnel to api.example.com through it, its
/// client offering `alpn`.
async fn intercepted_offering(alpn: &[&[u8]]) -> (Setup, credproxy::Running, ClientTls) {
    let s = setup().await;
    let proxy = s.env.proxy(&s.yaml("")).await;
    let roots = s.env.proxy_roots();
    let (answer, tls) = tls_tunnel_offering(proxy.addr, "api.example.com", &roots, alpn).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    (s, proxy, tls)
}

/// Opens CONNECT to `host` and completes TLS trusting `roots`; returns the leaf certificate.
async fn handshake(proxy: SocketAddr, host: &str, roots: &rustls::RootCertStore) -> Vec<u8> {
    let (answer, tls) = tls_tunnel(proxy, host, roots).await;
    assert!(answer.starts_with("HTTP/1.1 200"));
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

#[tokio::test]
async fn leaves_name_the_host_chain_to_the_ca_and_are_minted_once() {
    let s = setup().await;
    let proxy = s.env.proxy(&s.yaml("")).await;
    let roots = s.env.proxy_roots();
    let leaf = handshake(proxy.addr, "api.example.com", &roots).await;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, ["DNSName(api.example.com)"]);
    assert!(
        cert.issuer().to_string().contains("credproxy local CA"),
        "{}",
        cert.issuer()
    );
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(
        lifetime <= 9 * 86_400,
        "a short-lived leaf, not {lifetime} s"
    );
    assert_eq!(proxy.leaf_mints(), 1);

    handshake(proxy.addr, "api.example.com", &roots).await;
    assert_eq!(
        proxy.leaf_mints(),
        1,
        "the second connection reuses the cached leaf"
    );

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let roots = roots.clone();
        let addr = proxy.addr;
        tasks.spawn(async move { handshake(addr, "acme.api.openvpn.com", &roots).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(
        proxy.leaf_mints(),
        2,
        "50 concurrent first handshakes to one host mint once"
    );
}

#[tokio::test]
async fn the_ca_persists_and_its_key_must_be_private() {
    let s = setup().await;
    let first = s.env.proxy(&s.yaml("")).await;
    let pem = std::fs::read_to_string(s.env.state_dir().join("ca.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    first.shutdown(Duration::from_secs(1)).await;

    let second = s.env.proxy(&s.yaml("")).await;
    assert_eq!(
        std::fs::read_to_string(s.env.state_dir().join("ca.pem")).unwrap(),
        pem,
        "same CA after a restart"
    );
    let c = s
        .env
        .https_client(second.addr, vec![s.env.proxy_ca()], true);
    assert_eq!(
        get(&c, "https://api.cloudnet.services/v3/invoices")
            .await
            .status(),
        200
    );
    second.shutdown(Duration::from_secs(1)).await;

    use std::os::unix::fs::PermissionsExt;
    let key = s.env.state_dir().join("ca-key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = s.env.write_config(&s.yaml(""));
    let config = credproxy::config::load(&path).unwrap();
    let err = credproxy::start(config)
        .await
        .err()
        .expect("refuses a readable key")
        .to_string();
    assert!(
        err.contains(&key.display().to_string()) && err.contains("0644"),
        "{err}"
    );

    // A key left without its certificate (a first start stopped between the two writes) is set
    // aside, and a new CA made, instead of every later start failing on "File exists".
    let ca_pem = s.env.state_dir().join("ca.pem");
    std::fs::remove_file(&ca_pem).unwrap();
    let third = s.env.proxy(&s.yaml("")).await;
    let new_pem = std::fs::read_to_string(&ca_pem).unwrap();
    assert_ne!(new_pem, pem, "a new CA");
    let orphans = std::fs::read_dir(s.env.state_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref().is_ok_and(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("ca-key.pem.orphan-")
            })
        })
        .count();
    assert_eq!(orphans, 1, "the old key was kept aside");
    third.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn name_constraints_limit_the_ca_to_the_configured_hosts() {
    let s = setup().await;
    let proxy = s
        .env
        .proxy(&s.yaml("ca:\n  name_constraints: true\n"))
        .await;
    let pem = std::fs::read(s.env.state_dir().join("ca.pem")).unwrap();
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let nc = cert
        .name_constraints()
        .unwrap()
        .expect("nameConstraints present");
    let mut permitted: Vec<String> = nc
        .value
        .permitted_subtrees
        .as_ref()
        .unwrap()
        .iter()
        .map(|s| s.base.to_string())
        .collect();
    permitted.sort();
    assert_eq!(
        permitted,
        [
            "DNSName(api.cloudnet.services)",
            "DNSName(api.example.com)",
            "DNSName(api.openvpn.com)"
        ]
    );
    // A real verifier accepts the constrained CA's leaves for a listed host.
    let c = s
        .env
        .https_client(proxy.addr, vec![s.env.proxy_ca()], false);
    assert_eq!(
        get(&c, "https://acme.api.openvpn.com/api/v1/networks")
            .await
            .status(),
        200
    );
    proxy.shutdown(Duration::from_secs(1)).await;

    // Later a route for a host the CA does not cover: interception is refused, with the fix.
    let extra = format!(
        "  - {{host: portal.stackbill.example, provider: static, connect_to: '{}'}}\n",
        s.echo.addr
    );
    let proxy = s
        .env
        .proxy(&(s.yaml("ca:\n  name_constraints: true\n") + &extra))
        .await;
    let answer = raw(proxy.addr, b"CONNECT portal.stackbill.example:443 HTTP/1.1\r\nHost: portal.stackbill.example:443\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("intercept_refused") && answer.contains("credproxy ca rotate"),
        "{answer}"
    );
    assert_eq!(proxy.leaf_mints(), 0);
}

#[tokio::test]
async fn garbage_and_broken_handshakes_leave_the_proxy_serving() {
    let s = setup().await;
    let proxy = s.env.proxy(&s.yaml("")).await;
    // Plain text where TLS should start, inside an intercepted tunnel.
    let mut a = TcpStream::connect(proxy.addr).await.unwrap();
    a.write_all(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Half a ClientHello, then gone.
    let mut b = TcpStream::connect(proxy.addr).await.unwrap();
    b.write_all(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        .await
        .unwrap();
    drop(b);
    // A TLS client on the plain port.
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 400"));
    let n = tokio::time::timeout(Duration::from_secs(10), a.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let client = s.env.https_client(proxy.addr, vec![s.env.proxy_ca()], true);
    for _ in 0..3 {
        let r = get(&client, "https://api.example.com/__echo").await;
        assert_eq!(r.status(), 200);
        let echo: serde_json::Value = r.json().await.unwrap();
        assert_eq!(header_values(&echo, "x-api-key"), ["static-value"]);
    }
}

#[tokio::test]
async fn a_request_for_another_host_inside_a_tunnel_is_refused() {
    let s = setup().await;
    let proxy = s.env.proxy(&s.yaml("")).await;
    let roots = s.env.proxy_roots();
    // Another host in `Host`; in the URL (absolute form) behind a right `Host`; a `Host` that is
    // not text.
    for request in [
        &b"GET /__echo HTTP/1.1\r\nHost: api.cloudnet.services\r\nConnection: close\r\n\r\n"[..],
        b"GET https://api.cloudnet.services/__echo HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        b"GET /__echo HTTP/1.1\r\nHost: api.example.com\xff\r\nConnection: close\r\n\r\n",
    ] {
        let (_, mut tls) = tls_tunnel(proxy.addr, "api.example.com", &roots).await;
        tls.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 400") && text.contains("host_mismatch"),
            "{text}"
        );
    }
    assert!(s.echo.requests().is_empty());

    // The same host in another spelling (case, a trailing dot, the port) is the same host.
    for spelling in ["API.Example.com", "api.example.com.", "api.example.com:443"] {
        let (_, mut tls) = tls_tunnel(proxy.addr, "api.example.com", &roots).await;
        let request =
            format!("GET /__echo HTTP/1.1\r\nHost: {spelling}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200"), "{spelling}: {text}");
    }
    assert_eq!(s.echo.requests().len(), 3);
}

/// Runs `credproxy ca <args> --config <config>` to completion.
fn ca_command(args: &[&str], config: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_credproxy"))
        .arg("ca")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("credproxy runs")
}

#[tokio::test]
async fn a_client_that_rejects_the_ca_is_warned_about_once_and_the_ca_cli_works() {
    let s = setup().await;
    let config = s.env.write_config(&s.yaml(""));

    // `ca export` makes the CA on first use and prints it; `--der` prints the DER bytes.
    let out = ca_command(&["export"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read_to_string(s.env.state_dir().join("ca.pem")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), pem);
    let der = ca_command(&["export", "--der"], &config);
    use rustls::pki_types::pem::PemObject;
    assert_eq!(
        der.stdout,
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
    );
    let path = ca_command(&["path"], &config);
    assert!(String::from_utf8_lossy(&path.stdout).contains("ca.pem"));
    // A write that fails (a full disk) is a failure, not a silent empty file.
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let out = Command::new(env!("CARGO_BIN_EXE_credproxy"))
            .args(["ca", "export", "--config"])
            .arg(&config)
            .stdout(full)
            .output()
            .expect("credproxy runs");
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("writing it to stdout"), "{err}");
    }

    let proxy = Binary::run(&config, &[("RUST_LOG", "info".as_ref())]);
    let addr = proxy.addr;
    // A client that knows only the fakes' CA, not credproxy's.
    let c = s.env.https_client(addr, vec![s.env.test_ca()], false);
    for _ in 0..3 {
        assert!(c.get("https://api.example.com/x").send().await.is_err());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = proxy.log();
    drop(proxy);
    let warnings = text
        .matches("the client does not trust the credproxy CA")
        .count();
    assert_eq!(warnings, 1, "warned once per client and host:\n{text}");

    // `ca rotate` makes a new CA and keeps the old one.
    let out = ca_command(&["rotate"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pem = std::fs::read_to_string(s.env.state_dir().join("ca.pem")).unwrap();
    assert_ne!(new_pem, pem);
    let backups: Vec<_> = std::fs::read_dir(s.env.state_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ca.pem.bak-"))
        .collect();
    assert_eq!(backups.len(), 1);
    assert_eq!(std::fs::read_to_string(backups[0].path()).unwrap(), pem);
}

#[tokio::test]
async fn an_idle_intercepted_connection_is_closed_after_the_header_timeout() {
    let s = setup().await;
    let proxy = s
        .env
        .proxy(&s.yaml("limits: {header_read_timeout: 2s}\n"))
        .await;
    let roots = s.env.proxy_roots();
    let (answer, mut tls) = tls_tunnel(proxy.addr, "api.example.com", &roots).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Two requests a second apart (half the timeout): the tunnel is kept between them.
    for _ in 0..2 {
        tls.write_all(b"GET /__echo HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
            .await
            .unwrap();
        assert!(read_response(&mut tls).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Then silence: the proxy closes the tunnel rather than hold it (and its slot) for ever.
    read_until_closed(&mut tls).await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_tunnels_without_waiting_for_them() {
    let s = setup().await;
    let proxy = s
        .env
        .proxy(&s.yaml("limits: {header_read_timeout: 60s}\n"))
        .await;
    // An idle keep-alive connection after one request, plain and inside an intercepted tunnel.
    let mut plain = TcpStream::connect(proxy.addr).await.unwrap();
    plain
        .write_all(b"GET http://api.example.com/__echo HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut plain).await.starts_with("HTTP/1.1 200"));
    let roots = s.env.proxy_roots();
    let (_, mut tls) = tls_tunnel(proxy.addr, "api.example.com", &roots).await;
    tls.write_all(b"GET /__echo HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut tls).await.starts_with("HTTP/1.1 200"));
    // Neither has a request in flight, so the drain closes both at once rather than wait out
    // the minute of `drain_timeout` below (or of `header_read_timeout`); the guard is a third.
    let shutdown = tokio::spawn(proxy.shutdown(Duration::from_secs(60)));
    tokio::time::timeout(Duration::from_secs(20), shutdown)
        .await
        .expect("shutdown waited for idle connections")
        .unwrap();
    assert!(
        read_until_closed(&mut plain).await.is_empty(),
        "plain closed"
    );
    assert!(
        read_until_closed(&mut tls).await.is_empty(),
        "tunnel closed"
    );
}

/// Sends `CONNECT {target}` and then `inside` through the tunnel; returns everything that came
/// back (the CONNECT's answer, then the tunnel's) until the proxy closed.
async fn through_tunnel(proxy: SocketAddr, target: &str, inside: &[u8]) -> String {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    tcp.write_all(connect.as_bytes()).await.unwrap();
    tcp.write_all(inside).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), read_until_closed(&mut tcp))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn plain_http_tunnelled_to_port_80_of_a_routed_host_gets_its_credentials() {
    // undici's ProxyAgent and `curl --proxytunnel` CONNECT for `http://` URLs too.
    let s = setup().await;
    let proxy = s.env.proxy(&s.yaml("")).await;
    let request = b"GET /__echo HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n";
    let text = through_tunnel(proxy.addr, "api.example.com:80", request).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = &text[text.rfind("\r\n\r\n").unwrap() + 4..];
    let echo: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(header_values(&echo, "x-api-key"), ["static-value"]);
    assert_eq!(s.echo.requests().len(), 1, "sent over the route's HTTPS");
    assert_eq!(proxy.leaf_mints(), 0, "nothing to decrypt");

    // Another host inside the tunnel does not get this host's credentials.
    let other = b"GET /__echo HTTP/1.1\r\nHost: api.cloudnet.services\r\nConnection: close\r\n\r\n";
    let text = through_tunnel(proxy.addr, "api.example.com:80", other).await;
    assert!(text.contains("host_mismatch"), "{text}");

    // A CONNECT inside the tunnel is not passed on (with the route's credentials) to a server
    // that has no use for it.
    let nested = b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\nConnection: close\r\n\r\n";
    let text = through_tunnel(proxy.addr, "api.example.com:80", nested).await;
    assert!(
        text.contains("400 Bad Request") && text.contains("connect_in_tunnel"),
        "{text}"
    );
    assert_eq!(s.echo.requests().len(), 1);

    // TLS started in a tunnel to port 80: after the 200, a TLS alert (fatal, handshake_failure)
    // and a clean close; nothing forwarded.
    let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
    let text = through_tunnel(proxy.addr, "api.example.com:80", hello).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("\r\n\r\n\x15\x03\x03\x00\x02\x02\x28"),
        "only an alert after the CONNECT's answer: {text:?}"
    );
    assert_eq!(s.echo.requests().len(), 1);

    // A CONNECT to a host and port no route covers stays a blind tunnel: to a closed port, a
    // 502 before any 200 (`Routes::tunnels_http` has the port-80 cases).
    let port = closed_port().await;
    let target = format!("localhost:{port}");
    let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let text = raw(proxy.addr, connect.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
}

#[tokio::test]
async fn an_http_1_0_client_offering_only_http_1_0_by_alpn_is_served() {
    // `curl --http1.0 -x … https://…` offers ALPN `http/1.0` alone.
    let (_s, _proxy, mut tls) = intercepted_offering(&[b"http/1.0"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.0"[..]));
    tls.write_all(b"GET /__echo HTTP/1.0\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&read_until_closed(&mut tls).await).into_owned();
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(text.contains("static-value"), "{text}");
}

#[tokio::test]
async fn a_client_offering_no_alpn_is_served_http_1_1_with_keep_alive() {
    // Older TLS clients offer no ALPN at all: without `h2` chosen, the tunnel speaks HTTP/1.x.
    let (_s, _proxy, mut tls) = intercepted_offering(&[]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    // Two requests on the one connection (pipelined), the second closing it.
    tls.write_all(
        b"GET /__echo HTTP/1.1\r\nHost: api.example.com\r\n\r\nGET /__echo HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&read_until_closed(&mut tls).await).into_owned();
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    assert_eq!(text.matches("static-value").count(), 2, "{text}");
}

#[tokio::test]
async fn an_oversized_head_inside_a_tunnel_gets_431() {
    // limits.max_header_bytes holds inside intercepted tunnels as on the listener.
    let (s, proxy, mut tls) = intercepted_offering(&[b"http/1.1"]).await;
    let mut huge = b"GET /__echo HTTP/1.1\r\nHost: api.example.com\r\n".to_vec();
    huge.extend(format!("X-Big: {}\r\n\r\n", "a".repeat(100 * 1024)).as_bytes());
    // The proxy may answer and close before it has read all of it.
    let _ = tls.write_all(&huge).await;
    let text = String::from_utf8_lossy(&read_until_closed(&mut tls).await).into_owned();
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");

    // And in a plain-HTTP tunnel to port 80 (served by the HTTP/1-or-2 server).
    let text = through_tunnel(proxy.addr, "api.example.com:80", &huge).await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("HTTP/1.1 431"),
        "{}",
        &text[..text.len().min(300)]
    );
    assert!(s.echo.requests().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn returning_clients_resume_their_tls_session_with_aes_128_gcm() {
    // A new connection per request is cheap only if the client resumes: no certificate, no
    // signature. And the proxy picks AES-128-GCM with SHA-256 (hashed in hardware) even for a
    // client that lists AES-256-GCM with SHA-384 first, as rustls's default order does.
    use rustls::{CipherSuite, HandshakeKind};
    let s = setup().await;
    let proxy = s.env.proxy(&s.yaml("")).await;
    let provider = credproxy::outbound::crypto_provider();
    assert_eq!(
        provider.cipher_suites[0].suite(),
        CipherSuite::TLS13_AES_256_GCM_SHA384
    );
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(s.env.proxy_roots())
        .with_no_client_auth();
    let config = Arc::new(config);
    for (round, kind) in [
        HandshakeKind::Full,
        HandshakeKind::Resumed,
        HandshakeKind::Resumed,
    ]
    .into_iter()
    .enumerate()
    {
        let (answer, mut tls) =
            tls_tunnel_with(proxy.addr, "api.example.com", config.clone()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let conn = tls.get_ref().1;
        assert_eq!(conn.handshake_kind(), Some(kind), "connection {round}");
        assert_eq!(
            conn.negotiated_cipher_suite().map(|s| s.suite()),
            Some(CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        // Reading the answer reads the session tickets that come after the handshake.
        tls.write_all(
            b"GET /__echo HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&read_until_closed(&mut tls).await).into_owned();
        assert!(text.contains("static-value"), "{text}");
    }
    assert_eq!(proxy.leaf_mints(), 1);

    // A client without AES-128-GCM still gets what it offers.
    let mut only_256 = (*credproxy::outbound::crypto_provider()).clone();
    only_256
        .cipher_suites
        .retain(|s| s.suite() == CipherSuite::TLS13_AES_256_GCM_SHA384);
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(only_256))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(s.env.proxy_roots())
        .with_no_client_auth();
    let (_, tls) = tls_tunnel_with(proxy.addr, "api.example.com", Arc::new(config)).await;
    assert_eq!(
        tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(CipherSuite::TLS13_AES_256_GCM_SHA384)
    );
}

#[tokio::test]
async fn a_head_answer_carries_no_body_over_http2() {
    // The upstream's headers (Content-Length too) reach the client; no content does, even from an
    // upstream that sends some (RFC 9110 §9.3.2): DATA on a HEAD stream is an HTTP/2 protocol
    // error.
    let s = setup().await;
    let proxy = s.env.proxy(&s.yaml("")).await;
    let c = s.env.https_client(proxy.addr, vec![s.env.proxy_ca()], true);
    let r = send(c.head("https://api.example.com/__echo")).await;
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let length = r.headers().get("content-length").cloned();
    assert!(r.bytes().await.unwrap().is_empty());
    // The length a GET would get.
    let get = get(&c, "https://api.example.com/__echo").await;
    let body = get.bytes().await.unwrap();
    let length: usize = length.unwrap().to_str().unwrap().parse().unwrap();
    assert!(
        length > 0 && body.len().abs_diff(length) < 16,
        "{length} {}",
        body.len()
    );
}
