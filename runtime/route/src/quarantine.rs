//! Quarantine: a node that lost a settlement (RT-SPOT-4) is excluded from
//! routes for a configured time (spec/inference.md, RT-QUAR-*).
//!
//! - **RT-QUAR-1** `quarantine(node, now_ms)` excludes the node until
//!   `now_ms + duration_ms`; a node already quarantined keeps the later of
//!   its current and new end (a repeat never shortens it).
//! - **RT-QUAR-2** A node is quarantined at `now_ms` iff `now_ms < until`;
//!   the planner never routes to it (RT-ROUTE-1), nor makes it a checker
//!   (RT-SPOT-2).
//! - **RT-QUAR-3** At most `max_entries` entries: expired entries are
//!   purged first; if still full, the entry that ends soonest (ties: lowest
//!   address) is released early. Entries come only from settled faults of
//!   registered nodes, so the bound is reached only under mass faults.
//! - **RT-QUAR-4** Every quarantine is counted (`total`) for `/metrics`.

use crate::{Error, Result};
use blyan_state_machine::types::Address;
use std::collections::BTreeMap;

/// RT-QUAR-1: default quarantine, one hour.
pub const DEFAULT_QUARANTINE_MS: u64 = 60 * 60 * 1000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantineConfig {
    pub duration_ms: u64,
    pub max_entries: usize,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            duration_ms: DEFAULT_QUARANTINE_MS,
            max_entries: 10_000,
        }
    }
}

/// Quarantined nodes and when each is released (RT-QUAR-*).
#[derive(Clone, Debug)]
pub struct Quarantine {
    config: QuarantineConfig,
    until_ms: BTreeMap<Address, u64>,
    total: u64,
}

impl Default for Quarantine {
    fn default() -> Self {
        Quarantine::new(QuarantineConfig::default()).expect("the default is valid")
    }
}

impl Quarantine {
    pub fn new(config: QuarantineConfig) -> Result<Self> {
        if config.max_entries == 0 {
            return Err(Error::InvalidConfig(
                "quarantine max_entries must be positive",
            ));
        }
        Ok(Quarantine {
            config,
            until_ms: BTreeMap::new(),
            total: 0,
        })
    }

    /// RT-QUAR-1, RT-QUAR-3, RT-QUAR-4: returns when the node is released
    /// and the nodes released early to make room.
    pub fn quarantine(&mut self, node: Address, now_ms: u64) -> (u64, Vec<Address>) {
        self.total += 1;
        let until = now_ms.saturating_add(self.config.duration_ms);
        let mut released = Vec::new();
        if let Some(old) = self.until_ms.get_mut(&node) {
            *old = (*old).max(until);
            return (*old, released);
        }
        self.purge(now_ms);
        while self.until_ms.len() >= self.config.max_entries {
            let victim = self
                .until_ms
                .iter()
                .min_by_key(|(a, u)| (**u, **a))
                .map(|(a, _)| *a)
                .expect("a full table has an entry");
            self.until_ms.remove(&victim);
            released.push(victim);
        }
        self.until_ms.insert(node, until);
        (until, released)
    }

    /// RT-QUAR-2.
    pub fn is_quarantined(&self, node: &Address, now_ms: u64) -> bool {
        self.until_ms.get(node).is_some_and(|u| now_ms < *u)
    }

    /// RT-QUAR-2: when the node is released, if it is quarantined.
    pub fn until_ms(&self, node: &Address, now_ms: u64) -> Option<u64> {
        self.until_ms.get(node).copied().filter(|u| now_ms < *u)
    }

    /// Drops entries that have ended, returning them in address order.
    pub fn purge(&mut self, now_ms: u64) -> Vec<Address> {
        let gone: Vec<Address> = self
            .until_ms
            .iter()
            .filter(|(_, u)| now_ms >= **u)
            .map(|(a, _)| *a)
            .collect();
        for a in &gone {
            self.until_ms.remove(a);
        }
        gone
    }

    /// Quarantined nodes at `now_ms` with their release times, address order.
    pub fn active(&self, now_ms: u64) -> impl Iterator<Item = (Address, u64)> + '_ {
        self.until_ms
            .iter()
            .filter(move |(_, u)| now_ms < **u)
            .map(|(a, u)| (*a, *u))
    }

    /// RT-QUAR-4: quarantines ordered since creation.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(i: u8) -> Address {
        Address([i; 20])
    }

    #[test]
    fn rt_quar_1_2_excluded_for_the_duration_and_never_shortened() {
        let mut q = Quarantine::new(QuarantineConfig {
            duration_ms: 1_000,
            max_entries: 8,
        })
        .unwrap();
        assert_eq!(q.quarantine(a(1), 10_000).0, 11_000);
        assert!(q.is_quarantined(&a(1), 10_999));
        assert!(!q.is_quarantined(&a(1), 11_000));
        assert!(!q.is_quarantined(&a(2), 10_500));
        // A repeat extends, an earlier "now" never shortens.
        assert_eq!(q.quarantine(a(1), 10_500).0, 11_500);
        assert_eq!(q.quarantine(a(1), 9_000).0, 11_500);
        assert_eq!(q.total(), 3);
    }

    #[test]
    fn rt_quar_3_bounded_purges_then_releases_the_soonest_ending() {
        let mut q = Quarantine::new(QuarantineConfig {
            duration_ms: 1_000,
            max_entries: 2,
        })
        .unwrap();
        q.quarantine(a(1), 0);
        q.quarantine(a(2), 100);
        // Full, nothing expired: a(1) ends first and is released.
        let (_, released) = q.quarantine(a(3), 200);
        assert_eq!(released, vec![a(1)]);
        // At 1_150 a(2) has expired and is purged instead of releasing a(3).
        let (_, released) = q.quarantine(a(4), 1_150);
        assert!(released.is_empty());
        assert!(q.is_quarantined(&a(3), 1_150) && q.is_quarantined(&a(4), 1_150));
        assert_eq!(q.active(1_150).count(), 2);
    }
}
