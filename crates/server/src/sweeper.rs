//! The leader's background proposals: time out pending promises whose deadline has passed, and
//! garbage-collect settled promises older than the retention period. Both read the local state
//! for candidates and let the state machine decide (it re-checks each id in cluster time), so a
//! stale or repeated sweep is harmless.

use std::time::Duration;

use tokio::sync::watch;
use vow_core::Command;

use crate::shard::{Shard, now_ms};

/// How often the leader looks for expired promises. Bounds how late a timeout is applied.
const TIMEOUT_EVERY: Duration = Duration::from_millis(100);
/// How often the leader looks for promises past retention.
const COLLECT_EVERY: Duration = Duration::from_secs(10);
/// Most ids per sweep command, so a backlog becomes several small log entries.
const SWEEP_BATCH: usize = 1000;

pub async fn run(shard: Shard, retention: Duration, mut stop: watch::Receiver<bool>) {
    let mut timeouts = tokio::time::interval(TIMEOUT_EVERY);
    let mut collections = tokio::time::interval(COLLECT_EVERY);
    timeouts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    collections.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        let command = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = timeouts.tick() => {
                if !shard.is_leader() { continue; }
                match shard.state.due_for_timeout(now_ms(), SWEEP_BATCH) {
                    Ok(ids) if !ids.is_empty() => Command::Timeout { ids },
                    Ok(_) => continue,
                    Err(e) => { tracing::error!(shard = %shard.id, error = %e, "timeout sweep read failed"); continue; }
                }
            }
            _ = collections.tick() => {
                if !shard.is_leader() { continue; }
                match shard.state.due_for_collection(now_ms().saturating_sub(retention_ms), SWEEP_BATCH) {
                    Ok(ids) if !ids.is_empty() => Command::Collect { ids, retention_ms },
                    Ok(_) => continue,
                    Err(e) => { tracing::error!(shard = %shard.id, error = %e, "retention sweep read failed"); continue; }
                }
            }
        };
        if let Err(e) = shard.propose(command).await {
            tracing::debug!(shard = %shard.id, error = %e, "sweep proposal failed; retrying next round");
        }
    }
}
