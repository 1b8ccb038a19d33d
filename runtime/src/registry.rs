//! Inference nodes announced to this node's API (`POST /p2p/register`,
//! API-REG-*), and the API tokens issued to them.
//!
//! This is the off-chain, per-node view a router needs to reach a GPU node
//! (its host, port and the blocks it holds). It is not consensus state: a
//! node's bond and on-chain registration are the `RegisterNode` transaction
//! (TX-9), and `GET /nodes` says which announced nodes are also registered
//! on chain. The registry lives in memory and is bounded; after a restart
//! nodes announce themselves again (they re-announce periodically anyway).
//!
//! - **API-REG-1** An announcement is signed by the node key:
//!   `signing_bytes(NodeAnnouncement, chain_id, body)` with `body =
//!   address (20) ‖ timestamp_ms (u64 BE) ‖ port (u16 BE) ‖ len(host) (u8) ‖
//!   host ‖ count (u16 BE) ‖ (len (u8) ‖ expert id) × count`. The address
//!   must be the public key's; the timestamp within
//!   [`MAX_ANNOUNCEMENT_SKEW_MS`] of the receiver's clock (no replay of old
//!   announcements); host at most 255 bytes, at most [`MAX_EXPERTS`] expert
//!   ids of at most 255 bytes each.
//! - **API-REG-2** A valid announcement replaces the node's previous entry
//!   and revokes its previous token; the answer carries a fresh 32-byte
//!   random token (hex). Only the token's SHA3-256 is kept.
//! - **API-REG-3** At most [`RegistryConfig::max_nodes`] nodes; a new node
//!   beyond that is refused (`503`) rather than evicting a live one.

use crate::Error;
use blyan_state_machine::crypto::{sha3_256, verify_signature};
use blyan_state_machine::tx::{Domain, PublicKey, signing_bytes};
use blyan_state_machine::types::Address;
use blyan_sync::{TokenTable, TokenTableFull};

/// API-REG-1: an announcement's timestamp may differ from the receiver's clock by at most this.
pub const MAX_ANNOUNCEMENT_SKEW_MS: u64 = 30_000;
/// API-REG-1: most expert ids one announcement may list.
pub const MAX_EXPERTS: usize = 1024;

/// `[api]` registry settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryConfig {
    pub max_nodes: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig { max_nodes: 10_000 }
    }
}

/// The signed content of `POST /p2p/register`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub node_id: Address,
    pub public_key: PublicKey,
    pub host: String,
    pub port: u16,
    pub available_experts: Vec<String>,
    pub timestamp_ms: u64,
    pub signature: [u8; 64],
}

/// What the registry holds about one node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RegisteredNode {
    pub node_id: Address,
    pub host: String,
    pub port: u16,
    pub available_experts: Vec<String>,
    pub announced_at_ms: u64,
}

/// API-REG-1: the body that is signed (everything but the signature).
pub fn announcement_body(
    node_id: &Address,
    host: &str,
    port: u16,
    available_experts: &[String],
    timestamp_ms: u64,
) -> Result<Vec<u8>, Error> {
    let too_long = |what: &str| Error::BadRequest(format!("{what} is longer than 255 bytes"));
    if available_experts.len() > MAX_EXPERTS {
        return Err(Error::BadRequest(format!(
            "{} expert ids; at most {MAX_EXPERTS}",
            available_experts.len()
        )));
    }
    let host_len = u8::try_from(host.len()).map_err(|_| too_long("host"))?;
    if host.is_empty() {
        return Err(Error::BadRequest("host is empty".into()));
    }
    let mut out = Vec::with_capacity(20 + 8 + 2 + 1 + host.len() + 2);
    out.extend_from_slice(&node_id.0);
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out.extend_from_slice(&port.to_be_bytes());
    out.push(host_len);
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(&(available_experts.len() as u16).to_be_bytes());
    for e in available_experts {
        let len = u8::try_from(e.len()).map_err(|_| too_long("an expert id"))?;
        out.push(len);
        out.extend_from_slice(e.as_bytes());
    }
    Ok(out)
}

/// Signs an announcement (for nodes and tests).
pub fn sign_announcement(
    key: &k256::ecdsa::SigningKey,
    chain_id: &str,
    host: &str,
    port: u16,
    available_experts: &[String],
    timestamp_ms: u64,
) -> Result<Announcement, Error> {
    let public_key = blyan_state_machine::tx::public_key_of(key);
    let node_id = Address::from_sec1(&public_key)
        .ok_or_else(|| Error::BadRequest("not a public key".into()))?;
    let body = announcement_body(&node_id, host, port, available_experts, timestamp_ms)?;
    let signature = blyan_state_machine::crypto::sign(
        key,
        &signing_bytes(Domain::NodeAnnouncement, chain_id, &body),
    );
    Ok(Announcement {
        node_id,
        public_key,
        host: host.to_string(),
        port,
        available_experts: available_experts.to_vec(),
        timestamp_ms,
        signature,
    })
}

/// The registry; shared by the API's handlers. The node table and its
/// token index are one [`TokenTable`] (SYNC-1, model-checked with loom).
pub struct Registry {
    chain_id: String,
    config: RegistryConfig,
    /// address → (entry, SHA3-256 of its token)
    table: TokenTable<Address, RegisteredNode, [u8; 32]>,
}

impl Registry {
    pub fn new(chain_id: String, config: RegistryConfig) -> Registry {
        Registry {
            chain_id,
            table: TokenTable::new(config.max_nodes),
            config,
        }
    }

    /// API-REG-1/2/3: checks `a` and records it; returns the new token.
    pub fn register(&self, a: &Announcement, now_ms: u64) -> Result<String, Error> {
        if Address::from_sec1(&a.public_key) != Some(a.node_id) {
            return Err(Error::BadRequest(
                "node_id is not the address of public_key".into(),
            ));
        }
        if a.timestamp_ms.abs_diff(now_ms) > MAX_ANNOUNCEMENT_SKEW_MS {
            return Err(Error::BadRequest(format!(
                "timestamp_ms {} is more than {MAX_ANNOUNCEMENT_SKEW_MS} ms from this node's clock ({now_ms})",
                a.timestamp_ms
            )));
        }
        let body = announcement_body(
            &a.node_id,
            &a.host,
            a.port,
            &a.available_experts,
            a.timestamp_ms,
        )?;
        let msg = signing_bytes(Domain::NodeAnnouncement, &self.chain_id, &body);
        if !verify_signature(&a.public_key, &msg, &a.signature) {
            return Err(Error::BadRequest(
                "signature does not verify for this announcement, key and chain".into(),
            ));
        }
        let mut token = [0u8; 32];
        getrandom(&mut token)?;
        let token_hash = sha3_256(&token);
        let entry = RegisteredNode {
            node_id: a.node_id,
            host: a.host.clone(),
            port: a.port,
            available_experts: a.available_experts.clone(),
            announced_at_ms: a.timestamp_ms,
        };
        let newer = |previous: Option<&RegisteredNode>| {
            previous.is_none_or(|p| p.announced_at_ms <= a.timestamp_ms)
        };
        match self.table.upsert(a.node_id, entry, token_hash, newer) {
            Err(TokenTableFull) => {
                return Err(Error::Busy(format!(
                    "the registry holds its maximum of {} nodes",
                    self.config.max_nodes
                )));
            }
            Ok(false) => {
                return Err(Error::BadRequest(
                    "an announcement older than the node's current one".into(),
                ));
            }
            Ok(true) => {}
        }
        Ok(hex::encode(token))
    }

    /// The node a token was issued to, if it is current.
    pub fn token_owner(&self, token: &str) -> Option<Address> {
        let mut raw = [0u8; 32];
        hex::decode_to_slice(token, &mut raw).ok()?;
        self.table.owner(&sha3_256(&raw))
    }

    /// SHA3-256 of a token, the rate limiter's key.
    pub fn token_key(token: &str) -> Option<[u8; 32]> {
        let mut raw = [0u8; 32];
        hex::decode_to_slice(token, &mut raw).ok()?;
        Some(sha3_256(&raw))
    }

    /// Every registered node, by address.
    pub fn nodes(&self) -> Vec<RegisteredNode> {
        self.table.values()
    }
}

fn getrandom(out: &mut [u8]) -> Result<(), Error> {
    use aes_gcm::aead::{OsRng, rand_core::RngCore};
    OsRng
        .try_fill_bytes(out)
        .map_err(|e| Error::Randomness(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::SigningKey;

    const CHAIN: &str = "blyan-test";

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32].into()).unwrap()
    }

    fn ann(k: &SigningKey, ts: u64) -> Announcement {
        sign_announcement(k, CHAIN, "10.0.0.1", 9000, &["0.3".into()], ts).unwrap()
    }

    #[test]
    fn api_reg_1_2_a_signed_announcement_registers_and_replaces_the_token() {
        let reg = Registry::new(CHAIN.into(), RegistryConfig::default());
        let a = ann(&key(1), 1_000);
        let t1 = reg.register(&a, 1_000).unwrap();
        assert_eq!(reg.token_owner(&t1), Some(a.node_id));
        let t2 = reg.register(&ann(&key(1), 2_000), 2_000).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(reg.token_owner(&t1), None, "the old token is revoked");
        assert_eq!(reg.token_owner(&t2), Some(a.node_id));
        assert_eq!(reg.nodes().len(), 1);
        assert_eq!(reg.nodes()[0].available_experts, vec!["0.3".to_string()]);
    }

    #[test]
    fn api_reg_1_forged_stale_or_foreign_announcements_are_refused() {
        let reg = Registry::new(CHAIN.into(), RegistryConfig::default());
        let good = ann(&key(1), 50_000);
        let mut tampered = good.clone();
        tampered.port = 9001;
        assert!(reg.register(&tampered, 50_000).is_err(), "tampered field");
        let mut other_id = good.clone();
        other_id.node_id = ann(&key(2), 50_000).node_id;
        assert!(
            reg.register(&other_id, 50_000).is_err(),
            "address of another key"
        );
        assert!(
            reg.register(&good, 50_000 + MAX_ANNOUNCEMENT_SKEW_MS + 1)
                .is_err(),
            "stale"
        );
        let foreign =
            sign_announcement(&key(1), "other-chain", "10.0.0.1", 9000, &[], 50_000).unwrap();
        assert!(reg.register(&foreign, 50_000).is_err(), "another chain");
        assert!(reg.nodes().is_empty(), "nothing was recorded");
        assert!(reg.register(&good, 50_000).is_ok());
        let older = ann(&key(1), 40_000);
        assert!(
            reg.register(&older, 50_000).is_err(),
            "older than the current one"
        );
    }

    #[test]
    fn api_reg_3_the_registry_is_bounded() {
        let reg = Registry::new(CHAIN.into(), RegistryConfig { max_nodes: 2 });
        reg.register(&ann(&key(1), 1), 1).unwrap();
        reg.register(&ann(&key(2), 1), 1).unwrap();
        assert!(matches!(
            reg.register(&ann(&key(3), 1), 1),
            Err(Error::Busy(_))
        ));
        // A known node may still re-announce.
        assert!(reg.register(&ann(&key(2), 2), 2).is_ok());
    }

    #[test]
    fn api_reg_1_oversized_fields_are_refused() {
        let long = "x".repeat(256);
        assert!(announcement_body(&Address::ZERO, &long, 1, &[], 0).is_err());
        assert!(announcement_body(&Address::ZERO, "h", 1, &[long], 0).is_err());
        assert!(announcement_body(&Address::ZERO, "", 1, &[], 0).is_err());
        let many = vec!["e".to_string(); MAX_EXPERTS + 1];
        assert!(announcement_body(&Address::ZERO, "h", 1, &many, 0).is_err());
    }
}
