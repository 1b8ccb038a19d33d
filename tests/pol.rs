//! Proof-of-Learning end to end (spec/pol.md POL-TRAIN-*, POL-SUBMIT-*,
//! POL-EVAL-*, POL-VAL-*, POL-SERVE-*; issue 14): a 4-validator devnet whose
//! validator 3 misreports its losses.
//!
//! One devnet, phases in order:
//! 1. train layer 0 of the embedded model on the shipped training pool
//!    (`blyan pol train`'s code), submit it (`blyan pol submit --wait`'s
//!    code): the validators' own evaluations accept it with ≥ 1 % lower
//!    loss, and the misreporting validator is not among the honest
//!    attestors;
//! 2. the served model follows: `/chat` names the new head, and its greedy
//!    answer equals that of head + delta computed by an independent
//!    reference (`tests/pol/reference.py`: its own payload parser, a dense
//!    numpy apply, transformers), which also reproduces the answer before;
//!    a validator restarted on that chain answers from the new head at once;
//! 3. the same update scaled to 2 % (a true improvement between 0 and 1 %)
//!    is rejected, and so is the update negated (worse);
//! 4. rewards: the decision gives the trainer a learning claim and the data
//!    block's submitter a dataset claim, the honest attestors attestation
//!    claims and the liar nothing; the epoch's end pays them;
//! 5. `blyan pol train | submit --wait | status` and `blyan account` as
//!    scripts call them, every other choice defaulted.
//! 6. a LoRA delta (rank 8) for layer 1 through the same commands is
//!    accepted (POL-TRAIN-3).

mod support;

use blyan_runtime::config::FileConfig;
use blyan_runtime::devnet::{DEVNET_PASSWORD, Devnet, DevnetOptions};
use blyan_runtime::keystore::read_key_file;
use blyan_runtime::node::{NodeSetup, RunningNode, bind};
use blyan_runtime::pol_cli::{TrainArgs, submit, train};
use blyan_state_machine::block::Event;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::pol::{PolBlockType, PolEvent};
use blyan_state_machine::rewards::RewardPool;
use blyan_state_machine::state::Touched;
use blyan_state_machine::types::{Address, Amount};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Instant;
use support::eventually;

/// The misreporting validator and how far above its measured losses it reveals.
const LIAR: usize = 3;
const LIE_PPM: u64 = 200_000;

fn train_args(node: &str, out: &Path, scale: f64) -> TrainArgs {
    TrainArgs {
        node: node.to_string(),
        out: out.to_path_buf(),
        target: None,
        model_dir: None,
        density_ppm: blyan_runtime::pol_cli::DEFAULT_DENSITY_PPM,
        scale,
        options: blyan_gpu::pol::TrainOptions {
            steps: 40,
            ..Default::default()
        },
    }
}

async fn chat(url: &str) -> Value {
    let body = json!({ "prompt": "Alice was", "max_tokens": 16, "logprobs": 5 });
    let (s, v) = blyan_runtime::client::post_json(url, "/chat", &body)
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    v
}

/// The reference's greedy answers for the head (`accepted` applied) and
/// for the head with `delta` applied.
fn reference(hf: &Path, accepted: &[&Path], delta: &Path) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/pol/reference.py"))
        .arg(hf)
        .arg(delta)
        .args(["Alice was", "16"])
        .args(accepted)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reference.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

/// Asserts that the node's logprobs (API-CHAT-7) and the reference's name
/// the same tokens (and the same top 5) with log-probabilities
/// within 1e-4; returns the largest difference.
fn same_logprobs(node: &Value, reference: &Value) -> f64 {
    let (node, reference) = (node.as_array().unwrap(), reference.as_array().unwrap());
    assert_eq!(node.len(), reference.len(), "one entry per generated token");
    assert!(!node.is_empty());
    let mut worst = 0f64;
    for (n, r) in node.iter().zip(reference) {
        assert_eq!(n["id"], r["id"], "{n} / {r}");
        let mut close = |a: &Value, b: &Value| {
            let d = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
            assert!(d < 1e-4, "log-probabilities differ by {d}: {n} / {r}");
            worst = worst.max(d);
        };
        close(&n["logprob"], &r["logprob"]);
        let (nt, rt) = (
            n["top_logprobs"].as_array().unwrap(),
            r["top"].as_array().unwrap(),
        );
        assert_eq!(nt.len(), 5);
        for a in nt {
            // The same id in the reference's top 5, or a near-tie with its
            // fifth at the boundary.
            match rt.iter().find(|b| b[0] == a["id"]) {
                Some(b) => close(&a["logprob"], &b[1]),
                None => close(&a["logprob"], &rt[4][1]),
            }
        }
    }
    worst
}

fn payload_file(delta_file: &Path, out: &Path) {
    let (_, payload) = blyan_runtime::pol_cli::read_delta_file(delta_file).unwrap();
    std::fs::write(out, payload).unwrap();
}

/// The ledger after each block `1..=to`, replayed from genesis, with the
/// events of each block.
fn replay(devnet: &Devnet, to: u64) -> Vec<(Ledger, Vec<Event>)> {
    let reader = devnet.nodes[0].handle.reader.clone();
    let mut l = Ledger::from_genesis(&devnet.genesis).unwrap();
    let mut out = vec![(l.clone(), Vec::new())];
    for h in 1..=to {
        let b = reader.block(h).unwrap().unwrap().block;
        let (next, outcome) = l.apply_block(&b).unwrap();
        l = next;
        out.push((l.clone(), outcome.events));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pol_loop_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 500;
    opts.misreport_loss = Some((LIAR, LIE_PPM));
    let mut devnet = Devnet::start(opts).await.unwrap();
    let url = devnet.nodes[0].api_url();
    let faucet = read_key_file(&devnet.faucet_key_file, DEVNET_PASSWORD).unwrap();
    let liar = devnet.nodes[LIAR].address;
    let hf = devnet.dir.join("model/hf");
    let model_id = devnet
        .genesis
        .pol_blocks
        .iter()
        .find(|b| b.block_type == PolBlockType::Meta)
        .unwrap()
        .id();
    let before = chat(&url).await;

    // 1. Train, submit, accepted by the validators' own evaluations.
    let a_file = dir.path().join("a.json");
    let summary = train(train_args(&url, &a_file, 1.0), &faucet)
        .await
        .unwrap();
    eprintln!("train: {summary}");
    assert!(summary["last_loss"].as_f64().unwrap() < summary["first_loss"].as_f64().unwrap());
    let a = submit(&url, &faucet, &a_file, true).await.unwrap();
    let decided_at = Instant::now();
    eprintln!("submit: {a}");
    assert_eq!(a["status"], "accepted", "{a}");
    let improvement = a["improvement_ppm"].as_u64().unwrap();
    assert!(improvement >= 10_000, "{a}");
    let honest: Vec<String> = a["honest_attestors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(honest.len(), 3, "the three honest validators: {a}");
    assert!(
        !honest.contains(&liar.to_string()),
        "the liar is not honest: {a}"
    );

    // 2. The served model follows the chain, and is head + delta.
    let expected_head = {
        let l = devnet.nodes[0].handle.snapshot.borrow().ledger.clone();
        blyan_runtime::pol_serve::head_name(l.pol(), &model_id)
    };
    assert_ne!(before["head"], json!(expected_head));
    let after = eventually("node 0 to answer from the new head", || async {
        let v = chat(&url).await;
        (v["head"] == json!(expected_head)).then_some(v)
    })
    .await;
    eprintln!(
        "answers from the new head {:.1} s after submit returned the decision",
        decided_at.elapsed().as_secs_f64()
    );
    let a_payload = dir.path().join("a.bin");
    payload_file(&a_file, &a_payload);
    let r = reference(&hf, &[], &a_payload);
    eprintln!(
        "reference: head {} / delta {} (smallest top-2 margin {})",
        r["head_text"], r["delta_text"], r["min_margin"]
    );
    assert_eq!(
        before["text"], r["head_text"],
        "the reference reproduces the genesis head"
    );
    assert_eq!(
        after["text"], r["delta_text"],
        "the node serves head + delta"
    );
    assert_ne!(r["head_text"], r["delta_text"]);
    // API-CHAT-7: the served model's log-probabilities (log-softmax of its
    // logits) equal the reference's, token by token, with the top 5.
    let worst_before = same_logprobs(&before["logprobs"], &r["head_logprobs"]);
    let worst_after = same_logprobs(&after["logprobs"], &r["delta_logprobs"]);
    eprintln!(
        "largest log-probability difference to the reference: {worst_before:.2e} before, {worst_after:.2e} after"
    );

    // A validator restarted on this chain serves the head from its first answer.
    let node1 = devnet.nodes.remove(1);
    let (p2p, http) = (node1.p2p_addr.to_string(), node1.http_addr.to_string());
    node1.stop(5_000).await;
    let mut config = FileConfig::load(&devnet.dir.join("node-1/config.toml")).unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, DEVNET_PASSWORD).unwrap();
    config.key_password_file = Some(password);
    let restarted = RunningNode::start(
        NodeSetup::from_config(&config).unwrap(),
        bind(&p2p).await.unwrap(),
        bind(&http).await.unwrap(),
    )
    .await
    .unwrap();
    let first = chat(&restarted.api_url()).await;
    assert_eq!(first["head"], json!(expected_head), "{first}");
    assert_eq!(first["text"], after["text"]);
    devnet.nodes.insert(1, restarted);

    // 3. A true improvement between 0 and 1 % is rejected; so is a worse model.
    let b_file = dir.path().join("b.json");
    train(train_args(&url, &b_file, 0.02), &faucet)
        .await
        .unwrap();
    let b = submit(&url, &faucet, &b_file, true).await.unwrap();
    eprintln!("small: {b}");
    assert_eq!(b["status"], "rejected", "{b}");
    assert_eq!(b["reason"], "insufficient_improvement", "{b}");
    let small = b["improvement_ppm"].as_u64().unwrap();
    assert!(small > 0 && small < 10_000, "{b}");
    let c_file = dir.path().join("c.json");
    train(train_args(&url, &c_file, -1.0), &faucet)
        .await
        .unwrap();
    let c = submit(&url, &faucet, &c_file, true).await.unwrap();
    eprintln!("worse: {c}");
    assert_eq!(c["status"], "rejected", "{c}");
    assert_eq!(c["improvement_ppm"], 0, "{c}");
    // Rejected deltas never became the head.
    assert_eq!(chat(&url).await["head"], json!(expected_head));

    // 4. Rewards of the accepted delta, and their payment.
    let decided = a["decided_height"].as_u64().unwrap();
    let epoch = devnet.genesis.params.rewards.epoch_length_blocks;
    let paid_at = decided.div_ceil(epoch) * epoch;
    eventually("the reward epoch to end", || async {
        (support::height(&url).await >= paid_at).then_some(())
    })
    .await;
    let ledgers = replay(&devnet, paid_at);
    // What this decision alone gives (RWD-11, RWD-12, RWD-14): its event
    // accrued on the rewards before its block (an epoch's end in the same
    // block would pay and reset the claims).
    let a_id = blyan_runtime::pol_cli::read_delta_file(&a_file)
        .unwrap()
        .0
        .id();
    let event = ledgers[decided as usize]
        .1
        .iter()
        .find_map(|e| match e {
            Event::Pol(p) if matches!(&**p, PolEvent::DeltaDecided(d) if d.delta_id == a_id) => {
                Some((**p).clone())
            }
            _ => None,
        })
        .expect("the decision's event");
    let before = &ledgers[decided as usize - 1].0;
    let mut accrued = before.rewards().clone();
    accrued
        .accrue_pol_event(&before.params().rewards, &event, &mut Touched::new())
        .unwrap();
    let gain =
        |pool: RewardPool, a: &Address| accrued.claim(pool, a) - before.rewards().claim(pool, a);
    let f = devnet.faucet;
    assert!(
        gain(RewardPool::Learning, &f) > 0,
        "the trainer's learning claim"
    );
    assert!(
        gain(RewardPool::Datasets, &f) > 0,
        "the data block's submitter's dataset claim"
    );
    for n in &devnet.nodes {
        let gained = gain(RewardPool::Attestation, &n.address) > 0;
        assert_eq!(
            gained,
            n.address != liar,
            "attestation claim of {}",
            n.address
        );
    }
    let minted = |to: &Address| -> Amount {
        ledgers[decided as usize..=paid_at as usize]
            .iter()
            .flat_map(|(_, ev)| ev)
            .filter_map(|e| match e {
                Event::RewardsMinted { recipient, amount } if recipient == to => Some(*amount),
                _ => None,
            })
            .sum()
    };
    assert!(minted(&f) > 0, "the trainer and data submitter is paid");
    for n in devnet.nodes.iter().filter(|n| n.address != liar) {
        assert!(minted(&n.address) > 0, "{} is paid", n.address);
    }

    // 5. The command line scripts rely on, with every other choice defaulted.
    let blyan = |args: &[&str]| {
        let out = std::process::Command::new(support::blyan_bin())
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "blyan {args:?}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let key = devnet.faucet_key_file.display().to_string();
    let d_file = dir.path().join("d.json").display().to_string();
    // The fixed command lines (`--out` / `--delta` last), extra choices after.
    let pol = |command: &str, file_flag: &str, file: &str, extra: &[&str]| -> Value {
        let mut args = vec![
            "pol",
            command,
            "--node",
            &url,
            "--key",
            &key,
            "--password",
            DEVNET_PASSWORD,
            file_flag,
            file,
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(blyan(&args).lines().last().unwrap()).unwrap()
    };
    pol("train", "--out", &d_file, &[]);
    let last = pol("submit", "--delta", &d_file, &["--wait"]);
    eprintln!("cli: {last}");
    for field in ["delta", "status", "reason", "improvement_ppm"] {
        assert!(last.get(field).is_some(), "{field} missing: {last}");
    }
    assert_eq!(last["status"], "accepted", "{last}");
    let status: Value = serde_json::from_str(&blyan(&[
        "pol",
        "status",
        last["delta"].as_str().unwrap(),
        "--node",
        &url,
    ]))
    .unwrap();
    assert_eq!(status["status"], "accepted");
    let account: Value =
        serde_json::from_str(&blyan(&["account", &f.to_string(), "--node", &url])).unwrap();
    assert!(
        account["reward_claims"]["learning"].is_string(),
        "{account}"
    );

    // 6. POL-TRAIN-3: LoRA of rank 8 on another target, through the CLI.
    let e_file = dir.path().join("e.json").display().to_string();
    let trained = pol(
        "train",
        "--out",
        &e_file,
        &[
            "--target",
            "layer.1",
            "--lora-rank",
            "8",
            "--learning-rate",
            "0.01",
            "--steps",
            "60",
        ],
    );
    assert_eq!(trained["target"], "layer.1", "{trained}");
    assert_eq!(trained["lora_rank"], 8, "{trained}");
    // Seven projections of 128 × 128, 64 × 128 or 128 × 384: r (in + out) each.
    assert_eq!(
        trained["trained_parameters"],
        8 * (256 + 192 * 2 + 256 + 512 * 3)
    );
    let lora = pol("submit", "--delta", &e_file, &["--wait"]);
    eprintln!("cli, LoRA: {lora}");
    assert_eq!(lora["status"], "accepted", "{lora}");
    assert!(
        lora["improvement_ppm"].as_u64().unwrap() >= 10_000,
        "{lora}"
    );
    devnet.stop().await;
}
