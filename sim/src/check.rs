//! SIM-CHECK-*: what every run must satisfy, checked from what the nodes
//! committed (the observer sees commits as the host performs them).

use blyan_state_machine::crypto::sha3_256_parts;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::pol::DeltaDecision;
use blyan_state_machine::types::{Hash32, Height};
use std::collections::{BTreeMap, BTreeSet};

/// SIM-CHECK-8 (CONS-COMM-2/5/7): across one block, the committee changes
/// only at an epoch boundary, to one drawn from the stakes fixed an epoch
/// earlier that holds at least two thirds of them, and without its last
/// member less (checked here from the stakes, not by calling the draw).
fn check_committee(before: &Ledger, after: &Ledger) -> Result<(), String> {
    let (b, a) = (before.committee(), after.committee());
    let boundary = after
        .height()
        .is_multiple_of(after.params().epoch_length_blocks);
    if !boundary {
        return if a == b {
            Ok(())
        } else {
            Err(format!("changed inside an epoch: {b:?} -> {a:?}"))
        };
    }
    if a.epoch != b.epoch + 1 || a.seed == b.seed {
        return Err(format!(
            "epoch {} -> {} without a new seed",
            b.epoch, a.epoch
        ));
    }
    let stake = |who: &[blyan_state_machine::types::Address]| -> Result<u128, String> {
        who.iter()
            .map(|m| {
                b.next_stakes
                    .iter()
                    .find(|(s, _)| s == m)
                    .map(|(_, p)| u128::from(*p))
                    .ok_or_else(|| format!("{m} was not among the draw's stakes"))
            })
            .sum()
    };
    let total: u128 = b.next_stakes.iter().map(|(_, p)| u128::from(*p)).sum();
    let taken = stake(&a.eligible)?;
    let without_last = stake(&a.eligible[..a.eligible.len().saturating_sub(1)])?;
    if 3 * taken < 2 * total || (!a.eligible.is_empty() && 3 * without_last >= 2 * total) {
        return Err(format!(
            "{} members hold {taken} of {total}: not a minimal two thirds",
            a.eligible.len()
        ));
    }
    Ok(())
}

/// One committed block as a node saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub block_hash: Hash32,
    pub state_root: Hash32,
    pub tx_ids: Vec<Hash32>,
    /// Simulated time of the commit on this node.
    pub at_ms: u64,
    /// Transactions whose receipt records a failure (they paid their fee).
    pub failed_tx_ids: BTreeSet<Hash32>,
    /// POL-38: the PoL decisions of the block's end, in order.
    pub pol_decisions: Vec<DeltaDecision>,
}

/// SIM-MSG-1: messages sent, by kind (one per destination).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageCounts {
    pub proposals: u64,
    pub votes: u64,
    pub txs: u64,
    /// Block requests and block batches (NODE-SYNC-*).
    pub sync: u64,
    /// NODE-GOSSIP-2 statuses.
    pub status: u64,
    /// SIM-BYZ-2: conflicting proposals sent by Byzantine proposers
    /// (messages, not included in the kinds above twice).
    pub conflicting_proposals: u64,
}

impl MessageCounts {
    pub fn total(&self) -> u64 {
        self.proposals + self.votes + self.txs + self.sync + self.status
    }
}

/// Everything the checkers need, shared by the node tasks (single-threaded
/// simulation: a plain mutex is never contended).
#[derive(Debug, Default)]
pub struct Observer {
    pub honest: BTreeSet<usize>,
    pub commits: BTreeMap<usize, BTreeMap<Height, Commit>>,
    /// The latest ledger of each node (cheap clones of persistent maps).
    pub ledgers: BTreeMap<usize, Ledger>,
    /// SIM-CHECK-1 violations noticed as they happen.
    pub violations: Vec<String>,
    pub crashes: u64,
    pub store_errors: u64,
    pub messages_sent: u64,
    /// SIM-MSG-1: messages handed to the network by kind, per destination,
    /// before loss and duplication.
    pub messages_by_kind: MessageCounts,
    /// Each node's (height in progress, round) after its last input.
    pub status: BTreeMap<usize, (Height, Option<u32>)>,
    pub describe: BTreeMap<usize, String>,
}

impl Observer {
    /// Records a commit and checks agreement against every other honest node
    /// at once, so the first violation is reported with its time.
    pub fn committed(&mut self, node: usize, height: Height, commit: Commit, ledger: Ledger) {
        if self.honest.contains(&node) {
            for (other, commits) in &self.commits {
                if *other == node || !self.honest.contains(other) {
                    continue;
                }
                if let Some(c) = commits.get(&height)
                    && (c.block_hash != commit.block_hash || c.state_root != commit.state_root)
                {
                    self.violations.push(format!(
                        "agreement: nodes {other} and {node} committed different blocks at height {height} (t={} ms)",
                        commit.at_ms
                    ));
                }
            }
        }
        let previous = self.commits.entry(node).or_default().insert(height, commit);
        if previous.is_some() {
            self.violations
                .push(format!("node {node} committed height {height} twice"));
        }
        if let Some(before) = self.ledgers.get(&node)
            && before.height() + 1 == height
            && ledger.height() == height
            && let Err(why) = check_committee(before, &ledger)
        {
            self.violations
                .push(format!("committee: node {node} at height {height}: {why}"));
        }
        self.ledgers.insert(node, ledger);
    }

    /// The longest honest chain (agreement makes every honest chain a prefix of it).
    pub fn canonical(&self) -> BTreeMap<Height, Commit> {
        let mut best: BTreeMap<Height, Commit> = BTreeMap::new();
        for node in &self.honest {
            if let Some(c) = self.commits.get(node)
                && c.len() > best.len()
            {
                best = c.clone();
            }
        }
        best
    }

    pub fn height(&self, node: usize) -> Height {
        self.commits
            .get(&node)
            .and_then(|c| c.keys().next_back().copied())
            .unwrap_or(0)
    }

    /// SIM-DIGEST-1: SHA3-256 over every honest node's committed blocks and
    /// state roots, nodes in index order, heights ascending.
    pub fn digest(&self) -> Hash32 {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        for node in &self.honest {
            parts.push((*node as u64).to_be_bytes().to_vec());
            for (h, c) in self.commits.get(node).into_iter().flatten() {
                parts.push(h.to_be_bytes().to_vec());
                parts.push(c.block_hash.to_vec());
                parts.push(c.state_root.to_vec());
            }
        }
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        sha3_256_parts(&refs)
    }
}

/// The integer `q`-quantile (per mille) of `values`, nearest rank.
pub fn quantile(values: &mut [u64], per_mille: u64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let n = values.len() as u64;
    let rank = (per_mille * n).div_ceil(1_000).clamp(1, n);
    Some(values[(rank - 1) as usize])
}
