//! Peer frames (transport.rs) and the configuration file (config.rs): every
//! bad frame is refused with its own error, and only garbage closes the
//! connection.
use blyan_runtime::Error;
use blyan_runtime::config::FileConfig;
use blyan_runtime::transport::{
    MAX_BATCH_MESSAGES, MAX_CLOCK_SKEW_MS, MAX_FRAME_BYTES, open, seal, seal_encoded,
};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::node::{PeerId, WireMessage};
use blyan_state_machine::testkit::{address, key};
use blyan_state_machine::tx::{PublicKey, public_key_of};
use std::collections::BTreeMap;

const CHAIN: &str = "blyan-test";
const NOW_MS: u64 = 1_800_000_000_000;

fn peers() -> BTreeMap<PublicKey, PeerId> {
    (0..3)
        .map(|i| (public_key_of(&key(i)), address(&key(i))))
        .collect()
}

fn msg() -> WireMessage {
    WireMessage::BlockRequest { from_height: 42 }
}

/// The frame body (without the 4-byte length prefix).
fn body(frame: Vec<u8>) -> Vec<u8> {
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4);
    frame[4..].to_vec()
}

#[test]
fn a_sealed_frame_opens_to_its_sender_and_message() {
    let f = body(seal(&key(1), CHAIN, NOW_MS, &[msg()]));
    let (from, m) = open(&f, CHAIN, &peers(), NOW_MS + MAX_CLOCK_SKEW_MS).unwrap();
    assert_eq!((from, m), (address(&key(1)), vec![msg()]));
}

#[test]
fn a_batch_opens_to_its_messages_in_order() {
    let msgs: Vec<WireMessage> = (0..5)
        .map(|h| WireMessage::BlockRequest { from_height: h })
        .collect();
    let f = body(seal(&key(2), CHAIN, NOW_MS, &msgs));
    let (from, m) = open(&f, CHAIN, &peers(), NOW_MS).unwrap();
    assert_eq!((from, m), (address(&key(2)), msgs));
}

/// A signed frame with `payload` as its batch: the signature verifies.
fn signed_frame(payload: &[u8]) -> Vec<u8> {
    use blyan_state_machine::crypto::sign;
    use blyan_state_machine::tx::{Domain, signing_bytes};
    let k = key(2);
    let mut signed = NOW_MS.to_be_bytes().to_vec();
    signed.extend_from_slice(payload);
    let sig = sign(&k, &signing_bytes(Domain::PeerMessage, CHAIN, &signed));
    let mut f = vec![2u8];
    f.extend_from_slice(&public_key_of(&k));
    f.extend_from_slice(&NOW_MS.to_be_bytes());
    f.extend_from_slice(&sig);
    f.extend_from_slice(payload);
    f
}

#[test]
fn signed_batches_with_bad_counts_or_lengths_are_malformed() {
    let one = msg().encode();
    let batch = |count: u32, parts: &[&[u8]]| {
        let mut p = count.to_be_bytes().to_vec();
        for part in parts {
            p.extend_from_slice(&(part.len() as u32).to_be_bytes());
            p.extend_from_slice(part);
        }
        p
    };
    let good = batch(1, &[&one]);
    assert!(open(&signed_frame(&good), CHAIN, &peers(), NOW_MS).is_ok());
    let too_many = MAX_BATCH_MESSAGES as u32 + 1;
    let mut trailing = good.clone();
    trailing.push(0);
    let mut overlong = good.clone();
    overlong[4..8].copy_from_slice(&1_000u32.to_be_bytes());
    for (what, payload) in [
        ("no messages", batch(0, &[])),
        ("too many", batch(too_many, &[&one])),
        ("count above the messages present", batch(2, &[&one])),
        ("trailing bytes", trailing),
        ("length past the end", overlong),
        ("truncated count", vec![0, 0]),
    ] {
        let e = open(&signed_frame(&payload), CHAIN, &peers(), NOW_MS).unwrap_err();
        assert!(
            matches!(e, Error::FrameMalformed(_)) && e.closes_connection(),
            "{what}: {e}"
        );
    }
    // seal_encoded of canonical bytes equals seal of the messages.
    assert_eq!(
        seal_encoded(&key(2), CHAIN, NOW_MS, &[one.as_slice()]),
        seal(&key(2), CHAIN, NOW_MS, &[msg()])
    );
}

#[test]
fn bad_frames_are_refused_and_only_garbage_closes_the_connection() {
    let good = body(seal(&key(1), CHAIN, NOW_MS, &[msg()]));
    let check = |frame: &[u8], now_ms: u64| open(frame, CHAIN, &peers(), now_ms).unwrap_err();

    let e = check(&body(seal(&key(9), CHAIN, NOW_MS, &[msg()])), NOW_MS);
    assert!(
        matches!(e, Error::UnknownPeer(_)) && e.closes_connection(),
        "{e}"
    );

    let e = check(
        &body(seal(&key(1), "other-chain", NOW_MS, &[msg()])),
        NOW_MS,
    );
    assert!(
        matches!(e, Error::BadFrameSignature) && e.closes_connection(),
        "{e}"
    );

    let mut tampered = good.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let e = check(&tampered, NOW_MS);
    assert!(matches!(e, Error::BadFrameSignature), "{e}");

    // The timestamp is signed: moving it breaks the signature; an old frame is stale.
    let e = check(&good, NOW_MS + MAX_CLOCK_SKEW_MS + 1);
    assert!(
        matches!(e, Error::StaleFrame { .. }) && !e.closes_connection(),
        "{e}"
    );
    let e = check(&good, NOW_MS - MAX_CLOCK_SKEW_MS - 1);
    assert!(matches!(e, Error::StaleFrame { .. }), "{e}");
    let mut moved = good.clone();
    moved[41] ^= 1;
    assert!(matches!(check(&moved, NOW_MS), Error::BadFrameSignature));

    let e = check(&good[..50], NOW_MS);
    assert!(
        matches!(e, Error::FrameMalformed(_)) && e.closes_connection(),
        "{e}"
    );
    let mut version = good.clone();
    version[0] = 1; // version 1 (one message per frame) is no longer accepted
    assert!(matches!(check(&version, NOW_MS), Error::FrameMalformed(_)));
    let e = check(&vec![0u8; MAX_FRAME_BYTES + 1], NOW_MS);
    assert!(
        matches!(e, Error::FrameTooLarge { .. }) && e.closes_connection(),
        "{e}"
    );
}

#[test]
fn a_signed_frame_with_a_non_canonical_payload_is_malformed() {
    // Sign garbage as if it were a message: the signature verifies, decoding fails.
    let mut payload = 1u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&40u32.to_be_bytes());
    payload.extend_from_slice(&[0xabu8; 40]);
    let e = open(&signed_frame(&payload), CHAIN, &peers(), NOW_MS).unwrap_err();
    assert!(
        matches!(e, Error::FrameMalformed(ref m) if m.contains("payload")),
        "{e}"
    );
}

#[test]
fn config_defaults_apply_and_bad_values_are_refused() {
    let c = FileConfig::parse(
        r#"
chain_id = "blyan-devnet"
genesis_file = "genesis.json"
data_dir = "data"
key_file = "key.json"
"#,
    )
    .unwrap();
    assert_eq!(c.block_interval_ms, 2_000);
    assert_eq!(c.p2p_addr, "0.0.0.0:7100");
    assert_eq!(c.http_addr, "127.0.0.1:8100");
    assert_eq!(c.max_body_bytes, 1024 * 1024);
    assert_eq!(c.key_password_env, "BLYAN_KEY_PASSWORD");
    assert_eq!(FileConfig::parse(&c.to_toml()).unwrap(), c);

    let base = "chain_id = \"x\"\ngenesis_file = \"g\"\ndata_dir = \"d\"\nkey_file = \"k\"\n";
    for bad in [
        "block_interval_ms = 0\n",
        "unknown_field = 1\n",
        "[[peers]]\naddr = \"127.0.0.1:1\"\npublic_key = \"02zz\"\n",
        "[[peers]]\naddr = \"127.0.0.1:1\"\npublic_key = \"020000000000000000000000000000000000000000000000000000000000000000\"\n",
    ] {
        let e = FileConfig::parse(&format!("{base}{bad}")).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
    }
    let k = hex::encode(public_key_of(&key(0)));
    let c = FileConfig::parse(&format!(
        "{base}[[peers]]\naddr = \"127.0.0.1:1\"\npublic_key = \"{k}\"\n"
    ))
    .unwrap();
    assert_eq!(c.transport_peers().unwrap()[0].id(), Some(address(&key(0))));
}

/// NODE-NET-11: one peer that floods the node cannot crowd another out of
/// the node's inbound queue. The node (key 0) reads nothing while peer 1
/// sends far more than its quota; peer 2's one message still gets into the
/// queue, within the first `quota + 1` items (before the per-peer quotas,
/// peer 1's flood filled the whole shared queue ahead of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_11_a_flooding_peer_cannot_crowd_another_out_of_the_inbound_queue() {
    use blyan_runtime::transport::{
        GrpcTransport, Outbound, Peer, TransportConfig, inbound_queue_len,
    };
    use std::time::{Duration, Instant};
    use tokio::sync::mpsc;
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let peers: Vec<Peer> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| Peer {
            addr: l.local_addr().unwrap().to_string(),
            public_key: public_key_of(&key(i as u64)),
        })
        .collect();
    const QUOTA: usize = 64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut transports = Vec::new();
    let mut receivers = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let mut config = TransportConfig::new(CHAIN.into(), peers.clone());
        config.inbound_messages_per_peer = QUOTA;
        let (tx, rx) = mpsc::channel(inbound_queue_len(&config));
        transports
            .push(GrpcTransport::start(l, key(i as u64), config, tx, None, &mut tasks).unwrap());
        receivers.push(rx);
    }
    let node = address(&key(0));
    let counters = transports[0].counters().unwrap();
    // Peer 1 floods: ten times the whole queue.
    let flood = 10
        * inbound_queue_len(&TransportConfig {
            inbound_messages_per_peer: QUOTA,
            ..TransportConfig::new(CHAIN.into(), peers.clone())
        });
    for h in 0..flood as u64 {
        transports[1].send(node, &WireMessage::BlockRequest { from_height: h });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while counters
        .inbound_quota_waits
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(Instant::now() < deadline, "peer 1 never reached its quota");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Peer 2 sends one message.
    let marker = WireMessage::BlockRequest {
        from_height: u64::MAX,
    };
    transports[2].send(node, &marker);
    let rx = &mut receivers[0];
    // Without reading, the queue comes to hold peer 1's quota and peer 2's
    // message (before the quotas: peer 1 filled all of it, and peer 2 waited).
    let deadline = Instant::now() + Duration::from_secs(60);
    while rx.len() < QUOTA + 1 {
        assert!(
            Instant::now() < deadline,
            "peer 2's message never got in: {} queued",
            rx.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rx.len(), QUOTA + 1, "peer 1 holds no more than its quota");
    let mut read = 0usize;
    let mut from_1 = 0usize;
    loop {
        let item = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the node's queue delivers")
            .expect("open");
        read += 1;
        if item.from == address(&key(2)) {
            assert_eq!(item.message, marker);
            break;
        }
        from_1 += 1;
        // Hold nothing: each item read releases its quota permit.
        drop(item);
        assert!(
            read <= QUOTA + 1,
            "peer 2's message is not among the first {} items ({from_1} from peer 1)",
            QUOTA + 1
        );
    }
    assert!(read <= QUOTA + 1);
    tasks.abort_all();
}
