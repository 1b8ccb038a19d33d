//! The node's TOML configuration (`blyan node --config FILE`).
//!
//! ```toml
//! chain_id = "blyan-devnet"          # must equal the genesis file's chain id
//! genesis_file = "genesis.json"      # relative paths are relative to this file
//! data_dir = "data"                  # fjall store
//! key_file = "key.json"              # keystore.rs format
//! key_password_env = "BLYAN_KEY_PASSWORD"  # default: the variable that holds the password
//! # key_password_file = "password.txt"  # or the password is this file's first line (KEY-2);
//! #                                      # neither set: a prompt on a terminal, else an error
//! p2p_addr = "0.0.0.0:7100"          # default
//! http_addr = "127.0.0.1:8100"       # default
//! block_interval_ms = 2000           # default (the seed's 2.0 s block time)
//! max_body_bytes = 1048576           # default: 1 MiB request bodies
//! expert_cache_bytes = 268435456     # default: 256 MiB of verified weight chunks in memory
//!
//! [rate_limits]                      # API-RATE-*, per minute; 0 disables a tier
//! public_per_min = 100               # default, per client IP
//! token_per_min = 1000               # default, per token from POST /p2p/register
//! unlimited_tokens = []              # operator-issued tokens with no limit
//! trusted_proxies = []               # API-RATE-6: IPs/CIDRs whose X-Forwarded-For is believed
//!
//! [inference]                        # the local engine behind /chat
//! enabled = true                     # default
//! # model_dir = "models/qwen3"       # default: the embedded model
//! device = "cpu"                     # or "cuda", "cuda:N"
//! dtype = "f32"                      # or "bf16"
//! timeout_ms = 30000                 # seed appendix B inference_timeout
//! queue_len = 16
//! max_tokens_limit = 512
//! advertise = false                  # default: send no heartbeats (RT-HB-11); an inference node: true
//! heartbeat_interval_ms = 5000       # default; a peer drops this node after 3 missed intervals
//! spot_check_rate_ppm = 50000       # default: 5 % of routed answers recomputed elsewhere (RT-STAGE-6)
//! beacon_interval_ms = 60000         # default: about once a minute the router makes up a request and
//!                                    # checks whoever serves it (RT-BEACON-*); 0: never
//! # layers = [0, 1]                 # hold only these layers (inclusive) and serve them to routers
//!                                    # as a pipeline stage (RT-PIPE-2); default: the whole model
//! # experts = [0, 1, 2, 3]         # MoE only: hold these experts of each layer; stages call
//!                                    # the others' holders (RT-PIPE-8); default: every expert
//! max_stage_sessions = 64            # default: pipeline sessions (KV caches) kept for routers at once
//! stage_idle_ms = 60000              # default: a session idle this long is dropped
//! max_stage_batch = 16               # default: decode steps of concurrent sessions run as one
//!                                    # batch (RT-PIPE-9); 1: each alone (bit-identical answers)
//!
//! [api]                              # paid inference (spec/api.md API-KEY-*, API-PAY-*)
//! free_inference = false             # default: /chat and /v1/* need an API key (the devnet: true)
//! settle_interval_blocks = 10        # default: settle served usage at least this often (< allowance_grace_blocks)
//! max_unsettled_requests = 100000    # default: paid requests awaiting settlement before new ones get 503
//!
//! [logs]                             # usage records (usage.rs, API-USAGE-*)
//! # postgres_url = "host=/run/postgresql user=blyan dbname=blyan"  # default: unset, no mirror
//! retention_ms = 2592000000          # default: the seed's 30 days
//!
//! [http]                             # the HTTP API server (API-HTTP-*)
//! header_read_timeout_ms = 10000     # default: a request head within 10 s (also the keep-alive idle limit)
//! request_timeout_ms = 60000         # default: body read and response head within 60 s (> inference.timeout_ms)
//! max_connections = 4096             # default: open connections in all (at most half the fd limit)
//! max_connections_per_ip = 512       # default: open connections per client IP
//! # send_buffer_bytes = 262144       # default: unset, the kernel autotunes SO_SNDBUF
//!
//! [state_sync]                       # SYNC-* (state_sync.rs)
//! snapshot_interval_blocks = 1000    # default: a snapshot at every multiple, served to peers; 0: none
//! # trust_height = 120000            # an empty store starts from a seed's snapshot of this block,
//! # trust_hash = "0x…"               # whose hash the operator read from a source it trusts
//!
//! [[peers]]                          # the seeds: dialled at start and always admitted; the
//!                                    # handshake also admits every validator and every node
//!                                    # registered on chain (TX-9), and dials registered
//!                                    # nodes' endpoints (spec/node.md NODE-ADMIT-*)
//! addr = "127.0.0.1:7101"
//! public_key = "02…"                 # SEC1 compressed, hex
//! ```
//!
//! Environment overrides: `BLYAN_HTTP_ADDR`, `BLYAN_P2P_ADDR`, `BLYAN_DATA_DIR`.
//!
//! The seed's *max block size* (1 MB) is a consensus rule, so it is a chain
//! parameter in the genesis file, not a node setting: `params.max_block_bytes`
//! (BLOCK-8, default 1,048,576 bytes of transactions per block; `GET /params`
//! shows it), beside `params.max_block_txs` and `params.block_gas_limit`.

use crate::Error;
use crate::transport::Peer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_P2P_ADDR: &str = "0.0.0.0:7100";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8100";
pub const DEFAULT_BLOCK_INTERVAL_MS: u64 = 2_000;
/// NODE-TIME-2 in the runtime: +200 µs of `timeout_propose` per pending
/// transaction (a full mempool of 10,000 adds 2 s; the driver's default,
/// kept by the simulator, is 0).
pub const TIMEOUT_PROPOSE_PER_TX_US: u64 = 200;
pub const DEFAULT_PASSWORD_ENV: &str = "BLYAN_KEY_PASSWORD";

/// A peer entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub addr: String,
    pub public_key: String,
}

/// The configuration file. See the module docs for defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub chain_id: String,
    pub genesis_file: PathBuf,
    pub data_dir: PathBuf,
    pub key_file: PathBuf,
    #[serde(default = "default_password_env")]
    pub key_password_env: String,
    /// KEY-2: a file whose first line is the key's password (taken before
    /// the environment variable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_password_file: Option<PathBuf>,
    #[serde(default = "default_p2p")]
    pub p2p_addr: String,
    #[serde(default = "default_http")]
    pub http_addr: String,
    #[serde(default = "default_interval")]
    pub block_interval_ms: u64,
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    /// Seed appendix B `expert_cache_size`: bytes of verified weight and
    /// blob chunks kept in memory in front of the blob store.
    #[serde(default = "default_cache")]
    pub expert_cache_bytes: usize,
    #[serde(default)]
    pub rate_limits: crate::ratelimit::RateLimitConfig,
    #[serde(default)]
    pub inference: crate::inference::InferenceConfig,
    /// The HTTP server's timeouts and connection caps (API-HTTP-*).
    #[serde(default)]
    pub http: crate::http_server::HttpConfig,
    /// Usage records: retention and the PostgreSQL mirror (API-USAGE-*).
    #[serde(default)]
    pub logs: crate::usage::LogsConfig,
    /// Paid inference (API-KEY-*, API-PAY-*).
    #[serde(default)]
    pub api: crate::billing::PaymentConfig,
    /// State sync (SYNC-*): snapshots served, and a trusted block to start
    /// an empty store from.
    #[serde(default)]
    pub state_sync: crate::state_sync::StateSyncConfig,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

fn default_password_env() -> String {
    DEFAULT_PASSWORD_ENV.into()
}
fn default_p2p() -> String {
    DEFAULT_P2P_ADDR.into()
}
fn default_http() -> String {
    DEFAULT_HTTP_ADDR.into()
}
fn default_interval() -> u64 {
    DEFAULT_BLOCK_INTERVAL_MS
}
fn default_cache() -> usize {
    crate::blobs::DEFAULT_CACHE_BYTES
}
fn default_body() -> usize {
    crate::api::MAX_BODY_BYTES
}

impl FileConfig {
    /// Reads `path`, resolves relative paths against its folder and applies
    /// the environment overrides.
    pub fn load(path: &Path) -> Result<FileConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?;
        let mut c = FileConfig::parse(&text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.genesis_file, &mut c.data_dir, &mut c.key_file]
            .into_iter()
            .chain(c.inference.model_dir.as_mut())
            .chain(c.key_password_file.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Ok(v) = std::env::var("BLYAN_HTTP_ADDR") {
            c.http_addr = v;
        }
        if let Ok(v) = std::env::var("BLYAN_P2P_ADDR") {
            c.p2p_addr = v;
        }
        if let Ok(v) = std::env::var("BLYAN_DATA_DIR") {
            c.data_dir = v.into();
        }
        Ok(c)
    }

    pub fn parse(text: &str) -> Result<FileConfig, Error> {
        let c: FileConfig = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        if c.block_interval_ms == 0 {
            return Err(Error::Config("block_interval_ms must be positive".into()));
        }
        if c.max_body_bytes < 1024 {
            return Err(Error::Config("max_body_bytes must be at least 1024".into()));
        }
        if c.rate_limits.max_tracked_keys == 0 {
            return Err(Error::Config(
                "rate_limits.max_tracked_keys must be positive".into(),
            ));
        }
        c.rate_limits
            .validate()
            .map_err(|e| Error::Config(format!("rate_limits.{e}")))?;
        let inf = &c.inference;
        if inf.queue_len == 0 || inf.max_tokens_limit == 0 || inf.timeout_ms == 0 {
            return Err(Error::Config(
                "inference.queue_len, max_tokens_limit and timeout_ms must be positive".into(),
            ));
        }
        c.http.check(inf.enabled.then_some(inf.timeout_ms))?;
        c.logs
            .validate()
            .map_err(|e| Error::Config(format!("logs.{e}")))?;
        c.transport_peers()?;
        Ok(c)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("configuration always serialises")
    }

    /// The peers with parsed keys.
    pub fn transport_peers(&self) -> Result<Vec<Peer>, Error> {
        self.peers
            .iter()
            .map(|p| {
                let mut public_key = [0u8; 33];
                hex::decode_to_slice(p.public_key.trim_start_matches("0x"), &mut public_key)
                    .map_err(|e| Error::Config(format!("peer {}: public_key: {e}", p.addr)))?;
                let peer = Peer {
                    addr: p.addr.clone(),
                    public_key,
                };
                peer.id().ok_or_else(|| {
                    Error::Config(format!(
                        "peer {}: public_key is not a secp256k1 point",
                        p.addr
                    ))
                })?;
                Ok(peer)
            })
            .collect()
    }
}
