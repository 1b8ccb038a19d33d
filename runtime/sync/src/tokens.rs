//! SYNC-1: a bounded map `key → (value, token)` with a reverse index
//! `token → key`, updated under one lock so that, between any two
//! operations, every key's current token maps back to it and no revoked
//! token maps anywhere.

use crate::sync::{Mutex, MutexGuard};
use std::collections::BTreeMap;

/// Refused: the table is at its bound and the key is new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenTableFull;

struct Inner<K, V, T> {
    entries: BTreeMap<K, (V, T)>,
    owners: BTreeMap<T, K>,
}

/// See the module docs.
pub struct TokenTable<K, V, T> {
    max_entries: usize,
    inner: Mutex<Inner<K, V, T>>,
}

impl<K: Ord + Clone, V: Clone, T: Ord + Clone> TokenTable<K, V, T> {
    pub fn new(max_entries: usize) -> Self {
        assert!(max_entries > 0, "a token table must hold an entry");
        TokenTable {
            max_entries,
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                owners: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V, T>> {
        // Every update below finishes its two map writes with no fallible
        // step between them, so a poisoned lock still guards consistent maps.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets `key`'s value and token if `accept(previous value)` says so,
    /// revoking its previous token. Returns whether it was set.
    pub fn upsert(
        &self,
        key: K,
        value: V,
        token: T,
        accept: impl FnOnce(Option<&V>) -> bool,
    ) -> Result<bool, TokenTableFull> {
        let mut inner = self.lock();
        let previous = inner.entries.get(&key);
        if previous.is_none() && inner.entries.len() >= self.max_entries {
            return Err(TokenTableFull);
        }
        if !accept(previous.map(|(v, _)| v)) {
            return Ok(false);
        }
        if let Some((_, old)) = inner.entries.insert(key.clone(), (value, token.clone())) {
            inner.owners.remove(&old);
        }
        let displaced = inner.owners.insert(token, key);
        assert!(displaced.is_none(), "tokens are unique (random 256-bit)");
        Ok(true)
    }

    /// The key a token currently belongs to.
    pub fn owner(&self, token: &T) -> Option<K> {
        self.lock().owners.get(token).cloned()
    }

    /// Every value, in key order.
    pub fn values(&self) -> Vec<V> {
        self.lock()
            .entries
            .values()
            .map(|(v, _)| v.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// SYNC-1, checked by tests: the two maps are inverse of each other.
    pub fn check_invariant(&self) {
        let inner = self.lock();
        assert_eq!(inner.entries.len(), inner.owners.len());
        for (k, (_, t)) in &inner.entries {
            assert!(
                inner.owners.get(t) == Some(k),
                "a current token maps back to its key"
            );
        }
        assert!(inner.entries.len() <= self.max_entries);
    }
}
