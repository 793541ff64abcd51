//! The leader's background proposals: time out pending promises whose deadline has passed, and
//! garbage-collect settled promises older than the retention period. Both read the local state
//! for candidates and let the state machine decide (it re-checks each id in cluster time), so a
//! stale or repeated sweep is harmless.

use std::time::Duration;

use tokio::sync::watch;
use vow_core::Command;

use crate::shard::Shard;

/// How often the leader looks for expired promises. Bounds how late a timeout is applied.
const TIMEOUT_EVERY: Duration = Duration::from_millis(100);
/// How often the leader looks for promises past retention.
const COLLECT_EVERY: Duration = Duration::from_secs(10);
/// Most ids per sweep command, so a backlog becomes several small log entries.
const SWEEP_BATCH: usize = 1000;

/// Runs a RocksDB scan on the blocking pool, off the runtime threads that carry heartbeats.
async fn blocking<T: Send + 'static>(scan: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(scan).await.map_err(std::io::Error::other)?
}

pub async fn run(shard: Shard, retention: Duration, mut stop: watch::Receiver<bool>) {
    let mut timeouts = tokio::time::interval(TIMEOUT_EVERY);
    let mut collections = tokio::time::interval(COLLECT_EVERY);
    timeouts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    collections.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    enum Sweep {
        Timeouts,
        Collections,
    }
    loop {
        let sweep = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = timeouts.tick() => Sweep::Timeouts,
            _ = collections.tick() => Sweep::Collections,
        };
        if !shard.is_leader() {
            continue;
        }
        let state = shard.state.clone();
        let now = shard.stamp_ms();
        let found = match sweep {
            Sweep::Timeouts => {
                blocking(move || state.due_for_timeout(now, SWEEP_BATCH)).await.map(|ids| Command::Timeout { ids })
            }
            Sweep::Collections => {
                let before = now.saturating_sub(retention_ms);
                blocking(move || state.due_for_collection(before, SWEEP_BATCH))
                    .await
                    .map(|ids| Command::Collect { ids, retention_ms })
            }
        };
        let command = match found {
            Ok(Command::Timeout { ids } | Command::Collect { ids, .. }) if ids.is_empty() => continue,
            Ok(command) => command,
            Err(e) => {
                tracing::error!(shard = %shard.id, error = %e, "sweep read failed");
                continue;
            }
        };
        if let Err(e) = shard.propose(command).await {
            tracing::debug!(shard = %shard.id, error = %e, "sweep proposal failed; retrying next round");
        }
    }
}
