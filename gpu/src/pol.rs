//! Proof-of-Learning in floats: training a delta for one layer of a model
//! and measuring a model's validation loss (spec/pol.md POL-TRAIN-*,
//! POL-EVAL-*).
//!
//! What it does:
//! - loads a model's weights as a name → tensor map (a block directory or
//!   the embedded model) and applies accepted delta payloads to it in order
//!   (the head of a target is its genesis block plus its accepted deltas);
//! - [`train_target`]: full fine-tuning of one target's tensors (a decoder
//!   layer, an expert or a router), or LoRA of rank r on its matrices, with
//!   tch autograd and AdamW, batches drawn by a seeded SplitMix64 from the
//!   training tokens; returns the dense update per tensor, which
//!   [`crate::delta::compress`] turns into a payload;
//! - [`mean_loss_micronats`]: mean next-token cross-entropy over windows,
//!   CPU, f32, the per-token losses summed on the host in f64 in window
//!   order (POL-EVAL-2), so the same machine gives the same bits.
//!
//! What it does not do: choose the windows (the core's POL-VAL-3 does), or
//! decide anything (validators reveal what this measures, POL-32).

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{GpuError, Result};
use crate::model::{LayerRange, Qwen3};
use crate::rng::SplitMix64;

/// A model's weights on the CPU in f32, by transformers' names.
pub struct Weights {
    pub cfg: ModelConfig,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    /// The weights of a block directory (`manifest.json`, every block
    /// verified against its SHA3-256) or, with `None`, the embedded model.
    pub fn load(dir: Option<&Path>) -> Result<Weights> {
        match dir {
            Some(dir) => {
                let mut store = crate::blocks::BlockStore::open(dir)?;
                store.load_all()?;
                let cfg = store.model_config()?;
                let names: Vec<String> = store
                    .blocks
                    .iter()
                    .flat_map(|b| b.tensors.iter().cloned())
                    .collect();
                let mut tensors = BTreeMap::new();
                for n in names {
                    use crate::weights::TensorSource;
                    let t = store.tensor(&n)?.to_kind(Kind::Float).copy();
                    tensors.insert(n, t);
                }
                Ok(Weights { cfg, tensors })
            }
            None => {
                let cfg = crate::default_model::default_config();
                let tensors =
                    crate::default_model::random_weights(&cfg, crate::default_model::DEFAULT_SEED);
                Ok(Weights { cfg, tensors })
            }
        }
    }

    /// The names of `target`'s tensors (POL-TRAIN-3: those
    /// [`crate::blocks::block_of`] puts in the target's block), sorted; an
    /// error if the model has none.
    pub fn target_names(&self, target: Target) -> Result<Vec<String>> {
        let block = target.block_name();
        let names: Vec<String> = self
            .tensors
            .keys()
            .filter(|n| crate::blocks::block_of(n) == block)
            .cloned()
            .collect();
        if names.is_empty() {
            return Err(GpuError::Invalid(format!(
                "the model has no {block} (it has {} layers{})",
                self.cfg.num_hidden_layers,
                if self.cfg.moe.is_some() {
                    ", MoE"
                } else {
                    ", no experts"
                }
            )));
        }
        Ok(names)
    }

    /// POL-DELTA-6: applies a payload to these weights (an inapplicable
    /// payload is an error and changes nothing).
    pub fn apply_delta(&mut self, payload: &[u8]) -> Result<()> {
        self.tensors = crate::delta::apply_bytes(&self.tensors, payload)?;
        Ok(())
    }

    /// POL-DELTA-6 for a delta of `target`: a payload that names a tensor
    /// outside the target's block is inapplicable (a delta for one layer
    /// may not rewrite another, or the embedding). Decoded once, with the
    /// core's bounded decoder; on error nothing changes.
    pub fn apply_target_delta(&mut self, target: Target, payload: &[u8]) -> Result<()> {
        let decoded = blyan_state_machine::pol::delta::DeltaPayload::decode(payload)?;
        let names = self.target_names(target)?;
        if let Some(t) = decoded
            .tensors
            .iter()
            .find(|t| names.binary_search(&t.name).is_err())
        {
            return Err(GpuError::DeltaNotApplicable {
                name: t.name.clone(),
                reason: format!("not a tensor of the delta's target {target}"),
            });
        }
        self.tensors = crate::delta::apply(&self.tensors, &decoded)?;
        Ok(())
    }

    /// A copy sharing every tensor's storage (deltas replace tensors, never
    /// write into them).
    pub fn shallow(&self) -> Weights {
        Weights {
            cfg: self.cfg.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
        }
    }

    /// The model on the CPU in f32.
    pub fn model(&self) -> Result<Qwen3> {
        Qwen3::load(
            &self.cfg,
            &self.tensors,
            LayerRange::full(&self.cfg),
            Device::Cpu,
            Kind::Float,
        )
    }
}

/// A PoL target (POL-12): one decoder layer (attention, norms and a dense
/// MLP), one expert of an MoE layer, or an MoE layer's router. Its tensors
/// are the block [`crate::blocks::block_of`] names `layer.N`,
/// `layer.N.expert.E` or `layer.N.router`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Layer(u32),
    Expert { layer: u32, expert: u32 },
    Router(u32),
}

impl Target {
    /// The block name, as the block directory's manifest spells it.
    pub fn block_name(self) -> String {
        match self {
            Target::Layer(l) => format!("layer.{l}"),
            Target::Expert { layer, expert } => format!("layer.{layer}.expert.{expert}"),
            Target::Router(l) => format!("layer.{l}.router"),
        }
    }

    /// The decoder layer the target is in.
    pub fn layer(self) -> u32 {
        match self {
            Target::Layer(l) | Target::Router(l) | Target::Expert { layer: l, .. } => l,
        }
    }

    /// Parses a block name (`layer.1`, `layer.3.expert.7`, `layer.3.router`).
    pub fn parse(s: &str) -> Result<Target> {
        let bad = || {
            GpuError::Invalid(format!(
                "{s:?} is not a target (layer.N, layer.N.expert.E or layer.N.router)"
            ))
        };
        let parts: Vec<&str> = s.split('.').collect();
        let num = |x: &str| x.parse::<u32>().map_err(|_| bad());
        match parts.as_slice() {
            ["layer", l] => Ok(Target::Layer(num(l)?)),
            ["layer", l, "expert", e] => Ok(Target::Expert {
                layer: num(l)?,
                expert: num(e)?,
            }),
            ["layer", l, "router"] => Ok(Target::Router(num(l)?)),
            _ => Err(bad()),
        }
    }

    /// The target of a chain target key (POL-12); `None` for a key that is
    /// not a layer, expert or router.
    pub fn from_key(key: &blyan_state_machine::pol::TargetKey) -> Option<Target> {
        use blyan_state_machine::pol::PolBlockType as T;
        match (key.kind, key.layer, key.expert) {
            (T::Layer, Some(l), None) => Some(Target::Layer(l)),
            (T::Expert, Some(l), Some(e)) => Some(Target::Expert {
                layer: l,
                expert: e,
            }),
            (T::Router, Some(l), None) => Some(Target::Router(l)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.block_name())
    }
}

/// POL-EVAL-2: mean next-token cross-entropy of `model` over `windows`
/// (each at least 2 tokens), in micro-nats per token, rounded to nearest.
/// Per-token losses come from one f32 forward pass per window; they are
/// summed on the host in f64 in window order, then token order.
pub fn mean_loss_micronats(model: &Qwen3, windows: &[Vec<i64>]) -> Result<u64> {
    let _guard = tch::no_grad_guard();
    check_windows(model, windows)?;
    mean_of(windows.iter().map(|w| {
        let ids = Tensor::from_slice(w).unsqueeze(0);
        let logits = model.forward(&ids, &mut crate::model::KvCache::new())?;
        Ok(losses_of(&logits, &ids))
    }))
}

fn check_windows(model: &Qwen3, windows: &[Vec<i64>]) -> Result<()> {
    if windows.is_empty() {
        return Err(GpuError::Invalid("no windows".into()));
    }
    for w in windows {
        if w.len() < 2 {
            return Err(GpuError::Invalid("a window needs at least 2 tokens".into()));
        }
        model.check_ids(w)?;
    }
    Ok(())
}

/// POL-EVAL-2's sum: per-window token losses (f32) read back and summed
/// in f64, window order then token order; the mean in micro-nats.
fn mean_of(per_window: impl Iterator<Item = Result<Tensor>>) -> Result<u64> {
    let mut sum = 0f64;
    let mut count = 0u64;
    for losses in per_window {
        let values: Vec<f32> = Vec::<f32>::try_from(losses?.flatten(0, -1))
            .map_err(|e| GpuError::Invalid(format!("loss readback: {e}")))?;
        for v in values {
            if !v.is_finite() {
                return Err(GpuError::Invalid("a non-finite loss".into()));
            }
            sum += f64::from(v);
            count += 1;
        }
    }
    if count == 0 {
        return Err(GpuError::Invalid("no windows".into()));
    }
    let micro = (sum / count as f64 * 1e6).round();
    assert!(micro >= 0.0, "cross-entropy is never negative");
    Ok(micro as u64)
}

/// POL-EVAL-8: the hidden states entering decoder layer `layer`, one per
/// window, computed once by the embedding and the layers below it. A
/// delta changes only its target's block, inside layer `layer`
/// (POL-TRAIN-3), so the head and the candidate share these inputs.
pub struct LayerInputs {
    layer: i64,
    hidden: Vec<Tensor>,
    ids: Vec<Tensor>,
}

impl LayerInputs {
    /// Runs `weights`' embedding and layers `0..layer` on every window.
    pub fn compute(weights: &Weights, layer: u32, windows: &[Vec<i64>]) -> Result<LayerInputs> {
        let _guard = tch::no_grad_guard();
        let layer = i64::from(layer);
        let lower = Qwen3::load(
            &weights.cfg,
            &weights.tensors,
            LayerRange {
                start: 0,
                end: layer,
                embed: true,
                head: false,
            },
            Device::Cpu,
            Kind::Float,
        )?;
        check_windows(&lower, windows)?;
        let mut hidden = Vec::with_capacity(windows.len());
        let mut ids = Vec::with_capacity(windows.len());
        for w in windows {
            let t = Tensor::from_slice(w).unsqueeze(0);
            let x = lower.embed(&t)?;
            hidden.push(lower.forward_layers(&x, &mut crate::model::KvCache::new())?);
            ids.push(t);
        }
        Ok(LayerInputs { layer, hidden, ids })
    }

    /// POL-EVAL-2's mean loss of `weights` from these inputs up: layers
    /// `layer..` and the head. Bit for bit the loss of the whole model
    /// when `weights` agree with the inputs' model below `layer`.
    pub fn mean_loss_micronats(&self, weights: &Weights) -> Result<u64> {
        let _guard = tch::no_grad_guard();
        let upper = Qwen3::load(
            &weights.cfg,
            &weights.tensors,
            LayerRange {
                start: self.layer,
                end: weights.cfg.num_hidden_layers,
                embed: false,
                head: true,
            },
            Device::Cpu,
            Kind::Float,
        )?;
        mean_of(self.hidden.iter().zip(&self.ids).map(|(h, ids)| {
            let x = upper.forward_layers(h, &mut crate::model::KvCache::new())?;
            Ok(losses_of(&upper.head(&x)?, ids))
        }))
    }
}

/// What a validator reveals for a delta (POL-32), measured in one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub head_loss_micronats: u64,
    pub loss_micronats: u64,
}

/// POL-EVAL-1: the model is `base` with every target's accepted deltas
/// applied (`accepted`: each with its target, a target's oldest first);
/// the candidate is that model with `delta` applied to `target`. Both losses on `windows`,
/// from the target's layer up on inputs computed once (POL-EVAL-8): the
/// same bits as two whole-model passes.
/// POL-EVAL-3: a delta that does not decode or apply, or names a tensor
/// outside `target` (POL-DELTA-6), is worth `loss_micronats = u64::MAX` (an
/// improvement of 0), and so is one whose loss is not finite; an accepted
/// delta that does not apply is an error (this node's weights are not the
/// chain's).
pub fn evaluate_delta(
    base: &Weights,
    target: Target,
    accepted: &[(Target, Vec<u8>)],
    delta: &[u8],
    windows: &[Vec<i64>],
) -> Result<Evaluation> {
    let mut head = base.shallow();
    for (t, payload) in accepted {
        head.apply_target_delta(*t, payload)?;
    }
    // POL-EVAL-8: the layers below the target's run once.
    let inputs = LayerInputs::compute(&head, target.layer(), windows)?;
    let head_loss_micronats = inputs.mean_loss_micronats(&head)?;
    let mut candidate = head;
    let loss_micronats = match candidate.apply_target_delta(target, delta) {
        // A candidate whose loss is not finite is worth nothing too.
        Ok(()) => inputs.mean_loss_micronats(&candidate).unwrap_or(u64::MAX),
        Err(_) => u64::MAX,
    };
    Ok(Evaluation {
        head_loss_micronats,
        loss_micronats,
    })
}

/// Per-token losses `[batch, seq - 1]` (f32) of token ids `[batch, seq]`.
fn token_losses(model: &Qwen3, ids: &Tensor) -> Result<Tensor> {
    let logits = model.forward(ids, &mut crate::model::KvCache::new())?;
    Ok(losses_of(&logits, ids))
}

/// Next-token cross-entropy `[batch, seq - 1]` of `logits` for `ids`.
fn losses_of(logits: &Tensor, ids: &Tensor) -> Tensor {
    let (_, s) = ids.size2().expect("ids are [batch, seq]");
    let logp = logits.narrow(1, 0, s - 1).log_softmax(-1, Kind::Float);
    let target = ids
        .narrow(1, 1, s - 1)
        .to_device(logp.device())
        .unsqueeze(-1);
    logp.gather(-1, &target, false).squeeze_dim(-1).neg()
}

/// libtorch's intra-op thread count for this process (POL-EVAL-2 names
/// it as an input of the bits an evaluation gives).
pub fn set_threads(n: i32) {
    tch::set_num_threads(n);
}

/// Training settings (POL-TRAIN-1, POL-TRAIN-3).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    pub steps: u32,
    /// Sequences per step.
    pub batch: u32,
    /// Tokens per sequence (predictions per sequence: `seq_tokens - 1`).
    pub seq_tokens: u32,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub device: Device,
    /// POL-TRAIN-3: LoRA of this rank on the target's matrices; `None` is
    /// full fine-tuning of every tensor of the target.
    pub lora_rank: Option<u32>,
    /// LoRA's α: the adapter's product is scaled by `α / rank`.
    pub lora_alpha: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 200,
            batch: 8,
            seq_tokens: 128,
            learning_rate: 3e-3,
            weight_decay: 0.0,
            seed: 1,
            device: Device::Cpu,
            lora_rank: None,
            lora_alpha: 16.0,
        }
    }
}

/// One training step's report, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    pub step: u32,
    pub loss: f64,
    pub tokens: u64,
}

/// The result of [`train_target`]: the dense update of each trained tensor
/// of the target (trained − head, f32 on the CPU), by name. With LoRA the
/// update of a matrix is `α / r · B A` (rank ≤ r) and norms are untouched.
pub struct Trained {
    pub updates: BTreeMap<String, Tensor>,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Parameters the optimiser trained (LoRA factors or whole tensors).
    pub trained_parameters: u64,
}

impl Trained {
    /// POL-DELTA-7: the update as a payload at `density_ppm` (bases f32).
    pub fn compress(&self, density_ppm: u32) -> Result<Vec<u8>> {
        let updates: Vec<crate::delta::NamedUpdate<'_>> = self
            .updates
            .iter()
            .map(|(n, u)| crate::delta::NamedUpdate {
                name: n,
                update: u,
                base_kind: Kind::Float,
            })
            .collect();
        crate::delta::compress_to_bytes(&updates, density_ppm)
    }

    /// Bytes of the dense update in bf16 (what compression is measured against).
    pub fn dense_bf16_bytes(&self) -> u64 {
        self.updates.values().map(|t| t.numel() as u64 * 2).sum()
    }

    /// `weights` with the dense (uncompressed) update added.
    pub fn apply_dense(&self, weights: &Weights) -> Weights {
        let mut out = weights.shallow();
        for (n, u) in &self.updates {
            let t = &out.tensors[n] + u;
            out.tensors.insert(n.clone(), t);
        }
        out
    }
}

/// Seed tag of the LoRA A factors' initialisation (POL-TRAIN-3).
const LORA_INIT_TAG: u64 = 0x4c6f_5241_696e_6974; // "LoRAinit"

/// What the optimiser updates: the target's tensors themselves, or a LoRA
/// pair `(A [r, in], B [out, r])` per matrix.
enum Adapters {
    Full,
    Lora { matrices: Vec<String>, scale: f64 },
}

/// POL-TRAIN-1 / POL-TRAIN-3: trains `target` (the rest frozen) on `tokens`
/// with AdamW (β = 0.9, 0.999, ε = 1e-8), sequences drawn at offsets from
/// SplitMix64(`seed`). Full fine-tuning updates every tensor of the target;
/// with `lora_rank = Some(r)` each matrix `W` of the target trains as
/// `W + α/r · B A` with `B = 0` and `A` uniform in ±1/√in from
/// SplitMix64(`seed` ^ tag), norms frozen. Calls `progress` after each step.
pub fn train_target(
    weights: &Weights,
    target: Target,
    tokens: &[i64],
    opts: &TrainOptions,
    mut progress: impl FnMut(StepReport),
) -> Result<Trained> {
    let seq = i64::from(opts.seq_tokens);
    if opts.steps == 0 || opts.batch == 0 || seq < 2 {
        return Err(GpuError::Invalid(
            "training needs steps, batch ≥ 1 and seq_tokens ≥ 2".into(),
        ));
    }
    if (tokens.len() as i64) < seq {
        return Err(GpuError::Invalid(format!(
            "the training data has {} tokens, fewer than one sequence of {seq}",
            tokens.len()
        )));
    }
    let names = weights.target_names(target)?;
    let mut map: BTreeMap<String, Tensor> = weights
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(opts.device)))
        .collect();
    let mut params = Vec::new();
    let mut param_names = Vec::new();
    let adapters = match opts.lora_rank {
        None => {
            for n in &names {
                let leaf = map[n].detach().copy().set_requires_grad(true);
                map.insert(n.clone(), leaf.shallow_clone());
                params.push(leaf);
                param_names.push(n.clone());
            }
            Adapters::Full
        }
        Some(rank) => {
            if rank == 0 || !(opts.lora_alpha.is_finite() && opts.lora_alpha > 0.0) {
                return Err(GpuError::Invalid(
                    "LoRA needs a rank ≥ 1 and a finite α > 0".into(),
                ));
            }
            let matrices: Vec<String> = names
                .iter()
                .filter(|n| map[*n].dim() == 2)
                .cloned()
                .collect();
            if matrices.is_empty() {
                return Err(GpuError::Invalid(format!(
                    "{target} has no matrices for LoRA"
                )));
            }
            let mut rng = SplitMix64::new(opts.seed ^ LORA_INIT_TAG);
            for n in &matrices {
                let (rows, cols) = map[n].size2().expect("a matrix");
                let r = i64::from(rank);
                if r > rows.min(cols) {
                    return Err(GpuError::Invalid(format!(
                        "LoRA rank {rank} exceeds {n}'s {rows} × {cols}"
                    )));
                }
                let bound = 1.0 / (cols as f64).sqrt();
                let a: Vec<f32> = (0..r * cols)
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                let a = Tensor::from_slice(&a)
                    .view([r, cols])
                    .to_device(opts.device)
                    .set_requires_grad(true);
                let b =
                    Tensor::zeros([rows, r], (Kind::Float, opts.device)).set_requires_grad(true);
                params.push(a);
                params.push(b);
                param_names.push(format!("{n} (LoRA A)"));
                param_names.push(format!("{n} (LoRA B)"));
            }
            Adapters::Lora {
                matrices,
                scale: opts.lora_alpha / f64::from(rank),
            }
        }
    };
    let trained_parameters = params.iter().map(|p| p.numel() as u64).sum();
    // The model with the adapters' current values (rebuilt each step for
    // LoRA; full fine-tuning shares the leaves, so one model serves).
    let build = |params: &[Tensor]| -> Result<Qwen3> {
        let mut m: BTreeMap<String, Tensor> = map
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        if let Adapters::Lora { matrices, scale } = &adapters {
            for (i, n) in matrices.iter().enumerate() {
                let (a, b) = (&params[2 * i], &params[2 * i + 1]);
                m.insert(n.clone(), &map[n] + b.matmul(a) * *scale);
            }
        }
        Qwen3::load(
            &weights.cfg,
            &m,
            LayerRange::full(&weights.cfg),
            opts.device,
            Kind::Float,
        )
    };
    let mut model = build(&params)?;
    let data = Tensor::from_slice(tokens);
    let mut rng = SplitMix64::new(opts.seed);
    let starts = tokens.len() as u64 - seq as u64 + 1;
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut m: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
    let mut v: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let mut reached = vec![false; params.len()];
    for step in 1..=opts.steps {
        if step > 1 && matches!(adapters, Adapters::Lora { .. }) {
            model = build(&params)?;
        }
        let rows: Vec<Tensor> = (0..opts.batch)
            .map(|_| data.narrow(0, (rng.next_u64() % starts) as i64, seq))
            .collect();
        let ids = Tensor::stack(&rows, 0).to_device(opts.device);
        let loss = token_losses(&model, &ids)?.mean(Kind::Float);
        loss.backward();
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(GpuError::Invalid(format!(
                "training diverged at step {step} (loss {value})"
            )));
        }
        if step == 1 {
            first_loss = value;
        }
        last_loss = value;
        tch::no_grad(|| -> Result<()> {
            let t = f64::from(step as i32);
            for (i, p) in params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    // An expert no token was routed to in this batch.
                    continue;
                }
                reached[i] = true;
                m[i] = &m[i] * b1 + &g * (1.0 - b1);
                v[i] = &v[i] * b2 + g.square() * (1.0 - b2);
                let mhat = &m[i] / (1.0 - b1.powf(t));
                let vhat = &v[i] / (1.0 - b2.powf(t));
                let step_t = mhat / (vhat.sqrt() + eps) * opts.learning_rate
                    + &*p * (opts.learning_rate * opts.weight_decay);
                let _ = p.f_sub_(&step_t)?;
                p.zero_grad();
            }
            Ok(())
        })?;
        progress(StepReport {
            step,
            loss: value,
            tokens: u64::from(opts.batch) * seq as u64,
        });
    }
    if let Some(i) = reached.iter().position(|r| !r) {
        return Err(GpuError::Invalid(format!(
            "no gradient reached {} in {} steps (no token was routed through it?)",
            param_names[i], opts.steps
        )));
    }
    let updates = match &adapters {
        Adapters::Full => names
            .iter()
            .zip(&params)
            .map(|(n, p)| {
                let trained = p.detach().to_device(Device::Cpu);
                (n.clone(), trained - &weights.tensors[n])
            })
            .collect(),
        Adapters::Lora { matrices, scale } => matrices
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let (a, b) = (params[2 * i].detach(), params[2 * i + 1].detach());
                (n.clone(), (b.matmul(&a) * *scale).to_device(Device::Cpu))
            })
            .collect(),
    };
    Ok(Trained {
        updates,
        first_loss,
        last_loss,
        trained_parameters,
    })
}

/// The windows of `tokens` at `starts`, `window_tokens` each (POL-VAL-3's
/// offsets).
pub fn windows(tokens: &[i64], starts: &[u64], window_tokens: usize) -> Result<Vec<Vec<i64>>> {
    starts
        .iter()
        .map(|&s| {
            let s = s as usize;
            tokens
                .get(s..s + window_tokens)
                .map(<[i64]>::to_vec)
                .ok_or_else(|| GpuError::Invalid(format!("window at {s} is outside the pool")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_tokens() -> Vec<i64> {
        "the cat sat on the mat. the dog sat on the log. "
            .repeat(40)
            .bytes()
            .map(i64::from)
            .collect()
    }

    #[test]
    fn pol_train_1_training_a_layer_lowers_its_loss_and_touches_only_that_layer() {
        let w = Weights::load(None).unwrap();
        let tokens = text_tokens();
        let opts = TrainOptions {
            steps: 30,
            batch: 4,
            seq_tokens: 64,
            ..TrainOptions::default()
        };
        let mut reports = 0;
        let trained = train_target(&w, Target::Layer(1), &tokens, &opts, |_| reports += 1).unwrap();
        assert_eq!(reports, 30);
        assert!(
            trained.last_loss < trained.first_loss * 0.9,
            "{} -> {}",
            trained.first_loss,
            trained.last_loss
        );
        assert!(
            trained
                .updates
                .keys()
                .all(|n| n.starts_with("model.layers.1."))
        );
        assert_eq!(
            trained.updates.len(),
            w.target_names(Target::Layer(1)).unwrap().len()
        );
        // q 128·128, k and v 64·128, o 128·128, three MLP matrices 128·384,
        // four norms 128 + 128 + 32 + 32.
        assert_eq!(trained.trained_parameters, 196_928);
        // Applying the dense update lowers the loss on the same text.
        let windows = windows(&tokens, &[0, 100, 700], 64).unwrap();
        let before = mean_loss_micronats(&w.model().unwrap(), &windows).unwrap();
        let mut after = Weights {
            cfg: w.cfg.clone(),
            tensors: w
                .tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
        };
        for (n, u) in &trained.updates {
            let t = &after.tensors[n] + u;
            after.tensors.insert(n.clone(), t);
        }
        let after = mean_loss_micronats(&after.model().unwrap(), &windows).unwrap();
        assert!(after < before, "{after} !< {before}");
        // Same seed, same update (CPU).
        let again = train_target(&w, Target::Layer(1), &tokens, &opts, |_| {}).unwrap();
        for (n, u) in &trained.updates {
            assert!(
                u.equal(&again.updates[n]),
                "{n} differs between two seeded runs"
            );
        }
    }

    #[test]
    fn pol_eval_2_loss_is_reproducible_and_refuses_bad_windows() {
        let w = Weights::load(None).unwrap();
        let model = w.model().unwrap();
        let tokens = text_tokens();
        let ws = windows(&tokens, &[3, 50], 32).unwrap();
        let a = mean_loss_micronats(&model, &ws).unwrap();
        assert_eq!(a, mean_loss_micronats(&model, &ws).unwrap());
        // A random model is near the uniform loss ln(272) = 5.6 nats.
        assert!((3_000_000..9_000_000).contains(&a), "{a}");
        assert!(mean_loss_micronats(&model, &[vec![1]]).is_err());
        assert!(mean_loss_micronats(&model, &[]).is_err());
        assert!(mean_loss_micronats(&model, &[vec![1, 999]]).is_err());
        assert!(windows(&tokens, &[tokens.len() as u64], 2).is_err());
        assert!(w.target_names(Target::Layer(99)).is_err());
        assert!(
            w.target_names(Target::Router(0)).is_err(),
            "a dense model has no router"
        );
    }

    #[test]
    fn pol_train_3_lora_trains_a_low_rank_update_of_the_matrices_only() {
        let w = Weights::load(None).unwrap();
        let tokens = text_tokens();
        let opts = TrainOptions {
            steps: 30,
            batch: 4,
            seq_tokens: 64,
            lora_rank: Some(4),
            learning_rate: 1e-2,
            ..TrainOptions::default()
        };
        let trained = train_target(&w, Target::Layer(2), &tokens, &opts, |_| {}).unwrap();
        assert!(
            trained.last_loss < trained.first_loss * 0.95,
            "{} -> {}",
            trained.first_loss,
            trained.last_loss
        );
        // The seven projections of the layer, not its three norms.
        let matrices: Vec<&String> = trained.updates.keys().collect();
        assert_eq!(matrices.len(), 7, "{matrices:?}");
        assert!(
            matrices
                .iter()
                .all(|n| n.starts_with("model.layers.2.") && n.ends_with("proj.weight"))
        );
        // r (in + out) per matrix: q 4·(128+128), k,v 4·(128+64), o 4·(128+128),
        // gate, up 4·(128+384), down 4·(384+128).
        assert_eq!(
            trained.trained_parameters,
            4 * (256 + 192 * 2 + 256 + 512 * 3)
        );
        for (n, u) in &trained.updates {
            assert_eq!(u.size(), w.tensors[n].size(), "{n}");
            let (_, singular, _) = u.svd(true, false);
            let top = singular.double_value(&[0]);
            assert!(top > 0.0, "{n} did not move");
            // Rank ≤ 4: the fifth singular value is rounding noise.
            assert!(singular.double_value(&[4]) < top * 1e-4, "{n} has rank > 4");
        }
        // The compressed LoRA update lowers the loss, and only on layer 2.
        let payload = trained.compress(250_000).unwrap();
        let ws = windows(&tokens, &[0, 100, 700], 64).unwrap();
        let e = evaluate_delta(&w, Target::Layer(2), &[], &payload, &ws).unwrap();
        assert!(e.loss_micronats < e.head_loss_micronats, "{e:?}");
        // The same payload claimed for layer 1 names tensors outside it.
        let e1 = evaluate_delta(&w, Target::Layer(1), &[], &payload, &ws).unwrap();
        assert_eq!(e1.loss_micronats, u64::MAX);
        assert_eq!(e1.head_loss_micronats, e.head_loss_micronats);
        // Bad settings are refused.
        for bad in [Some(0), Some(129)] {
            let o = TrainOptions {
                lora_rank: bad,
                ..opts.clone()
            };
            assert!(train_target(&w, Target::Layer(2), &tokens, &o, |_| {}).is_err());
        }
    }

    #[test]
    fn pol_eval_8_from_the_target_layer_up_gives_the_whole_models_bits() {
        let w = Weights::load(None).unwrap();
        let tokens = text_tokens();
        let ws = windows(&tokens, &[3, 50, 400], 40).unwrap();
        let whole = mean_loss_micronats(&w.model().unwrap(), &ws).unwrap();
        for layer in 0..=4 {
            let inputs = LayerInputs::compute(&w, layer, &ws).unwrap();
            assert_eq!(
                inputs.mean_loss_micronats(&w).unwrap(),
                whole,
                "layer {layer}"
            );
        }
        // A candidate that differs in layer 2 only, on the head's inputs.
        let mut candidate = w.shallow();
        for n in w.target_names(Target::Layer(2)).unwrap() {
            let t = &w.tensors[&n] * 1.5;
            candidate.tensors.insert(n, t);
        }
        let changed = mean_loss_micronats(&candidate.model().unwrap(), &ws).unwrap();
        assert_ne!(changed, whole);
        let inputs = LayerInputs::compute(&w, 2, &ws).unwrap();
        assert_eq!(inputs.mean_loss_micronats(&candidate).unwrap(), changed);
        // Inputs above the change would miss it: the layer matters.
        let above = LayerInputs::compute(&w, 3, &ws).unwrap();
        assert_eq!(above.mean_loss_micronats(&candidate).unwrap(), whole);
        assert!(LayerInputs::compute(&w, 5, &ws).is_err());
        assert!(LayerInputs::compute(&w, 1, &[]).is_err());
    }

    #[test]
    fn pol_train_3_targets_parse_and_name_their_blocks() {
        for (s, t) in [
            ("layer.1", Target::Layer(1)),
            (
                "layer.3.expert.7",
                Target::Expert {
                    layer: 3,
                    expert: 7,
                },
            ),
            ("layer.0.router", Target::Router(0)),
        ] {
            assert_eq!(Target::parse(s).unwrap(), t);
            assert_eq!(t.to_string(), s);
        }
        for bad in [
            "",
            "layer",
            "layer.x",
            "expert.1.2",
            "layer.1.expert",
            "layer.1.router.2",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
