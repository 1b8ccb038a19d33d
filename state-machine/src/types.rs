//! Basic protocol types (spec/ledger.md, TYPES-*).

use crate::crypto::sha3_256;
use k256::ecdsa::VerifyingKey;
use rkyv::{Archive, Deserialize as RkyvDeserialize, Serialize as RkyvSerialize};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Amounts are integers in base units (TYPES-1). 1 BLY = 10^18 base units.
pub type Amount = u128;
/// One BLY in base units.
pub const BLY: Amount = 1_000_000_000_000_000_000;
/// Block height; genesis is height 0, the first block is height 1.
pub type Height = u64;
/// A SHA3-256 digest.
pub type Hash32 = [u8; 32];

/// A 20-byte account address: the last 20 bytes of SHA3-256 over the 64-byte
/// uncompressed public key `x ‖ y` (without the SEC1 `0x04` prefix) (TYPES-2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Archive, RkyvSerialize, RkyvDeserialize)]
#[rkyv(derive(Debug, PartialEq, Eq, PartialOrd, Ord))]
pub struct Address(pub [u8; 20]);

/// Lexicographic byte order, as the derived one, compared as a 16-byte and
/// a 4-byte big-endian integer instead of through `memcmp` (addresses are
/// compared in every set lookup and ordered map; `memcmp` on 20 bytes was
/// 3 % of a 100-validator simulation).
impl Ord for Address {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let split = |a: &[u8; 20]| {
            let (head, tail) = a.split_at(16);
            (
                u128::from_be_bytes(head.try_into().expect("16 bytes")),
                u32::from_be_bytes(tail.try_into().expect("4 bytes")),
            )
        };
        split(&self.0).cmp(&split(&other.0))
    }
}

impl PartialOrd for Address {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Address {
    /// TYPES-2: address of a secp256k1 public key.
    pub fn from_public_key(key: &VerifyingKey) -> Address {
        let point = key.to_encoded_point(false);
        let bytes = point.as_bytes();
        assert_eq!(bytes.len(), 65, "uncompressed SEC1 point is 65 bytes");
        let digest = sha3_256(&bytes[1..]);
        let mut out = [0u8; 20];
        out.copy_from_slice(&digest[12..]);
        Address(out)
    }

    /// Address of a SEC1-encoded public key, or `None` if it is not a valid point.
    pub fn from_sec1(public_key_sec1: &[u8]) -> Option<Address> {
        // SIM-FID-1: parsing a key is a point decompression; memoised in
        // simulations (a hundred nodes parse the same genesis keys).
        crate::memo::public_key(public_key_sec1, || {
            VerifyingKey::from_sec1_bytes(public_key_sec1).ok()
        })
        .map(|k| Address::from_public_key(&k))
    }

    pub const ZERO: Address = Address([0u8; 20]);
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

/// Error parsing an address from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {0:?}: expected 0x followed by 40 hex digits")]
pub struct AddressParseError(pub String);

impl FromStr for Address {
    type Err = AddressParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s
            .strip_prefix("0x")
            .ok_or_else(|| AddressParseError(s.to_string()))?;
        let mut out = [0u8; 20];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| AddressParseError(s.to_string()))?;
        Ok(Address(out))
    }
}

impl Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hex helpers for 32-byte hashes in JSON.
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
            .map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// Amounts in JSON as decimal strings, since u128 does not fit JSON numbers.
pub mod amount_str {
    use super::Amount;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Amount, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Amount, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<Amount>().map_err(serde::de::Error::custom)
    }
}
