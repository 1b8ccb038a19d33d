//! Tendermint consensus (spec/consensus.md, CONS-*): one test or more per rule id.

use blyan_state_machine::consensus::*;
use blyan_state_machine::testkit;
use blyan_state_machine::types::Address;

fn addr(i: u8) -> Address {
    Address([i + 1; 20])
}

/// `n` validators of power 1, addresses ascending with the index.
fn set(powers: &[u64]) -> ValidatorSet {
    ValidatorSet::new(
        powers
            .iter()
            .enumerate()
            .map(|(i, p)| (addr(i as u8), [0u8; 33], *p))
            .collect(),
    )
    .expect("valid set")
}

fn node(i: u8, powers: &[u64]) -> Consensus<ModelScheme> {
    Consensus::new(ModelScheme, addr(i), Config::default(), 1, set(powers))
}

fn vote(i: u8, vote_type: VoteType, round: Round, value: Option<ValueId>) -> Signed<Vote, Address> {
    Signed {
        message: Vote {
            vote_type,
            height: 1,
            round,
            value,
            validator: addr(i),
        },
        signature: addr(i),
    }
}

fn proposal(i: u8, round: Round, value: ValueId, valid_round: Option<Round>) -> Input<Address> {
    Input::Proposal {
        proposal: Signed {
            message: Proposal {
                height: 1,
                round,
                value,
                valid_round,
                proposer: addr(i),
            },
            signature: addr(i),
        },
        valid: true,
    }
}

const A: ValueId = [0xAA; 32];
const B: ValueId = [0xBB; 32];

fn broadcast_votes(out: &[Output<Address>]) -> Vec<Vote> {
    out.iter()
        .filter_map(|o| match o {
            Output::Broadcast(Message::Vote(v)) => Some(v.message.clone()),
            _ => None,
        })
        .collect()
}

fn feed(c: &mut Consensus<ModelScheme>, input: Input<Address>) -> Vec<Output<Address>> {
    c.handle(input).expect("accepted")
}

#[test]
fn cons_prop_2_proposer_sequence_matches_cometbft() {
    assert_eq!(
        proposer_sequence(&[300, 330, 1000], 10),
        vec![2, 1, 2, 0, 2, 2, 1, 2, 0, 2]
    );
    assert_eq!(proposer_sequence(&[], 5), Vec::<usize>::new());
    assert_eq!(
        proposer_sequence(&[1, 1, 1, 1], 8),
        vec![0, 1, 2, 3, 0, 1, 2, 3]
    );
    assert_eq!(proposer_sequence(&[5], 3), vec![0, 0, 0]);
}

#[test]
fn cons_prop_2_frequency_is_proportional_to_power() {
    let seq = proposer_sequence(&[1, 2, 3, 4], 1000);
    let counts: Vec<usize> = (0..4)
        .map(|i| seq.iter().filter(|&&s| s == i).count())
        .collect();
    assert_eq!(counts, vec![100, 200, 300, 400]);
}

#[test]
fn cons_prop_3_round_proposers_follow_the_sequence_and_heights_advance() {
    let s = set(&[300, 330, 1000]);
    let seq = proposer_sequence(&[300, 330, 1000], 4);
    for (round, expected) in seq.iter().enumerate() {
        assert_eq!(s.proposer(round as Round), addr(*expected as u8));
    }
    // CONS-PROP-4: height h+1's round 0 is the second element.
    assert_eq!(s.next_height().proposer(0), addr(seq[1] as u8));
}

#[test]
fn cons_val_1_rejects_bad_sets() {
    assert_eq!(ValidatorSet::new(vec![]), Err(ValidatorSetError::Empty));
    assert_eq!(
        ValidatorSet::new(vec![(addr(0), [0; 33], 0)]),
        Err(ValidatorSetError::ZeroPower(addr(0)))
    );
    assert_eq!(
        ValidatorSet::new(vec![(addr(1), [0; 33], 1), (addr(0), [0; 33], 1)]),
        Err(ValidatorSetError::NotSorted)
    );
    assert_eq!(
        ValidatorSet::new(vec![
            (addr(0), [0; 33], u64::MAX / 8),
            (addr(1), [0; 33], u64::MAX / 8)
        ]),
        Err(ValidatorSetError::TooMuchPower)
    );
}

#[test]
fn cons_vote_2_and_3_thresholds_are_strict() {
    let s = set(&[1, 1, 1, 1]);
    assert!(!s.is_quorum(2, Mutant::None));
    assert!(s.is_quorum(3, Mutant::None));
    assert!(!s.is_one_third(1));
    assert!(s.is_one_third(2));
    let s = set(&[1, 1, 1]);
    assert!(
        !s.is_quorum(2, Mutant::None),
        "2 of 3 is exactly 2/3, not more"
    );
}

#[test]
fn cons_time_1_timeouts_grow_with_the_round() {
    let c = Config::default();
    assert!(c.timeout_ms(TimeoutKind::Propose, 1) > c.timeout_ms(TimeoutKind::Propose, 0));
    assert!(c.timeout_ms(TimeoutKind::Precommit, 5) > c.timeout_ms(TimeoutKind::Precommit, 4));
    assert_eq!(
        c.timeout_ms(TimeoutKind::Propose, Round::MAX),
        c.timeout_propose_ms + c.timeout_propose_delta_ms * u64::from(Round::MAX)
    );
}

#[test]
fn cons_prevote_1_l22_prevote_the_proposal_when_unlocked() {
    let powers = [1, 1, 1, 1];
    let mut c = node(1, &powers);
    let out = c.start();
    assert!(out.iter().any(|o| matches!(
        o,
        Output::ScheduleTimeout {
            kind: TimeoutKind::Propose,
            round: 0,
            ..
        }
    )));
    let out = feed(&mut c, proposal(0, 0, A, None));
    assert_eq!(
        broadcast_votes(&out),
        vec![vote(1, VoteType::Prevote, 0, Some(A)).message]
    );
    assert_eq!(c.step(), Step::Prevote);
}

#[test]
fn cons_prevote_1_invalid_proposal_gets_nil() {
    let mut c = node(1, &[1, 1, 1, 1]);
    c.start();
    let Input::Proposal { proposal, .. } = proposal(0, 0, A, None) else {
        unreachable!()
    };
    let out = feed(
        &mut c,
        Input::Proposal {
            proposal,
            valid: false,
        },
    );
    assert_eq!(broadcast_votes(&out)[0].value, None);
}

#[test]
fn cons_msg_3_proposals_from_non_proposers_are_rejected() {
    let mut c = node(1, &[1, 1, 1, 1]);
    c.start();
    assert!(matches!(
        c.handle(proposal(2, 0, A, None)),
        Err(Rejected::WrongProposer { .. })
    ));
    feed(&mut c, proposal(0, 0, A, None));
    assert_eq!(
        c.handle(proposal(0, 0, B, None)),
        Err(Rejected::ConflictingProposal)
    );
}

/// Drives node 1 to lock A in round 0, then moves it to round 1.
fn locked_on_a_then_round_1() -> Consensus<ModelScheme> {
    let mut c = node(1, &[1, 1, 1, 1]);
    c.start();
    feed(&mut c, proposal(0, 0, A, None));
    feed(&mut c, Input::Vote(vote(0, VoteType::Prevote, 0, Some(A))));
    let out = feed(&mut c, Input::Vote(vote(2, VoteType::Prevote, 0, Some(A))));
    // CONS-LOCK-1 (L36): lock, persisted before the precommit is sent.
    let persist = out
        .iter()
        .position(|o| matches!(o, Output::Persist(Record::Lock { .. })));
    let send = out.iter().position(|o| matches!(o, Output::Broadcast(Message::Vote(v)) if v.message.vote_type == VoteType::Precommit));
    assert!(persist.expect("lock persisted") < send.expect("precommit sent"));
    assert_eq!(c.locked(), Some((A, 0)));
    assert_eq!(c.valid(), Some((A, 0)));
    // Precommits for nil from others: 2f+1 precommits any -> L47 timeout.
    feed(&mut c, Input::Vote(vote(0, VoteType::Precommit, 0, None)));
    let out = feed(&mut c, Input::Vote(vote(2, VoteType::Precommit, 0, None)));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::ScheduleTimeout {
            kind: TimeoutKind::Precommit,
            round: 0,
            ..
        }
    )));
    feed(
        &mut c,
        Input::Timeout {
            kind: TimeoutKind::Precommit,
            height: 1,
            round: 0,
        },
    );
    assert_eq!(c.round(), 1);
    c
}

#[test]
fn cons_lock_1_locked_validator_prevotes_nil_for_another_value() {
    let mut c = locked_on_a_then_round_1();
    // Round 1's proposer is validator 1 itself: it re-proposes its valid value (L15).
    assert_eq!(
        c.step(),
        Step::Prevote,
        "own proposal of A prevoted at once"
    );
    // A locked validator that is not the proposer: use round 2 (proposer 2) seen from 1.
    feed(&mut c, Input::Vote(vote(0, VoteType::Precommit, 1, None)));
    feed(&mut c, Input::Vote(vote(2, VoteType::Precommit, 1, None)));
    feed(
        &mut c,
        Input::Timeout {
            kind: TimeoutKind::Precommit,
            height: 1,
            round: 1,
        },
    );
    assert_eq!(c.round(), 2);
    let out = feed(&mut c, proposal(2, 2, B, None));
    assert_eq!(
        broadcast_votes(&out)[0].value,
        None,
        "L23: locked on A, B gets nil"
    );
}

#[test]
fn cons_prevote_2_l28_unlocks_on_a_later_polka() {
    let mut c = locked_on_a_then_round_1();
    {
        let r = 1u32;
        feed(&mut c, Input::Vote(vote(0, VoteType::Precommit, r, None)));
        feed(&mut c, Input::Vote(vote(2, VoteType::Precommit, r, None)));
        feed(
            &mut c,
            Input::Timeout {
                kind: TimeoutKind::Precommit,
                height: 1,
                round: r,
            },
        );
    }
    // Round 1 had a polka for B (0, 2, 3 prevoted B); round 2's proposer re-proposes B with vr = 1.
    for i in [0u8, 2, 3] {
        feed(&mut c, Input::Vote(vote(i, VoteType::Prevote, 1, Some(B))));
    }
    let out = feed(&mut c, proposal(2, 2, B, Some(1)));
    assert_eq!(
        broadcast_votes(&out)[0].value,
        Some(B),
        "L29: lockedRound 0 ≤ vr 1"
    );
}

#[test]
fn cons_decide_1_l49_decides_on_quorum_precommits_with_a_verifiable_certificate() {
    let mut c = node(1, &[1, 1, 1, 1]);
    c.start();
    feed(&mut c, proposal(0, 0, A, None));
    feed(
        &mut c,
        Input::Vote(vote(0, VoteType::Precommit, 0, Some(A))),
    );
    let out = feed(
        &mut c,
        Input::Vote(vote(2, VoteType::Precommit, 0, Some(A))),
    );
    assert!(
        out.iter().all(|o| !matches!(o, Output::Decide { .. })),
        "2 of 4 is no quorum"
    );
    let out = feed(
        &mut c,
        Input::Vote(vote(3, VoteType::Precommit, 0, Some(A))),
    );
    let Some(Output::Decide {
        value, certificate, ..
    }) = out.iter().find(|o| matches!(o, Output::Decide { .. }))
    else {
        panic!("decided")
    };
    assert_eq!(*value, A);
    assert_eq!(c.step(), Step::Decided);
    certificate
        .verify(&ModelScheme, c.validators(), 1)
        .expect("CONS-CERT-2");
    assert_eq!(certificate.signers(), vec![addr(0), addr(2), addr(3)]);
    // Nothing changes a decided height.
    assert!(
        feed(
            &mut c,
            Input::Vote(vote(1, VoteType::Precommit, 0, Some(B)))
        )
        .is_empty()
    );
    let next = c.validators().next_height();
    let out = c.start_height(2, next);
    assert_eq!(c.height(), 2);
    assert!(!out.is_empty());
}

#[test]
fn cons_skip_1_l55_f_plus_one_from_a_higher_round_skips_ahead() {
    let mut c = node(3, &[1, 1, 1, 1]);
    c.start();
    feed(&mut c, Input::Vote(vote(0, VoteType::Prevote, 5, None)));
    assert_eq!(c.round(), 0, "1 of 4 is not more than 1/3");
    feed(&mut c, Input::Vote(vote(1, VoteType::Precommit, 5, None)));
    assert_eq!(c.round(), 5);
}

#[test]
fn cons_timeouts_l57_l61_l65_act_only_in_their_round_and_step() {
    let mut c = node(1, &[1, 1, 1, 1]);
    c.start();
    assert!(
        feed(
            &mut c,
            Input::Timeout {
                kind: TimeoutKind::Propose,
                height: 1,
                round: 3
            }
        )
        .is_empty()
    );
    let out = feed(
        &mut c,
        Input::Timeout {
            kind: TimeoutKind::Propose,
            height: 1,
            round: 0,
        },
    );
    assert_eq!(
        broadcast_votes(&out),
        vec![vote(1, VoteType::Prevote, 0, None).message]
    ); // L59
    assert!(
        feed(
            &mut c,
            Input::Timeout {
                kind: TimeoutKind::Propose,
                height: 1,
                round: 0
            }
        )
        .is_empty()
    );
    let out = feed(
        &mut c,
        Input::Timeout {
            kind: TimeoutKind::Prevote,
            height: 1,
            round: 0,
        },
    );
    assert_eq!(
        broadcast_votes(&out),
        vec![vote(1, VoteType::Precommit, 0, None).message]
    ); // L63
    feed(
        &mut c,
        Input::Timeout {
            kind: TimeoutKind::Precommit,
            height: 1,
            round: 0,
        },
    );
    assert_eq!((c.round(), c.step()), (1, Step::Propose)); // L67
}

#[test]
fn cons_proposer_l18_requests_a_value_then_proposes_and_persists_first() {
    let mut c = node(0, &[1, 1, 1, 1]);
    let out = c.start();
    assert_eq!(
        out,
        vec![Output::RequestValue {
            height: 1,
            round: 0
        }]
    );
    let out = feed(
        &mut c,
        Input::ProposeValue {
            height: 1,
            round: 0,
            value: A,
        },
    );
    assert!(matches!(out[0], Output::Persist(Record::Proposal(_))));
    assert!(matches!(out[1], Output::Broadcast(Message::Proposal(_))));
    assert_eq!(broadcast_votes(&out)[0].value, Some(A));
}

#[test]
fn cons_ev_1_equivocation_yields_evidence_and_the_first_vote_counts() {
    let mut c = node(1, &[1, 1, 1, 1]);
    c.start();
    feed(&mut c, Input::Vote(vote(3, VoteType::Prevote, 0, Some(A))));
    let out = feed(&mut c, Input::Vote(vote(3, VoteType::Prevote, 0, Some(B))));
    let Some(Output::Evidence(ev)) = out.first() else {
        panic!("evidence")
    };
    ev.verify(&ModelScheme, c.validators()).expect("CONS-EV-2");
    assert!(
        feed(&mut c, Input::Vote(vote(3, VoteType::Prevote, 0, Some(A)))).is_empty(),
        "duplicate"
    );
}

#[test]
fn cons_crash_1_every_sent_vote_is_persisted_before_it_is_sent() {
    let mut c = node(1, &[1, 1, 1, 1]);
    let mut all = c.start();
    all.extend(feed(&mut c, proposal(0, 0, A, None)));
    for i in [0u8, 2] {
        all.extend(feed(
            &mut c,
            Input::Vote(vote(i, VoteType::Prevote, 0, Some(A))),
        ));
    }
    let mut persisted = Vec::new();
    let mut sent = 0;
    for o in &all {
        match o {
            Output::Persist(Record::Vote(v)) => persisted.push(v.message.clone()),
            Output::Broadcast(Message::Vote(v)) => {
                assert!(persisted.contains(&v.message), "persist before send");
                sent += 1;
            }
            _ => {}
        }
    }
    assert_eq!(sent, 2);
}

#[test]
fn cons_crash_2_a_restored_validator_repeats_and_never_contradicts_its_votes() {
    let mut c = node(1, &[1, 1, 1, 1]);
    let mut records = Vec::new();
    let mut collect = |out: Vec<Output<Address>>| {
        for o in out {
            if let Output::Persist(r) = o {
                records.push(r);
            }
        }
    };
    collect(c.start());
    collect(feed(&mut c, proposal(0, 0, A, None)));
    for i in [0u8, 2] {
        collect(feed(
            &mut c,
            Input::Vote(vote(i, VoteType::Prevote, 0, Some(A))),
        ));
    }
    assert_eq!(c.locked(), Some((A, 0)));
    // Crash: restart from records only.
    let (mut r, out) = Consensus::restore(
        ModelScheme,
        addr(1),
        Config::default(),
        1,
        set(&[1, 1, 1, 1]),
        &records,
    );
    assert_eq!(r.locked(), Some((A, 0)));
    assert_eq!(r.step(), Step::Precommit);
    let votes = broadcast_votes(&out);
    assert!(votes.contains(&vote(1, VoteType::Prevote, 0, Some(A)).message));
    assert!(votes.contains(&vote(1, VoteType::Precommit, 0, Some(A)).message));
    // A timeout in the same round cannot make it sign nil now.
    let out = r
        .handle(Input::Timeout {
            kind: TimeoutKind::Prevote,
            height: 1,
            round: 0,
        })
        .expect("ok");
    assert!(broadcast_votes(&out).iter().all(|v| v.value == Some(A)));
}

#[test]
fn cons_sig_2_k256_votes_verify_and_certificates_reject_forgery() {
    let keys: Vec<_> = (0..4).map(testkit::key).collect();
    let mut members: Vec<_> = keys
        .iter()
        .map(|k| {
            (
                testkit::address(k),
                blyan_state_machine::tx::public_key_of(k),
                1u64,
            )
        })
        .collect();
    members.sort();
    let vs = ValidatorSet::new(members.clone()).expect("set");
    let scheme = K256Scheme {
        chain_id: "blyan-test".into(),
    };
    let mut signatures: Vec<(Address, [u8; 64])> = keys
        .iter()
        .take(3)
        .map(|k| {
            let a = testkit::address(k);
            let v = Vote {
                vote_type: VoteType::Precommit,
                height: 7,
                round: 0,
                value: Some(A),
                validator: a,
            };
            (a, scheme.sign_vote(k, &v))
        })
        .collect();
    signatures.sort();
    let cert = CommitCertificate {
        height: 7,
        round: 0,
        value: A,
        signatures,
    };
    cert.verify(&scheme, &vs, 7).expect("valid");
    let other_chain = K256Scheme {
        chain_id: "other".into(),
    };
    assert_eq!(
        cert.verify(&other_chain, &vs, 7),
        Err(VerifyError::BadSignature)
    );
    let mut short = cert.clone();
    short.signatures.pop();
    assert_eq!(short.verify(&scheme, &vs, 7), Err(VerifyError::NoQuorum));
    let mut forged = cert.clone();
    forged.value = B;
    assert_eq!(
        forged.verify(&scheme, &vs, 7),
        Err(VerifyError::BadSignature)
    );
}

/// CONS-EV-1..3 with SLASH-1: k256-signed conflicting votes seen by the vote
/// keeper become evidence that verifies against the set and, in a block, slashes
/// and tombstones the signer through the ledger.
#[test]
fn cons_ev_3_detected_equivocation_slashes_through_the_ledger() {
    use blyan_state_machine::block::Event;
    use blyan_state_machine::params::Params;
    let net = testkit::testnet(4, 0, Params::default());
    let ledger = blyan_state_machine::ledger::Ledger::from_genesis(&net.genesis).expect("genesis");
    let (_, ledger) = testkit::next_block(&ledger, &[]).expect("block 1");
    let members: Vec<_> = ledger
        .active_set()
        .iter()
        .map(|(a, p)| {
            let k = net
                .validators
                .iter()
                .find(|k| testkit::address(k) == *a)
                .expect("key");
            (*a, blyan_state_machine::tx::public_key_of(k), *p)
        })
        .collect();
    let vs = ValidatorSet::new(members).expect("set");
    let scheme = K256Scheme {
        chain_id: net.genesis.chain_id.clone(),
    };
    let culprit = &net.validators[2];
    let who = testkit::address(culprit);
    let observer = net
        .validators
        .iter()
        .find(|k| testkit::address(k) != who)
        .expect("other")
        .clone();
    let mut c = Consensus::new(scheme.clone(), observer, Config::default(), 1, vs.clone());
    c.start();
    let signed = |value| {
        let v = Vote {
            vote_type: VoteType::Precommit,
            height: 1,
            round: 0,
            value: Some(value),
            validator: who,
        };
        Signed {
            signature: scheme.sign_vote(culprit, &v),
            message: v,
        }
    };
    c.handle(Input::Vote(signed(A))).expect("accepted");
    let out = c.handle(Input::Vote(signed(B))).expect("accepted");
    let Some(Output::Evidence(ev)) = out.first() else {
        panic!("evidence")
    };
    ev.verify(&scheme, &vs).expect("CONS-EV-2");
    let signers = ledger.last_active_set().iter().map(|(a, _)| *a).collect();
    let (block, next) = testkit::next_block_with(&ledger, &[], signers, vec![ev.to_misbehaviour()])
        .expect("block 2");
    let (_, outcome) = ledger.apply_block(&block).expect("valid");
    assert!(
        outcome
            .events
            .contains(&Event::Tombstoned { validator: who })
    );
    assert!(next.validator(&who).expect("exists").tombstoned);
}

/// CONS-CRASH-2: a proposer restarted after proposing repeats its proposal and
/// also takes it as received (L19), so it prevotes it instead of waiting in
/// the propose step for ever (a liveness bug found by blyan-sim seed 177).
#[test]
fn cons_crash_2_a_restored_proposer_repeats_and_prevotes_its_proposal() {
    let mut c = node(0, &[1, 1, 1, 1]);
    let mut records = Vec::new();
    let mut out = c.start();
    out.extend(feed(
        &mut c,
        Input::ProposeValue {
            height: 1,
            round: 0,
            value: A,
        },
    ));
    for o in out {
        // Crash right after the proposal was persisted: the prevote record is lost.
        if let Output::Persist(r @ Record::Proposal(_)) = o {
            records.push(r);
        }
    }
    assert_eq!(records.len(), 1);
    let (r, out) = Consensus::restore(
        ModelScheme,
        addr(0),
        Config::default(),
        1,
        set(&[1, 1, 1, 1]),
        &records,
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Broadcast(Message::Proposal(p)) if p.message.value == A))
    );
    assert_eq!(r.step(), Step::Prevote, "took its own proposal as received");
    assert_eq!(
        broadcast_votes(&out),
        vec![vote(0, VoteType::Prevote, 0, Some(A)).message]
    );
}

/// CONS-VOTE-4: an equivocator's vote for a held proposal's value counts for
/// that value too, so the polka it took part in is visible.
#[test]
fn cons_vote_4_an_equivocators_vote_for_a_proposed_value_counts() {
    let mut c = node(1, &[1, 1, 1, 1]);
    c.start();
    // Validator 3 first prevotes B (not proposed), then A (proposed).
    feed(&mut c, Input::Vote(vote(3, VoteType::Prevote, 0, Some(B))));
    feed(&mut c, proposal(0, 0, A, None)); // Node 1 prevotes A.
    feed(&mut c, Input::Vote(vote(0, VoteType::Prevote, 0, Some(A))));
    let out = feed(&mut c, Input::Vote(vote(3, VoteType::Prevote, 0, Some(A))));
    assert!(matches!(out.first(), Some(Output::Evidence(_))));
    // 0, 1 and 3 prevoted A: a polka, so node 1 locks and precommits A (L36).
    assert_eq!(c.locked(), Some((A, 0)));
    assert!(broadcast_votes(&out).contains(&vote(1, VoteType::Precommit, 0, Some(A)).message));
    let polka: Vec<_> = c.polka(0, A);
    assert_eq!(polka.len(), 3);
}

/// CONS-LOCK-3: a polka of an earlier round, learned late, becomes the
/// valid value (not a lock), persisted; as the proposer of a later round the
/// validator re-proposes it with that valid round, which locked validators
/// accept (L28). Without the rule it would ask for a new value and the
/// validators locked on A would refuse it.
#[test]
fn cons_lock_3_a_late_polka_becomes_the_valid_value_and_is_re_proposed() {
    let mut c = node(2, &[1, 1, 1, 1]);
    c.start();
    // It misses round 0 and moves to round 1 on f + 1 of its messages.
    feed(&mut c, Input::Vote(vote(0, VoteType::Prevote, 1, None)));
    feed(&mut c, Input::Vote(vote(1, VoteType::Prevote, 1, None)));
    assert_eq!(c.round(), 1);
    // Round 0's proposal and polka arrive late.
    feed(&mut c, proposal(0, 0, A, None));
    feed(&mut c, Input::Vote(vote(0, VoteType::Prevote, 0, Some(A))));
    feed(&mut c, Input::Vote(vote(1, VoteType::Prevote, 0, Some(A))));
    assert_eq!(c.valid(), None, "two of four is no polka");
    let out = feed(&mut c, Input::Vote(vote(3, VoteType::Prevote, 0, Some(A))));
    assert_eq!(c.valid(), Some((A, 0)));
    assert_eq!(c.locked(), None, "a late polka is not a lock");
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Persist(Record::Lock { locked: None, valid: Some((v, 0)), .. }) if *v == A
    )));
    // Round 2 is its own: it proposes A with valid round 0, asking for no value.
    assert_eq!(c.proposer(2), addr(2));
    feed(&mut c, Input::Vote(vote(0, VoteType::Prevote, 2, None)));
    let out = feed(&mut c, Input::Vote(vote(1, VoteType::Prevote, 2, None)));
    assert_eq!(c.round(), 2);
    assert!(!out.iter().any(|o| matches!(o, Output::RequestValue { .. })));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Broadcast(Message::Proposal(p))
            if p.message.value == A && p.message.valid_round == Some(0)
    )));
}

/// CONS-MC-1 R5's notion of an inert delivery: a vote that only gets
/// recorded leaves the control state equal; the proposal that makes the
/// validator prevote does not; forgetting what was received undoes the vote.
#[test]
fn cons_mc_1_same_except_received_tells_recording_from_acting() {
    let powers = [1, 1, 1, 1];
    let mut c = node(1, &powers);
    c.start();
    let before = c.clone();
    let out = feed(&mut c, Input::Vote(vote(2, VoteType::Prevote, 0, Some(A))));
    assert!(out.is_empty());
    assert_ne!(c, before, "the vote is recorded");
    assert!(c.same_except_received(&before));
    assert_eq!(c.without_received(), before.without_received());
    let recorded = c.clone();
    feed(&mut c, proposal(0, 0, A, None));
    assert!(!c.same_except_received(&recorded), "it prevoted");
    assert_ne!(c.without_received(), recorded.without_received());
}
