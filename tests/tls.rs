//! Mutual TLS bound to the node key (tls.rs) and the envelope check on top
//! (transport.rs): unauthenticated peers are refused at the handshake, a
//! frame signed by anyone but the TLS peer is refused, and the node keeps
//! committing blocks throughout.
//!
//! Waiting is by polling against a generous deadline (never a timed
//! assertion): a slow machine only makes the test slower.
mod support;

use blyan_runtime::Error;
use blyan_runtime::devnet::{DEVNET_PASSWORD, Devnet, DevnetOptions};
use blyan_runtime::keystore::read_key_file;
use blyan_runtime::tls::{
    NodeCertificate, PeerCertVerifier, decode_extension, encode_extension, verify_certificate,
};
use blyan_runtime::transport::{PeerClient, now_ms, seal};
use blyan_state_machine::node::{PeerId, WireMessage};
use blyan_state_machine::testkit::{address, key};
use blyan_state_machine::tx::public_key_of;
use bytes::Bytes;
use std::collections::BTreeSet;
use std::sync::Arc;
use support::{DEADLINE, eventually, height};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAIN: &str = "blyan-test";
const NOW_S: u64 = 1_800_000_000;

fn allowed() -> BTreeSet<PeerId> {
    (0..3).map(|i| address(&key(i))).collect()
}

#[test]
fn a_bound_certificate_verifies_to_its_node_and_nothing_else_does() {
    let cert = NodeCertificate::generate(&key(1), CHAIN).unwrap();
    assert_eq!(
        verify_certificate(&cert.cert, CHAIN, &allowed(), NOW_S).unwrap(),
        address(&key(1))
    );
    let refused = |der: &[u8], chain: &str| {
        let e = verify_certificate(der, chain, &allowed(), NOW_S).unwrap_err();
        assert!(matches!(e, Error::PeerCertificate(_)), "{e}");
        e.to_string()
    };
    // A node outside the peer set.
    let stranger = NodeCertificate::generate(&key(9), CHAIN).unwrap();
    assert!(refused(&stranger.cert, CHAIN).contains("not in the peer set"));
    // Bound for another chain.
    assert!(refused(&cert.cert, "other-chain").contains("did not sign"));
    // The node key signed some other TLS key.
    let unbound = NodeCertificate::generate_with(&key(1), CHAIN, Some(&[0x30; 91])).unwrap();
    assert!(refused(&unbound.cert, CHAIN).contains("did not sign"));
    // Not a certificate, or a truncated one.
    assert!(refused(b"garbage", CHAIN).contains("does not parse"));
    refused(&cert.cert[..cert.cert.len() - 1], CHAIN);
    // A tampered certificate fails its self-signature.
    let mut tampered = cert.cert.to_vec();
    let n = tampered.len();
    tampered[n - 5] ^= 1;
    refused(&tampered, CHAIN);
}

#[test]
fn the_extension_oid_is_encoded_as_documented() {
    use blyan_runtime::tls::NODE_KEY_EXTENSION_OID_DER;
    let cert = NodeCertificate::generate(&key(1), CHAIN).unwrap();
    let tlv = [&[0x06, 5][..], &NODE_KEY_EXTENSION_OID_DER[..]].concat();
    assert!(cert.cert.windows(tlv.len()).any(|w| w == tlv));
}

#[test]
fn the_extension_encoding_is_strict() {
    let pk = public_key_of(&key(3));
    let sig = [7u8; 64];
    let der = encode_extension(&pk, &sig);
    assert_eq!(decode_extension(&der).unwrap(), (pk, sig));
    let longer = [der.as_slice(), &[0]].concat();
    for bad in [&der[..der.len() - 1], &longer[..], &der[1..]] {
        assert!(matches!(
            decode_extension(bad),
            Err(Error::PeerCertificate(_))
        ));
    }
    let mut wrong_tag = der.clone();
    wrong_tag[2] = 0x03;
    assert!(decode_extension(&wrong_tag).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_peers_and_misdirected_frames_are_refused_and_the_node_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    let net = Devnet::start(opts).await.unwrap();
    let target = &net.nodes[0];
    let url = target.api_url();
    let addr = target.p2p_addr.to_string();
    let chain = net.genesis.chain_id.clone();
    let allowed: BTreeSet<PeerId> = net.nodes.iter().map(|n| n.address).collect();
    let node_key = |i: usize| {
        read_key_file(&net.dir.join(format!("node-{i}/key.json")), DEVNET_PASSWORD).unwrap()
    };
    let (k1, k2) = (node_key(1), node_key(2));
    let verifier = Arc::new(PeerCertVerifier::new(chain.clone(), allowed.clone()));
    let frame = |signer: &k256::ecdsa::SigningKey| {
        Bytes::from(seal(
            signer,
            &chain,
            now_ms(),
            &[WireMessage::BlockRequest { from_height: 1 }],
        ))
        .slice(4..)
    };
    eventually("the network to commit a block", || async {
        (height(&url).await >= 1).then_some(())
    })
    .await;

    // Control: node 1's own certificate and frame are accepted.
    let good = NodeCertificate::generate(&k1, &chain).unwrap();
    let client = PeerClient::connect(
        &addr,
        Some(&good),
        verifier.clone(),
        &chain,
        &allowed,
        target.address,
    )
    .await
    .unwrap();
    client.deliver(frame(&k1)).await.unwrap();

    // A frame signed by node 2 on node 1's TLS connection: refused.
    let refused_before = target.transport.rejected_frames();
    let s = client.deliver(frame(&k2)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("arrived on the TLS connection"),
        "{s:?}"
    );
    assert_eq!(target.transport.rejected_frames(), refused_before + 1);
    // The connection is still usable for good frames.
    client.deliver(frame(&k1)).await.unwrap();

    // Certificates that must fail the handshake: none at all, a node key
    // outside the peer set, and node 1's key vouching for another TLS key.
    let stranger = NodeCertificate::generate(&key(4_242), &chain).unwrap();
    let unbound = NodeCertificate::generate_with(&k1, &chain, Some(&[0x30; 91])).unwrap();
    for (what, cert) in [
        ("no client certificate", None),
        ("node key not in the peer set", Some(&stranger)),
        ("extension not signed over its TLS key", Some(&unbound)),
    ] {
        let before = target.transport.rejected_handshakes();
        let result = PeerClient::connect(
            &addr,
            cert,
            verifier.clone(),
            &chain,
            &allowed,
            target.address,
        )
        .await;
        if let Ok(c) = result {
            let delivered = c.deliver(frame(&k1)).await;
            assert!(delivered.is_err(), "{what}: a frame got through");
        }
        eventually(what, || async {
            (target.transport.rejected_handshakes() > before).then_some(())
        })
        .await;
    }

    // Plain garbage on the P2P port: the handshake fails and the connection closes.
    let before = target.transport.rejected_handshakes();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4])
        .await
        .unwrap();
    s.write_all(&[0xab; 512]).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "connection not closed: {read:?}"
    );
    eventually("the garbage to be counted", || async {
        (target.transport.rejected_handshakes() > before).then_some(())
    })
    .await;

    // The node keeps committing, with its peers.
    let h = height(&url).await;
    eventually("two more blocks", || async {
        (height(&url).await >= h + 2).then_some(())
    })
    .await;
    assert!(net.nodes.iter().all(|n| n.is_running()));
    assert_eq!(target.handle.address, target.address);
    net.stop().await;
}
