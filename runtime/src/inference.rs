//! The node's local inference engine behind a bounded queue (API-CHAT-*).
//!
//! One OS thread owns the model (`blyan-gpu`, tch/libtorch on the CPU or
//! CUDA) and serves jobs one at a time, in arrival order. The HTTP handlers
//! only ever see [`InferenceHandle`]: they `try_send` a job (a full queue is
//! answered `503` at once instead of queueing without bound) and wait for the
//! reply up to the inference timeout (seed appendix B: 30 s). A job that
//! waited past its deadline in the queue is dropped without running.
//!
//! - **API-CHAT-4** The engine never waits on a client. It is asked after
//!   every generated token whether to go on, and the job is cancelled there
//!   (generation stops at that token, `FinishReason::Cancelled` inside the
//!   engine, an error for the caller) when:
//!   - *the reader stalled*: streamed pieces go to a bounded channel of
//!     [`STREAM_PIECES`] with `try_send`; a full channel means the client
//!     has left that many pieces unread on top of what the SSE event queue
//!     (also [`STREAM_PIECES`] events) and the socket's buffers hold. That
//!     bounded buffer is all a slow reader gets: past it the job is
//!     cancelled (`Error::Inference("cancelled: …")`), never waited for;
//!   - *the client went away*: the piece channel's receiver or the reply's
//!     receiver was dropped (axum drops the SSE body, or the handler's
//!     future, when the connection closes);
//!   - *the deadline passed* (the inference timeout): `Error::Timeout`.
//!
//!   Each cause is counted ([`EngineStats`], `/metrics`
//!   `blyan_inference_cancelled_total{reason=…}`).
//! - **API-CHAT-5** A panic inside a job (a tch call that panics, e.g. out
//!   of memory) is caught per job: that job answers
//!   `Error::Inference("the inference engine panicked …")` (`500`), the
//!   engine is dropped and rebuilt (the model reloaded) on the same thread,
//!   and the queue goes on. While it rebuilds the engine state is
//!   `rebuilding`; if the rebuild fails it is `failed`, every job is
//!   answered with an error at once, and a rebuild is tried again at the
//!   next job at most every [`REBUILD_RETRY_MS`]. `/health` reports the state
//!   (`503` unless `ok`) and `/metrics` counts panics, rebuilds and failed
//!   rebuilds ([`EngineStats`]).
//!
//! Without the `inference` feature the handle cannot be built and the routes
//! answer `503` (a validator-only node needs no libtorch).

use crate::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How the engine is loaded and bounded (`[inference]` in the node's TOML).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Serve `/chat` at all.
    pub enabled: bool,
    /// A Hugging Face directory (config.json, safetensors, tokenizer.json) or
    /// a block directory written by `blyan-gpu split`; `None`: the embedded
    /// default model.
    pub model_dir: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// Seed appendix B `inference_timeout`: queueing plus generation.
    pub timeout_ms: u64,
    /// Jobs waiting for the engine beyond the one running; more get `503`.
    pub queue_len: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Fault injection for tests (API-CHAT-5): a job whose prompt contains
    /// this string panics inside generation, after its first token. Never
    /// set it on a real node.
    #[doc(hidden)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub panic_on_prompt: Option<String>,
    /// Fault injection for tests (RT-PIPE-2): a pipeline stage step that
    /// starts at this cache position or later panics inside the engine.
    /// Never set it on a real node.
    #[doc(hidden)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub panic_on_stage_position: Option<u32>,
    /// Fault injection for tests: sleep this long after each generated
    /// token (and before each pipeline stage step), so a test can kill a
    /// serving process mid-stream. Never set it on a real node.
    #[doc(hidden)]
    #[serde(skip_serializing_if = "is_zero")]
    pub token_delay_ms: u64,
    /// RT-HB-11: send every dialled peer a signed heartbeat (what this node
    /// holds, its load) every `heartbeat_interval_ms`. Off by default: a
    /// validator advertises nothing unless configured to.
    pub advertise: bool,
    /// RT-HB-7/11: the heartbeat interval (an entry expires after three).
    pub heartbeat_interval_ms: u64,
    /// RT-STAGE-6: share of routed requests this node's router recomputes
    /// on another holder, in ppm (default 50,000: the 0.05).
    pub spot_check_rate_ppm: u32,
    /// RT-BEACON-3: about how often this node's router makes up a request
    /// to check the nodes it routes to (RT-BEACON-*); 0: never.
    pub beacon_interval_ms: u64,
    /// Fault injection for tests (RT-STAGE-6): answers peers' `Generate`
    /// calls with altered text (`!` prepended). Never set it on a real node.
    #[doc(hidden)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub perturb_outputs: bool,
    /// Fault injection for tests (POL-36): as a validator, commit and
    /// reveal losses this many ppm above the measured ones. Never set it
    /// on a real node.
    #[doc(hidden)]
    #[serde(skip_serializing_if = "is_zero")]
    pub misreport_loss_ppm: u64,
    /// RT-PIPE-2: hold only layers `[first, last]` (inclusive) of the model
    /// and serve them to routers as a pipeline stage; `None`: the whole
    /// model. A node holding part of the model answers `/chat` by routing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<[u32; 2]>,
    /// RT-PIPE-8: for a Qwen3-MoE model, hold only these experts of each
    /// MoE layer in `layers` (strictly increasing) and serve them to other
    /// stages; `None`: every expert. A stage computes the experts it does
    /// not hold on the nodes that the router's plan names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<Vec<u16>>,
    /// RT-PIPE-2: sessions (KV caches) this node keeps for routers at once.
    pub max_stage_sessions: usize,
    /// RT-PIPE-2: a session idle this long is dropped.
    pub stage_idle_ms: u64,
    /// RT-PIPE-9: most decode steps of different sessions run as one batch
    /// (continuous batching); 1: every step alone, so that answers are
    /// bit-identical to one process whatever the load (a batch's matrix
    /// products may round differently).
    pub max_stage_batch: usize,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            enabled: true,
            model_dir: None,
            device: "cpu".into(),
            dtype: "f32".into(),
            timeout_ms: 30_000,
            queue_len: 16,
            max_tokens_limit: 512,
            max_prompt_tokens: 2048,
            panic_on_prompt: None,
            panic_on_stage_position: None,
            token_delay_ms: 0,
            advertise: false,
            heartbeat_interval_ms: blyan_route::heartbeat::DEFAULT_HEARTBEAT_INTERVAL_MS,
            spot_check_rate_ppm: blyan_route::spot::DEFAULT_SPOT_CHECK_RATE_PPM,
            beacon_interval_ms: DEFAULT_BEACON_INTERVAL_MS,
            perturb_outputs: false,
            misreport_loss_ppm: 0,
            layers: None,
            experts: None,
            max_stage_sessions: crate::pipeline::DEFAULT_MAX_STAGE_SESSIONS,
            stage_idle_ms: crate::pipeline::DEFAULT_STAGE_IDLE_MS,
            max_stage_batch: crate::pipeline::DEFAULT_MAX_STAGE_BATCH,
        }
    }
}

/// One generation request, already validated against the limits (also
/// the body of a `Generate` call to a peer, RT-STAGE-1, as JSON).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub prompt: String,
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub stop: Vec<String>,
    /// API-PAY-1: most tokens the job may use, prompt included (what the
    /// caller's allowance can pay for); `None`: no limit beyond `max_tokens`.
    pub max_total_tokens: Option<u64>,
    /// API-CHAT-7: log-probabilities of the generated tokens with the `n`
    /// (0–20) most likely at each position; `None`: none.
    #[serde(default)]
    pub top_logprobs: Option<u8>,
}

/// API-CHAT-7: one generated token's log-probability.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    /// The token's text (a piece of UTF-8 may decode as U+FFFD alone).
    pub token: String,
    pub id: i64,
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// API-CHAT-7: an alternative at one position.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub id: i64,
    pub logprob: f32,
}

/// What a job produced.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatResult {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// API-PAY-1: the completion was cut by `max_total_tokens`, not by
    /// `max_tokens` or a stop.
    pub capped: bool,
    /// The MoE experts that served the request (`layer.expert`). Always
    /// empty for now: the local engine does not report its routing yet (the
    /// inference-network issue routes requests through experts and will
    /// fill it).
    pub experts_used: Vec<String>,
    /// POL-SERVE-2: the head the whole job ran on ([`HeadSlot`]).
    pub head: String,
    /// API-CHAT-7: when the request asked for them.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// POL-SERVE-1: the heads the chain decided for the served model: every
/// accepted delta of its targets, each target's in acceptance order, and
/// a name for that set of heads.
#[derive(Clone, Debug)]
pub struct HeadUpdate {
    /// `blyan-head-` and 16 hex digits of SHA3-256 over the targets' head
    /// block ids in target-key order (`crate::pol_serve::head_name`).
    pub name: String,
    /// Accepted delta payloads with their targets, in application order.
    pub deltas: Vec<(blyan_gpu::pol::Target, Vec<u8>)>,
}

/// POL-SERVE-1/2: the head an engine should serve and the one it serves.
/// The engine takes a new head between two jobs, never inside one.
#[derive(Debug, Default)]
pub struct HeadSlot {
    pending: std::sync::Mutex<Option<HeadUpdate>>,
    serving: std::sync::Mutex<String>,
    /// Heads taken, and heads that could not be applied (kept the old one).
    pub swaps: AtomicU64,
    pub swap_failures: AtomicU64,
}

impl HeadSlot {
    /// Asks the engine to serve `u` from its next job on.
    pub fn set(&self, u: HeadUpdate) {
        *self.pending.lock().expect("head lock") = Some(u);
    }

    /// The name of the head being served (empty until the first is set).
    pub fn serving(&self) -> String {
        self.serving.lock().expect("head lock").clone()
    }

    fn take(&self) -> Option<HeadUpdate> {
        self.pending.lock().expect("head lock").take()
    }

    fn served(&self, name: &str) {
        *self.serving.lock().expect("head lock") = name.to_string();
    }
}

/// What the engine serves, for `/chat`'s answers and `/status`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// `blyan-default` for the embedded model, else the directory's name.
    pub name: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub is_moe: bool,
    /// RT-PIPE-8: experts per MoE layer (0 for a dense model).
    pub num_experts: usize,
    /// RT-PIPE-8: the experts this engine holds in each MoE layer of its
    /// range, increasing (empty for a dense model).
    pub experts: Vec<u16>,
    pub device: String,
    /// RT-PIPE-2: the layers this engine holds (`[0, layers − 1]`: all).
    pub first_layer: usize,
    pub last_layer: usize,
}

impl ModelInfo {
    /// Whether the engine holds every layer (and can serve `/chat` alone).
    pub fn whole(&self) -> bool {
        self.first_layer == 0 && self.last_layer + 1 == self.layers
    }
}

struct Job {
    request: ChatRequest,
    /// Streamed text pieces, when the client asked for a stream (bounded).
    pieces: Option<mpsc::Sender<String>>,
    deadline: Instant,
    reply: oneshot::Sender<Result<ChatResult, Error>>,
    /// OPS-TRACE-3: the `inference.job` span; the engine's spans are its children.
    span: tracing::Span,
}

/// RT-PIPE-2: one step of a pipeline session on this engine.
struct StageJob {
    session: u64,
    step: crate::pipeline::Step,
    /// RT-PIPE-8: where the experts this engine does not hold are computed.
    plan: Arc<crate::experts::StagePlan>,
    deadline: Instant,
    reply: oneshot::Sender<StageReply>,
}

/// A stage step's output and the `(layer, expert)` pairs it used.
type StageReply = Result<(crate::pipeline::Step, Vec<(u32, u16)>), Error>;

/// RT-PIPE-8: makes expert calls to other nodes (the node sets one once
/// its transport is up; [`crate::experts::TransportExperts`]).
pub trait ExpertClient: Send + Sync + 'static {
    /// Runs `calls` (one per node) at once and blocks until all end (the
    /// engine's thread calls it); each call's answer, in order.
    fn call_all(
        &self,
        calls: Vec<(
            blyan_state_machine::types::Address,
            crate::experts::ExpertCall,
        )>,
    ) -> Vec<Result<crate::experts::ExpertRows, Error>>;
}

/// RT-PIPE-8: this engine's side of expert calls: the experts it holds
/// (shared with the engine's model, replaced when the engine is), the
/// client for experts held elsewhere, and counters.
pub struct ExpertSlot {
    #[cfg(feature = "inference")]
    bank: std::sync::Mutex<Option<blyan_gpu::model::ExpertBank>>,
    client: std::sync::OnceLock<Arc<dyn ExpertClient>>,
    permits: Arc<tokio::sync::Semaphore>,
    /// Calls this node served.
    pub served: AtomicU64,
    /// Calls this node's stages made, and the bytes they sent and received.
    pub made: AtomicU64,
    pub bytes: AtomicU64,
}

impl Default for ExpertSlot {
    fn default() -> Self {
        ExpertSlot {
            #[cfg(feature = "inference")]
            bank: std::sync::Mutex::new(None),
            client: std::sync::OnceLock::new(),
            permits: Arc::new(tokio::sync::Semaphore::new(
                crate::experts::MAX_EXPERT_CALLS_IN_FLIGHT,
            )),
            served: AtomicU64::new(0),
            made: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }
}

impl ExpertSlot {
    #[cfg(feature = "inference")]
    fn publish(&self, model: &blyan_gpu::model::Qwen3) {
        if model.cfg.moe.is_some() {
            *self.bank.lock().expect("expert bank lock") = Some(model.expert_bank());
        }
    }
}

/// What the engine thread serves, in arrival order.
enum Work {
    Chat(Job),
    Stage(StageJob),
    /// A session's call ended: drop its cache.
    CloseStage(u64),
}

/// The API's side of the engine; cheap to clone.
#[derive(Clone)]
pub struct InferenceHandle {
    jobs: mpsc::Sender<Work>,
    pub model: ModelInfo,
    pub config: InferenceConfig,
    /// The engine's state and counters (API-CHAT-4/5), shared with its thread.
    pub stats: Arc<EngineStats>,
    /// POL-SERVE-1: the head it serves.
    pub heads: Arc<HeadSlot>,
    /// RT-PIPE-8: experts served to and asked of other nodes.
    pub experts: Arc<ExpertSlot>,
    /// RT-PIPE-3: the model's tokenizer and end-of-sequence ids, for
    /// routing a request through stages on other nodes.
    #[cfg(feature = "inference")]
    pub tokenizer: RouterTokenizer,
}

/// RT-PIPE-3: a model's tokenizer and its end-of-sequence ids.
#[cfg(feature = "inference")]
pub type RouterTokenizer = Arc<(blyan_gpu::tokenizer::Tokenizer, Vec<i64>)>;

/// RT-BEACON-3: default mean time between a router's beacons.
pub const DEFAULT_BEACON_INTERVAL_MS: u64 = 60_000;

/// Pieces of streamed text in flight per job; a reader that leaves more
/// unread has its job cancelled (API-CHAT-4): the engine never waits on it.
pub const STREAM_PIECES: usize = 64;

/// API-CHAT-5: after a failed rebuild, the least time between two tries
/// (each is made at the next job).
pub const REBUILD_RETRY_MS: u64 = 10_000;

/// Whether the engine can serve (API-CHAT-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineState {
    Ok,
    /// Reloading the model after a panic.
    Rebuilding,
    /// The last rebuild failed; jobs are refused until one succeeds.
    Failed,
}

impl EngineState {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Ok => "ok",
            EngineState::Rebuilding => "rebuilding",
            EngineState::Failed => "failed",
        }
    }
}

/// Why a job was cancelled at a token (API-CHAT-4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// The piece channel was full: the client stopped reading.
    Stalled,
    /// The client went away (a receiver was dropped).
    Disconnected,
    /// The inference timeout passed.
    Deadline,
}

/// The engine's state and counters, written by its thread and read by
/// `/health` and `/metrics` (API-CHAT-4/5).
#[derive(Debug, Default)]
pub struct EngineStats {
    state: AtomicU8,
    panics: AtomicU64,
    rebuilds: AtomicU64,
    rebuild_failures: AtomicU64,
    cancelled_stalled: AtomicU64,
    cancelled_disconnected: AtomicU64,
    cancelled_deadline: AtomicU64,
    expired_in_queue: AtomicU64,
    /// RT-PIPE-2: pipeline sessions open on this engine, and steps run.
    pub stage_sessions: AtomicU64,
    pub stage_steps: AtomicU64,
    /// RT-PIPE-9: batches of more than one decode step, and the steps in them.
    pub stage_batches: AtomicU64,
    pub stage_batched_steps: AtomicU64,
    /// Requests, tokens, queue and latency (OPS-MET-2).
    pub ops: crate::metrics::InferenceMetrics,
}

/// A copy of [`EngineStats`]' counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Jobs whose run panicked.
    pub panics: u64,
    /// Engines rebuilt after a panic.
    pub rebuilds: u64,
    /// Rebuilds that failed.
    pub rebuild_failures: u64,
    pub cancelled_stalled: u64,
    pub cancelled_disconnected: u64,
    pub cancelled_deadline: u64,
    /// Jobs dropped unrun because they waited past their deadline.
    pub expired_in_queue: u64,
}

impl EngineStats {
    pub fn state(&self) -> EngineState {
        match self.state.load(Ordering::Acquire) {
            0 => EngineState::Ok,
            1 => EngineState::Rebuilding,
            _ => EngineState::Failed,
        }
    }

    fn set_state(&self, s: EngineState) {
        let v = match s {
            EngineState::Ok => 0,
            EngineState::Rebuilding => 1,
            EngineState::Failed => 2,
        };
        self.state.store(v, Ordering::Release);
    }

    fn cancelled(&self, why: Cancel) {
        let c = match why {
            Cancel::Stalled => &self.cancelled_stalled,
            Cancel::Disconnected => &self.cancelled_disconnected,
            Cancel::Deadline => &self.cancelled_deadline,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn counters(&self) -> EngineCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EngineCounters {
            panics: get(&self.panics),
            rebuilds: get(&self.rebuilds),
            rebuild_failures: get(&self.rebuild_failures),
            cancelled_stalled: get(&self.cancelled_stalled),
            cancelled_disconnected: get(&self.cancelled_disconnected),
            cancelled_deadline: get(&self.cancelled_deadline),
            expired_in_queue: get(&self.expired_in_queue),
        }
    }
}

impl InferenceHandle {
    /// Loads the model on a new thread and starts serving. Returns once the
    /// model is loaded (or failed to load).
    #[cfg(feature = "inference")]
    pub async fn start(config: InferenceConfig) -> Result<InferenceHandle, Error> {
        assert!(config.queue_len > 0, "inference queue must hold a job");
        let (jobs, rx) = mpsc::channel(config.queue_len);
        let (ready_tx, ready_rx) = oneshot::channel();
        let engine_config = config.clone();
        let stats = Arc::new(EngineStats::default());
        let engine_stats = stats.clone();
        let heads = Arc::new(HeadSlot::default());
        let engine_heads = heads.clone();
        let experts = Arc::new(ExpertSlot::default());
        let engine_experts = experts.clone();
        // OPS-LOG-2: the engine thread logs in its node's span.
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                span.in_scope(|| {
                    engine::serve(
                        engine_config,
                        rx,
                        ready_tx,
                        engine_stats,
                        engine_heads,
                        engine_experts,
                    )
                })
            })
            .map_err(|e| Error::Inference(format!("cannot start the inference thread: {e}")))?;
        let (model, tokenizer) = ready_rx
            .await
            .map_err(|_| Error::Inference("the inference thread died while loading".into()))??;
        Ok(InferenceHandle {
            jobs,
            model,
            config,
            stats,
            heads,
            experts,
            tokenizer,
        })
    }

    /// Without the `inference` feature: always an error.
    #[cfg(not(feature = "inference"))]
    pub async fn start(_config: InferenceConfig) -> Result<InferenceHandle, Error> {
        Err(Error::Inference(
            "this binary was built without the `inference` feature".into(),
        ))
    }

    /// Queues `request`; `pieces` receives streamed text if given (with
    /// `try_send`: a full channel cancels the job, API-CHAT-4). Dropping the
    /// returned future, or `pieces`' receiver, cancels the job at its next
    /// token. Errors: [`Error::Busy`] when the queue is full,
    /// [`Error::Timeout`] when the deadline passed, [`Error::Inference`] when
    /// the engine is gone, failed, panicked (API-CHAT-5) or the job was
    /// cancelled.
    pub async fn generate(
        &self,
        request: ChatRequest,
        pieces: Option<mpsc::Sender<String>>,
    ) -> Result<ChatResult, Error> {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "inference.job",
            model = %self.model.name,
            max_tokens = request.max_tokens,
        );
        let result = self
            .generate_in(request, pieces, span.clone())
            .instrument(span)
            .await;
        self.stats.ops.request(outcome_of(&result));
        result
    }

    async fn generate_in(
        &self,
        request: ChatRequest,
        pieces: Option<mpsc::Sender<String>>,
        span: tracing::Span,
    ) -> Result<ChatResult, Error> {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let (reply, answer) = oneshot::channel();
        let job = Job {
            request,
            pieces,
            deadline: Instant::now() + timeout,
            reply,
            span,
        };
        // OPS-TRACE-3: the engine's side of the routing decision: this job
        // runs on this node's own engine (the router, router.rs, chose it,
        // or a peer's Generate call asked for it, RT-STAGE-1).
        let route = tracing::info_span!(
            "inference.route",
            route = "local",
            queued = self.queued(),
            capacity = self.config.queue_len,
        );
        let entered = route.enter();
        let sent = self.jobs.try_send(Work::Chat(job)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => mpsc::error::TrySendError::Full(()),
            mpsc::error::TrySendError::Closed(_) => mpsc::error::TrySendError::Closed(()),
        });
        drop(entered);
        sent.map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Error::Busy("the inference queue is full; retry later".into())
            }
            mpsc::error::TrySendError::Closed(_) => {
                Error::Inference("the inference engine has stopped".into())
            }
        })?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Inference("the inference engine stopped".into())),
            Err(_) => Err(Error::Timeout(format!(
                "inference did not finish within {} ms",
                self.config.timeout_ms
            ))),
        }
    }

    /// RT-PIPE-2: runs `step` of session `session` (a number the caller
    /// keeps unique per call) on the engine's queue, extending that
    /// session's KV cache; the stage's output tensor.
    pub async fn stage(
        &self,
        session: u64,
        step: crate::pipeline::Step,
        plan: Arc<crate::experts::StagePlan>,
    ) -> StageReply {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let (reply, answer) = oneshot::channel();
        let job = StageJob {
            session,
            step,
            plan,
            deadline: Instant::now() + timeout,
            reply,
        };
        self.jobs.try_send(Work::Stage(job)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Error::Busy("the inference queue is full; retry later".into())
            }
            mpsc::error::TrySendError::Closed(_) => {
                Error::Inference("the inference engine has stopped".into())
            }
        })?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Inference("the inference engine stopped".into())),
            Err(_) => Err(Error::Timeout(format!(
                "the stage step did not finish within {} ms",
                self.config.timeout_ms
            ))),
        }
    }

    /// RT-PIPE-8: the client this engine's stages use for experts held
    /// elsewhere (set once; later calls are ignored).
    pub fn set_expert_client(&self, client: Arc<dyn ExpertClient>) {
        let _ = self.experts.client.set(client);
    }

    /// RT-PIPE-8: computes a peer's `Expert` call from the experts this
    /// engine holds, off the engine's thread (at most
    /// [`crate::experts::MAX_EXPERT_CALLS_IN_FLIGHT`] at once: more are
    /// `busy`).
    #[cfg(feature = "inference")]
    pub async fn serve_experts(
        &self,
        model: Option<blyan_state_machine::types::Hash32>,
        call: crate::experts::ExpertCall,
    ) -> Result<crate::experts::ExpertRows, Error> {
        if model != Some(call.model) {
            return Err(Error::BadRequest(
                "this node serves experts of another model".into(),
            ));
        }
        if call.rows.hidden as usize != self.model.hidden_size {
            return Err(Error::BadRequest(format!(
                "rows of hidden size {}; the model's is {}",
                call.rows.hidden, self.model.hidden_size
            )));
        }
        let permit = self
            .experts
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Error::Busy("this node is computing as many expert calls as it takes".into())
            })?;
        let slot = self.experts.clone();
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let bank = slot.bank.lock().expect("expert bank lock");
            let bank = bank
                .as_ref()
                .ok_or_else(|| Error::BadRequest("this node holds no experts".into()))?;
            let out = engine::run_experts(bank, &call)?;
            slot.served.fetch_add(1, Ordering::Relaxed);
            Ok(out)
        });
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(Error::Inference(format!("expert call: {e}"))),
            Err(_) => Err(Error::Timeout(format!(
                "the expert call did not finish within {} ms",
                self.config.timeout_ms
            ))),
        }
    }

    /// RT-PIPE-2: drops session `session`'s cache (its call ended). A full
    /// queue leaves it to the idle expiry.
    pub fn close_stage(&self, session: u64) {
        let _ = self.jobs.try_send(Work::CloseStage(session));
    }

    /// Jobs waiting in the queue (the running one excluded).
    pub fn queued(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// OPS-MET-2: requests, tokens, queue depth and engine latency.
    pub fn render_metrics(&self, s: &mut String) {
        use std::fmt::Write as _;
        self.stats
            .ops
            .render(s, self.queued(), self.jobs.max_capacity());
        let sessions = self.stats.stage_sessions.load(Ordering::Relaxed);
        let steps = self.stats.stage_steps.load(Ordering::Relaxed);
        let batches = self.stats.stage_batches.load(Ordering::Relaxed);
        let batched = self.stats.stage_batched_steps.load(Ordering::Relaxed);
        let _ = write!(
            s,
            "# HELP blyan_inference_stage_batches_total Batches of several sessions' decode steps this engine ran (RT-PIPE-9).\n# TYPE blyan_inference_stage_batches_total counter\nblyan_inference_stage_batches_total {batches}\n\
             # HELP blyan_inference_stage_batched_steps_total Decode steps run in those batches (RT-PIPE-9).\n# TYPE blyan_inference_stage_batched_steps_total counter\nblyan_inference_stage_batched_steps_total {batched}\n"
        );
        let _ = write!(
            s,
            "# HELP blyan_inference_stage_sessions Pipeline sessions (KV caches) this engine holds for routers (RT-PIPE-2).\n# TYPE blyan_inference_stage_sessions gauge\nblyan_inference_stage_sessions {sessions}\n\
             # HELP blyan_inference_stage_steps_total Pipeline steps this engine ran for routers (RT-PIPE-2).\n# TYPE blyan_inference_stage_steps_total counter\nblyan_inference_stage_steps_total {steps}\n"
        );
        let ex = &self.experts;
        let (served, made, bytes) = (
            ex.served.load(Ordering::Relaxed),
            ex.made.load(Ordering::Relaxed),
            ex.bytes.load(Ordering::Relaxed),
        );
        let _ = write!(
            s,
            "# HELP blyan_inference_expert_calls_served_total MoE expert calls this node computed for other stages (RT-PIPE-8).\n# TYPE blyan_inference_expert_calls_served_total counter\nblyan_inference_expert_calls_served_total {served}\n\
             # HELP blyan_inference_expert_calls_made_total MoE expert calls this node's stages made to other nodes (RT-PIPE-8).\n# TYPE blyan_inference_expert_calls_made_total counter\nblyan_inference_expert_calls_made_total {made}\n\
             # HELP blyan_inference_expert_bytes_total Row bytes this node's stages sent to and received from other nodes' experts (RT-PIPE-8).\n# TYPE blyan_inference_expert_bytes_total counter\nblyan_inference_expert_bytes_total {bytes}\n"
        );
    }
}

/// How a request ended, for `blyan_inference_requests_total`.
fn outcome_of(r: &Result<ChatResult, Error>) -> crate::metrics::InferenceOutcome {
    use crate::metrics::InferenceOutcome as O;
    match r {
        Ok(_) => O::Ok,
        Err(Error::Busy(_)) => O::Busy,
        Err(Error::Timeout(_)) => O::Timeout,
        Err(Error::BadRequest(_) | Error::PaymentRequired(_)) => O::Rejected,
        Err(Error::Inference(m)) if m.starts_with("cancelled") => O::Cancelled,
        Err(_) => O::Error,
    }
}

#[cfg(feature = "inference")]
pub(crate) use engine::run_chat;

#[cfg(feature = "inference")]
mod engine {
    use super::{
        Cancel, ChatResult, EngineState, EngineStats, ExpertClient, ExpertSlot, HeadSlot,
        HeadUpdate, InferenceConfig, Job, ModelInfo, REBUILD_RETRY_MS, STREAM_PIECES, Work,
    };
    use crate::Error;
    use crate::pipeline::{Kind as StepKind, Step};
    use blyan_gpu::LoadedModel;
    use blyan_gpu::generate::{GenerateRequest, generate_with};
    use blyan_gpu::sample::SamplingParams;
    use std::ops::ControlFlow;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    use tokio::sync::mpsc::error::TrySendError;
    use tokio::sync::{mpsc, oneshot};

    fn gpu(e: blyan_gpu::GpuError) -> Error {
        Error::Inference(e.to_string())
    }

    fn load(config: &InferenceConfig) -> Result<(LoadedModel, ModelInfo), Error> {
        let device = blyan_gpu::parse_device(&config.device).map_err(gpu)?;
        let kind = blyan_gpu::parse_dtype(&config.dtype).map_err(gpu)?;
        let layers = config.layers.map(|[a, b]| (a, b));
        if let Some(e) = &config.experts
            && (e.is_empty() || e.windows(2).any(|w| w[0] >= w[1]))
        {
            return Err(Error::Config(
                "inference.experts must be a non-empty, strictly increasing list".into(),
            ));
        }
        let held: Option<Vec<i64>> = config
            .experts
            .as_ref()
            .map(|e| e.iter().map(|&x| i64::from(x)).collect());
        let loaded = LoadedModel::load_held(
            config.model_dir.as_deref(),
            device,
            kind,
            layers,
            held.as_deref(),
        )
        .map_err(gpu)?;
        let cfg = &loaded.model.cfg;
        let name = match &config.model_dir {
            None => "blyan-default".to_string(),
            Some(dir) => dir
                .file_name()
                .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
        };
        let info = ModelInfo {
            name,
            layers: cfg.num_hidden_layers as usize,
            hidden_size: cfg.hidden_size as usize,
            vocab_size: cfg.vocab_size as usize,
            is_moe: cfg.moe.is_some(),
            num_experts: cfg.moe.as_ref().map_or(0, |m| m.num_experts as usize),
            experts: match (&cfg.moe, &config.experts) {
                (None, _) => Vec::new(),
                (Some(m), None) => (0..m.num_experts)
                    .map(|e| u16::try_from(e).unwrap_or(u16::MAX))
                    .collect(),
                (Some(m), Some(e)) => {
                    if let Some(bad) = e.iter().find(|&&x| i64::from(x) >= m.num_experts) {
                        return Err(Error::Config(format!(
                            "inference.experts lists expert {bad}; the model has {}",
                            m.num_experts
                        )));
                    }
                    e.clone()
                }
            },
            device: config.device.clone(),
            first_layer: loaded.model.range.start as usize,
            last_layer: (loaded.model.range.end - 1) as usize,
        };
        if loaded.tokenizer.is_none() {
            return Err(Error::Inference(
                "the model has no tokenizer.json; /chat needs one".into(),
            ));
        }
        Ok((loaded, info))
    }

    /// API-CHAT-4: whether `job` may go on after a token, handing `piece` to
    /// its stream without ever waiting.
    fn step(job: &Job, piece: Option<&str>) -> Result<(), Cancel> {
        // First: at the deadline the caller gives up too, which would
        // otherwise look like a client that went away.
        if Instant::now() >= job.deadline {
            return Err(Cancel::Deadline);
        }
        if job.reply.is_closed() {
            return Err(Cancel::Disconnected);
        }
        if let Some(tx) = &job.pieces {
            match piece {
                Some(p) => match tx.try_send(p.to_string()) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => return Err(Cancel::Stalled),
                    Err(TrySendError::Closed(_)) => return Err(Cancel::Disconnected),
                },
                None if tx.is_closed() => return Err(Cancel::Disconnected),
                None => {}
            }
        }
        Ok(())
    }

    fn run(
        loaded: &LoadedModel,
        config: &InferenceConfig,
        job: &Job,
        stats: &EngineStats,
    ) -> Result<ChatResult, Error> {
        let range = loaded.model.range;
        if !(range.embed && range.head) {
            return Err(Error::Inference(format!(
                "this engine holds layers {}..={} only; it serves routers as a pipeline stage (RT-PIPE-2)",
                range.start,
                range.end - 1
            )));
        }
        let tokenizer = loaded.tokenizer.as_ref().expect("checked at load");
        let req = &job.request;
        let inject_panic = config
            .panic_on_prompt
            .as_deref()
            .is_some_and(|m| req.prompt.contains(m));
        // OPS-TRACE-3: the pipeline stage this engine runs: all the layers.
        let stage = tracing::info_span!(
            "stage",
            stage = 0,
            layers = %format!("0..{}", loaded.model.cfg.num_hidden_layers),
        );
        let _stage = stage.enter();
        let token_delay = std::time::Duration::from_millis(config.token_delay_ms);
        let model = &loaded.model;
        let mut cache = blyan_gpu::model::KvCache::new();
        run_chat(
            tokenizer,
            &model.cfg.eos_token_ids,
            config,
            req,
            |ids| model.last_logits(ids, &mut cache),
            |piece| {
                if inject_panic {
                    panic!("fault injection: the prompt contains inference.panic_on_prompt");
                }
                if !token_delay.is_zero() {
                    std::thread::sleep(token_delay);
                }
                step(job, piece)
            },
            stats,
        )
    }

    /// A `/chat` job's generation over any forward pass (`forward(ids)`:
    /// the logits after extending the sequence by `ids`): this engine's
    /// model, or a route of stages on other nodes (RT-PIPE-3), so both
    /// treat prompts, limits, stops, cancellation and log-probabilities
    /// alike. `on_step` is asked after every token whether to go on.
    pub(crate) fn run_chat(
        tokenizer: &blyan_gpu::tokenizer::Tokenizer,
        eos_ids: &[i64],
        config: &InferenceConfig,
        req: &super::ChatRequest,
        forward: impl FnMut(&[i64]) -> blyan_gpu::Result<Vec<f32>>,
        mut on_step: impl FnMut(Option<&str>) -> Result<(), Cancel>,
        stats: &EngineStats,
    ) -> Result<ChatResult, Error> {
        let prompt_ids = tokenizer.encode(&req.prompt).map_err(gpu)?;
        if prompt_ids.is_empty() {
            return Err(Error::BadRequest("the prompt encodes to no tokens".into()));
        }
        if prompt_ids.len() > config.max_prompt_tokens {
            return Err(Error::BadRequest(format!(
                "the prompt is {} tokens; this node accepts at most {}",
                prompt_ids.len(),
                config.max_prompt_tokens
            )));
        }
        // API-PAY-1: the paid budget covers the prompt and the completion.
        let mut max_tokens = req.max_tokens;
        let mut capped = false;
        if let Some(total) = req.max_total_tokens {
            let left = usize::try_from(total)
                .unwrap_or(usize::MAX)
                .saturating_sub(prompt_ids.len());
            if left == 0 {
                return Err(Error::PaymentRequired(format!(
                    "the prompt is {} tokens; the allowance pays for {total} tokens in all",
                    prompt_ids.len()
                )));
            }
            if left < max_tokens {
                max_tokens = left;
                capped = true;
            }
        }
        let request = GenerateRequest {
            prompt_ids,
            max_tokens,
            sampling: SamplingParams {
                temperature: req.temperature,
                top_k: 0,
                top_p: req.top_p,
                seed: req.seed,
            },
            stop: req.stop.clone(),
            stop_ids: eos_ids.to_vec(),
            top_logprobs: req.top_logprobs.map(usize::from),
        };
        let mut cancelled = None;
        let out = generate_with(forward, Some(tokenizer), &request, |piece| {
            match on_step(piece) {
                Ok(()) => ControlFlow::Continue(()),
                Err(why) => {
                    cancelled = Some(why);
                    ControlFlow::Break(())
                }
            }
        })
        .map_err(gpu)?;
        if let Some(why) = cancelled {
            stats.cancelled(why);
            let tokens = out.completion_tokens;
            tracing::debug!(?why, tokens, "inference job cancelled");
            return Err(match why {
                Cancel::Deadline => Error::Timeout(format!(
                    "inference did not finish within {} ms; cancelled after {tokens} tokens",
                    config.timeout_ms
                )),
                Cancel::Stalled => Error::Inference(format!(
                    "cancelled after {tokens} tokens: the client left more than {STREAM_PIECES} streamed pieces unread"
                )),
                Cancel::Disconnected => Error::Inference(format!(
                    "cancelled after {tokens} tokens: the client went away"
                )),
            });
        }
        let text_of = |id: i64| tokenizer.decode(&[id]).unwrap_or_default();
        let logprobs = req.top_logprobs.map(|_| {
            out.logprobs
                .iter()
                .map(|t| super::TokenLogprob {
                    token: text_of(t.id),
                    id: t.id,
                    logprob: t.logprob,
                    top_logprobs: t
                        .top
                        .iter()
                        .map(|&(id, logprob)| super::TopLogprob {
                            token: text_of(id),
                            id,
                            logprob,
                        })
                        .collect(),
                })
                .collect()
        });
        Ok(ChatResult {
            text: out.text,
            prompt_tokens: out.prompt_tokens,
            completion_tokens: out.completion_tokens,
            finish_reason: out.finish_reason.as_str(),
            capped: capped && out.finish_reason.as_str() == "length",
            experts_used: Vec::new(),
            head: String::new(),
            logprobs,
        })
    }

    fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic payload".into())
    }

    /// API-CHAT-5: reloads the model; `None` (state `failed`) if that fails
    /// or panics.
    fn rebuild(config: &InferenceConfig, stats: &EngineStats) -> Option<LoadedModel> {
        stats.set_state(EngineState::Rebuilding);
        let outcome = match catch_unwind(AssertUnwindSafe(|| load(config))) {
            Ok(Ok((loaded, _))) => Ok(loaded),
            Ok(Err(e)) => Err(e.to_string()),
            Err(p) => Err(format!("panicked: {}", panic_message(&*p))),
        };
        match outcome {
            Ok(loaded) => {
                stats.rebuilds.fetch_add(1, Ordering::Relaxed);
                stats.set_state(EngineState::Ok);
                tracing::warn!("inference engine rebuilt");
                Some(loaded)
            }
            Err(e) => {
                stats.rebuild_failures.fetch_add(1, Ordering::Relaxed);
                stats.set_state(EngineState::Failed);
                tracing::error!(error = %e, "inference engine rebuild failed");
                None
            }
        }
    }

    /// POL-SERVE-1: the model with the genesis weights of `config`'s block
    /// directory (`base`, loaded once, f32 on the CPU) plus `u`'s deltas, in
    /// the configured dtype and device.
    fn with_head(
        config: &InferenceConfig,
        base: &mut Option<blyan_gpu::pol::Weights>,
        u: &HeadUpdate,
    ) -> Result<blyan_gpu::model::Qwen3, Error> {
        let dir = config
            .model_dir
            .as_deref()
            .filter(|d| d.join("manifest.json").is_file())
            .ok_or_else(|| {
                Error::Inference("following the chain's heads needs a block directory".into())
            })?;
        if base.is_none() {
            *base = Some(blyan_gpu::pol::Weights::load(Some(dir)).map_err(gpu)?);
        }
        let mut w = base.as_ref().expect("loaded above").shallow();
        for (target, d) in &u.deltas {
            // POL-DELTA-6: an accepted delta touches its own target only.
            w.apply_target_delta(*target, d).map_err(gpu)?;
        }
        let device = blyan_gpu::parse_device(&config.device).map_err(gpu)?;
        let kind = blyan_gpu::parse_dtype(&config.dtype).map_err(gpu)?;
        let range =
            blyan_gpu::model::LayerRange::select(&w.cfg, config.layers.map(|[a, b]| (a, b)))
                .map_err(gpu)?;
        blyan_gpu::model::Qwen3::load(&w.cfg, &w.tensors, range, device, kind).map_err(gpu)
    }

    /// POL-SERVE-1/2: takes a pending head (between jobs), or re-applies the
    /// one served after a rebuild reloaded the genesis weights.
    fn take_head(
        config: &InferenceConfig,
        heads: &HeadSlot,
        loaded: &mut LoadedModel,
        base: &mut Option<blyan_gpu::pol::Weights>,
        applied: &mut Option<HeadUpdate>,
        reapply: bool,
    ) -> bool {
        let next = match heads.take() {
            Some(u) => u,
            None if reapply => match applied.clone() {
                Some(u) => u,
                None => return false,
            },
            None => return false,
        };
        if next.deltas.is_empty() && applied.as_ref().is_none_or(|a| a.deltas.is_empty()) {
            heads.served(&next.name);
            *applied = Some(next);
            return false;
        }
        match catch_unwind(AssertUnwindSafe(|| with_head(config, base, &next))) {
            Ok(Ok(model)) => {
                loaded.model = model;
                heads.swaps.fetch_add(1, Ordering::Relaxed);
                heads.served(&next.name);
                tracing::info!(head = %next.name, deltas = next.deltas.len(), "serving a new head");
                *applied = Some(next);
                true
            }
            Ok(Err(e)) => {
                heads.swap_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(head = %next.name, error = %e, "the new head could not be built; serving the old one");
                false
            }
            Err(p) => {
                heads.swap_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(head = %next.name, panic = %panic_message(&*p), "building the new head panicked; serving the old one");
                false
            }
        }
    }

    /// RT-PIPE-8: computes a peer's expert call from `bank`: each expert's
    /// unweighted output for its rows, in the call's dtype.
    pub(super) fn run_experts(
        bank: &blyan_gpu::model::ExpertBank,
        call: &crate::experts::ExpertCall,
    ) -> Result<crate::experts::ExpertRows, Error> {
        let rows = &call.rows;
        let mut bytes = Vec::with_capacity(rows.bytes.len());
        for (i, &(expert, n)) in rows.experts.iter().enumerate() {
            let y = bank
                .forward_bytes(
                    i64::from(call.layer),
                    i64::from(expert),
                    rows.dtype.name(),
                    i64::from(n),
                    rows.slice(i),
                )
                .map_err(|e| Error::BadRequest(format!("expert call: {e}")))?;
            bytes.extend_from_slice(&y);
        }
        Ok(crate::experts::ExpertRows {
            dtype: rows.dtype,
            hidden: rows.hidden,
            experts: rows.experts.clone(),
            bytes,
        })
    }

    /// RT-PIPE-8: a stage step's calls for the experts it does not hold,
    /// one per node the plan names, all at once.
    struct Dispatch<'a> {
        client: Option<&'a dyn ExpertClient>,
        placement: &'a crate::experts::Placement,
        model: blyan_state_machine::types::Hash32,
        slot: &'a ExpertSlot,
        /// The failed call's error (it names the expert's node).
        failure: Option<Error>,
    }

    impl blyan_gpu::stage::RemoteExpertBytes for Dispatch<'_> {
        fn compute(
            &mut self,
            layer: i64,
            dtype: &'static str,
            hidden: i64,
            work: Vec<(i64, i64, Vec<u8>)>,
        ) -> blyan_gpu::Result<Vec<Vec<u8>>> {
            use blyan_gpu::GpuError;
            let client = self.client.ok_or_else(|| {
                GpuError::Invalid("this node cannot call other nodes' experts".into())
            })?;
            let layer_u = u32::try_from(layer).expect("layers are small");
            let mut by_node: std::collections::BTreeMap<_, Vec<usize>> = Default::default();
            for (i, (e, _, _)) in work.iter().enumerate() {
                let e16 = u16::try_from(*e).expect("experts fit u16 (RT-ROUTE-4)");
                let node = self
                    .placement
                    .get(&(layer_u, e16))
                    .ok_or(GpuError::ExpertNotHeld { layer, expert: *e })?;
                by_node.entry(*node).or_default().push(i);
            }
            let dtype = crate::pipeline::Dtype::from_name(dtype)
                .map_err(|e| GpuError::Invalid(e.to_string()))?;
            let hidden = u32::try_from(hidden).expect("hidden fits u32");
            let mut calls = Vec::with_capacity(by_node.len());
            let mut order = Vec::with_capacity(by_node.len());
            let mut moved = 0u64;
            for (node, idxs) in by_node {
                let mut bytes = Vec::new();
                let mut experts = Vec::with_capacity(idxs.len());
                for &i in &idxs {
                    let (e, n, b) = &work[i];
                    bytes.extend_from_slice(b);
                    experts.push((
                        u16::try_from(*e).expect("checked above"),
                        u32::try_from(*n).expect("rows fit u32"),
                    ));
                }
                moved += bytes.len() as u64;
                let rows = crate::experts::ExpertRows {
                    dtype,
                    hidden,
                    experts,
                    bytes,
                };
                calls.push((
                    node,
                    crate::experts::ExpertCall {
                        model: self.model,
                        layer: layer_u,
                        rows,
                    },
                ));
                order.push(idxs);
            }
            let answers = client.call_all(calls);
            self.slot
                .made
                .fetch_add(answers.len() as u64, Ordering::Relaxed);
            let mut out: Vec<Vec<u8>> = vec![Vec::new(); work.len()];
            for (answer, idxs) in answers.into_iter().zip(order) {
                let rows = match answer {
                    Ok(r) => r,
                    Err(e) => {
                        let msg = e.to_string();
                        self.failure = Some(e);
                        return Err(GpuError::Invalid(msg));
                    }
                };
                moved += rows.bytes.len() as u64;
                for (k, i) in idxs.into_iter().enumerate() {
                    out[i] = rows.slice(k).to_vec();
                }
            }
            self.slot.bytes.fetch_add(moved, Ordering::Relaxed);
            Ok(out)
        }
    }

    /// RT-PIPE-2: one session's cache.
    struct Session {
        cache: blyan_gpu::model::KvCache,
        last_used: Instant,
    }

    /// RT-PIPE-2: runs one stage step on `model`, extending its session's
    /// cache (made on the session's first step, position 0).
    #[allow(clippy::too_many_arguments)]
    fn stage_step(
        model: &blyan_gpu::model::Qwen3,
        config: &InferenceConfig,
        sessions: &mut std::collections::BTreeMap<u64, Session>,
        session_id: u64,
        step: Step,
        plan: &crate::experts::StagePlan,
        experts: &ExpertSlot,
    ) -> Result<(Step, Vec<(u32, u16)>), Error> {
        use blyan_gpu::stage::{HiddenStates, StageInput};
        if config
            .panic_on_stage_position
            .is_some_and(|p| step.position >= p)
        {
            panic!("fault injection: the step's position is inference.panic_on_stage_position");
        }
        let now = Instant::now();
        let idle = Duration::from_millis(config.stage_idle_ms);
        sessions.retain(|_, s| now.duration_since(s.last_used) < idle);
        if !sessions.contains_key(&session_id) {
            if step.position != 0 {
                return Err(Error::BadRequest(format!(
                    "no session here starts at position {} (expired or never opened)",
                    step.position
                )));
            }
            if sessions.len() >= config.max_stage_sessions {
                return Err(Error::Busy(format!(
                    "this stage holds {} sessions, its limit",
                    sessions.len()
                )));
            }
            sessions.insert(
                session_id,
                Session {
                    cache: blyan_gpu::model::KvCache::new(),
                    last_used: now,
                },
            );
        }
        let session = sessions.get_mut(&session_id).expect("inserted above");
        session.last_used = now;
        if i64::from(step.position) != session.cache.len {
            return Err(Error::BadRequest(format!(
                "a step at position {} for a cache of {}",
                step.position, session.cache.len
            )));
        }
        let position = step.position + step.seq();
        let input = match step.kind {
            StepKind::Ids => StageInput::Ids(vec![step.to_ids()?]),
            StepKind::Hidden => StageInput::Hidden(HiddenStates {
                shape: step.shape.iter().map(|&d| i64::from(d)).collect(),
                dtype: step.dtype.name().to_owned(),
                bytes: step.bytes,
            }),
            StepKind::Logits => {
                return Err(Error::BadRequest("logits are no stage's input".into()));
            }
        };
        let mut dispatch = Dispatch {
            client: experts.client.get().map(|c| &**c),
            placement: &plan.placement,
            model: plan.model,
            slot: experts,
            failure: None,
        };
        let mut remote = blyan_gpu::stage::OverBytes(&mut dispatch);
        let mut moe = blyan_gpu::model::MoeContext {
            remote: Some(&mut remote),
            used: Default::default(),
        };
        let out = model.run_stage_moe(&input, &mut session.cache, &mut moe);
        let used: Vec<(u32, u16)> = moe
            .used
            .iter()
            .map(|&(l, e)| {
                (
                    u32::try_from(l).unwrap_or(u32::MAX),
                    u16::try_from(e).unwrap_or(u16::MAX),
                )
            })
            .collect();
        drop(moe);
        let out = match (out, dispatch.failure) {
            (Ok(out), _) => out,
            // RT-PIPE-8: an expert call failed; its error names the node.
            (Err(_), Some(e)) => return Err(e),
            (Err(e), None) => return Err(Error::BadRequest(format!("stage input: {e}"))),
        };
        let step = step_of(out, position)?;
        Ok((step, used))
    }

    /// RT-PIPE-9: whether `job` can join a batch: a decode step (one
    /// position) of an open session at its cache's length, of the kind
    /// this stage takes, on a dense model (an MoE stage's steps run alone:
    /// each reports the experts it used, and routers place experts per
    /// request).
    fn batchable(
        model: &blyan_gpu::model::Qwen3,
        config: &InferenceConfig,
        sessions: &std::collections::BTreeMap<u64, Session>,
        job: &super::StageJob,
    ) -> bool {
        let step = &job.step;
        // Inputs are checked here, so that a batch never fails for one
        // router's malformed step: anything else runs alone.
        let kind_ok = if model.range.embed {
            step.kind == StepKind::Ids
                && step.to_ids().is_ok_and(|ids| model.check_ids(&ids).is_ok())
        } else {
            step.kind == StepKind::Hidden
                && step.shape[0] == 1
                && i64::from(step.shape[2]) == model.cfg.hidden_size
        };
        model.cfg.moe.is_none()
            && kind_ok
            && config
                .panic_on_stage_position
                .is_none_or(|p| step.position < p)
            && step.seq() == 1
            && sessions
                .get(&job.session)
                .is_some_and(|s| s.cache.len == i64::from(step.position))
    }

    /// The step a stage answers with for `out`, computed from a step that
    /// ended at `position`.
    fn step_of(out: blyan_gpu::stage::StageOutput, position: u32) -> Result<Step, Error> {
        use blyan_gpu::stage::StageOutput;
        let dims = |v: &[i64]| -> Result<[u32; 3], Error> {
            let d: Vec<u32> = v
                .iter()
                .map(|&x| u32::try_from(x).unwrap_or(u32::MAX))
                .collect();
            d.try_into()
                .map_err(|_| Error::Inference(format!("an output of shape {v:?}")))
        };
        Ok(match out {
            StageOutput::Hidden(h) => Step {
                position,
                kind: StepKind::Hidden,
                dtype: crate::pipeline::Dtype::from_name(&h.dtype)?,
                shape: dims(&h.shape)?,
                bytes: h.bytes,
            },
            out @ StageOutput::Logits(_) => {
                // The last position's row, as the single-process loop takes it.
                let row = out.last_logits().map_err(gpu)?.expect("the head's output");
                Step {
                    position,
                    kind: StepKind::Logits,
                    dtype: crate::pipeline::Dtype::F32,
                    shape: [1, 1, u32::try_from(row.len()).unwrap_or(u32::MAX)],
                    bytes: row.iter().flat_map(|x| x.to_le_bytes()).collect(),
                }
            }
        })
    }

    /// RT-PIPE-9: runs `batch` (decode steps of distinct open sessions,
    /// each [`batchable`], so with well-formed inputs) as one forward pass;
    /// each step's answer, in order.
    fn stage_batch(
        model: &blyan_gpu::model::Qwen3,
        sessions: &mut std::collections::BTreeMap<u64, Session>,
        batch: &mut [super::StageJob],
    ) -> Vec<super::StageReply> {
        use blyan_gpu::stage::{HiddenStates, StageInput};
        let now = Instant::now();
        let inputs: Result<Vec<StageInput>, Error> = batch
            .iter_mut()
            .map(|job| {
                let step = &mut job.step;
                Ok(match step.kind {
                    StepKind::Ids => StageInput::Ids(vec![step.to_ids()?]),
                    _ => StageInput::Hidden(HiddenStates {
                        shape: step.shape.iter().map(|&d| i64::from(d)).collect(),
                        dtype: step.dtype.name().to_owned(),
                        bytes: std::mem::take(&mut step.bytes),
                    }),
                })
            })
            .collect();
        let result = inputs.and_then(|inputs| {
            let order: Vec<u64> = batch.iter().map(|j| j.session).collect();
            let mut by_id: std::collections::BTreeMap<u64, &mut Session> = sessions
                .iter_mut()
                .filter(|(id, _)| order.contains(id))
                .map(|(id, s)| (*id, s))
                .collect();
            let mut caches: Vec<&mut blyan_gpu::model::KvCache> = Vec::with_capacity(order.len());
            for id in &order {
                let s = by_id.remove(id).expect("batchable: the session is open");
                s.last_used = now;
                caches.push(&mut s.cache);
            }
            model
                .run_stage_batch(
                    &inputs,
                    &mut caches,
                    &mut blyan_gpu::model::MoeContext::default(),
                )
                .map_err(|e| Error::BadRequest(format!("stage input: {e}")))
        });
        match result {
            Ok(outs) => batch
                .iter()
                .zip(outs)
                .map(|(job, out)| Ok((step_of(out, job.step.position + 1)?, Vec::new())))
                .collect(),
            Err(e) => {
                // Inputs were checked by `batchable`: an engine fault.
                batch
                    .iter()
                    .map(|_| Err(Error::BadRequest(format!("a batched step failed: {e}"))))
                    .collect()
            }
        }
    }

    /// API-CHAT-5, RT-PIPE-2: after a panic in a job or a stage step (counted
    /// by the caller before it answers, so a client that sees the error sees
    /// the count), the engine is dropped with every pipeline session (their caches went
    /// with it; routers replay them) and the model reloaded.
    fn restart(
        loaded: &mut Option<LoadedModel>,
        sessions: &mut std::collections::BTreeMap<u64, Session>,
        config: &InferenceConfig,
        stats: &EngineStats,
        experts: &ExpertSlot,
    ) {
        stats.set_state(EngineState::Rebuilding);
        sessions.clear();
        stats.stage_sessions.store(0, Ordering::Relaxed);
        if let Some(old) = loaded.take() {
            // Its tensors may be in any state; freeing them must not take
            // the thread down either.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(old)));
        }
        *loaded = rebuild(config, stats);
        // RT-PIPE-8: expert calls are served from the new weights.
        if let Some(l) = loaded.as_ref() {
            experts.publish(&l.model);
        }
    }

    pub(super) fn serve(
        config: InferenceConfig,
        mut jobs: mpsc::Receiver<Work>,
        ready: oneshot::Sender<Result<(ModelInfo, super::RouterTokenizer), Error>>,
        stats: Arc<EngineStats>,
        heads: Arc<HeadSlot>,
        experts: Arc<ExpertSlot>,
    ) {
        let mut loaded = match load(&config) {
            Ok((loaded, info)) => {
                tracing::info!(model = %info.name, layers = info.layers, device = %info.device, "inference engine ready");
                let tokenizer = match LoadedModel::load_tokenizer(config.model_dir.as_deref()) {
                    Ok(Some(t)) => t,
                    Ok(None) => {
                        let _ = ready.send(Err(Error::Inference(
                            "the model has no tokenizer.json".into(),
                        )));
                        return;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(gpu(e)));
                        return;
                    }
                };
                let eos = loaded.model.cfg.eos_token_ids.clone();
                experts.publish(&loaded.model);
                let _ = ready.send(Ok((info, Arc::new((tokenizer, eos)))));
                Some(loaded)
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let retry = Duration::from_millis(REBUILD_RETRY_MS);
        let mut last_rebuild = Instant::now();
        let mut base = None;
        let mut applied: Option<HeadUpdate> = None;
        let mut reapply = false;
        let mut sessions = std::collections::BTreeMap::new();
        // RT-PIPE-9: work taken from the queue while gathering a batch, run
        // next in its order.
        let mut pending: std::collections::VecDeque<Work> = Default::default();
        while let Some(work) = pending.pop_front().or_else(|| jobs.blocking_recv()) {
            let job = match work {
                Work::Chat(job) => job,
                Work::CloseStage(id) => {
                    sessions.remove(&id);
                    stats
                        .stage_sessions
                        .store(sessions.len() as u64, Ordering::Relaxed);
                    continue;
                }
                Work::Stage(job) => {
                    if Instant::now() >= job.deadline {
                        stats.expired_in_queue.fetch_add(1, Ordering::Relaxed);
                        let _ = job.reply.send(Err(Error::Timeout(
                            "the stage step waited past the inference timeout".into(),
                        )));
                        continue;
                    }
                    if job.reply.is_closed() {
                        stats.cancelled(Cancel::Disconnected);
                        continue;
                    }
                    if loaded.is_none() && last_rebuild.elapsed() >= retry {
                        loaded = rebuild(&config, &stats);
                        last_rebuild = Instant::now();
                        reapply = true;
                        if let Some(l) = &loaded {
                            experts.publish(&l.model);
                        }
                    }
                    // POL-SERVE-2 for stages: a new head is taken only while
                    // no session is open, so no cache mixes two heads.
                    if let Some(l) = loaded.as_mut().filter(|_| sessions.is_empty()) {
                        if take_head(&config, &heads, l, &mut base, &mut applied, reapply) {
                            experts.publish(&l.model);
                        }
                        reapply = false;
                    }
                    let Some(l) = &loaded else {
                        let _ = job
                            .reply
                            .send(Err(Error::Inference("the inference engine is down".into())));
                        continue;
                    };
                    // RT-PIPE-9: decode steps of other sessions already
                    // queued join this one in a batch.
                    let mut batch = vec![job];
                    if config.max_stage_batch > 1
                        && batchable(&l.model, &config, &sessions, &batch[0])
                    {
                        while batch.len() < config.max_stage_batch {
                            match jobs.try_recv() {
                                Ok(Work::Stage(next))
                                    if batchable(&l.model, &config, &sessions, &next)
                                        && Instant::now() < next.deadline
                                        && !next.reply.is_closed()
                                        && batch.iter().all(|b| b.session != next.session) =>
                                {
                                    batch.push(next)
                                }
                                Ok(other) => {
                                    pending.push_back(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    let started = Instant::now();
                    stats.ops.set_running(true);
                    if config.token_delay_ms > 0 {
                        // Test-only: a slow stage, so a kill lands mid-stream.
                        std::thread::sleep(Duration::from_millis(config.token_delay_ms));
                    }
                    if batch.len() > 1 {
                        let n = batch.len() as u64;
                        let outcome = catch_unwind(AssertUnwindSafe(|| {
                            stage_batch(&l.model, &mut sessions, &mut batch)
                        }));
                        stats.ops.set_running(false);
                        stats.ops.engine_ms.observe(started.elapsed());
                        stats.stage_steps.fetch_add(n, Ordering::Relaxed);
                        stats.stage_batches.fetch_add(1, Ordering::Relaxed);
                        stats.stage_batched_steps.fetch_add(n, Ordering::Relaxed);
                        match outcome {
                            Ok(replies) => {
                                for (job, r) in batch.into_iter().zip(replies) {
                                    let _ = job.reply.send(r);
                                }
                            }
                            Err(payload) => {
                                let why = panic_message(&*payload);
                                tracing::error!(panic = %why, "a batch of stage steps panicked; rebuilding the engine");
                                stats.panics.fetch_add(1, Ordering::Relaxed);
                                for job in batch {
                                    let _ = job.reply.send(Err(Error::Inference(format!(
                                        "the inference engine panicked ({why}); it is being rebuilt"
                                    ))));
                                }
                                restart(&mut loaded, &mut sessions, &config, &stats, &experts);
                                last_rebuild = Instant::now();
                                reapply = true;
                            }
                        }
                        stats
                            .stage_sessions
                            .store(sessions.len() as u64, Ordering::Relaxed);
                        continue;
                    }
                    let job = batch.pop().expect("one job");
                    let outcome = catch_unwind(AssertUnwindSafe(|| {
                        stage_step(
                            &l.model,
                            &config,
                            &mut sessions,
                            job.session,
                            job.step,
                            &job.plan,
                            &experts,
                        )
                    }));
                    stats.ops.set_running(false);
                    stats.ops.engine_ms.observe(started.elapsed());
                    stats.stage_steps.fetch_add(1, Ordering::Relaxed);
                    stats
                        .stage_sessions
                        .store(sessions.len() as u64, Ordering::Relaxed);
                    match outcome {
                        Ok(r) => {
                            let _ = job.reply.send(r);
                        }
                        Err(payload) => {
                            // Routers replay the lost sessions (RT-PIPE-4).
                            let why = panic_message(&*payload);
                            tracing::error!(panic = %why, "stage step panicked; rebuilding the engine");
                            stats.panics.fetch_add(1, Ordering::Relaxed);
                            let _ = job.reply.send(Err(Error::Inference(format!(
                                "the inference engine panicked ({why}); it is being rebuilt"
                            ))));
                            restart(&mut loaded, &mut sessions, &config, &stats, &experts);
                            last_rebuild = Instant::now();
                            reapply = true;
                        }
                    }
                    continue;
                }
            };
            if Instant::now() >= job.deadline {
                stats.expired_in_queue.fetch_add(1, Ordering::Relaxed);
                let _ = job.reply.send(Err(Error::Timeout(
                    "the request waited past the inference timeout".into(),
                )));
                continue;
            }
            if job.reply.is_closed() {
                // API-CHAT-4: its client went away while it was queued.
                stats.cancelled(Cancel::Disconnected);
                continue;
            }
            if loaded.is_none() && last_rebuild.elapsed() >= retry {
                loaded = rebuild(&config, &stats);
                last_rebuild = Instant::now();
                reapply = true;
                if let Some(l) = &loaded {
                    experts.publish(&l.model);
                }
            }
            if let Some(l) = loaded.as_mut() {
                if take_head(&config, &heads, l, &mut base, &mut applied, reapply) {
                    experts.publish(&l.model);
                }
                reapply = false;
            }
            let head = heads.serving();
            let Some(model) = &loaded else {
                let _ = job.reply.send(Err(Error::Inference(format!(
                    "the inference engine is down: its rebuild after a panic failed (retried at most every {REBUILD_RETRY_MS} ms)"
                ))));
                continue;
            };
            // OPS-TRACE-3: the engine's work, a child of the request's job.
            let span = tracing::info_span!(
                parent: &job.span,
                "engine.generate",
                prompt_tokens = tracing::field::Empty,
                completion_tokens = tracing::field::Empty,
            );
            let _in = span.enter();
            let started = Instant::now();
            stats.ops.set_running(true);
            // API-CHAT-5: a panic ends this job, not the engine.
            let outcome = catch_unwind(AssertUnwindSafe(|| run(model, &config, &job, &stats)));
            stats.ops.set_running(false);
            stats.ops.engine_ms.observe(started.elapsed());
            if let Ok(Ok(r)) = &outcome {
                stats.ops.tokens(r.prompt_tokens, r.completion_tokens);
                span.record("prompt_tokens", r.prompt_tokens);
                span.record("completion_tokens", r.completion_tokens);
            }
            match outcome {
                Ok(result) => {
                    let _ = job.reply.send(result.map(|r| ChatResult { head, ..r }));
                }
                Err(payload) => {
                    let why = panic_message(&*payload);
                    tracing::error!(panic = %why, "inference job panicked; rebuilding the engine");
                    stats.panics.fetch_add(1, Ordering::Relaxed);
                    let _ = job.reply.send(Err(Error::Inference(format!(
                        "the inference engine panicked ({why}); it is being rebuilt, retry"
                    ))));
                    restart(&mut loaded, &mut sessions, &config, &stats, &experts);
                    last_rebuild = Instant::now();
                    reapply = true;
                }
            }
        }
    }
}

#[cfg(all(test, feature = "inference"))]
mod tests {
    //! The engine on the embedded model, driven through [`InferenceHandle`]
    //! like the HTTP handlers drive it. Waits are bounded by a generous
    //! deadline (a hang is a failure), never timed assertions.
    use super::*;

    /// Liveness bound of every wait here.
    const DEADLINE: Duration = Duration::from_secs(240);

    fn config() -> InferenceConfig {
        InferenceConfig {
            // Long enough that only what a test provokes ends a job early.
            timeout_ms: 600_000,
            max_tokens_limit: 4_000,
            ..InferenceConfig::default()
        }
    }

    fn request(prompt: &str, max_tokens: usize) -> ChatRequest {
        ChatRequest {
            prompt: prompt.into(),
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            max_total_tokens: None,
            top_logprobs: None,
        }
    }

    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(DEADLINE, f)
            .await
            .unwrap_or_else(|_| panic!("gave up waiting for {what}"))
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        within(what, async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// A long greedy generation streams far more than [`STREAM_PIECES`]
    /// pieces (the premise of the stalled-reader test).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_generation_streams_more_pieces_than_the_channel_holds() {
        let engine = InferenceHandle::start(config()).await.unwrap();
        let (tx, mut rx) = mpsc::channel(STREAM_PIECES);
        let reader = tokio::spawn(async move {
            let mut n = 0usize;
            while rx.recv().await.is_some() {
                n += 1;
            }
            n
        });
        // Greedy decoding of "hello" ends (end of text) after 580 tokens.
        let r = within(
            "generation",
            engine.generate(request("hello", 500), Some(tx)),
        )
        .await
        .unwrap();
        assert_eq!(r.finish_reason, "length", "{r:?}");
        let pieces = within("reader", reader).await.unwrap();
        assert!(pieces > 2 * STREAM_PIECES, "{pieces} pieces");
    }

    /// API-CHAT-4: a stream nobody reads fills its piece channel; the engine
    /// cancels the job instead of waiting, and serves the next job.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_chat_4_a_stalled_reader_is_cancelled_and_the_engine_goes_on() {
        let engine = InferenceHandle::start(config()).await.unwrap();
        let (tx, rx) = mpsc::channel(STREAM_PIECES);
        let stalled = tokio::spawn({
            let engine = engine.clone();
            async move { engine.generate(request("hello", 3_000), Some(tx)).await }
        });
        // Queued behind the stalled job: before API-CHAT-4 the engine waited
        // for ever on the full channel and this never came back.
        let next = within(
            "a job behind a stalled reader",
            engine.generate(request("hi", 4), None),
        )
        .await
        .unwrap();
        assert!(next.completion_tokens <= 4);
        let e = within("the stalled job's answer", stalled)
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(&e, Error::Inference(m) if m.contains("unread")),
            "{e}"
        );
        assert_eq!(engine.stats.counters().cancelled_stalled, 1);
        assert_eq!(
            rx.len(),
            STREAM_PIECES,
            "the channel was full, nothing more"
        );
    }

    /// API-CHAT-4: a client that goes away cancels its job at the next
    /// token, streamed (piece receiver dropped) or not (reply dropped).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_chat_4_a_gone_client_cancels_its_job() {
        let engine = InferenceHandle::start(config()).await.unwrap();
        // Streamed: read one piece (it runs), then hang up.
        let (tx, mut rx) = mpsc::channel(STREAM_PIECES);
        let job = tokio::spawn({
            let engine = engine.clone();
            async move { engine.generate(request("hello", 3_000), Some(tx)).await }
        });
        within("a first piece", rx.recv()).await.expect("a piece");
        drop(rx);
        let e = within("the cancelled job", job).await.unwrap().unwrap_err();
        assert!(
            matches!(&e, Error::Inference(m) if m.contains("went away")),
            "{e}"
        );
        assert_eq!(engine.stats.counters().cancelled_disconnected, 1);

        // Not streamed: the caller's future is dropped mid-generation.
        let (tx, mut rx) = mpsc::channel(STREAM_PIECES);
        let job = tokio::spawn({
            let engine = engine.clone();
            async move { engine.generate(request("hello", 3_000), Some(tx)).await }
        });
        within("a first piece", rx.recv()).await.expect("a piece");
        job.abort();
        // Keep reading so that only the dropped reply can stop it.
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        until("the job's cancellation", || {
            engine.stats.counters().cancelled_disconnected == 2
        })
        .await;
        within("the stream's end", drain).await.unwrap();
        let c = engine.stats.counters();
        assert_eq!((c.cancelled_stalled, c.cancelled_deadline), (0, 0));
    }

    /// API-CHAT-4: a job still running at its deadline stops there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_chat_4_a_passed_deadline_cancels_the_job() {
        let engine = InferenceHandle::start(InferenceConfig {
            timeout_ms: 300,
            ..config()
        })
        .await
        .unwrap();
        let (tx, mut rx) = mpsc::channel(STREAM_PIECES);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let e = within(
            "the answer",
            engine.generate(request("hello", 4_000), Some(tx)),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        // The engine, not only the caller, gave up: the stream ends.
        within("the stream's end", drain).await.unwrap();
        let c = engine.stats.counters();
        assert_eq!(c.cancelled_deadline + c.expired_in_queue, 1, "{c:?}");
    }

    /// API-CHAT-5: a panic in a job answers that job with an error, the
    /// engine is rebuilt and serves the next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_chat_5_a_panicking_job_is_answered_and_the_engine_rebuilt() {
        let engine = InferenceHandle::start(InferenceConfig {
            panic_on_prompt: Some("PANIC".into()),
            ..config()
        })
        .await
        .unwrap();
        let e = within(
            "the panicking job",
            engine.generate(request("say PANIC", 8), None),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, Error::Inference(m) if m.contains("panicked")),
            "{e}"
        );
        let r = within("the next job", engine.generate(request("hello", 8), None))
            .await
            .unwrap();
        assert!(r.completion_tokens <= 8);
        let c = engine.stats.counters();
        assert_eq!((c.panics, c.rebuilds, c.rebuild_failures), (1, 1, 0));
        assert_eq!(engine.stats.state(), EngineState::Ok);
    }

    /// API-CHAT-5: a rebuild that fails leaves the engine `failed`, and jobs
    /// are answered with an error at once instead of hanging.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_chat_5_a_failed_rebuild_reports_failed() {
        let dir = tempfile::tempdir().unwrap();
        let model = crate::model::write_default_blocks(dir.path()).unwrap();
        let engine = InferenceHandle::start(InferenceConfig {
            model_dir: Some(model.clone()),
            panic_on_prompt: Some("PANIC".into()),
            ..config()
        })
        .await
        .unwrap();
        // The model's manifest is broken: the rebuild after the panic fails
        // (its weight files stay: the running engine may still map them).
        std::fs::write(model.join("manifest.json"), b"not json").unwrap();
        let e = within(
            "the panicking job",
            engine.generate(request("PANIC", 8), None),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, Error::Inference(m) if m.contains("panicked")),
            "{e}"
        );
        until("the failed rebuild", || {
            engine.stats.state() == EngineState::Failed
        })
        .await;
        let e = within(
            "a job on a failed engine",
            engine.generate(request("hello", 8), None),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, Error::Inference(m) if m.contains("down")),
            "{e}"
        );
        let c = engine.stats.counters();
        assert_eq!((c.panics, c.rebuilds, c.rebuild_failures), (1, 0, 1));
    }

    /// RT-PIPE-9: concurrent sessions' decode steps queued on one stage run
    /// in batches (the metric counts them), and every session's outputs
    /// agree, within rounding, with the same steps on an engine that runs
    /// each step alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn rt_pipe_9_queued_decode_steps_run_as_batches() {
        use crate::pipeline::{Dtype, Kind, Step};
        let stage = |batch: usize| InferenceConfig {
            layers: Some([1, 2]),
            max_stage_batch: batch,
            // Each step waits, so that the others queue behind it.
            token_delay_ms: 5,
            ..config()
        };
        let batched = InferenceHandle::start(stage(16)).await.unwrap();
        let alone = InferenceHandle::start(stage(1)).await.unwrap();
        let hidden = |position: u32, seq: u32, salt: u32| Step {
            position,
            kind: Kind::Hidden,
            dtype: Dtype::F32,
            shape: [1, seq, 128],
            bytes: (0..seq * 128)
                .flat_map(|i| (((i * 7 + salt * 13) % 97) as f32 / 97.0 - 0.5).to_le_bytes())
                .collect(),
        };
        let run = |engine: InferenceHandle, session: u64, salt: u32| async move {
            let plan = Arc::new(crate::experts::StagePlan::default());
            let mut outs = Vec::new();
            let (first, _) = engine
                .stage(session, hidden(0, 3, salt), plan.clone())
                .await
                .unwrap();
            outs.push(first);
            for p in 3..9 {
                let (out, _) = engine
                    .stage(session, hidden(p, 1, salt + p), plan.clone())
                    .await
                    .unwrap();
                outs.push(out);
            }
            outs
        };
        let sessions: Vec<u64> = (1..=6).collect();
        let together = within(
            "six concurrent sessions",
            futures_util::future::join_all(
                sessions.iter().map(|&i| run(batched.clone(), i, i as u32)),
            ),
        )
        .await;
        let mut one_by_one = Vec::new();
        for &i in &sessions {
            one_by_one.push(within("one session", run(alone.clone(), 100 + i, i as u32)).await);
        }
        let batches = batched.stats.stage_batches.load(Ordering::Relaxed);
        assert!(batches > 0, "no decode steps were batched");
        assert_eq!(alone.stats.stage_batches.load(Ordering::Relaxed), 0);
        let f32s = |s: &Step| -> Vec<f32> {
            s.bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        for (a, b) in together.iter().zip(&one_by_one) {
            for (x, y) in a.iter().zip(b) {
                assert_eq!((x.kind, x.shape, x.position), (y.kind, y.shape, y.position));
                let d = f32s(x)
                    .iter()
                    .zip(f32s(y))
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(d <= 1e-4, "a batched step differs by {d}");
            }
        }
    }

    /// RT-PIPE-2, API-CHAT-5: a panic in a stage step is answered with an
    /// error, drops every session (their caches went with the engine:
    /// routers replay them), and the engine is rebuilt and serves new
    /// sessions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rt_pipe_2_a_panicking_stage_step_rebuilds_the_stage() {
        use crate::pipeline::{Dtype, Kind, Step};
        let engine = InferenceHandle::start(InferenceConfig {
            layers: Some([1, 2]),
            panic_on_stage_position: Some(3),
            ..config()
        })
        .await
        .unwrap();
        let hidden = |position: u32, seq: u32| Step {
            position,
            kind: Kind::Hidden,
            dtype: Dtype::F32,
            shape: [1, seq, 128],
            bytes: vec![0; (seq * 128 * 4) as usize],
        };
        let plan = Arc::new(crate::experts::StagePlan::default());
        let stage = |session, step| engine.stage(session, step, plan.clone());
        // Two sessions open; then one's step at position 3 panics.
        within("prefills", async {
            stage(1, hidden(0, 3)).await.unwrap();
            stage(2, hidden(0, 2)).await.unwrap();
        })
        .await;
        let err = within("the panicking step", stage(1, hidden(3, 1)))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        // The error is answered first, then the engine rebuilt.
        until("the engine to be rebuilt", || {
            engine.stats.counters().rebuilds == 1
        })
        .await;
        assert_eq!(engine.stats.counters().panics, 1);
        // Every session went with the engine.
        let gone = within("a lost session", stage(2, hidden(2, 1)))
            .await
            .unwrap_err();
        assert!(gone.to_string().contains("no session"), "{gone}");
        assert_eq!(engine.stats.stage_sessions.load(Ordering::Relaxed), 0);
        // The rebuilt engine serves a new session.
        let (out, _) = within("a new session", stage(3, hidden(0, 2)))
            .await
            .unwrap();
        assert_eq!(
            (out.kind, out.shape, out.position),
            (Kind::Hidden, [1, 2, 128], 2)
        );
        assert_eq!(engine.stats.state(), EngineState::Ok);
    }
}
