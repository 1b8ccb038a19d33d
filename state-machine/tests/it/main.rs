//! One integration-test binary for the crate (keeps link time down).
mod allowance;
mod committee;
mod consensus;
mod crypto;
mod fees;
mod fuzz;
mod ledger;
mod node;
mod pol_flow;
mod props;
mod sync;
mod vrf;
