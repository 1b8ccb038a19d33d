//! State-root cost curve (STATE-3): updating 1,000 keys of a tree of 10k, 100k
//! and 1M keys (as one batch, and one key at a time), and one proof's
//! generation and verification.
//!
//! Trees are built once per size, outside the timed sections, from a seeded
//! splitmix64 stream, so every run measures the same keys. The cost per
//! touched key should grow with log2(n) (the tree's depth), not with n.
//!
//! Run: `cargo bench -p blyan-state-machine --bench state_root`
//! (one size: append `-- 1000000`).

use blyan_state_machine::smt::{SparseMerkleTree, verify_proof};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::{Duration, Instant};

const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
const UPDATES: usize = 1_000;
const SEED: u64 = 0x5eed_b1a4;

/// splitmix64 (Steele, Lea, Flood 2014): a tiny deterministic PRNG.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_exact_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        out
    }
}

/// `n` random (path, value hash) pairs.
fn entries(rng: &mut SplitMix64, n: usize) -> Vec<([u8; 32], [u8; 32])> {
    (0..n).map(|_| (rng.bytes32(), rng.bytes32())).collect()
}

/// Half updates of existing keys, half inserts of new keys, interleaved.
fn updates(
    rng: &mut SplitMix64,
    existing: &[([u8; 32], [u8; 32])],
) -> Vec<([u8; 32], Option<[u8; 32]>)> {
    (0..UPDATES)
        .map(|i| {
            let path = if i % 2 == 0 {
                let index = (rng.next() % existing.len() as u64) as usize;
                existing[index].0
            } else {
                rng.bytes32()
            };
            (path, Some(rng.bytes32()))
        })
        .collect()
}

fn bench_size(c: &mut Criterion, n: usize) {
    let mut rng = SplitMix64(SEED ^ n as u64);
    let pairs = entries(&mut rng, n);
    let started = Instant::now();
    let tree: SparseMerkleTree = pairs.iter().copied().collect();
    eprintln!(
        "state_root: built {n} keys in {:?} (bulk, untimed)",
        started.elapsed()
    );
    assert_eq!(tree.len(), n);
    let batch = updates(&mut rng, &pairs);
    let (probe_path, probe_value) = pairs[n / 2];

    let mut group = c.benchmark_group("state_root");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    group.throughput(Throughput::Elements(UPDATES as u64));
    group.bench_with_input(BenchmarkId::new("update_1000", n), &tree, |b, tree| {
        b.iter_batched(
            || tree.clone(),
            |mut copy| {
                copy.apply(batch.iter().copied());
                black_box(copy.root());
                // Returned so the old path copies are dropped outside the timing.
                copy
            },
            BatchSize::PerIteration,
        );
    });

    // The same updates one `insert` at a time: every key rehashes its whole
    // path, including ancestors shared with other keys of the batch.
    group.bench_with_input(
        BenchmarkId::new("update_1000_one_by_one", n),
        &tree,
        |b, tree| {
            b.iter_batched(
                || tree.clone(),
                |mut copy| {
                    for (path, value_hash) in &batch {
                        let value_hash = value_hash.expect("the bench only sets keys");
                        copy.insert(*path, value_hash);
                    }
                    black_box(copy.root());
                    copy
                },
                BatchSize::PerIteration,
            );
        },
    );

    group.throughput(Throughput::Elements(1));
    group.bench_with_input(BenchmarkId::new("prove", n), &tree, |b, tree| {
        b.iter(|| tree.prove(black_box(&probe_path)));
    });
    let root = tree.root();
    let proof = tree.prove(&probe_path);
    eprintln!(
        "state_root: proof depth at {n} keys: {}",
        proof.siblings.len()
    );
    assert!(verify_proof(&root, &probe_path, Some(&probe_value), &proof));
    group.bench_with_input(BenchmarkId::new("verify", n), &proof, |b, proof| {
        b.iter(|| {
            verify_proof(
                black_box(&root),
                black_box(&probe_path),
                Some(&probe_value),
                proof,
            )
        });
    });
    group.finish();
}

fn state_root(c: &mut Criterion) {
    for n in SIZES {
        // Each size builds, measures and drops its own tree, so peak memory is
        // that of the largest tree alone.
        bench_size(c, n);
    }
}

criterion_group!(benches, state_root);
criterion_main!(benches);
