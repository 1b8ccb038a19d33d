//! The simulator's memos of pure functions (sim/README.md, SIM-FID-1/2).
//!
//! `blyan-sim` runs a hundred nodes on one thread, and each node verifies
//! the same votes and applies the same blocks as every other: at 100
//! validators ~85 % of its time went to k256 verification and a further
//! ~20 % to block application. Both are pure functions, so a memo keyed by
//! their exact inputs returns what the computation would:
//!
//! - **SIM-FID-1** signature verification, keyed by (signature, public key
//!   bytes, message or digest) exactly. No fidelity cost: the result is the function's.
//!   Parsing a SEC1 public key (a point decompression) is memoised the
//!   same way, keyed by its bytes.
//! - **SIM-FID-2** block application (`Ledger::apply_block` and
//!   `apply_block_with_verified`, never the trusted-signature replay), keyed
//!   by (pre-state root, last block hash, block hash); only successes are
//!   kept. Its fidelity cost: it assumes the state root and the last block
//!   hash determine the whole ledger, so a node whose ledger diverged from
//!   its peers' in a field the root does not commit to would be handed their
//!   result instead of its own. The golden vectors and the runtime tests,
//!   which run without memos, are what catch such a divergence.
//!
//! Compiled only with the `sim-memo` feature, and even then inactive on a
//! thread until [`enable`] is called there; the runtime never calls it. Each
//! memo is bounded and cleared when it reaches its capacity.

#[cfg(feature = "sim-memo")]
mod imp {
    use crate::block::BlockOutcome;
    use crate::ledger::Ledger;
    use crate::types::Hash32;
    use k256::ecdsa::VerifyingKey;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    struct Bounded<V> {
        capacity: usize,
        entries: BTreeMap<Hash32, V>,
    }

    impl<V: Clone> Bounded<V> {
        fn new(capacity: usize) -> Self {
            assert!(capacity > 0, "a memo needs room");
            Bounded {
                capacity,
                entries: BTreeMap::new(),
            }
        }
        fn get(&self, key: &Hash32) -> Option<V> {
            self.entries.get(key).cloned()
        }
        fn put(&mut self, key: Hash32, value: V) {
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
            self.entries.insert(key, value);
        }
    }

    struct Memos {
        /// SEC1 bytes → parsed key (a point decompression each).
        keys: BTreeMap<Vec<u8>, Option<VerifyingKey>>,
        keys_capacity: usize,
        /// Keyed by signature ‖ key length ‖ key ‖ message (or digest):
        /// no hashing, and the signature makes keys differ at once.
        verifications: BTreeMap<Vec<u8>, bool>,
        verifications_capacity: usize,
        blocks: Bounded<(Ledger, BlockOutcome)>,
        stats: Stats,
    }

    /// Hits and misses since [`enable`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Stats {
        pub verification_hits: u64,
        pub verification_misses: u64,
        pub block_hits: u64,
        pub block_misses: u64,
    }

    thread_local! {
        static MEMOS: RefCell<Option<Memos>> = const { RefCell::new(None) };
    }

    /// Starts memoising on this thread, forgetting any earlier memo: at most
    /// `verifications` signature results and `blocks` applied blocks.
    pub fn enable(verifications: usize, blocks: usize) {
        MEMOS.with(|m| {
            *m.borrow_mut() = Some(Memos {
                keys: BTreeMap::new(),
                keys_capacity: verifications,
                verifications: BTreeMap::new(),
                verifications_capacity: verifications,
                blocks: Bounded::new(blocks),
                stats: Stats::default(),
            })
        });
    }

    /// Stops memoising on this thread and frees the memos.
    pub fn disable() {
        MEMOS.with(|m| *m.borrow_mut() = None);
    }

    pub fn enabled() -> bool {
        MEMOS.with(|m| m.borrow().is_some())
    }

    pub fn stats() -> Stats {
        MEMOS.with(|m| m.borrow().as_ref().map_or(Stats::default(), |m| m.stats))
    }

    /// SIM-FID-1.
    /// `prehashed`: `message` is the digest itself (tagged so that a
    /// 32-byte message and a digest never share an entry).
    pub(crate) fn verification(
        signature: &[u8; 64],
        key: &[u8],
        message: &[u8],
        prehashed: bool,
        verify: impl FnOnce() -> bool,
    ) -> bool {
        if !enabled() {
            return verify();
        }
        let mut id = Vec::with_capacity(64 + 2 + key.len() + message.len());
        id.extend_from_slice(signature);
        id.push(u8::from(prehashed));
        id.push(key.len() as u8);
        id.extend_from_slice(key);
        id.extend_from_slice(message);
        let hit = MEMOS.with(|m| {
            let mut m = m.borrow_mut();
            let m = m.as_mut().expect("enabled");
            let hit = m.verifications.get(&id).copied();
            if hit.is_some() {
                m.stats.verification_hits += 1;
            }
            hit
        });
        if let Some(ok) = hit {
            return ok;
        }
        // Computed outside the borrow: `verify` must not re-enter the memo.
        let ok = verify();
        MEMOS.with(|m| {
            let mut m = m.borrow_mut();
            let m = m.as_mut().expect("enabled");
            m.stats.verification_misses += 1;
            if m.verifications.len() >= m.verifications_capacity {
                m.verifications.clear();
            }
            m.verifications.insert(id, ok);
        });
        ok
    }

    /// SIM-FID-1: parsing (decompressing) a SEC1 public key.
    pub(crate) fn public_key(
        sec1: &[u8],
        parse: impl FnOnce() -> Option<VerifyingKey>,
    ) -> Option<VerifyingKey> {
        let hit = MEMOS.with(|m| {
            let m = m.borrow();
            m.as_ref().map(|m| m.keys.get(sec1).cloned())
        });
        match hit {
            None => parse(),
            Some(Some(key)) => key,
            Some(None) => {
                let key = parse();
                MEMOS.with(|m| {
                    let mut m = m.borrow_mut();
                    let m = m.as_mut().expect("enabled");
                    if m.keys.len() >= m.keys_capacity {
                        m.keys.clear();
                    }
                    m.keys.insert(sec1.to_vec(), key);
                });
                key
            }
        }
    }

    /// SIM-FID-2: the memo key of applying `block` to `ledger`, or `None`
    /// when memos are off on this thread.
    pub(crate) fn block_key(ledger: &Ledger, block_hash: &Hash32) -> Option<Hash32> {
        enabled().then(|| {
            crate::crypto::sha3_256_parts(&[
                &ledger.state_root(),
                &ledger.last_block_hash(),
                block_hash,
            ])
        })
    }

    pub(crate) fn block_get(key: &Hash32) -> Option<(Ledger, BlockOutcome)> {
        MEMOS.with(|m| {
            let mut m = m.borrow_mut();
            let m = m.as_mut()?;
            let hit = m.blocks.get(key);
            if hit.is_some() {
                m.stats.block_hits += 1;
            } else {
                m.stats.block_misses += 1;
            }
            hit
        })
    }

    pub(crate) fn block_put(key: Hash32, applied: &(Ledger, BlockOutcome)) {
        MEMOS.with(|m| {
            if let Some(m) = m.borrow_mut().as_mut() {
                m.blocks.put(key, applied.clone());
            }
        });
    }
}

#[cfg(not(feature = "sim-memo"))]
mod imp {
    use k256::ecdsa::VerifyingKey;
    pub(crate) fn public_key(
        _sec1: &[u8],
        parse: impl FnOnce() -> Option<VerifyingKey>,
    ) -> Option<VerifyingKey> {
        parse()
    }
    use crate::block::BlockOutcome;
    use crate::ledger::Ledger;
    use crate::types::Hash32;

    pub fn enabled() -> bool {
        false
    }
    pub(crate) fn verification(
        _signature: &[u8; 64],
        _key: &[u8],
        _message: &[u8],
        _prehashed: bool,
        verify: impl FnOnce() -> bool,
    ) -> bool {
        verify()
    }
    pub(crate) fn block_key(_ledger: &Ledger, _block_hash: &Hash32) -> Option<Hash32> {
        None
    }
    pub(crate) fn block_get(_key: &Hash32) -> Option<(Ledger, BlockOutcome)> {
        None
    }
    pub(crate) fn block_put(_key: Hash32, _applied: &(Ledger, BlockOutcome)) {}
}

pub use imp::*;
