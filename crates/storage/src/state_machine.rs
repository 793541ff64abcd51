//! One shard's state machine on RocksDB: applies committed entries with [`vow_core::apply`],
//! builds and installs snapshots, and announces settled promises.
//!
//! openraft builds snapshots in a task of their own, concurrently with the worker that applies
//! entries and installs snapshots received from the leader. A build therefore takes its view of
//! the state under the same lock an install holds from start to end ([`ShardState::views`]): the
//! view is a RocksDB snapshot of the state either before an install or after it, never halfway.
//! Every snapshot file gets a name of its own, and a built file is handed to openraft already
//! open, so no install, build or clean-up can replace or delete a file under another.

use std::fmt::Debug;
use std::io;
use std::io::{Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use openraft::EntryPayload;
use openraft::alias::SnapshotOf;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use rocksdb::{DB, ReadOptions, WriteBatch, WriteOptions};
use tokio::sync::broadcast;
use vow_core::codec::Decoder;
use vow_core::pipeline::ContinuationRecord;
use vow_core::{Effect, Promise, PromiseId, PromiseView, ShardId, State};

use crate::codec;
use crate::snapshot::{self, SnapshotFile};
use crate::types::{ApplyResponse, LogId, SnapshotMeta, StoredMembership, TypeConfig};
use crate::write_behind::{Layer, Meta, WriteBehind, put_meta};
use crate::{CF_STATE, cf, corrupt, io_err, keys, shard_end};

/// Records per write batch when installing a snapshot, so memory stays bounded.
const INSTALL_BATCH_RECORDS: usize = 4096;

/// What a replica tells the waiters on its promises (Await). Only ids travel: a waiter reads the
/// record from the replica's state, so a settlement costs no copy per waiter and a lagging
/// waiter pins no records in the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// The promise was settled by an entry applied here.
    Settled(PromiseId),
    /// The whole state was replaced by a snapshot: any promise may have settled meanwhile, and
    /// any continuation become ready.
    StateReplaced,
    /// The continuation's outcome is in: the shard's leader is to run it.
    Ready(String),
}

/// Read access to one shard's applied state, for the API, sweepers and snapshots. Cheap to clone.
#[derive(Clone)]
pub struct ShardState {
    db: Arc<DB>,
    shard: ShardId,
    layer: Arc<WriteBehind>,
    /// Held by a snapshot install from its first write to its last, and by a snapshot build
    /// while it takes its view: a view is never of a half-installed state.
    views: Arc<Mutex<()>>,
}

impl Debug for ShardState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardState").field("shard", &self.shard).finish()
    }
}

/// A page of search results and where the next page starts.
#[derive(Debug, Default)]
pub struct SearchPage {
    pub promises: Vec<Promise>,
    /// The id after which the next page starts; `None` on the last page.
    pub next_after: Option<String>,
}

/// Search criteria; an empty field matches everything.
#[derive(Debug, Default, Clone)]
pub struct SearchFilter {
    pub id_prefix: String,
    pub state: Option<State>,
    pub tags: std::collections::BTreeMap<String, String>,
}

impl SearchFilter {
    fn matches(&self, p: &Promise) -> bool {
        self.state.is_none_or(|s| p.state == s) && self.tags.iter().all(|(k, v)| p.tags.get(k) == Some(v))
    }
}

/// Most records a search examines per page, so a selective filter cannot scan a shard in one call.
const SEARCH_SCAN_LIMIT: usize = 10_000;

impl ShardState {
    pub fn get(&self, id: &PromiseId) -> io::Result<Option<Promise>> {
        if let Some(p) = self.layer.lock()?.record(id) {
            return Ok(p.cloned());
        }
        read_promise(&self.db, self.shard, id)
    }

    /// Writes the changes applied but not yet in the database (see [`crate::write_behind`]).
    pub fn flush(&self) -> io::Result<()> {
        self.layer.lock()?.flush(&self.db, self.shard)
    }

    /// Ids of pending promises whose deadline is at or before `now_ms`, oldest first.
    pub fn due_for_timeout(&self, now_ms: i64, limit: usize) -> io::Result<Vec<PromiseId>> {
        self.scan_timed(keys::STATE_BY_DEADLINE, now_ms, limit)
    }

    /// Ids of promises settled at or before `settled_before_ms`, oldest first.
    pub fn due_for_collection(&self, settled_before_ms: i64, limit: usize) -> io::Result<Vec<PromiseId>> {
        self.scan_timed(keys::STATE_BY_SETTLED, settled_before_ms, limit)
    }

    /// Where this replica's settlements stand: its last applied log index and its cluster time.
    /// Every settlement applied after this has a revision above the index and a settle time at
    /// or after the time (cluster time never goes back), which is what a watch from now needs.
    pub fn watch_position(&self) -> io::Result<(u64, i64)> {
        self.flush()?;
        let state = cf(&self.db, CF_STATE)?;
        let get = |kind| self.db.get_cf(state, keys::sm_meta(self.shard, kind)).map_err(io_err);
        let applied = match get(keys::SM_APPLIED)? {
            Some(b) => codec::read_opt_log_id(&mut Decoder::new(&b)).map_err(corrupt)?.map_or(0, |l| l.index),
            None => 0,
        };
        let time = match get(keys::SM_CLUSTER_TIME)? {
            Some(b) => Decoder::new(&b).i64("cluster time").map_err(corrupt)?,
            None => 0,
        };
        Ok((applied, time))
    }

    /// Settled promises with a revision above `after_revision`, found among those settled at or
    /// after `from_ms`, in revision order (then id); at least `limit` of them if there are,
    /// always ending with every settlement of the last millisecond read, and the settle time
    /// to resume from (the next one after the last read) when more may follow.
    ///
    /// Settle times never go back along the log, so a settlement with a higher revision than
    /// one read here is never at an earlier time: reading whole milliseconds, a page ends on a
    /// revision boundary and misses nothing before it.
    pub fn settled_since(
        &self,
        after_revision: u64,
        from_ms: i64,
        limit: usize,
    ) -> io::Result<(Vec<Promise>, Option<i64>)> {
        // Never a half-installed snapshot: a page read from one could miss records of lower
        // revisions than those it holds, and the position would move past them for good.
        let _no_install = self.views.lock().map_err(|_| io::Error::other("snapshot view lock poisoned"))?;
        // A scan in key order is the database's job: let it see everything applied.
        self.flush()?;
        let state = cf(&self.db, CF_STATE)?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(keys::state_kind(self.shard, keys::STATE_BY_SETTLED + 1).to_vec());
        let mut it = self.db.raw_iterator_cf_opt(state, opts);
        it.seek(keys::timed(self.shard, keys::STATE_BY_SETTLED, from_ms, ""));
        let mut found = Vec::new();
        let mut last_ms = None;
        let mut next = None;
        while it.valid() {
            let Some(key) = it.key() else { break };
            let (Some(id), Some(ms)) = (keys::timed_id(key), keys::timed_ms(key)) else { break };
            if found.len() >= limit && last_ms != Some(ms) {
                next = Some(ms);
                break;
            }
            last_ms = Some(ms);
            if let Some(p) = self.get(&PromiseId::new_unchecked(id))?
                && p.state.is_settled()
                && p.revision > after_revision
            {
                found.push(p);
            }
            it.next();
        }
        it.status().map_err(io_err)?;
        found.sort_unstable_by(|a, b| (a.revision, a.id.as_str()).cmp(&(b.revision, b.id.as_str())));
        Ok((found, next))
    }

    /// The database's index keys merged with the unflushed ones. The unflushed keys are copied
    /// under the layer's lock and the database is scanned after it is released, so apply and
    /// reads do not wait for the scan. A flush in between only makes the database newer than the
    /// copy: a key it deleted may still be named (a candidate that apply re-checks and skips), a
    /// key it wrote is found either way, and the deletes in the copy still hide what they hid.
    fn scan_timed(&self, kind: u8, up_to_ms: i64, limit: usize) -> io::Result<Vec<PromiseId>> {
        let (put, deleted) = {
            let layer = self.layer.lock()?;
            let unflushed = layer.timed(kind, up_to_ms);
            let deleted: std::collections::HashSet<Vec<u8>> =
                unflushed.deleted.into_iter().map(<[u8]>::to_vec).collect();
            (unflushed.put, deleted)
        };
        let mut found: Vec<(Vec<u8>, PromiseId)> = self
            .scan_timed_db(kind, up_to_ms, limit + deleted.len())?
            .into_iter()
            .filter(|(key, _)| !deleted.contains(key))
            .collect();
        found.extend(put);
        found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        found.dedup_by(|a, b| a.0 == b.0);
        Ok(found.into_iter().take(limit).map(|(_, id)| id).collect())
    }

    /// Index keys of `kind` in the database up to `up_to_ms`, with their ids.
    fn scan_timed_db(&self, kind: u8, up_to_ms: i64, limit: usize) -> io::Result<Vec<(Vec<u8>, PromiseId)>> {
        let state = cf(&self.db, CF_STATE)?;
        let mut opts = ReadOptions::default();
        let lower = keys::state_kind(self.shard, kind).to_vec();
        let mut upper = lower.clone();
        upper.extend_from_slice(&keys::time(up_to_ms.saturating_add(1)));
        opts.set_iterate_lower_bound(lower.clone());
        opts.set_iterate_upper_bound(upper);
        let mut it = self.db.raw_iterator_cf_opt(state, opts);
        it.seek(&lower);
        let mut ids = Vec::new();
        while it.valid() && ids.len() < limit {
            if let Some(key) = it.key()
                && let Some(id) = keys::timed_id(key)
            {
                ids.push((key.to_vec(), PromiseId::new_unchecked(id)));
            }
            it.next();
        }
        it.status().map_err(io_err)?;
        Ok(ids)
    }

    /// Promises in id order after `after` that match `filter`: at most `limit` of them and about
    /// `max_bytes` of encoded records (the first match always comes, whatever its size).
    pub fn search(
        &self,
        filter: &SearchFilter,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> io::Result<SearchPage> {
        // A scan in key order is the database's job: let it see everything applied.
        self.flush()?;
        let state = cf(&self.db, CF_STATE)?;
        let kind_prefix = keys::state_kind(self.shard, keys::STATE_PROMISE);
        let prefix = keys::promise(self.shard, &filter.id_prefix);
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(prefix.clone());
        opts.set_iterate_upper_bound(shard_end(self.shard));
        let mut it = self.db.raw_iterator_cf_opt(state, opts);
        match after {
            Some(a) => {
                let mut k = keys::promise(self.shard, a);
                k.push(0); // the smallest key strictly after `a`
                it.seek(&k);
            }
            None => it.seek(&prefix),
        }
        let mut page = SearchPage::default();
        let mut page_bytes = 0usize;
        let mut scanned = 0;
        let mut last_scanned: Option<String> = None;
        while it.valid() {
            let Some(key) = it.key() else { break };
            if !key.starts_with(&prefix) || !key.starts_with(&kind_prefix) {
                break;
            }
            if page.promises.len() == limit || scanned == SEARCH_SCAN_LIMIT {
                // More may follow: the next page resumes after the last record examined.
                page.next_after = last_scanned;
                break;
            }
            let value = it.value().ok_or_else(|| io::Error::other("iterator without value"))?;
            let p = Promise::decode(value).map_err(corrupt)?;
            let id = p.id.to_string();
            if filter.matches(&p) {
                if !page.promises.is_empty() && page_bytes.saturating_add(value.len()) > max_bytes {
                    // Full: this record opens the next page.
                    page.next_after = last_scanned;
                    break;
                }
                page_bytes = page_bytes.saturating_add(value.len());
                page.promises.push(p);
            }
            scanned += 1;
            last_scanned = Some(id);
            it.next();
        }
        it.status().map_err(io_err)?;
        Ok(page)
    }
}

impl ShardState {
    /// The continuation stored here under `id`.
    pub fn continuation(&self, id: &str) -> io::Result<Option<ContinuationRecord>> {
        if let Some(r) = self.layer.lock()?.continuation(id) {
            return Ok(r.cloned());
        }
        read_continuation(&self.db, self.shard, id)
    }

    /// Ids of continuations ready to run, at most `limit`, in id order.
    pub fn ready(&self, limit: usize) -> io::Result<Vec<String>> {
        let prefix = keys::state_kind(self.shard, keys::STATE_READY);
        let (put, deleted) = self.layer.lock()?.continuation_keys(&prefix);
        let found = merged_keys(&self.db, &prefix, put, &deleted, limit)?;
        Ok(found.iter().filter_map(|k| keys::named_id(k)).map(str::to_owned).collect())
    }

    /// Ids of the continuations stored with `anchor`.
    pub fn anchored_on(&self, anchor: &PromiseId) -> io::Result<Vec<String>> {
        let layer = self.layer.lock()?;
        anchored_on(&self.db, self.shard, &layer, anchor)
    }
}

impl PromiseView for ShardState {
    type Error = io::Error;
    fn promise(&self, id: &PromiseId) -> io::Result<Option<Promise>> {
        self.get(id)
    }

    fn continuation(&self, id: &str) -> io::Result<Option<ContinuationRecord>> {
        ShardState::continuation(self, id)
    }

    fn anchored_on(&self, anchor: &PromiseId) -> io::Result<Vec<String>> {
        ShardState::anchored_on(self, anchor)
    }
}

fn read_continuation(db: &DB, shard: ShardId, id: &str) -> io::Result<Option<ContinuationRecord>> {
    match db.get_pinned_cf(cf(db, CF_STATE)?, keys::named(shard, keys::STATE_CONTINUATION, id)).map_err(io_err)? {
        None => Ok(None),
        Some(b) => Ok(Some(ContinuationRecord::decode(&b).map_err(corrupt)?)),
    }
}

/// The database's keys under `prefix` merged with the layer's unflushed ones (`put`, and
/// `deleted`, which hide what the database still holds), in key order, at most `limit`.
fn merged_keys(
    db: &DB,
    prefix: &[u8],
    put: Vec<Vec<u8>>,
    deleted: &std::collections::HashSet<Vec<u8>>,
    limit: usize,
) -> io::Result<Vec<Vec<u8>>> {
    let state = cf(db, CF_STATE)?;
    let mut opts = ReadOptions::default();
    opts.set_iterate_lower_bound(prefix.to_vec());
    let mut it = db.raw_iterator_cf_opt(state, opts);
    it.seek(prefix);
    let mut found = Vec::new();
    while it.valid() && found.len() < limit.saturating_add(deleted.len()) {
        let Some(key) = it.key() else { break };
        if !key.starts_with(prefix) {
            break;
        }
        if !deleted.contains(key) {
            found.push(key.to_vec());
        }
        it.next();
    }
    it.status().map_err(io_err)?;
    found.extend(put);
    found.sort_unstable();
    found.dedup();
    found.truncate(limit);
    Ok(found)
}

fn anchored_on(db: &DB, shard: ShardId, layer: &Layer, anchor: &PromiseId) -> io::Result<Vec<String>> {
    if !layer.is_anchor(anchor) {
        return Ok(Vec::new());
    }
    let prefix = keys::anchor_prefix(shard, anchor.as_str());
    let (put, deleted) = layer.continuation_keys(&prefix);
    let found = merged_keys(db, &prefix, put, &deleted, usize::MAX)?;
    Ok(found.iter().filter_map(|k| keys::anchor_ids(k)).map(|(_, c)| c.to_owned()).collect())
}

fn read_promise(db: &DB, shard: ShardId, id: &PromiseId) -> io::Result<Option<Promise>> {
    match db.get_pinned_cf(cf(db, CF_STATE)?, keys::promise(shard, id.as_str())).map_err(io_err)? {
        None => Ok(None),
        Some(b) => Ok(Some(Promise::decode(&b).map_err(corrupt)?)),
    }
}

/// The records as of the previous entry: the changes applied but not flushed, the records
/// flushed lately, then the database.
struct LayeredView<'a> {
    db: &'a DB,
    shard: ShardId,
    layer: &'a Layer,
    /// Sabotage only (`skip-settled-check`): present settled promises as pending.
    forget_settlement: bool,
}

impl PromiseView for LayeredView<'_> {
    type Error = io::Error;

    fn continuation(&self, id: &str) -> io::Result<Option<ContinuationRecord>> {
        match self.layer.continuation(id) {
            Some(r) => Ok(r.cloned()),
            None => read_continuation(self.db, self.shard, id),
        }
    }

    fn anchored_on(&self, anchor: &PromiseId) -> io::Result<Vec<String>> {
        anchored_on(self.db, self.shard, self.layer, anchor)
    }

    fn promise(&self, id: &PromiseId) -> io::Result<Option<Promise>> {
        let p = match self.layer.record(id) {
            Some(p) => p.cloned(),
            None => read_promise(self.db, self.shard, id)?,
        };
        Ok(p.map(|mut p| {
            if self.forget_settlement {
                p.state = State::Pending;
                p.deadline_ms = i64::MAX;
            }
            p
        }))
    }
}

/// Whether a snapshot was built here or installed from a leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    Built,
    Installed,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Built => "built",
            SnapshotKind::Installed => "installed",
        }
    }
}

/// One snapshot built or installed: what it took, for the node's metrics.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotDone {
    pub kind: SnapshotKind,
    /// From the build's start (or the install's) to the snapshot in place.
    pub took: std::time::Duration,
    /// The snapshot file's size.
    pub bytes: u64,
    pub records: u64,
}

type SnapshotObserver = Box<dyn Fn(SnapshotDone) + Send + Sync>;

/// The newest snapshot of a replica — its records (the state's size, for the snapshot policy)
/// and bytes — kept current as snapshots are built and installed, and an observer told of each
/// one (the node's metrics).
#[derive(Default)]
pub struct SnapshotStats {
    records: AtomicU64,
    bytes: AtomicU64,
    observer: std::sync::OnceLock<SnapshotObserver>,
}

impl Debug for SnapshotStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStats").field("records", &self.records()).field("bytes", &self.bytes()).finish()
    }
}

impl SnapshotStats {
    /// Records in the newest snapshot built or installed here (0 until there is one).
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Size in bytes of the newest snapshot file built or installed here (0 until there is one).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Calls `observe` after every snapshot built or installed from now on (one observer; a
    /// second is ignored).
    pub fn observe(&self, observe: impl Fn(SnapshotDone) + Send + Sync + 'static) {
        let _ = self.observer.set(Box::new(observe));
    }

    fn done(&self, done: SnapshotDone) {
        self.records.store(done.records, Ordering::Relaxed);
        self.bytes.store(done.bytes, Ordering::Relaxed);
        if let Some(observe) = self.observer.get() {
            observe(done);
        }
    }
}

/// The shard's openraft state machine. Owned by the shard's Raft task; everyone else reads
/// through [`ShardState`] and hears about settlements on the broadcast channel.
pub struct ShardStateMachine {
    db: Arc<DB>,
    shard: ShardId,
    snapshot_dir: PathBuf,
    applied: Option<LogId>,
    membership: StoredMembership,
    cluster_time_ms: i64,
    announce: broadcast::Sender<Announcement>,
    /// The newest snapshot built or installed here.
    snapshots: Arc<SnapshotStats>,
    layer: Arc<WriteBehind>,
    /// See [`ShardState::views`].
    views: Arc<Mutex<()>>,
}

impl Debug for ShardStateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStateMachine").field("shard", &self.shard).field("applied", &self.applied).finish()
    }
}

impl ShardStateMachine {
    /// Loads the shard's applied state, finishing a snapshot install that a crash interrupted.
    pub fn open(
        db: Arc<DB>,
        shard: ShardId,
        snapshot_dir: PathBuf,
        announce: broadcast::Sender<Announcement>,
    ) -> io::Result<Self> {
        let mut sm = ShardStateMachine {
            db,
            shard,
            snapshot_dir,
            applied: None,
            membership: StoredMembership::default(),
            cluster_time_ms: 0,
            announce,
            snapshots: Arc::default(),
            layer: Arc::default(),
            views: Arc::default(),
        };
        let state = cf(&sm.db, CF_STATE)?;
        if let Some(marker) = sm.db.get_cf(state, keys::sm_meta(shard, keys::SM_INSTALLING)).map_err(io_err)? {
            let (source, target) = match InstallMarker::decode(&marker) {
                // The file is under its final name once the state is written, else still under
                // the name it was received with.
                Some(m) => {
                    let target = sm.snapshot_dir.join(&m.target);
                    let source = if target.exists() { target.clone() } else { sm.snapshot_dir.join(&m.received) };
                    (source, target)
                }
                // A marker from before markers named files: the newest file is the one.
                None => {
                    let path = snapshot::latest(&sm.snapshot_dir)?
                        .ok_or_else(|| io::Error::other("snapshot install was interrupted and its file is gone"))?;
                    (path.clone(), path)
                }
            };
            tracing::warn!(shard = %shard, path = %source.display(), "resuming interrupted snapshot install");
            let started = std::time::Instant::now();
            let installed = install_file(&sm.db, shard, &sm.layer, &sm.views, SnapshotFile::open(source)?, &target)?;
            sm.took(installed, started);
        }
        // Only now: a received file named by the marker was a temporary one until installed.
        snapshot::clean_temporaries(&sm.snapshot_dir);
        sm.load_meta()?;
        sm.layer.lock()?.load_anchors(&sm.db, shard)?;
        Ok(sm)
    }

    fn load_meta(&mut self) -> io::Result<()> {
        let state = cf(&self.db, CF_STATE)?;
        let get = |kind| self.db.get_cf(state, keys::sm_meta(self.shard, kind)).map_err(io_err);
        if let Some(b) = get(keys::SM_APPLIED)? {
            self.applied = codec::read_opt_log_id(&mut Decoder::new(&b)).map_err(corrupt)?;
        }
        if let Some(b) = get(keys::SM_MEMBERSHIP)? {
            self.membership = codec::read_stored_membership(&mut Decoder::new(&b)).map_err(corrupt)?;
        }
        if let Some(b) = get(keys::SM_CLUSTER_TIME)? {
            self.cluster_time_ms = Decoder::new(&b).i64("cluster time").map_err(corrupt)?;
        }
        Ok(())
    }

    /// Takes on the meta of a state just installed (an install that began at `started`), and
    /// tells the waiters.
    fn took(&mut self, installed: Installed, started: std::time::Instant) -> SnapshotMeta {
        self.applied = installed.meta.last_log_id;
        self.membership = installed.meta.last_membership.clone();
        self.cluster_time_ms = installed.cluster_time_ms;
        self.snapshots.done(SnapshotDone {
            kind: SnapshotKind::Installed,
            took: started.elapsed(),
            bytes: installed.bytes,
            records: installed.records,
        });
        // Waiters heard nothing of the settlements the snapshot brought; they look again.
        if !crate::sabotage::enabled("drop-snapshot-announcements") {
            let _ = self.announce.send(Announcement::StateReplaced);
        }
        installed.meta
    }

    /// The newest snapshot of this replica, kept current as snapshots come and go.
    pub fn snapshots(&self) -> Arc<SnapshotStats> {
        self.snapshots.clone()
    }

    /// A handle for reads of this shard's state.
    pub fn reader(&self) -> ShardState {
        ShardState { db: self.db.clone(), shard: self.shard, layer: self.layer.clone(), views: self.views.clone() }
    }
}

impl RaftStateMachine<TypeConfig> for ShardStateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut replies = Vec::new();
        let mut announcements = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            self.applied = Some(entry.log_id);
            // An entry's changes and the log id they bring the state to enter the layer under
            // one lock, so that a flush from another task (search, snapshot, shutdown) never
            // writes part of an entry, or changes ahead of the applied log id it records.
            let reply = {
                let mut layer = self.layer.lock()?;
                let mut membership_changed = false;
                let reply = match entry.payload {
                    EntryPayload::Blank => ApplyResponse(None),
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(entry.log_id), m);
                        membership_changed = true;
                        ApplyResponse(None)
                    }
                    EntryPayload::Normal(proposal) => {
                        let forget_settlement = crate::sabotage::enabled("skip-settled-check")
                            && matches!(proposal.command, vow_core::Command::Settle { .. });
                        let view = LayeredView { db: &self.db, shard: self.shard, layer: &layer, forget_settlement };
                        let applied = vow_core::apply(&view, self.cluster_time_ms, entry.log_id.index, &proposal)?;
                        self.cluster_time_ms = applied.cluster_time_ms;
                        for change in applied.changes {
                            if let Some(p) = change.newly_settled() {
                                announcements.push(Announcement::Settled(p.id.clone()));
                            }
                            layer.change(self.shard, change);
                        }
                        for change in applied.continuations {
                            layer.change_continuation(self.shard, change);
                        }
                        announcements.extend(applied.effects.into_iter().map(|e| match e {
                            Effect::Ready { continuation } => Announcement::Ready(continuation),
                        }));
                        ApplyResponse(Some(applied.outcome))
                    }
                };
                layer.set_meta(self.applied, self.cluster_time_ms, membership_changed.then_some(&self.membership));
                // Checked per entry, so a long run of entries (a restart re-applying its log, a
                // follower catching up) keeps the layer's memory bounded too.
                if layer.wants_flush() {
                    layer.flush(&self.db, self.shard)?;
                }
                reply
            };
            replies.push((responder, reply));
        }
        for (responder, reply) in replies {
            if let Some(r) = responder {
                r.send(reply);
            }
        }
        for announcement in announcements {
            // No receiver is fine: nobody is waiting.
            let _ = self.announce.send(announcement);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { state: self.reader(), dir: self.snapshot_dir.clone(), stats: self.snapshots.clone() }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> Result<(), io::Error> {
        let started = std::time::Instant::now();
        std::fs::create_dir_all(&self.snapshot_dir)?;
        // The received file stays a temporary one (removed if a crash comes first) until the
        // install marks itself; it becomes a snapshot file, under a name of its own, only
        // inside the marked install (see `install_file`).
        let received = if snapshot.path.parent() == Some(self.snapshot_dir.as_path()) {
            snapshot.path
        } else {
            let moved = self.snapshot_dir.join(format!("recv-{:016x}.tmp", rand::random::<u64>()));
            std::fs::rename(&snapshot.path, &moved)?;
            moved
        };
        let target = self.snapshot_dir.join(snapshot::file_name(meta));
        let mut file = snapshot.file;
        file.seek(SeekFrom::Start(0))?;
        let snap = SnapshotFile { path: received, file };
        // Seconds of reading and writing for a large shard: off the runtime's threads.
        let (db, shard, layer, views) = (self.db.clone(), self.shard, self.layer.clone(), self.views.clone());
        let installed = tokio::task::spawn_blocking(move || install_file(&db, shard, &layer, &views, snap, &target))
            .await
            .map_err(io::Error::other)??;
        let loaded = self.took(installed, started);
        snapshot::latest(&self.snapshot_dir)?;
        tracing::info!(shard = %self.shard, last_log_id = ?loaded.last_log_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>, io::Error> {
        let Some(path) = snapshot::latest(&self.snapshot_dir)? else { return Ok(None) };
        // One open file for the meta and the data: a build finishing meanwhile may delete the
        // path, never the file this handle holds.
        let mut file = SnapshotFile::open(path)?;
        let (meta, _) = snapshot::Reader::open(file.file.try_clone()?)?;
        file.file.seek(SeekFrom::Start(0))?;
        Ok(Some(Snapshot { meta, snapshot: file }))
    }
}

/// Builds a snapshot from a consistent RocksDB snapshot while the state machine keeps applying.
#[derive(Debug)]
pub struct SnapshotBuilder {
    state: ShardState,
    dir: PathBuf,
    stats: Arc<SnapshotStats>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotFile>, io::Error> {
        let started = std::time::Instant::now();
        let (state, dir) = (self.state.clone(), self.dir.clone());
        let shard = state.shard;
        let (meta, file, records, bytes) = tokio::task::spawn_blocking(move || {
            let db = state.db.clone();
            let view = {
                let _no_install = state.views.lock().map_err(|_| io::Error::other("snapshot view lock poisoned"))?;
                // Everything applied goes into the database first: the snapshot is read from
                // there, and once it exists the log before it may be purged.
                state.flush()?;
                db.snapshot()
            };
            let (meta, file, records) = build(&db, &view, shard, &dir)?;
            let bytes = file.file.metadata()?.len();
            // Only the newest snapshot is ever served or installed; the older ones go (a reader
            // still streaming one to a follower keeps its open file, and so does this build).
            snapshot::latest(&dir)?;
            Ok::<_, io::Error>((meta, file, records, bytes))
        })
        .await
        .map_err(io::Error::other)??;
        let took = started.elapsed();
        self.stats.done(SnapshotDone { kind: SnapshotKind::Built, took, bytes, records });
        tracing::info!(shard = %shard, last_log_id = ?meta.last_log_id, records, bytes, ?took, "snapshot built");
        Ok(Snapshot { meta, snapshot: file })
    }
}

/// What an install leaves for the state machine to take on.
struct Installed {
    meta: SnapshotMeta,
    cluster_time_ms: i64,
    records: u64,
    bytes: u64,
}

/// What the install marker records: the file as received and the name it takes once the
/// state is written, so a restart finds it under either.
struct InstallMarker {
    received: String,
    target: String,
}

impl InstallMarker {
    fn encode(&self) -> Vec<u8> {
        format!("{}\n{}", self.received, self.target).into_bytes()
    }

    /// `None` for the empty marker of installs before markers named their files.
    fn decode(bytes: &[u8]) -> Option<InstallMarker> {
        let (received, target) = std::str::from_utf8(bytes).ok()?.split_once('\n')?;
        Some(InstallMarker { received: received.to_owned(), target: target.to_owned() })
    }
}

fn name_of(path: &std::path::Path) -> String {
    path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned()
}

/// Replaces the shard's state with the snapshot in `snap` and makes the file the snapshot at
/// `target`, crash-safely, in three steps: the install marker (naming the file as received and
/// its target) is set; the range is replaced and the file renamed to `target`; the marker is
/// cleared in the batch that records the new applied log id. [`ShardStateMachine::open`] redoes
/// an install it finds marked, from the file under whichever name it has; a crash before the
/// marker leaves a temporary file that the restart removes. So a received file is never found
/// as a snapshot (openraft would restore from it at start-up without the install's log
/// handling) before its state is in place. No snapshot build takes its view meanwhile
/// (`views`). Blocking: it reads the whole file and writes the whole state.
fn install_file(
    db: &DB,
    shard: ShardId,
    layer: &WriteBehind,
    views: &Mutex<()>,
    snap: SnapshotFile,
    target: &std::path::Path,
) -> io::Result<Installed> {
    let _no_views = views.lock().map_err(|_| io::Error::other("snapshot view lock poisoned"))?;
    let state = cf(db, CF_STATE)?;
    let marker = keys::sm_meta(shard, keys::SM_INSTALLING);
    let names = InstallMarker { received: name_of(&snap.path), target: name_of(target) };
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.put_cf_opt(state, marker, names.encode(), &sync).map_err(io_err)?;
    let mut clear = WriteBatch::default();
    clear.delete_range_cf(state, &keys::shard_prefix(shard)[..], &marker[..]);
    let mut after_marker = marker.to_vec();
    after_marker.push(0);
    clear.delete_range_cf(state, &after_marker[..], &shard_end(shard)[..]);
    layer.lock()?.clear();
    db.write(clear).map_err(io_err)?;

    let bytes = snap.file.metadata()?.len();
    let (meta, mut reader) = snapshot::Reader::open(snap.file)?;
    let prefix = keys::shard_prefix(shard);
    let mut batch = WriteBatch::default();
    let mut records = 0;
    while let Some((key, value)) = reader.next_record()? {
        records += 1;
        let mut full = Vec::with_capacity(4 + key.len());
        full.extend_from_slice(&prefix);
        full.extend_from_slice(&key);
        if full[..] == marker[..] {
            continue;
        }
        batch.put_cf(state, full, value);
        if batch.len() >= INSTALL_BATCH_RECORDS {
            db.write(std::mem::take(&mut batch)).map_err(io_err)?;
        }
    }
    db.write(batch).map_err(io_err)?;
    // The snapshot's records carry its cluster time; the applied log id and membership come
    // from its meta, written with the marker's removal in one durable batch.
    let cluster_time_ms = match db.get_cf(state, keys::sm_meta(shard, keys::SM_CLUSTER_TIME)).map_err(io_err)? {
        Some(b) => Decoder::new(&b).i64("cluster time").map_err(corrupt)?,
        None => 0,
    };
    if snap.path != target {
        std::fs::rename(&snap.path, target)?;
        if let Some(dir) = target.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
    }
    layer.lock()?.load_anchors(db, shard)?;
    let mut done = WriteBatch::default();
    let written = Meta { applied: meta.last_log_id, cluster_time_ms, membership: Some(meta.last_membership.clone()) };
    put_meta(&mut done, state, shard, &written);
    done.delete_cf(state, marker);
    db.write_opt(done, &sync).map_err(io_err)?;
    Ok(Installed { meta, cluster_time_ms, records, bytes })
}

/// Writes the shard's state as seen by `snap` to a new snapshot file: its meta, the file (open)
/// and the record count.
fn build(
    db: &DB,
    snap: &rocksdb::Snapshot<'_>,
    shard: ShardId,
    dir: &std::path::Path,
) -> io::Result<(SnapshotMeta, SnapshotFile, u64)> {
    let state = cf(db, CF_STATE)?;
    let get = |kind| snap.get_cf(state, keys::sm_meta(shard, kind)).map_err(io_err);
    let applied = match get(keys::SM_APPLIED)? {
        Some(b) => codec::read_opt_log_id(&mut Decoder::new(&b)).map_err(corrupt)?,
        None => None,
    };
    let membership = match get(keys::SM_MEMBERSHIP)? {
        Some(b) => codec::read_stored_membership(&mut Decoder::new(&b)).map_err(corrupt)?,
        None => StoredMembership::default(),
    };
    let meta = SnapshotMeta { last_log_id: applied, last_membership: membership };
    let mut writer = snapshot::Writer::create(dir, &meta)?;
    let mut records = 0;
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(shard_end(shard));
    opts.set_snapshot(snap);
    let mut it = db.raw_iterator_cf_opt(state, opts);
    it.seek(keys::shard_prefix(shard));
    while it.valid() {
        if let (Some(k), Some(v)) = (it.key(), it.value()) {
            writer.record(&k[4..], v)?;
            records += 1;
        }
        it.next();
    }
    it.status().map_err(io_err)?;
    let file = writer.finish(&dir.join(snapshot::file_name(&meta)))?;
    Ok((meta, file, records))
}

#[cfg(test)]
mod tests {
    use vow_core::Change;

    use super::*;
    use crate::write_behind::tests::pending as promise;

    fn open() -> (tempfile::TempDir, ShardStateMachine) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open(&dir.path().join("db")).unwrap();
        let sm = ShardStateMachine::open(db, ShardId(0), dir.path().join("snap"), broadcast::channel(1).0).unwrap();
        (dir, sm)
    }

    fn apply(sm: &ShardStateMachine, change: Change) {
        let mut layer = sm.layer.lock().unwrap();
        layer.change(sm.shard, change);
        layer.set_meta(None, 0, None);
    }

    fn ids(found: Vec<PromiseId>) -> Vec<String> {
        found.into_iter().map(PromiseId::into_string).collect()
    }

    #[test]
    fn sweeps_see_unflushed_changes_and_not_flushed_keys_they_replaced() {
        let (_dir, sm) = open();
        let state = sm.reader();
        let (p1, p2, p3) = (promise(1, 100), promise(2, 50), promise(3, 5_000));
        apply(&sm, Change { before: None, after: Some(p1.clone()) });
        state.flush().unwrap();
        apply(&sm, Change { before: None, after: Some(p2.clone()) });
        apply(&sm, Change { before: None, after: Some(p3) });
        assert_eq!(ids(state.due_for_timeout(1_000, 10).unwrap()), ["p2", "p1"], "oldest deadline first");
        assert_eq!(ids(state.due_for_timeout(1_000, 1).unwrap()), ["p2"], "the limit holds");

        let settled = Promise { state: State::Resolved, settled_at_ms: 10, ..p1.clone() };
        apply(&sm, Change { before: Some(p1), after: Some(settled) });
        assert_eq!(ids(state.due_for_timeout(1_000, 10).unwrap()), ["p2"], "p1's deadline key is deleted, unflushed");
        assert_eq!(ids(state.due_for_collection(10, 10).unwrap()), ["p1"]);
        assert_eq!(state.get(&PromiseId::new_unchecked("p1")).unwrap().unwrap().state, State::Resolved);

        state.flush().unwrap();
        assert_eq!(ids(state.due_for_timeout(1_000, 10).unwrap()), ["p2"], "the same once flushed");
        assert_eq!(ids(state.due_for_collection(10, 10).unwrap()), ["p1"]);
    }

    #[test]
    fn search_and_snapshots_see_unflushed_changes() {
        let (dir, sm) = open();
        let state = sm.reader();
        apply(&sm, Change { before: None, after: Some(promise(1, 100)) });
        let page = state.search(&SearchFilter::default(), None, 10, usize::MAX).unwrap();
        assert_eq!(page.promises.len(), 1);

        apply(&sm, Change { before: None, after: Some(promise(2, 100)) });
        state.layer.lock().unwrap().flush(&state.db, state.shard).unwrap();
        apply(&sm, Change { before: None, after: Some(promise(3, 100)) });
        let stats = Arc::new(SnapshotStats::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        stats.observe(move |done| record.lock().unwrap().push(done));
        let mut builder = SnapshotBuilder { state: state.clone(), dir: dir.path().join("snap"), stats: stats.clone() };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let built = rt.block_on(builder.build_snapshot()).unwrap();
        // Three records and their deadline keys, plus the applied log id and the cluster time.
        assert_eq!(stats.records(), 8);
        // The size is the file's, and the observer heard of the build.
        assert_eq!(stats.bytes(), built.snapshot.file.metadata().unwrap().len());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].kind, seen[0].records, seen[0].bytes), (SnapshotKind::Built, 8, stats.bytes()));
    }
}
