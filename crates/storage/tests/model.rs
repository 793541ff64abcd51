//! The RocksDB state machine against `vow-core` alone: random command sequences over a few ids,
//! applied through `ShardStateMachine` with crashes, flushes and snapshot moves in between, and
//! checked step by step against `MemState`, the reference model.
//!
//! What is compared, and how:
//! - the records: every id's record as the server's reader returns it, before each entry of an
//!   apply call and after every operation, against the model's record at that log index;
//! - the outcomes: openraft's `ApplyResponder` cannot be built outside openraft, so an entry's
//!   reply cannot be captured here. Instead, just before the server applies each entry, the
//!   outcome is computed with `vow_core::apply` over the server's reader (the same layer and
//!   database reads the state machine's own view makes) at the model's cluster time, and
//!   compared with the model's outcome. The reply path itself (`ApplyResponse(Some(outcome))`)
//!   is not exercised;
//! - the database: after every flush, and on reopening after a crash, the shard's `state` range
//!   read straight from RocksDB (records, deadline and settled index keys, applied log id,
//!   cluster time) against the model as of the applied log id it records;
//! - the sweeps: the timeout and retention scans, read as the sweeper reads them, against the
//!   model's due promises, in key order; the ids found are then proposed as the sweeper would.
//!
//! The run fails, too, if its cases together never reached one of the outcome kinds or recovery
//! paths listed in `MUST_COVER`: passing without them would prove less than this file claims.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, stream};
use openraft::EntryPayload;
use openraft::alias::EntryPayloadOf;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::vote::RaftLeaderId;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};
use tempfile::TempDir;
use tokio::sync::broadcast;
use vow_core::codec::Decoder;
use vow_core::pipeline::{Action, Combinator, Completion, Continuation, ContinuationRecord, On, Settlement, Status};
use vow_core::{Command, MemState, NodeId, Outcome, Promise, PromiseId, Proposal, SettleAs, ShardId, Value};
use vow_storage::codec;
use vow_storage::keys;
use vow_storage::snapshot::SnapshotFile;
use vow_storage::state_machine::{ShardState, ShardStateMachine};
use vow_storage::types::{Entry, LeaderId, LogId, TypeConfig};
use vow_storage::{self as storage, CF_STATE};

/// Few ids, so that creates collide, settles race and collected ids come back.
const IDS: [&str; 6] = ["p0", "p1", "p2", "p3", "p4", "p5"];
/// Not shard 0, so that a key built without the shard prefix would not pass unnoticed.
const SHARD: ShardId = ShardId(3);
/// What the edge resolves an absent deadline to (`Limits::default_deadline_ahead_ms`).
const DEFAULT_DEADLINE_AHEAD_MS: i64 = 24 * 3600 * 1000;
/// More than the ids there are: a scan with this limit returns everything due.
const SCAN_ALL: usize = 100;

fn pid(i: usize) -> PromiseId {
    PromiseId::new_unchecked(IDS[i])
}

fn all_ids() -> impl Iterator<Item = PromiseId> {
    (0..IDS.len()).map(pid)
}

fn lid(term: u64, index: u64) -> LogId {
    LogId::new(LeaderId::new(term, NodeId(1)), index)
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

// ---------------------------------------------------------------------------------------------
// What the test generates.

#[derive(Debug, Clone)]
enum Cmd {
    /// `deadline`: an offset from the stamp, or `None` for a create that gave no deadline.
    Create {
        id: usize,
        deadline: Option<i64>,
        key: &'static str,
        tagged: bool,
    },
    Settle {
        id: Target,
        settle_as: SettleAs,
        value: u8,
        key: &'static str,
    },
    /// A stale or repeated sweep: the ids may not qualify (or exist) any more.
    Timeout {
        ids: Vec<usize>,
    },
    Collect {
        ids: Vec<usize>,
        retention_ms: i64,
    },
    /// The timeout sweep: the ids come from the server's own scan at the stamp.
    SweepTimeout {
        limit: usize,
    },
    /// The retention sweep: the ids come from the server's own scan at the stamp - retention.
    SweepCollect {
        retention_ms: i64,
        limit: usize,
    },
    /// The previous create, settle or registration again, as a client retries it.
    Retry,
    /// A continuation `CIDS[cid]` from `source` to `target` (a join of `source` and `other`
    /// when `join`, stored with the target), as a Submit's batch registers it.
    Register {
        cid: usize,
        source: Target,
        other: usize,
        /// Mostly a pending promise, so that joins wait for offers.
        target: Target,
        join: bool,
    },
    /// An input for join `CIDS[cid]`; its target is the registered one when there is one.
    Offer {
        cid: usize,
        index: u32,
        settle_as: SettleAs,
    },
    /// The executor's "done" for `CIDS[cid]`.
    Complete {
        cid: usize,
    },
}

/// Few continuation ids, so that registrations collide.
const CIDS: [&str; 3] = ["c0", "c1", "c2"];

/// Which id a settle names.
#[derive(Debug, Clone)]
enum Target {
    Any(usize),
    /// One of the promises that exist, so that settles mostly find something to race on.
    Existing(Index),
    /// One of the pending promises, if any.
    Pending(Index),
}

/// One command and how far its stamp moves from the previous one's: mostly forward, sometimes
/// not at all, sometimes back (a new leader with a slower clock), sometimes far ahead.
#[derive(Debug, Clone)]
struct Step {
    dt_ms: i64,
    cmd: Cmd,
}

#[derive(Debug, Clone)]
enum Op {
    /// One `apply` call with these commands as consecutive entries; `flush_before` flushes the
    /// layer from the stream, between two entries, as a search or snapshot on another task can.
    Apply {
        steps: Vec<Step>,
        flush_before: Option<Index>,
    },
    Flush,
    /// Drop the state machine and its database without a flush, reopen, and apply again from
    /// the log what the database does not hold; then a new term starts with a blank entry.
    Crash,
    /// Build a snapshot, install it into a fresh database elsewhere and continue there.
    Snapshot,
}

fn arb_step() -> impl Strategy<Value = Step> {
    let id = 0..IDS.len();
    let ids = prop::collection::vec(0..IDS.len(), 0..4);
    let dt_ms = prop_oneof![6 => 1i64..40, 1 => Just(0i64), 1 => -60i64..0, 1 => 100i64..400];
    let deadline = prop_oneof![3 => (-50i64..300).prop_map(Some), 1 => Just(None)];
    let create_key = prop::sample::select(vec!["", "c1", "c2"]);
    let settle_key = prop::sample::select(vec!["", "s1", "s2"]);
    let settle_as = prop::sample::select(vec![SettleAs::Resolve, SettleAs::Reject, SettleAs::Cancel]);
    let target = prop_oneof![1 => id.clone().prop_map(Target::Any), 3 => any::<Index>().prop_map(Target::Existing)];
    let retention_ms = prop::sample::select(vec![0i64, 20, 150, 1_000]);
    let cmd = prop_oneof![
        4 => (id.clone(), deadline, create_key, any::<bool>())
            .prop_map(|(id, deadline, key, tagged)| Cmd::Create { id, deadline, key, tagged }),
        4 => (target, settle_as, any::<u8>(), settle_key)
            .prop_map(|(id, settle_as, value, key)| Cmd::Settle { id, settle_as, value, key }),
        1 => ids.clone().prop_map(|ids| Cmd::Timeout { ids }),
        1 => (ids, retention_ms.clone()).prop_map(|(ids, retention_ms)| Cmd::Collect { ids, retention_ms }),
        2 => (1usize..8).prop_map(|limit| Cmd::SweepTimeout { limit }),
        2 => (retention_ms, 1usize..8).prop_map(|(retention_ms, limit)| Cmd::SweepCollect { retention_ms, limit }),
        3 => Just(Cmd::Retry),
        3 => (
            0..CIDS.len(),
            prop_oneof![1 => (0..IDS.len()).prop_map(Target::Any), 3 => any::<Index>().prop_map(Target::Existing)],
            0..IDS.len(),
            prop_oneof![1 => (0..IDS.len()).prop_map(Target::Any), 3 => any::<Index>().prop_map(Target::Pending)],
            prop::bool::weighted(0.7)
        )
            .prop_map(|(cid, source, other, target, join)| Cmd::Register { cid, source, other, target, join }),
        6 => (0..CIDS.len(), 0u32..2, prop::sample::select(vec![SettleAs::Resolve, SettleAs::Resolve, SettleAs::Reject]))
            .prop_map(|(cid, index, settle_as)| Cmd::Offer { cid, index, settle_as }),
        2 => (0..CIDS.len()).prop_map(|cid| Cmd::Complete { cid }),
    ];
    (dt_ms, cmd).prop_map(|(dt_ms, cmd)| Step { dt_ms, cmd })
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (prop::collection::vec(arb_step(), 1..5), prop::option::weighted(0.25, any::<Index>()))
            .prop_map(|(steps, flush_before)| Op::Apply { steps, flush_before }),
        1 => Just(Op::Flush),
        1 => Just(Op::Crash),
        1 => Just(Op::Snapshot),
    ]
}

// ---------------------------------------------------------------------------------------------
// The model: vow-core alone.

struct Model {
    /// The state after the last entry.
    mem: MemState,
    /// `history[i]`: the state after entry `i` (`history[0]`: nothing applied).
    history: Vec<MemState>,
    /// `outcomes[i - 1]`: entry `i`'s outcome (`None` for a blank entry).
    outcomes: Vec<Option<Outcome>>,
    /// The Raft log: what a crashed replica applies again.
    log: Vec<Entry>,
}

impl Model {
    fn new() -> Self {
        Model { mem: MemState::default(), history: vec![MemState::default()], outcomes: Vec::new(), log: Vec::new() }
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.log.last().map(|e| e.log_id)
    }

    fn log_id_at(&self, index: usize) -> Option<LogId> {
        index.checked_sub(1).map(|i| self.log[i].log_id)
    }

    /// Appends an entry to the log and applies it to the model.
    fn append(&mut self, term: u64, payload: EntryPayloadOf<TypeConfig>) -> Entry {
        let index = self.log.len() as u64 + 1;
        // `MemState::apply` applies at `applied_index + 1`; blank entries take log indexes too.
        self.mem.applied_index = index - 1;
        let outcome = match &payload {
            EntryPayload::Normal(proposal) => Some(self.mem.apply(proposal)),
            _ => None,
        };
        self.mem.applied_index = index;
        self.history.push(self.mem.clone());
        self.outcomes.push(outcome);
        let entry = Entry { log_id: lid(term, index), payload };
        self.log.push(entry.clone());
        entry
    }
}

/// Pending promises whose deadline is at or before `up_to_ms` (settled ones settled by then, if
/// `settled`), in the order of the server's index keys: by time, then id bytes.
fn due(mem: &MemState, settled: bool, up_to_ms: i64, limit: usize) -> Vec<PromiseId> {
    let mut found: Vec<(i64, &PromiseId)> = mem
        .promises
        .values()
        .filter(|p| p.state.is_settled() == settled)
        .map(|p| (if settled { p.settled_at_ms } else { p.deadline_ms }, &p.id))
        .filter(|(t, _)| *t <= up_to_ms)
        .collect();
    found.sort();
    found.into_iter().take(limit).map(|(_, id)| id.clone()).collect()
}

/// The index keys the server should hold for these records and continuations.
fn index_keys(mem: &MemState) -> BTreeSet<Vec<u8>> {
    let promises = mem.promises.values().map(|p| {
        if p.state.is_settled() {
            keys::timed(SHARD, keys::STATE_BY_SETTLED, p.settled_at_ms, p.id.as_str())
        } else {
            keys::timed(SHARD, keys::STATE_BY_DEADLINE, p.deadline_ms, p.id.as_str())
        }
    });
    let anchors =
        mem.continuations.values().map(|r| keys::anchor(SHARD, r.continuation.anchor().as_str(), &r.continuation.id));
    let ready = mem
        .continuations
        .values()
        .filter(|r| r.status == Status::Ready)
        .map(|r| keys::named(SHARD, keys::STATE_READY, &r.continuation.id));
    promises.chain(anchors).chain(ready).collect()
}

// ---------------------------------------------------------------------------------------------
// The real thing.

struct Replica {
    db: Arc<rocksdb::DB>,
    sm: ShardStateMachine,
    /// Declared last: the directory goes after the database that lives in it.
    dir: TempDir,
}

impl Replica {
    fn open(dir: TempDir) -> io::Result<Replica> {
        let db = storage::open(&dir.path().join("db"))?;
        let (announce, _) = broadcast::channel(1024);
        let sm = ShardStateMachine::open(db.clone(), SHARD, dir.path().join("snapshots"), announce)?;
        Ok(Replica { db, sm, dir })
    }
}

/// The shard's `state` range as RocksDB holds it, bypassing the write-behind layer.
#[derive(Debug)]
struct Stored {
    records: BTreeMap<PromiseId, Promise>,
    continuations: BTreeMap<String, ContinuationRecord>,
    index_keys: BTreeSet<Vec<u8>>,
    applied: Option<LogId>,
    cluster_time_ms: Option<i64>,
}

fn stored(db: &rocksdb::DB) -> io::Result<Stored> {
    let state = db.cf_handle(CF_STATE).ok_or_else(|| io::Error::other("no state family"))?;
    let prefix = keys::shard_prefix(SHARD);
    let mut out = Stored {
        records: BTreeMap::new(),
        continuations: BTreeMap::new(),
        index_keys: BTreeSet::new(),
        applied: None,
        cluster_time_ms: None,
    };
    let corrupt = |e: vow_core::DecodeError| io::Error::other(e.to_string());
    for item in db.iterator_cf(state, rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward)) {
        let (key, value) = item.map_err(io::Error::other)?;
        if !key.starts_with(&prefix) {
            break;
        }
        match (key.get(4).copied(), key.get(5).copied()) {
            (Some(keys::STATE_META), Some(keys::SM_APPLIED)) => {
                out.applied = codec::read_opt_log_id(&mut Decoder::new(&value)).map_err(corrupt)?;
            }
            (Some(keys::STATE_META), Some(keys::SM_CLUSTER_TIME)) => {
                out.cluster_time_ms = Some(Decoder::new(&value).i64("cluster time").map_err(corrupt)?);
            }
            (Some(keys::STATE_META), _) => {}
            (Some(keys::STATE_PROMISE), _) => {
                let p = Promise::decode(&value).map_err(corrupt)?;
                if key[5..] != *p.id.as_str().as_bytes() {
                    return Err(io::Error::other(format!("record of {} under key {key:?}", p.id)));
                }
                out.records.insert(p.id.clone(), p);
            }
            (Some(keys::STATE_CONTINUATION), _) => {
                let r = ContinuationRecord::decode(&value).map_err(corrupt)?;
                if key[5..] != *r.continuation.id.as_bytes() {
                    return Err(io::Error::other(format!("continuation {} under key {key:?}", r.continuation.id)));
                }
                out.continuations.insert(r.continuation.id.clone(), r);
            }
            _ => {
                out.index_keys.insert(key.to_vec());
            }
        }
    }
    Ok(out)
}

/// What the reader returns for every id.
fn read_all(reader: &ShardState) -> io::Result<Vec<Option<Promise>>> {
    all_ids().map(|id| reader.get(&id)).collect()
}

/// What the stream saw just before handing the server entry `index`.
#[derive(Debug)]
struct Seen {
    index: u64,
    records: Vec<Option<Promise>>,
    outcome: Option<Outcome>,
    /// The database right after a flush at this point, if the op asked for one.
    flushed: Option<Stored>,
}

/// How often each path the test claims to cover was taken, over all cases of a run.
type Coverage = BTreeMap<&'static str, u32>;

/// Every outcome kind and every recovery path must be reached in a run, or the test proves
/// less than it says (checked after the last case).
const MUST_COVER: &[&str] = &[
    "created",
    "created timed out",
    "created again after collection",
    "create deduplicated",
    "create conflict",
    "settled",
    "settle deduplicated",
    "settle conflict",
    "not found",
    "timed out",
    "timeout of nothing",
    "collected",
    "collect of nothing",
    "sweep proposed a timeout",
    "sweep proposed a collection",
    "flush between two entries",
    "crash lost applied entries",
    "crash kept flushed entries",
    "snapshot moved records",
    "watch reads",
    "registered",
    "registered ready",
    "register deduplicated",
    "register conflict",
    "offered",
    "join decided",
    "completed",
    "continuation made ready by a settle",
];

fn outcome_kind(o: &Outcome) -> &'static str {
    match o {
        Outcome::Created { deduplicated: true, .. } => "create deduplicated",
        Outcome::Created { promise, .. } if promise.state.is_settled() => "created timed out",
        Outcome::Created { .. } => "created",
        Outcome::CreateConflict { .. } => "create conflict",
        Outcome::Settled { deduplicated: true, .. } => "settle deduplicated",
        Outcome::Settled { .. } => "settled",
        Outcome::SettleConflict { .. } => "settle conflict",
        Outcome::NotFound => "not found",
        Outcome::TimedOut { count: 0 } => "timeout of nothing",
        Outcome::TimedOut { .. } => "timed out",
        Outcome::Collected { count: 0 } => "collect of nothing",
        Outcome::Collected { .. } => "collected",
        Outcome::Batch { .. } => "batch",
        Outcome::Registered { deduplicated: true, .. } => "register deduplicated",
        Outcome::Registered { record, .. } if record.status == Status::Ready => "registered ready",
        Outcome::Registered { .. } => "registered",
        Outcome::RegisterConflict { .. } => "register conflict",
        Outcome::Offered { record } if record.status == Status::Ready => "join decided",
        Outcome::Offered { .. } => "offered",
        Outcome::Completed { .. } => "completed",
    }
}

struct Harness {
    model: Model,
    replica: Replica,
    /// The previous proposal's stamp.
    clock_ms: i64,
    term: u64,
    /// The last create, settle or registration proposed, for `Cmd::Retry`.
    last_request: Option<Command>,
    coverage: Coverage,
}

impl Harness {
    fn start() -> io::Result<Harness> {
        let replica = Replica::open(tempfile::tempdir()?)?;
        Ok(Harness {
            model: Model::new(),
            replica,
            clock_ms: 1_000,
            term: 1,
            last_request: None,
            coverage: Coverage::new(),
        })
    }

    fn hit(&mut self, what: &'static str) {
        *self.coverage.entry(what).or_default() += 1;
    }

    async fn run(mut self, ops: &[Op]) -> Result<Coverage, TestCaseError> {
        for op in ops {
            match op {
                Op::Apply { steps, flush_before } => self.propose_and_apply(steps, flush_before.as_ref()).await?,
                Op::Flush => {
                    self.replica.sm.reader().flush().map_err(fail)?;
                    self.check_stored(&self.replica.db, self.model.log.len())?;
                }
                Op::Crash => self = self.crash().await?,
                Op::Snapshot => self.move_by_snapshot().await?,
            }
            self.check_now().await?;
        }
        // Last, as it flushes (checking it after every op would flush before every crash).
        self.check_watch_reads()?;
        Ok(self.coverage)
    }

    /// Watch's catch-up reads (`settled_since`): read page by page from the start, they give
    /// every settled record once, in (revision, id) order; resumed from any record's position,
    /// exactly those of later entries.
    fn check_watch_reads(&mut self) -> Result<(), TestCaseError> {
        let reader = self.replica.sm.reader();
        let mut want: Vec<&Promise> = self.model.mem.promises.values().filter(|p| p.state.is_settled()).collect();
        want.sort_by(|a, b| (a.revision, a.id.as_str()).cmp(&(b.revision, b.id.as_str())));
        let ids = |ps: &[&Promise]| ps.iter().map(|p| p.id.to_string()).collect::<Vec<_>>();
        let mut got: Vec<Promise> = Vec::new();
        let (mut after, mut from) = (0, i64::MIN);
        loop {
            let (page, next) = reader.settled_since(after, from, 2).map_err(fail)?;
            if let Some(last) = page.last() {
                (after, from) = (last.revision, next.unwrap_or(last.settled_at_ms));
            }
            got.extend(page);
            if next.is_none() {
                break;
            }
        }
        prop_assert_eq!(ids(&got.iter().collect::<Vec<_>>()), ids(&want), "settlements read page by page");
        for p in &want {
            let (page, next) = reader.settled_since(p.revision, p.settled_at_ms, SCAN_ALL).map_err(fail)?;
            let later: Vec<&Promise> = want.iter().copied().filter(|q| q.revision > p.revision).collect();
            prop_assert_eq!(next, None);
            prop_assert_eq!(ids(&page.iter().collect::<Vec<_>>()), ids(&later), "settlements after {}", p.id);
        }
        if !want.is_empty() {
            self.hit("watch reads");
        }
        Ok(())
    }

    /// Turns the steps into proposals, as a leader would at their stamps, appends them to the
    /// log and model, and has the server apply them in one call.
    async fn propose_and_apply(&mut self, steps: &[Step], flush_before: Option<&Index>) -> Result<(), TestCaseError> {
        let reader = self.replica.sm.reader();
        // The sweeps read the server's state before this call's entries, as the sweeper reads
        // the leader's state while earlier proposals are still on their way.
        let base = self.model.mem.clone();
        let mut entries = Vec::new();
        for step in steps {
            let stamp_ms = self.clock_ms + step.dt_ms;
            self.clock_ms = stamp_ms;
            let command = match &step.cmd {
                Cmd::Retry => self.last_request.clone(),
                cmd => command(&reader, &base, stamp_ms, cmd)?,
            };
            let Some(command) = command else { continue };
            if matches!(command, Command::Create { .. } | Command::Settle { .. } | Command::Register { .. }) {
                self.last_request = Some(command.clone());
            }
            match (&step.cmd, &command) {
                (Cmd::SweepTimeout { .. }, _) => self.hit("sweep proposed a timeout"),
                (Cmd::SweepCollect { .. }, _) => self.hit("sweep proposed a collection"),
                (_, Command::Create { id, .. })
                    if !self.model.mem.promises.contains_key(id)
                        && self.model.history.iter().any(|h| h.promises.contains_key(id)) =>
                {
                    self.hit("created again after collection")
                }
                _ => {}
            }
            let ready_before = self.model.mem.continuations.values().filter(|r| r.status == Status::Ready).count();
            let settles = matches!(command, Command::Settle { .. } | Command::Timeout { .. } | Command::Create { .. });
            let payload = EntryPayload::Normal(Arc::new(Proposal { stamp_ms, command }));
            entries.push(self.model.append(self.term, payload));
            let ready_after = self.model.mem.continuations.values().filter(|r| r.status == Status::Ready).count();
            if settles && ready_after > ready_before {
                self.hit("continuation made ready by a settle");
            }
            if let Some(Some(outcome)) = self.model.outcomes.last() {
                let kind = outcome_kind(outcome);
                self.hit(kind);
            }
        }
        let flush_at = flush_before.map(|i| i.index(entries.len().max(1)));
        if flush_at.is_some_and(|at| at > 0 && at < entries.len()) {
            self.hit("flush between two entries");
        }
        self.apply(entries, flush_at).await
    }

    /// Applies `entries` (already in the model) in one call and compares what the stream saw.
    async fn apply(&mut self, entries: Vec<Entry>, flush_at: Option<usize>) -> Result<(), TestCaseError> {
        let reader = self.replica.sm.reader();
        let db = self.replica.db.clone();
        let time_before: Vec<i64> =
            entries.iter().map(|e| self.model.history[e.log_id.index as usize - 1].cluster_time_ms).collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let items = stream::iter(entries.into_iter().enumerate()).map(move |(pos, entry)| {
            let index = entry.log_id.index;
            let flushed = if flush_at == Some(pos) {
                reader.flush()?;
                Some(stored(&db)?)
            } else {
                None
            };
            let records = read_all(&reader)?;
            let outcome = match &entry.payload {
                EntryPayload::Normal(p) => Some(vow_core::apply(&reader, time_before[pos], index, p)?.outcome),
                _ => None,
            };
            sink.lock().expect("observations").push(Seen { index, records, outcome, flushed });
            Ok::<EntryResponder<TypeConfig>, io::Error>((entry, None))
        });
        self.replica.sm.apply(items).await.map_err(fail)?;
        let seen = std::mem::take(&mut *seen.lock().expect("observations"));
        for s in seen {
            let before = s.index as usize - 1;
            for (id, got) in all_ids().zip(&s.records) {
                let want = self.model.history[before].promises.get(&id);
                prop_assert_eq!(got.as_ref(), want, "record of {} before entry {}", id, s.index);
            }
            prop_assert_eq!(&s.outcome, &self.model.outcomes[before], "outcome of entry {}", s.index);
            if let Some(stored) = &s.flushed {
                self.compare_stored(stored, before)?;
            }
        }
        Ok(())
    }

    async fn crash(self) -> Result<Harness, TestCaseError> {
        let Harness { model, replica: Replica { db, sm, dir }, clock_ms, term, last_request, coverage } = self;
        // Everything holding the database goes, so that RocksDB closes and reopens for real.
        drop(sm);
        drop(db);
        let replica = Replica::open(dir).map_err(fail)?;
        let mut this = Harness { model, replica, clock_ms, term, last_request, coverage };
        this.recover().await?;
        Ok(this)
    }

    async fn recover(&mut self) -> Result<(), TestCaseError> {
        let (applied, _) = self.replica.sm.applied_state().await.map_err(fail)?;
        let at = applied.map_or(0, |id| id.index as usize);
        prop_assert!(at <= self.model.log.len(), "applied {} of {} entries", at, self.model.log.len());
        prop_assert_eq!(applied, self.model.log_id_at(at), "the applied log id is one of the log's");
        // The database holds exactly the state as of its applied log id, and the reader has
        // nothing else to offer yet.
        self.check_stored(&self.replica.db, at)?;
        let reader = self.replica.sm.reader();
        for (id, got) in all_ids().zip(read_all(&reader).map_err(fail)?) {
            prop_assert_eq!(got.as_ref(), self.model.history[at].promises.get(&id), "record of {} on reopening", id);
        }
        let again = self.model.log[at..].to_vec();
        if !again.is_empty() {
            self.hit("crash lost applied entries");
        }
        if at > 0 {
            self.hit("crash kept flushed entries");
        }
        self.apply(again, None).await?;
        // The restarted node's first entry as the leader of a new term.
        self.term += 1;
        let blank = self.model.append(self.term, EntryPayload::Blank);
        self.apply(vec![blank], None).await
    }

    async fn move_by_snapshot(&mut self) -> Result<(), TestCaseError> {
        let snapshot = self.replica.sm.get_snapshot_builder().await.build_snapshot().await.map_err(fail)?;
        let n = self.model.log.len();
        prop_assert_eq!(snapshot.meta.last_log_id, self.model.last_log_id(), "a snapshot covers all applied");
        // A build writes everything applied to the database first.
        self.check_stored(&self.replica.db, n)?;

        // The transfer: the receiver spools the bytes to a file beside its own snapshots.
        let mut file = snapshot.snapshot.file;
        file.seek(SeekFrom::Start(0)).map_err(fail)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(fail)?;
        let mut target = Replica::open(tempfile::tempdir().map_err(fail)?).map_err(fail)?;
        let spool_dir = target.dir.path().join("snapshots");
        std::fs::create_dir_all(&spool_dir).map_err(fail)?;
        let spooled = spool_dir.join("recv-model.tmp");
        std::fs::write(&spooled, &bytes).map_err(fail)?;
        let received = SnapshotFile::open(spooled).map_err(fail)?;
        target.sm.install_snapshot(&snapshot.meta, received).await.map_err(fail)?;

        let (applied, _) = target.sm.applied_state().await.map_err(fail)?;
        prop_assert_eq!(applied, snapshot.meta.last_log_id, "installed up to the snapshot");
        self.check_stored(&target.db, n)?;
        if !self.model.mem.promises.is_empty() {
            self.hit("snapshot moved records");
        }
        self.replica = target;
        Ok(())
    }

    /// Compares the database with the model as of log index `at`.
    fn check_stored(&self, db: &rocksdb::DB, at: usize) -> Result<(), TestCaseError> {
        let found = stored(db).map_err(fail)?;
        self.compare_stored(&found, at)
    }

    fn compare_stored(&self, found: &Stored, at: usize) -> Result<(), TestCaseError> {
        let want = &self.model.history[at];
        prop_assert_eq!(found.applied, self.model.log_id_at(at), "stored applied log id");
        prop_assert_eq!(found.cluster_time_ms.unwrap_or(0), want.cluster_time_ms, "stored cluster time at {}", at);
        prop_assert_eq!(&found.records, &want.promises, "stored records at {}", at);
        prop_assert_eq!(&found.continuations, &want.continuations, "stored continuations at {}", at);
        prop_assert_eq!(&found.index_keys, &index_keys(want), "stored index keys at {}", at);
        Ok(())
    }

    /// The server as it stands against the model after the last entry.
    async fn check_now(&mut self) -> Result<(), TestCaseError> {
        let (applied, _) = self.replica.sm.applied_state().await.map_err(fail)?;
        prop_assert_eq!(applied, self.model.last_log_id(), "applied log id");
        let reader = self.replica.sm.reader();
        for (id, got) in all_ids().zip(read_all(&reader).map_err(fail)?) {
            prop_assert_eq!(got.as_ref(), self.model.mem.promises.get(&id), "record of {} now", id);
        }
        let pending = reader.due_for_timeout(i64::MAX - 1, SCAN_ALL).map_err(fail)?;
        prop_assert_eq!(pending, due(&self.model.mem, false, i64::MAX - 1, SCAN_ALL), "deadline index");
        let settled = reader.due_for_collection(i64::MAX - 1, SCAN_ALL).map_err(fail)?;
        prop_assert_eq!(settled, due(&self.model.mem, true, i64::MAX - 1, SCAN_ALL), "settled index");
        let mem = &self.model.mem;
        for cid in CIDS {
            let got = reader.continuation(cid).map_err(fail)?;
            prop_assert_eq!(got.as_ref(), mem.continuations.get(cid), "continuation {} now", cid);
        }
        let ready: Vec<String> = mem
            .continuations
            .values()
            .filter(|r| r.status == Status::Ready)
            .map(|r| r.continuation.id.clone())
            .collect();
        prop_assert_eq!(reader.ready(SCAN_ALL).map_err(fail)?, ready, "ready index");
        for id in all_ids() {
            let want = vow_core::PromiseView::anchored_on(mem, &id).expect("infallible");
            prop_assert_eq!(reader.anchored_on(&id).map_err(fail)?, want, "continuations stored with {}", id);
        }
        Ok(())
    }
}

/// The id a target names, given the model's state as the server's reader shows it now.
fn pick(base: &MemState, target: &Target) -> PromiseId {
    let nth = |ids: Vec<&PromiseId>, i: &Index| {
        if ids.is_empty() { pid(0) } else { ids[i.index(ids.len())].clone() }
    };
    match target {
        Target::Any(i) => pid(*i),
        Target::Existing(i) => nth(base.promises.keys().collect(), i),
        Target::Pending(i) => nth(base.promises.values().filter(|p| !p.state.is_settled()).map(|p| &p.id).collect(), i),
    }
}

/// The command a step proposes at `stamp_ms`, or `None` when a sweep finds nothing (the sweeper
/// proposes nothing then). `base` is the model's state as the server's reader shows it now.
fn command(reader: &ShardState, base: &MemState, stamp_ms: i64, cmd: &Cmd) -> Result<Option<Command>, TestCaseError> {
    let ids = |ids: &[usize]| ids.iter().map(|&i| pid(i)).collect::<Vec<_>>();
    Ok(Some(match cmd {
        Cmd::Create { id, deadline, key, tagged } => Command::Create {
            id: pid(*id),
            param: Value { headers: BTreeMap::new(), data: format!("param@{stamp_ms}").into_bytes() },
            deadline_ms: stamp_ms + deadline.unwrap_or(DEFAULT_DEADLINE_AHEAD_MS),
            tags: if *tagged { BTreeMap::from([("kind".into(), "x".into())]) } else { BTreeMap::new() },
            idempotency_key: (*key).into(),
        },
        Cmd::Settle { id, settle_as, value, key } => Command::Settle {
            id: pick(base, id),
            settle_as: *settle_as,
            value: Value { headers: BTreeMap::from([("h".into(), value.to_string())]), data: vec![*value] },
            idempotency_key: (*key).into(),
        },
        Cmd::Timeout { ids: which } => Command::Timeout { ids: ids(which) },
        Cmd::Collect { ids: which, retention_ms } => Command::Collect { ids: ids(which), retention_ms: *retention_ms },
        Cmd::SweepTimeout { limit } => {
            let found = reader.due_for_timeout(stamp_ms, *limit).map_err(fail)?;
            prop_assert_eq!(&found, &due(base, false, stamp_ms, *limit), "timeout sweep at {}", stamp_ms);
            if found.is_empty() {
                return Ok(None);
            }
            Command::Timeout { ids: found }
        }
        Cmd::SweepCollect { retention_ms, limit } => {
            let cutoff = stamp_ms.saturating_sub(*retention_ms);
            let found = reader.due_for_collection(cutoff, *limit).map_err(fail)?;
            prop_assert_eq!(&found, &due(base, true, cutoff, *limit), "retention sweep at {}", cutoff);
            if found.is_empty() {
                return Ok(None);
            }
            Command::Collect { ids: found, retention_ms: *retention_ms }
        }
        Cmd::Retry => return Ok(None),
        Cmd::Register { cid, source, other, target, join } => {
            let source = pick(base, source);
            let sources = if *join && pid(*other) != source { vec![source, pid(*other)] } else { vec![source] };
            Command::Register {
                continuation: Continuation {
                    id: CIDS[*cid].to_owned(),
                    combinator: (sources.len() > 1).then_some(Combinator::All),
                    sources,
                    target: pick(base, target),
                    on: On::Resolved,
                    action: Action::Forward { recover: false },
                },
                target_deadline_ms: stamp_ms + 1_000,
            }
        }
        Cmd::Offer { cid, index, settle_as } => Command::Offer {
            join: CIDS[*cid].to_owned(),
            target: base.continuations.get(CIDS[*cid]).map_or_else(|| pid(0), |r| r.continuation.target.clone()),
            index: *index,
            outcome: Settlement {
                state: settle_as.state(),
                value: Value { headers: BTreeMap::new(), data: vec![*index as u8] },
            },
        },
        Cmd::Complete { cid } => Command::Complete {
            done: vec![
                Completion { id: CIDS[*cid].to_owned(), note: format!("done@{stamp_ms}") },
                Completion { id: CIDS[(*cid + 1) % CIDS.len()].to_owned(), note: "the next".into() },
            ],
        },
    }))
}

/// Runs the cases with proptest's runner rather than the `proptest!` macro, so that the
/// coverage of all cases can be checked at the end.
#[test]
fn the_rocksdb_state_machine_agrees_with_vow_core() {
    // Every case opens several RocksDB instances; ~100 cases keep the test to seconds and reach
    // every path in MUST_COVER in 30 runs of 30 (the pipeline commands made the mix wider).
    // A failure is shrunk to a minimal sequence, printed, and its seed persisted under
    // proptest-regressions/ so that the next run replays it first.
    let config = ProptestConfig {
        cases: 96,
        max_shrink_iters: 4_000,
        source_file: Some(file!()),
        // Beside this file, where `proptest!` puts an integration test's, without its warning.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let coverage = Mutex::new(Coverage::new());
    let result = runner.run(&prop::collection::vec(arb_op(), 1..32), |ops| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let covered = rt.block_on(async { Harness::start().map_err(fail)?.run(&ops).await })?;
        let mut total = coverage.lock().expect("coverage");
        for (what, n) in covered {
            *total.entry(what).or_default() += n;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let total = coverage.into_inner().expect("coverage");
    let missed: Vec<&str> = MUST_COVER.iter().copied().filter(|what| !total.contains_key(what)).collect();
    assert!(missed.is_empty(), "never reached: {missed:?} (reached: {total:?})");
    println!("coverage over all cases: {total:?}");
}
