//! Applied changes that are not in RocksDB yet, and the records written there lately.
//!
//! Applying an entry changes promise records and their index keys in memory only
//! ([`Unflushed`]); every [`FLUSH_RECORDS`] records (or [`FLUSH_BYTES`]) they are written to the
//! `state` family in one batch together with the applied log id. This is safe because the Raft
//! log is the durable copy: an entry is applied only once it is committed, that is fsynced on a
//! majority, and on restart everything after the applied log id in the database is applied
//! again from the log. A snapshot flushes first, so the log is never purged past what the
//! database holds.
//!
//! What it saves is most of the `state` writes of a short-lived promise. Under create-settle
//! load a promise is created and settled a few milliseconds apart; both changes land in the same
//! unflushed generation, so RocksDB sees its record once instead of twice, and its deadline index
//! key (written by the create, deleted by the settle) not at all — two memtable inserts instead
//! of five, and less flush and compaction work behind them.
//!
//! Everyone reading the shard's state goes through [`WriteBehind`]: first the unflushed
//! changes, then the records flushed lately ([`RecentRecords`], which also spares a settle the
//! memtable search for the record its create just wrote), then the database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::{Mutex, MutexGuard};

use rocksdb::{DB, WriteBatch};
use vow_core::codec::Encoder;
use vow_core::pipeline::{ContinuationRecord, Status};
use vow_core::{Change, ContinuationChange, Promise, PromiseId, ShardId};

use crate::codec;
use crate::types::{LogId, StoredMembership};
use crate::{CF_STATE, cf, io_err, keys};

/// The maps consulted for every command, keyed by promise id or state key. foldhash instead of
/// the standard SipHash (hashing and lookups were 2.7% of a follower's samples, now 1.1%); ids
/// are chosen by clients, so each map still gets a random seed.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type IdMap<V> = Map<PromiseId, V>;
type KeyMap<V> = Map<Vec<u8>, V>;

/// Unflushed records at which apply writes them to the database.
const FLUSH_RECORDS: usize = 1024;
/// Approximate unflushed bytes at which apply writes them: values go up to 1 MiB.
const FLUSH_BYTES: usize = 2 << 20;
/// Records per generation of [`RecentRecords`].
const RECENT_RECORDS: usize = 4096;
/// Approximate bytes per generation of [`RecentRecords`].
const RECENT_BYTES: usize = 2 << 20;

/// The newest value of one key since the last flush.
#[derive(Debug, Clone)]
struct Slot<V> {
    /// `None`: deleted.
    value: Option<V>,
    /// The key may be in the database, so a delete must be written. False when the key was
    /// created since the last flush: then a delete cancels the put and nothing is written.
    in_db: bool,
}

/// The maps slots are kept in: hashed (records, timed index keys) or ordered (continuation
/// keys, which are scanned by prefix).
trait SlotMap<K, V> {
    fn slot(&mut self, key: &K) -> Option<&mut Slot<V>>;
    fn insert_slot(&mut self, key: K, slot: Slot<V>);
    fn remove_slot(&mut self, key: &K);
}

impl<K: Eq + std::hash::Hash, V> SlotMap<K, V> for Map<K, Slot<V>> {
    fn slot(&mut self, key: &K) -> Option<&mut Slot<V>> {
        self.get_mut(key)
    }
    fn insert_slot(&mut self, key: K, slot: Slot<V>) {
        self.insert(key, slot);
    }
    fn remove_slot(&mut self, key: &K) {
        self.remove(key);
    }
}

impl<K: Ord, V> SlotMap<K, V> for BTreeMap<K, Slot<V>> {
    fn slot(&mut self, key: &K) -> Option<&mut Slot<V>> {
        self.get_mut(key)
    }
    fn insert_slot(&mut self, key: K, slot: Slot<V>) {
        self.insert(key, slot);
    }
    fn remove_slot(&mut self, key: &K) {
        self.remove(key);
    }
}

fn put<K, V>(map: &mut impl SlotMap<K, V>, key: K, value: V, new: bool) {
    match map.slot(&key) {
        Some(slot) => slot.value = Some(value),
        None => map.insert_slot(key, Slot { value: Some(value), in_db: !new }),
    }
}

fn delete<K, V>(map: &mut impl SlotMap<K, V>, key: K) {
    match map.slot(&key) {
        Some(slot) if !slot.in_db => map.remove_slot(&key),
        Some(slot) => slot.value = None,
        None => map.insert_slot(key, Slot { value: None, in_db: true }),
    }
}

/// The state machine's own keys, written with every flush.
#[derive(Debug, Clone, Default)]
pub(crate) struct Meta {
    pub applied: Option<LogId>,
    pub cluster_time_ms: i64,
    /// Only when it changed since the last flush.
    pub membership: Option<StoredMembership>,
}

/// Changes applied since the last flush.
#[derive(Default)]
struct Unflushed {
    records: IdMap<Slot<Promise>>,
    /// Index keys (`S 0x02 …`, `S 0x03 …`); their values are empty.
    index: KeyMap<Slot<()>>,
    continuations: Map<String, Slot<ContinuationRecord>>,
    /// Anchor and ready keys (`S 0x05 …`, `S 0x06 …`), ordered for prefix scans.
    continuation_keys: BTreeMap<Vec<u8>, Slot<()>>,
    bytes: usize,
    /// `None` until something was applied since the last flush.
    meta: Option<Meta>,
}

/// The records flushed most recently (`None`: deleted), so a command on a promise written a
/// moment ago does not search the memtable for it (~5% of the cluster's CPU under create-settle
/// load). Two generations: when the young one holds [`RECENT_RECORDS`] records or
/// [`RECENT_BYTES`] it becomes the old one and the old one is dropped, so memory stays under
/// ~4 MiB per shard.
#[derive(Default)]
struct RecentRecords {
    young: IdMap<Option<Promise>>,
    young_bytes: usize,
    old: IdMap<Option<Promise>>,
}

impl RecentRecords {
    fn get(&self, id: &PromiseId) -> Option<&Option<Promise>> {
        self.young.get(id).or_else(|| self.old.get(id))
    }

    fn insert(&mut self, id: PromiseId, record: Option<Promise>) {
        if self.young.len() >= RECENT_RECORDS || self.young_bytes >= RECENT_BYTES {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        self.young_bytes += record.as_ref().map_or(id.as_str().len(), approx_size);
        self.young.insert(id, record);
    }
}

/// Roughly the memory a record holds: its variable-length parts plus a fixed overhead.
fn approx_size(p: &Promise) -> usize {
    let strings =
        |m: &std::collections::BTreeMap<String, String>| m.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    256 + p.id.as_str().len()
        + p.param.data.len()
        + p.value.data.len()
        + strings(&p.param.headers)
        + strings(&p.value.headers)
        + strings(&p.tags)
        + p.idempotency_key_create.len()
        + p.idempotency_key_settle.len()
}

/// The secondary index key a record version contributes.
pub(crate) fn index_key(shard: ShardId, p: &Promise) -> Vec<u8> {
    if p.state.is_settled() {
        keys::timed(shard, keys::STATE_BY_SETTLED, p.settled_at_ms, p.id.as_str())
    } else {
        keys::timed(shard, keys::STATE_BY_DEADLINE, p.deadline_ms, p.id.as_str())
    }
}

/// One shard's in-memory layer over its `state` family, shared by the state machine (the only
/// writer) and every reader.
#[derive(Default)]
pub(crate) struct WriteBehind {
    inner: Mutex<Layer>,
}

#[derive(Default)]
pub(crate) struct Layer {
    unflushed: Unflushed,
    recent: RecentRecords,
    /// How many continuations are stored with each promise, in the database and unflushed
    /// together: a settle looks for continuations to wake only when its promise has some, so
    /// promises without continuations cost no database scan.
    anchors: Map<PromiseId, u32>,
}

impl WriteBehind {
    /// The layer, or an error if a panic interrupted an update: an entry applied halfway is
    /// not a state to read or write out (the log cache may shrug off a poisoned lock; this
    /// layer holds the only copy of what was applied since the last write).
    pub fn lock(&self) -> io::Result<MutexGuard<'_, Layer>> {
        self.inner.lock().map_err(|_| io::Error::other("write-behind layer poisoned by a panic during apply"))
    }
}

impl Layer {
    /// The record as the layer knows it: `Some(None)` if deleted, `None` if the database must
    /// be asked.
    pub fn record(&self, id: &PromiseId) -> Option<Option<&Promise>> {
        match self.unflushed.records.get(id) {
            Some(slot) => Some(slot.value.as_ref()),
            None => self.recent.get(id).map(Option::as_ref),
        }
    }

    /// Takes in one applied change.
    pub fn change(&mut self, shard: ShardId, change: Change) {
        let created = change.before.is_none();
        if let Some(before) = &change.before {
            delete(&mut self.unflushed.index, index_key(shard, before));
            if change.after.is_none() {
                delete(&mut self.unflushed.records, before.id.clone());
            }
        }
        if let Some(after) = change.after {
            // A record absent before this change has no keys in the database unless the layer
            // holds a delete of them, which `put` keeps.
            put(&mut self.unflushed.index, index_key(shard, &after), (), created);
            self.unflushed.bytes += approx_size(&after);
            put(&mut self.unflushed.records, after.id.clone(), after, created);
        }
    }

    /// Records what has been applied, to be written with the next flush.
    pub fn set_meta(&mut self, applied: Option<LogId>, cluster_time_ms: i64, membership: Option<&StoredMembership>) {
        let meta = self.unflushed.meta.get_or_insert_with(Meta::default);
        meta.applied = applied;
        meta.cluster_time_ms = cluster_time_ms;
        if let Some(m) = membership {
            meta.membership = Some(m.clone());
        }
    }

    /// The continuation as the layer knows it: `Some(None)` if deleted, `None` if the database
    /// must be asked.
    pub fn continuation(&self, id: &str) -> Option<Option<&ContinuationRecord>> {
        self.unflushed.continuations.get(id).map(|slot| slot.value.as_ref())
    }

    /// Whether any continuation is stored with `anchor`.
    pub fn is_anchor(&self, anchor: &PromiseId) -> bool {
        self.anchors.contains_key(anchor)
    }

    /// Unflushed anchor or ready keys starting with `prefix`: those put, and those deleted
    /// (which the database may still hold).
    pub fn continuation_keys(&self, prefix: &[u8]) -> (Vec<Vec<u8>>, HashSet<Vec<u8>>) {
        let mut put = Vec::new();
        let mut deleted = HashSet::new();
        for (key, slot) in self.unflushed.continuation_keys.range(prefix.to_vec()..) {
            if !key.starts_with(prefix) {
                break;
            }
            match slot.value {
                Some(()) => put.push(key.clone()),
                None => {
                    deleted.insert(key.clone());
                }
            }
        }
        (put, deleted)
    }

    /// Takes in one applied continuation change.
    pub fn change_continuation(&mut self, shard: ShardId, change: ContinuationChange) {
        let ready = |r: &Option<ContinuationRecord>| r.as_ref().is_some_and(|r| r.status == Status::Ready);
        let (was_ready, is_ready) = (ready(&change.before), ready(&change.after));
        let keys = &mut self.unflushed.continuation_keys;
        let record = change.after.as_ref().or(change.before.as_ref()).map(|r| &r.continuation);
        let Some(c) = record else { return };
        let ready_key = keys::named(shard, keys::STATE_READY, &c.id);
        if was_ready && !is_ready {
            delete(keys, ready_key);
        } else if is_ready && !was_ready {
            put(keys, ready_key, (), true);
        }
        let anchor_key = keys::anchor(shard, c.anchor().as_str(), &c.id);
        match (&change.before, change.after) {
            (None, Some(after)) => {
                put(keys, anchor_key, (), true);
                *self.anchors.entry(after.continuation.anchor().clone()).or_default() += 1;
                self.unflushed.bytes += 256 + after.continuation.sources.len() * 64;
                put(&mut self.unflushed.continuations, after.continuation.id.clone(), after, true);
            }
            (Some(_), Some(after)) => {
                self.unflushed.bytes += 256 + after.continuation.sources.len() * 64;
                put(&mut self.unflushed.continuations, after.continuation.id.clone(), after, false);
            }
            (Some(before), None) => {
                delete(keys, anchor_key);
                let anchor = before.continuation.anchor();
                if let Some(n) = self.anchors.get_mut(anchor) {
                    *n -= 1;
                    if *n == 0 {
                        self.anchors.remove(anchor);
                    }
                }
                delete(&mut self.unflushed.continuations, before.continuation.id.clone());
            }
            (None, None) => {}
        }
    }

    /// Counts the continuations stored with each promise, from the database: at start-up and
    /// after a snapshot install replaced the state.
    pub fn load_anchors(&mut self, db: &DB, shard: ShardId) -> io::Result<()> {
        self.anchors.clear();
        let state = cf(db, CF_STATE)?;
        let prefix = keys::state_kind(shard, keys::STATE_BY_ANCHOR);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(keys::state_kind(shard, keys::STATE_BY_ANCHOR + 1).to_vec());
        let mut it = db.raw_iterator_cf_opt(state, opts);
        it.seek(prefix);
        while it.valid() {
            if let Some((anchor, _)) = it.key().and_then(keys::anchor_ids) {
                *self.anchors.entry(PromiseId::new_unchecked(anchor)).or_default() += 1;
            }
            it.next();
        }
        it.status().map_err(io_err)
    }

    pub fn wants_flush(&self) -> bool {
        self.unflushed.records.len() + self.unflushed.continuations.len() >= FLUSH_RECORDS
            || self.unflushed.bytes >= FLUSH_BYTES
    }

    /// Writes the unflushed changes to the database in one batch (not synced: see the module
    /// docs) and keeps their records as the recent ones.
    pub fn flush(&mut self, db: &DB, shard: ShardId) -> io::Result<()> {
        let Some(meta) = self.unflushed.meta.take() else { return Ok(()) };
        let state = cf(db, CF_STATE)?;
        let mut batch = WriteBatch::default();
        for (key, slot) in &self.unflushed.index {
            match slot.value {
                Some(()) => batch.put_cf(state, key, []),
                None => batch.delete_cf(state, key),
            }
        }
        for (id, slot) in &self.unflushed.records {
            let key = keys::promise(shard, id.as_str());
            match &slot.value {
                Some(p) => batch.put_cf(state, key, p.encode()),
                None => batch.delete_cf(state, key),
            }
        }
        for (key, slot) in &self.unflushed.continuation_keys {
            match slot.value {
                Some(()) => batch.put_cf(state, key, []),
                None => batch.delete_cf(state, key),
            }
        }
        for (id, slot) in &self.unflushed.continuations {
            let key = keys::named(shard, keys::STATE_CONTINUATION, id);
            match &slot.value {
                Some(r) => batch.put_cf(state, key, r.encode()),
                None => batch.delete_cf(state, key),
            }
        }
        put_meta(&mut batch, state, shard, &meta);
        db.write(batch).map_err(io_err)?;
        let unflushed = std::mem::take(&mut self.unflushed);
        for (id, slot) in unflushed.records {
            self.recent.insert(id, slot.value);
        }
        Ok(())
    }

    /// Forgets everything: the database's state was replaced (a snapshot install), and
    /// [`Layer::load_anchors`] is to follow.
    pub fn clear(&mut self) {
        *self = Layer::default();
    }

    /// Unflushed index keys of `kind` whose time is at or before `up_to_ms`.
    pub fn timed(&self, kind: u8, up_to_ms: i64) -> TimedKeys<'_> {
        let mut put = Vec::new();
        let mut deleted = HashSet::default();
        let bound = keys::time(up_to_ms);
        for (key, slot) in &self.unflushed.index {
            if key.get(4) != Some(&kind) || key.get(5..13).is_none_or(|t| t > &bound[..]) {
                continue;
            }
            match (slot.value, keys::timed_id(key)) {
                (Some(()), Some(id)) => put.push((key.clone(), PromiseId::new_unchecked(id))),
                (None, _) => {
                    deleted.insert(key.as_slice());
                }
                (Some(()), None) => {}
            }
        }
        TimedKeys { put, deleted }
    }
}

/// Index keys of one kind in the unflushed changes, from [`Layer::timed`].
pub(crate) struct TimedKeys<'a> {
    /// Keys put, with their ids.
    pub put: Vec<(Vec<u8>, PromiseId)>,
    /// Keys deleted, which the database may still hold.
    pub deleted: HashSet<&'a [u8], foldhash::fast::RandomState>,
}

/// Writes the applied log id and cluster time, and the membership if it changed.
pub(crate) fn put_meta(batch: &mut WriteBatch, state: &rocksdb::ColumnFamily, shard: ShardId, meta: &Meta) {
    let mut e = Encoder::new();
    codec::opt_log_id(&mut e, &meta.applied);
    batch.put_cf(state, keys::sm_meta(shard, keys::SM_APPLIED), e.into_bytes());
    if let Some(m) = &meta.membership {
        let mut e = Encoder::new();
        codec::stored_membership(&mut e, m);
        batch.put_cf(state, keys::sm_meta(shard, keys::SM_MEMBERSHIP), e.into_bytes());
    }
    let mut e = Encoder::new();
    e.i64(meta.cluster_time_ms);
    batch.put_cf(state, keys::sm_meta(shard, keys::SM_CLUSTER_TIME), e.into_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vow_core::State;

    fn id(n: usize) -> PromiseId {
        PromiseId::new_unchecked(format!("p{n}"))
    }

    /// A pending promise `p<n>` with no data, for tests.
    pub(crate) fn pending(n: usize, deadline_ms: i64) -> Promise {
        Promise {
            id: id(n),
            state: State::Pending,
            param: vow_core::Value::default(),
            value: vow_core::Value::default(),
            deadline_ms,
            tags: Default::default(),
            created_at_ms: 0,
            settled_at_ms: 0,
            idempotency_key_create: String::new(),
            idempotency_key_settle: String::new(),
            revision: 0,
        }
    }

    fn resolved(p: &Promise, at_ms: i64) -> Promise {
        Promise { state: State::Resolved, settled_at_ms: at_ms, ..p.clone() }
    }

    const SHARD: ShardId = ShardId(0);

    fn db() -> (tempfile::TempDir, std::sync::Arc<DB>) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open(dir.path()).unwrap();
        (dir, db)
    }

    /// Every `state` key of the shard except the state machine's own, with its value.
    fn state_keys(db: &DB) -> Vec<Vec<u8>> {
        let state = cf(db, CF_STATE).unwrap();
        db.iterator_cf(state, rocksdb::IteratorMode::Start)
            .map(|kv| kv.unwrap().0.to_vec())
            .filter(|k| k[4] != keys::STATE_META)
            .collect()
    }

    fn flushed(layer: &mut Layer, db: &DB) {
        layer.set_meta(None, 0, None);
        layer.flush(db, SHARD).unwrap();
    }

    #[test]
    fn a_promise_created_and_settled_between_flushes_is_written_once_without_its_deadline_key() {
        let (_dir, db) = db();
        let mut layer = Layer::default();
        let p = pending(1, 5_000);
        layer.change(SHARD, Change { before: None, after: Some(p.clone()) });
        assert_eq!(layer.record(&id(1)), Some(Some(&p)), "readers see the unflushed create");
        let settled = resolved(&p, 7);
        layer.change(SHARD, Change { before: Some(p.clone()), after: Some(settled.clone()) });
        assert_eq!(layer.unflushed.index.len(), 1, "the deadline key's put and delete cancel out");
        flushed(&mut layer, &db);
        assert_eq!(
            state_keys(&db),
            vec![keys::promise(SHARD, "p1"), index_key(SHARD, &settled)],
            "the record and its settled key, nothing else"
        );
        assert_eq!(layer.record(&id(1)), Some(Some(&settled)), "kept as a recent record after the flush");
    }

    #[test]
    fn changes_to_flushed_keys_are_written_as_deletes() {
        let (_dir, db) = db();
        let mut layer = Layer::default();
        let p = pending(1, 5_000);
        layer.change(SHARD, Change { before: None, after: Some(p.clone()) });
        flushed(&mut layer, &db);
        assert_eq!(state_keys(&db).len(), 2);
        let settled = resolved(&p, 7);
        layer.change(SHARD, Change { before: Some(p), after: Some(settled.clone()) });
        flushed(&mut layer, &db);
        assert_eq!(state_keys(&db), vec![keys::promise(SHARD, "p1"), index_key(SHARD, &settled)]);
        // Collected, then created again with the same id before the next flush: the old keys
        // must still be deleted although the id is "new" to the second change.
        layer.change(SHARD, Change { before: Some(settled.clone()), after: None });
        assert_eq!(layer.record(&id(1)), Some(None), "readers see the delete");
        let again = pending(1, 9_000);
        layer.change(SHARD, Change { before: None, after: Some(again.clone()) });
        flushed(&mut layer, &db);
        assert_eq!(state_keys(&db), vec![keys::promise(SHARD, "p1"), index_key(SHARD, &again)]);
        let state = cf(&db, CF_STATE).unwrap();
        let stored = db.get_cf(state, keys::promise(SHARD, "p1")).unwrap().unwrap();
        assert_eq!(Promise::decode(&stored).unwrap(), again);
    }

    #[test]
    fn a_flush_writes_the_applied_meta_and_nothing_when_nothing_was_applied() {
        let (_dir, db) = db();
        let state = cf(&db, CF_STATE).unwrap();
        let mut layer = Layer::default();
        layer.flush(&db, SHARD).unwrap();
        assert!(db.get_cf(state, keys::sm_meta(SHARD, keys::SM_CLUSTER_TIME)).unwrap().is_none());
        layer.set_meta(None, 42, None);
        layer.set_meta(None, 43, None);
        layer.flush(&db, SHARD).unwrap();
        let time = db.get_cf(state, keys::sm_meta(SHARD, keys::SM_CLUSTER_TIME)).unwrap().unwrap();
        assert_eq!(vow_core::codec::Decoder::new(&time).i64("t").unwrap(), 43);
    }

    #[test]
    fn timed_keys_are_reported_up_to_the_bound() {
        let mut layer = Layer::default();
        let early = pending(1, 100);
        let late = pending(2, 300);
        for p in [&early, &late] {
            layer.change(SHARD, Change { before: None, after: Some(p.clone()) });
        }
        let found = layer.timed(keys::STATE_BY_DEADLINE, 200);
        assert_eq!(found.put, vec![(index_key(SHARD, &early), id(1))]);
        assert!(found.deleted.is_empty());
        assert!(layer.timed(keys::STATE_BY_SETTLED, i64::MAX).put.is_empty());
        assert_eq!(layer.timed(keys::STATE_BY_DEADLINE, 300).put.len(), 2, "the bound is inclusive");
        let settled = Promise { state: State::Resolved, settled_at_ms: 1, ..early.clone() };
        layer.change(SHARD, Change { before: Some(early.clone()), after: Some(settled) });
        assert!(layer.timed(keys::STATE_BY_DEADLINE, 200).put.is_empty(), "settled: the deadline key is gone");
    }

    #[test]
    fn recent_records_keep_the_last_generation_and_forget_older_ones() {
        let mut recent = RecentRecords::default();
        for n in 0..RECENT_RECORDS {
            recent.insert(id(n), None);
        }
        assert!(recent.get(&id(0)).is_some(), "a full young generation is all still there");
        recent.insert(id(RECENT_RECORDS), None);
        assert!(recent.get(&id(0)).is_some(), "the previous generation is still there");
        for n in RECENT_RECORDS + 1..=2 * RECENT_RECORDS {
            recent.insert(id(n), None);
        }
        assert!(recent.get(&id(0)).is_none(), "two generations back is forgotten");
        assert!(recent.get(&id(RECENT_RECORDS)).is_some());
        assert!(recent.get(&id(2 * RECENT_RECORDS)).is_some());
    }

    #[test]
    fn recent_records_are_bounded_by_bytes_too() {
        let mut recent = RecentRecords::default();
        let big = |n: usize| Promise {
            param: vow_core::Value { headers: Default::default(), data: vec![0; 1 << 20] },
            ..pending(n, 0)
        };
        for n in 0..10 {
            recent.insert(id(n), Some(big(n)));
        }
        let held = recent.young.len() + recent.old.len();
        assert!(held <= 2 * (RECENT_BYTES >> 20) + 2, "{held} records of 1 MiB held");
        assert!(recent.get(&id(9)).is_some(), "the newest is always there");
    }

    #[test]
    fn big_values_trigger_a_flush_before_the_record_count_does() {
        let mut layer = Layer::default();
        let big =
            Promise { param: vow_core::Value { headers: Default::default(), data: vec![0; 1 << 20] }, ..pending(1, 0) };
        layer.change(SHARD, Change { before: None, after: Some(big) });
        assert!(!layer.wants_flush());
        let big2 =
            Promise { param: vow_core::Value { headers: Default::default(), data: vec![0; 1 << 20] }, ..pending(2, 0) };
        layer.change(SHARD, Change { before: None, after: Some(big2) });
        assert!(layer.wants_flush());
    }
}
