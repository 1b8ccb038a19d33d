//! Messages of the consensus protocol (spec/consensus.md, CONS-MSG-*).

use crate::encoding::Canonical;
use crate::types::{Address, Hash32, Height};
use rkyv::{Archive, Deserialize, Serialize};

/// A round number within a height; the paper's `round_p`. Round 0 is the first.
pub type Round = u32;

/// The id of a proposed value: the block hash (the paper's `id(v)`).
pub type ValueId = Hash32;

/// CONS-MSG-2: the two kinds of vote.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Archive, Serialize, Deserialize,
)]
#[rkyv(derive(Debug))]
pub enum VoteType {
    Prevote,
    Precommit,
}

/// CONS-MSG-2: `⟨PREVOTE|PRECOMMIT, h, r, id(v) | nil⟩` by `validator`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Vote {
    pub vote_type: VoteType,
    pub height: Height,
    pub round: Round,
    /// `None` is the paper's `nil`.
    pub value: Option<ValueId>,
    pub validator: Address,
}

/// CONS-MSG-1: `⟨PROPOSAL, h, r, v, validRound⟩` by `proposer`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Proposal {
    pub height: Height,
    pub round: Round,
    pub value: ValueId,
    /// The paper's `validRound`; `None` is `-1`.
    pub valid_round: Option<Round>,
    pub proposer: Address,
}

impl Vote {
    /// The canonical bytes a signature covers (with a domain tag and the chain id, SIG-1).
    pub fn signing_body(&self) -> Vec<u8> {
        self.encode()
    }
}

impl Proposal {
    pub fn signing_body(&self) -> Vec<u8> {
        self.encode()
    }
}

/// A message with its signature under scheme `Sig` (CONS-SIG-1).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Archive, Serialize, Deserialize)]
pub struct Signed<T, Sig> {
    pub message: T,
    pub signature: Sig,
}

/// What travels between validators.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Message<Sig> {
    Proposal(Signed<Proposal, Sig>),
    Vote(Signed<Vote, Sig>),
}

impl<Sig> Message<Sig> {
    pub fn height(&self) -> Height {
        match self {
            Message::Proposal(p) => p.message.height,
            Message::Vote(v) => v.message.height,
        }
    }
    pub fn round(&self) -> Round {
        match self {
            Message::Proposal(p) => p.message.round,
            Message::Vote(v) => v.message.round,
        }
    }
}

/// The three timeouts of Algorithm 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeoutKind {
    Propose,
    Prevote,
    Precommit,
}

/// The step of a round (the paper's `step_p`), ordered as in the paper (L36 `step ≥ prevote`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    Propose,
    Prevote,
    Precommit,
    /// A decision was made at this height; the host must start the next one.
    Decided,
}
