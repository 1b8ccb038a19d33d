//! The embedded default model: a small Qwen3 with random weights generated
//! deterministically from a seed, and the byte-level tokenizer, so that
//! everything runs with no download.

use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use crate::config::{Arch, ModelConfig};
use crate::error::{GpuError, Result};
use crate::rng::SplitMix64;
use crate::tokenizer::byte_level_tokenizer_json;

/// Seed of the embedded model.
pub const DEFAULT_SEED: u64 = 0x00B1_7A11;
/// `<|endoftext|>` in the byte-level vocabulary.
pub const EOS_ID: i64 = 256;

/// The embedded model's shape: 4 layers, hidden 128, vocabulary of 256 bytes
/// plus end-of-text (padded to 272).
pub fn default_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Qwen3,
        vocab_size: 272,
        hidden_size: 128,
        intermediate_size: 384,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        attention_bias: false,
        eos_token_ids: vec![EOS_ID],
        moe: None,
        gpt_oss: None,
        yarn: None,
        sliding_window: None,
        layer_sliding: vec![false; 4],
    }
}

/// Seed of the embedded Qwen3-MoE model.
pub const MOE_SEED: u64 = 0x00B1_7A12;

/// The embedded Qwen3-MoE model (RT-PIPE-8: experts spread over nodes):
/// the default model's shape with every MLP a mixture of 8 experts, top 2,
/// renormalised (Qwen3-MoE's routing).
pub fn moe_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Qwen3Moe,
        moe: Some(crate::config::MoeConfig {
            num_experts: 8,
            num_experts_per_tok: 2,
            moe_intermediate_size: 96,
            norm_topk_prob: true,
            decoder_sparse_step: 1,
            mlp_only_layers: Vec::new(),
        }),
        ..default_config()
    }
}

/// Random weights for `cfg` in transformers' names: normal(0, 0.02) matrices
/// (0.1 for the embedding), norms around 1. `f32`, on the CPU.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = SplitMix64::new(seed);
    let mut out = BTreeMap::new();
    let mut put = |name: String, shape: &[i64], mean: f64, std: f64| {
        let n: i64 = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| (mean + std * rng.next_normal()) as f32)
            .collect();
        out.insert(name, Tensor::from_slice(&data).view(shape));
    };
    let (h, hd, nh, nkv, inter, vocab) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    put("model.embed_tokens.weight".into(), &[vocab, h], 0.0, 0.1);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}.");
        put(format!("{p}input_layernorm.weight"), &[h], 1.0, 0.1);
        put(
            format!("{p}self_attn.q_proj.weight"),
            &[nh * hd, h],
            0.0,
            0.02 * 4.0,
        );
        put(
            format!("{p}self_attn.k_proj.weight"),
            &[nkv * hd, h],
            0.0,
            0.02 * 4.0,
        );
        put(
            format!("{p}self_attn.v_proj.weight"),
            &[nkv * hd, h],
            0.0,
            0.02 * 4.0,
        );
        put(
            format!("{p}self_attn.o_proj.weight"),
            &[h, nh * hd],
            0.0,
            0.02 * 4.0,
        );
        put(format!("{p}self_attn.q_norm.weight"), &[hd], 1.0, 0.1);
        put(format!("{p}self_attn.k_norm.weight"), &[hd], 1.0, 0.1);
        if cfg.attention_bias {
            put(format!("{p}self_attn.q_proj.bias"), &[nh * hd], 0.0, 0.02);
            put(format!("{p}self_attn.k_proj.bias"), &[nkv * hd], 0.0, 0.02);
            put(format!("{p}self_attn.v_proj.bias"), &[nkv * hd], 0.0, 0.02);
            put(format!("{p}self_attn.o_proj.bias"), &[h], 0.0, 0.02);
        }
        put(
            format!("{p}post_attention_layernorm.weight"),
            &[h],
            1.0,
            0.1,
        );
        match &cfg.moe {
            Some(m) if cfg.is_moe_layer(i) => {
                // The router a little sharper than the experts, so tokens
                // spread over several experts.
                put(format!("{p}mlp.gate.weight"), &[m.num_experts, h], 0.0, 0.5);
                let mi = m.moe_intermediate_size;
                for e in 0..m.num_experts {
                    let q = format!("{p}mlp.experts.{e}.");
                    put(format!("{q}gate_proj.weight"), &[mi, h], 0.0, 0.02 * 4.0);
                    put(format!("{q}up_proj.weight"), &[mi, h], 0.0, 0.02 * 4.0);
                    put(format!("{q}down_proj.weight"), &[h, mi], 0.0, 0.02 * 4.0);
                }
            }
            _ => {
                put(
                    format!("{p}mlp.gate_proj.weight"),
                    &[inter, h],
                    0.0,
                    0.02 * 4.0,
                );
                put(
                    format!("{p}mlp.up_proj.weight"),
                    &[inter, h],
                    0.0,
                    0.02 * 4.0,
                );
                put(
                    format!("{p}mlp.down_proj.weight"),
                    &[h, inter],
                    0.0,
                    0.02 * 4.0,
                );
            }
        }
    }
    put("model.norm.weight".into(), &[h], 1.0, 0.1);
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[vocab, h], 0.0, 0.1);
    }
    out
}

/// Writes the embedded model as a Hugging Face directory (`config.json`,
/// `model.safetensors`, `tokenizer.json`).
pub fn write_default_model(dir: &Path) -> Result<()> {
    let cfg = default_config();
    write_hf_dir(dir, &cfg, &random_weights(&cfg, DEFAULT_SEED))?;
    let tok = serde_json::to_string(&byte_level_tokenizer_json(EOS_ID)).expect("json");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tok).map_err(|e| GpuError::io(&path, e))
}

/// Writes the embedded Qwen3-MoE model ([`moe_config`]) as a Hugging Face
/// directory, with the default model's tokenizer.
pub fn write_moe_model(dir: &Path) -> Result<()> {
    let cfg = moe_config();
    write_hf_dir(dir, &cfg, &random_weights(&cfg, MOE_SEED))?;
    let tok = serde_json::to_string(&byte_level_tokenizer_json(EOS_ID)).expect("json");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tok).map_err(|e| GpuError::io(&path, e))
}

/// Writes `config.json` and a single `model.safetensors`.
pub fn write_hf_dir(
    dir: &Path,
    cfg: &ModelConfig,
    weights: &BTreeMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| GpuError::io(dir, e))?;
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg.to_json()).expect("json");
    std::fs::write(&path, text).map_err(|e| GpuError::io(&path, e))?;
    let list: Vec<(&str, &Tensor)> = weights.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&list, dir.join("model.safetensors"))?;
    Ok(())
}
