//! The crate's error type (spec/ledger.md BLOCK-7).
//!
//! Everything here is a *protocol* rejection: deterministic, the same on every
//! node, and part of consensus. The core has no internal failures (no IO); a
//! broken invariant is a bug and panics via `assert!`.

use crate::encoding::EncodingError;
use crate::types::{Address, Amount, Hash32, Height};

/// Why a transaction was rejected. `Invalid*` reasons make a block invalid
/// (TX-11); the others are recorded in a failed receipt that still pays its fee (TX-12).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    // --- TX-11: the transaction cannot be included at all.
    #[error("invalid signature or public key")]
    InvalidSignature,
    #[error("wrong nonce: account expects {expected}, transaction has {got}")]
    InvalidNonce { expected: u64, got: u64 },
    #[error("max fee per gas {max_fee} is below the base fee {base_fee}")]
    InvalidFeeBelowBaseFee { max_fee: u128, base_fee: u128 },
    #[error("max priority fee per gas exceeds max fee per gas")]
    InvalidPriorityAboveMax,
    #[error("gas limit {limit} is below the {intrinsic} gas this transaction uses")]
    InvalidGasLimit { limit: u64, intrinsic: u64 },
    #[error("balance {balance} cannot pay the maximum fee {needed}")]
    InvalidCannotPayMaxFee { balance: Amount, needed: Amount },
    #[error("block gas limit exceeded")]
    InvalidBlockGasExceeded,
    // --- TX-12: included, failed, fee paid.
    #[error("insufficient balance: have {balance}, need {needed}")]
    InsufficientBalance { balance: Amount, needed: Amount },
    #[error("amount must be positive")]
    ZeroAmount,
    #[error("{0} is not a validator")]
    NotValidator(Address),
    #[error("bonded stake {bonded} is less than {requested}")]
    InsufficientStake { bonded: Amount, requested: Amount },
    #[error("validator is tombstoned")]
    Tombstoned,
    #[error("validator is not jailed")]
    NotJailed,
    #[error("validator is jailed until height {until}")]
    StillJailed { until: Height },
    #[error("bonded stake is below the minimum validator stake")]
    BelowMinStake,
    #[error("receipt signature is invalid")]
    ReceiptBadSignature,
    #[error("only the serving node may settle a receipt")]
    ReceiptWrongNode,
    #[error("receipt expired at height {0}")]
    ReceiptExpired(Height),
    #[error("receipt already settled")]
    ReceiptAlreadySettled,
    #[error("quality {0} outside 500..=1500 milli")]
    ReceiptQualityOutOfRange(u32),
    #[error("node already registered")]
    NodeAlreadyRegistered,
    #[error("node not registered")]
    NodeNotRegistered,
    #[error("node bond {bond} below minimum {min}")]
    NodeBondTooSmall { bond: Amount, min: Amount },
    #[error("node info too large")]
    NodeInfoTooLarge,
    #[error("arithmetic overflow")]
    Overflow,
    #[error("allowance: {0}")]
    AllowanceTerms(String),
    #[error("no such allowance")]
    AllowanceUnknown,
    #[error("only the allowance's owner may close it")]
    AllowanceNotOwner,
    #[error("allowance already closed at height {0}")]
    AllowanceClosed(Height),
    #[error("allowance settlement window ended at height {0}")]
    AllowanceSettlementOver(Height),
    #[error("usage item {index}: {reason}")]
    UsageItem { index: usize, reason: String },
    #[error("usage settlement of {items} items, not 1..={max}")]
    UsageBatchSize { items: usize, max: usize },
    #[error("request {0} already settled against this allowance (INV-RECEIPT-ONCE)")]
    UsageAlreadySettled(String),
    #[error("usage costs {cost}, more than the {available} left for this node (INV-ALW-CAP)")]
    AllowanceExceeded { cost: Amount, available: Amount },
    #[error("node may not settle this allowance: {0}")]
    AllowanceNodeNotAllowed(String),
    #[error("proof-of-learning: {0}")]
    Pol(String),
    #[error("rewards: {0}")]
    Reward(String),
    #[error("VRF key already registered (CONS-COMM-8: a VRF key is set once)")]
    VrfKeyAlreadySet,
    #[error("not a valid VRF public key (CONS-VRF-2)")]
    InvalidVrfKey,
}

impl TxError {
    /// TX-11: does this rejection make the whole block invalid?
    pub fn invalidates_block(&self) -> bool {
        matches!(
            self,
            TxError::InvalidSignature
                | TxError::InvalidNonce { .. }
                | TxError::InvalidFeeBelowBaseFee { .. }
                | TxError::InvalidPriorityAboveMax
                | TxError::InvalidGasLimit { .. }
                | TxError::InvalidCannotPayMaxFee { .. }
                | TxError::InvalidBlockGasExceeded
        )
    }
}

/// The crate's one error enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid genesis: {0}")]
    Genesis(String),
    #[error("wrong height: expected {expected}, block has {got}")]
    WrongHeight { expected: Height, got: Height },
    #[error("previous hash does not match the last block")]
    WrongPrevHash,
    #[error("block time {got} ms is not after the parent's {parent} ms")]
    TimeNotIncreasing { parent: u64, got: u64 },
    #[error("proposer {0} is not in the active validator set")]
    UnknownProposer(Address),
    /// CONS-COMM-7: the proposer is outside the epoch's committee.
    #[error("proposer {0} is not eligible to propose in this epoch (CONS-COMM-7)")]
    IneligibleProposer(Address),
    /// CONS-COMM-2: a boundary block without its proposer's ticket proof.
    #[error("the last block of an epoch must carry its proposer's ticket proof")]
    MissingTicket,
    /// CONS-COMM-2: a ticket where none belongs (not a boundary block, or a
    /// proposer without a VRF key).
    #[error("a ticket proof on a block that takes none")]
    UnexpectedTicket,
    /// CONS-COMM-2: a ticket proof that does not verify.
    #[error("the ticket proof is invalid: {0}")]
    InvalidTicket(String),
    #[error("base fee {got} differs from the expected {expected}")]
    WrongBaseFee { expected: u128, got: u128 },
    #[error("gas limit {got} differs from the chain's {expected}")]
    WrongGasLimit { expected: u64, got: u64 },
    #[error("header gas used {header} differs from the {computed} the transactions use")]
    WrongGasUsed { header: u64, computed: u64 },
    #[error("too many transactions: {got} > {max}")]
    TooManyTxs { got: usize, max: usize },
    #[error("transactions take {got} bytes, more than the block's {max}")]
    BlockTooLarge { got: u64, max: u64 },
    #[error("body hash does not match the header")]
    WrongBodyHash,
    #[error(
        "state root {} differs from the computed {}",
        hex::encode(header),
        hex::encode(computed)
    )]
    WrongStateRoot { header: Hash32, computed: Hash32 },
    #[error("receipts hash does not match the header")]
    WrongReceiptsHash,
    #[error("transaction {index} is invalid: {error}")]
    InvalidTx { index: usize, error: TxError },
    #[error("evidence {index} is invalid: {reason}")]
    InvalidEvidence { index: usize, reason: String },
    #[error("the active set is not a valid consensus validator set: {0}")]
    InvalidValidatorSet(String),
    #[error("commit signers are invalid: {0}")]
    InvalidSigners(String),
    #[error(transparent)]
    Encoding(#[from] EncodingError),
    /// STATE-4: committed state entries that do not form a ledger.
    #[error("invalid state entries: {0}")]
    BadState(String),
    /// SYNC-4..6: a state-sync snapshot (manifest or chunk) that is refused.
    #[error("snapshot refused: {0}")]
    BadSnapshot(String),
}
