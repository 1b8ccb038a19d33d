//! The inference network's pure rules (spec/inference.md, RT-*): what the
//! runtime's router, stages and checkers decide, as code without sockets,
//! clocks, threads or hash-order iteration, so that every rule can be unit-
//! and property-tested on its own.
//!
//! - [`heartbeat`]: signed heartbeats and the bounded table of live holders
//!   (RT-HB-*).
//! - [`route`]: route planning over layer boundaries, MoE expert assignment,
//!   load spreading and failover (RT-ROUTE-*, RT-FAIL-*).
//! - [`commit`]: TOPLOC-style commitments to a stage's hidden states and the
//!   tolerant comparison rule (RT-COMMIT-*).
//! - [`spot`]: the keyed spot-check decision, the choice of checkers and the
//!   majority-of-three settlement (RT-SPOT-*).
//! - [`quarantine`]: time-bounded exclusion of a node that lost a settlement
//!   (RT-QUAR-*).
//! - [`fault`]: the signed record a third party needs to recompute a fault
//!   (RT-FAULT-*).
//! - [`detection`]: the detection-against-cost simulation behind
//!   `cargo run --release -p blyan-route --example detection` (RT-SIM-*).
//! - [`beacon`]: requests a router makes up to check nodes between client
//!   requests (RT-BEACON-*).
//! - [`rng`]: SplitMix64, the seeded generator of simulations and tests.
//!
//! Time enters only as `now_ms` arguments; rules use integers (µs, ppm,
//! bf16 bit patterns); hidden states enter as `f32` slices and leave as
//! integer commitments.
#![forbid(unsafe_code)]

pub mod beacon;
mod codec;
pub mod commit;
pub mod detection;
pub mod fault;
pub mod heartbeat;
pub mod quarantine;
pub mod rng;
pub mod route;
pub mod spot;

use blyan_state_machine::types::Address;

/// Parts per million: rates and fractions in the rules are integers.
pub const PPM: u32 = 1_000_000;

/// Every way a rule here refuses its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Bytes that are not a canonical encoding of the expected object.
    #[error("malformed {what}: {reason}")]
    Malformed {
        what: &'static str,
        reason: &'static str,
    },
    /// A list or blob longer than its bound.
    #[error("{what} too large: {len} > {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// RT-HB-2: the sender has no on-chain registration.
    #[error("heartbeat from {0}, which is not a registered node")]
    NotRegistered(Address),
    /// RT-HB-3: the stated sender is not the public key's address.
    #[error("sender {stated} does not match its public key's address {derived}")]
    WrongKey { stated: Address, derived: Address },
    /// RT-HB-3, RT-COMMIT-4, RT-FAULT-2: a signature that does not verify.
    #[error("invalid signature on {0}")]
    BadSignature(&'static str),
    /// RT-HB-4: a heartbeat addressed to another node.
    #[error("heartbeat addressed to {got}, not to this node {expected}")]
    WrongReceiver { expected: Address, got: Address },
    /// RT-HB-5: a timestamp too far ahead of the receiver's clock.
    #[error(
        "heartbeat timestamp {timestamp_ms} ms is more than {max_skew_ms} ms ahead of now ({now_ms} ms)"
    )]
    FromFuture {
        timestamp_ms: u64,
        now_ms: u64,
        max_skew_ms: u64,
    },
    /// RT-HB-5: a timestamp already past the expiry window.
    #[error(
        "heartbeat timestamp {timestamp_ms} ms is older than the {window_ms} ms expiry window (now {now_ms} ms)"
    )]
    TooOld {
        timestamp_ms: u64,
        now_ms: u64,
        window_ms: u64,
    },
    /// RT-HB-6: timestamps of one node must strictly increase.
    #[error(
        "heartbeat timestamp {timestamp_ms} ms is not after the node's last one ({last_ms} ms)"
    )]
    Replayed { timestamp_ms: u64, last_ms: u64 },
    /// RT-HB-8: one entry alone exceeds the table's byte bound.
    #[error("heartbeat entry of {bytes} bytes exceeds the table's bound of {max_bytes} bytes")]
    EntryTooLarge { bytes: usize, max_bytes: usize },
    /// RT-HB-1: a holding whose fields break the rules (ranges, order).
    #[error("invalid holding: {0}")]
    InvalidHolding(&'static str),
    /// RT-ROUTE-1: a model shape with no layers, or more than the bound.
    #[error("invalid model shape: {0}")]
    InvalidShape(&'static str),
    /// RT-ROUTE-3: no live, non-quarantined holder serves this layer.
    #[error("no live, non-quarantined node holds layer {layer}")]
    UncoveredLayer { layer: u32 },
    /// RT-ROUTE-4: no live, non-quarantined holder serves this expert.
    #[error("no live, non-quarantined node holds expert {expert} of layer {layer}")]
    UncoveredExpert { layer: u32, expert: u16 },
    /// RT-FAIL-1: the failed node is not in the plan.
    #[error("node {0} is not in the plan")]
    NotInPlan(Address),
    /// RT-COMMIT-1: a hidden state that is not `tokens × hidden` finite values.
    #[error("invalid hidden state: {0}")]
    InvalidHidden(&'static str),
    /// RT-COMMIT-1: a NaN or infinity in a hidden state.
    #[error("hidden state value {index} is not finite")]
    NonFinite { index: usize },
    /// RT-FAULT-2: a fault record whose parts do not belong together.
    #[error("inconsistent fault record: {0}")]
    InconsistentFault(&'static str),
    /// A configuration value outside its allowed range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),
}

/// Result of the rules in this crate.
pub type Result<T> = std::result::Result<T, Error>;
