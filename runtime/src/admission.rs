//! Who a node admits to its P2P network and whom it dials, read from its
//! committed chain state (spec/node.md NODE-ADMIT-1..6). Pure: a function of
//! the node's configured seed peers and a [`Ledger`], no IO, so the rules are
//! unit-tested here and the transport ([`crate::transport`]) only applies
//! the result.
//!
//! Nobody's configuration changes when a node joins or leaves: a node that
//! bonds as a validator (TX-5) or registers as an inference node (TX-9,
//! `RegisterNode` with its bond and P2P endpoint) is admitted by every peer
//! once that transaction commits, and dropped once it leaves.

use crate::transport::Peer;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::node::PeerId;
use std::collections::{BTreeMap, BTreeSet};

/// NODE-ADMIT-3: at most this many chain-registered nodes are dialled (the
/// first by address order; seeds are always dialled). Each dialled peer has
/// one writer task and one bounded send queue.
pub const MAX_DIALLED_REGISTERED: usize = 256;

/// What the transport applies after every commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerPlan {
    /// NODE-ADMIT-1: certificates of these nodes pass the TLS handshake and
    /// their frames are accepted.
    pub admitted: BTreeSet<PeerId>,
    /// NODE-ADMIT-3: peers dialled, with their P2P address (never this node).
    pub dialled: BTreeMap<PeerId, String>,
    /// NODE-ADMIT-4: consensus messages (proposals, votes) go only to these.
    pub validators: BTreeSet<PeerId>,
}

impl PeerPlan {
    /// The plan of `me` with `seeds` (the configuration's `[[peers]]`) and
    /// the committed state `ledger`.
    ///
    /// - NODE-ADMIT-1: admitted = seeds ∪ validators not tombstoned ∪
    ///   registered nodes.
    /// - NODE-ADMIT-2: a validator is a record with stake that is not
    ///   tombstoned (bonded candidates included: they must sync before they
    ///   become active), or a member of the active set (one that unbonded
    ///   votes until the epoch boundary).
    /// - NODE-ADMIT-3: dialled = seeds at their configured address, then
    ///   registered nodes at their on-chain endpoint (at most
    ///   [`MAX_DIALLED_REGISTERED`], by address); a seed's configured
    ///   address wins over its registration.
    pub fn from_chain(me: PeerId, seeds: &[Peer], ledger: &Ledger) -> PeerPlan {
        let mut plan = PeerPlan::default();
        for s in seeds {
            let Some(id) = s.id() else { continue };
            plan.admitted.insert(id);
            if id != me {
                plan.dialled.insert(id, s.addr.clone());
            }
        }
        for (address, v) in ledger.validators() {
            if !v.tombstoned && v.bonded > 0 {
                plan.validators.insert(*address);
                plan.admitted.insert(*address);
            }
        }
        // Members of the set that votes next stay until it changes, even
        // if they unbonded (their stake counts until the epoch boundary).
        for (address, _) in ledger.active_set() {
            plan.validators.insert(*address);
            plan.admitted.insert(*address);
        }
        let mut registered = 0;
        for (address, record) in ledger.nodes() {
            plan.admitted.insert(*address);
            if *address == me
                || plan.dialled.contains_key(address)
                || registered >= MAX_DIALLED_REGISTERED
            {
                continue;
            }
            plan.dialled.insert(*address, record.info.endpoint.clone());
            registered += 1;
        }
        plan
    }

    /// NODE-ADMIT-5: dialled peers that are not validators receive each
    /// committed block pushed by the validators that dial them.
    pub fn followers(&self) -> impl Iterator<Item = &PeerId> {
        self.dialled.keys().filter(|p| !self.validators.contains(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blyan_state_machine::params::Params;
    use blyan_state_machine::testkit::{self, address, key, next_block, testnet};
    use blyan_state_machine::tx::{NodeInfo, TxKind, public_key_of};

    fn seed(i: u64, port: u16) -> Peer {
        Peer {
            addr: format!("127.0.0.1:{port}"),
            public_key: public_key_of(&key(i)),
        }
    }

    #[test]
    fn node_admit_1_seeds_and_validators_are_admitted_and_seeds_dialled() {
        let net = testnet(4, 0, Params::default());
        let ledger = Ledger::from_genesis(&net.genesis).unwrap();
        let seeds: Vec<Peer> = (0..4).map(|i| seed(i, 7000 + i as u16)).collect();
        let me = address(&key(0));
        let plan = PeerPlan::from_chain(me, &seeds, &ledger);
        let validators: BTreeSet<PeerId> = net.validators.iter().map(address).collect();
        assert_eq!(plan.validators, validators);
        for s in &seeds {
            assert!(plan.admitted.contains(&s.id().unwrap()));
        }
        assert!(!plan.dialled.contains_key(&me), "a node never dials itself");
        assert_eq!(plan.dialled.len(), 3);
        assert_eq!(plan.dialled[&address(&key(1))], "127.0.0.1:7001");
        // A stranger is not admitted.
        assert!(!plan.admitted.contains(&address(&key(9))));
        assert_eq!(plan.followers().count(), 0);
    }

    #[test]
    fn node_admit_3_registered_nodes_are_admitted_and_dialled_at_their_endpoint() {
        let net = testnet(4, 1, Params::default());
        let chain = &net.genesis.chain_id;
        let ledger = Ledger::from_genesis(&net.genesis).unwrap();
        // The funded account registers as an inference node (TX-9).
        let node_key = &net.accounts[0];
        let node = address(node_key);
        let register = TxKind::RegisterNode {
            info: Box::new(NodeInfo {
                endpoint: "10.0.0.9:7100".into(),
                blocks: Vec::new(),
            }),
            bond: ledger.params().node_min_bond,
        };
        let tx = testkit::tx(chain, node_key, 0, register, 100_000_000_000);
        let (_, ledger) = next_block(&ledger, &[tx]).unwrap();
        assert!(ledger.node(&node).is_some(), "the registration committed");
        let seeds = vec![seed(0, 7000)];
        let plan = PeerPlan::from_chain(address(&key(1)), &seeds, &ledger);
        assert!(plan.admitted.contains(&node));
        assert_eq!(plan.dialled[&node], "10.0.0.9:7100");
        assert!(!plan.validators.contains(&node));
        assert_eq!(plan.followers().collect::<Vec<_>>(), vec![&node]);
        // The node itself dials the seed, not its own endpoint.
        let own = PeerPlan::from_chain(node, &seeds, &ledger);
        assert!(!own.dialled.contains_key(&node));
        assert!(own.admitted.contains(&node));
        // A seed's configured address wins over its registration.
        let as_seed = vec![Peer {
            addr: "127.0.0.1:7999".into(),
            public_key: public_key_of(node_key),
        }];
        let plan = PeerPlan::from_chain(address(&key(1)), &as_seed, &ledger);
        assert_eq!(plan.dialled[&node], "127.0.0.1:7999");
        // Deregistration (TX-10) removes it from the next plan.
        let leave = testkit::tx(chain, node_key, 1, TxKind::DeregisterNode, 100_000_000_000);
        let (_, ledger) = next_block(&ledger, &[leave]).unwrap();
        assert!(ledger.node(&node).is_none(), "the deregistration committed");
        let plan = PeerPlan::from_chain(address(&key(1)), &seeds, &ledger);
        assert!(!plan.admitted.contains(&node));
        assert!(!plan.dialled.contains_key(&node));
    }

    #[test]
    fn node_admit_2_tombstoned_or_unbonded_validators_are_not_validators() {
        let net = testnet(4, 0, Params::default());
        let ledger = Ledger::from_genesis(&net.genesis).unwrap();
        let plan = PeerPlan::from_chain(address(&key(0)), &[], &ledger);
        assert_eq!(plan.validators.len(), 4);
        for (a, v) in ledger.validators() {
            assert_eq!(
                plan.validators.contains(a),
                !v.tombstoned && v.bonded > 0,
                "{a}"
            );
        }
        assert!(plan.dialled.is_empty(), "no seeds, no registrations");
    }

    #[test]
    fn node_admit_2_an_unbonded_member_of_the_active_set_stays_until_it_changes() {
        let net = testnet(4, 0, Params::default());
        let chain = &net.genesis.chain_id;
        let ledger = Ledger::from_genesis(&net.genesis).unwrap();
        let leaver = &net.validators[3];
        let bonded = ledger.validator(&address(leaver)).unwrap().bonded;
        let unbond = testkit::tx(
            chain,
            leaver,
            0,
            TxKind::Unbond { amount: bonded },
            100_000_000_000,
        );
        let (_, ledger) = next_block(&ledger, &[unbond]).unwrap();
        assert_eq!(
            ledger.validator(&address(leaver)).map_or(0, |v| v.bonded),
            0
        );
        assert!(
            ledger
                .active_set()
                .iter()
                .any(|(a, _)| *a == address(leaver)),
            "still in the set until the epoch boundary"
        );
        let plan = PeerPlan::from_chain(address(&key(0)), &[], &ledger);
        assert!(plan.validators.contains(&address(leaver)));
        assert!(plan.admitted.contains(&address(leaver)));
    }
}
