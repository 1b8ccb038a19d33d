//! `blyan chaos`: a soak of a 4-process devnet under load while validators
//! are SIGKILLed and restarted and idle-connection floods come and go
//! (issue 18, "A chaos soak, as a command"; spec/node.md NODE-NET-6,
//! NODE-SYNC-5, NODE-STORE-6).
//!
//! - **Network**: four `blyan node --config …` processes (this binary) from
//!   [`crate::devnet::write_layout`] on free loopback ports, inference off,
//!   rate limits off, `--accounts` load accounts funded in the genesis.
//! - **Load**: open loop at `--rate` transfers per second. Each account has at
//!   most one transfer in flight: its next nonce is sent only once the
//!   previous one is seen committed, so a transfer lost with a killed node's
//!   mempool never leaves a nonce gap behind it; an accepted transfer not
//!   committed within [`RESUBMIT_AFTER_S`] is sent again (the same signed
//!   bytes, to another node: a duplicate is harmless). When no account is
//!   ready the slot is counted as `generator_starved`, not queued.
//! - **Nemesis** (seeded, `--seed`): every `--kill-min-s`..`--kill-max-s`
//!   seconds one validator (never more than one at a time: the others hold
//!   3/4 of the stake) is SIGKILLed, left down 1–5 s and restarted on its data
//!   directory; floods of idle TCP connections from 16 loopback source
//!   addresses against every node's P2P port are on for 10–20 s, then off
//!   for 10–20 s.
//! - **Observer**: polls a live node and reads every new block
//!   (`GET /block/{h}`); a transfer is *acknowledged* once seen in a block.
//! - **Verdict** at the end, each a failure if it does not hold: every node
//!   reaches the final height within [`CATCH_UP_BOUND_S`] (every restarted
//!   node caught up); every node has the observer's block hash and state root
//!   at every height (so every acknowledged transfer is on every node, at the
//!   height it was seen); `GET /tx/{id}` answers 200 on every node for a
//!   sample of acknowledged transfers (the receipt index survived the kills);
//!   and every restart caught up within [`CATCH_UP_BOUND_S`].

use crate::Error;
use crate::client::{Connection, get_json, height};
use crate::devnet::{DEVNET_PASSWORD, DevnetOptions, write_layout};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::genesis::GenesisBalance;
use blyan_state_machine::ledger::intrinsic_gas;
use blyan_state_machine::params::INITIAL_BASE_FEE;
use blyan_state_machine::testkit;
use blyan_state_machine::tx::{TxBody, TxKind};
use blyan_state_machine::types::{Address, BLY};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const VALIDATORS: usize = 4;
/// Load account `i` signs with `testkit::key(CHAOS_KEY_BASE + i)`.
pub const CHAOS_KEY_BASE: u64 = 20_000_000;
/// An accepted transfer not seen committed after this long is sent again.
pub const RESUBMIT_AFTER_S: u64 = 15;
/// Liveness bound: a restarted node catches up, and all nodes reach the
/// final height, within this many seconds.
pub const CATCH_UP_BOUND_S: u64 = 120;
/// Keep-alive connections per node for submissions.
const CONNECTIONS_PER_NODE: usize = 4;
/// Submissions queued per node before the dispatcher counts backpressure.
const NODE_QUEUE: usize = 1_024;
/// Acknowledged transfers checked with `GET /tx/{id}` on every node.
const TX_SPOT_CHECKS: usize = 100;
const MAX_FEE_PER_GAS: u128 = 1_000 * INITIAL_BASE_FEE;

/// One soak's settings.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// A fresh directory (devnet layout, node logs); kept.
    pub dir: PathBuf,
    /// The `blyan` binary the nodes run.
    pub binary: PathBuf,
    pub duration_s: u64,
    /// Offered transfers per second.
    pub rate: u64,
    pub block_interval_ms: u64,
    pub accounts: u32,
    pub kill_min_s: u64,
    pub kill_max_s: u64,
    /// Idle-connection floods on and off.
    pub flood: bool,
    pub seed: u64,
}

/// What a soak did and found.
#[derive(Clone, Debug, Default)]
pub struct ChaosReport {
    pub duration_s: f64,
    pub offered: u64,
    pub accepted: u64,
    pub resubmitted: u64,
    pub refused: BTreeMap<String, u64>,
    pub generator_starved: u64,
    pub acknowledged: u64,
    pub final_height: u64,
    pub kills: u64,
    /// Seconds from each restart until the node reached the others' height.
    pub catch_up_s: Vec<f64>,
    pub flood_periods: u64,
    pub flood_connections: u64,
    pub heights_compared: u64,
    pub tx_spot_checks: u64,
}

impl ChaosReport {
    pub fn table(&self) -> String {
        let max_catch_up = self.catch_up_s.iter().cloned().fold(0.0_f64, f64::max);
        let refused: u64 = self.refused.values().sum();
        format!(
            "| seconds | offered | accepted | resubmitted | refused | starved slots | acknowledged (committed) | committed tx/s | final height | kills | catch-up max s | flood periods | flood connections | heights compared × 4 | /tx checks |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | {:.0} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {:.1} | {} | {} | {} | {} |\nrefusals: {:?}\ncatch-up seconds: {:?}\n",
            self.duration_s,
            self.offered,
            self.accepted,
            self.resubmitted,
            refused,
            self.generator_starved,
            self.acknowledged,
            self.acknowledged as f64 / self.duration_s.max(1e-9),
            self.final_height,
            self.kills,
            max_catch_up,
            self.flood_periods,
            self.flood_connections,
            self.heights_compared,
            self.tx_spot_checks,
            self.refused,
            self.catch_up_s
                .iter()
                .map(|s| (s * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
        )
    }
}

/// SplitMix64: the nemesis's seeded choices (no OS randomness: a soak is
/// repeatable in what it does, if not in the timing it meets).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi);
        lo + self.next() % (hi - lo + 1)
    }
}

fn account_key(i: u32) -> k256::ecdsa::SigningKey {
    testkit::key(CHAOS_KEY_BASE + u64::from(i))
}

/// The node processes; every one still running is killed on drop.
pub struct Nodes {
    binary: PathBuf,
    configs: Vec<PathBuf>,
    logs: PathBuf,
    children: Vec<Option<Child>>,
    /// `blyan node --parent-pid`: each node exits when this process goes.
    parent_pid: Option<u32>,
    log_level: &'static str,
}

impl Nodes {
    pub fn new(binary: PathBuf, configs: Vec<PathBuf>, logs: &Path) -> Nodes {
        Nodes {
            binary,
            children: configs.iter().map(|_| None).collect(),
            configs,
            logs: logs.to_path_buf(),
            parent_pid: None,
            log_level: "warn",
        }
    }

    /// Every node started from now on exits when process `pid` (the one
    /// that started it) is gone, and logs at `info`.
    pub fn set_parent_pid(&mut self, pid: u32) {
        self.parent_pid = Some(pid);
        self.log_level = "info";
    }

    /// The OS process id of node `i`, if it was started and not reaped.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(Child::id)
    }

    /// `Some(error)` naming node `i` (with its log's tail) once its process
    /// has exited; `None` while it runs or if it was never started.
    pub fn exited(&mut self, i: usize) -> Result<Option<Error>, Error> {
        let Some(c) = self.children[i].as_mut() else {
            return Ok(None);
        };
        let Some(status) = c.try_wait().map_err(|e| Error::io("wait", e))? else {
            return Ok(None);
        };
        Ok(Some(Error::Node(format!(
            "node {i} exited ({status}); its log: {}",
            self.logs.join(format!("node-{i}.err")).display()
        ))))
    }

    /// SIGTERM (through kill(1), the crate forbids `unsafe`) to every node
    /// still running: a clean stop (OPS-LIFE-1).
    pub fn terminate_all(&mut self) {
        for c in self.children.iter_mut().flatten() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
            }
        }
    }

    /// Whether any started node's process is still running.
    pub fn any_running(&mut self) -> bool {
        self.children
            .iter_mut()
            .flatten()
            .any(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn start(&mut self, i: usize) -> Result<(), Error> {
        assert!(self.children[i].is_none(), "node {i} is already running");
        let log = |suffix: &str| {
            let path = self.logs.join(format!("node-{i}.{suffix}"));
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(path.display(), e))
        };
        let mut command = Command::new(&self.binary);
        command.args(["node", "--config"]).arg(&self.configs[i]);
        if let Some(pid) = self.parent_pid {
            command.args(["--parent-pid", &pid.to_string()]);
        }
        let child = command
            .env(crate::config::DEFAULT_PASSWORD_ENV, DEVNET_PASSWORD)
            .env("BLYAN_LOG", self.log_level)
            .stdin(Stdio::null())
            .stdout(log("out")?)
            .stderr(log("err")?)
            .spawn()
            .map_err(|e| Error::io(self.binary.display(), e))?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self, i: usize) -> Result<(), Error> {
        let mut child = self.children[i].take().expect("node is running");
        // Reaped whatever kill says (it fails only if the process is gone).
        let killed = child.kill();
        let waited = child.wait();
        killed.map_err(|e| Error::io("kill", e))?;
        waited.map_err(|e| Error::io("wait", e))?;
        Ok(())
    }

    /// An error naming the first node that exited by itself, with its log's tail.
    pub fn check_running(&mut self) -> Result<(), Error> {
        for (i, c) in self.children.iter_mut().enumerate() {
            if let Some(c) = c
                && let Some(status) = c.try_wait().map_err(|e| Error::io("wait", e))?
            {
                let err = std::fs::read_to_string(self.logs.join(format!("node-{i}.err")))
                    .unwrap_or_default();
                let tail: Vec<&str> = err.lines().rev().take(30).collect();
                return Err(Error::Node(format!(
                    "node {i} exited ({status}); its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )));
            }
        }
        Ok(())
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Idle TCP connections to `targets` from each of `sources`, `per_source`
/// at a time, each held until the server closes it and then reopened after
/// 20 ms (NODE-NET-6's threat: connections that never start a handshake).
pub struct Flood {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    pub fn start(targets: &[SocketAddr], sources: &[IpAddr], per_source: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for target in targets {
            for source in sources {
                for _ in 0..per_source {
                    let (stop, opened, target, source) =
                        (stop.clone(), opened.clone(), *target, *source);
                    tasks.push(tokio::spawn(async move {
                        use tokio::io::AsyncReadExt;
                        while !stop.load(Ordering::Relaxed) {
                            let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
                                return;
                            };
                            if socket.bind(SocketAddr::new(source, 0)).is_ok()
                                && let Ok(mut s) = socket.connect(target).await
                            {
                                opened.fetch_add(1, Ordering::Relaxed);
                                let mut buf = [0u8; 64];
                                while !stop.load(Ordering::Relaxed) {
                                    match tokio::time::timeout(
                                        Duration::from_millis(500),
                                        s.read(&mut buf),
                                    )
                                    .await
                                    {
                                        Ok(Ok(0)) | Ok(Err(_)) => break,
                                        Ok(Ok(_)) | Err(_) => {}
                                    }
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }));
                }
            }
        }
        Flood {
            stop,
            opened,
            tasks,
        }
    }

    /// Stops the flood; returns the connections it opened.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.opened.load(Ordering::Relaxed)
    }
}

/// 16 loopback source addresses (all of 127.0.0.0/8 is loopback on Linux).
pub fn flood_sources() -> Vec<IpAddr> {
    (2..18).map(|i| IpAddr::from([127, 0, 0, i])).collect()
}

/// Free loopback `(p2p, http)` addresses for `n` nodes (bound, read, released).
pub fn free_addrs(n: usize) -> Result<Vec<(String, String)>, Error> {
    let listeners = (0..2 * n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let addrs = listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.to_string())
                .map_err(|e| Error::io("bind", e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(addrs
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect())
}

/// A transfer in flight: who sent it, its nonce, its body, when last sent.
struct InFlight {
    account: u32,
    body: Arc<Vec<u8>>,
    sent: Instant,
}

/// The load generator's shared state.
struct Load {
    ready: VecDeque<u32>,
    next_nonce: Vec<u64>,
    in_flight: BTreeMap<String, InFlight>,
    acknowledged: BTreeSet<String>,
    accepted: u64,
    resubmitted: u64,
    refused: BTreeMap<String, u64>,
}

/// What a submission worker reports.
enum Outcome {
    Accepted,
    Refused(String),
}

/// One submission: the transfer's id and body, and its account (to make it
/// ready again if refused).
struct Submit {
    id: String,
    account: u32,
    body: Arc<Vec<u8>>,
    /// A resend: goes to another node than the account's own.
    resend: bool,
}

async fn submitter(
    url: String,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Submit>>>,
    load: Arc<Mutex<Load>>,
) {
    let mut conn: Option<Connection> = None;
    loop {
        let Some(s) = queue.lock().await.recv().await else {
            return;
        };
        if conn.is_none() {
            conn = Connection::connect(&url).await.ok();
        }
        let outcome = match conn.as_mut() {
            None => Outcome::Refused("unreachable".into()),
            Some(c) => match c.request("POST", "/tx", &s.body).await {
                Ok((200, _)) => Outcome::Accepted,
                Ok((status, body)) => Outcome::Refused(
                    serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v["reason"].as_str().map(str::to_string))
                        .unwrap_or_else(|| format!("http_{status}")),
                ),
                Err(_) => {
                    conn = None;
                    Outcome::Refused("connection_lost".into())
                }
            },
        };
        let mut l = load.lock().expect("load lock");
        match outcome {
            Outcome::Accepted => {
                l.accepted += 1;
                if let Some(f) = l.in_flight.get_mut(&s.id) {
                    f.sent = Instant::now();
                }
            }
            Outcome::Refused(reason) => {
                *l.refused.entry(reason.clone()).or_insert(0) += 1;
                // A duplicate is pending in that node's pool: the observer
                // will see it commit. A stale nonce means an earlier send of
                // this transfer (the account's only one in flight) committed
                // unobserved: move on. Anything else: send it again later.
                if reason != "duplicate" && l.in_flight.remove(&s.id).is_some() {
                    if reason == "stale_nonce" {
                        l.next_nonce[s.account as usize] += 1;
                    }
                    l.ready.push_back(s.account);
                }
            }
        }
    }
}

/// Runs one soak. `Err` if the network broke a promise (see the module docs).
pub async fn run(opts: &ChaosOptions) -> Result<ChaosReport, Error> {
    if opts.dir.join("devnet").exists() {
        return Err(Error::Config(format!(
            "{} already holds a soak; give a fresh directory",
            opts.dir.display()
        )));
    }
    assert!(opts.kill_min_s > 0 && opts.kill_min_s <= opts.kill_max_s);
    std::fs::create_dir_all(&opts.dir).map_err(|e| Error::io(opts.dir.display(), e))?;
    let mut devnet = DevnetOptions::new(opts.dir.join("devnet"), VALIDATORS);
    devnet.block_interval_ms = opts.block_interval_ms;
    devnet.rate_limits = crate::ratelimit::RateLimitConfig::unlimited();
    devnet.inference.enabled = false;
    devnet.extra_balances = (0..opts.accounts)
        .map(|i| GenesisBalance {
            address: testkit::address(&account_key(i)),
            amount: 1_000_000 * BLY,
        })
        .collect();
    let addrs = free_addrs(VALIDATORS)?;
    let (genesis, configs) = write_layout(&devnet, &addrs)?;
    let urls: Vec<String> = addrs.iter().map(|(_, h)| format!("http://{h}")).collect();
    let p2p: Vec<SocketAddr> = addrs
        .iter()
        .map(|(p, _)| p.parse().expect("a bound address"))
        .collect();
    let mut nodes = Nodes::new(opts.binary.clone(), configs, &opts.dir);
    for i in 0..VALIDATORS {
        nodes.start(i)?;
    }
    let start_deadline = Instant::now() + Duration::from_secs(CATCH_UP_BOUND_S);
    for url in &urls {
        while height(url).await.unwrap_or(0) < 1 {
            nodes.check_running()?;
            if Instant::now() > start_deadline {
                return Err(Error::Node(format!("{url} committed nothing in time")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let chain_id = genesis.chain_id.clone();
    let keys: Arc<Vec<k256::ecdsa::SigningKey>> =
        Arc::new((0..opts.accounts).map(account_key).collect());
    let addresses: Arc<Vec<Address>> = Arc::new(keys.iter().map(testkit::address).collect());
    let load = Arc::new(Mutex::new(Load {
        ready: (0..opts.accounts).collect(),
        next_nonce: vec![0; opts.accounts as usize],
        in_flight: BTreeMap::new(),
        acknowledged: BTreeSet::new(),
        accepted: 0,
        resubmitted: 0,
        refused: BTreeMap::new(),
    }));
    let alive: Arc<Vec<AtomicBool>> =
        Arc::new((0..VALIDATORS).map(|_| AtomicBool::new(true)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let mut queues = Vec::new();
    for url in &urls {
        let (tx, rx) = mpsc::channel::<Submit>(NODE_QUEUE);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..CONNECTIONS_PER_NODE {
            tasks.spawn(submitter(url.clone(), rx.clone(), load.clone()));
        }
        queues.push(tx);
    }

    // The observer: every block of a live node, in order.
    let blocks: Arc<Mutex<BTreeMap<u64, (String, String)>>> = Arc::new(Mutex::new(BTreeMap::new()));
    {
        let (urls, alive, stop, load, blocks) = (
            urls.clone(),
            alive.clone(),
            stop.clone(),
            load.clone(),
            blocks.clone(),
        );
        tasks.spawn(async move {
            let mut next = 1u64;
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                k = (k + 1) % VALIDATORS;
                if !alive[k].load(Ordering::Relaxed) {
                    continue;
                }
                let url = &urls[k];
                let Some(top) = height(url).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                while next <= top && !stop.load(Ordering::Relaxed) {
                    let Ok((200, b)) = get_json(url, &format!("/block/{next}")).await else {
                        break;
                    };
                    let ids: Vec<String> = b["txs"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    {
                        let mut l = load.lock().expect("load lock");
                        for id in ids {
                            if let Some(f) = l.in_flight.remove(&id) {
                                let a = f.account as usize;
                                l.next_nonce[a] += 1;
                                l.ready.push_back(f.account);
                            }
                            l.acknowledged.insert(id);
                        }
                    }
                    blocks.lock().expect("blocks lock").insert(
                        next,
                        (
                            b["hash"].as_str().unwrap_or_default().to_string(),
                            b["state_root"].as_str().unwrap_or_default().to_string(),
                        ),
                    );
                    next += 1;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    // The dispatcher: `rate` slots per second.
    let offered = Arc::new(AtomicU64::new(0));
    let starved = Arc::new(AtomicU64::new(0));
    {
        let (load, alive, stop, offered, starved, keys, addresses, queues, chain_id) = (
            load.clone(),
            alive.clone(),
            stop.clone(),
            offered.clone(),
            starved.clone(),
            keys.clone(),
            addresses.clone(),
            queues.clone(),
            chain_id.clone(),
        );
        let rate = opts.rate;
        tasks.spawn(async move {
            let t0 = Instant::now();
            let mut ticker = tokio::time::interval(Duration::from_millis(10));
            let mut last_scan = Instant::now();
            let mut stale: Vec<Submit> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                if last_scan.elapsed() > Duration::from_secs(1) {
                    // Once a second: transfers accepted but not seen
                    // committed for a while (lost with a killed node?).
                    last_scan = Instant::now();
                    let mut l = load.lock().expect("load lock");
                    let limit = Duration::from_secs(RESUBMIT_AFTER_S);
                    stale = l
                        .in_flight
                        .iter_mut()
                        .filter(|(_, f)| f.sent.elapsed() > limit)
                        .take(1_000)
                        .map(|(id, f)| {
                            f.sent = Instant::now();
                            Submit {
                                id: id.clone(),
                                account: f.account,
                                body: f.body.clone(),
                                resend: true,
                            }
                        })
                        .collect();
                    l.resubmitted += stale.len() as u64;
                }
                let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
                while offered.load(Ordering::Relaxed) < due {
                    offered.fetch_add(1, Ordering::Relaxed);
                    // Resends of stale transfers first, then a ready account.
                    let job = {
                        let mut l = load.lock().expect("load lock");
                        if let Some(s) = stale.pop() {
                            Some(s)
                        } else if let Some(a) = l.ready.pop_front() {
                            let nonce = l.next_nonce[a as usize];
                            drop(l);
                            let kind = TxKind::Transfer {
                                to: addresses[(a as usize + 1) % addresses.len()],
                                amount: 1,
                            };
                            let tx = TxBody {
                                nonce,
                                gas_limit: intrinsic_gas(&kind),
                                max_fee_per_gas: MAX_FEE_PER_GAS,
                                max_priority_fee_per_gas: INITIAL_BASE_FEE,
                                kind,
                            }
                            .sign(&chain_id, &keys[a as usize]);
                            let id = format!("0x{}", hex::encode(tx.id()));
                            let body = Arc::new(
                                format!("{{\"tx\":\"0x{}\"}}", hex::encode(tx.encode()))
                                    .into_bytes(),
                            );
                            load.lock().expect("load lock").in_flight.insert(
                                id.clone(),
                                InFlight {
                                    account: a,
                                    body: body.clone(),
                                    sent: Instant::now(),
                                },
                            );
                            Some(Submit {
                                id,
                                account: a,
                                body,
                                resend: false,
                            })
                        } else {
                            None
                        }
                    };
                    let Some(job) = job else {
                        starved.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    // The account's node if alive, else the next live one.
                    let first = (job.account as usize + usize::from(job.resend)) % VALIDATORS;
                    let node = (0..VALIDATORS)
                        .map(|d| (first + d) % VALIDATORS)
                        .find(|n| alive[*n].load(Ordering::Relaxed))
                        .unwrap_or(first);
                    if let Err(e) = queues[node].try_send(job) {
                        let job = e.into_inner();
                        let mut l = load.lock().expect("load lock");
                        *l.refused.entry("local_queue_full".into()).or_insert(0) += 1;
                        if l.in_flight.remove(&job.id).is_some() {
                            l.ready.push_back(job.account);
                        }
                    }
                }
            }
        });
    }

    // The nemesis, on this task.
    let mut rng = Rng(opts.seed);
    let mut report = ChaosReport::default();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(opts.duration_s);
    let mut next_kill = t0 + Duration::from_secs(rng.between(opts.kill_min_s, opts.kill_max_s));
    let mut flood: Option<(Flood, Instant)> = None;
    let mut next_flood = t0 + Duration::from_secs(rng.between(5, 15));
    let mut restarts: Vec<(usize, Instant)> = Vec::new();
    let result = async {
        while Instant::now() < end {
            nodes.check_running()?;
            let now = Instant::now();
            if opts.flood {
                match flood.take() {
                    Some((f, until)) if now >= until => {
                        report.flood_connections += f.stop().await;
                        next_flood = now + Duration::from_secs(rng.between(10, 20));
                    }
                    Some(x) => flood = Some(x),
                    None if now >= next_flood => {
                        report.flood_periods += 1;
                        let until = now + Duration::from_secs(rng.between(10, 20));
                        flood = Some((Flood::start(&p2p, &flood_sources(), 8), until));
                    }
                    None => {}
                }
            }
            if now >= next_kill {
                let victim = rng.between(0, VALIDATORS as u64 - 1) as usize;
                alive[victim].store(false, Ordering::Relaxed);
                nodes.kill(victim)?;
                report.kills += 1;
                tokio::time::sleep(Duration::from_secs(rng.between(1, 5))).await;
                nodes.start(victim)?;
                alive[victim].store(true, Ordering::Relaxed);
                restarts.push((victim, Instant::now()));
                next_kill = Instant::now()
                    + Duration::from_secs(rng.between(opts.kill_min_s, opts.kill_max_s));
            }
            // Catch-up of the latest restart, measured while the soak goes on.
            if let Some((victim, at)) = restarts.last().copied()
                && report.catch_up_s.len() < restarts.len()
            {
                let others = {
                    let mut best = 0;
                    for (i, url) in urls.iter().enumerate() {
                        if i != victim {
                            best = best.max(height(url).await.unwrap_or(0));
                        }
                    }
                    best
                };
                if height(&urls[victim]).await.unwrap_or(0) + 1 >= others && others > 0 {
                    report.catch_up_s.push(at.elapsed().as_secs_f64());
                } else if at.elapsed() > Duration::from_secs(CATCH_UP_BOUND_S) {
                    return Err(Error::Node(format!(
                        "node {victim} did not catch up within {CATCH_UP_BOUND_S} s of its restart"
                    )));
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok::<(), Error>(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    if let Some((f, _)) = flood.take() {
        report.flood_connections += f.stop().await;
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    result?;
    report.duration_s = t0.elapsed().as_secs_f64();
    if report.catch_up_s.len() < restarts.len() {
        // The last restart's catch-up, after the load.
        let (victim, at) = *restarts.last().expect("a restart is pending");
        let deadline = at + Duration::from_secs(CATCH_UP_BOUND_S);
        loop {
            let target = height(&urls[(victim + 1) % VALIDATORS])
                .await
                .unwrap_or(u64::MAX);
            if height(&urls[victim]).await.unwrap_or(0) + 1 >= target {
                report.catch_up_s.push(at.elapsed().as_secs_f64());
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Node(format!(
                    "node {victim} did not catch up within {CATCH_UP_BOUND_S} s of its restart"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // Verdict: every node reaches the last observed height, and agrees with
    // the observer at every height.
    let observed = blocks.lock().expect("blocks lock").clone();
    let final_height = observed.keys().next_back().copied().unwrap_or(0);
    if final_height == 0 {
        return Err(Error::Node("no block was observed".into()));
    }
    let deadline = Instant::now() + Duration::from_secs(CATCH_UP_BOUND_S);
    for (i, url) in urls.iter().enumerate() {
        while height(url).await.unwrap_or(0) < final_height {
            nodes.check_running()?;
            if Instant::now() > deadline {
                return Err(Error::Node(format!(
                    "node {i} did not reach height {final_height} within {CATCH_UP_BOUND_S} s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    for (h, (hash, root)) in &observed {
        for (i, url) in urls.iter().enumerate() {
            let (status, b) = get_json(url, &format!("/block/{h}")).await?;
            if status != 200
                || b["hash"].as_str() != Some(hash)
                || b["state_root"].as_str() != Some(root)
            {
                return Err(Error::Node(format!(
                    "node {i} disagrees at height {h}: {status} {} / {} (observed {hash} / {root})",
                    b["hash"], b["state_root"]
                )));
            }
        }
        report.heights_compared += 1;
    }
    let acknowledged: Vec<String> = load
        .lock()
        .expect("load lock")
        .acknowledged
        .iter()
        .cloned()
        .collect();
    let step = (acknowledged.len() / TX_SPOT_CHECKS).max(1);
    for id in acknowledged.iter().step_by(step).take(TX_SPOT_CHECKS) {
        for (i, url) in urls.iter().enumerate() {
            let (status, _) = get_json(url, &format!("/tx/{id}")).await?;
            if status != 200 {
                return Err(Error::Node(format!(
                    "node {i} answers {status} for acknowledged transfer {id}"
                )));
            }
        }
        report.tx_spot_checks += 1;
    }
    let load = load.lock().expect("load lock");
    report.offered = offered.load(Ordering::Relaxed);
    report.generator_starved = starved.load(Ordering::Relaxed);
    report.accepted = load.accepted;
    report.resubmitted = load.resubmitted;
    report.refused = load.refused.clone();
    report.acknowledged = load.acknowledged.len() as u64;
    report.final_height = final_height;
    Ok(report)
}
