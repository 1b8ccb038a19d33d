//! Operations metrics added to `/metrics` (spec/ops.md OPS-MET-*): chain
//! health the node observes at each commit ([`ChainMetrics`]), the inference
//! engine's load and latency ([`InferenceMetrics`]), Proof-of-Learning
//! deltas and the data directory's disk space.
//!
//! OPS-MET-1: every series the alert rules and the dashboard
//! (`runtime/deploy/`) name is written from the first scrape on, zero-valued
//! counters and empty histograms included, so a rule never sees a series
//! appear out of nothing. Label sets are fixed lists ([`INFERENCE_OUTCOMES`],
//! [`DELTA_REJECT_REASONS`]) or the active validator set (bounded by the
//! chain's validator cap).

use blyan_state_machine::block::{BlockOutcome, Event};
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::node::CommittedBlock;
use blyan_state_machine::pol::{DeltaOutcome, PolEvent, RejectReason};
use blyan_state_machine::types::Address;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A cumulative histogram of millisecond observations with fixed bounds,
/// safe to share between threads.
#[derive(Debug)]
pub struct MsHistogram {
    bounds_ms: &'static [u64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl MsHistogram {
    pub fn new(bounds_ms: &'static [u64]) -> MsHistogram {
        MsHistogram {
            bounds_ms,
            buckets: bounds_ms.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Time observed in all, µs.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    pub fn observe(&self, elapsed: std::time::Duration) {
        let ms = elapsed.as_millis() as u64;
        for (le, b) in self.bounds_ms.iter().zip(&self.buckets) {
            if ms <= *le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// `# HELP`, `# TYPE` and every bucket, `_sum` (ms) and `_count`.
    pub fn render(&self, s: &mut String, name: &str, help: &str) {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(s, name, "");
    }

    /// Every bucket, `_sum` (ms) and `_count` with the extra `labels`
    /// (`key="value"`, comma-separated; empty: none), for one series of a
    /// labelled histogram whose `# HELP` and `# TYPE` the caller writes.
    pub fn render_series(&self, s: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, b) in self.bounds_ms.iter().zip(&self.buckets) {
            let _ = writeln!(
                s,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let sum_ms = self.sum_us.load(Ordering::Relaxed) as f64 / 1000.0;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(s, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let _ = writeln!(
            s,
            "{name}_sum{braces} {sum_ms}\n{name}_count{braces} {count}"
        );
    }
}

fn one(s: &mut String, name: &str, help: &str, kind: &str, v: impl std::fmt::Display) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
}

/// Upper bounds (ms) of the engine latency histogram.
pub const ENGINE_BUCKETS_MS: [u64; 12] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];
/// Upper bounds (ms) of the block interval histogram.
pub const BLOCK_INTERVAL_BUCKETS_MS: [u64; 10] = [
    250, 500, 1_000, 2_000, 3_000, 5_000, 10_000, 20_000, 60_000, 300_000,
];
/// Upper bounds (ms) of the PoL evaluation histogram.
pub const EVALUATION_BUCKETS_MS: [u64; 8] = [
    100, 1_000, 10_000, 60_000, 300_000, 900_000, 1_800_000, 3_600_000,
];

/// How an inference request ended (`blyan_inference_requests_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InferenceOutcome {
    /// Served.
    Ok,
    /// Refused at once: the queue was full (503).
    Busy,
    /// The inference timeout passed (504).
    Timeout,
    /// Cancelled because the client stalled or went away (API-CHAT-4).
    Cancelled,
    /// Refused for the request itself (prompt too long, allowance exhausted).
    Rejected,
    /// The engine failed (panic, down, stopped).
    Error,
}

/// Every [`InferenceOutcome`] label, in the order `/metrics` lists them.
pub const INFERENCE_OUTCOMES: [(InferenceOutcome, &str); 6] = [
    (InferenceOutcome::Ok, "ok"),
    (InferenceOutcome::Busy, "busy"),
    (InferenceOutcome::Timeout, "timeout"),
    (InferenceOutcome::Cancelled, "cancelled"),
    (InferenceOutcome::Rejected, "rejected"),
    (InferenceOutcome::Error, "error"),
];

/// The inference engine's load and latency (OPS-MET-2), shared by the
/// handle (requests, queue) and the engine thread (tokens, latency).
#[derive(Debug)]
pub struct InferenceMetrics {
    requests: [AtomicU64; INFERENCE_OUTCOMES.len()],
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Jobs running on the engine (0 or 1).
    running: AtomicU64,
    /// Time on the engine per job (queue wait excluded).
    pub engine_ms: MsHistogram,
}

impl Default for InferenceMetrics {
    fn default() -> Self {
        InferenceMetrics {
            requests: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            running: AtomicU64::new(0),
            engine_ms: MsHistogram::new(&ENGINE_BUCKETS_MS),
        }
    }
}

impl InferenceMetrics {
    pub fn request(&self, outcome: InferenceOutcome) {
        let i = INFERENCE_OUTCOMES
            .iter()
            .position(|(o, _)| *o == outcome)
            .expect("every outcome is listed");
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
    }

    pub fn set_running(&self, running: bool) {
        self.running.store(running as u64, Ordering::Relaxed);
    }

    /// Whether a job is on the engine now.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed) > 0
    }

    /// RT-HB-11: engine time per token served so far, µs (0 before the
    /// first token).
    pub fn compute_per_token_us(&self) -> u64 {
        let tokens = self.prompt_tokens.load(Ordering::Relaxed)
            + self.completion_tokens.load(Ordering::Relaxed);
        self.engine_ms.sum_us().checked_div(tokens).unwrap_or(0)
    }

    pub fn requests(&self, outcome: InferenceOutcome) -> u64 {
        let i = INFERENCE_OUTCOMES
            .iter()
            .position(|(o, _)| *o == outcome)
            .expect("every outcome is listed");
        self.requests[i].load(Ordering::Relaxed)
    }

    /// `queued`: jobs waiting in the queue; `capacity`: the queue's bound.
    pub fn render(&self, s: &mut String, queued: usize, capacity: usize) {
        let name = "blyan_inference_requests_total";
        let _ = writeln!(
            s,
            "# HELP {name} Inference requests by outcome (ok, busy: refused on a full queue, timeout, cancelled, rejected, error).\n# TYPE {name} counter"
        );
        for ((_, label), c) in INFERENCE_OUTCOMES.iter().zip(&self.requests) {
            let _ = writeln!(
                s,
                "{name}{{outcome=\"{label}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let name = "blyan_inference_tokens_total";
        let _ = writeln!(
            s,
            "# HELP {name} Tokens of served inference requests (prompt and completion).\n# TYPE {name} counter"
        );
        for (kind, c) in [
            ("prompt", &self.prompt_tokens),
            ("completion", &self.completion_tokens),
        ] {
            let _ = writeln!(s, "{name}{{kind=\"{kind}\"}} {}", c.load(Ordering::Relaxed));
        }
        one(
            s,
            "blyan_inference_queue_depth",
            "Inference jobs waiting or running on this node's engine (the autoscaling signal).",
            "gauge",
            queued as u64 + self.running.load(Ordering::Relaxed),
        );
        one(
            s,
            "blyan_inference_queue_capacity",
            "Inference jobs the queue holds beyond the running one ([inference] queue_len).",
            "gauge",
            capacity,
        );
        self.engine_ms.render(
            s,
            "blyan_inference_engine_duration_ms",
            "Time an inference job spent on the engine (queue wait excluded), in ms.",
        );
    }
}

/// Why a delta was rejected, as a `reason` label.
pub const DELTA_REJECT_REASONS: [(RejectReason, &str); 3] = [
    (RejectReason::Stale, "stale"),
    (RejectReason::NoQuorum, "no_quorum"),
    (
        RejectReason::InsufficientImprovement,
        "insufficient_improvement",
    ),
];

#[derive(Debug, Default)]
struct ChainInner {
    blocks: u64,
    last_commit: Option<std::time::Instant>,
    /// Blocks whose `last_commit_signers` (the chain's record of who signed
    /// the previous block, SLASH-2's input) lack each active validator,
    /// keyed by validator (the active set only).
    missed: BTreeMap<Address, u64>,
    deltas_accepted: u64,
    deltas_rejected: [u64; DELTA_REJECT_REASONS.len()],
    delta_commits_expired: u64,
}

/// API-POL-2: most decisions a node remembers.
pub const MAX_DECISIONS: usize = 4_096;

/// The last [`MAX_DECISIONS`] delta decisions, by delta id, with the height
/// of the block that decided them (in memory: a restarted node answers
/// accepted deltas from the DAG only).
#[derive(Debug, Default)]
pub struct DecisionLog {
    by_id: std::collections::BTreeMap<[u8; 32], (u64, blyan_state_machine::pol::DeltaDecision)>,
    order: std::collections::VecDeque<[u8; 32]>,
}

impl DecisionLog {
    pub fn push(&mut self, height: u64, d: blyan_state_machine::pol::DeltaDecision) {
        if self.by_id.insert(d.delta_id, (height, d.clone())).is_none() {
            self.order.push_back(d.delta_id);
        }
        while self.order.len() > MAX_DECISIONS {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    pub fn get(&self, id: &[u8; 32]) -> Option<&(u64, blyan_state_machine::pol::DeltaDecision)> {
        self.by_id.get(id)
    }
}

/// What the node task observes at each commit (OPS-MET-3), shared with
/// `/metrics`. Updated once per committed block under one short lock.
#[derive(Debug)]
pub struct ChainMetrics {
    inner: Mutex<ChainInner>,
    /// Wall time between two commits this process saw.
    pub block_interval_ms: MsHistogram,
    /// Time to evaluate a PoL delta (a validator's measured loss,
    /// POL-EVAL-4: fetching what it needs and both losses).
    pub evaluation_ms: MsHistogram,
    /// API-POL-2: the latest decisions this process saw, for
    /// `GET /pol/deltas/{id}`.
    pub decisions: Mutex<DecisionLog>,
    /// The mempool's bound, in transactions.
    pub mempool_capacity_txs: usize,
    /// Validators this node dials (the configured peers but itself); set
    /// by the wiring ([`crate::node`]).
    pub peers_configured: std::sync::atomic::AtomicUsize,
    /// The data directory, whose file system `/metrics` reports.
    pub data_dir: std::path::PathBuf,
}

impl ChainMetrics {
    pub fn new(ledger: &Ledger, mempool_capacity_txs: usize, data_dir: &Path) -> ChainMetrics {
        let inner = ChainInner {
            missed: ledger.active_set().iter().map(|(a, _)| (*a, 0)).collect(),
            ..ChainInner::default()
        };
        ChainMetrics {
            inner: Mutex::new(inner),
            decisions: Mutex::new(DecisionLog::default()),
            block_interval_ms: MsHistogram::new(&BLOCK_INTERVAL_BUCKETS_MS),
            evaluation_ms: MsHistogram::new(&EVALUATION_BUCKETS_MS),
            mempool_capacity_txs,
            peers_configured: Default::default(),
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// One committed block: `ledger` is the state after it. Its
    /// `last_commit_signers` record who signed the previous block, as the
    /// chain counts it for downtime (SLASH-2): a commit needs only 2/3 of
    /// the power, so a healthy validator is absent from some of them (the
    /// slowest precommits), and one that is down from all.
    pub fn committed(&self, block: &CommittedBlock, outcome: &BlockOutcome, ledger: &Ledger) {
        let now = std::time::Instant::now();
        let mut g = self.inner.lock().expect("chain metrics lock");
        g.blocks += 1;
        if let Some(prev) = g.last_commit.replace(now) {
            self.block_interval_ms.observe(now - prev);
        }
        let signers = &block.block.body.last_commit_signers;
        let set = ledger.active_set();
        // Bounded by the active set: validators that left it are forgotten.
        g.missed.retain(|a, _| set.iter().any(|(v, _)| v == a));
        // Block 1 certifies no earlier block.
        let records = block.block.header.height > 1;
        for (v, _) in set {
            let missed = g.missed.entry(*v).or_insert(0);
            if records && !signers.contains(v) {
                *missed += 1;
            }
        }
        for e in &outcome.events {
            let Event::Pol(p) = e else { continue };
            if let PolEvent::DeltaDecided(d) = &**p {
                self.decisions
                    .lock()
                    .expect("decisions lock")
                    .push(block.block.header.height, d.clone());
            }
            match &**p {
                PolEvent::DeltaDecided(d) => match &d.outcome {
                    DeltaOutcome::Accepted { .. } => g.deltas_accepted += 1,
                    DeltaOutcome::Rejected(r) => {
                        let i = DELTA_REJECT_REASONS
                            .iter()
                            .position(|(x, _)| x == r)
                            .expect("every reason is listed");
                        g.deltas_rejected[i] += 1;
                    }
                },
                PolEvent::DeltaCommitExpired { .. } => g.delta_commits_expired += 1,
            }
        }
    }

    /// The chain, PoL and disk series; `ledger` is the latest state.
    pub fn render(&self, s: &mut String, ledger: &Ledger) {
        let g = self.inner.lock().expect("chain metrics lock");
        one(
            s,
            "blyan_blocks_committed_total",
            "Blocks this node committed since it started.",
            "counter",
            g.blocks,
        );
        let name = "blyan_validator_missed_blocks_total";
        let _ = writeln!(
            s,
            "# HELP {name} Committed blocks whose record of the previous commit (last_commit_signers) lacks the validator (active validators).\n# TYPE {name} counter"
        );
        for (v, n) in &g.missed {
            let _ = writeln!(s, "{name}{{validator=\"{v}\"}} {n}");
        }
        one(
            s,
            "blyan_pol_deltas_pending",
            "Revealed PoL deltas under evaluation (POL-22, POL-30).",
            "gauge",
            ledger.pol().pending_deltas().count(),
        );
        one(
            s,
            "blyan_pol_deltas_accepted_total",
            "PoL deltas accepted as new heads in blocks committed since start (POL-37).",
            "counter",
            g.deltas_accepted,
        );
        let name = "blyan_pol_deltas_rejected_total";
        let _ = writeln!(
            s,
            "# HELP {name} PoL deltas rejected in blocks committed since start, by reason (POL-33..35).\n# TYPE {name} counter"
        );
        for ((_, label), n) in DELTA_REJECT_REASONS.iter().zip(g.deltas_rejected) {
            let _ = writeln!(s, "{name}{{reason=\"{label}\"}} {n}");
        }
        one(
            s,
            "blyan_pol_delta_commits_expired_total",
            "PoL delta commitments that expired unrevealed (POL-22).",
            "counter",
            g.delta_commits_expired,
        );
        drop(g);
        self.block_interval_ms.render(
            s,
            "blyan_block_interval_ms",
            "Wall time between two blocks this node committed, in ms.",
        );
        self.evaluation_ms.render(
            s,
            "blyan_pol_evaluation_duration_ms",
            "Time to evaluate a PoL delta, in ms (empty until nodes evaluate deltas).",
        );
        one(
            s,
            "blyan_mempool_capacity_txs",
            "Most transactions the mempool holds.",
            "gauge",
            self.mempool_capacity_txs,
        );
        one(
            s,
            "blyan_peers_configured",
            "Validators this node dials (configured peers other than itself).",
            "gauge",
            self.peers_configured.load(Ordering::Relaxed),
        );
        // OPS-MET-4: the data directory's file system; 0 if it cannot be read.
        let (avail, size) = disk_space(&self.data_dir).unwrap_or((0, 0));
        one(
            s,
            "blyan_data_dir_available_bytes",
            "Bytes available to the node on its data directory's file system.",
            "gauge",
            avail,
        );
        one(
            s,
            "blyan_data_dir_size_bytes",
            "Size of the data directory's file system, in bytes.",
            "gauge",
            size,
        );
    }
}

/// Available and total bytes of the file system holding `dir`.
pub fn disk_space(dir: &Path) -> Option<(u64, u64)> {
    let st = rustix::fs::statvfs(dir).ok()?;
    let frsize = st.f_frsize.max(1);
    Some((
        st.f_bavail.saturating_mul(frsize),
        st.f_blocks.saturating_mul(frsize),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative_and_renders_every_bucket() {
        let h = MsHistogram::new(&[10, 100]);
        h.observe(std::time::Duration::from_millis(5));
        h.observe(std::time::Duration::from_millis(50));
        h.observe(std::time::Duration::from_millis(500));
        let mut s = String::new();
        h.render(&mut s, "x_ms", "help");
        assert!(s.contains("x_ms_bucket{le=\"10\"} 1\n"), "{s}");
        assert!(s.contains("x_ms_bucket{le=\"100\"} 2\n"), "{s}");
        assert!(s.contains("x_ms_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_ms_sum 555\nx_ms_count 3\n"), "{s}");
    }

    #[test]
    fn ops_met_1_inference_series_exist_at_zero() {
        let m = InferenceMetrics::default();
        let mut s = String::new();
        m.render(&mut s, 0, 16);
        for (_, label) in INFERENCE_OUTCOMES {
            assert!(
                s.contains(&format!(
                    "blyan_inference_requests_total{{outcome=\"{label}\"}} 0\n"
                )),
                "{s}"
            );
        }
        assert!(s.contains("blyan_inference_engine_duration_ms_count 0\n"));
        m.request(InferenceOutcome::Busy);
        m.set_running(true);
        let mut s = String::new();
        m.render(&mut s, 3, 16);
        assert!(s.contains("blyan_inference_requests_total{outcome=\"busy\"} 1\n"));
        assert!(s.contains("blyan_inference_queue_depth 4\n"), "{s}");
    }

    #[test]
    fn disk_space_of_a_real_directory() {
        let (avail, size) = disk_space(Path::new(".")).unwrap();
        assert!(size > 0 && avail <= size, "{avail} {size}");
    }
}
