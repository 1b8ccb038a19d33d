//! Four validators as separate OS processes (`blyan node --config …`, the
//! built binary): transfers are submitted over HTTP, one validator is killed
//! with SIGKILL mid-run while submission goes on, then restarted on the same
//! data directory. It must catch up to the others with identical block
//! hashes and state roots at a common height, and hold every transfer that
//! was acknowledged as committed before, during and after the crash.
//!
//! Waiting is by polling against a generous deadline (never a timed
//! assertion): a slow machine only makes the test slower.

mod support;

use blyan_runtime::client::{get_json, height, post_json};
use blyan_runtime::devnet::{DevnetOptions, write_layout};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::genesis::GenesisBalance;
use blyan_state_machine::testkit::{address, key, transfer};
use blyan_state_machine::types::BLY;
use serde_json::{Value, json};
use std::path::Path;
use support::{Processes, eventually, free_addrs, is_committed};

const VALIDATORS: usize = 4;
const VICTIM: usize = 3;

/// Submits `count` transfers from `sender` (nonces from 0) to the live nodes
/// in turn; returns the ids the nodes accepted. A node that refuses or cannot
/// be reached is skipped (its nonce is then re-used). Each phase of the test
/// has its own sender, so a transfer lost with the killed node's mempool
/// leaves a nonce gap only in its own phase.
async fn submit(
    urls: &[String],
    live: &[usize],
    chain_id: &str,
    sender: &k256::ecdsa::SigningKey,
    count: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut nonce = 0u64;
    for k in 0..count {
        let tx = transfer(chain_id, sender, nonce, address(&key(8_000)), BLY);
        let url = &urls[live[k % live.len()]];
        let body = json!({ "tx": format!("0x{}", hex::encode(tx.encode())) });
        if let Ok((200, v)) = post_json(url, "/tx", &body).await {
            ids.push(v["id"].as_str().unwrap().to_string());
            nonce += 1;
        }
    }
    ids
}

fn dump_logs(dir: &Path) -> String {
    (0..VALIDATORS)
        .map(|i| {
            let err =
                std::fs::read_to_string(dir.join(format!("node-{i}.err"))).unwrap_or_default();
            format!("--- node {i}\n{err}")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_killed_with_sigkill_restarts_and_catches_up_with_identical_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), VALIDATORS);
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    // One sender per phase: before, in flight at the kill, during, after.
    let senders: Vec<_> = (0..4).map(|p| key(9_000 + p)).collect();
    opts.extra_balances = senders
        .iter()
        .map(|k| GenesisBalance {
            address: address(k),
            amount: 1_000 * BLY,
        })
        .collect();
    let addrs = free_addrs(VALIDATORS);
    let (genesis, configs) = write_layout(&opts, &addrs).unwrap();
    let urls: Vec<String> = addrs.iter().map(|(_, h)| format!("http://{h}")).collect();
    let mut procs = Processes::new(configs, dir.path());
    for i in 0..VALIDATORS {
        procs.start(i);
    }
    let all: Vec<usize> = (0..VALIDATORS).collect();
    let survivors: Vec<usize> = (0..VALIDATORS).filter(|i| *i != VICTIM).collect();
    for url in &urls {
        eventually("every node to commit a block", || async {
            (height(url).await? >= 1).then_some(())
        })
        .await;
    }
    procs.assert_running();

    // Before the crash: transfers through all four nodes, committed.
    let mut acked = Vec::new();
    let chain_id = &genesis.chain_id;
    let before = submit(&urls, &all, chain_id, &senders[0], 12).await;
    assert!(!before.is_empty(), "no transfer was accepted");
    for id in &before {
        eventually("a transfer to commit before the crash", || async {
            is_committed(&urls[0], id).await.then_some(())
        })
        .await;
    }
    acked.extend(before);

    // Mid-run: submit, kill the victim with SIGKILL, keep submitting to the others.
    let inflight = submit(&urls, &all, chain_id, &senders[1], 8).await;
    procs.kill(VICTIM);
    let during = submit(&urls, &survivors, chain_id, &senders[2], 12).await;
    assert!(
        !during.is_empty(),
        "no transfer was accepted after the crash"
    );
    // Three of four validators (3/4 of the stake) keep committing.
    for id in &during {
        eventually("a transfer to commit while a validator is down", || async {
            is_committed(&urls[0], id).await.then_some(())
        })
        .await;
    }
    acked.extend(during);
    // Transfers accepted just before the kill are acknowledged only if committed
    // (one sent to the victim may be lost with its mempool; that is allowed).
    for id in inflight {
        if is_committed(&urls[0], &id).await {
            acked.push(id);
        }
    }
    procs.assert_running();
    let down_at = height(&urls[0]).await.expect("node 0 answers");

    // Restart on the same data directory; traffic goes on.
    procs.start(VICTIM);
    let after = submit(&urls, &all, chain_id, &senders[3], 6).await;
    for id in &after {
        eventually("a transfer to commit after the restart", || async {
            is_committed(&urls[0], id).await.then_some(())
        })
        .await;
    }
    acked.extend(after);

    // The victim catches up past the height the others had when it came back.
    let target = height(&urls[0]).await.expect("node 0 answers").max(down_at) + 2;
    eventually("the restarted validator to catch up", || async {
        (height(&urls[VICTIM]).await? >= target).then_some(())
    })
    .await;
    procs.assert_running();

    // Identical blocks and state roots at a height all four have.
    let common = eventually("a common height", || async {
        let mut min = u64::MAX;
        for url in &urls {
            min = min.min(height(url).await?);
        }
        (min >= target).then_some(min)
    })
    .await;
    let mut blocks = Vec::new();
    for url in &urls {
        let (s, b) = get_json(url, &format!("/block/{common}")).await.unwrap();
        assert_eq!(s, 200, "{url}: {b}");
        blocks.push(b);
    }
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(
            b["hash"],
            blocks[0]["hash"],
            "node {i} block {common}\n{}",
            dump_logs(dir.path())
        );
        assert_eq!(
            b["state_root"], blocks[0]["state_root"],
            "node {i} block {common}"
        );
    }
    assert_ne!(blocks[0]["state_root"], Value::Null);

    // Every acknowledged-committed transfer is on every node, the restarted one included.
    for url in &urls {
        for id in &acked {
            assert!(
                is_committed(url, id).await,
                "{url} lacks committed transfer {id}\n{}",
                dump_logs(dir.path())
            );
        }
    }
}
