//! Delta payload costs on a Qwen3-8B-shaped layer matrix (spec/pol.md
//! POL-DELTA-*): payload bytes, compression ratio against the dense bf16
//! update, relative reconstruction error, and compress / encode / decode /
//! apply times on this machine's CPU.
//!
//! `cargo run --release -p blyan-gpu --example delta_bench` (with the project
//! venv and `LIBTORCH_USE_PYTORCH=1`). The update is synthetic: a rank-r
//! product `B·A` (Gaussian factors, what a merged LoRA update of rank r looks
//! like) plus i.i.d. Gaussian noise, and, for comparison, pure i.i.d.
//! Gaussian noise. How much of a *trained* update's loss improvement
//! survives compression needs training and is not measured here.

use std::time::Instant;

use blyan_gpu::delta::{NamedUpdate, apply_tensor, compress, kept_per_row};
use blyan_state_machine::pol::delta::DeltaPayload;
use clap::Parser;
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
#[command(about = "Delta payload size, error and speed on one layer matrix")]
struct Args {
    #[arg(long, default_value_t = 4096)]
    rows: i64,
    #[arg(long, default_value_t = 12288)]
    cols: i64,
    /// Rank of the low-rank part of the update.
    #[arg(long, default_value_t = 16)]
    rank: i64,
    /// RMS of the low-rank part (a fine-tuning update is ~1e-3 of weights ~1e-2).
    #[arg(long, default_value_t = 1e-3)]
    lowrank_rms: f64,
    /// RMS of the noise added to it.
    #[arg(long, default_value_t = 1e-4)]
    noise_rms: f64,
    /// Densities in ppm of each row.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000000,20000,10000,5000,1000"
    )]
    densities_ppm: Vec<u32>,
    /// Timed repetitions (median reported) of compress and apply.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn median_s(mut f: impl FnMut(), reps: usize) -> f64 {
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn norm(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).norm().double_value(&[])
}

fn rms_scaled(t: Tensor, rms: f64) -> Tensor {
    let n = t.numel() as f64;
    let current = norm(&t) / n.sqrt();
    t * (rms / current)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    tch::manual_seed(14);
    let opts = (Kind::Float, Device::Cpu);
    let (rows, cols) = (a.rows, a.cols);
    let lowrank = rms_scaled(
        Tensor::randn([rows, a.rank], opts).matmul(&Tensor::randn([a.rank, cols], opts)),
        a.lowrank_rms,
    );
    let noise = rms_scaled(Tensor::randn([rows, cols], opts), a.noise_rms);
    let updates = [
        (
            format!(
                "rank-{} (rms {:e}) + noise (rms {:e})",
                a.rank, a.lowrank_rms, a.noise_rms
            ),
            &lowrank + &noise,
        ),
        (
            format!("i.i.d. Gaussian (rms {:e})", a.noise_rms),
            noise.shallow_clone(),
        ),
    ];
    let base = (Tensor::randn([rows, cols], opts) * 0.02).to_kind(Kind::BFloat16);
    let zeros = Tensor::zeros([rows, cols], opts);
    let dense_bf16_bytes = (rows * cols * 2) as f64;
    println!(
        "matrix {rows} x {cols}; dense bf16 update {} bytes; {} CPU threads (torch {}); reps {}",
        rows * cols * 2,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        tch::get_num_threads(),
        a.reps
    );
    println!(
        "rank-{} factors for comparison (not a layout yet): bf16 {} bytes ({:.0}x), int8 + f32 row scales {} bytes ({:.0}x)",
        a.rank,
        a.rank * (rows + cols) * 2,
        dense_bf16_bytes / (a.rank * (rows + cols) * 2) as f64,
        a.rank * (rows + cols) + 4 * (rows + a.rank),
        dense_bf16_bytes / (a.rank * (rows + cols) + 4 * (rows + a.rank)) as f64,
    );
    println!(
        "| update | density | kept/row | payload bytes | ratio vs bf16 | rel. error | error of top-k alone | INT8 error on kept | first-order share | compress s | encode s | decode s | apply s (bf16 base) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (label, update) in &updates {
        let update_norm = norm(update);
        for &density in &a.densities_ppm {
            let named = [NamedUpdate {
                name: "model.layers.0.mlp.down_proj.weight",
                update,
                base_kind: Kind::BFloat16,
            }];
            let mut payload = None;
            let compress_s = median_s(
                || payload = Some(compress(&named, density).unwrap()),
                a.reps,
            );
            let payload = payload.expect("compressed");
            let mut bytes = Vec::new();
            let encode_s = median_s(|| bytes = payload.encode().unwrap(), 1);
            let mut decoded = None;
            let decode_s = median_s(|| decoded = Some(DeltaPayload::decode(&bytes).unwrap()), 1);
            assert_eq!(decoded.as_ref(), Some(&payload));
            let t = &payload.tensors[0];
            let apply_s = median_s(|| drop(apply_tensor(&base, t).unwrap()), a.reps);
            // dequant(delta) = 0 + dequant(delta) on an f32 base (exact).
            let mut f32_delta = t.clone();
            f32_delta.dtype = blyan_state_machine::pol::delta::BaseDtype::F32;
            let dq = apply_tensor(&zeros, &f32_delta)?;
            let error = norm(&(update - &dq)) / update_norm;
            let index: Vec<i64> = (0..t.shape.rows() as usize)
                .flat_map(|r| {
                    t.row(r as u32)
                        .1
                        .iter()
                        .map(move |&c| (r * cols as usize + c as usize) as i64)
                })
                .collect();
            let kept = update
                .flatten(0, -1)
                .index_select(0, &Tensor::from_slice(&index));
            let kept_share = (norm(&kept) / update_norm).powi(2);
            let topk_error = (1.0 - kept_share).max(0.0).sqrt();
            let dq_kept = dq
                .flatten(0, -1)
                .index_select(0, &Tensor::from_slice(&index));
            let int8_error = norm(&(&kept - &dq_kept)) / norm(&kept);
            // First-order proxy only: the share of <g, update> a step along
            // dequant keeps if the update is a gradient step (update = -lr g).
            let first_order = update
                .to_kind(Kind::Double)
                .flatten(0, -1)
                .dot(&dq.to_kind(Kind::Double).flatten(0, -1))
                .double_value(&[]);
            println!(
                "| {label} | {:.2} % | {} | {} | {:.1}x | {:.4} | {:.4} | {:.5} | {:.4} | {:.3} | {:.3} | {:.3} | {:.3} |",
                f64::from(density) / 1e4,
                kept_per_row(density, cols as u32),
                bytes.len(),
                dense_bf16_bytes / bytes.len() as f64,
                error,
                topk_error,
                int8_error,
                first_order / update_norm.powi(2),
                compress_s,
                encode_s,
                decode_s,
                apply_s,
            );
        }
    }
    Ok(())
}
