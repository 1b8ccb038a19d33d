//! The host loop shared by the simulator (`sim/`) and the runtime
//! (`runtime/`): it performs a node's outputs in order against a [`Store`]
//! and an [`Io`] (network, timers, subscribers).
//!
//! CONS-CRASH-1 / NODE-STORE-1: outputs are performed strictly in order and
//! a store write returns only once durable, so every record and block is on
//! disk before any message that depends on it leaves. A store error stops
//! the loop at that output: the caller must halt the node (it may not send
//! what it could not persist) and restart it from its store.

use super::{CommittedBlock, NodeOutput, PeerId, Store, Timer, WireMessage};
use crate::block::BlockOutcome;
use crate::encoding::Canonical;
use crate::types::{Hash32, Height};

/// The effects a host provides besides storage. Sends are fire-and-forget:
/// the network may lose them, and the protocol tolerates that.
pub trait Io {
    fn send(&mut self, to: PeerId, message: WireMessage);
    fn broadcast(&mut self, message: WireMessage);
    /// To every peer but `from` (NODE-GOSSIP-3).
    fn relay(&mut self, from: PeerId, message: WireMessage);
    /// Feed `Timer` back to the node at or after `at_ms` (node clock).
    fn set_timer(&mut self, timer: Timer, at_ms: u64);
    /// A block was committed and stored.
    fn committed(&mut self, block: &CommittedBlock, outcome: &BlockOutcome);
    /// The verdict on a client's transaction.
    fn tx_result(&mut self, id: Hash32, result: Result<(), super::MempoolError>);
    /// NODE-MP-8: a pooled transaction was dropped unincluded (default: ignored).
    fn tx_dropped(&mut self, _id: Hash32, _reason: super::DropReason) {}
}

/// Performs `outputs` in order. On a store error, returns it with the number
/// of outputs already performed; nothing after the failed write happened.
pub fn perform<S: Store, I: Io>(
    outputs: Vec<NodeOutput>,
    store: &mut S,
    io: &mut I,
) -> Result<(), (usize, S::Error)> {
    for (done, output) in outputs.into_iter().enumerate() {
        match output {
            NodeOutput::Persist(record) => store.persist_record(&record).map_err(|e| (done, e))?,
            NodeOutput::PersistBlock(candidate) => {
                store.persist_candidate(&candidate).map_err(|e| (done, e))?
            }
            NodeOutput::Broadcast(message) => io.broadcast(message),
            NodeOutput::Relay { from, message } => io.relay(from, message),
            NodeOutput::Send { to, message } => io.send(to, message),
            NodeOutput::SetTimer { timer, at_ms } => io.set_timer(timer, at_ms),
            NodeOutput::Committed { block, outcome } => {
                store.save_block(&block).map_err(|e| (done, e))?;
                io.committed(&block, &outcome);
            }
            NodeOutput::ServeBlocks {
                to,
                from_height,
                to_height,
                max_bytes,
            } => {
                let blocks =
                    read_blocks(store, from_height, to_height, max_bytes).map_err(|e| (done, e))?;
                if !blocks.is_empty() {
                    io.send(to, WireMessage::Blocks(blocks));
                }
            }
            NodeOutput::TxResult { id, result } => io.tx_result(id, result),
            NodeOutput::TxDropped { id, reason } => io.tx_dropped(id, reason),
        }
    }
    Ok(())
}

/// Blocks `from ..= to` that the store holds, stopping at the first gap
/// and (NODE-SYNC-5) before the block that would take the canonical bytes
/// past `max_bytes`; the first block is always taken.
fn read_blocks<S: Store>(
    store: &S,
    from: Height,
    to: Height,
    max_bytes: u64,
) -> Result<Vec<CommittedBlock>, S::Error> {
    assert!(from <= to, "the driver asks for a non-empty range");
    let mut blocks = Vec::new();
    let mut bytes = 0u64;
    for h in from..=to {
        let Some(b) = store.block(h)? else { break };
        bytes = bytes.saturating_add(b.encode().len() as u64);
        if !blocks.is_empty() && bytes > max_bytes {
            break;
        }
        blocks.push(b);
    }
    Ok(blocks)
}

/// Every block a store holds, in order (replay at start-up).
pub fn stored_blocks<S: Store>(store: &S) -> Result<Vec<CommittedBlock>, S::Error> {
    let last = store.last_height()?;
    if last == 0 {
        return Ok(Vec::new());
    }
    read_blocks(store, 1, last, u64::MAX)
}

/// An [`Io`] that records what it was asked to do (tests and simple hosts).
#[derive(Debug, Default)]
pub struct RecordingIo {
    pub sent: Vec<(Option<PeerId>, WireMessage)>,
    /// Relays: `(from, message)`, to every peer but `from`.
    pub relayed: Vec<(PeerId, WireMessage)>,
    pub timers: Vec<(Timer, u64)>,
    pub committed: Vec<(CommittedBlock, BlockOutcome)>,
    pub tx_results: Vec<(Hash32, Result<(), super::MempoolError>)>,
    pub dropped: Vec<(Hash32, super::DropReason)>,
}

impl Io for RecordingIo {
    fn send(&mut self, to: PeerId, message: WireMessage) {
        self.sent.push((Some(to), message));
    }
    fn broadcast(&mut self, message: WireMessage) {
        self.sent.push((None, message));
    }
    fn relay(&mut self, from: PeerId, message: WireMessage) {
        self.relayed.push((from, message));
    }
    fn set_timer(&mut self, timer: Timer, at_ms: u64) {
        self.timers.push((timer, at_ms));
    }
    fn committed(&mut self, block: &CommittedBlock, outcome: &BlockOutcome) {
        self.committed.push((block.clone(), outcome.clone()));
    }
    fn tx_result(&mut self, id: Hash32, result: Result<(), super::MempoolError>) {
        self.tx_results.push((id, result));
    }
    fn tx_dropped(&mut self, id: Hash32, reason: super::DropReason) {
        self.dropped.push((id, reason));
    }
}
