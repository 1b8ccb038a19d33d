//! The fuzz tests' runner (issue 18): case counts, seeds and input counts.
//!
//! - `BLYAN_FUZZ_CASES` (default [`DEFAULT_CASES`]) is the number of
//!   proptest cases of a decoder whose cases are cheap; a costlier test runs
//!   a fixed percentage of it (each case feeds several inputs).
//! - `BLYAN_FUZZ_SEED` (a u64) makes a run reproducible; without it the
//!   seed comes from the clock, so every CI run explores new inputs. Each
//!   test prints its seed, so a failure can be replayed.
//! - No failure files are written (`failure_persistence: None`).
//!
//! Shared by the state machine's and the runtime's fuzz tests (the runtime
//! includes this file with `#[path]`).
#![allow(dead_code)]

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseResult, TestRng, TestRunner};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Cases of a cheap decoder when `BLYAN_FUZZ_CASES` is not set: small
/// enough that the whole suite stays within about a minute in CI.
pub const DEFAULT_CASES: u64 = 2000;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// `percent` % of the configured case count (at least one).
pub fn cases(percent: u64) -> u32 {
    let base = env_u64("BLYAN_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    (base.saturating_mul(percent) / 100).clamp(1, u64::from(u32::MAX)) as u32
}

/// What a fuzz test fed its decoder.
#[derive(Default)]
pub struct Counts {
    /// Unmutated encodings that decoded back to the value they encode.
    pub round_trips: AtomicU64,
    /// Mutated inputs the decoder accepted (and which passed the checks on accepted values).
    pub accepted: AtomicU64,
    /// Mutated inputs the decoder refused with an error.
    pub refused: AtomicU64,
}

impl Counts {
    pub fn round_trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
    /// Counts `r` as accepted or refused.
    pub fn outcome<T, E>(&self, r: &Result<T, E>) {
        if r.is_ok() {
            self.accepted();
        } else {
            self.refused();
        }
    }
    pub fn inputs(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
            + self.accepted.load(Ordering::Relaxed)
            + self.refused.load(Ordering::Relaxed)
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs `cases` proptest cases of `test` over `strategy` and prints how many
/// inputs the decoder saw. A panic in the decoder fails the case (proptest
/// catches it and shrinks the input), so a passing run had zero panics.
pub fn run<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    counts: &Counts,
    test: impl Fn(S::Value) -> TestCaseResult,
) {
    let seed = env_u64("BLYAN_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    seed_bytes[8..16].copy_from_slice(&fnv(name).to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_global_rejects: u32::MAX,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let start = Instant::now();
    let result = runner.run(&strategy, test);
    eprintln!(
        "fuzz {name}: {cases} cases, {} inputs ({} unmutated round trips; mutated: {} accepted, {} refused), {}, BLYAN_FUZZ_SEED={seed}, {:.1} s",
        counts.inputs(),
        counts.round_trips.load(Ordering::Relaxed),
        counts.accepted.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        if result.is_ok() { "0 panics" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("fuzz {name} (BLYAN_FUZZ_SEED={seed}): {e}");
    }
}
