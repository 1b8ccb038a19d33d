//! The HTTP API (axum). It reaches the node task only through the bounded
//! request channel and the `watch` snapshot of [`NodeHandle`], and reads
//! committed blocks and receipts through the store's read-only view.
//!
//! | route | answer |
//! |---|---|
//! | `POST /tx` | body `{"tx": "0x<hex of the canonical SignedTx bytes>"}`; `200 {"id": "0x…"}` once the mempool admitted it, else a JSON error |
//! | `GET /account/{address}` | `{address, balance, nonce, stake}` (amounts: decimal strings of base units, 1 BLY = 10^18) |
//! | `GET /block/latest`, `GET /block/{id}` (a height or a block hash) | the committed block: header fields, tx ids, certificate |
//! | `GET /tx/{id}` | `{id, height, index, gas_used, fee_paid, success, failure}` once committed, else 404 |
//! | `GET /params` | the chain parameters |
//! | `GET /health` | `200 {"status": "ok", "height", "inference"}`, or `503` once the node halted or while the inference engine is down (API-CHAT-5) |
//! | `GET /status` | height, round, peers, mempool size, next base fee |
//! | `GET /metrics` | Prometheus text format |
//! | `POST /chat`, `POST /v1/chat/completions` | generation by the local engine ([`chat`]) |
//! | `POST /mine` | a PoL block's payload and its signed registering transaction ([`pol`]) |
//! | `GET /pol/blocks`, `GET /pol/blocks/{id}`, `GET /pol/experts` | the PoL DAG and expert registry |
//! | `POST /p2p/register`, `GET /nodes` | inference-node announcements and tokens ([`p2p`]) |
//! | `GET /`, `GET /ui/{file}`, `GET /explorer/*` | the web explorer and chat page and their read routes ([`explorer`]) |
//! | `GET /openapi.json` | the OpenAPI 3 document generated from the handlers ([`openapi`]) |
//!
//! Every route but `/health` and `/metrics` is rate limited
//! ([`crate::ratelimit`], API-RATE-*): 100 requests/min per client address
//! (an IPv6 client by its /64; behind a trusted proxy, from
//! `X-Forwarded-For`), 1,000 per token from `/p2p/register`
//! (`Authorization: Bearer <token>`); a bad token counts against the
//! address before it is answered `401`.
//!
//! Errors are `{"code": <seed appendix A code>, "reason": "<snake_case>",
//! "message": "<readable>"}` with a 4xx/5xx status: malformed input (bad
//! JSON, hex or encoding) is `400`/5001 VALIDATION_FAILED, a body over the
//! limit (default 1 MiB) `413`/5001, a mempool rejection `422` (or `409` for
//! a duplicate)/5001, a node that is busy or halted `503`/4001 NODE_OFFLINE,
//! an unknown block `404`/1001 INVALID_BLOCK, over a rate limit `429`/5001
//! with `Retry-After`, an unknown token `401`/5001, a model without experts
//! asked for MoE `404`/3001 EXPERT_NOT_FOUND.

pub mod chat;
pub mod explorer;
pub mod openapi;
pub mod p2p;
pub mod pol;

use crate::inference::InferenceHandle;
use crate::ratelimit::{Caller, Limits, RateLimitConfig, Refusal};
use crate::registry::{Registry, RegistryConfig};
use crate::service::{FINALITY_BUCKETS_MS, NodeHandle, Request, Snapshot};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRef, FromRequestParts, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use blyan_state_machine::block::Block;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::node::{CommittedBlock, MempoolError};
use blyan_state_machine::tx::SignedTx;
use blyan_state_machine::types::{Address, Hash32};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Seed appendix A error codes.
pub mod code {
    pub const INVALID_BLOCK: u32 = 1001;
    pub const INSUFFICIENT_BALANCE: u32 = 2001;
    pub const EXPERT_NOT_FOUND: u32 = 3001;
    pub const NODE_OFFLINE: u32 = 4001;
    pub const VALIDATION_FAILED: u32 = 5001;
}

/// Default request body limit.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long `POST /tx` waits for the node's verdict.
pub const SUBMIT_TIMEOUT_MS: u64 = 10_000;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: u32,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: u32,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code,
            reason,
            message: message.into(),
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            code::VALIDATION_FAILED,
            "bad_request",
            message,
        )
    }
    pub(crate) fn offline(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::NODE_OFFLINE,
            "node_offline",
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.code, "reason": self.reason, "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

/// The reason string and status of a mempool rejection.
pub fn mempool_error(e: &MempoolError) -> ApiError {
    use MempoolError::*;
    let reason = match e {
        Duplicate(_) => "duplicate",
        BadSignature => "bad_signature",
        StaleNonce { .. } => "stale_nonce",
        NonceTooFarAhead { .. } => "nonce_too_far_ahead",
        FeeBelowBaseFee { .. } => "fee_below_base_fee",
        TipAboveFeeCap => "tip_above_fee_cap",
        GasLimitTooLow { .. } => "gas_limit_too_low",
        GasLimitTooHigh { .. } => "gas_limit_too_high",
        TooLarge { .. } => "tx_too_large",
        ReplacementUnderpriced { .. } => "replacement_underpriced",
        SenderFull(_) => "sender_full",
        Full => "mempool_full",
        NonceGap { .. } => "nonce_gap",
    };
    let status = match e {
        Duplicate(_) => StatusCode::CONFLICT,
        // NODE-MP-7: backpressure; the client may retry (NonceGap: with
        // the nonce the message names first).
        Full | NonceGap { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let code = match e {
        Full | NonceGap { .. } => code::NODE_OFFLINE,
        _ => code::VALIDATION_FAILED,
    };
    ApiError::new(status, code, reason, e.to_string())
}

type ApiResult = Result<Response, ApiError>;

/// A path parameter whose rejection is the API's JSON error (`400`,
/// `bad_path`), not axum's plain text: every bad input gets the documented
/// `{code, reason, message}` (found by the API fuzzer).
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                code::VALIDATION_FAILED,
                "bad_path",
                e.body_text(),
            )),
        }
    }
}

/// A query string whose rejection is the API's JSON error (`400`,
/// `bad_query`).
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                code::VALIDATION_FAILED,
                "bad_query",
                e.body_text(),
            )),
        }
    }
}

/// API settings (`[api]` in the node's TOML).
#[derive(Clone, Debug, PartialEq)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    pub rate_limits: RateLimitConfig,
    pub registry: RegistryConfig,
    /// Usage records (API-USAGE-*), appended by the chat handlers.
    pub usage: Option<crate::usage::UsageLog>,
    pub mine: pol::MineConfig,
    /// Paid inference (API-KEY-*, API-PAY-*).
    pub payments: crate::billing::PaymentConfig,
    /// RT-HB-12: the table of live inference nodes `GET /nodes` lists.
    pub heartbeats: Option<Arc<crate::heartbeats::Heartbeats>>,
    /// RT-STAGE-2: routes chat requests to the holders of the model.
    pub router: Option<Arc<crate::router::Router>>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_body_bytes: MAX_BODY_BYTES,
            rate_limits: RateLimitConfig::default(),
            registry: RegistryConfig::default(),
            mine: pol::MineConfig::default(),
            usage: None,
            payments: crate::billing::PaymentConfig::default(),
            heartbeats: None,
            router: None,
        }
    }
}

/// Upper bounds (ms) of the API latency histogram's buckets.
pub const API_LATENCY_BUCKETS_MS: [u64; 10] = [1, 2, 5, 10, 25, 50, 100, 250, 1_000, 10_000];

/// Request counts and latencies (for `/metrics`).
#[derive(Default)]
pub struct ApiMetrics {
    buckets: [AtomicU64; API_LATENCY_BUCKETS_MS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
    rate_limited: AtomicU64,
}

impl ApiMetrics {
    fn observe(&self, elapsed: std::time::Duration) {
        let ms = elapsed.as_millis() as u64;
        for (le, b) in API_LATENCY_BUCKETS_MS.iter().zip(&self.buckets) {
            if ms <= *le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub node: NodeHandle,
    /// `None`: this node serves no inference (`/chat` answers 503).
    pub inference: Option<InferenceHandle>,
    /// Where `/mine` keeps payloads (served to peers by the transport).
    pub blobs: Option<Arc<crate::blobs::BlobStore>>,
    pub registry: Arc<Registry>,
    pub limits: Arc<Limits>,
    pub metrics: Arc<ApiMetrics>,
    /// Usage records (API-USAGE-*); `None` in tests that start no node.
    pub usage: Option<crate::usage::UsageLog>,
    pub mine: pol::MineConfig,
    /// API-KEY-4: whether requests without a key are served.
    pub free_inference: bool,
    /// API-PAY-*: this node's charges against allowances (shared with the
    /// settler, [`crate::billing::run_settler`]).
    pub meter: Arc<crate::billing::Meter>,
    /// The PoL meta block id of the model the engine serves, if the chain
    /// registers it (usage items and `/v1/models`).
    pub served_model: Option<Hash32>,
    /// RT-HB-12: live inference nodes (`None` in tests that start no node).
    pub heartbeats: Option<Arc<crate::heartbeats::Heartbeats>>,
    /// RT-STAGE-2: `None`: every request is served by the local engine.
    pub router: Option<Arc<crate::router::Router>>,
}

impl FromRef<ApiState> for NodeHandle {
    fn from_ref(s: &ApiState) -> NodeHandle {
        s.node.clone()
    }
}

/// The API's routes over `node`.
pub fn router(
    node: NodeHandle,
    config: &ApiConfig,
    inference: Option<InferenceHandle>,
    blobs: Option<Arc<crate::blobs::BlobStore>>,
) -> Router {
    let price = snapshot(&node)
        .ledger
        .params()
        .inference_price_per_1k_tokens;
    let meter = Arc::new(crate::billing::Meter::new(
        node.address,
        price,
        config.payments.max_unsettled_requests,
    ));
    router_with_meter(node, config, inference, blobs, meter)
}

/// [`router`] with the meter the node's settler shares.
pub fn router_with_meter(
    node: NodeHandle,
    config: &ApiConfig,
    inference: Option<InferenceHandle>,
    blobs: Option<Arc<crate::blobs::BlobStore>>,
    meter: Arc<crate::billing::Meter>,
) -> Router {
    let served_model = inference
        .as_ref()
        .and_then(|e| chat::served_model_id(&snapshot(&node).ledger, e));
    let state = ApiState {
        free_inference: config.payments.free_inference,
        meter,
        served_model,
        blobs,
        registry: Arc::new(Registry::new(
            node.chain_id.clone(),
            node.address,
            config.registry.clone(),
        )),
        mine: config.mine.clone(),
        node,
        inference,
        limits: Arc::new(Limits::new(&config.rate_limits)),
        metrics: Arc::new(ApiMetrics::default()),
        usage: config.usage.clone(),
        heartbeats: config.heartbeats.clone(),
        router: config.router.clone(),
    };
    // The web explorer (API-UI-*): `/`, `/ui/*` and `/explorer/*`.
    let explorer = explorer::routes(&state);
    Router::new()
        .merge(explorer)
        .route("/tx", post(submit_tx))
        .route("/tx/{id}", get(get_tx))
        .route("/account/{address}", get(get_account))
        .route("/block/latest", get(get_latest_block))
        .route("/block/{id}", get(get_block))
        .route("/params", get(get_params))
        .route("/health", get(get_health))
        .route("/status", get(get_status))
        .route("/metrics", get(get_metrics))
        .route("/chat", post(chat::chat))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(chat::models))
        .route("/v1/usage", get(chat::usage))
        .route("/allowance/{id}", get(chat::get_allowance))
        .route("/mine", post(pol::mine))
        .route("/pol/blocks", get(pol::list_blocks))
        .route("/pol/blocks/{id}", get(pol::get_block))
        .route("/pol/blocks/{id}/payload", get(pol::get_payload))
        .route("/pol/deltas/{id}", get(pol::delta_status))
        .route("/pol/experts", get(pol::experts))
        .route("/p2p/register", post(p2p::register))
        .route("/nodes", get(p2p::nodes))
        .route("/faults", get(p2p::faults))
        .route("/openapi.json", get(openapi::document))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                code::VALIDATION_FAILED,
                "no_such_route",
                "no such route",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_and_measure,
        ))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        // OPS-TRACE-3: one span per request (method, route, status; no headers).
        .layer(axum::middleware::from_fn(crate::telemetry::request_span))
        .with_state(state)
}

/// API-RATE-1/2/5/6: who the caller is, from the bearer token or the client
/// address; a bad token is an error to answer after counting the request
/// against the address (the `Caller` returned with it).
type CallerAndKey = (Caller, Option<crate::billing::Payer>);

fn caller(
    state: &ApiState,
    req: &axum::extract::Request,
) -> Result<CallerAndKey, (Caller, ApiError)> {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let forwarded: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded = (!forwarded.is_empty()).then(|| forwarded.join(","));
    let public = Caller::Public(state.limits.client_ip(peer, forwarded.as_deref()));
    let auth = req.headers().get(header::AUTHORIZATION);
    if let Some(value) = auth {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                (
                    public.clone(),
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        code::VALIDATION_FAILED,
                        "invalid_api_key",
                        "Authorization must be `Bearer <API key>` (blyan keys api-key)",
                    ),
                )
            })?;
        if state.limits.is_unlimited_token(token) {
            return Ok((Caller::Unlimited, None));
        }
        // API-KEY-3: an API key, checked against this node's chain state.
        if token.starts_with(blyan_state_machine::allowance::API_KEY_PREFIX)
            || state.registry.token_owner(token).is_none()
        {
            let snap = snapshot(&state.node);
            return match crate::billing::check_key(
                &snap.ledger,
                &state.node.chain_id,
                &state.node.address,
                token,
            ) {
                // API-RATE-1: the authenticated tier belongs to valid keys
                // with funds; an exhausted key counts as public.
                Ok(payer) if payer.available > 0 => Ok((Caller::Token(payer.key_id), Some(payer))),
                Ok(payer) => Ok((public, Some(payer))),
                Err(refusal) => Err((
                    public,
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        code::VALIDATION_FAILED,
                        "invalid_api_key",
                        refusal.to_string(),
                    ),
                )),
            };
        }
        // A token from POST /p2p/register identifies a registered node but
        // no longer raises its limit (API-RATE-1): counted by address.
        return Ok((public, None));
    }
    Ok((public, None))
}

/// The middleware in front of every route: rate limits (API-RATE-*) and the
/// latency histogram.
async fn limit_and_measure(
    State(state): State<ApiState>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    // API-UI-1: the explorer's page and assets are constant bytes.
    let path = req.uri().path();
    let exempt = matches!(path, "/health" | "/metrics" | "/") || path.starts_with("/ui/");
    if !exempt {
        // API-RATE-5: a bad token is counted against the address first.
        let (c, payer, unauthorized) = match caller(&state, &req) {
            Ok((c, p)) => (c, p, None),
            Err((c, e)) => (c, None, Some(e)),
        };
        // Handlers find the checked key in the request's extensions.
        let mut req = req;
        if let Some(p) = payer {
            req.extensions_mut().insert(p);
        }
        let openai = req.uri().path().starts_with("/v1/");
        let refusal = match state.limits.check(&c) {
            Ok(()) => unauthorized.map(IntoResponse::into_response),
            Err(Refusal::Limited { retry_after }) => {
                state.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                let secs = retry_after.as_millis().div_ceil(1000).max(1);
                let mut r = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        code::VALIDATION_FAILED,
                        "rate_limited",
                        format!("rate limit reached; retry in {secs} s (an API key with funds raises the limit)"),
                    )
                    .into_response();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from(secs as u64));
                Some(r)
            }
            Err(Refusal::Saturated) => {
                state.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                Some(ApiError::offline("too many clients are tracked; retry later").into_response())
            }
        };
        if let Some(r) = refusal {
            state.metrics.observe(start.elapsed());
            return if openai { openai_error(r).await } else { r };
        }
        let response = next.run(req).await;
        state.metrics.observe(start.elapsed());
        return if openai {
            openai_error(response).await
        } else {
            response
        };
    }
    let response = next.run(req).await;
    state.metrics.observe(start.elapsed());
    response
}

/// Largest error body [`openai_error`] rewrites.
const MAX_ERROR_BODY_BYTES: usize = 1024 * 1024;

/// API-KEY-6: on `/v1/*` an error answer takes OpenAI's shape,
/// `{"error": {"message", "type", "code"}}`, so OpenAI SDKs raise their
/// usual exceptions; `code` is the seed shape's `reason`.
async fn openai_error(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_ERROR_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            let body = json!({ "error": {
                "message": format!("error body unreadable: {e}"),
                "type": "server_error", "code": "internal_error", "param": null,
            }});
            return (status, axum::Json(body)).into_response();
        }
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let kind = match status.as_u16() {
        401 => "authentication_error",
        402 => "insufficient_quota",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    let body = json!({ "error": {
        "message": v["message"].as_str().unwrap_or_default(),
        "type": kind,
        "code": v["reason"].as_str().unwrap_or_default(),
        "param": null,
    }});
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut r = (status, axum::Json(body)).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE {
            r.headers_mut().insert(k.clone(), v.clone());
        }
    }
    r
}

pub(crate) fn snapshot(node: &NodeHandle) -> Arc<Snapshot> {
    node.snapshot.borrow().clone()
}

pub(crate) fn hex0x(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// A `0x` + 40-hex address; `400` naming `what` otherwise.
pub(crate) fn parse_address(s: &str, what: &str) -> Result<Address, ApiError> {
    s.parse()
        .map_err(|e: blyan_state_machine::types::AddressParseError| {
            ApiError::bad_request(format!("{what}: {e}"))
        })
}

pub(crate) fn parse_hash(s: &str) -> Result<Hash32, ApiError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
        .map_err(|_| ApiError::bad_request(format!("{s:?} is not a 32-byte hex id")))?;
    Ok(out)
}

/// The body, or `413`/`400` if it could not be read.
pub(crate) fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                r.status(),
                code::VALIDATION_FAILED,
                "body_too_large",
                r.body_text(),
            )
        } else {
            ApiError::bad_request(r.body_text())
        }
    })
}

/// A JSON body of type `T`, with `what` (the expected shape) in the error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    what: &str,
) -> Result<T, ApiError> {
    let body = read_body(body)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("body must be JSON {what}: {e}")))
}

/// Decodes `0x<hex of the canonical SignedTx>`.
pub(crate) fn decode_tx(hex_tx: &str) -> Result<SignedTx, ApiError> {
    let bytes = hex::decode(hex_tx.trim_start_matches("0x"))
        .map_err(|e| ApiError::bad_request(format!("tx is not hex: {e}")))?;
    SignedTx::decode(&bytes)
        .map_err(|e| ApiError::bad_request(format!("tx is not a canonical SignedTx: {e}")))
}

/// Hands `tx` to the node and waits for the mempool's verdict.
pub(crate) async fn submit(node: &NodeHandle, tx: SignedTx) -> Result<Hash32, ApiError> {
    use tracing::Instrument;
    // OPS-TRACE-3: the transaction path's first span.
    let span = tracing::info_span!("tx.submit", tx = %hex::encode(&tx.id()[..8]));
    submit_in_span(node, tx).instrument(span).await
}

async fn submit_in_span(node: &NodeHandle, tx: SignedTx) -> Result<Hash32, ApiError> {
    let (reply, verdict) = oneshot::channel();
    node.requests
        .try_send(Request::SubmitTx {
            tx: Box::new(tx),
            reply,
            trace: crate::telemetry::TraceLink::current(),
        })
        .map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::offline("node is busy; retry later"),
            mpsc::error::TrySendError::Closed(_) => ApiError::offline("node has stopped"),
        })?;
    match tokio::time::timeout(Duration::from_millis(SUBMIT_TIMEOUT_MS), verdict).await {
        Ok(Ok(Ok(id))) => Ok(id),
        Ok(Ok(Err(e))) => Err(mempool_error(&e)),
        Ok(Err(_)) => Err(ApiError::offline("node stopped before answering")),
        Err(_) => Err(ApiError::offline("node did not answer in time")),
    }
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubmitBody {
    /// `0x` and the hex of the canonical `SignedTx` bytes.
    tx: String,
}

/// Submit a signed transaction to the mempool.
#[utoipa::path(post, path = "/tx", request_body = SubmitBody,
    responses((status = 200, description = "admitted: `{\"id\": \"0x…\"}`", body = Object),
              (status = 400, body = openapi::ErrorBody), (status = 409, body = openapi::ErrorBody),
              (status = 413, body = openapi::ErrorBody), (status = 422, body = openapi::ErrorBody),
              (status = 429, body = openapi::ErrorBody), (status = 503, body = openapi::ErrorBody)))]
pub(crate) async fn submit_tx(
    State(node): State<NodeHandle>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let req: SubmitBody = parse_json(body, "{\"tx\": \"0x<hex of the canonical SignedTx>\"}")?;
    let tx = decode_tx(&req.tx)?;
    let id = submit(&node, tx).await?;
    Ok(axum::Json(json!({ "id": hex0x(&id) })).into_response())
}

/// A committed transaction's receipt (`status: committed`); `410` with
/// `status: dropped` and the reason if this node dropped it from its pool
/// unincluded (NODE-MP-8); `404` otherwise (unknown, or still pending).
#[utoipa::path(get, path = "/tx/{id}", params(("id" = String, Path, description = "0x-hex transaction id")),
    responses((status = 200, body = Object), (status = 410, body = Object), (status = 404, body = openapi::ErrorBody), (status = 400, body = openapi::ErrorBody), (status = 429, body = openapi::ErrorBody)))]
pub(crate) async fn get_tx(State(node): State<NodeHandle>, Path(id): Path<String>) -> ApiResult {
    let id = parse_hash(&id)?;
    let loc = node
        .reader
        .tx(&id)
        .map_err(|e| ApiError::offline(e.to_string()))?;
    let Some(loc) = loc else {
        // NODE-MP-8: dropped from this node's pool unincluded.
        if let Some(reason) = node
            .dropped
            .lock()
            .expect("dropped lock")
            .reason(&id)
            .map(str::to_string)
        {
            return Ok((
                StatusCode::GONE,
                axum::Json(json!({
                    "id": hex0x(&id),
                    "status": "dropped",
                    "code": code::VALIDATION_FAILED,
                    "reason": "tx_dropped",
                    "message": reason,
                })),
            )
                .into_response());
        }
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            code::VALIDATION_FAILED,
            "tx_not_found",
            "no committed transaction with this id (it may still be pending)",
        ));
    };
    let r = &loc.receipt;
    Ok(axum::Json(json!({
        "id": hex0x(&id),
        "status": "committed",
        "height": loc.height,
        "index": loc.index,
        "sender": r.sender,
        "gas_used": r.gas_used,
        "fee_paid": r.fee_paid.to_string(),
        "success": r.failure.is_none(),
        "failure": r.failure,
    }))
    .into_response())
}

/// An account's balance, nonce and stake.
#[utoipa::path(get, path = "/account/{address}", params(("address" = String, Path, description = "0x and 40 hex digits")),
    responses((status = 200, body = Object), (status = 400, body = openapi::ErrorBody), (status = 429, body = openapi::ErrorBody)))]
pub(crate) async fn get_account(
    State(node): State<NodeHandle>,
    Path(address): Path<String>,
) -> ApiResult {
    let address = parse_address(&address, "address")?;
    let snap = snapshot(&node);
    let account = snap.ledger.account(&address);
    let stake = snap.ledger.validator(&address).map_or(0, |v| v.bonded);
    // RWD-5: what the address has claimed in the current reward epoch, per
    // pool (paid at the epoch's end; signing and attestation are weights).
    let claims: serde_json::Map<String, Value> = blyan_state_machine::rewards::RewardPool::ALL
        .into_iter()
        .map(|p| {
            (
                format!("{p:?}").to_lowercase(),
                Value::String(snap.ledger.rewards().claim(p, &address).to_string()),
            )
        })
        .collect();
    Ok(axum::Json(json!({
        "address": address,
        "balance": account.balance.to_string(),
        "nonce": account.nonce,
        "stake": stake.to_string(),
        "reward_claims": claims,
        "height": snap.height(),
    }))
    .into_response())
}

/// The JSON view of a committed block.
pub fn block_json(c: &CommittedBlock) -> Value {
    let Block { header: h, body } = &c.block;
    json!({
        "height": h.height,
        "hash": hex0x(&c.block.hash()),
        "prev_hash": hex0x(&h.prev_hash),
        "time_ms": h.time_ms,
        "proposer": h.proposer,
        "base_fee_per_gas": h.base_fee_per_gas.to_string(),
        "gas_limit": h.gas_limit,
        "gas_used": h.gas_used,
        "state_root": hex0x(&h.state_root),
        "receipts_hash": hex0x(&h.receipts_hash),
        "txs": body.txs.iter().map(|t| hex0x(&t.id())).collect::<Vec<_>>(),
        "evidence": body.evidence.len(),
        "certificate": {
            "round": c.certificate.round,
            "signers": c.certificate.signers(),
        },
    })
}

/// The latest committed block.
#[utoipa::path(get, path = "/block/latest", responses((status = 200, body = Object), (status = 404, body = openapi::ErrorBody)))]
pub(crate) async fn get_latest_block(State(node): State<NodeHandle>) -> ApiResult {
    match snapshot(&node).latest.as_deref() {
        Some(b) => Ok(axum::Json(block_json(b)).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            code::INVALID_BLOCK,
            "block_not_found",
            "no block committed yet",
        )),
    }
}

/// The committed block at a height (decimal) or with a hash (64 hex digits,
/// `0x` optional).
#[utoipa::path(get, path = "/block/{id}", params(("id" = String, Path, description = "a height or a block hash")),
    responses((status = 200, body = Object), (status = 404, body = openapi::ErrorBody), (status = 400, body = openapi::ErrorBody), (status = 429, body = openapi::ErrorBody)))]
pub(crate) async fn get_block(State(node): State<NodeHandle>, Path(id): Path<String>) -> ApiResult {
    let height: u64 = match parse_block_hash(&id) {
        Some(hash) => node
            .reader
            .height_of(&hash)
            .map_err(|e| ApiError::offline(e.to_string()))?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    code::INVALID_BLOCK,
                    "block_not_found",
                    format!("no committed block with hash {id}"),
                )
            })?,
        None => id.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "{id:?} is neither a height (a decimal number) nor a block hash (64 hex digits, 0x optional)"
            ))
        })?,
    };
    match node
        .reader
        .block(height)
        .map_err(|e| ApiError::offline(e.to_string()))?
    {
        Some(b) => Ok(axum::Json(block_json(&b)).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            code::INVALID_BLOCK,
            "block_not_found",
            format!("no committed block at height {height}"),
        )),
    }
}

/// A block hash in `GET /block/{id}`: 64 hex digits, `0x` optional.
fn parse_block_hash(id: &str) -> Option<Hash32> {
    let hex_digits = id.strip_prefix("0x").unwrap_or(id);
    if hex_digits.len() != 64 {
        return None;
    }
    hex::decode(hex_digits).ok()?.try_into().ok()
}

/// The chain parameters.
#[utoipa::path(get, path = "/params", responses((status = 200, body = Object)))]
pub(crate) async fn get_params(State(node): State<NodeHandle>) -> ApiResult {
    Ok(axum::Json(snapshot(&node).ledger.params().clone()).into_response())
}

fn halted(node: &NodeHandle, snap: &Snapshot) -> Option<String> {
    if node.snapshot.has_changed().is_err() {
        return Some("node task has stopped".into());
    }
    snap.halted.clone()
}

/// The inference engine's state for `/health` (API-CHAT-5): `disabled`
/// when this node serves no inference, else `ok`, `rebuilding` or `failed`.
fn inference_state(state: &ApiState) -> &'static str {
    state
        .inference
        .as_ref()
        .map_or("disabled", |e| e.stats.state().as_str())
}

/// Liveness: 200 `{"status": "ok", "height", "inference"}` while the node
/// runs and its inference engine (if any) can serve; 503 once the node
/// halted, or while the engine is `rebuilding` or `failed` after a panic
/// (API-CHAT-5).
#[utoipa::path(get, path = "/health", responses((status = 200, body = Object), (status = 503, body = openapi::ErrorBody)))]
pub(crate) async fn get_health(State(state): State<ApiState>) -> ApiResult {
    let node = &state.node;
    let snap = snapshot(node);
    if let Some(why) = halted(node, &snap) {
        return Err(ApiError::offline(format!("node halted: {why}")));
    }
    match inference_state(&state) {
        s @ ("ok" | "disabled") => Ok(axum::Json(
            json!({ "status": "ok", "height": snap.height(), "inference": s }),
        )
        .into_response()),
        s => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::NODE_OFFLINE,
            "inference_unavailable",
            format!("the inference engine is {s} after a panic (see /metrics blyan_inference_*)"),
        )),
    }
}

/// Height, round, peers, mempool size, next base fee.
#[utoipa::path(get, path = "/status", responses((status = 200, body = Object)))]
pub(crate) async fn get_status(State(node): State<NodeHandle>) -> ApiResult {
    let snap = snapshot(&node);
    Ok(axum::Json(json!({
        "chain_id": node.chain_id,
        "address": node.address,
        "height": snap.height(),
        "round": snap.round,
        "validator": snap.is_validator,
        "peers_connected": snap.peers_connected,
        "mempool_txs": snap.mempool_txs,
        "committed_txs": snap.committed_txs,
        "state_root": hex0x(&snap.ledger.state_root()),
        "last_block_hash": hex0x(&snap.ledger.last_block_hash()),
        "next_base_fee_per_gas": snap.ledger.next_block_base_fee().to_string(),
        "halted": halted(&node, &snap),
    }))
    .into_response())
}

/// Prometheus text exposition (format 0.0.4).
pub fn metrics_text(snap: &Snapshot, halted: bool) -> String {
    let mut s = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    gauge(
        "blyan_height",
        "Height of the last committed block.",
        "gauge",
        snap.height(),
    );
    gauge(
        "blyan_round",
        "Consensus round of the height in progress.",
        "gauge",
        snap.round.unwrap_or(0) as u64,
    );
    gauge(
        "blyan_mempool_txs",
        "Transactions in the mempool.",
        "gauge",
        snap.mempool_txs as u64,
    );
    gauge(
        "blyan_peers_connected",
        "Peers with an open outgoing connection.",
        "gauge",
        snap.peers_connected as u64,
    );
    gauge(
        "blyan_committed_txs_total",
        "Transactions committed since start.",
        "counter",
        snap.committed_txs,
    );
    gauge(
        "blyan_halted",
        "1 once the node halted on a store error.",
        "gauge",
        halted as u64,
    );
    let f = &snap.finality;
    let name = "blyan_tx_finality_ms";
    let _ = writeln!(
        s,
        "# HELP {name} Time from mempool admission to commit of client transactions, in ms.\n# TYPE {name} histogram"
    );
    for (le, count) in FINALITY_BUCKETS_MS.iter().zip(f.buckets) {
        let _ = writeln!(s, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {}", f.count);
    let _ = writeln!(s, "{name}_sum {}\n{name}_count {}", f.sum_ms, f.count);
    s
}

/// The API's own metrics, appended to [`metrics_text`].
pub fn api_metrics_text(m: &ApiMetrics) -> String {
    let mut s = String::new();
    let name = "blyan_api_request_duration_ms";
    let _ = writeln!(
        s,
        "# HELP {name} HTTP API request latency, in ms.\n# TYPE {name} histogram"
    );
    for (le, b) in API_LATENCY_BUCKETS_MS.iter().zip(&m.buckets) {
        let _ = writeln!(
            s,
            "{name}_bucket{{le=\"{le}\"}} {}",
            b.load(Ordering::Relaxed)
        );
    }
    let count = m.count.load(Ordering::Relaxed);
    let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let sum_ms = m.sum_us.load(Ordering::Relaxed) as f64 / 1000.0;
    let _ = writeln!(s, "{name}_sum {sum_ms}\n{name}_count {count}");
    let name = "blyan_api_rate_limited_total";
    let _ = writeln!(
        s,
        "# HELP {name} Requests refused by the rate limits.\n# TYPE {name} counter\n{name} {}",
        m.rate_limited.load(Ordering::Relaxed)
    );
    s
}

/// The inference engine's counters (API-CHAT-4/5), appended to [`metrics_text`].
pub fn inference_metrics_text(stats: &crate::inference::EngineStats) -> String {
    let c = stats.counters();
    let mut s = String::new();
    let mut one = |name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    one(
        "blyan_inference_panics_total",
        "Inference jobs that panicked (each answered 500; the engine is rebuilt).",
        "counter",
        c.panics,
    );
    one(
        "blyan_inference_engine_rebuilds_total",
        "Inference engines rebuilt after a panic.",
        "counter",
        c.rebuilds,
    );
    one(
        "blyan_inference_engine_rebuild_failures_total",
        "Inference engine rebuilds that failed.",
        "counter",
        c.rebuild_failures,
    );
    one(
        "blyan_inference_engine_up",
        "1 while the inference engine can serve, 0 while it rebuilds or after a failed rebuild.",
        "gauge",
        (stats.state() == crate::inference::EngineState::Ok) as u64,
    );
    one(
        "blyan_inference_expired_in_queue_total",
        "Inference jobs dropped unrun after waiting past the inference timeout.",
        "counter",
        c.expired_in_queue,
    );
    let name = "blyan_inference_cancelled_total";
    let _ = writeln!(
        s,
        "# HELP {name} Inference jobs cancelled at a token: the reader stalled, the client went away, or the deadline passed.\n# TYPE {name} counter"
    );
    for (reason, v) in [
        ("stalled", c.cancelled_stalled),
        ("disconnected", c.cancelled_disconnected),
        ("deadline", c.cancelled_deadline),
    ] {
        let _ = writeln!(s, "{name}{{reason=\"{reason}\"}} {v}");
    }
    s
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
pub(crate) async fn get_metrics(
    State(state): State<ApiState>,
    http: Option<axum::Extension<Arc<crate::http_server::HttpStats>>>,
) -> Response {
    let snap = snapshot(&state.node);
    let halted = halted(&state.node, &snap).is_some();
    let mut text = metrics_text(&snap, halted);
    text.push_str(&api_metrics_text(&state.metrics));
    // OPS-MET-*: chain, PoL and disk series, and the engine's load.
    state.node.chain_metrics.render(&mut text, &snap.ledger);
    if let Some(engine) = &state.inference {
        text.push_str(&inference_metrics_text(&engine.stats));
        engine.render_metrics(&mut text);
    }
    if let Some(usage) = &state.usage {
        text.push_str(&usage.metrics_text());
    }
    if let Some(axum::Extension(http)) = http {
        text.push_str(&http.metrics_text());
    }
    if let Some(net) = &state.node.net {
        text.push_str(&net.metrics_text());
    }
    routing_metrics_text(&state, &mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// RT-HB-12, RT-STAGE-*: the live-node table and where requests were served.
fn routing_metrics_text(state: &ApiState, text: &mut String) {
    use std::fmt::Write as _;
    if let Some(h) = &state.heartbeats {
        let (live, bytes) = h.size(crate::transport::now_ms());
        let (accepted, refused) = h.counts();
        let _ = write!(
            text,
            "# HELP blyan_inference_nodes_live Inference nodes with a live heartbeat here (RT-HB-7).\n# TYPE blyan_inference_nodes_live gauge\nblyan_inference_nodes_live {live}\n\
             # HELP blyan_inference_heartbeat_table_bytes Bytes the heartbeat table holds (RT-HB-8).\n# TYPE blyan_inference_heartbeat_table_bytes gauge\nblyan_inference_heartbeat_table_bytes {bytes}\n\
             # HELP blyan_inference_heartbeats_total Heartbeats received, by result.\n# TYPE blyan_inference_heartbeats_total counter\n\
             blyan_inference_heartbeats_total{{result=\"accepted\"}} {accepted}\nblyan_inference_heartbeats_total{{result=\"refused\"}} {refused}\n"
        );
    }
    if let Some(r) = &state.router {
        let (local, remote, failovers) = r.counts();
        let _ = write!(
            text,
            "# HELP blyan_inference_routed_total Chat requests served, by where (RT-STAGE-2).\n# TYPE blyan_inference_routed_total counter\n\
             blyan_inference_routed_total{{served=\"local\"}} {local}\nblyan_inference_routed_total{{served=\"remote\"}} {remote}\n\
             # HELP blyan_inference_failovers_total Routed stages that failed and were replaced (RT-STAGE-4).\n# TYPE blyan_inference_failovers_total counter\n\
             blyan_inference_failovers_total {failovers}\n"
        );
        let _ = writeln!(
            text,
            "# HELP blyan_inference_spot_checks_total Routed answers recomputed by another holder, by outcome (RT-STAGE-6).\n# TYPE blyan_inference_spot_checks_total counter"
        );
        for (label, n) in crate::router::SPOT_OUTCOMES.iter().zip(r.spot_counts()) {
            let _ = writeln!(
                text,
                "blyan_inference_spot_checks_total{{outcome=\"{label}\"}} {n}"
            );
        }
        let _ = writeln!(
            text,
            "# HELP blyan_inference_beacons_total Requests this router made up and checked, by outcome (RT-BEACON-4).\n# TYPE blyan_inference_beacons_total counter"
        );
        for (label, n) in crate::router::BEACON_OUTCOMES.iter().zip(r.beacon_counts()) {
            let _ = writeln!(
                text,
                "blyan_inference_beacons_total{{outcome=\"{label}\"}} {n}"
            );
        }
        let _ = writeln!(
            text,
            "# HELP blyan_inference_pipeline_stage_ms Time of each hop of the pipelines that produced an answer, by hop index, ms (RT-PIPE-3).\n# TYPE blyan_inference_pipeline_stage_ms histogram"
        );
        for (i, h) in r.pipeline_stage_ms.iter().enumerate() {
            h.render_series(
                text,
                "blyan_inference_pipeline_stage_ms",
                &format!("stage=\"{i}\""),
            );
        }
        r.remote_stage_ms.render(
            text,
            "blyan_inference_remote_stage_ms",
            "Time of routed stages on other nodes that produced an answer, ms (RT-STAGE-7).",
        );
        let (pipelines, bytes) = r.pipeline_counts();
        let _ = write!(
            text,
            "# HELP blyan_inference_pipelines_total Chat requests served by a pipeline of several stages (RT-PIPE-3).\n# TYPE blyan_inference_pipelines_total counter\nblyan_inference_pipelines_total {pipelines}\n\
             # HELP blyan_inference_stage_bytes_total Tensor bytes this router sent to and received from remote pipeline stages (RT-PIPE-1).\n# TYPE blyan_inference_stage_bytes_total counter\nblyan_inference_stage_bytes_total {bytes}\n"
        );
    }
}
