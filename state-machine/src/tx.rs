//! Transactions, usage receipts and their signing bytes (spec/ledger.md TX-*, SIG-*).

use crate::crypto::{sha3_256, sign, verify_signature};
use crate::encoding::Canonical;
use crate::types::{Address, Amount, Hash32, Height};
use k256::ecdsa::SigningKey;
use rkyv::{Archive, Deserialize, Serialize};

/// Domain tags, one per signed message type (SIG-1). Each is exactly 16 bytes,
/// so no tag is a prefix of another and the chain id always starts at byte 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    Transaction,
    Vote,
    Proposal,
    Receipt,
    PeerMessage,
    VrfInput,
    /// An inference node's signed announcement to a node's API
    /// (`POST /p2p/register`, runtime API-REG-1); never part of consensus.
    NodeAnnouncement,
    /// An API key: an allowance owner's grant (spec/api.md API-KEY-1).
    ApiKey,
    /// An inference node's heartbeat (spec/inference.md RT-HB-1); never
    /// part of consensus.
    Heartbeat,
    /// A pipeline stage's commitment to its outputs (spec/inference.md
    /// RT-COMMIT-4).
    StageCommitment,
    /// A router's record of a settled verification fault (spec/inference.md
    /// RT-FAULT-1).
    FaultRecord,
}

impl Domain {
    /// SIG-1: the 16-byte tag that starts the signing bytes.
    pub const fn tag(self) -> &'static [u8; 16] {
        match self {
            Domain::Transaction => b"blyan/tx/v1\0\0\0\0\0",
            Domain::Vote => b"blyan/vote/v1\0\0\0",
            Domain::Proposal => b"blyan/proposal/1",
            Domain::Receipt => b"blyan/receipt/v1",
            Domain::PeerMessage => b"blyan/peer-msg/1",
            Domain::VrfInput => b"blyan/vrf-in/v1\0",
            Domain::NodeAnnouncement => b"blyan/node-ann/1",
            Domain::ApiKey => b"blyan/api-key/v1",
            Domain::Heartbeat => b"blyan/heartbt/v1",
            Domain::StageCommitment => b"blyan/stage-cm/1",
            Domain::FaultRecord => b"blyan/fault-rc/1",
        }
    }
}

/// Longest chain id accepted (SIG-1): its length is one byte in the signing bytes.
pub const MAX_CHAIN_ID_BYTES: usize = 64;

/// SIG-1: `tag(16) ‖ len(chain_id) as u8 ‖ chain_id ‖ body`, where `body` is the
/// canonical encoding of the unsigned object. The signature is ECDSA over
/// SHA3-256 of these bytes.
pub fn signing_bytes(domain: Domain, chain_id: &str, body: &[u8]) -> Vec<u8> {
    assert!(
        chain_id.len() <= MAX_CHAIN_ID_BYTES,
        "chain id checked at genesis"
    );
    let mut out = Vec::with_capacity(16 + 1 + chain_id.len() + body.len());
    out.extend_from_slice(domain.tag());
    out.push(chain_id.len() as u8);
    out.extend_from_slice(chain_id.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Compressed SEC1 public key (33 bytes).
pub type PublicKey = [u8; 33];

/// The SEC1 compressed public key of a signing key.
pub fn public_key_of(key: &SigningKey) -> PublicKey {
    let point = key.verifying_key().to_encoded_point(true);
    let mut out = [0u8; 33];
    out.copy_from_slice(point.as_bytes());
    out
}

/// GPU node registration data (TX-9).
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct NodeInfo {
    /// `host:port` where the node serves peers; at most [`MAX_ENDPOINT_BYTES`].
    pub endpoint: String,
    /// PoL block ids (layers, experts, routers) the node holds; at most [`MAX_NODE_BLOCKS`].
    pub blocks: Vec<Hash32>,
}

pub const MAX_ENDPOINT_BYTES: usize = 255;
pub const MAX_NODE_BLOCKS: usize = 1024;

/// A client's signed statement that `node` served `tokens` tokens (TX-8, SIG-1 `Receipt`).
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct InferenceReceipt {
    /// The serving node; only it may settle the receipt.
    pub node: Address,
    /// Client-chosen id; (client, request_id) is settled at most once (INV-RECEIPT-ONCE).
    pub request_id: Hash32,
    pub tokens: u64,
    /// Price the client agreed to, in base units per 1,000 tokens.
    pub price_per_1k_tokens: Amount,
    /// The client's quality rating in milli-units, 500..=1500 (RWD quality factor).
    pub quality_milli: u32,
    /// Last height at which the receipt may be settled.
    pub expires_at_height: Height,
}

/// An [`InferenceReceipt`] with the client's key and signature.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct SignedReceipt {
    pub receipt: InferenceReceipt,
    pub client_public_key: PublicKey,
    pub signature: [u8; 64],
}

impl InferenceReceipt {
    /// Payment owed by the client: `tokens × price_per_1k / 1000`, rounded down (TX-8).
    pub fn payment(&self) -> Option<Amount> {
        (self.tokens as Amount)
            .checked_mul(self.price_per_1k_tokens)
            .map(|v| v / 1000)
    }

    pub fn sign(self, chain_id: &str, key: &SigningKey) -> SignedReceipt {
        let msg = signing_bytes(Domain::Receipt, chain_id, &self.encode());
        SignedReceipt {
            signature: sign(key, &msg),
            client_public_key: public_key_of(key),
            receipt: self,
        }
    }
}

impl SignedReceipt {
    /// SIG-2 with the `Receipt` domain.
    pub fn verify(&self, chain_id: &str) -> bool {
        let msg = signing_bytes(Domain::Receipt, chain_id, &self.receipt.encode());
        verify_signature(&self.client_public_key, &msg, &self.signature)
    }

    pub fn client(&self) -> Option<Address> {
        Address::from_sec1(&self.client_public_key)
    }
}

/// What a transaction does (TX-2).
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub enum TxKind {
    /// TX-3: move `amount` to `to`.
    Transfer { to: Address, amount: Amount },
    /// TX-4: bond `amount` of the sender's balance as validator stake; the
    /// transaction's key becomes the validator's consensus key.
    Bond { amount: Amount },
    /// TX-5: start unbonding `amount`; released after the unbonding period.
    Unbond { amount: Amount },
    /// TX-6: leave jail once the jail period is over.
    Unjail,
    /// TX-8: settle a client-signed inference receipt (sender must be the node).
    SettleInference { receipt: Box<SignedReceipt> },
    /// TX-9: register the sender as a GPU node with a bond.
    RegisterNode { info: Box<NodeInfo>, bond: Amount },
    /// TX-10: deregister; the bond enters the unbonding queue.
    DeregisterNode,
    /// TX-7: Proof-of-Learning operations (spec/pol.md).
    Pol(Box<crate::pol::PolTx>),
    /// TX-13: escrow an inference allowance (its id is this transaction's id).
    OpenAllowance(Box<crate::allowance::AllowanceTerms>),
    /// TX-14: revoke an allowance (owner only); the rest is refunded after the grace period.
    CloseAllowance { allowance: Hash32 },
    /// TX-15: settle a batch of served requests against an allowance.
    SettleUsage(Box<crate::allowance::Settlement>),
    /// TX-16: register the sender's VRF public key (CONS-COMM-8), once; a
    /// validator without one never proposes while a committee member is left.
    SetVrfKey {
        public_key: crate::consensus::VrfPublicKey,
    },
}

/// The signed part of a transaction (TX-1). The chain id is not stored: it is
/// part of the signing bytes (SIG-1).
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct TxBody {
    /// Must equal the sender's account nonce (TX-1, no gaps).
    pub nonce: u64,
    pub gas_limit: u64,
    pub max_fee_per_gas: u128,
    pub max_priority_fee_per_gas: u128,
    pub kind: TxKind,
}

/// A transaction with its sender's key and signature (TX-1): the sender is
/// carried as its compressed public key rather than recovered.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct SignedTx {
    pub body: TxBody,
    pub public_key: PublicKey,
    pub signature: [u8; 64],
}

impl TxBody {
    /// SIG-1 signing bytes of this body on `chain_id`.
    pub fn signing_bytes(&self, chain_id: &str) -> Vec<u8> {
        signing_bytes(Domain::Transaction, chain_id, &self.encode())
    }

    pub fn sign(self, chain_id: &str, key: &SigningKey) -> SignedTx {
        let signature = sign(key, &self.signing_bytes(chain_id));
        SignedTx {
            body: self,
            public_key: public_key_of(key),
            signature,
        }
    }
}

impl SignedTx {
    /// TX-1: the sender, derived from the carried key; `None` if it is not a point.
    pub fn sender(&self) -> Option<Address> {
        Address::from_sec1(&self.public_key)
    }

    /// TX-1 and SIG-2 in one step: the sender if the key is a valid point and
    /// the signature verifies, decompressing the key once.
    pub fn verified_sender(&self, chain_id: &str) -> Option<Address> {
        let (key, sender) = self.claimed_sender()?;
        self.verify_with(&key, chain_id).then_some(sender)
    }

    /// The sender the public key names and the parsed key, **without**
    /// checking the signature (a point decompression and a hash, ~10 µs
    /// against ~150 µs for a verification). Only for checks that reject
    /// (NODE-MP-2: a replayed nonce is refused before it costs a
    /// verification); never to move funds. `None` if the key is malformed.
    pub fn claimed_sender(&self) -> Option<(k256::ecdsa::VerifyingKey, Address)> {
        let key = crate::memo::public_key(&self.public_key, || {
            k256::ecdsa::VerifyingKey::from_sec1_bytes(&self.public_key).ok()
        })?;
        let sender = Address::from_public_key(&key);
        Some((key, sender))
    }

    /// SIG-2 over the signing bytes against `key` (from [`Self::claimed_sender`]).
    pub fn verify_with(&self, key: &k256::ecdsa::VerifyingKey, chain_id: &str) -> bool {
        let digest = sha3_256(&self.body.signing_bytes(chain_id));
        crate::crypto::verify_prehash(key, &digest, &self.signature)
    }

    /// SIG-2 over the transaction's signing bytes.
    pub fn verify(&self, chain_id: &str) -> bool {
        verify_signature(
            &self.public_key,
            &self.body.signing_bytes(chain_id),
            &self.signature,
        )
    }

    /// Bytes of the canonical encoding (what BLOCK-8 counts).
    pub fn encoded_len(&self) -> u64 {
        self.encode().len() as u64
    }

    /// [`Self::id`] and [`Self::encoded_len`] from one encoding.
    pub fn id_and_len(&self) -> (Hash32, u64) {
        let bytes = self.encode();
        (sha3_256(&bytes), bytes.len() as u64)
    }

    /// Transaction id: SHA3-256 of the canonical encoding of the signed transaction.
    pub fn id(&self) -> Hash32 {
        sha3_256(&self.encode())
    }
}
