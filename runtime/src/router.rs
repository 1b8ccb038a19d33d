//! Routing requests to the nodes that hold the model (spec/inference.md
//! RT-STAGE-1..5): the first step of the inference network, in which a
//! route has one stage and that stage is a node holding every layer.
//!
//! - RT-STAGE-1: a node serves peers' `Generate` calls ([`StageServer`],
//!   the transport's `blyan.p2p.v1.Peer/Generate`, mutual TLS) from its
//!   engine: a JSON request (model id, [`ChatRequest`]), answered by a
//!   bounded stream of events: `p` ‖ text piece, then `r` ‖ JSON result or
//!   `e` ‖ JSON error. Dropping the stream cancels the job at its next token.
//! - RT-STAGE-2: the router ([`Router::generate`]) plans with the pure
//!   planner (RT-ROUTE-1/2) over the live heartbeats; a plan of one stage
//!   runs on that holder, a plan of several as a pipeline (RT-PIPE-3,
//!   `pipeline.rs`); no plan is served by the local engine.
//! - RT-STAGE-3: the local engine is a candidate (over the layers it
//!   holds) on an inference node (`[inference] advertise`), and on any
//!   other node serves only when no route over the live holders other than
//!   the failed ones exists: a validator serves from its own engine only
//!   as a fallback.
//! - RT-STAGE-4 (replay failover): when the chosen node fails (connection,
//!   engine error, busy, an answer stream that ends without a result), the
//!   router excludes it and runs the same request (same seed, same
//!   sampling) on the next choice, at most [`MAX_ATTEMPTS`] times in all.
//!   Text already sent to the client is not sent again: the new stream's
//!   text must begin with it (else the request fails as diverged), and only
//!   what follows is forwarded; under greedy decoding on the same model and
//!   dtype the client sees the uninterrupted answer.
//! - RT-STAGE-5: the answer's route names the node that served it (its
//!   share of the settlement is its work: layers × tokens).
//! - RT-STAGE-6 (spot checks of whole-model stages): a remote answer is
//!   checked iff RT-SPOT-1 draws it (the router's secret key, the request's
//!   id, stage 0, position 0, `spot_check_rate_ppm`); the checker and then
//!   the referee are drawn by RT-SPOT-2 among the live holders and this
//!   node (its own engine), never the stage; outputs are compared exactly
//!   (text and token counts: one stage is a whole generation, and the f32
//!   CPU engines agree token for token); a mismatch is settled by the
//!   referee's third computation (RT-SPOT-4) and the loser quarantined in
//!   this node's table (RT-QUAR-1; never this node itself). Checks run after
//!   the answer, off the client's path.

use crate::Error;
use crate::heartbeats::Heartbeats;
use crate::inference::{ChatRequest, ChatResult, InferenceHandle};
use crate::transport::{GENERATE_STREAM_BUFFER, GrpcTransport, StageSink, now_ms};
use blyan_route::route::{Candidate, LoadBook, ModelShape};
use blyan_state_machine::node::PeerId;
use blyan_state_machine::types::{Address, Hash32};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{Instrument, debug, info, warn};

/// RT-FAULT-1: fault records a router keeps (the newest).
pub const MAX_FAULT_RECORDS: usize = 256;

/// RT-STAGE-4: nodes tried for one request, the local engine included.
pub const MAX_ATTEMPTS: usize = 3;

/// RT-STAGE-1: the body of a `Generate` call.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StageRequest {
    /// The meta block id (`0x…`) of the model the router routed for.
    model: String,
    request: ChatRequest,
}

/// RT-STAGE-1: the `r` event.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StageResult {
    text: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish_reason: String,
    capped: bool,
    experts_used: Vec<String>,
    /// POL-SERVE-2: the head the stage ran on.
    #[serde(default)]
    head: String,
    /// API-CHAT-7: when the request asked for them.
    #[serde(default)]
    logprobs: Option<Vec<crate::inference::TokenLogprob>>,
}

/// RT-STAGE-1: the `e` event.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StageError {
    /// `busy`, `timeout`, `bad_request`, `payment` or `inference`.
    kind: String,
    message: String,
}

fn event(tag: u8, body: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(1 + body.len());
    v.push(tag);
    v.extend_from_slice(body);
    Bytes::from(v)
}

fn error_event(e: &Error) -> Bytes {
    let kind = match e {
        Error::Busy(_) => "busy",
        Error::Timeout(_) => "timeout",
        Error::BadRequest(_) => "bad_request",
        Error::PaymentRequired(_) => "payment",
        _ => "inference",
    };
    let body = StageError {
        kind: kind.into(),
        message: e.to_string(),
    };
    event(
        b'e',
        &serde_json::to_vec(&body).expect("a StageError serialises"),
    )
}

/// RT-STAGE-1: serves peers' `Generate` calls from this node's engine.
pub struct StageServer {
    pub engine: InferenceHandle,
    /// The meta block id of the model the engine serves, if registered.
    pub model: Option<Hash32>,
    /// Test-only fault injection ([`crate::inference::InferenceConfig::perturb_outputs`]).
    pub perturb: bool,
    /// RT-PIPE-6: who signs this node's stage commitments (`None`: none
    /// are sent).
    pub identity: Option<crate::pipeline::StageIdentity>,
}

/// RT-STAGE-6's test fault: what a lying stage sends instead of `text`
/// (applied to the first piece and to the result, so the stream stays
/// consistent with the result).
fn perturbed(text: String) -> String {
    format!("!{text}")
}

impl StageSink for StageServer {
    fn stage(
        &self,
        from: PeerId,
        requests: tonic::Streaming<Bytes>,
    ) -> mpsc::Receiver<Result<Bytes, Status>> {
        crate::pipeline::serve_stage(
            self.engine.clone(),
            self.model,
            self.perturb,
            self.identity.clone(),
            from,
            requests,
        )
    }

    fn expert(
        &self,
        from: PeerId,
        request: Bytes,
    ) -> tokio::sync::oneshot::Receiver<Result<Bytes, Status>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let engine = self.engine.clone();
        let model = self.model;
        tokio::spawn(async move {
            let answer = async {
                let call = crate::experts::ExpertCall::decode(&request)?;
                #[cfg(feature = "inference")]
                let rows = engine.serve_experts(model, call).await?;
                #[cfg(not(feature = "inference"))]
                let rows: crate::experts::ExpertRows = {
                    let _ = (engine, model, call);
                    return Err(Error::Inference("built without inference".into()));
                };
                Ok::<_, Error>(rows.encode())
            }
            .await
            .map_err(|e| {
                debug!(router = %from, error = %e, "expert call refused");
                match e {
                    Error::Busy(m) => Status::resource_exhausted(m),
                    Error::BadRequest(m) => Status::invalid_argument(m),
                    Error::Timeout(m) => Status::deadline_exceeded(m),
                    other => Status::internal(other.to_string()),
                }
            });
            let _ = tx.send(answer);
        });
        rx
    }

    fn generate(&self, from: PeerId, request: Bytes) -> mpsc::Receiver<Result<Bytes, Status>> {
        let (tx, rx) = mpsc::channel(GENERATE_STREAM_BUFFER);
        let engine = self.engine.clone();
        let model = self.model;
        let perturb = self.perturb;
        tokio::spawn(
            async move {
                let parsed: Result<StageRequest, _> = serde_json::from_slice(&request);
                let req = match parsed {
                    Ok(r) if model.is_some_and(|m| r.model == crate::api::hex0x(&m)) => r.request,
                    Ok(r) => {
                        let e = Error::BadRequest(format!(
                            "this node does not serve model {}",
                            r.model
                        ));
                        let _ = tx.send(Ok(error_event(&e))).await;
                        return;
                    }
                    Err(e) => {
                        let e = Error::BadRequest(format!("Generate request: {e}"));
                        let _ = tx.send(Ok(error_event(&e))).await;
                        return;
                    }
                };
                debug!(router = %from, max_tokens = req.max_tokens, "serving a routed request");
                let (pieces_tx, mut pieces_rx) =
                    mpsc::channel::<String>(crate::inference::STREAM_PIECES);
                let generation = engine.generate(req, Some(pieces_tx));
                tokio::pin!(generation);
                let mut first = perturb;
                let result = loop {
                    tokio::select! {
                        Some(piece) = pieces_rx.recv() => {
                            let piece = if std::mem::take(&mut first) { perturbed(piece) } else { piece };
                            if tx.send(Ok(event(b'p', piece.as_bytes()))).await.is_err() {
                                // The router went away: the engine cancels
                                // the job at its next token (API-CHAT-4).
                                pieces_rx.close();
                            }
                        }
                        r = &mut generation => break r,
                    }
                };
                while let Ok(piece) = pieces_rx.try_recv() {
                    let piece = if std::mem::take(&mut first) { perturbed(piece) } else { piece };
                    if tx.send(Ok(event(b'p', piece.as_bytes()))).await.is_err() {
                        return;
                    }
                }
                let last = match result {
                    Ok(r) => event(
                        b'r',
                        &serde_json::to_vec(&StageResult {
                            text: if perturb { perturbed(r.text) } else { r.text },
                            prompt_tokens: r.prompt_tokens,
                            completion_tokens: r.completion_tokens,
                            finish_reason: r.finish_reason.to_string(),
                            capped: r.capped,
                            experts_used: r.experts_used,
                            head: r.head,
                            logprobs: r.logprobs,
                        })
                        .expect("a StageResult serialises"),
                    ),
                    Err(e) => error_event(&e),
                };
                let _ = tx.send(Ok(last)).await;
            }
            .in_current_span(),
        );
        rx
    }
}

/// How a routed request ended.
pub struct Routed {
    pub result: Result<ChatResult, Error>,
    /// The node whose engine produced the result (this node if local; the
    /// last stage of a pipeline).
    pub served_by: Address,
    /// Nodes that failed before it, in order (RT-STAGE-4, RT-PIPE-4).
    pub failed: Vec<Address>,
    /// Time of the attempt that produced the result, ms (RT-STAGE-7).
    pub stage_ms: u64,
    /// RT-PIPE-3: the stages of the pipeline that produced the result, in
    /// order; empty when one engine produced it (`served_by`).
    pub stages: Vec<RoutedStage>,
}

/// RT-PIPE-3: what one pipeline attempt produced.
struct PipelineRun {
    result: ChatResult,
    stages: Vec<RoutedStage>,
    /// The id its stages' commitments name (RT-PIPE-6).
    request_id: Hash32,
    /// Every token id fed through the route, in order (the prompt, then
    /// each generated token but the last): the token prefix of any
    /// position it computed (RT-FAULT-1).
    fed: Vec<i64>,
    /// RT-PIPE-7: each hop's input steps, kept when the request is drawn
    /// for a spot check.
    inputs: Option<Vec<Vec<crate::pipeline::Step>>>,
}

/// RT-PIPE-3: one stage of a pipeline that served a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutedStage {
    pub node: Address,
    pub first_layer: u32,
    pub last_layer: u32,
    /// Time spent in this stage's steps (its compute and round trips), ms.
    pub ms: u64,
    /// RT-PIPE-6: the stage's signed commitments, encoded (checked by the
    /// router; a stage on the router's own node is signed by the router).
    pub commitments: Vec<Vec<u8>>,
    /// RT-PIPE-8: where the plan placed each `(layer, expert)` of an MoE
    /// stage (empty for a dense model).
    pub experts: Vec<blyan_route::route::ExpertAssignment>,
    /// RT-PIPE-8: the `(layer, expert)` pairs the stage reported using.
    pub experts_used: Vec<(u32, u16)>,
}

/// Why one attempt did not produce the answer.
enum Failure {
    /// A pipeline stage on this node failed: replay without it (RT-PIPE-4).
    Stage(Address, String),
    /// The request itself cannot be served (bad request, the client went
    /// away, the replay diverged): no other node will do better.
    Request(Error),
}

/// Where to run one attempt.
enum Choice {
    Local,
    /// RT-PIPE-3: stages on other nodes (or experts elsewhere), each a
    /// layer range.
    Pipeline(blyan_route::route::Plan),
}

/// RT-STAGE-2..5: the node's router.
pub struct Router {
    me: Address,
    /// RT-PIPE-6: the chain whose domain stage commitments are signed in.
    chain_id: String,
    /// RT-FAULT-1: the node's key, which signs fault records.
    key: k256::ecdsa::SigningKey,
    /// RT-FAULT-1: the newest fault records this router signed, encoded.
    faults: Mutex<std::collections::VecDeque<Vec<u8>>>,
    transport: Arc<GrpcTransport>,
    heartbeats: Arc<Heartbeats>,
    /// RT-STAGE-3: the local engine is always a candidate.
    advertise: bool,
    /// RT-ROUTE-5: requests in flight per node.
    load: Mutex<LoadBook>,
    routed_local: AtomicU64,
    routed_remote: AtomicU64,
    failovers: AtomicU64,
    /// RT-SPOT-1: this router's secret (fresh per start, never sent).
    spot_key: [u8; 32],
    spot_rate_ppm: u32,
    /// Spot checks by outcome: agree, stage fault, checker fault, undecided.
    spot_checks: [AtomicU64; 4],
    /// RT-BEACON-4: beacons by outcome: SPOT_OUTCOMES, then `unchecked`
    /// (served by this node's engine, or no route).
    beacons: [AtomicU64; 5],
    /// Numbers the requests whose ids key the spot-check draw.
    seq: AtomicU64,
    /// RT-STAGE-7: time of remote stages that produced an answer.
    pub remote_stage_ms: crate::metrics::MsHistogram,
    /// RT-PIPE-3: time of each hop of the pipelines that produced an
    /// answer, by hop index (the last one also counts later hops).
    pub pipeline_stage_ms: [crate::metrics::MsHistogram; PIPELINE_STAGE_SERIES],
    /// RT-PIPE-3: pipelines that produced an answer.
    pipelines: AtomicU64,
    /// RT-PIPE-3: tensor bytes sent to and received from remote stages.
    pipeline_bytes: Arc<AtomicU64>,
}

/// RT-STAGE-6 outcomes, in `/metrics` order.
pub const SPOT_OUTCOMES: [&str; 4] = ["agree", "stage_fault", "checker_fault", "undecided"];

/// RT-PIPE-3: hop indices with their own latency series in `/metrics`.
pub const PIPELINE_STAGE_SERIES: usize = 8;

/// RT-BEACON-4 outcomes, in `/metrics` order: a check's, or `unchecked`.
pub const BEACON_OUTCOMES: [&str; 5] = [
    "agree",
    "stage_fault",
    "checker_fault",
    "undecided",
    "unchecked",
];

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (local, remote, failovers) = self.counts();
        f.debug_struct("Router")
            .field("me", &self.me)
            .field("advertise", &self.advertise)
            .field("routed_local", &local)
            .field("routed_remote", &remote)
            .field("failovers", &failovers)
            .finish_non_exhaustive()
    }
}

/// Two handles are equal when they are the same router (for `ApiConfig`).
impl PartialEq for Router {
    fn eq(&self, other: &Router) -> bool {
        std::ptr::eq(self, other)
    }
}

/// Text already sent to the client, and the check a replay must pass
/// (RT-STAGE-4).
#[derive(Debug, Default)]
struct Sent {
    text: String,
}

impl Sent {
    /// The part of `got` (everything an attempt produced so far) the client
    /// has not seen, or an error if `got` contradicts what it has seen.
    fn fresh<'a>(&self, got: &'a str, before: usize) -> Result<&'a str, Error> {
        let seen = &self.text;
        if got.len() <= seen.len() {
            if !seen.starts_with(got) {
                return Err(Error::Inference(
                    "the replayed answer diverged from the text already sent".into(),
                ));
            }
            return Ok("");
        }
        if !got.starts_with(seen.as_str()) {
            return Err(Error::Inference(
                "the replayed answer diverged from the text already sent".into(),
            ));
        }
        Ok(&got[seen.len().max(before)..])
    }
}

impl Router {
    pub fn new(
        me: Address,
        chain_id: String,
        key: k256::ecdsa::SigningKey,
        transport: Arc<GrpcTransport>,
        heartbeats: Arc<Heartbeats>,
        advertise: bool,
        spot_rate_ppm: u32,
    ) -> Result<Router, Error> {
        let spot_key = crate::keystore::generate_key()?.to_bytes().into();
        Ok(Router {
            chain_id,
            key,
            faults: Mutex::new(std::collections::VecDeque::new()),
            spot_key,
            spot_rate_ppm,
            spot_checks: Default::default(),
            beacons: Default::default(),
            seq: AtomicU64::new(0),
            remote_stage_ms: crate::metrics::MsHistogram::new(&crate::metrics::ENGINE_BUCKETS_MS),
            pipeline_stage_ms: std::array::from_fn(|_| {
                crate::metrics::MsHistogram::new(&crate::metrics::ENGINE_BUCKETS_MS)
            }),
            me,
            transport,
            heartbeats,
            advertise,
            load: Mutex::new(LoadBook::default()),
            routed_local: AtomicU64::new(0),
            routed_remote: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            pipelines: AtomicU64::new(0),
            pipeline_bytes: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Spot checks by outcome ([`SPOT_OUTCOMES`] order).
    pub fn spot_counts(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.spot_checks[i].load(Ordering::Relaxed))
    }

    /// RT-BEACON-4: beacons by outcome ([`BEACON_OUTCOMES`]).
    pub fn beacon_counts(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.beacons[i].load(Ordering::Relaxed))
    }

    /// RT-BEACON-*: makes up a request every `interval_ms` or so (RT-BEACON-3)
    /// from `text` (RT-BEACON-2), routes it as a client's would be and
    /// checks whoever served it (RT-BEACON-4), until `shutdown`.
    pub async fn run_beacons(
        self: Arc<Self>,
        engine: InferenceHandle,
        model: Hash32,
        text: &'static str,
        interval_ms: u64,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        if interval_ms == 0 {
            return;
        }
        for n in 0u64.. {
            let wait = Duration::from_millis(blyan_route::beacon::delay_ms(
                &self.spot_key,
                n,
                interval_ms,
            ));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let Some(b) = blyan_route::beacon::beacon(&self.spot_key, n, text) else {
                return;
            };
            let req = ChatRequest {
                prompt: b.prompt,
                max_tokens: b.max_tokens.min(engine.config.max_tokens_limit),
                temperature: f64::from(b.temperature),
                top_p: 1.0,
                seed: b.seed,
                stop: Vec::new(),
                max_total_tokens: None,
                top_logprobs: None,
            };
            let outcome = self.beacon(&engine, model, &req, b.target).await;
            self.beacons[outcome].fetch_add(1, Ordering::Relaxed);
            if outcome < 4 {
                self.spot_checks[outcome].fetch_add(1, Ordering::Relaxed);
            }
            debug!(
                n,
                outcome = BEACON_OUTCOMES[outcome],
                "beacon checked (RT-BEACON-4)"
            );
        }
    }

    /// RT-BEACON-4: one beacon, routed and checked; its outcome's index in
    /// [`BEACON_OUTCOMES`].
    async fn beacon(
        self: &Arc<Self>,
        engine: &InferenceHandle,
        model: Hash32,
        req: &ChatRequest,
        target: u64,
    ) -> usize {
        // The target's range(s) are left to it alone.
        let live = self.heartbeats.live_holdings(&model, now_ms());
        let mut others = BTreeSet::new();
        if !live.is_empty() {
            let (node, ranges) = &live[(target % live.len() as u64) as usize];
            others = live
                .iter()
                .filter(|(a, r)| a != node && r.iter().any(|x| ranges.contains(x)))
                .map(|(a, _)| *a)
                .collect();
        }
        let choice = match self.choose(engine, model, &others) {
            Choice::Local if !others.is_empty() => self.choose(engine, model, &BTreeSet::new()),
            c => c,
        };
        match choice {
            Choice::Pipeline(plan) => {
                self.load.lock().expect("load book lock").assign(&plan);
                let r = self
                    .pipeline(engine, &plan, req, &None, &mut Sent::default(), true)
                    .await;
                self.load.lock().expect("load book lock").release(&plan);
                match r {
                    Ok(PipelineRun {
                        stages,
                        request_id,
                        fed,
                        inputs: Some(inputs),
                        ..
                    }) => {
                        self.spot_check_pipeline(engine, model, &stages, request_id, &fed, &inputs)
                            .await
                    }
                    _ => 4,
                }
            }
            Choice::Local => 4,
        }
    }

    /// Requests served here and by other nodes, and failovers (`/metrics`).
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.routed_local.load(Ordering::Relaxed),
            self.routed_remote.load(Ordering::Relaxed),
            self.failovers.load(Ordering::Relaxed),
        )
    }

    /// RT-STAGE-7: the stages (node, first and last layer) the next
    /// request for `model` would use now (for a stream's `x-blyan-route`
    /// header, sent before the answer).
    pub fn planned(
        &self,
        engine: &InferenceHandle,
        model: Option<Hash32>,
    ) -> Vec<(Address, u32, u32)> {
        let last = u32::try_from(engine.model.layers.saturating_sub(1)).unwrap_or(u32::MAX);
        match model.map(|m| self.choose(engine, m, &BTreeSet::new())) {
            Some(Choice::Pipeline(plan)) => plan
                .stages
                .iter()
                .map(|s| (s.node, s.first_layer, s.last_layer))
                .collect(),
            _ => vec![(self.me, 0, last)],
        }
    }

    /// RT-PIPE-3: pipelines served, and the bytes of tensors their remote
    /// stages sent and received (`/metrics`).
    pub fn pipeline_counts(&self) -> (u64, u64) {
        (
            self.pipelines.load(Ordering::Relaxed),
            self.pipeline_bytes.load(Ordering::Relaxed),
        )
    }

    /// RT-STAGE-2/3, RT-PIPE-3: where the next attempt runs. The local
    /// engine is a candidate (over the layers it holds) on a node that
    /// advertises; on any other node it serves only when no route over the
    /// live holders exists.
    fn choose(
        &self,
        engine: &InferenceHandle,
        model: Hash32,
        excluded: &BTreeSet<Address>,
    ) -> Choice {
        let now = now_ms();
        let layers = u32::try_from(engine.model.layers.max(1)).unwrap_or(u32::MAX);
        let (first, last) = (
            u32::try_from(engine.model.first_layer).unwrap_or(u32::MAX),
            u32::try_from(engine.model.last_layer).unwrap_or(u32::MAX),
        );
        let ops = &engine.stats.ops;
        let local = (self.advertise && !excluded.contains(&self.me)).then(|| Candidate {
            node: self.me,
            first_layer: first,
            last_layer: last,
            dense: true,
            // RT-PIPE-8: the experts this engine holds (MoE only).
            experts: engine.model.experts.clone(),
            rtt_us: 0,
            compute_per_layer_us: ops
                .compute_per_token_us()
                .div_ceil(u64::from(last.saturating_sub(first) + 1)),
            queue_depth: u32::try_from(engine.queued() + usize::from(ops.is_running()))
                .unwrap_or(u32::MAX),
        });
        let rtt: BTreeMap<Address, u64> = self
            .transport
            .peer_stats()
            .lock()
            .expect("peer stats lock")
            .iter()
            .filter_map(|(p, s)| s.rtt_us.map(|r| (*p, r)))
            .collect();
        let shape = ModelShape {
            model,
            layers,
            experts_per_layer: u16::try_from(engine.model.num_experts).unwrap_or(u16::MAX),
        };
        let load = self.load.lock().expect("load book lock").clone();
        match self
            .heartbeats
            .plan(shape, local, excluded, &load, &rtt, now)
        {
            // RT-STAGE-2, RT-PIPE-3: anything but this node's own engine
            // alone runs as a pipeline, a whole-model holder as a pipeline
            // of one stage (so every remote hop signs commitments and can
            // be checked hop by hop, RT-PIPE-7); RT-PIPE-8: experts
            // elsewhere make even this node's stage a pipeline.
            Ok(plan)
                if plan.stages.len() > 1
                    || plan.stages[0].node != self.me
                    || plan.stages[0].experts.iter().any(|e| e.node != self.me) =>
            {
                Choice::Pipeline(plan)
            }
            Ok(_) => Choice::Local,
            Err(e) => {
                debug!(error = %e, "no route; serving locally");
                Choice::Local
            }
        }
    }

    /// RT-STAGE-2..5: serves `req` for the model of meta block `model` on
    /// the best node, failing over as RT-STAGE-4 says. `pieces` receives
    /// streamed text as [`InferenceHandle::generate`]'s does.
    pub async fn generate(
        self: &Arc<Self>,
        engine: &InferenceHandle,
        model: Option<Hash32>,
        req: ChatRequest,
        pieces: Option<mpsc::Sender<String>>,
    ) -> Routed {
        let mut failed = Vec::new();
        let Some(model) = model else {
            self.routed_local.fetch_add(1, Ordering::Relaxed);
            let t = std::time::Instant::now();
            let result = engine.generate(req, pieces).await;
            return Routed {
                result,
                served_by: self.me,
                failed,
                stage_ms: t.elapsed().as_millis() as u64,
                stages: Vec::new(),
            };
        };
        let mut excluded = BTreeSet::new();
        let mut sent = Sent::default();
        let mut busy = 0usize;
        for attempt in 0..MAX_ATTEMPTS {
            // The last attempt is the local engine when it holds the whole
            // model; a stage-only node keeps routing.
            let last = attempt + 1 == MAX_ATTEMPTS && engine.model.whole();
            let choice = if last {
                Choice::Local
            } else {
                self.choose(engine, model, &excluded)
            };
            if matches!(choice, Choice::Local) && !engine.model.whole() {
                // A stage-only node cannot answer alone: no route is left.
                break;
            }
            let attempt_started = std::time::Instant::now();
            let mut stages = Vec::new();
            let mut checked = None;
            let (node, outcome) = match choice {
                Choice::Local => (self.me, self.local(engine, &req, &pieces, &mut sent).await),
                Choice::Pipeline(plan) => {
                    let last_node = plan.stages.last().expect("a plan has stages").node;
                    self.load.lock().expect("load book lock").assign(&plan);
                    let r = self
                        .pipeline(engine, &plan, &req, &pieces, &mut sent, false)
                        .await;
                    self.load.lock().expect("load book lock").release(&plan);
                    let r = r.map(|run| {
                        stages = run.stages;
                        checked = Some((run.request_id, run.fed, run.inputs));
                        run.result
                    });
                    (last_node, r)
                }
            };
            match outcome {
                Ok(result) => {
                    let counter = if node == self.me {
                        &self.routed_local
                    } else {
                        &self.routed_remote
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let elapsed = attempt_started.elapsed();
                    if !stages.is_empty() {
                        self.pipelines.fetch_add(1, Ordering::Relaxed);
                        // RT-STAGE-7: a whole-model holder's time.
                        if stages.len() == 1 && node != self.me {
                            self.remote_stage_ms.observe(elapsed);
                        }
                        for (i, s) in stages.iter().enumerate() {
                            self.pipeline_stage_ms[i.min(PIPELINE_STAGE_SERIES - 1)]
                                .observe(Duration::from_millis(s.ms));
                        }
                        if let Some((request_id, fed, Some(inputs))) = checked {
                            self.maybe_spot_check_pipeline(
                                engine,
                                model,
                                &stages,
                                request_id,
                                (fed, inputs),
                            );
                        }
                    }
                    return Routed {
                        result: Ok(result),
                        served_by: node,
                        failed,
                        stage_ms: elapsed.as_millis() as u64,
                        stages,
                    };
                }
                Err(Failure::Request(e)) => {
                    return Routed {
                        result: Err(e),
                        served_by: node,
                        failed,
                        stage_ms: attempt_started.elapsed().as_millis() as u64,
                        stages,
                    };
                }
                Err(Failure::Stage(bad, why)) => {
                    self.failovers.fetch_add(1, Ordering::Relaxed);
                    busy += usize::from(why.starts_with("busy"));
                    warn!(node = %bad, error = %why, attempt, "pipeline stage failed; replaying without it (RT-PIPE-4)");
                    excluded.insert(bad);
                    failed.push(bad);
                }
            }
        }
        let failed_list = failed
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Routed {
            // RT-PIPE-2: full session tables and queues everywhere: 503.
            result: Err(if failed.is_empty() {
                Error::Inference(
                    "no route over the live holders covers the model, and this node holds only part of it"
                        .into(),
                )
            } else if busy == failed.len() {
                Error::Busy(format!(
                    "every stage tried is full ({failed_list}); retry later"
                ))
            } else {
                Error::Inference(format!(
                    "no route served the request in {MAX_ATTEMPTS} attempts (failed: {failed_list})"
                ))
            }),
            served_by: self.me,
            failed,
            stage_ms: 0,
            stages: Vec::new(),
        }
    }

    /// RT-PIPE-7: draws whether a pipeline's answer is checked (RT-SPOT-1)
    /// and, if so, checks it in the background.
    fn maybe_spot_check_pipeline(
        self: &Arc<Self>,
        engine: &InferenceHandle,
        model: Hash32,
        used: &[RoutedStage],
        request_id: Hash32,
        (fed, inputs): (Vec<i64>, Vec<Vec<crate::pipeline::Step>>),
    ) {
        if !blyan_route::spot::should_check(&self.spot_key, &request_id, 0, 0, self.spot_rate_ppm) {
            return;
        }
        let (router, engine, used) = (self.clone(), engine.clone(), used.to_vec());
        tokio::spawn(
            async move {
                let outcome = router
                    .spot_check_pipeline(&engine, model, &used, request_id, &fed, &inputs)
                    .await;
                router.spot_checks[outcome].fetch_add(1, Ordering::Relaxed);
            }
            .in_current_span(),
        );
    }

    /// RT-PIPE-7: the pipeline check, hop by hop. Each remote hop of the
    /// checked route is recomputed from its own recorded inputs (the same
    /// steps, the same request id) by another live holder of exactly its
    /// layers (this node included, if its engine holds them; it then signs
    /// its own commitments), drawn with this router's secret (RT-SPOT-2)
    /// so that no stage knows its checker; its commitments are compared
    /// with the hop's (RT-COMMIT-3). At the first chunk that disagrees, a
    /// third holder (avoiding both) recomputes as referee and RT-SPOT-4
    /// settles it on that chunk: the loser is quarantined (never this
    /// node) and a signed fault record (RT-FAULT-1) kept. A hop nobody
    /// else holds, a hop on this node and an MoE hop (its experts are
    /// placed per request) are not checked. Returns the outcome's index in
    /// [`SPOT_OUTCOMES`]: a conviction, else `agree` if some hop was
    /// compared, else `undecided`.
    async fn spot_check_pipeline(
        &self,
        engine: &InferenceHandle,
        model: Hash32,
        used: &[RoutedStage],
        request_id: Hash32,
        fed: &[i64],
        inputs: &[Vec<crate::pipeline::Step>],
    ) -> usize {
        use blyan_route::commit::{Tolerance, compare};
        use blyan_route::spot::{Settlement, settle};
        let decode = |list: &[Vec<u8>]| -> Option<Vec<blyan_route::commit::SignedCommitment>> {
            list.iter()
                .map(|c| blyan_route::commit::SignedCommitment::decode(c).ok())
                .collect()
        };
        let tol = Tolerance::default();
        let mut compared = false;
        for (s, steps) in used.iter().zip(inputs) {
            if s.node == self.me || !s.experts.is_empty() || steps.is_empty() {
                continue;
            }
            let Some(sc) = decode(&s.commitments).filter(|l| !l.is_empty()) else {
                continue;
            };
            let range = (s.first_layer, s.last_layer);
            let holders = self.heartbeats.range_holder_list(&model, range, now_ms());
            // RT-SPOT-2 (position 0: the hop as a whole); this node checks
            // too if its own engine holds exactly these layers.
            let mut holders = holders;
            if (engine.model.first_layer, engine.model.last_layer)
                == (s.first_layer as usize, s.last_layer as usize)
            {
                holders.push(self.me);
            }
            let pick = |role, exclude: &[Address]| {
                blyan_route::spot::choose_peer(
                    &self.spot_key,
                    &request_id,
                    0,
                    role,
                    &holders,
                    exclude,
                )
            };
            let Some(checker) = pick(blyan_route::spot::Role::Checker, &[s.node]) else {
                continue;
            };
            let Some(cc) = self
                .replay_hop(engine, model, s, checker, request_id, steps)
                .await
            else {
                continue;
            };
            compared = true;
            // The first chunk that disagrees (or is missing on one side).
            let Some(j) = (0..sc.len().max(cc.len())).find(|&j| match (sc.get(j), cc.get(j)) {
                (Some(x), Some(y)) => {
                    !compare(&x.commitment.chunk, &y.commitment.chunk, tol).matches
                }
                _ => true,
            }) else {
                continue;
            };
            let (Some(stage_c), Some(checker_c)) = (sc.get(j), cc.get(j)) else {
                warn!(stage = %s.node, %checker, "pipeline spot check: commitment counts differ: undecided (RT-PIPE-7)");
                return 3;
            };
            if stage_c.commitment.head_version != checker_c.commitment.head_version {
                // Different heads legitimately compute different states.
                debug!(stage = %s.node, %checker, "pipeline spot check across two heads: undecided (RT-PIPE-7)");
                return 3;
            }
            let referee = match pick(blyan_route::spot::Role::Referee, &[s.node, checker]) {
                Some(r) => self
                    .replay_hop(engine, model, s, r, request_id, steps)
                    .await
                    .and_then(|list| list.get(j).cloned())
                    .map(|c| (r, c)),
                None => None,
            };
            let Some(referee) = referee else {
                warn!(stage = %s.node, %checker, "pipeline spot check mismatch and no referee: undecided (RT-PIPE-7)");
                return 3;
            };
            if referee.1.commitment.head_version != stage_c.commitment.head_version {
                return 3;
            }
            let verdict = settle(
                &stage_c.commitment.chunk,
                &checker_c.commitment.chunk,
                &referee.1.commitment.chunk,
                tol,
            );
            let now = now_ms();
            let loser = match verdict {
                Settlement::StageFault => Some((s.node, 1)),
                Settlement::CheckerFault => Some((checker, 2)),
                Settlement::Agree | Settlement::Undecided => None,
            };
            let position = stage_c.commitment.chunk.first_token;
            let end = position + u64::from(stage_c.commitment.chunk.tokens);
            let record = blyan_route::fault::FaultRecord {
                verdict,
                request_id,
                position,
                model,
                head_version: stage_c.commitment.head_version,
                first_layer: s.first_layer,
                last_layer: s.last_layer,
                input: blyan_route::fault::FaultInput::TokenPrefix {
                    tokens: fed
                        .iter()
                        .take(usize::try_from(end).unwrap_or(usize::MAX))
                        .map(|&t| u32::try_from(t).unwrap_or(u32::MAX))
                        .collect(),
                },
                stage: stage_c.clone(),
                checker: checker_c.clone(),
                referee: Some(referee.1.clone()),
                reported_ms: now,
            };
            self.keep_fault(record);
            return match loser {
                Some((node, outcome)) => {
                    if node != self.me {
                        let until = self.heartbeats.quarantine(node, now);
                        warn!(%node, stage = %s.node, %checker, referee = %referee.0, until_ms = until, position, layers = ?range, "pipeline hop convicted by a referee; quarantined (RT-PIPE-7)");
                    }
                    outcome
                }
                None => 3,
            };
        }
        if compared { 0 } else { 3 }
    }

    /// RT-FAULT-1: signs `record` as this node and keeps it (the newest
    /// [`MAX_FAULT_RECORDS`]); a record that does not verify is a bug and
    /// is only logged.
    fn keep_fault(&self, record: blyan_route::fault::FaultRecord) {
        let signature =
            blyan_state_machine::crypto::sign(&self.key, &record.signing_bytes(&self.chain_id));
        let signed = blyan_route::fault::SignedFaultRecord {
            record,
            reporter_key: blyan_state_machine::tx::public_key_of(&self.key),
            signature,
        };
        if let Err(e) = signed.verify(&self.chain_id, blyan_route::commit::Tolerance::default()) {
            warn!(error = %e, "a fault record that does not verify was not kept");
            return;
        }
        let mut faults = self.faults.lock().expect("faults lock");
        if faults.len() == MAX_FAULT_RECORDS {
            faults.pop_front();
        }
        faults.push_back(signed.encode());
    }

    /// RT-FAULT-1: the fault records this router signed, oldest first.
    pub fn fault_records(&self) -> Vec<Vec<u8>> {
        self.faults
            .lock()
            .expect("faults lock")
            .iter()
            .cloned()
            .collect()
    }

    /// RT-PIPE-6: who signs this node's commitments to the hops it runs
    /// itself (as a router, or as a checker of another's hop).
    fn identity(&self) -> crate::pipeline::StageIdentity {
        crate::pipeline::StageIdentity {
            key: self.key.clone(),
            chain_id: self.chain_id.clone(),
        }
    }

    /// A fresh request id (RT-SPOT-1, RT-PIPE-6).
    fn next_request_id(&self) -> Hash32 {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        blyan_state_machine::crypto::sha3_256_parts(&[
            b"blyan/route-req/1",
            &self.me.0,
            &n.to_be_bytes(),
        ])
    }

    /// RT-PIPE-7: hop `s` recomputed on `node` from its recorded input
    /// `steps`, as request `request_id` (so the commitments name the same
    /// request); `node`'s checked commitments, or `None` if it failed.
    async fn replay_hop(
        &self,
        engine: &InferenceHandle,
        model: Hash32,
        s: &RoutedStage,
        node: Address,
        request_id: Hash32,
        steps: &[crate::pipeline::Step],
    ) -> Option<Vec<blyan_route::commit::SignedCommitment>> {
        let plan = blyan_route::route::Plan {
            model,
            stages: vec![blyan_route::route::Stage {
                node,
                first_layer: s.first_layer,
                last_layer: s.last_layer,
                experts: Vec::new(),
                estimated_us: 0,
            }],
            estimated_us: 0,
        };
        let deadline = std::time::Instant::now() + Duration::from_millis(engine.config.timeout_ms);
        let replay = async {
            let mut session = crate::pipeline::RouteSession::open(
                &self.transport,
                self.me,
                engine,
                &plan,
                request_id,
                self.pipeline_bytes.clone(),
                Some(&self.identity()),
            )
            .await
            .map_err(|(_, e)| e)?;
            for step in steps {
                session
                    .replay_step(step.clone(), deadline)
                    .await
                    .map_err(|(_, e)| e)?;
            }
            let mut all = session
                .finish(&self.chain_id, deadline)
                .await
                .map_err(|(_, e)| e)?;
            all.pop()
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    blyan_route::commit::SignedCommitment::decode(c).map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, String>>()
        };
        match replay.await {
            Ok(list) => Some(list),
            Err(e) => {
                debug!(%node, error = %e, "a spot-check replay failed (RT-PIPE-7)");
                None
            }
        }
    }

    /// One attempt on the local engine, forwarding only text the client has
    /// not seen. Its errors are the request's answer (no failover from the
    /// local engine: it is chosen last, or when it is the best).
    async fn local(
        &self,
        engine: &InferenceHandle,
        req: &ChatRequest,
        pieces: &Option<mpsc::Sender<String>>,
        sent: &mut Sent,
    ) -> Result<ChatResult, Failure> {
        let Some(client) = pieces else {
            return engine
                .generate(req.clone(), None)
                .await
                .map_err(Failure::Request);
        };
        if sent.text.is_empty() {
            let r = engine.generate(req.clone(), Some(client.clone())).await;
            return r.map_err(Failure::Request);
        }
        // A replay: the engine's pieces pass through the prefix check.
        let (tx, mut rx) = mpsc::channel::<String>(crate::inference::STREAM_PIECES);
        let generation = engine.generate(req.clone(), Some(tx));
        tokio::pin!(generation);
        let mut got = String::new();
        let before = sent.text.len();
        let result = loop {
            tokio::select! {
                Some(p) = rx.recv() => {
                    got.push_str(&p);
                    forward(sent, &got, before, client).await?;
                }
                r = &mut generation => break r,
            }
        };
        while let Ok(p) = rx.try_recv() {
            got.push_str(&p);
            forward(sent, &got, before, client).await?;
        }
        result.map_err(Failure::Request)
    }
}

impl Router {
    /// RT-PIPE-3/4: one attempt through the stages of `plan`: the router
    /// runs the single-process generation loop on a blocking thread, each
    /// forward pass sent through the stages in order; a stage's failure
    /// names it ([`Failure::Stage`]). Dropping this future (the client went
    /// away) stops the loop at its next token and ends every stage's call.
    #[cfg(feature = "inference")]
    async fn pipeline(
        &self,
        engine: &InferenceHandle,
        plan: &blyan_route::route::Plan,
        req: &ChatRequest,
        pieces: &Option<mpsc::Sender<String>>,
        sent: &mut Sent,
        always_check: bool,
    ) -> Result<PipelineRun, Failure> {
        use crate::inference::Cancel;
        use crate::pipeline::RouteSession;
        let deadline = std::time::Instant::now() + Duration::from_millis(engine.config.timeout_ms);
        let request_id = self.next_request_id();
        let mut session = RouteSession::open(
            &self.transport,
            self.me,
            engine,
            plan,
            request_id,
            self.pipeline_bytes.clone(),
            Some(&self.identity()),
        )
        .await
        .map_err(|(n, why)| Failure::Stage(n, why))?;
        // RT-PIPE-7: a request drawn for a spot check keeps its hops'
        // inputs, so that each hop can be recomputed from them.
        if always_check
            || blyan_route::spot::should_check(
                &self.spot_key,
                &request_id,
                0,
                0,
                self.spot_rate_ppm,
            )
        {
            session.record_inputs(crate::pipeline::MAX_RECORDED_INPUT_BYTES);
        }
        /// Stops the blocking loop when the attempt's future is dropped.
        struct Stop(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stop = Stop(Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let stopped = stop.0.clone();
        let handle = tokio::runtime::Handle::current();
        let (engine, req, client) = (engine.clone(), req.clone(), pieces.clone());
        let chain_id = self.chain_id.clone();
        let mut seen = std::mem::take(&mut sent.text);
        let before = seen.len();
        let span = tracing::info_span!(
            "inference.route",
            route = "pipeline",
            stages = plan.stages.len()
        );
        let job = tokio::task::spawn_blocking(move || {
            let _in = span.enter();
            let mut session = session;
            let mut position = 0u32;
            let mut stage_failure = None;
            let mut request_failure = None;
            let mut got = String::new();
            let (tokenizer, eos) = &*engine.tokenizer;
            let mut fed: Vec<i64> = Vec::new();
            let result = crate::inference::run_chat(
                tokenizer,
                eos,
                &engine.config,
                &req,
                |ids| match handle.block_on(session.forward(position, ids, deadline)) {
                    Ok(row) => {
                        position += u32::try_from(ids.len()).unwrap_or(u32::MAX);
                        fed.extend_from_slice(ids);
                        Ok(row)
                    }
                    Err((node, why)) => {
                        stage_failure = Some((node, why.clone()));
                        Err(blyan_gpu::GpuError::Invalid(why))
                    }
                },
                |piece| {
                    if std::time::Instant::now() >= deadline {
                        return Err(Cancel::Deadline);
                    }
                    if stopped.load(Ordering::Relaxed) {
                        return Err(Cancel::Disconnected);
                    }
                    let Some(client) = &client else {
                        return Ok(());
                    };
                    let Some(p) = piece else {
                        return if client.is_closed() {
                            Err(Cancel::Disconnected)
                        } else {
                            Ok(())
                        };
                    };
                    got.push_str(p);
                    let mut s = Sent {
                        text: std::mem::take(&mut seen),
                    };
                    let fresh = match s.fresh(&got, before) {
                        Ok(f) => f.to_string(),
                        Err(e) => {
                            seen = s.text;
                            request_failure = Some(e);
                            return Err(Cancel::Disconnected);
                        }
                    };
                    let r = if fresh.is_empty() {
                        Ok(())
                    } else {
                        match client.try_send(fresh.clone()) {
                            Ok(()) => {
                                s.text.push_str(&fresh);
                                Ok(())
                            }
                            Err(mpsc::error::TrySendError::Full(_)) => Err(Cancel::Stalled),
                            Err(mpsc::error::TrySendError::Closed(_)) => Err(Cancel::Disconnected),
                        }
                    };
                    seen = s.text;
                    r
                },
                &engine.stats,
            );
            // RT-PIPE-6: the stages' last commitments, all checked.
            let mut commitments = Vec::new();
            if result.is_ok() && stage_failure.is_none() && request_failure.is_none() {
                match handle.block_on(session.finish(&chain_id, deadline)) {
                    Ok(c) => commitments = c,
                    Err((node, why)) => stage_failure = Some((node, why)),
                }
            }
            let timings = session.timings();
            let used = session.experts_used();
            let inputs = session.take_recording();
            (
                result,
                stage_failure,
                request_failure,
                seen,
                timings,
                (commitments, fed, used, inputs),
            )
        });
        let (
            result,
            stage_failure,
            request_failure,
            seen,
            timings,
            (mut commitments, fed, used, inputs),
        ) = job.await.map_err(|e| {
            Failure::Request(Error::Inference(format!("the route's loop failed: {e}")))
        })?;
        sent.text = seen;
        drop(stop);
        if let Some(e) = request_failure {
            return Err(Failure::Request(e));
        }
        if let Some((node, why)) = stage_failure {
            return Err(Failure::Stage(node, why));
        }
        let mut result = result.map_err(Failure::Request)?;
        // RT-PIPE-8: the experts every stage used, as `layer.expert`.
        let all: BTreeSet<(u32, u16)> = used.iter().flatten().copied().collect();
        result.experts_used = all.iter().map(|(l, e)| format!("{l}.{e}")).collect();
        let stages = plan
            .stages
            .iter()
            .zip(timings)
            .enumerate()
            .map(|(i, (s, ms))| RoutedStage {
                node: s.node,
                first_layer: s.first_layer,
                last_layer: s.last_layer,
                ms,
                commitments: commitments
                    .get_mut(i)
                    .map(std::mem::take)
                    .unwrap_or_default(),
                experts: s.experts.clone(),
                experts_used: used
                    .get(i)
                    .map(|u| u.iter().copied().collect())
                    .unwrap_or_default(),
            })
            .collect();
        info!(stages = plan.stages.len(), "request served by a pipeline");
        Ok(PipelineRun {
            result,
            stages,
            request_id,
            fed,
            inputs,
        })
    }

    /// Without the `inference` feature no node routes through stages.
    #[cfg(not(feature = "inference"))]
    async fn pipeline(
        &self,
        _engine: &InferenceHandle,
        _plan: &blyan_route::route::Plan,
        _req: &ChatRequest,
        _pieces: &Option<mpsc::Sender<String>>,
        _sent: &mut Sent,
        _always_check: bool,
    ) -> Result<PipelineRun, Failure> {
        Err(Failure::Request(Error::Inference(
            "this binary was built without the `inference` feature".into(),
        )))
    }
}

/// Sends the client what it has not seen of `got`; a client gone ends the
/// request.
async fn forward(
    sent: &mut Sent,
    got: &str,
    before: usize,
    client: &mpsc::Sender<String>,
) -> Result<(), Failure> {
    let fresh = sent.fresh(got, before).map_err(Failure::Request)?;
    if fresh.is_empty() {
        return Ok(());
    }
    client.try_send(fresh.to_string()).map_err(|_| {
        Failure::Request(Error::Inference(
            "the client went away or left the stream unread".into(),
        ))
    })?;
    sent.text.push_str(fresh);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(s: &str) -> Sent {
        Sent { text: s.into() }
    }

    #[test]
    fn rt_stage_4_a_replay_forwards_only_what_the_client_has_not_seen() {
        let s = sent("Hello, wor");
        // Still inside what was sent: nothing new, and it must agree.
        assert_eq!(s.fresh("Hel", 10).unwrap(), "");
        assert_eq!(s.fresh("Hello, wor", 10).unwrap(), "");
        // Past it: only the rest.
        assert_eq!(s.fresh("Hello, world", 10).unwrap(), "ld");
        // A replay that contradicts what was sent fails.
        assert!(s.fresh("Help", 10).is_err());
        assert!(s.fresh("Hello, Word!", 10).is_err());
        // Nothing sent yet: everything is fresh.
        assert_eq!(sent("").fresh("abc", 0).unwrap(), "abc");
    }

    #[test]
    fn rt_stage_1_events_round_trip() {
        let e = error_event(&Error::Busy("full".into()));
        assert_eq!(e[0], b'e');
        let parsed: StageError = serde_json::from_slice(&e[1..]).unwrap();
        assert_eq!(parsed.kind, "busy");
        let req = StageRequest {
            model: "0x00".into(),
            request: ChatRequest {
                prompt: "hi".into(),
                max_tokens: 3,
                temperature: 0.0,
                top_p: 1.0,
                seed: 7,
                stop: vec!["\n".into()],
                max_total_tokens: Some(10),
                top_logprobs: Some(3),
            },
        };
        let bytes = serde_json::to_vec(&req).unwrap();
        let back: StageRequest = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.request, req.request);
        assert!(serde_json::from_slice::<StageRequest>(b"{\"model\":\"x\"}").is_err());
    }
}
