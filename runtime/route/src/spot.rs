//! Spot checks: which steps are recomputed, by whom, and how a mismatch is
//! settled (spec/inference.md, RT-SPOT-*).
//!
//! - **RT-SPOT-1** Step `position` of stage `stage` of request
//!   `request_id` is checked iff `u64_be(SHA3-256("blyan/spot-check/1" ‖ key
//!   ‖ request_id ‖ stage (u32 BE) ‖ position (u64 BE))[0..8]) mod 10⁶ <
//!   rate_ppm` (default 50,000 = 0.05). `key` is the router's 32-byte secret
//!   (fresh per router start, never sent to stages), so a stage cannot tell
//!   which of its steps will be checked; the decision is reproducible by
//!   whoever holds the key (the modulo bias is below 10⁻¹³).
//! - **RT-SPOT-2** The checker, and the referee of a mismatch, is the
//!   eligible holder (RT-ROUTE-1) of the stage's layers, other than the
//!   excluded nodes (the checked node; for the referee the checker too),
//!   with the least `SHA3-256("blyan/spot-peer/1" ‖ key ‖ request_id ‖
//!   position (u64 BE) ‖ role (u8: 0 checker, 1 referee) ‖ address)`; a
//!   router holding the layers may check locally instead. Stages cannot
//!   predict or choose who checks them.
//! - **RT-SPOT-3** The stage's and the checker's commitments to the step
//!   (RT-COMMIT-2) are compared (RT-COMMIT-3). If they match, nothing
//!   happens.
//! - **RT-SPOT-4** A mismatch is settled by a third computation (the
//!   referee's) before anyone is quarantined, by majority: the referee
//!   matches the stage and not the checker → the checker is at fault;
//!   matches the checker and not the stage → the stage is at fault; matches
//!   both or neither → undecided, nobody is quarantined (the fault record
//!   is kept). So one lying checker cannot quarantine an honest stage:
//!   that takes a dishonest checker and a dishonest referee, both drawn by
//!   RT-SPOT-2.
//! - **RT-SPOT-5** The loser is quarantined (RT-QUAR-1) and a fault record
//!   is signed (RT-FAULT-1).

use crate::PPM;
use crate::commit::{ChunkCommitment, Tolerance, compare};
use blyan_state_machine::crypto::sha3_256_parts;
use blyan_state_machine::types::{Address, Hash32};

/// RT-SPOT-1: default probability of checking a step, ppm.
pub const DEFAULT_SPOT_CHECK_RATE_PPM: u32 = 50_000;

/// RT-SPOT-1: whether the step is checked.
pub fn should_check(
    key: &[u8; 32],
    request_id: &Hash32,
    stage: u32,
    position: u64,
    rate_ppm: u32,
) -> bool {
    let h = sha3_256_parts(&[
        b"blyan/spot-check/1",
        key,
        request_id,
        &stage.to_be_bytes(),
        &position.to_be_bytes(),
    ]);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    u64::from_be_bytes(first) % u64::from(PPM) < u64::from(rate_ppm)
}

/// RT-SPOT-2: who checks (role 0) or referees (role 1) a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Checker = 0,
    Referee = 1,
}

/// RT-SPOT-2: picks among `holders` (eligible holders of the stage's
/// layers), skipping `exclude`.
pub fn choose_peer(
    key: &[u8; 32],
    request_id: &Hash32,
    position: u64,
    role: Role,
    holders: &[Address],
    exclude: &[Address],
) -> Option<Address> {
    holders
        .iter()
        .filter(|a| !exclude.contains(a))
        .map(|a| {
            let h = sha3_256_parts(&[
                b"blyan/spot-peer/1",
                key,
                request_id,
                &position.to_be_bytes(),
                &[role as u8],
                &a.0,
            ]);
            (h, *a)
        })
        .min()
        .map(|(_, a)| a)
}

/// RT-SPOT-3, RT-SPOT-4: the outcome of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// The stage and the checker agree.
    Agree,
    /// The referee sided with the checker: the stage loses.
    StageFault,
    /// The referee sided with the stage: the checker loses.
    CheckerFault,
    /// The referee matched both or neither: nobody is quarantined.
    Undecided,
}

/// RT-SPOT-3: the first comparison; `None` means a referee is needed.
pub fn first_comparison(
    stage: &ChunkCommitment,
    checker: &ChunkCommitment,
    tol: Tolerance,
) -> Option<Settlement> {
    compare(stage, checker, tol)
        .matches
        .then_some(Settlement::Agree)
}

/// RT-SPOT-3, RT-SPOT-4: the settlement of a check with the referee's
/// commitment to the same step.
pub fn settle(
    stage: &ChunkCommitment,
    checker: &ChunkCommitment,
    referee: &ChunkCommitment,
    tol: Tolerance,
) -> Settlement {
    if let Some(s) = first_comparison(stage, checker, tol) {
        return s;
    }
    let with_stage = compare(referee, stage, tol).matches;
    let with_checker = compare(referee, checker, tol).matches;
    match (with_stage, with_checker) {
        (true, false) => Settlement::CheckerFault,
        (false, true) => Settlement::StageFault,
        _ => Settlement::Undecided,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rt_spot_1_rate_is_respected_and_keyed() {
        let key = [7u8; 32];
        let req = [1u8; 32];
        let n = 40_000u64;
        let hits = (0..n)
            .filter(|p| should_check(&key, &req, 0, *p, 50_000))
            .count() as u64;
        // 5 % of 40,000 = 2,000; sd ≈ 44: ±300 is > 6 sd.
        assert!((1_700..=2_300).contains(&hits), "{hits}");
        assert!((0..1000).all(|p| !should_check(&key, &req, 0, p, 0)));
        assert!((0..1000).all(|p| should_check(&key, &req, 0, p, PPM)));
        // Another key checks other steps.
        let a: Vec<u64> = (0..2000)
            .filter(|p| should_check(&key, &req, 0, *p, 50_000))
            .collect();
        let b: Vec<u64> = (0..2000)
            .filter(|p| should_check(&[8u8; 32], &req, 0, *p, 50_000))
            .collect();
        assert_ne!(a, b);
    }

    #[test]
    fn rt_spot_2_peer_choice_excludes_and_is_deterministic() {
        let holders: Vec<Address> = (1..=5u8).map(|i| Address([i; 20])).collect();
        let key = [3u8; 32];
        let req = [4u8; 32];
        let c = choose_peer(&key, &req, 9, Role::Checker, &holders, &[holders[0]]).unwrap();
        assert_ne!(c, holders[0]);
        assert_eq!(
            Some(c),
            choose_peer(&key, &req, 9, Role::Checker, &holders, &[holders[0]])
        );
        let r = choose_peer(&key, &req, 9, Role::Referee, &holders, &[holders[0], c]).unwrap();
        assert!(r != c && r != holders[0]);
        assert_eq!(
            choose_peer(&key, &req, 9, Role::Checker, &holders[..1], &holders[..1]),
            None
        );
        // Over many steps every eligible holder is chosen sometimes.
        let mut seen = std::collections::BTreeSet::new();
        for p in 0..200 {
            seen.insert(
                choose_peer(&key, &req, p, Role::Checker, &holders, &[holders[0]]).unwrap(),
            );
        }
        assert_eq!(seen.len(), 4);
    }
}
