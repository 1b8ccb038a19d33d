//! The HTTP API end to end, on a real one-validator devnet on loopback with
//! the embedded model: `/chat` and `/v1/chat/completions` (plain and
//! streamed), `/p2p/register` tokens and the rate limits (429 with
//! Retry-After), `/mine` (payload checked, registration committed),
//! `/pol/*`, `/nodes` and `/openapi.json`.
//!
//! Waiting is by polling against a generous deadline, never a timed assertion.

mod support;

use blyan_runtime::client::{Response, get_json, post_json, send};
use blyan_runtime::devnet::{DEVNET_PASSWORD, Devnet, DevnetOptions};
use blyan_runtime::keystore::read_key_file;
use blyan_runtime::ratelimit::RateLimitConfig;
use blyan_runtime::registry::sign_announcement;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::pol::{PolBlockType, PolTx};
use blyan_state_machine::testkit::{key, pol_block, tx};
use blyan_state_machine::tx::{SignedTx, TxKind};
use serde_json::{Value, json};
use support::eventually;

async fn devnet(dir: &std::path::Path, rate_limits: RateLimitConfig) -> Devnet {
    let mut opts = DevnetOptions::new(dir.join("devnet"), 1);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = rate_limits;
    Devnet::start(opts).await.unwrap()
}

fn json_of(r: &Response) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&r.body)))
}

fn hex_tx(t: &SignedTx) -> String {
    format!("0x{}", hex::encode(t.encode()))
}

/// The JSON of a `POST /p2p/register` signed by `node_key` for the devnet's
/// first node (API-REG-1/5).
fn announce(net: &Devnet, node_key: &k256::ecdsa::SigningKey, experts: &[String]) -> Value {
    let a = sign_announcement(
        node_key,
        &net.genesis.chain_id,
        &net.nodes[0].address,
        "10.1.2.3",
        9100,
        experts,
        blyan_runtime::transport::now_ms(),
    )
    .unwrap();
    json!({
        "node_id": a.node_id.to_string(),
        "public_key": format!("0x{}", hex::encode(a.public_key)),
        "host": a.host, "port": a.port, "available_experts": a.available_experts,
        "timestamp_ms": a.timestamp_ms,
        "signature": format!("0x{}", hex::encode(a.signature)),
    })
}

/// An operator token (`unlimited_tokens`), so that set-up requests spend no
/// public quota.
const OPS_TOKEN: &str = "ops-token";

/// A request with [`OPS_TOKEN`]; JSON in and out.
async fn ops(url: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let bearer = format!("Bearer {OPS_TOKEN}");
    let body = body.map(|b| b.to_string());
    let r = send(
        url,
        method,
        path,
        &[("Authorization", bearer.as_str())],
        body.as_deref().map(str::as_bytes),
    )
    .await
    .unwrap();
    (r.status, json_of(&r))
}

/// Funds `node_key` from the faucet and registers it on chain (TX-9), as
/// API-REG-6 requires before an announcement; waits for the commit. Uses
/// [`OPS_TOKEN`], which the devnet must list.
async fn register_on_chain(net: &Devnet, node_key: &k256::ecdsa::SigningKey) {
    let url = net.nodes[0].api_url();
    let chain = &net.genesis.chain_id;
    let faucet = read_key_file(&net.faucet_key_file, DEVNET_PASSWORD).unwrap();
    let node = blyan_state_machine::testkit::address(node_key);
    let (_, account) = ops(&url, "GET", &format!("/account/{}", net.faucet), None).await;
    let nonce = account["nonce"].as_u64().unwrap();
    let bly = 1_000_000_000_000_000_000u128;
    let fund = blyan_state_machine::testkit::transfer(chain, &faucet, nonce, node, 1_000 * bly);
    let (s, e) = ops(&url, "POST", "/tx", Some(&json!({ "tx": hex_tx(&fund) }))).await;
    assert_eq!(s, 200, "{e}");
    eventually("the node's funding to commit", || async {
        let (s, a) = ops(&url, "GET", &format!("/account/{node}"), None).await;
        (s == 200 && a["balance"] != "0").then_some(())
    })
    .await;
    let kind = TxKind::RegisterNode {
        info: Box::new(blyan_state_machine::tx::NodeInfo {
            endpoint: "10.1.2.3:9100".into(),
            blocks: Vec::new(),
        }),
        bond: 100 * bly,
    };
    let reg = tx(chain, node_key, 0, kind, 100_000_000_000);
    let (s, e) = ops(&url, "POST", "/tx", Some(&json!({ "tx": hex_tx(&reg) }))).await;
    assert_eq!(s, 200, "{e}");
    let path = format!("/tx/0x{}", hex::encode(reg.id()));
    let r = eventually("the RegisterNode transaction to commit", || async {
        let (s, v) = ops(&url, "GET", &path, None).await;
        (s == 200).then_some(v)
    })
    .await;
    assert_eq!(r["success"], true, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_openai_completions_are_served_by_the_local_model() {
    let dir = tempfile::tempdir().unwrap();
    let net = devnet(dir.path(), RateLimitConfig::unlimited()).await;
    let url = net.nodes[0].api_url();

    let (s, a) = post_json(
        &url,
        "/chat",
        &json!({ "prompt": "hello", "max_tokens": 8 }),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{a}");
    // The embedded model's tokenizer is byte-level: "hello" is 5 tokens.
    assert_eq!(a["prompt_tokens"], 5, "{a}");
    let completion = a["completion_tokens"].as_u64().unwrap();
    assert!(completion <= 8, "{a}");
    assert_eq!(a["tokens_used"].as_u64().unwrap(), 5 + completion);
    assert_eq!(a["experts_used"], json!([]));
    assert!(
        ["stop", "length"].contains(&a["finish_reason"].as_str().unwrap()),
        "{a}"
    );
    // API-CHAT-2: cost from the chain's per_1k_tokens, rounded up.
    let (_, params) = get_json(&url, "/params").await.unwrap();
    let per_1k: u128 = params["rewards"]["per_1k_tokens"]
        .as_str()
        .map(|s| s.parse().unwrap())
        .or_else(|| params["rewards"]["per_1k_tokens"].as_u64().map(u128::from))
        .expect("per_1k_tokens in /params");
    let tokens = u128::from(5 + completion);
    assert_eq!(
        a["cost_base_units"].as_str().unwrap(),
        (tokens * per_1k).div_ceil(1000).to_string()
    );
    assert!(a["cost_bly"].as_f64().unwrap() > 0.0);

    // Greedy decoding is deterministic.
    let (_, again) = post_json(
        &url,
        "/chat",
        &json!({ "prompt": "hello", "max_tokens": 8 }),
    )
    .await
    .unwrap();
    assert_eq!(again["text"], a["text"]);

    // API-CHAT-1: bad requests are refused before anything runs.
    for (body, status, code) in [
        (json!({ "prompt": "x", "use_moe": true }), 404, 3001),
        (json!({ "prompt": "x", "max_tokens": 0 }), 400, 5001),
        (json!({ "prompt": "x", "max_tokens": 100_000 }), 400, 5001),
        (json!({ "prompt": "x", "temperature": 5.0 }), 400, 5001),
        (json!({ "prompt": "" }), 400, 5001),
        (json!({ "prompt": "x", "bogus": 1 }), 400, 5001),
    ] {
        let (s, e) = post_json(&url, "/chat", &body).await.unwrap();
        assert_eq!(
            (s, e["code"].as_u64().unwrap()),
            (status, code),
            "{body} → {e}"
        );
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // OpenAI-compatible, plain and streamed: the same greedy text.
    let req = json!({
        "messages": [{ "role": "user", "content": "hi" }],
        "max_tokens": 6,
    });
    let (s, c) = post_json(&url, "/v1/chat/completions", &req).await.unwrap();
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["object"], "chat.completion");
    let text = c["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let usage = &c["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let mut streamed_req = req.clone();
    streamed_req["stream"] = json!(true);
    let r = send(
        &url,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(streamed_req.to_string().as_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = String::from_utf8(r.body).unwrap();
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let mut joined = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            joined.push_str(piece);
        }
        if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(joined, text, "the stream carries the same text");
    assert_eq!(finish.as_deref(), c["choices"][0]["finish_reason"].as_str());

    // API-CHAT-7: log-probabilities, in OpenAI's shape, for the same answer.
    assert_eq!(c["choices"][0]["logprobs"], Value::Null, "not asked");
    let mut lp_req = req.clone();
    lp_req["logprobs"] = json!(true);
    lp_req["top_logprobs"] = json!(3);
    let (s, l) = post_json(&url, "/v1/chat/completions", &lp_req)
        .await
        .unwrap();
    assert_eq!(s, 200, "{l}");
    assert_eq!(l["choices"][0]["message"]["content"], json!(text));
    let content = l["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        usage["completion_tokens"].as_u64().unwrap()
    );
    let mut joined = String::new();
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], t["token"], "{t}");
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-9);
        assert!(
            lp <= 0.0
                && top
                    .windows(2)
                    .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64())
        );
        let bytes: Vec<u8> = t["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, t["token"].as_str().unwrap().as_bytes());
        joined.push_str(t["token"].as_str().unwrap());
    }
    assert_eq!(joined, text, "the tokens spell the answer");
    for (body, why) in [
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"top_logprobs": 2}), "needs logprobs"),
    ] {
        let mut bad = req.clone();
        for (k, v) in body.as_object().unwrap() {
            bad[k] = v.clone();
        }
        let (s, e) = post_json(&url, "/v1/chat/completions", &bad).await.unwrap();
        assert_eq!(s, 400, "{bad} → {e}");
        assert!(e.to_string().contains(why), "{bad} → {e}");
    }
    // A stream carries the same log-probabilities in its final chunk.
    let mut streamed_lp = lp_req.clone();
    streamed_lp["stream"] = json!(true);
    let r = send(
        &url,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(streamed_lp.to_string().as_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let body = String::from_utf8(r.body).unwrap();
    let mut streamed_content = Vec::new();
    for e in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if e == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(e).unwrap();
        if let Some(c) = chunk["choices"][0]["logprobs"]["content"].as_array() {
            assert!(chunk["choices"][0]["finish_reason"].is_string(), "{chunk}");
            streamed_content.extend(c.iter().cloned());
        }
    }
    assert_eq!(&streamed_content, content, "the same log-probabilities");
    let (s, e) = post_json(&url, "/chat", &json!({"prompt": "hi", "logprobs": 99}))
        .await
        .unwrap();
    assert_eq!(s, 400, "{e}");
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_issues_tokens_and_rate_limits_answer_429() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RateLimitConfig {
        public_per_min: 5,
        token_per_min: 50,
        unlimited_tokens: vec![OPS_TOKEN.into()],
        ..RateLimitConfig::default()
    };
    let net = devnet(dir.path(), limits).await;
    let url = net.nodes[0].api_url();
    let node_key = key(77);
    // API-REG-6: registered on chain first (with the operator's token).
    register_on_chain(&net, &node_key).await;
    let experts = vec!["layer.0".to_string(), "layer.1".to_string()];
    let a = announce(&net, &node_key, &experts);
    // Public request 1: a forged signature is refused.
    let mut forged = a.clone();
    let sig = forged["signature"].as_str().unwrap().to_string();
    let flipped = if &sig[12..13] == "0" { "1" } else { "0" };
    forged["signature"] = json!(format!("{}{flipped}{}", &sig[..12], &sig[13..]));
    let (s, e) = post_json(&url, "/p2p/register", &forged).await.unwrap();
    assert_eq!((s, e["code"].as_u64()), (400, Some(5001)), "{e}");
    // Public request 2: the real one registers.
    let (s, r) = post_json(&url, "/p2p/register", &a).await.unwrap();
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["registered"], true);
    assert_eq!(r["on_chain"], true);
    let token = r["auth_token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 64);

    // Public request 3: API-REG-4: the same announcement again is refused
    // and does not revoke the token.
    let (s, e) = post_json(&url, "/p2p/register", &a).await.unwrap();
    assert_eq!(s, 400, "{e}");
    // Public requests 4..=5 pass, the 6th is limited.
    for i in 4..=5 {
        let r = send(&url, "GET", "/status", &[], None).await.unwrap();
        assert_eq!(r.status, 200, "public request {i}");
    }
    let r = send(&url, "GET", "/status", &[], None).await.unwrap();
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let e = json_of(&r);
    assert_eq!(
        (e["code"].as_u64(), e["reason"].as_str()),
        (Some(5001), Some("rate_limited"))
    );
    // Monitoring is never limited.
    let r = send(&url, "GET", "/health", &[], None).await.unwrap();
    assert_eq!(r.status, 200);

    // API-RATE-1: a token from POST /p2p/register no longer raises the
    // limit; it counts against the address, whose quota is spent.
    let registry_bearer = format!("Bearer {token}");
    let r = send(
        &url,
        "GET",
        "/status",
        &[("Authorization", registry_bearer.as_str())],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    // A funded API key has its own, higher quota (spec/api.md API-KEY-3).
    let api_key = net.api_key().await.unwrap();
    let bearer = format!("Bearer {api_key}");
    let auth = [("Authorization", bearer.as_str())];
    let r = send(&url, "GET", "/nodes", &auth, None).await.unwrap();
    assert_eq!(r.status, 200);
    let nodes = json_of(&r);
    assert_eq!(nodes["announced"][0]["node_id"], a["node_id"]);
    assert_eq!(nodes["announced"][0]["available_experts"], json!(experts));
    assert_eq!(nodes["on_chain"][0]["node_id"], a["node_id"]);
    // API-REG-8: paged; one node per page, the cursor ends after it.
    let r = send(&url, "GET", "/nodes?limit=1", &auth, None)
        .await
        .unwrap();
    let page = json_of(&r);
    assert_eq!(page["next_after"], a["node_id"], "{page}");
    let next = format!("/nodes?limit=1&after={}", a["node_id"].as_str().unwrap());
    let r = send(&url, "GET", &next, &auth, None).await.unwrap();
    let page = json_of(&r);
    assert_eq!(
        (&page["announced"], &page["on_chain"], &page["next_after"]),
        (&json!([]), &json!([]), &Value::Null),
        "{page}"
    );
    let r = send(&url, "GET", "/nodes?limit=101", &auth, None)
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    // Four token requests so far; 46 more make the quota of 50.
    for i in 4..50 {
        let r = send(&url, "GET", "/status", &auth, None).await.unwrap();
        assert_eq!(r.status, 200, "token request {i}");
    }
    let r = send(&url, "GET", "/status", &auth, None).await.unwrap();
    assert_eq!(r.status, 429, "the token's 51st request in a minute");

    // An unknown token and a malformed header are never silently public;
    // they count against the address first (API-RATE-5), whose quota is
    // spent, so they are 429 here (401 within the quota:
    // api_rate_5_requests_with_bad_tokens_count_against_the_address).
    let bogus = format!("Bearer {}", "ab".repeat(32));
    let r = send(
        &url,
        "GET",
        "/status",
        &[("Authorization", bogus.as_str())],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 429);
    let r = send(
        &url,
        "GET",
        "/status",
        &[("Authorization", "Basic xyz")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 429);
    // Metrics count the refusals and the API latency.
    let r = send(&url, "GET", "/metrics", &[], None).await.unwrap();
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("blyan_api_rate_limited_total 5"), "{text}");
    assert!(
        text.contains("blyan_api_request_duration_ms_count"),
        "{text}"
    );
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mine_checks_the_payload_and_commits_the_registration() {
    let dir = tempfile::tempdir().unwrap();
    let net = devnet(dir.path(), RateLimitConfig::unlimited()).await;
    let url = net.nodes[0].api_url();
    let chain = net.genesis.chain_id.clone();
    let faucet = read_key_file(&net.faucet_key_file, DEVNET_PASSWORD).unwrap();
    let payload = b"a tiny dataset for the devnet: 1 2 3 4 5".repeat(40);
    let block = pol_block(
        PolBlockType::Data,
        [0; 32],
        Vec::new(),
        &payload,
        net.faucet,
    );
    let t = tx(
        &chain,
        &faucet,
        0,
        TxKind::Pol(Box::new(PolTx::RegisterBlock(block.clone()))),
        100_000_000_000,
    );

    // A payload that is not the block's is refused, and nothing is submitted.
    let mut wrong = payload.clone();
    wrong[0] ^= 1;
    let (s, e) = post_json(
        &url,
        "/mine",
        &json!({ "tx": hex_tx(&t), "block_data": format!("0x{}", hex::encode(&wrong)) }),
    )
    .await
    .unwrap();
    assert_eq!(s, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("POL-3"), "{e}");
    let (s, e) = post_json(
        &url,
        "/mine",
        &json!({ "tx": hex_tx(&t), "block_data": format!("0x{}", hex::encode(&payload[1..])) }),
    )
    .await
    .unwrap();
    assert_eq!(s, 400, "{e}");
    // A transfer is not a PoL registration.
    let transfer = blyan_state_machine::testkit::transfer(&chain, &faucet, 0, net.faucet, 1);
    let (s, _) = post_json(
        &url,
        "/mine",
        &json!({ "tx": hex_tx(&transfer), "block_data": "0x00" }),
    )
    .await
    .unwrap();
    assert_eq!(s, 400);
    let (_, status) = get_json(&url, "/status").await.unwrap();
    assert_eq!(status["mempool_txs"], 0, "nothing was submitted");

    let (s, m) = post_json(
        &url,
        "/mine",
        &json!({
            "tx": hex_tx(&t),
            "block_data": format!("0x{}", hex::encode(&payload)),
            "candidate_loss": 2.5,
        }),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["status"], "pending");
    assert_eq!(m["reward_bly"], 0.0);
    let id = format!("0x{}", hex::encode(block.id()));
    assert_eq!(m["block_hash"], id);
    let path = format!("/pol/blocks/{id}");
    let committed = eventually("the PoL block to commit", || async {
        let (s, v) = get_json(&url, &path).await.unwrap();
        (s == 200).then_some(v)
    })
    .await;
    assert_eq!(committed["payload_cid"], block.payload_cid);
    let (_, list) = get_json(&url, "/pol/blocks?limit=100").await.unwrap();
    assert!(
        list["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["id"] == id)
    );
    let (s, _) = get_json(&url, "/pol/blocks?limit=0").await.unwrap();
    assert_eq!(s, 400);
    let (s, _) = get_json(&url, &format!("/pol/blocks/0x{}", "00".repeat(32)))
        .await
        .unwrap();
    assert_eq!(s, 404);
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let net = devnet(dir.path(), RateLimitConfig::unlimited()).await;
    let url = net.nodes[0].api_url();
    let (s, doc) = get_json(&url, "/openapi.json").await.unwrap();
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/tx", "post"),
        ("/tx/{id}", "get"),
        ("/account/{address}", "get"),
        ("/block/latest", "get"),
        ("/block/{id}", "get"),
        ("/params", "get"),
        ("/health", "get"),
        ("/status", "get"),
        ("/metrics", "get"),
        ("/chat", "post"),
        ("/v1/chat/completions", "post"),
        ("/mine", "post"),
        ("/pol/blocks", "get"),
        ("/pol/blocks/{id}", "get"),
        ("/pol/experts", "get"),
        ("/p2p/register", "post"),
        ("/nodes", "get"),
        ("/openapi.json", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not documented"
        );
    }
    // Every documented route answers something other than the fallback 404.
    for path in paths.keys().filter(|p| !p.contains('{')) {
        let methods = paths[path].as_object().unwrap();
        if methods.contains_key("get") {
            let r = send(&url, "GET", path, &[], None).await.unwrap();
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            assert_ne!(v["reason"], "no_such_route", "GET {path}");
        }
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for s in [
        "ChatBody",
        "ChatAnswer",
        "MineBody",
        "RegisterBody",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(s), "schema {s}");
    }
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_genesis_registers_the_model_every_node_serves_and_stores() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevnetOptions::new(dir.path().join("devnet"), 2);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = RateLimitConfig::unlimited();
    let net = Devnet::start(opts).await.unwrap();
    let model_dir = blyan_runtime::devnet::model_dir(&net.dir);
    let manifest = std::fs::read(model_dir.join("manifest.json")).unwrap();

    // GEN-MODEL-1: a meta block over the manifest, then one layer per layer.
    let g = &net.genesis.pol_blocks;
    assert_eq!(g[0].block_type, PolBlockType::Meta);
    assert_eq!(
        g[0].payload_cid,
        blyan_state_machine::pol::cid_v1_raw_sha256(&manifest)
    );
    let layers: Vec<u32> = g[1..5].iter().map(|b| b.layer.unwrap()).collect();
    assert_eq!(layers, vec![0, 1, 2, 3], "the embedded model has 4 layers");
    assert!(
        g[1..5]
            .iter()
            .all(|b| b.block_type == PolBlockType::Layer && b.model_id == g[0].id())
    );
    // GEN-MODEL-3: then the shipped corpus, the training and validation pools.
    use blyan_state_machine::pol::validation::DataRole;
    let corpus = [DataRole::Train, DataRole::Validation].map(blyan_runtime::corpus::payload);
    assert_eq!(g.len(), 7);
    for (b, payload) in g[5..].iter().zip(&corpus) {
        assert_eq!(b.block_type, PolBlockType::Data);
        assert_eq!(
            (b.model_id, b.depends_on.clone()),
            (g[0].id(), vec![g[0].id()])
        );
        assert_eq!(
            b.payload_cid,
            blyan_state_machine::pol::cid_v1_raw_sha256(payload)
        );
    }

    for node in &net.nodes {
        let url = node.api_url();
        let (_, list) = get_json(&url, "/pol/blocks").await.unwrap();
        assert_eq!(list["total"], 7, "{list}");
        let (_, experts) = get_json(&url, "/pol/experts").await.unwrap();
        assert_eq!(experts["experts"].as_array().unwrap().len(), 4, "{experts}");
        // Every registered payload is in the node's blob store.
        for b in g {
            let payload = if b.block_type == PolBlockType::Data {
                corpus
                    .iter()
                    .find(|p| blyan_state_machine::pol::cid_v1_raw_sha256(p) == b.payload_cid)
                    .expect("a corpus pool")
                    .clone()
            } else if b.block_type == PolBlockType::Meta {
                std::fs::read(model_dir.join("manifest.json")).unwrap()
            } else {
                let cid = &b.payload_cid;
                let path = std::fs::read_dir(&model_dir)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .find(|p| {
                        p.extension().is_some_and(|x| x == "safetensors")
                            && &blyan_state_machine::pol::cid_v1_raw_sha256(
                                &std::fs::read(p).unwrap(),
                            ) == cid
                    })
                    .expect("the block file of a registered layer");
                std::fs::read(path).unwrap()
            };
            let id = blyan_runtime::blobs::BlobId::of(&payload);
            assert!(
                node.blobs.has(&id).unwrap(),
                "blob of {:?} {:?}",
                b.block_type,
                b.layer
            );
            assert_eq!(node.blobs.get(&id).unwrap().unwrap(), payload);
        }
        // And /chat serves that model.
        let (s, a) = post_json(&url, "/chat", &json!({ "prompt": "hi", "max_tokens": 2 }))
            .await
            .unwrap();
        assert_eq!(
            (s, a["model"].as_str()),
            (200, Some("blyan-default")),
            "{a}"
        );
    }

    // GEN-MODEL-2: the same directory against a genesis that does not
    // register it is refused.
    blyan_runtime::model::check_registered(&net.genesis, &model_dir).unwrap();
    let mut other = net.genesis.clone();
    other.pol_blocks.truncate(3);
    let e = blyan_runtime::model::check_registered(&other, &model_dir).unwrap_err();
    assert!(
        e.to_string().contains("not registered in the genesis"),
        "{e}"
    );
    net.stop().await;
}

/// API-MINE-3 (issue 18 item 7): `/mine` admits the transaction before it
/// stores the payload: a transaction the mempool refuses (bad signature,
/// fee under the base fee) leaves nothing in the blob store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_mine_3_a_refused_transaction_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let net = devnet(dir.path(), RateLimitConfig::unlimited()).await;
    let url = net.nodes[0].api_url();
    let chain = net.genesis.chain_id.clone();
    let faucet = read_key_file(&net.faucet_key_file, DEVNET_PASSWORD).unwrap();
    let payload = b"a payload whose transaction is never admitted".repeat(30);
    let block = pol_block(
        PolBlockType::Data,
        [0; 32],
        Vec::new(),
        &payload,
        net.faucet,
    );
    let kind = TxKind::Pol(Box::new(PolTx::RegisterBlock(block)));
    let mut forged = tx(&chain, &faucet, 0, kind.clone(), 100_000_000_000);
    forged.signature[3] ^= 1;
    let cheap = tx(&chain, &faucet, 0, kind, 1);
    for t in [forged, cheap] {
        let (s, e) = post_json(
            &url,
            "/mine",
            &json!({ "tx": hex_tx(&t), "block_data": format!("0x{}", hex::encode(&payload)) }),
        )
        .await
        .unwrap();
        assert_eq!(s, 422, "{e}");
        assert!(
            !net.nodes[0]
                .blobs
                .has(&blyan_runtime::blobs::BlobId::of(&payload))
                .unwrap(),
            "the payload of a refused transaction was stored"
        );
    }
    net.stop().await;
}

/// API-REG-6 (issue 18 item 8): an announcement from a node with no
/// on-chain registration is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_reg_6_a_node_without_an_on_chain_registration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let net = devnet(dir.path(), RateLimitConfig::unlimited()).await;
    let url = net.nodes[0].api_url();
    let a = announce(&net, &key(78), &[]);
    let (s, e) = post_json(&url, "/p2p/register", &a).await.unwrap();
    assert_eq!(
        (s, e["reason"].as_str()),
        (403, Some("not_registered_on_chain")),
        "{e}"
    );
    let (_, nodes) = get_json(&url, "/nodes").await.unwrap();
    assert_eq!(nodes["announced"], json!([]), "{nodes}");
    net.stop().await;
}

/// API-RATE-5 (issue 18 item 10): requests with an unknown or malformed
/// token count against the caller's address before they are answered 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_rate_5_requests_with_bad_tokens_count_against_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RateLimitConfig {
        public_per_min: 5,
        ..RateLimitConfig::default()
    };
    let net = devnet(dir.path(), limits).await;
    let url = net.nodes[0].api_url();
    let bogus = format!("Bearer {}", "ab".repeat(32));
    for (i, auth) in [
        bogus.as_str(),
        "Basic xyz",
        bogus.as_str(),
        bogus.as_str(),
        bogus.as_str(),
    ]
    .into_iter()
    .enumerate()
    {
        let r = send(&url, "GET", "/status", &[("Authorization", auth)], None)
            .await
            .unwrap();
        assert_eq!(r.status, 401, "bad-token request {i}");
    }
    // The 6th request from this address, with or without a token, is limited.
    let r = send(&url, "GET", "/status", &[], None).await.unwrap();
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let r = send(
        &url,
        "GET",
        "/status",
        &[("Authorization", bogus.as_str())],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    net.stop().await;
}
