//! Signed heartbeats and the table of live holders (spec/inference.md,
//! RT-HB-*).
//!
//! Every inference node sends each peer a heartbeat every
//! `heartbeat_interval_ms`: what it holds (block ids, layer ranges,
//! experts), free capacity, queue depth and measured compute per token. The
//! receiver keeps the last accepted heartbeat per node in a table bounded
//! by count and bytes; an entry expires after three missed intervals.
//!
//! - **RT-HB-1** Signing bytes: `signing_bytes(Heartbeat, chain_id, body)`
//!   (`blyan/heartbt/v1`, SIG-1) with `body` the canonical encoding
//!   (RT-ENC-1) of [`Heartbeat`]. A holding's layer range is ordered
//!   (`first_layer ≤ last_layer`), its experts and block ids strictly
//!   increase, it holds something (`dense` or at least one expert); at most
//!   [`MAX_HOLDINGS`] holdings, [`MAX_EXPERTS_PER_HOLDING`] experts and
//!   [`MAX_BLOCKS_PER_HOLDING`] block ids each, [`MAX_HEARTBEAT_BYTES`] in
//!   all.
//! - **RT-HB-2** Only a registered node (TX-9, the caller's predicate over
//!   its committed state) is accepted; checked before the signature.
//! - **RT-HB-3** The stated sender is the address of the included public
//!   key and the signature verifies (SIG-2).
//! - **RT-HB-4** The heartbeat names its receiver, which must be this node:
//!   one sent to a peer cannot be replayed to another.
//! - **RT-HB-5** `timestamp_ms ≤ now_ms + max_future_skew_ms` and
//!   `timestamp_ms + expiry_ms > now_ms`.
//! - **RT-HB-6** A node's timestamps strictly increase: a heartbeat not
//!   newer than the node's entry (live, or expired but not yet purged) is
//!   refused. With RT-HB-5 a replay is
//!   possible only within one expiry window and only after the entry left
//!   the table (RT-HB-8), and then re-installs what the node itself signed.
//! - **RT-HB-7** An entry expires `expiry_ms = missed_heartbeats ×
//!   heartbeat_interval_ms` (3 × 5,000 ms by default) after the receiver
//!   accepted it (the receiver's clock, not the sender's): expired entries
//!   are neither listed nor routed to, and are purged on every accept.
//! - **RT-HB-8** At most `max_nodes` entries whose sizes (encoded heartbeat
//!   plus [`ENTRY_OVERHEAD_BYTES`]) total at most `max_bytes`. A heartbeat
//!   that would exceed a bound first purges expired entries, then evicts the
//!   live entry accepted longest ago (ties: lowest address) until it fits;
//!   a single entry larger than `max_bytes` is refused. The newest
//!   information wins, and since only registered nodes are accepted the
//!   churn is bounded by the bonded node count.
//! - **RT-HB-9** Listing is in address order, a page at a time.

use crate::codec::{Reader, Writer};
use crate::{Error, Result};
use blyan_state_machine::crypto::verify_signature;
use blyan_state_machine::tx::{Domain, PublicKey, signing_bytes};
use blyan_state_machine::types::{Address, Hash32};
use std::collections::BTreeMap;
use std::ops::Bound;

/// RT-HB-7: default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 5_000;
/// RT-HB-7: an entry expires after this many missed intervals.
pub const DEFAULT_MISSED_HEARTBEATS: u64 = 3;
/// RT-HB-5: default allowance for a sender's clock running ahead.
pub const DEFAULT_MAX_FUTURE_SKEW_MS: u64 = 2_000;
/// RT-HB-1: most holdings in one heartbeat.
pub const MAX_HOLDINGS: usize = 64;
/// RT-HB-1: most experts in one holding.
pub const MAX_EXPERTS_PER_HOLDING: usize = 1024;
/// RT-HB-1: most block ids in one holding.
pub const MAX_BLOCKS_PER_HOLDING: usize = 4096;
/// RT-HB-1: most bytes of one encoded signed heartbeat.
pub const MAX_HEARTBEAT_BYTES: usize = 256 * 1024;
/// RT-HB-8: bytes an entry counts beyond its encoded heartbeat.
pub const ENTRY_OVERHEAD_BYTES: usize = 128;

/// What a node holds of one model: a contiguous layer range (a pipeline
/// stage's weights when `dense`) and, for an MoE model, the experts it
/// holds in each of those layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    /// The model's id (its meta block's hash).
    pub model: Hash32,
    pub first_layer: u32,
    /// Inclusive.
    pub last_layer: u32,
    /// Holds the layers' non-expert weights (attention, norms, the MoE
    /// router; everything of a dense layer), so it can serve as a stage.
    pub dense: bool,
    /// Experts held in every layer of the range, strictly increasing.
    pub experts: Vec<u16>,
    /// The PoL block ids whose weights it holds, strictly increasing.
    pub blocks: Vec<Hash32>,
}

impl Holding {
    /// RT-HB-1's structural rules.
    pub fn validate(&self) -> Result<()> {
        if self.first_layer > self.last_layer {
            return Err(Error::InvalidHolding("first_layer > last_layer"));
        }
        if !self.dense && self.experts.is_empty() {
            return Err(Error::InvalidHolding(
                "holds neither dense layers nor experts",
            ));
        }
        if self.experts.len() > MAX_EXPERTS_PER_HOLDING {
            return Err(Error::TooLarge {
                what: "experts",
                len: self.experts.len(),
                max: MAX_EXPERTS_PER_HOLDING,
            });
        }
        if self.blocks.len() > MAX_BLOCKS_PER_HOLDING {
            return Err(Error::TooLarge {
                what: "blocks",
                len: self.blocks.len(),
                max: MAX_BLOCKS_PER_HOLDING,
            });
        }
        if self.experts.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::InvalidHolding("experts not strictly increasing"));
        }
        if self.blocks.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::InvalidHolding("blocks not strictly increasing"));
        }
        Ok(())
    }

    /// Layers in the range.
    pub fn layer_count(&self) -> u32 {
        self.last_layer - self.first_layer + 1
    }

    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.model);
        w.u32(self.first_layer);
        w.u32(self.last_layer);
        w.u8(u8::from(self.dense));
        w.len(self.experts.len());
        for e in &self.experts {
            w.u16(*e);
        }
        w.len(self.blocks.len());
        for b in &self.blocks {
            w.bytes(b);
        }
    }

    fn decode(r: &mut Reader) -> Result<Holding> {
        let model = r.array()?;
        let first_layer = r.u32()?;
        let last_layer = r.u32()?;
        let dense = r.bool()?;
        let n = r.len(MAX_EXPERTS_PER_HOLDING, 2, "experts")?;
        let experts = (0..n).map(|_| r.u16()).collect::<Result<Vec<_>>>()?;
        let n = r.len(MAX_BLOCKS_PER_HOLDING, 32, "blocks")?;
        let blocks = (0..n).map(|_| r.array()).collect::<Result<Vec<_>>>()?;
        let h = Holding {
            model,
            first_layer,
            last_layer,
            dense,
            experts,
            blocks,
        };
        h.validate()?;
        Ok(h)
    }
}

/// The signed content of a heartbeat (RT-HB-1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub sender: Address,
    /// SEC1 compressed; `sender` is its address (RT-HB-3).
    pub public_key: PublicKey,
    /// The node this heartbeat is sent to (RT-HB-4).
    pub receiver: Address,
    /// The sender's clock (RT-HB-5, RT-HB-6).
    pub timestamp_ms: u64,
    pub holdings: Vec<Holding>,
    /// Generations it can still admit (continuous-batching slots).
    pub free_slots: u32,
    /// Requests queued or running.
    pub queue_depth: u32,
    /// Measured compute per token over everything it holds, µs.
    pub compute_per_token_us: u64,
}

impl Heartbeat {
    /// RT-HB-1's structural rules.
    pub fn validate(&self) -> Result<()> {
        if self.holdings.len() > MAX_HOLDINGS {
            return Err(Error::TooLarge {
                what: "holdings",
                len: self.holdings.len(),
                max: MAX_HOLDINGS,
            });
        }
        self.holdings.iter().try_for_each(Holding::validate)
    }

    /// RT-ENC-1 body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(&self.sender.0);
        w.bytes(&self.public_key);
        w.bytes(&self.receiver.0);
        w.u64(self.timestamp_ms);
        w.len(self.holdings.len());
        for h in &self.holdings {
            h.encode(&mut w);
        }
        w.u32(self.free_slots);
        w.u32(self.queue_depth);
        w.u64(self.compute_per_token_us);
        w.0
    }

    fn decode_from(r: &mut Reader) -> Result<Heartbeat> {
        let sender = Address(r.array()?);
        let public_key = r.array()?;
        let receiver = Address(r.array()?);
        let timestamp_ms = r.u64()?;
        let n = r.len(MAX_HOLDINGS, 32 + 4 + 4 + 1 + 4 + 4, "holdings")?;
        let holdings = (0..n)
            .map(|_| Holding::decode(r))
            .collect::<Result<Vec<_>>>()?;
        Ok(Heartbeat {
            sender,
            public_key,
            receiver,
            timestamp_ms,
            holdings,
            free_slots: r.u32()?,
            queue_depth: r.u32()?,
            compute_per_token_us: r.u64()?,
        })
    }

    /// RT-HB-1: the bytes the sender signs.
    pub fn signing_bytes(&self, chain_id: &str) -> Vec<u8> {
        signing_bytes(Domain::Heartbeat, chain_id, &self.encode())
    }
}

/// A heartbeat with the sender's signature over its signing bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedHeartbeat {
    pub heartbeat: Heartbeat,
    pub signature: [u8; 64],
}

impl SignedHeartbeat {
    /// Body ‖ signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.heartbeat.encode();
        out.extend_from_slice(&self.signature);
        out
    }

    /// RT-HB-1: refuses non-canonical bytes and anything past the bounds.
    pub fn decode(bytes: &[u8]) -> Result<SignedHeartbeat> {
        if bytes.len() > MAX_HEARTBEAT_BYTES {
            return Err(Error::TooLarge {
                what: "heartbeat",
                len: bytes.len(),
                max: MAX_HEARTBEAT_BYTES,
            });
        }
        let mut r = Reader::new(bytes, "heartbeat");
        let heartbeat = Heartbeat::decode_from(&mut r)?;
        let signature = r.array()?;
        r.finish()?;
        Ok(SignedHeartbeat {
            heartbeat,
            signature,
        })
    }
}

/// `[inference]` heartbeat settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatConfig {
    pub heartbeat_interval_ms: u64,
    pub missed_heartbeats: u64,
    pub max_future_skew_ms: u64,
    /// RT-HB-8.
    pub max_nodes: usize,
    /// RT-HB-8.
    pub max_bytes: usize,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            missed_heartbeats: DEFAULT_MISSED_HEARTBEATS,
            max_future_skew_ms: DEFAULT_MAX_FUTURE_SKEW_MS,
            max_nodes: 10_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

impl HeartbeatConfig {
    /// RT-HB-7.
    pub fn expiry_ms(&self) -> u64 {
        self.heartbeat_interval_ms
            .saturating_mul(self.missed_heartbeats)
    }

    pub fn validate(&self) -> Result<()> {
        if self.heartbeat_interval_ms == 0 || self.missed_heartbeats == 0 {
            return Err(Error::InvalidConfig(
                "heartbeat_interval_ms and missed_heartbeats must be positive",
            ));
        }
        if self.max_nodes == 0 || self.max_bytes == 0 {
            return Err(Error::InvalidConfig(
                "the heartbeat table must hold an entry",
            ));
        }
        Ok(())
    }
}

/// A live node's last accepted heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub heartbeat: Heartbeat,
    /// The receiver's clock when it was accepted (RT-HB-7).
    pub received_ms: u64,
    /// RT-HB-8 size.
    pub bytes: usize,
}

impl Entry {
    /// Age of the last heartbeat on the receiver's clock.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.received_ms)
    }
}

/// What an accepted heartbeat did to the table.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Accepted {
    /// The node had no live entry before.
    pub new_node: bool,
    /// Expired entries purged (RT-HB-7), in address order.
    pub expired: Vec<Address>,
    /// Live entries evicted to make room (RT-HB-8), in eviction order.
    pub evicted: Vec<Address>,
}

/// The receiver's table of live holders (RT-HB-*).
#[derive(Clone, Debug)]
pub struct HeartbeatTable {
    me: Address,
    chain_id: String,
    config: HeartbeatConfig,
    entries: BTreeMap<Address, Entry>,
    total_bytes: usize,
}

impl HeartbeatTable {
    /// The table of node `me` on chain `chain_id`.
    pub fn new(me: Address, chain_id: &str, config: HeartbeatConfig) -> Result<Self> {
        config.validate()?;
        Ok(HeartbeatTable {
            me,
            chain_id: chain_id.to_string(),
            config,
            entries: BTreeMap::new(),
            total_bytes: 0,
        })
    }

    pub fn config(&self) -> &HeartbeatConfig {
        &self.config
    }

    /// Checks RT-HB-1..6 and, if they pass, installs the heartbeat
    /// (RT-HB-7, RT-HB-8). Nothing changes on an error.
    pub fn accept(
        &mut self,
        now_ms: u64,
        signed: &SignedHeartbeat,
        is_registered: impl Fn(&Address) -> bool,
    ) -> Result<Accepted> {
        let hb = &signed.heartbeat;
        hb.validate()?;
        if hb.receiver != self.me {
            return Err(Error::WrongReceiver {
                expected: self.me,
                got: hb.receiver,
            });
        }
        if !is_registered(&hb.sender) {
            return Err(Error::NotRegistered(hb.sender));
        }
        if hb.timestamp_ms > now_ms.saturating_add(self.config.max_future_skew_ms) {
            return Err(Error::FromFuture {
                timestamp_ms: hb.timestamp_ms,
                now_ms,
                max_skew_ms: self.config.max_future_skew_ms,
            });
        }
        let window_ms = self.config.expiry_ms();
        if hb.timestamp_ms.saturating_add(window_ms) <= now_ms {
            return Err(Error::TooOld {
                timestamp_ms: hb.timestamp_ms,
                now_ms,
                window_ms,
            });
        }
        if let Some(old) = self.entries.get(&hb.sender)
            && hb.timestamp_ms <= old.heartbeat.timestamp_ms
        {
            return Err(Error::Replayed {
                timestamp_ms: hb.timestamp_ms,
                last_ms: old.heartbeat.timestamp_ms,
            });
        }
        let derived = Address::from_sec1(&hb.public_key).ok_or(Error::BadSignature("heartbeat"))?;
        if derived != hb.sender {
            return Err(Error::WrongKey {
                stated: hb.sender,
                derived,
            });
        }
        let encoded = signed.encode();
        if encoded.len() > MAX_HEARTBEAT_BYTES {
            return Err(Error::TooLarge {
                what: "heartbeat",
                len: encoded.len(),
                max: MAX_HEARTBEAT_BYTES,
            });
        }
        if !verify_signature(
            &hb.public_key,
            &hb.signing_bytes(&self.chain_id),
            &signed.signature,
        ) {
            return Err(Error::BadSignature("heartbeat"));
        }
        let bytes = encoded.len() - 64 + ENTRY_OVERHEAD_BYTES;
        if bytes > self.config.max_bytes {
            return Err(Error::EntryTooLarge {
                bytes,
                max_bytes: self.config.max_bytes,
            });
        }
        // All checks passed: from here on the table changes.
        let mut out = Accepted {
            expired: self.expire(now_ms),
            ..Accepted::default()
        };
        out.new_node = match self.entries.remove(&hb.sender) {
            Some(old) => {
                self.total_bytes -= old.bytes;
                false
            }
            None => true,
        };
        while self.entries.len() >= self.config.max_nodes
            || self.total_bytes + bytes > self.config.max_bytes
        {
            let victim = self
                .entries
                .iter()
                .min_by_key(|(addr, e)| (e.received_ms, **addr))
                .map(|(addr, _)| *addr)
                .expect("a non-empty table is over its bound");
            let e = self.entries.remove(&victim).expect("victim is present");
            self.total_bytes -= e.bytes;
            out.evicted.push(victim);
        }
        self.total_bytes += bytes;
        self.entries.insert(
            hb.sender,
            Entry {
                heartbeat: hb.clone(),
                received_ms: now_ms,
                bytes,
            },
        );
        Ok(out)
    }

    fn is_live(&self, e: &Entry, now_ms: u64) -> bool {
        now_ms < e.received_ms.saturating_add(self.config.expiry_ms())
    }

    /// RT-HB-7: the node's entry if it has not expired.
    pub fn live(&self, node: &Address, now_ms: u64) -> Option<&Entry> {
        self.entries.get(node).filter(|e| self.is_live(e, now_ms))
    }

    /// RT-HB-7: removes expired entries, returning them in address order.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Address> {
        let expiry_ms = self.config.expiry_ms();
        let gone: Vec<Address> = self
            .entries
            .iter()
            .filter(|(_, e)| now_ms >= e.received_ms.saturating_add(expiry_ms))
            .map(|(a, _)| *a)
            .collect();
        for a in &gone {
            let e = self.entries.remove(a).expect("listed above");
            self.total_bytes -= e.bytes;
        }
        gone
    }

    /// RT-HB-7, RT-HB-9: live entries in address order.
    pub fn iter_live(&self, now_ms: u64) -> impl Iterator<Item = (&Address, &Entry)> {
        self.entries
            .iter()
            .filter(move |(_, e)| self.is_live(e, now_ms))
    }

    /// RT-HB-9: up to `limit` live entries after `after`, in address order.
    pub fn page(
        &self,
        after: Option<Address>,
        limit: usize,
        now_ms: u64,
    ) -> Vec<(Address, &Entry)> {
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        self.entries
            .range((start, Bound::Unbounded))
            .filter(|(_, e)| self.is_live(e, now_ms))
            .take(limit)
            .map(|(a, e)| (*a, e))
            .collect()
    }

    /// Entries held, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// RT-HB-8: bytes held.
    pub fn bytes(&self) -> usize {
        self.total_bytes
    }
}
