//! Operations (issue 17, spec/ops.md OPS-*): the deployment files validate,
//! the alerts fire and stay quiet in promtool's unit tests, and a real
//! `blyan devnet` process exports every metric the rules and the dashboard
//! name, sends its spans to an OTLP receiver started here with their
//! parent-child links intact, logs JSON lines that each name their node,
//! and stops cleanly on SIGTERM; `blyan node` does too, `--check-config`
//! answers, and the store reopens.

mod support;

use blyan_runtime::client::{get_json, send};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{blyan_bin, eventually};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy() -> PathBuf {
    repo().join("runtime/deploy")
}

/// Every file under `dir` whose name ends with one of `exts`.
fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p, exts));
        } else if exts
            .iter()
            .any(|x| p.to_string_lossy().ends_with(&format!(".{x}")))
        {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Whether a YAML text has top-level `apiVersion` and `kind` (a Kubernetes
/// object; documents separated by `---`).
fn is_kubernetes_object(text: &str) -> bool {
    let top = |k: &str| text.lines().any(|l| l.starts_with(&format!("{k}:")));
    top("apiVersion") && top("kind")
}

/// Every YAML file under runtime/deploy/ with top-level apiVersion and kind
/// passes `kubernetes-validate --strict` (offline schemas); the validator
/// refuses a manifest with an unknown field, so the check can fail.
#[test]
fn kubernetes_manifests_validate_strictly() {
    let validate = repo().join(".venv/bin/kubernetes-validate");
    assert!(
        validate.is_file(),
        "{} missing: run gpu/ci.sh --setup",
        validate.display()
    );
    let yamls = files(&deploy(), &["yaml", "yml"]);
    let objects: Vec<&PathBuf> = yamls
        .iter()
        .filter(|p| is_kubernetes_object(&std::fs::read_to_string(p).unwrap()))
        .collect();
    let names: BTreeSet<String> = objects
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "validator-statefulset.yaml",
        "validator-pdb.yaml",
        "validator-services.yaml",
        "inference-deployment.yaml",
        "inference-hpa.yaml",
    ] {
        assert!(names.contains(want), "{want} not found among {names:?}");
    }
    let (ok, out) = run(Command::new(&validate).arg("--strict").args(&objects));
    assert!(ok, "kubernetes-validate --strict failed:\n{out}");
    let passed = out.matches(" passed for resource ").count();
    assert!(passed >= objects.len(), "{out}");
    // kustomization.yaml names only files that exist.
    let k = deploy().join("kubernetes");
    let text = std::fs::read_to_string(k.join("kustomization.yaml")).unwrap();
    assert!(!is_kubernetes_object(&text));
    let mut in_resources = false;
    for line in text.lines() {
        if line.starts_with("resources:") {
            in_resources = true;
        } else if !line.starts_with("  ") {
            in_resources = false;
        } else if in_resources && let Some(f) = line.trim().strip_prefix("- ") {
            assert!(k.join(f).is_file(), "kustomization names missing {f}");
        }
    }

    // The check can fail: an unknown field is refused under --strict.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: x}\nspec:\n  maxUnavailable: 1\n  maxUnavailible: 2\n  selector: {matchLabels: {a: b}}\n",
    )
    .unwrap();
    let (ok, out) = run(Command::new(&validate).arg("--strict").arg(&bad));
    assert!(!ok, "a misspelt field passed:\n{out}");
}

/// `promtool check config` and `check rules` pass, and `promtool test
/// rules` shows every alert firing on a failing series and quiet on a
/// healthy one. Every alert has a severity, a runbook section and a test.
#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let p = deploy().join("prometheus");
    let (ok, out) = run(Command::new("promtool")
        .args(["check", "config"])
        .arg(p.join("prometheus.yml")));
    assert!(ok, "promtool check config:\n{out}");
    let rules = p.join("rules/blyan-alerts.yml");
    let (ok, out) = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules));
    assert!(ok, "promtool check rules:\n{out}");
    let tests = p.join("tests/blyan-alerts.test.yml");
    let (ok, out) = run(Command::new("promtool").args(["test", "rules"]).arg(&tests));
    assert!(ok, "promtool test rules:\n{out}");

    let text = std::fs::read_to_string(&rules).unwrap();
    let tests = std::fs::read_to_string(&tests).unwrap();
    let runbook = std::fs::read_to_string(deploy().join("RUNBOOK.md")).unwrap();
    let alerts: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(alerts.len(), 10, "{alerts:?}");
    assert_eq!(text.matches("severity: ").count(), alerts.len());
    for a in &alerts {
        assert!(
            runbook.contains(&format!("\n## {a}\n")),
            "no runbook section for {a}"
        );
        assert!(
            tests.contains(&format!("alertname: {a}\n")),
            "no promtool test of {a}"
        );
    }
    // The issue's list of alerts.
    for a in [
        "BlyanNoNewBlock",
        "BlyanValidatorMissingBlocks",
        "BlyanNodeHalted",
        "BlyanMempoolSaturated",
        "BlyanPeersLow",
        "BlyanInferenceErrorRateHigh",
        "BlyanInferenceLatencyHigh",
        "BlyanDiskNearlyFull",
    ] {
        assert!(alerts.contains(&a), "{a} missing");
    }

    // The tests can fail: a rule file whose alert never fires fails them.
    let dir = tempfile::tempdir().unwrap();
    let broken = text.replace("expr: blyan_halted == 1", "expr: blyan_halted == 2");
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::create_dir_all(dir.path().join("tests")).unwrap();
    std::fs::write(dir.path().join("rules/blyan-alerts.yml"), broken).unwrap();
    std::fs::write(dir.path().join("tests/t.yml"), &tests).unwrap();
    let (ok, out) = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(dir.path().join("tests/t.yml")));
    assert!(!ok, "a broken rule passed:\n{out}");
}

/// `amtool check-config` accepts the Alertmanager configuration (routing
/// to the PagerDuty receiver), and refuses a route to a receiver that does
/// not exist.
#[test]
fn alertmanager_config_passes_amtool() {
    let am = deploy().join("alertmanager/alertmanager.yml");
    let (ok, out) = run(Command::new("amtool").arg("check-config").arg(&am));
    assert!(ok, "amtool check-config:\n{out}");
    let text = std::fs::read_to_string(&am).unwrap();
    assert!(text.contains("pagerduty_configs"), "a PagerDuty receiver");
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("alertmanager.yml");
    std::fs::write(
        &broken,
        text.replacen("receiver: ", "receiver: no-such-", 1),
    )
    .unwrap();
    let (ok, out) = run(Command::new("amtool").arg("check-config").arg(&broken));
    assert!(!ok, "a route to an unknown receiver passed:\n{out}");
}

/// Metric names (`blyan_*`) an expression text mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("blyan_") {
        let start = i + at;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The PromQL expressions of the rules and the dashboard.
fn referenced_metrics() -> BTreeSet<String> {
    let rules =
        std::fs::read_to_string(deploy().join("prometheus/rules/blyan-alerts.yml")).unwrap();
    // Only the expressions: annotations and comments are prose.
    let mut exprs = String::new();
    let mut in_expr = false;
    for line in rules.lines() {
        let t = line.trim_start();
        if let Some(e) = t.strip_prefix("expr:") {
            exprs.push_str(e);
            exprs.push('\n');
            in_expr = e.trim() == "|";
        } else if in_expr && line.starts_with("          ") {
            exprs.push_str(t);
            exprs.push('\n');
        } else {
            in_expr = false;
        }
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/blyan-dashboard.json")).unwrap(),
    )
    .unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push_str(t["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            exprs.push_str(q);
        }
    }
    metric_names(&exprs)
}

/// The OTLP receiver: every exported span, as (trace id, span id, parent
/// span id, name).
type Span = (Vec<u8>, Vec<u8>, Vec<u8>, String);
type Spans = Arc<Mutex<Vec<Span>>>;

struct Receiver(Spans);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((s.trace_id, s.span_id, s.parent_span_id, s.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the receiver on a free port; returns its endpoint and the spans.
async fn otlp_receiver() -> (String, Spans) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Spans = Arc::default();
    let service = TraceServiceServer::new(Receiver(spans.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (format!("http://{addr}"), spans)
}

/// The chain of span names from `id` up to its root, following parent ids
/// within one trace; `None` if a parent is missing.
fn ancestry(spans: &[Span], index: usize) -> Option<Vec<String>> {
    let mut chain = vec![spans[index].3.clone()];
    let (trace, mut parent) = (&spans[index].0, spans[index].2.clone());
    while !parent.is_empty() {
        let p = spans.iter().find(|s| &s.0 == trace && s.1 == parent)?;
        chain.push(p.3.clone());
        parent = p.2.clone();
    }
    Some(chain)
}

/// Sends SIGTERM and waits for the exit status, at most `bound` (a
/// liveness bound of the test, not a speed claim).
fn sigterm_and_wait(child: &mut Child, bound: Duration) -> std::process::ExitStatus {
    let (ok, out) = run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    assert!(ok, "kill -TERM: {out}");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < bound,
            "the process did not exit within {} s of SIGTERM",
            bound.as_secs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The child's stdout lines, read on a thread of their own to the end.
fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    rx
}

/// The next stdout line; panics after the test's deadline.
fn next_line(lines: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    lines
        .recv_timeout(support::DEADLINE)
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
}

/// Kills a child still running when the test fails.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How long a stopping process may take before the test calls it hung
/// (the node's own bound is 5 s: spec/ops.md OPS-LIFE-1).
const STOP_BOUND: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devnet_process_exports_metrics_spans_and_json_logs_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("devnet");
    let err_log = dir.path().join("devnet.err");
    let (endpoint, spans) = otlp_receiver().await;
    let child = Command::new(blyan_bin())
        .args(["devnet", "--dir"])
        .arg(&net)
        .args(["--base-port", "0", "--log-format", "json"])
        // OPS-LOG-3: per-module levels: the transport's info lines are off.
        .args(["--log", "info,blyan_runtime::transport=warn"])
        .args(["--otlp-endpoint", &endpoint])
        .env_remove("RUST_LOG")
        .env_remove("BLYAN_LOG")
        // Export batches every 200 ms instead of 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_log).unwrap())
        .spawn()
        .unwrap();
    let mut guard = Guard(Some(child));
    // The banner (stdout, not a log): node lines, faucet, API key. Stdout is
    // read to its end, so the devnet's last lines never meet a closed pipe.
    let lines = stdout_lines(guard.0.as_mut().unwrap());
    let mut banner = Vec::new();
    while !banner
        .last()
        .is_some_and(|l: &String| l.starts_with("api key: "))
    {
        banner.push(next_line(&lines, "the devnet's banner"));
    }
    let url = banner
        .iter()
        .find_map(|l| {
            l.strip_prefix("node 0: validator ")?
                .split_whitespace()
                .skip_while(|w| *w != "api")
                .nth(1)
        })
        .unwrap_or_else(|| panic!("no node 0 line in {banner:?}"))
        .to_string();
    let api_key = banner
        .last()
        .and_then(|l| l.strip_prefix("api key: "))
        .unwrap_or_else(|| panic!("no api key line in {banner:?}"))
        .to_string();

    // One paid /chat (the key travels in a header that is never logged).
    let bearer = format!("Bearer {api_key}");
    let r = send(
        &url,
        "POST",
        "/chat",
        &[("authorization", bearer.as_str())],
        Some(br#"{"prompt": "hello", "max_tokens": 4}"#),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // A transfer through the CLI, waited for until committed.
    let (ok, out) = run(Command::new(blyan_bin())
        .args(["tx", "transfer", "--key"])
        .arg(net.join("faucet.json"))
        .args(["--password", "devnet", "--amount", "1", "--wait"])
        .args(["--to", "0x000000000000000000000000000000000000b1a0"])
        .args(["--node", &url]));
    assert!(ok, "transfer: {out}");

    // OPS-MET-1: every series the rules and the dashboard name is a sample
    // line of node 0's /metrics.
    let wanted = referenced_metrics();
    assert!(wanted.len() >= 20, "{wanted:?}");
    let (s, _) = get_json(&url, "/status").await.unwrap();
    assert_eq!(s, 200);
    let r = send(&url, "GET", "/metrics", &[], None).await.unwrap();
    let text = String::from_utf8(r.body).unwrap();
    let exported: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(missing.is_empty(), "not on /metrics: {missing:?}\n{text}");
    // The served request shows in the new series.
    assert!(
        text.contains("blyan_inference_requests_total{outcome=\"ok\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("blyan_inference_engine_duration_ms_count 1\n"),
        "{text}"
    );
    assert!(
        text.contains("blyan_pol_evaluation_duration_ms_count 0\n"),
        "{text}"
    );

    // OPS-TRACE-3: the spans reach the receiver with their links: the API
    // request is the root of the engine's work, and the transaction's
    // commit is in its submission's trace.
    let chains = eventually("the chat and transfer traces", || {
        let spans = spans.clone();
        async move {
            let spans = spans.lock().unwrap().clone();
            // The chain of a span with this name that reaches the API
            // (the devnet's own start-up transactions do not).
            let find = |name: &str| -> Option<Vec<String>> {
                (0..spans.len())
                    .filter(|&i| spans[i].3 == name)
                    .filter_map(|i| ancestry(&spans, i))
                    .find(|c| c.last().is_some_and(|root| root.starts_with("POST ")))
            };
            Some((find("stage")?, find("tx.commit")?, find("mempool.admit")?))
        }
    })
    .await;
    assert_eq!(
        chains.0,
        ["stage", "engine.generate", "inference.job", "POST /chat"],
        "{chains:?}"
    );
    assert_eq!(
        chains.1,
        ["tx.commit", "tx.submit", "POST /tx"],
        "{chains:?}"
    );
    assert_eq!(
        chains.2,
        ["mempool.admit", "tx.submit", "POST /tx"],
        "{chains:?}"
    );
    let names: BTreeSet<String> = spans.lock().unwrap().iter().map(|s| s.3.clone()).collect();
    assert!(names.contains("inference.route"), "{names:?}");
    assert!(
        !names.contains("node"),
        "the node span is not exported: {names:?}"
    );

    // OPS-LIFE-1: SIGTERM stops the devnet cleanly.
    let mut child = guard.0.take().unwrap();
    let status = sigterm_and_wait(&mut child, STOP_BOUND);
    assert!(status.success(), "devnet exited with {status}");

    // OPS-LOG-1..4: every stderr line is a JSON object naming its node;
    // the four nodes are told apart; the filter held; no secret leaked.
    let log = std::fs::read_to_string(&err_log).unwrap();
    let mut nodes = BTreeSet::new();
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let node = v["node"]
            .as_str()
            .unwrap_or_else(|| panic!("a line without its node: {line}"));
        nodes.insert(node.to_string());
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string());
        assert!(
            !(v["target"] == "blyan_runtime::transport" && v["level"] == "INFO"),
            "--log did not silence the transport's info lines: {line}"
        );
        lines += 1;
    }
    assert!(lines >= 8, "{log}");
    assert_eq!(nodes.len(), 4, "{nodes:?}");
    assert!(log.contains("\"message\":\"committed\""), "{log}");
    assert!(
        !log.contains(&api_key) && !log.to_lowercase().contains("bearer"),
        "{log}"
    );

    // OPS-LIFE-3: --check-config on node 0's configuration.
    let config = net.join("node-0/config.toml");
    let check = |password: &str, config: &Path| {
        run(Command::new(blyan_bin())
            .args(["node", "--check-config", "--config"])
            .arg(config)
            .env("BLYAN_KEY_PASSWORD", password))
    };
    let (ok, out) = check("devnet", &config);
    assert!(ok && out.contains("is valid"), "{out}");
    let (ok, out) = check("not-the-password", &config);
    assert!(!ok && out.contains("wrong password"), "{out}");
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&config).unwrap().replace(
            "genesis_file = \"../genesis.json\"",
            "genesis_file = \"/nonexistent.json\"",
        ),
    )
    .unwrap();
    let (ok, out) = check("devnet", &broken);
    assert!(!ok && out.contains("nonexistent.json"), "{out}");

    // OPS-LIFE-1: `blyan node` alone stops on SIGTERM with status 0, and its
    // store reopens (the replaying audit).
    let node = Command::new(blyan_bin())
        .args(["node", "--config"])
        .arg(&config)
        .env("BLYAN_KEY_PASSWORD", "devnet")
        .env("BLYAN_HTTP_ADDR", "127.0.0.1:0")
        .env("BLYAN_P2P_ADDR", "127.0.0.1:0")
        .env("BLYAN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard(Some(node));
    let lines = stdout_lines(guard.0.as_mut().unwrap());
    let first = next_line(&lines, "the node's start line");
    let node_url = first
        .split_whitespace()
        .skip_while(|w| *w != "api")
        .nth(1)
        .unwrap_or_else(|| panic!("no api in {first:?}"))
        .to_string();
    let (s, v) = get_json(&node_url, "/health").await.unwrap();
    assert_eq!(s, 200, "{v}");
    let mut node = guard.0.take().unwrap();
    let status = sigterm_and_wait(&mut node, STOP_BOUND);
    assert!(status.success(), "node exited with {status}");
    let (ok, out) = run(Command::new(blyan_bin())
        .args(["store", "verify", "--config"])
        .arg(&config));
    assert!(ok && out.contains("verified"), "{out}");
}
