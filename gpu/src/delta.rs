//! Delta payloads in floats: compression of a dense update into the INT8
//! sparse layout, and application `head + dequant(delta)` (spec/pol.md
//! POL-DELTA-6, POL-DELTA-7).
//!
//! The layout, its bounds and its decoder are the core's
//! (`blyan_state_machine::pol::delta`, integers only); this module turns
//! floats into that structure and back.
//!
//! What it does not do: train (the update comes from the caller), or decide
//! whether a delta is good (validators measure its loss).

use std::collections::BTreeMap;

use blyan_state_machine::pol::delta::{
    BaseDtype, DeltaPayload, DeltaShape, DeltaTensor, MAX_DELTA_DIM,
};
use tch::{Device, Kind, Tensor};

use crate::error::{GpuError, Result};

/// One million: densities are in parts per million.
pub const DENSITY_PPM_ONE: u32 = 1_000_000;

/// A tensor's dense update and the dtype of the base it will apply to.
pub struct NamedUpdate<'a> {
    pub name: &'a str,
    /// 1-D or 2-D, any float kind, any device; finite.
    pub update: &'a Tensor,
    /// The base tensor's kind: `Float`, `BFloat16` or `Half`.
    pub base_kind: Kind,
}

/// POL-DELTA-7: entries kept per row, `max(1, ceil(density · cols))` capped
/// at `cols`, with the density in ppm.
pub fn kept_per_row(density_ppm: u32, cols: u32) -> u32 {
    let k = (u64::from(density_ppm) * u64::from(cols)).div_ceil(u64::from(DENSITY_PPM_ONE));
    k.clamp(1, u64::from(cols)) as u32
}

/// The payload dtype of a tch kind.
pub fn base_dtype(kind: Kind) -> Result<BaseDtype> {
    match kind {
        Kind::Float => Ok(BaseDtype::F32),
        Kind::BFloat16 => Ok(BaseDtype::Bf16),
        Kind::Half => Ok(BaseDtype::F16),
        other => Err(GpuError::Invalid(format!(
            "delta base dtype {other:?} (f32, bf16, f16)"
        ))),
    }
}

fn kind_of(dtype: BaseDtype) -> Kind {
    match dtype {
        BaseDtype::F32 => Kind::Float,
        BaseDtype::Bf16 => Kind::BFloat16,
        BaseDtype::F16 => Kind::Half,
    }
}

/// POL-DELTA-7: compresses dense updates into a payload (tensors sorted by
/// name). `density_ppm` in 1..=10^6.
pub fn compress(updates: &[NamedUpdate<'_>], density_ppm: u32) -> Result<DeltaPayload> {
    if !(1..=DENSITY_PPM_ONE).contains(&density_ppm) {
        return Err(GpuError::Invalid(format!(
            "delta density {density_ppm} ppm, not 1..=1000000"
        )));
    }
    let mut tensors = updates
        .iter()
        .map(|u| compress_tensor(u, density_ppm))
        .collect::<Result<Vec<_>>>()?;
    tensors.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let payload = DeltaPayload { tensors };
    // The encoder's checks (names, duplicates, bounds) apply to what we built.
    payload.encode()?;
    Ok(payload)
}

/// [`compress`], then the payload's bytes (POL-DELTA-1..5).
pub fn compress_to_bytes(updates: &[NamedUpdate<'_>], density_ppm: u32) -> Result<Vec<u8>> {
    Ok(compress(updates, density_ppm)?.encode()?)
}

fn dim_u32(name: &str, d: i64) -> Result<u32> {
    u32::try_from(d)
        .ok()
        .filter(|d| (1..=MAX_DELTA_DIM).contains(d))
        .ok_or_else(|| {
            GpuError::Invalid(format!(
                "delta tensor {name}: dimension {d} not in 1..={MAX_DELTA_DIM}"
            ))
        })
}

fn compress_tensor(u: &NamedUpdate<'_>, density_ppm: u32) -> Result<DeltaTensor> {
    let dtype = base_dtype(u.base_kind)?;
    let shape = match u.update.size().as_slice() {
        [len] => DeltaShape::Vector {
            len: dim_u32(u.name, *len)?,
        },
        [rows, cols] => DeltaShape::Matrix {
            rows: dim_u32(u.name, *rows)?,
            cols: dim_u32(u.name, *cols)?,
        },
        other => {
            return Err(GpuError::Invalid(format!(
                "delta tensor {}: shape {other:?} is not 1-D or 2-D",
                u.name
            )));
        }
    };
    let (rows, cols) = (shape.rows() as usize, shape.cols() as usize);
    let flat = u
        .update
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .flatten(0, -1);
    let data = Vec::<f32>::try_from(&flat)?;
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(GpuError::DeltaNonFinite {
            name: u.name.into(),
            row: i / cols,
            column: i % cols,
        });
    }
    let k = kept_per_row(density_ppm, cols as u32) as usize;
    // Rows are independent: split them over threads; the result does not
    // depend on the split.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows);
    let rows_per_thread = rows.div_ceil(threads);
    let parts: Vec<(Vec<u32>, Vec<u32>, Vec<i8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = data
            .chunks(rows_per_thread * cols)
            .map(|chunk| s.spawn(move || compress_rows(chunk, cols, k)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("compress_rows does not panic"))
            .collect()
    });
    let mut t = DeltaTensor {
        name: u.name.into(),
        dtype,
        shape,
        kept_per_row: k as u32,
        scale_bits: Vec::with_capacity(rows),
        columns: Vec::with_capacity(rows * k),
        values: Vec::with_capacity(rows * k),
    };
    for (scales, columns, values) in parts {
        t.scale_bits.extend(scales);
        t.columns.extend(columns);
        t.values.extend(values);
    }
    Ok(t)
}

/// POL-DELTA-7 for whole rows of `cols` finite values.
fn compress_rows(data: &[f32], cols: usize, k: usize) -> (Vec<u32>, Vec<u32>, Vec<i8>) {
    let rows = data.len() / cols;
    let (mut scales, mut columns, mut values) = (
        Vec::with_capacity(rows),
        Vec::with_capacity(rows * k),
        Vec::with_capacity(rows * k),
    );
    let mut order: Vec<u32> = Vec::with_capacity(cols);
    for row in data.chunks_exact(cols) {
        order.clear();
        order.extend(0..cols as u32);
        if k < cols {
            // Larger magnitude first; ties to the lower column.
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                row[b as usize]
                    .abs()
                    .total_cmp(&row[a as usize].abs())
                    .then(a.cmp(&b))
            });
        }
        let kept = &mut order[..k];
        kept.sort_unstable();
        let max = kept
            .iter()
            .map(|&c| row[c as usize].abs())
            .fold(0.0f32, f32::max);
        let scale = max / 127.0;
        scales.push(scale.to_bits());
        columns.extend_from_slice(kept);
        values.extend(kept.iter().map(|&c| {
            if scale == 0.0 {
                0
            } else {
                // f32::round is half away from zero.
                (row[c as usize] / scale).round().clamp(-127.0, 127.0) as i8
            }
        }));
    }
    (scales, columns, values)
}

/// POL-DELTA-6: one tensor of the head with `delta` applied (a new tensor;
/// `base` is not modified). Errors if dtype or shape differ, or if a result
/// is not finite in the base's dtype.
pub fn apply_tensor(base: &Tensor, delta: &DeltaTensor) -> Result<Tensor> {
    let kind = kind_of(delta.dtype);
    if base.kind() != kind {
        return Err(GpuError::DeltaNotApplicable {
            name: delta.name.clone(),
            reason: format!(
                "base is {:?}, the delta says {}",
                base.kind(),
                delta.dtype.name()
            ),
        });
    }
    let dims: Vec<i64> = delta.shape.dims().into_iter().map(i64::from).collect();
    if base.size() != dims {
        return Err(GpuError::DeltaNotApplicable {
            name: delta.name.clone(),
            reason: format!("base has shape {:?}, the delta {dims:?}", base.size()),
        });
    }
    let cols = delta.shape.cols() as usize;
    let k = delta.kept_per_row as usize;
    let mut index = Vec::with_capacity(delta.columns.len());
    let mut d = Vec::with_capacity(delta.columns.len());
    for r in 0..delta.shape.rows() {
        let (bits, columns, values) = delta.row(r);
        let scale = f32::from_bits(bits);
        for (&c, &q) in columns.iter().zip(values) {
            index.push((r as usize * cols + c as usize) as i64);
            // One binary32 rounding; Rust never fuses this with the add below.
            d.push(scale * f32::from(q));
        }
    }
    debug_assert_eq!(index.len(), delta.shape.rows() as usize * k);
    let device = base.device();
    let index = Tensor::from_slice(&index).to_device(device);
    let d = Tensor::from_slice(&d).to_device(device);
    let flat = base.contiguous().flatten(0, -1);
    // f32(head) is exact; the add rounds once to nearest even.
    let w = flat.index_select(0, &index).to_kind(Kind::Float) + &d;
    let converted = w.to_kind(kind);
    let finite = converted.isfinite().to_device(Device::Cpu);
    if !bool::try_from(finite.all())? {
        let finite = Vec::<bool>::try_from(&finite)?;
        let j = finite.iter().position(|f| !f).expect("one is not finite");
        return Err(GpuError::DeltaNonFinite {
            name: delta.name.clone(),
            row: j / k,
            column: delta.columns[j] as usize,
        });
    }
    let mut out = flat.copy();
    let _ = out.f_index_put_(&[Some(index)], &converted, false)?;
    Ok(out.reshape(&dims))
}

/// POL-DELTA-6: the head's tensors with the payload applied. Every tensor
/// the payload names must be in `head`; the others are returned unchanged
/// (sharing storage with `head`).
pub fn apply(
    head: &BTreeMap<String, Tensor>,
    payload: &DeltaPayload,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out: BTreeMap<String, Tensor> = head
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    for delta in &payload.tensors {
        let base = head
            .get(&delta.name)
            .ok_or_else(|| GpuError::DeltaNotApplicable {
                name: delta.name.clone(),
                reason: "the head has no tensor of that name".into(),
            })?;
        out.insert(delta.name.clone(), apply_tensor(base, delta)?);
    }
    Ok(out)
}

/// Decodes untrusted payload bytes with the core's bounded decoder, then
/// [`apply`]s them.
pub fn apply_bytes(
    head: &BTreeMap<String, Tensor>,
    payload: &[u8],
) -> Result<BTreeMap<String, Tensor>> {
    apply(head, &DeltaPayload::decode(payload)?)
}
