//! vow's storage engine: one RocksDB per node, shared by every shard (DESIGN.md §7), and the
//! openraft types it is written against.
//!
//! It holds each shard's Raft log ([`log_store::LogStore`], group-committed through the node's
//! one [`log_store::WalFlusher`]), its state machine ([`state_machine::ShardStateMachine`],
//! which applies committed entries with [`vow_core::apply`] through the write-behind layer of
//! [`write_behind`], and its reader [`state_machine::ShardState`]), snapshot files
//! ([`snapshot`]), openraft's type configuration ([`types::TypeConfig`] and its aliases and
//! message bounds) and the explicit binary encoding of openraft's types for disk and wire
//! ([`codec`]). It is not the node: it knows no network, no gRPC, no routing, no clocks and no
//! Raft instance; `vow-server` builds those on top of it. Only `vow-server` and tests depend on
//! it.
//!
//! # Key layout (format version 1)
//!
//! Integers are big-endian so that byte order is numeric order; signed times are stored with
//! the sign bit flipped for the same reason. `S` is the 4-byte shard id.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `log`   | `S index:u64` | log entry ([`codec::encode_entry`]) |
//! | `meta`  | `S 0x01` | vote |
//! | `meta`  | `S 0x02` | last purged log id |
//! | `meta`  | `S 0x03` | committed log id |
//! | `meta`  | `node-identity` | node id and cluster name of this data directory |
//! | `state` | `S 0x00 0x01` | last applied log id |
//! | `state` | `S 0x00 0x02` | last membership |
//! | `state` | `S 0x00 0x03` | cluster time (ms) |
//! | `state` | `S 0x00 0x04` | snapshot-install-in-progress marker |
//! | `state` | `S 0x01 id` | promise record ([`vow_core::Promise::encode`]) |
//! | `state` | `S 0x02 deadline:i64 id` | empty: pending promises by deadline, for the timeout sweep |
//! | `state` | `S 0x03 settled_at:i64 id` | empty: settled promises by settle time, for retention |
//! | `state` | `S 0x04 continuation id` | continuation record ([`vow_core::pipeline::ContinuationRecord::encode`]) |
//! | `state` | `S 0x05 anchor id 0x00 continuation id` | empty: continuations by the promise they are stored with |
//! | `state` | `S 0x06 continuation id` | empty: continuations ready to run, for the shard leader's executor |
//!
//! Everything of one shard's state lives under the `S` prefix of `state`, so a snapshot is one
//! range scan and installing one is a range delete plus writes.
//!
//! # Durability
//!
//! Log appends are written without sync and acknowledged to Raft only after the [`log_store`]
//! flusher's `flush_wal(sync)`, which covers every shard's appends at once (group commit). Votes
//! are written with a synced write. Applied changes are kept in memory and written every ~1,000
//! records, the records, the indexes and the applied log id in one `WriteBatch`
//! ([`write_behind`]); that write is not synced because the log entries it came from already
//! are, and a lost apply is redone from the log on restart.
//!
//! The WAL is flushed manually (`manual_wal_flush`): an unsynced write only appends to RocksDB's
//! WAL buffer in memory, and the flusher's `flush_wal(sync)` writes the buffer out and fsyncs it.
//! A synced write (votes, the node identity, the end of a snapshot install) flushes the buffer
//! before its own fsync. So a process crash now loses exactly what a power cut always could —
//! unsynced writes, which nothing relies on — and the apply and commit-index writes no longer
//! cost a `write` system call each (~1.8 per batch before).

pub mod codec;
pub mod log_store;
pub mod sabotage;
pub mod snapshot;
pub mod state_machine;
pub mod types;
pub mod write_behind;

use std::io;
use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, DB, Options};
use vow_core::ShardId;

pub const CF_LOG: &str = "log";
pub const CF_STATE: &str = "state";
pub const CF_META: &str = "meta";

pub mod keys {
    //! Key builders for the layout in the module docs.
    use vow_core::ShardId;

    pub const META_VOTE: u8 = 0x01;
    pub const META_LAST_PURGED: u8 = 0x02;
    pub const META_COMMITTED: u8 = 0x03;
    pub const NODE_IDENTITY: &[u8] = b"node-identity";
    /// This data directory's incarnation (a random u64, drawn when the directory is created).
    pub const INCARNATION: &[u8] = b"incarnation";
    /// Other nodes' incarnations as this node learned them.
    pub const PEER_INCARNATIONS: &[u8] = b"peer-incarnations";

    pub const STATE_META: u8 = 0x00;
    pub const STATE_PROMISE: u8 = 0x01;
    pub const STATE_BY_DEADLINE: u8 = 0x02;
    pub const STATE_BY_SETTLED: u8 = 0x03;
    pub const STATE_CONTINUATION: u8 = 0x04;
    pub const STATE_BY_ANCHOR: u8 = 0x05;
    pub const STATE_READY: u8 = 0x06;

    pub const SM_APPLIED: u8 = 0x01;
    pub const SM_MEMBERSHIP: u8 = 0x02;
    pub const SM_CLUSTER_TIME: u8 = 0x03;
    pub const SM_INSTALLING: u8 = 0x04;

    pub fn shard_prefix(shard: ShardId) -> [u8; 4] {
        shard.0.to_be_bytes()
    }

    pub fn log(shard: ShardId, index: u64) -> [u8; 12] {
        let mut k = [0u8; 12];
        k[..4].copy_from_slice(&shard.0.to_be_bytes());
        k[4..].copy_from_slice(&index.to_be_bytes());
        k
    }

    pub fn log_index(key: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(key.get(4..12)?.try_into().ok()?))
    }

    pub fn meta(shard: ShardId, kind: u8) -> [u8; 5] {
        let mut k = [0u8; 5];
        k[..4].copy_from_slice(&shard.0.to_be_bytes());
        k[4] = kind;
        k
    }

    pub fn sm_meta(shard: ShardId, kind: u8) -> [u8; 6] {
        let mut k = [0u8; 6];
        k[..4].copy_from_slice(&shard.0.to_be_bytes());
        k[4] = STATE_META;
        k[5] = kind;
        k
    }

    /// The prefix of every key of `kind` in the shard's state.
    pub fn state_kind(shard: ShardId, kind: u8) -> [u8; 5] {
        meta(shard, kind)
    }

    pub fn promise(shard: ShardId, id: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(5 + id.len());
        k.extend_from_slice(&state_kind(shard, STATE_PROMISE));
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// A key of `kind` followed by `id`'s bytes: a continuation record or a ready key.
    pub fn named(shard: ShardId, kind: u8, id: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(5 + id.len());
        k.extend_from_slice(&state_kind(shard, kind));
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// The prefix of the anchor keys of continuations stored with `anchor` (ids hold no NUL,
    /// so no anchor's prefix is another's).
    pub fn anchor_prefix(shard: ShardId, anchor: &str) -> Vec<u8> {
        let mut k = named(shard, STATE_BY_ANCHOR, anchor);
        k.push(0);
        k
    }

    pub fn anchor(shard: ShardId, anchor: &str, continuation: &str) -> Vec<u8> {
        let mut k = anchor_prefix(shard, anchor);
        k.extend_from_slice(continuation.as_bytes());
        k
    }

    /// The name after a `named` key's 5-byte prefix.
    pub fn named_id(key: &[u8]) -> Option<&str> {
        std::str::from_utf8(key.get(5..)?).ok()
    }

    /// The anchor and continuation ids of an anchor key.
    pub fn anchor_ids(key: &[u8]) -> Option<(&str, &str)> {
        let rest = key.get(5..)?;
        let nul = rest.iter().position(|b| *b == 0)?;
        Some((std::str::from_utf8(&rest[..nul]).ok()?, std::str::from_utf8(&rest[nul + 1..]).ok()?))
    }

    /// Orders signed milliseconds correctly as unsigned big-endian bytes.
    pub fn time(ms: i64) -> [u8; 8] {
        ((ms as u64) ^ (1 << 63)).to_be_bytes()
    }

    pub fn timed(shard: ShardId, kind: u8, ms: i64, id: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(13 + id.len());
        k.extend_from_slice(&state_kind(shard, kind));
        k.extend_from_slice(&time(ms));
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// The id at the end of a `timed` key.
    pub fn timed_id(key: &[u8]) -> Option<&str> {
        std::str::from_utf8(key.get(13..)?).ok()
    }

    /// The milliseconds of a `timed` key.
    pub fn timed_ms(key: &[u8]) -> Option<i64> {
        let bytes: [u8; 8] = key.get(5..13)?.try_into().ok()?;
        Some((u64::from_be_bytes(bytes) ^ (1 << 63)) as i64)
    }
}

/// Opens (or creates) the node's database with vow's column families.
pub fn open(path: &Path) -> io::Result<Arc<DB>> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Appends are small and frequent; the WAL is synced by the flusher, never per write.
    opts.set_max_background_jobs(2);
    opts.set_bytes_per_sync(1 << 20);
    opts.increase_parallelism(2);
    // One WAL serves every column family, and a WAL file is kept until every family has
    // flushed what it holds. `meta` receives only tiny writes and would almost never flush, so
    // the WAL, and the replay at the next start, would grow with every write ever made (a
    // 1M-promise node took 10 s to start). Past this size RocksDB flushes the family pinning
    // the oldest WAL file.
    opts.set_max_total_wal_size(64 << 20);
    // See "Durability" above.
    opts.set_manual_wal_flush(true);
    let mut log_opts = Options::default();
    log_opts.set_write_buffer_size(32 << 20);
    let mut state_opts = Options::default();
    state_opts.set_write_buffer_size(32 << 20);
    // Flushes are left uncompressed (LZ4 on flushes and compactions was ~2% of a follower's CPU
    // under load, and level 0 is rewritten by the next compaction anyway); every other level is
    // compressed. Leaving level 1 uncompressed too doubled the disk use of a 1M-promise node.
    use rocksdb::DBCompressionType as Compression;
    let mut per_level = [Compression::Lz4; 7];
    per_level[0] = Compression::None;
    state_opts.set_compression_per_level(&per_level);
    // Every create looks up an id that does not exist yet. Bloom filters on whole keys, in the
    // memtable and in the SST files, answer "absent" without searching the skip list or reading
    // blocks (the skip-list search was ~8% of a follower's CPU under create-settle load).
    state_opts.set_memtable_whole_key_filtering(true);
    state_opts.set_memtable_prefix_bloom_ratio(0.1);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    state_opts.set_block_based_table_factory(&table);
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_LOG, log_opts),
        ColumnFamilyDescriptor::new(CF_STATE, state_opts),
        ColumnFamilyDescriptor::new(CF_META, Options::default()),
    ];
    let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(io_err)?;
    Ok(Arc::new(db))
}

/// How many items (of the given encoded sizes, in order) fit in at most `max_count` items and
/// `max_bytes` bytes; the first item always fits, whatever its size. The one rule for every
/// byte budget on what is read or sent: an AppendEntries, a Search page.
pub fn fitting(sizes: impl IntoIterator<Item = usize>, max_count: usize, max_bytes: usize) -> usize {
    let mut bytes = 0usize;
    let mut n = 0;
    for size in sizes {
        if n == max_count || (n > 0 && bytes.saturating_add(size) > max_bytes) {
            break;
        }
        bytes = bytes.saturating_add(size);
        n += 1;
    }
    n
}

/// Flushes every column family's memtable to SST files.
pub fn flush_all(db: &DB) -> io::Result<()> {
    let cfs = [CF_LOG, CF_STATE, CF_META].map(|name| cf(db, name)).into_iter().collect::<io::Result<Vec<_>>>()?;
    db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default()).map_err(io_err)
}

pub fn io_err(e: rocksdb::Error) -> io::Error {
    io::Error::other(e)
}

pub fn corrupt(e: vow_core::DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> io::Result<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| io::Error::other(format!("column family {name} missing")))
}

/// The end of a shard's key range: the next shard's prefix (exclusive).
pub(crate) fn shard_end(shard: ShardId) -> Vec<u8> {
    match shard.0.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 5],
    }
}

/// What a data directory records about its owner, so a node never starts on another node's
/// data, or with another shard count than the cluster was initialised with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: u64,
    pub cluster_name: String,
    /// Shards of the cluster. Ids are placed by `hash mod shards`, so another count would send
    /// existing ids to shards that do not hold them: they would read as not found and could be
    /// created a second time.
    pub shards: u32,
}

/// Identity format: version 1 had no shard count; version 2 adds it; version 3 marks a
/// directory whose Raft records carry peer addresses (log and snapshot format 2), which earlier
/// versions' directories do not.
const IDENTITY_FORMAT: u8 = 3;

/// This data directory's incarnation: drawn (non-zero) and written, synced, on first use.
/// See `vow_server::incarnation` for what it protects.
pub fn incarnation(db: &DB) -> io::Result<u64> {
    let meta = cf(db, CF_META)?;
    if let Some(bytes) = db.get_cf(meta, keys::INCARNATION).map_err(io_err)? {
        let raw: [u8; 8] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "the stored incarnation is not 8 bytes"))?;
        return Ok(u64::from_be_bytes(raw));
    }
    let drawn = rand::random::<u64>().max(1);
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    db.put_cf_opt(meta, keys::INCARNATION, drawn.to_be_bytes(), &wo).map_err(io_err)?;
    Ok(drawn)
}

/// Other nodes' incarnations as this node recorded them (node id, incarnation).
pub fn peer_incarnations(db: &DB) -> io::Result<std::collections::BTreeMap<u64, u64>> {
    let meta = cf(db, CF_META)?;
    let Some(bytes) = db.get_cf(meta, keys::PEER_INCARNATIONS).map_err(io_err)? else { return Ok(Default::default()) };
    let mut d = vow_core::codec::Decoder::new(&bytes);
    let mut out = std::collections::BTreeMap::new();
    let n = d.u64("peer incarnations").map_err(corrupt)?;
    for _ in 0..n {
        let node = d.u64("peer incarnation node").map_err(corrupt)?;
        let incarnation = d.u64("peer incarnation").map_err(corrupt)?;
        out.insert(node, incarnation);
    }
    d.finish().map_err(corrupt)?;
    Ok(out)
}

/// Records other nodes' incarnations, synced (rare: a node seen for the first time).
pub fn save_peer_incarnations(db: &DB, known: &std::collections::BTreeMap<u64, u64>) -> io::Result<()> {
    let mut e = vow_core::codec::Encoder::new();
    e.u64(known.len() as u64);
    for (node, incarnation) in known {
        e.u64(*node).u64(*incarnation);
    }
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    db.put_cf_opt(cf(db, CF_META)?, keys::PEER_INCARNATIONS, e.into_bytes(), &wo).map_err(io_err)
}

/// Checks the directory's identity, writing it on first use. A mismatch is a configuration
/// error the operator must fix: starting anyway could make two nodes vote with one id, or
/// route existing promises to the wrong shards.
pub fn check_identity(db: &DB, want: &NodeIdentity) -> io::Result<()> {
    let meta = cf(db, CF_META)?;
    let write = || {
        let mut e = vow_core::codec::Encoder::new();
        e.u8(IDENTITY_FORMAT).u64(want.node_id).str(&want.cluster_name).u64(u64::from(want.shards));
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.put_cf_opt(meta, keys::NODE_IDENTITY, e.into_bytes(), &wo).map_err(io_err)
    };
    let Some(bytes) = db.get_cf(meta, keys::NODE_IDENTITY).map_err(io_err)? else { return write() };
    let mut d = vow_core::codec::Decoder::new(&bytes);
    let version = d.u8("node identity version").map_err(corrupt)?;
    if version == 0 || version > IDENTITY_FORMAT {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown node identity format {version}")));
    }
    if version < 3 {
        // Its log and snapshots record members without peer addresses, which this version
        // cannot read. Refusing here, before anything is read or written, leaves it intact.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "data directory was written by an earlier vow (identity format {version}), whose Raft records \
                 carry no peer addresses; this version cannot read it. Start this node with an empty data \
                 directory and let it catch up from the cluster, or run the earlier version"
            ),
        ));
    }
    let node_id = d.u64("node id").map_err(corrupt)?;
    let cluster_name = d.string("cluster name").map_err(corrupt)?;
    if node_id != want.node_id || cluster_name != want.cluster_name {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "data directory belongs to node {node_id} of cluster {cluster_name:?}, but this is node {} of cluster {:?}",
                want.node_id, want.cluster_name
            ),
        ));
    }
    let shards = d.u64("shard count").map_err(corrupt)?;
    if shards != u64::from(want.shards) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "data directory was initialised with {shards} shards, but this node is started with --shards {}; \
                 the shard count is fixed when a cluster is initialised: start it with --shards {shards}",
                want.shards
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_fixes_node_cluster_and_shard_count() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let db = open(&dir.path().join("db"))?;
        let me = NodeIdentity { node_id: 1, cluster_name: "c".into(), shards: 4 };
        check_identity(&db, &me)?;
        check_identity(&db, &me)?;
        let err = check_identity(&db, &NodeIdentity { shards: 8, ..me.clone() }).unwrap_err();
        assert!(
            err.to_string().contains("initialised with 4 shards") && err.to_string().contains("--shards 8"),
            "{err}"
        );
        let err = check_identity(&db, &NodeIdentity { node_id: 2, ..me.clone() }).unwrap_err();
        assert!(err.to_string().contains("belongs to node 1"), "{err}");

        // A directory of an earlier format (members without peer addresses) is refused, untouched.
        let mut e = vow_core::codec::Encoder::new();
        e.u8(2).u64(1).str("c").u64(4);
        let old = e.into_bytes();
        db.put_cf(cf(&db, CF_META)?, keys::NODE_IDENTITY, &old).map_err(io_err)?;
        let err = check_identity(&db, &me).unwrap_err();
        assert!(err.to_string().contains("earlier vow (identity format 2)"), "{err}");
        assert_eq!(db.get_cf(cf(&db, CF_META)?, keys::NODE_IDENTITY).map_err(io_err)?, Some(old));
        Ok(())
    }
}
