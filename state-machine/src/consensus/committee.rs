//! The epoch proposer-eligibility committee (spec/consensus.md, CONS-COMM-*):
//! the seed document's `select_validators` (§2.3).
//!
//! At each epoch boundary a new seed is chained from the previous one and the
//! VRF output of the boundary block's proposer ([`next_seed`]); the seed orders
//! the validators by stake-weighted sampling without replacement, taken until
//! they hold at least two thirds of the stake ([`select_validators`]). The
//! selected validators are the only ones *eligible to propose* during the
//! epoch ([`proposer_set`], [`epoch_proposer`]); votes, quorums and
//! certificates still count over all bonded stake (CONS-COMM-1).
//!
//! Pure functions only; wiring them into the ledger and the consensus driver
//! is described in the spec (CONS-COMM-7).

use super::types::Round;
use super::validators::{MAX_TOTAL_VOTING_POWER, MAX_VALIDATORS, ValidatorSet, ValidatorSetError};
use super::vrf::{self, Secp256k1Sha256Tai, VrfError, VrfOutput, VrfProof, VrfPublicKey};
use crate::crypto::sha3_256_parts;
use crate::tx::{Domain, signing_bytes};
use crate::types::{Address, Hash32};

/// CONS-COMM-2: tag of the genesis seed.
const GENESIS_SEED_TAG: &[u8; 16] = b"blyan/seed0/v1\0\0";
/// CONS-COMM-2: tag of every later seed.
const SEED_TAG: &[u8; 16] = b"blyan/seed/v1\0\0\0";
/// CONS-COMM-4: tag of the committee draws.
const DRAW_TAG: &[u8; 16] = b"blyan/comm-draw1";

/// CONS-COMM-6: the longest epoch, in blocks (about 36 hours at 2 s per
/// block); bounds the loop of [`epoch_proposer`].
pub const MAX_EPOCH_LENGTH: u64 = 1 << 16;

/// CONS-COMM-2: the seed of epoch 0, `SHA3-256(tag ‖ genesis hash)`. Known to
/// everyone in advance: epoch 0's committee is predictable.
pub fn genesis_seed(genesis_hash: &Hash32) -> Hash32 {
    sha3_256_parts(&[GENESIS_SEED_TAG, genesis_hash])
}

/// CONS-COMM-3: the VRF input (`alpha`) whose output seeds epoch `epoch`:
/// `signing_bytes(VrfInput, chain_id, epoch (u64 BE) ‖ seed of epoch − 1)`.
/// Every validator has exactly one output for it (a "ticket"); the proposer of
/// the last block of epoch `epoch − 1` publishes its own.
pub fn ticket_input(chain_id: &str, epoch: u64, previous_seed: &Hash32) -> Vec<u8> {
    let mut body = Vec::with_capacity(8 + 32);
    body.extend_from_slice(&epoch.to_be_bytes());
    body.extend_from_slice(previous_seed);
    signing_bytes(Domain::VrfInput, chain_id, &body)
}

/// CONS-COMM-2: `seed_e = SHA3-256(tag ‖ seed_{e−1} ‖ beta)` where `beta` is the
/// VRF output of the ticket (CONS-COMM-3) the boundary proposer published.
pub fn epoch_seed(previous_seed: &Hash32, vrf_output: &VrfOutput) -> Hash32 {
    sha3_256_parts(&[SEED_TAG, previous_seed, vrf_output])
}

/// CONS-COMM-2/3: verifies the boundary proposer's ticket proof for epoch
/// `epoch` against its VRF key and returns the epoch's seed. Any invalid key or
/// proof is an error (the boundary block carrying it is invalid).
pub fn next_seed(
    chain_id: &str,
    epoch: u64,
    previous_seed: &Hash32,
    vrf_public_key: &[u8],
    proof: &[u8],
) -> Result<Hash32, VrfError> {
    let alpha = ticket_input(chain_id, epoch, previous_seed);
    let beta = vrf::verify::<Secp256k1Sha256Tai>(vrf_public_key, &alpha, proof)?;
    Ok(epoch_seed(previous_seed, &beta))
}

/// CONS-COMM-8: tag of the VRF key derivation.
const VRF_KEY_TAG: &[u8; 16] = b"blyan/vrf-key/v1";

/// CONS-COMM-8: a validator's VRF secret key, derived from its signing key:
/// `SHA3-256(tag ‖ signing scalar (32 bytes BE) ‖ ctr)` for the first `ctr` in
/// 0..=255 whose digest is a scalar in `[1, q−1]` (CONS-VRF-4). A separate
/// key (CONS-COMM-7 asks for one: nothing signs and proves with one scalar),
/// yet an operator keeps one secret; learning the VRF key reveals nothing of
/// the signing key (a one-way function of it).
pub fn vrf_secret_key(signing_key: &k256::ecdsa::SigningKey) -> [u8; 32] {
    let secret: [u8; 32] = signing_key.to_bytes().into();
    for ctr in 0..=u8::MAX {
        let candidate = sha3_256_parts(&[VRF_KEY_TAG, &secret, &[ctr]]);
        if vrf::public_key::<Secp256k1Sha256Tai>(&candidate).is_ok() {
            return candidate;
        }
    }
    unreachable!("256 consecutive digests outside [1, q−1] cannot happen")
}

/// CONS-COMM-8: the VRF public key of [`vrf_secret_key`].
pub fn vrf_public_key(signing_key: &k256::ecdsa::SigningKey) -> VrfPublicKey {
    vrf::public_key::<Secp256k1Sha256Tai>(&vrf_secret_key(signing_key))
        .expect("vrf_secret_key returns a valid scalar")
}

/// CONS-COMM-3/8: the ticket proof of `signing_key`'s validator for `alpha`
/// ([`ticket_input`]).
pub fn ticket_proof(signing_key: &k256::ecdsa::SigningKey, alpha: &[u8]) -> VrfProof {
    vrf::prove::<Secp256k1Sha256Tai>(&vrf_secret_key(signing_key), alpha)
        .expect("vrf_secret_key returns a valid scalar")
}

/// CONS-COMM-4: draw `k` of a committee selection, uniform in `[0, bound)`:
/// `SHA3-256(tag ‖ seed ‖ k (u32 BE))` read as a 256-bit big-endian integer,
/// mod `bound` (bias below `bound / 2^256`).
fn draw(seed: &Hash32, k: u32, bound: u128) -> u128 {
    assert!(bound > 0, "draws only while stake remains");
    assert!(bound <= u128::from(u64::MAX), "stake totals fit u64");
    let digest = sha3_256_parts(&[DRAW_TAG, seed, &k.to_be_bytes()]);
    // Horner's rule: r < bound ≤ 2^64, so r·256 + 255 < 2^73 never overflows.
    digest
        .iter()
        .fold(0u128, |r, byte| (r * 256 + u128::from(*byte)) % bound)
}

/// CONS-COMM-5: `3 × taken ≥ 2 × total`.
fn holds_two_thirds(taken: u128, total: u128) -> bool {
    3 * taken >= 2 * total
}

/// CONS-COMM-4/5: the seed document's `select_validators`. `stakes` are
/// `(address, voting power)` in strictly ascending address order, powers > 0
/// (CONS-VAL-1, except that an empty list is allowed and selects no one).
/// Returns the selected addresses in the order drawn: draw `k` (k = 0, 1, …)
/// picks the validator whose interval contains `draw(seed, k) mod remaining`
/// among the cumulative stakes of those not yet picked, in ascending address
/// order; drawing stops as soon as the picked stake `taken` satisfies
/// `3 × taken ≥ 2 × total`. So the set holds at least two thirds of the stake,
/// and without its last member less than two thirds.
pub fn select_validators(
    seed: &Hash32,
    stakes: &[(Address, u64)],
) -> Result<Vec<Address>, ValidatorSetError> {
    validate_stakes(stakes)?;
    let total: u128 = stakes.iter().map(|(_, s)| u128::from(*s)).sum();
    let mut remaining: Vec<(Address, u64)> = stakes.to_vec();
    let mut remaining_stake = total;
    let mut taken: u128 = 0;
    let mut selected = Vec::new();
    for k in 0..stakes.len() {
        if holds_two_thirds(taken, total) {
            break;
        }
        let r = draw(seed, k as u32, remaining_stake);
        let index = interval_containing(&remaining, r);
        let (address, stake) = remaining.remove(index);
        selected.push(address);
        taken += u128::from(stake);
        remaining_stake -= u128::from(stake);
    }
    // Postconditions: at least two thirds, and minimal (drawing stopped at once).
    assert!(
        holds_two_thirds(taken, total),
        "drawing stops at two thirds"
    );
    assert_eq!(taken + remaining_stake, total, "stake is conserved");
    if let Some(last) = selected.last() {
        let last_stake = stakes
            .iter()
            .find(|(a, _)| a == last)
            .map(|(_, s)| u128::from(*s))
            .expect("selected from stakes");
        assert!(
            !holds_two_thirds(taken - last_stake, total),
            "the set without its last member holds less than two thirds"
        );
    }
    Ok(selected)
}

/// The index of the validator whose cumulative-stake interval contains `r`.
fn interval_containing(remaining: &[(Address, u64)], r: u128) -> usize {
    let mut cumulative: u128 = 0;
    for (index, (_, stake)) in remaining.iter().enumerate() {
        cumulative += u128::from(*stake);
        if r < cumulative {
            return index;
        }
    }
    unreachable!("r is below the remaining stake, the last cumulative sum")
}

/// CONS-VAL-1's rules for a committee's input, except that empty is allowed.
fn validate_stakes(stakes: &[(Address, u64)]) -> Result<(), ValidatorSetError> {
    if stakes.len() > MAX_VALIDATORS {
        return Err(ValidatorSetError::TooMany);
    }
    if !stakes.windows(2).all(|w| w[0].0 < w[1].0) {
        return Err(ValidatorSetError::NotSorted);
    }
    let mut total: u64 = 0;
    for (address, stake) in stakes {
        if *stake == 0 {
            return Err(ValidatorSetError::ZeroPower(*address));
        }
        total = total
            .checked_add(*stake)
            .filter(|t| *t <= MAX_TOTAL_VOTING_POWER)
            .ok_or(ValidatorSetError::TooMuchPower)?;
    }
    Ok(())
}

/// CONS-COMM-6: the proposer set of an epoch: the members of `validators`
/// (the current bonded set) that `eligible` lists, with their current voting
/// powers and fresh priorities, in ascending address order. Eligible addresses
/// that are no longer members (unbonded or removed since the committee was
/// drawn) are skipped; if none is left the result is `Empty` and the caller
/// falls back to the full set (CONS-COMM-7).
pub fn proposer_set(
    validators: &ValidatorSet,
    eligible: &[Address],
) -> Result<ValidatorSet, ValidatorSetError> {
    assert!(
        eligible.len() <= MAX_VALIDATORS,
        "a committee is drawn from a set"
    );
    let members = validators
        .validators()
        .iter()
        .filter(|v| eligible.contains(&v.address))
        .map(|v| (v.address, v.public_key, v.voting_power))
        .collect();
    ValidatorSet::new(members)
}

/// CONS-COMM-4/6: the epoch's proposer set for a bonded validator set and seed.
pub fn eligible_proposers(seed: &Hash32, validators: &ValidatorSet) -> ValidatorSet {
    let stakes: Vec<(Address, u64)> = validators
        .validators()
        .iter()
        .map(|v| (v.address, v.voting_power))
        .collect();
    let eligible = select_validators(seed, &stakes).expect("a validator set satisfies CONS-VAL-1");
    proposer_set(validators, &eligible).expect("a non-empty set selects a non-empty committee")
}

/// CONS-COMM-6: the proposer of round `round` at the height `height_offset`
/// blocks after the epoch's first height: CometBFT's selection (CONS-PROP-2)
/// over the epoch's proposer set only, started fresh at the epoch's first
/// height and advanced one increment per height (CONS-PROP-4), i.e. the
/// validator chosen by the `(height_offset + round + 1)`-th increment. Costs
/// `O((height_offset + round) × eligible)`; a driver instead keeps the current
/// height's set (`next_height`) and asks it for `proposer(round)`.
pub fn epoch_proposer(epoch_start: &ValidatorSet, height_offset: u64, round: Round) -> Address {
    assert!(
        height_offset < MAX_EPOCH_LENGTH,
        "a height within the epoch (CONS-COMM-6)"
    );
    let mut set = epoch_start.clone();
    for _ in 0..height_offset {
        set.increment_proposer_priority();
    }
    set.proposer(round)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(i: usize) -> Address {
        let mut bytes = [0u8; 20];
        bytes[12..].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        Address(bytes)
    }

    fn stakes(powers: &[u64]) -> Vec<(Address, u64)> {
        powers
            .iter()
            .enumerate()
            .map(|(i, p)| (addr(i), *p))
            .collect()
    }

    fn seed(i: u64) -> Hash32 {
        sha3_256_parts(&[b"test-seed", &i.to_be_bytes()])
    }

    fn stake_of(stakes: &[(Address, u64)], address: &Address) -> u128 {
        u128::from(stakes.iter().find(|(a, _)| a == address).unwrap().1)
    }

    #[test]
    fn cons_comm_4_deterministic() {
        let s = stakes(&[5, 1, 9, 3, 3, 7, 2]);
        let a = select_validators(&seed(1), &s).unwrap();
        assert_eq!(a, select_validators(&seed(1), &s).unwrap());
        let orders: std::collections::BTreeSet<Vec<Address>> = (0..20)
            .map(|i| select_validators(&seed(i), &s).unwrap())
            .collect();
        assert!(
            orders.len() > 10,
            "different seeds give different committees"
        );
    }

    #[test]
    fn cons_comm_4_empty_and_single() {
        assert_eq!(
            select_validators(&seed(0), &[]).unwrap(),
            Vec::<Address>::new()
        );
        assert_eq!(
            select_validators(&seed(0), &stakes(&[42])).unwrap(),
            vec![addr(0)]
        );
        assert_eq!(
            select_validators(&seed(0), &stakes(&[1])).unwrap(),
            vec![addr(0)]
        );
    }

    #[test]
    fn cons_comm_4_rejects_bad_input() {
        let mut unsorted = stakes(&[1, 2]);
        unsorted.swap(0, 1);
        assert_eq!(
            select_validators(&seed(0), &unsorted),
            Err(ValidatorSetError::NotSorted)
        );
        let mut duplicate = stakes(&[1, 2]);
        duplicate[1].0 = duplicate[0].0;
        assert_eq!(
            select_validators(&seed(0), &duplicate),
            Err(ValidatorSetError::NotSorted)
        );
        assert_eq!(
            select_validators(&seed(0), &stakes(&[1, 0])),
            Err(ValidatorSetError::ZeroPower(addr(1)))
        );
        assert_eq!(
            select_validators(&seed(0), &stakes(&[MAX_TOTAL_VOTING_POWER, 1])),
            Err(ValidatorSetError::TooMuchPower)
        );
        let too_many = stakes(&vec![1; MAX_VALIDATORS + 1]);
        assert_eq!(
            select_validators(&seed(0), &too_many),
            Err(ValidatorSetError::TooMany)
        );
    }

    #[test]
    fn cons_comm_5_exact_two_thirds_boundary() {
        // Three equal stakes: two hold exactly 2/3, which is enough (≥).
        for i in 0..50 {
            assert_eq!(
                select_validators(&seed(i), &stakes(&[1, 1, 1]))
                    .unwrap()
                    .len(),
                2
            );
        }
        // A single validator with exactly 2/3 is enough on its own; one just below is not.
        for i in 0..50 {
            let picked = select_validators(&seed(i), &stakes(&[2, 1])).unwrap();
            assert_eq!(picked.len(), if picked[0] == addr(0) { 1 } else { 2 });
            let picked = select_validators(&seed(i), &stakes(&[1999, 1001])).unwrap();
            assert_eq!(picked.len(), 2, "1999/3000 < 2/3");
        }
    }

    #[test]
    fn cons_comm_4_stake_weighted() {
        // One validator with 10× the stake of each of nine others: it is drawn
        // first with probability 10/19 (others 1/19 each).
        let s = stakes(&[1, 1, 1, 1, 10, 1, 1, 1, 1, 1]);
        let mut first = [0u32; 10];
        for i in 0..2000 {
            let picked = select_validators(&seed(i), &s).unwrap();
            let index = s.iter().position(|(a, _)| *a == picked[0]).unwrap();
            first[index] += 1;
        }
        // Expected 1052.6 and 105.3; bounds are more than 5 standard deviations wide.
        assert!((940..=1165).contains(&first[4]), "{first:?}");
        for (i, count) in first.iter().enumerate() {
            if i != 4 {
                assert!((50..=165).contains(count), "{first:?}");
                assert!(first[4] > 6 * count, "{first:?}");
            }
        }
    }

    #[test]
    fn cons_comm_2_any_vrf_output_change_changes_the_order() {
        let s = stakes(&[3; 16]);
        let previous = seed(7);
        let beta = [0x5a; 32];
        let base = select_validators(&epoch_seed(&previous, &beta), &s).unwrap();
        for bit in 0..256 {
            let mut other = beta;
            other[bit / 8] ^= 1 << (bit % 8);
            let order = select_validators(&epoch_seed(&previous, &other), &s).unwrap();
            assert_ne!(order, base, "bit {bit}");
        }
        // The previous seed matters as much.
        let order = select_validators(&epoch_seed(&seed(8), &beta), &s).unwrap();
        assert_ne!(order, base);
    }

    #[test]
    fn cons_comm_3_ticket_input_layout() {
        let input = ticket_input("blyan-test", 9, &[7u8; 32]);
        let mut body = 9u64.to_be_bytes().to_vec();
        body.extend_from_slice(&[7u8; 32]);
        assert_eq!(input, signing_bytes(Domain::VrfInput, "blyan-test", &body));
        assert_ne!(input, ticket_input("blyan-test", 10, &[7u8; 32]));
        assert_ne!(input, ticket_input("blyan-other", 9, &[7u8; 32]));
    }

    #[test]
    fn cons_comm_2_next_seed_verifies_the_proof() {
        let sk = crate::testkit::key(3).to_bytes();
        let sk: [u8; 32] = sk.into();
        let pk = vrf::public_key::<Secp256k1Sha256Tai>(&sk).unwrap();
        let previous = genesis_seed(&[1u8; 32]);
        let alpha = ticket_input("blyan-test", 1, &previous);
        let proof = vrf::prove::<Secp256k1Sha256Tai>(&sk, &alpha).unwrap();
        let beta = vrf::proof_to_hash::<Secp256k1Sha256Tai>(&proof).unwrap();
        let next = next_seed("blyan-test", 1, &previous, &pk, &proof).unwrap();
        assert_eq!(next, epoch_seed(&previous, &beta));
        // Any other epoch, seed, chain or key: rejected.
        assert!(next_seed("blyan-test", 2, &previous, &pk, &proof).is_err());
        assert!(next_seed("blyan-test", 1, &next, &pk, &proof).is_err());
        assert!(next_seed("blyan-other", 1, &previous, &pk, &proof).is_err());
        let other = vrf::public_key::<Secp256k1Sha256Tai>(&[9u8; 32]).unwrap();
        assert_eq!(
            next_seed("blyan-test", 1, &previous, &other, &proof),
            Err(VrfError::InvalidProof)
        );
    }

    fn validator_set(powers: &[u64]) -> ValidatorSet {
        ValidatorSet::new(
            powers
                .iter()
                .enumerate()
                .map(|(i, p)| (addr(i), [0u8; 33], *p))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn cons_comm_6_proposers_are_eligible_and_rotate_by_power() {
        let set = validator_set(&[10, 20, 30, 40, 50, 60]);
        let proposers = eligible_proposers(&seed(3), &set);
        let eligible: Vec<Address> = proposers.validators().iter().map(|v| v.address).collect();
        assert!(
            eligible.len() < set.len(),
            "some validators are not eligible"
        );
        // Only eligible validators propose, each as often as CometBFT's rotation over
        // the eligible powers alone says (the sequence CONS-PROP-2 gives for them).
        let powers: Vec<u64> = proposers
            .validators()
            .iter()
            .map(|v| v.voting_power)
            .collect();
        let expected = crate::consensus::proposer_sequence(&powers, 40);
        for offset in 0..20u64 {
            for round in 0..2 {
                let proposer = epoch_proposer(&proposers, offset, round);
                let index = expected[offset as usize + round as usize];
                assert_eq!(proposer, eligible[index], "height +{offset} round {round}");
            }
        }
        // Everyone who is eligible proposes within a few rotations.
        let mut seen: Vec<Address> = (0..30).map(|h| epoch_proposer(&proposers, h, 0)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, eligible);
    }

    #[test]
    fn cons_comm_6_proposer_set_keeps_keys_and_powers() {
        let set = validator_set(&[1, 2, 3]);
        let subset = proposer_set(&set, &[addr(2), addr(0)]).unwrap();
        assert_eq!(subset.len(), 2);
        assert_eq!(subset.power_of(&addr(0)), 1);
        assert_eq!(subset.power_of(&addr(2)), 3);
        assert_eq!(subset.power_of(&addr(1)), 0);
        assert_eq!(proposer_set(&set, &[]), Err(ValidatorSetError::Empty));
        // Addresses that left the set are skipped.
        let subset = proposer_set(&set, &[addr(1), addr(9)]).unwrap();
        assert_eq!(subset.len(), 1);
        assert_eq!(
            proposer_set(&set, &[addr(9)]),
            Err(ValidatorSetError::Empty)
        );
    }

    proptest! {
        /// CONS-COMM-5: at least two thirds, minimal, no duplicates, members only.
        #[test]
        fn cons_comm_5_stop_rule(powers in prop::collection::vec(1u64..1_000_000, 1..40), s in any::<u64>()) {
            let st = stakes(&powers);
            let picked = select_validators(&seed(s), &st).unwrap();
            let total: u128 = powers.iter().map(|p| u128::from(*p)).sum();
            let taken: u128 = picked.iter().map(|a| stake_of(&st, a)).sum();
            prop_assert!(3 * taken >= 2 * total);
            let last = stake_of(&st, picked.last().unwrap());
            prop_assert!(3 * (taken - last) < 2 * total);
            let mut unique = picked.clone();
            unique.sort();
            unique.dedup();
            prop_assert_eq!(unique.len(), picked.len());
        }
    }
}
