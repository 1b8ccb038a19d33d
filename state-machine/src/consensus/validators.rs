//! Validator sets, voting thresholds and CometBFT proposer selection (CONS-VAL-*, CONS-PROP-*).

use crate::tx::PublicKey;
use crate::types::Address;

/// CONS-VAL-1: CometBFT's bound on the total voting power (`MaxTotalVotingPower`),
/// so that priorities (which stay within a few multiples of it) never overflow i64.
pub const MAX_TOTAL_VOTING_POWER: u64 = (i64::MAX / 8) as u64;

/// Most validators in a set (bounds every per-validator collection).
pub const MAX_VALIDATORS: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Validator {
    pub address: Address,
    pub public_key: PublicKey,
    pub voting_power: u64,
    /// CONS-PROP-1: the proposer priority before this height's first increment.
    pub proposer_priority: i64,
}

/// Why a validator set was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidatorSetError {
    #[error("the validator set is empty")]
    Empty,
    #[error("more than {MAX_VALIDATORS} validators")]
    TooMany,
    #[error("validator {0} has zero voting power")]
    ZeroPower(Address),
    #[error("validators are not in strictly ascending address order")]
    NotSorted,
    #[error("total voting power exceeds {MAX_TOTAL_VOTING_POWER}")]
    TooMuchPower,
}

/// CONS-VAL-1: the validators of one height, in ascending address order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ValidatorSet {
    validators: Vec<Validator>,
    total_power: u64,
}

impl ValidatorSet {
    /// A fresh set (all priorities 0) from `(address, public key, power)` in
    /// ascending address order. Rejects empty sets, zero powers, unsorted or
    /// duplicate addresses and a total above [`MAX_TOTAL_VOTING_POWER`].
    pub fn new(members: Vec<(Address, PublicKey, u64)>) -> Result<ValidatorSet, ValidatorSetError> {
        if members.is_empty() {
            return Err(ValidatorSetError::Empty);
        }
        if members.len() > MAX_VALIDATORS {
            return Err(ValidatorSetError::TooMany);
        }
        if !members.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(ValidatorSetError::NotSorted);
        }
        let mut total_power: u64 = 0;
        for (address, _, power) in &members {
            if *power == 0 {
                return Err(ValidatorSetError::ZeroPower(*address));
            }
            total_power = total_power
                .checked_add(*power)
                .filter(|t| *t <= MAX_TOTAL_VOTING_POWER)
                .ok_or(ValidatorSetError::TooMuchPower)?;
        }
        let validators = members
            .into_iter()
            .map(|(address, public_key, voting_power)| Validator {
                address,
                public_key,
                voting_power,
                proposer_priority: 0,
            })
            .collect();
        Ok(ValidatorSet {
            validators,
            total_power,
        })
    }

    /// A set with the given proposer priorities: `(address, public key,
    /// power, priority)` in ascending address order, checked as
    /// [`ValidatorSet::new`] checks (a persisted set read back).
    pub fn with_priorities(
        members: Vec<(Address, PublicKey, u64, i64)>,
    ) -> Result<ValidatorSet, ValidatorSetError> {
        let priorities: Vec<i64> = members.iter().map(|m| m.3).collect();
        let mut set =
            ValidatorSet::new(members.into_iter().map(|(a, k, p, _)| (a, k, p)).collect())?;
        for (v, p) in set.validators.iter_mut().zip(priorities) {
            v.proposer_priority = p;
        }
        Ok(set)
    }

    pub fn validators(&self) -> &[Validator] {
        &self.validators
    }
    pub fn len(&self) -> usize {
        self.validators.len()
    }
    pub fn is_empty(&self) -> bool {
        self.validators.is_empty()
    }
    pub fn total_power(&self) -> u64 {
        self.total_power
    }
    pub fn get(&self, address: &Address) -> Option<&Validator> {
        self.index_of(address).map(|i| &self.validators[i])
    }
    pub fn index_of(&self, address: &Address) -> Option<usize> {
        self.validators
            .binary_search_by(|v| v.address.cmp(address))
            .ok()
    }
    pub fn power_of(&self, address: &Address) -> u64 {
        self.get(address).map_or(0, |v| v.voting_power)
    }

    /// CONS-VOTE-2: more than two thirds of the total voting power (the paper's `2f + 1`).
    pub fn is_quorum(&self, power: u64, mutant: super::Mutant) -> bool {
        assert!(power <= self.total_power, "tallied power within the set");
        if mutant == super::Mutant::HalfQuorum {
            // Mutant: "half the voting power" (2 of 4) instead of more than 2/3.
            return u128::from(power) * 2 >= u128::from(self.total_power);
        }
        u128::from(power) * 3 > u128::from(self.total_power) * 2
    }

    /// CONS-VOTE-3: more than one third of the total voting power (the paper's `f + 1`).
    pub fn is_one_third(&self, power: u64) -> bool {
        assert!(power <= self.total_power, "tallied power within the set");
        u128::from(power) * 3 > u128::from(self.total_power)
    }

    /// CONS-PROP-2: one application of CometBFT's `IncrementProposerPriority`
    /// step; returns the index of the chosen proposer.
    pub fn increment_proposer_priority(&mut self) -> usize {
        assert!(!self.validators.is_empty(), "sets are never empty");
        let total = i64::try_from(self.total_power).expect("bounded by MAX_TOTAL_VOTING_POWER");
        // (1) Rescale when the spread exceeds 2·P.
        let max = self.validators.iter().map(|v| v.proposer_priority).max();
        let min = self.validators.iter().map(|v| v.proposer_priority).min();
        let (Some(max), Some(min)) = (max, min) else {
            unreachable!("non-empty")
        };
        let diff = i128::from(max) - i128::from(min);
        let limit = 2 * i128::from(total);
        if diff > limit {
            let ratio = (diff + limit - 1) / limit; // ceil(diff / 2P)
            for v in &mut self.validators {
                // Go's integer division truncates toward zero.
                v.proposer_priority = (i128::from(v.proposer_priority) / ratio) as i64;
            }
        }
        // (2) Centre: subtract the floor of the average.
        let sum: i128 = self
            .validators
            .iter()
            .map(|v| i128::from(v.proposer_priority))
            .sum();
        let avg = sum.div_euclid(self.validators.len() as i128);
        for v in &mut self.validators {
            v.proposer_priority = i64::try_from(i128::from(v.proposer_priority) - avg)
                .expect("centred priorities are within ±2P after rescaling");
        }
        // (3) Add each validator's power.
        for v in &mut self.validators {
            v.proposer_priority += i64::try_from(v.voting_power).expect("bounded power");
        }
        // (4) The highest priority proposes; ties go to the lower address (index).
        let mut chosen = 0;
        for (i, v) in self.validators.iter().enumerate() {
            if v.proposer_priority > self.validators[chosen].proposer_priority {
                chosen = i;
            }
        }
        // (5) The proposer pays the total power.
        self.validators[chosen].proposer_priority -= total;
        chosen
    }

    /// CONS-PROP-3: the proposer of round `round` of this set's height: the
    /// validator chosen by the `(round + 1)`-th increment from this set's priorities.
    pub fn proposer(&self, round: super::Round) -> Address {
        let mut copy = self.clone();
        let mut chosen = 0;
        for _ in 0..=round {
            chosen = copy.increment_proposer_priority();
        }
        copy.validators[chosen].address
    }

    /// CONS-PROP-5: priorities across a change of members (as CometBFT's
    /// `updateWithChangeSet`): a member that stays keeps its priority from
    /// `previous`; a new member starts at `-(P + P/8)` (`P` = this set's total
    /// power), so it does not propose at once. The next increment rescales and
    /// re-centres them (CONS-PROP-2 steps 1 and 2).
    pub fn carry_priorities_from(mut self, previous: &ValidatorSet) -> ValidatorSet {
        let total = i64::try_from(self.total_power).expect("bounded by MAX_TOTAL_VOTING_POWER");
        for v in &mut self.validators {
            v.proposer_priority = match previous.get(&v.address) {
                Some(old) => old.proposer_priority,
                None => -(total + (total >> 3)),
            };
        }
        self
    }

    /// CONS-PROP-4: the set for the next height (same members): priorities advanced by one increment.
    pub fn next_height(&self) -> ValidatorSet {
        let mut next = self.clone();
        next.increment_proposer_priority();
        next
    }
}

/// The exact test surface of CONS-PROP-2: validators with these powers (in
/// ascending address order, a fresh set: all priorities equal) and the index
/// chosen by each of the first `count` increments. Validation of the powers is
/// the constructor's job ([`ValidatorSet::new`]); here zero powers are simply
/// never chosen first and the caller keeps the total within bounds.
pub fn proposer_sequence(voting_powers: &[u64], count: usize) -> Vec<usize> {
    if voting_powers.is_empty() {
        return Vec::new();
    }
    let validators = voting_powers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut address = [0u8; 20];
            address[12..].copy_from_slice(&(i as u64).to_be_bytes());
            Validator {
                address: Address(address),
                public_key: [0u8; 33],
                voting_power: *p,
                proposer_priority: 0,
            }
        })
        .collect();
    let mut set = ValidatorSet {
        validators,
        total_power: voting_powers.iter().sum(),
    };
    (0..count)
        .map(|_| set.increment_proposer_priority())
        .collect()
}
