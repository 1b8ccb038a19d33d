//! SIM-NET-1/2: the simulated network, sans-IO. A calendar of datagrams in
//! flight (one bucket per arrival millisecond) and one inbox per endpoint;
//! the caller (`run.rs`)
//! draws loss, duplication and latency from madsim's seeded RNG, hands each
//! copy to [`Network::send`] with its arrival time, and runs one delivery
//! task that calls [`Network::deliver_due`] at each arrival instant (one
//! madsim timer per distinct millisecond, not one task and four timers per
//! message as when every message went through madsim's own network).
//!
//! Fault semantics (SIM-NET-2), all decided at arrival, as madsim's network
//! decided them when the latency was a sleep before the send:
//! - a clogged link or node (partitions, swizzle) loses the datagram;
//! - a destination that is down (crashed, halted, not yet restarted) loses
//!   it, and going down empties its inbox;
//! - a sender that crashed after sending loses it (its sends died with it).
//!
//! Datagrams arriving in the same millisecond are ordered by a random draw
//! made at the send (then by send order), so reordering within a millisecond
//! still follows the seed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// SIM-BOUND-4: datagrams in flight (a run at 150 validators has at most a
/// few hundred thousand; more means a runaway sender).
pub const MAX_IN_FLIGHT: usize = 1 << 21;
/// SIM-BOUND-4: datagrams waiting in one inbox (an inbox is drained before
/// simulated time moves on, so it holds at most one millisecond's arrivals).
pub const MAX_INBOX: usize = 1 << 16;

/// One datagram as delivered; `P` is what travels (the simulator's
/// packet: bytes, and their decoding once for every destination).
#[derive(Debug, PartialEq, Eq)]
pub struct Datagram<P> {
    /// The sending endpoint.
    pub from: usize,
    /// Shared by every destination of a broadcast.
    pub payload: Arc<P>,
}

impl<P> Clone for Datagram<P> {
    fn clone(&self) -> Self {
        Datagram {
            from: self.from,
            payload: self.payload.clone(),
        }
    }
}

#[derive(Debug)]
struct InFlight<P> {
    /// Tie-break within the arrival millisecond, then send order.
    order: (u32, u64),
    to: usize,
    sender_incarnation: u32,
    datagram: Datagram<P>,
}

/// What became of the datagrams that arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub delivered: u64,
    pub lost_clogged: u64,
    pub lost_destination_down: u64,
    pub lost_sender_crashed: u64,
}

/// Endpoints `0..endpoints`: the validators, then the client.
pub struct Network<P> {
    endpoints: usize,
    clogged_in: Vec<bool>,
    clogged_out: Vec<bool>,
    /// `from * endpoints + to`.
    clogged_links: Vec<bool>,
    incarnations: Vec<u32>,
    up: Vec<bool>,
    /// Arrival millisecond → the datagrams arriving then, in send order.
    calendar: BTreeMap<u64, Vec<InFlight<P>>>,
    in_flight: usize,
    /// Emptied buckets, reused (their allocations).
    spare: Vec<Vec<InFlight<P>>>,
    inboxes: Vec<VecDeque<Datagram<P>>>,
    next_seq: u64,
    /// When the delivery task will next look at the queue.
    armed_at_ms: Option<u64>,
    pub stats: NetStats,
}

impl<P> Network<P> {
    /// Every endpoint starts down (an endpoint opens when its node starts).
    pub fn new(endpoints: usize) -> Network<P> {
        Network {
            endpoints,
            clogged_in: vec![false; endpoints],
            clogged_out: vec![false; endpoints],
            clogged_links: vec![false; endpoints * endpoints],
            incarnations: vec![0; endpoints],
            up: vec![false; endpoints],
            calendar: BTreeMap::new(),
            in_flight: 0,
            spare: Vec::new(),
            inboxes: (0..endpoints).map(|_| VecDeque::new()).collect(),
            next_seq: 0,
            armed_at_ms: None,
            stats: NetStats::default(),
        }
    }

    /// Queues `datagram` for `to`, arriving at `at_ms`; `order` breaks ties
    /// within a millisecond. Returns true when it arrives before the
    /// delivery task's next wake-up (the task must be woken to re-arm).
    pub fn send(&mut self, to: usize, at_ms: u64, order: u32, datagram: Datagram<P>) -> bool {
        assert!(to < self.endpoints && datagram.from < self.endpoints);
        assert!(self.in_flight < MAX_IN_FLIGHT, "SIM-BOUND-4");
        let sender_incarnation = self.incarnations[datagram.from];
        let spare = &mut self.spare;
        self.calendar
            .entry(at_ms)
            .or_insert_with(|| spare.pop().unwrap_or_default())
            .push(InFlight {
                order: (order, self.next_seq),
                to,
                sender_incarnation,
                datagram,
            });
        self.in_flight += 1;
        self.next_seq += 1;
        if self.armed_at_ms.is_none_or(|armed| at_ms < armed) {
            self.armed_at_ms = Some(at_ms);
            true
        } else {
            false
        }
    }

    /// When the next datagram arrives.
    pub fn next_at_ms(&self) -> Option<u64> {
        self.calendar.first_key_value().map(|(at_ms, _)| *at_ms)
    }

    /// The delivery task's next wake-up (see [`Network::send`]).
    pub fn armed_at_ms(&self) -> Option<u64> {
        self.armed_at_ms
    }

    /// Moves every datagram due by `now_ms` into its inbox or loses it
    /// (SIM-NET-2), pushes onto `woken` each endpoint whose inbox was empty
    /// and now is not, and re-arms at the next arrival.
    pub fn deliver_due(&mut self, now_ms: u64, woken: &mut Vec<usize>) {
        while let Some(entry) = self.calendar.first_entry()
            && *entry.key() <= now_ms
        {
            let mut bucket = entry.remove();
            self.in_flight -= bucket.len();
            bucket.sort_unstable_by_key(|f| f.order);
            for f in bucket.drain(..) {
                self.arrive(f, woken);
            }
            self.spare.push(bucket);
        }
        self.armed_at_ms = self.next_at_ms();
    }

    fn arrive(&mut self, f: InFlight<P>, woken: &mut Vec<usize>) {
        let from = f.datagram.from;
        if f.sender_incarnation != self.incarnations[from] {
            self.stats.lost_sender_crashed += 1;
        } else if self.is_clogged(from, f.to) {
            self.stats.lost_clogged += 1;
        } else if !self.up[f.to] {
            self.stats.lost_destination_down += 1;
        } else {
            let inbox = &mut self.inboxes[f.to];
            assert!(inbox.len() < MAX_INBOX, "SIM-BOUND-4");
            if inbox.is_empty() {
                woken.push(f.to);
            }
            inbox.push_back(f.datagram);
            self.stats.delivered += 1;
        }
    }

    /// The next datagram in `to`'s inbox.
    pub fn recv(&mut self, to: usize) -> Option<Datagram<P>> {
        self.inboxes[to].pop_front()
    }

    pub fn has_mail(&self, to: usize) -> bool {
        !self.inboxes[to].is_empty()
    }

    /// The endpoint's node started (or restarted): it receives again.
    pub fn open(&mut self, i: usize) {
        self.up[i] = true;
    }

    /// The endpoint's node stopped (halted on a store error): what it had
    /// not read is lost, and so is what arrives until it opens again. What
    /// it already sent still arrives.
    pub fn close(&mut self, i: usize) {
        self.up[i] = false;
        self.inboxes[i].clear();
    }

    /// The endpoint's node was killed: [`Network::close`], and what it sent
    /// that has not arrived yet is lost.
    pub fn crash(&mut self, i: usize) {
        self.close(i);
        self.incarnations[i] = self.incarnations[i].wrapping_add(1);
    }

    /// Whether a datagram from `from` to `to` would be lost to a clog now.
    pub fn is_clogged(&self, from: usize, to: usize) -> bool {
        self.clogged_out[from]
            || self.clogged_in[to]
            || self.clogged_links[from * self.endpoints + to]
    }

    /// One direction of one link.
    pub fn clog_link(&mut self, from: usize, to: usize) {
        self.clogged_links[from * self.endpoints + to] = true;
    }

    pub fn unclog_link(&mut self, from: usize, to: usize) {
        self.clogged_links[from * self.endpoints + to] = false;
    }

    /// Both directions of every link of the endpoint.
    pub fn clog_node(&mut self, i: usize) {
        self.clogged_in[i] = true;
        self.clogged_out[i] = true;
    }

    pub fn unclog_node(&mut self, i: usize) {
        self.clogged_in[i] = false;
        self.clogged_out[i] = false;
    }

    /// Unclogs every node and link.
    pub fn heal(&mut self) {
        self.clogged_in.fill(false);
        self.clogged_out.fill(false);
        self.clogged_links.fill(false);
    }

    /// Datagrams in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(from: usize, byte: u8) -> Datagram<u8> {
        Datagram {
            from,
            payload: Arc::new(byte),
        }
    }

    fn bytes(net: &mut Network<u8>, to: usize) -> Vec<u8> {
        std::iter::from_fn(|| net.recv(to))
            .map(|d| *d.payload)
            .collect()
    }

    fn open_net(endpoints: usize) -> Network<u8> {
        let mut net = Network::new(endpoints);
        (0..endpoints).for_each(|i| net.open(i));
        net
    }

    /// SIM-NET-1: a datagram arrives at its time, not before; arrivals are
    /// ordered by time, then by the tie-break drawn at the send, then by
    /// send order; only endpoints whose inbox was empty are woken.
    #[test]
    fn sim_net_1_arrival_time_and_order() {
        let mut net = open_net(3);
        assert!(net.send(1, 50, 7, datagram(0, 1)));
        assert!(!net.send(1, 60, 0, datagram(0, 2)));
        assert!(net.send(1, 40, 9, datagram(2, 3)));
        assert!(!net.send(1, 50, 3, datagram(2, 4)));
        assert!(!net.send(1, 50, 3, datagram(0, 5)));
        assert_eq!(net.armed_at_ms(), Some(40));
        let mut woken = Vec::new();
        net.deliver_due(39, &mut woken);
        assert!(woken.is_empty() && !net.has_mail(1));
        assert_eq!(net.armed_at_ms(), Some(40));
        net.deliver_due(50, &mut woken);
        assert_eq!(woken, vec![1]);
        assert_eq!(net.armed_at_ms(), Some(60));
        assert_eq!(bytes(&mut net, 1), vec![3, 4, 5, 1]);
        net.deliver_due(60, &mut woken);
        assert_eq!(woken, vec![1, 1]);
        assert_eq!(bytes(&mut net, 1), vec![2]);
        assert_eq!(net.armed_at_ms(), None);
        assert_eq!(net.stats.delivered, 5);
        assert_eq!(net.in_flight(), 0);
    }

    /// SIM-NET-2: clogs are decided at arrival: a link clogged when the
    /// datagram arrives loses it, one clogged only while it was in flight
    /// does not; a clogged node loses both directions.
    #[test]
    fn sim_net_2_clogs_at_arrival() {
        let mut net = open_net(3);
        net.send(1, 10, 0, datagram(0, 1));
        net.clog_link(0, 1);
        net.send(0, 10, 0, datagram(1, 2));
        net.send(1, 20, 0, datagram(0, 3));
        let mut woken = Vec::new();
        net.deliver_due(10, &mut woken);
        assert_eq!(bytes(&mut net, 1), Vec::<u8>::new());
        assert_eq!(bytes(&mut net, 0), vec![2]);
        net.unclog_link(0, 1);
        net.deliver_due(20, &mut woken);
        assert_eq!(bytes(&mut net, 1), vec![3]);
        net.clog_node(2);
        net.send(2, 30, 0, datagram(0, 4));
        net.send(0, 30, 0, datagram(2, 5));
        net.send(1, 30, 0, datagram(0, 6));
        net.deliver_due(30, &mut woken);
        assert_eq!(bytes(&mut net, 2), Vec::<u8>::new());
        assert_eq!(bytes(&mut net, 0), Vec::<u8>::new());
        assert_eq!(bytes(&mut net, 1), vec![6]);
        net.clog_link(1, 0);
        net.heal();
        net.send(0, 40, 0, datagram(1, 7));
        net.send(0, 40, 0, datagram(2, 8));
        net.deliver_due(40, &mut woken);
        assert_eq!(bytes(&mut net, 0), vec![7, 8]);
        assert_eq!(net.stats.lost_clogged, 3);
    }

    /// SIM-NET-2: a destination that is down loses what arrives and what it
    /// had not read; a halted sender's datagrams still arrive, a crashed
    /// one's do not (those sent after its restart do).
    #[test]
    fn sim_net_2_down_and_crashed_endpoints() {
        let mut net = open_net(3);
        let mut woken = Vec::new();
        net.send(1, 10, 0, datagram(0, 1));
        net.deliver_due(10, &mut woken);
        net.close(1);
        assert!(!net.has_mail(1));
        net.send(1, 20, 0, datagram(0, 2));
        net.deliver_due(20, &mut woken);
        net.open(1);
        assert_eq!(bytes(&mut net, 1), Vec::<u8>::new());
        assert_eq!(net.stats.lost_destination_down, 1);

        net.send(2, 30, 0, datagram(1, 3));
        net.close(1);
        net.send(2, 30, 0, datagram(0, 4));
        net.crash(0);
        net.send(2, 30, 0, datagram(0, 5));
        net.deliver_due(30, &mut woken);
        assert_eq!(bytes(&mut net, 2), vec![3, 5]);
        assert_eq!(net.stats.lost_sender_crashed, 1);
    }

    #[test]
    #[should_panic(expected = "SIM-BOUND-4")]
    fn sim_bound_4_inbox_is_bounded() {
        let mut net = open_net(2);
        for k in 0..=MAX_INBOX {
            net.send(1, 1, 0, datagram(0, k as u8));
        }
        net.deliver_due(1, &mut Vec::new());
    }
}
