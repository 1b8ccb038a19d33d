//! The delta payload vector (spec/pol.md POL-DELTA-*): a hand-built payload,
//! its bytes, POL-3 root and POL-4 CID, and what applying it to a given base
//! yields bit for bit (POL-DELTA-6), computed here by plain binary32
//! arithmetic. `gpu/tests/it/delta.rs` applies the same payload with
//! `blyan_gpu::delta::apply` and must get the same bits.

use blyan_state_machine::pol::delta::{
    BaseDtype, DeltaPayload, DeltaShape, DeltaTensor, payload_address,
};
use serde::{Deserialize, Serialize};

/// `golden/vectors/pol_delta_format.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaFormatVector {
    pub name: String,
    pub description: String,
    pub payload_hex: String,
    pub size_bytes: u64,
    pub merkle_root: String,
    pub cid: String,
    pub tensors: Vec<DeltaVectorTensor>,
}

/// One tensor: the decoded structure, the base it is applied to and the
/// result, both as the dtype's bits (row-major, integers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaVectorTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u32>,
    pub kept_per_row: u32,
    pub rows: Vec<DeltaVectorRow>,
    pub base_bits: Vec<u32>,
    pub applied_bits: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaVectorRow {
    pub scale_bits: String,
    /// Readable only: Rust's shortest round-trip text of the scale.
    pub scale: String,
    pub columns: Vec<u32>,
    pub values: Vec<i8>,
}

/// The payload of the vector: a bf16 matrix whose rows pin ties to even
/// (1 + 2^-8 -> 1; 1.0078125 + 2^-8 -> 1.015625), a zero scale, a -0 base
/// rewritten to +0, and an f32 vector.
pub fn delta_format_payload() -> DeltaPayload {
    DeltaPayload {
        tensors: vec![
            DeltaTensor {
                name: "model.layers.0.mlp.down_proj.weight".into(),
                dtype: BaseDtype::Bf16,
                shape: DeltaShape::Matrix { rows: 3, cols: 8 },
                kept_per_row: 3,
                scale_bits: vec![0x3b80_0000, 0, 0x3c23_d70a],
                columns: vec![0, 1, 6, 2, 3, 7, 0, 4, 7],
                values: vec![1, 1, -127, 0, 5, -5, -127, 64, 3],
            },
            DeltaTensor {
                name: "model.layers.0.post_attention_layernorm.weight".into(),
                dtype: BaseDtype::F32,
                shape: DeltaShape::Vector { len: 5 },
                kept_per_row: 2,
                scale_bits: vec![0x3a83_126f],
                columns: vec![1, 4],
                values: vec![127, -1],
            },
        ],
    }
}

/// The bases, as bits of each tensor's dtype.
fn bases() -> Vec<Vec<u32>> {
    vec![
        vec![
            0x3f80, 0x3f81, 0xbf00, 0x3e4c, 0x0000, 0x3c23, 0xc120, 0x4049, //
            0x3f80, 0x3f80, 0x8000, 0xbe4c, 0x3f00, 0x3f00, 0x3f00, 0x4000, //
            0x3dcc, 0xbdcc, 0x3f80, 0xbf80, 0x42c8, 0x0001, 0x7f7f, 0xc2c8,
        ],
        vec![
            0x3f80_0000,
            0x3f80_0000,
            0x0000_0001,
            0xbf80_0000,
            0x4049_0fdb,
        ],
    ]
}

/// bf16 bits of a finite f32, rounding to nearest, ties to even.
fn bf16_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
}

/// POL-DELTA-6 in plain binary32 arithmetic (Rust never fuses `*` and `+`).
fn apply_reference(t: &DeltaTensor, base: &[u32]) -> Vec<u32> {
    let cols = t.shape.cols() as usize;
    let mut out = base.to_vec();
    for r in 0..t.shape.rows() {
        let (scale_bits, columns, values) = t.row(r);
        let scale = f32::from_bits(scale_bits);
        for (&c, &q) in columns.iter().zip(values) {
            let i = r as usize * cols + c as usize;
            let head = match t.dtype {
                BaseDtype::F32 => f32::from_bits(out[i]),
                BaseDtype::Bf16 => f32::from_bits(out[i] << 16),
                BaseDtype::F16 => unreachable!("the vector has no f16 tensor"),
            };
            let w = head + scale * f32::from(q);
            assert!(w.is_finite(), "the vector's results are finite");
            out[i] = match t.dtype {
                BaseDtype::F32 => w.to_bits(),
                BaseDtype::Bf16 => bf16_bits(w),
                BaseDtype::F16 => unreachable!(),
            };
        }
    }
    out
}

/// Builds the vector from [`delta_format_payload`].
pub fn delta_format_vector() -> DeltaFormatVector {
    let payload = delta_format_payload();
    let bytes = payload.encode().expect("the vector's payload is valid");
    let address = payload_address(&bytes);
    let tensors = payload
        .tensors
        .iter()
        .zip(bases())
        .map(|(t, base)| DeltaVectorTensor {
            name: t.name.clone(),
            dtype: t.dtype.name().into(),
            shape: t.shape.dims(),
            kept_per_row: t.kept_per_row,
            rows: (0..t.shape.rows())
                .map(|r| {
                    let (bits, columns, values) = t.row(r);
                    DeltaVectorRow {
                        scale_bits: format!("{bits:#010x}"),
                        scale: format!("{:e}", f32::from_bits(bits)),
                        columns: columns.to_vec(),
                        values: values.to_vec(),
                    }
                })
                .collect(),
            applied_bits: apply_reference(t, &base),
            base_bits: base,
        })
        .collect();
    DeltaFormatVector {
        name: "pol_delta_format".into(),
        description: "POL-DELTA-1..6: an INT8 sparse delta payload (bf16 matrix, f32 vector), its bytes, Merkle root, CID, decoded rows, and the bits of base + dequant(delta)".into(),
        payload_hex: hex::encode(&bytes),
        size_bytes: address.size_bytes,
        merkle_root: hex::encode(address.merkle_root),
        cid: address.cid,
        tensors,
    }
}
