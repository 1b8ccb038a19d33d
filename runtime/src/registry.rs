//! Inference nodes announced to this node's API (`POST /p2p/register`,
//! API-REG-*), and the API tokens issued to them.
//!
//! This is the off-chain, per-node view a router needs to reach a GPU node
//! (its host, port and the blocks it holds). It is not consensus state: a
//! node's bond and on-chain registration are the `RegisterNode` transaction
//! (TX-9), which an announcement requires (API-REG-6). The registry lives
//! in memory and is bounded; after a restart nodes announce themselves
//! again (they must re-announce within [`RegistryConfig::ttl_ms`] anyway).
//!
//! - **API-REG-1** An announcement is signed by the node key:
//!   `signing_bytes(NodeAnnouncement, chain_id, body)` with `body =
//!   address (20) ‖ receiver (20) ‖ timestamp_ms (u64 BE) ‖ port (u16 BE) ‖
//!   len(host) (u8) ‖ host ‖ count (u16 BE) ‖ (len (u8) ‖ expert id) ×
//!   count`. The address must be the public key's; the receiver is the
//!   address of the node the announcement is sent to (the `address` of its
//!   `GET /status`), see API-REG-5; the timestamp within
//!   [`MAX_ANNOUNCEMENT_SKEW_MS`] of the receiver's clock (no replay of old
//!   announcements); host at most 255 bytes, at most [`MAX_EXPERTS`] expert
//!   ids of at most 255 bytes each.
//! - **API-REG-2** A valid announcement replaces the node's previous entry
//!   and revokes its previous token; the answer carries a fresh 32-byte
//!   random token (hex). Only the token's SHA3-256 is kept.
//! - **API-REG-3** At most [`RegistryConfig::max_nodes`] nodes; a new node
//!   beyond that is refused (`503`) rather than evicting a live one.
//! - **API-REG-4** A node's timestamps strictly increase: an announcement
//!   whose timestamp is not greater than the current entry's is refused
//!   (`400`), so a copy of the current announcement cannot be replayed to
//!   take the owner's token.
//! - **API-REG-5** An announcement names its receiver (API-REG-1); another
//!   receiver refuses it (the signature does not verify), so one seen by
//!   one node cannot be replayed to another.
//! - **API-REG-6** Only a node with an on-chain registration (a
//!   `RegisterNode` record, TX-9, in the receiver's committed state) may
//!   announce; others are refused (`403`) before the signature is checked.
//!   Keys therefore cost a bond, not nothing.
//! - **API-REG-7** An entry expires [`RegistryConfig::ttl_ms`] after its
//!   timestamp unless renewed (its token with it), and the entries' sizes
//!   (their signed bodies plus [`ENTRY_OVERHEAD_BYTES`]) total at most
//!   [`RegistryConfig::max_bytes`]; an announcement that would exceed it is
//!   refused (`503`).
//! - **API-REG-8** `GET /nodes` answers a page at a time in address order
//!   (`?after=<address>&limit=<1..=100>`), never the whole table.

use crate::Error;
use blyan_state_machine::crypto::{sha3_256, verify_signature};
use blyan_state_machine::tx::{Domain, PublicKey, signing_bytes};
use blyan_state_machine::types::Address;
use blyan_sync::{TokenTable, TokenTableFull};

/// API-REG-1: an announcement's timestamp may differ from the receiver's clock by at most this.
pub const MAX_ANNOUNCEMENT_SKEW_MS: u64 = 30_000;
/// API-REG-1: most expert ids one announcement may list.
pub const MAX_EXPERTS: usize = 1024;
/// API-REG-7: bytes an entry counts beyond its signed body (key, token
/// hash, map overhead).
pub const ENTRY_OVERHEAD_BYTES: usize = 128;

/// `[api]` registry settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryConfig {
    /// API-REG-3: most nodes held.
    pub max_nodes: usize,
    /// API-REG-7: most bytes of entries held.
    pub max_bytes: usize,
    /// API-REG-7: an entry expires this long after its timestamp.
    pub ttl_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_nodes: 10_000,
            max_bytes: 32 * 1024 * 1024,
            ttl_ms: 15 * 60 * 1000,
        }
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
    receiver: &Address,
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
    let mut out = Vec::with_capacity(20 + 20 + 8 + 2 + 1 + host.len() + 2);
    out.extend_from_slice(&node_id.0);
    out.extend_from_slice(&receiver.0);
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

/// Signs an announcement to `receiver` (for nodes and tests).
pub fn sign_announcement(
    key: &k256::ecdsa::SigningKey,
    chain_id: &str,
    receiver: &Address,
    host: &str,
    port: u16,
    available_experts: &[String],
    timestamp_ms: u64,
) -> Result<Announcement, Error> {
    let public_key = blyan_state_machine::tx::public_key_of(key);
    let node_id = Address::from_sec1(&public_key)
        .ok_or_else(|| Error::BadRequest("not a public key".into()))?;
    let body = announcement_body(
        &node_id,
        receiver,
        host,
        port,
        available_experts,
        timestamp_ms,
    )?;
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
    /// This node's address, which announcements must name (API-REG-5).
    receiver: Address,
    config: RegistryConfig,
    /// address → (entry, SHA3-256 of its token)
    table: TokenTable<Address, RegisteredNode, [u8; 32]>,
}

impl Registry {
    pub fn new(chain_id: String, receiver: Address, config: RegistryConfig) -> Registry {
        Registry {
            chain_id,
            receiver,
            table: TokenTable::with_max_bytes(config.max_nodes, config.max_bytes),
            config,
        }
    }

    /// API-REG-7: drops the entries (and tokens) that expired by `now_ms`.
    pub fn expire(&self, now_ms: u64) -> usize {
        let ttl = self.config.ttl_ms;
        self.table
            .retain(|n| n.announced_at_ms.saturating_add(ttl) > now_ms)
    }

    /// API-REG-1..7: checks `a` and records it; returns the new token.
    /// `on_chain`: whether the node holds an on-chain registration (API-REG-6).
    pub fn register(&self, a: &Announcement, now_ms: u64, on_chain: bool) -> Result<String, Error> {
        if !on_chain {
            return Err(Error::Forbidden(format!(
                "{} has no on-chain registration; submit a RegisterNode transaction (TX-9) first",
                a.node_id
            )));
        }
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
            &self.receiver,
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
        // API-REG-4: strictly newer than the current entry.
        let newer = |previous: Option<&RegisteredNode>| {
            previous.is_none_or(|p| p.announced_at_ms < a.timestamp_ms)
        };
        self.expire(now_ms);
        let bytes = body.len() + ENTRY_OVERHEAD_BYTES;
        match self
            .table
            .upsert_sized(a.node_id, entry, bytes, token_hash, newer)
        {
            Err(TokenTableFull) => {
                return Err(Error::Busy(format!(
                    "the registry holds its maximum of {} nodes or {} bytes",
                    self.config.max_nodes, self.config.max_bytes
                )));
            }
            Ok(false) => {
                return Err(Error::BadRequest(
                    "an announcement not newer than the node's current one (API-REG-4)".into(),
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

    /// API-REG-8: at most `limit` unexpired nodes with addresses after
    /// `after`, by address.
    pub fn page(&self, after: Option<&Address>, limit: usize, now_ms: u64) -> Vec<RegisteredNode> {
        self.expire(now_ms);
        self.table.page(after, limit)
    }

    /// Entries held and their bytes (API-REG-3/7).
    pub fn usage(&self) -> (usize, usize) {
        (self.table.len(), self.table.total_bytes())
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

    const ME: Address = Address([0xee; 20]);

    fn ann(k: &SigningKey, ts: u64) -> Announcement {
        sign_announcement(k, CHAIN, &ME, "10.0.0.1", 9000, &["0.3".into()], ts).unwrap()
    }

    fn registry(config: RegistryConfig) -> Registry {
        Registry::new(CHAIN.into(), ME, config)
    }

    impl Registry {
        /// An announcement from a node registered on chain.
        fn register_ok(&self, a: &Announcement, now_ms: u64) -> Result<String, Error> {
            self.register(a, now_ms, true)
        }

        fn nodes(&self) -> Vec<RegisteredNode> {
            self.table.values()
        }
    }

    #[test]
    fn api_reg_1_2_a_signed_announcement_registers_and_replaces_the_token() {
        let reg = registry(RegistryConfig::default());
        let a = ann(&key(1), 1_000);
        let t1 = reg.register_ok(&a, 1_000).unwrap();
        assert_eq!(reg.token_owner(&t1), Some(a.node_id));
        let t2 = reg.register_ok(&ann(&key(1), 2_000), 2_000).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(reg.token_owner(&t1), None, "the old token is revoked");
        assert_eq!(reg.token_owner(&t2), Some(a.node_id));
        assert_eq!(reg.nodes().len(), 1);
        assert_eq!(reg.nodes()[0].available_experts, vec!["0.3".to_string()]);
    }

    #[test]
    fn api_reg_1_forged_stale_or_foreign_announcements_are_refused() {
        let reg = registry(RegistryConfig::default());
        let good = ann(&key(1), 50_000);
        let mut tampered = good.clone();
        tampered.port = 9001;
        assert!(
            reg.register_ok(&tampered, 50_000).is_err(),
            "tampered field"
        );
        let mut other_id = good.clone();
        other_id.node_id = ann(&key(2), 50_000).node_id;
        assert!(
            reg.register_ok(&other_id, 50_000).is_err(),
            "address of another key"
        );
        assert!(
            reg.register_ok(&good, 50_000 + MAX_ANNOUNCEMENT_SKEW_MS + 1)
                .is_err(),
            "stale"
        );
        let foreign =
            sign_announcement(&key(1), "other-chain", &ME, "10.0.0.1", 9000, &[], 50_000).unwrap();
        assert!(reg.register_ok(&foreign, 50_000).is_err(), "another chain");
        assert!(reg.nodes().is_empty(), "nothing was recorded");
        assert!(reg.register_ok(&good, 50_000).is_ok());
        let older = ann(&key(1), 40_000);
        assert!(
            reg.register_ok(&older, 50_000).is_err(),
            "older than the current one"
        );
    }

    /// API-REG-4 (issue 18 item 9): replaying the current announcement (same
    /// timestamp) must not issue a new token and revoke the owner's.
    #[test]
    fn api_reg_4_a_replayed_announcement_does_not_take_the_token() {
        let reg = registry(RegistryConfig::default());
        let a = ann(&key(1), 5_000);
        let owner = reg.register_ok(&a, 5_000).unwrap();
        assert!(
            reg.register_ok(&a, 5_000).is_err(),
            "the same announcement again"
        );
        assert_eq!(
            reg.token_owner(&owner),
            Some(a.node_id),
            "still the owner's"
        );
    }

    #[test]
    fn api_reg_5_an_announcement_to_another_receiver_is_refused() {
        let elsewhere = Registry::new(CHAIN.into(), Address([0xdd; 20]), RegistryConfig::default());
        let a = ann(&key(1), 5_000);
        assert!(matches!(
            elsewhere.register(&a, 5_000, true),
            Err(Error::BadRequest(_))
        ));
        assert!(
            registry(RegistryConfig::default())
                .register_ok(&a, 5_000)
                .is_ok()
        );
    }

    #[test]
    fn api_reg_6_a_node_without_an_on_chain_registration_is_refused() {
        let reg = registry(RegistryConfig::default());
        let a = ann(&key(1), 5_000);
        assert!(matches!(
            reg.register(&a, 5_000, false),
            Err(Error::Forbidden(_))
        ));
        assert_eq!(reg.usage(), (0, 0));
    }

    #[test]
    fn api_reg_7_entries_expire_and_are_bounded_in_bytes() {
        let ttl_ms = 60_000;
        let one = announcement_body(
            &ann(&key(1), 0).node_id,
            &ME,
            "10.0.0.1",
            9000,
            &["0.3".into()],
            0,
        )
        .unwrap()
        .len()
            + ENTRY_OVERHEAD_BYTES;
        let reg = registry(RegistryConfig {
            max_bytes: 2 * one,
            ttl_ms,
            ..RegistryConfig::default()
        });
        let t1 = reg.register_ok(&ann(&key(1), 1_000), 1_000).unwrap();
        reg.register_ok(&ann(&key(2), 1_000), 1_000).unwrap();
        assert_eq!(reg.usage(), (2, 2 * one));
        assert!(
            matches!(
                reg.register_ok(&ann(&key(3), 1_000), 1_000),
                Err(Error::Busy(_))
            ),
            "a third entry exceeds the byte bound"
        );
        // Node 2 renews; node 1 does not and expires, with its token.
        reg.register_ok(&ann(&key(2), 30_000), 30_000).unwrap();
        let now = 1_000 + ttl_ms;
        assert_eq!(reg.page(None, 10, now).len(), 1);
        assert_eq!(
            reg.token_owner(&t1),
            None,
            "an expired entry's token is revoked"
        );
        assert!(
            reg.register_ok(&ann(&key(3), now), now).is_ok(),
            "room again"
        );
        reg.table.check_invariant();
    }

    #[test]
    fn api_reg_8_nodes_are_read_a_page_at_a_time() {
        let reg = registry(RegistryConfig::default());
        for k in 1..=5 {
            reg.register_ok(&ann(&key(k), 1_000), 1_000).unwrap();
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = reg.page(after.as_ref(), 2, 1_000);
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            after = Some(last.node_id);
            seen.extend(page.iter().map(|n| n.node_id));
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!((seen.len(), sorted), (5, seen));
    }

    #[test]
    fn api_reg_3_the_registry_is_bounded() {
        let reg = registry(RegistryConfig {
            max_nodes: 2,
            ..RegistryConfig::default()
        });
        reg.register_ok(&ann(&key(1), 1), 1).unwrap();
        reg.register_ok(&ann(&key(2), 1), 1).unwrap();
        assert!(matches!(
            reg.register_ok(&ann(&key(3), 1), 1),
            Err(Error::Busy(_))
        ));
        // A known node may still re-announce.
        assert!(reg.register_ok(&ann(&key(2), 2), 2).is_ok());
    }

    #[test]
    fn api_reg_1_oversized_fields_are_refused() {
        let long = "x".repeat(256);
        assert!(announcement_body(&Address::ZERO, &ME, &long, 1, &[], 0).is_err());
        assert!(announcement_body(&Address::ZERO, &ME, "h", 1, &[long], 0).is_err());
        assert!(announcement_body(&Address::ZERO, &ME, "", 1, &[], 0).is_err());
        let many = vec!["e".to_string(); MAX_EXPERTS + 1];
        assert!(announcement_body(&Address::ZERO, &ME, "h", 1, &many, 0).is_err());
    }
}
