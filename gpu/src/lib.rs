//! Blyan's inference engine: Qwen3 from Hugging Face checkpoints on
//! tch/libtorch, CPU and CUDA, f32 and bf16, checked against transformers.
//!
//! What it does:
//! - loads `config.json` (transformers 4.x and 5.x forms), safetensors
//!   (single file or sharded with an index) and `tokenizer.json`
//!   ([`config`], [`weights`], [`tokenizer`]);
//! - runs the reference forward pass with a KV cache, any layer range
//!   ([`model`]), and generation with seeded sampling and stop strings
//!   ([`generate`], [`sample`]);
//! - on CUDA, a static-cache decode step over many sequences at once
//!   (continuous batching), replayed as a CUDA graph ([`engine`]);
//! - an embedded default model with random weights ([`default_model`]).
//!
//! - splits a checkpoint into content-addressed blocks (SHA3-256, CIDv1)
//!   and loads them memory-mapped ([`blocks`]).
//! - compresses weight updates into INT8 sparse delta payloads and applies
//!   them to a head ([`delta`], spec/pol.md POL-DELTA-*).
//! - trains a delta for one layer and measures validation loss ([`pol`],
//!   spec/pol.md POL-TRAIN-*, POL-EVAL-*).
//!
//! What it does not do (yet): Qwen3-MoE and GPT-OSS (the config loader
//! rejects them with `UnsupportedArchitecture`).
//!
//! `unsafe` lives only in `sys` (mmap and the CUDA-graph FFI).

pub mod batch;
pub mod blocks;
pub mod config;
pub mod default_model;
pub mod delta;
pub mod engine;
pub mod error;
pub mod generate;
pub mod model;
pub mod pol;
pub mod rng;
pub mod sample;
pub mod stage;
mod sys;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

use tch::{Device, Kind};

pub use crate::error::{GpuError, Result};
pub use crate::sys::{CUDA_GRAPH_AVAILABLE, cuda_synchronize, set_blas_backend};

/// A model and its tokenizer, ready to run.
pub struct LoadedModel {
    pub model: model::Qwen3,
    pub tokenizer: Option<tokenizer::Tokenizer>,
}

/// Parses `cpu`, `cuda` or `cuda:N`, checking that CUDA is there.
pub fn parse_device(s: &str) -> Result<Device> {
    let device = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => return Err(GpuError::Invalid(format!("unknown device {other:?}"))),
        },
    };
    if device != Device::Cpu && !tch::Cuda::is_available() {
        return Err(GpuError::CudaUnavailable);
    }
    Ok(device)
}

/// Parses `f32` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        other => Err(GpuError::Invalid(format!(
            "unknown dtype {other:?} (f32, bf16)"
        ))),
    }
}

impl LoadedModel {
    /// Loads a Hugging Face directory, or the embedded default model if `dir` is `None`.
    pub fn load(dir: Option<&Path>, device: Device, kind: Kind) -> Result<Self> {
        Self::load_range(dir, device, kind, None)
    }

    /// The tokenizer [`LoadedModel::load`] would load with the model, alone.
    pub fn load_tokenizer(dir: Option<&Path>) -> Result<Option<tokenizer::Tokenizer>> {
        match dir {
            Some(dir) if dir.join("tokenizer.json").is_file() => {
                Ok(Some(tokenizer::Tokenizer::from_dir(dir)?))
            }
            Some(_) => Ok(None),
            None => {
                let tok = tokenizer::byte_level_tokenizer_json(default_model::EOS_ID);
                Ok(Some(tokenizer::Tokenizer::from_json(&tok)?))
            }
        }
    }

    /// Like [`LoadedModel::load`], holding only layers `first..=last` when
    /// `layers` is given (a pipeline stage: the embedding only if `first`
    /// is 0, the final norm and head only if `last` is the last layer).
    pub fn load_range(
        dir: Option<&Path>,
        device: Device,
        kind: Kind,
        layers: Option<(u32, u32)>,
    ) -> Result<Self> {
        Self::load_held(dir, device, kind, layers, None)
    }

    /// Like [`LoadedModel::load_range`], holding only the listed experts of
    /// each MoE layer when `experts` is given (RT-PIPE-8).
    pub fn load_held(
        dir: Option<&Path>,
        device: Device,
        kind: Kind,
        layers: Option<(u32, u32)>,
        experts: Option<&[i64]>,
    ) -> Result<Self> {
        let range_of = |cfg: &config::ModelConfig| model::LayerRange::select(cfg, layers);
        match dir {
            Some(dir) if dir.join("manifest.json").is_file() => {
                let mut store = blocks::BlockStore::open(dir)?;
                store.load_all()?;
                let cfg = store.model_config()?;
                let range = range_of(&cfg)?;
                let model = model::Qwen3::load_experts(&cfg, &store, range, experts, device, kind)?;
                let tokenizer = if dir.join("tokenizer.json").is_file() {
                    Some(tokenizer::Tokenizer::from_dir(dir)?)
                } else {
                    None
                };
                Ok(LoadedModel { model, tokenizer })
            }
            Some(dir) => {
                let cfg = config::ModelConfig::from_dir(dir)?;
                let src = weights::SafetensorsDir::open(dir)?;
                let range = range_of(&cfg)?;
                let model = model::Qwen3::load_experts(&cfg, &src, range, experts, device, kind)?;
                let tokenizer = if dir.join("tokenizer.json").is_file() {
                    Some(tokenizer::Tokenizer::from_dir(dir)?)
                } else {
                    None
                };
                Ok(LoadedModel { model, tokenizer })
            }
            None => {
                let cfg = default_model::default_config();
                let src = default_model::random_weights(&cfg, default_model::DEFAULT_SEED);
                let range = range_of(&cfg)?;
                let model = model::Qwen3::load_experts(&cfg, &src, range, experts, device, kind)?;
                let tok = tokenizer::byte_level_tokenizer_json(default_model::EOS_ID);
                Ok(LoadedModel {
                    model,
                    tokenizer: Some(tokenizer::Tokenizer::from_json(&tok)?),
                })
            }
        }
    }
}
