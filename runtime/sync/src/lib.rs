//! Concurrent structures the runtime shares between tasks and threads, kept
//! in their own crate so they can be model-checked with loom cheaply
//! (`cargo test -p blyan-sync --features loom --release`): with the `loom`
//! feature every `Mutex` and `Arc` here is loom's, and the tests in
//! `tests/loom.rs` explore every interleaving of small scenarios.
//!
//! - [`TokenTable`]: the API's registry of announced nodes and their tokens
//!   (SYNC-1).
//! - [`ByteCache`]: the weight cache in front of the blob store, bounded in
//!   bytes (SYNC-2).
//!
//! The node's mempool needs no such structure: it is owned by the node task
//! and reached only through a bounded channel (see runtime ARCHITECTURE.md).
#![forbid(unsafe_code)]

pub mod sync {
    //! `std::sync` or loom's model of it.
    #[cfg(feature = "loom")]
    pub use loom::sync::{Arc, Mutex, MutexGuard};
    #[cfg(not(feature = "loom"))]
    pub use std::sync::{Arc, Mutex, MutexGuard};
}

mod cache;
mod tokens;

pub use cache::ByteCache;
pub use tokens::{TokenTable, TokenTableFull};
