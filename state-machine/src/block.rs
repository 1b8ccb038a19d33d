//! Blocks, headers, evidence and receipts (spec/ledger.md BLOCK-*).

use crate::consensus::Vote;
use crate::crypto::sha3_256;
use crate::encoding::Canonical;
use crate::state::StateKey;
use crate::tx::SignedTx;
use crate::types::{Address, Amount, Hash32, Height};
use rkyv::{Archive, Deserialize, Serialize};

/// BLOCK-1: the header; its canonical hash is the block hash.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct BlockHeader {
    pub height: Height,
    /// Milliseconds since the Unix epoch, chosen by consensus; strictly
    /// greater than the parent's (BLOCK-2). The ledger never reads a clock.
    pub time_ms: u64,
    /// Hash of the parent header; for height 1 the genesis hash.
    pub prev_hash: Hash32,
    pub proposer: Address,
    /// CONS-COMM-2: on the last block of an epoch, the proposer's VRF proof
    /// for its ticket (the next epoch's seed); `None` on every other block.
    pub ticket: Option<crate::consensus::VrfProof>,
    /// FEE-2: this block's base fee, a function of the parent's.
    pub base_fee_per_gas: u128,
    pub gas_limit: u64,
    pub gas_used: u64,
    /// BLOCK-3: SHA3-256 of the canonical encoding of the [`BlockBody`].
    pub body_hash: Hash32,
    /// STATE-2: the state root after applying this block.
    pub state_root: Hash32,
    /// BLOCK-5: SHA3-256 of the canonical encoding of the receipts.
    pub receipts_hash: Hash32,
}

/// CONS-EV-3: a vote with its ECDSA signature, as evidence carries it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct SignedVote {
    pub vote: Vote,
    pub signature: [u8; 64],
}

/// SLASH-1: what a validator did wrong. It carries everything needed to check
/// it from the block alone: the ledger re-verifies the signatures against the
/// validator set of the infraction height (SLASH-3, CONS-EV-2).
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub enum Misbehaviour {
    /// Two signed votes by one validator for the same height, round and type
    /// with different values, in ascending order of their vote (one pair, one form).
    DuplicateVote {
        vote_a: SignedVote,
        vote_b: SignedVote,
    },
}

impl Misbehaviour {
    pub fn validator(&self) -> Address {
        match self {
            Misbehaviour::DuplicateVote { vote_a, .. } => vote_a.vote.validator,
        }
    }
    pub fn height(&self) -> Height {
        match self {
            Misbehaviour::DuplicateVote { vote_a, .. } => vote_a.vote.height,
        }
    }
}

/// BLOCK-3: everything in a block but its header. Evidence comes before
/// transactions and is applied first.
#[derive(Clone, Debug, PartialEq, Eq, Default, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct BlockBody {
    pub evidence: Vec<Misbehaviour>,
    /// SLASH-2: validators whose precommits form the commit certificate of the
    /// parent block, in ascending address order. Empty in block 1.
    pub last_commit_signers: Vec<Address>,
    pub txs: Vec<SignedTx>,
}

#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Block {
    pub header: BlockHeader,
    pub body: BlockBody,
}

impl Block {
    pub fn hash(&self) -> Hash32 {
        self.header.hash()
    }
}

/// BLOCK-4: the outcome of one transaction.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Receipt {
    pub tx_id: Hash32,
    pub sender: Address,
    pub gas_used: u64,
    /// Fee paid: `gas_used × (base fee + priority)`.
    pub fee_paid: Amount,
    /// `None` on success, else the reason the transaction failed (it still paid its fee).
    pub failure: Option<String>,
}

impl BlockBody {
    pub fn body_hash(&self) -> Hash32 {
        sha3_256(&self.encode())
    }
}

/// BLOCK-5: hash of the receipts of a block, in transaction order.
pub fn receipts_hash(receipts: &[Receipt]) -> Hash32 {
    sha3_256(&receipts.to_vec().encode())
}

/// What applying a block produced, besides the new state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockOutcome {
    pub receipts: Vec<Receipt>,
    /// STATE-3: every state key the block wrote, in order; a store persists just these.
    pub changed_keys: Vec<StateKey>,
    /// STAKE-5: the new active validator set (address, voting power), when it changed.
    pub validator_set_update: Option<Vec<(Address, u64)>>,
    /// What happened besides the transactions' receipts, in order.
    pub events: Vec<Event>,
}

/// BLOCK-6: effects of a block that are not transaction receipts.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Event {
    /// SLASH-1/SLASH-2: stake burned from a validator (bonded and unbonding).
    Slashed {
        validator: Address,
        amount: Amount,
        double_sign: bool,
    },
    /// SLASH-2: jailed until the given height.
    Jailed {
        validator: Address,
        until_height: Height,
    },
    /// SLASH-1: removed for good.
    Tombstoned { validator: Address },
    /// STAKE-3: unbonded stake or a node bond returned to its owner.
    UnbondingReleased { owner: Address, amount: Amount },
    /// RWD-5: rewards minted at a reward-epoch boundary.
    RewardsMinted { recipient: Address, amount: Amount },
    /// POL-38: a PoL decision or expiry at the end of the block.
    Pol(Box<crate::pol::PolEvent>),
    /// ALW-4: an allowance's grace period ended; the rest went back to its owner.
    AllowanceReleased {
        allowance: Hash32,
        owner: Address,
        refund: Amount,
    },
}
