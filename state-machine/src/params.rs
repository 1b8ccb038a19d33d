//! Chain parameters, fixed at genesis (spec/ledger.md PARAM-*).

use crate::types::{Amount, BLY};
use rkyv::{Archive, Deserialize as RDeserialize, Serialize as RSerialize};
use serde::{Deserialize, Serialize};

/// EIP-1559 `INITIAL_BASE_FEE` (FEE-1).
pub const INITIAL_BASE_FEE: u128 = 1_000_000_000;
/// EIP-1559 `BASE_FEE_MAX_CHANGE_DENOMINATOR` (FEE-2).
pub const BASE_FEE_MAX_CHANGE_DENOMINATOR: u128 = 8;
/// EIP-1559 `ELASTICITY_MULTIPLIER` (FEE-2).
pub const ELASTICITY_MULTIPLIER: u64 = 2;

/// Gas charged per transaction kind (FEE-4). Execution is not metered: a
/// transaction uses exactly its kind's gas, so `gas_used` is known before execution.
pub mod gas {
    pub const TRANSFER: u64 = 21_000;
    pub const BOND: u64 = 50_000;
    pub const UNBOND: u64 = 50_000;
    pub const UNJAIL: u64 = 30_000;
    pub const SETTLE_INFERENCE: u64 = 60_000;
    pub const REGISTER_NODE: u64 = 80_000;
    pub const REGISTER_NODE_PER_BLOCK: u64 = 500;
    pub const DEREGISTER_NODE: u64 = 40_000;
    pub const POL_REGISTER_BLOCK: u64 = 100_000;
    pub const POL_PER_PARENT: u64 = 1_000;
    pub const POL_COMMIT: u64 = 30_000;
    pub const POL_REVEAL_DELTA: u64 = 80_000;
    pub const POL_ATTEST_COMMIT: u64 = 30_000;
    pub const POL_ATTEST_REVEAL: u64 = 40_000;
    pub const OPEN_ALLOWANCE: u64 = 60_000;
    pub const OPEN_ALLOWANCE_PER_NODE: u64 = 1_000;
    pub const CLOSE_ALLOWANCE: u64 = 30_000;
    pub const SETTLE_USAGE: u64 = 40_000;
    pub const SETTLE_USAGE_PER_ITEM: u64 = 2_000;
    pub const SETTLE_USAGE_PER_SHARE: u64 = 500;
    pub const SET_VRF_KEY: u64 = 50_000;
}

/// Every protocol parameter, chosen at genesis (PARAM-1).
#[derive(
    Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Archive, RSerialize, RDeserialize,
)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// FEE-3: most gas one block may use.
    pub block_gas_limit: u64,
    /// FEE-1: base fee of block 1.
    #[serde(with = "crate::types::amount_str")]
    pub initial_base_fee: u128,
    /// Largest number of transactions in one block.
    pub max_block_txs: u32,
    /// BLOCK-8: most bytes of transactions in one block, the sum of their
    /// canonical encodings (the seed's max block size, 1 MB: 1 MiB here;
    /// ~5,000 transfers of 208 bytes).
    pub max_block_bytes: u32,
    /// STAKE-5: validator-set changes apply at multiples of this height,
    /// which also end the committee's epochs (CONS-COMM-2, at most
    /// `MAX_EPOCH_LENGTH`).
    pub epoch_length_blocks: u64,
    /// STAKE-3: unbonding stake is released this many blocks after it starts.
    pub unbonding_period_blocks: u64,
    /// STAKE-5: most validators in the active set.
    pub max_validators: u32,
    /// STAKE-2: least bonded stake for a validator to be active.
    #[serde(with = "crate::types::amount_str")]
    pub min_validator_stake: Amount,
    /// SLASH-1: fraction of stake slashed for double signing, in basis points.
    pub slash_double_sign_bps: u32,
    /// SLASH-2: fraction slashed for downtime, in basis points.
    pub slash_downtime_bps: u32,
    /// SLASH-2: the downtime window, in blocks.
    pub signed_blocks_window: u32,
    /// SLASH-2: least fraction of the window a validator must sign, in basis points.
    pub min_signed_per_window_bps: u32,
    /// SLASH-2: blocks a validator stays jailed after downtime.
    pub downtime_jail_blocks: u64,
    /// SLASH-3: evidence older than this many blocks is rejected; < unbonding period.
    pub max_evidence_age_blocks: u64,
    /// Most evidence items in one block.
    pub max_block_evidence: u32,
    /// TX-9: least bond of a GPU node.
    #[serde(with = "crate::types::amount_str")]
    pub node_min_bond: Amount,
    /// Proof-of-Learning parameters (spec/pol.md POL-P1).
    pub pol: crate::pol::PolParams,
    /// Reward policy (spec/rewards.md RWD-P1).
    pub rewards: crate::rewards::RewardParams,
    /// ALW-5: what clients pay per 1,000 tokens (prompt plus completion)
    /// served under an allowance (the seed's 1 BLY, §8.2).
    #[serde(with = "crate::types::amount_str")]
    pub inference_price_per_1k_tokens: Amount,
    /// ALW-4: blocks after an allowance's end during which usage served
    /// before it may still be settled; the rest is refunded after them.
    pub allowance_grace_blocks: u64,
    /// TX-13: longest an allowance may last, in blocks.
    pub max_allowance_blocks: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            block_gas_limit: 100_000_000,
            initial_base_fee: INITIAL_BASE_FEE,
            max_block_txs: 10_000,
            max_block_bytes: 1_048_576,
            epoch_length_blocks: 100,
            unbonding_period_blocks: 1_000,
            max_validators: 100,
            min_validator_stake: BLY,
            slash_double_sign_bps: 500,
            slash_downtime_bps: 100,
            signed_blocks_window: 100,
            min_signed_per_window_bps: 5_000,
            downtime_jail_blocks: 300,
            max_evidence_age_blocks: 500,
            max_block_evidence: 16,
            node_min_bond: 100 * BLY,
            pol: crate::pol::PolParams::default(),
            rewards: crate::rewards::RewardParams::default(),
            inference_price_per_1k_tokens: BLY,
            // 10 minutes at the seed's 2 s blocks.
            allowance_grace_blocks: 300,
            // 30 days at 2 s blocks.
            max_allowance_blocks: 1_296_000,
        }
    }
}

impl Params {
    /// PARAM-2: relations the parameters must satisfy; checked at genesis.
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(bool, &str); 11] = [
            (
                self.block_gas_limit >= 2 * gas::POL_REGISTER_BLOCK,
                "block_gas_limit too small",
            ),
            (
                self.initial_base_fee > 0,
                "initial_base_fee must be positive",
            ),
            (
                self.epoch_length_blocks > 0
                    && self.epoch_length_blocks <= crate::consensus::committee::MAX_EPOCH_LENGTH,
                "epoch_length_blocks must be 1 to 65,536 (CONS-COMM-2)",
            ),
            (self.max_validators > 0, "max_validators must be positive"),
            (
                self.slash_double_sign_bps <= 10_000 && self.slash_downtime_bps <= 10_000,
                "slash fractions above 100%",
            ),
            (
                self.signed_blocks_window > 0 && self.signed_blocks_window <= 10_000,
                "signed_blocks_window out of 1..=10000",
            ),
            (
                self.min_signed_per_window_bps <= 10_000,
                "min_signed_per_window_bps above 100%",
            ),
            (
                self.max_evidence_age_blocks < self.unbonding_period_blocks,
                "max_evidence_age_blocks must be below unbonding_period_blocks (SLASH-3)",
            ),
            (
                self.min_validator_stake >= crate::types::BLY,
                "min_validator_stake must be at least 1 BLY (one unit of voting power)",
            ),
            (
                self.allowance_grace_blocks > 0,
                "allowance_grace_blocks must be positive (ALW-4: settling needs a window)",
            ),
            (
                self.max_allowance_blocks > 0,
                "max_allowance_blocks must be positive",
            ),
        ];
        if let Some((_, why)) = checks.iter().find(|(ok, _)| !ok) {
            return Err((*why).to_string());
        }
        self.pol.validate().map_err(|e| e.to_string())?;
        self.rewards.validate().map_err(|e| e.to_string())
    }

    /// FEE-4: gas of a PoL transaction.
    pub fn pol_gas(tx: &crate::pol::PolTx) -> u64 {
        use crate::pol::PolTx;
        match tx {
            PolTx::RegisterBlock(b) => gas::POL_REGISTER_BLOCK
                .saturating_add(gas::POL_PER_PARENT.saturating_mul(b.depends_on.len() as u64)),
            PolTx::RevealDelta(b) => gas::POL_REVEAL_DELTA
                .saturating_add(gas::POL_PER_PARENT.saturating_mul(b.depends_on.len() as u64)),
            PolTx::CommitDelta { .. } => gas::POL_COMMIT,
            PolTx::CommitAttestation { .. } => gas::POL_ATTEST_COMMIT,
            PolTx::RevealAttestation { .. } => gas::POL_ATTEST_REVEAL,
        }
    }
}
