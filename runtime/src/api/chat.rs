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
//!   per_1k_tokens / 1000)` base units, with `per_1k_tokens` from the chain
//!   parameters (seed 8.2: 1 BLY per 1,000 tokens). It is reported, not
//!   charged: payment is settled on chain with a client-signed receipt
//!   (TX-8) once routing across nodes lands.
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
use crate::inference::{ChatRequest, ChatResult, InferenceHandle};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::sse::{Event, Sse};
use blyan_state_machine::types::Amount;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

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
}

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
    })
}

fn engine_error(e: Error) -> ApiError {
    match e {
        Error::BadRequest(m) => ApiError::bad_request(m),
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

/// API-CHAT-2: the cost of `tokens` in base units, rounded up.
pub fn cost_base_units(tokens: usize, per_1k_tokens: Amount) -> Amount {
    (tokens as u128)
        .saturating_mul(per_1k_tokens)
        .div_ceil(1000)
}

/// Base units as a BLY decimal, for display.
pub fn bly(base_units: Amount) -> f64 {
    let whole = base_units / blyan_state_machine::types::BLY;
    let frac = base_units % blyan_state_machine::types::BLY;
    format!("{whole}.{frac:018}").parse().unwrap_or(f64::NAN)
}

fn answer(state: &ApiState, engine: &InferenceHandle, r: ChatResult) -> ChatAnswer {
    let per_1k = snapshot(&state.node).ledger.params().rewards.per_1k_tokens;
    let tokens = r.prompt_tokens + r.completion_tokens;
    let cost = cost_base_units(tokens, per_1k);
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
    }
}

/// Generate text from a prompt with the node's local model.
#[utoipa::path(post, path = "/chat", request_body = ChatBody,
    responses((status = 200, body = ChatAnswer), (status = 400, body = super::openapi::ErrorBody),
              (status = 404, description = "use_moe on a dense model", body = super::openapi::ErrorBody),
              (status = 429, body = super::openapi::ErrorBody), (status = 503, body = super::openapi::ErrorBody),
              (status = 504, body = super::openapi::ErrorBody)))]
pub async fn chat(State(state): State<ApiState>, body: Result<Bytes, BytesRejection>) -> ApiResult {
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
    let result = engine.generate(req, None).await.map_err(engine_error)?;
    Ok(axum::Json(answer(&state, engine, result)).into_response())
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
    if let Some(m) = &b.model
        && m != &engine.model.name
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            code::EXPERT_NOT_FOUND,
            "model_not_found",
            format!("this node serves {:?}, not {m:?}", engine.model.name),
        ));
    }
    let stop = match b.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let req = check(
        &engine,
        chat_template(&b.messages),
        b.max_tokens,
        b.temperature,
        b.top_p,
        b.seed,
        stop,
    )?;
    let id = format!(
        "chatcmpl-{}-{}",
        hex0x(&state.node.address.0).get(2..10).unwrap_or_default(),
        COMPLETION_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let created = unix_secs();
    let model = engine.model.name.clone();
    if !b.stream {
        let r = engine.generate(req, None).await.map_err(engine_error)?;
        return Ok(axum::Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": r.text },
                "finish_reason": r.finish_reason,
            }],
            "usage": {
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
            },
        }))
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
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
            })
        }
    };
    // API-CHAT-4: every send fails once the client is gone (axum dropped the
    // SSE body and with it `events_rx`); the task then returns, dropping the
    // piece receiver and the pending reply, which cancels the job at its
    // next token. While the client does not read, `events_tx.send` waits
    // here (never in the engine), the piece channel fills and the engine
    // cancels the job.
    tokio::spawn(async move {
        let first = chunk(json!({ "role": "assistant", "content": "" }), None);
        if events_tx
            .send(Event::default().data(first.to_string()))
            .await
            .is_err()
        {
            return;
        }
        let generation = engine.generate(req, Some(pieces_tx));
        tokio::pin!(generation);
        let result = loop {
            tokio::select! {
                Some(piece) = pieces_rx.recv() => {
                    let c = chunk(json!({ "content": piece }), None);
                    if events_tx.send(Event::default().data(c.to_string())).await.is_err() {
                        return;
                    }
                }
                r = &mut generation => break r,
            }
        };
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
                let mut last = chunk(json!({}), Some(r.finish_reason));
                last["usage"] = json!({
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "total_tokens": r.prompt_tokens + r.completion_tokens,
                });
                let _ = events_tx
                    .send(Event::default().data(last.to_string()))
                    .await;
            }
            Err(e) => {
                let e = engine_error(e);
                let body = json!({ "error": { "code": e.code, "reason": e.reason, "message": e.message } });
                let _ = events_tx
                    .send(Event::default().event("error").data(body.to_string()))
                    .await;
            }
        }
        let _ = events_tx.send(Event::default().data("[DONE]")).await;
    });
    let stream = futures_util::stream::unfold(events_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<Event, Infallible>(e), rx))
    });
    Ok(Sse::new(stream).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_chat_2_cost_rounds_up_per_token() {
        let per_1k = blyan_state_machine::types::BLY; // 1 BLY per 1,000 tokens
        assert_eq!(cost_base_units(1_000, per_1k), per_1k);
        assert_eq!(cost_base_units(1, per_1k), per_1k / 1000);
        assert_eq!(
            cost_base_units(1, 1),
            1,
            "a fraction of a base unit rounds up"
        );
        assert_eq!(cost_base_units(0, per_1k), 0);
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
