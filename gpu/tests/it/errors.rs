//! Bad input gets a clear error, not a panic.

use blyan_gpu::config::ModelConfig;
use blyan_gpu::{GpuError, LoadedModel};
use tch::{Device, Kind};

use crate::common::copy_model;

fn load(dir: &std::path::Path) -> Result<LoadedModel, GpuError> {
    LoadedModel::load(Some(dir), Device::Cpu, Kind::Float)
}

fn shard(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("model-00003-of-00007.safetensors")
}

#[test]
fn missing_shard() {
    let dir = copy_model("qwen3_sharded");
    std::fs::remove_file(shard(&dir)).expect("remove");
    let err = load(&dir).err().expect("must fail");
    assert!(
        matches!(err, GpuError::MissingShard { ref path } if path.ends_with("model-00003-of-00007.safetensors")),
        "{err}"
    );
    assert!(err.to_string().contains("missing"));
}

#[test]
fn truncated_shard() {
    let dir = copy_model("qwen3_sharded");
    let bytes = std::fs::read(shard(&dir)).expect("read");
    std::fs::write(shard(&dir), &bytes[..bytes.len() / 2]).expect("truncate");
    let err = load(&dir).err().expect("must fail");
    assert!(matches!(err, GpuError::CorruptShard { .. }), "{err}");
}

#[test]
fn garbage_header() {
    let dir = copy_model("qwen3_single");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[8..16].copy_from_slice(b"not json");
    std::fs::write(&path, &bytes).expect("write");
    let err = load(&dir).err().expect("must fail");
    assert!(matches!(err, GpuError::CorruptShard { .. }), "{err}");
}

#[test]
fn unsupported_architecture() {
    let text = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10,
        "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}"#;
    let err = ModelConfig::from_json_str(text).expect_err("must fail");
    assert!(
        matches!(err, GpuError::UnsupportedArchitecture { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("LlamaForCausalLM"));
}

#[test]
fn unsupported_architecture_from_dir() {
    let dir = copy_model("qwen3_single");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replace("Qwen3ForCausalLM", "MambaForCausalLM")).expect("write");
    let err = load(&dir).err().expect("must fail");
    assert!(
        matches!(err, GpuError::UnsupportedArchitecture { .. }),
        "{err}"
    );
}

#[test]
fn bad_config_values() {
    let text = r#"{"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2}"#;
    assert!(matches!(
        ModelConfig::from_json_str(text),
        Err(GpuError::Config(_))
    ));
    assert!(matches!(
        ModelConfig::from_json_str("{"),
        Err(GpuError::Json { .. })
    ));
}

#[test]
fn missing_tensor_and_bad_shape() {
    let dir = copy_model("qwen3_single");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).expect("read");
    // One layer more than the checkpoint holds.
    std::fs::write(
        &path,
        text.replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4"),
    )
    .expect("write");
    let err = load(&dir).err().expect("must fail");
    assert!(
        matches!(err, GpuError::MissingTensor { ref name } if name.contains("layers.3")),
        "{err}"
    );
    std::fs::write(
        &path,
        text.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128"),
    )
    .expect("write");
    let err = load(&dir).err().expect("must fail");
    assert!(matches!(err, GpuError::ShapeMismatch { .. }), "{err}");
}

#[test]
fn token_out_of_range() {
    let m = LoadedModel::load(None, Device::Cpu, Kind::Float).expect("default model");
    let err = m.model.logits(&[1, 100_000]).expect_err("must fail");
    assert!(
        matches!(err, GpuError::TokenOutOfRange { id: 100_000, .. }),
        "{err}"
    );
    assert!(m.model.logits(&[]).is_err());
}
