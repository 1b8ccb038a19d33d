//! Chain storage: blocks and changed keys survive a restart; bad data
//! directories are refused with a clear error.
use blyan_runtime::Error;
use blyan_runtime::store::ChainStore;
use blyan_state_machine::params::Params;
use blyan_state_machine::testkit::{address, next_block, testnet, transfer};
use blyan_state_machine::types::BLY;

fn build(dir: &std::path::Path, blocks: u64) -> (blyan_state_machine::genesis::Genesis, [u8; 32]) {
    let net = testnet(
        4,
        2,
        Params {
            epoch_length_blocks: 3,
            ..Params::default()
        },
    );
    let (store, mut ledger) = ChainStore::open(dir, &net.genesis).unwrap();
    for n in 0..blocks {
        let t = transfer(
            "blyan-test",
            &net.accounts[0],
            n,
            address(&net.accounts[1]),
            BLY,
        );
        let (block, next) = next_block(&ledger, &[t]).unwrap();
        let (_, outcome) = ledger.apply_block(&block).unwrap();
        store.commit_block(&block, &outcome, &next).unwrap();
        ledger = next;
    }
    (net.genesis, ledger.state_root())
}

#[test]
fn restart_rebuilds_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let (genesis, root) = build(dir.path(), 7);
    let (store, ledger) = ChainStore::open(dir.path(), &genesis).unwrap();
    assert_eq!(store.height().unwrap(), 7);
    assert_eq!(ledger.height(), 7);
    assert_eq!(ledger.state_root(), root);
    assert_eq!(store.block(7).unwrap().unwrap().header.state_root, root);
    assert!(store.block(8).unwrap().is_none());
}

#[test]
fn another_chain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut genesis, _) = build(dir.path(), 1);
    genesis.chain_id = "another-chain".into();
    assert!(matches!(
        ChainStore::open(dir.path(), &genesis),
        Err(Error::GenesisMismatch)
    ));
}

#[test]
fn an_unknown_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (genesis, _) = build(dir.path(), 1);
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        meta.insert(b"schema_version", 99u32.to_be_bytes()).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    match ChainStore::open(dir.path(), &genesis) {
        Err(Error::UnsupportedSchema {
            found: 99,
            supported: 1,
        }) => {}
        other => panic!("expected UnsupportedSchema, got {:?}", other.err()),
    }
}

#[test]
fn a_corrupt_block_or_state_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (genesis, _) = build(dir.path(), 3);
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let blocks = db
            .keyspace("blocks", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        blocks
            .insert(2u64.to_be_bytes(), b"garbage".to_vec())
            .unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    assert!(
        matches!(ChainStore::open(dir.path(), &genesis), Err(Error::Corrupt(m)) if m.contains("block 2"))
    );
    let dir = tempfile::tempdir().unwrap();
    let (genesis, _) = build(dir.path(), 3);
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let state = db
            .keyspace("state", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        state.insert(b"\x01stray", b"x".to_vec()).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    assert!(
        matches!(ChainStore::open(dir.path(), &genesis), Err(Error::Corrupt(m)) if m.contains("stored state"))
    );
}
