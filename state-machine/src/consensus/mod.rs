//! Tendermint BFT consensus, sans IO (spec/consensus.md, CONS-*).
//!
//! - [`round`]: Algorithm 1 of Buchman, Kwon, Milosevic, "The latest gossip on
//!   BFT consensus" (2018), as a pure state machine ([`Consensus::handle`]).
//! - [`votes`]: the vote keeper (+2/3 and f+1 thresholds by voting power,
//!   equivocation detection).
//! - [`validators`]: validator sets and CometBFT's proposer selection.
//! - [`evidence`]: duplicate-vote evidence and commit certificates.
//! - [`scheme`]: the signature schemes (ECDSA secp256k1 for nodes, a free one
//!   for the model checker).
//! - [`vrf`]: RFC 9381 ECVRF, generic over the curve (secp256k1 for the network).
//! - [`committee`]: the epoch proposer-eligibility committee (seed 2.3's
//!   `select_validators`) and its VRF-chained seed.
//!
//! Deliberately absent: networking, clocks, storage. The host feeds inputs and
//! performs outputs in order, persisting before sending (CONS-CRASH-1).

pub mod committee;
pub mod evidence;
pub mod round;
pub mod scheme;
pub mod types;
pub mod validators;
pub mod votes;
pub mod vrf;

pub use committee::{
    eligible_proposers, epoch_proposer, epoch_seed, genesis_seed, next_seed, proposer_set,
    select_validators, ticket_input, ticket_proof, vrf_public_key, vrf_secret_key,
};
pub use evidence::{CommitCertificate, DuplicateVote, VerifyError};
pub use round::{Config, Consensus, Input, Output, Record, Rejected};
pub use scheme::{K256Scheme, ModelScheme, SignatureScheme};
pub use types::{Message, Proposal, Round, Signed, Step, TimeoutKind, ValueId, Vote, VoteType};
pub use validators::{Validator, ValidatorSet, ValidatorSetError, proposer_sequence};
pub use vrf::{Secp256k1Sha256Tai, Suite, VrfError, VrfOutput, VrfProof, VrfPublicKey};

/// Deliberate bugs the model checker must catch (CONS-MC-3). Only settable
/// with the `mutants` feature; nodes always run `Mutant::None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mutant {
    #[default]
    None,
    /// L22/L28 prevote for a valid proposal even when locked on another value.
    IgnoreLock,
    /// Quorum is half the voting power (2 of 4) instead of more than 2/3.
    HalfQuorum,
    /// A restarted validator forgets every persisted vote, proposal and lock.
    ForgetVotes,
}
