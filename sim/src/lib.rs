//! Deterministic simulation of whole Blyan clusters (issue: sim, spec
//! `sim/README.md`): the real node driver from `blyan-state-machine`, hosted
//! by the same output loop as the runtime (`node::host::perform`), on
//! madsim's clock and scheduler and a simulated network (`net`), under a
//! nemesis of network, node, clock, disk and Byzantine faults, replayable
//! exactly from a seed.
//!
//! Everything here only exists when built with `RUSTFLAGS="--cfg madsim"`
//! (use `sim/blyan-sim`, which builds in `target/madsim`). Without the cfg
//! the crate is empty and the binary refuses to run: a simulation on the real
//! clock and OS scheduler would not be reproducible.

#[cfg(madsim)]
pub mod check;
#[cfg(madsim)]
pub mod config;
#[cfg(madsim)]
pub mod net;
#[cfg(madsim)]
pub mod pol;
#[cfg(madsim)]
pub mod run;
#[cfg(madsim)]
pub mod store;
#[cfg(madsim)]
pub mod workload;

/// The mutant named on the command line (feature `mutants`).
#[cfg(all(madsim, feature = "mutants"))]
pub fn parse_mutant(name: &str) -> Option<blyan_state_machine::consensus::Mutant> {
    use blyan_state_machine::consensus::Mutant;
    match name {
        "half-quorum" => Some(Mutant::HalfQuorum),
        "ignore-lock" => Some(Mutant::IgnoreLock),
        "forget-votes" => Some(Mutant::ForgetVotes),
        _ => None,
    }
}
