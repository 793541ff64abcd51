//! Deliberate bugs, for proving that the consistency checker catches real ones (issue #3), and
//! failpoints, for tests of faults the operating system rarely produces on demand.
//!
//! Compiled only with the `sabotage` cargo feature, which no default build enables; without it
//! [`enabled`] is a constant `false` and every sabotage branch is compiled out. With it, the
//! comma-separated `VOW_SABOTAGE` environment variable switches bugs on:
//! - `stale-reads`: serve linearizable reads from the local replica, skipping ReadIndex and
//!   forwarding;
//! - `ack-before-commit`: answer a write from a prediction on local state and propose it in the
//!   background, before it is committed;
//! - `skip-settled-check`: let a settle overwrite an already settled promise;
//! - `refuse-writes`: refuse every write as unavailable (breaks no safety rule: only the
//!   harness's liveness check can fail it);
//! - `read-index-without-heartbeat`: a leader serves a linearizable read from its own state
//!   without confirming with a majority that it still leads (caught by partitioning it away);
//! - `ack-before-fsync`: acknowledge log appends once the OS has them, before the fsync (caught
//!   only by a power loss, which drops what was not synced);
//! - `drop-snapshot-announcements`: do not wake waiters when a snapshot replaces the state
//!   (caught by an Await on a replica that catches up by snapshot);
//! - `wal-fsync-stall`: while the file `stall-wal-fsync` exists in the data directory, WAL
//!   fsyncs wait: appends stay unsynced and unacknowledged (a disk that stops answering); when
//!   the file holds a number, every fsync takes that many milliseconds longer (a slow disk);
//! - `wal-fsync-failpoint`: while the file `fail-wal-fsync` exists in the data directory, every
//!   WAL fsync fails (a disk error): the shards stop with their writes in flight;
//! - `late-submit-creates`: a Submit writes the parts of its shards that create promises 500 ms
//!   after the others, so a continuation whose source is settled runs before its target exists
//!   (what a slow shard or a leader change does to one part by chance).
//!
//! The switch itself lives in `vow-storage` (which holds the storage bugs),
//! which this crate's `sabotage` feature turns on; both read the same variable.

pub use vow_storage::sabotage::enabled;
