//! spec/pol.md POL-DELTA-6/7: compression and application of delta payloads,
//! checked against a reference written here with plain f32 loops (a full
//! sort instead of selection, f64 rounding, hand-written bf16/f16 rounding),
//! and against the golden vector's bits.

use std::collections::BTreeMap;

use blyan_gpu::GpuError;
use blyan_gpu::delta::{
    NamedUpdate, apply, apply_bytes, compress, compress_to_bytes, kept_per_row,
};
use blyan_gpu::rng::SplitMix64;
use blyan_state_machine::pol::delta::{DeltaError, DeltaPayload};
use tch::{Device, Kind, Tensor};

/// bf16 bits of a finite f32, to nearest, ties to even.
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// f16 bits of a finite f32, to nearest, ties to even (overflow to infinity).
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = b & 0x7fff_ffff;
    if a >= 0x477f_f000 {
        return sign | 0x7c00;
    }
    if a < 0x3880_0000 {
        // Below 2^-14: a multiple of 2^-24 (subnormal), exact scaling by 2^24.
        let m = (f32::from_bits(a) * 16_777_216.0).round_ties_even() as u16;
        return sign | m;
    }
    let a = a - (112 << 23);
    sign | ((a + 0x0fff + ((a >> 13) & 1)) >> 13) as u16
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = i32::from((h >> 10) & 0x1f);
    let m = f32::from(h & 0x3ff);
    sign * if e == 0 {
        m * 2f32.powi(-24)
    } else {
        (1.0 + m / 1024.0) * 2f32.powi(e - 15)
    }
}

/// The reference compressor (POL-DELTA-7) for one row-major matrix.
fn reference_compress(
    x: &[f32],
    rows: usize,
    cols: usize,
    density_ppm: u64,
) -> Vec<(f32, Vec<usize>, Vec<i8>)> {
    // The smallest k >= 1 with k / cols >= density.
    let k = (1..=cols)
        .find(|&k| k as u64 * 1_000_000 >= density_ppm * cols as u64)
        .unwrap_or(cols);
    (0..rows)
        .map(|r| {
            let row = &x[r * cols..(r + 1) * cols];
            let mut order: Vec<usize> = (0..cols).collect();
            order.sort_by(|&a, &b| {
                row[b]
                    .abs()
                    .partial_cmp(&row[a].abs())
                    .unwrap()
                    .then(a.cmp(&b))
            });
            let mut kept = order[..k].to_vec();
            kept.sort();
            let mut max = 0f32;
            for &c in &kept {
                if row[c].abs() > max {
                    max = row[c].abs();
                }
            }
            let scale = max / 127.0;
            let q = kept
                .iter()
                .map(|&c| {
                    if scale == 0.0 {
                        return 0;
                    }
                    let y = f64::from(row[c] / scale);
                    let r = if y >= 0.0 {
                        (y + 0.5).floor()
                    } else {
                        (y - 0.5).ceil()
                    };
                    r.clamp(-127.0, 127.0) as i8
                })
                .collect();
            (scale, kept, q)
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Dt {
    F32,
    Bf16,
    F16,
}

/// head + dequant(delta) (POL-DELTA-6) elementwise; results as the dtype's bits.
fn reference_apply(
    base_bits: &[u32],
    dt: Dt,
    cols: usize,
    rows: &[(f32, Vec<usize>, Vec<i8>)],
) -> Vec<u32> {
    let mut out = base_bits.to_vec();
    for (r, (scale, kept, q)) in rows.iter().enumerate() {
        for (&c, &q) in kept.iter().zip(q) {
            let i = r * cols + c;
            let head = match dt {
                Dt::F32 => f32::from_bits(out[i]),
                Dt::Bf16 => f32::from_bits(out[i] << 16),
                Dt::F16 => f16_to_f32(out[i] as u16),
            };
            let d = *scale * q as f32;
            let w = head + d;
            out[i] = match dt {
                Dt::F32 => w.to_bits(),
                Dt::Bf16 => u32::from(bf16_bits(w)),
                Dt::F16 => u32::from(f16_bits(w)),
            };
        }
    }
    out
}

fn kind(dt: Dt) -> Kind {
    match dt {
        Dt::F32 => Kind::Float,
        Dt::Bf16 => Kind::BFloat16,
        Dt::F16 => Kind::Half,
    }
}

/// A tensor's elements as the bits of its dtype.
fn bits_of(t: &Tensor) -> Vec<u32> {
    let flat = t.contiguous().flatten(0, -1);
    match t.kind() {
        Kind::Float => Vec::<f32>::try_from(&flat)
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect(),
        Kind::BFloat16 | Kind::Half => Vec::<i16>::try_from(&flat.view_dtype(Kind::Int16))
            .unwrap()
            .into_iter()
            .map(|v| u32::from(v as u16))
            .collect(),
        k => panic!("{k:?}"),
    }
}

fn tensor_of_bits(bits: &[u32], dt: Dt, dims: &[i64]) -> Tensor {
    match dt {
        Dt::F32 => Tensor::from_slice(&bits.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>()),
        Dt::Bf16 | Dt::F16 => {
            Tensor::from_slice(&bits.iter().map(|&b| b as u16 as i16).collect::<Vec<_>>())
                .view_dtype(kind(dt))
        }
    }
    .reshape(dims)
}

/// Values with many exact magnitude ties (multiples of 1/64 in [-1, 1]), a
/// zero row, and a row with one huge entry.
fn tied_update(rng: &mut SplitMix64, rows: usize, cols: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..rows * cols)
        .map(|_| ((rng.next_u64() % 129) as f32 - 64.0) / 64.0)
        .collect();
    x[cols..2 * cols].fill(0.0);
    x[2 * cols + 3] = 1.0e4;
    x
}

fn normal(rng: &mut SplitMix64, n: usize, sd: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.next_normal() * sd) as f32).collect()
}

#[test]
fn pol_delta_7_kept_per_row_is_the_ceiling_of_the_density() {
    assert_eq!(kept_per_row(10_000, 12_288), 123);
    assert_eq!(kept_per_row(5_000, 12_288), 62);
    assert_eq!(kept_per_row(1_000, 12_288), 13);
    assert_eq!(kept_per_row(50_000, 100), 5);
    assert_eq!(kept_per_row(1, 5), 1);
    assert_eq!(kept_per_row(1_000_000, 5), 5);
}

/// compress -> encode -> decode -> apply equals the reference, bit for bit,
/// on f32, bf16 and f16 bases, at several densities.
#[test]
fn pol_delta_6_7_round_trip_matches_the_reference() {
    let mut rng = SplitMix64::new(14);
    let (rows, cols) = (7usize, 97usize);
    let matrix = tied_update(&mut rng, rows, cols);
    let vector = normal(&mut rng, 41, 0.02);
    let m = Tensor::from_slice(&matrix).reshape([rows as i64, cols as i64]);
    let v = Tensor::from_slice(&vector);
    for density_ppm in [1u32, 30_000, 250_000, 1_000_000] {
        for dt in [Dt::F32, Dt::Bf16, Dt::F16] {
            // Names deliberately out of order: the payload sorts them.
            let updates = [
                NamedUpdate {
                    name: "z.weight",
                    update: &m,
                    base_kind: kind(dt),
                },
                NamedUpdate {
                    name: "a.norm",
                    update: &v,
                    base_kind: Kind::Float,
                },
            ];
            let bytes = compress_to_bytes(&updates, density_ppm).unwrap();
            let payload = DeltaPayload::decode(&bytes).unwrap();
            assert_eq!(payload, compress(&updates, density_ppm).unwrap());
            assert_eq!(payload.tensors[0].name, "a.norm");

            let ref_m = reference_compress(&matrix, rows, cols, u64::from(density_ppm));
            let ref_v = reference_compress(&vector, 1, vector.len(), u64::from(density_ppm));
            let t = payload.tensor("z.weight").unwrap();
            for (r, (scale, kept, q)) in ref_m.iter().enumerate() {
                let (bits, columns, values) = t.row(r as u32);
                assert_eq!(bits, scale.to_bits(), "row {r} at {density_ppm} ppm");
                assert_eq!(
                    columns.iter().map(|&c| c as usize).collect::<Vec<_>>(),
                    *kept,
                    "row {r}"
                );
                assert_eq!(values, &q[..], "row {r}");
            }

            let base_m: Vec<u32> = {
                let b = Tensor::from_slice(&normal(&mut rng, rows * cols, 1.0))
                    .reshape([rows as i64, cols as i64])
                    .to_kind(kind(dt));
                bits_of(&b)
            };
            let base_v: Vec<u32> = normal(&mut rng, vector.len(), 1.0)
                .into_iter()
                .map(f32::to_bits)
                .collect();
            let mut head = BTreeMap::new();
            head.insert(
                "z.weight".to_string(),
                tensor_of_bits(&base_m, dt, &[rows as i64, cols as i64]),
            );
            head.insert(
                "a.norm".to_string(),
                tensor_of_bits(&base_v, Dt::F32, &[vector.len() as i64]),
            );
            head.insert("untouched".to_string(), Tensor::from_slice(&[1.5f32, -2.0]));
            let new = apply_bytes(&head, &bytes).unwrap();
            assert_eq!(
                bits_of(&new["z.weight"]),
                reference_apply(&base_m, dt, cols, &ref_m),
                "{dt:?} {density_ppm}"
            );
            assert_eq!(
                bits_of(&new["a.norm"]),
                reference_apply(&base_v, Dt::F32, vector.len(), &ref_v)
            );
            assert_eq!(bits_of(&new["untouched"]), bits_of(&head["untouched"]));
            assert_eq!(new["z.weight"].kind(), kind(dt));
            // The head itself is not modified.
            assert_eq!(bits_of(&head["z.weight"]), base_m);
        }
    }
}

/// At full density, dequant(compress(x)) is within half a quantisation step of x.
#[test]
fn pol_delta_7_full_density_reconstructs_within_half_a_step() {
    let mut rng = SplitMix64::new(7);
    let x = normal(&mut rng, 16 * 300, 0.01);
    let t = Tensor::from_slice(&x).reshape([16, 300]);
    let payload = compress(
        &[NamedUpdate {
            name: "w",
            update: &t,
            base_kind: Kind::Float,
        }],
        1_000_000,
    )
    .unwrap();
    let mut head = BTreeMap::new();
    head.insert(
        "w".to_string(),
        Tensor::zeros([16, 300], (Kind::Float, Device::Cpu)),
    );
    let dq = Vec::<f32>::try_from(&apply(&head, &payload).unwrap()["w"].flatten(0, -1)).unwrap();
    for r in 0..16 {
        let scale = f32::from_bits(payload.tensors[0].row(r).0);
        assert!(scale > 0.0);
        for c in 0..300 {
            let i = r as usize * 300 + c;
            assert!(
                (dq[i] - x[i]).abs() <= scale * 0.5 * 1.0001,
                "{r},{c}: {} vs {}",
                dq[i],
                x[i]
            );
        }
    }
}

/// The golden vector (golden/vectors/pol_delta_format.json): its payload
/// applied here gives the recorded bits.
#[test]
fn pol_delta_6_golden_vector_bits() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../golden/vectors/pol_delta_format.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let bytes = hex::decode(v["payload_hex"].as_str().unwrap()).unwrap();
    let mut head = BTreeMap::new();
    let mut expected = BTreeMap::new();
    for t in v["tensors"].as_array().unwrap() {
        let dt = match t["dtype"].as_str().unwrap() {
            "f32" => Dt::F32,
            "bf16" => Dt::Bf16,
            "f16" => Dt::F16,
            d => panic!("{d}"),
        };
        let dims: Vec<i64> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_i64().unwrap())
            .collect();
        let bits = |k: &str| -> Vec<u32> {
            t[k].as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u32)
                .collect()
        };
        let name = t["name"].as_str().unwrap().to_string();
        head.insert(name.clone(), tensor_of_bits(&bits("base_bits"), dt, &dims));
        expected.insert(name, bits("applied_bits"));
    }
    let new = apply_bytes(&head, &bytes).unwrap();
    assert_eq!(expected.len(), 2);
    for (name, bits) in expected {
        assert_eq!(bits_of(&new[&name]), bits, "{name}");
    }
}

#[test]
fn pol_delta_6_inapplicable_deltas_are_errors() {
    let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).reshape([2, 2]);
    let payload = compress(
        &[NamedUpdate {
            name: "w",
            update: &x,
            base_kind: Kind::BFloat16,
        }],
        1_000_000,
    )
    .unwrap();
    let head_of = |t: Tensor| BTreeMap::from([("w".to_string(), t)]);
    // Wrong dtype, wrong shape, missing tensor.
    let e = apply(
        &head_of(Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))),
        &payload,
    )
    .unwrap_err();
    assert!(
        matches!(e, GpuError::DeltaNotApplicable { ref name, .. } if name == "w"),
        "{e}"
    );
    let e = apply(
        &head_of(Tensor::zeros([4], (Kind::BFloat16, Device::Cpu))),
        &payload,
    )
    .unwrap_err();
    assert!(matches!(e, GpuError::DeltaNotApplicable { .. }), "{e}");
    let e = apply(
        &BTreeMap::from([(
            "v".to_string(),
            Tensor::zeros([2, 2], (Kind::BFloat16, Device::Cpu)),
        )]),
        &payload,
    )
    .unwrap_err();
    assert!(matches!(e, GpuError::DeltaNotApplicable { .. }), "{e}");
    // f16 overflow: the largest f16 (65504) plus 20 rounds to infinity.
    let big = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 20.0]).reshape([2, 2]);
    let payload = compress(
        &[NamedUpdate {
            name: "w",
            update: &big,
            base_kind: Kind::Half,
        }],
        1_000_000,
    )
    .unwrap();
    let max = tensor_of_bits(&[0, 0, 0, 0x7bff], Dt::F16, &[2, 2]);
    let e = apply(&head_of(max), &payload).unwrap_err();
    assert!(
        matches!(
            e,
            GpuError::DeltaNonFinite {
                row: 1,
                column: 1,
                ..
            }
        ),
        "{e}"
    );
    // Malformed bytes are the decoder's clear error.
    let e = apply_bytes(&BTreeMap::new(), b"BLYD\x01\x01\x01\x00").unwrap_err();
    assert!(
        matches!(e, GpuError::Delta(DeltaError::UnsupportedLayout(1))),
        "{e}"
    );
}

#[test]
fn pol_delta_7_bad_updates_are_errors() {
    let nan = Tensor::from_slice(&[0.5f32, f32::NAN, 2.0, 0.25]).reshape([2, 2]);
    let e = compress(
        &[NamedUpdate {
            name: "w",
            update: &nan,
            base_kind: Kind::Float,
        }],
        10_000,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            GpuError::DeltaNonFinite {
                row: 0,
                column: 1,
                ..
            }
        ),
        "{e}"
    );
    let ok = Tensor::from_slice(&[0.5f32, 1.0]);
    let e = compress(
        &[NamedUpdate {
            name: "w",
            update: &ok,
            base_kind: Kind::Int64,
        }],
        10_000,
    )
    .unwrap_err();
    assert!(matches!(e, GpuError::Invalid(_)), "{e}");
    let e = compress(
        &[NamedUpdate {
            name: "w",
            update: &ok,
            base_kind: Kind::Float,
        }],
        0,
    )
    .unwrap_err();
    assert!(matches!(e, GpuError::Invalid(_)), "{e}");
    let cube = Tensor::zeros([2, 2, 2], (Kind::Float, Device::Cpu));
    let e = compress(
        &[NamedUpdate {
            name: "w",
            update: &cube,
            base_kind: Kind::Float,
        }],
        10_000,
    )
    .unwrap_err();
    assert!(matches!(e, GpuError::Invalid(_)), "{e}");
    let dup = [
        NamedUpdate {
            name: "w",
            update: &ok,
            base_kind: Kind::Float,
        },
        NamedUpdate {
            name: "w",
            update: &ok,
            base_kind: Kind::Float,
        },
    ];
    let e = compress(&dup, 10_000).unwrap_err();
    assert!(
        matches!(
            e,
            GpuError::Delta(DeltaError::NamesNotIncreasing { tensor: 1 })
        ),
        "{e}"
    );
    let e = compress(
        &[NamedUpdate {
            name: "a b",
            update: &ok,
            base_kind: Kind::Float,
        }],
        10_000,
    )
    .unwrap_err();
    assert!(
        matches!(e, GpuError::Delta(DeltaError::BadName { .. })),
        "{e}"
    );
}
