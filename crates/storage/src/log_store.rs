//! The Raft log of every shard in the node's one RocksDB, with group commit.
//!
//! `append` writes the entries without sync (so they are readable at once, as openraft
//! requires) and hands its completion callback to the node's single [`WalFlusher`] task. The
//! flusher takes every callback that is waiting, issues one `flush_wal(sync = true)` and then
//! completes them all: concurrent appends of all shards share one fsync. Because RocksDB has one
//! WAL per database, an fsync covers every write issued before it, so callbacks complete in
//! order and never before their entries are durable. The flusher counts the appends it completed
//! and the fsyncs it made ([`WalFlusher::appends_synced`], [`WalFlusher::syncs`]), so how many
//! appends share an fsync can be observed.
//!
//! openraft reads every entry back right after appending it: once per follower to replicate it
//! and once more to apply it. A [`LogCache`] of the most recent entries answers those reads
//! from memory; older ranges (a lagging follower, a restart) come from RocksDB.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use rocksdb::{DB, Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions};
use tokio::sync::mpsc;
use vow_core::ShardId;
use vow_core::codec::{Decoder, Encoder};

use crate::codec;
use crate::types::{APPEND_BUDGET_BYTES, Entry, LogId, TypeConfig, Vote, entry_size_hint};
use crate::{CF_LOG, CF_META, cf, corrupt, fitting, io_err, keys};

/// Callbacks waiting for the next WAL fsync, at most this many queued before appends wait.
const FLUSH_QUEUE: usize = 4096;

/// Files whose presence makes the flusher misbehave, for tests of disk trouble.
#[derive(Debug, Default)]
pub struct Failpoints {
    /// While it exists, every fsync fails (a disk error).
    pub fail: Option<std::path::PathBuf>,
    /// While it exists, fsyncs wait (a disk that stops answering): appends stay unsynced. When
    /// it holds a number, every fsync takes that many milliseconds longer instead (a slow disk).
    pub stall: Option<std::path::PathBuf>,
}

/// The stall failpoint (see [`Failpoints::stall`]): appends wait, unsynced and unacknowledged,
/// while the file is there, or the milliseconds it names.
fn stall_fsync(file: &std::path::Path) {
    match std::fs::read_to_string(file).map(|t| t.trim().parse::<u64>()) {
        Ok(Ok(ms)) => std::thread::sleep(std::time::Duration::from_millis(ms)),
        _ => {
            while file.exists() {
                std::thread::sleep(std::time::Duration::from_millis(10)); // poll for the file's removal
            }
        }
    }
}

/// Handle to the node's WAL flusher thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct WalFlusher {
    tx: mpsc::Sender<IOFlushed<TypeConfig>>,
    counters: Arc<SyncCounters>,
}

/// What the flusher thread has done since it started: `appends_synced / syncs` is how many
/// appends shared each fsync, that is how well group commit groups.
#[derive(Default)]
struct SyncCounters {
    appends_synced: AtomicU64,
    syncs: AtomicU64,
    /// Told each successful fsync's duration and appends (the node's metrics).
    observer: std::sync::OnceLock<Box<dyn Fn(std::time::Duration, usize) + Send + Sync>>,
}

impl std::fmt::Debug for SyncCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncCounters")
            .field("appends_synced", &self.appends_synced)
            .field("syncs", &self.syncs)
            .finish_non_exhaustive()
    }
}

impl WalFlusher {
    /// Starts the flusher thread for `db`. It ends when every handle is dropped, and never keeps
    /// the database open by itself (it holds a weak reference between flushes).
    pub fn spawn(db: Arc<DB>) -> Self {
        Self::spawn_with_failpoint(db, None)
    }

    /// As [`WalFlusher::spawn`]; while the file `failpoint` exists, every fsync fails as a disk
    /// error would (tests of what a failing disk does to writes in flight).
    pub fn spawn_with_failpoint(db: Arc<DB>, failpoint: Option<std::path::PathBuf>) -> Self {
        Self::spawn_with_failpoints(db, Failpoints { fail: failpoint, stall: None })
    }

    /// As [`WalFlusher::spawn`], with test failpoints (see [`Failpoints`]).
    pub fn spawn_with_failpoints(db: Arc<DB>, failpoints: Failpoints) -> Self {
        let Failpoints { fail: failpoint, stall } = failpoints;
        let (tx, mut rx) = mpsc::channel::<IOFlushed<TypeConfig>>(FLUSH_QUEUE);
        let db = Arc::downgrade(&db);
        let counters = Arc::new(SyncCounters::default());
        let counted = counters.clone();
        // A dedicated thread: the fsync blocks, and handing each one to tokio's blocking pool
        // cost a thread wake-up on the commit path of every write.
        let spawned = std::thread::Builder::new().name("vow-wal-flusher".into()).spawn(move || {
            let mut waiting = Vec::with_capacity(256);
            while let Some(first) = rx.blocking_recv() {
                waiting.push(first);
                // Let whoever woke us run on first. On a busy node that is usually a worker in
                // the middle of a turn that appends for more shards (or a follower's next
                // append), and those appends then share this fsync: under 64-client load on 8
                // shards, fsyncs per operation fell from 0.35 to 0.24 and context switches by
                // a third (docs/performance.md, "Huge pages, and letting appends meet"). On an
                // idle node the yield returns at once, so a lone write waits for nothing.
                std::thread::yield_now();
                if let Some(f) = &stall {
                    stall_fsync(f);
                }
                while waiting.len() < FLUSH_QUEUE {
                    match rx.try_recv() {
                        Ok(cb) => waiting.push(cb),
                        Err(_) => break,
                    }
                }
                let started = std::time::Instant::now();
                let synced = match db.upgrade() {
                    _ if failpoint.as_ref().is_some_and(|f| f.exists()) => {
                        Err(io::Error::other("WAL fsync failed (failpoint)"))
                    }
                    // The sabotage `ack-before-fsync` hands the WAL to the OS and acknowledges
                    // it unsynced: a kill -9 loses nothing, a power loss loses acknowledged
                    // entries.
                    Some(db) if crate::sabotage::enabled("ack-before-fsync") => db.flush_wal(false).map_err(io_err),
                    Some(db) => db.flush_wal(true).map_err(io_err),
                    None => Err(io::Error::other("database closed")),
                };
                match &synced {
                    // Counted before any callback completes, so whoever sees an append completed
                    // (through its callback's channel) also sees it counted.
                    Ok(()) => {
                        counted.syncs.fetch_add(1, Ordering::Relaxed);
                        counted.appends_synced.fetch_add(waiting.len() as u64, Ordering::Relaxed);
                        if let Some(observe) = counted.observer.get() {
                            observe(started.elapsed(), waiting.len());
                        }
                    }
                    // Fatal: openraft stops the shard when told its log is not durable.
                    Err(e) => tracing::error!(error = %e, "WAL fsync failed"),
                }
                for cb in waiting.drain(..) {
                    cb.io_completed(match &synced {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    });
                }
            }
        });
        if let Err(e) = spawned {
            // Without a flusher no append is ever acknowledged; the shards report it as fatal.
            tracing::error!(error = %e, "cannot start the WAL flusher thread");
        }
        WalFlusher { tx, counters }
    }

    /// Appends this flusher has completed as durable since it started: one per `append` call
    /// (of any shard) whose callback it completed after a successful fsync. Appends failed by a
    /// failing fsync are not counted.
    pub fn appends_synced(&self) -> u64 {
        self.counters.appends_synced.load(Ordering::Relaxed)
    }

    /// Calls `observe` after every successful fsync from now on with its duration and the
    /// appends it made durable (once per flusher; a second observer is ignored).
    pub fn observe_syncs(&self, observe: impl Fn(std::time::Duration, usize) + Send + Sync + 'static) {
        let _ = self.counters.observer.set(Box::new(observe));
    }

    /// Successful WAL fsyncs (`flush_wal(true)` calls) this flusher has made since it started.
    /// Each covers every append queued before it, so under concurrent appends this grows much
    /// slower than [`WalFlusher::appends_synced`].
    pub fn syncs(&self) -> u64 {
        self.counters.syncs.load(Ordering::Relaxed)
    }
}

/// Most recent entries of a shard kept in memory (a few MiB with 256-byte values).
const CACHED_ENTRIES: usize = 8192;

/// The newest appended entries of one shard, consecutive by index, mirroring the tail of the
/// log in RocksDB: every append, truncation and purge updates both. An append writes RocksDB
/// first; a truncation or purge drops from the cache first. Either way a reader that misses the
/// cache finds in RocksDB what the cache held a moment before.
#[derive(Debug, Default)]
struct LogCache {
    entries: VecDeque<Entry>,
}

impl LogCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    fn push(&mut self, entry: Entry) {
        let index = entry.log_id.index;
        match self.entries.back().map(|e| e.log_id.index) {
            // openraft truncates before it overwrites, but stay consistent if it ever does not.
            Some(last) if index <= last => self.truncate_from(index),
            Some(last) if index > last + 1 => self.entries.clear(),
            _ => {}
        }
        self.entries.push_back(entry);
        if self.entries.len() > CACHED_ENTRIES {
            self.entries.pop_front();
        }
    }

    /// Drops the entries at `index` and after.
    fn truncate_from(&mut self, index: u64) {
        let first = self.first_index().unwrap_or(index);
        let keep = index.saturating_sub(first) as usize;
        self.entries.truncate(keep);
    }

    /// Drops the entries up to and including `index`.
    fn purge_through(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.log_id.index <= index) {
            self.entries.pop_front();
        }
    }

    /// The entries `[start, end)` if all of them are cached.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.entries.back()?.log_id.index;
        if start < first || end > last + 1 {
            return None;
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(self.entries.range(from..to).cloned().collect())
    }
}

/// One shard's view of the log; also its own [`RaftLogReader`]. Clones share the cache.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    shard: ShardId,
    flusher: WalFlusher,
    cache: Arc<Mutex<LogCache>>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("shard", &self.shard).finish()
    }
}

impl LogStore {
    pub fn new(db: Arc<DB>, shard: ShardId, flusher: WalFlusher) -> Self {
        LogStore { db, shard, flusher, cache: Arc::default() }
    }

    fn cache(&self) -> MutexGuard<'_, LogCache> {
        // The cache holds no invariant a panicking holder could break halfway.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get_meta(&self, kind: u8) -> io::Result<Option<Vec<u8>>> {
        self.db.get_cf(cf(&self.db, CF_META)?, keys::meta(self.shard, kind)).map_err(io_err)
    }

    fn read_log_id_meta(&self, kind: u8) -> io::Result<Option<LogId>> {
        match self.get_meta(kind)? {
            None => Ok(None),
            Some(b) => {
                let mut d = Decoder::new(&b);
                codec::read_opt_log_id(&mut d).map_err(corrupt)
            }
        }
    }

    fn log_id_bytes(id: &Option<LogId>) -> Vec<u8> {
        let mut e = Encoder::new();
        codec::opt_log_id(&mut e, id);
        e.into_bytes()
    }

    fn last_entry_log_id(&self) -> io::Result<Option<LogId>> {
        let log = cf(&self.db, CF_LOG)?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(keys::log(self.shard, 0).to_vec());
        let mut it = self.db.raw_iterator_cf_opt(log, opts);
        it.seek_for_prev(keys::log(self.shard, u64::MAX));
        if !it.valid() {
            it.status().map_err(io_err)?;
            return Ok(None);
        }
        let value = it.value().ok_or_else(|| io::Error::other("iterator without value"))?;
        Ok(Some(codec::decode_entry(value).map_err(corrupt)?.log_id))
    }
}

impl LogStore {
    /// The entries `[start, end)` (to the end of the log if `end` is `None`), stopping once they
    /// exceed `budget` bytes if there is one (the first entry always comes): from the cache when
    /// it holds the whole range, else from RocksDB, which then reads no further than the budget.
    fn read_entries(&self, start: u64, end: Option<u64>, budget: Option<usize>) -> io::Result<Vec<Entry>> {
        if let Some(end) = end
            && let Some(mut entries) = self.cache().get(start, end)
        {
            if let Some(budget) = budget {
                entries.truncate(fitting(entries.iter().map(entry_size_hint), usize::MAX, budget));
            }
            return Ok(entries);
        }
        let budget = budget.unwrap_or(usize::MAX);
        let log = cf(&self.db, CF_LOG)?;
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let from = keys::log(self.shard, start);
        for item in self.db.iterator_cf(log, IteratorMode::From(&from, Direction::Forward)) {
            let (k, v) = item.map_err(io_err)?;
            if k[..4] != keys::shard_prefix(self.shard) {
                break;
            }
            let index = keys::log_index(&k).ok_or_else(|| io::Error::other("malformed log key"))?;
            if end.is_some_and(|end| index >= end) {
                break;
            }
            bytes = bytes.saturating_add(v.len());
            if !entries.is_empty() && bytes > budget {
                break;
            }
            entries.push(codec::decode_entry(&v).map_err(corrupt)?);
        }
        Ok(entries)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Some(i.saturating_add(1)),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        self.read_entries(start, end, None)
    }

    /// At most [`APPEND_BUDGET_BYTES`] of entries from `[start, end)` (the first always), so
    /// that every AppendEntries fits the receiver's message limit.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        self.read_entries(start, Some(end), Some(APPEND_BUDGET_BYTES))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match self.get_meta(keys::META_VOTE)? {
            None => Ok(None),
            Some(b) => {
                let mut d = Decoder::new(&b);
                Ok(Some(codec::read_vote(&mut d).map_err(corrupt)?))
            }
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id = self.read_log_id_meta(keys::META_LAST_PURGED)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut e = Encoder::new();
        codec::vote(&mut e, vote);
        let (db, key, value) = (self.db.clone(), keys::meta(self.shard, keys::META_VOTE), e.into_bytes());
        // A vote must be on disk before it is returned: otherwise a restart can vote twice in a
        // term. The fsync blocks, so it runs off the runtime's (two) worker threads, which
        // carry every shard's heartbeats.
        tokio::task::spawn_blocking(move || {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.put_cf_opt(cf(&db, CF_META)?, key, value, &wo).map_err(io_err)
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.db
            .put_cf(
                cf(&self.db, CF_META)?,
                keys::meta(self.shard, keys::META_COMMITTED),
                Self::log_id_bytes(&committed),
            )
            .map_err(io_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.read_log_id_meta(keys::META_COMMITTED)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let log = cf(&self.db, CF_LOG)?;
        let mut batch = WriteBatch::default();
        let entries: Vec<Entry> = entries.into_iter().collect();
        for entry in &entries {
            batch.put_cf(log, keys::log(self.shard, entry.log_id.index), codec::encode_entry(entry));
        }
        self.db.write(batch).map_err(io_err)?;
        {
            let mut cache = self.cache();
            for entry in entries {
                cache.push(entry);
            }
        }
        self.flusher.tx.send(callback).await.map_err(|_| io::Error::other("WAL flusher stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index + 1);
        self.cache().truncate_from(from);
        let log = cf(&self.db, CF_LOG)?;
        self.db.delete_range_cf(log, keys::log(self.shard, from), keys::log(self.shard, u64::MAX)).map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // The purge point and the deletion go in one atomic batch, so no crash can leave a hole
        // between the last purged id and the first remaining entry.
        let mut batch = WriteBatch::default();
        batch.put_cf(
            cf(&self.db, CF_META)?,
            keys::meta(self.shard, keys::META_LAST_PURGED),
            Self::log_id_bytes(&Some(log_id)),
        );
        batch.delete_range_cf(cf(&self.db, CF_LOG)?, keys::log(self.shard, 0), keys::log(self.shard, log_id.index + 1));
        self.cache().purge_through(log_id.index);
        self.db.write(batch).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use openraft::EntryPayload;
    use openraft::vote::RaftLeaderId;
    use vow_core::NodeId;

    use super::*;
    use crate::types::LeaderId;

    fn entry(term: u64, index: u64) -> Entry {
        Entry { log_id: LogId::new(LeaderId::new(term, NodeId(1)), index), payload: EntryPayload::Blank }
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<(u64, u64)>> {
        entries.map(|es| es.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect())
    }

    fn cache_of(range: std::ops::RangeInclusive<u64>) -> LogCache {
        let mut c = LogCache::default();
        for i in range {
            c.push(entry(1, i));
        }
        c
    }

    #[test]
    fn appends_are_bounded_by_bytes_and_always_carry_one_entry() {
        assert_eq!(fitting([3, 3, 3], usize::MAX, 6), 2);
        assert_eq!(fitting([3, 3, 3], usize::MAX, 100), 3);
        assert_eq!(fitting([100, 1], usize::MAX, 6), 1, "an entry larger than the budget still goes, alone");
        assert_eq!(fitting([], usize::MAX, 6), 0);
    }

    #[test]
    fn serves_only_ranges_it_holds_completely() {
        let c = cache_of(5..=9);
        assert_eq!(indexes(c.get(5, 10)), Some(vec![(1, 5), (1, 6), (1, 7), (1, 8), (1, 9)]));
        assert_eq!(indexes(c.get(7, 8)), Some(vec![(1, 7)]));
        assert_eq!(indexes(c.get(7, 7)), Some(vec![]));
        assert_eq!(indexes(c.get(4, 6)), None, "starts before the cache");
        assert_eq!(indexes(c.get(8, 11)), None, "ends after the cache");
        assert_eq!(indexes(LogCache::default().get(0, 1)), None);
    }

    #[test]
    fn truncation_and_overwrite_drop_the_old_suffix() {
        let mut c = cache_of(1..=6);
        c.truncate_from(4);
        assert_eq!(indexes(c.get(1, 4)), Some(vec![(1, 1), (1, 2), (1, 3)]));
        assert_eq!(indexes(c.get(1, 5)), None);
        // A new leader's entry at an index that is already cached replaces it and what follows.
        let mut c = cache_of(1..=6);
        c.push(entry(2, 3));
        assert_eq!(indexes(c.get(1, 4)), Some(vec![(1, 1), (1, 2), (2, 3)]));
        assert_eq!(indexes(c.get(1, 5)), None);
        c.truncate_from(0);
        assert_eq!(indexes(c.get(1, 2)), None);
    }

    #[test]
    fn purge_gap_and_capacity_keep_the_cache_consecutive() {
        let mut c = cache_of(1..=6);
        c.purge_through(3);
        assert_eq!(indexes(c.get(3, 5)), None);
        assert_eq!(indexes(c.get(4, 7)), Some(vec![(1, 4), (1, 5), (1, 6)]));
        // An entry that does not follow the cached ones (after a snapshot) restarts the cache.
        c.push(entry(1, 100));
        assert_eq!(indexes(c.get(6, 7)), None);
        assert_eq!(indexes(c.get(100, 101)), Some(vec![(1, 100)]));
        let c = cache_of(1..=(CACHED_ENTRIES as u64 + 10));
        assert_eq!(c.entries.len(), CACHED_ENTRIES);
        assert_eq!(c.first_index(), Some(11));
    }
}
