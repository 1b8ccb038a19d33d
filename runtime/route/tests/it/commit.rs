use blyan_route::Error;
use blyan_route::commit::*;
use blyan_route::rng::SplitMix64;
use blyan_state_machine::crypto::sign;
use blyan_state_machine::testkit::{address, key};
use blyan_state_machine::tx::public_key_of;
use proptest::prelude::*;

fn normal_state(seed: u64, n: usize) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

/// Every element × (1 + u·rel), u uniform in [−1, 1].
fn perturb(seed: u64, s: &[f32], rel: f64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed ^ 0x5555);
    s.iter()
        .map(|x| (f64::from(*x) * (1.0 + (r.unit_f64() * 2.0 - 1.0) * rel)) as f32)
        .collect()
}

#[test]
fn rt_commit_2_bf16_rounds_to_nearest_even() {
    assert_eq!(bf16(1.0), 0x3f80);
    assert_eq!(bf16(-2.0), 0xc000);
    assert_eq!(bf16(0.0), 0x0000);
    assert_eq!(bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even stays
    assert_eq!(bf16(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, odd rounds up
    assert_eq!(bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(bf16_steps(bf16(1.0), bf16(-1.0)), 2 * 0x3f80);
    assert_eq!(
        bf16_steps(0x0000, 0x8000),
        0,
        "both zeros are the same point"
    );
}

#[test]
fn rt_commit_2_selects_largest_magnitudes_ties_to_lower_index() {
    let s = [0.5, -3.0, 2.0, 3.0, -0.25, 2.0];
    let c = commit_chunk(64, 3, &s, 3).unwrap();
    assert_eq!((c.first_token, c.tokens, c.hidden), (64, 2, 3));
    let idx: Vec<u32> = c.values.iter().map(|v| v.index).collect();
    // |−3| = |3| > 2 = 2: both 3s, then the first 2 (index 2).
    assert_eq!(idx, vec![1, 2, 3]);
    assert_eq!(c.values[0].value, bf16(-3.0));
    // k larger than the state keeps everything.
    assert_eq!(commit_chunk(0, 3, &s, 100).unwrap().values.len(), 6);
}

#[test]
fn rt_commit_1_bad_input_is_refused() {
    assert_eq!(
        commit_chunk(0, 2, &[1.0, f32::NAN], 4),
        Err(Error::NonFinite { index: 1 })
    );
    assert_eq!(
        commit_chunk(0, 2, &[f32::INFINITY, 1.0], 4),
        Err(Error::NonFinite { index: 0 })
    );
    assert!(matches!(
        commit_chunk(0, 2, &[1.0; 3], 4),
        Err(Error::InvalidHidden(_))
    ));
    assert!(matches!(
        commit_chunk(0, 2, &[], 4),
        Err(Error::InvalidHidden(_))
    ));
    assert!(matches!(
        commit_chunk(0, 1, &[1.0; 33], 4),
        Err(Error::InvalidHidden(_))
    ));
    assert!(matches!(
        commit_chunk(0, 1, &[1.0], 0),
        Err(Error::InvalidHidden(_))
    ));
    assert!(matches!(
        commit_chunk(0, 0, &[1.0], 1),
        Err(Error::InvalidHidden(_))
    ));
    let mut c = Committer::new(2, 4, 0).unwrap();
    assert_eq!(
        c.push(&[1.0, 2.0, f32::NAN, 0.0]),
        Err(Error::NonFinite { index: 2 })
    );
    assert!(matches!(c.push(&[1.0]), Err(Error::InvalidHidden(_))));
    // Nothing was consumed by the refused pushes.
    assert_eq!(c.finish().unwrap(), None);
}

#[test]
fn rt_commit_2_committer_chunks_at_absolute_multiples_of_32() {
    let hidden = 8u32;
    let states = normal_state(1, 70 * hidden as usize);
    let mut c = Committer::new(hidden, 16, 5).unwrap();
    let chunks = c.push(&states[..30 * 8]).unwrap();
    // Rows for positions 5..35 complete only the chunk 5..32.
    assert_eq!(
        chunks
            .iter()
            .map(|c| (c.first_token, c.tokens))
            .collect::<Vec<_>>(),
        vec![(5, 27)]
    );
    let mut all = Committer::new(hidden, 16, 5).unwrap();
    let mut got = all.push(&states).unwrap();
    got.extend(all.finish().unwrap());
    let bounds: Vec<(u64, u16)> = got.iter().map(|c| (c.first_token, c.tokens)).collect();
    assert_eq!(bounds, vec![(5, 27), (32, 32), (64, 11)]);
    // Each equals a direct commitment to the same rows.
    let rows = |from: usize, n: usize| &states[from * 8..(from + n) * 8];
    assert_eq!(got[0], commit_chunk(5, hidden, rows(0, 27), 16).unwrap());
    assert_eq!(got[1], commit_chunk(32, hidden, rows(27, 32), 16).unwrap());
    assert_eq!(got[2], commit_chunk(64, hidden, rows(59, 11), 16).unwrap());
    // Token by token gives the same chunks.
    let mut one = Committer::new(hidden, 16, 5).unwrap();
    let mut step: Vec<ChunkCommitment> = Vec::new();
    for r in states.chunks(8) {
        step.extend(one.push(r).unwrap());
    }
    step.extend(one.finish().unwrap());
    assert_eq!(step, got);
}

#[test]
fn rt_commit_3_shape_differences_mismatch() {
    let s = normal_state(3, 64);
    let a = commit_chunk(0, 64, &s, 8).unwrap();
    let b = commit_chunk(1, 64, &s, 8).unwrap();
    assert!(!compare(&a, &b, Tolerance::default()).matches);
    let c = commit_chunk(0, 64, &s, 9).unwrap();
    assert!(!compare(&a, &c, Tolerance::default()).matches);
    assert!(compare(&a, &a, Tolerance::default()).matches);
}

#[test]
fn rt_commit_3_near_boundary_swaps_pass_but_large_outsiders_fail() {
    // a's 4th value is just above b's smallest: a legitimate swap.
    let sa = [8.0f32, 7.0, 6.0, 5.01, 5.0, 0.1];
    let sb = [8.0f32, 7.0, 6.0, 5.0, 5.01, 0.1];
    let (a, b) = (
        commit_chunk(0, 6, &sa, 4).unwrap(),
        commit_chunk(0, 6, &sb, 4).unwrap(),
    );
    let r = compare(&a, &b, Tolerance::default());
    assert_eq!((r.checked, r.passed, r.matches), (5, 5, true));
    // Claiming a value far above the other's floor fails.
    let sc = [8.0f32, 7.0, 6.0, 0.1, 5.0, 9.0];
    let c = commit_chunk(0, 6, &sc, 4).unwrap();
    let r = compare(&a, &c, Tolerance::default());
    assert!(!r.matches && r.passed < r.checked);
}

#[test]
fn rt_commit_4_signed_commitments_verify_and_round_trip() {
    let k = key(5);
    let s = normal_state(4, 2 * 64);
    let c = StageCommitment {
        request_id: [1; 32],
        model: [2; 32],
        head_version: [3; 32],
        node: address(&k),
        first_layer: 0,
        last_layer: 1,
        chunk: commit_chunk(32, 64, &s, 16).unwrap(),
    };
    let signed = SignedCommitment {
        signature: sign(&k, &c.signing_bytes("chain")),
        public_key: public_key_of(&k),
        commitment: c,
    };
    signed.verify("chain").unwrap();
    assert_eq!(
        signed.verify("other"),
        Err(Error::BadSignature("commitment"))
    );
    let bytes = signed.encode();
    assert_eq!(SignedCommitment::decode(&bytes).unwrap(), signed);
    assert!(SignedCommitment::decode(&bytes[..bytes.len() - 1]).is_err());
    let mut long = bytes.clone();
    long.push(1);
    assert!(SignedCommitment::decode(&long).is_err());
    let mut tampered = signed.clone();
    tampered.commitment.chunk.values[0].value ^= 1;
    assert_eq!(
        tampered.verify("chain"),
        Err(Error::BadSignature("commitment"))
    );
    let mut other_node = signed.clone();
    other_node.commitment.node = address(&key(6));
    assert!(matches!(
        other_node.verify("chain"),
        Err(Error::WrongKey { .. })
    ));
    let mut unordered = signed;
    unordered.commitment.chunk.values.swap(0, 1);
    assert!(matches!(
        unordered.verify("chain"),
        Err(Error::InvalidHidden(_))
    ));
}

fn finite() -> impl Strategy<Value = f32> {
    prop_oneof![
        -1.0e4f32..1.0e4,
        // Many exact ties.
        prop::sample::select(vec![-2.0f32, -1.0, 0.0, 1.0, 2.0]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// RT-COMMIT-3: a commitment matches itself.
    #[test]
    fn rt_commit_3_identical_inputs_match(hidden in 1u32..40, tokens in 1usize..5, k in 1u32..64, seed: u64) {
        let s = normal_state(seed, hidden as usize * tokens);
        let a = commit_chunk(0, hidden, &s, k).unwrap();
        let b = commit_chunk(0, hidden, &s, k).unwrap();
        prop_assert_eq!(&a, &b);
        let r = compare(&a, &b, Tolerance::default());
        prop_assert!(r.matches && r.passed == r.checked);
    }

    /// RT-COMMIT-3a: any per-element relative difference ≤ 2⁻¹⁰ (different
    /// kernels) passes every index, whatever the values and ties.
    #[test]
    fn rt_commit_3a_within_tolerance_always_matches(
        values in prop::collection::vec(finite(), 1..256),
        k in 1u32..80,
        seed: u64,
    ) {
        let hidden = values.len() as u32;
        let other = perturb(seed, &values, 1.0 / 1024.0);
        let a = commit_chunk(7, hidden, &values, k).unwrap();
        let b = commit_chunk(7, hidden, &other, k).unwrap();
        let r = compare(&a, &b, Tolerance::default());
        prop_assert!(r.matches, "{:?}", r);
        prop_assert_eq!(r.passed, r.checked);
    }

    /// RT-COMMIT-3b: a sign flip of the output mismatches.
    #[test]
    fn rt_commit_3b_sign_flip_mismatches(hidden in 8u32..64, tokens in 1usize..4, k in 4u32..64, seed: u64) {
        let s = normal_state(seed, hidden as usize * tokens);
        let flipped: Vec<f32> = perturb(seed, &s, 1.0 / 1024.0).iter().map(|x| -x).collect();
        let a = commit_chunk(0, hidden, &s, k).unwrap();
        let b = commit_chunk(0, hidden, &flipped, k).unwrap();
        prop_assert!(!compare(&a, &b, Tolerance::default()).matches);
    }

    /// RT-COMMIT-3b: noise well above the tolerance (every element off by
    /// 10–50 % either way) mismatches.
    #[test]
    fn rt_commit_3b_noise_above_tolerance_mismatches(hidden in 16u32..64, tokens in 1usize..4, k in 8u32..64, seed: u64, pct in 10u32..50) {
        let s = normal_state(seed, hidden as usize * tokens);
        let mut r = SplitMix64::new(seed ^ 77);
        let noisy: Vec<f32> = s
            .iter()
            .map(|x| {
                let sign = if r.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
                x * (1.0 + sign * pct as f32 / 100.0)
            })
            .collect();
        let a = commit_chunk(0, hidden, &s, k).unwrap();
        let b = commit_chunk(0, hidden, &noisy, k).unwrap();
        prop_assert!(!compare(&a, &b, Tolerance::default()).matches);
    }

    /// RT-COMMIT-3: the comparison is symmetric.
    #[test]
    fn rt_commit_3_symmetric(hidden in 4u32..64, k in 1u32..32, seed: u64, rel in 0u32..200) {
        let s = normal_state(seed, hidden as usize);
        let o = perturb(seed, &s, f64::from(rel) / 1000.0);
        let a = commit_chunk(0, hidden, &s, k).unwrap();
        let b = commit_chunk(0, hidden, &o, k).unwrap();
        prop_assert_eq!(compare(&a, &b, Tolerance::default()), compare(&b, &a, Tolerance::default()));
    }
}
