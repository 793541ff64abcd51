//! Commands: what the Raft log carries, and what applying one yields.

use std::collections::BTreeMap;

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::promise::{Promise, PromiseId, SettleAs, Value};

/// One log entry's application payload: a command plus the proposing leader's wall-clock stamp.
/// The stamp is the only source of time the state machine ever sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub stamp_ms: i64,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Create {
        id: PromiseId,
        param: Value,
        /// Absolute, already resolved against the limits at the edge.
        deadline_ms: i64,
        tags: BTreeMap<String, String>,
        idempotency_key: String,
    },
    Settle {
        id: PromiseId,
        settle_as: SettleAs,
        value: Value,
        idempotency_key: String,
    },
    /// Proposed by the leader's sweeper: time out these promises if they are still pending and
    /// their deadline has passed in cluster time. Ids that no longer qualify are skipped.
    Timeout {
        ids: Vec<PromiseId>,
    },
    /// Proposed by the leader's retention sweeper: delete these promises if they were settled at
    /// least `retention_ms` ago in cluster time.
    Collect {
        ids: Vec<PromiseId>,
        retention_ms: i64,
    },
}

/// The domain outcome of applying one command. Outcomes are replicated results, not errors:
/// every replica computes the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The create took effect, or repeated an earlier one with the same idempotency key.
    Created {
        promise: Promise,
        deduplicated: bool,
    },
    /// The id exists and the idempotency key does not match.
    CreateConflict {
        current: Promise,
    },
    /// The settle took effect, or repeated an earlier one with the same key and state.
    Settled {
        promise: Promise,
        deduplicated: bool,
    },
    /// The promise was already settled (possibly by its deadline) in another way.
    SettleConflict {
        current: Promise,
    },
    NotFound,
    /// How many promises a `Timeout` command timed out.
    TimedOut {
        count: u32,
    },
    /// How many promises a `Collect` command deleted.
    Collected {
        count: u32,
    },
}

/// The effect of a command on one record. The storage layer derives its index updates, and
/// the server its waiter notifications, from these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub before: Option<Promise>,
    pub after: Option<Promise>,
}

impl Change {
    /// The promise this change settled, if it moved one from pending to a final state.
    pub fn newly_settled(&self) -> Option<&Promise> {
        match (&self.before, &self.after) {
            (Some(b), Some(a)) if !b.state.is_settled() && a.state.is_settled() => Some(a),
            (None, Some(a)) if a.state.is_settled() => Some(a),
            _ => None,
        }
    }
}

const PROPOSAL_FORMAT: u8 = 1;
const TAG_CREATE: u8 = 1;
const TAG_SETTLE: u8 = 2;
const TAG_TIMEOUT: u8 = 3;
const TAG_COLLECT: u8 = 4;

impl Proposal {
    /// About how many bytes [`Proposal::encode`] produces (a little more, never much less),
    /// without encoding: for byte budgets on what is sent or kept in memory.
    pub fn size_hint(&self) -> usize {
        const FIELD: usize = 10; // a varint length or fixed-width integer
        let map = |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| k.len() + v.len() + 2 * FIELD).sum::<usize>();
        let value = |v: &Value| v.data.len() + map(&v.headers) + 2 * FIELD;
        let ids = |ids: &[PromiseId]| ids.iter().map(|id| id.as_str().len() + FIELD).sum::<usize>();
        4 * FIELD
            + match &self.command {
                Command::Create { id, param, tags, idempotency_key, .. } => {
                    id.as_str().len() + value(param) + map(tags) + idempotency_key.len() + 4 * FIELD
                }
                Command::Settle { id, value: v, idempotency_key, .. } => {
                    id.as_str().len() + value(v) + idempotency_key.len() + 3 * FIELD
                }
                Command::Timeout { ids: i } | Command::Collect { ids: i, .. } => ids(i) + 2 * FIELD,
            }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::with_capacity(128);
        e.u8(PROPOSAL_FORMAT).i64(self.stamp_ms);
        match &self.command {
            Command::Create { id, param, deadline_ms, tags, idempotency_key } => {
                e.u8(TAG_CREATE).str(id.as_str());
                param.encode(&mut e);
                e.i64(*deadline_ms).map(tags).str(idempotency_key);
            }
            Command::Settle { id, settle_as, value, idempotency_key } => {
                e.u8(TAG_SETTLE).str(id.as_str()).u8(settle_as.code());
                value.encode(&mut e);
                e.str(idempotency_key);
            }
            Command::Timeout { ids } => {
                e.u8(TAG_TIMEOUT).u64(ids.len() as u64);
                for id in ids {
                    e.str(id.as_str());
                }
            }
            Command::Collect { ids, retention_ms } => {
                e.u8(TAG_COLLECT).i64(*retention_ms).u64(ids.len() as u64);
                for id in ids {
                    e.str(id.as_str());
                }
            }
        }
        e.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        d.version("proposal", PROPOSAL_FORMAT)?;
        let stamp_ms = d.i64("stamp")?;
        let id = |d: &mut Decoder<'_>| d.string("promise id").map(PromiseId::new_unchecked);
        let command = match d.u8("command tag")? {
            TAG_CREATE => Command::Create {
                id: id(&mut d)?,
                param: Value::decode(&mut d)?,
                deadline_ms: d.i64("deadline")?,
                tags: d.map("tags")?,
                idempotency_key: d.string("idempotency key")?,
            },
            TAG_SETTLE => Command::Settle {
                id: id(&mut d)?,
                settle_as: SettleAs::from_code(d.u8("settle kind")?)?,
                value: Value::decode(&mut d)?,
                idempotency_key: d.string("idempotency key")?,
            },
            TAG_TIMEOUT => {
                let n = d.u64("id count")?;
                let ids = (0..n).map(|_| id(&mut d)).collect::<Result<_, _>>()?;
                Command::Timeout { ids }
            }
            TAG_COLLECT => {
                let retention_ms = d.i64("retention")?;
                let n = d.u64("id count")?;
                let ids = (0..n).map(|_| id(&mut d)).collect::<Result<_, _>>()?;
                Command::Collect { ids, retention_ms }
            }
            _ => return Err(DecodeError::Invalid("command tag")),
        };
        d.finish()?;
        Ok(Proposal { stamp_ms, command })
    }
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.command {
            Command::Create { id, .. } => write!(f, "create {id} @{}", self.stamp_ms),
            Command::Settle { id, settle_as, .. } => write!(f, "{settle_as:?} {id} @{}", self.stamp_ms),
            Command::Timeout { ids } => write!(f, "timeout {} promises @{}", ids.len(), self.stamp_ms),
            Command::Collect { ids, .. } => write!(f, "collect {} promises @{}", ids.len(), self.stamp_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_hint_covers_the_encoding() {
        let headers: BTreeMap<String, String> = (0..50).map(|i| (format!("h{i}"), "v".repeat(i))).collect();
        let value = Value { headers: headers.clone(), data: vec![1; 5000] };
        let id = PromiseId::new_unchecked("promise-1");
        let commands = [
            Command::Create {
                id: id.clone(),
                param: value.clone(),
                deadline_ms: -1,
                tags: headers,
                idempotency_key: "k".repeat(200),
            },
            Command::Settle { id: id.clone(), settle_as: SettleAs::Reject, value, idempotency_key: String::new() },
            Command::Timeout { ids: vec![id.clone(); 1000] },
            Command::Collect { ids: vec![], retention_ms: i64::MAX },
        ];
        for command in commands {
            let p = Proposal { stamp_ms: i64::MIN, command };
            let (hint, len) = (p.size_hint(), p.encode().len());
            assert!(hint >= len && hint <= len * 2 + 64, "hint {hint} for {len} bytes: {:?}", p.command);
        }
    }
}
