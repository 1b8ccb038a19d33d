//! Strategies for valid protocol values (issue 18, structure-aware fuzzing):
//! every transaction kind, blocks with such transactions and evidence, and
//! every wire message, with arbitrary fields (real public keys or arbitrary
//! 33-byte strings, arbitrary signatures: the decoders check structure, not
//! signatures). The composite strategies are boxed: unboxed, their value
//! trees are large enough to overflow a test thread's stack in a crate
//! built without optimisation (the runtime's tests).
//!
//! Shared by the state machine's and the runtime's fuzz tests (the runtime
//! includes this file with `#[path]`).
#![allow(dead_code)]

use blyan_state_machine::block::{Block, BlockBody, BlockHeader, Misbehaviour, SignedVote};
use blyan_state_machine::consensus::{CommitCertificate, Proposal, Signed, Vote, VoteType};
use blyan_state_machine::node::{CommittedBlock, Sig, WireMessage};
use blyan_state_machine::pol::{PolBlock, PolBlockType, PolTx, SemVer};
use blyan_state_machine::tx::{
    InferenceReceipt, NodeInfo, PublicKey, SignedReceipt, SignedTx, TxBody, TxKind, public_key_of,
};
use blyan_state_machine::types::{Address, Hash32};
use proptest::prelude::*;
use std::sync::OnceLock;

/// Public keys of `testkit::key(0..8)` (valid curve points).
pub fn real_public_keys() -> &'static [PublicKey] {
    static KEYS: OnceLock<Vec<PublicKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..8)
            .map(|i| public_key_of(&blyan_state_machine::testkit::key(i)))
            .collect()
    })
}

pub fn hash() -> impl Strategy<Value = Hash32> {
    prop_oneof![
        4 => any::<[u8; 32]>(),
        1 => Just([0u8; 32]),
        1 => Just([0xffu8; 32]),
    ]
}

pub fn address() -> impl Strategy<Value = Address> {
    prop_oneof![
        4 => any::<[u8; 20]>().prop_map(Address),
        1 => Just(Address::ZERO),
    ]
}

pub fn public_key() -> impl Strategy<Value = PublicKey> {
    prop_oneof![
        3 => (0..8usize).prop_map(|i| real_public_keys()[i]),
        1 => any::<[u8; 33]>(),
        1 => (prop_oneof![Just(2u8), Just(3u8)], any::<[u8; 32]>()).prop_map(|(p, x)| {
            let mut k = [0u8; 33];
            k[0] = p;
            k[1..].copy_from_slice(&x);
            k
        }),
    ]
}

pub fn signature() -> impl Strategy<Value = [u8; 64]> {
    prop_oneof![
        4 => any::<[u8; 64]>(),
        1 => Just([0u8; 64]),
    ]
}

pub fn amount() -> impl Strategy<Value = u128> {
    prop_oneof![
        3 => 0u128..1_000_000_000_000_000_000_000,
        1 => any::<u128>(),
        1 => prop::sample::select(vec![0u128, 1, u128::MAX, u128::MAX / 2, u64::MAX as u128]),
    ]
}

pub fn u64_edge() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..1_000_000,
        2 => any::<u64>(),
        1 => prop::sample::select(vec![0u64, 1, u64::MAX, u32::MAX as u64, i64::MAX as u64]),
    ]
}

/// Text fields: empty, short, non-ASCII, occasionally long.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9:./-]{0,24}",
        2 => "\\PC{0,16}",
        1 => "[a-zA-Z0-9]{200,300}",
    ]
}

pub fn semver() -> impl Strategy<Value = SemVer> {
    (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(a, b, c)| SemVer::new(a, b, c))
}

pub fn pol_block_type() -> impl Strategy<Value = PolBlockType> {
    prop::sample::select(vec![
        PolBlockType::Meta,
        PolBlockType::Layer,
        PolBlockType::Expert,
        PolBlockType::Router,
        PolBlockType::Data,
        PolBlockType::Delta,
    ])
}

pub fn pol_block() -> BoxedStrategy<PolBlock> {
    (
        (
            pol_block_type(),
            hash(),
            prop::collection::vec(hash(), 0..4),
            semver(),
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u32>()),
        ),
        (
            u64_edge(),
            hash(),
            text(),
            address(),
            prop::option::of(hash()),
            prop::option::of(semver()),
        ),
    )
        .prop_map(
            |(
                (block_type, model_id, depends_on, version, layer, expert),
                (
                    payload_size_bytes,
                    payload_merkle_root,
                    payload_cid,
                    submitter,
                    base_block,
                    base_version,
                ),
            )| PolBlock {
                block_type,
                model_id,
                depends_on,
                version,
                layer,
                expert,
                payload_size_bytes,
                payload_merkle_root,
                payload_cid,
                submitter,
                base_block,
                base_version,
            },
        )
        .boxed()
}

pub fn pol_tx() -> BoxedStrategy<PolTx> {
    prop_oneof![
        pol_block().prop_map(PolTx::RegisterBlock),
        hash().prop_map(|commitment| PolTx::CommitDelta { commitment }),
        pol_block().prop_map(PolTx::RevealDelta),
        (hash(), hash()).prop_map(|(delta_id, commitment)| PolTx::CommitAttestation {
            delta_id,
            commitment
        }),
        (hash(), u64_edge(), u64_edge(), hash()).prop_map(
            |(delta_id, loss_micronats, head_loss_micronats, salt)| PolTx::RevealAttestation {
                delta_id,
                loss_micronats,
                head_loss_micronats,
                salt,
            }
        ),
    ]
    .boxed()
}

pub fn signed_receipt() -> BoxedStrategy<SignedReceipt> {
    (
        address(),
        hash(),
        u64_edge(),
        amount(),
        any::<u32>(),
        u64_edge(),
        public_key(),
        signature(),
    )
        .prop_map(
            |(node, request_id, tokens, price, quality_milli, expires, key, sig)| SignedReceipt {
                receipt: InferenceReceipt {
                    node,
                    request_id,
                    tokens,
                    price_per_1k_tokens: price,
                    quality_milli,
                    expires_at_height: expires,
                },
                client_public_key: key,
                signature: sig,
            },
        )
        .boxed()
}

/// Every [`TxKind`].
pub fn tx_kind() -> BoxedStrategy<TxKind> {
    prop_oneof![
        3 => (address(), amount()).prop_map(|(to, amount)| TxKind::Transfer { to, amount }),
        1 => amount().prop_map(|amount| TxKind::Bond { amount }),
        1 => amount().prop_map(|amount| TxKind::Unbond { amount }),
        1 => Just(TxKind::Unjail),
        1 => signed_receipt().prop_map(|r| TxKind::SettleInference { receipt: Box::new(r) }),
        1 => (text(), prop::collection::vec(hash(), 0..4), amount()).prop_map(|(endpoint, blocks, bond)| {
            TxKind::RegisterNode { info: Box::new(NodeInfo { endpoint, blocks }), bond }
        }),
        1 => Just(TxKind::DeregisterNode),
        2 => pol_tx().prop_map(|p| TxKind::Pol(Box::new(p))),
    ]
    .boxed()
}

pub fn signed_tx() -> BoxedStrategy<SignedTx> {
    (
        u64_edge(),
        u64_edge(),
        amount(),
        amount(),
        tx_kind(),
        public_key(),
        signature(),
    )
        .prop_map(
            |(nonce, gas_limit, max_fee, tip, kind, public_key, signature)| SignedTx {
                body: TxBody {
                    nonce,
                    gas_limit,
                    max_fee_per_gas: max_fee,
                    max_priority_fee_per_gas: tip,
                    kind,
                },
                public_key,
                signature,
            },
        )
        .boxed()
}

pub fn vote() -> impl Strategy<Value = Vote> {
    (
        prop::sample::select(vec![VoteType::Prevote, VoteType::Precommit]),
        u64_edge(),
        any::<u32>(),
        prop::option::of(hash()),
        address(),
    )
        .prop_map(|(vote_type, height, round, value, validator)| Vote {
            vote_type,
            height,
            round,
            value,
            validator,
        })
}

pub fn proposal() -> impl Strategy<Value = Proposal> {
    (
        u64_edge(),
        any::<u32>(),
        hash(),
        prop::option::of(any::<u32>()),
        address(),
    )
        .prop_map(|(height, round, value, valid_round, proposer)| Proposal {
            height,
            round,
            value,
            valid_round,
            proposer,
        })
}

pub fn signed_vote() -> impl Strategy<Value = Signed<Vote, Sig>> {
    (vote(), signature()).prop_map(|(message, signature)| Signed { message, signature })
}

pub fn misbehaviour() -> BoxedStrategy<Misbehaviour> {
    (vote(), signature(), vote(), signature())
        .prop_map(|(a, sa, b, sb)| Misbehaviour::DuplicateVote {
            vote_a: SignedVote {
                vote: a,
                signature: sa,
            },
            vote_b: SignedVote {
                vote: b,
                signature: sb,
            },
        })
        .boxed()
}

pub fn header() -> BoxedStrategy<BlockHeader> {
    (
        (u64_edge(), u64_edge(), hash(), address(), amount()),
        (u64_edge(), u64_edge(), hash(), hash(), hash()),
        proptest::option::of(proptest::array::uniform32(any::<u8>())),
    )
        .prop_map(
            |(
                (height, time_ms, prev_hash, proposer, base_fee_per_gas),
                (gas_limit, gas_used, body_hash, state_root, receipts_hash),
                ticket_head,
            )| BlockHeader {
                height,
                time_ms,
                prev_hash,
                proposer,
                ticket: ticket_head.map(|head| {
                    let mut proof = [0u8; 81];
                    proof[..32].copy_from_slice(&head);
                    proof
                }),
                base_fee_per_gas,
                gas_limit,
                gas_used,
                body_hash,
                state_root,
                receipts_hash,
            },
        )
        .boxed()
}

/// Blocks of up to `max_txs` transactions.
pub fn block(max_txs: usize) -> BoxedStrategy<Block> {
    (
        header(),
        prop::collection::vec(misbehaviour(), 0..2),
        prop::collection::vec(address(), 0..5),
        prop::collection::vec(signed_tx(), 0..=max_txs),
    )
        .prop_map(|(header, evidence, last_commit_signers, txs)| Block {
            header,
            body: BlockBody {
                evidence,
                last_commit_signers,
                txs,
            },
        })
        .boxed()
}

pub fn certificate() -> BoxedStrategy<CommitCertificate<Sig>> {
    (
        u64_edge(),
        any::<u32>(),
        hash(),
        prop::collection::vec((address(), signature()), 0..5),
    )
        .prop_map(|(height, round, value, signatures)| CommitCertificate {
            height,
            round,
            value,
            signatures,
        })
        .boxed()
}

pub fn committed_block() -> BoxedStrategy<CommittedBlock> {
    (block(3), certificate())
        .prop_map(|(block, certificate)| CommittedBlock { block, certificate })
        .boxed()
}

/// Every [`WireMessage`] variant.
pub fn wire_message() -> BoxedStrategy<WireMessage> {
    prop_oneof![
        2 => (proposal(), signature(), block(4), prop::option::of(certificate())).prop_map(
            |(p, s, block, last_commit)| WireMessage::Proposal {
                proposal: Signed { message: p, signature: s },
                block: Box::new(block),
                last_commit,
            }
        ),
        3 => signed_vote().prop_map(WireMessage::Vote),
        3 => signed_tx().prop_map(|t| WireMessage::Tx(Box::new(t))),
        1 => u64_edge().prop_map(|from_height| WireMessage::BlockRequest { from_height }),
        1 => prop::collection::vec(committed_block(), 0..3).prop_map(WireMessage::Blocks),
        1 => (
            u64_edge(),
            any::<u32>(),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..20),
            prop::collection::vec(any::<u8>(), 0..20),
        )
            .prop_map(|(height, round, has_proposal, prevotes, precommits)| {
                WireMessage::Status(blyan_state_machine::node::PeerStatus {
                    height,
                    round,
                    has_proposal,
                    prevotes,
                    precommits,
                })
            }),
    ]
    .boxed()
}
