//! `blyan bench-chat`: API-level inference throughput and latency on an
//! in-process 4-validator devnet (embedded model, CPU), with `clients`
//! concurrent clients spread over the four nodes, once without a key (free
//! use) and once with the devnet's API key, so the cost of key checks and
//! metering shows (spec/api.md API-PAY-*). Each client sends unstreamed
//! `/v1/chat/completions` requests back to back for `duration_s`.
//!
//! Reported per mode: answered requests per second (200s), p50/p99 latency
//! of the 200s, and how many were refused busy (503: the engine's queue is
//! full, API-CHAT-3) or otherwise failed. After the keyed run it waits for
//! settlement and checks that the allowance's `spent` equals the sum of the
//! charged costs the answers reported.
//!
//! With `inference_nodes` > 0 the devnet also runs that many inference nodes
//! (RT-STAGE-*): the validators route every request to them over the P2P
//! transport, so comparing a run with 0 against one with 1 (at `clients` =
//! 1: batch 1) shows what a one-stage remote route costs per request. The
//! report counts the answers by the node that computed them.

use crate::Error;
use crate::client::{get_json, send};
use crate::devnet::{Devnet, DevnetOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct ChatBenchOptions {
    /// Parent directory of the devnet (kept); `None`: a temporary one.
    pub dir: Option<PathBuf>,
    pub clients: usize,
    pub duration_s: u64,
    pub max_tokens: usize,
    pub block_interval_ms: u64,
    /// Inference nodes besides the validators (0: validators serve locally).
    pub inference_nodes: usize,
    /// RT-PIPE-5: ranges the layers are split into over the inference
    /// nodes (0: two with four or more nodes, 1: the whole model on each).
    pub stages: usize,
    /// RT-PIPE-9: every node's `max_stage_batch` (1: no batching).
    pub max_stage_batch: usize,
}

/// One mode's numbers.
#[derive(Clone, Debug, Default)]
pub struct ModeResult {
    pub ok: u64,
    pub busy: u64,
    pub failed: u64,
    pub latencies_ms: Vec<f64>,
    pub charged_base_units: u128,
    pub elapsed_s: f64,
    /// Answers by the node that computed them (the route's largest share).
    pub served_by: std::collections::BTreeMap<String, u64>,
    /// Completion tokens of the answers, and each answer's latency per
    /// completion token (ms).
    pub completion_tokens: u64,
    pub ms_per_token: Vec<f64>,
    /// Answers by the number of stages their route had.
    pub by_stages: std::collections::BTreeMap<usize, u64>,
}

impl ModeResult {
    fn percentile(&self, p: f64) -> f64 {
        percentile(&self.latencies_ms, p)
    }

    pub fn line(&self, mode: &str) -> String {
        let servers: Vec<String> = self
            .served_by
            .iter()
            .map(|(n, c)| format!("{}…={c}", n.get(..10).unwrap_or(n)))
            .collect();
        let stages: Vec<String> = self
            .by_stages
            .iter()
            .map(|(k, c)| format!("{k}-stage={c}"))
            .collect();
        format!(
            "{mode:<8} {:>8.1} req/s  {:>8.1} tokens/s  p50 {:>8.1} ms  p99 {:>8.1} ms  per token p50 {:>6.2} ms  ok {:>6}  busy(503) {:>6}  failed {:>4}  routes {}  served by {}",
            self.ok as f64 / self.elapsed_s,
            self.completion_tokens as f64 / self.elapsed_s,
            self.percentile(0.5),
            self.percentile(0.99),
            percentile(&self.ms_per_token, 0.5),
            self.ok,
            self.busy,
            self.failed,
            stages.join(" "),
            servers.join(" ")
        )
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

async fn one_mode(urls: &[String], key: Option<&str>, o: &ChatBenchOptions) -> ModeResult {
    let body = serde_json::json!({
        "messages": [{ "role": "user", "content": "Benchmark: say hello." }],
        "max_tokens": o.max_tokens,
    })
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(o.duration_s);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..o.clients {
        let url = urls[c % urls.len()].clone();
        let body = body.clone();
        let auth = key.map(|k| format!("Bearer {k}"));
        tasks.spawn(async move {
            let mut r = ModeResult::default();
            while Instant::now() < deadline {
                let mut headers = vec![("content-type", "application/json")];
                if let Some(a) = &auth {
                    headers.push(("authorization", a.as_str()));
                }
                let t = Instant::now();
                match send(
                    &url,
                    "POST",
                    "/v1/chat/completions",
                    &headers,
                    Some(body.as_bytes()),
                )
                .await
                {
                    Ok(resp) if resp.status == 200 => {
                        r.ok += 1;
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        r.latencies_ms.push(ms);
                        let v: serde_json::Value =
                            serde_json::from_slice(&resp.body).unwrap_or_default();
                        let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                        r.completion_tokens += tokens;
                        if tokens > 0 {
                            r.ms_per_token.push(ms / tokens as f64);
                        }
                        let used = v["blyan"]["stages"]
                            .as_array()
                            .map_or(0, |s| s.iter().filter(|s| s["failed"].is_null()).count());
                        *r.by_stages.entry(used).or_default() += 1;
                        let server = v["blyan"]["route"]
                            .as_array()
                            .and_then(|r| r.iter().max_by_key(|s| s["work"].as_u64()))
                            .and_then(|s| s["node"].as_str())
                            .unwrap_or("?")
                            .to_string();
                        *r.served_by.entry(server).or_default() += 1;
                        if v["blyan"]["charged"] == true {
                            r.charged_base_units += v["blyan"]["cost_base_units"]
                                .as_str()
                                .and_then(|s| s.parse::<u128>().ok())
                                .unwrap_or(0);
                        }
                    }
                    Ok(resp) if resp.status == 503 => {
                        r.busy += 1;
                        // Back off a little, as a client honouring 503 would.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => r.failed += 1,
                }
            }
            r
        });
    }
    let mut total = ModeResult::default();
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap_or_default();
        total.ok += r.ok;
        total.busy += r.busy;
        total.failed += r.failed;
        total.charged_base_units += r.charged_base_units;
        total.latencies_ms.extend(r.latencies_ms);
        total.completion_tokens += r.completion_tokens;
        total.ms_per_token.extend(r.ms_per_token);
        for (k, c) in r.by_stages {
            *total.by_stages.entry(k).or_default() += c;
        }
        for (n, c) in r.served_by {
            *total.served_by.entry(n).or_default() += c;
        }
    }
    total.elapsed_s = start.elapsed().as_secs_f64();
    total
}

/// Consensus finality under the mode's load: one transfer of 1 base unit
/// at a time from the faucet, submitted through `url` and polled every
/// 20 ms until committed; the submit-to-commit times, ms (each is at most
/// one poll late).
async fn finality_probe(
    url: String,
    key: k256::ecdsa::SigningKey,
    until: Instant,
) -> Result<Vec<f64>, Error> {
    use blyan_state_machine::tx::TxKind;
    let mut out = Vec::new();
    let to = blyan_state_machine::types::Address([0xb1; 20]);
    while Instant::now() < until {
        let tx = crate::client::sign_tx(&url, &key, TxKind::Transfer { to, amount: 1 }).await?;
        let id = format!("0x{}", hex::encode(tx.id()));
        let body = serde_json::json!({
            "tx": format!("0x{}", hex::encode(blyan_state_machine::encoding::Canonical::encode(&tx)))
        });
        let t = Instant::now();
        let (s, reply) = crate::client::post_json(&url, "/tx", &body).await?;
        if !(200..300).contains(&s) {
            return Err(Error::Http(format!("finality probe: HTTP {s}: {reply}")));
        }
        loop {
            let (s, r) = get_json(&url, &format!("/tx/{id}")).await?;
            if s == 200 && r["height"].is_u64() {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                return Err(Error::Http(format!(
                    "finality probe: {id} not committed in 120 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

fn finality_line(mode: &str, v: &[f64]) -> String {
    format!(
        "{mode:<8} finality (probe transfers, submit to commit): n {:>4}  p50 {:>7.1} ms  p99 {:>7.1} ms",
        v.len(),
        percentile(v, 0.5),
        percentile(v, 0.99)
    )
}

/// Runs both modes and returns the report.
pub async fn run(o: ChatBenchOptions) -> Result<String, Error> {
    let tmp;
    let parent = match &o.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile_dir()?;
            tmp.clone()
        }
    };
    let mut opts = DevnetOptions::new(parent.join("devnet"), 4);
    opts.base_port = None;
    opts.block_interval_ms = o.block_interval_ms;
    opts.rate_limits = crate::ratelimit::RateLimitConfig::unlimited();
    opts.inference_nodes = o.inference_nodes;
    opts.stages = o.stages;
    opts.inference.max_stage_batch = o.max_stage_batch.max(1);
    let devnet = Devnet::start(opts).await?;
    if o.inference_nodes > 0 {
        // The validators route only to nodes whose heartbeats they hold.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            let (_, v) = get_json(&devnet.nodes[0].api_url(), "/nodes").await?;
            if v["live"].as_array().map_or(0, Vec::len) >= o.inference_nodes {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let urls: Vec<String> = devnet.nodes.iter().map(|n| n.api_url()).collect();
    let key = devnet.api_key().await?;
    let allowance = blyan_state_machine::allowance::ApiKey::parse(&key)
        .map_err(|e| Error::Config(e.to_string()))?
        .grant
        .allowance;
    let spent = |v: &serde_json::Value| -> u128 {
        v["spent"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let path = format!("/allowance/0x{}", hex::encode(allowance));
    let (_, before) = get_json(&urls[0], &path).await?;
    let mut report = format!(
        "bench-chat: {} clients over 4 validators, {} inference nodes (stages {}), {} s per mode, max_tokens {}, embedded model on CPU\n",
        o.clients, o.inference_nodes, o.stages, o.duration_s, o.max_tokens
    );
    // Finality without inference load, then under each mode's load.
    let faucet =
        crate::keystore::read_key_file(&devnet.faucet_key_file, crate::devnet::DEVNET_PASSWORD)?;
    let probe = |secs: u64| {
        tokio::spawn(finality_probe(
            urls[0].clone(),
            faucet.clone(),
            Instant::now() + Duration::from_secs(secs),
        ))
    };
    let idle = probe(o.duration_s)
        .await
        .map_err(|e| Error::Http(e.to_string()))??;
    report.push_str(&finality_line("idle", &idle));
    report.push('\n');
    let p = probe(o.duration_s);
    let free = one_mode(&urls, None, &o).await;
    let free_finality = p.await.map_err(|e| Error::Http(e.to_string()))??;
    report.push_str(&free.line("no key"));
    report.push('\n');
    report.push_str(&finality_line("no key", &free_finality));
    report.push('\n');
    let p = probe(o.duration_s);
    let keyed = one_mode(&urls, Some(&key), &o).await;
    let keyed_finality = p.await.map_err(|e| Error::Http(e.to_string()))??;
    report.push_str(&keyed.line("api key"));
    report.push('\n');
    report.push_str(&finality_line("api key", &keyed_finality));
    report.push('\n');
    // Settlement check: what the answers said they charged is what the chain burned.
    let want = spent(&before) + keyed.charged_base_units;
    let t = Instant::now();
    let mut got = 0;
    while t.elapsed() < Duration::from_secs(120) {
        let (_, a) = get_json(&urls[0], &path).await?;
        got = spent(&a);
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.push_str(&format!(
        "settled: allowance spent {} base units, answers reported {} charged: {}\n",
        got - spent(&before),
        keyed.charged_base_units,
        if got == want { "equal" } else { "DIFFERENT" }
    ));
    devnet.stop().await;
    if o.dir.is_none() {
        let _ = std::fs::remove_dir_all(&parent);
    }
    Ok(report)
}

fn tempfile_dir() -> Result<PathBuf, Error> {
    let d = std::env::temp_dir().join(format!("blyan-bench-chat-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| Error::io(d.display(), e))?;
    Ok(d)
}
