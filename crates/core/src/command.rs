//! Commands: what the Raft log carries, and what applying one yields.

use std::collections::BTreeMap;

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::pipeline::{Completion, Continuation, ContinuationRecord, Settlement};
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
    /// One Submit's part on one shard: `Create`s and `Register`s applied together, or (if any
    /// of them fails) not at all.
    Batch {
        commands: Vec<Command>,
    },
    /// Stores a continuation on its anchor's shard (see [`Continuation::anchor`]). The same
    /// continuation registered again is a no-op; another one under the same id a conflict.
    Register {
        continuation: Continuation,
        target_deadline_ms: i64,
    },
    /// A source's outcome, delivered to the join `join` (stored with `target`) as input `index`.
    Offer {
        join: String,
        target: PromiseId,
        index: u32,
        outcome: Settlement,
    },
    /// Proposed by the executor on the continuations' own shard once their targets are
    /// settled: they are done. Several at once: the leader gathers them for a moment.
    Complete {
        done: Vec<Completion>,
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
    /// Each command's outcome; `applied` is false when one failed and the batch changed nothing.
    Batch {
        outcomes: Vec<Outcome>,
        applied: bool,
    },
    /// The continuation is registered, or was already, identically.
    Registered {
        record: ContinuationRecord,
        deduplicated: bool,
    },
    /// Another continuation is registered under the id.
    RegisterConflict {
        current: ContinuationRecord,
    },
    /// The offer was taken in (or, for a decided join or a repeated input, ignored).
    Offered {
        record: ContinuationRecord,
    },
    /// How many of the continuations a `Complete` named were done by it (the others were
    /// done before, or are gone).
    Completed {
        count: u32,
    },
}

impl Outcome {
    /// Whether a command of a batch failed: the batch then changes nothing.
    pub fn is_failure(&self) -> bool {
        match self {
            Outcome::CreateConflict { .. }
            | Outcome::SettleConflict { .. }
            | Outcome::RegisterConflict { .. }
            | Outcome::NotFound => true,
            Outcome::Batch { applied, .. } => !applied,
            _ => false,
        }
    }
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
const TAG_BATCH: u8 = 5;
const TAG_REGISTER: u8 = 6;
const TAG_OFFER: u8 = 7;
const TAG_COMPLETE: u8 = 8;

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
                // Rare and small next to the data they carry: measured, not estimated.
                Command::Batch { .. } | Command::Register { .. } | Command::Offer { .. } | Command::Complete { .. } => {
                    self.command.encode().len()
                }
            }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::with_capacity(128);
        e.u8(PROPOSAL_FORMAT).i64(self.stamp_ms);
        self.command.encode_into(&mut e);
        e.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        d.version("proposal", PROPOSAL_FORMAT)?;
        let stamp_ms = d.i64("stamp")?;
        let command = Command::decode_from(&mut d)?;
        d.finish()?;
        Ok(Proposal { stamp_ms, command })
    }
}

const COMMAND_FORMAT: u8 = 1;

impl Command {
    /// The one promise a client's command (create or settle) is about; `None` for the sweepers'
    /// commands, which name many.
    pub fn promise_id(&self) -> Option<&PromiseId> {
        match self {
            Command::Create { id, .. } | Command::Settle { id, .. } => Some(id),
            Command::Register { continuation, .. } => Some(continuation.anchor()),
            Command::Offer { target, .. } => Some(target),
            Command::Batch { commands } => commands.first().and_then(Command::promise_id),
            Command::Timeout { .. } | Command::Collect { .. } | Command::Complete { .. } => None,
        }
    }

    /// Every promise whose shard this command must be applied on: a routed command's ids must
    /// all be of one shard.
    pub fn placement_ids(&self) -> Vec<&PromiseId> {
        match self {
            Command::Batch { commands } => commands.iter().flat_map(Command::placement_ids).collect(),
            other => other.promise_id().into_iter().collect(),
        }
    }

    /// The command alone, as a node carries it to the leader of its shard (which stamps it).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::with_capacity(128);
        e.u8(COMMAND_FORMAT);
        self.encode_into(&mut e);
        e.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        d.version("command", COMMAND_FORMAT)?;
        let command = Command::decode_from(&mut d)?;
        d.finish()?;
        Ok(command)
    }

    fn encode_into(&self, e: &mut Encoder) {
        match self {
            Command::Create { id, param, deadline_ms, tags, idempotency_key } => {
                e.u8(TAG_CREATE).str(id.as_str());
                param.encode(e);
                e.i64(*deadline_ms).map(tags).str(idempotency_key);
            }
            Command::Settle { id, settle_as, value, idempotency_key } => {
                e.u8(TAG_SETTLE).str(id.as_str()).u8(settle_as.code());
                value.encode(e);
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
            Command::Batch { commands } => {
                e.u8(TAG_BATCH).u64(commands.len() as u64);
                for c in commands {
                    c.encode_into(e);
                }
            }
            Command::Register { continuation, target_deadline_ms } => {
                e.u8(TAG_REGISTER);
                continuation.encode_into(e);
                e.i64(*target_deadline_ms);
            }
            Command::Offer { join, target, index, outcome } => {
                e.u8(TAG_OFFER).str(join).str(target.as_str()).u64(u64::from(*index));
                outcome.encode_into(e);
            }
            Command::Complete { done } => {
                e.u8(TAG_COMPLETE).u64(done.len() as u64);
                for c in done {
                    e.str(&c.id).str(&c.note);
                }
            }
        }
    }

    fn decode_from(d: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        let id = |d: &mut Decoder<'_>| d.string("promise id").map(PromiseId::new_unchecked);
        Ok(match d.u8("command tag")? {
            TAG_CREATE => Command::Create {
                id: id(d)?,
                param: Value::decode(d)?,
                deadline_ms: d.i64("deadline")?,
                tags: d.map("tags")?,
                idempotency_key: d.string("idempotency key")?,
            },
            TAG_SETTLE => Command::Settle {
                id: id(d)?,
                settle_as: SettleAs::from_code(d.u8("settle kind")?)?,
                value: Value::decode(d)?,
                idempotency_key: d.string("idempotency key")?,
            },
            TAG_TIMEOUT => {
                let n = d.u64("id count")?;
                let ids = (0..n).map(|_| id(d)).collect::<Result<_, _>>()?;
                Command::Timeout { ids }
            }
            TAG_COLLECT => {
                let retention_ms = d.i64("retention")?;
                let n = d.u64("id count")?;
                let ids = (0..n).map(|_| id(d)).collect::<Result<_, _>>()?;
                Command::Collect { ids, retention_ms }
            }
            TAG_BATCH => {
                let n = d.u64("batch size")?;
                if n > d.remaining() as u64 {
                    return Err(DecodeError::Invalid("batch size"));
                }
                let mut commands = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let c = Command::decode_from(d)?;
                    // A batch holds what a Submit creates and registers; nothing nests.
                    if !matches!(c, Command::Create { .. } | Command::Register { .. }) {
                        return Err(DecodeError::Invalid("batched command"));
                    }
                    commands.push(c);
                }
                Command::Batch { commands }
            }
            TAG_REGISTER => Command::Register {
                continuation: Continuation::decode_from(d)?,
                target_deadline_ms: d.i64("target deadline")?,
            },
            TAG_OFFER => Command::Offer {
                join: d.string("join id")?,
                target: id(d)?,
                index: d.u32("join input")?,
                outcome: Settlement::decode_from(d)?,
            },
            TAG_COMPLETE => {
                let n = d.u64("completion count")?;
                if n > d.remaining() as u64 {
                    return Err(DecodeError::Invalid("completion count"));
                }
                let done = (0..n)
                    .map(|_| Ok(Completion { id: d.string("continuation id")?, note: d.string("note")? }))
                    .collect::<Result<_, DecodeError>>()?;
                Command::Complete { done }
            }
            _ => return Err(DecodeError::Invalid("command tag")),
        })
    }
}

const OUTCOME_FORMAT: u8 = 1;
const OUTCOME_CREATED: u8 = 1;
const OUTCOME_CREATE_CONFLICT: u8 = 2;
const OUTCOME_SETTLED: u8 = 3;
const OUTCOME_SETTLE_CONFLICT: u8 = 4;
const OUTCOME_NOT_FOUND: u8 = 5;
const OUTCOME_TIMED_OUT: u8 = 6;
const OUTCOME_COLLECTED: u8 = 7;
const OUTCOME_BATCH: u8 = 8;
const OUTCOME_REGISTERED: u8 = 9;
const OUTCOME_REGISTER_CONFLICT: u8 = 10;
const OUTCOME_OFFERED: u8 = 11;
const OUTCOME_COMPLETED: u8 = 12;

impl Outcome {
    /// The outcome as a leader sends it back to the node that carried the command to it.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::with_capacity(128);
        e.u8(OUTCOME_FORMAT);
        self.encode_into(&mut e);
        e.into_bytes()
    }

    fn encode_into(&self, e: &mut Encoder) {
        match self {
            Outcome::Created { promise, deduplicated } => {
                e.u8(OUTCOME_CREATED).bytes(&promise.encode()).bool(*deduplicated);
            }
            Outcome::CreateConflict { current } => {
                e.u8(OUTCOME_CREATE_CONFLICT).bytes(&current.encode());
            }
            Outcome::Settled { promise, deduplicated } => {
                e.u8(OUTCOME_SETTLED).bytes(&promise.encode()).bool(*deduplicated);
            }
            Outcome::SettleConflict { current } => {
                e.u8(OUTCOME_SETTLE_CONFLICT).bytes(&current.encode());
            }
            Outcome::NotFound => {
                e.u8(OUTCOME_NOT_FOUND);
            }
            Outcome::TimedOut { count } => {
                e.u8(OUTCOME_TIMED_OUT).u64(u64::from(*count));
            }
            Outcome::Collected { count } => {
                e.u8(OUTCOME_COLLECTED).u64(u64::from(*count));
            }
            Outcome::Batch { outcomes, applied } => {
                e.u8(OUTCOME_BATCH).bool(*applied).u64(outcomes.len() as u64);
                for o in outcomes {
                    o.encode_into(e);
                }
            }
            Outcome::Registered { record, deduplicated } => {
                e.u8(OUTCOME_REGISTERED).bytes(&record.encode()).bool(*deduplicated);
            }
            Outcome::RegisterConflict { current } => {
                e.u8(OUTCOME_REGISTER_CONFLICT).bytes(&current.encode());
            }
            Outcome::Offered { record } => {
                e.u8(OUTCOME_OFFERED).bytes(&record.encode());
            }
            Outcome::Completed { count } => {
                e.u8(OUTCOME_COMPLETED).u64(u64::from(*count));
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        d.version("outcome", OUTCOME_FORMAT)?;
        let outcome = Outcome::decode_from(&mut d, true)?;
        d.finish()?;
        Ok(outcome)
    }

    fn decode_from(d: &mut Decoder<'_>, top: bool) -> Result<Self, DecodeError> {
        let record = |d: &mut Decoder<'_>| Promise::decode(d.bytes("record")?);
        let continuation = |d: &mut Decoder<'_>| ContinuationRecord::decode(d.bytes("continuation record")?);
        Ok(match d.u8("outcome tag")? {
            OUTCOME_CREATED => Outcome::Created { promise: record(d)?, deduplicated: d.bool("deduplicated")? },
            OUTCOME_CREATE_CONFLICT => Outcome::CreateConflict { current: record(d)? },
            OUTCOME_SETTLED => Outcome::Settled { promise: record(d)?, deduplicated: d.bool("deduplicated")? },
            OUTCOME_SETTLE_CONFLICT => Outcome::SettleConflict { current: record(d)? },
            OUTCOME_NOT_FOUND => Outcome::NotFound,
            OUTCOME_TIMED_OUT => Outcome::TimedOut { count: d.u32("count")? },
            OUTCOME_COLLECTED => Outcome::Collected { count: d.u32("count")? },
            OUTCOME_BATCH if top => {
                let applied = d.bool("batch applied")?;
                let n = d.u64("batch outcomes")?;
                if n > d.remaining() as u64 {
                    return Err(DecodeError::Invalid("batch outcomes"));
                }
                let outcomes = (0..n).map(|_| Outcome::decode_from(d, false)).collect::<Result<_, _>>()?;
                Outcome::Batch { outcomes, applied }
            }
            OUTCOME_REGISTERED => {
                Outcome::Registered { record: continuation(d)?, deduplicated: d.bool("deduplicated")? }
            }
            OUTCOME_REGISTER_CONFLICT => Outcome::RegisterConflict { current: continuation(d)? },
            OUTCOME_OFFERED => Outcome::Offered { record: continuation(d)? },
            OUTCOME_COMPLETED => Outcome::Completed { count: d.u32("count")? },
            _ => return Err(DecodeError::Invalid("outcome tag")),
        })
    }
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.command {
            Command::Create { id, .. } => write!(f, "create {id} @{}", self.stamp_ms),
            Command::Settle { id, settle_as, .. } => write!(f, "{settle_as:?} {id} @{}", self.stamp_ms),
            Command::Timeout { ids } => write!(f, "timeout {} promises @{}", ids.len(), self.stamp_ms),
            Command::Collect { ids, .. } => write!(f, "collect {} promises @{}", ids.len(), self.stamp_ms),
            Command::Batch { commands } => write!(f, "batch of {} @{}", commands.len(), self.stamp_ms),
            Command::Register { continuation, .. } => {
                write!(f, "register {} -> {} @{}", continuation.id, continuation.target, self.stamp_ms)
            }
            Command::Offer { join, index, .. } => write!(f, "offer input {index} to {join} @{}", self.stamp_ms),
            Command::Complete { done } => write!(f, "complete {} continuations @{}", done.len(), self.stamp_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_outcomes_round_trip_and_reject_garbage() {
        let record = Promise {
            id: PromiseId::new_unchecked("{order-1}/step ü"),
            state: crate::State::Resolved,
            param: Value { headers: BTreeMap::from([("h".into(), "v".into())]), data: vec![0, 255, 7] },
            value: Value::default(),
            deadline_ms: -5,
            tags: BTreeMap::from([("t".into(), String::new())]),
            created_at_ms: 1,
            settled_at_ms: i64::MAX,
            idempotency_key_create: "c".into(),
            idempotency_key_settle: String::new(),
            revision: u64::MAX,
        };
        let commands = [
            Command::Create {
                id: record.id.clone(),
                param: record.param.clone(),
                deadline_ms: i64::MIN,
                tags: record.tags.clone(),
                idempotency_key: "k".into(),
            },
            Command::Settle {
                id: record.id.clone(),
                settle_as: SettleAs::Cancel,
                value: Value::default(),
                idempotency_key: String::new(),
            },
            Command::Timeout { ids: vec![record.id.clone(); 3] },
            Command::Collect { ids: vec![], retention_ms: 60_000 },
        ];
        for c in commands {
            assert_eq!(Command::decode(&c.encode()), Ok(c.clone()));
            let bytes = c.encode();
            for cut in 0..bytes.len() {
                assert!(Command::decode(&bytes[..cut]).is_err(), "a truncated command decodes: {c:?} at {cut}");
            }
        }
        let outcomes = [
            Outcome::Created { promise: record.clone(), deduplicated: true },
            Outcome::CreateConflict { current: record.clone() },
            Outcome::Settled { promise: record.clone(), deduplicated: false },
            Outcome::SettleConflict { current: record },
            Outcome::NotFound,
            Outcome::TimedOut { count: u32::MAX },
            Outcome::Collected { count: 0 },
        ];
        for o in outcomes {
            assert_eq!(Outcome::decode(&o.encode()), Ok(o.clone()));
            let bytes = o.encode();
            for cut in 0..bytes.len() {
                assert!(Outcome::decode(&bytes[..cut]).is_err(), "a truncated outcome decodes: {o:?} at {cut}");
            }
        }
        assert!(Outcome::decode(&[1, 99]).is_err());
        assert!(Command::decode(&[2, 1]).is_err(), "an unknown format version is refused");
    }

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
