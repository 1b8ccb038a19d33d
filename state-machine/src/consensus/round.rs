//! Tendermint's Algorithm 1 (Buchman, Kwon, Milosevic 2018) as a pure state
//! machine: [`Consensus::handle`] takes an [`Input`] and returns [`Output`]s.
//! Comments `// L22` cite the line of Algorithm 1 a rule transcribes; rule
//! ids (`CONS-*`) are defined in spec/consensus.md.
//!
//! The host must perform the outputs **in order**: a [`Output::Persist`] must be
//! durable before any later output is performed (CONS-CRASH-1).

use super::Mutant;
use super::evidence::{CommitCertificate, DuplicateVote};
use super::scheme::SignatureScheme;
use super::types::{Message, Proposal, Round, Signed, Step, TimeoutKind, ValueId, Vote, VoteType};
use super::validators::ValidatorSet;
use super::votes::{AddVote, VoteKeeper};
use crate::types::{Address, Height};
use std::collections::{BTreeMap, BTreeSet};

/// Timeouts and bounds (CONS-TIME-1). Timeouts grow linearly with the round.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    pub timeout_propose_ms: u64,
    pub timeout_propose_delta_ms: u64,
    pub timeout_prevote_ms: u64,
    pub timeout_prevote_delta_ms: u64,
    pub timeout_precommit_ms: u64,
    pub timeout_precommit_delta_ms: u64,
    /// CONS-BOUND-1: messages for rounds more than this far ahead are dropped.
    pub max_rounds_ahead: Round,
    /// A deliberate bug for the model checker's mutant tests; `Mutant::None` in nodes.
    #[cfg(feature = "mutants")]
    pub mutant: Mutant,
}

impl Default for Config {
    /// Seed defaults: 2 s block time, so a first round fits in about 2 s.
    fn default() -> Self {
        Config {
            timeout_propose_ms: 1_000,
            timeout_propose_delta_ms: 500,
            timeout_prevote_ms: 500,
            timeout_prevote_delta_ms: 500,
            timeout_precommit_ms: 500,
            timeout_precommit_delta_ms: 500,
            max_rounds_ahead: 64,
            #[cfg(feature = "mutants")]
            mutant: Mutant::None,
        }
    }
}

impl Config {
    fn mutant(&self) -> Mutant {
        #[cfg(feature = "mutants")]
        return self.mutant;
        #[cfg(not(feature = "mutants"))]
        Mutant::None
    }

    /// CONS-TIME-1: `base + round × delta`, saturating.
    pub fn timeout_ms(&self, kind: TimeoutKind, round: Round) -> u64 {
        let (base, delta) = match kind {
            TimeoutKind::Propose => (self.timeout_propose_ms, self.timeout_propose_delta_ms),
            TimeoutKind::Prevote => (self.timeout_prevote_ms, self.timeout_prevote_delta_ms),
            TimeoutKind::Precommit => (self.timeout_precommit_ms, self.timeout_precommit_delta_ms),
        };
        base.saturating_add(delta.saturating_mul(u64::from(round)))
    }
}

/// What the host feeds the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input<Sig> {
    /// L18 `getValue()` answered: the value to propose at `(height, round)`.
    ProposeValue {
        height: Height,
        round: Round,
        value: ValueId,
    },
    /// A proposal from the network, with the host's verdict on `valid(v)` (the
    /// host holds the block; the core holds only its id).
    Proposal {
        proposal: Signed<Proposal, Sig>,
        valid: bool,
    },
    Vote(Signed<Vote, Sig>),
    /// A timeout scheduled by [`Output::ScheduleTimeout`] fired.
    Timeout {
        kind: TimeoutKind,
        height: Height,
        round: Round,
    },
}

/// What the state machine asks of the host, to be performed in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output<Sig> {
    /// CONS-CRASH-1: write durably before performing any later output.
    Persist(Record<Sig>),
    Broadcast(Message<Sig>),
    ScheduleTimeout {
        kind: TimeoutKind,
        height: Height,
        round: Round,
        duration_ms: u64,
    },
    /// L18: answer with [`Input::ProposeValue`].
    RequestValue {
        height: Height,
        round: Round,
    },
    /// L49: `value` is decided at `height`; start the next height with
    /// [`Consensus::start_height`].
    Decide {
        height: Height,
        round: Round,
        value: ValueId,
        certificate: CommitCertificate<Sig>,
    },
    /// CONS-EV-1: equivocation seen; include it in a block (SLASH-1).
    Evidence(DuplicateVote<Sig>),
}

/// CONS-CRASH-1: what a validator must not forget across a crash.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Record<Sig> {
    /// A vote this validator signed.
    Vote(Signed<Vote, Sig>),
    /// A proposal this validator signed.
    Proposal(Signed<Proposal, Sig>),
    /// The lock and valid value after L36 changed them.
    Lock {
        height: Height,
        locked: Option<(ValueId, Round)>,
        valid: Option<(ValueId, Round)>,
    },
}

impl<Sig> Record<Sig> {
    pub fn height(&self) -> Height {
        match self {
            Record::Vote(v) => v.message.height,
            Record::Proposal(p) => p.message.height,
            Record::Lock { height, .. } => *height,
        }
    }
}

/// Why an input was not used. Inputs from the network are untrusted, so these
/// are ordinary outcomes, not bugs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("message for height {got}, current height {current}")]
    WrongHeight { current: Height, got: Height },
    #[error("round {got} is more than the allowed distance ahead of {current}")]
    TooFarAhead { current: Round, got: Round },
    #[error("{0} is not a validator at this height")]
    NotValidator(Address),
    #[error("bad signature")]
    BadSignature,
    #[error("proposal from {got}, who is not the proposer of its round")]
    WrongProposer { got: Address },
    #[error("an earlier proposal for the round was kept")]
    ConflictingProposal,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Once {
    L34PrevoteTimeout,
    L36Polka,
    L47PrecommitTimeout,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StoredProposal<Sig> {
    proposal: Signed<Proposal, Sig>,
    valid: bool,
}

/// One validator's consensus state (the paper's process `p`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Consensus<S: SignatureScheme> {
    scheme: S,
    signer: S::Signer,
    address: Address,
    config: Config,
    validators: ValidatorSet,
    /// CONS-COMM-6/7: who proposes each round, with its own priorities; a
    /// subset of `validators`. `None`: the validators themselves.
    proposers: Option<ValidatorSet>,
    height: Height,
    round: Round,
    step: Step,
    /// The paper's `lockedValue`/`lockedRound`; `None` is `nil`/`-1`.
    locked: Option<(ValueId, Round)>,
    /// The paper's `validValue`/`validRound`.
    valid: Option<(ValueId, Round)>,
    decision: Option<ValueId>,
    /// The first proposal from each round's proposer (CONS-MSG-3).
    proposals: BTreeMap<Round, StoredProposal<S::Signature>>,
    votes: VoteKeeper<S::Signature>,
    /// Rules that fire once per round ("for the first time").
    fired: BTreeSet<(Round, Once)>,
    /// CONS-CRASH-2: everything this validator signed at this height (persisted).
    own_votes: BTreeMap<(Round, VoteType), Signed<Vote, S::Signature>>,
    own_proposals: BTreeMap<Round, Signed<Proposal, S::Signature>>,
}

/// Rules are re-evaluated until none fires; each firing changes the step,
/// round or a once-flag, so this bounds the loop with a wide margin.
const MAX_RULE_FIRINGS_PER_INPUT: usize = 64;

impl<S: SignatureScheme> Consensus<S> {
    /// A validator at `height` with `validators`, before round 0 starts: call
    /// [`Consensus::start`] next.
    pub fn new(
        scheme: S,
        signer: S::Signer,
        config: Config,
        height: Height,
        validators: ValidatorSet,
    ) -> Self {
        let address = scheme.address(&signer);
        Consensus {
            scheme,
            signer,
            address,
            config,
            validators,
            proposers: None,
            height,
            round: 0,
            step: Step::Propose,
            locked: None,
            valid: None,
            decision: None,
            proposals: BTreeMap::new(),
            votes: VoteKeeper::new(height),
            fired: BTreeSet::new(),
            own_votes: BTreeMap::new(),
            own_proposals: BTreeMap::new(),
        }
    }

    /// CONS-COMM-6/7: rounds are proposed by `proposers` (the epoch's
    /// committee, with its own priorities) instead of the whole set; votes
    /// still count over all of `validators` (CONS-COMM-1). Call before
    /// [`Consensus::start`].
    pub fn with_proposers(mut self, proposers: Option<ValidatorSet>) -> Self {
        assert!(
            self.proposals.is_empty() && self.own_votes.is_empty() && self.fired.is_empty(),
            "proposers are fixed before the height starts"
        );
        if let Some(p) = &proposers {
            assert!(
                p.validators().iter().all(|m| self
                    .validators
                    .get(&m.address)
                    .is_some_and(|v| v.public_key == m.public_key)),
                "proposers are members of the validator set"
            );
        }
        self.proposers = proposers;
        self
    }

    /// CONS-PROP-3 / CONS-COMM-6: the proposer of `round` at this height.
    pub fn proposer(&self, round: Round) -> Address {
        self.proposers
            .as_ref()
            .unwrap_or(&self.validators)
            .proposer(round)
    }

    /// CONS-CRASH-2: a validator restarted from its persisted `records` at
    /// `height`. It re-enters the highest round it signed anything in, with its
    /// lock, and will only ever repeat (never contradict) what it signed.
    pub fn restore(
        scheme: S,
        signer: S::Signer,
        config: Config,
        height: Height,
        validators: ValidatorSet,
        records: &[Record<S::Signature>],
    ) -> (Self, Vec<Output<S::Signature>>) {
        Self::restore_with_proposers(scheme, signer, config, height, validators, None, records)
    }

    /// [`Consensus::restore`] with the height's proposers
    /// ([`Consensus::with_proposers`]).
    pub fn restore_with_proposers(
        scheme: S,
        signer: S::Signer,
        config: Config,
        height: Height,
        validators: ValidatorSet,
        proposers: Option<ValidatorSet>,
        records: &[Record<S::Signature>],
    ) -> (Self, Vec<Output<S::Signature>>) {
        let mut c =
            Consensus::new(scheme, signer, config, height, validators).with_proposers(proposers);
        let forget = c.config.mutant() == Mutant::ForgetVotes;
        let mut round = 0;
        for record in records.iter().filter(|r| r.height() == height) {
            if forget {
                break; // Mutant: the persisted records are lost.
            }
            match record {
                Record::Vote(v) => {
                    assert_eq!(v.message.validator, c.address, "own records only");
                    round = round.max(v.message.round);
                    c.own_votes
                        .insert((v.message.round, v.message.vote_type), v.clone());
                }
                Record::Proposal(p) => {
                    round = round.max(p.message.round);
                    c.own_proposals.insert(p.message.round, p.clone());
                }
                Record::Lock { locked, valid, .. } => {
                    c.locked = *locked;
                    c.valid = *valid;
                }
            }
        }
        let mut out = Vec::new();
        c.start_round(round, &mut out);
        // Our own votes count in our tally as they did before the crash.
        let own: Vec<_> = c.own_votes.values().cloned().collect();
        for v in own {
            c.add_vote(v, &mut out);
        }
        if let Some(v) = c.own_votes.get(&(round, VoteType::Prevote)).cloned() {
            c.step = c.step.max(Step::Prevote);
            out.push(Output::Broadcast(Message::Vote(v)));
        }
        if let Some(v) = c.own_votes.get(&(round, VoteType::Precommit)).cloned() {
            c.step = c.step.max(Step::Precommit);
            out.push(Output::Broadcast(Message::Vote(v)));
        }
        c.run_rules(&mut out);
        (c, out)
    }

    /// Whether `self` and `other` differ at most in the proposals and votes
    /// they have received: the same control state (height, round, step,
    /// lock, valid value, decision, fired rules) and the same signed
    /// messages. The model checker's reduction R5 (CONS-MC-1) uses it to
    /// tell a delivery that only records a message from one that acts.
    pub fn same_except_received(&self, other: &Self) -> bool {
        // Destructured so that a new field must be sorted into one side.
        let Consensus {
            scheme: _,
            signer: _,
            address,
            config,
            validators,
            proposers,
            height,
            round,
            step,
            locked,
            valid,
            decision,
            proposals: _,
            votes: _,
            fired,
            own_votes,
            own_proposals,
        } = self;
        *address == other.address
            && *config == other.config
            && *validators == other.validators
            && *proposers == other.proposers
            && *height == other.height
            && *round == other.round
            && *step == other.step
            && *locked == other.locked
            && *valid == other.valid
            && *decision == other.decision
            && *fired == other.fired
            && *own_votes == other.own_votes
            && *own_proposals == other.own_proposals
    }

    /// This validator with every received proposal and vote forgotten: what
    /// [`Consensus::same_except_received`] compares, as a value (the model
    /// checker's projection for validating reduction R5).
    pub fn without_received(&self) -> Self {
        let mut c = self.clone();
        c.proposals.clear();
        c.votes = VoteKeeper::new(self.height);
        c
    }

    pub fn height(&self) -> Height {
        self.height
    }
    pub fn round(&self) -> Round {
        self.round
    }
    pub fn step(&self) -> Step {
        self.step
    }
    pub fn locked(&self) -> Option<(ValueId, Round)> {
        self.locked
    }
    pub fn valid(&self) -> Option<(ValueId, Round)> {
        self.valid
    }
    pub fn decision(&self) -> Option<ValueId> {
        self.decision
    }
    pub fn address(&self) -> Address {
        self.address
    }
    pub fn validators(&self) -> &ValidatorSet {
        &self.validators
    }

    /// CONS-GOSSIP-1: what this validator signed in `round` (its proposal,
    /// then its prevote and precommit), for the host to send again: the
    /// algorithm assumes every message between correct processes is
    /// eventually delivered, which over a lossy network needs retransmission.
    pub fn own_messages(&self, round: Round) -> Vec<Message<S::Signature>> {
        let mut out = Vec::new();
        if let Some(p) = self.own_proposals.get(&round) {
            out.push(Message::Proposal(p.clone()));
        }
        for t in [VoteType::Prevote, VoteType::Precommit] {
            if let Some(v) = self.own_votes.get(&(round, t)) {
                out.push(Message::Vote(v.clone()));
            }
        }
        out
    }

    /// CONS-GOSSIP-2: the prevotes for `value` in `round` this validator
    /// holds (its own and others'): the polka that justifies a proposal with
    /// that valid round (L28), relayed so that a validator which missed them
    /// can accept the proposal (CometBFT gossips a proposal's POL votes).
    pub fn polka(&self, round: Round, value: ValueId) -> Vec<Message<S::Signature>> {
        self.votes
            .round(round)
            .map(|r| r.tally(VoteType::Prevote).votes_for(&Some(value)))
            .unwrap_or_default()
            .into_iter()
            .map(Message::Vote)
            .collect()
    }

    /// CONS-GOSSIP-3: the votes of `vote_type` in `round` this validator
    /// holds (its own and others'), for a peer that lacks them.
    pub fn votes_of(&self, round: Round, vote_type: VoteType) -> Vec<Signed<Vote, S::Signature>> {
        self.votes
            .round(round)
            .map(|r| r.tally(vote_type).all().cloned().collect())
            .unwrap_or_default()
    }

    /// CONS-GOSSIP-3: whether `validator`'s vote of `vote_type` in `round`
    /// is held.
    pub fn has_vote(&self, round: Round, vote_type: VoteType, validator: &Address) -> bool {
        self.votes
            .round(round)
            .is_some_and(|r| r.tally(vote_type).has_vote_of(validator))
    }

    /// CONS-GOSSIP-3: the round's proposal from its proposer, if held.
    pub fn proposal(&self, round: Round) -> Option<&Signed<Proposal, S::Signature>> {
        self.proposals.get(&round).map(|p| &p.proposal)
    }

    /// L10: start round 0 of the current height.
    pub fn start(&mut self) -> Vec<Output<S::Signature>> {
        assert_eq!(self.round, 0);
        assert!(self.own_votes.is_empty(), "start is called once per height");
        let mut out = Vec::new();
        self.start_round(0, &mut out);
        self.run_rules(&mut out);
        out
    }

    /// L54: after a decision, move to `height` (the next one) with its validator set.
    pub fn start_height(
        &mut self,
        height: Height,
        validators: ValidatorSet,
    ) -> Vec<Output<S::Signature>> {
        assert_eq!(self.step, Step::Decided, "decide before moving on");
        assert_eq!(height, self.height + 1, "heights advance one at a time");
        *self = Consensus::new(
            self.scheme.clone(),
            self.signer.clone(),
            self.config.clone(),
            height,
            validators,
        );
        self.start()
    }

    /// Feeds one input; returns the outputs to perform in order, or why the input was dropped.
    pub fn handle(
        &mut self,
        input: Input<S::Signature>,
    ) -> Result<Vec<Output<S::Signature>>, Rejected> {
        let mut out = Vec::new();
        if self.step == Step::Decided {
            return Ok(out); // L49: nothing changes a decided height.
        }
        match input {
            Input::ProposeValue {
                height,
                round,
                value,
            } => {
                if height == self.height && round == self.round && self.step == Step::Propose {
                    self.propose(value, None, &mut out); // L19
                }
            }
            Input::Proposal { proposal, valid } => {
                self.check_message(proposal.message.height, proposal.message.round)?;
                self.receive_proposal(proposal, valid)?;
            }
            Input::Vote(vote) => {
                self.check_message(vote.message.height, vote.message.round)?;
                self.receive_vote(vote, &mut out)?;
            }
            Input::Timeout {
                kind,
                height,
                round,
            } => self.on_timeout(kind, height, round, &mut out),
        }
        self.run_rules(&mut out);
        Ok(out)
    }

    fn check_message(&self, height: Height, round: Round) -> Result<(), Rejected> {
        if height != self.height {
            return Err(Rejected::WrongHeight {
                current: self.height,
                got: height,
            });
        }
        if round > self.round.saturating_add(self.config.max_rounds_ahead) {
            return Err(Rejected::TooFarAhead {
                current: self.round,
                got: round,
            });
        }
        Ok(())
    }

    fn receive_proposal(
        &mut self,
        proposal: Signed<Proposal, S::Signature>,
        valid: bool,
    ) -> Result<(), Rejected> {
        let p = &proposal.message;
        let member = self
            .validators
            .get(&p.proposer)
            .ok_or(Rejected::NotValidator(p.proposer))?;
        if !self
            .scheme
            .verify_proposal(&member.public_key, p, &proposal.signature)
        {
            return Err(Rejected::BadSignature);
        }
        if self.proposer(p.round) != p.proposer {
            return Err(Rejected::WrongProposer { got: p.proposer });
        }
        if p.valid_round.is_some_and(|vr| vr >= p.round) {
            return Ok(()); // L28 needs vr < r; such a proposal can never be used.
        }
        if let Some(kept) = self.proposals.get(&p.round) {
            if kept.proposal.message == *p {
                return Ok(());
            }
            return Err(Rejected::ConflictingProposal);
        }
        self.votes
            .note_sender(&self.validators, p.round, p.proposer);
        self.proposals
            .insert(p.round, StoredProposal { proposal, valid });
        Ok(())
    }

    fn receive_vote(
        &mut self,
        vote: Signed<Vote, S::Signature>,
        out: &mut Vec<Output<S::Signature>>,
    ) -> Result<(), Rejected> {
        let v = &vote.message;
        let member = self
            .validators
            .get(&v.validator)
            .ok_or(Rejected::NotValidator(v.validator))?;
        if !self
            .scheme
            .verify_vote(&member.public_key, v, &vote.signature)
        {
            return Err(Rejected::BadSignature);
        }
        self.add_vote(vote, out);
        Ok(())
    }

    fn add_vote(&mut self, vote: Signed<Vote, S::Signature>, out: &mut Vec<Output<S::Signature>>) {
        // Consulted only for an equivocator's further vote (CONS-VOTE-4).
        let proposals = &self.proposals;
        let tracked = |v: &ValueId| proposals.values().any(|p| p.proposal.message.value == *v);
        if let AddVote::Equivocation(evidence) = self.votes.add(&self.validators, vote, tracked) {
            out.push(Output::Evidence(evidence)); // CONS-EV-1
        }
    }

    /// L11 StartRound(round).
    fn start_round(&mut self, round: Round, out: &mut Vec<Output<S::Signature>>) {
        assert!(round >= self.round, "rounds never go back");
        self.round = round; // L12
        self.step = Step::Propose; // L13
        if self.proposer(round) == self.address {
            // L14
            if let Some(p) = self.own_proposals.get(&round).cloned() {
                // CONS-CRASH-2: proposed before a crash; repeat it, and
                // deliver it to ourselves as L19 does (without this a
                // restarted proposer stayed in the propose step for ever:
                // found by blyan-sim seed 177).
                out.push(Output::Broadcast(Message::Proposal(p.clone())));
                let accepted = self.receive_proposal(p, true);
                assert!(accepted.is_ok(), "own proposal is acceptable");
            } else if let Some((value, valid_round)) = self.valid {
                self.propose(value, Some(valid_round), out); // L15-L16
            } else {
                out.push(Output::RequestValue {
                    height: self.height,
                    round,
                }); // L18
            }
        } else {
            self.schedule(TimeoutKind::Propose, out); // L21
        }
    }

    /// L19: broadcast ⟨PROPOSAL, h, round, proposal, validRound⟩ (persisted first).
    fn propose(
        &mut self,
        value: ValueId,
        valid_round: Option<Round>,
        out: &mut Vec<Output<S::Signature>>,
    ) {
        if self.own_proposals.contains_key(&self.round) {
            return; // CONS-CRASH-2: one proposal per round, ever.
        }
        let proposal = Proposal {
            height: self.height,
            round: self.round,
            value,
            valid_round,
            proposer: self.address,
        };
        let signature = self.scheme.sign_proposal(&self.signer, &proposal);
        let signed = Signed {
            message: proposal,
            signature,
        };
        self.own_proposals.insert(self.round, signed.clone());
        out.push(Output::Persist(Record::Proposal(signed.clone())));
        out.push(Output::Broadcast(Message::Proposal(signed.clone())));
        // Our own proposal is delivered to us as well; our value is valid.
        let accepted = self.receive_proposal(signed, true);
        assert!(accepted.is_ok(), "own proposal is acceptable");
    }

    /// Signs, persists and broadcasts a vote for the current round, and counts it.
    /// CONS-CRASH-2: if a vote of this round and type was signed before, that
    /// vote is repeated instead, so no two different votes are ever signed.
    fn cast(
        &mut self,
        vote_type: VoteType,
        value: Option<ValueId>,
        out: &mut Vec<Output<S::Signature>>,
    ) {
        let key = (self.round, vote_type);
        let signed = if let Some(previous) = self.own_votes.get(&key) {
            previous.clone()
        } else {
            let vote = Vote {
                vote_type,
                height: self.height,
                round: self.round,
                value,
                validator: self.address,
            };
            let signature = self.scheme.sign_vote(&self.signer, &vote);
            let signed = Signed {
                message: vote,
                signature,
            };
            self.own_votes.insert(key, signed.clone());
            out.push(Output::Persist(Record::Vote(signed.clone())));
            signed
        };
        out.push(Output::Broadcast(Message::Vote(signed.clone())));
        self.add_vote(signed, out);
    }

    fn schedule(&self, kind: TimeoutKind, out: &mut Vec<Output<S::Signature>>) {
        out.push(Output::ScheduleTimeout {
            kind,
            height: self.height,
            round: self.round,
            duration_ms: self.config.timeout_ms(kind, self.round),
        });
    }

    fn once(&mut self, round: Round, rule: Once) -> bool {
        self.fired.insert((round, rule))
    }

    fn quorum(&self, power: u64) -> bool {
        self.validators.is_quorum(power, self.config.mutant())
    }

    /// Evaluates the upon-rules until none fires.
    fn run_rules(&mut self, out: &mut Vec<Output<S::Signature>>) {
        for _ in 0..MAX_RULE_FIRINGS_PER_INPUT {
            if self.step == Step::Decided {
                return;
            }
            let fired = self.rule_decide(out)
                || self.rule_skip_round(out)
                || self.rule_prevote_proposal(out)
                || self.rule_prevote_any(out)
                || self.rule_polka(out)
                || self.rule_adopt_valid(out)
                || self.rule_polka_nil(out)
                || self.rule_precommit_any(out);
            if !fired {
                return;
            }
        }
        panic!("upon-rules did not settle after {MAX_RULE_FIRINGS_PER_INPUT} firings");
    }

    /// L49: upon ⟨PROPOSAL, h, r, v, ∗⟩ from proposer(h, r) AND 2f+1
    /// ⟨PRECOMMIT, h, r, id(v)⟩ while decision_p[h] = nil (CONS-DECIDE-1).
    fn rule_decide(&mut self, out: &mut Vec<Output<S::Signature>>) -> bool {
        let mut found = None;
        for (round, stored) in &self.proposals {
            let value = stored.proposal.message.value;
            let Some(rv) = self.votes.round(*round) else {
                continue;
            };
            if stored.valid && self.quorum(rv.precommits.power_for(&Some(value))) {
                // L50
                let signatures = rv
                    .precommits
                    .votes_for(&Some(value))
                    .into_iter()
                    .map(|v| (v.message.validator, v.signature))
                    .collect();
                found = Some(CommitCertificate {
                    height: self.height,
                    round: *round,
                    value,
                    signatures,
                });
                break;
            }
        }
        let Some(certificate) = found else {
            return false;
        };
        assert!(self.decision.is_none(), "decide once per height");
        self.decision = Some(certificate.value); // L51
        self.step = Step::Decided;
        out.push(Output::Decide {
            height: self.height,
            round: certificate.round,
            value: certificate.value,
            certificate,
        });
        true
    }

    /// L55: upon f+1 ⟨∗, h, round, ∗, ∗⟩ with round > round_p: StartRound(round) (CONS-SKIP-1).
    fn rule_skip_round(&mut self, out: &mut Vec<Output<S::Signature>>) -> bool {
        let target = self
            .votes
            .rounds()
            .filter(|(r, rv)| **r > self.round && self.validators.is_one_third(rv.sender_power()))
            .map(|(r, _)| *r)
            .last();
        match target {
            Some(round) => {
                self.start_round(round, out);
                true
            }
            None => false,
        }
    }

    /// L22 and L28: prevote for the round's proposal (CONS-PREVOTE-1, CONS-PREVOTE-2).
    fn rule_prevote_proposal(&mut self, out: &mut Vec<Output<S::Signature>>) -> bool {
        if self.step != Step::Propose {
            return false;
        }
        let Some(stored) = self.proposals.get(&self.round) else {
            return false;
        };
        let (v, valid) = (stored.proposal.message.value, stored.valid);
        let ignore_lock = self.config.mutant() == Mutant::IgnoreLock;
        let choice = match stored.proposal.message.valid_round {
            // L22: ⟨PROPOSAL, h, round_p, v, −1⟩ while step = propose.
            None => {
                // L23
                let unlocked = self.locked.is_none_or(|(lv, _)| lv == v);
                if valid && (unlocked || ignore_lock) {
                    Some(v)
                } else {
                    None
                }
            }
            // L28: ... AND 2f+1 ⟨PREVOTE, h, vr, id(v)⟩ while step = propose ∧ 0 ≤ vr < round_p.
            Some(vr) => {
                assert!(vr < self.round, "checked on receipt");
                let polka = self
                    .votes
                    .round(vr)
                    .is_some_and(|rv| self.quorum(rv.prevotes.power_for(&Some(v))));
                if !polka {
                    return false;
                }
                // L29
                let unlocked = self.locked.is_none_or(|(lv, lr)| lr <= vr || lv == v);
                if valid && (unlocked || ignore_lock) {
                    Some(v)
                } else {
                    None
                }
            }
        };
        self.cast(VoteType::Prevote, choice, out); // L24/L26, L30/L32
        self.step = Step::Prevote; // L27, L33
        true
    }

    /// L34: upon 2f+1 ⟨PREVOTE, h, round_p, ∗⟩ while step = prevote for the first time.
    fn rule_prevote_any(&mut self, out: &mut Vec<Output<S::Signature>>) -> bool {
        if self.step != Step::Prevote {
            return false;
        }
        let any = self
            .votes
            .round(self.round)
            .map_or(0, |rv| rv.prevotes.power_any());
        if !self.quorum(any) || !self.once(self.round, Once::L34PrevoteTimeout) {
            return false;
        }
        self.schedule(TimeoutKind::Prevote, out); // L35
        true
    }

    /// L36: upon ⟨PROPOSAL, h, round_p, v, ∗⟩ AND 2f+1 ⟨PREVOTE, h, round_p, id(v)⟩
    /// while valid(v) ∧ step ≥ prevote for the first time (CONS-LOCK-1).
    fn rule_polka(&mut self, out: &mut Vec<Output<S::Signature>>) -> bool {
        if self.step < Step::Prevote {
            return false;
        }
        let Some(stored) = self.proposals.get(&self.round) else {
            return false;
        };
        let v = stored.proposal.message.value;
        let polka = self
            .votes
            .round(self.round)
            .is_some_and(|rv| self.quorum(rv.prevotes.power_for(&Some(v))));
        if !stored.valid || !polka || !self.once(self.round, Once::L36Polka) {
            return false;
        }
        let precommit = self.step == Step::Prevote;
        if precommit {
            self.locked = Some((v, self.round)); // L38-L39
        }
        self.valid = Some((v, self.round)); // L42-L43
        // CONS-CRASH-1: the lock is durable before the precommit that depends on it.
        out.push(Output::Persist(Record::Lock {
            height: self.height,
            locked: self.locked,
            valid: self.valid,
        }));
        if precommit {
            self.cast(VoteType::Precommit, Some(v), out); // L40
            self.step = Step::Precommit; // L41
        }
        true
    }

    /// CONS-LOCK-3: upon ⟨PROPOSAL, h, r', v, ∗⟩ AND 2f+1 ⟨PREVOTE, h, r',
    /// id(v)⟩ for an earlier round `r' < round_p` with `r' > validRound`
    /// while valid(v): `validValue = v, validRound = r'` (the lock is
    /// untouched). The paper updates the valid value only in the polka's own
    /// round (L36), and its liveness proof then needs every validator,
    /// locked ones included, to propose in turn; with proposers restricted
    /// to the epoch's committee (CONS-COMM-6) an honest validator locked
    /// outside it could never re-propose its value, and the committee's
    /// honest members, unaware of the polka, could never get it accepted.
    /// Adopting a polka learned later lets a committee member propose the
    /// highest valid value with its round, which every locked validator
    /// accepts (L28). Safety is untouched: it never depends on what a
    /// proposer proposes, only on locks and quorums (a Byzantine proposer
    /// may already propose any value with any valid round).
    fn rule_adopt_valid(&mut self, out: &mut Vec<Output<S::Signature>>) -> bool {
        let floor = self.valid.map(|(_, r)| r);
        let found = self
            .proposals
            .range(..self.round)
            .rev()
            .take_while(|(r, _)| floor.is_none_or(|f| **r > f))
            .find(|(r, stored)| {
                let v = stored.proposal.message.value;
                stored.valid
                    && self
                        .votes
                        .round(**r)
                        .is_some_and(|rv| self.quorum(rv.prevotes.power_for(&Some(v))))
            })
            .map(|(r, stored)| (stored.proposal.message.value, *r));
        let Some(valid) = found else {
            return false;
        };
        self.valid = Some(valid);
        out.push(Output::Persist(Record::Lock {
            height: self.height,
            locked: self.locked,
            valid: self.valid,
        }));
        true
    }

    /// L44: upon 2f+1 ⟨PREVOTE, h, round_p, nil⟩ while step = prevote.
    fn rule_polka_nil(&mut self, out: &mut Vec<Output<S::Signature>>) -> bool {
        if self.step != Step::Prevote {
            return false;
        }
        let nil = self
            .votes
            .round(self.round)
            .map_or(0, |rv| rv.prevotes.power_for(&None));
        if !self.quorum(nil) {
            return false;
        }
        self.cast(VoteType::Precommit, None, out); // L45
        self.step = Step::Precommit; // L46
        true
    }

    /// L47: upon 2f+1 ⟨PRECOMMIT, h, round_p, ∗⟩ for the first time.
    fn rule_precommit_any(&mut self, out: &mut Vec<Output<S::Signature>>) -> bool {
        let any = self
            .votes
            .round(self.round)
            .map_or(0, |rv| rv.precommits.power_any());
        if !self.quorum(any) || !self.once(self.round, Once::L47PrecommitTimeout) {
            return false;
        }
        self.schedule(TimeoutKind::Precommit, out); // L48
        true
    }

    /// L57, L61, L65: timeouts act only in the height, round and step that scheduled them.
    fn on_timeout(
        &mut self,
        kind: TimeoutKind,
        height: Height,
        round: Round,
        out: &mut Vec<Output<S::Signature>>,
    ) {
        if height != self.height || round != self.round {
            return;
        }
        match kind {
            TimeoutKind::Propose if self.step == Step::Propose => {
                self.cast(VoteType::Prevote, None, out); // L59
                self.step = Step::Prevote; // L60
            }
            TimeoutKind::Prevote if self.step == Step::Prevote => {
                self.cast(VoteType::Precommit, None, out); // L63
                self.step = Step::Precommit; // L64
            }
            TimeoutKind::Precommit => {
                let next = self.round.checked_add(1).expect("rounds fit in u32");
                self.start_round(next, out); // L67
            }
            _ => {}
        }
    }
}
