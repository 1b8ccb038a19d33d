//! `blyan-model-check check [options]` checks the Tendermint model
//! exhaustively (depth-first; `--bfs` for shortest counterexamples); without
//! options it checks the CI configuration (`ModelConfig::ci`, spec CONS-MC-4;
//! `--ci-crash` first for `ModelConfig::ci_crash`, the one with a crash),
//! with reduction R5 (CONS-MC-1; `--no-defer-inert` explores every single
//! delivery instead).
//! `explore [same options] [--addr HOST:PORT]` serves stateright's Explorer.
//!
//! Options: `--validators N --byzantine B --first-byzantine I --heights H
//! --rounds R --crashes C` (crash-restarts in a run, all validators together),
//! network `--fifo` (FIFO honest links; default unordered and duplicating)
//! with `--reliable` (no loss; default lossy) or `--explicit-loss` (explore
//! every `Drop` instead of reduction R2), Byzantine strategy `--full-byzantine`
//! or `--swing` (default split) with `--byzantine-proposals K`, `--mutant
//! ignore-lock|half-quorum|forget-votes`, `--no-timers` or
//! `--precommit-timeouts-only`, and for the search
//! `--threads T --depth D --timeout-s S --first-failure --simulate SEED`.

use blyan_model_check::{ModelConfig, model};
use blyan_state_machine::consensus::Mutant;
use stateright::{Checker, Model};
use std::process::ExitCode;
use std::time::Instant;

#[allow(clippy::type_complexity)] // a flat tuple of options, used once
fn parse(
    args: &[String],
) -> Result<
    (
        ModelConfig,
        usize,
        bool,
        String,
        Option<u64>,
        Option<usize>,
        bool,
        Option<u64>,
    ),
    String,
> {
    let mut cfg = ModelConfig {
        defer_inert: true,
        ..ModelConfig::ci()
    };
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut dfs = true;
    let mut timeout_s = None;
    let mut depth = None;
    let mut first_failure = false;
    let mut simulate = None;
    let mut addr = "localhost:3000".to_string();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || -> Result<&String, String> {
            it.next().ok_or_else(|| format!("{flag} needs a value"))
        };
        let num = |s: &String| s.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--ci-crash" => {
                cfg = ModelConfig {
                    defer_inert: cfg.defer_inert,
                    ..ModelConfig::ci_crash()
                }
            }
            "--validators" => cfg.validators = num(value()?)? as usize,
            "--heights" => cfg.heights = num(value()?)?,
            "--rounds" => cfg.rounds = num(value()?)? as u32,
            "--byzantine" => cfg.byzantine = num(value()?)? as usize,
            "--first-byzantine" => cfg.first_byzantine = num(value()?)? as usize,
            "--crashes" => cfg.max_crashes = num(value()?)? as usize,
            "--threads" => threads = num(value()?)? as usize,
            "--lossy" => cfg.lossy = true,
            "--reliable" => cfg.lossy = false,
            "--explicit-loss" => cfg.explicit_loss = true,
            "--unordered" => cfg.fifo_honest_links = false,
            "--fifo" => cfg.fifo_honest_links = true,
            "--depth" => depth = Some(num(value()?)? as usize),
            "--mutant" => {
                cfg.mutant = match value()?.as_str() {
                    "ignore-lock" => Mutant::IgnoreLock,
                    "half-quorum" => Mutant::HalfQuorum,
                    "forget-votes" => Mutant::ForgetVotes,
                    other => return Err(format!("unknown mutant {other}")),
                }
            }
            "--byzantine-proposals" => cfg.byzantine_proposals = num(value()?)? as u8,
            "--full-byzantine" => cfg.strategy = blyan_model_check::Strategy::Full,
            "--swing" => cfg.strategy = blyan_model_check::Strategy::Swing,
            "--simulate" => simulate = Some(num(value()?)?),
            "--no-timers" => cfg.timers = false,
            "--precommit-timeouts-only" => cfg.precommit_timeouts_only = true,
            "--no-defer-inert" => cfg.defer_inert = false,
            "--first-failure" => first_failure = true,
            "--timeout-s" => timeout_s = Some(num(value()?)?),
            "--dfs" => dfs = true,
            "--bfs" => dfs = false,
            "--addr" => addr = value()?.clone(),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if cfg.first_byzantine + cfg.byzantine > cfg.validators {
        cfg.first_byzantine = cfg.validators - cfg.byzantine.min(cfg.validators);
    }
    Ok((
        cfg,
        threads,
        dfs,
        addr,
        timeout_s,
        depth,
        first_failure,
        simulate,
    ))
}

/// Prints the numbers and any counterexample; non-zero exit on a violation.
fn report(
    checker: impl Checker<blyan_model_check::Model>,
    start: Instant,
    bounded: bool,
) -> ExitCode {
    let elapsed = start.elapsed();
    println!("unique states: {}", checker.unique_state_count());
    println!("states: {}", checker.state_count());
    println!("max depth: {}", checker.max_depth());
    println!("time: {:.1} s", elapsed.as_secs_f64());
    if bounded {
        println!("BOUNDED: a timeout, depth or simulation was set; this is no proof");
    }
    let mut failed = false;
    for name in ["agreement", "validity"] {
        if let Some(path) = checker.discovery(name) {
            failed = true;
            println!("VIOLATION of {name}; trace:");
            for action in path.into_actions() {
                println!("  {action:?}");
            }
        }
    }
    if checker.discovery("decided").is_none() {
        failed = true;
        println!("VIOLATION: no decision is reachable (the model is vacuous)");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        println!("properties hold: agreement, validity; a decision is reachable");
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprintln!("usage: blyan-model-check check|explore [options]");
        return ExitCode::from(2);
    };
    let (cfg, threads, dfs, addr, timeout_s, depth, first_failure, simulate) =
        match parse(&args[1..]) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
    println!("config: {cfg:?}");
    match command.as_str() {
        "check" => {
            let start = Instant::now();
            let bounded = depth.is_some() || timeout_s.is_some() || simulate.is_some();
            let mut m = model(cfg);
            if simulate.is_some() {
                m = m.for_simulation();
            }
            let mut builder = m.checker().threads(threads);
            if first_failure {
                builder = builder.finish_when(stateright::HasDiscoveries::AnyFailures);
            }
            if let Some(d) = depth {
                // Exhaustive up to this many steps (exact with BFS).
                builder = builder.target_max_depth(d);
            }
            if let Some(t) = timeout_s {
                // Stops early: the numbers are then a lower bound, not a proof.
                builder = builder.timeout(std::time::Duration::from_secs(t));
            }
            if let Some(seed) = simulate {
                // Random walks from `seed`: finds bugs fast, proves nothing.
                report(
                    builder
                        .spawn_simulation(seed, stateright::UniformChooser)
                        .join(),
                    start,
                    bounded,
                )
            } else if dfs {
                report(builder.spawn_dfs().join(), start, bounded)
            } else {
                report(builder.spawn_bfs().join(), start, bounded)
            }
        }
        "explore" => {
            println!("serving the Explorer on http://{addr}");
            model(cfg).checker().threads(threads).serve(addr.as_str());
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("unknown command {other}");
            ExitCode::from(2)
        }
    }
}
