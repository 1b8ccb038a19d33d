//! Weights as content-addressed blocks.
//!
//! `split` cuts a checkpoint into blocks: `embed` (token embedding), one per
//! layer (`layer.N`, every `model.layers.N.*` tensor), and `head` (final norm
//! and `lm_head`). Each block is a safetensors file named by its SHA3-256,
//! with an IPFS-compatible CIDv1 (raw codec, sha2-256 multihash, base32).
//! `manifest.json` lists the blocks and holds the model's `config.json`.
//!
//! A `BlockStore` memory-maps a block, checks its hash, and hands out its
//! tensors as views of the mapping (no copy on the host): moving them to the
//! GPU is then the only copy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::Digest as _;
use tch::Tensor;

use crate::error::{GpuError, Result};
use crate::sys;
pub use crate::sys::BlockTensor;
use crate::weights::{SafetensorsDir, TensorSource, kind_of};

/// SHA3-256 of `bytes`, hex.
pub fn sha3_hex(bytes: &[u8]) -> String {
    hex::encode(sha3::Sha3_256::digest(bytes))
}

/// RFC 4648 base32, lower case, no padding (multibase prefix `b`).
fn base32_lower(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buffer >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// CIDv1, codec raw (0x55), multihash sha2-256 (0x12, 32 bytes), base32:
/// what `ipfs add --cid-version 1 --raw-leaves` gives a single-chunk file.
pub fn cid_v1_raw(bytes: &[u8]) -> String {
    let digest = sha2::Sha256::digest(bytes);
    let mut cid = vec![0x01, 0x55, 0x12, 0x20];
    cid.extend_from_slice(&digest);
    format!("b{}", base32_lower(&cid))
}

/// The block a tensor belongs to: `embed`, `head`, `layer.N` (attention,
/// norms, dense MLP), `layer.N.router` (MoE router), `layer.N.expert.E`
/// (one Qwen3-MoE expert), `layer.N.experts` (GPT-OSS's stacked expert
/// tensors, which hold every expert of the layer in one tensor).
pub fn block_of(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.layers.") {
        let mut parts = rest.split('.');
        let n = parts.next().unwrap_or("");
        let tail: Vec<&str> = parts.collect();
        return match tail.as_slice() {
            ["mlp", "gate", ..] | ["mlp", "router", ..] => format!("layer.{n}.router"),
            ["mlp", "experts", e, ..] if e.parse::<u32>().is_ok() => {
                format!("layer.{n}.expert.{e}")
            }
            ["mlp", "experts", ..] => format!("layer.{n}.experts"),
            _ => format!("layer.{n}"),
        };
    }
    match name {
        "model.embed_tokens.weight" => "embed".into(),
        _ => "head".into(),
    }
}

/// One block as listed in the manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockInfo {
    pub name: String,
    pub file: String,
    pub sha3_256: String,
    pub cid: String,
    pub bytes: u64,
    pub tensors: Vec<String>,
}

/// Splits the checkpoint in `model_dir` into blocks in `out_dir`.
pub fn split(model_dir: &Path, out_dir: &Path) -> Result<Vec<BlockInfo>> {
    let config_path = model_dir.join("config.json");
    let config_text =
        std::fs::read_to_string(&config_path).map_err(|e| GpuError::io(&config_path, e))?;
    crate::config::ModelConfig::from_json_str(&config_text)?;
    let config: Value = serde_json::from_str(&config_text).map_err(|e| GpuError::Json {
        path: config_path,
        message: e.to_string(),
    })?;
    let src = SafetensorsDir::open(model_dir)?;
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in src.names() {
        groups
            .entry(block_of(name))
            .or_default()
            .push(name.to_owned());
    }
    std::fs::create_dir_all(out_dir).map_err(|e| GpuError::io(out_dir, e))?;
    let mut blocks = Vec::new();
    for (block, names) in groups {
        let tensors: Vec<(String, Tensor)> = names
            .iter()
            .map(|n| Ok((n.clone(), src.tensor(n)?)))
            .collect::<Result<_>>()?;
        let tmp = out_dir.join(format!(".{block}.tmp"));
        Tensor::write_safetensors(&tensors, &tmp)?;
        let bytes = std::fs::read(&tmp).map_err(|e| GpuError::io(&tmp, e))?;
        let sha3 = sha3_hex(&bytes);
        let file = format!("{sha3}.safetensors");
        std::fs::rename(&tmp, out_dir.join(&file)).map_err(|e| GpuError::io(&tmp, e))?;
        blocks.push(BlockInfo {
            name: block,
            file,
            cid: cid_v1_raw(&bytes),
            sha3_256: sha3,
            bytes: bytes.len() as u64,
            tensors: names,
        });
    }
    let manifest = json!({
        "config": config,
        "blocks": blocks.iter().map(|b| json!({
            "name": b.name, "file": b.file, "sha3_256": b.sha3_256, "cid": b.cid,
            "bytes": b.bytes, "tensors": b.tensors,
        })).collect::<Vec<_>>(),
    });
    let path = out_dir.join("manifest.json");
    let text = serde_json::to_string_pretty(&manifest).expect("json");
    std::fs::write(&path, text).map_err(|e| GpuError::io(&path, e))?;
    Ok(blocks)
}

/// A directory written by `split`: blocks verified on open.
pub struct BlockStore {
    dir: PathBuf,
    pub config: Value,
    pub blocks: Vec<BlockInfo>,
    /// block name -> mapped, verified file
    maps: BTreeMap<String, memmap2::Mmap>,
    /// tensor name -> block name
    index: BTreeMap<String, String>,
}

fn parse_block(v: &Value) -> Option<BlockInfo> {
    Some(BlockInfo {
        name: v.get("name")?.as_str()?.into(),
        file: v.get("file")?.as_str()?.into(),
        sha3_256: v.get("sha3_256")?.as_str()?.into(),
        cid: v.get("cid")?.as_str()?.into(),
        bytes: v.get("bytes")?.as_u64()?,
        tensors: v
            .get("tensors")?
            .as_array()?
            .iter()
            .map(|t| t.as_str().map(String::from))
            .collect::<Option<_>>()?,
    })
}

impl BlockStore {
    /// Reads `dir/manifest.json` (no block is opened yet).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| GpuError::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| GpuError::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let bad = |m: &str| GpuError::Json {
            path: path.clone(),
            message: m.into(),
        };
        let blocks: Vec<BlockInfo> = v
            .get("blocks")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no `blocks` array"))?
            .iter()
            .map(|b| parse_block(b).ok_or_else(|| bad("malformed block entry")))
            .collect::<Result<_>>()?;
        let mut index = BTreeMap::new();
        for b in &blocks {
            for t in &b.tensors {
                index.insert(t.clone(), b.name.clone());
            }
        }
        Ok(BlockStore {
            dir: dir.to_path_buf(),
            config: v.get("config").cloned().unwrap_or(Value::Null),
            blocks,
            maps: BTreeMap::new(),
            index,
        })
    }

    /// The model config held in the manifest.
    pub fn model_config(&self) -> Result<crate::config::ModelConfig> {
        crate::config::ModelConfig::from_json_str(&self.config.to_string())
    }

    /// Maps block `name` and checks its SHA3-256 against the manifest.
    pub fn load_block(&mut self, name: &str) -> Result<()> {
        if self.maps.contains_key(name) {
            return Ok(());
        }
        let info = self
            .blocks
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| GpuError::Invalid(format!("no block {name:?}")))?;
        let path = self.dir.join(&info.file);
        let map = sys::mmap_file(&path)?;
        let actual = sha3_hex(&map);
        if actual != info.sha3_256 {
            return Err(GpuError::HashMismatch {
                name: name.into(),
                expected: info.sha3_256.clone(),
                actual,
            });
        }
        crate::weights::parse_shard(&path, &map)?;
        self.maps.insert(name.into(), map);
        Ok(())
    }

    /// Maps and verifies every block.
    pub fn load_all(&mut self) -> Result<()> {
        let names: Vec<String> = self.blocks.iter().map(|b| b.name.clone()).collect();
        names.iter().try_for_each(|n| self.load_block(n))
    }

    /// Calls `f` with each tensor of a loaded block as a view of the mapped
    /// file (no host copy): moving it to the GPU with
    /// [`BlockTensor::to_device`] is the only copy. The views cannot escape
    /// `f` (KERN-3): every tensor taken out of one is a copy.
    pub fn with_block_tensors<T>(
        &self,
        name: &str,
        mut f: impl FnMut(&str, &BlockTensor<'_>) -> Result<T>,
    ) -> Result<Vec<T>> {
        let map = self
            .maps
            .get(name)
            .ok_or_else(|| GpuError::Invalid(format!("block {name:?} is not loaded")))?;
        let info = self.blocks.iter().find(|b| b.name == name).expect("listed");
        let path = self.dir.join(&info.file);
        let st =
            safetensors::SafeTensors::deserialize(map).map_err(|e| GpuError::CorruptShard {
                path: path.clone(),
                message: format!("{e:?}"),
            })?;
        let mut out = Vec::new();
        for tname in &info.tensors {
            let view = st.tensor(tname).map_err(|_| GpuError::MissingTensor {
                name: tname.clone(),
            })?;
            let kind = kind_of(view.dtype(), tname)?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = BlockTensor::new(view.data(), &shape, kind)?;
            out.push(f(tname, &t)?);
        }
        Ok(out)
    }
}

/// Measures loading one block of `bytes` (random bf16) from a block store in
/// `dir`: (ms to map and verify its SHA3-256, ms to copy its tensor onto
/// `device`). The seed's target for a 52 MB expert is 500 ms.
pub fn bench_block_load(dir: &Path, bytes: usize, device: tch::Device) -> Result<(f64, f64)> {
    let n = (bytes / 2) as i64;
    let t = Tensor::randn([n], (tch::Kind::BFloat16, tch::Device::Cpu));
    let tmp = dir.join("src");
    std::fs::create_dir_all(&tmp).map_err(|e| GpuError::io(&tmp, e))?;
    let file = tmp.join("block.safetensors");
    Tensor::write_safetensors(
        &[("model.layers.0.mlp.experts.0.up_proj.weight", &t)],
        &file,
    )?;
    let data = std::fs::read(&file).map_err(|e| GpuError::io(&file, e))?;
    let sha3 = sha3_hex(&data);
    let name = format!("{sha3}.safetensors");
    std::fs::write(dir.join(&name), &data).map_err(|e| GpuError::io(dir, e))?;
    let manifest = json!({"config": null, "blocks": [{"name": "layer.0.expert.0", "file": name,
        "sha3_256": sha3, "cid": cid_v1_raw(&data), "bytes": data.len(),
        "tensors": ["model.layers.0.mlp.experts.0.up_proj.weight"]}]});
    let path = dir.join("manifest.json");
    std::fs::write(&path, manifest.to_string()).map_err(|e| GpuError::io(&path, e))?;
    drop(data);
    let start = std::time::Instant::now();
    let mut store = BlockStore::open(dir)?;
    store.load_block("layer.0.expert.0")?;
    let verified = start.elapsed().as_secs_f64() * 1e3;
    let moved = store.with_block_tensors("layer.0.expert.0", |_, t| Ok(t.to_device(device)))?;
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let total = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(moved.len(), 1);
    Ok((verified, total - verified))
}

impl TensorSource for BlockStore {
    /// A copy of the tensor (the block must be loaded).
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let block = self
            .index
            .get(name)
            .ok_or_else(|| GpuError::MissingTensor { name: name.into() })?;
        let mut found = None;
        self.with_block_tensors(block, |n, t| {
            if n == name {
                found = Some(t.copy());
            }
            Ok(())
        })?;
        found.ok_or_else(|| GpuError::MissingTensor { name: name.into() })
    }
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_of_empty_input_matches_ipfs() {
        // `ipfs add --cid-version 1 --raw-leaves` of an empty file.
        assert_eq!(
            cid_v1_raw(b""),
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );
    }

    #[test]
    fn sha3_is_fips_not_keccak() {
        assert!(sha3_hex(b"").starts_with("a7ffc6f8"));
    }

    #[test]
    fn block_names() {
        assert_eq!(block_of("model.layers.12.mlp.up_proj.weight"), "layer.12");
        assert_eq!(block_of("model.embed_tokens.weight"), "embed");
        assert_eq!(block_of("lm_head.weight"), "head");
        assert_eq!(block_of("model.norm.weight"), "head");
        assert_eq!(block_of("model.layers.3.mlp.gate.weight"), "layer.3.router");
        assert_eq!(block_of("model.layers.3.mlp.router.bias"), "layer.3.router");
        assert_eq!(
            block_of("model.layers.3.mlp.experts.17.down_proj.weight"),
            "layer.3.expert.17"
        );
        assert_eq!(
            block_of("model.layers.3.mlp.experts.gate_up_proj_blocks"),
            "layer.3.experts"
        );
        assert_eq!(block_of("model.layers.3.mlp.gate_proj.weight"), "layer.3");
    }
}
