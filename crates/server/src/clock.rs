//! Wall-clock time as this node stamps it on proposals, bounded by its voters' clocks.
//!
//! Cluster time (DESIGN §2) is the largest stamp applied so far, and a stamp is the proposing
//! leader's wall clock. Left alone, one leader whose clock runs Δ fast would move cluster time Δ
//! ahead for good: pending promises would time out up to Δ early and settled ones be collected Δ
//! early, shrinking the window in which a retried write is deduplicated. So a leader stamps no
//! later than what its voters' clocks allow: every reply to a Raft message carries the replier's
//! wall clock ([`PeerClocks::observe`]), and the stamp is the clock reading that at most `f` of
//! the `2f + 1` voters' clocks exceed ([`PeerClocks::bound`]). If at most `f` clocks run fast, the
//! stamp is never ahead of every correct clock; a node that alone is fast cannot move cluster time
//! past the others. Clocks that run slow only hold cluster time back (timeouts come late, never
//! early), and `max(cluster time, stamp)` in the state machine keeps it from running backwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vow_core::NodeId;

/// Samples older than this are not trusted to say what a peer's clock reads now.
const SAMPLE_MAX_AGE: Duration = Duration::from_secs(10);

/// This node's wall clock, shifted by the test-only offset (`--test-clock-offset-ms`).
#[derive(Debug, Clone, Copy, Default)]
pub struct WallClock {
    offset_ms: i64,
}

impl WallClock {
    pub fn with_offset(offset_ms: i64) -> Self {
        WallClock { offset_ms }
    }

    pub fn now_ms(&self) -> i64 {
        let real = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        real.saturating_add(self.offset_ms)
    }
}

/// The latest wall-clock reading each peer reported, and when it arrived. Shared by every shard
/// of the node (a peer's clock is the same whichever shard's message it answered).
#[derive(Debug, Clone, Default)]
pub struct PeerClocks {
    wall: WallClock,
    samples: Arc<Mutex<HashMap<NodeId, (i64, Instant)>>>,
}

impl PeerClocks {
    pub fn new(wall: WallClock) -> Self {
        PeerClocks { wall, samples: Arc::default() }
    }

    /// This node's own wall clock.
    pub fn wall(&self) -> WallClock {
        self.wall
    }

    /// Records that `peer`'s clock read `wall_ms` just now.
    pub fn observe(&self, peer: NodeId, wall_ms: i64) {
        if wall_ms > 0 {
            self.samples.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, (wall_ms, Instant::now()));
        }
    }

    /// The stamp this node may put on a proposal now, as a leader whose voters are `voters`
    /// (`me` among them or not): see the module docs.
    pub fn bound(&self, me: NodeId, voters: impl IntoIterator<Item = NodeId>) -> i64 {
        let own = self.wall.now_ms();
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let mut voter_count = 0usize;
        let mut readings = vec![own];
        for v in voters {
            voter_count += 1;
            if v == me {
                continue;
            }
            if let Some((wall_ms, at)) = samples.get(&v)
                && at.elapsed() <= SAMPLE_MAX_AGE
            {
                readings.push(wall_ms.saturating_add(at.elapsed().as_millis() as i64));
            }
        }
        drop(samples);
        bound_of(readings, voter_count.max(1))
    }
}

/// The largest reading that at most `f` of the readings exceed, where `f` is how many of
/// `voters` may be faulty, (`voters - 1) / 2`; the smallest reading if there are no more than
/// `f` readings (too few to outvote a fast clock).
fn bound_of(mut readings: Vec<i64>, voters: usize) -> i64 {
    readings.sort_unstable();
    let f = (voters - 1) / 2;
    let k = readings.len().saturating_sub(f + 1);
    readings.get(k).copied().unwrap_or(i64::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_fast_clock_cannot_move_the_bound() {
        // Three voters, one fast (whoever it is): the bound is a correct clock's reading.
        assert_eq!(bound_of(vec![3_600_000, 1000, 1001], 3), 1001);
        assert_eq!(bound_of(vec![1000, 3_600_000, 1002], 3), 1002);
        // Five voters, two fast.
        assert_eq!(bound_of(vec![9_000, 1000, 9_000, 1001, 1002], 5), 1002);
        // Only the leader and one peer heard from: the smaller of the two.
        assert_eq!(bound_of(vec![3_600_000, 1000], 3), 1000);
        // A slow clock only holds the bound back to a correct one's reading or below.
        assert_eq!(bound_of(vec![1000, 10, 1001], 3), 1000);
        // A single voter answers to nobody.
        assert_eq!(bound_of(vec![1234], 1), 1234);
    }

    #[test]
    fn peers_are_heard_through_their_samples_and_stale_ones_are_ignored() {
        let clocks = PeerClocks::new(WallClock::with_offset(3_600_000));
        let now = WallClock::default().now_ms();
        clocks.observe(NodeId(2), now);
        clocks.observe(NodeId(3), now + 5);
        let b = clocks.bound(NodeId(1), [NodeId(1), NodeId(2), NodeId(3)]);
        assert!(b >= now && b < now + 1000, "the fast leader is outvoted: {b} vs {now}");
        // A voter never heard from counts as absent: the leader and one peer give the smaller.
        let b = clocks.bound(NodeId(1), [NodeId(1), NodeId(2), NodeId(9)]);
        assert!(b < now + 1000, "{b}");
        // Alone, a node's own clock is the bound.
        let alone = clocks.bound(NodeId(1), [NodeId(1)]);
        assert!(alone >= now + 3_600_000, "{alone}");
    }
}
