//! Tests for spec/pol.md; each names the rule it checks.

use super::*;
use proptest::prelude::*;

const ZERO: Hash32 = [0u8; 32];

fn addr(n: u8) -> Address {
    Address([n; 20])
}

fn params() -> PolParams {
    PolParams {
        attest_commit_window_blocks: 2,
        attest_reveal_window_blocks: 2,
        delta_commit_ttl_blocks: 5,
        max_parents: 4,
        max_pending_deltas: 8,
        max_delta_commits: 8,
        max_attestations_per_delta: 8,
        max_node_assignments: 2,
        ..PolParams::default()
    }
}

fn block(kind: PolBlockType, model_id: Hash32, parents: &[Hash32], tag: &[u8]) -> PolBlock {
    PolBlock {
        block_type: kind,
        model_id,
        depends_on: parents.to_vec(),
        version: SemVer::new(1, 0, 0),
        layer: None,
        expert: None,
        payload_size_bytes: tag.len() as u64,
        payload_merkle_root: payload_merkle_root(tag),
        payload_cid: cid_v1_raw_sha256(tag),
        submitter: addr(1),
        base_block: None,
        base_version: None,
    }
}

fn meta() -> PolBlock {
    block(PolBlockType::Meta, ZERO, &[], b"meta")
}

fn layer(meta_id: Hash32, l: u32) -> PolBlock {
    let mut b = block(PolBlockType::Layer, meta_id, &[meta_id], b"layer");
    b.layer = Some(l);
    b
}

fn expert(meta_id: Hash32, l: u32, e: u32) -> PolBlock {
    let mut b = block(PolBlockType::Expert, meta_id, &[meta_id], b"expert");
    b.layer = Some(l);
    b.expert = Some(e);
    b
}

fn router(meta_id: Hash32, l: u32) -> PolBlock {
    let mut b = block(PolBlockType::Router, meta_id, &[meta_id], b"router");
    b.layer = Some(l);
    b
}

fn data(meta_id: Hash32) -> PolBlock {
    block(PolBlockType::Data, meta_id, &[meta_id], b"data")
}

fn delta_on(base: &PolBlock, base_id: Hash32, data: &[Hash32], submitter: Address) -> PolBlock {
    let mut parents = vec![base_id];
    parents.extend_from_slice(data);
    let mut d = block(PolBlockType::Delta, base.model_id, &parents, b"delta");
    d.layer = base.layer;
    d.expert = base.expert;
    d.base_block = Some(base_id);
    d.base_version = Some(base.version);
    d.version = base.version.bump_for_delta().expect("small version");
    d.submitter = submitter;
    d
}

/// Genesis with one model: meta, layer 0, expert (0, 0), router 0, data.
struct World {
    state: PolState,
    params: PolParams,
    stakes: BTreeMap<Address, Amount>,
    meta: PolBlock,
    layer: PolBlock,
    expert: PolBlock,
    router: PolBlock,
    data: PolBlock,
}

impl World {
    fn new() -> World {
        let m = meta();
        let id = m.id();
        let mut data_block = data(id);
        data_block.submitter = addr(9);
        let blocks = vec![
            m.clone(),
            layer(id, 0),
            expert(id, 0, 0),
            router(id, 0),
            data_block.clone(),
        ];
        let params = params();
        let state = PolState::genesis(blocks, &params).expect("valid genesis");
        let stakes = [
            (addr(10), 40),
            (addr(11), 30),
            (addr(12), 20),
            (addr(13), 10),
        ]
        .into_iter()
        .collect();
        World {
            state,
            params,
            stakes,
            meta: m,
            layer: layer(id, 0),
            expert: expert(id, 0, 0),
            router: router(id, 0),
            data: data_block,
        }
    }

    fn tx(&mut self, height: Height, sender: Address, tx: PolTx) -> Result<PolEffect, PolError> {
        let stakes = self.stakes.clone();
        let params = self.params.clone();
        let ctx = PolContext {
            height,
            stakes: &stakes,
            total_stake: stakes.values().sum(),
            params: &params,
        };
        let before = self.state.clone();
        let mut touched = Touched::new();
        let result = self.state.apply_tx(&ctx, sender, &tx, &mut touched);
        if result.is_err() {
            assert_eq!(self.state, before, "a failed tx changes nothing");
            assert!(touched.is_empty(), "a failed tx touches nothing");
        }
        check_touched(&before, &self.state, &touched);
        result
    }

    fn end(&mut self, height: Height) -> Vec<PolEvent> {
        let stakes = self.stakes.clone();
        let params = self.params.clone();
        let ctx = PolContext {
            height,
            stakes: &stakes,
            total_stake: stakes.values().sum(),
            params: &params,
        };
        let before = self.state.clone();
        let mut touched = Touched::new();
        let events = self.state.end_block(&ctx, &mut touched);
        check_touched(&before, &self.state, &touched);
        events
    }

    /// Commits at `h`, reveals at `h + 1`; returns the delta id.
    fn submit_delta(&mut self, h: Height, delta: &PolBlock) -> Hash32 {
        let id = delta.id();
        let commitment = delta_commitment(&id, &delta.submitter);
        self.tx(h, delta.submitter, PolTx::CommitDelta { commitment })
            .expect("commit");
        self.tx(h + 1, delta.submitter, PolTx::RevealDelta(delta.clone()))
            .expect("reveal");
        id
    }

    /// Every validator in `losses` commits at `commit_h` and reveals at `reveal_h`.
    fn attest(&mut self, id: Hash32, losses: &[(Address, u64, u64)], commit_h: Height) {
        let reveal_h = self
            .state
            .pending_delta(&id)
            .expect("pending")
            .commit_end_height
            + 1;
        for (v, loss, head) in losses {
            let salt = [v.0[0]; 32];
            let commitment = attestation_commitment(&id, *loss, *head, &salt, v);
            self.tx(
                commit_h,
                *v,
                PolTx::CommitAttestation {
                    delta_id: id,
                    commitment,
                },
            )
            .expect("commit attestation");
        }
        for (v, loss, head) in losses {
            let salt = [v.0[0]; 32];
            self.tx(
                reveal_h,
                *v,
                PolTx::RevealAttestation {
                    delta_id: id,
                    loss_micronats: *loss,
                    head_loss_micronats: *head,
                    salt,
                },
            )
            .expect("reveal attestation");
        }
    }
}

/// POL-K1: every key whose bytes changed is in `touched`.
fn check_touched(before: &PolState, after: &PolState, touched: &Touched) {
    let old: BTreeMap<StateKey, Vec<u8>> = before.entries().into_iter().collect();
    let new: BTreeMap<StateKey, Vec<u8>> = after.entries().into_iter().collect();
    for key in old.keys().chain(new.keys()) {
        if old.get(key) != new.get(key) {
            assert!(touched.contains(key), "changed key not touched: {key:?}");
        }
    }
    for (key, bytes) in &new {
        assert_eq!(after.entry_bytes(key).as_ref(), Some(bytes));
    }
}

fn decision(events: &[PolEvent]) -> &DeltaDecision {
    events
        .iter()
        .find_map(|e| match e {
            PolEvent::DeltaDecided(d) => Some(d),
            _ => None,
        })
        .expect("a decision")
}

// -- POL-3, POL-4 -------------------------------------------------------------

#[test]
fn pol_3_merkle_root_of_empty_payload_is_leaf_of_empty_chunk() {
    assert_eq!(payload_merkle_root(&[]), sha3_256(&[0x00]));
    assert_eq!(payload_chunk_count(0), 1);
}

#[test]
fn pol_3_merkle_root_single_chunk_is_its_leaf() {
    let payload = vec![7u8; PAYLOAD_CHUNK_BYTES];
    assert_eq!(
        payload_merkle_root(&payload),
        sha3_256_parts(&[&[0x00], &payload])
    );
}

#[test]
fn pol_3_merkle_root_three_chunks_carries_odd_node_up() {
    let mut payload = vec![1u8; 2 * PAYLOAD_CHUNK_BYTES];
    payload.extend_from_slice(b"tail");
    let l0 = sha3_256_parts(&[&[0x00], &payload[..PAYLOAD_CHUNK_BYTES]]);
    let l1 = sha3_256_parts(&[
        &[0x00],
        &payload[PAYLOAD_CHUNK_BYTES..2 * PAYLOAD_CHUNK_BYTES],
    ]);
    let l2 = sha3_256_parts(&[&[0x00], b"tail"]);
    let n01 = sha3_256_parts(&[&[0x01], &l0, &l1]);
    let root = sha3_256_parts(&[&[0x01], &n01, &l2]);
    assert_eq!(payload_merkle_root(&payload), root);
    assert_eq!(payload_chunk_count(payload.len() as u64), 3);
}

#[test]
fn pol_3a_every_chunk_verifies_and_tampering_fails() {
    for size in [0usize, 5, PAYLOAD_CHUNK_BYTES, 3 * PAYLOAD_CHUNK_BYTES + 9] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let root = payload_merkle_root(&payload);
        let count = payload_chunk_count(size as u64);
        for index in 0..count {
            let proof = payload_merkle_proof(&payload, index).expect("in range");
            let start = (index as usize * PAYLOAD_CHUNK_BYTES).min(size);
            let end = (start + PAYLOAD_CHUNK_BYTES).min(size);
            let chunk = &payload[start..end];
            assert!(verify_payload_chunk(
                &root,
                size as u64,
                index,
                chunk,
                &proof
            ));
            let mut bad = chunk.to_vec();
            bad.push(0);
            assert!(!verify_payload_chunk(
                &root,
                size as u64,
                index,
                &bad,
                &proof
            ));
            assert!(!verify_payload_chunk(
                &[0u8; 32],
                size as u64,
                index,
                chunk,
                &proof
            ));
        }
        assert!(payload_merkle_proof(&payload, count).is_none());
    }
}

#[test]
fn pol_4_cid_known_vectors() {
    // Derived by hand: 0x01 0x55 0x12 0x20 ‖ sha256(x), base32 lower, "b" prefix.
    assert_eq!(
        cid_v1_raw_sha256(b""),
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    );
    assert_eq!(
        cid_v1_raw_sha256(b"hello"),
        "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    );
    assert!(is_cid_v1_raw_sha256(&cid_v1_raw_sha256(b"x")));
    assert!(!is_cid_v1_raw_sha256(
        "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
    ));
    assert!(!is_cid_v1_raw_sha256(
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvykU"
    ));
}

#[test]
fn pol_4_block_with_bad_cid_is_rejected() {
    let mut w = World::new();
    let mut d = data(w.meta.id());
    d.payload_cid = "bafy".into();
    let err = w.tx(1, addr(1), PolTx::RegisterBlock(d)).unwrap_err();
    assert_eq!(err, PolError::BadCid);
}

#[test]
fn pol_3_payload_size_is_bounded() {
    let mut w = World::new();
    let mut d = data(w.meta.id());
    d.payload_size_bytes = w.params.max_payload_size_bytes + 1;
    let err = w.tx(1, addr(1), PolTx::RegisterBlock(d)).unwrap_err();
    assert!(matches!(err, PolError::PayloadTooLarge { .. }));
}

// -- POL-2, POL-10..16 ------------------------------------------------------------

#[test]
fn pol_2_block_id_is_canonical_hash_and_unique() {
    let w = World::new();
    let m = w.meta.clone();
    assert_eq!(m.id(), sha3_256(&m.encode()));
    assert!(w.state.block(&m.id()).is_some());
    let err = PolState::genesis(vec![m.clone(), m], &w.params).unwrap_err();
    assert!(matches!(err, PolError::DuplicateBlock(_)));
}

#[test]
fn pol_10_parents_must_exist_be_distinct_and_bounded() {
    let mut w = World::new();
    let mut d = data(w.meta.id());
    d.depends_on = vec![[5u8; 32]];
    d.model_id = [5u8; 32];
    let err = w.tx(1, addr(1), PolTx::RegisterBlock(d)).unwrap_err();
    assert_eq!(err, PolError::UnknownParent([5u8; 32]));

    let mut m = meta();
    m.payload_size_bytes = 99;
    m.depends_on = vec![w.meta.id(), w.meta.id()];
    let err = w
        .tx(1, addr(1), PolTx::RegisterBlock(m.clone()))
        .unwrap_err();
    assert_eq!(err, PolError::DuplicateParent(w.meta.id()));

    m.depends_on = vec![w.meta.id(); 5];
    let err = w.tx(1, addr(1), PolTx::RegisterBlock(m)).unwrap_err();
    assert_eq!(err, PolError::TooManyParents { count: 5, max: 4 });
}

#[test]
fn pol_11_meta_and_data_rules() {
    let mut w = World::new();
    let mid = w.meta.id();
    // A meta must have a zero model id.
    let mut m = meta();
    m.model_id = mid;
    assert!(matches!(
        w.tx(1, addr(1), PolTx::RegisterBlock(m)).unwrap_err(),
        PolError::TypeRule { rule: "POL-11", .. }
    ));
    // A meta may depend on an earlier meta (lineage), not on data.
    let mut m2 = meta();
    m2.depends_on = vec![mid];
    w.tx(1, addr(1), PolTx::RegisterBlock(m2))
        .expect("meta on meta");
    let mut m3 = meta();
    m3.depends_on = vec![w.data.id()];
    assert!(w.tx(1, addr(1), PolTx::RegisterBlock(m3)).is_err());
    // Data: nothing (zero model) or exactly its meta.
    let free = block(PolBlockType::Data, ZERO, &[], b"free data");
    w.tx(1, addr(1), PolTx::RegisterBlock(free))
        .expect("free data");
    let wrong = block(PolBlockType::Data, ZERO, &[mid], b"data 2");
    assert!(matches!(
        w.tx(1, addr(1), PolTx::RegisterBlock(wrong)).unwrap_err(),
        PolError::TypeRule { rule: "POL-11", .. }
    ));
}

#[test]
fn pol_12_targets_depend_on_their_meta_and_are_unique() {
    let mut w = World::new();
    let mid = w.meta.id();
    w.tx(1, addr(1), PolTx::RegisterBlock(layer(mid, 1)))
        .expect("new layer");
    assert_eq!(
        w.tx(1, addr(1), PolTx::RegisterBlock(layer(mid, 1)))
            .unwrap_err(),
        PolError::DuplicateBlock(layer(mid, 1).id())
    );
    let mut again = layer(mid, 1);
    again.payload_size_bytes = 1;
    assert_eq!(
        w.tx(1, addr(1), PolTx::RegisterBlock(again)).unwrap_err(),
        PolError::TargetExists
    );
    // An expert depends on its meta, not on data.
    let mut e = expert(mid, 0, 1);
    e.depends_on = vec![w.data.id()];
    assert!(matches!(
        w.tx(1, addr(1), PolTx::RegisterBlock(e)).unwrap_err(),
        PolError::TypeRule { rule: "POL-12", .. }
    ));
    // An expert needs both a layer and an expert index.
    let mut e = expert(mid, 0, 1);
    e.expert = None;
    assert!(w.tx(1, addr(1), PolTx::RegisterBlock(e)).is_err());
    // The model id must name a meta.
    let mut l = layer(mid, 2);
    l.model_id = w.data.id();
    l.depends_on = vec![w.data.id()];
    assert!(w.tx(1, addr(1), PolTx::RegisterBlock(l)).is_err());
}

#[test]
fn pol_15_registration_locks_a_bond_and_needs_the_submitter() {
    let mut w = World::new();
    let l = layer(w.meta.id(), 3);
    assert_eq!(
        w.tx(1, addr(2), PolTx::RegisterBlock(l.clone()))
            .unwrap_err(),
        PolError::NotSubmitter
    );
    let effect = w.tx(1, addr(1), PolTx::RegisterBlock(l.clone())).unwrap();
    assert_eq!(
        effect,
        PolEffect::LockBond {
            owner: addr(1),
            amount: w.params.registration_bond
        }
    );
    let target = l.target_key(PolBlockType::Layer);
    assert_eq!(w.state.head(&target).unwrap().block_id, l.id());
    let record = w.state.record(&target).unwrap();
    assert_eq!(record.last_updated, 1);
    assert_eq!(record.weight_cid, l.payload_cid);
    // Deltas cannot be registered.
    let d = delta_on(&w.layer, w.layer.id(), &[], addr(1));
    assert!(matches!(
        w.tx(1, addr(1), PolTx::RegisterBlock(d)).unwrap_err(),
        PolError::TypeRule { rule: "POL-15", .. }
    ));
}

#[test]
fn pol_g1_genesis_rejects_deltas_and_bad_params() {
    let w = World::new();
    let d = delta_on(&w.layer, w.layer.id(), &[], addr(1));
    let blocks = vec![w.meta.clone(), w.layer.clone(), d];
    assert!(PolState::genesis(blocks, &w.params).is_err());
    let bad = PolParams {
        attest_commit_window_blocks: 0,
        ..params()
    };
    assert_eq!(
        PolState::genesis(vec![], &bad).unwrap_err(),
        PolError::BadParams
    );
}

#[test]
fn pol_16_registry_usage_and_bounded_node_assignments() {
    let mut w = World::new();
    let target = w.expert.target_key(PolBlockType::Expert);
    let ctx_params = w.params.clone();
    let stakes = w.stakes.clone();
    let ctx = PolContext {
        height: 7,
        stakes: &stakes,
        total_stake: 100,
        params: &ctx_params,
    };
    let mut touched = Touched::new();
    w.state
        .record_usage(&ctx, &target, 1_000, &mut touched)
        .unwrap();
    for n in [3u8, 1] {
        w.state
            .set_node_assignment(&ctx, &target, addr(n), true, &mut touched)
            .unwrap();
    }
    let err = w
        .state
        .set_node_assignment(&ctx, &target, addr(2), true, &mut touched)
        .unwrap_err();
    assert_eq!(err, PolError::TooManyAssignments(2));
    let record = w.state.record(&target).unwrap();
    assert_eq!(record.usage_count, 1_000);
    assert_eq!(record.node_assignments, vec![addr(1), addr(3)]);
    assert_eq!(record.last_updated, 7);
    w.state
        .set_node_assignment(&ctx, &target, addr(1), false, &mut touched)
        .unwrap();
    assert_eq!(
        w.state.record(&target).unwrap().node_assignments,
        vec![addr(3)]
    );
}

// -- POL-13, POL-14, POL-20..22 -----------------------------------------------------

#[test]
fn pol_21_reveal_needs_an_earlier_commitment_by_the_same_submitter() {
    let mut w = World::new();
    let d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let id = d.id();
    // No commitment.
    assert_eq!(
        w.tx(1, addr(2), PolTx::RevealDelta(d.clone())).unwrap_err(),
        PolError::NoCommitment
    );
    let commitment = delta_commitment(&id, &addr(2));
    w.tx(1, addr(2), PolTx::CommitDelta { commitment }).unwrap();
    assert_eq!(
        w.tx(1, addr(2), PolTx::CommitDelta { commitment })
            .unwrap_err(),
        PolError::DuplicateCommitment
    );
    // Same block: too early.
    assert_eq!(
        w.tx(1, addr(2), PolTx::RevealDelta(d.clone())).unwrap_err(),
        PolError::RevealTooEarly
    );
    // A thief resubmitting under its own name has no commitment.
    let mut stolen = d.clone();
    stolen.submitter = addr(3);
    assert_eq!(
        w.tx(2, addr(3), PolTx::RevealDelta(stolen)).unwrap_err(),
        PolError::NoCommitment
    );
    // Nor may it send the original.
    assert_eq!(
        w.tx(2, addr(3), PolTx::RevealDelta(d.clone())).unwrap_err(),
        PolError::NotSubmitter
    );
    w.tx(2, addr(2), PolTx::RevealDelta(d)).expect("reveal");
    let pending = w.state.pending_delta(&id).unwrap();
    assert_eq!(pending.revealed_height, 2);
    assert_eq!(pending.commit_end_height, 4);
    assert_eq!(pending.reveal_end_height, 6);
    assert!(w.state.delta_commit(&commitment).is_none());
}

#[test]
fn pol_22_commitments_expire_and_are_bounded() {
    let mut w = World::new();
    let commitment = [42u8; 32];
    w.tx(1, addr(2), PolTx::CommitDelta { commitment }).unwrap();
    assert!(w.end(5).is_empty());
    assert_eq!(
        w.end(6),
        vec![PolEvent::DeltaCommitExpired {
            commitment,
            submitter: addr(2)
        }]
    );
    assert!(w.state.delta_commit(&commitment).is_none());
    for i in 0..8u8 {
        w.tx(
            7,
            addr(2),
            PolTx::CommitDelta {
                commitment: [i; 32],
            },
        )
        .unwrap();
    }
    assert_eq!(
        w.tx(
            7,
            addr(2),
            PolTx::CommitDelta {
                commitment: [99; 32]
            }
        )
        .unwrap_err(),
        PolError::TooManyCommitments(8)
    );
}

#[test]
fn pol_13_delta_rules() {
    let mut w = World::new();
    let lid = w.layer.id();
    let commit_reveal = |w: &mut World, d: &PolBlock| {
        let c = delta_commitment(&d.id(), &d.submitter);
        w.tx(1, d.submitter, PolTx::CommitDelta { commitment: c })
            .unwrap();
        w.tx(2, d.submitter, PolTx::RevealDelta(d.clone()))
    };
    // Base must be the first parent.
    let mut d = delta_on(&w.layer, lid, &[w.data.id()], addr(2));
    d.depends_on.reverse();
    assert!(matches!(
        commit_reveal(&mut w, &d).unwrap_err(),
        PolError::TypeRule { rule: "POL-13", .. }
    ));
    // Extra parents must be data.
    let d = delta_on(&w.layer, lid, &[w.meta.id()], addr(2));
    assert!(matches!(
        commit_reveal(&mut w, &d).unwrap_err(),
        PolError::TypeRule { rule: "POL-13", .. }
    ));
    // Must keep the base's target shape.
    let mut d = delta_on(&w.layer, lid, &[], addr(2));
    d.layer = Some(1);
    assert!(commit_reveal(&mut w, &d).is_err());
    // Base version must match the head.
    let mut d = delta_on(&w.layer, lid, &[], addr(2));
    d.base_version = Some(SemVer::new(0, 9, 0));
    assert!(commit_reveal(&mut w, &d).is_err());
    // A data block cannot be a base.
    let d = delta_on(&w.data, w.data.id(), &[], addr(2));
    assert!(commit_reveal(&mut w, &d).is_err());
    // A valid one on the router of the same layer picks the router target.
    let d = delta_on(&w.router, w.router.id(), &[w.data.id()], addr(2));
    commit_reveal(&mut w, &d).expect("valid delta");
    assert_eq!(
        w.state.pending_delta(&d.id()).unwrap().target,
        w.router.target_key(PolBlockType::Router)
    );
}

#[test]
fn pol_14_delta_version_is_minor_bump_of_base() {
    let w = World::new();
    assert_eq!(
        SemVer::new(1, 4, 7).bump_for_delta(),
        Some(SemVer::new(1, 5, 0))
    );
    assert_eq!(SemVer::new(1, u32::MAX, 0).bump_for_delta(), None);
    let mut w = w;
    let mut d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    d.version = SemVer::new(1, 0, 1);
    let c = delta_commitment(&d.id(), &addr(2));
    w.tx(1, addr(2), PolTx::CommitDelta { commitment: c })
        .unwrap();
    assert!(matches!(
        w.tx(2, addr(2), PolTx::RevealDelta(d)).unwrap_err(),
        PolError::TypeRule { rule: "POL-14", .. }
    ));
}

// -- POL-30..38 ---------------------------------------------------------------------------

#[test]
fn pol_30_attestation_windows_and_validators() {
    let mut w = World::new();
    let d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let id = w.submit_delta(1, &d); // revealed at 2: commits ≤ 4, reveals 5..=6
    let c = attestation_commitment(&id, 100, 200, &[1; 32], &addr(10));
    let commit = PolTx::CommitAttestation {
        delta_id: id,
        commitment: c,
    };
    assert_eq!(
        w.tx(3, addr(2), commit.clone()).unwrap_err(),
        PolError::NotValidator
    );
    assert_eq!(
        w.tx(5, addr(10), commit.clone()).unwrap_err(),
        PolError::OutsideWindow("commit")
    );
    w.tx(4, addr(10), commit.clone()).unwrap();
    assert_eq!(
        w.tx(4, addr(10), commit).unwrap_err(),
        PolError::AlreadyCommitted
    );
    let reveal = PolTx::RevealAttestation {
        delta_id: id,
        loss_micronats: 100,
        head_loss_micronats: 200,
        salt: [1; 32],
    };
    assert_eq!(
        w.tx(4, addr(10), reveal.clone()).unwrap_err(),
        PolError::OutsideWindow("reveal")
    );
    assert_eq!(
        w.tx(7, addr(10), reveal.clone()).unwrap_err(),
        PolError::OutsideWindow("reveal")
    );
    assert_eq!(
        w.tx(5, addr(11), reveal.clone()).unwrap_err(),
        PolError::NoAttestation
    );
    let wrong = PolTx::RevealAttestation {
        delta_id: id,
        loss_micronats: 99,
        head_loss_micronats: 200,
        salt: [1; 32],
    };
    assert_eq!(
        w.tx(5, addr(10), wrong).unwrap_err(),
        PolError::RevealMismatch
    );
    w.tx(5, addr(10), reveal.clone()).unwrap();
    assert_eq!(
        w.tx(6, addr(10), reveal).unwrap_err(),
        PolError::AlreadyRevealed
    );
    let unknown = PolTx::CommitAttestation {
        delta_id: [3; 32],
        commitment: c,
    };
    assert_eq!(
        w.tx(3, addr(10), unknown).unwrap_err(),
        PolError::UnknownDelta([3; 32])
    );
}

#[test]
fn pol_31_commitment_binds_the_validator() {
    // A validator copying another's commitment cannot reveal it as its own.
    let mut w = World::new();
    let d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let id = w.submit_delta(1, &d);
    let c = attestation_commitment(&id, 100, 200, &[1; 32], &addr(10));
    for v in [10u8, 11] {
        w.tx(
            3,
            addr(v),
            PolTx::CommitAttestation {
                delta_id: id,
                commitment: c,
            },
        )
        .unwrap();
    }
    let reveal = PolTx::RevealAttestation {
        delta_id: id,
        loss_micronats: 100,
        head_loss_micronats: 200,
        salt: [1; 32],
    };
    assert_eq!(
        w.tx(5, addr(11), reveal).unwrap_err(),
        PolError::RevealMismatch
    );
}

#[test]
fn pol_35_accepted_delta_becomes_head_with_bumped_version() {
    let mut w = World::new();
    let d = delta_on(&w.layer, w.layer.id(), &[w.data.id()], addr(2));
    let id = w.submit_delta(1, &d);
    // 2% better; validator 13 (10 stake) is far off.
    w.attest(
        id,
        &[
            (addr(10), 980_000, 1_000_000),
            (addr(11), 981_000, 1_000_500),
            (addr(12), 979_000, 999_000),
            (addr(13), 500_000, 1_000_000),
        ],
        3,
    );
    assert!(w.end(5).is_empty());
    let events = w.end(6);
    let dec = decision(&events);
    assert_eq!(
        dec.outcome,
        DeltaOutcome::Accepted {
            new_version: SemVer::new(1, 1, 0)
        }
    );
    assert_eq!(dec.agreed_loss_micronats, Some(980_000));
    assert_eq!(dec.agreed_head_loss_micronats, Some(1_000_000));
    assert_eq!(dec.improvement_ppm, 20_000);
    assert_eq!(dec.revealed_stake, 100);
    assert_eq!(dec.submitter, addr(2));
    assert_eq!(dec.data_blocks, vec![(w.data.id(), addr(9))]);
    // POL-36: the outlier earns nothing.
    assert_eq!(
        dec.honest_attestors,
        vec![(addr(10), 40), (addr(11), 30), (addr(12), 20)]
    );
    let target = w.layer.target_key(PolBlockType::Layer);
    let head = w.state.head(&target).unwrap();
    assert_eq!(head.block_id, id);
    assert_eq!(head.version, SemVer::new(1, 1, 0));
    assert_eq!(head.loss_micronats, Some(980_000));
    assert_eq!(head.accepted_deltas, 1);
    assert_eq!(head.cumulative_improvement_ppm, 20_000);
    assert!(w.state.block(&id).is_some());
    assert!(w.state.pending_delta(&id).is_none());
    let record = w.state.record(&target).unwrap();
    assert_eq!(record.block_hash, id);
    assert_eq!(record.quality_score_ppm, 20_000);
    assert_eq!(record.last_updated, 6);

    // The next delta trains on the new head.
    let d2 = delta_on(&d, id, &[], addr(3));
    assert_eq!(d2.version, SemVer::new(1, 2, 0));
    let id2 = w.submit_delta(7, &d2);
    assert!(w.state.pending_delta(&id2).is_some());
}

#[test]
fn pol_35_improvement_below_one_percent_is_rejected() {
    let mut w = World::new();
    let d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let id = w.submit_delta(1, &d);
    // 0.9999% better.
    w.attest(
        id,
        &[
            (addr(10), 990_001, 1_000_000),
            (addr(11), 990_001, 1_000_000),
        ],
        3,
    );
    let events = w.end(6);
    let dec = decision(&events);
    assert_eq!(dec.improvement_ppm, 9_999);
    assert_eq!(
        dec.outcome,
        DeltaOutcome::Rejected(RejectReason::InsufficientImprovement)
    );
    assert_eq!(dec.honest_attestors.len(), 2);
    assert!(w.state.block(&id).is_none());
    let head = w.state.head(&w.layer.target_key(PolBlockType::Layer));
    assert_eq!(head.unwrap().block_id, w.layer.id());
}

#[test]
fn pol_34_without_two_thirds_of_stake_it_is_rejected() {
    let mut w = World::new();
    let d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let id = w.submit_delta(1, &d);
    // 40 + 20 = 60 < 2/3 of 100.
    w.attest(
        id,
        &[
            (addr(10), 900_000, 1_000_000),
            (addr(12), 900_000, 1_000_000),
        ],
        3,
    );
    let dec = decision(&w.end(6)).clone();
    assert_eq!(dec.outcome, DeltaOutcome::Rejected(RejectReason::NoQuorum));
    assert!(dec.honest_attestors.is_empty());
    assert_eq!(dec.agreed_loss_micronats, None);

    // Exactly 2/3 is enough: stakes 2 and 1 of 3, the stake-2 one reveals.
    let mut w = World::new();
    w.stakes = [(addr(10), 2), (addr(11), 1)].into_iter().collect();
    let d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let id = w.submit_delta(1, &d);
    w.attest(id, &[(addr(10), 900_000, 1_000_000)], 3);
    let events = w.end(6);
    assert!(matches!(
        decision(&events).outcome,
        DeltaOutcome::Accepted { .. }
    ));
}

#[test]
fn pol_34_stake_is_read_when_the_window_closes() {
    // A revealer that left the validator set no longer counts.
    let mut w = World::new();
    let d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let id = w.submit_delta(1, &d);
    w.attest(
        id,
        &[
            (addr(10), 900_000, 1_000_000),
            (addr(11), 900_000, 1_000_000),
        ],
        3,
    );
    w.stakes.remove(&addr(11));
    let events = w.end(6);
    let dec = decision(&events);
    assert_eq!(dec.revealed_stake, 40);
    assert_eq!(dec.outcome, DeltaOutcome::Rejected(RejectReason::NoQuorum));
}

#[test]
fn pol_33_second_delta_on_same_base_is_stale_and_first_reveal_wins() {
    let mut w = World::new();
    let a = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let b = delta_on(&w.layer, w.layer.id(), &[], addr(3));
    let ida = w.submit_delta(1, &a); // revealed 2, decided 6
    let idb = w.submit_delta(2, &b); // revealed 3, decided 7
    let all = [
        (addr(10), 900_000, 1_000_000),
        (addr(11), 900_000, 1_000_000),
        (addr(12), 900_000, 1_000_000),
    ];
    w.attest(ida, &all, 3);
    w.attest(idb, &all, 4);
    assert!(matches!(
        decision(&w.end(6)).outcome,
        DeltaOutcome::Accepted { .. }
    ));
    let events = w.end(7);
    let dec = decision(&events);
    assert_eq!(dec.delta_id, idb);
    assert_eq!(dec.outcome, DeltaOutcome::Rejected(RejectReason::Stale));
    // Honest attestors of a stale delta still did their work.
    assert_eq!(dec.honest_attestors.len(), 3);
    // A reveal against a base that is no longer the head fails at once.
    let c = delta_on(&w.layer, w.layer.id(), &[], addr(4));
    let cc = delta_commitment(&c.id(), &addr(4));
    w.tx(8, addr(4), PolTx::CommitDelta { commitment: cc })
        .unwrap();
    assert_eq!(
        w.tx(9, addr(4), PolTx::RevealDelta(c)).unwrap_err(),
        PolError::StaleBase
    );
}

#[test]
fn pol_33_a_delta_is_stale_once_another_target_of_its_model_changes() {
    let mut w = World::new();
    let a = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let b = delta_on(&w.router, w.router.id(), &[], addr(3));
    let ida = w.submit_delta(1, &a); // revealed 2, decided 6
    let idb = w.submit_delta(2, &b); // revealed 3, decided 7
    assert_eq!(
        w.state
            .pending_delta(&idb)
            .unwrap()
            .model_accepted_at_reveal,
        0
    );
    let all = [
        (addr(10), 900_000, 1_000_000),
        (addr(11), 900_000, 1_000_000),
        (addr(12), 900_000, 1_000_000),
    ];
    w.attest(ida, &all, 3);
    w.attest(idb, &all, 4);
    assert!(matches!(
        decision(&w.end(6)).outcome,
        DeltaOutcome::Accepted { .. }
    ));
    assert_eq!(w.state.model_accepted_count(&w.meta.id()), 1);
    // The router's head is still b's base, but the layer changed under it.
    let dec = w.end(7);
    let dec = decision(&dec);
    assert_eq!(dec.delta_id, idb);
    assert_eq!(dec.outcome, DeltaOutcome::Rejected(RejectReason::Stale));
    // Revealed after the change, the same kind of delta is judged on merit.
    let c = delta_on(&w.router, w.router.id(), &[], addr(4));
    let idc = w.submit_delta(8, &c); // revealed 9, decided 13
    assert_eq!(
        w.state
            .pending_delta(&idc)
            .unwrap()
            .model_accepted_at_reveal,
        1
    );
    w.attest(idc, &all, 10);
    assert!(matches!(
        decision(&w.end(13)).outcome,
        DeltaOutcome::Accepted { .. }
    ));
}

#[test]
fn pol_22_pending_deltas_are_bounded() {
    let mut w = World::new();
    for i in 0..8u32 {
        let mut d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
        d.payload_size_bytes = u64::from(i);
        w.submit_delta(1, &d);
    }
    let mut d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    d.payload_size_bytes = 99;
    let c = delta_commitment(&d.id(), &addr(2));
    w.tx(1, addr(2), PolTx::CommitDelta { commitment: c })
        .unwrap();
    assert_eq!(
        w.tx(2, addr(2), PolTx::RevealDelta(d)).unwrap_err(),
        PolError::TooManyPending(8)
    );
}

#[test]
fn pol_31_attestations_per_delta_are_bounded() {
    let mut w = World::new();
    w.params.max_attestations_per_delta = 2;
    let d = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let id = w.submit_delta(1, &d);
    for v in [10u8, 11] {
        w.tx(
            3,
            addr(v),
            PolTx::CommitAttestation {
                delta_id: id,
                commitment: [v; 32],
            },
        )
        .unwrap();
    }
    assert_eq!(
        w.tx(
            3,
            addr(12),
            PolTx::CommitAttestation {
                delta_id: id,
                commitment: [0; 32]
            }
        )
        .unwrap_err(),
        PolError::TooManyAttestations(2)
    );
}

#[test]
fn pol_36_tolerance_is_relative_to_the_median() {
    assert!(within_tolerance(1_010_000, 1_000_000, 10_000));
    assert!(within_tolerance(990_000, 1_000_000, 10_000));
    assert!(!within_tolerance(1_010_001, 1_000_000, 10_000));
    assert!(!within_tolerance(989_999, 1_000_000, 10_000));
    assert!(within_tolerance(0, 0, 0));
    assert!(!within_tolerance(1, 0, PPM));
}

#[test]
fn pol_35_improvement_ppm_is_floored_and_zero_when_worse() {
    assert_eq!(improvement_ppm(1_000_000, 990_000), 10_000);
    assert_eq!(improvement_ppm(3, 2), 333_333);
    assert_eq!(improvement_ppm(100, 100), 0);
    assert_eq!(improvement_ppm(100, 200), 0);
    assert_eq!(improvement_ppm(0, 0), 0);
    assert_eq!(improvement_ppm(u64::MAX, 0), PPM);
}

#[test]
fn pol_34_weighted_median_examples() {
    assert_eq!(stake_weighted_median(&[]), None);
    assert_eq!(stake_weighted_median(&[(5, 0)]), None);
    assert_eq!(stake_weighted_median(&[(5, 1)]), Some(5));
    // Exactly half the weight at or below 1: the lower median.
    assert_eq!(stake_weighted_median(&[(1, 1), (2, 1)]), Some(1));
    assert_eq!(stake_weighted_median(&[(2, 1), (1, 1)]), Some(1));
    assert_eq!(stake_weighted_median(&[(1, 1), (2, 2)]), Some(2));
    assert_eq!(
        stake_weighted_median(&[(9, 10), (1, 3), (2, 3), (3, 3)]),
        Some(9)
    );
    assert_eq!(
        stake_weighted_median(&[(9, 10), (1, 3), (2, 3), (3, 4)]),
        Some(3)
    );
    assert_eq!(
        stake_weighted_median(&[(9, 11), (1, 3), (2, 3), (3, 4)]),
        Some(9)
    );
    assert_eq!(
        stake_weighted_median(&[(7, u128::MAX), (8, u128::MAX)]),
        Some(7)
    );
}

#[test]
fn pol_k1_target_key_round_trips() {
    let t = TargetKey {
        model_id: [7; 32],
        kind: PolBlockType::Expert,
        layer: Some(3),
        expert: Some(u32::MAX),
    };
    let key = StateKey::new(ns::POL_HEAD, t.key_bytes());
    assert_eq!(target_of_key(&key), Some(t));
    let mut bad = t.key_bytes();
    bad[33] = 2;
    assert_eq!(target_of_key(&StateKey::new(ns::POL_HEAD, bad)), None);
    let w = World::new();
    assert_eq!(
        w.state
            .entry_bytes(&StateKey::new(ns::POL_BLOCK, vec![1, 2])),
        None
    );
    assert_eq!(
        w.state.entry_bytes(&StateKey::new(ns::ACCOUNT, [0u8; 32])),
        None
    );
}

#[test]
fn pol_k1_entries_are_sorted_and_cover_genesis() {
    let w = World::new();
    let entries = w.state.entries();
    // 5 blocks, 3 heads, 3 registry records.
    assert_eq!(entries.len(), 11);
    assert!(entries.windows(2).all(|p| p[0].0 < p[1].0));
    for (key, bytes) in &entries {
        assert_eq!(w.state.entry_bytes(key).as_ref(), Some(bytes));
    }
}

#[test]
fn pol_params_json_round_trip() {
    let p = PolParams::default();
    let json = serde_json::to_string(&p).unwrap();
    assert!(json.contains("\"registration_bond\":\"1000000000000000000000\""));
    assert_eq!(serde_json::from_str::<PolParams>(&json).unwrap(), p);
    let w = World::new();
    let json = serde_json::to_string(&w.layer).unwrap();
    assert_eq!(serde_json::from_str::<PolBlock>(&json).unwrap(), w.layer);
}

// -- Properties ------------------------------------------------------------------------

fn arb_block() -> impl Strategy<Value = PolBlock> {
    (
        any::<u8>(),
        proptest::option::of(0u32..3),
        proptest::option::of(0u32..3),
        any::<u64>(),
        proptest::collection::vec(any::<[u8; 32]>(), 0..4),
    )
        .prop_map(|(kind, layer, expert, size, parents)| {
            let kinds = [
                PolBlockType::Meta,
                PolBlockType::Layer,
                PolBlockType::Expert,
                PolBlockType::Router,
                PolBlockType::Data,
                PolBlockType::Delta,
            ];
            let mut b = block(kinds[kind as usize % 6], [kind; 32], &parents, b"p");
            b.layer = layer;
            b.expert = expert;
            b.payload_size_bytes = size;
            b.base_version = layer.map(|l| SemVer::new(l, 0, 0));
            b
        })
}

proptest! {
    #[test]
    fn prop_enc_round_trip(b in arb_block(), loss in any::<u64>()) {
        prop_assert_eq!(PolBlock::decode(&b.encode()).unwrap(), b.clone());
        let tx = PolTx::RevealAttestation {
            delta_id: b.id(), loss_micronats: loss, head_loss_micronats: !loss, salt: [3; 32],
        };
        prop_assert_eq!(PolTx::decode(&tx.encode()).unwrap(), tx);
        let tx = PolTx::RevealDelta(b.clone());
        prop_assert_eq!(PolTx::decode(&tx.encode()).unwrap(), tx);
        let pending = PendingDelta {
            block: b.clone(), delta_id: b.id(), target: b.target_key(PolBlockType::Layer),
            revealed_height: loss, commit_end_height: 1, reveal_end_height: 2,
            model_accepted_at_reveal: loss / 3,
            attestations: vec![Attestation { validator: addr(1), commitment: [1; 32],
                revealed: Some(RevealedLoss { loss_micronats: loss, head_loss_micronats: 3 }) }],
        };
        prop_assert_eq!(PendingDelta::decode(&pending.encode()).unwrap(), pending);
    }

    /// POL-34: the median is a revealed value with at least half the weight
    /// on each side, does not depend on order, and a weight majority decides it.
    #[test]
    fn prop_weighted_median(values in proptest::collection::vec((0u64..50, 0u128..1_000), 0..20)) {
        let total: u128 = values.iter().map(|v| v.1).sum();
        let median = stake_weighted_median(&values);
        prop_assert_eq!(median.is_none(), total == 0);
        if let Some(m) = median {
            prop_assert!(values.iter().any(|v| v.0 == m && v.1 > 0));
            let below: u128 = values.iter().filter(|v| v.0 <= m).map(|v| v.1).sum();
            let above: u128 = values.iter().filter(|v| v.0 >= m).map(|v| v.1).sum();
            prop_assert!(below * 2 >= total);
            prop_assert!(above * 2 >= total);
            // Lower median: anything strictly below has less than half.
            let strictly_below: u128 = values.iter().filter(|v| v.0 < m).map(|v| v.1).sum();
            prop_assert!(strictly_below * 2 < total);
            let mut reversed = values.clone();
            reversed.reverse();
            prop_assert_eq!(stake_weighted_median(&reversed), Some(m));
            for (v, w) in &values {
                if *w * 2 > total {
                    prop_assert_eq!(m, *v);
                }
            }
        }
    }

    /// INV-POL-ACYCLIC, INV-POL-PARENTS: under random operations every stored
    /// block's parents exist and the DAG has a topological order; heads and
    /// pending deltas point at existing blocks; failed ops change nothing.
    #[test]
    fn prop_dag_stays_acyclic(ops in proptest::collection::vec((0u8..8, any::<u8>(), any::<u8>(), 0u64..2_000_000), 1..120)) {
        let mut w = World::new();
        w.params.attest_commit_window_blocks = 3;
        w.params.attest_reveal_window_blocks = 3;
        let mut height: Height = 1;
        let mut known: Vec<Hash32> = w.state.blocks().map(|(id, _)| *id).collect();
        let mut committed: Vec<PolBlock> = Vec::new();
        for (op, a, b, loss) in ops {
            let pick = |n: u8| known[n as usize % known.len()];
            let sender = addr(1 + a % 3);
            let _ = match op {
                0 => {
                    // Register a random block against known or unknown parents.
                    let kinds = [PolBlockType::Meta, PolBlockType::Layer, PolBlockType::Expert,
                        PolBlockType::Router, PolBlockType::Data];
                    let kind = kinds[b as usize % 5];
                    let parent = if a % 7 == 0 { [a; 32] } else { pick(a) };
                    let model = if kind == PolBlockType::Meta { ZERO } else { parent };
                    let parents: Vec<Hash32> = if kind == PolBlockType::Meta && b % 2 == 0 { vec![] } else { vec![parent] };
                    let mut blk = block(kind, model, &parents, &[a, b]);
                    blk.submitter = sender;
                    blk.layer = (kind != PolBlockType::Meta && kind != PolBlockType::Data).then_some(u32::from(b % 4));
                    blk.expert = (kind == PolBlockType::Expert).then_some(u32::from(a % 2));
                    let r = w.tx(height, sender, PolTx::RegisterBlock(blk.clone()));
                    if r.is_ok() { known.push(blk.id()); }
                    r.map(|_| ())
                }
                1 | 2 => {
                    // Commit a delta on a known block (maybe a head).
                    let base_id = pick(b);
                    let base = w.state.block(&base_id).unwrap().clone();
                    let data = if a % 2 == 0 { vec![] } else { vec![pick(a)] };
                    let mut d = delta_on(&base, base_id, &data, sender);
                    d.payload_size_bytes = loss;
                    let c = delta_commitment(&d.id(), &sender);
                    committed.push(d);
                    w.tx(height, sender, PolTx::CommitDelta { commitment: c }).map(|_| ())
                }
                3 => {
                    if committed.is_empty() { continue; }
                    let d = committed[b as usize % committed.len()].clone();
                    w.tx(height, d.submitter, PolTx::RevealDelta(d)).map(|_| ())
                }
                4 | 5 => {
                    // Mostly the oldest pending delta, so some reach quorum.
                    let mut pending: Vec<(Height, Hash32)> =
                        w.state.pending_deltas().map(|p| (p.revealed_height, p.delta_id)).collect();
                    pending.sort();
                    if pending.is_empty() { continue; }
                    let id = if b % 4 == 0 { pending[b as usize % pending.len()].1 } else { pending[0].1 };
                    // Losses and salt are fixed per (delta, validator) so reveals
                    // match commitments; a third of deltas do not improve. Each
                    // op acts for the validators except (maybe) one.
                    let head = 1_000_000;
                    let mut result = Ok(());
                    for n in [10u8, 11, 12] {
                        if n == 10 + a % 4 { continue; }
                        let v = addr(n);
                        let l = if id[0] % 3 == 0 { 995_000 } else { 900_000 + u64::from(n) * 1_000 };
                        let salt = [n; 32];
                        let c = attestation_commitment(&id, l, head, &salt, &v);
                        let in_commit = height <= w.state.pending_delta(&id).unwrap().commit_end_height;
                        result = if in_commit || op == 4 && b % 8 == 0 {
                            w.tx(height, v, PolTx::CommitAttestation { delta_id: id, commitment: c }).map(|_| ())
                        } else {
                            w.tx(height, v, PolTx::RevealAttestation {
                                delta_id: id, loss_micronats: l, head_loss_micronats: head, salt,
                            }).map(|_| ())
                        };
                    }
                    result
                }
                _ => {
                    for e in w.end(height) {
                        if let PolEvent::DeltaDecided(d) = e
                            && matches!(d.outcome, DeltaOutcome::Accepted { .. })
                        {
                            known.push(d.delta_id);
                        }
                    }
                    height += 1;
                    Ok(())
                }
            };
        }
        check_dag(&w.state);
        // POL-K1: the committed entries determine the whole state.
        let rebuilt = PolState::from_entries(&w.state.entries(), &w.params).unwrap();
        prop_assert_eq!(rebuilt, w.state.clone());
    }
}

/// INV-POL-ACYCLIC and INV-POL-PARENTS checked from scratch (Kahn's algorithm).
fn check_dag(state: &PolState) {
    let blocks: BTreeMap<Hash32, &PolBlock> = state.blocks().map(|(id, b)| (*id, b)).collect();
    for (id, b) in &blocks {
        assert_eq!(*id, b.id());
        for p in &b.depends_on {
            assert!(blocks.contains_key(p), "INV-POL-PARENTS");
        }
    }
    let mut indegree: BTreeMap<Hash32, usize> = blocks
        .iter()
        .map(|(id, b)| (*id, b.depends_on.len()))
        .collect();
    let mut ready: Vec<Hash32> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(id, _)| *id)
        .collect();
    let mut seen = 0;
    while let Some(id) = ready.pop() {
        seen += 1;
        for (child, b) in &blocks {
            if b.depends_on.contains(&id) {
                let d = indegree.get_mut(child).unwrap();
                *d -= 1;
                if *d == 0 {
                    ready.push(*child);
                }
            }
        }
    }
    assert_eq!(seen, blocks.len(), "INV-POL-ACYCLIC");
    for p in state.pending_deltas() {
        for parent in &p.block.depends_on {
            assert!(blocks.contains_key(parent), "INV-POL-PARENTS (pending)");
        }
        assert!(p.attestations.len() <= 8);
    }
    for r in state.records() {
        let head = state.head(&r.target).unwrap();
        assert!(blocks.contains_key(&head.block_id));
        assert_eq!(head.block_id, r.block_hash);
    }
}

#[test]
fn pol_38_events_expiries_first_then_decisions_by_id() {
    let mut w = World::new();
    let a = delta_on(&w.layer, w.layer.id(), &[], addr(2));
    let b = delta_on(&w.expert, w.expert.id(), &[], addr(3));
    for d in [&a, &b] {
        let c = delta_commitment(&d.id(), &d.submitter);
        w.tx(1, d.submitter, PolTx::CommitDelta { commitment: c })
            .unwrap();
    }
    // A commitment that expires at 1 + 5 = 6, the same block the deltas are decided.
    w.tx(
        1,
        addr(4),
        PolTx::CommitDelta {
            commitment: [0xee; 32],
        },
    )
    .unwrap();
    for d in [&a, &b] {
        w.tx(2, d.submitter, PolTx::RevealDelta(d.clone())).unwrap();
    }
    let events = w.end(6);
    assert_eq!(events.len(), 3);
    assert!(matches!(events[0], PolEvent::DeltaCommitExpired { .. }));
    let ids: Vec<Hash32> = events[1..]
        .iter()
        .map(|e| match e {
            PolEvent::DeltaDecided(d) => d.delta_id,
            _ => panic!("decision expected"),
        })
        .collect();
    let mut sorted = vec![a.id(), b.id()];
    sorted.sort();
    assert_eq!(ids, sorted);
}

#[test]
fn pol_k1_from_entries_rejects_malformed_entries() {
    let w = World::new();
    let mut entries = w.state.entries();
    assert_eq!(
        PolState::from_entries(&entries, &w.params).unwrap(),
        w.state
    );
    entries[0].1.push(0);
    assert_eq!(
        PolState::from_entries(&entries, &w.params).unwrap_err(),
        PolError::BadEntry(ns::POL_BLOCK)
    );
    // A block stored under the wrong id.
    let mut entries = w.state.entries();
    entries[0].0.key[0] ^= 1;
    assert!(PolState::from_entries(&entries, &w.params).is_err());
    let foreign = vec![(StateKey::new(ns::ACCOUNT, vec![1]), vec![])];
    assert!(PolState::from_entries(&foreign, &w.params).is_err());
}
