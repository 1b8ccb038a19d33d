//! PoL and rewards through the ledger: TX-7, POL-15, POL-20..35, RWD-4, RWD-5,
//! INV-SUPPLY with minting.
use blyan_state_machine::block::Event;
use blyan_state_machine::ledger::Ledger;
use blyan_state_machine::params::Params;
use blyan_state_machine::pol::{
    PolBlockType, PolEvent, PolTx, SemVer, attestation_commitment, delta_commitment,
};
use blyan_state_machine::testkit::{address, next_block, pol_block as block, testnet, tx};
use blyan_state_machine::tx::{InferenceReceipt, TxKind};
use blyan_state_machine::types::{BLY, Hash32};

const CHAIN: &str = "blyan-test";
const FEE: u128 = 100_000_000_000;

fn pol(p: PolTx) -> TxKind {
    TxKind::Pol(Box::new(p))
}

fn assert_supply(l: &Ledger) {
    let (held, expected) = l.audit_supply();
    assert_eq!(held, expected, "INV-SUPPLY");
}

#[test]
fn delta_commit_reveal_attest_accept_and_mint() {
    let mut params = Params::default();
    params.pol.attest_commit_window_blocks = 2;
    params.pol.attest_reveal_window_blocks = 2;
    params.rewards.epoch_length_blocks = 12;
    let mut net = testnet(4, 3, params);
    let genesis_author = address(&net.accounts[0]);
    let meta = block(
        PolBlockType::Meta,
        [0; 32],
        vec![],
        b"{\"architectures\":[\"Qwen3ForCausalLM\"]}",
        genesis_author,
    );
    let mut expert = block(
        PolBlockType::Expert,
        meta.id(),
        vec![meta.id()],
        b"expert-0-0 weights",
        genesis_author,
    );
    expert.layer = Some(0);
    expert.expert = Some(0);
    let mut data = block(
        PolBlockType::Data,
        meta.id(),
        vec![meta.id()],
        b"validation text",
        genesis_author,
    );
    data.layer = None;
    net.genesis.pol_blocks = vec![meta.clone(), expert.clone(), data.clone()];
    let mut l = Ledger::from_genesis(&net.genesis).unwrap();
    assert_eq!(l.pol().block_count(), 3);
    assert_supply(&l);

    // POL-15: registering a router outside genesis locks the registration bond.
    let registrant = &net.accounts[2];
    let mut router = block(
        PolBlockType::Router,
        meta.id(),
        vec![meta.id()],
        b"router 0",
        address(registrant),
    );
    router.layer = Some(0);
    let (_, next) = next_block(
        &l,
        &[tx(
            CHAIN,
            registrant,
            0,
            pol(PolTx::RegisterBlock(router)),
            FEE,
        )],
    )
    .unwrap();
    assert_eq!(next.globals().locked, 1_000 * BLY);
    l = next;

    // POL-20/21: commit, then reveal one block later.
    let miner = &net.accounts[1];
    let mut delta = block(
        PolBlockType::Delta,
        meta.id(),
        vec![expert.id(), data.id()],
        b"int8 delta",
        address(miner),
    );
    delta.layer = Some(0);
    delta.expert = Some(0);
    delta.version = SemVer {
        major: 1,
        minor: 1,
        patch: 0,
    };
    delta.base_block = Some(expert.id());
    delta.base_version = Some(SemVer {
        major: 1,
        minor: 0,
        patch: 0,
    });
    let id = delta.id();
    let commit = pol(PolTx::CommitDelta {
        commitment: delta_commitment(&id, &address(miner)),
    });
    l = next_block(&l, &[tx(CHAIN, miner, 0, commit, FEE)])
        .unwrap()
        .1;
    l = next_block(
        &l,
        &[tx(
            CHAIN,
            miner,
            1,
            pol(PolTx::RevealDelta(delta.clone())),
            FEE,
        )],
    )
    .unwrap()
    .1;
    assert!(
        l.pol().pending_delta(&id).is_some(),
        "revealed delta is pending"
    );

    // POL-31/32: every validator commits then reveals (head 2.000 nats, delta 1.900: 5%).
    let salts: Vec<Hash32> = (0..4u8).map(|i| [i + 1; 32]).collect();
    let commits: Vec<_> = net
        .validators
        .iter()
        .zip(&salts)
        .map(|(v, salt)| {
            let c = attestation_commitment(&id, 1_900_000, 2_000_000, salt, &address(v));
            tx(
                CHAIN,
                v,
                0,
                pol(PolTx::CommitAttestation {
                    delta_id: id,
                    commitment: c,
                }),
                FEE,
            )
        })
        .collect();
    l = next_block(&l, &commits).unwrap().1;
    l = next_block(&l, &[]).unwrap().1;
    l = next_block(&l, &[]).unwrap().1;
    let reveals: Vec<_> = net
        .validators
        .iter()
        .zip(&salts)
        .map(|(v, salt)| {
            let r = PolTx::RevealAttestation {
                delta_id: id,
                loss_micronats: 1_900_000,
                head_loss_micronats: 2_000_000,
                salt: *salt,
            };
            tx(CHAIN, v, 1, pol(r), FEE)
        })
        .collect();
    let mut accepted = false;
    for round in 0..4 {
        let txs = if round == 0 { reveals.clone() } else { vec![] };
        let (b, next) = next_block(&l, &txs).unwrap();
        let (_, outcome) = l.apply_block(&b).unwrap();
        assert!(
            outcome.receipts.iter().all(|r| r.failure.is_none()),
            "{:?}",
            outcome.receipts
        );
        for e in &outcome.events {
            if let Event::Pol(pe) = e
                && let PolEvent::DeltaDecided(d) = pe.as_ref()
            {
                assert_eq!(d.delta_id, id);
                accepted = format!("{:?}", d.outcome).contains("Accepted");
            }
        }
        l = next;
        assert_supply(&l);
    }
    assert!(
        accepted,
        "5% improvement with full quorum is accepted (POL-35)"
    );
    assert!(
        l.pol().block(&id).is_some(),
        "accepted delta enters the DAG"
    );

    // RWD-5: at the reward-epoch boundary the claims are minted.
    let before = l.globals().minted;
    let mut minted_to_miner = 0;
    while l.height() < 12 {
        let (b, next) = next_block(&l, &[]).unwrap();
        let (_, outcome) = l.apply_block(&b).unwrap();
        for e in &outcome.events {
            if let Event::RewardsMinted { recipient, amount } = e
                && *recipient == address(miner)
            {
                minted_to_miner += amount;
            }
        }
        l = next;
        assert_supply(&l);
    }
    assert!(l.globals().minted > before);
    // 5% on a fresh target: at least 5 × 500 BLY before pro-rata scaling (RWD-10).
    assert!(minted_to_miner > 0, "the miner was paid");
    let budget = blyan_state_machine::rewards::pool_budget(
        &l.params().rewards,
        blyan_state_machine::rewards::RewardPool::Learning,
    );
    assert!(minted_to_miner <= budget, "INV-RWD-BUDGET");
}

#[test]
fn rwd_4_inference_reward_never_exceeds_the_burn() {
    let mut params = Params::default();
    params.rewards.epoch_length_blocks = 3;
    let net = testnet(4, 2, params);
    let mut l = Ledger::from_genesis(&net.genesis).unwrap();
    let (client, node) = (&net.accounts[0], &net.accounts[1]);
    // A self-dealing node pays itself 1 base unit for a million tokens.
    let receipt = InferenceReceipt {
        node: address(node),
        request_id: [1; 32],
        tokens: 1_000_000,
        price_per_1k_tokens: 1,
        quality_milli: 1_500,
        expires_at_height: 10,
    }
    .sign(CHAIN, client);
    let settle = tx(
        CHAIN,
        node,
        0,
        TxKind::SettleInference {
            receipt: Box::new(receipt),
        },
        FEE,
    );
    let mut minted = 0;
    for h in 1..=3 {
        let txs = if h == 1 { vec![settle.clone()] } else { vec![] };
        let (b, next) = next_block(&l, &txs).unwrap();
        let (_, o) = l.apply_block(&b).unwrap();
        for e in &o.events {
            if let Event::RewardsMinted { recipient, amount } = e
                && *recipient == address(node)
            {
                minted += amount;
            }
        }
        l = next;
        assert_supply(&l);
    }
    // Payment = 1_000_000 × 1 / 1000 = 1000 base units burned; reward capped at that.
    assert_eq!(minted, 1_000);
}
