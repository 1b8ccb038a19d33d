//! Tests for spec/rewards.md; each names the rule it checks.

use super::*;
use crate::encoding::Canonical;
use crate::pol::{DeltaDecision, PolBlockType, RejectReason, SemVer, TargetKey};
use proptest::prelude::*;

fn addr(n: u8) -> Address {
    Address([n; 20])
}

fn small_params() -> RewardParams {
    RewardParams {
        daily_budget: 86_400_000,
        target_block_time_ms: 1_000,
        epoch_length_blocks: 100,
        max_claimants_per_pool: 4,
        ..RewardParams::default()
    }
}

#[test]
fn rwd_1_emission_per_block_from_daily_budget() {
    let p = RewardParams::default();
    assert_eq!(emission_per_block_base_units(&p), 6_341_944_444_444_444_444);
    // A protocol day (43_200 blocks at 2 s) emits the budget minus < 1 base unit per block.
    let day = emission_per_block_base_units(&p) * 43_200;
    assert!(day <= p.daily_budget);
    assert_eq!(p.daily_budget - day, 19_200);
    // Halving the block time halves the per-block emission, not the daily one.
    let fast = RewardParams {
        target_block_time_ms: 1_000,
        ..p.clone()
    };
    assert_eq!(
        emission_per_block_base_units(&fast) * 86_400,
        p.daily_budget - 19_200
    );
}

#[test]
fn rwd_2_epoch_budget_and_split() {
    let p = RewardParams::default();
    assert_eq!(epoch_budget(&p), 6_341_944_444_444_444_444 * 43_200);
    let sum: Amount = RewardPool::ALL.iter().map(|q| pool_budget(&p, *q)).sum();
    assert!(sum <= epoch_budget(&p));
    assert!(epoch_budget(&p) - sum < 4, "floor dust only");
    assert_eq!(
        pool_budget(&p, RewardPool::Inference),
        epoch_budget(&p) * 4_500 / 10_000
    );
    assert_eq!(
        pool_budget(&p, RewardPool::Learning),
        epoch_budget(&p) * 3_500 / 10_000
    );
    assert_eq!(pool_budget(&p, RewardPool::Datasets), epoch_budget(&p) / 10);
}

#[test]
fn rwd_3_validation_budget_split_between_attestors_and_signers() {
    let p = small_params(); // epoch budget 10_000 · 10 = 100_000; validation 10_000.
    assert_eq!(epoch_budget(&p), 100_000);
    assert_eq!(pool_budget(&p, RewardPool::Attestation), 5_000);
    assert_eq!(pool_budget(&p, RewardPool::Signing), 5_000);
    let odd = RewardParams {
        validation_attestor_bps: 3_333,
        ..p
    };
    let a = pool_budget(&odd, RewardPool::Attestation);
    let s = pool_budget(&odd, RewardPool::Signing);
    assert_eq!(a, 3_333);
    assert_eq!(a + s, 10_000);
}

#[test]
fn rwd_p1_params_validate() {
    assert_eq!(RewardParams::default().validate(), Ok(()));
    let bad = RewardParams {
        learning_bps: 3_501,
        ..RewardParams::default()
    };
    assert_eq!(bad.validate(), Err(RewardError::BadParams));
    let bad = RewardParams {
        difficulty_min_milli: 3_001,
        ..RewardParams::default()
    };
    assert_eq!(bad.validate(), Err(RewardError::BadParams));
    let json = serde_json::to_string(&RewardParams::default()).unwrap();
    assert!(json.contains("\"daily_budget\":\"273972000000000000000000\""));
    assert_eq!(
        serde_json::from_str::<RewardParams>(&json).unwrap(),
        RewardParams::default()
    );
}

#[test]
fn rwd_10_inference_reward_is_capped_by_the_burn() {
    let p = RewardParams::default();
    assert_eq!(inference_reward(&p, 1_000, 1_000, Amount::MAX), BLY);
    assert_eq!(inference_reward(&p, 1_000, 1_500, Amount::MAX), 3 * BLY / 2);
    // Quality is clamped to [0.5, 1.5].
    assert_eq!(inference_reward(&p, 1_000, 9_999, Amount::MAX), 3 * BLY / 2);
    assert_eq!(inference_reward(&p, 1_000, 0, Amount::MAX), BLY / 2);
    assert_eq!(inference_reward(&p, 1, 1_000, Amount::MAX), BLY / 1_000);
    // Never more than was burned: serving yourself does not pay.
    assert_eq!(inference_reward(&p, 1_000, 1_000, 7), 7);
    assert_eq!(inference_reward(&p, 1_000, 1_000, 0), 0);
    assert_eq!(inference_reward(&p, u64::MAX, 1_500, 5), 5);
}

#[test]
fn rwd_11_difficulty_grows_linearly_then_saturates() {
    let p = RewardParams::default();
    assert_eq!(difficulty_milli(&p, 0), 1_000);
    assert_eq!(difficulty_milli(&p, 250_000), 2_000);
    assert_eq!(difficulty_milli(&p, 500_000), 3_000);
    assert_eq!(difficulty_milli(&p, u64::MAX), 3_000);
}

#[test]
fn rwd_11_learning_reward_examples() {
    let p = RewardParams::default();
    // 1% from a fresh target: 500 BLY × mean difficulty over [0, 1%] = 1.02.
    assert_eq!(learning_reward(&p, 0, 10_000), 510 * BLY);
    // 1% past saturation: 500 × 3.
    assert_eq!(learning_reward(&p, 600_000, 10_000), 1_500 * BLY);
    // Straddling the saturation point: [495_000, 505_000]: 5_000 ppm at mean
    // difficulty 2.99 and 5_000 ppm at 3.
    assert_eq!(
        learning_reward(&p, 495_000, 10_000),
        250 * BLY * 2_990 / 1_000 + 250 * 3 * BLY
    );
    assert_eq!(learning_reward(&p, 123, 0), 0);
    // Flat difficulty 1: exactly 500 BLY per 1%.
    let flat = RewardParams {
        difficulty_max_milli: 1_000,
        ..p
    };
    assert_eq!(learning_reward(&flat, 777_777, 25_000), 1_250 * BLY);
}

#[test]
fn rwd_14_dataset_reward_each() {
    let p = RewardParams::default();
    assert_eq!(dataset_reward_each(&p, 1_000, 0), 0);
    assert_eq!(dataset_reward_each(&p, 1_000, 1), 200);
    assert_eq!(dataset_reward_each(&p, 1_000, 3), 66);
}

#[test]
fn rwd_4_amount_pool_pays_in_full_under_budget_and_pro_rata_over() {
    let p = small_params(); // inference budget 45_000
    let mut s = RewardState::new();
    let mut t = Touched::new();
    s.accrue(&p, RewardPool::Inference, addr(2), 10_000, &mut t)
        .unwrap();
    s.accrue(&p, RewardPool::Inference, addr(1), 5_000, &mut t)
        .unwrap();
    let paid = s.settle_epoch(&p, &mut t);
    assert_eq!(paid, vec![(addr(1), 5_000), (addr(2), 10_000)]);
    assert_eq!(s, RewardState::new(), "claims are cleared");
    // Over budget: 30_000 + 60_000 claimed against 45_000.
    s.accrue(&p, RewardPool::Inference, addr(1), 30_000, &mut t)
        .unwrap();
    s.accrue(&p, RewardPool::Inference, addr(2), 60_000, &mut t)
        .unwrap();
    s.accrue(&p, RewardPool::Inference, addr(3), 1, &mut t)
        .unwrap();
    let paid = s.settle_epoch(&p, &mut t);
    // floor(45_000 · c / 90_001)
    assert_eq!(paid, vec![(addr(1), 14_999), (addr(2), 29_999)]);
}

#[test]
fn rwd_4_weighted_pool_pays_whole_budget_pro_rata() {
    let p = small_params(); // signing budget 5_000
    let mut s = RewardState::new();
    let mut t = Touched::new();
    s.accrue_commit_signers(&p, &[(addr(1), 30), (addr(2), 10)], &mut t)
        .unwrap();
    s.accrue_commit_signers(&p, &[(addr(1), 30)], &mut t)
        .unwrap();
    assert_eq!(s.claim(RewardPool::Signing, &addr(1)), 60);
    let paid = s.settle_epoch(&p, &mut t);
    assert_eq!(paid, vec![(addr(1), 4_285), (addr(2), 714)]);
}

#[test]
fn rwd_6_unspent_budget_is_not_minted() {
    let p = small_params();
    let mut s = RewardState::new();
    let mut t = Touched::new();
    assert!(s.settle_epoch(&p, &mut t).is_empty());
    s.accrue(&p, RewardPool::Learning, addr(1), 7, &mut t)
        .unwrap();
    assert_eq!(s.settle_epoch(&p, &mut t), vec![(addr(1), 7)]);
}

#[test]
fn rwd_5_claimants_are_bounded_and_failures_change_nothing() {
    let p = small_params();
    let mut s = RewardState::new();
    let mut t = Touched::new();
    for n in 1..=4 {
        s.accrue(&p, RewardPool::Learning, addr(n), 1, &mut t)
            .unwrap();
    }
    let before = s.clone();
    assert_eq!(
        s.accrue(&p, RewardPool::Learning, addr(5), 1, &mut t),
        Err(RewardError::TooManyClaimants(RewardPool::Learning))
    );
    // An existing claimant may still accrue; zero is a no-op.
    s.accrue(&p, RewardPool::Learning, addr(4), 1, &mut t)
        .unwrap();
    s.accrue(&p, RewardPool::Learning, addr(6), 0, &mut t)
        .unwrap();
    assert_eq!(s.pool_total(RewardPool::Learning).claimants, 4);
    assert_eq!(
        s.accrue(&p, RewardPool::Learning, addr(1), Amount::MAX, &mut t),
        Err(RewardError::Overflow(RewardPool::Learning))
    );
    assert_eq!(s.claim(RewardPool::Learning, &addr(1)), 1);
    assert_ne!(s, before);
    // Atomic batch: the fifth signer fails, so none of them accrues.
    let mut s = RewardState::new();
    let signers: Vec<(Address, Amount)> = (1..=5).map(|n| (addr(n), 1)).collect();
    let mut t = Touched::new();
    assert!(s.accrue_commit_signers(&p, &signers, &mut t).is_err());
    assert_eq!(s, RewardState::new());
    assert!(t.is_empty());
}

fn decision(outcome: DeltaOutcome) -> PolEvent {
    PolEvent::DeltaDecided(DeltaDecision {
        delta_id: [1; 32],
        target: TargetKey {
            model_id: [2; 32],
            kind: PolBlockType::Layer,
            layer: Some(0),
            expert: None,
        },
        submitter: addr(1),
        outcome,
        improvement_ppm: 10_000,
        agreed_loss_micronats: Some(990_000),
        agreed_head_loss_micronats: Some(1_000_000),
        cumulative_improvement_before_ppm: 0,
        revealed_stake: 70,
        honest_attestors: vec![(addr(10), 40), (addr(11), 30)],
        data_blocks: vec![([3; 32], addr(20)), ([4; 32], addr(21))],
    })
}

#[test]
fn rwd_11_12_14_pol_events_create_claims() {
    let p = RewardParams::default();
    let mut s = RewardState::new();
    let mut t = Touched::new();
    let accepted = decision(DeltaOutcome::Accepted {
        new_version: SemVer::new(1, 1, 0),
    });
    s.accrue_pol_event(&p, &accepted, &mut t).unwrap();
    assert_eq!(s.claim(RewardPool::Learning, &addr(1)), 510 * BLY);
    assert_eq!(s.claim(RewardPool::Datasets, &addr(20)), 51 * BLY);
    assert_eq!(s.claim(RewardPool::Datasets, &addr(21)), 51 * BLY);
    assert_eq!(s.claim(RewardPool::Attestation, &addr(10)), 40);
    // Rejected: attestors still earn, the submitter and data do not.
    let mut s = RewardState::new();
    let rejected = decision(DeltaOutcome::Rejected(
        RejectReason::InsufficientImprovement,
    ));
    s.accrue_pol_event(&p, &rejected, &mut t).unwrap();
    assert_eq!(s.claim(RewardPool::Learning, &addr(1)), 0);
    assert_eq!(s.claim(RewardPool::Datasets, &addr(20)), 0);
    assert_eq!(s.claim(RewardPool::Attestation, &addr(11)), 30);
    let expired = PolEvent::DeltaCommitExpired {
        commitment: [0; 32],
        submitter: addr(1),
    };
    let before = s.clone();
    s.accrue_pol_event(&p, &expired, &mut t).unwrap();
    assert_eq!(s, before);
}

#[test]
fn rwd_10_accrue_inference_returns_the_claim() {
    let p = RewardParams::default();
    let mut s = RewardState::new();
    let mut t = Touched::new();
    let r = s
        .accrue_inference(&p, addr(1), 2_000, 1_000, 5 * BLY, &mut t)
        .unwrap();
    assert_eq!(r, 2 * BLY);
    assert_eq!(s.claim(RewardPool::Inference, &addr(1)), 2 * BLY);
}

#[test]
fn rwd_k1_entries_match_entry_bytes_and_touched() {
    let p = small_params();
    let mut s = RewardState::new();
    let mut t = Touched::new();
    s.accrue(&p, RewardPool::Datasets, addr(3), 9, &mut t)
        .unwrap();
    s.accrue(&p, RewardPool::Inference, addr(4), 8, &mut t)
        .unwrap();
    let entries = s.entries();
    assert_eq!(entries.len(), 4);
    assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
    for (k, v) in &entries {
        assert!(t.contains(k));
        assert_eq!(s.entry_bytes(k).as_ref(), Some(v));
    }
    let key = StateKey::new(ns::REWARD_CLAIM, {
        let mut k = vec![RewardPool::Datasets.byte()];
        k.extend_from_slice(&addr(3).0);
        k
    });
    assert_eq!(
        Claim::decode(&s.entry_bytes(&key).unwrap()).unwrap(),
        Claim { amount: 9 }
    );
    assert_eq!(
        s.entry_bytes(&StateKey::new(ns::REWARD_POOL, vec![9])),
        None
    );
    assert_eq!(
        s.entry_bytes(&StateKey::new(ns::REWARD_CLAIM, vec![0, 1])),
        None
    );
    assert_eq!(RewardState::from_entries(&entries).unwrap(), s);
    let mut broken = entries.clone();
    broken[0].0.key.pop();
    assert_eq!(
        RewardState::from_entries(&broken).unwrap_err(),
        RewardError::BadEntry(ns::REWARD_CLAIM)
    );
    // Settling touches every key it removes.
    let mut t2 = Touched::new();
    s.settle_epoch(&p, &mut t2);
    for (k, _) in &entries {
        assert!(t2.contains(k));
        assert_eq!(s.entry_bytes(k), None);
    }
}

#[test]
fn mul_div_floor_edges() {
    assert_eq!(mul_div_floor(1, 1, 0), None);
    assert_eq!(
        mul_div_floor(u128::MAX, u128::MAX, u128::MAX),
        Some(u128::MAX)
    );
    assert_eq!(mul_div_floor(u128::MAX, 2, 1), None);
    assert_eq!(mul_div_floor(u128::MAX, 3, 4), Some(u128::MAX / 4 * 3 + 2));
    assert_eq!(mul_div_floor(0, 5, 7), Some(0));
}

fn pool_strategy() -> impl Strategy<Value = RewardPool> {
    (0usize..5).prop_map(|i| RewardPool::ALL[i])
}

proptest! {
    #[test]
    fn prop_mul_div_matches_u128(a in any::<u64>(), b in any::<u64>(), d in 1u128..u128::MAX) {
        let exact = u128::from(a) * u128::from(b) / d;
        prop_assert_eq!(mul_div_floor(u128::from(a), u128::from(b), d), Some(exact));
    }

    #[test]
    fn prop_mul_div_inverse(a in any::<u128>(), b in any::<u128>(), d in 1u128..u128::MAX) {
        // q = floor(a·b/d) ⇒ q·d ≤ a·b < (q+1)·d, checked in 256 bits.
        if let Some(q) = mul_div_floor(a, b, d) {
            let (qh, ql) = super::mul_wide(q, d);
            let (ph, pl) = super::mul_wide(a, b);
            prop_assert!((qh, ql) <= (ph, pl));
            let (nh, nl) = super::mul_wide(q + 1, d);
            prop_assert!((nh, nl) > (ph, pl));
        }
    }

    /// INV-RWD-BUDGET: whatever is claimed, no pool pays more than its
    /// budget, amount pools pay no one more than their claim, and the whole
    /// epoch pays at most the epoch budget.
    #[test]
    fn prop_pools_never_exceed_budget(
        claims in proptest::collection::vec((pool_strategy(), 0u8..6, 0u128..1u128 << 100), 0..40),
        daily in 1u128..1_000_000_000_000u128,
        epoch in 1u64..100,
    ) {
        let p = RewardParams {
            daily_budget: daily,
            target_block_time_ms: 60_000,
            epoch_length_blocks: epoch,
            max_claimants_per_pool: 3,
            ..RewardParams::default()
        };
        let mut total_paid: Amount = 0;
        for pool in RewardPool::ALL {
            let mut s = RewardState::new();
            let mut t = Touched::new();
            for (q, who, amount) in &claims {
                if *q == pool {
                    let _ = s.accrue(&p, pool, addr(*who), *amount, &mut t);
                }
            }
            let claimed: BTreeMap<Address, Amount> = (0u8..6)
                .map(|n| (addr(n), s.claim(pool, &addr(n))))
                .collect();
            let paid = s.settle_epoch(&p, &mut t);
            let sum: Amount = paid.iter().map(|x| x.1).sum();
            prop_assert!(sum <= pool_budget(&p, pool), "INV-RWD-BUDGET");
            prop_assert!(paid.windows(2).all(|w| w[0].0 < w[1].0));
            if !pool.is_weighted() {
                for (a, amount) in &paid {
                    prop_assert!(*amount <= claimed[a]);
                }
            }
            total_paid += sum;
        }
        prop_assert!(total_paid <= epoch_budget(&p));
    }

    /// RWD-11: splitting one gain into two deltas earns the same up to rounding.
    #[test]
    fn prop_learning_reward_split_neutral(a in 0u64..2_000_000, x in 0u64..500_000, y in 0u64..500_000) {
        let p = RewardParams::default();
        let whole = learning_reward(&p, a, x + y);
        let split = learning_reward(&p, a, x) + learning_reward(&p, a + x, y);
        prop_assert!(split <= whole);
        prop_assert!(whole - split <= 1);
        // And within [1, 3] × 500 BLY per 1%.
        let per_ppm = 500 * BLY / 10_000;
        prop_assert!(whole >= per_ppm * u128::from(x + y));
        prop_assert!(whole <= 3 * per_ppm * u128::from(x + y));
    }

    #[test]
    fn prop_inference_reward_never_exceeds_burn(tokens in any::<u64>(), q in any::<u32>(), burned in any::<u128>()) {
        prop_assert!(inference_reward(&RewardParams::default(), tokens, q, burned) <= burned);
    }

    #[test]
    fn prop_enc_round_trip(amount in any::<u128>(), claimants in any::<u32>()) {
        let c = Claim { amount };
        prop_assert_eq!(Claim::decode(&c.encode()).unwrap(), c);
        let t = PoolTotal { claimed: amount, claimants };
        prop_assert_eq!(PoolTotal::decode(&t.encode()).unwrap(), t);
        let p = RewardParams { daily_budget: amount, ..RewardParams::default() };
        prop_assert_eq!(RewardParams::decode(&p.encode()).unwrap(), p);
    }
}
