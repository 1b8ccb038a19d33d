//! Detection against cost (spec/inference.md, RT-SIM-*): a simulation that
//! runs the real rules (RT-SPOT-1 keyed checks, RT-COMMIT-2/3 commitments
//! and comparison, RT-SPOT-4 settlement, RT-QUAR-1 quarantine) against a
//! stage that corrupts a fraction of its steps.
//!
//! - **RT-SIM-1** All randomness comes from [`SplitMix64`] seeded by the
//!   caller; a run is reproducible.
//! - **RT-SIM-2** Model: one stage serves requests of `tokens_per_request`
//!   steps; each step is corrupted with probability `corrupt_ppm`. A step
//!   checked by RT-SPOT-1 is recomputed by an honest checker (and on a
//!   mismatch by an honest referee), each with its own kernel noise
//!   (every element × (1 + u·2⁻¹⁰), u uniform in [−1, 1]); the hidden
//!   state is `hidden` standard normal values; a corrupted step adds normal
//!   noise of standard deviation `corrupt_sigma_milli / 1000` to every
//!   element. Checks are settled after the answer is streamed, so the
//!   request in which the fault is found is served (counted, and wrong if
//!   any of its steps was corrupted). A trial ends at quarantine or after
//!   `max_requests` (then it counts as censored).

use crate::commit::{Tolerance, commit_chunk};
use crate::quarantine::Quarantine;
use crate::rng::SplitMix64;
use crate::spot::{Settlement, settle, should_check};
use blyan_state_machine::types::Address;

/// RT-SIM-2 parameters.
#[derive(Clone, Debug)]
pub struct SimParams {
    pub seed: u64,
    pub trials: u32,
    pub corrupt_ppm: u32,
    pub spot_check_rate_ppm: u32,
    pub tokens_per_request: u32,
    pub max_requests: u64,
    pub hidden: u32,
    pub top_k: u32,
    pub corrupt_sigma_milli: u32,
    pub tolerance: Tolerance,
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            seed: 1,
            trials: 1000,
            corrupt_ppm: crate::PPM,
            spot_check_rate_ppm: crate::spot::DEFAULT_SPOT_CHECK_RATE_PPM,
            tokens_per_request: 64,
            max_requests: 100_000,
            hidden: 64,
            top_k: 16,
            corrupt_sigma_milli: 250,
            tolerance: Tolerance::default(),
        }
    }
}

/// Per-trial outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trial {
    /// Requests served, the one in which the fault was found included.
    pub requests: u64,
    /// Of those, requests with at least one corrupted step.
    pub wrong: u64,
    pub quarantined: bool,
    pub steps: u64,
    /// Checker recomputations.
    pub checks: u64,
    /// Referee recomputations.
    pub referees: u64,
    /// Checks of a corrupted step that the comparison let pass.
    pub missed: u64,
    /// Settlements that blamed the honest checker (never expected).
    pub checker_blamed: u64,
}

/// Aggregates over trials.
#[derive(Clone, Debug)]
pub struct SimStats {
    pub trials: Vec<Trial>,
}

fn percentile(mut v: Vec<u64>, pct: u64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let rank = (v.len() as u64 * pct).div_ceil(100).max(1);
    v[(rank - 1) as usize]
}

impl SimStats {
    fn mean(&self, f: impl Fn(&Trial) -> u64) -> f64 {
        self.trials.iter().map(|t| f(t) as f64).sum::<f64>() / self.trials.len().max(1) as f64
    }
    pub fn mean_requests(&self) -> f64 {
        self.mean(|t| t.requests)
    }
    pub fn p95_requests(&self) -> u64 {
        percentile(self.trials.iter().map(|t| t.requests).collect(), 95)
    }
    pub fn mean_wrong(&self) -> f64 {
        self.mean(|t| t.wrong)
    }
    pub fn p95_wrong(&self) -> u64 {
        percentile(self.trials.iter().map(|t| t.wrong).collect(), 95)
    }
    /// Extra compute as a fraction of the stage's own: (checks + referee
    /// runs) / steps served.
    pub fn extra_compute(&self) -> f64 {
        let steps: u64 = self.trials.iter().map(|t| t.steps).sum();
        let extra: u64 = self.trials.iter().map(|t| t.checks + t.referees).sum();
        extra as f64 / steps.max(1) as f64
    }
    pub fn quarantined(&self) -> usize {
        self.trials.iter().filter(|t| t.quarantined).count()
    }
    pub fn missed(&self) -> u64 {
        self.trials.iter().map(|t| t.missed).sum()
    }
    pub fn checker_blamed(&self) -> u64 {
        self.trials.iter().map(|t| t.checker_blamed).sum()
    }
}

fn kernel_noise(rng: &mut SplitMix64, h: &[f32]) -> Vec<f32> {
    h.iter()
        .map(|x| {
            let u = rng.unit_f64() * 2.0 - 1.0;
            (f64::from(*x) * (1.0 + u / 1024.0)) as f32
        })
        .collect()
}

/// RT-SIM-2: one trial.
pub fn run_trial(p: &SimParams, rng: &mut SplitMix64) -> Trial {
    let stage = Address([0xaa; 20]);
    let key = rng.bytes32();
    let mut quarantine = Quarantine::default();
    let mut t = Trial {
        requests: 0,
        wrong: 0,
        quarantined: false,
        steps: 0,
        checks: 0,
        referees: 0,
        missed: 0,
        checker_blamed: 0,
    };
    let mut now_ms = 0u64;
    while t.requests < p.max_requests {
        let request_id = rng.bytes32();
        let mut wrong = false;
        for step in 0..u64::from(p.tokens_per_request) {
            now_ms += 1;
            t.steps += 1;
            let corrupt = rng.chance_ppm(p.corrupt_ppm);
            wrong |= corrupt;
            if !should_check(&key, &request_id, 0, step, p.spot_check_rate_ppm) {
                continue;
            }
            t.checks += 1;
            let truth: Vec<f32> = (0..p.hidden).map(|_| rng.normal() as f32).collect();
            let sigma = f64::from(p.corrupt_sigma_milli) / 1000.0;
            let served: Vec<f32> = if corrupt {
                truth
                    .iter()
                    .map(|x| (f64::from(*x) + sigma * rng.normal()) as f32)
                    .collect()
            } else {
                kernel_noise(rng, &truth)
            };
            let commit = |s: &[f32]| {
                commit_chunk(step, p.hidden, s, p.top_k).expect("finite synthetic state")
            };
            let served_c = commit(&served);
            let checker_c = commit(&kernel_noise(rng, &truth));
            if crate::spot::first_comparison(&served_c, &checker_c, p.tolerance).is_some() {
                t.missed += u64::from(corrupt);
                continue;
            }
            t.referees += 1;
            let referee_c = commit(&kernel_noise(rng, &truth));
            match settle(&served_c, &checker_c, &referee_c, p.tolerance) {
                Settlement::StageFault => {
                    quarantine.quarantine(stage, now_ms);
                }
                Settlement::CheckerFault => t.checker_blamed += 1,
                Settlement::Agree | Settlement::Undecided => t.missed += u64::from(corrupt),
            }
        }
        t.requests += 1;
        t.wrong += u64::from(wrong);
        if quarantine.is_quarantined(&stage, now_ms) {
            t.quarantined = true;
            break;
        }
    }
    t
}

/// RT-SIM-1, RT-SIM-2: `p.trials` independent trials.
pub fn simulate(p: &SimParams) -> SimStats {
    let mut seeds = SplitMix64::new(p.seed);
    let trials = (0..p.trials)
        .map(|_| run_trial(p, &mut SplitMix64::new(seeds.next_u64())))
        .collect();
    SimStats { trials }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rt_sim_2_always_corrupt_always_checked_is_caught_in_the_first_request() {
        let s = simulate(&SimParams {
            trials: 5,
            corrupt_ppm: crate::PPM,
            spot_check_rate_ppm: crate::PPM,
            tokens_per_request: 8,
            ..SimParams::default()
        });
        for t in &s.trials {
            assert_eq!(
                (t.requests, t.wrong, t.quarantined, t.missed),
                (1, 1, true, 0),
                "{t:?}"
            );
        }
    }

    #[test]
    fn rt_sim_2_honest_stage_is_never_quarantined_and_costs_the_rate() {
        let s = simulate(&SimParams {
            trials: 2,
            corrupt_ppm: 0,
            spot_check_rate_ppm: 200_000,
            tokens_per_request: 64,
            max_requests: 100,
            ..SimParams::default()
        });
        assert_eq!(s.quarantined(), 0);
        assert_eq!(s.mean_wrong(), 0.0);
        assert_eq!(s.checker_blamed(), 0);
        // 12,800 steps at 0.2: 2,560 expected checks, sd ≈ 45; no referee runs.
        let extra = s.extra_compute();
        assert!((0.18..0.22).contains(&extra), "{extra}");
        assert_eq!(s.trials.iter().map(|t| t.referees).sum::<u64>(), 0);
    }

    #[test]
    fn rt_sim_1_runs_are_reproducible() {
        let p = SimParams {
            trials: 3,
            corrupt_ppm: 100_000,
            ..SimParams::default()
        };
        assert_eq!(simulate(&p).trials, simulate(&p).trials);
    }
}
