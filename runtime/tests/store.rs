//! Chain storage (NODE-STORE-*): blocks, certificates, changed keys and
//! consensus records survive a restart; bad data directories are refused with
//! a clear error.
use blyan_runtime::Error;
use blyan_runtime::store::{ChainStore, SCHEMA_VERSION};
use blyan_state_machine::block::Block;
use blyan_state_machine::consensus::{CommitCertificate, Record, Signed, Vote, VoteType};
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::node::{CommittedBlock, Store};
use blyan_state_machine::params::Params;
use blyan_state_machine::testkit::{address, next_block, testnet, transfer};
use blyan_state_machine::types::{BLY, Height};

fn certified(block: Block) -> CommittedBlock {
    // The store does not verify certificates (the driver did); any will do.
    CommittedBlock {
        certificate: CommitCertificate {
            height: block.header.height,
            round: 0,
            value: block.hash(),
            signatures: vec![(block.header.proposer, [9u8; 64])],
        },
        block,
    }
}

fn genesis() -> (Genesis, Vec<k256::ecdsa::SigningKey>) {
    let net = testnet(
        4,
        2,
        Params {
            epoch_length_blocks: 3,
            ..Params::default()
        },
    );
    (net.genesis, net.accounts)
}

/// Builds `blocks` blocks of one transfer each through `Store::save_block`;
/// returns the committed blocks and the final state root.
fn build(dir: &std::path::Path, blocks: u64) -> (Genesis, Vec<CommittedBlock>, [u8; 32]) {
    let (genesis, accounts) = genesis();
    let (mut store, mut ledger) = ChainStore::open(dir, &genesis).unwrap();
    let mut saved = Vec::new();
    for n in 0..blocks {
        let t = transfer("blyan-test", &accounts[0], n, address(&accounts[1]), BLY);
        let (block, next) = next_block(&ledger, &[t]).unwrap();
        let committed = certified(block);
        store.save_block(&committed).unwrap();
        assert_eq!(store.ledger().state_root(), next.state_root());
        saved.push(committed);
        ledger = next;
    }
    (genesis, saved, ledger.state_root())
}

fn vote(height: Height, round: u32, tag: u8) -> Record<[u8; 64]> {
    Record::Vote(Signed {
        message: Vote {
            vote_type: VoteType::Prevote,
            height,
            round,
            value: Some([tag; 32]),
            validator: blyan_state_machine::types::Address([tag; 20]),
        },
        signature: [tag; 64],
    })
}

#[test]
fn restart_rebuilds_the_same_state_and_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (genesis, saved, root) = build(dir.path(), 7);
    let (store, ledger) = ChainStore::open(dir.path(), &genesis).unwrap();
    assert_eq!(store.height().unwrap(), 7);
    assert_eq!(store.last_height().unwrap(), 7);
    assert_eq!(ledger.height(), 7);
    assert_eq!(ledger.state_root(), root);
    for (i, b) in saved.iter().enumerate() {
        assert_eq!(store.block(i as u64 + 1).unwrap().as_ref(), Some(b));
    }
    assert!(store.block(8).unwrap().is_none());
}

#[test]
fn records_survive_a_restart_in_order_and_a_saved_block_drops_them() {
    let dir = tempfile::tempdir().unwrap();
    let (genesis, accounts) = genesis();
    let written = [vote(1, 0, 1), vote(1, 1, 2), vote(1, 0, 3)];
    {
        let (mut store, _) = ChainStore::open(dir.path(), &genesis).unwrap();
        for r in &written {
            store.persist_record(r).unwrap();
        }
        store.persist_record(&vote(2, 0, 4)).unwrap();
    }
    let (mut store, ledger) = ChainStore::open(dir.path(), &genesis).unwrap();
    assert_eq!(store.records(1).unwrap(), written.to_vec());
    assert_eq!(store.records(2).unwrap(), vec![vote(2, 0, 4)]);
    assert!(store.records(3).unwrap().is_empty());

    // A record written after a restart comes after the earlier ones.
    store.persist_record(&vote(1, 2, 5)).unwrap();
    assert_eq!(store.records(1).unwrap().last(), Some(&vote(1, 2, 5)));

    // NODE-STORE-2: saving block 1 drops the records of height 1, keeps 2's.
    let t = transfer("blyan-test", &accounts[0], 0, address(&accounts[1]), BLY);
    let (block, _) = next_block(&ledger, &[t]).unwrap();
    store.save_block(&certified(block)).unwrap();
    drop(store);
    let (store, _) = ChainStore::open(dir.path(), &genesis).unwrap();
    assert!(store.records(1).unwrap().is_empty());
    assert_eq!(store.records(2).unwrap(), vec![vote(2, 0, 4)]);
}

#[test]
fn a_block_out_of_order_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (genesis, accounts) = genesis();
    let (mut store, ledger) = ChainStore::open(dir.path(), &genesis).unwrap();
    let t = transfer("blyan-test", &accounts[0], 0, address(&accounts[1]), BLY);
    let (b1, l1) = next_block(&ledger, &[t]).unwrap();
    let (b2, _) = next_block(&l1, &[]).unwrap();
    assert!(matches!(
        store.save_block(&certified(b2)),
        Err(Error::Storage(_))
    ));
    assert_eq!(store.last_height().unwrap(), 0);
    store.save_block(&certified(b1)).unwrap();
    assert_eq!(store.last_height().unwrap(), 1);
}

#[test]
fn another_chain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut genesis, _, _) = build(dir.path(), 1);
    genesis.chain_id = "another-chain".into();
    assert!(matches!(
        ChainStore::open(dir.path(), &genesis),
        Err(Error::GenesisMismatch)
    ));
}

#[test]
fn an_unknown_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (genesis, _, _) = build(dir.path(), 1);
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        meta.insert(b"schema_version", 1u32.to_be_bytes()).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    match ChainStore::open(dir.path(), &genesis) {
        Err(Error::UnsupportedSchema {
            found: 1,
            supported: SCHEMA_VERSION,
        }) => {}
        other => panic!("expected UnsupportedSchema, got {:?}", other.err()),
    }
}

#[test]
fn a_corrupt_block_state_or_record_is_detected() {
    let corrupt = |keyspace: &str, key: &[u8], value: &[u8]| {
        corrupt_with(keyspace, key, value, ChainStore::open)
    };
    // NODE-STORE-6: the fast open checks the last block and the whole state.
    assert!(corrupt("blocks", &3u64.to_be_bytes(), b"garbage").contains("block 3"));
    assert!(corrupt("state", b"\x01stray", b"x").contains("stored state"));
    let mut key = 4u64.to_be_bytes().to_vec();
    key.extend_from_slice(&0u64.to_be_bytes());
    assert!(corrupt("records", &key, b"garbage").contains("record"));
    assert!(corrupt("records", b"short", b"x").contains("record key"));
    // An older block is found when read, and by the replaying open.
    assert!(
        corrupt_with(
            "blocks",
            &2u64.to_be_bytes(),
            b"garbage",
            ChainStore::open_replaying
        )
        .contains("block 2")
    );
    let dir = tempfile::tempdir().unwrap();
    let (genesis, _, _) = build(dir.path(), 3);
    overwrite(dir.path(), "blocks", &2u64.to_be_bytes(), b"garbage");
    let (store, _) = ChainStore::open(dir.path(), &genesis).unwrap();
    match store.block(2) {
        Err(Error::Corrupt(m)) => assert!(m.contains("block 2"), "{m}"),
        other => panic!("a rotten block 2 was read as {other:?}"),
    }
}

/// NODE-STORE-6: a state value changed on disk to another well-formed value
/// (one base unit more) is refused: the root no longer matches the
/// certified header, whether opened fast or by replay.
#[test]
fn a_well_formed_but_changed_state_value_is_refused() {
    use blyan_state_machine::encoding::Canonical;
    let dir = tempfile::tempdir().unwrap();
    let (genesis, accounts) = genesis();
    let (_, _, _) = build(dir.path(), 3);
    let (store, ledger) = ChainStore::open(dir.path(), &genesis).unwrap();
    drop(store);
    let who = address(&accounts[1]);
    let mut a = ledger.account(&who);
    a.balance += 1;
    let mut key = vec![0x01];
    key.extend_from_slice(&who.0);
    overwrite(dir.path(), "state", &key, &a.encode());
    match ChainStore::open(dir.path(), &genesis) {
        Err(Error::Corrupt(m)) => assert!(m.contains("certified by block 3"), "{m}"),
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
    match ChainStore::open_replaying(dir.path(), &genesis) {
        Err(Error::Corrupt(m)) => assert!(m.contains("stored state"), "{m}"),
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
}

/// `ChainStore::open` or `ChainStore::open_replaying`.
type Opener = fn(
    &std::path::Path,
    &Genesis,
) -> Result<(ChainStore, blyan_state_machine::ledger::Ledger), Error>;

/// Writes `key → value` into `keyspace` of the store at `dir`, behind its back.
fn overwrite(dir: &std::path::Path, keyspace: &str, key: &[u8], value: &[u8]) {
    let db = fjall::Database::builder(dir).open().unwrap();
    let ks = db
        .keyspace(keyspace, fjall::KeyspaceCreateOptions::default)
        .unwrap();
    ks.insert(key, value.to_vec()).unwrap();
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

/// The message of the `Corrupt` error that opening (with `open`) a 3-block
/// store with `key → value` written into `keyspace` gives, or that reading the
/// next height's records then gives.
fn corrupt_with(keyspace: &str, key: &[u8], value: &[u8], open: Opener) -> String {
    {
        let dir = tempfile::tempdir().unwrap();
        let (genesis, _, _) = build(dir.path(), 3);
        {
            let db = fjall::Database::builder(dir.path()).open().unwrap();
            let ks = db
                .keyspace(keyspace, fjall::KeyspaceCreateOptions::default)
                .unwrap();
            ks.insert(key, value.to_vec()).unwrap();
            db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        match open(dir.path(), &genesis) {
            Err(Error::Corrupt(m)) => m,
            Ok((store, _)) => match store.records(4) {
                Err(Error::Corrupt(m)) => m,
                other => panic!("corruption of {keyspace} went unnoticed: {other:?}"),
            },
            Err(e) => panic!("expected Corrupt, got {e}"),
        }
    }
}

/// Schema 4 indexes blocks by hash (`GET /block/{hash}`). A schema-3
/// directory (no index) is upgraded in place on open; a schema-4 directory
/// whose index lost an entry is refused as corrupt.
#[test]
fn a_schema_3_directory_is_indexed_on_open_and_a_missing_entry_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (genesis, saved, root) = build(dir.path(), 3);
    let downgrade = |remove: &[&CommittedBlock], schema: Option<u32>| {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let ks = |name| {
            db.keyspace(name, fjall::KeyspaceCreateOptions::default)
                .unwrap()
        };
        let (meta, hashes) = (ks("meta"), ks("block_hashes"));
        for b in remove {
            hashes.remove(b.block.hash()).unwrap();
        }
        if let Some(v) = schema {
            meta.insert(b"schema_version", v.to_be_bytes()).unwrap();
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    };
    let all: Vec<&CommittedBlock> = saved.iter().collect();
    downgrade(&all, Some(3));
    {
        let (store, ledger) = ChainStore::open(dir.path(), &genesis).unwrap();
        assert_eq!(ledger.state_root(), root);
        let reader = store.reader();
        for (i, b) in saved.iter().enumerate() {
            assert_eq!(
                reader.height_of(&b.block.hash()).unwrap(),
                Some(i as u64 + 1)
            );
        }
        assert_eq!(reader.height_of(&[7u8; 32]).unwrap(), None);
    }
    // Now schema 4: an index entry gone is corruption, not a silent miss
    // (the replaying open checks every block's; the fast one the last's).
    downgrade(&all[1..2], None);
    match ChainStore::open_replaying(dir.path(), &genesis) {
        Err(Error::Corrupt(m)) => assert!(m.contains("block 2"), "{m}"),
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
    downgrade(&all[2..3], None);
    match ChainStore::open(dir.path(), &genesis) {
        Err(Error::Corrupt(m)) => assert!(m.contains("block 3"), "{m}"),
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
}

/// NODE-STORE-6 on real certified blocks (the long-chain generator): the
/// fast open and the replaying open give the same ledger.
#[test]
fn the_fast_open_and_the_replaying_open_agree() {
    use blyan_state_machine::testkit::long_chain;
    let dir = tempfile::tempdir().unwrap();
    let net = testnet(
        4,
        3,
        Params {
            epoch_length_blocks: 5,
            ..Params::default()
        },
    );
    let (mut store, _) = ChainStore::open(dir.path(), &net.genesis).unwrap();
    let last = long_chain(&net, 40, 2, |c, outcome, after| {
        store.commit_block(c, outcome, after).unwrap();
    })
    .unwrap();
    drop(store);
    let (_, fast) = ChainStore::open(dir.path(), &net.genesis).unwrap();
    let (_, replayed) = ChainStore::open_replaying(dir.path(), &net.genesis).unwrap();
    assert_eq!(fast.state_root(), last.state_root());
    assert_eq!(replayed.state_root(), last.state_root());
    assert_eq!(fast.entries(), replayed.entries());
    assert_eq!(fast.last_block_hash(), replayed.last_block_hash());
    assert_eq!(fast.height(), 40);
}
