//! `POST /mine` and the PoL read routes.
//!
//! - **API-MINE-1** The seed's `/mine` carries a block's data and its
//!   miner's claim. On this chain a PoL block enters the DAG only through a
//!   signed transaction (`Pol(RegisterBlock)` for weights and datasets,
//!   `Pol(RevealDelta)` for a weight update after its commitment, POL-15/21),
//!   so `/mine` takes that transaction plus the payload: `{"tx": "0x…",
//!   "block_data": "0x<hex payload>", "candidate_loss": 1.23}`. The node
//!   checks the payload against the block it registers (size, SHA3-256
//!   Merkle root POL-3, CIDv1 POL-4), submits the transaction, and once the
//!   mempool admitted it keeps the payload in its blob store (synced to
//!   disk) so peers and validators can fetch it (API-MINE-3). Any mismatch
//!   is `400` and nothing is stored or submitted.
//! - **API-MINE-2** The answer is `{block_hash, tx_id, status: "pending",
//!   reward_bly: 0}`: a delta's reward is known only after validators
//!   re-evaluate it (POL-31..35); `candidate_loss` is the miner's claim and
//!   is echoed, never trusted.
//! - **API-MINE-3** Admission before storage: the payload is written only
//!   after the mempool admitted the transaction (signature, nonce, fee,
//!   NODE-MP-*); a refused transaction stores nothing. A transaction the
//!   pool already holds (`duplicate`) is admitted, so an interrupted
//!   `/mine` can be retried. The payload is stored *pending* (NODE-NET-10):
//!   pending payloads total at most [`MineConfig::pending_quota_bytes`] (and
//!   [`crate::blobs::MAX_PENDING_BLOBS`]), checked before the transaction is
//!   submitted (`507 blob_quota_exceeded`), and each `/mine` first collects
//!   the garbage: a pending payload whose PoL block entered the DAG is kept
//!   for good; one whose block did not within [`MineConfig::pending_ttl_ms`]
//!   is deleted.

use super::{
    ApiError, ApiResult, ApiState, code, decode_tx, hex0x, parse_hash, parse_json, snapshot, submit,
};
use super::{Path, Query};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use blyan_state_machine::pol::{
    ExpertRecord, PolBlock, PolTx, cid_v1_raw_sha256, payload_merkle_root,
};
use blyan_state_machine::tx::TxKind;
use serde_json::{Value, json};

/// Most PoL blocks one `GET /pol/blocks` page returns.
pub const MAX_PAGE: usize = 100;

/// `/mine` settings (API-MINE-3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MineConfig {
    /// Most bytes of payloads whose transactions have not committed.
    pub pending_quota_bytes: u64,
    /// How long a payload waits for its transaction to commit.
    pub pending_ttl_ms: u64,
}

impl Default for MineConfig {
    fn default() -> Self {
        MineConfig {
            pending_quota_bytes: 1024 * 1024 * 1024,
            pending_ttl_ms: 60 * 60 * 1000,
        }
    }
}

fn blob_error(e: crate::Error) -> ApiError {
    match e {
        crate::Error::BlobQuotaExceeded(m) => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            code::NODE_OFFLINE,
            "blob_quota_exceeded",
            m,
        ),
        other => ApiError::offline(format!("could not store the payload: {other}")),
    }
}

/// `/mine` request.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MineBody {
    /// A signed `Pol(RegisterBlock)` or `Pol(RevealDelta)` transaction.
    pub tx: String,
    /// `0x` and the hex of the block's payload.
    pub block_data: String,
    /// The miner's claimed validation loss (informational only).
    #[serde(default)]
    pub candidate_loss: Option<f64>,
}

/// `/mine` answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MineAnswer {
    /// The PoL block id (POL-2).
    pub block_hash: String,
    pub tx_id: String,
    /// Always `pending`: inclusion and evaluation happen on chain.
    pub status: String,
    /// 0 until validators accept the block (API-MINE-2).
    pub reward_bly: f64,
    pub candidate_loss: Option<f64>,
    pub payload_bytes: u64,
    pub payload_cid: String,
    /// The payload's id in this node's blob store (NODE-NET-8: SHA3-256 of
    /// its manifest), which peers fetch it by; `None` if the node keeps no blobs.
    pub blob_id: Option<String>,
}

/// API-MINE-1: the payload must be exactly the one the block commits to.
pub fn check_payload(block: &PolBlock, payload: &[u8]) -> Result<(), String> {
    if payload.len() as u64 != block.payload_size_bytes {
        return Err(format!(
            "block_data is {} bytes; the block says payload_size_bytes = {}",
            payload.len(),
            block.payload_size_bytes
        ));
    }
    if payload_merkle_root(payload) != block.payload_merkle_root {
        return Err("block_data does not match the block's payload_merkle_root (POL-3)".into());
    }
    let cid = cid_v1_raw_sha256(payload);
    if cid != block.payload_cid {
        return Err(format!(
            "block_data has CID {cid}; the block says {} (POL-4)",
            block.payload_cid
        ));
    }
    Ok(())
}

/// Submit a PoL block's payload with its signed registering transaction.
#[utoipa::path(post, path = "/mine", request_body = MineBody,
    responses((status = 200, body = MineAnswer), (status = 400, body = super::openapi::ErrorBody),
              (status = 409, body = super::openapi::ErrorBody), (status = 413, body = super::openapi::ErrorBody),
              (status = 422, body = super::openapi::ErrorBody), (status = 429, body = super::openapi::ErrorBody),
              (status = 503, body = super::openapi::ErrorBody), (status = 507, body = super::openapi::ErrorBody)))]
pub async fn mine(State(state): State<ApiState>, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let b: MineBody = parse_json(
        body,
        r#"{"tx": "0x<signed Pol(RegisterBlock|RevealDelta)>", "block_data": "0x<payload hex>"}"#,
    )?;
    if let Some(loss) = b.candidate_loss
        && !(loss.is_finite() && loss >= 0.0)
    {
        return Err(ApiError::bad_request(format!(
            "candidate_loss must be a finite non-negative number, not {loss}"
        )));
    }
    let tx = decode_tx(&b.tx)?;
    let block = match &tx.body.kind {
        TxKind::Pol(p) => match p.as_ref() {
            PolTx::RegisterBlock(block) | PolTx::RevealDelta(block) => block.clone(),
            _ => None.ok_or_else(|| {
                ApiError::bad_request("tx must be Pol(RegisterBlock) or Pol(RevealDelta)")
            })?,
        },
        _ => {
            return Err(ApiError::bad_request(
                "tx must be Pol(RegisterBlock) or Pol(RevealDelta)",
            ));
        }
    };
    let payload = hex::decode(b.block_data.trim_start_matches("0x"))
        .map_err(|e| ApiError::bad_request(format!("block_data is not hex: {e}")))?;
    check_payload(&block, &payload).map_err(ApiError::bad_request)?;
    let task_failed =
        |e: tokio::task::JoinError| ApiError::offline(format!("blob store task failed: {e}"));
    let quota = state.mine.pending_quota_bytes;
    // API-MINE-3: collect the garbage, then check there is room, before
    // the transaction is submitted.
    if let Some(blobs) = &state.blobs {
        let (blobs, snap) = (blobs.clone(), snapshot(&state.node));
        let now_ms = crate::transport::now_ms();
        let size = payload.len() as u64;
        tokio::task::spawn_blocking(move || {
            blobs.collect_garbage(now_ms, |b| snap.ledger.pol().block(b).is_some())?;
            blobs.check_pending_room(size, quota)
        })
        .await
        .map_err(task_failed)?
        .map_err(blob_error)?;
    }
    // API-MINE-3: admitted (or already held) before anything is stored.
    let tx_id = tx.id();
    match submit(&state.node, tx).await {
        Ok(_) => {}
        Err(e) if e.reason == "duplicate" => {}
        Err(e) => return Err(e),
    }
    let blob_id = match &state.blobs {
        Some(blobs) => {
            let blobs = blobs.clone();
            let pending = crate::blobs::Pending {
                pol_block: block.id(),
                expires_at_ms: crate::transport::now_ms().saturating_add(state.mine.pending_ttl_ms),
            };
            let id =
                tokio::task::spawn_blocking(move || blobs.put_pending(&payload, pending, quota))
                    .await
                    .map_err(task_failed)?
                    .map_err(blob_error)?;
            Some(id.to_string())
        }
        None => None,
    };
    Ok(axum::Json(MineAnswer {
        block_hash: hex0x(&block.id()),
        tx_id: hex0x(&tx_id),
        status: "pending".into(),
        reward_bly: 0.0,
        candidate_loss: b.candidate_loss,
        payload_bytes: block.payload_size_bytes,
        payload_cid: block.payload_cid,
        blob_id,
    })
    .into_response())
}

/// `?after=<id>&limit=<n>` for paging through the DAG in id order.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// Return blocks with ids greater than this one.
    pub after: Option<String>,
    /// At most this many (1..=100, default 100).
    pub limit: Option<usize>,
}

fn block_json(id: &[u8; 32], b: &PolBlock) -> Value {
    let mut v = serde_json::to_value(b).expect("PolBlock serialises");
    v["id"] = json!(hex0x(id));
    v
}

/// PoL blocks in id order, a page at a time.
#[utoipa::path(get, path = "/pol/blocks", params(Page),
    responses((status = 200, body = Object), (status = 400, body = super::openapi::ErrorBody)))]
pub async fn list_blocks(State(state): State<ApiState>, Query(page): Query<Page>) -> ApiResult {
    let limit = page.limit.unwrap_or(MAX_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let after = page.after.as_deref().map(parse_hash).transpose()?;
    let snap = snapshot(&state.node);
    let pol = snap.ledger.pol();
    let blocks: Vec<Value> = pol
        .blocks()
        .filter(|(id, _)| after.is_none_or(|a| **id > a))
        .take(limit)
        .map(|(id, b)| block_json(id, b))
        .collect();
    Ok(axum::Json(json!({
        "total": pol.block_count(),
        "blocks": blocks,
        "height": snap.height(),
    }))
    .into_response())
}

/// One PoL block by id.
#[utoipa::path(get, path = "/pol/blocks/{id}", params(("id" = String, Path, description = "0x-hex block id")),
    responses((status = 200, body = Object), (status = 404, body = super::openapi::ErrorBody)))]
pub async fn get_block(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let id = parse_hash(&id)?;
    let snap = snapshot(&state.node);
    match snap.ledger.pol().block(&id) {
        Some(b) => Ok(axum::Json(block_json(&id, b)).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            code::INVALID_BLOCK,
            "pol_block_not_found",
            "no PoL block with this id",
        )),
    }
}

fn expert_json(r: &ExpertRecord) -> Value {
    json!({
        "model_id": hex0x(&r.target.model_id),
        "kind": r.target.kind,
        "layer": r.target.layer,
        "expert": r.target.expert,
        "version": r.version,
        "block_hash": hex0x(&r.block_hash),
        "weight_cid": r.weight_cid,
        "size_bytes": r.size_bytes,
        "quality_score_ppm": r.quality_score_ppm,
        "usage_count": r.usage_count,
        "last_updated": r.last_updated,
        "node_assignments": r.node_assignments,
    })
}

/// The expert registry (POL-16): one record per layer, expert and router.
#[utoipa::path(get, path = "/pol/experts", responses((status = 200, body = Object)))]
pub async fn experts(State(state): State<ApiState>) -> ApiResult {
    let snap = snapshot(&state.node);
    let records: Vec<Value> = snap.ledger.pol().records().map(expert_json).collect();
    Ok(axum::Json(json!({ "experts": records, "height": snap.height() })).into_response())
}

/// API-POL-1: the largest payload `GET /pol/blocks/{id}/payload` serves
/// (larger ones travel only between peers, chunk by chunk).
pub const MAX_HTTP_PAYLOAD_BYTES: u64 = 256 << 20;

fn not_found(reason: &'static str, message: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        code::INVALID_BLOCK,
        reason,
        message.to_string(),
    )
}

/// API-POL-1: the payload of a PoL block in the DAG or of a pending delta,
/// from this node's blob store, as `application/octet-stream`. The client
/// checks it against the block's `payload_merkle_root` (POL-3) and CID.
#[utoipa::path(get, path = "/pol/blocks/{id}/payload", params(("id" = String, Path, description = "0x-hex block id (or pending delta id)")),
    responses((status = 200, description = "the payload bytes", content_type = "application/octet-stream"),
              (status = 404, body = super::openapi::ErrorBody), (status = 413, body = super::openapi::ErrorBody)))]
pub async fn get_payload(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let id = parse_hash(&id)?;
    let snap = snapshot(&state.node);
    let pol = snap.ledger.pol();
    let block = pol
        .block(&id)
        .cloned()
        .or_else(|| pol.pending_delta(&id).map(|p| p.block.clone()))
        .ok_or_else(|| {
            not_found(
                "pol_block_not_found",
                "no PoL block or pending delta with this id",
            )
        })?;
    if block.payload_size_bytes > MAX_HTTP_PAYLOAD_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::INVALID_BLOCK,
            "payload_too_large",
            format!(
                "the payload is {} bytes; this route serves at most {MAX_HTTP_PAYLOAD_BYTES} (peers fetch larger ones over P2P)",
                block.payload_size_bytes
            ),
        ));
    }
    let blobs = state
        .blobs
        .clone()
        .ok_or_else(|| not_found("payload_not_held", "this node keeps no payloads"))?;
    let root = block.payload_merkle_root;
    let bytes = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, crate::Error> {
        match blobs.by_pol_root(&root)? {
            Some(blob) => blobs.get(&blob),
            None => Ok(None),
        }
    })
    .await
    .map_err(|e| ApiError::offline(format!("blob store task failed: {e}")))?
    .map_err(|e| ApiError::offline(format!("blob store: {e}")))?
    .ok_or_else(|| not_found("payload_not_held", "this node does not hold the payload"))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

/// API-POL-2: where a delta stands. `pending`: revealed, validators commit
/// their measured losses (commit window); `attesting`: they reveal them
/// (reveal window); then the decision: `accepted`, `rejected` (not enough
/// improvement, or no quorum) or `stale` (the head moved first), with the
/// decided losses (micro-nats per token) and improvement (ppm).
#[utoipa::path(get, path = "/pol/deltas/{id}", params(("id" = String, Path, description = "0x-hex delta id")),
    responses((status = 200, body = Object), (status = 404, body = super::openapi::ErrorBody)))]
pub async fn delta_status(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    use blyan_state_machine::pol::{DeltaOutcome, RejectReason};
    let id = parse_hash(&id)?;
    let snap = snapshot(&state.node);
    let height = snap.height();
    let pol = snap.ledger.pol();
    if let Some(p) = pol.pending_delta(&id) {
        let status = if height < p.commit_end_height {
            "pending"
        } else {
            "attesting"
        };
        return Ok(axum::Json(json!({
            "delta": hex0x(&id),
            "status": status,
            "reason": null,
            "height": height,
            "revealed_height": p.revealed_height,
            "commit_end_height": p.commit_end_height,
            "reveal_end_height": p.reveal_end_height,
            "attestations_committed": p.attestations.len(),
            "attestations_revealed": p.attestations.iter().filter(|a| a.revealed.is_some()).count(),
        }))
        .into_response());
    }
    let logged = state
        .node
        .chain_metrics
        .decisions
        .lock()
        .expect("decisions lock")
        .get(&id)
        .cloned();
    if let Some((decided_height, d)) = logged {
        let (status, reason) = match &d.outcome {
            DeltaOutcome::Accepted { .. } => ("accepted", None),
            DeltaOutcome::Rejected(RejectReason::Stale) => ("stale", Some("stale")),
            DeltaOutcome::Rejected(RejectReason::NoQuorum) => ("rejected", Some("no_quorum")),
            DeltaOutcome::Rejected(RejectReason::InsufficientImprovement) => {
                ("rejected", Some("insufficient_improvement"))
            }
        };
        return Ok(axum::Json(json!({
            "delta": hex0x(&id),
            "status": status,
            "reason": reason,
            "height": height,
            "decided_height": decided_height,
            "improvement_ppm": d.improvement_ppm,
            "loss_micronats": d.agreed_loss_micronats,
            "head_loss_micronats": d.agreed_head_loss_micronats,
            "honest_attestors": d.honest_attestors.iter().map(|(a, _)| a.to_string()).collect::<Vec<_>>(),
            "target_layer": d.target.layer,
            "submitter": d.submitter.to_string(),
        }))
        .into_response());
    }
    match pol.block(&id) {
        // Decided before this process started: the DAG says accepted.
        Some(b) if b.block_type == blyan_state_machine::pol::PolBlockType::Delta => {
            Ok(axum::Json(json!({
                "delta": hex0x(&id),
                "status": "accepted",
                "reason": null,
                "height": height,
                "improvement_ppm": null,
            }))
            .into_response())
        }
        _ => Err(not_found(
            "delta_not_found",
            "no pending delta, recent decision or accepted delta with this id",
        )),
    }
}
