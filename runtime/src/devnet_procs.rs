//! `blyan devnet --processes`: every node, validator or inference, is its own
//! OS process (`blyan node --config DIR/<node>/config.toml`), a child of the
//! devnet in its process group, so Ctrl-C in the terminal stops them all and
//! each exits by itself when the devnet process goes away (`--parent-pid`).
//! Killing one node's process leaves the rest running: the devnet reports
//! the exit and neither restarts it nor stops (so failover can be tried by
//! hand). Output contract (shared with the in-process devnet): one line per
//! node, `node <i>: validator|inference  address 0x…  api http://…  p2p …
//! pid <n>`, printed once every node's API answers, validators first.
//!
//! The layout is [`write_layout`]'s (the same files a person uses to run the
//! validators by hand); inference nodes get `inference-<j>/config.toml`,
//! are funded and registered on chain (TX-9) through node 0's HTTP API, and
//! are then started.

use crate::chaos::Nodes;
use crate::client;
use crate::config::{FileConfig, PeerConfig};
use crate::devnet::{
    DEVNET_ALLOWANCE_BLY, DEVNET_HEARTBEAT_INTERVAL_MS, DEVNET_PASSWORD, DevnetOptions, model_dir,
    write_layout,
};
use crate::error::Error;
use crate::keystore::read_key_file;
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::tx::{NodeInfo, TxKind};
use blyan_state_machine::types::{Address, BLY};
use k256::ecdsa::SigningKey;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the devnet waits for a node's API to answer after its start.
const START_TIMEOUT_S: u64 = 120;

/// One node of a multi-process devnet.
#[derive(Clone, Debug)]
pub struct ProcNode {
    pub role: &'static str,
    pub address: Address,
    pub api_url: String,
    pub p2p_addr: String,
    pub pid: u32,
}

/// A running multi-process devnet; dropping it kills every node.
pub struct ProcessDevnet {
    pub dir: PathBuf,
    pub genesis: Genesis,
    pub nodes: Vec<ProcNode>,
    pub faucet: Address,
    pub faucet_key_file: PathBuf,
    children: Nodes,
    reported_exits: Vec<bool>,
}

fn addrs_for(
    base_port: Option<u16>,
    first: usize,
    n: usize,
) -> Result<Vec<(String, String)>, Error> {
    match base_port {
        Some(p) => Ok((first..first + n)
            .map(|i| {
                let p2p = p as usize + 2 * i;
                (format!("127.0.0.1:{p2p}"), format!("127.0.0.1:{}", p2p + 1))
            })
            .collect()),
        None => crate::chaos::free_addrs(n),
    }
}

/// Puts the devnet model's payloads into the blob store of the node whose
/// data directory is `data` (the in-process devnet does this after start).
fn seed_blobs(dir: &Path, data: &Path) -> Result<(), Error> {
    let payloads = crate::devnet::model_payloads(dir)?;
    if payloads.is_empty() {
        return Ok(());
    }
    let blobs = crate::blobs::BlobStore::open(&crate::blobs::blob_dir(data))?;
    for p in &payloads {
        blobs.put(p)?;
    }
    Ok(())
}

async fn wait_api(url: &str, children: &mut Nodes, i: usize) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(START_TIMEOUT_S);
    loop {
        if client::status(url).await.is_some() {
            return Ok(());
        }
        if let Some(e) = children.exited(i)? {
            return Err(e);
        }
        if Instant::now() > deadline {
            return Err(Error::Node(format!(
                "node {i}'s API {url} did not answer within {START_TIMEOUT_S} s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl ProcessDevnet {
    /// Writes the layout and starts every node as a child process of
    /// `binary` (normally this executable).
    pub async fn start(opts: DevnetOptions, binary: PathBuf) -> Result<ProcessDevnet, Error> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| Error::io(opts.dir.display(), e))?;
        let dir = opts
            .dir
            .canonicalize()
            .map_err(|e| Error::io(opts.dir.display(), e))?;
        let opts = DevnetOptions {
            dir: dir.clone(),
            ..opts
        };
        let addrs = addrs_for(opts.base_port, 0, opts.validators)?;
        let (genesis, mut configs) = write_layout(&opts, &addrs)?;
        let faucet_key_file = dir.join("faucet.json");
        let faucet_key = read_key_file(&faucet_key_file, DEVNET_PASSWORD)?;
        let faucet = Address::from_public_key(faucet_key.verifying_key());
        for i in 0..opts.validators {
            seed_blobs(&dir, &dir.join(format!("node-{i}")).join("data"))?;
        }
        // Inference nodes: keys and configs now, started after registration.
        let inference_addrs = addrs_for(opts.base_port, opts.validators, opts.inference_nodes)?;
        let mut inference_keys = Vec::new();
        let seeds: Vec<PeerConfig> = genesis
            .validators
            .iter()
            .zip(&addrs)
            .map(|(v, (p2p, _))| PeerConfig {
                addr: p2p.clone(),
                public_key: hex::encode(v.public_key),
            })
            .collect();
        for (j, (p2p, http)) in inference_addrs.iter().enumerate() {
            let (nd, key) = crate::devnet::inference_node_dir(&dir, j)?;
            let mut inference = opts.inference.clone();
            inference.enabled = true;
            inference.model_dir = Some(model_dir(&dir));
            inference.advertise = true;
            inference.heartbeat_interval_ms = DEVNET_HEARTBEAT_INTERVAL_MS;
            inference.layers = crate::devnet::inference_layers(
                j,
                opts.inference_nodes,
                crate::devnet::registered_layers(&genesis),
                opts.stages,
            );
            inference.experts = crate::devnet::inference_experts(
                j,
                opts.inference_nodes,
                opts.stages,
                crate::devnet::model_experts(&dir),
            );
            let config = FileConfig {
                chain_id: genesis.chain_id.clone(),
                genesis_file: "../genesis.json".into(),
                data_dir: "data".into(),
                key_file: "key.json".into(),
                key_password_env: crate::config::DEFAULT_PASSWORD_ENV.into(),
                key_password_file: None,
                p2p_addr: p2p.clone(),
                http_addr: http.clone(),
                block_interval_ms: opts.block_interval_ms,
                max_body_bytes: crate::api::MAX_BODY_BYTES,
                expert_cache_bytes: crate::blobs::DEFAULT_CACHE_BYTES,
                rate_limits: opts.rate_limits.clone(),
                inference,
                http: opts.http.clone(),
                logs: crate::usage::LogsConfig::default(),
                api: opts.payments.clone(),
                state_sync: opts.state_sync.clone(),
                peers: seeds.clone(),
            };
            let path = nd.join("config.toml");
            std::fs::write(&path, config.to_toml()).map_err(|e| Error::io(path.display(), e))?;
            seed_blobs(&dir, &nd.join("data"))?;
            configs.push(path);
            inference_keys.push((key, p2p.clone()));
        }
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| Error::io(logs.display(), e))?;
        let mut children = Nodes::new(binary, configs, &logs);
        children.set_parent_pid(std::process::id());
        let mut nodes = Vec::new();
        let all_addrs: Vec<&(String, String)> = addrs.iter().chain(&inference_addrs).collect();
        for (i, v) in genesis.validators.iter().enumerate() {
            children.start(i)?;
            let address = Address::from_sec1(&v.public_key)
                .ok_or_else(|| Error::Genesis(format!("validator {i}'s key")))?;
            nodes.push(ProcNode {
                role: "validator",
                address,
                api_url: format!("http://{}", all_addrs[i].1),
                p2p_addr: all_addrs[i].0.clone(),
                pid: children.pid(i).expect("just started"),
            });
        }
        let urls: Vec<String> = nodes.iter().map(|n| n.api_url.clone()).collect();
        for (i, url) in urls.iter().enumerate() {
            wait_api(url, &mut children, i).await?;
        }
        let node0 = nodes[0].api_url.clone();
        // Fund and register the inference nodes not registered at their endpoint.
        for (key, endpoint) in &inference_keys {
            let me = Address::from_public_key(key.verifying_key());
            let (_, account) = client::get_json_patient(&node0, &format!("/account/{me}")).await?;
            let funded = account["balance"]
                .as_str()
                .and_then(|b| b.parse::<u128>().ok())
                .is_some_and(|b| b >= 100 * BLY);
            if !funded {
                let kind = TxKind::Transfer {
                    to: me,
                    amount: 1_000 * BLY,
                };
                client::submit_and_wait(&node0, &faucet_key, kind, "funding an inference node")
                    .await?;
            }
            let (s, registered) = client::get_json_patient(&node0, "/nodes?limit=1000").await?;
            let already = s == 200
                && registered.to_string().contains(&format!("\"{endpoint}\""))
                && registered.to_string().contains(&me.to_string());
            if !already {
                let kind = TxKind::RegisterNode {
                    info: Box::new(NodeInfo {
                        endpoint: endpoint.clone(),
                        blocks: Vec::new(),
                    }),
                    bond: genesis.params.node_min_bond,
                };
                // A key registered at another endpoint leaves first.
                let _ = client::submit_and_wait(
                    &node0,
                    key,
                    TxKind::DeregisterNode,
                    "deregistering an inference node",
                )
                .await;
                client::submit_and_wait(&node0, key, kind, "registering an inference node").await?;
            }
        }
        for (j, (key, _)) in inference_keys.iter().enumerate() {
            let i = opts.validators + j;
            children.start(i)?;
            nodes.push(ProcNode {
                role: "inference",
                address: Address::from_public_key(key.verifying_key()),
                api_url: format!("http://{}", all_addrs[i].1),
                p2p_addr: all_addrs[i].0.clone(),
                pid: children.pid(i).expect("just started"),
            });
        }
        let urls: Vec<String> = nodes.iter().map(|n| n.api_url.clone()).collect();
        for (i, url) in urls.iter().enumerate().skip(opts.validators) {
            wait_api(url, &mut children, i).await?;
        }
        let reported_exits = vec![false; nodes.len()];
        Ok(ProcessDevnet {
            dir,
            genesis,
            nodes,
            faucet,
            faucet_key_file,
            children,
            reported_exits,
        })
    }

    /// Nodes whose process has exited since the last call, with how
    /// (each reported once).
    pub fn newly_exited(&mut self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for i in 0..self.nodes.len() {
            if self.reported_exits[i] {
                continue;
            }
            if let Ok(Some(e)) = self.children.exited(i) {
                self.reported_exits[i] = true;
                out.push((i, e.to_string()));
            }
        }
        out
    }

    /// API-KEY-*: the devnet's key, as [`crate::devnet::Devnet::api_key`]
    /// makes it, through node 0's HTTP API.
    pub async fn api_key(&self) -> Result<String, Error> {
        use blyan_state_machine::allowance::{AllowanceTerms, ApiKey};
        let node0 = &self.nodes[0].api_url;
        let path = self.dir.join("api-key.txt");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let key = text.trim().to_string();
            let auth = format!("Bearer {key}");
            let r = client::send(
                node0,
                "GET",
                "/v1/usage?limit=1",
                &[("authorization", &auth)],
                None,
            )
            .await?;
            if r.status == 200 {
                return Ok(key);
            }
        }
        let faucet = read_key_file(&self.faucet_key_file, DEVNET_PASSWORD)?;
        let height = client::height(node0).await.unwrap_or(0);
        let kind = TxKind::OpenAllowance(Box::new(AllowanceTerms {
            cap: DEVNET_ALLOWANCE_BLY * BLY,
            node_caps: Vec::new(),
            expires_at: height + self.genesis.params.max_allowance_blocks,
        }));
        let id =
            client::submit_and_wait(node0, &faucet, kind, "opening the devnet's allowance").await?;
        let key = ApiKey::issue(&self.genesis.chain_id, &faucet, id, 0).to_key_string();
        std::fs::write(&path, format!("{key}\n")).map_err(|e| Error::io(path.display(), e))?;
        Ok(key)
    }

    /// SIGTERM to every node still running, then at most `wait` for them
    /// to exit; any left are killed when the devnet is dropped.
    pub async fn stop(mut self, wait: Duration) {
        self.children.terminate_all();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && self.children.any_running() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The faucet's key (tests sign with it).
    pub fn faucet_key(&self) -> Result<SigningKey, Error> {
        read_key_file(&self.faucet_key_file, DEVNET_PASSWORD)
    }

    /// The JSON of one node line's fields (for tests and scripts).
    pub fn describe(&self) -> serde_json::Value {
        json!(
            self.nodes
                .iter()
                .map(|n| json!({
                    "role": n.role, "address": n.address.to_string(), "api": n.api_url, "pid": n.pid
                }))
                .collect::<Vec<_>>()
        )
    }
}
