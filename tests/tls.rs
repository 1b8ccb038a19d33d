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

/// `GET {path}` on `url`, JSON (the devnet of this test has no rate limits).
async fn get(url: &str, path: &str) -> serde_json::Value {
    let (s, v) = blyan_runtime::client::get_json(url, path).await.unwrap();
    assert_eq!(s, 200, "{path}: {v}");
    v
}

/// Submits `tx` through `url` and waits for it to commit successfully.
async fn commit(url: &str, tx: &blyan_state_machine::tx::SignedTx, what: &str) {
    use blyan_state_machine::encoding::Canonical;
    let body = serde_json::json!({ "tx": format!("0x{}", hex::encode(tx.encode())) });
    let (s, e) = blyan_runtime::client::post_json(url, "/tx", &body)
        .await
        .unwrap();
    assert_eq!(s, 200, "{what}: {e}");
    let path = format!("/tx/0x{}", hex::encode(tx.id()));
    let r = eventually(what, || async {
        let (s, v) = blyan_runtime::client::get_json(url, &path).await.unwrap();
        (s == 200).then_some(v)
    })
    .await;
    assert_eq!(r["success"], true, "{what}: {r}");
}

/// A node of `net`'s chain with key `key`, the validators as seeds, no rate
/// limits and the given engine settings.
fn node_setup(
    net: &Devnet,
    data_dir: std::path::PathBuf,
    key: k256::ecdsa::SigningKey,
    inference: blyan_runtime::inference::InferenceConfig,
) -> blyan_runtime::node::NodeSetup {
    blyan_runtime::node::NodeSetup {
        genesis: net.genesis.clone(),
        key,
        data_dir,
        node: blyan_state_machine::node::NodeConfig {
            block_interval_ms: 300,
            ..Default::default()
        },
        peers: net.peers.clone(),
        max_body_bytes: blyan_runtime::api::MAX_BODY_BYTES,
        rate_limits: blyan_runtime::ratelimit::RateLimitConfig::unlimited(),
        expert_cache_bytes: blyan_runtime::blobs::DEFAULT_CACHE_BYTES,
        inference,
        http: Default::default(),
        logs: Default::default(),
        payments: Default::default(),
        state_sync: Default::default(),
    }
}

/// A 4-validator devnet with 300 ms blocks and no rate limits; the
/// validators run the embedded model's engine if `engines`.
async fn quick_devnet(dir: &std::path::Path, engines: bool) -> Devnet {
    let mut opts = DevnetOptions::new(dir.join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference.enabled = engines;
    let net = Devnet::start(opts).await.unwrap();
    let url = net.nodes[0].api_url();
    eventually("the network to commit a block", || async {
        (height(&url).await >= 1).then_some(())
    })
    .await;
    net
}

/// Funds `node_key` from the faucet and registers it on chain (TX-9) with
/// P2P endpoint `endpoint`, through `url`; waits for both to commit.
async fn register(net: &Devnet, url: &str, node_key: &k256::ecdsa::SigningKey, endpoint: &str) {
    use blyan_state_machine::testkit::{transfer, tx};
    use blyan_state_machine::tx::{NodeInfo, TxKind};
    let chain = &net.genesis.chain_id;
    let faucet = read_key_file(&net.faucet_key_file, DEVNET_PASSWORD).unwrap();
    let nonce = get(url, &format!("/account/{}", net.faucet)).await["nonce"]
        .as_u64()
        .unwrap();
    let bly = blyan_state_machine::types::BLY;
    commit(
        url,
        &transfer(chain, &faucet, nonce, address(node_key), 1_000 * bly),
        "the funding to commit",
    )
    .await;
    let register = TxKind::RegisterNode {
        info: Box::new(NodeInfo {
            endpoint: endpoint.to_string(),
            blocks: Vec::new(),
        }),
        bond: net.genesis.params.node_min_bond,
    };
    commit(
        url,
        &tx(chain, node_key, 0, register, 100_000_000_000),
        "the registration to commit",
    )
    .await;
}

/// NODE-ADMIT-1..5: a node that is neither a validator nor registered is
/// refused at the TLS handshake by every validator and cannot follow the
/// chain; once its `RegisterNode` (TX-9, with its P2P endpoint) commits,
/// every validator admits and dials it with no restart, and it follows as a
/// non-voting full node (same blocks, verified); once it deregisters (TX-10)
/// it is refused again and falls behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_registered_on_chain_is_admitted_without_restarts_and_a_stranger_is_refused() {
    use blyan_runtime::node::{RunningNode, bind};
    use blyan_state_machine::testkit::tx;
    use blyan_state_machine::tx::TxKind;
    let dir = tempfile::tempdir().unwrap();
    let net = quick_devnet(dir.path(), false).await;
    let url = net.nodes[0].api_url();
    let chain = net.genesis.chain_id.clone();

    // A node with a fresh key, configured with the validators as seeds.
    let node_key = key(7_777);
    let node = address(&node_key);
    let rejected = || -> u64 {
        net.nodes
            .iter()
            .map(|n| n.transport.rejected_handshakes())
            .sum()
    };
    let rejected_before = rejected();
    let p2p = bind("127.0.0.1:0").await.unwrap();
    let http = bind("127.0.0.1:0").await.unwrap();
    let engine = blyan_runtime::inference::InferenceConfig {
        enabled: false,
        ..Default::default()
    };
    let setup = node_setup(&net, dir.path().join("follower"), node_key.clone(), engine);
    let follower = RunningNode::start(setup, p2p, http).await.unwrap();
    let furl = follower.api_url();
    let p2p_endpoint = follower.p2p_addr.to_string();

    // Unregistered: the validators refuse its handshakes, and it stays at
    // genesis while the network moves on.
    eventually(
        "the validators to refuse the stranger's handshakes",
        || async { (rejected() >= rejected_before + 2).then_some(()) },
    )
    .await;
    let h = height(&url).await;
    eventually("three more blocks", || async {
        (height(&url).await >= h + 3).then_some(())
    })
    .await;
    assert_eq!(
        height(&furl).await,
        0,
        "an unregistered node followed the chain"
    );
    for n in &net.nodes {
        assert!(!n.transport.admitted().contains(&node));
    }

    // Funded by the faucet, it registers itself on chain (TX-9).
    register(&net, &url, &node_key, &p2p_endpoint).await;

    // Admitted by every validator, with nobody restarted.
    for n in &net.nodes {
        eventually("every validator to admit the registered node", || async {
            n.transport.admitted().contains(&node).then_some(())
        })
        .await;
    }
    // It follows: it reaches the network's height and holds the same blocks.
    let target = height(&url).await;
    eventually(
        "the registered node to reach the network's height",
        || async { (height(&furl).await >= target).then_some(()) },
    )
    .await;
    let status = get(&furl, "/status").await;
    assert_eq!(status["validator"], false, "{status}");
    let theirs = get(&url, &format!("/block/{target}")).await;
    let ours = get(&furl, &format!("/block/{target}")).await;
    assert_eq!(ours["hash"], theirs["hash"], "{ours} vs {theirs}");
    assert!(ours["hash"].is_string(), "{ours}");
    // And keeps following, by the blocks pushed to it (NODE-ADMIT-5).
    let next = target + 5;
    eventually("the registered node to follow five more blocks", || async {
        (height(&furl).await >= next).then_some(())
    })
    .await;

    // It deregisters (TX-10): refused again, it falls behind.
    commit(
        &url,
        &tx(
            &chain,
            &node_key,
            1,
            TxKind::DeregisterNode,
            100_000_000_000,
        ),
        "the deregistration to commit",
    )
    .await;
    for n in &net.nodes {
        eventually("every validator to drop the deregistered node", || async {
            (!n.transport.admitted().contains(&node)).then_some(())
        })
        .await;
    }
    let left_at = height(&furl).await;
    eventually("the network to move five blocks past the node", || async {
        (height(&url).await >= left_at + 5).then_some(())
    })
    .await;
    let stopped_at = height(&furl).await;
    let h = height(&url).await;
    eventually("five more blocks", || async {
        (height(&url).await >= h + 5).then_some(())
    })
    .await;
    assert!(
        height(&furl).await <= stopped_at + 1,
        "a deregistered node kept following"
    );
    follower.stop(1_000).await;
    net.stop().await;
}

/// RT-HB-10..12: a registered inference node that advertises sends every
/// validator a signed heartbeat each interval; their `GET /nodes` lists it
/// live with the layers and blocks of the model it serves, the age of its
/// last heartbeat, their own measured round trip and delivery rate to it,
/// and its load; three missed intervals after it stops, it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_advertising_inference_node_is_listed_live_and_expires_when_it_stops() {
    use blyan_runtime::node::{RunningNode, bind};
    let dir = tempfile::tempdir().unwrap();
    let net = quick_devnet(dir.path(), false).await;
    let url = net.nodes[0].api_url();
    let node_key = key(8_888);
    let node = address(&node_key);
    let p2p = bind("127.0.0.1:0").await.unwrap();
    let http = bind("127.0.0.1:0").await.unwrap();
    register(
        &net,
        &url,
        &node_key,
        &p2p.local_addr().unwrap().to_string(),
    )
    .await;
    let interval_ms = 300;
    let engine = blyan_runtime::inference::InferenceConfig {
        model_dir: Some(blyan_runtime::devnet::model_dir(&net.dir)),
        advertise: true,
        heartbeat_interval_ms: interval_ms,
        ..Default::default()
    };
    let inference = RunningNode::start(
        node_setup(&net, dir.path().join("inference"), node_key, engine),
        p2p,
        http,
    )
    .await
    .unwrap();
    // The model the chain registers: its meta block and its layer blocks.
    let blocks = get(&url, "/pol/blocks?limit=100").await;
    let listed = blocks["blocks"]
        .as_array()
        .unwrap_or_else(|| panic!("{blocks}"));
    let meta = listed
        .iter()
        .find(|b| b["block_type"] == "meta")
        .unwrap_or_else(|| panic!("no meta block: {blocks}"))["id"]
        .clone();
    let mut layer_blocks: Vec<String> = listed
        .iter()
        .filter(|b| {
            b["block_type"] == "layer"
                && b["model_id"].as_str().map(|m| format!("0x{m}")).as_deref() == meta.as_str()
        })
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    layer_blocks.sort();
    assert!(!layer_blocks.is_empty(), "{blocks}");
    for v in &net.nodes {
        let vurl = v.api_url();
        let entry = eventually("the validator to list the inference node live", || async {
            let nodes = get(&vurl, "/nodes").await;
            nodes["live"]
                .as_array()
                .and_then(|l| l.iter().find(|n| n["node_id"] == json_addr(&node)).cloned())
                .filter(|n| n["latency_ms"].is_number())
        })
        .await;
        let holding = &entry["holdings"][0];
        assert_eq!(holding["model"], meta, "{entry}");
        assert_eq!(holding["dense"], true, "{entry}");
        let got: Vec<String> = holding["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, layer_blocks, "{entry}");
        let layers = holding["layers"].as_array().unwrap();
        assert_eq!(layers[0], 0, "{entry}");
        assert_eq!(
            layers[1].as_u64().unwrap() + 1,
            layer_blocks.len() as u64,
            "{entry}"
        );
        assert!(
            entry["last_heartbeat_age_ms"].as_u64().unwrap() < 3 * interval_ms,
            "{entry}"
        );
        let rate = entry["delivery_success_rate"].as_f64().unwrap();
        assert!(rate > 0.0 && rate <= 1.0, "{entry}");
        assert_eq!(entry["quarantined"], false, "{entry}");
        assert!(
            entry["load"]["free_slots"].as_u64().unwrap() >= 1,
            "{entry}"
        );
    }
    // It stops: after three missed intervals no validator lists it.
    inference.stop(1_000).await;
    for v in &net.nodes {
        let vurl = v.api_url();
        eventually("the stopped node's entry to expire", || async {
            let nodes = get(&vurl, "/nodes").await;
            let live = nodes["live"].as_array().unwrap().clone();
            (!live.iter().any(|n| n["node_id"] == json_addr(&node))).then_some(())
        })
        .await;
    }
    net.stop().await;
}

/// An address as the API writes it.
fn json_addr(a: &PeerId) -> serde_json::Value {
    serde_json::to_value(a).unwrap()
}

/// A sample of `/metrics` at `url`: the value of the line starting `series `.
async fn metric(url: &str, series: &str) -> f64 {
    let r = blyan_runtime::client::send(url, "GET", "/metrics", &[], None)
        .await
        .unwrap();
    let text = String::from_utf8(r.body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
        .parse()
        .unwrap()
}

/// The text and final `blyan` object of a streamed chat completion.
async fn streamed(url: &str, body: &serde_json::Value) -> (String, serde_json::Value) {
    let r = blyan_runtime::client::send(
        url,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(body.to_string().as_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    sse_text(&String::from_utf8(r.body).unwrap())
}

/// The joined text and final `blyan` object of a chat completion's SSE body.
fn sse_text(text: &str) -> (String, serde_json::Value) {
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let mut joined = String::new();
    let mut blyan = serde_json::Value::Null;
    for e in &events[..events.len() - 1] {
        let chunk: serde_json::Value = serde_json::from_str(e).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            joined.push_str(piece);
        }
        if !chunk["blyan"].is_null() {
            blyan = chunk["blyan"].clone();
        }
    }
    (joined, blyan)
}

/// RT-STAGE-1..5: a validator's chat requests are served by a registered
/// inference node that advertises the model, as a pipeline of one stage
/// (the answer's route names it, its engine counts the steps, the text
/// equals the validator's own engine's); when that node's engine fails
/// after the first token, the validator's stream continues on the next
/// holder (here its own engine) and the client receives exactly the
/// uninterrupted answer (RT-STAGE-4, RT-PIPE-4).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_is_routed_to_a_holder_and_fails_over_by_replay() {
    use blyan_runtime::node::{RunningNode, bind};
    let dir = tempfile::tempdir().unwrap();
    let net = quick_devnet(dir.path(), true).await;
    let v0 = &net.nodes[0];
    let url = v0.api_url();
    let node_key = key(9_999);
    let node = address(&node_key);
    let p2p = bind("127.0.0.1:0").await.unwrap();
    let http = bind("127.0.0.1:0").await.unwrap();
    register(
        &net,
        &url,
        &node_key,
        &p2p.local_addr().unwrap().to_string(),
    )
    .await;
    // The holder's engine panics at any step from position 300 on: only
    // the long prompt below reaches it, after its first token.
    let marker = "ENGINE-FAULT ".repeat(24);
    let engine = blyan_runtime::inference::InferenceConfig {
        model_dir: Some(blyan_runtime::devnet::model_dir(&net.dir)),
        advertise: true,
        heartbeat_interval_ms: 300,
        panic_on_stage_position: Some(300),
        ..Default::default()
    };
    let holder = RunningNode::start(
        node_setup(&net, dir.path().join("holder"), node_key, engine),
        p2p,
        http,
    )
    .await
    .unwrap();
    let hurl = holder.api_url();
    eventually("validator 0 to list the holder live", || async {
        let nodes = get(&url, "/nodes").await;
        nodes["live"]
            .as_array()
            .and_then(|l| l.iter().find(|n| n["node_id"] == json_addr(&node)).cloned())
    })
    .await;

    // Served by the holder.
    let ask = serde_json::json!({ "prompt": "The network routes", "max_tokens": 24 });
    let (s, routed) = blyan_runtime::client::post_json(&url, "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 200, "{routed}");
    assert_eq!(server_of(&routed["blyan"]), json_addr(&node), "{routed}");
    assert!(metric(&hurl, "blyan_inference_stage_steps_total").await >= 1.0);
    // RT-STAGE-7: the body's route, the OpenAI header, the stage histogram.
    let stage = &routed["route"][0];
    assert_eq!(stage["node"], json_addr(&node), "{routed}");
    assert_eq!(stage["layers"][0], 0, "{routed}");
    assert!(stage["ms"].is_u64(), "{routed}");
    let openai = serde_json::json!({
        "messages": [{ "role": "user", "content": "The network routes" }],
        "max_tokens": 4,
    });
    let r = blyan_runtime::client::send(
        &url,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(openai.to_string().as_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let header: serde_json::Value =
        serde_json::from_str(r.header("x-blyan-route").expect("an x-blyan-route header")).unwrap();
    assert_eq!(header[0]["node"], json_addr(&node), "{header}");
    assert!(metric(&url, "blyan_inference_remote_stage_ms_count").await >= 1.0);
    assert!(metric(&url, "blyan_inference_routed_total{served=\"remote\"}").await >= 1.0);

    // The holder's engine fails after its first token: the stream goes on.
    let faulty = serde_json::json!({
        "messages": [{ "role": "user", "content": format!("{marker} and go on") }],
        "max_tokens": 24,
        "stream": true,
    });
    let (failed_over, blyan) = streamed(&url, &faulty).await;
    assert_eq!(server_of(&blyan), json_addr(&v0.address), "{blyan}");
    // The final chunk's stages: the failed holder, then validator 0.
    let stages = blyan["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{blyan}");
    assert_eq!(
        (&stages[0]["node"], &stages[0]["failed"]),
        (&json_addr(&node), &serde_json::json!(true)),
        "{blyan}"
    );
    assert_eq!(stages[1]["node"], json_addr(&v0.address), "{blyan}");
    assert!(metric(&url, "blyan_inference_failovers_total").await >= 1.0);
    assert!(metric(&hurl, "blyan_inference_panics_total").await >= 1.0);

    // The holder leaves: validator 0 serves from its own engine, and the
    // answers are the ones it gave through the route.
    holder.stop(1_000).await;
    eventually("the holder's entry to expire", || async {
        let nodes = get(&url, "/nodes").await;
        let live = nodes["live"].as_array().unwrap().clone();
        (!live.iter().any(|n| n["node_id"] == json_addr(&node))).then_some(())
    })
    .await;
    let (s, local) = blyan_runtime::client::post_json(&url, "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 200, "{local}");
    assert_eq!(
        server_of(&local["blyan"]),
        json_addr(&v0.address),
        "{local}"
    );
    assert_eq!(
        local["text"], routed["text"],
        "routed and local answers differ"
    );
    let mut unstreamed = faulty.clone();
    unstreamed["stream"] = serde_json::json!(false);
    let (s, reference) =
        blyan_runtime::client::post_json(&url, "/v1/chat/completions", &unstreamed)
            .await
            .unwrap();
    assert_eq!(s, 200, "{reference}");
    assert_eq!(
        failed_over,
        reference["choices"][0]["message"]["content"]
            .as_str()
            .unwrap(),
        "the failed-over stream differs from the uninterrupted answer"
    );
    net.stop().await;
}

/// `blyan devnet --inference-nodes 2` in process: the devnet registers two
/// inference nodes on chain and starts them; every validator lists both
/// live and routes chat to them; with one stopped, requests go to the
/// other and the devnet keeps committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_devnet_with_inference_nodes_routes_chat_to_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference_nodes = 2;
    let mut net = Devnet::start(opts).await.unwrap();
    assert_eq!(net.inference.len(), 2);
    let holders: Vec<serde_json::Value> = net
        .inference
        .iter()
        .map(|n| json_addr(&n.address))
        .collect();
    let url = net.nodes[0].api_url();
    for v in &net.nodes {
        let vurl = v.api_url();
        eventually(
            "every validator to list both inference nodes live",
            || async {
                let nodes = get(&vurl, "/nodes").await;
                let live = nodes["live"].as_array().unwrap().clone();
                holders
                    .iter()
                    .all(|h| live.iter().any(|n| &n["node_id"] == h))
                    .then_some(())
            },
        )
        .await;
    }
    let ask = serde_json::json!({ "prompt": "Where am I served?", "max_tokens": 8 });
    let (s, a) = blyan_runtime::client::post_json(&url, "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 200, "{a}");
    let by = server_of(&a["blyan"]);
    assert!(
        holders.contains(&by),
        "served by {by}, not an inference node: {a}"
    );
    // Paid (an API key of the faucet's allowance): the validator settles
    // the usage with the serving node's share (RT-STAGE-5), so that node's
    // inference reward claim rises.
    let key = net.api_key().await.unwrap();
    let bearer = format!("Bearer {key}");
    let r = blyan_runtime::client::send(
        &url,
        "POST",
        "/chat",
        &[("Authorization", bearer.as_str())],
        Some(ask.to_string().as_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let paid: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(paid["blyan"]["charged"], true, "{paid}");
    let payee = server_of(&paid["blyan"]).as_str().unwrap().to_string();
    assert!(holders.contains(&serde_json::json!(payee)), "{paid}");
    // (A claim, or, once the short devnet reward epoch ends, the payout.)
    let balance = |a: &serde_json::Value| a["balance"].as_str().unwrap().parse::<u128>().unwrap();
    let before = balance(&get(&url, &format!("/account/{payee}")).await);
    eventually("the serving node's inference claim or payout", || async {
        let acct = get(&url, &format!("/account/{payee}")).await;
        let claim = acct["reward_claims"]["inference"]
            .as_str()
            .and_then(|c| c.parse::<u128>().ok())
            .unwrap_or(0);
        (claim > 0 || balance(&acct) > before).then_some(())
    })
    .await;
    // Stop the node that served: the other one serves the next requests.
    let gone = net
        .inference
        .iter()
        .position(|n| json_addr(&n.address) == by)
        .unwrap();
    let stopped = net.inference.remove(gone);
    stopped.stop(1_000).await;
    let other = json_addr(&net.inference[0].address);
    eventually(
        "a request served by the remaining inference node",
        || async {
            let (s, a) = blyan_runtime::client::post_json(&url, "/chat", &ask)
                .await
                .unwrap();
            (s == 200 && server_of(&a["blyan"]) == other).then_some(())
        },
    )
    .await;
    let h = height(&url).await;
    eventually("the devnet to keep committing", || async {
        (height(&url).await >= h + 3).then_some(())
    })
    .await;
    net.stop().await;
}

/// The node that computed an answer: the route's share with the most work
/// (RT-STAGE-5: the router adds 1 per token, the server its layers per token).
fn server_of(blyan: &serde_json::Value) -> serde_json::Value {
    blyan["route"]
        .as_array()
        .unwrap_or_else(|| panic!("no route in {blyan}"))
        .iter()
        .max_by_key(|s| s["work"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("an empty route in {blyan}"))["node"]
        .clone()
}

/// RT-STAGE-6: a holder that alters its answers (the test-only
/// `perturb_outputs`) is caught by spot checks (rate 1 here), convicted by
/// a third computation and quarantined by the router; every answer after
/// that is correct. Reports how many answers were wrong before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_perturbing_holder_is_quarantined_and_later_answers_are_correct() {
    use blyan_runtime::node::{RunningNode, bind};
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference.spot_check_rate_ppm = 1_000_000;
    let net = Devnet::start(opts).await.unwrap();
    let url = net.nodes[0].api_url();
    eventually("the network to commit a block", || async {
        (height(&url).await >= 1).then_some(())
    })
    .await;
    let ask = serde_json::json!({ "prompt": "Check me", "max_tokens": 12 });
    // The reference: validator 0's own engine, before any holder exists.
    let (s, reference) = blyan_runtime::client::post_json(&url, "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 200, "{reference}");
    let mut holders = Vec::new();
    for (i, perturb) in [(0u64, true), (1, false)] {
        let node_key = key(11_000 + i);
        let p2p = bind("127.0.0.1:0").await.unwrap();
        let http = bind("127.0.0.1:0").await.unwrap();
        register(
            &net,
            &url,
            &node_key,
            &p2p.local_addr().unwrap().to_string(),
        )
        .await;
        let engine = blyan_runtime::inference::InferenceConfig {
            model_dir: Some(blyan_runtime::devnet::model_dir(&net.dir)),
            advertise: true,
            heartbeat_interval_ms: 300,
            perturb_outputs: perturb,
            ..Default::default()
        };
        let data = dir.path().join(format!("holder-{i}"));
        holders.push(
            RunningNode::start(node_setup(&net, data, node_key, engine), p2p, http)
                .await
                .unwrap(),
        );
    }
    let liar = json_addr(&holders[0].address);
    let honest = json_addr(&holders[1].address);
    eventually("validator 0 to list both holders live", || async {
        let nodes = get(&url, "/nodes").await;
        let live = nodes["live"].as_array().unwrap().clone();
        [&liar, &honest]
            .iter()
            .all(|h| live.iter().any(|n| &&n["node_id"] == h))
            .then_some(())
    })
    .await;
    let quarantined = || async {
        let nodes = get(&url, "/nodes").await;
        nodes["live"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node_id"] == liar && n["quarantined"] == true)
    };
    let (mut wrong, mut asked) = (0, 0);
    while !quarantined().await {
        assert!(
            asked < 40,
            "not quarantined after {asked} requests ({wrong} wrong)"
        );
        let (s, a) = blyan_runtime::client::post_json(&url, "/chat", &ask)
            .await
            .unwrap();
        assert_eq!(s, 200, "{a}");
        asked += 1;
        if a["text"] != reference["text"] {
            wrong += 1;
            assert_eq!(
                server_of(&a["blyan"]),
                liar,
                "a wrong answer not from the liar: {a}"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    println!("RT-STAGE-6: quarantined after {asked} requests, {wrong} of them answered wrongly");
    // Convicted as a stage that answered wrongly, or as a checker that
    // contradicted an honest stage (both by the referee's third computation).
    eventually("the conviction to be counted", || async {
        let fault = |o: &str| format!("blyan_inference_spot_checks_total{{outcome=\"{o}\"}}");
        let stage = metric(&url, &fault("stage_fault")).await;
        let checker = metric(&url, &fault("checker_fault")).await;
        (stage + checker >= 1.0).then_some(())
    })
    .await;
    for _ in 0..5 {
        let (s, a) = blyan_runtime::client::post_json(&url, "/chat", &ask)
            .await
            .unwrap();
        assert_eq!(s, 200, "{a}");
        assert_eq!(
            a["text"], reference["text"],
            "a wrong answer after the quarantine: {a}"
        );
        assert_ne!(
            server_of(&a["blyan"]),
            liar,
            "routed to a quarantined node: {a}"
        );
    }
    for h in holders {
        h.stop(1_000).await;
    }
    net.stop().await;
}

/// Issue 15 item 2 on the chain-driven admission (NODE-ADMIT-1..4, spec
/// NODE-ADMIT-3: a validator publishes its P2P address by `RegisterNode`):
/// a node with a fresh key joins a running 4-validator network by
/// transactions alone: it registers its endpoint and bonds; it catches up,
/// becomes active at the next epoch boundary and its precommits appear in
/// the certificates; after it unbonds and deregisters it leaves every
/// validator's admitted set. Nobody's configuration changes; nobody restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_validator_joins_and_leaves_a_running_network_by_transactions_alone() {
    use blyan_runtime::node::{RunningNode, bind};
    use blyan_state_machine::testkit::tx;
    use blyan_state_machine::tx::TxKind;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference.enabled = false;
    opts.epoch_length_blocks = Some(10);
    let net = Devnet::start(opts).await.unwrap();
    let url = net.nodes[0].api_url();
    let chain = net.genesis.chain_id.clone();
    eventually("the network to commit a block", || async {
        (height(&url).await >= 1).then_some(())
    })
    .await;
    let node_key = key(12_345);
    let node = address(&node_key);
    let p2p = bind("127.0.0.1:0").await.unwrap();
    let http = bind("127.0.0.1:0").await.unwrap();
    let endpoint = p2p.local_addr().unwrap().to_string();
    let engine = blyan_runtime::inference::InferenceConfig {
        enabled: false,
        ..Default::default()
    };
    let joiner = RunningNode::start(
        node_setup(&net, dir.path().join("joiner"), node_key.clone(), engine),
        p2p,
        http,
    )
    .await
    .unwrap();
    let jurl = joiner.api_url();
    // Its endpoint in state (TX-9), then its stake (TX-5).
    register(&net, &url, &node_key, &endpoint).await;
    let bly = blyan_state_machine::types::BLY;
    commit(
        &url,
        &tx(
            &chain,
            &node_key,
            1,
            TxKind::Bond { amount: 500 * bly },
            100_000_000_000,
        ),
        "the bond to commit",
    )
    .await;
    let bonded_at = height(&url).await;
    // Active from an epoch boundary on, it votes: its address is among a
    // later certificate's signers.
    eventually("the joiner to be active and sign a certificate", || async {
        let h = height(&url).await;
        for at in (bonded_at + 1)..=h {
            let b = get(&url, &format!("/block/{at}")).await;
            let signers = b["certificate"]["signers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if signers.iter().any(|s| s == &json_addr(&node)) {
                return Some(());
            }
        }
        None
    })
    .await;
    let status = get(&jurl, "/status").await;
    assert_eq!(status["validator"], true, "{status}");
    assert!(
        status["height"].as_u64().unwrap() + 3 >= height(&url).await,
        "{status}"
    );
    // It leaves: unbond everything and deregister.
    commit(
        &url,
        &tx(
            &chain,
            &node_key,
            2,
            TxKind::Unbond { amount: 500 * bly },
            100_000_000_000,
        ),
        "the unbond to commit",
    )
    .await;
    commit(
        &url,
        &tx(
            &chain,
            &node_key,
            3,
            TxKind::DeregisterNode,
            100_000_000_000,
        ),
        "the deregistration to commit",
    )
    .await;
    for v in &net.nodes {
        eventually("every validator to drop the leaver", || async {
            (!v.transport.admitted().contains(&node)).then_some(())
        })
        .await;
    }
    // The four keep committing without it.
    let h = height(&url).await;
    eventually("the network to keep committing", || async {
        (height(&url).await >= h + 12).then_some(())
    })
    .await;
    joiner.stop(1_000).await;
    net.stop().await;
}

/// SYNC-* in the runtime (issue 15 item 3): a registered node that starts
/// with an empty store and a trusted block (`[state_sync] trust_height`,
/// `trust_hash`) restores the state from a validator's snapshot of it over
/// mutual TLS, without the blocks before it, then follows the chain: its
/// state root at a later height equals the validators'. A wrong trusted hash
/// is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_node_starts_from_a_trusted_snapshot_and_follows_the_chain() {
    use blyan_runtime::node::{RunningNode, bind};
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference.enabled = false;
    opts.state_sync.snapshot_interval_blocks = 10;
    let net = Devnet::start(opts).await.unwrap();
    let url = net.nodes[0].api_url();
    eventually("a block beyond the first snapshot", || async {
        (height(&url).await >= 12).then_some(())
    })
    .await;
    let trusted = get(&url, "/block/10").await;
    let trust_hash = trusted["hash"].as_str().unwrap().to_string();
    let node_key = key(24_680);
    let engine = blyan_runtime::inference::InferenceConfig {
        enabled: false,
        ..Default::default()
    };
    // A wrong trusted hash: refused, naming the block.
    let p2p = bind("127.0.0.1:0").await.unwrap();
    let http = bind("127.0.0.1:0").await.unwrap();
    let endpoint = p2p.local_addr().unwrap().to_string();
    register(&net, &url, &node_key, &endpoint).await;
    let mut setup = node_setup(
        &net,
        dir.path().join("fresh"),
        node_key.clone(),
        engine.clone(),
    );
    setup.state_sync.trust_height = Some(10);
    setup.state_sync.trust_hash = Some(format!("0x{}", "ab".repeat(32)));
    let err = match RunningNode::start(setup, p2p, http).await {
        Ok(_) => panic!("a wrong trusted hash was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("is not the trusted block"), "{err}");
    // The trusted block: the node starts from the snapshot.
    // The failed start's listener goes with its aborted tasks.
    let p2p = eventually("the endpoint to be free again", || async {
        bind(&endpoint).await.ok()
    })
    .await;
    let http = bind("127.0.0.1:0").await.unwrap();
    let mut setup = node_setup(&net, dir.path().join("fresh"), node_key, engine);
    setup.state_sync.trust_height = Some(10);
    setup.state_sync.trust_hash = Some(trust_hash);
    let fresh = RunningNode::start(setup, p2p, http).await.unwrap();
    let furl = fresh.api_url();
    let (s, _) = blyan_runtime::client::get_json(&furl, "/block/3")
        .await
        .unwrap();
    assert_eq!(s, 404, "blocks before the snapshot are not held");
    let block10 = get(&furl, "/block/10").await;
    assert_eq!(block10["hash"], trusted["hash"]);
    let target = height(&url).await + 3;
    eventually("the fresh node to follow the chain", || async {
        (height(&furl).await >= target).then_some(())
    })
    .await;
    let ours = get(&furl, &format!("/block/{target}")).await;
    let theirs = get(&url, &format!("/block/{target}")).await;
    assert_eq!(ours["state_root"], theirs["state_root"]);
    assert_eq!(ours["hash"], theirs["hash"]);
    fresh.stop(1_000).await;
    net.stop().await;
}

/// Issue 12 (failover, must-show): a holder serving a stream from its own OS
/// process is killed with SIGKILL in the middle of the stream; the router
/// (validator 0) replays on another holder (here its own engine) and the
/// client's stream completes without an error, with exactly the text of the
/// uninterrupted answer (greedy, same seed). The holder is slowed by a
/// test-only per-token delay so the kill lands mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_survives_sigkill_of_its_serving_process() {
    let dir = tempfile::tempdir().unwrap();
    let net = quick_devnet(dir.path(), true).await;
    let v0 = &net.nodes[0];
    let url = v0.api_url();
    let (mut holder, node) = holder_process(
        &net,
        &dir.path().join("holder"),
        13_579,
        blyan_runtime::inference::InferenceConfig {
            token_delay_ms: 40,
            ..Default::default()
        },
    )
    .await;
    eventually("validator 0 to list the holder process live", || async {
        let nodes = get(&url, "/nodes").await;
        nodes["live"]
            .as_array()
            .and_then(|l| l.iter().find(|n| n["node_id"] == json_addr(&node)).cloned())
    })
    .await;
    let ask = serde_json::json!({
        "messages": [{ "role": "user", "content": "Pipelines survive" }],
        "max_tokens": 40,
        "temperature": 0,
        "seed": 7,
        "stream": true,
    });
    // Uninterrupted, through the holder process.
    let (reference, blyan) = streamed(&url, &ask).await;
    assert_eq!(server_of(&blyan), json_addr(&node), "{blyan}");
    assert!(!reference.is_empty());
    // Again, killing the holder's process once the stream has started
    // (40 tokens at 40 ms each take 1.6 s; the kill comes at 0.5 s).
    let pid = holder.id();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
    });
    let (failed_over, blyan) = streamed(&url, &ask).await;
    assert!(killer.await.unwrap().success());
    let _ = holder.wait();
    assert_eq!(failed_over, reference, "the stream after the kill differs");
    let stages = blyan["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{blyan}");
    assert_eq!(
        (&stages[0]["node"], &stages[0]["failed"]),
        (&json_addr(&node), &serde_json::json!(true)),
        "{blyan}"
    );
    assert!(metric(&url, "blyan_inference_failovers_total").await >= 1.0);
    net.stop().await;
}

/// RT-PIPE-1..5: `blyan devnet --inference-nodes 4` splits the 4-layer
/// model into layers 0–1 and 2–3, two holders each, none holding every
/// layer. A validator's chat requests go through a route of two stages on
/// two inference nodes (hidden states cross the transport: the route and
/// `/metrics` show it), and the greedy answers, plain and streamed, are
/// byte-identical to the same model in one process. With the first
/// stage's holder stopped, the request is replayed through the other
/// holder of its layers and the answer is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_of_two_stages_answers_as_one_process_and_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference_nodes = 4;
    // RT-PIPE-9: steps alone, so answers are bit-identical to one process
    // even if a background spot check runs beside them.
    opts.inference.max_stage_batch = 1;
    let mut net = Devnet::start(opts).await.unwrap();
    let holders: Vec<serde_json::Value> = net
        .inference
        .iter()
        .map(|n| json_addr(&n.address))
        .collect();
    let url = net.nodes[0].api_url();
    // Each inference node advertises half the layers.
    eventually("validator 0 to list four half-model holders", || async {
        let nodes = get(&url, "/nodes").await;
        let live = nodes["live"].as_array().unwrap().clone();
        let ranges: Vec<(u64, u64)> = live
            .iter()
            .filter(|n| holders.contains(&n["node_id"]))
            .flat_map(|n| n["holdings"].as_array().cloned().unwrap_or_default())
            .map(|h| {
                (
                    h["layers"][0].as_u64().unwrap(),
                    h["layers"][1].as_u64().unwrap(),
                )
            })
            .collect();
        (ranges.len() == 4
            && ranges.iter().filter(|r| **r == (0, 1)).count() == 2
            && ranges.iter().filter(|r| **r == (2, 3)).count() == 2)
            .then_some(())
    })
    .await;

    // The same model in one process: the reference.
    let prompt = "Pipelines carry hidden states";
    let (_, expected) = one_process_answer(
        blyan_runtime::devnet::model_dir(&dir.path().join("devnet")),
        prompt,
        24,
    )
    .await;

    let ask = serde_json::json!({ "prompt": prompt, "max_tokens": 24 });
    let (s, a) = blyan_runtime::client::post_json(&url, "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 200, "{a}");
    let route = a["route"].as_array().unwrap().clone();
    assert_eq!(route.len(), 2, "{a}");
    assert_eq!(route[0]["layers"], serde_json::json!([0, 1]), "{a}");
    assert_eq!(route[1]["layers"], serde_json::json!([2, 3]), "{a}");
    assert!(
        holders.contains(&route[0]["node"]) && holders.contains(&route[1]["node"]),
        "{a}"
    );
    assert_ne!(route[0]["node"], route[1]["node"], "{a}");
    assert_eq!(
        a["text"], expected.text,
        "the pipeline's answer differs from one process"
    );
    assert_eq!(a["completion_tokens"], expected.completion_tokens, "{a}");
    // RT-PIPE-6: each stage signed commitments to its outputs, one per 32
    // positions, for this request and its layers; together they cover
    // every position it computed (stage 0: the prompt and each fed-back
    // token; stage 1: the logits from the prompt's last position on).
    let prompt_tokens = a["prompt_tokens"].as_u64().unwrap();
    let fed = prompt_tokens + expected.completion_tokens as u64 - 1;
    let first_commits = check_commitments(&route[0], "blyan-devnet", 0, fed);
    check_commitments(&route[1], "blyan-devnet", prompt_tokens - 1, fed);
    assert!(metric(&url, "blyan_inference_pipelines_total").await >= 1.0);
    assert!(metric(&url, "blyan_inference_stage_bytes_total").await > 0.0);
    // Per-hop latency: one series per hop index.
    for hop in ["0", "1"] {
        let series = format!("blyan_inference_pipeline_stage_ms_count{{stage=\"{hop}\"}}");
        assert!(metric(&url, &series).await >= 1.0, "{series}");
    }

    // Streamed through the OpenAI-compatible API: the planned route in the
    // header, the same text.
    let openai = serde_json::json!({
        "messages": [{ "role": "user", "content": prompt }],
        "max_tokens": 24,
        "stream": true,
    });
    let (streamed_text, blyan) = streamed(&url, &openai).await;
    let (s, plain) = blyan_runtime::client::post_json(
        &url,
        "/v1/chat/completions",
        &serde_json::json!({ "messages": openai["messages"], "max_tokens": 24 }),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{plain}");
    assert_eq!(
        streamed_text,
        plain["choices"][0]["message"]["content"].as_str().unwrap(),
        "streamed and plain pipeline answers differ"
    );
    assert_eq!(blyan["stages"].as_array().unwrap().len(), 2, "{blyan}");

    // Stop the first stage's holder: the request is replayed through the
    // other holder of layers 0–1 and answers the same.
    let first = route[0]["node"].clone();
    let gone = net
        .inference
        .iter()
        .position(|n| json_addr(&n.address) == first)
        .unwrap();
    net.inference.remove(gone).stop(1_000).await;
    let (s, b) = blyan_runtime::client::post_json(&url, "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["text"], expected.text, "the replayed answer differs: {b}");
    let used: Vec<&serde_json::Value> = b["route"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["failed"] != serde_json::json!(true))
        .collect();
    assert_eq!(used.len(), 2, "{b}");
    assert_ne!(used[0]["node"], first, "{b}");
    assert_eq!(used[0]["layers"], serde_json::json!([0, 1]), "{b}");
    // The other holder of layers 0–1 committed to the same hidden states:
    // a check after the fact compares them chunk by chunk (RT-COMMIT-3).
    let second_commits = check_commitments(used[0], "blyan-devnet", 0, fed);
    assert_eq!(first_commits.len(), second_commits.len());
    for (x, y) in first_commits.iter().zip(&second_commits) {
        let c = blyan_route::commit::compare(x, y, blyan_route::commit::Tolerance::default());
        assert!(c.matches, "two honest holders' commitments differ: {c:?}");
    }
    net.stop().await;
}

/// RT-PIPE-8: `blyan devnet --inference-nodes 4 --moe` registers the
/// embedded Qwen3-MoE model (4 layers of 8 experts, top 2); each inference
/// node holds one half of the layers and one half of their experts. A
/// validator's chat request runs through two stages, each computing half
/// its experts and calling the other half on a node holding the same
/// layers, and the greedy answer is byte-identical to the whole model in
/// one process. With an expert holder stopped, the answer is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moe_experts_spread_over_nodes_answer_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference_nodes = 4;
    opts.moe = true;
    let mut net = Devnet::start(opts).await.unwrap();
    let url = net.nodes[0].api_url();
    let holders: Vec<serde_json::Value> = net
        .inference
        .iter()
        .map(|n| json_addr(&n.address))
        .collect();
    let (low, high) = (
        serde_json::json!([0, 1, 2, 3]),
        serde_json::json!([4, 5, 6, 7]),
    );
    eventually(
        "validator 0 to list four holders of half the experts",
        || async {
            let nodes = get(&url, "/nodes").await;
            let held: Vec<(serde_json::Value, serde_json::Value)> = nodes["live"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| holders.contains(&n["node_id"]))
                .flat_map(|n| n["holdings"].as_array().cloned().unwrap_or_default())
                .map(|h| (h["layers"].clone(), h["experts"].clone()))
                .collect();
            let count = |l: serde_json::Value, e: &serde_json::Value| {
                held.iter().filter(|h| h.0 == l && h.1 == *e).count()
            };
            (held.len() == 4
                && count(serde_json::json!([0, 1]), &low) == 1
                && count(serde_json::json!([0, 1]), &high) == 1
                && count(serde_json::json!([2, 3]), &low) == 1
                && count(serde_json::json!([2, 3]), &high) == 1)
                .then_some(())
        },
    )
    .await;

    let model = blyan_runtime::devnet::model_dir(&dir.path().join("devnet"));
    assert!(model.ends_with(blyan_runtime::devnet::MOE_MODEL_DIR));
    let prompt = "Experts live on other nodes";
    let (reference, expected) = one_process_answer(model, prompt, 24).await;
    assert!(reference.model.is_moe && reference.model.num_experts == 8);
    let ask = serde_json::json!({ "prompt": prompt, "max_tokens": 24 });
    let (s, a) = blyan_runtime::client::post_json(&url, "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 200, "{a}");
    let route = a["route"].as_array().unwrap().clone();
    assert_eq!(route.len(), 2, "{a}");
    for (stage, layers) in route.iter().zip([[0, 1], [2, 3]]) {
        assert_eq!(stage["layers"], serde_json::json!(layers), "{a}");
        assert!(holders.contains(&stage["node"]), "{a}");
        // Every expert of both layers is placed; half on another holder.
        let placed = stage["experts"].as_array().unwrap();
        assert_eq!(placed.len(), 16, "{a}");
        let away = placed.iter().filter(|e| e["node"] != stage["node"]).count();
        assert_eq!(away, 8, "{a}");
        assert!(placed.iter().all(|e| holders.contains(&e["node"])), "{a}");
    }
    assert_eq!(
        a["text"], expected.text,
        "the answer through spread experts differs from one process"
    );
    assert_eq!(a["completion_tokens"], expected.completion_tokens, "{a}");
    assert!(expected.completion_tokens >= 8, "too short to compare: {a}");
    // The experts some token was routed to, from both halves.
    let used: Vec<(u32, u32)> = a["experts_used"]
        .as_array()
        .unwrap_or_else(|| panic!("no experts_used in {a}"))
        .iter()
        .map(|x| {
            let (l, e) = x.as_str().unwrap().split_once('.').unwrap();
            (l.parse().unwrap(), e.parse().unwrap())
        })
        .collect();
    assert!(used.iter().all(|&(l, e)| l < 4 && e < 8), "{a}");
    assert!(
        used.iter().any(|&(_, e)| e < 4) && used.iter().any(|&(_, e)| e >= 4),
        "{a}"
    );
    // Paid usage names every node that computed: the router, both stages
    // and both holders of the other halves (RT-PIPE-8 stage_work).
    let paid: BTreeSet<String> = a["blyan"]["route"]
        .as_array()
        .unwrap_or_else(|| panic!("no usage route in {a}"))
        .iter()
        .filter(|s| s["work"].as_u64().unwrap() > 0)
        .map(|s| s["node"].as_str().unwrap().to_string())
        .collect();
    for stage in &route {
        for e in stage["experts"].as_array().unwrap() {
            assert!(paid.contains(e["node"].as_str().unwrap()), "{a}");
        }
    }
    assert_eq!(paid.len(), 5, "{a}");
    // Rows crossed the transport to experts and back.
    let mut served = 0.0;
    let mut made = 0.0;
    for n in &net.inference {
        served += metric(&n.api_url(), "blyan_inference_expert_calls_served_total").await;
        made += metric(&n.api_url(), "blyan_inference_expert_calls_made_total").await;
        assert!(metric(&n.api_url(), "blyan_inference_expert_bytes_total").await >= 0.0);
    }
    assert!(
        served > 0.0 && made >= served,
        "served {served}, made {made}"
    );

    // Stop the holder of layers 0–1's upper experts: nobody else holds
    // them, so no route exists and the validator answers from its own
    // engine; the answer is the same.
    let gone = net
        .inference
        .iter()
        .position(|n| {
            route[0]["experts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["node"] == json_addr(&n.address) && e["node"] != route[0]["node"])
        })
        .unwrap();
    net.inference.remove(gone).stop(1_000).await;
    let (s, b) = blyan_runtime::client::post_json(&url, "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["text"], expected.text,
        "after an expert holder stopped: {b}"
    );
    net.stop().await;
}

/// RT-PIPE-1/8 against a live stage over mutual TLS: a step before the
/// session opens, a header announcing 1 GiB, a message over the 1 MiB
/// bound, a step whose bytes disagree with its shape, and malformed or
/// misdirected expert calls are each refused with an error (the call
/// ends), no panic; the same stage then serves a well-formed session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_stage_refuses_malformed_messages_and_keeps_serving() {
    use blyan_runtime::pipeline::{Assembler, Dtype, Kind, Message, Open, Step, encode_open};
    use blyan_runtime::tls::{NodeCertificate, PeerCertVerifier};
    use blyan_runtime::transport::{GrpcTransport, Peer, PeerClient, TransportConfig};
    use blyan_state_machine::testkit::{address, key};
    const CHAIN: &str = "blyan-malformed";
    const MODEL: [u8; 32] = [7; 32];
    let engine = blyan_runtime::inference::InferenceHandle::start(
        blyan_runtime::inference::InferenceConfig {
            layers: Some([1, 2]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_addr = lb.local_addr().unwrap().to_string();
    let peers = vec![
        Peer {
            addr: la.local_addr().unwrap().to_string(),
            public_key: blyan_state_machine::tx::public_key_of(&key(1)),
        },
        Peer {
            addr: b_addr.clone(),
            public_key: blyan_state_machine::tx::public_key_of(&key(2)),
        },
    ];
    let config = TransportConfig::new(CHAIN.into(), peers);
    let mut tasks = tokio::task::JoinSet::new();
    let (txa, _rxa) = tokio::sync::mpsc::channel(64);
    let (txb, mut rxb) = tokio::sync::mpsc::channel(64);
    let _a = GrpcTransport::start(la, key(1), config.clone(), txa, None, &mut tasks).unwrap();
    let b = GrpcTransport::start(lb, key(2), config, txb, None, &mut tasks).unwrap();
    tokio::spawn(async move { while rxb.recv().await.is_some() {} });
    b.set_stage_sink(std::sync::Arc::new(blyan_runtime::router::StageServer {
        engine: engine.clone(),
        model: Some(MODEL),
        perturb: false,
        identity: None,
    }));
    let allowed: BTreeSet<_> = [address(&key(1)), address(&key(2))].into();
    let verifier = std::sync::Arc::new(PeerCertVerifier::new(CHAIN.into(), allowed.clone()));
    let cert = NodeCertificate::generate(&key(1), CHAIN).unwrap();
    let client = PeerClient::connect(
        &b_addr,
        Some(&cert),
        verifier,
        CHAIN,
        &allowed,
        address(&key(2)),
    )
    .await
    .unwrap();
    let open = Open {
        model: format!("0x{}", hex::encode(MODEL)),
        first_layer: 1,
        last_layer: 2,
        request_id: String::new(),
        experts: Vec::new(),
    };
    let hidden = |position: u32| Step {
        position,
        kind: Kind::Hidden,
        dtype: Dtype::F32,
        shape: [1, 1, 128],
        bytes: vec![0; 128 * 4],
    };
    // Sends `messages` on a fresh call; the stage's first answer (`None`:
    // the call ended without one) and whether the call then ended.
    let session = |messages: Vec<bytes::Bytes>| {
        let client = &client;
        async move {
            let (tx, requests) = tokio::sync::mpsc::channel(16);
            let mut rx = client.stage(requests).await.unwrap();
            for m in messages {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
            let mut asm = Assembler::default();
            let first = loop {
                match rx.message().await {
                    Ok(Some(m)) => match asm.push(&m).unwrap() {
                        Some(msg) => break Some(msg),
                        None => continue,
                    },
                    Ok(None) | Err(_) => break None,
                }
            };
            drop(tx);
            let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                loop {
                    match rx.message().await {
                        Ok(Some(_)) => continue,
                        _ => return,
                    }
                }
            })
            .await
            .is_ok();
            (first, ended)
        }
    };
    let refused = |what: &str, got: (Option<Message>, bool)| {
        assert!(
            matches!(got.0, Some(Message::Error(..)) | None),
            "{what}: answered {:?}",
            got.0
        );
        assert!(got.1, "{what}: the call did not end");
    };
    // A step before the session opens.
    refused("step before open", session(hidden(0).encode()).await);
    // A header announcing 1 GiB of hidden states: refused from the header.
    let mut huge = hidden(0).encode()[0].to_vec();
    huge[7..19].copy_from_slice(
        &[1u32, 262_144, 1024]
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    huge[19..27].copy_from_slice(&(1u64 << 30).to_le_bytes());
    let got = session(vec![encode_open(&open), huge.into()]).await;
    match &got.0 {
        Some(Message::Error(_, m)) => assert!(m.contains("over"), "{m}"),
        other => panic!("a 1 GiB header answered {other:?}"),
    }
    refused("1 GiB header", got);
    // One message over the 1 MiB bound (the transport refuses it).
    let big = bytes::Bytes::from(vec![b'c'; 2 * 1024 * 1024]);
    refused(
        "2 MiB message",
        session(vec![encode_open(&open), big]).await,
    );
    // A step at a position the session never reached.
    refused(
        "step at position 5",
        session(vec![encode_open(&open), hidden(5).encode().remove(0)]).await,
    );
    // Experts of another model, and bytes that are no call at all.
    let call = blyan_runtime::experts::ExpertCall {
        model: [9; 32],
        layer: 1,
        rows: blyan_runtime::experts::ExpertRows {
            dtype: Dtype::F32,
            hidden: 128,
            experts: vec![(0, 1)],
            bytes: vec![0; 512],
        },
    };
    let e = client.expert(call.encode()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = client
        .expert(bytes::Bytes::from_static(b"nonsense"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // This dense model's stage holds no experts.
    let own = blyan_runtime::experts::ExpertCall {
        model: MODEL,
        ..call
    };
    let e = client.expert(own.encode()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // The stage is still up and serves a well-formed session.
    let mut messages = vec![encode_open(&open)];
    messages.extend(hidden(0).encode());
    let (first, _) = session(messages).await;
    match first {
        Some(Message::Step(out)) => {
            assert_eq!(
                (out.kind, out.shape, out.position),
                (Kind::Hidden, [1, 1, 128], 1)
            )
        }
        other => panic!("a well-formed step answered {other:?}"),
    }
    assert_eq!(
        engine.stats.counters().panics,
        0,
        "no malformed message reached a panic"
    );
}

/// The model of block directory `dir` in one process (this test's own
/// engine, f32 on the CPU): the engine and its greedy answer to `prompt`
/// (the reference a route must equal).
async fn one_process_answer(
    dir: std::path::PathBuf,
    prompt: &str,
    max_tokens: usize,
) -> (
    blyan_runtime::inference::InferenceHandle,
    blyan_runtime::inference::ChatResult,
) {
    let engine = blyan_runtime::inference::InferenceHandle::start(
        blyan_runtime::inference::InferenceConfig {
            model_dir: Some(dir),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let answer = engine
        .generate(
            blyan_runtime::inference::ChatRequest {
                prompt: prompt.into(),
                max_tokens,
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
                stop: Vec::new(),
                max_total_tokens: None,
                top_logprobs: None,
            },
            None,
        )
        .await
        .unwrap();
    (engine, answer)
}

/// RT-PIPE-6: a stage's commitments in an answer's route: each decodes and
/// verifies (its node's key, this chain), names the stage's node and
/// layers, and the chunks run contiguously from position `from` to
/// `to_excl`; the chunks, in order.
fn check_commitments(
    stage: &serde_json::Value,
    chain_id: &str,
    from: u64,
    to_excl: u64,
) -> Vec<blyan_route::commit::ChunkCommitment> {
    let list = stage["commitments"]
        .as_array()
        .unwrap_or_else(|| panic!("no commitments in {stage}"));
    assert!(!list.is_empty(), "{stage}");
    let mut next = from;
    let mut chunks = Vec::new();
    for c in list {
        let bytes = hex::decode(c.as_str().unwrap().trim_start_matches("0x")).unwrap();
        let signed = blyan_route::commit::SignedCommitment::decode(&bytes).unwrap();
        signed.verify(chain_id).unwrap();
        let cm = signed.commitment;
        assert_eq!(
            serde_json::to_value(cm.node).unwrap(),
            stage["node"],
            "{stage}"
        );
        assert_eq!(
            serde_json::json!([cm.first_layer, cm.last_layer]),
            stage["layers"]
        );
        assert_eq!(cm.chunk.first_token, next, "chunks are contiguous");
        next += u64::from(cm.chunk.tokens);
        chunks.push(cm.chunk);
    }
    assert_eq!(
        next, to_excl,
        "the commitments cover every position computed"
    );
    chunks
}

/// A registered inference node of key `seed` running as its own `blyan
/// node` process (killed when the returned guard drops), serving the
/// devnet's model with `inference` (advertising, 300 ms heartbeats).
async fn holder_process(
    net: &Devnet,
    hdir: &std::path::Path,
    seed: u64,
    inference: blyan_runtime::inference::InferenceConfig,
) -> (support::KillOnDrop, PeerId) {
    use blyan_runtime::config::{FileConfig, PeerConfig};
    let url = net.nodes[0].api_url();
    let node_key = key(seed);
    let node = address(&node_key);
    let (p2p, http) = blyan_runtime::chaos::free_addrs(1).unwrap().remove(0);
    register(net, &url, &node_key, &p2p).await;
    std::fs::create_dir_all(hdir).unwrap();
    blyan_runtime::keystore::write_key_file(
        &hdir.join("key.json"),
        &node_key,
        DEVNET_PASSWORD,
        blyan_runtime::keystore::MIN_ITERATIONS,
    )
    .unwrap();
    let config = FileConfig {
        chain_id: net.genesis.chain_id.clone(),
        genesis_file: net.dir.join("genesis.json"),
        data_dir: hdir.join("data"),
        key_file: hdir.join("key.json"),
        key_password_env: "BLYAN_KEY_PASSWORD".into(),
        key_password_file: None,
        p2p_addr: p2p.clone(),
        http_addr: http.clone(),
        block_interval_ms: 300,
        max_body_bytes: blyan_runtime::api::MAX_BODY_BYTES,
        expert_cache_bytes: blyan_runtime::blobs::DEFAULT_CACHE_BYTES,
        rate_limits: blyan_runtime::ratelimit::RateLimitConfig::unlimited(),
        inference: blyan_runtime::inference::InferenceConfig {
            model_dir: Some(blyan_runtime::devnet::model_dir(&net.dir)),
            advertise: true,
            heartbeat_interval_ms: 300,
            ..inference
        },
        http: Default::default(),
        logs: Default::default(),
        api: Default::default(),
        state_sync: Default::default(),
        peers: net
            .peers
            .iter()
            .map(|p| PeerConfig {
                addr: p.addr.clone(),
                public_key: hex::encode(p.public_key),
            })
            .collect(),
    };
    std::fs::write(hdir.join("config.toml"), config.to_toml()).unwrap();
    let holder = support::KillOnDrop(
        std::process::Command::new(support::blyan_bin())
            .args(["node", "--config"])
            .arg(hdir.join("config.toml"))
            .args(["--parent-pid", &std::process::id().to_string()])
            .env("BLYAN_KEY_PASSWORD", DEVNET_PASSWORD)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(hdir.join("node.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    (holder, node)
}

/// RT-PIPE-3/4 across processes: three inference nodes, each its own `blyan
/// node` process, hold layers 0–1 (two of them) and 2–3 (one). A
/// validator's greedy answer through the two-stage route equals the model
/// run in one process; then the process serving the first stage is killed
/// with SIGKILL in the middle of a stream, and the stream completes with
/// exactly the uninterrupted text, replayed through the other holder of
/// layers 0–1 (the stages are slowed by a test-only delay per step so the
/// kill lands mid-stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_across_processes_survives_sigkill_of_a_stage() {
    let dir = tempfile::tempdir().unwrap();
    let net = quick_devnet(dir.path(), true).await;
    let url = net.nodes[0].api_url();
    let stage = |layers: [u32; 2]| blyan_runtime::inference::InferenceConfig {
        layers: Some(layers),
        token_delay_ms: 30,
        // RT-PIPE-9: steps alone, so answers are bit-identical to one
        // process even if a background spot check runs beside them.
        max_stage_batch: 1,
        ..Default::default()
    };
    let mut procs = Vec::new();
    for (i, layers) in [[0, 1], [0, 1], [2, 3]].into_iter().enumerate() {
        let hdir = dir.path().join(format!("stage-{i}"));
        procs.push(holder_process(&net, &hdir, 24_680 + i as u64, stage(layers)).await);
    }
    let nodes: Vec<serde_json::Value> = procs.iter().map(|(_, n)| json_addr(n)).collect();
    // Validator 0 lists the three stage processes live (a process that
    // exits instead fails the test with its log).
    let waiting = std::time::Instant::now();
    loop {
        for (i, (child, _)) in procs.iter_mut().enumerate() {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.path().join(format!("stage-{i}/node.err")))
                    .unwrap_or_default();
                panic!("stage process {i} exited ({status}): {log}");
            }
        }
        let live = get(&url, "/nodes").await["live"]
            .as_array()
            .unwrap()
            .clone();
        if nodes
            .iter()
            .all(|n| live.iter().any(|l| &l["node_id"] == n))
        {
            break;
        }
        assert!(
            waiting.elapsed() < support::DEADLINE,
            "the stage processes were not listed live: {live:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // One process, the whole model: the reference.
    let prompt = "Stages in processes";
    let (_, expected) =
        one_process_answer(blyan_runtime::devnet::model_dir(&net.dir), prompt, 16).await;
    let (s, a) = blyan_runtime::client::post_json(
        &url,
        "/chat",
        &serde_json::json!({ "prompt": prompt, "max_tokens": 16 }),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{a}");
    assert_eq!(
        a["text"], expected.text,
        "the pipeline differs from one process: {a}"
    );
    let route = a["route"].as_array().unwrap();
    assert_eq!(route.len(), 2, "{a}");
    assert_eq!(route[1]["node"], nodes[2], "{a}");
    assert!(metric(&url, "blyan_inference_stage_bytes_total").await > 0.0);

    let ask = serde_json::json!({
        "messages": [{ "role": "user", "content": "Pipelines survive kills" }],
        "max_tokens": 40,
        "temperature": 0,
        "seed": 7,
        "stream": true,
    });
    let (uninterrupted, _) = streamed(&url, &ask).await;
    assert!(!uninterrupted.is_empty());
    // Again, killing the process the stream's planned route (its
    // `x-blyan-route` header) names for layers 0–1, once the stream has
    // started: 40 tokens × 2 stages × 30 ms take over 2.4 s; the kill comes
    // at 0.6 s.
    let pids: Vec<(serde_json::Value, u32)> =
        procs.iter().map(|(c, n)| (json_addr(n), c.id())).collect();
    let mut first = serde_json::Value::Null;
    let (failed_over, blyan) = streamed_killing(&url, &ask, |planned| {
        first = planned[0]["node"].clone();
        let pid = pids
            .iter()
            .find(|(n, _)| *n == first)
            .expect("a stage process")
            .1;
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(600));
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap()
        })
    })
    .await;
    let victim = nodes.iter().position(|n| *n == first).unwrap();
    assert!(victim < 2, "the first stage holds layers 0–1: {blyan}");
    let _ = procs[victim].0.wait();
    assert_eq!(
        failed_over, uninterrupted,
        "the stream after the kill differs: {blyan}"
    );
    let stages = blyan["stages"].as_array().unwrap();
    assert_eq!(
        (&stages[0]["node"], &stages[0]["failed"]),
        (&first, &serde_json::json!(true)),
        "{blyan}"
    );
    let used: Vec<&serde_json::Value> = stages.iter().filter(|s| s["failed"].is_null()).collect();
    assert_eq!(used.len(), 2, "{blyan}");
    assert_eq!(used[0]["node"], nodes[1 - victim], "{blyan}");
    assert_eq!(used[0]["layers"], serde_json::json!([0, 1]), "{blyan}");
    net.stop().await;
}

/// Like [`streamed`], over a raw connection: `on_head` sees the planned
/// route (the `x-blyan-route` header) before the body is read, and what it
/// starts (a thread) is joined, and must succeed, before the text returns.
async fn streamed_killing(
    url: &str,
    body: &serde_json::Value,
    on_head: impl FnOnce(&serde_json::Value) -> std::thread::JoinHandle<std::process::ExitStatus>,
) -> (String, serde_json::Value) {
    use tokio::io::AsyncBufReadExt;
    let host = url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(host).await.unwrap();
    let body = body.to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut reader = tokio::io::BufReader::new(conn);
    let mut planned = None;
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("x-blyan-route: ") {
            planned = Some(serde_json::from_str::<serde_json::Value>(v).unwrap());
        }
    }
    let killer = on_head(&planned.expect("an x-blyan-route header"));
    // The chunked body, de-chunked.
    let mut text = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        let size = usize::from_str_radix(line.trim_end(), 16).unwrap();
        if size == 0 {
            break;
        }
        let mut chunk = vec![0u8; size + 2];
        reader.read_exact(&mut chunk).await.unwrap();
        text.extend_from_slice(&chunk[..size]);
    }
    assert!(killer.join().unwrap().success());
    sse_text(&String::from_utf8(text).unwrap())
}

/// RT-PIPE-2/3, API-CHAT-4 through a pipeline: a client that leaves a
/// streamed request through a two-stage route stops the work at every
/// stage: the router's loop ends at its next token, its calls end, and
/// each stage drops the session's cache; the stages then run no more steps,
/// far fewer than the request asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_a_pipeline_stops_every_stage() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference_nodes = 4;
    // Slow stages (test-only), so the request outlives the client.
    opts.inference.token_delay_ms = 20;
    opts.inference.max_tokens_limit = 4_000;
    let net = Devnet::start(opts).await.unwrap();
    let url = net.nodes[0].api_url();
    let stage_urls: Vec<String> = net.inference.iter().map(|n| n.api_url()).collect();
    let holders: Vec<serde_json::Value> = net
        .inference
        .iter()
        .map(|n| json_addr(&n.address))
        .collect();
    eventually("validator 0 to list the four stage holders", || async {
        let live = get(&url, "/nodes").await["live"]
            .as_array()
            .unwrap()
            .clone();
        holders
            .iter()
            .all(|h| live.iter().any(|n| &n["node_id"] == h))
            .then_some(())
    })
    .await;
    let total = |name: &'static str| {
        let urls = stage_urls.clone();
        async move {
            let mut sum = 0;
            for u in &urls {
                sum += support::metric(u, name).await.unwrap_or(0);
            }
            sum
        }
    };
    let before = total("blyan_inference_stage_steps_total").await;
    // 2,000 tokens through two stages at 20 ms a step would take 80 s.
    let body = serde_json::json!({
        "messages": [{ "role": "user", "content": "A long answer, please" }],
        "max_tokens": 2_000,
        "stream": true,
    })
    .to_string();
    let host = url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&host).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut reader = tokio::io::BufReader::new(conn);
    // Read until content has streamed: the pipeline is running.
    let mut line = String::new();
    let mut content_lines = 0;
    while content_lines < 3 {
        line.clear();
        assert!(
            reader.read_line(&mut line).await.unwrap() > 0,
            "the stream ended early"
        );
        if line.contains("\"content\":\"") && !line.contains("\"content\":\"\"") {
            content_lines += 1;
        }
    }
    assert!(total("blyan_inference_stage_sessions").await >= 1);
    drop(reader);
    eventually("every stage to drop its session", || async {
        (total("blyan_inference_stage_sessions").await == 0).then_some(())
    })
    .await;
    let ran = total("blyan_inference_stage_steps_total").await - before;
    tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
    let later = total("blyan_inference_stage_steps_total").await - before;
    assert_eq!(ran, later, "stages kept running after the client left");
    assert!(ran < 2_000, "{ran} steps: the request was not cut short");
    net.stop().await;
}

/// RT-PIPE-2: stages whose session tables are full (here: no sessions at
/// all, `max_stage_sessions = 0`) answer `busy`; a router that holds only
/// part of the model has nowhere else to go and answers 503 at once,
/// while a validator falls back to its own engine (RT-STAGE-3) and lists
/// the stages that refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_stage_tables_answer_503_or_fall_back_to_a_whole_engine() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference_nodes = 4;
    opts.inference.max_stage_sessions = 0;
    let net = Devnet::start(opts).await.unwrap();
    let url = net.nodes[0].api_url();
    let holders: Vec<serde_json::Value> = net
        .inference
        .iter()
        .map(|n| json_addr(&n.address))
        .collect();
    for u in [url.clone(), net.inference[0].api_url()] {
        eventually("the stage holders to be listed live", || async {
            let live = get(&u, "/nodes").await["live"].as_array().unwrap().clone();
            holders
                .iter()
                .filter(|h| live.iter().any(|n| &n["node_id"] == *h))
                .count()
                .ge(&3)
                .then_some(())
        })
        .await;
    }
    let ask = serde_json::json!({ "prompt": "Anyone free?", "max_tokens": 4 });
    let (s, a) = blyan_runtime::client::post_json(&net.inference[0].api_url(), "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 503, "{a}");
    assert!(a.to_string().contains("full"), "{a}");
    let (s, a) = blyan_runtime::client::post_json(&url, "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 200, "{a}");
    let route = a["route"].as_array().unwrap();
    assert_eq!(
        route.last().unwrap()["node"],
        json_addr(&net.nodes[0].address),
        "{a}"
    );
    assert!(route[0]["failed"] == serde_json::json!(true), "{a}");
    net.stop().await;
}

/// RT-PIPE-7, RT-BEACON-*: five registered stage nodes of `net`'s model,
/// started in this process: layers 0–1 held by a liar (test-only
/// `perturb_outputs`) and two honest nodes, layers 2–3 by two; returns
/// them (the liar first) once validator 0 lists all five live.
async fn start_liar_and_stages(
    net: &Devnet,
    dir: &std::path::Path,
    seed: u64,
) -> Vec<blyan_runtime::node::RunningNode> {
    use blyan_runtime::node::{RunningNode, bind};
    let url = net.nodes[0].api_url();
    let mut stages = Vec::new();
    for (i, (layers, perturb)) in [
        ([0, 1], true),
        ([0, 1], false),
        ([0, 1], false),
        ([2, 3], false),
        ([2, 3], false),
    ]
    .into_iter()
    .enumerate()
    {
        let node_key = key(seed + i as u64);
        let p2p = bind("127.0.0.1:0").await.unwrap();
        let http = bind("127.0.0.1:0").await.unwrap();
        register(net, &url, &node_key, &p2p.local_addr().unwrap().to_string()).await;
        let engine = blyan_runtime::inference::InferenceConfig {
            model_dir: Some(blyan_runtime::devnet::model_dir(&net.dir)),
            advertise: true,
            heartbeat_interval_ms: 300,
            perturb_outputs: perturb,
            layers: Some(layers),
            beacon_interval_ms: 0,
            ..Default::default()
        };
        let data = dir.join(format!("stage-{i}"));
        stages.push(
            RunningNode::start(node_setup(net, data, node_key, engine), p2p, http)
                .await
                .unwrap(),
        );
    }
    let all: Vec<serde_json::Value> = stages.iter().map(|n| json_addr(&n.address)).collect();
    eventually("validator 0 to list the five stages live", || async {
        let live = get(&url, "/nodes").await["live"]
            .as_array()
            .unwrap()
            .clone();
        all.iter()
            .all(|h| live.iter().any(|n| &n["node_id"] == h))
            .then_some(())
    })
    .await;
    stages
}

/// RT-BEACON-*: with no client request and spot checks of client requests
/// off, a liar among the stages is still caught: the validators' routers
/// make up requests (beacons, a passage of held-out text each), route them
/// like any other, check every hop and quarantine the liar; validator 0's
/// `/metrics` counts its beacons by outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beacons_catch_a_lying_stage_without_client_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference.spot_check_rate_ppm = 0;
    opts.inference.beacon_interval_ms = 1_000;
    let net = Devnet::start(opts).await.unwrap();
    let url = net.nodes[0].api_url();
    let stages = start_liar_and_stages(&net, dir.path(), 13_000).await;
    let liar = json_addr(&stages[0].address);
    let beacons = |o: &'static str| {
        let url = url.clone();
        async move {
            metric(
                &url,
                &format!("blyan_inference_beacons_total{{outcome=\"{o}\"}}"),
            )
            .await
        }
    };
    eventually("validator 0's beacons to quarantine the liar", || async {
        let quarantined = get(&url, "/nodes").await["live"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node_id"] == liar && n["quarantined"] == true);
        // The liar loses as the checked stage or as a checker.
        let convicted = beacons("stage_fault").await + beacons("checker_fault").await;
        (quarantined && convicted >= 1.0).then_some(())
    })
    .await;
    let checked =
        beacons("agree").await + beacons("stage_fault").await + beacons("checker_fault").await;
    println!("RT-BEACON: liar quarantined; validator 0's beacons: {checked} checked");
    // Only beacons checked anything: client spot checks are off, and no
    // client asked.
    assert_eq!(
        metric(&url, "blyan_inference_routed_total{served=\"remote\"}").await,
        0.0
    );
    let faults = get(&url, "/faults").await;
    assert!(
        faults["faults"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["loser"] == liar),
        "{faults}"
    );
    for n in stages {
        n.stop(1_000).await;
    }
    net.stop().await;
}

/// RT-PIPE-7: a stage that perturbs its outputs (test-only
/// `perturb_outputs`: every value scaled by 17/16) inside a pipeline is
/// caught by spot checks (rate 1 here): each hop is recomputed from its
/// recorded inputs by another holder of its layers, the commitments are
/// compared, and a third holder settles the mismatching hop before the
/// router quarantines the liar (the honest stage after it, which computed
/// correctly on the liar's outputs, is not blamed); every answer after
/// that is correct and avoids it. Reports how many answers were wrong
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_perturbing_pipeline_stage_is_quarantined_by_its_commitments() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = blyan_runtime::ratelimit::RateLimitConfig::unlimited();
    opts.inference.spot_check_rate_ppm = 1_000_000;
    let net = Devnet::start(opts).await.unwrap();
    let url = net.nodes[0].api_url();
    eventually("the network to commit a block", || async {
        (height(&url).await >= 1).then_some(())
    })
    .await;
    let ask = serde_json::json!({ "prompt": "Check my stages", "max_tokens": 12 });
    // The reference: validator 0's own engine, before any stage exists.
    let (s, reference) = blyan_runtime::client::post_json(&url, "/chat", &ask)
        .await
        .unwrap();
    assert_eq!(s, 200, "{reference}");
    // Layers 0–1: the liar and two honest holders; layers 2–3: two.
    let stages = start_liar_and_stages(&net, dir.path(), 12_000).await;
    let liar = json_addr(&stages[0].address);
    let quarantined = || async {
        get(&url, "/nodes").await["live"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node_id"] == liar && n["quarantined"] == true)
    };
    let (mut wrong, mut asked) = (0, 0);
    while !quarantined().await {
        assert!(
            asked < 40,
            "not quarantined after {asked} requests ({wrong} wrong)"
        );
        let (s, a) = blyan_runtime::client::post_json(&url, "/chat", &ask)
            .await
            .unwrap();
        assert_eq!(s, 200, "{a}");
        asked += 1;
        if a["text"] != reference["text"] {
            wrong += 1;
            assert!(
                a["route"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["node"] == liar),
                "a wrong answer without the liar on its route: {a}"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    println!("RT-PIPE-7: quarantined after {asked} requests, {wrong} of them answered wrongly");
    // The conviction left a fault record signed by validator 0 that any
    // third party can verify, naming the liar (RT-FAULT-1/2).
    let faults = get(&url, "/faults").await;
    let records = faults["faults"].as_array().unwrap();
    let convicting = records
        .iter()
        .find(|f| f["loser"] == liar)
        .unwrap_or_else(|| panic!("no fault record names the liar: {faults}"));
    let bytes = hex::decode(
        convicting["record"]
            .as_str()
            .unwrap()
            .trim_start_matches("0x"),
    )
    .unwrap();
    let record = blyan_route::fault::SignedFaultRecord::decode(&bytes).unwrap();
    let reporter = record
        .verify("blyan-devnet", blyan_route::commit::Tolerance::default())
        .unwrap();
    assert_eq!(json_addr(&reporter), json_addr(&net.nodes[0].address));
    assert_eq!(serde_json::to_value(record.record.loser()).unwrap(), liar);
    let blyan_route::fault::FaultInput::TokenPrefix { tokens } = &record.record.input else {
        panic!("a token prefix");
    };
    assert_eq!(
        tokens.len() as u64,
        record.record.position + u64::from(record.record.stage.commitment.chunk.tokens),
        "the prefix reaches the disputed chunk's end"
    );
    eventually("the conviction to be counted", || async {
        let fault = |o: &str| format!("blyan_inference_spot_checks_total{{outcome=\"{o}\"}}");
        let stage = metric(&url, &fault("stage_fault")).await;
        let checker = metric(&url, &fault("checker_fault")).await;
        (stage + checker >= 1.0).then_some(())
    })
    .await;
    for _ in 0..5 {
        let (s, a) = blyan_runtime::client::post_json(&url, "/chat", &ask)
            .await
            .unwrap();
        assert_eq!(s, 200, "{a}");
        assert_eq!(
            a["text"], reference["text"],
            "a wrong answer after the quarantine: {a}"
        );
        assert!(
            a["route"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["node"] != liar),
            "routed through a quarantined node: {a}"
        );
    }
    for n in stages {
        n.stop(1_000).await;
    }
    net.stop().await;
}
