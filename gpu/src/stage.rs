//! Pipeline stages: a model instance holding a contiguous layer range runs
//! its part of a request, taking and returning hidden states as bytes with
//! their shape and dtype, so that one model can span several nodes.

use tch::{Device, Kind, Tensor};

use crate::error::{GpuError, Result};
use crate::model::{KvCache, MoeContext, Qwen3};

/// Hidden states on the wire: little-endian elements, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HiddenStates {
    /// `[batch, seq, hidden]`
    pub shape: Vec<i64>,
    /// `"f32"` or `"bf16"`
    pub dtype: String,
    pub bytes: Vec<u8>,
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    match kind {
        Kind::Float => Ok("f32"),
        Kind::BFloat16 => Ok("bf16"),
        other => Err(GpuError::Invalid(format!(
            "hidden states of dtype {other:?}"
        ))),
    }
}

impl HiddenStates {
    /// Copies a tensor out to bytes.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let dtype = dtype_name(t.kind())?.to_owned();
        Ok(HiddenStates {
            shape: t.size(),
            dtype,
            bytes: tensor_bytes(t)?,
        })
    }

    /// The tensor on `device`, after checking that the bytes match the shape.
    pub fn to_tensor(&self, device: Device) -> Result<Tensor> {
        let kind = crate::parse_dtype(&self.dtype)?;
        let numel: i64 = self.shape.iter().product();
        if self.shape.len() != 3 || self.bytes.len() != numel as usize * kind.elt_size_in_bytes() {
            return Err(GpuError::Invalid(format!(
                "{} bytes do not hold {:?} of {}",
                self.bytes.len(),
                self.shape,
                self.dtype
            )));
        }
        Ok(Tensor::f_from_data_size(&self.bytes, &self.shape, kind)?.to_device(device))
    }
}

/// What a stage receives.
pub enum StageInput {
    /// Token ids `[batch][seq]` (the stage must hold the embedding).
    Ids(Vec<Vec<i64>>),
    Hidden(HiddenStates),
}

/// What a stage returns.
pub enum StageOutput {
    Hidden(HiddenStates),
    /// f32 logits `[batch, seq, vocab]` (the stage holds the head).
    Logits(Tensor),
}

impl StageOutput {
    /// The f32 logits of the first sequence's last position (what a
    /// generation samples from), if this is the head's output.
    pub fn last_logits(&self) -> Result<Option<Vec<f32>>> {
        match self {
            StageOutput::Hidden(_) => Ok(None),
            StageOutput::Logits(t) => Ok(Some(Vec::<f32>::try_from(&t.get(0).get(-1))?)),
        }
    }
}

impl Qwen3 {
    /// Runs this stage on `input`, extending `cache` (one per request).
    pub fn run_stage(&self, input: &StageInput, cache: &mut KvCache) -> Result<StageOutput> {
        self.run_stage_moe(input, cache, &mut MoeContext::default())
    }

    /// As `run_stage`, with MoE layers run as `moe` says (RT-PIPE-8).
    pub fn run_stage_moe(
        &self,
        input: &StageInput,
        cache: &mut KvCache,
        moe: &mut MoeContext,
    ) -> Result<StageOutput> {
        let _guard = tch::no_grad_guard();
        let x = match input {
            StageInput::Ids(rows) => {
                let width = rows.first().map_or(0, Vec::len);
                if width == 0 || rows.iter().any(|r| r.len() != width) {
                    return Err(GpuError::Invalid(
                        "token rows must be non-empty and of equal length".into(),
                    ));
                }
                rows.iter().try_for_each(|r| self.check_ids(r))?;
                let flat: Vec<i64> = rows.concat();
                self.embed(&Tensor::from_slice(&flat).view([rows.len() as i64, width as i64]))?
            }
            StageInput::Hidden(h) => {
                if self.range.embed {
                    return Err(GpuError::Invalid("this stage takes token ids".into()));
                }
                let t = h.to_tensor(self.device)?;
                if t.size()[2] != self.cfg.hidden_size {
                    return Err(GpuError::Invalid(format!(
                        "hidden size {} != {}",
                        t.size()[2],
                        self.cfg.hidden_size
                    )));
                }
                t.to_kind(self.kind)
            }
        };
        let x = self.forward_layers_moe(&x, cache, moe)?;
        if self.range.head {
            Ok(StageOutput::Logits(self.head(&x)?))
        } else {
            Ok(StageOutput::Hidden(HiddenStates::from_tensor(&x)?))
        }
    }
}

impl Qwen3 {
    /// Continuous batching (RT-PIPE-9): one decode step (one position) of
    /// each of several sessions, `inputs[j]` extending `caches[j]`, run as
    /// one batch ([`Qwen3::forward_decode_batch`]); one output per session.
    pub fn run_stage_batch(
        &self,
        inputs: &[StageInput],
        caches: &mut [&mut KvCache],
        moe: &mut MoeContext,
    ) -> Result<Vec<StageOutput>> {
        let _guard = tch::no_grad_guard();
        if inputs.is_empty() || inputs.len() != caches.len() {
            return Err(GpuError::Invalid(format!(
                "{} inputs for {} caches",
                inputs.len(),
                caches.len()
            )));
        }
        let b = inputs.len() as i64;
        let x = if self.range.embed {
            let ids = inputs
                .iter()
                .map(|i| match i {
                    StageInput::Ids(rows) if rows.len() == 1 && rows[0].len() == 1 => {
                        self.check_ids(&rows[0])?;
                        Ok(rows[0][0])
                    }
                    _ => Err(GpuError::Invalid(
                        "a batched step of the first stage is one token id".into(),
                    )),
                })
                .collect::<Result<Vec<i64>>>()?;
            self.embed(&Tensor::from_slice(&ids).view([b, 1]))?
        } else {
            let rows = inputs
                .iter()
                .map(|i| match i {
                    StageInput::Hidden(h) if h.shape.len() == 3 && h.shape[..2] == [1, 1] => {
                        let t = h.to_tensor(self.device)?;
                        if t.size()[2] != self.cfg.hidden_size {
                            return Err(GpuError::Invalid(format!(
                                "hidden size {} != {}",
                                t.size()[2],
                                self.cfg.hidden_size
                            )));
                        }
                        Ok(t.to_kind(self.kind))
                    }
                    _ => Err(GpuError::Invalid(
                        "a batched step is the hidden state of one position".into(),
                    )),
                })
                .collect::<Result<Vec<Tensor>>>()?;
            Tensor::cat(&rows, 0)
        };
        let x = self.forward_decode_batch(&x, caches, moe)?;
        if self.range.head {
            let logits = self.head(&x)?;
            Ok((0..b)
                .map(|j| StageOutput::Logits(logits.narrow(0, j, 1)))
                .collect())
        } else {
            (0..b)
                .map(|j| {
                    Ok(StageOutput::Hidden(HiddenStates::from_tensor(
                        &x.narrow(0, j, 1),
                    )?))
                })
                .collect()
        }
    }
}

/// A tensor's elements as little-endian bytes (on the CPU, row-major)./// A tensor's elements as little-endian bytes (on the CPU, row-major).
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok(bytes)
}

/// RT-PIPE-8: experts held elsewhere, as the bytes that cross the wire.
pub trait RemoteExpertBytes {
    /// For MoE layer `layer` (the model's numbering), each `(expert, rows,
    /// bytes)` of `work` holds `[rows, hidden]` values of `dtype` (`"f32"`
    /// or `"bf16"`), little-endian: each expert's unweighted output, in the
    /// same shape and dtype, in the order of `work`.
    fn compute(
        &mut self,
        layer: i64,
        dtype: &'static str,
        hidden: i64,
        work: Vec<(i64, i64, Vec<u8>)>,
    ) -> Result<Vec<Vec<u8>>>;
}

/// RT-PIPE-8: a [`RemoteExpertBytes`] as the forward pass asks for experts.
pub struct OverBytes<'a>(pub &'a mut dyn RemoteExpertBytes);

impl crate::model::RemoteExperts for OverBytes<'_> {
    fn compute(&mut self, layer: i64, work: Vec<(i64, Tensor)>) -> Result<Vec<Tensor>> {
        let Some((_, first)) = work.first() else {
            return Ok(Vec::new());
        };
        let (kind, device, hidden) = (first.kind(), first.device(), first.size()[1]);
        let dtype = dtype_name(kind)?;
        let rows: Vec<(i64, i64, Vec<u8>)> = work
            .iter()
            .map(|(e, t)| Ok((*e, t.size()[0], tensor_bytes(t)?)))
            .collect::<Result<_>>()?;
        let shapes: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let out = self.0.compute(layer, dtype, hidden, rows)?;
        if out.len() != shapes.len() {
            return Err(GpuError::Invalid(format!(
                "{} expert outputs for {} experts",
                out.len(),
                shapes.len()
            )));
        }
        out.iter()
            .zip(shapes)
            .map(|(b, n)| {
                if b.len() != (n * hidden) as usize * kind.elt_size_in_bytes() {
                    return Err(GpuError::Invalid(format!(
                        "{} bytes of expert output for {n} rows of {hidden}",
                        b.len()
                    )));
                }
                Ok(Tensor::f_from_data_size(b, &[n, hidden], kind)?.to_device(device))
            })
            .collect()
    }
}

impl crate::model::ExpertBank {
    /// As `forward`, on bytes: `rows` rows of `[hidden]` values of `dtype`,
    /// answered in the same dtype.
    pub fn forward_bytes(
        &self,
        layer: i64,
        expert: i64,
        dtype: &str,
        rows: i64,
        bytes: &[u8],
    ) -> Result<Vec<u8>> {
        let kind = crate::parse_dtype(dtype)?;
        if bytes.len() != (rows * self.hidden()) as usize * kind.elt_size_in_bytes() {
            return Err(GpuError::Invalid(format!(
                "{} bytes do not hold {rows} rows of {} {dtype}",
                bytes.len(),
                self.hidden()
            )));
        }
        let x = Tensor::f_from_data_size(bytes, &[rows, self.hidden()], kind)?;
        tensor_bytes(&self.forward(layer, expert, &x)?.to_kind(kind))
    }
}
