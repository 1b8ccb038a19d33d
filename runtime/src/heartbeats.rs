//! Heartbeats of inference nodes on the P2P network, and the table of live
//! holders they fill (spec/inference.md RT-HB-1..12; the pure rules are in
//! `blyan-route`'s `heartbeat` module, this is their IO).
//!
//! - Receiving (RT-HB-10): every node keeps a [`HeartbeatTable`]; a heartbeat
//!   arrives on the transport's `Heartbeat` method from a TLS-authenticated
//!   peer, which must be its sender, and is accepted by the pure rules
//!   against this node's committed state (RT-HB-2: only registered nodes).
//! - Sending (RT-HB-11): a node with `[inference] advertise = true` sends
//!   each dialled peer a heartbeat every `heartbeat_interval_ms`, naming
//!   that peer as its receiver, with what it holds and its load.
//! - Listing (RT-HB-12): `GET /nodes` pages the live entries with the age of
//!   their last heartbeat, this node's measured round trip and delivery
//!   success rate to them, their load and whether they are quarantined.

use crate::Error;
use crate::inference::InferenceHandle;
use crate::service::NodeHandle;
use crate::transport::{GrpcTransport, HeartbeatSink, PeerStatsMap, now_ms};
use blyan_route::heartbeat::{
    Entry, Heartbeat, HeartbeatConfig, HeartbeatTable, Holding, SignedHeartbeat,
};
use blyan_route::quarantine::{Quarantine, QuarantineConfig};
use blyan_route::route::{
    Candidate, LoadBook, ModelShape, Plan, PlanConfig, Planner, candidates_from_table,
};
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::node::PeerId;
use blyan_state_machine::pol::PolBlockType;
use blyan_state_machine::tx::public_key_of;
use blyan_state_machine::types::{Address, Hash32};
use k256::ecdsa::SigningKey;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info};

/// The node's table of live holders and what it measured of them.
pub struct Heartbeats {
    table: Mutex<HeartbeatTable>,
    /// RT-QUAR-*: nodes excluded from routes (filled by spot-check
    /// settlement; listed by `GET /nodes`).
    quarantine: Mutex<Quarantine>,
    node: NodeHandle,
    /// This node's frame round trips and deliveries per peer (NODE-NET-7).
    peer_stats: PeerStatsMap,
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl std::fmt::Debug for Heartbeats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeats")
            .field("accepted", &self.accepted.load(Ordering::Relaxed))
            .field("refused", &self.refused.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Two handles are equal when they are the same table (for `ApiConfig`).
impl PartialEq for Heartbeats {
    fn eq(&self, other: &Heartbeats) -> bool {
        std::ptr::eq(self, other)
    }
}

/// One live node as `GET /nodes` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveNode {
    pub address: Address,
    pub entry: Entry,
    pub age_ms: u64,
    /// EWMA of this node's frame round trips to it, if it dials it.
    pub rtt_us: Option<u64>,
    /// Frames delivered and lost to it by this node.
    pub delivered: u64,
    pub failed: u64,
    pub quarantined_until_ms: Option<u64>,
}

impl Heartbeats {
    pub fn new(
        node: NodeHandle,
        peer_stats: PeerStatsMap,
        config: HeartbeatConfig,
    ) -> Result<Arc<Heartbeats>, Error> {
        let table = HeartbeatTable::new(node.address, &node.chain_id, config)
            .map_err(|e| Error::Config(format!("inference heartbeats: {e}")))?;
        let quarantine = Quarantine::new(QuarantineConfig::default())
            .map_err(|e| Error::Config(format!("quarantine: {e}")))?;
        Ok(Arc::new(Heartbeats {
            table: Mutex::new(table),
            quarantine: Mutex::new(quarantine),
            node,
            peer_stats,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }))
    }

    /// RT-HB-10: a heartbeat's bytes from TLS peer `from`, checked by the
    /// pure rules against the committed state at `now_ms`.
    pub fn receive(&self, from: PeerId, bytes: &[u8], now_ms: u64) -> Result<(), String> {
        let result = self.check(from, bytes, now_ms);
        let counter = if result.is_ok() {
            &self.accepted
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn check(&self, from: PeerId, bytes: &[u8], now_ms: u64) -> Result<(), String> {
        let signed = SignedHeartbeat::decode(bytes).map_err(|e| e.to_string())?;
        if signed.heartbeat.sender != from {
            return Err(format!(
                "heartbeat of {} on the TLS connection of {from}",
                signed.heartbeat.sender
            ));
        }
        let ledger = self.node.snapshot.borrow().ledger.clone();
        let accepted = self
            .table
            .lock()
            .expect("heartbeat table lock")
            .accept(now_ms, &signed, |a| ledger.node(a).is_some())
            .map_err(|e| e.to_string())?;
        if accepted.new_node {
            info!(node = %from, holdings = signed.heartbeat.holdings.len(), "inference node live");
        }
        for gone in accepted.expired.iter().chain(&accepted.evicted) {
            info!(node = %gone, "inference node no longer live");
        }
        Ok(())
    }

    /// RT-HB-9/12: up to `limit` live nodes after `after`, in address order.
    pub fn page(&self, after: Option<Address>, limit: usize, now_ms: u64) -> Vec<LiveNode> {
        let table = self.table.lock().expect("heartbeat table lock");
        let quarantine = self.quarantine.lock().expect("quarantine lock");
        let stats = self.peer_stats.lock().expect("peer stats lock");
        table
            .page(after, limit, now_ms)
            .into_iter()
            .map(|(address, entry)| {
                let s = stats.get(&address);
                LiveNode {
                    address,
                    age_ms: entry.age_ms(now_ms),
                    entry: entry.clone(),
                    rtt_us: s.and_then(|s| s.rtt_us),
                    delivered: s.map_or(0, |s| s.delivered),
                    failed: s.map_or(0, |s| s.failed),
                    quarantined_until_ms: quarantine.until_ms(&address, now_ms),
                }
            })
            .collect()
    }

    /// RT-ROUTE-1/2: a route for `shape` over the live holders of its model
    /// and `local` (this node's own engine, if it is a candidate), without
    /// `excluded` and quarantined nodes; `rtt_us` is this node's measured
    /// round trip per peer.
    pub fn plan(
        &self,
        shape: ModelShape,
        local: Option<Candidate>,
        excluded: &BTreeSet<Address>,
        load: &LoadBook,
        rtt_us: &BTreeMap<Address, u64>,
        now_ms: u64,
    ) -> Result<Plan, String> {
        let config = PlanConfig::default();
        let mut candidates = {
            let table = self.table.lock().expect("heartbeat table lock");
            candidates_from_table(&table, &shape.model, now_ms, rtt_us, &config)
        };
        candidates.extend(local);
        let quarantine = self.quarantine.lock().expect("quarantine lock");
        Planner::new(
            shape,
            &candidates,
            &quarantine,
            excluded,
            now_ms,
            load,
            config,
        )
        .and_then(|p| p.plan())
        .map_err(|e| e.to_string())
    }

    /// RT-QUAR-1: excludes `node` from this node's routes until the
    /// returned time.
    pub fn quarantine(&self, node: Address, now_ms: u64) -> u64 {
        let (until, _) = self
            .quarantine
            .lock()
            .expect("quarantine lock")
            .quarantine(node, now_ms);
        until
    }

    /// RT-PIPE-7: the live, unquarantined nodes holding exactly layers
    /// `first..=last` of `model` as one dense holding, in address order
    /// (who can recompute a hop of that range).
    pub fn range_holder_list(
        &self,
        model: &Hash32,
        (first, last): (u32, u32),
        now_ms: u64,
    ) -> Vec<Address> {
        let table = self.table.lock().expect("heartbeat table lock");
        let quarantine = self.quarantine.lock().expect("quarantine lock");
        table
            .iter_live(now_ms)
            .filter(|(a, _)| !quarantine.is_quarantined(a, now_ms))
            .filter(|(_, e)| {
                e.heartbeat.holdings.iter().any(|h| {
                    &h.model == model && h.dense && (h.first_layer, h.last_layer) == (first, last)
                })
            })
            .map(|(a, _)| *a)
            .collect()
    }

    /// RT-BEACON-4: the live, unquarantined nodes with a dense holding of
    /// `model`, each with the layer ranges it holds, in address order.
    pub fn live_holdings(&self, model: &Hash32, now_ms: u64) -> Vec<(Address, Vec<(u32, u32)>)> {
        let table = self.table.lock().expect("heartbeat table lock");
        let quarantine = self.quarantine.lock().expect("quarantine lock");
        table
            .iter_live(now_ms)
            .filter(|(a, _)| !quarantine.is_quarantined(a, now_ms))
            .filter_map(|(a, e)| {
                let ranges: Vec<(u32, u32)> = e
                    .heartbeat
                    .holdings
                    .iter()
                    .filter(|h| &h.model == model && h.dense)
                    .map(|h| (h.first_layer, h.last_layer))
                    .collect();
                (!ranges.is_empty()).then_some((*a, ranges))
            })
            .collect()
    }

    /// Heartbeats accepted and refused since start (`/metrics`).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.accepted.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    /// Live entries now, and the bytes the table holds (RT-HB-8).
    pub fn size(&self, now_ms: u64) -> (usize, usize) {
        let t = self.table.lock().expect("heartbeat table lock");
        (t.iter_live(now_ms).count(), t.bytes())
    }
}

impl HeartbeatSink for Heartbeats {
    fn heartbeat(&self, from: PeerId, body: &[u8]) -> Result<(), String> {
        self.receive(from, body, now_ms())
    }
}

/// RT-HB-11: what a node serving layers `first..=last` of the model of
/// meta block `model` holds: one dense holding over the layer blocks the
/// chain registers for it in that range (the layer range they cover,
/// their ids in increasing order); none if the chain registers no layer
/// of it there. RT-PIPE-8: for an MoE model the holding also lists
/// `experts` (those held in every layer of the range) and its blocks
/// include the range's router blocks and the expert blocks of those experts.
pub fn holdings_of(
    ledger: &Ledger,
    model: Hash32,
    (first, last): (u32, u32),
    experts: &[u16],
) -> Vec<Holding> {
    let mut layers: Vec<(u32, Hash32)> = ledger
        .pol()
        .blocks()
        .filter(|(_, b)| b.block_type == PolBlockType::Layer && b.model_id == model)
        .filter_map(|(id, b)| b.layer.map(|l| (l, *id)))
        .filter(|(l, _)| (first..=last).contains(l))
        .collect();
    if layers.is_empty() {
        return Vec::new();
    }
    layers.sort();
    let mut blocks: Vec<Hash32> = layers.iter().map(|(_, id)| *id).collect();
    let mut moe = false;
    for (id, b) in ledger.pol().blocks() {
        let in_range = b.model_id == model && b.layer.is_some_and(|l| (first..=last).contains(&l));
        match b.block_type {
            PolBlockType::Router if in_range => blocks.push(*id),
            PolBlockType::Expert if in_range => {
                moe = true;
                let held = b
                    .expert
                    .and_then(|e| u16::try_from(e).ok())
                    .is_some_and(|e| experts.contains(&e));
                if held {
                    blocks.push(*id);
                }
            }
            _ => {}
        }
    }
    blocks.sort();
    blocks.dedup();
    blocks.truncate(blyan_route::heartbeat::MAX_BLOCKS_PER_HOLDING);
    vec![Holding {
        model,
        first_layer: layers.first().expect("non-empty").0,
        last_layer: layers.last().expect("non-empty").0,
        dense: true,
        experts: if moe { experts.to_vec() } else { Vec::new() },
        blocks,
    }]
}

/// RT-HB-6 on the sending side: the next timestamp, strictly above the last.
pub fn next_timestamp_ms(last_ms: u64, now_ms: u64) -> u64 {
    now_ms.max(last_ms.saturating_add(1))
}

/// RT-HB-11: sends a heartbeat to every dialled peer every `interval_ms`
/// until the node's tasks stop.
pub async fn run_advertiser(
    transport: Arc<GrpcTransport>,
    node: NodeHandle,
    engine: InferenceHandle,
    key: SigningKey,
    interval_ms: u64,
) {
    let me = node.address;
    let public_key = public_key_of(&key);
    let mut last_ms = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ledger = node.snapshot.borrow().ledger.clone();
        let holdings = crate::api::chat::served_model_id(&ledger, &engine)
            .map(|m| {
                let range = (
                    u32::try_from(engine.model.first_layer).unwrap_or(u32::MAX),
                    u32::try_from(engine.model.last_layer).unwrap_or(u32::MAX),
                );
                holdings_of(&ledger, m, range, &engine.model.experts)
            })
            .unwrap_or_default();
        let queued = engine.queued();
        let running = usize::from(engine.stats.ops.is_running());
        let capacity = engine.config.queue_len + 1;
        let load = (
            u32::try_from(capacity.saturating_sub(queued + running)).unwrap_or(u32::MAX),
            u32::try_from(queued + running).unwrap_or(u32::MAX),
            engine.stats.ops.compute_per_token_us(),
        );
        let sends = transport.dialled_peers().into_iter().map(|to| {
            last_ms = next_timestamp_ms(last_ms, now_ms());
            let heartbeat = Heartbeat {
                sender: me,
                public_key,
                receiver: to,
                timestamp_ms: last_ms,
                holdings: holdings.clone(),
                free_slots: load.0,
                queue_depth: load.1,
                compute_per_token_us: load.2,
            };
            let signature =
                blyan_state_machine::crypto::sign(&key, &heartbeat.signing_bytes(&node.chain_id));
            let body = SignedHeartbeat {
                heartbeat,
                signature,
            }
            .encode();
            let transport = transport.clone();
            async move {
                let sent = tokio::time::timeout(
                    Duration::from_millis(interval_ms),
                    transport.send_heartbeat(to, body.into()),
                )
                .await;
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(peer = %to, error = %e, "heartbeat not delivered"),
                    Err(_) => debug!(peer = %to, "heartbeat timed out"),
                }
            }
        });
        let sends: Vec<_> = sends.collect();
        futures_util::future::join_all(sends).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blyan_state_machine::params::Params;
    use blyan_state_machine::testkit::{address, pol_block, testnet};

    /// RT-HB-11: the holding covers exactly the registered layer blocks of
    /// the served model (their range, their ids in increasing order), not
    /// another model's, and nothing when none is registered.
    #[test]
    fn rt_hb_11_holdings_are_the_served_models_registered_layers() {
        let mut net = testnet(4, 0, Params::default());
        let who = address(&net.validators[0]);
        let meta = pol_block(PolBlockType::Meta, [0; 32], Vec::new(), b"meta", who);
        let other = pol_block(PolBlockType::Meta, [0; 32], Vec::new(), b"other", who);
        let (meta_id, other_id) = (meta.id(), other.id());
        let layer = |model: Hash32, i: u32| {
            let mut b = pol_block(
                PolBlockType::Layer,
                model,
                vec![model],
                format!("layer {i} of {}", model[0]).as_bytes(),
                who,
            );
            b.layer = Some(i);
            b
        };
        let layers: Vec<_> = (0..3).map(|i| layer(meta_id, i)).collect();
        net.genesis.pol_blocks = vec![meta, other];
        net.genesis.pol_blocks.extend(layers.iter().cloned());
        net.genesis.pol_blocks.push(layer(other_id, 7));
        let ledger = Ledger::from_genesis(&net.genesis).unwrap();
        let all = (0, u32::MAX);
        let h = holdings_of(&ledger, meta_id, all, &[]);
        assert_eq!(h.len(), 1);
        assert_eq!((h[0].first_layer, h[0].last_layer), (0, 2));
        assert!(h[0].dense && h[0].experts.is_empty());
        let mut ids: Vec<Hash32> = layers.iter().map(|b| b.id()).collect();
        ids.sort();
        assert_eq!(h[0].blocks, ids);
        h[0].validate().unwrap();
        assert_eq!(holdings_of(&ledger, other_id, all, &[])[0].first_layer, 7);
        assert!(holdings_of(&ledger, [9; 32], all, &[]).is_empty());
        // RT-PIPE-2: a stage holding layers 1..=2 advertises only those.
        let h = holdings_of(&ledger, meta_id, (1, 2), &[]);
        assert_eq!((h[0].first_layer, h[0].last_layer), (1, 2));
        let mut ids: Vec<Hash32> = layers[1..].iter().map(|b| b.id()).collect();
        ids.sort();
        assert_eq!(h[0].blocks, ids);
        assert!(holdings_of(&ledger, other_id, (0, 6), &[]).is_empty());
    }

    /// RT-PIPE-8: an MoE stage's holding lists the experts it holds, and
    /// its blocks are the range's layer and router blocks plus the expert
    /// blocks of those experts only.
    #[test]
    fn rt_pipe_8_moe_holdings_list_held_experts_and_their_blocks() {
        let mut net = testnet(4, 0, Params::default());
        let who = address(&net.validators[0]);
        let meta = pol_block(PolBlockType::Meta, [0; 32], Vec::new(), b"moe", who);
        let id = meta.id();
        let block = |kind, layer: u32, expert: Option<u32>| {
            let tag = format!("{kind:?} {layer} {expert:?}");
            let mut b = pol_block(kind, id, vec![id], tag.as_bytes(), who);
            b.layer = Some(layer);
            b.expert = expert;
            b
        };
        let mut blocks = vec![meta];
        for l in 0..2 {
            blocks.push(block(PolBlockType::Layer, l, None));
            blocks.push(block(PolBlockType::Router, l, None));
            for e in 0..4 {
                blocks.push(block(PolBlockType::Expert, l, Some(e)));
            }
        }
        net.genesis.pol_blocks = blocks.clone();
        let ledger = Ledger::from_genesis(&net.genesis).unwrap();
        let h = holdings_of(&ledger, id, (1, 1), &[0, 2]);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].experts, vec![0, 2]);
        let mut want: Vec<Hash32> = blocks
            .iter()
            .filter(|b| b.layer == Some(1))
            .filter(|b| b.block_type != PolBlockType::Expert || matches!(b.expert, Some(0 | 2)))
            .map(|b| b.id())
            .collect();
        want.sort();
        assert_eq!(h[0].blocks, want);
        h[0].validate().unwrap();
    }

    #[test]
    fn rt_hb_6_sending_timestamps_strictly_increase() {
        assert_eq!(next_timestamp_ms(0, 1_000), 1_000);
        assert_eq!(next_timestamp_ms(1_000, 1_000), 1_001);
        assert_eq!(
            next_timestamp_ms(5_000, 1_000),
            5_001,
            "a clock stepping back"
        );
        assert_eq!(next_timestamp_ms(u64::MAX, 1), u64::MAX);
    }
}
