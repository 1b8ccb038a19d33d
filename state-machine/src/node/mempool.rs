//! The bounded transaction pool (spec/node.md, NODE-MP-*).
//!
//! Deterministic: every collection is ordered, ties are broken by transaction
//! id, and nothing reads a clock. Checks that need no block (signature, nonce
//! window, fee cap, size) happen at insertion, so a bad transaction costs one
//! signature verification and is never gossiped.

use crate::ledger::{Ledger, intrinsic_gas};
use crate::tx::SignedTx;
use crate::types::{Address, Hash32};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

/// NODE-MP-1: the pool's bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MempoolConfig {
    /// Most transactions held.
    pub max_txs: usize,
    /// Most transactions held per sender.
    pub max_txs_per_sender: usize,
    /// A transaction's nonce may be at most this far above its sender's account nonce.
    pub max_nonce_gap: u64,
    /// A replacement (same sender and nonce) must raise the tip by this many
    /// basis points.
    pub replace_bump_bps: u32,
    /// NODE-MP-7: once the pool holds this many transactions, one that
    /// cannot run yet (a nonce gap: neither its sender's account nonce nor
    /// the successor of one pooled) is refused, so the room left goes to
    /// transactions that can commit. Below it, gaps are tolerated (a client
    /// may send consecutive nonces to different nodes).
    pub gap_admission_limit: usize,
}

impl Default for MempoolConfig {
    fn default() -> Self {
        MempoolConfig {
            max_txs: 10_000,
            max_txs_per_sender: 64,
            max_nonce_gap: 64,
            replace_bump_bps: 1_000,
            gap_admission_limit: 5_000,
        }
    }
}

/// Why a transaction was not admitted (NODE-MP-2). Every variant leaves the
/// pool unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MempoolError {
    #[error("transaction {0} is already in the pool")]
    Duplicate(String),
    #[error("invalid public key or signature (wrong chain id?)")]
    BadSignature,
    #[error("nonce {got} is below the account nonce {expected}")]
    StaleNonce { expected: u64, got: u64 },
    #[error("nonce {got} is more than {max_gap} above the account nonce {expected}")]
    NonceTooFarAhead {
        expected: u64,
        got: u64,
        max_gap: u64,
    },
    #[error("max fee per gas {got} is below the next block's base fee {base_fee}")]
    FeeBelowBaseFee { got: u128, base_fee: u128 },
    #[error("max priority fee per gas exceeds max fee per gas")]
    TipAboveFeeCap,
    #[error("gas limit {got} is below the {needed} this kind of transaction uses")]
    GasLimitTooLow { got: u64, needed: u64 },
    #[error("gas limit {got} exceeds the block gas limit {max}")]
    GasLimitTooHigh { got: u64, max: u64 },
    #[error("transaction of {got} bytes exceeds the block's {max} (BLOCK-8)")]
    TooLarge { got: u64, max: u64 },
    #[error(
        "a transaction with this nonce is pending; a replacement must raise the tip by {bump_bps} bps"
    )]
    ReplacementUnderpriced { bump_bps: u32 },
    #[error("sender has {0} pending transactions, the most allowed")]
    SenderFull(usize),
    #[error("pool is full and the transaction pays no more than the cheapest one")]
    Full,
    #[error(
        "nonce {got} leaves a gap (the next this node can run is {next}) and the pool is too full to hold transactions that cannot run yet"
    )]
    NonceGap { next: u64, got: u64 },
}

/// NODE-MP-8: why an admitted transaction left the pool without being
/// included in a block. Reported (`NodeOutput::TxDropped`), never silent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("replaced by transaction {0} (same sender and nonce, higher tip)")]
    Replaced(String),
    #[error("evicted from the full pool by a transaction paying a higher tip")]
    Evicted,
    #[error("another transaction with the same sender and nonce was committed")]
    NonceUsed,
}

#[derive(Clone, Debug)]
struct Entry {
    tx: SignedTx,
    sender: Address,
    tip: u128,
}

/// NODE-MP-1: a bounded pool ordered by tip (max priority fee per gas), then
/// nonce per sender, then id.
#[derive(Clone, Debug, Default)]
pub struct Mempool {
    config: MempoolConfig,
    by_id: BTreeMap<Hash32, Entry>,
    by_sender: BTreeMap<(Address, u64), Hash32>,
    /// Eviction order: cheapest first; among equals the highest nonce, then id.
    by_price: BTreeSet<(u128, Reverse<u64>, Hash32)>,
    /// NODE-MP-8: removals not yet taken by [`Mempool::take_dropped`]
    /// (bounded: the driver takes them after every change).
    dropped: Vec<(Hash32, DropReason)>,
}

impl Mempool {
    pub fn new(config: MempoolConfig) -> Self {
        assert!(config.max_txs > 0 && config.max_txs_per_sender > 0);
        Mempool {
            config,
            ..Mempool::default()
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
    pub fn contains(&self, id: &Hash32) -> bool {
        self.by_id.contains_key(id)
    }

    /// NODE-MP-6: the sender of pooled transaction `id`. Every pooled
    /// transaction's signature was verified at admission (NODE-MP-2) and its
    /// id commits to body, key and signature, so the driver passes this to
    /// block validation and proposal building (LEDGER-SIG-1) instead of
    /// verifying those signatures again. Bounded by the pool itself
    /// (NODE-MP-1); what was evicted or removed is simply verified again.
    pub fn verified_sender(&self, id: &Hash32) -> Option<Address> {
        self.by_id.get(id).map(|e| e.sender)
    }

    /// NODE-MP-2: admit `tx` against the state `ledger` (the last committed
    /// block). Returns its id.
    pub fn insert(&mut self, tx: SignedTx, ledger: &Ledger) -> Result<Hash32, MempoolError> {
        let id = tx.id();
        if self.by_id.contains_key(&id) {
            return Err(MempoolError::Duplicate(hex::encode(id)));
        }
        let body = &tx.body;
        if body.max_priority_fee_per_gas > body.max_fee_per_gas {
            return Err(MempoolError::TipAboveFeeCap);
        }
        let needed = intrinsic_gas(&body.kind);
        if body.gas_limit < needed {
            return Err(MempoolError::GasLimitTooLow {
                got: body.gas_limit,
                needed,
            });
        }
        let max_gas = ledger.params().block_gas_limit;
        if body.gas_limit > max_gas {
            return Err(MempoolError::GasLimitTooHigh {
                got: body.gas_limit,
                max: max_gas,
            });
        }
        let size = tx.encoded_len();
        let max_bytes = u64::from(ledger.params().max_block_bytes);
        if size > max_bytes {
            return Err(MempoolError::TooLarge {
                got: size,
                max: max_bytes,
            });
        }
        let base_fee = ledger.next_block_base_fee();
        if body.max_fee_per_gas < base_fee {
            return Err(MempoolError::FeeBelowBaseFee {
                got: body.max_fee_per_gas,
                base_fee,
            });
        }
        let (key, sender) = tx.claimed_sender().ok_or(MempoolError::BadSignature)?;
        let expected = ledger.account(&sender).nonce;
        // NODE-MP-2: a replayed (stale) nonce is refused before the
        // signature is verified; gossip of transactions already committed
        // costs no verification. Nothing is admitted unverified.
        if body.nonce < expected {
            return Err(MempoolError::StaleNonce {
                expected,
                got: body.nonce,
            });
        }
        if !tx.verify_with(&key, ledger.chain_id()) {
            return Err(MempoolError::BadSignature);
        }
        if body.nonce - expected > self.config.max_nonce_gap {
            return Err(MempoolError::NonceTooFarAhead {
                expected,
                got: body.nonce,
                max_gap: self.config.max_nonce_gap,
            });
        }
        // NODE-MP-7: backpressure on transactions that cannot run yet.
        if self.by_id.len() >= self.config.gap_admission_limit
            && body.nonce != expected
            && !self.by_sender.contains_key(&(sender, body.nonce))
        {
            let next = self.next_runnable_nonce(&sender, expected);
            if body.nonce != next {
                return Err(MempoolError::NonceGap {
                    next,
                    got: body.nonce,
                });
            }
        }
        let tip = body.max_priority_fee_per_gas;
        // Replace-by-fee for the same (sender, nonce).
        let replaced = match self.by_sender.get(&(sender, body.nonce)) {
            Some(old_id) => {
                let old_tip = self.by_id[old_id].tip;
                let bump = u128::from(self.config.replace_bump_bps);
                // tip ≥ old × (1 + bump/10⁴), in integers.
                if tip.saturating_mul(10_000) < old_tip.saturating_mul(10_000 + bump) || tip == 0 {
                    return Err(MempoolError::ReplacementUnderpriced {
                        bump_bps: self.config.replace_bump_bps,
                    });
                }
                Some(*old_id)
            }
            None => None,
        };
        if replaced.is_none() {
            let pending = self.sender_count(&sender);
            if pending >= self.config.max_txs_per_sender {
                return Err(MempoolError::SenderFull(pending));
            }
        }
        let mut evict = None;
        if replaced.is_none() && self.by_id.len() >= self.config.max_txs {
            let cheapest = self.by_price.first().expect("full pool is non-empty");
            if cheapest.0 >= tip {
                return Err(MempoolError::Full);
            }
            evict = Some(cheapest.2);
        }
        // Admitted: from here on nothing fails.
        if let Some(old) = replaced {
            self.remove(&old);
            self.dropped
                .push((old, DropReason::Replaced(hex::encode(id))));
        }
        if let Some(old) = evict {
            self.remove(&old);
            self.dropped.push((old, DropReason::Evicted));
        }
        self.by_sender.insert((sender, body.nonce), id);
        self.by_price.insert((tip, Reverse(body.nonce), id));
        self.by_id.insert(id, Entry { tx, sender, tip });
        assert!(self.by_id.len() <= self.config.max_txs);
        Ok(id)
    }

    /// The first nonce from `account_nonce` on that `sender` has no pooled
    /// transaction for: the nonce a new transaction must have to extend the
    /// runnable run.
    fn next_runnable_nonce(&self, sender: &Address, account_nonce: u64) -> u64 {
        let mut next = account_nonce;
        for ((_, nonce), _) in self
            .by_sender
            .range((*sender, account_nonce)..=(*sender, u64::MAX))
        {
            if *nonce != next {
                break;
            }
            next += 1;
        }
        next
    }

    /// NODE-MP-8: the transactions dropped since the last call, with why.
    pub fn take_dropped(&mut self) -> Vec<(Hash32, DropReason)> {
        std::mem::take(&mut self.dropped)
    }

    fn sender_count(&self, sender: &Address) -> usize {
        self.by_sender
            .range((*sender, 0)..=(*sender, u64::MAX))
            .count()
    }

    fn remove(&mut self, id: &Hash32) -> Option<SignedTx> {
        let e = self.by_id.remove(id)?;
        self.by_sender.remove(&(e.sender, e.tx.body.nonce));
        self.by_price
            .remove(&(e.tip, Reverse(e.tx.body.nonce), *id));
        Some(e.tx)
    }

    /// NODE-MP-3: after a block commits, drop what it included and everything
    /// its senders' new nonces made stale; NODE-MP-8: a stale one that
    /// `included` does not name is reported dropped (its nonce was used).
    pub fn update(&mut self, ledger: &Ledger, included: &dyn Fn(&Hash32) -> bool) {
        let senders: BTreeSet<Address> = self.by_sender.keys().map(|(a, _)| *a).collect();
        for sender in senders {
            let nonce = ledger.account(&sender).nonce;
            let stale: Vec<Hash32> = self
                .by_sender
                .range((sender, 0)..(sender, nonce))
                .map(|(_, id)| *id)
                .collect();
            for id in stale {
                self.remove(&id);
                if !included(&id) {
                    self.dropped.push((id, DropReason::NonceUsed));
                }
            }
        }
    }

    /// NODE-MP-4: candidates for the next block, best first: per sender only
    /// the gap-free run of nonces from its account nonce, merged across
    /// senders by tip (highest first), ties by sender address. At most `max`.
    pub fn candidates(&self, ledger: &Ledger, max: usize) -> Vec<SignedTx> {
        // Each sender's runnable queue, in nonce order.
        let mut queues: BTreeMap<Address, Vec<&Entry>> = BTreeMap::new();
        let mut sender_iter = self.by_sender.iter().peekable();
        while let Some(((sender, _), _)) = sender_iter.peek() {
            let sender = *sender;
            let mut next = ledger.account(&sender).nonce;
            let mut run = Vec::new();
            for ((_, nonce), id) in self.by_sender.range((sender, 0)..=(sender, u64::MAX)) {
                if *nonce == next {
                    run.push(&self.by_id[id]);
                    next += 1;
                }
            }
            while sender_iter.peek().is_some_and(|((s, _), _)| *s == sender) {
                sender_iter.next();
            }
            if !run.is_empty() {
                queues.insert(sender, run);
            }
        }
        // Merge: the head of each queue competes on tip.
        let mut heads: BTreeSet<(Reverse<u128>, Address, usize)> = queues
            .iter()
            .map(|(s, q)| (Reverse(q[0].tip), *s, 0))
            .collect();
        let mut out = Vec::new();
        while out.len() < max {
            let Some((_, sender, i)) = heads.pop_first() else {
                break;
            };
            let queue = &queues[&sender];
            out.push(queue[i].tx.clone());
            if let Some(next) = queue.get(i + 1) {
                heads.insert((Reverse(next.tip), sender, i + 1));
            }
        }
        out
    }
}
