//! Qwen3 (dense) as transformers' `Qwen3ForCausalLM` computes it: the
//! reference forward pass, any sequence length, with a growing KV cache.
//! Used for `logits`, prefill and CPU generation; the CUDA decode path in
//! `engine.rs` is checked against it.

use tch::{Device, Kind, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::error::{GpuError, Result};
use crate::weights::TensorSource;

/// One decoder layer's weights (transformers' names in comments).
pub struct Layer {
    /// `input_layernorm.weight`
    pub ln1: Tensor,
    /// `self_attn.{q,k,v,o}_proj.weight`
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    /// `self_attn.{q,k,v,o}_proj.bias` (only with `attention_bias`)
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub bo: Option<Tensor>,
    /// `self_attn.{q,k}_norm.weight` (RMSNorm per head, before RoPE; Qwen3)
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// `self_attn.sinks` (one logit per head joined to the softmax; GPT-OSS)
    pub sinks: Option<Tensor>,
    /// Whether this layer attends over a sliding window only.
    pub sliding: bool,
    /// `post_attention_layernorm.weight`
    pub ln2: Tensor,
    pub mlp: Mlp,
}

/// One SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
pub struct Expert {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

impl Expert {
    fn forward(&self, x: &Tensor) -> Tensor {
        (x.linear(&self.gate, None::<Tensor>).silu() * x.linear(&self.up, None::<Tensor>))
            .linear(&self.down, None::<Tensor>)
    }
}

/// A GPT-OSS expert: `x @ gate_up + b` with gate/up columns interleaved,
/// `gate.clamp(max=limit)`, `up.clamp(-limit, limit)`,
/// `(up + 1) * gate * sigmoid(alpha * gate)`, then `@ down + b`.
pub struct ClampedExpert {
    /// `[hidden, 2 * inter]`
    pub gate_up: Tensor,
    pub gate_up_bias: Tensor,
    /// `[inter, hidden]`
    pub down: Tensor,
    pub down_bias: Tensor,
    pub limit: f64,
    pub alpha: f64,
}

impl ClampedExpert {
    fn forward(&self, x: &Tensor) -> Tensor {
        let gu = x.matmul(&self.gate_up) + &self.gate_up_bias;
        let gate = gu.slice(-1, 0, None, 2).clamp_max(self.limit);
        let up = gu.slice(-1, 1, None, 2).clamp(-self.limit, self.limit);
        let glu = &gate * (&gate * self.alpha).sigmoid();
        ((up + 1.0) * glu).matmul(&self.down) + &self.down_bias
    }
}

/// One expert of either kind.
pub enum AnyExpert {
    Swiglu(Expert),
    Clamped(ClampedExpert),
}

impl AnyExpert {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            AnyExpert::Swiglu(e) => e.forward(x),
            AnyExpert::Clamped(e) => e.forward(x),
        }
    }

    /// The same expert sharing this one's weights.
    fn shallow(&self) -> AnyExpert {
        match self {
            AnyExpert::Swiglu(e) => AnyExpert::Swiglu(Expert {
                gate: e.gate.shallow_clone(),
                up: e.up.shallow_clone(),
                down: e.down.shallow_clone(),
            }),
            AnyExpert::Clamped(e) => AnyExpert::Clamped(ClampedExpert {
                gate_up: e.gate_up.shallow_clone(),
                gate_up_bias: e.gate_up_bias.shallow_clone(),
                down: e.down.shallow_clone(),
                down_bias: e.down_bias.shallow_clone(),
                limit: e.limit,
                alpha: e.alpha,
            }),
        }
    }
}

/// RT-PIPE-8: computes experts a stage does not hold (on the nodes that
/// do): for MoE layer `layer` (the model's numbering), each `(expert,
/// rows)` of `work` (rows `[tokens, hidden]` already normalised) gives that
/// expert's unweighted output for the rows, in the order of `work`.
pub trait RemoteExperts {
    fn compute(&mut self, layer: i64, work: Vec<(i64, Tensor)>) -> Result<Vec<Tensor>>;
}

/// What a forward pass does about MoE layers: experts not held here go to
/// `remote` (none: an `ExpertNotHeld` error), and every `(layer, expert)`
/// that some token was routed to is added to `used`.
#[derive(Default)]
pub struct MoeContext<'a> {
    pub remote: Option<&'a mut dyn RemoteExperts>,
    pub used: std::collections::BTreeSet<(i64, i64)>,
}

/// RT-PIPE-8: the experts a model instance holds, sharing its weights, for
/// serving other stages' expert calls off the engine's thread.
pub struct ExpertBank {
    start: i64,
    device: Device,
    kind: Kind,
    hidden: i64,
    /// Per layer of the range: the experts (empty for a dense layer).
    layers: Vec<Vec<Option<AnyExpert>>>,
}

// Moved to whichever thread serves expert calls (tch tensors are `Send`,
// not `Sync`: one thread uses a bank at a time).
const _: () = {
    const fn send<T: Send>() {}
    send::<ExpertBank>();
};

impl ExpertBank {
    /// Whether expert `expert` of layer `layer` (the model's numbering) is held.
    pub fn holds(&self, layer: i64, expert: i64) -> bool {
        self.expert(layer, expert).is_some()
    }

    fn expert(&self, layer: i64, expert: i64) -> Option<&AnyExpert> {
        let l = usize::try_from(layer - self.start).ok()?;
        let e = usize::try_from(expert).ok()?;
        self.layers.get(l)?.get(e)?.as_ref()
    }

    /// The model's hidden size and dtype (what expert rows must have).
    pub fn hidden(&self) -> i64 {
        self.hidden
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn device(&self) -> Device {
        self.device
    }

    /// Expert `expert` of layer `layer` on `rows` (`[tokens, hidden]`):
    /// the unweighted output, as a stage holding it computes it.
    pub fn forward(&self, layer: i64, expert: i64, rows: &Tensor) -> Result<Tensor> {
        let e = self
            .expert(layer, expert)
            .ok_or(GpuError::ExpertNotHeld { layer, expert })?;
        let size = rows.size();
        if size.len() != 2 || size[1] != self.hidden {
            return Err(GpuError::Invalid(format!(
                "expert rows of shape {size:?}, not [tokens, {}]",
                self.hidden
            )));
        }
        let _guard = tch::no_grad_guard();
        Ok(e.forward(&rows.to_device(self.device).to_kind(self.kind)))
    }
}

/// How router logits become expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Qwen3-MoE: softmax over all experts (f32), top-k, optionally renormalise.
    SoftmaxTopK { norm_topk_prob: bool },
    /// GPT-OSS: top-k of the logits, softmax over those k.
    TopKSoftmax,
}

/// A layer's feed-forward part.
pub enum Mlp {
    /// `mlp.{gate,up,down}_proj.weight`
    Dense(Expert),
    /// Mixture of experts: router `[experts, hidden]` (Qwen3-MoE
    /// `mlp.gate.weight`; GPT-OSS `mlp.router.{weight,bias}`) and the experts,
    /// `None` for experts this instance does not hold.
    Moe {
        router: Tensor,
        router_bias: Option<Tensor>,
        experts: Vec<Option<AnyExpert>>,
        top_k: i64,
        routing: Routing,
    },
}

/// Which part of the network a model instance holds (pipeline stages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerRange {
    pub start: i64,
    pub end: i64,
    /// Holds `embed_tokens` (takes token ids rather than hidden states).
    pub embed: bool,
    /// Holds the final norm and `lm_head` (returns logits).
    pub head: bool,
}

impl LayerRange {
    /// The whole model.
    pub fn full(cfg: &ModelConfig) -> Self {
        LayerRange {
            start: 0,
            end: cfg.num_hidden_layers,
            embed: true,
            head: true,
        }
    }

    /// Layers `first..=last` as a pipeline stage (the embedding only if
    /// `first` is 0, the final norm and head only if `last` is the last
    /// layer); `None`: the whole model.
    pub fn select(cfg: &ModelConfig, layers: Option<(u32, u32)>) -> crate::Result<Self> {
        let Some((first, last)) = layers else {
            return Ok(LayerRange::full(cfg));
        };
        let (first, last) = (i64::from(first), i64::from(last));
        if first > last || last >= cfg.num_hidden_layers {
            return Err(GpuError::Invalid(format!(
                "layers {first}..={last} outside the model's 0..{}",
                cfg.num_hidden_layers
            )));
        }
        Ok(LayerRange {
            start: first,
            end: last + 1,
            embed: first == 0,
            head: last + 1 == cfg.num_hidden_layers,
        })
    }
}

/// A Qwen3 model (or a contiguous slice of it) on one device, in one dtype.
pub struct Qwen3 {
    pub cfg: ModelConfig,
    pub device: Device,
    pub kind: Kind,
    pub range: LayerRange,
    pub embed: Option<Tensor>,
    pub layers: Vec<Layer>,
    pub norm: Option<Tensor>,
    pub lm_head: Option<Tensor>,
    inv_freq: Tensor,
    /// YaRN's scale on cos/sin (1 without YaRN).
    rope_scale: f64,
}

/// Per-sequence attention cache of the reference path: `[batch, kv_heads, len, head_dim]` per layer.
#[derive(Default)]
pub struct KvCache {
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    /// Number of positions already cached.
    pub len: i64,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }
    /// The cached keys and values of layer `i` (relative to the model's range).
    pub fn layer(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        match (self.k.get(i), self.v.get(i)) {
            (Some(Some(k)), Some(Some(v))) => Some((k, v)),
            _ => None,
        }
    }
}

fn load(
    src: &dyn TensorSource,
    name: &str,
    shape: &[i64],
    device: Device,
    kind: Kind,
) -> Result<Tensor> {
    let t = src.tensor(name)?;
    if t.size() != shape {
        return Err(GpuError::ShapeMismatch {
            name: name.into(),
            actual: t.size(),
            expected: shape.to_vec(),
        });
    }
    Ok(t.f_to_kind(kind)?.f_to_device(device)?)
}

/// GPT-OSS's MoE MLP of the layer with prefix `p`: router with bias, and
/// the experts as `mlp.experts.{gate_up_proj,down_proj}` (+ `_bias`) either
/// plain (`[E, hidden, 2 inter]`, `[E, inter, hidden]`) or MXFP4
/// (`_blocks` + `_scales`), dequantised here.
fn load_gpt_oss_mlp(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    p: &str,
    keep: Option<&[i64]>,
    device: Device,
    kind: Kind,
) -> Result<Mlp> {
    let go = cfg.gpt_oss.as_ref().expect("GPT-OSS config");
    let (e, h, inter) = (go.num_experts, cfg.hidden_size, cfg.intermediate_size);
    let ld = |name: &str, shape: &[i64]| load(src, name, shape, device, kind);
    let x = format!("{p}mlp.experts.");
    let matrix = |name: &str, rows: i64, cols: i64| -> Result<Tensor> {
        // Parameter layout [E, cols_in, rows_out]; MXFP4 stores [E, rows_out, cols_in].
        let blocks = format!("{x}{name}_blocks");
        if src.contains(&blocks) {
            let b = src.tensor(&blocks)?;
            let s = src.tensor(&format!("{x}{name}_scales"))?;
            let expected = [e, rows, cols / 32, 16];
            if b.size() != expected {
                return Err(GpuError::ShapeMismatch {
                    name: blocks,
                    actual: b.size(),
                    expected: expected.to_vec(),
                });
            }
            let w = crate::weights::dequant_mxfp4(&blocks, &b, &s)?.view([e, rows, cols]);
            Ok(w.transpose(1, 2)
                .to_kind(kind)
                .to_device(device)
                .contiguous())
        } else {
            ld(&format!("{x}{name}"), &[e, cols, rows])
        }
    };
    let gate_up = matrix("gate_up_proj", 2 * inter, h)?;
    let down = matrix("down_proj", h, inter)?;
    let gate_up_bias = ld(&format!("{x}gate_up_proj_bias"), &[e, 2 * inter])?;
    let down_bias = ld(&format!("{x}down_proj_bias"), &[e, h])?;
    let experts = (0..e)
        .map(|i| {
            if keep.is_some_and(|k| !k.contains(&i)) {
                return None;
            }
            Some(AnyExpert::Clamped(ClampedExpert {
                gate_up: gate_up.get(i),
                gate_up_bias: gate_up_bias.get(i),
                down: down.get(i),
                down_bias: down_bias.get(i),
                limit: go.swiglu_limit,
                alpha: go.swiglu_alpha,
            }))
        })
        .collect();
    Ok(Mlp::Moe {
        router: ld(&format!("{p}mlp.router.weight"), &[e, h])?,
        router_bias: Some(ld(&format!("{p}mlp.router.bias"), &[e])?),
        experts,
        top_k: go.experts_per_token,
        routing: Routing::TopKSoftmax,
    })
}

/// transformers' `Qwen3RMSNorm`: normalise in f32, cast back, then scale.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.square().mean_dim(-1, true, Kind::Float);
    let normed = xf * (var + eps).rsqrt();
    weight * normed.to_kind(kind)
}

/// `rotate_half` RoPE: `x * cos + rotate_half(x) * sin`, with `cos`/`sin`
/// broadcastable to `x` (`[.., seq, head_dim]`).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    let rotated = Tensor::cat(&[x2.neg(), x1], -1);
    x * cos + rotated * sin
}

impl Qwen3 {
    /// Loads the layers in `range` from `src`, converting to `kind` on `device`.
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn TensorSource,
        range: LayerRange,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        Self::load_experts(cfg, src, range, None, device, kind)
    }

    /// As `load`, holding only the listed experts of each MoE layer (all if
    /// `None`). Routing to an expert not held is an `ExpertNotHeld` error;
    /// `moe_partial` runs a subset explicitly.
    pub fn load_experts(
        cfg: &ModelConfig,
        src: &dyn TensorSource,
        range: LayerRange,
        experts: Option<&[i64]>,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        if !(0 <= range.start && range.start <= range.end && range.end <= cfg.num_hidden_layers) {
            return Err(GpuError::Invalid(format!(
                "layer range {}..{} outside 0..{}",
                range.start, range.end, cfg.num_hidden_layers
            )));
        }
        let (h, hd, nh, nkv, inter, vocab) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let ld = |name: &str, shape: &[i64]| load(src, name, shape, device, kind);
        let embed = if range.embed || (range.head && cfg.tie_word_embeddings) {
            Some(ld("model.embed_tokens.weight", &[vocab, h])?)
        } else {
            None
        };
        let mut layers = Vec::new();
        for i in range.start..range.end {
            let p = format!("model.layers.{i}.");
            let a = format!("{p}self_attn.");
            let bias = |name: &str, n: i64| -> Result<Option<Tensor>> {
                if cfg.attention_bias {
                    Ok(Some(ld(&format!("{a}{name}.bias"), &[n])?))
                } else {
                    Ok(None)
                }
            };
            layers.push(Layer {
                ln1: ld(&format!("{p}input_layernorm.weight"), &[h])?,
                wq: ld(&format!("{a}q_proj.weight"), &[nh * hd, h])?,
                wk: ld(&format!("{a}k_proj.weight"), &[nkv * hd, h])?,
                wv: ld(&format!("{a}v_proj.weight"), &[nkv * hd, h])?,
                wo: ld(&format!("{a}o_proj.weight"), &[h, nh * hd])?,
                bq: bias("q_proj", nh * hd)?,
                bk: bias("k_proj", nkv * hd)?,
                bv: bias("v_proj", nkv * hd)?,
                bo: bias("o_proj", h)?,
                q_norm: match cfg.arch {
                    Arch::GptOss => None,
                    _ => Some(ld(&format!("{a}q_norm.weight"), &[hd])?),
                },
                k_norm: match cfg.arch {
                    Arch::GptOss => None,
                    _ => Some(ld(&format!("{a}k_norm.weight"), &[hd])?),
                },
                sinks: match cfg.arch {
                    Arch::GptOss => Some(ld(&format!("{a}sinks"), &[nh])?),
                    _ => None,
                },
                sliding: cfg.layer_sliding[i as usize],
                ln2: ld(&format!("{p}post_attention_layernorm.weight"), &[h])?,
                mlp: match &cfg.moe {
                    _ if cfg.gpt_oss.is_some() => {
                        load_gpt_oss_mlp(cfg, src, &p, experts, device, kind)?
                    }
                    Some(moe) if cfg.is_moe_layer(i) => {
                        let mi = moe.moe_intermediate_size;
                        let mut list = Vec::with_capacity(moe.num_experts as usize);
                        for e in 0..moe.num_experts {
                            if experts.is_some_and(|keep| !keep.contains(&e)) {
                                list.push(None);
                                continue;
                            }
                            let q = format!("{p}mlp.experts.{e}.");
                            list.push(Some(AnyExpert::Swiglu(Expert {
                                gate: ld(&format!("{q}gate_proj.weight"), &[mi, h])?,
                                up: ld(&format!("{q}up_proj.weight"), &[mi, h])?,
                                down: ld(&format!("{q}down_proj.weight"), &[h, mi])?,
                            })));
                        }
                        Mlp::Moe {
                            router: ld(&format!("{p}mlp.gate.weight"), &[moe.num_experts, h])?,
                            router_bias: None,
                            experts: list,
                            top_k: moe.num_experts_per_tok,
                            routing: Routing::SoftmaxTopK {
                                norm_topk_prob: moe.norm_topk_prob,
                            },
                        }
                    }
                    _ => Mlp::Dense(Expert {
                        gate: ld(&format!("{p}mlp.gate_proj.weight"), &[inter, h])?,
                        up: ld(&format!("{p}mlp.up_proj.weight"), &[inter, h])?,
                        down: ld(&format!("{p}mlp.down_proj.weight"), &[h, inter])?,
                    }),
                },
            });
        }
        let (norm, lm_head) = if range.head {
            let norm = ld("model.norm.weight", &[h])?;
            let head = if cfg.tie_word_embeddings && !src.contains("lm_head.weight") {
                embed
                    .as_ref()
                    .map(Tensor::shallow_clone)
                    .expect("embed loaded when tied")
            } else {
                ld("lm_head.weight", &[vocab, h])?
            };
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        let embed = if range.embed { embed } else { None };
        let (inv_freq, rope_scale) = cfg.rope_inv_freq();
        Ok(Qwen3 {
            rope_scale,
            cfg: cfg.clone(),
            device,
            kind,
            range,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq: Tensor::from_slice(&inv_freq).to_device(device),
        })
    }

    /// `cos`, `sin` tables `[len, head_dim]` (f32, then the model's dtype, as
    /// transformers does) for positions `start..start+len`.
    pub fn rope_tables(&self, start: i64, len: i64) -> (Tensor, Tensor) {
        let pos = Tensor::arange_start(start, start + len, (Kind::Float, self.device));
        let freqs = pos.unsqueeze(1) * self.inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (cos, sin) = (emb.cos(), emb.sin());
        let (cos, sin) = if self.rope_scale == 1.0 {
            (cos, sin)
        } else {
            (cos * self.rope_scale, sin * self.rope_scale)
        };
        (cos.to_kind(self.kind), sin.to_kind(self.kind))
    }

    /// Checks token ids against the vocabulary.
    pub fn check_ids(&self, ids: &[i64]) -> Result<()> {
        for &id in ids {
            if !(0..self.cfg.vocab_size).contains(&id) {
                return Err(GpuError::TokenOutOfRange {
                    id,
                    vocab_size: self.cfg.vocab_size,
                });
            }
        }
        Ok(())
    }

    /// Embeds `ids` (`[batch, seq]`, int64 on any device).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| GpuError::Invalid("this stage holds no embedding".into()))?;
        Ok(Tensor::embedding(
            embed,
            &ids.to_device(self.device),
            -1,
            false,
            false,
        ))
    }

    /// RT-PIPE-8: the experts this instance holds, sharing its weights.
    pub fn expert_bank(&self) -> ExpertBank {
        ExpertBank {
            start: self.range.start,
            device: self.device,
            kind: self.kind,
            hidden: self.cfg.hidden_size,
            layers: self
                .layers
                .iter()
                .map(|l| match &l.mlp {
                    Mlp::Moe { experts, .. } => experts
                        .iter()
                        .map(|e| e.as_ref().map(AnyExpert::shallow))
                        .collect(),
                    Mlp::Dense(_) => Vec::new(),
                })
                .collect(),
        }
    }

    /// Runs this model's layers on hidden states `[batch, seq, hidden]`,
    /// appending to `cache`. Positions are `cache.len..cache.len+seq`.
    pub fn forward_layers(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_layers_moe(x, cache, &mut MoeContext::default())
    }

    /// As `forward_layers`, with MoE layers run as `moe` says.
    pub fn forward_layers_moe(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        moe: &mut MoeContext,
    ) -> Result<Tensor> {
        let (_, s, _) = x.size3().expect("hidden states are [batch, seq, hidden]");
        let past = cache.len;
        let (cos, sin) = self.rope_tables(past, s);
        let mut x = x.shallow_clone();
        if cache.k.len() < self.layers.len() {
            cache.k.resize_with(self.layers.len(), || None);
            cache.v.resize_with(self.layers.len(), || None);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(
                layer,
                i,
                &x,
                &cos,
                &sin,
                past,
                &mut cache.k[i],
                &mut cache.v[i],
                moe,
            )?;
        }
        cache.len += s;
        Ok(x)
    }

    /// Routing of a MoE layer for hidden rows `h` (`[tokens, hidden]`):
    /// returns (expert ids `[tokens, k]`, weights `[tokens, k]` in the
    /// model dtype), in transformers' order of operations for `routing`.
    pub fn route(
        &self,
        router: &Tensor,
        bias: Option<&Tensor>,
        h: &Tensor,
        top_k: i64,
        routing: Routing,
    ) -> (Tensor, Tensor) {
        let logits = h.linear(router, bias);
        match routing {
            Routing::SoftmaxTopK { norm_topk_prob } => {
                let probs = logits.softmax(-1, Kind::Float);
                let (mut w, ids) = probs.topk(top_k, -1, true, true);
                if norm_topk_prob {
                    w = &w / w.sum_dim_intlist(-1, true, Kind::Float);
                }
                (ids, w.to_kind(self.kind))
            }
            Routing::TopKSoftmax => {
                let (vals, ids) = logits.topk(top_k, -1, true, true);
                let kind = vals.kind();
                (ids, vals.softmax(-1, kind))
            }
        }
    }

    /// The MoE output of the experts in `only` (all held ones if `None`) for
    /// hidden rows `h` (`[tokens, hidden]`, already normalised): partial sums
    /// from disjoint expert sets add up to the full layer output.
    pub fn moe_partial(
        &self,
        local_layer: usize,
        h: &Tensor,
        only: Option<&[i64]>,
    ) -> Result<Tensor> {
        self.moe_mix(local_layer, h, only, &mut MoeContext::default())
    }

    /// The MoE output of the experts in `only` (all if `None`), those not
    /// held here computed through `moe.remote`. Every expert's output is
    /// weighted and added in increasing expert order wherever it was
    /// computed, so a layer whose experts are spread over nodes gives the
    /// bits of one process (RT-PIPE-8).
    fn moe_mix(
        &self,
        local_layer: usize,
        h: &Tensor,
        only: Option<&[i64]>,
        moe: &mut MoeContext,
    ) -> Result<Tensor> {
        let layer = self
            .layers
            .get(local_layer)
            .ok_or_else(|| GpuError::Invalid(format!("no layer {local_layer} in this stage")))?;
        let Mlp::Moe {
            router,
            router_bias,
            experts,
            top_k,
            routing,
        } = &layer.mlp
        else {
            return Err(GpuError::Invalid(format!(
                "layer {local_layer} is not a MoE layer"
            )));
        };
        let (ids, weights) = self.route(router, router_bias.as_ref(), h, *top_k, *routing);
        let ids_host = Vec::<i64>::try_from(&ids.flatten(0, -1).to_device(Device::Cpu))?;
        let k = *top_k as usize;
        let mut out = h.zeros_like();
        let mut per_expert: std::collections::BTreeMap<i64, (Vec<i64>, Vec<i64>)> =
            Default::default();
        for (n, &e) in ids_host.iter().enumerate() {
            if only.is_some_and(|o| !o.contains(&e)) {
                continue;
            }
            let entry = per_expert.entry(e).or_default();
            entry.0.push((n / k) as i64);
            entry.1.push((n % k) as i64);
        }
        let layer_id = self.range.start + local_layer as i64;
        let held = |e: i64| {
            usize::try_from(e)
                .ok()
                .and_then(|i| experts.get(i)?.as_ref())
        };
        let index = |v: &[i64]| Tensor::from_slice(v).to_device(self.device);
        // Experts held elsewhere: one call for the layer, before any sum.
        let away: Vec<(i64, Tensor)> = per_expert
            .iter()
            .filter(|(e, _)| held(**e).is_none())
            .map(|(e, (tokens, _))| (*e, h.index_select(0, &index(tokens))))
            .collect();
        let mut computed: std::collections::BTreeMap<i64, Tensor> = Default::default();
        if let Some((expert, _)) = away.first() {
            let Some(remote) = moe.remote.as_deref_mut() else {
                return Err(GpuError::ExpertNotHeld {
                    layer: layer_id,
                    expert: *expert,
                });
            };
            let ids: Vec<i64> = away.iter().map(|(e, _)| *e).collect();
            let outs = remote.compute(layer_id, away)?;
            if outs.len() != ids.len() {
                return Err(GpuError::Invalid(format!(
                    "{} expert outputs for {} experts",
                    outs.len(),
                    ids.len()
                )));
            }
            computed = ids.into_iter().zip(outs).collect();
        }
        for (e, (tokens, slots)) in per_expert {
            moe.used.insert((layer_id, e));
            let tok = index(&tokens);
            let slot = index(&slots);
            let w = weights
                .index_select(0, &tok)
                .gather(1, &slot.unsqueeze(1), false);
            let y = match held(e) {
                Some(expert) => expert.forward(&h.index_select(0, &tok)),
                None => {
                    let y = computed.remove(&e).expect("computed above");
                    if y.size() != [tokens.len() as i64, h.size()[1]] {
                        return Err(GpuError::Invalid(format!(
                            "expert {e} of layer {layer_id} answered {:?} for {} rows",
                            y.size(),
                            tokens.len()
                        )));
                    }
                    y.to_device(self.device).to_kind(h.kind())
                }
            } * w;
            let _ = out.index_add_(0, &tok, &y);
        }
        Ok(out)
    }

    /// Continuous batching of decode steps: one new position for each of
    /// several sequences, `x` `[batch, 1, hidden]`, row `j` extending
    /// `caches[j]` (each at its own length). The projections and MLPs run
    /// once for the whole batch; attention runs per sequence over its own
    /// cache. A batch of one is exactly [`Qwen3::forward_layers_moe`]; a
    /// larger batch agrees with it within rounding (its matrix products
    /// have more rows, which may change the summation order). Layers with
    /// sliding windows or sinks run the sequences one at a time.
    pub fn forward_decode_batch(
        &self,
        x: &Tensor,
        caches: &mut [&mut KvCache],
        moe: &mut MoeContext,
    ) -> Result<Tensor> {
        let (b, s, hidden) = x.size3().map_err(|e| GpuError::Invalid(e.to_string()))?;
        if s != 1 || b != caches.len() as i64 || b == 0 {
            return Err(GpuError::Invalid(format!(
                "a decode batch of [{b}, {s}, {hidden}] for {} caches",
                caches.len()
            )));
        }
        if b == 1 {
            return self.forward_layers_moe(x, caches[0], moe);
        }
        if self.layers.iter().any(|l| l.sinks.is_some() || l.sliding) {
            let rows = caches
                .iter_mut()
                .enumerate()
                .map(|(j, c)| self.forward_layers_moe(&x.narrow(0, j as i64, 1), c, moe))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&rows, 0));
        }
        let positions: Vec<f32> = caches.iter().map(|c| c.len as f32).collect();
        let pos = Tensor::from_slice(&positions).to_device(self.device);
        let freqs = pos.unsqueeze(1) * self.inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (cos, sin) = (emb.cos(), emb.sin());
        let (cos, sin) = if self.rope_scale == 1.0 {
            (cos, sin)
        } else {
            (cos * self.rope_scale, sin * self.rope_scale)
        };
        let hd = self.cfg.head_dim;
        let cos = cos.to_kind(self.kind).view([b, 1, 1, hd]);
        let sin = sin.to_kind(self.kind).view([b, 1, 1, hd]);
        for c in caches.iter_mut() {
            if c.k.len() < self.layers.len() {
                c.k.resize_with(self.layers.len(), || None);
                c.v.resize_with(self.layers.len(), || None);
            }
        }
        let mut x = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_decode_batch(layer, i, &x, &cos, &sin, caches, moe)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        Ok(x)
    }

    /// One layer of [`Qwen3::forward_decode_batch`].
    #[allow(clippy::too_many_arguments)]
    fn layer_decode_batch(
        &self,
        l: &Layer,
        local: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut KvCache],
        moe: &mut MoeContext,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let b = caches.len() as i64;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps;
        let h = self.norm(x, &l.ln1);
        let q = h.linear(&l.wq, l.bq.as_ref()).view([b, 1, nh, hd]);
        let k = h.linear(&l.wk, l.bk.as_ref()).view([b, 1, nkv, hd]);
        let v = h
            .linear(&l.wv, l.bv.as_ref())
            .view([b, 1, nkv, hd])
            .transpose(1, 2);
        let head_norm = |t: Tensor, w: &Option<Tensor>| match w {
            Some(w) => rms_norm(&t, w, eps),
            None => t,
        };
        let q = apply_rope(&head_norm(q, &l.q_norm).transpose(1, 2), cos, sin);
        let k = apply_rope(&head_norm(k, &l.k_norm).transpose(1, 2), cos, sin);
        let groups = nh / nkv;
        let mut outs = Vec::with_capacity(caches.len());
        for (j, cache) in caches.iter_mut().enumerate() {
            let j = j as i64;
            let (kj, vj) = (k.narrow(0, j, 1), v.narrow(0, j, 1));
            let (kc, vc) = match (cache.k[local].as_ref(), cache.v[local].as_ref()) {
                (Some(kc), Some(vc)) => (Tensor::cat(&[kc, &kj], 2), Tensor::cat(&[vc, &vj], 2)),
                _ => (kj.copy(), vj.copy()),
            };
            cache.k[local] = Some(kc.shallow_clone());
            cache.v[local] = Some(vc.shallow_clone());
            let kr = kc.repeat_interleave_self_int(groups, 1, None::<i64>);
            let vr = vc.repeat_interleave_self_int(groups, 1, None::<i64>);
            outs.push(Tensor::scaled_dot_product_attention(
                &q.narrow(0, j, 1),
                &kr,
                &vr,
                None::<Tensor>,
                0.0,
                false,
                None,
                false,
            ));
        }
        let attn = Tensor::cat(&outs, 0)
            .transpose(1, 2)
            .reshape([b, 1, nh * hd]);
        let x = x + attn.linear(&l.wo, l.bo.as_ref());
        let h = self.norm(&x, &l.ln2);
        let mlp = match &l.mlp {
            Mlp::Dense(e) => e.forward(&h),
            Mlp::Moe { .. } => {
                let flat = h.view([b, cfg.hidden_size]);
                self.moe_mix(local, &flat, None, moe)?
                    .view([b, 1, cfg.hidden_size])
            }
        };
        Ok(x + mlp)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: &Layer,
        local: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        past: i64,
        k_cache: &mut Option<Tensor>,
        v_cache: &mut Option<Tensor>,
        moe: &mut MoeContext,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, s, _) = x.size3().expect("hidden states are [batch, seq, hidden]");
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps;
        let h = self.norm(x, &l.ln1);
        let q = h.linear(&l.wq, l.bq.as_ref()).view([b, s, nh, hd]);
        let k = h.linear(&l.wk, l.bk.as_ref()).view([b, s, nkv, hd]);
        let v = h
            .linear(&l.wv, l.bv.as_ref())
            .view([b, s, nkv, hd])
            .transpose(1, 2);
        let head_norm = |t: Tensor, w: &Option<Tensor>| match w {
            Some(w) => rms_norm(&t, w, eps),
            None => t,
        };
        let q = apply_rope(&head_norm(q, &l.q_norm).transpose(1, 2), cos, sin);
        let k = apply_rope(&head_norm(k, &l.k_norm).transpose(1, 2), cos, sin);
        let (k, v) = match (k_cache.as_ref(), v_cache.as_ref()) {
            (Some(kc), Some(vc)) => (Tensor::cat(&[kc, &k], 2), Tensor::cat(&[vc, &v], 2)),
            _ => (k, v),
        };
        *k_cache = Some(k.shallow_clone());
        *v_cache = Some(v.shallow_clone());
        let groups = nh / nkv;
        let k = k.repeat_interleave_self_int(groups, 1, None::<i64>);
        let v = v.repeat_interleave_self_int(groups, 1, None::<i64>);
        let total = past + s;
        let attn = if l.sinks.is_some() || l.sliding {
            self.eager_attention(l, &q, &k, &v, past)
        } else if s == 1 {
            Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                false,
                None,
                false,
            )
        } else if past == 0 {
            Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, false)
        } else {
            // Query i (absolute position past+i) sees keys 0..=past+i.
            let qi = Tensor::arange_start(past, total, (Kind::Int64, self.device)).unsqueeze(1);
            let kj = Tensor::arange(total, (Kind::Int64, self.device)).unsqueeze(0);
            let mask = kj.le_tensor(&qi);
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, false)
        };
        let attn = attn.transpose(1, 2).reshape([b, s, nh * hd]);
        let x = x + attn.linear(&l.wo, l.bo.as_ref());
        let h = self.norm(&x, &l.ln2);
        let mlp = match &l.mlp {
            Mlp::Dense(e) => e.forward(&h),
            Mlp::Moe { .. } => {
                let flat = h.view([b * s, cfg.hidden_size]);
                self.moe_mix(local, &flat, None, moe)?
                    .view([b, s, cfg.hidden_size])
            }
        };
        Ok(x + mlp)
    }

    /// The decoder norms: Qwen3 casts the normalised f32 values to the model
    /// dtype before the weight; GPT-OSS multiplies in f32, then casts.
    fn norm(&self, x: &Tensor, w: &Tensor) -> Tensor {
        if self.cfg.arch != Arch::GptOss {
            return rms_norm(x, w, self.cfg.rms_norm_eps);
        }
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim(-1, true, Kind::Float);
        (w * (xf * (var + self.cfg.rms_norm_eps).rsqrt())).to_kind(x.kind())
    }

    /// transformers' eager attention with GPT-OSS's additions: a causal
    /// mask, optionally a sliding window (query at p sees keys in
    /// (p - window, p]), and attention sinks (one logit per head joined to
    /// the softmax, then dropped). `k`, `v` are already repeated to all heads.
    fn eager_attention(&self, l: &Layer, q: &Tensor, k: &Tensor, v: &Tensor, past: i64) -> Tensor {
        let (b, nh, s, hd) = q.size4().expect("q is [b, heads, seq, hd]");
        let total = k.size()[2];
        let scale = (hd as f64).powf(-0.5);
        let scores = q.matmul(&k.transpose(2, 3)) * scale;
        let qi = Tensor::arange_start(past, past + s, (Kind::Int64, self.device)).unsqueeze(1);
        let kj = Tensor::arange(total, (Kind::Int64, self.device)).unsqueeze(0);
        let mut allowed = kj.le_tensor(&qi);
        if l.sliding
            && let Some(w) = self.cfg.sliding_window
        {
            allowed = allowed.logical_and(&kj.gt_tensor(&(&qi - w)));
        }
        let scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
        let probs = match &l.sinks {
            Some(sinks) => {
                let sinks = sinks
                    .to_kind(scores.kind())
                    .view([1, nh, 1, 1])
                    .expand([b, nh, s, 1], false);
                let combined = Tensor::cat(&[&scores, &sinks], -1);
                let combined = &combined - combined.amax(-1, true);
                let kind = combined.kind();
                combined.softmax(-1, kind).narrow(-1, 0, total)
            }
            None => scores.softmax(-1, Kind::Float).to_kind(q.kind()),
        };
        probs.to_kind(v.kind()).matmul(v)
    }

    /// Final norm and `lm_head`: hidden `[batch, seq, hidden]` to f32 logits.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let (Some(norm), Some(lm_head)) = (&self.norm, &self.lm_head) else {
            return Err(GpuError::Invalid("this stage holds no head".into()));
        };
        let h = self.norm(x, norm);
        Ok(h.linear(lm_head, None::<Tensor>).to_kind(Kind::Float))
    }

    /// Full model: token ids `[batch, seq]` to f32 logits `[batch, seq, vocab]`.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.embed(ids)?;
        let x = self.forward_layers(&x, cache)?;
        self.head(&x)
    }

    /// Extends `cache` by `ids` (one sequence) and returns the f32 logits
    /// at the last position: one step of [`crate::generate::generate_with`].
    pub fn last_logits(&self, ids: &[i64], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let _guard = tch::no_grad_guard();
        let input = Tensor::from_slice(ids).unsqueeze(0);
        let logits = self.forward(&input, cache)?;
        Ok(Vec::<f32>::try_from(&logits.get(0).get(-1))?)
    }

    /// Logits for exactly `ids` (one sequence, no start token): `[seq, vocab]`.
    pub fn logits(&self, ids: &[i64]) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(GpuError::Invalid("no input ids".into()));
        }
        self.check_ids(ids)?;
        let t = Tensor::from_slice(ids).unsqueeze(0);
        let _guard = tch::no_grad_guard();
        let logits = self.forward(&t, &mut KvCache::new())?;
        Ok(logits.squeeze_dim(0))
    }
}
