//! Paid inference end to end (spec/api.md API-KEY-*, API-PAY-*; ledger
//! TX-13..TX-15): a 4-validator devnet that serves inference to API keys
//! only, driven by the official OpenAI Python SDK and by plain HTTP.
//!
//! One devnet, phases in order (each asserts on chain state, not on logs):
//! 1. the SDK: `models.list()`, an unstreamed and a streamed completion with
//!    exact `usage`; then the allowance's `spent` rises by exactly the
//!    metered cost within the settlement interval, the node's inference
//!    claim by its share, and at the reward epoch's end its balance;
//! 2. the core refuses the node settling a request twice or above the cap;
//! 3. refusals: no key `401`, malformed, forged, another chain's, expired
//!    and revoked keys `401` (OpenAI's error shape on `/v1/*`);
//! 4. a small allowance runs out mid-stream: the stream ends cleanly with
//!    `finish_reason: length`, the charge stops at the cap, then `402`;
//! 5. the authenticated rate tier belongs to keys with funds.

mod support;

use blyan_runtime::client::{get_json, post_json};
use blyan_runtime::devnet::{DEVNET_PASSWORD, Devnet, DevnetOptions};
use blyan_runtime::keystore::read_key_file;
use blyan_state_machine::allowance::{
    AllowanceTerms, ApiKey, RouteShare, Settlement, UsageItem, price,
};
use blyan_state_machine::block::Event;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::testkit::tx;
use blyan_state_machine::tx::{SignedTx, TxKind};
use blyan_state_machine::types::{Address, Amount, BLY, Hash32};
use k256::ecdsa::SigningKey;
use serde_json::{Value, json};
use std::time::Duration;
use support::{eventually, is_committed};

const FEE: u128 = 100_000_000_000;

fn tx_body(tx: &SignedTx) -> Value {
    json!({ "tx": format!("0x{}", hex::encode(tx.encode())) })
}

fn amount(v: &Value) -> Amount {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a decimal amount: {v}"))
}

struct Net {
    devnet: Devnet,
    url: String,
    faucet: SigningKey,
}

impl Net {
    fn ledger(&self) -> Ledger {
        self.devnet.nodes[0].handle.snapshot.borrow().ledger.clone()
    }

    /// Submits a transaction signed by `key` with its next nonce through
    /// node 0 and waits for it to commit; returns its id and failure.
    async fn send(&self, key: &SigningKey, kind: TxKind) -> (Hash32, Option<String>) {
        let from = Address::from_public_key(key.verifying_key());
        let nonce = self.ledger().account(&from).nonce;
        let t = tx(&self.devnet.genesis.chain_id, key, nonce, kind, FEE);
        let (s, v) = post_json(&self.url, "/tx", &tx_body(&t)).await.unwrap();
        assert_eq!(s, 200, "submit: {v}");
        let id = v["id"].as_str().unwrap().to_string();
        eventually("the transaction to commit", || async {
            is_committed(&self.url, &id).await.then_some(())
        })
        .await;
        let (_, r) = get_json(&self.url, &format!("/tx/{id}")).await.unwrap();
        let failure = r["receipt"]["failure"]
            .as_str()
            .or(r["failure"].as_str())
            .map(str::to_string);
        (t.id(), failure)
    }

    /// Opens an allowance from the faucet and returns its id and key 0.
    async fn allowance(&self, cap: Amount, blocks: u64) -> (Hash32, String) {
        let expires_at = self.ledger().height() + blocks;
        let (id, failure) = self
            .send(
                &self.faucet,
                TxKind::OpenAllowance(Box::new(AllowanceTerms {
                    cap,
                    node_caps: Vec::new(),
                    expires_at,
                })),
            )
            .await;
        assert_eq!(failure, None);
        let key = ApiKey::issue(&self.devnet.genesis.chain_id, &self.faucet, id, 0);
        (id, key.to_key_string())
    }
}

async fn allowance_json(url: &str, id: &Hash32) -> Value {
    let (s, v) = get_json(url, &format!("/allowance/0x{}", hex::encode(id)))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    v
}

/// One HTTP/1.0 request with headers (HTTP/1.0: the answer, a stream
/// included, comes unchunked and ends when the server closes).
async fn http(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

async fn chat(url: &str, key: Option<&str>, body: &Value, path: &str) -> (u16, Value, String) {
    let mut headers = vec![("content-type", "application/json".to_string())];
    if let Some(k) = key {
        headers.push(("authorization", format!("Bearer {k}")));
    }
    let (status, text) = http(url, "POST", path, &headers, &body.to_string()).await;
    let v = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, v, text)
}

fn sdk(url: &str, key: &str) -> Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} missing: run tests/run (gpu/ci.sh --setup installs the openai SDK)",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(root.join("tests/openai/sdk_e2e.py"))
        .args([url, key])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the OpenAI SDK run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paid_inference_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.payments.free_inference = false;
    opts.rate_limits.public_per_min = 300;
    opts.rate_limits.token_per_min = 0;
    let devnet = Devnet::start(opts).await.unwrap();
    let url = devnet.nodes[0].api_url();
    let faucet = read_key_file(&devnet.faucet_key_file, DEVNET_PASSWORD).unwrap();
    let node0 = devnet.nodes[0].address;
    let node_key = read_key_file(&devnet.dir.join("node-0/key.json"), DEVNET_PASSWORD).unwrap();
    let net = Net {
        devnet,
        url: url.clone(),
        faucet,
    };
    let chain_id = net.devnet.genesis.chain_id.clone();
    let price_1k = net.ledger().params().inference_price_per_1k_tokens;

    // --- 1. The devnet's key, through the OpenAI SDK.
    let key = net.devnet.api_key().await.unwrap();
    let allowance = ApiKey::parse(&key).unwrap().grant.allowance;
    let before = allowance_json(&url, &allowance).await;
    assert_eq!(amount(&before["spent"]), 0);
    let l_before = net.ledger();
    let epoch = l_before.params().rewards.epoch_length_blocks;
    let report = tokio::task::spawn_blocking({
        let (url, key) = (url.clone(), key.clone());
        move || sdk(&url, &key)
    })
    .await
    .unwrap();
    let mut metered: Amount = 0;
    let mut tokens: u64 = 0;
    for r in report["requests"].as_array().unwrap() {
        let b = &r["blyan"];
        assert_eq!(b["charged"], true);
        assert_eq!(b["route"][0]["node"], node0.to_string());
        let cost = amount(&b["cost_base_units"]);
        if !r["usage"].is_null() {
            let t = r["usage"]["total_tokens"].as_u64().unwrap();
            assert_eq!(cost, price(t, price_1k), "cost is the price of the usage");
        }
        tokens += u64::try_from(cost * 1000 / price_1k).unwrap();
        metered += cost;
    }
    assert!(metered > 0);
    // Within the settlement interval (5 blocks) plus commit: exactly the metered cost.
    let settled = eventually("the usage to settle on chain", || async {
        let a = allowance_json(&url, &allowance).await;
        // The settler's view (pending here) catches up at its next poll.
        (amount(&a["spent"]) == metered && amount(&a["pending_here_base_units"]) == 0).then_some(a)
    })
    .await;
    assert_eq!(
        amount(&settled["remaining"]),
        amount(&before["remaining"]) - metered
    );
    assert_eq!(settled["settled_requests"], 3);
    // API-USAGE-3: the key holder reads its records (charged, newest first).
    let (s, v) = http(
        &url,
        "GET",
        "/v1/usage?limit=10",
        &[("authorization", format!("Bearer {key}"))],
        "",
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let page: Value = serde_json::from_str(&v).unwrap();
    let records = page["data"].as_array().unwrap();
    assert_eq!(records.len(), 3, "{page}");
    let recorded: Amount = records.iter().map(|r| amount(&r["cost"])).sum();
    assert_eq!(
        recorded, metered,
        "the records' costs are the metered costs"
    );
    assert!(records.iter().all(|r| r["key_id"] == format!("0x{}", hex::encode(ApiKey::parse(&key).unwrap().id()))));
    let (s, _) = http(&url, "GET", "/v1/usage", &[], "").await;
    assert_eq!(s, 401, "usage needs the key");
    // The node's inference claim rose by its share (it served alone) in
    // every block that settled its usage: the reward of the tokens at
    // quality 1.0, capped by the burn (RWD-10). Replayed block by block from
    // the state before the SDK run; a settlement in an epoch's last block is
    // paid out in that block (RewardsMinted).
    let inference = blyan_state_machine::rewards::RewardPool::Inference;
    let reader = net.devnet.nodes[0].handle.reader.clone();
    let l_settled = net.ledger();
    let mut l = l_before.clone();
    let mut settled_in_blocks: Amount = 0;
    let mut settlements = 0;
    for h in l.height() + 1..=l_settled.height() {
        let b = reader.block(h).unwrap().unwrap().block;
        let (next, outcome) = l.apply_block(&b).unwrap();
        let mut cost = 0;
        for (t, r) in b.body.txs.iter().zip(&outcome.receipts) {
            if let TxKind::SettleUsage(s) = &t.body.kind
                && r.sender == node0
                && r.failure.is_none()
            {
                cost += s
                    .items
                    .iter()
                    .map(|i| price(i.tokens(), price_1k))
                    .sum::<Amount>();
                settlements += 1;
            }
        }
        if cost > 0 {
            let before = l.rewards().claim(inference, &node0);
            if h % epoch == 0 {
                let minted: Amount = outcome
                    .events
                    .iter()
                    .filter_map(|e| match e {
                        Event::RewardsMinted { recipient, amount } if *recipient == node0 => {
                            Some(*amount)
                        }
                        _ => None,
                    })
                    .sum();
                assert!(
                    minted >= before + cost,
                    "paid at once in the epoch's last block"
                );
            } else {
                assert_eq!(
                    next.rewards().claim(inference, &node0),
                    before + cost,
                    "claim rises by the share at height {h}"
                );
            }
        }
        settled_in_blocks += cost;
        l = next;
    }
    assert_eq!(
        settled_in_blocks, metered,
        "{settlements} settlements carry exactly the metered cost ({tokens} tokens)"
    );
    assert_eq!(l.state_root(), l_settled.state_root());
    let claim = l_settled.rewards().claim(inference, &node0);
    let (_, acct) = get_json(&url, &format!("/account/{node0}")).await.unwrap();
    assert!(amount(&acct["reward_claims"]["inference"]) >= claim);
    // After the epoch's end its balance rose by at least the claim: replay
    // the boundary block to read what was minted.
    let boundary_h = (l_settled.height() / epoch + 1) * epoch;
    eventually("the reward epoch to end", || async {
        (net.ledger().height() >= boundary_h).then_some(())
    })
    .await;
    let mut l = l_settled.clone();
    for h in l.height() + 1..boundary_h {
        let b = reader.block(h).unwrap().unwrap().block;
        l = l.apply_block(&b).unwrap().0;
    }
    let claim = l.rewards().claim(inference, &node0);
    assert!(
        claim >= metered.min(claim),
        "claim held until the epoch's end"
    );
    let boundary = reader.block(boundary_h).unwrap().unwrap().block;
    let (after, outcome) = l.apply_block(&boundary).unwrap();
    let minted: Amount = outcome
        .events
        .iter()
        .filter_map(|e| match e {
            Event::RewardsMinted { recipient, amount } if *recipient == node0 => Some(*amount),
            _ => None,
        })
        .sum();
    assert!(minted >= claim, "minted {minted} < inference claim {claim}");
    let fees_paid: Amount = outcome
        .receipts
        .iter()
        .filter(|r| r.sender == node0)
        .map(|r| r.fee_paid)
        .sum();
    assert!(
        after.account(&node0).balance + fees_paid >= l.account(&node0).balance + minted,
        "the node's balance rose by what was minted"
    );
    assert_eq!(
        after.rewards().claim(inference, &node0),
        0,
        "claims are paid and cleared"
    );

    // --- 2. The core refuses the node settling twice or above the cap.
    let model = net.devnet.nodes[0]
        .handle
        .snapshot
        .borrow()
        .ledger
        .pol()
        .blocks()
        .find(|(_, b)| b.block_type == blyan_state_machine::pol::PolBlockType::Meta)
        .map(|(id, _)| *id)
        .unwrap();
    let first_id: Hash32 = {
        let s = report["requests"][0]["blyan"]["request_id"]
            .as_str()
            .unwrap();
        hex::decode(s.trim_start_matches("0x"))
            .unwrap()
            .try_into()
            .unwrap()
    };
    let item = |request_id: Hash32, tokens: u64| UsageItem {
        request_id,
        model,
        prompt_tokens: tokens,
        completion_tokens: 0,
        route: vec![RouteShare {
            node: node0,
            work: 1,
        }],
    };
    let settle = |items| TxKind::SettleUsage(Box::new(Settlement { allowance, items }));
    let (_, failure) = net.send(&node_key, settle(vec![item(first_id, 10)])).await;
    assert!(failure.unwrap().contains("already settled"));
    let (_, failure) = net
        .send(&node_key, settle(vec![item([0xee; 32], 2_000_000)]))
        .await;
    assert!(failure.unwrap().contains("more than"), "above the cap");
    assert_eq!(
        amount(&allowance_json(&url, &allowance).await["spent"]),
        metered
    );

    // --- 3. Refusals.
    let body = json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 4 });
    let (s, v, _) = chat(&url, None, &body, "/v1/chat/completions").await;
    assert_eq!(s, 401, "no key, free use off: {v}");
    assert_eq!(v["error"]["code"], "missing_api_key");
    assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string());
    let (s, v, _) = chat(&url, None, &json!({ "prompt": "hi" }), "/chat").await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["reason"], "missing_api_key", "the seed's shape off /v1");
    let other_chain = ApiKey::issue("blyan-other", &net.faucet, allowance, 0).to_key_string();
    let stranger = blyan_state_machine::testkit::key(77);
    let forged = ApiKey::issue(&chain_id, &stranger, allowance, 0).to_key_string();
    for (bad, why) in [
        ("blyk1_zz".to_string(), "malformed"),
        (format!("{key}0"), "hex digits"),
        (forged, "does not verify"),
        (other_chain, "does not verify"),
        (
            ApiKey::issue(&chain_id, &net.faucet, [5; 32], 0).to_key_string(),
            "does not have",
        ),
    ] {
        let (s, v, _) = chat(&url, Some(&bad), &body, "/v1/chat/completions").await;
        assert_eq!(s, 401, "{why}: {v}");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(why),
            "{why}: {v}"
        );
    }
    // Expired: an allowance of 2 blocks.
    let (_, short) = net.allowance(BLY, 2).await;
    let (s, _, _) = chat(&url, Some(&short), &body, "/v1/chat/completions").await;
    // (It may already be past its 2 blocks; then it is 401 too.)
    assert!(s == 200 || s == 401, "{s}");
    eventually("the short allowance to expire", || async {
        let (s, v, _) = chat(&url, Some(&short), &body, "/v1/chat/completions").await;
        (s == 401 && v["error"]["message"].as_str()?.contains("expired")).then_some(())
    })
    .await;
    // Revoked.
    let (revoked_id, revoked) = net.allowance(BLY, 1_000).await;
    let (s, _, _) = chat(&url, Some(&revoked), &body, "/v1/chat/completions").await;
    assert_eq!(s, 200);
    let (_, failure) = net
        .send(
            &net.faucet,
            TxKind::CloseAllowance {
                allowance: revoked_id,
            },
        )
        .await;
    assert_eq!(failure, None);
    eventually("the revocation to reach node 0's state", || async {
        let (s, v, _) = chat(&url, Some(&revoked), &body, "/v1/chat/completions").await;
        (s == 401 && v["error"]["message"].as_str()?.contains("revoked")).then_some(())
    })
    .await;

    // --- 4. The cap runs out mid-stream: 0.2 BLY = 200 tokens in all.
    let (small_id, small) = net.allowance(BLY / 5, 1_000).await;
    // A prompt of about 192 of the 200 tokens leaves a few completion tokens,
    // so the cap, not the model's end token, ends the answer. The template's
    // overhead comes from phase 1's usage (the devnet's tokenizer is
    // byte-level: one token per byte, or fewer).
    let short_prompt = "Say something about blocks.";
    let overhead = report["requests"][0]["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap()
        - short_prompt.len() as u64;
    let story = "Tell a long story about a chain of blocks that learned to write, with many \
        chapters, many characters, and a great deal of detail about each one of them. ";
    let content: String = story
        .chars()
        .cycle()
        .take((192 - overhead) as usize)
        .collect();
    let long = json!({
        "messages": [{ "role": "user", "content": content }],
        "max_tokens": 400,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let (s, _, text) = chat(&url, Some(&small), &long, "/v1/chat/completions").await;
    assert_eq!(s, 200);
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(text.trim_end().ends_with("data: [DONE]"), "ends cleanly");
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap_or_else(|| panic!("no finish reason: {text}"));
    assert_eq!(finish, "length", "{text}");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        usage["total_tokens"], 200,
        "the charge stops at the cap: {usage}"
    );
    let billed = &chunks.last().unwrap()["blyan"];
    assert_eq!(billed["cap_reached"], true);
    assert_eq!(amount(&billed["cost_base_units"]), BLY / 5);
    let (s, v, _) = chat(&url, Some(&small), &body, "/v1/chat/completions").await;
    assert_eq!(s, 402, "exhausted: {v}");
    assert_eq!(v["error"]["code"], "insufficient_quota");
    let spent = eventually("the capped usage to settle", || async {
        let a = allowance_json(&url, &small_id).await;
        (amount(&a["spent"]) == BLY / 5).then_some(a)
    })
    .await;
    assert_eq!(amount(&spent["remaining"]), 0);

    // --- 5. Rate tiers (public 300/min here; keys with funds unlimited).
    let (_, fresh) = net.allowance(BLY, 1_000).await;
    let auth = [("authorization", format!("Bearer {fresh}"))];
    for i in 0..400 {
        let (s, _) = http(&url, "GET", "/status", &auth, "").await;
        assert_eq!(s, 200, "keyed request {i}");
    }
    // The exhausted key counts against its address: the public quota runs out.
    let exhausted = [("authorization", format!("Bearer {small}"))];
    let mut limited = false;
    for _ in 0..400 {
        let (s, _) = http(&url, "GET", "/status", &exhausted, "").await;
        if s == 429 {
            limited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(limited, "an exhausted key gets the public tier");
    net.devnet.stop().await;
}

/// `blyan devnet` prints `api key: <key>` after the node lines, once the
/// API answers; the key works at once (and again after a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blyan_devnet_prints_a_working_api_key() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    // Eight consecutive ports: find a base whose ports are all free now.
    let base = (0..200)
        .map(|i| 20_000 + ((std::process::id() as u16 % 1_000) * 20 + i * 8) % 40_000)
        .find(|b| (0..8).all(|p| std::net::TcpListener::bind(("127.0.0.1", b + p)).is_ok()))
        .unwrap();
    for round in 0..2 {
        let mut child = support::KillOnDrop(
            std::process::Command::new(support::blyan_bin())
                .args(["devnet", "--dir"])
                .arg(dir.path().join("devnet"))
                .args([
                    "--base-port",
                    &base.to_string(),
                    "--block-interval-ms",
                    "300",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let stdout = child.stdout.take().unwrap();
        let lines = tokio::task::spawn_blocking(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                let done = line.starts_with("api key: ");
                lines.push(line);
                if done {
                    break;
                }
            }
            lines
        });
        let lines = tokio::time::timeout(Duration::from_secs(180), lines)
            .await
            .expect("an `api key:` line within 180 s")
            .unwrap();
        let node_lines = lines.iter().filter(|l| l.starts_with("node ")).count();
        let key_at = lines.iter().position(|l| l.starts_with("api key: "));
        assert_eq!(node_lines, 4, "{lines:?}");
        let key_at = key_at.unwrap_or_else(|| panic!("no api key line (round {round}): {lines:?}"));
        assert!(lines.iter().rposition(|l| l.starts_with("node ")).unwrap() < key_at);
        let key = lines[key_at].trim_start_matches("api key: ").to_string();
        assert!(!key.contains(' ') && ApiKey::parse(&key).is_ok(), "{key}");
        let url = format!("http://127.0.0.1:{}", base + 1);
        let auth = [("authorization", format!("Bearer {key}"))];
        let (s, body) = http(&url, "GET", "/v1/models", &auth, "").await;
        assert_eq!(s, 200, "{body}");
        let (s, v, _) = chat(
            &url,
            Some(&key),
            &json!({ "prompt": "hi", "max_tokens": 2 }),
            "/chat",
        )
        .await;
        assert_eq!((s, &v["blyan"]["charged"]), (200, &json!(true)), "{v}");
        let _ = child.kill();
        let _ = child.wait();
    }
}
