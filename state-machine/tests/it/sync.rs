//! SYNC-*: state sync from a snapshot (spec/node.md). The restored state is
//! the replayed one, the resumed node carries on as the replaying node does,
//! and every forged part (chunk, manifest, sets, trust anchor) is refused
//! without losing what was accepted.

use blyan_state_machine::Error;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::node::snapshot::{Chunk, Manifest, Restorer, take_with_chunk_bits};
use blyan_state_machine::node::{CommittedBlock, ConsensusSets, Node, NodeConfig};
use blyan_state_machine::params::Params;
use blyan_state_machine::smt::Subtree;
use blyan_state_machine::testkit::{TestNet, long_chain, testnet};

struct Chain {
    net: TestNet,
    /// (block, state after it, sets after it), height 1 first.
    blocks: Vec<(CommittedBlock, Ledger, ConsensusSets)>,
}

/// `n` blocks of 3 transfers on 4 validators and `accounts` accounts, with
/// validator-set changes at epoch boundaries (every 5 blocks).
fn chain(n: u64, accounts: usize) -> Chain {
    let net = testnet(
        4,
        accounts,
        Params {
            epoch_length_blocks: 5,
            ..Params::default()
        },
    );
    let genesis = Ledger::from_genesis(&net.genesis).unwrap();
    let mut sets = ConsensusSets::genesis(&genesis).unwrap();
    let mut blocks = Vec::new();
    long_chain(&net, n, 3, |c, outcome, after| {
        sets = sets.advance(after, outcome).unwrap();
        blocks.push((c.clone(), after.clone(), sets.clone()));
    })
    .unwrap();
    Chain { net, blocks }
}

fn restore(m: &Manifest, chunks: &[Chunk], chain: &Chain) -> Result<Restorer, Error> {
    let mut r = Restorer::new(m.clone(), &m.block_hash())?;
    // Any order: last chunk first.
    for c in chunks.iter().rev() {
        r.add(c.clone())?;
    }
    let _ = chain;
    Ok(r)
}

/// SYNC-1..6: the state restored from a snapshot (chunks through their
/// canonical encoding, in reverse order) has the replayed state's root and
/// entries, and a node resumed on it applies the following blocks to the
/// same roots as the chain.
#[test]
fn sync_1_a_restored_snapshot_is_the_replayed_state_and_the_node_carries_on() {
    let c = chain(40, 300);
    let at = 30usize; // snapshot after block 30
    let (last, ledger, sets) = &c.blocks[at - 1];
    let (manifest, chunks) = take_with_chunk_bits(ledger, last, sets, Some(4));
    assert_eq!(manifest.chunks.len(), 16);
    assert_eq!(manifest.entries() as usize, ledger.entries().len());
    // Over the wire.
    let manifest = Manifest::decode(&manifest.encode()).unwrap();
    let chunks: Vec<Chunk> = chunks
        .iter()
        .map(|ch| Chunk::decode(&ch.encode()).unwrap())
        .collect();
    let restorer = restore(&manifest, &chunks, &c).unwrap();
    assert!(restorer.missing().is_empty());
    let (restored, block, restored_sets) = restorer.finish(&c.net.genesis).unwrap();
    assert_eq!(restored.state_root(), ledger.state_root());
    assert_eq!(restored.state_root(), last.block.header.state_root);
    assert_eq!(restored.entries(), ledger.entries());
    assert_eq!(&restored_sets, sets);
    assert_eq!(block.block.hash(), last.block.hash());

    // A follower resumed on the snapshot applies blocks 31..=40 as the chain did.
    let mut node = Node::resume(
        NodeConfig::default(),
        blyan_state_machine::testkit::key(9_999),
        &c.net.genesis,
        restored,
        block,
        restored_sets,
    )
    .unwrap();
    let _ = node.start(0, &[], Vec::new());
    let rest: Vec<CommittedBlock> = c.blocks[at..].iter().map(|(b, _, _)| b.clone()).collect();
    let _ = node.handle(
        0,
        blyan_state_machine::node::NodeInput::Message {
            from: blyan_state_machine::testkit::address(&c.net.validators[0]),
            message: blyan_state_machine::node::WireMessage::Blocks(rest),
        },
    );
    assert_eq!(node.ledger().height(), 40);
    assert_eq!(
        node.ledger().state_root(),
        c.blocks[39].1.state_root(),
        "the resumed node's state after block 40 is the chain's"
    );
}

/// SYNC-5: a forged chunk is refused, naming it, and changes nothing: the
/// genuine chunk is still accepted afterwards, and `finish` works.
#[test]
fn sync_5_a_forged_chunk_is_refused_and_loses_nothing() {
    let c = chain(12, 300);
    let (last, ledger, sets) = c.blocks.last().unwrap();
    let (manifest, chunks) = take_with_chunk_bits(ledger, last, sets, Some(4));
    let mut r = Restorer::new(manifest.clone(), &manifest.block_hash()).unwrap();
    let victim = chunks
        .iter()
        .position(|ch| ch.entries.len() >= 2)
        .expect("a chunk with two entries");
    let refused = |r: &mut Restorer, ch: Chunk, why: &str| {
        let index = ch.index;
        let e = r.add(ch).expect_err(why);
        let msg = e.to_string();
        assert!(matches!(e, Error::BadSnapshot(_)), "{msg}");
        assert!(msg.contains(&format!("chunk {index}")), "{msg}");
        assert!(msg.contains(why), "{msg}");
    };
    // A changed value (an account's balance byte).
    let mut forged = chunks[victim].clone();
    let last_byte = forged.entries[0].value.len() - 1;
    forged.entries[0].value[last_byte] ^= 1;
    refused(&mut r, forged, "do not hash to the manifest's subtree");
    // An entry dropped.
    let mut short = chunks[victim].clone();
    short.entries.pop();
    refused(&mut r, short, "wrong number of entries");
    // Two entries swapped.
    let mut swapped = chunks[victim].clone();
    swapped.entries.swap(0, 1);
    refused(&mut r, swapped, "ascending path order");
    // Another chunk's entries under this index.
    let other = chunks.iter().position(|ch| {
        ch.index != chunks[victim].index && ch.entries.len() == chunks[victim].entries.len()
    });
    if let Some(o) = other {
        let mut moved = chunks[o].clone();
        moved.index = chunks[victim].index;
        refused(&mut r, moved, "belongs to another chunk");
    }
    // Wrong height, unknown index.
    let mut stale = chunks[victim].clone();
    stale.height -= 1;
    refused(&mut r, stale, "of another height");
    let mut beyond = chunks[victim].clone();
    beyond.index = manifest.chunks.len() as u32;
    refused(&mut r, beyond, "no such chunk");
    assert_eq!(r.missing().len(), manifest.chunks.len(), "nothing kept");
    // Not finished while chunks are missing.
    for ch in &chunks[1..] {
        r.add(ch.clone()).unwrap();
    }
    assert_eq!(r.missing(), vec![0]);
    r.add(chunks[0].clone()).unwrap();
    let (restored, _, _) = r.finish(&c.net.genesis).unwrap();
    assert_eq!(restored.state_root(), ledger.state_root());
}

/// SYNC-4/6: a manifest is refused unless it is of the trusted block and its
/// subtrees hash to that block's root; forged consensus sets are refused at
/// the end; undecodable bytes are an encoding error.
#[test]
fn sync_4_forged_manifests_and_sets_are_refused() {
    let c = chain(12, 50);
    let (last, ledger, sets) = c.blocks.last().unwrap();
    let (manifest, chunks) = take_with_chunk_bits(ledger, last, sets, Some(4));
    let hash = manifest.block_hash();
    let err = |m: Manifest, trusted: [u8; 32]| Restorer::new(m, &trusted).unwrap_err().to_string();

    assert!(err(manifest.clone(), [7; 32]).contains("is not the trusted block"));
    let mut subtree = manifest.clone();
    let i = subtree
        .chunks
        .iter()
        .position(|s| !matches!(s, Subtree::Empty))
        .unwrap();
    subtree.chunks[i] = Subtree::Internal([9; 32]);
    assert!(err(subtree, hash).contains("not the block's state root"));
    let mut counts = manifest.clone();
    counts.chunk_entries.pop();
    assert!(err(counts, hash).contains("counts"));
    let mut format = manifest.clone();
    format.format = 2;
    assert!(err(format, hash).contains("format 2"));
    let mut cert = manifest.clone();
    cert.certificate.value = [1; 32];
    assert!(err(cert, hash).contains("certificate"));

    // Sets with a changed power: caught at the end.
    let mut forged_sets = sets.clone();
    let members: Vec<_> = forged_sets
        .set
        .validators()
        .iter()
        .map(|v| {
            (
                v.address,
                v.public_key,
                v.voting_power + 1,
                v.proposer_priority,
            )
        })
        .collect();
    forged_sets.set =
        blyan_state_machine::consensus::ValidatorSet::with_priorities(members).unwrap();
    let mut m = manifest.clone();
    m.consensus_sets = forged_sets.encode();
    let r = restore(&m, &chunks, &c).unwrap();
    let e = r.finish(&c.net.genesis).unwrap_err().to_string();
    assert!(e.contains("consensus sets"), "{e}");

    assert!(Chunk::decode(&[1, 2, 3]).is_err());
    assert!(Manifest::decode(&[0; 7]).is_err());
}
