use blyan_route::commit::{ChunkCommitment, Tolerance, TopValue, commit_chunk};
use blyan_route::quarantine::Quarantine;
use blyan_route::rng::SplitMix64;
use blyan_route::spot::*;
use blyan_state_machine::types::Address;
use proptest::prelude::*;

fn state(seed: u64, n: usize) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

/// An honest recomputation: every element × (1 + u·2⁻¹⁰).
fn honest(seed: u64, truth: &[f32]) -> ChunkCommitment {
    let mut r = SplitMix64::new(seed);
    let s: Vec<f32> = truth
        .iter()
        .map(|x| (f64::from(*x) * (1.0 + (r.unit_f64() * 2.0 - 1.0) / 1024.0)) as f32)
        .collect();
    commit_chunk(3, 64, &s, 16).unwrap()
}

fn corrupt(truth: &[f32]) -> ChunkCommitment {
    let s: Vec<f32> = truth.iter().map(|x| -x).collect();
    commit_chunk(3, 64, &s, 16).unwrap()
}

#[test]
fn rt_spot_4_a_lying_checker_is_outvoted_and_the_stage_is_not_quarantined() {
    let truth = state(1, 64);
    let tol = Tolerance::default();
    let stage = honest(10, &truth);
    let liar = corrupt(&truth);
    let referee = honest(11, &truth);
    assert_eq!(
        first_comparison(&stage, &liar, tol),
        None,
        "a mismatch goes to a referee"
    );
    let verdict = settle(&stage, &liar, &referee, tol);
    assert_eq!(verdict, Settlement::CheckerFault);
    // Applying the verdict (RT-SPOT-5) quarantines the checker only.
    let (stage_node, checker_node) = (Address([1; 20]), Address([2; 20]));
    let mut q = Quarantine::default();
    if verdict == Settlement::CheckerFault {
        q.quarantine(checker_node, 0);
    }
    assert!(!q.is_quarantined(&stage_node, 1));
    assert!(q.is_quarantined(&checker_node, 1));
}

#[test]
fn rt_spot_4_a_corrupt_stage_loses_to_two_honest_nodes() {
    let truth = state(2, 64);
    let tol = Tolerance::default();
    assert_eq!(
        settle(
            &corrupt(&truth),
            &honest(1, &truth),
            &honest(2, &truth),
            tol
        ),
        Settlement::StageFault
    );
    assert_eq!(
        settle(
            &honest(3, &truth),
            &honest(1, &truth),
            &corrupt(&truth),
            tol
        ),
        Settlement::Agree,
        "no referee when the first two agree"
    );
    // A referee agreeing with neither decides nothing.
    let other = state(99, 64);
    assert_eq!(
        settle(
            &corrupt(&truth),
            &honest(1, &truth),
            &honest(2, &other),
            tol
        ),
        Settlement::Undecided
    );
}

fn garbage() -> impl Strategy<Value = ChunkCommitment> {
    (
        prop::collection::btree_map(0u32..64, any::<u16>(), 1..32),
        0u64..5,
        1u16..3,
    )
        .prop_map(|(m, first_token, tokens)| ChunkCommitment {
            first_token,
            tokens,
            hidden: 64,
            values: m
                .into_iter()
                .map(|(index, value)| TopValue { index, value })
                .collect(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// RT-SPOT-4: whatever a lying checker sends, an honest stage settled
    /// by an honest referee is never at fault.
    #[test]
    fn rt_spot_4_one_liar_cannot_quarantine_an_honest_stage(seed: u64, lie in garbage(), liar_flips in any::<bool>()) {
        let truth = state(seed, 64);
        let stage = honest(seed ^ 1, &truth);
        let referee = honest(seed ^ 2, &truth);
        let checker = if liar_flips { corrupt(&truth) } else { lie };
        let v = settle(&stage, &checker, &referee, Tolerance::default());
        prop_assert_ne!(v, Settlement::StageFault);
    }

    /// RT-SPOT-4: two honest nodes always convict a stage that flips signs.
    #[test]
    fn rt_spot_4_two_honest_nodes_convict(seed: u64) {
        let truth = state(seed, 64);
        let v = settle(&corrupt(&truth), &honest(seed ^ 1, &truth), &honest(seed ^ 2, &truth), Tolerance::default());
        prop_assert_eq!(v, Settlement::StageFault);
    }
}
