//! TOPLOC-style commitments to a stage's outputs and the tolerant rule that
//! compares them (spec/inference.md, RT-COMMIT-*).
//!
//! A stage's hidden-state output for a run of token positions is reduced to
//! the indices and bf16 values of its `top_k` largest magnitudes: a few
//! hundred bytes for every 32 tokens, an integer object that can be signed,
//! hashed, stored and compared without floats. Two honest computations of
//! the same step by different kernels differ in the last bits, so the
//! comparison is within bounds, not bit-exact.
//!
//! - **RT-COMMIT-1** Input: `tokens × hidden` finite `f32` values (row per
//!   token position), `1 ≤ tokens ≤ 32`, `hidden ≥ 1`; any NaN or infinity
//!   is refused naming its index.
//! - **RT-COMMIT-2** Selection: the `k = min(top_k, tokens × hidden)`
//!   elements of largest `|x|` (as `f32`), ties to the lower flat index.
//!   Each is kept as `(flat index, bf16(x))`, bf16 by round-to-nearest-even
//!   of the `f32` bits, entries in index order. Chunks are aligned to
//!   absolute positions: `[32j, 32j + 32)` ([`Committer`]); a single decode
//!   step is a one-token chunk.
//! - **RT-COMMIT-3** Comparison of `a` and `b` (same first token, tokens,
//!   hidden and k; otherwise they mismatch). Distances are in bf16 steps:
//!   `ord(v)` is the bf16 magnitude bits, negated for a negative sign, and
//!   `d(u, v) = |ord(u) − ord(v)|`. Over the union of both index sets an
//!   index passes if it is in both and `d ≤ max_ulps`; or in one only and its
//!   magnitude is at most the other's smallest committed magnitude plus
//!   `max_ulps` (it may have fallen just outside the other's top k). The
//!   commitments match iff at least `min_agree_ppm` of the union passes.
//!   Defaults: `max_ulps = 4` (1.6–3.1 % relative at bf16's 8-bit
//!   precision), `min_agree_ppm = 950,000`.
//! - **RT-COMMIT-3a** Soundness of the tolerance: if every element of two
//!   outputs differs by at most `max_ulps` after bf16 rounding (e.g. a
//!   relative difference ≤ 2⁻⁹, which moves bf16 by ≤ 1 step), every index
//!   passes, whatever the ties: an index only in `a` was not selected in
//!   `b`, so `|b_i| ≤ min_b` (rounding is monotone) and `|a_i| ≤ |b_i| +
//!   max_ulps`. Property-tested.
//! - **RT-COMMIT-3b** What it detects: any change that moves the top values
//!   by more than `max_ulps` steps in more than 5 % of the union (a sign
//!   flip, noise of a few percent, a skipped or wrong layer, other weights).
//!   What it cannot: a change confined to elements outside the top k (as
//!   TOPLOC; spot checks compare a step's whole commitment only).
//! - **RT-COMMIT-4** A [`StageCommitment`] binds a chunk to the request,
//!   model, head version, node and layers; the node signs
//!   `signing_bytes(StageCommitment, chain_id, body)` (`blyan/stage-cm/1`).

use crate::codec::{Reader, Writer};
use crate::{Error, PPM, Result};
use blyan_state_machine::crypto::verify_signature;
use blyan_state_machine::tx::{Domain, PublicKey, signing_bytes};
use blyan_state_machine::types::{Address, Hash32};

/// RT-COMMIT-2: positions per commitment.
pub const COMMIT_INTERVAL_TOKENS: u32 = 32;
/// RT-COMMIT-2: default number of values kept.
pub const DEFAULT_TOP_K: u32 = 128;
/// RT-COMMIT-2: most values a commitment may keep.
pub const MAX_TOP_K: u32 = 4096;
/// RT-COMMIT-1: widest hidden state accepted.
pub const MAX_HIDDEN: u32 = 1 << 20;

/// bf16 of a finite `f32`, round to nearest, ties to even.
pub fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounding = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(rounding) >> 16) as u16
}

/// RT-COMMIT-3: the bf16 value's position on a line where neighbours
/// differ by one (both zeros are 0).
pub fn bf16_ord(v: u16) -> i32 {
    let mag = i32::from(v & 0x7fff);
    if v & 0x8000 != 0 { -mag } else { mag }
}

/// RT-COMMIT-3: distance in bf16 steps.
pub fn bf16_steps(a: u16, b: u16) -> u32 {
    (bf16_ord(a) - bf16_ord(b)).unsigned_abs()
}

fn magnitude(v: u16) -> i32 {
    i32::from(v & 0x7fff)
}

/// One kept element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TopValue {
    /// `token × hidden + dim` within the chunk.
    pub index: u32,
    /// bf16 bits.
    pub value: u16,
}

/// A commitment to `tokens` consecutive positions of one stage's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkCommitment {
    /// Absolute position of the first token.
    pub first_token: u64,
    pub tokens: u16,
    pub hidden: u32,
    /// RT-COMMIT-2, in index order.
    pub values: Vec<TopValue>,
}

/// RT-COMMIT-1, RT-COMMIT-2: commits to `states` (`tokens × hidden`).
pub fn commit_chunk(
    first_token: u64,
    hidden: u32,
    states: &[f32],
    top_k: u32,
) -> Result<ChunkCommitment> {
    if hidden == 0 || hidden > MAX_HIDDEN {
        return Err(Error::InvalidHidden("hidden size must be in 1..=2^20"));
    }
    if top_k == 0 || top_k > MAX_TOP_K {
        return Err(Error::InvalidHidden("top_k must be in 1..=4096"));
    }
    if states.is_empty() || !states.len().is_multiple_of(hidden as usize) {
        return Err(Error::InvalidHidden(
            "length is not a positive multiple of hidden",
        ));
    }
    let tokens = states.len() / hidden as usize;
    if tokens > COMMIT_INTERVAL_TOKENS as usize {
        return Err(Error::InvalidHidden(
            "more than 32 token positions in one chunk",
        ));
    }
    if let Some(index) = states.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite { index });
    }
    let k = (top_k as usize).min(states.len());
    // Order: larger |x| first, then lower index. |x| of a finite f32 orders
    // like its bits with the sign cleared.
    let mut keyed: Vec<(u32, u32)> = states
        .iter()
        .enumerate()
        .map(|(i, x)| (x.to_bits() & 0x7fff_ffff, i as u32))
        .collect();
    let order = |a: &(u32, u32), b: &(u32, u32)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
    if k < keyed.len() {
        keyed.select_nth_unstable_by(k - 1, order);
        keyed.truncate(k);
    }
    let mut values: Vec<TopValue> = keyed
        .iter()
        .map(|&(_, i)| TopValue {
            index: i,
            value: bf16(states[i as usize]),
        })
        .collect();
    values.sort();
    Ok(ChunkCommitment {
        first_token,
        tokens: tokens as u16,
        hidden,
        values,
    })
}

/// RT-COMMIT-3 bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tolerance {
    pub max_ulps: u32,
    pub min_agree_ppm: u32,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            max_ulps: 4,
            min_agree_ppm: 950_000,
        }
    }
}

/// The outcome of RT-COMMIT-3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Comparison {
    /// Indices in the union of both sets.
    pub checked: u32,
    /// Indices that passed.
    pub passed: u32,
    pub matches: bool,
}

/// RT-COMMIT-3: compares two commitments to the same step.
pub fn compare(a: &ChunkCommitment, b: &ChunkCommitment, tol: Tolerance) -> Comparison {
    if a.first_token != b.first_token
        || a.tokens != b.tokens
        || a.hidden != b.hidden
        || a.values.len() != b.values.len()
        || a.values.is_empty()
    {
        return Comparison {
            checked: 0,
            passed: 0,
            matches: false,
        };
    }
    let floor = |c: &ChunkCommitment| {
        c.values
            .iter()
            .map(|v| magnitude(v.value))
            .min()
            .unwrap_or(0)
    };
    let (min_a, min_b) = (floor(a), floor(b));
    let slack = i64::from(tol.max_ulps);
    let (mut i, mut j) = (0, 0);
    let (mut checked, mut passed) = (0u32, 0u32);
    while i < a.values.len() || j < b.values.len() {
        let (va, vb) = (a.values.get(i), b.values.get(j));
        checked += 1;
        let ok = match (va, vb) {
            (Some(x), Some(y)) if x.index == y.index => {
                i += 1;
                j += 1;
                bf16_steps(x.value, y.value) <= tol.max_ulps
            }
            (Some(x), y) if y.is_none_or(|y| x.index < y.index) => {
                i += 1;
                i64::from(magnitude(x.value)) <= i64::from(min_b) + slack
            }
            (_, Some(y)) => {
                j += 1;
                i64::from(magnitude(y.value)) <= i64::from(min_a) + slack
            }
            (_, None) => unreachable!("the loop runs while either list has values"),
        };
        passed += u32::from(ok);
    }
    let matches =
        u64::from(passed) * u64::from(PPM) >= u64::from(tol.min_agree_ppm) * u64::from(checked);
    Comparison {
        checked,
        passed,
        matches,
    }
}

/// RT-COMMIT-2: commits a stream of token positions in 32-aligned chunks,
/// holding at most one chunk of states.
#[derive(Clone, Debug)]
pub struct Committer {
    hidden: u32,
    top_k: u32,
    /// Position of `buf`'s first token.
    chunk_start: u64,
    buf: Vec<f32>,
}

impl Committer {
    pub fn new(hidden: u32, top_k: u32, first_token: u64) -> Result<Self> {
        if hidden == 0 || hidden > MAX_HIDDEN || top_k == 0 || top_k > MAX_TOP_K {
            return Err(Error::InvalidHidden(
                "hidden in 1..=2^20 and top_k in 1..=4096",
            ));
        }
        Ok(Committer {
            hidden,
            top_k,
            chunk_start: first_token,
            buf: Vec::new(),
        })
    }

    fn tokens_in_buf(&self) -> u64 {
        (self.buf.len() / self.hidden as usize) as u64
    }

    /// Adds `states` (whole token rows) and returns the chunks completed.
    /// Refused input leaves the committer unchanged.
    pub fn push(&mut self, states: &[f32]) -> Result<Vec<ChunkCommitment>> {
        if !states.len().is_multiple_of(self.hidden as usize) {
            return Err(Error::InvalidHidden("length is not a multiple of hidden"));
        }
        if let Some(index) = states.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { index });
        }
        let mut out = Vec::new();
        let interval = u64::from(COMMIT_INTERVAL_TOKENS);
        for row in states.chunks(self.hidden as usize) {
            self.buf.extend_from_slice(row);
            let end = self.chunk_start + self.tokens_in_buf();
            if end.is_multiple_of(interval) {
                out.push(self.flush()?);
            }
        }
        Ok(out)
    }

    fn flush(&mut self) -> Result<ChunkCommitment> {
        let c = commit_chunk(self.chunk_start, self.hidden, &self.buf, self.top_k)?;
        self.chunk_start += self.tokens_in_buf();
        self.buf.clear();
        Ok(c)
    }

    /// The last, partial chunk, if any positions are pending.
    pub fn finish(mut self) -> Result<Option<ChunkCommitment>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        self.flush().map(Some)
    }
}

/// RT-COMMIT-4: what a stage signs for each chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageCommitment {
    pub request_id: Hash32,
    pub model: Hash32,
    /// The PoL head the stage's weights come from.
    pub head_version: Hash32,
    pub node: Address,
    pub first_layer: u32,
    pub last_layer: u32,
    pub chunk: ChunkCommitment,
}

impl StageCommitment {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.bytes(&self.request_id);
        w.bytes(&self.model);
        w.bytes(&self.head_version);
        w.bytes(&self.node.0);
        w.u32(self.first_layer);
        w.u32(self.last_layer);
        w.u64(self.chunk.first_token);
        w.u16(self.chunk.tokens);
        w.u32(self.chunk.hidden);
        w.len(self.chunk.values.len());
        for v in &self.chunk.values {
            w.u32(v.index);
            w.u16(v.value);
        }
    }

    /// RT-ENC-1 body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode_into(&mut w);
        w.0
    }

    pub(crate) fn decode_from(r: &mut Reader) -> Result<StageCommitment> {
        let request_id = r.array()?;
        let model = r.array()?;
        let head_version = r.array()?;
        let node = Address(r.array()?);
        let first_layer = r.u32()?;
        let last_layer = r.u32()?;
        let first_token = r.u64()?;
        let tokens = r.u16()?;
        let hidden = r.u32()?;
        let n = r.len(MAX_TOP_K as usize, 6, "commitment values")?;
        let values = (0..n)
            .map(|_| {
                Ok(TopValue {
                    index: r.u32()?,
                    value: r.u16()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let c = StageCommitment {
            request_id,
            model,
            head_version,
            node,
            first_layer,
            last_layer,
            chunk: ChunkCommitment {
                first_token,
                tokens,
                hidden,
                values,
            },
        };
        c.validate()?;
        Ok(c)
    }

    /// RT-COMMIT-1/2 structure: sizes in range, indices strictly increasing
    /// and inside `tokens × hidden`.
    pub fn validate(&self) -> Result<()> {
        let c = &self.chunk;
        if self.first_layer > self.last_layer {
            return Err(Error::InvalidHidden("first_layer > last_layer"));
        }
        if c.tokens == 0
            || u32::from(c.tokens) > COMMIT_INTERVAL_TOKENS
            || c.hidden == 0
            || c.hidden > MAX_HIDDEN
        {
            return Err(Error::InvalidHidden(
                "tokens in 1..=32 and hidden in 1..=2^20",
            ));
        }
        let n = u64::from(c.tokens) * u64::from(c.hidden);
        if c.values.is_empty()
            || c.values.windows(2).any(|w| w[0].index >= w[1].index)
            || c.values.last().is_some_and(|v| u64::from(v.index) >= n)
        {
            return Err(Error::InvalidHidden(
                "values empty, not in increasing index order, or outside the chunk",
            ));
        }
        Ok(())
    }

    /// RT-COMMIT-4: the bytes the stage signs.
    pub fn signing_bytes(&self, chain_id: &str) -> Vec<u8> {
        signing_bytes(Domain::StageCommitment, chain_id, &self.encode())
    }
}

/// A stage commitment with its node's key and signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedCommitment {
    pub commitment: StageCommitment,
    pub public_key: PublicKey,
    pub signature: [u8; 64],
}

impl SignedCommitment {
    /// RT-COMMIT-4: the key is the node's and the signature verifies.
    pub fn verify(&self, chain_id: &str) -> Result<()> {
        self.commitment.validate()?;
        let derived =
            Address::from_sec1(&self.public_key).ok_or(Error::BadSignature("commitment"))?;
        if derived != self.commitment.node {
            return Err(Error::WrongKey {
                stated: self.commitment.node,
                derived,
            });
        }
        if !verify_signature(
            &self.public_key,
            &self.commitment.signing_bytes(chain_id),
            &self.signature,
        ) {
            return Err(Error::BadSignature("commitment"));
        }
        Ok(())
    }

    pub(crate) fn encode_into(&self, w: &mut Writer) {
        self.commitment.encode_into(w);
        w.bytes(&self.public_key);
        w.bytes(&self.signature);
    }

    pub(crate) fn decode_from(r: &mut Reader) -> Result<SignedCommitment> {
        Ok(SignedCommitment {
            commitment: StageCommitment::decode_from(r)?,
            public_key: r.array()?,
            signature: r.array()?,
        })
    }

    /// Commitment body ‖ public key ‖ signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode_into(&mut w);
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<SignedCommitment> {
        let mut r = Reader::new(bytes, "signed commitment");
        let s = Self::decode_from(&mut r)?;
        r.finish()?;
        Ok(s)
    }
}
