//! State sync (spec/node.md SYNC-*): a snapshot of the committed state after
//! a block, cut into chunks that are each checked alone against the block's
//! certified state root, so a node joins a long chain in O(state) instead of
//! replaying every block, and a forged chunk is refused on arrival, naming
//! the chunk (CometBFT's state sync, with Merkle-checked chunks).
//!
//! - [`take`] builds a manifest and its chunks from a ledger and the block it
//!   follows.
//! - [`Restorer`] checks the manifest against a trusted block hash, accepts
//!   chunks in any order (each verified on arrival) and, when all are there,
//!   rebuilds the ledger ([`Ledger::from_entries`]), checks its root and the
//!   block's certificate, and returns what [`Node::resume`] needs.
//!
//! Pure: the transport (which peer offers which snapshot, retries) is the
//! host's.

use crate::block::Block;
use crate::consensus::{CommitCertificate, K256Scheme, ValidatorSet};
use crate::encoding::Canonical;
use crate::error::Error;
use crate::genesis::Genesis;
use crate::ledger::Ledger;
use crate::node::{CommittedBlock, ConsensusSets};
use crate::smt::{Subtree, path_prefix, root_of_subtrees, subtree_of};
use crate::state::StateKey;
use crate::tx::PublicKey;
use crate::types::{Address, Hash32, Height};
use rkyv::{Archive, Deserialize, Serialize};
use std::collections::BTreeMap;

/// SYNC-1: the manifest format this code writes and reads.
pub const FORMAT: u32 = 1;
/// SYNC-2: chunks are the subtrees at depth `chunk_bits` ≤ this.
pub const MAX_CHUNK_BITS: u32 = 16;
/// SYNC-2: the writer picks the fewest chunk bits that keep the expected
/// entries per chunk at or below this.
pub const TARGET_CHUNK_ENTRIES: usize = 2_048;
/// SYNC-4: a chunk larger than this is refused before it is decoded.
pub const MAX_CHUNK_BYTES: usize = 16 << 20;

/// One committed entry: `StateKey { ns, key }` and its canonical value.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct ChunkEntry {
    pub ns: u8,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// SYNC-1: what a snapshot is of and how it is cut.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The block the state follows, with its commit certificate.
    pub block: Block,
    pub certificate: CommitCertificate<[u8; 64]>,
    /// NODE-STORE-6's sets after the block (encoded `ConsensusSets`): their
    /// members are checked against the restored state; their proposer
    /// priorities are not committed anywhere and are taken on trust.
    pub consensus_sets: Vec<u8>,
    pub chunk_bits: u32,
    /// SYNC-2: the subtree of each chunk, prefix 0 first (`2^chunk_bits`).
    pub chunks: Vec<Subtree>,
    /// Entries per chunk (what the chunk must hold exactly).
    pub chunk_entries: Vec<u32>,
}

impl Manifest {
    pub fn height(&self) -> Height {
        self.block.header.height
    }
    pub fn block_hash(&self) -> Hash32 {
        self.block.hash()
    }
    pub fn entries(&self) -> u64 {
        self.chunk_entries.iter().map(|n| u64::from(*n)).sum()
    }
}

/// SYNC-3: one chunk: the entries whose paths start with `index`'s
/// `chunk_bits` bits, in path order.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Chunk {
    pub height: Height,
    pub index: u32,
    pub entries: Vec<ChunkEntry>,
}

fn chunk_bits_for(entries: usize) -> u32 {
    (0..=MAX_CHUNK_BITS)
        .find(|bits| entries.div_ceil(1usize << bits) <= TARGET_CHUNK_ENTRIES)
        .unwrap_or(MAX_CHUNK_BITS)
}

/// (path, value hash) of each entry, sorted by path.
fn leaves(entries: &[ChunkEntry]) -> Vec<([u8; 32], [u8; 32])> {
    entries
        .iter()
        .map(|e| {
            (
                StateKey::new(e.ns, e.key.clone()).path(),
                crate::crypto::sha3_256(&e.value),
            )
        })
        .collect()
}

/// SYNC-1..3: the snapshot of `ledger`, the state after `last` with `sets`.
/// Panics if `ledger` is not that state (a programmer error: the host takes
/// snapshots of its own committed state).
pub fn take(
    ledger: &Ledger,
    last: &CommittedBlock,
    sets: &ConsensusSets,
) -> (Manifest, Vec<Chunk>) {
    take_with_chunk_bits(ledger, last, sets, None)
}

/// [`take`] with `chunk_bits` chosen by the caller (`None`: the fewest that
/// keep chunks at about [`TARGET_CHUNK_ENTRIES`]).
pub fn take_with_chunk_bits(
    ledger: &Ledger,
    last: &CommittedBlock,
    sets: &ConsensusSets,
    chunk_bits: Option<u32>,
) -> (Manifest, Vec<Chunk>) {
    let header = &last.block.header;
    assert_eq!(ledger.height(), header.height, "snapshot of another height");
    assert_eq!(
        ledger.state_root(),
        header.state_root,
        "snapshot of another state"
    );
    assert_eq!(ledger.last_block_hash(), last.block.hash());
    let entries = ledger.entries();
    let bits = chunk_bits.unwrap_or_else(|| chunk_bits_for(entries.len()));
    assert!(bits <= MAX_CHUNK_BITS);
    let mut by_chunk: Vec<Vec<([u8; 32], ChunkEntry)>> = vec![Vec::new(); 1 << bits];
    for (k, value) in entries {
        let path = k.path();
        by_chunk[path_prefix(&path, bits)].push((
            path,
            ChunkEntry {
                ns: k.ns,
                key: k.key,
                value,
            },
        ));
    }
    let mut chunks = Vec::with_capacity(by_chunk.len());
    let mut subtrees = Vec::with_capacity(by_chunk.len());
    let mut counts = Vec::with_capacity(by_chunk.len());
    for (index, mut members) in by_chunk.into_iter().enumerate() {
        members.sort_by_key(|m| m.0);
        let entries: Vec<ChunkEntry> = members.into_iter().map(|(_, e)| e).collect();
        subtrees.push(subtree_of(&leaves(&entries), bits as usize));
        counts.push(u32::try_from(entries.len()).expect("a chunk holds < 2^32 entries"));
        chunks.push(Chunk {
            height: header.height,
            index: index as u32,
            entries,
        });
    }
    assert_eq!(root_of_subtrees(&subtrees, bits), header.state_root);
    let manifest = Manifest {
        format: FORMAT,
        block: last.block.clone(),
        certificate: last.certificate.clone(),
        consensus_sets: sets.encode(),
        chunk_bits: bits,
        chunks: subtrees,
        chunk_entries: counts,
    };
    (manifest, chunks)
}

fn refused(what: String) -> Error {
    Error::BadSnapshot(what)
}

/// SYNC-4..6: restores a snapshot chunk by chunk.
#[derive(Debug)]
pub struct Restorer {
    manifest: Manifest,
    received: BTreeMap<u32, Vec<ChunkEntry>>,
}

impl Restorer {
    /// SYNC-4: accepts `manifest` only if it is of the block `trusted_hash`
    /// names (the trust anchor, as CometBFT's `trust_hash`) and its chunks'
    /// subtrees hash to that block's state root.
    pub fn new(manifest: Manifest, trusted_hash: &Hash32) -> Result<Restorer, Error> {
        let m = &manifest;
        if m.format != FORMAT {
            return Err(refused(format!(
                "format {} (this node reads {FORMAT})",
                m.format
            )));
        }
        if m.block_hash() != *trusted_hash {
            return Err(refused(format!(
                "block {} is not the trusted block {}",
                hex::encode(m.block_hash()),
                hex::encode(trusted_hash)
            )));
        }
        if m.certificate.value != m.block_hash() || m.certificate.height != m.height() {
            return Err(refused("the certificate is not the block's".into()));
        }
        if m.chunk_bits > MAX_CHUNK_BITS
            || m.chunks.len() != 1usize << m.chunk_bits
            || m.chunk_entries.len() != m.chunks.len()
        {
            return Err(refused(format!(
                "{} chunks and {} counts for {} chunk bits",
                m.chunks.len(),
                m.chunk_entries.len(),
                m.chunk_bits
            )));
        }
        let root = root_of_subtrees(&m.chunks, m.chunk_bits);
        if root != m.block.header.state_root {
            return Err(refused(format!(
                "the chunks' subtrees hash to {}, not the block's state root {}",
                hex::encode(root),
                hex::encode(m.block.header.state_root)
            )));
        }
        Ok(Restorer {
            manifest,
            received: BTreeMap::new(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The chunk indices still missing, ascending.
    pub fn missing(&self) -> Vec<u32> {
        (0..self.manifest.chunks.len() as u32)
            .filter(|i| !self.received.contains_key(i))
            .collect()
    }

    /// SYNC-5: checks one chunk against the manifest and keeps it; a forged,
    /// misplaced or malformed chunk is refused and changes nothing.
    pub fn add(&mut self, chunk: Chunk) -> Result<(), Error> {
        let m = &self.manifest;
        let index = chunk.index;
        let bad = |why: &str| refused(format!("chunk {index}: {why}"));
        if chunk.height != m.height() {
            return Err(bad("of another height"));
        }
        let Some(expected) = m.chunks.get(index as usize) else {
            return Err(bad("no such chunk"));
        };
        if chunk.entries.len() != m.chunk_entries[index as usize] as usize {
            return Err(bad("wrong number of entries"));
        }
        let leaves = leaves(&chunk.entries);
        if leaves.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(bad("entries not in strictly ascending path order"));
        }
        if leaves
            .iter()
            .any(|(p, _)| path_prefix(p, m.chunk_bits) != index as usize)
        {
            return Err(bad("an entry belongs to another chunk"));
        }
        if subtree_of(&leaves, m.chunk_bits as usize) != *expected {
            return Err(bad("its entries do not hash to the manifest's subtree"));
        }
        self.received.insert(index, chunk.entries);
        Ok(())
    }

    /// SYNC-6: once every chunk is in, the ledger after the manifest's block
    /// (STATE-4, root checked again), the block with its certificate
    /// (verified against the restored state's validator set of its height)
    /// and the consensus sets (members checked by [`Node::resume`]).
    ///
    /// [`Node::resume`]: crate::node::Node::resume
    pub fn finish(
        self,
        genesis: &Genesis,
    ) -> Result<(Ledger, CommittedBlock, ConsensusSets), Error> {
        let missing = self.missing();
        if !missing.is_empty() {
            return Err(refused(format!("{} chunks missing", missing.len())));
        }
        let m = self.manifest;
        let entries: Vec<(StateKey, Vec<u8>)> = self
            .received
            .into_values()
            .flatten()
            .map(|e| (StateKey::new(e.ns, e.key), e.value))
            .collect();
        let ledger = Ledger::from_entries(genesis, entries, m.block_hash())?;
        if ledger.state_root() != m.block.header.state_root || ledger.height() != m.height() {
            return Err(refused("the restored state is not the block's".into()));
        }
        let sets = ConsensusSets::decode(&m.consensus_sets)?;
        // Members, keys and powers must be the restored state's (only the
        // priorities are taken on trust).
        let members = |s: &ValidatorSet| -> Vec<(Address, PublicKey, u64)> {
            s.validators()
                .iter()
                .map(|v| (v.address, v.public_key, v.voting_power))
                .collect()
        };
        let from_state = |active: &[(Address, u64)]| -> Result<Vec<_>, Error> {
            active
                .iter()
                .map(|(a, power)| {
                    let v = ledger.validator(a).ok_or_else(|| {
                        refused(format!("set member {a:?} is not a validator in the state"))
                    })?;
                    Ok((*a, v.public_key, *power))
                })
                .collect()
        };
        if members(&sets.set) != from_state(ledger.active_set())?
            || members(&sets.prev_set) != from_state(ledger.last_active_set())?
        {
            return Err(refused(
                "the consensus sets are not the restored state's validator sets".into(),
            ));
        }
        let scheme = K256Scheme {
            chain_id: genesis.chain_id.clone(),
        };
        m.certificate
            .verify(&scheme, &sets.prev_set, m.height())
            .map_err(|e| refused(format!("the block's certificate: {e}")))?;
        let last = CommittedBlock {
            block: m.block,
            certificate: m.certificate,
        };
        Ok((ledger, last, sets))
    }
}

/// The encoded size of a chunk, for hosts that bound what they accept.
pub fn encoded_len(chunk: &Chunk) -> usize {
    chunk.encode().len()
}
