//! blyan-gpu against transformers on the same checkpoints.

use blyan_gpu::LoadedModel;
use blyan_gpu::generate::{GenerateRequest, generate};
use blyan_gpu::sample::SamplingParams;
use tch::{Device, Kind};

use crate::common::{ids, matrix, max_abs_diff, model, model_dir};

/// f32: the bound.
const F32_TOL: f32 = 1e-4;

/// bf16 keeps 8 significant bits (a relative step of 2^-8 = 0.4%). Both sides
/// round after every op, but not at the same places (transformers' and ours
/// group some products differently), so over 3 layers a logit of magnitude
/// ~5 can move by a few steps: 2% of the largest logit, with a floor of 0.1.
fn bf16_tol(reference: &[Vec<f32>]) -> f32 {
    let max = reference
        .iter()
        .flatten()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    (0.02 * max).max(0.1)
}

fn logits_of(name: &str, kind: Kind) -> Vec<Vec<f32>> {
    let m = LoadedModel::load(Some(&model_dir(name)), Device::Cpu, kind).expect("load");
    let l = m
        .model
        .logits(&ids(&model(name)["input_ids"]))
        .expect("logits");
    Vec::<Vec<f32>>::try_from(&l).expect("to vec")
}

fn check_f32(name: &str) {
    let ours = logits_of(name, Kind::Float);
    let theirs = matrix(&model(name)["logits_f32"]);
    let d = max_abs_diff(&ours, &theirs);
    assert!(d <= F32_TOL, "{name}: f32 max abs diff {d} > {F32_TOL}");
}

fn check_bf16(name: &str) {
    let ours = logits_of(name, Kind::BFloat16);
    let theirs = matrix(&model(name)["logits_bf16"]);
    let d = max_abs_diff(&ours, &theirs);
    let tol = bf16_tol(&theirs);
    assert!(d <= tol, "{name}: bf16 max abs diff {d} > {tol}");
}

fn check_greedy(name: &str) {
    let m = LoadedModel::load(Some(&model_dir(name)), Device::Cpu, Kind::Float).expect("load");
    let expected = ids(&model(name)["greedy"]);
    let req = GenerateRequest {
        prompt_ids: ids(&model(name)["prompt"]),
        max_tokens: expected.len(),
        sampling: SamplingParams::default(),
        stop: vec![],
        stop_ids: vec![],
        top_logprobs: None,
    };
    let out = generate(&m.model, None, &req, |_| {}).expect("generate");
    assert_eq!(
        out.tokens, expected,
        "{name}: greedy generation differs from transformers"
    );
}

#[test]
fn single_file_v5_config_f32_logits() {
    check_f32("qwen3_single");
}

#[test]
fn sharded_v4_config_tied_bias_f32_logits() {
    check_f32("qwen3_sharded");
}

#[test]
fn single_file_bf16_logits() {
    check_bf16("qwen3_single");
}

#[test]
fn sharded_bf16_logits() {
    check_bf16("qwen3_sharded");
}

#[test]
fn greedy_generation_single() {
    check_greedy("qwen3_single");
}

#[test]
fn greedy_generation_sharded() {
    check_greedy("qwen3_sharded");
}

#[test]
fn moe_f32_logits() {
    check_f32("qwen3_moe");
}

#[test]
fn moe_bf16_logits() {
    check_bf16("qwen3_moe");
}

#[test]
fn moe_greedy_generation() {
    check_greedy("qwen3_moe");
}

#[test]
fn gpt_oss_plain_f32_logits() {
    check_f32("gpt_oss_plain");
}

#[test]
fn gpt_oss_mxfp4_f32_logits() {
    check_f32("gpt_oss_mxfp4");
}

#[test]
fn gpt_oss_bf16_logits() {
    check_bf16("gpt_oss_plain");
}

#[test]
fn gpt_oss_mxfp4_greedy_generation() {
    check_greedy("gpt_oss_mxfp4");
}
