//! Validation data: the DATA payload format and which tokens of a model's
//! validation pool a delta is judged on (spec/pol.md, POL-DATA-*, POL-VAL-*).
//!
//! What it does: decodes and encodes DATA payloads (a role byte and UTF-8
//! text, bounded), derives the seed that fixes a delta's validation sample
//! from values known only after the delta was committed (POL-VAL-2), and
//! draws the sample's window offsets from that seed (POL-VAL-3). Integers
//! only: tokenising the text and computing losses belong to the evaluator
//! (`blyan-gpu`'s `pol` module).
//!
//! What it deliberately does not do: choose the validation pool of a model
//! (POL-VAL-1 is read by the host from its genesis and the pools' payloads,
//! which the core never sees).

use crate::crypto::sha3_256_parts;
use crate::types::Hash32;

/// POL-DATA-1: the first four bytes of every DATA payload ("BLYT").
pub const DATA_MAGIC: [u8; 4] = *b"BLYT";
/// POL-DATA-1: the only format version.
pub const DATA_FORMAT_VERSION: u8 = 1;
/// POL-DATA-1: the largest DATA payload, in bytes (64 MiB of text).
pub const MAX_DATA_PAYLOAD_BYTES: usize = 64 << 20;
/// POL-VAL-2: domain tag of a delta's validation seed.
pub const VALIDATION_SEED_TAG: &[u8] = b"BLYAN/POL/VALIDATION-SEED/v1";
/// POL-VAL-3: the most windows one sample may have.
pub const MAX_WINDOWS: u32 = 4_096;
/// POL-VAL-3: windows in one delta's validation sample.
pub const VALIDATION_WINDOWS: u32 = 32;
/// POL-VAL-3: tokens per window (128 predictions each).
pub const VALIDATION_WINDOW_TOKENS: u64 = 129;

/// POL-DATA-1: what a DATA payload is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataRole {
    /// Trainers draw their batches from it.
    Train,
    /// Validators draw every delta's sample from it (POL-VAL-1).
    Validation,
}

impl DataRole {
    /// The role byte.
    pub fn byte(self) -> u8 {
        match self {
            DataRole::Train => 0,
            DataRole::Validation => 1,
        }
    }
}

/// A decoded DATA payload: a view of the payload's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataPayload<'a> {
    pub role: DataRole,
    pub text: &'a str,
}

/// Why a DATA payload or a sampling request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("POL-DATA-1: payload of {got} bytes exceeds the {max}-byte cap")]
    TooLarge { got: usize, max: usize },
    #[error("POL-DATA-1: payload of {0} bytes is shorter than its 6-byte header")]
    Truncated(usize),
    #[error("POL-DATA-1: not a DATA payload (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("POL-DATA-1: unsupported format version {0}")]
    UnsupportedVersion(u8),
    #[error("POL-DATA-1: unknown role {0} (0: train, 1: validation)")]
    UnknownRole(u8),
    #[error("POL-DATA-1: the text is not UTF-8 (first bad byte at offset {0})")]
    NotUtf8(usize),
    #[error("POL-DATA-1: the text is empty")]
    Empty,
    #[error(
        "POL-VAL-3: a pool of {pool_tokens} tokens cannot hold windows of {window_tokens} tokens"
    )]
    PoolTooSmall {
        pool_tokens: u64,
        window_tokens: u64,
    },
    #[error("POL-VAL-3: {0} windows, not 1..={MAX_WINDOWS}")]
    WindowCount(u32),
}

impl<'a> DataPayload<'a> {
    /// POL-DATA-1: decodes untrusted payload bytes (checks the cap before
    /// reading, the header, and that the text is non-empty UTF-8).
    pub fn decode(bytes: &'a [u8]) -> Result<DataPayload<'a>, DataError> {
        if bytes.len() > MAX_DATA_PAYLOAD_BYTES {
            return Err(DataError::TooLarge {
                got: bytes.len(),
                max: MAX_DATA_PAYLOAD_BYTES,
            });
        }
        let Some((header, text)) = bytes.split_first_chunk::<6>() else {
            return Err(DataError::Truncated(bytes.len()));
        };
        let magic = [header[0], header[1], header[2], header[3]];
        if magic != DATA_MAGIC {
            return Err(DataError::BadMagic(magic));
        }
        if header[4] != DATA_FORMAT_VERSION {
            return Err(DataError::UnsupportedVersion(header[4]));
        }
        let role = match header[5] {
            0 => DataRole::Train,
            1 => DataRole::Validation,
            other => return Err(DataError::UnknownRole(other)),
        };
        let text =
            std::str::from_utf8(text).map_err(|e| DataError::NotUtf8(6 + e.valid_up_to()))?;
        if text.is_empty() {
            return Err(DataError::Empty);
        }
        Ok(DataPayload { role, text })
    }

    /// POL-DATA-1: the payload bytes; refuses what `decode` would refuse.
    pub fn encode(&self) -> Result<Vec<u8>, DataError> {
        if self.text.is_empty() {
            return Err(DataError::Empty);
        }
        let len = 6 + self.text.len();
        if len > MAX_DATA_PAYLOAD_BYTES {
            return Err(DataError::TooLarge {
                got: len,
                max: MAX_DATA_PAYLOAD_BYTES,
            });
        }
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&DATA_MAGIC);
        out.push(DATA_FORMAT_VERSION);
        out.push(self.role.byte());
        out.extend_from_slice(self.text.as_bytes());
        Ok(out)
    }
}

/// POL-VAL-2: the seed of a delta's validation sample:
/// `SHA3-256(tag ‖ delta_id ‖ reveal_block_hash)`, where `reveal_block_hash`
/// is the hash of the block that included the delta's reveal. The delta id
/// is fixed by the commitment (POL-20) before that block exists.
pub fn validation_seed(delta_id: &Hash32, reveal_block_hash: &Hash32) -> Hash32 {
    sha3_256_parts(&[VALIDATION_SEED_TAG, delta_id, reveal_block_hash])
}

/// POL-VAL-3: the start offsets (in tokens) of `count` windows of
/// `window_tokens` tokens drawn from a pool of `pool_tokens` tokens:
/// window i starts at `u64_be(SHA3-256(seed ‖ i as u32 big-endian)[0..8])
/// mod (pool_tokens − window_tokens + 1)`, in draw order (i = 0 first).
/// Windows may overlap; the modulo bias is below `pool / 2^64`.
pub fn sample_windows(
    seed: &Hash32,
    pool_tokens: u64,
    count: u32,
    window_tokens: u64,
) -> Result<Vec<u64>, DataError> {
    if count == 0 || count > MAX_WINDOWS {
        return Err(DataError::WindowCount(count));
    }
    if window_tokens == 0 || window_tokens > pool_tokens {
        return Err(DataError::PoolTooSmall {
            pool_tokens,
            window_tokens,
        });
    }
    let starts = pool_tokens - window_tokens + 1;
    Ok((0..count)
        .map(|i| {
            let h = sha3_256_parts(&[seed, &i.to_be_bytes()]);
            let mut first = [0u8; 8];
            first.copy_from_slice(&h[..8]);
            u64::from_be_bytes(first) % starts
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pol_data_1_round_trip_and_refusals() {
        let p = DataPayload {
            role: DataRole::Validation,
            text: "Alice was beginning",
        };
        let bytes = p.encode().unwrap();
        assert_eq!(&bytes[..6], b"BLYT\x01\x01");
        assert_eq!(DataPayload::decode(&bytes).unwrap(), p);
        assert_eq!(
            DataPayload::decode(b"BLYT\x01"),
            Err(DataError::Truncated(5))
        );
        assert_eq!(
            DataPayload::decode(b"BLYD\x01\x00x"),
            Err(DataError::BadMagic(*b"BLYD"))
        );
        assert_eq!(
            DataPayload::decode(b"BLYT\x02\x00x"),
            Err(DataError::UnsupportedVersion(2))
        );
        assert_eq!(
            DataPayload::decode(b"BLYT\x01\x02x"),
            Err(DataError::UnknownRole(2))
        );
        assert_eq!(
            DataPayload::decode(b"BLYT\x01\x00ab\xff"),
            Err(DataError::NotUtf8(8))
        );
        assert_eq!(DataPayload::decode(b"BLYT\x01\x00"), Err(DataError::Empty));
        let empty = DataPayload {
            role: DataRole::Train,
            text: "",
        };
        assert_eq!(empty.encode(), Err(DataError::Empty));
    }

    #[test]
    fn pol_val_2_seed_depends_on_delta_and_reveal_block() {
        let a = validation_seed(&[1; 32], &[2; 32]);
        assert_ne!(a, validation_seed(&[1; 32], &[3; 32]));
        assert_ne!(a, validation_seed(&[4; 32], &[2; 32]));
        assert_eq!(a, validation_seed(&[1; 32], &[2; 32]));
    }

    #[test]
    fn pol_val_3_windows_fit_the_pool_and_are_refused_when_they_cannot() {
        let w = sample_windows(&[9; 32], 1_000, 64, 129).unwrap();
        assert_eq!(w.len(), 64);
        assert!(w.iter().all(|&s| s + 129 <= 1_000));
        // The draw is a pure function of the seed.
        assert_eq!(w, sample_windows(&[9; 32], 1_000, 64, 129).unwrap());
        assert_ne!(w, sample_windows(&[8; 32], 1_000, 64, 129).unwrap());
        // A window exactly the pool's size starts at 0.
        assert_eq!(sample_windows(&[9; 32], 10, 3, 10).unwrap(), vec![0, 0, 0]);
        assert!(matches!(
            sample_windows(&[9; 32], 10, 1, 11),
            Err(DataError::PoolTooSmall { .. })
        ));
        assert_eq!(
            sample_windows(&[9; 32], 10, 0, 1),
            Err(DataError::WindowCount(0))
        );
        assert_eq!(
            sample_windows(&[9; 32], 10, MAX_WINDOWS + 1, 1),
            Err(DataError::WindowCount(MAX_WINDOWS + 1))
        );
    }

    proptest! {
        #[test]
        fn pol_data_1_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = DataPayload::decode(&bytes) {
                prop_assert_eq!(p.encode().unwrap(), bytes);
            }
        }

        #[test]
        fn pol_val_3_every_window_is_inside(seed in any::<[u8; 32]>(), pool in 1u64..100_000, n in 1u32..64, len_frac in 1u64..=100) {
            let len = (pool * len_frac / 100).max(1);
            let w = sample_windows(&seed, pool, n, len).unwrap();
            prop_assert_eq!(w.len(), n as usize);
            prop_assert!(w.iter().all(|&s| s + len <= pool));
        }
    }
}
