//! The canonical byte encoding of this crate's signed objects (RT-ENC-1):
//! big-endian fixed-width integers, lists as a `u32` count followed by the
//! items, no padding; decoding refuses trailing bytes and any list past its
//! bound before allocating for it.

use crate::{Error, Result};

pub(crate) struct Writer(pub Vec<u8>);

impl Writer {
    pub fn new() -> Self {
        Writer(Vec::new())
    }
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    /// A list's count; lists are bounded far below `u32::MAX` by their
    /// types' checks before they are encoded.
    pub fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("lists are bounded before encoding"));
    }
}

pub(crate) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        Reader { data, pos: 0, what }
    }
    fn malformed(&self, reason: &'static str) -> Error {
        Error::Malformed {
            what: self.what,
            reason,
        }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() - self.pos < n {
            return Err(self.malformed("truncated"));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// A list count, refused past `max` (and past what the remaining bytes
    /// could hold at `min_item_bytes` each) before anything is allocated.
    pub fn len(&mut self, max: usize, min_item_bytes: usize, list: &'static str) -> Result<usize> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(Error::TooLarge {
                what: list,
                len: n,
                max,
            });
        }
        if n.saturating_mul(min_item_bytes) > self.data.len() - self.pos {
            return Err(self.malformed("truncated"));
        }
        Ok(n)
    }
    pub fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed("a boolean byte is 0 or 1")),
        }
    }
    pub fn finish(self) -> Result<()> {
        if self.pos != self.data.len() {
            return Err(self.malformed("trailing bytes"));
        }
        Ok(())
    }
}
