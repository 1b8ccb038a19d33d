//! Pipeline stages over the transport (spec/inference.md RT-PIPE-*): a
//! route of several nodes, each holding a contiguous layer range, with the
//! hidden states crossing the P2P transport and each stage keeping the
//! generation's KV cache.
//!
//! - RT-PIPE-1 (wire): one `blyan.p2p.v1.Peer/Stage` call (bidirectional
//!   streaming over the mutual-TLS client connection, not the consensus
//!   frame connections) is one session: the router's first message opens
//!   it ([`Open`]: model, layer range), then every step is a tensor
//!   ([`Step`]: the cache position it extends, token ids or hidden states
//!   with shape and dtype), answered by one tensor (hidden states, or the
//!   last position's f32 logits from the stage that holds the head) or an
//!   error. A tensor larger than [`MAX_STAGE_MESSAGE_BYTES`] is sent as a
//!   header message and continuation chunks (a 2,048-token prefill at
//!   hidden 4,096 in bf16 is 16 MiB); at most [`MAX_STAGE_TENSOR_BYTES`] in
//!   all. Every bound is checked before anything is allocated.
//! - RT-PIPE-2 (serving): a stage runs each step on its engine's queue like
//!   a `/chat` job (a full queue is `busy`), keeps one KV cache per session
//!   (at most `max_stage_sessions`, dropped after `stage_idle_ms` idle, and
//!   when the call ends), and refuses a step whose position is not its
//!   cache's length: the router and the stage agree on every position.
//! - RT-PIPE-3 (routing): the router runs the generation loop of a single
//!   process (`blyan_gpu::generate::generate_with`: the prompt as one
//!   prefill, then one token at a time, sampling at the router with the
//!   request's seed) with each forward pass sent through the stages in
//!   order; so under greedy decoding the tokens equal `blyan-gpu generate`.
//! - RT-PIPE-4 (failover): a stage that fails, disconnects, misses its
//!   deadline or answers malformed data is excluded and the request is
//!   replayed from the prompt on a new route (same seed, same step shapes,
//!   so every rebuilt cache is bit-identical to the lost one); text already
//!   streamed to the client is checked and not sent again (RT-STAGE-4).

use crate::Error;
use bytes::Bytes;

/// RT-PIPE-1: the largest message of a `Stage` call, either way.
pub const MAX_STAGE_MESSAGE_BYTES: usize = 1024 * 1024;
/// RT-PIPE-1: the largest tensor one step sends or returns (a 4,096-token
/// prefill at hidden 4,096 in f32 is 64 MiB).
pub const MAX_STAGE_TENSOR_BYTES: usize = 64 * 1024 * 1024;
/// RT-PIPE-1: messages buffered per direction of one call.
pub const STAGE_STREAM_BUFFER: usize = 16;
/// RT-PIPE-2: default bound on the sessions (KV caches) one stage keeps.
pub const DEFAULT_MAX_STAGE_SESSIONS: usize = 64;
/// RT-PIPE-2: default idle time after which a session's cache is dropped.
pub const DEFAULT_STAGE_IDLE_MS: u64 = 60_000;

const TAG_OPEN: u8 = b'o';
const TAG_STEP: u8 = b's';
const TAG_CONTINUE: u8 = b'c';
const TAG_ERROR: u8 = b'e';
/// tag, position u32, kind u8, dtype u8, three dims u32, total bytes u64.
const STEP_HEADER_BYTES: usize = 1 + 4 + 1 + 1 + 12 + 8;

/// RT-PIPE-1: the first message of a session.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Open {
    /// The meta block id (`0x…`) of the model.
    pub model: String,
    pub first_layer: u32,
    pub last_layer: u32,
}

/// Element type of a tensor on the wire (little-endian, row-major).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    I64,
}

impl Dtype {
    fn code(self) -> u8 {
        match self {
            Dtype::F32 => 0,
            Dtype::Bf16 => 1,
            Dtype::I64 => 2,
        }
    }

    fn from_code(c: u8) -> Result<Dtype, Error> {
        Ok(match c {
            0 => Dtype::F32,
            1 => Dtype::Bf16,
            2 => Dtype::I64,
            other => return Err(bad(format!("unknown dtype code {other}"))),
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
            Dtype::I64 => 8,
        }
    }

    /// The name `blyan_gpu::parse_dtype` takes (hidden states only).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::I64 => "i64",
        }
    }

    pub fn from_name(s: &str) -> Result<Dtype, Error> {
        match s {
            "f32" => Ok(Dtype::F32),
            "bf16" => Ok(Dtype::Bf16),
            other => Err(bad(format!("hidden states of dtype {other}"))),
        }
    }
}

/// What a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Token ids `[1, seq, 1]`, i64: the input of the stage with the embedding.
    Ids,
    /// Hidden states `[batch, seq, hidden]`, f32 or bf16.
    Hidden,
    /// The last position's logits `[1, 1, vocab]`, f32: the output of the
    /// stage with the head.
    Logits,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Ids => 0,
            Kind::Hidden => 1,
            Kind::Logits => 2,
        }
    }

    fn from_code(c: u8) -> Result<Kind, Error> {
        Ok(match c {
            0 => Kind::Ids,
            1 => Kind::Hidden,
            2 => Kind::Logits,
            other => return Err(bad(format!("unknown tensor kind {other}"))),
        })
    }
}

/// One step's tensor: an input to a stage or its output.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The cache position the step starts at (positions already cached).
    pub position: u32,
    pub kind: Kind,
    pub dtype: Dtype,
    pub shape: [u32; 3],
    pub bytes: Vec<u8>,
}

fn bad(msg: String) -> Error {
    Error::BadRequest(format!("stage message: {msg}"))
}

impl Step {
    /// Token ids as a step.
    pub fn ids(position: u32, ids: &[i64]) -> Step {
        Step {
            position,
            kind: Kind::Ids,
            dtype: Dtype::I64,
            shape: [1, u32::try_from(ids.len()).expect("a prompt fits u32"), 1],
            bytes: ids.iter().flat_map(|i| i.to_le_bytes()).collect(),
        }
    }

    /// The token ids of an `Ids` step.
    pub fn to_ids(&self) -> Result<Vec<i64>, Error> {
        if self.kind != Kind::Ids || self.dtype != Dtype::I64 || self.shape[0] != 1 {
            return Err(bad("expected token ids".into()));
        }
        Ok(self
            .bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// The f32 values of a `Logits` step.
    pub fn to_logits(&self) -> Result<Vec<f32>, Error> {
        if self.kind != Kind::Logits || self.dtype != Dtype::F32 {
            return Err(bad("expected f32 logits".into()));
        }
        Ok(self
            .bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    /// Positions the step covers (its sequence length).
    pub fn seq(&self) -> u32 {
        self.shape[1]
    }

    /// Bytes the shape and dtype call for, if they fit the bound.
    fn expected_bytes(kind: Kind, dtype: Dtype, shape: [u32; 3]) -> Result<usize, Error> {
        match (kind, dtype) {
            (Kind::Ids, Dtype::I64) | (Kind::Hidden, Dtype::F32 | Dtype::Bf16) => {}
            (Kind::Logits, Dtype::F32) => {}
            (k, d) => return Err(bad(format!("{k:?} in {d:?}"))),
        }
        if shape.contains(&0) {
            return Err(bad(format!("empty shape {shape:?}")));
        }
        if kind != Kind::Hidden && shape[0] != 1 {
            return Err(bad(format!("{kind:?} of batch {}", shape[0])));
        }
        let n = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(u64::from(d)))
            .filter(|&n| n <= MAX_STAGE_TENSOR_BYTES as u64)
            .ok_or_else(|| {
                bad(format!(
                    "a tensor of {shape:?} {} is over {MAX_STAGE_TENSOR_BYTES} bytes",
                    dtype.name()
                ))
            })?;
        Ok(n as usize)
    }

    /// RT-PIPE-1: the step as messages of at most [`MAX_STAGE_MESSAGE_BYTES`].
    pub fn encode(&self) -> Vec<Bytes> {
        let expected = Self::expected_bytes(self.kind, self.dtype, self.shape)
            .expect("an encoded step is well-formed");
        assert_eq!(expected, self.bytes.len(), "a step's bytes match its shape");
        let mut out = Vec::new();
        let mut head =
            Vec::with_capacity(STEP_HEADER_BYTES + self.bytes.len().min(MAX_STAGE_MESSAGE_BYTES));
        head.push(TAG_STEP);
        head.extend_from_slice(&self.position.to_le_bytes());
        head.push(self.kind.code());
        head.push(self.dtype.code());
        for d in self.shape {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&(self.bytes.len() as u64).to_le_bytes());
        let first = self
            .bytes
            .len()
            .min(MAX_STAGE_MESSAGE_BYTES - STEP_HEADER_BYTES);
        head.extend_from_slice(&self.bytes[..first]);
        out.push(Bytes::from(head));
        for chunk in self.bytes[first..].chunks(MAX_STAGE_MESSAGE_BYTES - 1) {
            let mut m = Vec::with_capacity(1 + chunk.len());
            m.push(TAG_CONTINUE);
            m.extend_from_slice(chunk);
            out.push(Bytes::from(m));
        }
        out
    }
}

/// The session's opening message.
pub fn encode_open(open: &Open) -> Bytes {
    let mut v = vec![TAG_OPEN];
    v.extend_from_slice(&serde_json::to_vec(open).expect("an Open serialises"));
    Bytes::from(v)
}

/// An error message (what a stage answers instead of a tensor).
pub fn encode_error(kind: &str, message: &str) -> Bytes {
    let body = serde_json::json!({ "kind": kind, "message": message });
    let mut v = vec![TAG_ERROR];
    v.extend_from_slice(body.to_string().as_bytes());
    Bytes::from(v)
}

/// A decoded message.
#[derive(Debug, PartialEq)]
pub enum Message {
    Open(Open),
    Step(Step),
    /// `(kind, message)`: `busy`, `bad_request` or `inference`.
    Error(String, String),
}

/// RT-PIPE-1: reassembles messages into [`Message`]s, refusing malformed
/// or oversized ones before allocating for them.
#[derive(Debug, Default)]
pub struct Assembler {
    partial: Option<(Step, usize)>,
}

impl Assembler {
    /// Takes one message; a complete [`Message`] when one is.
    pub fn push(&mut self, m: &[u8]) -> Result<Option<Message>, Error> {
        if m.len() > MAX_STAGE_MESSAGE_BYTES {
            return Err(bad(format!(
                "{} bytes is over the {MAX_STAGE_MESSAGE_BYTES}-byte message bound",
                m.len()
            )));
        }
        let (&tag, rest) = m.split_first().ok_or_else(|| bad("empty message".into()))?;
        if tag != TAG_CONTINUE && self.partial.is_some() {
            return Err(bad("a new message inside a chunked tensor".into()));
        }
        match tag {
            TAG_OPEN => {
                let open: Open =
                    serde_json::from_slice(rest).map_err(|e| bad(format!("open: {e}")))?;
                if open.first_layer > open.last_layer {
                    return Err(bad(format!(
                        "layers {}..={}",
                        open.first_layer, open.last_layer
                    )));
                }
                Ok(Some(Message::Open(open)))
            }
            TAG_ERROR => {
                #[derive(serde::Deserialize)]
                struct E {
                    kind: String,
                    message: String,
                }
                let e: E = serde_json::from_slice(rest).map_err(|e| bad(format!("error: {e}")))?;
                Ok(Some(Message::Error(e.kind, e.message)))
            }
            TAG_STEP => {
                if rest.len() < STEP_HEADER_BYTES - 1 {
                    return Err(bad("a short step header".into()));
                }
                let u32_at = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().expect("4"));
                let position = u32_at(0);
                let kind = Kind::from_code(rest[4])?;
                let dtype = Dtype::from_code(rest[5])?;
                let shape = [u32_at(6), u32_at(10), u32_at(14)];
                let total = u64::from_le_bytes(rest[18..26].try_into().expect("8"));
                let expected = Step::expected_bytes(kind, dtype, shape)?;
                if total != expected as u64 {
                    return Err(bad(format!(
                        "{total} bytes announced for {shape:?} {} ({expected})",
                        dtype.name()
                    )));
                }
                let data = &rest[STEP_HEADER_BYTES - 1..];
                if data.len() > expected {
                    return Err(bad("more bytes than the shape holds".into()));
                }
                let mut bytes = Vec::with_capacity(expected);
                bytes.extend_from_slice(data);
                let step = Step {
                    position,
                    kind,
                    dtype,
                    shape,
                    bytes,
                };
                if step.bytes.len() == expected {
                    return Ok(Some(Message::Step(step)));
                }
                self.partial = Some((step, expected));
                Ok(None)
            }
            TAG_CONTINUE => {
                let Some((mut step, expected)) = self.partial.take() else {
                    return Err(bad("a continuation without a step".into()));
                };
                if step.bytes.len() + rest.len() > expected {
                    return Err(bad("more bytes than the shape holds".into()));
                }
                step.bytes.extend_from_slice(rest);
                if step.bytes.len() == expected {
                    return Ok(Some(Message::Step(step)));
                }
                self.partial = Some((step, expected));
                Ok(None)
            }
            other => Err(bad(format!("unknown tag {other}"))),
        }
    }
}

/// Numbers sessions: unique per process, so per engine.
static NEXT_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The error kind a stage answers for `e`.
fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::Busy(_) => "busy",
        Error::Timeout(_) => "timeout",
        Error::BadRequest(_) => "bad_request",
        _ => "inference",
    }
}

/// RT-STAGE-6's test fault for stages: the first element of every f32
/// output gains 1.
fn perturb(step: &mut Step) {
    if step.dtype == Dtype::F32 && step.bytes.len() >= 4 {
        let x = f32::from_le_bytes(step.bytes[..4].try_into().expect("4 bytes")) + 1.0;
        step.bytes[..4].copy_from_slice(&x.to_le_bytes());
    }
}

/// RT-PIPE-2: serves one `Stage` call from `engine`, which serves `model`
/// (`None`: unregistered, nothing is served). Ends, dropping the session's
/// cache, when the router ends the call, goes away, or sends anything
/// malformed; an error is answered first.
pub fn serve_stage(
    engine: crate::inference::InferenceHandle,
    model: Option<blyan_state_machine::types::Hash32>,
    perturb_outputs: bool,
    from: blyan_state_machine::node::PeerId,
    mut requests: tonic::Streaming<Bytes>,
) -> tokio::sync::mpsc::Receiver<Result<Bytes, tonic::Status>> {
    use tracing::Instrument;
    let (tx, rx) = tokio::sync::mpsc::channel(STAGE_STREAM_BUFFER);
    let session = NEXT_SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span = tracing::debug_span!("stage.session", router = %from, session);
    tokio::spawn(
        async move {
            let fail = |e: &Error| encode_error(error_kind(e), &e.to_string());
            let mut asm = Assembler::default();
            let mut opened = false;
            loop {
                let m = match requests.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => break,
                };
                let msg = match asm.push(&m) {
                    Ok(Some(msg)) => msg,
                    Ok(None) => continue,
                    Err(e) => {
                        let _ = tx.send(Ok(fail(&e))).await;
                        break;
                    }
                };
                let step = match msg {
                    Message::Open(o) if !opened => {
                        let info = &engine.model;
                        let ok_model = model.is_some_and(|m| o.model == crate::api::hex0x(&m));
                        let ok_layers = o.first_layer as usize == info.first_layer
                            && o.last_layer as usize == info.last_layer;
                        if !(ok_model && ok_layers) {
                            let e = Error::BadRequest(format!(
                                "this node serves layers {}..={} of {}, not layers {}..={} of {}",
                                info.first_layer,
                                info.last_layer,
                                model.map_or("no registered model".into(), |m| crate::api::hex0x(
                                    &m
                                )),
                                o.first_layer,
                                o.last_layer,
                                o.model
                            ));
                            let _ = tx.send(Ok(fail(&e))).await;
                            break;
                        }
                        opened = true;
                        continue;
                    }
                    Message::Step(step) if opened => step,
                    _ => {
                        let e = Error::BadRequest("a session opens once, before its steps".into());
                        let _ = tx.send(Ok(fail(&e))).await;
                        break;
                    }
                };
                match engine.stage(session, step).await {
                    Ok(mut out) => {
                        if perturb_outputs {
                            perturb(&mut out);
                        }
                        let mut gone = false;
                        for part in out.encode() {
                            if tx.send(Ok(part)).await.is_err() {
                                gone = true;
                                break;
                            }
                        }
                        if gone {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Ok(fail(&e))).await;
                        break;
                    }
                }
            }
            engine.close_stage(session);
        }
        .instrument(span),
    );
    rx
}

/// RT-PIPE-3: one hop of a running route, as the router holds it.
enum Hop {
    /// A stage on this node's own engine.
    Local {
        engine: crate::inference::InferenceHandle,
        session: u64,
    },
    /// A stage on another node: the call's two directions.
    Remote {
        tx: tokio::sync::mpsc::Sender<Bytes>,
        rx: tonic::Streaming<Bytes>,
        asm: Assembler,
    },
}

/// RT-PIPE-3: the stages of one attempt, open for its whole generation
/// (each keeps its KV cache until the session ends: dropping it ends every
/// remote call and drops the local session).
pub struct RouteSession {
    hops: Vec<(blyan_state_machine::types::Address, u32, Hop)>,
    /// Time spent per hop, µs.
    spent_us: Vec<u64>,
    /// Tensor bytes sent to and received from remote hops (the router's
    /// `/metrics` counter).
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for RouteSession {
    fn drop(&mut self) {
        for (_, _, hop) in &self.hops {
            if let Hop::Local { engine, session } = hop {
                engine.close_stage(*session);
            }
        }
    }
}

impl RouteSession {
    /// Opens every stage of `plan` (a call to each remote one, a session on
    /// `engine` for one on `me`). A stage that cannot be opened is named.
    pub async fn open(
        transport: &crate::transport::GrpcTransport,
        me: blyan_state_machine::types::Address,
        engine: &crate::inference::InferenceHandle,
        plan: &blyan_route::route::Plan,
        bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<RouteSession, (blyan_state_machine::types::Address, String)> {
        let mut hops = Vec::with_capacity(plan.stages.len());
        for stage in &plan.stages {
            let hop = if stage.node == me {
                if engine.model.first_layer != stage.first_layer as usize
                    || engine.model.last_layer != stage.last_layer as usize
                {
                    return Err((me, "the local engine holds other layers".into()));
                }
                Hop::Local {
                    engine: engine.clone(),
                    session: NEXT_SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                }
            } else {
                let fail = |e: String| (stage.node, e);
                let client = transport
                    .client(stage.node)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let (tx, requests) = tokio::sync::mpsc::channel(STAGE_STREAM_BUFFER);
                let open = Open {
                    model: crate::api::hex0x(&plan.model),
                    first_layer: stage.first_layer,
                    last_layer: stage.last_layer,
                };
                tx.send(encode_open(&open))
                    .await
                    .map_err(|_| fail("the call closed".into()))?;
                let rx = client.stage(requests).await.map_err(|s| {
                    if crate::transport::is_connection_failure(&s) {
                        transport.forget_client(&stage.node);
                    }
                    fail(format!("{:?}: {}", s.code(), s.message()))
                })?;
                Hop::Remote {
                    tx,
                    rx,
                    asm: Assembler::default(),
                }
            };
            hops.push((stage.node, stage.last_layer, hop));
        }
        Ok(RouteSession {
            spent_us: vec![0; hops.len()],
            hops,
            bytes,
        })
    }

    /// Time spent per stage so far, ms, in route order.
    pub fn timings(&self) -> Vec<u64> {
        self.spent_us.iter().map(|us| us.div_ceil(1000)).collect()
    }

    /// RT-PIPE-3: extends the sequence by `ids` at `position` through every
    /// stage; the last stage's logits at the last position. A stage that
    /// fails, misses `deadline` or answers what the step does not call for
    /// is named.
    pub async fn forward(
        &mut self,
        position: u32,
        ids: &[i64],
        deadline: std::time::Instant,
    ) -> Result<Vec<f32>, (blyan_state_machine::types::Address, String)> {
        let n = self.hops.len();
        let mut step = Step::ids(position, ids);
        for (i, (node, _, hop)) in self.hops.iter_mut().enumerate() {
            let node = *node;
            let started = std::time::Instant::now();
            let left = deadline.saturating_duration_since(started);
            let out = match tokio::time::timeout(left, run_hop(hop, step, &self.bytes)).await {
                Ok(Ok(out)) => out,
                Ok(Err(e)) => return Err((node, e)),
                Err(_) => return Err((node, "the stage missed the request's deadline".into())),
            };
            self.spent_us[i] += u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let want = if i + 1 == n {
                Kind::Logits
            } else {
                Kind::Hidden
            };
            let seq_ok =
                want == Kind::Logits || (out.shape[0] == 1 && out.seq() as usize == ids.len());
            if out.kind != want || !seq_ok || out.position != position + out_seq(ids) {
                return Err((
                    node,
                    format!(
                        "the stage answered {:?} {:?} at {} for a step of {} at {position}",
                        out.kind,
                        out.shape,
                        out.position,
                        ids.len()
                    ),
                ));
            }
            if i + 1 == n {
                return out.to_logits().map_err(|e| (node, e.to_string()));
            }
            step = Step { position, ..out };
        }
        unreachable!("a route has a last stage")
    }
}

fn out_seq(ids: &[i64]) -> u32 {
    u32::try_from(ids.len()).unwrap_or(u32::MAX)
}

/// One step on one hop.
async fn run_hop(
    hop: &mut Hop,
    step: Step,
    bytes: &std::sync::atomic::AtomicU64,
) -> Result<Step, String> {
    use std::sync::atomic::Ordering;
    match hop {
        Hop::Local { engine, session } => engine
            .stage(*session, step)
            .await
            .map_err(|e| e.to_string()),
        Hop::Remote { tx, rx, asm } => {
            let sent = step.bytes.len() as u64;
            for part in step.encode() {
                tx.send(part)
                    .await
                    .map_err(|_| "the stage ended the call".to_string())?;
            }
            loop {
                let m = match rx.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err("the stage ended the call without an answer".into()),
                    Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
                };
                match asm.push(&m).map_err(|e| e.to_string())? {
                    None => continue,
                    Some(Message::Step(out)) => {
                        bytes.fetch_add(sent + out.bytes.len() as u64, Ordering::Relaxed);
                        return Ok(out);
                    }
                    Some(Message::Error(kind, message)) => {
                        return Err(format!("{kind}: {message}"));
                    }
                    Some(Message::Open(_)) => return Err("a stage answered an open".into()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(msgs: &[Bytes]) -> Result<Vec<Message>, Error> {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        for m in msgs {
            if let Some(x) = a.push(m)? {
                out.push(x);
            }
        }
        Ok(out)
    }

    #[test]
    fn rt_pipe_1_a_large_tensor_is_chunked_and_reassembled() {
        // 600 positions of hidden 1,024 in f32: 2.3 MiB, three messages.
        let shape = [1, 600, 1024];
        let bytes: Vec<u8> = (0..600 * 1024 * 4).map(|i| (i % 251) as u8).collect();
        let step = Step {
            position: 7,
            kind: Kind::Hidden,
            dtype: Dtype::F32,
            shape,
            bytes,
        };
        let msgs = step.encode();
        assert_eq!(msgs.len(), 3);
        assert!(msgs.iter().all(|m| m.len() <= MAX_STAGE_MESSAGE_BYTES));
        assert_eq!(decode_all(&msgs).unwrap(), vec![Message::Step(step)]);
    }

    #[test]
    fn rt_pipe_1_malformed_and_oversized_messages_are_refused() {
        let step = Step::ids(0, &[1, 2, 3]);
        let good = step.encode();
        assert_eq!(step.to_ids().unwrap(), vec![1, 2, 3]);
        // Oversized: 64 Ki positions of hidden 4,096 in f32 (1 GiB) is
        // refused from its header, before any allocation.
        let mut huge = good[0].to_vec();
        // Layout: tag, position (1..5), kind (5), dtype (6), dims (7..19),
        // total (19..27).
        huge[5] = Kind::Hidden.code();
        huge[6] = Dtype::F32.code();
        huge[7..11].copy_from_slice(&1u32.to_le_bytes());
        huge[11..15].copy_from_slice(&65_536u32.to_le_bytes());
        huge[15..19].copy_from_slice(&4_096u32.to_le_bytes());
        huge[19..27].copy_from_slice(&(1u64 << 30).to_le_bytes());
        let e = Assembler::default().push(&huge).unwrap_err().to_string();
        assert!(e.contains("over"), "{e}");
        // A message above the message bound.
        let e = Assembler::default()
            .push(&vec![TAG_CONTINUE; MAX_STAGE_MESSAGE_BYTES + 1])
            .unwrap_err();
        assert!(e.to_string().contains("message bound"), "{e}");
        // Announced bytes that disagree with the shape.
        let mut wrong = good[0].to_vec();
        wrong[20] ^= 1;
        assert!(Assembler::default().push(&wrong).is_err());
        // Trailing bytes, a continuation without a step, unknown tags,
        // empty messages, a short header, bad dtype for the kind.
        let mut trailing = good[0].to_vec();
        trailing.push(0);
        assert!(Assembler::default().push(&trailing).is_err());
        assert!(Assembler::default().push(&[TAG_CONTINUE, 1]).is_err());
        assert!(Assembler::default().push(b"x").is_err());
        assert!(Assembler::default().push(b"").is_err());
        assert!(Assembler::default().push(&good[0][..10]).is_err());
        let mut ids_as_f32 = good[0].to_vec();
        ids_as_f32[6] = Dtype::F32.code();
        assert!(Assembler::default().push(&ids_as_f32).is_err());
        // An open with an inverted range, or not JSON.
        let open = encode_open(&Open {
            model: "0x00".into(),
            first_layer: 3,
            last_layer: 1,
        });
        assert!(Assembler::default().push(&open).is_err());
        assert!(Assembler::default().push(b"o{").is_err());
    }

    #[test]
    fn rt_pipe_1_open_and_error_round_trip() {
        let open = Open {
            model: "0xab".into(),
            first_layer: 2,
            last_layer: 3,
        };
        assert_eq!(
            decode_all(&[encode_open(&open), encode_error("busy", "full")]).unwrap(),
            vec![
                Message::Open(open),
                Message::Error("busy".into(), "full".into())
            ]
        );
    }

    proptest! {
        /// Any well-formed step survives encoding, in messages within the
        /// bound, whatever its size.
        #[test]
        fn rt_pipe_1_steps_round_trip(
            position in any::<u32>(),
            seq in 1u32..300,
            hidden in 1u32..2_000,
            bf16 in any::<bool>(),
            fill in any::<u8>(),
        ) {
            let dtype = if bf16 { Dtype::Bf16 } else { Dtype::F32 };
            let n = (seq * hidden) as usize * dtype.size();
            let step = Step {
                position,
                kind: Kind::Hidden,
                dtype,
                shape: [1, seq, hidden],
                bytes: (0..n).map(|i| (i as u8).wrapping_add(fill)).collect(),
            };
            let msgs = step.encode();
            prop_assert!(msgs.iter().all(|m| m.len() <= MAX_STAGE_MESSAGE_BYTES));
            prop_assert_eq!(decode_all(&msgs).unwrap(), vec![Message::Step(step)]);
        }
    }
}
