//! The model checker's own tests (spec/consensus.md CONS-MC-*): the pinned
//! state count of the CI configuration, the tightness of the f < n/3 bound,
//! and the mutants, each of which must produce a counterexample.

use blyan_model_check::{Model, ModelConfig, Msg, Strategy, address, byzantine_value, model};
use blyan_state_machine::consensus::{Message, Mutant, TimeoutKind, ValueId, VoteType};
use stateright::actor::{ActorModelAction, Id};
use stateright::{Checker, HasDiscoveries, Model as _};

type Action = ActorModelAction<Msg, TimeoutKind, ()>;

fn cfg(byzantine: usize, first_byzantine: usize, rounds: u32, crashes: usize) -> ModelConfig {
    ModelConfig {
        byzantine,
        first_byzantine,
        rounds,
        max_crashes: crashes,
        ..ModelConfig::ci()
    }
}

/// Breadth-first until the first property failure: the shortest counterexample.
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

/// CONS-MC-4: the CI configuration, checked exhaustively; the pinned count
/// catches any change that silently shrinks (or grows) the explored space.
/// The test profile runs it without timers (43,684 states); the CLI default
/// with timers (300,648 states, about 20 s in release) is run by hand.
///
/// Release builds only: in the dev profile it runs orders of magnitude slower
/// (under investigation); CI should run `cargo test --release -p blyan-model-check`.
#[cfg(not(debug_assertions))]
#[test]
fn cons_mc_2_ci_configuration_is_safe_and_live_exhaustively() {
    let cfg = ModelConfig {
        timers: false,
        ..ModelConfig::ci()
    };
    let checker = model(cfg).checker().spawn_dfs().join();
    checker.assert_properties();
    assert_eq!(checker.unique_state_count(), CI_UNIQUE_STATES);
}

#[cfg(not(debug_assertions))]
const CI_UNIQUE_STATES: usize = 43_684;

#[test]
fn cons_mc_2_one_third_byzantine_power_breaks_agreement() {
    // Two of four validators (half the power, ≥ 1/3) tell two stories as
    // round 0's proposer: each half of the honest validators decides its own.
    assert_eq!(bfs_violation(cfg(2, 0, 1, 0)), Some("agreement"));
}

#[test]
fn cons_mc_3_mutant_half_quorum_is_caught() {
    let c = ModelConfig {
        mutant: Mutant::HalfQuorum,
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
    let checker = model(c)
        .checker()
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_simulation(1, stateright::UniformChooser)
        .join();
    assert!(checker.discovery("agreement").is_some());
}

/// Applies, in order, the first enabled action matching each step; `None` if
/// some step has no matching enabled action.
fn replay(
    m: &Model,
    steps: &[&dyn Fn(&Action) -> bool],
) -> Option<<Model as stateright::Model>::State> {
    let mut state = m.init_states().into_iter().next()?;
    for step in steps {
        let mut actions = Vec::new();
        m.actions(&state, &mut actions);
        let action = actions.into_iter().find(|a| step(a))?;
        state = m.next_state(&state, action)?;
    }
    Some(state)
}

fn deliver(
    dst: usize,
    kind: Option<VoteType>,
    from: usize,
    value: ValueId,
) -> impl Fn(&Action) -> bool {
    move |a| match a {
        ActorModelAction::Deliver { dst: d, msg, .. } if *d == Id::from(dst) => match (msg, kind) {
            (Message::Proposal(p), None) => {
                p.message.proposer == address(from) && p.message.value == value
            }
            (Message::Vote(v), Some(t)) => {
                v.message.vote_type == t
                    && v.message.validator == address(from)
                    && v.message.value == Some(value)
            }
            _ => false,
        },
        _ => false,
    }
}

/// The forgetful restart needs a long, specific schedule (about 18 steps)
/// that exhaustive search at this size does not reach in CI time, so the
/// counterexample is replayed step by step through the real model: with the
/// mutant it ends in disagreement; without it, the schedule is impossible
/// because the restarted validator repeats its persisted prevote.
#[test]
fn cons_mc_3_mutant_forget_votes_after_crash_is_caught() {
    let (b0, b1) = (byzantine_value(0, 0, 1), byzantine_value(0, 1, 1));
    let (pv, pc) = (Some(VoteType::Prevote), Some(VoteType::Precommit));
    let crash = |a: &Action| matches!(a, ActorModelAction::Crash(id) if *id == Id::from(2));
    let recover = |a: &Action| matches!(a, ActorModelAction::Recover(id) if *id == Id::from(2));
    type Step = Box<dyn Fn(&Action) -> bool>;
    let steps: Vec<Step> = vec![
        // Validators 1 and 2 (Byzantine 0's "story 0" and swing) decide b0 at 1.
        Box::new(deliver(2, None, 0, b0)),
        Box::new(deliver(1, None, 0, b0)),
        Box::new(deliver(2, pv, 0, b0)),
        Box::new(deliver(1, pv, 0, b0)),
        Box::new(deliver(2, pv, 1, b0)),
        Box::new(deliver(1, pv, 2, b0)),
        Box::new(deliver(1, pc, 0, b0)),
        Box::new(deliver(1, pc, 2, b0)),
        // Validator 2 crashes and restarts.
        Box::new(crash),
        Box::new(recover),
        // It and validator 3 now build a quorum for b1.
        Box::new(deliver(2, None, 0, b1)),
        Box::new(deliver(3, None, 0, b1)),
        Box::new(deliver(3, pv, 0, b1)),
        Box::new(deliver(3, pv, 2, b1)),
        Box::new(deliver(2, pv, 0, b1)),
        Box::new(deliver(2, pv, 3, b1)),
        Box::new(deliver(3, pc, 0, b1)),
        Box::new(deliver(3, pc, 2, b1)),
    ];
    let steps: Vec<&dyn Fn(&Action) -> bool> = steps.iter().map(|s| s.as_ref()).collect();
    let base = ModelConfig {
        strategy: Strategy::Swing,
        fifo_honest_links: false,
        ..cfg(1, 0, 1, 1)
    };
    let mutant = model(ModelConfig {
        mutant: Mutant::ForgetVotes,
        ..base.clone()
    });
    let end = replay(&mutant, &steps).expect("the schedule is possible with the mutant");
    assert!(
        !blyan_model_check::agreement(&mutant, &end),
        "validators 1 and 3 disagree"
    );
    assert!(
        replay(&model(base), &steps).is_none(),
        "impossible with persisted votes"
    );
}
