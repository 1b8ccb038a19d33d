//! The fast decode path for dense Qwen3: a static KV cache of `slots`
//! sequences, fused projections (QKV in one matrix, gate/up in one), and a
//! decode step that reads nothing from the host, so that on CUDA it can be
//! captured once as a CUDA graph and replayed per token.
//!
//! Continuous batching: each slot holds one sequence at its own position; a
//! sequence joins by `prefill` into a free slot and leaves by `release`; one
//! `step` advances every slot by one token (inactive slots compute garbage
//! that nobody reads, which costs the same as a padded batch).
//!
//! Numerics differ from the reference path only in order of operations
//! (RMSNorm through `at::rms_norm`, the attention scale folded into the
//! q-norm weights): the tests hold the two to 1e-4 in f32.

use std::collections::BTreeMap;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{GpuError, Result};
use crate::model::Qwen3;

struct FusedLayer {
    ln1: Tensor,
    /// `[(nh + 2 nkv) * hd, hidden]`: q, k, v projections stacked.
    wqkv: Tensor,
    /// `[nh + nkv, hd]`: q-norm weights (times the attention scale) then k-norm weights.
    w_qk_norm: Tensor,
    /// `o_proj` transposed (a view).
    wo_t: Tensor,
    ln2: Tensor,
    /// `[2 * inter, hidden]`: gate then up.
    wgu: Tensor,
    /// `down_proj` transposed (a view).
    wdown_t: Tensor,
    /// `[slots * nkv * max_len, hd]`, i.e. `[slots, nkv, max_len, hd]` flattened.
    k_cache: Tensor,
    v_cache: Tensor,
}

/// What one decode step produced (device tensors, rewritten by every step).
pub struct StepOutput {
    /// `[slots, vocab]` f32 logits of the token just fed.
    pub logits: Tensor,
}

/// How the decode step attends over the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnImpl {
    /// The fused decode-attention kernel (`csrc/kernels.cuh`), reading only
    /// the visible keys; needs the fused kernels, else `Sdpa` is used.
    /// Correct on the H200 but slower than `Sdpa` there (5.38 vs 5.33 ms
    /// per Qwen3-8B step at batch 1, 6.66 vs 5.55 at batch 16; gpu/BENCH.md
    /// run 7): not the default.
    Kernel,
    /// `scaled_dot_product_attention` with an additive mask, the `g` query
    /// heads that share a KV head treated as `g` query rows (one kernel).
    Sdpa,
    /// `baddbmm` (scores + mask), `softmax`, `bmm` (three kernels).
    Bmm,
}

/// Static-cache, graph-capturable decoder. See the module docs.
pub struct DecodeEngine {
    /// Attention path of the decode step.
    pub attn: AttnImpl,
    /// Use the fused CUDA kernels (q/k norm + RoPE + cache write; SiLU·mul)
    /// in the decode step. On by default for bf16 on CUDA when the shim is
    /// built; `set_fused(false)` falls back to plain libtorch ops.
    fused: bool,
    /// `[max_len, hd/2]` f32 (values rounded to the model dtype): RoPE
    /// tables for the fused kernel.
    cos_half: Tensor,
    sin_half: Tensor,
    /// Benchmark only: the step runs just the weight matmuls (qkv, o,
    /// gate/up, down per layer, and the head) to measure their floor.
    pub matmuls_only: bool,
    pub cfg: ModelConfig,
    pub device: Device,
    pub kind: Kind,
    pub slots: i64,
    pub max_len: i64,
    embed: Tensor,
    layers: Vec<FusedLayer>,
    norm: Tensor,
    lm_head: Tensor,
    /// `[max_len, hd, hd]`: RoPE at each position as a matrix acting on a
    /// row vector (`rope(x) = x @ R[pos]`), so that rotating q and k for
    /// all heads is one batched matmul rather than four elementwise kernels.
    rope_r: Tensor,
    /// Inputs of the next step: the token each slot feeds and its position.
    tokens: Tensor,
    pos: Tensor,
    /// Host mirror of `pos` (bounds checks; never read from the device).
    pos_host: Vec<i64>,
    #[cfg(blyan_cuda_graph)]
    graph: Option<(crate::sys::CudaGraph, StepOutput, i64)>,
}

fn check_shape(name: &str, t: &Tensor, expected: &[i64]) -> Result<()> {
    if t.size() != expected {
        return Err(GpuError::ShapeMismatch {
            name: name.into(),
            actual: t.size(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

impl DecodeEngine {
    /// Builds the engine from a loaded reference model (whole model only).
    pub fn from_model(m: &Qwen3, slots: i64, max_len: i64) -> Result<Self> {
        let (Some(embed), Some(norm), Some(lm_head)) = (&m.embed, &m.norm, &m.lm_head) else {
            return Err(GpuError::Invalid(
                "the decode engine needs the whole model".into(),
            ));
        };
        if m.layers.len() as i64 != m.cfg.num_hidden_layers {
            return Err(GpuError::Invalid(
                "the decode engine needs every layer".into(),
            ));
        }
        if m.layers.iter().any(|l| l.bq.is_some()) {
            return Err(GpuError::Invalid(
                "the decode engine has no attention biases".into(),
            ));
        }
        let mut parts = Vec::with_capacity(m.layers.len());
        for l in &m.layers {
            let (Some(q_norm), Some(k_norm)) = (&l.q_norm, &l.k_norm) else {
                return Err(GpuError::Invalid(
                    "the decode engine supports dense Qwen3 only".into(),
                ));
            };
            let crate::model::Mlp::Dense(mlp) = &l.mlp else {
                return Err(GpuError::Invalid(
                    "the decode engine supports dense Qwen3 only".into(),
                ));
            };
            parts.push((
                l.ln1.shallow_clone(),
                Tensor::cat(&[&l.wq, &l.wk, &l.wv], 0),
                q_norm.shallow_clone(),
                k_norm.shallow_clone(),
                l.wo.shallow_clone(),
                l.ln2.shallow_clone(),
                Tensor::cat(&[&mlp.gate, &mlp.up], 0),
                mlp.down.shallow_clone(),
            ));
        }
        Self::assemble(
            &m.cfg,
            m.device,
            m.kind,
            embed.shallow_clone(),
            parts,
            norm.shallow_clone(),
            lm_head.shallow_clone(),
            slots,
            max_len,
        )
    }

    /// Random weights of `cfg`'s shape directly on `device` (benchmarks).
    pub fn random(
        cfg: &ModelConfig,
        device: Device,
        kind: Kind,
        slots: i64,
        max_len: i64,
        seed: u64,
    ) -> Result<Self> {
        tch::manual_seed(seed as i64);
        let (h, hd, nh, nkv, inter, vocab) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let randn = |shape: &[i64], std: f64| Tensor::randn(shape, (kind, device)) * std;
        let ones = |n: i64| Tensor::ones([n], (kind, device));
        let parts = (0..cfg.num_hidden_layers)
            .map(|_| {
                (
                    ones(h),
                    randn(&[(nh + 2 * nkv) * hd, h], 0.02),
                    ones(hd),
                    ones(hd),
                    randn(&[h, nh * hd], 0.02),
                    ones(h),
                    randn(&[2 * inter, h], 0.02),
                    randn(&[h, inter], 0.02),
                )
            })
            .collect();
        Self::assemble(
            cfg,
            device,
            kind,
            randn(&[vocab, h], 0.02),
            parts,
            ones(h),
            randn(&[vocab, h], 0.02),
            slots,
            max_len,
        )
    }

    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn assemble(
        cfg: &ModelConfig,
        device: Device,
        kind: Kind,
        embed: Tensor,
        parts: Vec<(
            Tensor,
            Tensor,
            Tensor,
            Tensor,
            Tensor,
            Tensor,
            Tensor,
            Tensor,
        )>,
        norm: Tensor,
        lm_head: Tensor,
        slots: i64,
        max_len: i64,
    ) -> Result<Self> {
        if slots < 1 || max_len < 1 {
            return Err(GpuError::Invalid(
                "slots and max_len must be positive".into(),
            ));
        }
        let (h, hd, nh, nkv, inter) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let scale = 1.0 / (hd as f64).sqrt();
        let mut layers = Vec::with_capacity(parts.len());
        for (ln1, wqkv, qn, kn, wo, ln2, wgu, down) in parts {
            check_shape("wqkv", &wqkv, &[(nh + 2 * nkv) * hd, h])?;
            check_shape("wgu", &wgu, &[2 * inter, h])?;
            let w_qk_norm = Tensor::cat(
                &[
                    (qn.to_kind(Kind::Float) * scale)
                        .to_kind(kind)
                        .unsqueeze(0)
                        .expand([nh, hd], false),
                    kn.unsqueeze(0).expand([nkv, hd], false),
                ],
                0,
            )
            .contiguous();
            let cache = || Tensor::zeros([slots * nkv * max_len, hd], (kind, device));
            layers.push(FusedLayer {
                ln1,
                wqkv,
                w_qk_norm,
                wo_t: wo.tr(),
                ln2,
                wgu,
                wdown_t: down.tr(),
                k_cache: cache(),
                v_cache: cache(),
            });
        }
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_slice(&inv_freq).to_device(device);
        let posf = Tensor::arange(max_len, (Kind::Float, device));
        let freqs = posf.unsqueeze(1) * inv_freq.unsqueeze(0);
        let (c, s) = (freqs.cos(), freqs.sin());
        // transformers rounds cos/sin to the model dtype before use: so do we.
        let cos = Tensor::cat(&[&c, &c], 1).to_kind(kind).to_kind(Kind::Float);
        let sin_signed = Tensor::cat(&[&s.neg(), &s], 1)
            .to_kind(kind)
            .to_kind(Kind::Float);
        // R[j, i]: coefficient of x[j] in rope(x)[i]. Diagonal: cos[i]; and
        // x[(i + hd/2) % hd] with sin_signed[i] (rotate_half).
        let perm = (Tensor::arange(hd, (Kind::Int64, device)) + hd / 2).remainder(hd);
        let rope_r = (cos.diag_embed(0, -2, -1)
            + sin_signed.diag_embed(0, -2, -1).index_select(1, &perm))
        .to_kind(kind);
        let cos_half = cos.narrow(1, 0, hd / 2).contiguous();
        let sin_half = sin_signed.narrow(1, hd / 2, hd / 2).contiguous();
        let mut engine = DecodeEngine {
            fused: false,
            cos_half,
            sin_half,
            attn: AttnImpl::Sdpa,
            matmuls_only: false,
            cfg: cfg.clone(),
            device,
            kind,
            slots,
            max_len,
            embed,
            layers,
            norm,
            lm_head,
            rope_r,
            tokens: Tensor::zeros([slots], (Kind::Int64, device)),
            pos: Tensor::zeros([slots], (Kind::Int64, device)),
            pos_host: vec![0; slots as usize],
            #[cfg(blyan_cuda_graph)]
            graph: None,
        };
        if matches!(device, Device::Cuda(_))
            && kind == Kind::BFloat16
            && let Err(e) = engine.set_fused(true)
        {
            eprintln!("blyan-gpu: fused kernels unavailable, using libtorch ops: {e}");
        }
        Ok(engine)
    }

    /// Turns the fused CUDA kernels on (compiling them on first use) or off.
    /// On needs bf16 on CUDA and the shim; takes effect at the next capture.
    pub fn set_fused(&mut self, on: bool) -> Result<()> {
        if !on {
            self.fused = false;
            return Ok(());
        }
        if !(matches!(self.device, Device::Cuda(_)) && self.kind == Kind::BFloat16) {
            return Err(GpuError::Invalid("fused kernels need bf16 on CUDA".into()));
        }
        #[cfg(blyan_cuda_graph)]
        {
            crate::sys::kernels::init()?;
            self.fused = true;
            Ok(())
        }
        #[cfg(not(blyan_cuda_graph))]
        {
            Err(GpuError::Graph("built without the CUDA shim".into()))
        }
    }

    /// Whether the decode step uses the fused kernels.
    pub fn fused(&self) -> bool {
        self.fused
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let n = x.size().last().copied().unwrap_or(0);
        x.rms_norm([n], Some(w), self.cfg.rms_norm_eps)
    }

    /// q/k RMSNorm and RoPE on `qkv` rows: returns `[rows, nh + nkv, hd]`.
    /// `rot` is `[rows, hd, hd]` (rows of `rope_r`).
    fn qk_norm_rope(&self, qkv: &Tensor, w: &Tensor, rot: &Tensor) -> Tensor {
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let rows = qkv.size()[0];
        let qk = qkv.narrow(1, 0, (nh + nkv) * hd).view([rows, nh + nkv, hd]);
        let qk = qk.rms_norm([hd], None::<Tensor>, self.cfg.rms_norm_eps) * w;
        qk.bmm(rot)
    }

    /// Prefills `ids` into `slot` (replacing what it held) and returns the
    /// f32 logits of the last position, `[vocab]`. Eager, any length.
    pub fn prefill(&mut self, slot: i64, ids: &[i64]) -> Result<Tensor> {
        let s = ids.len() as i64;
        if !(0..self.slots).contains(&slot) {
            return Err(GpuError::Invalid(format!(
                "slot {slot} outside 0..{}",
                self.slots
            )));
        }
        if s == 0 || s >= self.max_len {
            return Err(GpuError::Invalid(format!(
                "prompt of {s} tokens does not fit a cache of {}",
                self.max_len
            )));
        }
        if let Some(&id) = ids
            .iter()
            .find(|&&id| !(0..self.cfg.vocab_size).contains(&id))
        {
            return Err(GpuError::TokenOutOfRange {
                id,
                vocab_size: self.cfg.vocab_size,
            });
        }
        let _guard = tch::no_grad_guard();
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let ids_t = Tensor::from_slice(ids).to_device(self.device);
        let rot = self.rope_r.narrow(0, 0, s);
        let mut x = self.embed.index_select(0, &ids_t);
        for l in &self.layers {
            let h = self.rms(&x, &l.ln1);
            let qkv = h.linear(&l.wqkv, None::<Tensor>);
            let qk = self.qk_norm_rope(&qkv, &l.w_qk_norm, &rot);
            let q = qk.narrow(1, 0, nh).transpose(0, 1).unsqueeze(0);
            let k = qk.narrow(1, nh, nkv).transpose(0, 1);
            let v = qkv
                .narrow(1, (nh + nkv) * hd, nkv * hd)
                .view([s, nkv, hd])
                .transpose(0, 1);
            for (cache, new) in [(&l.k_cache, &k), (&l.v_cache, &v)] {
                let mut dst = cache
                    .view([self.slots, nkv, self.max_len, hd])
                    .get(slot)
                    .narrow(1, 0, s);
                dst.copy_(new);
            }
            let g = nh / nkv;
            let expand = |t: &Tensor| {
                t.unsqueeze(1)
                    .expand([nkv, g, s, hd], false)
                    .reshape([1, nh, s, hd])
            };
            let (kr, vr) = (expand(&k), expand(&v));
            let attn = Tensor::scaled_dot_product_attention(
                &q,
                &kr,
                &vr,
                None::<Tensor>,
                0.0,
                true,
                1.0,
                false,
            );
            let attn = attn.squeeze_dim(0).transpose(0, 1).reshape([s, nh * hd]);
            // In place: `x` is this function's own residual stream, and the
            // out-of-place addmm would first copy it (one more kernel).
            let _ = x.addmm_(&attn, &l.wo_t);
            let h = self.rms(&x, &l.ln2);
            let gu = h.linear(&l.wgu, None::<Tensor>);
            let inter = self.cfg.intermediate_size;
            let act = gu.narrow(1, 0, inter).silu() * gu.narrow(1, inter, inter);
            let _ = x.addmm_(&act, &l.wdown_t);
        }
        let last = x.narrow(0, s - 1, 1);
        let logits = self
            .rms(&last, &self.norm)
            .linear(&self.lm_head, None::<Tensor>)
            .to_kind(Kind::Float);
        self.pos_host[slot as usize] = s;
        let _ = self.pos.get(slot).fill_(s);
        Ok(logits.squeeze_dim(0))
    }

    /// Sets the token each slot feeds at the next step (host to device copy;
    /// call between steps, not inside a captured graph).
    pub fn set_tokens(&mut self, tokens: &[i64]) -> Result<()> {
        if tokens.len() as i64 != self.slots {
            return Err(GpuError::Invalid(format!(
                "{} tokens for {} slots",
                tokens.len(),
                self.slots
            )));
        }
        self.tokens
            .copy_(&Tensor::from_slice(tokens).to_device(self.device));
        Ok(())
    }

    /// Sets every slot's position (host to device copy; between steps).
    pub fn set_positions(&mut self, pos: &[i64]) -> Result<()> {
        if pos.len() as i64 != self.slots || pos.iter().any(|p| !(0..self.max_len).contains(p)) {
            return Err(GpuError::Invalid(format!("bad positions {pos:?}")));
        }
        self.pos
            .copy_(&Tensor::from_slice(pos).to_device(self.device));
        self.pos_host = pos.to_vec();
        Ok(())
    }

    /// Max abs logit difference between one eager step with the fused
    /// kernels and the same step with plain libtorch ops, from the same
    /// state (positions restored in between).
    pub fn fused_vs_plain(&mut self, attn_len: i64) -> Result<f64> {
        let fused = self.fused;
        let pos = self.pos_host.clone();
        self.set_fused(true)?;
        let a = self.step_eager(attn_len, false)?.logits.copy();
        self.set_positions(&pos)?;
        self.set_fused(false)?;
        let b = self.step_eager(attn_len, false)?.logits;
        self.set_positions(&pos)?;
        self.set_fused(fused)?;
        Ok((a - b).abs().max().double_value(&[]))
    }

    /// Marks `slot` free: its position goes back to 0.
    pub fn release(&mut self, slot: i64) {
        assert!((0..self.slots).contains(&slot));
        self.pos_host[slot as usize] = 0;
        let _ = self.pos.get(slot).fill_(0);
    }

    /// The decode step itself: feeds `tokens` at `pos` for every slot,
    /// attends over the first `attn_len` cache positions, advances `pos`.
    /// Reads nothing from the host, so it can be captured.
    fn step_ops(&self, attn_len: i64) -> Result<StepOutput> {
        if self.matmuls_only {
            return Ok(self.step_matmuls_only());
        }
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let b = self.slots;
        let g = nh / nkv;
        let dev = self.device;
        // Shared by all layers: RoPE rows, cache write index, attention mask.
        let rot = self.rope_r.index_select(0, &self.pos);
        let heads = Tensor::arange(b * nkv, (Kind::Int64, dev));
        let pos_per_head = self
            .pos
            .unsqueeze(1)
            .expand([b, nkv], false)
            .reshape([b * nkv]);
        let write_idx = heads * self.max_len + pos_per_head;
        let j = Tensor::arange(attn_len, (Kind::Int64, dev)).unsqueeze(0);
        let visible = j.le_tensor(&self.pos.unsqueeze(1));
        // [b, attn_len]: 0 where visible, -inf elsewhere.
        let mask = Tensor::zeros([b, attn_len], (self.kind, dev))
            .masked_fill(&visible.logical_not(), f64::NEG_INFINITY);
        let mask_bmm = mask
            .unsqueeze(1)
            .expand([b, nkv, attn_len], false)
            .reshape([b * nkv, 1, attn_len]);
        let mask_sdpa = mask.view([b, 1, 1, attn_len]);
        let mut x = self.embed.index_select(0, &self.tokens);
        for l in &self.layers {
            let h = self.rms(&x, &l.ln1);
            let qkv = h.linear(&l.wqkv, None::<Tensor>);
            let (q4, q3) = if self.fused {
                let q = self.fused_qk(&qkv, l)?;
                (q.view([b, nkv, g, hd]), q.view([b * nkv, g, hd]))
            } else {
                let qk = self.qk_norm_rope(&qkv, &l.w_qk_norm, &rot);
                let k = qk.narrow(1, nh, nkv).reshape([b * nkv, hd]);
                let v = qkv
                    .narrow(1, (nh + nkv) * hd, nkv * hd)
                    .reshape([b * nkv, hd]);
                let mut kc = l.k_cache.shallow_clone();
                let mut vc = l.v_cache.shallow_clone();
                let _ = kc.index_copy_(0, &write_idx, &k);
                let _ = vc.index_copy_(0, &write_idx, &v);
                let q = qk.narrow(1, 0, nh);
                (q.reshape([b, nkv, g, hd]), q.reshape([b * nkv, g, hd]))
            };
            let attn = match self.attn {
                AttnImpl::Kernel if self.fused && self.attn_kernel_ok() => {
                    self.fused_attn(&q4, l)?
                }
                AttnImpl::Sdpa | AttnImpl::Kernel => {
                    let cache4 =
                        |c: &Tensor| c.view([b, nkv, self.max_len, hd]).narrow(2, 0, attn_len);
                    Tensor::scaled_dot_product_attention(
                        &q4,
                        &cache4(&l.k_cache),
                        &cache4(&l.v_cache),
                        Some(&mask_sdpa),
                        0.0,
                        false,
                        1.0,
                        false,
                    )
                    .reshape([b, nh * hd])
                }
                AttnImpl::Bmm => {
                    let cache3 =
                        |c: &Tensor| c.view([b * nkv, self.max_len, hd]).narrow(1, 0, attn_len);
                    let scores =
                        mask_bmm.baddbmm(&q3, &cache3(&l.k_cache).transpose(1, 2), 1.0, 1.0);
                    let probs = scores.softmax(-1, self.kind);
                    probs.bmm(&cache3(&l.v_cache)).view([b, nh * hd])
                }
            };
            // In place: see `prefill`.
            let _ = x.addmm_(&attn, &l.wo_t);
            let h = self.rms(&x, &l.ln2);
            let gu = h.linear(&l.wgu, None::<Tensor>);
            let inter = self.cfg.intermediate_size;
            let act = if self.fused {
                let act = Tensor::empty([b, inter], (self.kind, dev));
                self.fused_silu(&gu, &act)?;
                act
            } else {
                gu.narrow(1, 0, inter).silu() * gu.narrow(1, inter, inter)
            };
            let _ = x.addmm_(&act, &l.wdown_t);
        }
        let logits = self
            .rms(&x, &self.norm)
            .linear(&self.lm_head, None::<Tensor>)
            .to_kind(Kind::Float);
        let mut pos = self.pos.shallow_clone();
        let _ = pos.g_add_scalar_(1);
        Ok(StepOutput { logits })
    }

    /// The fused q/k norm + RoPE + cache write; returns q `[b, nh, hd]`.
    fn fused_qk(&self, qkv: &Tensor, l: &FusedLayer) -> Result<Tensor> {
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let q = Tensor::empty([self.slots, nh, hd], (self.kind, self.device));
        #[cfg(blyan_cuda_graph)]
        crate::sys::kernels::qk_norm_rope_kv(
            qkv,
            &l.w_qk_norm,
            &self.cos_half,
            &self.sin_half,
            &self.pos,
            &l.k_cache,
            &l.v_cache,
            &q,
            (nh, nkv, hd, self.max_len),
            self.cfg.rms_norm_eps,
        )?;
        #[cfg(not(blyan_cuda_graph))]
        {
            let _ = (qkv, l);
            return Err(GpuError::Graph("built without the CUDA shim".into()));
        }
        #[allow(unreachable_code)]
        Ok(q)
    }

    /// The decode-attention kernel on fused q (`[b, nkv, g, hd]` view of
    /// `[b, nh, hd]`): returns `[b, nh * hd]`.
    fn fused_attn(&self, q: &Tensor, l: &FusedLayer) -> Result<Tensor> {
        let (b, nh, nkv, hd) = (
            self.slots,
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let out = Tensor::empty([b, nh, hd], (self.kind, self.device));
        #[cfg(blyan_cuda_graph)]
        crate::sys::kernels::decode_attn(
            &q.view([b, nh, hd]),
            &l.k_cache,
            &l.v_cache,
            &self.pos,
            &out,
            (nh, nkv, hd, self.max_len),
        )?;
        #[cfg(not(blyan_cuda_graph))]
        {
            let _ = (q, l);
            return Err(GpuError::Graph("built without the CUDA shim".into()));
        }
        #[allow(unreachable_code)]
        Ok(out.view([b, nh * hd]))
    }

    fn attn_kernel_ok(&self) -> bool {
        #[cfg(blyan_cuda_graph)]
        return crate::sys::kernels::attn_supported(self.cfg.head_dim, self.max_len);
        #[cfg(not(blyan_cuda_graph))]
        false
    }

    fn fused_silu(&self, gu: &Tensor, act: &Tensor) -> Result<()> {
        #[cfg(blyan_cuda_graph)]
        return crate::sys::kernels::silu_mul(gu, act);
        #[cfg(not(blyan_cuda_graph))]
        {
            let _ = (gu, act);
            Err(GpuError::Graph("built without the CUDA shim".into()))
        }
    }

    /// The weight matmuls of a step and nothing else (numerically
    /// meaningless; the floor of what cuBLAS can do for this step).
    fn step_matmuls_only(&self) -> StepOutput {
        let (nh, hd, inter) = (
            self.cfg.num_attention_heads,
            self.cfg.head_dim,
            self.cfg.intermediate_size,
        );
        let mut x = self.embed.index_select(0, &self.tokens);
        for l in &self.layers {
            let qkv = x.linear(&l.wqkv, None::<Tensor>);
            let _ = x.addmm_(&qkv.narrow(1, 0, nh * hd), &l.wo_t);
            let gu = x.linear(&l.wgu, None::<Tensor>);
            let _ = x.addmm_(&gu.narrow(1, 0, inter), &l.wdown_t);
        }
        let logits = x.linear(&self.lm_head, None::<Tensor>).to_kind(Kind::Float);
        StepOutput { logits }
    }

    /// Greedy feedback inside the step: the argmax becomes the next input.
    fn feed_argmax(&self, out: &StepOutput) {
        let mut tokens = self.tokens.shallow_clone();
        tokens.copy_(&out.logits.argmax(-1, false));
    }

    fn advance_host(&mut self, attn_len: i64) -> Result<()> {
        for p in &mut self.pos_host {
            if *p >= attn_len {
                return Err(GpuError::Invalid(format!(
                    "position {p} outside the attention window {attn_len}"
                )));
            }
        }
        self.pos_host.iter_mut().for_each(|p| *p += 1);
        Ok(())
    }

    /// One eager decode step (any device). With `greedy_feedback`, each
    /// slot's argmax is written as its next input token on the device.
    pub fn step_eager(&mut self, attn_len: i64, greedy_feedback: bool) -> Result<StepOutput> {
        if !(1..=self.max_len).contains(&attn_len) {
            return Err(GpuError::Invalid(format!(
                "attention window {attn_len} outside 1..={}",
                self.max_len
            )));
        }
        self.advance_host(attn_len)?;
        let _guard = tch::no_grad_guard();
        let out = self.step_ops(attn_len)?;
        if greedy_feedback {
            self.feed_argmax(&out);
        }
        Ok(out)
    }

    /// Captures the decode step (with greedy feedback if asked) as a CUDA
    /// graph for window `attn_len`. Positions are advanced by the warm-up
    /// runs and restored afterwards; the cache rows they wrote are rewritten
    /// by the real steps before any step can see them.
    #[cfg(blyan_cuda_graph)]
    pub fn capture(&mut self, attn_len: i64, greedy_feedback: bool) -> Result<()> {
        use crate::sys::CudaGraph;
        if !matches!(self.device, Device::Cuda(_)) {
            return Err(GpuError::Graph("capture needs a CUDA device".into()));
        }
        let _guard = tch::no_grad_guard();
        // The side stream does not wait for work queued on the current one
        // (prefill's cache writes, position fills): drain it first.
        sync(self.device);
        let saved_pos = self.pos.copy();
        sync(self.device);
        let saved_tokens = self.tokens.copy();
        CudaGraph::enter_side_stream()?;
        let captured = (|| -> Result<(CudaGraph, StepOutput)> {
            for _ in 0..3 {
                let out = self.step_ops(attn_len)?;
                if greedy_feedback {
                    self.feed_argmax(&out);
                }
            }
            let mut graph = CudaGraph::new()?;
            graph.capture_begin()?;
            let out = self.step_ops(attn_len);
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    let _ = graph.capture_end();
                    return Err(e);
                }
            };
            if greedy_feedback {
                self.feed_argmax(&out);
            }
            graph.capture_end()?;
            Ok((graph, out))
        })();
        CudaGraph::exit_side_stream()?;
        let (graph, out) = captured?;
        self.pos.copy_(&saved_pos);
        self.tokens.copy_(&saved_tokens);
        self.graph = Some((graph, out, attn_len));
        Ok(())
    }

    /// Replays the captured step; returns its (static) output.
    #[cfg(blyan_cuda_graph)]
    pub fn replay(&mut self) -> Result<&StepOutput> {
        let attn_len = match &self.graph {
            Some((_, _, n)) => *n,
            None => return Err(GpuError::Graph("no graph captured".into())),
        };
        self.advance_host(attn_len)?;
        let (graph, out, _) = self.graph.as_ref().expect("checked above");
        graph.replay()?;
        Ok(out)
    }

    /// One step's logits: a graph replay if `use_graph` (the graph must be
    /// captured), else an eager step over window `attn_len`, no feedback.
    pub fn step_logits(&mut self, use_graph: bool, attn_len: i64) -> Result<Tensor> {
        if use_graph {
            #[cfg(blyan_cuda_graph)]
            return Ok(self.replay()?.logits.shallow_clone());
            #[cfg(not(blyan_cuda_graph))]
            return Err(GpuError::Graph("built without the CUDA-graph shim".into()));
        }
        Ok(self.step_eager(attn_len, false)?.logits)
    }

    /// Whether a graph is captured.
    pub fn has_graph(&self) -> bool {
        #[cfg(blyan_cuda_graph)]
        {
            self.graph.is_some()
        }
        #[cfg(not(blyan_cuda_graph))]
        {
            false
        }
    }

    /// Bytes of weights one decode step reads (all layers, norms, head).
    pub fn weight_bytes_per_step(&self) -> i64 {
        let mut n = self.norm.numel() + self.lm_head.numel();
        for l in &self.layers {
            n += l.ln1.numel() + l.wqkv.numel() + l.w_qk_norm.numel() + l.wo_t.numel();
            n += l.ln2.numel() + l.wgu.numel() + l.wdown_t.numel();
        }
        n as i64 * self.kind.elt_size_in_bytes() as i64
    }
}

fn parse_attn(s: &str) -> Result<AttnImpl> {
    match s {
        "kernel" => Ok(AttnImpl::Kernel),
        "sdpa" => Ok(AttnImpl::Sdpa),
        "bmm" => Ok(AttnImpl::Bmm),
        other => Err(GpuError::Invalid(format!(
            "--attn {other:?}: kernel, sdpa or bmm"
        ))),
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs `f` `n` times after `warm` warm-ups; returns seconds per run (median of `reps` batches).
fn time_it(
    device: Device,
    warm: usize,
    n: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    sync(device);
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    sync(device);
    Ok(t.elapsed().as_secs_f64() / n as f64)
}

/// Decode tokens/s of `engine` at its slot count, all slots active.
fn bench_decode(
    engine: &mut DecodeEngine,
    prompt_len: i64,
    steps: usize,
    use_graph: bool,
) -> Result<f64> {
    let prompt: Vec<i64> = (0..prompt_len)
        .map(|i| (i * 7 + 3) % engine.cfg.vocab_size)
        .collect();
    for slot in 0..engine.slots {
        let _ = engine.prefill(slot, &prompt)?;
    }
    let warm = 4usize;
    let attn_len = ((prompt_len as u64 + (steps + warm + 8) as u64).next_power_of_two() as i64)
        .min(engine.max_len);
    if engine.fused() {
        let d = engine.fused_vs_plain(attn_len)?;
        eprintln!("blyan-gpu bench: fused vs plain step, max abs logit diff {d}");
    }
    let per_step = if use_graph {
        #[cfg(blyan_cuda_graph)]
        {
            engine.capture(attn_len, true)?;
            time_it(engine.device, warm, steps, || engine.replay().map(|_| ()))?
        }
        #[cfg(not(blyan_cuda_graph))]
        {
            return Err(GpuError::Graph("built without the CUDA-graph shim".into()));
        }
    } else {
        time_it(engine.device, warm, steps, || {
            engine.step_eager(attn_len, true).map(|_| ())
        })?
    };
    Ok(engine.slots as f64 / per_step)
}

/// `blyan-gpu bench`: prefill and decode tokens/s, printed as JSON lines.
pub fn bench_cli(args: &BTreeMap<String, String>, qwen3_8b: bool) -> Result<()> {
    let get = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_string());
    let device = crate::parse_device(&get("--device", "cpu"))?;
    let kind = crate::parse_dtype(&get("--dtype", if qwen3_8b { "bf16" } else { "f32" }))?;
    let num = |k: &str, d: i64| -> Result<i64> {
        get(k, &d.to_string())
            .parse()
            .map_err(|_| GpuError::Invalid(format!("{k}: not a number")))
    };
    let prompt_len = num("--prompt-len", if qwen3_8b { 2048 } else { 128 })?;
    let decode_tokens = num("--decode-tokens", if qwen3_8b { 128 } else { 64 })? as usize;
    let batches: Vec<i64> = get("--batch", "1,16")
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| GpuError::Invalid(format!("bad batch {s:?}")))
        })
        .collect::<Result<_>>()?;
    let use_graph = matches!(device, Device::Cuda(_))
        && crate::CUDA_GRAPH_AVAILABLE
        && !args.contains_key("--no-graph");
    let cfg = if qwen3_8b {
        ModelConfig::qwen3_8b()
    } else if let Some(dir) = args.get("--model") {
        ModelConfig::from_dir(std::path::Path::new(dir))?
    } else {
        crate::default_model::default_config()
    };
    let model_name = if qwen3_8b {
        "qwen3-8b-shaped random"
    } else {
        "tiny"
    };
    let attn = parse_attn(&get("--attn", "sdpa"))?;
    if let Some(t) = args.get("--threads") {
        let t: i32 = t
            .parse()
            .map_err(|_| GpuError::Invalid("--threads: not a number".into()))?;
        tch::set_num_threads(t);
    }
    let blas = get("--blas", "default");
    match blas.as_str() {
        "default" => {}
        "cublas" => crate::set_blas_backend(Some(false))?,
        "cublaslt" => crate::set_blas_backend(Some(true))?,
        other => {
            return Err(GpuError::Invalid(format!(
                "--blas {other:?}: default, cublas or cublaslt"
            )));
        }
    }
    let matmuls_only = args.contains_key("--matmuls-only");
    let no_fused = args.contains_key("--no-fused");
    let make = |slots: i64, max_len: i64| -> Result<DecodeEngine> {
        let mut e = if qwen3_8b {
            DecodeEngine::random(&cfg, device, kind, slots, max_len, 0)?
        } else {
            let dir = args.get("--model").map(std::path::PathBuf::from);
            let m = crate::LoadedModel::load(dir.as_deref(), device, kind)?;
            DecodeEngine::from_model(&m.model, slots, max_len)?
        };
        e.attn = attn;
        e.matmuls_only = matmuls_only;
        if no_fused {
            e.set_fused(false)?;
        }
        Ok(e)
    };
    let report = |what: &str, batch: i64, tok_s: f64, extra: serde_json::Value| {
        println!(
            "{}",
            serde_json::json!({"model": model_name, "device": format!("{device:?}"), "dtype": format!("{kind:?}"),
                "what": what, "batch": batch, "tokens_per_s": (tok_s * 10.0).round() / 10.0, "graph": use_graph,
                "attn": format!("{attn:?}"), "blas": blas, "fused": !no_fused && device != Device::Cpu && kind == Kind::BFloat16, "matmuls_only": matmuls_only, "extra": extra})
        );
    };
    if let Some(mb) = args.get("--block-mb") {
        let mb: f64 = mb
            .parse()
            .map_err(|_| GpuError::Invalid("--block-mb: not a number".into()))?;
        let dir = std::env::temp_dir().join(format!("blyan-block-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| GpuError::io(&dir, e))?;
        let (verify_ms, copy_ms) =
            crate::blocks::bench_block_load(&dir, (mb * 1e6) as usize, device)?;
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "{}",
            serde_json::json!({"what": "block load", "mb": mb, "device": format!("{device:?}"),
                "map_and_sha3_ms": verify_ms, "to_device_ms": copy_ms, "total_ms": verify_ms + copy_ms})
        );
        return Ok(());
    }
    // Prefill.
    if !matmuls_only {
        let mut e = make(1, prompt_len + 1)?;
        let prompt: Vec<i64> = (0..prompt_len)
            .map(|i| (i * 7 + 3) % cfg.vocab_size)
            .collect();
        let per = time_it(device, 1, 3, || e.prefill(0, &prompt).map(|_| ()))?;
        report(
            "prefill",
            1,
            prompt_len as f64 / per,
            serde_json::json!({"prompt_len": prompt_len, "ms": per * 1e3}),
        );
    }
    for &b in &batches {
        let mut e = make(b, 512)?;
        let tok_s = bench_decode(&mut e, 32, decode_tokens, use_graph)?;
        let bytes = e.weight_bytes_per_step() as f64;
        report(
            "decode",
            b,
            tok_s,
            serde_json::json!({"ms_per_step": b as f64 / tok_s * 1e3, "weight_gb_per_step": bytes / 1e9,
                "weight_tb_s": bytes * tok_s / b as f64 / 1e12}),
        );
    }
    Ok(())
}

/// `blyan-gpu check`: the decode engine (as a CUDA graph where available)
/// against the reference forward pass, teacher-forced over a fixed
/// sequence; prints the max abs logit difference as JSON and fails above
/// `--tol` (default 1e-4 for f32; for bf16 3% of the largest logit, at least 0.15).
pub fn check_cli(args: &BTreeMap<String, String>) -> Result<()> {
    let get = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_string());
    let device = crate::parse_device(&get("--device", "cpu"))?;
    let kind = crate::parse_dtype(&get("--dtype", "f32"))?;
    let tol_arg: Option<f64> = match args.get("--tol") {
        Some(t) => Some(
            t.parse()
                .map_err(|_| GpuError::Invalid("--tol: not a number".into()))?,
        ),
        None => None,
    };
    let dir = args.get("--model").map(std::path::PathBuf::from);
    let m = crate::LoadedModel::load(dir.as_deref(), device, kind)?;
    let ids: Vec<i64> = (0..24)
        .map(|i| (i * 37 + 11) % m.model.cfg.vocab_size)
        .collect();
    let reference = m.model.logits(&ids)?;
    // bf16: 3% of the largest logit, at least 0.15 (about 10 bf16 steps at
    // the default model's logit magnitudes): the engine groups operations
    // differently from the reference (fused RMSNorm, RoPE as a matmul, the
    // attention scale folded into the q-norm weights), and each side rounds
    // to 8 bits after every op. f32: the 1e-4.
    let tol = tol_arg.unwrap_or(if kind == Kind::Float {
        1e-4
    } else {
        (0.03 * reference.abs().max().double_value(&[])).max(0.15)
    });
    let mut e = DecodeEngine::from_model(&m.model, 2, 64)?;
    e.attn = parse_attn(&get("--attn", "sdpa"))?;
    if args.contains_key("--no-fused") {
        e.set_fused(false)?;
    }
    let first = 8usize;
    let _guard = tch::no_grad_guard();
    let mut worst = (e.prefill(0, &ids[..first])? - reference.get(first as i64 - 1))
        .abs()
        .max()
        .double_value(&[]);
    let _ = e.prefill(1, &ids[..first])?;
    let use_graph = matches!(device, Device::Cuda(_)) && crate::CUDA_GRAPH_AVAILABLE;
    #[cfg(blyan_cuda_graph)]
    if use_graph {
        e.capture(32, false)?;
    }
    for (i, &tok) in ids.iter().enumerate().skip(first) {
        e.set_tokens(&[tok, tok])?;
        let logits = e.step_logits(use_graph, 32)?;
        let d = (logits - reference.get(i as i64).unsqueeze(0))
            .abs()
            .max()
            .double_value(&[]);
        worst = worst.max(d);
    }
    // Continuous batching through the same engine (graph replay on CUDA):
    // three greedy requests on two slots must give what one-at-a-time
    // reference generation gives (f32 only: bf16 may flip near-ties).
    let batch_ok = if kind == Kind::Float {
        let reqs: Vec<crate::generate::GenerateRequest> = [&ids[..3], &ids[5..9], &ids[2..4]]
            .iter()
            .map(|p| crate::generate::GenerateRequest {
                prompt_ids: p.to_vec(),
                max_tokens: 6,
                sampling: crate::sample::SamplingParams::default(),
                stop: vec![],
                stop_ids: vec![],
                top_logprobs: None,
            })
            .collect();
        let alone: Vec<Vec<i64>> = reqs
            .iter()
            .map(|r| crate::generate::generate(&m.model, None, r, |_| {}).map(|o| o.tokens))
            .collect::<Result<_>>()?;
        let mut e2 = DecodeEngine::from_model(&m.model, 2, 64)?;
        let out = crate::batch::run_batch(&mut e2, reqs, None, use_graph, |_| {})?;
        Some(out.iter().zip(&alone).all(|(o, a)| &o.tokens == a))
    } else {
        None
    };
    let ok = worst.is_finite() && worst <= tol && batch_ok != Some(false);
    println!(
        "{}",
        serde_json::json!({"check": "engine vs reference", "device": format!("{device:?}"), "dtype": format!("{kind:?}"), "attn": format!("{:?}", e.attn), "fused": e.fused(),
            "graph": use_graph, "max_abs_diff": worst, "tol": tol, "batch_matches_alone": batch_ok, "ok": ok})
    );
    if ok {
        Ok(())
    } else {
        Err(GpuError::Invalid(format!(
            "engine differs from the reference by {worst} > {tol}"
        )))
    }
}
