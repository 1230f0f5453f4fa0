//! Property tests: whatever the input, parsing never panics — config files, host patterns,
//! networks, password hashes, and raw bytes sent to the proxy (which keeps serving afterwards).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use proptest::prelude::*;
use support::*;

/// YAML-ish text built from the config's own vocabulary, so the parser is driven deep.
fn config_text() -> impl Strategy<Value = String> {
    let words = prop::sample::select(vec![
        "listen",
        "unmapped",
        "routes",
        "providers",
        "host",
        "provider",
        "path_prefix",
        "basic",
        "headers",
        "oauth2",
        "token_url",
        "client_id",
        "client_secret",
        "egress",
        "bind",
        "proxy",
        "ca",
        "limits",
        "access",
        "allow_clients",
        "local_endpoints",
        "route",
        "- ",
        ": ",
        "\n",
        "  ",
        "{",
        "}",
        "[",
        "]",
        "*.",
        "env:",
        "file:",
        "127.0.0.1:0",
        "10s",
        "'",
        "\"",
        "&a",
        "*a",
        "!!str",
        "0",
        "-1",
        "yes",
    ]);
    prop::collection::vec(words, 0..60).prop_map(|w| w.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn config_parsing_never_panics(text in config_text()) {
        let _ = credproxy::config::from_yaml(&text, "p.yaml");
    }

    #[test]
    fn arbitrary_text_as_config_never_panics(text in ".{0,400}") {
        let _ = credproxy::config::from_yaml(&text, "p.yaml");
    }

    #[test]
    fn small_parsers_never_panic(s in ".{0,80}") {
        let _ = credproxy::route::HostPattern::parse(&s);
        let _ = credproxy::access::Cidr::parse(&s);
        let _ = credproxy::access::PasswordHash::parse(&s);
        let _ = credproxy::providers::exchange::placeholders(&s);
    }
}

/// Request-like bytes: a method, a target and headers from a vocabulary, plus noise.
fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
    let parts = prop::sample::select(vec![
        "GET ",
        "POST ",
        "CONNECT ",
        "http://",
        "https://",
        "api.example.com",
        ":443",
        ":0",
        "/",
        "..",
        "%2e",
        "?",
        " HTTP/1.1",
        " HTTP/1.0",
        " HTTP/2.0",
        "\r\n",
        "Host: ",
        "Content-Length: ",
        "Transfer-Encoding: chunked",
        "Connection: ",
        "Proxy-Authorization: Basic ",
        "x-k: ",
        "5",
        "-1",
        "99999999999999999999",
        "\r\n\r\n",
        "\0",
        "\u{7f}",
        "ü",
        "[",
        "]",
        "@",
    ]);
    (
        prop::collection::vec(parts, 0..30),
        prop::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(|(p, noise)| [p.concat().into_bytes(), noise].concat())
}

#[test]
fn arbitrary_requests_never_break_the_proxy() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = Env::new();
    let (proxy, fake) = rt.block_on(async {
        let fake = credproxy::fakes::echo::start(listener().await, None);
        let proxy = env.proxy(&http_route_yaml(fake.addr)).await;
        (proxy, fake)
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 150,
        ..ProptestConfig::default()
    });
    runner
        .run(&request_bytes(), |bytes| {
            rt.block_on(async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
                let _ = s.write_all(&bytes).await;
                let _ = s.shutdown().await;
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    s.read_to_end(&mut buf),
                )
                .await;
            });
            Ok(())
        })
        .unwrap();
    // Still healthy after all of that.
    rt.block_on(async {
        let r = get(&client(proxy.addr), "http://api.example.com/__echo").await;
        assert_eq!(r.status(), 200);
    });
    drop(fake);
}
