//! The model checker's own tests (spec/consensus.md CONS-MC-*): the pinned
//! state counts of the CI configurations, the exactness of reduction R2, the
//! tightness of the f < n/3 bound, and the mutants, each of which must
//! produce a counterexample found by search.
//!
//! The exhaustive tests run in release builds only (`tests/run` has a release
//! stage): unoptimised, stateright's search is orders of magnitude slower.

use blyan_model_check::{ModelConfig, model};
use blyan_state_machine::consensus::Mutant;
use stateright::Model as _;
use stateright::{Checker, HasDiscoveries};

fn cfg(byzantine: usize, first_byzantine: usize, rounds: u32, crashes: usize) -> ModelConfig {
    ModelConfig {
        byzantine,
        first_byzantine,
        rounds,
        max_crashes: crashes,
        ..ModelConfig::ci()
    }
}

/// Breadth-first until the first property failure: the shortest
/// counterexample. The searches turn timers off where the counterexample
/// needs none (it removes most of the branching).
fn bfs_violation(cfg: ModelConfig) -> Option<&'static str> {
    let checker = model(cfg)
        .checker()
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_bfs()
        .join();
    ["agreement", "validity"]
        .into_iter()
        .find(|name| checker.discovery(name).is_some())
}

/// Exhaustive depth-first check: properties hold, and the unique state count.
#[cfg(not(debug_assertions))]
fn exhaustive(cfg: ModelConfig) -> usize {
    let checker = model(cfg).checker().spawn_dfs().join();
    checker.assert_properties();
    checker.unique_state_count()
}

/// CONS-MC-4: the CI configuration (see `ModelConfig::ci`), checked
/// exhaustively with reduction R5; the pinned count catches any change that
/// silently shrinks (or grows) the explored space. Without R5 the same space
/// is explored by `cons_mc_1_r5_is_exact_on_the_ci_configuration`.
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_4_ci_configuration_is_safe_and_live_exhaustively() {
    let cfg = ModelConfig {
        defer_inert: true,
        ..ModelConfig::ci()
    };
    assert_eq!(exhaustive(cfg), CI_R5_STATES);
}

/// CONS-MC-4: the CI configuration with a crash-restart (`ModelConfig::ci_crash`).
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_4_ci_crash_configuration_is_safe_and_live_exhaustively() {
    let cfg = ModelConfig {
        defer_inert: true,
        ..ModelConfig::ci_crash()
    };
    assert_eq!(exhaustive(cfg), CI_CRASH_R5_STATES);
}

/// CONS-MC-4: two heights, exhaustively (`ModelConfig::ci_two_heights`):
/// the decision, the cleared records, the next height's validator set and
/// proposer, and validators at different heights at once; with timers and
/// a crash-restart.
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_4_two_heights_are_safe_and_live_exhaustively() {
    assert_eq!(
        exhaustive(ModelConfig::ci_two_heights()),
        TWO_HEIGHTS_R5_STATES
    );
}

/// CONS-MC-4: two heights with a crash-restart (`ModelConfig::ci_crash_two_heights`).
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_4_two_heights_with_a_crash_are_safe_and_live_exhaustively() {
    assert_eq!(
        exhaustive(ModelConfig::ci_crash_two_heights()),
        TWO_HEIGHTS_CRASH_R5_STATES
    );
}

/// CONS-MC-4: two rounds, exhaustively (`ModelConfig::two_rounds`, a
/// reduced configuration: only precommit timeouts fire): locks and valid
/// values carried into round 1, the Byzantine proposer's two stories there,
/// L28's re-proposal and round skips.
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_4_two_rounds_are_safe_and_live_exhaustively() {
    assert_eq!(exhaustive(ModelConfig::two_rounds()), TWO_ROUNDS_R5_STATES);
}

#[cfg(not(debug_assertions))]
const TWO_ROUNDS_R5_STATES: usize = 153_965;
#[cfg(not(debug_assertions))]
const CI_R5_STATES: usize = 26_633;
#[cfg(not(debug_assertions))]
const CI_CRASH_R5_STATES: usize = 4_161;
#[cfg(not(debug_assertions))]
const TWO_HEIGHTS_R5_STATES: usize = 530_709;
#[cfg(not(debug_assertions))]
const TWO_HEIGHTS_CRASH_R5_STATES: usize = 5_089;

/// Every state reachable from the initial states, depth-first, with its
/// properties checked; returns the number of states and the set of their
/// observable projections (fingerprints).
#[cfg(not(debug_assertions))]
fn reachable(cfg: ModelConfig) -> (usize, std::collections::HashSet<u64>) {
    use blyan_model_check::{agreement, observable, validity};
    use std::collections::HashSet;
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hash};
    fn fingerprint(x: impl Hash) -> u64 {
        let mut h = BuildHasherDefault::<DefaultHasher>::default().build_hasher();
        x.hash(&mut h);
        std::hash::Hasher::finish(&h)
    }
    let m = model(cfg);
    let mut seen = HashSet::new();
    let mut observed = HashSet::new();
    let mut stack = m.init_states();
    let mut actions = Vec::new();
    while let Some(state) = stack.pop() {
        if !seen.insert(fingerprint(&state)) {
            continue;
        }
        assert!(agreement(&m, &state) && validity(&m, &state));
        observed.insert(fingerprint(observable(&state)));
        m.actions(&state, &mut actions);
        for action in actions.drain(..) {
            stack.extend(m.next_state(&state, action));
        }
    }
    (seen.len(), observed)
}

/// CONS-MC-1 reduction R5 is exact on `cfg`: without and with it, the same
/// observable projections are reachable (everything but the received
/// messages and the network; every property reads only what is kept).
/// Returns the state counts (without, with) and the number of projections.
#[cfg(not(debug_assertions))]
fn r5_exact(cfg: ModelConfig) -> (usize, usize, usize) {
    let (full_states, full) = reachable(ModelConfig {
        defer_inert: false,
        ..cfg.clone()
    });
    let (reduced_states, reduced) = reachable(ModelConfig {
        defer_inert: true,
        ..cfg
    });
    assert_eq!(
        full.difference(&reduced).count(),
        0,
        "R5 lost an observable state"
    );
    assert_eq!(
        reduced.difference(&full).count(),
        0,
        "R5 reached a state the model cannot"
    );
    (full_states, reduced_states, full.len())
}

/// R5 on the CI configuration (one round, timers, Byzantine split brain):
/// this exploration without R5 is the old exhaustive CI check.
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_1_r5_is_exact_on_the_ci_configuration() {
    assert_eq!(r5_exact(ModelConfig::ci()), (988_773, CI_R5_STATES, 948));
}

/// R5 with a crash-restart (records restored, received messages lost).
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_1_r5_is_exact_with_a_crash() {
    assert_eq!(
        r5_exact(ModelConfig::ci_crash()),
        (1_899_664, CI_CRASH_R5_STATES, 721)
    );
}

/// R5 over two rounds (locks, valid values, L28's re-proposal, round skips)
/// with three honest validators, the largest two-round space that is
/// explored without R5 in CI time.
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_1_r5_is_exact_over_two_rounds() {
    let cfg = ModelConfig {
        validators: 3,
        byzantine: 0,
        first_byzantine: 0,
        rounds: 2,
        ..ModelConfig::ci()
    };
    assert_eq!(r5_exact(cfg), (277_107, 1_355, 1_251));
}

/// CONS-MC-1 reduction R2 is exact: on a configuration small enough to
/// explore every `Drop`, the reachable states with explicit losses and with
/// R2 agree on everything but the network (which no property and no
/// transition of an actor reads).
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_1_loss_as_never_delivered_is_exact() {
    use std::collections::HashSet;
    use std::hash::Hash;
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let fingerprint = |x: &dyn Fn(&mut DefaultHasher)| {
        let mut h = BuildHasherDefault::<DefaultHasher>::default().build_hasher();
        x(&mut h);
        std::hash::Hasher::finish(&h)
    };
    let small = ModelConfig {
        validators: 2,
        byzantine: 0,
        first_byzantine: 0,
        rounds: 1,
        max_crashes: 1,
        ..ModelConfig::ci()
    };
    let observable = |cfg: ModelConfig| {
        let m = model(cfg);
        let mut seen = HashSet::new();
        let mut observed = HashSet::new();
        let mut stack = m.init_states();
        let mut actions = Vec::new();
        while let Some(state) = stack.pop() {
            if !seen.insert(fingerprint(&|h| state.hash(h))) {
                continue;
            }
            observed.insert(fingerprint(&|h| {
                (
                    &state.actor_states,
                    &state.actor_storages,
                    &state.timers_set,
                    &state.history,
                )
                    .hash(h)
            }));
            m.actions(&state, &mut actions);
            for action in actions.drain(..) {
                stack.extend(m.next_state(&state, action));
            }
        }
        (seen.len(), observed)
    };
    let (reduced_states, reduced) = observable(small.clone());
    let (explicit_states, explicit) = observable(ModelConfig {
        explicit_loss: true,
        ..small
    });
    assert_eq!(
        (reduced_states, explicit_states),
        (LOSS_REDUCED_STATES, LOSS_EXPLICIT_STATES)
    );
    assert_eq!(reduced, explicit);
}

#[cfg(not(debug_assertions))]
const LOSS_REDUCED_STATES: usize = 237;
#[cfg(not(debug_assertions))]
const LOSS_EXPLICIT_STATES: usize = 4_984;

#[test]
fn cons_mc_2_one_third_byzantine_power_breaks_agreement() {
    // Two of four validators (half the power, ≥ 1/3) tell two stories as
    // round 0's proposer: each half of the honest validators decides its own.
    let c = ModelConfig {
        timers: false,
        ..cfg(2, 0, 1, 0)
    };
    assert_eq!(bfs_violation(c), Some("agreement"));
}

#[test]
fn cons_mc_3_mutant_half_quorum_is_caught() {
    // Depth-first in the two-height CI space (breadth-first, for the
    // shortest counterexample, passes 270,000 states: the weak quorums
    // multiply the decisions).
    let c = ModelConfig {
        mutant: Mutant::HalfQuorum,
        ..ModelConfig::ci_two_heights()
    };
    let checker = model(c)
        .checker()
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_dfs()
        .join();
    assert!(checker.discovery("agreement").is_some());
}

/// Release only: breadth-first passes 50,000 states.
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_3_mutant_ignore_lock_is_caught() {
    // Round 0: honest proposer 0 gets some validators locked; round 1: the
    // Byzantine proposer 1 offers new values that locked validators must
    // refuse. Breadth-first (the shortest counterexample) in the two-round
    // CI space, which without the mutant is checked safe exhaustively.
    let c = ModelConfig {
        mutant: Mutant::IgnoreLock,
        ..ModelConfig::two_rounds()
    };
    assert_eq!(bfs_violation(c), Some("agreement"));
}

#[test]
fn cons_mc_3_mutant_forget_votes_after_crash_is_caught() {
    // Found by search in the two-height crash space: the swing validator
    // precommits one story's value, crashes, and after the restart (its
    // records lost) helps a quorum for the other story's value.
    let c = ModelConfig {
        mutant: Mutant::ForgetVotes,
        ..ModelConfig::ci_crash_two_heights()
    };
    let checker = model(c)
        .checker()
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_dfs()
        .join();
    assert!(checker.discovery("agreement").is_some());
}
