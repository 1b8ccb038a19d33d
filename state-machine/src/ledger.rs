//! The ledger: accounts, fees, staking and slashing, and block application
//! (spec/ledger.md, spec/fees.md, spec/staking.md).
//!
//! [`Ledger`] is an immutable-by-default value: [`Ledger::apply_block`] returns a
//! new ledger and leaves `self` untouched, so an invalid block changes nothing
//! (BLOCK-7). Cloning is O(1) (persistent maps), which is also how failed
//! transactions roll back their effects while keeping their fee (TX-12).

use crate::allowance::{Allowance, AllowanceTerms, Settlement};
use crate::block::{Block, BlockBody, BlockHeader, BlockOutcome, Event, Misbehaviour, Receipt};
use crate::consensus::{DuplicateVote, K256Scheme, SignatureScheme};
use crate::encoding::Canonical;
use crate::error::{Error, TxError};
use crate::genesis::Genesis;
use crate::params::{BASE_FEE_MAX_CHANGE_DENOMINATOR, ELASTICITY_MULTIPLIER, Params, gas};
use crate::pol::{PolContext, PolEffect, PolState};
use crate::rewards::RewardState;
use crate::smt::SparseMerkleTree;
use crate::state::{StateKey, Touched, ns};
use crate::tx::{MAX_ENDPOINT_BYTES, MAX_NODE_BLOCKS, NodeInfo, PublicKey, SignedTx, TxKind};
use crate::types::{Address, Amount, BLY, Hash32, Height};
use imbl::OrdMap;
use rkyv::{Archive, Deserialize, Serialize};
use std::collections::BTreeMap;

/// FEE-2: EIP-1559 base fee of a block from its parent's. Integer arithmetic,
/// rounding down; saturating, so it never panics; with `parent_gas_limit < 2`
/// (no meaningful target) it returns `parent_base_fee`.
pub fn next_base_fee(parent_base_fee: u128, parent_gas_used: u64, parent_gas_limit: u64) -> u128 {
    if parent_gas_limit < 2 {
        return parent_base_fee;
    }
    let target = u128::from(parent_gas_limit / ELASTICITY_MULTIPLIER);
    let used = u128::from(parent_gas_used);
    if used == target {
        parent_base_fee
    } else if used > target {
        let delta = parent_base_fee.saturating_mul(used - target)
            / target
            / BASE_FEE_MAX_CHANGE_DENOMINATOR;
        parent_base_fee.saturating_add(delta.max(1))
    } else {
        let delta = parent_base_fee.saturating_mul(target - used)
            / target
            / BASE_FEE_MAX_CHANGE_DENOMINATOR;
        parent_base_fee.saturating_sub(delta)
    }
}

fn usage_settled_key(allowance: &Hash32, request: &Hash32) -> StateKey {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(allowance);
    k.extend_from_slice(request);
    StateKey::new(ns::USAGE_SETTLED, k)
}

/// FEE-4: gas a transaction of this kind uses (exactly; execution is not metered).
pub fn intrinsic_gas(kind: &TxKind) -> u64 {
    match kind {
        TxKind::Transfer { .. } => gas::TRANSFER,
        TxKind::Bond { .. } => gas::BOND,
        TxKind::Unbond { .. } => gas::UNBOND,
        TxKind::Unjail => gas::UNJAIL,
        TxKind::SettleInference { .. } => gas::SETTLE_INFERENCE,
        TxKind::RegisterNode { info, .. } => gas::REGISTER_NODE
            .saturating_add(gas::REGISTER_NODE_PER_BLOCK.saturating_mul(info.blocks.len() as u64)),
        TxKind::DeregisterNode => gas::DEREGISTER_NODE,
        TxKind::Pol(p) => Params::pol_gas(p),
        TxKind::OpenAllowance(t) => gas::OPEN_ALLOWANCE
            .saturating_add(gas::OPEN_ALLOWANCE_PER_NODE.saturating_mul(t.node_caps.len() as u64)),
        TxKind::CloseAllowance { .. } => gas::CLOSE_ALLOWANCE,
        TxKind::SetVrfKey { .. } => gas::SET_VRF_KEY,
        TxKind::SettleUsage(s) => {
            let shares: u64 = s.items.iter().map(|i| i.route.len() as u64).sum();
            gas::SETTLE_USAGE
                .saturating_add(gas::SETTLE_USAGE_PER_ITEM.saturating_mul(s.items.len() as u64))
                .saturating_add(gas::SETTLE_USAGE_PER_SHARE.saturating_mul(shares))
        }
    }
}

/// LEDGER-1: an account.
#[derive(Clone, Debug, Default, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Account {
    pub balance: Amount,
    /// Number of transactions the account has had included (TX-1).
    pub nonce: u64,
}

/// STAKE-1: a validator.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Validator {
    /// Consensus key (SEC1 compressed).
    pub public_key: PublicKey,
    pub bonded: Amount,
    /// SLASH-2: jailed validators are not in the active set until they unjail.
    pub jailed_until: Option<Height>,
    /// SLASH-1: removed for good.
    pub tombstoned: bool,
    /// CONS-COMM-8: the VRF key its committee tickets verify against (TX-16).
    pub vrf_public_key: Option<crate::consensus::VrfPublicKey>,
}

/// STAKE-3: stake (or a node bond) on its way back to its owner.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct UnbondingEntry {
    pub amount: Amount,
    pub creation_height: Height,
    /// Node bonds are not validator stake and are not slashed with it.
    pub node_bond: bool,
}

/// Key of an unbonding entry: release first, so releasing walks the map's front.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnbondingKey {
    pub release_height: Height,
    pub owner: Address,
    pub seq: u64,
}

impl UnbondingKey {
    fn state_key(&self) -> StateKey {
        let mut k = Vec::with_capacity(36);
        k.extend_from_slice(&self.release_height.to_be_bytes());
        k.extend_from_slice(&self.owner.0);
        k.extend_from_slice(&self.seq.to_be_bytes());
        StateKey::new(ns::UNBONDING, k)
    }
}

/// SLASH-2: a validator's recent commit signatures, as a ring of "missed" bits.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Liveness {
    pub missed_bits: Vec<u8>,
    pub next_index: u32,
    pub filled: u32,
    pub missed: u32,
}

/// TX-9: a registered GPU node.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct NodeRecord {
    pub info: NodeInfo,
    pub bond: Amount,
    pub registered_at: Height,
}

/// Chain-wide scalars (STATE-1, `GLOBAL/"globals"`).
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Globals {
    pub height: Height,
    pub time_ms: u64,
    pub last_base_fee: u128,
    pub last_gas_used: u64,
    pub last_gas_limit: u64,
    /// INV-SUPPLY counters.
    pub genesis_supply: Amount,
    pub minted: Amount,
    pub burned: Amount,
    pub slashed: Amount,
    /// Node and PoL bonds held by the protocol.
    pub locked: Amount,
    pub unbonding_seq: u64,
}

const KEY_GLOBALS: &[u8] = b"globals";
const KEY_ACTIVE_SET: &[u8] = b"active_set";
const KEY_LAST_ACTIVE_SET: &[u8] = b"last_active_set";
const KEY_SET_HISTORY: &[u8] = b"set_history";
const KEY_COMMITTEE: &[u8] = b"committee";

/// CONS-COMM-2/5/7: the proposer-eligibility committee (`GLOBAL/"committee"`).
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct CommitteeState {
    /// The epoch in progress: heights `epoch·L + 1 ..= (epoch + 1)·L`, `L`
    /// = `epoch_length_blocks`.
    pub epoch: u64,
    /// `seed_epoch` (CONS-COMM-2).
    pub seed: Hash32,
    /// The epoch's committee, in drawing order (CONS-COMM-5).
    pub eligible: Vec<Address>,
    /// CONS-COMM-7: `(address, voting power)` of the active validators with
    /// a VRF key as of the last block of the previous epoch, ascending: the
    /// next epoch's committee is drawn from these, so they are fixed before
    /// anyone can compute its seed.
    pub next_stakes: Vec<(Address, u64)>,
}

/// The replicated state. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Ledger {
    chain_id: String,
    params: Params,
    genesis_hash: Hash32,
    accounts: OrdMap<Address, Account>,
    validators: OrdMap<Address, Validator>,
    unbonding: OrdMap<UnbondingKey, UnbondingEntry>,
    liveness: OrdMap<Address, Liveness>,
    nodes: OrdMap<Address, NodeRecord>,
    settled_receipts: OrdMap<(Address, Hash32), Height>,
    /// ALW-1: inference allowances by id.
    allowances: OrdMap<Hash32, Allowance>,
    /// TX-15: settled requests by (allowance, request id), dropped with the allowance.
    usage_settled: OrdMap<(Hash32, Hash32), Height>,
    /// ALW-4: allowances by the height their rest is refunded at. Derived
    /// from `allowances` (not committed state).
    allowance_releases: OrdMap<(Height, Hash32), ()>,
    /// STAKE-5: (address, voting power) in ascending address order.
    active_set: Vec<(Address, u64)>,
    /// The set that was active in the previous block (signers of its commit).
    last_active_set: Vec<(Address, u64)>,
    /// SLASH-3: the active set in force from each height (the first height it
    /// votes on), kept as far back as evidence can reach.
    set_history: OrdMap<Height, Vec<(Address, u64)>>,
    /// CONS-COMM-7: the epoch's proposer-eligibility committee.
    committee: CommitteeState,
    /// The next epoch's seed, from the ticket `begin_block` verified on a
    /// boundary block; taken by `end_block`. Not committed state.
    pending_seed: Option<Hash32>,
    globals: Globals,
    pol: PolState,
    rewards: RewardState,
    /// Hash of the last applied header (the genesis hash at height 0). Not part
    /// of the committed state: the header that carries a state root cannot be
    /// inside it.
    last_block_hash: Hash32,
    smt: SparseMerkleTree,
    touched: Touched,
}

/// Whether block application verifies transaction signatures.
#[derive(Clone, Copy)]
enum Signatures<'a> {
    Verify,
    /// LEDGER-SIG-1: skip verification of the transactions `known` vouches
    /// for (by id, with their sender); verify every other one.
    Known(&'a dyn Fn(&Hash32) -> Option<Address>),
    Trusted,
}

impl Signatures<'_> {
    /// Evidence signatures are checked unless everything is trusted.
    fn verify_evidence(self) -> bool {
        !matches!(self, Signatures::Trusted)
    }
}

/// Options for [`Ledger::propose_block`].
#[derive(Clone, Debug)]
pub struct Proposal<'a> {
    pub proposer: Address,
    /// CONS-COMM-2: the proposer's ticket proof, on the last block of an
    /// epoch ([`Ledger::ticket_for`]).
    pub ticket: Option<crate::consensus::VrfProof>,
    pub time_ms: u64,
    pub evidence: Vec<Misbehaviour>,
    pub last_commit_signers: Vec<Address>,
    /// Candidate transactions in preference order; invalid ones are skipped.
    pub candidates: &'a [SignedTx],
}

impl Ledger {
    /// GEN-2: the state at height 0.
    pub fn from_genesis(genesis: &Genesis) -> Result<Ledger, Error> {
        genesis.validate()?;
        let mut ledger = Ledger {
            chain_id: genesis.chain_id.clone(),
            params: genesis.params.clone(),
            genesis_hash: genesis.hash(),
            accounts: OrdMap::new(),
            validators: OrdMap::new(),
            unbonding: OrdMap::new(),
            liveness: OrdMap::new(),
            nodes: OrdMap::new(),
            settled_receipts: OrdMap::new(),
            allowances: OrdMap::new(),
            usage_settled: OrdMap::new(),
            allowance_releases: OrdMap::new(),
            active_set: Vec::new(),
            last_active_set: Vec::new(),
            set_history: OrdMap::new(),
            committee: CommitteeState {
                epoch: 0,
                seed: [0; 32],
                eligible: Vec::new(),
                next_stakes: Vec::new(),
            },
            pending_seed: None,
            globals: Globals {
                height: 0,
                time_ms: genesis.genesis_time_ms,
                last_base_fee: 0,
                last_gas_used: 0,
                last_gas_limit: 0,
                genesis_supply: 0,
                minted: 0,
                burned: 0,
                slashed: 0,
                locked: 0,
                unbonding_seq: 0,
            },
            pol: PolState::genesis(genesis.pol_blocks.clone(), &genesis.params.pol)
                .map_err(|e| Error::Genesis(format!("PoL genesis blocks: {e}")))?,
            rewards: RewardState::new(),
            last_block_hash: genesis.hash(),
            smt: SparseMerkleTree::new(),
            touched: Touched::new(),
        };
        let mut supply: Amount = 0;
        for b in &genesis.balances {
            let acc = ledger.account(&b.address);
            ledger.set_account(
                b.address,
                Account {
                    balance: acc.balance + b.amount,
                    nonce: 0,
                },
            );
            supply = supply
                .checked_add(b.amount)
                .ok_or_else(|| Error::Genesis("supply overflows".into()))?;
        }
        for v in &genesis.validators {
            let address = Address::from_sec1(&v.public_key).ok_or_else(|| {
                Error::Genesis("validator public key is not a valid point".into())
            })?;
            ledger.set_validator(
                address,
                Validator {
                    public_key: v.public_key,
                    bonded: v.stake,
                    jailed_until: None,
                    tombstoned: false,
                    vrf_public_key: v.vrf_public_key,
                },
            );
            supply = supply
                .checked_add(v.stake)
                .ok_or_else(|| Error::Genesis("supply overflows".into()))?;
        }
        ledger.globals.genesis_supply = supply;
        ledger.active_set = ledger.compute_active_set();
        if ledger.active_set.is_empty() {
            return Err(Error::Genesis(
                "no validator meets the minimum stake".into(),
            ));
        }
        ledger.last_active_set = ledger.active_set.clone();
        // CONS-COMM-2/7: epoch 0's committee, from the genesis seed; epoch
        // 1's is drawn from the same stakes (those of "epoch −1").
        let seed = crate::consensus::genesis_seed(&ledger.genesis_hash);
        let stakes = ledger.keyed_stakes();
        ledger.committee = CommitteeState {
            epoch: 0,
            seed,
            eligible: crate::consensus::select_validators(&seed, &stakes)
                .expect("the active set satisfies CONS-VAL-1"),
            next_stakes: stakes,
        };
        ledger.touch(StateKey::new(ns::GLOBAL, KEY_COMMITTEE));
        ledger.set_history.insert(1, ledger.active_set.clone());
        ledger.touch(StateKey::new(ns::GLOBAL, KEY_SET_HISTORY));
        for (key, _) in ledger.pol.entries() {
            ledger.touch(key);
        }
        ledger.touch(StateKey::new(ns::GLOBAL, KEY_GLOBALS));
        ledger.touch(StateKey::new(ns::GLOBAL, KEY_ACTIVE_SET));
        ledger.touch(StateKey::new(ns::GLOBAL, KEY_LAST_ACTIVE_SET));
        ledger.commit_root();
        Ok(ledger)
    }

    // ----- read access -------------------------------------------------------

    pub fn chain_id(&self) -> &str {
        &self.chain_id
    }
    pub fn params(&self) -> &Params {
        &self.params
    }
    pub fn genesis_hash(&self) -> Hash32 {
        self.genesis_hash
    }
    pub fn height(&self) -> Height {
        self.globals.height
    }
    pub fn globals(&self) -> &Globals {
        &self.globals
    }
    pub fn last_block_hash(&self) -> Hash32 {
        self.last_block_hash
    }
    pub fn state_root(&self) -> Hash32 {
        self.smt.root()
    }
    pub fn account(&self, address: &Address) -> Account {
        self.accounts.get(address).cloned().unwrap_or_default()
    }
    pub fn validator(&self, address: &Address) -> Option<&Validator> {
        self.validators.get(address)
    }
    pub fn validators(&self) -> impl Iterator<Item = (&Address, &Validator)> {
        self.validators.iter()
    }
    pub fn active_set(&self) -> &[(Address, u64)] {
        &self.active_set
    }
    /// The set whose commit the next block's `last_commit_signers` certify.
    pub fn last_active_set(&self) -> &[(Address, u64)] {
        &self.last_active_set
    }
    /// CONS-COMM-7: the epoch's committee and seed.
    pub fn committee(&self) -> &CommitteeState {
        &self.committee
    }
    /// CONS-COMM-7: who may propose the next block, ascending: the members
    /// of the epoch's committee still in the active set, or the whole active
    /// set if none is left.
    pub fn eligible_proposers(&self) -> Vec<Address> {
        let members: Vec<Address> = self
            .active_set
            .iter()
            .map(|(a, _)| *a)
            .filter(|a| self.committee.eligible.contains(a))
            .collect();
        if members.is_empty() {
            self.active_set.iter().map(|(a, _)| *a).collect()
        } else {
            members
        }
    }
    /// CONS-COMM-7: whether an active validator may propose the next block
    /// ([`Ledger::eligible_proposers`] without building the list).
    fn may_propose(&self, active_member: &Address) -> bool {
        let eligible = &self.committee.eligible;
        eligible.contains(active_member)
            || !self.active_set.iter().any(|(a, _)| eligible.contains(a))
    }
    /// CONS-COMM-3: the ticket input the next block must carry a proof for,
    /// if it is the last block of its epoch.
    pub fn next_ticket_input(&self) -> Option<Vec<u8>> {
        let height = self.globals.height + 1;
        height
            .is_multiple_of(self.params.epoch_length_blocks)
            .then(|| {
                crate::consensus::ticket_input(
                    &self.chain_id,
                    self.committee.epoch + 1,
                    &self.committee.seed,
                )
            })
    }
    /// CONS-COMM-2/8: the ticket the next block needs if `proposer_key`'s
    /// validator proposes it: `Some` on an epoch's last block when the
    /// validator has a registered VRF key.
    pub fn ticket_for(
        &self,
        proposer_key: &k256::ecdsa::SigningKey,
    ) -> Option<crate::consensus::VrfProof> {
        let alpha = self.next_ticket_input()?;
        let address = Address::from_public_key(proposer_key.verifying_key());
        self.validators.get(&address)?.vrf_public_key?;
        Some(crate::consensus::ticket_proof(proposer_key, &alpha))
    }
    /// CONS-COMM-7: active validators with a VRF key, with their voting
    /// power, ascending: what a committee is drawn from.
    fn keyed_stakes(&self) -> Vec<(Address, u64)> {
        self.active_set
            .iter()
            .filter(|(a, _)| {
                self.validators
                    .get(a)
                    .is_some_and(|v| v.vrf_public_key.is_some())
            })
            .copied()
            .collect()
    }
    /// The Proof-of-Learning DAG, heads, registry and pending deltas.
    pub fn pol(&self) -> &PolState {
        &self.pol
    }
    /// Reward claims of the current reward epoch.
    pub fn rewards(&self) -> &RewardState {
        &self.rewards
    }
    /// ALW-1: the allowance with this id.
    pub fn allowance(&self, id: &Hash32) -> Option<&Allowance> {
        self.allowances.get(id)
    }
    /// TX-15: the height `(allowance, request)` was settled at, if it was.
    pub fn usage_settled(&self, allowance: &Hash32, request: &Hash32) -> Option<Height> {
        self.usage_settled.get(&(*allowance, *request)).copied()
    }
    pub fn node(&self, address: &Address) -> Option<&NodeRecord> {
        self.nodes.get(address)
    }
    /// Registered GPU nodes (TX-9), by address.
    pub fn nodes(&self) -> impl Iterator<Item = (&Address, &NodeRecord)> {
        self.nodes.iter()
    }
    pub fn unbonding(&self) -> impl Iterator<Item = (&UnbondingKey, &UnbondingEntry)> {
        self.unbonding.iter()
    }
    /// Base fee the next block must carry (FEE-1, FEE-2).
    pub fn next_block_base_fee(&self) -> u128 {
        if self.globals.height == 0 {
            self.params.initial_base_fee
        } else {
            next_base_fee(
                self.globals.last_base_fee,
                self.globals.last_gas_used,
                self.globals.last_gas_limit,
            )
        }
    }

    /// STATE-2: the proof for a state key against [`Ledger::state_root`], with the
    /// value's canonical bytes when present.
    pub fn prove(&self, key: &StateKey) -> (Option<Vec<u8>>, crate::smt::Proof) {
        (self.value_bytes(key), self.smt.prove(&key.path()))
    }

    /// INV-SUPPLY, computed by walking the whole state: returns
    /// (balances + bonded + unbonding + locked, genesis + minted − burned − slashed).
    pub fn audit_supply(&self) -> (Amount, Amount) {
        let balances: Amount = self.accounts.values().map(|a| a.balance).sum();
        let bonded: Amount = self.validators.values().map(|v| v.bonded).sum();
        let unbonding: Amount = self.unbonding.values().map(|e| e.amount).sum();
        let held = balances + bonded + unbonding + self.globals.locked;
        let g = &self.globals;
        (held, g.genesis_supply + g.minted - g.burned - g.slashed)
    }

    // ----- writes (every write records its key: STATE-3) ----------------------

    fn touch(&mut self, key: StateKey) {
        self.touched.insert(key);
    }
    fn set_account(&mut self, address: Address, account: Account) {
        self.touch(StateKey::new(ns::ACCOUNT, address.0));
        if account == Account::default() {
            self.accounts.remove(&address);
        } else {
            self.accounts.insert(address, account);
        }
    }
    fn set_validator(&mut self, address: Address, validator: Validator) {
        self.touch(StateKey::new(ns::VALIDATOR, address.0));
        self.validators.insert(address, validator);
    }
    fn set_liveness(&mut self, address: Address, liveness: Option<Liveness>) {
        self.touch(StateKey::new(ns::LIVENESS, address.0));
        match liveness {
            Some(l) => self.liveness.insert(address, l),
            None => self.liveness.remove(&address),
        };
    }
    fn set_unbonding(&mut self, key: UnbondingKey, entry: Option<UnbondingEntry>) {
        self.touch(key.state_key());
        match entry {
            Some(e) => self.unbonding.insert(key, e),
            None => self.unbonding.remove(&key),
        };
    }
    fn set_node(&mut self, address: Address, node: Option<NodeRecord>) {
        self.touch(StateKey::new(ns::NODE, address.0));
        match node {
            Some(n) => self.nodes.insert(address, n),
            None => self.nodes.remove(&address),
        };
    }
    fn set_allowance(&mut self, id: Hash32, allowance: Option<Allowance>) {
        self.touch(StateKey::new(ns::ALLOWANCE, id));
        let grace = self.params.allowance_grace_blocks;
        if let Some(old) = self.allowances.get(&id) {
            self.allowance_releases.remove(&(old.release_at(grace), id));
        }
        match allowance {
            Some(a) => {
                self.allowance_releases
                    .insert((a.release_at(grace), id), ());
                self.allowances.insert(id, a);
            }
            None => {
                self.allowances.remove(&id);
            }
        }
    }
    fn credit(&mut self, address: Address, amount: Amount) {
        let mut acc = self.account(&address);
        acc.balance = acc
            .balance
            .checked_add(amount)
            .expect("INV-SUPPLY bounds every balance");
        self.set_account(address, acc);
    }
    fn debit(&mut self, address: Address, amount: Amount) -> Result<(), TxError> {
        let mut acc = self.account(&address);
        if acc.balance < amount {
            return Err(TxError::InsufficientBalance {
                balance: acc.balance,
                needed: amount,
            });
        }
        acc.balance -= amount;
        self.set_account(address, acc);
        Ok(())
    }

    /// STATE-2: every committed entry (key, canonical value bytes), sorted by
    /// key. O(state): for snapshots, audits and tests, never on the block path.
    pub fn entries(&self) -> Vec<(StateKey, Vec<u8>)> {
        let mut keys: Vec<StateKey> = Vec::new();
        keys.extend(
            self.accounts
                .keys()
                .map(|a| StateKey::new(ns::ACCOUNT, a.0)),
        );
        keys.extend(
            self.validators
                .keys()
                .map(|a| StateKey::new(ns::VALIDATOR, a.0)),
        );
        keys.extend(
            self.liveness
                .keys()
                .map(|a| StateKey::new(ns::LIVENESS, a.0)),
        );
        keys.extend(self.nodes.keys().map(|a| StateKey::new(ns::NODE, a.0)));
        keys.extend(self.unbonding.keys().map(|k| k.state_key()));
        keys.extend(
            self.allowances
                .keys()
                .map(|id| StateKey::new(ns::ALLOWANCE, *id)),
        );
        keys.extend(
            self.usage_settled
                .keys()
                .map(|(a, r)| usage_settled_key(a, r)),
        );
        keys.extend(self.settled_receipts.keys().map(|(client, id)| {
            let mut k = client.0.to_vec();
            k.extend_from_slice(id);
            StateKey::new(ns::RECEIPT, k)
        }));
        for k in [
            KEY_GLOBALS,
            KEY_ACTIVE_SET,
            KEY_LAST_ACTIVE_SET,
            KEY_SET_HISTORY,
            KEY_COMMITTEE,
        ] {
            keys.push(StateKey::new(ns::GLOBAL, k));
        }
        let mut out: Vec<(StateKey, Vec<u8>)> = keys
            .into_iter()
            .map(|k| {
                let v = self.value_bytes(&k).expect("listed keys are present");
                (k, v)
            })
            .collect();
        out.extend(self.pol.entries());
        out.extend(self.rewards.entries());
        out.sort();
        out
    }

    /// STATE-4: the ledger whose committed state is `entries` (as listed by
    /// [`Ledger::entries`], in any order) on `genesis`'s chain, after the
    /// block with hash `last_block_hash`. Every value must decode
    /// canonically under a known key, every key at most once, and re-listing
    /// the result must give the entries back; the caller checks
    /// [`Ledger::state_root`] against a certified header (the root commits to
    /// every entry, so that check detects any other change). Costs
    /// O(entries), whatever the chain's length: a restart (and a state-sync
    /// snapshot) loads the state instead of replaying every block.
    pub fn from_entries(
        genesis: &Genesis,
        entries: Vec<(StateKey, Vec<u8>)>,
        last_block_hash: Hash32,
    ) -> Result<Ledger, Error> {
        let bad = |what: &str, k: &StateKey| {
            Error::BadState(format!(
                "{what}: ns {:#04x} key {}",
                k.ns,
                hex::encode(&k.key)
            ))
        };
        let addr = |k: &StateKey| -> Result<Address, Error> {
            Ok(Address(
                k.key
                    .as_slice()
                    .try_into()
                    .map_err(|_| bad("not an address key", k))?,
            ))
        };
        let mut ledger = Ledger::from_genesis(genesis)?;
        ledger.accounts = OrdMap::new();
        ledger.validators = OrdMap::new();
        ledger.unbonding = OrdMap::new();
        ledger.liveness = OrdMap::new();
        ledger.nodes = OrdMap::new();
        ledger.settled_receipts = OrdMap::new();
        ledger.allowances = OrdMap::new();
        ledger.usage_settled = OrdMap::new();
        ledger.allowance_releases = OrdMap::new();
        ledger.set_history = OrdMap::new();
        ledger.smt = SparseMerkleTree::new();
        ledger.touched = Touched::new();
        ledger.last_block_hash = last_block_hash;
        let mut pol = Vec::new();
        let mut rewards = Vec::new();
        let mut globals = [false; 5];
        let mut leaves = Vec::with_capacity(entries.len());
        for (k, v) in &entries {
            leaves.push((k.path(), Some(crate::crypto::sha3_256(v))));
        }
        for (k, v) in entries {
            let dec = |what: &str| bad(what, &k);
            match k.ns {
                ns::ACCOUNT => {
                    let a = addr(&k)?;
                    let v = Account::decode(&v).map_err(|_| dec("account"))?;
                    ledger.accounts.insert(a, v);
                }
                ns::VALIDATOR => {
                    let a = addr(&k)?;
                    let v = Validator::decode(&v).map_err(|_| dec("validator"))?;
                    ledger.validators.insert(a, v);
                }
                ns::LIVENESS => {
                    let a = addr(&k)?;
                    let v = Liveness::decode(&v).map_err(|_| dec("liveness"))?;
                    ledger.liveness.insert(a, v);
                }
                ns::NODE => {
                    let a = addr(&k)?;
                    let v = NodeRecord::decode(&v).map_err(|_| dec("node"))?;
                    ledger.nodes.insert(a, v);
                }
                ns::UNBONDING => {
                    let b = &k.key;
                    if b.len() != 36 {
                        return Err(dec("unbonding key"));
                    }
                    let key = UnbondingKey {
                        release_height: u64::from_be_bytes(b[0..8].try_into().expect("8")),
                        owner: Address(b[8..28].try_into().expect("20")),
                        seq: u64::from_be_bytes(b[28..36].try_into().expect("8")),
                    };
                    let v = UnbondingEntry::decode(&v).map_err(|_| dec("unbonding"))?;
                    ledger.unbonding.insert(key, v);
                }
                ns::ALLOWANCE => {
                    let id: Hash32 = k
                        .key
                        .as_slice()
                        .try_into()
                        .map_err(|_| dec("allowance key"))?;
                    let v = Allowance::decode(&v).map_err(|_| dec("allowance"))?;
                    let release = v.release_at(genesis.params.allowance_grace_blocks);
                    ledger.allowance_releases.insert((release, id), ());
                    ledger.allowances.insert(id, v);
                }
                ns::USAGE_SETTLED => {
                    if k.key.len() != 64 {
                        return Err(dec("settled usage key"));
                    }
                    let a: Hash32 = k.key[0..32].try_into().expect("32");
                    let r: Hash32 = k.key[32..64].try_into().expect("32");
                    let h = Height::decode(&v).map_err(|_| dec("settled usage"))?;
                    ledger.usage_settled.insert((a, r), h);
                }
                ns::RECEIPT => {
                    if k.key.len() != 52 {
                        return Err(dec("receipt key"));
                    }
                    let client = Address(k.key[0..20].try_into().expect("20"));
                    let id: Hash32 = k.key[20..52].try_into().expect("32");
                    let h = Height::decode(&v).map_err(|_| dec("receipt"))?;
                    ledger.settled_receipts.insert((client, id), h);
                }
                ns::GLOBAL => {
                    let slot = match k.key.as_slice() {
                        KEY_GLOBALS => {
                            ledger.globals = Globals::decode(&v).map_err(|_| dec("globals"))?;
                            0
                        }
                        KEY_ACTIVE_SET => {
                            ledger.active_set =
                                Vec::<(Address, u64)>::decode(&v).map_err(|_| dec("active set"))?;
                            1
                        }
                        KEY_LAST_ACTIVE_SET => {
                            ledger.last_active_set = Vec::<(Address, u64)>::decode(&v)
                                .map_err(|_| dec("last active set"))?;
                            2
                        }
                        KEY_SET_HISTORY => {
                            let h = Vec::<(Height, Vec<(Address, u64)>)>::decode(&v)
                                .map_err(|_| dec("set history"))?;
                            ledger.set_history = h.into_iter().collect();
                            3
                        }
                        KEY_COMMITTEE => {
                            ledger.committee =
                                CommitteeState::decode(&v).map_err(|_| dec("committee"))?;
                            4
                        }
                        _ => return Err(dec("unknown global")),
                    };
                    globals[slot] = true;
                }
                ns::POL_BLOCK
                | ns::POL_DELTA_COMMIT
                | ns::POL_PENDING
                | ns::POL_HEAD
                | ns::POL_REGISTRY => pol.push((k, v)),
                ns::REWARD_CLAIM | ns::REWARD_POOL => rewards.push((k, v)),
                _ => return Err(dec("unknown namespace")),
            }
        }
        if globals.contains(&false) {
            return Err(Error::BadState("a chain-wide global is missing".into()));
        }
        ledger.pol = PolState::from_entries(&pol, &genesis.params.pol)
            .map_err(|e| Error::BadState(format!("PoL entries: {e}")))?;
        ledger.rewards = RewardState::from_entries(&rewards)
            .map_err(|e| Error::BadState(format!("reward entries: {e}")))?;
        let count = leaves.len();
        ledger.smt.apply(leaves);
        // Every entry was taken exactly once, under its own key: listing the
        // ledger again gives exactly as many entries (a duplicate key or a
        // value stored under another's key would not).
        let listed = ledger.entries();
        if listed.len() != count {
            return Err(Error::BadState(format!(
                "{count} entries make a ledger of {} entries (duplicates?)",
                listed.len()
            )));
        }
        Ok(ledger)
    }

    /// Canonical bytes of the value under `key`, `None` if absent (STATE-2).
    pub fn value_bytes(&self, key: &StateKey) -> Option<Vec<u8>> {
        let addr = || -> Option<Address> { Some(Address(key.key.as_slice().try_into().ok()?)) };
        match key.ns {
            ns::ACCOUNT => self.accounts.get(&addr()?).map(|v| v.encode()),
            ns::VALIDATOR => self.validators.get(&addr()?).map(|v| v.encode()),
            ns::LIVENESS => self.liveness.get(&addr()?).map(|v| v.encode()),
            ns::NODE => self.nodes.get(&addr()?).map(|v| v.encode()),
            ns::UNBONDING => {
                let k = &key.key;
                if k.len() != 36 {
                    return None;
                }
                let ukey = UnbondingKey {
                    release_height: u64::from_be_bytes(k[0..8].try_into().ok()?),
                    owner: Address(k[8..28].try_into().ok()?),
                    seq: u64::from_be_bytes(k[28..36].try_into().ok()?),
                };
                self.unbonding.get(&ukey).map(|v| v.encode())
            }
            ns::ALLOWANCE => {
                let id: Hash32 = key.key.as_slice().try_into().ok()?;
                self.allowances.get(&id).map(|v| v.encode())
            }
            ns::USAGE_SETTLED => {
                if key.key.len() != 64 {
                    return None;
                }
                let a: Hash32 = key.key[0..32].try_into().ok()?;
                let r: Hash32 = key.key[32..64].try_into().ok()?;
                self.usage_settled.get(&(a, r)).map(|h| h.encode())
            }
            ns::RECEIPT => {
                if key.key.len() != 52 {
                    return None;
                }
                let client = Address(key.key[0..20].try_into().ok()?);
                let id: Hash32 = key.key[20..52].try_into().ok()?;
                self.settled_receipts.get(&(client, id)).map(|h| h.encode())
            }
            ns::POL_BLOCK
            | ns::POL_DELTA_COMMIT
            | ns::POL_PENDING
            | ns::POL_HEAD
            | ns::POL_REGISTRY => self.pol.entry_bytes(key),
            ns::REWARD_CLAIM | ns::REWARD_POOL => self.rewards.entry_bytes(key),
            ns::GLOBAL => match key.key.as_slice() {
                KEY_GLOBALS => Some(self.globals.encode()),
                KEY_ACTIVE_SET => Some(self.active_set.encode()),
                KEY_LAST_ACTIVE_SET => Some(self.last_active_set.encode()),
                KEY_SET_HISTORY => Some(
                    self.set_history
                        .iter()
                        .map(|(h, set)| (*h, set.clone()))
                        .collect::<Vec<_>>()
                        .encode(),
                ),
                KEY_COMMITTEE => Some(self.committee.encode()),
                _ => None,
            },
            _ => None,
        }
    }

    /// STATE-3: fold the touched keys into the sparse Merkle tree.
    fn commit_root(&mut self) -> Vec<StateKey> {
        let touched = std::mem::take(&mut self.touched);
        let updates: Vec<([u8; 32], Option<[u8; 32]>)> = touched
            .iter()
            .map(|k| {
                (
                    k.path(),
                    self.value_bytes(k).map(|b| crate::crypto::sha3_256(&b)),
                )
            })
            .collect();
        self.smt.apply(updates);
        touched.into_iter().collect()
    }

    // ----- blocks ------------------------------------------------------------

    /// BLOCK-7: applies `block` atomically. On success returns the new ledger
    /// and the outcome; on failure `self` is unchanged and the error says why.
    pub fn apply_block(&self, block: &Block) -> Result<(Ledger, BlockOutcome), Error> {
        self.apply_block_inner(block, Signatures::Verify)
    }

    /// [`Ledger::apply_block`] without re-verifying transaction signatures: only
    /// for replaying blocks this node already verified and committed (its own
    /// store, at restart) and for benchmarks. Everything else is checked.
    pub fn apply_block_trusted_signatures(
        &self,
        block: &Block,
    ) -> Result<(Ledger, BlockOutcome), Error> {
        self.apply_block_inner(block, Signatures::Trusted)
    }

    /// LEDGER-SIG-1: [`Ledger::apply_block`] where `verified(id)` names the
    /// sender of a transaction whose signature the caller has already
    /// verified on this chain (e.g. at mempool admission, NODE-MP-6); every
    /// transaction it returns `None` for is verified here. The result is the
    /// one `apply_block` gives, provided `verified` answers only for
    /// transactions it verified: the id commits to body, key and signature,
    /// so a hit is the very transaction that was checked (tested both ways).
    pub fn apply_block_with_verified(
        &self,
        block: &Block,
        verified: &dyn Fn(&Hash32) -> Option<Address>,
    ) -> Result<(Ledger, BlockOutcome), Error> {
        self.apply_block_inner(block, Signatures::Known(verified))
    }

    fn apply_block_inner(
        &self,
        block: &Block,
        sigs: Signatures<'_>,
    ) -> Result<(Ledger, BlockOutcome), Error> {
        // SIM-FID-2: the simulator's memo (off everywhere else). Never for
        // trusted replay, whose result may differ on a bad signature.
        let memo_key = match sigs {
            Signatures::Trusted => None,
            _ => crate::memo::block_key(self, &block.hash()),
        };
        if let Some(key) = &memo_key
            && let Some(hit) = crate::memo::block_get(key)
        {
            return Ok(hit);
        }
        let applied = self.apply_block_uncached(block, sigs)?;
        if let Some(key) = memo_key {
            crate::memo::block_put(key, &applied);
        }
        Ok(applied)
    }

    fn apply_block_uncached(
        &self,
        block: &Block,
        sigs: Signatures<'_>,
    ) -> Result<(Ledger, BlockOutcome), Error> {
        let mut next = self.clone();
        next.touched.clear();
        let header = &block.header;
        if block.body.body_hash() != header.body_hash {
            return Err(Error::WrongBodyHash);
        }
        next.begin_block(header)?;
        let mut events = Vec::new();
        next.apply_evidence(&block.body.evidence, sigs, &mut events)?;
        next.apply_signers(&block.body.last_commit_signers, &mut events)?;
        if block.body.txs.len() > self.params.max_block_txs as usize {
            return Err(Error::TooManyTxs {
                got: block.body.txs.len(),
                max: self.params.max_block_txs as usize,
            });
        }
        // BLOCK-8: the transactions' bytes, from the one encoding that also
        // gives each id.
        let ids: Vec<(Hash32, u64)> = block.body.txs.iter().map(SignedTx::id_and_len).collect();
        let tx_bytes: u64 = ids.iter().map(|(_, len)| len).sum();
        if tx_bytes > u64::from(self.params.max_block_bytes) {
            return Err(Error::BlockTooLarge {
                got: tx_bytes,
                max: u64::from(self.params.max_block_bytes),
            });
        }
        let mut receipts = Vec::with_capacity(block.body.txs.len());
        let mut gas_used: u64 = 0;
        for (index, (tx, (tx_id, _))) in block.body.txs.iter().zip(&ids).enumerate() {
            let receipt = next
                .apply_tx(tx, *tx_id, header, &mut gas_used, sigs)
                .map_err(|error| Error::InvalidTx { index, error })?;
            receipts.push(receipt);
        }
        if gas_used != header.gas_used {
            return Err(Error::WrongGasUsed {
                header: header.gas_used,
                computed: gas_used,
            });
        }
        if crate::block::receipts_hash(&receipts) != header.receipts_hash {
            return Err(Error::WrongReceiptsHash);
        }
        let validator_set_update = next.end_block(header, &mut events);
        let changed_keys = next.commit_root();
        if next.state_root() != header.state_root {
            return Err(Error::WrongStateRoot {
                header: header.state_root,
                computed: next.state_root(),
            });
        }
        next.last_block_hash = block.hash();
        Ok((
            next,
            BlockOutcome {
                receipts,
                changed_keys,
                validator_set_update,
                events,
            },
        ))
    }

    /// Builds the next block from candidates (skipping those that would make it
    /// invalid) and returns it with the state it leads to. The result passes
    /// [`Ledger::apply_block`] on any node (tested).
    pub fn propose_block(&self, p: Proposal<'_>) -> Result<(Block, Ledger, BlockOutcome), Error> {
        self.propose_block_with_verified(p, &|_| None)
    }

    /// [`Ledger::propose_block`] where `verified` vouches for candidates whose
    /// signatures the caller already checked (LEDGER-SIG-1; the node's
    /// mempool, NODE-MP-6); the others are verified here.
    pub fn propose_block_with_verified(
        &self,
        p: Proposal<'_>,
        verified: &dyn Fn(&Hash32) -> Option<Address>,
    ) -> Result<(Block, Ledger, BlockOutcome), Error> {
        let mut next = self.clone();
        next.touched.clear();
        let mut header = BlockHeader {
            height: self.globals.height + 1,
            time_ms: p.time_ms,
            prev_hash: self.last_block_hash,
            proposer: p.proposer,
            ticket: p.ticket,
            base_fee_per_gas: self.next_block_base_fee(),
            gas_limit: self.params.block_gas_limit,
            gas_used: 0,
            body_hash: [0; 32],
            state_root: [0; 32],
            receipts_hash: [0; 32],
        };
        next.begin_block(&header)?;
        let mut events = Vec::new();
        next.apply_evidence(&p.evidence, Signatures::Verify, &mut events)?;
        next.apply_signers(&p.last_commit_signers, &mut events)?;
        let mut body = BlockBody {
            evidence: p.evidence,
            last_commit_signers: p.last_commit_signers,
            txs: Vec::new(),
        };
        let mut receipts = Vec::new();
        let mut gas_used: u64 = 0;
        let mut tx_bytes: u64 = 0;
        for tx in p.candidates {
            if body.txs.len() >= self.params.max_block_txs as usize {
                break;
            }
            // BLOCK-8: a candidate that does not fit is skipped (a smaller
            // one may; the sender's later nonces then fail TX-11 and are
            // skipped too).
            let (tx_id, size) = tx.id_and_len();
            if tx_bytes + size > u64::from(self.params.max_block_bytes) {
                continue;
            }
            // A candidate that would invalidate the block is skipped. It
            // leaves `next` as it was: apply_tx makes every TX-11 check
            // before its first write (LEDGER-PROP-1), so no snapshot is kept.
            match next.apply_tx(
                tx,
                tx_id,
                &header,
                &mut gas_used,
                Signatures::Known(verified),
            ) {
                Ok(r) => {
                    receipts.push(r);
                    body.txs.push(tx.clone());
                    tx_bytes += size;
                }
                Err(e) => assert!(
                    e.invalidates_block(),
                    "apply_tx returns Err only for TX-11 reasons"
                ),
            }
        }
        header.gas_used = gas_used;
        let validator_set_update = next.end_block(&header, &mut events);
        let changed_keys = next.commit_root();
        header.body_hash = body.body_hash();
        header.state_root = next.state_root();
        header.receipts_hash = crate::block::receipts_hash(&receipts);
        let block = Block { header, body };
        next.last_block_hash = block.hash();
        let outcome = BlockOutcome {
            receipts,
            changed_keys,
            validator_set_update,
            events,
        };
        // LEDGER-PROP-1: the block passes the validating path with the same
        // result. Checked in debug builds (every test); in release the
        // validators' own application is the check, and re-running it here
        // doubled the cost of building a block. LEDGER-SIG-2: this pass
        // neither verifies nor decompresses a transaction key again.
        if cfg!(debug_assertions) {
            let senders: std::collections::BTreeMap<Hash32, Address> = outcome
                .receipts
                .iter()
                .map(|r| (r.tx_id, r.sender))
                .collect();
            let verified = |id: &Hash32| senders.get(id).copied();
            let (applied, re) = self.apply_block_inner(&block, Signatures::Known(&verified))?;
            assert_eq!(
                applied.state_root(),
                next.state_root(),
                "proposal and application agree"
            );
            assert_eq!(applied.last_block_hash, next.last_block_hash);
            assert_eq!(re, outcome, "proposal and application agree on the outcome");
        }
        Ok((block, next, outcome))
    }

    /// BLOCK-2: header checks before any transaction.
    fn begin_block(&mut self, h: &BlockHeader) -> Result<(), Error> {
        let expected = self.globals.height + 1;
        if h.height != expected {
            return Err(Error::WrongHeight {
                expected,
                got: h.height,
            });
        }
        if h.prev_hash != self.last_block_hash {
            return Err(Error::WrongPrevHash);
        }
        if h.time_ms <= self.globals.time_ms {
            return Err(Error::TimeNotIncreasing {
                parent: self.globals.time_ms,
                got: h.time_ms,
            });
        }
        if !self.active_set.iter().any(|(a, _)| *a == h.proposer) {
            return Err(Error::UnknownProposer(h.proposer));
        }
        if !self.may_propose(&h.proposer) {
            return Err(Error::IneligibleProposer(h.proposer));
        }
        self.pending_seed = self.check_ticket(h)?;
        let base_fee = self.next_block_base_fee();
        if h.base_fee_per_gas != base_fee {
            return Err(Error::WrongBaseFee {
                expected: base_fee,
                got: h.base_fee_per_gas,
            });
        }
        if h.gas_limit != self.params.block_gas_limit {
            return Err(Error::WrongGasLimit {
                expected: self.params.block_gas_limit,
                got: h.gas_limit,
            });
        }
        Ok(())
    }

    /// CONS-COMM-2: the next epoch's seed if `h` is the last block of its
    /// epoch, from the ticket proof it carries (verified against its
    /// proposer's VRF key); a block that takes no ticket must carry none. A
    /// proposer without a VRF key (only when no committee member is left)
    /// carries none, and the seed chains an all-zero output instead.
    fn check_ticket(&self, h: &BlockHeader) -> Result<Option<Hash32>, Error> {
        let length = self.params.epoch_length_blocks;
        if !h.height.is_multiple_of(length) {
            return match h.ticket {
                None => Ok(None),
                Some(_) => Err(Error::UnexpectedTicket),
            };
        }
        assert_eq!(
            self.committee.epoch,
            (h.height - 1) / length,
            "the committee follows the epochs"
        );
        let key = self
            .validators
            .get(&h.proposer)
            .and_then(|v| v.vrf_public_key);
        let seed = &self.committee.seed;
        match (key, &h.ticket) {
            (Some(key), Some(proof)) => crate::consensus::next_seed(
                &self.chain_id,
                self.committee.epoch + 1,
                seed,
                &key,
                proof,
            )
            .map(Some)
            .map_err(|e| Error::InvalidTicket(e.to_string())),
            (Some(_), None) => Err(Error::MissingTicket),
            (None, None) => Ok(Some(crate::consensus::epoch_seed(seed, &[0; 32]))),
            (None, Some(_)) => Err(Error::UnexpectedTicket),
        }
    }

    /// TX-11/TX-12: applies one transaction, whose id (`tx.id()`) the caller
    /// computed. `Err` means the block is invalid; a transaction that fails
    /// in execution returns `Ok` with a failed receipt.
    fn apply_tx(
        &mut self,
        tx: &SignedTx,
        tx_id: Hash32,
        h: &BlockHeader,
        gas_used: &mut u64,
        sigs: Signatures<'_>,
    ) -> Result<Receipt, TxError> {
        debug_assert_eq!(tx_id, tx.id());
        let sender = match sigs {
            Signatures::Verify => tx.verified_sender(&self.chain_id),
            Signatures::Known(verified) => {
                verified(&tx_id).or_else(|| tx.verified_sender(&self.chain_id))
            }
            Signatures::Trusted => tx.sender(),
        }
        .ok_or(TxError::InvalidSignature)?;
        let body = &tx.body;
        let mut account = self.account(&sender);
        if body.nonce != account.nonce {
            return Err(TxError::InvalidNonce {
                expected: account.nonce,
                got: body.nonce,
            });
        }
        let intrinsic = intrinsic_gas(&body.kind);
        if body.gas_limit < intrinsic {
            return Err(TxError::InvalidGasLimit {
                limit: body.gas_limit,
                intrinsic,
            });
        }
        let base_fee = h.base_fee_per_gas;
        if body.max_fee_per_gas < base_fee {
            return Err(TxError::InvalidFeeBelowBaseFee {
                max_fee: body.max_fee_per_gas,
                base_fee,
            });
        }
        if body.max_priority_fee_per_gas > body.max_fee_per_gas {
            return Err(TxError::InvalidPriorityAboveMax);
        }
        let max_cost = u128::from(body.gas_limit)
            .checked_mul(body.max_fee_per_gas)
            .ok_or(TxError::InvalidCannotPayMaxFee {
                balance: account.balance,
                needed: Amount::MAX,
            })?;
        if account.balance < max_cost {
            return Err(TxError::InvalidCannotPayMaxFee {
                balance: account.balance,
                needed: max_cost,
            });
        }
        let block_gas = gas_used
            .checked_add(intrinsic)
            .ok_or(TxError::InvalidBlockGasExceeded)?;
        if block_gas > h.gas_limit {
            return Err(TxError::InvalidBlockGasExceeded);
        }
        *gas_used = block_gas;
        // FEE-5: the fee is charged on exactly the gas used; the rest is never taken.
        let priority = body
            .max_priority_fee_per_gas
            .min(body.max_fee_per_gas - base_fee);
        let burned = u128::from(intrinsic) * base_fee;
        let tip = u128::from(intrinsic) * priority;
        account.balance -= burned + tip;
        account.nonce += 1;
        self.set_account(sender, account);
        self.globals.burned += burned;
        self.credit(h.proposer, tip);
        // TX-12: a failed execution is rolled back. A transfer fails only
        // before its first write (zero amount, short balance), so it needs
        // no snapshot; a snapshot costs a copy of every shared tree node the
        // execution then writes (the ledger's maps are persistent).
        let snapshot = match tx.body.kind {
            TxKind::Transfer { .. } => None,
            _ => Some(self.clone()),
        };
        let failure = match self.execute_kind(sender, tx, tx_id, h.height) {
            Ok(()) => None,
            Err(e) => {
                if let Some(snapshot) = snapshot {
                    let touched = std::mem::take(&mut self.touched);
                    *self = snapshot;
                    // Keys written by the failed execution keep their
                    // (restored) values; marking them is harmless and keeps
                    // `touched` a superset.
                    self.touched.extend(touched);
                }
                Some(e.to_string())
            }
        };
        Ok(Receipt {
            tx_id,
            sender,
            gas_used: intrinsic,
            fee_paid: burned + tip,
            failure,
        })
    }

    fn execute_kind(
        &mut self,
        sender: Address,
        tx: &SignedTx,
        tx_id: Hash32,
        height: Height,
    ) -> Result<(), TxError> {
        match &tx.body.kind {
            TxKind::Transfer { to, amount } => {
                if *amount == 0 {
                    return Err(TxError::ZeroAmount);
                }
                self.debit(sender, *amount)?;
                self.credit(*to, *amount);
                Ok(())
            }
            TxKind::Bond { amount } => self.bond(sender, tx.public_key, *amount),
            TxKind::Unbond { amount } => self.unbond(sender, *amount, height),
            TxKind::Unjail => self.unjail(sender, height),
            TxKind::SettleInference { receipt } => self.settle_inference(sender, receipt, height),
            TxKind::RegisterNode { info, bond } => self.register_node(sender, info, *bond, height),
            TxKind::DeregisterNode => self.deregister_node(sender, height),
            TxKind::Pol(p) => self.apply_pol(sender, p, height),
            TxKind::OpenAllowance(t) => {
                self.open_allowance(sender, tx.public_key, tx_id, t, height)
            }
            TxKind::CloseAllowance { allowance } => self.close_allowance(sender, allowance, height),
            TxKind::SettleUsage(s) => self.settle_usage(sender, s, height),
            TxKind::SetVrfKey { public_key } => self.set_vrf_key(sender, public_key),
        }
    }

    // ----- staking (spec/staking.md) -------------------------------------------

    /// STAKE-2: bond from the sender's balance; creates the validator on first bond.
    fn bond(
        &mut self,
        sender: Address,
        public_key: PublicKey,
        amount: Amount,
    ) -> Result<(), TxError> {
        if amount == 0 {
            return Err(TxError::ZeroAmount);
        }
        let mut v = self.validators.get(&sender).cloned().unwrap_or(Validator {
            public_key,
            bonded: 0,
            jailed_until: None,
            tombstoned: false,
            vrf_public_key: None,
        });
        if v.tombstoned {
            return Err(TxError::Tombstoned);
        }
        self.debit(sender, amount)?;
        v.bonded = v.bonded.checked_add(amount).ok_or(TxError::Overflow)?;
        self.set_validator(sender, v);
        Ok(())
    }

    /// TX-16 (CONS-COMM-8): a validator registers its VRF key, once. A key
    /// that could change would let a boundary proposer, who learns the next
    /// seed's input an epoch early, grind keys instead of seeds
    /// (CONS-COMM-4).
    fn set_vrf_key(
        &mut self,
        sender: Address,
        public_key: &crate::consensus::VrfPublicKey,
    ) -> Result<(), TxError> {
        let mut v = self
            .validators
            .get(&sender)
            .cloned()
            .ok_or(TxError::NotValidator(sender))?;
        if v.vrf_public_key.is_some() {
            return Err(TxError::VrfKeyAlreadySet);
        }
        crate::consensus::vrf::validate_key::<crate::consensus::Secp256k1Sha256Tai>(public_key)
            .map_err(|_| TxError::InvalidVrfKey)?;
        v.vrf_public_key = Some(*public_key);
        self.set_validator(sender, v);
        Ok(())
    }

    /// STAKE-3: move stake into the unbonding queue, released after the period.
    fn unbond(&mut self, sender: Address, amount: Amount, height: Height) -> Result<(), TxError> {
        if amount == 0 {
            return Err(TxError::ZeroAmount);
        }
        let mut v = self
            .validators
            .get(&sender)
            .cloned()
            .ok_or(TxError::NotValidator(sender))?;
        if v.bonded < amount {
            return Err(TxError::InsufficientStake {
                bonded: v.bonded,
                requested: amount,
            });
        }
        v.bonded -= amount;
        self.set_validator(sender, v);
        self.enqueue_unbonding(sender, amount, height, false);
        Ok(())
    }

    fn enqueue_unbonding(
        &mut self,
        owner: Address,
        amount: Amount,
        height: Height,
        node_bond: bool,
    ) {
        let seq = self.globals.unbonding_seq;
        self.globals.unbonding_seq += 1;
        let key = UnbondingKey {
            release_height: height + self.params.unbonding_period_blocks,
            owner,
            seq,
        };
        self.set_unbonding(
            key,
            Some(UnbondingEntry {
                amount,
                creation_height: height,
                node_bond,
            }),
        );
    }

    /// SLASH-2: leave jail after the jail period, if still above the minimum stake.
    fn unjail(&mut self, sender: Address, height: Height) -> Result<(), TxError> {
        let mut v = self
            .validators
            .get(&sender)
            .cloned()
            .ok_or(TxError::NotValidator(sender))?;
        if v.tombstoned {
            return Err(TxError::Tombstoned);
        }
        let until = v.jailed_until.ok_or(TxError::NotJailed)?;
        if height < until {
            return Err(TxError::StillJailed { until });
        }
        if v.bonded < self.params.min_validator_stake {
            return Err(TxError::BelowMinStake);
        }
        v.jailed_until = None;
        self.set_validator(sender, v);
        Ok(())
    }

    /// SLASH-1/SLASH-2: burn `bps` of a validator's bonded stake and of its
    /// validator-stake unbonding entries created at or after `infraction_height`
    /// (INV-NO-ESCAPE: unbonding does not escape punishment).
    fn slash(&mut self, validator: Address, bps: u32, infraction_height: Height) -> Amount {
        let mut v = self
            .validators
            .get(&validator)
            .cloned()
            .expect("caller checked the validator exists");
        let from_bonded = v.bonded * Amount::from(bps) / 10_000;
        v.bonded -= from_bonded;
        self.set_validator(validator, v);
        let mut total = from_bonded;
        let hits: Vec<(UnbondingKey, UnbondingEntry)> = self
            .unbonding
            .iter()
            .filter(|(k, e)| {
                k.owner == validator && !e.node_bond && e.creation_height >= infraction_height
            })
            .map(|(k, e)| (*k, e.clone()))
            .collect();
        for (k, mut e) in hits {
            let cut = e.amount * Amount::from(bps) / 10_000;
            e.amount -= cut;
            total += cut;
            self.set_unbonding(k, Some(e));
        }
        self.globals.slashed += total;
        total
    }

    /// SLASH-1, SLASH-3: evidence of double signing.
    fn apply_evidence(
        &mut self,
        evidence: &[Misbehaviour],
        signatures: Signatures<'_>,
        events: &mut Vec<Event>,
    ) -> Result<(), Error> {
        let mut seen = std::collections::BTreeSet::new();
        if evidence.len() > self.params.max_block_evidence as usize {
            return Err(Error::InvalidEvidence {
                index: evidence.len() - 1,
                reason: "too many evidence items".into(),
            });
        }
        let height = self.globals.height + 1;
        for (index, ev) in evidence.iter().enumerate() {
            let invalid = |reason: &str| Error::InvalidEvidence {
                index,
                reason: reason.to_string(),
            };
            let who = ev.validator();
            if !seen.insert(who) {
                return Err(invalid("second evidence against one validator in a block"));
            }
            let v = self
                .validators
                .get(&who)
                .ok_or_else(|| invalid("not a validator"))?;
            if v.tombstoned {
                return Err(invalid("validator already tombstoned"));
            }
            if ev.height() >= height {
                return Err(invalid("infraction height is not in the past"));
            }
            if height - ev.height() > self.params.max_evidence_age_blocks {
                return Err(invalid("evidence expired"));
            }
            // CONS-EV-2: the votes conflict, are in canonical order, and are
            // signed by a member of the set that voted at the infraction height.
            let dv = DuplicateVote::from_misbehaviour(ev)
                .ok_or_else(|| invalid("votes not in ascending order"))?;
            let set = self
                .set_at(ev.height())
                .ok_or_else(|| invalid("no validator set recorded for the infraction height"))?;
            if set.binary_search_by(|(a, _)| a.cmp(&who)).is_err() {
                return Err(invalid("not in the validator set of the infraction height"));
            }
            let (a, b) = (&dv.vote_a.message, &dv.vote_b.message);
            if a.height != b.height
                || a.round != b.round
                || a.vote_type != b.vote_type
                || a.validator != b.validator
                || a.value == b.value
            {
                return Err(invalid("the two votes do not conflict"));
            }
            if signatures.verify_evidence() {
                let scheme = K256Scheme {
                    chain_id: self.chain_id.clone(),
                };
                for sv in [&dv.vote_a, &dv.vote_b] {
                    if !scheme.verify_vote(&v.public_key, &sv.message, &sv.signature) {
                        return Err(invalid("bad vote signature"));
                    }
                }
            }
            let amount = self.slash(who, self.params.slash_double_sign_bps, ev.height());
            let mut v = self.validators.get(&who).cloned().expect("exists");
            v.tombstoned = true;
            v.jailed_until = Some(Height::MAX);
            self.set_validator(who, v);
            events.push(Event::Slashed {
                validator: who,
                amount,
                double_sign: true,
            });
            events.push(Event::Tombstoned { validator: who });
        }
        Ok(())
    }

    /// SLASH-3: the active set that voted at `height` (if still remembered).
    pub fn set_at(&self, height: Height) -> Option<&[(Address, u64)]> {
        self.set_history
            .range(..=height)
            .next_back()
            .map(|(_, set)| set.as_slice())
    }

    /// Forget sets that no evidence can reach any more: keep the set in force
    /// at `next - max_evidence_age_blocks` and every later one.
    fn prune_set_history(&mut self, next: Height) {
        let oldest = next.saturating_sub(self.params.max_evidence_age_blocks);
        let stale: Vec<Height> = self.set_history.range(..=oldest).map(|(h, _)| *h).collect();
        // Keep the last entry at or below `oldest`: it is in force there.
        if stale.len() > 1 {
            for h in &stale[..stale.len() - 1] {
                self.set_history.remove(h);
            }
            self.touch(StateKey::new(ns::GLOBAL, KEY_SET_HISTORY));
        }
    }

    /// SLASH-2: record who signed the parent's commit; jail and slash validators
    /// that missed too many of the last `signed_blocks_window` blocks.
    fn apply_signers(&mut self, signers: &[Address], events: &mut Vec<Event>) -> Result<(), Error> {
        let height = self.globals.height + 1;
        if height == 1 {
            if !signers.is_empty() {
                return Err(Error::InvalidSigners("block 1 has no parent commit".into()));
            }
            return Ok(());
        }
        if !signers.windows(2).all(|w| w[0] < w[1]) {
            return Err(Error::InvalidSigners(
                "not in strictly ascending order".into(),
            ));
        }
        let set = self.last_active_set.clone();
        let total: u128 = set.iter().map(|(_, p)| u128::from(*p)).sum();
        let mut signed_power: u128 = 0;
        for s in signers {
            match set.binary_search_by(|(a, _)| a.cmp(s)) {
                Ok(i) => signed_power += u128::from(set[i].1),
                Err(_) => {
                    return Err(Error::InvalidSigners(format!(
                        "{s} was not in the validator set"
                    )));
                }
            }
        }
        if signed_power * 3 <= total * 2 {
            return Err(Error::InvalidSigners(
                "signers hold no more than 2/3 of the voting power".into(),
            ));
        }
        let window = self.params.signed_blocks_window;
        let max_missed = window - window * self.params.min_signed_per_window_bps / 10_000;
        for (addr, _) in &set {
            let missed_now = signers.binary_search(addr).is_err();
            let mut l = self.liveness.get(addr).cloned().unwrap_or(Liveness {
                missed_bits: vec![0; window.div_ceil(8) as usize],
                next_index: 0,
                filled: 0,
                missed: 0,
            });
            let (byte, bit) = ((l.next_index / 8) as usize, l.next_index % 8);
            let was_missed = l.missed_bits[byte] >> bit & 1 == 1;
            if l.filled == window && was_missed {
                l.missed -= 1;
            }
            if missed_now {
                l.missed_bits[byte] |= 1 << bit;
                l.missed += 1;
            } else {
                l.missed_bits[byte] &= !(1 << bit);
            }
            l.next_index = (l.next_index + 1) % window;
            l.filled = (l.filled + 1).min(window);
            let jail = l.filled == window && l.missed > max_missed;
            if jail {
                let v = self.validators.get(addr).expect("active validators exist");
                if v.jailed_until.is_none() && !v.tombstoned {
                    let infraction = height.saturating_sub(u64::from(window));
                    let amount = self.slash(*addr, self.params.slash_downtime_bps, infraction);
                    let until = height + self.params.downtime_jail_blocks;
                    let mut v = self.validators.get(addr).cloned().expect("exists");
                    v.jailed_until = Some(until);
                    self.set_validator(*addr, v);
                    events.push(Event::Slashed {
                        validator: *addr,
                        amount,
                        double_sign: false,
                    });
                    events.push(Event::Jailed {
                        validator: *addr,
                        until_height: until,
                    });
                }
                self.set_liveness(*addr, None);
            } else {
                self.set_liveness(*addr, Some(l));
            }
        }
        // RWD-12: commit signers claim from the validation pool, weighted by stake.
        let weighted: Vec<(Address, Amount)> = signers
            .iter()
            .map(|a| (*a, self.validators.get(a).map_or(0, |v| v.bonded)))
            .collect();
        if self
            .rewards
            .accrue_commit_signers(&self.params.rewards, &weighted, &mut self.touched)
            .is_err()
        {
            // RWD-P1: past the pool's claimant limit the claims are forfeited.
        }
        Ok(())
    }

    /// STAKE-3, STAKE-5 and the end-of-block bookkeeping.
    fn end_block(
        &mut self,
        h: &BlockHeader,
        events: &mut Vec<Event>,
    ) -> Option<Vec<(Address, u64)>> {
        // STAKE-3: release matured unbonding entries (walks only the front of the queue).
        let due: Vec<(UnbondingKey, UnbondingEntry)> = self
            .unbonding
            .range(
                ..UnbondingKey {
                    release_height: h.height + 1,
                    owner: Address::ZERO,
                    seq: 0,
                },
            )
            .map(|(k, e)| (*k, e.clone()))
            .collect();
        for (k, e) in due {
            self.set_unbonding(k, None);
            self.credit(k.owner, e.amount);
            events.push(Event::UnbondingReleased {
                owner: k.owner,
                amount: e.amount,
            });
        }
        self.release_allowances(h.height, events);
        self.end_block_pol(h.height, events);
        let punished = events
            .iter()
            .any(|e| matches!(e, Event::Jailed { .. } | Event::Tombstoned { .. }));
        let boundary = h.height.is_multiple_of(self.params.epoch_length_blocks);
        self.last_active_set = self.active_set.clone();
        self.touch(StateKey::new(ns::GLOBAL, KEY_LAST_ACTIVE_SET));
        let mut update = None;
        if boundary || punished {
            let new_set = self.compute_active_set();
            // STAKE-6: the set never becomes empty; if nobody qualifies the old set stays.
            if !new_set.is_empty() && new_set != self.active_set {
                self.active_set = new_set.clone();
                self.touch(StateKey::new(ns::GLOBAL, KEY_ACTIVE_SET));
                self.set_history.insert(h.height + 1, new_set.clone());
                self.touch(StateKey::new(ns::GLOBAL, KEY_SET_HISTORY));
                update = Some(new_set);
            }
        }
        if boundary {
            // CONS-COMM-7: the next epoch's committee, drawn from the stakes
            // fixed an epoch ago; this block's set is the one after next's.
            let seed = self
                .pending_seed
                .take()
                .expect("begin_block verified the boundary block's ticket");
            let eligible = crate::consensus::select_validators(&seed, &self.committee.next_stakes)
                .expect("stakes of an active set satisfy CONS-VAL-1");
            self.committee = CommitteeState {
                epoch: self.committee.epoch + 1,
                seed,
                eligible,
                next_stakes: self.keyed_stakes(),
            };
            self.touch(StateKey::new(ns::GLOBAL, KEY_COMMITTEE));
        }
        assert!(self.pending_seed.is_none(), "a seed only at a boundary");
        self.prune_set_history(h.height + 1);
        self.globals.height = h.height;
        self.globals.time_ms = h.time_ms;
        self.globals.last_base_fee = h.base_fee_per_gas;
        self.globals.last_gas_used = h.gas_used;
        self.globals.last_gas_limit = h.gas_limit;
        self.touch(StateKey::new(ns::GLOBAL, KEY_GLOBALS));
        update
    }

    /// POL-38 and RWD-5: close PoL windows, turn decisions into claims, and at
    /// reward-epoch boundaries mint the settled claims.
    fn end_block_pol(&mut self, height: Height, events: &mut Vec<Event>) {
        let (stakes, total_stake) = self.active_stakes();
        let ctx = PolContext {
            height,
            stakes: &stakes,
            total_stake,
            params: &self.params.pol,
        };
        let pol_events = self.pol.end_block(&ctx, &mut self.touched);
        for e in pol_events {
            // RWD-P1: claims past a pool's claimant limit are forfeited.
            let _forfeited =
                self.rewards
                    .accrue_pol_event(&self.params.rewards, &e, &mut self.touched);
            events.push(Event::Pol(Box::new(e)));
        }
        if height.is_multiple_of(self.params.rewards.epoch_length_blocks) {
            for (recipient, amount) in self
                .rewards
                .settle_epoch(&self.params.rewards, &mut self.touched)
            {
                self.credit(recipient, amount);
                self.globals.minted += amount;
                events.push(Event::RewardsMinted { recipient, amount });
            }
        }
    }

    /// Bonded stake of the active validators, for PoL quorums (POL-33).
    fn active_stakes(&self) -> (BTreeMap<Address, Amount>, Amount) {
        let stakes: BTreeMap<Address, Amount> = self
            .active_set
            .iter()
            .map(|(a, _)| (*a, self.validators.get(a).map_or(0, |v| v.bonded)))
            .collect();
        let total = stakes.values().sum();
        (stakes, total)
    }

    /// TX-7: a PoL transaction; a registration bond is locked from the sender (POL-15).
    fn apply_pol(
        &mut self,
        sender: Address,
        tx: &crate::pol::PolTx,
        height: Height,
    ) -> Result<(), TxError> {
        let (stakes, total_stake) = self.active_stakes();
        let ctx = PolContext {
            height,
            stakes: &stakes,
            total_stake,
            params: &self.params.pol,
        };
        let effect = self
            .pol
            .apply_tx(&ctx, sender, tx, &mut self.touched)
            .map_err(|e| TxError::Pol(e.to_string()))?;
        match effect {
            PolEffect::None => Ok(()),
            PolEffect::LockBond { owner, amount } => {
                // On failure the caller restores the snapshot, PoL changes included (TX-12).
                self.debit(owner, amount)?;
                self.globals.locked += amount;
                Ok(())
            }
        }
    }

    /// STAKE-5, STAKE-4: active validators: not jailed or tombstoned, at least the minimum
    /// stake; the `max_validators` largest by stake (ties to the lower address);
    /// voting power = bonded stake in whole BLY; returned in address order.
    fn compute_active_set(&self) -> Vec<(Address, u64)> {
        let mut candidates: Vec<(Address, u64)> = self
            .validators
            .iter()
            .filter(|(_, v)| {
                !v.tombstoned
                    && v.jailed_until.is_none()
                    && v.bonded >= self.params.min_validator_stake
            })
            .map(|(a, v)| (*a, u64::try_from(v.bonded / BLY).unwrap_or(u64::MAX)))
            .collect();
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        candidates.truncate(self.params.max_validators as usize);
        candidates.sort_by_key(|(a, _)| *a);
        candidates
    }

    // ----- inference and nodes -----------------------------------------------------

    /// TX-8: settle a client-signed receipt: the client's payment is burned; the
    /// node's reward is minted later from the inference pool, capped by the burn.
    fn settle_inference(
        &mut self,
        sender: Address,
        r: &crate::tx::SignedReceipt,
        height: Height,
    ) -> Result<(), TxError> {
        if !r.verify(&self.chain_id) {
            return Err(TxError::ReceiptBadSignature);
        }
        let client = r.client().ok_or(TxError::ReceiptBadSignature)?;
        let rc = &r.receipt;
        if rc.node != sender {
            return Err(TxError::ReceiptWrongNode);
        }
        if height > rc.expires_at_height {
            return Err(TxError::ReceiptExpired(rc.expires_at_height));
        }
        if !(500..=1500).contains(&rc.quality_milli) {
            return Err(TxError::ReceiptQualityOutOfRange(rc.quality_milli));
        }
        if self.settled_receipts.contains_key(&(client, rc.request_id)) {
            return Err(TxError::ReceiptAlreadySettled);
        }
        let payment = rc.payment().ok_or(TxError::Overflow)?;
        self.debit(client, payment)?;
        self.globals.burned += payment;
        // RWD-4: the node's claim on the inference pool, capped by the burn.
        self.rewards
            .accrue_inference(
                &self.params.rewards,
                sender,
                rc.tokens,
                rc.quality_milli,
                payment,
                &mut self.touched,
            )
            .map_err(|e| TxError::Reward(e.to_string()))?;
        let mut key = client.0.to_vec();
        key.extend_from_slice(&rc.request_id);
        self.touch(StateKey::new(ns::RECEIPT, key));
        self.settled_receipts
            .insert((client, rc.request_id), height);
        Ok(())
    }

    /// TX-13: escrow an allowance; its id is the transaction's id.
    fn open_allowance(
        &mut self,
        sender: Address,
        public_key: PublicKey,
        id: Hash32,
        terms: &AllowanceTerms,
        height: Height,
    ) -> Result<(), TxError> {
        crate::allowance::check_terms(terms, height, self.params.max_allowance_blocks)
            .map_err(TxError::AllowanceTerms)?;
        assert!(
            !self.allowances.contains_key(&id),
            "transaction ids are unique (TX-1 nonces)"
        );
        self.debit(sender, terms.cap)?;
        self.globals.locked += terms.cap;
        self.set_allowance(
            id,
            Some(Allowance {
                owner: sender,
                owner_public_key: public_key,
                cap: terms.cap,
                spent: 0,
                node_caps: terms.node_caps.clone(),
                node_spent: Vec::new(),
                opened_at: height,
                expires_at: terms.expires_at,
                closed_at: None,
                settled_requests: 0,
            }),
        );
        Ok(())
    }

    /// TX-14: revoke; keys stop at once, settlement runs on for the grace
    /// period and the rest is refunded after it (ALW-4).
    fn close_allowance(
        &mut self,
        sender: Address,
        id: &Hash32,
        height: Height,
    ) -> Result<(), TxError> {
        let mut a = self
            .allowances
            .get(id)
            .cloned()
            .ok_or(TxError::AllowanceUnknown)?;
        if a.owner != sender {
            return Err(TxError::AllowanceNotOwner);
        }
        if let Some(c) = a.closed_at {
            return Err(TxError::AllowanceClosed(c));
        }
        a.closed_at = Some(height);
        self.set_allowance(*id, Some(a));
        Ok(())
    }

    /// TX-15: settle served requests against an allowance. The whole batch
    /// or nothing: every item well formed and not settled before
    /// (INV-RECEIPT-ONCE), the total within what is left for the sender
    /// (INV-ALW-CAP), inside the settlement window (ALW-4). The cost is
    /// burned from the escrow; the route's nodes claim inference rewards
    /// capped by it (RWD-10, ALW-6); usage counts grow (POL-16).
    fn settle_usage(
        &mut self,
        sender: Address,
        s: &Settlement,
        height: Height,
    ) -> Result<(), TxError> {
        use crate::allowance::{MAX_SETTLE_ITEMS, price, split};
        if s.items.is_empty() || s.items.len() > MAX_SETTLE_ITEMS {
            return Err(TxError::UsageBatchSize {
                items: s.items.len(),
                max: MAX_SETTLE_ITEMS,
            });
        }
        let mut a = self
            .allowances
            .get(&s.allowance)
            .cloned()
            .ok_or(TxError::AllowanceUnknown)?;
        let last = a.release_at(self.params.allowance_grace_blocks) - 1;
        if height > last {
            return Err(TxError::AllowanceSettlementOver(last));
        }
        let available = a
            .available_to(&sender)
            .map_err(|e| TxError::AllowanceNodeNotAllowed(e.to_string()))?;
        let unit_price = self.params.inference_price_per_1k_tokens;
        let mut seen = std::collections::BTreeSet::new();
        let mut cost: Amount = 0;
        for (index, item) in s.items.iter().enumerate() {
            item.check(&sender)
                .map_err(|reason| TxError::UsageItem { index, reason })?;
            if !seen.insert(item.request_id)
                || self
                    .usage_settled
                    .contains_key(&(s.allowance, item.request_id))
            {
                return Err(TxError::UsageAlreadySettled(hex::encode(item.request_id)));
            }
            cost = cost
                .checked_add(price(item.tokens(), unit_price))
                .ok_or(TxError::Overflow)?;
        }
        if cost > available {
            return Err(TxError::AllowanceExceeded { cost, available });
        }
        a.charge(sender, cost);
        a.settled_requests += s.items.len() as u64;
        self.globals.locked -= cost;
        self.globals.burned += cost;
        let mut usage: BTreeMap<Hash32, u64> = BTreeMap::new();
        for item in &s.items {
            let item_cost = price(item.tokens(), unit_price);
            let payments = split(item_cost, &item.route);
            let tokens = split(u128::from(item.tokens()), &item.route);
            for ((node, paid), (_, t)) in payments.into_iter().zip(tokens) {
                let t = u64::try_from(t).expect("a share of a u64");
                match self.rewards.accrue_inference(
                    &self.params.rewards,
                    node,
                    t,
                    1_000,
                    paid,
                    &mut self.touched,
                ) {
                    // RWD-P1: past the pool's claimant limit a claim is forfeited.
                    Ok(_) | Err(crate::rewards::RewardError::TooManyClaimants(_)) => {}
                    Err(e) => return Err(TxError::Reward(e.to_string())),
                }
            }
            let u = usage.entry(item.model).or_default();
            *u = u.saturating_add(item.tokens());
            self.touch(usage_settled_key(&s.allowance, &item.request_id));
            self.usage_settled
                .insert((s.allowance, item.request_id), height);
        }
        for (model, tokens) in usage {
            self.pol
                .record_model_usage(height, &model, tokens, &mut self.touched);
        }
        self.set_allowance(s.allowance, Some(a));
        Ok(())
    }

    /// ALW-4: refund what is left of allowances whose grace period ended, and
    /// forget their settled requests (a settlement against a released
    /// allowance fails: it is unknown).
    fn release_allowances(&mut self, height: Height, events: &mut Vec<Event>) {
        let due: Vec<Hash32> = self
            .allowance_releases
            .range(..(height + 1, [0; 32]))
            .map(|((_, id), ())| *id)
            .collect();
        for id in due {
            let a = self.allowances.get(&id).cloned().expect("indexed");
            let refund = a.remaining();
            self.globals.locked -= refund;
            self.credit(a.owner, refund);
            let settled: Vec<(Hash32, Hash32)> = self
                .usage_settled
                .range((id, [0; 32])..=(id, [0xff; 32]))
                .map(|(k, _)| *k)
                .collect();
            for (al, r) in settled {
                self.touch(usage_settled_key(&al, &r));
                self.usage_settled.remove(&(al, r));
            }
            self.set_allowance(id, None);
            events.push(Event::AllowanceReleased {
                allowance: id,
                owner: a.owner,
                refund,
            });
        }
    }

    /// TX-9: register a GPU node, locking its bond.
    fn register_node(
        &mut self,
        sender: Address,
        info: &NodeInfo,
        bond: Amount,
        height: Height,
    ) -> Result<(), TxError> {
        if self.nodes.contains_key(&sender) {
            return Err(TxError::NodeAlreadyRegistered);
        }
        if info.endpoint.len() > MAX_ENDPOINT_BYTES || info.blocks.len() > MAX_NODE_BLOCKS {
            return Err(TxError::NodeInfoTooLarge);
        }
        if bond < self.params.node_min_bond {
            return Err(TxError::NodeBondTooSmall {
                bond,
                min: self.params.node_min_bond,
            });
        }
        self.debit(sender, bond)?;
        self.globals.locked += bond;
        self.set_node(
            sender,
            Some(NodeRecord {
                info: info.clone(),
                bond,
                registered_at: height,
            }),
        );
        // POL-17: the registry's node assignments follow registrations.
        self.pol.assign_registered_node(
            &self.params.pol,
            height,
            sender,
            &info.blocks,
            true,
            &mut self.touched,
        );
        Ok(())
    }

    /// TX-10: deregister; the bond returns through the unbonding queue.
    fn deregister_node(&mut self, sender: Address, height: Height) -> Result<(), TxError> {
        let node = self
            .nodes
            .get(&sender)
            .cloned()
            .ok_or(TxError::NodeNotRegistered)?;
        self.set_node(sender, None);
        // POL-17: unassigned from what it registered.
        self.pol.assign_registered_node(
            &self.params.pol,
            height,
            sender,
            &node.info.blocks,
            false,
            &mut self.touched,
        );
        self.globals.locked -= node.bond;
        self.enqueue_unbonding(sender, node.bond, height, true);
        Ok(())
    }
}
