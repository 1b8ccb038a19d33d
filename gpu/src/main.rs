//! `blyan-gpu`: generate, logits, bench, check, split (`blyan-gpu --help`,
//! `blyan-gpu <command> --help`).
//!
//! `logits` prints exactly one JSON object on stdout,
//! `{"logits": [[...], ...]}`, one row of `vocab_size` f32 values per given
//! input id (no start token), and exits non-zero if any value is not finite.

use std::collections::BTreeMap;

use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use blyan_gpu::batch::{BatchEvent, run_batch};
use blyan_gpu::engine::DecodeEngine;
use blyan_gpu::generate::{GenerateRequest, generate, held_back};
use blyan_gpu::sample::SamplingParams;
use blyan_gpu::{GpuError, LoadedModel, Result, parse_device, parse_dtype};

/// The model every command loads.
#[derive(clap::Args, Debug)]
struct ModelArgs {
    /// A Hugging Face directory (config.json, safetensors, tokenizer.json) or
    /// a block directory from `split`; default: the embedded model (random
    /// weights, byte tokenizer).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `f32` or `bf16`.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Parser, Debug)]
#[command(
    name = "blyan-gpu",
    version,
    about = "Blyan's inference engine on libtorch: generate text, print logits, benchmark, check, split into blocks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text: the text streams to stdout, then the finish reason and
    /// token usage go to stderr as one JSON object.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0: greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// 0: no top-k cut.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop at this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
    },
    /// Print `{"logits": [[...], ...]}` on stdout, one row of vocab_size
    /// f32 values per input id (no start token); fails if any is not finite.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long, value_name = "IDS")]
        input_ids: String,
    },
    /// Decode-engine throughput (or, with --block-mb, the time to load one block).
    Bench {
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Default: bf16 with --qwen3-8b, else f32.
        #[arg(long)]
        dtype: Option<String>,
        /// A Qwen3-8B-shaped model with random weights.
        #[arg(long)]
        qwen3_8b: bool,
        /// Default: 2048 with --qwen3-8b, else 128.
        #[arg(long)]
        prompt_len: Option<u64>,
        /// Default: 128 with --qwen3-8b, else 64.
        #[arg(long)]
        decode_tokens: Option<u64>,
        /// Batch sizes, comma-separated (default 1,16).
        #[arg(long)]
        batch: Option<String>,
        /// `kernel`, `sdpa` (default) or `bmm`.
        #[arg(long)]
        attn: Option<String>,
        /// `default`, `cublas` or `cublaslt`.
        #[arg(long)]
        blas: Option<String>,
        /// Only time loading one block of this many MB.
        #[arg(long)]
        block_mb: Option<f64>,
        /// libtorch intra-op threads.
        #[arg(long)]
        threads: Option<u64>,
        #[arg(long)]
        no_graph: bool,
        #[arg(long)]
        matmuls_only: bool,
        #[arg(long)]
        no_fused: bool,
    },
    /// The decode engine (CUDA graph) against the reference path.
    Check {
        #[command(flatten)]
        model: ModelArgs,
        /// Largest tolerated difference (default: by dtype).
        #[arg(long)]
        tol: Option<f64>,
        /// `kernel`, `sdpa` (default) or `bmm`.
        #[arg(long)]
        attn: Option<String>,
        #[arg(long)]
        no_fused: bool,
    },
    /// Split a model directory into content-addressed blocks.
    Split {
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn load(args: &ModelArgs) -> Result<LoadedModel> {
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype)?;
    LoadedModel::load(args.model.as_deref(), device, kind)
}

fn cmd_logits(args: &ModelArgs, ids_text: &str) -> Result<()> {
    let ids = ids_text
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<i64>()
                .map_err(|_| GpuError::Invalid(format!("bad token id {s:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let m = load(args)?;
    let logits = m.model.logits(&ids)?;
    let rows = Vec::<Vec<f32>>::try_from(&logits.to_device(tch::Device::Cpu))?;
    for (r, row) in rows.iter().enumerate() {
        if let Some(c) = row.iter().position(|v| !v.is_finite()) {
            return Err(GpuError::NonFinite { row: r, column: c });
        }
    }
    let out = serde_json::json!({ "logits": rows });
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &out).map_err(|e| GpuError::Invalid(e.to_string()))?;
    writeln!(stdout).map_err(|e| GpuError::io("<stdout>", e))?;
    Ok(())
}

fn cmd_generate(
    args: &ModelArgs,
    prompt: &str,
    sampling: SamplingParams,
    max_tokens: usize,
    stop: Vec<String>,
) -> Result<()> {
    let m = load(args)?;
    let tok = m
        .tokenizer
        .as_ref()
        .ok_or_else(|| GpuError::Tokenizer("the model directory has no tokenizer.json".into()))?;
    let req = GenerateRequest {
        prompt_ids: tok.encode(prompt)?,
        max_tokens,
        sampling,
        stop,
        stop_ids: m.model.cfg.eos_token_ids.clone(),
        top_logprobs: None,
    };
    let mut stdout = std::io::stdout().lock();
    let mut emit = |piece: &str| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    };
    let on_cuda = m.model.device != tch::Device::Cpu;
    let out = match on_cuda.then(|| engine_for(&m.model, &req)) {
        // On CUDA, dense Qwen3 runs on the decode engine (CUDA graph, fused
        // kernels); other architectures use the reference path.
        Some(Ok(mut engine)) => {
            let LoadedModel { model, tokenizer } = m;
            drop(model);
            let tok = tokenizer.as_ref().expect("checked above");
            let mut tokens = Vec::new();
            let mut streamed = 0usize;
            let stop = req.stop.clone();
            let mut outs = run_batch(
                &mut engine,
                vec![req],
                Some(tok),
                blyan_gpu::CUDA_GRAPH_AVAILABLE,
                |ev| {
                    if let BatchEvent::Token { token, .. } = ev {
                        tokens.push(*token);
                        let text = tok.decode(&tokens).unwrap_or_default();
                        let safe = text.len() - held_back(&text, &stop);
                        if stop.iter().all(|s| !text.contains(s.as_str()))
                            && safe > streamed
                            && text.is_char_boundary(safe)
                            && !text.ends_with('\u{FFFD}')
                        {
                            emit(&text[streamed..safe]);
                            streamed = safe;
                        }
                    }
                },
            )?;
            let out = outs.pop().expect("one request");
            if out.text.len() > streamed && out.text.is_char_boundary(streamed) {
                emit(&out.text[streamed..]);
            }
            out
        }
        _ => generate(&m.model, Some(tok), &req, emit)?,
    };
    let _ = writeln!(stdout);
    eprintln!(
        "{}",
        serde_json::json!({
            "finish_reason": out.finish_reason.as_str(),
            "usage": {
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens,
            }
        })
    );
    Ok(())
}

/// A one-slot decode engine for `req`, if the model is one the engine runs.
fn engine_for(model: &blyan_gpu::model::Qwen3, req: &GenerateRequest) -> Result<DecodeEngine> {
    let need = (req.prompt_ids.len() + req.max_tokens) as i64;
    let max_len = ((need + 255) / 256 * 256).max(256);
    DecodeEngine::from_model(model, 1, max_len)
}

fn cmd_split(model: PathBuf, out: PathBuf) -> Result<()> {
    let blocks = blyan_gpu::blocks::split(&model, &out)?;
    let tok = model.join("tokenizer.json");
    if tok.is_file() {
        std::fs::copy(&tok, out.join("tokenizer.json")).map_err(|e| GpuError::io(&tok, e))?;
    }
    for b in &blocks {
        println!("{}\t{}\t{}\t{} bytes", b.name, b.cid, b.sha3_256, b.bytes);
    }
    Ok(())
}

/// The `--key value` map the engine's bench and check read.
fn opts(pairs: &[(&str, Option<String>)], flags: &[(&str, bool)]) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = pairs
        .iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
        .collect();
    for (k, on) in flags {
        if *on {
            m.insert(k.to_string(), "1".into());
        }
    }
    m
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Logits { model, input_ids } => cmd_logits(&model, &input_ids),
        Command::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
        } => cmd_generate(
            &model,
            &prompt,
            SamplingParams {
                temperature,
                top_k,
                top_p,
                seed,
            },
            max_tokens,
            stop,
        ),
        Command::Bench {
            model,
            device,
            dtype,
            qwen3_8b,
            prompt_len,
            decode_tokens,
            batch,
            attn,
            blas,
            block_mb,
            threads,
            no_graph,
            matmuls_only,
            no_fused,
        } => {
            let s = |v: Option<u64>| v.map(|n| n.to_string());
            let m = opts(
                &[
                    ("--model", model.map(|p| p.display().to_string())),
                    ("--device", Some(device)),
                    ("--dtype", dtype),
                    ("--prompt-len", s(prompt_len)),
                    ("--decode-tokens", s(decode_tokens)),
                    ("--batch", batch),
                    ("--attn", attn),
                    ("--blas", blas),
                    ("--block-mb", block_mb.map(|m| m.to_string())),
                    ("--threads", s(threads)),
                ],
                &[
                    ("--no-graph", no_graph),
                    ("--matmuls-only", matmuls_only),
                    ("--no-fused", no_fused),
                ],
            );
            blyan_gpu::engine::bench_cli(&m, qwen3_8b)
        }
        Command::Check {
            model,
            tol,
            attn,
            no_fused,
        } => {
            let m = opts(
                &[
                    ("--model", model.model.map(|p| p.display().to_string())),
                    ("--device", Some(model.device)),
                    ("--dtype", Some(model.dtype)),
                    ("--tol", tol.map(|t| t.to_string())),
                    ("--attn", attn),
                ],
                &[("--no-fused", no_fused)],
            );
            blyan_gpu::engine::check_cli(&m)
        }
        Command::Split { model, out } => cmd_split(model, out),
    }
}

fn main() -> ExitCode {
    // Usage errors and --help/--version are clap's (exit 2 and 0).
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blyan-gpu: error: {e}");
            ExitCode::FAILURE
        }
    }
}
