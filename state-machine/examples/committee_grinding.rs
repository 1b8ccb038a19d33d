//! CONS-COMM-9: the grinding bound CONS-COMM-4 leaves, measured.
//!
//! A coalition that proposes rounds `0..j` of an epoch's boundary height can
//! publish or withhold each of its boundary blocks, so it picks the next seed
//! among at most `j + 1` (one VRF output per round's proposer, each fixed by
//! CONS-COMM-3's input). The next committee is drawn from stakes fixed an
//! epoch earlier (CONS-COMM-7), so the seed is its only lever. This draws
//! committees of 100 validators of equal stake for independent seeds and
//! reports what a coalition gains by choosing the best of `m` seeds: its mean
//! share of the committee's stake (its expected share of the epoch's
//! proposals, CONS-COMM-6) and how often it holds at least a third of it.
//!
//! `cargo run --release -p blyan-state-machine --example committee_grinding [trials]`

use blyan_state_machine::consensus::select_validators;
use blyan_state_machine::crypto::sha3_256_parts;
use blyan_state_machine::types::Address;

const VALIDATORS: usize = 100;
const SEED_CHOICES: [usize; 4] = [1, 2, 3, 5];
const COALITIONS_PERCENT: [usize; 3] = [10, 20, 33];

fn main() {
    let trials: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("trials: a number"))
        .unwrap_or(10_000);
    let stakes: Vec<(Address, u64)> = (0..VALIDATORS)
        .map(|i| {
            let mut a = [0u8; 20];
            a[12..].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            (Address(a), 1)
        })
        .collect();
    let max_choices = *SEED_CHOICES.iter().max().expect("choices");
    // share_sum[c][m], third_count[c][m]
    let mut share_sum = vec![vec![0f64; SEED_CHOICES.len()]; COALITIONS_PERCENT.len()];
    let mut third_count = vec![vec![0u64; SEED_CHOICES.len()]; COALITIONS_PERCENT.len()];
    let mut committee_sizes = 0usize;
    let started = std::time::Instant::now();
    for t in 0..trials {
        // The committees of `max_choices` independent seeds.
        let committees: Vec<Vec<Address>> = (0..max_choices)
            .map(|j| {
                let seed = sha3_256_parts(&[
                    b"grinding-trial",
                    &t.to_be_bytes(),
                    &(j as u64).to_be_bytes(),
                ]);
                select_validators(&seed, &stakes).expect("valid stakes")
            })
            .collect();
        committee_sizes += committees[0].len();
        for (c, percent) in COALITIONS_PERCENT.iter().enumerate() {
            // The coalition: the first `percent` validators (equal stakes).
            let members = VALIDATORS * percent / 100;
            let share = |committee: &Vec<Address>| {
                let ours = committee
                    .iter()
                    .filter(|a| stakes[..members].iter().any(|(s, _)| s == *a))
                    .count();
                ours as f64 / committee.len() as f64
            };
            for (m, choices) in SEED_CHOICES.iter().enumerate() {
                let best = committees[..*choices]
                    .iter()
                    .map(share)
                    .fold(0f64, f64::max);
                share_sum[c][m] += best;
                third_count[c][m] += u64::from(3.0 * best >= 1.0);
            }
        }
    }
    println!(
        "{trials} trials, {VALIDATORS} validators of equal stake, mean committee size {:.1}, {:.1} s",
        committee_sizes as f64 / trials as f64,
        started.elapsed().as_secs_f64()
    );
    println!("| coalition stake | seeds to choose from | mean committee share | P(share >= 1/3) |");
    println!("|---:|---:|---:|---:|");
    for (c, percent) in COALITIONS_PERCENT.iter().enumerate() {
        for (m, choices) in SEED_CHOICES.iter().enumerate() {
            println!(
                "| {percent} % | {choices} | {:.2} % | {:.2} % |",
                100.0 * share_sum[c][m] / trials as f64,
                100.0 * third_count[c][m] as f64 / trials as f64
            );
        }
    }
}
