//! Network partitions in a 4-validator devnet (equal stake, so 3 of 4 is a
//! quorum and 2 of 4 is not), made with the transport's partition hook
//! (`GrpcTransport::set_blocked`): an isolated minority stalls while the
//! rest commit, and catches up to the same state root when healed; an even
//! split commits nothing, and progresses again when healed.
//!
//! Waiting is by polling against a generous deadline (never a timed
//! assertion). The "nothing commits" checks are safety properties (without
//! a quorum no block can be decided), so they hold however slow the machine.
mod support;

use blyan_runtime::client::get_json;
use blyan_runtime::devnet::{Devnet, DevnetOptions};
use blyan_state_machine::node::PeerId;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;
use support::{eventually, height};

async fn block(url: &str, h: u64) -> Value {
    let (s, b) = get_json(url, &format!("/block/{h}")).await.unwrap();
    assert_eq!(s, 200, "{b}");
    b
}

async fn start(dir: &std::path::Path) -> Devnet {
    let mut opts = DevnetOptions::new(dir.join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    Devnet::start(opts).await.unwrap()
}

/// Splits the devnet into `side` and the rest: each node drops frames to and
/// from every node on the other side.
fn split(net: &Devnet, side: &[usize]) {
    let ids: Vec<PeerId> = net.nodes.iter().map(|n| n.address).collect();
    for (i, n) in net.nodes.iter().enumerate() {
        let mine = side.contains(&i);
        let others: BTreeSet<PeerId> = (0..ids.len())
            .filter(|j| side.contains(j) != mine)
            .map(|j| ids[j])
            .collect();
        n.transport.set_blocked(others);
    }
}

fn heal(net: &Devnet) {
    for n in &net.nodes {
        n.transport.set_blocked(BTreeSet::new());
    }
}

/// Waits until every node is at `target` or above, then checks they agree on
/// the block and state root there.
async fn all_agree_at(urls: &[String], target: u64) {
    for url in urls {
        eventually("every node to reach the target height", || async {
            (height(url).await >= target).then_some(())
        })
        .await;
    }
    let first = block(&urls[0], target).await;
    assert_ne!(first["state_root"], Value::Null);
    for url in &urls[1..] {
        let b = block(url, target).await;
        assert_eq!(b["hash"], first["hash"], "{url}");
        assert_eq!(b["state_root"], first["state_root"], "{url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_isolated_minority_stalls_and_catches_up_after_healing() {
    let dir = tempfile::tempdir().unwrap();
    let net = start(dir.path()).await;
    let urls: Vec<String> = net.nodes.iter().map(|n| n.api_url()).collect();
    all_agree_at(&urls, 2).await;

    split(&net, &[0]);
    // Node 0 may still finish the block whose votes it already holds, no more.
    let isolated_at = height(&urls[0]).await;
    let mut majority_at = 0;
    for url in &urls[1..] {
        majority_at = majority_at.max(height(url).await);
    }
    for url in &urls[1..] {
        eventually("the majority to keep committing", || async {
            (height(url).await >= majority_at + 5).then_some(())
        })
        .await;
    }
    let stalled = height(&urls[0]).await;
    assert!(
        stalled <= isolated_at + 1,
        "the isolated node went from {isolated_at} to {stalled} without a quorum"
    );

    heal(&net);
    let mut top = 0;
    for url in &urls[1..] {
        top = top.max(height(url).await);
    }
    all_agree_at(&urls, top + 1).await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_even_split_commits_nothing_until_healed() {
    let dir = tempfile::tempdir().unwrap();
    let net = start(dir.path()).await;
    let urls: Vec<String> = net.nodes.iter().map(|n| n.api_url()).collect();
    all_agree_at(&urls, 2).await;

    split(&net, &[0, 1]);
    let mut split_at = 0;
    for url in &urls {
        split_at = split_at.max(height(url).await);
    }
    // Ten block intervals of no quorum on either side. At most one block
    // whose precommits were already in flight can still land.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    for url in &urls {
        let h = height(url).await;
        assert!(
            h <= split_at + 1,
            "{url} committed {h} with split at {split_at}: no side has a quorum"
        );
    }

    heal(&net);
    all_agree_at(&urls, split_at + 3).await;
    net.stop().await;
}
