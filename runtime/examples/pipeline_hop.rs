//! The cost of one pipeline hop (RT-PIPE-1/2) at Qwen3-8B's hidden size on
//! loopback: decode steps of one token (hidden 4,096 in bf16, 8 KiB each
//! way) through a stage on another transport in this process (mutual TLS,
//! the `Stage` call), against the same steps on an identical engine called
//! directly. Both engines hold layer 1 of a Qwen3-8B-shaped model with
//! random weights (hidden 4,096, 32 query and 8 key-value heads of 128,
//! intermediate `--intermediate`, default 12,288) in bf16 on the CPU; the
//! steps alternate between the two, so both see the same machine load.
//!
//! ```sh
//! cargo run --release -p blyan-runtime --example pipeline_hop -- [STEPS] [INTERMEDIATE] [commit]
//! ```
//!
//! With `commit` the stage also commits to its outputs and signs a
//! commitment every 32 positions (RT-PIPE-6), as nodes do.
//!
//! Prints the median and p90 of each and the hop's overhead (remote minus
//! local median): serialisation, the two transport messages, the stage's
//! parsing and its engine-queue hand-off. Also the time to send a
//! 2,048-token prefill's hidden states (16 MiB in 17 messages) to a stage
//! and have it refused at its position check (transfer and parsing only).
use blyan_runtime::inference::{InferenceConfig, InferenceHandle};
use blyan_runtime::pipeline::{Assembler, Dtype, Kind, Message, Open, Step, encode_open};
use blyan_runtime::tls::{NodeCertificate, PeerCertVerifier};
use blyan_runtime::transport::{GrpcTransport, Peer, PeerClient, TransportConfig};
use blyan_state_machine::testkit::{address, key};
use blyan_state_machine::tx::public_key_of;
use bytes::Bytes;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const CHAIN: &str = "blyan-measure";
const MODEL: [u8; 32] = [7; 32];
const HIDDEN: u32 = 4096;

fn model_dir(dir: &std::path::Path, intermediate: i64) {
    use blyan_gpu::default_model::{EOS_ID, random_weights, write_hf_dir};
    let mut cfg = blyan_gpu::default_model::default_config();
    cfg.hidden_size = i64::from(HIDDEN);
    cfg.intermediate_size = intermediate;
    cfg.num_attention_heads = 32;
    cfg.num_key_value_heads = 8;
    cfg.head_dim = 128;
    cfg.num_hidden_layers = 3;
    cfg.layer_sliding = vec![false; 3];
    write_hf_dir(dir, &cfg, &random_weights(&cfg, 1)).expect("model");
    let tok = blyan_gpu::tokenizer::byte_level_tokenizer_json(EOS_ID);
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("tokenizer");
}

fn median(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn hidden_step(position: u32, seq: u32) -> Step {
    let n = (seq * HIDDEN) as usize;
    // Small bf16 values (0x3c00 ≈ 0.0078 and neighbours).
    let bytes = (0..n)
        .flat_map(|i| (0x3c00u16 + (i % 64) as u16).to_le_bytes())
        .collect();
    Step {
        position,
        kind: Kind::Hidden,
        dtype: Dtype::Bf16,
        shape: [1, seq, HIDDEN],
        bytes,
    }
}

/// Sends `step` on the call and reads the answer (counting the signed
/// commitments that arrive before it).
async fn remote_step(
    tx: &mpsc::Sender<Bytes>,
    rx: &mut tonic::Streaming<Bytes>,
    step: &Step,
    commitments: &mut usize,
) -> Message {
    for part in step.encode() {
        tx.send(part).await.expect("send");
    }
    let mut asm = Assembler::default();
    loop {
        let m = rx.message().await.expect("answer").expect("a message");
        match asm.push(&m).expect("well-formed") {
            Some(Message::Commitment(_)) => *commitments += 1,
            Some(msg) => return msg,
            None => {}
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let intermediate: i64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(12_288);
    let commit = args.get(3).is_some_and(|s| s == "commit");
    let dir = tempfile::tempdir().expect("temp dir");
    let t = Instant::now();
    model_dir(dir.path(), intermediate);
    println!(
        "model: 3 layers, hidden {HIDDEN}, intermediate {intermediate}, random weights ({:.1} s to write)",
        t.elapsed().as_secs_f64()
    );
    let engine_config = InferenceConfig {
        model_dir: Some(dir.path().to_path_buf()),
        dtype: "bf16".into(),
        layers: Some([1, 1]),
        timeout_ms: 600_000,
        ..Default::default()
    };
    let local = InferenceHandle::start(engine_config.clone())
        .await
        .expect("local engine");
    let remote = InferenceHandle::start(engine_config)
        .await
        .expect("remote engine");
    let remote_stats = remote.stats.clone();
    let local_stats = local.stats.clone();
    let engine_us = |s: &blyan_runtime::inference::EngineStats| s.ops.engine_ms.sum_us();

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
    let (txa, _rxa) = mpsc::channel(1024);
    let (txb, mut rxb) = mpsc::channel(1024);
    let _a = GrpcTransport::start(la, key(1), config.clone(), txa, None, &mut tasks).expect("a");
    let b = GrpcTransport::start(lb, key(2), config, txb, None, &mut tasks).expect("b");
    tokio::spawn(async move { while rxb.recv().await.is_some() {} });
    b.set_stage_sink(Arc::new(blyan_runtime::router::StageServer {
        engine: remote,
        model: Some(MODEL),
        perturb: false,
        identity: commit.then(|| blyan_runtime::pipeline::StageIdentity {
            key: key(2),
            chain_id: CHAIN.into(),
        }),
    }));
    let allowed: BTreeSet<_> = [address(&key(1)), address(&key(2))].into();
    let verifier = Arc::new(PeerCertVerifier::new(CHAIN.into(), allowed.clone()));
    let cert = NodeCertificate::generate(&key(1), CHAIN).expect("cert");
    let client = PeerClient::connect(
        &b_addr,
        Some(&cert),
        verifier,
        CHAIN,
        &allowed,
        address(&key(2)),
    )
    .await
    .expect("connect");
    let open = || async {
        let (tx, requests) = mpsc::channel(16);
        tx.send(encode_open(&Open {
            model: format!("0x{}", hex::encode(MODEL)),
            first_layer: 1,
            last_layer: 1,
            request_id: String::new(),
            experts: Vec::new(),
        }))
        .await
        .expect("open");
        let rx = client.stage(requests).await.expect("stage call");
        (tx, rx)
    };
    let (tx, mut rx) = open().await;

    let mut commitments = 0usize;
    let (mut local_ms, mut remote_ms) = (Vec::new(), Vec::new());
    let (mut local_over, mut remote_over) = (Vec::new(), Vec::new());
    for i in 0..steps as u32 {
        let step = hidden_step(i, 1);
        let e0 = engine_us(&local_stats);
        let t = Instant::now();
        let (out, _) = local
            .stage(1, step.clone(), Default::default())
            .await
            .expect("local step");
        let l = t.elapsed().as_secs_f64() * 1e3;
        let le = (engine_us(&local_stats) - e0) as f64 / 1e3;
        assert_eq!(out.shape, [1, 1, HIDDEN]);
        let e0 = engine_us(&remote_stats);
        let t = Instant::now();
        let Message::Step(out) = remote_step(&tx, &mut rx, &step, &mut commitments).await else {
            panic!("the stage refused a step");
        };
        let r = t.elapsed().as_secs_f64() * 1e3;
        let re = (engine_us(&remote_stats) - e0) as f64 / 1e3;
        assert_eq!(out.shape, [1, 1, HIDDEN]);
        // The first steps warm both engines up.
        if i >= 3 {
            local_ms.push(l);
            remote_ms.push(r);
            local_over.push(l - le);
            remote_over.push(r - re);
        }
    }
    let (l50, l90) = (median(&mut local_ms, 0.5), median(&mut local_ms, 0.9));
    let (r50, r90) = (median(&mut remote_ms, 0.5), median(&mut remote_ms, 0.9));
    println!(
        "decode step, 1 token, hidden {HIDDEN} bf16, {} steps each: local engine p50 {l50:.2} ms p90 {l90:.2} ms; through the Stage call p50 {r50:.2} ms p90 {r90:.2} ms",
        local_ms.len(),
    );
    println!(
        "stage commitments {}: {commitments} signed commitments received over {steps} positions",
        if commit { "on" } else { "off" }
    );
    println!(
        "per step outside the engine's compute (wall time minus the engine thread's own time for that step): local call p50 {:.3} ms p90 {:.3} ms; remote hop p50 {:.3} ms p90 {:.3} ms",
        median(&mut local_over, 0.5),
        median(&mut local_over, 0.9),
        median(&mut remote_over, 0.5),
        median(&mut remote_over, 0.9),
    );
    // A 2,048-token prefill's hidden states, refused at the stage's
    // position check after the transfer: the cost of moving 16 MiB.
    let mut xfer = Vec::new();
    for _ in 0..5 {
        let (tx2, mut rx2) = open().await;
        let big = hidden_step(5, 2048);
        let t = Instant::now();
        let answer = remote_step(&tx2, &mut rx2, &big, &mut 0).await;
        xfer.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(matches!(answer, Message::Error(..)), "{answer:?}");
    }
    println!(
        "prefill hidden states, 2,048 tokens × {HIDDEN} bf16 (16 MiB, {} messages): sent and parsed in p50 {:.1} ms",
        big_messages(),
        median(&mut xfer, 0.5)
    );
}

fn big_messages() -> usize {
    hidden_step(0, 2048).encode().len()
}
