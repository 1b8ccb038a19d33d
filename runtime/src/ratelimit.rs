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
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            public_per_min: 100,
            token_per_min: 1_000,
            unlimited_tokens: Vec::new(),
            max_tracked_keys: 100_000,
        }
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
    /// A registered token (its SHA3-256, so tokens are not kept in clear twice).
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
        }
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
                Some(l) => l.check_key(ip),
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
