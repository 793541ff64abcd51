//! The explicit binary encoding used for everything vow writes to disk or puts in the Raft log.
//!
//! Each top-level record starts with a format version byte; fields follow in a fixed order as
//! LEB128 varints (unsigned), zig-zag varints (signed) and length-prefixed byte strings. Maps are
//! written in key order (they are `BTreeMap`s), so equal values always encode to equal bytes — the
//! property the replay test relies on. Decoding never panics: every read is bounds-checked and a
//! malformed input yields [`DecodeError`].

use std::collections::BTreeMap;

/// Why bytes could not be decoded. Bytes come from disk or the network, so this is an expected
/// error (corruption, a newer format), never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unexpected end of input while reading {0}")]
    Truncated(&'static str),
    #[error("unsupported format version {found} for {what} (this build reads {supported})")]
    Version { what: &'static str, found: u8, supported: u8 },
    #[error("invalid {0}")]
    Invalid(&'static str),
    #[error("{0} trailing bytes after a complete record")]
    Trailing(usize),
}

/// Appends fields to a byte buffer.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(capacity_bytes: usize) -> Self {
        Self { buf: Vec::with_capacity(capacity_bytes) }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    pub fn u64(&mut self, mut v: u64) -> &mut Self {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
        self
    }

    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.u64(((v << 1) ^ (v >> 63)) as u64)
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
        self
    }

    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    pub fn map(&mut self, m: &BTreeMap<String, String>) -> &mut Self {
        self.u64(m.len() as u64);
        for (k, v) in m {
            self.str(k).str(v);
        }
        self
    }

    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(v) => self.u8(1).u64(v),
        }
    }
}

/// Reads fields back in the order they were written.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Checks the leading version byte of a record.
    pub fn version(&mut self, what: &'static str, supported: u8) -> Result<(), DecodeError> {
        let found = self.u8(what)?;
        if found != supported {
            return Err(DecodeError::Version { what, found, supported });
        }
        Ok(())
    }

    /// Bytes not read yet: an upper bound for any count read from them.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() { Ok(()) } else { Err(DecodeError::Trailing(self.buf.len())) }
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let (&b, rest) = self.buf.split_first().ok_or(DecodeError::Truncated(what))?;
        self.buf = rest;
        Ok(b)
    }

    pub fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid(what)),
        }
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Invalid(what))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        u32::try_from(self.u64(what)?).map_err(|_| DecodeError::Invalid(what))
    }

    pub fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let z = self.u64(what)?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.u64(what)?).map_err(|_| DecodeError::Invalid(what))?;
        if len > self.buf.len() {
            return Err(DecodeError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    pub fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid(what))
    }

    pub fn map(&mut self, what: &'static str) -> Result<BTreeMap<String, String>, DecodeError> {
        let n = self.u64(what)?;
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let k = self.string(what)?;
            let v = self.string(what)?;
            m.insert(k, v);
        }
        Ok(m)
    }

    pub fn opt_u64(&mut self, what: &'static str) -> Result<Option<u64>, DecodeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.u64(what)?)),
            _ => Err(DecodeError::Invalid(what)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_the_edges() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut e = Encoder::new();
            e.u64(v);
            let bytes = e.into_bytes();
            assert_eq!(Decoder::new(&bytes).u64("v"), Ok(v));
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX, -1_700_000_000_000] {
            let mut e = Encoder::new();
            e.i64(v);
            let bytes = e.into_bytes();
            assert_eq!(Decoder::new(&bytes).i64("v"), Ok(v));
        }
    }

    #[test]
    fn truncated_and_overlong_inputs_are_errors_not_panics() {
        assert_eq!(Decoder::new(&[0x80]).u64("v"), Err(DecodeError::Truncated("v")));
        assert_eq!(Decoder::new(&[0xff; 11]).u64("v"), Err(DecodeError::Invalid("v")));
        assert_eq!(Decoder::new(&[5, 1, 2]).bytes("b"), Err(DecodeError::Truncated("b")));
        assert_eq!(Decoder::new(&[2, 0xff, 0xfe]).string("s"), Err(DecodeError::Invalid("s")));
    }
}
