//! Signed transfers applied per second on one core, with and without
//! signature verification, with signatures from a verified cache (as a
//! validator applies a proposal), and a block built from cached candidates
//! (as a proposer does) (BENCH-1). Run: `cargo bench -p blyan-state-machine --bench transfers`.

use blyan_state_machine::ledger::{Ledger, Proposal};
use blyan_state_machine::params::Params;
use blyan_state_machine::testkit::{address, key, testnet, transfer};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const TXS_PER_BLOCK: usize = 2_000;
const SENDERS: usize = 200;

fn bench(c: &mut Criterion) {
    let net = testnet(4, SENDERS, Params::default());
    let ledger = Ledger::from_genesis(&net.genesis).unwrap();
    let txs: Vec<_> = (0..TXS_PER_BLOCK)
        .map(|i| {
            let from = &net.accounts[i % SENDERS];
            let to = address(&key(50_000 + (i as u64 % 1_000)));
            transfer("blyan-test", from, (i / SENDERS) as u64, to, 1_000)
        })
        .collect();
    let (block, _, outcome) = ledger
        .propose_block(Proposal {
            proposer: ledger.eligible_proposers()[0],
            ticket: None,
            time_ms: net.genesis.genesis_time_ms + 2_000,
            evidence: vec![],
            last_commit_signers: vec![],
            candidates: &txs,
        })
        .unwrap();
    assert_eq!(block.body.txs.len(), TXS_PER_BLOCK);
    assert!(outcome.receipts.iter().all(|r| r.failure.is_none()));

    let mut g = c.benchmark_group("apply_block_2000_transfers");
    g.throughput(Throughput::Elements(TXS_PER_BLOCK as u64));
    g.sample_size(10);
    g.bench_function("with_signature_verification", |b| {
        b.iter_batched(
            || (),
            |_| ledger.apply_block(&block).unwrap(),
            BatchSize::PerIteration,
        )
    });
    // LEDGER-SIG-1 / NODE-MP-6: what a validator does with a block whose
    // transactions its mempool already verified (the runtime's common case).
    let senders: std::collections::BTreeMap<_, _> = outcome
        .receipts
        .iter()
        .map(|r| (r.tx_id, r.sender))
        .collect();
    g.bench_function("signatures_cached", |b| {
        b.iter_batched(
            || (),
            |_| {
                ledger
                    .apply_block_with_verified(&block, &|id| senders.get(id).copied())
                    .unwrap()
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("propose_signatures_cached", |b| {
        b.iter_batched(
            || (),
            |_| {
                ledger
                    .propose_block_with_verified(
                        Proposal {
                            proposer: ledger.eligible_proposers()[0],
                            ticket: None,
                            time_ms: net.genesis.genesis_time_ms + 2_000,
                            evidence: vec![],
                            last_commit_signers: vec![],
                            candidates: &txs,
                        },
                        &|id| senders.get(id).copied(),
                    )
                    .unwrap()
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("signatures_trusted", |b| {
        b.iter_batched(
            || (),
            |_| ledger.apply_block_trusted_signatures(&block).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
