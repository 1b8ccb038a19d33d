//! `blyan bench-sync`: catch-up over big blocks (issue 18 item 2,
//! NODE-SYNC-5/6). Four validators run as processes (this binary); one is
//! stopped while the others commit `--blocks` blocks of about
//! `max_block_bytes` (1 MiB) each, made of [`big_tx`] transactions; then it
//! restarts on its data directory and the command times how long it takes
//! to reach the others' height. Before NODE-SYNC-5 a 32-block reply of such
//! blocks exceeded the 4 MiB frame, was dropped, and the node never caught up.

use crate::Error;
use crate::chaos::{Nodes, VALIDATORS, free_addrs};
use crate::client::{get_json, height, post_json};
use crate::devnet::{DevnetOptions, write_layout};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::genesis::GenesisBalance;
use blyan_state_machine::ledger::intrinsic_gas;
use blyan_state_machine::testkit;
use blyan_state_machine::tx::{NodeInfo, SignedTx, TxBody, TxKind};
use blyan_state_machine::types::BLY;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The node that is stopped and restarted.
const VICTIM: usize = VALIDATORS - 1;
/// Senders of the big transactions (each keeps at most 32 pending).
const SENDERS: u64 = 64;
const SENDER_KEY_BASE: u64 = 30_000_000;
/// Liveness bound of every wait.
const BOUND_S: u64 = 600;

/// A `RegisterNode` transaction of about 32 KB (1,024 block ids) whose bond
/// (1 base unit) is below the minimum: it fails in execution (TX-12), pays
/// its fee and is included, so blocks of such transactions are big without
/// changing the node registry.
pub fn big_tx(chain_id: &str, sender: &k256::ecdsa::SigningKey, nonce: u64) -> SignedTx {
    let kind = TxKind::RegisterNode {
        info: Box::new(NodeInfo {
            endpoint: format!("big-{nonce}.example:1"),
            blocks: (0..1024u32)
                .map(|i| {
                    let mut h = [0u8; 32];
                    h[..4].copy_from_slice(&i.to_be_bytes());
                    h[4..12].copy_from_slice(&nonce.to_be_bytes());
                    h
                })
                .collect(),
        }),
        bond: 1,
    };
    TxBody {
        nonce,
        gas_limit: intrinsic_gas(&kind),
        max_fee_per_gas: 1_000_000_000_000,
        max_priority_fee_per_gas: 1,
        kind,
    }
    .sign(chain_id, sender)
}

#[derive(Clone, Debug)]
pub struct SyncBenchOptions {
    pub dir: PathBuf,
    pub binary: PathBuf,
    /// Big blocks committed while the victim is down.
    pub blocks: u64,
    pub block_interval_ms: u64,
}

#[derive(Clone, Debug)]
pub struct SyncBenchReport {
    pub blocks_behind: u64,
    /// Canonical bytes of the blocks the victim lacked (transactions only,
    /// about 33 KB each).
    pub bytes_behind: u64,
    pub catch_up_s: f64,
}

impl SyncBenchReport {
    pub fn table(&self) -> String {
        let mib = self.bytes_behind as f64 / (1024.0 * 1024.0);
        format!(
            "| blocks behind | MiB behind | catch-up s | MiB/s |\n|---:|---:|---:|---:|\n| {} | {:.1} | {:.1} | {:.1} |\n",
            self.blocks_behind,
            mib,
            self.catch_up_s,
            mib / self.catch_up_s.max(1e-9)
        )
    }
}

async fn wait(what: &str, mut f: impl AsyncFnMut() -> bool) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(BOUND_S);
    while !f().await {
        if Instant::now() > deadline {
            return Err(Error::Node(format!("{what}: not within {BOUND_S} s")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

pub async fn run(opts: &SyncBenchOptions) -> Result<SyncBenchReport, Error> {
    if opts.dir.join("devnet").exists() {
        return Err(Error::Config(format!(
            "{} already holds a run; give a fresh directory",
            opts.dir.display()
        )));
    }
    std::fs::create_dir_all(&opts.dir).map_err(|e| Error::io(opts.dir.display(), e))?;
    let senders: Vec<_> = (0..SENDERS)
        .map(|i| testkit::key(SENDER_KEY_BASE + i))
        .collect();
    let mut devnet = DevnetOptions::new(opts.dir.join("devnet"), VALIDATORS);
    devnet.block_interval_ms = opts.block_interval_ms;
    devnet.rate_limits = crate::ratelimit::RateLimitConfig::unlimited();
    devnet.inference.enabled = false;
    devnet.extra_balances = senders
        .iter()
        .map(|k| GenesisBalance {
            address: testkit::address(k),
            amount: 1_000_000 * BLY,
        })
        .collect();
    let addrs = free_addrs(VALIDATORS)?;
    let (genesis, configs) = write_layout(&devnet, &addrs)?;
    let urls: Vec<String> = addrs.iter().map(|(_, h)| format!("http://{h}")).collect();
    let mut nodes = Nodes::new(opts.binary.clone(), configs, &opts.dir);
    for i in 0..VALIDATORS {
        nodes.start(i)?;
    }
    for url in &urls {
        wait("every node to commit a block", async || {
            height(url).await.unwrap_or(0) >= 1
        })
        .await?;
    }
    nodes.kill(VICTIM)?;
    let down_at = height(&urls[0]).await.unwrap_or(0);
    // About 32 transactions of 32 KB fill a 1 MiB block.
    let per_sender = (opts.blocks * 32).div_ceil(SENDERS);
    let mut last_id = String::new();
    for nonce in 0..per_sender {
        for (s, sender) in senders.iter().enumerate() {
            let tx = big_tx(&genesis.chain_id, sender, nonce);
            let body = serde_json::json!({ "tx": format!("0x{}", hex::encode(tx.encode())) });
            let url = &urls[s % VICTIM];
            let (status, v) = post_json(url, "/tx", &body).await?;
            if status != 200 {
                return Err(Error::Node(format!(
                    "a big transaction was refused: {status} {v}"
                )));
            }
            last_id = v["id"].as_str().unwrap_or_default().to_string();
        }
        nodes.check_running()?;
        // Keep each sender's pending run short (NODE-MP-1: 64 per sender).
        if nonce % 16 == 15 {
            let id = last_id.clone();
            wait("a wave of big transactions to commit", async || {
                matches!(get_json(&urls[0], &format!("/tx/{id}")).await, Ok((200, _)))
            })
            .await?;
        }
    }
    let id = last_id.clone();
    wait("every big transaction to commit", async || {
        matches!(get_json(&urls[0], &format!("/tx/{id}")).await, Ok((200, _)))
    })
    .await?;
    let top = height(&urls[0]).await.unwrap_or(0);
    let mut bytes_behind = 0u64;
    for h in (down_at + 1)..=top {
        let (_, b) = get_json(&urls[0], &format!("/block/{h}")).await?;
        bytes_behind += b["txs"].as_array().map_or(0, |a| a.len() as u64) * 33_000;
    }
    let restarted = Instant::now();
    nodes.start(VICTIM)?;
    wait("the restarted node to catch up", async || {
        height(&urls[VICTIM]).await.unwrap_or(0) >= top
    })
    .await?;
    let catch_up_s = restarted.elapsed().as_secs_f64();
    nodes.check_running()?;
    Ok(SyncBenchReport {
        blocks_behind: top - down_at,
        bytes_behind,
        catch_up_s,
    })
}
