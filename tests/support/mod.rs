//! Shared test helpers: a test CA with TLS for the fakes, a proxy started from YAML on an
//! ephemeral port, and clients that go through it. Everything is on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use credproxy::ca::Ca;
use credproxy::fakes::issuer::Issuer;
use credproxy::fakes::{FakeServer, echo, oauth, serve_with_issuer, twotcloud};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Host names the test CA's leaf certificate covers.
pub const TLS_NAMES: &[&str] = &[
    "api.cloudnet.services",
    "portal.stackbill.example",
    "api.example.com",
    "acme.api.openvpn.com",
    "other.api.openvpn.com",
    "api.cloudneeti.com",
    "api.cleancloud.io",
    "localhost",
    "127.0.0.1",
];

pub struct Env {
    pub ca: Ca,
    pub tls: Arc<rustls::ServerConfig>,
    pub dir: tempfile::TempDir,
    pub ca_path: PathBuf,
}

/// Every test binary logs the proxies it runs at trace level (credproxy's own code) into
/// `target/tmp/test-logs/`; `.ci/run` scans those files for secret values afterwards.
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-logs");
        let _ = std::fs::create_dir_all(&dir);
        let name = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "test".into());
        let Ok(file) =
            std::fs::File::create(dir.join(format!("{name}-{}.log", std::process::id())))
        else {
            return;
        };
        let filter = tracing_subscriber::EnvFilter::new(
            "credproxy=trace,hyper=debug,hyper_util=debug,h2=info,rustls=debug,info",
        );
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .try_init();
    });
}

impl Env {
    pub fn new() -> Env {
        init_logs();
        let ca = Ca::generate("credproxy tests CA", 2).expect("CA");
        let tls = ca.server_config(TLS_NAMES).expect("leaf");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).expect("write CA");
        Env {
            ca,
            tls,
            dir,
            ca_path,
        }
    }

    /// Where the proxies of this test keep their local CA.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The proxy's local CA certificate (after a proxy with routes has started).
    pub fn proxy_ca(&self) -> reqwest::Certificate {
        let pem = std::fs::read(self.state_dir().join("ca.pem")).expect("the proxy made its CA");
        reqwest::Certificate::from_pem(&pem).expect("PEM")
    }

    /// A client for `https://` URLs through the proxy (CONNECT) that trusts only `roots`.
    pub fn https_client(
        &self,
        proxy: SocketAddr,
        roots: Vec<reqwest::Certificate>,
        h2: bool,
    ) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .proxy(reqwest::Proxy::https(format!("http://{proxy}")).expect("proxy url"))
            .tls_certs_only(roots)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30));
        if !h2 {
            b = b.http1_only();
        }
        b.build().expect("client")
    }

    /// The fakes' test CA, as a reqwest root.
    pub fn test_ca(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.ca.cert_pem().as_bytes()).expect("PEM")
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).expect("write");
        p
    }

    /// The config header every test uses: an ephemeral port and the test CA trusted upstream.
    pub fn base_yaml(&self) -> String {
        format!(
            "listen: 127.0.0.1:0\nstate_dir: {}\nadmin: {{listen: '127.0.0.1:0'}}\nupstream:\n  extra_ca_files: [{}]\n",
            self.state_dir().display(),
            self.ca_path.display()
        )
    }

    /// Writes `base_yaml() + rest` to `config.yaml` (again on every call, for reload tests) and
    /// returns its path, for the binary or for a proxy that is reloaded from it.
    pub fn write_config(&self, rest: &str) -> PathBuf {
        self.write("config.yaml", &(self.base_yaml() + rest))
    }

    /// Starts a proxy from `base_yaml() + rest`, loaded through the real config loader.
    pub async fn proxy(&self, rest: &str) -> credproxy::Running {
        start_proxy(&self.write_config(rest)).await
    }

    /// Trust in the proxy's own CA (its `ca.pem` in the state directory), for raw TLS clients
    /// of intercepted tunnels.
    pub fn proxy_roots(&self) -> rustls::RootCertStore {
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read(self.state_dir().join("ca.pem")).expect("the proxy's CA");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(&pem).expect("a certificate"))
            .expect("a root");
        roots
    }

    /// An echo fake behind TLS with the test CA's leaf, as routed hosts are.
    pub async fn tls_echo(&self) -> FakeServer {
        echo::start(listener().await, Some(self.tls.clone()))
    }

    /// A CloudConnexa OAuth fake (TLS) taking these client credentials; its tokens last an hour
    /// (`Issuer::set_ttl` changes that).
    pub async fn oauth_fake(&self, client_id: &str, secret: &str) -> (FakeServer, Arc<Issuer>) {
        let issuer = Issuer::new(Duration::from_secs(3600));
        let settings = oauth::Settings {
            client_id: client_id.into(),
            client_secret: secret.into(),
        };
        let fake = serve_with_issuer(
            listener().await,
            Some(self.tls.clone()),
            settings,
            issuer.clone(),
            oauth::handle,
        );
        (fake, issuer)
    }
}

/// Starts a proxy from a config file through the real config loader; a rejected file fails the
/// test with the loader's message and the file.
pub async fn start_proxy(path: &std::path::Path) -> credproxy::Running {
    let config = match credproxy::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            let yaml = std::fs::read_to_string(path).unwrap_or_default();
            panic!("test config rejected:\n{e}\n---\n{yaml}")
        }
    };
    credproxy::start(config).await.expect("proxy starts")
}

/// Provider `p`, which sets `x-k: v`, and one route: api.example.com to `upstream` over plain
/// HTTP. The smallest working proxy config for tests about the proxy rather than a provider.
pub fn http_route_yaml(upstream: SocketAddr) -> String {
    format!(
        "providers:
  p:
    headers: {{x-k: v}}
routes:
  - {{host: api.example.com, provider: p, upstream_scheme: http, connect_to: '{upstream}'}}
"
    )
}

/// Provider `connexa` (CloudConnexa OAuth, client `cid`, secret `cs`), whose token endpoint and
/// `*.api.openvpn.com` route are both served by `fake` (tokens for acme.api.openvpn.com).
pub fn connexa_yaml(fake: SocketAddr) -> String {
    connexa_yaml_apart(fake, fake)
}

/// As `connexa_yaml`, with the token endpoint at `token` and the API at `api`.
pub fn connexa_yaml_apart(token: SocketAddr, api: SocketAddr) -> String {
    format!(
        "providers:
  connexa:
    oauth2:
      token_url: 'https://acme.api.openvpn.com/api/v1/oauth/token'
      client_id: cid
      client_secret: cs
      connect_to: '{token}'
routes:
  - {{host: '*.api.openvpn.com', provider: connexa, connect_to: '{api}'}}
"
    )
}

/// The 2tCloud Billing API key `api_key` of account 100234: active, usable from any address.
pub fn billing_key(api_key: &str) -> twotcloud::Key {
    twotcloud::Key {
        account_id: "100234".into(),
        api_key: api_key.into(),
        api: twotcloud::Api::Billing,
        bound_ip: None,
        active: true,
    }
}

pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

/// A port nothing listens on.
pub async fn closed_port() -> u16 {
    let l = listener().await;
    l.local_addr().expect("addr").port()
}

/// An HTTP client that sends every http:// request through the proxy and follows no redirect.
pub fn client(proxy: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{proxy}")).expect("proxy url"))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A client that talks to a server directly (local endpoints).
pub fn direct_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Sends raw bytes, returns everything the server answered until it closed (or 10 s of silence).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    read_response(&mut s).await
}

/// Reads one response with a `Content-Length` from `s` (or everything until it closes, or 10 s
/// of silence), as text.
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                // One response is enough: stop once a complete JSON body or an empty one arrived.
                let text = String::from_utf8_lossy(&out);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head.lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    });
                    if len.is_some_and(|n| body.len() >= n) {
                        break;
                    }
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads from `s` until the proxy closes it (the guard only stops a proxy that never does);
/// returns everything read.
pub async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await;
        match read.expect("the proxy closed the connection") {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// Waits (up to 2 s) for the proxy's open-connections gauge to reach `n`, and asserts it did.
pub async fn open_connections_reach(proxy: &credproxy::Running, n: i64) {
    let metrics = proxy.state().metrics.clone();
    for _ in 0..100 {
        if metrics.open_connections.get() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.open_connections.get(), n, "open connections");
}

/// Waits (up to 2 s) for the proxy's connection gauge to reach 0, and asserts it did: the
/// connections closed on the proxy's side gave back their `max_connections` slots.
pub async fn no_connection_left(proxy: &credproxy::Running) {
    open_connections_reach(proxy, 0).await;
}

/// Sends a request built on a client; a request that gets no response at all fails the test.
pub async fn send(request: reqwest::RequestBuilder) -> reqwest::Response {
    request.send().await.expect("a response")
}

/// `GET url` through `c`; a request that gets no response at all fails the test.
pub async fn get(c: &reqwest::Client, url: impl reqwest::IntoUrl) -> reqwest::Response {
    send(c.get(url)).await
}

/// Asserts one of credproxy's own refusals: `status` and its `x-credproxy-error` code.
pub fn assert_refused(r: &reqwest::Response, status: u16, code: &str) {
    assert_eq!(r.status(), status, "{}", r.url());
    assert_eq!(r.headers()["x-credproxy-error"], code, "{}", r.url());
}

/// The JSON body of an echo response: the headers the fake received.
pub async fn echoed(resp: reqwest::Response) -> serde_json::Value {
    assert_eq!(resp.status(), 200, "echo should answer 200");
    resp.json().await.expect("echo JSON")
}

/// All values of one header as the fake received it.
pub fn header_values(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

pub fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// `credproxy run` as a separate process, its stdout and stderr collected; killed when dropped.
pub struct Binary {
    pub child: std::process::Child,
    pub log: Arc<std::sync::Mutex<String>>,
    /// The forward proxy's address, read from the log.
    pub addr: SocketAddr,
}

impl Binary {
    /// Starts `credproxy run --config config` with extra environment and waits (up to 60 s) for
    /// its "listening" line.
    pub fn run(config: &std::path::Path, envs: &[(&str, &std::ffi::OsStr)]) -> Binary {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_credproxy"));
        cmd.args(["run", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("credproxy starts");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    log.lock().expect("log").push_str(&(line + "\n"));
                }
            });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let addr = loop {
            let text = log.lock().expect("log").clone();
            let found = text
                .split("forward proxy listening on http://")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| {
                    a.trim_end_matches(|c: char| !c.is_ascii_digit())
                        .parse()
                        .ok()
                });
            if let Some(addr) = found {
                break addr;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "credproxy did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Binary { child, log, addr }
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/2 connection (prior knowledge, no TLS) to `addr`, as a client that tunnels over
/// HTTP/2 opens to the proxy.
pub async fn h2_connection(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    sender
}

/// A CONNECT to `target` on a stream of `sender`'s connection: the proxy's answer.
pub async fn h2_connect(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    target: &str,
) -> http::Response<hyper::body::Incoming> {
    let connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("a CONNECT request");
    sender.send_request(connect).await.expect("an answer")
}
