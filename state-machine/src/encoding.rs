//! Canonical binary encoding (spec/encoding.md, ENC-*).
//!
//! Every protocol object is encoded with rkyv 0.8 in a pinned format
//! (little-endian, aligned, 32-bit relative pointers: the workspace pins those
//! features so the format never depends on the platform's defaults) (ENC-2).
//! Hashes are over these bytes (ENC-3). Decoding untrusted bytes validates them
//! with bytecheck, never panics, and rejects any input that does not re-encode
//! to exactly the same bytes, so every object has exactly one encoding and one
//! hash (ENC-4).

use rkyv::Archive;
use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::rancor::Error as RkyvError;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;

/// Largest object the decoder accepts, in bytes (ENC-5): bounds the copy made to align input.
pub const MAX_ENCODED_BYTES: usize = 16 * 1024 * 1024;

/// Why bytes were not accepted as the canonical encoding of an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    #[error("encoded object is {len} bytes, more than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("bytes are not a valid encoding: {0}")]
    Invalid(String),
    #[error("bytes decode but are not canonical (re-encoding differs)")]
    NotCanonical,
}

/// Objects with a canonical rkyv encoding (ENC-2). Implemented for every type
/// that derives rkyv's `Archive`, `Serialize` and `Deserialize` with validation.
pub trait Canonical: Sized {
    /// The canonical bytes of `self` (ENC-2).
    fn encode(&self) -> Vec<u8>;
    /// Decodes untrusted bytes; rejects non-canonical input (ENC-4).
    fn decode(bytes: &[u8]) -> Result<Self, EncodingError>;
    /// SHA3-256 over the canonical bytes (ENC-3).
    fn hash(&self) -> [u8; 32] {
        crate::crypto::sha3_256(&self.encode())
    }
}

impl<T> Canonical for T
where
    T: Archive + for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, RkyvError>>,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<HighValidator<'a, RkyvError>>
        + rkyv::Deserialize<T, HighDeserializer<RkyvError>>,
{
    fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<RkyvError>(self)
            .expect("serialising an in-memory value into a Vec cannot fail")
            .into_vec()
    }

    fn decode(bytes: &[u8]) -> Result<Self, EncodingError> {
        if bytes.len() > MAX_ENCODED_BYTES {
            return Err(EncodingError::TooLarge {
                len: bytes.len(),
                max: MAX_ENCODED_BYTES,
            });
        }
        // rkyv reads in place and needs aligned input; untrusted input may sit
        // anywhere, so copy it into an aligned buffer first.
        let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        let value = rkyv::from_bytes::<T, RkyvError>(&aligned)
            .map_err(|e| EncodingError::Invalid(e.to_string()))?;
        if value.encode() != bytes {
            return Err(EncodingError::NotCanonical);
        }
        Ok(value)
    }
}
