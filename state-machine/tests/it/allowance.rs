//! TX-13..TX-15, ALW-*, INV-RECEIPT-ONCE, INV-ALW-CAP: paid inference
//! through allowances, on real blocks.

use blyan_state_machine::allowance::{
    AllowanceTerms, ApiKey, KeyRefusal, NodeCap, RouteShare, Settlement, UsageItem, authorize,
    price,
};
use blyan_state_machine::block::Event;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::params::Params;
use blyan_state_machine::pol::{PolBlockType, TargetKey};
use blyan_state_machine::rewards::RewardPool;
use blyan_state_machine::testkit::{TestNet, address, next_block, pol_block, testnet, tx};
use blyan_state_machine::tx::{SignedTx, TxKind};
use blyan_state_machine::types::{Address, Amount, BLY, Hash32};
use k256::ecdsa::SigningKey;

const CHAIN: &str = "blyan-test";
const FEE: u128 = 100_000_000_000;
const GRACE: u64 = 4;

struct Fixture {
    net: TestNet,
    ledger: Ledger,
    model: Hash32,
    layer: TargetKey,
}

fn fixture() -> Fixture {
    let params = Params {
        allowance_grace_blocks: GRACE,
        max_allowance_blocks: 50,
        ..Params::default()
    };
    let mut net = testnet(4, 4, params);
    let author = address(&net.accounts[3]);
    let meta = pol_block(PolBlockType::Meta, [0; 32], vec![], b"{}", author);
    let mut layer = pol_block(
        PolBlockType::Layer,
        meta.id(),
        vec![meta.id()],
        b"l0",
        author,
    );
    layer.layer = Some(0);
    net.genesis.pol_blocks = vec![meta.clone(), layer];
    let ledger = Ledger::from_genesis(&net.genesis).unwrap();
    Fixture {
        model: meta.id(),
        layer: TargetKey {
            model_id: meta.id(),
            kind: PolBlockType::Layer,
            layer: Some(0),
            expert: None,
        },
        net,
        ledger,
    }
}

fn client(f: &Fixture) -> &SigningKey {
    &f.net.accounts[0]
}
fn node(f: &Fixture) -> &SigningKey {
    &f.net.accounts[1]
}

fn open(
    f: &Fixture,
    nonce: u64,
    cap: Amount,
    node_caps: Vec<NodeCap>,
    expires_at: u64,
) -> SignedTx {
    tx(
        CHAIN,
        client(f),
        nonce,
        TxKind::OpenAllowance(Box::new(AllowanceTerms {
            cap,
            node_caps,
            expires_at,
        })),
        FEE,
    )
}

fn item(
    f: &Fixture,
    request: u8,
    prompt: u64,
    completion: u64,
    route: &[(Address, u64)],
) -> UsageItem {
    let mut route: Vec<RouteShare> = route
        .iter()
        .map(|(node, work)| RouteShare {
            node: *node,
            work: *work,
        })
        .collect();
    route.sort_by_key(|s| s.node);
    UsageItem {
        request_id: [request; 32],
        model: f.model,
        prompt_tokens: prompt,
        completion_tokens: completion,
        route,
    }
}

fn settle(key: &SigningKey, nonce: u64, allowance: Hash32, items: Vec<UsageItem>) -> SignedTx {
    tx(
        CHAIN,
        key,
        nonce,
        TxKind::SettleUsage(Box::new(Settlement { allowance, items })),
        FEE,
    )
}

/// Applies one block with `txs` and returns the ledger and each receipt's failure.
fn block(l: &Ledger, txs: &[SignedTx]) -> (Ledger, Vec<Option<String>>, Vec<Event>) {
    let (b, next) = next_block(l, txs).unwrap();
    let (again, outcome) = l.apply_block(&b).unwrap();
    assert_eq!(again.state_root(), next.state_root());
    assert_eq!(
        outcome.receipts.len(),
        txs.len(),
        "every candidate included"
    );
    let (held, expected) = next.audit_supply();
    assert_eq!(held, expected, "INV-SUPPLY");
    (
        next,
        outcome.receipts.into_iter().map(|r| r.failure).collect(),
        outcome.events,
    )
}

fn empty_blocks(mut l: Ledger, n: usize) -> (Ledger, Vec<Event>) {
    let mut events = Vec::new();
    for _ in 0..n {
        let (next, _, e) = block(&l, &[]);
        events.extend(e);
        l = next;
    }
    (l, events)
}

#[test]
fn tx_13_open_escrows_the_cap_and_tx_15_burns_exactly_the_metered_cost() {
    let f = fixture();
    let c = address(client(&f));
    let n = address(node(&f));
    let opening = open(&f, 0, 10 * BLY, vec![], 40);
    let id = opening.id();
    let (l1, fail, _) = block(&f.ledger, &[opening]);
    assert_eq!(fail, vec![None]);
    let a = l1.allowance(&id).expect("opened under the tx id");
    assert_eq!((a.owner, a.cap, a.spent), (c, 10 * BLY, 0));
    assert_eq!(l1.globals().locked - f.ledger.globals().locked, 10 * BLY);

    // 1,234 prompt + 567 completion tokens at the default 1 BLY / 1k.
    let price_1k = l1.params().inference_price_per_1k_tokens;
    assert_eq!(price_1k, BLY);
    let i = item(&f, 1, 1_234, 567, &[(n, 1)]);
    let cost = price(1_801, price_1k);
    assert_eq!(cost, 1_801 * BLY / 1000);
    let burned_before = l1.globals().burned;
    let (l2, fail, _) = block(&l1, &[settle(node(&f), 0, id, vec![i])]);
    assert_eq!(fail, vec![None]);
    let a = l2.allowance(&id).unwrap();
    assert_eq!(a.spent, cost);
    assert_eq!(a.remaining(), 10 * BLY - cost);
    assert_eq!(a.settled_requests, 1);
    assert_eq!(l2.usage_settled(&id, &[1; 32]), Some(2));
    // The cost left the escrow and was burned (plus the settlement's fee).
    assert_eq!(l1.globals().locked - l2.globals().locked, cost);
    let fee_burn = l2.globals().burned - burned_before - cost;
    assert!(
        fee_burn > 0 && fee_burn < cost,
        "only the fee besides the cost"
    );
    // RWD-10: the node's inference claim is the reward, capped by the burn.
    let claim = l2.rewards().claim(RewardPool::Inference, &n);
    assert_eq!(claim, cost.min(1_801 * BLY / 1000));
    // POL-16: the model's layer counts the tokens.
    assert_eq!(l2.pol().record(&f.layer).unwrap().usage_count, 1_801);
    // The client's balance is untouched by settlement (it paid at opening).
    assert_eq!(l2.account(&c).balance, l1.account(&c).balance);
}

#[test]
fn inv_receipt_once_a_request_is_settled_once_across_and_within_batches() {
    let f = fixture();
    let n = address(node(&f));
    let opening = open(&f, 0, 10 * BLY, vec![], 40);
    let id = opening.id();
    let (l1, _, _) = block(&f.ledger, &[opening]);
    let (l2, fail, _) = block(
        &l1,
        &[settle(
            node(&f),
            0,
            id,
            vec![item(&f, 1, 10, 10, &[(n, 1)])],
        )],
    );
    assert_eq!(fail, vec![None]);
    // Again in a later block: refused, nothing charged.
    let (l3, fail, _) = block(
        &l2,
        &[settle(
            node(&f),
            1,
            id,
            vec![item(&f, 1, 10, 10, &[(n, 1)])],
        )],
    );
    assert!(
        fail[0].as_deref().unwrap().contains("already settled"),
        "{fail:?}"
    );
    assert_eq!(
        l3.allowance(&id).unwrap().spent,
        l2.allowance(&id).unwrap().spent
    );
    // Twice in one batch: the whole batch is refused.
    let dup = vec![
        item(&f, 2, 10, 10, &[(n, 1)]),
        item(&f, 2, 10, 10, &[(n, 1)]),
    ];
    let (l4, fail, _) = block(&l3, &[settle(node(&f), 2, id, dup)]);
    assert!(fail[0].as_deref().unwrap().contains("already settled"));
    assert_eq!(
        l4.allowance(&id).unwrap().spent,
        l2.allowance(&id).unwrap().spent
    );
    assert_eq!(l4.usage_settled(&id, &[2; 32]), None);
}

#[test]
fn inv_alw_cap_settling_above_the_cap_or_a_sub_cap_is_refused() {
    let f = fixture();
    let n = address(node(&f));
    let other = address(&f.net.accounts[2]);
    let mut caps = vec![NodeCap { node: n, cap: BLY }];
    caps.sort_by_key(|c| c.node);
    let opening = open(&f, 0, 2 * BLY, caps, 40);
    let id = opening.id();
    let (l1, _, _) = block(&f.ledger, &[opening]);
    // 1,001 tokens cost 1.001 BLY: above this node's 1 BLY sub-cap.
    let (l2, fail, _) = block(
        &l1,
        &[settle(
            node(&f),
            0,
            id,
            vec![item(&f, 1, 1_000, 1, &[(n, 1)])],
        )],
    );
    assert!(
        fail[0].as_deref().unwrap().contains("more than"),
        "{fail:?}"
    );
    assert_eq!(l2.allowance(&id).unwrap().spent, 0);
    // Exactly the sub-cap is fine; one more token is not.
    let (l3, fail, _) = block(
        &l2,
        &[settle(
            node(&f),
            1,
            id,
            vec![item(&f, 1, 500, 500, &[(n, 1)])],
        )],
    );
    assert_eq!(fail, vec![None]);
    assert_eq!(l3.allowance(&id).unwrap().node_spent(&n), BLY);
    let (l4, fail, _) = block(
        &l3,
        &[settle(node(&f), 2, id, vec![item(&f, 2, 1, 0, &[(n, 1)])])],
    );
    assert!(fail[0].is_some());
    // A node without a sub-cap may not settle at all.
    let (_, fail, _) = block(
        &l4,
        &[settle(
            &f.net.accounts[2],
            0,
            id,
            vec![item(&f, 3, 1, 0, &[(other, 1)])],
        )],
    );
    assert!(
        fail[0].as_deref().unwrap().contains("not in its node caps"),
        "{fail:?}"
    );

    // Without sub-caps the overall cap binds.
    let opening = open(&f, 1, BLY, vec![], 40);
    let id2 = opening.id();
    let (l5, _, _) = block(&l4, &[opening]);
    let (l6, fail, _) = block(
        &l5,
        &[settle(
            node(&f),
            3,
            id2,
            vec![item(&f, 9, 999, 2, &[(n, 1)])],
        )],
    );
    assert!(fail[0].is_some());
    assert_eq!(l6.allowance(&id2).unwrap().spent, 0);
}

#[test]
fn tx_15_rejects_malformed_items_with_a_reason() {
    let f = fixture();
    let n = address(node(&f));
    let stranger = address(&f.net.accounts[2]);
    let opening = open(&f, 0, 10 * BLY, vec![], 40);
    let id = opening.id();
    let (mut l, _, _) = block(&f.ledger, &[opening]);
    let cases: Vec<(Vec<UsageItem>, &str)> = vec![
        (vec![], "not 1..="),
        (vec![item(&f, 1, 0, 0, &[(n, 1)])], "tokens"),
        (vec![item(&f, 1, 1, 1, &[])], "route of 0"),
        (
            vec![item(&f, 1, 1, 1, &[(stranger, 1)])],
            "not on the route",
        ),
        (vec![item(&f, 1, 1, 1, &[(n, 0)])], "work"),
    ];
    for (nonce, (items, why)) in cases.into_iter().enumerate() {
        let (next, fail, _) = block(&l, &[settle(node(&f), nonce as u64, id, items)]);
        let msg = fail[0].clone().unwrap_or_default();
        assert!(msg.contains(why), "{why}: {msg}");
        assert_eq!(next.allowance(&id).unwrap().spent, 0);
        l = next;
    }
    // An unknown allowance.
    let (_, fail, _) = block(
        &l,
        &[settle(
            node(&f),
            5,
            [9; 32],
            vec![item(&f, 1, 1, 1, &[(n, 1)])],
        )],
    );
    assert_eq!(fail[0].as_deref(), Some("no such allowance"));
}

#[test]
fn alw_6_a_route_splits_rewards_in_proportion_to_work() {
    let f = fixture();
    let n = address(node(&f));
    let peer = address(&f.net.accounts[2]);
    let opening = open(&f, 0, 10 * BLY, vec![], 40);
    let id = opening.id();
    let (l1, _, _) = block(&f.ledger, &[opening]);
    // 3,000 tokens (3 BLY) over a route where the peer did 2/3 of the work.
    let (l2, fail, _) = block(
        &l1,
        &[settle(
            node(&f),
            0,
            id,
            vec![item(&f, 1, 1_000, 2_000, &[(n, 1), (peer, 2)])],
        )],
    );
    assert_eq!(fail, vec![None]);
    assert_eq!(l2.rewards().claim(RewardPool::Inference, &n), BLY);
    assert_eq!(l2.rewards().claim(RewardPool::Inference, &peer), 2 * BLY);
}

#[test]
fn alw_4_revocation_and_expiry_stop_keys_and_refund_after_the_grace_period() {
    let f = fixture();
    let c = address(client(&f));
    let n = address(node(&f));
    let opening = open(&f, 0, 10 * BLY, vec![], 40);
    let id = opening.id();
    let (l1, _, _) = block(&f.ledger, &[opening]);
    let key = ApiKey::issue(CHAIN, client(&f), id, 0);
    assert_eq!(
        authorize(CHAIN, &key, l1.allowance(&id), &n, l1.height()),
        Ok(10 * BLY)
    );

    // Only the owner may close it.
    let close = |k: &SigningKey, nonce| {
        tx(
            CHAIN,
            k,
            nonce,
            TxKind::CloseAllowance { allowance: id },
            FEE,
        )
    };
    let (l2, fail, _) = block(&l1, &[close(node(&f), 0)]);
    assert_eq!(
        fail[0].as_deref(),
        Some("only the allowance's owner may close it")
    );
    let (l3, fail, _) = block(&l2, &[close(client(&f), 1)]);
    assert_eq!(fail, vec![None]);
    let closed_at = l3.height();
    assert_eq!(
        authorize(CHAIN, &key, l3.allowance(&id), &n, l3.height()),
        Err(KeyRefusal::Revoked(closed_at))
    );
    let (l4, fail, _) = block(&l3, &[close(client(&f), 2)]);
    assert!(fail[0].as_deref().unwrap().contains("already closed"));

    // Usage served before revocation settles during the grace period.
    let (l5, fail, _) = block(
        &l4,
        &[settle(
            node(&f),
            1,
            id,
            vec![item(&f, 1, 500, 500, &[(n, 1)])],
        )],
    );
    assert_eq!(fail, vec![None]);
    // Up to closed_at + GRACE, then the refund: the rest goes back to the owner.
    let balance = l5.account(&c).balance;
    let (l6, events) = empty_blocks(l5, (closed_at + GRACE - 5) as usize);
    assert_eq!(l6.height(), closed_at + GRACE);
    assert!(l6.allowance(&id).is_some());
    assert!(
        events.is_empty()
            || !events
                .iter()
                .any(|e| matches!(e, Event::AllowanceReleased { .. }))
    );
    let (l7, fail, events) = block(
        &l6,
        &[settle(node(&f), 2, id, vec![item(&f, 2, 1, 0, &[(n, 1)])])],
    );
    assert!(
        fail[0]
            .as_deref()
            .unwrap()
            .contains("settlement window ended"),
        "{fail:?}"
    );
    assert!(events.contains(&Event::AllowanceReleased {
        allowance: id,
        owner: c,
        refund: 9 * BLY,
    }));
    assert_eq!(l7.account(&c).balance, balance + 9 * BLY);
    assert!(l7.allowance(&id).is_none());
    assert_eq!(
        l7.usage_settled(&id, &[1; 32]),
        None,
        "forgotten with the allowance"
    );
    assert_eq!(
        authorize(CHAIN, &key, l7.allowance(&id), &n, l7.height()),
        Err(KeyRefusal::UnknownAllowance)
    );
}

#[test]
fn alw_3_keys_expire_with_the_allowance() {
    let f = fixture();
    let n = address(node(&f));
    let opening = open(&f, 0, BLY, vec![], 3);
    let id = opening.id();
    let (l1, _, _) = block(&f.ledger, &[opening]);
    let key = ApiKey::issue(CHAIN, client(&f), id, 0);
    let (l3, _) = empty_blocks(l1, 2);
    assert_eq!(l3.height(), 3);
    assert!(authorize(CHAIN, &key, l3.allowance(&id), &n, 3).is_ok());
    let (l4, _) = empty_blocks(l3, 1);
    assert_eq!(
        authorize(CHAIN, &key, l4.allowance(&id), &n, l4.height()),
        Err(KeyRefusal::Expired(3))
    );
    // Terms past max_allowance_blocks, already expired, or zero: refused at opening.
    for (cap, expires) in [(BLY, 1_000), (BLY, 1), (0, 10)] {
        let (_, fail, _) = block(&l4, &[open(&f, 1, cap, vec![], expires)]);
        assert!(fail[0].is_some(), "cap {cap} expires {expires}");
    }
}

#[test]
fn state_4_allowances_survive_a_snapshot_round_trip() {
    let f = fixture();
    let n = address(node(&f));
    let opening = open(&f, 0, 10 * BLY, vec![], 40);
    let id = opening.id();
    let (l1, _, _) = block(&f.ledger, &[opening]);
    let (l2, _, _) = block(
        &l1,
        &[settle(
            node(&f),
            0,
            id,
            vec![item(&f, 1, 10, 10, &[(n, 1)])],
        )],
    );
    let entries = l2.entries();
    let back = Ledger::from_entries(&f.net.genesis, entries, l2.last_block_hash()).unwrap();
    assert_eq!(back.state_root(), l2.state_root());
    assert_eq!(back.allowance(&id), l2.allowance(&id));
    assert_eq!(back.usage_settled(&id, &[1; 32]), Some(2));
    // The derived release index came back too: the refund still happens.
    let (a, ea) = empty_blocks(back, 45);
    let (b, eb) = empty_blocks(l2, 45);
    assert_eq!(a.state_root(), b.state_root());
    assert_eq!(ea, eb);
    assert!(
        ea.iter()
            .any(|e| matches!(e, Event::AllowanceReleased { .. }))
    );
}
