//! Benchmark scenario 5, token cold start: N requests arrive at once on an empty token cache.
//! Counts the token requests the fake OAuth server saw (the target is exactly 1) and reports
//! latency percentiles over the fake's own token latency (the target: p99 under 50 ms over it).
//!
//!   cargo run --release --example cold_start -- [--requests 1000] [--token-latency-ms 100]
//!       [--threads 1] [--shape multi_thread|per_core] [--out FILE.md]
//!
//! For comparison, the same burst is sent again with the token cached, through the bare hyper
//! forwarder (examples/support/bare.rs), and straight to the fake.
//!
//! Runtimes on their own threads, as in production: the fake provider, credproxy (with
//! `runtime.threads` worth of threads, like `credproxy run`), the bare forwarder (as many) and the
//! clients (hyper's bare HTTP/1 connections). Loopback only.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[path = "support/bare.rs"]
mod bare;

use credproxy::fakes::issuer::{Issuer, Mode};
use credproxy::fakes::{oauth, serve_with_issuer};

const CLIENT_ID: &str = "0123456789abcdef0123456789abcdef.bench";
const CLIENT_SECRET: &str = "bench-client-secret";

struct Args {
    requests: usize,
    token_latency: Duration,
    threads: usize,
    /// `runtime.shape`, as in credproxy's config.
    shape: String,
    out: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        requests: 1000,
        token_latency: Duration::from_millis(100),
        threads: 1,
        shape: "multi_thread".into(),
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || value.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--requests" => a.requests = num()? as usize,
            "--token-latency-ms" => a.token_latency = Duration::from_millis(num()?),
            "--threads" => a.threads = num()? as usize,
            "--shape" if value == "multi_thread" || value == "per_core" => a.shape = value.clone(),
            "--shape" => return Err(format!("--shape {value}: multi_thread or per_core")),
            "--out" => a.out = Some(value.clone()),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// Runs `f` on a runtime of its own thread until `stop` is dropped; returns what `f` sent back.
fn on_thread<T: Send + 'static, F, Fut>(
    threads: usize,
    shape: credproxy::config::Shape,
    f: F,
) -> Result<(T, std::sync::mpsc::SyncSender<()>), String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let (stop_tx, stop_rx) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::spawn(move || {
        let rt = match credproxy::runtime(threads, shape) {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        rt.block_on(async move {
            let value = f().await;
            let _ = ready_tx.send(value);
            // Keep serving until the main thread is done.
            let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
        });
    });
    let value = ready_rx.recv().map_err(|e| e.to_string()).and_then(|v| v)?;
    Ok((value, stop_tx))
}

fn main() -> Result<(), String> {
    let a = args()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ca = credproxy::ca::Ca::generate("cold_start bench CA", 1).map_err(|e| e.to_string())?;
    let tls = ca
        .server_config(&["bench.api.openvpn.com", "127.0.0.1"])
        .map_err(|e| e.to_string())?;
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).map_err(|e| e.to_string())?;

    let issuer = Issuer::new(Duration::from_secs(3600));
    issuer.set_mode(Mode::Slow(a.token_latency));
    let fake_issuer = issuer.clone();
    // One fake, two listeners sharing its issuer: the token endpoint over TLS, as the real one,
    // and the API over plain HTTP, so that 1,000 upstream TLS handshakes at once (a cost of the
    // upstream, not of the token cache) do not hide what this scenario measures.
    let (fake_tls, fake_api) = on_thread(1, Default::default(), move || async move {
        let settings = oauth::Settings {
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
        };
        let bind = || async {
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| e.to_string())
        };
        let tls = serve_with_issuer(
            bind().await?,
            Some(tls),
            settings.clone(),
            fake_issuer.clone(),
            oauth::handle,
        );
        let api = serve_with_issuer(bind().await?, None, settings, fake_issuer, oauth::handle);
        let addrs = (tls.addr, api.addr);
        // The fakes serve from tasks of this runtime; their handles are kept alive here.
        std::mem::forget((tls, api));
        Ok(addrs)
    })
    .map(|(addrs, stop)| {
        std::mem::forget(stop);
        addrs
    })?;

    let d = dir.path().display();
    let yaml = format!(
        "listen: 127.0.0.1:0
admin: {{enabled: false}}
state_dir: {d}/state
runtime: {{threads: {threads}, shape: {shape}}}
upstream: {{extra_ca_files: ['{d}/ca.pem']}}
providers:
  connexa:
    oauth2:
      token_url: 'https://{{host}}/api/v1/oauth/token'
      client_id: '{CLIENT_ID}'
      client_secret: '{CLIENT_SECRET}'
      client_auth: basic
      connect_to: '{fake_tls}'
  warm:
    headers: {{x-warm: 'yes'}}
routes:
  # Only for opening connections before the cold burst: a static route to the same upstream (the
  # fake answers it 401, which does not matter), whose pooled connections the token route reuses.
  - host: bench.api.openvpn.com
    path_prefix: /warm
    provider: warm
    upstream_scheme: http
    connect_to: '{fake_api}'
  - host: '*.api.openvpn.com'
    provider: connexa
    upstream_scheme: http
    connect_to: '{fake_api}'
",
        threads = a.threads,
        shape = a.shape
    );
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).map_err(|e| e.to_string())?;
    let config = credproxy::config::load(&path).map_err(|e| e.to_string())?;
    let (threads, shape) = (config.threads, config.shape);
    let (proxy_addr, _proxy) = on_thread(threads, shape, move || async move {
        let running = credproxy::start(config).await.map_err(|e| e.to_string())?;
        let addr: SocketAddr = running.addr;
        std::mem::forget(running);
        Ok(addr)
    })?;

    // The fake's own latency under the same burst: n requests sent straight to its API with a
    // valid token, on connections opened beforehand. Whatever the proxied bursts take beyond the
    // token latency plus this is credproxy's.
    let host = "bench.api.openvpn.com";
    let direct_token = issuer.issue(host);
    // The yardstick: the same bursts through the bare forwarder, which adds that valid token and
    // does nothing else, on as many threads as credproxy.
    let bearer =
        http::HeaderValue::try_from(format!("Bearer {direct_token}")).map_err(|e| e.to_string())?;
    let bare_bearer = bearer.clone();
    let (bare_addr, _bare) = on_thread(threads, Default::default(), move || async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tokio::spawn(bare::serve(
            listener,
            fake_api,
            http::header::AUTHORIZATION,
            bare_bearer,
            bare::Mode::Pooled,
        ));
        Ok(addr)
    })?;
    let client_rt = credproxy::runtime(2, Default::default()).map_err(|e| e.to_string())?;
    let n = a.requests;
    // First n requests on a static route open n client connections and n upstream connections;
    // then the cold burst reuses them, so what it measures is the empty token cache, not 2n
    // connections being opened at once. Then the same burst again, token cached, for comparison.
    // The client is hyper's bare HTTP/1 connection, one request per connection at a time, so
    // that the load generator costs as little as it can of the two cores it shares.
    let (latencies, statuses, warm, bare, direct) = client_rt.block_on(async move {
        let via_proxy = |path: &'static str| {
            move || {
                Request::get(format!("http://{host}{path}"))
                    .header(http::header::HOST, host)
                    .body(Empty::new())
            }
        };
        let mut conns = connect(proxy_addr, n).await?;
        let (connect_burst, _) = burst(&mut conns, via_proxy("/warm/up")).await?;
        let (cold, statuses) = burst(&mut conns, via_proxy("/api/v1/networks")).await?;
        let (warm, _) = burst(&mut conns, via_proxy("/api/v1/networks")).await?;
        drop(conns);
        let mut conns = connect(bare_addr, n).await?;
        burst(&mut conns, via_proxy("/api/v1/networks")).await?;
        let (bare, bare_statuses) = burst(&mut conns, via_proxy("/api/v1/networks")).await?;
        all_200("burst through the bare forwarder", &bare_statuses, n)?;
        drop(conns);
        let straight = || {
            Request::get("/api/v1/networks")
                .header(http::header::HOST, host)
                .header(http::header::AUTHORIZATION, bearer.clone())
                .body(Empty::new())
        };
        let mut conns = connect(fake_api, n).await?;
        burst(&mut conns, straight).await?;
        let (direct, direct_statuses) = burst(&mut conns, straight).await?;
        all_200("direct burst", &direct_statuses, n)?;
        eprintln!(
            "opening the connections: p99 {:.1} ms",
            connect_burst[connect_burst.len() * 99 / 100].as_secs_f64() * 1000.0
        );
        Ok::<_, String>((cold, statuses, warm, bare, direct))
    })?;
    let pct_of = |l: &[Duration], p: f64| {
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        l[i]
    };
    let pct = |p: f64| pct_of(&latencies, p);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let warm_p99 = ms(pct_of(&warm, 0.99));
    let direct_p99 = ms(pct_of(&direct, 0.99));
    let bare_p99 = ms(pct_of(&bare, 0.99));
    let token_ms = ms(a.token_latency);
    let p99_over = ms(pct(0.99)) - token_ms;
    let p99_over_fake = p99_over - direct_p99;
    let token_requests = issuer.token_requests();
    let ok = statuses.get(&200).copied().unwrap_or(0);
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let shape_name = shape.as_str();
    let report = format!(
        "| requests | answered 200 | token requests | fake token latency | p50 | p99 | max | p99 over the token latency | same burst, token cached: p99 | same burst, bare forwarder: p99 | same burst straight to the fake: p99 |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| {n} | {ok} | {token_requests} | {token_ms:.0} ms | {:.1} ms | {:.1} ms | {:.1} ms | {p99_over:.1} ms | {warm_p99:.1} ms | {bare_p99:.1} ms | {direct_p99:.1} ms |

- Token requests: {token_requests} (target exactly 1: {}).
- p99 over the fake's token latency: {p99_over:.1} ms (target < 50 ms: {}).
- p99 over the fake's own latency, that is its token latency plus its p99 for the same burst sent
  straight to it with a valid token: {p99_over_fake:.1} ms (target < 50 ms: {}).
- The same burst again through credproxy with the token cached: p99 {warm_p99:.1} ms; through the
  bare hyper forwarder (examples/support/bare.rs: it adds a valid token and does nothing else, no
  cache), p99 {bare_p99:.1} ms: what any hyper-based proxy on this machine needs for {n}
  requests at once.
- Every burst runs on connections opened beforehand: {n} client connections, and for the proxies
  {n} upstream connections (opened by a first burst, to a static route for credproxy).
- Statuses: {statuses:?}. credproxy ran with runtime.threads = {threads}, shape {shape_name}.
",
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(pct(1.0)),
        verdict(token_requests == 1),
        verdict(p99_over < 50.0),
        verdict(p99_over_fake < 50.0),
    );
    print!("{report}");
    if let Some(out) = a.out {
        std::fs::write(&out, &report).map_err(|e| format!("{out}: {e}"))?;
    }
    if ok != n {
        return Err(format!("{} of {n} requests did not answer 200", n - ok));
    }
    Ok(())
}

type Conn = SendRequest<Empty<Bytes>>;

/// A yardstick burst is worth nothing unless every request was answered 200.
fn all_200(
    what: &str,
    statuses: &std::collections::BTreeMap<u16, usize>,
    n: usize,
) -> Result<(), String> {
    match statuses.get(&200) == Some(&n) {
        true => Ok(()),
        false => Err(format!("{what}: statuses {statuses:?}")),
    }
}

/// `n` HTTP/1.1 connections to `addr`, opened one after another.
async fn connect(addr: SocketAddr, n: usize) -> Result<Vec<Conn>, String> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake {addr}: {e}"))?;
        tokio::spawn(conn);
        conns.push(send);
    }
    Ok(conns)
}

/// One request from `make` on each connection, all at once; latencies sorted, and the count of
/// each status (0: no answer).
async fn burst<F>(
    conns: &mut Vec<Conn>,
    make: F,
) -> Result<(Vec<Duration>, std::collections::BTreeMap<u16, usize>), String>
where
    F: Fn() -> Result<Request<Empty<Bytes>>, http::Error>,
{
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns.drain(..) {
        let req = make().map_err(|e| e.to_string())?;
        tasks.spawn(async move {
            let sent = Instant::now();
            let status = match conn.send_request(req).await {
                // Read the body, so the connection is ready for the next request.
                Ok(r) => {
                    let s = r.status().as_u16();
                    let _ = r.into_body().collect().await;
                    s
                }
                Err(_) => 0,
            };
            (sent.elapsed(), status, conn)
        });
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (took, status, conn) = r.map_err(|e| e.to_string())?;
        latencies.push(took);
        *statuses.entry(status).or_insert(0usize) += 1;
        conns.push(conn);
    }
    latencies.sort();
    Ok((latencies, statuses))
}
