use blyan_route::Error;
use blyan_route::heartbeat::*;
use blyan_state_machine::crypto::sign;
use blyan_state_machine::testkit::{address, key};
use blyan_state_machine::tx::public_key_of;
use blyan_state_machine::types::Address;

const CHAIN: &str = "blyan-test";

fn me() -> Address {
    address(&key(100))
}

fn holding(first: u32, last: u32) -> Holding {
    Holding {
        model: [9; 32],
        first_layer: first,
        last_layer: last,
        dense: true,
        experts: vec![],
        blocks: vec![[1; 32], [2; 32]],
    }
}

fn heartbeat(i: u64, timestamp_ms: u64) -> Heartbeat {
    let k = key(i);
    Heartbeat {
        sender: address(&k),
        public_key: public_key_of(&k),
        receiver: me(),
        timestamp_ms,
        holdings: vec![holding(0, 1)],
        free_slots: 4,
        queue_depth: 1,
        compute_per_token_us: 2_000,
    }
}

fn signed(i: u64, hb: Heartbeat) -> SignedHeartbeat {
    let signature = sign(&key(i), &hb.signing_bytes(CHAIN));
    SignedHeartbeat {
        heartbeat: hb,
        signature,
    }
}

fn hb(i: u64, timestamp_ms: u64) -> SignedHeartbeat {
    signed(i, heartbeat(i, timestamp_ms))
}

fn table(config: HeartbeatConfig) -> HeartbeatTable {
    HeartbeatTable::new(me(), CHAIN, config).unwrap()
}

fn all(_: &Address) -> bool {
    true
}

#[test]
fn rt_hb_1_encoding_round_trips_and_refuses_trailing_truncated_and_unordered() {
    let s = hb(1, 1_000);
    let bytes = s.encode();
    assert_eq!(SignedHeartbeat::decode(&bytes).unwrap(), s);
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        SignedHeartbeat::decode(&long),
        Err(Error::Malformed { .. })
    ));
    for cut in [0, 10, bytes.len() - 1] {
        assert!(matches!(
            SignedHeartbeat::decode(&bytes[..cut]),
            Err(Error::Malformed { .. })
        ));
    }
    let mut bad = heartbeat(1, 1_000);
    bad.holdings[0].experts = vec![3, 2];
    assert!(matches!(
        SignedHeartbeat::decode(&signed(1, bad).encode()),
        Err(Error::InvalidHolding(_))
    ));
    let mut bad = heartbeat(1, 1_000);
    bad.holdings[0].first_layer = 5;
    assert!(matches!(
        table(HeartbeatConfig::default()).accept(2_000, &signed(1, bad), all),
        Err(Error::InvalidHolding(_))
    ));
    let mut bad = heartbeat(1, 1_000);
    bad.holdings = vec![holding(0, 0); MAX_HOLDINGS + 1];
    assert!(matches!(
        SignedHeartbeat::decode(&signed(1, bad).encode()),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        SignedHeartbeat::decode(&vec![0u8; MAX_HEARTBEAT_BYTES + 1]),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn rt_hb_2_only_registered_nodes() {
    let mut t = table(HeartbeatConfig::default());
    let sender = address(&key(1));
    let err = t
        .accept(1_000, &hb(1, 1_000), |a| *a != sender)
        .unwrap_err();
    assert_eq!(err, Error::NotRegistered(sender));
    assert!(t.is_empty());
    t.accept(1_000, &hb(1, 1_000), |a| *a == sender).unwrap();
    assert_eq!(t.len(), 1);
}

#[test]
fn rt_hb_3_sender_must_be_the_key_and_the_signature_must_verify() {
    let mut t = table(HeartbeatConfig::default());
    let mut s = hb(1, 1_000);
    s.heartbeat.queue_depth = 0; // changed after signing
    assert_eq!(
        t.accept(1_000, &s, all),
        Err(Error::BadSignature("heartbeat"))
    );
    let mut h = heartbeat(1, 1_000);
    h.sender = address(&key(2));
    let err = t.accept(1_000, &signed(1, h), all).unwrap_err();
    assert!(matches!(err, Error::WrongKey { .. }), "{err}");
    // Signed on another chain.
    let h = heartbeat(1, 1_000);
    let signature = sign(&key(1), &h.signing_bytes("other-chain"));
    let s = SignedHeartbeat {
        heartbeat: h,
        signature,
    };
    assert_eq!(
        t.accept(1_000, &s, all),
        Err(Error::BadSignature("heartbeat"))
    );
    assert!(t.is_empty());
}

#[test]
fn rt_hb_4_receiver_is_named() {
    let mut other =
        HeartbeatTable::new(address(&key(101)), CHAIN, HeartbeatConfig::default()).unwrap();
    let err = other.accept(1_000, &hb(1, 1_000), all).unwrap_err();
    assert_eq!(
        err,
        Error::WrongReceiver {
            expected: address(&key(101)),
            got: me()
        }
    );
}

#[test]
fn rt_hb_5_timestamp_window() {
    let mut t = table(HeartbeatConfig::default());
    let now = 100_000;
    assert!(matches!(
        t.accept(now, &hb(1, now + 2_001), all),
        Err(Error::FromFuture { .. })
    ));
    assert!(matches!(
        t.accept(now, &hb(1, now - 15_000), all),
        Err(Error::TooOld { .. })
    ));
    t.accept(now, &hb(1, now + 2_000), all).unwrap();
    t.accept(now, &hb(2, now - 14_999), all).unwrap();
}

#[test]
fn rt_hb_6_timestamps_strictly_increase() {
    let mut t = table(HeartbeatConfig::default());
    t.accept(10_000, &hb(1, 10_000), all).unwrap();
    assert_eq!(
        t.accept(10_001, &hb(1, 10_000), all),
        Err(Error::Replayed {
            timestamp_ms: 10_000,
            last_ms: 10_000
        })
    );
    assert!(matches!(
        t.accept(10_001, &hb(1, 9_999), all),
        Err(Error::Replayed { .. })
    ));
    let a = t.accept(10_002, &hb(1, 10_001), all).unwrap();
    assert!(!a.new_node);
    assert_eq!(
        t.live(&address(&key(1)), 10_002)
            .unwrap()
            .heartbeat
            .timestamp_ms,
        10_001
    );
}

#[test]
fn rt_hb_7_expires_after_three_missed_intervals_on_the_receivers_clock() {
    let mut t = table(HeartbeatConfig::default());
    let node = address(&key(1));
    // The sender's clock is 1 s behind; expiry counts from receipt.
    t.accept(50_000, &hb(1, 49_000), all).unwrap();
    assert!(t.live(&node, 64_999).is_some());
    assert_eq!(t.live(&node, 64_999).unwrap().age_ms(64_999), 14_999);
    assert!(t.live(&node, 65_000).is_none());
    assert_eq!(t.iter_live(65_000).count(), 0);
    assert_eq!(t.len(), 1, "not purged until expire or accept");
    // A newer heartbeat from another node purges it.
    let a = t.accept(65_000, &hb(2, 65_000), all).unwrap();
    assert_eq!(a.expired, vec![node]);
    assert_eq!(t.len(), 1);
    assert_eq!(t.expire(80_000), vec![address(&key(2))]);
    assert_eq!(t.bytes(), 0);
}

#[test]
fn rt_hb_8_bounded_by_count_evicting_the_stalest() {
    let mut t = table(HeartbeatConfig {
        max_nodes: 3,
        ..HeartbeatConfig::default()
    });
    for i in 1..=3 {
        t.accept(1_000 + i, &hb(i, 1_000), all).unwrap();
    }
    // Node 1 renews: node 2 is now the one accepted longest ago.
    t.accept(2_000, &hb(1, 2_000), all).unwrap();
    let a = t.accept(2_001, &hb(4, 2_001), all).unwrap();
    assert_eq!(a.evicted, vec![address(&key(2))]);
    assert!(a.new_node);
    assert_eq!(t.len(), 3);
    assert!(t.live(&address(&key(2)), 2_001).is_none());
}

#[test]
fn rt_hb_8_bounded_by_bytes() {
    let one = hb(1, 1_000).encode().len() - 64 + ENTRY_OVERHEAD_BYTES;
    let mut t = table(HeartbeatConfig {
        max_bytes: 2 * one + one / 2,
        ..HeartbeatConfig::default()
    });
    t.accept(1_000, &hb(1, 1_000), all).unwrap();
    t.accept(1_001, &hb(2, 1_000), all).unwrap();
    assert_eq!(t.bytes(), 2 * one);
    let a = t.accept(1_002, &hb(3, 1_000), all).unwrap();
    assert_eq!(a.evicted, vec![address(&key(1))]);
    assert!(t.bytes() <= 2 * one + one / 2);
    let mut tiny = table(HeartbeatConfig {
        max_bytes: one - 1,
        ..HeartbeatConfig::default()
    });
    assert_eq!(
        tiny.accept(1_000, &hb(1, 1_000), all),
        Err(Error::EntryTooLarge {
            bytes: one,
            max_bytes: one - 1
        })
    );
}

#[test]
fn rt_hb_9_pages_in_address_order_skipping_expired() {
    let mut t = table(HeartbeatConfig::default());
    for i in 1..=5 {
        t.accept(1_000, &hb(i, 1_000), all).unwrap();
    }
    t.accept(10_000, &hb(3, 10_000), all).unwrap();
    let mut addrs: Vec<Address> = (1..=5).map(|i| address(&key(i))).collect();
    addrs.sort();
    let first: Vec<Address> = t.page(None, 2, 1_000).iter().map(|(a, _)| *a).collect();
    assert_eq!(first, addrs[..2]);
    let rest: Vec<Address> = t
        .page(Some(addrs[1]), 10, 1_000)
        .iter()
        .map(|(a, _)| *a)
        .collect();
    assert_eq!(rest, addrs[2..]);
    // At 16,000 only node 3 (renewed at 10,000) is live.
    let live: Vec<Address> = t.page(None, 10, 16_000).iter().map(|(a, _)| *a).collect();
    assert_eq!(live, vec![address(&key(3))]);
}

#[test]
fn rt_hb_config_is_checked() {
    for bad in [
        HeartbeatConfig {
            heartbeat_interval_ms: 0,
            ..HeartbeatConfig::default()
        },
        HeartbeatConfig {
            max_nodes: 0,
            ..HeartbeatConfig::default()
        },
    ] {
        assert!(matches!(
            HeartbeatTable::new(me(), CHAIN, bad),
            Err(Error::InvalidConfig(_))
        ));
    }
    assert_eq!(HeartbeatConfig::default().expiry_ms(), 15_000);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// RT-HB-6..8 under random traffic: the bounds hold, bytes are
        /// accounted exactly, a listed entry is exactly one accepted less
        /// than `expiry_ms` ago, and timestamps only increase.
        #[test]
        fn rt_hb_7_8_bounds_and_expiry_hold_under_random_traffic(
            ops in prop::collection::vec((1u64..=6, 0u64..4_000, 0u64..3_000), 1..30),
            max_nodes in 1usize..5,
        ) {
            let one = hb(1, 1_000).encode().len() - 64 + ENTRY_OVERHEAD_BYTES;
            let config = HeartbeatConfig { max_nodes, max_bytes: 3 * one, ..HeartbeatConfig::default() };
            let mut t = table(config.clone());
            let mut now = 20_000u64;
            let mut accepted: std::collections::BTreeMap<Address, (u64, u64)> = Default::default();
            for (node, advance, behind) in ops {
                now += advance;
                let ts = now - behind;
                let addr = address(&key(node));
                let before = t.live(&addr, now).map(|e| e.heartbeat.timestamp_ms);
                match t.accept(now, &hb(node, ts), all) {
                    Ok(_) => {
                        prop_assert!(before.is_none_or(|b| ts > b));
                        accepted.insert(addr, (now, ts));
                    }
                    Err(Error::Replayed { last_ms, .. }) => prop_assert!(ts <= last_ms),
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
                prop_assert!(t.len() <= max_nodes.min(3));
                prop_assert!(t.bytes() <= 3 * one);
                prop_assert_eq!(t.bytes(), t.page(None, usize::MAX, 0).iter().map(|(_, e)| e.bytes).sum::<usize>());
                for (a, e) in t.iter_live(now) {
                    prop_assert!(now < e.received_ms + config.expiry_ms());
                    prop_assert_eq!(accepted[a], (e.received_ms, e.heartbeat.timestamp_ms));
                }
            }
        }
    }
}
