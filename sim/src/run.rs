//! One simulation: a cluster of real node drivers on madsim's clock and
//! scheduler and the simulator's network (`net.rs`), a nemesis, a client
//! workload, then the checkers (spec: sim/README.md).

use crate::check::{Commit, Observer, quantile};
use crate::config::SimConfig;
use crate::net::{Datagram, Network};
use crate::pol::{PolOracle, PolSummary, SimModel};
use crate::store::SimStore;
use crate::workload::{Client, ClientLog};
use blyan_state_machine::block::Block;
use blyan_state_machine::block::{BlockOutcome, Event};
use blyan_state_machine::consensus::{
    CommitCertificate, K256Scheme, Proposal, SignatureScheme, Signed, Vote,
};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::ledger::{Ledger, Proposal as LedgerProposal};
use blyan_state_machine::node::host::{Io, perform, stored_blocks};
use blyan_state_machine::node::{
    CommittedBlock, MempoolError, Node, NodeConfig, NodeInput, PeerId, Store, Timer, WireMessage,
};
use blyan_state_machine::params::Params;
use blyan_state_machine::pol::PolEvent;
use blyan_state_machine::pol::PolParams;
use blyan_state_machine::testkit::{TestNet, address, testnet};
use blyan_state_machine::tx::SignedTx;
use blyan_state_machine::types::{Hash32, Height};
use k256::ecdsa::SigningKey;
use madsim::rand::{Rng, thread_rng};
use madsim::runtime::{Handle, NodeHandle};
use madsim::time::{Duration, Instant, Sleep, sleep};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

/// Envelope kinds (first byte of every datagram).
pub const KIND_PEER: u8 = 0;
pub const KIND_CLIENT: u8 = 1;
/// SIM-BOUND-1: timers a node may have pending (stale ones are pruned first).
const MAX_TIMERS: usize = 4_096;

/// Validators 0..250 are 10.0.0.1..=250, then 10.0.2.1.. (10.0.1.1 is
/// the client); at most [`MAX_VALIDATORS`].
pub fn validator_ip(i: usize) -> IpAddr {
    assert!(i < MAX_VALIDATORS);
    let (subnet, host) = if i < 250 { (0, i + 1) } else { (2, i - 249) };
    IpAddr::V4(Ipv4Addr::new(10, 0, subnet, host as u8))
}

pub const MAX_VALIDATORS: usize = 500;
pub fn client_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1))
}

/// Network faults that the liveness phase switches off ("the network heals").
#[derive(Debug)]
pub struct NetFaults {
    pub loss_ppm: AtomicU32,
    pub duplicate_ppm: AtomicU32,
    pub tail_ppm: AtomicU32,
    pub store_error_ppm: AtomicU32,
}

/// What the whole simulation shares.
pub struct World {
    pub cfg: SimConfig,
    pub net: TestNet,
    /// `Ledger::from_genesis(&net.genesis)`, built once and cloned for every
    /// node start (it was 6 % of a 30 s run at 100 validators).
    genesis_ledger: Ledger,
    pub t0: Instant,
    pub net_faults: NetFaults,
    pub observer: Mutex<Observer>,
    pub addresses: Vec<PeerId>,
    pub skews_ms: Vec<i64>,
    pub stores: Vec<Mutex<SimStore>>,
    pub halted: Vec<AtomicBool>,
    pub client_log: Mutex<ClientLog>,
    /// SIM-WL-2: the simulated model and what is true about its deltas.
    pub model: SimModel,
    pub pol: Mutex<PolOracle>,
    /// SIM-NET-1/2: endpoints `0..validators` are the validators, then the
    /// client ([`World::client_endpoint`]).
    pub network: Mutex<Network<Packet>>,
    /// SIM-FID-3: committed blocks' transaction ids by block hash.
    tx_ids: Mutex<BTreeMap<Hash32, Vec<Hash32>>>,
    wakers: Mutex<Wakers>,
    /// `BLYAN_SIM_DESCRIBE` is set (read once, not per node step).
    describe: bool,
}

/// SIM-FID-3: blocks whose transaction ids are kept (cleared when full).
const MAX_TX_ID_BLOCKS: usize = 256;

/// What travels between endpoints: an envelope's bytes, and their decoding,
/// done once for every destination of a broadcast (SIM-FID-3).
pub struct Packet {
    bytes: Vec<u8>,
    decoded: OnceLock<Option<Decoded>>,
}

enum Decoded {
    Peer(WireMessage),
    Client(SignedTx),
}

impl Packet {
    pub fn new(bytes: Vec<u8>) -> Arc<Packet> {
        Arc::new(Packet {
            bytes,
            decoded: OnceLock::new(),
        })
    }

    /// The envelope's kind and body decoded, or `None` for garbage: a pure
    /// function of the bytes, so computed by the first destination only.
    fn decoded(&self) -> Option<&Decoded> {
        self.decoded.get_or_init(|| decode(&self.bytes)).as_ref()
    }
}

fn decode(bytes: &[u8]) -> Option<Decoded> {
    match bytes.split_first() {
        Some((&KIND_PEER, body)) => WireMessage::decode(body).ok().map(Decoded::Peer),
        Some((&KIND_CLIENT, body)) => SignedTx::decode(body).ok().map(Decoded::Client),
        _ => None,
    }
}

/// Who to wake when the network has something for them.
#[derive(Default)]
struct Wakers {
    /// Each node task waiting on an empty inbox.
    nodes: Vec<Option<Waker>>,
    /// The delivery task.
    delivery: Option<Waker>,
}

fn store_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// A madsim sleep that registers its timer once per deadline: polling a
/// pending `Sleep` adds a timer every time (madsim cannot cancel one), and
/// a node task is polled once per batch of arrivals.
struct Deadline {
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl Deadline {
    fn new() -> Deadline {
        Deadline {
            sleep: Box::pin(sleep(Duration::ZERO)),
            armed: None,
        }
    }

    /// Ready once `at` has passed; wakes the polling task then.
    fn poll_until(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= at {
            return Poll::Ready(());
        }
        if self.armed != Some(at) {
            self.sleep.as_mut().reset(at);
            self.armed = Some(at);
            if self.sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

impl World {
    /// Simulated milliseconds since the start.
    pub fn elapsed_ms(&self) -> u64 {
        Instant::now().duration_since(self.t0).as_millis() as u64
    }
    /// Node `i`'s clock: genesis time + 1 s + elapsed + its skew.
    fn node_now_ms(&self, i: usize) -> u64 {
        let base = self.net.genesis.genesis_time_ms + 1_000 + self.elapsed_ms();
        base.saturating_add_signed(self.skews_ms[i])
    }
    fn is_byzantine(&self, i: usize) -> bool {
        i >= self.cfg.validators - self.cfg.byzantine
    }

    /// The client's network endpoint (after the validators').
    pub fn client_endpoint(&self) -> usize {
        self.cfg.validators
    }

    /// SIM-NET-1: sends `packet` from endpoint `from` to each of `to`
    /// through the fault layer: loss, latency from the configured
    /// distribution (and a slow tail), duplication, each drawn per
    /// destination; then the network queue (SIM-NET-2: clogs, crashes).
    pub fn transmit(&self, from: usize, to: &[usize], packet: &Arc<Packet>) {
        let f = &self.cfg.faults;
        let loss_ppm = self.net_faults.loss_ppm.load(Ordering::Relaxed);
        let duplicate_ppm = self.net_faults.duplicate_ppm.load(Ordering::Relaxed);
        let tail_ppm = self.net_faults.tail_ppm.load(Ordering::Relaxed);
        let now_ms = self.elapsed_ms();
        let mut rng = thread_rng();
        let mut sent = 0;
        let mut rearm = false;
        let mut net = self.network.lock().expect("single-threaded");
        for &dst in to {
            if rng.gen_range(0..1_000_000) < loss_ppm {
                continue;
            }
            let copies = if rng.gen_range(0..1_000_000) < duplicate_ppm {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let j = f.latency_jitter_ms;
                // Triangular on [mean - jitter, mean + jitter].
                let mut latency_ms = f.latency_mean_ms.saturating_sub(j)
                    + rng.gen_range(0..=j)
                    + rng.gen_range(0..=j);
                if f.tail_ms > 0 && rng.gen_range(0..1_000_000) < tail_ppm {
                    latency_ms += rng.gen_range(0..f.tail_ms);
                }
                let order = rng.r#gen::<u32>();
                sent += 1;
                let datagram = Datagram {
                    from,
                    payload: packet.clone(),
                };
                rearm |= net.send(dst, now_ms + latency_ms, order, datagram);
            }
        }
        drop(net);
        self.observer.lock().expect("single-threaded").messages_sent += sent;
        if rearm && let Some(w) = self.wakers.lock().expect("single-threaded").delivery.take() {
            w.wake();
        }
    }

    /// SIM-FID-3: the ids of a committed block's transactions, computed
    /// once per block (the block hash commits to its body, BLOCK-3).
    fn tx_ids(&self, block: &Block, block_hash: Hash32) -> Vec<Hash32> {
        if !self.cfg.memo {
            return block.body.txs.iter().map(SignedTx::id).collect();
        }
        let mut memo = self.tx_ids.lock().expect("single-threaded");
        if let Some(ids) = memo.get(&block_hash) {
            return ids.clone();
        }
        let ids: Vec<Hash32> = block.body.txs.iter().map(SignedTx::id).collect();
        if memo.len() >= MAX_TX_ID_BLOCKS {
            memo.clear();
        }
        memo.insert(block_hash, ids.clone());
        ids
    }

    /// Kills node `i`'s tasks; its in-flight sends and unread inbox are lost.
    fn kill(&self, handle: &Handle, node: &NodeHandle, i: usize) {
        handle.kill(node.id());
        self.network.lock().expect("single-threaded").crash(i);
    }

    /// The simulated instant at which node `i`'s clock reads `node_ms`.
    fn instant_at_node_ms(&self, i: usize, node_ms: u64) -> Instant {
        let base = self.net.genesis.genesis_time_ms + 1_000;
        let elapsed_ms = node_ms
            .saturating_add_signed(-self.skews_ms[i])
            .saturating_sub(base);
        self.t0 + Duration::from_millis(elapsed_ms)
    }
}

/// SIM-NET-1: the one task that moves arrivals into inboxes, at each
/// arrival millisecond, and wakes the nodes that got mail.
async fn deliver(world: Arc<World>) {
    let mut deadline = Deadline::new();
    let mut woken = Vec::new();
    loop {
        let now_ms = world.elapsed_ms();
        world
            .network
            .lock()
            .expect("single-threaded")
            .deliver_due(now_ms, &mut woken);
        if !woken.is_empty() {
            let mut wakers = world.wakers.lock().expect("single-threaded");
            for i in woken.drain(..) {
                if let Some(w) = wakers.nodes[i].take() {
                    w.wake();
                }
            }
        }
        std::future::poll_fn(|cx| {
            store_waker(
                &mut world.wakers.lock().expect("single-threaded").delivery,
                cx,
            );
            match world.network.lock().expect("single-threaded").armed_at_ms() {
                Some(at_ms) => deadline.poll_until(world.t0 + Duration::from_millis(at_ms), cx),
                None => Poll::Pending,
            }
        })
        .await;
    }
}

/// The [`Io`] of a simulated node: collects effects, performed after the
/// store writes of the batch (so never before a persist they depend on).
struct SimIo<'w> {
    world: &'w World,
    sends: Vec<(Option<PeerId>, WireMessage)>,
    timers: Vec<(Timer, u64)>,
    committed: Vec<(Height, Commit)>,
}

impl Io for SimIo<'_> {
    fn send(&mut self, to: PeerId, message: WireMessage) {
        self.sends.push((Some(to), message));
    }
    fn broadcast(&mut self, message: WireMessage) {
        self.sends.push((None, message));
    }
    fn relay(&mut self, from: PeerId, message: WireMessage) {
        // NODE-GOSSIP-3: the simulated peers are all validators, whose
        // transactions are never relayed (NODE-MP-5); were one relayed, it
        // would reach its sender too, which drops a duplicate.
        let _ = from;
        self.sends.push((None, message));
    }
    fn set_timer(&mut self, timer: Timer, at_ms: u64) {
        self.timers.push((timer, at_ms));
    }
    fn committed(&mut self, block: &CommittedBlock, outcome: &BlockOutcome) {
        let block_hash = block.block.hash();
        self.committed.push((
            block.block.header.height,
            Commit {
                block_hash,
                state_root: block.block.header.state_root,
                tx_ids: self.world.tx_ids(&block.block, block_hash),
                at_ms: 0,
                failed_tx_ids: outcome
                    .receipts
                    .iter()
                    .filter(|r| r.failure.is_some())
                    .map(|r| r.tx_id)
                    .collect(),
                pol_decisions: outcome
                    .events
                    .iter()
                    .filter_map(|e| match e {
                        Event::Pol(p) => match p.as_ref() {
                            PolEvent::DeltaDecided(d) => Some(d.clone()),
                            PolEvent::DeltaCommitExpired { .. } => None,
                        },
                        _ => None,
                    })
                    .collect(),
            },
        ));
    }
    fn tx_result(&mut self, _id: Hash32, _result: Result<(), MempoolError>) {}
}

struct NodeTask {
    world: Arc<World>,
    i: usize,
    node: Node,
    timers: BTreeSet<(u64, Timer)>,
    key: SigningKey,
}

impl NodeTask {
    /// Performs `outputs`; returns false if the store failed (halt).
    fn perform(&mut self, outputs: Vec<blyan_state_machine::node::NodeOutput>) -> bool {
        let world = self.world.clone();
        let mut io = SimIo {
            world: &world,
            sends: Vec::new(),
            timers: Vec::new(),
            committed: Vec::new(),
        };
        let result = {
            let mut store = self.world.stores[self.i].lock().expect("single-threaded");
            store.error_ppm = self
                .world
                .net_faults
                .store_error_ppm
                .load(Ordering::Relaxed);
            perform(outputs, &mut *store, &mut io)
        };
        let now = self.world.elapsed_ms();
        self.world
            .observer
            .lock()
            .expect("single-threaded")
            .status
            .insert(self.i, (self.node.height(), self.node.round()));
        if self.world.describe {
            let d = self.node.describe();
            self.world
                .observer
                .lock()
                .expect("single-threaded")
                .describe
                .insert(self.i, d);
        }
        if !io.committed.is_empty() {
            let mut obs = self.world.observer.lock().expect("single-threaded");
            for (h, mut c) in io.committed {
                c.at_ms = now;
                obs.committed(self.i, h, c, self.node.ledger().clone());
            }
        }
        for (timer, at_ms) in io.timers {
            self.timers.insert((at_ms, timer));
        }
        if self.timers.len() > MAX_TIMERS {
            let h = self.node.height();
            self.timers.retain(|(_, t)| match t {
                Timer::Consensus { height, .. } => *height >= h,
                _ => true,
            });
            assert!(self.timers.len() <= MAX_TIMERS, "SIM-BOUND-1");
        }
        for (to, message) in io.sends {
            self.send(to, message);
        }
        match result {
            Ok(()) => true,
            Err((_, e)) => {
                let mut obs = self.world.observer.lock().expect("single-threaded");
                obs.store_errors += 1;
                let _ = e;
                false
            }
        }
    }

    fn send(&mut self, to: Option<PeerId>, message: WireMessage) {
        let w = self.world.clone();
        let targets: Vec<usize> = match to {
            Some(a) => w
                .addresses
                .iter()
                .position(|x| *x == a)
                .into_iter()
                .collect(),
            None => (0..w.cfg.validators).filter(|j| *j != self.i).collect(),
        };
        {
            let mut obs = w.observer.lock().expect("single-threaded");
            let n = targets.len() as u64;
            let counts = &mut obs.messages_by_kind;
            match &message {
                WireMessage::Proposal { .. } => counts.proposals += n,
                WireMessage::Vote(_) => counts.votes += n,
                WireMessage::Tx(_) => counts.txs += n,
                WireMessage::BlockRequest { .. } | WireMessage::Blocks(_) => counts.sync += n,
                WireMessage::Status(_) => counts.status += n,
            }
        }
        if !w.is_byzantine(self.i) {
            let packet = Packet::new(envelope(KIND_PEER, &message.encode()));
            w.transmit(self.i, &targets, &packet);
            return;
        }
        // SIM-BYZ-1: a Byzantine validator's outgoing traffic.
        let b = &w.cfg.faults.byzantine;
        let mut rng = thread_rng();
        let mut draw = |ppm: u32| rng.gen_range(0..1_000_000) < ppm;
        let own_vote =
            matches!(&message, WireMessage::Vote(v) if v.message.validator == self.node.address());
        if own_vote && draw(b.withhold_ppm) {
            return;
        }
        let mut alternative = None;
        if let WireMessage::Vote(v) = &message
            && own_vote
            && draw(b.equivocate_ppm)
        {
            alternative = Some(WireMessage::Vote(self.conflicting(v)));
        }
        if let WireMessage::Proposal {
            proposal,
            block,
            last_commit,
        } = &message
            && proposal.message.proposer == self.node.address()
            && draw(b.equivocate_proposal_ppm)
        {
            alternative = self.conflicting_proposal(proposal, block, last_commit);
        }
        if matches!(alternative, Some(WireMessage::Proposal { .. })) {
            let n = (targets.len() - targets.len() / 2) as u64;
            w.observer
                .lock()
                .expect("single-threaded")
                .messages_by_kind
                .conflicting_proposals += n;
        }
        let half = targets.len() / 2;
        for (k, j) in targets.into_iter().enumerate() {
            let mut m = match (&alternative, k >= half) {
                (Some(alt), true) => alt.clone(),
                _ => message.clone(),
            };
            if draw(b.bad_signature_ppm) {
                corrupt_signature(&mut m);
            }
            let bytes = if draw(b.garbage_ppm) {
                let len = thread_rng().gen_range(1..256);
                (0..len).map(|_| thread_rng().r#gen::<u8>()).collect()
            } else {
                envelope(KIND_PEER, &m.encode())
            };
            w.transmit(self.i, &[j], &Packet::new(bytes));
        }
    }

    /// SIM-BYZ-2: the same proposal naming another valid block: the same
    /// parent and signers, no transactions, 1 ms later. `None` when the
    /// proposal is not for the height after this node's last block.
    fn conflicting_proposal(
        &self,
        proposal: &Signed<Proposal, [u8; 64]>,
        block: &Block,
        last_commit: &Option<CommitCertificate<[u8; 64]>>,
    ) -> Option<WireMessage> {
        let ledger = self.node.ledger();
        if proposal.message.height != ledger.height() + 1 {
            return None;
        }
        let (other, _, _) = ledger
            .propose_block(LedgerProposal {
                proposer: block.header.proposer,
                // The same proposer's ticket: a VRF output is unique (CONS-COMM-4).
                ticket: block.header.ticket,
                time_ms: block.header.time_ms + 1,
                evidence: Vec::new(),
                last_commit_signers: block.body.last_commit_signers.clone(),
                candidates: &[],
            })
            .ok()?;
        let mut message = proposal.message.clone();
        message.value = other.hash();
        let scheme = K256Scheme {
            chain_id: self.world.net.genesis.chain_id.clone(),
        };
        Some(WireMessage::Proposal {
            proposal: Signed {
                signature: scheme.sign_proposal(&self.key, &message),
                message,
            },
            block: Box::new(other),
            last_commit: last_commit.clone(),
        })
    }

    /// The same vote for another value (a double sign).
    fn conflicting(&self, v: &Signed<Vote, [u8; 64]>) -> Signed<Vote, [u8; 64]> {
        let mut vote = v.message.clone();
        let mut other = [0u8; 32];
        thread_rng().fill(&mut other[..]);
        vote.value = Some(other);
        let scheme = K256Scheme {
            chain_id: self.world.net.genesis.chain_id.clone(),
        };
        Signed {
            signature: scheme.sign_vote(&self.key, &vote),
            message: vote,
        }
    }
}

fn corrupt_signature(m: &mut WireMessage) {
    match m {
        WireMessage::Vote(v) => v.signature[0] ^= 1,
        WireMessage::Proposal { proposal, .. } => proposal.signature[0] ^= 1,
        _ => {}
    }
}

pub fn envelope(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// A validator's task (re-run by madsim on restart): rebuild from the store,
/// then loop on messages and timers.
async fn node_main(world: Arc<World>, i: usize) {
    world.halted[i].store(false, Ordering::Relaxed);
    world.network.lock().expect("single-threaded").open(i);
    let mut config = NodeConfig {
        block_interval_ms: world.cfg.block_interval_ms,
        ..NodeConfig::default()
    };
    #[cfg(feature = "mutants")]
    if let Some(m) = &world.cfg.mutant {
        config.consensus.mutant = crate::parse_mutant(m).expect("validated by the CLI");
    }
    config.consensus.max_rounds_ahead = 16;
    let key = world.net.validators[i].clone();
    let mut node = Node::from_genesis_ledger(config, key.clone(), world.genesis_ledger.clone())
        .expect("genesis");
    let (blocks, records, candidates) = {
        let store = world.stores[i].lock().expect("single-threaded");
        let blocks = stored_blocks(&store.inner).expect("infallible");
        let next = store.inner.last_height().expect("infallible") + 1;
        let records = store.inner.records(next).expect("infallible");
        let candidates = store.inner.candidates(next).expect("infallible");
        (blocks, records, candidates)
    };
    for b in &blocks {
        node.replay(b).expect("a node's own store replays");
    }
    let out = node.start(world.node_now_ms(i), &records, candidates);
    let mut task = NodeTask {
        world: world.clone(),
        i,
        node,
        timers: BTreeSet::new(),
        key,
    };
    if task.perform(out) {
        node_loop(&world, &mut task).await;
    }
    // A store write failed: halt (never send what could not be persisted).
    world.network.lock().expect("single-threaded").close(i);
    world.halted[i].store(true, Ordering::Relaxed);
}

/// Handles due timers, then the inbox, then waits for either; returns when
/// a store write failed. One madsim timer per deadline, not one per received
/// message (at 100 validators a node receives ~23,000 messages per height).
async fn node_loop(world: &Arc<World>, task: &mut NodeTask) {
    let i = task.i;
    let mut deadline = Deadline::new();
    let mut idle_wake_ms = 0u64;
    loop {
        let now = world.node_now_ms(i);
        if let Some(&(at, timer)) = task.timers.first()
            && at <= now
        {
            task.timers.pop_first();
            let out = task.node.handle(now, NodeInput::Timer(timer));
            if !task.perform(out) {
                return;
            }
            continue;
        }
        let received = world.network.lock().expect("single-threaded").recv(i);
        if let Some(datagram) = received {
            let Some(input) = node_input(world, datagram) else {
                continue; // Garbage or an unknown sender: dropped.
            };
            let out = task.node.handle(now, input);
            if !task.perform(out) {
                return;
            }
            continue;
        }
        let wake_ms = match task.timers.first() {
            Some((at, _)) => *at,
            None => {
                if idle_wake_ms <= now {
                    idle_wake_ms = now + 1_000;
                }
                idle_wake_ms
            }
        };
        let wake_at = world.instant_at_node_ms(i, wake_ms);
        std::future::poll_fn(|cx| {
            if world.network.lock().expect("single-threaded").has_mail(i) {
                return Poll::Ready(());
            }
            store_waker(
                &mut world.wakers.lock().expect("single-threaded").nodes[i],
                cx,
            );
            deadline.poll_until(wake_at, cx)
        })
        .await;
    }
}

/// What a datagram says, or `None` for garbage.
/// SIM-FID-3: decoded once per packet, unless `--no-memo`.
fn node_input(world: &World, datagram: Datagram<Packet>) -> Option<NodeInput> {
    let fresh;
    let decoded = if world.cfg.memo {
        datagram.payload.decoded()?
    } else {
        fresh = decode(&datagram.payload.bytes)?;
        &fresh
    };
    match decoded {
        Decoded::Peer(message) => Some(NodeInput::Message {
            from: *world.addresses.get(datagram.from)?,
            message: message.clone(),
        }),
        Decoded::Client(tx) => Some(NodeInput::ClientTx(tx.clone())),
    }
}

/// The outcome of one simulation.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub digest: Hash32,
    pub violations: Vec<String>,
    pub heights: Vec<Height>,
    pub committed_txs: usize,
    pub simulated_ms: u64,
    pub finality_p50_ms: Option<u64>,
    pub finality_p99_ms: Option<u64>,
    pub crashes: u64,
    pub store_errors: u64,
    pub messages_sent: u64,
    pub messages_by_kind: crate::check::MessageCounts,
    pub liveness_ms: Option<u64>,
    /// SIM-WL-2: what the PoL workload did and how its deltas were decided.
    pub pol: PolSummary,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The simulation's genesis: `validators` validators and 8 funded accounts,
/// short epochs so stake changes take effect during a run, and one model
/// (meta, a trainable layer, validation data) with attestation windows of 3
/// blocks each so deltas are decided within a run (SIM-WL-2).
pub fn sim_net(validators: usize) -> (TestNet, SimModel) {
    let params = Params {
        epoch_length_blocks: 10,
        unbonding_period_blocks: 20,
        max_evidence_age_blocks: 10,
        signed_blocks_window: 20,
        pol: PolParams {
            attest_commit_window_blocks: 3,
            attest_reveal_window_blocks: 3,
            delta_commit_ttl_blocks: 20,
            ..PolParams::default()
        },
        ..Params::default()
    };
    let mut net = testnet(validators, 8, params);
    let model = SimModel::new(address(&net.accounts[0]));
    net.genesis.pol_blocks = model.genesis_blocks();
    (net, model)
}

/// Runs one simulation inside the current madsim runtime.
pub async fn simulate(cfg: SimConfig) -> Report {
    assert!(cfg.validators >= 1 && cfg.validators <= MAX_VALIDATORS);
    assert!(cfg.byzantine < cfg.validators);
    assert!(cfg.pol_liars <= cfg.validators);
    let (net, model) = sim_net(cfg.validators);
    let validator_addresses: Vec<PeerId> = net.validators.iter().map(address).collect();
    let (honest_pol, liars) = validator_addresses.split_at(cfg.validators - cfg.pol_liars);
    let oracle = PolOracle::new(
        model.layer.id(),
        honest_pol.iter().copied().collect(),
        liars.iter().copied().collect(),
    );
    let genesis: Genesis = net.genesis.clone();
    let handle = Handle::current();
    let mut rng = thread_rng();
    let skews_ms = (0..cfg.validators)
        .map(|_| {
            let m = cfg.faults.clock_skew_max_ms as i64;
            if m == 0 { 0 } else { rng.gen_range(-m..=m) }
        })
        .collect();
    let observer = Observer {
        honest: (0..cfg.validators - cfg.byzantine).collect(),
        ..Observer::default()
    };
    let world = Arc::new(World {
        genesis_ledger: Ledger::from_genesis(&genesis).expect("the simulation's genesis is valid"),
        net_faults: NetFaults {
            loss_ppm: AtomicU32::new(cfg.faults.loss_ppm),
            duplicate_ppm: AtomicU32::new(cfg.faults.duplicate_ppm),
            tail_ppm: AtomicU32::new(cfg.faults.tail_ppm),
            store_error_ppm: AtomicU32::new(cfg.faults.store_error_ppm),
        },
        addresses: validator_addresses,
        model,
        pol: Mutex::new(oracle),
        stores: (0..cfg.validators)
            .map(|_| Mutex::new(SimStore::default()))
            .collect(),
        halted: (0..cfg.validators)
            .map(|_| AtomicBool::new(false))
            .collect(),
        observer: Mutex::new(observer),
        client_log: Mutex::new(ClientLog::default()),
        skews_ms,
        t0: Instant::now(),
        net,
        network: Mutex::new(Network::new(cfg.validators + 1)),
        tx_ids: Mutex::new(BTreeMap::new()),
        wakers: Mutex::new(Wakers {
            nodes: vec![None; cfg.validators],
            delivery: None,
        }),
        describe: std::env::var_os("BLYAN_SIM_DESCRIBE").is_some(),
        cfg: cfg.clone(),
    });
    let delivery = madsim::task::spawn(deliver(world.clone()));
    let _ = genesis;
    let nodes: Vec<NodeHandle> = (0..cfg.validators)
        .map(|i| {
            let w = world.clone();
            handle
                .create_node()
                .name(format!("v{i}"))
                .ip(validator_ip(i))
                .init(move || node_main(w.clone(), i))
                .build()
        })
        .collect();
    let client_world = world.clone();
    let client = handle
        .create_node()
        .name("client")
        .ip(client_ip())
        .init(move || Client::run(client_world.clone()))
        .build();
    let _ = client;

    // Safety phase: faults on.
    nemesis(&world, &handle, &nodes, cfg.duration_ms).await;

    // Liveness phase: heal everything; honest nodes must converge.
    let heal_ms = world.elapsed_ms();
    world.net_faults.loss_ppm.store(0, Ordering::Relaxed);
    world.net_faults.duplicate_ppm.store(0, Ordering::Relaxed);
    world.net_faults.tail_ppm.store(0, Ordering::Relaxed);
    world.net_faults.store_error_ppm.store(0, Ordering::Relaxed);
    heal_network(&world);
    world.client_log.lock().expect("single-threaded").stopped = true;
    for (i, n) in nodes.iter().enumerate() {
        if world.halted[i].load(Ordering::Relaxed) || handle.is_exit(n.id()) {
            world.kill(&handle, n, i);
            handle.restart(n.id());
        }
    }
    let target = {
        let obs = world.observer.lock().expect("single-threaded");
        obs.honest.iter().map(|i| obs.height(*i)).max().unwrap_or(0) + 2
    };
    let mut converged_ms = None;
    while world.elapsed_ms() < heal_ms + cfg.liveness_bound_ms {
        sleep(Duration::from_millis(250)).await;
        let obs = world.observer.lock().expect("single-threaded");
        let min_height = obs.honest.iter().map(|i| obs.height(*i)).min().unwrap_or(0);
        let canonical = obs.canonical();
        let resolved = world
            .client_log
            .lock()
            .expect("single-threaded")
            .all_resolved(&canonical);
        if min_height >= target && resolved {
            converged_ms = Some(world.elapsed_ms() - heal_ms);
            break;
        }
    }
    let report = finish(&world, converged_ms, target);
    for (i, n) in nodes.iter().enumerate() {
        world.kill(&handle, n, i);
    }
    handle.kill(client.id());
    delivery.abort();
    report
}

/// SIM-NEM-1: one fault at a time, each held for a while and then healed.
async fn nemesis(world: &Arc<World>, handle: &Handle, nodes: &[NodeHandle], duration_ms: u64) {
    let f = world.cfg.faults.clone();
    let n = nodes.len();
    let mut actions: Vec<&str> = Vec::new();
    if f.partitions {
        actions.push("partition");
    }
    if f.asymmetric_partitions {
        actions.push("asymmetric");
    }
    if f.swizzle {
        actions.push("swizzle");
    }
    if f.crashes {
        actions.push("crash");
    }
    let end = world.t0 + Duration::from_millis(duration_ms);
    while Instant::now() < end {
        let pause = if f.nemesis_interval_ms == 0 {
            1_000
        } else {
            thread_rng().gen_range(f.nemesis_interval_ms / 2..=f.nemesis_interval_ms * 3 / 2)
        };
        sleep(Duration::from_millis(pause)).await;
        // Nodes halted by a store error come back.
        for (i, node) in nodes.iter().enumerate() {
            if world.halted[i].load(Ordering::Relaxed) {
                world.kill(handle, node, i);
                handle.restart(node.id());
            }
        }
        if actions.is_empty() || n < 2 || Instant::now() >= end {
            continue;
        }
        let action = actions[thread_rng().gen_range(0..actions.len())];
        let hold_ms = thread_rng().gen_range(1_000..6_000);
        match action {
            "partition" | "asymmetric" => {
                let mut side: Vec<bool> = (0..n).map(|_| thread_rng().gen_bool(0.5)).collect();
                if side.iter().all(|s| *s) || side.iter().all(|s| !*s) {
                    side[0] = !side[0];
                }
                let links: Vec<(usize, usize)> = (0..n)
                    .flat_map(|a| (0..n).map(move |b| (a, b)))
                    .filter(|(a, b)| side[*a] && !side[*b])
                    .collect();
                {
                    let mut net = world.network.lock().expect("single-threaded");
                    for &(a, b) in &links {
                        net.clog_link(a, b);
                        if action == "partition" {
                            net.clog_link(b, a);
                        }
                    }
                }
                sleep(Duration::from_millis(hold_ms)).await;
                let mut net = world.network.lock().expect("single-threaded");
                for &(a, b) in &links {
                    net.unclog_link(a, b);
                    net.unclog_link(b, a);
                }
            }
            "swizzle" => {
                let mut order: Vec<usize> = (0..n).collect();
                shuffle(&mut order);
                let clogged = &order[..n.div_ceil(2)];
                for i in clogged {
                    world.network.lock().expect("single-threaded").clog_node(*i);
                    sleep(Duration::from_millis(500)).await;
                }
                let mut release = clogged.to_vec();
                shuffle(&mut release);
                for i in release {
                    sleep(Duration::from_millis(500)).await;
                    world
                        .network
                        .lock()
                        .expect("single-threaded")
                        .unclog_node(i);
                }
            }
            "crash" => {
                let i = thread_rng().gen_range(0..n);
                world.kill(handle, &nodes[i], i);
                world.observer.lock().expect("single-threaded").crashes += 1;
                sleep(Duration::from_millis(hold_ms)).await;
                handle.restart(nodes[i].id());
            }
            _ => unreachable!("only listed actions"),
        }
    }
}

fn heal_network(world: &Arc<World>) {
    world.network.lock().expect("single-threaded").heal();
}

fn shuffle(v: &mut [usize]) {
    for i in (1..v.len()).rev() {
        let j = thread_rng().gen_range(0..=i);
        v.swap(i, j);
    }
}

/// SIM-CHECK-*: the checkers, after the liveness phase.
fn finish(world: &Arc<World>, converged_ms: Option<u64>, target: Height) -> Report {
    let obs = world.observer.lock().expect("single-threaded");
    let mut violations = obs.violations.clone();
    let canonical = obs.canonical();
    for (i, d) in &obs.describe {
        eprintln!("node {i}: {d}");
    }
    if converged_ms.is_none() {
        let heights: Vec<_> = obs
            .honest
            .iter()
            .map(|i| (*i, obs.height(*i), obs.status.get(i)))
            .collect();
        violations.push(format!(
            "liveness: within {} ms of healing, not every honest node reached height {target} with every client transaction resolved (node, committed height, (height, round) in progress: {heights:?})",
            world.cfg.liveness_bound_ms
        ));
    }
    // SIM-CHECK-2: no transaction applied twice.
    let mut seen = BTreeSet::new();
    for (h, c) in &canonical {
        for id in &c.tx_ids {
            if !seen.insert(*id) {
                violations.push(format!(
                    "transaction {} committed twice (again at height {h})",
                    hex::encode(id)
                ));
            }
        }
    }
    // SIM-CHECK-3: client-level rules (bad transactions never commit,
    // exactly one of each double spend).
    let log = world.client_log.lock().expect("single-threaded");
    violations.extend(log.check(&canonical));
    // SIM-CHECK-7: the PoL acceptance rules.
    let canonical_ledger = obs
        .honest
        .iter()
        .max_by_key(|i| (obs.height(**i), std::cmp::Reverse(**i)))
        .and_then(|i| obs.ledgers.get(i));
    let (pol_violations, pol) = crate::pol::check(
        &world.pol.lock().expect("single-threaded"),
        &world.model,
        &world.net.genesis.params.pol,
        &canonical,
        canonical_ledger,
    );
    violations.extend(pol_violations);
    // SIM-CHECK-4: supply conservation on every honest node.
    for i in &obs.honest {
        if let Some(l) = obs.ledgers.get(i) {
            let (held, expected) = l.audit_supply();
            if held != expected {
                violations.push(format!(
                    "supply: node {i} holds {held}, expected {expected}"
                ));
            }
        }
    }
    // SIM-CHECK-5: no honest validator is ever punished for double signing
    // (its persisted records must prevent it, CONS-CRASH-2).
    if let Some(l) = obs
        .honest
        .iter()
        .next_back()
        .and_then(|i| obs.ledgers.get(i))
    {
        for i in &obs.honest {
            let a = world.addresses[*i];
            if l.validator(&a).is_some_and(|v| v.tombstoned) {
                violations.push(format!(
                    "honest validator {i} ({a}) was slashed for double signing"
                ));
            }
        }
    }
    // Finality: first submission to first commit on an honest node.
    let mut first_commit: BTreeMap<Hash32, u64> = BTreeMap::new();
    for i in &obs.honest {
        for c in obs.commits.get(i).into_iter().flat_map(|m| m.values()) {
            for id in &c.tx_ids {
                let e = first_commit.entry(*id).or_insert(c.at_ms);
                *e = (*e).min(c.at_ms);
            }
        }
    }
    let mut latencies: Vec<u64> = log
        .submitted_ms
        .iter()
        .filter_map(|(id, t)| first_commit.get(id).map(|c| c.saturating_sub(*t)))
        .collect();
    let p50 = quantile(&mut latencies, 500);
    let p99 = quantile(&mut latencies, 990);
    Report {
        seed: world.cfg.seed,
        digest: obs.digest(),
        violations,
        heights: (0..world.cfg.validators).map(|i| obs.height(i)).collect(),
        committed_txs: seen.len(),
        simulated_ms: world.elapsed_ms(),
        finality_p50_ms: p50,
        finality_p99_ms: p99,
        crashes: obs.crashes,
        store_errors: obs.store_errors,
        messages_sent: obs.messages_sent,
        messages_by_kind: obs.messages_by_kind,
        liveness_ms: converged_ms,
        pol,
    }
}

/// Runs one simulation in a fresh madsim runtime seeded with `cfg.seed`. A
/// panic anywhere (a node's assertion, a checker's) is reported as a
/// violation of that seed, not a crash of the sweep.
pub fn run(cfg: SimConfig) -> Report {
    use blyan_state_machine::memo;
    let seed = cfg.seed;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let rt = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
        // SIM-FID-1/2: madsim runs every node on this thread, so one memo
        // serves them all: 64 Ki verifications (a height's votes are ~2n²
        // at n = 100) and 256 applied blocks.
        if cfg.memo {
            memo::enable(1 << 16, 256);
        }
        let report = rt.block_on(simulate(cfg.clone()));
        if std::env::var_os("BLYAN_SIM_MEMO_STATS").is_some() {
            eprintln!("memo: {:?}", memo::stats());
        }
        memo::disable();
        report
    }));
    memo::disable();
    match result {
        Ok(report) => report,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Report {
                seed,
                digest: [0; 32],
                violations: vec![format!("panic: {message}")],
                heights: Vec::new(),
                committed_txs: 0,
                simulated_ms: 0,
                finality_p50_ms: None,
                finality_p99_ms: None,
                crashes: 0,
                store_errors: 0,
                messages_sent: 0,
                messages_by_kind: Default::default(),
                liveness_ms: None,
                pol: PolSummary::default(),
            }
        }
    }
}
