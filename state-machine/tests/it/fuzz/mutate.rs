//! Byte-level mutations of a valid encoding (issue 18, structure-aware
//! fuzzing): a strategy builds a valid value, the test encodes it, and these
//! mutations damage the bytes the way a hostile or broken peer would: bit
//! flips, byte overwrites, truncation, extension, insertion, deletion,
//! copies within the input, splices with a second valid encoding, and edits
//! of integer fields (length prefixes, counts, rkyv's relative pointers) to
//! boundary values, in either byte order.
//!
//! Shared by the state machine's and the runtime's fuzz tests (the runtime
//! includes this file with `#[path]`).
#![allow(dead_code)]

use proptest::prelude::*;
use proptest::sample::Index;

/// Where an integer edit writes, and how.
#[derive(Clone, Copy, Debug)]
pub struct IntSlot {
    pub at: Index,
    /// 1, 2, 4 or 8 bytes.
    pub width: usize,
    pub big_endian: bool,
    /// Round `at` down to a multiple of `width` (rkyv fields are aligned).
    pub aligned: bool,
}

/// A value an integer edit writes.
#[derive(Clone, Copy, Debug)]
pub enum IntValue {
    /// 0, 1, and the extremes of every signed and unsigned width.
    Boundary(u8),
    /// The input's length, plus a small delta (a length field that is off by one).
    Length(i8),
    Any(u64),
    /// Add to what is there (wrapping): a pointer or length nudged.
    Add(i16),
}

#[derive(Clone, Debug)]
pub enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Extend(Vec<u8>),
    Insert(Index, Vec<u8>),
    Remove(Index, u8),
    /// Copy up to `len` bytes from one place over another.
    CopyWithin {
        from: Index,
        to: Index,
        len: u8,
    },
    /// `self[..a] ‖ other[b..]`.
    Splice {
        at_self: Index,
        at_other: Index,
    },
    /// Replace the whole input by the other one, then keep mutating.
    Other,
    Int(IntSlot, IntValue),
}

const BOUNDARIES: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0xffff_fff0,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

fn int_slot() -> impl Strategy<Value = IntSlot> {
    (
        any::<Index>(),
        prop_oneof![1 => Just(1usize), 1 => Just(2usize), 4 => Just(4usize), 2 => Just(8usize)],
        any::<bool>(),
        prop::bool::weighted(0.8),
    )
        .prop_map(|(at, width, big_endian, aligned)| IntSlot {
            at,
            width,
            big_endian,
            aligned,
        })
}

fn int_value() -> impl Strategy<Value = IntValue> {
    prop_oneof![
        4 => (0..BOUNDARIES.len() as u8).prop_map(IntValue::Boundary),
        2 => (-4i8..=4).prop_map(IntValue::Length),
        2 => any::<u64>().prop_map(IntValue::Any),
        3 => prop_oneof![-64i16..=64, any::<i16>()].prop_map(IntValue::Add),
    ]
}

fn small_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 1..8),
        1 => prop::collection::vec(any::<u8>(), 8..64),
        1 => (any::<u8>(), 1..200usize).prop_map(|(b, n)| vec![b; n]),
    ]
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        2 => any::<Index>().prop_map(Mutation::Truncate),
        2 => small_bytes().prop_map(Mutation::Extend),
        2 => (any::<Index>(), small_bytes()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<Index>(), 1u8..=32).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => (any::<Index>(), any::<Index>(), 1u8..=64)
            .prop_map(|(from, to, len)| Mutation::CopyWithin { from, to, len }),
        2 => (any::<Index>(), any::<Index>())
            .prop_map(|(at_self, at_other)| Mutation::Splice { at_self, at_other }),
        1 => Just(Mutation::Other),
        6 => (int_slot(), int_value()).prop_map(|(s, v)| Mutation::Int(s, v)),
    ]
}

/// One to four mutations, applied in order.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..=4)
}

/// Several independent mutation lists: one case feeds each to the decoder.
pub fn mutation_sets(n: usize) -> impl Strategy<Value = Vec<Vec<Mutation>>> {
    prop::collection::vec(mutations(), 1..=n)
}

fn write_int(out: &mut [u8], slot: IntSlot, value: IntValue) {
    let w = slot.width;
    if out.len() < w {
        return;
    }
    let mut at = slot.at.index(out.len() - w + 1);
    if slot.aligned {
        at -= at % w;
    }
    let read = |b: &[u8]| -> u64 {
        let mut buf = [0u8; 8];
        if slot.big_endian {
            buf[8 - w..].copy_from_slice(b);
            u64::from_be_bytes(buf)
        } else {
            buf[..w].copy_from_slice(b);
            u64::from_le_bytes(buf)
        }
    };
    let v = match value {
        IntValue::Boundary(i) => BOUNDARIES[i as usize],
        IntValue::Length(d) => (out.len() as u64).wrapping_add_signed(i64::from(d)),
        IntValue::Any(v) => v,
        IntValue::Add(d) => read(&out[at..at + w]).wrapping_add_signed(i64::from(d)),
    };
    let bytes = if slot.big_endian {
        v.to_be_bytes()[8 - w..].to_vec()
    } else {
        v.to_le_bytes()[..w].to_vec()
    };
    out[at..at + w].copy_from_slice(&bytes);
}

/// `input` with `mutations` applied; `other` is a second valid encoding for splices.
pub fn apply(input: &[u8], other: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = input.to_vec();
    for m in mutations {
        match m {
            Mutation::FlipBit(i, b) => {
                if !out.is_empty() {
                    let i = i.index(out.len());
                    out[i] ^= 1 << b;
                }
            }
            Mutation::SetByte(i, b) => {
                if !out.is_empty() {
                    let i = i.index(out.len());
                    out[i] = *b;
                }
            }
            Mutation::Truncate(i) => {
                let n = i.index(out.len() + 1);
                out.truncate(n);
            }
            Mutation::Extend(b) => out.extend_from_slice(b),
            Mutation::Insert(i, b) => {
                let at = i.index(out.len() + 1);
                out.splice(at..at, b.iter().copied());
            }
            Mutation::Remove(i, n) => {
                if !out.is_empty() {
                    let at = i.index(out.len());
                    let end = (at + *n as usize).min(out.len());
                    out.drain(at..end);
                }
            }
            Mutation::CopyWithin { from, to, len } => {
                if !out.is_empty() {
                    let from = from.index(out.len());
                    let to = to.index(out.len());
                    let len = (*len as usize).min(out.len() - from).min(out.len() - to);
                    out.copy_within(from..from + len, to);
                }
            }
            Mutation::Splice { at_self, at_other } => {
                let a = at_self.index(out.len() + 1);
                let b = at_other.index(other.len() + 1);
                out.truncate(a);
                out.extend_from_slice(&other[b..]);
            }
            Mutation::Other => out = other.to_vec(),
            Mutation::Int(slot, value) => write_int(&mut out, *slot, *value),
        }
    }
    out
}
