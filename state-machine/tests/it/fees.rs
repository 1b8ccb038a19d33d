//! FEE-1, FEE-2 (EIP-1559 base fee).
use blyan_state_machine::ledger::next_base_fee;

#[test]
fn fee_2_unchanged_at_target() {
    assert_eq!(
        next_base_fee(1_000_000_000, 15_000_000, 30_000_000),
        1_000_000_000
    );
}

#[test]
fn fee_2_full_block_raises_by_one_eighth() {
    assert_eq!(
        next_base_fee(1_000_000_000, 30_000_000, 30_000_000),
        1_125_000_000
    );
}

#[test]
fn fee_2_empty_block_lowers_by_one_eighth() {
    assert_eq!(next_base_fee(1_000_000_000, 0, 30_000_000), 875_000_000);
}

#[test]
fn fee_2_increase_is_at_least_one() {
    // base * 1 / target / 8 rounds to 0; EIP-1559 adds max(1, ...).
    assert_eq!(next_base_fee(7, 15_000_001, 30_000_000), 8);
}

#[test]
fn fee_2_rounds_down() {
    // 1e9 * 5e6 / 15e6 / 8 = 41_666_666.67 -> 41_666_666
    assert_eq!(
        next_base_fee(1_000_000_000, 10_000_000, 30_000_000),
        1_000_000_000 - 41_666_666
    );
    assert_eq!(
        next_base_fee(1_000_000_000, 20_000_000, 30_000_000),
        1_000_000_000 + 41_666_666
    );
}

#[test]
fn fee_2_degenerate_limits_and_saturation_never_panic() {
    assert_eq!(next_base_fee(5, 100, 0), 5);
    assert_eq!(next_base_fee(5, 100, 1), 5);
    assert_eq!(next_base_fee(u128::MAX, u64::MAX, u64::MAX - 1), u128::MAX);
    assert_eq!(next_base_fee(0, 0, 30_000_000), 0);
    assert_eq!(next_base_fee(0, 30_000_000, 30_000_000), 1);
    let _ = next_base_fee(u128::MAX, 0, 2);
}
