//! The Proof-of-Learning DAG and its acceptance rule (spec/pol.md, POL-*).
//!
//! What it does: keeps the DAG of model blocks (meta, layer, expert, router,
//! data, delta), one head per trainable target (a layer, an expert or a
//! router of a model), the seed's expert/layer registry, and the two
//! commit–reveal protocols that decide whether a delta becomes a new head:
//! submitters commit to a delta before revealing it (POL-20..22), validators
//! commit to their measured losses before revealing them (POL-30..36).
//!
//! What it deliberately does not do: move money (it returns [`PolEffect`]s and
//! [`PolEvent`]s the ledger turns into bonds and reward claims), verify
//! signatures (PoL blocks travel inside the ledger's signed transactions,
//! POL-2), or touch payloads (they live off chain; only their size, Merkle root
//! and CID are here, POL-3, POL-4).
//!
//! Host call order per block: [`PolState::apply_tx`] for each PoL transaction
//! in block order, then [`PolState::end_block`] once, with the same
//! [`PolContext`].

use crate::crypto::{sha3_256, sha3_256_parts};
use crate::encoding::Canonical;
use crate::state::{StateKey, Touched, ns};
use crate::types::{Address, Amount, Hash32, Height, amount_str, hex32};
use imbl::OrdMap;
use rkyv::{Archive, Deserialize as RkyvDeserialize, Serialize as RkyvSerialize};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Payload chunk size for the Merkle root (POL-3): 1 MiB.
pub const PAYLOAD_CHUNK_BYTES: usize = 1 << 20;
/// Parts per million: the unit of ratios in this module.
pub const PPM: u64 = 1_000_000;
/// Domain tag of a delta commitment (POL-20).
pub const DELTA_COMMIT_TAG: &[u8] = b"BLYAN/POL/DELTA-COMMIT/v1";
/// Domain tag of an attestation commitment (POL-31).
pub const ATTEST_COMMIT_TAG: &[u8] = b"BLYAN/POL/ATTEST-COMMIT/v1";
/// Length of every CID this module accepts (POL-4): "b" + base32(36 bytes).
pub const CID_V1_RAW_SHA256_LEN: usize = 59;

// ---------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------

/// Kind of a PoL block (POL-1). The discriminant byte is part of state keys.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Archive,
    RkyvSerialize,
    RkyvDeserialize,
    Serialize,
    Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PolBlockType {
    Meta,
    Layer,
    Expert,
    Router,
    Data,
    Delta,
}

impl PolBlockType {
    /// The byte used in state keys (POL-K1).
    pub fn byte(self) -> u8 {
        match self {
            PolBlockType::Meta => 0,
            PolBlockType::Layer => 1,
            PolBlockType::Expert => 2,
            PolBlockType::Router => 3,
            PolBlockType::Data => 4,
            PolBlockType::Delta => 5,
        }
    }

    /// Layer, expert and router blocks are the targets deltas train (POL-12).
    pub fn is_target(self) -> bool {
        matches!(
            self,
            PolBlockType::Layer | PolBlockType::Expert | PolBlockType::Router
        )
    }
}

/// Semantic version (POL-14).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Archive,
    RkyvSerialize,
    RkyvDeserialize,
    Serialize,
    Deserialize,
)]
pub struct SemVer {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl SemVer {
    pub const fn new(major: u32, minor: u32, patch: u32) -> SemVer {
        SemVer {
            major,
            minor,
            patch,
        }
    }

    /// POL-14: an accepted delta bumps the minor version and resets the patch.
    /// `None` if the minor version is exhausted.
    pub fn bump_for_delta(self) -> Option<SemVer> {
        Some(SemVer::new(self.major, self.minor.checked_add(1)?, 0))
    }
}

/// A block of the PoL DAG (POL-1). Its id is `Canonical::hash()` (POL-2).
#[derive(
    Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize, Serialize, Deserialize,
)]
pub struct PolBlock {
    pub block_type: PolBlockType,
    /// The meta block this block belongs to; zero for a meta block and for a
    /// data block that belongs to no model (POL-11).
    #[serde(with = "hex32")]
    pub model_id: Hash32,
    /// Parents; each must already exist (POL-10).
    #[serde(with = "hex32_vec")]
    pub depends_on: Vec<Hash32>,
    pub version: SemVer,
    pub layer: Option<u32>,
    pub expert: Option<u32>,
    pub payload_size_bytes: u64,
    /// POL-3.
    #[serde(with = "hex32")]
    pub payload_merkle_root: Hash32,
    /// POL-4.
    pub payload_cid: String,
    pub submitter: Address,
    /// Delta only: the head block of the target the delta was trained against (POL-13).
    #[serde(with = "hex32_opt")]
    pub base_block: Option<Hash32>,
    /// Delta only: the version of that head (POL-13).
    pub base_version: Option<SemVer>,
}

/// Hex JSON for a list of hashes (genesis files).
mod hex32_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    #[derive(Serialize, Deserialize)]
    struct Hex(#[serde(with = "crate::types::hex32")] [u8; 32]);
    pub fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        v.iter().map(|h| Hex(*h)).collect::<Vec<_>>().serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        Ok(Vec::<Hex>::deserialize(d)?
            .into_iter()
            .map(|h| h.0)
            .collect())
    }
}

/// Hex JSON for an optional hash (genesis files).
mod hex32_opt {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    #[derive(Serialize, Deserialize)]
    struct Hex(#[serde(with = "crate::types::hex32")] [u8; 32]);
    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        v.map(Hex).serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        Ok(Option::<Hex>::deserialize(d)?.map(|h| h.0))
    }
}

impl PolBlock {
    /// POL-2: the block id.
    pub fn id(&self) -> Hash32 {
        self.hash()
    }

    /// The target a layer/expert/router block registers, or a delta trains.
    pub fn target_key(&self, kind: PolBlockType) -> TargetKey {
        TargetKey {
            model_id: self.model_id,
            kind,
            layer: self.layer,
            expert: self.expert,
        }
    }
}

/// A trainable target of a model: one layer, one expert or one router (POL-12).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Archive,
    RkyvSerialize,
    RkyvDeserialize,
    Serialize,
    Deserialize,
)]
pub struct TargetKey {
    #[serde(with = "hex32")]
    pub model_id: Hash32,
    pub kind: PolBlockType,
    pub layer: Option<u32>,
    pub expert: Option<u32>,
}

impl TargetKey {
    /// POL-K1: `model_id ‖ kind ‖ opt(layer) ‖ opt(expert)`, where `opt(None)
    /// = 00 00000000` and `opt(Some(x)) = 01 ‖ x as u32 big-endian`: 43 bytes.
    pub fn key_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(43);
        out.extend_from_slice(&self.model_id);
        out.push(self.kind.byte());
        for part in [self.layer, self.expert] {
            match part {
                None => out.extend_from_slice(&[0, 0, 0, 0, 0]),
                Some(x) => {
                    out.push(1);
                    out.extend_from_slice(&x.to_be_bytes());
                }
            }
        }
        assert_eq!(out.len(), 43);
        out
    }
}

// ---------------------------------------------------------------------------
// Payload commitments (POL-3, POL-4)
// ---------------------------------------------------------------------------

/// POL-3: SHA3-256 Merkle root over the payload's 1 MiB chunks.
///
/// Chunks: `max(1, ceil(len / 2^20))` (the empty payload is one empty chunk).
/// Leaf = SHA3-256(0x00 ‖ chunk); node = SHA3-256(0x01 ‖ left ‖ right); at a
/// level with an odd count the last node is carried up unchanged.
pub fn payload_merkle_root(payload: &[u8]) -> Hash32 {
    let mut level = payload_leaves(payload);
    while level.len() > 1 {
        level = merkle_parent_level(&level);
    }
    assert_eq!(level.len(), 1);
    level[0]
}

fn payload_leaves(payload: &[u8]) -> Vec<Hash32> {
    if payload.is_empty() {
        return vec![sha3_256(&[0x00])];
    }
    payload
        .chunks(PAYLOAD_CHUNK_BYTES)
        .map(|c| sha3_256_parts(&[&[0x00], c]))
        .collect()
}

fn merkle_parent_level(level: &[Hash32]) -> Vec<Hash32> {
    assert!(level.len() > 1);
    level
        .chunks(2)
        .map(|pair| match pair {
            [left, right] => sha3_256_parts(&[&[0x01], left, right]),
            [last] => *last,
            _ => unreachable!("chunks(2) yields one or two items"),
        })
        .collect()
}

/// Number of chunks of a payload of `size_bytes` (POL-3).
pub fn payload_chunk_count(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(PAYLOAD_CHUNK_BYTES as u64).max(1)
}

/// POL-3a: sibling path for chunk `index` (bottom-up; levels where the node is
/// carried up contribute no sibling). `None` if `index` is out of range.
pub fn payload_merkle_proof(payload: &[u8], index: u64) -> Option<Vec<Hash32>> {
    let mut level = payload_leaves(payload);
    let mut i = usize::try_from(index).ok()?;
    if i >= level.len() {
        return None;
    }
    let mut proof = Vec::new();
    while level.len() > 1 {
        let sibling = i ^ 1;
        if sibling < level.len() {
            proof.push(level[sibling]);
        }
        level = merkle_parent_level(&level);
        i /= 2;
    }
    Some(proof)
}

/// POL-3a: checks one chunk against a root, knowing only the payload size.
pub fn verify_payload_chunk(
    root: &Hash32,
    size_bytes: u64,
    index: u64,
    chunk: &[u8],
    proof: &[Hash32],
) -> bool {
    let count = payload_chunk_count(size_bytes);
    if index >= count {
        return false;
    }
    let expected_len = if size_bytes == 0 {
        0
    } else if index + 1 < count {
        PAYLOAD_CHUNK_BYTES as u64
    } else {
        size_bytes - (count - 1) * PAYLOAD_CHUNK_BYTES as u64
    };
    if chunk.len() as u64 != expected_len {
        return false;
    }
    let mut node = sha3_256_parts(&[&[0x00], chunk]);
    let (mut i, mut width, mut used) = (index, count, 0usize);
    while width > 1 {
        let sibling = i ^ 1;
        if sibling < width {
            let Some(s) = proof.get(used) else {
                return false;
            };
            used += 1;
            node = if i % 2 == 0 {
                sha3_256_parts(&[&[0x01], &node, s])
            } else {
                sha3_256_parts(&[&[0x01], s, &node])
            };
        }
        i /= 2;
        width = width.div_ceil(2);
    }
    used == proof.len() && node == *root
}

/// POL-4: IPFS CIDv1 of the whole payload: raw codec (0x55), sha2-256
/// multihash (0x12, 0x20), multibase base32 lower-case without padding ("b").
pub fn cid_v1_raw_sha256(payload: &[u8]) -> String {
    use sha2::Digest;
    let digest: [u8; 32] = sha2::Sha256::digest(payload).into();
    let mut bytes = Vec::with_capacity(36);
    bytes.extend_from_slice(&[0x01, 0x55, 0x12, 0x20]);
    bytes.extend_from_slice(&digest);
    let cid = format!("b{}", base32_lower_nopad(&bytes));
    assert_eq!(cid.len(), CID_V1_RAW_SHA256_LEN);
    cid
}

fn base32_lower_nopad(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// POL-4: the shape every CID on chain must have: 59 characters, "bafkrei"
/// prefix (CIDv1 + raw + sha2-256 + 32 bytes), base32 lower alphabet.
pub fn is_cid_v1_raw_sha256(cid: &str) -> bool {
    cid.len() == CID_V1_RAW_SHA256_LEN
        && cid.starts_with("bafkrei")
        && cid
            .bytes()
            .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c))
}

// ---------------------------------------------------------------------------
// Commitments (POL-20, POL-31)
// ---------------------------------------------------------------------------

/// POL-20: `SHA3-256(DELTA_COMMIT_TAG ‖ delta_id ‖ submitter)`.
pub fn delta_commitment(delta_id: &Hash32, submitter: &Address) -> Hash32 {
    sha3_256_parts(&[DELTA_COMMIT_TAG, delta_id, &submitter.0])
}

/// POL-31: `SHA3-256(ATTEST_COMMIT_TAG ‖ delta_id ‖ loss_be64 ‖ head_loss_be64 ‖ salt ‖ validator)`.
pub fn attestation_commitment(
    delta_id: &Hash32,
    loss_micronats: u64,
    head_loss_micronats: u64,
    salt: &Hash32,
    validator: &Address,
) -> Hash32 {
    sha3_256_parts(&[
        ATTEST_COMMIT_TAG,
        delta_id,
        &loss_micronats.to_be_bytes(),
        &head_loss_micronats.to_be_bytes(),
        salt,
        &validator.0,
    ])
}

// ---------------------------------------------------------------------------
// Parameters, records, transactions, effects, events
// ---------------------------------------------------------------------------

/// PoL parameters, fixed at genesis (POL-P1).
#[derive(
    Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize, Serialize, Deserialize,
)]
pub struct PolParams {
    /// Blocks after a delta's reveal during which validators commit (POL-30).
    pub attest_commit_window_blocks: u64,
    /// Blocks after the commit window during which validators reveal (POL-32).
    pub attest_reveal_window_blocks: u64,
    /// A delta commitment not revealed within this many blocks expires (POL-22).
    pub delta_commit_ttl_blocks: u64,
    /// Minimum relative improvement for acceptance (POL-35); 10_000 = 1%.
    pub min_improvement_ppm: u64,
    /// How far from the median a reveal may be and still earn (POL-36).
    pub attestation_tolerance_ppm: u64,
    /// Bond the ledger locks for a block registered outside genesis (POL-15).
    #[serde(with = "amount_str")]
    pub registration_bond: Amount,
    pub max_parents: u32,
    pub max_payload_size_bytes: u64,
    pub max_pending_deltas: u32,
    pub max_delta_commits: u32,
    pub max_attestations_per_delta: u32,
    pub max_node_assignments: u32,
}

impl Default for PolParams {
    fn default() -> Self {
        PolParams {
            attest_commit_window_blocks: 150,
            attest_reveal_window_blocks: 150,
            delta_commit_ttl_blocks: 1_800,
            min_improvement_ppm: 10_000,
            attestation_tolerance_ppm: 10_000,
            registration_bond: 1_000 * crate::types::BLY,
            max_parents: 16,
            max_payload_size_bytes: 64 << 30,
            max_pending_deltas: 1_024,
            max_delta_commits: 4_096,
            max_attestations_per_delta: 512,
            max_node_assignments: 64,
        }
    }
}

impl PolParams {
    /// POL-P1: parameter sanity, checked at genesis.
    pub fn validate(&self) -> Result<(), PolError> {
        let ok = self.attest_commit_window_blocks >= 1
            && self.attest_reveal_window_blocks >= 1
            && self.delta_commit_ttl_blocks >= 1
            && self.min_improvement_ppm >= 1
            && self.min_improvement_ppm <= PPM
            && self.attestation_tolerance_ppm <= PPM
            && self.max_parents >= 1
            && self.max_pending_deltas >= 1
            && self.max_delta_commits >= 1
            && self.max_attestations_per_delta >= 1;
        if ok { Ok(()) } else { Err(PolError::BadParams) }
    }
}

/// An unrevealed delta commitment (POL-20).
#[derive(Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub struct DeltaCommit {
    pub submitter: Address,
    pub committed_height: Height,
}

/// The head of a target (POL-12): what the next delta must be trained against.
#[derive(Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub struct TargetHead {
    pub block_id: Hash32,
    pub version: SemVer,
    /// Agreed loss of the head model after its last accepted delta; `None`
    /// until one is accepted.
    pub loss_micronats: Option<u64>,
    pub accepted_deltas: u32,
    /// Sum of the improvements of all accepted deltas on this target (RWD-11).
    pub cumulative_improvement_ppm: u64,
}

/// The seed's `ExpertRecord` (8.1) for a layer, expert or router (POL-16).
#[derive(Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub struct ExpertRecord {
    pub target: TargetKey,
    pub version: SemVer,
    pub block_hash: Hash32,
    pub weight_cid: String,
    pub size_bytes: u64,
    /// Cumulative accepted improvement in ppm (fixed point; 10_000 = 1%).
    pub quality_score_ppm: u64,
    pub usage_count: u64,
    pub last_updated: Height,
    /// Serving nodes, sorted, at most `max_node_assignments`.
    pub node_assignments: Vec<Address>,
}

/// One validator's attestation on a pending delta (POL-31, POL-32).
#[derive(Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub struct Attestation {
    pub validator: Address,
    pub commitment: Hash32,
    pub revealed: Option<RevealedLoss>,
}

/// Revealed losses, in micro-nats per token on the validation set (POL-32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub struct RevealedLoss {
    /// Loss of the head with the delta applied.
    pub loss_micronats: u64,
    /// Loss of the current head, measured in the same run.
    pub head_loss_micronats: u64,
}

/// A revealed delta under evaluation (POL-22, POL-30).
#[derive(Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub struct PendingDelta {
    pub block: PolBlock,
    pub delta_id: Hash32,
    pub target: TargetKey,
    pub revealed_height: Height,
    /// Last height at which attestation commitments are accepted.
    pub commit_end_height: Height,
    /// Last height at which reveals are accepted; decided at its end_block.
    pub reveal_end_height: Height,
    /// Sorted by validator, at most `max_attestations_per_delta`.
    pub attestations: Vec<Attestation>,
    /// POL-33: deltas accepted for any target of the model when this one
    /// was revealed ([`PolState::model_accepted_count`]). If the count has
    /// changed by the decision, the model it was evaluated on is gone.
    pub model_accepted_at_reveal: u64,
}

/// PoL transactions (POL-T*). The ledger authenticates `sender`.
#[derive(Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub enum PolTx {
    /// POL-15: register a meta/layer/expert/router/data block with a bond.
    RegisterBlock(PolBlock),
    /// POL-20.
    CommitDelta { commitment: Hash32 },
    /// POL-21.
    RevealDelta(PolBlock),
    /// POL-31.
    CommitAttestation {
        delta_id: Hash32,
        commitment: Hash32,
    },
    /// POL-32.
    RevealAttestation {
        delta_id: Hash32,
        loss_micronats: u64,
        head_loss_micronats: u64,
        salt: Hash32,
    },
}

/// What the ledger must do with money after a successful PoL transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolEffect {
    None,
    /// POL-15: lock `amount` of `owner`'s balance as a registration bond. If
    /// the owner cannot pay, the ledger must fail the transaction and discard
    /// the PoL changes (apply it on a clone).
    LockBond {
        owner: Address,
        amount: Amount,
    },
}

/// Why a delta was rejected (POL-33..35).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Archive, RkyvSerialize, RkyvDeserialize,
)]
pub enum RejectReason {
    /// POL-33: the target's head moved past the delta's base.
    Stale,
    /// POL-34: revealed stake below 2/3 of total bonded stake.
    NoQuorum,
    /// POL-35: agreed improvement below `min_improvement_ppm`.
    InsufficientImprovement,
}

/// Outcome of a delta's evaluation.
#[derive(Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub enum DeltaOutcome {
    Accepted { new_version: SemVer },
    Rejected(RejectReason),
}

/// A decided delta and who earned a claim from it (POL-37).
#[derive(Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub struct DeltaDecision {
    pub delta_id: Hash32,
    pub target: TargetKey,
    pub submitter: Address,
    pub outcome: DeltaOutcome,
    /// Agreed relative improvement (0 without quorum).
    pub improvement_ppm: u64,
    pub agreed_loss_micronats: Option<u64>,
    pub agreed_head_loss_micronats: Option<u64>,
    /// The target's cumulative improvement before this delta (RWD-11).
    pub cumulative_improvement_before_ppm: u64,
    pub revealed_stake: Amount,
    /// Revealers within tolerance of both medians, with their stake (POL-36);
    /// empty without quorum.
    pub honest_attestors: Vec<(Address, Amount)>,
    /// Data blocks the delta depends on, with their submitters (POL-13).
    pub data_blocks: Vec<(Hash32, Address)>,
}

/// Events of [`PolState::end_block`], in deterministic order (POL-38).
#[derive(Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub enum PolEvent {
    DeltaDecided(DeltaDecision),
    DeltaCommitExpired {
        commitment: Hash32,
        submitter: Address,
    },
}

/// What [`PolState::apply_tx`] and [`PolState::end_block`] need from the ledger.
#[derive(Clone, Copy, Debug)]
pub struct PolContext<'a> {
    pub height: Height,
    /// Bonded stake of the active validators.
    pub stakes: &'a BTreeMap<Address, Amount>,
    /// Sum of `stakes`.
    pub total_stake: Amount,
    pub params: &'a PolParams,
}

/// Protocol rejections of PoL transactions and genesis blocks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolError {
    #[error("POL-P1: invalid PoL parameters")]
    BadParams,
    #[error("POL-10: parent {} does not exist", hex::encode(.0))]
    UnknownParent(Hash32),
    #[error("POL-10: parent {} listed twice", hex::encode(.0))]
    DuplicateParent(Hash32),
    #[error("POL-10: {count} parents, at most {max}")]
    TooManyParents { count: usize, max: u32 },
    #[error("POL-2: block {} already exists", hex::encode(.0))]
    DuplicateBlock(Hash32),
    #[error("{rule}: {detail}")]
    TypeRule {
        rule: &'static str,
        detail: &'static str,
    },
    #[error("POL-3: payload of {size} bytes exceeds {max}")]
    PayloadTooLarge { size: u64, max: u64 },
    #[error("POL-4: payload CID is not a CIDv1 raw sha2-256 in base32")]
    BadCid,
    #[error("POL-15: target already registered")]
    TargetExists,
    #[error("POL-2: transaction sender is not the block's submitter")]
    NotSubmitter,
    #[error("POL-20: commitment already exists")]
    DuplicateCommitment,
    #[error("POL-20: too many open delta commitments (max {0})")]
    TooManyCommitments(u32),
    #[error("POL-21: no matching delta commitment by this submitter")]
    NoCommitment,
    #[error("POL-21: reveal must come at least one block after the commitment")]
    RevealTooEarly,
    #[error("POL-13: delta's base is not the head of its target")]
    StaleBase,
    #[error("POL-22: too many pending deltas (max {0})")]
    TooManyPending(u32),
    #[error("POL-30: delta {} is not pending", hex::encode(.0))]
    UnknownDelta(Hash32),
    #[error("POL-30: sender has no bonded stake")]
    NotValidator,
    #[error("POL-30: outside the attestation {0} window")]
    OutsideWindow(&'static str),
    #[error("POL-31: validator already committed on this delta")]
    AlreadyCommitted,
    #[error("POL-31: too many attestations on this delta (max {0})")]
    TooManyAttestations(u32),
    #[error("POL-32: no attestation commitment by this validator")]
    NoAttestation,
    #[error("POL-32: already revealed")]
    AlreadyRevealed,
    #[error("POL-32: reveal does not match the commitment")]
    RevealMismatch,
    #[error("POL-16: unknown target")]
    UnknownTarget,
    #[error("POL-16: too many node assignments (max {0})")]
    TooManyAssignments(u32),
    #[error("POL-K1: malformed stored entry in namespace {0:#04x}")]
    BadEntry(u8),
}

fn type_rule(rule: &'static str, detail: &'static str) -> PolError {
    PolError::TypeRule { rule, detail }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

/// The PoL part of the chain state. `Clone` is O(1) (persistent maps).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PolState {
    blocks: OrdMap<Hash32, PolBlock>,
    delta_commits: OrdMap<Hash32, DeltaCommit>,
    pending: OrdMap<Hash32, PendingDelta>,
    heads: OrdMap<TargetKey, TargetHead>,
    registry: OrdMap<TargetKey, ExpertRecord>,
    /// Index (derived): (expiry height, commitment).
    commit_expiry: OrdMap<(Height, Hash32), ()>,
    /// Index (derived): (reveal end height, delta id).
    pending_by_end: OrdMap<(Height, Hash32), ()>,
}

impl PolState {
    /// POL-G1: builds the genesis state. Blocks are checked in order with the
    /// same rules as registrations (no bond); deltas are not allowed.
    pub fn genesis(blocks: Vec<PolBlock>, params: &PolParams) -> Result<PolState, PolError> {
        params.validate()?;
        let mut state = PolState::default();
        let mut touched = Touched::new();
        for block in &blocks {
            if block.block_type == PolBlockType::Delta {
                return Err(type_rule("POL-G1", "genesis cannot contain deltas"));
            }
            state.check_registration(block, params)?;
            state.insert_registered(block, 0, &mut touched);
        }
        assert_eq!(state.blocks.len(), blocks.len());
        Ok(state)
    }

    // -- queries ------------------------------------------------------------

    pub fn block(&self, id: &Hash32) -> Option<&PolBlock> {
        self.blocks.get(id)
    }
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }
    pub fn blocks(&self) -> impl Iterator<Item = (&Hash32, &PolBlock)> {
        self.blocks.iter()
    }
    pub fn head(&self, target: &TargetKey) -> Option<&TargetHead> {
        self.heads.get(target)
    }
    /// POL-33: how many deltas have been accepted for all targets of a
    /// model together (it only grows).
    pub fn model_accepted_count(&self, model_id: &Hash32) -> u64 {
        self.heads
            .iter()
            .filter(|(t, _)| t.model_id == *model_id)
            .map(|(_, h)| u64::from(h.accepted_deltas))
            .fold(0u64, u64::saturating_add)
    }
    /// Heads of every target of a model, in target order.
    pub fn heads_of_model(&self, model_id: &Hash32) -> Vec<(TargetKey, TargetHead)> {
        self.heads
            .iter()
            .filter(|(t, _)| t.model_id == *model_id)
            .map(|(t, h)| (*t, h.clone()))
            .collect()
    }
    pub fn record(&self, target: &TargetKey) -> Option<&ExpertRecord> {
        self.registry.get(target)
    }
    pub fn records(&self) -> impl Iterator<Item = &ExpertRecord> {
        self.registry.values()
    }
    pub fn pending_delta(&self, delta_id: &Hash32) -> Option<&PendingDelta> {
        self.pending.get(delta_id)
    }
    pub fn pending_deltas(&self) -> impl Iterator<Item = &PendingDelta> {
        self.pending.values()
    }
    pub fn delta_commit(&self, commitment: &Hash32) -> Option<&DeltaCommit> {
        self.delta_commits.get(commitment)
    }

    // -- transactions ---------------------------------------------------------

    /// Applies one PoL transaction sent (and signed) by `sender`. On error the
    /// state is unchanged and nothing is added to `touched`.
    pub fn apply_tx(
        &mut self,
        ctx: &PolContext,
        sender: Address,
        tx: &PolTx,
        touched: &mut Touched,
    ) -> Result<PolEffect, PolError> {
        match tx {
            PolTx::RegisterBlock(block) => self.register_block(ctx, sender, block, touched),
            PolTx::CommitDelta { commitment } => {
                self.commit_delta(ctx, sender, *commitment, touched)
            }
            PolTx::RevealDelta(block) => self.reveal_delta(ctx, sender, block, touched),
            PolTx::CommitAttestation {
                delta_id,
                commitment,
            } => self.commit_attestation(ctx, sender, delta_id, *commitment, touched),
            PolTx::RevealAttestation {
                delta_id,
                loss_micronats,
                head_loss_micronats,
                salt,
            } => {
                let loss = RevealedLoss {
                    loss_micronats: *loss_micronats,
                    head_loss_micronats: *head_loss_micronats,
                };
                self.reveal_attestation(ctx, sender, delta_id, loss, salt, touched)
            }
        }
    }

    fn register_block(
        &mut self,
        ctx: &PolContext,
        sender: Address,
        block: &PolBlock,
        touched: &mut Touched,
    ) -> Result<PolEffect, PolError> {
        if block.submitter != sender {
            return Err(PolError::NotSubmitter);
        }
        if block.block_type == PolBlockType::Delta {
            return Err(type_rule("POL-15", "deltas enter by commit and reveal"));
        }
        self.check_registration(block, ctx.params)?;
        self.insert_registered(block, ctx.height, touched);
        Ok(PolEffect::LockBond {
            owner: sender,
            amount: ctx.params.registration_bond,
        })
    }

    /// POL-10..16 for a non-delta block; no state change.
    fn check_registration(&self, block: &PolBlock, params: &PolParams) -> Result<(), PolError> {
        assert!(block.block_type != PolBlockType::Delta);
        self.check_common(block, params)?;
        if block.base_block.is_some() || block.base_version.is_some() {
            return Err(type_rule("POL-13", "only deltas name a base"));
        }
        let parents: Vec<&PolBlock> = block
            .depends_on
            .iter()
            .map(|p| self.blocks.get(p).expect("checked by check_common"))
            .collect();
        match block.block_type {
            PolBlockType::Meta => {
                // POL-11: a meta has a zero model id and depends only on metas.
                if block.model_id != [0u8; 32] {
                    return Err(type_rule("POL-11", "meta's model_id must be zero"));
                }
                if parents.iter().any(|p| p.block_type != PolBlockType::Meta) {
                    return Err(type_rule("POL-11", "meta depends only on metas"));
                }
                if block.layer.is_some() || block.expert.is_some() {
                    return Err(type_rule("POL-11", "meta has no layer or expert"));
                }
            }
            PolBlockType::Data => {
                // POL-11: data depends on nothing (zero model) or on its meta.
                let ok = if block.model_id == [0u8; 32] {
                    block.depends_on.is_empty()
                } else {
                    block.depends_on == [block.model_id] && self.is_meta(&block.model_id)
                };
                if !ok {
                    return Err(type_rule("POL-11", "data depends on nothing or its meta"));
                }
                if block.layer.is_some() || block.expert.is_some() {
                    return Err(type_rule("POL-11", "data has no layer or expert"));
                }
            }
            kind => {
                assert!(kind.is_target());
                // POL-12: a target depends exactly on its model's meta.
                if !self.is_meta(&block.model_id) || block.depends_on != [block.model_id] {
                    return Err(type_rule("POL-12", "target depends on its model's meta"));
                }
                let shape_ok = match kind {
                    PolBlockType::Expert => block.layer.is_some() && block.expert.is_some(),
                    _ => block.layer.is_some() && block.expert.is_none(),
                };
                if !shape_ok {
                    return Err(type_rule("POL-12", "wrong layer/expert fields for kind"));
                }
                if self.heads.contains_key(&block.target_key(kind)) {
                    return Err(PolError::TargetExists);
                }
            }
        }
        Ok(())
    }

    /// POL-2, POL-3, POL-4, POL-10 for any block; no state change.
    fn check_common(&self, block: &PolBlock, params: &PolParams) -> Result<(), PolError> {
        let id = block.id();
        if self.blocks.contains_key(&id) {
            return Err(PolError::DuplicateBlock(id));
        }
        if block.depends_on.len() > params.max_parents as usize {
            return Err(PolError::TooManyParents {
                count: block.depends_on.len(),
                max: params.max_parents,
            });
        }
        for (i, parent) in block.depends_on.iter().enumerate() {
            if block.depends_on[..i].contains(parent) {
                return Err(PolError::DuplicateParent(*parent));
            }
            if !self.blocks.contains_key(parent) {
                return Err(PolError::UnknownParent(*parent));
            }
        }
        if block.payload_size_bytes > params.max_payload_size_bytes {
            return Err(PolError::PayloadTooLarge {
                size: block.payload_size_bytes,
                max: params.max_payload_size_bytes,
            });
        }
        if !is_cid_v1_raw_sha256(&block.payload_cid) {
            return Err(PolError::BadCid);
        }
        Ok(())
    }

    fn is_meta(&self, id: &Hash32) -> bool {
        self.blocks
            .get(id)
            .is_some_and(|b| b.block_type == PolBlockType::Meta)
    }

    fn insert_registered(&mut self, block: &PolBlock, height: Height, touched: &mut Touched) {
        let id = block.id();
        let previous = self.blocks.insert(id, block.clone());
        assert!(previous.is_none(), "INV-POL-ACYCLIC: ids are unique");
        touched.insert(StateKey::new(ns::POL_BLOCK, id.to_vec()));
        if block.block_type.is_target() {
            let target = block.target_key(block.block_type);
            let head = TargetHead {
                block_id: id,
                version: block.version,
                loss_micronats: None,
                accepted_deltas: 0,
                cumulative_improvement_ppm: 0,
            };
            let record = ExpertRecord {
                target,
                version: block.version,
                block_hash: id,
                weight_cid: block.payload_cid.clone(),
                size_bytes: block.payload_size_bytes,
                quality_score_ppm: 0,
                usage_count: 0,
                last_updated: height,
                node_assignments: Vec::new(),
            };
            assert!(self.heads.insert(target, head).is_none());
            self.registry.insert(target, record);
            touched.insert(StateKey::new(ns::POL_HEAD, target.key_bytes()));
            touched.insert(StateKey::new(ns::POL_REGISTRY, target.key_bytes()));
        }
    }

    fn commit_delta(
        &mut self,
        ctx: &PolContext,
        sender: Address,
        commitment: Hash32,
        touched: &mut Touched,
    ) -> Result<PolEffect, PolError> {
        if self.delta_commits.contains_key(&commitment) {
            return Err(PolError::DuplicateCommitment);
        }
        if self.delta_commits.len() >= ctx.params.max_delta_commits as usize {
            return Err(PolError::TooManyCommitments(ctx.params.max_delta_commits));
        }
        let expiry = ctx
            .height
            .saturating_add(ctx.params.delta_commit_ttl_blocks);
        self.delta_commits.insert(
            commitment,
            DeltaCommit {
                submitter: sender,
                committed_height: ctx.height,
            },
        );
        self.commit_expiry.insert((expiry, commitment), ());
        touched.insert(StateKey::new(ns::POL_DELTA_COMMIT, commitment.to_vec()));
        Ok(PolEffect::None)
    }

    fn reveal_delta(
        &mut self,
        ctx: &PolContext,
        sender: Address,
        block: &PolBlock,
        touched: &mut Touched,
    ) -> Result<PolEffect, PolError> {
        if block.submitter != sender {
            return Err(PolError::NotSubmitter);
        }
        let delta_id = block.id();
        let commitment = delta_commitment(&delta_id, &sender);
        let Some(commit) = self.delta_commits.get(&commitment) else {
            return Err(PolError::NoCommitment);
        };
        assert_eq!(commit.submitter, sender, "commitment binds the submitter");
        if commit.committed_height >= ctx.height {
            return Err(PolError::RevealTooEarly);
        }
        if self.pending.contains_key(&delta_id) {
            return Err(PolError::DuplicateBlock(delta_id));
        }
        if self.pending.len() >= ctx.params.max_pending_deltas as usize {
            return Err(PolError::TooManyPending(ctx.params.max_pending_deltas));
        }
        let target = self.check_delta(block, ctx.params)?;
        // All checks passed: mutate.
        let expiry = commit
            .committed_height
            .saturating_add(ctx.params.delta_commit_ttl_blocks);
        self.delta_commits.remove(&commitment);
        assert!(self.commit_expiry.remove(&(expiry, commitment)).is_some());
        touched.insert(StateKey::new(ns::POL_DELTA_COMMIT, commitment.to_vec()));
        let commit_end_height = ctx
            .height
            .saturating_add(ctx.params.attest_commit_window_blocks);
        let reveal_end_height =
            commit_end_height.saturating_add(ctx.params.attest_reveal_window_blocks);
        let pending = PendingDelta {
            block: block.clone(),
            delta_id,
            target,
            revealed_height: ctx.height,
            commit_end_height,
            reveal_end_height,
            attestations: Vec::new(),
            model_accepted_at_reveal: self.model_accepted_count(&target.model_id),
        };
        self.pending.insert(delta_id, pending);
        self.pending_by_end
            .insert((reveal_end_height, delta_id), ());
        touched.insert(StateKey::new(ns::POL_PENDING, delta_id.to_vec()));
        Ok(PolEffect::None)
    }

    /// POL-13, POL-14: delta type rules; returns the delta's target.
    fn check_delta(&self, block: &PolBlock, params: &PolParams) -> Result<TargetKey, PolError> {
        if block.block_type != PolBlockType::Delta {
            return Err(type_rule("POL-13", "only deltas are revealed"));
        }
        self.check_common(block, params)?;
        let (Some(base), Some(base_version)) = (block.base_block, block.base_version) else {
            return Err(type_rule(
                "POL-13",
                "delta must name its base block and version",
            ));
        };
        if block.depends_on.first() != Some(&base) {
            return Err(type_rule("POL-13", "delta's first parent is its base"));
        }
        let base_block = self.blocks.get(&base).expect("parents exist (POL-10)");
        if !(base_block.block_type.is_target() || base_block.block_type == PolBlockType::Delta) {
            return Err(type_rule("POL-13", "base must be a target or a delta"));
        }
        if base_block.model_id != block.model_id
            || base_block.layer != block.layer
            || base_block.expert != block.expert
        {
            return Err(type_rule("POL-13", "delta must keep its base's target"));
        }
        // The base must be the current head of one of the targets with this
        // shape (a layer and a router of the same layer share a shape).
        let target = [
            PolBlockType::Layer,
            PolBlockType::Expert,
            PolBlockType::Router,
        ]
        .into_iter()
        .map(|kind| block.target_key(kind))
        .find(|t| self.heads.get(t).is_some_and(|h| h.block_id == base))
        .ok_or(PolError::StaleBase)?;
        let head = self.heads.get(&target).expect("found above");
        if head.version != base_version {
            return Err(type_rule(
                "POL-13",
                "base_version must be the head's version",
            ));
        }
        if Some(block.version) != base_version.bump_for_delta() {
            return Err(type_rule("POL-14", "delta version must be the bumped base"));
        }
        for parent in &block.depends_on[1..] {
            let p = self.blocks.get(parent).expect("parents exist (POL-10)");
            let data_ok = p.block_type == PolBlockType::Data
                && (p.model_id == [0u8; 32] || p.model_id == block.model_id);
            if !data_ok {
                return Err(type_rule("POL-13", "extra parents must be data blocks"));
            }
        }
        Ok(target)
    }

    fn commit_attestation(
        &mut self,
        ctx: &PolContext,
        sender: Address,
        delta_id: &Hash32,
        commitment: Hash32,
        touched: &mut Touched,
    ) -> Result<PolEffect, PolError> {
        if ctx.stakes.get(&sender).copied().unwrap_or(0) == 0 {
            return Err(PolError::NotValidator);
        }
        let pending = self
            .pending
            .get(delta_id)
            .ok_or(PolError::UnknownDelta(*delta_id))?;
        if ctx.height > pending.commit_end_height {
            return Err(PolError::OutsideWindow("commit"));
        }
        let slot = match pending
            .attestations
            .binary_search_by(|a| a.validator.cmp(&sender))
        {
            Ok(_) => return Err(PolError::AlreadyCommitted),
            Err(slot) => slot,
        };
        let max = ctx.params.max_attestations_per_delta;
        if pending.attestations.len() >= max as usize {
            return Err(PolError::TooManyAttestations(max));
        }
        let pending = self.pending.get_mut(delta_id).expect("checked above");
        pending.attestations.insert(
            slot,
            Attestation {
                validator: sender,
                commitment,
                revealed: None,
            },
        );
        touched.insert(StateKey::new(ns::POL_PENDING, delta_id.to_vec()));
        Ok(PolEffect::None)
    }

    fn reveal_attestation(
        &mut self,
        ctx: &PolContext,
        sender: Address,
        delta_id: &Hash32,
        loss: RevealedLoss,
        salt: &Hash32,
        touched: &mut Touched,
    ) -> Result<PolEffect, PolError> {
        let pending = self
            .pending
            .get(delta_id)
            .ok_or(PolError::UnknownDelta(*delta_id))?;
        if ctx.height <= pending.commit_end_height || ctx.height > pending.reveal_end_height {
            return Err(PolError::OutsideWindow("reveal"));
        }
        let Ok(slot) = pending
            .attestations
            .binary_search_by(|a| a.validator.cmp(&sender))
        else {
            return Err(PolError::NoAttestation);
        };
        let attestation = &pending.attestations[slot];
        if attestation.revealed.is_some() {
            return Err(PolError::AlreadyRevealed);
        }
        let expected = attestation_commitment(
            delta_id,
            loss.loss_micronats,
            loss.head_loss_micronats,
            salt,
            &sender,
        );
        if expected != attestation.commitment {
            return Err(PolError::RevealMismatch);
        }
        let pending = self.pending.get_mut(delta_id).expect("checked above");
        pending.attestations[slot].revealed = Some(loss);
        touched.insert(StateKey::new(ns::POL_PENDING, delta_id.to_vec()));
        Ok(PolEffect::None)
    }

    // -- end of block -----------------------------------------------------------

    /// Closes windows at `ctx.height`: expires delta commitments (POL-22) and
    /// decides every delta whose reveal window ends here (POL-33..37). Events
    /// come in order: expiries by (expiry, commitment), then decisions by
    /// (reveal end, delta id) (POL-38).
    pub fn end_block(&mut self, ctx: &PolContext, touched: &mut Touched) -> Vec<PolEvent> {
        let mut events = Vec::new();
        while let Some(((expiry, commitment), ())) = self.commit_expiry.get_min().cloned() {
            if expiry > ctx.height {
                break;
            }
            self.commit_expiry.remove(&(expiry, commitment));
            let commit = self
                .delta_commits
                .remove(&commitment)
                .expect("index and commitments agree");
            touched.insert(StateKey::new(ns::POL_DELTA_COMMIT, commitment.to_vec()));
            events.push(PolEvent::DeltaCommitExpired {
                commitment,
                submitter: commit.submitter,
            });
        }
        while let Some(((end, delta_id), ())) = self.pending_by_end.get_min().cloned() {
            if end > ctx.height {
                break;
            }
            self.pending_by_end.remove(&(end, delta_id));
            let pending = self
                .pending
                .remove(&delta_id)
                .expect("index and pending agree");
            touched.insert(StateKey::new(ns::POL_PENDING, delta_id.to_vec()));
            let decision = self.decide(ctx, pending, touched);
            events.push(PolEvent::DeltaDecided(decision));
        }
        events
    }

    /// POL-33..37 for one delta whose reveal window has closed.
    fn decide(
        &mut self,
        ctx: &PolContext,
        pending: PendingDelta,
        touched: &mut Touched,
    ) -> DeltaDecision {
        let head = self
            .heads
            .get(&pending.target)
            .expect("a pending delta's target is registered")
            .clone();
        let tally = tally(ctx, &pending.attestations);
        let data_blocks = pending.block.depends_on[1..]
            .iter()
            .map(|p| {
                let b = self.blocks.get(p).expect("parents exist (POL-10)");
                (*p, b.submitter)
            })
            .collect();
        let mut decision = DeltaDecision {
            delta_id: pending.delta_id,
            target: pending.target,
            submitter: pending.block.submitter,
            outcome: DeltaOutcome::Rejected(RejectReason::NoQuorum),
            improvement_ppm: 0,
            agreed_loss_micronats: None,
            agreed_head_loss_micronats: None,
            cumulative_improvement_before_ppm: head.cumulative_improvement_ppm,
            revealed_stake: tally.revealed_stake,
            honest_attestors: Vec::new(),
            data_blocks,
        };
        // POL-34: quorum is revealed stake ≥ 2/3 of total bonded stake.
        let quorum = ctx.total_stake > 0
            && tally.revealed_stake.saturating_mul(3) >= ctx.total_stake.saturating_mul(2);
        if quorum {
            let (loss, head_loss) = (tally.median_loss(), tally.median_head_loss());
            decision.agreed_loss_micronats = Some(loss);
            decision.agreed_head_loss_micronats = Some(head_loss);
            decision.improvement_ppm = improvement_ppm(head_loss, loss);
            decision.honest_attestors = tally.honest(loss, head_loss, ctx.params);
        }
        // POL-33: the target's head moved, or another target of the model
        // took a delta since the reveal (the model evaluated is not the
        // model the delta would join).
        let stale = head.block_id != pending.block.base_block.expect("delta")
            || self.model_accepted_count(&pending.target.model_id)
                != pending.model_accepted_at_reveal;
        decision.outcome = if stale {
            DeltaOutcome::Rejected(RejectReason::Stale) // POL-33
        } else if !quorum {
            DeltaOutcome::Rejected(RejectReason::NoQuorum) // POL-34
        } else if decision.improvement_ppm < ctx.params.min_improvement_ppm {
            DeltaOutcome::Rejected(RejectReason::InsufficientImprovement) // POL-35
        } else {
            DeltaOutcome::Accepted {
                new_version: pending.block.version,
            }
        };
        if matches!(decision.outcome, DeltaOutcome::Accepted { .. }) {
            self.accept(ctx, &pending, &decision, touched);
        }
        decision
    }

    /// POL-35: the delta becomes the target's head.
    fn accept(
        &mut self,
        ctx: &PolContext,
        pending: &PendingDelta,
        decision: &DeltaDecision,
        touched: &mut Touched,
    ) {
        let id = pending.delta_id;
        assert!(!self.blocks.contains_key(&id), "INV-POL-ACYCLIC: new id");
        let head_version = self.heads.get(&pending.target).expect("registered").version;
        assert_eq!(
            head_version.bump_for_delta(),
            Some(pending.block.version),
            "POL-14: head unchanged since reveal"
        );
        assert!(
            pending
                .block
                .depends_on
                .iter()
                .all(|p| self.blocks.contains_key(p)),
            "INV-POL-PARENTS: parents of an accepted delta exist"
        );
        self.blocks.insert(id, pending.block.clone());
        touched.insert(StateKey::new(ns::POL_BLOCK, id.to_vec()));
        let head = self.heads.get_mut(&pending.target).expect("registered");
        head.block_id = id;
        head.version = pending.block.version;
        head.loss_micronats = decision.agreed_loss_micronats;
        head.accepted_deltas = head.accepted_deltas.saturating_add(1);
        head.cumulative_improvement_ppm = head
            .cumulative_improvement_ppm
            .saturating_add(decision.improvement_ppm);
        let cumulative = head.cumulative_improvement_ppm;
        let record = self.registry.get_mut(&pending.target).expect("registered");
        record.version = pending.block.version;
        record.block_hash = id;
        record.weight_cid = pending.block.payload_cid.clone();
        record.size_bytes = pending.block.payload_size_bytes;
        record.quality_score_ppm = cumulative;
        record.last_updated = ctx.height;
        touched.insert(StateKey::new(ns::POL_HEAD, pending.target.key_bytes()));
        touched.insert(StateKey::new(ns::POL_REGISTRY, pending.target.key_bytes()));
    }

    // -- registry helpers for the ledger (POL-16) -----------------------------

    /// Adds `tokens` to a target's usage count (from settled inference receipts).
    pub fn record_usage(
        &mut self,
        ctx: &PolContext,
        target: &TargetKey,
        tokens: u64,
        touched: &mut Touched,
    ) -> Result<(), PolError> {
        let record = self
            .registry
            .get_mut(target)
            .ok_or(PolError::UnknownTarget)?;
        record.usage_count = record.usage_count.saturating_add(tokens);
        record.last_updated = ctx.height;
        touched.insert(StateKey::new(ns::POL_REGISTRY, target.key_bytes()));
        Ok(())
    }

    /// POL-16 from settled usage (TX-15): adds `tokens` to the usage count
    /// of every layer and router of `model` (a dense forward pass runs every
    /// layer for every token). Experts are not counted: which experts a token
    /// used is not reported in a settlement. Unknown models change nothing.
    pub fn record_model_usage(
        &mut self,
        height: Height,
        model: &Hash32,
        tokens: u64,
        touched: &mut Touched,
    ) {
        let targets: Vec<TargetKey> = self
            .registry
            .keys()
            .filter(|t| {
                t.model_id == *model && matches!(t.kind, PolBlockType::Layer | PolBlockType::Router)
            })
            .cloned()
            .collect();
        for target in targets {
            let record = self.registry.get_mut(&target).expect("listed");
            record.usage_count = record.usage_count.saturating_add(tokens);
            record.last_updated = height;
            touched.insert(StateKey::new(ns::POL_REGISTRY, target.key_bytes()));
        }
    }

    /// Assigns (`assign = true`) or unassigns a serving node (sorted, bounded).
    pub fn set_node_assignment(
        &mut self,
        ctx: &PolContext,
        target: &TargetKey,
        node: Address,
        assign: bool,
        touched: &mut Touched,
    ) -> Result<(), PolError> {
        self.assign_node(ctx.params, ctx.height, target, node, assign, touched)
    }

    fn assign_node(
        &mut self,
        params: &PolParams,
        height: Height,
        target: &TargetKey,
        node: Address,
        assign: bool,
        touched: &mut Touched,
    ) -> Result<(), PolError> {
        let record = self.registry.get(target).ok_or(PolError::UnknownTarget)?;
        let found = record.node_assignments.binary_search(&node);
        let max = params.max_node_assignments;
        if assign && found.is_err() && record.node_assignments.len() >= max as usize {
            return Err(PolError::TooManyAssignments(max));
        }
        let record = self.registry.get_mut(target).expect("checked above");
        match (assign, found) {
            (true, Err(slot)) => record.node_assignments.insert(slot, node),
            (false, Ok(slot)) => {
                record.node_assignments.remove(slot);
            }
            _ => return Ok(()),
        }
        record.last_updated = height;
        touched.insert(StateKey::new(ns::POL_REGISTRY, target.key_bytes()));
        Ok(())
    }

    /// POL-17: a node's registration (TX-9, `assign = true`) assigns it to
    /// the target of every layer, expert or router block among `blocks`, in
    /// the order listed; its deregistration (TX-10) unassigns it from them.
    /// Ids that are not such a block of this DAG, and targets already
    /// holding `max_node_assignments` nodes, are skipped (the registration
    /// still succeeds). Returns how many targets changed.
    pub fn assign_registered_node(
        &mut self,
        params: &PolParams,
        height: Height,
        node: Address,
        blocks: &[Hash32],
        assign: bool,
        touched: &mut Touched,
    ) -> usize {
        let targets: Vec<TargetKey> = blocks
            .iter()
            .filter_map(|id| self.blocks.get(id))
            .filter(|b| {
                matches!(
                    b.block_type,
                    PolBlockType::Layer | PolBlockType::Expert | PolBlockType::Router
                )
            })
            .map(|b| b.target_key(b.block_type))
            .collect();
        let mut changed = 0;
        for target in targets {
            let before = self.registry.get(&target).map(|r| r.node_assignments.len());
            if self
                .assign_node(params, height, &target, node, assign, touched)
                .is_ok()
                && self.registry.get(&target).map(|r| r.node_assignments.len()) != before
            {
                changed += 1;
            }
        }
        changed
    }

    // -- committed bytes (POL-K1) -------------------------------------------------

    /// Canonical bytes of the value under `key`, or `None` if absent.
    pub fn entry_bytes(&self, key: &StateKey) -> Option<Vec<u8>> {
        match key.ns {
            ns::POL_BLOCK => self.blocks.get(&hash_key(key)?).map(Canonical::encode),
            ns::POL_DELTA_COMMIT => self
                .delta_commits
                .get(&hash_key(key)?)
                .map(Canonical::encode),
            ns::POL_PENDING => self.pending.get(&hash_key(key)?).map(Canonical::encode),
            ns::POL_HEAD => self.heads.get(&target_of_key(key)?).map(Canonical::encode),
            ns::POL_REGISTRY => self
                .registry
                .get(&target_of_key(key)?)
                .map(Canonical::encode),
            _ => None,
        }
    }

    /// Every committed entry, sorted by key.
    pub fn entries(&self) -> Vec<(StateKey, Vec<u8>)> {
        let mut out = Vec::new();
        for (id, b) in &self.blocks {
            out.push((StateKey::new(ns::POL_BLOCK, id.to_vec()), b.encode()));
        }
        for (c, v) in &self.delta_commits {
            out.push((StateKey::new(ns::POL_DELTA_COMMIT, c.to_vec()), v.encode()));
        }
        for (id, p) in &self.pending {
            out.push((StateKey::new(ns::POL_PENDING, id.to_vec()), p.encode()));
        }
        for (t, h) in &self.heads {
            out.push((StateKey::new(ns::POL_HEAD, t.key_bytes()), h.encode()));
        }
        for (t, r) in &self.registry {
            out.push((StateKey::new(ns::POL_REGISTRY, t.key_bytes()), r.encode()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl PolState {
    /// Rebuilds the state from committed entries (as stored, in any order),
    /// recomputing the derived indexes. `params` must be the genesis parameters.
    pub fn from_entries(
        entries: &[(StateKey, Vec<u8>)],
        params: &PolParams,
    ) -> Result<PolState, PolError> {
        let mut state = PolState::default();
        for (key, bytes) in entries {
            let bad = || PolError::BadEntry(key.ns);
            match key.ns {
                ns::POL_BLOCK => {
                    let block = PolBlock::decode(bytes).map_err(|_| bad())?;
                    if hash_key(key) != Some(block.id()) {
                        return Err(bad());
                    }
                    state.blocks.insert(block.id(), block);
                }
                ns::POL_DELTA_COMMIT => {
                    let commit = DeltaCommit::decode(bytes).map_err(|_| bad())?;
                    let c = hash_key(key).ok_or_else(bad)?;
                    let expiry = commit
                        .committed_height
                        .saturating_add(params.delta_commit_ttl_blocks);
                    state.commit_expiry.insert((expiry, c), ());
                    state.delta_commits.insert(c, commit);
                }
                ns::POL_PENDING => {
                    let pending = PendingDelta::decode(bytes).map_err(|_| bad())?;
                    if hash_key(key) != Some(pending.delta_id) {
                        return Err(bad());
                    }
                    let index = (pending.reveal_end_height, pending.delta_id);
                    state.pending_by_end.insert(index, ());
                    state.pending.insert(pending.delta_id, pending);
                }
                ns::POL_HEAD => {
                    let target = target_of_key(key).ok_or_else(bad)?;
                    let head = TargetHead::decode(bytes).map_err(|_| bad())?;
                    state.heads.insert(target, head);
                }
                ns::POL_REGISTRY => {
                    let target = target_of_key(key).ok_or_else(bad)?;
                    let record = ExpertRecord::decode(bytes).map_err(|_| bad())?;
                    state.registry.insert(target, record);
                }
                _ => return Err(bad()),
            }
        }
        assert_eq!(state.commit_expiry.len(), state.delta_commits.len());
        assert_eq!(state.pending_by_end.len(), state.pending.len());
        Ok(state)
    }
}

fn hash_key(key: &StateKey) -> Option<Hash32> {
    key.key.as_slice().try_into().ok()
}

/// Inverse of [`TargetKey::key_bytes`]; `None` for malformed keys.
fn target_of_key(key: &StateKey) -> Option<TargetKey> {
    let k = &key.key;
    if k.len() != 43 {
        return None;
    }
    let kind = match k[32] {
        1 => PolBlockType::Layer,
        2 => PolBlockType::Expert,
        3 => PolBlockType::Router,
        _ => return None,
    };
    let opt = |at: usize| -> Option<Option<u32>> {
        let value = u32::from_be_bytes(k[at + 1..at + 5].try_into().ok()?);
        match (k[at], value) {
            (0, 0) => Some(None),
            (1, v) => Some(Some(v)),
            _ => None,
        }
    };
    let target = TargetKey {
        model_id: k[..32].try_into().ok()?,
        kind,
        layer: opt(33)?,
        expert: opt(38)?,
    };
    (target.key_bytes() == *k).then_some(target)
}

// ---------------------------------------------------------------------------
// Tally (POL-34..36)
// ---------------------------------------------------------------------------

/// Revealed attestations with positive stake at decision time.
struct Tally {
    /// (validator, stake, losses), sorted by validator.
    reveals: Vec<(Address, Amount, RevealedLoss)>,
    revealed_stake: Amount,
}

fn tally(ctx: &PolContext, attestations: &[Attestation]) -> Tally {
    let reveals: Vec<(Address, Amount, RevealedLoss)> = attestations
        .iter()
        .filter_map(|a| {
            let loss = a.revealed?;
            let stake = ctx.stakes.get(&a.validator).copied().unwrap_or(0);
            (stake > 0).then_some((a.validator, stake, loss))
        })
        .collect();
    let revealed_stake = reveals
        .iter()
        .fold(0u128, |sum, (_, s, _)| sum.saturating_add(*s));
    assert!(
        revealed_stake <= ctx.total_stake,
        "ledger invariant: total_stake is the sum of stakes"
    );
    Tally {
        reveals,
        revealed_stake,
    }
}

impl Tally {
    fn median_loss(&self) -> u64 {
        let values: Vec<(u64, Amount)> = self
            .reveals
            .iter()
            .map(|(_, s, l)| (l.loss_micronats, *s))
            .collect();
        stake_weighted_median(&values).expect("quorum implies a positive revealed stake")
    }

    fn median_head_loss(&self) -> u64 {
        let values: Vec<(u64, Amount)> = self
            .reveals
            .iter()
            .map(|(_, s, l)| (l.head_loss_micronats, *s))
            .collect();
        stake_weighted_median(&values).expect("quorum implies a positive revealed stake")
    }

    /// POL-36: reveals within tolerance of both medians.
    fn honest(&self, loss: u64, head_loss: u64, params: &PolParams) -> Vec<(Address, Amount)> {
        let tol = params.attestation_tolerance_ppm;
        self.reveals
            .iter()
            .filter(|(_, _, l)| {
                within_tolerance(l.loss_micronats, loss, tol)
                    && within_tolerance(l.head_loss_micronats, head_loss, tol)
            })
            .map(|(a, s, _)| (*a, *s))
            .collect()
    }
}

/// POL-34: lower stake-weighted median. Entries with zero weight are ignored;
/// the rest are sorted by value; the result is the smallest value `v` such
/// that the weight of entries with value ≤ `v`, doubled, is at least the total
/// weight. `None` if the total weight is zero.
pub fn stake_weighted_median(values: &[(u64, Amount)]) -> Option<u64> {
    let mut sorted: Vec<(u64, Amount)> = values.iter().copied().filter(|v| v.1 > 0).collect();
    sorted.sort_unstable();
    let total = sorted.iter().fold(0u128, |s, v| s.saturating_add(v.1));
    if total == 0 {
        return None;
    }
    let mut cumulative: u128 = 0;
    for (value, weight) in &sorted {
        cumulative = cumulative.saturating_add(*weight);
        // cumulative * 2 >= total, without overflow.
        if cumulative >= total - total / 2 {
            return Some(*value);
        }
    }
    unreachable!("the full cumulative weight reaches the total")
}

/// POL-35: `floor((head − loss) · 10^6 / head)`, or 0 if `loss ≥ head`.
pub fn improvement_ppm(head_loss_micronats: u64, loss_micronats: u64) -> u64 {
    if loss_micronats >= head_loss_micronats {
        return 0;
    }
    let gain = u128::from(head_loss_micronats - loss_micronats);
    let ppm = gain * u128::from(PPM) / u128::from(head_loss_micronats);
    assert!(ppm <= u128::from(PPM));
    ppm as u64
}

/// POL-36: `|value − median| · 10^6 ≤ tolerance_ppm · median`.
pub fn within_tolerance(value: u64, median: u64, tolerance_ppm: u64) -> bool {
    let distance = u128::from(value.abs_diff(median));
    distance * u128::from(PPM) <= u128::from(tolerance_ppm) * u128::from(median)
}

pub mod delta;
pub mod validation;

#[cfg(test)]
mod tests;
