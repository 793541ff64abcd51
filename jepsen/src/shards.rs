//! The shards as the nodes report them in their status replies: who leads which shard, whether
//! every shard has a leader, and whether every replica of every shard has caught up. Pure
//! functions of the replies, so the nemesis's choices and the run's waits are unit-tested.
//!
//! A node is the authority on whether *it* leads a shard; another node's view of the leader may
//! be stale (it was cut off, paused, or has not heard of the election yet). So a shard's leader
//! is a node that says it leads the shard, and only if no node reports a higher term for that
//! shard: an old leader that has not yet learnt of its successor does not count.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use vow_client::pb;

/// Status replies, each with the id of the node that gave it.
pub type Statuses = [(u64, pb::StatusResponse)];

/// A shard's leader by its own account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leader {
    pub node: u64,
    pub term: u64,
    /// What the leader reports as committed: every replica must apply at least this much.
    pub commit_index: u64,
}

/// Every shard's leader, for the shards that have one (see the module docs for the rule).
pub fn leaders(statuses: &Statuses) -> BTreeMap<u32, Leader> {
    let mut highest_term: BTreeMap<u32, u64> = BTreeMap::new();
    for (_, s) in statuses {
        for sh in &s.shards {
            let t = highest_term.entry(sh.shard_id).or_default();
            *t = (*t).max(sh.term);
        }
    }
    let mut leaders = BTreeMap::new();
    for (node, s) in statuses {
        for sh in s.shards.iter().filter(|sh| sh.leader_id == *node && sh.leader_id != 0) {
            if highest_term.get(&sh.shard_id).is_some_and(|t| sh.term >= *t) {
                // Raft elects at most one leader per term, so there is no second claim to weigh.
                leaders.entry(sh.shard_id).or_insert(Leader {
                    node: *node,
                    term: sh.term,
                    commit_index: sh.commit_index,
                });
            }
        }
    }
    leaders
}

/// The shards each node leads, ascending; nodes that lead none are absent.
pub fn led_by(leaders: &BTreeMap<u32, Leader>) -> BTreeMap<u64, Vec<u32>> {
    let mut led: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (shard, l) in leaders {
        led.entry(l.node).or_default().push(*shard);
    }
    led
}

/// Of `candidates`, the node that leads the most shards (the one whose loss hurts most), with
/// those shards. Ties go to the earlier candidate, so a caller that passes its nodes in a seeded
/// order gets a seeded choice. None when no candidate leads a shard.
pub fn most_leading(candidates: &[u64], leaders: &BTreeMap<u32, Leader>) -> Option<(u64, Vec<u32>)> {
    let led = led_by(leaders);
    let mut best: Option<(u64, Vec<u32>)> = None;
    for c in candidates {
        let Some(shards) = led.get(c) else { continue };
        if best.as_ref().is_none_or(|(_, b)| shards.len() > b.len()) {
            best = Some((*c, shards.clone()));
        }
    }
    best
}

/// Of `candidates`, the node that leads the fewest shards (none, if any such node exists), with
/// those shards; ties go to the earlier candidate. None only when there are no candidates.
pub fn least_leading(candidates: &[u64], leaders: &BTreeMap<u32, Leader>) -> Option<(u64, Vec<u32>)> {
    let led = led_by(leaders);
    let mut best: Option<(u64, Vec<u32>)> = None;
    for c in candidates {
        let shards = led.get(c).cloned().unwrap_or_default();
        if best.as_ref().is_none_or(|(_, b)| shards.len() < b.len()) {
            best = Some((*c, shards));
        }
    }
    best
}

/// Leadership in words for a nemesis event: `1:[0, 4] 3:[1, 2]`, or `none known`.
pub fn describe_leadership(leaders: &BTreeMap<u32, Leader>) -> String {
    let led = led_by(leaders);
    if led.is_empty() {
        return "none known".to_owned();
    }
    let mut out = String::new();
    for (node, shards) in led {
        let _ = write!(out, "{}{node}:{shards:?}", if out.is_empty() { "" } else { " " });
    }
    out
}

/// A node whose shards are not the `expected` ones (ids `0..expected`): it was started with
/// another shard count, which no amount of waiting mends.
pub fn shard_count_mismatch(expected: u32, statuses: &Statuses) -> Option<String> {
    let want: BTreeSet<u32> = (0..expected).collect();
    statuses.iter().find_map(|(node, s)| {
        let have: BTreeSet<u32> = s.shards.iter().map(|sh| sh.shard_id).collect();
        (have != want || have.len() != s.shards.len())
            .then(|| format!("node {node} reports shards {have:?}, but the run asked for {expected}"))
    })
}

/// Ok when every shard `0..expected` has a leader; otherwise which do not.
pub fn every_shard_led(expected: u32, statuses: &Statuses) -> Result<(), String> {
    let leaders = leaders(statuses);
    let leaderless: Vec<u32> = (0..expected).filter(|s| !leaders.contains_key(s)).collect();
    if leaderless.is_empty() { Ok(()) } else { Err(format!("no leader for shards {leaderless:?}")) }
}

/// Ok when, for every shard `0..expected`, every node in `nodes` has applied at least what the
/// shard's leader reports as committed; otherwise what is still missing (a node that did not
/// answer, a shard without a leader, replicas behind).
pub fn converged(nodes: &[u64], expected: u32, statuses: &Statuses) -> Result<(), String> {
    let mut missing = Vec::new();
    let silent: Vec<u64> = nodes.iter().copied().filter(|n| !statuses.iter().any(|(id, _)| id == n)).collect();
    if !silent.is_empty() {
        missing.push(format!("no status from nodes {silent:?}"));
    }
    let leaders = leaders(statuses);
    for shard in 0..expected {
        let Some(leader) = leaders.get(&shard) else {
            missing.push(format!("shard {shard}: no leader"));
            continue;
        };
        let behind: Vec<String> = statuses
            .iter()
            .filter(|(node, _)| nodes.contains(node))
            .filter_map(|(node, s)| {
                let applied = s.shards.iter().find(|sh| sh.shard_id == shard).map(|sh| sh.applied_index);
                match applied {
                    Some(a) if a >= leader.commit_index => None,
                    Some(a) => Some(format!("node {node} applied {a}")),
                    None => Some(format!("node {node} has no such shard")),
                }
            })
            .collect();
        if !behind.is_empty() {
            missing.push(format!(
                "shard {shard} (leader {}, commit {}): {}",
                leader.node,
                leader.commit_index,
                behind.join(", ")
            ));
        }
    }
    if missing.is_empty() { Ok(()) } else { Err(missing.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One shard as a node reports it: (shard, leader, term, commit, applied).
    type Row = (u32, u64, u64, u64, u64);

    fn status(node: u64, rows: &[Row]) -> (u64, pb::StatusResponse) {
        let shards = rows
            .iter()
            .map(|&(shard_id, leader_id, term, commit_index, applied_index)| pb::ShardStatus {
                shard_id,
                leader_id,
                term,
                commit_index,
                applied_index,
                ..Default::default()
            })
            .collect();
        (node, pb::StatusResponse { shards, node_id: node, ..Default::default() })
    }

    /// Three nodes, four shards, everyone agreeing: node 1 leads 0 and 2, node 2 leads 1 and 3.
    fn agreed(applied: [[u64; 4]; 3]) -> Vec<(u64, pb::StatusResponse)> {
        let leader_of = [1, 2, 1, 2];
        (1..=3u64)
            .map(|n| {
                let rows: Vec<Row> = (0..4u32)
                    .map(|s| (s, leader_of[s as usize], 3, 10 + s as u64, applied[n as usize - 1][s as usize]))
                    .collect();
                status(n, &rows)
            })
            .collect()
    }

    #[test]
    fn a_leader_is_a_node_that_says_so_in_the_highest_term() {
        let statuses = vec![
            // Node 1 still believes it leads shard 0 in term 2; node 2 won term 3 meanwhile.
            status(1, &[(0, 1, 2, 5, 5), (1, 2, 3, 7, 7)]),
            status(2, &[(0, 2, 3, 6, 6), (1, 2, 3, 7, 7)]),
            // Node 3 thinks node 1 leads shard 1: another's view does not make a leader.
            status(3, &[(0, 2, 3, 6, 6), (1, 1, 3, 7, 7)]),
        ];
        let l = leaders(&statuses);
        assert_eq!(l[&0], Leader { node: 2, term: 3, commit_index: 6 });
        assert_eq!(l[&1].node, 2);
        assert_eq!(led_by(&l), BTreeMap::from([(2, vec![0, 1])]));

        // A candidate in a higher term means the shard has no leader yet.
        let electing = vec![status(1, &[(0, 1, 4, 5, 5)]), status(2, &[(0, 0, 5, 5, 5)])];
        assert!(leaders(&electing).is_empty());
        assert_eq!(every_shard_led(1, &electing), Err("no leader for shards [0]".into()));
    }

    #[test]
    fn the_node_leading_most_shards_is_chosen_ties_in_the_given_order() {
        let statuses = vec![
            status(1, &[(0, 1, 1, 1, 1), (1, 1, 1, 1, 1), (2, 0, 1, 1, 1), (3, 0, 1, 1, 1)]),
            status(2, &[(0, 0, 1, 1, 1), (1, 0, 1, 1, 1), (2, 2, 1, 1, 1), (3, 0, 1, 1, 1)]),
            status(3, &[(0, 0, 1, 1, 1), (1, 0, 1, 1, 1), (2, 0, 1, 1, 1), (3, 3, 1, 1, 1)]),
            status(4, &[]),
        ];
        let l = leaders(&statuses);
        assert_eq!(most_leading(&[4, 3, 2, 1], &l), Some((1, vec![0, 1])), "two shards beat one");
        assert_eq!(most_leading(&[3, 2], &l), Some((3, vec![3])), "a tie goes to the earlier candidate");
        assert_eq!(most_leading(&[2, 3], &l), Some((2, vec![2])));
        assert_eq!(most_leading(&[4], &l), None, "a node that leads nothing is never 'the leader'");
        assert_eq!(least_leading(&[1, 2, 4, 3], &l), Some((4, vec![])), "a node leading nothing first");
        assert_eq!(least_leading(&[1, 3, 2], &l), Some((3, vec![3])));
        assert_eq!(least_leading(&[], &l), None);
        assert_eq!(describe_leadership(&l), "1:[0, 1] 2:[2] 3:[3]");
        assert_eq!(describe_leadership(&BTreeMap::new()), "none known");
    }

    #[test]
    fn convergence_needs_every_replica_of_every_shard() {
        let nodes = [1, 2, 3];
        // Commit indexes are 10, 11, 12, 13 for shards 0..4.
        assert_eq!(converged(&nodes, 4, &agreed([[10, 11, 12, 13]; 3])), Ok(()));
        assert_eq!(converged(&nodes, 4, &agreed([[10, 12, 12, 20]; 3])), Ok(()), "ahead is caught up");

        // Shard 0 alone is caught up everywhere; the single-shard check passed this.
        let lagging = agreed([[10, 11, 12, 13], [10, 11, 12, 13], [10, 11, 12, 9]]);
        let e = converged(&nodes, 4, &lagging).unwrap_err();
        assert_eq!(e, "shard 3 (leader 2, commit 13): node 3 applied 9");

        // A node that does not answer is not converged, whatever the others say.
        let mut two = agreed([[10, 11, 12, 13]; 3]);
        two.pop();
        assert_eq!(converged(&nodes, 4, &two), Err("no status from nodes [3]".into()));

        // A shard nobody leads cannot be judged.
        let mut leaderless = agreed([[10, 11, 12, 13]; 3]);
        for (_, s) in &mut leaderless {
            s.shards[2].leader_id = 0;
        }
        assert_eq!(converged(&nodes, 4, &leaderless), Err("shard 2: no leader".into()));
        assert_eq!(every_shard_led(4, &leaderless), Err("no leader for shards [2]".into()));
        assert_eq!(every_shard_led(4, &agreed([[0; 4]; 3])), Ok(()));
    }

    #[test]
    fn a_node_with_another_shard_count_is_named() {
        assert_eq!(shard_count_mismatch(4, &agreed([[0; 4]; 3])), None);
        let one = vec![status(1, &[(0, 1, 1, 1, 1)])];
        assert_eq!(shard_count_mismatch(4, &one), Some("node 1 reports shards {0}, but the run asked for 4".into()));
        assert_eq!(shard_count_mismatch(1, &one), None);
        // Missing shards from an expected count is as bad as extra ones.
        assert!(shard_count_mismatch(1, &agreed([[0; 4]; 3])).is_some());
    }
}
