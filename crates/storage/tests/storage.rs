//! Storage against real RocksDB in temporary directories: openraft's own conformance suite,
//! plus what the suite does not cover — shards sharing one database and its WAL fsyncs (group
//! commit), durability across a reopen, and a snapshot moved from one node's database to
//! another's.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::stream;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderId;
use openraft::{EntryPayload, StorageError};
use tempfile::TempDir;
use tokio::sync::broadcast;
use vow_core::{Command, NodeId, PromiseId, Proposal, SettleAs, ShardId, State, Value};
use vow_storage::types::{Entry, LeaderId, LogId, TypeConfig, Vote};
use vow_storage::{self as storage, log_store::LogStore, log_store::WalFlusher, state_machine::ShardStateMachine};

struct Builder;

fn open_shard(
    dir: &std::path::Path,
    shard: ShardId,
) -> std::io::Result<(Arc<rocksdb::DB>, LogStore, ShardStateMachine)> {
    let db = storage::open(&dir.join("db"))?;
    let log = LogStore::new(db.clone(), shard, WalFlusher::spawn(db.clone()));
    let (tx, _) = broadcast::channel(1024);
    let sm = ShardStateMachine::open(db.clone(), shard, dir.join(format!("snapshots-{}", shard.0)), tx)?;
    Ok((db, log, sm))
}

impl StoreBuilder<TypeConfig, LogStore, ShardStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, ShardStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        let (_, log, sm) =
            open_shard(dir.path(), ShardId(0)).map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_conformance_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(Builder).await
}

fn lid(term: u64, index: u64) -> LogId {
    LogId::new(LeaderId::new(term, NodeId(1)), index)
}

fn proposal_entry(index: u64, command: Command) -> Entry {
    Entry {
        log_id: lid(1, index),
        payload: EntryPayload::Normal(Arc::new(Proposal { stamp_ms: 1_000 + index as i64, command })),
    }
}

async fn append(log: &mut LogStore, entries: Vec<Entry>) {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await.expect("append");
    rx.await.expect("flusher alive").expect("flushed");
}

#[tokio::test]
async fn shards_share_one_database_without_touching_each_other() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = storage::open(&dir.path().join("db"))?;
    let flusher = WalFlusher::spawn(db.clone());
    let mut a = LogStore::new(db.clone(), ShardId(0), flusher.clone());
    let mut b = LogStore::new(db.clone(), ShardId(1), flusher);
    let blank = |i| Entry { log_id: lid(1, i), payload: EntryPayload::Blank };
    append(&mut a, (1..=5).map(blank).collect()).await;
    append(&mut b, (1..=3).map(blank).collect()).await;
    a.truncate_after(Some(lid(1, 2))).await?;
    b.purge(lid(1, 1)).await?;
    assert_eq!(a.try_get_log_entries(0..100).await?.len(), 2);
    assert_eq!(b.try_get_log_entries(0..100).await?.len(), 2);
    assert_eq!(a.get_log_state().await?.last_log_id, Some(lid(1, 2)));
    let sb = b.get_log_state().await?;
    assert_eq!((sb.last_purged_log_id, sb.last_log_id), (Some(lid(1, 1)), Some(lid(1, 3))));
    Ok(())
}

/// A create of promise `id` with a 256-byte param, as log entry `index`.
fn create_entry(index: u64, id: String) -> Entry {
    proposal_entry(
        index,
        Command::Create {
            id: PromiseId::new_unchecked(id),
            param: Value { headers: BTreeMap::new(), data: vec![7; 256] },
            deadline_ms: 10_000_000,
            tags: BTreeMap::new(),
            idempotency_key: String::new(),
        },
    )
}

/// Group commit: every shard's appends share the node's WAL fsyncs. Eight shards append one
/// entry at a time, each waiting for its append to be durable before the next, as openraft
/// does; while one fsync runs the others' appends queue up, and the next fsync covers them all.
/// Were each append fsynced on its own, the flusher would count as many syncs as appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_of_all_shards_share_wal_fsyncs() -> std::io::Result<()> {
    const SHARDS: u32 = 8;
    const APPENDS_PER_SHARD: u64 = 200;
    let dir = tempfile::tempdir()?;
    let db = storage::open(&dir.path().join("db"))?;
    let flusher = WalFlusher::spawn(db.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for shard in 0..SHARDS {
        let mut log = LogStore::new(db.clone(), ShardId(shard), flusher.clone());
        tasks.spawn(async move {
            let mut completed = 0u64;
            for index in 1..=APPENDS_PER_SHARD {
                let (tx, rx) = TypeConfig::oneshot();
                let entry = create_entry(index, format!("s{shard}-p{index}"));
                log.append(vec![entry], IOFlushed::signal(tx)).await?;
                rx.await.map_err(std::io::Error::other)??;
                completed += 1;
            }
            let stored = log.try_get_log_entries(1..=APPENDS_PER_SHARD).await?.len() as u64;
            assert_eq!(stored, APPENDS_PER_SHARD, "shard {shard}: every entry is in its log");
            Ok::<_, std::io::Error>(completed)
        });
    }
    let mut appends = 0;
    while let Some(done) = tasks.join_next().await {
        appends += done.map_err(std::io::Error::other)??;
    }
    let (appends_synced, syncs) = (flusher.appends_synced(), flusher.syncs());
    eprintln!("{appends} appends from {SHARDS} shards: {appends_synced} synced by {syncs} fsyncs");
    assert_eq!(appends, u64::from(SHARDS) * APPENDS_PER_SHARD, "every append completed");
    assert_eq!(appends_synced, appends, "the flusher completed every append after an fsync");
    // One shard's appends come one after another, each after the last was synced: no two of
    // them can share an fsync.
    assert!(syncs >= APPENDS_PER_SHARD, "{syncs} fsyncs cannot cover {APPENDS_PER_SHARD} appends in a row");
    assert!(syncs * 2 <= appends, "{syncs} fsyncs for {appends} appends: concurrent appends must share them");
    Ok(())
}

/// An append with no other to share an fsync with still gets one, and its callback carries that
/// fsync's result: while every fsync fails (the failpoint), so does the append.
#[tokio::test]
async fn a_lone_append_is_acknowledged_by_its_own_fsync() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = storage::open(&dir.path().join("db"))?;
    let failpoint = dir.path().join("fail-wal-fsync");
    std::fs::write(&failpoint, b"")?;
    let flusher = WalFlusher::spawn_with_failpoint(db.clone(), Some(failpoint.clone()));
    let mut log = LogStore::new(db, ShardId(0), flusher.clone());

    let (tx, rx) = TypeConfig::oneshot();
    log.append(vec![create_entry(1, "p1".into())], IOFlushed::signal(tx)).await?;
    let failed = rx.await.map_err(std::io::Error::other)?;
    assert!(failed.is_err(), "acknowledged without a successful fsync");
    assert_eq!((flusher.appends_synced(), flusher.syncs()), (0, 0), "a failed fsync syncs nothing");

    std::fs::remove_file(&failpoint)?;
    append(&mut log, vec![create_entry(2, "p2".into())]).await;
    // Counted before the callback completed, so it shows here already.
    assert_eq!((flusher.appends_synced(), flusher.syncs()), (1, 1), "one fsync for the one append");
    Ok(())
}

/// A create and a settle of promise "p", as log entries 1 and 2.
fn create_and_settle() -> Vec<Entry> {
    let id = PromiseId::new_unchecked("p");
    vec![
        proposal_entry(
            1,
            Command::Create {
                id: id.clone(),
                param: Value::default(),
                deadline_ms: 1_000_000,
                tags: BTreeMap::new(),
                idempotency_key: String::new(),
            },
        ),
        proposal_entry(
            2,
            Command::Settle {
                id,
                settle_as: SettleAs::Resolve,
                value: Value { headers: BTreeMap::new(), data: b"v".to_vec() },
                idempotency_key: "k".into(),
            },
        ),
    ]
}

async fn apply(sm: &mut ShardStateMachine, entries: Vec<Entry>) -> std::io::Result<()> {
    sm.apply(stream::iter(entries.into_iter().map(|e| Ok((e, None))))).await
}

fn assert_settled(sm: &ShardStateMachine) -> std::io::Result<()> {
    let p = sm.reader().get(&PromiseId::new_unchecked("p"))?.expect("record survives");
    assert_eq!((p.state, p.value.data.as_slice(), p.revision), (State::Resolved, &b"v"[..], 2));
    Ok(())
}

#[tokio::test]
async fn log_vote_and_state_survive_a_reopen() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let (_db, mut log, mut sm) = open_shard(dir.path(), ShardId(0))?;
        log.save_vote(&Vote::new_committed(3, NodeId(2))).await?;
        append(&mut log, create_and_settle()).await;
        apply(&mut sm, create_and_settle()).await?;
        assert_settled(&sm)?;
        // What a node's shutdown does after stopping Raft.
        sm.reader().flush()?;
    }
    let (_db, mut log, mut sm) = open_shard(dir.path(), ShardId(0))?;
    assert_eq!(log.read_vote().await?, Some(Vote::new_committed(3, NodeId(2))));
    assert_eq!(log.get_log_state().await?.last_log_id, Some(lid(1, 2)));
    assert_eq!(sm.applied_state().await?.0, Some(lid(1, 2)));
    assert_settled(&sm)
}

/// Applied changes reach the database only every thousand or so records; a crash loses the
/// rest, and the applied log id with them, so Raft applies those entries again from its log.
#[tokio::test]
async fn state_applied_but_not_written_is_applied_again_from_the_log() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let (_db, mut log, mut sm) = open_shard(dir.path(), ShardId(0))?;
        append(&mut log, create_and_settle()).await;
        apply(&mut sm, create_and_settle()).await?;
        assert_settled(&sm)?;
        // Dropped without a flush: a crash.
    }
    let (_db, mut log, mut sm) = open_shard(dir.path(), ShardId(0))?;
    let (applied, _) = sm.applied_state().await?;
    assert_eq!(applied, None, "the database has nothing applied");
    assert_eq!(sm.reader().get(&PromiseId::new_unchecked("p"))?, None);
    let from_log = log.try_get_log_entries(1..3).await?;
    assert_eq!(from_log.len(), 2, "the log still holds what must be applied again");
    apply(&mut sm, from_log).await?;
    assert_eq!(sm.applied_state().await?.0, Some(lid(1, 2)));
    assert_settled(&sm)
}

#[tokio::test]
async fn a_snapshot_moves_a_shard_to_another_database() -> std::io::Result<()> {
    let (src_dir, dst_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (_db, _log, mut src) = open_shard(src_dir.path(), ShardId(3))?;
    let mut entries = Vec::new();
    for i in 0..2_000u64 {
        let id = PromiseId::new_unchecked(format!("p{i:05}"));
        entries.push(proposal_entry(
            2 * i + 1,
            Command::Create {
                id: id.clone(),
                param: Value { headers: BTreeMap::new(), data: vec![7; 256] },
                deadline_ms: if i % 2 == 0 { 500 } else { 10_000_000 },
                tags: BTreeMap::from([("k".into(), (i % 3).to_string())]),
                idempotency_key: String::new(),
            },
        ));
        entries.push(proposal_entry(
            2 * i + 2,
            Command::Settle {
                id,
                settle_as: SettleAs::Reject,
                value: Value::default(),
                idempotency_key: String::new(),
            },
        ));
    }
    src.apply(stream::iter(entries.into_iter().map(|e| Ok((e, None))))).await?;
    let snapshot = src.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(snapshot.meta.last_log_id, Some(lid(1, 4_000)));

    let (db2, log2, mut dst) = open_shard(dst_dir.path(), ShardId(3))?;
    let meta = snapshot.meta.clone();
    dst.install_snapshot(&meta, snapshot.snapshot).await?;
    assert_eq!(dst.applied_state().await?.0, Some(lid(1, 4_000)));
    let (reader_src, reader_dst) = (src.reader(), dst.reader());
    let filter = Default::default();
    let all_src = reader_src.search(&filter, None, 5_000, usize::MAX)?.promises;
    let all_dst = reader_dst.search(&filter, None, 5_000, usize::MAX)?.promises;
    assert_eq!(all_src.len(), 2_000);
    assert_eq!(all_src, all_dst);
    // Secondary indexes came along too: the settled index finds every promise.
    assert_eq!(reader_dst.due_for_collection(i64::MAX, 10_000)?.len(), 2_000);
    // Building again (here and on the source) keeps only the newest file: snapshots of a
    // growing state must not pile up on disk.
    for _ in 0..3 {
        src.get_snapshot_builder().await.build_snapshot().await?;
    }
    let files = std::fs::read_dir(src_dir.path().join("snapshots-3"))?.count();
    assert_eq!(files, 1, "old snapshot files are removed after a build");
    // And the snapshot survives a reopen as the current one.
    drop((db2, log2, dst, reader_dst));
    let (_db3, _log3, mut reopened) = open_shard(dst_dir.path(), ShardId(3))?;
    let current = reopened.get_current_snapshot().await?.expect("current snapshot after restart");
    assert_eq!(current.meta, meta);
    Ok(())
}

/// A flush from another task (a search, a snapshot) can come between two entries of one apply
/// call. It must write exactly the entries applied so far together with their log id: changes
/// ahead of the recorded log id would be applied a second time after a crash.
#[tokio::test]
async fn a_flush_between_two_entries_writes_the_first_with_its_log_id() -> std::io::Result<()> {
    use futures::StreamExt;
    let dir = tempfile::tempdir()?;
    {
        let (_db, mut log, mut sm) = open_shard(dir.path(), ShardId(0))?;
        append(&mut log, create_and_settle()).await;
        let reader = sm.reader();
        let entries = stream::iter(create_and_settle()).map(move |e| {
            if e.log_id.index == 2 {
                reader.flush()?;
            }
            Ok((e, None))
        });
        sm.apply(entries).await?;
        assert_settled(&sm)?;
        // Dropped without another flush: a crash.
    }
    let (_db, _log, mut sm) = open_shard(dir.path(), ShardId(0))?;
    assert_eq!(sm.applied_state().await?.0, Some(lid(1, 1)), "the flush recorded entry 1 as applied");
    let p = sm.reader().get(&PromiseId::new_unchecked("p"))?.expect("entry 1's create was written");
    assert_eq!(p.state, State::Pending, "and nothing of entry 2");
    Ok(())
}

/// One apply call with thousands of entries (a restart re-applying its log, a follower catching
/// up) writes to the database as it goes instead of holding every change in memory.
#[tokio::test]
async fn a_long_apply_call_writes_as_it_goes() -> std::io::Result<()> {
    use futures::StreamExt;
    let dir = tempfile::tempdir()?;
    let creates: Vec<Entry> = (1..=3_000u64)
        .map(|i| {
            proposal_entry(
                i,
                Command::Create {
                    id: PromiseId::new_unchecked(format!("p{i}")),
                    param: Value::default(),
                    deadline_ms: 1_000_000,
                    tags: BTreeMap::new(),
                    idempotency_key: String::new(),
                },
            )
        })
        .collect();
    let (db, mut log, mut sm) = open_shard(dir.path(), ShardId(0))?;
    append(&mut log, creates.clone()).await;
    let written_by_2500 = Arc::new(std::sync::Mutex::new(None));
    let seen = written_by_2500.clone();
    let entries = stream::iter(creates).map(move |e| {
        if e.log_id.index == 2_500 {
            let state = db.cf_handle(storage::CF_STATE).expect("state family");
            let applied = storage::keys::sm_meta(ShardId(0), storage::keys::SM_APPLIED);
            *seen.lock().unwrap() = Some(db.get_cf(state, applied).expect("read").is_some());
        }
        Ok((e, None))
    });
    sm.apply(entries).await?;
    assert_eq!(*written_by_2500.lock().unwrap(), Some(true), "nothing reached the database during the call");
    Ok(())
}

/// Records in a snapshot file other than the state machine's own keys (applied log id, cluster
/// time, membership), after checking its trailer: promises and their index keys.
fn records_in(file: std::fs::File) -> std::io::Result<(vow_storage::types::SnapshotMeta, u64)> {
    let (meta, mut reader) = storage::snapshot::Reader::open(file)?;
    let mut n = 0;
    while let Some((key, _)) = reader.next_record()? {
        if key.first() != Some(&storage::keys::STATE_META) {
            n += 1;
        }
    }
    Ok((meta, n))
}

/// `count` creates of distinct ids at log indexes `first..first + count`.
fn creates(first: u64, count: u64, prefix: &str) -> Vec<Entry> {
    (0..count)
        .map(|i| {
            proposal_entry(
                first + i,
                Command::Create {
                    id: PromiseId::new_unchecked(format!("{prefix}{i:07}")),
                    param: Value { headers: BTreeMap::new(), data: vec![1; 16] },
                    deadline_ms: 10_000_000,
                    tags: BTreeMap::new(),
                    idempotency_key: String::new(),
                },
            )
        })
        .collect()
}

/// openraft builds a snapshot in a task of its own while the state machine installs one from
/// the leader. Whatever the interleaving: the build succeeds, what it wrote is one whole state
/// (before the install or after it), the snapshot served afterwards is the installed one with
/// every record, and the installed state survives a crash. Before builds took their view under
/// the install lock, a build could read a half-installed state and write it over the received
/// file under the same name (records lost), or find its own file deleted and fail (the shard
/// stopped for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_builds_racing_installs_never_lose_records() -> std::io::Result<()> {
    use rand::{Rng, SeedableRng};
    const PROMISES: u64 = 100_000; // two records each (the promise and its deadline key)
    let src_dir = tempfile::tempdir()?;
    let (_db, _log, mut src) = open_shard(src_dir.path(), ShardId(0))?;
    for chunk in creates(1, PROMISES, "big-").chunks(10_000) {
        apply(&mut src, chunk.to_vec()).await?;
    }
    let received = src.get_snapshot_builder().await.build_snapshot().await?;
    let (meta, expected) = records_in(received.snapshot.file.try_clone()?)?;
    assert_eq!(expected, 2 * PROMISES, "each promise and its deadline key");

    let seed: u64 = std::env::var("VOW_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with VOW_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..8 {
        let dir = tempfile::tempdir()?;
        let (db, log, mut sm) = open_shard(dir.path(), ShardId(0))?;
        apply(&mut sm, creates(1, 1_000, "small-")).await?;
        let (_, before) = {
            let own = sm.get_snapshot_builder().await.build_snapshot().await?;
            records_in(own.snapshot.file)?
        };
        // The received file, as the Raft service would hand it over: a copy in the directory.
        let incoming = dir.path().join(format!("recv-{round}.tmp"));
        std::fs::copy(&received.snapshot.path, &incoming)?;
        let file = storage::snapshot::SnapshotFile::open(incoming)?;

        let mut builder = sm.get_snapshot_builder().await;
        let build_delay = std::time::Duration::from_millis(rng.random_range(0..1_500));
        let build = tokio::spawn(async move {
            tokio::time::sleep(build_delay).await; // lands anywhere in the install below
            builder.build_snapshot().await
        });
        sm.install_snapshot(&meta, file).await?;
        let built = build.await.map_err(std::io::Error::other)?;
        let built = built.unwrap_or_else(|e| panic!("round {round}: the build failed: {e}"));
        let (built_meta, built_records) = records_in(built.snapshot.file)?;
        assert!(
            (built_meta.last_log_id < meta.last_log_id && built_records == before)
                || (built_meta == meta && built_records == expected),
            "round {round} (build after {build_delay:?}): built {built_records} records at {:?}; \
             whole states have {before} (before) or {expected} (installed)",
            built_meta.last_log_id
        );
        let current = sm.get_current_snapshot().await?.expect("a current snapshot");
        let (current_meta, current_records) = records_in(current.snapshot.file)?;
        assert_eq!((current_meta, current_records), (meta.clone(), expected), "round {round}: the served snapshot");

        // A crash now: the reopened state is the installed one, every promise present.
        drop((db, log, sm));
        let (_db, _log, mut reopened) = open_shard(dir.path(), ShardId(0))?;
        assert_eq!(reopened.applied_state().await?.0, meta.last_log_id);
        let reader = reopened.reader();
        for i in [0, PROMISES / 2, PROMISES - 1] {
            let id = PromiseId::new_unchecked(format!("big-{i:07}"));
            assert!(reader.get(&id)?.is_some(), "round {round}: {id} lost");
        }
    }
    Ok(())
}

/// An install announces that the whole state was replaced, so that waiters (Await) look at it
/// again: the settlements it brought were never applied here one by one.
#[tokio::test]
async fn a_snapshot_install_tells_waiters_to_look_again() -> std::io::Result<()> {
    let (src_dir, dst_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (_db, _log, mut src) = open_shard(src_dir.path(), ShardId(0))?;
    apply(&mut src, create_and_settle()).await?;
    let snapshot = src.get_snapshot_builder().await.build_snapshot().await?;

    let db = storage::open(&dst_dir.path().join("db"))?;
    let (tx, mut rx) = broadcast::channel(16);
    let mut dst = ShardStateMachine::open(db, ShardId(0), dst_dir.path().join("snapshots"), tx)?;
    dst.install_snapshot(&snapshot.meta, snapshot.snapshot).await?;
    assert_eq!(rx.try_recv().ok(), Some(storage::state_machine::Announcement::StateReplaced));
    assert_settled(&dst)
}

/// A crash at each step of a snapshot install: after the file was received but before the
/// install marked itself (the file is a temporary one and goes; the old state stays), after the
/// marker (the install is redone from the received file), after the rename to its final name
/// (redone from that). The snapshot is never found as the current one before its state is in
/// place, so openraft never restores from a file the state machine did not install.
#[tokio::test]
async fn a_crash_at_each_step_of_a_snapshot_install_recovers() -> std::io::Result<()> {
    use storage::keys;
    let src_dir = tempfile::tempdir()?;
    let (_db, _log, mut src) = open_shard(src_dir.path(), ShardId(0))?;
    apply(&mut src, create_and_settle()).await?;
    let snapshot = src.get_snapshot_builder().await.build_snapshot().await?;
    let target_name = "snap-00000000000000000001-00000000000000000002-00000000000000aa.snap";

    for step in ["received", "marked", "renamed"] {
        let dir = tempfile::tempdir()?;
        let snap_dir = dir.path().join("snapshots-0");
        {
            let (db, _log, mut sm) = open_shard(dir.path(), ShardId(0))?;
            apply(&mut sm, creates(1, 1, "old-")).await?;
            sm.reader().flush()?;
            std::fs::create_dir_all(&snap_dir)?;
            let file = if step == "renamed" { target_name.to_owned() } else { format!("recv-{step}.tmp") };
            std::fs::copy(&snapshot.snapshot.path, snap_dir.join(&file))?;
            if step != "received" {
                let state = db.cf_handle(storage::CF_STATE).expect("state family");
                let marker = format!("recv-{step}.tmp\n{target_name}");
                db.put_cf(state, keys::sm_meta(ShardId(0), keys::SM_INSTALLING), marker)
                    .map_err(std::io::Error::other)?;
            }
            // The crash: everything dropped as it is.
        }
        let (_db, _log, mut sm) = open_shard(dir.path(), ShardId(0))?;
        let files: Vec<String> = std::fs::read_dir(&snap_dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        let current = sm.get_current_snapshot().await?;
        if step == "received" {
            assert!(files.is_empty(), "{step}: the temporary file is removed: {files:?}");
            assert!(current.is_none(), "{step}: no snapshot was installed");
            assert_eq!(sm.applied_state().await?.0, Some(lid(1, 1)), "{step}: the old state stays");
            assert!(sm.reader().get(&PromiseId::new_unchecked("old-0000000"))?.is_some());
        } else {
            assert_eq!(files, vec![target_name.to_owned()], "{step}");
            assert_eq!(current.map(|c| c.meta), Some(snapshot.meta.clone()), "{step}");
            assert_eq!(sm.applied_state().await?.0, snapshot.meta.last_log_id, "{step}");
            assert_settled(&sm)?;
            assert!(sm.reader().get(&PromiseId::new_unchecked("old-0000000"))?.is_none(), "{step}: replaced");
        }
    }
    Ok(())
}
