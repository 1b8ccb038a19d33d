//! Deterministic keys, genesis documents and block building for tests,
//! benchmarks, golden vectors and simulations. Not used by the protocol itself.

use crate::block::{Block, Misbehaviour};
use crate::error::Error;
use crate::genesis::{Genesis, GenesisBalance, GenesisValidator};
use crate::ledger::{Ledger, Proposal};
use crate::params::Params;
use crate::tx::{SignedTx, TxBody, TxKind, public_key_of};
use crate::types::{Address, Amount, BLY, Height};
use k256::ecdsa::SigningKey;

/// A deterministic secp256k1 key: scalar = SHA3-256("blyan-testkit" ‖ index) (valid w.h.p.; retried otherwise).
pub fn key(index: u64) -> SigningKey {
    let mut ctr: u8 = 0;
    loop {
        let seed = crate::crypto::sha3_256_parts(&[b"blyan-testkit", &index.to_be_bytes(), &[ctr]]);
        if let Ok(k) = SigningKey::from_bytes(&seed.into()) {
            return k;
        }
        ctr = ctr
            .checked_add(1)
            .expect("256 consecutive invalid scalars cannot happen");
    }
}

pub fn address(key: &SigningKey) -> Address {
    Address::from_public_key(key.verifying_key())
}

/// A test network: validator keys are `key(0..validators)` (stake 10,000 BLY,
/// balance 1,000 BLY), funded accounts `key(1000..)` (1,000,000 BLY).
pub struct TestNet {
    pub genesis: Genesis,
    pub validators: Vec<SigningKey>,
    pub accounts: Vec<SigningKey>,
}

pub fn testnet(validators: usize, accounts: usize, params: Params) -> TestNet {
    let vkeys: Vec<SigningKey> = (0..validators as u64).map(key).collect();
    let akeys: Vec<SigningKey> = (0..accounts as u64).map(|i| key(1000 + i)).collect();
    let genesis = Genesis {
        chain_id: "blyan-test".into(),
        genesis_time_ms: 1_700_000_000_000,
        balances: akeys
            .iter()
            .map(|k| GenesisBalance {
                address: address(k),
                amount: 1_000_000 * BLY,
            })
            .chain(vkeys.iter().map(|k| GenesisBalance {
                address: address(k),
                amount: 1_000 * BLY,
            }))
            .collect(),
        validators: vkeys
            .iter()
            .map(|k| GenesisValidator {
                public_key: public_key_of(k),
                stake: 10_000 * BLY,
                vrf_public_key: Some(crate::consensus::vrf_public_key(k)),
            })
            .collect(),
        params,
        pol_blocks: Vec::new(),
    };
    TestNet {
        genesis,
        validators: vkeys,
        accounts: akeys,
    }
}

/// A transaction paying at most `max_fee_per_gas` with a 1-gwei-unit tip.
pub fn tx(
    chain_id: &str,
    key: &SigningKey,
    nonce: u64,
    kind: TxKind,
    max_fee_per_gas: u128,
) -> SignedTx {
    let gas_limit = crate::ledger::intrinsic_gas(&kind);
    TxBody {
        nonce,
        gas_limit,
        max_fee_per_gas,
        max_priority_fee_per_gas: 1,
        kind,
    }
    .sign(chain_id, key)
}

pub fn transfer(
    chain_id: &str,
    key: &SigningKey,
    nonce: u64,
    to: Address,
    amount: Amount,
) -> SignedTx {
    tx(
        chain_id,
        key,
        nonce,
        TxKind::Transfer { to, amount },
        100_000_000_000,
    )
}

/// The testkit key (`key(0..512)` or `key(1000..1512)`) of `address`.
pub fn key_of(address: &Address) -> Option<SigningKey> {
    (0..512)
        .chain(1000..1512)
        .map(key)
        .find(|k| self::address(k) == *address)
}

/// CONS-COMM-7: the proposer the testkit uses: the first eligible
/// validator (ascending address), with its ticket when the next block ends an
/// epoch (its key found by [`key_of`]).
pub fn proposer(ledger: &Ledger) -> (Address, Option<crate::consensus::VrfProof>) {
    let proposer = ledger.eligible_proposers()[0];
    let ticket = ledger.next_ticket_input().and_then(|_| {
        let key = key_of(&proposer).expect("a boundary proposer with a testkit key");
        ledger.ticket_for(&key)
    });
    (proposer, ticket)
}

/// Builds and applies the next block: proposer is the first eligible
/// validator ([`proposer`]), time advances 2 s, every member of the previous
/// active set signed.
pub fn next_block(ledger: &Ledger, txs: &[SignedTx]) -> Result<(Block, Ledger), Error> {
    let signers = if ledger.height() == 0 {
        Vec::new()
    } else {
        ledger.last_active_set().iter().map(|(a, _)| *a).collect()
    };
    next_block_with(ledger, txs, signers, Vec::new())
}

pub fn next_block_with(
    ledger: &Ledger,
    txs: &[SignedTx],
    last_commit_signers: Vec<Address>,
    evidence: Vec<crate::block::Misbehaviour>,
) -> Result<(Block, Ledger), Error> {
    let (proposer, ticket) = proposer(ledger);
    let (block, next, _) = ledger.propose_block(Proposal {
        proposer,
        ticket,
        time_ms: ledger.globals().time_ms + 2_000,
        evidence,
        last_commit_signers,
        candidates: txs,
    })?;
    Ok((block, next))
}

/// A PoL block of version 1.0.0 over `payload`, with its Merkle root and CID (POL-3, POL-4).
pub fn pol_block(
    block_type: crate::pol::PolBlockType,
    model_id: crate::types::Hash32,
    depends_on: Vec<crate::types::Hash32>,
    payload: &[u8],
    submitter: Address,
) -> crate::pol::PolBlock {
    crate::pol::PolBlock {
        block_type,
        model_id,
        depends_on,
        version: crate::pol::SemVer {
            major: 1,
            minor: 0,
            patch: 0,
        },
        layer: None,
        expert: None,
        payload_size_bytes: payload.len() as u64,
        payload_merkle_root: crate::pol::payload_merkle_root(payload),
        payload_cid: crate::pol::cid_v1_raw_sha256(payload),
        submitter,
        base_block: None,
        base_version: None,
    }
}

/// SLASH-1 evidence: `key` signs two precommits for `(height, round)` with
/// different values (ids `[1; 32]` and `[2; 32]`), in canonical order.
pub fn double_sign(chain_id: &str, key: &SigningKey, height: Height, round: u32) -> Misbehaviour {
    use crate::consensus::{DuplicateVote, K256Scheme, SignatureScheme, Signed, Vote, VoteType};
    let scheme = K256Scheme {
        chain_id: chain_id.to_string(),
    };
    let signed = |value: [u8; 32]| {
        let vote = Vote {
            vote_type: VoteType::Precommit,
            height,
            round,
            value: Some(value),
            validator: address(key),
        };
        Signed {
            signature: scheme.sign_vote(key, &vote),
            message: vote,
        }
    };
    DuplicateVote::new(signed([1; 32]), signed([2; 32])).to_misbehaviour()
}

/// The long-chain generator: `blocks` certified blocks on `net`, for restart
/// and state-sync measurements and tests (NODE-STORE-6). Block `h` holds
/// `txs_per_block` transfers of 1 base unit, round-robin from `net`'s
/// accounts (nonces tracked), is proposed by the first active validator 2 s
/// after its parent, and carries a commit certificate (round 0) with real
/// k256 precommit signatures of every validator of `net` that is in the
/// active set, ascending by address, so it verifies (CONS-CERT-2) against the
/// set of its height. `each` sees every block with its outcome and the state
/// after it. Returns the final ledger.
///
/// Cost: one signature per transfer and per validator per block (about
/// 0.1 ms each): 100,000 blocks of one transfer on 4 validators take about
/// a minute.
pub fn long_chain(
    net: &TestNet,
    blocks: u64,
    txs_per_block: usize,
    mut each: impl FnMut(&crate::node::CommittedBlock, &crate::block::BlockOutcome, &Ledger),
) -> Result<Ledger, Error> {
    use crate::consensus::{CommitCertificate, K256Scheme, SignatureScheme};
    assert!(
        txs_per_block == 0 || !net.accounts.is_empty(),
        "transfers need accounts"
    );
    let mut ledger = Ledger::from_genesis(&net.genesis)?;
    let scheme = K256Scheme {
        chain_id: ledger.chain_id().to_string(),
    };
    let mut nonces = vec![0u64; net.accounts.len()];
    let mut next_sender = 0usize;
    for _ in 0..blocks {
        let mut txs = Vec::with_capacity(txs_per_block);
        for _ in 0..txs_per_block {
            let i = next_sender % net.accounts.len();
            next_sender += 1;
            let to = address(&net.accounts[(i + 1) % net.accounts.len()]);
            txs.push(transfer(
                ledger.chain_id(),
                &net.accounts[i],
                nonces[i],
                to,
                1,
            ));
            nonces[i] += 1;
        }
        let signers = if ledger.height() == 0 {
            Vec::new()
        } else {
            ledger.last_active_set().iter().map(|(a, _)| *a).collect()
        };
        let proposer = ledger.eligible_proposers()[0];
        let ticket = ledger.next_ticket_input().and_then(|_| {
            let key = net
                .validators
                .iter()
                .find(|k| address(k) == proposer)
                .expect("proposers are the testnet's validators");
            ledger.ticket_for(key)
        });
        let (block, next, outcome) = ledger.propose_block(Proposal {
            proposer,
            ticket,
            time_ms: ledger.globals().time_ms + 2_000,
            evidence: Vec::new(),
            last_commit_signers: signers,
            candidates: &txs,
        })?;
        let mut certificate = CommitCertificate {
            height: block.header.height,
            round: 0,
            value: block.hash(),
            signatures: Vec::new(),
        };
        let active = ledger.active_set();
        let mut signatures: Vec<(Address, [u8; 64])> = net
            .validators
            .iter()
            .filter(|k| active.iter().any(|(a, _)| *a == address(k)))
            .map(|k| {
                let vote = certificate.precommit(address(k));
                (address(k), scheme.sign_vote(k, &vote))
            })
            .collect();
        signatures.sort_by_key(|(a, _)| *a);
        certificate.signatures = signatures;
        let committed = crate::node::CommittedBlock { block, certificate };
        each(&committed, &outcome, &next);
        ledger = next;
    }
    Ok(ledger)
}
