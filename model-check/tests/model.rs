//! The model checker's own tests (spec/consensus.md CONS-MC-*): the pinned
//! state counts of the CI configurations, the exactness of reduction R2, the
//! tightness of the f < n/3 bound, and the mutants, each of which must
//! produce a counterexample found by search.
//!
//! The exhaustive tests run in release builds only (`tests/run` has a release
//! stage): unoptimised, stateright's search is orders of magnitude slower.

use blyan_model_check::{ModelConfig, Strategy, model};
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
/// exhaustively; the pinned count catches any change that silently shrinks
/// (or grows) the explored space.
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_4_ci_configuration_is_safe_and_live_exhaustively() {
    assert_eq!(exhaustive(ModelConfig::ci()), CI_UNIQUE_STATES);
}

#[cfg(not(debug_assertions))]
const CI_UNIQUE_STATES: usize = 988_773;

/// CONS-MC-4: the CI configuration with a crash-restart (`ModelConfig::ci_crash`).
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_4_ci_crash_configuration_is_safe_and_live_exhaustively() {
    assert_eq!(exhaustive(ModelConfig::ci_crash()), CI_CRASH_UNIQUE_STATES);
}

#[cfg(not(debug_assertions))]
const CI_CRASH_UNIQUE_STATES: usize = 1_899_664;

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
    let c = ModelConfig {
        mutant: Mutant::HalfQuorum,
        timers: false,
        ..cfg(1, 0, 1, 0)
    };
    assert_eq!(bfs_violation(c), Some("agreement"));
}

#[test]
fn cons_mc_3_mutant_ignore_lock_is_caught() {
    // Round 0: honest proposer 0 gets some validators locked; round 1: the
    // Byzantine proposer 1 offers new values that locked validators must refuse.
    let c = ModelConfig {
        mutant: Mutant::IgnoreLock,
        strategy: Strategy::Swing,
        ..cfg(1, 1, 2, 0)
    };
    // Two rounds with timers are too large for exhaustive search in test
    // time; stateright's seeded random walks find the violation at once.
    let checker = model(c)
        .for_simulation()
        .checker()
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_simulation(1, stateright::UniformChooser)
        .join();
    assert!(checker.discovery("agreement").is_some());
}

/// Release only: the search covers part of a million-state space.
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_3_mutant_forget_votes_after_crash_is_caught() {
    // Found by search in the CI crash space: the swing validator precommits
    // one story's value, crashes, and after the restart (its records lost)
    // helps a quorum for the other story's value.
    let c = ModelConfig {
        mutant: Mutant::ForgetVotes,
        ..ModelConfig::ci_crash()
    };
    let checker = model(c)
        .checker()
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_dfs()
        .join();
    assert!(checker.discovery("agreement").is_some());
}
