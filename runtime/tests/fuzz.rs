//! Structure-aware fuzzing of the runtime's decoders of outside input
//! (issue 18) on stable Rust with proptest. Valid values are built, encoded
//! and then mutated (the byte mutations of the state machine's fuzz tests,
//! shared with `#[path]`, and JSON-tree mutations for JSON inputs):
//!
//! - `fuzz_frames`: P2P frames sealed with a real node key
//!   ([`transport::seal`]) opened by [`transport::open`] (the gRPC `Deliver`
//!   path): a mutated frame is always refused; payloads mutated and then
//!   signed again reach the batch and message decoders, and an accepted one
//!   is exactly the frame `seal` makes of what it decoded;
//! - `fuzz_blob_manifest`: [`BlobManifest::decode`] (a peer's manifest);
//! - `fuzz_blob_chunks`: chunk messages (`index ‖ bytes`, split as the
//!   fetcher splits them) into [`BlobStore::put_chunk`], with true and
//!   mutated manifests;
//! - `fuzz_key_file`: key files written by the keystore, mutated as text and
//!   as JSON, through [`KeyFile::from_json`] and `decrypt` with the right and
//!   a wrong password;
//! - `fuzz_tls_certificate`: a peer's TLS certificate (DER) through
//!   [`tls::verify_certificate`] and its node-key extension through
//!   [`tls::decode_extension`];
//! - `fuzz_api`: every JSON body the HTTP API parses (`POST /tx`, `/mine`,
//!   `/p2p/register`, `/chat`, `/v1/chat/completions`) and the ids in its
//!   paths and queries, sent through the real router (`api::router`) over a
//!   real node service, so each goes through the handler's own parsing.
//!
//! Properties: no panic anywhere; valid inputs are accepted with their
//! value; accepted mutants satisfy the checks named in each test. Case
//! counts: `BLYAN_FUZZ_CASES` (see the state machine's `fuzz/support.rs`);
//! the longer run on demand is, for example,
//! `BLYAN_FUZZ_CASES=20000 cargo test -p blyan-runtime --test fuzz -- --nocapture`.

#[path = "../../state-machine/tests/it/fuzz/mutate.rs"]
mod mutate;
#[path = "../../state-machine/tests/it/fuzz/strategies.rs"]
mod strategies;
#[path = "../../state-machine/tests/it/fuzz/support.rs"]
mod support;

use blyan_runtime::Error;
use blyan_runtime::api::{self, ApiConfig};
use blyan_runtime::blobs::{
    BlobId, BlobManifest, BlobStore, CHUNK_BYTES, MAX_BLOB_BYTES, chunk_count,
};
use blyan_runtime::keystore::{KeyFile, MAX_ITERATIONS, MIN_ITERATIONS};
use blyan_runtime::ratelimit::RateLimitConfig;
use blyan_runtime::service::NodeService;
use blyan_runtime::tls::{self, NodeCertificate};
use blyan_runtime::transport::{self, MAX_CLOCK_SKEW_MS, Outbound};
use blyan_state_machine::crypto::sign;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::node::{NodeConfig, PeerId, WireMessage};
use blyan_state_machine::params::Params;
use blyan_state_machine::pol::{PolBlockType, PolTx};
use blyan_state_machine::testkit::{address, key, pol_block, testnet, transfer, tx};
use blyan_state_machine::tx::{Domain, PublicKey, TxKind, public_key_of, signing_bytes};
use k256::ecdsa::SigningKey;
use mutate::{Mutation, mutation_sets, mutations};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseResult;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use support::{Counts, cases, run};

const CHAIN: &str = "blyan-test";

// ---------------------------------------------------------------- frames

/// Version byte, node key, timestamp and signature (transport.rs `HEADER_BYTES`).
const FRAME_HEADER_BYTES: usize = 1 + 33 + 8 + 64;

fn peers() -> BTreeMap<PublicKey, PeerId> {
    (0..4)
        .map(|i| (public_key_of(&key(i)), address(&key(i))))
        .collect()
}

/// A frame body (no length prefix) carrying `payload` (the batch), signed
/// by `k` as `seal` signs: what a peer holding a valid key can send.
fn signed_frame(k: &SigningKey, ts: u64, payload: &[u8]) -> Vec<u8> {
    let mut signed = ts.to_be_bytes().to_vec();
    signed.extend_from_slice(payload);
    let sig = sign(k, &signing_bytes(Domain::PeerMessage, CHAIN, &signed));
    let mut f = vec![2u8];
    f.extend_from_slice(&public_key_of(k));
    f.extend_from_slice(&ts.to_be_bytes());
    f.extend_from_slice(&sig);
    f.extend_from_slice(payload);
    f
}

fn batch() -> impl Strategy<Value = Vec<WireMessage>> {
    prop::collection::vec(strategies::wire_message(), 1..=3)
}

#[test]
fn fuzz_frames() {
    let counts = Counts::default();
    let peers = peers();
    let strangers: BTreeMap<PublicKey, PeerId> = (4..6)
        .map(|i| (public_key_of(&key(i)), address(&key(i))))
        .collect();
    run(
        "transport::open (frames)",
        cases(30),
        (
            (0..4u64, 1_000_000_000_000u64..2_000_000_000_000),
            batch(),
            batch(),
            mutation_sets(4),
            mutation_sets(4),
        ),
        &counts,
        |((who, ts), msgs, other_msgs, frame_muts, payload_muts)| {
            let k = key(who);
            let frame = transport::seal(&k, CHAIN, ts, &msgs);
            prop_assert_eq!(
                u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
                frame.len() - 4
            );
            let body = &frame[4..];
            let payload = &body[FRAME_HEADER_BYTES..];
            prop_assert_eq!(signed_frame(&k, ts, payload), body.to_vec());
            match transport::open(body, CHAIN, &peers, ts + MAX_CLOCK_SKEW_MS) {
                Ok((from, got)) => {
                    prop_assert_eq!(from, address(&k));
                    prop_assert_eq!(&got, &msgs);
                }
                Err(e) => prop_assert!(false, "a sealed frame was refused: {e}"),
            }
            prop_assert!(matches!(
                transport::open(body, "blyan-other", &peers, ts),
                Err(Error::BadFrameSignature)
            ));
            prop_assert!(matches!(
                transport::open(body, CHAIN, &strangers, ts),
                Err(Error::UnknownPeer(_))
            ));
            let stale = transport::open(body, CHAIN, &peers, ts + MAX_CLOCK_SKEW_MS + 1);
            prop_assert!(
                matches!(stale, Err(Error::StaleFrame { .. })),
                "a stale frame was not refused as stale"
            );
            counts.round_trip();
            let other = transport::seal(&key((who + 1) % 4), CHAIN, ts, &other_msgs);
            let other_body = &other[4..];
            // Any change to a signed frame is refused.
            for muts in &frame_muts {
                let m = mutate::apply(body, other_body, muts);
                let r = transport::open(&m, CHAIN, &peers, ts);
                if m.as_slice() != body && m.as_slice() != other_body {
                    prop_assert!(r.is_err(), "a mutated frame was accepted");
                }
                counts.outcome(&r);
            }
            // A peer with a valid key sends a damaged batch: the signature
            // holds, so the batch and message decoders see it.
            let other_payload = &other_body[FRAME_HEADER_BYTES..];
            for muts in &payload_muts {
                let p = mutate::apply(payload, other_payload, muts);
                let f = signed_frame(&k, ts, &p);
                let r = transport::open(&f, CHAIN, &peers, ts);
                match &r {
                    Ok((from, got)) => {
                        prop_assert_eq!(*from, address(&k));
                        prop_assert_eq!(
                            &transport::seal(&k, CHAIN, ts, got)[4..],
                            f.as_slice(),
                            "an accepted batch is canonical"
                        );
                    }
                    Err(e) => prop_assert!(
                        p.as_slice() != payload,
                        "the valid payload was refused: {e}"
                    ),
                }
                counts.outcome(&r);
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- blobs

/// A manifest whose hashes are derived from `seed` (cheap for 64 GiB blobs).
fn manifest_of(total_bytes: u64, seed: [u8; 32]) -> BlobManifest {
    let n = chunk_count(total_bytes) as u32;
    BlobManifest {
        total_bytes,
        chunk_hashes: (0..n)
            .map(|i| {
                let mut h = seed;
                h[..4].copy_from_slice(&i.to_be_bytes());
                h
            })
            .collect(),
    }
}

fn manifest() -> impl Strategy<Value = BlobManifest> {
    let chunk = CHUNK_BYTES as u64;
    (
        prop_oneof![
            16 => 0..=3 * chunk,
            4 => prop::sample::select(vec![0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk]),
            4 => 0..=64 * chunk,
            // 2 MiB manifests: rarer, they cost as much as fifty small ones.
            1 => MAX_BLOB_BYTES - 2 * chunk..=MAX_BLOB_BYTES,
        ],
        any::<[u8; 32]>(),
    )
        .prop_map(|(t, seed)| manifest_of(t, seed))
}

#[test]
fn fuzz_blob_manifest() {
    let counts = Counts::default();
    run(
        "BlobManifest::decode",
        cases(50),
        (manifest(), manifest(), mutation_sets(8)),
        &counts,
        |(m, other, sets)| {
            let bytes = m.encode();
            let back = BlobManifest::decode(&bytes).ok();
            prop_assert_eq!(back.as_ref(), Some(&m));
            counts.round_trip();
            let other = other.encode();
            for muts in &sets {
                let input = mutate::apply(&bytes, &other, muts);
                let r = BlobManifest::decode(&input);
                if let Ok(d) = &r {
                    prop_assert_eq!(&d.encode(), &input, "strict: one encoding");
                    prop_assert!(d.validate().is_ok());
                    prop_assert!(d.total_bytes <= MAX_BLOB_BYTES);
                    let sum: u64 = (0..d.chunk_hashes.len() as u32)
                        .map(|i| d.chunk_len(i) as u64)
                        .sum();
                    prop_assert_eq!(sum, d.total_bytes);
                }
                counts.outcome(&r);
            }
            Ok(())
        },
    );
}

/// Blob payloads: mostly small, sometimes just over one chunk. The first 8
/// bytes are a fresh counter, so every case has blobs of its own.
fn payload(counter: &AtomicU64, fill: &[u8], big: bool) -> Vec<u8> {
    let mut p = counter
        .fetch_add(1, Ordering::Relaxed)
        .to_be_bytes()
        .to_vec();
    if big {
        p.extend(fill.iter().cycle().take(CHUNK_BYTES));
    }
    p.extend_from_slice(fill);
    p
}

/// What the fetcher sends for chunk `index` of `payload`: `index (u32 BE) ‖ bytes`.
fn chunk_message(payload: &[u8], index: usize) -> Vec<u8> {
    let mut m = (index as u32).to_be_bytes().to_vec();
    m.extend_from_slice(payload.chunks(CHUNK_BYTES).nth(index).unwrap_or(&[]));
    m
}

#[test]
fn fuzz_blob_chunks() {
    let counts = Counts::default();
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    let counter = AtomicU64::new(0);
    run(
        "BlobStore::put_chunk (chunk messages, manifests)",
        cases(10),
        (
            prop::collection::vec(any::<u8>(), 0..2048),
            prop::bool::weighted(0.1),
            any::<Index>(),
            mutation_sets(6),
            mutation_sets(3),
        ),
        &counts,
        |(fill, big, which, chunk_muts, manifest_muts)| {
            // A true manifest and damaged chunk messages.
            let p = payload(&counter, &fill, big);
            let (id, manifest) = (BlobId::of(&p), BlobManifest::of(&p));
            let chunks: Vec<&[u8]> = p.chunks(CHUNK_BYTES).collect();
            let target = which.index(chunks.len());
            let msg = chunk_message(&p, target);
            let other = chunk_message(&p, (target + 1) % chunks.len());
            for muts in &chunk_muts {
                let m = mutate::apply(&msg, &other, muts);
                let Some((index, bytes)) = m.split_first_chunk::<4>() else {
                    counts.refused(); // The fetcher refuses a message shorter than its index.
                    continue;
                };
                let index = u32::from_be_bytes(*index);
                // Once complete (a mutation that changed nothing), a blob
                // answers every chunk with `Ok(true)` without storing it.
                let complete_before = store.has(&id).unwrap();
                let r = store.put_chunk(&id, &manifest, index, bytes);
                if r.is_ok() && !complete_before {
                    prop_assert_eq!(
                        Some(&bytes),
                        chunks.get(index as usize),
                        "a wrong chunk was stored"
                    );
                }
                counts.outcome(&r);
            }
            for (i, c) in chunks.iter().enumerate() {
                let done = store.put_chunk(&id, &manifest, i as u32, c);
                prop_assert!(done.is_ok(), "chunk {i} refused: {:?}", done.err());
            }
            prop_assert_eq!(store.get(&id).unwrap(), Some(p.clone()));
            counts.round_trip();
            // A lying or damaged manifest from a peer, with the true chunks.
            let q = payload(&counter, &fill, big);
            let q_id = BlobId::of(&q);
            let q_manifest = BlobManifest::of(&q).encode();
            for muts in &manifest_muts {
                let bytes = mutate::apply(&q_manifest, &manifest.encode(), muts);
                let r = BlobManifest::decode(&bytes);
                counts.outcome(&r);
                let Ok(m) = r else { continue };
                let mut complete = false;
                for (i, c) in q.chunks(CHUNK_BYTES).enumerate().take(3) {
                    let r = store.put_chunk(&q_id, &m, i as u32, c);
                    complete |= matches!(r, Ok(true));
                    counts.outcome(&r);
                }
                if complete {
                    prop_assert_eq!(store.get(&q_id).unwrap(), Some(q.clone()));
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- JSON

/// JSON values a hostile client may put anywhere.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop::sample::select(vec![
            json!(0),
            json!(-1),
            json!(1),
            json!(i64::MIN),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(u32::MAX),
            json!(u32::MAX as u64 + 1),
            json!(0.5),
            json!(-0.0),
            json!(1e308),
            json!(-1e308),
            json!(""),
            json!("0x"),
            json!("0x00"),
            json!("zz"),
        ]),
        any::<i64>().prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| json!(v)),
        "\\PC{0,12}".prop_map(Value::String),
        ("(0x)?[0-9a-fA-F]{0,140}").prop_map(Value::String),
        (0usize..70_000).prop_map(|n| Value::String("a".repeat(n))),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

#[derive(Clone, Debug)]
enum JsonMutation {
    Replace(Index, Value),
    Remove(Index),
    Add(Index, String, Value),
    /// The node nested `depth` arrays deep (serde_json's parser stops at
    /// 128; `fuzz_api` sends 100,000 levels once).
    Nest(Index, u16),
}

fn json_mutation() -> impl Strategy<Value = JsonMutation> {
    prop_oneof![
        4 => (any::<Index>(), json_value()).prop_map(|(i, v)| JsonMutation::Replace(i, v)),
        2 => any::<Index>().prop_map(JsonMutation::Remove),
        2 => (any::<Index>(), prop_oneof!["[a-z_]{1,12}", Just("tx".to_string()), Just("prompt".to_string())], json_value())
            .prop_map(|(i, k, v)| JsonMutation::Add(i, k, v)),
        1 => (any::<Index>(), prop_oneof![1u16..8, 100u16..300]).prop_map(|(i, d)| JsonMutation::Nest(i, d)),
    ]
}

/// JSON pointers of every node of `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                pointers(
                    c,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                pointers(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

fn apply_json(mut v: Value, muts: &[JsonMutation]) -> Value {
    for m in muts {
        let mut ps = Vec::new();
        pointers(&v, String::new(), &mut ps);
        let pick = |i: &Index| ps[i.index(ps.len())].clone();
        match m {
            JsonMutation::Replace(i, new) => {
                if let Some(n) = v.pointer_mut(&pick(i)) {
                    *n = new.clone();
                }
            }
            JsonMutation::Remove(i) => {
                let p = pick(i);
                if let Some((parent, last)) = p.rsplit_once('/')
                    && let Some(n) = v.pointer_mut(parent)
                {
                    match n {
                        Value::Object(o) => {
                            o.remove(&last.replace("~1", "/").replace("~0", "~"));
                        }
                        Value::Array(a) => {
                            if let Ok(i) = last.parse::<usize>()
                                && i < a.len()
                            {
                                a.remove(i);
                            }
                        }
                        _ => {}
                    }
                }
            }
            JsonMutation::Add(i, k, new) => {
                if let Some(Value::Object(o)) = v.pointer_mut(&pick(i)) {
                    o.insert(k.clone(), new.clone());
                }
            }
            JsonMutation::Nest(i, depth) => {
                if let Some(n) = v.pointer_mut(&pick(i)) {
                    let mut x = n.take();
                    for _ in 0..*depth {
                        x = Value::Array(vec![x]);
                    }
                    *n = x;
                }
            }
        }
    }
    v
}

/// A JSON input's mutations: on the tree, then on the text's bytes.
#[derive(Clone, Debug)]
struct JsonMutations {
    tree: Vec<JsonMutation>,
    pretty: bool,
    bytes: Vec<Mutation>,
}

fn json_mutations() -> impl Strategy<Value = JsonMutations> {
    (
        prop::collection::vec(json_mutation(), 0..3),
        any::<bool>(),
        prop_oneof![1 => Just(Vec::new()), 2 => mutations()],
    )
        .prop_map(|(tree, pretty, bytes)| JsonMutations {
            tree,
            pretty,
            bytes,
        })
}

fn json_text(v: &Value, pretty: bool) -> Vec<u8> {
    if pretty {
        serde_json::to_vec_pretty(v).unwrap()
    } else {
        serde_json::to_vec(v).unwrap()
    }
}

fn mutate_json(original: &Value, other: &[u8], m: &JsonMutations) -> Vec<u8> {
    let tree = apply_json(original.clone(), &m.tree);
    mutate::apply(&json_text(&tree, m.pretty), other, &m.bytes)
}

// ---------------------------------------------------------------- key files

const PASSWORDS: [&str; 2] = ["correct horse battery staple", "ünïcødé 🔑 \"quoted\""];

/// Key files as the keystore writes them (deterministic salt and nonce, the
/// minimum iteration count).
fn key_files() -> &'static [(SigningKey, Value)] {
    static FILES: std::sync::OnceLock<Vec<(SigningKey, Value)>> = std::sync::OnceLock::new();
    FILES.get_or_init(|| {
        PASSWORDS
            .iter()
            .enumerate()
            .map(|(i, pw)| {
                let k = key(100 + i as u64);
                let f = KeyFile::encrypt_with(
                    &k,
                    pw,
                    MIN_ITERATIONS,
                    [i as u8 + 1; 16],
                    [i as u8 + 7; 12],
                );
                (k, serde_json::from_str(&f.to_json()).unwrap())
            })
            .collect()
    })
}

/// Whether `decrypt` gets as far as PBKDF2 on `f` (every cheap check
/// passes). PBKDF2 at 100,000 iterations is most of a case's cost (about
/// 0.5 s in the unoptimised test build), so the fuzzer rations it; this
/// only decides the cost, never what is checked.
fn reaches_kdf(f: &KeyFile) -> bool {
    let c = &f.crypto;
    let len = |s: &str| hex::decode(s).map(|v| v.len()).ok();
    f.version == 1
        && c.kdf == "pbkdf2"
        && c.kdfparams.prf == "hmac-sha256"
        && c.kdfparams.dklen == 32
        && c.cipher == "aes-256-gcm"
        && (MIN_ITERATIONS..=MAX_ITERATIONS).contains(&c.kdfparams.c)
        && len(&c.kdfparams.salt).is_some_and(|n| n >= 16)
        && len(&c.cipherparams.nonce) == Some(12)
        && len(&c.ciphertext) == Some(48)
}

#[test]
fn fuzz_key_file() {
    let counts = Counts::default();
    let (cheap, kdf) = (AtomicU64::new(0), AtomicU64::new(0));
    let (k0, json0) = &key_files()[0];
    let f0 = KeyFile::from_json(&serde_json::to_string_pretty(json0).unwrap()).unwrap();
    assert_eq!(f0.decrypt(PASSWORDS[0]).unwrap().to_bytes(), k0.to_bytes());
    counts.round_trip();
    run(
        "KeyFile::from_json + decrypt",
        cases(20),
        (
            0..PASSWORDS.len(),
            prop::collection::vec(json_mutations(), 1..=8),
            prop::bool::weighted(0.02),
            any::<Index>(),
        ),
        &counts,
        |(i, sets, run_kdf, pick)| {
            let (k, json) = &key_files()[i];
            let pw = PASSWORDS[i];
            let other = json_text(&key_files()[1 - i].1, true);
            let mut costly = Vec::new();
            for m in &sets {
                let bytes = mutate_json(json, &other, m);
                // A file that is not UTF-8 fails to read as text; parse
                // what a lossy reader would see instead.
                let r = KeyFile::from_json(&String::from_utf8_lossy(&bytes));
                counts.outcome(&r);
                let Ok(f) = r else { continue };
                prop_assert_eq!(&KeyFile::from_json(&f.to_json()).unwrap(), &f);
                if reaches_kdf(&f) {
                    costly.push(f);
                } else {
                    cheap.fetch_add(2, Ordering::Relaxed);
                    prop_assert!(f.decrypt(pw).is_err(), "a malformed file opened");
                    prop_assert!(f.decrypt("wrong").is_err());
                }
            }
            // Iteration counts above the floor only cost time (up to
            // MAX_ITERATIONS by design); bound the fuzzer's.
            costly.retain(|f| f.crypto.kdfparams.c <= 2 * MIN_ITERATIONS);
            if run_kdf && !costly.is_empty() {
                let f = &costly[pick.index(costly.len())];
                kdf.fetch_add(1, Ordering::Relaxed);
                match f.decrypt(pw) {
                    Ok(got) => {
                        prop_assert_eq!(
                            got.to_bytes(),
                            k.to_bytes(),
                            "AES-GCM let a different key through"
                        );
                        prop_assert_eq!(f.address, address(k));
                        kdf.fetch_add(1, Ordering::Relaxed);
                        prop_assert!(
                            f.decrypt(&format!("{pw}!")).is_err(),
                            "a wrong password opened the file"
                        );
                    }
                    Err(e) => prop_assert!(matches!(e, Error::WrongPasswordOrTampered), "{e}"),
                }
            }
            Ok(())
        },
    );
    eprintln!(
        "fuzz KeyFile: decrypt calls: {} refused before PBKDF2, {} through PBKDF2 and AES-GCM",
        cheap.load(Ordering::Relaxed),
        kdf.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------- TLS

fn certificates() -> &'static [(PeerId, Vec<u8>)] {
    static CERTS: std::sync::OnceLock<Vec<(PeerId, Vec<u8>)>> = std::sync::OnceLock::new();
    CERTS.get_or_init(|| {
        (0..2)
            .map(|i| {
                let c = NodeCertificate::generate(&key(i), CHAIN).unwrap();
                (address(&key(i)), c.cert.as_ref().to_vec())
            })
            .collect()
    })
}

#[test]
fn fuzz_tls_certificate() {
    let counts = Counts::default();
    let allowed: BTreeSet<PeerId> = certificates().iter().map(|(a, _)| *a).collect();
    let now_s = transport::now_ms() / 1000;
    run(
        "tls::verify_certificate + decode_extension",
        cases(50),
        (
            0..2usize,
            mutation_sets(8),
            strategies::public_key(),
            strategies::signature(),
            mutations(),
        ),
        &counts,
        |(i, sets, pk, sig, ext_muts)| {
            let (who, der) = &certificates()[i];
            let ok = tls::verify_certificate(der, CHAIN, &allowed, now_s);
            prop_assert_eq!(ok.as_ref().ok(), Some(who));
            prop_assert!(tls::verify_certificate(der, "blyan-other", &allowed, now_s).is_err());
            counts.round_trip();
            let other = &certificates()[1 - i].1;
            for muts in &sets {
                let m = mutate::apply(der, other, muts);
                let r = tls::verify_certificate(&m, CHAIN, &allowed, now_s);
                if let Ok(a) = &r {
                    prop_assert!(allowed.contains(a));
                }
                counts.outcome(&r);
            }
            let ext = tls::encode_extension(&pk, &sig);
            prop_assert_eq!(tls::decode_extension(&ext).ok(), Some((pk, sig)));
            let fake_key: PublicKey = sig[..33].try_into().unwrap();
            let m = mutate::apply(&ext, &tls::encode_extension(&fake_key, &sig), &ext_muts);
            let r = tls::decode_extension(&m);
            if let Ok((k, s)) = &r {
                prop_assert_eq!(tls::encode_extension(k, s), m);
            }
            counts.outcome(&r);
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- HTTP API

struct NullOutbound;

impl Outbound for NullOutbound {
    fn send(&self, _: PeerId, _: &WireMessage) {}
    fn broadcast(&self, _: &WireMessage) {}
    fn broadcast_except(&self, _: PeerId, _: &WireMessage) {}
    fn connected_peers(&self) -> usize {
        0
    }
}

/// The API's router over a running node service (not a validator of its
/// one-validator chain, so the chain does not move).
struct Api {
    router: axum::Router,
    rt: tokio::runtime::Runtime,
    shutdown: tokio::sync::watch::Sender<bool>,
    _inbound: tokio::sync::mpsc::Sender<transport::Inbound>,
    _dir: tempfile::TempDir,
}

impl Api {
    fn start(genesis: &blyan_state_machine::genesis::Genesis, node_key: SigningKey) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let (service, handle, requests) = NodeService::open(
            NodeConfig::default(),
            node_key,
            genesis,
            &dir.path().join("chain"),
            Arc::new(NullOutbound),
        )
        .unwrap();
        let (inbound_tx, inbound_rx) = tokio::sync::mpsc::channel(16);
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(service.run(requests, inbound_rx, shutdown_rx));
        });
        let blobs = Arc::new(BlobStore::open(&dir.path().join("blobs")).unwrap());
        let config = ApiConfig {
            rate_limits: RateLimitConfig::unlimited(),
            ..ApiConfig::default()
        };
        Api {
            router: api::router(handle, &config, None, Some(blobs)),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            shutdown,
            _inbound: inbound_tx,
            _dir: dir,
        }
    }

    /// The status and body of `method path` with `body`; `None` if the
    /// request line is not a valid URI (the HTTP server refuses it before
    /// routing).
    fn call(&self, method: &str, path: &str, body: Vec<u8>) -> Option<(u16, Vec<u8>)> {
        use tower::ServiceExt;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .ok()?;
        self.rt.block_on(async {
            let resp = self.router.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            Some((status, bytes.to_vec()))
        })
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// An API answer is a JSON document; an error one is `{code, reason, message}`.
fn check_answer(status: u16, body: &[u8]) -> TestCaseResult {
    prop_assert!(
        matches!(
            status,
            200 | 400 | 403 | 404 | 409 | 410 | 413 | 422 | 503 | 507
        ),
        "status {status}: {}",
        String::from_utf8_lossy(body)
    );
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        TestCaseError::fail(format!(
            "status {status}: body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        ))
    })?;
    if status >= 400 {
        // API-KEY-6: OpenAI's error shape on /v1/*, the seed's elsewhere.
        let openai = v["error"]["message"].is_string()
            && v["error"]["type"].is_string()
            && v["error"]["code"].is_string();
        prop_assert!(
            openai || (v["code"].is_u64() && v["reason"].is_string() && v["message"].is_string()),
            "{v}"
        );
    }
    Ok(())
}

fn hex0x(b: &[u8]) -> String {
    format!("0x{}", hex::encode(b))
}

/// Valid bodies of every POST route.
fn bodies(net: &blyan_state_machine::testkit::TestNet) -> BoxedStrategy<(&'static str, Value)> {
    let sender = net.accounts[0].clone();
    let sender2 = sender.clone();
    let transfer_body = (0u64..4, strategies::address(), 0u128..1_000).prop_map(move |(nonce, to, amount)| {
        json!({ "tx": hex0x(&transfer(CHAIN, &sender, nonce, to, amount).encode()) })
    });
    let garbage_tx = strategies::signed_tx().prop_map(|t| json!({ "tx": hex0x(&t.encode()) }));
    let mine = (
        prop::collection::vec(any::<u8>(), 0..256),
        0u64..4,
        prop::option::of(0.0f64..10.0),
    )
        .prop_map(move |(payload, nonce, loss)| {
            let block = pol_block(
                PolBlockType::Data,
                [0; 32],
                vec![],
                &payload,
                address(&sender2),
            );
            let t = tx(
                CHAIN,
                &sender2,
                nonce,
                TxKind::Pol(Box::new(PolTx::RegisterBlock(block))),
                100_000_000_000,
            );
            let mut v = json!({ "tx": hex0x(&t.encode()), "block_data": hex0x(&payload) });
            if let Some(l) = loss {
                v["candidate_loss"] = json!(l);
            }
            v
        });
    // The API's node is `net.accounts[1]` (`fuzz_api`): the receiver an
    // announcement names (API-REG-5).
    let receiver = address(&net.accounts[1]);
    let register = (
        0u64..3,
        "[a-z0-9.-]{1,20}",
        any::<u16>(),
        prop::collection::vec("[a-z0-9.]{0,16}", 0..3),
    )
        .prop_map(move |(i, host, port, experts)| {
            let k = key(50 + i);
            let a = blyan_runtime::registry::sign_announcement(
                &k,
                CHAIN,
                &receiver,
                &host,
                port,
                &experts,
                transport::now_ms(),
            )
            .unwrap();
            json!({
                "node_id": a.node_id.to_string(),
                "public_key": hex0x(&a.public_key),
                "host": a.host,
                "port": a.port,
                "available_experts": a.available_experts,
                "timestamp_ms": a.timestamp_ms,
                "signature": hex0x(&a.signature),
            })
        });
    let chat = ("\\PC{0,40}", prop::option::of(0usize..100), prop::option::of(0.0f64..2.0), any::<bool>(), prop::collection::vec("[a-z]{0,4}", 0..3))
        .prop_map(|(prompt, max_tokens, temperature, use_moe, stop)| {
            json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "use_moe": use_moe, "top_p": 0.9, "seed": 7, "stop": stop })
        });
    let completions = ("\\PC{0,40}", any::<bool>(), prop::option::of(0usize..100))
        .prop_map(|(content, stream, max_tokens)| {
            json!({ "model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream, "stop": ["x"], "seed": 1 })
        });
    prop_oneof![
        2 => transfer_body.prop_map(|v| ("/tx", v)).boxed(),
        1 => garbage_tx.prop_map(|v| ("/tx", v)).boxed(),
        2 => mine.prop_map(|v| ("/mine", v)).boxed(),
        2 => register.prop_map(|v| ("/p2p/register", v)).boxed(),
        1 => chat.prop_map(|v| ("/chat", v)).boxed(),
        1 => completions.prop_map(|v| ("/v1/chat/completions", v)).boxed(),
    ]
    .boxed()
}

/// Paths and queries with ids in them (valid ones, then mutated).
fn get_paths() -> impl Strategy<Value = (&'static str, String)> {
    prop_oneof![
        strategies::hash().prop_map(|h| ("/tx/", hex0x(&h))),
        strategies::address().prop_map(|a| ("/account/", a.to_string())),
        strategies::hash().prop_map(|h| ("/block/", hex0x(&h))),
        strategies::u64_edge().prop_map(|h| ("/block/", h.to_string())),
        strategies::hash().prop_map(|h| ("/pol/blocks/", hex0x(&h))),
        (strategies::hash(), 0usize..200)
            .prop_map(|(h, n)| ("/pol/blocks?", format!("after={}&limit={n}", hex0x(&h)))),
    ]
}

/// Percent-encodes every byte outside the unreserved set (and the query's
/// `=` and `&`).
fn percent_encode(b: &[u8], query: bool) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || (query && b"=&".contains(&c)) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

#[test]
fn fuzz_api() {
    let net = testnet(1, 2, Params::default());
    let api = Api::start(&net.genesis, net.accounts[1].clone());
    let counts = Counts::default();
    let non_json_get_errors = AtomicU64::new(0);
    let example = std::sync::Mutex::new(None::<String>);
    // The body limit (413) and the parser's depth limit hold.
    let (status, body) = api
        .call("POST", "/tx", vec![b' '; api::MAX_BODY_BYTES + 1])
        .unwrap();
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let (status, _) = api.call("POST", "/tx", deep.into_bytes()).unwrap();
    assert_eq!(status, 400);
    run(
        "HTTP API bodies, paths and queries (api::router)",
        cases(40),
        (
            bodies(&net),
            bodies(&net),
            prop::collection::vec(json_mutations(), 1..=4),
            get_paths(),
            mutations(),
        ),
        &counts,
        |((route, valid), (_, other), sets, (prefix, id), id_muts)| {
            let (status, body) = api
                .call("POST", route, serde_json::to_vec(&valid).unwrap())
                .unwrap();
            check_answer(status, &body)?;
            match route {
                "/chat" | "/v1/chat/completions" => prop_assert_eq!(status, 503, "no engine"),
                // API-REG-6: the fuzzed nodes hold no on-chain registration.
                "/p2p/register" => {
                    prop_assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body))
                }
                _ => prop_assert!(
                    status != 400,
                    "a valid body was refused as malformed: {}",
                    String::from_utf8_lossy(&body)
                ),
            }
            counts.round_trip();
            let other = serde_json::to_vec(&other).unwrap();
            for m in &sets {
                let input = mutate_json(&valid, &other, m);
                let (status, body) = api.call("POST", route, input).unwrap();
                check_answer(status, &body)?;
                if status == 200 {
                    counts.accepted()
                } else {
                    counts.refused()
                }
            }
            let mutated = mutate::apply(id.as_bytes(), b"0x00", &id_muts);
            let path = format!(
                "{prefix}{}",
                percent_encode(&mutated, prefix.ends_with('?'))
            );
            if let Some((status, body)) = api.call("GET", &path, Vec::new()) {
                prop_assert!(status < 500 || status == 503, "GET {path}: {status}");
                // Every error is the API's JSON error, path and query
                // rejections included.
                if status >= 400 {
                    check_answer(status, &body)?;
                }
                if status >= 400 && serde_json::from_slice::<Value>(&body).is_err() {
                    example.lock().unwrap().get_or_insert_with(|| {
                        let path: String = path.chars().take(120).collect();
                        format!("GET {path} -> {status} {}", String::from_utf8_lossy(&body))
                    });
                    non_json_get_errors.fetch_add(1, Ordering::Relaxed);
                }
                if status == 200 {
                    counts.accepted()
                } else {
                    counts.refused()
                }
            }
            Ok(())
        },
    );
    eprintln!(
        "fuzz API: {} GET answers with an error that is not JSON (axum's own path/query rejections), e.g. {:?}",
        non_json_get_errors.load(Ordering::Relaxed),
        example.lock().unwrap()
    );
}
