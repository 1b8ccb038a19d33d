//! A 4-validator devnet on loopback in one process (ephemeral ports, temp
//! dirs, 300 ms blocks): transfers submitted over HTTP commit on every node
//! with identical blocks and state roots; malformed input gets clear errors
//! and does not disturb the network.
//!
//! Waiting is by polling against a generous deadline (never a timed
//! assertion): a slow machine only makes the test slower.

mod support;

use blyan_runtime::client::{get_json, post_json, request};
use blyan_runtime::devnet::{DEVNET_PASSWORD, Devnet, DevnetOptions};
use blyan_runtime::keystore::read_key_file;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::testkit::{address, key, transfer};
use blyan_state_machine::tx::SignedTx;
use blyan_state_machine::types::{Address, BLY};
use serde_json::{Value, json};
use support::{DEADLINE, eventually, height};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tx_body(tx: &SignedTx) -> Value {
    json!({ "tx": format!("0x{}", hex::encode(tx.encode())) })
}

async fn start(dir: &std::path::Path) -> Devnet {
    let mut opts = DevnetOptions::new(dir.join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    // These tests poll far above the public rate limit; `rate_limits_*` tests the limits.
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    Devnet::start(opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_validators_commit_transfers_with_identical_state() {
    let dir = tempfile::tempdir().unwrap();
    let net = start(dir.path()).await;
    let urls: Vec<String> = net.nodes.iter().map(|n| n.api_url()).collect();
    let faucet = read_key_file(&net.faucet_key_file, DEVNET_PASSWORD).unwrap();
    assert_eq!(address(&faucet), net.faucet);
    let chain_id = net.genesis.chain_id.clone();

    // Ten transfers to two recipients, spread over the four nodes' APIs.
    let recipients: Vec<Address> = (0..2).map(|i| address(&key(5_000 + i))).collect();
    let mut ids = Vec::new();
    for nonce in 0..10u64 {
        let to = recipients[nonce as usize % 2];
        let tx = transfer(&chain_id, &faucet, nonce, to, (nonce as u128 + 1) * BLY);
        let url = &urls[nonce as usize % 4];
        let (s, v) = post_json(url, "/tx", &tx_body(&tx)).await.unwrap();
        assert_eq!(s, 200, "submit nonce {nonce}: {v}");
        assert_eq!(v["id"], format!("0x{}", hex::encode(tx.id())));
        ids.push(v["id"].as_str().unwrap().to_string());
    }

    // Every node commits every transfer, successfully.
    for url in &urls {
        for id in &ids {
            let receipt = eventually("the transfer to commit", || async {
                let (s, v) = get_json(url, &format!("/tx/{id}")).await.unwrap();
                (s == 200).then_some(v)
            })
            .await;
            assert_eq!(receipt["success"], true, "{receipt}");
        }
    }

    // Identical blocks and state roots at a height all four have reached.
    let h = eventually("all nodes to pass the last transfer's height", || async {
        let mut min = u64::MAX;
        for url in &urls {
            min = min.min(height(url).await);
        }
        (min >= 2).then_some(min)
    })
    .await;
    let mut blocks = Vec::new();
    for url in &urls {
        let (s, b) = get_json(url, &format!("/block/{h}")).await.unwrap();
        assert_eq!(s, 200, "{b}");
        blocks.push(b);
    }
    for b in &blocks[1..] {
        assert_eq!(b["hash"], blocks[0]["hash"]);
        assert_eq!(b["state_root"], blocks[0]["state_root"]);
    }
    assert_ne!(blocks[0]["state_root"], Value::Null);

    // The recipients' balances (sums of 1,3,5,7,9 and 2,4,6,8,10 BLY) on every node.
    for url in &urls {
        for (i, who) in recipients.iter().enumerate() {
            let expected = ((25 + 5 * i as u128) * BLY).to_string();
            eventually("the balance to show", || async {
                let (_, v) = get_json(url, &format!("/account/{who}")).await.unwrap();
                (v["balance"] == expected.as_str()).then_some(())
            })
            .await;
        }
    }
    eventually("the faucet's nonce to reach 10", || async {
        let (s, v) = get_json(&urls[0], &format!("/account/{}", net.faucet))
            .await
            .unwrap();
        (s == 200 && v["nonce"].as_u64() == Some(10)).then_some(())
    })
    .await;

    // Metrics and latest block are served.
    let (s, metrics) = request(&urls[0], "GET", "/metrics", None).await.unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert_eq!(s, 200);
    assert!(
        metrics.contains("blyan_committed_txs_total 10"),
        "{metrics}"
    );
    assert!(metrics.contains("blyan_tx_finality_ms_bucket{le=\"+Inf\"}"));
    let (s, latest) = get_json(&urls[0], "/block/latest").await.unwrap();
    assert_eq!(s, 200);
    assert!(latest["height"].as_u64().unwrap() >= h);
    // GET /block/{hash}: the same block as by height, on every node (each
    // node keeps the certificate it decided with, so compare per node).
    let (_, first) = get_json(&urls[0], &format!("/block/{h}")).await.unwrap();
    let hash = first["hash"].as_str().unwrap().to_string();
    for url in &urls {
        let (_, by_height) = get_json(url, &format!("/block/{h}")).await.unwrap();
        assert_eq!(by_height["hash"], first["hash"]);
        let (s, by_hash) = get_json(url, &format!("/block/{hash}")).await.unwrap();
        assert_eq!(s, 200, "{by_hash}");
        assert_eq!(by_hash, by_height);
        let bare = hash.trim_start_matches("0x");
        let (s, by_bare) = get_json(url, &format!("/block/{bare}")).await.unwrap();
        assert_eq!((s, &by_bare), (200, &by_height));
    }
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_input_is_refused_clearly_and_the_network_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let net = start(dir.path()).await;
    let url = net.nodes[0].api_url();
    let faucet = read_key_file(&net.faucet_key_file, DEVNET_PASSWORD).unwrap();
    let chain_id = net.genesis.chain_id.clone();
    let to = address(&key(6_000));

    // Bad JSON → 400 with a code.
    let (s, body) = request(&url, "POST", "/tx", Some(b"{not json"))
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((s, v["code"].as_u64()), (400, Some(5001)), "{v}");
    // JSON with a wrong field, and hex that is not a transaction → 400.
    let (s, v) = post_json(&url, "/tx", &json!({ "transaction": "00" }))
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    let (s, v) = post_json(&url, "/tx", &json!({ "tx": "0xdeadbeef" }))
        .await
        .unwrap();
    assert_eq!((s, v["reason"].as_str()), (400, Some("bad_request")), "{v}");

    // A bad signature → 422 bad_signature.
    let mut forged = transfer(&chain_id, &faucet, 0, to, BLY);
    forged.signature[10] ^= 0x55;
    let (s, v) = post_json(&url, "/tx", &tx_body(&forged)).await.unwrap();
    assert_eq!(
        (s, v["code"].as_u64(), v["reason"].as_str()),
        (422, Some(5001), Some("bad_signature")),
        "{v}"
    );
    // Another chain's signature is a bad signature too.
    let other = transfer("another-chain", &faucet, 0, to, BLY);
    let (s, v) = post_json(&url, "/tx", &tx_body(&other)).await.unwrap();
    assert_eq!(
        (s, v["reason"].as_str()),
        (422, Some("bad_signature")),
        "{v}"
    );

    // A valid transfer commits; sending it again is a replayed nonce.
    let tx = transfer(&chain_id, &faucet, 0, to, BLY);
    let (s, v) = post_json(&url, "/tx", &tx_body(&tx)).await.unwrap();
    assert_eq!(s, 200, "{v}");
    let (s, v) = post_json(&url, "/tx", &tx_body(&tx)).await.unwrap();
    assert_eq!(
        (s, v["reason"].as_str()),
        (409, Some("duplicate")),
        "pending duplicate: {v}"
    );
    let id = format!("0x{}", hex::encode(tx.id()));
    eventually("the transfer to commit", || async {
        let (s, _) = get_json(&url, &format!("/tx/{id}")).await.unwrap();
        (s == 200).then_some(())
    })
    .await;
    let (s, v) = post_json(&url, "/tx", &tx_body(&tx)).await.unwrap();
    assert_eq!(
        (s, v["code"].as_u64(), v["reason"].as_str()),
        (422, Some(5001), Some("stale_nonce")),
        "{v}"
    );

    // An oversize body → 413 with a JSON error.
    let big = vec![b'a'; 2 * 1024 * 1024];
    let (s, body) = request(&url, "POST", "/tx", Some(&big)).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (s, v["code"].as_u64(), v["reason"].as_str()),
        (413, Some(5001), Some("body_too_large")),
        "{v}"
    );

    // Unknown things → 404 / 400 with codes.
    let (s, v) = get_json(&url, "/block/999999").await.unwrap();
    assert_eq!((s, v["code"].as_u64()), (404, Some(1001)), "{v}");
    let (s, _) = get_json(&url, "/block/abc").await.unwrap();
    assert_eq!(s, 400);
    let (s, v) = get_json(&url, &format!("/block/0x{}", "ab".repeat(32)))
        .await
        .unwrap();
    assert_eq!((s, v["code"].as_u64()), (404, Some(1001)), "{v}");
    let (s, _) = get_json(&url, &format!("/block/0x{}", "ab".repeat(31)))
        .await
        .unwrap();
    assert_eq!(s, 400, "a 62-digit hash is neither a height nor a hash");
    let (s, _) = get_json(&url, "/account/nonsense").await.unwrap();
    assert_eq!(s, 400);
    let (s, _) = get_json(&url, &format!("/tx/0x{}", "00".repeat(32)))
        .await
        .unwrap();
    assert_eq!(s, 404);
    let (s, v) = get_json(&url, "/params").await.unwrap();
    assert_eq!(s, 200);
    assert!(v["block_gas_limit"].as_u64().is_some(), "{v}");

    // Garbage on the P2P port: the TLS handshake fails, the node closes the
    // connection (after at most a TLS alert) and keeps going.
    let p2p = net.nodes[0].p2p_addr;
    let refused_before = net.nodes[0].transport.rejected_handshakes();
    for garbage in [
        vec![0xff; 64],                                    // not a TLS record
        [&200u32.to_be_bytes()[..], &[7u8; 200]].concat(), // noise
    ] {
        let mut s = tokio::net::TcpStream::connect(p2p).await.unwrap();
        s.write_all(&garbage).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "connection not closed: {read:?}"
        );
        assert!(rest.len() < 64, "more than an alert came back: {rest:?}");
    }
    eventually("both handshakes to be counted as refused", || async {
        (net.nodes[0].transport.rejected_handshakes() >= refused_before + 2).then_some(())
    })
    .await;
    let before = height(&url).await;
    eventually("the network to commit two more blocks", || async {
        (height(&url).await >= before + 2).then_some(())
    })
    .await;
    let (s, v) = get_json(&url, "/health").await.unwrap();
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    assert!(net.nodes.iter().all(|n| n.is_running()));
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_devnet_continues_from_its_stores() {
    let dir = tempfile::tempdir().unwrap();
    let net = start(dir.path()).await;
    let faucet = read_key_file(&net.faucet_key_file, DEVNET_PASSWORD).unwrap();
    let tx = transfer(&net.genesis.chain_id, &faucet, 0, address(&key(7_000)), BLY);
    let url = net.nodes[1].api_url();
    let (s, v) = post_json(&url, "/tx", &tx_body(&tx)).await.unwrap();
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let committed_at = eventually("the transfer to commit", || async {
        let (s, v) = get_json(&url, &format!("/tx/{id}")).await.unwrap();
        (s == 200).then(|| v["height"].as_u64().unwrap())
    })
    .await;
    let (_, before) = get_json(&url, &format!("/block/{committed_at}"))
        .await
        .unwrap();
    net.stop().await;

    // Same directory: same genesis and keys, stores replayed, new ports.
    let net = start(dir.path()).await;
    let urls: Vec<String> = net.nodes.iter().map(|n| n.api_url()).collect();
    // The node that served the transfer kept it across the restart.
    let (s, r) = get_json(&urls[1], &format!("/tx/{id}")).await.unwrap();
    assert_eq!((s, r["height"].as_u64()), (200, Some(committed_at)), "{r}");
    // Every node has (or catches up to) the same block.
    for url in &urls {
        let after = eventually("the block to be there after the restart", || async {
            let (s, b) = get_json(url, &format!("/block/{committed_at}"))
                .await
                .unwrap();
            (s == 200).then_some(b)
        })
        .await;
        assert_eq!(after["hash"], before["hash"]);
    }
    let target = committed_at + 3;
    for url in &urls {
        eventually("the restarted network to commit new blocks", || async {
            (height(url).await >= target).then_some(())
        })
        .await;
    }
    let (_, a) = get_json(&urls[0], &format!("/block/{target}"))
        .await
        .unwrap();
    let (_, b) = get_json(&urls[3], &format!("/block/{target}"))
        .await
        .unwrap();
    assert_eq!(a["state_root"], b["state_root"]);
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_load_benchmark_sees_every_accepted_transfer_commit() {
    use blyan_runtime::bench::{BenchOptions, run};
    let dir = tempfile::tempdir().unwrap();
    let opts = BenchOptions {
        block_interval_ms: 300,
        rate_tx_per_s: 20,
        duration_s: 3,
        warmup_s: 1,
        accounts: 8,
        connections_per_node: 2,
        generator_threads: 1,
        drain_s: 120,
        dir: dir.path().join("bench"),
        timeout_propose_ms: None,
    };
    let r = run(&opts).await.unwrap();
    assert!(r.rejections.is_empty(), "{:?}", r.rejections);
    assert_eq!(r.accepted, 60);
    assert_eq!(r.not_committed, 0, "{r:?}");
    // Every accepted transfer committed, so every latency in the window is known.
    assert_eq!(r.p99_ms.is_some(), r.latency_samples > 0, "{r:?}");
    assert!(r.p50_ms <= r.p99_ms, "{r:?}");
    assert!((0.0..=1.0).contains(&r.generator_cpu_share), "{r:?}");
    // A directory that already holds a devnet is refused.
    let e = run(&opts).await.unwrap_err().to_string();
    assert!(e.contains("fresh directory"), "{e}");
}

/// `blyan devnet --processes` (issue 12 item 7, issue 15 item 2): every node
/// its own OS process, one line per node in the shared output contract
/// (`node <i>: validator|inference … address 0x… api http://… … pid <n>`,
/// validators first, node 0's API the first `http://` address). Killing one
/// node's process is reported and the rest keep committing; killing the
/// devnet takes every node with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blyan_devnet_processes_runs_each_node_in_its_own_process() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut rx) =
        spawn_process_devnet(&dir.path().join("devnet"), &["--inference-nodes", "1"]);
    let devnet_pid = child.id();
    let mut lines = lines_until_api_key(&mut rx).await;
    let nodes: Vec<&String> = lines.iter().filter(|l| l.starts_with("node ")).collect();
    assert_eq!(nodes.len(), 5, "{lines:?}");
    let mut pids = std::collections::BTreeSet::new();
    for (i, l) in nodes.iter().enumerate() {
        assert!(l.starts_with(&format!("node {i}: ")), "{l}");
        assert_eq!(l.contains("validator"), i < 4, "{l}");
        assert!(field(l, "address").starts_with("0x"), "{l}");
        let pid: u32 = field(l, "pid").parse().unwrap();
        assert_ne!(pid, devnet_pid, "{l}");
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{l}"
        );
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 5, "one process per node: {lines:?}");
    let first_url = lines
        .iter()
        .find_map(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
        .unwrap()
        .to_string();
    assert_eq!(first_url, field(nodes[0], "api"));
    let url = first_url;
    // The inference node is registered on chain (TX-9).
    let inference = field(nodes[4], "address");
    eventually("node 0 to list the inference node", || async {
        let (_, v) = get_json(&url, "/nodes?limit=100").await.ok()?;
        v.to_string().contains(&inference).then_some(())
    })
    .await;
    // SIGKILL validator 3: reported, not restarted, and the rest commit on.
    let victim: u32 = field(nodes[3], "pid").parse().unwrap();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the devnet to report node 3's exit", || {
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
        let seen = lines.iter().any(|l| l.starts_with("node 3 exited"));
        async move { seen.then_some(()) }
    })
    .await;
    let at = height(&url).await;
    eventually("the other validators to keep committing", || async {
        (height(&url).await >= at + 3).then_some(())
    })
    .await;
    // The devnet goes (SIGKILL: no chance to clean up): its nodes follow.
    let _ = child.kill();
    let _ = child.wait();
    eventually("every node process to exit with the devnet", || {
        let left: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| *p != victim && std::path::Path::new(&format!("/proc/{p}")).exists())
            .filter(|p| {
                // A zombie is gone for every purpose but the table entry.
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map(|s| !s.contains(") Z "))
                    .unwrap_or(false)
            })
            .collect();
        async move { left.is_empty().then_some(()) }
    })
    .await;
}

/// Starts `blyan devnet --processes` with `args` and reads its output until
/// the `api key:` line: (child, the lines so far, the rest of its output).
fn spawn_process_devnet(
    dir: &std::path::Path,
    args: &[&str],
) -> (
    support::KillOnDrop,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use std::io::{BufRead, BufReader};
    let child = std::process::Command::new(support::blyan_bin())
        .args(["devnet", "--processes", "--dir"])
        .arg(dir)
        .args(["--base-port", "0", "--block-interval-ms", "300"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = support::KillOnDrop(child);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The devnet's lines up to and including `api key:`.
async fn lines_until_api_key(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Vec<String> {
    let mut lines = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(240);
    while !lines.iter().any(|l: &String| l.starts_with("api key: ")) {
        let line = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no `api key:` line in time: {lines:?}"))
            .unwrap_or_else(|| panic!("the devnet exited: {lines:?}"));
        lines.push(line);
    }
    lines
}

/// The word after `name` in a devnet node line.
fn field(line: &str, name: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == name).unwrap();
    words[at + 1].to_string()
}

/// Issue 15 item 2 on a multi-process devnet: a fresh key's node process
/// registers its P2P endpoint (TX-9), bonds, catches up, becomes active at
/// the epoch boundary and signs certificates; after it unbonds and
/// deregisters, the validators drop it and keep committing. Nobody edits a
/// configuration or restarts: only transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_joins_and_leaves_a_multi_process_devnet_by_transactions_alone() {
    use blyan_runtime::client::submit_and_wait;
    use blyan_runtime::config::FileConfig;
    use blyan_state_machine::tx::{NodeInfo, TxKind};
    let dir = tempfile::tempdir().unwrap();
    let devnet_dir = dir.path().join("devnet");
    let (mut devnet, mut rx) = spawn_process_devnet(
        &devnet_dir,
        &["--epoch-length-blocks", "10", "--no-rate-limits"],
    );
    let lines = lines_until_api_key(&mut rx).await;
    let nodes: Vec<&String> = lines.iter().filter(|l| l.starts_with("node ")).collect();
    assert_eq!(nodes.len(), 4, "{lines:?}");
    let url = field(nodes[0], "api");
    let faucet = read_key_file(&devnet_dir.join("faucet.json"), DEVNET_PASSWORD).unwrap();
    // The joiner: a fresh key and a configuration made from node 0's (the
    // validators as seeds), on free ports, no engine.
    let joiner_key = key(54_321);
    let joiner = address(&joiner_key);
    let jdir = devnet_dir.join("joiner");
    std::fs::create_dir_all(&jdir).unwrap();
    blyan_runtime::keystore::write_key_file(
        &jdir.join("key.json"),
        &joiner_key,
        DEVNET_PASSWORD,
        blyan_runtime::keystore::MIN_ITERATIONS,
    )
    .unwrap();
    let (p2p, http) = blyan_runtime::chaos::free_addrs(1).unwrap().remove(0);
    let mut config = FileConfig::load(&devnet_dir.join("node-0").join("config.toml")).unwrap();
    config.p2p_addr = p2p.clone();
    config.http_addr = http.clone();
    // `load` resolved node 0's relative paths: the joiner's own instead.
    config.data_dir = jdir.join("data");
    config.key_file = jdir.join("key.json");
    config.inference.enabled = false;
    config.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    std::fs::write(jdir.join("config.toml"), config.to_toml()).unwrap();
    // Funded, registered at its endpoint, bonded: transactions only.
    submit_and_wait(
        &url,
        &faucet,
        TxKind::Transfer {
            to: joiner,
            amount: 1_000 * BLY,
        },
        "funding the joiner",
    )
    .await
    .unwrap();
    let register = TxKind::RegisterNode {
        info: Box::new(NodeInfo {
            endpoint: p2p.clone(),
            blocks: Vec::new(),
        }),
        bond: 100 * BLY,
    };
    submit_and_wait(&url, &joiner_key, register, "registering the joiner")
        .await
        .unwrap();
    let mut node = support::KillOnDrop(
        std::process::Command::new(support::blyan_bin())
            .args(["node", "--config"])
            .arg(jdir.join("config.toml"))
            .args(["--parent-pid", &std::process::id().to_string()])
            .env("BLYAN_KEY_PASSWORD", DEVNET_PASSWORD)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(jdir.join("node.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    submit_and_wait(
        &url,
        &joiner_key,
        TxKind::Bond { amount: 500 * BLY },
        "the joiner's bond",
    )
    .await
    .unwrap();
    // TX-16: its VRF key (derived from its key, CONS-COMM-8), so later
    // committee draws include it.
    submit_and_wait(
        &url,
        &joiner_key,
        TxKind::SetVrfKey {
            public_key: blyan_state_machine::consensus::vrf_public_key(&joiner_key),
        },
        "the joiner's VRF key",
    )
    .await
    .unwrap();
    let (_, account) = get_json(&url, &format!("/explorer/account/{joiner}"))
        .await
        .unwrap();
    assert_eq!(
        account["validator"]["vrf_public_key"],
        format!(
            "0x{}",
            hex::encode(blyan_state_machine::consensus::vrf_public_key(&joiner_key))
        ),
        "{account}"
    );
    let bonded_at = height(&url).await;
    let jurl = format!("http://{http}");
    eventually("the joiner to be active and sign a certificate", || async {
        let h = height(&url).await;
        for at in (bonded_at + 1)..=h {
            let (_, b) = get_json(&url, &format!("/block/{at}")).await.ok()?;
            let signers = b["certificate"]["signers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if signers
                .iter()
                .any(|s| *s == serde_json::to_value(joiner).unwrap())
            {
                return Some(());
            }
        }
        None
    })
    .await;
    let (_, status) = get_json(&jurl, "/status").await.unwrap();
    assert_eq!(status["validator"], true, "{status}");
    // CONS-COMM-7: the chain crossed an epoch boundary (a ticket chained the
    // seed) and every block so far came from its epoch's committee.
    let (_, validators) = get_json(&url, "/explorer/validators").await.unwrap();
    let committee = &validators["committee"];
    assert!(committee["epoch"].as_u64().unwrap() >= 1, "{committee}");
    assert!(
        !committee["members"].as_array().unwrap().is_empty(),
        "{committee}"
    );
    // Node 0 is connected to the other three and the joiner.
    eventually("node 0 to be connected to the joiner", || async {
        let (_, s) = get_json(&url, "/status").await.ok()?;
        (s["peers_connected"] == 4).then_some(())
    })
    .await;
    // It leaves: unbond everything and deregister.
    submit_and_wait(
        &url,
        &joiner_key,
        TxKind::Unbond { amount: 500 * BLY },
        "the joiner's unbond",
    )
    .await
    .unwrap();
    submit_and_wait(
        &url,
        &joiner_key,
        TxKind::DeregisterNode,
        "the deregistration",
    )
    .await
    .unwrap();
    eventually("every validator to drop the leaver", || async {
        for n in &nodes {
            let (_, s) = get_json(&field(n, "api"), "/status").await.ok()?;
            if s["peers_connected"] != 3 {
                return None;
            }
        }
        Some(())
    })
    .await;
    let h = height(&url).await;
    eventually("the four to keep committing without it", || async {
        (height(&url).await >= h + 12).then_some(())
    })
    .await;
    let _ = node.kill();
    let _ = node.wait();
    let _ = devnet.kill();
    let _ = devnet.wait();
}
