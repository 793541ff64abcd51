//! Watch: settlements as they happen, across shards, resumable after a disconnect without gaps.
//!
//! # Positions
//!
//! A promise's `revision` is the log index of the entry that settled it, and settle times never
//! go back along a shard's log (cluster time). So for each shard a position `(after_revision,
//! from_ms)` — "everything with a higher revision, which is settled at or after `from_ms`" — is
//! enough to find every later settlement in the settled-by-time index (`S 0x03`, the one
//! retention already keeps), and it means the same on every replica. A resume token is every
//! shard's position.
//!
//! # One watch
//!
//! Per shard, a follower reads this node's replica: it subscribes to the replica's
//! announcements, catches up from its position through the index (a page at a time), then
//! follows announcements; a lagging subscription or a snapshot install sends it back to
//! catching up from where it was. A combiner merges the shards' events into one stream and
//! stamps each with the token of everything delivered before it (plus checkpoints, events
//! without a promise, every [`CHECKPOINT_EVERY`] when the position moved, so a narrow filter's
//! token does not fall behind). The token after an event points just before that event's log
//! entry, so a resumed watch may repeat the settlements of the last entry delivered (the same
//! records again; a settlement is final, so they are easy to drop), never skip one.
//!
//! Events come from the replica of the node the client reached: one that lags delivers late,
//! not less.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use vow_core::{Promise, PromiseId};
use vow_storage::state_machine::Announcement;

use crate::shard::Shard;

/// Settlements one catch-up read takes (more when the last millisecond read holds more).
const PAGE: usize = 256;
/// How often a watch sends its position when it moved without an event.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// Ids one watch may name.
pub const MAX_IDS: usize = 1_000;
const TOKEN_PREFIX: &str = "w1.";

/// Where a shard's watch stands: every settlement with a revision above `after_revision` is
/// still to come, and each is settled at or after `from_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub after_revision: u64,
    pub from_ms: i64,
}

/// Every shard's position, as the client keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeToken(pub Vec<Position>);

impl ResumeToken {
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(4 + 16 * self.0.len());
        bytes.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for p in &self.0 {
            bytes.extend_from_slice(&p.after_revision.to_be_bytes());
            bytes.extend_from_slice(&p.from_ms.to_be_bytes());
        }
        format!("{TOKEN_PREFIX}{}", B64.encode(bytes))
    }

    /// A token for a cluster of `shards` shards.
    pub fn decode(token: &str, shards: u32) -> Result<ResumeToken, String> {
        let bad = || "malformed resume_token".to_owned();
        let bytes = token.strip_prefix(TOKEN_PREFIX).and_then(|b| B64.decode(b).ok()).ok_or_else(bad)?;
        let count = u32::from_be_bytes(bytes.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(bad)?);
        if count != shards {
            return Err(format!("the resume_token is for {count} shards; this cluster has {shards}"));
        }
        let body = &bytes[4..];
        if body.len() != 16 * count as usize {
            return Err(bad());
        }
        let positions = body
            .chunks_exact(16)
            .map(|c| {
                let (r, t) = c.split_at(8);
                Position {
                    after_revision: u64::from_be_bytes(r.try_into().unwrap_or_default()),
                    from_ms: i64::from_be_bytes(t.try_into().unwrap_or_default()),
                }
            })
            .collect();
        Ok(ResumeToken(positions))
    }
}

/// Which settlements a watch wants: those of the named ids, or with the id prefix (both
/// empty: all).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ids: HashSet<PromiseId>,
    pub prefix: String,
}

impl Filter {
    fn matches(&self, p: &Promise) -> bool {
        (self.ids.is_empty() || self.ids.contains(&p.id)) && p.id.as_str().starts_with(&self.prefix)
    }
}

/// One message of a watch: a settlement (or, `None`, a checkpoint) and the token that resumes
/// after it.
#[derive(Debug, Clone)]
pub struct Event {
    pub promise: Option<Promise>,
    pub resume_token: String,
}

/// Why a watch stopped or could not start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WatchError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the resume_token is older than the retention period: settlements after it may have been \
         collected; read the current state with Search and watch from now"
    )]
    TooOld,
    #[error("reading shard {shard}: {reason}")]
    Storage { shard: u32, reason: String },
}

/// What a shard's follower tells the combiner.
struct Item {
    shard: usize,
    promise: Option<Promise>,
    position: Position,
}

/// Starts a watch over this node's replicas of `shards`: events arrive on the returned
/// channel until the receiver is dropped (the client went away) or a replica cannot be read
/// (an error, then the end). `retention` and `now_ms` judge whether a token is too old.
pub async fn start(
    shards: Arc<[Shard]>,
    filter: Filter,
    from: Option<ResumeToken>,
    retention: Duration,
) -> Result<mpsc::Receiver<Result<Event, WatchError>>, WatchError> {
    let filter = Arc::new(filter);
    let mut positions = Vec::with_capacity(shards.len());
    let mut announcements = Vec::with_capacity(shards.len());
    let mut already = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        // Subscribe before reading where the replica stands: nothing applied after is missed.
        announcements.push(shard.subscribe());
        let state = shard.state.clone();
        let (applied, now_ms) = blocking(i, move || state.watch_position()).await?;
        let position = match &from {
            Some(token) => {
                let p = token.0[i];
                if p.from_ms < now_ms.saturating_sub(retention.as_millis() as i64) {
                    return Err(WatchError::TooOld);
                }
                p
            }
            None => Position { after_revision: applied, from_ms: now_ms },
        };
        positions.push(position);
    }
    // Named ids already settled are delivered first: a watcher never waits for what happened.
    if from.is_none() {
        for id in &filter.ids {
            let shard = &shards[vow_core::ShardId::for_promise(id, shards.len() as u32).0 as usize];
            let state = shard.state.clone();
            let id = id.clone();
            let record = blocking(shard.id.0 as usize, move || state.get(&id)).await?;
            already.extend(record.filter(|p| p.state.is_settled()));
        }
    }
    let (items_tx, items_rx) = mpsc::channel(1024);
    for ((i, shard), subscription) in shards.iter().enumerate().zip(announcements) {
        let follower = Follower { index: i, shard: shard.clone(), filter: filter.clone(), tx: items_tx.clone() };
        tokio::spawn(follower.run(positions[i], subscription));
    }
    drop(items_tx);
    let (out_tx, out_rx) = mpsc::channel(64);
    tokio::spawn(combine(positions, already, items_rx, out_tx));
    Ok(out_rx)
}

async fn blocking<T: Send + 'static>(
    shard: usize,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, WatchError> {
    let storage = |reason: String| WatchError::Storage { shard: shard as u32, reason };
    tokio::task::spawn_blocking(f).await.map_err(|e| storage(e.to_string()))?.map_err(|e| storage(e.to_string()))
}

/// Merges the followers' items into events stamped with the token of everything before them.
async fn combine(
    mut positions: Vec<Position>,
    already: Vec<Promise>,
    mut items: mpsc::Receiver<Result<Item, WatchError>>,
    out: mpsc::Sender<Result<Event, WatchError>>,
) {
    let token = |positions: &Vec<Position>| ResumeToken(positions.clone()).encode();
    let mut sent = token(&positions);
    // First a checkpoint: the client holds a token before anything settles.
    if out.send(Ok(Event { promise: None, resume_token: sent.clone() })).await.is_err() {
        return;
    }
    for p in already {
        if out.send(Ok(Event { promise: Some(p), resume_token: sent.clone() })).await.is_err() {
            return;
        }
    }
    let mut checkpoint = tokio::time::interval(CHECKPOINT_EVERY);
    checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            item = items.recv() => match item {
                None => return,
                Some(Err(e)) => {
                    let _ = out.send(Err(e)).await;
                    return;
                }
                Some(Ok(item)) => {
                    positions[item.shard] = item.position;
                    if let Some(promise) = item.promise {
                        sent = token(&positions);
                        if out.send(Ok(Event { promise: Some(promise), resume_token: sent.clone() })).await.is_err() {
                            return;
                        }
                    }
                }
            },
            _ = checkpoint.tick() => {
                let now = token(&positions);
                if now != sent {
                    sent = now;
                    if out.send(Ok(Event { promise: None, resume_token: sent.clone() })).await.is_err() {
                        return;
                    }
                }
            }
            () = out.closed() => return,
        }
    }
}

/// Follows one shard's replica.
struct Follower {
    index: usize,
    shard: Shard,
    filter: Arc<Filter>,
    tx: mpsc::Sender<Result<Item, WatchError>>,
}

impl Follower {
    async fn run(self, mut position: Position, mut announcements: tokio::sync::broadcast::Receiver<Announcement>) {
        // Ids delivered at the highest revision so far: an announcement of a settlement the
        // catch-up already read is not delivered twice.
        let mut last = (0u64, HashSet::<PromiseId>::new());
        loop {
            if self.catch_up(&mut position, &mut last).await.is_err() {
                return;
            }
            loop {
                match announcements.recv().await {
                    Ok(Announcement::Settled(id)) => {
                        // Just applied: the write-behind layer holds it, no disk read (as Await).
                        let record = match self.shard.state.get(&id) {
                            Ok(r) => r,
                            Err(e) => {
                                let reason = e.to_string();
                                let _ =
                                    self.tx.send(Err(WatchError::Storage { shard: self.index as u32, reason })).await;
                                return;
                            }
                        };
                        // Gone already (collected), or not after the position: nothing to send.
                        let Some(p) = record.filter(|p| p.state.is_settled()) else { continue };
                        if self.deliver(p, &mut position, &mut last).await.is_err() {
                            return;
                        }
                    }
                    Ok(Announcement::Ready(_)) => {}
                    Ok(Announcement::StateReplaced) | Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return,
                }
            }
        }
    }

    /// Reads every settlement after `position` from the replica's index, page by page.
    async fn catch_up(&self, position: &mut Position, last: &mut (u64, HashSet<PromiseId>)) -> Result<(), ()> {
        loop {
            let state = self.shard.state.clone();
            let (after, from) = (position.after_revision, position.from_ms);
            let (page, next) = match blocking(self.index, move || state.settled_since(after, from, PAGE)).await {
                Ok(page) => page,
                Err(e) => {
                    let _ = self.tx.send(Err(e)).await;
                    return Err(());
                }
            };
            let top = page.last().map(|p| (p.revision, p.settled_at_ms));
            for p in page {
                self.deliver(p, position, last).await?;
            }
            // The page ended on a revision boundary: everything up to its last entry is out.
            if let Some((revision, at)) = top {
                *position = Position { after_revision: revision, from_ms: next.unwrap_or(at) };
                self.send(None, *position).await?;
            }
            if next.is_none() {
                return Ok(());
            }
        }
    }

    /// Sends `p` if it comes after what was sent, and moves the position to just before its
    /// entry (others of that entry may still come).
    async fn deliver(
        &self,
        p: Promise,
        position: &mut Position,
        last: &mut (u64, HashSet<PromiseId>),
    ) -> Result<(), ()> {
        if p.revision < last.0 || (p.revision == last.0 && last.1.contains(&p.id)) {
            return Ok(());
        }
        if p.revision <= position.after_revision {
            return Ok(());
        }
        if p.revision > last.0 {
            *last = (p.revision, HashSet::new());
        }
        last.1.insert(p.id.clone());
        *position = Position { after_revision: p.revision - 1, from_ms: p.settled_at_ms };
        let matches = self.filter.matches(&p);
        self.send(matches.then_some(p), *position).await
    }

    async fn send(&self, promise: Option<Promise>, position: Position) -> Result<(), ()> {
        self.tx.send(Ok(Item { shard: self.index, promise, position })).await.map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_checked() {
        let t = ResumeToken(vec![
            Position { after_revision: 7, from_ms: 1_700 },
            Position { after_revision: 0, from_ms: -5 },
        ]);
        assert_eq!(ResumeToken::decode(&t.encode(), 2), Ok(t.clone()));
        assert!(ResumeToken::decode(&t.encode(), 8).is_err_and(|e| e.contains("2 shards")));
        for bad in ["", "w1.", "w1.!!", "x1.AAAA", &t.encode()[..10]] {
            assert!(ResumeToken::decode(bad, 2).is_err(), "{bad}");
        }
    }
}
