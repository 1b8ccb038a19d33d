//! Durable chain storage on fjall: the runtime's [`node::Store`]
//! (NODE-STORE-*).
//!
//! Keyspaces:
//! - `meta`: schema version, genesis hash, height;
//! - `blocks`: height (big-endian u64) → canonical [`CommittedBlock`] bytes
//!   (the block with the commit certificate that decided it);
//! - `state`: `ns ‖ key` → canonical value bytes, exactly the committed state
//!   of STATE-1;
//! - `records`: height (big-endian u64) ‖ sequence number (big-endian u64) →
//!   a consensus record of the height in progress (CONS-CRASH-1), in the
//!   order written;
//! - `candidates`: height ‖ block hash → canonical [`ProposedBlock`]: blocks
//!   this node proposed or locked on at the height in progress (NODE-STORE-5);
//! - `txs`: transaction id → height (big-endian u64) ‖ index in the block
//!   (big-endian u32) ‖ canonical [`Receipt`]: the receipt index the API
//!   answers `GET /tx/{id}` from;
//! - `block_hashes`: block hash → height (big-endian u64): the index the API
//!   answers `GET /block/{hash}` from (schema 4; a schema-3 directory is
//!   indexed once on open).
//!
//! Every write is one batch synced to disk ([`PersistMode::SyncAll`]) before
//! the method returns (NODE-STORE-1). Saving block `h` writes the block, the
//! state keys it changed and the height, and drops the records of heights
//! `≤ h`, all in one atomic batch (NODE-STORE-2), with its receipts.
//!
//! **NODE-STORE-6** On open ([`ChainStore::open`]) the ledger is loaded from
//! the `state` keyspace, the verified on-disk state: every entry must decode
//! canonically under a known key (STATE-4, `Ledger::from_entries`), and the
//! state root over all of them must equal the state root in the header of
//! the last stored block, which a commit certificate signed (checked before
//! the block was stored). The last block must decode and be indexed by its
//! hash. So opening costs O(state), not O(chain): at 100,000 blocks it is
//! the same as at 100 (runtime/BENCH.md). A changed, missing or extra state
//! byte changes the root and is refused as corrupt; an older block that rots
//! on disk is found when it is read (served to a peer or the API: `Corrupt`),
//! or by [`ChainStore::open_replaying`] (`blyan store verify`), which rebuilds
//! the ledger by replaying every stored block from genesis (signatures
//! trusted, every other rule and each block's state root checked) and
//! requires the rebuilt state to equal the `state` keyspace byte for byte.
//!
//! The store keeps the ledger after its last block: [`node::Store::save_block`]
//! receives only the committed block. The node service hands the store the
//! driver's result for that block first ([`ChainStore::stage_applied`]: the
//! outcome and the ledger after it, taken from the `Committed` output and the
//! node), so saving does not execute the block a second time; a block with no
//! matching staged result (several blocks committed by one catch-up step) is
//! re-applied (signatures trusted) to learn the state keys it changed.

use crate::Error;
use blyan_state_machine::block::{BlockOutcome, Receipt};
use blyan_state_machine::consensus::{Proposal, Record, Round, Signed, ValueId, Vote};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::node::{self, CommittedBlock, ConsensusSets, ProposedBlock, Sig};
use blyan_state_machine::state::StateKey;
use blyan_state_machine::types::{Hash32, Height};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::path::Path;

/// Version of the on-disk layout. A node refuses a data directory written
/// with another version rather than guess at it. Version 2: blocks are stored
/// with their commit certificates, and consensus records are kept. Version 3:
/// candidate blocks of the height in progress (NODE-STORE-5). Version 4: the
/// block-hash index. Version 3 is upgraded in place on open (the index is
/// built from the stored blocks in one synced batch); older ones are refused.
pub const SCHEMA_VERSION: u32 = 4;
/// The oldest layout [`ChainStore::open`] upgrades rather than refuses.
const UPGRADABLE_SCHEMA_VERSION: u32 = 3;

/// fjall's journal bound (its minimum): what an open may have to replay.
pub const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

const META_SCHEMA: &[u8] = b"schema_version";
const META_GENESIS: &[u8] = b"genesis_hash";
const META_HEIGHT: &[u8] = b"height";
/// NODE-STORE-6: the consensus sets after the stored height
/// ([`ConsensusSets`], with proposer priorities), written with each block.
/// A schema-4 directory written before it lacks the key: the first open
/// replays the chain once to derive it.
const META_SETS: &[u8] = b"consensus_sets";

/// The on-disk form of a consensus [`Record`] (which has no canonical
/// encoding of its own in the core): the same variants, encoded canonically.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
enum StoredRecord {
    Vote(Signed<Vote, Sig>),
    Proposal(Signed<Proposal, Sig>),
    Lock {
        height: Height,
        locked: Option<(ValueId, Round)>,
        valid: Option<(ValueId, Round)>,
    },
}

impl StoredRecord {
    fn from_record(r: &Record<Sig>) -> StoredRecord {
        match r {
            Record::Vote(v) => StoredRecord::Vote(v.clone()),
            Record::Proposal(p) => StoredRecord::Proposal(p.clone()),
            Record::Lock {
                height,
                locked,
                valid,
            } => StoredRecord::Lock {
                height: *height,
                locked: *locked,
                valid: *valid,
            },
        }
    }

    fn into_record(self) -> Record<Sig> {
        match self {
            StoredRecord::Vote(v) => Record::Vote(v),
            StoredRecord::Proposal(p) => Record::Proposal(p),
            StoredRecord::Lock {
                height,
                locked,
                valid,
            } => Record::Lock {
                height,
                locked,
                valid,
            },
        }
    }
}

/// The node's chain store. See the module docs for the layout.
pub struct ChainStore {
    db: Database,
    meta: Keyspace,
    blocks: Keyspace,
    state: Keyspace,
    records: Keyspace,
    candidates: Keyspace,
    txs: Keyspace,
    block_hashes: Keyspace,
    /// The state after the last stored block.
    ledger: Ledger,
    /// Sequence number of the next record (greater than every stored one).
    next_record_seq: u64,
    /// The driver's result for a block about to be saved: its hash, its
    /// outcome and the ledger after it ([`ChainStore::stage_applied`]).
    staged: Option<(Hash32, BlockOutcome, Ledger)>,
    /// `SyncAll` (NODE-STORE-1) except during a bulk load
    /// ([`ChainStore::set_bulk_load`]).
    block_durability: PersistMode,
    /// The consensus sets after the stored height (NODE-STORE-6).
    sets: ConsensusSets,
}

fn storage(e: fjall::Error) -> Error {
    Error::Storage(e.to_string())
}

fn state_key_bytes(k: &StateKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + k.key.len());
    out.push(k.ns);
    out.extend_from_slice(&k.key);
    out
}

fn record_key(height: Height, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&height.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn be_u64(bytes: &[u8], what: &str) -> Result<u64, Error> {
    Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| {
        Error::Corrupt(format!("{what} is not 8 bytes"))
    })?))
}

impl ChainStore {
    /// Opens (or creates) the store at `path` for `genesis`, returning it with
    /// the ledger at the stored height, loaded from the verified state
    /// (NODE-STORE-6).
    pub fn open(path: &Path, genesis: &Genesis) -> Result<(ChainStore, Ledger), Error> {
        ChainStore::open_with(path, genesis, false)
    }

    /// Like [`ChainStore::open`], but rebuilds the ledger by replaying every
    /// stored block from genesis and checks every block and index entry:
    /// O(chain). For audits (`blyan store verify`) and tests.
    pub fn open_replaying(path: &Path, genesis: &Genesis) -> Result<(ChainStore, Ledger), Error> {
        ChainStore::open_with(path, genesis, true)
    }

    fn open_with(
        path: &Path,
        genesis: &Genesis,
        replay: bool,
    ) -> Result<(ChainStore, Ledger), Error> {
        // NODE-STORE-6: fjall replays its journal on open; a 64 MiB bound
        // (default 512 MiB) keeps that part of a restart short too.
        let db = Database::builder(path)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            .open()
            .map_err(storage)?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(storage)
        };
        let genesis_ledger =
            Ledger::from_genesis(genesis).map_err(|e| Error::Genesis(e.to_string()))?;
        let genesis_sets =
            ConsensusSets::genesis(&genesis_ledger).map_err(|e| Error::Genesis(e.to_string()))?;
        let mut store = ChainStore {
            meta: ks("meta")?,
            blocks: ks("blocks")?,
            state: ks("state")?,
            records: ks("records")?,
            candidates: ks("candidates")?,
            txs: ks("txs")?,
            block_hashes: ks("block_hashes")?,
            db,
            ledger: genesis_ledger.clone(),
            next_record_seq: 0,
            staged: None,
            block_durability: PersistMode::SyncAll,
            sets: genesis_sets,
        };
        match store.meta.get(META_SCHEMA).map_err(storage)? {
            None => store.initialise(&genesis_ledger)?,
            Some(v) => {
                let found = u32::from_be_bytes(
                    v.as_ref()
                        .try_into()
                        .map_err(|_| Error::Corrupt("schema version".into()))?,
                );
                if found != SCHEMA_VERSION && found != UPGRADABLE_SCHEMA_VERSION {
                    return Err(Error::UnsupportedSchema {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                let stored = store.meta.get(META_GENESIS).map_err(storage)?;
                if stored.as_deref() != Some(&genesis.hash()[..]) {
                    return Err(Error::GenesisMismatch);
                }
                if found == UPGRADABLE_SCHEMA_VERSION {
                    store.upgrade_from_3()?;
                }
            }
        }
        let stored_sets = match store.meta.get(META_SETS).map_err(storage)? {
            Some(v) => Some(
                ConsensusSets::decode(&v)
                    .map_err(|e| Error::Corrupt(format!("stored consensus sets: {e}")))?,
            ),
            None => None,
        };
        let (ledger, sets) = match stored_sets {
            Some(sets) if !replay => (store.load_state(genesis, genesis_ledger)?, sets),
            stored => {
                let (ledger, sets) = store.replay(genesis_ledger)?;
                match stored {
                    Some(s) if s != sets => {
                        return Err(Error::Corrupt(
                            "stored consensus sets differ from the replayed ones".into(),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        // Written by a version without META_SETS: derived
                        // once, by this replay.
                        let mut batch = store.db.batch().durability(Some(PersistMode::SyncAll));
                        batch.insert(&store.meta, META_SETS, sets.encode());
                        batch.commit().map_err(storage)?;
                    }
                }
                (ledger, sets)
            }
        };
        store.ledger = ledger;
        store.sets = sets;
        store.next_record_seq = store.scan_record_seq()?;
        let ledger = store.ledger.clone();
        Ok((store, ledger))
    }

    /// Schema 3 → 4: index every stored block by hash, and record the new
    /// version, in one synced batch (a crash before it leaves schema 3).
    fn upgrade_from_3(&self) -> Result<(), Error> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for h in 1..=self.height()? {
            let b = self
                .committed_block(h)?
                .ok_or_else(|| Error::Corrupt(format!("block {h} missing")))?;
            batch.insert(
                &self.block_hashes,
                b.block.hash().to_vec(),
                h.to_be_bytes().to_vec(),
            );
        }
        batch.insert(
            &self.meta,
            META_SCHEMA,
            SCHEMA_VERSION.to_be_bytes().to_vec(),
        );
        batch.commit().map_err(storage)
    }

    fn initialise(&self, ledger: &Ledger) -> Result<(), Error> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(
            &self.meta,
            META_SCHEMA,
            SCHEMA_VERSION.to_be_bytes().to_vec(),
        );
        batch.insert(&self.meta, META_GENESIS, ledger.genesis_hash().to_vec());
        batch.insert(&self.meta, META_HEIGHT, 0u64.to_be_bytes().to_vec());
        batch.insert(&self.meta, META_SETS, self.sets.encode());
        for (k, v) in ledger.entries() {
            batch.insert(&self.state, state_key_bytes(&k), v);
        }
        batch.commit().map_err(storage)
    }

    /// One past the largest stored record sequence number; also checks that
    /// every record key is well formed.
    fn scan_record_seq(&self) -> Result<u64, Error> {
        let mut next = 0u64;
        for kv in self.records.iter() {
            let key = kv.key().map_err(storage)?;
            if key.len() != 16 {
                return Err(Error::Corrupt("record key is not 16 bytes".into()));
            }
            let seq = be_u64(&key[8..], "record sequence number")?;
            next = next.max(seq + 1);
        }
        Ok(next)
    }

    /// The stored height.
    pub fn height(&self) -> Result<u64, Error> {
        let v = self
            .meta
            .get(META_HEIGHT)
            .map_err(storage)?
            .ok_or_else(|| Error::Corrupt("missing height".into()))?;
        be_u64(&v, "height")
    }

    /// The state after the last stored block.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The committed block at `height`, if stored.
    pub fn committed_block(&self, height: u64) -> Result<Option<CommittedBlock>, Error> {
        self.reader().block(height)
    }

    /// A read-only view for the HTTP API (fjall handles are shared and
    /// thread-safe; the node task stays the only writer).
    pub fn reader(&self) -> StoreReader {
        StoreReader {
            blocks: self.blocks.clone(),
            txs: self.txs.clone(),
            block_hashes: self.block_hashes.clone(),
        }
    }

    /// NODE-STORE-6: the ledger from the `state` keyspace, checked against
    /// the last block's certified state root.
    fn load_state(&self, genesis: &Genesis, genesis_ledger: Ledger) -> Result<Ledger, Error> {
        let height = self.height()?;
        if height == 0 {
            // Nothing certified yet: the genesis state, compared in full.
            return Ok(self.replay(genesis_ledger)?.0);
        }
        let last = self
            .committed_block(height)?
            .ok_or_else(|| Error::Corrupt(format!("block {height} missing")))?;
        let hash = last.block.hash();
        let indexed = self.block_hashes.get(hash).map_err(storage)?;
        if indexed.as_deref() != Some(&height.to_be_bytes()[..]) {
            return Err(Error::Corrupt(format!(
                "block {height} is not indexed by its hash"
            )));
        }
        let mut entries = Vec::new();
        for kv in self.state.iter() {
            let (k, v) = kv.into_inner().map_err(storage)?;
            let Some((&ns, key)) = k.split_first() else {
                return Err(Error::Corrupt("stored state has an empty key".into()));
            };
            entries.push((StateKey::new(ns, key.to_vec()), v.to_vec()));
        }
        let ledger = Ledger::from_entries(genesis, entries, hash)
            .map_err(|e| Error::Corrupt(format!("stored state: {e}")))?;
        if ledger.height() != height {
            return Err(Error::Corrupt(format!(
                "stored state is of height {}, the last stored block of {height}",
                ledger.height()
            )));
        }
        if ledger.state_root() != last.block.header.state_root {
            return Err(Error::Corrupt(format!(
                "stored state (root {}) differs from the state root certified by block {height} ({})",
                hex::encode(ledger.state_root()),
                hex::encode(last.block.header.state_root)
            )));
        }
        Ok(ledger)
    }

    /// The consensus sets after the stored height (NODE-STORE-6).
    pub fn consensus_sets(&self) -> &ConsensusSets {
        &self.sets
    }

    fn replay(&self, mut ledger: Ledger) -> Result<(Ledger, ConsensusSets), Error> {
        let height = self.height()?;
        let mut sets = self.sets.clone();
        assert_eq!(ledger.height(), 0, "replay starts at genesis");
        for h in 1..=height {
            let committed = self
                .committed_block(h)?
                .ok_or_else(|| Error::Corrupt(format!("block {h} missing")))?;
            let indexed = self
                .block_hashes
                .get(committed.block.hash())
                .map_err(storage)?;
            if indexed.as_deref() != Some(&h.to_be_bytes()[..]) {
                return Err(Error::Corrupt(format!(
                    "block {h} is not indexed by its hash"
                )));
            }
            let (next, outcome) = ledger
                .apply_block_trusted_signatures(&committed.block)
                .map_err(|e| Error::Corrupt(format!("stored block {h} does not apply: {e}")))?;
            sets = sets
                .advance(&next, &outcome)
                .map_err(|e| Error::Corrupt(format!("block {h}'s validator set: {e}")))?;
            ledger = next;
        }
        // The stored state must be exactly the replayed state.
        let mut stored = Vec::new();
        for kv in self.state.iter() {
            let (k, v) = kv.into_inner().map_err(storage)?;
            stored.push((k.to_vec(), v.to_vec()));
        }
        let expected: Vec<(Vec<u8>, Vec<u8>)> = ledger
            .entries()
            .into_iter()
            .map(|(k, v)| (state_key_bytes(&k), v))
            .collect();
        if stored != expected {
            return Err(Error::Corrupt(format!(
                "stored state ({} entries) differs from the replayed state at height {height} ({} entries)",
                stored.len(),
                expected.len()
            )));
        }
        Ok((ledger, sets))
    }

    /// Bulk loading (generated chains for measurements, imports): while on,
    /// [`ChainStore::commit_block`] batches are atomic but not synced one by
    /// one; turning it off syncs everything written. Never on in a running
    /// node (NODE-STORE-1).
    pub fn set_bulk_load(&mut self, on: bool) -> Result<(), Error> {
        if on {
            self.block_durability = PersistMode::Buffer;
            Ok(())
        } else {
            self.block_durability = PersistMode::SyncAll;
            self.db.persist(PersistMode::SyncAll).map_err(storage)
        }
    }

    /// Hands over the driver's result for the block with hash `block_hash`
    /// (its outcome, and `ledger`, the state after it), so the next
    /// [`node::Store::save_block`] of that block need not execute it again.
    /// Applying a block is deterministic and the hash names the block, so the
    /// result is the one re-applying would give; `save_block` still checks
    /// that it follows the stored state, and `commit_block` that the state
    /// root matches the header.
    pub fn stage_applied(&mut self, block_hash: Hash32, outcome: BlockOutcome, ledger: Ledger) {
        self.staged = Some((block_hash, outcome, ledger));
    }

    /// Stores `committed` (already applied to the stored state, giving
    /// `ledger` and `outcome`), the state keys it changed and the new height,
    /// and drops the consensus records of its height and below: one atomic
    /// batch, synced before returning (NODE-STORE-1/2).
    /// SYNC-6: makes a fresh store (height 0) hold the state restored from a
    /// snapshot: `ledger` after `last`, with `sets`, in one synced batch.
    /// The blocks below `last` are not held (a node that state-synced
    /// serves blocks from `last` on). Refused on a store that holds blocks.
    pub fn import_snapshot(
        &mut self,
        ledger: &Ledger,
        last: &CommittedBlock,
        sets: &ConsensusSets,
    ) -> Result<(), Error> {
        let height = last.block.header.height;
        if self.height()? != 0 {
            return Err(Error::Storage(format!(
                "a snapshot goes into an empty store; this one holds {} blocks",
                self.height()?
            )));
        }
        assert_eq!(ledger.height(), height, "import the state after `last`");
        assert_eq!(ledger.state_root(), last.block.header.state_root);
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for kv in self.state.iter() {
            batch.remove(&self.state, kv.key().map_err(storage)?);
        }
        for (k, v) in ledger.entries() {
            batch.insert(&self.state, state_key_bytes(&k), v);
        }
        batch.insert(&self.blocks, height.to_be_bytes().to_vec(), last.encode());
        batch.insert(
            &self.block_hashes,
            last.block.hash().to_vec(),
            height.to_be_bytes().to_vec(),
        );
        batch.insert(&self.meta, META_SETS, sets.encode());
        batch.insert(&self.meta, META_HEIGHT, height.to_be_bytes().to_vec());
        batch.commit().map_err(storage)?;
        self.ledger = ledger.clone();
        self.sets = sets.clone();
        Ok(())
    }

    pub fn commit_block(
        &mut self,
        committed: &CommittedBlock,
        outcome: &BlockOutcome,
        ledger: &Ledger,
    ) -> Result<(), Error> {
        let block = &committed.block;
        let height = block.header.height;
        assert_eq!(
            height,
            ledger.height(),
            "commit the block that produced this ledger"
        );
        assert_eq!(
            block.header.state_root,
            ledger.state_root(),
            "commit the block that produced this ledger"
        );
        let last = self.height()?;
        if height != last + 1 {
            return Err(Error::Storage(format!(
                "block {height} does not follow the stored height {last}"
            )));
        }
        let sets = self
            .sets
            .advance(ledger, outcome)
            .map_err(|e| Error::Storage(format!("block {height}'s validator set: {e}")))?;
        let mut batch = self.db.batch().durability(Some(self.block_durability));
        batch.insert(&self.meta, META_SETS, sets.encode());
        batch.insert(
            &self.blocks,
            height.to_be_bytes().to_vec(),
            committed.encode(),
        );
        for k in &outcome.changed_keys {
            match ledger.value_bytes(k) {
                Some(v) => batch.insert(&self.state, state_key_bytes(k), v),
                None => batch.remove(&self.state, state_key_bytes(k)),
            }
        }
        batch.insert(&self.meta, META_HEIGHT, height.to_be_bytes().to_vec());
        batch.insert(
            &self.block_hashes,
            block.hash().to_vec(),
            height.to_be_bytes().to_vec(),
        );
        for (index, r) in outcome.receipts.iter().enumerate() {
            let mut v = Vec::new();
            v.extend_from_slice(&height.to_be_bytes());
            v.extend_from_slice(&(index as u32).to_be_bytes());
            v.extend_from_slice(&r.encode());
            batch.insert(&self.txs, r.tx_id.to_vec(), v);
        }
        for kv in self.records.range(..record_key(height + 1, 0)) {
            batch.remove(&self.records, kv.key().map_err(storage)?);
        }
        for kv in self.candidates.range(..(height + 1).to_be_bytes().to_vec()) {
            batch.remove(&self.candidates, kv.key().map_err(storage)?);
        }
        batch.commit().map_err(storage)?;
        self.ledger = ledger.clone();
        self.sets = sets;
        Ok(())
    }
}

impl node::Store for ChainStore {
    type Error = Error;

    fn persist_record(&mut self, record: &Record<Sig>) -> Result<(), Error> {
        let key = record_key(record.height(), self.next_record_seq);
        let value = StoredRecord::from_record(record).encode();
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(&self.records, key, value);
        batch.commit().map_err(storage)?;
        self.next_record_seq += 1;
        Ok(())
    }

    /// NODE-STORE-5: keyed by height ‖ block hash (one entry per block).
    fn persist_candidate(&mut self, candidate: &ProposedBlock) -> Result<(), Error> {
        let mut key = candidate.block.header.height.to_be_bytes().to_vec();
        key.extend_from_slice(&candidate.block.hash());
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(&self.candidates, key, candidate.encode());
        batch.commit().map_err(storage)
    }

    fn candidates(&self, height: Height) -> Result<Vec<ProposedBlock>, Error> {
        let mut out = Vec::new();
        for kv in self.candidates.prefix(height.to_be_bytes()) {
            let (k, v) = kv.into_inner().map_err(storage)?;
            let c = ProposedBlock::decode(&v)
                .map_err(|e| Error::Corrupt(format!("candidate {}: {e}", hex::encode(&k))))?;
            if c.block.header.height != height {
                return Err(Error::Corrupt(format!(
                    "candidate {} is filed under height {height}",
                    hex::encode(&k)
                )));
            }
            out.push(c);
        }
        Ok(out)
    }

    fn records(&self, height: Height) -> Result<Vec<Record<Sig>>, Error> {
        let mut out = Vec::new();
        for kv in self.records.prefix(height.to_be_bytes()) {
            let (k, v) = kv.into_inner().map_err(storage)?;
            let record = StoredRecord::decode(&v)
                .map_err(|e| Error::Corrupt(format!("record {}: {e}", hex::encode(&k))))?
                .into_record();
            if record.height() != height {
                return Err(Error::Corrupt(format!(
                    "record {} is filed under height {height} but is of height {}",
                    hex::encode(&k),
                    record.height()
                )));
            }
            out.push(record);
        }
        Ok(out)
    }

    /// Uses the staged result if it is this block's and follows the stored
    /// state; otherwise re-applies the block to the stored state (signatures
    /// were verified before the driver committed it) to find the keys it
    /// changed. Then [`ChainStore::commit_block`].
    fn save_block(&mut self, committed: &CommittedBlock) -> Result<(), Error> {
        let block = &committed.block;
        if let Some((hash, outcome, next)) = self.staged.take()
            && hash == block.hash()
            && next.last_block_hash() == hash
            && next.height() == self.ledger.height() + 1
            && block.header.prev_hash == self.ledger.last_block_hash()
        {
            return self.commit_block(committed, &outcome, &next);
        }
        let (next, outcome) = self
            .ledger
            .apply_block_trusted_signatures(&committed.block)
            .map_err(|e| {
                Error::Storage(format!(
                    "committed block {} does not apply to the stored state: {e}",
                    committed.block.header.height
                ))
            })?;
        self.commit_block(committed, &outcome, &next)
    }

    fn block(&self, height: Height) -> Result<Option<CommittedBlock>, Error> {
        self.committed_block(height)
    }

    fn last_height(&self) -> Result<Height, Error> {
        self.height()
    }
}

/// Read-only access to committed blocks and receipts, for the API.
#[derive(Clone)]
pub struct StoreReader {
    blocks: Keyspace,
    txs: Keyspace,
    block_hashes: Keyspace,
}

/// Where a committed transaction landed, and its receipt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxLocation {
    pub height: Height,
    pub index: u32,
    pub receipt: Receipt,
}

impl StoreReader {
    pub fn block(&self, height: Height) -> Result<Option<CommittedBlock>, Error> {
        match self.blocks.get(height.to_be_bytes()).map_err(storage)? {
            None => Ok(None),
            Some(bytes) => CommittedBlock::decode(&bytes)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("block {height}: {e}"))),
        }
    }

    /// The height of the committed block with hash `hash`.
    pub fn height_of(&self, hash: &Hash32) -> Result<Option<Height>, Error> {
        match self.block_hashes.get(hash).map_err(storage)? {
            None => Ok(None),
            Some(v) => be_u64(&v, "indexed height").map(Some),
        }
    }

    pub fn tx(&self, id: &Hash32) -> Result<Option<TxLocation>, Error> {
        let Some(v) = self.txs.get(id).map_err(storage)? else {
            return Ok(None);
        };
        if v.len() < 12 {
            return Err(Error::Corrupt(format!(
                "tx index entry {}",
                hex::encode(id)
            )));
        }
        let receipt = Receipt::decode(&v[12..])
            .map_err(|e| Error::Corrupt(format!("receipt {}: {e}", hex::encode(id))))?;
        Ok(Some(TxLocation {
            height: be_u64(&v[..8], "tx height")?,
            index: u32::from_be_bytes(v[8..12].try_into().expect("4 bytes")),
            receipt,
        }))
    }
}
