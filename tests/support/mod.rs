//! Helpers shared by the end-to-end tests (each test binary includes this
//! module and uses part of it).
#![allow(dead_code)]

use blyan_runtime::client::get_json;
use std::future::Future;
use std::time::{Duration, Instant};

/// Liveness bound of every wait in these tests: a hang is a failure, not a
/// slow pass (nothing here asserts on speed).
pub const DEADLINE: Duration = Duration::from_secs(240);

/// Polls `f` every 100 ms until it returns `Some`, or panics after [`DEADLINE`].
pub async fn eventually<T, Fut: Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The committed height a node reports on `GET /status`.
pub async fn height(url: &str) -> u64 {
    let (s, v) = get_json(url, "/status").await.unwrap();
    assert_eq!(s, 200, "{v}");
    v["height"].as_u64().unwrap()
}
