//! SYNC-1: a bounded map `key → (value, token)` with a reverse index
//! `token → key`, updated under one lock so that, between any two
//! operations, every key's current token maps back to it and no revoked
//! token maps anywhere. Bounded by entries and by the bytes each entry
//! declares ([`TokenTable::upsert_sized`]); entries can be dropped by a
//! predicate ([`TokenTable::retain`]) and read a page at a time in key
//! order ([`TokenTable::page`]).

use crate::sync::{Mutex, MutexGuard};
use std::collections::BTreeMap;
use std::ops::Bound;

/// Refused: the table is at its bound (entries or bytes) for this entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenTableFull;

struct Inner<K, V, T> {
    /// key → (value, token, declared bytes)
    entries: BTreeMap<K, (V, T, usize)>,
    owners: BTreeMap<T, K>,
    total_bytes: usize,
}

/// See the module docs.
pub struct TokenTable<K, V, T> {
    max_entries: usize,
    max_bytes: usize,
    inner: Mutex<Inner<K, V, T>>,
}

impl<K: Ord + Clone, V: Clone, T: Ord + Clone> TokenTable<K, V, T> {
    /// A table of at most `max_entries` entries, not bounded in bytes.
    pub fn new(max_entries: usize) -> Self {
        Self::with_max_bytes(max_entries, usize::MAX)
    }

    /// A table of at most `max_entries` entries whose declared sizes total
    /// at most `max_bytes`.
    pub fn with_max_bytes(max_entries: usize, max_bytes: usize) -> Self {
        assert!(max_entries > 0, "a token table must hold an entry");
        TokenTable {
            max_entries,
            max_bytes,
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                owners: BTreeMap::new(),
                total_bytes: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V, T>> {
        // Every update below finishes its map writes with no fallible
        // step between them, so a poisoned lock still guards consistent maps.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`TokenTable::upsert_sized`] of an entry that declares no bytes.
    pub fn upsert(
        &self,
        key: K,
        value: V,
        token: T,
        accept: impl FnOnce(Option<&V>) -> bool,
    ) -> Result<bool, TokenTableFull> {
        self.upsert_sized(key, value, 0, token, accept)
    }

    /// Sets `key`'s value (of `bytes` declared bytes) and token if
    /// `accept(previous value)` says so, revoking its previous token.
    /// Returns whether it was set; refused if a new key finds the table at
    /// its entry bound, or the bytes would exceed the byte bound.
    pub fn upsert_sized(
        &self,
        key: K,
        value: V,
        bytes: usize,
        token: T,
        accept: impl FnOnce(Option<&V>) -> bool,
    ) -> Result<bool, TokenTableFull> {
        let mut inner = self.lock();
        let previous = inner.entries.get(&key);
        if previous.is_none() && inner.entries.len() >= self.max_entries {
            return Err(TokenTableFull);
        }
        let freed = previous.map_or(0, |(_, _, b)| *b);
        if (inner.total_bytes - freed).saturating_add(bytes) > self.max_bytes {
            return Err(TokenTableFull);
        }
        if !accept(previous.map(|(v, _, _)| v)) {
            return Ok(false);
        }
        if let Some((_, old, old_bytes)) = inner
            .entries
            .insert(key.clone(), (value, token.clone(), bytes))
        {
            inner.owners.remove(&old);
            inner.total_bytes -= old_bytes;
        }
        inner.total_bytes += bytes;
        let displaced = inner.owners.insert(token, key);
        assert!(displaced.is_none(), "tokens are unique (random 256-bit)");
        Ok(true)
    }

    /// Drops every entry `keep` refuses, revoking its token; returns how many.
    pub fn retain(&self, mut keep: impl FnMut(&V) -> bool) -> usize {
        let mut inner = self.lock();
        let gone: Vec<K> = inner
            .entries
            .iter()
            .filter(|(_, (v, _, _))| !keep(v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            if let Some((_, t, b)) = inner.entries.remove(k) {
                inner.owners.remove(&t);
                inner.total_bytes -= b;
            }
        }
        gone.len()
    }

    /// The key a token currently belongs to.
    pub fn owner(&self, token: &T) -> Option<K> {
        self.lock().owners.get(token).cloned()
    }

    /// Every value, in key order.
    pub fn values(&self) -> Vec<V> {
        self.page(None, usize::MAX)
    }

    /// At most `limit` values of keys after `after` (all keys if `None`), in key order.
    pub fn page(&self, after: Option<&K>, limit: usize) -> Vec<V> {
        let inner = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        inner
            .entries
            .range((start, Bound::Unbounded))
            .take(limit)
            .map(|(_, (v, _, _))| v.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sum of the declared bytes of the entries.
    pub fn total_bytes(&self) -> usize {
        self.lock().total_bytes
    }

    /// SYNC-1, checked by tests: the two maps are inverse of each other,
    /// and both bounds hold.
    pub fn check_invariant(&self) {
        let inner = self.lock();
        assert_eq!(inner.entries.len(), inner.owners.len());
        for (k, (_, t, _)) in &inner.entries {
            assert!(
                inner.owners.get(t) == Some(k),
                "a current token maps back to its key"
            );
        }
        assert!(inner.entries.len() <= self.max_entries);
        let bytes: usize = inner.entries.values().map(|(_, _, b)| b).sum();
        assert_eq!(bytes, inner.total_bytes);
        assert!(bytes <= self.max_bytes);
    }
}
