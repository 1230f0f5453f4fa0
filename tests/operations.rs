//! Running as a service: live reload (in-process and by SIGHUP) and graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use credproxy::fakes::echo;
use support::*;

fn yaml(
    env: &Env,
    echo: std::net::SocketAddr,
    connexa: std::net::SocketAddr,
    value: &str,
) -> String {
    env.base_yaml()
        + &format!(
            "providers:
  p:
    headers: {{x-k: {value}}}
  connexa:
    oauth2:
      token_url: 'https://{{host}}/api/v1/oauth/token'
      client_id: cid
      client_secret: cs
      connect_to: '{connexa}'
routes:
  - {{host: api.example.com, provider: p, connect_to: '{echo}'}}
  - {{host: '*.api.openvpn.com', provider: connexa, connect_to: '{connexa}'}}
"
        )
}

#[tokio::test]
async fn reload_under_load_loses_nothing_refuses_broken_files_and_keeps_tokens() {
    let env = Env::new();
    let fake = env.tls_echo().await;
    let (connexa, issuer) = env.oauth_fake("cid", "cs").await;
    let path = env.write("config.yaml", &yaml(&env, fake.addr, connexa.addr, "v1"));
    let proxy = start_proxy(&path).await;
    let c = client(proxy.addr);
    assert_eq!(
        get(&c, "http://acme.api.openvpn.com/api/v1/networks")
            .await
            .status(),
        200
    );
    assert_eq!(issuer.token_requests(), 1);

    // A client loop running through every swap.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (c, stop, ok, failed) = (c.clone(), stop.clone(), ok.clone(), failed.clone());
        load.spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                n += 1;
                let url = if n % 2 == 0 {
                    "http://api.example.com/__echo"
                } else {
                    "http://acme.api.openvpn.com/api/v1/users"
                };
                match c.get(url).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for value in ["v2", "v3", "v4"] {
        std::fs::write(&path, yaml(&env, fake.addr, connexa.addr, value)).unwrap();
        proxy.reload().await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // A broken file is refused with its problems; the running config stays.
    std::fs::write(
        &path,
        yaml(&env, fake.addr, connexa.addr, "v5").replace("provider: p,", "provider: nope,"),
    )
    .unwrap();
    let err = proxy.reload().await.expect_err("broken file refused");
    assert!(
        err.contains("config.yaml:") && err.contains("unknown provider `nope`"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}

    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed during the reloads"
    );
    assert!(ok.load(Ordering::Relaxed) > 50);
    let echo = echoed(get(&c, "http://api.example.com/__echo").await).await;
    assert_eq!(
        header_values(&echo, "x-k"),
        ["v4"],
        "the last good file is in force"
    );
    assert_eq!(
        issuer.token_requests(),
        1,
        "the unchanged provider kept its token across reloads"
    );
}

#[tokio::test]
async fn changing_listeners_needs_a_restart() {
    let env = Env::new();
    let fake = echo::start(listener().await, None);
    let path = env.write("config.yaml", &yaml(&env, fake.addr, fake.addr, "v1"));
    let proxy = start_proxy(&path).await;
    std::fs::write(
        &path,
        yaml(&env, fake.addr, fake.addr, "v1")
            .replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:1"),
    )
    .unwrap();
    let err = proxy.reload().await.expect_err("refused");
    assert!(err.contains("restart credproxy"), "{err}");
}

#[tokio::test]
async fn sighup_reloads_the_running_binary() {
    let env = Env::new();
    let fake = env.tls_echo().await;
    let path = env.write("config.yaml", &yaml(&env, fake.addr, fake.addr, "before"));
    let proxy = Binary::run(&path, &[]);
    let addr = proxy.addr;
    let c = client(addr);
    let echo = echoed(get(&c, "http://api.example.com/__echo").await).await;
    assert_eq!(header_values(&echo, "x-k"), ["before"]);
    std::fs::write(&path, yaml(&env, fake.addr, fake.addr, "after")).unwrap();
    kill(&proxy.child, "-HUP");
    let mut seen = String::new();
    for _ in 0..100 {
        let echo = echoed(get(&c, "http://api.example.com/__echo").await).await;
        seen = header_values(&echo, "x-k")[0].clone();
        if seen == "after" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen,
        "after",
        "SIGHUP applied the new file; log:\n{}",
        proxy.log()
    );

    // A broken file is refused, and the refusal is in the service's log whichever way the
    // reload came: by SIGHUP or through the admin listener.
    std::fs::write(
        &path,
        yaml(&env, fake.addr, fake.addr, "never") + "bogus: 1\n",
    )
    .unwrap();
    let admin: std::net::SocketAddr = proxy
        .log()
        .split("admin endpoints on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("the admin listener's address in the log");
    let refusals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("ERROR") && l.contains("reload refused"))
            .count()
    };
    kill(&proxy.child, "-HUP");
    assert_eq!(admin_reload(admin).await.status(), 409);
    for _ in 0..200 {
        if refusals(&proxy.log()) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let log = proxy.log();
    assert_eq!(refusals(&log), 2, "{log}");
    assert!(log.contains("unknown field `bogus`"), "{log}");
    let echo = echoed(get(&c, "http://api.example.com/__echo").await).await;
    assert_eq!(header_values(&echo, "x-k"), ["after"]);
}

/// Sends `signal` (`-HUP`, `-TERM`) to a child process with kill(1).
fn kill(child: &std::process::Child, signal: &str) {
    let pid = child.id().to_string();
    let status = Command::new("kill").args([signal, &pid]).status();
    assert!(status.expect("kill runs").success(), "kill {signal} {pid}");
}

async fn admin_get(admin: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = get(&direct_client(), format!("http://{admin}{path}")).await;
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn admin_reload(admin: std::net::SocketAddr) -> reqwest::Response {
    send(direct_client().post(format!("http://{admin}/reload"))).await
}

#[tokio::test]
async fn admin_endpoints_health_metrics_status_and_reload() {
    let env = Env::new();
    let fake = env.tls_echo().await;
    let (connexa, _issuer) = env.oauth_fake("cid", "cs-secret-value-Z").await;
    let down = closed_port().await;
    let body = |value: &str| {
        env.base_yaml()
            + &format!(
                "unmapped: deny
providers:
  p:
    headers: {{x-k: {value}}}
  connexa:
    oauth2:
      token_url: 'https://{{host}}/api/v1/oauth/token'
      client_id: cid
      client_secret: cs-secret-value-Z
      connect_to: '{c}'
routes:
  - {{host: api.example.com, provider: p, connect_to: '{f}'}}
  - {{host: down.example.com, provider: p, connect_to: '127.0.0.1:{down}'}}
  - {{host: '*.api.openvpn.com', provider: connexa, connect_to: '{c}'}}
",
                c = connexa.addr,
                f = fake.addr
            )
    };
    let path = env.write("config.yaml", &body("static-secret-value-Q"));
    let proxy = start_proxy(&path).await;
    let admin = proxy.admin_addr.expect("admin listener");
    assert_eq!(admin_get(admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);

    // A known sequence: 3 good, 1 upstream down, 1 denied, 1 token route.
    let c = client(proxy.addr);
    for _ in 0..3 {
        assert_eq!(get(&c, "http://api.example.com/x").await.status(), 200);
    }
    assert_eq!(get(&c, "http://down.example.com/x").await.status(), 502);
    assert_eq!(
        get(&c, "http://elsewhere.example.com/x").await.status(),
        403
    );
    let echo = echoed(get(&c, "http://acme.api.openvpn.com/__echo").await).await;
    let token = header_values(&echo, "authorization")[0]
        .trim_start_matches("Bearer ")
        .to_string();

    // Prometheus asks for OpenMetrics; anything else gets the text format 0.0.4.
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let r = send(
        direct_client()
            .get(format!("http://{admin}/metrics"))
            .header("accept", prometheus_accept),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let metrics = r.text().await.unwrap();
    assert!(metrics.ends_with("# EOF\n"));
    assert!(metrics.contains("\n# TYPE credproxy_requests counter\n"));
    let r = send(direct_client().get(format!("http://{admin}/metrics"))).await;
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("\n# TYPE credproxy_requests_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("\n# TYPE credproxy_token_fetches_total counter\n"),
        "{text}"
    );
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line `{line}`"));
        assert!(value.parse::<f64>().is_ok(), "bad value in `{line}`");
        assert!(
            series
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic()),
            "bad name in `{line}`"
        );
    }
    let has = |s: &str| metrics.lines().any(|l| l == s);
    assert!(
        has(r#"credproxy_requests_total{route="api.example.com",provider="p",status="2xx"} 3"#),
        "{metrics}"
    );
    assert!(
        has(r#"credproxy_requests_total{route="down.example.com",provider="p",status="5xx"} 1"#),
        "{metrics}"
    );
    assert!(
        has(r#"credproxy_requests_total{route="-",provider="-",status="4xx"} 1"#),
        "{metrics}"
    );
    assert!(
        has(r#"credproxy_token_fetches_total{provider="connexa"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("credproxy_upstream_latency_seconds_bucket{"),
        "{metrics}"
    );
    assert!(
        has("credproxy_open_connections 1") || metrics.contains("credproxy_open_connections "),
        "{metrics}"
    );
    // No tunnel nor WebSocket yet: both kinds are there, at zero.
    for kind in ["tunnel", "websocket"] {
        for series in [
            format!(r#"credproxy_relays_open{{kind="{kind}"}} 0"#),
            format!(r#"credproxy_relays_idle_closed_total{{kind="{kind}"}} 0"#),
        ] {
            assert!(has(&series), "{series} in {metrics}");
        }
    }

    let (status, text) = admin_get(admin, "/status").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["routes"].as_array().unwrap().len(), 3);
    // The generated CA is good for 5 years: its expiry shows, for monitoring.
    let days_left = json["ca"]["days_left"].as_i64().unwrap();
    assert!((5 * 365 - 2..=5 * 365).contains(&days_left), "{days_left}");
    let connexa_status = json["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "connexa")
        .unwrap();
    assert_eq!(connexa_status["tokens"][0]["scope"], "acme.api.openvpn.com");
    assert!(connexa_status["tokens"][0]["valid_for_s"].as_u64().unwrap() > 3000);
    for secret in ["static-secret-value-Q", "cs-secret-value-Z", token.as_str()] {
        assert!(!text.contains(secret), "/status shows `{secret}`");
    }
    assert!(!metrics.contains("static-secret-value-Q") && !metrics.contains(&token));

    // Reload through the admin endpoint, and through the CLI; a broken file is refused.
    // A limit fixed at start changed: the reload goes through, and says what waits for a restart.
    std::fs::write(&path, body("v2") + "limits: {max_connections: 77}\n").unwrap();
    let r = admin_reload(admin).await;
    assert_eq!(r.status(), 200);
    let done: serde_json::Value = r.json().await.unwrap();
    assert_eq!(done["config"], path.display().to_string());
    assert!(
        done["warnings"].as_array().unwrap().iter().any(|w| w
            .as_str()
            .unwrap()
            .starts_with("limits.max_connections changed")),
        "{done}"
    );
    let echo = echoed(get(&c, "http://api.example.com/__echo").await).await;
    assert_eq!(header_values(&echo, "x-k"), ["v2"]);
    // A web page cannot make the user's browser reload it (a blind cross-site POST), and a GET
    // is told the method.
    let r = send(
        direct_client()
            .post(format!("http://{admin}/reload"))
            .header("origin", "https://evil.example")
            .header("sec-fetch-site", "cross-site"),
    )
    .await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("browser_request_refused"));
    let r = send(direct_client().get(format!("http://{admin}/reload"))).await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    // Health checkers that send HEAD get GET's answer, without its body.
    let r = send(direct_client().head(format!("http://{admin}/healthz"))).await;
    assert_eq!(r.status(), 200);
    let r = send(direct_client().delete(format!("http://{admin}/healthz"))).await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    std::fs::write(&path, body("v3") + "bogus: 1\n").unwrap();
    let r = admin_reload(admin).await;
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("unknown field `bogus`"));
    // `credproxy reload` needs a file that parses to find the admin port.
    std::fs::write(
        &path,
        body("v4").replace("127.0.0.1:0'}", &format!("{admin}'}}")),
    )
    .unwrap();
    // (Run off the test's single runtime thread, which also serves the admin listener.)
    let p = path.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_credproxy"))
            .args(["reload", "--config"])
            .arg(&p)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    // The admin port changed in the file (0 → the real one), which needs a restart: refused, said so.
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("restart credproxy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another file that names the same admin port: nothing is reloaded, and the CLI says which
    // file the proxy really runs.
    let staging = env.write("staging.yaml", &std::fs::read_to_string(&path).unwrap());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_credproxy"))
            .args(["reload", "--config"])
            .arg(&staging)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "runs {}",
            std::fs::canonicalize(&path).unwrap().display()
        )),
        "{stderr}"
    );

    // DNS rebinding: a page on evil.example resolving to 127.0.0.1 cannot read the admin port.
    let r = send(
        direct_client()
            .get(format!("http://{admin}/status"))
            .header("host", format!("evil.example:{}", admin.port())),
    )
    .await;
    assert_eq!(r.status(), 403);
}

/// Starts the binary with `NOTIFY_SOCKET` pointing at a socket of ours; returns it and the
/// socket, which has received `READY=1`.
fn run_with_notify(env: &Env, path: &std::path::Path) -> (Binary, UnixDatagram) {
    let sock_path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let proxy = Binary::run(path, &[("NOTIFY_SOCKET", sock_path.as_os_str())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"READY=1\n",
        "READY=1 once the listeners are bound"
    );
    (proxy, sock)
}

#[tokio::test]
async fn sigterm_lets_a_slow_upload_finish_and_refuses_new_connections() {
    let env = Env::new();
    // An upstream that reads the whole body, then answers with its size.
    let upstream = credproxy::fakes::serve(listener().await, None, |req, _| async move {
        use http_body_util::BodyExt;
        let n = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes().len())
            .unwrap_or(0);
        credproxy::fakes::respond(http::StatusCode::OK, "text/plain", format!("{n}"))
    });
    let path = env.write_config(&format!(
        "limits: {{drain_timeout: 20s}}
providers:
  p:
    headers: {{x-k: v}}
routes:
  - {{host: slow.example.com, provider: p, upstream_scheme: http, connect_to: '{}'}}
",
        upstream.addr
    ));
    let (mut proxy, sock) = run_with_notify(&env, &path);
    let addr = proxy.addr;

    // 20 chunks, 100 ms apart: about 2 s of upload.
    let chunks = futures_util::stream::iter(0..20).then(|i| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, std::io::Error>(vec![i as u8; 1000])
    });
    use futures_util::StreamExt;
    let c = client(addr);
    let upload = tokio::spawn(async move {
        c.post("http://slow.example.com/upload")
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(&proxy.child, "-TERM");
    let mut buf = [0u8; 256];
    let n = tokio::task::spawn_blocking(move || sock.recv(&mut buf).map(|n| buf[..n].to_vec()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, b"STOPPING=1\n");
    // New connections are refused while the upload drains.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the listener is closed after SIGTERM"
    );

    let status = upload
        .await
        .unwrap()
        .expect("the in-flight upload completes");
    assert_eq!(status, 200);
    let log = proxy.log.clone();
    let exited = tokio::task::spawn_blocking(move || {
        for _ in 0..200 {
            if let Ok(Some(s)) = proxy.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None // dropping `proxy` kills it
    })
    .await
    .unwrap();
    let exited = exited.unwrap_or_else(|| {
        panic!(
            "did not exit within the drain timeout:\n{}",
            log.lock().unwrap()
        )
    });
    assert!(exited.success(), "{}", log.lock().unwrap());
    assert!(upstream.requests().len() == 1);
}

#[tokio::test]
async fn a_second_sigterm_stops_at_once_without_waiting_for_the_drain() {
    let env = Env::new();
    let hang = credproxy::fakes::serve(listener().await, None, |_, _| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        credproxy::fakes::respond(http::StatusCode::OK, "text/plain", "late")
    });
    let path = env.write_config(&format!(
        "limits: {{drain_timeout: 10m}}\nproviders:\n  p:\n    headers: {{x-k: v}}\nroutes:\n  - {{host: slow.example.com, provider: p, upstream_scheme: http, connect_to: '{}'}}\n",
        hang.addr
    ));
    let mut proxy = Binary::run(&path, &[("RUST_LOG", "info".as_ref())]);
    let c = client(proxy.addr);
    let stuck = tokio::spawn(async move { c.get("http://slow.example.com/x").send().await });
    // The request is in flight (the fake has it) before the first signal.
    for _ in 0..100 {
        if !hang.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hang.requests().len(), 1);
    kill(&proxy.child, "-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the first SIGTERM drains (for up to 10 minutes)"
    );
    kill(&proxy.child, "-TERM");
    let exited = tokio::task::spawn_blocking(move || {
        for _ in 0..200 {
            if let Ok(Some(s)) = proxy.child.try_wait() {
                return Some((s, proxy.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
    .await
    .unwrap();
    let (status, log) = exited.expect("the second SIGTERM stopped it");
    assert!(status.success(), "{log}");
    assert!(log.contains("second signal: stopping now"), "{log}");
    assert!(stuck.await.unwrap().is_err(), "the stuck request was cut");
}

#[tokio::test]
async fn prefetch_makes_readiness_wait_for_the_first_token_and_recover_without_traffic() {
    let env = Env::new();
    let (connexa, issuer) = env.oauth_fake("cid", "cs").await;
    issuer.set_mode(credproxy::fakes::issuer::Mode::Status(500));
    let proxy = env
        .proxy(&format!(
            "tokens: {{prefetch: true, backoff_initial: 200ms, backoff_max: 500ms}}\n{}",
            connexa_yaml(connexa.addr)
        ))
        .await;
    let admin = proxy.admin_addr.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, text) = admin_get(admin, "/readyz").await;
    assert_eq!(
        (status, text.as_str()),
        (503, "waiting for the first token of: connexa\n")
    );
    // The endpoint recovers; no request is sent, yet the proxy becomes ready.
    issuer.set_mode(credproxy::fakes::issuer::Mode::Normal);
    let mut ready = false;
    for _ in 0..50 {
        if admin_get(admin, "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ready once the first token arrived");
    assert!(
        connexa
            .requests()
            .iter()
            .all(|r| r.uri.path() == "/api/v1/oauth/token"),
        "only token requests were made"
    );
}

#[tokio::test]
async fn shutdown_drains_requests_inside_intercepted_https_tunnels() {
    let env = Env::new();
    let slow = credproxy::fakes::serve(listener().await, Some(env.tls.clone()), |_, _| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        credproxy::fakes::respond(http::StatusCode::OK, "text/plain", "finally")
    });
    let proxy = env
        .proxy(&format!(
            "providers:\n  p:\n    headers: {{x-k: v}}\nroutes:\n  - {{host: api.example.com, provider: p, connect_to: '{}'}}\n",
            slow.addr
        ))
        .await;
    let c = env.https_client(proxy.addr, vec![env.proxy_ca()], false);
    let request = tokio::spawn(async move {
        c.get("https://api.example.com/slow")
            .send()
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    proxy.shutdown(Duration::from_secs(10)).await;
    let status = request
        .await
        .unwrap()
        .expect("the intercepted request was allowed to finish");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn readiness_turns_503_when_the_drain_starts() {
    let env = Env::new();
    let slow = credproxy::fakes::serve(listener().await, None, |_, _| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        credproxy::fakes::respond(http::StatusCode::OK, "text/plain", "finally")
    });
    let proxy = env
        .proxy(&format!(
            "providers:\n  p:\n    headers: {{x-k: v}}\nroutes:\n  - {{host: api.example.com, provider: p, connect_to: '{}', upstream_scheme: http}}\n",
            slow.addr
        ))
        .await;
    let admin = proxy.admin_addr.unwrap();
    // One keep-alive connection to the admin port, as a load balancer's health check keeps.
    let checker = direct_client();
    let readyz = format!("http://{admin}/readyz");
    assert_eq!(get(&checker, &readyz).await.status(), 200);
    let c = client(proxy.addr);
    let request = tokio::spawn(async move {
        c.get("http://api.example.com/slow")
            .send()
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(proxy.shutdown(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = get(&checker, &readyz).await;
    assert_eq!(r.status(), 503, "draining is not ready");
    assert_eq!(r.text().await.unwrap(), "starting or stopping\n");
    assert_eq!(request.await.unwrap().expect("the request finished"), 200);
    stopping.await.unwrap();
}

#[tokio::test]
async fn an_open_https_tunnel_follows_a_reload() {
    let env = Env::new();
    let fake = env.tls_echo().await;
    let path = env.write("config.yaml", &yaml(&env, fake.addr, fake.addr, "v1"));
    let proxy = start_proxy(&path).await;
    // HTTP/1.1 with keep-alive: both requests travel in the same intercepted tunnel.
    let c = env.https_client(proxy.addr, vec![env.proxy_ca()], false);
    let echo = echoed(get(&c, "https://api.example.com/__echo").await).await;
    assert_eq!(header_values(&echo, "x-k"), ["v1"]);
    std::fs::write(&path, yaml(&env, fake.addr, fake.addr, "v2")).unwrap();
    proxy.reload().await.unwrap();
    let echo = echoed(get(&c, "https://api.example.com/__echo").await).await;
    assert_eq!(
        header_values(&echo, "x-k"),
        ["v2"],
        "the tunnel opened before the reload uses the new config"
    );
}

#[tokio::test]
async fn per_core_threads_share_the_connections_and_drain_together() {
    let env = Env::new();
    // Answers with the credential it received; `/slow` and `/slower` take 1.5 and 3 s, to be in
    // flight at shutdown.
    let upstream = credproxy::fakes::serve(
        listener().await,
        Some(env.tls.clone()),
        |req, _| async move {
            match req.uri().path() {
                "/slow" => tokio::time::sleep(Duration::from_millis(1500)).await,
                "/slower" => tokio::time::sleep(Duration::from_millis(3000)).await,
                _ => {}
            }
            let k = req
                .headers()
                .get("x-k")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned();
            credproxy::fakes::respond(http::StatusCode::OK, "text/plain", k)
        },
    );
    let proxy = env
        .proxy(&format!(
            "runtime: {{threads: 2, shape: per_core}}
providers:
  p:
    headers: {{x-k: v-1}}
routes:
  - {{host: api.example.com, provider: p, connect_to: '{}'}}
",
            upstream.addr
        ))
        .await;
    // Four client connections, one after the other, so they alternate between the threads:
    // plain HTTP (thread 0), an HTTPS tunnel (1), another tunnel (0), plain HTTP again (1). The
    // tunnels are intercepted, so their TLS and requests run on their connection's thread.
    let plain = [client(proxy.addr), client(proxy.addr)];
    let tunnels = [
        env.https_client(proxy.addr, vec![env.proxy_ca()], false),
        env.https_client(proxy.addr, vec![env.proxy_ca()], false),
    ];
    let urls = ["http://api.example.com/x", "https://api.example.com/x"];
    for (c, url) in [
        (&plain[0], urls[0]),
        (&tunnels[0], urls[1]),
        (&tunnels[1], urls[1]),
        (&plain[1], urls[0]),
    ] {
        for _ in 0..3 {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.text().await.unwrap(), "v-1");
        }
    }
    let admin = proxy.admin_addr.unwrap();
    let runtime = || async move {
        let (_, status) = admin_get(admin, "/status").await;
        serde_json::from_str::<serde_json::Value>(&status).unwrap()["runtime"].clone()
    };
    let expected =
        serde_json::json!({"shape": "per_core", "threads": 2, "connections_by_thread": [2, 2]});
    assert_eq!(
        runtime().await,
        expected,
        "connections go to each thread in turn"
    );
    // A slow request on each connection of thread 1, plain and intercepted: shutdown waits for
    // both, whichever thread they run on.
    // (The plain one takes longer, so that the tunnel's drain cannot cover for it.)
    let slow = |c: &reqwest::Client, url: &str, path: &str| {
        let request = c.get(url.replace("/x", path)).send();
        tokio::spawn(async move { request.await?.text().await })
    };
    let slow_plain = slow(&plain[1], urls[0], "/slower");
    let slow_tunnel = slow(&tunnels[0], urls[1], "/slow");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        runtime().await,
        expected,
        "the slow requests reuse their connections"
    );
    proxy.shutdown(Duration::from_secs(10)).await;
    for slow in [slow_plain, slow_tunnel] {
        assert_eq!(
            slow.await.unwrap().expect("the request in flight finished"),
            "v-1"
        );
    }
}
