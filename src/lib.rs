//! credproxy: a local HTTP forward proxy that adds API credentials to requests.
//!
//! The request path, one module per stage: [`listen`] → [`route`] → [`credentials`] →
//! [`forward`] (which calls [`outbound`] to leave the host). [`config`] decides what is valid,
//! [`error`] decides what the client sees when the proxy itself answers, and [`providers`] holds
//! one module per credential kind. [`fakes`] are faithful local stand-ins for the real providers,
//! used by `credproxy demo` and the tests.
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
pub mod route;
pub mod secret;
pub mod token;

pub use listen::{Running, start};

/// The tokio runtime for `runtime.threads`: 1 is one current_thread runtime, N a multi-thread
/// runtime with N workers; 0 (the commands that are not `run`) is tokio's default.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Runtime::new(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}
