//! Content-addressed blob store for weights and datasets, on fjall (spec
//! NODE-NET-4).
//!
//! A blob is named by the SHA3-256 of its whole payload ([`BlobId`]) and
//! stored as [`CHUNK_BYTES`] chunks, so a large blob can be fetched from a
//! peer piece by piece and resumed after an interruption
//! ([`crate::transport::GrpcTransport::fetch_blob`]). Its [`BlobManifest`]
//! records the total length and each chunk's SHA3-256.
//!
//! Integrity is checked at every boundary: a chunk is checked against the
//! manifest when it is received ([`BlobStore::put_chunk`]) and again whenever
//! it is read ([`BlobStore::get`], [`BlobStore::get_chunk`]), and the whole
//! payload is checked against the id when the last chunk arrives and on every
//! full read. Disk corruption therefore surfaces as
//! [`Error::BlobCorrupt`], never as wrong bytes. A manifest from a peer cannot
//! be checked until the blob is complete (the id covers the payload, not the
//! manifest); if the assembled payload does not hash to the id, every chunk
//! of the blob is deleted and [`Error::BlobHashMismatch`] returned, so a lying
//! peer costs a refetch, never a wrong blob.
//!
//! Layout (its own fjall database beside the chain store's, [`blob_dir`]:
//! the chain store's directory owns its whole tree), schema version
//! [`BLOB_SCHEMA_VERSION`]:
//! - `blob_meta`: `schema_version` → big-endian u32;
//! - `blob_manifests`: id → manifest bytes ([`BlobManifest::encode`]);
//! - `blob_chunks`: id ‖ index (big-endian u32) → chunk bytes;
//! - `blob_complete`: id → empty: every chunk is present and the whole hash
//!   was checked.
//!
//! Writes are synced batches ([`PersistMode::SyncAll`]).

use crate::Error;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use sha3::{Digest, Sha3_256};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Chunk size: 1 MiB (the last chunk of a blob may be shorter).
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Largest blob accepted: 64 GiB, whose manifest (32 bytes a chunk) is
/// 2 MiB and still fits one peer message.
pub const MAX_BLOB_BYTES: u64 = 64 * 1024 * 1024 * 1024;
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

/// Version of the blob store's layout.
pub const BLOB_SCHEMA_VERSION: u32 = 1;

const META_SCHEMA: &[u8] = b"schema_version";

fn sha3(bytes: &[u8]) -> [u8; 32] {
    Sha3_256::digest(bytes).into()
}

/// A blob's id: SHA3-256 of its payload. Text form: 64 lowercase hex digits
/// (a `0x` prefix is accepted when parsing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    pub fn of(bytes: &[u8]) -> BlobId {
        BlobId(sha3(bytes))
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

    /// The exact length of chunk `index`.
    pub fn chunk_len(&self, index: u32) -> usize {
        let start = index as u64 * CHUNK_BYTES as u64;
        (self.total_bytes - start).min(CHUNK_BYTES as u64) as usize
    }
}

/// Default size of the verified-chunk cache in front of the store (the
/// seed's `expert_cache_size`, scaled to a devnet).
pub const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

/// The blob store. See the module docs.
pub struct BlobStore {
    /// Verified chunks recently read (the weight cache, SYNC-2): a hit skips
    /// the read and the hash check; bounded in bytes.
    cache: blyan_sync::ByteCache<([u8; 32], u32)>,
    db: Database,
    manifests: Keyspace,
    chunks: Keyspace,
    complete: Keyspace,
}

fn storage(e: fjall::Error) -> Error {
    Error::Storage(e.to_string())
}

fn chunk_key(id: &BlobId, index: u32) -> [u8; 36] {
    let mut k = [0u8; 36];
    k[..32].copy_from_slice(&id.0);
    k[32..].copy_from_slice(&index.to_be_bytes());
    k
}

impl BlobStore {
    /// Opens (or creates) the store at `path`, refusing another schema version.
    pub fn open(path: &Path) -> Result<BlobStore, Error> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// [`BlobStore::open`] with a cache of at most `cache_bytes` of verified chunks.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<BlobStore, Error> {
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
            db,
        };
        match meta.get(META_SCHEMA).map_err(storage)? {
            None => {
                let mut b = store.db.batch().durability(Some(PersistMode::SyncAll));
                b.insert(
                    &meta,
                    META_SCHEMA,
                    BLOB_SCHEMA_VERSION.to_be_bytes().to_vec(),
                );
                b.commit().map_err(storage)?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(
                    v.as_ref()
                        .try_into()
                        .map_err(|_| Error::Corrupt("blob schema version".into()))?,
                );
                if found != BLOB_SCHEMA_VERSION {
                    return Err(Error::UnsupportedSchema {
                        found,
                        supported: BLOB_SCHEMA_VERSION,
                    });
                }
            }
        }
        Ok(store)
    }

    /// Stores `bytes` (idempotent) and returns its id.
    pub fn put(&self, bytes: &[u8]) -> Result<BlobId, Error> {
        let id = BlobId::of(bytes);
        let manifest = BlobManifest::of(bytes);
        manifest.validate()?;
        if self.has(&id)? {
            return Ok(id);
        }
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.manifests, id.0, manifest.encode());
        for (i, c) in bytes.chunks(CHUNK_BYTES).enumerate() {
            b.insert(&self.chunks, chunk_key(&id, i as u32), c.to_vec());
        }
        b.insert(&self.complete, id.0, Vec::new());
        b.commit().map_err(storage)?;
        Ok(id)
    }

    /// Whether the whole blob is present and was verified.
    pub fn has(&self, id: &BlobId) -> Result<bool, Error> {
        self.complete.contains_key(id.0).map_err(storage)
    }

    /// The manifest, if this store knows the blob (complete or not).
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
    /// manifest is unknown.
    pub fn missing_chunks(&self, id: &BlobId) -> Result<Option<Vec<u32>>, Error> {
        let Some(manifest) = self.manifest(id)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for i in 0..manifest.chunk_hashes.len() as u32 {
            if !self
                .chunks
                .contains_key(chunk_key(id, i))
                .map_err(storage)?
            {
                out.push(i);
            }
        }
        Ok(Some(out))
    }

    /// Stores a received chunk after checking it against `manifest` (which
    /// must agree with a manifest already stored for `id`). Returns whether
    /// the blob is now complete; completing it checks the whole payload
    /// against `id`, and a mismatch deletes the blob's chunks.
    pub fn put_chunk(
        &self,
        id: &BlobId,
        manifest: &BlobManifest,
        index: u32,
        bytes: &[u8],
    ) -> Result<bool, Error> {
        manifest.validate()?;
        if self.has(id)? {
            return Ok(true);
        }
        if let Some(stored) = self.manifest(id)?
            && stored != *manifest
        {
            return Err(Error::BlobManifestInvalid(format!(
                "blob {id}: differs from the manifest already stored"
            )));
        }
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
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.manifests, id.0, manifest.encode());
        b.insert(&self.chunks, chunk_key(id, index), bytes.to_vec());
        b.commit().map_err(storage)?;
        if self.missing_chunks(id)?.is_some_and(|m| m.is_empty()) {
            self.complete_blob(id, manifest)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Checks the assembled payload against the id: marks it complete, or
    /// deletes every chunk and the manifest.
    fn complete_blob(&self, id: &BlobId, manifest: &BlobManifest) -> Result<(), Error> {
        let mut hasher = Sha3_256::new();
        for i in 0..manifest.chunk_hashes.len() as u32 {
            let c = self
                .read_chunk(id, manifest, i)?
                .ok_or_else(|| Error::BlobCorrupt {
                    id: id.to_string(),
                    what: format!("chunk {i} vanished"),
                })?;
            hasher.update(&c);
        }
        let whole: [u8; 32] = hasher.finalize().into();
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        if whole == id.0 {
            b.insert(&self.complete, id.0, Vec::new());
            b.commit().map_err(storage)?;
            return Ok(());
        }
        b.remove(&self.manifests, id.0);
        for i in 0..manifest.chunk_hashes.len() as u32 {
            b.remove(&self.chunks, chunk_key(id, i));
        }
        b.commit().map_err(storage)?;
        Err(Error::BlobHashMismatch(id.to_string()))
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
