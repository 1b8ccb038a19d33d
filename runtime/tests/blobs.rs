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

    // A self-consistent manifest for other bytes under this id: every chunk
    // matches the manifest, the whole does not match the id: all discarded.
    let lie = payload(CHUNK_BYTES + 1, 4);
    let lie_m = BlobManifest::of(&lie);
    let wrong_id = BlobId::of(b"some other blob");
    assert!(
        !store
            .put_chunk(&wrong_id, &lie_m, 0, &lie[..CHUNK_BYTES])
            .unwrap()
    );
    let e = store
        .put_chunk(&wrong_id, &lie_m, 1, &lie[CHUNK_BYTES..])
        .unwrap_err();
    assert!(matches!(e, Error::BlobHashMismatch(_)), "{e}");
    assert_eq!(store.missing_chunks(&wrong_id).unwrap(), None);
    assert!(!store.has(&wrong_id).unwrap());
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
async fn a_peer_chunk_that_does_not_match_the_manifest_is_refused() {
    let p = pair().await;
    let bytes = payload(3 * CHUNK_BYTES, 6);
    let id = p.b_store.put(&bytes).unwrap();
    // A holds a manifest for the id that disagrees with the peer's chunk 1
    // (seeded through chunk 2, which both agree on).
    let mut m = BlobManifest::of(&bytes);
    m.chunk_hashes[1] = [0x11; 32];
    assert!(
        !p.a_store
            .put_chunk(&id, &m, 2, &bytes[2 * CHUNK_BYTES..])
            .unwrap()
    );
    let e =
        p.a.fetch_blob(address(&key(2)), &id, &p.a_store, None)
            .await
            .unwrap_err();
    assert!(
        matches!(e, Error::BlobChunkRejected { index: 1, .. }),
        "{e}"
    );
    // Chunk 0 (matching) was kept; chunk 1 was not.
    assert_eq!(p.a_store.missing_chunks(&id).unwrap(), Some(vec![1]));
    assert!(!p.a_store.has(&id).unwrap());
}
