//! Promise operations in vow's own terms, for every protocol edge: the gRPC handlers call these
//! (as will the HTTP gateway), and they reach shards only through the [`Router`]. Requests come
//! in validated (core commands, checked ids); answers go out as records and outcomes, or as
//! [`ShardError`]s that each edge maps to its own status codes.

use std::time::Duration;

use futures::future::try_join_all;
use tokio::sync::broadcast::error::RecvError;
use vow_core::{Command, Outcome, Promise, PromiseId, ShardId};

use crate::router::{Router, SearchQuery};
use crate::shard::ShardError;
use vow_storage::fitting;
use vow_storage::state_machine::{Announcement, SearchFilter, SearchPage};

/// How often a waiting Await asks the shard leader whether its promise has settled. A replica
/// that is cut off, removed or far behind applies nothing, so without this its waiters would
/// sleep through settlements until their wait ran out; with it they are at most this late.
pub const AWAIT_RECHECK: Duration = Duration::from_secs(5);

/// How a read may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// At the shard leader, after a ReadIndex barrier.
    Linearizable,
    /// From this node's replica, which may lag.
    Stale,
}

/// The promise operations. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Promises {
    router: Router,
}

impl Promises {
    pub fn new(router: Router) -> Promises {
        Promises { router }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Creates or settles at the shard leader. With a `budget` the answer comes before it runs
    /// out: "outcome unknown" if the write's fate is not known by then.
    pub async fn write(&self, command: Command, budget: Option<Duration>) -> Result<Outcome, ShardError> {
        let shard = self.router.shard_of_command(&command)?;
        let attempt = self.router.write(command, budget);
        let Some(budget) = budget else { return attempt.await };
        tokio::time::timeout(budget, attempt).await.unwrap_or_else(|_| {
            Err(ShardError::OutcomeUnknown {
                shard,
                reason: "the call's deadline passed before the write's outcome was known".into(),
            })
        })
    }

    /// The record of `id`, or `None` if there is no such promise.
    pub async fn get(&self, id: &PromiseId, consistency: Consistency) -> Result<Option<Promise>, ShardError> {
        match consistency {
            Consistency::Linearizable => self.router.read(id).await,
            Consistency::Stale => self.router.replica_record(id),
        }
    }

    /// The record of `id` once it is settled, or after `wait` the record as a linearizable read
    /// finds it then (possibly still pending); `None` if there is no such promise. Every
    /// replica applies every settle, so the wait is on this node's replica's announcements,
    /// whoever leads; a snapshot install or a lagging listener makes it look at the replica's
    /// state, and every [`AWAIT_RECHECK`] it asks the leader, so a replica that stopped
    /// applying cannot keep a waiter behind for longer than that.
    pub async fn await_settled(&self, id: &PromiseId, wait: Duration) -> Result<Option<Promise>, ShardError> {
        let shard = self.router.shard_of(id);
        let replica = self.router.shard(shard)?;
        let settled_here = || match self.router.replica_record(id) {
            Ok(Some(p)) if p.state.is_settled() => Some(p),
            _ => None,
        };
        let is_settled = |p: &Option<Promise>| p.as_ref().is_some_and(|p| p.state.is_settled());
        // Subscribe before the read: a settle applied after the read is then always heard.
        let mut announcements = replica.subscribe();
        // A settlement is final: one this replica holds is the answer, whoever leads.
        if let Some(p) = settled_here() {
            return Ok(Some(p));
        }
        // The read goes to the leader and may wait for one to be elected; meanwhile this replica
        // may apply the settlement, which is final (write-once): answer with it at once.
        let first = tokio::select! {
            first = self.router.read(id) => first?,
            settled = settled_locally(&mut announcements, id, settled_here) => return Ok(Some(settled)),
        };
        if first.is_none() || is_settled(&first) {
            return Ok(first);
        }
        let _waiting = self.router.node().metrics().await_waiting();
        let deadline = tokio::time::Instant::now() + wait;
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + AWAIT_RECHECK, AWAIT_RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = recheck.tick() => {
                    // A failed check (no leader reachable now) is not the waiter's failure.
                    if let Ok(p) = self.router.read(id).await && is_settled(&p) {
                        return Ok(p);
                    }
                }
                event = announcements.recv() => match event {
                    Ok(Announcement::Settled(settled_id)) if settled_id == *id => {
                        if let Some(p) = settled_here() {
                            return Ok(Some(p));
                        }
                    }
                    Ok(Announcement::Settled(_) | Announcement::Ready(_)) => {}
                    // The state was replaced, or notifications were missed: look at the state.
                    Ok(Announcement::StateReplaced) | Err(RecvError::Lagged(_)) => {
                        if let Some(p) = settled_here() {
                            return Ok(Some(p));
                        }
                    }
                    Err(RecvError::Closed) => {
                        return Err(ShardError::Unavailable { shard, reason: "shard stopped".into() });
                    }
                },
            }
        }
        // The wait ran out: answer with what is true now, not with the first read.
        self.router.read(id).await
    }

    /// One page of matches across every shard, in id order: at most `limit` records and about
    /// `max_bytes` of them (always at least one), resuming after `after`.
    pub async fn search(
        &self,
        filter: SearchFilter,
        after: Option<String>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<SearchPage, ShardError> {
        let query = SearchQuery { filter, after, limit, max_bytes };
        let shards = (0..self.router.shard_count()).map(ShardId);
        let pages = try_join_all(shards.map(|s| self.router.search(s, &query))).await?;
        Ok(merge_pages(pages, limit, max_bytes))
    }
}

/// Waits until this replica holds `id` settled, as its announcements tell; never returns if the
/// stream closes (the caller's other branch answers then).
async fn settled_locally(
    announcements: &mut tokio::sync::broadcast::Receiver<Announcement>,
    id: &PromiseId,
    settled_here: impl Fn() -> Option<Promise>,
) -> Promise {
    loop {
        match announcements.recv().await {
            Ok(Announcement::Settled(settled_id)) if settled_id != *id => continue,
            Ok(Announcement::Ready(_)) => continue,
            Ok(Announcement::Settled(_) | Announcement::StateReplaced) | Err(RecvError::Lagged(_)) => {
                if let Some(p) = settled_here() {
                    return p;
                }
            }
            Err(RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// Merges shards' pages (each in id order, each ending at its own resume point) into one page:
/// the first matches overall, never past a shard's resume point (a shard that stopped early
/// may hold smaller ids beyond it), at most `limit` records and `max_bytes` of them.
fn merge_pages(pages: Vec<SearchPage>, limit: usize, max_bytes: usize) -> SearchPage {
    let boundary = pages.iter().filter_map(|p| p.next_after.clone()).min();
    let mut all: Vec<Promise> = pages.into_iter().flat_map(|p| p.promises).collect();
    all.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    if let Some(b) = &boundary {
        all.retain(|p| p.id.as_str() <= b.as_str());
    }
    let keep = fitting(all.iter().map(|p| p.encode().len()), limit, max_bytes);
    let next_after = if all.len() > keep {
        all.truncate(keep);
        all.last().map(|p| p.id.to_string())
    } else {
        boundary
    };
    SearchPage { promises: all, next_after }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, bytes: usize) -> Promise {
        Promise {
            id: PromiseId::new_unchecked(id),
            state: vow_core::State::Pending,
            param: vow_core::Value { headers: Default::default(), data: vec![0; bytes] },
            value: Default::default(),
            deadline_ms: 0,
            tags: Default::default(),
            created_at_ms: 0,
            settled_at_ms: 0,
            idempotency_key_create: String::new(),
            idempotency_key_settle: String::new(),
            revision: 1,
        }
    }

    fn ids(page: &SearchPage) -> Vec<&str> {
        page.promises.iter().map(|p| p.id.as_str()).collect()
    }

    #[test]
    fn pages_merge_in_id_order_and_stop_at_the_earliest_resume_point() {
        let a = SearchPage { promises: vec![record("a1", 0), record("c1", 0)], next_after: None };
        // This shard stopped early at "b2": ids after it may still exist there.
        let b = SearchPage { promises: vec![record("b1", 0), record("b2", 0)], next_after: Some("b2".into()) };
        let page = merge_pages(vec![a, b], 10, 1 << 20);
        assert_eq!(ids(&page), ["a1", "b1", "b2"]);
        assert_eq!(page.next_after.as_deref(), Some("b2"));
    }

    #[test]
    fn pages_end_at_the_limit_or_the_byte_budget() {
        let shard = |ids: &[&str], bytes| SearchPage {
            promises: ids.iter().map(|i| record(i, bytes)).collect(),
            next_after: None,
        };
        let page = merge_pages(vec![shard(&["a", "c"], 0), shard(&["b", "d"], 0)], 3, 1 << 20);
        assert_eq!(ids(&page), ["a", "b", "c"]);
        assert_eq!(page.next_after.as_deref(), Some("c"));
        let page = merge_pages(vec![shard(&["a", "c"], 600), shard(&["b"], 600)], 10, 1000);
        assert_eq!(ids(&page), ["a"], "the second record would pass the byte budget");
        assert_eq!(page.next_after.as_deref(), Some("a"));
        let page = merge_pages(vec![shard(&["a", "b"], 0)], 10, 1 << 20);
        assert_eq!((ids(&page), page.next_after.as_deref()), (vec!["a", "b"], None), "everything fits: the last page");
    }
}
