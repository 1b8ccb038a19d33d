//! The served model on chain (GEN-MODEL-*): a devnet's genesis registers the
//! embedded default model's blocks, and a node refuses to serve a block
//! directory that its genesis does not register.
//!
//! - **GEN-MODEL-1** The model is written as a block directory by
//!   `blyan-gpu`'s `split` (one safetensors file per block, named by its
//!   SHA3-256, and `manifest.json` holding the architecture and every block's
//!   hash and CID). The genesis lists a **meta** block whose payload is
//!   `manifest.json` (so it commits to every weight block, including `embed`
//!   and `head`), then one **layer** block per `layer.N` (POL-12: `model_id`
//!   = the meta, `depends_on = [meta]`, version 1.0.0), whose payload is that
//!   block's file; for a Qwen3-MoE model also a **router** block per
//!   `layer.N.router` and an **expert** block per `layer.N.expert.E`, in the
//!   manifest's (name) order. Payload Merkle roots and CIDs are POL-3/POL-4 of the bytes.
//!   `embed` and `head` are committed through the manifest only: they are
//!   not delta targets (POL-12 has no kind for them yet).
//! - **GEN-MODEL-2** Before serving, a node with a block directory checks
//!   that its genesis has a meta block whose CID is the manifest's and that
//!   every layer block of the directory is registered with its CID; any
//!   mismatch refuses start-up. (The block store itself checks each file's
//!   SHA3-256 against the manifest when it opens them.)
//! - **GEN-MODEL-3** After the layers, a devnet's genesis registers the
//!   shipped corpus as two DATA blocks of the model (POL-DATA-2): the
//!   training pool, then the validation pool (POL-VAL-1).

use crate::Error;
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::pol::{
    PolBlock, PolBlockType, SemVer, cid_v1_raw_sha256, payload_merkle_root,
};
use blyan_state_machine::types::Address;
use std::path::Path;

/// A registered block and its payload.
pub struct ModelBlock {
    pub block: PolBlock,
    pub payload: Vec<u8>,
}

/// A block directory, as the chain sees it.
pub struct ModelBlocks {
    /// Meta, then the layers, in genesis order.
    pub registered: Vec<ModelBlock>,
    /// `(name, payload)` of the blocks committed only through the manifest.
    pub others: Vec<(String, Vec<u8>)>,
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::io(path.display(), e))
}

fn pol_block(
    block_type: PolBlockType,
    model_id: [u8; 32],
    (layer, expert): (Option<u32>, Option<u32>),
    payload: &[u8],
    submitter: Address,
) -> PolBlock {
    PolBlock {
        block_type,
        model_id,
        depends_on: if block_type == PolBlockType::Meta {
            Vec::new()
        } else {
            vec![model_id]
        },
        version: SemVer {
            major: 1,
            minor: 0,
            patch: 0,
        },
        layer,
        expert,
        payload_size_bytes: payload.len() as u64,
        payload_merkle_root: payload_merkle_root(payload),
        payload_cid: cid_v1_raw_sha256(payload),
        submitter,
        base_block: None,
        base_version: None,
    }
}

/// The `manifest.json` entries: `(name, file)`.
fn manifest_blocks(manifest: &[u8]) -> Result<Vec<(String, String)>, Error> {
    let v: serde_json::Value = serde_json::from_slice(manifest)
        .map_err(|e| Error::Config(format!("manifest.json: {e}")))?;
    let blocks = v["blocks"]
        .as_array()
        .ok_or_else(|| Error::Config("manifest.json has no blocks list".into()))?;
    blocks
        .iter()
        .map(|b| match (b["name"].as_str(), b["file"].as_str()) {
            (Some(n), Some(f)) if !f.contains('/') => Ok((n.to_string(), f.to_string())),
            _ => Err(Error::Config(
                "manifest.json: a block without a plain name and file".into(),
            )),
        })
        .collect()
}

/// GEN-MODEL-1: the registered kind of a manifest block: `layer.N` is a
/// layer block, `layer.N.router` a router block and `layer.N.expert.E` an
/// expert block (RT-PIPE-8: what expert holders advertise); `None` for the
/// blocks only the manifest commits to (`embed`, `head`, GPT-OSS's stacked
/// `layer.N.experts`).
fn registered_kind(name: &str) -> Option<(PolBlockType, u32, Option<u32>)> {
    let rest = name.strip_prefix("layer.")?;
    let mut parts = rest.split('.');
    let layer = parts.next()?.parse().ok()?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => Some((PolBlockType::Layer, layer, None)),
        (Some("router"), None, _) => Some((PolBlockType::Router, layer, None)),
        (Some("expert"), Some(e), None) => {
            Some((PolBlockType::Expert, layer, Some(e.parse().ok()?)))
        }
        _ => None,
    }
}

/// GEN-MODEL-1: the meta and layer blocks of the block directory `dir`, in
/// genesis order, with their payloads; plus the payloads of every other
/// block of the manifest (`embed`, `head`) as `(name, bytes)`.
pub fn blocks_of_dir(dir: &Path, submitter: Address) -> Result<ModelBlocks, Error> {
    let manifest = read(&dir.join("manifest.json"))?;
    let entries = manifest_blocks(&manifest)?;
    let meta = pol_block(
        PolBlockType::Meta,
        [0; 32],
        (None, None),
        &manifest,
        submitter,
    );
    let model_id = meta.id();
    let mut registered = vec![ModelBlock {
        block: meta,
        payload: manifest,
    }];
    let mut others = Vec::new();
    for (name, file) in entries {
        let payload = read(&dir.join(&file))?;
        match registered_kind(&name) {
            Some((kind, l, e)) => registered.push(ModelBlock {
                block: pol_block(kind, model_id, (Some(l), e), &payload, submitter),
                payload,
            }),
            None => others.push((name, payload)),
        }
    }
    Ok(ModelBlocks { registered, others })
}

/// Writes the embedded default model as a block directory at `dir`
/// (`dir/hf` the Hugging Face form, `dir/blocks` the blocks and tokenizer)
/// and returns the block directory.
#[cfg(feature = "inference")]
pub fn write_default_blocks(dir: &Path) -> Result<std::path::PathBuf, Error> {
    write_embedded_blocks(dir, false)
}

/// As [`write_default_blocks`], for the embedded Qwen3-MoE model when `moe`
/// (RT-PIPE-8).
#[cfg(feature = "inference")]
pub fn write_embedded_blocks(dir: &Path, moe: bool) -> Result<std::path::PathBuf, Error> {
    let gpu = |e: blyan_gpu::GpuError| Error::Inference(e.to_string());
    let hf = dir.join("hf");
    let blocks = dir.join("blocks");
    if moe {
        blyan_gpu::default_model::write_moe_model(&hf).map_err(gpu)?;
    } else {
        blyan_gpu::default_model::write_default_model(&hf).map_err(gpu)?;
    }
    blyan_gpu::blocks::split(&hf, &blocks).map_err(gpu)?;
    let (from, to) = (hf.join("tokenizer.json"), blocks.join("tokenizer.json"));
    std::fs::copy(&from, &to).map_err(|e| Error::io(from.display(), e))?;
    Ok(blocks)
}

/// GEN-MODEL-3, POL-DATA-2: the shipped corpus as DATA blocks of model
/// `model_id` (POL-11: `depends_on = [model_id]`), the training pool first,
/// then the validation pool.
pub fn corpus_blocks(model_id: [u8; 32], submitter: Address) -> Vec<ModelBlock> {
    use blyan_state_machine::pol::validation::DataRole;
    [DataRole::Train, DataRole::Validation]
        .into_iter()
        .map(|role| {
            let payload = crate::corpus::payload(role);
            ModelBlock {
                block: pol_block(
                    PolBlockType::Data,
                    model_id,
                    (None, None),
                    &payload,
                    submitter,
                ),
                payload,
            }
        })
        .collect()
}

/// GEN-MODEL-2: the block directory `dir` is the model `genesis` registers.
pub fn check_registered(genesis: &Genesis, dir: &Path) -> Result<(), Error> {
    let blocks = blocks_of_dir(dir, Address::ZERO)?.registered;
    let registered = |b: &PolBlock| {
        genesis.pol_blocks.iter().any(|g| {
            g.block_type == b.block_type
                && g.payload_cid == b.payload_cid
                && g.payload_merkle_root == b.payload_merkle_root
                && g.layer == b.layer
                && g.expert == b.expert
        })
    };
    for m in &blocks {
        if !registered(&m.block) {
            return Err(Error::Config(format!(
                "{}: the {:?} block{} (CID {}) is not registered in the genesis; refusing to serve weights the chain does not know",
                dir.display(),
                m.block.block_type,
                m.block
                    .layer
                    .map(|l| format!(" of layer {l}"))
                    .unwrap_or_default(),
                m.block.payload_cid
            )));
        }
    }
    Ok(())
}
