//! Blyan's effectful runtime: everything that touches the outside world
//! (disk, network, clocks, operating-system randomness) around the pure core in
//! `blyan-state-machine`. The runtime executes the core's outputs; it never
//! makes protocol decisions itself.
//!
//! - [`keystore`]: encrypted key files; [`store`]: the fjall `node::Store`;
//! - [`service`]: the tokio task that owns a `Node` and performs its outputs;
//! - [`transport`]: gRPC (tonic) over mutual TLS 1.3 ([`tls`]: certificates
//!   bound to the node key), signed frames, behind [`transport::Outbound`];
//!   [`inbound`]: admission of unauthenticated connections (NODE-NET-6);
//! - [`blobs`]: the content-addressed, chunked blob store (weights, datasets);
//! - [`api`]: the axum HTTP API (with [`ratelimit`], the [`registry`] of
//!   announced inference nodes, and [`inference`], the local engine behind
//!   `/chat`); [`client`]: a minimal HTTP client;
//! - [`model`]: the served model on chain (genesis registration, check);
//! - [`usage`]: usage records of served requests (fjall, PostgreSQL mirror);
//! - [`metrics`]: the operations series of `/metrics`; [`telemetry`]: logs
//!   (text or JSON, named by node) and OpenTelemetry traces;
//! - [`config`], [`node`] (wiring), [`devnet`], [`bench`] (the load
//!   benchmark), and the `blyan` binary.
//!
//! Not yet: TLS on the HTTP API (run it behind a reverse proxy).
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod bench;
pub mod bench_chat;
pub mod bench_open;
pub mod bench_sync;
pub mod billing;
pub mod blobs;
pub mod chaos;
pub mod client;
pub mod config;
pub mod corpus;
pub mod devnet;
pub mod devnet_procs;
pub mod error;
pub mod experts;
pub mod heartbeats;
pub mod http_server;
pub mod inbound;
pub mod inference;
pub mod keystore;
pub mod metrics;
pub mod model;
pub mod node;
pub mod own_tx;
pub mod pipeline;
#[cfg(feature = "inference")]
pub mod pol_cli;
#[cfg(feature = "inference")]
pub mod pol_eval;
#[cfg(feature = "inference")]
pub mod pol_serve;
pub mod ratelimit;
pub mod registry;
pub mod router;
pub mod service;
pub mod state_sync;
pub mod store;
pub mod telemetry;
pub mod template;
pub mod tls;
pub mod transport;
pub mod usage;

pub use error::Error;
