//! The node driver: consensus, mempool and ledger composed into one sans-IO
//! state machine (spec/node.md, NODE-*).
//!
//! - [`driver`]: [`Node::handle`]`(now_ms, input) -> outputs`, in the style of
//!   quinn-proto and str0m: the host feeds peer messages, fired timers and
//!   client transactions, and performs the outputs in order.
//! - [`mempool`]: the bounded, deterministic transaction pool.
//! - [`store`]: the [`Store`] trait the host persists through (pure: no fjall,
//!   no tokio) and [`MemStore`], an in-memory implementation.
//! - [`host`]: [`host::perform`], the output loop shared by the simulator and
//!   the runtime; it honours persist-before-send (CONS-CRASH-1).

pub mod driver;
pub mod host;
pub mod mempool;
pub mod snapshot;
pub mod store;

pub use driver::{ConsensusSets, Node, NodeConfig};
pub use host::{Io, perform};
pub use mempool::{DropReason, Mempool, MempoolConfig, MempoolError};
pub use store::{MemStore, Store};

use crate::block::{Block, BlockOutcome};
use crate::consensus::{CommitCertificate, Proposal, Record, Round, Signed, TimeoutKind, Vote};
use crate::tx::SignedTx;
use crate::types::{Address, Hash32, Height};
use rkyv::{Archive, Deserialize, Serialize};

/// A peer is named by the address of its node key.
pub type PeerId = Address;

/// The signature of votes and proposals on the wire (ECDSA secp256k1, CONS-SIG-2).
pub type Sig = [u8; 64];

/// NODE-SYNC-1: a block with the certificate that committed it. Anyone with
/// the validator set of its height can check it.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct CommittedBlock {
    pub block: Block,
    pub certificate: CommitCertificate<Sig>,
}

/// NODE-STORE-5: a block this node proposed or locked on at the height in
/// progress, with the parent's certificate it travels with; persisted so a
/// restarted validator can propose it again (CONS-CRASH-2).
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct ProposedBlock {
    pub block: Block,
    pub last_commit: Option<CommitCertificate<Sig>>,
}

/// NODE-WIRE-1: what nodes send each other. Canonically encoded on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum WireMessage {
    /// A proposal with the block it names and, from height 2 on, the
    /// certificate of the parent (its signers are the block's
    /// `last_commit_signers`, SLASH-2).
    Proposal {
        proposal: Signed<Proposal, Sig>,
        block: Box<Block>,
        last_commit: Option<CommitCertificate<Sig>>,
    },
    Vote(Signed<Vote, Sig>),
    /// Transaction gossip.
    Tx(Box<SignedTx>),
    /// NODE-SYNC-2: "send me committed blocks from this height on".
    BlockRequest {
        from_height: Height,
    },
    /// NODE-SYNC-3: committed blocks in ascending height order, at most
    /// [`NodeConfig::sync_batch_blocks`].
    Blocks(Vec<CommittedBlock>),
    /// NODE-GOSSIP-2: what the sender holds of its round (CometBFT's
    /// `PeerState` from `NewRoundStep` and `VoteSetBits`): a peer answers
    /// with exactly what it has and the sender lacks.
    Status(PeerStatus),
}

/// NODE-GOSSIP-2: a node's round and which of the round's messages it holds.
/// Bitmaps are indexed by position in the height's validator set (ascending
/// address), bit `i % 8` of byte `i / 8`; at most `MAX_VALIDATORS` bits.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct PeerStatus {
    pub height: Height,
    pub round: crate::consensus::Round,
    pub has_proposal: bool,
    pub prevotes: Vec<u8>,
    pub precommits: Vec<u8>,
}

impl PeerStatus {
    /// Whether bit `index` is set (missing bytes are zeros).
    pub fn has(bitmap: &[u8], index: usize) -> bool {
        bitmap
            .get(index / 8)
            .is_some_and(|b| b & (1 << (index % 8)) != 0)
    }
}

impl WireMessage {
    /// The height a consensus message belongs to.
    pub fn consensus_height(&self) -> Option<Height> {
        match self {
            WireMessage::Proposal { proposal, .. } => Some(proposal.message.height),
            WireMessage::Vote(v) => Some(v.message.height),
            WireMessage::Status(s) => Some(s.height),
            _ => None,
        }
    }
}

/// The timers a node sets. Firing a stale timer is harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// A timeout of Algorithm 1 (CONS-TIME-1).
    Consensus {
        kind: TimeoutKind,
        height: Height,
        round: Round,
    },
    /// NODE-TIME-1: start `height` (the block interval after the last one started).
    StartHeight { height: Height },
    /// NODE-SYNC-2: an unanswered block request may be retried.
    SyncRetry,
    /// NODE-GOSSIP-1: send this height's own messages again.
    Rebroadcast { height: Height },
}

/// What the host feeds the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeInput {
    Message {
        from: PeerId,
        message: WireMessage,
    },
    Timer(Timer),
    /// A transaction submitted by a client of this node.
    ClientTx(SignedTx),
}

/// What the node asks of its host, to be performed in order.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeOutput {
    /// CONS-CRASH-1: make durable before performing any later output.
    Persist(Record<Sig>),
    /// NODE-STORE-5: make durable before performing any later output.
    PersistBlock(Box<ProposedBlock>),
    Broadcast(WireMessage),
    /// NODE-GOSSIP-3: to every peer but `from`, which has it (it sent it).
    Relay {
        from: PeerId,
        message: WireMessage,
    },
    Send {
        to: PeerId,
        message: WireMessage,
    },
    /// Feed [`NodeInput::Timer`] at (or after) `at_ms`.
    SetTimer {
        timer: Timer,
        at_ms: u64,
    },
    /// A block committed: store it (durably, before later outputs) and
    /// publish its outcome.
    Committed {
        block: Box<CommittedBlock>,
        outcome: Box<BlockOutcome>,
    },
    /// NODE-SYNC-3: send `to` a [`WireMessage::Blocks`] read from the store
    /// (heights `from_height ..= to_height`), NODE-SYNC-5: no more blocks
    /// than fit in `max_bytes` of canonical encoding (at least one).
    ServeBlocks {
        to: PeerId,
        from_height: Height,
        to_height: Height,
        max_bytes: u64,
    },
    /// The verdict on a [`NodeInput::ClientTx`].
    TxResult {
        id: Hash32,
        result: Result<(), MempoolError>,
    },
    /// NODE-MP-8: a pooled transaction left the pool without being included.
    TxDropped {
        id: Hash32,
        reason: DropReason,
    },
}
