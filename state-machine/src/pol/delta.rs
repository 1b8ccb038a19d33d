//! Delta payloads: the INT8 + sparse layout of a target's weight update
//! (spec/pol.md, POL-DELTA-*).
//!
//! What it does: decodes untrusted payload bytes into a [`DeltaPayload`]
//! (bounded, canonical, never panicking, allocating only after checking that
//! the bytes can hold what a header claims) and encodes a [`DeltaPayload`]
//! back, refusing every structure the decoder would refuse (POL-DELTA-5).
//!
//! What it deliberately does not do: floats. Scales stay the raw bits of an
//! IEEE 754 binary32; dequantisation, compression and application live in
//! `blyan-gpu` (`gpu/src/delta.rs`, POL-DELTA-6/7). The content address of a
//! payload is the one every PoL payload has ([`super::payload_merkle_root`],
//! [`super::cid_v1_raw_sha256`]; POL-DELTA-1).

use super::{cid_v1_raw_sha256, payload_merkle_root};
use crate::types::Hash32;

/// POL-DELTA-2: the first four bytes of every delta payload ("BLYD").
pub const DELTA_MAGIC: [u8; 4] = *b"BLYD";
/// POL-DELTA-2: the only format version.
pub const DELTA_FORMAT_VERSION: u8 = 1;
/// POL-DELTA-2: layout byte of INT8 sparse rows.
pub const LAYOUT_INT8_SPARSE: u8 = 0;
/// POL-DELTA-2: layout byte reserved for LoRA factors (refused until specified).
pub const LAYOUT_LORA_RESERVED: u8 = 1;
/// POL-DELTA-1: the largest payload, in bytes.
pub const MAX_DELTA_PAYLOAD_BYTES: usize = 1 << 28;
/// POL-DELTA-2: the most tensors in one payload.
pub const MAX_DELTA_TENSORS: usize = 64;
/// POL-DELTA-3: the longest tensor name, in bytes.
pub const MAX_DELTA_NAME_BYTES: usize = 128;
/// POL-DELTA-3: the largest `rows` or `cols`.
pub const MAX_DELTA_DIM: u32 = 1 << 20;
/// POL-DELTA-4: the largest scale bits (`f32::MAX`); above it are +inf, NaNs
/// and every negative number.
pub const MAX_SCALE_BITS: u32 = 0x7f7f_ffff;
/// POL-DELTA-4: the longest index varint, in bytes.
const MAX_VARINT_BYTES: usize = 5;

/// Why a delta payload was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("POL-DELTA-1: payload of {got} bytes exceeds the {max}-byte cap")]
    TooLarge { got: usize, max: usize },
    #[error("POL-DELTA-5: payload ends at byte {offset}, inside {what}")]
    Truncated { offset: usize, what: &'static str },
    #[error("POL-DELTA-2: not a delta payload (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("POL-DELTA-2: unsupported format version {0}")]
    UnsupportedVersion(u8),
    #[error("POL-DELTA-2: unsupported layout {0} (0: INT8 sparse; 1: LoRA factors, reserved)")]
    UnsupportedLayout(u8),
    #[error("POL-DELTA-2: {got} tensors, not 1..={max}")]
    TensorCount { got: usize, max: usize },
    #[error("POL-DELTA-3: tensor {tensor}: name {reason}")]
    BadName { tensor: usize, reason: &'static str },
    #[error(
        "POL-DELTA-3: tensor {tensor}: name is not after the previous one (duplicate or out of order)"
    )]
    NamesNotIncreasing { tensor: usize },
    #[error("POL-DELTA-3: tensor {tensor}: unknown dtype byte {byte}")]
    UnknownDtype { tensor: usize, byte: u8 },
    #[error("POL-DELTA-3: tensor {tensor}: rank {rank}, not 1 or 2")]
    BadRank { tensor: usize, rank: u8 },
    #[error("POL-DELTA-3: tensor {tensor}: shape {rows} x {cols} outside the bounds")]
    BadShape { tensor: usize, rows: u32, cols: u32 },
    #[error("POL-DELTA-3: tensor {tensor}: kept_per_row {kept} not in 1..={cols}")]
    BadKeptPerRow { tensor: usize, kept: u32, cols: u32 },
    #[error(
        "POL-DELTA-5: tensor {tensor}: its rows need at least {needed} bytes, {remaining} are left"
    )]
    RowsExceedPayload {
        tensor: usize,
        needed: u64,
        remaining: usize,
    },
    #[error(
        "POL-DELTA-4: tensor {tensor} row {row}: scale bits {bits:#010x} are not a finite non-negative f32"
    )]
    BadScale { tensor: usize, row: u32, bits: u32 },
    #[error("POL-DELTA-4: varint at byte {offset} is not minimal")]
    NonMinimalVarint { offset: usize },
    #[error("POL-DELTA-4: varint at byte {offset} exceeds 32 bits")]
    VarintOverflow { offset: usize },
    #[error(
        "POL-DELTA-4: tensor {tensor} row {row}: column {column} is not below {cols} or not increasing"
    )]
    BadColumn {
        tensor: usize,
        row: u32,
        column: u64,
        cols: u32,
    },
    #[error("POL-DELTA-4: tensor {tensor} row {row}: value -128 (values are in [-127, 127])")]
    ValueOutOfRange { tensor: usize, row: u32 },
    #[error("POL-DELTA-5: {trailing} trailing bytes after the last tensor")]
    TrailingBytes { trailing: usize },
    #[error("POL-DELTA-5: tensor {tensor}: {reason}")]
    Inconsistent { tensor: usize, reason: &'static str },
}

/// POL-DELTA-3: the dtype of the base tensor a delta applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BaseDtype {
    F32,
    Bf16,
    F16,
}

impl BaseDtype {
    pub fn byte(self) -> u8 {
        match self {
            BaseDtype::F32 => 0,
            BaseDtype::Bf16 => 1,
            BaseDtype::F16 => 2,
        }
    }

    pub fn from_byte(byte: u8) -> Option<BaseDtype> {
        match byte {
            0 => Some(BaseDtype::F32),
            1 => Some(BaseDtype::Bf16),
            2 => Some(BaseDtype::F16),
            _ => None,
        }
    }

    /// The name used in JSON vectors and messages.
    pub fn name(self) -> &'static str {
        match self {
            BaseDtype::F32 => "f32",
            BaseDtype::Bf16 => "bf16",
            BaseDtype::F16 => "f16",
        }
    }
}

/// POL-DELTA-3: a tensor's shape. A vector is one row of `len` columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaShape {
    Vector { len: u32 },
    Matrix { rows: u32, cols: u32 },
}

impl DeltaShape {
    pub fn rows(self) -> u32 {
        match self {
            DeltaShape::Vector { .. } => 1,
            DeltaShape::Matrix { rows, .. } => rows,
        }
    }

    pub fn cols(self) -> u32 {
        match self {
            DeltaShape::Vector { len } => len,
            DeltaShape::Matrix { cols, .. } => cols,
        }
    }

    /// The tensor's dimensions, as a checkpoint lists them.
    pub fn dims(self) -> Vec<u32> {
        match self {
            DeltaShape::Vector { len } => vec![len],
            DeltaShape::Matrix { rows, cols } => vec![rows, cols],
        }
    }

    fn rank(self) -> u8 {
        match self {
            DeltaShape::Vector { .. } => 1,
            DeltaShape::Matrix { .. } => 2,
        }
    }
}

/// The update of one named tensor (POL-DELTA-3/4): `kept_per_row` entries in
/// every row, stored row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaTensor {
    pub name: String,
    pub dtype: BaseDtype,
    pub shape: DeltaShape,
    pub kept_per_row: u32,
    /// One per row: the bits of a finite, non-negative binary32.
    pub scale_bits: Vec<u32>,
    /// `rows · kept_per_row` column indices, strictly increasing within a row.
    pub columns: Vec<u32>,
    /// `rows · kept_per_row` quantised values in [-127, 127].
    pub values: Vec<i8>,
}

impl DeltaTensor {
    /// Row `r`: its scale bits, kept columns and values. Panics if `r` is not
    /// a row of a tensor whose vectors have the lengths its shape implies.
    pub fn row(&self, r: u32) -> (u32, &[u32], &[i8]) {
        let k = self.kept_per_row as usize;
        let start = r as usize * k;
        (
            self.scale_bits[r as usize],
            &self.columns[start..start + k],
            &self.values[start..start + k],
        )
    }

    /// Checks everything the decoder checks about this tensor (POL-DELTA-3/4).
    fn validate(&self, tensor: usize) -> Result<(), DeltaError> {
        check_name(tensor, self.name.as_bytes())?;
        let (rows, cols) = (self.shape.rows(), self.shape.cols());
        check_shape(tensor, self.shape.rank(), rows, cols)?;
        check_kept(tensor, self.kept_per_row, cols)?;
        let entries = u64::from(rows) * u64::from(self.kept_per_row);
        if self.scale_bits.len() as u64 != u64::from(rows) {
            return Err(DeltaError::Inconsistent {
                tensor,
                reason: "scale_bits does not have one entry per row",
            });
        }
        if self.columns.len() as u64 != entries || self.values.len() as u64 != entries {
            return Err(DeltaError::Inconsistent {
                tensor,
                reason: "columns and values do not have rows * kept_per_row entries",
            });
        }
        for r in 0..rows {
            let (bits, columns, values) = self.row(r);
            check_scale(tensor, r, bits)?;
            let mut next_allowed = 0u64;
            for &c in columns {
                if u64::from(c) < next_allowed || c >= cols {
                    return Err(DeltaError::BadColumn {
                        tensor,
                        row: r,
                        column: u64::from(c),
                        cols,
                    });
                }
                next_allowed = u64::from(c) + 1;
            }
            if values.contains(&i8::MIN) {
                return Err(DeltaError::ValueOutOfRange { tensor, row: r });
            }
        }
        Ok(())
    }
}

/// A decoded delta payload (layout 0, POL-DELTA-2): tensors in strictly
/// increasing name order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaPayload {
    pub tensors: Vec<DeltaTensor>,
}

/// POL-DELTA-1: what a delta block commits to about its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadAddress {
    pub size_bytes: u64,
    pub merkle_root: Hash32,
    pub cid: String,
}

/// POL-DELTA-1: size, POL-3 Merkle root and POL-4 CID of payload bytes.
pub fn payload_address(bytes: &[u8]) -> PayloadAddress {
    PayloadAddress {
        size_bytes: bytes.len() as u64,
        merkle_root: payload_merkle_root(bytes),
        cid: cid_v1_raw_sha256(bytes),
    }
}

fn check_name(tensor: usize, name: &[u8]) -> Result<(), DeltaError> {
    if name.is_empty() {
        return Err(DeltaError::BadName {
            tensor,
            reason: "is empty",
        });
    }
    if name.len() > MAX_DELTA_NAME_BYTES {
        return Err(DeltaError::BadName {
            tensor,
            reason: "is longer than 128 bytes",
        });
    }
    if !name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(DeltaError::BadName {
            tensor,
            reason: "has a byte outside [A-Za-z0-9._-]",
        });
    }
    Ok(())
}

fn check_shape(tensor: usize, rank: u8, rows: u32, cols: u32) -> Result<(), DeltaError> {
    let in_bounds = |d: u32| (1..=MAX_DELTA_DIM).contains(&d);
    if !in_bounds(rows) || !in_bounds(cols) || (rank == 1 && rows != 1) {
        return Err(DeltaError::BadShape { tensor, rows, cols });
    }
    Ok(())
}

fn check_kept(tensor: usize, kept: u32, cols: u32) -> Result<(), DeltaError> {
    if kept == 0 || kept > cols {
        return Err(DeltaError::BadKeptPerRow { tensor, kept, cols });
    }
    Ok(())
}

fn check_scale(tensor: usize, row: u32, bits: u32) -> Result<(), DeltaError> {
    if bits > MAX_SCALE_BITS {
        return Err(DeltaError::BadScale { tensor, row, bits });
    }
    Ok(())
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DeltaError> {
        if self.remaining() < n {
            return Err(DeltaError::Truncated {
                offset: self.bytes.len(),
                what,
            });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DeltaError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DeltaError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DeltaError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// POL-DELTA-4: a minimal unsigned LEB128 varint below 2^32.
    fn varint(&mut self) -> Result<u32, DeltaError> {
        let start = self.pos;
        let mut value = 0u64;
        for i in 0..MAX_VARINT_BYTES {
            let byte = self.u8("a column index")?;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if byte == 0 && i > 0 {
                    return Err(DeltaError::NonMinimalVarint { offset: start });
                }
                return u32::try_from(value)
                    .map_err(|_| DeltaError::VarintOverflow { offset: start });
            }
        }
        Err(DeltaError::VarintOverflow { offset: start })
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

impl DeltaPayload {
    /// Decodes untrusted bytes (POL-DELTA-1..5).
    pub fn decode(bytes: &[u8]) -> Result<DeltaPayload, DeltaError> {
        if bytes.len() > MAX_DELTA_PAYLOAD_BYTES {
            return Err(DeltaError::TooLarge {
                got: bytes.len(),
                max: MAX_DELTA_PAYLOAD_BYTES,
            });
        }
        let mut r = Reader { bytes, pos: 0 };
        let magic: [u8; 4] = r.take(4, "the magic")?.try_into().expect("4 bytes");
        if magic != DELTA_MAGIC {
            return Err(DeltaError::BadMagic(magic));
        }
        let version = r.u8("the version")?;
        if version != DELTA_FORMAT_VERSION {
            return Err(DeltaError::UnsupportedVersion(version));
        }
        let layout = r.u8("the layout")?;
        if layout != LAYOUT_INT8_SPARSE {
            return Err(DeltaError::UnsupportedLayout(layout));
        }
        let count = usize::from(r.u16("the tensor count")?);
        if !(1..=MAX_DELTA_TENSORS).contains(&count) {
            return Err(DeltaError::TensorCount {
                got: count,
                max: MAX_DELTA_TENSORS,
            });
        }
        let mut tensors: Vec<DeltaTensor> = Vec::with_capacity(count);
        for t in 0..count {
            let tensor = decode_tensor(&mut r, t)?;
            if let Some(prev) = tensors.last()
                && prev.name.as_bytes() >= tensor.name.as_bytes()
            {
                return Err(DeltaError::NamesNotIncreasing { tensor: t });
            }
            tensors.push(tensor);
        }
        if r.remaining() > 0 {
            return Err(DeltaError::TrailingBytes {
                trailing: r.remaining(),
            });
        }
        Ok(DeltaPayload { tensors })
    }

    /// Encodes the payload, refusing anything [`DeltaPayload::decode`] would
    /// refuse (POL-DELTA-5), so `decode(encode(p)) == p`.
    pub fn encode(&self) -> Result<Vec<u8>, DeltaError> {
        let count = self.tensors.len();
        if !(1..=MAX_DELTA_TENSORS).contains(&count) {
            return Err(DeltaError::TensorCount {
                got: count,
                max: MAX_DELTA_TENSORS,
            });
        }
        for (i, t) in self.tensors.iter().enumerate() {
            t.validate(i)?;
            if i > 0 && self.tensors[i - 1].name.as_bytes() >= t.name.as_bytes() {
                return Err(DeltaError::NamesNotIncreasing { tensor: i });
            }
        }
        let mut out = Vec::with_capacity(self.size_hint());
        out.extend_from_slice(&DELTA_MAGIC);
        out.push(DELTA_FORMAT_VERSION);
        out.push(LAYOUT_INT8_SPARSE);
        out.extend_from_slice(&(count as u16).to_le_bytes());
        for t in &self.tensors {
            out.push(t.name.len() as u8);
            out.extend_from_slice(t.name.as_bytes());
            out.push(t.dtype.byte());
            out.push(t.shape.rank());
            out.extend_from_slice(&t.shape.rows().to_le_bytes());
            out.extend_from_slice(&t.shape.cols().to_le_bytes());
            out.extend_from_slice(&t.kept_per_row.to_le_bytes());
            for r in 0..t.shape.rows() {
                let (bits, columns, values) = t.row(r);
                out.extend_from_slice(&bits.to_le_bytes());
                let mut prev: Option<u32> = None;
                for &c in columns {
                    put_varint(&mut out, prev.map_or(c, |p| c - p - 1));
                    prev = Some(c);
                }
                out.extend(values.iter().map(|&v| v as u8));
            }
            if out.len() > MAX_DELTA_PAYLOAD_BYTES {
                return Err(DeltaError::TooLarge {
                    got: out.len(),
                    max: MAX_DELTA_PAYLOAD_BYTES,
                });
            }
        }
        Ok(out)
    }

    /// A lower bound of the encoded size (2 bytes per kept entry).
    fn size_hint(&self) -> usize {
        let entries: usize = self.tensors.iter().map(|t| t.values.len()).sum();
        let rows: usize = self.tensors.iter().map(|t| t.scale_bits.len()).sum();
        8 + self.tensors.len() * 144 + rows * 4 + entries * 2
    }

    /// The tensor named `name`, if any.
    pub fn tensor(&self, name: &str) -> Option<&DeltaTensor> {
        self.tensors
            .binary_search_by(|t| t.name.as_bytes().cmp(name.as_bytes()))
            .ok()
            .map(|i| &self.tensors[i])
    }
}

fn decode_tensor(r: &mut Reader<'_>, t: usize) -> Result<DeltaTensor, DeltaError> {
    let name_len = usize::from(r.u8("a name length")?);
    let name = r.take(name_len, "a name")?;
    check_name(t, name)?;
    let name = String::from_utf8(name.to_vec()).expect("checked ASCII");
    let dtype_byte = r.u8("a dtype")?;
    let dtype = BaseDtype::from_byte(dtype_byte).ok_or(DeltaError::UnknownDtype {
        tensor: t,
        byte: dtype_byte,
    })?;
    let rank = r.u8("a rank")?;
    if rank != 1 && rank != 2 {
        return Err(DeltaError::BadRank { tensor: t, rank });
    }
    let rows = r.u32("a row count")?;
    let cols = r.u32("a column count")?;
    check_shape(t, rank, rows, cols)?;
    let kept = r.u32("kept_per_row")?;
    check_kept(t, kept, cols)?;
    // POL-DELTA-5: the smallest encoding of these rows must fit before we
    // allocate for them: 4 scale bytes, then at least 1 + 1 bytes per entry.
    let needed = u64::from(rows) * (4 + 2 * u64::from(kept));
    if needed > r.remaining() as u64 {
        return Err(DeltaError::RowsExceedPayload {
            tensor: t,
            needed,
            remaining: r.remaining(),
        });
    }
    let entries = rows as usize * kept as usize;
    let mut scale_bits = Vec::with_capacity(rows as usize);
    let mut columns = Vec::with_capacity(entries);
    let mut values = Vec::with_capacity(entries);
    for row in 0..rows {
        let bits = r.u32("a scale")?;
        check_scale(t, row, bits)?;
        scale_bits.push(bits);
        let mut next = 0u64;
        for _ in 0..kept {
            let column = next + u64::from(r.varint()?);
            if column >= u64::from(cols) {
                return Err(DeltaError::BadColumn {
                    tensor: t,
                    row,
                    column,
                    cols,
                });
            }
            columns.push(column as u32);
            next = column + 1;
        }
        for &b in r.take(kept as usize, "the values")? {
            let v = b as i8;
            if v == i8::MIN {
                return Err(DeltaError::ValueOutOfRange { tensor: t, row });
            }
            values.push(v);
        }
    }
    let shape = if rank == 1 {
        DeltaShape::Vector { len: cols }
    } else {
        DeltaShape::Matrix { rows, cols }
    };
    Ok(DeltaTensor {
        name,
        dtype,
        shape,
        kept_per_row: kept,
        scale_bits,
        columns,
        values,
    })
}

#[cfg(test)]
mod tests;
