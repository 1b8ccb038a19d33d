//! [`Node`]: one validator (or follower) as a pure state machine
//! (spec/node.md). `handle(now_ms, input) -> outputs`; the host performs the
//! outputs in order ([`super::host::perform`]).
//!
//! Invariants:
//! - the ledger is the state after the last committed block; the height in
//!   progress is `ledger.height() + 1`;
//! - every bounded collection (`blocks`, `buffered`, `evidence`, the mempool)
//!   is checked at insertion; nothing grows with the input rate;
//! - a block is committed only with a certificate that verifies against the
//!   validator set of its height (decided here, or checked on sync).

use super::mempool::{Mempool, MempoolConfig};
use super::{
    CommittedBlock, NodeInput, NodeOutput, PeerId, PeerStatus, ProposedBlock, Sig, Timer,
    WireMessage,
};
use crate::block::{Block, BlockOutcome, Misbehaviour};
use crate::consensus::{
    CommitCertificate, Config, Consensus, DuplicateVote, Input, K256Scheme, Message, Output,
    Record, SignatureScheme, ValidatorSet, ValueId, VoteType,
};
use crate::encoding::Canonical;
use crate::error::Error;
use crate::genesis::Genesis;
use crate::ledger::{Ledger, Proposal as BlockProposal};
use crate::types::{Address, Height};
use k256::ecdsa::SigningKey;
use std::collections::{BTreeMap, VecDeque};

/// NODE-CFG-1: the driver's parameters. Times are node-clock milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub consensus: Config,
    pub mempool: MempoolConfig,
    /// NODE-TIME-1: target time between the starts of consecutive heights
    /// (the seed's block time, 2.0 s). After a decision the next height starts
    /// this long after the decided one started, or at once if that is past.
    pub block_interval_ms: u64,
    /// NODE-BUF-1: messages for a later height kept until it starts.
    pub max_buffered_messages: usize,
    /// Distinct proposed blocks kept for the height in progress.
    pub max_candidate_blocks: usize,
    /// Evidence items waiting to be included in a block.
    pub max_pending_evidence: usize,
    /// NODE-SYNC-3: blocks per sync response.
    pub sync_batch_blocks: u64,
    /// NODE-SYNC-5: canonical bytes of blocks per sync response (at least
    /// one block is sent whatever its size). The host's message limit must
    /// hold this much plus the message's own overhead; a block is at most
    /// `max_block_bytes` of transactions plus its header and certificate.
    pub sync_batch_bytes: u64,
    /// NODE-SYNC-2: a block request is repeated at most this often.
    pub sync_retry_ms: u64,
    /// NODE-PROP-2: a proposed block's time may be at most this far ahead of
    /// the receiver's clock.
    pub max_clock_drift_ms: u64,
    /// NODE-GOSSIP-1: own messages of the current and previous round are sent
    /// again this often while a height is undecided.
    pub rebroadcast_interval_ms: u64,
    /// NODE-SYNC-4: peers remembered for rate-limiting help to laggards.
    pub max_tracked_peers: usize,
    /// NODE-TIME-2: `timeout_propose` of a height grows by this many
    /// microseconds per transaction pending in the mempool when the height
    /// starts (at most `max_block_txs` of them). 0 (the default) turns it off.
    pub timeout_propose_per_tx_us: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            consensus: Config::default(),
            mempool: MempoolConfig::default(),
            block_interval_ms: 2_000,
            max_buffered_messages: 1_024,
            max_candidate_blocks: 16,
            max_pending_evidence: 64,
            sync_batch_blocks: 32,
            sync_batch_bytes: 3 * 1024 * 1024,
            sync_retry_ms: 1_000,
            max_clock_drift_ms: 5_000,
            rebroadcast_interval_ms: 1_000,
            max_tracked_peers: 1_024,
            timeout_propose_per_tx_us: 0,
        }
    }
}

/// NODE-STORE-6: the consensus validator sets a node holds besides its
/// ledger: the set of the height in progress (`set`) and of the last
/// committed height (`prev_set`, which checks the parent's certificate),
/// with their CometBFT proposer priorities. Priorities depend on every height
/// since genesis (CONS-PROP-*), so a host that restarts without replaying
/// the chain persists these with each block ([`ConsensusSets::advance`] is
/// the one rule both the driver and such a host follow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsensusSets {
    pub set: ValidatorSet,
    pub prev_set: ValidatorSet,
    /// CONS-COMM-6/7: who proposes at the height in progress, with its own
    /// priorities: the epoch committee's members in `set`, or `None` when
    /// none is left (the whole set proposes).
    pub proposers: Option<ValidatorSet>,
}

/// The persisted form of [`ConsensusSets`]: `(address, public key, power,
/// priority)` per member, ascending by address.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct StoredSets {
    set: Vec<(Address, crate::tx::PublicKey, u64, i64)>,
    prev_set: Vec<(Address, crate::tx::PublicKey, u64, i64)>,
    proposers: Option<Vec<(Address, crate::tx::PublicKey, u64, i64)>>,
}

/// CONS-COMM-6/7: the members of `set` in the ledger's committee, with
/// fresh priorities; `None` if none is (the whole set proposes). The same
/// membership as [`Ledger::eligible_proposers`], which `apply_block` checks.
fn committee_members(set: &ValidatorSet, ledger: &Ledger) -> Option<ValidatorSet> {
    crate::consensus::proposer_set(set, &ledger.committee().eligible).ok()
}

impl ConsensusSets {
    /// The sets before the first block.
    pub fn genesis(ledger: &Ledger) -> Result<ConsensusSets, Error> {
        assert_eq!(ledger.height(), 0, "genesis sets from the genesis ledger");
        let set = validator_set(ledger, None)?;
        Ok(ConsensusSets {
            prev_set: set.clone(),
            proposers: committee_members(&set, ledger),
            set,
        })
    }

    /// The sets after a block that produced `next` with `outcome`.
    pub fn advance(&self, next: &Ledger, outcome: &BlockOutcome) -> Result<ConsensusSets, Error> {
        let set = match &outcome.validator_set_update {
            None => self.set.next_height(),
            Some(_) => {
                let fresh = validator_set(next, None)?;
                fresh.carry_priorities_from(&self.set).next_height()
            }
        };
        // CONS-COMM-6/7: a new epoch starts its committee with fresh
        // priorities; within an epoch the proposers advance like the set,
        // and follow its changes (members leave, or return from jail). With
        // neither, the members are the same and only priorities move.
        let new_epoch = next
            .height()
            .is_multiple_of(next.params().epoch_length_blocks);
        let proposers = if new_epoch || outcome.validator_set_update.is_some() {
            match (committee_members(&set, next), &self.proposers) {
                (Some(fresh), Some(p)) if !new_epoch => {
                    Some(fresh.carry_priorities_from(p).next_height())
                }
                (members, _) => members,
            }
        } else {
            self.proposers.as_ref().map(ValidatorSet::next_height)
        };
        Ok(ConsensusSets {
            prev_set: self.set.clone(),
            set,
            proposers,
        })
    }

    /// Canonical bytes (ENC-2) for a store.
    pub fn encode(&self) -> Vec<u8> {
        let members = |s: &ValidatorSet| {
            s.validators()
                .iter()
                .map(|v| (v.address, v.public_key, v.voting_power, v.proposer_priority))
                .collect()
        };
        StoredSets {
            set: members(&self.set),
            prev_set: members(&self.prev_set),
            proposers: self.proposers.as_ref().map(members),
        }
        .encode()
    }

    /// Decodes and checks untrusted bytes (ENC-4, CONS-VAL-1).
    pub fn decode(bytes: &[u8]) -> Result<ConsensusSets, Error> {
        let s = StoredSets::decode(bytes)?;
        let set = |m| {
            ValidatorSet::with_priorities(m).map_err(|e| Error::InvalidValidatorSet(e.to_string()))
        };
        Ok(ConsensusSets {
            set: set(s.set)?,
            prev_set: set(s.prev_set)?,
            proposers: s.proposers.map(set).transpose()?,
        })
    }
}

/// A proposed block of the height in progress and the driver's verdict on it.
#[derive(Clone, Debug)]
struct Candidate {
    block: Block,
    last_commit: Option<CommitCertificate<Sig>>,
    /// `Some` when the block is valid: the state it leads to.
    applied: Option<(Ledger, BlockOutcome)>,
    /// NODE-STORE-5: written to the store (this height).
    persisted: bool,
}

/// One node. See the module docs for the invariants.
#[derive(Clone, Debug)]
pub struct Node {
    config: NodeConfig,
    scheme: K256Scheme,
    key: SigningKey,
    address: Address,
    ledger: Ledger,
    /// The validator set (with proposer priorities) of the height in progress.
    set: ValidatorSet,
    /// The set of the last committed height (checks the parent's certificate).
    prev_set: ValidatorSet,
    /// CONS-COMM-6/7: the height's proposers (`ConsensusSets::proposers`).
    proposers: Option<ValidatorSet>,
    /// `None` when this node is not in `set`, or between a decision and the
    /// start of the next height.
    consensus: Option<Consensus<K256Scheme>>,
    /// Decided; waiting for `Timer::StartHeight`.
    waiting: bool,
    height_started_ms: u64,
    last_cert: Option<CommitCertificate<Sig>>,
    blocks: BTreeMap<ValueId, Candidate>,
    mempool: Mempool,
    evidence: BTreeMap<(Address, Height), DuplicateVote<Sig>>,
    buffered: VecDeque<(PeerId, WireMessage)>,
    sync_requested_ms: Option<u64>,
    /// NODE-SYNC-4: when each lagging peer was last sent blocks.
    helped_ms: BTreeMap<PeerId, u64>,
    /// NODE-PEER-1: the highest consensus height each peer has sent a
    /// message for (at most `max_tracked_peers`).
    peer_heights: BTreeMap<PeerId, Height>,
    /// NODE-GOSSIP-2: each peer's last status at this height (at most
    /// `max_tracked_peers`; cleared when a height starts).
    peer_status: BTreeMap<PeerId, PeerStatus>,
    /// When this node last committed a block live (NODE-SYNC-4's grace).
    committed_ms: u64,
}

impl Node {
    /// A node at height 0 of `genesis`, signing with `key`. Replay stored
    /// blocks with [`Node::replay`], then call [`Node::start`].
    pub fn from_genesis(
        config: NodeConfig,
        key: SigningKey,
        genesis: &Genesis,
    ) -> Result<Node, Error> {
        Self::from_genesis_ledger(config, key, Ledger::from_genesis(genesis)?)
    }

    /// [`Node::from_genesis`] from the ledger `Ledger::from_genesis` built
    /// (a cheap clone of a shared one: the simulator builds it once for all
    /// its nodes instead of once per node and restart).
    pub fn from_genesis_ledger(
        config: NodeConfig,
        key: SigningKey,
        ledger: Ledger,
    ) -> Result<Node, Error> {
        assert_eq!(ledger.height(), 0, "a genesis ledger");
        let ConsensusSets { set, proposers, .. } = ConsensusSets::genesis(&ledger)?;
        let scheme = K256Scheme {
            chain_id: ledger.chain_id().to_string(),
        };
        let address = scheme.address(&key);
        let mempool = Mempool::new(config.mempool.clone());
        Ok(Node {
            config,
            scheme,
            key,
            address,
            ledger,
            prev_set: set.clone(),
            set,
            proposers,
            consensus: None,
            waiting: false,
            height_started_ms: 0,
            last_cert: None,
            blocks: BTreeMap::new(),
            mempool,
            evidence: BTreeMap::new(),
            buffered: VecDeque::new(),
            sync_requested_ms: None,
            helped_ms: BTreeMap::new(),
            peer_heights: BTreeMap::new(),
            peer_status: BTreeMap::new(),
            committed_ms: 0,
        })
    }

    /// NODE-STORE-6: the node after `last`, from state loaded without
    /// replaying the chain: `ledger` is the state after `last` (checked
    /// against its certified state root by the caller) and `sets` the
    /// consensus sets persisted with it. Gives the node that replaying every
    /// block from genesis gives. Refuses a ledger that is not after `last`,
    /// or sets whose members are not the ledger's active and last active sets.
    pub fn resume(
        config: NodeConfig,
        key: SigningKey,
        genesis: &Genesis,
        ledger: Ledger,
        last: CommittedBlock,
        sets: ConsensusSets,
    ) -> Result<Node, Error> {
        let mut node = Node::from_genesis(config, key, genesis)?;
        let header = &last.block.header;
        if ledger.height() != header.height
            || ledger.last_block_hash() != last.block.hash()
            || ledger.state_root() != header.state_root
            || last.certificate.value != last.block.hash()
        {
            return Err(Error::BadState(format!(
                "the state is not the one after block {} (height {}, root {})",
                header.height,
                ledger.height(),
                hex::encode(ledger.state_root())
            )));
        }
        let members = |s: &ValidatorSet| -> Vec<(Address, u64)> {
            s.validators()
                .iter()
                .map(|v| (v.address, v.voting_power))
                .collect()
        };
        if members(&sets.set) != ledger.active_set() {
            return Err(Error::InvalidValidatorSet(
                "the persisted set is not the ledger's active set".into(),
            ));
        }
        if members(&sets.prev_set) != ledger.last_active_set() {
            return Err(Error::InvalidValidatorSet(
                "the persisted previous set is not the ledger's last active set".into(),
            ));
        }
        if sets.proposers.as_ref().map(members)
            != committee_members(&sets.set, &ledger).as_ref().map(members)
        {
            return Err(Error::InvalidValidatorSet(
                "the persisted proposers are not the committee's members in the set".into(),
            ));
        }
        node.ledger = ledger;
        node.set = sets.set;
        node.prev_set = sets.prev_set;
        node.proposers = sets.proposers;
        node.last_cert = Some(last.certificate);
        Ok(node)
    }

    /// NODE-STORE-6: the sets to persist with the last committed block.
    pub fn consensus_sets(&self) -> ConsensusSets {
        ConsensusSets {
            set: self.set.clone(),
            prev_set: self.prev_set.clone(),
            proposers: self.proposers.clone(),
        }
    }

    pub fn address(&self) -> Address {
        self.address
    }
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }
    /// The height being decided (or about to start).
    pub fn height(&self) -> Height {
        self.ledger.height() + 1
    }
    pub fn mempool(&self) -> &Mempool {
        &self.mempool
    }
    pub fn validator_set(&self) -> &ValidatorSet {
        &self.set
    }
    pub fn is_validator(&self) -> bool {
        self.set.get(&self.address).is_some()
    }
    /// The consensus round of the height in progress, if this node votes in it.
    pub fn round(&self) -> Option<u32> {
        self.consensus.as_ref().map(|c| c.round())
    }

    /// A one-line summary of the height in progress, for operators and
    /// simulation failure reports.
    pub fn describe(&self) -> String {
        let consensus = match &self.consensus {
            Some(c) => format!(
                "round {} step {:?} locked {:?} valid {:?}",
                c.round(),
                c.step(),
                c.locked().map(|(v, r)| (hex::encode(&v[..4]), r)),
                c.valid().map(|(v, r)| (hex::encode(&v[..4]), r)),
            ),
            None if self.waiting => "decided, waiting for the next height".into(),
            None => "not a validator at this height".into(),
        };
        let candidates: Vec<String> = self
            .blocks
            .iter()
            .map(|(id, c)| {
                format!(
                    "{}:{}",
                    hex::encode(&id[..4]),
                    if c.applied.is_some() {
                        "valid"
                    } else {
                        "invalid"
                    }
                )
            })
            .collect();
        format!(
            "height {} {consensus}; candidates [{}]; buffered {}; mempool {}",
            self.height(),
            candidates.join(" "),
            self.buffered.len(),
            self.mempool.len()
        )
    }

    /// NODE-STORE-4: re-apply a block from this node's own store (it was
    /// verified before it was stored, so signatures are not checked again;
    /// the state root in its header still is).
    pub fn replay(&mut self, committed: &CommittedBlock) -> Result<(), Error> {
        assert!(self.consensus.is_none(), "replay before start");
        let (next, outcome) = self
            .ledger
            .apply_block_trusted_signatures(&committed.block)?;
        self.advance(committed.clone(), next, outcome, &mut Vec::new())?;
        Ok(())
    }

    /// Starts the height after the last committed block. `records` are the
    /// persisted consensus records of that height (CONS-CRASH-2), empty on a
    /// fresh start.
    ///
    /// `candidates` are the blocks persisted at that height (NODE-STORE-5):
    /// they are checked again and held, so the validator can repeat its
    /// proposal or propose its valid value.
    pub fn start(
        &mut self,
        now_ms: u64,
        records: &[Record<Sig>],
        candidates: Vec<ProposedBlock>,
    ) -> Vec<NodeOutput> {
        let mut out = Vec::new();
        for c in candidates {
            if c.block.header.height != self.height() {
                continue;
            }
            let value = c.block.hash();
            let applied = if self.check_last_commit(&c.block, c.last_commit.as_ref()) {
                self.ledger.apply_block(&c.block).ok()
            } else {
                None
            };
            self.blocks.insert(
                value,
                Candidate {
                    block: c.block,
                    last_commit: c.last_commit,
                    applied,
                    persisted: true,
                },
            );
        }
        self.start_height(now_ms, records, &mut out);
        out
    }

    /// Feeds one input at node time `now_ms`; returns the outputs to perform in order.
    pub fn handle(&mut self, now_ms: u64, input: NodeInput) -> Vec<NodeOutput> {
        let mut out = Vec::new();
        match input {
            NodeInput::Message { from, message } => {
                self.on_message(now_ms, from, message, &mut out)
            }
            NodeInput::Timer(timer) => self.on_timer(now_ms, timer, &mut out),
            NodeInput::ClientTx(tx) => {
                let id = tx.id();
                let result = self.mempool.insert(tx.clone(), &self.ledger).map(|_| ());
                if result.is_ok() {
                    out.push(NodeOutput::Broadcast(WireMessage::Tx(Box::new(tx))));
                }
                out.push(NodeOutput::TxResult { id, result });
                self.report_dropped(&mut out);
            }
        }
        out
    }

    /// NODE-MP-8: what left the pool unincluded, as outputs.
    fn report_dropped(&mut self, out: &mut Vec<NodeOutput>) {
        for (id, reason) in self.mempool.take_dropped() {
            out.push(NodeOutput::TxDropped { id, reason });
        }
    }

    fn on_timer(&mut self, now_ms: u64, timer: Timer, out: &mut Vec<NodeOutput>) {
        match timer {
            Timer::Consensus {
                kind,
                height,
                round,
            } => {
                if height == self.height() && !self.waiting {
                    self.feed(
                        now_ms,
                        Input::Timeout {
                            kind,
                            height,
                            round,
                        },
                        out,
                    );
                }
            }
            Timer::StartHeight { height } => {
                if self.waiting && height == self.height() {
                    self.start_height(now_ms, &[], out);
                }
            }
            Timer::Rebroadcast { height } => {
                if height != self.height() || self.waiting {
                    return;
                }
                // NODE-GOSSIP-2: not the messages again, but what this node
                // holds of its round; each peer answers with what it lacks.
                if let Some(status) = self.status() {
                    out.push(NodeOutput::Broadcast(WireMessage::Status(status)));
                }
                out.push(NodeOutput::SetTimer {
                    timer: Timer::Rebroadcast { height },
                    at_ms: now_ms.saturating_add(self.config.rebroadcast_interval_ms),
                });
            }
            Timer::SyncRetry => {
                if self
                    .sync_requested_ms
                    .is_some_and(|t| now_ms >= t.saturating_add(self.config.sync_retry_ms))
                {
                    self.sync_requested_ms = None;
                }
            }
        }
    }

    /// NODE-GOSSIP-2: this node's round and the round's messages it holds.
    fn status(&self) -> Option<PeerStatus> {
        let c = self.consensus.as_ref()?;
        let round = c.round();
        let bitmap = |vote_type| {
            let mut bits = vec![0u8; self.set.len().div_ceil(8)];
            for (i, v) in self.set.validators().iter().enumerate() {
                if c.has_vote(round, vote_type, &v.address) {
                    bits[i / 8] |= 1 << (i % 8);
                }
            }
            bits
        };
        Some(PeerStatus {
            height: self.height(),
            round,
            has_proposal: c.proposal(round).is_some(),
            prevotes: bitmap(VoteType::Prevote),
            precommits: bitmap(VoteType::Precommit),
        })
    }

    /// NODE-GOSSIP-2: a peer at this height told what it holds of its
    /// round; send it exactly what it lacks of that round (proposal and
    /// votes, anyone's), and, if this node is in a later round, that
    /// round's messages (f + 1 of them move it on, L55), and the polka of
    /// this node's valid value (L28 needs it with a re-proposal). At most
    /// two proposals and `4 n` votes per status.
    fn on_status(&mut self, from: PeerId, status: PeerStatus, out: &mut Vec<NodeOutput>) {
        let Some(c) = &self.consensus else {
            return;
        };
        let bytes = self.set.len().div_ceil(8);
        if status.prevotes.len() > bytes || status.precommits.len() > bytes {
            return; // Malformed for this height's set.
        }
        if self.peer_status.len() >= self.config.max_tracked_peers
            && !self.peer_status.contains_key(&from)
        {
            return;
        }
        // The set is in ascending address order (CONS-VAL-1).
        let index = |a: &Address| {
            self.set
                .validators()
                .binary_search_by(|v| v.address.cmp(a))
                .ok()
        };
        let mut messages: Vec<Message<Sig>> = Vec::new();
        let ours = c.round();
        if status.round <= ours {
            let r = status.round;
            if !status.has_proposal
                && let Some(p) = c.proposal(r)
            {
                messages.push(Message::Proposal(p.clone()));
            }
            for (vote_type, bits) in [
                (VoteType::Prevote, &status.prevotes),
                (VoteType::Precommit, &status.precommits),
            ] {
                messages.extend(
                    c.votes_of(r, vote_type)
                        .into_iter()
                        .filter(|v| {
                            index(&v.message.validator).is_none_or(|i| !PeerStatus::has(bits, i))
                        })
                        .map(Message::Vote),
                );
            }
        }
        if ours > status.round {
            messages.extend(c.proposal(ours).cloned().map(Message::Proposal));
            for vote_type in [VoteType::Prevote, VoteType::Precommit] {
                messages.extend(c.votes_of(ours, vote_type).into_iter().map(Message::Vote));
            }
        }
        if let Some((value, valid_round)) = c.valid()
            && valid_round < status.round
        {
            messages.extend(c.polka(valid_round, value));
        }
        self.peer_status.insert(from, status);
        for m in messages {
            let message = match m {
                Message::Vote(v) => WireMessage::Vote(v),
                Message::Proposal(p) => {
                    let Some(c) = self.blocks.get(&p.message.value) else {
                        continue;
                    };
                    WireMessage::Proposal {
                        proposal: p,
                        block: Box::new(c.block.clone()),
                        last_commit: c.last_commit.clone(),
                    }
                }
            };
            out.push(NodeOutput::Send { to: from, message });
        }
    }

    fn on_message(
        &mut self,
        now_ms: u64,
        from: PeerId,
        message: WireMessage,
        out: &mut Vec<NodeOutput>,
    ) {
        if let Some(h) = message.consensus_height() {
            self.note_peer_height(from, h);
            let current = self.height();
            if h < current {
                // Decided already. NODE-SYNC-4: the sender is behind (its
                // height's decision did not reach it); send it the blocks,
                // at most once per `sync_retry_ms` per peer.
                self.help_laggard(now_ms, from, h, out);
                return;
            }
            if h > current || self.waiting || self.consensus.is_none() {
                // NODE-BUF-1: keep it for when its height starts (bounded:
                // when full, the newest is dropped; consensus tolerates loss).
                if self.buffered.len() < self.config.max_buffered_messages {
                    self.buffered.push_back((from, message));
                }
                if h > current {
                    // NODE-SYNC-2: the sender has committed at least h - 1 ≥ current.
                    self.request_blocks(now_ms, from, out);
                }
                return;
            }
        }
        match message {
            WireMessage::Status(status) => self.on_status(from, status, out),
            WireMessage::Vote(vote) => self.feed(now_ms, Input::Vote(vote), out),
            WireMessage::Proposal {
                proposal,
                block,
                last_commit,
            } => {
                if let Some(valid) = self.check_proposal(now_ms, &proposal, *block, last_commit) {
                    self.feed(now_ms, Input::Proposal { proposal, valid }, out);
                }
            }
            WireMessage::Tx(tx) => {
                // NODE-MP-5: validators (bonded, active or standby) gossip
                // their own admissions to every peer directly, so a
                // transaction from one is not relayed again; one from a
                // follower is, once.
                // NODE-GOSSIP-3: never back to the peer it came from.
                let relay = self.set.get(&from).is_none() && self.ledger.validator(&from).is_none();
                if self.mempool.insert((*tx).clone(), &self.ledger).is_ok() && relay {
                    out.push(NodeOutput::Relay {
                        from,
                        message: WireMessage::Tx(tx),
                    });
                }
                self.report_dropped(out);
            }
            WireMessage::BlockRequest { from_height } => {
                let last = self.ledger.height();
                if from_height >= 1 && from_height <= last {
                    let to_height = last.min(from_height + self.config.sync_batch_blocks - 1);
                    out.push(NodeOutput::ServeBlocks {
                        to: from,
                        from_height,
                        to_height,
                        max_bytes: self.config.sync_batch_bytes,
                    });
                }
            }
            WireMessage::Blocks(blocks) => self.on_blocks(now_ms, from, blocks, out),
        }
    }

    /// NODE-PROP-1/2: cheap checks first (proposer, signature), then the
    /// parent's certificate and the block itself through the ledger. Returns
    /// the `valid(v)` verdict for consensus, or `None` to drop the message.
    fn check_proposal(
        &mut self,
        now_ms: u64,
        proposal: &crate::consensus::Signed<crate::consensus::Proposal, Sig>,
        block: Block,
        last_commit: Option<CommitCertificate<Sig>>,
    ) -> Option<bool> {
        let p = &proposal.message;
        let member = self.set.get(&p.proposer)?;
        if self
            .proposers
            .as_ref()
            .unwrap_or(&self.set)
            .proposer(p.round)
            != p.proposer
            || !self
                .scheme
                .verify_proposal(&member.public_key, p, &proposal.signature)
        {
            return None;
        }
        if block.hash() != p.value {
            return None; // The block is not the one the signature names.
        }
        if let Some(c) = self.blocks.get(&p.value) {
            return Some(c.applied.is_some());
        }
        if self.blocks.len() >= self.config.max_candidate_blocks {
            return None;
        }
        let h = &block.header;
        // The header names the block's original proposer, which differs
        // from the signer when a valid value is proposed again (L16).
        let mut valid = h.height == p.height
            && h.time_ms <= now_ms.saturating_add(self.config.max_clock_drift_ms)
            && self.check_last_commit(&block, last_commit.as_ref());
        let applied = if valid {
            // NODE-MP-6: signatures verified at admission are not verified again.
            let mempool = &self.mempool;
            self.ledger
                .apply_block_with_verified(&block, &|id| mempool.verified_sender(id))
                .ok()
        } else {
            None
        };
        valid &= applied.is_some();
        self.blocks.insert(
            p.value,
            Candidate {
                block,
                last_commit,
                applied,
                persisted: false,
            },
        );
        Some(valid)
    }

    /// NODE-PROP-1: block h carries the signers of a certificate for h - 1
    /// that verifies against the set of h - 1 and names the parent.
    fn check_last_commit(&self, block: &Block, cert: Option<&CommitCertificate<Sig>>) -> bool {
        let parent = self.ledger.height();
        match cert {
            None => parent == 0 && block.body.last_commit_signers.is_empty(),
            Some(c) => {
                parent > 0
                    && c.value == self.ledger.last_block_hash()
                    && c.signers() == block.body.last_commit_signers
                    && c.verify(&self.scheme, &self.prev_set, parent).is_ok()
            }
        }
    }

    /// Feeds consensus and performs its outputs, looping while they produce
    /// more input (a requested value).
    fn feed(&mut self, now_ms: u64, input: Input<Sig>, out: &mut Vec<NodeOutput>) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let Some(consensus) = self.consensus.as_mut() else {
                return;
            };
            // Rejected inputs are untrusted messages that were not used.
            let Ok(outputs) = consensus.handle(input) else {
                continue;
            };
            self.perform_consensus(now_ms, outputs, &mut inputs, out);
        }
    }

    fn perform_consensus(
        &mut self,
        now_ms: u64,
        outputs: Vec<Output<Sig>>,
        inputs: &mut VecDeque<Input<Sig>>,
        out: &mut Vec<NodeOutput>,
    ) {
        for output in outputs {
            match output {
                Output::Persist(record) => {
                    // NODE-STORE-5: the blocks a record commits this node to
                    // (its proposal, its lock and valid value, a precommit)
                    // are durable before the record.
                    let values: Vec<ValueId> = match &record {
                        Record::Proposal(p) => vec![p.message.value],
                        Record::Lock { locked, valid, .. } => {
                            locked.iter().chain(valid.iter()).map(|(v, _)| *v).collect()
                        }
                        Record::Vote(v) => v.message.value.into_iter().collect(),
                    };
                    for value in values {
                        if let Some(c) = self.blocks.get_mut(&value)
                            && !c.persisted
                        {
                            c.persisted = true;
                            out.push(NodeOutput::PersistBlock(Box::new(ProposedBlock {
                                block: c.block.clone(),
                                last_commit: c.last_commit.clone(),
                            })));
                        }
                    }
                    out.push(NodeOutput::Persist(record))
                }
                Output::Broadcast(Message::Vote(v)) => {
                    out.push(NodeOutput::Broadcast(WireMessage::Vote(v)))
                }
                Output::Broadcast(Message::Proposal(p)) => {
                    // NODE-PROP-4: a validator restarted after proposing (or
                    // with a valid value from before the crash) no longer
                    // holds the block; it cannot repeat the proposal, and
                    // the round ends by timeout. It never proposes anything
                    // else in that round (CONS-CRASH-2).
                    if let Some(c) = self.blocks.get(&p.message.value) {
                        out.push(NodeOutput::Broadcast(WireMessage::Proposal {
                            proposal: p,
                            block: Box::new(c.block.clone()),
                            last_commit: c.last_commit.clone(),
                        }));
                    }
                }
                Output::ScheduleTimeout {
                    kind,
                    height,
                    round,
                    duration_ms,
                } => out.push(NodeOutput::SetTimer {
                    timer: Timer::Consensus {
                        kind,
                        height,
                        round,
                    },
                    at_ms: now_ms.saturating_add(duration_ms),
                }),
                Output::RequestValue { height, round } => {
                    // Without a block (see `build_block`) the round's
                    // propose timeout moves everyone on.
                    if let Some(value) = self.build_block(now_ms) {
                        inputs.push_back(Input::ProposeValue {
                            height,
                            round,
                            value,
                        });
                    }
                }
                Output::Decide {
                    value, certificate, ..
                } => self.decide(now_ms, value, certificate, out),
                Output::Evidence(ev) => {
                    let key = (ev.validator(), ev.height());
                    if self.evidence.len() < self.config.max_pending_evidence
                        && !self.evidence.contains_key(&key)
                    {
                        // NODE-EV-1: both votes go to every peer, once per
                        // offence, so whoever proposes next (only the
                        // epoch's committee does, CONS-COMM-7) sees the
                        // equivocation too and can include the evidence.
                        // (Not against itself: its key signed both.)
                        if ev.validator() != self.address {
                            for vote in [&ev.vote_a, &ev.vote_b] {
                                out.push(NodeOutput::Broadcast(WireMessage::Vote(vote.clone())));
                            }
                        }
                        self.evidence.insert(key, ev);
                    }
                }
            }
        }
    }

    /// L18 `getValue()`: a block from the mempool and pending evidence.
    /// `None` only when this validator cannot make the epoch's last block:
    /// its registered VRF key is not the one its signing key derives
    /// (CONS-COMM-8), so its ticket would not verify.
    fn build_block(&mut self, now_ms: u64) -> Option<ValueId> {
        let time_ms = now_ms.max(self.ledger.globals().time_ms + 1);
        let mut evidence: Vec<Misbehaviour> = self
            .evidence
            .values()
            .map(DuplicateVote::to_misbehaviour)
            .collect();
        let candidates = self
            .mempool
            .candidates(&self.ledger, self.ledger.params().max_block_txs as usize);
        let last_commit_signers = self
            .last_cert
            .as_ref()
            .map(CommitCertificate::signers)
            .unwrap_or_default();
        // Evidence the ledger refuses (expired, already punished) is dropped
        // one item at a time; each retry removes one, so this terminates.
        loop {
            let proposal = BlockProposal {
                proposer: self.address,
                ticket: self.ledger.ticket_for(&self.key),
                time_ms,
                evidence: evidence.clone(),
                last_commit_signers: last_commit_signers.clone(),
                candidates: &candidates,
            };
            // NODE-MP-6: every candidate's signature was verified at admission.
            let mempool = &self.mempool;
            match self
                .ledger
                .propose_block_with_verified(proposal, &|id| mempool.verified_sender(id))
            {
                Ok((block, next, outcome)) => {
                    let value = block.hash();
                    self.blocks.insert(
                        value,
                        Candidate {
                            block,
                            last_commit: self.last_cert.clone(),
                            applied: Some((next, outcome)),
                            persisted: false,
                        },
                    );
                    return Some(value);
                }
                Err(Error::InvalidTicket(_) | Error::MissingTicket) => return None,
                Err(Error::InvalidEvidence { index, .. }) => {
                    assert!(index < evidence.len());
                    let dropped = evidence.remove(index);
                    self.evidence
                        .remove(&(dropped.validator(), dropped.height()));
                }
                Err(e) => panic!(
                    "a block from valid candidates and the node's own commit must build: {e}"
                ),
            }
        }
    }

    /// L49: commit the decided block and schedule the next height.
    fn decide(
        &mut self,
        now_ms: u64,
        value: ValueId,
        certificate: CommitCertificate<Sig>,
        out: &mut Vec<NodeOutput>,
    ) {
        let c = self
            .blocks
            .remove(&value)
            .expect("consensus decides only a proposal this node received");
        let (next, outcome) = match c.applied {
            Some(applied) => applied,
            // Judged invalid here earlier (e.g. a time check against a
            // lagging clock) yet decided by +2/3: check again now.
            None => self
                .ledger
                .apply_block(&c.block)
                .expect("a block +2/3 of the voting power decided applies"),
        };
        // NODE-TIME-1: the next height's phase is the earlier of this node's
        // start of the decided height and the decided block's time (its
        // proposer's start), so every node converges on one schedule and
        // the proposers' cuts are `block_interval_ms` apart; a proposer's
        // clock running ahead cannot delay anyone (the minimum).
        let phase_ms = self.height_started_ms.min(c.block.header.time_ms);
        self.committed_ms = now_ms;
        let committed = CommittedBlock {
            block: c.block,
            certificate,
        };
        self.advance(committed, next, outcome, out)
            .expect("a decided block's successor set is valid");
        self.waiting = true;
        let at_ms = phase_ms
            .saturating_add(self.config.block_interval_ms)
            .max(now_ms);
        out.push(NodeOutput::SetTimer {
            timer: Timer::StartHeight {
                height: self.height(),
            },
            at_ms,
        });
    }

    /// Makes `committed` (already applied into `next`) the last block.
    fn advance(
        &mut self,
        committed: CommittedBlock,
        next: Ledger,
        outcome: BlockOutcome,
        out: &mut Vec<NodeOutput>,
    ) -> Result<(), Error> {
        assert_eq!(committed.block.header.height, self.height());
        assert_eq!(committed.certificate.value, committed.block.hash());
        let sets = self.consensus_sets().advance(&next, &outcome)?;
        self.ledger = next;
        self.set = sets.set;
        self.prev_set = sets.prev_set;
        self.proposers = sets.proposers;
        self.consensus = None;
        self.blocks.clear();
        let included: std::collections::BTreeSet<_> =
            outcome.receipts.iter().map(|r| r.tx_id).collect();
        self.mempool
            .update(&self.ledger, &|id| included.contains(id));
        self.report_dropped(out);
        let ledger = &self.ledger;
        self.evidence.retain(|(who, h), _| {
            ledger.validator(who).is_some_and(|v| !v.tombstoned)
                && ledger.height() + 1 - h <= ledger.params().max_evidence_age_blocks
        });
        self.last_cert = Some(committed.certificate.clone());
        out.push(NodeOutput::Committed {
            block: Box::new(committed),
            outcome: Box::new(outcome),
        });
        Ok(())
    }

    /// NODE-TIME-2: the consensus parameters of the height being started:
    /// `timeout_propose` grows with the transactions pending here, a proxy
    /// for the size of the block to come and for the gossip queued ahead of
    /// it, so a big block is not a failed round. Only timer durations
    /// change; the consensus rules do not.
    fn height_consensus_config(&self) -> Config {
        let mut config = self.config.consensus.clone();
        let pending =
            (self.mempool.len() as u64).min(u64::from(self.ledger.params().max_block_txs));
        let extra_ms = pending.saturating_mul(self.config.timeout_propose_per_tx_us) / 1_000;
        config.timeout_propose_ms = config.timeout_propose_ms.saturating_add(extra_ms);
        config
    }

    /// L10/L54: start the height after the last committed block.
    fn start_height(&mut self, now_ms: u64, records: &[Record<Sig>], out: &mut Vec<NodeOutput>) {
        self.waiting = false;
        self.height_started_ms = now_ms;
        self.peer_status.clear();
        let height = self.height();
        self.consensus = None;
        if self.is_validator() {
            let (consensus, outputs) = if records.is_empty() {
                let mut c = Consensus::new(
                    self.scheme.clone(),
                    self.key.clone(),
                    self.height_consensus_config(),
                    height,
                    self.set.clone(),
                )
                .with_proposers(self.proposers.clone());
                let o = c.start();
                (c, o)
            } else {
                Consensus::restore_with_proposers(
                    self.scheme.clone(),
                    self.key.clone(),
                    self.height_consensus_config(),
                    height,
                    self.set.clone(),
                    self.proposers.clone(),
                    records,
                )
            };
            self.consensus = Some(consensus);
            out.push(NodeOutput::SetTimer {
                timer: Timer::Rebroadcast { height },
                at_ms: now_ms.saturating_add(self.config.rebroadcast_interval_ms),
            });
            let mut inputs = VecDeque::new();
            self.perform_consensus(now_ms, outputs, &mut inputs, out);
            while let Some(input) = inputs.pop_front() {
                self.feed(now_ms, input, out);
            }
        }
        // NODE-BUF-1: replay what arrived early; keep what is still ahead.
        let buffered = std::mem::take(&mut self.buffered);
        for (from, message) in buffered {
            match message.consensus_height() {
                Some(h) if h < height => {}
                Some(h) if h > height => self.buffered.push_back((from, message)),
                _ if self.consensus.is_none() => {}
                _ => self.on_message(now_ms, from, message, out),
            }
        }
    }

    fn help_laggard(
        &mut self,
        now_ms: u64,
        peer: PeerId,
        height: Height,
        out: &mut Vec<NodeOutput>,
    ) {
        let last = self.ledger.height();
        if height == 0 || height > last {
            return;
        }
        // NODE-SYNC-4: a vote for the height just decided that crossed the
        // decision is no sign of lagging (its sender receives the same
        // quorum). Only a peer that has shown nothing newer, and is still
        // at the last height `sync_retry_ms` after the decision (its
        // rebroadcasts keep coming), is sent blocks.
        if self.peer_heights.get(&peer).is_some_and(|h| *h > last)
            || (height == last
                && now_ms < self.committed_ms.saturating_add(self.config.sync_retry_ms))
        {
            return;
        }
        if self
            .helped_ms
            .get(&peer)
            .is_some_and(|t| now_ms < t.saturating_add(self.config.sync_retry_ms))
        {
            return;
        }
        if self.helped_ms.len() >= self.config.max_tracked_peers
            && !self.helped_ms.contains_key(&peer)
        {
            // Bounded: forget the peer helped longest ago.
            let oldest = self
                .helped_ms
                .iter()
                .min_by_key(|(p, t)| (**t, **p))
                .map(|(p, _)| *p)
                .expect("non-empty");
            self.helped_ms.remove(&oldest);
        }
        self.helped_ms.insert(peer, now_ms);
        out.push(NodeOutput::ServeBlocks {
            to: peer,
            from_height: height,
            to_height: last.min(height + self.config.sync_batch_blocks - 1),
            max_bytes: self.config.sync_batch_bytes,
        });
    }

    /// NODE-PEER-1: remember the highest height `peer` has sent a
    /// consensus message for. Bounded: when full, the entry with the lowest
    /// height (ties: lowest peer) is forgotten.
    fn note_peer_height(&mut self, peer: PeerId, height: Height) {
        if let Some(h) = self.peer_heights.get_mut(&peer) {
            *h = (*h).max(height);
            return;
        }
        if self.peer_heights.len() >= self.config.max_tracked_peers {
            let lowest = self
                .peer_heights
                .iter()
                .min_by_key(|(p, h)| (**h, **p))
                .map(|(p, _)| *p)
                .expect("non-empty");
            self.peer_heights.remove(&lowest);
        }
        self.peer_heights.insert(peer, height);
    }

    /// NODE-SYNC-2: ask `peer` for the blocks after ours, at most one request
    /// in flight per `sync_retry_ms`.
    fn request_blocks(&mut self, now_ms: u64, peer: PeerId, out: &mut Vec<NodeOutput>) {
        if self
            .sync_requested_ms
            .is_some_and(|t| now_ms < t.saturating_add(self.config.sync_retry_ms))
        {
            return;
        }
        self.sync_requested_ms = Some(now_ms);
        out.push(NodeOutput::Send {
            to: peer,
            message: WireMessage::BlockRequest {
                from_height: self.ledger.height() + 1,
            },
        });
        out.push(NodeOutput::SetTimer {
            timer: Timer::SyncRetry,
            at_ms: now_ms.saturating_add(self.config.sync_retry_ms),
        });
    }

    /// NODE-SYNC-3: verify each block's certificate against the set of its
    /// height and the block through the ledger, then commit it. Stops at the
    /// first block that does not follow or does not verify.
    fn on_blocks(
        &mut self,
        now_ms: u64,
        from: PeerId,
        blocks: Vec<CommittedBlock>,
        out: &mut Vec<NodeOutput>,
    ) {
        // NODE-SYNC-7: a first block above the next height (a block pushed to
        // a follower, NODE-ADMIT-5, after it missed some) applies nothing but
        // shows the sender has committed everything before it: ask it for
        // the gap, at most once per `sync_retry_ms` (NODE-SYNC-2).
        if blocks
            .first()
            .is_some_and(|b| b.block.header.height > self.height())
        {
            self.request_blocks(now_ms, from, out);
            return;
        }
        self.sync_requested_ms = None;
        // NODE-SYNC-5: the sender may have cut the batch by count or by
        // bytes. A batch that could have been cut by bytes is one the next
        // block might not have fitted beside; ask again at once after either.
        let batch_bytes: u64 = blocks.iter().map(|b| b.encode().len() as u64).sum();
        let max_block_bytes = u64::from(self.ledger.params().max_block_bytes);
        let full_batch = blocks.len() as u64 >= self.config.sync_batch_blocks
            || batch_bytes.saturating_add(max_block_bytes) > self.config.sync_batch_bytes;
        let mut applied = false;
        for committed in blocks
            .into_iter()
            .take(self.config.sync_batch_blocks as usize)
        {
            let height = self.height();
            let header = &committed.block.header;
            if header.height < height {
                continue;
            }
            if header.height > height
                || committed.certificate.value != committed.block.hash()
                || committed
                    .certificate
                    .verify(&self.scheme, &self.set, height)
                    .is_err()
            {
                break;
            }
            let mempool = &self.mempool;
            let Ok((next, outcome)) = self
                .ledger
                .apply_block_with_verified(&committed.block, &|id| mempool.verified_sender(id))
            else {
                break;
            };
            if self.advance(committed, next, outcome, out).is_err() {
                break;
            }
            applied = true;
        }
        if applied {
            // Join the height after the last synced block at once.
            self.start_height(now_ms, &[], out);
            if full_batch {
                self.request_blocks(now_ms, from, out);
            }
        }
    }
}

/// The consensus validator set of the height after `ledger`'s, fresh
/// priorities; `update` overrides the ledger's active set.
fn validator_set(
    ledger: &Ledger,
    update: Option<&[(Address, u64)]>,
) -> Result<ValidatorSet, Error> {
    let active = update.unwrap_or(ledger.active_set());
    let members = active
        .iter()
        .map(|(a, power)| {
            let v = ledger
                .validator(a)
                .expect("STAKE-5: active members are validators");
            (*a, v.public_key, *power)
        })
        .collect();
    ValidatorSet::new(members).map_err(|e| Error::InvalidValidatorSet(e.to_string()))
}
