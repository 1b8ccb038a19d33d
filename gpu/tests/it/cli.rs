//! The `blyan-gpu` binary, as independent parity checks call it.

use std::process::Command;

use serde_json::Value;

use crate::common::{copy_model, ids, matrix, max_abs_diff, model, model_dir};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blyan-gpu"))
}

#[test]
fn logits_prints_one_json_object_matching_transformers() {
    let name = "qwen3_sharded";
    let input = ids(&model(name)["input_ids"]);
    let list: Vec<String> = input.iter().map(i64::to_string).collect();
    let out = bin()
        .args(["logits", "--model"])
        .arg(model_dir(name))
        .args(["--input-ids", &list.join(","), "--dtype", "f32"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let v: Value = serde_json::from_str(text.trim()).expect("exactly one JSON object");
    assert_eq!(v.as_object().expect("object").len(), 1);
    let rows = matrix(&v["logits"]);
    assert_eq!(rows.len(), input.len());
    assert!(rows.iter().all(|r| r.len() == 300));
    let d = max_abs_diff(&rows, &matrix(&model(name)["logits_f32"]));
    assert!(d <= 1e-4, "max abs diff {d}");
}

#[test]
fn logits_fails_on_non_finite_values() {
    let dir = copy_model("qwen3_single");
    let path = dir.join("model.safetensors");
    let mut tensors = tch::Tensor::read_safetensors(&path).expect("read");
    for (name, t) in &mut tensors {
        if name == "model.norm.weight" {
            let _ = t.fill_(f64::NAN);
        }
    }
    let list: Vec<(&str, &tch::Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tch::Tensor::write_safetensors(&list, &path).expect("write");
    let out = bin()
        .args(["logits", "--model"])
        .arg(&dir)
        .args(["--input-ids", "1,2"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("non-finite"));
}

#[test]
fn logits_errors_are_messages_not_panics() {
    let out = bin()
        .args(["logits", "--model", "/nonexistent", "--input-ids", "1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("blyan-gpu: error:") && !err.contains("panicked"),
        "{err}"
    );
    let out = bin()
        .args(["logits", "--input-ids", "1,x"])
        .output()
        .expect("run");
    assert!(!out.status.success());
}

#[test]
fn generate_with_the_default_model() {
    let out = bin()
        .args([
            "generate",
            "--prompt",
            "hi",
            "--max-tokens",
            "5",
            "--temperature",
            "0.8",
            "--seed",
            "3",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let usage: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stderr).trim()).expect("usage json");
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(usage["usage"]["prompt_tokens"], 2);
}

/// The CLI parses with clap: `--help` answers (it used to say "--help needs
/// a value"), usage errors exit 2 with a message, and `generate` keeps its
/// flags and output (text on stdout, stats on stderr).
#[test]
fn help_and_usage_errors_come_from_clap() {
    let out = bin().args(["generate", "--help"]).output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--prompt",
        "--max-tokens",
        "--temperature",
        "--stop",
        "--device",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let out = bin().arg("--help").output().expect("run");
    assert!(out.status.success());
    for cmd in ["generate", "logits", "bench", "check", "split"] {
        assert!(String::from_utf8_lossy(&out.stdout).contains(cmd), "{cmd}");
    }
    let out = bin()
        .args(["generate", "--prompt", "hi", "--max-tokenz", "3"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-tokenz"));
    let out = bin().args(["generate"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--prompt"));
    let out = bin()
        .args(["generate", "--prompt", "hi", "--max-tokens", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}
