//! SYNC-2: a least-recently-used cache of shared byte buffers (weight
//! blocks, blob chunks) bounded by their total size. A buffer larger than
//! the whole bound is never cached. Readers get an `Arc`, so eviction never
//! invalidates a buffer in use. (The buffers' `Arc` is always std's: they are
//! immutable, so loom need not model them.)

use crate::sync::{Mutex, MutexGuard};
use std::collections::BTreeMap;
use std::sync::Arc;

struct Inner<K> {
    /// key → (buffer, last-use tick)
    entries: BTreeMap<K, (Arc<Vec<u8>>, u64)>,
    /// last-use tick → key (ticks are unique), oldest first.
    by_use: BTreeMap<u64, K>,
    total_bytes: usize,
    tick: u64,
}

/// See the module docs.
pub struct ByteCache<K> {
    max_bytes: usize,
    inner: Mutex<Inner<K>>,
}

impl<K: Ord + Clone> ByteCache<K> {
    pub fn new(max_bytes: usize) -> Self {
        ByteCache {
            max_bytes,
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                by_use: BTreeMap::new(),
                total_bytes: 0,
                tick: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        // No update below can panic half-way (only map operations and
        // additions bounded by `max_bytes`), so a poisoned lock is consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The buffer for `key`, marking it used.
    pub fn get(&self, key: &K) -> Option<Arc<Vec<u8>>> {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let (buf, old_tick) = {
            let (buf, t) = inner.entries.get_mut(key)?;
            let old = *t;
            *t = tick;
            (buf.clone(), old)
        };
        inner.by_use.remove(&old_tick);
        inner.by_use.insert(tick, key.clone());
        Some(buf)
    }

    /// Caches `buf` under `key` (replacing any previous one), evicting the
    /// least recently used buffers until it fits. Returns whether it was cached.
    pub fn insert(&self, key: K, buf: Arc<Vec<u8>>) -> bool {
        let len = buf.len();
        if len > self.max_bytes {
            return false;
        }
        let mut inner = self.lock();
        if let Some((old, t)) = inner.entries.remove(&key) {
            inner.by_use.remove(&t);
            inner.total_bytes -= old.len();
        }
        while inner.total_bytes + len > self.max_bytes {
            let (&t, _) = inner
                .by_use
                .iter()
                .next()
                .expect("over the bound implies an entry to evict");
            let k = inner.by_use.remove(&t).expect("present");
            let (old, _) = inner.entries.remove(&k).expect("indexes agree");
            inner.total_bytes -= old.len();
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.by_use.insert(tick, key.clone());
        inner.entries.insert(key, (buf, tick));
        inner.total_bytes += len;
        true
    }

    /// Drops `key`'s buffer, if cached.
    pub fn remove(&self, key: &K) {
        let mut inner = self.lock();
        if let Some((old, t)) = inner.entries.remove(key) {
            inner.by_use.remove(&t);
            inner.total_bytes -= old.len();
        }
    }

    /// Bytes held.
    pub fn total_bytes(&self) -> usize {
        self.lock().total_bytes
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// SYNC-2, checked by tests: the bound holds and the indexes agree.
    pub fn check_invariant(&self) {
        let inner = self.lock();
        let sum: usize = inner.entries.values().map(|(b, _)| b.len()).sum();
        assert_eq!(sum, inner.total_bytes);
        assert!(inner.total_bytes <= self.max_bytes);
        assert_eq!(inner.entries.len(), inner.by_use.len());
        for (t, k) in &inner.by_use {
            assert_eq!(inner.entries.get(k).map(|(_, t2)| t2), Some(t));
        }
    }
}
