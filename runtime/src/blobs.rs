//! Content-addressed blob store for weights and datasets, on fjall (spec
//! NODE-NET-4, NODE-NET-8..10).
//!
//! A blob is stored as [`CHUNK_BYTES`] chunks, so a large blob can be
//! fetched from a peer piece by piece and resumed after an interruption
//! ([`crate::transport::GrpcTransport::fetch_blob`]). Its [`BlobManifest`]
//! records the total length and each chunk's SHA3-256, and the blob is
//! named by the SHA3-256 of its manifest's encoding ([`BlobId`]), a root over
//! the chunk hashes (**NODE-NET-8**). A manifest from a peer is therefore
//! checked against the id before anything of it is kept: a lying peer's
//! manifest is refused at once ([`Error::BlobManifestInvalid`]) and can
//! never block the true chunks from an honest peer.
//!
//! Integrity is checked at every boundary: a chunk is checked against the
//! (id-checked) manifest when it is received ([`BlobStore::put_chunk`]) and
//! again whenever it is read ([`BlobStore::get`], [`BlobStore::get_chunk`]),
//! and the whole payload against the id on every full read. Disk corruption
//! therefore surfaces as [`Error::BlobCorrupt`], never as wrong bytes.
//! Storing a chunk costs one lookup of its own key: the count of chunks
//! present is kept beside the blob (`blob_present`), so completing a blob
//! never rescans it (**NODE-NET-9**).
//!
//! **NODE-NET-10** The store is bounded: the manifests it holds (complete or
//! not) may total at most its quota ([`BlobStore::open_with_limits`],
//! default [`DEFAULT_MAX_STORED_BYTES`]); a blob that would exceed it is
//! refused ([`Error::BlobQuotaExceeded`]) before anything is written. A
//! payload stored for a transaction that has not committed yet (`POST
//! /mine`, API-MINE-3) is *pending* ([`BlobStore::put_pending`]): pending
//! blobs have a quota and a count of their own, and
//! [`BlobStore::collect_garbage`] deletes each one whose deadline passed
//! before its PoL block entered the DAG.
//!
//! Layout (its own fjall database beside the chain store's, [`blob_dir`]:
//! the chain store's directory owns its whole tree), schema version
//! [`BLOB_SCHEMA_VERSION`]:
//! - `blob_meta`: `schema_version` → big-endian u32;
//! - `blob_manifests`: id → manifest bytes ([`BlobManifest::encode`]);
//! - `blob_chunks`: id ‖ index (big-endian u32) → chunk bytes;
//! - `blob_complete`: id → empty: every chunk is present and verified;
//! - `blob_present`: id → big-endian u32: chunks stored of an incomplete blob;
//! - `blob_pending`: id → deadline (ms, big-endian u64) ‖ PoL block id (32);
//! - `blob_pol_roots`: PoL payload Merkle root (POL-3, 32) → id, for every
//!   complete blob (**NODE-NET-12**: a PoL block names its payload by that
//!   root, so a node finds, and peers answer, a block's payload by it).
//!   A store opened without the index (written before it existed) is
//!   indexed once on open, blob by blob.
//!
//! Schema 1 named a blob by the SHA3-256 of its payload; opening a schema-1
//! store renames its complete blobs (chunk by chunk, resumable after a
//! crash) and drops its incomplete ones (a fetch starts them again).
//!
//! Writes are synced batches ([`PersistMode::SyncAll`]), made under one lock
//! that also guards the byte accounting.

use crate::Error;
use blyan_state_machine::pol::payload_merkle_root;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use sha3::{Digest, Sha3_256};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Chunk size: 1 MiB (the last chunk of a blob may be shorter).
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Largest blob accepted: 64 GiB, whose manifest (32 bytes a chunk) is
/// 2 MiB and still fits one peer message.
pub const MAX_BLOB_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// NODE-NET-10: default quota of a store: 1 TiB of blobs.
pub const DEFAULT_MAX_STORED_BYTES: u64 = 1024 * 1024 * 1024 * 1024;
/// NODE-NET-10: most pending blobs (stored for uncommitted transactions).
pub const MAX_PENDING_BLOBS: usize = 10_000;
/// Where a node whose chain store is in `data_dir` keeps its blobs:
/// `<data_dir>-blobs` beside it.
pub fn blob_dir(data_dir: &Path) -> std::path::PathBuf {
    let mut name = data_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "data".into());
    name.push("-blobs");
    data_dir.with_file_name(name)
}

/// Version of the blob store's layout (2: blobs named by their manifest,
/// NODE-NET-8).
pub const BLOB_SCHEMA_VERSION: u32 = 2;

const META_SCHEMA: &[u8] = b"schema_version";
/// Set once every complete blob is in `blob_pol_roots` (NODE-NET-12).
const META_POL_ROOTS_INDEXED: &[u8] = b"pol_roots_indexed";

fn sha3(bytes: &[u8]) -> [u8; 32] {
    Sha3_256::digest(bytes).into()
}

/// A blob's id (NODE-NET-8): SHA3-256 of its manifest's encoding, a root
/// over its chunk hashes and length. Text form: 64 lowercase hex digits (a
/// `0x` prefix is accepted when parsing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// The id of the blob whose payload is `bytes`.
    pub fn of(bytes: &[u8]) -> BlobId {
        BlobManifest::of(bytes).id()
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for BlobId {
    type Err = Error;
    fn from_str(s: &str) -> Result<BlobId, Error> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
            .map_err(|e| Error::BlobManifestInvalid(format!("blob id {s:?}: {e}")))?;
        Ok(BlobId(out))
    }
}

/// A blob's length and chunk hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobManifest {
    pub total_bytes: u64,
    pub chunk_hashes: Vec<[u8; 32]>,
}

/// Chunks of a blob of `total_bytes`.
pub fn chunk_count(total_bytes: u64) -> u64 {
    total_bytes.div_ceil(CHUNK_BYTES as u64)
}

impl BlobManifest {
    pub fn of(bytes: &[u8]) -> BlobManifest {
        BlobManifest {
            total_bytes: bytes.len() as u64,
            chunk_hashes: bytes.chunks(CHUNK_BYTES).map(sha3).collect(),
        }
    }

    /// NODE-NET-8: the id this manifest names.
    pub fn id(&self) -> BlobId {
        BlobId(sha3(&self.encode()))
    }

    /// `total_bytes (8, big-endian) ‖ count (4, big-endian) ‖ hash (32) × count`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + 32 * self.chunk_hashes.len());
        out.extend_from_slice(&self.total_bytes.to_be_bytes());
        out.extend_from_slice(&(self.chunk_hashes.len() as u32).to_be_bytes());
        for h in &self.chunk_hashes {
            out.extend_from_slice(h);
        }
        out
    }

    /// Strict decoding: the count must match the length, nothing may follow.
    pub fn decode(bytes: &[u8]) -> Result<BlobManifest, Error> {
        let bad = |m: String| Error::BlobManifestInvalid(m);
        if bytes.len() < 12 {
            return Err(bad(format!(
                "{} bytes, shorter than the header",
                bytes.len()
            )));
        }
        let total_bytes = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
        let count = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        if (bytes.len() - 12) != count * 32 {
            return Err(bad(format!(
                "{count} chunk hashes declared, {} bytes present",
                bytes.len() - 12
            )));
        }
        let m = BlobManifest {
            total_bytes,
            chunk_hashes: bytes[12..]
                .chunks(32)
                .map(|c| c.try_into().expect("32 bytes"))
                .collect(),
        };
        m.validate()?;
        Ok(m)
    }

    /// The length and count agree and stay under [`MAX_BLOB_BYTES`].
    pub fn validate(&self) -> Result<(), Error> {
        if self.total_bytes > MAX_BLOB_BYTES {
            return Err(Error::BlobManifestInvalid(format!(
                "{} bytes exceeds the {MAX_BLOB_BYTES}-byte limit",
                self.total_bytes
            )));
        }
        if chunk_count(self.total_bytes) != self.chunk_hashes.len() as u64 {
            return Err(Error::BlobManifestInvalid(format!(
                "{} bytes need {} chunks, the manifest lists {}",
                self.total_bytes,
                chunk_count(self.total_bytes),
                self.chunk_hashes.len()
            )));
        }
        Ok(())
    }

    /// NODE-NET-8: [`BlobManifest::validate`], and the manifest names `id`.
    pub fn verify(&self, id: &BlobId) -> Result<(), Error> {
        self.validate()?;
        if self.id() != *id {
            return Err(Error::BlobManifestInvalid(format!(
                "the manifest names blob {}, not {id} (NODE-NET-8)",
                self.id()
            )));
        }
        Ok(())
    }

    /// The exact length of chunk `index`.
    pub fn chunk_len(&self, index: u32) -> usize {
        let start = index as u64 * CHUNK_BYTES as u64;
        (self.total_bytes - start).min(CHUNK_BYTES as u64) as usize
    }
}

/// Default size of the verified-chunk cache in front of the store (the
/// seed's `expert_cache_size`, scaled to a devnet).
pub const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

/// NODE-NET-10: why a payload is kept only for a while: the PoL block its
/// transaction registers, and when to give up on that transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub pol_block: [u8; 32],
    pub expires_at_ms: u64,
}

impl Pending {
    fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.expires_at_ms.to_be_bytes());
        out[8..].copy_from_slice(&self.pol_block);
        out
    }
    fn decode(bytes: &[u8]) -> Option<Pending> {
        let bytes: &[u8; 40] = bytes.try_into().ok()?;
        Some(Pending {
            expires_at_ms: u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            pol_block: bytes[8..].try_into().expect("32 bytes"),
        })
    }
}

/// What [`BlobStore::collect_garbage`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GarbageReport {
    /// Pending blobs whose block committed: now kept for good.
    pub kept: usize,
    /// Pending blobs past their deadline: deleted.
    pub deleted: usize,
}

/// Bytes counted against the quotas; guarded by the write lock.
#[derive(Debug, Default)]
struct Usage {
    /// Sum of the `total_bytes` of every stored manifest.
    stored_bytes: u64,
    /// The same, over pending blobs only.
    pending_bytes: u64,
    pending_count: usize,
}

/// The blob store. See the module docs.
pub struct BlobStore {
    /// Verified chunks recently read (the weight cache, SYNC-2): a hit skips
    /// the read and the hash check; bounded in bytes.
    cache: blyan_sync::ByteCache<([u8; 32], u32)>,
    db: Database,
    manifests: Keyspace,
    chunks: Keyspace,
    complete: Keyspace,
    present: Keyspace,
    pending: Keyspace,
    pol_roots: Keyspace,
    max_stored_bytes: u64,
    /// Serialises writes and guards the accounting (NODE-NET-9/10).
    usage: Mutex<Usage>,
    /// Manifests checked against their id this session (NODE-NET-8), so a
    /// fetch's every chunk compares its manifest instead of hashing it again;
    /// at most [`MAX_VERIFIED_MANIFESTS`].
    verified: Mutex<std::collections::BTreeMap<BlobId, std::sync::Arc<BlobManifest>>>,
    /// Chunk-key lookups so far (tests check that storing is not quadratic).
    probes: AtomicU64,
}

/// Manifests remembered as checked (up to 2 MiB each).
const MAX_VERIFIED_MANIFESTS: usize = 16;

fn storage(e: fjall::Error) -> Error {
    Error::Storage(e.to_string())
}

fn chunk_key(id: &BlobId, index: u32) -> [u8; 36] {
    let mut k = [0u8; 36];
    k[..32].copy_from_slice(&id.0);
    k[32..].copy_from_slice(&index.to_be_bytes());
    k
}

fn id_of_key(key: &[u8]) -> Result<BlobId, Error> {
    Ok(BlobId(key.try_into().map_err(|_| {
        Error::Corrupt(format!("blob key of {} bytes", key.len()))
    })?))
}

impl BlobStore {
    /// Opens (or creates) the store at `path`, refusing another schema version.
    pub fn open(path: &Path) -> Result<BlobStore, Error> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// [`BlobStore::open`] with a cache of at most `cache_bytes` of verified chunks.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<BlobStore, Error> {
        Self::open_with_limits(path, cache_bytes, DEFAULT_MAX_STORED_BYTES)
    }

    /// [`BlobStore::open_with_cache`] with a quota of `max_stored_bytes`
    /// (NODE-NET-10).
    pub fn open_with_limits(
        path: &Path,
        cache_bytes: usize,
        max_stored_bytes: u64,
    ) -> Result<BlobStore, Error> {
        let db = Database::builder(path).open().map_err(storage)?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(storage)
        };
        let meta = ks("blob_meta")?;
        let store = BlobStore {
            cache: blyan_sync::ByteCache::new(cache_bytes),
            manifests: ks("blob_manifests")?,
            chunks: ks("blob_chunks")?,
            complete: ks("blob_complete")?,
            present: ks("blob_present")?,
            pending: ks("blob_pending")?,
            pol_roots: ks("blob_pol_roots")?,
            max_stored_bytes,
            usage: Mutex::new(Usage::default()),
            verified: Mutex::new(Default::default()),
            probes: AtomicU64::new(0),
            db,
        };
        let write_version = |store: &BlobStore| -> Result<(), Error> {
            let mut b = store.db.batch().durability(Some(PersistMode::SyncAll));
            b.insert(
                &meta,
                META_SCHEMA,
                BLOB_SCHEMA_VERSION.to_be_bytes().to_vec(),
            );
            b.commit().map_err(storage)
        };
        match meta.get(META_SCHEMA).map_err(storage)? {
            None => write_version(&store)?,
            Some(v) => {
                let found = u32::from_be_bytes(
                    v.as_ref()
                        .try_into()
                        .map_err(|_| Error::Corrupt("blob schema version".into()))?,
                );
                match found {
                    BLOB_SCHEMA_VERSION => {}
                    1 => {
                        store.migrate_from_v1()?;
                        write_version(&store)?;
                    }
                    _ => {
                        return Err(Error::UnsupportedSchema {
                            found,
                            supported: BLOB_SCHEMA_VERSION,
                        });
                    }
                }
            }
        }
        if meta.get(META_POL_ROOTS_INDEXED).map_err(storage)?.is_none() {
            store.index_pol_roots()?;
            meta.insert(META_POL_ROOTS_INDEXED, Vec::new())
                .map_err(storage)?;
        }
        store.recount()?;
        Ok(store)
    }

    /// Schema 1 → 2: renames each complete blob to its manifest's id, one
    /// chunk per batch (a crash leaves each chunk under one of its names,
    /// and the next open resumes), and drops incomplete ones.
    fn migrate_from_v1(&self) -> Result<(), Error> {
        let mut old = Vec::new();
        for kv in self.manifests.iter() {
            let (k, v) = kv.into_inner().map_err(storage)?;
            old.push((id_of_key(&k)?, BlobManifest::decode(&v)?));
        }
        for (old_id, m) in old {
            let new_id = m.id();
            if new_id == old_id {
                continue; // renamed before a crash
            }
            let complete = self.complete.contains_key(old_id.0).map_err(storage)?;
            for i in 0..m.chunk_hashes.len() as u32 {
                let Some(v) = self.chunks.get(chunk_key(&old_id, i)).map_err(storage)? else {
                    continue;
                };
                let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
                if complete {
                    b.insert(&self.chunks, chunk_key(&new_id, i), v.to_vec());
                }
                b.remove(&self.chunks, chunk_key(&old_id, i));
                b.commit().map_err(storage)?;
            }
            let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
            if complete {
                b.insert(&self.manifests, new_id.0, m.encode());
                b.insert(&self.complete, new_id.0, Vec::new());
            }
            b.remove(&self.manifests, old_id.0);
            b.remove(&self.complete, old_id.0);
            b.commit().map_err(storage)?;
        }
        Ok(())
    }

    /// NODE-NET-12: indexes every complete blob by its PoL payload root
    /// (once, for a store written before the index existed).
    fn index_pol_roots(&self) -> Result<(), Error> {
        let mut ids = Vec::new();
        for kv in self.complete.iter() {
            ids.push(id_of_key(&kv.key().map_err(storage)?)?);
        }
        for id in ids {
            if let Some(bytes) = self.get(&id)? {
                self.pol_roots
                    .insert(payload_merkle_root(&bytes), id.0)
                    .map_err(storage)?;
            }
        }
        Ok(())
    }

    /// NODE-NET-12: the complete blob whose PoL payload root (POL-3) is `root`.
    pub fn by_pol_root(&self, root: &[u8; 32]) -> Result<Option<BlobId>, Error> {
        match self.pol_roots.get(root).map_err(storage)? {
            Some(v) => {
                let id = id_of_key(&v)?;
                Ok(self.has(&id)?.then_some(id))
            }
            None => Ok(None),
        }
    }

    /// Recomputes the accounting from the stored manifests and pending marks.
    fn recount(&self) -> Result<(), Error> {
        let mut usage = Usage::default();
        for kv in self.manifests.iter() {
            let (k, v) = kv.into_inner().map_err(storage)?;
            let m = BlobManifest::decode(&v).map_err(|e| Error::BlobCorrupt {
                id: hex::encode(&k),
                what: format!("stored manifest: {e}"),
            })?;
            usage.stored_bytes += m.total_bytes;
        }
        for kv in self.pending.iter() {
            let k = kv.key().map_err(storage)?;
            if let Some(m) = self.manifest(&id_of_key(&k)?)? {
                usage.pending_bytes += m.total_bytes;
                usage.pending_count += 1;
            }
        }
        *self.lock() = usage;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Usage> {
        // Every write commits its batch before it updates the accounting, so
        // a poisoned lock at worst holds counts a little off until reopened.
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of blobs stored (complete or not) and of pending blobs.
    pub fn usage_bytes(&self) -> (u64, u64) {
        let u = self.lock();
        (u.stored_bytes, u.pending_bytes)
    }

    fn check_quota(&self, usage: &Usage, new_bytes: u64) -> Result<(), Error> {
        if usage.stored_bytes.saturating_add(new_bytes) > self.max_stored_bytes {
            return Err(Error::BlobQuotaExceeded(format!(
                "{new_bytes} more bytes would exceed the store's quota of {} ({} stored)",
                self.max_stored_bytes, usage.stored_bytes
            )));
        }
        Ok(())
    }

    /// Stores `bytes` (idempotent) and returns its id; keeps it for good
    /// (a pending mark on it is lifted).
    pub fn put(&self, bytes: &[u8]) -> Result<BlobId, Error> {
        self.put_inner(bytes, None)
    }

    /// NODE-NET-10: stores `bytes` for a transaction not committed yet.
    /// Refused if pending blobs would exceed `max_pending_bytes` or
    /// [`MAX_PENDING_BLOBS`]. A blob already kept for good stays so; one
    /// already pending keeps the later deadline.
    pub fn put_pending(
        &self,
        bytes: &[u8],
        pending: Pending,
        max_pending_bytes: u64,
    ) -> Result<BlobId, Error> {
        self.put_inner(bytes, Some((pending, max_pending_bytes)))
    }

    fn put_inner(&self, bytes: &[u8], pending: Option<(Pending, u64)>) -> Result<BlobId, Error> {
        let manifest = BlobManifest::of(bytes);
        manifest.validate()?;
        let id = manifest.id();
        let mut usage = self.lock();
        let marked = match self.pending.get(id.0).map_err(storage)? {
            Some(v) => Some(Pending::decode(&v).ok_or_else(|| Error::BlobCorrupt {
                id: id.to_string(),
                what: "pending mark".into(),
            })?),
            None => None,
        };
        if self.has(&id)? {
            match (marked, pending) {
                (Some(_), None) => {
                    let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
                    b.remove(&self.pending, id.0);
                    b.commit().map_err(storage)?;
                    usage.pending_bytes -= manifest.total_bytes;
                    usage.pending_count -= 1;
                }
                (Some(old), Some((new, _))) if new.expires_at_ms > old.expires_at_ms => {
                    self.pending.insert(id.0, new.encode()).map_err(storage)?;
                }
                _ => {}
            }
            return Ok(id);
        }
        let partial = self.manifests.contains_key(id.0).map_err(storage)?;
        if !partial {
            self.check_quota(&usage, manifest.total_bytes)?;
        }
        let newly_pending = pending.is_some() && marked.is_none();
        if let Some((_, max_pending_bytes)) = pending
            && newly_pending
        {
            if usage.pending_count >= MAX_PENDING_BLOBS {
                return Err(Error::BlobQuotaExceeded(format!(
                    "{MAX_PENDING_BLOBS} payloads already wait for their transactions"
                )));
            }
            if usage.pending_bytes.saturating_add(manifest.total_bytes) > max_pending_bytes {
                return Err(Error::BlobQuotaExceeded(format!(
                    "{} more bytes would exceed the quota of {max_pending_bytes} bytes of payloads waiting for their transactions ({} waiting)",
                    manifest.total_bytes, usage.pending_bytes
                )));
            }
        }
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.manifests, id.0, manifest.encode());
        for (i, c) in bytes.chunks(CHUNK_BYTES).enumerate() {
            b.insert(&self.chunks, chunk_key(&id, i as u32), c.to_vec());
        }
        b.insert(&self.complete, id.0, Vec::new());
        b.insert(&self.pol_roots, payload_merkle_root(bytes), id.0.to_vec());
        b.remove(&self.present, id.0);
        match (pending, marked) {
            (Some((p, _)), _) => b.insert(&self.pending, id.0, p.encode()),
            (None, Some(_)) => b.remove(&self.pending, id.0),
            (None, None) => {}
        }
        b.commit().map_err(storage)?;
        if !partial {
            usage.stored_bytes += manifest.total_bytes;
        }
        if newly_pending {
            usage.pending_bytes += manifest.total_bytes;
            usage.pending_count += 1;
        } else if pending.is_none() && marked.is_some() {
            usage.pending_bytes -= manifest.total_bytes;
            usage.pending_count -= 1;
        }
        Ok(id)
    }

    /// NODE-NET-10: whether a new pending blob of `bytes` would fit
    /// `max_pending_bytes`, [`MAX_PENDING_BLOBS`] and the store's quota now.
    pub fn check_pending_room(&self, bytes: u64, max_pending_bytes: u64) -> Result<(), Error> {
        let usage = self.lock();
        self.check_quota(&usage, bytes)?;
        if usage.pending_count >= MAX_PENDING_BLOBS
            || usage.pending_bytes.saturating_add(bytes) > max_pending_bytes
        {
            return Err(Error::BlobQuotaExceeded(format!(
                "{bytes} more bytes would exceed the quota of {max_pending_bytes} bytes or {MAX_PENDING_BLOBS} payloads waiting for their transactions ({} bytes in {} waiting)",
                usage.pending_bytes, usage.pending_count
            )));
        }
        Ok(())
    }

    /// NODE-NET-10: lifts the mark of each pending blob whose PoL block
    /// `committed` says is in the DAG, and deletes each other one whose
    /// deadline is at or before `now_ms`.
    pub fn collect_garbage(
        &self,
        now_ms: u64,
        committed: impl Fn(&[u8; 32]) -> bool,
    ) -> Result<GarbageReport, Error> {
        let mut usage = self.lock();
        let mut report = GarbageReport::default();
        let mut marks = Vec::new();
        for kv in self.pending.iter() {
            let (k, v) = kv.into_inner().map_err(storage)?;
            let id = id_of_key(&k)?;
            let p = Pending::decode(&v).ok_or_else(|| Error::BlobCorrupt {
                id: id.to_string(),
                what: "pending mark".into(),
            })?;
            marks.push((id, p));
        }
        for (id, p) in marks {
            let keep = committed(&p.pol_block);
            if !keep && p.expires_at_ms > now_ms {
                continue;
            }
            let total = self.manifest(&id)?.map_or(0, |m| m.total_bytes);
            let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
            b.remove(&self.pending, id.0);
            if !keep {
                if let Some(bytes) = self.get(&id)? {
                    b.remove(&self.pol_roots, payload_merkle_root(&bytes));
                }
                b.remove(&self.manifests, id.0);
                b.remove(&self.complete, id.0);
                b.remove(&self.present, id.0);
                for i in 0..chunk_count(total) as u32 {
                    b.remove(&self.chunks, chunk_key(&id, i));
                }
            }
            b.commit().map_err(storage)?;
            usage.pending_bytes -= total;
            usage.pending_count -= 1;
            if keep {
                report.kept += 1;
            } else {
                for i in 0..chunk_count(total) as u32 {
                    self.cache.remove(&(id.0, i));
                }
                usage.stored_bytes -= total;
                report.deleted += 1;
            }
        }
        Ok(report)
    }

    /// Whether `id` is waiting for its transaction (NODE-NET-10).
    pub fn is_pending(&self, id: &BlobId) -> Result<bool, Error> {
        self.pending.contains_key(id.0).map_err(storage)
    }

    /// Whether the whole blob is present and was verified.
    pub fn has(&self, id: &BlobId) -> Result<bool, Error> {
        self.complete.contains_key(id.0).map_err(storage)
    }

    /// The manifest, if this store knows the blob (complete or not). Only
    /// manifests checked against their id are stored; reading one checks
    /// its form, not its id again (every chunk read is checked against it,
    /// so a damaged manifest surfaces as [`Error::BlobCorrupt`]).
    pub fn manifest(&self, id: &BlobId) -> Result<Option<BlobManifest>, Error> {
        match self.manifests.get(id.0).map_err(storage)? {
            None => Ok(None),
            Some(v) => BlobManifest::decode(&v)
                .map(Some)
                .map_err(|e| Error::BlobCorrupt {
                    id: id.to_string(),
                    what: format!("stored manifest: {e}"),
                }),
        }
    }
    /// Chunk `index`, checked against the manifest; `None` if not stored.
    pub fn get_chunk(&self, id: &BlobId, index: u32) -> Result<Option<Vec<u8>>, Error> {
        let Some(manifest) = self.manifest(id)? else {
            return Ok(None);
        };
        self.read_chunk(id, &manifest, index)
    }

    fn read_chunk(
        &self,
        id: &BlobId,
        manifest: &BlobManifest,
        index: u32,
    ) -> Result<Option<Vec<u8>>, Error> {
        let Some(expected) = manifest.chunk_hashes.get(index as usize) else {
            return Ok(None);
        };
        if let Some(hit) = self.cache.get(&(id.0, index)) {
            return Ok(Some(hit.as_ref().clone()));
        }
        let Some(v) = self.chunks.get(chunk_key(id, index)).map_err(storage)? else {
            return Ok(None);
        };
        if v.len() != manifest.chunk_len(index) || sha3(&v) != *expected {
            return Err(Error::BlobCorrupt {
                id: id.to_string(),
                what: format!("chunk {index} does not match its hash"),
            });
        }
        self.cache
            .insert((id.0, index), std::sync::Arc::new(v.to_vec()));
        Ok(Some(v.to_vec()))
    }

    /// The whole payload, every chunk and the whole hash verified; `None`
    /// unless the blob is complete.
    pub fn get(&self, id: &BlobId) -> Result<Option<Vec<u8>>, Error> {
        if !self.has(id)? {
            return Ok(None);
        }
        let manifest = self.manifest(id)?.ok_or_else(|| Error::BlobCorrupt {
            id: id.to_string(),
            what: "complete but without a manifest".into(),
        })?;
        let mut out = Vec::with_capacity(manifest.total_bytes as usize);
        for i in 0..manifest.chunk_hashes.len() as u32 {
            let c = self
                .read_chunk(id, &manifest, i)?
                .ok_or_else(|| Error::BlobCorrupt {
                    id: id.to_string(),
                    what: format!("chunk {i} is missing"),
                })?;
            out.extend_from_slice(&c);
        }
        if BlobId::of(&out) != *id {
            return Err(Error::BlobCorrupt {
                id: id.to_string(),
                what: "payload does not hash to the id".into(),
            });
        }
        Ok(Some(out))
    }

    /// Indices of the chunks not yet stored, in order; `None` if the
    /// manifest is unknown. (A fetch asks once, when it starts; storing a
    /// chunk never rescans, NODE-NET-9.)
    pub fn missing_chunks(&self, id: &BlobId) -> Result<Option<Vec<u32>>, Error> {
        let Some(manifest) = self.manifest(id)? else {
            return Ok(None);
        };
        if self.has(id)? {
            return Ok(Some(Vec::new()));
        }
        let mut out = Vec::new();
        for i in 0..manifest.chunk_hashes.len() as u32 {
            if !self.chunk_present(id, i)? {
                out.push(i);
            }
        }
        Ok(Some(out))
    }

    fn chunk_present(&self, id: &BlobId, index: u32) -> Result<bool, Error> {
        self.probes.fetch_add(1, Ordering::Relaxed);
        self.chunks
            .contains_key(chunk_key(id, index))
            .map_err(storage)
    }

    /// Stores a received chunk after checking `manifest` against `id`
    /// (NODE-NET-8) and the chunk against `manifest`. Returns whether the
    /// blob is now complete. A new blob's manifest counts against the quota
    /// (NODE-NET-10). One lookup of the chunk's key, no rescan (NODE-NET-9).
    pub fn put_chunk(
        &self,
        id: &BlobId,
        manifest: &BlobManifest,
        index: u32,
        bytes: &[u8],
    ) -> Result<bool, Error> {
        self.check_manifest(id, manifest)?;
        let Some(expected) = manifest.chunk_hashes.get(index as usize) else {
            return Err(Error::BlobChunkRejected {
                id: id.to_string(),
                index,
                why: format!("the blob has {} chunks", manifest.chunk_hashes.len()),
            });
        };
        if bytes.len() != manifest.chunk_len(index) {
            return Err(Error::BlobChunkRejected {
                id: id.to_string(),
                index,
                why: format!(
                    "{} bytes, the manifest says {}",
                    bytes.len(),
                    manifest.chunk_len(index)
                ),
            });
        }
        if sha3(bytes) != *expected {
            return Err(Error::BlobChunkRejected {
                id: id.to_string(),
                index,
                why: "hash differs from the manifest".into(),
            });
        }
        let mut usage = self.lock();
        if self.has(id)? {
            return Ok(true);
        }
        let known = self.manifests.contains_key(id.0).map_err(storage)?;
        if known && self.chunk_present(id, index)? {
            return Ok(false);
        }
        let present = if known {
            match self.present.get(id.0).map_err(storage)? {
                Some(v) => {
                    u32::from_be_bytes(v.as_ref().try_into().map_err(|_| Error::BlobCorrupt {
                        id: id.to_string(),
                        what: "count of chunks present".into(),
                    })?)
                }
                None => 0,
            }
        } else {
            self.check_quota(&usage, manifest.total_bytes)?;
            0
        };
        let present = present + 1;
        let complete = present as usize >= manifest.chunk_hashes.len();
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        if !known {
            b.insert(&self.manifests, id.0, manifest.encode());
        }
        b.insert(&self.chunks, chunk_key(id, index), bytes.to_vec());
        if complete {
            b.insert(&self.complete, id.0, Vec::new());
            b.remove(&self.present, id.0);
        } else {
            b.insert(&self.present, id.0, present.to_be_bytes().to_vec());
        }
        b.commit().map_err(storage)?;
        if !known {
            usage.stored_bytes += manifest.total_bytes;
        }
        drop(usage);
        if complete && let Some(bytes) = self.get(id)? {
            // NODE-NET-12: the whole payload is needed for its PoL root.
            self.pol_roots
                .insert(payload_merkle_root(&bytes), id.0)
                .map_err(storage)?;
        }
        Ok(complete)
    }

    /// NODE-NET-8: `manifest` names `id`; hashed once per blob and session.
    fn check_manifest(&self, id: &BlobId, manifest: &BlobManifest) -> Result<(), Error> {
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.get(id).is_some_and(|m| **m == *manifest) {
            return Ok(());
        }
        manifest.verify(id)?;
        if verified.len() >= MAX_VERIFIED_MANIFESTS {
            verified.pop_first();
        }
        verified.insert(*id, std::sync::Arc::new(manifest.clone()));
        Ok(())
    }

    /// Chunk-key lookups made so far (tests: the cost of storing a blob).
    #[doc(hidden)]
    pub fn chunk_probes_for_test(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    /// Test hook: stores `manifest` under `id` without any check, as a lying
    /// peer's store would hold it.
    #[doc(hidden)]
    pub fn put_manifest_unchecked_for_test(
        &self,
        id: &BlobId,
        manifest: &BlobManifest,
    ) -> Result<(), Error> {
        self.manifests
            .insert(id.0, manifest.encode())
            .map_err(storage)
    }

    /// Test hook: overwrites a stored chunk's bytes without any check, as
    /// disk corruption would.
    #[doc(hidden)]
    pub fn corrupt_chunk_for_test(
        &self,
        id: &BlobId,
        index: u32,
        bytes: &[u8],
    ) -> Result<(), Error> {
        // The cache models memory, which this test hook does not corrupt.
        self.cache.remove(&(id.0, index));
        self.chunks
            .insert(chunk_key(id, index), bytes.to_vec())
            .map_err(storage)
    }
}
