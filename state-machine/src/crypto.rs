//! Hashing, addresses and signatures (spec/encoding.md, ENC-*; spec/ledger.md, SIG-*).
//!
//! - SHA3-256 is FIPS 202 SHA3, not Keccak (ENC-1).
//! - Signatures are ECDSA over secp256k1 of SHA3-256(message), `r ‖ s` big-endian,
//!   low-S only (SIG-2). Domain tags are added by callers via [`signing_bytes`].

use k256::ecdsa::signature::hazmat::PrehashVerifier;
use k256::ecdsa::{Signature, SigningKey, VerifyingKey};
use sha3::{Digest, Sha3_256};

/// FIPS 202 SHA3-256 (ENC-1).
pub fn sha3_256(data: &[u8]) -> [u8; 32] {
    let mut hasher = Sha3_256::new();
    hasher.update(data);
    hasher.finalize().into()
}

/// SHA3-256 over the concatenation of several parts (no separators: callers
/// only concatenate fixed-width or length-prefixed parts).
pub fn sha3_256_parts(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha3_256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Verifies a plain ECDSA secp256k1 signature over SHA3-256(`message`) (SIG-2).
///
/// `public_key_sec1` is a SEC1 compressed (33 bytes) or uncompressed (65 bytes)
/// key; `signature` is `r ‖ s`, big-endian. High-S signatures are rejected.
/// Any malformed key or signature gives `false`; this never panics.
pub fn verify_signature(public_key_sec1: &[u8], message: &[u8], signature: &[u8; 64]) -> bool {
    if public_key_sec1.len() != 33 && public_key_sec1.len() != 65 {
        return false;
    }
    crate::memo::verification(signature, public_key_sec1, message, false, || {
        let Some(key) = crate::memo::public_key(public_key_sec1, || {
            VerifyingKey::from_sec1_bytes(public_key_sec1).ok()
        }) else {
            return false;
        };
        verify_prehash_uncached(&key, &sha3_256(message), signature)
    })
}

/// Verifies `signature` over an already computed SHA3-256 digest (SIG-2).
pub fn verify_prehash(key: &VerifyingKey, digest: &[u8; 32], signature: &[u8; 64]) -> bool {
    if !crate::memo::enabled() {
        return verify_prehash_uncached(key, digest, signature);
    }
    let sec1 = key.to_encoded_point(true);
    crate::memo::verification(signature, sec1.as_bytes(), digest, true, || {
        verify_prehash_uncached(key, digest, signature)
    })
}

fn verify_prehash_uncached(key: &VerifyingKey, digest: &[u8; 32], signature: &[u8; 64]) -> bool {
    let Ok(sig) = Signature::from_slice(signature) else {
        return false;
    };
    // SIG-2: low-S only. k256 rejects high-S in verify as well; checking here
    // keeps the rule explicit and independent of the library's policy.
    if sig.normalize_s().is_some() {
        return false;
    }
    key.verify_prehash(digest, &sig).is_ok()
}

/// Signs SHA3-256(`message`) deterministically (RFC 6979), returning low-S `r ‖ s`.
pub fn sign(key: &SigningKey, message: &[u8]) -> [u8; 64] {
    sign_prehash(key, &sha3_256(message))
}

/// Signs a SHA3-256 digest deterministically (RFC 6979), returning low-S `r ‖ s`.
pub fn sign_prehash(key: &SigningKey, digest: &[u8; 32]) -> [u8; 64] {
    use k256::ecdsa::signature::hazmat::PrehashSigner;
    let sig: Signature = key
        .sign_prehash(digest)
        .expect("a 32-byte prehash is always signable");
    let sig = sig.normalize_s().unwrap_or(sig);
    sig.to_bytes().into()
}
