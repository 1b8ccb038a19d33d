//! A local devnet: N validators in one process on loopback, each with its
//! own fjall directory, P2P port and HTTP port (`blyan devnet`, and the
//! runtime's integration tests).
//!
//! Layout of the devnet directory:
//! - `genesis.json`: chain `blyan-devnet`, the validators (10,000 BLY stake
//!   and 1,000 BLY each) and a faucet account with [`FAUCET_BLY`];
//! - `faucet.json`: the faucet's key file (password [`DEVNET_PASSWORD`]);
//! - `model/blyan-default/`: the embedded model as content-addressed blocks
//!   (`manifest.json`, one safetensors file per block, `tokenizer.json`),
//!   which the genesis registers as PoL meta and layer blocks, every node
//!   serves `/chat` from, and every node's blob store holds (GEN-MODEL-1);
//! - `node-<i>/key.json`, `node-<i>/config.toml`, `node-<i>/data/`: each
//!   validator's key (same password), a configuration that
//!   `BLYAN_KEY_PASSWORD=devnet blyan node --config node-<i>/config.toml`
//!   also runs, and its store.
//!
//! - `api-key.txt`: an API key of an allowance the faucet funds at the
//!   first start ([`DEVNET_ALLOWANCE_BLY`]); `blyan devnet` prints it as
//!   `api key: <key>` (spec/api.md API-KEY-*).
//!
//! The devnet serves inference without a key too (`[api] free_inference`),
//! settles paid usage every [`DEVNET_SETTLE_INTERVAL_BLOCKS`] blocks and
//! pays rewards every [`DEVNET_REWARD_EPOCH_BLOCKS`] blocks, so payouts
//! show within a minute or two.
//!
//! An existing directory is reused (same genesis and keys; the nodes replay
//! their stores), so a devnet survives a restart.
//!
//! **Not for real funds**: the password is public and the key files use the
//! keystore's minimum iteration count so start-up is fast.

use crate::Error;
use crate::config::{FileConfig, PeerConfig};
use crate::keystore::{MIN_ITERATIONS, generate_key, read_key_file, write_key_file};
use crate::node::{NodeSetup, RunningNode, bind};
use crate::transport::{Peer, now_ms};
use blyan_state_machine::genesis::{Genesis, GenesisBalance, GenesisValidator};
use blyan_state_machine::node::NodeConfig;
use blyan_state_machine::params::Params;
use blyan_state_machine::tx::public_key_of;
use blyan_state_machine::types::{Address, BLY};
use k256::ecdsa::SigningKey;
use std::path::{Path, PathBuf};

pub const DEVNET_CHAIN_ID: &str = "blyan-devnet";
/// The password of every devnet key file.
pub const DEVNET_PASSWORD: &str = "devnet";
/// The faucet's genesis balance, in BLY.
pub const FAUCET_BLY: u128 = 1_000_000_000;
/// Default first port: node `i` listens for peers on `base + 2i` and HTTP on `base + 2i + 1`.
pub const DEFAULT_BASE_PORT: u16 = 7100;
/// The cap of the allowance behind the devnet's API key, in BLY.
pub const DEVNET_ALLOWANCE_BLY: u128 = 1_000;
/// The devnet's reward epoch (RWD-5), in blocks: a minute of 2 s blocks.
pub const DEVNET_REWARD_EPOCH_BLOCKS: u64 = 30;
/// The devnet's attestation commit and reveal windows (POL-30/32), each.
pub const DEVNET_ATTEST_WINDOW_BLOCKS: u64 = 6;
/// How often devnet nodes settle paid usage (API-PAY-3), in blocks.
pub const DEVNET_SETTLE_INTERVAL_BLOCKS: u64 = 5;
/// RT-PIPE-5: the layers devnet inference node `j` of `n` holds, for a
/// model of `layers` layers split into `stages` contiguous ranges (0: two
/// when `n` ≥ 4, else one). One range means the whole model (`None`).
/// Otherwise node `j` holds range `j mod stages` (ranges as even as
/// possible, the first ones one layer longer), so with `n` ≥ 2 × `stages`
/// every range has at least two holders and no node holds every layer.
/// With fewer than four inference nodes the default keeps the whole model
/// on each: a split would leave some range with a single holder and
/// nothing to fail over to.
pub fn inference_layers(j: usize, n: usize, layers: u32, stages: usize) -> Option<[u32; 2]> {
    let stages = match stages {
        0 if n >= 4 => 2,
        0 => 1,
        k => k,
    };
    let stages = u32::try_from(stages).unwrap_or(u32::MAX).min(layers);
    if stages <= 1 {
        return None;
    }
    let r = u32::try_from(j % stages as usize).expect("below stages");
    let (base, extra) = (layers / stages, layers % stages);
    let first = r * base + r.min(extra);
    let len = base + u32::from(r < extra);
    Some([first, first + len - 1])
}

/// The number of layers the chain registers for the devnet's model (its
/// layer blocks in genesis).
pub fn registered_layers(genesis: &blyan_state_machine::genesis::Genesis) -> u32 {
    genesis
        .pol_blocks
        .iter()
        .filter_map(|b| b.layer)
        .max()
        .map_or(0, |l| l + 1)
}

/// The devnet's inference nodes heartbeat every second (RT-HB-11), so a
/// stopped one leaves the validators' routes within 3 s.
pub const DEVNET_HEARTBEAT_INTERVAL_MS: u64 = 1_000;

/// The devnet's nodes take a state snapshot every 100 blocks (SYNC-*).
pub const DEVNET_SNAPSHOT_INTERVAL_BLOCKS: u64 = 100;

/// How to start a devnet.
#[derive(Clone, Debug)]
pub struct DevnetOptions {
    pub dir: PathBuf,
    pub validators: usize,
    /// `None`: ephemeral ports (tests).
    pub base_port: Option<u16>,
    pub block_interval_ms: u64,
    /// Driver parameters besides the block interval (defaults otherwise).
    pub node: NodeConfig,
    /// Further accounts funded at genesis (`blyan bench`'s load accounts).
    /// Only used when the genesis is created; an existing devnet must
    /// already fund them, or start-up is refused.
    pub extra_balances: Vec<GenesisBalance>,
    /// Every node's API rate limits (default: the seed's).
    pub rate_limits: crate::ratelimit::RateLimitConfig,
    /// Every node's inference engine (default: the embedded model on the CPU).
    pub inference: crate::inference::InferenceConfig,
    /// Every node's HTTP server limits (API-HTTP-*; default: the node's).
    pub http: crate::http_server::HttpConfig,
    /// Paid inference (default: free use allowed, settlement every
    /// [`DEVNET_SETTLE_INTERVAL_BLOCKS`]).
    pub payments: crate::billing::PaymentConfig,
    /// The staking epoch of a new devnet's genesis (STAKE-5: bonding takes
    /// effect at its boundary); `None`: the chain default (100 blocks).
    /// Ignored when the directory already holds a devnet.
    pub epoch_length_blocks: Option<u64>,
    /// Inference nodes started besides the validators (RT-STAGE-*): each
    /// registered on chain (TX-9) by the devnet, advertising the whole
    /// model, so the validators route chat requests to them.
    pub inference_nodes: usize,
    /// RT-PIPE-5: ranges the layers are split into over the inference
    /// nodes ([`inference_layers`]); 0: two with four or more nodes.
    pub stages: usize,
    /// RT-PIPE-8: a new devnet's genesis registers the embedded Qwen3-MoE
    /// model (8 experts per layer, top 2) instead of the default dense
    /// one; inference nodes then hold half the experts of their layers
    /// ([`inference_experts`]). Ignored for an existing devnet.
    pub moe: bool,
    /// Fault injection for tests (POL-36): validator `.0` reveals losses
    /// `.1` ppm above what it measured.
    #[doc(hidden)]
    pub misreport_loss: Option<(usize, u64)>,
    /// Every node's state sync: snapshots every
    /// [`DEVNET_SNAPSHOT_INTERVAL_BLOCKS`] by default.
    pub state_sync: crate::state_sync::StateSyncConfig,
}

impl DevnetOptions {
    pub fn new(dir: PathBuf, validators: usize) -> DevnetOptions {
        DevnetOptions {
            dir,
            validators,
            base_port: Some(DEFAULT_BASE_PORT),
            block_interval_ms: crate::config::DEFAULT_BLOCK_INTERVAL_MS,
            node: NodeConfig {
                timeout_propose_per_tx_us: crate::config::TIMEOUT_PROPOSE_PER_TX_US,
                ..NodeConfig::default()
            },
            extra_balances: Vec::new(),
            rate_limits: crate::ratelimit::RateLimitConfig::default(),
            inference: crate::inference::InferenceConfig::default(),
            http: crate::http_server::HttpConfig::default(),
            payments: crate::billing::PaymentConfig {
                free_inference: true,
                settle_interval_blocks: DEVNET_SETTLE_INTERVAL_BLOCKS,
                ..crate::billing::PaymentConfig::default()
            },
            inference_nodes: 0,
            stages: 0,
            moe: false,
            misreport_loss: None,
            epoch_length_blocks: None,
            state_sync: crate::state_sync::StateSyncConfig {
                snapshot_interval_blocks: DEVNET_SNAPSHOT_INTERVAL_BLOCKS,
                ..Default::default()
            },
        }
    }
}

/// A running devnet.
pub struct Devnet {
    pub dir: PathBuf,
    pub genesis: Genesis,
    pub nodes: Vec<RunningNode>,
    pub faucet: Address,
    pub faucet_key_file: PathBuf,
    /// Every validator's P2P address and key: the seeds a further node
    /// configures (NODE-ADMIT-3).
    pub peers: Vec<Peer>,
    /// The inference nodes ([`DevnetOptions::inference_nodes`]), after the
    /// validators in the devnet's numbering.
    pub inference: Vec<RunningNode>,
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|e| Error::io(path.display(), e))
}

fn node_dir(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("node-{i}"))
}

/// Inference node `j`'s directory (`inference-<j>`) and key (`key.json`,
/// made once and reused), for both devnet modes.
pub(crate) fn inference_node_dir(dir: &Path, j: usize) -> Result<(PathBuf, SigningKey), Error> {
    let nd = dir.join(format!("inference-{j}"));
    std::fs::create_dir_all(&nd).map_err(|e| Error::io(nd.display(), e))?;
    let key_path = nd.join("key.json");
    let key = if key_path.is_file() {
        read_key_file(&key_path, DEVNET_PASSWORD)?
    } else {
        let k = generate_key()?;
        write_key_file(&key_path, &k, DEVNET_PASSWORD, MIN_ITERATIONS)?;
        k
    };
    Ok((nd, key))
}

/// Creates the genesis and key files, or reads them back from an existing directory.
fn prepare(
    dir: &Path,
    validators: usize,
    extra_balances: &[GenesisBalance],
    epoch_length_blocks: Option<u64>,
    moe: bool,
) -> Result<(Genesis, Vec<SigningKey>), Error> {
    let genesis_path = dir.join("genesis.json");
    if genesis_path.exists() {
        let text = std::fs::read_to_string(&genesis_path)
            .map_err(|e| Error::io(genesis_path.display(), e))?;
        let genesis = Genesis::from_json(&text).map_err(|e| Error::Genesis(e.to_string()))?;
        if genesis.validators.len() != validators {
            return Err(Error::Config(format!(
                "{} holds a devnet of {} validators, not {validators}",
                dir.display(),
                genesis.validators.len()
            )));
        }
        if let Some(missing) = extra_balances
            .iter()
            .find(|b| !genesis.balances.contains(b))
        {
            return Err(Error::Config(format!(
                "{} holds a devnet whose genesis does not fund {} with {} base units; use a fresh directory",
                dir.display(),
                missing.address,
                missing.amount
            )));
        }
        let keys = (0..validators)
            .map(|i| read_key_file(&node_dir(dir, i).join("key.json"), DEVNET_PASSWORD))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((genesis, keys));
    }
    if validators == 0 {
        return Err(Error::Config(
            "a devnet needs at least one validator".into(),
        ));
    }
    let faucet = generate_key()?;
    write_key_file(
        &dir.join("faucet.json"),
        &faucet,
        DEVNET_PASSWORD,
        MIN_ITERATIONS,
    )?;
    let mut keys = Vec::new();
    for i in 0..validators {
        let nd = node_dir(dir, i);
        std::fs::create_dir_all(&nd).map_err(|e| Error::io(nd.display(), e))?;
        let key = generate_key()?;
        write_key_file(&nd.join("key.json"), &key, DEVNET_PASSWORD, MIN_ITERATIONS)?;
        keys.push(key);
    }
    let address = |k: &SigningKey| Address::from_public_key(k.verifying_key());
    let genesis = Genesis {
        chain_id: DEVNET_CHAIN_ID.into(),
        genesis_time_ms: now_ms(),
        balances: std::iter::once(GenesisBalance {
            address: address(&faucet),
            amount: FAUCET_BLY * BLY,
        })
        .chain(keys.iter().map(|k| GenesisBalance {
            address: address(k),
            amount: 1_000 * BLY,
        }))
        .chain(extra_balances.iter().cloned())
        .collect(),
        validators: keys
            .iter()
            .map(|k| GenesisValidator {
                public_key: public_key_of(k),
                stake: 10_000 * BLY,
                vrf_public_key: Some(blyan_state_machine::consensus::vrf_public_key(k)),
            })
            .collect(),
        params: {
            let mut p = Params::default();
            p.rewards.epoch_length_blocks = DEVNET_REWARD_EPOCH_BLOCKS;
            // POL-30/32: short attestation windows, so a delta is decided
            // within a minute (the chain default is 150 + 150 blocks).
            p.pol.attest_commit_window_blocks = DEVNET_ATTEST_WINDOW_BLOCKS;
            p.pol.attest_reveal_window_blocks = DEVNET_ATTEST_WINDOW_BLOCKS;
            if let Some(e) = epoch_length_blocks {
                p.epoch_length_blocks = e;
            }
            p
        },
        pol_blocks: model_pol_blocks(dir, address(&faucet), moe)?,
    };
    genesis
        .validate()
        .map_err(|e| Error::Genesis(e.to_string()))?;
    write(&genesis_path, &genesis.to_json())?;
    Ok((genesis, keys))
}

/// Where a devnet keeps the embedded model as blocks (GEN-MODEL-1): the
/// Qwen3-MoE model's directory if the devnet was made with it
/// ([`DevnetOptions::moe`]), else the default model's.
pub fn model_dir(dir: &Path) -> PathBuf {
    let moe = dir.join("model").join(MOE_MODEL_DIR);
    if moe.join("manifest.json").is_file() {
        return moe;
    }
    dir.join("model").join("blyan-default")
}

/// The directory name of the embedded Qwen3-MoE model's blocks.
pub const MOE_MODEL_DIR: &str = "blyan-moe";

/// RT-PIPE-8: the experts per MoE layer of the devnet's model (0: dense),
/// from its manifest's config.
pub fn model_experts(dir: &Path) -> usize {
    std::fs::read(model_dir(dir).join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["config"]["num_experts"].as_u64())
        .map_or(0, |n| n as usize)
}

/// RT-PIPE-8: the experts devnet inference node `j` of `n` holds of an
/// MoE model with `experts` per layer, its layers split into `stages`
/// ranges as [`inference_layers`] does: `None` (all) for a dense model or
/// a single node. Otherwise the holders of each range alternate between
/// the lower and the upper half of the experts, so every stage computes
/// half its experts and asks a node holding the same layers for the rest.
pub fn inference_experts(j: usize, n: usize, stages: usize, experts: usize) -> Option<Vec<u16>> {
    if experts < 2 || n < 2 {
        return None;
    }
    let stages = match stages {
        0 if n >= 4 => 2,
        0 => 1,
        k => k,
    };
    let half = experts / 2;
    let range = if (j / stages).is_multiple_of(2) {
        0..half
    } else {
        half..experts
    };
    Some(
        range
            .map(|e| u16::try_from(e).unwrap_or(u16::MAX))
            .collect(),
    )
}

/// GEN-MODEL-1: writes the embedded model's blocks under `dir/model` and
/// returns the genesis PoL blocks registering them (submitted by the faucet).
#[cfg(feature = "inference")]
fn model_pol_blocks(
    dir: &Path,
    submitter: Address,
    moe: bool,
) -> Result<Vec<blyan_state_machine::pol::PolBlock>, Error> {
    let blocks = crate::model::write_embedded_blocks(&dir.join("model"), moe)?;
    let target = dir
        .join("model")
        .join(if moe { MOE_MODEL_DIR } else { "blyan-default" });
    if blocks != target {
        std::fs::rename(&blocks, &target).map_err(|e| Error::io(target.display(), e))?;
    }
    let registered = crate::model::blocks_of_dir(&target, submitter)?.registered;
    let model_id = registered[0].block.id();
    Ok(registered
        .into_iter()
        .chain(crate::model::corpus_blocks(model_id, submitter))
        .map(|m| m.block)
        .collect())
}

/// Without the inference engine the devnet registers no model.
#[cfg(not(feature = "inference"))]
fn model_pol_blocks(
    _dir: &Path,
    _submitter: Address,
    _moe: bool,
) -> Result<Vec<blyan_state_machine::pol::PolBlock>, Error> {
    Ok(Vec::new())
}

/// GEN-MODEL-1/3: every payload of the model's block directory (registered
/// blocks and those only the manifest commits to) and of the corpus, for
/// the blob stores.
pub(crate) fn model_payloads(dir: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let target = model_dir(dir);
    if !target.join("manifest.json").is_file() {
        return Ok(Vec::new());
    }
    let blocks = crate::model::blocks_of_dir(&target, Address::ZERO)?;
    let model_id = blocks.registered[0].block.id();
    Ok(blocks
        .registered
        .into_iter()
        .chain(crate::model::corpus_blocks(model_id, Address::ZERO))
        .map(|m| m.payload)
        .chain(blocks.others.into_iter().map(|(_, p)| p))
        .collect())
}

/// Node `i`'s configuration file (paths relative to `node-<i>/`).
fn file_config(
    genesis: &Genesis,
    peers: &[Peer],
    i: usize,
    http_addr: &str,
    opts: &DevnetOptions,
) -> FileConfig {
    FileConfig {
        chain_id: genesis.chain_id.clone(),
        genesis_file: "../genesis.json".into(),
        data_dir: "data".into(),
        key_file: "key.json".into(),
        key_password_env: crate::config::DEFAULT_PASSWORD_ENV.into(),
        key_password_file: None,
        p2p_addr: peers[i].addr.clone(),
        http_addr: http_addr.to_string(),
        block_interval_ms: opts.block_interval_ms,
        max_body_bytes: crate::api::MAX_BODY_BYTES,
        expert_cache_bytes: crate::blobs::DEFAULT_CACHE_BYTES,
        rate_limits: opts.rate_limits.clone(),
        inference: opts.inference.clone(),
        http: opts.http.clone(),
        logs: crate::usage::LogsConfig::default(),
        api: opts.payments.clone(),
        state_sync: opts.state_sync.clone(),
        peers: peers
            .iter()
            .map(|p| PeerConfig {
                addr: p.addr.clone(),
                public_key: hex::encode(p.public_key),
            })
            .collect(),
    }
}

/// Writes (or reuses) a devnet directory and each node's `config.toml` for
/// the given `(p2p, http)` addresses, starting nothing: for running the
/// validators as separate processes (`BLYAN_KEY_PASSWORD=devnet blyan node
/// --config DIR/node-<i>/config.toml`). Returns the genesis and the
/// configuration files, node by node.
pub fn write_layout(
    opts: &DevnetOptions,
    addrs: &[(String, String)],
) -> Result<(Genesis, Vec<PathBuf>), Error> {
    if addrs.len() != opts.validators {
        return Err(Error::Config(format!(
            "{} address pairs for {} validators",
            addrs.len(),
            opts.validators
        )));
    }
    std::fs::create_dir_all(&opts.dir).map_err(|e| Error::io(opts.dir.display(), e))?;
    let (genesis, keys) = prepare(
        &opts.dir,
        opts.validators,
        &opts.extra_balances,
        opts.epoch_length_blocks,
        opts.moe,
    )?;
    let peers: Vec<Peer> = keys
        .iter()
        .zip(addrs)
        .map(|(k, (p2p, _))| Peer {
            addr: p2p.clone(),
            public_key: public_key_of(k),
        })
        .collect();
    let mut paths = Vec::new();
    for (i, (_, http)) in addrs.iter().enumerate() {
        let path = node_dir(&opts.dir, i).join("config.toml");
        let mut opts = opts.clone();
        if opts.inference.model_dir.is_none()
            && model_dir(&opts.dir).join("manifest.json").is_file()
        {
            opts.inference.model_dir = Some(
                model_dir(&opts.dir)
                    .canonicalize()
                    .map_err(|e| Error::io("model dir", e))?,
            );
        }
        let config = file_config(&genesis, &peers, i, http, &opts);
        write(&path, &config.to_toml())?;
        paths.push(path);
    }
    Ok((genesis, paths))
}

impl Devnet {
    pub async fn start(opts: DevnetOptions) -> Result<Devnet, Error> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| Error::io(opts.dir.display(), e))?;
        let dir = opts
            .dir
            .canonicalize()
            .map_err(|e| Error::io(opts.dir.display(), e))?;
        let (genesis, keys) = prepare(
            &dir,
            opts.validators,
            &opts.extra_balances,
            opts.epoch_length_blocks,
            opts.moe,
        )?;
        let faucet_key_file = dir.join("faucet.json");
        let faucet = crate::keystore::KeyFile::from_json(
            &std::fs::read_to_string(&faucet_key_file)
                .map_err(|e| Error::io(faucet_key_file.display(), e))?,
        )?
        .address;
        // Bind every listener first, so each node's peer list has real ports.
        let mut listeners = Vec::new();
        for i in 0..keys.len() {
            let (p2p, http) = match opts.base_port {
                Some(p) => {
                    let p2p = p as usize + 2 * i;
                    (format!("127.0.0.1:{p2p}"), format!("127.0.0.1:{}", p2p + 1))
                }
                None => ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()),
            };
            listeners.push((bind(&p2p).await?, bind(&http).await?));
        }
        let mut peers = Vec::new();
        for (key, (p2p, _)) in keys.iter().zip(&listeners) {
            let addr = p2p.local_addr().map_err(|e| Error::io("p2p listener", e))?;
            peers.push(Peer {
                addr: addr.to_string(),
                public_key: public_key_of(key),
            });
        }
        // The nodes serve the model the genesis registers (GEN-MODEL-1/2).
        let mut opts = opts;
        if opts.inference.model_dir.is_none() && model_dir(&dir).join("manifest.json").is_file() {
            opts.inference.model_dir = Some(model_dir(&dir));
        }
        let payloads = model_payloads(&dir)?;
        let mut nodes = Vec::new();
        for (i, (key, (p2p, http))) in keys.into_iter().zip(listeners).enumerate() {
            let nd = node_dir(&dir, i);
            let http_addr = http
                .local_addr()
                .map_err(|e| Error::io("http listener", e))?;
            let config = file_config(&genesis, &peers, i, &http_addr.to_string(), &opts);
            write(&nd.join("config.toml"), &config.to_toml())?;
            let setup = NodeSetup {
                genesis: genesis.clone(),
                key,
                data_dir: nd.join("data"),
                node: NodeConfig {
                    block_interval_ms: opts.block_interval_ms,
                    ..opts.node.clone()
                },
                peers: peers.clone(),
                max_body_bytes: crate::api::MAX_BODY_BYTES,
                expert_cache_bytes: crate::blobs::DEFAULT_CACHE_BYTES,
                rate_limits: opts.rate_limits.clone(),
                inference: crate::inference::InferenceConfig {
                    misreport_loss_ppm: match opts.misreport_loss {
                        Some((j, ppm)) if j == i => ppm,
                        _ => 0,
                    },
                    ..opts.inference.clone()
                },
                http: opts.http.clone(),
                logs: crate::usage::LogsConfig::default(),
                payments: opts.payments.clone(),
                state_sync: opts.state_sync.clone(),
            };
            let node = RunningNode::start(setup, p2p, http).await?;
            for p in &payloads {
                node.blobs.put(p)?;
            }
            nodes.push(node);
        }
        let mut net = Devnet {
            dir,
            genesis,
            nodes,
            faucet,
            faucet_key_file,
            peers,
            inference: Vec::new(),
        };
        net.start_inference_nodes(&opts).await?;
        Ok(net)
    }

    /// Starts `opts.inference_nodes` inference nodes: keys in
    /// `inference-<j>/key.json` (made once, reused), P2P and HTTP ports after
    /// the validators', the validators as seeds, the devnet's model with
    /// `advertise` on (1 s heartbeats); each is funded by the faucet and
    /// registered on chain (TX-9) through node 0 unless it already is, so
    /// every validator admits and dials it (NODE-ADMIT-1/3).
    async fn start_inference_nodes(&mut self, opts: &DevnetOptions) -> Result<(), Error> {
        use blyan_state_machine::tx::{NodeInfo, TxKind};
        let mut started = Vec::new();
        for j in 0..opts.inference_nodes {
            let (nd, key) = inference_node_dir(&self.dir, j)?;
            let i = opts.validators + j;
            let (p2p, http) = match opts.base_port {
                Some(p) => {
                    let p2p = p as usize + 2 * i;
                    (format!("127.0.0.1:{p2p}"), format!("127.0.0.1:{}", p2p + 1))
                }
                None => ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()),
            };
            let (p2p, http) = (bind(&p2p).await?, bind(&http).await?);
            let endpoint = p2p
                .local_addr()
                .map_err(|e| Error::io("p2p listener", e))?
                .to_string();
            started.push((key, nd, endpoint, p2p, http));
        }
        if started.is_empty() {
            return Ok(());
        }
        // Fund, then register, those not registered with this endpoint.
        let node0 = &self.nodes[0];
        let ledger = crate::api::snapshot(&node0.handle).ledger.clone();
        let todo: Vec<usize> = (0..started.len())
            .filter(|&j| {
                let (key, _, endpoint, _, _) = &started[j];
                ledger
                    .node(&Address::from_public_key(key.verifying_key()))
                    .is_none_or(|r| &r.info.endpoint != endpoint)
            })
            .collect();
        let faucet = read_key_file(&self.faucet_key_file, DEVNET_PASSWORD)?;
        let first_nonce = ledger.account(&self.faucet).nonce;
        let fundings = (first_nonce..)
            .zip(&todo)
            .map(|(nonce, &j)| {
                let to = Address::from_public_key(started[j].0.verifying_key());
                let kind = TxKind::Transfer {
                    to,
                    amount: 1_000 * BLY,
                };
                self.sign(&faucet, nonce, kind, &ledger)
            })
            .collect();
        self.commit_all(fundings, "funding the inference nodes")
            .await?;
        let ledger = crate::api::snapshot(&self.nodes[0].handle).ledger.clone();
        let mut registrations = Vec::new();
        for &j in &todo {
            let (key, _, endpoint, _, _) = &started[j];
            let me = Address::from_public_key(key.verifying_key());
            let mut own_nonce = ledger.account(&me).nonce;
            if ledger.node(&me).is_some() {
                // Registered at another endpoint (ephemeral ports): leave and
                // register again.
                registrations.push(self.sign(key, own_nonce, TxKind::DeregisterNode, &ledger));
                own_nonce += 1;
            }
            let kind = TxKind::RegisterNode {
                info: Box::new(NodeInfo {
                    endpoint: endpoint.clone(),
                    blocks: Vec::new(),
                }),
                bond: self.genesis.params.node_min_bond,
            };
            registrations.push(self.sign(key, own_nonce, kind, &ledger));
        }
        self.commit_all(registrations, "registering the inference nodes")
            .await?;
        for (key, nd, _, p2p, http) in started {
            let setup = NodeSetup {
                genesis: self.genesis.clone(),
                key,
                data_dir: nd.join("data"),
                node: NodeConfig {
                    block_interval_ms: opts.block_interval_ms,
                    ..opts.node.clone()
                },
                peers: self.peers.clone(),
                max_body_bytes: crate::api::MAX_BODY_BYTES,
                expert_cache_bytes: crate::blobs::DEFAULT_CACHE_BYTES,
                rate_limits: opts.rate_limits.clone(),
                inference: crate::inference::InferenceConfig {
                    enabled: true,
                    model_dir: Some(model_dir(&self.dir)),
                    advertise: true,
                    heartbeat_interval_ms: DEVNET_HEARTBEAT_INTERVAL_MS,
                    layers: inference_layers(
                        self.inference.len(),
                        opts.inference_nodes,
                        registered_layers(&self.genesis),
                        opts.stages,
                    ),
                    experts: inference_experts(
                        self.inference.len(),
                        opts.inference_nodes,
                        opts.stages,
                        model_experts(&self.dir),
                    ),
                    ..opts.inference.clone()
                },
                http: opts.http.clone(),
                logs: crate::usage::LogsConfig::default(),
                payments: opts.payments.clone(),
                state_sync: opts.state_sync.clone(),
            };
            self.inference
                .push(RunningNode::start(setup, p2p, http).await?);
        }
        Ok(())
    }

    /// A transaction of `key` paying twice the next base fee.
    fn sign(
        &self,
        key: &SigningKey,
        nonce: u64,
        kind: blyan_state_machine::tx::TxKind,
        ledger: &blyan_state_machine::ledger::Ledger,
    ) -> blyan_state_machine::tx::SignedTx {
        blyan_state_machine::tx::TxBody {
            nonce,
            gas_limit: blyan_state_machine::ledger::intrinsic_gas(&kind),
            max_fee_per_gas: ledger.next_block_base_fee().saturating_mul(2) + 1,
            max_priority_fee_per_gas: 1,
            kind,
        }
        .sign(&self.genesis.chain_id, key)
    }

    /// Submits `txs` through node 0 and waits (at most 120 s) until every
    /// one has committed successfully.
    async fn commit_all(
        &self,
        txs: Vec<blyan_state_machine::tx::SignedTx>,
        what: &str,
    ) -> Result<(), Error> {
        let node = &self.nodes[0];
        let mut ids = Vec::new();
        for tx in txs {
            let id = crate::api::submit(&node.handle, tx)
                .await
                .map_err(|e| Error::Node(format!("{what}: {}", e.message)))?;
            ids.push(id);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        for id in ids {
            loop {
                if let Some(loc) = node.handle.reader.tx(&id)? {
                    if let Some(why) = loc.receipt.failure {
                        return Err(Error::Node(format!("{what}: {why}")));
                    }
                    break;
                }
                if std::time::Instant::now() > deadline {
                    return Err(Error::Node(format!("{what}: not committed in 120 s")));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        // The node's published state holds the last of them.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        Ok(())
    }

    /// The devnet's API key (API-KEY-1): read back from `api-key.txt` if its
    /// allowance is still usable, else the faucet opens a new allowance of
    /// [`DEVNET_ALLOWANCE_BLY`] (TX-13, lasting `max_allowance_blocks`) through
    /// node 0, waits for it to commit, and signs key 0 for it.
    pub async fn api_key(&self) -> Result<String, Error> {
        use blyan_state_machine::allowance::{AllowanceTerms, ApiKey, authorize};
        use blyan_state_machine::tx::TxKind;
        let node = &self.nodes[0];
        let path = self.dir.join("api-key.txt");
        let usable = |key: &str| {
            let snap = crate::api::snapshot(&node.handle);
            ApiKey::parse(key).is_ok_and(|k| {
                authorize(
                    &self.genesis.chain_id,
                    &k,
                    snap.ledger.allowance(&k.grant.allowance),
                    &node.address,
                    snap.ledger.height(),
                )
                .is_ok()
            })
        };
        if let Ok(text) = std::fs::read_to_string(&path) {
            let key = text.trim().to_string();
            // A restarted devnet replays its blocks first.
            for _ in 0..100 {
                if usable(&key) {
                    return Ok(key);
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        let faucet = read_key_file(&self.faucet_key_file, DEVNET_PASSWORD)?;
        let snap = crate::api::snapshot(&node.handle);
        let kind = TxKind::OpenAllowance(Box::new(AllowanceTerms {
            cap: DEVNET_ALLOWANCE_BLY * BLY,
            node_caps: Vec::new(),
            expires_at: snap.ledger.height() + self.genesis.params.max_allowance_blocks,
        }));
        let tx = self.sign(
            &faucet,
            snap.ledger.account(&self.faucet).nonce,
            kind,
            &snap.ledger,
        );
        let id = tx.id();
        self.commit_all(vec![tx], "opening the devnet's allowance")
            .await?;
        let key = ApiKey::issue(&self.genesis.chain_id, &faucet, id, 0).to_key_string();
        write(&path, &format!("{key}\n"))?;
        // The key is usable once node 0's snapshot holds the allowance.
        for _ in 0..100 {
            if usable(&key) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(key)
    }

    /// Stops every node.
    pub async fn stop(self) {
        for n in self.inference {
            n.stop(5_000).await;
        }
        for n in self.nodes {
            n.stop(5_000).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::inference_layers;

    /// RT-PIPE-5: the default split, explicit splits, and whole models.
    #[test]
    fn rt_pipe_5_devnet_layer_split() {
        let all = |n: usize, layers: u32, k: usize| -> Vec<Option<[u32; 2]>> {
            (0..n).map(|j| inference_layers(j, n, layers, k)).collect()
        };
        // Fewer than four nodes: the whole model each.
        assert_eq!(all(3, 4, 0), vec![None; 3]);
        // Four nodes, four layers: 0–1 and 2–3, twice each.
        let h = [Some([0, 1]), Some([2, 3])];
        assert_eq!(all(4, 4, 0), vec![h[0], h[1], h[0], h[1]]);
        // Four ranges of one layer over eight nodes.
        let four = all(8, 4, 4);
        assert_eq!(
            four[..4],
            [Some([0, 0]), Some([1, 1]), Some([2, 2]), Some([3, 3])]
        );
        assert_eq!(four[4..], four[..4]);
        // Uneven: 5 layers in 2 ranges, the first one longer.
        assert_eq!(all(2, 5, 2), vec![Some([0, 2]), Some([3, 4])]);
        // One range, or more ranges than layers.
        assert_eq!(all(4, 4, 1), vec![None; 4]);
        assert_eq!(all(2, 2, 5), vec![Some([0, 0]), Some([1, 1])]);
        // Every node's range is within the model and the ranges tile it.
        for layers in 1..9u32 {
            for k in 1..6usize {
                let ranges: Vec<_> = (0..k.min(layers as usize))
                    .filter_map(|j| inference_layers(j, 2 * k, layers, k))
                    .collect();
                if ranges.is_empty() {
                    continue;
                }
                assert_eq!(ranges[0][0], 0);
                assert_eq!(ranges.last().unwrap()[1], layers - 1);
                for w in ranges.windows(2) {
                    assert_eq!(w[0][1] + 1, w[1][0], "{layers} layers, {k} stages");
                }
            }
        }
    }
}
