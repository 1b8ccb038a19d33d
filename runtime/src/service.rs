//! The node service: one tokio task owning a [`Node`], its [`ChainStore`]
//! and its timers. It feeds the node peer messages (from the transport),
//! client transactions (from the API) and fired timers, and performs the
//! outputs with [`node::host::perform`] — it makes no protocol decision.
//!
//! - Inputs arrive on bounded channels: [`Inbound`] from the transport,
//!   [`Request`] from the API.
//! - Timers: a [`TimerSet`] keyed by [`Timer`] (a timer set again replaces
//!   the earlier deadline), bounded by [`MAX_TIMERS`]; timers of heights the
//!   node has left are pruned.
//! - Outputs: records and blocks go to the store (synced before the next
//!   output, NODE-HOST-1), messages to [`Outbound`], committed blocks to a
//!   [`watch`] snapshot the API reads.
//! - A store error halts the node: the task logs it, marks the snapshot
//!   halted and exits (it may not send what it could not persist).
//!
//! The node clock is milliseconds since the Unix epoch
//! ([`crate::transport::now_ms`]).

use crate::Error;
use crate::store::{ChainStore, StoreReader};
use crate::transport::{Inbound, Outbound, now_ms};
use blyan_state_machine::block::BlockOutcome;
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::node::host::{self, Io};
use blyan_state_machine::node::{
    CommittedBlock, DropReason, MempoolError, Node, NodeConfig, NodeInput, NodeOutput, PeerId,
    Store, Timer, WireMessage,
};
use blyan_state_machine::tx::SignedTx;
use blyan_state_machine::types::{Hash32, Height};
use k256::ecdsa::SigningKey;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

/// Most timers held at once. The driver sets a handful per round; this bound
/// is only reached if timers of old heights were never pruned.
pub const MAX_TIMERS: usize = 1_024;
/// Client transactions whose submission time is remembered for the finality
/// histogram.
pub const MAX_TRACKED_TXS: usize = 10_000;
/// A tracked submission older than this is forgotten.
pub const TRACKED_TX_MAX_AGE_MS: u64 = 600_000;
/// Upper bounds (ms) of the finality-latency histogram buckets (+Inf implied).
pub const FINALITY_BUCKETS_MS: [u64; 8] = [100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000];

/// What the API asks of the node task.
#[derive(Debug)]
pub enum Request {
    /// Submit a client transaction; the reply is the mempool's verdict.
    SubmitTx {
        tx: Box<SignedTx>,
        reply: oneshot::Sender<Result<Hash32, MempoolError>>,
        /// OPS-TRACE-3: the submitting request's span, when traced.
        trace: crate::telemetry::TraceLink,
    },
}

/// Finality latency of client transactions submitted to this node: from
/// admission to the mempool to the commit of the block that includes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Cumulative counts per bucket of [`FINALITY_BUCKETS_MS`].
    pub buckets: [u64; FINALITY_BUCKETS_MS.len()],
    pub count: u64,
    pub sum_ms: u64,
}

impl Histogram {
    fn observe(&mut self, ms: u64) {
        for (b, le) in self.buckets.iter_mut().zip(FINALITY_BUCKETS_MS) {
            if ms <= le {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
    }
}

/// What the API sees of the node: published after every step.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The state after the last committed block (O(1) to clone).
    pub ledger: Ledger,
    /// The last committed block (`None` at genesis).
    pub latest: Option<Arc<CommittedBlock>>,
    /// The round of the height in progress, if this node votes in it.
    pub round: Option<u32>,
    pub is_validator: bool,
    pub mempool_txs: usize,
    pub peers_connected: usize,
    /// Transactions in blocks committed since this process started.
    pub committed_txs: u64,
    pub finality: Histogram,
    /// `Some(reason)` once the node has halted.
    pub halted: Option<String>,
}

impl Snapshot {
    /// Height of the last committed block.
    pub fn height(&self) -> Height {
        self.ledger.height()
    }
}

/// How the API reaches the node task.
#[derive(Clone)]
pub struct NodeHandle {
    pub requests: mpsc::Sender<Request>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub reader: StoreReader,
    pub chain_id: String,
    pub address: PeerId,
    /// The transport's refusals and drops, for `/metrics` (NODE-NET-7).
    pub net: Option<Arc<crate::transport::NetCounters>>,
    /// NODE-MP-8: transactions dropped from the pool unincluded.
    pub dropped: Arc<std::sync::Mutex<DroppedTxs>>,
    /// What the node task observes at each commit (OPS-MET-3).
    pub chain_metrics: Arc<crate::metrics::ChainMetrics>,
}

/// A bounded set of pending timers keyed by [`Timer`].
#[derive(Debug, Default)]
pub struct TimerSet {
    at_ms: BTreeMap<Timer, u64>,
}

impl TimerSet {
    /// Sets (or moves) `timer`. Drops timers of heights below `height` first
    /// when full; if still full, drops the lowest-keyed timer (the oldest
    /// height and round) with a warning.
    pub fn set(&mut self, timer: Timer, at_ms: u64, height: Height) {
        if self.at_ms.len() >= MAX_TIMERS && !self.at_ms.contains_key(&timer) {
            self.at_ms.retain(|t, _| match t {
                Timer::Consensus { height: h, .. }
                | Timer::StartHeight { height: h }
                | Timer::Rebroadcast { height: h } => *h >= height,
                Timer::SyncRetry => true,
            });
            if self.at_ms.len() >= MAX_TIMERS {
                let oldest = self.at_ms.pop_first();
                warn!(?oldest, "timer set full; dropped the oldest timer");
            }
        }
        self.at_ms.insert(timer, at_ms);
        assert!(self.at_ms.len() <= MAX_TIMERS);
    }

    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.at_ms.values().min().copied()
    }

    /// Removes and returns the timers due at `now_ms`, earliest first.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Timer> {
        let mut due: Vec<(u64, Timer)> = self
            .at_ms
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(t, at)| (*at, *t))
            .collect();
        due.sort();
        for (_, t) in &due {
            self.at_ms.remove(t);
        }
        due.into_iter().map(|(_, t)| t).collect()
    }

    pub fn len(&self) -> usize {
        self.at_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at_ms.is_empty()
    }
}

/// Channel bounds of the service.
pub const REQUEST_QUEUE: usize = 1_024;
pub const INBOUND_QUEUE: usize = 4_096;
/// NODE-SYNC-6: catch-up bytes served to one peer per second, and its burst
/// (each reply is charged `sync_batch_bytes`, 3 MiB: about 10 replies a
/// second, 20 at once).
pub const SYNC_SERVE_BYTES_PER_S: u64 = 32 * 1024 * 1024;
pub const SYNC_SERVE_BURST_BYTES: u64 = 64 * 1024 * 1024;
// NODE-NET-11: the channel holds at least every peer's quota
// (`transport::inbound_queue_len`), so a peer within its quota never waits.
/// Peer transactions taken off the inbound channel ahead of the consensus
/// messages behind them and not yet fed to the node.
pub const GOSSIP_BACKLOG: usize = 1_024;

/// A client transaction's id, where its verdict goes, and its request's span.
type ClientReply = (
    Hash32,
    oneshot::Sender<Result<Hash32, MempoolError>>,
    crate::telemetry::TraceLink,
);

/// The [`Io`] the host loop performs against.
struct HostIo<'a> {
    outbound: &'a dyn Outbound,
    timers: &'a mut TimerSet,
    height: Height,
    committed: Vec<(CommittedBlock, BlockOutcome)>,
    tx_results: Vec<(Hash32, Result<(), MempoolError>)>,
    dropped: Vec<(Hash32, DropReason)>,
}

impl Io for HostIo<'_> {
    fn send(&mut self, to: PeerId, message: WireMessage) {
        self.outbound.send(to, &message);
    }
    fn broadcast(&mut self, message: WireMessage) {
        self.outbound.broadcast(&message);
    }
    fn relay(&mut self, from: PeerId, message: WireMessage) {
        self.outbound.broadcast_except(from, &message);
    }
    fn set_timer(&mut self, timer: Timer, at_ms: u64) {
        self.timers.set(timer, at_ms, self.height);
    }
    fn committed(&mut self, block: &CommittedBlock, outcome: &BlockOutcome) {
        self.committed.push((block.clone(), outcome.clone()));
    }
    fn tx_result(&mut self, id: Hash32, result: Result<(), MempoolError>) {
        self.tx_results.push((id, result));
    }
    fn tx_dropped(&mut self, id: Hash32, reason: DropReason) {
        self.dropped.push((id, reason));
    }
}

/// NODE-MP-8 in the runtime: the most recent transactions dropped from this
/// node's pool unincluded, with why, for `GET /tx/{id}` (bounded: the oldest
/// record is forgotten first).
#[derive(Debug, Default)]
pub struct DroppedTxs {
    order: VecDeque<Hash32>,
    reasons: BTreeMap<Hash32, String>,
}

/// Dropped transactions remembered for `GET /tx/{id}`.
pub const MAX_DROPPED_RECORDS: usize = 65_536;

impl DroppedTxs {
    pub fn record(&mut self, id: Hash32, reason: &DropReason) {
        if self.reasons.insert(id, reason.to_string()).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > MAX_DROPPED_RECORDS {
            let old = self.order.pop_front().expect("non-empty");
            self.reasons.remove(&old);
        }
        debug_assert_eq!(self.order.len(), self.reasons.len());
    }

    /// Why `id` was dropped, if this node dropped it recently.
    pub fn reason(&self, id: &Hash32) -> Option<&str> {
        self.reasons.get(id).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// The task's state.
pub struct NodeService {
    node: Node,
    store: ChainStore,
    outbound: Arc<dyn Outbound>,
    timers: TimerSet,
    snapshot: watch::Sender<Arc<Snapshot>>,
    latest: Option<Arc<CommittedBlock>>,
    committed_txs: u64,
    finality: Histogram,
    /// Submission time of client transactions not yet committed (bounded),
    /// with the submitting request's span when traced (OPS-TRACE-3).
    submitted_ms: BTreeMap<Hash32, (u64, crate::telemetry::TraceLink)>,
    chain_metrics: Arc<crate::metrics::ChainMetrics>,
    halted: Option<String>,
    dropped: Arc<std::sync::Mutex<DroppedTxs>>,
    /// NODE-SYNC-6: what serving catch-up may cost per peer.
    serve_budget: crate::inbound::SyncServeBudget,
    /// NODE-ADMIT-*: the configured seed peers; `None` until set (then the
    /// transport's peer plan follows every commit).
    seeds: Option<Vec<crate::transport::Peer>>,
    /// SYNC-*: where snapshots go, every `.1` blocks (0: never); `.2` the
    /// height of the last one taken.
    snapshots: Option<(Arc<crate::state_sync::Snapshots>, u64, u64)>,
}

impl NodeService {
    /// Opens the store in `data_dir`, rebuilds the node from genesis and the
    /// stored blocks (NODE-STORE-4) and starts it. Returns the service (run it
    /// with [`NodeService::run`]) and the API's handle.
    pub fn open(
        config: NodeConfig,
        key: SigningKey,
        genesis: &Genesis,
        data_dir: &Path,
        outbound: Arc<dyn Outbound>,
    ) -> Result<(NodeService, NodeHandle, mpsc::Receiver<Request>), Error> {
        let config_mempool_txs = config.mempool.max_txs;
        // NODE-STORE-6: the node resumes from the verified stored state and
        // consensus sets; nothing is replayed (restart cost is O(state)).
        let (store, ledger) = ChainStore::open(data_dir, genesis)?;
        let latest = match store.last_height()? {
            0 => None,
            h => {
                Some(Arc::new(store.committed_block(h)?.ok_or_else(|| {
                    Error::Corrupt(format!("block {h} missing"))
                })?))
            }
        };
        let node = match &latest {
            None => Node::from_genesis(config, key, genesis)
                .map_err(|e| Error::Genesis(e.to_string()))?,
            Some(last) => Node::resume(
                config,
                key,
                genesis,
                ledger,
                (**last).clone(),
                store.consensus_sets().clone(),
            )
            .map_err(|e| Error::Corrupt(format!("resuming from the stored state: {e}")))?,
        };
        let (requests_tx, requests_rx) = mpsc::channel(REQUEST_QUEUE);
        let chain_metrics = Arc::new(crate::metrics::ChainMetrics::new(
            node.ledger(),
            config_mempool_txs,
            data_dir,
        ));
        let mut service = NodeService {
            snapshot: watch::channel(Arc::new(Snapshot {
                ledger: node.ledger().clone(),
                latest: latest.clone(),
                round: None,
                is_validator: node.is_validator(),
                mempool_txs: 0,
                peers_connected: 0,
                committed_txs: 0,
                finality: Histogram::default(),
                halted: None,
            }))
            .0,
            node,
            outbound,
            timers: TimerSet::default(),
            latest,
            committed_txs: 0,
            finality: Histogram::default(),
            submitted_ms: BTreeMap::new(),
            chain_metrics: chain_metrics.clone(),
            halted: None,
            dropped: Arc::new(std::sync::Mutex::new(DroppedTxs::default())),
            serve_budget: crate::inbound::SyncServeBudget::new(
                SYNC_SERVE_BYTES_PER_S,
                SYNC_SERVE_BURST_BYTES,
                1_024,
            ),
            store,
            seeds: None,
            snapshots: None,
        };
        let handle = NodeHandle {
            requests: requests_tx,
            snapshot: service.snapshot.subscribe(),
            reader: service.store.reader(),
            chain_id: genesis.chain_id.clone(),
            address: service.node.address(),
            net: service.outbound.counters(),
            dropped: service.dropped.clone(),
            chain_metrics,
        };
        let records = service.store.records(service.node.height())?;
        info!(
            address = %service.node.address(),
            height = service.node.ledger().height(),
            records = records.len(),
            "node starting"
        );
        let candidates = service.store.candidates(service.node.height())?;
        let out = service.node.start(now_ms(), &records, candidates);
        service.perform(out);
        Ok((service, handle, requests_rx))
    }

    /// NODE-ADMIT-1..4: from now on the transport admits and dials the
    /// peers the committed chain names besides `seeds`, starting with the
    /// stored state.
    /// SYNC-*: take a snapshot of the committed state every
    /// `interval_blocks` blocks (0: never) into `snapshots`.
    pub fn set_snapshots(
        &mut self,
        snapshots: Arc<crate::state_sync::Snapshots>,
        interval_blocks: u64,
    ) {
        let taken = snapshots.latest().map_or(0, |h| h.height);
        self.snapshots = Some((snapshots, interval_blocks, taken));
    }

    /// SYNC-*: after a commit at a multiple of the interval, a snapshot,
    /// built on a thread of its own from O(1) clones.
    fn maybe_snapshot(&mut self) {
        let Some((snapshots, interval, taken)) = &mut self.snapshots else {
            return;
        };
        let height = self.node.ledger().height();
        // At multiples of the interval, so every node holds the same heights
        // and an operator knows which block to trust (a multiple skipped in
        // a multi-block catch-up step is simply not taken).
        if *interval == 0 || height == 0 || !height.is_multiple_of(*interval) || height <= *taken {
            return;
        }
        let Some(last) = self.latest.clone() else {
            return;
        };
        if last.block.header.height != height {
            return;
        }
        if !snapshots.try_start() {
            tracing::warn!(
                height,
                "the previous state snapshot is still being built; skipping this one"
            );
            return;
        }
        *taken = height;
        let ledger = self.node.ledger().clone();
        let sets = self.store.consensus_sets().clone();
        let snapshots = snapshots.clone();
        let span = tracing::Span::current();
        std::thread::spawn(move || span.in_scope(|| snapshots.take(&ledger, &last, &sets)));
    }

    pub fn set_seeds(&mut self, seeds: Vec<crate::transport::Peer>) {
        self.seeds = Some(seeds);
        self.apply_peer_plan();
    }

    fn apply_peer_plan(&self) {
        if let Some(seeds) = &self.seeds {
            let plan = crate::admission::PeerPlan::from_chain(
                self.node.address(),
                seeds,
                self.node.ledger(),
            );
            self.outbound.apply_plan(&plan);
        }
    }

    /// Runs until `shutdown` changes, every input channel closes, or the node
    /// halts on a store error.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut inbound: mpsc::Receiver<Inbound>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut gossip: VecDeque<Inbound> = VecDeque::new();
        while self.halted.is_none() {
            let deadline_ms = self.timers.next_deadline_ms();
            let timer = async move {
                match deadline_ms {
                    Some(at) => {
                        let wait_ms = at.saturating_sub(now_ms());
                        tokio::time::sleep(Duration::from_millis(wait_ms)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = timer => self.fire_timers(),
                // Peer messages before client requests: under client load
                // the request queue is never empty, and consensus must not
                // starve behind it (the API answers 503 when it is full).
                // Consensus messages are fed as they arrive; transaction
                // gossip waits in a bounded backlog behind them (each costs
                // a signature verification, and a proposal or vote must not
                // queue behind hundreds of those).
                Some(item) = inbound.recv(), if gossip.len() < GOSSIP_BACKLOG => {
                    if matches!(item.message, WireMessage::Tx(_)) {
                        gossip.push_back(item);
                    } else {
                        // The sender's quota permit (NODE-NET-11) is released
                        // once the message has been handled.
                        let (from, message, _permit) = item.split();
                        self.step(NodeInput::Message { from, message }, None);
                    }
                }
                () = std::future::ready(()), if !gossip.is_empty() => {
                    let (from, message, _permit) =
                        gossip.pop_front().expect("backlog is not empty").split();
                    self.step(NodeInput::Message { from, message }, None);
                }
                Some(req) = requests.recv() => self.on_request(req),
                else => break,
            }
        }
        info!(height = self.node.ledger().height(), "node task stopped");
    }

    fn fire_timers(&mut self) {
        for t in self.timers.take_due(now_ms()) {
            self.step(NodeInput::Timer(t), None);
            if self.halted.is_some() {
                return;
            }
        }
    }

    fn on_request(&mut self, req: Request) {
        match req {
            Request::SubmitTx { tx, reply, trace } => {
                let id = tx.id();
                // OPS-TRACE-3: admission, a child of the submitting request.
                let span = tracing::info_span!("mempool.admit", tx = %hex::encode(&id[..8]));
                trace.adopt(&span);
                let _in = span.enter();
                self.step(NodeInput::ClientTx(*tx), Some((id, reply, trace.clone())));
            }
        }
    }

    /// Feeds one input and performs the outputs; `reply` gets the verdict on
    /// a client transaction.
    fn step(&mut self, input: NodeInput, reply: Option<ClientReply>) {
        let now = now_ms();
        let out = self.node.handle(now, input);
        let results = self.perform(out);
        if let Some((id, reply, trace)) = reply {
            let verdict = results
                .into_iter()
                .find(|(r, _)| *r == id)
                .map(|(_, r)| r.map(|()| id));
            match verdict {
                Some(v) => {
                    if v.is_ok() && self.submitted_ms.len() < MAX_TRACKED_TXS {
                        self.submitted_ms.insert(id, (now, trace));
                    }
                    let _ = reply.send(v);
                }
                None => drop(reply), // Halted before the verdict: the API reports it.
            }
        }
    }

    /// Performs outputs in order (NODE-HOST-1), then publishes a snapshot.
    /// Returns the client-transaction verdicts.
    fn perform(&mut self, mut out: Vec<NodeOutput>) -> Vec<(Hash32, Result<(), MempoolError>)> {
        // NODE-SYNC-6: catch-up replies within each peer's byte budget.
        let now = now_ms();
        let (budget, counters) = (&mut self.serve_budget, self.outbound.counters());
        out.retain(|o| match o {
            NodeOutput::ServeBlocks { to, max_bytes, .. } => {
                let served = budget.take(to.0, *max_bytes, now);
                if !served {
                    if let Some(c) = &counters {
                        c.sync_serves_throttled
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    debug!(peer = %to, "block request over the peer's sync budget; not served");
                }
                served
            }
            _ => true,
        });
        // The block that led to the node's current ledger, if committed in
        // this step: the store saves it without executing it again.
        let last_hash = self.node.ledger().last_block_hash();
        if let Some(outcome) = out.iter().rev().find_map(|o| match o {
            NodeOutput::Committed { block, outcome } if block.block.hash() == last_hash => {
                Some((**outcome).clone())
            }
            _ => None,
        }) {
            self.store
                .stage_applied(last_hash, outcome, self.node.ledger().clone());
        }
        // NODE-ADMIT-1..4: the plan of the new state before this step's
        // messages go out (the next height's proposal goes to its validators).
        if out
            .iter()
            .any(|o| matches!(o, NodeOutput::Committed { .. }))
        {
            self.apply_peer_plan();
        }
        let mut io = HostIo {
            outbound: &*self.outbound,
            timers: &mut self.timers,
            height: self.node.height(),
            committed: Vec::new(),
            tx_results: Vec::new(),
            dropped: Vec::new(),
        };
        let result = host::perform(out, &mut self.store, &mut io);
        let (committed, tx_results) = (io.committed, io.tx_results);
        if !io.dropped.is_empty() {
            let mut record = self.dropped.lock().expect("dropped lock");
            for (id, reason) in &io.dropped {
                debug!(tx = %hex::encode(id), %reason, "transaction dropped from the pool");
                record.record(*id, reason);
                self.submitted_ms.remove(id);
            }
        }
        if let Err((done, e)) = result {
            error!(error = %e, outputs_done = done, "store write failed; halting the node");
            self.halted = Some(e.to_string());
        }
        let now = now_ms();
        let any_committed = !committed.is_empty();
        for (block, outcome) in committed {
            let b = &block.block;
            info!(
                height = b.header.height,
                txs = b.body.txs.len(),
                round = block.certificate.round,
                hash = %hex::encode(&b.hash()[..8]),
                "committed"
            );
            self.committed_txs += outcome.receipts.len() as u64;
            self.chain_metrics
                .committed(&block, &outcome, self.node.ledger());
            // The receipts carry the ids (hashing 2,000 transactions again
            // cost ~1 ms of the commit step).
            for r in &outcome.receipts {
                if let Some((t, trace)) = self.submitted_ms.remove(&r.tx_id) {
                    let finality_ms = now.saturating_sub(t);
                    self.finality.observe(finality_ms);
                    if trace.is_set() {
                        // OPS-TRACE-3: the commit, in the submission's trace.
                        let span = tracing::info_span!(
                            "tx.commit",
                            tx = %hex::encode(&r.tx_id[..8]),
                            height = b.header.height,
                            finality_ms,
                        );
                        trace.adopt(&span);
                        span.in_scope(|| {});
                    }
                }
            }
            // NODE-ADMIT-5: validators push each committed block to followers.
            if self.node.is_validator() {
                self.outbound
                    .push_to_followers(&WireMessage::Blocks(vec![block.clone()]));
            }
            self.latest = Some(Arc::new(block));
        }
        // Forget submissions that never committed (evicted, replaced): once
        // per commit, not on every step (a scan of up to MAX_TRACKED_TXS).
        if any_committed {
            self.maybe_snapshot();
            self.submitted_ms
                .retain(|_, (t, _)| now.saturating_sub(*t) < TRACKED_TX_MAX_AGE_MS);
        }
        self.publish();
        tx_results
    }

    fn publish(&self) {
        self.snapshot.send_replace(Arc::new(Snapshot {
            ledger: self.node.ledger().clone(),
            latest: self.latest.clone(),
            round: self.node.round(),
            is_validator: self.node.is_validator(),
            mempool_txs: self.node.mempool().len(),
            peers_connected: self.outbound.connected_peers(),
            committed_txs: self.committed_txs,
            finality: self.finality.clone(),
            halted: self.halted.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blyan_state_machine::consensus::TimeoutKind;

    fn consensus(height: Height, round: u32) -> Timer {
        Timer::Consensus {
            kind: TimeoutKind::Propose,
            height,
            round,
        }
    }

    #[test]
    fn timers_replace_fire_in_deadline_order_and_stay_bounded() {
        let mut t = TimerSet::default();
        t.set(Timer::StartHeight { height: 2 }, 50, 1);
        t.set(consensus(1, 0), 30, 1);
        t.set(consensus(1, 0), 10, 1); // moves the deadline
        assert_eq!(t.len(), 2);
        assert_eq!(t.next_deadline_ms(), Some(10));
        assert!(t.take_due(9).is_empty());
        assert_eq!(
            t.take_due(50),
            vec![consensus(1, 0), Timer::StartHeight { height: 2 }]
        );
        assert!(t.is_empty());

        // Full: timers of heights left behind go first, then the oldest.
        for r in 0..MAX_TIMERS as u32 {
            t.set(consensus(1, r), 100, 1);
        }
        t.set(consensus(2, 0), 100, 2);
        assert_eq!(t.len(), 1);
        for r in 1..MAX_TIMERS as u32 {
            t.set(consensus(2, r), 100, 2);
        }
        t.set(consensus(3, 0), 100, 2);
        assert_eq!(t.len(), MAX_TIMERS);
        assert!(!t.take_due(100).contains(&consensus(2, 0)));
    }

    #[test]
    fn the_finality_histogram_is_cumulative() {
        let mut h = Histogram::default();
        h.observe(90);
        h.observe(600);
        h.observe(60_000);
        assert_eq!(h.buckets, [1, 1, 1, 2, 2, 2, 2, 2]);
        assert_eq!((h.count, h.sum_ms), (3, 60_690));
    }
}
