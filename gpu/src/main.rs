//! `blyan-gpu`: generate, logits, bench, split.
//!
//! `logits` prints exactly one JSON object on stdout,
//! `{"logits": [[...], ...]}`, one row of `vocab_size` f32 values per given
//! input id (no start token), and exits non-zero if any value is not finite.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use blyan_gpu::batch::{BatchEvent, run_batch};
use blyan_gpu::engine::DecodeEngine;
use blyan_gpu::generate::{GenerateRequest, generate, held_back};
use blyan_gpu::sample::SamplingParams;
use blyan_gpu::{GpuError, LoadedModel, Result, parse_device, parse_dtype};

const USAGE: &str = "usage:
  blyan-gpu generate [--model DIR] --prompt TEXT [--max-tokens N] [--temperature T]
                     [--top-p P] [--top-k K] [--seed S] [--stop STR]... [--device cpu|cuda] [--dtype f32|bf16]
  blyan-gpu logits [--model DIR] --input-ids 1,2,3 [--dtype f32|bf16] [--device cpu|cuda]
  blyan-gpu bench [--model DIR] [--device cpu|cuda] [--dtype f32|bf16] [--qwen3-8b]
                  [--prompt-len N] [--decode-tokens N] [--batch 1,16] [--attn kernel|sdpa|bmm]
                  [--blas default|cublas|cublaslt] [--block-mb 52 (only: time loading one block)]
                  [--threads N (libtorch intra-op threads)]
                  [--no-graph] [--matmuls-only] [--no-fused]
  blyan-gpu check [--model DIR] [--device cpu|cuda] [--dtype f32|bf16] [--tol X] [--attn kernel|sdpa|bmm] [--no-fused]
  blyan-gpu split --model DIR --out DIR
Without --model, the embedded default model (random weights, byte tokenizer) is used.";

/// `--key value` options; repeated keys keep every value.
struct Args {
    opts: BTreeMap<String, Vec<String>>,
    flags: Vec<String>,
}

const FLAGS: &[&str] = &["--qwen3-8b", "--no-graph", "--matmuls-only", "--no-fused"];

impl Args {
    fn parse(raw: &[String]) -> Result<Self> {
        let mut opts: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut flags = Vec::new();
        let mut it = raw.iter();
        while let Some(key) = it.next() {
            if !key.starts_with("--") {
                return Err(GpuError::Invalid(format!("unexpected argument {key:?}")));
            }
            if FLAGS.contains(&key.as_str()) {
                flags.push(key.clone());
                continue;
            }
            let value = it
                .next()
                .ok_or_else(|| GpuError::Invalid(format!("{key} needs a value")))?;
            opts.entry(key.clone()).or_default().push(value.clone());
        }
        Ok(Args { opts, flags })
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.opts
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
    }
    fn all(&self, key: &str) -> Vec<String> {
        self.opts.get(key).cloned().unwrap_or_default()
    }
    fn flag(&self, key: &str) -> bool {
        self.flags.iter().any(|f| f == key)
    }
    fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T> {
        match self.get(key) {
            None => Ok(default),
            Some(s) => s
                .parse()
                .map_err(|_| GpuError::Invalid(format!("{key}: cannot parse {s:?}"))),
        }
    }
    fn check_known(&self, known: &[&str]) -> Result<()> {
        for key in self.opts.keys().chain(self.flags.iter()) {
            if !known.contains(&key.as_str()) {
                return Err(GpuError::Invalid(format!("unknown option {key}")));
            }
        }
        Ok(())
    }
}

fn load(args: &Args) -> Result<LoadedModel> {
    let device = parse_device(args.get("--device").unwrap_or("cpu"))?;
    let kind = parse_dtype(args.get("--dtype").unwrap_or("f32"))?;
    let dir = args.get("--model").map(PathBuf::from);
    LoadedModel::load(dir.as_deref(), device, kind)
}

fn cmd_logits(args: &Args) -> Result<()> {
    args.check_known(&["--model", "--input-ids", "--dtype", "--device"])?;
    let ids_text = args
        .get("--input-ids")
        .ok_or_else(|| GpuError::Invalid("--input-ids is required".into()))?;
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

fn cmd_generate(args: &Args) -> Result<()> {
    args.check_known(&[
        "--model",
        "--prompt",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--stop",
        "--device",
        "--dtype",
    ])?;
    let prompt = args
        .get("--prompt")
        .ok_or_else(|| GpuError::Invalid("--prompt is required".into()))?;
    let m = load(args)?;
    let tok = m
        .tokenizer
        .as_ref()
        .ok_or_else(|| GpuError::Tokenizer("the model directory has no tokenizer.json".into()))?;
    let req = GenerateRequest {
        prompt_ids: tok.encode(prompt)?,
        max_tokens: args.num("--max-tokens", 64usize)?,
        sampling: SamplingParams {
            temperature: args.num("--temperature", 0.0f64)?,
            top_k: args.num("--top-k", 0usize)?,
            top_p: args.num("--top-p", 1.0f64)?,
            seed: args.num("--seed", 0u64)?,
        },
        stop: args.all("--stop"),
        stop_ids: m.model.cfg.eos_token_ids.clone(),
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

fn cmd_split(args: &Args) -> Result<()> {
    args.check_known(&["--model", "--out"])?;
    let model = args
        .get("--model")
        .ok_or_else(|| GpuError::Invalid("--model is required".into()))?;
    let out = args
        .get("--out")
        .ok_or_else(|| GpuError::Invalid("--out is required".into()))?;
    let (model, out) = (PathBuf::from(model), PathBuf::from(out));
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

fn run(raw: &[String]) -> Result<()> {
    let Some((cmd, rest)) = raw.split_first() else {
        return Err(GpuError::Invalid(USAGE.into()));
    };
    let args = Args::parse(rest)?;
    match cmd.as_str() {
        "logits" => cmd_logits(&args),
        "generate" => cmd_generate(&args),
        "bench" => blyan_gpu::engine::bench_cli(&args_map(&args), args.flag("--qwen3-8b")),
        "check" => blyan_gpu::engine::check_cli(&args_map(&args)),
        "split" => cmd_split(&args),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(GpuError::Invalid(format!(
            "unknown command {other:?}\n{USAGE}"
        ))),
    }
}

fn args_map(args: &Args) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = args
        .opts
        .iter()
        .filter_map(|(k, v)| v.last().map(|last| (k.clone(), last.clone())))
        .collect();
    for flag in ["--no-graph", "--matmuls-only", "--no-fused"] {
        if args.flag(flag) {
            m.insert(flag.into(), "1".into());
        }
    }
    m
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    match run(&raw) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blyan-gpu: error: {e}");
            ExitCode::FAILURE
        }
    }
}
