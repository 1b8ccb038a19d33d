//! Generation with the reference model: prefill, then one token at a time
//! with the KV cache; stop on end-of-sequence ids, stop strings or
//! `max_tokens`; tokens streamed to a callback as they come. With
//! [`generate_until`] the callback is asked after every token whether to go
//! on, so a caller can cancel (a gone client, a deadline).

use std::ops::ControlFlow;

use crate::error::{GpuError, Result};
use crate::model::{KvCache, Qwen3};
use crate::sample::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<i64>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these (it is cut there).
    pub stop: Vec<String>,
    /// Generation ends after one of these ids (not included in the output).
    pub stop_ids: Vec<i64>,
    /// Record each generated token's log-probability and those of the `n`
    /// most likely tokens at its position (`None`: record nothing).
    pub top_logprobs: Option<usize>,
}

/// One generated token's log-probability under the model (log-softmax of
/// its f32 logits, computed in f64) and the most likely tokens there.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: i64,
    pub logprob: f32,
    /// `(id, logprob)`, most likely first; ties by lower id.
    pub top: Vec<(i64, f32)>,
}

/// The log-softmax of `row` at `id` and its `n` largest entries.
pub fn token_logprob(row: &[f32], id: i64, n: usize) -> TokenLogprob {
    assert!(
        (0..row.len() as i64).contains(&id),
        "a token of the vocabulary"
    );
    let max = f64::from(row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    let lse = max + sum.ln();
    let lp = |i: usize| (f64::from(row[i]) - lse) as f32;
    let by_value = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..row.len()).collect();
    let n = n.min(row.len());
    if n == 0 {
        order.clear();
    } else {
        order.select_nth_unstable_by(n - 1, by_value);
        order.truncate(n);
        order.sort_by(by_value);
    }
    TokenLogprob {
        id,
        logprob: lp(id as usize),
        top: order.into_iter().map(|i| (i as i64, lp(i))).collect(),
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller stopped it ([`generate_until`]'s callback broke).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The result, with usage counts.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOutput {
    pub tokens: Vec<i64>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// One per generated token when the request asked ([`GenerateRequest::top_logprobs`]).
    pub logprobs: Vec<TokenLogprob>,
}

/// Longest suffix of `text` that is a proper prefix of some stop string: held
/// back from streaming until we know it is not the start of a stop.
pub fn held_back(text: &str, stop: &[String]) -> usize {
    let mut hold = 0;
    for s in stop {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                hold = hold.max(i);
            }
        }
    }
    hold
}

/// Generates from `req`; `on_text` receives streamed text pieces.
pub fn generate(
    model: &Qwen3,
    tokenizer: Option<&Tokenizer>,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput> {
    generate_until(model, tokenizer, req, |piece| {
        if let Some(piece) = piece {
            on_text(piece);
        }
        ControlFlow::Continue(())
    })
}

/// Like [`generate`], but `on_step` is called once after every generated
/// token: with `Some(piece)` when a piece of text is ready to stream, else
/// with `None`. `ControlFlow::Break` ends generation there with
/// [`FinishReason::Cancelled`] (the output holds what was generated so far;
/// text not yet streamed is not offered to `on_step` again).
pub fn generate_until(
    model: &Qwen3,
    tokenizer: Option<&Tokenizer>,
    req: &GenerateRequest,
    on_step: impl FnMut(Option<&str>) -> ControlFlow<()>,
) -> Result<GenerateOutput> {
    model.check_ids(&req.prompt_ids)?;
    let mut cache = KvCache::new();
    generate_with(
        |ids| model.last_logits(ids, &mut cache),
        tokenizer,
        req,
        on_step,
    )
}

/// The generation loop of [`generate_until`] over any forward pass:
/// `forward(ids)` extends the sequence by `ids` (the prompt once, then
/// each generated token alone: the step shapes a replay must repeat) and
/// returns the f32 logits at its last position. A pipeline of stages on
/// other nodes (the runtime's router) runs the same loop, so its tokens,
/// text, stops and log-probabilities are those of one process.
pub fn generate_with(
    mut forward: impl FnMut(&[i64]) -> Result<Vec<f32>>,
    tokenizer: Option<&Tokenizer>,
    req: &GenerateRequest,
    mut on_step: impl FnMut(Option<&str>) -> ControlFlow<()>,
) -> Result<GenerateOutput> {
    if req.prompt_ids.is_empty() {
        return Err(GpuError::Invalid("empty prompt".into()));
    }
    if !req.stop.is_empty() && tokenizer.is_none() {
        return Err(GpuError::Invalid("stop strings need a tokenizer".into()));
    }
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut input: Vec<i64> = req.prompt_ids.clone();
    let mut tokens: Vec<i64> = Vec::new();
    let mut text = String::new();
    let mut streamed = 0usize;
    let mut finish = FinishReason::Length;
    let mut logprobs = Vec::new();
    while tokens.len() < req.max_tokens {
        let row = forward(&input)?;
        let next = sampler.sample(&row) as i64;
        if req.stop_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(next);
        if let Some(n) = req.top_logprobs {
            logprobs.push(token_logprob(&row, next, n));
        }
        let mut piece = None;
        if let Some(tok) = tokenizer {
            text = tok.decode(&tokens)?;
            if let Some(at) = req.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(at);
                finish = FinishReason::Stop;
                break;
            }
            let safe = text.len() - held_back(&text, &req.stop);
            // Never split a character that is still being decoded.
            if safe > streamed && text.is_char_boundary(safe) && !text.ends_with('\u{FFFD}') {
                piece = Some(streamed..safe);
                streamed = safe;
            }
        }
        if on_step(piece.map(|r| &text[r])).is_break() {
            finish = FinishReason::Cancelled;
            break;
        }
        input = vec![next];
    }
    if finish != FinishReason::Cancelled && text.len() > streamed {
        let _ = on_step(Some(&text[streamed..]));
    }
    Ok(GenerateOutput {
        completion_tokens: tokens.len(),
        prompt_tokens: req.prompt_ids.len(),
        tokens,
        text,
        finish_reason: finish,
        logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::{held_back, token_logprob};

    #[test]
    fn token_logprobs_are_a_log_softmax_with_the_top_in_order() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let t = token_logprob(&row, 2, 3);
        let lse = (1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp()).ln();
        assert!((f64::from(t.logprob) - (2.0 - lse)).abs() < 1e-6, "{t:?}");
        let ids: Vec<i64> = t.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 3, 2], "ties by lower id");
        let total: f64 = (0..4)
            .map(|i| f64::from(token_logprob(&row, i, 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(token_logprob(&row, 0, 0).top.is_empty());
        assert_eq!(token_logprob(&row, 0, 99).top.len(), 4);
    }

    #[test]
    fn holds_back_partial_stop() {
        let stop = vec!["END".to_string()];
        assert_eq!(held_back("abc EN", &stop), 2);
        assert_eq!(held_back("abc E", &stop), 1);
        assert_eq!(held_back("abc", &stop), 0);
    }
}
