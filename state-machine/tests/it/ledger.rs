//! LEDGER-*, TX-*, BLOCK-*, STAKE-*, SLASH-*, GEN-* scenarios.
use blyan_state_machine::block::{Event, Misbehaviour};
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::params::{Params, gas};
use blyan_state_machine::testkit::{
    TestNet, address, double_sign, key, next_block, next_block_with, testnet, transfer, tx,
};
use blyan_state_machine::tx::{InferenceReceipt, NodeInfo, TxKind};
use blyan_state_machine::types::BLY;
use blyan_state_machine::{Error, TxError};

const CHAIN: &str = "blyan-test";
const FEE: u128 = 100_000_000_000;

fn net() -> (TestNet, Ledger) {
    let net = testnet(4, 4, Params::default());
    let ledger = Ledger::from_genesis(&net.genesis).unwrap();
    (net, ledger)
}

fn assert_supply(l: &Ledger) {
    let (held, expected) = l.audit_supply();
    assert_eq!(held, expected, "INV-SUPPLY");
}

#[test]
fn gen_1_genesis_json_round_trip_and_hash_is_stable() {
    let (net, ledger) = net();
    let json = net.genesis.to_json();
    let parsed = Genesis::from_json(&json).unwrap();
    assert_eq!(parsed, net.genesis);
    assert_eq!(parsed.hash(), ledger.genesis_hash());
    assert_eq!(
        Ledger::from_genesis(&parsed).unwrap().state_root(),
        ledger.state_root()
    );
    assert_eq!(ledger.active_set().len(), 4);
    assert_supply(&ledger);
}

#[test]
fn gen_4_bad_genesis_is_rejected_with_a_reason() {
    let (net, _) = net();
    let mut g = net.genesis.clone();
    g.balances.push(g.balances[0].clone());
    assert!(matches!(Ledger::from_genesis(&g), Err(Error::Genesis(m)) if m.contains("duplicate")));
    let mut g = net.genesis.clone();
    g.validators.clear();
    assert!(matches!(Ledger::from_genesis(&g), Err(Error::Genesis(_))));
    let mut g = net.genesis.clone();
    g.chain_id = "has space".into();
    assert!(Ledger::from_genesis(&g).is_err());
    let mut g = net.genesis.clone();
    g.params.max_evidence_age_blocks = g.params.unbonding_period_blocks;
    assert!(Ledger::from_genesis(&g).is_err());
    assert!(Genesis::from_json("{").is_err());
    assert!(
        Genesis::from_json(
            r#"{"chain_id":"x","genesis_time_ms":0,"balances":[],"validators":[],"unknown":1}"#
        )
        .is_err()
    );
}

#[test]
fn tx_3_transfer_moves_funds_and_charges_eip1559_fees() {
    let (net, l0) = net();
    let (a, b) = (&net.accounts[0], address(&net.accounts[1]));
    let t = transfer(CHAIN, a, 0, b, 5 * BLY);
    let (block, l1) = next_block(&l0, &[t]).unwrap();
    let base = block.header.base_fee_per_gas;
    assert_eq!(base, Params::default().initial_base_fee);
    let fee = u128::from(gas::TRANSFER) * (base + 1);
    assert_eq!(
        l1.account(&address(a)).balance,
        1_000_000 * BLY - 5 * BLY - fee
    );
    assert_eq!(l1.account(&address(a)).nonce, 1);
    assert_eq!(l1.account(&b).balance, 1_000_000 * BLY + 5 * BLY);
    // FEE-5: base fee burned, tip to the proposer.
    assert_eq!(l1.globals().burned, u128::from(gas::TRANSFER) * base);
    assert_eq!(
        l1.account(&block.header.proposer).balance - l0.account(&block.header.proposer).balance,
        u128::from(gas::TRANSFER)
    );
    assert_supply(&l1);
    // Any node applying the same block reaches the same root.
    let (again, outcome) = l0.apply_block(&block).unwrap();
    assert_eq!(again.state_root(), l1.state_root());
    assert!(outcome.changed_keys.len() >= 3);
}

#[test]
fn tx_1_nonces_are_sequential_without_gaps() {
    let (net, l0) = net();
    let a = &net.accounts[0];
    let b = address(&net.accounts[1]);
    // Proposer skips the gapped and replayed ones.
    let txs = [
        transfer(CHAIN, a, 1, b, 1),
        transfer(CHAIN, a, 0, b, 1),
        transfer(CHAIN, a, 0, b, 1),
    ];
    let (block, l1) = next_block(&l0, &txs).unwrap();
    assert_eq!(block.body.txs.len(), 1);
    assert_eq!(l1.account(&address(a)).nonce, 1);
    // A block that carries a gapped nonce is invalid and changes nothing.
    let mut bad = block.clone();
    bad.body.txs = vec![transfer(CHAIN, a, 5, b, 1)];
    bad.header.body_hash = bad.body.body_hash();
    let before = l0.state_root();
    match l0.apply_block(&bad) {
        Err(Error::InvalidTx {
            index: 0,
            error:
                TxError::InvalidNonce {
                    expected: 0,
                    got: 5,
                },
        }) => {}
        other => panic!("expected invalid nonce, got {other:?}"),
    }
    assert_eq!(l0.state_root(), before);
}

#[test]
fn tx_11_bad_signature_and_wrong_chain_make_a_block_invalid() {
    let (net, l0) = net();
    let b = address(&net.accounts[1]);
    let (block, _) = next_block(&l0, &[transfer(CHAIN, &net.accounts[0], 0, b, 1)]).unwrap();
    let mut bad = block.clone();
    bad.body.txs[0].signature[5] ^= 1;
    bad.header.body_hash = bad.body.body_hash();
    assert!(matches!(
        l0.apply_block(&bad),
        Err(Error::InvalidTx {
            error: TxError::InvalidSignature,
            ..
        })
    ));
    let mut other_chain = block.clone();
    other_chain.body.txs = vec![transfer("other-chain", &net.accounts[0], 0, b, 1)];
    other_chain.header.body_hash = other_chain.body.body_hash();
    assert!(matches!(
        l0.apply_block(&other_chain),
        Err(Error::InvalidTx {
            error: TxError::InvalidSignature,
            ..
        })
    ));
}

#[test]
fn ledger_sig_1_a_bad_signature_not_vouched_for_is_still_rejected() {
    let (net, l0) = net();
    let b = address(&net.accounts[1]);
    let good = transfer(CHAIN, &net.accounts[0], 0, b, 1);
    let (block, _) = next_block(&l0, std::slice::from_ref(&good)).unwrap();
    // The cache vouches for the good transaction (as a mempool would after
    // admitting it); the block carries a copy with a flipped signature bit.
    let good_id = good.id();
    let sender = good.verified_sender(CHAIN).unwrap();
    let cache = move |id: &blyan_state_machine::types::Hash32| (*id == good_id).then_some(sender);
    let mut bad = block.clone();
    bad.body.txs[0].signature[5] ^= 1;
    bad.header.body_hash = bad.body.body_hash();
    assert_ne!(
        bad.body.txs[0].id(),
        good_id,
        "the id commits to the signature"
    );
    let before = l0.state_root();
    for result in [
        l0.apply_block(&bad),
        l0.apply_block_with_verified(&bad, &cache),
    ] {
        assert!(matches!(
            result,
            Err(Error::InvalidTx {
                index: 0,
                error: TxError::InvalidSignature,
            })
        ));
    }
    assert_eq!(l0.state_root(), before);
    // An empty cache verifies everything; the good block applies either way,
    // to the same state and outcome.
    let (full, full_out) = l0.apply_block(&block).unwrap();
    for verified in [&cache as &dyn Fn(&_) -> _, &|_: &_| None] {
        let (cached, cached_out) = l0.apply_block_with_verified(&block, verified).unwrap();
        assert_eq!(cached.state_root(), full.state_root());
        assert_eq!(cached_out, full_out);
    }
}

#[test]
fn block_7_header_tampering_is_rejected() {
    let (net, l0) = net();
    let (block, _) = next_block(
        &l0,
        &[transfer(
            CHAIN,
            &net.accounts[0],
            0,
            address(&net.accounts[1]),
            1,
        )],
    )
    .unwrap();
    type Mutation = Box<dyn Fn(&mut blyan_state_machine::block::Block)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("height", Box::new(|b| b.header.height += 1)),
        ("prev", Box::new(|b| b.header.prev_hash[0] ^= 1)),
        ("time", Box::new(|b| b.header.time_ms = 0)),
        ("base fee", Box::new(|b| b.header.base_fee_per_gas += 1)),
        ("gas used", Box::new(|b| b.header.gas_used += 1)),
        ("state root", Box::new(|b| b.header.state_root[3] ^= 1)),
        ("receipts", Box::new(|b| b.header.receipts_hash[3] ^= 1)),
        ("body", Box::new(|b| b.header.body_hash[3] ^= 1)),
        (
            "proposer",
            Box::new(|b| b.header.proposer = address(&key(999))),
        ),
    ];
    for (name, mutate) in cases {
        let mut bad = block.clone();
        mutate(&mut bad);
        assert!(l0.apply_block(&bad).is_err(), "{name} tampering accepted");
    }
    assert!(l0.apply_block(&block).is_ok());
}

#[test]
fn tx_12_failed_execution_pays_fee_and_changes_nothing_else() {
    let (net, l0) = net();
    let a = &net.accounts[0];
    let t = transfer(CHAIN, a, 0, address(&net.accounts[1]), 10_000_000 * BLY);
    let (block, l1) = next_block(&l0, &[t]).unwrap();
    assert_eq!(block.body.txs.len(), 1);
    let (_, outcome) = l0.apply_block(&block).unwrap();
    assert!(
        outcome.receipts[0]
            .failure
            .as_deref()
            .unwrap()
            .contains("insufficient balance")
    );
    let fee = outcome.receipts[0].fee_paid;
    assert_eq!(l1.account(&address(a)).balance, 1_000_000 * BLY - fee);
    assert_eq!(l1.account(&address(a)).nonce, 1);
    assert_eq!(
        l1.account(&address(&net.accounts[1])).balance,
        1_000_000 * BLY
    );
    assert_supply(&l1);
}

#[test]
fn fee_3_block_gas_limit_bounds_a_block() {
    let params = Params {
        block_gas_limit: 3 * gas::TRANSFER + 100_000,
        ..Params::default()
    };
    let net = testnet(
        1,
        1,
        Params {
            block_gas_limit: 2 * gas::POL_REGISTER_BLOCK,
            ..params
        },
    );
    let l0 = Ledger::from_genesis(&net.genesis).unwrap();
    let a = &net.accounts[0];
    let txs: Vec<_> = (0..20)
        .map(|n| transfer(CHAIN, a, n, address(&key(5)), 1))
        .collect();
    let (block, _) = next_block(&l0, &txs).unwrap();
    assert_eq!(
        block.body.txs.len() as u64,
        2 * gas::POL_REGISTER_BLOCK / gas::TRANSFER
    );
}

#[test]
fn fee_2_base_fee_follows_usage() {
    let (net, mut l) = net();
    let mut fees = vec![];
    for _ in 0..3 {
        let (b, next) = next_block(&l, &[]).unwrap();
        fees.push(b.header.base_fee_per_gas);
        l = next;
    }
    assert_eq!(fees, vec![1_000_000_000, 875_000_000, 765_625_000]);
    let _ = net;
}

#[test]
fn stake_3_unbonding_releases_after_the_period_and_slashing_reaches_it() {
    let params = Params {
        unbonding_period_blocks: 10,
        max_evidence_age_blocks: 5,
        epoch_length_blocks: 5,
        ..Params::default()
    };
    let net = testnet(4, 1, params);
    let mut l = Ledger::from_genesis(&net.genesis).unwrap();
    let v = &net.validators[3];
    let va = address(v);
    let (_, l1) = next_block(
        &l,
        &[tx(
            CHAIN,
            v,
            0,
            TxKind::Unbond {
                amount: 1_000 * BLY,
            },
            FEE,
        )],
    )
    .unwrap();
    l = l1;
    assert_eq!(l.validator(&va).unwrap().bonded, 9_000 * BLY);
    assert_eq!(l.unbonding().count(), 1);
    // Double-sign evidence for height 1 reaches the unbonding entry created at height 1.
    let ev = double_sign(&net.genesis.chain_id, v, 1, 0);
    let signers = l.last_active_set().iter().map(|(a, _)| *a).collect();
    let (block, l2) = next_block_with(&l, &[], signers, vec![ev.clone()]).unwrap();
    let (_, outcome) = l.apply_block(&block).unwrap();
    assert!(
        outcome
            .events
            .contains(&Event::Tombstoned { validator: va })
    );
    assert_eq!(l2.validator(&va).unwrap().bonded, 9_000 * BLY * 95 / 100);
    assert_eq!(
        l2.unbonding().next().unwrap().1.amount,
        1_000 * BLY * 95 / 100
    );
    assert!(
        !l2.active_set().iter().any(|(a, _)| *a == va),
        "tombstoned validator leaves the set"
    );
    assert!(outcome.validator_set_update.is_some());
    assert_supply(&l2);
    // Same evidence again is invalid (already tombstoned).
    let signers: Vec<_> = l2.last_active_set().iter().map(|(a, _)| *a).collect();
    assert!(matches!(
        next_block_with(&l2, &[], signers, vec![ev]),
        Err(Error::InvalidEvidence { .. })
    ));
    let mut l = l2;
    let mut released = false;
    for _ in 0..12 {
        let before = l.account(&va).balance;
        let (_, next) = next_block(&l, &[]).unwrap();
        if next.account(&va).balance > before {
            assert_eq!(next.account(&va).balance - before, 1_000 * BLY * 95 / 100);
            released = true;
        }
        l = next;
        assert_supply(&l);
    }
    assert!(released);
    assert_eq!(l.unbonding().count(), 0);
}

#[test]
fn slash_3_expired_evidence_is_rejected() {
    let params = Params {
        unbonding_period_blocks: 10,
        max_evidence_age_blocks: 2,
        ..Params::default()
    };
    let net = testnet(4, 1, params);
    let mut l = Ledger::from_genesis(&net.genesis).unwrap();
    for _ in 0..5 {
        l = next_block(&l, &[]).unwrap().1;
    }
    let ev = double_sign(&net.genesis.chain_id, &net.validators[0], 1, 0);
    let signers = l.last_active_set().iter().map(|(a, _)| *a).collect();
    match next_block_with(&l, &[], signers, vec![ev]) {
        Err(Error::InvalidEvidence { reason, .. }) => assert!(reason.contains("expired")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn slash_2_downtime_jails_slashes_and_unjail_works() {
    let params = Params {
        signed_blocks_window: 10,
        min_signed_per_window_bps: 5_000,
        downtime_jail_blocks: 5,
        ..Params::default()
    };
    let net = testnet(4, 1, params);
    let mut l = Ledger::from_genesis(&net.genesis).unwrap();
    let lazy = address(&net.validators[3]);
    l = next_block(&l, &[]).unwrap().1;
    let mut jailed_at = None;
    for _ in 0..12 {
        let signers: Vec<_> = l
            .last_active_set()
            .iter()
            .map(|(a, _)| *a)
            .filter(|a| *a != lazy)
            .collect();
        let (block, next) = next_block_with(&l, &[], signers, vec![]).unwrap();
        let (_, outcome) = l.apply_block(&block).unwrap();
        if outcome
            .events
            .iter()
            .any(|e| matches!(e, Event::Jailed { validator, .. } if *validator == lazy))
        {
            jailed_at = Some(block.header.height);
        }
        l = next;
        if jailed_at.is_some() {
            break;
        }
    }
    let h = jailed_at.expect("missing 10 of 10 > 5 allowed must jail");
    assert_eq!(
        h, 11,
        "jailed once the window of 10 is full (blocks 2..=11)"
    );
    assert_eq!(l.validator(&lazy).unwrap().bonded, 10_000 * BLY * 99 / 100);
    assert!(!l.active_set().iter().any(|(a, _)| *a == lazy));
    assert_supply(&l);
    let v = &net.validators[3];
    // Too early: failed receipt.
    let (b, l2) = next_block(&l, &[tx(CHAIN, v, 0, TxKind::Unjail, FEE)]).unwrap();
    let (_, o) = l.apply_block(&b).unwrap();
    assert!(
        o.receipts[0]
            .failure
            .as_deref()
            .unwrap()
            .contains("jailed until")
    );
    l = l2;
    for _ in 0..5 {
        l = next_block(&l, &[]).unwrap().1;
    }
    let (_, l3) = next_block(&l, &[tx(CHAIN, v, 1, TxKind::Unjail, FEE)]).unwrap();
    assert_eq!(l3.validator(&lazy).unwrap().jailed_until, None);
}

#[test]
fn block_signers_need_two_thirds() {
    let (_, l0) = net();
    let l1 = next_block(&l0, &[]).unwrap().1;
    let two: Vec<_> = l1
        .last_active_set()
        .iter()
        .take(2)
        .map(|(a, _)| *a)
        .collect();
    assert!(matches!(
        next_block_with(&l1, &[], two, vec![]),
        Err(Error::InvalidSigners(_))
    ));
    let mut three: Vec<_> = l1
        .last_active_set()
        .iter()
        .take(3)
        .map(|(a, _)| *a)
        .collect();
    assert!(next_block_with(&l1, &[], three.clone(), vec![]).is_ok());
    three.reverse();
    assert!(matches!(
        next_block_with(&l1, &[], three, vec![]),
        Err(Error::InvalidSigners(_))
    ));
}

#[test]
fn tx_8_inference_receipt_is_paid_once_and_burned() {
    let (net, l0) = net();
    let client = &net.accounts[0];
    let node = &net.accounts[1];
    let receipt = InferenceReceipt {
        node: address(node),
        request_id: [7; 32],
        tokens: 2_000,
        price_per_1k_tokens: BLY,
        quality_milli: 1_000,
        expires_at_height: 10,
    }
    .sign(CHAIN, client);
    let settle = |nonce| {
        tx(
            CHAIN,
            node,
            nonce,
            TxKind::SettleInference {
                receipt: Box::new(receipt.clone()),
            },
            FEE,
        )
    };
    let (_, l1) = next_block(&l0, &[settle(0)]).unwrap();
    assert_eq!(
        l1.account(&address(client)).balance,
        1_000_000 * BLY - 2 * BLY
    );
    assert_eq!(
        l1.globals().burned
            - l0.globals().burned
            - u128::from(gas::SETTLE_INFERENCE) * 1_000_000_000,
        2 * BLY
    );
    let (b2, l2) = next_block(&l1, &[settle(1)]).unwrap();
    let (_, o) = l1.apply_block(&b2).unwrap();
    assert_eq!(
        o.receipts[0].failure.as_deref(),
        Some("receipt already settled")
    );
    assert_eq!(
        l2.account(&address(client)).balance,
        l1.account(&address(client)).balance
    );
    // Someone else cannot settle it.
    let stolen = tx(
        CHAIN,
        &net.accounts[2],
        0,
        TxKind::SettleInference {
            receipt: Box::new(receipt),
        },
        FEE,
    );
    let (b3, _) = next_block(&l0, &[stolen]).unwrap();
    let (_, o) = l0.apply_block(&b3).unwrap();
    assert!(o.receipts[0].failure.is_some());
    assert_supply(&l2);
}

#[test]
fn tx_9_node_registration_locks_a_bond_and_deregistration_unbonds_it() {
    let params = Params {
        unbonding_period_blocks: 3,
        max_evidence_age_blocks: 2,
        ..Params::default()
    };
    let net = testnet(4, 1, params);
    let l0 = Ledger::from_genesis(&net.genesis).unwrap();
    let n = &net.accounts[0];
    let info = NodeInfo {
        endpoint: "127.0.0.1:7000".into(),
        blocks: vec![[1; 32]],
    };
    let small = tx(
        CHAIN,
        n,
        0,
        TxKind::RegisterNode {
            info: Box::new(info.clone()),
            bond: BLY,
        },
        FEE,
    );
    let (b, l1) = next_block(&l0, &[small]).unwrap();
    assert!(
        l0.apply_block(&b).unwrap().1.receipts[0]
            .failure
            .as_deref()
            .unwrap()
            .contains("below minimum")
    );
    let reg = tx(
        CHAIN,
        n,
        1,
        TxKind::RegisterNode {
            info: Box::new(info),
            bond: 100 * BLY,
        },
        FEE,
    );
    let (_, l2) = next_block(&l1, &[reg]).unwrap();
    assert_eq!(l2.node(&address(n)).unwrap().bond, 100 * BLY);
    assert_eq!(l2.globals().locked, 100 * BLY);
    assert_supply(&l2);
    let (_, mut l) = next_block(&l2, &[tx(CHAIN, n, 2, TxKind::DeregisterNode, FEE)]).unwrap();
    assert!(l.node(&address(n)).is_none());
    let before = l.account(&address(n)).balance;
    for _ in 0..4 {
        l = next_block(&l, &[]).unwrap().1;
    }
    assert_eq!(l.account(&address(n)).balance - before, 100 * BLY);
    assert_supply(&l);
}

#[test]
fn stake_5_bonding_changes_the_set_at_the_epoch_boundary() {
    let params = Params {
        epoch_length_blocks: 4,
        ..Params::default()
    };
    let net = testnet(4, 1, params);
    let mut l = Ledger::from_genesis(&net.genesis).unwrap();
    let newcomer = &net.accounts[0];
    let (_, next) = next_block(
        &l,
        &[tx(
            CHAIN,
            newcomer,
            0,
            TxKind::Bond {
                amount: 50_000 * BLY,
            },
            FEE,
        )],
    )
    .unwrap();
    l = next;
    assert_eq!(l.active_set().len(), 4, "not before the boundary");
    for h in 2..=4 {
        let (b, next) = next_block(&l, &[]).unwrap();
        let (_, o) = l.apply_block(&b).unwrap();
        assert_eq!(o.validator_set_update.is_some(), h == 4);
        l = next;
    }
    assert_eq!(l.active_set().len(), 5);
    assert!(l.active_set().contains(&(address(newcomer), 50_000)));
    assert_supply(&l);
}

#[test]
fn state_2_proofs_for_present_and_absent_keys() {
    use blyan_state_machine::crypto::sha3_256;
    use blyan_state_machine::smt::verify_proof;
    use blyan_state_machine::state::{StateKey, ns};
    let (net, l0) = net();
    let (_, l1) = next_block(
        &l0,
        &[transfer(
            CHAIN,
            &net.accounts[0],
            0,
            address(&net.accounts[1]),
            BLY,
        )],
    )
    .unwrap();
    let root = l1.state_root();
    let present = StateKey::new(ns::ACCOUNT, address(&net.accounts[0]).0);
    let absent = StateKey::new(ns::ACCOUNT, address(&key(4242)).0);
    let (value, proof) = l1.prove(&present);
    let value_hash = sha3_256(&value.expect("present"));
    assert!(verify_proof(
        &root,
        &present.path(),
        Some(&value_hash),
        &proof
    ));
    assert!(!verify_proof(&root, &present.path(), None, &proof));
    assert!(!verify_proof(
        &l0.state_root(),
        &present.path(),
        Some(&value_hash),
        &proof
    ));
    let (value, proof) = l1.prove(&absent);
    assert!(value.is_none());
    assert!(verify_proof(&root, &absent.path(), None, &proof));
    assert!(!verify_proof(
        &root,
        &absent.path(),
        Some(&value_hash),
        &proof
    ));
}

#[test]
fn stake_6_the_active_set_never_becomes_empty() {
    let net = testnet(1, 1, Params::default());
    let l0 = Ledger::from_genesis(&net.genesis).unwrap();
    let only = address(&net.validators[0]);
    let l1 = next_block(&l0, &[]).unwrap().1;
    let ev = double_sign(&net.genesis.chain_id, &net.validators[0], 1, 0);
    let (_, l2) = next_block_with(&l1, &[], vec![only], vec![ev]).unwrap();
    assert!(l2.validator(&only).unwrap().tombstoned);
    assert_eq!(l2.active_set().len(), 1, "STAKE-6: the old set stays");
}

/// SLASH-3, CONS-EV-2: evidence is re-verified from the block alone.
#[test]
fn slash_3_forged_or_non_conflicting_evidence_is_rejected() {
    let net = testnet(4, 1, Params::default());
    let chain = net.genesis.chain_id.clone();
    let l = Ledger::from_genesis(&net.genesis).unwrap();
    let l = next_block(&l, &[]).unwrap().1;
    let signers: Vec<_> = l.last_active_set().iter().map(|(a, _)| *a).collect();
    let reject =
        |ev: Misbehaviour, want: &str| match next_block_with(&l, &[], signers.clone(), vec![ev]) {
            Err(Error::InvalidEvidence { reason, .. }) => {
                assert!(reason.contains(want), "{reason} does not mention {want}")
            }
            other => panic!("accepted: {other:?}"),
        };
    let good = double_sign(&chain, &net.validators[1], 1, 0);
    let Misbehaviour::DuplicateVote { vote_a, vote_b } = good.clone();
    // A signature by another key.
    let mut forged = vote_b.clone();
    let Misbehaviour::DuplicateVote { vote_b: other, .. } =
        double_sign(&chain, &net.validators[2], 1, 0);
    forged.signature = other.signature;
    reject(
        Misbehaviour::DuplicateVote {
            vote_a: vote_a.clone(),
            vote_b: forged,
        },
        "signature",
    );
    // Signed for another chain.
    reject(
        double_sign("other-chain", &net.validators[1], 1, 0),
        "signature",
    );
    // Swapped order.
    reject(
        Misbehaviour::DuplicateVote {
            vote_a: vote_b.clone(),
            vote_b: vote_a.clone(),
        },
        "order",
    );
    // Different rounds do not conflict.
    let Misbehaviour::DuplicateVote { vote_b: later, .. } =
        double_sign(&chain, &net.validators[1], 1, 1);
    reject(
        Misbehaviour::DuplicateVote {
            vote_a: vote_a.clone(),
            vote_b: later,
        },
        "conflict",
    );
    // Not a validator at all.
    reject(double_sign(&chain, &key(4242), 1, 0), "not a validator");
    // Two items against one validator in one block.
    match next_block_with(&l, &[], signers.clone(), vec![good.clone(), good.clone()]) {
        Err(Error::InvalidEvidence { index: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    // The genuine item is accepted.
    let (_, next) = next_block_with(&l, &[], signers.clone(), vec![good]).unwrap();
    assert!(
        next.validator(&address(&net.validators[1]))
            .unwrap()
            .tombstoned
    );
}

/// BLOCK-8: a block's transactions take at most `max_block_bytes`. A proposer
/// skips candidates that do not fit; a block over the limit is refused and
/// the state is unchanged; the mempool refuses a transaction that could
/// never fit.
#[test]
fn block_8_transaction_bytes_are_bounded() {
    // The same test network (deterministic keys) under different limits.
    let ledger_with = |max_block_bytes: u64| {
        let net = testnet(
            4,
            4,
            Params {
                max_block_bytes: max_block_bytes as u32,
                ..Params::default()
            },
        );
        (
            Ledger::from_genesis(&net.genesis).unwrap(),
            net.accounts[0].clone(),
        )
    };
    let (_, sender) = ledger_with(1_048_576);
    let txs: Vec<_> = (0..5)
        .map(|n| transfer(CHAIN, &sender, n, address(&key(5)), BLY))
        .collect();
    let size = txs[0].encoded_len();
    assert!(txs.iter().all(|t| t.encoded_len() == size));
    assert!(size > 100, "a transfer is {size} bytes");
    let max = 3 * size + size / 2;
    let (ledger, _) = ledger_with(max);
    // Built: three fit, the fourth and fifth are skipped.
    let (block, _) = next_block(&ledger, &txs).unwrap();
    assert_eq!(block.body.txs, txs[..3].to_vec());
    // A block of four (a proposer ignoring the limit) is refused, before
    // any transaction runs.
    let mut big = block.clone();
    big.body.txs.push(txs[3].clone());
    big.header.body_hash = big.body.body_hash();
    let root = ledger.state_root();
    match ledger.apply_block(&big) {
        Err(Error::BlockTooLarge { got, max: m }) => assert_eq!((got, m), (4 * size, max)),
        other => panic!("expected BlockTooLarge, got {:?}", other.map(|_| ())),
    }
    assert_eq!(ledger.state_root(), root);
    // The mempool refuses what could never fit.
    let (tiny, _) = ledger_with(size - 1);
    let mut pool = blyan_state_machine::node::Mempool::new(Default::default());
    assert_eq!(
        pool.insert(txs[0].clone(), &tiny),
        Err(blyan_state_machine::node::MempoolError::TooLarge {
            got: size,
            max: size - 1
        })
    );
    assert!(pool.is_empty());
}

/// STATE-4 (NODE-STORE-6): a ledger loaded from its committed entries is the
/// ledger: same root and entries at every height of a chain with validators'
/// liveness, rewards and unbonding in play, and it builds the same next
/// block. Entries that do not form a ledger are refused; a changed value
/// that still decodes changes the root (what the store checks).
#[test]
fn state_4_a_ledger_loaded_from_its_entries_is_the_same_ledger() {
    use blyan_state_machine::state::StateKey;
    use blyan_state_machine::testkit::long_chain;
    let net = testnet(
        4,
        6,
        Params {
            epoch_length_blocks: 3,
            ..Params::default()
        },
    );
    let mut checked = 0;
    let last = long_chain(&net, 10, 4, |c, _, after| {
        let hash = c.block.hash();
        let loaded = Ledger::from_entries(&net.genesis, after.entries(), hash).unwrap();
        assert_eq!(loaded.state_root(), after.state_root());
        assert_eq!(loaded.state_root(), c.block.header.state_root);
        assert_eq!(loaded.entries(), after.entries());
        assert_eq!(loaded.height(), after.height());
        assert_eq!(loaded.last_block_hash(), hash);
        checked += 1;
    })
    .unwrap();
    assert_eq!(checked, 10);
    let loaded =
        Ledger::from_entries(&net.genesis, last.entries(), last.last_block_hash()).unwrap();
    let t = transfer(CHAIN, &net.accounts[5], 0, address(&net.accounts[0]), BLY);
    let (b1, l1) = next_block(&last, std::slice::from_ref(&t)).unwrap();
    let (b2, l2) = next_block(&loaded, &[t]).unwrap();
    assert_eq!(b1.hash(), b2.hash());
    assert_eq!(l1.state_root(), l2.state_root());

    let entries = last.entries();
    let mut stray = entries.clone();
    stray.push((StateKey::new(0x01, b"stray".to_vec()), vec![1]));
    assert!(matches!(
        Ledger::from_entries(&net.genesis, stray, [0; 32]),
        Err(Error::BadState(_))
    ));
    let mut unknown = entries.clone();
    unknown.push((StateKey::new(0x7f, vec![1]), vec![1]));
    assert!(matches!(
        Ledger::from_entries(&net.genesis, unknown, [0; 32]),
        Err(Error::BadState(_))
    ));
    let mut duplicate = entries.clone();
    duplicate.push(entries[0].clone());
    assert!(matches!(
        Ledger::from_entries(&net.genesis, duplicate, [0; 32]),
        Err(Error::BadState(_))
    ));
    let mut missing = entries.clone();
    missing.retain(|(k, _)| k.ns != 0x04);
    assert!(matches!(
        Ledger::from_entries(&net.genesis, missing, [0; 32]),
        Err(Error::BadState(_))
    ));
    // One account's balance changed by one base unit: still a ledger, but
    // not the certified one.
    let account = address(&net.accounts[0]);
    let mut changed = entries.clone();
    let (_, v) = changed
        .iter_mut()
        .find(|(k, _)| k.ns == 0x01 && k.key == account.0)
        .unwrap();
    let mut a = last.account(&account);
    a.balance += 1;
    *v = blyan_state_machine::encoding::Canonical::encode(&a);
    let other = Ledger::from_entries(&net.genesis, changed, last.last_block_hash()).unwrap();
    assert_ne!(other.state_root(), last.state_root());
}

/// POL-17: a registration assigns the node to the targets of the layer
/// blocks it lists (ids of no block are skipped), a deregistration removes
/// it, and the state root follows.
#[test]
fn pol_17_node_assignments_follow_registrations() {
    use blyan_state_machine::pol::{PolBlockType, TargetKey};
    use blyan_state_machine::testkit::pol_block;
    let mut net = testnet(4, 1, Params::default());
    let who = address(&net.validators[0]);
    let meta = pol_block(PolBlockType::Meta, [0; 32], Vec::new(), b"meta", who);
    let meta_id = meta.id();
    let mut layer = pol_block(PolBlockType::Layer, meta_id, vec![meta_id], b"layer 0", who);
    layer.layer = Some(0);
    let layer_id = layer.id();
    net.genesis.pol_blocks = vec![meta, layer];
    let l0 = Ledger::from_genesis(&net.genesis).unwrap();
    let target = TargetKey {
        model_id: meta_id,
        kind: PolBlockType::Layer,
        layer: Some(0),
        expert: None,
    };
    assert!(
        l0.pol()
            .record(&target)
            .unwrap()
            .node_assignments
            .is_empty()
    );
    let n = &net.accounts[0];
    let info = NodeInfo {
        endpoint: "10.0.0.1:7100".into(),
        blocks: vec![[7; 32], layer_id],
    };
    let reg = tx(
        CHAIN,
        n,
        0,
        TxKind::RegisterNode {
            info: Box::new(info),
            bond: 100 * BLY,
        },
        FEE,
    );
    let (_, l1) = next_block(&l0, &[reg]).unwrap();
    assert!(l1.node(&address(n)).is_some());
    let record = l1.pol().record(&target).unwrap();
    assert_eq!(record.node_assignments, vec![address(n)]);
    assert_eq!(record.last_updated, 1);
    let (_, l2) = next_block(&l1, &[tx(CHAIN, n, 1, TxKind::DeregisterNode, FEE)]).unwrap();
    assert!(
        l2.pol()
            .record(&target)
            .unwrap()
            .node_assignments
            .is_empty()
    );
    // The assignment is committed state: the roots differ while it holds.
    let (_, unregistered) = next_block(&l0, &[]).unwrap();
    assert_ne!(l1.state_root(), unregistered.state_root());
}
