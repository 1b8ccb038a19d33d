//! The content-addressed blob store (blobs.rs) and blob streaming between
//! two transports (transport.rs): chunks are verified on write, on read and
//! on receipt; an interrupted fetch resumes from the first missing chunk; a
//! peer's chunk that does not match the manifest is refused.
use blyan_runtime::Error;
use blyan_runtime::blobs::{BlobId, BlobManifest, BlobStore, CHUNK_BYTES, blob_dir};
use blyan_runtime::transport::{GrpcTransport, Peer, TransportConfig};
use blyan_state_machine::testkit::{address, key};
use blyan_state_machine::tx::public_key_of;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// `len` bytes that do not repeat (so chunks differ and gzip cannot cheat).
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn open(dir: &tempfile::TempDir, name: &str) -> Arc<BlobStore> {
    Arc::new(BlobStore::open(&dir.path().join(name)).unwrap())
}

#[test]
fn put_then_get_round_trips_in_chunks_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "blobs");
    let bytes = payload(2 * CHUNK_BYTES + CHUNK_BYTES / 2, 1);
    let id = store.put(&bytes).unwrap();
    assert_eq!(id, BlobId::of(&bytes));
    assert_eq!(store.put(&bytes).unwrap(), id);
    assert!(store.has(&id).unwrap());
    let m = store.manifest(&id).unwrap().unwrap();
    assert_eq!(m, BlobManifest::of(&bytes));
    assert_eq!(
        (m.total_bytes, m.chunk_hashes.len()),
        (bytes.len() as u64, 3)
    );
    assert_eq!(m.chunk_len(2), CHUNK_BYTES / 2);
    assert_eq!(store.get(&id).unwrap().unwrap(), bytes);
    assert_eq!(
        store.get_chunk(&id, 1).unwrap().unwrap(),
        &bytes[CHUNK_BYTES..2 * CHUNK_BYTES]
    );
    assert_eq!(store.get_chunk(&id, 3).unwrap(), None);
    assert_eq!(store.missing_chunks(&id).unwrap(), Some(vec![]));
    // Text form round-trips; unknown blobs are absent, not errors.
    assert_eq!(id.to_string().parse::<BlobId>().unwrap(), id);
    assert_eq!(format!("0x{id}").parse::<BlobId>().unwrap(), id);
    assert!(matches!(
        "zz".parse::<BlobId>(),
        Err(Error::BlobManifestInvalid(_))
    ));
    let other = BlobId::of(b"never stored");
    assert_eq!(store.get(&other).unwrap(), None);
    assert_eq!(store.missing_chunks(&other).unwrap(), None);
    // The empty blob has no chunks.
    let empty = store.put(&[]).unwrap();
    assert_eq!(store.get(&empty).unwrap().unwrap(), Vec::<u8>::new());
    // Reopening keeps everything.
    drop(store);
    let store = open(&dir, "blobs");
    assert_eq!(store.get(&id).unwrap().unwrap(), bytes);
}

#[test]
fn corruption_on_disk_is_detected_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "blobs");
    let bytes = payload(CHUNK_BYTES + 10, 2);
    let id = store.put(&bytes).unwrap();
    let mut bad = bytes[CHUNK_BYTES..].to_vec();
    bad[3] ^= 1;
    store.corrupt_chunk_for_test(&id, 1, &bad).unwrap();
    let e = store.get(&id).unwrap_err();
    assert!(
        matches!(e, Error::BlobCorrupt { ref what, .. } if what.contains("chunk 1")),
        "{e}"
    );
    assert!(matches!(
        store.get_chunk(&id, 1),
        Err(Error::BlobCorrupt { .. })
    ));
    // The intact chunk still reads.
    assert_eq!(
        store.get_chunk(&id, 0).unwrap().unwrap(),
        &bytes[..CHUNK_BYTES]
    );
}

#[test]
fn received_chunks_are_checked_against_the_manifest_and_the_whole_hash() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "blobs");
    let bytes = payload(2 * CHUNK_BYTES + 7, 3);
    let id = BlobId::of(&bytes);
    let m = BlobManifest::of(&bytes);
    let chunk = |i: usize| &bytes[i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(bytes.len())];

    // Wrong bytes, wrong length, an index past the end: refused, nothing stored.
    let mut flipped = chunk(0).to_vec();
    flipped[0] ^= 0x80;
    for (index, data, what) in [
        (0u32, flipped.as_slice(), "hash"),
        (0, &chunk(0)[1..], "bytes"),
        (3, chunk(2), "chunks"),
    ] {
        let e = store.put_chunk(&id, &m, index, data).unwrap_err();
        assert!(
            matches!(e, Error::BlobChunkRejected { ref why, .. } if why.contains(what)),
            "{what}: {e}"
        );
    }
    assert_eq!(store.missing_chunks(&id).unwrap(), None);

    // A manifest whose count disagrees with its length is invalid.
    let mut short = m.clone();
    short.chunk_hashes.pop();
    assert!(matches!(
        store.put_chunk(&id, &short, 0, chunk(0)),
        Err(Error::BlobManifestInvalid(_))
    ));
    assert!(BlobManifest::decode(&short.encode()).is_err());
    assert_eq!(BlobManifest::decode(&m.encode()).unwrap(), m);

    // Good chunks in any order; the last one completes the blob.
    assert!(!store.put_chunk(&id, &m, 2, chunk(2)).unwrap());
    assert_eq!(store.missing_chunks(&id).unwrap(), Some(vec![0, 1]));
    assert!(!store.has(&id).unwrap());
    // Once a manifest is stored, a different one for the same id is refused.
    let mut other = m.clone();
    other.chunk_hashes[0] = [7; 32];
    assert!(matches!(
        store.put_chunk(&id, &other, 0, chunk(0)),
        Err(Error::BlobManifestInvalid(_))
    ));
    assert!(!store.put_chunk(&id, &m, 0, chunk(0)).unwrap());
    assert!(store.put_chunk(&id, &m, 1, chunk(1)).unwrap());
    assert_eq!(store.get(&id).unwrap().unwrap(), bytes);

    // NODE-NET-8: a self-consistent manifest for other bytes under this id
    // does not name it: refused before anything is stored.
    let lie = payload(CHUNK_BYTES + 1, 4);
    let lie_m = BlobManifest::of(&lie);
    let wrong_id = BlobId::of(b"some other blob");
    let e = store
        .put_chunk(&wrong_id, &lie_m, 0, &lie[..CHUNK_BYTES])
        .unwrap_err();
    assert!(matches!(e, Error::BlobManifestInvalid(_)), "{e}");
    assert_eq!(store.missing_chunks(&wrong_id).unwrap(), None);
    assert!(!store.has(&wrong_id).unwrap());
    // The id is the manifest's hash.
    assert_eq!(BlobId::of(&lie), lie_m.id());
}

#[test]
fn the_blob_directory_sits_beside_the_chain_store() {
    let d = std::path::Path::new("/x/node-0/data");
    assert_eq!(blob_dir(d), std::path::Path::new("/x/node-0/data-blobs"));
}

/// Two transports for validators `key(1)` and `key(2)` on loopback, with
/// their own blob stores.
struct Pair {
    a: Arc<GrpcTransport>,
    b_store: Arc<BlobStore>,
    a_store: Arc<BlobStore>,
    _tasks: JoinSet<()>,
    _inbound: Vec<mpsc::Receiver<blyan_runtime::transport::Inbound>>,
    _dir: tempfile::TempDir,
}

async fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peers = vec![
        Peer {
            addr: la.local_addr().unwrap().to_string(),
            public_key: public_key_of(&key(1)),
        },
        Peer {
            addr: lb.local_addr().unwrap().to_string(),
            public_key: public_key_of(&key(2)),
        },
    ];
    let config = TransportConfig::new("blyan-test".into(), peers);
    let mut tasks = JoinSet::new();
    let (a_store, b_store) = (open(&dir, "a"), open(&dir, "b"));
    let (txa, rxa) = mpsc::channel(64);
    let (txb, rxb) = mpsc::channel(64);
    let a = GrpcTransport::start(
        la,
        key(1),
        config.clone(),
        txa,
        Some(a_store.clone()),
        &mut tasks,
    )
    .unwrap();
    let _b =
        GrpcTransport::start(lb, key(2), config, txb, Some(b_store.clone()), &mut tasks).unwrap();
    Pair {
        a,
        a_store,
        b_store,
        _tasks: tasks,
        _inbound: vec![rxa, rxb],
        _dir: dir,
    }
}

/// `n` transports for validators `key(1)..=key(n)` on loopback, each with
/// its own blob store.
struct Net {
    transports: Vec<Arc<GrpcTransport>>,
    stores: Vec<Arc<BlobStore>>,
    _tasks: JoinSet<()>,
    _inbound: Vec<mpsc::Receiver<blyan_runtime::transport::Inbound>>,
    _dir: tempfile::TempDir,
}

async fn net(n: u64) -> Net {
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let peers = (1..=n)
        .zip(&listeners)
        .map(|(i, l)| Peer {
            addr: l.local_addr().unwrap().to_string(),
            public_key: public_key_of(&key(i)),
        })
        .collect();
    let config = TransportConfig::new("blyan-test".into(), peers);
    let mut tasks = JoinSet::new();
    let (mut transports, mut stores, mut inbound) = (Vec::new(), Vec::new(), Vec::new());
    for (i, l) in (1..=n).zip(listeners) {
        let store = open(&dir, &format!("s{i}"));
        let (tx, rx) = mpsc::channel(64);
        let t = GrpcTransport::start(
            l,
            key(i),
            config.clone(),
            tx,
            Some(store.clone()),
            &mut tasks,
        )
        .unwrap();
        transports.push(t);
        stores.push(store);
        inbound.push(rx);
    }
    Net {
        transports,
        stores,
        _tasks: tasks,
        _inbound: inbound,
        _dir: dir,
    }
}

/// NODE-NET-8 (issue 18 item 12): a lying peer's manifest, fetched first,
/// must not block the honest peer's chunks afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_net_8_a_lying_peers_manifest_does_not_block_an_honest_peer() {
    let n = net(3).await;
    let (fetcher, honest, liar) = (&n.stores[0], &n.stores[1], &n.stores[2]);
    let bytes = payload(3 * CHUNK_BYTES + 17, 9);
    let id = honest.put(&bytes).unwrap();
    // The liar claims the same id with a manifest of other bytes, whose
    // chunk 0 it can serve.
    let lie = payload(3 * CHUNK_BYTES + 17, 10);
    let lie_m = BlobManifest::of(&lie);
    liar.put_manifest_unchecked_for_test(&id, &lie_m).unwrap();
    liar.corrupt_chunk_for_test(&id, 0, &lie[..CHUNK_BYTES])
        .unwrap();
    let t = &n.transports[0];
    // The liar's fetch stops after its one chunk, or is refused outright.
    let _ = t.fetch_blob(address(&key(3)), &id, fetcher, None).await;
    let done = t
        .fetch_blob(address(&key(2)), &id, fetcher, None)
        .await
        .unwrap();
    assert!(done.complete, "{done:?}");
    assert_eq!(fetcher.get(&id).unwrap().unwrap(), bytes);
}

/// NODE-NET-8 (issue 18 item 12): the store itself: chunks stored under a
/// lying manifest first must not block the true manifest's chunks.
#[test]
fn node_net_8_a_lying_manifest_cannot_block_the_true_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "blobs");
    let bytes = payload(2 * CHUNK_BYTES + 5, 11);
    let id = BlobId::of(&bytes);
    let m = BlobManifest::of(&bytes);
    let chunk = |i: usize| &bytes[i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(bytes.len())];
    let mut lie = m.clone();
    lie.chunk_hashes[1] = [0x11; 32];
    // Before the fix this was stored and every true chunk 1 was refused.
    let _ = store.put_chunk(&id, &lie, 0, chunk(0));
    for i in 0..3 {
        store
            .put_chunk(&id, &m, i as u32, chunk(i))
            .unwrap_or_else(|e| panic!("true chunk {i} refused: {e}"));
    }
    assert_eq!(store.get(&id).unwrap().unwrap(), bytes);
}

/// NODE-NET-9 (issue 18 item 12): storing a blob's chunks one by one looks
/// each chunk up a bounded number of times, not once per chunk per chunk.
#[test]
fn node_net_9_storing_chunks_is_not_quadratic() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "blobs");
    let chunks = 32usize;
    let bytes: Vec<u8> = (0..chunks * CHUNK_BYTES)
        .map(|i| (i / CHUNK_BYTES) as u8)
        .collect();
    let id = BlobId::of(&bytes);
    let m = BlobManifest::of(&bytes);
    let before = store.chunk_probes_for_test();
    for (i, c) in bytes.chunks(CHUNK_BYTES).enumerate() {
        let complete = store.put_chunk(&id, &m, i as u32, c).unwrap();
        assert_eq!(complete, i + 1 == chunks);
    }
    let probes = store.chunk_probes_for_test() - before;
    assert!(
        probes <= 2 * chunks as u64,
        "{probes} chunk lookups to store {chunks} chunks"
    );
    assert_eq!(store.get(&id).unwrap().unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_fetch_resumes_from_the_first_missing_chunk() {
    let p = pair().await;
    let bytes = payload(4 * CHUNK_BYTES + 123, 5);
    let id = p.b_store.put(&bytes).unwrap();
    let b = address(&key(2));

    // Interrupted after two chunks.
    let first = p.a.fetch_blob(b, &id, &p.a_store, Some(2)).await.unwrap();
    assert_eq!(
        (first.received_chunks, first.from_chunk, first.complete),
        (2, 0, false)
    );
    assert_eq!(p.a_store.missing_chunks(&id).unwrap(), Some(vec![2, 3, 4]));
    assert_eq!(p.a_store.get(&id).unwrap(), None);

    // Resumed: asks from chunk 2, receives only the three missing, verified.
    let second = p.a.fetch_blob(b, &id, &p.a_store, None).await.unwrap();
    assert_eq!(
        (second.received_chunks, second.from_chunk, second.complete),
        (3, 2, true)
    );
    assert_eq!(p.a_store.get(&id).unwrap().unwrap(), bytes);
    // Already complete: nothing to fetch.
    let third = p.a.fetch_blob(b, &id, &p.a_store, None).await.unwrap();
    assert_eq!((third.received_chunks, third.complete), (0, true));

    // A blob the peer does not have.
    let e =
        p.a.fetch_blob(b, &BlobId::of(b"absent"), &p.a_store, None)
            .await
            .unwrap_err();
    assert!(matches!(e, Error::BlobUnavailable(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_that_does_not_name_the_blob_is_refused_and_the_fetch_completes() {
    let p = pair().await;
    let bytes = payload(3 * CHUNK_BYTES, 6);
    let id = p.b_store.put(&bytes).unwrap();
    // A manifest for the id that disagrees with the peer's chunk 1 (before
    // NODE-NET-8 it was stored with chunk 2, and every fetch then stopped at
    // chunk 1 for good).
    let mut m = BlobManifest::of(&bytes);
    m.chunk_hashes[1] = [0x11; 32];
    let e = p
        .a_store
        .put_chunk(&id, &m, 2, &bytes[2 * CHUNK_BYTES..])
        .unwrap_err();
    assert!(matches!(e, Error::BlobManifestInvalid(_)), "{e}");
    assert_eq!(p.a_store.missing_chunks(&id).unwrap(), None);
    let done =
        p.a.fetch_blob(address(&key(2)), &id, &p.a_store, None)
            .await
            .unwrap();
    assert!(done.complete);
    assert_eq!(p.a_store.get(&id).unwrap().unwrap(), bytes);
}

/// NODE-NET-10: the store's quota, pending payloads' quota, and the
/// garbage collection of payloads whose block never committed.
#[test]
fn node_net_10_quotas_and_garbage_collection_of_pending_payloads() {
    use blyan_runtime::blobs::{GarbageReport, Pending};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let quota = 3 * CHUNK_BYTES as u64;
    let store = BlobStore::open_with_limits(&path, 1 << 20, quota).unwrap();
    let (a, b, c) = (
        payload(CHUNK_BYTES + 1, 20),
        payload(CHUNK_BYTES + 1, 21),
        payload(CHUNK_BYTES, 22),
    );
    let pending = |block: u8, expires_at_ms| Pending {
        pol_block: [block; 32],
        expires_at_ms,
    };
    let max_pending = 2 * CHUNK_BYTES as u64;
    let id_a = store
        .put_pending(&a, pending(1, 1_000), max_pending)
        .unwrap();
    assert!(store.is_pending(&id_a).unwrap());
    // A second pending payload would exceed the pending quota.
    let e = store
        .put_pending(&b, pending(2, 1_000), max_pending)
        .unwrap_err();
    assert!(matches!(e, Error::BlobQuotaExceeded(_)), "{e}");
    assert!(
        store
            .check_pending_room(b.len() as u64, max_pending)
            .is_err()
    );
    assert!(!store.has(&BlobId::of(&b)).unwrap(), "nothing was written");
    // Kept blobs count against the store's quota.
    let id_c = store.put(&c).unwrap();
    let e = store.put(&b).unwrap_err();
    assert!(matches!(e, Error::BlobQuotaExceeded(_)), "{e}");
    assert_eq!(
        store.usage_bytes(),
        (a.len() as u64 + c.len() as u64, a.len() as u64)
    );
    // Before its deadline a pending payload stays; at it, it goes.
    assert_eq!(
        store.collect_garbage(999, |_| false).unwrap(),
        GarbageReport::default()
    );
    assert_eq!(store.collect_garbage(1_000, |_| false).unwrap().deleted, 1);
    assert!(!store.has(&id_a).unwrap());
    assert_eq!(store.get(&id_a).unwrap(), None);
    assert_eq!(store.usage_bytes(), (c.len() as u64, 0));
    // One whose block committed is kept for good.
    let id_b = store
        .put_pending(&b, pending(2, 1_000), max_pending)
        .unwrap();
    let report = store.collect_garbage(5_000, |blk| *blk == [2; 32]).unwrap();
    assert_eq!(
        report,
        GarbageReport {
            kept: 1,
            deleted: 0
        }
    );
    assert!(store.has(&id_b).unwrap() && !store.is_pending(&id_b).unwrap());
    assert!(store.has(&id_c).unwrap());
    // The accounting survives a restart.
    drop(store);
    let store = BlobStore::open_with_limits(&path, 1 << 20, quota).unwrap();
    assert_eq!(store.usage_bytes(), ((b.len() + c.len()) as u64, 0));
    assert_eq!(store.get(&id_b).unwrap().unwrap(), b);
}

/// NODE-NET-8/9: a partly fetched blob resumes after a restart, and the
/// count of chunks present survives it.
#[test]
fn node_net_9_a_partial_blob_completes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = payload(3 * CHUNK_BYTES + 3, 30);
    let (id, m) = (BlobId::of(&bytes), BlobManifest::of(&bytes));
    let chunks: Vec<&[u8]> = bytes.chunks(CHUNK_BYTES).collect();
    let store = open(&dir, "p");
    assert!(!store.put_chunk(&id, &m, 3, chunks[3]).unwrap());
    assert!(!store.put_chunk(&id, &m, 0, chunks[0]).unwrap());
    assert!(
        !store.put_chunk(&id, &m, 0, chunks[0]).unwrap(),
        "a repeat counts once"
    );
    drop(store);
    let store = open(&dir, "p");
    assert_eq!(store.missing_chunks(&id).unwrap(), Some(vec![1, 2]));
    assert!(!store.put_chunk(&id, &m, 1, chunks[1]).unwrap());
    assert!(store.put_chunk(&id, &m, 2, chunks[2]).unwrap());
    assert_eq!(store.get(&id).unwrap().unwrap(), bytes);
}

/// NODE-NET-8: a schema-1 store (blobs named by the SHA3-256 of their
/// payload) is migrated on open: complete blobs are renamed, incomplete
/// ones dropped.
#[test]
fn node_net_8_a_schema_1_store_is_migrated() {
    use sha3::{Digest, Sha3_256};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1");
    let whole = payload(2 * CHUNK_BYTES + 9, 40);
    let part = payload(2 * CHUNK_BYTES, 41);
    let old_id = |b: &[u8]| -> [u8; 32] { Sha3_256::digest(b).into() };
    let key = |id: &[u8; 32], i: u32| [id.as_slice(), &i.to_be_bytes()].concat();
    {
        let db = fjall::Database::builder(&path).open().unwrap();
        let ks = |n: &str| {
            db.keyspace(n, fjall::KeyspaceCreateOptions::default)
                .unwrap()
        };
        let (meta, manifests, chunks, complete) = (
            ks("blob_meta"),
            ks("blob_manifests"),
            ks("blob_chunks"),
            ks("blob_complete"),
        );
        meta.insert(b"schema_version", 1u32.to_be_bytes()).unwrap();
        for (p, done) in [(&whole, true), (&part, false)] {
            let id = old_id(p);
            manifests.insert(id, BlobManifest::of(p).encode()).unwrap();
            let n = if done { 3 } else { 1 };
            for (i, c) in p.chunks(CHUNK_BYTES).enumerate().take(n) {
                chunks.insert(key(&id, i as u32), c).unwrap();
            }
            if done {
                complete.insert(id, b"").unwrap();
            }
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let store = open(&dir, "v1");
    assert_eq!(store.get(&BlobId::of(&whole)).unwrap().unwrap(), whole);
    assert_eq!(store.manifest(&BlobId(old_id(&whole))).unwrap(), None);
    assert_eq!(store.missing_chunks(&BlobId(old_id(&part))).unwrap(), None);
    assert_eq!(store.missing_chunks(&BlobId::of(&part)).unwrap(), None);
    assert_eq!(store.usage_bytes(), (whole.len() as u64, 0));
    drop(store);
    // Reopening (schema 2 now) changes nothing.
    let store = open(&dir, "v1");
    assert_eq!(store.get(&BlobId::of(&whole)).unwrap().unwrap(), whole);
}

#[tokio::test]
async fn node_net_12_payloads_are_found_by_their_pol_root_locally_and_from_peers() {
    use blyan_runtime::blobs::Pending;
    use blyan_state_machine::pol::payload_merkle_root;
    let p = pair().await;
    let bytes = payload(CHUNK_BYTES + 99, 40);
    let root = payload_merkle_root(&bytes);
    assert_eq!(p.a_store.by_pol_root(&root).unwrap(), None);
    // Not held anywhere: a clear error, nothing stored.
    let e = p.a.fetch_payload(&root, &p.a_store).await.unwrap_err();
    assert!(matches!(e, Error::BlobUnavailable(_)), "{e}");
    // Held by the peer: fetched, checked against the root, indexed here too.
    let id = p.b_store.put(&bytes).unwrap();
    assert_eq!(p.b_store.by_pol_root(&root).unwrap(), Some(id));
    assert_eq!(p.a.fetch_payload(&root, &p.a_store).await.unwrap(), bytes);
    assert_eq!(p.a_store.by_pol_root(&root).unwrap(), Some(id));
    // A pending payload deleted by the garbage collector leaves the index.
    let other = payload(100, 41);
    let other_root = payload_merkle_root(&other);
    let pending = Pending {
        pol_block: [9; 32],
        expires_at_ms: 10,
    };
    p.a_store.put_pending(&other, pending, 1 << 30).unwrap();
    assert!(p.a_store.by_pol_root(&other_root).unwrap().is_some());
    p.a_store.collect_garbage(11, |_| false).unwrap();
    assert_eq!(p.a_store.by_pol_root(&other_root).unwrap(), None);
}

#[test]
fn node_net_12_the_root_index_persists_and_a_store_without_it_is_indexed_on_open() {
    use blyan_state_machine::pol::payload_merkle_root;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blobs");
    let bytes = payload(300, 42);
    let root = payload_merkle_root(&bytes);
    let id = BlobStore::open(&path).unwrap().put(&bytes).unwrap();
    assert_eq!(
        BlobStore::open(&path).unwrap().by_pol_root(&root).unwrap(),
        Some(id)
    );
    // Without the index (a store written by an older version): rebuilt on open.
    {
        let db = fjall::Database::builder(&path).open().unwrap();
        let ks = |n: &str| {
            db.keyspace(n, fjall::KeyspaceCreateOptions::default)
                .unwrap()
        };
        let mut b = db.batch().durability(Some(fjall::PersistMode::SyncAll));
        b.remove(&ks("blob_pol_roots"), root);
        b.remove(&ks("blob_meta"), b"pol_roots_indexed");
        b.commit().unwrap();
    }
    assert_eq!(
        BlobStore::open(&path).unwrap().by_pol_root(&root).unwrap(),
        Some(id)
    );
}
