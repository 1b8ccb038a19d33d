//! Keys of the committed state and the set of keys a block touched (spec/state.md, STATE-*).
//!
//! Every piece of committed state lives under a [`StateKey`]: a namespace byte
//! and the key's bytes. The state root (STATE-2) is a sparse Merkle tree over
//! `SHA3-256(ns ‖ key)` → `SHA3-256(canonical value bytes)`. Subsystems record
//! every key they write in a [`Touched`] set, so the root is updated in
//! proportion to what a block changed (STATE-3) and a store persists only those.

/// Namespaces of the committed state (STATE-1). Values are part of the protocol:
/// changing one changes every state root.
pub mod ns {
    /// Account (balance, nonce) by address.
    pub const ACCOUNT: u8 = 0x01;
    /// Validator record by address.
    pub const VALIDATOR: u8 = 0x02;
    /// Unbonding queue entry by (release height, address, sequence).
    pub const UNBONDING: u8 = 0x03;
    /// Chain-wide scalars (supply counters, base fee, pools) under fixed keys.
    pub const GLOBAL: u8 = 0x04;
    /// GPU node registry by node address.
    pub const NODE: u8 = 0x05;
    /// Settled inference receipts by receipt id (replay protection).
    pub const RECEIPT: u8 = 0x06;
    /// Downtime window of a validator by address.
    pub const LIVENESS: u8 = 0x07;
    /// Inference allowances by id (ALW-1).
    pub const ALLOWANCE: u8 = 0x08;
    /// Settled usage by (allowance id, request id) (INV-RECEIPT-ONCE, TX-15).
    pub const USAGE_SETTLED: u8 = 0x09;
    /// PoL DAG blocks by block id.
    pub const POL_BLOCK: u8 = 0x10;
    /// PoL delta commitments by commitment hash.
    pub const POL_DELTA_COMMIT: u8 = 0x11;
    /// PoL pending deltas (evaluation state) by delta id.
    pub const POL_PENDING: u8 = 0x12;
    /// PoL model heads by model (meta block) id and target.
    pub const POL_HEAD: u8 = 0x13;
    /// Expert/layer registry by (model id, kind, layer, expert).
    pub const POL_REGISTRY: u8 = 0x14;
    /// Reward claims accrued in the current epoch.
    pub const REWARD_CLAIM: u8 = 0x20;
    /// Reward pool accounting of the current epoch.
    pub const REWARD_POOL: u8 = 0x21;
}

/// A key of the committed state: namespace byte plus key bytes (STATE-1).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StateKey {
    pub ns: u8,
    pub key: Vec<u8>,
}

impl StateKey {
    pub fn new(ns: u8, key: impl Into<Vec<u8>>) -> StateKey {
        StateKey {
            ns,
            key: key.into(),
        }
    }

    /// The key's position in the sparse Merkle tree: SHA3-256(ns ‖ key) (STATE-2).
    pub fn path(&self) -> [u8; 32] {
        crate::crypto::sha3_256_parts(&[&[self.ns], &self.key])
    }
}

/// The keys written while applying a block, in sorted order (STATE-3). A
/// persistent set, so snapshotting the ledger before each transaction (to roll
/// back a failed one) stays O(1).
pub type Touched = imbl::OrdSet<StateKey>;
