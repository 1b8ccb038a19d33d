//! What a node keeps across restarts (NODE-STORE-*): the consensus records of
//! the height in progress (CONS-CRASH-1) and the committed chain.
//!
//! The trait is pure so that the simulator can keep everything in memory
//! ([`MemStore`]) and the runtime on disk (fjall), behind one host loop.

use super::{CommittedBlock, ProposedBlock, Sig};
use crate::consensus::Record;
use crate::types::Height;
use std::collections::BTreeMap;

/// NODE-STORE-1: every method that writes returns only once the write is
/// durable (it would survive a crash of the process or the machine).
pub trait Store {
    type Error: std::error::Error + Send + Sync + 'static;

    /// CONS-CRASH-1: append a record of the height in progress.
    fn persist_record(&mut self, record: &Record<Sig>) -> Result<(), Self::Error>;
    /// The records persisted for `height`, in the order they were written.
    fn records(&self, height: Height) -> Result<Vec<Record<Sig>>, Self::Error>;
    /// NODE-STORE-5: keep a block proposed or locked on at the height in progress.
    fn persist_candidate(&mut self, candidate: &ProposedBlock) -> Result<(), Self::Error>;
    /// The candidates persisted for `height`, in the order they were written.
    fn candidates(&self, height: Height) -> Result<Vec<ProposedBlock>, Self::Error>;
    /// NODE-STORE-2: store the next committed block (height = last + 1) and
    /// drop the consensus records and candidates of its height and below, in
    /// one atomic write.
    fn save_block(&mut self, block: &CommittedBlock) -> Result<(), Self::Error>;
    fn block(&self, height: Height) -> Result<Option<CommittedBlock>, Self::Error>;
    /// The height of the last stored block (0 when none).
    fn last_height(&self) -> Result<Height, Self::Error>;
}

/// The error of a store that cannot fail.
#[derive(Debug, thiserror::Error)]
pub enum Never {}

/// NODE-STORE-3: an in-memory store (simulations and tests). Cloning it is
/// how a simulated crash keeps exactly what was persisted.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    records: BTreeMap<Height, Vec<Record<Sig>>>,
    candidates: BTreeMap<Height, Vec<ProposedBlock>>,
    blocks: BTreeMap<Height, CommittedBlock>,
}

impl Store for MemStore {
    type Error = Never;

    fn persist_record(&mut self, record: &Record<Sig>) -> Result<(), Never> {
        self.records
            .entry(record.height())
            .or_default()
            .push(record.clone());
        Ok(())
    }
    fn records(&self, height: Height) -> Result<Vec<Record<Sig>>, Never> {
        Ok(self.records.get(&height).cloned().unwrap_or_default())
    }
    fn persist_candidate(&mut self, candidate: &ProposedBlock) -> Result<(), Never> {
        self.candidates
            .entry(candidate.block.header.height)
            .or_default()
            .push(candidate.clone());
        Ok(())
    }
    fn candidates(&self, height: Height) -> Result<Vec<ProposedBlock>, Never> {
        Ok(self.candidates.get(&height).cloned().unwrap_or_default())
    }
    fn save_block(&mut self, block: &CommittedBlock) -> Result<(), Never> {
        let height = block.block.header.height;
        let last = self.blocks.last_key_value().map_or(0, |(h, _)| *h);
        assert_eq!(height, last + 1, "blocks are stored in order");
        self.blocks.insert(height, block.clone());
        self.records = self.records.split_off(&(height + 1));
        self.candidates = self.candidates.split_off(&(height + 1));
        Ok(())
    }
    fn block(&self, height: Height) -> Result<Option<CommittedBlock>, Never> {
        Ok(self.blocks.get(&height).cloned())
    }
    fn last_height(&self) -> Result<Height, Never> {
        Ok(self.blocks.last_key_value().map_or(0, |(h, _)| *h))
    }
}
