//! Blyan's deterministic core.
//!
//! Everything the chain decides, as a replayable state machine: the ledger
//! (accounts, nonces, EIP-1559 fees, staking and slashing), the Proof-of-Learning
//! DAG with its acceptance rule, and the reward policy. Given the same genesis and
//! the same blocks it produces the same state root on every machine.
//!
//! What this crate deliberately does **not** do: IO, clocks, OS randomness,
//! threads, floating point, or iteration in hash order. Time enters only as a
//! field of a block header chosen by consensus. Those rules are what make replay
//! and simulation possible.
#![forbid(unsafe_code)]

pub mod allowance;
pub mod block;
pub mod consensus;
pub mod crypto;
pub mod encoding;
pub mod error;
pub mod genesis;
pub mod ledger;
pub mod memo;
pub mod node;
pub mod params;
pub mod pol;
pub mod rewards;
pub mod smt;
pub mod state;
pub mod testkit;
pub mod tx;
pub mod types;

pub use error::{Error, TxError};
