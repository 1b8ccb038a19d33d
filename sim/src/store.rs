//! SIM-STORE-1: the simulator's store: [`MemStore`] (which outlives a node's
//! crash, as a disk would) with injected write errors.
//!
//! The store contract (NODE-STORE-1) is that a write returns only once
//! durable, so a crash loses nothing that was acknowledged and there are no
//! "unsynced writes" to lose. What a real disk can still do is fail a write:
//! before it happened, or after it was made durable but before the
//! acknowledgement. Both are injected here; either way the host halts the node
//! (it may not send what it could not persist) and the nemesis restarts it.

use blyan_state_machine::consensus::Record;
use blyan_state_machine::node::{CommittedBlock, MemStore, ProposedBlock, Sig, Store};
use blyan_state_machine::types::Height;
use madsim::rand::{Rng, thread_rng};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("injected write error (nothing written)")]
    BeforeWrite,
    #[error("injected write error (written, not acknowledged)")]
    AfterWrite,
}

#[derive(Clone, Debug, Default)]
pub struct SimStore {
    pub inner: MemStore,
    pub error_ppm: u32,
}

impl SimStore {
    fn fault(&self) -> Option<StoreError> {
        if self.error_ppm == 0 || thread_rng().gen_range(0..1_000_000) >= self.error_ppm {
            return None;
        }
        Some(if thread_rng().gen_bool(0.5) {
            StoreError::BeforeWrite
        } else {
            StoreError::AfterWrite
        })
    }
}

fn infallible<T>(r: Result<T, blyan_state_machine::node::store::Never>) -> T {
    match r {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

impl Store for SimStore {
    type Error = StoreError;

    fn persist_record(&mut self, record: &Record<Sig>) -> Result<(), StoreError> {
        match self.fault() {
            Some(StoreError::BeforeWrite) => Err(StoreError::BeforeWrite),
            Some(StoreError::AfterWrite) => {
                infallible(self.inner.persist_record(record));
                Err(StoreError::AfterWrite)
            }
            None => {
                infallible(self.inner.persist_record(record));
                Ok(())
            }
        }
    }
    fn records(&self, height: Height) -> Result<Vec<Record<Sig>>, StoreError> {
        Ok(infallible(self.inner.records(height)))
    }
    fn persist_candidate(&mut self, candidate: &ProposedBlock) -> Result<(), StoreError> {
        match self.fault() {
            Some(StoreError::BeforeWrite) => Err(StoreError::BeforeWrite),
            Some(StoreError::AfterWrite) => {
                infallible(self.inner.persist_candidate(candidate));
                Err(StoreError::AfterWrite)
            }
            None => {
                infallible(self.inner.persist_candidate(candidate));
                Ok(())
            }
        }
    }
    fn candidates(&self, height: Height) -> Result<Vec<ProposedBlock>, StoreError> {
        Ok(infallible(self.inner.candidates(height)))
    }
    fn save_block(&mut self, block: &CommittedBlock) -> Result<(), StoreError> {
        match self.fault() {
            Some(StoreError::BeforeWrite) => Err(StoreError::BeforeWrite),
            Some(StoreError::AfterWrite) => {
                infallible(self.inner.save_block(block));
                Err(StoreError::AfterWrite)
            }
            None => {
                infallible(self.inner.save_block(block));
                Ok(())
            }
        }
    }
    fn block(&self, height: Height) -> Result<Option<CommittedBlock>, StoreError> {
        Ok(infallible(self.inner.block(height)))
    }
    fn last_height(&self) -> Result<Height, StoreError> {
        Ok(infallible(self.inner.last_height()))
    }
}
