//! `blyan bench`: a load benchmark of signed transfers on a fresh 4-validator
//! devnet on loopback.
//!
//! - The devnet runs **in this process** (like `blyan devnet`, in a fresh
//!   directory per offered rate) on the main tokio runtime; its genesis funds
//!   `--accounts` load accounts (keys `testkit::key(ACCOUNT_KEY_BASE + i)`).
//!   In-process is what lets the generator observe commits without polling
//!   HTTP (it reads each node's `watch` snapshot and store, as the API does)
//!   and attribute CPU to itself; it shares the machine's cores with the
//!   nodes exactly as a generator in another process would.
//! - Every transfer is **signed before the clock starts** (on all cores), so
//!   signing is not on the measured path. Transfer `j` is from account
//!   `j mod accounts` with nonce `j div accounts`; account `a` always submits
//!   to node `a mod 4` over the same connection, so its nonces arrive in order.
//! - The **generator** runs on its own tokio runtime whose threads are named
//!   `bench-gen`: a dispatcher releases transfer `j` at `t0 + j / rate` into
//!   bounded per-connection queues (so the offered rate is open-loop until the
//!   queues fill; then the dispatcher waits, and the achieved submission rate
//!   is reported); `--connections` keep-alive HTTP connections per node
//!   `POST /tx`. A watcher polls each node's snapshot every [`POLL_MS`] ms
//!   and records the first time any node has committed each height.
//! - **Latency** of a transfer: from just before its `POST /tx` is written to
//!   the first commit (on any node) of the block that includes it; resolution
//!   about [`POLL_MS`] ms. **Steady window**: from `--warmup` to `--duration`
//!   seconds after `t0`. Committed tx/s counts transfers whose block was first
//!   committed in the window; p50/p99 are over transfers *submitted* in the
//!   window and accepted, with any not committed by the end of the drain
//!   counted as infinitely late.
//! - **CPU**: utime + stime of this process (`/proc/self/stat`) and of the
//!   `bench-gen` threads (`/proc/self/task/*/stat`) over the run (from `t0` to
//!   the end of the drain); signing and devnet start-up are outside it.

use crate::Error;
use crate::client::Connection;
use crate::devnet::{Devnet, DevnetOptions};
use crate::service::NodeHandle;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::genesis::GenesisBalance;
use blyan_state_machine::ledger::intrinsic_gas;
use blyan_state_machine::node::MempoolConfig;
use blyan_state_machine::params::INITIAL_BASE_FEE;
use blyan_state_machine::testkit;
use blyan_state_machine::tx::{TxBody, TxKind};
use blyan_state_machine::types::{Address, BLY, Hash32};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const VALIDATORS: usize = 4;
/// Load account `i` signs with `testkit::key(ACCOUNT_KEY_BASE + i)`.
pub const ACCOUNT_KEY_BASE: u64 = 10_000_000;
/// Genesis balance of each load account, in BLY.
pub const ACCOUNT_BLY: u128 = 1_000_000;
/// Most transfers one run may pre-sign (memory: about 400 bytes each).
pub const MAX_TOTAL_TXS: u64 = 2_000_000;
pub const MAX_ACCOUNTS: u32 = 200_000;
pub const MAX_CONNECTIONS_PER_NODE: usize = 256;
/// Transfers queued per connection before the dispatcher waits.
pub const CONNECTION_QUEUE: usize = 256;
/// The commit watcher's polling period.
pub const POLL_MS: u64 = 5;
/// How long the devnet may take to connect and commit its first blocks.
pub const START_DEADLINE_S: u64 = 120;
/// Name of the generator's threads (at most 15 bytes: `/proc` truncates).
pub const GENERATOR_THREAD: &str = "bench-gen";
const _: () = assert!(GENERATOR_THREAD.len() <= 15);

/// Fee cap: far above the base fee, which rises while blocks are over half full.
const MAX_FEE_PER_GAS: u128 = 1_000 * INITIAL_BASE_FEE;
const TIP_PER_GAS: u128 = INITIAL_BASE_FEE;

/// One run's settings.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub block_interval_ms: u64,
    pub rate_tx_per_s: u64,
    pub duration_s: u64,
    pub warmup_s: u64,
    pub accounts: u32,
    pub connections_per_node: usize,
    pub generator_threads: usize,
    /// Longest wait after the last submission for the mempools to empty.
    pub drain_s: u64,
    /// The devnet's directory (must not hold a devnet yet).
    pub dir: PathBuf,
    /// Consensus `timeout_propose_ms` (`None`: the driver's default, 1000),
    /// for experiments on how block validation time meets the round timeouts.
    pub timeout_propose_ms: Option<u64>,
}

impl BenchOptions {
    pub fn total_txs(&self) -> u64 {
        self.rate_tx_per_s.saturating_mul(self.duration_s)
    }

    /// Refuses settings that cannot give a meaningful run, saying which flag to change.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if !(50..=60_000).contains(&self.block_interval_ms) {
            return bad(format!(
                "--block-interval-ms {} is outside 50..=60000",
                self.block_interval_ms
            ));
        }
        if self
            .timeout_propose_ms
            .is_some_and(|t| !(100..=60_000).contains(&t))
        {
            return bad("--timeout-propose-ms is outside 100..=60000".into());
        }
        if self.rate_tx_per_s == 0 || self.duration_s == 0 {
            return bad("--rate and --duration must be positive".into());
        }
        if self.warmup_s >= self.duration_s {
            return bad(format!(
                "--warmup {} leaves no steady window in --duration {}",
                self.warmup_s, self.duration_s
            ));
        }
        if self.total_txs() > MAX_TOTAL_TXS {
            return bad(format!(
                "--rate × --duration = {} transfers; at most {MAX_TOTAL_TXS} are pre-signed",
                self.total_txs()
            ));
        }
        if !(1..=MAX_ACCOUNTS).contains(&self.accounts) {
            return bad(format!(
                "--accounts {} is outside 1..={MAX_ACCOUNTS}",
                self.accounts
            ));
        }
        if !(1..=MAX_CONNECTIONS_PER_NODE).contains(&self.connections_per_node) {
            return bad(format!(
                "--connections {} is outside 1..={MAX_CONNECTIONS_PER_NODE}",
                self.connections_per_node
            ));
        }
        if !(1..=16).contains(&self.generator_threads) {
            return bad(format!(
                "--generator-threads {} is outside 1..=16",
                self.generator_threads
            ));
        }
        // An account's transfers in flight (about three block intervals plus
        // a second of slack at its rate) must stay well inside the mempool's
        // per-sender limit, or the benchmark measures `sender_full`.
        let limit = MempoolConfig::default().max_txs_per_sender as u64 / 2;
        let window_ms = 3 * self.block_interval_ms + 1_000;
        let needed = (self.rate_tx_per_s * window_ms).div_ceil(1_000 * limit);
        if (self.accounts as u64) < needed {
            return bad(format!(
                "--accounts {} is too few for --rate {}: each account would have over {limit} transfers in flight; use --accounts {needed} or more",
                self.accounts, self.rate_tx_per_s
            ));
        }
        Ok(())
    }
}

/// A pre-signed transfer: its id and the `POST /tx` body.
struct Presigned {
    id: Hash32,
    body: Vec<u8>,
}

/// What happened to one submission.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Accepted,
    /// The API's `reason` (or `http_<status>`, or `transport_error`).
    Rejected(String),
}

#[derive(Clone, Debug)]
struct Submission {
    index: u64,
    sent: Duration,
    outcome: Outcome,
}

/// CPU clock ticks (utime + stime).
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    process: u64,
    generator: u64,
}

/// Raw observations of one run.
struct Observed {
    submissions: Vec<Submission>,
    /// First time (since `t0`) any node committed each height.
    first_commit: BTreeMap<u64, Duration>,
    dispatch_end: Duration,
    run_end: Duration,
    cpu: Cpu,
}

/// The results of one run, as printed.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub offered_tx_per_s: u64,
    pub submitted_tx_per_s: f64,
    pub committed_tx_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Accepted transfers submitted in the steady window (the latency population).
    pub latency_samples: u64,
    pub accepted: u64,
    pub not_committed: u64,
    pub rejections: BTreeMap<String, u64>,
    pub blocks: u64,
    pub txs_per_block_mean: f64,
    pub txs_per_block_max: u64,
    pub generator_cpu_share: f64,
    pub process_cores: f64,
    pub generator_cores: f64,
}

fn account_key(i: u32) -> k256::ecdsa::SigningKey {
    testkit::key(ACCOUNT_KEY_BASE + i as u64)
}

/// The genesis balances of the load accounts.
pub fn funded_accounts(accounts: u32) -> Vec<GenesisBalance> {
    (0..accounts)
        .map(|i| GenesisBalance {
            address: testkit::address(&account_key(i)),
            amount: ACCOUNT_BLY * BLY,
        })
        .collect()
}

/// Signs every transfer of the run on all cores.
fn presign(opts: &BenchOptions, chain_id: &str) -> Vec<Presigned> {
    let keys: Vec<_> = (0..opts.accounts).map(account_key).collect();
    let addresses: Vec<Address> = keys.iter().map(testkit::address).collect();
    let total = opts.total_txs();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let chunk = total.div_ceil(threads).max(1);
    let sign_range = |from: u64, to: u64| -> Vec<Presigned> {
        (from..to)
            .map(|j| {
                let a = (j % opts.accounts as u64) as usize;
                let kind = TxKind::Transfer {
                    to: addresses[(a + 1) % addresses.len()],
                    amount: 1,
                };
                let tx = TxBody {
                    nonce: j / opts.accounts as u64,
                    gas_limit: intrinsic_gas(&kind),
                    max_fee_per_gas: MAX_FEE_PER_GAS,
                    max_priority_fee_per_gas: TIP_PER_GAS,
                    kind,
                }
                .sign(chain_id, &keys[a]);
                let body = format!("{{\"tx\":\"0x{}\"}}", hex::encode(tx.encode())).into_bytes();
                Presigned { id: tx.id(), body }
            })
            .collect()
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let from = (t * chunk).min(total);
                let to = ((t + 1) * chunk).min(total);
                s.spawn(move || sign_range(from, to))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("signing thread panicked"))
            .collect()
    })
}

/// `(node, connection)` that submits transfer `j`.
fn route(j: u64, opts: &BenchOptions) -> (usize, usize) {
    let a = (j % opts.accounts as u64) as usize;
    (a % VALIDATORS, (a / VALIDATORS) % opts.connections_per_node)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if unavailable).
fn clock_ticks_per_s() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// `(comm, utime + stime)` from a `/proc/.../stat` line.
fn parse_stat(text: &str) -> Option<(String, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After the comm: state is field 3, utime 14, stime 15 (1-based).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn read_cpu() -> Result<Cpu, Error> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::io(p.display(), e));
    let (_, process) = parse_stat(&read(Path::new("/proc/self/stat"))?)
        .ok_or_else(|| Error::Node("cannot parse /proc/self/stat".into()))?;
    let mut generator = 0;
    let tasks = Path::new("/proc/self/task");
    for entry in std::fs::read_dir(tasks).map_err(|e| Error::io(tasks.display(), e))? {
        let entry = entry.map_err(|e| Error::io(tasks.display(), e))?;
        // A thread may exit between listing and reading: skip it.
        if let Ok(text) = std::fs::read_to_string(entry.path().join("stat"))
            && let Some((comm, ticks)) = parse_stat(&text)
            && comm.starts_with(GENERATOR_THREAD)
        {
            generator += ticks;
        }
    }
    Ok(Cpu { process, generator })
}

/// Submits the transfers queued for one connection; returns what happened.
async fn connection_worker(
    url: String,
    txs: Arc<Vec<Presigned>>,
    mut queue: mpsc::Receiver<u64>,
    t0: Instant,
) -> Vec<Submission> {
    let mut out = Vec::new();
    let mut conn: Option<Connection> = None;
    while let Some(j) = queue.recv().await {
        let sent = t0.elapsed();
        if conn.is_none() {
            conn = Connection::connect(&url).await.ok();
        }
        let outcome = match conn.as_mut() {
            None => Outcome::Rejected("transport_error".into()),
            Some(c) => match c.request("POST", "/tx", &txs[j as usize].body).await {
                Ok((200, _)) => Outcome::Accepted,
                Ok((status, body)) => Outcome::Rejected(
                    serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["reason"].as_str().map(str::to_string))
                        .unwrap_or_else(|| format!("http_{status}")),
                ),
                Err(_) => {
                    conn = None;
                    Outcome::Rejected("transport_error".into())
                }
            },
        };
        out.push(Submission {
            index: j,
            sent,
            outcome,
        });
    }
    out
}

/// Records the first time (since `t0`) that `node` shows each height, until `stop`.
async fn watch_commits(
    node: NodeHandle,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<(u64, Duration)> {
    let mut seen = node.snapshot.borrow().height();
    let mut out = Vec::new();
    loop {
        let h = node.snapshot.borrow().height();
        let now = t0.elapsed();
        while seen < h {
            seen += 1;
            out.push((seen, now));
        }
        if stop.load(Ordering::Relaxed) {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

/// The measured part: runs on the generator's runtime.
async fn generate(
    opts: BenchOptions,
    txs: Arc<Vec<Presigned>>,
    nodes: Vec<(String, NodeHandle)>,
) -> Result<Observed, Error> {
    let cpu_start = read_cpu()?;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let watchers: Vec<_> = nodes
        .iter()
        .map(|(_, h)| tokio::spawn(watch_commits(h.clone(), t0, stop.clone())))
        .collect();
    let mut queues = Vec::new();
    let mut workers = Vec::new();
    for (url, _) in &nodes {
        let mut node_queues = Vec::new();
        for _ in 0..opts.connections_per_node {
            let (tx, rx) = mpsc::channel(CONNECTION_QUEUE);
            node_queues.push(tx);
            workers.push(tokio::spawn(connection_worker(
                url.clone(),
                txs.clone(),
                rx,
                t0,
            )));
        }
        queues.push(node_queues);
    }
    let total = opts.total_txs();
    for j in 0..total {
        let due = t0 + Duration::from_nanos(j * 1_000_000_000 / opts.rate_tx_per_s);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let (n, c) = route(j, &opts);
        queues[n][c]
            .send(j)
            .await
            .map_err(|_| Error::Node("a connection worker stopped".into()))?;
    }
    drop(queues);
    let mut submissions = Vec::with_capacity(total as usize);
    for w in workers {
        submissions.extend(
            w.await
                .map_err(|e| Error::Node(format!("connection worker: {e}")))?,
        );
    }
    let dispatch_end = t0.elapsed();
    // Drain: until every mempool is empty, or the deadline.
    let drain_deadline = Instant::now() + Duration::from_secs(opts.drain_s);
    while Instant::now() < drain_deadline
        && nodes
            .iter()
            .any(|(_, h)| h.snapshot.borrow().mempool_txs > 0)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One more interval so the last block is seen everywhere.
    tokio::time::sleep(Duration::from_millis(opts.block_interval_ms)).await;
    stop.store(true, Ordering::Relaxed);
    let mut first_commit: BTreeMap<u64, Duration> = BTreeMap::new();
    for w in watchers {
        for (h, t) in w
            .await
            .map_err(|e| Error::Node(format!("commit watcher: {e}")))?
        {
            let e = first_commit.entry(h).or_insert(t);
            *e = (*e).min(t);
        }
    }
    let run_end = t0.elapsed();
    let cpu_end = read_cpu()?;
    Ok(Observed {
        submissions,
        first_commit,
        dispatch_end,
        run_end,
        cpu: Cpu {
            process: cpu_end.process.saturating_sub(cpu_start.process),
            generator: cpu_end.generator.saturating_sub(cpu_start.generator),
        },
    })
}

/// The value at quantile `q` of `sorted` (nearest rank) out of `population`
/// items, the missing ones being infinitely large: `None` if it falls among them.
pub fn quantile(sorted: &[f64], population: usize, q: f64) -> Option<f64> {
    assert!((0.0..=1.0).contains(&q));
    assert!(sorted.len() <= population);
    if population == 0 {
        return None;
    }
    let rank = ((q * population as f64).ceil() as usize).clamp(1, population);
    sorted.get(rank - 1).copied()
}

fn report(
    opts: &BenchOptions,
    txs: &[Presigned],
    observed: &Observed,
    blocks: &BTreeMap<u64, Vec<Hash32>>,
    ticks_per_s: u64,
) -> BenchReport {
    let window = (
        Duration::from_secs(opts.warmup_s),
        Duration::from_secs(opts.duration_s),
    );
    let in_window = |t: Duration| t >= window.0 && t < window.1;
    let window_s = (opts.duration_s - opts.warmup_s) as f64;
    let index_of: HashMap<Hash32, u64> = txs
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id, i as u64))
        .collect();
    // Commit time of each bench transfer (first commit of its block).
    let mut committed_at: HashMap<u64, Duration> = HashMap::new();
    let (mut window_blocks, mut window_block_txs, mut max_block_txs) = (0u64, 0u64, 0u64);
    for (h, ids) in blocks {
        let Some(&t) = observed.first_commit.get(h) else {
            continue;
        };
        for id in ids {
            if let Some(&j) = index_of.get(id) {
                committed_at.insert(j, t);
            }
        }
        if in_window(t) {
            window_blocks += 1;
            window_block_txs += ids.len() as u64;
            max_block_txs = max_block_txs.max(ids.len() as u64);
        }
    }
    let committed_in_window = committed_at.values().filter(|t| in_window(**t)).count();
    let mut rejections = BTreeMap::new();
    let (mut accepted, mut not_committed) = (0u64, 0u64);
    let mut latencies_ms = Vec::new();
    let mut population = 0usize;
    for s in &observed.submissions {
        match &s.outcome {
            Outcome::Rejected(reason) => *rejections.entry(reason.clone()).or_insert(0) += 1,
            Outcome::Accepted => {
                accepted += 1;
                let commit = committed_at.get(&s.index);
                if commit.is_none() {
                    not_committed += 1;
                }
                if in_window(s.sent) {
                    population += 1;
                    if let Some(c) = commit {
                        latencies_ms.push(c.saturating_sub(s.sent).as_secs_f64() * 1e3);
                    }
                }
            }
        }
    }
    latencies_ms.sort_by(f64::total_cmp);
    let run_s = observed.run_end.as_secs_f64();
    let ticks = |t: u64| t as f64 / ticks_per_s as f64;
    BenchReport {
        offered_tx_per_s: opts.rate_tx_per_s,
        submitted_tx_per_s: observed.submissions.len() as f64
            / observed.dispatch_end.as_secs_f64().max(1e-9),
        committed_tx_per_s: committed_in_window as f64 / window_s,
        p50_ms: quantile(&latencies_ms, population, 0.50),
        p99_ms: quantile(&latencies_ms, population, 0.99),
        latency_samples: population as u64,
        accepted,
        not_committed,
        rejections,
        blocks: window_blocks,
        txs_per_block_mean: if window_blocks == 0 {
            0.0
        } else {
            window_block_txs as f64 / window_blocks as f64
        },
        txs_per_block_max: max_block_txs,
        generator_cpu_share: if observed.cpu.process == 0 {
            0.0
        } else {
            observed.cpu.generator as f64 / observed.cpu.process as f64
        },
        process_cores: ticks(observed.cpu.process) / run_s,
        generator_cores: ticks(observed.cpu.generator) / run_s,
    }
}

/// Waits until every node has all its peers and has committed two blocks.
async fn wait_ready(net: &Devnet) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(START_DEADLINE_S);
    loop {
        let ready = net.nodes.iter().all(|n| {
            let s = n.handle.snapshot.borrow();
            s.height() >= 2 && s.peers_connected == VALIDATORS - 1
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Node(format!(
                "the devnet did not connect and commit two blocks within {START_DEADLINE_S} s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One run at `opts.rate_tx_per_s`: a fresh devnet in `opts.dir`, the load,
/// the report. Call from a multi-threaded tokio runtime (the nodes run on it).
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, Error> {
    opts.validate()?;
    if opts.dir.join("genesis.json").exists() {
        return Err(Error::Config(format!(
            "{} already holds a devnet; the benchmark needs a fresh directory",
            opts.dir.display()
        )));
    }
    let mut dopts = DevnetOptions::new(opts.dir.clone(), VALIDATORS);
    dopts.base_port = None;
    dopts.block_interval_ms = opts.block_interval_ms;
    dopts.extra_balances = funded_accounts(opts.accounts);
    // The load generator is one client far above the public limit, and the
    // benchmark measures the chain, not the inference engine.
    dopts.rate_limits = crate::ratelimit::RateLimitConfig::unlimited();
    dopts.inference.enabled = false;
    if let Some(t) = opts.timeout_propose_ms {
        dopts.node.consensus.timeout_propose_ms = t;
    }
    let signing = {
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || presign(&opts, crate::devnet::DEVNET_CHAIN_ID))
    };
    let txs = Arc::new(
        signing
            .await
            .map_err(|e| Error::Node(format!("signing: {e}")))?,
    );
    assert_eq!(txs.len() as u64, opts.total_txs());
    let net = Devnet::start(dopts).await?;
    let result = measure(opts, &net, txs).await;
    net.stop().await;
    result
}

async fn measure(
    opts: &BenchOptions,
    net: &Devnet,
    txs: Arc<Vec<Presigned>>,
) -> Result<BenchReport, Error> {
    wait_ready(net).await?;
    let nodes: Vec<(String, NodeHandle)> = net
        .nodes
        .iter()
        .map(|n| (n.api_url(), n.handle.clone()))
        .collect();
    let generator = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.generator_threads)
        .thread_name(GENERATOR_THREAD)
        .enable_all()
        .build()
        .map_err(|e| Error::io("generator runtime", e))?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (o, t, n) = (opts.clone(), txs.clone(), nodes);
    // The runtime lives and is dropped on its own thread (a runtime may not
    // be dropped inside another's async context).
    std::thread::Builder::new()
        .name(format!("{GENERATOR_THREAD}-main"))
        .spawn(move || {
            let _ = done_tx.send(generator.block_on(generate(o, t, n)));
        })
        .map_err(|e| Error::io("generator thread", e))?;
    let observed = done_rx
        .await
        .map_err(|_| Error::Node("the generator thread panicked".into()))??;
    // Transfer ids per committed block, from a node that has them all.
    let last = observed
        .first_commit
        .keys()
        .next_back()
        .copied()
        .unwrap_or(0);
    let mut blocks = BTreeMap::new();
    for h in observed.first_commit.keys().copied() {
        let mut found = None;
        for n in &net.nodes {
            if let Some(b) = n.handle.reader.block(h)? {
                found = Some(b);
                break;
            }
        }
        let b = found.ok_or_else(|| Error::Node(format!("block {h} of {last} is on no node")))?;
        blocks.insert(h, b.block.body.txs.iter().map(|t| t.id()).collect());
    }
    Ok(report(opts, &txs, &observed, &blocks, clock_ticks_per_s()))
}

/// The table's header lines.
pub fn table_header() -> String {
    "| block ms | offered tx/s | submitted tx/s | committed tx/s (steady) | p50 ms | p99 ms | accepted | not committed | blocks (steady) | tx/block mean | tx/block max | generator CPU share | process CPU (cores) | rejections |\n\
     |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        .to_string()
}

/// One table row.
pub fn table_row(block_interval_ms: u64, r: &BenchReport) -> String {
    let ms = |v: Option<f64>| v.map_or("not committed".to_string(), |v| format!("{v:.0}"));
    let rejections = if r.rejections.is_empty() {
        "none".to_string()
    } else {
        r.rejections
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "| {block_interval_ms} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {:.0} | {} | {:.1}% ({:.2} cores) | {:.2} | {rejections} |",
        r.offered_tx_per_s,
        r.submitted_tx_per_s,
        r.committed_tx_per_s,
        ms(r.p50_ms),
        ms(r.p99_ms),
        r.accepted,
        r.not_committed,
        r.blocks,
        r.txs_per_block_mean,
        r.txs_per_block_max,
        100.0 * r.generator_cpu_share,
        r.generator_cores,
        r.process_cores,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BenchOptions {
        BenchOptions {
            block_interval_ms: 2_000,
            rate_tx_per_s: 1_000,
            duration_s: 30,
            warmup_s: 5,
            accounts: 2_000,
            connections_per_node: 8,
            generator_threads: 1,
            drain_s: 30,
            dir: PathBuf::from("unused"),
            timeout_propose_ms: None,
        }
    }

    #[test]
    fn quantiles_count_missing_values_as_infinitely_late() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 4, 0.5), Some(2.0));
        assert_eq!(quantile(&v, 4, 0.99), Some(4.0));
        assert_eq!(quantile(&v, 4, 0.0), Some(1.0));
        // 100 submitted, 98 committed: p99 is among the missing.
        let w: Vec<f64> = (0..98).map(f64::from).collect();
        assert_eq!(quantile(&w, 100, 0.5), Some(49.0));
        assert_eq!(quantile(&w, 100, 0.99), None);
        assert_eq!(quantile(&[], 0, 0.5), None);
    }

    #[test]
    fn bad_settings_are_refused_with_the_flag_to_change() {
        assert!(opts().validate().is_ok());
        type Case = (fn(&mut BenchOptions), &'static str);
        let cases: [Case; 6] = [
            (|o| o.rate_tx_per_s = 0, "--rate"),
            (|o| o.warmup_s = 30, "--warmup"),
            (|o| o.accounts = 10, "--accounts"),
            (|o| o.connections_per_node = 0, "--connections"),
            (|o| o.block_interval_ms = 10, "--block-interval-ms"),
            (|o| o.duration_s = 10_000, "pre-signed"),
        ];
        for (change, flag) in cases {
            let mut o = opts();
            change(&mut o);
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{flag}: {e}");
        }
    }

    #[test]
    fn an_account_always_uses_the_same_connection() {
        let o = opts();
        for j in [0u64, 7, 1_999, 123_456] {
            assert_eq!(route(j, &o), route(j + o.accounts as u64, &o));
            let (n, c) = route(j, &o);
            assert!(n < VALIDATORS && c < o.connections_per_node);
        }
    }

    #[test]
    fn proc_stat_lines_parse_even_with_odd_thread_names() {
        let line = "1234 (bench-gen) S 1 2 3 4 5 6 7 8 9 10 250 40 0 0 20 0";
        assert_eq!(parse_stat(line), Some(("bench-gen".into(), 290)));
        let odd = "1234 (a) b (c) R 1 2 3 4 5 6 7 8 9 10 3 4 0 0";
        assert_eq!(parse_stat(odd), Some(("a) b (c".into(), 7)));
        assert_eq!(parse_stat("garbage"), None);
    }
}
