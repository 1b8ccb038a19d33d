//! Detection against cost (spec/inference.md RT-SIM-*): for a stage that
//! corrupts a fraction q of its steps, how many requests it serves before
//! quarantine, how many of them are wrong, and what each spot-check rate
//! costs, simulated with the crate's real rules.
//!
//! `cargo run --release -p blyan-route --example detection [trials] [seed]`

use blyan_route::PPM;
use blyan_route::detection::{SimParams, simulate};

fn main() {
    let mut args = std::env::args().skip(1);
    let trials: u32 = args
        .next()
        .map_or(1000, |s| s.parse().expect("trials: a number"));
    let seed: u64 = args
        .next()
        .map_or(1, |s| s.parse().expect("seed: a number"));
    let base = SimParams {
        seed,
        trials,
        ..SimParams::default()
    };
    println!(
        "{} trials per cell, {} tokens (steps) per request, hidden {}, top-k {}, corruption: normal noise sd {} on unit-variance states, honest kernels differ by ≤ 2^-10 relative, seed {}",
        trials,
        base.tokens_per_request,
        base.hidden,
        base.top_k,
        f64::from(base.corrupt_sigma_milli) / 1000.0,
        seed
    );
    println!();
    println!(
        "| q (corrupt steps) | spot_check_rate | requests served before quarantine, mean / p95 | wrong answers served, mean / p95 | extra compute (measured) | quarantined | corrupted checks missed |"
    );
    println!("|---|---|---|---|---|---|---|");
    let t0 = std::time::Instant::now();
    for q_ppm in [PPM, PPM / 10, PPM / 100, 0] {
        for rate_ppm in [10_000u32, 50_000, 200_000] {
            let p = SimParams {
                corrupt_ppm: q_ppm,
                spot_check_rate_ppm: rate_ppm,
                // An honest stage is never quarantined: run it for a fixed
                // 1,000 requests to measure the cost and false positives.
                max_requests: if q_ppm == 0 { 1_000 } else { base.max_requests },
                trials: if q_ppm == 0 { trials.min(20) } else { trials },
                ..base.clone()
            };
            let s = simulate(&p);
            let n = s.trials.len();
            println!(
                "| {} | {} | {:.1} / {} | {:.1} / {} | {:.2} % | {}/{} | {} |",
                f64::from(q_ppm) / f64::from(PPM),
                f64::from(rate_ppm) / f64::from(PPM),
                s.mean_requests(),
                s.p95_requests(),
                s.mean_wrong(),
                s.p95_wrong(),
                s.extra_compute() * 100.0,
                s.quarantined(),
                n,
                s.missed(),
            );
            assert_eq!(s.checker_blamed(), 0, "an honest checker was blamed");
        }
    }
    eprintln!("simulated in {:.1} s", t0.elapsed().as_secs_f64());
}
