//! One shard's state machine on RocksDB: applies committed entries with [`vow_core::apply`],
//! builds and installs snapshots, and announces settled promises.

use std::collections::HashMap;
use std::fmt::Debug;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{Stream, StreamExt};
use openraft::EntryPayload;
use openraft::alias::SnapshotOf;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use rocksdb::{DB, ReadOptions, WriteBatch, WriteOptions};
use tokio::sync::broadcast;
use vow_core::codec::{Decoder, Encoder};
use vow_core::{Change, Promise, PromiseId, PromiseView, ShardId, State};

use super::snapshot::{self, SnapshotFile};
use super::{CF_STATE, cf, corrupt, io_err, keys, shard_end};
use crate::raft::{ApplyResponse, LogId, SnapshotMeta, StoredMembership, TypeConfig, codec};

/// Records per write batch when installing a snapshot, so memory stays bounded.
const INSTALL_BATCH_RECORDS: usize = 4096;

/// The maps apply consults for every command, keyed by promise id. foldhash instead of the
/// standard SipHash (hashing and lookups were 2.7% of a follower's samples, now 1.1%); ids are
/// chosen by clients, so each map still gets a random seed.
type IdMap<V> = HashMap<PromiseId, V, foldhash::fast::RandomState>;

/// Records per generation of [`RecentRecords`].
const RECENT_RECORDS: usize = 4096;
/// Approximate bytes per generation of [`RecentRecords`]: values go up to 1 MiB, so the count
/// alone does not bound the memory.
const RECENT_BYTES: usize = 2 << 20;

/// Read access to one shard's applied state, for the API, sweepers and snapshots. Cheap to clone.
#[derive(Clone)]
pub struct ShardState {
    db: Arc<DB>,
    shard: ShardId,
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
    pub fn new(db: Arc<DB>, shard: ShardId) -> Self {
        ShardState { db, shard }
    }

    pub fn get(&self, id: &PromiseId) -> io::Result<Option<Promise>> {
        read_promise(&self.db, self.shard, id)
    }

    /// Ids of pending promises whose deadline is at or before `now_ms`, oldest first.
    pub fn due_for_timeout(&self, now_ms: i64, limit: usize) -> io::Result<Vec<PromiseId>> {
        self.scan_timed(keys::STATE_BY_DEADLINE, now_ms, limit)
    }

    /// Ids of promises settled at or before `settled_before_ms`, oldest first.
    pub fn due_for_collection(&self, settled_before_ms: i64, limit: usize) -> io::Result<Vec<PromiseId>> {
        self.scan_timed(keys::STATE_BY_SETTLED, settled_before_ms, limit)
    }

    fn scan_timed(&self, kind: u8, up_to_ms: i64, limit: usize) -> io::Result<Vec<PromiseId>> {
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
            if let Some(id) = it.key().and_then(keys::timed_id) {
                ids.push(PromiseId::new_unchecked(id));
            }
            it.next();
        }
        it.status().map_err(io_err)?;
        Ok(ids)
    }

    /// Promises in id order after `after` that match `filter`, at most `limit`.
    pub fn search(&self, filter: &SearchFilter, after: Option<&str>, limit: usize) -> io::Result<SearchPage> {
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
            scanned += 1;
            last_scanned = Some(p.id.to_string());
            if filter.matches(&p) {
                page.promises.push(p);
            }
            it.next();
        }
        it.status().map_err(io_err)?;
        Ok(page)
    }
}

impl PromiseView for ShardState {
    type Error = io::Error;
    fn promise(&self, id: &PromiseId) -> io::Result<Option<Promise>> {
        self.get(id)
    }
}

fn read_promise(db: &DB, shard: ShardId, id: &PromiseId) -> io::Result<Option<Promise>> {
    match db.get_pinned_cf(cf(db, CF_STATE)?, keys::promise(shard, id.as_str())).map_err(io_err)? {
        None => Ok(None),
        Some(b) => Ok(Some(Promise::decode(&b).map_err(corrupt)?)),
    }
}

/// The records the state machine wrote most recently (`None`: deleted), so that a command on a
/// promise written a moment ago — the settle that follows a create — does not search the
/// memtable for it (that search was ~5% of the cluster's CPU under create-settle load). Two
/// generations: when the young one holds [`RECENT_RECORDS`] records or [`RECENT_BYTES`] it
/// becomes the old one and the old one is dropped, so memory stays under ~4 MiB per shard. Only
/// `apply` writes records and only after its batch is in the database; a snapshot install
/// empties it.
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

    fn clear(&mut self) {
        self.young.clear();
        self.young_bytes = 0;
        self.old.clear();
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

/// The records as of the previous entry in this apply batch: the batch's own changes first,
/// then the records written lately, then the database.
struct BatchView<'a> {
    db: &'a DB,
    shard: ShardId,
    overlay: &'a IdMap<Option<Promise>>,
    recent: &'a RecentRecords,
    /// Sabotage only (`skip-settled-check`): present settled promises as pending.
    forget_settlement: bool,
}

impl PromiseView for BatchView<'_> {
    type Error = io::Error;
    fn promise(&self, id: &PromiseId) -> io::Result<Option<Promise>> {
        let p = match self.overlay.get(id).or_else(|| self.recent.get(id)) {
            Some(p) => p.clone(),
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

/// The secondary index keys a record version contributes.
fn index_key(shard: ShardId, p: &Promise) -> Vec<u8> {
    if p.state.is_settled() {
        keys::timed(shard, keys::STATE_BY_SETTLED, p.settled_at_ms, p.id.as_str())
    } else {
        keys::timed(shard, keys::STATE_BY_DEADLINE, p.deadline_ms, p.id.as_str())
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
    settled: broadcast::Sender<Promise>,
    /// Records in the newest snapshot built or installed here (0 until there is one): the
    /// state's size, for the snapshot policy.
    snapshot_records: Arc<AtomicU64>,
    recent: RecentRecords,
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
        settled: broadcast::Sender<Promise>,
    ) -> io::Result<Self> {
        snapshot::clean_temporaries(&snapshot_dir);
        let mut sm = ShardStateMachine {
            db,
            shard,
            snapshot_dir,
            applied: None,
            membership: StoredMembership::default(),
            cluster_time_ms: 0,
            settled,
            snapshot_records: Arc::default(),
            recent: RecentRecords::default(),
        };
        let state = cf(&sm.db, CF_STATE)?;
        if sm.db.get_cf(state, keys::sm_meta(shard, keys::SM_INSTALLING)).map_err(io_err)?.is_some() {
            let path = snapshot::latest(&sm.snapshot_dir)?
                .ok_or_else(|| io::Error::other("snapshot install was interrupted and its file is gone"))?;
            tracing::warn!(shard = %shard, path = %path.display(), "resuming interrupted snapshot install");
            sm.load_snapshot(SnapshotFile::open(path)?)?;
        }
        sm.load_meta()?;
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

    /// Records the applied log id and cluster time, and the membership too when it changed.
    fn put_meta(&self, batch: &mut WriteBatch, membership_changed: bool) -> io::Result<()> {
        let state = cf(&self.db, CF_STATE)?;
        let mut e = Encoder::new();
        codec::opt_log_id(&mut e, &self.applied);
        batch.put_cf(state, keys::sm_meta(self.shard, keys::SM_APPLIED), e.into_bytes());
        if membership_changed {
            let mut e = Encoder::new();
            codec::stored_membership(&mut e, &self.membership);
            batch.put_cf(state, keys::sm_meta(self.shard, keys::SM_MEMBERSHIP), e.into_bytes());
        }
        let mut e = Encoder::new();
        e.i64(self.cluster_time_ms);
        batch.put_cf(state, keys::sm_meta(self.shard, keys::SM_CLUSTER_TIME), e.into_bytes());
        Ok(())
    }

    fn write_change(&self, batch: &mut WriteBatch, change: &Change) -> io::Result<()> {
        let state = cf(&self.db, CF_STATE)?;
        if let Some(before) = &change.before {
            batch.delete_cf(state, index_key(self.shard, before));
            if change.after.is_none() {
                batch.delete_cf(state, keys::promise(self.shard, before.id.as_str()));
            }
        }
        if let Some(after) = &change.after {
            batch.put_cf(state, index_key(self.shard, after), []);
            batch.put_cf(state, keys::promise(self.shard, after.id.as_str()), after.encode());
        }
        Ok(())
    }

    /// Replaces the shard's state with the snapshot's, crash-safely: the install marker is set
    /// first and cleared in the same batch that records the new applied log id, and
    /// [`ShardStateMachine::open`] redoes an install it finds marked.
    fn load_snapshot(&mut self, snap: SnapshotFile) -> io::Result<SnapshotMeta> {
        let db = self.db.clone();
        let state = cf(&db, CF_STATE)?;
        let marker = keys::sm_meta(self.shard, keys::SM_INSTALLING);
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db.put_cf_opt(state, marker, [], &sync).map_err(io_err)?;
        let mut clear = WriteBatch::default();
        clear.delete_range_cf(state, &keys::shard_prefix(self.shard)[..], &marker[..]);
        let mut after_marker = marker.to_vec();
        after_marker.push(0);
        clear.delete_range_cf(state, &after_marker[..], &shard_end(self.shard)[..]);
        self.db.write(clear).map_err(io_err)?;
        self.recent.clear();

        let (meta, mut reader) = snapshot::Reader::open(snap.file)?;
        let prefix = keys::shard_prefix(self.shard);
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
                self.db.write(std::mem::take(&mut batch)).map_err(io_err)?;
            }
        }
        self.db.write(batch).map_err(io_err)?;
        self.snapshot_records.store(records, Ordering::Relaxed);
        // The snapshot's own records include the applied meta; load it, then make it agree
        // with the snapshot meta, and clear the marker in the same durable batch.
        self.load_meta()?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let mut done = WriteBatch::default();
        self.put_meta(&mut done, true)?;
        done.delete_cf(state, marker);
        self.db.write_opt(done, &sync).map_err(io_err)?;
        Ok(meta)
    }

    /// A handle for reads of this shard's state.
    /// Records in the newest snapshot of this replica, kept current as snapshots come and go.
    pub fn snapshot_records(&self) -> Arc<AtomicU64> {
        self.snapshot_records.clone()
    }

    pub fn reader(&self) -> ShardState {
        ShardState::new(self.db.clone(), self.shard)
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
        let mut batch = WriteBatch::default();
        let mut overlay: IdMap<Option<Promise>> = IdMap::default();
        let mut replies = Vec::new();
        let mut settled = Vec::new();
        let mut membership_changed = false;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            self.applied = Some(entry.log_id);
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
                    let view = BatchView {
                        db: &self.db,
                        shard: self.shard,
                        overlay: &overlay,
                        recent: &self.recent,
                        forget_settlement,
                    };
                    let applied = vow_core::apply(&view, self.cluster_time_ms, entry.log_id.index, &proposal)?;
                    self.cluster_time_ms = applied.cluster_time_ms;
                    for change in applied.changes {
                        self.write_change(&mut batch, &change)?;
                        if let Some(p) = change.newly_settled() {
                            settled.push(p.clone());
                        }
                        let id = change.after.as_ref().or(change.before.as_ref()).map(|p| p.id.clone());
                        if let Some(id) = id {
                            overlay.insert(id, change.after);
                        }
                    }
                    ApplyResponse(Some(applied.outcome))
                }
            };
            replies.push((responder, reply));
        }
        self.put_meta(&mut batch, membership_changed)?;
        self.db.write(batch).map_err(io_err)?;
        for (id, record) in overlay {
            self.recent.insert(id, record);
        }
        for (responder, reply) in replies {
            if let Some(r) = responder {
                r.send(reply);
            }
        }
        for p in settled {
            // No receiver is fine: nobody is waiting.
            let _ = self.settled.send(p);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            shard: self.shard,
            dir: self.snapshot_dir.clone(),
            records: self.snapshot_records.clone(),
        }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> Result<(), io::Error> {
        let final_path = self.snapshot_dir.join(snapshot::file_name(meta));
        std::fs::create_dir_all(&self.snapshot_dir)?;
        if snapshot.path != final_path {
            std::fs::rename(&snapshot.path, &final_path)?;
            std::fs::File::open(&self.snapshot_dir)?.sync_all()?;
        }
        snapshot::latest(&self.snapshot_dir)?;
        let file = SnapshotFile::open(final_path)?;
        let loaded = self.load_snapshot(file)?;
        tracing::info!(shard = %self.shard, last_log_id = ?loaded.last_log_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>, io::Error> {
        let Some(path) = snapshot::latest(&self.snapshot_dir)? else { return Ok(None) };
        let file = SnapshotFile::open(path)?;
        let (meta, _) = snapshot::Reader::open(file.file.try_clone()?)?;
        Ok(Some(Snapshot { meta, snapshot: SnapshotFile::open(file.path)? }))
    }
}

/// Builds a snapshot from a consistent RocksDB snapshot while the state machine keeps applying.
#[derive(Debug)]
pub struct SnapshotBuilder {
    db: Arc<DB>,
    shard: ShardId,
    dir: PathBuf,
    records: Arc<AtomicU64>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotFile>, io::Error> {
        let (db, shard, dir) = (self.db.clone(), self.shard, self.dir.clone());
        let (meta, path, records) = tokio::task::spawn_blocking(move || {
            let built = build(&db, shard, &dir)?;
            // Only the newest snapshot is ever served or installed; the older ones go (a reader
            // still streaming one to a follower keeps its open file).
            snapshot::latest(&dir)?;
            Ok::<_, io::Error>(built)
        })
        .await
        .map_err(io::Error::other)??;
        self.records.store(records, Ordering::Relaxed);
        tracing::info!(shard = %shard, last_log_id = ?meta.last_log_id, "snapshot built");
        Ok(Snapshot { meta, snapshot: SnapshotFile::open(path)? })
    }
}

/// Writes the shard's state as of now to a snapshot file: its meta, path and record count.
fn build(db: &DB, shard: ShardId, dir: &std::path::Path) -> io::Result<(SnapshotMeta, PathBuf, u64)> {
    let snap = db.snapshot();
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
    opts.set_snapshot(&snap);
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
    let path = dir.join(snapshot::file_name(&meta));
    writer.finish(&path)?;
    Ok((meta, path, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> PromiseId {
        PromiseId::new_unchecked(format!("p{n}"))
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
        recent.clear();
        assert!(recent.get(&id(2 * RECENT_RECORDS)).is_none());
    }

    #[test]
    fn recent_records_are_bounded_by_bytes_too() {
        let mut recent = RecentRecords::default();
        let big = |n: usize| Promise {
            id: id(n),
            state: State::Pending,
            param: vow_core::Value { headers: Default::default(), data: vec![0; 1 << 20] },
            value: vow_core::Value::default(),
            deadline_ms: 0,
            tags: Default::default(),
            created_at_ms: 0,
            settled_at_ms: 0,
            idempotency_key_create: String::new(),
            idempotency_key_settle: String::new(),
            revision: 0,
        };
        for n in 0..10 {
            recent.insert(id(n), Some(big(n)));
        }
        let held = recent.young.len() + recent.old.len();
        assert!(held <= 2 * (RECENT_BYTES >> 20) + 2, "{held} records of 1 MiB held");
        assert!(recent.get(&id(9)).is_some(), "the newest is always there");
    }
}
