//! Rough numbers for the P2P transport on loopback: mutual-TLS handshake
//! (TCP, TLS 1.3, HTTP/2) time, `Deliver` frames per second, and blob
//! streaming throughput.
//!
//! ```sh
//! cargo run --release -p blyan-runtime --example p2p_measure
//! ```
//!
//! Two transports (validators `key(1)` and `key(2)`) in this process; the
//! client side is node 1 dialling node 2. One run, no statistics: a sanity
//! check of orders of magnitude, not a benchmark.
use blyan_runtime::blobs::BlobStore;
use blyan_runtime::tls::{NodeCertificate, PeerCertVerifier};
use blyan_runtime::transport::{GrpcTransport, Peer, PeerClient, TransportConfig, now_ms, seal};
use blyan_state_machine::node::WireMessage;
use blyan_state_machine::testkit::{address, key};
use blyan_state_machine::tx::public_key_of;
use bytes::Bytes;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const CHAIN: &str = "blyan-measure";

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let la = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let b_addr = lb.local_addr().expect("addr").to_string();
    let peers = vec![
        Peer {
            addr: la.local_addr().expect("addr").to_string(),
            public_key: public_key_of(&key(1)),
        },
        Peer {
            addr: b_addr.clone(),
            public_key: public_key_of(&key(2)),
        },
    ];
    let config = TransportConfig::new(CHAIN.into(), peers);
    let mut tasks = JoinSet::new();
    let a_store = Arc::new(BlobStore::open(&dir.path().join("a")).expect("store"));
    let b_store = Arc::new(BlobStore::open(&dir.path().join("b")).expect("store"));
    let (txa, _rxa) = mpsc::channel(1024);
    let (txb, mut rxb) = mpsc::channel(1 << 20);
    let a = GrpcTransport::start(
        la,
        key(1),
        config.clone(),
        txa,
        Some(a_store.clone()),
        &mut tasks,
    )
    .expect("start a");
    let _b = GrpcTransport::start(lb, key(2), config, txb, Some(b_store.clone()), &mut tasks)
        .expect("start b");
    tokio::spawn(async move { while rxb.recv().await.is_some() {} });

    let allowed: BTreeSet<_> = [address(&key(1)), address(&key(2))].into();
    let verifier = Arc::new(PeerCertVerifier::new(CHAIN.into(), allowed.clone()));
    let cert = NodeCertificate::generate(&key(1), CHAIN).expect("cert");
    let connect = || {
        PeerClient::connect(
            &b_addr,
            Some(&cert),
            verifier.clone(),
            CHAIN,
            &allowed,
            address(&key(2)),
        )
    };
    connect().await.expect("warm-up connect");
    let n = 50;
    let start = Instant::now();
    let mut client = None;
    for _ in 0..n {
        client = Some(connect().await.expect("connect"));
    }
    let handshake_ms = start.elapsed().as_secs_f64() * 1000.0 / n as f64;
    println!("handshake (TCP + TLS 1.3 mutual + HTTP/2): {handshake_ms:.2} ms each over {n}");

    let client = client.expect("a client");
    for batch in [1usize, 100] {
        let messages: Vec<WireMessage> = (0..batch as u64)
            .map(|h| WireMessage::BlockRequest { from_height: h })
            .collect();
        let frames = 2_000 / batch.max(10) * 10;
        let start = Instant::now();
        for _ in 0..frames {
            let f = Bytes::from(seal(&key(1), CHAIN, now_ms(), &messages)).slice(4..);
            client.deliver(f).await.expect("deliver");
        }
        let s = start.elapsed().as_secs_f64();
        println!(
            "deliver, {batch} message(s) per frame: {:.0} frames/s, {:.0} messages/s (sequential, signing included)",
            frames as f64 / s,
            (frames * batch) as f64 / s
        );
    }

    let blob_bytes = 64 * 1024 * 1024;
    let payload: Vec<u8> = (0..blob_bytes)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
        .collect();
    let id = b_store.put(&payload).expect("put");
    let start = Instant::now();
    let p = a
        .fetch_blob(address(&key(2)), &id, &a_store, None)
        .await
        .expect("fetch");
    let s = start.elapsed().as_secs_f64();
    assert!(p.complete);
    println!(
        "blob fetch: {} MiB in {:.2} s = {:.0} MiB/s (gzip, each chunk hashed and synced to disk)",
        blob_bytes >> 20,
        s,
        (blob_bytes >> 20) as f64 / s
    );
}
