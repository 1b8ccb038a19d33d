//! Admission of inbound P2P connections before they are authenticated
//! (spec/node.md NODE-NET-6). Pure bookkeeping, no sockets: the transport's
//! accept loop asks [`HandshakeBudget::admit`] what to do with each new TCP
//! connection and tells it when a handshake ends.
//!
//! The threat: a TCP connection costs an attacker nothing, and until its TLS
//! handshake completes nobody knows whether it is a validator. A fixed pool of
//! slots taken at accept time and held for the whole handshake timeout is
//! filled by a few idle connections per second, and then a validator that
//! restarts can never get back in.
//!
//! - **NODE-NET-6a** Unauthenticated connections have a budget of their own
//!   ([`HandshakeBudget::max_pending`]), separate from the slots of
//!   established (authenticated) connections, which only validators can
//!   reach: a flood of handshakes never takes a known peer's slot.
//! - **NODE-NET-6b** One source (an IPv4 address, or an IPv6 /64, which one
//!   host controls entirely) may have at most [`HandshakeBudget::max_per_source`]
//!   handshakes in flight; one more from it is refused at once.
//! - **NODE-NET-6c** When the budget is full, a new connection evicts the
//!   handshake pending longest. An honest handshake finishes in a few round
//!   trips, so to starve it an attacker must open `max_pending` connections
//!   from `max_pending / max_per_source` sources within that time, rather
//!   than a few per second.
//! - **NODE-NET-6d** A handshake must finish within the transport's
//!   `handshake_timeout_ms` (default 3 s).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

/// The key that per-source limits count by: an IPv4 address as is (an
/// IPv4-mapped IPv6 address as its IPv4 address), an IPv6 address by its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// What to do with a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Start its handshake under this ticket; first end the handshake of
    /// ticket `evict`, if any (NODE-NET-6c).
    Admit { ticket: u64, evict: Option<u64> },
    /// NODE-NET-6b: its source has too many handshakes in flight.
    RefuseSource,
}

/// The handshakes in flight (see the module docs).
#[derive(Debug)]
pub struct HandshakeBudget {
    max_pending: usize,
    max_per_source: usize,
    next_ticket: u64,
    /// Ticket → source; tickets grow, so the first entry is the oldest.
    pending: BTreeMap<u64, IpAddr>,
    per_source: BTreeMap<IpAddr, usize>,
}

impl HandshakeBudget {
    pub fn new(max_pending: usize, max_per_source: usize) -> HandshakeBudget {
        assert!(
            max_pending > 0 && max_per_source > 0,
            "a budget admits something"
        );
        HandshakeBudget {
            max_pending,
            max_per_source,
            next_ticket: 0,
            pending: BTreeMap::new(),
            per_source: BTreeMap::new(),
        }
    }

    pub fn max_pending(&self) -> usize {
        self.max_pending
    }

    pub fn max_per_source(&self) -> usize {
        self.max_per_source
    }

    /// Handshakes in flight.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Handshakes in flight from `ip`'s source.
    pub fn from_source(&self, ip: IpAddr) -> usize {
        self.per_source.get(&source_key(ip)).copied().unwrap_or(0)
    }

    /// A new connection from `ip`. An evicted ticket is already forgotten
    /// when this returns (its [`HandshakeBudget::finish`] is a no-op).
    pub fn admit(&mut self, ip: IpAddr) -> Admission {
        let source = source_key(ip);
        if self.per_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            return Admission::RefuseSource;
        }
        let evict = if self.pending.len() >= self.max_pending {
            let (&oldest, _) = self.pending.iter().next().expect("full is non-empty");
            self.finish(oldest);
            Some(oldest)
        } else {
            None
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.pending.insert(ticket, source);
        *self.per_source.entry(source).or_insert(0) += 1;
        self.check();
        Admission::Admit { ticket, evict }
    }

    /// The handshake of `ticket` ended (done, failed, timed out or evicted).
    /// Idempotent.
    pub fn finish(&mut self, ticket: u64) {
        if let Some(source) = self.pending.remove(&ticket) {
            let n = self
                .per_source
                .get_mut(&source)
                .expect("a pending ticket's source is counted");
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    fn check(&self) {
        debug_assert!(self.pending.len() <= self.max_pending);
        debug_assert_eq!(self.per_source.values().sum::<usize>(), self.pending.len());
        debug_assert!(self.per_source.values().all(|n| *n <= self.max_per_source));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn net_6b_a_source_over_its_cap_is_refused() {
        let mut b = HandshakeBudget::new(8, 2);
        assert!(matches!(
            b.admit(v4(1)),
            Admission::Admit { evict: None, .. }
        ));
        assert!(matches!(
            b.admit(v4(1)),
            Admission::Admit { evict: None, .. }
        ));
        assert_eq!(b.admit(v4(1)), Admission::RefuseSource);
        assert!(matches!(
            b.admit(v4(2)),
            Admission::Admit { evict: None, .. }
        ));
        assert_eq!(b.from_source(v4(1)), 2);
    }

    #[test]
    fn net_6b_an_ipv6_64_is_one_source() {
        let mut b = HandshakeBudget::new(8, 1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(matches!(b.admit(a), Admission::Admit { .. }));
        assert_eq!(b.admit(same), Admission::RefuseSource);
        assert!(matches!(b.admit(other), Admission::Admit { .. }));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), v4(1));
    }

    #[test]
    fn net_6c_a_full_budget_evicts_the_oldest_handshake() {
        let mut b = HandshakeBudget::new(3, 3);
        let t: Vec<u64> = (1..=3)
            .map(|i| match b.admit(v4(i)) {
                Admission::Admit {
                    ticket,
                    evict: None,
                } => ticket,
                other => panic!("{other:?}"),
            })
            .collect();
        // Full: the next one evicts the first, whatever its source.
        match b.admit(v4(9)) {
            Admission::Admit { evict, .. } => assert_eq!(evict, Some(t[0])),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.from_source(v4(1)), 0);
        // The evicted ticket's own end changes nothing.
        b.finish(t[0]);
        assert_eq!(b.len(), 3);
        b.finish(t[1]);
        assert_eq!(b.len(), 2);
    }

    proptest! {
        /// Whatever the arrivals and endings, the bounds hold, counts match,
        /// and a fresh connection from a source under its cap is admitted.
        #[test]
        fn net_6_bounds_hold(ops in proptest::collection::vec((any::<bool>(), 0u8..6, 0usize..16), 1..300)) {
            let mut b = HandshakeBudget::new(5, 2);
            let mut live: Vec<u64> = Vec::new();
            for (arrive, src, pick) in ops {
                if arrive || live.is_empty() {
                    let under_cap = b.from_source(v4(src)) < 2;
                    match b.admit(v4(src)) {
                        Admission::Admit { ticket, evict } => {
                            prop_assert!(under_cap);
                            if let Some(e) = evict {
                                prop_assert_eq!(Some(&e), live.iter().min());
                                live.retain(|t| *t != e);
                            }
                            live.push(ticket);
                        }
                        Admission::RefuseSource => prop_assert!(!under_cap),
                    }
                } else {
                    let t = live.remove(pick % live.len());
                    b.finish(t);
                }
                prop_assert!(b.len() <= 5);
                prop_assert_eq!(b.len(), live.len());
            }
        }
    }
}

/// NODE-SYNC-6: what serving catch-up may cost per peer. A `BlockRequest`
/// costs this node a store read and up to `sync_batch_bytes` sent; without a
/// bound, one peer asking in a loop turns each small request into megabytes
/// out. Each peer has a token bucket of bytes (refilled at `rate_bytes_per_s`
/// up to `burst_bytes`); a reply is served only while the peer's balance is
/// positive and is charged its byte budget (`max_bytes`, the most it can
/// hold). An honest laggard, which asks for the next batch only after
/// applying the last, is slowed only beyond the rate. Pure: time is an input.
#[derive(Debug)]
pub struct SyncServeBudget {
    rate_bytes_per_s: u64,
    burst_bytes: u64,
    max_peers: usize,
    /// Peer → (balance in bytes, may be negative; last refill ms).
    peers: BTreeMap<[u8; 20], (i128, u64)>,
}

impl SyncServeBudget {
    pub fn new(rate_bytes_per_s: u64, burst_bytes: u64, max_peers: usize) -> SyncServeBudget {
        assert!(rate_bytes_per_s > 0 && burst_bytes > 0 && max_peers > 0);
        SyncServeBudget {
            rate_bytes_per_s,
            burst_bytes,
            max_peers,
            peers: BTreeMap::new(),
        }
    }

    /// Whether to serve `peer` a reply of at most `bytes` at `now_ms`; if
    /// so, it is charged.
    pub fn take(&mut self, peer: [u8; 20], bytes: u64, now_ms: u64) -> bool {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            // Bounded: forget the peer refilled longest ago.
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(p, (_, t))| (*t, **p))
                .map(|(p, _)| *p)
                .expect("full is non-empty");
            self.peers.remove(&oldest);
        }
        let burst = i128::from(self.burst_bytes);
        let (balance, last_ms) = self.peers.entry(peer).or_insert((burst, now_ms));
        let elapsed_ms = now_ms.saturating_sub(*last_ms);
        let refill = i128::from(self.rate_bytes_per_s) * i128::from(elapsed_ms) / 1_000;
        *balance = (*balance + refill).min(burst);
        *last_ms = now_ms.max(*last_ms);
        if *balance <= 0 {
            return false;
        }
        *balance -= i128::from(bytes);
        true
    }
}

#[cfg(test)]
mod serve_tests {
    use super::*;

    #[test]
    fn sync_6_a_peer_is_served_up_to_its_burst_then_at_its_rate() {
        // 10 MB/s, burst 30 MB, replies charged 3 MB.
        let mut b = SyncServeBudget::new(10_000_000, 30_000_000, 8);
        let p = [1u8; 20];
        let served = (0..100).filter(|_| b.take(p, 3_000_000, 1_000)).count();
        assert_eq!(served, 10, "the burst, then nothing at the same instant");
        // 0.1 s refills 1 MB: positive, so one more reply (balance -2 MB) ...
        assert!(b.take(p, 3_000_000, 1_100));
        assert!(!b.take(p, 3_000_000, 1_100));
        // ... and nothing until the debt is repaid.
        assert!(!b.take(p, 3_000_000, 1_300), "balance 0 at 1.3 s");
        assert!(b.take(p, 3_000_000, 1_400), "balance 1 MB at 1.4 s");
        // Another peer is not affected.
        assert!(b.take([2u8; 20], 3_000_000, 1_400));
        // Over a long run the rate holds: 10 s at 10 MB/s is about 33 replies.
        let mut n = 0;
        for t in (2_000..12_000).step_by(10) {
            n += usize::from(b.take(p, 3_000_000, t));
        }
        assert!((32..=35).contains(&n), "{n} replies in 10 s");
    }

    #[test]
    fn sync_6_tracked_peers_are_bounded() {
        let mut b = SyncServeBudget::new(1, 10, 2);
        for i in 0..10u8 {
            assert!(b.take([i; 20], 1, u64::from(i)));
        }
        assert!(b.peers.len() <= 2);
    }
}
