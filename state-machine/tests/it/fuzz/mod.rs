//! Structure-aware fuzzing of the canonical decoders (issue 18; ENC-4) on
//! stable Rust with proptest: strategies build valid transactions (every
//! `TxKind`), blocks and wire messages (every `WireMessage` variant), the
//! test encodes them and then mutates the bytes ([`mutate`]); every input
//! goes to `Canonical::decode`, the decoder that every byte from a peer or a
//! client goes through (the transport's frames, `POST /tx`, `/mine`).
//!
//! Properties, for every input:
//! - the decoder never panics (a panic fails the case);
//! - an unmutated encoding decodes to the value it encodes;
//! - an accepted mutated input re-encodes to exactly the input bytes (one
//!   encoding per value, ENC-4) and decodes again to the same value, and
//!   what the node does next with a decoded value (ids, hashes, the sender,
//!   the signature check) does not panic either;
//! - an input over `MAX_ENCODED_BYTES` is refused as too large (ENC-5).
//!
//! `BLYAN_FUZZ_CASES` sets the number of cases (default
//! [`support::DEFAULT_CASES`]); the longer run on demand is, for example,
//! `BLYAN_FUZZ_CASES=100000 cargo test -p blyan-state-machine --test it fuzz -- --nocapture`.
//! Each test prints how many inputs it fed its decoder.

mod mutate;
mod strategies;
mod support;

use blyan_state_machine::block::Block;
use blyan_state_machine::encoding::{Canonical, EncodingError, MAX_ENCODED_BYTES};
use blyan_state_machine::node::WireMessage;
use blyan_state_machine::tx::SignedTx;
use mutate::{Mutation, mutation_sets};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use std::fmt::Debug;
use support::{Counts, cases, run};

const CHAIN: &str = "blyan-test";
/// Mutated inputs per generated value.
const MUTANTS: usize = 8;

/// The ENC-4 properties for `value`'s encoding and its mutants.
fn check_canonical<T: Canonical + PartialEq + Debug>(
    value: &T,
    other: &T,
    sets: &[Vec<Mutation>],
    counts: &Counts,
    on_accept: impl Fn(&T),
) -> TestCaseResult {
    let bytes = value.encode();
    let back = T::decode(&bytes);
    prop_assert_eq!(back.as_ref(), Ok(value), "round trip");
    counts.round_trip();
    let other_bytes = other.encode();
    for muts in sets {
        let m = mutate::apply(&bytes, &other_bytes, muts);
        let r = T::decode(&m);
        match &r {
            Ok(v) => {
                prop_assert_eq!(&v.encode(), &m, "an accepted input is canonical (ENC-4)");
                let again = T::decode(&m);
                prop_assert_eq!(again.as_ref(), Ok(v), "decoding is deterministic");
                if m == bytes {
                    prop_assert_eq!(v, value);
                }
                on_accept(v);
            }
            Err(EncodingError::TooLarge { .. }) => prop_assert!(m.len() > MAX_ENCODED_BYTES),
            Err(_) => prop_assert!(m != bytes, "the valid encoding was refused: {:?}", r),
        }
        counts.outcome(&r);
    }
    Ok(())
}

fn after_tx(tx: &SignedTx) {
    let _ = tx.id_and_len();
    let _ = tx.claimed_sender();
    let _ = tx.verified_sender(CHAIN);
}

fn after_block(b: &Block) {
    let _ = b.hash();
    let _ = b.body.body_hash();
    for tx in &b.body.txs {
        let _ = tx.id_and_len();
        let _ = tx.claimed_sender();
    }
}

/// Transactions of every kind (what `POST /tx`, `/mine` and `WireMessage::Tx` carry).
#[test]
fn fuzz_signed_tx() {
    let counts = Counts::default();
    run(
        "SignedTx::decode",
        cases(100),
        (
            strategies::signed_tx(),
            strategies::signed_tx(),
            mutation_sets(MUTANTS),
        ),
        &counts,
        |(tx, other, sets)| check_canonical(&tx, &other, &sets, &counts, after_tx),
    );
}

/// Blocks with evidence, commit signers and transactions.
#[test]
fn fuzz_block() {
    let counts = Counts::default();
    run(
        "Block::decode",
        cases(50),
        (
            strategies::block(6),
            strategies::block(6),
            mutation_sets(MUTANTS),
        ),
        &counts,
        |(b, other, sets)| check_canonical(&b, &other, &sets, &counts, after_block),
    );
}

/// Every wire message variant: proposals with blocks and certificates,
/// votes, transactions, block requests and batches of committed blocks.
#[test]
fn fuzz_wire_message() {
    let counts = Counts::default();
    run(
        "WireMessage::decode",
        cases(100),
        (
            strategies::wire_message(),
            strategies::wire_message(),
            mutation_sets(MUTANTS),
        ),
        &counts,
        |(msg, other, sets)| {
            check_canonical(&msg, &other, &sets, &counts, |m| {
                let _ = m.consensus_height();
                match m {
                    WireMessage::Proposal { block, .. } => after_block(block),
                    WireMessage::Tx(tx) => after_tx(tx),
                    WireMessage::Blocks(bs) => bs.iter().for_each(|c| after_block(&c.block)),
                    WireMessage::Vote(_)
                    | WireMessage::BlockRequest { .. }
                    | WireMessage::Status(_) => {}
                }
            })
        },
    );
}

/// Unstructured bytes, and one type's encoding given to another decoder.
#[test]
fn fuzz_unstructured_and_confused_types() {
    let counts = Counts::default();
    let feed = |bytes: &[u8]| -> TestCaseResult {
        for r in [
            SignedTx::decode(bytes).map(|v| v.encode()),
            Block::decode(bytes).map(|v| v.encode()),
            WireMessage::decode(bytes).map(|v| v.encode()),
        ] {
            if let Ok(re) = &r {
                prop_assert_eq!(re.as_slice(), bytes, "ENC-4");
            }
            counts.outcome(&r);
        }
        Ok(())
    };
    run(
        "SignedTx/Block/WireMessage::decode (unstructured, confused)",
        cases(100),
        (
            prop::collection::vec(any::<u8>(), 0..600),
            strategies::signed_tx(),
            strategies::wire_message(),
            mutate::mutations(),
        ),
        &counts,
        |(raw, tx, msg, muts)| {
            feed(&raw)?;
            feed(&tx.encode())?;
            feed(&msg.encode())?;
            feed(&mutate::apply(&tx.encode(), &msg.encode(), &muts))?;
            Ok(())
        },
    );
}

/// ENC-5: an input over the limit is refused before it is copied.
#[test]
fn oversized_input_is_refused_as_too_large() {
    let big = vec![0u8; MAX_ENCODED_BYTES + 1];
    assert!(matches!(
        WireMessage::decode(&big),
        Err(EncodingError::TooLarge { .. })
    ));
}
