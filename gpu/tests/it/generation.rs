//! Sampling, stop strings, max tokens, the embedded default model.

use blyan_gpu::LoadedModel;
use blyan_gpu::generate::{FinishReason, GenerateOutput, GenerateRequest, generate};
use blyan_gpu::sample::{Sampler, SamplingParams};
use tch::{Device, Kind};

fn default_model() -> LoadedModel {
    LoadedModel::load(None, Device::Cpu, Kind::Float).expect("default model")
}

fn run(
    m: &LoadedModel,
    prompt: &str,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: &[&str],
) -> (GenerateOutput, String) {
    let tok = m.tokenizer.as_ref().expect("tokenizer");
    let req = GenerateRequest {
        prompt_ids: tok.encode(prompt).expect("encode"),
        max_tokens,
        sampling,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        stop_ids: vec![],
        top_logprobs: None,
    };
    let mut streamed = String::new();
    let out =
        generate(&m.model, Some(tok), &req, |piece| streamed.push_str(piece)).expect("generate");
    (out, streamed)
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.5,
        top_k: 0,
        top_p: 1.0,
        seed,
    }
}

#[test]
fn byte_tokenizer_round_trips() {
    let m = default_model();
    let tok = m.tokenizer.as_ref().expect("tokenizer");
    let text = "Hello, Blyan! héllo ☃";
    let ids = tok.encode(text).expect("encode");
    assert_eq!(ids, text.bytes().map(i64::from).collect::<Vec<_>>());
    assert_eq!(tok.decode(&ids).expect("decode"), text);
}

#[test]
fn default_model_is_deterministic() {
    let a = default_model().model.logits(&[72, 105]).expect("logits");
    let b = default_model().model.logits(&[72, 105]).expect("logits");
    assert_eq!(a.size(), vec![2, 272]);
    assert!(a.equal(&b));
    // And it is not degenerate: the two rows differ.
    assert!(!a.get(0).equal(&a.get(1)));
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let m = default_model();
    let (a, _) = run(&m, "abc", 32, sampled(7), &[]);
    let (b, _) = run(&m, "abc", 32, sampled(7), &[]);
    let (c, _) = run(&m, "abc", 32, sampled(8), &[]);
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);
}

#[test]
fn max_tokens_and_usage() {
    let m = default_model();
    let (out, streamed) = run(&m, "abc", 10, sampled(1), &[]);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.completion_tokens, 10);
    assert_eq!(out.tokens.len(), 10);
    assert_eq!(out.prompt_tokens, 3);
    assert_eq!(streamed, out.text);
}

#[test]
fn stop_string_cuts_the_text() {
    let m = default_model();
    let (full, _) = run(&m, "xyz", 40, SamplingParams::default(), &[]);
    // Pick a stop string from the middle of the greedy text.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 12, "greedy text too short: {:?}", full.text);
    let stop: String = chars[8..10].iter().collect();
    let (out, streamed) = run(&m, "xyz", 40, SamplingParams::default(), &[&stop]);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    let at = full.text.find(&stop).expect("stop occurs");
    assert_eq!(out.text, full.text[..at]);
    assert_eq!(streamed, out.text, "the stop string must never be streamed");
    assert!(out.completion_tokens < full.completion_tokens);
}

#[test]
fn eos_id_stops() {
    let m = default_model();
    let (full, _) = run(&m, "xyz", 20, SamplingParams::default(), &[]);
    let tok = m.tokenizer.as_ref().expect("tokenizer");
    let req = GenerateRequest {
        prompt_ids: tok.encode("xyz").expect("encode"),
        max_tokens: 20,
        sampling: SamplingParams::default(),
        stop: vec![],
        stop_ids: vec![full.tokens[5]],
        top_logprobs: None,
    };
    let out = generate(&m.model, Some(tok), &req, |_| {}).expect("generate");
    assert_eq!(out.finish_reason, FinishReason::Stop);
    let first = full
        .tokens
        .iter()
        .position(|&t| t == full.tokens[5])
        .expect("present");
    assert_eq!(out.tokens, full.tokens[..first]);
}

#[test]
fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
    let logits = [0.1f32, 2.0, 1.9, -3.0];
    let mut s = Sampler::new(SamplingParams {
        temperature: 1.0,
        top_k: 1,
        top_p: 1.0,
        seed: 3,
    });
    for _ in 0..20 {
        assert_eq!(s.sample(&logits), 1);
    }
    // p(1) = 0.49, p(2) = 0.44 at temperature 1: top_p 0.9 keeps exactly {1, 2}.
    let mut s = Sampler::new(SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.9,
        seed: 3,
    });
    let mut seen = [0usize; 4];
    for _ in 0..400 {
        seen[s.sample(&logits)] += 1;
    }
    assert_eq!(seen[0] + seen[3], 0, "{seen:?}");
    assert!(seen[1] > 100 && seen[2] > 100, "{seen:?}");
}

#[test]
fn qwen_style_tokenizer_json_matches_the_tokenizers_library() {
    use blyan_gpu::tokenizer::Tokenizer;
    let t = &crate::common::manifest()["tokenizer"];
    let tok =
        Tokenizer::from_dir(&crate::common::model_dir("qwen3_single")).expect("tokenizer.json");
    let texts = t["texts"].as_array().expect("texts");
    let ids = t["ids"].as_array().expect("ids");
    assert_eq!(texts.len(), ids.len());
    for (text, expected) in texts.iter().zip(ids) {
        let text = text.as_str().expect("text");
        let got = tok.encode(text).expect("encode");
        assert_eq!(got, crate::common::ids(expected), "{text:?}");
        assert_eq!(tok.decode(&got).expect("decode"), text);
    }
}

/// `generate_until` asks after every token and stops at the first `Break`
/// (API-CHAT-4 in the runtime cancels jobs this way).
#[test]
fn generate_until_stops_at_the_first_break() {
    let m = default_model();
    let tok = m.tokenizer.as_ref().expect("tokenizer");
    let req = GenerateRequest {
        prompt_ids: tok.encode("hello").expect("encode"),
        max_tokens: 20,
        sampling: SamplingParams::default(),
        stop: vec![],
        stop_ids: vec![],
        top_logprobs: None,
    };
    let mut steps = 0;
    let out = blyan_gpu::generate::generate_until(&m.model, Some(tok), &req, |_| {
        steps += 1;
        if steps == 3 {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    })
    .expect("generate");
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!((steps, out.completion_tokens), (3, 3));
    let full = generate(&m.model, Some(tok), &req, |_| {}).expect("generate");
    assert_eq!(out.tokens, full.tokens[..3], "the same tokens, cut");
}
