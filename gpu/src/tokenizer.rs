//! Tokenizers: a Hugging Face `tokenizer.json` (the `tokenizers` crate), and
//! the byte-level tokenizer of the embedded default model (one id per byte,
//! no merges), written in the same `tokenizer.json` form.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::{GpuError, Result};

/// Text to ids and back.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

/// GPT-2's `bytes_to_unicode`: printable characters for the 256 byte values.
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

/// The `tokenizer.json` of the byte-level tokenizer: ids 0..256 are the
/// bytes, `eos_id` is `<|endoftext|>`.
pub fn byte_level_tokenizer_json(eos_id: i64) -> Value {
    let table = bytes_to_unicode();
    let vocab: serde_json::Map<String, Value> = table
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": eos_id, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(GpuError::Tokenizer(format!("{} not found", path.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| GpuError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer { inner })
    }

    /// Parses a `tokenizer.json` document.
    pub fn from_json(v: &Value) -> Result<Self> {
        let inner: tokenizers::Tokenizer =
            serde_json::from_value(v.clone()).map_err(|e| GpuError::Tokenizer(e.to_string()))?;
        Ok(Tokenizer { inner })
    }

    /// Ids for `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| GpuError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Text for `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| GpuError::Tokenizer(e.to_string()))
    }
}
