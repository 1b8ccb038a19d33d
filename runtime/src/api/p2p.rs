//! `POST /p2p/register` and `GET /nodes` ([`crate::registry`], API-REG-*).
//!
//! `POST /p2p/register` answers `403 not_registered_on_chain` for a node
//! without a `RegisterNode` record (API-REG-6). `GET /nodes?after=&limit=`
//! (API-REG-8, RT-HB-12) answers `{live, announced, on_chain, next_after,
//! height}`: `live` are the inference nodes whose heartbeats this node
//! holds (RT-HB-*: holdings, age of the last heartbeat, this node's
//! measured round trip and delivery success rate to them, load,
//! quarantine); every list holds only addresses greater than `after` and
//! at most `limit` (1..= [`MAX_NODES_PAGE`], default 100) entries;
//! `next_after` is the cursor for the next page (`null` on the last), and
//! every list is complete up to it, so following it visits every node once.

use super::Query;
use super::{ApiError, ApiResult, ApiState, code, hex0x, parse_json, snapshot};
use crate::Error;
use crate::registry::Announcement;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use blyan_state_machine::types::Address;
use serde_json::json;

/// The seed's registration request, signed by the node key (API-REG-1).
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// The node's address (`0x` + 40 hex digits).
    pub node_id: String,
    /// `0x` + 66 hex digits: the SEC1-compressed secp256k1 key of `node_id`.
    pub public_key: String,
    pub host: String,
    pub port: u16,
    /// Expert or block ids the node serves (e.g. `"layer3.expert7"` or a PoL block id).
    #[serde(default)]
    pub available_experts: Vec<String>,
    /// Milliseconds since the Unix epoch; within 30 s of the receiver's
    /// clock, and greater than the node's previous announcement's (API-REG-4).
    pub timestamp_ms: u64,
    /// `0x` + 128 hex digits: ECDSA over the API-REG-1 signing bytes, which
    /// name the receiver (the `address` of its `GET /status`, API-REG-5).
    pub signature: String,
}

/// The answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RegisterAnswer {
    pub registered: bool,
    /// Use as `Authorization: Bearer <auth_token>` (1,000 requests/min).
    pub auth_token: String,
    pub node_id: String,
    /// Whether the node holds an on-chain registration (TX-9); always true,
    /// since API-REG-6 requires it.
    pub on_chain: bool,
}

fn hex_array<const N: usize>(s: &str, what: &str) -> Result<[u8; N], ApiError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
        .map_err(|_| ApiError::bad_request(format!("{what} must be {N} bytes of hex")))?;
    Ok(out)
}

/// Announce an inference node and get an API token.
#[utoipa::path(post, path = "/p2p/register", request_body = RegisterBody,
    responses((status = 200, body = RegisterAnswer), (status = 400, body = super::openapi::ErrorBody),
              (status = 403, body = super::openapi::ErrorBody), (status = 429, body = super::openapi::ErrorBody),
              (status = 503, body = super::openapi::ErrorBody)))]
pub async fn register(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let b: RegisterBody = parse_json(
        body,
        r#"{"node_id", "public_key", "host", "port", "available_experts", "timestamp_ms", "signature"}"#,
    )?;
    let node_id = super::parse_address(&b.node_id, "node_id")?;
    let a = Announcement {
        node_id,
        public_key: hex_array(&b.public_key, "public_key")?,
        host: b.host,
        port: b.port,
        available_experts: b.available_experts,
        timestamp_ms: b.timestamp_ms,
        signature: hex_array(&b.signature, "signature")?,
    };
    // API-REG-6: only a node registered on chain may announce.
    let on_chain = snapshot(&state.node).ledger.node(&node_id).is_some();
    let token = state
        .registry
        .register(&a, crate::transport::now_ms(), on_chain)
        .map_err(|e| match e {
            Error::Forbidden(m) => ApiError::new(
                StatusCode::FORBIDDEN,
                code::VALIDATION_FAILED,
                "not_registered_on_chain",
                m,
            ),
            Error::BadRequest(m) => ApiError::new(
                StatusCode::BAD_REQUEST,
                code::VALIDATION_FAILED,
                "bad_announcement",
                m,
            ),
            Error::Busy(m) => ApiError::offline(m),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                code::NODE_OFFLINE,
                "internal",
                other.to_string(),
            ),
        })?;
    Ok(axum::Json(RegisterAnswer {
        registered: true,
        auth_token: token,
        node_id: node_id.to_string(),
        on_chain,
    })
    .into_response())
}

/// Most nodes of each list one `GET /nodes` page returns (API-REG-8).
pub const MAX_NODES_PAGE: usize = 100;

/// `?after=<address>&limit=<n>` (API-REG-8).
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct NodesPage {
    /// Return nodes with addresses greater than this one.
    pub after: Option<String>,
    /// At most this many of each list (1..=100, default 100).
    pub limit: Option<usize>,
}

/// Announced inference nodes, and the nodes registered on chain (TX-9), a
/// page at a time (API-REG-8).
#[utoipa::path(get, path = "/nodes", params(NodesPage),
    responses((status = 200, body = Object), (status = 400, body = super::openapi::ErrorBody)))]
pub async fn nodes(State(state): State<ApiState>, Query(page): Query<NodesPage>) -> ApiResult {
    let limit = page.limit.unwrap_or(MAX_NODES_PAGE);
    if limit == 0 || limit > MAX_NODES_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_NODES_PAGE}"
        )));
    }
    let after: Option<Address> = page
        .after
        .as_deref()
        .map(|a| super::parse_address(a, "after"))
        .transpose()?;
    let snap = snapshot(&state.node);
    let now = crate::transport::now_ms();
    let mut live = state
        .heartbeats
        .as_ref()
        .map(|h| h.page(after, limit, now))
        .unwrap_or_default();
    let mut announced = state.registry.page(after.as_ref(), limit, now);
    let mut on_chain: Vec<_> = snap
        .ledger
        .nodes()
        .filter(|(addr, _)| after.is_none_or(|a| **addr > a))
        .take(limit)
        .collect();
    // Each full list may have more after its last entry: the next page
    // starts at the smaller of those, and both lists stop there.
    let ends = [
        (live.len() == limit).then(|| live.last().map(|n| n.address)),
        (announced.len() == limit).then(|| announced.last().map(|n| n.node_id)),
        (on_chain.len() == limit).then(|| on_chain.last().map(|(a, _)| **a)),
    ];
    let next_after = ends.into_iter().flatten().flatten().min();
    if let Some(end) = next_after {
        live.retain(|n| n.address <= end);
        announced.retain(|n| n.node_id <= end);
        on_chain.retain(|(a, _)| **a <= end);
    }
    let live: Vec<_> = live.iter().map(live_json).collect();
    let on_chain: Vec<_> = on_chain
        .into_iter()
        .map(|(addr, r)| {
            json!({
                "node_id": addr,
                "endpoint": r.info.endpoint,
                "blocks": r.info.blocks.iter().map(|b| hex0x(b)).collect::<Vec<_>>(),
                "bond": r.bond.to_string(),
                "registered_at": r.registered_at,
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "live": live,
        "announced": announced,
        "on_chain": on_chain,
        "next_after": next_after,
        "height": snap.height(),
    }))
    .into_response())
}

/// RT-FAULT-1, RT-PIPE-7: the fault records this node's router signed when
/// a referee settled a spot check (the newest 256, oldest first): each
/// encoded (`record`, hex: what a third party needs to recompute the step
/// and check the verdict) and summarised.
#[utoipa::path(get, path = "/faults", responses((status = 200, body = Object)))]
pub async fn faults(State(state): State<ApiState>) -> ApiResult {
    let records = state
        .router
        .as_ref()
        .map(|r| r.fault_records())
        .unwrap_or_default();
    let list: Vec<_> = records
        .iter()
        .filter_map(|bytes| {
            let f = blyan_route::fault::SignedFaultRecord::decode(bytes).ok()?;
            let r = &f.record;
            let verdict = match r.verdict {
                blyan_route::spot::Settlement::Agree => "agree",
                blyan_route::spot::Settlement::StageFault => "stage_fault",
                blyan_route::spot::Settlement::CheckerFault => "checker_fault",
                blyan_route::spot::Settlement::Undecided => "undecided",
            };
            Some(json!({
                "verdict": verdict,
                "loser": r.loser(),
                "stage": r.stage.commitment.node,
                "checker": r.checker.commitment.node,
                "referee": r.referee.as_ref().map(|c| c.commitment.node),
                "request_id": hex0x(&r.request_id),
                "position": r.position,
                "layers": [r.first_layer, r.last_layer],
                "reported_ms": r.reported_ms,
                "record": hex0x(bytes),
            }))
        })
        .collect();
    Ok(axum::Json(json!({ "faults": list })).into_response())
}

/// RT-HB-12: one live inference node as `GET /nodes` shows it.
fn live_json(n: &crate::heartbeats::LiveNode) -> serde_json::Value {
    let hb = &n.entry.heartbeat;
    let holdings: Vec<_> = hb
        .holdings
        .iter()
        .map(|h| {
            json!({
                "model": hex0x(&h.model),
                "layers": [h.first_layer, h.last_layer],
                "dense": h.dense,
                "experts": h.experts,
                "blocks": h.blocks.iter().map(|b| hex0x(b)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let frames = n.delivered + n.failed;
    json!({
        "node_id": n.address,
        "holdings": holdings,
        "last_heartbeat_age_ms": n.age_ms,
        // This node's own measurements of its frames to the node (null if
        // it does not dial it, or sent it nothing yet).
        "latency_ms": n.rtt_us.map(|us| us as f64 / 1000.0),
        "delivery_success_rate": (frames > 0).then(|| n.delivered as f64 / frames as f64),
        "load": {
            "queue_depth": hb.queue_depth,
            "free_slots": hb.free_slots,
            "compute_per_token_us": hb.compute_per_token_us,
        },
        "quarantined": n.quarantined_until_ms.is_some(),
        "quarantined_until_ms": n.quarantined_until_ms,
    })
}
