//! `POST /chat` (the seed's shape) and `POST /v1/chat/completions` (the
//! OpenAI-compatible shape clients expect, with server-sent-event streaming),
//! both served by the node's local engine ([`crate::inference`]).
//!
//! - **API-CHAT-1** Limits are checked before anything is queued:
//!   `1 ≤ max_tokens ≤ max_tokens_limit`, `0 ≤ temperature ≤ 2`,
//!   `0 < top_p ≤ 1`, at most [`MAX_STOP`] stop strings; a bad value is
//!   `400`. `use_moe: true` against a dense model is `404`/3001
//!   EXPERT_NOT_FOUND.
//! - **API-CHAT-2** Cost: `ceil((prompt + completion tokens) ×
//!   inference_price_per_1k_tokens / 1000)` base units (ALW-5; the chain
//!   parameter, seed 8.2: 1 BLY per 1,000 tokens). With an API key it is
//!   charged to the key's allowance and settled on chain in batches
//!   ([`crate::billing`], API-PAY-*); without one (free mode only) it is
//!   reported, not charged. Every answer carries a `blyan` object: the
//!   cost, whether it was charged, the request id it settles under, and
//!   the route (the nodes that served, with their work).
//! - **API-CHAT-3** A full engine queue is `503`/4001 at once; a request
//!   not finished within the inference timeout is `504`/4001.
//! - **API-CHAT-4** A client never holds the engine: a stream whose reader
//!   stops reading, a client that disconnects (streamed or not) and a
//!   passed deadline cancel the job at its next token
//!   ([`crate::inference`]). The stream task below stops as soon as the
//!   SSE body is dropped, which drops the job's piece receiver and reply.
//! - **API-CHAT-5** A panic in the engine answers that request `500`/4001
//!   `inference_failed`; the engine is rebuilt and later requests are served
//!   ([`crate::inference`]).

use super::{ApiError, ApiResult, ApiState, code, hex0x, parse_json, snapshot};
use crate::Error;
// OPS-LOG-2, OPS-TRACE-3: spawned work stays in the request's (and node's) span.
use crate::billing::{Payer, Reservation};
use crate::inference::{ChatRequest, ChatResult, InferenceHandle};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::sse::{Event, Sse};
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::types::Amount;
use blyan_state_machine::types::Hash32;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tracing::Instrument as _;

/// Most stop strings one request may give.
pub const MAX_STOP: usize = 4;
/// Default `max_tokens` when a request gives none.
pub const DEFAULT_MAX_TOKENS: usize = 64;

/// The seed's `/chat` request.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatBody {
    pub prompt: String,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// 0 (the default): greedy.
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub use_moe: bool,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sampling seed (same seed, same text).
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
    /// API-CHAT-7: return each generated token's log-probability with the
    /// `n` (0–20) most likely tokens at its position.
    #[serde(default)]
    pub logprobs: Option<u8>,
}

/// API-CHAT-7: most alternatives per position a request may ask for.
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// The seed's `/chat` answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ChatAnswer {
    pub text: String,
    /// Prompt plus completion tokens.
    pub tokens_used: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The seed's field; always `[]` for now (the local engine does not
    /// report MoE routing yet).
    pub experts_used: Vec<String>,
    /// API-CHAT-2, in BLY (display; `cost_base_units` is exact).
    pub cost_bly: f64,
    /// API-CHAT-2, in base units (10^-18 BLY), as a decimal string.
    pub cost_base_units: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    pub model: String,
    /// POL-SERVE-2: the head of the model the answer came from (every
    /// stage ran on it); changes when the chain accepts a delta.
    pub head: String,
    /// API-CHAT-7: per generated token `{token, id, logprob, top_logprobs:
    /// [{token, id, logprob}]}`, when the request asked (`logprobs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub logprobs: Option<Vec<crate::inference::TokenLogprob>>,
    /// API-CHAT-2: cost, whether it was charged, request id, route.
    #[schema(value_type = Object)]
    pub blyan: serde_json::Value,
    /// RT-STAGE-7: the stages that served, in order:
    /// `{"node", "layers": [first, last], "ms"}`; a stage that failed over
    /// first is listed before with `"failed": true`.
    #[schema(value_type = Vec<Object>)]
    pub route: serde_json::Value,
}

fn inference(state: &ApiState) -> Result<&InferenceHandle, ApiError> {
    state
        .inference
        .as_ref()
        .ok_or_else(|| ApiError::offline("this node serves no inference (inference disabled)"))
}

/// API-CHAT-1.
fn check(
    engine: &InferenceHandle,
    prompt: String,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    stop: Vec<String>,
) -> Result<ChatRequest, ApiError> {
    let limit = engine.config.max_tokens_limit;
    let max_tokens = max_tokens.unwrap_or(DEFAULT_MAX_TOKENS.min(limit));
    if max_tokens == 0 || max_tokens > limit {
        return Err(ApiError::bad_request(format!(
            "max_tokens must be between 1 and {limit}, not {max_tokens}"
        )));
    }
    let temperature = temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!(
            "temperature must be between 0 and 2, not {temperature}"
        )));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!(
            "top_p must be in (0, 1], not {top_p}"
        )));
    }
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_STOP} non-empty stop strings"
        )));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad_request("prompt is empty"));
    }
    Ok(ChatRequest {
        prompt,
        max_tokens,
        temperature,
        top_p,
        seed: seed.unwrap_or(0),
        stop,
        max_total_tokens: None,
        top_logprobs: None,
    })
}

/// API-CHAT-7: `n` alternatives per position, at most [`MAX_TOP_LOGPROBS`].
fn check_logprobs(n: Option<u8>) -> Result<Option<u8>, ApiError> {
    match n {
        Some(n) if n > MAX_TOP_LOGPROBS => Err(ApiError::bad_request(format!(
            "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {n}"
        ))),
        n => Ok(n),
    }
}

fn engine_error(e: Error) -> ApiError {
    match e {
        Error::BadRequest(m) => ApiError::bad_request(m),
        Error::PaymentRequired(m) => ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            code::VALIDATION_FAILED,
            "insufficient_quota",
            m,
        ),
        Error::Busy(m) => ApiError::offline(m),
        Error::Timeout(m) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            code::NODE_OFFLINE,
            "inference_timeout",
            m,
        ),
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code::NODE_OFFLINE,
            "inference_failed",
            other.to_string(),
        ),
    }
}

/// Base units as a BLY decimal, for display.
pub fn bly(base_units: Amount) -> f64 {
    let whole = base_units / blyan_state_machine::types::BLY;
    let frac = base_units % blyan_state_machine::types::BLY;
    format!("{whole}.{frac:018}").parse().unwrap_or(f64::NAN)
}

fn answer(engine: &InferenceHandle, r: ChatResult, bill: &Bill) -> ChatAnswer {
    let tokens = r.prompt_tokens + r.completion_tokens;
    let cost = bill.cost;
    ChatAnswer {
        text: r.text,
        tokens_used: tokens,
        prompt_tokens: r.prompt_tokens,
        completion_tokens: r.completion_tokens,
        experts_used: r.experts_used,
        cost_bly: bly(cost),
        cost_base_units: cost.to_string(),
        finish_reason: r.finish_reason.to_string(),
        model: engine.model.name.clone(),
        head: r.head,
        logprobs: r.logprobs,
        blyan: bill.json(),
        route: bill.stages.clone(),
    }
}

/// The meta block id of the model `engine` serves: the registered meta
/// block whose payload is the block directory's manifest (GEN-MODEL-2).
pub fn served_model_id(ledger: &Ledger, engine: &InferenceHandle) -> Option<Hash32> {
    let dir = engine.config.model_dir.as_ref()?;
    let manifest = std::fs::read(dir.join("manifest.json")).ok()?;
    let cid = blyan_state_machine::pol::cid_v1_raw_sha256(&manifest);
    ledger
        .pol()
        .blocks()
        .find(|(_, b)| {
            b.block_type == blyan_state_machine::pol::PolBlockType::Meta && b.payload_cid == cid
        })
        .map(|(id, _)| *id)
}

/// API-KEY-4, API-PAY-1: who pays for a request, decided before it is queued.
enum Payment {
    Free,
    Paid(Payer, Reservation),
}

fn admit(
    state: &ApiState,
    payer: Option<Payer>,
    prompt_bytes: usize,
    max_tokens: usize,
) -> Result<Payment, ApiError> {
    match payer {
        None if state.free_inference => Ok(Payment::Free),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            code::VALIDATION_FAILED,
            "missing_api_key",
            "this node serves inference to API keys: send `Authorization: Bearer <key>` (create one with `blyan keys api-key`)",
        )),
        Some(p) => {
            let want = (prompt_bytes as u64).saturating_add(max_tokens as u64);
            let r = state
                .meter
                .reserve(&p, want)
                .map_err(crate::billing::MeterRefusal::into_api_error)?;
            Ok(Payment::Paid(p, r))
        }
    }
}

/// What a finished (or failed) request cost and who served it.
pub struct Bill {
    /// RT-STAGE-7: the route's stages ([`Served::stages`]); `null` until set.
    pub stages: serde_json::Value,
    pub cost: Amount,
    pub charged: bool,
    pub request_id: Option<Hash32>,
    pub route: Vec<(blyan_state_machine::types::Address, u64)>,
    pub capped: bool,
}

impl Bill {
    fn json(&self) -> serde_json::Value {
        json!({
            "cost_base_units": self.cost.to_string(),
            "cost_bly": bly(self.cost),
            "charged": self.charged,
            "request_id": self.request_id.map(|id| hex0x(&id)),
            "cap_reached": self.capped,
            "route": self.route.iter().map(|(n, w)| json!({ "node": n.to_string(), "work": w })).collect::<Vec<_>>(),
            "stages": self.stages,
        })
    }
}

/// The usage record's outcome of a request (spec/api.md API-USAGE-1).
fn outcome(r: Result<&ChatResult, &Error>) -> String {
    match r {
        Ok(r) if r.capped => "cap_reached".into(),
        Ok(r) => r.finish_reason.into(),
        Err(Error::Timeout(_)) => "cancelled:deadline".into(),
        Err(Error::Inference(m)) if m.contains("went away") => "cancelled:client_gone".into(),
        Err(Error::Inference(m)) if m.contains("unread") => "cancelled:stalled_reader".into(),
        Err(Error::PaymentRequired(_)) => "error:insufficient_quota".into(),
        Err(Error::BadRequest(_)) => "error:bad_request".into(),
        Err(Error::Busy(_)) => "error:busy".into(),
        Err(_) => "error:inference_failed".into(),
    }
}

/// API-PAY-2: releases the reservation and records the usage of a served
/// request (an error: not charged), and appends the request's usage record
/// (API-USAGE-*; keyless requests under the all-zero key id).
fn finish(
    state: &ApiState,
    engine: &InferenceHandle,
    payment: Payment,
    r: Result<&ChatResult, &Error>,
    served_by: Served,
    started: std::time::Instant,
) -> Bill {
    let layers = engine.model.layers.max(1) as u64;
    let served = r.ok();
    let tokens = served.map_or(0, |r| (r.prompt_tokens + r.completion_tokens) as u64);
    let shares = if served_by.stages.is_empty() {
        crate::billing::route_of(state.node.address, served_by.by, layers, tokens)
    } else {
        crate::billing::route_of_stages(state.node.address, &served_by.stages, tokens)
    };
    let route: Vec<_> = if served.is_some() {
        shares.iter().map(|s| (s.node, s.work)).collect()
    } else {
        Vec::new()
    };
    let capped = served.is_some_and(|r| r.capped);
    let (bill, key_id, allowance) = match payment {
        Payment::Free => (
            Bill {
                stages: serde_json::Value::Null,
                cost: state.meter.price(tokens),
                charged: false,
                request_id: None,
                route,
                capped,
            },
            [0; 32],
            None,
        ),
        Payment::Paid(payer, reservation) => {
            let counts = served.map(|r| (r.prompt_tokens as u64, r.completion_tokens as u64));
            let model = state.served_model.unwrap_or([0; 32]);
            let (cost, charged, request_id) =
                match state.meter.complete_by(reservation, model, counts, shares) {
                    Some((id, cost)) => (cost, true, Some(id)),
                    None => (0, false, None),
                };
            (
                Bill {
                    stages: serde_json::Value::Null,
                    cost,
                    charged,
                    request_id,
                    route,
                    capped,
                },
                payer.key_id,
                Some(payer.allowance),
            )
        }
    };
    if let Some(log) = &state.usage {
        let rec = crate::usage::UsageRecord {
            request_id: bill
                .request_id
                .unwrap_or_else(|| state.meter.next_request_id()),
            key_id,
            allowance,
            model: engine.model.name.clone(),
            prompt_tokens: served.map_or(0, |r| r.prompt_tokens as u64),
            completion_tokens: served.map_or(0, |r| r.completion_tokens as u64),
            route: bill.route.iter().map(|(n, _)| *n).collect(),
            cost_base_units: if bill.charged { bill.cost } else { 0 },
            latency_ms: started.elapsed().as_millis() as u64,
            outcome: outcome(r),
            time_ms: crate::usage::now_ms(),
        };
        let log = log.clone();
        tokio::spawn(
            async move {
                if let Err(e) = log.append_async(rec).await {
                    tracing::error!(error = %e, "usage record not stored");
                }
            }
            .in_current_span(),
        );
    }
    bill
}

/// RT-STAGE-2: serves `req` through the node's router (on the best holder
/// of the model, failing over, RT-STAGE-4) or, without one, on the local
/// engine; returns the result and the node that computed it.
async fn serve(
    state: &ApiState,
    engine: &InferenceHandle,
    req: crate::inference::ChatRequest,
    pieces: Option<mpsc::Sender<String>>,
) -> (Result<ChatResult, Error>, Served, serde_json::Value) {
    let routed = match &state.router {
        Some(router) => {
            router
                .generate(engine, state.served_model, req, pieces)
                .await
        }
        None => {
            let t = std::time::Instant::now();
            crate::router::Routed {
                result: engine.generate(req, pieces).await,
                served_by: state.node.address,
                failed: Vec::new(),
                stage_ms: t.elapsed().as_millis() as u64,
                stages: Vec::new(),
            }
        }
    };
    let stages = stages_json(engine, &routed);
    let served = Served {
        by: routed.served_by,
        // RT-PIPE-8: expert holders are paid for the layers they served.
        stages: routed
            .stages
            .iter()
            .flat_map(|s| {
                crate::billing::stage_work(
                    s.node,
                    (s.first_layer, s.last_layer),
                    &s.experts,
                    &s.experts_used,
                )
            })
            .collect(),
    };
    (routed.result, served, stages)
}

/// Who computed an answer (RT-STAGE-5, RT-PIPE-3): one engine, or the
/// stages of a pipeline with the layers each ran.
pub(crate) struct Served {
    by: blyan_state_machine::types::Address,
    stages: Vec<(blyan_state_machine::types::Address, u64)>,
}

impl Served {
    fn local(node: blyan_state_machine::types::Address) -> Served {
        Served {
            by: node,
            stages: Vec::new(),
        }
    }
}

/// RT-STAGE-7: a route's stages as answers show them (one stage holding
/// every layer today; failed-over stages first, marked).
fn stages_json(engine: &InferenceHandle, r: &crate::router::Routed) -> serde_json::Value {
    let last = engine.model.layers.saturating_sub(1);
    let mut stages: Vec<serde_json::Value> = r
        .failed
        .iter()
        .map(|n| json!({ "node": n.to_string(), "layers": [0, last], "failed": true }))
        .collect();
    if r.stages.is_empty() {
        stages.push(
            json!({ "node": r.served_by.to_string(), "layers": [0, last], "ms": r.stage_ms }),
        );
    } else {
        // RT-PIPE-3: every stage with its layer range.
        stages.extend(r.stages.iter().map(|s| {
            let mut stage = json!({
                "node": s.node.to_string(),
                "layers": [s.first_layer, s.last_layer],
                "ms": s.ms,
                // RT-PIPE-6: its signed commitments, one per 32 positions.
                "commitments": s.commitments.iter().map(|c| hex0x(c)).collect::<Vec<_>>(),
            });
            // RT-PIPE-8: an MoE stage's experts, where the plan placed them.
            if !s.experts.is_empty() {
                stage["experts"] = s
                    .experts
                    .iter()
                    .map(|a| json!({ "layer": a.layer, "expert": a.expert, "node": a.node.to_string() }))
                    .collect();
            }
            stage
        }));
    }
    serde_json::Value::Array(stages)
}

/// RT-STAGE-7: the `x-blyan-route` header value (compact JSON).
fn route_header(stages: &serde_json::Value) -> (axum::http::HeaderName, axum::http::HeaderValue) {
    let value = axum::http::HeaderValue::from_str(&stages.to_string())
        .unwrap_or_else(|_| axum::http::HeaderValue::from_static("[]"));
    (axum::http::HeaderName::from_static("x-blyan-route"), value)
}

/// Generate text from a prompt with the node's local model.
#[utoipa::path(post, path = "/chat", request_body = ChatBody,
    responses((status = 200, body = ChatAnswer), (status = 400, body = super::openapi::ErrorBody),
              (status = 404, description = "use_moe on a dense model", body = super::openapi::ErrorBody),
              (status = 429, body = super::openapi::ErrorBody), (status = 503, body = super::openapi::ErrorBody),
              (status = 504, body = super::openapi::ErrorBody)))]
pub async fn chat(
    State(state): State<ApiState>,
    payer: Option<Extension<Payer>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let b: ChatBody = parse_json(
        body,
        r#"{"prompt": "...", "max_tokens": 64, "temperature": 0.0, "use_moe": false}"#,
    )?;
    let engine = inference(&state)?;
    if b.use_moe && !engine.model.is_moe {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            code::EXPERT_NOT_FOUND,
            "expert_not_found",
            format!(
                "use_moe was asked but the served model {:?} has no experts",
                engine.model.name
            ),
        ));
    }
    let req = check(
        engine,
        b.prompt,
        b.max_tokens,
        b.temperature,
        b.top_p,
        b.seed,
        b.stop,
    )?;
    let mut req = req;
    req.top_logprobs = check_logprobs(b.logprobs)?;
    let payment = admit(&state, payer.map(|e| e.0), req.prompt.len(), req.max_tokens)?;
    if let Payment::Paid(_, r) = &payment {
        req.max_total_tokens = Some(r.max_total_tokens);
    }
    let started = std::time::Instant::now();
    let (result, served_by, stages) = serve(&state, engine, req, None).await;
    let mut bill = finish(&state, engine, payment, result.as_ref(), served_by, started);
    bill.stages = stages;
    let result = result.map_err(engine_error)?;
    Ok(axum::Json(answer(engine, result, &bill)).into_response())
}

/// One OpenAI chat message.
#[derive(serde::Deserialize, utoipa::ToSchema)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// `stop` as a string or a list.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The OpenAI-compatible request (the fields this engine supports).
#[derive(serde::Deserialize, utoipa::ToSchema)]
pub struct CompletionsBody {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default, alias = "max_completion_tokens")]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    /// OpenAI's `{"include_usage": true}`: one more chunk before `[DONE]`,
    /// with empty `choices` and the request's `usage`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// API-CHAT-7: OpenAI's `logprobs` (with `stream`, all in the final chunk).
    #[serde(default)]
    pub logprobs: bool,
    /// API-CHAT-7: OpenAI's `top_logprobs` (0–20; needs `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<u8>,
}

/// OpenAI's `stream_options`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// API-CHAT-7 in OpenAI's shape: `{"content": [{token, logprob, bytes,
/// top_logprobs: [{token, logprob, bytes}]}]}`.
fn openai_logprobs(tokens: &[crate::inference::TokenLogprob]) -> serde_json::Value {
    let entry = |token: &str, logprob: f32| json!({ "token": token, "logprob": logprob, "bytes": token.as_bytes() });
    json!({
        "content": tokens
            .iter()
            .map(|t| {
                let mut e = entry(&t.token, t.logprob);
                e["top_logprobs"] = t
                    .top_logprobs
                    .iter()
                    .map(|a| entry(&a.token, a.logprob))
                    .collect();
                e
            })
            .collect::<Vec<_>>(),
    })
}

/// Qwen's ChatML template: each message as `<|im_start|>role\ncontent<|im_end|>\n`,
/// then the assistant's turn opened; markers in role and content are escaped
/// (API-CHAT-6, [`crate::template`]).
pub fn chat_template(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&crate::template::escape_markers(&m.role));
        out.push('\n');
        out.push_str(&crate::template::escape_markers(&m.content));
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

static COMPLETION_SEQ: AtomicU64 = AtomicU64::new(0);

fn unix_secs() -> u64 {
    crate::transport::now_ms() / 1000
}

/// OpenAI-compatible chat completion; `stream: true` answers with
/// server-sent events ending in `data: [DONE]`.
#[utoipa::path(post, path = "/v1/chat/completions", request_body = CompletionsBody,
    responses((status = 200, description = "`chat.completion`, or `text/event-stream` of `chat.completion.chunk`", body = Object),
              (status = 400, body = super::openapi::ErrorBody), (status = 429, body = super::openapi::ErrorBody),
              (status = 503, body = super::openapi::ErrorBody), (status = 504, body = super::openapi::ErrorBody)))]
pub async fn completions(
    State(state): State<ApiState>,
    payer: Option<Extension<Payer>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let b: CompletionsBody = parse_json(
        body,
        r#"{"messages": [{"role": "user", "content": "..."}], "max_tokens": 64}"#,
    )?;
    let engine = inference(&state)?.clone();
    if b.messages.is_empty() {
        return Err(ApiError::bad_request("messages is empty"));
    }
    // API-KEY-7: `model` is optional; given, it is the served model's name
    // or its meta block id (as `GET /v1/models` lists it).
    if let Some(m) = &b.model
        && m != &engine.model.name
        && state.served_model.is_none_or(|id| *m != hex0x(&id))
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            code::EXPERT_NOT_FOUND,
            "model_not_found",
            format!(
                "The model `{m}` does not exist or this node does not serve it (it serves {:?}; see GET /v1/models)",
                engine.model.name
            ),
        ));
    }
    let include_usage = b.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let stop = match b.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let mut req = check(
        &engine,
        chat_template(&b.messages),
        b.max_tokens,
        b.temperature,
        b.top_p,
        b.seed,
        stop,
    )?;
    if b.top_logprobs.is_some() && !b.logprobs {
        return Err(ApiError::bad_request("top_logprobs needs logprobs: true"));
    }
    if b.logprobs {
        req.top_logprobs = Some(check_logprobs(b.top_logprobs)?.unwrap_or(0));
    }
    let id = format!(
        "chatcmpl-{}-{}",
        hex0x(&state.node.address.0).get(2..10).unwrap_or_default(),
        COMPLETION_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let created = unix_secs();
    let model = engine.model.name.clone();
    let payment = admit(&state, payer.map(|e| e.0), req.prompt.len(), req.max_tokens)?;
    if let Payment::Paid(_, r) = &payment {
        req.max_total_tokens = Some(r.max_total_tokens);
    }
    if !b.stream {
        let started = std::time::Instant::now();
        let (r, served_by, stages) = serve(&state, &engine, req, None).await;
        let mut bill = finish(&state, &engine, payment, r.as_ref(), served_by, started);
        bill.stages = stages;
        let header = route_header(&bill.stages);
        let r = r.map_err(engine_error)?;
        return Ok((
            [header],
            axum::Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                // POL-SERVE-2: OpenAI's name for the backend configuration
                // that produced the answer: here the model's head.
                "system_fingerprint": r.head,
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": r.text },
                    "logprobs": r.logprobs.as_deref().map(openai_logprobs),
                    "finish_reason": r.finish_reason,
                }],
                "usage": {
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "total_tokens": r.prompt_tokens + r.completion_tokens,
                },
                "blyan": bill.json(),
            })),
        )
            .into_response());
    }
    // Streaming: the engine's pieces become chunks; the last chunk carries
    // the finish reason and usage; then `[DONE]`. Errors after the stream
    // started are sent as an `error` event (the status is already 200).
    let (pieces_tx, mut pieces_rx) = mpsc::channel::<String>(crate::inference::STREAM_PIECES);
    let (events_tx, events_rx) = mpsc::channel::<Event>(crate::inference::STREAM_PIECES);
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |delta: serde_json::Value, finish: Option<&str>| {
            let mut c = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
            });
            if include_usage {
                c["usage"] = serde_json::Value::Null;
            }
            c
        }
    };
    // API-CHAT-4: every send fails once the client is gone (axum dropped the
    // SSE body and with it `events_rx`); the task then closes the piece
    // receiver, which cancels the job at its next token, and waits for the
    // job's end only to release its reservation (API-PAY-2). While the
    // client does not read, `events_tx.send` waits here (never in the
    // engine), the piece channel fills and the engine cancels the job.
    // RT-STAGE-7: a stream's header names the planned stage; its final
    // chunk's `blyan.stages` the one actually used, failovers included.
    let last = u32::try_from(engine.model.layers.saturating_sub(1)).unwrap_or(u32::MAX);
    let planned = match &state.router {
        Some(r) => r.planned(&engine, state.served_model),
        None => vec![(state.node.address, 0, last)],
    };
    let header = route_header(&serde_json::Value::Array(
        planned
            .iter()
            .map(|(n, a, b)| json!({ "node": n.to_string(), "layers": [a, b], "planned": true }))
            .collect(),
    ));
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        let first = chunk(json!({ "role": "assistant", "content": "" }), None);
        if events_tx
            .send(Event::default().data(first.to_string()))
            .await
            .is_err()
        {
            // Not started: release the reservation, charge nothing.
            let gone = Error::Inference("the client went away before the first chunk".into());
            finish(&state, &engine, payment, Err(&gone), Served::local(state.node.address), started);
            return;
        }
        let generation = serve(&state, &engine, req, Some(pieces_tx));
        tokio::pin!(generation);
        // The generation runs to its end even if the client leaves (the
        // engine cancels it at its next token, API-CHAT-4): the request is
        // then billed as failed (nothing charged) and its reservation freed.
        let mut client_gone = false;
        let result = loop {
            tokio::select! {
                Some(piece) = pieces_rx.recv(), if !client_gone => {
                    let c = chunk(json!({ "content": piece }), None);
                    if events_tx.send(Event::default().data(c.to_string())).await.is_err() {
                        client_gone = true;
                        pieces_rx.close();
                    }
                }
                r = &mut generation => break r,
            }
        };
        let (result, served_by, stages) = result;
        let mut bill = finish(&state, &engine, payment, result.as_ref(), served_by, started);
        bill.stages = stages;
        if client_gone {
            return;
        }
        // Pieces sent just before the result.
        while let Ok(piece) = pieces_rx.try_recv() {
            let c = chunk(json!({ "content": piece }), None);
            if events_tx
                .send(Event::default().data(c.to_string()))
                .await
                .is_err()
            {
                return;
            }
        }
        match result {
            Ok(r) => {
                let usage = json!({
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "total_tokens": r.prompt_tokens + r.completion_tokens,
                });
                let mut last = chunk(json!({}), Some(r.finish_reason));
                // API-CHAT-7: a stream's log-probabilities, all in the final
                // chunk (clients concatenate `logprobs.content` across chunks).
                if let Some(lp) = r.logprobs.as_deref() {
                    last["choices"][0]["logprobs"] = openai_logprobs(lp);
                }
                last["system_fingerprint"] = json!(r.head);
                last["blyan"] = bill.json();
                let _ = events_tx
                    .send(Event::default().data(last.to_string()))
                    .await;
                if include_usage {
                    // OpenAI's usage chunk: empty choices, the usage.
                    let mut u = chunk(json!({}), None);
                    u["choices"] = json!([]);
                    u["usage"] = usage;
                    u["blyan"] = bill.json();
                    let _ = events_tx.send(Event::default().data(u.to_string())).await;
                }
            }
            Err(e) => {
                let e = engine_error(e);
                let body = json!({ "error": { "code": e.reason, "type": "server_error", "message": e.message } });
                let _ = events_tx
                    .send(Event::default().event("error").data(body.to_string()))
                    .await;
            }
        }
        let _ = events_tx.send(Event::default().data("[DONE]")).await;
    }.in_current_span());
    let stream = futures_util::stream::unfold(events_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<Event, Infallible>(e), rx))
    });
    Ok(([header], Sse::new(stream)).into_response())
}

/// The OpenAI model object of one registered meta block.
fn model_object(id: String, created_ms: u64, served: bool) -> serde_json::Value {
    json!({ "id": id, "object": "model", "created": created_ms / 1000, "owned_by": "blyan", "served_here": served })
}

/// API-KEY-7: the models this network registers (PoL meta blocks), in
/// OpenAI's list shape. The model this node serves is listed under its
/// name; the others under `0x<meta block id>`.
#[utoipa::path(get, path = "/v1/models",
    responses((status = 200, description = "OpenAI's `list` of `model` objects", body = Object)))]
pub async fn models(State(state): State<ApiState>) -> ApiResult {
    let snap = snapshot(&state.node);
    let created_ms = snap.ledger.globals().time_ms;
    let mut data = Vec::new();
    if let Some(engine) = &state.inference {
        data.push(model_object(engine.model.name.clone(), created_ms, true));
    }
    for (id, b) in snap.ledger.pol().blocks() {
        if b.block_type == blyan_state_machine::pol::PolBlockType::Meta
            && Some(*id) != state.served_model
        {
            data.push(model_object(hex0x(id), created_ms, false));
        }
        if data.len() >= MAX_LISTED_MODELS {
            break;
        }
    }
    Ok(axum::Json(json!({ "object": "list", "data": data })).into_response())
}

/// ALW-1: an allowance as the chain holds it, plus this node's charges
/// not yet settled on chain (`pending_here_base_units`).
#[utoipa::path(get, path = "/allowance/{id}", params(("id" = String, Path, description = "0x-hex allowance id (its opening transaction's id)")),
    responses((status = 200, body = Object), (status = 404, body = super::openapi::ErrorBody), (status = 400, body = super::openapi::ErrorBody)))]
pub async fn get_allowance(
    State(state): State<ApiState>,
    super::Path(id): super::Path<String>,
) -> ApiResult {
    let id = super::parse_hash(&id)?;
    let snap = snapshot(&state.node);
    let a = snap.ledger.allowance(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            code::VALIDATION_FAILED,
            "allowance_not_found",
            "no such allowance (never opened, not yet committed, or released after its grace period)",
        )
    })?;
    let caps = |v: &[blyan_state_machine::allowance::NodeCap]| {
        v.iter()
            .map(|c| json!({ "node": c.node.to_string(), "amount": c.cap.to_string() }))
            .collect::<Vec<_>>()
    };
    let height = snap.ledger.height();
    Ok(axum::Json(json!({
        "id": hex0x(&id),
        "owner": a.owner.to_string(),
        "cap": a.cap.to_string(),
        "spent": a.spent.to_string(),
        "remaining": a.remaining().to_string(),
        "node_caps": caps(&a.node_caps),
        "node_spent": caps(&a.node_spent),
        "opened_at": a.opened_at,
        "expires_at": a.expires_at,
        "closed_at": a.closed_at,
        "settled_requests": a.settled_requests,
        "release_at": a.release_at(snap.ledger.params().allowance_grace_blocks),
        "pending_here_base_units": state.meter.pending_cost(&id, height).to_string(),
        "height": height,
    }))
    .into_response())
}

/// API-USAGE-3: the caller's usage records (its key's, by key id), newest
/// first, paginated; needs the key (`401` without one).
#[utoipa::path(get, path = "/v1/usage",
    params(("since_ms" = Option<u64>, Query, description = "only records at or after this unix time (ms)"),
           ("cursor" = Option<String>, Query, description = "a previous page's next_cursor"),
           ("limit" = Option<usize>, Query, description = "1..=1000, default 100")),
    responses((status = 200, body = Object), (status = 401, body = super::openapi::ErrorBody), (status = 400, body = super::openapi::ErrorBody)))]
pub async fn usage(
    State(state): State<ApiState>,
    payer: Option<Extension<Payer>>,
    super::Query(query): super::Query<crate::usage::UsageQuery>,
) -> ApiResult {
    let Some(Extension(payer)) = payer else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            code::VALIDATION_FAILED,
            "missing_api_key",
            "usage records are the key holder's: send `Authorization: Bearer <key>`",
        ));
    };
    let log = state
        .usage
        .clone()
        .ok_or_else(|| ApiError::offline("this node keeps no usage records"))?;
    crate::usage::list_usage(log, payer.key_id, query).await
}

/// Bound on `GET /v1/models`' list.
pub const MAX_LISTED_MODELS: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_chat_2_cost_rounds_up_per_token() {
        let per_1k = blyan_state_machine::types::BLY; // 1 BLY per 1,000 tokens
        assert_eq!(blyan_state_machine::allowance::price(1_000, per_1k), per_1k);
        assert_eq!(
            blyan_state_machine::allowance::price(1, per_1k),
            per_1k / 1000
        );
        assert_eq!(
            blyan_state_machine::allowance::price(1, 1),
            1,
            "a fraction of a base unit rounds up"
        );
        assert_eq!(blyan_state_machine::allowance::price(0, per_1k), 0);
        assert_eq!(bly(per_1k / 1000 * 64), 0.064);
    }

    #[test]
    fn chat_template_is_chatml() {
        let m = vec![Message {
            role: "user".into(),
            content: "hi".into(),
        }];
        assert_eq!(
            chat_template(&m),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
