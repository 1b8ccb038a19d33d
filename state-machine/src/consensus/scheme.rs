//! Signature schemes for votes and proposals (CONS-SIG-*).
//!
//! The consensus is generic over [`SignatureScheme`] so that the model checker
//! can run the real code with a cheap deterministic scheme ([`ModelScheme`]),
//! while nodes use ECDSA secp256k1 over SHA3-256 with domain-separated signing
//! bytes ([`K256Scheme`], SIG-1, SIG-2).

use super::types::{Proposal, Vote};
use crate::crypto::{sign, verify_signature};
use crate::tx::{Domain, PublicKey, signing_bytes};
use crate::types::Address;
use k256::ecdsa::SigningKey;
use std::fmt::Debug;
use std::hash::Hash;

/// How votes and proposals are signed and verified (CONS-SIG-1).
pub trait SignatureScheme: Clone + Debug {
    type Signature: Clone + Debug + PartialEq + Eq + PartialOrd + Ord + Hash;
    /// The secret a validator signs with.
    type Signer: Clone + Debug;

    /// The address a signer signs as.
    fn address(&self, signer: &Self::Signer) -> Address;
    fn sign_vote(&self, signer: &Self::Signer, vote: &Vote) -> Self::Signature;
    fn sign_proposal(&self, signer: &Self::Signer, proposal: &Proposal) -> Self::Signature;
    /// Does `signature` by the holder of `public_key` cover `vote`?
    fn verify_vote(&self, public_key: &PublicKey, vote: &Vote, signature: &Self::Signature)
    -> bool;
    fn verify_proposal(
        &self,
        public_key: &PublicKey,
        proposal: &Proposal,
        signature: &Self::Signature,
    ) -> bool;
}

/// CONS-SIG-2: ECDSA secp256k1 over SHA3-256 of `signing_bytes(Domain::Vote |
/// Domain::Proposal, chain_id, canonical encoding)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K256Scheme {
    pub chain_id: String,
}

impl SignatureScheme for K256Scheme {
    type Signature = [u8; 64];
    type Signer = SigningKey;

    fn address(&self, signer: &SigningKey) -> Address {
        Address::from_public_key(signer.verifying_key())
    }
    fn sign_vote(&self, signer: &SigningKey, vote: &Vote) -> [u8; 64] {
        sign(
            signer,
            &signing_bytes(Domain::Vote, &self.chain_id, &vote.signing_body()),
        )
    }
    fn sign_proposal(&self, signer: &SigningKey, proposal: &Proposal) -> [u8; 64] {
        sign(
            signer,
            &signing_bytes(Domain::Proposal, &self.chain_id, &proposal.signing_body()),
        )
    }
    fn verify_vote(&self, public_key: &PublicKey, vote: &Vote, signature: &[u8; 64]) -> bool {
        let bytes = signing_bytes(Domain::Vote, &self.chain_id, &vote.signing_body());
        verify_signature(public_key, &bytes, signature)
    }
    fn verify_proposal(
        &self,
        public_key: &PublicKey,
        proposal: &Proposal,
        signature: &[u8; 64],
    ) -> bool {
        let bytes = signing_bytes(Domain::Proposal, &self.chain_id, &proposal.signing_body());
        verify_signature(public_key, &bytes, signature)
    }
}

/// CONS-SIG-3: the model checker's scheme. A "signature" is the signer's
/// address; it verifies when it equals the message's author. Unforgeable only
/// because the model's actors never sign as someone else: it models ideal
/// signatures at no cost, and is never used by a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ModelScheme;

impl SignatureScheme for ModelScheme {
    type Signature = Address;
    type Signer = Address;

    fn address(&self, signer: &Address) -> Address {
        *signer
    }
    fn sign_vote(&self, signer: &Address, _vote: &Vote) -> Address {
        *signer
    }
    fn sign_proposal(&self, signer: &Address, _proposal: &Proposal) -> Address {
        *signer
    }
    fn verify_vote(&self, _public_key: &PublicKey, vote: &Vote, signature: &Address) -> bool {
        vote.validator == *signature
    }
    fn verify_proposal(
        &self,
        _public_key: &PublicKey,
        proposal: &Proposal,
        signature: &Address,
    ) -> bool {
        proposal.proposer == *signature
    }
}
