//! Exhaustive model checking of Blyan's Tendermint consensus (spec/consensus.md, CONS-MC-*).
//!
//! The actors run the real [`Consensus`] state machine from `blyan-state-machine`
//! (with the free [`ModelScheme`] signatures): this is not a re-model. The
//! environment is adversarial: an unordered network that duplicates, reorders
//! and (optionally) loses messages, timers that fire at any moment, crashes
//! that keep only what an actor persisted, and Byzantine validators whose
//! equivocating proposals and votes are all placed in the network at the start
//! (a Byzantine validator gains nothing from waiting: with ideal signatures it
//! can only send messages signed by itself, and every such message of the
//! bounded heights and rounds is already there).
//!
//! What it deliberately does not model: the content of blocks (values are
//! 32-byte ids, `valid(v)` is a fixed predicate), validator-set changes, and
//! real time.

use blyan_state_machine::consensus::{
    Config, Consensus, Input, Message, ModelScheme, Mutant, Output, Proposal, Record, Round,
    Signed, Step, TimeoutKind, ValidatorSet, ValueId, Vote, VoteType,
};
use blyan_state_machine::types::{Address, Height};
use stateright::actor::{
    Actor, ActorModel, ActorModelAction, ActorModelState, Envelope, Id, LossyNetwork, Network, Out,
    model_timeout,
};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Mutex;

/// What to check.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelConfig {
    /// Validators, each of voting power 1; the Byzantine ones are the highest
    /// indices below `validators` unless `byzantine_first_proposer` is set.
    pub validators: usize,
    pub byzantine: usize,
    /// Heights to decide (1-based, inclusive).
    pub heights: Height,
    /// Rounds per height (0..rounds); no timer moves a validator past the last.
    pub rounds: Round,
    /// Crash-restarts in a whole run (all honest validators together).
    pub max_crashes: usize,
    /// The network may lose messages. On the unordered network a loss is
    /// explored as "never delivered again" (reduction R2) unless
    /// `explicit_loss` asks for stateright's `Drop` actions.
    pub lossy: bool,
    /// Explore every `Drop` action literally (only to validate R2 on small
    /// configurations; the state space grows by every subset of the network).
    pub explicit_loss: bool,
    /// Links between honest validators are FIFO (as TCP) instead of unordered
    /// and duplicating. Byzantine messages stay unordered (each travels on a
    /// link of its own). Off in CI: the unordered network is the stronger adversary.
    pub fifo_honest_links: bool,

    /// Index of the first Byzantine validator (they are consecutive).
    pub first_byzantine: usize,
    pub mutant: Mutant,
    /// Conflicting proposals a Byzantine proposer sends per round (the third is invalid).
    pub byzantine_proposals: u8,
    pub strategy: Strategy,
    /// Whether timeouts fire. Off only in searches for a known counterexample
    /// that needs none (it removes a large part of the branching).
    pub timers: bool,
    /// A reduced configuration: of the timers, only `timeoutPrecommit` fires
    /// (rounds still change; no validator times out waiting for a proposal
    /// or a polka). What makes two rounds fit CI (CONS-MC-4).
    pub precommit_timeouts_only: bool,
    /// Reduction R5 (CONS-MC-1): a delivery that only records a message is
    /// made only as part of a set delivered at once that ends in an action,
    /// and only with the messages that action needs.
    pub defer_inert: bool,
}

/// What the Byzantine validators place in the network (CONS-MC-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Every conflicting proposal and every vote for every candidate value
    /// (and nil), to every honest validator: all equivocations at once.
    Full,
    /// Split brain: honest validators are split into two halves; each half
    /// gets its own proposal and votes for its own value (nil for the second
    /// half when the round's proposer is honest). Each honest validator sees
    /// one consistent Byzantine story; the two stories conflict.
    Split,
    /// Like `Split` with three groups: the first honest validator gets story
    /// 0, the last story 1, and those between get both (in any order): the
    /// "swing" validators a Byzantine leader uses to build two quorums.
    Swing,
}

impl ModelConfig {
    /// The configuration CI checks exhaustively with timers (CONS-MC-4), and
    /// the CLI's default: 4 validators, the Byzantine one the proposer of
    /// round 1 (so round 0's proposer is honest), 1 height, 1 round, the
    /// unordered, duplicating, lossy network, no crash. Without reduction R5
    /// (CI checks it with R5 and uses this to validate R5; see CONS-MC-4).
    pub fn ci() -> Self {
        ModelConfig {
            validators: 4,
            byzantine: 1,
            heights: 1,
            rounds: 1,
            max_crashes: 0,
            lossy: true,
            explicit_loss: false,
            fifo_honest_links: false,
            first_byzantine: 1,
            mutant: Mutant::None,
            byzantine_proposals: 2,
            strategy: Strategy::Split,
            timers: true,
            precommit_timeouts_only: false,
            defer_inert: false,
        }
    }

    /// The configuration CI checks exhaustively with a crash (CONS-MC-4), and
    /// the space the `ForgetVotes` mutant is searched in: the Byzantine
    /// validator is round 0's proposer and tells its two stories to the
    /// "swing" validators (`Strategy::Swing`), one crash-restart, no timers
    /// (the crash, not a timeout, is what is under test).
    pub fn ci_crash() -> Self {
        ModelConfig {
            first_byzantine: 0,
            strategy: Strategy::Swing,
            max_crashes: 1,
            timers: false,
            ..Self::ci()
        }
    }

    /// The deeper configuration CI checks exhaustively (CONS-MC-4): the CI
    /// configuration over two heights (the decision, the records cleared,
    /// the next height's set and proposer, validators at different heights)
    /// with timers *and* a crash-restart, with reduction R5.
    pub fn ci_two_heights() -> Self {
        ModelConfig {
            heights: 2,
            max_crashes: 1,
            defer_inert: true,
            ..Self::ci()
        }
    }

    /// `ci_crash` over two heights, with reduction R5.
    pub fn ci_crash_two_heights() -> Self {
        ModelConfig {
            heights: 2,
            defer_inert: true,
            ..Self::ci_crash()
        }
    }

    /// Two rounds of one height, reduced to precommit timeouts, with
    /// reduction R5: checked exhaustively in CI (CONS-MC-4), and where
    /// `IgnoreLock` is searched (a lock matters only in a later round).
    pub fn two_rounds() -> Self {
        ModelConfig {
            rounds: 2,
            precommit_timeouts_only: true,
            defer_inert: true,
            ..Self::ci()
        }
    }

    pub fn is_byzantine(&self, index: usize) -> bool {
        index >= self.first_byzantine && index < self.first_byzantine + self.byzantine
    }

    pub fn honest(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.validators).filter(|i| !self.is_byzantine(*i))
    }

    pub fn validator_set(&self) -> ValidatorSet {
        ValidatorSet::new(
            (0..self.validators)
                .map(|i| (address(i), [0u8; 33], 1))
                .collect(),
        )
        .expect("model sets are valid")
    }

    /// The set of `height` (priorities advanced once per height, CONS-PROP-4).
    pub fn validator_set_at(&self, height: Height) -> ValidatorSet {
        let mut set = self.validator_set();
        for _ in 1..height {
            set = set.next_height();
        }
        set
    }

    fn consensus_config(&self) -> Config {
        Config {
            mutant: self.mutant,
            ..Config::default()
        }
    }
}

/// Validator `i`'s address: ascending with `i`, so index = position in the set.
pub fn address(i: usize) -> Address {
    let mut a = [0u8; 20];
    a[19] = u8::try_from(i + 1).expect("fewer than 255 validators");
    Address(a)
}

/// The value honest validator `i` proposes at `height` when it has no valid value.
pub fn honest_value(i: usize, height: Height) -> ValueId {
    let mut v = [0u8; 32];
    v[0] = 0x10 + u8::try_from(i).expect("small");
    v[1] = height as u8;
    v
}

/// Byzantine validator `i`'s `k`-th proposal at `height`; `k = 2` is invalid.
pub fn byzantine_value(i: usize, k: u8, height: Height) -> ValueId {
    let mut v = [0u8; 32];
    v[0] = if k == 2 {
        INVALID
    } else {
        0xB0 + 0x10 * k + u8::try_from(i).expect("small")
    };
    v[1] = height as u8;
    v
}

const INVALID: u8 = 0xFF;

/// The model's `valid(v)`.
pub fn is_valid(v: &ValueId) -> bool {
    v[0] != INVALID
}

/// What a validator keeps across a crash (stateright's `Storage`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Store {
    /// CONS-CRASH-1 records of the current height.
    pub records: BTreeSet<Record<Address>>,
    /// Decided values, index = height − 1 (committed blocks).
    pub decided: Vec<ValueId>,
    /// Restarts so far (the model bounds them: each restart re-sends messages).
    pub restarts: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[allow(clippy::large_enum_variant)] // one state per actor; boxing would only add indirection
pub enum NodeState {
    Honest {
        consensus: Consensus<ModelScheme>,
        /// The `(height, round)` each pending timer was scheduled for.
        timers: BTreeMap<TimeoutKind, (Height, Round)>,
        store: Store,
    },
    /// Every height decided (reduction R4): the `Consensus` of a validator
    /// with nothing left to do is never read again (it ignores every input,
    /// its timers are cancelled, a restart rebuilds it from storage, and the
    /// properties read only storage), so it is dropped: states that differ
    /// only in what a finished validator had seen are one state.
    Done,
    /// Byzantine validators act only through the messages placed at the start.
    Byzantine,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub index: usize,
    pub cfg: ModelConfig,
}

pub type Msg = Message<Address>;

impl Node {
    /// Performs `outputs` (and any inputs they trigger) in order.
    fn perform(
        &self,
        consensus: &mut Consensus<ModelScheme>,
        timers: &mut BTreeMap<TimeoutKind, (Height, Round)>,
        store: &mut Store,
        outputs: Vec<Output<Address>>,
        o: &mut Out<Self>,
    ) {
        let mut queue: std::collections::VecDeque<Output<Address>> = outputs.into();
        // Bound: each height produces a bounded number of outputs.
        let mut budget = 10_000usize;
        while let Some(output) = queue.pop_front() {
            budget = budget.checked_sub(1).expect("output storm");
            match output {
                Output::Persist(record) => {
                    store.records.insert(record);
                }
                Output::Broadcast(msg) => {
                    for peer in self.cfg.honest().filter(|j| *j != self.index) {
                        o.send(Id::from(peer), msg.clone());
                    }
                }
                Output::ScheduleTimeout {
                    kind,
                    height,
                    round,
                    ..
                } => {
                    let last_round = kind == TimeoutKind::Precommit && round + 1 >= self.cfg.rounds;
                    let reduced_away =
                        self.cfg.precommit_timeouts_only && kind != TimeoutKind::Precommit;
                    if !last_round && self.cfg.timers && !reduced_away {
                        timers.insert(kind, (height, round));
                        o.set_timer(kind, model_timeout());
                    }
                }
                Output::RequestValue { height, round } => {
                    let value = honest_value(self.index, height);
                    let more = consensus
                        .handle(Input::ProposeValue {
                            height,
                            round,
                            value,
                        })
                        .expect("own value is accepted");
                    queue.extend(more);
                }
                Output::Decide { height, value, .. } => {
                    assert_eq!(store.decided.len() as u64 + 1, height);
                    store.decided.push(value);
                    store.records.clear(); // records of a decided height are no longer needed
                    for kind in std::mem::take(timers).into_keys() {
                        o.cancel_timer(kind);
                    }
                    if height < self.cfg.heights {
                        let set = self.cfg.validator_set_at(height + 1);
                        queue.extend(consensus.start_height(height + 1, set));
                    }
                }
                Output::Evidence(_) => {}
            }
        }
        // Timers the consensus would ignore are cancelled: a stale timer firing
        // changes nothing, so keeping it would only multiply states.
        let (height, round, step) = (consensus.height(), consensus.round(), consensus.step());
        let stale: Vec<TimeoutKind> = timers
            .iter()
            .filter(|(kind, (h, r))| {
                *h != height
                    || *r != round
                    || (**kind == TimeoutKind::Propose && step != Step::Propose)
                    || (**kind == TimeoutKind::Prevote && step != Step::Prevote)
            })
            .map(|(kind, _)| *kind)
            .collect();
        for kind in stale {
            timers.remove(&kind);
            o.cancel_timer(kind);
        }
        o.save(store.clone());
    }

    fn step(&self, state: &mut Cow<NodeState>, input: Input<Address>, o: &mut Out<Self>) {
        let NodeState::Honest { consensus, .. } = state.as_ref() else {
            return; // Byzantine, or done: nothing left to do
        };
        let mut next = consensus.clone();
        let Ok(mut outputs) = next.handle(input) else {
            return; // rejected: nothing changes
        };
        // Evidence is not modelled (slashing is the ledger's business): a
        // repeated equivocating vote changes nothing and must stay a no-op,
        // or stateright would count a "new" state for every redelivery.
        outputs.retain(|output| !matches!(output, Output::Evidence(_)));
        if outputs.is_empty() && next == *consensus {
            return;
        }
        let NodeState::Honest {
            consensus,
            timers,
            store,
        } = state.to_mut()
        else {
            unreachable!("checked above")
        };
        *consensus = next;
        self.perform(consensus, timers, store, outputs, o);
        if store.decided.len() as u64 >= self.cfg.heights {
            assert!(timers.is_empty(), "deciding cancels every timer");
            *state.to_mut() = NodeState::Done;
        }
    }
}

impl Actor for Node {
    type Msg = Msg;
    type State = NodeState;
    type Timer = TimeoutKind;
    type Random = ();
    type Storage = Store;

    fn on_start(&self, _id: Id, storage: &Option<Store>, o: &mut Out<Self>) -> NodeState {
        if self.cfg.is_byzantine(self.index) {
            return NodeState::Byzantine;
        }
        let mut store = storage.clone().unwrap_or_default();
        if storage.is_some() {
            store.restarts = store.restarts.checked_add(1).expect("restarts are bounded");
        }
        let height = store.decided.len() as u64 + 1;
        if height > self.cfg.heights {
            // Every height decided before the crash: nothing left to do (R4).
            o.save(store);
            return NodeState::Done;
        }
        let set = self.cfg.validator_set_at(height);
        let config = self.cfg.consensus_config();
        let signer = address(self.index);
        let mut timers = BTreeMap::new();
        let (mut consensus, outputs) = if storage.is_some() {
            let records: Vec<_> = store.records.iter().cloned().collect();
            Consensus::restore(ModelScheme, signer, config, height, set, &records)
        } else {
            let mut c = Consensus::new(ModelScheme, signer, config, height, set);
            let out = c.start();
            (c, out)
        };
        self.perform(&mut consensus, &mut timers, &mut store, outputs, o);
        if store.decided.len() as u64 >= self.cfg.heights {
            return NodeState::Done; // decided from the restored records alone
        }
        NodeState::Honest {
            consensus,
            timers,
            store,
        }
    }

    fn on_msg(&self, _id: Id, state: &mut Cow<NodeState>, _src: Id, msg: Msg, o: &mut Out<Self>) {
        let input = match msg {
            Message::Proposal(proposal) => {
                let valid = is_valid(&proposal.message.value);
                Input::Proposal { proposal, valid }
            }
            Message::Vote(vote) => Input::Vote(vote),
        };
        self.step(state, input, o);
    }

    fn on_timeout(
        &self,
        _id: Id,
        state: &mut Cow<NodeState>,
        kind: &TimeoutKind,
        o: &mut Out<Self>,
    ) {
        let NodeState::Honest { timers, .. } = state.as_ref() else {
            return;
        };
        let Some((height, round)) = timers.get(kind).copied() else {
            return;
        };
        if let NodeState::Honest { timers, .. } = state.to_mut() {
            timers.remove(kind);
        }
        self.step(
            state,
            Input::Timeout {
                kind: *kind,
                height,
                round,
            },
            o,
        );
    }
}

/// R5's successors of one validator (see `Model::deliver_sets`): each a list
/// of indices into `pending`, the inert messages in ascending order and then
/// the one that acts.
fn minimal_acting_sets(
    consensus: &Consensus<ModelScheme>,
    pending: &[(Id, Msg)],
) -> Vec<Vec<usize>> {
    // The validator after each inert subset (bitmask over `pending`).
    let mut inert: BTreeMap<u64, Consensus<ModelScheme>> = BTreeMap::new();
    inert.insert(0, consensus.clone());
    let mut frontier = vec![0u64];
    // Candidate actions: (T, m).
    let mut acting: Vec<(u64, usize)> = Vec::new();
    while !frontier.is_empty() {
        let mut grown = Vec::new();
        for mask in frontier {
            let base = &inert[&mask];
            for (j, (_, msg)) in pending.iter().enumerate() {
                if mask & (1 << j) != 0 {
                    continue;
                }
                match receive(base, msg) {
                    Delivery::NoOp => {}
                    Delivery::Acts => acting.push((mask, j)),
                    // Each subset once: extend only past its highest member.
                    Delivery::Inert(after)
                        if mask == 0 || j > 63 - mask.leading_zeros() as usize =>
                    {
                        grown.push((mask | (1 << j), after));
                    }
                    Delivery::Inert(_) => {}
                }
            }
        }
        frontier = grown.iter().map(|(mask, _)| *mask).collect();
        inert.extend(grown);
    }
    acting
        .into_iter()
        .filter(|(mask, j)| {
            (0..pending.len())
                .filter(|x| mask & (1 << x) != 0)
                .all(|x| {
                    inert.get(&(mask & !(1 << x))).is_none_or(|smaller| {
                        !matches!(receive(smaller, &pending[*j].1), Delivery::Acts)
                    })
                })
        })
        .map(|(mask, j)| {
            (0..pending.len())
                .filter(|x| mask & (1 << x) != 0)
                .chain([j])
                .collect()
        })
        .collect()
}

/// What delivering a message to a validator does (reduction R5).
#[allow(clippy::large_enum_variant)] // short-lived; boxing would only add an allocation
enum Delivery {
    /// Refused, or already received: nothing changes.
    NoOp,
    /// Only recorded: the validator after it.
    Inert(Consensus<ModelScheme>),
    /// The validator acts (sends, persists, schedules, decides or changes
    /// its control state).
    Acts,
}

fn receive(consensus: &Consensus<ModelScheme>, msg: &Msg) -> Delivery {
    let input = match msg.clone() {
        Message::Proposal(proposal) => {
            let valid = is_valid(&proposal.message.value);
            Input::Proposal { proposal, valid }
        }
        Message::Vote(vote) => Input::Vote(vote),
    };
    let mut next = consensus.clone();
    let Ok(mut outputs) = next.handle(input) else {
        return Delivery::NoOp;
    };
    outputs.retain(|output| !matches!(output, Output::Evidence(_)));
    if outputs.is_empty() && next == *consensus {
        Delivery::NoOp
    } else if outputs.is_empty() && next.same_except_received(consensus) {
        Delivery::Inert(next)
    } else {
        Delivery::Acts
    }
}

/// Values that appeared in a proposal (the model's history, for validity).
pub type Proposed = BTreeSet<ValueId>;

/// The actor system as stateright builds it, before the reductions.
pub type Actors = ActorModel<Node, ModelConfig, Proposed>;
pub type State = ActorModelState<Node, Proposed>;
/// The checked model's actions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// stateright's own; `Crash(id)` is a crash immediately followed by the
    /// restart (R1).
    Actor(ActorModelAction<Msg, TimeoutKind, ()>),
    /// R5: `msgs` delivered to `dst` in this order; every delivery but the
    /// last only records its message, and the last makes `dst` act.
    DeliverSet { dst: Id, msgs: Vec<(Id, Msg)> },
}

/// Upper bound on the messages one validator may have pending at once in a
/// configuration checked with R5 (its inert subsets are enumerated as bitmasks).
const MAX_PENDING_R5: usize = 64;

/// Entries in R5's memo before it is cleared.
const MAX_R5_MEMO: usize = 1 << 20;

/// Every message the Byzantine validators will ever send, in the network from
/// the start, addressed to every honest validator (CONS-MC-1).
pub fn byzantine_messages(cfg: &ModelConfig) -> Vec<(usize, usize, Msg)> {
    match cfg.strategy {
        Strategy::Full => full_byzantine_messages(cfg),
        Strategy::Split | Strategy::Swing => split_byzantine_messages(cfg),
    }
}

fn signed_vote(
    b: usize,
    vote_type: VoteType,
    height: Height,
    round: Round,
    value: Option<ValueId>,
) -> Msg {
    Message::Vote(Signed {
        message: Vote {
            vote_type,
            height,
            round,
            value,
            validator: address(b),
        },
        signature: address(b),
    })
}

fn split_byzantine_messages(cfg: &ModelConfig) -> Vec<(usize, usize, Msg)> {
    let mut out = Vec::new();
    let honest: Vec<usize> = cfg.honest().collect();
    let half = honest.len().div_ceil(2);
    for h in 1..=cfg.heights {
        let set = cfg.validator_set_at(h);
        for r in 0..cfg.rounds {
            let proposer = set.index_of(&set.proposer(r)).expect("member");
            for (position, dst) in honest.iter().enumerate() {
                let sides: &[u8] = match cfg.strategy {
                    Strategy::Swing if position == 0 => &[0],
                    Strategy::Swing if position + 1 == honest.len() => &[1],
                    Strategy::Swing => &[0, 1],
                    _ if position < half => &[0],
                    _ => &[1],
                };
                for side in sides.iter().copied() {
                    let value = if cfg.is_byzantine(proposer) {
                        let value = byzantine_value(proposer, side, h);
                        let proposal = Proposal {
                            height: h,
                            round: r,
                            value,
                            valid_round: None,
                            proposer: address(proposer),
                        };
                        out.push((
                            proposer,
                            *dst,
                            Message::Proposal(Signed {
                                message: proposal,
                                signature: address(proposer),
                            }),
                        ));
                        Some(value)
                    } else if side == 0 {
                        Some(honest_value(proposer, h))
                    } else {
                        None
                    };
                    for b in (0..cfg.validators).filter(|b| cfg.is_byzantine(*b)) {
                        for vote_type in [VoteType::Prevote, VoteType::Precommit] {
                            out.push((b, *dst, signed_vote(b, vote_type, h, r, value)));
                        }
                    }
                }
            }
        }
    }
    out
}

fn full_byzantine_messages(cfg: &ModelConfig) -> Vec<(usize, usize, Msg)> {
    let mut out = Vec::new();
    for h in 1..=cfg.heights {
        let set = cfg.validator_set_at(h);
        // Values anyone may propose up to each round: candidates for votes.
        let mut candidates: BTreeSet<Option<ValueId>> = BTreeSet::from([None]);
        for r in 0..cfg.rounds {
            let proposer = set
                .index_of(&set.proposer(r))
                .expect("proposer is a member");
            if cfg.is_byzantine(proposer) {
                for k in 0..cfg.byzantine_proposals {
                    let value = byzantine_value(proposer, k, h);
                    candidates.insert(Some(value));
                    let proposal = Proposal {
                        height: h,
                        round: r,
                        value,
                        valid_round: None,
                        proposer: address(proposer),
                    };
                    for dst in cfg.honest() {
                        out.push((
                            proposer,
                            dst,
                            Message::Proposal(Signed {
                                message: proposal.clone(),
                                signature: address(proposer),
                            }),
                        ));
                    }
                }
            } else {
                candidates.insert(Some(honest_value(proposer, h)));
            }
            for b in (0..cfg.validators).filter(|b| cfg.is_byzantine(*b)) {
                for vote_type in [VoteType::Prevote, VoteType::Precommit] {
                    for value in &candidates {
                        let vote = Vote {
                            vote_type,
                            height: h,
                            round: r,
                            value: *value,
                            validator: address(b),
                        };
                        for dst in cfg.honest() {
                            out.push((
                                b,
                                dst,
                                Message::Vote(Signed {
                                    message: vote.clone(),
                                    signature: address(b),
                                }),
                            ));
                        }
                    }
                }
            }
        }
    }
    out
}

/// CONS-MC-2 agreement: no two honest validators decide differently at a height.
pub fn agreement(model: &Model, state: &State) -> bool {
    let mut by_height: BTreeMap<usize, ValueId> = BTreeMap::new();
    for i in model.cfg.honest() {
        let Some(store) = &state.actor_storages[i] else {
            continue;
        };
        for (h, v) in store.decided.iter().enumerate() {
            if *by_height.entry(h).or_insert(*v) != *v {
                return false;
            }
        }
    }
    true
}

/// CONS-MC-2 validity: every decided value is valid and was proposed.
pub fn validity(model: &Model, state: &State) -> bool {
    model.cfg.honest().all(|i| {
        state.actor_storages[i].as_ref().is_none_or(|store| {
            store
                .decided
                .iter()
                .all(|v| is_valid(v) && state.history.contains(v))
        })
    })
}

/// CONS-MC-2 non-vacuity: some honest validator decides the last height.
pub fn decided(model: &Model, state: &State) -> bool {
    model.cfg.honest().any(|i| {
        state.actor_storages[i]
            .as_ref()
            .is_some_and(|s| s.decided.len() as u64 == model.cfg.heights)
    })
}

/// What every property and every later action of a validator reads, with
/// the received proposals and votes left out: the projection on which
/// reduction R5 is exact (CONS-MC-1). Byzantine and finished validators are
/// `None`; the network is left out because what it holds beyond the
/// Byzantine messages is what the honest validators signed, which is in
/// their states.
#[allow(clippy::type_complexity)] // a tuple used only to hash and compare
pub fn observable(
    state: &State,
) -> (
    Vec<
        Option<(
            Consensus<ModelScheme>,
            BTreeMap<TimeoutKind, (Height, Round)>,
            Store,
        )>,
    >,
    &Vec<Option<Store>>,
    &Proposed,
) {
    let actors = state
        .actor_states
        .iter()
        .map(|a| match &**a {
            NodeState::Honest {
                consensus,
                timers,
                store,
            } => Some((consensus.without_received(), timers.clone(), store.clone())),
            NodeState::Done | NodeState::Byzantine => None,
        })
        .collect();
    (actors, &state.actor_storages, &state.history)
}

/// Crash-restarts so far, all validators together./// Crash-restarts so far, all validators together.
pub fn restarts(state: &State) -> usize {
    state
        .actor_storages
        .iter()
        .flatten()
        .map(|s| usize::from(s.restarts))
        .sum()
}

/// The checked model: stateright's actor system with the reductions of
/// CONS-MC-1 (R1 to R5) applied on every transition. Each reduction keeps
/// the set of reachable *observable* states (actor states and storage,
/// timers, the proposal history: everything a property or a later
/// transition reads) and only merges or skips states that differ in what
/// nothing reads.
pub struct Model {
    pub actors: Actors,
    pub cfg: ModelConfig,
    /// Offer only actions that lead somewhere. Needed by stateright 0.31's
    /// simulation checker, which records a wrong path when an action it
    /// chose yields no state (as a no-op delivery on an unordered network
    /// does); exhaustive searches leave it off (it doubles the work).
    pub prune_no_ops: bool,
    /// R5's successors per (validator state, pending messages), by
    /// fingerprint: many global states share both. Bounded by `MAX_R5_MEMO`.
    r5_memo: Mutex<HashMap<u64, Vec<Vec<usize>>>>,
}

impl Model {
    /// For `spawn_simulation`: see `prune_no_ops`.
    pub fn for_simulation(mut self) -> Self {
        self.prune_no_ops = true;
        self
    }

    /// R2: a loss on the unordered network is explored as "never delivered
    /// again"; `Drop` actions are generated only where they add behaviour
    /// (FIFO links, where a loss lets later messages overtake) or where asked.
    pub fn explicit_drops(&self) -> bool {
        self.cfg.lossy && (self.cfg.explicit_loss || self.cfg.fifo_honest_links)
    }

    /// R1: whether crashing (and restarting) `index` can lead anywhere new.
    fn may_crash(&self, state: &State, index: usize) -> bool {
        if !self.cfg.is_byzantine(index) && restarts(state) < self.cfg.max_crashes {
            // A finished validator restarts finished (R4), and one that has
            // signed nothing restarts in its initial state with every message
            // it had received still in the (duplicating) network: the
            // resulting state is reachable without the crash.
            matches!(*state.actor_states[index], NodeState::Honest { .. })
                && state.actor_storages[index]
                    .as_ref()
                    .is_some_and(|s| !s.records.is_empty())
        } else {
            false
        }
    }

    /// R5: the sets of messages whose delivery to `i` makes it act, each
    /// minimal (every message in it but the last is needed for the action).
    ///
    /// A delivery is *inert* when it only records the message (the
    /// validator's control state, signed messages, timers and storage stay
    /// as they were, and nothing is sent). On the duplicating network a
    /// message stays deliverable, so an inert delivery can wait until it is
    /// part of an action; deliveries the action does not need can wait for
    /// an action of their own. The successors are therefore, for every set
    /// `T` of pending messages whose delivery is inert and every `m` whose
    /// delivery after `T` acts, `T` then `m`, provided no message of `T` can
    /// be left out with `m` still acting. Each subset is enumerated once, in
    /// ascending order (inertness is assumed not to depend on the order;
    /// the exactness test checks the reduction as a whole).
    fn deliver_sets(&self, state: &State, i: usize, actions: &mut Vec<Action>) {
        let NodeState::Honest { consensus, .. } = &*state.actor_states[i] else {
            return;
        };
        let dst = Id::from(i);
        let mut pending: Vec<(Id, Msg)> = state
            .network
            .iter_deliverable()
            .filter(|e| e.dst == dst)
            .map(|e| (e.src, e.msg.clone()))
            .collect();
        // A canonical order, so that equal inputs share the memo entry.
        pending.sort_unstable_by(|a, b| (usize::from(a.0), &a.1).cmp(&(usize::from(b.0), &b.1)));
        assert!(
            pending.len() <= MAX_PENDING_R5,
            "too many pending messages for R5"
        );
        let key = BuildHasherDefault::<DefaultHasher>::default().hash_one((consensus, &pending));
        let cached = self.r5_memo.lock().expect("memo lock").get(&key).cloned();
        let sets = match cached {
            Some(sets) => sets,
            None => {
                let sets = minimal_acting_sets(consensus, &pending);
                let mut memo = self.r5_memo.lock().expect("memo lock");
                if memo.len() >= MAX_R5_MEMO {
                    memo.clear(); // bounded: a miss only recomputes
                }
                memo.insert(key, sets.clone());
                sets
            }
        };
        for set in sets {
            let msgs = set.iter().map(|x| pending[*x].clone()).collect();
            actions.push(Action::DeliverSet { dst, msgs });
        }
    }

    /// R3: the unordered network remembers the last delivered message only
    /// to tell apart deliveries that change nothing; those are already
    /// skipped (stateright drops no-op deliveries on unordered networks), and
    /// nothing reads it, so it is cleared.
    fn canonical(mut state: State) -> State {
        if let Network::UnorderedDuplicating(_, last) = &mut state.network {
            *last = None;
        }
        state
    }
}

impl stateright::Model for Model {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        self.actors
            .init_states()
            .into_iter()
            .map(Self::canonical)
            .collect()
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        assert!(
            state.crashed.iter().all(|c| !c),
            "restarts are immediate (R1)"
        );
        let mut raw = Vec::new();
        self.actors.actions(state, &mut raw);
        actions.extend(
            raw.into_iter()
                .filter(|action| match action {
                    ActorModelAction::Crash(id) => self.may_crash(state, usize::from(*id)),
                    ActorModelAction::Drop(_) => self.explicit_drops(),
                    ActorModelAction::Deliver { .. } => !self.cfg.defer_inert,
                    _ => true,
                })
                .map(Action::Actor),
        );
        if self.cfg.defer_inert {
            for i in self.cfg.honest() {
                self.deliver_sets(state, i, actions);
            }
        }
        if self.prune_no_ops {
            actions.retain(|action| self.next_state(state, action.clone()).is_some());
        }
    }

    fn next_state(&self, state: &State, action: Action) -> Option<State> {
        let action = match action {
            Action::Actor(action) => action,
            Action::DeliverSet { dst, msgs } => {
                let mut next = state.clone();
                for (src, msg) in msgs {
                    next = self
                        .actors
                        .next_state(&next, ActorModelAction::Deliver { src, dst, msg })?;
                }
                return Some(Self::canonical(next));
            }
        };
        let next = match action {
            // R1: a crash is followed at once by the restart. The restart
            // reads only the validator's own storage, which nothing changes
            // while it is down, and deliveries to a crashed validator are
            // impossible anyway: delaying the restart past other actors'
            // steps reaches the same states, in which the properties (read
            // from storage) have the same values.
            ActorModelAction::Crash(id) => {
                let crashed = self.actors.next_state(state, ActorModelAction::Crash(id))?;
                self.actors
                    .next_state(&crashed, ActorModelAction::Recover(id))?
            }
            action => self.actors.next_state(state, action)?,
        };
        Some(Self::canonical(next))
    }

    fn format_action(&self, action: &Action) -> String {
        match action {
            Action::Actor(ActorModelAction::Crash(id)) => format!("Crash and restart {id:?}"),
            Action::Actor(action) => self.actors.format_action(action),
            Action::DeliverSet { dst, msgs } => {
                let msgs: Vec<String> = msgs
                    .iter()
                    .map(|(src, msg)| format!("{src:?}: {msg:?}"))
                    .collect();
                format!("Deliver to {dst:?} at once: {}", msgs.join("; "))
            }
        }
    }

    fn properties(&self) -> Vec<stateright::Property<Self>> {
        vec![
            stateright::Property::always("agreement", agreement),
            stateright::Property::always("validity", validity),
            stateright::Property::sometimes("decided", decided),
        ]
    }

    fn within_boundary(&self, state: &State) -> bool {
        assert!(
            restarts(state) <= self.cfg.max_crashes,
            "bounded by may_crash"
        );
        true
    }
}

/// The stateright model of `cfg`.
pub fn model(cfg: ModelConfig) -> Model {
    assert!(cfg.validators >= 1 && cfg.validators < 255);
    assert!(cfg.first_byzantine + cfg.byzantine <= cfg.validators);
    assert!(
        !cfg.defer_inert || !(cfg.fifo_honest_links || cfg.explicit_loss),
        "R5 needs the duplicating network: a message must stay deliverable"
    );
    let envelopes: Vec<Envelope<Msg>> = byzantine_messages(&cfg)
        .into_iter()
        .enumerate()
        .map(|(k, (src, dst, msg))| Envelope {
            // On FIFO networks each Byzantine message gets a link of its own
            // (a virtual sender id past the actors; authorship is the signature).
            src: Id::from(if cfg.fifo_honest_links {
                cfg.validators + k
            } else {
                src
            }),
            dst: Id::from(dst),
            msg,
        })
        .collect();
    let proposed: Proposed = envelopes
        .iter()
        .filter_map(|e| match &e.msg {
            Message::Proposal(p) => Some(p.message.value),
            Message::Vote(_) => None,
        })
        .collect();
    let nodes: Vec<Node> = (0..cfg.validators)
        .map(|index| Node {
            index,
            cfg: cfg.clone(),
        })
        .collect();
    let network = if cfg.fifo_honest_links {
        Network::new_ordered(envelopes)
    } else {
        Network::new_unordered_duplicating(envelopes)
    };
    let mut m = Model {
        actors: ActorModel::new(cfg.clone(), proposed),
        cfg,
        prune_no_ops: false,
        r5_memo: Mutex::new(HashMap::new()),
    };
    let lossy = if m.explicit_drops() {
        LossyNetwork::Yes
    } else {
        LossyNetwork::No
    };
    m.actors = m
        .actors
        .actors(nodes)
        .init_network(network)
        .lossy_network(lossy)
        // At most one validator is down at a time; `Model` restarts it at once.
        .max_crashes(m.cfg.max_crashes.min(1))
        .record_msg_out(|_, history, envelope| match envelope.msg {
            Message::Proposal(p) if !history.contains(&p.message.value) => {
                let mut h = history.clone();
                h.insert(p.message.value);
                Some(h)
            }
            _ => None,
        });
    m
}
