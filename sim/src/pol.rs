//! SIM-WL-2 and SIM-CHECK-7: the Proof-of-Learning delta workload and the
//! checkers of the acceptance rules (spec/pol.md POL-20..37).
//!
//! The simulator runs no model. Losses are inputs: every delta the workload
//! builds gets a true improvement drawn from three classes (good, marginal,
//! worse), and [`PolOracle::report`] is what a validator's evaluation would
//! measure: the true losses with a small per-validator error, or, for the
//! validators configured to lie, a delta loss 20 % below the truth. Trainers
//! commit and reveal deltas and validators commit and reveal attestations as
//! ordinary signed transactions through the faulty network; the checkers then
//! read the decisions the honest nodes committed.

use crate::check::Commit;
use blyan_state_machine::crypto::sha3_256_parts;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::pol::{
    DeltaDecision, DeltaOutcome, PolBlock, PolBlockType, PolParams, PolTx, RejectReason, SemVer,
    TargetKey, attestation_commitment, delta_commitment,
};
use blyan_state_machine::testkit::{address, pol_block, tx};
use blyan_state_machine::tx::{SignedTx, TxKind};
use blyan_state_machine::types::{Address, Hash32, Height};
use k256::ecdsa::SigningKey;
use madsim::rand::Rng;
use std::collections::{BTreeMap, BTreeSet};

/// The most a PoL transaction pays per gas (as the rest of the client).
const MAX_FEE: u128 = 100_000_000_000;

/// The true loss of the genesis target (3.5 nats).
pub const GENESIS_LOSS_MICRONATS: u64 = 3_500_000;
/// SIM-POL-2: an honest validator's measurement is within this relative
/// error of the truth (a tenth of the 1 % attestation tolerance).
pub const NOISE_PPM: u64 = 1_000;
/// A lying validator reports the delta's loss this much below the truth.
pub const LIE_PPM: u64 = 200_000;
/// SIM-POL-1 classes of true improvement (ppm of the head's loss).
pub const GOOD_PPM: std::ops::RangeInclusive<i64> = 15_000..=80_000;
pub const MARGINAL_PPM: std::ops::RangeInclusive<i64> = 0..=5_000;
pub const WORSE_PPM: std::ops::RangeInclusive<i64> = -50_000..=-5_000;
/// SIM-BOUND-3: deltas a trainer keeps in flight.
pub const MAX_IN_FLIGHT: usize = 2;

const NOISE_TAG: &[u8] = b"blyan-sim/pol-noise/v1";
const SALT_TAG: &[u8] = b"blyan-sim/attest-salt/v1";

/// The simulated model: the genesis blocks of one model with one trainable
/// layer and a validation data block.
#[derive(Clone, Debug)]
pub struct SimModel {
    pub meta: PolBlock,
    pub layer: PolBlock,
    pub data: PolBlock,
}

impl SimModel {
    pub fn new(submitter: Address) -> SimModel {
        let meta = pol_block(
            PolBlockType::Meta,
            [0; 32],
            Vec::new(),
            b"sim-meta",
            submitter,
        );
        let id = meta.id();
        let mut layer = pol_block(PolBlockType::Layer, id, vec![id], b"sim-layer-0", submitter);
        layer.layer = Some(0);
        let data = pol_block(
            PolBlockType::Data,
            id,
            vec![id],
            b"sim-validation-data",
            submitter,
        );
        SimModel { meta, layer, data }
    }

    pub fn genesis_blocks(&self) -> Vec<PolBlock> {
        vec![self.meta.clone(), self.layer.clone(), self.data.clone()]
    }

    pub fn target(&self) -> TargetKey {
        self.layer.target_key(PolBlockType::Layer)
    }

    /// A delta on `head` (id and version), unique by `nonce_bytes`.
    pub fn delta(
        &self,
        head_id: Hash32,
        head_version: SemVer,
        submitter: Address,
        nonce_bytes: &[u8; 32],
    ) -> PolBlock {
        let mut d = pol_block(
            PolBlockType::Delta,
            self.meta.id(),
            vec![head_id, self.data.id()],
            nonce_bytes,
            submitter,
        );
        d.version = head_version.bump_for_delta().expect("small versions");
        d.layer = Some(0);
        d.base_block = Some(head_id);
        d.base_version = Some(head_version);
        d
    }
}

/// What the workload knows to be true about one delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truth {
    pub base: Hash32,
    pub loss_micronats: u64,
    pub improvement_ppm: i64,
}

/// The stand-in for evaluating a model (SIM-POL-2).
#[derive(Debug, Default)]
pub struct PolOracle {
    /// True loss of every target version the workload built (genesis included).
    pub losses: BTreeMap<Hash32, u64>,
    pub deltas: BTreeMap<Hash32, Truth>,
    /// RevealDelta transaction id → delta id.
    pub reveals: BTreeMap<Hash32, Hash32>,
    /// Validators that report a false loss.
    pub liars: BTreeSet<Address>,
    /// Every other validator.
    pub honest: BTreeSet<Address>,
}

impl PolOracle {
    pub fn new(
        genesis_target: Hash32,
        honest: BTreeSet<Address>,
        liars: BTreeSet<Address>,
    ) -> Self {
        PolOracle {
            losses: [(genesis_target, GENESIS_LOSS_MICRONATS)].into(),
            honest,
            liars,
            ..PolOracle::default()
        }
    }

    /// Records a new delta on `base` with the given true improvement.
    pub fn add_delta(&mut self, id: Hash32, base: Hash32, improvement_ppm: i64) {
        let base_loss = *self.losses.get(&base).expect("the workload built the base");
        let loss = scale(base_loss, -improvement_ppm);
        self.losses.insert(id, loss);
        self.deltas.insert(
            id,
            Truth {
                base,
                loss_micronats: loss,
                improvement_ppm,
            },
        );
    }

    /// What `validator` reveals for `delta`: `(loss, head_loss)` in
    /// micro-nats. An honest validator measures the truth with a
    /// deterministic error of at most [`NOISE_PPM`] on each loss; a liar
    /// reports the head's true loss and the delta's loss [`LIE_PPM`] low.
    pub fn report(&self, validator: &Address, delta: &Hash32) -> Option<(u64, u64)> {
        let t = self.deltas.get(delta)?;
        let head = *self.losses.get(&t.base)?;
        if self.liars.contains(validator) {
            return Some((scale(t.loss_micronats, -(LIE_PPM as i64)), head));
        }
        let noise = |which: u8| {
            let h = sha3_256_parts(&[NOISE_TAG, &validator.0, delta, &[which]]);
            let x = u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % (2 * NOISE_PPM + 1);
            x as i64 - NOISE_PPM as i64
        };
        Some((scale(t.loss_micronats, noise(0)), scale(head, noise(1))))
    }

    /// The range of what honest validators report for `delta`: ((min, max)
    /// of the loss, (min, max) of the head loss).
    pub fn honest_range(&self, delta: &Hash32) -> Option<((u64, u64), (u64, u64))> {
        let reports: Vec<(u64, u64)> = self
            .honest
            .iter()
            .filter_map(|v| self.report(v, delta))
            .collect();
        let lo = reports.iter().map(|r| r.0);
        let hi = reports.iter().map(|r| r.1);
        Some((
            (lo.clone().min()?, lo.max()?),
            (hi.clone().min()?, hi.max()?),
        ))
    }
}

/// The attestation salt a simulated validator uses for `delta`.
pub fn salt(validator: &Address, delta: &Hash32) -> Hash32 {
    sha3_256_parts(&[SALT_TAG, &validator.0, delta])
}

/// `value × (1 + ppm / 10⁶)`, in integers.
fn scale(value: u64, ppm: i64) -> u64 {
    let v = i128::from(value) * (1_000_000 + i128::from(ppm)) / 1_000_000;
    u64::try_from(v.max(0)).expect("losses stay in range")
}

/// SIM-WL-2: the trainers' and validators' side of the PoL loop, driven by
/// the state an honest node committed (what they would read through the
/// API) and acting through signed transactions.
#[derive(Debug)]
pub struct PolWorkload {
    trainers: Vec<SigningKey>,
    validators: Vec<SigningKey>,
    in_flight: BTreeMap<Hash32, InFlight>,
    attest_committed: BTreeSet<(Address, Hash32)>,
    attest_revealed: BTreeSet<(Address, Hash32)>,
}

#[derive(Debug)]
struct InFlight {
    block: PolBlock,
    revealed: bool,
    seen_pending: bool,
    started_ms: u64,
}

/// A trainer gives up on a delta this long after committing it (its reveal
/// or the commitment was lost; the commitment expires on chain).
const GIVE_UP_MS: u64 = 60_000;

impl PolWorkload {
    pub fn new(trainers: Vec<SigningKey>, validators: Vec<SigningKey>) -> Self {
        assert!(!trainers.is_empty() && !validators.is_empty());
        PolWorkload {
            trainers,
            validators,
            in_flight: BTreeMap::new(),
            attest_committed: BTreeSet::new(),
            attest_revealed: BTreeSet::new(),
        }
    }

    /// One step: reveal committed deltas, maybe start a new one, commit and
    /// reveal attestations for pending deltas.
    /// Returns the transactions to submit; `nonce_of` hands out the next
    /// nonce of a key (shared with the rest of the client).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        chain_id: &str,
        model: &SimModel,
        oracle: &mut PolOracle,
        ledger: &Ledger,
        now_ms: u64,
        rng: &mut impl Rng,
        nonce_of: &mut dyn FnMut(&SigningKey) -> u64,
    ) -> Vec<SignedTx> {
        let h = ledger.height();
        let pol = ledger.pol();
        let mut out = Vec::new();
        // Trainers: reveal once the commitment is on chain (POL-21 wants a
        // later block, and the reveal can only land after height h).
        let trainers = &self.trainers;
        self.in_flight.retain(|id, f| {
            let pending = pol.pending_delta(id).is_some();
            f.seen_pending |= pending;
            let decided = f.seen_pending && !pending;
            !decided && now_ms.saturating_sub(f.started_ms) < GIVE_UP_MS
        });
        for (id, f) in &mut self.in_flight {
            let commitment = delta_commitment(id, &f.block.submitter);
            if !f.revealed && pol.delta_commit(&commitment).is_some() {
                let key = trainers
                    .iter()
                    .find(|k| address(k) == f.block.submitter)
                    .expect("built by a trainer");
                let t = tx(
                    chain_id,
                    key,
                    nonce_of(key),
                    TxKind::Pol(Box::new(PolTx::RevealDelta(f.block.clone()))),
                    MAX_FEE,
                );
                oracle.reveals.insert(t.id(), *id);
                f.revealed = true;
                out.push(t);
            }
        }
        if self.in_flight.len() < MAX_IN_FLIGHT
            && rng.gen_bool(0.3)
            && let Some(head) = pol.head(&model.target())
            && oracle.losses.contains_key(&head.block_id)
        {
            let improvement_ppm = match rng.gen_range(0..4) {
                0 | 1 => rng.gen_range(GOOD_PPM),
                2 => rng.gen_range(MARGINAL_PPM),
                _ => rng.gen_range(WORSE_PPM),
            };
            let key = &self.trainers[rng.gen_range(0..self.trainers.len())];
            let mut unique = [0u8; 32];
            rng.fill(&mut unique[..]);
            let block = model.delta(head.block_id, head.version, address(key), &unique);
            let id = block.id();
            oracle.add_delta(id, head.block_id, improvement_ppm);
            out.push(tx(
                chain_id,
                key,
                nonce_of(key),
                TxKind::Pol(Box::new(PolTx::CommitDelta {
                    commitment: delta_commitment(&id, &address(key)),
                })),
                MAX_FEE,
            ));
            self.in_flight.insert(
                id,
                InFlight {
                    block,
                    revealed: false,
                    seen_pending: false,
                    started_ms: now_ms,
                },
            );
        }
        // Validators: commit inside the commit window, reveal inside the
        // reveal window (POL-30..32); the transaction lands after height h.
        let pending: Vec<(Hash32, Height, Height)> = pol
            .pending_deltas()
            .map(|p| (p.delta_id, p.commit_end_height, p.reveal_end_height))
            .collect();
        let live: BTreeSet<Hash32> = pending.iter().map(|p| p.0).collect();
        self.attest_committed.retain(|(_, d)| live.contains(d));
        self.attest_revealed.retain(|(_, d)| live.contains(d));
        for (delta, commit_end, reveal_end) in pending {
            for key in &self.validators {
                let a = address(key);
                let Some((loss, head_loss)) = oracle.report(&a, &delta) else {
                    continue; // Not a delta of this workload.
                };
                let salt = salt(&a, &delta);
                let kind = if h < commit_end && self.attest_committed.insert((a, delta)) {
                    PolTx::CommitAttestation {
                        delta_id: delta,
                        commitment: attestation_commitment(&delta, loss, head_loss, &salt, &a),
                    }
                } else if h >= commit_end
                    && h < reveal_end
                    && self.attest_committed.contains(&(a, delta))
                    && self.attest_revealed.insert((a, delta))
                {
                    PolTx::RevealAttestation {
                        delta_id: delta,
                        loss_micronats: loss,
                        head_loss_micronats: head_loss,
                        salt,
                    }
                } else {
                    continue;
                };
                out.push(tx(
                    chain_id,
                    key,
                    nonce_of(key),
                    TxKind::Pol(Box::new(kind)),
                    MAX_FEE,
                ));
            }
        }
        out
    }
}

/// What the PoL workload produced, for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolSummary {
    pub deltas_built: usize,
    pub reveals_committed: usize,
    pub accepted: usize,
    pub rejected_insufficient: usize,
    pub rejected_no_quorum: usize,
    pub rejected_stale: usize,
}

impl PolSummary {
    /// Adds another run's counts (for a sweep's totals).
    pub fn add(&mut self, other: &PolSummary) {
        self.deltas_built += other.deltas_built;
        self.reveals_committed += other.reveals_committed;
        self.accepted += other.accepted;
        self.rejected_insufficient += other.rejected_insufficient;
        self.rejected_no_quorum += other.rejected_no_quorum;
        self.rejected_stale += other.rejected_stale;
    }
}

/// SIM-CHECK-7: the acceptance rules, checked on the canonical chain's
/// decisions against the oracle. `ledger` is the canonical node's latest.
pub fn check(
    oracle: &PolOracle,
    model: &SimModel,
    params: &PolParams,
    canonical: &BTreeMap<Height, Commit>,
    ledger: Option<&Ledger>,
) -> (Vec<String>, PolSummary) {
    let mut v = Vec::new();
    let mut summary = PolSummary {
        deltas_built: oracle.deltas.len(),
        ..PolSummary::default()
    };
    let mut head = model.layer.id();
    let mut decided: BTreeMap<Hash32, Height> = BTreeMap::new();
    for (height, commit) in canonical {
        for d in &commit.pol_decisions {
            if decided.insert(d.delta_id, *height).is_some() {
                v.push(format!(
                    "POL-38: delta {} decided twice (again at height {height})",
                    short(&d.delta_id)
                ));
                continue;
            }
            let Some(truth) = oracle.deltas.get(&d.delta_id) else {
                v.push(format!(
                    "decision at height {height} for delta {} that no trainer built",
                    short(&d.delta_id)
                ));
                continue;
            };
            check_decision(oracle, params, d, truth, head, *height, &mut v);
            match d.outcome {
                DeltaOutcome::Accepted { .. } => {
                    summary.accepted += 1;
                    head = d.delta_id;
                }
                DeltaOutcome::Rejected(RejectReason::Stale) => summary.rejected_stale += 1,
                DeltaOutcome::Rejected(RejectReason::NoQuorum) => summary.rejected_no_quorum += 1,
                DeltaOutcome::Rejected(RejectReason::InsufficientImprovement) => {
                    summary.rejected_insufficient += 1
                }
            }
        }
    }
    // POL-35: the head is the last accepted delta (or the genesis block).
    if let Some(l) = ledger {
        let on_chain = l.pol().head(&model.target()).map(|h| h.block_id);
        if on_chain != Some(head) {
            v.push(format!(
                "POL-35: the target's head is {:?}, but the decisions make it {}",
                on_chain.map(|h| short(&h)),
                short(&head)
            ));
        }
    }
    // POL-30/38: every delta revealed successfully is decided at the end of
    // its reveal window, once the chain gets there.
    let top = canonical.keys().next_back().copied().unwrap_or(0);
    for (height, commit) in canonical {
        for id in &commit.tx_ids {
            let Some(delta) = oracle.reveals.get(id) else {
                continue;
            };
            if commit.failed_tx_ids.contains(id) {
                continue;
            }
            summary.reveals_committed += 1;
            let end =
                height + params.attest_commit_window_blocks + params.attest_reveal_window_blocks;
            match decided.get(delta) {
                Some(h) if *h == end => {}
                Some(h) => v.push(format!(
                    "POL-30: delta {} revealed at height {height} was decided at {h}, not at the end of its windows ({end})",
                    short(delta)
                )),
                None if top >= end => v.push(format!(
                    "POL-30: delta {} revealed at height {height} was never decided (chain at {top})",
                    short(delta)
                )),
                None => {}
            }
        }
    }
    (v, summary)
}

fn check_decision(
    oracle: &PolOracle,
    params: &PolParams,
    d: &DeltaDecision,
    truth: &Truth,
    head: Hash32,
    height: Height,
    v: &mut Vec<String>,
) {
    let id = short(&d.delta_id);
    let stale = matches!(d.outcome, DeltaOutcome::Rejected(RejectReason::Stale));
    // POL-33: stale exactly when the base is no longer the head.
    if (truth.base != head) != stale {
        v.push(format!(
            "POL-33: delta {id} at height {height}: base is {} the head, outcome {:?}",
            if truth.base == head {
                "still"
            } else {
                "no longer"
            },
            d.outcome
        ));
    }
    // POL-34: agreed values exactly when there is a quorum.
    let quorum = d.agreed_loss_micronats.is_some();
    let no_quorum = d.outcome == DeltaOutcome::Rejected(RejectReason::NoQuorum);
    if quorum != d.agreed_head_loss_micronats.is_some() || no_quorum != (!quorum && !stale) {
        v.push(format!(
            "POL-34: delta {id}: outcome {:?} with agreed losses {:?}/{:?}",
            d.outcome, d.agreed_loss_micronats, d.agreed_head_loss_micronats
        ));
    }
    if let (Some(loss), Some(head_loss)) = (d.agreed_loss_micronats, d.agreed_head_loss_micronats) {
        // POL-34: with less than a third of the stake lying, the
        // stake-weighted medians lie within what honest validators measured.
        if let Some(((lo, hi), (hlo, hhi))) = oracle.honest_range(&d.delta_id)
            && !(lo <= loss && loss <= hi && hlo <= head_loss && head_loss <= hhi)
        {
            v.push(format!(
                "POL-34: delta {id}: agreed losses {loss}/{head_loss} outside the honest validators' measurements [{lo}, {hi}]/[{hlo}, {hhi}]"
            ));
        }
        // POL-36: a validator that revealed a false loss earns nothing.
        for (a, _) in &d.honest_attestors {
            if oracle.liars.contains(a) {
                v.push(format!(
                    "POL-36: lying validator {a} counted as an honest attestor of delta {id}"
                ));
            }
        }
    }
    // POL-35: only a true improvement of at least 1 % may be accepted, and a
    // good delta judged by an honest median is.
    let accepted = matches!(d.outcome, DeltaOutcome::Accepted { .. });
    if accepted && truth.improvement_ppm < params.min_improvement_ppm as i64 {
        v.push(format!(
            "POL-35: delta {id} accepted with a true improvement of {} ppm (agreed {} ppm)",
            truth.improvement_ppm, d.improvement_ppm
        ));
    }
    if d.outcome == DeltaOutcome::Rejected(RejectReason::InsufficientImprovement)
        && truth.improvement_ppm >= *GOOD_PPM.start()
    {
        v.push(format!(
            "POL-35: delta {id} with a true improvement of {} ppm rejected as insufficient (agreed {} ppm)",
            truth.improvement_ppm, d.improvement_ppm
        ));
    }
}

fn short(id: &Hash32) -> String {
    hex::encode(&id[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oracle() -> (PolOracle, Hash32) {
        let honest: BTreeSet<Address> = (1..=3).map(|i| Address([i; 20])).collect();
        let liars = [Address([9; 20])].into();
        let mut o = PolOracle::new([7; 32], honest, liars);
        o.add_delta([1; 32], [7; 32], 20_000);
        (o, [1; 32])
    }

    #[test]
    fn honest_reports_are_near_the_truth_and_liars_far() {
        let (o, d) = oracle();
        let truth = o.deltas[&d].loss_micronats;
        assert_eq!(truth, 3_430_000);
        for v in &o.honest {
            let (loss, head) = o.report(v, &d).expect("known delta");
            assert!(loss.abs_diff(truth) <= truth / 1_000, "{loss}");
            assert!(head.abs_diff(GENESIS_LOSS_MICRONATS) <= GENESIS_LOSS_MICRONATS / 1_000);
        }
        let (lie, head) = o.report(&Address([9; 20]), &d).expect("known delta");
        assert_eq!((lie, head), (2_744_000, GENESIS_LOSS_MICRONATS));
        let ((lo, hi), _) = o.honest_range(&d).expect("honest reports");
        assert!(lo <= hi && lie < lo);
        assert_eq!(o.report(&Address([1; 20]), &[2; 32]), None);
    }
}
