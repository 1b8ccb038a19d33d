//! Beacon checks: requests a router makes up itself to check the nodes it
//! routes to when no client request was drawn (spec/inference.md,
//! RT-BEACON-*; seed §6.2).
//!
//! - **RT-BEACON-1** Beacon `n` of a router is derived from the router's
//!   32-byte secret (the spot-check key, RT-SPOT-1: fresh per start, never
//!   sent) and `n`: `seed = SHA3-256("blyan/beacon/1" ‖ key ‖ n (u64 BE))`
//!   seeds a SplitMix64 stream (its first 8 bytes, big-endian) that draws
//!   every choice below in order, so beacons are fresh for every router
//!   and start yet reproducible by whoever holds the key.
//! - **RT-BEACON-2** Its prompt is a passage of a text the caller supplies
//!   (the node: the corpus's holdout part, never used for training or
//!   validation): 1 to 3 consecutive non-empty lines from a drawn line;
//!   its `max_tokens` is drawn in 8..=48, its sampling seed is drawn, and
//!   it is greedy half the time, else temperature 0.7. A stage sees only a
//!   request like any other: a prompt of ordinary text, the same step
//!   shapes and request ids from the same generator, so it cannot tell a
//!   beacon from traffic. Never a fixed input a node could learn.
//! - **RT-BEACON-3** Beacon `n + 1` is made `delay(n)` after beacon `n`
//!   ends: `interval / 2` plus a draw uniform in `0..=interval` ms (from
//!   `SHA3-256("blyan/beacon-delay/1" ‖ key ‖ n)`), so beacons arrive at no
//!   fixed period.
//! - **RT-BEACON-4** A beacon targets one live holder of the model: the
//!   `target`-th (a drawn `u64`, modulo their number) of the nodes with a
//!   dense holding of it, in address order. It is routed as a client
//!   request would be except that the other holders of the target's layer
//!   range are left out of the plan (if that leaves no route, the normal
//!   plan is used), so that over time every holder is checked, not only
//!   those this router's plans prefer; it is always checked (RT-PIPE-7 for
//!   a pipeline, RT-STAGE-6 for one remote holder); a route served by the
//!   router's own engine is not checked.

use crate::rng::SplitMix64;
use blyan_state_machine::crypto::sha3_256_parts;

/// RT-BEACON-2: the most lines one beacon prompt takes.
pub const MAX_PROMPT_LINES: u64 = 3;
/// RT-BEACON-2: the range of `max_tokens`.
pub const MIN_MAX_TOKENS: u64 = 8;
pub const MAX_MAX_TOKENS: u64 = 48;

/// RT-BEACON-2: a beacon request's content.
#[derive(Clone, Debug, PartialEq)]
pub struct Beacon {
    pub prompt: String,
    pub max_tokens: usize,
    /// `0.0` (greedy) or `0.7`.
    pub temperature: f32,
    pub seed: u64,
    /// RT-BEACON-4: which live holder it targets (modulo their number).
    pub target: u64,
}

fn stream(key: &[u8; 32], n: u64) -> SplitMix64 {
    let h = sha3_256_parts(&[b"blyan/beacon/1", key, &n.to_be_bytes()]);
    SplitMix64::new(u64::from_be_bytes(h[..8].try_into().expect("8 bytes")))
}

/// RT-BEACON-1/2: beacon `n` of the router with secret `key`, its prompt
/// from `text`; `None` if `text` has no non-empty line.
pub fn beacon(key: &[u8; 32], n: u64, text: &str) -> Option<Beacon> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return None;
    }
    let mut rng = stream(key, n);
    let first = rng.below(lines.len() as u64) as usize;
    let take = 1 + rng.below(MAX_PROMPT_LINES) as usize;
    let prompt = lines[first..(first + take).min(lines.len())].join(" ");
    let max_tokens = (MIN_MAX_TOKENS + rng.below(MAX_MAX_TOKENS - MIN_MAX_TOKENS + 1)) as usize;
    let temperature = if rng.below(2) == 0 { 0.0 } else { 0.7 };
    let seed = rng.next_u64();
    let target = rng.next_u64();
    Some(Beacon {
        prompt,
        max_tokens,
        temperature,
        seed,
        target,
    })
}

/// RT-BEACON-3: the wait after beacon `n` before the next, ms.
pub fn delay_ms(key: &[u8; 32], n: u64, interval_ms: u64) -> u64 {
    let h = sha3_256_parts(&[b"blyan/beacon-delay/1", key, &n.to_be_bytes()]);
    let mut r = SplitMix64::new(u64::from_be_bytes(h[..8].try_into().expect("8 bytes")));
    interval_ms / 2 + r.below(interval_ms.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "Alice was beginning to get very tired\n\nof sitting by her sister\non the bank, and of having nothing to do:\nonce or twice she had peeped into the book\n";

    #[test]
    fn rt_beacon_1_2_beacons_are_passages_fresh_per_key_and_reproducible() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let lines: Vec<&str> = TEXT.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut prompts = std::collections::BTreeSet::new();
        for n in 0..64 {
            let x = beacon(&a, n, TEXT).unwrap();
            assert_eq!(x, beacon(&a, n, TEXT).unwrap(), "reproducible");
            // 1..=3 consecutive lines of the text.
            assert!(
                (0..lines.len()).any(|i| (1..=3)
                    .any(|k| { i + k <= lines.len() && lines[i..i + k].join(" ") == x.prompt })),
                "{:?}",
                x.prompt
            );
            assert!((8..=48).contains(&x.max_tokens));
            assert!(x.temperature == 0.0 || x.temperature == 0.7);
            prompts.insert(x.prompt.clone());
        }
        assert!(prompts.len() > 4, "beacons vary: {prompts:?}");
        // Another router's beacons differ.
        let differ = (0..16)
            .filter(|&n| beacon(&a, n, TEXT) != beacon(&b, n, TEXT))
            .count();
        assert!(differ >= 12, "{differ} of 16 differ");
        assert_eq!(beacon(&a, 0, "\n  \n"), None);
    }

    #[test]
    fn rt_beacon_3_delays_vary_within_half_to_one_and_a_half_intervals() {
        let key = [3u8; 32];
        let delays: Vec<u64> = (0..200).map(|n| delay_ms(&key, n, 1_000)).collect();
        assert!(delays.iter().all(|d| (500..=1_500).contains(d)));
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 100);
        assert_eq!(delay_ms(&key, 7, 0), 0);
    }
}
