//! Fixtures: the tiny transformers checkpoints and transformers' outputs made
//! by `gpu/parity/make_fixtures.py`. If they are missing, the script is run
//! (with `$BLYAN_PYTHON`, default `python3`, which needs torch and
//! transformers); if that fails, the tests fail and say how to fix it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("BLYAN_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/blyan-parity"))
}

/// The manifest (generating the fixtures first if needed).
pub fn manifest() -> &'static Value {
    static MANIFEST: OnceLock<Value> = OnceLock::new();
    MANIFEST.get_or_init(|| {
        let dir = fixtures_dir();
        let path = dir.join("manifest.json");
        if !path.is_file() {
            let python = std::env::var("BLYAN_PYTHON").unwrap_or_else(|_| "python3".into());
            let script = repo_root().join("gpu/parity/make_fixtures.py");
            let status = std::process::Command::new(&python)
                .arg(&script)
                .arg("--out")
                .arg(&dir)
                .status();
            assert!(
                matches!(status, Ok(s) if s.success()),
                "parity fixtures missing at {} and `{python} {}` failed: activate the venv \
                 with torch and transformers (see gpu/ci.sh)",
                dir.display(),
                script.display()
            );
        }
        let text = std::fs::read_to_string(&path).expect("read manifest.json");
        serde_json::from_str(&text).expect("parse manifest.json")
    })
}

/// The manifest entry of model `name`.
pub fn model(name: &str) -> &'static Value {
    manifest()["models"]
        .as_array()
        .expect("models")
        .iter()
        .find(|m| m["dir"] == name)
        .unwrap_or_else(|| panic!("no fixture {name}"))
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

pub fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("int"))
        .collect()
}

pub fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("float") as f32)
                .collect()
        })
        .collect()
}

/// Largest absolute difference; panics on shape mismatch.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row count");
    let mut worst = 0.0f32;
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len(), "row length");
        for (x, y) in ra.iter().zip(rb) {
            assert!(x.is_finite() && y.is_finite());
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("blyan-gpu-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Copies a fixture model directory into a fresh temp dir.
pub fn copy_model(name: &str) -> PathBuf {
    let dst = temp_dir(name);
    for entry in std::fs::read_dir(model_dir(name)).expect("read fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
    dst
}
