//! Genesis: the chain's starting point, read from JSON (spec/ledger.md GEN-*).

use crate::encoding::Canonical;
use crate::error::Error;
use crate::params::Params;
use crate::tx::{MAX_CHAIN_ID_BYTES, PublicKey};
use crate::types::{Address, Amount, Hash32};
use rkyv::{Archive, Deserialize as RDeserialize, Serialize as RSerialize};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// GEN-1: a funded account.
#[derive(
    Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Archive, RSerialize, RDeserialize,
)]
#[serde(deny_unknown_fields)]
pub struct GenesisBalance {
    pub address: Address,
    #[serde(with = "crate::types::amount_str")]
    pub amount: Amount,
}

/// GEN-1: a validator bonded at genesis (stake adds to supply; it is not taken from a balance).
#[derive(
    Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Archive, RSerialize, RDeserialize,
)]
#[serde(deny_unknown_fields)]
pub struct GenesisValidator {
    #[serde(with = "hex33")]
    pub public_key: PublicKey,
    #[serde(with = "crate::types::amount_str")]
    pub stake: Amount,
    /// CONS-COMM-8: the validator's VRF public key (hex, 33 bytes). Without
    /// one it votes but proposes only when no committee member is left.
    #[serde(default, with = "opt_hex33", skip_serializing_if = "Option::is_none")]
    pub vrf_public_key: Option<PublicKey>,
}

/// GEN-1: everything that defines a chain at height 0.
#[derive(
    Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Archive, RSerialize, RDeserialize,
)]
#[serde(deny_unknown_fields)]
pub struct Genesis {
    pub chain_id: String,
    pub genesis_time_ms: u64,
    pub balances: Vec<GenesisBalance>,
    pub validators: Vec<GenesisValidator>,
    #[serde(default)]
    pub params: Params,
    /// GEN-1, POL-G1: the initial PoL blocks (at least the model's meta block
    /// on a real network), in dependency order.
    #[serde(default)]
    pub pol_blocks: Vec<crate::pol::PolBlock>,
}

/// Most accounts and validators a genesis file may list (bounds its size).
pub const MAX_GENESIS_ENTRIES: usize = 1_000_000;

impl Genesis {
    /// GEN-1: parse and validate a genesis JSON document.
    pub fn from_json(text: &str) -> Result<Genesis, Error> {
        let g: Genesis = serde_json::from_str(text).map_err(|e| Error::Genesis(e.to_string()))?;
        g.validate()?;
        Ok(g)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("genesis always serialises")
    }

    /// GEN-3: the genesis hash is SHA3-256 of the canonical encoding.
    pub fn hash(&self) -> Hash32 {
        Canonical::hash(self)
    }

    /// GEN-4: checks a genesis document.
    pub fn validate(&self) -> Result<(), Error> {
        let fail = |m: &str| Err(Error::Genesis(m.to_string()));
        if self.chain_id.is_empty() || self.chain_id.len() > MAX_CHAIN_ID_BYTES {
            return fail("chain_id must be 1 to 64 bytes");
        }
        if !self.chain_id.bytes().all(|b| b.is_ascii_graphic()) {
            return fail("chain_id must be printable ASCII without spaces");
        }
        if self.balances.len() > MAX_GENESIS_ENTRIES || self.validators.len() > MAX_GENESIS_ENTRIES
        {
            return fail("too many genesis entries");
        }
        self.params.validate().map_err(Error::Genesis)?;
        let mut seen = BTreeSet::new();
        for b in &self.balances {
            if !seen.insert(b.address) {
                return Err(Error::Genesis(format!(
                    "duplicate balance for {}",
                    b.address
                )));
            }
        }
        let mut seen = BTreeSet::new();
        for v in &self.validators {
            let Some(addr) = Address::from_sec1(&v.public_key) else {
                return fail("validator public key is not a valid secp256k1 point");
            };
            if !seen.insert(addr) {
                return Err(Error::Genesis(format!("duplicate validator {addr}")));
            }
            if let Some(vrf) = &v.vrf_public_key
                && crate::consensus::vrf::validate_key::<crate::consensus::Secp256k1Sha256Tai>(vrf)
                    .is_err()
            {
                return Err(Error::Genesis(format!(
                    "validator {addr} VRF public key is not a valid point"
                )));
            }
            if v.stake < self.params.min_validator_stake {
                return Err(Error::Genesis(format!(
                    "validator {addr} stake below min_validator_stake"
                )));
            }
        }
        if self.validators.is_empty() {
            return fail("at least one validator is required");
        }
        let total = self
            .balances
            .iter()
            .map(|b| b.amount)
            .chain(self.validators.iter().map(|v| v.stake))
            .try_fold(0u128, |acc, a| acc.checked_add(a));
        if total.is_none() {
            return fail("total supply overflows u128");
        }
        Ok(())
    }
}

mod opt_hex33 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<[u8; 33]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::hex33::serialize(v, s),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 33]>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| {
                let mut out = [0u8; 33];
                hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
                    .map_err(serde::de::Error::custom)?;
                Ok(out)
            })
            .transpose()
    }
}

mod hex33 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 33], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 33], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 33];
        hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
            .map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}
