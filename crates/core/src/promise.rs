//! The promise record and its identifiers.

use std::collections::BTreeMap;
use std::fmt;

use crate::codec::{DecodeError, Decoder, Encoder};

/// A promise id as chosen by the caller: UTF-8, 1..=256 bytes, no NUL (see [`crate::Limits`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PromiseId(String);

impl PromiseId {
    /// Wraps an id without checking it; ids from users go through [`crate::Limits::check_id`].
    pub fn new_unchecked(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// The part of the id that decides its shard: the text inside the first `{...}` when it is
    /// non-empty (the Redis Cluster hash-tag rule), otherwise the whole id.
    pub fn placement_key(&self) -> &str {
        let s = self.0.as_str();
        if let Some(open) = s.find('{')
            && let Some(len) = s[open + 1..].find('}')
            && len > 0
        {
            return &s[open + 1..open + 1 + len];
        }
        s
    }
}

impl fmt::Display for PromiseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Raft group. Every promise id maps to exactly one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl ShardId {
    /// The shard owning `id` among `shard_count` shards: FNV-1a (64 bit) of the placement key,
    /// modulo the count. The hash is fixed forever because it decides where data lives on disk.
    pub fn for_promise(id: &PromiseId, shard_count: u32) -> ShardId {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.placement_key().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        ShardId((h % u64::from(shard_count.max(1))) as u32)
    }
}

/// A `vowd` process with one RocksDB directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u64> for NodeId {
    fn from(v: u64) -> Self {
        NodeId(v)
    }
}

/// The lifecycle state of a promise. Every state but `Pending` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    Pending,
    Resolved,
    Rejected,
    RejectedCanceled,
    RejectedTimedout,
}

impl State {
    pub fn is_settled(self) -> bool {
        self != State::Pending
    }

    /// The state's code in vow's encodings (records, routed searches).
    pub fn code(self) -> u8 {
        match self {
            State::Pending => 1,
            State::Resolved => 2,
            State::Rejected => 3,
            State::RejectedCanceled => 4,
            State::RejectedTimedout => 5,
        }
    }

    pub fn from_code(c: u8) -> Result<Self, DecodeError> {
        Ok(match c {
            1 => State::Pending,
            2 => State::Resolved,
            3 => State::Rejected,
            4 => State::RejectedCanceled,
            5 => State::RejectedTimedout,
            _ => return Err(DecodeError::Invalid("promise state")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Pending => "PENDING",
            State::Resolved => "RESOLVED",
            State::Rejected => "REJECTED",
            State::RejectedCanceled => "REJECTED_CANCELED",
            State::RejectedTimedout => "REJECTED_TIMEDOUT",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The three ways a caller can settle a promise (a timeout is the cluster's, not a caller's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SettleAs {
    Resolve,
    Reject,
    Cancel,
}

impl SettleAs {
    pub fn state(self) -> State {
        match self {
            SettleAs::Resolve => State::Resolved,
            SettleAs::Reject => State::Rejected,
            SettleAs::Cancel => State::RejectedCanceled,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            SettleAs::Resolve => 1,
            SettleAs::Reject => 2,
            SettleAs::Cancel => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Result<Self, DecodeError> {
        Ok(match c {
            1 => SettleAs::Resolve,
            2 => SettleAs::Reject,
            3 => SettleAs::Cancel,
            _ => return Err(DecodeError::Invalid("settle kind")),
        })
    }
}

/// A param or value: opaque data plus string headers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Value {
    pub headers: BTreeMap<String, String>,
    pub data: Vec<u8>,
}

impl Value {
    pub(crate) fn encode(&self, e: &mut Encoder) {
        e.map(&self.headers).bytes(&self.data);
    }

    pub(crate) fn decode(d: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(Value { headers: d.map("value headers")?, data: d.bytes("value data")?.to_vec() })
    }
}

/// The write-once record. `revision` is the Raft log index of its last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promise {
    pub id: PromiseId,
    pub state: State,
    pub param: Value,
    pub value: Value,
    pub deadline_ms: i64,
    pub tags: BTreeMap<String, String>,
    pub created_at_ms: i64,
    /// Zero while pending.
    pub settled_at_ms: i64,
    pub idempotency_key_create: String,
    pub idempotency_key_settle: String,
    pub revision: u64,
}

const PROMISE_FORMAT: u8 = 1;

impl Promise {
    /// Encodes the record for the state column family (format version 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::with_capacity(64 + self.param.data.len() + self.value.data.len());
        e.u8(PROMISE_FORMAT).str(self.id.as_str()).u8(self.state.code());
        self.param.encode(&mut e);
        self.value.encode(&mut e);
        e.i64(self.deadline_ms)
            .map(&self.tags)
            .i64(self.created_at_ms)
            .i64(self.settled_at_ms)
            .str(&self.idempotency_key_create)
            .str(&self.idempotency_key_settle)
            .u64(self.revision);
        e.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        d.version("promise record", PROMISE_FORMAT)?;
        let p = Promise {
            id: PromiseId(d.string("promise id")?),
            state: State::from_code(d.u8("promise state")?)?,
            param: Value::decode(&mut d)?,
            value: Value::decode(&mut d)?,
            deadline_ms: d.i64("deadline")?,
            tags: d.map("tags")?,
            created_at_ms: d.i64("created_at")?,
            settled_at_ms: d.i64("settled_at")?,
            idempotency_key_create: d.string("create idempotency key")?,
            idempotency_key_settle: d.string("settle idempotency key")?,
            revision: d.u64("revision")?,
        };
        d.finish()?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_key_uses_the_first_non_empty_brace_group() {
        let id = |s: &str| PromiseId::new_unchecked(s);
        assert_eq!(id("{order-42}/resize").placement_key(), "order-42");
        assert_eq!(id("a{b}c{d}").placement_key(), "b");
        assert_eq!(id("a{}b").placement_key(), "a{}b");
        assert_eq!(id("no-tag").placement_key(), "no-tag");
        assert_eq!(id("open{only").placement_key(), "open{only");
        let n = 8;
        assert_eq!(ShardId::for_promise(&id("{order-42}/a"), n), ShardId::for_promise(&id("{order-42}/b"), n));
    }

    #[test]
    fn the_shard_hash_is_stable() {
        // Data on disk depends on these values: changing the hash is a format change.
        // FNV-1a-64("a") = 0xaf63dc4c8601ec8c, and 0x...8c % 8 = 4.
        assert_eq!(ShardId::for_promise(&PromiseId::new_unchecked("a"), 8), ShardId(4));
        assert_eq!(ShardId::for_promise(&PromiseId::new_unchecked("anything"), 1), ShardId(0));
    }
}
