//! Continuous batching on the decode engine: requests wait in a queue, take
//! a free slot as soon as one frees up (prefill), and every step advances
//! all active sequences by one token; a sequence leaves its slot when it
//! stops, and the next request takes it in the same step.

use std::collections::VecDeque;

use tch::Device;

use crate::engine::DecodeEngine;
use crate::error::{GpuError, Result};
use crate::generate::{FinishReason, GenerateOutput, GenerateRequest};
use crate::sample::Sampler;
use crate::tokenizer::Tokenizer;

struct Active {
    index: usize,
    req: GenerateRequest,
    sampler: Sampler,
    tokens: Vec<i64>,
}

/// Something that happened to a request, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchEvent {
    /// Request `index` produced `token`.
    Token { index: usize, token: i64 },
    /// Request `index` finished.
    Done { index: usize, reason: FinishReason },
}

enum Step {
    Continue(i64),
    Finish(FinishReason),
}

/// Appends `token` and decides whether the request goes on.
fn accept(
    a: &mut Active,
    token: i64,
    tokenizer: Option<&Tokenizer>,
    text: &mut String,
) -> Result<Step> {
    if a.req.stop_ids.contains(&token) {
        return Ok(Step::Finish(FinishReason::Stop));
    }
    a.tokens.push(token);
    if let Some(tok) = tokenizer
        && !a.req.stop.is_empty()
    {
        *text = tok.decode(&a.tokens)?;
        if let Some(at) = a
            .req
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(at);
            return Ok(Step::Finish(FinishReason::Stop));
        }
    }
    if a.tokens.len() >= a.req.max_tokens {
        return Ok(Step::Finish(FinishReason::Length));
    }
    Ok(Step::Continue(token))
}

/// The output of a finished request.
fn output(
    a: Active,
    reason: FinishReason,
    text: &str,
    tokenizer: Option<&Tokenizer>,
) -> (usize, GenerateOutput) {
    let text = match tokenizer {
        Some(tok) if reason != FinishReason::Stop || a.req.stop.is_empty() => {
            tok.decode(&a.tokens).unwrap_or_default()
        }
        _ => text.to_owned(),
    };
    let out = GenerateOutput {
        prompt_tokens: a.req.prompt_ids.len(),
        completion_tokens: a.tokens.len(),
        tokens: a.tokens,
        text,
        finish_reason: reason,
        // The batched engine keeps logits on the device and records no
        // log-probabilities; the runtime serves them from `generate_until`.
        logprobs: Vec::new(),
    };
    (a.index, out)
}

/// Runs `requests` to completion on `engine`, at most `engine.slots` at a
/// time, replaying a CUDA graph per step when `use_graph` (the engine must
/// be on CUDA). Outputs are in request order.
pub fn run_batch(
    engine: &mut DecodeEngine,
    requests: Vec<GenerateRequest>,
    tokenizer: Option<&Tokenizer>,
    use_graph: bool,
    mut on_event: impl FnMut(&BatchEvent),
) -> Result<Vec<GenerateOutput>> {
    let slots = engine.slots as usize;
    let attn_len = engine.max_len;
    for r in &requests {
        if r.prompt_ids.is_empty() || r.max_tokens == 0 {
            return Err(GpuError::Invalid("empty prompt or max_tokens 0".into()));
        }
        if (r.prompt_ids.len() + r.max_tokens) as i64 > attn_len {
            return Err(GpuError::Invalid(format!(
                "prompt {} + max_tokens {} exceed the cache of {attn_len}",
                r.prompt_ids.len(),
                r.max_tokens
            )));
        }
        if !r.stop.is_empty() && tokenizer.is_none() {
            return Err(GpuError::Invalid("stop strings need a tokenizer".into()));
        }
    }
    let mut outputs: Vec<Option<GenerateOutput>> = (0..requests.len()).map(|_| None).collect();
    let mut queue: VecDeque<(usize, GenerateRequest)> = requests.into_iter().enumerate().collect();
    let mut active: Vec<Option<Active>> = (0..slots).map(|_| None).collect();
    let mut next_input = vec![0i64; slots];
    let mut text = String::new();
    let mut captured = false;
    let total_steps_max: usize = queue.iter().map(|(_, r)| r.max_tokens + 1).sum::<usize>() + 1;
    for _ in 0..total_steps_max {
        // Admit waiting requests into free slots.
        for slot in 0..slots {
            while active[slot].is_none() {
                let Some((index, req)) = queue.pop_front() else {
                    break;
                };
                let logits = engine.prefill(slot as i64, &req.prompt_ids)?;
                let row = Vec::<f32>::try_from(&logits.to_device(Device::Cpu))?;
                let mut a = Active {
                    index,
                    sampler: Sampler::new(req.sampling.clone()),
                    req,
                    tokens: Vec::new(),
                };
                let token = a.sampler.sample(&row) as i64;
                match accept(&mut a, token, tokenizer, &mut text)? {
                    Step::Continue(t) => {
                        on_event(&BatchEvent::Token { index, token: t });
                        next_input[slot] = t;
                        active[slot] = Some(a);
                    }
                    Step::Finish(reason) => {
                        if a.tokens.last() == Some(&token) {
                            on_event(&BatchEvent::Token { index, token });
                        }
                        engine.release(slot as i64);
                        let (i, out) = output(a, reason, &text, tokenizer);
                        on_event(&BatchEvent::Done { index: i, reason });
                        outputs[i] = Some(out);
                    }
                }
            }
        }
        if active.iter().all(Option::is_none) {
            break;
        }
        // Idle slots restart at position 0 so that they never run past the window.
        let positions: Vec<i64> = (0..slots)
            .map(|s| match &active[s] {
                Some(a) => (a.req.prompt_ids.len() + a.tokens.len() - 1) as i64,
                None => 0,
            })
            .collect();
        engine.set_positions(&positions)?;
        engine.set_tokens(&next_input)?;
        let logits = if use_graph {
            #[cfg(blyan_cuda_graph)]
            if !captured {
                engine.capture(attn_len, false)?;
                captured = true;
            }
            engine.step_logits(true, attn_len)?
        } else {
            engine.step_eager(attn_len, false)?.logits
        };
        let rows = Vec::<Vec<f32>>::try_from(&logits.to_device(Device::Cpu))?;
        for slot in 0..slots {
            let Some(mut a) = active[slot].take() else {
                continue;
            };
            let token = a.sampler.sample(&rows[slot]) as i64;
            match accept(&mut a, token, tokenizer, &mut text)? {
                Step::Continue(t) => {
                    on_event(&BatchEvent::Token {
                        index: a.index,
                        token: t,
                    });
                    next_input[slot] = t;
                    active[slot] = Some(a);
                }
                Step::Finish(reason) => {
                    if a.tokens.last() == Some(&token) {
                        on_event(&BatchEvent::Token {
                            index: a.index,
                            token,
                        });
                    }
                    engine.release(slot as i64);
                    let (i, out) = output(a, reason, &text, tokenizer);
                    on_event(&BatchEvent::Done { index: i, reason });
                    outputs[i] = Some(out);
                }
            }
        }
    }
    let _ = &mut captured;
    outputs
        .into_iter()
        .map(|o| o.ok_or_else(|| GpuError::Invalid("a request did not finish".into())))
        .collect()
}
