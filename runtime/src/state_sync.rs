//! State sync in the runtime (spec/node.md SYNC-*; the format and checks are
//! `blyan_state_machine::node::snapshot`).
//!
//! - **Serving.** At every multiple of `snapshot_interval_blocks` the node
//!   service takes a snapshot of its committed state ([`Snapshots::take`], on a blocking
//!   thread, O(state)) and serves the latest one on the P2P methods
//!   `SnapshotManifest` and `SnapshotChunk` ([`SnapshotSource`]).
//! - **Restoring.** A node whose store is empty and whose configuration names
//!   a trusted block (`[state_sync] trust_height`, `trust_hash`, as
//!   CometBFT's trust options) asks its seeds for their latest manifest
//!   until one is of that block, fetches every chunk (each checked on
//!   arrival; a refused chunk is asked of the next seed), rebuilds the state
//!   and imports it into its store before the node starts
//!   ([`restore`]); the node then resumes from it (NODE-STORE-6) and
//!   catches up on later blocks as usual.

use crate::error::Error;
use crate::transport::{GrpcTransport, Peer, SnapshotSource};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::node::snapshot::{Chunk, Manifest, Restorer, take};
use blyan_state_machine::node::{CommittedBlock, ConsensusSets};
use blyan_state_machine::types::Hash32;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default: a snapshot every 1,000 blocks (about 33 minutes of 2 s blocks).
pub const DEFAULT_SNAPSHOT_INTERVAL_BLOCKS: u64 = 1_000;
/// How long a restoring node keeps asking its seeds for the trusted snapshot.
pub const RESTORE_TIMEOUT_S: u64 = 120;

/// `[state_sync]` in the configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSyncConfig {
    /// Take a snapshot at every multiple of this height and serve the
    /// latest to peers (0: never).
    pub snapshot_interval_blocks: u64,
    /// Start an empty store from a peer's snapshot of the block at this
    /// height whose hash is `trust_hash` (both or neither; from a source
    /// the operator trusts: a node's `GET /block/{height}` or `GET /snapshot`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_height: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_hash: Option<String>,
}

impl Default for StateSyncConfig {
    fn default() -> Self {
        StateSyncConfig {
            snapshot_interval_blocks: DEFAULT_SNAPSHOT_INTERVAL_BLOCKS,
            trust_height: None,
            trust_hash: None,
        }
    }
}

impl StateSyncConfig {
    /// The trusted block, if one is configured; an error for half a pair or
    /// a malformed hash.
    pub fn trust(&self) -> Result<Option<(u64, Hash32)>, Error> {
        match (&self.trust_height, &self.trust_hash) {
            (None, None) => Ok(None),
            (Some(h), Some(hash)) => {
                let bytes = hex::decode(hash.trim_start_matches("0x"))
                    .ok()
                    .and_then(|b| <Hash32>::try_from(b).ok())
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "state_sync.trust_hash {hash:?} is not 0x and 64 hex digits"
                        ))
                    })?;
                if *h == 0 {
                    return Err(Error::Config(
                        "state_sync.trust_height must be at least 1".into(),
                    ));
                }
                Ok(Some((*h, bytes)))
            }
            _ => Err(Error::Config(
                "state_sync needs both trust_height and trust_hash, or neither".into(),
            )),
        }
    }
}

/// One snapshot as served: the manifest and chunks, encoded once.
#[derive(Clone, Debug)]
pub struct Held {
    pub height: u64,
    pub block_hash: Hash32,
    pub manifest: Bytes,
    pub chunks: Vec<Bytes>,
    pub entries: u64,
}

/// The latest snapshot this node serves (shared with the transport).
#[derive(Default)]
pub struct Snapshots {
    latest: Mutex<Option<Arc<Held>>>,
    /// A snapshot is being built: at most one at a time (the next multiple
    /// is skipped rather than a second O(state) build started).
    building: std::sync::atomic::AtomicBool,
}

impl Snapshots {
    pub fn new() -> Arc<Snapshots> {
        Arc::new(Snapshots::default())
    }

    pub fn latest(&self) -> Option<Arc<Held>> {
        self.latest.lock().expect("snapshots lock").clone()
    }

    /// Claims the right to build the next snapshot; `false` while one is
    /// being built. [`Snapshots::take`] releases it.
    pub fn try_start(&self) -> bool {
        !self
            .building
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// SYNC-1..3: takes and encodes the snapshot of `ledger` (the state
    /// after `last`, with `sets`) and serves it from now on. O(state): call
    /// it off the node's thread, after [`Snapshots::try_start`].
    pub fn take(&self, ledger: &Ledger, last: &CommittedBlock, sets: &ConsensusSets) {
        struct Release<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        let _release = Release(&self.building);
        let started = Instant::now();
        let (manifest, chunks) = take(ledger, last, sets);
        let held = Held {
            height: manifest.height(),
            block_hash: manifest.block_hash(),
            entries: manifest.entries(),
            manifest: Bytes::from(manifest.encode()),
            chunks: chunks.iter().map(|c| Bytes::from(c.encode())).collect(),
        };
        tracing::info!(
            height = held.height,
            chunks = held.chunks.len(),
            entries = held.entries,
            ms = started.elapsed().as_millis() as u64,
            "state snapshot taken"
        );
        *self.latest.lock().expect("snapshots lock") = Some(Arc::new(held));
    }
}

impl SnapshotSource for Snapshots {
    fn manifest(&self) -> Option<Bytes> {
        self.latest().map(|h| h.manifest.clone())
    }
    fn chunk(&self, height: u64, index: u32) -> Option<Bytes> {
        self.latest()
            .filter(|h| h.height == height)
            .and_then(|h| h.chunks.get(index as usize).cloned())
    }
}

/// SYNC-4..6 over the network: the state after the trusted block, from the
/// first seed that offers its snapshot. Chunks a seed cannot give, or gives
/// forged, are asked of the other seeds that hold the same snapshot.
pub async fn restore(
    transport: &GrpcTransport,
    seeds: &[Peer],
    genesis: &Genesis,
    trusted: (u64, Hash32),
) -> Result<(Ledger, CommittedBlock, ConsensusSets), Error> {
    let (trust_height, trust_hash) = trusted;
    let deadline = Instant::now() + Duration::from_secs(RESTORE_TIMEOUT_S);
    let peers: Vec<_> = seeds.iter().filter_map(Peer::id).collect();
    if peers.is_empty() {
        return Err(Error::Config(
            "state sync needs seeds ([[peers]]) to fetch a snapshot from".into(),
        ));
    }
    loop {
        let mut last_error = String::from("no seed answered");
        // Which seeds offer the trusted snapshot, and the first manifest.
        let mut holders = Vec::new();
        let mut restorer = None;
        let mut refused_at_height = None;
        for peer in &peers {
            let offered = match transport.client(*peer).await {
                Ok(c) => c.snapshot_manifest().await,
                Err(e) => Err(e),
            };
            match offered {
                Ok(Some(bytes)) => {
                    let manifest = match Manifest::decode(&bytes) {
                        Ok(m) => m,
                        Err(e) => {
                            last_error = format!("{peer}: undecodable manifest: {e}");
                            continue;
                        }
                    };
                    if manifest.height() != trust_height {
                        last_error = format!(
                            "{peer} offers a snapshot at height {}, not the trusted {trust_height}",
                            manifest.height()
                        );
                        continue;
                    }
                    match Restorer::new(manifest, &trust_hash) {
                        Ok(r) => {
                            holders.push(*peer);
                            restorer.get_or_insert(r);
                        }
                        Err(e) => {
                            last_error = format!("{peer}: {e}");
                            refused_at_height = Some(last_error.clone());
                        }
                    }
                }
                Ok(None) => last_error = format!("{peer} holds no snapshot"),
                Err(e) => last_error = format!("{peer}: {e}"),
            }
        }
        // Seeds offer the trusted height but none the trusted block: the
        // trust hash (or every such seed) is wrong; waiting changes nothing.
        if restorer.is_none()
            && let Some(why) = refused_at_height
        {
            return Err(Error::Node(format!("state sync: {why}")));
        }
        if let Some(mut restorer) = restorer {
            for index in restorer.missing() {
                let mut added = false;
                for peer in &holders {
                    let fetched = match transport.client(*peer).await {
                        Ok(c) => c.snapshot_chunk(trust_height, index).await,
                        Err(e) => Err(e),
                    };
                    let chunk = match fetched {
                        Ok(Some(bytes)) => Chunk::decode(&bytes)
                            .map_err(|e| format!("{peer}: chunk {index} undecodable: {e}")),
                        Ok(None) => Err(format!("{peer} no longer holds chunk {index}")),
                        Err(e) => Err(format!("{peer}: {e}")),
                    };
                    match chunk.and_then(|c| restorer.add(c).map_err(|e| format!("{peer}: {e}"))) {
                        Ok(()) => {
                            added = true;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "snapshot chunk refused; asking another seed");
                            last_error = e;
                        }
                    }
                }
                if !added {
                    break;
                }
            }
            if restorer.missing().is_empty() {
                let (ledger, last, sets) = restorer
                    .finish(genesis)
                    .map_err(|e| Error::Node(format!("state sync: {e}")))?;
                return Ok((ledger, last, sets));
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Node(format!(
                "state sync: no seed gave the snapshot of block {} at height {trust_height} within {RESTORE_TIMEOUT_S} s (last: {last_error})",
                hex::encode(trust_hash)
            )));
        }
        tracing::info!(reason = %last_error, "waiting for the trusted snapshot");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blyan_state_machine::params::Params;
    use blyan_state_machine::testkit::{long_chain, testnet};

    /// SYNC-7: one snapshot is built at a time; a taken snapshot is served
    /// by height and index, and nothing else is.
    #[test]
    fn snapshots_are_built_one_at_a_time_and_served_by_height() {
        let net = testnet(4, 8, Params::default());
        let genesis = Ledger::from_genesis(&net.genesis).unwrap();
        let mut sets = ConsensusSets::genesis(&genesis).unwrap();
        let mut last = None;
        let ledger = long_chain(&net, 3, 1, |c, outcome, after| {
            sets = sets.advance(after, outcome).unwrap();
            last = Some(c.clone());
        })
        .unwrap();
        let last = last.unwrap();
        let snapshots = Snapshots::new();
        assert!(snapshots.manifest().is_none());
        assert!(snapshots.try_start());
        assert!(!snapshots.try_start(), "a second build while one runs");
        snapshots.take(&ledger, &last, &sets);
        assert!(snapshots.try_start(), "released after the build");
        let held = snapshots.latest().unwrap();
        assert_eq!(held.height, 3);
        let manifest = Manifest::decode(&snapshots.manifest().unwrap()).unwrap();
        assert_eq!(manifest.block_hash(), last.block.hash());
        assert!(snapshots.chunk(3, 0).is_some());
        assert!(snapshots.chunk(2, 0).is_none());
        assert!(snapshots.chunk(3, held.chunks.len() as u32).is_none());
    }
}
