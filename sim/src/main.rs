//! `blyan-sim`: run or sweep simulations. Build and run it with
//! `sim/blyan-sim ...` (it sets `--cfg madsim` and its own target directory).

#[cfg(not(madsim))]
fn main() {
    eprintln!(
        "blyan-sim must be built with RUSTFLAGS=\"--cfg madsim\" (use the wrapper: sim/blyan-sim run --seed 42).\n\
         Without it the simulation would run on the real clock and scheduler and could not be replayed."
    );
    std::process::exit(2);
}

#[cfg(madsim)]
fn main() {
    std::process::exit(cli::main(std::env::args().skip(1).collect()));
}

#[cfg(madsim)]
mod cli {
    use blyan_sim::config::{Faults, SimConfig};
    use blyan_sim::run::{Report, run};
    use std::time::Instant;

    const USAGE: &str = "usage:
  blyan-sim run   --seed N [--validators 4] [--byzantine 1] [--faults all|net|none]
                  [--duration 60s] [--liveness 60s] [--block-interval 2000ms] [--rate 5]
                  [--mutant half-quorum|ignore-lock|forget-votes] [--pol-liars N]
                  [--check-determinism] [--no-memo]
  blyan-sim sweep --seeds A..B [same options]";

    struct Args {
        cfg: SimConfig,
        faults_name: String,
        seeds: std::ops::Range<u64>,
        check_determinism: bool,
    }

    fn duration_ms(s: &str) -> Result<u64, String> {
        let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
            (n, 1)
        } else if let Some(n) = s.strip_suffix('s') {
            (n, 1_000)
        } else {
            (s, 1_000)
        };
        num.parse::<u64>()
            .map(|n| n * mult)
            .map_err(|_| format!("bad duration {s:?} (e.g. 600s or 500ms)"))
    }

    fn parse(args: &[String]) -> Result<Args, String> {
        let mut cfg = SimConfig::new(0, 4, 1, Faults::all());
        let mut faults_name = "all".to_string();
        let mut seeds = 0..0;
        let mut check_determinism = false;
        let mut pol_liars = None;
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or(format!("{flag} needs a value"));
            match flag.as_str() {
                "--seed" => {
                    cfg.seed = value()?.parse().map_err(|_| "bad --seed")?;
                }
                "--seeds" => {
                    let v = value()?;
                    let (a, b) = v.split_once("..").ok_or("--seeds A..B")?;
                    seeds = a.parse().map_err(|_| "bad --seeds")?
                        ..b.parse().map_err(|_| "bad --seeds")?;
                }
                "--validators" => {
                    cfg.validators = value()?.parse().map_err(|_| "bad --validators")?
                }
                "--byzantine" => cfg.byzantine = value()?.parse().map_err(|_| "bad --byzantine")?,
                "--faults" => {
                    faults_name = value()?.clone();
                    cfg.faults = Faults::parse(&faults_name).ok_or("--faults all|net|none")?;
                }
                "--duration" => cfg.duration_ms = duration_ms(value()?)?,
                "--liveness" => cfg.liveness_bound_ms = duration_ms(value()?)?,
                "--block-interval" => cfg.block_interval_ms = duration_ms(value()?)?,
                "--rate" => cfg.client_rate_per_s = value()?.parse().map_err(|_| "bad --rate")?,
                "--mutant" => {
                    let m = value()?.clone();
                    #[cfg(feature = "mutants")]
                    if blyan_sim::parse_mutant(&m).is_none() {
                        return Err(format!("unknown mutant {m}"));
                    }
                    #[cfg(not(feature = "mutants"))]
                    return Err(format!(
                        "--mutant {m} needs the `mutants` feature (sim/blyan-sim builds with it)"
                    ));
                    #[allow(unreachable_code)]
                    {
                        cfg.mutant = Some(m);
                    }
                }
                "--pol-liars" => pol_liars = Some(value()?.parse().map_err(|_| "bad --pol-liars")?),
                "--check-determinism" => check_determinism = true,
                "--no-memo" => cfg.memo = false,
                other => return Err(format!("unknown option {other}")),
            }
        }
        if cfg.validators > blyan_sim::run::MAX_VALIDATORS {
            return Err(format!(
                "at most {} validators",
                blyan_sim::run::MAX_VALIDATORS
            ));
        }
        if cfg.validators == 0 || cfg.byzantine >= cfg.validators {
            return Err("need validators > byzantine ≥ 0".into());
        }
        cfg.pol_liars = pol_liars.unwrap_or(cfg.byzantine);
        if cfg.pol_liars > cfg.validators {
            return Err("need --pol-liars ≤ validators".into());
        }
        Ok(Args {
            cfg,
            faults_name,
            seeds,
            check_determinism,
        })
    }

    fn summary(r: &Report) -> String {
        format!(
            "seed {}: heights {:?}, {} txs committed, simulated {} ms, finality p50 {} p99 {} ms, liveness {} ms, crashes {}, store errors {}, messages {}, pol deltas {} revealed {} accepted {} rejected {}/{}/{} (improvement/quorum/stale)",
            r.seed,
            r.heights,
            r.committed_txs,
            r.simulated_ms,
            r.finality_p50_ms.map_or("-".into(), |v| v.to_string()),
            r.finality_p99_ms.map_or("-".into(), |v| v.to_string()),
            r.liveness_ms.map_or("-".into(), |v| v.to_string()),
            r.crashes,
            r.store_errors,
            r.messages_sent,
            r.pol.deltas_built,
            r.pol.reveals_committed,
            r.pol.accepted,
            r.pol.rejected_insufficient,
            r.pol.rejected_no_quorum,
            r.pol.rejected_stale,
        )
    }

    /// SIM-MSG-1: messages per committed height by kind, against the
    /// 2n(n−1) that all-to-all prevotes and precommits need at least.
    fn messages_line(r: &Report, n: usize) -> String {
        let heights = r.heights.iter().copied().max().unwrap_or(0).max(1);
        let m = r.messages_by_kind;
        let per = |x: u64| x / heights;
        let n = n as u64;
        format!(
            "messages per height: {} (proposals {}, votes {}, txs {}, sync {}, status {}); all-to-all votes need 2n(n-1) = {}; conflicting proposals sent {}",
            per(m.total()),
            per(m.proposals),
            per(m.votes),
            per(m.txs),
            per(m.sync),
            per(m.status),
            2 * n * n.saturating_sub(1),
            m.conflicting_proposals
        )
    }

    pub fn main(args: Vec<String>) -> i32 {
        // Panics become violations of their seed (run() catches them); print
        // one line, not a backtrace per seed.
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            std::panic::set_hook(Box::new(|info| {
                eprintln!("panic: {info}");
            }));
        }
        let Some(command) = args.first() else {
            eprintln!("{USAGE}");
            return 2;
        };
        let a = match parse(&args[1..]) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e}\n{USAGE}");
                return 2;
            }
        };
        match command.as_str() {
            "run" => {
                let started = Instant::now();
                let r = run(a.cfg.clone());
                let wall = started.elapsed();
                println!("{}", summary(&r));
                println!(
                    "speed: {:.1} simulated s per wall s ({:.2} s wall)",
                    r.simulated_ms as f64 / 1e3 / wall.as_secs_f64(),
                    wall.as_secs_f64()
                );
                println!("{}", messages_line(&r, a.cfg.validators));
                let mut failed = !r.ok();
                for v in &r.violations {
                    println!("VIOLATION: {v}");
                }
                if a.check_determinism {
                    let again = run(a.cfg.clone());
                    if again.digest != r.digest {
                        println!(
                            "VIOLATION: nondeterminism: the same seed gave digest {} then {}",
                            hex::encode(r.digest),
                            hex::encode(again.digest)
                        );
                        failed = true;
                    } else {
                        println!("determinism: second run gave the same digest");
                    }
                }
                if failed {
                    println!("reproduce: {}", a.cfg.command(&a.faults_name));
                }
                println!("digest: {}", hex::encode(r.digest));
                i32::from(failed)
            }
            "sweep" => {
                if a.seeds.is_empty() {
                    eprintln!("error: sweep needs --seeds A..B\n{USAGE}");
                    return 2;
                }
                let started = Instant::now();
                let mut failures = Vec::new();
                let total = a.seeds.end - a.seeds.start;
                let mut pol = blyan_sim::pol::PolSummary::default();
                let (mut conflicting, mut simulated_ms) = (0u64, 0u64);
                for seed in a.seeds.clone() {
                    let mut cfg = a.cfg.clone();
                    cfg.seed = seed;
                    let r = run(cfg.clone());
                    pol.add(&r.pol);
                    conflicting += r.messages_by_kind.conflicting_proposals;
                    simulated_ms += r.simulated_ms;
                    if !r.ok() {
                        println!("FAIL {}", summary(&r));
                        for v in &r.violations {
                            println!("  VIOLATION: {v}");
                        }
                        println!("  reproduce: {}", cfg.command(&a.faults_name));
                        failures.push(seed);
                    }
                }
                let wall = started.elapsed().as_secs_f64();
                println!(
                    "sweep: {} seeds, {} failed {:?}, {:.1} s wall, {:.1} seeds/min, {:.1} simulated s per wall s, {} conflicting proposals sent",
                    total,
                    failures.len(),
                    failures,
                    wall,
                    total as f64 * 60.0 / wall,
                    simulated_ms as f64 / 1e3 / wall,
                    conflicting
                );
                println!(
                    "pol: {} deltas, {} revealed, {} accepted, rejected {} insufficient, {} without quorum, {} stale",
                    pol.deltas_built,
                    pol.reveals_committed,
                    pol.accepted,
                    pol.rejected_insufficient,
                    pol.rejected_no_quorum,
                    pol.rejected_stale
                );
                i32::from(!failures.is_empty())
            }
            other => {
                eprintln!("error: unknown command {other}\n{USAGE}");
                2
            }
        }
    }
}
