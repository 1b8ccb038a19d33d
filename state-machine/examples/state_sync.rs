//! State sync against replay (spec/node.md SYNC-*, issue 15 item 3):
//!
//! ```sh
//! cargo run --release -p blyan-state-machine --example state_sync -- \
//!     --blocks 100000 --accounts 100000
//! ```
//!
//! Generates a chain with the long-chain generator (`testkit::long_chain`:
//! 4 validators, real k256 transaction signatures and commit certificates,
//! `--txs` transfers per block), then times, on this one thread:
//! - **replay**: what a node syncing block by block does: every certificate
//!   verified against the set of its height, every block applied with every
//!   signature verified (`Ledger::apply_block`);
//! - **snapshot sync**: the snapshot taken and encoded (what the serving node
//!   does), then the manifest checked, every chunk decoded and verified, the
//!   ledger rebuilt and its certificate checked (`Restorer`).
//!
//! Both end on the same state root, which the run asserts.

use blyan_state_machine::consensus::K256Scheme;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::node::snapshot::{Chunk, Manifest, Restorer, take};
use blyan_state_machine::node::{CommittedBlock, ConsensusSets};
use blyan_state_machine::params::Params;
use blyan_state_machine::testkit::{long_chain, testnet};
use std::time::Instant;

fn main() {
    let mut blocks = 10_000u64;
    let mut accounts = 10_000usize;
    let mut txs = 1usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--blocks" => blocks = value.parse().expect("--blocks N"),
            "--accounts" => accounts = value.parse().expect("--accounts N"),
            "--txs" => txs = value.parse().expect("--txs N"),
            other => panic!("unknown option {other} (--blocks, --accounts, --txs)"),
        }
    }
    let net = testnet(4, accounts, Params::default());
    let t = Instant::now();
    let genesis = Ledger::from_genesis(&net.genesis).expect("genesis");
    let mut sets = ConsensusSets::genesis(&genesis).expect("genesis sets");
    let mut chain: Vec<CommittedBlock> = Vec::with_capacity(blocks as usize);
    let last_ledger = long_chain(&net, blocks, txs, |c, outcome, after| {
        sets = sets.advance(after, outcome).expect("sets advance");
        chain.push(c.clone());
    })
    .expect("the generator's chain is valid");
    let generate_s = t.elapsed().as_secs_f64();
    let last = chain.last().expect("at least one block").clone();
    println!(
        "chain: {blocks} blocks, {txs} transfers each, {accounts} accounts, {} state entries; generated in {generate_s:.1} s",
        last_ledger.entries().len()
    );

    // Replay: certificates and blocks verified, as NODE-SYNC-3 does.
    let t = Instant::now();
    let scheme = K256Scheme {
        chain_id: net.genesis.chain_id.clone(),
    };
    let mut ledger = Ledger::from_genesis(&net.genesis).expect("genesis");
    let mut replay_sets = ConsensusSets::genesis(&ledger).expect("genesis sets");
    for c in &chain {
        c.certificate
            .verify(&scheme, &replay_sets.set, c.block.header.height)
            .expect("certificate");
        let (next, outcome) = ledger.apply_block(&c.block).expect("block applies");
        replay_sets = replay_sets.advance(&next, &outcome).expect("sets");
        ledger = next;
    }
    let replay_s = t.elapsed().as_secs_f64();
    assert_eq!(ledger.state_root(), last.block.header.state_root);
    println!(
        "replay: {replay_s:.1} s ({:.3} ms per block)",
        replay_s * 1e3 / blocks as f64
    );

    // Snapshot: taken and encoded by the server...
    let t = Instant::now();
    let (manifest, chunks) = take(&last_ledger, &last, &sets);
    let manifest_bytes = manifest.encode();
    let chunk_bytes: Vec<Vec<u8>> = chunks.iter().map(Canonical::encode).collect();
    let take_s = t.elapsed().as_secs_f64();
    let total_bytes: usize = chunk_bytes.iter().map(Vec::len).sum();
    // ...then checked and restored by the new node.
    let t = Instant::now();
    let manifest = Manifest::decode(&manifest_bytes).expect("manifest decodes");
    let mut restorer = Restorer::new(manifest, &last.block.hash()).expect("manifest");
    for bytes in &chunk_bytes {
        restorer
            .add(Chunk::decode(bytes).expect("chunk decodes"))
            .expect("chunk verifies");
    }
    let (restored, _, _) = restorer.finish(&net.genesis).expect("restores");
    let restore_s = t.elapsed().as_secs_f64();
    assert_eq!(restored.state_root(), ledger.state_root());
    println!(
        "snapshot: {} chunks, {:.1} MiB; taken and encoded in {take_s:.2} s; verified and restored in {restore_s:.2} s ({:.0}x faster than replay)",
        chunk_bytes.len(),
        (total_bytes + manifest_bytes.len()) as f64 / (1 << 20) as f64,
        replay_s / restore_s
    );
}
