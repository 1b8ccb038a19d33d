//! Reward policy: emission, epoch pools and claims (spec/rewards.md, RWD-*).
//!
//! What it does: defines how much is minted per block (RWD-1), how an epoch's
//! budget splits into pools (RWD-2, RWD-3), what each kind of work claims
//! (RWD-10..14), and how claims are paid at the end of an epoch, scaled pro
//! rata so that no pool ever pays more than its budget (RWD-4, INV-RWD-BUDGET).
//!
//! What it deliberately does not do: move balances. [`RewardState::settle_epoch`]
//! returns the amounts the ledger mints; the ledger credits them and counts
//! them as minted supply.
//!
//! Host call order per block: `accrue_*` while applying transactions and after
//! [`crate::pol::PolState::end_block`] (feed each event to
//! [`RewardState::accrue_pol_event`]); at the end of the last block of an epoch
//! (`height % epoch_length_blocks == 0`), [`RewardState::settle_epoch`].

use crate::pol::{DeltaOutcome, PPM, PolEvent};
use crate::state::{StateKey, Touched, ns};
use crate::types::{Address, Amount, BLY, amount_str};
use imbl::OrdMap;
use rkyv::{Archive, Deserialize as RkyvDeserialize, Serialize as RkyvSerialize};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Basis points in a whole.
pub const BPS: u64 = 10_000;
/// Milli-units in a whole (difficulty and quality factors).
pub const MILLI: u64 = 1_000;
/// Milliseconds in a protocol day (RWD-1).
pub const DAY_MS: u64 = 86_400_000;

/// The reward pools of an epoch (RWD-2). The discriminant byte is part of keys.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Archive,
    RkyvSerialize,
    RkyvDeserialize,
    Serialize,
    Deserialize,
)]
pub enum RewardPool {
    /// Claims in base units (RWD-10).
    Inference,
    /// Claims in base units (RWD-11).
    Learning,
    /// Half of validation: claims are stake weights (RWD-12).
    Attestation,
    /// Half of validation: claims are stake weights (RWD-13).
    Signing,
    /// Claims in base units (RWD-14).
    Datasets,
}

impl RewardPool {
    pub const ALL: [RewardPool; 5] = [
        RewardPool::Inference,
        RewardPool::Learning,
        RewardPool::Attestation,
        RewardPool::Signing,
        RewardPool::Datasets,
    ];

    /// Key byte (RWD-K1).
    pub fn byte(self) -> u8 {
        match self {
            RewardPool::Inference => 0,
            RewardPool::Learning => 1,
            RewardPool::Attestation => 2,
            RewardPool::Signing => 3,
            RewardPool::Datasets => 4,
        }
    }

    fn from_byte(b: u8) -> Option<RewardPool> {
        RewardPool::ALL.into_iter().find(|p| p.byte() == b)
    }

    /// RWD-4: weight pools always pay their whole budget pro rata; amount
    /// pools pay claims in full up to their budget.
    pub fn is_weighted(self) -> bool {
        matches!(self, RewardPool::Attestation | RewardPool::Signing)
    }
}

/// Reward parameters, fixed at genesis (RWD-P1).
#[derive(
    Clone, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize, Serialize, Deserialize,
)]
pub struct RewardParams {
    #[serde(with = "amount_str")]
    pub daily_budget: Amount,
    pub target_block_time_ms: u64,
    pub epoch_length_blocks: u64,
    pub inference_bps: u64,
    pub learning_bps: u64,
    pub validation_bps: u64,
    pub datasets_bps: u64,
    /// Share of the validation budget for PoL attestors; the rest pays commit signers.
    pub validation_attestor_bps: u64,
    #[serde(with = "amount_str")]
    pub per_1pct_improvement: Amount,
    pub difficulty_min_milli: u64,
    pub difficulty_max_milli: u64,
    /// Cumulative improvement of a target at which difficulty reaches its maximum.
    pub difficulty_saturation_ppm: u64,
    #[serde(with = "amount_str")]
    pub per_1k_tokens: Amount,
    pub quality_min_milli: u64,
    pub quality_max_milli: u64,
    /// Datasets claim per accepted delta, as a share of its learning reward.
    pub dataset_reward_bps: u64,
    /// Bound on distinct claimants per pool per epoch.
    pub max_claimants_per_pool: u32,
}

impl Default for RewardParams {
    fn default() -> Self {
        RewardParams {
            daily_budget: 273_972 * BLY,
            target_block_time_ms: 2_000,
            epoch_length_blocks: 43_200,
            inference_bps: 4_500,
            learning_bps: 3_500,
            validation_bps: 1_000,
            datasets_bps: 1_000,
            validation_attestor_bps: 5_000,
            per_1pct_improvement: 500 * BLY,
            difficulty_min_milli: 1_000,
            difficulty_max_milli: 3_000,
            difficulty_saturation_ppm: 500_000,
            per_1k_tokens: BLY,
            quality_min_milli: 500,
            quality_max_milli: 1_500,
            dataset_reward_bps: 2_000,
            max_claimants_per_pool: 100_000,
        }
    }
}

const _: () = assert!(4_500 + 3_500 + 1_000 + 1_000 == BPS, "RWD-2 default split");

impl RewardParams {
    /// RWD-P1: parameter sanity, checked at genesis.
    pub fn validate(&self) -> Result<(), RewardError> {
        let split = [
            self.inference_bps,
            self.learning_bps,
            self.validation_bps,
            self.datasets_bps,
        ];
        let split_sum = split.iter().fold(0u64, |s, x| s.saturating_add(*x));
        let ok = split_sum == BPS
            && self.validation_attestor_bps <= BPS
            && self.dataset_reward_bps <= BPS
            && self.target_block_time_ms >= 1
            && self.target_block_time_ms <= DAY_MS
            && self.epoch_length_blocks >= 1
            && self.epoch_length_blocks <= 10 * DAY_MS
            && self.daily_budget <= 1_000_000_000 * BLY
            && self.per_1pct_improvement <= 1_000_000_000 * BLY
            && self.per_1k_tokens <= 1_000_000_000 * BLY
            && self.difficulty_min_milli >= 1
            && self.difficulty_min_milli <= self.difficulty_max_milli
            && self.difficulty_max_milli <= 1_000 * MILLI
            && self.difficulty_saturation_ppm >= 1
            && self.difficulty_saturation_ppm <= 100 * PPM
            && self.quality_min_milli <= self.quality_max_milli
            && self.quality_max_milli <= 1_000 * MILLI
            && self.max_claimants_per_pool >= 1;
        if ok {
            Ok(())
        } else {
            Err(RewardError::BadParams)
        }
    }
}

/// Protocol rejections of reward accruals.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RewardError {
    #[error("RWD-P1: invalid reward parameters")]
    BadParams,
    #[error("RWD-5: pool {0:?} already has the maximum number of claimants")]
    TooManyClaimants(RewardPool),
    #[error("RWD-5: pool {0:?} claims overflow")]
    Overflow(RewardPool),
    #[error("RWD-K1: malformed stored entry in namespace {0:#04x}")]
    BadEntry(u8),
}

// ---------------------------------------------------------------------------
// Integer arithmetic
// ---------------------------------------------------------------------------

/// `floor(a · b / d)` with a 256-bit intermediate product; `None` if `d == 0`
/// or the quotient does not fit in a u128.
pub fn mul_div_floor(a: u128, b: u128, d: u128) -> Option<u128> {
    if d == 0 {
        return None;
    }
    let (hi, lo) = mul_wide(a, b);
    if hi >= d {
        return None;
    }
    // Shift-subtract long division of (hi, lo) by d; the remainder stays < d.
    let (mut rem, mut quotient) = (hi, 0u128);
    for bit in (0..128).rev() {
        let carry = rem >> 127;
        rem = (rem << 1) | ((lo >> bit) & 1);
        quotient <<= 1;
        if carry == 1 || rem >= d {
            rem = rem.wrapping_sub(d);
            quotient |= 1;
        }
    }
    assert!(rem < d);
    Some(quotient)
}

/// Full 256-bit product as (high, low) halves.
fn mul_wide(a: u128, b: u128) -> (u128, u128) {
    const MASK: u128 = u64::MAX as u128;
    let (a1, a0) = (a >> 64, a & MASK);
    let (b1, b0) = (b >> 64, b & MASK);
    let (ll, lh, hl, hh) = (a0 * b0, a0 * b1, a1 * b0, a1 * b1);
    let mid = (ll >> 64) + (lh & MASK) + (hl & MASK);
    let lo = (ll & MASK) | (mid << 64);
    let hi = hh + (lh >> 64) + (hl >> 64) + (mid >> 64);
    (hi, lo)
}

// ---------------------------------------------------------------------------
// Emission and budgets (RWD-1..3)
// ---------------------------------------------------------------------------

/// RWD-1: `floor(daily_budget · target_block_time_ms / 86_400_000)`.
pub fn emission_per_block_base_units(params: &RewardParams) -> Amount {
    mul_div_floor(
        params.daily_budget,
        u128::from(params.target_block_time_ms),
        u128::from(DAY_MS),
    )
    .expect("validated params: budget ≤ 10^27, block time ≤ one day")
}

/// RWD-2: `emission_per_block · epoch_length_blocks`.
pub fn epoch_budget(params: &RewardParams) -> Amount {
    emission_per_block_base_units(params)
        .checked_mul(u128::from(params.epoch_length_blocks))
        .expect("validated params keep the epoch budget in range")
}

/// RWD-3: the budget of one pool for one epoch. Shares are floored; the
/// validation budget is split attestation = floor(v · attestor_bps / 10^4),
/// signing = v − attestation.
pub fn pool_budget(params: &RewardParams, pool: RewardPool) -> Amount {
    let epoch = epoch_budget(params);
    let share = |amount: Amount, bps: u64| {
        mul_div_floor(amount, u128::from(bps), u128::from(BPS)).expect("bps ≤ 10^4")
    };
    let validation = share(epoch, params.validation_bps);
    let attestation = share(validation, params.validation_attestor_bps);
    let budget = match pool {
        RewardPool::Inference => share(epoch, params.inference_bps),
        RewardPool::Learning => share(epoch, params.learning_bps),
        RewardPool::Datasets => share(epoch, params.datasets_bps),
        RewardPool::Attestation => attestation,
        RewardPool::Signing => validation - attestation,
    };
    assert!(budget <= epoch);
    budget
}

// ---------------------------------------------------------------------------
// What work claims (RWD-10..14)
// ---------------------------------------------------------------------------

/// RWD-10: `min(floor(per_1k_tokens · tokens · q / 10^6), burned)` where
/// `q = clamp(quality_milli, quality_min_milli, quality_max_milli)`.
pub fn inference_reward(
    params: &RewardParams,
    tokens: u64,
    quality_milli: u32,
    burned: Amount,
) -> Amount {
    let quality =
        u64::from(quality_milli).clamp(params.quality_min_milli, params.quality_max_milli);
    let scaled = u128::from(tokens) * u128::from(quality);
    let reward = mul_div_floor(params.per_1k_tokens, scaled, u128::from(MILLI * MILLI))
        .unwrap_or(Amount::MAX);
    let paid = reward.min(burned);
    assert!(paid <= burned, "RWD-10: never more than was burned");
    paid
}

/// RWD-11: difficulty at a target's cumulative improvement `x` (ppm), in
/// milli-units: `min + (max − min) · min(x, S) / S` (floor), S = saturation.
pub fn difficulty_milli(params: &RewardParams, cumulative_ppm: u64) -> u64 {
    let (lo, hi, s) = (
        params.difficulty_min_milli,
        params.difficulty_max_milli,
        params.difficulty_saturation_ppm,
    );
    let x = u128::from(cumulative_ppm.min(s));
    let d = u128::from(lo) + u128::from(hi - lo) * x / u128::from(s);
    assert!(d >= u128::from(lo) && d <= u128::from(hi));
    d as u64
}

/// RWD-11: learning reward for raising a target's cumulative improvement
/// from `a = cumulative_before_ppm` to `b = a + improvement_ppm`:
/// `per_1pct · ∫_a^b d(x) dx / (10_000 ppm · 1000 milli)`, computed exactly
/// and floored once. `d` is linear up to S and flat at `max` after it, so the
/// integral is `min·(b−a) + (max−min)·(m² − a'²)/(2S) + (max−min)·(b − m)`
/// with `a' = min(a, S)`, `m = min(b, S)` (and the last term counting only
/// the part above S). Splitting one gain into several deltas earns the same.
pub fn learning_reward(
    params: &RewardParams,
    cumulative_before_ppm: u64,
    improvement_ppm: u64,
) -> Amount {
    let s = u128::from(params.difficulty_saturation_ppm);
    let (lo, hi) = (
        u128::from(params.difficulty_min_milli),
        u128::from(params.difficulty_max_milli),
    );
    let a = u128::from(cumulative_before_ppm);
    let b = a + u128::from(improvement_ppm);
    let (a_low, m) = (a.min(s), b.min(s));
    let above_s = b.max(s) - a.max(s);
    // Integral numerator over denominator 2S (units: ppm · milli).
    let numerator =
        2 * s * lo * (b - a) + (hi - lo) * (m * m - a_low * a_low) + 2 * s * (hi - lo) * above_s;
    let denominator = 2 * s * u128::from(BPS) * u128::from(MILLI);
    mul_div_floor(params.per_1pct_improvement, numerator, denominator).unwrap_or(Amount::MAX)
}

/// RWD-14: the datasets claim of each of `data_blocks` data blocks behind an
/// accepted delta: `floor(floor(learning · dataset_bps / 10^4) / n)`.
pub fn dataset_reward_each(params: &RewardParams, learning: Amount, data_blocks: usize) -> Amount {
    if data_blocks == 0 {
        return 0;
    }
    let total = mul_div_floor(
        learning,
        u128::from(params.dataset_reward_bps),
        u128::from(BPS),
    )
    .expect("bps ≤ 10^4 never grows the amount");
    total / data_blocks as u128
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

/// A claim in the current epoch (RWD-K1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Archive, RkyvSerialize, RkyvDeserialize)]
pub struct Claim {
    /// Base units for amount pools, stake weight for weighted pools.
    pub amount: Amount,
}

/// Per-pool totals of the current epoch (RWD-K1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Archive, RkyvSerialize, RkyvDeserialize)]
pub struct PoolTotal {
    pub claimed: Amount,
    pub claimants: u32,
}

/// Claims of the current epoch. `Clone` is O(1).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RewardState {
    claims: OrdMap<(RewardPool, Address), Amount>,
    totals: OrdMap<RewardPool, PoolTotal>,
}

fn claim_key(pool: RewardPool, address: &Address) -> StateKey {
    let mut key = Vec::with_capacity(21);
    key.push(pool.byte());
    key.extend_from_slice(&address.0);
    StateKey::new(ns::REWARD_CLAIM, key)
}

fn pool_key(pool: RewardPool) -> StateKey {
    StateKey::new(ns::REWARD_POOL, vec![pool.byte()])
}

impl RewardState {
    pub fn new() -> RewardState {
        RewardState::default()
    }

    pub fn claim(&self, pool: RewardPool, address: &Address) -> Amount {
        self.claims.get(&(pool, *address)).copied().unwrap_or(0)
    }

    pub fn pool_total(&self, pool: RewardPool) -> PoolTotal {
        self.totals.get(&pool).copied().unwrap_or_default()
    }

    /// RWD-5: adds `amount` to `address`'s claim on `pool`. Zero is a no-op.
    /// On error nothing changes.
    pub fn accrue(
        &mut self,
        params: &RewardParams,
        pool: RewardPool,
        address: Address,
        amount: Amount,
        touched: &mut Touched,
    ) -> Result<(), RewardError> {
        if amount == 0 {
            return Ok(());
        }
        let previous = self.claim(pool, &address);
        let mut total = self.pool_total(pool);
        if previous == 0 {
            if total.claimants >= params.max_claimants_per_pool {
                return Err(RewardError::TooManyClaimants(pool));
            }
            total.claimants += 1;
        }
        total.claimed = total
            .claimed
            .checked_add(amount)
            .ok_or(RewardError::Overflow(pool))?;
        let claim = previous + amount; // ≤ total.claimed, so it fits.
        assert!(claim <= total.claimed);
        self.claims.insert((pool, address), claim);
        self.totals.insert(pool, total);
        touched.insert(claim_key(pool, &address));
        touched.insert(pool_key(pool));
        Ok(())
    }

    /// RWD-10: accrues the inference reward of a settled receipt to the
    /// serving node; returns the claim added.
    pub fn accrue_inference(
        &mut self,
        params: &RewardParams,
        server: Address,
        tokens: u64,
        quality_milli: u32,
        burned: Amount,
        touched: &mut Touched,
    ) -> Result<Amount, RewardError> {
        let reward = inference_reward(params, tokens, quality_milli, burned);
        self.accrue(params, RewardPool::Inference, server, reward, touched)?;
        Ok(reward)
    }

    /// RWD-13: one block's commit signers, each with its bonded stake, accrue
    /// their stake as signing weight. Atomic.
    pub fn accrue_commit_signers(
        &mut self,
        params: &RewardParams,
        signers: &[(Address, Amount)],
        touched: &mut Touched,
    ) -> Result<(), RewardError> {
        let mut next = self.clone();
        let mut local = Touched::new();
        for (signer, stake) in signers {
            next.accrue(params, RewardPool::Signing, *signer, *stake, &mut local)?;
        }
        *self = next;
        touched.extend(local);
        Ok(())
    }

    /// RWD-11, RWD-12, RWD-14: the claims a PoL event creates. Atomic.
    pub fn accrue_pol_event(
        &mut self,
        params: &RewardParams,
        event: &PolEvent,
        touched: &mut Touched,
    ) -> Result<(), RewardError> {
        let PolEvent::DeltaDecided(decision) = event else {
            return Ok(());
        };
        let mut next = self.clone();
        let mut local = Touched::new();
        for (attestor, stake) in &decision.honest_attestors {
            next.accrue(
                params,
                RewardPool::Attestation,
                *attestor,
                *stake,
                &mut local,
            )?;
        }
        if matches!(decision.outcome, DeltaOutcome::Accepted { .. }) {
            let learning = learning_reward(
                params,
                decision.cumulative_improvement_before_ppm,
                decision.improvement_ppm,
            );
            next.accrue(
                params,
                RewardPool::Learning,
                decision.submitter,
                learning,
                &mut local,
            )?;
            let each = dataset_reward_each(params, learning, decision.data_blocks.len());
            for (_, data_submitter) in &decision.data_blocks {
                next.accrue(
                    params,
                    RewardPool::Datasets,
                    *data_submitter,
                    each,
                    &mut local,
                )?;
            }
        }
        *self = next;
        touched.extend(local);
        Ok(())
    }

    /// RWD-4: pays the epoch's claims and clears them. Returns the amounts to
    /// mint, one entry per address with a positive payout, sorted by address.
    /// Per pool with budget B and total claim C: weighted pools pay
    /// `floor(B · c / C)`; amount pools pay `c` if `C ≤ B`, else
    /// `floor(B · c / C)`. Unpaid budget is not minted (RWD-6).
    pub fn settle_epoch(
        &mut self,
        params: &RewardParams,
        touched: &mut Touched,
    ) -> Vec<(Address, Amount)> {
        let mut payouts: BTreeMap<Address, Amount> = BTreeMap::new();
        for pool in RewardPool::ALL {
            let budget = pool_budget(params, pool);
            let total = self.pool_total(pool).claimed;
            let mut paid: Amount = 0;
            let range = (pool, Address::ZERO)..=(pool, Address([0xff; 20]));
            for ((_, address), claim) in self.claims.range(range) {
                let pay = if !pool.is_weighted() && total <= budget {
                    *claim
                } else {
                    mul_div_floor(budget, *claim, total).expect("claim ≤ total, so ≤ budget")
                };
                paid += pay;
                if pay > 0 {
                    *payouts.entry(*address).or_insert(0) += pay;
                }
            }
            assert!(paid <= budget, "INV-RWD-BUDGET");
        }
        for (pool, address) in self.claims.keys() {
            touched.insert(claim_key(*pool, address));
        }
        for pool in self.totals.keys() {
            touched.insert(pool_key(*pool));
        }
        self.claims = OrdMap::new();
        self.totals = OrdMap::new();
        payouts.into_iter().collect()
    }

    /// Canonical bytes of the value under `key`, or `None` if absent.
    pub fn entry_bytes(&self, key: &StateKey) -> Option<Vec<u8>> {
        use crate::encoding::Canonical;
        match key.ns {
            ns::REWARD_CLAIM => {
                let [pool, rest @ ..] = key.key.as_slice() else {
                    return None;
                };
                let pool = RewardPool::from_byte(*pool)?;
                let address = Address(rest.try_into().ok()?);
                let amount = *self.claims.get(&(pool, address))?;
                Some(Claim { amount }.encode())
            }
            ns::REWARD_POOL => {
                let [pool] = key.key.as_slice() else {
                    return None;
                };
                let pool = RewardPool::from_byte(*pool)?;
                self.totals.get(&pool).map(Canonical::encode)
            }
            _ => None,
        }
    }

    /// Rebuilds the state from committed entries (as stored, in any order).
    pub fn from_entries(entries: &[(StateKey, Vec<u8>)]) -> Result<RewardState, RewardError> {
        use crate::encoding::Canonical;
        let mut state = RewardState::new();
        for (key, bytes) in entries {
            let bad = || RewardError::BadEntry(key.ns);
            match (key.ns, key.key.as_slice()) {
                (ns::REWARD_CLAIM, [pool, rest @ ..]) => {
                    let pool = RewardPool::from_byte(*pool).ok_or_else(bad)?;
                    let address = Address(rest.try_into().map_err(|_| bad())?);
                    let claim = Claim::decode(bytes).map_err(|_| bad())?;
                    state.claims.insert((pool, address), claim.amount);
                }
                (ns::REWARD_POOL, [pool]) => {
                    let pool = RewardPool::from_byte(*pool).ok_or_else(bad)?;
                    let total = PoolTotal::decode(bytes).map_err(|_| bad())?;
                    state.totals.insert(pool, total);
                }
                _ => return Err(bad()),
            }
        }
        Ok(state)
    }

    /// Every committed entry, sorted by key.
    pub fn entries(&self) -> Vec<(StateKey, Vec<u8>)> {
        use crate::encoding::Canonical;
        let mut out: Vec<(StateKey, Vec<u8>)> = self
            .claims
            .iter()
            .map(|((pool, address), amount)| {
                let bytes = Claim { amount: *amount }.encode();
                (claim_key(*pool, address), bytes)
            })
            .collect();
        for (pool, total) in &self.totals {
            out.push((pool_key(*pool), total.encode()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests;
