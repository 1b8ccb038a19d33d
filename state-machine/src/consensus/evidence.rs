//! Evidence of equivocation and commit certificates (CONS-EV-*, CONS-CERT-*).

use super::scheme::SignatureScheme;
use super::types::{Round, Signed, ValueId, Vote, VoteType};
use super::validators::ValidatorSet;
use crate::block::{Misbehaviour, SignedVote};
use crate::types::{Address, Height};

/// CONS-EV-1: two signed votes by one validator for the same height, round and
/// type with different values. Anyone holding the validator set of that height
/// can check it ([`DuplicateVote::verify`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DuplicateVote<Sig> {
    /// The two votes, ordered by their message (ascending), so one pair has one form.
    pub vote_a: Signed<Vote, Sig>,
    pub vote_b: Signed<Vote, Sig>,
}

/// Why evidence or a certificate was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the two votes do not conflict (author, height, round, type or value)")]
    NotConflicting,
    #[error("{0} is not in the validator set")]
    UnknownValidator(Address),
    #[error("a signature is invalid")]
    BadSignature,
    #[error("signers are not in strictly ascending order")]
    NotSorted,
    #[error("signers hold no more than 2/3 of the voting power")]
    NoQuorum,
    #[error("the certificate is for height {got}, expected {expected}")]
    WrongHeight { expected: Height, got: Height },
}

impl<Sig: Clone> DuplicateVote<Sig> {
    pub fn new(a: Signed<Vote, Sig>, b: Signed<Vote, Sig>) -> Self {
        assert_ne!(a.message, b.message, "evidence needs two different votes");
        if a.message <= b.message {
            DuplicateVote {
                vote_a: a,
                vote_b: b,
            }
        } else {
            DuplicateVote {
                vote_a: b,
                vote_b: a,
            }
        }
    }

    pub fn validator(&self) -> Address {
        self.vote_a.message.validator
    }
    pub fn height(&self) -> Height {
        self.vote_a.message.height
    }

    /// CONS-EV-2: both votes are by the same member of `set` (the set of the
    /// infraction height), for the same height, round and type, with different
    /// values, and both signatures verify.
    pub fn verify<S: SignatureScheme<Signature = Sig>>(
        &self,
        scheme: &S,
        set: &ValidatorSet,
    ) -> Result<(), VerifyError> {
        let (a, b) = (&self.vote_a.message, &self.vote_b.message);
        let same_slot = a.validator == b.validator
            && a.height == b.height
            && a.round == b.round
            && a.vote_type == b.vote_type;
        if !same_slot || a.value == b.value {
            return Err(VerifyError::NotConflicting);
        }
        let member = set
            .get(&a.validator)
            .ok_or(VerifyError::UnknownValidator(a.validator))?;
        for signed in [&self.vote_a, &self.vote_b] {
            if !scheme.verify_vote(&member.public_key, &signed.message, &signed.signature) {
                return Err(VerifyError::BadSignature);
            }
        }
        Ok(())
    }
}

impl DuplicateVote<[u8; 64]> {
    /// CONS-EV-3: the ledger's form of this evidence (SLASH-1): the two signed
    /// votes themselves, so any node can re-verify them from the block.
    pub fn to_misbehaviour(&self) -> Misbehaviour {
        let signed = |s: &Signed<Vote, [u8; 64]>| SignedVote {
            vote: s.message.clone(),
            signature: s.signature,
        };
        Misbehaviour::DuplicateVote {
            vote_a: signed(&self.vote_a),
            vote_b: signed(&self.vote_b),
        }
    }

    /// The inverse of [`DuplicateVote::to_misbehaviour`]; `None` when the two
    /// votes are not in canonical (strictly ascending) order.
    pub fn from_misbehaviour(m: &Misbehaviour) -> Option<Self> {
        let Misbehaviour::DuplicateVote { vote_a, vote_b } = m;
        if vote_a.vote >= vote_b.vote {
            return None;
        }
        let signed = |s: &SignedVote| Signed {
            message: s.vote.clone(),
            signature: s.signature,
        };
        Some(DuplicateVote {
            vote_a: signed(vote_a),
            vote_b: signed(vote_b),
        })
    }
}

/// CONS-CERT-1: +2/3 of the voting power of height `height`'s set precommitted
/// `value` in `round`. Block `height + 1` carries it; its signers are that
/// block's `last_commit_signers` (SLASH-2).
#[derive(Clone, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct CommitCertificate<Sig> {
    pub height: Height,
    pub round: Round,
    pub value: ValueId,
    /// `(validator, signature over its precommit)`, ascending by address.
    pub signatures: Vec<(Address, Sig)>,
}

impl<Sig: Clone> CommitCertificate<Sig> {
    /// The signers, ascending (BLOCK `last_commit_signers`).
    pub fn signers(&self) -> Vec<Address> {
        self.signatures.iter().map(|(a, _)| *a).collect()
    }

    /// The precommit `signer` made, as the certificate claims it.
    pub fn precommit(&self, validator: Address) -> Vote {
        Vote {
            vote_type: VoteType::Precommit,
            height: self.height,
            round: self.round,
            value: Some(self.value),
            validator,
        }
    }

    /// CONS-CERT-2: verifiable by anyone with the validator set of `height`:
    /// signers strictly ascending, all members, all signatures valid, and
    /// together more than 2/3 of the set's power.
    pub fn verify<S: SignatureScheme<Signature = Sig>>(
        &self,
        scheme: &S,
        set: &ValidatorSet,
        height: Height,
    ) -> Result<(), VerifyError> {
        if self.height != height {
            return Err(VerifyError::WrongHeight {
                expected: height,
                got: self.height,
            });
        }
        if !self.signatures.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(VerifyError::NotSorted);
        }
        let mut power: u64 = 0;
        for (address, signature) in &self.signatures {
            let member = set
                .get(address)
                .ok_or(VerifyError::UnknownValidator(*address))?;
            if !scheme.verify_vote(&member.public_key, &self.precommit(*address), signature) {
                return Err(VerifyError::BadSignature);
            }
            power += member.voting_power;
        }
        assert!(power <= set.total_power(), "distinct members");
        if !set.is_quorum(power, super::Mutant::None) {
            return Err(VerifyError::NoQuorum);
        }
        Ok(())
    }
}
