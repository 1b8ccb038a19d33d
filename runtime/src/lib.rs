//! Blyan's effectful runtime: everything that touches the outside world
//! (disk, network, clocks, operating-system randomness) around the pure core in
//! `blyan-state-machine`. The runtime executes the core's outputs; it never
//! makes protocol decisions itself.
//!
//! So far: encrypted key files ([`keystore`]) and durable chain storage on
//! fjall ([`store`]). Storage on fjall, the transport,
//! the HTTP API and the `blyan` binary follow (issue 6).
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod config;
pub mod devnet;
pub mod error;
pub mod keystore;
pub mod node;
pub mod service;
pub mod store;
pub mod transport;

pub use error::Error;
