//! `config.json` as written by transformers 4.x (`rope_theta`, `rope_scaling`)
//! and 5.x (`rope_parameters`), reduced to what the engine needs.

use std::path::Path;

use serde_json::Value;

use crate::error::{GpuError, Result};

/// The architectures the engine knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `Qwen3ForCausalLM`: dense Qwen3.
    Qwen3,
    /// `Qwen3MoeForCausalLM`: Qwen3 with mixture-of-experts MLPs.
    Qwen3Moe,
    /// `GptOssForCausalLM`: attention sinks, alternating sliding window,
    /// YaRN, biases, clamped SwiGLU experts (plain or MXFP4).
    GptOss,
}

/// YaRN RoPE scaling (transformers' `_compute_yarn_parameters`).
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub original_max_position_embeddings: f64,
    pub truncate: bool,
    /// Scale on cos/sin; `None`: `0.1 ln(factor) + 1`.
    pub attention_factor: Option<f64>,
}

/// GPT-OSS specifics.
#[derive(Clone, Debug, PartialEq)]
pub struct GptOssConfig {
    pub num_experts: i64,
    pub experts_per_token: i64,
    pub swiglu_limit: f64,
    pub swiglu_alpha: f64,
}

/// Mixture-of-experts settings (Qwen3-MoE).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: i64,
    pub num_experts_per_tok: i64,
    pub moe_intermediate_size: i64,
    /// Renormalise the top-k routing weights to sum to 1.
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: i64,
    /// Layers that keep a dense MLP of `intermediate_size`.
    pub mlp_only_layers: Vec<i64>,
}

/// Model hyper-parameters, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// Token ids that end a generation (from `eos_token_id`).
    pub eos_token_ids: Vec<i64>,
    /// Present for Qwen3-MoE.
    pub moe: Option<MoeConfig>,
    /// Present for GPT-OSS.
    pub gpt_oss: Option<GptOssConfig>,
    pub yarn: Option<Yarn>,
    pub sliding_window: Option<i64>,
    /// Per layer: whether it uses the sliding window.
    pub layer_sliding: Vec<bool>,
}

fn get_i64(v: &Value, key: &str) -> Result<i64> {
    v.get(key)
        .and_then(Value::as_i64)
        .ok_or_else(|| GpuError::Config(format!("missing or non-integer `{key}`")))
}

fn opt_i64(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| GpuError::io(&path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            GpuError::Json { message, .. } => GpuError::Json { path, message },
            other => other,
        })
    }

    /// Parses a `config.json` document.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| GpuError::Json {
            path: "config.json".into(),
            message: e.to_string(),
        })?;
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let architecture = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let arch = match (architecture.as_str(), model_type.as_str()) {
            ("Qwen3ForCausalLM", _) | ("", "qwen3") => Arch::Qwen3,
            ("Qwen3MoeForCausalLM", _) | ("", "qwen3_moe") => Arch::Qwen3Moe,
            ("GptOssForCausalLM", _) | ("", "gpt_oss") => Arch::GptOss,
            _ => {
                return Err(GpuError::UnsupportedArchitecture {
                    architecture,
                    model_type,
                });
            }
        };
        let hidden_size = get_i64(&v, "hidden_size")?;
        let num_attention_heads = get_i64(&v, "num_attention_heads")?;
        let num_key_value_heads = opt_i64(&v, "num_key_value_heads").unwrap_or(num_attention_heads);
        let head_dim = opt_i64(&v, "head_dim").unwrap_or(hidden_size / num_attention_heads.max(1));
        // transformers 5.x: rope_parameters = {rope_theta, rope_type, ...};
        // 4.x: top-level rope_theta and rope_scaling.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = rope_params
            .and_then(|p| opt_f64(p, "rope_theta"))
            .or_else(|| opt_f64(&v, "rope_theta"))
            .unwrap_or(10_000.0);
        let rope_type = rope_params
            .or_else(|| v.get("rope_scaling").filter(|p| p.is_object()))
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let yarn = match rope_type {
            "default" => None,
            "yarn" => {
                let p = rope_params
                    .or_else(|| v.get("rope_scaling").filter(|p| p.is_object()))
                    .expect("rope_type came from this object");
                let factor = opt_f64(p, "factor")
                    .ok_or_else(|| GpuError::Config("yarn without `factor`".into()))?;
                Some(Yarn {
                    factor,
                    beta_fast: opt_f64(p, "beta_fast").unwrap_or(32.0),
                    beta_slow: opt_f64(p, "beta_slow").unwrap_or(1.0),
                    original_max_position_embeddings: opt_f64(
                        p,
                        "original_max_position_embeddings",
                    )
                    .ok_or_else(|| {
                        GpuError::Config("yarn without `original_max_position_embeddings`".into())
                    })?,
                    truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                    attention_factor: opt_f64(p, "attention_factor"),
                })
            }
            other => {
                return Err(GpuError::Config(format!(
                    "rope_type {other:?} is not supported for {architecture}"
                )));
            }
        };
        let num_hidden_layers = get_i64(&v, "num_hidden_layers")?;
        let gpt_oss = if arch == Arch::GptOss {
            Some(GptOssConfig {
                num_experts: opt_i64(&v, "num_local_experts")
                    .or_else(|| opt_i64(&v, "num_experts"))
                    .ok_or_else(|| GpuError::Config("missing `num_local_experts`".into()))?,
                experts_per_token: opt_i64(&v, "num_experts_per_tok")
                    .or_else(|| opt_i64(&v, "experts_per_token"))
                    .ok_or_else(|| GpuError::Config("missing `num_experts_per_tok`".into()))?,
                swiglu_limit: opt_f64(&v, "swiglu_limit").unwrap_or(7.0),
                swiglu_alpha: opt_f64(&v, "swiglu_alpha").unwrap_or(1.702),
            })
        } else {
            None
        };
        // Sliding window: GPT-OSS alternates (layer_types, default even
        // layers sliding); Qwen3 only with use_sliding_window, unsupported.
        let sliding_window = if arch == Arch::GptOss {
            opt_i64(&v, "sliding_window")
        } else {
            None
        };
        if arch != Arch::GptOss
            && v.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
        {
            return Err(GpuError::Config(
                "use_sliding_window is not supported for Qwen3".into(),
            ));
        }
        let layer_sliding: Vec<bool> = match v.get("layer_types").and_then(Value::as_array) {
            Some(types) if sliding_window.is_some() => types
                .iter()
                .map(|t| t.as_str() == Some("sliding_attention"))
                .collect(),
            _ if sliding_window.is_some() => (0..num_hidden_layers).map(|i| i % 2 == 0).collect(),
            _ => vec![false; num_hidden_layers.max(0) as usize],
        };
        if layer_sliding.len() as i64 != num_hidden_layers {
            return Err(GpuError::Config(
                "layer_types does not list every layer".into(),
            ));
        }
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
            _ => Vec::new(),
        };
        let moe = if arch == Arch::Qwen3Moe {
            Some(MoeConfig {
                // transformers 4.x writes `num_experts`, 5.x `num_local_experts`.
                num_experts: opt_i64(&v, "num_experts")
                    .or_else(|| opt_i64(&v, "num_local_experts"))
                    .ok_or_else(|| GpuError::Config("missing `num_experts`".into()))?,
                num_experts_per_tok: get_i64(&v, "num_experts_per_tok")?,
                moe_intermediate_size: get_i64(&v, "moe_intermediate_size")?,
                norm_topk_prob: v
                    .get("norm_topk_prob")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                decoder_sparse_step: opt_i64(&v, "decoder_sparse_step").unwrap_or(1),
                mlp_only_layers: v
                    .get("mlp_only_layers")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_i64).collect())
                    .unwrap_or_default(),
            })
        } else {
            None
        };
        let cfg = ModelConfig {
            moe,
            gpt_oss,
            yarn,
            sliding_window,
            layer_sliding,
            arch,
            vocab_size: get_i64(&v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_i64(&v, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(&v, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: opt_i64(&v, "max_position_embeddings").unwrap_or(32_768),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: v
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(arch == Arch::GptOss),
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in positive {
            if value <= 0 {
                return Err(GpuError::Config(format!(
                    "`{name}` must be positive, got {value}"
                )));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(GpuError::Config(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if let Some(m) = &self.moe
            && (m.num_experts < 1
                || !(1..=m.num_experts).contains(&m.num_experts_per_tok)
                || m.moe_intermediate_size < 1
                || m.decoder_sparse_step < 1)
        {
            return Err(GpuError::Config(format!(
                "invalid mixture-of-experts settings {m:?}"
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(GpuError::Config(format!(
                "head_dim {} is odd",
                self.head_dim
            )));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err(GpuError::Config(
                "rms_norm_eps and rope_theta must be positive".into(),
            ));
        }
        Ok(())
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them, f32 as transformers
    /// computes them) and the scale applied to cos/sin (YaRN's attention
    /// factor; 1 otherwise).
    pub fn rope_inv_freq(&self) -> (Vec<f32>, f64) {
        let dim = self.head_dim as f64;
        let base = self.rope_theta;
        let pos_freq = |i: i64| base.powf((2 * i) as f64 / dim);
        let half = self.head_dim / 2;
        let Some(y) = &self.yarn else {
            return ((0..half).map(|i| (1.0 / pos_freq(i)) as f32).collect(), 1.0);
        };
        let correction = |rot: f64| {
            (dim * (y.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln())
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (correction(y.beta_fast), correction(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001;
        }
        let inv = (0..half)
            .map(|i| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                let extra = 1.0 / pos_freq(i);
                let inter = 1.0 / (y.factor * pos_freq(i));
                (inter * (1.0 - extrapolation_factor) + extra * extrapolation_factor) as f32
            })
            .collect();
        let scale = y.attention_factor.unwrap_or(if y.factor <= 1.0 {
            1.0
        } else {
            0.1 * y.factor.ln() + 1.0
        });
        (inv, scale)
    }

    /// Whether layer `i` has a mixture-of-experts MLP (transformers' rule).
    pub fn is_moe_layer(&self, i: i64) -> bool {
        match &self.moe {
            Some(m) => !m.mlp_only_layers.contains(&i) && (i + 1) % m.decoder_sparse_step == 0,
            None => false,
        }
    }

    /// Serialises the config in transformers 4.x form (used for the embedded
    /// models; Qwen3 or Qwen3-MoE).
    pub fn to_json(&self) -> Value {
        let (arch, model_type) = match self.moe {
            Some(_) => ("Qwen3MoeForCausalLM", "qwen3_moe"),
            None => ("Qwen3ForCausalLM", "qwen3"),
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "eos_token_id": self.eos_token_ids,
            "torch_dtype": "float32",
        });
        if let Some(m) = &self.moe {
            let extra = serde_json::json!({
                "num_experts": m.num_experts,
                "num_experts_per_tok": m.num_experts_per_tok,
                "moe_intermediate_size": m.moe_intermediate_size,
                "norm_topk_prob": m.norm_topk_prob,
                "decoder_sparse_step": m.decoder_sparse_step,
                "mlp_only_layers": m.mlp_only_layers,
            });
            let obj = v.as_object_mut().expect("an object");
            for (k, x) in extra.as_object().expect("an object") {
                obj.insert(k.clone(), x.clone());
            }
        }
        v
    }

    /// Qwen3-8B's shape (from its Hugging Face config), used by the GPU bench.
    pub fn qwen3_8b() -> Self {
        ModelConfig {
            arch: Arch::Qwen3,
            vocab_size: 151_936,
            hidden_size: 4096,
            intermediate_size: 12_288,
            num_hidden_layers: 36,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40_960,
            tie_word_embeddings: false,
            attention_bias: false,
            eos_token_ids: vec![151_645],
            moe: None,
            gpt_oss: None,
            yarn: None,
            sliding_window: None,
            layer_sliding: vec![false; 36],
        }
    }
}
