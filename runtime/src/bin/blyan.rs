//! `blyan`: run a node or a local devnet, manage keys, send transfers.
//!
//! ```text
//! blyan devnet [--dir DIR] [--validators 4] [--base-port 7100] [--block-interval-ms 2000]
//!              [--inference-nodes N]
//! blyan node --config FILE [--check-config]
//!   (both: [--log-format text|json] [--log FILTER] [--otlp-endpoint URL])
//! blyan keys new --out FILE      (password: --password-file FILE, BLYAN_KEY_PASSWORD,
//!                                 a prompt on a terminal, or --password for scripts)
//! blyan keys show --key FILE
//! blyan tx transfer --to ADDR --amount BLY --key FILE --node URL [--wait]
//! blyan status --node URL
//! blyan bench [--block-interval-ms 2000] [--rate 1000[,2000…]] [--duration 30] [--warmup 5]
//!             [--accounts 4000] [--connections 8] [--generator-threads 1] [--drain 60] [--dir DIR]
//!             [--timeout-propose-ms MS]
//! blyan chaos --dir DIR [--duration 600] [--rate 1000] [--block-interval-ms 2000]
//!             [--accounts 4000] [--kill-min-s 30] [--kill-max-s 60] [--no-flood] [--seed 1]
//! blyan bench-sync --dir DIR [--blocks 100] [--block-interval-ms 1000]
//! blyan bench-open --dir DIR [--blocks 100000] [--txs-per-block 1] [--runs 3] [--skip-replay]
//! blyan store verify --config FILE
//! ```
//! Logs go to stderr: `--log` takes per-module filter directives
//! (`info,blyan_runtime::transport=debug`); without it `RUST_LOG`, else
//! `BLYAN_LOG` (one level: error, warn, info (default), debug, trace).
//! `blyan node` and `blyan devnet` stop cleanly on SIGTERM or Ctrl-C.

use blyan_runtime::Error;
use blyan_runtime::bench;
use blyan_runtime::client;
use blyan_runtime::config::{DEFAULT_PASSWORD_ENV, FileConfig};
use blyan_runtime::devnet::{DEFAULT_BASE_PORT, Devnet, DevnetOptions};
use blyan_runtime::keystore::{
    DEFAULT_ITERATIONS, KeyFile, Password, PasswordSources, Prompt, generate_key, read_key_file,
    resolve_password, write_key_file,
};
use blyan_runtime::node::{NodeSetup, RunningNode, bind};
use blyan_runtime::telemetry::{self, LogFormat, Telemetry, TelemetryOptions};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::tx::{TxKind, public_key_of};
use blyan_state_machine::types::{Address, Amount, BLY};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing::Instrument as _;

#[derive(Parser)]
#[command(name = "blyan", version, about = "Blyan node, devnet and wallet")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run N validators in this process on loopback until Ctrl-C.
    Devnet {
        /// Data directory (reused if it holds a devnet).
        #[arg(long, default_value = "devnet")]
        dir: PathBuf,
        #[arg(long, default_value_t = 4)]
        validators: usize,
        /// Node i listens for peers on base+2i and for HTTP on base+2i+1.
        #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
        base_port: u16,
        #[arg(long, default_value_t = blyan_runtime::config::DEFAULT_BLOCK_INTERVAL_MS)]
        block_interval_ms: u64,
        /// Inference nodes to start besides the validators, registered on
        /// chain by the devnet; the validators route chat requests to them
        /// (spec/inference.md RT-STAGE-*, RT-PIPE-*). With 4 or more the
        /// layers are split into two halves, two holders each, and requests
        /// run as pipelines; with fewer each holds the whole model. 0: the
        /// validators serve from their own engines.
        #[arg(long, default_value_t = 0)]
        inference_nodes: usize,
        /// Split the layers into this many ranges over the inference nodes
        /// (RT-PIPE-5; 0: two with 4 or more inference nodes).
        #[arg(long, default_value_t = 0, hide = true)]
        stages: usize,
        /// Register the embedded Qwen3-MoE model (8 experts per layer, top
        /// 2) instead of the dense default; inference nodes then hold half
        /// the experts of their layers and stages call the rest on other
        /// nodes (RT-PIPE-8). Only for a new devnet directory.
        #[arg(long)]
        moe: bool,
        /// Run every node (validator or inference) as its own OS process
        /// (`blyan node --config DIR/<node>/config.toml`, logs in DIR/logs),
        /// in this process group: Ctrl-C stops them all, and a node whose
        /// process is killed is reported, not restarted.
        #[arg(long)]
        processes: bool,
        /// The staking epoch of a new devnet's genesis (STAKE-5: a bond
        /// takes effect at its boundary); default the chain's 100 blocks.
        #[arg(long, hide = true)]
        epoch_length_blocks: Option<u64>,
        /// No API rate limits on any node (tests that poll hard).
        #[arg(long, hide = true)]
        no_rate_limits: bool,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Write a devnet directory (genesis, keys, one config.toml per
    /// validator) for validators run as separate processes or containers,
    /// and exit (the compose file and the Kubernetes manifests under
    /// runtime/deploy/ start from one). Reuses an existing directory's keys.
    DevnetLayout {
        #[arg(long, default_value = "devnet")]
        dir: PathBuf,
        /// Each validator's P2P address as the others reach it (and as it
        /// binds, unless BLYAN_P2P_ADDR says otherwise), comma-separated, one
        /// per validator: e.g. validator-0:7100,validator-1:7100,...
        #[arg(long, value_delimiter = ',', required = true)]
        p2p_addrs: Vec<String>,
        /// The HTTP API address every validator binds.
        #[arg(long, default_value = "0.0.0.0:8100")]
        http_addr: String,
        #[arg(long, default_value_t = blyan_runtime::config::DEFAULT_BLOCK_INTERVAL_MS)]
        block_interval_ms: u64,
    },
    /// Run one node from a TOML configuration file.
    Node {
        #[arg(long)]
        config: PathBuf,
        /// Check the configuration (the file, the genesis, the key file and
        /// its password, the data and model directories) and exit: 0 if the
        /// node could start from it, 1 with the reason otherwise.
        #[arg(long)]
        check_config: bool,
        /// Exit (cleanly) when the process with this id is no longer this
        /// node's parent: `blyan devnet --processes` starts its nodes so.
        #[arg(long, hide = true)]
        parent_pid: Option<u32>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Key files.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Transactions.
    Tx {
        #[command(subcommand)]
        command: TxCommand,
    },
    /// Proof-of-Learning: train a delta, submit it, follow it (POL-TRAIN-2,
    /// POL-SUBMIT-1).
    #[cfg(feature = "inference")]
    Pol {
        #[command(subcommand)]
        command: PolCommand,
    },
    /// Print an account: balance, nonce, stake and this epoch's reward
    /// claims per pool (learning, datasets, attestation, …; paid at the
    /// reward epoch's end, RWD-5).
    Account {
        /// The address (0x-hex).
        address: Address,
        #[arg(long, default_value = "http://127.0.0.1:7101")]
        node: String,
    },
    /// Print a node's status.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:7101")]
        node: String,
    },
    /// Store open time on a generated chain of certified blocks: the
    /// verified-state load against a replay from genesis (NODE-STORE-6).
    BenchOpen {
        /// A fresh directory for the generated store (kept).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        blocks: u64,
        #[arg(long, default_value_t = 1)]
        txs_per_block: usize,
        /// Funded test accounts the transfers go round.
        #[arg(long, default_value_t = 64)]
        accounts: usize,
        /// Opens timed per mode.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Time only the verified-state open.
        #[arg(long)]
        skip_replay: bool,
    },
    /// Chaos soak: a 4-process devnet under load while validators are
    /// SIGKILLed and restarted and idle-connection floods come and go; fails
    /// unless every node ends on the same chain with every acknowledged
    /// transfer (runtime/src/chaos.rs).
    Chaos {
        /// A fresh directory (devnet, node logs); kept.
        #[arg(long)]
        dir: PathBuf,
        /// Seconds of load and faults.
        #[arg(long, default_value_t = 600)]
        duration: u64,
        /// Offered transfers per second.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        #[arg(long, default_value_t = blyan_runtime::config::DEFAULT_BLOCK_INTERVAL_MS)]
        block_interval_ms: u64,
        /// Load accounts (each has one transfer in flight at a time).
        #[arg(long, default_value_t = 4_000)]
        accounts: u32,
        #[arg(long, default_value_t = 30)]
        kill_min_s: u64,
        #[arg(long, default_value_t = 60)]
        kill_max_s: u64,
        /// No idle-connection floods.
        #[arg(long)]
        no_flood: bool,
        /// Seed of the nemesis's choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Catch-up over big blocks: a validator down while the others commit
    /// `--blocks` blocks of about 1 MiB, then restarted and timed
    /// (NODE-SYNC-5/6).
    BenchSync {
        /// A fresh directory (devnet, node logs); kept.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 100)]
        blocks: u64,
        #[arg(long, default_value_t = 1_000)]
        block_interval_ms: u64,
    },
    /// Store maintenance.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Inference API throughput and latency, with and without an API key
    /// (paid inference's metering cost), on an in-process devnet
    /// (runtime/src/bench_chat.rs).
    BenchChat {
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Seconds per mode.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        #[arg(long, default_value_t = 8)]
        max_tokens: usize,
        #[arg(long, default_value_t = blyan_runtime::config::DEFAULT_BLOCK_INTERVAL_MS)]
        block_interval_ms: u64,
        /// Parent directory of the devnet (kept); default: a temporary one, removed.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Inference nodes the validators route to (RT-STAGE-*); 0: local engines.
        #[arg(long, default_value_t = 0)]
        inference_nodes: usize,
        /// Ranges the layers are split into over the inference nodes
        /// (RT-PIPE-5; 0: two with 4 or more inference nodes, 1: whole model).
        #[arg(long, default_value_t = 0)]
        stages: usize,
        /// Decode steps a stage batches (RT-PIPE-9; 1: none).
        #[arg(long, default_value_t = blyan_runtime::pipeline::DEFAULT_MAX_STAGE_BATCH)]
        max_stage_batch: usize,
    },
    /// Load benchmark: pre-signed transfers over `POST /tx` to a fresh
    /// in-process 4-validator devnet per offered rate (see runtime/BENCH.md).
    Bench {
        #[arg(long, default_value_t = blyan_runtime::config::DEFAULT_BLOCK_INTERVAL_MS)]
        block_interval_ms: u64,
        /// Offered rates in transfers per second, comma-separated; one fresh devnet each.
        #[arg(long, value_delimiter = ',', default_value = "1000")]
        rate: Vec<u64>,
        /// Seconds of load.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Seconds at the start left out of the steady window.
        #[arg(long, default_value_t = 5)]
        warmup: u64,
        /// Funded load accounts.
        #[arg(long, default_value_t = 4_000)]
        accounts: u32,
        /// Keep-alive HTTP connections per node.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Threads of the load generator's runtime.
        #[arg(long, default_value_t = 1)]
        generator_threads: usize,
        /// Longest wait, in seconds, for the mempools to empty after the load.
        #[arg(long, default_value_t = 60)]
        drain: u64,
        /// Parent directory of the devnets (kept); default: a temporary one, removed.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Consensus timeout_propose in ms (default: the driver's, 1000); for experiments.
        #[arg(long)]
        timeout_propose_ms: Option<u64>,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Replay every stored block from genesis and check every block, index
    /// entry and the stored state byte for byte (NODE-STORE-6; the node's own
    /// open checks the state against the last certified root only).
    Verify {
        /// The node's configuration (genesis and data directory are read from it).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a new encrypted key file.
    New {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Print a key file's address (and public key, given the password).
    Show {
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// List the key files in a directory (file, address).
    List {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Create an API key (spec/api.md API-KEY-1) for an allowance the key
    /// file owns: for `--allowance ID`, or for a new allowance of `--cap`
    /// BLY opened first (TX-13, waits for the commit). Prints `api key: <key>`.
    ApiKey {
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        password: PasswordArgs,
        #[arg(long, default_value = "http://127.0.0.1:7101")]
        node: String,
        /// An existing allowance (0x-hex id, the opening transaction's id).
        #[arg(long, conflicts_with = "cap")]
        allowance: Option<String>,
        /// Open a new allowance with this cap, in BLY.
        #[arg(long, required_unless_present = "allowance")]
        cap: Option<String>,
        /// The new allowance's lifetime in blocks (default: the chain's maximum).
        #[arg(long)]
        blocks: Option<u64>,
        /// Per-node caps of the new allowance: `0xADDRESS=BLY`, repeatable.
        #[arg(long = "node-cap")]
        node_caps: Vec<String>,
        /// Which key of the allowance (distinct keys, distinct usage records).
        #[arg(long, default_value_t = 0)]
        index: u32,
    },
}

#[cfg(feature = "inference")]
#[derive(Subcommand)]
enum PolCommand {
    /// Train a delta for one layer of the chain's model on its training
    /// pool and write it (block and payload) to --out.
    Train {
        #[arg(long, default_value = "http://127.0.0.1:7101")]
        node: String,
        /// The submitter's key file (the delta's id covers its address).
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        password: PasswordArgs,
        /// Where to write the delta file.
        #[arg(long)]
        out: PathBuf,
        /// The target layer.
        #[arg(long, default_value_t = blyan_runtime::pol_cli::DEFAULT_LAYER)]
        layer: u32,
        /// The target as a block name instead of --layer: layer.N,
        /// layer.N.expert.E or layer.N.router (POL-TRAIN-3).
        #[arg(long, conflicts_with = "layer")]
        target: Option<String>,
        /// Train LoRA factors of this rank on the target's matrices instead
        /// of every tensor of the target (POL-TRAIN-3).
        #[arg(long)]
        lora_rank: Option<u32>,
        /// LoRA's alpha (the product is scaled by alpha / rank).
        #[arg(long, default_value_t = 16.0)]
        lora_alpha: f64,
        /// The model's block directory (default: the embedded model).
        #[arg(long)]
        model_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 200)]
        steps: u32,
        /// Sequences per step.
        #[arg(long, default_value_t = 8)]
        batch: u32,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq_tokens: u32,
        #[arg(long, default_value_t = 3e-3)]
        learning_rate: f64,
        /// Entries kept per row of the compressed update, in ppm (POL-DELTA-7).
        #[arg(long, default_value_t = blyan_runtime::pol_cli::DEFAULT_DENSITY_PPM)]
        density_ppm: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Multiply the trained update by this before compressing it (a
        /// calibration aid: negative makes the model worse).
        #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
        scale: f64,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Commit, then reveal a delta file; with --wait, follow it to its
    /// decision and print it as one JSON line.
    Submit {
        #[arg(long, default_value = "http://127.0.0.1:7101")]
        node: String,
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        password: PasswordArgs,
        #[arg(long)]
        delta: PathBuf,
        #[arg(long)]
        wait: bool,
    },
    /// Where a delta stands: pending, attesting, accepted, rejected or stale.
    Status {
        /// The delta's id (0x-hex).
        delta: String,
        #[arg(long, default_value = "http://127.0.0.1:7101")]
        node: String,
    },
}

/// What every transaction command needs besides its kind.
#[derive(clap::Args)]
struct TxArgs {
    #[arg(long)]
    key: PathBuf,
    #[command(flatten)]
    password: PasswordArgs,
    #[arg(long, default_value = "http://127.0.0.1:7101")]
    node: String,
    /// Priority fee per gas, in base units.
    #[arg(long, default_value_t = 1_000_000_000)]
    tip: u128,
    /// Wait until the transaction is committed (prints progress).
    #[arg(long)]
    wait: bool,
}

#[derive(Subcommand)]
enum TxCommand {
    /// Sign and submit a transfer.
    Transfer {
        #[arg(long)]
        to: Address,
        /// Amount in BLY, up to 18 decimals (e.g. 1.5).
        #[arg(long)]
        amount: String,
        #[command(flatten)]
        args: TxArgs,
    },
    /// Bond stake from the key's balance; the key becomes a validator key (TX-4).
    Bond {
        /// Amount in BLY, up to 18 decimals.
        #[arg(long)]
        amount: String,
        #[command(flatten)]
        args: TxArgs,
    },
    /// Register the key's VRF public key (TX-16, once), derived from it
    /// (CONS-COMM-8): without one a validator votes but is never drawn
    /// into the proposer committee.
    VrfKey {
        #[command(flatten)]
        args: TxArgs,
    },
    /// Start unbonding stake; released after the unbonding period (TX-5).
    Unbond {
        /// Amount in BLY, up to 18 decimals.
        #[arg(long)]
        amount: String,
        #[command(flatten)]
        args: TxArgs,
    },
    /// Revoke an inference allowance (TX-14): its API keys stop at once;
    /// the unspent rest returns after the settlement grace period.
    CloseAllowance {
        /// The allowance's id (0x-hex).
        #[arg(long)]
        allowance: String,
        #[command(flatten)]
        args: TxArgs,
    },
}

/// Signs `kind` with the key file, submits it to `args.node` and, with
/// `--wait`, polls until it is committed, printing progress.
async fn submit_tx(kind: TxKind, args: TxArgs) -> Result<String, Error> {
    submit_tx_with(|_| kind, args).await
}

/// [`submit_tx`] of a kind made from the key.
async fn submit_tx_with(
    kind: impl FnOnce(&k256::ecdsa::SigningKey) -> TxKind,
    args: TxArgs,
) -> Result<String, Error> {
    let key = read_key_file(&args.key, &password(&args.password, Prompt::Once)?)?;
    let kind = kind(&key);
    let node = &args.node;
    let start_height = client::height(node).await.unwrap_or(0);
    let tx = client::sign_tx_with_tip(node, &key, kind, args.tip).await?;
    let body = json!({ "tx": format!("0x{}", hex::encode(tx.encode())) });
    let (s, reply) = client::post_json(node, "/tx", &body).await?;
    expect_ok(s, &reply)?;
    let id = reply["id"].as_str().unwrap_or_default().to_string();
    println!("submitted {id}");
    if !args.wait {
        return Ok(id);
    }
    for i in 0..600u32 {
        let (s, r) = client::get_json(node, &format!("/tx/{id}")).await?;
        if s == 200 {
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            if let Some(why) = r["receipt"]["failure"].as_str().or(r["failure"].as_str()) {
                return Err(Error::Http(format!("transaction {id} failed: {why}")));
            }
            return Ok(id);
        }
        if i % 10 == 9 {
            let (_, st) = client::get_json(node, "/status").await?;
            eprintln!(
                "waiting for commit: {} s, height {} (+{})",
                (i + 1) / 5,
                st["height"],
                st["height"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(start_height)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(Error::Http("not committed within 120 s".into()))
}

/// A 0x-hex 32-byte id.
fn parse_hash32(s: &str) -> Result<[u8; 32], Error> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
        .map_err(|e| Error::Config(format!("{s:?} is not a 0x-hex 32-byte id: {e}")))?;
    Ok(out)
}

/// `0xADDRESS=BLY` (TX-13 node caps).
fn parse_node_cap(s: &str) -> Result<blyan_state_machine::allowance::NodeCap, Error> {
    let (node, cap) = s
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--node-cap {s:?}: expected 0xADDRESS=BLY")))?;
    let node: Address = node
        .parse()
        .map_err(|e| Error::Config(format!("--node-cap {s:?}: {e}")))?;
    Ok(blyan_state_machine::allowance::NodeCap {
        node,
        cap: parse_bly(cap)?,
    })
}

/// Logs and traces of a long-running command (spec/ops.md OPS-LOG-*, OPS-TRACE-*).
#[derive(clap::Args, Clone)]
struct LogArgs {
    /// Log line format: `text` for people, `json` for log pipelines (ELK).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "BLYAN_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter: a level or per-module directives, e.g.
    /// `info,blyan_runtime::transport=debug` (default: RUST_LOG, else BLYAN_LOG, else info).
    #[arg(long = "log", value_name = "FILTER")]
    filter: Option<String>,
    /// Export tracing spans over OTLP/gRPC to this collector, e.g.
    /// http://127.0.0.1:4317 (Jaeger, the OpenTelemetry Collector). Off by default.
    #[arg(long, value_name = "URL", env = "BLYAN_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

impl LogArgs {
    fn init(&self, service_name: &str) -> Result<Telemetry, Error> {
        let mut o = TelemetryOptions::new(tracing::Level::INFO);
        o.format = self.log_format;
        o.directives = self.filter.clone();
        o.otlp_endpoint = self.otlp_endpoint.clone();
        o.service_name = service_name.into();
        telemetry::init(&o)
    }
}

/// OPS-LIFE-1: resolves at SIGTERM (systemd, Kubernetes, container
/// runtimes) or Ctrl-C.
/// Resolves once `pid` is no longer this process's parent (never for `None`).
async fn parent_gone(pid: Option<u32>) {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    while std::os::unix::process::parent_id() == pid {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `blyan devnet --processes`: every node its own process
/// (blyan_runtime::devnet_procs). Prints the same lines as the in-process
/// devnet, with each node's own pid, then reports any node whose process
/// exits, until Ctrl-C or SIGTERM.
async fn run_process_devnet(opts: DevnetOptions) -> Result<(), Error> {
    let binary = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
    let mut devnet = blyan_runtime::devnet_procs::ProcessDevnet::start(opts, binary).await?;
    println!(
        "data directory: {} (logs in {}/logs)",
        devnet.dir.display(),
        devnet.dir.display()
    );
    for (i, n) in devnet.nodes.iter().enumerate() {
        println!(
            "node {i}: {}  address {}  api {}  p2p {}  pid {}",
            n.role, n.address, n.api_url, n.p2p_addr, n.pid
        );
    }
    println!(
        "faucet: {} (key file {}, password \"{}\")",
        devnet.faucet,
        devnet.faucet_key_file.display(),
        blyan_runtime::devnet::DEVNET_PASSWORD
    );
    println!("api key: {}", devnet.api_key().await?);
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let why = loop {
        tokio::select! {
            why = &mut stop => break why?,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (i, e) in devnet.newly_exited() {
                    // Reported, not restarted: the rest keep running.
                    let _ = writeln!(std::io::stdout(), "node {i} exited: {e}");
                }
            }
        }
    };
    let _ = writeln!(std::io::stdout(), "stopping ({why})");
    devnet
        .stop(Duration::from_millis(STOP_WAIT_MS + 1_000))
        .await;
    let _ = writeln!(std::io::stdout(), "stopped");
    Ok(())
}

async fn shutdown_signal() -> Result<&'static str, Error> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("SIGTERM handler", e))?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map(|()| "interrupt").map_err(|e| Error::io("ctrl-c handler", e)),
        _ = term.recv() => Ok("SIGTERM"),
    }
}

/// How long a stopping node waits for its node task (then its other tasks
/// are aborted): the bound on a clean stop (OPS-LIFE-1).
const STOP_WAIT_MS: u64 = 5_000;

/// OPS-LIFE-3: `blyan node --check-config`: everything the node reads at
/// start, without starting it (the store is not opened: a running node
/// holds its lock).
fn check_config(path: &std::path::Path) -> Result<String, Error> {
    let c = FileConfig::load(path)?;
    let setup = NodeSetup::from_config(&c)?;
    let data = &c.data_dir;
    if data.exists() {
        let meta = std::fs::metadata(data).map_err(|e| Error::io(data.display(), e))?;
        if !meta.is_dir() {
            return Err(Error::Config(format!(
                "data_dir {} is not a directory",
                data.display()
            )));
        }
        if meta.permissions().readonly() {
            return Err(Error::Config(format!(
                "data_dir {} is read-only",
                data.display()
            )));
        }
    } else {
        let parent = data
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if !parent.is_dir() {
            return Err(Error::Config(format!(
                "data_dir {} does not exist and its parent {} is not a directory",
                data.display(),
                parent.display()
            )));
        }
    }
    if c.inference.enabled
        && let Some(m) = &c.inference.model_dir
        && !m.is_dir()
    {
        return Err(Error::Config(format!(
            "inference.model_dir {} is not a directory",
            m.display()
        )));
    }
    for (what, addr) in [("p2p_addr", &c.p2p_addr), ("http_addr", &c.http_addr)] {
        if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
            return Err(Error::Config(format!("{what} {addr:?} is not host:port")));
        }
    }
    let address = Address::from_public_key(setup.key.verifying_key());
    Ok(format!(
        "configuration {} is valid: chain {}, node {address}, {} peers, data {}",
        path.display(),
        setup.genesis.chain_id,
        setup.peers.len(),
        data.display()
    ))
}

/// Where a key file's password comes from (KEY-2, `keystore`): the first of
/// `--password`, `--password-file`, BLYAN_KEY_PASSWORD, a prompt.
#[derive(clap::Args)]
struct PasswordArgs {
    /// Password, for scripts and the devnet (other local users can see
    /// command lines: prefer --password-file or BLYAN_KEY_PASSWORD).
    #[arg(long, conflicts_with = "password_file")]
    password: Option<String>,
    /// File whose first line is the password.
    #[arg(long)]
    password_file: Option<PathBuf>,
}

impl PasswordArgs {
    fn sources(&self) -> PasswordSources<'_> {
        PasswordSources {
            given: self.password.as_deref(),
            file: self.password_file.as_deref(),
            env: Some(DEFAULT_PASSWORD_ENV),
        }
    }

    /// Whether any source but the prompt gives a password.
    fn given(&self) -> bool {
        self.password.is_some()
            || self.password_file.is_some()
            || std::env::var_os(DEFAULT_PASSWORD_ENV).is_some()
    }
}

/// KEY-2: the password, or an error naming where it may come from.
fn password(p: &PasswordArgs, prompt: Prompt) -> Result<Password, Error> {
    resolve_password(p.sources(), prompt)
}

/// Parses a decimal BLY amount into base units (10^18 per BLY), exactly.
fn parse_bly(s: &str) -> Result<Amount, Error> {
    let bad = || Error::Config(format!("amount {s:?} is not a decimal number of BLY"));
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() || frac.len() > 18 {
        return Err(bad());
    }
    let digits = |t: &str| t.is_empty() || t.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) {
        return Err(bad());
    }
    let int: Amount = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let frac_units: Amount = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<18}").parse().map_err(|_| bad())?
    };
    int.checked_mul(BLY)
        .and_then(|v| v.checked_add(frac_units))
        .ok_or_else(bad)
}

/// Text logs at `default` unless `RUST_LOG` or `BLYAN_LOG` say otherwise.
fn init_logging_or(default: tracing::Level) -> Result<Telemetry, Error> {
    telemetry::init(&TelemetryOptions::new(default))
}

fn expect_ok(status: u16, body: &Value) -> Result<(), Error> {
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(Error::Http(format!("HTTP {status}: {body}")))
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Devnet {
            dir,
            validators,
            base_port,
            block_interval_ms,
            inference_nodes,
            stages,
            moe,
            processes,
            epoch_length_blocks,
            no_rate_limits,
            log,
        } => {
            let _telemetry = log.init("blyan-devnet")?;
            let mut opts = DevnetOptions::new(dir, validators);
            opts.inference_nodes = inference_nodes;
            opts.stages = stages;
            opts.moe = moe;
            // 0: ephemeral ports (tests; the lines below say which).
            opts.base_port = (base_port != 0).then_some(base_port);
            opts.block_interval_ms = block_interval_ms;
            opts.epoch_length_blocks = epoch_length_blocks;
            if no_rate_limits {
                opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
            }
            if processes {
                return run_process_devnet(opts).await;
            }
            let devnet = Devnet::start(opts).await?;
            println!("data directory: {}", devnet.dir.display());
            let pid = std::process::id();
            let roles = std::iter::repeat("validator")
                .zip(&devnet.nodes)
                .chain(std::iter::repeat("inference").zip(&devnet.inference));
            for (i, (role, n)) in roles.enumerate() {
                println!(
                    "node {i}: {role}  address {}  api {}  p2p {}  pid {pid}",
                    n.address,
                    n.api_url(),
                    n.p2p_addr
                );
            }
            println!(
                "faucet: {} (key file {}, password \"{}\")",
                devnet.faucet,
                devnet.faucet_key_file.display(),
                blyan_runtime::devnet::DEVNET_PASSWORD
            );
            // API-KEY-*: a key of an allowance the faucet funds (output, not a log).
            println!("api key: {}", devnet.api_key().await?);
            let why = shutdown_signal().await?;
            // A reader that went away must not turn a clean stop into a panic.
            let _ = writeln!(std::io::stdout(), "stopping ({why})");
            devnet.stop().await;
            let _ = writeln!(std::io::stdout(), "stopped");
        }
        Command::DevnetLayout {
            dir,
            p2p_addrs,
            http_addr,
            block_interval_ms,
        } => {
            if p2p_addrs.is_empty() {
                return Err(Error::Config("--p2p-addrs names no validator".into()));
            }
            let mut opts = DevnetOptions::new(dir, p2p_addrs.len());
            opts.block_interval_ms = block_interval_ms;
            let addrs: Vec<(String, String)> = p2p_addrs
                .iter()
                .map(|p| (p.clone(), http_addr.clone()))
                .collect();
            let (genesis, configs) = blyan_runtime::devnet::write_layout(&opts, &addrs)?;
            println!("chain {} ({} validators)", genesis.chain_id, configs.len());
            for c in configs {
                println!("{}", c.display());
            }
        }
        Command::Node {
            config,
            check_config: true,
            ..
        } => {
            // Output, not a log: the verdict is the command's answer.
            println!("{}", check_config(&config)?);
        }
        Command::Node {
            config,
            log,
            parent_pid,
            ..
        } => {
            let _telemetry = log.init("blyan-node")?;
            let c = FileConfig::load(&config)?;
            let setup = NodeSetup::from_config(&c)?;
            let node =
                RunningNode::start(setup, bind(&c.p2p_addr).await?, bind(&c.http_addr).await?)
                    .await?;
            println!(
                "node {} api {} p2p {}",
                node.address,
                node.api_url(),
                node.p2p_addr
            );
            // OPS-LOG-2: these lines name the node too.
            let span = telemetry::node_span(&node.address);
            async {
                tokio::select! {
                    why = shutdown_signal() => {
                        let why = why?;
                        tracing::info!(signal = why, wait_ms = STOP_WAIT_MS, "stopping");
                    }
                    _ = async { while node.is_running() { tokio::time::sleep(Duration::from_millis(500)).await } } => {
                        node.stop(1_000).await;
                        return Err(Error::Node("node halted; see the log".into()));
                    }
                    _ = parent_gone(parent_pid) => {
                        tracing::info!(parent = parent_pid, "the devnet that started this node is gone; stopping");
                    }
                }
                // OPS-LIFE-1: the node task stops at its next input (a store
                // write in progress completes: every write is one synced batch).
                node.stop(STOP_WAIT_MS).await;
                tracing::info!("stopped");
                Ok(())
            }
            .instrument(span)
            .await?;
            let _ = writeln!(std::io::stdout(), "stopped");
        }
        Command::BenchOpen {
            dir,
            blocks,
            txs_per_block,
            accounts,
            runs,
            skip_replay,
        } => {
            let _telemetry = init_logging_or(tracing::Level::WARN)?;
            println!(
                "generating {blocks} certified blocks of {txs_per_block} transfer(s) into {} ...",
                dir.display()
            );
            let report = blyan_runtime::bench_open::run(
                &dir,
                blocks,
                txs_per_block,
                accounts,
                runs,
                skip_replay,
            )?;
            print!("{}", blyan_runtime::bench_open::table(&report));
        }
        Command::Chaos {
            dir,
            duration,
            rate,
            block_interval_ms,
            accounts,
            kill_min_s,
            kill_max_s,
            no_flood,
            seed,
        } => {
            let _telemetry = init_logging_or(tracing::Level::WARN)?;
            if kill_min_s == 0 || kill_min_s > kill_max_s {
                return Err(Error::Config(
                    "need 0 < --kill-min-s <= --kill-max-s".into(),
                ));
            }
            let opts = blyan_runtime::chaos::ChaosOptions {
                dir,
                binary: std::env::current_exe().map_err(|e| Error::io("current_exe", e))?,
                duration_s: duration,
                rate,
                block_interval_ms,
                accounts,
                kill_min_s,
                kill_max_s,
                flood: !no_flood,
                seed,
            };
            println!(
                "chaos soak: 4 validators, {rate} tx/s offered for {duration} s, a kill every {kill_min_s}-{kill_max_s} s, floods {}; logs in {}",
                if no_flood { "off" } else { "on" },
                opts.dir.display()
            );
            match blyan_runtime::chaos::run(&opts).await {
                Ok(report) => {
                    print!("{}", report.table());
                    println!("chaos soak passed");
                }
                Err(e) => {
                    eprintln!("chaos soak FAILED: {e}");
                    return Err(e);
                }
            }
        }
        Command::BenchSync {
            dir,
            blocks,
            block_interval_ms,
        } => {
            let _telemetry = init_logging_or(tracing::Level::WARN)?;
            let opts = blyan_runtime::bench_sync::SyncBenchOptions {
                dir,
                binary: std::env::current_exe().map_err(|e| Error::io("current_exe", e))?,
                blocks,
                block_interval_ms,
            };
            let report = blyan_runtime::bench_sync::run(&opts).await?;
            print!("{}", report.table());
        }
        Command::Store {
            command: StoreCommand::Verify { config },
        } => {
            let _telemetry = init_logging_or(tracing::Level::WARN)?;
            let c = FileConfig::load(&config)?;
            let text = std::fs::read_to_string(&c.genesis_file)
                .map_err(|e| Error::io(c.genesis_file.display(), e))?;
            let genesis = blyan_state_machine::genesis::Genesis::from_json(&text)
                .map_err(|e| Error::Genesis(e.to_string()))?;
            let started = std::time::Instant::now();
            let (store, ledger) =
                blyan_runtime::store::ChainStore::open_replaying(&c.data_dir, &genesis)?;
            println!(
                "store {} verified: {} blocks replayed, state root 0x{} ({:.1} s)",
                c.data_dir.display(),
                store.height()?,
                hex::encode(ledger.state_root()),
                started.elapsed().as_secs_f64()
            );
        }
        Command::Keys { command } => match command {
            KeysCommand::New { out, password: p } => {
                let password = password(&p, Prompt::Twice)?;
                let key = generate_key()?;
                let file = write_key_file(&out, &key, &password, DEFAULT_ITERATIONS)?;
                println!("address {}", file.address);
                println!("public key {}", hex::encode(public_key_of(&key)));
                println!("written to {}", out.display());
            }
            KeysCommand::Show { key, password: p } => {
                let text = std::fs::read_to_string(&key)
                    .map_err(|e| Error::Config(format!("{}: {e}", key.display())))?;
                let file = KeyFile::from_json(&text)?;
                println!("address {}", file.address);
                if p.given() {
                    let k = file.decrypt(&password(&p, Prompt::Never)?)?;
                    println!("public key {}", hex::encode(public_key_of(&k)));
                }
            }
            KeysCommand::ApiKey {
                key,
                password: p,
                node,
                allowance,
                cap,
                blocks,
                node_caps,
                index,
            } => {
                let (s, status) = client::get_json(&node, "/status").await?;
                expect_ok(s, &status)?;
                let chain_id = status["chain_id"].as_str().unwrap_or_default().to_string();
                let password = password(&p, Prompt::Once)?;
                let signer = read_key_file(&key, &password)?;
                let id = match (allowance, cap) {
                    (Some(a), _) => parse_hash32(&a)?,
                    (None, Some(cap)) => {
                        let (s, params) = client::get_json(&node, "/params").await?;
                        expect_ok(s, &params)?;
                        let max_blocks = params["max_allowance_blocks"].as_u64().unwrap_or(1);
                        let height = status["height"].as_u64().unwrap_or(0);
                        let mut caps = node_caps
                            .iter()
                            .map(|c| parse_node_cap(c))
                            .collect::<Result<Vec<_>, _>>()?;
                        caps.sort_by_key(|c| c.node);
                        let terms = blyan_state_machine::allowance::AllowanceTerms {
                            cap: parse_bly(&cap)?,
                            node_caps: caps,
                            expires_at: height + blocks.unwrap_or(max_blocks).min(max_blocks),
                        };
                        let args = TxArgs {
                            key: key.clone(),
                            password: PasswordArgs {
                                password: Some(password.to_string()),
                                password_file: None,
                            },
                            node: node.clone(),
                            tip: 1_000_000_000,
                            wait: true,
                        };
                        let id = submit_tx(TxKind::OpenAllowance(Box::new(terms)), args).await?;
                        parse_hash32(&id)?
                    }
                    (None, None) => {
                        return Err(Error::Config("give --allowance or --cap".into()));
                    }
                };
                let api_key =
                    blyan_state_machine::allowance::ApiKey::issue(&chain_id, &signer, id, index);
                println!("allowance 0x{}", hex::encode(id));
                println!("api key: {}", api_key.to_key_string());
            }
            KeysCommand::List { dir } => {
                let entries = std::fs::read_dir(&dir)
                    .map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?;
                let mut found: Vec<(PathBuf, String)> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .filter_map(|p| {
                        let text = std::fs::read_to_string(&p).ok()?;
                        let file = KeyFile::from_json(&text).ok()?;
                        Some((p, file.address.to_string()))
                    })
                    .collect();
                found.sort();
                if found.is_empty() {
                    println!("no key files in {}", dir.display());
                }
                for (p, a) in found {
                    println!("{a}  {}", p.display());
                }
            }
        },
        #[cfg(feature = "inference")]
        Command::Pol { command } => match command {
            PolCommand::Train {
                node,
                key,
                password: pw,
                out,
                layer,
                target,
                lora_rank,
                lora_alpha,
                model_dir,
                steps,
                batch,
                seq_tokens,
                learning_rate,
                density_ppm,
                seed,
                scale,
                device,
            } => {
                let key = read_key_file(&key, &password(&pw, Prompt::Once)?)?;
                let options = blyan_gpu::pol::TrainOptions {
                    steps,
                    batch,
                    seq_tokens,
                    learning_rate,
                    seed,
                    device: blyan_gpu::parse_device(&device)
                        .map_err(|e| Error::Config(e.to_string()))?,
                    lora_rank,
                    lora_alpha,
                    ..Default::default()
                };
                let target = match target {
                    Some(t) => blyan_gpu::pol::Target::parse(&t)
                        .map_err(|e| Error::Config(e.to_string()))?,
                    None => blyan_gpu::pol::Target::Layer(layer),
                };
                let args = blyan_runtime::pol_cli::TrainArgs {
                    node,
                    out,
                    target: Some(target),
                    model_dir,
                    density_ppm,
                    scale,
                    options,
                };
                let summary = blyan_runtime::pol_cli::train(args, &key).await?;
                println!("{summary}");
            }
            PolCommand::Submit {
                node,
                key,
                password: pw,
                delta,
                wait,
            } => {
                let key = read_key_file(&key, &password(&pw, Prompt::Once)?)?;
                let out = blyan_runtime::pol_cli::submit(&node, &key, &delta, wait).await?;
                println!("{out}");
            }
            PolCommand::Status { delta, node } => {
                let v = blyan_runtime::pol_cli::status(&node, &delta).await?;
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
        },
        Command::Tx { command } => match command {
            TxCommand::Transfer { to, amount, args } => {
                let amount = parse_bly(&amount)?;
                submit_tx(TxKind::Transfer { to, amount }, args).await?;
            }
            TxCommand::Bond { amount, args } => {
                let amount = parse_bly(&amount)?;
                submit_tx(TxKind::Bond { amount }, args).await?;
            }
            TxCommand::VrfKey { args } => {
                let kind = |k: &k256::ecdsa::SigningKey| TxKind::SetVrfKey {
                    public_key: blyan_state_machine::consensus::vrf_public_key(k),
                };
                submit_tx_with(kind, args).await?;
            }
            TxCommand::Unbond { amount, args } => {
                let amount = parse_bly(&amount)?;
                submit_tx(TxKind::Unbond { amount }, args).await?;
            }
            TxCommand::CloseAllowance { allowance, args } => {
                let allowance = parse_hash32(&allowance)?;
                submit_tx(TxKind::CloseAllowance { allowance }, args).await?;
            }
        },
        Command::BenchChat {
            clients,
            duration,
            max_tokens,
            block_interval_ms,
            dir,
            inference_nodes,
            stages,
            max_stage_batch,
        } => {
            let report =
                blyan_runtime::bench_chat::run(blyan_runtime::bench_chat::ChatBenchOptions {
                    dir,
                    clients,
                    duration_s: duration,
                    max_tokens,
                    block_interval_ms,
                    inference_nodes,
                    stages,
                    max_stage_batch,
                })
                .await?;
            print!("{report}");
        }
        Command::Bench {
            block_interval_ms,
            rate,
            duration,
            warmup,
            accounts,
            connections,
            generator_threads,
            drain,
            dir,
            timeout_propose_ms,
        } => {
            let _telemetry = init_logging_or(tracing::Level::WARN)?;
            let (parent, temporary) = match dir {
                Some(d) => (d, false),
                None => (
                    std::env::temp_dir().join(format!(
                        "blyan-bench-{}-{}",
                        std::process::id(),
                        blyan_runtime::transport::now_ms()
                    )),
                    true,
                ),
            };
            let runs: Vec<bench::BenchOptions> = rate
                .iter()
                .map(|&r| bench::BenchOptions {
                    block_interval_ms,
                    rate_tx_per_s: r,
                    duration_s: duration,
                    warmup_s: warmup,
                    accounts,
                    connections_per_node: connections,
                    generator_threads,
                    drain_s: drain,
                    dir: parent.join(format!("rate-{r}-block-{block_interval_ms}ms")),
                    timeout_propose_ms,
                })
                .collect();
            for o in &runs {
                o.validate()?;
            }
            println!(
                "blyan bench: 4 validators in this process on loopback, {} cores, {accounts} accounts, \
                 {connections} connections per node, {duration} s of load ({warmup} s warm-up), data in {}",
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                parent.display()
            );
            println!("{}", bench::table_header());
            let mut result = Ok(());
            for o in &runs {
                match bench::run(o).await {
                    Ok(r) => println!("{}", bench::table_row(block_interval_ms, &r)),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            if temporary {
                let _ = std::fs::remove_dir_all(&parent);
            }
            result?;
        }
        Command::Account { address, node } => {
            let (s, v) = client::get_json(&node, &format!("/account/{address}")).await?;
            expect_ok(s, &v)?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Command::Status { node } => {
            let (s, v) = client::get_json(&node, "/status").await?;
            expect_ok(s, &v)?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bly_amounts_parse_exactly_and_garbage_is_refused() {
        assert_eq!(parse_bly("1").unwrap(), BLY);
        assert_eq!(parse_bly("1.5").unwrap(), BLY + BLY / 2);
        assert_eq!(parse_bly("0.000000000000000001").unwrap(), 1);
        assert_eq!(parse_bly(".25").unwrap(), BLY / 4);
        for bad in ["", ".", "1.0000000000000000001", "-1", "1e3", "x", "1.2.3"] {
            assert!(parse_bly(bad).is_err(), "{bad:?} accepted");
        }
    }
}
