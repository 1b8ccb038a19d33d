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
/// RT-PIPE-6: most commitments a router keeps per hop of one request
/// (one per 32 positions of a 64 Ki-token sequence).
pub const MAX_COMMITMENTS_PER_HOP: usize = 2048;
/// RT-PIPE-2: default bound on the sessions (KV caches) one stage keeps.
pub const DEFAULT_MAX_STAGE_SESSIONS: usize = 64;
/// RT-PIPE-9: default bound on the decode steps one engine batches.
pub const DEFAULT_MAX_STAGE_BATCH: usize = 16;
/// RT-PIPE-2: default idle time after which a session's cache is dropped.
pub const DEFAULT_STAGE_IDLE_MS: u64 = 60_000;

const TAG_OPEN: u8 = b'o';
const TAG_STEP: u8 = b's';
const TAG_CONTINUE: u8 = b'c';
const TAG_ERROR: u8 = b'e';
const TAG_COMMIT: u8 = b'm';
const TAG_FINISH: u8 = b'f';
/// RT-PIPE-8: the experts a session used, sent before the stage's finish.
pub(crate) const TAG_USED: u8 = b'u';
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
    /// RT-PIPE-6: the request's id (`0x…`, 32 bytes), which the stage's
    /// commitments name; empty: all zero.
    #[serde(default)]
    pub request_id: String,
    /// RT-PIPE-8: where each `(layer, expert)` of an MoE stage is computed
    /// (the router's plan); empty for a dense model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<crate::experts::OpenExpert>,
}

/// Element type of a tensor on the wire (little-endian, row-major).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    I64,
}

impl Dtype {
    pub(crate) fn code(self) -> u8 {
        match self {
            Dtype::F32 => 0,
            Dtype::Bf16 => 1,
            Dtype::I64 => 2,
        }
    }

    pub(crate) fn from_code(c: u8) -> Result<Dtype, Error> {
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

/// RT-PIPE-6: a signed commitment message (an encoded
/// `blyan_route::commit::SignedCommitment`).
pub fn encode_commitment(signed: &blyan_route::commit::SignedCommitment) -> Bytes {
    let mut v = vec![TAG_COMMIT];
    v.extend_from_slice(&signed.encode());
    Bytes::from(v)
}

/// RT-PIPE-6: the router's last message (flush your commitments), and the
/// stage's answer once it has sent them.
pub fn encode_finish() -> Bytes {
    Bytes::from_static(&[TAG_FINISH])
}

/// A decoded message.
#[derive(Debug, PartialEq)]
pub enum Message {
    Open(Open),
    Step(Step),
    /// `(kind, message)`: `busy`, `bad_request` or `inference`.
    Error(String, String),
    /// RT-PIPE-6: a signed commitment, still encoded.
    Commitment(Vec<u8>),
    /// RT-PIPE-8: the `(layer, expert)` pairs the session used.
    Used(Vec<(u32, u16)>),
    Finish,
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
            TAG_COMMIT => Ok(Some(Message::Commitment(rest.to_vec()))),
            TAG_USED => Ok(Some(Message::Used(crate::experts::decode_used(rest)?))),
            TAG_FINISH if rest.is_empty() => Ok(Some(Message::Finish)),
            TAG_FINISH => Err(bad("a finish with a body".into())),
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

/// RT-STAGE-6's test fault for stages: every element of an f32 output is
/// scaled by 17/16, as a wrong layer or weight would shift its outputs
/// (RT-COMMIT-3b: commitments detect changes to the top values, not to a
/// single element outside them).
fn perturb(step: &mut Step) {
    if step.dtype == Dtype::F32 {
        for c in step.bytes.chunks_exact_mut(4) {
            let x = f32::from_le_bytes(c.try_into().expect("4 bytes")) * (17.0 / 16.0);
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// RT-PIPE-2: serves one `Stage` call from `engine`, which serves `model`
/// (`None`: unregistered, nothing is served). Ends, dropping the session's
/// cache, when the router ends the call, goes away, or sends anything
/// malformed; an error is answered first.
/// RT-PIPE-6: who signs a stage's commitments.
#[derive(Clone)]
pub struct StageIdentity {
    pub key: k256::ecdsa::SigningKey,
    pub chain_id: String,
}

/// The f32 values of an output tensor (f32, or bf16 widened exactly).
fn values_of(step: &Step) -> Vec<f32> {
    match step.dtype {
        Dtype::F32 => step
            .bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        Dtype::Bf16 => step
            .bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        Dtype::I64 => Vec::new(),
    }
}

/// RT-PIPE-6: a session's commitments to its outputs, one per 32
/// positions (RT-COMMIT-2), signed as the chunks complete.
struct SessionCommits {
    identity: StageIdentity,
    template: blyan_route::commit::StageCommitment,
    committer: Option<blyan_route::commit::Committer>,
    /// The engine whose head the commitments name: read after the
    /// session's first step, when the engine has taken any pending head
    /// (it takes none while a session is open, RT-PIPE-2).
    engine: Option<crate::inference::InferenceHandle>,
}

impl SessionCommits {
    fn new(
        identity: StageIdentity,
        request_id: blyan_state_machine::types::Hash32,
        model: blyan_state_machine::types::Hash32,
        (first_layer, last_layer): (u32, u32),
        engine: crate::inference::InferenceHandle,
    ) -> SessionCommits {
        SessionCommits {
            template: blyan_route::commit::StageCommitment {
                request_id,
                model,
                head_version: [0; 32],
                node: blyan_state_machine::types::Address::from_public_key(
                    identity.key.verifying_key(),
                ),
                first_layer,
                last_layer,
                chunk: blyan_route::commit::ChunkCommitment {
                    first_token: 0,
                    tokens: 1,
                    hidden: 1,
                    values: Vec::new(),
                },
            },
            identity,
            committer: None,
            engine: Some(engine),
        }
    }

    /// Commits to `out`, the answer to a step at `position`: every row of
    /// hidden states, or the one row of logits (the last position's).
    fn push(&mut self, position: u32, out: &Step) -> Result<Vec<Bytes>, Error> {
        let row = out.shape[2];
        let first = match out.kind {
            Kind::Logits => u64::from(out.position) - 1,
            _ => u64::from(position),
        };
        if let Some(engine) = self.engine.take() {
            self.template.head_version = head_version(&engine);
        }
        if self.committer.is_none() {
            self.committer = Some(
                blyan_route::commit::Committer::new(row, blyan_route::commit::DEFAULT_TOP_K, first)
                    .map_err(|e| Error::Inference(format!("commitment: {e}")))?,
            );
        }
        let c = self.committer.as_mut().expect("made above");
        let chunks = c
            .push(&values_of(out))
            .map_err(|e| Error::Inference(format!("commitment: {e}")))?;
        Ok(chunks.into_iter().map(|ch| self.sign(ch)).collect())
    }

    /// The last, partial chunk.
    fn finish(&mut self) -> Result<Option<Bytes>, Error> {
        let Some(c) = self.committer.take() else {
            return Ok(None);
        };
        let last = c
            .finish()
            .map_err(|e| Error::Inference(format!("commitment: {e}")))?;
        Ok(last.map(|ch| self.sign(ch)))
    }

    fn sign(&self, chunk: blyan_route::commit::ChunkCommitment) -> Bytes {
        let commitment = blyan_route::commit::StageCommitment {
            chunk,
            ..self.template.clone()
        };
        let signature = blyan_state_machine::crypto::sign(
            &self.identity.key,
            &commitment.signing_bytes(&self.identity.chain_id),
        );
        encode_commitment(&blyan_route::commit::SignedCommitment {
            commitment,
            public_key: blyan_state_machine::tx::public_key_of(&self.identity.key),
            signature,
        })
    }
}

fn parse_hash(s: &str) -> Option<blyan_state_machine::types::Hash32> {
    if s.is_empty() {
        return Some([0; 32]);
    }
    let v = hex::decode(s.strip_prefix("0x")?).ok()?;
    v.try_into().ok()
}

pub fn serve_stage(
    engine: crate::inference::InferenceHandle,
    model: Option<blyan_state_machine::types::Hash32>,
    perturb_outputs: bool,
    identity: Option<StageIdentity>,
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
            let mut commits: Option<SessionCommits> = None;
            // RT-PIPE-8: the plan's experts, and those the session used.
            let mut placement = std::sync::Arc::new(crate::experts::StagePlan::default());
            let mut used = std::collections::BTreeSet::new();
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
                        let Some(request_id) = parse_hash(&o.request_id) else {
                            let e = Error::BadRequest("request_id is not 0x and 32 bytes".into());
                            let _ = tx.send(Ok(fail(&e))).await;
                            break;
                        };
                        match crate::experts::placement_of(
                            &o.experts,
                            (o.first_layer, o.last_layer),
                            info.num_experts,
                        ) {
                            Ok(p) => {
                                placement = std::sync::Arc::new(crate::experts::StagePlan {
                                    model: model.expect("checked above"),
                                    placement: p,
                                })
                            }
                            Err(e) => {
                                let _ = tx.send(Ok(fail(&e))).await;
                                break;
                            }
                        }
                        commits = identity.clone().map(|identity| {
                            SessionCommits::new(
                                identity,
                                request_id,
                                model.expect("checked above"),
                                (o.first_layer, o.last_layer),
                                engine.clone(),
                            )
                        });
                        opened = true;
                        continue;
                    }
                    Message::Finish if opened => {
                        let last = commits.as_mut().map(SessionCommits::finish).transpose();
                        match last {
                            Ok(last) => {
                                let report =
                                    (!used.is_empty()).then(|| crate::experts::encode_used(&used));
                                for m in report
                                    .into_iter()
                                    .chain(last.flatten())
                                    .chain([encode_finish()])
                                {
                                    if tx.send(Ok(m)).await.is_err() {
                                        break;
                                    }
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(Ok(fail(&e))).await;
                            }
                        }
                        break;
                    }
                    Message::Step(step) if opened => step,
                    _ => {
                        let e = Error::BadRequest("a session opens once, before its steps".into());
                        let _ = tx.send(Ok(fail(&e))).await;
                        break;
                    }
                };
                let position = step.position;
                match engine.stage(session, step, placement.clone()).await {
                    Ok((mut out, pairs)) => {
                        used.extend(pairs);
                        if perturb_outputs {
                            perturb(&mut out);
                        }
                        let signed = match commits.as_mut().map(|c| c.push(position, &out)) {
                            Some(Ok(m)) => m,
                            None => Vec::new(),
                            Some(Err(e)) => {
                                let _ = tx.send(Ok(fail(&e))).await;
                                break;
                            }
                        };
                        let mut gone = false;
                        for part in out.encode().into_iter().chain(signed) {
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
        /// RT-PIPE-8: the plan's experts for this stage.
        placement: std::sync::Arc<crate::experts::StagePlan>,
        /// RT-PIPE-6: this node's own commitments to the hop's outputs
        /// (signed by the router's key), and those made so far, encoded.
        commits: Option<Box<SessionCommits>>,
        commitments: Vec<Vec<u8>>,
    },
    /// A stage on another node: the call's two directions.
    Remote {
        tx: tokio::sync::mpsc::Sender<Bytes>,
        rx: tonic::Streaming<Bytes>,
        asm: Assembler,
        /// RT-PIPE-6: the stage's signed commitments so far, encoded.
        commitments: Vec<Vec<u8>>,
    },
}

/// A hop's `(node, last_layer, hop, experts used)`.
type HopEntry = (
    blyan_state_machine::types::Address,
    u32,
    Hop,
    std::collections::BTreeSet<(u32, u16)>,
);

/// RT-PIPE-3: the stages of one attempt, open for its whole generation
/// (each keeps its KV cache until the session ends: dropping it ends every
/// remote call and drops the local session).
pub struct RouteSession {
    hops: Vec<HopEntry>,
    model: blyan_state_machine::types::Hash32,
    request_id: blyan_state_machine::types::Hash32,
    /// Each hop's first layer, in route order.
    first_layers: Vec<u32>,
    /// Time spent per hop, µs.
    spent_us: Vec<u64>,
    /// Tensor bytes sent to and received from remote hops (the router's
    /// `/metrics` counter).
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// RT-PIPE-7: each hop's input steps, kept for a request drawn for a
    /// spot check (`None`: not kept, or over the bound).
    record: Option<Vec<Vec<Step>>>,
    record_bytes: usize,
    record_max_bytes: usize,
}

/// RT-PIPE-7: most bytes of hop inputs a router keeps for one checked
/// request (a 2,048-token prefill at hidden 4,096 in bf16 is 16 MiB per hop).
pub const MAX_RECORDED_INPUT_BYTES: usize = 64 * 1024 * 1024;

impl Drop for RouteSession {
    fn drop(&mut self) {
        for (_, _, hop, _) in &self.hops {
            if let Hop::Local {
                engine, session, ..
            } = hop
            {
                engine.close_stage(*session);
            }
        }
    }
}

impl RouteSession {
    /// Opens every stage of `plan` (a call to each remote one, a session on
    /// `engine` for one on `me`). A stage that cannot be opened is named.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        transport: &crate::transport::GrpcTransport,
        me: blyan_state_machine::types::Address,
        engine: &crate::inference::InferenceHandle,
        plan: &blyan_route::route::Plan,
        request_id: blyan_state_machine::types::Hash32,
        bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
        identity: Option<&StageIdentity>,
    ) -> Result<RouteSession, (blyan_state_machine::types::Address, String)> {
        let mut hops = Vec::with_capacity(plan.stages.len());
        for stage in &plan.stages {
            let hop = if stage.node == me {
                if engine.model.first_layer != stage.first_layer as usize
                    || engine.model.last_layer != stage.last_layer as usize
                {
                    return Err((me, "the local engine holds other layers".into()));
                }
                let experts = crate::experts::open_experts(stage);
                let placement = crate::experts::placement_of(
                    &experts,
                    (stage.first_layer, stage.last_layer),
                    engine.model.num_experts,
                )
                .map_err(|e| (me, e.to_string()))?;
                Hop::Local {
                    engine: engine.clone(),
                    session: NEXT_SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    placement: std::sync::Arc::new(crate::experts::StagePlan {
                        model: plan.model,
                        placement,
                    }),
                    commits: identity.map(|id| {
                        Box::new(SessionCommits::new(
                            id.clone(),
                            request_id,
                            plan.model,
                            (stage.first_layer, stage.last_layer),
                            engine.clone(),
                        ))
                    }),
                    commitments: Vec::new(),
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
                    request_id: format!("0x{}", hex::encode(request_id)),
                    experts: crate::experts::open_experts(stage),
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
                    commitments: Vec::new(),
                }
            };
            hops.push((stage.node, stage.last_layer, hop, Default::default()));
        }
        Ok(RouteSession {
            record: None,
            record_bytes: 0,
            record_max_bytes: 0,
            spent_us: vec![0; hops.len()],
            first_layers: plan.stages.iter().map(|s| s.first_layer).collect(),
            hops,
            model: plan.model,
            request_id,
            bytes,
        })
    }

    /// RT-PIPE-6: ends every remote stage's session: asks for its last
    /// commitment and checks all it sent (decoded, signed by that stage's
    /// node for this request, model and layers). Each hop's commitments,
    /// encoded, in route order (none for a stage on this node). A stage
    /// whose commitments do not check is named.
    pub async fn finish(
        &mut self,
        chain_id: &str,
        deadline: std::time::Instant,
    ) -> Result<Vec<Vec<Vec<u8>>>, (blyan_state_machine::types::Address, String)> {
        let mut out = Vec::with_capacity(self.hops.len());
        for (i, (node, last_layer, hop, used)) in self.hops.iter_mut().enumerate() {
            let node = *node;
            let (tx, rx, asm, commitments) = match hop {
                Hop::Remote {
                    tx,
                    rx,
                    asm,
                    commitments,
                } => (tx, rx, asm, commitments),
                Hop::Local {
                    commits,
                    commitments,
                    ..
                } => {
                    // This node's own commitments: its last chunk.
                    if let Some(last) = commits
                        .as_mut()
                        .map(|c| c.finish())
                        .transpose()
                        .map_err(|e| (node, e.to_string()))?
                        .flatten()
                    {
                        commitments.push(last[1..].to_vec());
                    }
                    out.push(std::mem::take(commitments));
                    continue;
                }
            };
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let read = async {
                tx.send(encode_finish())
                    .await
                    .map_err(|_| "the stage ended the call".to_string())?;
                loop {
                    let m = match rx.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => return Err("the call ended before its finish".to_string()),
                        Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
                    };
                    match asm.push(&m).map_err(|e| e.to_string())? {
                        Some(Message::Commitment(c)) => {
                            if commitments.len() >= MAX_COMMITMENTS_PER_HOP {
                                return Err("more commitments than a generation has chunks".into());
                            }
                            commitments.push(c);
                        }
                        Some(Message::Finish) => return Ok(()),
                        Some(Message::Used(pairs)) => used.extend(pairs),
                        None => {}
                        Some(other) => return Err(format!("a stage answered {other:?} to finish")),
                    }
                }
            };
            match tokio::time::timeout(left, read).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err((node, e)),
                Err(_) => return Err((node, "the stage missed the request's deadline".into())),
            }
            for c in commitments.iter() {
                let signed = blyan_route::commit::SignedCommitment::decode(c)
                    .map_err(|e| (node, format!("commitment: {e}")))?;
                signed
                    .verify(chain_id)
                    .map_err(|e| (node, format!("commitment: {e}")))?;
                let cm = &signed.commitment;
                if cm.node != node
                    || cm.request_id != self.request_id
                    || cm.model != self.model
                    || (cm.first_layer, cm.last_layer) != (self.first_layers[i], *last_layer)
                {
                    return Err((node, "a commitment for another request or stage".into()));
                }
            }
            out.push(std::mem::take(commitments));
        }
        Ok(out)
    }

    /// RT-PIPE-7: keeps every hop's input steps from now on, up to
    /// `max_bytes` in all (beyond it nothing is kept).
    pub fn record_inputs(&mut self, max_bytes: usize) {
        self.record = Some(vec![Vec::new(); self.hops.len()]);
        self.record_max_bytes = max_bytes;
    }

    /// RT-PIPE-7: the kept input steps per hop, if every one was kept.
    pub fn take_recording(&mut self) -> Option<Vec<Vec<Step>>> {
        self.record.take()
    }

    /// RT-PIPE-7: runs `step` (recorded input of a checked hop) on this
    /// session's only hop: its answer, which must cover the step's
    /// positions. Errors name the hop's node.
    pub async fn replay_step(
        &mut self,
        step: Step,
        deadline: std::time::Instant,
    ) -> Result<Step, (blyan_state_machine::types::Address, String)> {
        let (node, _, hop, used) = self.hops.first_mut().expect("a session has a hop");
        let node = *node;
        let end = step.position + step.seq();
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let out = match tokio::time::timeout(left, run_hop(hop, step, &self.bytes, used)).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err((node, e)),
            Err(_) => return Err((node, "the stage missed the deadline".into())),
        };
        if out.position != end {
            return Err((
                node,
                format!("an answer at {} for a step ending at {end}", out.position),
            ));
        }
        Ok(out)
    }

    /// RT-PIPE-8: the `(layer, expert)` pairs each stage reported using
    /// (complete after [`RouteSession::finish`]), in route order.
    pub fn experts_used(&self) -> Vec<std::collections::BTreeSet<(u32, u16)>> {
        self.hops.iter().map(|h| h.3.clone()).collect()
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
        for (i, (node, _, hop, used)) in self.hops.iter_mut().enumerate() {
            let node = *node;
            let started = std::time::Instant::now();
            let left = deadline.saturating_duration_since(started);
            if let Some(record) = &mut self.record {
                if self.record_bytes + step.bytes.len() <= self.record_max_bytes {
                    self.record_bytes += step.bytes.len();
                    record[i].push(step.clone());
                } else {
                    self.record = None;
                }
            }
            let out = match tokio::time::timeout(left, run_hop(hop, step, &self.bytes, used)).await
            {
                Ok(Ok(out)) => out,
                // RT-PIPE-8: a failed expert call names the expert's node.
                Ok(Err(e)) => return Err((crate::experts::blamed_expert(&e).unwrap_or(node), e)),
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

/// RT-PIPE-6: the head a stage's commitments name: SHA3-256 of the name
/// of the head its engine serves (all zero before the first).
fn head_version(engine: &crate::inference::InferenceHandle) -> blyan_state_machine::types::Hash32 {
    let name = engine.heads.serving();
    if name.is_empty() {
        return [0; 32];
    }
    blyan_state_machine::crypto::sha3_256_parts(&[name.as_bytes()])
}

/// One step on one hop.
async fn run_hop(
    hop: &mut Hop,
    step: Step,
    bytes: &std::sync::atomic::AtomicU64,
    used: &mut std::collections::BTreeSet<(u32, u16)>,
) -> Result<Step, String> {
    use std::sync::atomic::Ordering;
    match hop {
        Hop::Local {
            engine,
            session,
            placement,
            commits,
            commitments,
        } => {
            let position = step.position;
            let (out, pairs) = engine
                .stage(*session, step, placement.clone())
                .await
                .map_err(|e| e.to_string())?;
            used.extend(pairs);
            if let Some(c) = commits.as_mut() {
                for m in c.push(position, &out).map_err(|e| e.to_string())? {
                    if commitments.len() >= MAX_COMMITMENTS_PER_HOP {
                        return Err("more commitments than a generation has chunks".into());
                    }
                    // The message without its tag: the encoded commitment.
                    commitments.push(m[1..].to_vec());
                }
            }
            Ok(out)
        }
        Hop::Remote {
            tx,
            rx,
            asm,
            commitments,
        } => {
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
                    Some(Message::Commitment(c)) => {
                        // RT-PIPE-6: checked at the session's end.
                        if commitments.len() >= MAX_COMMITMENTS_PER_HOP {
                            return Err("more commitments than a generation has chunks".into());
                        }
                        commitments.push(c);
                    }
                    Some(Message::Open(_) | Message::Finish | Message::Used(_)) => {
                        return Err("a stage answered out of turn".into());
                    }
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
            request_id: String::new(),
            experts: Vec::new(),
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
            request_id: format!("0x{}", "ab".repeat(32)),
            experts: vec![crate::experts::OpenExpert {
                layer: 2,
                expert: 5,
                node: format!("0x{}", "cd".repeat(20)),
            }],
        };
        let used = std::collections::BTreeSet::from([(2, 5), (3, 0)]);
        assert_eq!(
            decode_all(&[
                encode_open(&open),
                encode_error("busy", "full"),
                crate::experts::encode_used(&used),
                encode_finish()
            ])
            .unwrap(),
            vec![
                Message::Open(open),
                Message::Error("busy".into(), "full".into()),
                Message::Used(vec![(2, 5), (3, 0)]),
                Message::Finish
            ]
        );
        assert!(Assembler::default().push(b"fx").is_err());
        assert_eq!(parse_hash(""), Some([0; 32]));
        assert_eq!(parse_hash(&format!("0x{}", "01".repeat(32))), Some([1; 32]));
        assert_eq!(parse_hash("0x0102"), None);
        assert_eq!(parse_hash(&"01".repeat(32)), None);
    }

    /// RT-PIPE-6: a session's commitments: one signed chunk per 32
    /// positions of hidden states (a prefill of 40 and 30 decode steps:
    /// chunks [0, 32) and [32, 64), then [64, 70) at the finish), verifying
    /// under the stage's key and naming the request, model and layers;
    /// bf16 outputs are committed as their exact f32 values.
    #[test]
    fn rt_pipe_6_a_session_commits_every_32_positions() {
        use blyan_route::commit::SignedCommitment;
        let key = blyan_state_machine::testkit::key(5);
        let node = blyan_state_machine::types::Address::from_public_key(key.verifying_key());
        let template = blyan_route::commit::StageCommitment {
            request_id: [3; 32],
            model: [4; 32],
            head_version: [0; 32],
            node,
            first_layer: 0,
            last_layer: 1,
            chunk: blyan_route::commit::ChunkCommitment {
                first_token: 0,
                tokens: 1,
                hidden: 1,
                values: Vec::new(),
            },
        };
        let mut c = SessionCommits {
            identity: StageIdentity {
                key,
                chain_id: "test".into(),
            },
            template,
            committer: None,
            engine: None,
        };
        let hidden = |position: u32, seq: u32| Step {
            position: position + seq,
            kind: Kind::Hidden,
            dtype: Dtype::Bf16,
            shape: [1, seq, 8],
            bytes: (0..seq * 8)
                .flat_map(|i| (0x3f80u16 + (i % 50) as u16).to_le_bytes())
                .collect(),
        };
        let mut msgs = c.push(0, &hidden(0, 40)).unwrap();
        assert_eq!(msgs.len(), 1);
        for p in 40..70 {
            msgs.extend(c.push(p, &hidden(p, 1)).unwrap());
        }
        assert_eq!(msgs.len(), 2);
        msgs.extend(c.finish().unwrap());
        assert_eq!(c.finish().unwrap(), None);
        let spans: Vec<(u64, u16)> = msgs
            .iter()
            .map(|m| {
                let Some(Message::Commitment(b)) = Assembler::default().push(m).unwrap() else {
                    panic!("a commitment message");
                };
                let s = SignedCommitment::decode(&b).unwrap();
                s.verify("test").unwrap();
                assert!(s.verify("other chain").is_err());
                assert_eq!(
                    (
                        s.commitment.request_id,
                        s.commitment.model,
                        s.commitment.node
                    ),
                    ([3; 32], [4; 32], node)
                );
                (s.commitment.chunk.first_token, s.commitment.chunk.tokens)
            })
            .collect();
        assert_eq!(spans, vec![(0, 32), (32, 32), (64, 6)]);
        // bf16 0x3f80 is exactly 1.0.
        assert_eq!(values_of(&hidden(0, 1))[0], 1.0);
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
