//! credproxy: a local HTTP forward proxy that adds API credentials to requests.
//!
//! The request path, one module per stage: [`listen`] → [`route`] → [`credentials`] →
//! [`forward`] (which calls [`outbound`] to leave the host). [`connect`] handles CONNECT
//! (interception or a blind tunnel) and [`upgrade`] WebSocket handshakes; both end in
//! [`relay`]. [`config`] decides what is valid, [`error`] decides what the client sees when the
//! proxy itself answers, and [`providers`] holds one module per credential kind. [`fakes`] are
//! faithful local stand-ins for the real providers, used by `credproxy demo` and the tests.
#![deny(clippy::unwrap_used)]

pub mod access;
pub mod admin;
pub mod body;
pub mod ca;
pub mod config;
pub mod connect;
pub mod credentials;
pub mod demo;
pub mod error;
pub mod fakes;
pub mod forward;
pub mod listen;
pub mod logs;
pub mod metrics;
pub mod mitm;
pub mod outbound;
pub mod pinned;
pub mod providers;
pub mod relay;
pub mod route;
pub mod secret;
pub mod token;
pub mod upgrade;
pub mod watchdog;
pub mod workers;

pub use listen::{Running, start};

/// The tokio runtime `main` runs on, for `runtime.threads` and `runtime.shape`: 1 thread is one
/// current_thread runtime, N a multi-thread runtime with N workers; 0 (the commands that are not
/// `run`) is tokio's default. With `shape: per_core` it is a current_thread runtime, and
/// [`start`] adds the other N − 1 threads, each with a current_thread runtime of its own.
pub fn runtime(threads: usize, shape: config::Shape) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        0 => tokio::runtime::Runtime::new(),
        n if n == 1 || shape == config::Shape::PerCore => {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}
