//! Durable chain storage on fjall.
//!
//! Keyspaces: `meta` (schema version, genesis hash, height), `blocks` (height
//! as big-endian u64 → canonical block bytes) and `state` (`ns ‖ key` →
//! canonical value bytes, exactly the committed state of STATE-1). A block and
//! the state keys it changed are written in one atomic batch, synced to disk
//! before [`ChainStore::commit_block`] returns.
//!
//! On open, the ledger is rebuilt by replaying the stored blocks from genesis
//! (their signatures were verified before they were stored, so replay trusts
//! them; every other rule, and each block's state root, is checked again), and
//! the rebuilt state must equal the stored `state` keyspace byte for byte.

use crate::Error;
use blyan_state_machine::block::{Block, BlockOutcome};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::state::StateKey;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::path::Path;

/// Version of the on-disk layout. A node refuses a data directory written
/// with another version rather than guess at it.
pub const SCHEMA_VERSION: u32 = 1;

const META_SCHEMA: &[u8] = b"schema_version";
const META_GENESIS: &[u8] = b"genesis_hash";
const META_HEIGHT: &[u8] = b"height";

/// The node's chain store.
pub struct ChainStore {
    db: Database,
    meta: Keyspace,
    blocks: Keyspace,
    state: Keyspace,
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

impl ChainStore {
    /// Opens (or creates) the store at `path` for `genesis`, returning it with
    /// the ledger at the stored height.
    pub fn open(path: &Path, genesis: &Genesis) -> Result<(ChainStore, Ledger), Error> {
        let db = Database::builder(path).open().map_err(storage)?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(storage)
        };
        let store = ChainStore {
            meta: ks("meta")?,
            blocks: ks("blocks")?,
            state: ks("state")?,
            db,
        };
        let genesis_ledger =
            Ledger::from_genesis(genesis).map_err(|e| Error::Genesis(e.to_string()))?;
        match store.meta.get(META_SCHEMA).map_err(storage)? {
            None => store.initialise(&genesis_ledger)?,
            Some(v) => {
                let found = u32::from_be_bytes(
                    v.as_ref()
                        .try_into()
                        .map_err(|_| Error::Corrupt("schema version".into()))?,
                );
                if found != SCHEMA_VERSION {
                    return Err(Error::UnsupportedSchema {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                let stored = store.meta.get(META_GENESIS).map_err(storage)?;
                if stored.as_deref() != Some(&genesis.hash()[..]) {
                    return Err(Error::GenesisMismatch);
                }
            }
        }
        let ledger = store.replay(genesis_ledger)?;
        Ok((store, ledger))
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
        for (k, v) in ledger.entries() {
            batch.insert(&self.state, state_key_bytes(&k), v);
        }
        batch.commit().map_err(storage)
    }

    /// The stored height.
    pub fn height(&self) -> Result<u64, Error> {
        let v = self
            .meta
            .get(META_HEIGHT)
            .map_err(storage)?
            .ok_or_else(|| Error::Corrupt("missing height".into()))?;
        Ok(u64::from_be_bytes(
            v.as_ref()
                .try_into()
                .map_err(|_| Error::Corrupt("height".into()))?,
        ))
    }

    /// The block at `height`, if stored.
    pub fn block(&self, height: u64) -> Result<Option<Block>, Error> {
        match self.blocks.get(height.to_be_bytes()).map_err(storage)? {
            None => Ok(None),
            Some(bytes) => Block::decode(&bytes)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("block {height}: {e}"))),
        }
    }

    fn replay(&self, mut ledger: Ledger) -> Result<Ledger, Error> {
        let height = self.height()?;
        for h in 1..=height {
            let block = self
                .block(h)?
                .ok_or_else(|| Error::Corrupt(format!("block {h} missing")))?;
            ledger = ledger
                .apply_block_trusted_signatures(&block)
                .map_err(|e| Error::Corrupt(format!("stored block {h} does not apply: {e}")))?
                .0;
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
        Ok(ledger)
    }

    /// Stores `block` (already applied, giving `ledger` and `outcome`) and the
    /// state keys it changed, atomically, synced before returning.
    pub fn commit_block(
        &self,
        block: &Block,
        outcome: &BlockOutcome,
        ledger: &Ledger,
    ) -> Result<(), Error> {
        assert_eq!(
            block.header.height,
            ledger.height(),
            "commit the block that produced this ledger"
        );
        assert_eq!(
            block.header.state_root,
            ledger.state_root(),
            "commit the block that produced this ledger"
        );
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(
            &self.blocks,
            block.header.height.to_be_bytes().to_vec(),
            block.encode(),
        );
        for k in &outcome.changed_keys {
            match ledger.value_bytes(k) {
                Some(v) => batch.insert(&self.state, state_key_bytes(k), v),
                None => batch.remove(&self.state, state_key_bytes(k)),
            }
        }
        batch.insert(
            &self.meta,
            META_HEIGHT,
            block.header.height.to_be_bytes().to_vec(),
        );
        batch.commit().map_err(storage)
    }
}
