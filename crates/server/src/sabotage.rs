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
//! - `wal-fsync-failpoint`: while the file `fail-wal-fsync` exists in the data directory, every
//!   WAL fsync fails (a disk error): the shards stop with their writes in flight.
//!
//! The switch itself lives in `vow-storage` (whose state machine holds `skip-settled-check`),
//! which this crate's `sabotage` feature turns on; both read the same variable.

pub use vow_storage::sabotage::enabled;
