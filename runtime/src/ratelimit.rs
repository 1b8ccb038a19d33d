//! API rate limits (seed appendix C, API-RATE-*): GCRA limiters from
//! `governor`, one keyed by client IP address for public callers and one keyed
//! by token for callers holding a token from `POST /p2p/register`.
//!
//! - **API-RATE-1** A request without a token counts against its client IP:
//!   [`RateLimitConfig::public_per_min`] (100) per minute, in bursts of at most
//!   that many. A request with `Authorization: Bearer <token>` counts against
//!   the token: [`RateLimitConfig::token_per_min`] (1,000). Tokens listed in
//!   [`RateLimitConfig::unlimited_tokens`] (the seed's "enterprise" tier) are
//!   not limited. A limit of 0 disables that tier's limit.
//! - **API-RATE-2** Over the limit: `429` with `Retry-After` (whole seconds,
//!   rounded up) and the JSON error body. An unknown token: `401`. `/health`
//!   and `/metrics` are never limited (monitoring must see an overloaded node).
//! - **API-RATE-3** Memory is bounded: when more than
//!   [`RateLimitConfig::max_tracked_keys`] keys are tracked, keys whose
//!   state has fully recovered are dropped (`retain_recent`); if still full,
//!   limited requests are refused (`503`) rather than tracked, until keys
//!   recover. (governor cannot ask whether a key is known without counting
//!   it, so a full table refuses known and new keys alike.)
//! - **API-RATE-4** A client address counts as its source
//!   ([`crate::inbound::source_key`]): an IPv4 address as is (an
//!   IPv4-mapped IPv6 address as its IPv4 address), an IPv6 address by its
//!   /64, so rotating addresses inside one's prefix gains no quota.
//! - **API-RATE-5** A request whose `Authorization` header is malformed or
//!   names an unknown token counts against its client address first: over
//!   the limit it is `429`, else `401`. Guessing tokens costs quota.
//! - **API-RATE-6** Behind a reverse proxy: when the connection comes from
//!   an address in [`RateLimitConfig::trusted_proxies`] (IP addresses or
//!   CIDR blocks; empty by default, so the header is never trusted), the
//!   client address is taken from `X-Forwarded-For`: the rightmost entry
//!   not itself a trusted proxy, walking right to left and stopping at an
//!   entry that does not parse (the hop before it is then the client).
//!
//! The authenticated tier (`token_per_min`) belongs to valid API keys whose
//! allowance has funds for this node (spec/api.md API-KEY-3); a token from
//! `POST /p2p/register` no longer raises a caller's limit, and an exhausted
//! key counts against its address.

use crate::inbound::source_key;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

/// `[api]` rate-limit settings.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Requests per minute per client IP without a token (0: unlimited).
    pub public_per_min: u32,
    /// Requests per minute per registered token (0: unlimited).
    pub token_per_min: u32,
    /// Operator-issued tokens that are never limited.
    pub unlimited_tokens: Vec<String>,
    /// Most keys (IPs plus tokens) tracked at once.
    pub max_tracked_keys: usize,
    /// API-RATE-6: reverse proxies (`"10.0.0.1"`, `"10.0.0.0/8"`,
    /// `"fd00::/8"`) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            public_per_min: 100,
            token_per_min: 1_000,
            unlimited_tokens: Vec::new(),
            max_tracked_keys: 100_000,
            trusted_proxies: Vec::new(),
        }
    }
}

/// An address block: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_bits: u8,
}

impl Cidr {
    /// `"ip"` or `"ip/bits"`.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|e| format!("trusted proxy {s:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_bits = match bits {
            None => max,
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("trusted proxy {s:?}: prefix must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix_bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let canonical = |ip: IpAddr| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let bits = u32::from(self.prefix_bits);
        match (canonical(self.addr), canonical(ip)) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

impl RateLimitConfig {
    /// Every trusted proxy parses (API-RATE-6).
    pub fn validate(&self) -> Result<(), String> {
        self.trusted_proxies
            .iter()
            .try_for_each(|p| Cidr::parse(p).map(|_| ()))
    }
}

impl RateLimitConfig {
    /// No limits at all (load benchmarks).
    pub fn unlimited() -> Self {
        RateLimitConfig {
            public_per_min: 0,
            token_per_min: 0,
            ..RateLimitConfig::default()
        }
    }
}

/// Who is calling, as far as limits are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Public(IpAddr),
    /// A valid API key with funds, by its id (API-KEY-5: SHA3-256 of the key).
    Token([u8; 32]),
    Unlimited,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over the limit; retry after this long.
    Limited { retry_after: Duration },
    /// Too many distinct keys tracked (API-RATE-3).
    Saturated,
}

/// The two limiters. Shared by every API connection.
pub struct Limits {
    public: Option<DefaultKeyedRateLimiter<IpAddr>>,
    token: Option<DefaultKeyedRateLimiter<[u8; 32]>>,
    unlimited: BTreeSet<String>,
    max_tracked_keys: usize,
    trusted_proxies: Vec<Cidr>,
}

fn limiter<K: Clone + Eq + std::hash::Hash>(per_min: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_min).map(|n| RateLimiter::dashmap(Quota::per_minute(n)))
}

impl Limits {
    pub fn new(config: &RateLimitConfig) -> Limits {
        assert!(config.max_tracked_keys > 0, "rate limiter must track a key");
        Limits {
            public: limiter(config.public_per_min),
            token: limiter(config.token_per_min),
            unlimited: config.unlimited_tokens.iter().cloned().collect(),
            max_tracked_keys: config.max_tracked_keys,
            trusted_proxies: config
                .trusted_proxies
                .iter()
                .filter_map(|p| match Cidr::parse(p) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "trusted proxy ignored");
                        None
                    }
                })
                .collect(),
        }
    }

    /// API-RATE-6: the client's address, given the connection's `peer` and
    /// the `X-Forwarded-For` values (comma-separated, in order).
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let trusted = |ip: IpAddr| self.trusted_proxies.iter().any(|c| c.contains(ip));
        let mut client = peer;
        let Some(hops) = forwarded_for else {
            return client;
        };
        for hop in hops.rsplit(',') {
            if !trusted(client) {
                break;
            }
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => client = ip,
                Err(_) => break,
            }
        }
        client
    }

    /// Whether `token` is one of the operator's unlimited tokens.
    pub fn is_unlimited_token(&self, token: &str) -> bool {
        self.unlimited.contains(token)
    }

    fn tracked(&self) -> usize {
        self.public.as_ref().map_or(0, |l| l.len()) + self.token.as_ref().map_or(0, |l| l.len())
    }

    /// API-RATE-1/3: counts one request of `caller`.
    pub fn check(&self, caller: &Caller) -> Result<(), Refusal> {
        if self.tracked() >= self.max_tracked_keys {
            if let Some(l) = &self.public {
                l.retain_recent();
            }
            if let Some(l) = &self.token {
                l.retain_recent();
            }
        }
        let saturated = self.tracked() >= self.max_tracked_keys;
        let clock = governor::clock::DefaultClock::default();
        let outcome = match caller {
            Caller::Unlimited => return Ok(()),
            Caller::Public(ip) => match &self.public {
                None => return Ok(()),
                Some(_) if saturated => return Err(Refusal::Saturated),
                // API-RATE-4: by source (IPv6 by /64).
                Some(l) => l.check_key(&source_key(*ip)),
            },
            Caller::Token(t) => match &self.token {
                None => return Ok(()),
                Some(_) if saturated => return Err(Refusal::Saturated),
                Some(l) => l.check_key(t),
            },
        };
        outcome.map_err(|not_until| Refusal::Limited {
            retry_after: not_until.wait_time_from(governor::clock::Clock::now(&clock)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Caller {
        Caller::Public(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn api_rate_1_public_callers_get_their_quota_then_429() {
        let limits = Limits::new(&RateLimitConfig::default());
        for i in 0..100 {
            assert_eq!(limits.check(&ip(1)), Ok(()), "request {i}");
        }
        let Err(Refusal::Limited { retry_after }) = limits.check(&ip(1)) else {
            panic!("the 101st request in a minute must be limited");
        };
        // One request's worth of a 100/min quota is 600 ms.
        assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_millis(600));
        // Another client is not affected.
        assert_eq!(limits.check(&ip(2)), Ok(()));
    }

    #[test]
    fn api_rate_1_tokens_get_the_higher_quota_and_unlimited_tokens_none() {
        let limits = Limits::new(&RateLimitConfig {
            unlimited_tokens: vec!["ops".into()],
            ..RateLimitConfig::default()
        });
        let t = Caller::Token([7; 32]);
        for i in 0..1_000 {
            assert_eq!(limits.check(&t), Ok(()), "request {i}");
        }
        assert!(matches!(limits.check(&t), Err(Refusal::Limited { .. })));
        assert!(limits.is_unlimited_token("ops"));
        assert!(!limits.is_unlimited_token("other"));
        for _ in 0..5_000 {
            assert_eq!(limits.check(&Caller::Unlimited), Ok(()));
        }
    }

    /// API-RATE-4 (issue 18 item 10): IPv6 clients are limited per /64, so
    /// rotating addresses inside one's prefix gains nothing.
    #[test]
    fn api_rate_4_ipv6_clients_share_their_64() {
        let limits = Limits::new(&RateLimitConfig::default());
        let v6 = |last: u16| Caller::Public(IpAddr::from([0x2001, 0xdb8, 1, 2, 0, 0, 0, last]));
        for i in 0..100 {
            assert_eq!(limits.check(&v6(i)), Ok(()), "request {i}");
        }
        assert!(
            matches!(limits.check(&v6(1000)), Err(Refusal::Limited { .. })),
            "a fresh address in the same /64"
        );
        let other = Caller::Public(IpAddr::from([0x2001, 0xdb8, 1, 3, 0, 0, 0, 1]));
        assert_eq!(limits.check(&other), Ok(()), "another /64");
        // An IPv4-mapped address counts as its IPv4 address.
        for _ in 0..100 {
            assert_eq!(limits.check(&ip(9)), Ok(()));
        }
        let mapped = Caller::Public(IpAddr::V6(
            std::net::Ipv4Addr::new(10, 0, 0, 9).to_ipv6_mapped(),
        ));
        assert!(matches!(
            limits.check(&mapped),
            Err(Refusal::Limited { .. })
        ));
    }

    #[test]
    fn api_rate_6_forwarded_for_is_believed_only_from_trusted_proxies() {
        let v4 = |d: u8| IpAddr::from([203, 0, 113, d]);
        let none = Limits::new(&RateLimitConfig::default());
        assert_eq!(
            none.client_ip(v4(1), Some("198.51.100.7")),
            v4(1),
            "not opted in"
        );
        let limits = Limits::new(&RateLimitConfig {
            trusted_proxies: vec!["203.0.113.0/30".into(), "2001:db8::1".into()],
            ..RateLimitConfig::default()
        });
        let client = IpAddr::from([198, 51, 100, 7]);
        assert_eq!(limits.client_ip(v4(1), Some("198.51.100.7")), client);
        // Through two trusted proxies; a spoofed leftmost entry is ignored.
        assert_eq!(
            limits.client_ip(v4(1), Some("1.2.3.4, 198.51.100.7, 203.0.113.2")),
            client
        );
        // From an untrusted peer the header is ignored.
        assert_eq!(limits.client_ip(v4(9), Some("198.51.100.7")), v4(9));
        // No header, or garbage: the proxy itself.
        assert_eq!(limits.client_ip(v4(1), None), v4(1));
        assert_eq!(limits.client_ip(v4(1), Some("junk")), v4(1));
        let v6_proxy: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(limits.client_ip(v6_proxy, Some("198.51.100.7")), client);
        // An IPv4-mapped peer matches its IPv4 block.
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(203, 0, 113, 1).to_ipv6_mapped());
        assert_eq!(limits.client_ip(mapped, Some("198.51.100.7")), client);
        assert!(
            RateLimitConfig {
                trusted_proxies: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            RateLimitConfig {
                trusted_proxies: vec!["nope".into()],
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            RateLimitConfig {
                trusted_proxies: vec!["::/0".into(), "0.0.0.0/0".into()],
                ..Default::default()
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn api_rate_1_zero_disables_a_tier() {
        let limits = Limits::new(&RateLimitConfig::unlimited());
        for _ in 0..1_000 {
            assert_eq!(limits.check(&ip(1)), Ok(()));
        }
    }

    #[test]
    fn api_rate_3_tracked_keys_are_bounded() {
        let limits = Limits::new(&RateLimitConfig {
            max_tracked_keys: 3,
            ..RateLimitConfig::default()
        });
        for last in 1..=3 {
            assert_eq!(limits.check(&ip(last)), Ok(()));
        }
        // The three keys have not recovered (each used one request just now),
        // so the table stays full and limited requests are refused.
        assert_eq!(limits.check(&ip(4)), Err(Refusal::Saturated));
        assert_eq!(limits.check(&ip(1)), Err(Refusal::Saturated));
        // Unlimited callers are never tracked, so never refused.
        assert_eq!(limits.check(&Caller::Unlimited), Ok(()));
    }
}
