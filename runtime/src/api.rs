//! The HTTP API (axum). It reaches the node task only through the bounded
//! request channel and the `watch` snapshot of [`NodeHandle`], and reads
//! committed blocks and receipts through the store's read-only view.
//!
//! | route | answer |
//! |---|---|
//! | `POST /tx` | body `{"tx": "0x<hex of the canonical SignedTx bytes>"}`; `200 {"id": "0x…"}` once the mempool admitted it, else a JSON error |
//! | `GET /account/{address}` | `{address, balance, nonce, stake}` (amounts: decimal strings of base units, 1 BLY = 10^18) |
//! | `GET /block/latest`, `GET /block/{height}` | the committed block: header fields, tx ids, certificate |
//! | `GET /tx/{id}` | `{id, height, index, gas_used, fee_paid, success, failure}` once committed, else 404 |
//! | `GET /params` | the chain parameters |
//! | `GET /health` | `200 {"status": "ok"}`, or `503` once the node halted |
//! | `GET /status` | height, round, peers, mempool size, next base fee |
//! | `GET /metrics` | Prometheus text format |
//!
//! Errors are `{"code": <seed appendix A code>, "reason": "<snake_case>",
//! "message": "<readable>"}` with a 4xx/5xx status: malformed input (bad
//! JSON, hex or encoding) is `400`/5001 VALIDATION_FAILED, a body over the
//! limit (default 1 MiB) `413`/5001, a mempool rejection `422` (or `409` for
//! a duplicate)/5001, a node that is busy or halted `503`/4001 NODE_OFFLINE,
//! an unknown block `404`/1001 INVALID_BLOCK.

use crate::service::{FINALITY_BUCKETS_MS, NodeHandle, Request, Snapshot};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use blyan_state_machine::block::Block;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::node::{CommittedBlock, MempoolError};
use blyan_state_machine::tx::SignedTx;
use blyan_state_machine::types::{Address, Hash32};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
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
    fn new(
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
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            code::VALIDATION_FAILED,
            "bad_request",
            message,
        )
    }
    fn offline(message: impl Into<String>) -> Self {
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
        ReplacementUnderpriced { .. } => "replacement_underpriced",
        SenderFull(_) => "sender_full",
        Full => "mempool_full",
    };
    let status = match e {
        Duplicate(_) => StatusCode::CONFLICT,
        Full => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let code = match e {
        Full => code::NODE_OFFLINE,
        _ => code::VALIDATION_FAILED,
    };
    ApiError::new(status, code, reason, e.to_string())
}

type ApiResult = Result<Response, ApiError>;

/// The API's routes over `node`, with a request body limit of `max_body_bytes`.
pub fn router(node: NodeHandle, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/tx", post(submit_tx))
        .route("/tx/{id}", get(get_tx))
        .route("/account/{address}", get(get_account))
        .route("/block/latest", get(get_latest_block))
        .route("/block/{height}", get(get_block))
        .route("/params", get(get_params))
        .route("/health", get(get_health))
        .route("/status", get(get_status))
        .route("/metrics", get(get_metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                code::VALIDATION_FAILED,
                "no_such_route",
                "no such route",
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(node)
}

fn snapshot(node: &NodeHandle) -> Arc<Snapshot> {
    node.snapshot.borrow().clone()
}

fn hex0x(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

fn parse_hash(s: &str) -> Result<Hash32, ApiError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
        .map_err(|_| ApiError::bad_request(format!("{s:?} is not a 32-byte hex id")))?;
    Ok(out)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    tx: String,
}

async fn submit_tx(
    State(node): State<NodeHandle>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body.map_err(|r| {
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
    })?;
    let req: SubmitBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body must be JSON {{\"tx\": \"0x<hex of the canonical SignedTx>\"}}: {e}"
        ))
    })?;
    let bytes = hex::decode(req.tx.trim_start_matches("0x"))
        .map_err(|e| ApiError::bad_request(format!("tx is not hex: {e}")))?;
    let tx = SignedTx::decode(&bytes)
        .map_err(|e| ApiError::bad_request(format!("tx is not a canonical SignedTx: {e}")))?;
    let (reply, verdict) = oneshot::channel();
    node.requests
        .try_send(Request::SubmitTx {
            tx: Box::new(tx),
            reply,
        })
        .map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::offline("node is busy; retry later"),
            mpsc::error::TrySendError::Closed(_) => ApiError::offline("node has stopped"),
        })?;
    match tokio::time::timeout(Duration::from_millis(SUBMIT_TIMEOUT_MS), verdict).await {
        Ok(Ok(Ok(id))) => Ok(axum::Json(json!({ "id": hex0x(&id) })).into_response()),
        Ok(Ok(Err(e))) => Err(mempool_error(&e)),
        Ok(Err(_)) => Err(ApiError::offline("node stopped before answering")),
        Err(_) => Err(ApiError::offline("node did not answer in time")),
    }
}

async fn get_tx(State(node): State<NodeHandle>, Path(id): Path<String>) -> ApiResult {
    let id = parse_hash(&id)?;
    let loc = node
        .reader
        .tx(&id)
        .map_err(|e| ApiError::offline(e.to_string()))?;
    let Some(loc) = loc else {
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

async fn get_account(State(node): State<NodeHandle>, Path(address): Path<String>) -> ApiResult {
    let address: Address =
        address
            .parse()
            .map_err(|e: blyan_state_machine::types::AddressParseError| {
                ApiError::bad_request(e.to_string())
            })?;
    let snap = snapshot(&node);
    let account = snap.ledger.account(&address);
    let stake = snap.ledger.validator(&address).map_or(0, |v| v.bonded);
    Ok(axum::Json(json!({
        "address": address,
        "balance": account.balance.to_string(),
        "nonce": account.nonce,
        "stake": stake.to_string(),
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

async fn get_latest_block(State(node): State<NodeHandle>) -> ApiResult {
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

async fn get_block(State(node): State<NodeHandle>, Path(height): Path<String>) -> ApiResult {
    let height: u64 = height
        .parse()
        .map_err(|_| ApiError::bad_request(format!("height {height:?} is not a number")))?;
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

async fn get_params(State(node): State<NodeHandle>) -> ApiResult {
    Ok(axum::Json(snapshot(&node).ledger.params().clone()).into_response())
}

fn halted(node: &NodeHandle, snap: &Snapshot) -> Option<String> {
    if node.snapshot.has_changed().is_err() {
        return Some("node task has stopped".into());
    }
    snap.halted.clone()
}

async fn get_health(State(node): State<NodeHandle>) -> ApiResult {
    let snap = snapshot(&node);
    match halted(&node, &snap) {
        None => Ok(axum::Json(json!({ "status": "ok", "height": snap.height() })).into_response()),
        Some(why) => Err(ApiError::offline(format!("node halted: {why}"))),
    }
}

async fn get_status(State(node): State<NodeHandle>) -> ApiResult {
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

async fn get_metrics(State(node): State<NodeHandle>) -> Response {
    let snap = snapshot(&node);
    let halted = halted(&node, &snap).is_some();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics_text(&snap, halted),
    )
        .into_response()
}
