//! The yardstick for BENCHMARKS.md: the smallest hyper forwarder that adds one header, with
//! nothing of credproxy's (no routing, metrics, logs, access checks). It shows what this
//! machine allows a hyper-based proxy, so credproxy's own cost can be told apart.
//!
//!   cargo run --release --example bare_forwarder -- LISTEN UPSTREAM [THREADS] [pooled|pinned]
//!   e.g. 127.0.0.1:18485 127.0.0.1:18480 1
//!
//! Every request, whatever its URL, goes to UPSTREAM over plain HTTP with `x-api-key: bench-key`:
//! through hyper-util's pooled client (`pooled`, the default), or over one upstream connection
//! per client connection (`pinned`, as credproxy's `upstream.pin_connections` does).

use std::net::SocketAddr;

use http::{HeaderName, HeaderValue};

#[path = "support/bare.rs"]
mod bare;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: bare_forwarder LISTEN UPSTREAM [THREADS] [pooled|pinned]".into());
    }
    let listen: SocketAddr = args[1].parse()?;
    let upstream: SocketAddr = args[2].parse()?;
    let threads: usize = args.get(3).map_or(Ok(1), |t| t.parse())?;
    let mode = match args.get(4).map(String::as_str) {
        None | Some("pooled") => bare::Mode::Pooled,
        Some("pinned") => bare::Mode::Pinned,
        Some(other) => return Err(format!("unknown mode `{other}`: pooled or pinned").into()),
    };
    credproxy::runtime(threads, Default::default())?.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        bare::serve(
            listener,
            upstream,
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("bench-key"),
            mode,
        )
        .await?;
        Ok(())
    })
}
