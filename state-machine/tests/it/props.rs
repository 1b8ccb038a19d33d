//! Property tests: INV-SUPPLY, INV-NONCE, INV-REPLAY, ENC-4.
use blyan_state_machine::block::Block;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::params::Params;
use blyan_state_machine::testkit::{address, testnet, transfer, tx};
use blyan_state_machine::tx::{SignedTx, TxKind};
use blyan_state_machine::types::BLY;
use proptest::prelude::*;

const CHAIN: &str = "blyan-test";

#[derive(Debug, Clone)]
enum Op {
    Transfer {
        from: usize,
        to: usize,
        amount: u128,
        nonce_skew: i8,
    },
    Bond {
        from: usize,
        amount: u128,
    },
    Unbond {
        from: usize,
        amount: u128,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..4usize, 0..6usize, 0..3_000_000u128, prop_oneof![8 => Just(0i8), 1 => Just(1i8), 1 => Just(-1i8)])
            .prop_map(|(from, to, amount, nonce_skew)| Op::Transfer { from, to, amount: amount * BLY, nonce_skew }),
        1 => (0..4usize, 0..2_000_000u128).prop_map(|(from, amount)| Op::Bond { from, amount: amount * BLY }),
        1 => (0..4usize, 0..3_000_000u128).prop_map(|(from, amount)| Op::Unbond { from, amount: amount * BLY }),
    ]
}

fn run(ops_per_block: &[Vec<Op>]) -> (Vec<Block>, Vec<Ledger>) {
    let params = Params {
        epoch_length_blocks: 3,
        unbonding_period_blocks: 4,
        max_evidence_age_blocks: 2,
        ..Params::default()
    };
    let net = testnet(4, 4, params);
    let mut l = Ledger::from_genesis(&net.genesis).unwrap();
    let mut blocks = vec![];
    let mut states = vec![l.clone()];
    for ops in ops_per_block {
        let mut nonces: Vec<u64> = net
            .accounts
            .iter()
            .map(|k| l.account(&address(k)).nonce)
            .collect();
        let txs: Vec<SignedTx> = ops
            .iter()
            .map(|op| {
                let from = match op {
                    Op::Transfer { from, .. } | Op::Bond { from, .. } | Op::Unbond { from, .. } => {
                        *from
                    }
                };
                let key = &net.accounts[from];
                let skew = if let Op::Transfer { nonce_skew, .. } = op {
                    *nonce_skew
                } else {
                    0
                };
                let nonce = nonces[from].saturating_add_signed(i64::from(skew));
                if skew == 0 {
                    nonces[from] += 1;
                }
                match op {
                    Op::Transfer { to, amount, .. } => {
                        let to_addr = if *to < 4 {
                            address(&net.accounts[*to])
                        } else {
                            address(&net.validators[*to - 4])
                        };
                        transfer(CHAIN, key, nonce, to_addr, *amount)
                    }
                    Op::Bond { amount, .. } => tx(
                        CHAIN,
                        key,
                        nonce,
                        TxKind::Bond { amount: *amount },
                        100_000_000_000,
                    ),
                    Op::Unbond { amount, .. } => tx(
                        CHAIN,
                        key,
                        nonce,
                        TxKind::Unbond { amount: *amount },
                        100_000_000_000,
                    ),
                }
            })
            .collect();
        let (b, next) = blyan_state_machine::testkit::next_block(&l, &txs).unwrap();
        blocks.push(b);
        l = next;
        states.push(l.clone());
    }
    (blocks, states)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// INV-SUPPLY, INV-NONCE, INV-NONNEG (balances are u128: underflow would panic
    /// with overflow checks on), INV-REPLAY.
    #[test]
    fn inv_supply_nonce_and_replay(ops in prop::collection::vec(prop::collection::vec(op(), 0..8), 1..8)) {
        let (blocks, states) = run(&ops);
        for w in states.windows(2) {
            let (held, expected) = w[1].audit_supply();
            prop_assert_eq!(held, expected);
            for i in 0..4u64 {
                let a = address(&blyan_state_machine::testkit::key(1000 + i));
                prop_assert!(w[1].account(&a).nonce >= w[0].account(&a).nonce);
            }
        }
        // STATE-3: the incrementally maintained root equals a root rebuilt from every entry.
        let last = states.last().unwrap();
        let rebuilt: blyan_state_machine::smt::SparseMerkleTree = last
            .entries()
            .into_iter()
            .map(|(k, v)| (k.path(), blyan_state_machine::crypto::sha3_256(&v)))
            .collect();
        prop_assert_eq!(rebuilt.root(), last.state_root());
        // INV-REPLAY: re-applying the same blocks from genesis gives the same roots.
        let mut l = states[0].clone();
        for (b, s) in blocks.iter().zip(&states[1..]) {
            l = l.apply_block(b).unwrap().0;
            prop_assert_eq!(l.state_root(), s.state_root());
        }
    }

    /// LEDGER-SIG-1/2: applying (and proposing) with a cache of verified
    /// transactions gives exactly what full verification gives, whichever
    /// subset the cache holds; a tampered signature is rejected even when
    /// the untampered transaction is in the cache.
    #[test]
    fn ledger_sig_1_cache_never_changes_the_result(
        ops in prop::collection::vec(prop::collection::vec(op(), 1..8), 1..5),
        mask in any::<u64>(),
    ) {
        let (blocks, states) = run(&ops);
        for (i, (b, s)) in blocks.iter().zip(&states).enumerate() {
            let cached: std::collections::BTreeMap<_, _> = b
                .body
                .txs
                .iter()
                .enumerate()
                .filter(|(j, _)| mask >> ((i * 8 + j) % 64) & 1 == 1)
                .map(|(_, t)| (t.id(), t.verified_sender(CHAIN).unwrap()))
                .collect();
            let verified = |id: &blyan_state_machine::types::Hash32| cached.get(id).copied();
            let (full, full_out) = s.apply_block(b).unwrap();
            let (with, with_out) = s.apply_block_with_verified(b, &verified).unwrap();
            prop_assert_eq!(full.state_root(), with.state_root());
            prop_assert_eq!(&full_out, &with_out);
            // Proposing from the same candidates with the cache builds the same block.
            let proposal = blyan_state_machine::ledger::Proposal {
                proposer: b.header.proposer,
                ticket: b.header.ticket,
                time_ms: b.header.time_ms,
                evidence: b.body.evidence.clone(),
                last_commit_signers: b.body.last_commit_signers.clone(),
                candidates: &b.body.txs,
            };
            let (p_full, _, _) = s.propose_block(proposal.clone()).unwrap();
            let (p_with, _, p_out) = s.propose_block_with_verified(proposal, &verified).unwrap();
            prop_assert_eq!(&p_full, &p_with);
            prop_assert_eq!(&p_out, &full_out);
            if let Some(first) = b.body.txs.first() {
                let mut bad = b.clone();
                bad.body.txs[0].signature[7] ^= 1;
                bad.header.body_hash = bad.body.body_hash();
                let vouch_all = |id: &blyan_state_machine::types::Hash32| {
                    (*id == first.id()).then(|| first.verified_sender(CHAIN).unwrap())
                };
                let is_bad_sig = |r: Result<_, blyan_state_machine::Error>| matches!(
                    r,
                    Err(blyan_state_machine::Error::InvalidTx {
                        index: 0,
                        error: blyan_state_machine::TxError::InvalidSignature,
                    })
                );
                prop_assert!(is_bad_sig(s.apply_block(&bad)));
                prop_assert!(is_bad_sig(s.apply_block_with_verified(&bad, &vouch_all)));
            }
        }
    }

    /// ENC-4: decode(encode(x)) == x and blocks survive the round trip.
    #[test]
    fn enc_4_block_round_trip(ops in prop::collection::vec(prop::collection::vec(op(), 0..5), 1..3)) {
        let (blocks, _) = run(&ops);
        for b in blocks {
            let bytes = b.encode();
            prop_assert_eq!(Block::decode(&bytes).unwrap(), b);
        }
    }

    /// ENC-4: arbitrary bytes never panic the decoder.
    #[test]
    fn enc_4_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = Block::decode(&bytes);
        let _ = SignedTx::decode(&bytes);
    }

    /// ENC-4: a changed byte either fails to decode or decodes to a different value.
    #[test]
    fn enc_4_mutations_change_identity(idx in any::<usize>(), bit in 0u8..8) {
        let (blocks, _) = run(&[vec![Op::Transfer { from: 0, to: 1, amount: 5, nonce_skew: 0 }]]);
        let bytes = blocks[0].encode();
        let mut m = bytes.clone();
        let i = idx % m.len();
        m[i] ^= 1 << bit;
        if let Ok(decoded) = Block::decode(&m) {
            prop_assert_ne!(decoded.encode(), bytes);
        }
    }
}

#[test]
fn enc_4_trailing_and_padding_bytes_are_rejected() {
    let (blocks, _) = run(&[vec![Op::Transfer {
        from: 0,
        to: 1,
        amount: 5,
        nonce_skew: 0,
    }]]);
    let bytes = blocks[0].encode();
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 8]);
    assert!(Block::decode(&longer).is_err());
    assert!(Block::decode(&bytes[..bytes.len() - 1]).is_err());
    assert!(Block::decode(&[]).is_err());
}

proptest! {
    /// TYPES-2: `Address`'s hand-written order is the bytes' lexicographic
    /// order (what every ordered map, and so the state root, relies on).
    #[test]
    fn address_order_is_byte_order(
        a in proptest::array::uniform20(any::<u8>()),
        b in proptest::array::uniform20(any::<u8>()),
        shared in 0usize..=20,
    ) {
        // Often share a prefix, so that every position decides sometimes.
        let mut b = b;
        b[..shared].copy_from_slice(&a[..shared]);
        let (x, y) = (blyan_state_machine::types::Address(a), blyan_state_machine::types::Address(b));
        prop_assert_eq!(x.cmp(&y), a.cmp(&b));
        prop_assert_eq!(x.partial_cmp(&y), Some(a.cmp(&b)));
    }
}
