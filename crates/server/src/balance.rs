//! Leader balancing: keeps shard leadership spread over the voters, so that no node does most
//! of the leader work (proposing, replicating, answering reads) while others idle.
//!
//! Elections put leaders wherever a timer fired first, and a node that restarts comes back
//! leading nothing. Every [`BALANCE_EVERY`] each node looks at the shards it leads: if it leads
//! more than its fair share — `ceil(shards / voters)` — it hands shards, one at a time, to
//! the voter that leads the fewest, provided that voter is caught up on that shard (so a node
//! that is down or far behind is never chosen, and a handover costs no more than one election
//! round), and only to a voter below its share (so the excess moves once, not back and forth).
//! Handovers only ever leave nodes over their share, so the cluster settles.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use vow_core::{NodeId, ShardId};

use crate::node::Node;

/// How often a node checks whether it leads more than its share.
pub const BALANCE_EVERY: Duration = Duration::from_secs(2);
/// How far behind the leader's log a voter may be and still take over a shard.
const CAUGHT_UP_ENTRIES: u64 = 1_000;

/// What one node sees of one shard.
#[derive(Debug, Clone)]
pub struct ShardView {
    pub id: ShardId,
    pub leader: Option<NodeId>,
    pub voters: Vec<NodeId>,
    /// Voters other than the leader that are caught up with its log. Known only on the leader.
    pub caught_up: Vec<NodeId>,
}

/// The handover `me` should make now, if any: one of its shards and the voter to give it to.
pub fn plan(me: NodeId, shards: &[ShardView]) -> Option<(ShardId, NodeId)> {
    // Balance only a settled cluster: with a shard leaderless, counts are about to change.
    if shards.is_empty() || shards.iter().any(|s| s.leader.is_none()) {
        return None;
    }
    let mut leads: BTreeMap<NodeId, usize> = BTreeMap::new();
    for s in shards {
        for v in &s.voters {
            leads.entry(*v).or_default();
        }
    }
    for s in shards {
        if let Some(l) = s.leader {
            *leads.entry(l).or_default() += 1;
        }
    }
    let fair = shards.len().div_ceil(leads.len().max(1));
    if leads.get(&me).copied().unwrap_or(0) <= fair {
        return None;
    }
    // Of the shards this node leads, hand over the one whose best taker leads the fewest.
    shards
        .iter()
        .filter(|s| s.leader == Some(me))
        .filter_map(|s| {
            let to =
                s.caught_up.iter().filter(|v| **v != me).min_by_key(|v| (leads.get(v).copied().unwrap_or(0), **v))?;
            let count = leads.get(to).copied().unwrap_or(0);
            // Moving to a node at its share already would only move the excess there.
            (count < fair).then_some((count, s.id, *to))
        })
        .min()
        .map(|(_, shard, to)| (shard, to))
}

/// What this node sees of each shard now.
fn views(node: &Node) -> Vec<ShardView> {
    node.shards()
        .iter()
        .map(|shard| {
            let m = shard.metrics();
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            let last = m.last_log_index.unwrap_or(0);
            let caught_up = m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .filter(|(id, matched)| {
                            voters.contains(id)
                                && matched.as_ref().is_some_and(|l| l.index + CAUGHT_UP_ENTRIES >= last)
                                // A member back with an empty disk is refused (crate::incarnation):
                                // its old match index is no reason to hand it a shard.
                                && !node.incarnations().refused(**id)
                        })
                        .map(|(id, _)| *id)
                        .collect()
                })
                .unwrap_or_default();
            ShardView { id: shard.id, leader: m.current_leader, voters, caught_up }
        })
        .collect()
}

/// Every round, hands shards over one at a time while this node leads more than its share,
/// until `stop`.
pub async fn run(node: Node, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(BALANCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        // Each handover waits until the leadership has moved, so the next plan sees it.
        for _ in 0..node.shards().len() {
            if node.is_shutting_down() {
                return;
            }
            let Some((shard, to)) = plan(node.id(), &views(&node)) else { break };
            match node.transfer_leader(to, &[shard]).await {
                Ok(_) => tracing::info!(shard = %shard, to = %to, "leadership handed over to spread the load"),
                Err(e) => {
                    tracing::debug!(shard = %shard, to = %to, error = %e, "leadership handover failed");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: u32, leader: u64, voters: &[u64], caught_up: &[u64]) -> ShardView {
        ShardView {
            id: ShardId(id),
            leader: (leader != 0).then_some(NodeId(leader)),
            voters: voters.iter().copied().map(NodeId).collect(),
            caught_up: caught_up.iter().copied().map(NodeId).collect(),
        }
    }

    /// Eight shards on three voters, led as `leaders` says, every follower caught up.
    fn cluster(leaders: &[u64]) -> Vec<ShardView> {
        leaders
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let others: Vec<u64> = [1, 2, 3].into_iter().filter(|v| v != l).collect();
                view(i as u32, *l, &[1, 2, 3], &others)
            })
            .collect()
    }

    #[test]
    fn a_node_over_its_share_hands_a_shard_to_the_least_loaded_voter() {
        // Node 3 restarted and leads nothing; 1 and 2 lead four each, the share is three.
        let shards = cluster(&[1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(plan(NodeId(1), &shards), Some((ShardId(0), NodeId(3))));
        assert_eq!(plan(NodeId(2), &shards), Some((ShardId(4), NodeId(3))));
        assert_eq!(plan(NodeId(3), &shards), None);
    }

    #[test]
    fn a_spread_cluster_stays_as_it_is() {
        for leaders in [[1, 1, 1, 2, 2, 2, 3, 3], [1, 2, 3, 1, 2, 3, 1, 2]] {
            let shards = cluster(&leaders);
            for me in 1..=3 {
                assert_eq!(plan(NodeId(me), &shards), None, "{leaders:?} seen by {me}");
            }
        }
    }

    #[test]
    fn handovers_converge_without_swinging() {
        let mut leaders = vec![1u64; 8];
        for _round in 0..8 {
            let shards = cluster(&leaders);
            let moves: Vec<_> = (1..=3).filter_map(|me| plan(NodeId(me), &shards)).collect();
            if moves.is_empty() {
                break;
            }
            for (shard, to) in moves {
                leaders[shard.0 as usize] = to.0;
            }
        }
        let count = |n| leaders.iter().filter(|l| **l == n).count();
        assert!((1..=3).all(|n| count(n) <= 3), "still unbalanced: {leaders:?}");
    }

    #[test]
    fn only_caught_up_voters_take_over_and_only_in_a_settled_cluster() {
        // Node 3 is down or behind: no shard reports it caught up, so nothing moves to it.
        let shards: Vec<ShardView> =
            (0..8).map(|i| view(i, if i < 4 { 1 } else { 2 }, &[1, 2, 3], &[if i < 4 { 2 } else { 1 }])).collect();
        assert_eq!(plan(NodeId(1), &shards), None, "node 2 already holds its share");
        let mut shards = cluster(&[1, 1, 1, 1, 2, 2, 2, 2]);
        shards[7].leader = None;
        assert_eq!(plan(NodeId(1), &shards), None, "an election is under way");
        assert_eq!(plan(NodeId(1), &[]), None);
    }

    #[test]
    fn one_voter_keeps_everything() {
        let shards: Vec<ShardView> = (0..8).map(|i| view(i, 1, &[1], &[])).collect();
        assert_eq!(plan(NodeId(1), &shards), None);
    }
}
