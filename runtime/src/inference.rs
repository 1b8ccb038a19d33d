//! The node's local inference engine behind a bounded queue (API-CHAT-*).
//!
//! One OS thread owns the model (`blyan-gpu`, tch/libtorch on the CPU or
//! CUDA) and serves jobs one at a time, in arrival order. The HTTP handlers
//! only ever see [`InferenceHandle`]: they `try_send` a job (a full queue is
//! answered `503` at once instead of queueing without bound) and wait for the
//! reply up to the inference timeout (seed appendix B: 30 s). A job that
//! waited past its deadline in the queue is dropped without running.
//!
//! Generation itself cannot be interrupted between a job's start and its end,
//! so its length is bounded by [`InferenceConfig::max_tokens_limit`] instead.
//!
//! Without the `inference` feature the handle cannot be built and the routes
//! answer `503` (a validator-only node needs no libtorch).

use crate::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How the engine is loaded and bounded (`[inference]` in the node's TOML).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Serve `/chat` at all.
    pub enabled: bool,
    /// A Hugging Face directory (config.json, safetensors, tokenizer.json) or
    /// a block directory written by `blyan-gpu split`; `None`: the embedded
    /// default model.
    pub model_dir: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// Seed appendix B `inference_timeout`: queueing plus generation.
    pub timeout_ms: u64,
    /// Jobs waiting for the engine beyond the one running; more get `503`.
    pub queue_len: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: usize,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            enabled: true,
            model_dir: None,
            device: "cpu".into(),
            dtype: "f32".into(),
            timeout_ms: 30_000,
            queue_len: 16,
            max_tokens_limit: 512,
            max_prompt_tokens: 2048,
        }
    }
}

/// One generation request, already validated against the limits.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    pub prompt: String,
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub stop: Vec<String>,
}

/// What a job produced.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatResult {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// The MoE experts that served the request (`layer.expert`); empty for a
    /// dense model.
    pub experts_used: Vec<String>,
}

/// What the engine serves, for `/chat`'s answers and `/status`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// `blyan-default` for the embedded model, else the directory's name.
    pub name: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub is_moe: bool,
    pub device: String,
}

struct Job {
    request: ChatRequest,
    /// Streamed text pieces, when the client asked for a stream (bounded).
    pieces: Option<mpsc::Sender<String>>,
    deadline: Instant,
    reply: oneshot::Sender<Result<ChatResult, Error>>,
}

/// The API's side of the engine; cheap to clone.
#[derive(Clone)]
pub struct InferenceHandle {
    jobs: mpsc::Sender<Job>,
    pub model: ModelInfo,
    pub config: InferenceConfig,
}

/// Pieces of streamed text in flight per job; a slow reader makes the
/// engine wait (it is the only consumer of the job's output).
pub const STREAM_PIECES: usize = 64;

impl InferenceHandle {
    /// Loads the model on a new thread and starts serving. Returns once the
    /// model is loaded (or failed to load).
    #[cfg(feature = "inference")]
    pub async fn start(config: InferenceConfig) -> Result<InferenceHandle, Error> {
        assert!(config.queue_len > 0, "inference queue must hold a job");
        let (jobs, rx) = mpsc::channel(config.queue_len);
        let (ready_tx, ready_rx) = oneshot::channel();
        let engine_config = config.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || engine::serve(engine_config, rx, ready_tx))
            .map_err(|e| Error::Inference(format!("cannot start the inference thread: {e}")))?;
        let model = ready_rx
            .await
            .map_err(|_| Error::Inference("the inference thread died while loading".into()))??;
        Ok(InferenceHandle {
            jobs,
            model,
            config,
        })
    }

    /// Without the `inference` feature: always an error.
    #[cfg(not(feature = "inference"))]
    pub async fn start(_config: InferenceConfig) -> Result<InferenceHandle, Error> {
        Err(Error::Inference(
            "this binary was built without the `inference` feature".into(),
        ))
    }

    /// Queues `request`; `pieces` receives streamed text if given. Errors:
    /// [`Error::Busy`] when the queue is full, [`Error::Inference`] when the
    /// engine is gone, failed, or the deadline passed.
    pub async fn generate(
        &self,
        request: ChatRequest,
        pieces: Option<mpsc::Sender<String>>,
    ) -> Result<ChatResult, Error> {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let (reply, answer) = oneshot::channel();
        let job = Job {
            request,
            pieces,
            deadline: Instant::now() + timeout,
            reply,
        };
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Error::Busy("the inference queue is full; retry later".into())
            }
            mpsc::error::TrySendError::Closed(_) => {
                Error::Inference("the inference engine has stopped".into())
            }
        })?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Inference("the inference engine stopped".into())),
            Err(_) => Err(Error::Timeout(format!(
                "inference did not finish within {} ms",
                self.config.timeout_ms
            ))),
        }
    }
}

#[cfg(feature = "inference")]
mod engine {
    use super::{ChatResult, InferenceConfig, Job, ModelInfo};
    use crate::Error;
    use blyan_gpu::LoadedModel;
    use blyan_gpu::generate::{GenerateRequest, generate};
    use blyan_gpu::sample::SamplingParams;
    use std::time::Instant;
    use tokio::sync::{mpsc, oneshot};

    fn gpu(e: blyan_gpu::GpuError) -> Error {
        Error::Inference(e.to_string())
    }

    fn load(config: &InferenceConfig) -> Result<(LoadedModel, ModelInfo), Error> {
        let device = blyan_gpu::parse_device(&config.device).map_err(gpu)?;
        let kind = blyan_gpu::parse_dtype(&config.dtype).map_err(gpu)?;
        let loaded = LoadedModel::load(config.model_dir.as_deref(), device, kind).map_err(gpu)?;
        let cfg = &loaded.model.cfg;
        let name = match &config.model_dir {
            None => "blyan-default".to_string(),
            Some(dir) => dir
                .file_name()
                .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
        };
        let info = ModelInfo {
            name,
            layers: cfg.num_hidden_layers as usize,
            hidden_size: cfg.hidden_size as usize,
            vocab_size: cfg.vocab_size as usize,
            is_moe: cfg.moe.is_some(),
            device: config.device.clone(),
        };
        if loaded.tokenizer.is_none() {
            return Err(Error::Inference(
                "the model has no tokenizer.json; /chat needs one".into(),
            ));
        }
        Ok((loaded, info))
    }

    fn run(loaded: &LoadedModel, config: &InferenceConfig, job: &Job) -> Result<ChatResult, Error> {
        let tokenizer = loaded.tokenizer.as_ref().expect("checked at load");
        let req = &job.request;
        let prompt_ids = tokenizer.encode(&req.prompt).map_err(gpu)?;
        if prompt_ids.is_empty() {
            return Err(Error::BadRequest("the prompt encodes to no tokens".into()));
        }
        if prompt_ids.len() > config.max_prompt_tokens {
            return Err(Error::BadRequest(format!(
                "the prompt is {} tokens; this node accepts at most {}",
                prompt_ids.len(),
                config.max_prompt_tokens
            )));
        }
        let request = GenerateRequest {
            prompt_ids,
            max_tokens: req.max_tokens,
            sampling: SamplingParams {
                temperature: req.temperature,
                top_k: 0,
                top_p: req.top_p,
                seed: req.seed,
            },
            stop: req.stop.clone(),
            stop_ids: loaded.model.cfg.eos_token_ids.clone(),
        };
        let out = generate(&loaded.model, Some(tokenizer), &request, |piece| {
            if let Some(tx) = &job.pieces {
                // A reader that went away only loses its stream.
                let _ = tx.blocking_send(piece.to_string());
            }
        })
        .map_err(gpu)?;
        Ok(ChatResult {
            text: out.text,
            prompt_tokens: out.prompt_tokens,
            completion_tokens: out.completion_tokens,
            finish_reason: out.finish_reason.as_str(),
            experts_used: Vec::new(),
        })
    }

    pub(super) fn serve(
        config: InferenceConfig,
        mut jobs: mpsc::Receiver<Job>,
        ready: oneshot::Sender<Result<ModelInfo, Error>>,
    ) {
        let loaded = match load(&config) {
            Ok((loaded, info)) => {
                tracing::info!(model = %info.name, layers = info.layers, device = %info.device, "inference engine ready");
                let _ = ready.send(Ok(info));
                loaded
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        while let Some(job) = jobs.blocking_recv() {
            if Instant::now() >= job.deadline {
                let _ = job.reply.send(Err(Error::Timeout(
                    "the request waited past the inference timeout".into(),
                )));
                continue;
            }
            let result = run(&loaded, &config, &job);
            let _ = job.reply.send(result);
        }
    }
}
