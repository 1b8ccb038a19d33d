use blyan_route::Error;
use blyan_route::heartbeat::{
    Heartbeat, HeartbeatConfig, HeartbeatTable, Holding, SignedHeartbeat,
};
use blyan_route::quarantine::Quarantine;
use blyan_route::route::*;
use blyan_state_machine::crypto::sign;
use blyan_state_machine::testkit::{address, key};
use blyan_state_machine::tx::public_key_of;
use blyan_state_machine::types::Address;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const MODEL: [u8; 32] = [9; 32];

fn a(i: u8) -> Address {
    Address([i; 20])
}

fn dense(node: u8, first: u32, last: u32, rtt_us: u64, compute_per_layer_us: u64) -> Candidate {
    Candidate {
        node: a(node),
        first_layer: first,
        last_layer: last,
        dense: true,
        experts: vec![],
        rtt_us,
        compute_per_layer_us,
        queue_depth: 0,
    }
}

fn shape(layers: u32, experts: u16) -> ModelShape {
    ModelShape {
        model: MODEL,
        layers,
        experts_per_layer: experts,
    }
}

fn planner<'a>(s: ModelShape, c: &[Candidate], q: &Quarantine, load: &'a LoadBook) -> Planner<'a> {
    Planner::new(s, c, q, &BTreeSet::new(), 0, load, PlanConfig::default()).unwrap()
}

fn ranges(p: &Plan) -> Vec<(Address, u32, u32)> {
    p.stages
        .iter()
        .map(|s| (s.node, s.first_layer, s.last_layer))
        .collect()
}

#[test]
fn rt_route_2_prefers_fewer_hops_when_compute_is_equal() {
    let load = LoadBook::default();
    let c = [
        dense(1, 0, 1, 1_000, 100),
        dense(2, 2, 3, 1_000, 100),
        dense(3, 0, 3, 1_500, 100),
    ];
    let p = planner(shape(4, 0), &c, &Quarantine::default(), &load)
        .plan()
        .unwrap();
    assert_eq!(ranges(&p), vec![(a(3), 0, 3)]);
    assert_eq!(p.estimated_us, 1_500 + 400);
    // A slow whole-model holder loses to two fast halves.
    let c = [
        dense(1, 0, 1, 1_000, 100),
        dense(2, 2, 3, 1_000, 100),
        dense(3, 0, 3, 1_000, 1_000),
    ];
    let p = planner(shape(4, 0), &c, &Quarantine::default(), &load)
        .plan()
        .unwrap();
    assert_eq!(ranges(&p), vec![(a(1), 0, 1), (a(2), 2, 3)]);
    assert_eq!(p.estimated_us, 2 * (1_000 + 200));
}

#[test]
fn rt_route_2_queue_weighted_compute() {
    let load = LoadBook::default();
    let mut busy = dense(1, 0, 3, 1_000, 100);
    busy.queue_depth = 3; // 400 µs × (1 + 3) = 1,600
    let idle = dense(2, 0, 3, 2_300, 100); // 2,300 + 400
    let p = planner(
        shape(4, 0),
        &[busy.clone(), idle.clone()],
        &Quarantine::default(),
        &load,
    )
    .plan()
    .unwrap();
    assert_eq!(ranges(&p), vec![(a(1), 0, 3)]);
    assert_eq!(p.estimated_us, 2_600);
    busy.queue_depth = 4; // 1,000 + 2,000 > 2,700
    let p = planner(shape(4, 0), &[busy, idle], &Quarantine::default(), &load)
        .plan()
        .unwrap();
    assert_eq!(ranges(&p), vec![(a(2), 0, 3)]);
}

#[test]
fn rt_route_3_uncovered_layer_is_named() {
    let load = LoadBook::default();
    let c = [dense(1, 0, 1, 1, 1), dense(2, 3, 5, 1, 1)];
    let err = planner(shape(6, 0), &c, &Quarantine::default(), &load)
        .plan()
        .unwrap_err();
    assert_eq!(err, Error::UncoveredLayer { layer: 2 });
    assert_eq!(
        err.to_string(),
        "no live, non-quarantined node holds layer 2"
    );
    let err = planner(
        shape(7, 0),
        &[dense(1, 0, 5, 1, 1)],
        &Quarantine::default(),
        &load,
    )
    .plan()
    .unwrap_err();
    assert_eq!(err, Error::UncoveredLayer { layer: 6 });
    let bad = Planner::new(
        shape(0, 0),
        &c,
        &Quarantine::default(),
        &BTreeSet::new(),
        0,
        &load,
        PlanConfig::default(),
    );
    assert!(matches!(bad, Err(Error::InvalidShape(_))));
}

#[test]
fn rt_route_1_quarantined_and_excluded_nodes_are_not_used() {
    let load = LoadBook::default();
    let c = [dense(1, 0, 3, 1, 1), dense(2, 0, 3, 100, 100)];
    let mut q = Quarantine::default();
    q.quarantine(a(1), 1_000);
    let p = Planner::new(
        shape(4, 0),
        &c,
        &q,
        &BTreeSet::new(),
        2_000,
        &load,
        PlanConfig::default(),
    )
    .unwrap()
    .plan()
    .unwrap();
    assert_eq!(ranges(&p), vec![(a(2), 0, 3)]);
    // After the quarantine ends it is used again.
    let later = 1_000 + blyan_route::quarantine::DEFAULT_QUARANTINE_MS;
    let p = Planner::new(
        shape(4, 0),
        &c,
        &q,
        &BTreeSet::new(),
        later,
        &load,
        PlanConfig::default(),
    )
    .unwrap()
    .plan()
    .unwrap();
    assert_eq!(ranges(&p), vec![(a(1), 0, 3)]);
    let excluded: BTreeSet<Address> = [a(2)].into();
    let err = Planner::new(
        shape(4, 0),
        &c,
        &q,
        &excluded,
        2_000,
        &load,
        PlanConfig::default(),
    )
    .unwrap()
    .plan()
    .unwrap_err();
    assert_eq!(err, Error::UncoveredLayer { layer: 0 });
}

#[test]
fn rt_route_5_load_spreads_over_equal_replicas() {
    let c = [
        dense(1, 0, 1, 1_000, 100),
        dense(2, 0, 1, 1_000, 100),
        dense(3, 2, 3, 1_000, 100),
        dense(4, 2, 3, 1_000, 100),
    ];
    let mut load = LoadBook::default();
    let mut plans = Vec::new();
    for _ in 0..4 {
        let p = planner(shape(4, 0), &c, &Quarantine::default(), &load)
            .plan()
            .unwrap();
        load.assign(&p);
        plans.push(ranges(&p));
    }
    // Ties go to the lowest address, then in-flight requests alternate.
    assert_eq!(plans[0], vec![(a(1), 0, 1), (a(3), 2, 3)]);
    assert_eq!(plans[1], vec![(a(2), 0, 1), (a(4), 2, 3)]);
    assert_eq!(plans[2], plans[0]);
    assert_eq!(plans[3], plans[1]);
    assert_eq!(load.inflight(&a(1)), 2);
    let p = planner(shape(4, 0), &c, &Quarantine::default(), &load)
        .plan()
        .unwrap();
    load.release(&p);
    load.release(&p);
    load.release(&p);
    assert_eq!(load.inflight(&a(1)), 0);
}

fn moe(node: u8, first: u32, last: u32, dense: bool, experts: &[u16], rtt_us: u64) -> Candidate {
    Candidate {
        node: a(node),
        first_layer: first,
        last_layer: last,
        dense,
        experts: experts.to_vec(),
        rtt_us,
        compute_per_layer_us: 100,
        queue_depth: 0,
    }
}

#[test]
fn rt_route_4_moe_experts_assigned_local_first_then_cheapest() {
    let load = LoadBook::default();
    let c = [
        moe(1, 0, 1, true, &[0, 1], 1_000),
        moe(2, 0, 1, false, &[2, 3], 3_000),
        moe(3, 0, 1, false, &[1, 2, 3], 2_000),
    ];
    let p = planner(shape(2, 4), &c, &Quarantine::default(), &load)
        .plan()
        .unwrap();
    assert_eq!(ranges(&p), vec![(a(1), 0, 1)]);
    let got: Vec<(u32, u16, Address)> = p.stages[0]
        .experts
        .iter()
        .map(|e| (e.layer, e.expert, e.node))
        .collect();
    let want: Vec<(u32, u16, Address)> = (0..2)
        .flat_map(|l| [(l, 0, a(1)), (l, 1, a(1)), (l, 2, a(3)), (l, 3, a(3))])
        .collect();
    assert_eq!(got, want);
    // Dense 1,000 + 200; per layer the slowest remote expert 2,000 + 100.
    assert_eq!(p.estimated_us, 1_200 + 2 * 2_100);
    assert_eq!(p.nodes(), [a(1), a(3)].into());
    let c = [
        moe(1, 0, 1, true, &[0, 1], 1_000),
        moe(2, 1, 1, false, &[2], 3_000),
    ];
    let err = planner(shape(2, 3), &c, &Quarantine::default(), &load)
        .plan()
        .unwrap_err();
    assert_eq!(
        err,
        Error::UncoveredExpert {
            layer: 0,
            expert: 2
        }
    );
}

#[test]
fn rt_fail_2_same_range_replacement_keeps_other_stages() {
    let load = LoadBook::default();
    let c = [
        dense(1, 0, 1, 1_000, 100),
        dense(2, 0, 1, 1_500, 100),
        dense(3, 2, 3, 1_000, 100),
        dense(4, 2, 3, 1_200, 100),
    ];
    let pl = planner(shape(4, 0), &c, &Quarantine::default(), &load);
    let p = pl.plan().unwrap();
    assert_eq!(ranges(&p), vec![(a(1), 0, 1), (a(3), 2, 3)]);
    let f = pl.failover(&p, a(3)).unwrap();
    assert_eq!(ranges(&f.plan), vec![(a(1), 0, 1), (a(4), 2, 3)]);
    assert_eq!(f.rebuilt, vec![1]);
    let f = pl.failover(&p, a(1)).unwrap();
    assert_eq!(ranges(&f.plan), vec![(a(2), 0, 1), (a(3), 2, 3)]);
    assert_eq!(f.rebuilt, vec![0]);
    assert_eq!(pl.failover(&p, a(9)), Err(Error::NotInPlan(a(9))));
}

#[test]
fn rt_fail_3_suffix_replanned_when_no_holder_has_the_range() {
    let load = LoadBook::default();
    let c = [
        dense(1, 0, 1, 1_000, 100),
        dense(2, 2, 5, 1_000, 100),
        dense(3, 2, 3, 1_000, 100),
        dense(4, 4, 5, 1_000, 100),
    ];
    let pl = planner(shape(6, 0), &c, &Quarantine::default(), &load);
    let p = pl.plan().unwrap();
    assert_eq!(ranges(&p), vec![(a(1), 0, 1), (a(2), 2, 5)]);
    let f = pl.failover(&p, a(2)).unwrap();
    assert_eq!(
        ranges(&f.plan),
        vec![(a(1), 0, 1), (a(3), 2, 3), (a(4), 4, 5)]
    );
    assert_eq!(f.rebuilt, vec![1, 2]);
    // Nobody else holds layers 0-1.
    assert_eq!(
        pl.failover(&p, a(1)),
        Err(Error::UncoveredLayer { layer: 0 })
    );
}

#[test]
fn rt_fail_2_moe_assignments_on_the_failed_node_are_rechosen() {
    let load = LoadBook::default();
    let c = [
        moe(1, 0, 1, true, &[0], 1_000),
        moe(2, 0, 1, false, &[1], 1_000),
        moe(3, 0, 1, false, &[1], 2_000),
    ];
    let pl = planner(shape(2, 2), &c, &Quarantine::default(), &load);
    let p = pl.plan().unwrap();
    assert!(p.stages[0].experts.iter().any(|e| e.node == a(2)));
    let f = pl.failover(&p, a(2)).unwrap();
    assert_eq!(ranges(&f.plan), ranges(&p));
    assert!(
        f.rebuilt.is_empty(),
        "no stage cache is lost when an expert holder fails"
    );
    assert!(f.plan.stages[0].experts.iter().all(|e| e.node != a(2)));
    assert!(f.plan.stages[0].experts.iter().any(|e| e.node == a(3)));
}

fn signed_hb(
    i: u64,
    receiver: Address,
    timestamp_ms: u64,
    first: u32,
    last: u32,
) -> SignedHeartbeat {
    let k = key(i);
    let hb = Heartbeat {
        sender: address(&k),
        public_key: public_key_of(&k),
        receiver,
        timestamp_ms,
        holdings: vec![Holding {
            model: MODEL,
            first_layer: first,
            last_layer: last,
            dense: true,
            experts: vec![],
            blocks: vec![],
        }],
        free_slots: 1,
        queue_depth: 0,
        compute_per_token_us: 400,
    };
    let signature = sign(&k, &hb.signing_bytes("c"));
    SignedHeartbeat {
        heartbeat: hb,
        signature,
    }
}

#[test]
fn rt_route_1_expired_heartbeats_give_no_candidates() {
    let me = address(&key(50));
    let mut t = HeartbeatTable::new(me, "c", HeartbeatConfig::default()).unwrap();
    t.accept(1_000, &signed_hb(1, me, 1_000, 0, 3), |_| true)
        .unwrap();
    t.accept(9_000, &signed_hb(2, me, 9_000, 0, 3), |_| true)
        .unwrap();
    let rtt = BTreeMap::from([(address(&key(1)), 10)]);
    let cs = candidates_from_table(&t, &MODEL, 9_000, &rtt, &PlanConfig::default());
    assert_eq!(cs.len(), 2);
    let one = cs.iter().find(|c| c.node == address(&key(1))).unwrap();
    assert_eq!((one.rtt_us, one.compute_per_layer_us), (10, 100));
    let two = cs.iter().find(|c| c.node == address(&key(2))).unwrap();
    assert_eq!(two.rtt_us, DEFAULT_UNKNOWN_RTT_US);
    // At 16,000 node 1's entry (accepted at 1,000) has expired.
    let cs = candidates_from_table(&t, &MODEL, 16_000, &rtt, &PlanConfig::default());
    assert_eq!(
        cs.iter().map(|c| c.node).collect::<Vec<_>>(),
        vec![address(&key(2))]
    );
    assert!(candidates_from_table(&t, &[0; 32], 9_000, &rtt, &PlanConfig::default()).is_empty());
}

// ---- properties ----

/// An independent statement of RT-ROUTE-2's cost.
fn cost(c: &Candidate, first: u32, last: u32, load: &LoadBook) -> u64 {
    let l = u128::from(c.queue_depth) + u128::from(load.inflight(&c.node));
    let compute = u128::from(c.compute_per_layer_us) * u128::from(last - first + 1);
    c.rtt_us + (compute * (1_000_000 + 1_000_000 * l) / 1_000_000) as u64
}

type Key = (u64, usize, Vec<(Address, u32, u32)>);

/// Every route over eligible dense candidates, best by RT-ROUTE-2's order.
fn brute_force(layers: u32, cs: &[Candidate], load: &LoadBook) -> Option<Key> {
    fn go(
        b: u32,
        layers: u32,
        cs: &[Candidate],
        load: &LoadBook,
        acc: &mut Vec<(Address, u32, u32)>,
        sum: u64,
        best: &mut Option<Key>,
    ) {
        if b == layers {
            let k = (sum, acc.len(), acc.clone());
            if best.as_ref().is_none_or(|old| k < *old) {
                *best = Some(k);
            }
            return;
        }
        for c in cs
            .iter()
            .filter(|c| c.dense && c.first_layer <= b && b <= c.last_layer)
        {
            for last in b..=c.last_layer.min(layers - 1) {
                acc.push((c.node, b, last));
                go(
                    last + 1,
                    layers,
                    cs,
                    load,
                    acc,
                    sum + cost(c, b, last, load),
                    best,
                );
                acc.pop();
            }
        }
    }
    let mut best = None;
    go(0, layers, cs, load, &mut Vec::new(), 0, &mut best);
    best
}

fn arb_candidates(layers: u32) -> impl Strategy<Value = Vec<Candidate>> {
    prop::collection::vec(
        (
            1u8..=6,
            0..layers,
            0..layers,
            // Few distinct costs, so that ties (and the tie-break) are common.
            prop::sample::select(vec![0u64, 100, 1_000, 3_000]),
            prop::sample::select(vec![0u64, 50, 100, 1_000]),
            0u32..3,
            prop::bool::weighted(0.85),
        ),
        0..7,
    )
    .prop_map(|v| {
        v.into_iter()
            .map(|(node, x, y, rtt, comp, queue, is_dense)| Candidate {
                node: a(node),
                first_layer: x.min(y),
                last_layer: x.max(y),
                dense: is_dense,
                experts: if is_dense { vec![] } else { vec![0] },
                rtt_us: rtt,
                compute_per_layer_us: comp,
                queue_depth: queue,
            })
            .collect()
    })
}

fn instance() -> impl Strategy<Value = (u32, Vec<Candidate>, Vec<u8>, Vec<u8>)> {
    (1u32..=6).prop_flat_map(|layers| {
        (
            Just(layers),
            arb_candidates(layers),
            prop::collection::vec(1u8..=6, 0..2),
            prop::collection::vec(1u8..=6, 0..3),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// RT-ROUTE-1..3, RT-ROUTE-5: coverage, eligibility, optimality against
    /// brute force (including the tie-break) and independence from the
    /// candidates' order.
    #[test]
    fn rt_route_2_plan_is_optimal_covering_eligible_and_deterministic(
        (layers, cands, quarantined, busy) in instance(),
    ) {
        let mut q = Quarantine::default();
        for n in &quarantined {
            q.quarantine(a(*n), 0);
        }
        let mut load = LoadBook::default();
        for n in &busy {
            // One in-flight request on node n.
            let p = Plan { model: MODEL, stages: vec![Stage { node: a(*n), first_layer: 0, last_layer: 0, experts: vec![], estimated_us: 0 }], estimated_us: 0 };
            load.assign(&p);
        }
        // Candidates of one node share its queue depth.
        let mut cands = cands;
        let queue: BTreeMap<Address, u32> = cands.iter().map(|c| (c.node, c.queue_depth)).collect();
        for c in &mut cands {
            c.queue_depth = queue[&c.node];
        }
        let eligible: Vec<Candidate> = cands.iter().filter(|c| !q.is_quarantined(&c.node, 1)).cloned().collect();
        let result = Planner::new(shape(layers, 0), &cands, &q, &BTreeSet::new(), 1, &load, PlanConfig::default()).unwrap().plan();
        match brute_force(layers, &eligible, &load) {
            None => {
                let first = (0..layers).find(|l| !eligible.iter().any(|c| c.dense && c.first_layer <= *l && *l <= c.last_layer)).unwrap();
                prop_assert_eq!(result, Err(Error::UncoveredLayer { layer: first }));
            }
            Some(best) => {
                let plan = result.unwrap();
                let mut next = 0;
                for s in &plan.stages {
                    prop_assert_eq!(s.first_layer, next);
                    prop_assert!(s.last_layer >= s.first_layer);
                    next = s.last_layer + 1;
                    prop_assert!(!q.is_quarantined(&s.node, 1));
                    prop_assert!(eligible.iter().any(|c| c.node == s.node && c.dense && c.first_layer <= s.first_layer && s.last_layer <= c.last_layer));
                }
                prop_assert_eq!(next, layers);
                prop_assert_eq!((plan.estimated_us, plan.stages.len(), ranges(&plan)), best);
                let mut reversed = cands.clone();
                reversed.reverse();
                let again = Planner::new(shape(layers, 0), &reversed, &q, &BTreeSet::new(), 1, &load, PlanConfig::default()).unwrap().plan().unwrap();
                prop_assert_eq!(again, plan);
            }
        }
    }

    /// RT-FAIL-1..4: a failover plan covers every layer, avoids the failed
    /// node, keeps the stages it does not rebuild, and is the best route
    /// when the suffix is re-planned from layer 0.
    #[test]
    fn rt_fail_failover_covers_avoids_and_keeps((layers, cands, _q, _b) in instance(), pick in 0usize..8) {
        let load = LoadBook::default();
        let q = Quarantine::default();
        let pl = Planner::new(shape(layers, 0), &cands, &q, &BTreeSet::new(), 0, &load, PlanConfig::default()).unwrap();
        let Ok(plan) = pl.plan() else { return Ok(()) };
        let nodes: Vec<Address> = plan.nodes().into_iter().collect();
        let failed = nodes[pick % nodes.len()];
        let others: Vec<Candidate> = cands.iter().filter(|c| c.node != failed).cloned().collect();
        match pl.failover(&plan, failed) {
            Err(Error::UncoveredLayer { layer }) => {
                prop_assert!(!others.iter().any(|c| c.dense && c.first_layer <= layer && layer <= c.last_layer));
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
            Ok(f) => {
                let mut next = 0;
                let old: BTreeSet<(Address, u32, u32)> = ranges(&plan).into_iter().collect();
                for (i, s) in f.plan.stages.iter().enumerate() {
                    prop_assert_eq!(s.first_layer, next);
                    next = s.last_layer + 1;
                    prop_assert_ne!(s.node, failed);
                    prop_assert_eq!(f.rebuilt.contains(&i), !old.contains(&(s.node, s.first_layer, s.last_layer)));
                }
                prop_assert_eq!(next, layers);
                prop_assert!(!f.plan.nodes().contains(&failed));
                // Never cheaper than a fresh plan without the failed node.
                let fresh = brute_force(layers, &others, &load).unwrap();
                prop_assert!(f.plan.estimated_us >= fresh.0);
            }
        }
    }
}
