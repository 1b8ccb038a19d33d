//! Paid inference in the runtime (spec/api.md API-KEY-*, API-PAY-*): API
//! keys checked against this node's copy of the chain state, the meter that
//! reserves and records what each request costs, and the settler that turns
//! recorded usage into batched `SettleUsage` transactions (TX-15).
//!
//! [`Meter`] is plain data behind a mutex (no IO, no clock): the rules that
//! keep a node from serving more than an allowance can pay live there and
//! are unit-tested. [`run_settler`] is the effectful loop around it.
//!
//! - **API-PAY-1** A request with a key reserves, before the engine starts,
//!   the cost of at most `prompt bytes + max_tokens` tokens (a token covers
//!   at least one byte of the prompt, so this bounds the prompt's tokens),
//!   cut to what the allowance has left for this node: its on-chain
//!   availability (ALW-1) minus this node's unsettled and in-flight charges
//!   and other requests' reservations. The engine is told the total token
//!   budget; a completion that reaches it ends with `finish_reason: length`
//!   (outcome `cap_reached`). Nothing left: `402`.
//! - **API-PAY-2** When the request ends, the reservation is released and the
//!   request's exact price (ALW-5 of its prompt and completion tokens) is
//!   recorded as unsettled usage with a fresh request id. A request that
//!   fails or is cancelled is not charged.
//! - **API-PAY-3** At least every `settle_interval_blocks` the node submits
//!   its unsettled usage as `SettleUsage` transactions (at most 256 items
//!   each, one allowance each) signed by its key, and waits for each to
//!   commit. Committed: the charge leaves the meter once the snapshot the
//!   API reads includes it. Failed on chain: the usage is dropped and
//!   counted (`blyan_settlement_failed_items_total`). Dropped from the pool
//!   or not committed within `SETTLE_WAIT_BLOCKS`: it is queued again (its
//!   request ids are fresh, so a late commit cannot double-charge: the core
//!   refuses a request id twice, INV-RECEIPT-ONCE).
//! - **API-PAY-4** Unsettled usage is bounded (`max_unsettled_requests`):
//!   when full, paid requests are refused with `503` until settlement
//!   catches up; free requests are unaffected.

use crate::api::ApiError;
use blyan_state_machine::allowance::{
    self, ApiKey, KeyRefusal, MAX_SETTLE_ITEMS, RouteShare, Settlement, UsageItem,
};
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::types::{Address, Amount, Hash32, Height};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// `[api]` settings of paid inference.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentConfig {
    /// Serve `/chat` and `/v1/chat/completions` without a key (API-KEY-4).
    /// Off by default; the devnet turns it on.
    pub free_inference: bool,
    /// API-PAY-3: settle at least this often (blocks). Must be below the
    /// chain's `allowance_grace_blocks`.
    pub settle_interval_blocks: u64,
    /// API-PAY-4: most recorded-but-unsettled paid requests.
    pub max_unsettled_requests: usize,
}

impl Default for PaymentConfig {
    fn default() -> Self {
        PaymentConfig {
            free_inference: false,
            settle_interval_blocks: 10,
            max_unsettled_requests: 100_000,
        }
    }
}

impl PaymentConfig {
    /// Relations with the chain's parameters (checked at start-up).
    pub fn check(&self, grace_blocks: u64) -> Result<(), String> {
        if self.settle_interval_blocks == 0 || self.settle_interval_blocks >= grace_blocks {
            return Err(format!(
                "api.settle_interval_blocks must be in 1..{grace_blocks} (the chain's allowance_grace_blocks), not {}",
                self.settle_interval_blocks
            ));
        }
        if self.max_unsettled_requests == 0 {
            return Err("api.max_unsettled_requests must be positive".into());
        }
        Ok(())
    }
}

/// API-PAY-3: blocks to wait for a settlement to commit before queueing its
/// usage again.
pub const SETTLE_WAIT_BLOCKS: u64 = 30;

/// A checked key (API-KEY-3) with what the chain says is left for this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payer {
    /// API-KEY-5: SHA3-256 of the key string.
    pub key_id: Hash32,
    pub allowance: Hash32,
    /// On chain, for this node (ALW-1 `available_to`), at `height`.
    pub available: Amount,
    pub height: Height,
}

/// API-KEY-3: checks `key` against `ledger` for `node`. An exhausted
/// allowance is a valid key with nothing available (the caller answers
/// `402` where it matters); every other refusal is `401`.
pub fn check_key(
    ledger: &Ledger,
    chain_id: &str,
    node: &Address,
    key: &str,
) -> Result<Payer, KeyRefusal> {
    let parsed = ApiKey::parse(key)?;
    let allowance = ledger.allowance(&parsed.grant.allowance);
    let available = match allowance::authorize(chain_id, &parsed, allowance, node, ledger.height())
    {
        Ok(a) => a,
        Err(KeyRefusal::Exhausted) => 0,
        Err(e) => return Err(e),
    };
    Ok(Payer {
        key_id: parsed.id(),
        allowance: parsed.grant.allowance,
        available,
        height: ledger.height(),
    })
}

/// Why a paid request cannot start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MeterRefusal {
    #[error("the allowance has nothing left for this node (unsettled charges included)")]
    Exhausted,
    #[error("{0} paid requests await settlement; retry when settlement catches up")]
    Full(usize),
}

impl MeterRefusal {
    pub fn into_api_error(self) -> ApiError {
        match self {
            MeterRefusal::Exhausted => ApiError::new(
                http::StatusCode::PAYMENT_REQUIRED,
                crate::api::code::VALIDATION_FAILED,
                "insufficient_quota",
                self.to_string(),
            ),
            MeterRefusal::Full(_) => ApiError::offline(self.to_string()),
        }
    }
}

/// A request's hold on an allowance (API-PAY-1).
#[derive(Debug)]
#[must_use = "a reservation is released with Meter::complete"]
pub struct Reservation {
    pub allowance: Hash32,
    pub cost: Amount,
    /// The request may use at most this many tokens, prompt included.
    pub max_total_tokens: u64,
}

#[derive(Debug, Default)]
struct Account {
    reserved: Amount,
    unsettled: Vec<UsageItem>,
    unsettled_cost: Amount,
    /// Submitted settlements: (tx id, items, cost, height it committed at).
    in_flight: Vec<InFlight>,
}

#[derive(Debug)]
struct InFlight {
    tx: Hash32,
    settlement: Settlement,
    cost: Amount,
    committed_at: Option<Height>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct MeterCounters {
    pub requests_charged: AtomicU64,
    pub tokens_charged: AtomicU64,
    pub refused_exhausted: AtomicU64,
    pub settlements_committed: AtomicU64,
    pub settled_items: AtomicU64,
    pub failed_items: AtomicU64,
    pub requeued_items: AtomicU64,
}

/// API-PAY-1..4: what this node has reserved, charged and settled, per allowance.
#[derive(Debug)]
pub struct Meter {
    node: Address,
    price_per_1k_tokens: Amount,
    max_unsettled: usize,
    accounts: Mutex<BTreeMap<Hash32, Account>>,
    seq: AtomicU64,
    pub counters: MeterCounters,
}

impl Meter {
    pub fn new(node: Address, price_per_1k_tokens: Amount, max_unsettled: usize) -> Meter {
        assert!(price_per_1k_tokens > 0, "PARAM-3: a positive price");
        Meter {
            node,
            price_per_1k_tokens,
            max_unsettled,
            accounts: Mutex::new(BTreeMap::new()),
            seq: AtomicU64::new(0),
            counters: MeterCounters::default(),
        }
    }

    pub fn node(&self) -> Address {
        self.node
    }

    pub fn price_per_1k_tokens(&self) -> Amount {
        self.price_per_1k_tokens
    }

    /// ALW-5.
    pub fn price(&self, tokens: u64) -> Amount {
        allowance::price(tokens, self.price_per_1k_tokens)
    }

    /// Most tokens whose price fits in `budget`.
    fn tokens_within(&self, budget: Amount) -> u64 {
        let t = budget.saturating_mul(1000) / self.price_per_1k_tokens;
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// What this node holds against `allowance` beyond the chain's view at
    /// `height`: reservations, unsettled usage, and settlements the
    /// snapshot at `height` does not yet include.
    fn held(a: &Account, height: Height) -> Amount {
        let in_flight: Amount = a
            .in_flight
            .iter()
            .filter(|f| f.committed_at.is_none_or(|h| h > height))
            .map(|f| f.cost)
            .sum();
        a.reserved + a.unsettled_cost + in_flight
    }

    fn unsettled_requests(accounts: &BTreeMap<Hash32, Account>) -> usize {
        accounts
            .values()
            .map(|a| {
                a.unsettled.len()
                    + a.in_flight
                        .iter()
                        .map(|f| f.settlement.items.len())
                        .sum::<usize>()
            })
            .sum()
    }

    /// API-PAY-1: reserves up to `want_tokens` (prompt bytes + max_tokens).
    pub fn reserve(&self, payer: &Payer, want_tokens: u64) -> Result<Reservation, MeterRefusal> {
        let mut accounts = self.accounts.lock().expect("meter lock");
        let pending = Self::unsettled_requests(&accounts);
        if pending >= self.max_unsettled {
            return Err(MeterRefusal::Full(pending));
        }
        let a = accounts.entry(payer.allowance).or_default();
        let left = payer.available.saturating_sub(Self::held(a, payer.height));
        let tokens = want_tokens.min(self.tokens_within(left));
        if tokens == 0 {
            self.counters
                .refused_exhausted
                .fetch_add(1, Ordering::Relaxed);
            if a.reserved == 0 && a.unsettled.is_empty() && a.in_flight.is_empty() {
                accounts.remove(&payer.allowance);
            }
            return Err(MeterRefusal::Exhausted);
        }
        let cost = self.price(tokens);
        assert!(
            cost <= left,
            "tokens_within keeps the price within the budget"
        );
        a.reserved += cost;
        Ok(Reservation {
            allowance: payer.allowance,
            cost,
            max_total_tokens: tokens,
        })
    }

    /// API-PAY-2: releases `r` and records the usage (if the request was
    /// served by this node). Returns the request's id and price.
    pub fn complete(
        &self,
        r: Reservation,
        model: Hash32,
        served: Option<(u64, u64)>,
        route_work: u64,
    ) -> Option<(Hash32, Amount)> {
        let tokens = served.map_or(0, |(p, c)| p + c);
        let route = route_of(self.node, self.node, route_work, tokens);
        self.complete_by(r, model, served, route)
    }

    /// [`Meter::complete`] for a request computed by `node` (RT-STAGE-5):
    /// its share is `route_work` per token; when it is not this node, this
    /// node (the router: tokenizer, sampling, the client's stream, and the
    /// settler, which TX-15 requires on the route) adds a share of 1 per
    /// token ([`route_of`]).
    pub fn complete_by(
        &self,
        r: Reservation,
        model: Hash32,
        served: Option<(u64, u64)>,
        route: Vec<RouteShare>,
    ) -> Option<(Hash32, Amount)> {
        let mut accounts = self.accounts.lock().expect("meter lock");
        let a = accounts.entry(r.allowance).or_default();
        a.reserved = a
            .reserved
            .checked_sub(r.cost)
            .expect("a reservation is released once");
        let (prompt, completion) = served?;
        let tokens = prompt + completion;
        if tokens == 0 {
            return None;
        }
        assert!(
            tokens <= r.max_total_tokens,
            "the engine kept within the reserved tokens ({tokens} > {})",
            r.max_total_tokens
        );
        let cost = self.price(tokens);
        let request_id = self.next_request_id();
        a.unsettled.push(UsageItem {
            request_id,
            model,
            prompt_tokens: prompt,
            completion_tokens: completion,
            route,
        });
        a.unsettled_cost += cost;
        self.counters
            .requests_charged
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .tokens_charged
            .fetch_add(tokens, Ordering::Relaxed);
        Some((request_id, cost))
    }

    /// A request id no other request of this node has: SHA3 of the node's
    /// address, a salt drawn once per process (wall-clock nanoseconds and
    /// the process id: a restarted node does not reuse the ids of usage it
    /// settled before) and a sequence number.
    pub fn next_request_id(&self) -> Hash32 {
        static SALT: std::sync::OnceLock<[u8; 20]> = std::sync::OnceLock::new();
        let salt = SALT.get_or_init(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let mut s = [0u8; 20];
            s[..16].copy_from_slice(&nanos.to_be_bytes());
            s[16..].copy_from_slice(&std::process::id().to_be_bytes());
            s
        });
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut b = Vec::with_capacity(48);
        b.extend_from_slice(&self.node.0);
        b.extend_from_slice(salt);
        b.extend_from_slice(&n.to_be_bytes());
        blyan_state_machine::crypto::sha3_256(&b)
    }

    /// API-PAY-3: unsettled usage as settlements (≤ 256 items each), moved
    /// out of the unsettled list. [`Meter::submitted`] or
    /// [`Meter::requeue`] must follow for each.
    pub fn take(&self) -> Vec<Settlement> {
        let mut accounts = self.accounts.lock().expect("meter lock");
        let mut out = Vec::new();
        for (id, a) in accounts.iter_mut() {
            if a.unsettled.is_empty() {
                continue;
            }
            let items = std::mem::take(&mut a.unsettled);
            a.unsettled_cost = 0;
            for chunk in items.chunks(MAX_SETTLE_ITEMS) {
                out.push(Settlement {
                    allowance: *id,
                    items: chunk.to_vec(),
                });
            }
        }
        out
    }

    fn settlement_cost(&self, s: &Settlement) -> Amount {
        s.items.iter().map(|i| self.price(i.tokens())).sum()
    }

    /// A taken settlement was submitted as transaction `tx`.
    pub fn submitted(&self, tx: Hash32, s: Settlement) {
        let cost = self.settlement_cost(&s);
        let mut accounts = self.accounts.lock().expect("meter lock");
        accounts
            .entry(s.allowance)
            .or_default()
            .in_flight
            .push(InFlight {
                tx,
                settlement: s,
                cost,
                committed_at: None,
            });
    }

    /// A taken settlement goes back to the unsettled list (not submitted,
    /// dropped from the pool, or not committed in time).
    pub fn requeue(&self, s: Settlement) {
        let cost = self.settlement_cost(&s);
        let mut accounts = self.accounts.lock().expect("meter lock");
        let a = accounts.entry(s.allowance).or_default();
        self.counters
            .requeued_items
            .fetch_add(s.items.len() as u64, Ordering::Relaxed);
        a.unsettled_cost += cost;
        a.unsettled.extend(s.items);
    }

    /// The in-flight settlement `tx` committed at `height`: `ok` if it
    /// succeeded (its charge is now on chain), else its usage is lost.
    pub fn committed(&self, tx: &Hash32, height: Height, ok: bool) {
        let mut accounts = self.accounts.lock().expect("meter lock");
        for a in accounts.values_mut() {
            if let Some(i) = a.in_flight.iter().position(|f| f.tx == *tx) {
                let items = a.in_flight[i].settlement.items.len() as u64;
                if ok {
                    a.in_flight[i].committed_at = Some(height);
                    self.counters
                        .settlements_committed
                        .fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .settled_items
                        .fetch_add(items, Ordering::Relaxed);
                } else {
                    a.in_flight.remove(i);
                    self.counters
                        .failed_items
                        .fetch_add(items, Ordering::Relaxed);
                }
                return;
            }
        }
    }

    /// Takes back the in-flight settlement `tx` (to requeue it).
    pub fn withdraw(&self, tx: &Hash32) -> Option<Settlement> {
        let mut accounts = self.accounts.lock().expect("meter lock");
        for a in accounts.values_mut() {
            if let Some(i) = a.in_flight.iter().position(|f| f.tx == *tx) {
                return Some(a.in_flight.remove(i).settlement);
            }
        }
        None
    }

    /// Forgets committed settlements that the snapshot at `height` includes,
    /// and empty accounts.
    pub fn prune(&self, height: Height) {
        let mut accounts = self.accounts.lock().expect("meter lock");
        for a in accounts.values_mut() {
            a.in_flight
                .retain(|f| f.committed_at.is_none_or(|h| h > height));
        }
        accounts
            .retain(|_, a| a.reserved > 0 || !a.unsettled.is_empty() || !a.in_flight.is_empty());
    }

    /// Charges recorded but not yet on chain for `allowance` (display).
    pub fn pending_cost(&self, allowance: &Hash32, height: Height) -> Amount {
        let accounts = self.accounts.lock().expect("meter lock");
        accounts
            .get(allowance)
            .map_or(0, |a| Self::held(a, height) - a.reserved)
    }

    /// Paid requests recorded and not yet settled on chain.
    pub fn unsettled(&self) -> usize {
        Self::unsettled_requests(&self.accounts.lock().expect("meter lock"))
    }
}

/// API-PAY-3: the settler. Every `poll_ms` it looks at the node's latest
/// snapshot; once `settle_interval_blocks` passed since the last round (or
/// at once if none is in flight and usage waits longer than that), it
/// submits the meter's unsettled usage as `SettleUsage` transactions signed
/// by the node's key ([`crate::own_tx`]), then follows each until it commits, fails, is dropped, or
/// `SETTLE_WAIT_BLOCKS` pass.
pub async fn run_settler(
    node: crate::service::NodeHandle,
    own: std::sync::Arc<crate::own_tx::OwnTxs>,
    meter: std::sync::Arc<Meter>,
    interval_blocks: u64,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use blyan_state_machine::tx::TxKind;
    let mut last_round: Height = 0;
    // (tx id, submitted at height)
    let mut waiting: Vec<(Hash32, Height)> = Vec::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(SETTLER_POLL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let snap = crate::api::snapshot(&node);
        let height = snap.ledger.height();
        // Follow the submitted settlements.
        let mut still = Vec::new();
        for (tx, at) in waiting.drain(..) {
            match node.reader.tx(&tx) {
                Ok(Some(loc)) if loc.height <= height => {
                    let ok = loc.receipt.failure.is_none();
                    if let Some(why) = &loc.receipt.failure {
                        tracing::warn!(tx = %hex::encode(tx), %why, "settlement failed on chain; its usage is lost");
                    }
                    meter.committed(&tx, loc.height, ok);
                }
                _ => {
                    let dropped = node
                        .dropped
                        .lock()
                        .expect("dropped lock")
                        .reason(&tx)
                        .is_some();
                    if dropped || height > at + SETTLE_WAIT_BLOCKS {
                        own.reset();
                        if let Some(s) = meter.withdraw(&tx) {
                            meter.requeue(s);
                        }
                    } else {
                        still.push((tx, at));
                    }
                }
            }
        }
        waiting = still;
        meter.prune(height);
        if !waiting.is_empty() || height < last_round + interval_blocks {
            continue;
        }
        let batches = meter.take();
        if batches.is_empty() {
            continue;
        }
        last_round = height;
        for s in batches {
            // NODE-OWN-1: the nonce comes from the node's one sequence.
            let kind = TxKind::SettleUsage(Box::new(s.clone()));
            match own.submit(&node, kind).await {
                Ok(id) => {
                    meter.submitted(id, s);
                    waiting.push((id, height));
                }
                Err(e) => {
                    tracing::warn!(error = %e.message, "settlement not accepted by the pool; retrying next round");
                    meter.requeue(s);
                }
            }
        }
    }
}

/// How often the settler looks at the chain.
pub const SETTLER_POLL_MS: u64 = 500;

/// RT-STAGE-5, ALW-6: the route of a request the router `me` took and
/// `server` computed: `server` earns `route_work` (its layers) per token;
/// a router that is not the server earns 1 per token; sorted by node.
pub fn route_of(me: Address, server: Address, route_work: u64, tokens: u64) -> Vec<RouteShare> {
    let mut route = vec![RouteShare {
        node: server,
        work: route_work.max(1).saturating_mul(tokens),
    }];
    if me != server {
        route.push(RouteShare {
            node: me,
            work: tokens.max(1),
        });
        route.sort_by_key(|s| s.node);
    }
    route
}

/// RT-PIPE-3: a pipeline's route: each stage's node with its layers per
/// token (a node on several stages once, its work summed) and the router,
/// which settles (TX-15), with 1 per token unless it is a stage; sorted.
pub fn route_of_stages(me: Address, stages: &[(Address, u64)], tokens: u64) -> Vec<RouteShare> {
    let mut work: std::collections::BTreeMap<Address, u64> = std::collections::BTreeMap::new();
    for &(node, layers) in stages {
        let w = work.entry(node).or_default();
        *w = w.saturating_add(layers.max(1).saturating_mul(tokens));
    }
    work.entry(me).or_insert(tokens.max(1));
    // TX-15 settles at most MAX_ROUTE_NODES shares: beyond that the
    // smallest shares (ties: the highest address) are folded into the
    // router's, so the request is still settled.
    let max = blyan_state_machine::allowance::MAX_ROUTE_NODES;
    if work.len() > max {
        let mut by_size: Vec<(u64, Address)> = work
            .iter()
            .filter(|(n, _)| **n != me)
            .map(|(n, w)| (*w, *n))
            .collect();
        by_size.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (w, n) in by_size.into_iter().skip(max - 1) {
            work.remove(&n);
            let r = work.entry(me).or_default();
            *r = r.saturating_add(w);
        }
    }
    work.into_iter()
        .map(|(node, work)| RouteShare { node, work })
        .collect()
}

/// RT-PIPE-8: the work per token of one stage of a route, per node, for
/// [`route_of_stages`]: a dense stage's node does one unit per layer; in an
/// MoE stage (`placement` non-empty) each layer gives one unit to the
/// stage's node (attention and routing) and one to every node that computed
/// a used expert of that layer (the stage's node included when it computed
/// one itself), so expert holders are paid for the layers they served.
pub fn stage_work(
    node: Address,
    (first, last): (u32, u32),
    placement: &[blyan_route::route::ExpertAssignment],
    used: &[(u32, u16)],
) -> Vec<(Address, u64)> {
    if placement.is_empty() {
        return vec![(node, u64::from(last - first + 1))];
    }
    let mut work: std::collections::BTreeMap<Address, u64> = Default::default();
    for layer in first..=last {
        *work.entry(node).or_default() += 1;
        let computed: std::collections::BTreeSet<Address> = used
            .iter()
            .filter(|(l, _)| *l == layer)
            .filter_map(|(l, e)| {
                placement
                    .iter()
                    .find(|a| a.layer == *l && a.expert == *e)
                    .map(|a| a.node)
            })
            .collect();
        for n in computed {
            *work.entry(n).or_default() += 1;
        }
    }
    work.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TX-15: a route of more paying nodes than a settlement takes keeps
    /// the largest shares and folds the rest into the router's.
    #[test]
    fn rt_pipe_8_long_routes_fold_into_the_router() {
        let max = blyan_state_machine::allowance::MAX_ROUTE_NODES;
        let me = Address([0; 20]);
        let stages: Vec<(Address, u64)> = (1..=(max as u8 + 4))
            .map(|i| (Address([i; 20]), u64::from(i)))
            .collect();
        let r = route_of_stages(me, &stages, 10);
        assert_eq!(r.len(), max);
        let total: u64 = r.iter().map(|s| s.work).sum();
        let want: u64 = stages.iter().map(|s| s.1 * 10).sum::<u64>() + 10;
        assert_eq!(total, want, "no work is lost");
        // The smallest stages (1..=5) were folded into the router's share.
        let mine = r.iter().find(|s| s.node == me).unwrap().work;
        assert_eq!(mine, 10 + (1..=5).map(|i| i * 10).sum::<u64>());
        assert!(r.iter().all(|s| s.node == me || s.node.0[0] > 5));
    }

    /// RT-PIPE-8: expert holders earn a unit per layer whose used experts
    /// they computed; the stage a unit per layer plus its own experts'.
    #[test]
    fn rt_pipe_8_stage_work_pays_expert_holders() {
        use blyan_route::route::ExpertAssignment;
        let (s, x) = (Address([1; 20]), Address([2; 20]));
        assert_eq!(stage_work(s, (0, 1), &[], &[]), vec![(s, 2)]);
        let placed = |layer, expert, node| ExpertAssignment {
            layer,
            expert,
            node,
        };
        let placement = [
            placed(0, 0, s),
            placed(0, 1, x),
            placed(1, 0, s),
            placed(1, 1, x),
        ];
        // Layer 0 used both experts, layer 1 only the stage's own.
        let w = stage_work(s, (0, 1), &placement, &[(0, 0), (0, 1), (1, 0)]);
        assert_eq!(w, vec![(s, 4), (x, 1)]);
        // Nothing used on x: x earns nothing.
        let w = stage_work(s, (0, 1), &placement, &[(0, 0), (1, 0)]);
        assert_eq!(w, vec![(s, 4)]);
    }

    /// RT-PIPE-3: each stage earns its layers per token, the router 1 per
    /// token when it ran no stage; sorted, one share per node.
    #[test]
    fn rt_pipe_3_route_of_stages_splits_work_by_layers() {
        let (a, b, c) = (Address([1; 20]), Address([2; 20]), Address([3; 20]));
        let r = route_of_stages(c, &[(b, 2), (a, 2)], 10);
        let got: Vec<_> = r.iter().map(|s| (s.node, s.work)).collect();
        assert_eq!(got, vec![(a, 20), (b, 20), (c, 10)]);
        // The router runs a stage itself: no extra share.
        let r = route_of_stages(a, &[(a, 1), (b, 3)], 5);
        let got: Vec<_> = r.iter().map(|s| (s.node, s.work)).collect();
        assert_eq!(got, vec![(a, 5), (b, 15)]);
    }

    /// RT-STAGE-5: the server's share is its layers per token; a router that
    /// is not the server (the settler, TX-15) adds 1 per token; sorted.
    #[test]
    fn rt_stage_5_route_of_names_server_and_router() {
        let (a, b) = (Address([1; 20]), Address([2; 20]));
        let local = route_of(a, a, 4, 10);
        assert_eq!(local.len(), 1);
        assert_eq!((local[0].node, local[0].work), (a, 40));
        for (me, server) in [(a, b), (b, a)] {
            let r = route_of(me, server, 4, 10);
            assert_eq!(r.len(), 2);
            assert!(r[0].node < r[1].node, "sorted");
            let work = |n| r.iter().find(|s| s.node == n).unwrap().work;
            assert_eq!((work(server), work(me)), (40, 10));
        }
    }
    use blyan_state_machine::types::BLY;

    fn payer(available: Amount) -> Payer {
        Payer {
            key_id: [1; 32],
            allowance: [2; 32],
            available,
            height: 10,
        }
    }

    fn meter() -> Meter {
        Meter::new(Address([9; 20]), BLY, 1_000)
    }

    #[test]
    fn api_pay_1_reservations_never_exceed_what_is_left() {
        let m = meter();
        // 1 BLY buys 1,000 tokens.
        let p = payer(BLY);
        let r1 = m.reserve(&p, 600).unwrap();
        assert_eq!(r1.max_total_tokens, 600);
        let r2 = m.reserve(&p, 600).unwrap();
        assert_eq!(r2.max_total_tokens, 400, "cut to the rest");
        assert_eq!(m.reserve(&p, 1).unwrap_err(), MeterRefusal::Exhausted);
        // The first request used 100 tokens; 500 come back.
        m.complete(r1, [0; 32], Some((60, 40)), 4).unwrap();
        let r3 = m.reserve(&p, 10_000).unwrap();
        assert_eq!(r3.max_total_tokens, 500);
        m.complete(r2, [0; 32], None, 4);
        m.complete(r3, [0; 32], None, 4);
        assert_eq!(m.pending_cost(&p.allowance, 10), BLY / 10);
    }

    #[test]
    fn api_pay_3_settled_charges_leave_the_meter_only_when_the_snapshot_has_them() {
        let m = meter();
        let p = payer(BLY);
        let r = m.reserve(&p, 1_000).unwrap();
        let (id, cost) = m.complete(r, [0; 32], Some((300, 200)), 2).unwrap();
        assert_eq!(cost, BLY / 2);
        let batch = m.take();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].items[0].request_id, id);
        assert_eq!(batch[0].items[0].route[0].work, 2 * 500);
        assert!(m.take().is_empty(), "taken once");
        m.submitted([7; 32], batch[0].clone());
        // In flight, it still counts against the allowance.
        let r = m.reserve(&p, 1_000).unwrap();
        assert_eq!(r.max_total_tokens, 500);
        m.complete(r, [0; 32], None, 1);
        m.committed(&[7; 32], 12, true);
        // A snapshot at height 11 does not include it: still held.
        assert_eq!(m.pending_cost(&p.allowance, 11), BLY / 2);
        // At 12 it does (and `available` there already excludes it).
        assert_eq!(m.pending_cost(&p.allowance, 12), 0);
        m.prune(12);
        assert_eq!(m.unsettled(), 0);
        assert_eq!(m.counters.settled_items.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn api_pay_3_failed_settlements_are_dropped_and_dropped_ones_requeued() {
        let m = meter();
        let p = payer(10 * BLY);
        for _ in 0..3 {
            let r = m.reserve(&p, 100).unwrap();
            m.complete(r, [0; 32], Some((50, 50)), 1).unwrap();
        }
        let batch = m.take().pop().unwrap();
        m.submitted([1; 32], batch);
        let back = m.withdraw(&[1; 32]).unwrap();
        m.requeue(back);
        assert_eq!(m.pending_cost(&p.allowance, 10), 3 * BLY / 10);
        let batch = m.take().pop().unwrap();
        assert_eq!(batch.items.len(), 3);
        m.submitted([2; 32], batch);
        m.committed(&[2; 32], 11, false);
        assert_eq!(m.pending_cost(&p.allowance, 10), 0);
        assert_eq!(m.counters.failed_items.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn api_pay_4_unsettled_usage_is_bounded() {
        let m = Meter::new(Address([9; 20]), BLY, 2);
        let p = payer(10 * BLY);
        for _ in 0..2 {
            let r = m.reserve(&p, 10).unwrap();
            m.complete(r, [0; 32], Some((5, 5)), 1).unwrap();
        }
        assert_eq!(m.reserve(&p, 10).unwrap_err(), MeterRefusal::Full(2));
    }

    #[test]
    fn settlements_are_cut_at_the_item_limit() {
        let m = Meter::new(Address([9; 20]), 1, 10_000);
        let p = payer(10 * BLY);
        for _ in 0..(MAX_SETTLE_ITEMS + 3) {
            let r = m.reserve(&p, 10).unwrap();
            m.complete(r, [0; 32], Some((1, 1)), 1).unwrap();
        }
        let batches = m.take();
        assert_eq!(
            batches.iter().map(|b| b.items.len()).collect::<Vec<_>>(),
            vec![MAX_SETTLE_ITEMS, 3]
        );
        let mut ids: Vec<Hash32> = batches
            .iter()
            .flat_map(|b| b.items.iter().map(|i| i.request_id))
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), MAX_SETTLE_ITEMS + 3, "request ids are distinct");
    }
}
