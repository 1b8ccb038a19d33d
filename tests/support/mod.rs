//! Helpers shared by the end-to-end tests (each test binary includes this
//! module and uses part of it).
#![allow(dead_code)]

use blyan_runtime::client::{get_json, send};
use blyan_runtime::devnet::DEVNET_PASSWORD;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Liveness bound of every wait in these tests: a hang is a failure, not a
/// slow pass (nothing here asserts on speed).
pub const DEADLINE: Duration = Duration::from_secs(240);

/// Polls `f` every 100 ms until it returns `Some`, or panics after [`DEADLINE`].
pub async fn eventually<T, Fut: Future<Output = Option<T>>>(
    what: &str,
    f: impl FnMut() -> Fut,
) -> T {
    within(DEADLINE, what, f).await
}

/// Polls `f` every 100 ms until it returns `Some`; panics once `bound` has
/// passed (a liveness bound the test states, never a speed claim).
pub async fn within<T, Fut: Future<Output = Option<T>>>(
    bound: Duration,
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < bound,
            "gave up waiting for {what} (bound {} s)",
            bound.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The committed height a node reports on `GET /status`.
pub async fn height(url: &str) -> u64 {
    let (s, v) = get_json(url, "/status").await.unwrap();
    assert_eq!(s, 200, "{v}");
    v["height"].as_u64().unwrap()
}

/// The validator processes; every one still running is killed on drop, so a
/// failing test leaves none behind.
pub struct Processes {
    pub children: Vec<Option<Child>>,
    pub configs: Vec<PathBuf>,
    pub logs: PathBuf,
}

/// The `blyan` binary of this build, beside the test binary's `deps/`.
/// `cargo test --workspace` builds it (blyan-runtime has tests of its own);
/// a test run of this package alone needs `cargo build -p blyan-runtime
/// --bin blyan` first (cargo holds its build lock while tests run, so the
/// test cannot build it itself).
pub fn blyan_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("blyan");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p blyan-runtime --bin blyan` (or `cargo test --workspace`)",
        bin.display()
    );
    bin
}

impl Processes {
    pub fn new(configs: Vec<PathBuf>, logs: &Path) -> Processes {
        Processes {
            children: configs.iter().map(|_| None).collect(),
            configs,
            logs: logs.to_path_buf(),
        }
    }

    pub fn start(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "node {i} is already running");
        let log = |suffix: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.logs.join(format!("node-{i}.{suffix}")))
                .unwrap()
        };
        let child = Command::new(blyan_bin())
            .args(["node", "--config"])
            .arg(&self.configs[i])
            .env("BLYAN_KEY_PASSWORD", DEVNET_PASSWORD)
            .env("BLYAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log("out"))
            .stderr(log("err"))
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
    }

    /// SIGKILL (`Child::kill` on Unix), then reap.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.children[i].take().expect("node is running");
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "node {i} exited cleanly: {status}");
    }

    /// Panics (with the node's log) if a node that should run has exited.
    pub fn assert_running(&mut self) {
        for (i, c) in self.children.iter_mut().enumerate() {
            if let Some(c) = c
                && let Some(status) = c.try_wait().unwrap()
            {
                let err = std::fs::read_to_string(self.logs.join(format!("node-{i}.err")))
                    .unwrap_or_default();
                panic!("node {i} exited ({status}); its log:\n{err}");
            }
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Free loopback addresses for `n` nodes: `(p2p, http)`. A port is bound,
/// read and released; another process could take it in between, which would
/// make a node fail to start (reported with its log), never pass wrongly.
pub fn free_addrs(n: usize) -> Vec<(String, String)> {
    let listeners: Vec<std::net::TcpListener> = (0..2 * n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    addrs
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

/// Whether `GET /tx/{id}` on `url` answers 200 (the transaction is committed).
pub async fn is_committed(url: &str, id: &str) -> bool {
    matches!(get_json(url, &format!("/tx/{id}")).await, Ok((200, _)))
}

/// The value of the sample `name` (with its labels, if any) in a Prometheus
/// text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sample `name` of a node's `/metrics`, if it answers.
pub async fn metric(url: &str, name: &str) -> Option<u64> {
    let r = send(url, "GET", "/metrics", &[], None).await.ok()?;
    metric_value(&String::from_utf8(r.body).ok()?, name)
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves no node or devnet running to load the machine for the tests
/// after it.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
