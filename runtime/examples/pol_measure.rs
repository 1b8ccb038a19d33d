//! Measurements of the PoL loop on the embedded model and the shipped
//! corpus (spec/pol.md POL-VAL-4, POL-EVAL-2; numbers in runtime/BENCH.md).
//!
//! `cargo run -p blyan-runtime --example pol_measure -- holdout [STEPS]`:
//! trains layer 0 once on the training pool (honest) and once on the
//! validation pool (fitting what validators sample), then reports each
//! delta's improvement on ten validation samples (POL-VAL-2/3 seeds) and on
//! the never-registered hold-out (chapters XI–XII), dense and compressed.
//!
//! `cargo run -p blyan-runtime --example pol_measure -- densities [STEPS]`:
//! the honest delta compressed at 1–100 % density: payload size against
//! the dense bf16 update, and how much of its improvement survives.
//!
//! `cargo run -p blyan-runtime --example pol_measure -- lora [STEPS] [LR]`:
//! full fine-tuning of layer 1 against LoRA of rank 4–32 (POL-TRAIN-3):
//! parameters, steps/s, improvement dense and compressed at 10 % and 1 %.
//!
//! `cargo run -p blyan-runtime --example pol_measure -- big-eval [WINDOWS]`:
//! POL-EVAL-8's cost on Qwen3-8B-shaped layers (random weights, CPU): one
//! layer and the head timed on WINDOWS windows, scaled to a sample of 32,
//! and an evaluation of 36 layers whole and from layer L up.
//!
//! `cargo run -p blyan-runtime --example pol_measure -- agreement`: one
//! delta's evaluation (POL-EVAL-1..3) in child processes with different
//! `ATEN_CPU_CAPABILITY` values and thread counts; prints each child's
//! losses and the largest difference in ppm of the loss.

use blyan_gpu::pol::{
    Target, TrainOptions, Weights, evaluate_delta, mean_loss_micronats, train_target, windows,
};
use blyan_runtime::corpus::{HOLDOUT_TEXT, TRAIN_TEXT, VALIDATION_TEXT};
use blyan_state_machine::pol::improvement_ppm;
use blyan_state_machine::pol::validation::{
    VALIDATION_WINDOW_TOKENS, VALIDATION_WINDOWS, sample_windows, validation_seed,
};
use std::time::Instant;

fn tokens(text: &str) -> Vec<i64> {
    let tok = blyan_gpu::tokenizer::Tokenizer::from_json(
        &blyan_gpu::tokenizer::byte_level_tokenizer_json(blyan_gpu::default_model::EOS_ID),
    )
    .unwrap();
    tok.encode(text).unwrap()
}

fn sample(pool: &[i64], i: u8) -> Vec<Vec<i64>> {
    let seed = validation_seed(&[i; 32], &[0x5a; 32]);
    let starts = sample_windows(
        &seed,
        pool.len() as u64,
        VALIDATION_WINDOWS,
        VALIDATION_WINDOW_TOKENS,
    )
    .unwrap();
    windows(pool, &starts, VALIDATION_WINDOW_TOKENS as usize).unwrap()
}

/// Consecutive windows covering `pool`.
fn all_windows(pool: &[i64]) -> Vec<Vec<i64>> {
    let w = VALIDATION_WINDOW_TOKENS as usize;
    let starts: Vec<u64> = (0..pool.len() / w).map(|i| (i * w) as u64).collect();
    windows(pool, &starts, w).unwrap()
}

fn holdout(steps: u32) {
    let base = Weights::load(None).unwrap();
    let (train, val, hold) = (
        tokens(TRAIN_TEXT),
        tokens(VALIDATION_TEXT),
        tokens(HOLDOUT_TEXT),
    );
    let opts = TrainOptions {
        steps,
        ..TrainOptions::default()
    };
    let base_model = base.model().unwrap();
    let hold_w = all_windows(&hold);
    let base_hold = mean_loss_micronats(&base_model, &hold_w).unwrap();
    println!(
        "| delta trained on | sample improvement ppm (10 seeds: min / median / max) | hold-out improvement ppm | compressed: sample median / hold-out |"
    );
    println!("|---|---|---:|---|");
    for (name, data) in [
        ("training pool (honest)", &train),
        ("validation pool (fitted)", &val),
    ] {
        let t0 = Instant::now();
        let trained = train_target(&base, Target::Layer(0), data, &opts, |_| {}).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let dense = trained.apply_dense(&base);
        let payload = trained
            .compress(blyan_runtime::pol_cli::DEFAULT_DENSITY_PPM)
            .unwrap();
        let mut compressed = base.shallow();
        compressed.apply_delta(&payload).unwrap();
        let (dm, cm) = (dense.model().unwrap(), compressed.model().unwrap());
        let mut dense_s = Vec::new();
        let mut comp_s = Vec::new();
        for i in 0..10u8 {
            let w = sample(&val, i);
            let b = mean_loss_micronats(&base_model, &w).unwrap();
            dense_s.push(improvement_ppm(b, mean_loss_micronats(&dm, &w).unwrap()));
            comp_s.push(improvement_ppm(b, mean_loss_micronats(&cm, &w).unwrap()));
        }
        dense_s.sort();
        comp_s.sort();
        let h_dense = improvement_ppm(base_hold, mean_loss_micronats(&dm, &hold_w).unwrap());
        let h_comp = improvement_ppm(base_hold, mean_loss_micronats(&cm, &hold_w).unwrap());
        println!(
            "| {name} ({steps} steps, {secs:.1} s) | {} / {} / {} | {h_dense} | {} / {h_comp} |",
            dense_s[0], dense_s[5], dense_s[9], comp_s[5]
        );
    }
}

/// `trained` compressed at `density_ppm`: the payload's bytes and the
/// improvement of `base` plus it on windows `w` (`base_loss` there).
fn compressed(
    base: &Weights,
    trained: &blyan_gpu::pol::Trained,
    density_ppm: u32,
    w: &[Vec<i64>],
    base_loss: u64,
) -> (usize, u64) {
    let payload = trained.compress(density_ppm).unwrap();
    let mut c = base.shallow();
    c.apply_delta(&payload).unwrap();
    let loss = mean_loss_micronats(&c.model().unwrap(), w).unwrap();
    (payload.len(), improvement_ppm(base_loss, loss))
}

/// How much of the honest delta's improvement survives compression, by density.
fn densities(steps: u32) {
    let base = Weights::load(None).unwrap();
    let (train, val) = (tokens(TRAIN_TEXT), tokens(VALIDATION_TEXT));
    let opts = TrainOptions {
        steps,
        ..TrainOptions::default()
    };
    let trained = train_target(&base, Target::Layer(0), &train, &opts, |_| {}).unwrap();
    let w = all_windows(&val);
    let base_loss = mean_loss_micronats(&base.model().unwrap(), &w).unwrap();
    let dense = improvement_ppm(
        base_loss,
        mean_loss_micronats(&trained.apply_dense(&base).model().unwrap(), &w).unwrap(),
    );
    let bf16 = trained.dense_bf16_bytes();
    println!(
        "dense update: {bf16} bytes in bf16, improvement {dense} ppm on the whole validation pool"
    );
    println!(
        "| density | payload bytes | smaller than dense bf16 | improvement ppm | kept of dense |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for ppm in [
        10_000u32, 20_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    ] {
        let (bytes, imp) = compressed(&base, &trained, ppm, &w, base_loss);
        println!(
            "| {:.0} % | {bytes} | {:.1}× | {imp} | {:.1} % |",
            f64::from(ppm) / 1e4,
            bf16 as f64 / bytes as f64,
            imp as f64 * 100.0 / dense as f64
        );
    }
}

/// Full fine-tuning against LoRA of several ranks (POL-TRAIN-3): trained
/// parameters, speed, and the improvement on the whole validation pool,
/// dense and compressed.
fn lora(steps: u32, learning_rate: f64) {
    let base = Weights::load(None).unwrap();
    let (train, val) = (tokens(TRAIN_TEXT), tokens(VALIDATION_TEXT));
    let w = all_windows(&val);
    let base_loss = mean_loss_micronats(&base.model().unwrap(), &w).unwrap();
    println!(
        "| layer 1, {steps} steps | learning rate | trained parameters | steps/s | dense improvement ppm | 10 %: bytes, ratio, improvement | 1 %: bytes, ratio, improvement |"
    );
    println!("|---|---:|---:|---:|---:|---|---|");
    for rank in [None, Some(4u32), Some(8), Some(16), Some(32)] {
        let opts = TrainOptions {
            steps,
            lora_rank: rank,
            learning_rate: if rank.is_some() { learning_rate } else { 3e-3 },
            ..TrainOptions::default()
        };
        let t0 = Instant::now();
        let trained = train_target(&base, Target::Layer(1), &train, &opts, |_| {}).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let dense = improvement_ppm(
            base_loss,
            mean_loss_micronats(&trained.apply_dense(&base).model().unwrap(), &w).unwrap(),
        );
        let bf16 = trained.dense_bf16_bytes();
        let at = |ppm: u32| {
            let (bytes, imp) = compressed(&base, &trained, ppm, &w, base_loss);
            format!("{bytes} B, {:.1}×, {imp}", bf16 as f64 / bytes as f64)
        };
        println!(
            "| {} | {} | {} | {:.1} | {dense} | {} | {} |",
            rank.map_or("full".to_string(), |r| format!("LoRA r={r}")),
            opts.learning_rate,
            trained.trained_parameters,
            f64::from(steps) / secs,
            at(100_000),
            at(10_000)
        );
    }
}

/// POL-EVAL-8 on Qwen3-8B-shaped layers (hidden 4,096, MLP 12,288, 32/8
/// heads of 128, vocabulary 151,936), random weights, 2 layers: the time of
/// one layer and of the head on `windows` windows of 129 tokens, and what
/// an evaluation of a 36-layer model costs whole and from layer L up.
fn big_eval(windows_n: usize) {
    let mut cfg = blyan_gpu::default_model::default_config();
    cfg.vocab_size = 151_936;
    cfg.hidden_size = 4_096;
    cfg.intermediate_size = 12_288;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 32;
    cfg.num_key_value_heads = 8;
    cfg.head_dim = 128;
    cfg.layer_sliding = vec![false; 2];
    let t0 = Instant::now();
    let tensors = blyan_gpu::default_model::random_weights(&cfg, 1);
    eprintln!("random weights: {:.1} s", t0.elapsed().as_secs_f64());
    let w = Weights { cfg, tensors };
    let pool: Vec<i64> = (0..20_000).map(|i| (i * 7_919) % 151_936).collect();
    let starts: Vec<u64> = (0..windows_n as u64).map(|i| i * 300).collect();
    let ws = windows(&pool, &starts, VALIDATION_WINDOW_TOKENS as usize).unwrap();
    let timed = |f: &dyn Fn()| {
        f(); // warm-up
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let compute = |l: u32| {
        blyan_gpu::pol::LayerInputs::compute(&w, l, &ws).unwrap();
    };
    let embed = timed(&|| compute(0));
    let layer = timed(&|| compute(1)) - embed;
    let inputs = blyan_gpu::pol::LayerInputs::compute(&w, 2, &ws).unwrap();
    let head = timed(&|| {
        inputs.mean_loss_micronats(&w).unwrap();
    });
    eprintln!(
        "measured on {windows_n} windows: embedding {embed:.2} s, one layer {layer:.2} s, head {head:.2} s"
    );
    let scale = VALIDATION_WINDOWS as f64 / windows_n as f64;
    let (layer, head) = (layer * scale, head * scale);
    println!(
        "{windows_n} windows of {VALIDATION_WINDOW_TOKENS} tokens, scaled to the sample's {VALIDATION_WINDOWS}: one layer {layer:.1} s, final norm and lm_head {head:.1} s"
    );
    println!("| target layer L of 36 | whole model twice | from L up (L once, 36 − L twice) |");
    println!("|---:|---:|---:|");
    for l in [0u32, 9, 18, 27, 35] {
        let whole = 2.0 * (36.0 * layer + head);
        let from = f64::from(l) * layer + 2.0 * ((36.0 - f64::from(l)) * layer + head);
        println!("| {l} | {whole:.0} s | {from:.0} s |");
    }
}

fn agreement() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(2).map(String::as_str) == Some("--child") {
        let threads: i32 = args[3].parse().unwrap();
        blyan_gpu::pol::set_threads(threads);
        let payload = std::fs::read(&args[4]).unwrap();
        let base = Weights::load(None).unwrap();
        let w = sample(&tokens(VALIDATION_TEXT), 7);
        let t0 = Instant::now();
        let e = evaluate_delta(&base, Target::Layer(0), &[], &payload, &w).unwrap();
        println!(
            "{} {} {:.3}",
            e.head_loss_micronats,
            e.loss_micronats,
            t0.elapsed().as_secs_f64()
        );
        return;
    }
    // One delta, trained here; every child evaluates the same bytes.
    let base = Weights::load(None).unwrap();
    let opts = TrainOptions {
        steps: 20,
        ..TrainOptions::default()
    };
    let payload = train_target(&base, Target::Layer(0), &tokens(TRAIN_TEXT), &opts, |_| {})
        .unwrap()
        .compress(100_000)
        .unwrap();
    let file = std::env::temp_dir().join(format!("pol-measure-{}.blyd", std::process::id()));
    std::fs::write(&file, &payload).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut results = Vec::new();
    for (cap, threads) in [
        ("default", 1),
        ("avx2", 1),
        ("avx2", 2),
        ("avx512", 2),
        ("default", 2),
    ] {
        let out = std::process::Command::new(&exe)
            .args(["agreement", "--child", &threads.to_string()])
            .arg(&file)
            .env("ATEN_CPU_CAPABILITY", cap)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let parts: Vec<&str> = text.split(' ').collect();
        let v: Vec<u64> = parts[..2].iter().map(|x| x.parse().unwrap()).collect();
        println!(
            "ATEN_CPU_CAPABILITY={cap:8} threads={threads}: head loss {} µnat, candidate loss {} µnat, evaluation {} s",
            v[0], v[1], parts[2]
        );
        results.push(v);
    }
    let ppm = |i: usize| {
        let vals: Vec<u64> = results.iter().map(|v| v[i]).collect();
        let (lo, hi) = (vals.iter().min().unwrap(), vals.iter().max().unwrap());
        (hi - lo) as f64 * 1e6 / *lo as f64
    };
    let _ = std::fs::remove_file(&file);
    println!(
        "largest difference: head {:.3} ppm, candidate {:.3} ppm (attestation_tolerance_ppm: 10,000)",
        ppm(0),
        ppm(1)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("holdout") => holdout(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200)),
        Some("agreement") => agreement(),
        Some("big-eval") => big_eval(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4)),
        Some("lora") => lora(
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200),
            args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1e-2),
        ),
        Some("densities") => densities(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200)),
        _ => eprintln!(
            "usage: pol_measure holdout [STEPS] | densities [STEPS] | lora [STEPS] [LR] | big-eval [WINDOWS] | agreement"
        ),
    }
}
