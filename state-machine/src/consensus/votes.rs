//! The vote keeper: votes of one height tallied by round, type and value,
//! with equivocation detection (CONS-VOTE-*, CONS-EV-*).

use super::evidence::DuplicateVote;
use super::types::{Round, Signed, ValueId, Vote, VoteType};
use super::validators::ValidatorSet;
use crate::types::{Address, Height};
use std::collections::{BTreeMap, BTreeSet};

/// Votes of one type in one round.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tally<Sig> {
    /// The first vote of each validator (CONS-VOTE-1).
    votes: BTreeMap<Address, Signed<Vote, Sig>>,
    /// CONS-VOTE-4: an equivocator's further votes that are counted for their
    /// value (only values of proposals this validator holds).
    conflicting: BTreeMap<(Address, Option<ValueId>), Signed<Vote, Sig>>,
    power_by_value: BTreeMap<Option<ValueId>, u64>,
    power_total: u64,
}

impl<Sig> Default for Tally<Sig> {
    fn default() -> Self {
        Tally {
            votes: BTreeMap::new(),
            conflicting: BTreeMap::new(),
            power_by_value: BTreeMap::new(),
            power_total: 0,
        }
    }
}

impl<Sig: Clone> Tally<Sig> {
    /// Power of the votes for `value` (`None`: nil).
    pub fn power_for(&self, value: &Option<ValueId>) -> u64 {
        self.power_by_value.get(value).copied().unwrap_or(0)
    }
    /// Power of all votes, whatever their value (the paper's `∗`).
    pub fn power_any(&self) -> u64 {
        self.power_total
    }
    /// The votes for `value`, in ascending validator order.
    pub fn votes_for(&self, value: &Option<ValueId>) -> Vec<Signed<Vote, Sig>> {
        let mut votes: Vec<_> = self
            .votes
            .values()
            .chain(self.conflicting.values())
            .filter(|v| v.message.value == *value)
            .cloned()
            .collect();
        // One per validator (a conflicting vote never repeats a first vote's
        // value), in ascending validator order as certificates need.
        votes.sort_by_key(|v| v.message.validator);
        votes
    }
    /// Every counted vote (first votes and counted conflicting ones).
    pub fn all(&self) -> impl Iterator<Item = &Signed<Vote, Sig>> {
        self.votes.values().chain(self.conflicting.values())
    }
    /// Whether `validator`'s first vote is here.
    pub fn has_vote_of(&self, validator: &Address) -> bool {
        self.votes.contains_key(validator)
    }
    /// Values (not nil) that have any vote.
    pub fn values(&self) -> impl Iterator<Item = &ValueId> {
        self.power_by_value.keys().flatten()
    }
}

/// Everything seen in one round.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoundVotes<Sig> {
    pub prevotes: Tally<Sig>,
    pub precommits: Tally<Sig>,
    /// CONS-SKIP-1: validators that sent any message in this round, and their power.
    senders: BTreeSet<Address>,
    sender_power: u64,
}

impl<Sig> Default for RoundVotes<Sig> {
    fn default() -> Self {
        RoundVotes {
            prevotes: Tally::default(),
            precommits: Tally::default(),
            senders: BTreeSet::new(),
            sender_power: 0,
        }
    }
}

impl<Sig> RoundVotes<Sig> {
    pub fn tally(&self, vote_type: VoteType) -> &Tally<Sig> {
        match vote_type {
            VoteType::Prevote => &self.prevotes,
            VoteType::Precommit => &self.precommits,
        }
    }
    pub fn sender_power(&self) -> u64 {
        self.sender_power
    }
}

/// What adding a vote did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddVote<Sig> {
    Added,
    /// The same vote again: nothing changed.
    Duplicate,
    /// CONS-EV-1: a second, different vote for the same height, round and type.
    Equivocation(DuplicateVote<Sig>),
}

/// CONS-VOTE-1: the votes of one height.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VoteKeeper<Sig> {
    height: Height,
    rounds: BTreeMap<Round, RoundVotes<Sig>>,
}

impl<Sig: Clone + Eq> VoteKeeper<Sig> {
    pub fn new(height: Height) -> Self {
        VoteKeeper {
            height,
            rounds: BTreeMap::new(),
        }
    }

    pub fn round(&self, round: Round) -> Option<&RoundVotes<Sig>> {
        self.rounds.get(&round)
    }

    /// Rounds with any message, ascending.
    pub fn rounds(&self) -> impl Iterator<Item = (&Round, &RoundVotes<Sig>)> {
        self.rounds.iter()
    }

    /// Records that `sender` sent a message in `round` (proposals count for CONS-SKIP-1).
    pub fn note_sender(&mut self, set: &ValidatorSet, round: Round, sender: Address) {
        let entry = self.rounds.entry(round).or_default();
        if entry.senders.insert(sender) {
            entry.sender_power += set.power_of(&sender);
            assert!(entry.sender_power <= set.total_power());
        }
    }

    /// Adds a vote whose signature and membership the caller has checked.
    ///
    /// CONS-VOTE-4: Algorithm 1 counts *messages* `⟨PREVOTE, h, r, id(v)⟩`
    /// from distinct senders per value, so an equivocator's vote for `v`
    /// counts towards `v` even if it also voted `w`. Counting only the first
    /// vote would let one equivocator hide a polka from some correct
    /// validators for ever (a liveness failure the simulator found). To bound
    /// memory, a further vote is counted only if `tracked` accepts its value
    /// (the value of a proposal this validator holds, at most one per
    /// round); the "any value" power counts each validator once.
    pub fn add(
        &mut self,
        set: &ValidatorSet,
        vote: Signed<Vote, Sig>,
        tracked: impl Fn(&ValueId) -> bool,
    ) -> AddVote<Sig> {
        assert_eq!(vote.message.height, self.height, "caller filters heights");
        let power = set.power_of(&vote.message.validator);
        assert!(power > 0, "caller checked membership");
        let round = vote.message.round;
        let validator = vote.message.validator;
        let entry = self.rounds.entry(round).or_default();
        let tally = match vote.message.vote_type {
            VoteType::Prevote => &mut entry.prevotes,
            VoteType::Precommit => &mut entry.precommits,
        };
        if let Some(first) = tally.votes.get(&validator) {
            if first.message == vote.message {
                return AddVote::Duplicate;
            }
            // CONS-EV-1: report both.
            let evidence = DuplicateVote::new(first.clone(), vote.clone());
            let key = (validator, vote.message.value);
            let counts = vote.message.value.is_some_and(|v| tracked(&v));
            if counts && !tally.conflicting.contains_key(&key) {
                *tally.power_by_value.entry(vote.message.value).or_insert(0) += power;
                tally.conflicting.insert(key, vote);
            }
            return AddVote::Equivocation(evidence);
        }
        *tally.power_by_value.entry(vote.message.value).or_insert(0) += power;
        tally.power_total += power;
        assert!(tally.power_total <= set.total_power());
        tally.votes.insert(validator, vote);
        self.note_sender(set, round, validator);
        AddVote::Added
    }
}
