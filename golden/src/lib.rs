//! Golden scenarios for the deterministic core (GOLDEN-1).
//!
//! Each scenario is a genesis plus a list of blocks built by the real
//! proposer path. [`generate`] runs them and records, per block, the canonical
//! block bytes, the block hash, the state root and the receipts. The files in
//! `golden/vectors/` are the output of `cargo run -p blyan-golden -- regen`;
//! tests replay the recorded block bytes from genesis through
//! `Ledger::apply_block` and require the recorded roots and receipts, and
//! require that regeneration reproduces the files byte for byte. Change the
//! files only deliberately, and say why in the commit.

use blyan_state_machine::block::{Block, Misbehaviour};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::params::Params;
use blyan_state_machine::testkit::{address, next_block, next_block_with, testnet, transfer, tx};
use blyan_state_machine::tx::{InferenceReceipt, NodeInfo, SignedTx, TxKind};
use blyan_state_machine::types::BLY;
use serde::{Deserialize, Serialize};

pub mod delta_format;

const CHAIN: &str = "blyan-test";
const FEE: u128 = 100_000_000_000;

/// One block's expected outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    pub height: u64,
    pub block_hex: String,
    pub block_hash: String,
    pub state_root: String,
    pub receipts: Vec<ExpectedReceipt>,
    pub events: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedReceipt {
    pub tx_id: String,
    pub gas_used: u64,
    pub fee_paid: String,
    pub failure: Option<String>,
}

/// A scenario file (`golden/vectors/<name>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub genesis: Genesis,
    pub genesis_hash: String,
    pub genesis_state_root: String,
    pub blocks: Vec<Expected>,
}

/// What a scenario step puts in the next block.
enum Step {
    Txs(Vec<SignedTx>),
    /// Transactions, a validator that does not sign (None: all of the previous
    /// set sign) and evidence.
    Full(
        Vec<SignedTx>,
        Option<blyan_state_machine::types::Address>,
        Vec<Misbehaviour>,
    ),
}

fn record(name: &str, description: &str, genesis: Genesis, steps: Vec<Step>) -> Scenario {
    let mut ledger = Ledger::from_genesis(&genesis).expect("scenario genesis is valid");
    let mut blocks = Vec::new();
    let genesis_state_root = hex::encode(ledger.state_root());
    for step in steps {
        let (block, next) = match step {
            Step::Txs(txs) => next_block(&ledger, &txs),
            Step::Full(txs, signers, evidence) => {
                let set = ledger.last_active_set().to_vec();
                let signers = set
                    .iter()
                    .map(|(a, _)| *a)
                    .filter(|a| Some(*a) != signers)
                    .collect();
                next_block_with(&ledger, &txs, signers, evidence)
            }
        }
        .expect("scenario blocks are valid");
        blocks.push(expected(&ledger, &block));
        ledger = next;
    }
    Scenario {
        name: name.into(),
        description: description.into(),
        genesis_hash: hex::encode(genesis.hash()),
        genesis,
        genesis_state_root,
        blocks,
    }
}

fn expected(before: &Ledger, block: &Block) -> Expected {
    let (after, outcome) = before.apply_block(block).expect("valid");
    Expected {
        height: block.header.height,
        block_hex: hex::encode(block.encode()),
        block_hash: hex::encode(block.hash()),
        state_root: hex::encode(after.state_root()),
        receipts: outcome
            .receipts
            .iter()
            .map(|r| ExpectedReceipt {
                tx_id: hex::encode(r.tx_id),
                gas_used: r.gas_used,
                fee_paid: r.fee_paid.to_string(),
                failure: r.failure.clone(),
            })
            .collect(),
        events: outcome.events.iter().map(|e| format!("{e:?}")).collect(),
    }
}

fn small_params() -> Params {
    Params {
        epoch_length_blocks: 4,
        unbonding_period_blocks: 6,
        max_evidence_age_blocks: 5,
        signed_blocks_window: 4,
        downtime_jail_blocks: 3,
        ..Params::default()
    }
}

/// Every scenario, in a fixed order.
pub fn generate() -> Vec<Scenario> {
    vec![
        transfers(),
        staking_and_slashing(),
        inference_and_nodes(),
        pol_delta(),
        paid_inference(),
    ]
}

fn transfers() -> Scenario {
    let net = testnet(4, 3, small_params());
    let a = &net.accounts;
    let to = |i: usize| address(&a[i]);
    let steps = vec![
        Step::Txs(vec![
            transfer(CHAIN, &a[0], 0, to(1), 10 * BLY),
            transfer(CHAIN, &a[1], 0, to(2), 3 * BLY),
            // Fails in execution: more than the balance. Pays its fee.
            transfer(CHAIN, &a[2], 0, to(0), 5_000_000 * BLY),
        ]),
        Step::Txs(vec![
            transfer(CHAIN, &a[0], 1, to(2), BLY),
            transfer(CHAIN, &a[0], 2, to(1), BLY),
            // Skipped by the proposer: nonce gap.
            transfer(CHAIN, &a[0], 9, to(1), BLY),
        ]),
        Step::Txs(vec![]),
    ];
    record(
        "transfers",
        "Transfers, a failed transfer paying its fee, a skipped nonce gap, base fee moving.",
        net.genesis,
        steps,
    )
}

fn staking_and_slashing() -> Scenario {
    let net = testnet(4, 2, small_params());
    let v = &net.validators;
    let a = &net.accounts;
    let lazy = address(&v[3]);
    let steps = vec![
        Step::Txs(vec![
            tx(
                CHAIN,
                &a[0],
                0,
                TxKind::Bond {
                    amount: 20_000 * BLY,
                },
                FEE,
            ),
            // TX-16: the new validator's VRF key (CONS-COMM-8): its stake
            // enters the committee draw of epoch 2 (CONS-COMM-7); a second
            // registration fails (the key is set once).
            tx(
                CHAIN,
                &a[0],
                1,
                TxKind::SetVrfKey {
                    public_key: blyan_state_machine::consensus::vrf_public_key(&a[0]),
                },
                FEE,
            ),
            tx(
                CHAIN,
                &a[0],
                2,
                TxKind::SetVrfKey {
                    public_key: blyan_state_machine::consensus::vrf_public_key(&a[1]),
                },
                FEE,
            ),
            tx(
                CHAIN,
                &v[2],
                0,
                TxKind::Unbond {
                    amount: 2_000 * BLY,
                },
                FEE,
            ),
        ]),
        // Validator 3 misses commits 2, 3 and 5: more than 2 of a 4-block window (SLASH-2).
        Step::Full(vec![], Some(lazy), vec![]),
        Step::Full(
            vec![],
            Some(lazy),
            vec![blyan_state_machine::testkit::double_sign(
                &net.genesis.chain_id,
                &v[2],
                1,
                0,
            )],
        ),
        Step::Full(vec![], None, vec![]),
        Step::Full(vec![], Some(lazy), vec![]),
        Step::Full(vec![], None, vec![]),
        Step::Full(vec![], None, vec![]),
        Step::Full(vec![], None, vec![]),
        Step::Full(vec![], None, vec![]),
    ];
    record(
        "staking_and_slashing",
        "Bonding and a VRF key (the committee across epochs), unbonding, double-sign slashing reaching unbonding stake, downtime jailing, release.",
        net.genesis,
        steps,
    )
}

fn inference_and_nodes() -> Scenario {
    let net = testnet(4, 3, small_params());
    let a = &net.accounts;
    let receipt = InferenceReceipt {
        node: address(&a[1]),
        request_id: [9; 32],
        tokens: 1_500,
        price_per_1k_tokens: 2 * BLY,
        quality_milli: 1_200,
        expires_at_height: 5,
    }
    .sign(CHAIN, &a[0]);
    let info = NodeInfo {
        endpoint: "10.0.0.2:7100".into(),
        blocks: vec![[3; 32], [4; 32]],
    };
    let steps = vec![
        Step::Txs(vec![tx(
            CHAIN,
            &a[1],
            0,
            TxKind::RegisterNode {
                info: Box::new(info),
                bond: 100 * BLY,
            },
            FEE,
        )]),
        Step::Txs(vec![
            tx(
                CHAIN,
                &a[1],
                1,
                TxKind::SettleInference {
                    receipt: Box::new(receipt.clone()),
                },
                FEE,
            ),
            // Replayed receipt: fails, pays its fee.
            tx(
                CHAIN,
                &a[1],
                2,
                TxKind::SettleInference {
                    receipt: Box::new(receipt),
                },
                FEE,
            ),
        ]),
        Step::Txs(vec![tx(CHAIN, &a[1], 3, TxKind::DeregisterNode, FEE)]),
    ];
    record(
        "inference_and_nodes",
        "GPU node registration and deregistration, receipt settlement once.",
        net.genesis,
        steps,
    )
}

/// TX-13..TX-15: an allowance opened, usage settled over a two-node route,
/// a replayed request and an over-cap batch refused, revocation, and the
/// refund after the grace period (ALW-4).
fn paid_inference() -> Scenario {
    use blyan_state_machine::allowance::{AllowanceTerms, RouteShare, Settlement, UsageItem};
    let mut params = small_params();
    params.allowance_grace_blocks = 2;
    params.max_allowance_blocks = 100;
    let net = testnet(4, 3, params);
    let a = &net.accounts;
    let opening = tx(
        CHAIN,
        &a[0],
        0,
        TxKind::OpenAllowance(Box::new(AllowanceTerms {
            cap: 5 * BLY,
            node_caps: Vec::new(),
            expires_at: 50,
        })),
        FEE,
    );
    let id = opening.id();
    let mut route = vec![
        RouteShare {
            node: address(&a[1]),
            work: 2,
        },
        RouteShare {
            node: address(&a[2]),
            work: 1,
        },
    ];
    route.sort_by_key(|s| s.node);
    let item = |request: u8, prompt: u64, completion: u64| UsageItem {
        request_id: [request; 32],
        model: [0x77; 32],
        prompt_tokens: prompt,
        completion_tokens: completion,
        route: route.clone(),
    };
    let settle = |nonce: u64, items: Vec<UsageItem>| {
        tx(
            CHAIN,
            &a[1],
            nonce,
            TxKind::SettleUsage(Box::new(Settlement {
                allowance: id,
                items,
            })),
            FEE,
        )
    };
    let steps = vec![
        Step::Txs(vec![opening]),
        Step::Txs(vec![
            settle(0, vec![item(1, 700, 301), item(2, 13, 0)]),
            // INV-RECEIPT-ONCE: request 2 again fails and pays its fee.
            settle(1, vec![item(2, 13, 0)]),
            // INV-ALW-CAP: 4.5 BLY more than the 3.986 left.
            settle(2, vec![item(3, 4_000, 500)]),
        ]),
        Step::Txs(vec![tx(
            CHAIN,
            &a[0],
            1,
            TxKind::CloseAllowance { allowance: id },
            FEE,
        )]),
        // Within the grace period, then the refund.
        Step::Txs(vec![settle(3, vec![item(4, 100, 100)])]),
        Step::Txs(vec![]),
        Step::Txs(vec![]),
    ];
    record(
        "paid_inference",
        "Allowance opened, usage settled over a route, replay and over-cap refused, revoked, refunded after the grace period.",
        net.genesis,
        steps,
    )
}

fn pol_delta() -> Scenario {
    use blyan_state_machine::pol::{
        PolBlockType, PolTx, SemVer, attestation_commitment, delta_commitment,
    };
    use blyan_state_machine::testkit::pol_block;
    let mut params = small_params();
    params.pol.attest_commit_window_blocks = 1;
    params.pol.attest_reveal_window_blocks = 1;
    params.rewards.epoch_length_blocks = 8;
    let mut net = testnet(4, 2, params);
    let author = address(&net.accounts[0]);
    let meta = pol_block(
        PolBlockType::Meta,
        [0; 32],
        vec![],
        b"{\"model_type\":\"qwen3\"}",
        author,
    );
    let mut layer = pol_block(
        PolBlockType::Layer,
        meta.id(),
        vec![meta.id()],
        b"layer 0 weights",
        author,
    );
    layer.layer = Some(0);
    net.genesis.pol_blocks = vec![meta.clone(), layer.clone()];
    let miner = &net.accounts[1];
    let mut delta = pol_block(
        PolBlockType::Delta,
        meta.id(),
        vec![layer.id()],
        b"delta",
        address(miner),
    );
    delta.layer = Some(0);
    delta.version = SemVer {
        major: 1,
        minor: 1,
        patch: 0,
    };
    delta.base_block = Some(layer.id());
    delta.base_version = Some(layer.version);
    let id = delta.id();
    let pol = |p: PolTx| TxKind::Pol(Box::new(p));
    let salt = |i: usize| [i as u8 + 1; 32];
    let attest_commits = net
        .validators
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let c =
                attestation_commitment(&id, 980_000 + i as u64, 1_000_000, &salt(i), &address(v));
            tx(
                CHAIN,
                v,
                0,
                pol(PolTx::CommitAttestation {
                    delta_id: id,
                    commitment: c,
                }),
                FEE,
            )
        })
        .collect();
    let attest_reveals = net
        .validators
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let r = PolTx::RevealAttestation {
                delta_id: id,
                loss_micronats: 980_000 + i as u64,
                head_loss_micronats: 1_000_000,
                salt: salt(i),
            };
            tx(CHAIN, v, 1, pol(r), FEE)
        })
        .collect();
    let steps = vec![
        Step::Txs(vec![tx(
            CHAIN,
            miner,
            0,
            pol(PolTx::CommitDelta {
                commitment: delta_commitment(&id, &address(miner)),
            }),
            FEE,
        )]),
        Step::Txs(vec![tx(
            CHAIN,
            miner,
            1,
            pol(PolTx::RevealDelta(delta)),
            FEE,
        )]),
        Step::Txs(attest_commits),
        Step::Txs(attest_reveals),
        Step::Txs(vec![]),
        Step::Txs(vec![]),
        Step::Txs(vec![]),
        Step::Txs(vec![]),
    ];
    record(
        "pol_delta",
        "A delta committed, revealed, attested by every validator (2% better), accepted, and rewards minted at the epoch boundary.",
        net.genesis,
        steps,
    )
}

/// A readable summary of a scenario, for insta snapshots.
pub fn summary(s: &Scenario) -> String {
    let mut out = format!(
        "{}: {}\ngenesis {}\nroot0   {}\n",
        s.name, s.description, s.genesis_hash, s.genesis_state_root
    );
    for b in &s.blocks {
        out += &format!(
            "#{} hash {} root {}\n",
            b.height,
            &b.block_hash[..16],
            &b.state_root[..16]
        );
        for r in &b.receipts {
            out += &format!(
                "  tx {} gas {} fee {} {}\n",
                &r.tx_id[..12],
                r.gas_used,
                r.fee_paid,
                r.failure.as_deref().unwrap_or("ok")
            );
        }
        for e in &b.events {
            out += &format!("  event {e}\n");
        }
    }
    out
}

/// Replays a scenario's recorded block bytes from its genesis and returns the
/// first mismatch, if any (GOLDEN-2).
pub fn check(s: &Scenario) -> Result<(), String> {
    let mut ledger = Ledger::from_genesis(&s.genesis).map_err(|e| e.to_string())?;
    if hex::encode(s.genesis.hash()) != s.genesis_hash {
        return Err("genesis hash differs".into());
    }
    if hex::encode(ledger.state_root()) != s.genesis_state_root {
        return Err("genesis state root differs".into());
    }
    for exp in &s.blocks {
        let bytes = hex::decode(&exp.block_hex).map_err(|e| e.to_string())?;
        let block = Block::decode(&bytes).map_err(|e| format!("block {}: {e}", exp.height))?;
        let (next, outcome) = ledger
            .apply_block(&block)
            .map_err(|e| format!("block {}: {e}", exp.height))?;
        let got = expected(&ledger, &block);
        if got != *exp {
            return Err(format!(
                "block {} differs: expected {exp:?}, got {got:?}",
                exp.height
            ));
        }
        assert_eq!(outcome.receipts.len(), exp.receipts.len());
        ledger = next;
    }
    Ok(())
}

/// SIG-4: a pinned signing vector, so a client in another language can check
/// that it produces the same bytes, digest and signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningVector {
    pub name: String,
    pub chain_id: String,
    pub private_key: String,
    pub public_key: String,
    pub address: String,
    pub object: String,
    pub body_hex: String,
    pub signing_bytes_hex: String,
    pub sha3_256: String,
    pub signature: String,
}

/// The signing vectors of every message type defined so far.
pub fn signing_vectors() -> Vec<SigningVector> {
    use blyan_state_machine::crypto::{sha3_256, sign};
    use blyan_state_machine::tx::{Domain, TxBody, public_key_of, signing_bytes};
    let k = blyan_state_machine::testkit::key(1);
    let vector = |name: &str, domain: Domain, object: String, body: Vec<u8>| {
        let bytes = signing_bytes(domain, CHAIN, &body);
        SigningVector {
            name: name.into(),
            chain_id: CHAIN.into(),
            private_key: hex::encode(k.to_bytes()),
            public_key: hex::encode(public_key_of(&k)),
            address: address(&k).to_string(),
            object,
            body_hex: hex::encode(&body),
            signing_bytes_hex: hex::encode(&bytes),
            sha3_256: hex::encode(sha3_256(&bytes)),
            signature: hex::encode(sign(&k, &bytes)),
        }
    };
    let body = TxBody {
        nonce: 7,
        gas_limit: 21_000,
        max_fee_per_gas: 2_000_000_000,
        max_priority_fee_per_gas: 1_000_000,
        kind: TxKind::Transfer {
            to: address(&blyan_state_machine::testkit::key(2)),
            amount: 1_500_000_000_000_000_000,
        },
    };
    let receipt = InferenceReceipt {
        node: address(&blyan_state_machine::testkit::key(2)),
        request_id: [0xab; 32],
        tokens: 1_000,
        price_per_1k_tokens: BLY,
        quality_milli: 1_000,
        expires_at_height: 100,
    };
    // API-KEY-1: the grant an allowance owner signs.
    let grant = blyan_state_machine::allowance::ApiKeyGrant {
        allowance: [0x5a; 32],
        key_index: 3,
    };
    // CONS-SIG-2: votes and proposals sign the same way under their own tags.
    use blyan_state_machine::consensus::{Proposal, Vote, VoteType};
    let vote = Vote {
        vote_type: VoteType::Precommit,
        height: 42,
        round: 1,
        value: Some([0xcd; 32]),
        validator: address(&k),
    };
    let nil_vote = Vote {
        vote_type: VoteType::Prevote,
        value: None,
        ..vote.clone()
    };
    let proposal = Proposal {
        height: 42,
        round: 1,
        value: [0xcd; 32],
        valid_round: Some(0),
        proposer: address(&k),
    };
    vec![
        vector(
            "transaction_transfer",
            Domain::Transaction,
            format!("{body:?}"),
            body.encode(),
        ),
        vector(
            "inference_receipt",
            Domain::Receipt,
            format!("{receipt:?}"),
            receipt.encode(),
        ),
        vector(
            "api_key_grant",
            Domain::ApiKey,
            format!("{grant:?}"),
            grant.encode(),
        ),
        vector(
            "consensus_precommit",
            Domain::Vote,
            format!("{vote:?}"),
            vote.signing_body(),
        ),
        vector(
            "consensus_nil_prevote",
            Domain::Vote,
            format!("{nil_vote:?}"),
            nil_vote.signing_body(),
        ),
        vector(
            "consensus_proposal",
            Domain::Proposal,
            format!("{proposal:?}"),
            proposal.signing_body(),
        ),
    ]
}
