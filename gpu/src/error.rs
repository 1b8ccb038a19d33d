//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong when loading or running a model.
///
/// Bad input from outside (a missing shard, a config we do not support, a
/// block whose hash does not match) is reported here; broken internal
/// invariants are `assert!`s.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {message}")]
    Json { path: PathBuf, message: String },
    #[error(
        "unsupported architecture {architecture:?} (model_type {model_type:?}); supported: Qwen3ForCausalLM (qwen3), Qwen3MoeForCausalLM (qwen3_moe), GptOssForCausalLM (gpt_oss)"
    )]
    UnsupportedArchitecture {
        architecture: String,
        model_type: String,
    },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("shard {path} listed in the index is missing")]
    MissingShard { path: PathBuf },
    #[error("shard {path} is corrupt: {message}")]
    CorruptShard { path: PathBuf, message: String },
    #[error("tensor {name} is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        actual: Vec<i64>,
        expected: Vec<i64>,
    },
    #[error("unsupported dtype {dtype} for tensor {name}")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("block {name}: hash mismatch, expected {expected}, got {actual}")]
    HashMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("token id {id} out of range for vocabulary of {vocab_size}")]
    TokenOutOfRange { id: i64, vocab_size: i64 },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("layer {layer}: expert {expert} is not held by this node")]
    ExpertNotHeld { layer: i64, expert: i64 },
    #[error("CUDA is not available")]
    CudaUnavailable,
    #[error("CUDA graph: {0}")]
    Graph(String),
    #[error("non-finite value in output at row {row}, column {column}")]
    NonFinite { row: usize, column: usize },
    #[error("delta payload: {0}")]
    Delta(#[from] blyan_state_machine::pol::delta::DeltaError),
    #[error("POL-DELTA-6: delta tensor {name} does not apply: {reason}")]
    DeltaNotApplicable { name: String, reason: String },
    #[error("delta tensor {name}: value at row {row}, column {column} is not finite")]
    DeltaNonFinite {
        name: String,
        row: usize,
        column: usize,
    },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = GpuError> = std::result::Result<T, E>;

impl GpuError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        GpuError::Io {
            path: path.into(),
            source,
        }
    }
}
