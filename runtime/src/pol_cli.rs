//! `blyan pol train | submit | status`: the learning loop from a trainer's
//! side, through a node's HTTP API only (spec/pol.md POL-TRAIN-*,
//! POL-SUBMIT-*).
//!
//! - **POL-TRAIN-2** `train` reads the target's head from the chain
//!   (`GET /pol/experts`), rebuilds it from the model's genesis weights (a
//!   block directory, or the embedded model, whose meta block must be the
//!   chain's, GEN-MODEL-2) plus the target's accepted deltas (`GET
//!   /pol/blocks/{id}/payload`, each checked against its Merkle root),
//!   trains on the model's training pool (POL-DATA-1), compresses the
//!   update (POL-DELTA-7) and writes a *delta file*: the delta block
//!   (POL-13/14: base = the head, parents = the head and the data block,
//!   submitter = the key's address) and its payload.
//! - **POL-SUBMIT-1** `submit` commits (`CommitDelta`, POL-20), waits for
//!   the commitment's block, reveals (`RevealDelta` through `POST /mine`
//!   with the payload, POL-21), and with `--wait` follows `GET
//!   /pol/deltas/{id}` until the decision; its last line is one JSON object
//!   `{delta, status, reason, improvement_ppm, …}`.

use crate::Error;
use crate::client;
use blyan_gpu::pol::{Target, TrainOptions, Weights};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::pol::validation::{DataPayload, DataRole};
use blyan_state_machine::pol::{
    PolBlock, PolBlockType, PolTx, SemVer, cid_v1_raw_sha256, delta_commitment, payload_merkle_root,
};
use blyan_state_machine::tx::TxKind;
use blyan_state_machine::types::{Address, Hash32};
use k256::ecdsa::SigningKey;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The delta file's format tag.
pub const DELTA_FILE_FORMAT: &str = "blyan-delta/1";
/// POL-TRAIN-2: the default target layer.
pub const DEFAULT_LAYER: u32 = 0;
/// POL-TRAIN-2: the default density of the compressed update: 10 %.
pub const DEFAULT_DENSITY_PPM: u32 = 100_000;
/// How long `submit --wait` follows a delta before giving up.
pub const SUBMIT_WAIT_S: u64 = 600;

/// `blyan pol train` settings.
pub struct TrainArgs {
    pub node: String,
    pub out: PathBuf,
    /// POL-TRAIN-3: the target (default: layer [`DEFAULT_LAYER`]).
    pub target: Option<Target>,
    pub model_dir: Option<PathBuf>,
    pub density_ppm: u32,
    /// The update is multiplied by this before compression (1: as trained;
    /// a calibration and test aid: negative makes the model worse, small
    /// positive values give small improvements).
    pub scale: f64,
    pub options: TrainOptions,
}

fn http(e: impl std::fmt::Display) -> Error {
    Error::Http(e.to_string())
}

fn gpu(e: blyan_gpu::GpuError) -> Error {
    Error::Inference(e.to_string())
}

use client::get_ok;

fn hash_of(v: &Value, what: &str) -> Result<Hash32, Error> {
    let s = v
        .as_str()
        .ok_or_else(|| Error::Http(format!("{what} missing")))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
        .map_err(|e| Error::Http(format!("{what} {s:?}: {e}")))?;
    Ok(out)
}

/// API-POL-1: a block's payload, checked against its Merkle root.
pub async fn fetch_payload(node: &str, block: &PolBlock, id: &Hash32) -> Result<Vec<u8>, Error> {
    let path = format!("/pol/blocks/0x{}/payload", hex::encode(id));
    let (s, bytes) = client::request(node, "GET", &path, None).await?;
    if s != 200 {
        return Err(Error::Http(format!(
            "GET {path}: HTTP {s}: {}",
            String::from_utf8_lossy(&bytes)
        )));
    }
    if payload_merkle_root(&bytes) != block.payload_merkle_root {
        return Err(Error::Http(format!(
            "{path}: the payload does not match the block's Merkle root (POL-3)"
        )));
    }
    Ok(bytes)
}

async fn pol_block(node: &str, id: &Hash32) -> Result<PolBlock, Error> {
    let v = get_ok(node, &format!("/pol/blocks/0x{}", hex::encode(id))).await?;
    serde_json::from_value(v).map_err(|e| Error::Http(format!("PoL block: {e}")))
}

/// Every PoL block of the DAG, by id (paged `GET /pol/blocks`).
async fn all_blocks(node: &str) -> Result<Vec<(Hash32, PolBlock)>, Error> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/pol/blocks?limit=100&after={a}"),
            None => "/pol/blocks?limit=100".to_string(),
        };
        let v = get_ok(node, &path).await?;
        let page = v["blocks"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return Ok(out);
        }
        for b in &page {
            let id = hash_of(&b["id"], "block id")?;
            let block: PolBlock = serde_json::from_value(b.clone())
                .map_err(|e| Error::Http(format!("PoL block: {e}")))?;
            out.push((id, block));
        }
        after = page.last().and_then(|b| b["id"].as_str()).map(String::from);
    }
}

/// The first DATA block of `model` (by id) whose payload has `role`, with
/// its text.
async fn data_pool(
    node: &str,
    blocks: &[(Hash32, PolBlock)],
    model: &Hash32,
    role: DataRole,
) -> Result<(Hash32, String), Error> {
    for (id, b) in blocks {
        if b.block_type != PolBlockType::Data || b.model_id != *model {
            continue;
        }
        let payload = fetch_payload(node, b, id).await?;
        if let Ok(p) = DataPayload::decode(&payload)
            && p.role == role
        {
            return Ok((*id, p.text.to_string()));
        }
    }
    Err(Error::Http(format!(
        "the chain registers no {role:?} DATA block for model 0x{}",
        hex::encode(model)
    )))
}

/// The model's genesis weights and the CID of its manifest (its meta
/// block's payload, GEN-MODEL-1): a block directory, or the embedded model
/// written to a temporary one.
fn local_model(dir: Option<&Path>, tmp: &Path) -> Result<(String, Weights, PathBuf), Error> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => crate::model::write_default_blocks(tmp)?,
    };
    let meta_cid = crate::model::blocks_of_dir(&dir, Address::ZERO)?.registered[0]
        .block
        .payload_cid
        .clone();
    let weights = Weights::load(Some(&dir)).map_err(gpu)?;
    Ok((meta_cid, weights, dir))
}

/// Mean loss of `weights` over consecutive windows of `tokens` (at most
/// 64 windows of 129 tokens): what the trainer reports, not what decides.
fn report_loss(weights: &Weights, tokens: &[i64]) -> Result<u64, Error> {
    let w = blyan_state_machine::pol::validation::VALIDATION_WINDOW_TOKENS as usize;
    let starts: Vec<u64> = (0..64)
        .map(|i| (i * w) as u64)
        .take_while(|s| *s as usize + w <= tokens.len())
        .collect();
    let windows = blyan_gpu::pol::windows(tokens, &starts, w).map_err(gpu)?;
    blyan_gpu::pol::mean_loss_micronats(&weights.model().map_err(gpu)?, &windows).map_err(gpu)
}

/// POL-TRAIN-2: `blyan pol train`. Returns the summary it prints.
pub async fn train(args: TrainArgs, key: &SigningKey) -> Result<Value, Error> {
    let started = Instant::now();
    let node = args.node.as_str();
    let submitter = Address::from_public_key(key.verifying_key());
    let tmp = std::env::temp_dir().join(format!("blyan-train-{}", std::process::id()));
    let (meta_cid, mut weights, dir) = local_model(args.model_dir.as_deref(), &tmp)?;
    let blocks = all_blocks(node).await?;
    // GEN-MODEL-2: the local weights must be a model the chain registers.
    let meta = blocks
        .iter()
        .find(|(_, b)| b.block_type == PolBlockType::Meta && b.payload_cid == meta_cid)
        .map(|(id, _)| *id)
        .ok_or_else(|| {
            Error::Config(format!(
                "the chain registers no model whose manifest has CID {meta_cid}; is --model-dir the chain's model?"
            ))
        })?;
    let target = args.target.unwrap_or(Target::Layer(DEFAULT_LAYER));
    let (kind, layer, expert) = match target {
        Target::Layer(l) => ("layer", l, None),
        Target::Expert { layer, expert } => ("expert", layer, Some(expert)),
        Target::Router(l) => ("router", l, None),
    };
    let experts = get_ok(node, "/pol/experts").await?;
    let record = experts["experts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| {
            r["kind"] == kind
                && r["layer"].as_u64() == Some(u64::from(layer))
                && r["expert"].as_u64() == expert.map(u64::from)
                && r["model_id"].as_str() == Some(&format!("0x{}", hex::encode(meta)))
        })
        .cloned()
        .ok_or_else(|| {
            Error::Config(format!(
                "the chain has no target {target} of this model (meta 0x{}); is --model-dir the chain's model?",
                hex::encode(meta)
            ))
        })?;
    let head_id = hash_of(&record["block_hash"], "head block")?;
    let head_version: SemVer = serde_json::from_value(record["version"].clone())
        .map_err(|e| Error::Http(format!("head version: {e}")))?;
    // The model (POL-EVAL-1): the genesis weights plus every target's
    // accepted deltas, as validators will evaluate it.
    let meta_hex = format!("0x{}", hex::encode(meta));
    let mut model_deltas = 0;
    let mut target_deltas = 0;
    for r in experts["experts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["model_id"].as_str() == Some(meta_hex.as_str()))
    {
        let head = hash_of(&r["block_hash"], "head block")?;
        let mut lineage = Vec::new();
        let mut cur = head;
        loop {
            let b = pol_block(node, &cur).await?;
            if b.block_type != PolBlockType::Delta {
                break;
            }
            let base = b
                .base_block
                .ok_or_else(|| Error::Http("a delta without a base".into()))?;
            lineage.push((cur, b));
            cur = base;
        }
        lineage.reverse();
        for (id, b) in &lineage {
            let payload = fetch_payload(node, b, id).await?;
            weights.apply_delta(&payload).map_err(gpu)?;
        }
        model_deltas += lineage.len();
        if head == head_id {
            target_deltas = lineage.len();
        }
    }
    eprintln!(
        "head of {target}: 0x{} (version {}.{}.{}, {} accepted deltas; {} in the whole model)",
        hex::encode(head_id),
        head_version.major,
        head_version.minor,
        head_version.patch,
        target_deltas,
        model_deltas
    );
    let (data_id, train_text) = data_pool(node, &blocks, &meta, DataRole::Train).await?;
    let (_, validation_text) = data_pool(node, &blocks, &meta, DataRole::Validation).await?;
    let tokenizer = crate::pol_eval::tokenizer_of(&dir).map_err(gpu)?;
    let train_tokens = tokenizer.encode(&train_text).map_err(gpu)?;
    let validation_tokens = tokenizer.encode(&validation_text).map_err(gpu)?;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "training {target}{} on DATA block 0x{} ({} tokens): {} steps of {} × {} tokens",
        match args.options.lora_rank {
            Some(r) => format!(" (LoRA rank {r})"),
            None => String::new(),
        },
        hex::encode(data_id),
        train_tokens.len(),
        args.options.steps,
        args.options.batch,
        args.options.seq_tokens
    );
    let opts = args.options.clone();
    let steps = opts.steps;
    let train_started = Instant::now();
    let trained = {
        let weights = weights.shallow();
        tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let mut tokens = 0u64;
            // POL-TRAIN-2: a bar redrawn in place on a terminal; a line
            // every 10 steps otherwise (logs, pipes).
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            blyan_gpu::pol::train_target(&weights, target, &train_tokens, &opts, |r| {
                tokens += r.tokens;
                let secs = t0.elapsed().as_secs_f64().max(1e-9);
                let line = format!(
                    "step {:>4}/{steps}  loss {:.4}  {:.0} tokens/s  {:.1} steps/s",
                    r.step,
                    r.loss,
                    tokens as f64 / secs,
                    f64::from(r.step) / secs
                );
                if tty {
                    eprint!("\r{} {line}", progress_bar(r.step, steps));
                    if r.step == steps {
                        eprintln!();
                    }
                } else if r.step == 1 || r.step % 10 == 0 || r.step == steps {
                    eprintln!("{line}");
                }
            })
        })
        .await
        .map_err(|e| Error::Node(format!("training task: {e}")))?
        .map_err(gpu)?
    };
    let train_s = train_started.elapsed().as_secs_f64();
    let mut trained = trained;
    if args.scale != 1.0 {
        for u in trained.updates.values_mut() {
            *u = &*u * args.scale;
        }
    }
    let payload = trained.compress(args.density_ppm).map_err(gpu)?;
    // What the trainer can see of the result (validators decide on their own sample).
    let head_loss = report_loss(&weights, &validation_tokens)?;
    let dense_loss = report_loss(&trained.apply_dense(&weights), &validation_tokens)?;
    let mut compressed = weights.shallow();
    compressed.apply_delta(&payload).map_err(gpu)?;
    let compressed_loss = report_loss(&compressed, &validation_tokens)?;
    let dense_bf16_bytes = trained.dense_bf16_bytes();
    let version = head_version
        .bump_for_delta()
        .ok_or_else(|| Error::Config("the head's minor version is exhausted".into()))?;
    let block = PolBlock {
        block_type: PolBlockType::Delta,
        model_id: meta,
        depends_on: vec![head_id, data_id],
        version,
        layer: Some(layer),
        expert,
        payload_size_bytes: payload.len() as u64,
        payload_merkle_root: payload_merkle_root(&payload),
        payload_cid: cid_v1_raw_sha256(&payload),
        submitter,
        base_block: Some(head_id),
        base_version: Some(head_version),
    };
    let delta_id = block.id();
    let file = json!({
        "format": DELTA_FILE_FORMAT,
        "block": block,
        "payload": format!("0x{}", hex::encode(&payload)),
    });
    std::fs::write(&args.out, file.to_string()).map_err(|e| Error::io(args.out.display(), e))?;
    let improvement = |l: u64| blyan_state_machine::pol::improvement_ppm(head_loss, l);
    Ok(json!({
        "delta": format!("0x{}", hex::encode(delta_id)),
        "out": args.out.display().to_string(),
        "target": target.to_string(),
        "lora_rank": args.options.lora_rank,
        "trained_parameters": trained.trained_parameters,
        "steps": steps,
        "train_s": train_s,
        "first_loss": trained.first_loss,
        "last_loss": trained.last_loss,
        "payload_bytes": payload.len(),
        "dense_bf16_bytes": dense_bf16_bytes,
        "compression": dense_bf16_bytes as f64 / payload.len() as f64,
        "validation_pool_head_loss_micronats": head_loss,
        "validation_pool_dense_loss_micronats": dense_loss,
        "validation_pool_compressed_loss_micronats": compressed_loss,
        "dense_improvement_ppm": improvement(dense_loss),
        "compressed_improvement_ppm": improvement(compressed_loss),
        "elapsed_s": started.elapsed().as_secs_f64(),
    }))
}

/// `[#####     ]`: `done` of `total` in 24 cells.
fn progress_bar(done: u32, total: u32) -> String {
    const CELLS: u32 = 24;
    let filled = (u64::from(done.min(total)) * u64::from(CELLS) / u64::from(total.max(1))) as usize;
    format!(
        "[{}{}]",
        "#".repeat(filled),
        " ".repeat(CELLS as usize - filled)
    )
}

/// A delta file: the block and its payload, checked against each other.
pub fn read_delta_file(path: &Path) -> Result<(PolBlock, Vec<u8>), Error> {
    let text = std::fs::read(path).map_err(|e| Error::io(path.display(), e))?;
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Config(format!("{}: not a delta file: {e}", path.display())))?;
    if v["format"] != DELTA_FILE_FORMAT {
        return Err(Error::Config(format!(
            "{}: format is {}, not {DELTA_FILE_FORMAT:?}",
            path.display(),
            v["format"]
        )));
    }
    let block: PolBlock = serde_json::from_value(v["block"].clone())
        .map_err(|e| Error::Config(format!("{}: block: {e}", path.display())))?;
    let payload = hex::decode(
        v["payload"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("0x"),
    )
    .map_err(|e| Error::Config(format!("{}: payload: {e}", path.display())))?;
    crate::api::pol::check_payload(&block, &payload)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    if block.block_type != PolBlockType::Delta {
        return Err(Error::Config(format!(
            "{}: not a delta block",
            path.display()
        )));
    }
    Ok((block, payload))
}

/// POL-SUBMIT-1: `blyan pol submit`. Returns the final JSON line.
pub async fn submit(
    node: &str,
    key: &SigningKey,
    delta_file: &Path,
    wait: bool,
) -> Result<Value, Error> {
    let started = Instant::now();
    let (block, payload) = read_delta_file(delta_file)?;
    let me = Address::from_public_key(key.verifying_key());
    if block.submitter != me {
        return Err(Error::Config(format!(
            "the delta was trained for submitter {}, not this key's address {me} (the id covers the submitter, POL-20)",
            block.submitter
        )));
    }
    let delta_id = block.id();
    let delta_hex = format!("0x{}", hex::encode(delta_id));
    // POL-20: commit.
    let commit = client::sign_tx(
        node,
        key,
        TxKind::Pol(Box::new(PolTx::CommitDelta {
            commitment: delta_commitment(&delta_id, &me),
        })),
    )
    .await?;
    let body = json!({ "tx": format!("0x{}", hex::encode(commit.encode())) });
    let (s, reply) = client::post_json(node, "/tx", &body).await?;
    if !(200..300).contains(&s) {
        return Err(Error::Http(format!("commit: HTTP {s}: {reply}")));
    }
    let commit_id = reply["id"].as_str().unwrap_or_default().to_string();
    eprintln!("commit {commit_id} submitted for delta {delta_hex}");
    let committed_at = client::wait_committed(node, &commit_id, "commit").await?;
    eprintln!("commit included at height {committed_at}; revealing");
    // POL-21: reveal, with the payload, through /mine.
    let reveal = client::sign_tx(
        node,
        key,
        TxKind::Pol(Box::new(PolTx::RevealDelta(block.clone()))),
    )
    .await?;
    let body = json!({
        "tx": format!("0x{}", hex::encode(reveal.encode())),
        "block_data": format!("0x{}", hex::encode(&payload)),
    });
    let (s, reply) = client::post_json(node, "/mine", &body).await?;
    if !(200..300).contains(&s) {
        return Err(Error::Http(format!("reveal: HTTP {s}: {reply}")));
    }
    let reveal_id = reply["tx_id"].as_str().unwrap_or_default().to_string();
    let revealed_at = client::wait_committed(node, &reveal_id, "reveal").await?;
    eprintln!("revealed at height {revealed_at}; validators evaluate it now");
    if !wait {
        return Ok(
            json!({"delta": delta_hex, "status": "pending", "reason": null, "improvement_ppm": null}),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(SUBMIT_WAIT_S);
    let mut last = String::new();
    loop {
        let (s, v) = client::get_json(node, &format!("/pol/deltas/{delta_hex}")).await?;
        if s == 200 {
            let status = v["status"].as_str().unwrap_or_default().to_string();
            if matches!(status.as_str(), "accepted" | "rejected" | "stale") {
                let mut out = v.clone();
                out["elapsed_s"] = json!(started.elapsed().as_secs_f64());
                return Ok(out);
            }
            let line = format!(
                "{status}: height {} (commit window ends {}, reveal window {}); attestations committed {}, revealed {}",
                v["height"],
                v["commit_end_height"],
                v["reveal_end_height"],
                v["attestations_committed"],
                v["attestations_revealed"]
            );
            if line != last {
                eprintln!("{line}");
                last = line;
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Http(format!(
                "delta {delta_hex} not decided within {SUBMIT_WAIT_S} s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `blyan pol status`: the node's view of a delta (API-POL-2).
pub async fn status(node: &str, delta: &str) -> Result<Value, Error> {
    let (s, v) = client::get_json(node, &format!("/pol/deltas/{delta}"))
        .await
        .map_err(http)?;
    if s == 200 {
        Ok(v)
    } else {
        Err(Error::Http(format!("HTTP {s}: {v}")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn progress_bar_fills_in_proportion() {
        assert_eq!(super::progress_bar(0, 200), format!("[{}]", " ".repeat(24)));
        assert_eq!(
            super::progress_bar(100, 200),
            format!("[{}{}]", "#".repeat(12), " ".repeat(12))
        );
        assert_eq!(
            super::progress_bar(200, 200),
            format!("[{}]", "#".repeat(24))
        );
    }
}
