//! Input limits. Each is configurable up to a hard maximum, and each violation names its limit so
//! the caller knows what to change.

use std::collections::BTreeMap;

use crate::promise::{PromiseId, Value};

/// Configurable limits (defaults per DESIGN.md §2). Checked at the edge before a command is
/// proposed, so the replicated log only ever holds commands that fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_id_bytes: usize,
    pub max_data_bytes: usize,
    pub max_headers: usize,
    pub max_tags: usize,
    /// Applies to each header or tag key and value.
    pub max_entry_bytes: usize,
    pub max_idempotency_key_bytes: usize,
    /// How far in the future a deadline may lie.
    pub max_deadline_ahead_ms: i64,
    /// Deadline used when a create leaves it at zero.
    pub default_deadline_ahead_ms: i64,
}

/// Hard maxima: a configuration above these is refused at start-up.
pub const HARD_MAX_ID_BYTES: usize = 256;
pub const HARD_MAX_DATA_BYTES: usize = 16 << 20;
pub const HARD_MAX_ENTRIES: usize = 1024;
pub const HARD_MAX_ENTRY_BYTES: usize = 64 << 10;
pub const HARD_MAX_DEADLINE_AHEAD_MS: i64 = 10 * 365 * 24 * 3600 * 1000;
/// The largest record any configuration may allow (see [`Limits::max_record_bytes`]). Every
/// size bound downstream derives from it: a Raft message, a snapshot record, a reply.
pub const HARD_MAX_RECORD_BYTES: usize = 64 << 20;

/// Encoding overhead allowed per map entry or field (tags, length prefixes) in the size bounds.
const FIELD_OVERHEAD_BYTES: usize = 16;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_id_bytes: 256,
            max_data_bytes: 1 << 20,
            max_headers: 64,
            max_tags: 64,
            max_entry_bytes: 4096,
            max_idempotency_key_bytes: 256,
            max_deadline_ahead_ms: 365 * 24 * 3600 * 1000,
            default_deadline_ahead_ms: 24 * 3600 * 1000,
        }
    }
}

/// A rejected input. The message names the limit, e.g. "data is 2000000 bytes, over the limit
/// max_data_bytes=1048576".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LimitError(pub String);

impl Limits {
    /// Refuses a configuration beyond the hard maxima.
    pub fn validate(&self) -> Result<(), LimitError> {
        let over = |name: &str, v: u128, max: u128| {
            if v > max { Err(LimitError(format!("{name}={v} is above its hard maximum {max}"))) } else { Ok(()) }
        };
        over("max_id_bytes", self.max_id_bytes as u128, HARD_MAX_ID_BYTES as u128)?;
        over("max_data_bytes", self.max_data_bytes as u128, HARD_MAX_DATA_BYTES as u128)?;
        over("max_headers", self.max_headers as u128, HARD_MAX_ENTRIES as u128)?;
        over("max_tags", self.max_tags as u128, HARD_MAX_ENTRIES as u128)?;
        over("max_entry_bytes", self.max_entry_bytes as u128, HARD_MAX_ENTRY_BYTES as u128)?;
        over("max_idempotency_key_bytes", self.max_idempotency_key_bytes as u128, HARD_MAX_ID_BYTES as u128)?;
        over("max_deadline_ahead_ms", self.max_deadline_ahead_ms.max(0) as u128, HARD_MAX_DEADLINE_AHEAD_MS as u128)?;
        over(
            "default_deadline_ahead_ms",
            self.default_deadline_ahead_ms.max(0) as u128,
            self.max_deadline_ahead_ms.max(0) as u128,
        )?;
        if self.max_id_bytes == 0 || self.default_deadline_ahead_ms <= 0 {
            return Err(LimitError("max_id_bytes and default_deadline_ahead_ms must be positive".into()));
        }
        if self.max_record_bytes() > HARD_MAX_RECORD_BYTES {
            return Err(LimitError(format!(
                "these limits allow records of up to {} bytes, over the hard maximum {HARD_MAX_RECORD_BYTES}; \
                 lower max_data_bytes, max_headers, max_tags or max_entry_bytes",
                self.max_record_bytes()
            )));
        }
        Ok(())
    }

    /// The most bytes a value (param or settle value) within these limits encodes to.
    pub fn max_value_bytes(&self) -> usize {
        self.max_data_bytes + self.max_map_bytes(self.max_headers) + FIELD_OVERHEAD_BYTES
    }

    fn max_map_bytes(&self, entries: usize) -> usize {
        entries * (2 * self.max_entry_bytes + FIELD_OVERHEAD_BYTES)
    }

    /// The most bytes a command (a create, the larger kind) within these limits encodes to, in a
    /// request or a log entry.
    pub fn max_command_bytes(&self) -> usize {
        self.max_id_bytes
            + self.max_idempotency_key_bytes
            + self.max_value_bytes()
            + self.max_map_bytes(self.max_tags)
            + 8 * FIELD_OVERHEAD_BYTES
    }

    /// The most bytes a promise record within these limits encodes to: its id, both keys, its
    /// param, its value and its tags.
    pub fn max_record_bytes(&self) -> usize {
        self.max_id_bytes
            + 2 * self.max_idempotency_key_bytes
            + 2 * self.max_value_bytes()
            + self.max_map_bytes(self.max_tags)
            + 16 * FIELD_OVERHEAD_BYTES
    }

    pub fn check_id(&self, id: &str) -> Result<PromiseId, LimitError> {
        if id.is_empty() {
            return Err(LimitError("id is empty; an id needs 1 to max_id_bytes bytes".into()));
        }
        if id.len() > self.max_id_bytes {
            return Err(LimitError(format!(
                "id is {} bytes, over the limit max_id_bytes={}",
                id.len(),
                self.max_id_bytes
            )));
        }
        if id.contains('\0') {
            return Err(LimitError("id contains a NUL character".into()));
        }
        Ok(PromiseId::new_unchecked(id))
    }

    pub fn check_id_prefix(&self, prefix: &str) -> Result<(), LimitError> {
        if prefix.len() > self.max_id_bytes {
            return Err(LimitError(format!(
                "id_prefix is {} bytes, over the limit max_id_bytes={}",
                prefix.len(),
                self.max_id_bytes
            )));
        }
        Ok(())
    }

    pub fn check_value(&self, what: &str, v: &Value) -> Result<(), LimitError> {
        if v.data.len() > self.max_data_bytes {
            return Err(LimitError(format!(
                "{what}.data is {} bytes, over the limit max_data_bytes={}",
                v.data.len(),
                self.max_data_bytes
            )));
        }
        self.check_map(&format!("{what}.headers"), &v.headers, self.max_headers, "max_headers")
    }

    pub fn check_tags(&self, tags: &BTreeMap<String, String>) -> Result<(), LimitError> {
        self.check_map("tags", tags, self.max_tags, "max_tags")
    }

    pub fn check_idempotency_key(&self, key: &str) -> Result<(), LimitError> {
        if key.len() > self.max_idempotency_key_bytes {
            return Err(LimitError(format!(
                "idempotency_key is {} bytes, over the limit max_idempotency_key_bytes={}",
                key.len(),
                self.max_idempotency_key_bytes
            )));
        }
        Ok(())
    }

    /// Resolves a requested deadline against the caller's clock reading `now_ms`: zero means the
    /// default; anything beyond `max_deadline_ahead_ms` is refused. A deadline in the past is
    /// allowed: the promise is created already timed out, which is what its deadline says.
    pub fn resolve_deadline(&self, requested_ms: i64, now_ms: i64) -> Result<i64, LimitError> {
        if requested_ms == 0 {
            return Ok(now_ms.saturating_add(self.default_deadline_ahead_ms));
        }
        if requested_ms < 0 {
            return Err(LimitError(format!(
                "deadline_ms={requested_ms} is negative; give milliseconds since the epoch"
            )));
        }
        if requested_ms > now_ms.saturating_add(self.max_deadline_ahead_ms) {
            return Err(LimitError(format!(
                "deadline_ms={requested_ms} is more than max_deadline_ahead_ms={} after now ({now_ms})",
                self.max_deadline_ahead_ms
            )));
        }
        Ok(requested_ms)
    }

    fn check_map(
        &self,
        what: &str,
        m: &BTreeMap<String, String>,
        max_count: usize,
        count_limit: &str,
    ) -> Result<(), LimitError> {
        if m.len() > max_count {
            return Err(LimitError(format!(
                "{what} has {} entries, over the limit {count_limit}={max_count}",
                m.len()
            )));
        }
        for (k, v) in m {
            if k.len() > self.max_entry_bytes || v.len() > self.max_entry_bytes {
                return Err(LimitError(format!(
                    "{what} entry {k:?} is longer than the limit max_entry_bytes={}",
                    self.max_entry_bytes
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_name_the_limit() {
        let l = Limits::default();
        assert!(l.check_id("").is_err());
        assert!(l.check_id(&"x".repeat(257)).unwrap_err().0.contains("max_id_bytes=256"));
        assert!(l.check_id("a\0b").unwrap_err().0.contains("NUL"));
        let big = Value { headers: BTreeMap::new(), data: vec![0; (1 << 20) + 1] };
        assert!(l.check_value("value", &big).unwrap_err().0.contains("max_data_bytes"));
        let tags = (0..65).map(|i| (i.to_string(), String::new())).collect();
        assert!(l.check_tags(&tags).unwrap_err().0.contains("max_tags=64"));
        assert!(l.resolve_deadline(i64::MAX, 1000).unwrap_err().0.contains("max_deadline_ahead_ms"));
        assert_eq!(l.resolve_deadline(0, 1000), Ok(1000 + l.default_deadline_ahead_ms));
    }

    #[test]
    fn configuration_above_hard_maxima_is_refused() {
        let l = Limits { max_data_bytes: 17 << 20, ..Limits::default() };
        assert!(l.validate().unwrap_err().0.contains("max_data_bytes"));
        assert!(Limits::default().validate().is_ok());
        let huge = Limits { max_headers: 1024, max_entry_bytes: 64 << 10, ..Limits::default() };
        assert!(huge.validate().unwrap_err().0.contains("hard maximum"), "each limit alone is fine, together too much");
    }

    #[test]
    fn size_bounds_cover_the_largest_input_the_limits_allow() {
        let l = Limits::default();
        let entry = "k".repeat(l.max_entry_bytes);
        let map: BTreeMap<String, String> =
            (0..l.max_headers).map(|i| (format!("{i:0>width$}", width = l.max_entry_bytes), entry.clone())).collect();
        let value = Value { headers: map.clone(), data: vec![7; l.max_data_bytes] };
        let record = crate::Promise {
            id: PromiseId::new_unchecked("i".repeat(l.max_id_bytes)),
            state: crate::State::Resolved,
            param: value.clone(),
            value,
            deadline_ms: i64::MAX,
            tags: map,
            created_at_ms: i64::MAX,
            settled_at_ms: i64::MAX,
            revision: u64::MAX,
            idempotency_key_create: "c".repeat(l.max_idempotency_key_bytes),
            idempotency_key_settle: "s".repeat(l.max_idempotency_key_bytes),
        };
        let encoded = record.encode().len();
        assert!(encoded <= l.max_record_bytes(), "{encoded} > {}", l.max_record_bytes());
        // Default limits keep a whole record under the 4 MiB a gRPC client accepts by default.
        assert!(l.max_record_bytes() < 4 << 20, "{}", l.max_record_bytes());
    }
}
