//! Running as a service: live reload (in-process and by SIGHUP) and graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use credproxy::fakes::issuer::Issuer;
use credproxy::fakes::{echo, oauth};
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
    let fake = echo::start(listener().await, Some(env.tls.clone()));
    let issuer = Issuer::new(Duration::from_secs(3600));
    let connexa = oauth::start(
        listener().await,
        Some(env.tls.clone()),
        oauth::Settings {
            client_id: "cid".into(),
            client_secret: "cs".into(),
        },
        issuer.clone(),
    );
    let path = env.write("config.yaml", &yaml(&env, fake.addr, connexa.addr, "v1"));
    let proxy = credproxy::start(credproxy::config::load(&path).unwrap())
        .await
        .unwrap();
    let c = client(proxy.addr);
    assert_eq!(
        c.get("http://acme.api.openvpn.com/api/v1/networks")
            .send()
            .await
            .unwrap()
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
        proxy.reload().unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // A broken file is refused with its problems; the running config stays.
    std::fs::write(
        &path,
        yaml(&env, fake.addr, connexa.addr, "v5").replace("provider: p,", "provider: nope,"),
    )
    .unwrap();
    let err = proxy.reload().expect_err("broken file refused");
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
    let echo = echoed(c.get("http://api.example.com/__echo").send().await.unwrap()).await;
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
    let proxy = credproxy::start(credproxy::config::load(&path).unwrap())
        .await
        .unwrap();
    std::fs::write(
        &path,
        yaml(&env, fake.addr, fake.addr, "v1")
            .replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:1"),
    )
    .unwrap();
    let err = proxy.reload().expect_err("refused");
    assert!(err.contains("restart credproxy"), "{err}");
}

#[tokio::test]
async fn sighup_reloads_the_running_binary() {
    let env = Env::new();
    let fake = echo::start(listener().await, Some(env.tls.clone()));
    let path = env.write("config.yaml", &yaml(&env, fake.addr, fake.addr, "before"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_credproxy"))
        .args(["run", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let l = log.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            l.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let addr: std::net::SocketAddr = loop {
        let text = log.lock().unwrap().clone();
        if let Some(rest) = text.split("forward proxy listening on http://").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let c = client(addr);
    let echo = echoed(c.get("http://api.example.com/__echo").send().await.unwrap()).await;
    assert_eq!(header_values(&echo, "x-k"), ["before"]);
    std::fs::write(&path, yaml(&env, fake.addr, fake.addr, "after")).unwrap();
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut seen = String::new();
    for _ in 0..100 {
        let echo = echoed(c.get("http://api.example.com/__echo").send().await.unwrap()).await;
        seen = header_values(&echo, "x-k")[0].clone();
        if seen == "after" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        seen,
        "after",
        "SIGHUP applied the new file; log:\n{}",
        log.lock().unwrap()
    );
}
