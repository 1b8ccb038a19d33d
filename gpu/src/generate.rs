//! Generation with the reference model: prefill, then one token at a time
//! with the KV cache; stop on end-of-sequence ids, stop strings or
//! `max_tokens`; tokens streamed to a callback as they come.

use tch::Tensor;

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
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
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
    if req.prompt_ids.is_empty() {
        return Err(GpuError::Invalid("empty prompt".into()));
    }
    model.check_ids(&req.prompt_ids)?;
    if !req.stop.is_empty() && tokenizer.is_none() {
        return Err(GpuError::Invalid("stop strings need a tokenizer".into()));
    }
    let _guard = tch::no_grad_guard();
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut cache = KvCache::new();
    let mut input = Tensor::from_slice(&req.prompt_ids).unsqueeze(0);
    let mut tokens: Vec<i64> = Vec::new();
    let mut text = String::new();
    let mut streamed = 0usize;
    let mut finish = FinishReason::Length;
    while tokens.len() < req.max_tokens {
        let logits = model.forward(&input, &mut cache)?;
        let last = logits.get(0).get(-1);
        let row = Vec::<f32>::try_from(&last)?;
        let next = sampler.sample(&row) as i64;
        if req.stop_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(next);
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
                on_text(&text[streamed..safe]);
                streamed = safe;
            }
        }
        input = Tensor::from_slice(&[next]).unsqueeze(0);
    }
    if text.len() > streamed {
        on_text(&text[streamed..]);
    }
    Ok(GenerateOutput {
        completion_tokens: tokens.len(),
        prompt_tokens: req.prompt_ids.len(),
        tokens,
        text,
        finish_reason: finish,
    })
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn holds_back_partial_stop() {
        let stop = vec!["END".to_string()];
        assert_eq!(held_back("abc EN", &stop), 2);
        assert_eq!(held_back("abc E", &stop), 1);
        assert_eq!(held_back("abc", &stop), 0);
    }
}
