//! Paid inference: allowances, batched usage settlement and API keys
//! (spec/ledger.md TX-13..TX-15, ALW-*, and spec/api.md API-KEY-*).
//!
//! A client escrows BLY in an *allowance* (TX-13): a spending cap, optional
//! per-node sub-caps and an expiry. It then hands out *API keys*: its
//! signature over `(allowance id, key index)` under the `api-key` domain,
//! bound to the chain id (SIG-1). A node checks a key against its own copy of
//! the chain state ([`authorize`]); nobody is asked. Serving nodes settle what
//! they served in batches (TX-15): the cost leaves the escrow and is burned,
//! and the route's nodes earn inference rewards capped by that burn (RWD-10).
//!
//! Everything here is integer arithmetic on explicit inputs.

use crate::crypto::{sha3_256, sign, verify_signature};
use crate::encoding::Canonical;
use crate::tx::{Domain, PublicKey, public_key_of, signing_bytes};
use crate::types::{Address, Amount, Hash32, Height};
use k256::ecdsa::SigningKey;
use rkyv::{Archive, Deserialize, Serialize};

/// TX-13: most per-node sub-caps in one allowance.
pub const MAX_ALLOWANCE_NODES: usize = 16;
/// TX-15: most usage items in one settlement.
pub const MAX_SETTLE_ITEMS: usize = 256;
/// TX-15: most nodes on one request's route.
pub const MAX_ROUTE_NODES: usize = 16;
/// TX-15: most tokens one usage item may report (prompt plus completion);
/// far above any context, it keeps every product in range.
pub const MAX_ITEM_TOKENS: u64 = 1 << 32;

/// TX-13: a per-node sub-cap: at most `cap` may be settled by `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct NodeCap {
    pub node: Address,
    pub cap: Amount,
}

/// TX-13's body: what the client escrows.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct AllowanceTerms {
    /// Escrowed from the sender's balance; the most that can ever be settled.
    pub cap: Amount,
    /// Empty: any node may settle. Otherwise only these nodes, each within
    /// its own cap (sorted by node, distinct, each `0 < cap ≤ terms.cap`).
    pub node_caps: Vec<NodeCap>,
    /// Last height at which keys are valid (ALW-3).
    pub expires_at: Height,
}

/// ALW-1: an allowance in the state, under its id (the id of the TX-13
/// transaction that opened it).
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Allowance {
    pub owner: Address,
    /// The key that signs this allowance's API keys: the opening
    /// transaction's key.
    pub owner_public_key: PublicKey,
    pub cap: Amount,
    /// Settled so far (burned); never above `cap` (INV-ALW-CAP).
    pub spent: Amount,
    pub node_caps: Vec<NodeCap>,
    /// Settled so far per node (sorted by node; only nodes that settled).
    pub node_spent: Vec<NodeCap>,
    pub opened_at: Height,
    pub expires_at: Height,
    /// Set by TX-14 (revocation).
    pub closed_at: Option<Height>,
    /// Requests settled against this allowance.
    pub settled_requests: u64,
}

/// Why a node refuses a key (API-KEY-3). Every one is `401` but
/// [`KeyRefusal::Exhausted`], which is `402`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error("malformed API key: {0}")]
    Malformed(String),
    #[error(
        "API key names an allowance this chain does not have (another chain's key, or not yet committed)"
    )]
    UnknownAllowance,
    #[error("API key signature does not verify for this allowance on this chain")]
    BadSignature,
    #[error("allowance expired at height {0}")]
    Expired(Height),
    #[error("allowance revoked at height {0}")]
    Revoked(Height),
    #[error("node {0} may not serve this allowance (not in its node caps)")]
    NodeNotAllowed(Address),
    #[error("allowance exhausted: nothing left of its cap for this node")]
    Exhausted,
}

impl Allowance {
    /// ALW-3: the last height at which the allowance may be used: its expiry,
    /// or the height it was revoked at if earlier.
    pub fn end(&self) -> Height {
        self.closed_at
            .map_or(self.expires_at, |c| c.min(self.expires_at))
    }

    /// ALW-4: usage may be settled up to `end + grace`; the unspent rest is
    /// refunded in the block at that height + 1.
    pub fn release_at(&self, grace_blocks: u64) -> Height {
        self.end().saturating_add(grace_blocks).saturating_add(1)
    }

    /// What is left of the cap.
    pub fn remaining(&self) -> Amount {
        self.cap - self.spent
    }

    /// `None` without sub-caps; otherwise `node`'s cap (`Some(None)`: not listed).
    fn node_cap(&self, node: &Address) -> Option<Option<Amount>> {
        if self.node_caps.is_empty() {
            return None;
        }
        Some(
            self.node_caps
                .binary_search_by(|c| c.node.cmp(node))
                .ok()
                .map(|i| self.node_caps[i].cap),
        )
    }

    /// What `node` has settled so far.
    pub fn node_spent(&self, node: &Address) -> Amount {
        self.node_spent
            .binary_search_by(|c| c.node.cmp(node))
            .map_or(0, |i| self.node_spent[i].cap)
    }

    /// What `node` may still settle: the rest of the cap, and of its sub-cap
    /// if there are sub-caps. `Err` if sub-caps exist and `node` has none.
    pub fn available_to(&self, node: &Address) -> Result<Amount, KeyRefusal> {
        let rest = self.remaining();
        match self.node_cap(node) {
            None => Ok(rest),
            Some(None) => Err(KeyRefusal::NodeNotAllowed(*node)),
            Some(Some(cap)) => Ok(rest.min(cap.saturating_sub(self.node_spent(node)))),
        }
    }

    /// Records `amount` settled by `node` (the caller checked availability).
    pub(crate) fn charge(&mut self, node: Address, amount: Amount) {
        assert!(
            amount <= self.remaining(),
            "INV-ALW-CAP checked by the caller"
        );
        self.spent += amount;
        match self.node_spent.binary_search_by(|c| c.node.cmp(&node)) {
            Ok(i) => self.node_spent[i].cap += amount,
            Err(i) => self.node_spent.insert(i, NodeCap { node, cap: amount }),
        }
    }
}

/// TX-13: checks the terms at `height` (why they are refused, if they are).
pub fn check_terms(
    terms: &AllowanceTerms,
    height: Height,
    max_allowance_blocks: u64,
) -> Result<(), String> {
    if terms.cap == 0 {
        return Err("allowance cap is zero".into());
    }
    if terms.expires_at < height {
        return Err(format!(
            "allowance expires at {} before its opening height {height}",
            terms.expires_at
        ));
    }
    if terms.expires_at - height > max_allowance_blocks {
        return Err(format!(
            "allowance lasts {} blocks, more than max_allowance_blocks {max_allowance_blocks}",
            terms.expires_at - height
        ));
    }
    if terms.node_caps.len() > MAX_ALLOWANCE_NODES {
        return Err(format!(
            "{} node caps, more than {MAX_ALLOWANCE_NODES}",
            terms.node_caps.len()
        ));
    }
    if !terms.node_caps.windows(2).all(|w| w[0].node < w[1].node) {
        return Err("node caps must be sorted by node and distinct".into());
    }
    if terms
        .node_caps
        .iter()
        .any(|c| c.cap == 0 || c.cap > terms.cap)
    {
        return Err("every node cap must be between 1 and the allowance cap".into());
    }
    Ok(())
}

/// TX-15: one share of a request's work. `work` is layers (or experts) held
/// times tokens processed, in any unit common to the route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct RouteShare {
    pub node: Address,
    pub work: u64,
}

/// TX-15: one served request.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct UsageItem {
    /// The serving node's id for the request; `(allowance, request_id)` is
    /// settled at most once (INV-RECEIPT-ONCE).
    pub request_id: Hash32,
    /// The model's PoL meta block id (POL-16 usage counts).
    pub model: Hash32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Who served it, with their work; the settling node is on it.
    pub route: Vec<RouteShare>,
}

/// TX-15: a batch of usage of one allowance, settled by one node.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Settlement {
    pub allowance: Hash32,
    pub items: Vec<UsageItem>,
}

/// ALW-5: the price of `tokens` at `price_per_1k_tokens`, rounded up (the
/// same rule as the API's quoted cost, API-CHAT-2).
pub fn price(tokens: u64, price_per_1k_tokens: Amount) -> Amount {
    u128::from(tokens)
        .saturating_mul(price_per_1k_tokens)
        .div_ceil(1000)
}

impl UsageItem {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// TX-15: why the item is malformed, if it is (`settler` is the sender).
    pub fn check(&self, settler: &Address) -> Result<(), String> {
        if self.tokens() == 0 || self.tokens() > MAX_ITEM_TOKENS {
            return Err(format!(
                "item tokens {} not in 1..={MAX_ITEM_TOKENS}",
                self.tokens()
            ));
        }
        if self.route.is_empty() || self.route.len() > MAX_ROUTE_NODES {
            return Err(format!(
                "route of {} nodes, not 1..={MAX_ROUTE_NODES}",
                self.route.len()
            ));
        }
        if !self.route.windows(2).all(|w| w[0].node < w[1].node) {
            return Err("route shares must be sorted by node and distinct".into());
        }
        if self
            .route
            .iter()
            .any(|s| s.work == 0 || s.work > MAX_ITEM_TOKENS << 16)
        {
            return Err("route work must be positive and bounded".into());
        }
        if !self.route.iter().any(|s| s.node == *settler) {
            return Err("the settling node is not on the route".into());
        }
        Ok(())
    }
}

/// RWD-10 split (ALW-6): `total` divided among the route in proportion to
/// work, rounding down; what rounding leaves goes to the first share (the
/// lowest address), so the parts sum to `total` exactly.
pub fn split(total: u128, route: &[RouteShare]) -> Vec<(Address, u128)> {
    assert!(!route.is_empty(), "checked by UsageItem::check");
    let work_sum: u128 = route.iter().map(|s| u128::from(s.work)).sum();
    let mut parts: Vec<(Address, u128)> = route
        .iter()
        .map(|s| {
            // total < 2^128 / 2^64 is not guaranteed; mul_div avoids overflow.
            (s.node, mul_div(total, u128::from(s.work), work_sum))
        })
        .collect();
    let given: u128 = parts.iter().map(|p| p.1).sum();
    parts[0].1 += total - given;
    parts
}

/// `floor(a · b / d)` for `b ≤ d`, without overflow.
fn mul_div(a: u128, b: u128, d: u128) -> u128 {
    assert!(d > 0 && b <= d, "a share of a whole");
    // a = q·d + r  ⇒  a·b/d = q·b + r·b/d, with r·b < d² ≤ 2^128 for d < 2^64.
    let (q, r) = (a / d, a % d);
    q * b + (r * b) / d
}

// ---------------------------------------------------------------------------
// API keys (API-KEY-*)
// ---------------------------------------------------------------------------

/// API-KEY-1: the prefix of every key string.
pub const API_KEY_PREFIX: &str = "blyk1_";

/// API-KEY-1: what the owner signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct ApiKeyGrant {
    pub allowance: Hash32,
    /// Lets an owner hand out distinct keys (distinct key ids in usage
    /// records) for one allowance.
    pub key_index: u32,
}

/// API-KEY-1: a grant and the owner's signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub grant: ApiKeyGrant,
    pub signature: [u8; 64],
}

const KEY_BYTES: usize = 32 + 4 + 64;

impl ApiKey {
    /// Signs a key for `allowance` with the allowance owner's key.
    pub fn issue(chain_id: &str, owner: &SigningKey, allowance: Hash32, key_index: u32) -> ApiKey {
        let grant = ApiKeyGrant {
            allowance,
            key_index,
        };
        ApiKey {
            signature: sign(
                owner,
                &signing_bytes(Domain::ApiKey, chain_id, &grant.encode()),
            ),
            grant,
        }
    }

    /// API-KEY-1: `blyk1_` ‖ hex(allowance ‖ key_index BE ‖ signature): 206
    /// characters, no spaces.
    pub fn to_key_string(&self) -> String {
        let mut b = Vec::with_capacity(KEY_BYTES);
        b.extend_from_slice(&self.grant.allowance);
        b.extend_from_slice(&self.grant.key_index.to_be_bytes());
        b.extend_from_slice(&self.signature);
        format!("{API_KEY_PREFIX}{}", hex::encode(b))
    }

    /// Parses a key string; any deviation from API-KEY-1 is `Malformed`.
    pub fn parse(s: &str) -> Result<ApiKey, KeyRefusal> {
        let body = s.strip_prefix(API_KEY_PREFIX).ok_or_else(|| {
            KeyRefusal::Malformed(format!("does not start with {API_KEY_PREFIX}"))
        })?;
        if body.len() != KEY_BYTES * 2 {
            return Err(KeyRefusal::Malformed(format!(
                "{} hex digits after the prefix, not {}",
                body.len(),
                KEY_BYTES * 2
            )));
        }
        if body.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(KeyRefusal::Malformed("hex digits must be lowercase".into()));
        }
        let b = hex::decode(body).map_err(|e| KeyRefusal::Malformed(e.to_string()))?;
        let mut allowance = [0u8; 32];
        allowance.copy_from_slice(&b[..32]);
        let key_index = u32::from_be_bytes(b[32..36].try_into().expect("4 bytes"));
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&b[36..]);
        Ok(ApiKey {
            grant: ApiKeyGrant {
                allowance,
                key_index,
            },
            signature,
        })
    }

    /// API-KEY-5: the key's id in usage records: SHA3-256 of the key string.
    pub fn id(&self) -> Hash32 {
        sha3_256(self.to_key_string().as_bytes())
    }

    /// API-KEY-2: the owner's signature over the grant on `chain_id`.
    pub fn verify(&self, chain_id: &str, owner_public_key: &PublicKey) -> bool {
        verify_signature(
            owner_public_key,
            &signing_bytes(Domain::ApiKey, chain_id, &self.grant.encode()),
            &self.signature,
        )
    }
}

/// API-KEY-3: whether `node` may serve `key` at `height`, given the
/// allowance the chain state holds under the key's id (`None`: no such
/// allowance). On success, what `node` may still charge to it (before the
/// node subtracts its own unsettled charges).
pub fn authorize(
    chain_id: &str,
    key: &ApiKey,
    allowance: Option<&Allowance>,
    node: &Address,
    height: Height,
) -> Result<Amount, KeyRefusal> {
    let a = allowance.ok_or(KeyRefusal::UnknownAllowance)?;
    if !key.verify(chain_id, &a.owner_public_key) {
        return Err(KeyRefusal::BadSignature);
    }
    if let Some(c) = a.closed_at {
        return Err(KeyRefusal::Revoked(c));
    }
    if height > a.expires_at {
        return Err(KeyRefusal::Expired(a.expires_at));
    }
    let available = a.available_to(node)?;
    if available == 0 {
        return Err(KeyRefusal::Exhausted);
    }
    Ok(available)
}

/// The public key of a signing key (re-exported for key issuers).
pub fn owner_public_key(key: &SigningKey) -> PublicKey {
    public_key_of(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{address, key};
    use proptest::prelude::*;

    fn allowance(cap: Amount, node_caps: Vec<NodeCap>) -> Allowance {
        let k = key(1);
        Allowance {
            owner: address(&k),
            owner_public_key: public_key_of(&k),
            cap,
            spent: 0,
            node_caps,
            node_spent: vec![],
            opened_at: 1,
            expires_at: 100,
            closed_at: None,
            settled_requests: 0,
        }
    }

    #[test]
    fn api_key_round_trips_and_binds_chain_and_allowance() {
        let k = key(1);
        let key_ = ApiKey::issue("blyan-devnet", &k, [7; 32], 3);
        let s = key_.to_key_string();
        assert_eq!(s.len(), API_KEY_PREFIX.len() + 200);
        assert!(!s.contains(' '));
        let parsed = ApiKey::parse(&s).unwrap();
        assert_eq!(parsed, key_);
        assert!(parsed.verify("blyan-devnet", &public_key_of(&k)));
        // API-KEY-2: another chain, another owner, another grant: no.
        assert!(!parsed.verify("blyan-other", &public_key_of(&k)));
        assert!(!parsed.verify("blyan-devnet", &public_key_of(&key(2))));
        let mut other = parsed;
        other.grant.key_index = 4;
        assert!(!other.verify("blyan-devnet", &public_key_of(&k)));
        assert_ne!(other.id(), parsed.id());
    }

    #[test]
    fn malformed_keys_are_refused_with_a_reason() {
        let good = ApiKey::issue("c", &key(1), [1; 32], 0).to_key_string();
        for bad in [
            String::new(),
            "sk-abc".to_string(),
            good[..good.len() - 2].to_string(),
            format!("{good}00"),
            good.to_uppercase().replace("BLYK1_", "blyk1_"),
            good.replace('a', "g"),
        ] {
            if bad == good {
                continue;
            }
            assert!(
                matches!(ApiKey::parse(&bad), Err(KeyRefusal::Malformed(_))),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn authorize_refuses_revoked_expired_exhausted_and_unlisted() {
        let k = key(1);
        let node = address(&key(9));
        let key_ = ApiKey::issue("c", &k, [1; 32], 0);
        let mut a = allowance(1_000, vec![]);
        assert_eq!(authorize("c", &key_, Some(&a), &node, 100), Ok(1_000));
        assert_eq!(
            authorize("c", &key_, Some(&a), &node, 101),
            Err(KeyRefusal::Expired(100))
        );
        assert_eq!(
            authorize("c", &key_, None, &node, 5),
            Err(KeyRefusal::UnknownAllowance)
        );
        assert_eq!(
            authorize("d", &key_, Some(&a), &node, 5),
            Err(KeyRefusal::BadSignature)
        );
        a.charge(node, 1_000);
        assert_eq!(
            authorize("c", &key_, Some(&a), &node, 5),
            Err(KeyRefusal::Exhausted)
        );
        let mut b = allowance(1_000, vec![NodeCap { node, cap: 10 }]);
        assert_eq!(authorize("c", &key_, Some(&b), &node, 5), Ok(10));
        let other = address(&key(8));
        assert_eq!(
            authorize("c", &key_, Some(&b), &other, 5),
            Err(KeyRefusal::NodeNotAllowed(other))
        );
        b.closed_at = Some(4);
        assert_eq!(
            authorize("c", &key_, Some(&b), &node, 5),
            Err(KeyRefusal::Revoked(4))
        );
        assert_eq!(b.end(), 4);
        assert_eq!(b.release_at(10), 15);
    }

    #[test]
    fn terms_are_checked() {
        let n = |i| address(&key(i));
        let ok = AllowanceTerms {
            cap: 10,
            node_caps: vec![],
            expires_at: 50,
        };
        assert_eq!(check_terms(&ok, 10, 100), Ok(()));
        let mut t = ok.clone();
        t.cap = 0;
        assert!(check_terms(&t, 10, 100).is_err());
        let mut t = ok.clone();
        t.expires_at = 9;
        assert!(check_terms(&t, 10, 100).is_err());
        assert!(check_terms(&ok, 10, 30).is_err());
        let mut caps = vec![
            NodeCap { node: n(1), cap: 5 },
            NodeCap { node: n(2), cap: 5 },
        ];
        caps.sort_by_key(|c| c.node);
        let mut t = ok.clone();
        t.node_caps = caps.clone();
        assert_eq!(check_terms(&t, 10, 100), Ok(()));
        t.node_caps.reverse();
        assert!(check_terms(&t, 10, 100).is_err());
        let mut t = ok.clone();
        t.node_caps = vec![NodeCap {
            node: n(1),
            cap: 11,
        }];
        assert!(check_terms(&t, 10, 100).is_err());
    }

    #[test]
    fn price_rounds_up() {
        assert_eq!(price(1000, 1_000), 1_000);
        assert_eq!(price(1, 1_000), 1);
        assert_eq!(price(1, 1_001), 2);
        assert_eq!(price(0, 5), 0);
    }

    proptest! {
        /// ALW-6: the split sums to the total exactly, and no share is more
        /// than one unit away from proportional, except the first, which
        /// takes the rounding remainder (less than the route length).
        #[test]
        fn split_is_exact_and_proportional(
            total in 0u128..(1u128 << 100),
            works in proptest::collection::vec(1u64..1_000_000, 1..MAX_ROUTE_NODES),
        ) {
            let route: Vec<RouteShare> = works
                .iter()
                .enumerate()
                .map(|(i, w)| RouteShare { node: Address([i as u8; 20]), work: *w })
                .collect();
            let parts = split(total, &route);
            prop_assert_eq!(parts.iter().map(|p| p.1).sum::<u128>(), total);
            let sum: u128 = works.iter().map(|w| u128::from(*w)).sum();
            for (i, (_, p)) in parts.iter().enumerate() {
                let exact = mul_div(total, u128::from(works[i]), sum);
                if i == 0 {
                    prop_assert!(*p >= exact && *p - exact < works.len() as u128);
                } else {
                    prop_assert_eq!(*p, exact);
                }
            }
        }
    }
}
