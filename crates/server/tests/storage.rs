//! Storage against real RocksDB in temporary directories: openraft's own conformance suite,
//! plus what the suite does not cover — shards sharing one database, durability across a
//! reopen, and a snapshot moved from one node's database to another's.

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
use vow_server::raft::{Entry, LeaderId, LogId, TypeConfig, Vote};
use vow_server::storage::{self, log_store::LogStore, log_store::WalFlusher, state_machine::ShardStateMachine};

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
    let all_src = reader_src.search(&filter, None, 5_000)?.promises;
    let all_dst = reader_dst.search(&filter, None, 5_000)?.promises;
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
