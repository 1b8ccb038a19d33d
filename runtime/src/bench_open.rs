//! `blyan bench-open`: how long a node's store takes to open as the chain
//! grows (issue 18 item 6, NODE-STORE-6). Generates a chain of certified
//! blocks with the long-chain generator (`testkit::long_chain`: real k256
//! commit certificates, transfers among test accounts) into a fresh store,
//! then times [`ChainStore::open`] (the verified-state load) and
//! [`ChainStore::open_replaying`] (replay from genesis, what every open did
//! before) a few times each. Times are wall clock on this machine; a run
//! prints them as a Markdown table row per open mode.

use crate::Error;
use crate::store::ChainStore;
use blyan_state_machine::params::Params;
use blyan_state_machine::testkit::{long_chain, testnet};
use std::path::Path;
use std::time::Instant;

/// What one measurement found.
#[derive(Clone, Debug)]
pub struct OpenReport {
    pub blocks: u64,
    pub state_entries: usize,
    pub generate_s: f64,
    /// Seconds per open, in run order.
    pub fast_s: Vec<f64>,
    pub replay_s: Vec<f64>,
}

/// Generates `blocks` blocks of `txs_per_block` transfers (4 validators,
/// `accounts` accounts) into a new store under `dir`, then opens it `runs`
/// times each way. `dir` must not hold a store.
pub fn run(
    dir: &Path,
    blocks: u64,
    txs_per_block: usize,
    accounts: usize,
    runs: usize,
    skip_replay: bool,
) -> Result<OpenReport, Error> {
    assert!(runs > 0, "measure at least once");
    if dir.join("data").exists() {
        return Err(Error::Config(format!(
            "{} already holds a store; give a fresh directory",
            dir.display()
        )));
    }
    let data = dir.join("data");
    let net = testnet(4, accounts.max(1), Params::default());
    let started = Instant::now();
    {
        let (mut store, _) = ChainStore::open(&data, &net.genesis)?;
        store.set_bulk_load(true)?;
        let mut failed = None;
        long_chain(&net, blocks, txs_per_block, |c, outcome, after| {
            if failed.is_none()
                && let Err(e) = store.commit_block(c, outcome, after)
            {
                failed = Some(e);
            }
        })
        .map_err(|e| Error::Node(format!("generating the chain: {e}")))?;
        if let Some(e) = failed {
            return Err(e);
        }
        store.set_bulk_load(false)?;
    }
    let generate_s = started.elapsed().as_secs_f64();
    let mut report = OpenReport {
        blocks,
        state_entries: 0,
        generate_s,
        fast_s: Vec::new(),
        replay_s: Vec::new(),
    };
    let mut root = None;
    for _ in 0..runs {
        let t = Instant::now();
        let (store, ledger) = ChainStore::open(&data, &net.genesis)?;
        report.fast_s.push(t.elapsed().as_secs_f64());
        assert_eq!(
            ledger.height(),
            blocks,
            "the store holds the generated chain"
        );
        report.state_entries = ledger.entries().len();
        root = Some(ledger.state_root());
        drop(store);
    }
    if !skip_replay {
        for _ in 0..runs {
            let t = Instant::now();
            let (store, ledger) = ChainStore::open_replaying(&data, &net.genesis)?;
            report.replay_s.push(t.elapsed().as_secs_f64());
            assert_eq!(Some(ledger.state_root()), root, "both opens agree");
            drop(store);
        }
    }
    Ok(report)
}

/// The report as Markdown table rows.
pub fn table(r: &OpenReport) -> String {
    let fmt = |v: &[f64]| {
        if v.is_empty() {
            "not run".to_string()
        } else {
            v.iter()
                .map(|s| format!("{:.3}", s))
                .collect::<Vec<_>>()
                .join(" / ")
        }
    };
    format!(
        "| blocks | state entries | generate s | open s (verified state) | open s (replay from genesis) |\n\
         |---:|---:|---:|---|---|\n\
         | {} | {} | {:.1} | {} | {} |\n",
        r.blocks,
        r.state_entries,
        r.generate_s,
        fmt(&r.fast_s),
        fmt(&r.replay_s)
    )
}
