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
pub mod providers;
pub mod route;
pub mod secret;
pub mod token;

pub use listen::{Running, start};
