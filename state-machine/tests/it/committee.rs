//! CONS-COMM-7/8, TX-16: the proposer-eligibility committee wired through
//! the ledger (`apply_block`) and the node driver.

use blyan_state_machine::Error;
use blyan_state_machine::block::Block;
use blyan_state_machine::consensus::{
    epoch_seed, genesis_seed, next_seed, select_validators, ticket_input, ticket_proof,
    vrf_public_key,
};
use blyan_state_machine::error::TxError;
use blyan_state_machine::ledger::{Ledger, Proposal};
use blyan_state_machine::params::Params;
use blyan_state_machine::testkit::{self, address, key, testnet, tx};
use blyan_state_machine::tx::TxKind;
use blyan_state_machine::types::{Address, BLY};

const EPOCH: u64 = 3;

fn params() -> Params {
    Params {
        epoch_length_blocks: EPOCH,
        ..Params::default()
    }
}

/// A proposal of no transactions by `proposer` with `ticket`, signed by the
/// previous active set.
fn propose(
    ledger: &Ledger,
    proposer: Address,
    ticket: Option<[u8; 81]>,
) -> Result<(Block, Ledger), Error> {
    let signers = if ledger.height() == 0 {
        Vec::new()
    } else {
        ledger.last_active_set().iter().map(|(a, _)| *a).collect()
    };
    ledger
        .propose_block(Proposal {
            proposer,
            ticket,
            time_ms: ledger.globals().time_ms + 2_000,
            evidence: Vec::new(),
            last_commit_signers: signers,
            candidates: &[],
        })
        .map(|(b, l, _)| (b, l))
}

/// The active validators outside the epoch's committee.
fn ineligible(ledger: &Ledger) -> Vec<Address> {
    let eligible = ledger.eligible_proposers();
    ledger
        .active_set()
        .iter()
        .map(|(a, _)| *a)
        .filter(|a| !eligible.contains(a))
        .collect()
}

/// CONS-COMM-7 (issue 15's "must show"): a block from an active validator
/// outside the epoch's committee is invalid, both when proposed and when a
/// valid block's header is changed to name it; the committee's members'
/// blocks are valid.
#[test]
fn cons_comm_7_a_block_from_an_ineligible_proposer_is_invalid() {
    let net = testnet(4, 0, params());
    let genesis = Ledger::from_genesis(&net.genesis).unwrap();
    // Four equal stakes: three hold two thirds, so one is left out.
    let committee = &genesis.committee().eligible;
    assert_eq!(committee.len(), 3, "{committee:?}");
    let stakes: Vec<(Address, u64)> = genesis.active_set().to_vec();
    assert_eq!(
        *committee,
        select_validators(&genesis_seed(&genesis.genesis_hash()), &stakes).unwrap()
    );
    let outsider = ineligible(&genesis);
    assert_eq!(outsider.len(), 1);
    assert_eq!(
        propose(&genesis, outsider[0], None).unwrap_err(),
        Error::IneligibleProposer(outsider[0])
    );
    for member in committee {
        let (block, _) = propose(&genesis, *member, None).unwrap();
        genesis.apply_block(&block).unwrap();
        let mut forged = block.clone();
        forged.header.proposer = outsider[0];
        assert_eq!(
            genesis.apply_block(&forged).unwrap_err(),
            Error::IneligibleProposer(outsider[0])
        );
    }
    // A non-member of the active set is still refused as unknown.
    let stranger = address(&key(777));
    assert_eq!(
        propose(&genesis, stranger, None).unwrap_err(),
        Error::UnknownProposer(stranger)
    );
}

/// CONS-COMM-2/3: the last block of an epoch carries its proposer's ticket,
/// verified through `apply_block`; the next seed chains its output and the
/// next committee is drawn from it. Missing, foreign, misplaced or forged
/// tickets make the block invalid.
#[test]
fn cons_comm_2_the_boundary_block_carries_its_proposers_ticket() {
    let net = testnet(4, 0, params());
    let mut ledger = Ledger::from_genesis(&net.genesis).unwrap();
    for _ in 0..EPOCH - 1 {
        let member = ledger.eligible_proposers()[0];
        // Not a boundary: a ticket does not belong.
        let k = testkit::key_of(&member).unwrap();
        let alpha = ticket_input(ledger.chain_id(), 1, &ledger.committee().seed);
        assert_eq!(
            propose(&ledger, member, Some(ticket_proof(&k, &alpha))).unwrap_err(),
            Error::UnexpectedTicket
        );
        assert!(ledger.next_ticket_input().is_none());
        ledger = propose(&ledger, member, None).unwrap().1;
    }
    // Height 3 ends epoch 0.
    let seed0 = ledger.committee().seed;
    let alpha = ledger.next_ticket_input().expect("a boundary");
    assert_eq!(alpha, ticket_input(ledger.chain_id(), 1, &seed0));
    let members = ledger.eligible_proposers();
    let proposer = members[0];
    let other = members[1];
    let k = testkit::key_of(&proposer).unwrap();
    assert_eq!(
        propose(&ledger, proposer, None).unwrap_err(),
        Error::MissingTicket
    );
    let foreign = ticket_proof(&testkit::key_of(&other).unwrap(), &alpha);
    assert!(matches!(
        propose(&ledger, proposer, Some(foreign)),
        Err(Error::InvalidTicket(_))
    ));
    let stale = ticket_proof(&k, &ticket_input(ledger.chain_id(), 2, &seed0));
    assert!(matches!(
        propose(&ledger, proposer, Some(stale)),
        Err(Error::InvalidTicket(_))
    ));
    let ticket = ledger
        .ticket_for(&k)
        .expect("a keyed proposer at a boundary");
    let (block, after) = propose(&ledger, proposer, Some(ticket)).unwrap();
    let mut forged = block.clone();
    forged.header.ticket.as_mut().unwrap()[40] ^= 1;
    assert!(matches!(
        ledger.apply_block(&forged),
        Err(Error::InvalidTicket(_))
    ));
    let mut stripped = block.clone();
    stripped.header.ticket = None;
    assert_eq!(
        ledger.apply_block(&stripped).unwrap_err(),
        Error::MissingTicket
    );
    assert_eq!(
        ledger.apply_block(&block).unwrap().0.state_root(),
        after.state_root()
    );
    // The next epoch: the seed chains the proposer's output, and the
    // committee is drawn with it from the stakes fixed at genesis.
    let c = after.committee();
    let expected_seed =
        next_seed(ledger.chain_id(), 1, &seed0, &vrf_public_key(&k), &ticket).unwrap();
    assert_eq!((c.epoch, c.seed), (1, expected_seed));
    assert_eq!(
        c.eligible,
        select_validators(&expected_seed, ledger.active_set()).unwrap()
    );
}

/// CONS-COMM-7: committee `e` is drawn from the stakes and keys as of the
/// last block of epoch `e − 2`: a validator that bonds and registers its VRF
/// key in epoch 0 is not in committee 1's draw, and is in committee 2's
/// (with most of the stake, it is drawn). TX-16's rules: one key, set once,
/// by a validator, a valid point.
#[test]
fn cons_comm_7_committees_follow_stakes_fixed_an_epoch_ahead() {
    let net = testnet(4, 1, params());
    let whale = &net.accounts[0];
    let chain = net.genesis.chain_id.clone();
    let fee = 10_000_000_000;
    let mut ledger = Ledger::from_genesis(&net.genesis).unwrap();
    let whale_tx = |nonce, kind| tx(&chain, whale, nonce, kind, fee);
    let vrf = |public_key| TxKind::SetVrfKey { public_key };
    // x ≥ p: not a point (CONS-VRF-2).
    let mut not_a_point = [0xff; 33];
    not_a_point[0] = 0x02;
    let txs = [
        whale_tx(0, vrf(vrf_public_key(whale))),
        whale_tx(
            1,
            TxKind::Bond {
                amount: 500_000 * BLY,
            },
        ),
        whale_tx(2, vrf(not_a_point)),
        whale_tx(3, vrf(vrf_public_key(whale))),
        whale_tx(4, vrf(vrf_public_key(&net.validators[0]))),
    ];
    let (block, next) = testkit::next_block(&ledger, &txs).unwrap();
    let (_, outcome) = ledger.apply_block(&block).unwrap();
    let failures: Vec<Option<String>> =
        outcome.receipts.iter().map(|r| r.failure.clone()).collect();
    assert_eq!(
        failures,
        vec![
            Some(TxError::NotValidator(address(whale)).to_string()),
            None,
            Some(TxError::InvalidVrfKey.to_string()),
            None,
            Some(TxError::VrfKeyAlreadySet.to_string()),
        ]
    );
    ledger = next;
    let whale = address(whale);
    let mut committees = vec![ledger.committee().clone()];
    while ledger.height() < 3 * EPOCH {
        ledger = testkit::next_block(&ledger, &[]).unwrap().1;
        if ledger.committee().epoch as usize == committees.len() {
            committees.push(ledger.committee().clone());
        }
    }
    assert_eq!(committees.len(), 4, "epochs 0..=3");
    let genesis_stakes = Ledger::from_genesis(&net.genesis)
        .unwrap()
        .active_set()
        .to_vec();
    // Committee 1 from genesis stakes; the whale became active at height 3.
    assert_eq!(committees[1].next_stakes.len(), 5);
    assert_eq!(
        committees[1].eligible,
        select_validators(&committees[1].seed, &genesis_stakes).unwrap()
    );
    assert!(!committees[1].eligible.contains(&whale));
    // Committee 2 from the stakes after height 3: the whale holds 500,000
    // of 540,000 BLY, so it is drawn (CONS-COMM-5 stops at two thirds).
    assert_eq!(
        committees[2].eligible,
        select_validators(&committees[2].seed, &committees[1].next_stakes).unwrap()
    );
    assert!(committees[2].eligible.contains(&whale));
    assert!(committees[2].eligible.len() <= 2);
}

/// CONS-COMM-7/8: validators without a VRF key vote but are never drawn;
/// when no committee member is left (here: nobody has a key), every active
/// validator proposes and a boundary block takes no ticket, its seed chaining
/// an all-zero output.
#[test]
fn cons_comm_8_without_vrf_keys_everyone_proposes_and_seeds_chain_zeros() {
    let mut net = testnet(4, 0, params());
    for v in &mut net.genesis.validators {
        v.vrf_public_key = None;
    }
    let mut ledger = Ledger::from_genesis(&net.genesis).unwrap();
    assert!(ledger.committee().eligible.is_empty());
    let all: Vec<Address> = ledger.active_set().iter().map(|(a, _)| *a).collect();
    assert_eq!(ledger.eligible_proposers(), all);
    for _ in 0..EPOCH - 1 {
        ledger = propose(&ledger, all[3], None).unwrap().1;
    }
    let seed0 = ledger.committee().seed;
    let k = testkit::key_of(&all[2]).unwrap();
    assert!(ledger.ticket_for(&k).is_none(), "no key, no ticket");
    let alpha = ledger.next_ticket_input().unwrap();
    assert_eq!(
        propose(&ledger, all[2], Some(ticket_proof(&k, &alpha))).unwrap_err(),
        Error::UnexpectedTicket
    );
    let after = propose(&ledger, all[2], None).unwrap().1;
    assert_eq!(after.committee().seed, epoch_seed(&seed0, &[0; 32]));
    assert!(after.committee().eligible.is_empty());
}

/// GEN-4: a genesis VRF key that is not a valid point is refused.
#[test]
fn cons_comm_8_a_genesis_vrf_key_must_be_a_point() {
    let mut net = testnet(2, 0, params());
    net.genesis.validators[1].vrf_public_key = Some([0x05; 33]);
    assert!(matches!(
        Ledger::from_genesis(&net.genesis),
        Err(Error::Genesis(m)) if m.contains("VRF")
    ));
}
