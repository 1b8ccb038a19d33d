//! `POST /p2p/register` and `GET /nodes` ([`crate::registry`], API-REG-*).

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
    /// Milliseconds since the Unix epoch; within 30 s of the receiver's clock.
    pub timestamp_ms: u64,
    /// `0x` + 128 hex digits: ECDSA over the API-REG-1 signing bytes.
    pub signature: String,
}

/// The answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RegisterAnswer {
    pub registered: bool,
    /// Use as `Authorization: Bearer <auth_token>` (1,000 requests/min).
    pub auth_token: String,
    pub node_id: String,
    /// Whether the node also holds an on-chain registration (TX-9).
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
              (status = 429, body = super::openapi::ErrorBody), (status = 503, body = super::openapi::ErrorBody)))]
pub async fn register(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let b: RegisterBody = parse_json(
        body,
        r#"{"node_id", "public_key", "host", "port", "available_experts", "timestamp_ms", "signature"}"#,
    )?;
    let node_id: Address =
        b.node_id
            .parse()
            .map_err(|e: blyan_state_machine::types::AddressParseError| {
                ApiError::bad_request(format!("node_id: {e}"))
            })?;
    let a = Announcement {
        node_id,
        public_key: hex_array(&b.public_key, "public_key")?,
        host: b.host,
        port: b.port,
        available_experts: b.available_experts,
        timestamp_ms: b.timestamp_ms,
        signature: hex_array(&b.signature, "signature")?,
    };
    let token = state
        .registry
        .register(&a, crate::transport::now_ms())
        .map_err(|e| match e {
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
    let on_chain = snapshot(&state.node).ledger.node(&node_id).is_some();
    Ok(axum::Json(RegisterAnswer {
        registered: true,
        auth_token: token,
        node_id: node_id.to_string(),
        on_chain,
    })
    .into_response())
}

/// Announced inference nodes, and the nodes registered on chain (TX-9).
#[utoipa::path(get, path = "/nodes", responses((status = 200, body = Object)))]
pub async fn nodes(State(state): State<ApiState>) -> ApiResult {
    let snap = snapshot(&state.node);
    let on_chain: Vec<_> = snap
        .ledger
        .nodes()
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
        "announced": state.registry.nodes(),
        "on_chain": on_chain,
        "height": snap.height(),
    }))
    .into_response())
}
