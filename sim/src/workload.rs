//! SIM-WL-*: the client workload. Transfers (with double spends, stale and
//! far-future nonces, signatures for another chain), stake changes across
//! epoch boundaries, PoL block registrations and the PoL delta loop
//! (SIM-WL-2, `crate::pol`); unresolved transactions
//! are resubmitted, as a real wallet does, since a mempool is not durable.

use crate::check::Commit;
use crate::pol::PolWorkload;
use crate::run::{KIND_CLIENT, Packet, World, envelope};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::pol::{PolBlockType, PolTx};
use blyan_state_machine::testkit::{address, pol_block, tx};
use blyan_state_machine::tx::{SignedTx, TxKind};
use blyan_state_machine::types::{BLY, Hash32, Height};
use madsim::rand::{Rng, thread_rng};
use madsim::time::{Duration, sleep};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const MAX_FEE: u128 = 100_000_000_000;
/// SIM-BOUND-2: resubmissions per tick.
const MAX_RESUBMIT_PER_TICK: usize = 64;

/// Everything the client did, for the checkers.
#[derive(Debug, Default)]
pub struct ClientLog {
    /// (sender, nonce) → the transactions competing for that nonce (one for
    /// an ordinary transaction, two for a double spend). Exactly one must commit.
    pub groups: BTreeMap<(blyan_state_machine::types::Address, u64), Vec<SignedTx>>,
    /// Transactions that must never commit.
    pub bad: BTreeSet<Hash32>,
    /// First submission time of each transaction (simulated ms).
    pub submitted_ms: BTreeMap<Hash32, u64>,
    pub stopped: bool,
}

impl ClientLog {
    fn committed_ids(canonical: &BTreeMap<Height, Commit>) -> BTreeSet<Hash32> {
        canonical
            .values()
            .flat_map(|c| c.tx_ids.iter().copied())
            .collect()
    }

    pub fn all_resolved(&self, canonical: &BTreeMap<Height, Commit>) -> bool {
        let ids = Self::committed_ids(canonical);
        self.groups
            .values()
            .all(|g| g.iter().any(|t| ids.contains(&t.id())))
    }

    /// SIM-CHECK-3.
    pub fn check(&self, canonical: &BTreeMap<Height, Commit>) -> Vec<String> {
        let ids = Self::committed_ids(canonical);
        let mut v = Vec::new();
        for id in &self.bad {
            if ids.contains(id) {
                v.push(format!(
                    "invalid transaction {} was committed",
                    hex::encode(id)
                ));
            }
        }
        for ((sender, nonce), g) in &self.groups {
            let n = g.iter().filter(|t| ids.contains(&t.id())).count();
            if n > 1 {
                v.push(format!(
                    "double spend: {n} transactions of {sender} with nonce {nonce} committed"
                ));
            }
        }
        v
    }
}

pub struct Client;

impl Client {
    pub async fn run(world: Arc<World>) {
        let chain = world.net.genesis.chain_id.clone();
        let accounts = world.net.accounts.clone();
        let validators: Vec<_> =
            world.net.validators[..world.cfg.validators - world.cfg.byzantine].to_vec();
        let mut next_nonce: BTreeMap<blyan_state_machine::types::Address, u64> = BTreeMap::new();
        let period_ms = 1_000 / world.cfg.client_rate_per_s.max(1);
        let mut tick: u64 = 0;
        // SIM-WL-2: two accounts train; every validator attests.
        let mut pol = PolWorkload::new(accounts[..2].to_vec(), world.net.validators.clone());
        loop {
            sleep(Duration::from_millis(period_ms)).await;
            tick += 1;
            if tick.is_multiple_of((3_000 / period_ms).max(1)) {
                Self::resubmit(&world);
            }
            if world.client_log.lock().expect("single-threaded").stopped {
                continue;
            }
            let mut rng = thread_rng();
            if tick.is_multiple_of((1_000 / period_ms).max(1)) {
                let ledger = {
                    let obs = world.observer.lock().expect("single-threaded");
                    obs.honest
                        .iter()
                        .max_by_key(|i| (obs.height(**i), std::cmp::Reverse(**i)))
                        .and_then(|i| obs.ledgers.get(i).cloned())
                };
                if let Some(ledger) = ledger {
                    let txs = pol.step(
                        &chain,
                        &world.model,
                        &mut world.pol.lock().expect("single-threaded"),
                        &ledger,
                        world.elapsed_ms(),
                        &mut rng,
                        &mut |k| {
                            let e = next_nonce.entry(address(k)).or_insert(0);
                            *e += 1;
                            *e - 1
                        },
                    );
                    Self::record_and_submit(&world, txs);
                }
            }
            let r = rng.gen_range(0..100);
            let a = &accounts[rng.gen_range(0..accounts.len())];
            let to = address(&accounts[rng.gen_range(0..accounts.len())]);
            let transfer = |nonce: u64, amount: u128, chain: &str| {
                tx(chain, a, nonce, TxKind::Transfer { to, amount }, MAX_FEE)
            };
            let mut nonce_of = |k: &k256::ecdsa::SigningKey| {
                let e = next_nonce.entry(address(k)).or_insert(0);
                let n = *e;
                *e += 1;
                n
            };
            let mut good: Vec<SignedTx> = Vec::new();
            let mut bad: Vec<SignedTx> = Vec::new();
            let mut late_double_spend: Option<SignedTx> = None;
            // Transactions that are each a group of their own.
            let mut singles: Vec<SignedTx> = Vec::new();
            match r {
                0..70 => good.push(transfer(nonce_of(a), BLY, &chain)),
                70..76 => {
                    // Double spend: same nonce, two recipients, two nodes.
                    let n = nonce_of(a);
                    let other = tx(
                        &chain,
                        a,
                        n,
                        TxKind::Transfer {
                            to: address(a),
                            amount: 2 * BLY,
                        },
                        MAX_FEE,
                    );
                    good.push(transfer(n, BLY, &chain));
                    good.push(other);
                }
                76..82 => {
                    let n = *next_nonce.get(&address(a)).unwrap_or(&0);
                    if n > 0 && rng.gen_bool(0.5) {
                        // A used nonce: it competes with that nonce's group
                        // (stale once the group commits; exactly one may).
                        late_double_spend = Some(transfer(n - 1, 3 * BLY, &chain));
                    } else {
                        bad.push(transfer(n + 1_000, BLY, &chain));
                    }
                }
                82..86 => bad.push(transfer(
                    *next_nonce.get(&address(a)).unwrap_or(&0),
                    BLY,
                    "another-chain",
                )),
                86..94 => {
                    let v = &validators[rng.gen_range(0..validators.len())];
                    let kind = match rng.gen_range(0..8) {
                        0..3 => TxKind::Bond { amount: BLY },
                        3..6 => TxKind::Unbond { amount: BLY },
                        // TX-16: validators registered theirs at genesis;
                        // a second one fails (and pays its fee).
                        6 => TxKind::SetVrfKey {
                            public_key: blyan_state_machine::consensus::vrf_public_key(v),
                        },
                        _ => {
                            // CONS-COMM-7: an account (no node runs it)
                            // bonds the minimum and registers its VRF key,
                            // entering the committee draws from the next
                            // epoch but one; it never votes, so downtime
                            // jails it mid-epoch, moving the proposer set.
                            let n = nonce_of(a);
                            singles.push(tx(&chain, a, n, TxKind::Bond { amount: BLY }, MAX_FEE));
                            let public_key = blyan_state_machine::consensus::vrf_public_key(a);
                            singles.push(tx(
                                &chain,
                                a,
                                nonce_of(a),
                                TxKind::SetVrfKey { public_key },
                                MAX_FEE,
                            ));
                            TxKind::Bond { amount: BLY }
                        }
                    };
                    good.push(tx(&chain, v, nonce_of(v), kind, MAX_FEE));
                }
                _ => {
                    let mut payload = [0u8; 64];
                    rng.fill(&mut payload[..]);
                    let block = pol_block(
                        PolBlockType::Meta,
                        payload[..32].try_into().expect("32"),
                        Vec::new(),
                        &payload,
                        address(a),
                    );
                    good.push(tx(
                        &chain,
                        a,
                        nonce_of(a),
                        TxKind::Pol(Box::new(PolTx::RegisterBlock(block))),
                        MAX_FEE,
                    ));
                }
            }
            let now = world.elapsed_ms();
            let mut log = world.client_log.lock().expect("single-threaded");
            if let Some(first) = good.first() {
                let key = (first.sender().expect("valid key"), first.body.nonce);
                log.groups.insert(key, good.clone());
            }
            for t in &bad {
                log.bad.insert(t.id());
            }
            if let Some(t) = &late_double_spend {
                let key = (t.sender().expect("valid key"), t.body.nonce);
                let group = log.groups.entry(key).or_default();
                if !group.iter().any(|g| g.id() == t.id()) {
                    group.push(t.clone());
                }
                log.submitted_ms.entry(t.id()).or_insert(now);
            }
            for t in good.iter().chain(&bad) {
                log.submitted_ms.entry(t.id()).or_insert(now);
            }
            drop(log);
            for t in good.iter().chain(&bad).chain(&late_double_spend) {
                Self::submit(&world, t);
            }
            if !singles.is_empty() {
                Self::record_and_submit(&world, singles);
            }
        }
    }

    /// Each transaction is its own group (resubmitted until it commits).
    fn record_and_submit(world: &Arc<World>, txs: Vec<SignedTx>) {
        let now = world.elapsed_ms();
        let mut log = world.client_log.lock().expect("single-threaded");
        for t in &txs {
            let key = (t.sender().expect("valid key"), t.body.nonce);
            log.groups.insert(key, vec![t.clone()]);
            log.submitted_ms.entry(t.id()).or_insert(now);
        }
        drop(log);
        for t in &txs {
            Self::submit(world, t);
        }
    }

    fn submit(world: &Arc<World>, t: &SignedTx) {
        let honest = world.cfg.validators - world.cfg.byzantine;
        let j = thread_rng().gen_range(0..honest);
        world.transmit(
            world.client_endpoint(),
            &[j],
            &Packet::new(envelope(KIND_CLIENT, &t.encode())),
        );
    }

    /// Unresolved groups older than 2 s go out again (bounded per tick).
    fn resubmit(world: &Arc<World>) {
        let canonical = world.observer.lock().expect("single-threaded").canonical();
        let ids = ClientLog::committed_ids(&canonical);
        let now = world.elapsed_ms();
        let pending: Vec<SignedTx> = {
            let log = world.client_log.lock().expect("single-threaded");
            log.groups
                .values()
                .filter(|g| !g.iter().any(|t| ids.contains(&t.id())))
                .flatten()
                .filter(|t| {
                    log.submitted_ms
                        .get(&t.id())
                        .is_some_and(|s| now >= s + 2_000)
                })
                .take(MAX_RESUBMIT_PER_TICK)
                .cloned()
                .collect()
        };
        for t in &pending {
            Self::submit(world, t);
        }
    }
}
