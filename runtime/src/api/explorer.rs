//! The web explorer and chat page every node serves (issue 16), and the
//! JSON read routes behind them.
//!
//! - **API-UI-1** `GET /` is the explorer's page and `GET /ui/{file}` its
//!   scripts and styles, embedded in the binary (`runtime/src/ui/`, plain
//!   hand-written HTML, CSS and JavaScript modules: no build step, no CDN).
//!   Pages are client-side routes (`/#/block/12`), so the JSON routes
//!   (`/block/{id}`, `/tx/{id}`, `/account/{address}`) stay JSON. The page
//!   and its assets are not rate limited (constant bytes, like `/health`).
//! - **API-UI-2** Every list is a bounded page: `/explorer/blocks`,
//!   `/explorer/validators` and `/explorer/pol` take `limit` (at most
//!   [`MAX_PAGE`]) and a cursor; a block's transactions are paged by
//!   `offset`/`limit`. No route reads more than [`MAX_PAGE`] blocks from
//!   the store, or [`RECENT_BLOCKS`] once, when the index starts.
//! - **API-UI-3** The recent-block index ([`RecentIndex`]) holds the last
//!   [`RECENT_BLOCKS`] block summaries and, per address, its last
//!   [`TXS_PER_ADDRESS`] transactions (as sender or transfer recipient) in
//!   the blocks this node indexed since it started (at most
//!   [`MAX_INDEXED_ADDRESSES`] addresses, the least recently active
//!   forgotten first). It starts from the last [`RECENT_BLOCKS`] stored
//!   blocks and follows commits; after a gap of more than
//!   [`RECENT_BLOCKS`] blocks it skips to the newest. An account's
//!   `recent_txs` are therefore recent, not complete: `indexed_from` says
//!   from which height.
//! - **API-UI-4** `GET /explorer/stream` is a server-sent-event stream of
//!   committed block summaries (`event: block`, `id: <height>`). At most
//!   [`MAX_STREAM_SUBSCRIBERS`] streams are open at once (more get `503`);
//!   a stream holds no queue: it reads the next block from the index when
//!   the client takes the last one, and a client more than
//!   [`MAX_STREAM_LAG_BLOCKS`] blocks behind is sent `event: lagged` and
//!   dropped. It answers only `Accept: text/event-stream` (else `406`).
//! - **API-UI-5** Finality p50/p99 are read off the node's finality
//!   histogram (`blyan_tx_finality_ms`, client transactions submitted to
//!   this node since it started) as the upper bound of the bucket that holds
//!   the quantile; a block's `finality_ms` is the mean finality of this
//!   node's client transactions it committed, when the index saw that
//!   commit on its own.

use super::{
    ApiError, ApiResult, ApiState, Path, Query, block_json, code, hex0x, parse_hash, snapshot,
};
use crate::service::{FINALITY_BUCKETS_MS, Histogram, NodeHandle, Snapshot};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use blyan_state_machine::block::Misbehaviour;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::ledger::Liveness;
use blyan_state_machine::node::CommittedBlock;
use blyan_state_machine::pol::PolTx;
use blyan_state_machine::rewards::{self, RewardPool};
use blyan_state_machine::state::{StateKey, ns};
use blyan_state_machine::tx::{SignedTx, TxKind};
use blyan_state_machine::types::{Address, Hash32, Height};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Most entries one page of a list returns.
pub const MAX_PAGE: usize = 100;
/// Block summaries the recent-block index keeps (API-UI-3).
pub const RECENT_BLOCKS: usize = 256;
/// Transactions remembered per address (API-UI-3).
pub const TXS_PER_ADDRESS: usize = 25;
/// Addresses the index remembers transactions of (API-UI-3).
pub const MAX_INDEXED_ADDRESSES: usize = 100_000;
/// Open block streams at once (API-UI-4).
pub const MAX_STREAM_SUBSCRIBERS: usize = 128;
/// How far a stream's client may fall behind before it is dropped (API-UI-4).
pub const MAX_STREAM_LAG_BLOCKS: u64 = 64;
/// A validator is online if it signed one of the commit certificates of
/// this many recent blocks (a certificate holds a quorum, not every vote).
pub const ONLINE_WINDOW_BLOCKS: u64 = 10;
/// Unbonding entries scanned for one account page (the queue is ordered by
/// release height, not owner); beyond, the list says `unbonding_truncated`.
pub const MAX_UNBONDING_SCAN: usize = 10_000;

/// A committed block in a list.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct BlockSummary {
    pub height: Height,
    pub hash: String,
    pub time_ms: u64,
    pub txs: usize,
    pub gas_used: u64,
    #[schema(value_type = String)]
    pub proposer: Address,
    /// Validators whose precommits certify this block.
    pub signers: usize,
    pub evidence: usize,
    /// Base units per gas, a decimal string.
    pub base_fee_per_gas: String,
    /// API-UI-5: mean finality of this node's client transactions in the block.
    pub finality_ms: Option<u64>,
}

impl BlockSummary {
    pub fn of(c: &CommittedBlock) -> BlockSummary {
        let h = &c.block.header;
        BlockSummary {
            height: h.height,
            hash: hex0x(&c.block.hash()),
            time_ms: h.time_ms,
            txs: c.block.body.txs.len(),
            gas_used: h.gas_used,
            proposer: h.proposer,
            signers: c.certificate.signatures.len(),
            evidence: c.block.body.evidence.len(),
            base_fee_per_gas: h.base_fee_per_gas.to_string(),
            finality_ms: None,
        }
    }
}

/// API-UI-3: the recent-block index (pure: blocks are handed to it).
#[derive(Debug, Default)]
pub struct RecentIndex {
    /// Ascending heights, at most [`RECENT_BLOCKS`].
    blocks: VecDeque<BlockSummary>,
    /// The next height to index (0: nothing indexed yet).
    next_height: Height,
    /// The first height indexed since start.
    indexed_from: Option<Height>,
    by_address: BTreeMap<Address, (u64, VecDeque<(Height, Hash32)>)>,
    /// Activity order of `by_address`: sequence number → address.
    activity: BTreeMap<u64, Address>,
    seq: u64,
    /// The finality histogram's count and sum when last seen.
    finality_seen: (u64, u64),
    /// Validator → the last indexed height whose certificate it signed.
    last_signed: BTreeMap<Address, Height>,
}

impl RecentIndex {
    /// The heights to index to reach `head`: at most [`RECENT_BLOCKS`], the
    /// newest (API-UI-3).
    pub fn wanted(&self, head: Height) -> std::ops::RangeInclusive<Height> {
        let from = self
            .next_height
            .max(1)
            .max(head.saturating_sub(RECENT_BLOCKS as u64 - 1));
        from..=head
    }

    /// Indexes `block`, which must be the next wanted height (earlier ones
    /// are ignored; a gap is skipped).
    pub fn push(&mut self, block: &CommittedBlock) {
        let height = block.block.header.height;
        if height < self.next_height.max(1) {
            return;
        }
        self.indexed_from.get_or_insert(height);
        if self.blocks.back().is_some_and(|b| b.height + 1 != height) {
            self.blocks.clear();
        }
        self.blocks.push_back(BlockSummary::of(block));
        for (a, _) in &block.certificate.signatures {
            self.last_signed.insert(*a, height);
        }
        for a in &block.block.body.last_commit_signers {
            let h = self.last_signed.entry(*a).or_insert(height - 1);
            *h = (*h).max(height - 1);
        }
        self.last_signed
            .retain(|_, h| *h + ONLINE_WINDOW_BLOCKS > height);
        while self.blocks.len() > RECENT_BLOCKS {
            self.blocks.pop_front();
        }
        for tx in &block.block.body.txs {
            let id = tx.id();
            let mut parties = vec![tx.sender()];
            if let TxKind::Transfer { to, .. } = &tx.body.kind {
                parties.push(Some(*to));
            }
            parties.dedup();
            for a in parties.into_iter().flatten() {
                self.note(a, height, id);
            }
        }
        self.next_height = height + 1;
    }

    fn note(&mut self, address: Address, height: Height, id: Hash32) {
        self.seq += 1;
        let seq = self.seq;
        let entry = self
            .by_address
            .entry(address)
            .or_insert_with(|| (seq, VecDeque::new()));
        self.activity.remove(&entry.0);
        entry.0 = seq;
        entry.1.push_back((height, id));
        while entry.1.len() > TXS_PER_ADDRESS {
            entry.1.pop_front();
        }
        self.activity.insert(seq, address);
        while self.by_address.len() > MAX_INDEXED_ADDRESSES {
            let (_, oldest) = self.activity.pop_first().expect("as many as addresses");
            self.by_address.remove(&oldest);
        }
        debug_assert_eq!(self.activity.len(), self.by_address.len());
    }

    /// API-UI-5: attributes the client transactions that reached finality
    /// since the last call to the newest indexed block.
    pub fn observe_finality(&mut self, f: &Histogram) {
        let (count, sum) = self.finality_seen;
        if f.count > count
            && let Some(last) = self.blocks.back_mut()
            && last.finality_ms.is_none()
        {
            last.finality_ms = Some(f.sum_ms.saturating_sub(sum) / (f.count - count));
        }
        self.finality_seen = (f.count, f.sum_ms);
    }

    /// The indexed summaries, ascending.
    pub fn blocks(&self) -> impl DoubleEndedIterator<Item = &BlockSummary> {
        self.blocks.iter()
    }

    pub fn block(&self, height: Height) -> Option<&BlockSummary> {
        let first = self.blocks.front()?.height;
        self.blocks
            .get(usize::try_from(height.checked_sub(first)?).ok()?)
    }

    /// `address`'s indexed transactions, newest first.
    pub fn txs_of(&self, address: &Address) -> Vec<(Height, Hash32)> {
        self.by_address
            .get(address)
            .map(|(_, v)| v.iter().rev().copied().collect())
            .unwrap_or_default()
    }

    /// Members of `active` that signed a certificate of the last
    /// [`ONLINE_WINDOW_BLOCKS`] blocks up to `head`.
    pub fn online(&self, active: &[(Address, u64)], head: Height) -> usize {
        active
            .iter()
            .filter(|(a, _)| {
                self.last_signed
                    .get(a)
                    .is_some_and(|h| h + ONLINE_WINDOW_BLOCKS > head)
            })
            .count()
    }

    pub fn indexed_from(&self) -> Option<Height> {
        self.indexed_from
    }

    pub fn addresses(&self) -> usize {
        self.by_address.len()
    }
}

/// API-UI-5: the upper bound (ms) of the finality bucket holding quantile
/// `q_ppm` (parts per million); `None` without samples or above the last
/// bucket.
pub fn finality_quantile_le_ms(f: &Histogram, q_ppm: u64) -> Option<u64> {
    if f.count == 0 {
        return None;
    }
    let rank = (u128::from(f.count) * u128::from(q_ppm)).div_ceil(1_000_000);
    FINALITY_BUCKETS_MS
        .iter()
        .zip(f.buckets)
        .find(|(_, cumulative)| u128::from(*cumulative) >= rank.max(1))
        .map(|(le, _)| *le)
}

/// What the explorer routes share.
#[derive(Clone)]
pub struct Explorer {
    index: Arc<Mutex<RecentIndex>>,
    subscribers: Arc<AtomicUsize>,
}

impl Explorer {
    fn new() -> Explorer {
        Explorer {
            index: Arc::new(Mutex::new(RecentIndex::default())),
            subscribers: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecentIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the index up to `snap` (blocks read outside the lock).
    fn catch_up(&self, node: &NodeHandle, snap: &Snapshot) {
        let head = snap.height();
        let wanted = self.lock().wanted(head);
        let mut blocks = Vec::new();
        for h in wanted {
            let b = match &snap.latest {
                Some(l) if l.block.header.height == h => Some((**l).clone()),
                _ => node.reader.block(h).ok().flatten(),
            };
            match b {
                Some(b) => blocks.push(b),
                None => break,
            }
        }
        let mut index = self.lock();
        for b in &blocks {
            index.push(b);
        }
        index.observe_finality(&snap.finality);
    }

    fn current(&self, node: &NodeHandle) -> Arc<Snapshot> {
        let snap = snapshot(node);
        self.catch_up(node, &snap);
        snap
    }
}

/// The explorer's routes, merged into [`super::router`]. With a tokio
/// runtime at hand, a task follows the node's snapshots so the index (and
/// each block's finality) is current even when nobody asks.
pub fn routes(state: &ApiState) -> Router<ApiState> {
    let explorer = Explorer::new();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let (explorer, node) = (explorer.clone(), state.node.clone());
        let mut rx = node.snapshot.clone();
        rt.spawn(async move {
            // The node publishes after every step; only a commit or a
            // finality sample is news to the index.
            let mut seen = (u64::MAX, u64::MAX);
            while rx.changed().await.is_ok() {
                let snap = rx.borrow_and_update().clone();
                let now = (snap.height(), snap.finality.count);
                if now != seen {
                    seen = now;
                    explorer.catch_up(&node, &snap);
                }
            }
        });
    }
    Router::new()
        .route("/", get(index_page))
        .route("/ui/{file}", get(asset))
        .route("/explorer/overview", get(overview))
        .route("/explorer/blocks", get(blocks))
        .route("/explorer/block/{id}", get(block))
        .route("/explorer/tx/{id}", get(tx))
        .route("/explorer/account/{address}", get(account))
        .route("/explorer/validators", get(validators))
        .route("/explorer/rewards", get(rewards_page))
        .route("/explorer/pol", get(pol))
        .route("/explorer/search", get(search))
        .route("/explorer/stream", get(stream))
        .layer(axum::Extension(explorer))
}

type Ex = axum::Extension<Explorer>;

// ----- static assets (API-UI-1) ---------------------------------------------

/// The embedded files under `/ui/`: name, content type, bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/app.js"),
    ),
    (
        "util.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/util.js"),
    ),
    (
        "pages.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/pages.js"),
    ),
    (
        "charts.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/charts.js"),
    ),
    (
        "live-worker.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/live-worker.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../ui/style.css"),
    ),
];

const INDEX_HTML: &str = include_str!("../ui/index.html");

/// HTML-escapes `s`.
fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The explorer's page with the chain id and height rendered in (API-UI-1:
/// the first render needs no script, fetch or stream); its pages are
/// client-side routes after `#`.
#[utoipa::path(get, path = "/", responses((status = 200, content_type = "text/html", body = String)))]
pub async fn index_page(State(state): State<ApiState>) -> Response {
    let height = snapshot(&state.node).height();
    let html = INDEX_HTML
        .replace("{{chain_id}}", &escape_html(&state.node.chain_id))
        .replace("{{height}}", &height.to_string());
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        html,
    )
        .into_response()
}

/// A script or stylesheet of the explorer.
#[utoipa::path(get, path = "/ui/{file}", params(("file" = String, Path, description = "app.js, util.js, pages.js, charts.js, live-worker.js or style.css")),
    responses((status = 200, content_type = "text/javascript", body = String), (status = 404, body = super::openapi::ErrorBody)))]
pub async fn asset(Path(file): Path<String>) -> ApiResult {
    let (_, kind, body) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                code::VALIDATION_FAILED,
                "no_such_asset",
                format!("no explorer file {file:?}"),
            )
        })?;
    Ok((
        [
            (header::CONTENT_TYPE, *kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        *body,
    )
        .into_response())
}

// ----- JSON routes ------------------------------------------------------------

fn not_found(reason: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, code::INVALID_BLOCK, reason, message)
}

fn finality_json(f: &Histogram) -> Value {
    json!({
        "count": f.count,
        "mean_ms": f.sum_ms.checked_div(f.count),
        "p50_le_ms": finality_quantile_le_ms(f, 500_000),
        "p99_le_ms": finality_quantile_le_ms(f, 990_000),
    })
}

fn signers_of_latest(snap: &Snapshot) -> Vec<Address> {
    snap.latest
        .as_ref()
        .map(|l| l.certificate.signers())
        .unwrap_or_default()
}

/// The essentials of a live block event (API-UI-4) and the overview.
fn live_json(node: &NodeHandle, snap: &Snapshot, online: usize) -> Value {
    json!({
        "chain_id": node.chain_id,
        "height": snap.height(),
        "mempool_txs": snap.mempool_txs,
        "finality": finality_json(&snap.finality),
        "validators": {
            "active": snap.ledger.active_set().len(),
            "online": online,
            "total": snap.ledger.validators().count(),
        },
    })
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RecentQuery {
    /// Recent block summaries to include (0..=256, default 60).
    pub recent: Option<usize>,
}

/// Chain id, height, the last block, finality p50/p99, mempool size,
/// validators online (signers of the last commit) and the last blocks'
/// summaries for the charts (block time, tx/s, finality).
#[utoipa::path(get, path = "/explorer/overview", params(RecentQuery),
    responses((status = 200, body = Object), (status = 400, body = super::openapi::ErrorBody)))]
pub async fn overview(
    State(state): State<ApiState>,
    axum::Extension(ex): Ex,
    Query(q): Query<RecentQuery>,
) -> ApiResult {
    let n = q.recent.unwrap_or(60);
    if n > RECENT_BLOCKS {
        return Err(ApiError::bad_request(format!(
            "recent must be at most {RECENT_BLOCKS}"
        )));
    }
    let snap = ex.current(&state.node);
    let recent: Vec<BlockSummary> = {
        let index = ex.lock();
        let mut v: Vec<_> = index.blocks().rev().take(n).cloned().collect();
        v.reverse();
        v
    };
    let tx_per_s = match (recent.first(), recent.last()) {
        (Some(a), Some(b)) if b.time_ms > a.time_ms => {
            let txs: usize = recent.iter().skip(1).map(|s| s.txs).sum();
            Some(txs as f64 * 1000.0 / (b.time_ms - a.time_ms) as f64)
        }
        _ => None,
    };
    let online = ex.lock().online(snap.ledger.active_set(), snap.height());
    let mut v = live_json(&state.node, &snap, online);
    let o = v.as_object_mut().expect("an object");
    o.insert("node".into(), json!(state.node.address));
    o.insert("round".into(), json!(snap.round));
    o.insert("peers_connected".into(), json!(snap.peers_connected));
    o.insert("committed_txs".into(), json!(snap.committed_txs));
    o.insert(
        "next_base_fee_per_gas".into(),
        json!(snap.ledger.next_block_base_fee().to_string()),
    );
    o.insert("latest".into(), json!(recent.last()));
    o.insert("tx_per_s".into(), json!(tx_per_s));
    o.insert("recent".into(), json!(recent));
    o.insert("now_ms".into(), json!(crate::transport::now_ms()));
    o.insert("halted".into(), json!(snap.halted));
    Ok(axum::Json(v).into_response())
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct BlocksQuery {
    /// Blocks below this height (default: from the newest).
    pub before: Option<Height>,
    /// At most this many (1..=100, default 20).
    pub limit: Option<usize>,
}

fn check_limit(limit: Option<usize>, default: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    Ok(limit)
}

/// Committed blocks, newest first, a page at a time; `next_before` is the
/// cursor of the next page (null on the last).
#[utoipa::path(get, path = "/explorer/blocks", params(BlocksQuery),
    responses((status = 200, body = Object), (status = 400, body = super::openapi::ErrorBody)))]
pub async fn blocks(
    State(state): State<ApiState>,
    axum::Extension(ex): Ex,
    Query(q): Query<BlocksQuery>,
) -> ApiResult {
    let limit = check_limit(q.limit, 20)?;
    let snap = ex.current(&state.node);
    let top = q
        .before
        .map_or(snap.height(), |b| b.saturating_sub(1).min(snap.height()));
    let mut out = Vec::new();
    let mut h = top;
    while h >= 1 && out.len() < limit {
        let cached = ex.lock().block(h).cloned();
        let s = match cached {
            Some(s) => s,
            None => match state
                .node
                .reader
                .block(h)
                .map_err(|e| ApiError::offline(e.to_string()))?
            {
                Some(b) => BlockSummary::of(&b),
                None => break,
            },
        };
        out.push(s);
        h -= 1;
    }
    let next_before = (h >= 1 && !out.is_empty()).then_some(h + 1);
    Ok(axum::Json(json!({
        "blocks": out,
        "next_before": next_before,
        "height": snap.height(),
    }))
    .into_response())
}

/// A block hash (64 hex digits, `0x` optional) or a height.
fn resolve_height(node: &NodeHandle, id: &str) -> Result<Height, ApiError> {
    let digits = id.strip_prefix("0x").unwrap_or(id);
    if digits.len() == 64 {
        let hash = parse_hash(digits)?;
        return node
            .reader
            .height_of(&hash)
            .map_err(|e| ApiError::offline(e.to_string()))?
            .ok_or_else(|| {
                not_found(
                    "block_not_found",
                    format!("no committed block with hash {id}"),
                )
            });
    }
    id.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{id:?} is neither a height (a decimal number) nor a block hash (64 hex digits, 0x optional)"
        ))
    })
}

fn committed_block(node: &NodeHandle, height: Height) -> Result<CommittedBlock, ApiError> {
    node.reader
        .block(height)
        .map_err(|e| ApiError::offline(e.to_string()))?
        .ok_or_else(|| {
            not_found(
                "block_not_found",
                format!("no committed block at height {height}"),
            )
        })
}

/// The name and fields of a transaction's kind.
pub fn tx_kind_json(kind: &TxKind) -> Value {
    match kind {
        TxKind::Transfer { to, amount } => {
            json!({ "kind": "transfer", "to": to, "amount": amount.to_string() })
        }
        TxKind::Bond { amount } => json!({ "kind": "bond", "amount": amount.to_string() }),
        TxKind::Unbond { amount } => json!({ "kind": "unbond", "amount": amount.to_string() }),
        TxKind::Unjail => json!({ "kind": "unjail" }),
        TxKind::RegisterNode { info, bond } => json!({
            "kind": "register_node", "endpoint": info.endpoint,
            "blocks": info.blocks.len(), "bond": bond.to_string(),
        }),
        TxKind::DeregisterNode => json!({ "kind": "deregister_node" }),
        TxKind::SetVrfKey { public_key } => {
            json!({ "kind": "set_vrf_key", "public_key": hex0x(public_key) })
        }
        TxKind::Pol(p) => {
            let (op, detail) = match &**p {
                PolTx::RegisterBlock(b) => ("register_block", json!(hex0x(&b.id()))),
                PolTx::CommitDelta { commitment } => ("commit_delta", json!(hex0x(commitment))),
                PolTx::RevealDelta(b) => ("reveal_delta", json!(hex0x(&b.id()))),
                PolTx::CommitAttestation { delta_id, .. } => {
                    ("commit_attestation", json!(hex0x(delta_id)))
                }
                PolTx::RevealAttestation { delta_id, .. } => {
                    ("reveal_attestation", json!(hex0x(delta_id)))
                }
            };
            json!({ "kind": "pol", "op": op, "subject": detail })
        }
        TxKind::CloseAllowance { allowance } => {
            json!({ "kind": "close_allowance", "allowance": hex0x(allowance) })
        }
        other => {
            // Kinds without a dedicated view: the variant's name.
            let debug = format!("{other:?}");
            let name: String = debug.chars().take_while(|c| c.is_alphanumeric()).collect();
            json!({ "kind": name })
        }
    }
}

fn tx_json(tx: &SignedTx) -> Value {
    let mut v = tx_kind_json(&tx.body.kind);
    let o = v.as_object_mut().expect("an object");
    o.insert("id".into(), json!(hex0x(&tx.id())));
    o.insert("sender".into(), json!(tx.sender()));
    o.insert("nonce".into(), json!(tx.body.nonce));
    o.insert("gas_limit".into(), json!(tx.body.gas_limit));
    o.insert(
        "max_fee_per_gas".into(),
        json!(tx.body.max_fee_per_gas.to_string()),
    );
    o.insert(
        "max_priority_fee_per_gas".into(),
        json!(tx.body.max_priority_fee_per_gas.to_string()),
    );
    v
}

fn evidence_json(e: &Misbehaviour) -> Value {
    match e {
        Misbehaviour::DuplicateVote { vote_a, vote_b } => json!({
            "kind": "duplicate_vote",
            "validator": e.validator(),
            "height": e.height(),
            "round": vote_a.vote.round,
            "values": [format!("{:?}", vote_a.vote.value), format!("{:?}", vote_b.vote.value)],
        }),
    }
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TxPage {
    /// First transaction of the page (default 0).
    pub offset: Option<usize>,
    /// At most this many (1..=100, default 50).
    pub limit: Option<usize>,
}

/// A block with its header, proposer, certificate signers, evidence and
/// one page of its transactions (with their receipts).
#[utoipa::path(get, path = "/explorer/block/{id}", params(("id" = String, Path, description = "a height or a block hash"), TxPage),
    responses((status = 200, body = Object), (status = 400, body = super::openapi::ErrorBody), (status = 404, body = super::openapi::ErrorBody)))]
pub async fn block(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(page): Query<TxPage>,
) -> ApiResult {
    let limit = check_limit(page.limit, 50)?;
    let offset = page.offset.unwrap_or(0);
    let node = &state.node;
    let c = committed_block(node, resolve_height(node, &id)?)?;
    let base_fee = c.block.header.base_fee_per_gas;
    let mut txs = Vec::new();
    for tx in c.block.body.txs.iter().skip(offset).take(limit) {
        let mut v = tx_json(tx);
        if let Some(loc) = node
            .reader
            .tx(&tx.id())
            .map_err(|e| ApiError::offline(e.to_string()))?
        {
            let r = &loc.receipt;
            let o = v.as_object_mut().expect("an object");
            o.insert("gas_used".into(), json!(r.gas_used));
            o.insert("fee_paid".into(), json!(r.fee_paid.to_string()));
            o.insert(
                "base_fee_burned".into(),
                json!((u128::from(r.gas_used) * base_fee).to_string()),
            );
            o.insert("success".into(), json!(r.failure.is_none()));
        }
        txs.push(v);
    }
    let mut v = block_json(&c);
    let o = v.as_object_mut().expect("an object");
    o.insert(
        "last_commit_signers".into(),
        json!(c.block.body.last_commit_signers),
    );
    o.insert(
        "evidence".into(),
        json!(
            c.block
                .body
                .evidence
                .iter()
                .map(evidence_json)
                .collect::<Vec<_>>()
        ),
    );
    o.insert("txs_total".into(), json!(c.block.body.txs.len()));
    o.insert("tx_page".into(), json!(txs));
    o.insert("offset".into(), json!(offset));
    o.insert("limit".into(), json!(limit));
    Ok(axum::Json(v).into_response())
}

/// A committed transaction: its body, receipt, fee paid, base fee burned
/// and tip. The store keeps no per-transaction events (block events are
/// not stored), so `events` is empty unless the receipt failed.
#[utoipa::path(get, path = "/explorer/tx/{id}", params(("id" = String, Path, description = "0x-hex transaction id")),
    responses((status = 200, body = Object), (status = 400, body = super::openapi::ErrorBody), (status = 404, body = super::openapi::ErrorBody)))]
pub async fn tx(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let id = parse_hash(&id)?;
    let node = &state.node;
    let loc = node
        .reader
        .tx(&id)
        .map_err(|e| ApiError::offline(e.to_string()))?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                code::VALIDATION_FAILED,
                "tx_not_found",
                "no committed transaction with this id (it may still be pending; GET /tx/{id} says if it was dropped)",
            )
        })?;
    let c = committed_block(node, loc.height)?;
    let tx = c
        .block
        .body
        .txs
        .get(loc.index as usize)
        .filter(|t| t.id() == id)
        .ok_or_else(|| {
            ApiError::offline(format!(
                "the receipt index points at transaction {} of block {}, which is not this one",
                loc.index, loc.height
            ))
        })?;
    let r = &loc.receipt;
    let base_fee = c.block.header.base_fee_per_gas;
    let burned = u128::from(r.gas_used) * base_fee;
    let mut v = tx_json(tx);
    let o = v.as_object_mut().expect("an object");
    o.insert("status".into(), json!("committed"));
    o.insert("height".into(), json!(loc.height));
    o.insert("index".into(), json!(loc.index));
    o.insert("block_hash".into(), json!(hex0x(&c.block.hash())));
    o.insert("time_ms".into(), json!(c.block.header.time_ms));
    o.insert("gas_used".into(), json!(r.gas_used));
    o.insert("fee_paid".into(), json!(r.fee_paid.to_string()));
    o.insert("base_fee_per_gas".into(), json!(base_fee.to_string()));
    o.insert("base_fee_burned".into(), json!(burned.to_string()));
    o.insert(
        "tip".into(),
        json!(r.fee_paid.saturating_sub(burned).to_string()),
    );
    o.insert("success".into(), json!(r.failure.is_none()));
    o.insert("failure".into(), json!(r.failure));
    let events: Vec<Value> = r
        .failure
        .iter()
        .map(|f| json!({ "kind": "failed", "reason": f }))
        .collect();
    o.insert("events".into(), json!(events));
    Ok(axum::Json(v).into_response())
}

fn liveness(snap: &Snapshot, a: &Address) -> Option<Liveness> {
    let bytes = snap
        .ledger
        .value_bytes(&StateKey::new(ns::LIVENESS, a.0.to_vec()))?;
    Liveness::decode(&bytes).ok()
}

/// An account: balance, nonce, stake, validator and node records,
/// unbonding entries and the recent transactions the index holds
/// (API-UI-3).
#[utoipa::path(get, path = "/explorer/account/{address}", params(("address" = String, Path, description = "0x and 40 hex digits")),
    responses((status = 200, body = Object), (status = 400, body = super::openapi::ErrorBody)))]
pub async fn account(
    State(state): State<ApiState>,
    axum::Extension(ex): Ex,
    Path(address): Path<String>,
) -> ApiResult {
    let address = super::parse_address(&address, "address")?;
    let snap = ex.current(&state.node);
    let l = &snap.ledger;
    let account = l.account(&address);
    let validator = l.validator(&address).map(|v| {
        json!({
            "bonded": v.bonded.to_string(),
            "jailed_until": v.jailed_until,
            "tombstoned": v.tombstoned,
            "vrf_public_key": v.vrf_public_key.map(|k| hex0x(&k)),
        })
    });
    let node = l.node(&address).map(|n| {
        json!({
            "endpoint": n.info.endpoint,
            "blocks": n.info.blocks.iter().map(|b| hex0x(b)).collect::<Vec<_>>(),
            "bond": n.bond.to_string(),
            "registered_at": n.registered_at,
        })
    });
    let mut unbonding = Vec::new();
    let mut scanned = 0usize;
    for (k, e) in l.unbonding() {
        scanned += 1;
        if scanned > MAX_UNBONDING_SCAN {
            break;
        }
        if k.owner == address {
            unbonding.push(json!({
                "amount": e.amount.to_string(),
                "creation_height": e.creation_height,
                "release_height": k.release_height,
                "node_bond": e.node_bond,
            }));
        }
    }
    let (recent, indexed_from) = {
        let index = ex.lock();
        (index.txs_of(&address), index.indexed_from())
    };
    let recent: Vec<Value> = recent
        .iter()
        .map(|(h, id)| json!({ "id": hex0x(id), "height": h }))
        .collect();
    Ok(axum::Json(json!({
        "address": address,
        "balance": account.balance.to_string(),
        "nonce": account.nonce,
        "stake": l.validator(&address).map_or(0, |v| v.bonded).to_string(),
        "validator": validator,
        "node": node,
        "unbonding": unbonding,
        "unbonding_truncated": scanned > MAX_UNBONDING_SCAN,
        "recent_txs": recent,
        "recent_txs_indexed_from": indexed_from,
        "height": snap.height(),
    }))
    .into_response())
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AddressPage {
    /// Entries after this address.
    pub after: Option<String>,
    /// At most this many (1..=100, default 100).
    pub limit: Option<usize>,
}

fn parse_after(after: Option<&str>) -> Result<Option<Address>, ApiError> {
    after.map(|a| super::parse_address(a, "after")).transpose()
}

/// Validators by address: bonded stake, voting power, jailed or tombstoned,
/// missed blocks in the downtime window (SLASH-2), and whether each signed
/// the last commit, and the epoch's proposer committee (CONS-COMM-7).
#[utoipa::path(get, path = "/explorer/validators", params(AddressPage),
    responses((status = 200, body = Object), (status = 400, body = super::openapi::ErrorBody)))]
pub async fn validators(
    State(state): State<ApiState>,
    Query(page): Query<AddressPage>,
) -> ApiResult {
    let limit = check_limit(page.limit, MAX_PAGE)?;
    let after = parse_after(page.after.as_deref())?;
    let snap = snapshot(&state.node);
    let l = &snap.ledger;
    let height = snap.height();
    let active = l.active_set();
    let signers = signers_of_latest(&snap);
    let mut list = Vec::new();
    let mut more = false;
    for (a, v) in l
        .validators()
        .skip_while(|(a, _)| after.is_some_and(|x| **a <= x))
    {
        if list.len() == limit {
            more = true;
            break;
        }
        let power = active
            .binary_search_by(|(x, _)| x.cmp(a))
            .ok()
            .map(|i| active[i].1);
        let live = liveness(&snap, a);
        list.push(json!({
            "address": a,
            "bonded": v.bonded.to_string(),
            "power": power,
            "active": power.is_some(),
            "jailed": v.jailed_until.is_some_and(|u| u > height),
            "jailed_until": v.jailed_until,
            "tombstoned": v.tombstoned,
            "missed_blocks": live.as_ref().map_or(0, |x| x.missed),
            "window_blocks": live.as_ref().map_or(0, |x| x.filled),
            "signed_last_commit": signers.contains(a),
            "vrf_public_key": v.vrf_public_key.map(|k| hex0x(&k)),
            "in_committee": l.committee().eligible.contains(a),
        }));
    }
    let next_after = if more {
        list.last().map(|v| v["address"].clone())
    } else {
        None
    };
    let c = l.committee();
    let committee = json!({
        "epoch": c.epoch,
        "seed": hex0x(&c.seed),
        "members": c.eligible,
        "eligible_proposers": l.eligible_proposers(),
        "epoch_length_blocks": l.params().epoch_length_blocks,
    });
    Ok(axum::Json(json!({
        "validators": list,
        "next_after": next_after,
        "active": active.len(),
        "total_power": active.iter().map(|(_, p)| *p).sum::<u64>(),
        "signed_blocks_window": l.params().signed_blocks_window,
        "last_proposer": snap.latest.as_ref().map(|b| b.block.header.proposer),
        "committee": committee,
        "height": height,
    }))
    .into_response())
}

fn pool_name(p: RewardPool) -> &'static str {
    match p {
        RewardPool::Inference => "inference",
        RewardPool::Learning => "learning",
        RewardPool::Attestation => "attestation",
        RewardPool::Signing => "signing",
        RewardPool::Datasets => "datasets",
    }
}

/// The current reward epoch (RWD-*): each pool's budget, claims and
/// claimants, and the supply counters. Past epochs' payouts are minted as
/// block events, which the store does not keep.
#[utoipa::path(get, path = "/explorer/rewards", responses((status = 200, body = Object)))]
pub async fn rewards_page(State(state): State<ApiState>) -> ApiResult {
    let snap = snapshot(&state.node);
    let l = &snap.ledger;
    let params = &l.params().rewards;
    let height = snap.height();
    let len = params.epoch_length_blocks.max(1);
    let epoch = height / len;
    let pools: Vec<Value> = RewardPool::ALL
        .into_iter()
        .map(|p| {
            let t = l.rewards().pool_total(p);
            json!({
                "pool": pool_name(p),
                "budget": rewards::pool_budget(params, p).to_string(),
                "claimed": t.claimed.to_string(),
                "claimants": t.claimants,
                "weighted": p.is_weighted(),
            })
        })
        .collect();
    let g = l.globals();
    Ok(axum::Json(json!({
        "height": height,
        "epoch": epoch,
        "epoch_length_blocks": len,
        "epoch_start_height": epoch * len,
        "next_settlement_height": (epoch + 1) * len,
        "emission_per_block": rewards::emission_per_block_base_units(params).to_string(),
        "epoch_budget": rewards::epoch_budget(params).to_string(),
        "pools": pools,
        "minted_total": g.minted.to_string(),
        "burned_total": g.burned.to_string(),
        "slashed_total": g.slashed.to_string(),
    }))
    .into_response())
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TargetPage {
    /// Targets after this many (default 0).
    pub offset: Option<usize>,
    /// At most this many (1..=100, default 100).
    pub limit: Option<usize>,
}

/// The PoL targets (layers, experts, routers) with their heads, and the
/// pending deltas with their status and attestations (first page).
#[utoipa::path(get, path = "/explorer/pol", params(TargetPage),
    responses((status = 200, body = Object), (status = 400, body = super::openapi::ErrorBody)))]
pub async fn pol(State(state): State<ApiState>, Query(page): Query<TargetPage>) -> ApiResult {
    let limit = check_limit(page.limit, MAX_PAGE)?;
    let offset = page.offset.unwrap_or(0);
    let snap = snapshot(&state.node);
    let pol = snap.ledger.pol();
    let height = snap.height();
    let targets: Vec<Value> = pol
        .records()
        .skip(offset)
        .take(limit)
        .map(|r| {
            let head = pol.head(&r.target);
            json!({
                "model_id": hex0x(&r.target.model_id),
                "kind": r.target.kind,
                "layer": r.target.layer,
                "expert": r.target.expert,
                "head": hex0x(&head.map_or(r.block_hash, |h| h.block_id)),
                "version": head.map_or(r.version, |h| h.version),
                "loss_micronats": head.and_then(|h| h.loss_micronats),
                "accepted_deltas": head.map_or(0, |h| h.accepted_deltas),
                "usage_count": r.usage_count,
                "node_assignments": r.node_assignments,
            })
        })
        .collect();
    let deltas: Vec<Value> = pol
        .pending_deltas()
        .take(MAX_PAGE)
        .map(|d| {
            let phase = if height <= d.commit_end_height {
                "committing"
            } else {
                "revealing"
            };
            json!({
                "delta_id": hex0x(&d.delta_id),
                "submitter": d.block.submitter,
                "base_block": d.block.base_block.map(|b| hex0x(&b)),
                "target_kind": d.target.kind,
                "layer": d.target.layer,
                "expert": d.target.expert,
                "status": phase,
                "revealed_height": d.revealed_height,
                "commit_end_height": d.commit_end_height,
                "reveal_end_height": d.reveal_end_height,
                "attestations": d.attestations.len(),
                "attestations_revealed": d.attestations.iter().filter(|a| a.revealed.is_some()).count(),
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "blocks_total": pol.block_count(),
        "targets": targets,
        "pending_deltas": deltas,
        "offset": offset,
        "height": height,
    }))
    .into_response())
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    /// A height, a block or transaction hash, or an address.
    pub q: String,
}

/// What a search term names: `{"kind": "block" | "tx" | "account" |
/// "none", "id"}` (`200` either way, so a miss is not an error in the
/// browser's console). A 64-hex-digit term is a transaction if one with
/// that id is committed, else a block if one has that hash.
#[utoipa::path(get, path = "/explorer/search", params(SearchQuery),
    responses((status = 200, body = Object), (status = 400, body = super::openapi::ErrorBody)))]
pub async fn search(State(state): State<ApiState>, Query(q): Query<SearchQuery>) -> ApiResult {
    let term = q.q.trim();
    let node = &state.node;
    let digits = term.strip_prefix("0x").unwrap_or(term);
    let offline = |e: crate::Error| ApiError::offline(e.to_string());
    let found =
        |kind: &str, id: String| Ok(axum::Json(json!({ "kind": kind, "id": id })).into_response());
    if !term.is_empty() && term.bytes().all(|b| b.is_ascii_digit()) {
        let height: Height = term
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{term:?} is not a height")))?;
        if node.reader.block(height).map_err(offline)?.is_some() {
            return found("block", height.to_string());
        }
    } else if digits.len() == 40 {
        if let Ok(a) = term.parse::<Address>() {
            return found("account", a.to_string());
        }
    } else if digits.len() == 64
        && let Ok(h) = parse_hash(digits)
    {
        if node.reader.tx(&h).map_err(offline)?.is_some() {
            return found("tx", hex0x(&h));
        }
        if let Some(height) = node.reader.height_of(&h).map_err(offline)? {
            return found("block", height.to_string());
        }
    }
    found("none", String::new())
}

// ----- the block stream (API-UI-4) ------------------------------------------

/// One open stream; the count drops with it.
struct Subscriber(Arc<AtomicUsize>);

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct StreamState {
    node: NodeHandle,
    explorer: Explorer,
    rx: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    /// The last height sent.
    sent: Height,
    done: bool,
    _subscriber: Subscriber,
}

fn block_event(node: &NodeHandle, snap: &Snapshot, s: &BlockSummary, online: usize) -> Event {
    let mut v = live_json(node, snap, online);
    v["block"] = json!(s);
    Event::default()
        .event("block")
        .id(s.height.to_string())
        .data(v.to_string())
}

/// The next event of a stream, waiting for a commit if there is none.
async fn next_event(mut st: StreamState) -> Option<(Result<Event, Infallible>, StreamState)> {
    if st.done {
        return None;
    }
    loop {
        let snap = st.rx.borrow_and_update().clone();
        let head = snap.height();
        if head > st.sent {
            st.explorer.catch_up(&st.node, &snap);
            if head - st.sent > MAX_STREAM_LAG_BLOCKS {
                st.done = true;
                let e = Event::default().event("lagged").data(
                    json!({ "height": head, "sent": st.sent, "max_lag_blocks": MAX_STREAM_LAG_BLOCKS })
                        .to_string(),
                );
                return Some((Ok(e), st));
            }
            let (next, online) = {
                let index = st.explorer.lock();
                (
                    index.blocks().find(|b| b.height > st.sent).cloned(),
                    index.online(snap.ledger.active_set(), head),
                )
            };
            if let Some(s) = next {
                st.sent = s.height;
                let e = block_event(&st.node, &snap, &s, online);
                return Some((Ok(e), st));
            }
            // Not in the index (it skipped a gap): continue from the head.
            st.sent = head;
        }
        if st.rx.changed().await.is_err() {
            return None;
        }
    }
}

/// Server-sent events of committed blocks (API-UI-4): `event: block` with
/// the block's summary and the live essentials (height, mempool size,
/// finality, validators online), one per committed block starting with the
/// newest; `event: lagged` before a slow client is dropped. Needs
/// `Accept: text/event-stream`.
#[utoipa::path(get, path = "/explorer/stream",
    responses((status = 200, content_type = "text/event-stream", description = "`event: block` per committed block", body = String),
              (status = 406, body = super::openapi::ErrorBody), (status = 503, body = super::openapi::ErrorBody)))]
pub async fn stream(
    State(state): State<ApiState>,
    axum::Extension(ex): Ex,
    headers: HeaderMap,
) -> ApiResult {
    let wants_events = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"));
    if !wants_events {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            code::VALIDATION_FAILED,
            "not_acceptable",
            "this route is a stream of server-sent events: send `Accept: text/event-stream`",
        ));
    }
    let taken = ex.subscribers.fetch_add(1, Ordering::AcqRel);
    let subscriber = Subscriber(ex.subscribers.clone());
    if taken >= MAX_STREAM_SUBSCRIBERS {
        return Err(ApiError::offline(format!(
            "{MAX_STREAM_SUBSCRIBERS} block streams are open; retry later"
        )));
    }
    let snap = ex.current(&state.node);
    let st = StreamState {
        rx: state.node.snapshot.clone(),
        node: state.node.clone(),
        explorer: ex,
        // Starts with the newest block.
        sent: snap.height().saturating_sub(1),
        done: false,
        _subscriber: subscriber,
    };
    let events = futures_util::stream::unfold(st, next_event);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blyan_state_machine::testkit::{address, key, transfer};

    fn committed(height: Height, txs: Vec<SignedTx>) -> CommittedBlock {
        use blyan_state_machine::block::{Block, BlockBody, BlockHeader};
        use blyan_state_machine::consensus::CommitCertificate;
        CommittedBlock {
            block: Block {
                header: BlockHeader {
                    ticket: None,
                    height,
                    time_ms: height * 1000,
                    prev_hash: [0; 32],
                    proposer: Address::ZERO,
                    base_fee_per_gas: 7,
                    gas_limit: 1,
                    gas_used: 0,
                    body_hash: [0; 32],
                    state_root: [0; 32],
                    receipts_hash: [0; 32],
                },
                body: BlockBody {
                    evidence: vec![],
                    last_commit_signers: vec![],
                    txs,
                },
            },
            certificate: CommitCertificate {
                height,
                round: 0,
                value: [0; 32],
                signatures: vec![],
            },
        }
    }

    #[test]
    fn api_ui_3_the_index_is_bounded_and_follows_the_newest_blocks() {
        let mut ix = RecentIndex::default();
        assert!(ix.wanted(0).is_empty(), "nothing at genesis");
        assert_eq!(ix.wanted(1000), 745..=1000, "starts with the newest");
        let (alice, bob) = (key(1), address(&key(2)));
        for h in 745..=1000 {
            let txs = if h == 900 {
                vec![transfer("c", &alice, 0, bob, 5)]
            } else {
                vec![]
            };
            ix.push(&committed(h, txs));
        }
        assert!(ix.wanted(1000).is_empty(), "up to date");
        assert_eq!(ix.blocks().count(), RECENT_BLOCKS);
        assert_eq!(ix.block(900).unwrap().txs, 1);
        assert_eq!(ix.block(744), None);
        assert_eq!(ix.indexed_from(), Some(745));
        // Sender and recipient both see it.
        assert_eq!(ix.txs_of(&bob).len(), 1);
        assert_eq!(ix.txs_of(&address(&alice)), ix.txs_of(&bob));
        // A block already indexed is ignored; past a gap the list restarts.
        ix.push(&committed(1000, vec![]));
        assert_eq!(ix.blocks().count(), RECENT_BLOCKS);
        ix.push(&committed(2000, vec![]));
        assert_eq!(ix.blocks().map(|b| b.height).collect::<Vec<_>>(), [2000]);
        // Per address: the newest TXS_PER_ADDRESS, newest first.
        for n in 0..TXS_PER_ADDRESS as u64 + 5 {
            ix.push(&committed(2001 + n, vec![transfer("c", &alice, n, bob, 1)]));
        }
        let mine = ix.txs_of(&bob);
        assert_eq!(mine.len(), TXS_PER_ADDRESS);
        assert_eq!(mine[0].0, 2001 + TXS_PER_ADDRESS as u64 + 4);
        assert_eq!(ix.addresses(), 2);
    }

    #[test]
    fn validators_online_signed_a_recent_certificate() {
        let (a, b, c) = (address(&key(1)), address(&key(2)), address(&key(3)));
        let active = [(a, 1), (b, 1), (c, 1)];
        let mut ix = RecentIndex::default();
        for h in 1..=20 {
            let mut blk = committed(h, vec![]);
            // `a` signs every certificate, `b` only block 5's, `c` none, but
            // `c`'s precommit for block 19 is carried in block 20.
            blk.certificate.signatures = if h == 5 {
                vec![(a, [0; 64]), (b, [0; 64])]
            } else {
                vec![(a, [0; 64])]
            };
            if h == 20 {
                blk.block.body.last_commit_signers = vec![c];
            }
            ix.push(&blk);
        }
        assert_eq!(ix.online(&active, 20), 2, "a and c");
        assert_eq!(ix.online(&active, 40), 0, "nothing signed lately");
    }

    #[test]
    fn api_ui_3_the_least_recently_active_address_is_forgotten_first() {
        let mut ix = RecentIndex::default();
        for i in 0..MAX_INDEXED_ADDRESSES as u64 + 2 {
            let mut a = [0u8; 20];
            a[..8].copy_from_slice(&i.to_be_bytes());
            ix.note(Address(a), 1, [0; 32]);
        }
        assert_eq!(ix.addresses(), MAX_INDEXED_ADDRESSES);
        assert!(ix.txs_of(&Address::ZERO).is_empty(), "the first forgotten");
        let mut last = [0u8; 20];
        last[..8].copy_from_slice(&(MAX_INDEXED_ADDRESSES as u64 + 1).to_be_bytes());
        assert_eq!(ix.txs_of(&Address(last)).len(), 1);
    }

    #[test]
    fn api_ui_5_quantiles_are_bucket_upper_bounds() {
        let mut f = Histogram::default();
        assert_eq!(finality_quantile_le_ms(&f, 500_000), None);
        // 10 samples: 9 ≤ 250 ms, 1 ≤ 2,000 ms (cumulative buckets).
        f.buckets = [0, 9, 9, 9, 10, 10, 10, 10];
        f.count = 10;
        assert_eq!(finality_quantile_le_ms(&f, 500_000), Some(250));
        assert_eq!(finality_quantile_le_ms(&f, 900_000), Some(250));
        assert_eq!(finality_quantile_le_ms(&f, 990_000), Some(2_000));
        // A sample above the last bucket: no bound.
        f.count = 11;
        assert_eq!(finality_quantile_le_ms(&f, 990_000), None);
    }

    #[test]
    fn api_ui_5_a_blocks_finality_is_the_mean_of_what_it_committed() {
        let mut ix = RecentIndex::default();
        ix.push(&committed(1, vec![]));
        let mut f = Histogram {
            count: 2,
            sum_ms: 600,
            ..Histogram::default()
        };
        ix.observe_finality(&f);
        assert_eq!(ix.block(1).unwrap().finality_ms, Some(300));
        ix.push(&committed(2, vec![]));
        ix.observe_finality(&f);
        assert_eq!(ix.block(2).unwrap().finality_ms, None, "nothing new");
        f.count = 3;
        f.sum_ms = 700;
        ix.observe_finality(&f);
        assert_eq!(ix.block(2).unwrap().finality_ms, Some(100));
    }

    #[test]
    fn api_ui_1_every_file_the_page_loads_is_embedded() {
        let names: Vec<&str> = ASSETS.iter().map(|(n, _, _)| *n).collect();
        let mut wanted = Vec::new();
        for text in ASSETS.iter().map(|(_, _, b)| *b).chain([INDEX_HTML]) {
            for part in text.split("from './").skip(1) {
                wanted.push(part.split('\'').next().unwrap().to_string());
            }
            for part in text.split("/ui/").skip(1) {
                let name: String = part
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '.' || *c == '-')
                    .collect();
                wanted.push(name);
            }
        }
        assert!(wanted.len() >= 6, "{wanted:?}");
        for w in &wanted {
            assert!(
                names.contains(&w.as_str()),
                "{w} is loaded but not embedded"
            );
        }
        assert!(INDEX_HTML.contains("{{chain_id}}") && INDEX_HTML.contains("{{height}}"));
        assert_eq!(
            escape_html("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
