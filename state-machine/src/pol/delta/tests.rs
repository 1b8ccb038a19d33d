//! Tests for spec/pol.md POL-DELTA-*; each names the rule it checks.

use super::*;
use proptest::prelude::*;

/// A small payload: a bf16 matrix (2 x 300, 3 kept per row: one gap needs a
/// 2-byte varint) and an f32 vector (1 kept).
fn sample() -> DeltaPayload {
    DeltaPayload {
        tensors: vec![
            DeltaTensor {
                name: "a.weight".into(),
                dtype: BaseDtype::Bf16,
                shape: DeltaShape::Matrix { rows: 2, cols: 300 },
                kept_per_row: 3,
                scale_bits: vec![0x3c00_0000, 0],
                columns: vec![0, 5, 299, 1, 2, 3],
                values: vec![127, -127, 0, 0, 0, 0],
            },
            DeltaTensor {
                name: "b.norm".into(),
                dtype: BaseDtype::F32,
                shape: DeltaShape::Vector { len: 4 },
                kept_per_row: 1,
                scale_bits: vec![0x3f80_0000],
                columns: vec![3],
                values: vec![-1],
            },
        ],
    }
}

fn sample_bytes() -> Vec<u8> {
    sample().encode().unwrap()
}

/// The header of a payload with one tensor, up to its first row.
fn one_tensor_header(name: &[u8], dtype: u8, rank: u8, rows: u32, cols: u32, kept: u32) -> Vec<u8> {
    let mut b = b"BLYD\x01\x00\x01\x00".to_vec();
    b.push(name.len() as u8);
    b.extend_from_slice(name);
    b.extend_from_slice(&[dtype, rank]);
    b.extend_from_slice(&rows.to_le_bytes());
    b.extend_from_slice(&cols.to_le_bytes());
    b.extend_from_slice(&kept.to_le_bytes());
    b
}

fn err(bytes: &[u8]) -> DeltaError {
    DeltaPayload::decode(bytes).expect_err("must be refused")
}

#[test]
fn pol_delta_2_4_layout_is_pinned_byte_for_byte() {
    let expected = concat!(
        "424c5944",
        "01",
        "00",
        "0200", // magic, version, layout 0, 2 tensors
        "08",
        "612e776569676874",
        "01",
        "02",
        "02000000",
        "2c010000",
        "03000000",
        "0000003c",
        "00",
        "04",
        "a502",
        "7f",
        "81",
        "00", // row 0: cols 0, 5, 299
        "00000000",
        "01",
        "00",
        "00",
        "00",
        "00",
        "00", // row 1: cols 1, 2, 3
        "06",
        "622e6e6f726d",
        "00",
        "01",
        "01000000",
        "04000000",
        "01000000",
        "0000803f",
        "03",
        "ff",
    );
    assert_eq!(hex::encode(sample_bytes()), expected);
    assert_eq!(
        DeltaPayload::decode(&hex::decode(expected).unwrap()).unwrap(),
        sample()
    );
}

#[test]
fn pol_delta_1_address_is_pol3_root_and_pol4_cid() {
    let bytes = sample_bytes();
    let a = payload_address(&bytes);
    assert_eq!(a.size_bytes, bytes.len() as u64);
    assert_eq!(
        a.merkle_root,
        crate::crypto::sha3_256_parts(&[&[0x00], &bytes])
    );
    assert_eq!(a.cid, cid_v1_raw_sha256(&bytes));
    assert!(super::super::is_cid_v1_raw_sha256(&a.cid));
}

#[test]
fn pol_delta_1_oversized_payload_is_refused_before_reading() {
    let big = vec![0u8; MAX_DELTA_PAYLOAD_BYTES + 1];
    assert_eq!(
        err(&big),
        DeltaError::TooLarge {
            got: MAX_DELTA_PAYLOAD_BYTES + 1,
            max: MAX_DELTA_PAYLOAD_BYTES
        }
    );
}

#[test]
fn pol_delta_2_header_errors() {
    let good = sample_bytes();
    let with = |i: usize, b: u8| {
        let mut x = good.clone();
        x[i] = b;
        x
    };
    assert_eq!(err(&with(0, b'X')), DeltaError::BadMagic(*b"XLYD"));
    assert_eq!(err(&with(4, 2)), DeltaError::UnsupportedVersion(2));
    assert_eq!(
        err(&with(5, LAYOUT_LORA_RESERVED)),
        DeltaError::UnsupportedLayout(1)
    );
    assert_eq!(err(&with(5, 7)), DeltaError::UnsupportedLayout(7));
    assert_eq!(
        err(&with(6, 0)),
        DeltaError::TensorCount { got: 0, max: 64 }
    );
    assert_eq!(
        err(&with(6, 65)),
        DeltaError::TensorCount { got: 65, max: 64 }
    );
    assert!(matches!(err(&[]), DeltaError::Truncated { offset: 0, .. }));
    assert!(matches!(
        err(b"BLYD\x01\x00\x01"),
        DeltaError::Truncated { .. }
    ));
}

#[test]
fn pol_delta_3_tensor_header_errors() {
    let e = |name: &[u8], dtype, rank, rows, cols, kept| {
        let mut b = one_tensor_header(name, dtype, rank, rows, cols, kept);
        b.extend_from_slice(&[0; 64]);
        err(&b)
    };
    assert_eq!(
        e(b"", 0, 2, 1, 1, 1),
        DeltaError::BadName {
            tensor: 0,
            reason: "is empty"
        }
    );
    assert!(matches!(
        e(&[b'a'; 129], 0, 2, 1, 1, 1),
        DeltaError::BadName { tensor: 0, .. }
    ));
    assert!(matches!(
        e(b"a b", 0, 2, 1, 1, 1),
        DeltaError::BadName { tensor: 0, .. }
    ));
    assert!(matches!(
        e("é".as_bytes(), 0, 2, 1, 1, 1),
        DeltaError::BadName { tensor: 0, .. }
    ));
    assert_eq!(
        e(b"a", 3, 2, 1, 1, 1),
        DeltaError::UnknownDtype { tensor: 0, byte: 3 }
    );
    assert_eq!(
        e(b"a", 0, 0, 1, 1, 1),
        DeltaError::BadRank { tensor: 0, rank: 0 }
    );
    assert_eq!(
        e(b"a", 0, 3, 1, 1, 1),
        DeltaError::BadRank { tensor: 0, rank: 3 }
    );
    assert_eq!(
        e(b"a", 0, 2, 0, 1, 1),
        DeltaError::BadShape {
            tensor: 0,
            rows: 0,
            cols: 1
        }
    );
    assert_eq!(
        e(b"a", 0, 2, 1, 0, 1),
        DeltaError::BadShape {
            tensor: 0,
            rows: 1,
            cols: 0
        }
    );
    let over = MAX_DELTA_DIM + 1;
    assert_eq!(
        e(b"a", 0, 2, over, 1, 1),
        DeltaError::BadShape {
            tensor: 0,
            rows: over,
            cols: 1
        }
    );
    assert_eq!(
        e(b"a", 0, 2, 1, over, 1),
        DeltaError::BadShape {
            tensor: 0,
            rows: 1,
            cols: over
        }
    );
    assert_eq!(
        e(b"a", 0, 1, 2, 4, 1),
        DeltaError::BadShape {
            tensor: 0,
            rows: 2,
            cols: 4
        }
    );
    assert_eq!(
        e(b"a", 0, 2, 1, 4, 0),
        DeltaError::BadKeptPerRow {
            tensor: 0,
            kept: 0,
            cols: 4
        }
    );
    assert_eq!(
        e(b"a", 0, 2, 1, 4, 5),
        DeltaError::BadKeptPerRow {
            tensor: 0,
            kept: 5,
            cols: 4
        }
    );
    // A 128-byte name is fine.
    let mut ok = one_tensor_header(&[b'a'; 128], 0, 2, 1, 1, 1);
    ok.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
    assert_eq!(
        DeltaPayload::decode(&ok).unwrap().tensors[0].name.len(),
        128
    );
}

#[test]
fn pol_delta_3_names_strictly_increase() {
    let mut p = sample();
    p.tensors[1].name = "a.weight".into();
    assert_eq!(
        p.encode(),
        Err(DeltaError::NamesNotIncreasing { tensor: 1 })
    );
    p.tensors.swap(0, 1);
    p.tensors[0].name = "b.norm".into();
    assert_eq!(
        p.encode(),
        Err(DeltaError::NamesNotIncreasing { tensor: 1 })
    );
    // The same on the wire: rename the second tensor to "a.weig" + "ht" -> "a.weight".
    let mut bytes = sample_bytes();
    let at = bytes.windows(6).position(|w| w == b"b.norm").unwrap();
    bytes[at] = b'a';
    assert_eq!(err(&bytes), DeltaError::NamesNotIncreasing { tensor: 1 });
}

#[test]
fn pol_delta_4_row_errors() {
    let row = |scale: u32, idx: &[u8], vals: &[u8]| {
        let mut b = one_tensor_header(b"a", 1, 2, 1, 200, 2);
        b.extend_from_slice(&scale.to_le_bytes());
        b.extend_from_slice(idx);
        b.extend_from_slice(vals);
        b
    };
    assert!(DeltaPayload::decode(&row(0x3f80_0000, &[0, 0], &[1, 2])).is_ok());
    assert!(DeltaPayload::decode(&row(MAX_SCALE_BITS, &[0, 0], &[1, 2])).is_ok());
    assert!(DeltaPayload::decode(&row(1, &[0, 0], &[1, 2])).is_ok()); // subnormal
    for bits in [
        0x8000_0000u32,
        0xbf80_0000,
        0x7f80_0000,
        0x7fc0_0000,
        0xffc0_0000,
    ] {
        assert_eq!(
            err(&row(bits, &[0, 0], &[1, 2])),
            DeltaError::BadScale {
                tensor: 0,
                row: 0,
                bits
            }
        );
    }
    let header = one_tensor_header(b"a", 1, 2, 1, 200, 2).len();
    let first_idx = header + 4;
    assert_eq!(
        err(&row(0, &[0x80, 0x00, 0], &[1, 2])),
        DeltaError::NonMinimalVarint { offset: first_idx }
    );
    assert_eq!(
        err(&row(0, &[0xff, 0xff, 0xff, 0xff, 0x7f, 0], &[1, 2])),
        DeltaError::VarintOverflow { offset: first_idx }
    );
    assert_eq!(
        err(&row(0, &[0xff, 0xff, 0xff, 0xff, 0x80, 0x01, 0], &[1, 2])),
        DeltaError::VarintOverflow { offset: first_idx }
    );
    // 199 is the last column; 199 + gap 0 + 1 = 200 is out.
    assert!(DeltaPayload::decode(&row(0, &[198 & 0x7f | 0x80, 1, 0], &[1, 2])).is_ok());
    assert_eq!(
        err(&row(0, &[199 & 0x7f | 0x80, 1, 0], &[1, 2])),
        DeltaError::BadColumn {
            tensor: 0,
            row: 0,
            column: 200,
            cols: 200
        }
    );
    assert_eq!(
        err(&row(0, &[0, 0], &[1, 0x80])),
        DeltaError::ValueOutOfRange { tensor: 0, row: 0 }
    );
}

#[test]
fn pol_delta_5_trailing_and_truncated() {
    let bytes = sample_bytes();
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(err(&long), DeltaError::TrailingBytes { trailing: 1 });
    for len in 0..bytes.len() {
        assert!(
            DeltaPayload::decode(&bytes[..len]).is_err(),
            "prefix of {len} bytes decoded"
        );
    }
}

#[test]
fn pol_delta_5_claimed_sizes_are_checked_before_allocating() {
    // 2^20 x 2^20 with every column kept would be 2^40 entries; 8 bytes left.
    let mut b = one_tensor_header(b"a", 0, 2, MAX_DELTA_DIM, MAX_DELTA_DIM, MAX_DELTA_DIM);
    b.extend_from_slice(&[0; 8]);
    assert_eq!(
        err(&b),
        DeltaError::RowsExceedPayload {
            tensor: 0,
            needed: u64::from(MAX_DELTA_DIM) * (4 + 2 * u64::from(MAX_DELTA_DIM)),
            remaining: 8,
        }
    );
    // Exactly the minimum fits: one row, two entries, 1-byte varints.
    let mut b = one_tensor_header(b"a", 0, 2, 1, 2, 2);
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 5, 6]);
    assert_eq!(
        DeltaPayload::decode(&b).unwrap().tensors[0].values,
        vec![5, 6]
    );
}

#[test]
fn pol_delta_5_encoder_refuses_what_the_decoder_refuses() {
    let base = sample();
    let refused = |f: &dyn Fn(&mut DeltaPayload)| {
        let mut p = base.clone();
        f(&mut p);
        p.encode().expect_err("must be refused")
    };
    assert_eq!(
        refused(&|p| p.tensors.clear()),
        DeltaError::TensorCount { got: 0, max: 64 }
    );
    assert!(matches!(
        refused(&|p| p.tensors[0].name = "a b".into()),
        DeltaError::BadName { tensor: 0, .. }
    ));
    assert_eq!(
        refused(&|p| p.tensors[0].columns[1] = 0),
        DeltaError::BadColumn {
            tensor: 0,
            row: 0,
            column: 0,
            cols: 300
        }
    );
    assert_eq!(
        refused(&|p| p.tensors[0].columns[2] = 300),
        DeltaError::BadColumn {
            tensor: 0,
            row: 0,
            column: 300,
            cols: 300
        }
    );
    assert_eq!(
        refused(&|p| p.tensors[0].values[4] = -128),
        DeltaError::ValueOutOfRange { tensor: 0, row: 1 }
    );
    assert_eq!(
        refused(&|p| p.tensors[1].scale_bits[0] = 0x8000_0000),
        DeltaError::BadScale {
            tensor: 1,
            row: 0,
            bits: 0x8000_0000
        }
    );
    assert!(matches!(
        refused(&|p| {
            p.tensors[0].values.pop();
        }),
        DeltaError::Inconsistent { tensor: 0, .. }
    ));
    assert!(matches!(
        refused(&|p| p.tensors[1].scale_bits.push(0)),
        DeltaError::Inconsistent { tensor: 1, .. }
    ));
    assert_eq!(
        refused(&|p| p.tensors[1].kept_per_row = 5),
        DeltaError::BadKeptPerRow {
            tensor: 1,
            kept: 5,
            cols: 4
        }
    );
}

#[test]
fn pol_delta_3_tensor_lookup_by_name() {
    let p = sample();
    assert_eq!(
        p.tensor("b.norm").unwrap().shape,
        DeltaShape::Vector { len: 4 }
    );
    assert!(p.tensor("c").is_none());
    assert_eq!(
        p.tensors[0].row(1),
        (0, &[1u32, 2, 3][..], &[0i8, 0, 0][..])
    );
}

#[test]
fn pol_delta_5_every_single_byte_change_of_the_sample_is_refused_or_canonical() {
    let bytes = sample_bytes();
    for i in 0..bytes.len() {
        for b in 0..=255u8 {
            let mut x = bytes.clone();
            x[i] = b;
            if let Ok(p) = DeltaPayload::decode(&x) {
                assert_eq!(p.encode().unwrap(), x, "byte {i} = {b:#04x}");
            }
        }
    }
}

fn arb_tensor(name: String) -> impl Strategy<Value = DeltaTensor> {
    (0u8..3, any::<bool>(), 1u32..4, 1u32..200).prop_flat_map(move |(dtype, vector, rows, cols)| {
        let rows = if vector { 1 } else { rows };
        let name = name.clone();
        (1..=cols.min(12)).prop_flat_map(move |kept| {
            let name = name.clone();
            let row = (
                prop_oneof![Just(0u32), 0..=MAX_SCALE_BITS],
                proptest::sample::subsequence((0..cols).collect::<Vec<u32>>(), kept as usize),
                proptest::collection::vec(-127i8..=127, kept as usize),
            );
            proptest::collection::vec(row, rows as usize).prop_map(move |rs| {
                let shape = if vector {
                    DeltaShape::Vector { len: cols }
                } else {
                    DeltaShape::Matrix { rows, cols }
                };
                DeltaTensor {
                    name: name.clone(),
                    dtype: BaseDtype::from_byte(dtype).unwrap(),
                    shape,
                    kept_per_row: kept,
                    scale_bits: rs.iter().map(|r| r.0).collect(),
                    columns: rs.iter().flat_map(|r| r.1.clone()).collect(),
                    values: rs.iter().flat_map(|r| r.2.clone()).collect(),
                }
            })
        })
    })
}

fn arb_payload() -> impl Strategy<Value = DeltaPayload> {
    proptest::collection::btree_set("[a-zA-Z0-9._-]{1,16}", 1..4).prop_flat_map(|names| {
        names
            .into_iter()
            .map(arb_tensor)
            .collect::<Vec<_>>()
            .prop_map(|tensors| DeltaPayload { tensors })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_pol_delta_5_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = DeltaPayload::decode(&bytes);
    }

    /// Random bytes behind a valid header reach the tensor and row checks.
    #[test]
    fn prop_pol_delta_5_random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut bytes = b"BLYD\x01\x00\x01\x00".to_vec();
        bytes.extend_from_slice(&body);
        if let Ok(p) = DeltaPayload::decode(&bytes) {
            prop_assert_eq!(p.encode().unwrap(), bytes);
        }
    }

    #[test]
    fn prop_pol_delta_5_round_trip(p in arb_payload()) {
        let bytes = p.encode().unwrap();
        let back = DeltaPayload::decode(&bytes).unwrap();
        prop_assert_eq!(&back, &p);
        prop_assert_eq!(back.encode().unwrap(), bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Every truncation is refused; every single-byte change is refused or
    /// decodes to a payload that re-encodes to exactly the changed bytes.
    #[test]
    fn prop_pol_delta_5_truncations_and_corruptions(p in arb_payload(), xor in 1u8..=255) {
        let bytes = p.encode().unwrap();
        for len in 0..bytes.len() {
            prop_assert!(DeltaPayload::decode(&bytes[..len]).is_err());
        }
        for i in 0..bytes.len() {
            let mut x = bytes.clone();
            x[i] ^= xor;
            if let Ok(q) = DeltaPayload::decode(&x) {
                prop_assert_eq!(q.encode().unwrap(), x);
            }
        }
    }
}
