//! Peer frames (transport.rs) and the configuration file (config.rs): every
//! bad frame is refused with its own error, and only garbage closes the
//! connection.
use blyan_runtime::Error;
use blyan_runtime::config::FileConfig;
use blyan_runtime::transport::{MAX_CLOCK_SKEW_MS, MAX_FRAME_BYTES, open, seal};
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
    let f = body(seal(&key(1), CHAIN, NOW_MS, &msg()));
    let (from, m) = open(&f, CHAIN, &peers(), NOW_MS + MAX_CLOCK_SKEW_MS).unwrap();
    assert_eq!((from, m), (address(&key(1)), msg()));
}

#[test]
fn bad_frames_are_refused_and_only_garbage_closes_the_connection() {
    let good = body(seal(&key(1), CHAIN, NOW_MS, &msg()));
    let check = |frame: &[u8], now_ms: u64| open(frame, CHAIN, &peers(), now_ms).unwrap_err();

    let e = check(&body(seal(&key(9), CHAIN, NOW_MS, &msg())), NOW_MS);
    assert!(
        matches!(e, Error::UnknownPeer(_)) && e.closes_connection(),
        "{e}"
    );

    let e = check(&body(seal(&key(1), "other-chain", NOW_MS, &msg())), NOW_MS);
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
    version[0] = 2;
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
    use blyan_state_machine::crypto::sign;
    use blyan_state_machine::tx::{Domain, signing_bytes};
    let k = key(2);
    let payload = [0xabu8; 40];
    let mut signed = NOW_MS.to_be_bytes().to_vec();
    signed.extend_from_slice(&payload);
    let sig = sign(&k, &signing_bytes(Domain::PeerMessage, CHAIN, &signed));
    let mut f = vec![1u8];
    f.extend_from_slice(&public_key_of(&k));
    f.extend_from_slice(&NOW_MS.to_be_bytes());
    f.extend_from_slice(&sig);
    f.extend_from_slice(&payload);
    let e = open(&f, CHAIN, &peers(), NOW_MS).unwrap_err();
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
