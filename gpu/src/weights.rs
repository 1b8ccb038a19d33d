//! Reading tensors from Hugging Face safetensors checkpoints: a single
//! `model.safetensors` or shards listed in `model.safetensors.index.json`.
//! Files are memory-mapped; a tensor is copied out only when asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::error::{GpuError, Result};
use crate::sys;

/// Anything that can hand out named tensors (on the CPU, in their stored dtype).
pub trait TensorSource {
    /// The tensor called `name`, or `MissingTensor`.
    fn tensor(&self, name: &str) -> Result<Tensor>;
    /// Whether a tensor called `name` exists.
    fn contains(&self, name: &str) -> bool;
}

/// In-memory tensors (the embedded default model, tests).
impl TensorSource for BTreeMap<String, Tensor> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| GpuError::MissingTensor { name: name.into() })
    }
    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
}

struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
}

/// The safetensors files of one checkpoint directory, memory-mapped and
/// validated (header parsed, every tensor's byte range checked) at open.
pub struct SafetensorsDir {
    shards: Vec<Shard>,
    /// tensor name -> index into `shards`.
    index: BTreeMap<String, usize>,
}

pub(crate) fn kind_of(dtype: Dtype, name: &str) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        other => {
            return Err(GpuError::UnsupportedDtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

pub(crate) fn parse_shard(path: &Path, bytes: &[u8]) -> Result<Vec<String>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| GpuError::CorruptShard {
        path: path.into(),
        message: format!("{e:?}"),
    })?;
    Ok(st.names().into_iter().cloned().collect())
}

/// Copies one tensor out of safetensors bytes.
pub(crate) fn tensor_from_bytes(path: &Path, bytes: &[u8], name: &str) -> Result<Tensor> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| GpuError::CorruptShard {
        path: path.into(),
        message: format!("{e:?}"),
    })?;
    let view = st
        .tensor(name)
        .map_err(|_| GpuError::MissingTensor { name: name.into() })?;
    let kind = kind_of(view.dtype(), name)?;
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
}

impl SafetensorsDir {
    /// Opens `dir/model.safetensors.index.json` if present, else
    /// `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| GpuError::io(&index_path, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| GpuError::Json {
                path: index_path.clone(),
                message: e.to_string(),
            })?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| GpuError::Json {
                    path: index_path.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let names: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for path in files {
            if !path.is_file() {
                return Err(GpuError::MissingShard { path });
            }
            let map = sys::mmap_file(&path)?;
            for name in parse_shard(&path, &map)? {
                index.insert(name, shards.len());
            }
            shards.push(Shard { path, map });
        }
        Ok(SafetensorsDir { shards, index })
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }
}

impl TensorSource for SafetensorsDir {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| GpuError::MissingTensor { name: name.into() })?;
        let shard = &self.shards[i];
        tensor_from_bytes(&shard.path, &shard.map, name)
    }
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// FP4 (E2M1) code points, as GPT-OSS's MXFP4 uses them.
const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Dequantises MXFP4: `blocks` `[.., groups, 16]` u8 (two codes a byte, low
/// nibble first), `scales` `[.., groups]` u8 (exponent + 127). Returns f32
/// `[.., groups * 32]` on the CPU.
pub fn dequant_mxfp4(name: &str, blocks: &Tensor, scales: &Tensor) -> Result<Tensor> {
    let bs = blocks.size();
    let bad = |why: &str| GpuError::Invalid(format!("{name}: {why}"));
    if blocks.kind() != Kind::Uint8 || scales.kind() != Kind::Uint8 {
        return Err(bad("MXFP4 blocks and scales must be u8"));
    }
    if bs.last() != Some(&16) || scales.size() != bs[..bs.len() - 1] {
        return Err(bad("MXFP4 blocks/scales shapes disagree"));
    }
    let b = Vec::<u8>::try_from(&blocks.flatten(0, -1))?;
    let s = Vec::<u8>::try_from(&scales.flatten(0, -1))?;
    let mut out = Vec::with_capacity(b.len() * 2);
    for (g, &scale) in s.iter().enumerate() {
        let factor = 2f32.powi(i32::from(scale) - 127);
        for &byte in &b[g * 16..g * 16 + 16] {
            out.push(FP4_VALUES[usize::from(byte & 0x0f)] * factor);
            out.push(FP4_VALUES[usize::from(byte >> 4)] * factor);
        }
    }
    let mut shape = bs[..bs.len() - 1].to_vec();
    let last = shape.pop().unwrap_or(1);
    shape.push(last * 32);
    Ok(Tensor::from_slice(&out).view(shape.as_slice()))
}
