//! The decode engine (fused weights, static cache, device-side positions)
//! against transformers' logits, on the CPU in f32.

use blyan_gpu::LoadedModel;
use blyan_gpu::engine::DecodeEngine;
use blyan_gpu::sample::argmax;
use tch::{Device, Kind, Tensor};

use crate::common::{ids, matrix, model, model_dir};

fn engine(name: &str, slots: i64) -> DecodeEngine {
    let m = LoadedModel::load(Some(&model_dir(name)), Device::Cpu, Kind::Float).expect("load");
    DecodeEngine::from_model(&m.model, slots, 64).expect("engine")
}

fn row(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t).expect("row")
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d <= 1e-4, "{what}: max abs diff {d}");
}

#[test]
fn prefill_then_decode_matches_transformers() {
    let name = "qwen3_single";
    let input = ids(&model(name)["input_ids"]);
    let reference = matrix(&model(name)["logits_f32"]);
    let mut e = engine(name, 1);
    let first = 4;
    let l = e.prefill(0, &input[..first]).expect("prefill");
    assert_close(&row(&l), &reference[first - 1], "prefill");
    for (i, &tok) in input.iter().enumerate().skip(first) {
        e.set_tokens(&[tok]).expect("set");
        let out = e.step_eager(16, false).expect("step");
        assert_close(
            &row(&out.logits.get(0)),
            &reference[i],
            &format!("decode position {i}"),
        );
    }
}

#[test]
fn slots_at_different_positions_decode_independently() {
    // Continuous batching: slot 1 joins later, with a different prompt, and
    // each slot must see exactly what it would see alone.
    let name = "qwen3_single";
    let input = ids(&model(name)["input_ids"]);
    let reference = matrix(&model(name)["logits_f32"]);
    let mut e = engine(name, 2);
    let _ = e.prefill(0, &input[..3]).expect("prefill 0");
    let _ = e.prefill(1, &input[..6]).expect("prefill 1");
    let (mut p0, mut p1) = (3usize, 6usize);
    while p1 < input.len() {
        e.set_tokens(&[input[p0], input[p1]]).expect("set");
        let out = e.step_eager(32, false).expect("step");
        assert_close(&row(&out.logits.get(0)), &reference[p0], "slot 0");
        assert_close(&row(&out.logits.get(1)), &reference[p1], "slot 1");
        p0 += 1;
        p1 += 1;
    }
    // Slot 1 leaves and a new sequence takes it from the start.
    e.release(1);
    let _ = e.prefill(1, &input[..2]).expect("re-prefill");
    e.set_tokens(&[input[p0], input[2]]).expect("set");
    let out = e.step_eager(32, false).expect("step");
    assert_close(
        &row(&out.logits.get(0)),
        &reference[p0],
        "slot 0 after swap",
    );
    assert_close(&row(&out.logits.get(1)), &reference[2], "new slot 1");
}

#[test]
fn greedy_feedback_on_device_reproduces_transformers_generation() {
    let name = "qwen3_single";
    let prompt = ids(&model(name)["prompt"]);
    let expected = ids(&model(name)["greedy"]);
    let mut e = engine(name, 1);
    let first = argmax(&row(&e.prefill(0, &prompt).expect("prefill"))) as i64;
    let mut got = vec![first];
    e.set_tokens(&[first]).expect("set");
    while got.len() < expected.len() {
        let out = e.step_eager(64, true).expect("step");
        got.push(argmax(&row(&out.logits.get(0))) as i64);
    }
    assert_eq!(got, expected);
}

#[test]
fn engine_rejects_attention_bias_and_overflow() {
    let m = LoadedModel::load(Some(&model_dir("qwen3_sharded")), Device::Cpu, Kind::Float)
        .expect("load");
    assert!(DecodeEngine::from_model(&m.model, 1, 16).is_err());
    let mut e = engine("qwen3_single", 1);
    assert!(
        e.prefill(0, &[1; 64]).is_err(),
        "prompt longer than the cache"
    );
    assert!(e.prefill(1, &[1]).is_err(), "slot out of range");
    let _ = e.prefill(0, &[1, 2, 3]).expect("prefill");
    // Window of 4: positions 3 is the last that fits.
    e.step_eager(4, false).expect("position 3");
    assert!(
        e.step_eager(4, false).is_err(),
        "position 4 outside window 4"
    );
}

#[test]
fn continuous_batching_matches_one_at_a_time() {
    use blyan_gpu::batch::{BatchEvent, run_batch};
    use blyan_gpu::generate::{GenerateRequest, generate};
    use blyan_gpu::sample::SamplingParams;
    let name = "qwen3_single";
    let m = LoadedModel::load(Some(&model_dir(name)), Device::Cpu, Kind::Float).expect("load");
    let prompts: [&[i64]; 4] = [&[3, 14, 15], &[92, 65, 35, 89, 79], &[1], &[200, 100]];
    let max_tokens = [6usize, 3, 9, 4];
    let requests: Vec<GenerateRequest> = prompts
        .iter()
        .zip(max_tokens)
        .enumerate()
        .map(|(i, (p, n))| GenerateRequest {
            prompt_ids: p.to_vec(),
            max_tokens: n,
            sampling: SamplingParams {
                temperature: if i == 3 { 0.9 } else { 0.0 },
                top_k: 0,
                top_p: 1.0,
                seed: 7,
            },
            stop: vec![],
            stop_ids: vec![],
            top_logprobs: None,
        })
        .collect();
    let alone: Vec<Vec<i64>> = requests
        .iter()
        .map(|r| {
            generate(&m.model, None, r, |_| {})
                .expect("generate")
                .tokens
        })
        .collect();
    // Two slots for four requests: the later ones join as earlier ones finish.
    let mut e = DecodeEngine::from_model(&m.model, 2, 32).expect("engine");
    let mut events = Vec::new();
    let out =
        run_batch(&mut e, requests, None, false, |ev| events.push(ev.clone())).expect("batch");
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o.tokens, alone[i], "request {i}");
        assert_eq!(o.completion_tokens, max_tokens[i]);
    }
    let done: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            BatchEvent::Done { index, .. } => Some(*index),
            BatchEvent::Token { .. } => None,
        })
        .collect();
    assert_eq!(done, vec![1, 0, 3, 2], "completion order follows the slots");
    let streamed = events
        .iter()
        .filter(|e| matches!(e, BatchEvent::Token { .. }))
        .count();
    assert_eq!(streamed, max_tokens.iter().sum::<usize>());
}
