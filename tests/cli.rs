//! The `credproxy` binary as a user runs it: config checking, logs, and the demo.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credproxy::fakes::{stackbill, twotcloud};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_credproxy");

/// Kills the child when the test ends, pass or fail.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn check_config(path: &std::path::Path) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(path)
        .env_remove("CREDPROXY_CONFIG")
        .output()
        .expect("run credproxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_bad_config_exits_2_with_file_line_column_key_and_reason() {
    let env = Env::new();
    let cases: &[(&str, &[&str])] = &[
        (
            "listen: 127.0.0.1:8080\nlisen: 1\n",
            &[":2:1: lisen: unknown field `lisen`"],
        ),
        (
            "providers:\n  billing:\n    basic: {username: a, password: b}\nroutes:\n  - host: api.cloudnet.services\n    provider: biling\n",
            &[":6:15: routes[0].provider: unknown provider `biling`; did you mean `billing`?"],
        ),
        (
            "providers:\n  p:\n    headers: {x-k: v}\nroutes:\n  - host: 'api.*.com'\n    provider: p\n",
            &[":5:11: routes[0].host: `*` is allowed only as the whole first label"],
        ),
        (
            "providers:\n  p:\n    headers: {x-k: v}\nroutes:\n  - host: a.com\n    provider: p\n  - host: A.com\n    provider: p\n",
            &[
                ":7:11: routes[1].host: routes[0] (`a.com`) already matches the same host and path prefix",
            ],
        ),
        (
            "providers:\n  p:\n    headers:\n      x-k: env:CREDPROXY_TEST_NOT_SET_ANYWHERE\n      x-j: file:/nonexistent/credproxy/key\nroutes:\n  - host: a.com\n    provider: q\n",
            &[
                ":4:12: providers.p.headers.x-k: environment variable CREDPROXY_TEST_NOT_SET_ANYWHERE is not set",
                ":5:12: providers.p.headers.x-j: cannot read file /nonexistent/credproxy/key",
                ":8:15: routes[0].provider: unknown provider `q`",
            ],
        ),
        ("routes:\n\t- host: a\n", &[":2:"]),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let path = env.write(&format!("bad{i}.yaml"), yaml);
        let (code, stderr) = check_config(&path);
        assert_eq!(code, 2, "exit code for:\n{yaml}\nstderr: {stderr}");
        for e in *expected {
            let line = format!("{}{e}", path.display());
            assert!(stderr.contains(&line), "expected `{line}` in:\n{stderr}");
        }
        assert_eq!(
            stderr.lines().count(),
            expected.len(),
            "one line per problem, nothing else:\n{stderr}"
        );
    }

    // `run` refuses the same file the same way, and says it did not start.
    let path = env.write("bad-run.yaml", "listen: 127.0.0.1:8080\nlisen: 1\n");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:2:1: lisen:", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("not started"), "{stderr}");

    let (code, stderr) = check_config(std::path::Path::new("/nonexistent/credproxy.yaml"));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("/nonexistent/credproxy.yaml: cannot read the config file"),
        "{stderr}"
    );
}

#[test]
fn the_example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml");
    let text = std::fs::read_to_string(&path).expect("config.example.yaml exists");
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config").arg(&path);
    // Give every `env:NAME` it references a value, as a user would.
    for part in text.split("env:").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            cmd.env(name, "example-value");
        }
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

/// Collects a child's output in the background.
fn capture(stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let mut b = b.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    buf
}

fn wait_for(buf: &Arc<Mutex<String>>, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = buf.lock().unwrap().clone();
        if text.contains(what) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "`{what}` never appeared; output so far:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn secrets_never_reach_the_logs_even_at_trace_level() {
    let env = Env::new();
    const KEY: &str = "SECRET-2t-key-do-not-log";
    const SB_KEY: &str = "SECRET-sb-apikey-do-not-log";
    const SB_SECRET: &str = "SECRET-sb-secret-do-not-log";
    const CLIENT_OWN: &str = "SECRET-client-own-do-not-log";
    let two_t = twotcloud::start(
        listener().await,
        Some(env.tls.clone()),
        vec![billing_key(KEY)],
    );
    let sb = stackbill::start(
        listener().await,
        Some(env.tls.clone()),
        stackbill::Keys {
            api_key: SB_KEY.into(),
            secret_key: SB_SECRET.into(),
        },
    );
    const OAUTH_SECRET: &str = "SECRET-oauth-client-secret-do-not-log";
    let (connexa, _issuer) = env.oauth_fake("client.acme", OAUTH_SECRET).await;
    let key_file = env.write("key", KEY);
    let config = env.write_config(&format!(
        "providers:
  billing:
    basic: {{username: '100234', password: 'file:{}'}}
  sb:
    headers: {{apikey: 'env:CREDPROXY_TEST_SB_KEY', secretKey: '{SB_SECRET}'}}
  connexa:
    oauth2:
      token_url: 'https://{{host}}/api/v1/oauth/token'
      client_id: client.acme
      client_secret: 'env:CREDPROXY_TEST_OAUTH_SECRET'
      client_auth: query
      connect_to: '{connexa}'
routes:
  - {{host: api.cloudnet.services, path_prefix: /v3, provider: billing, connect_to: '{}'}}
  - {{host: portal.stackbill.example, provider: sb, connect_to: '{}'}}
  - {{host: down.example.com, provider: sb, connect_to: '127.0.0.1:{}'}}
  - {{host: '*.api.openvpn.com', provider: connexa, connect_to: '{connexa}'}}
",
        key_file.display(),
        two_t.addr,
        sb.addr,
        closed_port().await,
        connexa = connexa.addr,
    ));
    let proxy = Binary::run(
        &config,
        &[
            ("RUST_LOG", "trace".as_ref()),
            ("CREDPROXY_TEST_SB_KEY", SB_KEY.as_ref()),
            ("CREDPROXY_TEST_OAUTH_SECRET", OAUTH_SECRET.as_ref()),
        ],
    );
    let addr = proxy.addr;

    let c = client(addr);
    let r = send(
        c.get("http://api.cloudnet.services/v3/invoices?apikey=query-is-not-logged")
            .header("authorization", format!("Bearer {CLIENT_OWN}")),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = get(&c, "http://portal.stackbill.example/restapi/zone/zonelist").await;
    assert_eq!(r.status(), 200);
    let r = get(&c, "http://acme.api.openvpn.com/api/v1/networks").await;
    assert_eq!(r.status(), 200);
    let echo = echoed(get(&c, "http://acme.api.openvpn.com/__echo").await).await;
    let bearer = header_values(&echo, "authorization")[0].clone();
    let access_token = bearer.trim_start_matches("Bearer ").to_string();
    assert!(access_token.len() > 20, "{bearer}");
    // Refused before routing: the log says which request, without its query.
    let two_hosts = raw(addr, b"PATCH http://api.cloudnet.services/v3/x?apikey=refused-query-secret HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n").await;
    assert!(two_hosts.contains("duplicate_host"), "{two_hosts}");
    let r = get(&c, "http://down.example.com/x").await;
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.log().contains("down.example.com") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs = proxy.log();
    drop(proxy);
    assert!(
        logs.contains("TRACE") || logs.contains("trace"),
        "the run really logged at trace level"
    );
    assert!(logs.len() > 2000, "trace logging produced output");
    let refusal = logs
        .lines()
        .find(|l| l.contains("request refused"))
        .expect("the refusal is logged");
    for part in ["PATCH", "api.cloudnet.services", "duplicate_host"] {
        assert!(refusal.contains(part), "{part} in {refusal}");
    }
    let basic = basic("100234", KEY);
    let basic_b64 = basic.trim_start_matches("Basic ");
    for secret in [
        KEY,
        SB_KEY,
        SB_SECRET,
        CLIENT_OWN,
        basic_b64,
        "query-is-not-logged",
        "refused-query-secret",
        OAUTH_SECRET,
        access_token.as_str(),
    ] {
        assert!(!logs.contains(secret), "`{secret}` leaked into the logs");
        assert!(
            !body.contains(secret),
            "`{secret}` leaked into an error body"
        );
    }
}

#[test]
fn demo_prints_curl_commands_that_work_only_through_the_proxy() {
    let mut child = Command::new(BIN)
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = capture(child.stdout.take().unwrap());
    let _stderr = capture(child.stderr.take().unwrap());
    let _guard = Running(child);
    let text = wait_for(&stdout, "Press Ctrl-C");

    let checks: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("through credproxy:"))
        .collect();
    let compared: Vec<&str> = checks
        .iter()
        .copied()
        .filter(|l| l.contains("no credentials"))
        .collect();
    assert!(compared.len() >= 8, "{text}");
    for line in &checks {
        assert!(
            line.contains("through credproxy: HTTP 200 OK")
                || line.contains("through credproxy: HTTP 201 Created"),
            "{line}"
        );
    }
    for line in &compared {
        assert!(
            line.contains("no credentials: HTTP 403 Forbidden")
                || line.contains("no credentials: HTTP 401 Unauthorized"),
            "{line}"
        );
    }
    let curls: Vec<&str> = text.lines().filter(|l| l.starts_with("curl ")).collect();
    assert_eq!(curls.len(), checks.len(), "{text}");
    for cmd in curls {
        let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
        assert!(
            out.status.success(),
            "`{cmd}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if cmd.contains("__echo") {
            let echo: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let auth = echo["headers"]["authorization"][0].as_str().unwrap_or("");
            assert!(
                auth.starts_with("Basic "),
                "the fake saw the injected header: {echo}"
            );
        }
    }
}

#[test]
fn systemd_credentials_and_literal_secret_warnings() {
    let env = Env::new();
    let creds = env.dir.path().join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("billing-key"), "from-systemd-credential\n").unwrap();
    let path = env.write(
        "config.yaml",
        "providers:\n  billing:\n    basic: {username: '100234', password: 'credential:billing-key'}\n  sb:\n    headers: {apikey: literal-secret-in-file}\n",
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // The literal is accepted with a warning that names the key, never the value.
    assert!(
        stderr.contains("providers.sb.headers.apikey: the secret is written in the config file"),
        "{stderr}"
    );
    assert!(!stderr.contains("literal-secret-in-file"));

    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("providers.billing.basic.password: credential:billing-key: $CREDENTIALS_DIRECTORY is not set"),
        "{stderr}"
    );
}

#[tokio::test]
async fn runtime_threads_shape_the_runtime_and_logs_off_a_terminal_have_no_colour_codes() {
    for (threads, shape, flavor) in [
        (1, "multi_thread", "current_thread"),
        (3, "multi_thread", "multi_thread"),
        (2, "per_core", "per_core"),
    ] {
        let env = Env::new();
        let upstream = credproxy::fakes::echo::start(listener().await, None);
        let config = env.write_config(&format!(
            "runtime: {{threads: {threads}, shape: {shape}}}
providers:
  p:
    headers: {{x-api-key: 'env:CREDPROXY_TEST_KEY'}}
routes:
  - {{host: api.example.com, provider: p, upstream_scheme: http, connect_to: '{}'}}
",
            upstream.addr
        ));
        let proxy = tokio::task::spawn_blocking(move || {
            Binary::run(&config, &[("CREDPROXY_TEST_KEY", "k-123".as_ref())])
        })
        .await
        .unwrap();
        for _ in 0..20 {
            // A connection each: under per_core they alternate between the threads.
            let c = client(proxy.addr);
            let echo = echoed(get(&c, "http://api.example.com/x").await).await;
            assert_eq!(header_values(&echo, "x-api-key"), ["k-123"]);
        }
        // Request lines are written in batches: wait for the last one.
        let deadline = Instant::now() + Duration::from_secs(30);
        while proxy.log().matches("request_id=").count() < 20 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = proxy.log();
        assert_eq!(log.matches("request_id=").count(), 20, "{log}");
        assert!(
            log.contains(&format!("runtime threads={threads} flavor={flavor}")),
            "{log}"
        );
        assert!(!log.contains('\x1b'), "colour codes in a piped log:\n{log}");
    }
}

/// The demo takes `--port`, `--port`+1 and `--port`+2: a port too high for that is refused by
/// the argument parser, instead of a start that fails on a clash it made itself.
#[test]
fn demo_refuses_a_port_without_room_for_its_three_listeners() {
    let out = Command::new(BIN)
        .args(["demo", "--port", "65534"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("65534 is not in 0..=65533"), "{stderr}");
}

/// Under `DynamicUser=` the service owns no file in /etc: a CA of one's own comes in as systemd
/// credentials (`LoadCredential=`), named `credential:NAME` in the config.
#[test]
fn a_ca_of_ones_own_can_come_as_systemd_credentials() {
    let env = Env::new();
    let creds = env.dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let path = env.write(
        "ca.yaml",
        "ca: {cert: 'credential:ca-cert', key: 'credential:ca-key'}\nproviders:\n  p:\n    headers: {x-k: env:HOME}\nroutes:\n  - {host: a.example, provider: p}\n",
    );
    let (code, stderr) = check_config(&path);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(":1:39: ca.key: credential:ca-key: $CREDENTIALS_DIRECTORY is not set"),
        "{stderr}"
    );
    let out = Command::new(BIN)
        .args(["ca", "path", "-c"])
        .arg(&path)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{}\n{}\n",
            creds.join("ca-cert").display(),
            creds.join("ca-key").display()
        )
    );
}

/// A port in use stops the start (exit 1, not 2: the file is fine) with the setting that asked
/// for it, before anything claims to be listening.
#[test]
fn a_port_in_use_names_its_setting_and_nothing_claims_to_listen() {
    let env = Env::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = env.write(
        "busy.yaml",
        &env.base_yaml().replace(
            "admin: {listen: '127.0.0.1:0'}",
            &format!("admin: {{listen: '127.0.0.1:{port}'}}"),
        ),
    );
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot listen on 127.0.0.1:{port} (admin.listen):"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    // `check-config` takes `-c FILE` like every other command.
    let out = Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Under systemd, stderr is the journal (`JOURNAL_STREAM` names it): each line carries its
/// priority, so `journalctl -p warning` finds the warnings. Redirected elsewhere, it does not.
#[test]
fn log_lines_carry_their_priority_only_into_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let path = env.write("config.yaml", &env.base_yaml());
    for journal in [false, true] {
        let log_path = env.dir.path().join(format!("stderr-{journal}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let meta = log.metadata().unwrap();
        let stream = if journal {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .env("JOURNAL_STREAM", stream)
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let _running = Running(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let text = loop {
            let text = std::fs::read_to_string(&log_path).unwrap();
            if text.contains("admin endpoints on") || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let listening = text
            .lines()
            .find(|l| l.contains("forward proxy listening"))
            .unwrap_or_else(|| panic!("{text}"));
        assert_eq!(listening.starts_with("<6>"), journal, "{text}");
        if !journal {
            continue;
        }
        // A refused reload's problems are lines of their own, each an error.
        std::fs::write(&path, env.base_yaml() + "bogus: 1\n").unwrap();
        let pid = _running.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        let text = loop {
            let text = std::fs::read_to_string(&log_path).unwrap();
            if text.contains("unknown field `bogus`") || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let problem = text
            .lines()
            .find(|l| l.contains("unknown field `bogus`"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(problem.starts_with("<3>"), "{text}");
        // A start that fails says why as errors too.
        let log = std::fs::File::create(&log_path).unwrap();
        let meta = log.metadata().unwrap();
        let out = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
            .stderr(log)
            .status()
            .unwrap();
        assert_eq!(out.code(), Some(2));
        let text = std::fs::read_to_string(&log_path).unwrap();
        assert!(text.lines().count() >= 2, "{text}");
        assert!(text.lines().all(|l| l.starts_with("<3>")), "{text}");
    }
}
