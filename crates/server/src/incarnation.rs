//! Telling a member that came back with an empty data directory from one that restarted.
//!
//! Raft trusts each voter to remember what it acknowledged and whom it voted for. A voter whose
//! disk was wiped (a volume lost, a pod rescheduled without its claim) and that starts again
//! under the same id remembers neither: it would acknowledge and vote as if new, and with one
//! other node that had not received an entry it could elect a leader without it — losing a
//! committed write — or vote twice in one term.
//!
//! So each data directory draws a random *incarnation* when it is created
//! ([`vow_storage::incarnation`]). Every Raft request carries the sender's id and incarnation
//! and the incarnation the sender knows the target by (and what it knows of the target from
//! its gossip map); every reply carries the replier's. Each node records the incarnations of
//! the nodes it exchanges messages with, durably, the first time it sees each. With shard
//! leadership spread over the nodes, every node leads some shard and so talks to every other.
//! Then:
//!
//! - a message from a node under an incarnation other than the recorded one is refused: that
//!   node lost its state, and its messages (votes, acknowledgements) must not count;
//! - a node told that it is known by another incarnation than its own learns that it is the
//!   one that lost its state: it stops answering and sending Raft messages altogether, and
//!   `/readyz` says so, until an operator replaces it — removes it from the membership (every
//!   node then forgets its record, see [`Incarnations::retain`]) and adds it again, as a new
//!   member that catches up from the others.
//!
//! A node that restarts with its data keeps its incarnation and notices nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rocksdb::DB;
use tonic::Status;
use vow_core::NodeId;

/// The incarnations this node knows: its own and its peers'.
#[derive(Clone)]
pub struct Incarnations {
    inner: Arc<Inner>,
}

struct Inner {
    me: NodeId,
    mine: u64,
    db: Arc<DB>,
    known: Mutex<BTreeMap<u64, u64>>,
    /// Peers this node refused for coming back under another incarnation, until replaced.
    refused: Mutex<BTreeSet<u64>>,
    /// Set once a peer knows this node by another incarnation: this node lost its state.
    lost: AtomicBool,
}

impl std::fmt::Debug for Incarnations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incarnations")
            .field("me", &self.inner.me)
            .field("mine", &self.inner.mine)
            .field("lost", &self.lost())
            .finish_non_exhaustive()
    }
}

impl Incarnations {
    /// This node's incarnation (drawn if the directory is new) and what it recorded of others.
    pub fn open(me: NodeId, db: Arc<DB>) -> std::io::Result<Incarnations> {
        let mine = vow_storage::incarnation(&db)?;
        let known = vow_storage::peer_incarnations(&db)?;
        Ok(Incarnations {
            inner: Arc::new(Inner {
                me,
                mine,
                db,
                known: Mutex::new(known),
                refused: Mutex::default(),
                lost: AtomicBool::new(false),
            }),
        })
    }

    pub fn mine(&self) -> u64 {
        self.inner.mine
    }

    pub fn me(&self) -> NodeId {
        self.inner.me
    }

    /// Whether this node learned that it lost its state (see the module docs).
    pub fn lost(&self) -> bool {
        self.inner.lost.load(Ordering::Relaxed)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.inner.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this node refused `node` for coming back under another incarnation (until it is
    /// replaced): no leadership should go to it.
    pub fn refused(&self, node: NodeId) -> bool {
        self.inner.refused.lock().unwrap_or_else(|p| p.into_inner()).contains(&node.0)
    }

    /// The incarnation this node knows `node` by; 0 when none yet.
    pub fn of(&self, node: NodeId) -> u64 {
        self.known().get(&node.0).copied().unwrap_or(0)
    }

    /// Every incarnation this node knows, its own included, for a request's gossip.
    pub fn gossip(&self) -> HashMap<u64, u64> {
        let mut out: HashMap<u64, u64> = self.known().iter().map(|(n, i)| (*n, *i)).collect();
        out.insert(self.inner.me.0, self.inner.mine);
        out
    }

    /// Checks an incoming Raft request: from node `sender` under `sender_incarnation`, which
    /// knows this node as `target_incarnation` and knows `gossip`. A refusal is
    /// FAILED_PRECONDITION, which the sender treats as an unreachable peer.
    pub fn check_request(
        &self,
        sender: u64,
        sender_incarnation: u64,
        target_incarnation: u64,
        gossip: &HashMap<u64, u64>,
    ) -> Result<(), Status> {
        if sender == 0 {
            return Ok(()); // a sender that does not say (an older vowd)
        }
        let told = gossip.get(&self.inner.me.0).copied().filter(|i| *i != 0);
        if let Some(other) =
            [Some(target_incarnation).filter(|i| *i != 0), told].into_iter().flatten().find(|i| *i != self.inner.mine)
        {
            self.learn_lost(sender, other);
        }
        if self.lost() {
            return Err(Status::failed_precondition(self.lost_message()));
        }
        self.check_peer(sender, sender_incarnation).map_err(Status::failed_precondition)
        // What the sender knows of third nodes is not adopted: after a node is replaced, a
        // sender that has not yet forgotten its old incarnation would teach it back to nodes
        // that had, and they would refuse the replacement.
    }

    /// Checks a reply from `node` carrying `incarnation` (0: a replier that does not say).
    pub fn check_reply(&self, node: NodeId, incarnation: u64) -> Result<(), String> {
        if incarnation == 0 {
            return Ok(());
        }
        self.check_peer(node.0, incarnation)
    }

    /// Whether this node may send Raft messages: not once it learned it lost its state.
    pub fn may_send(&self) -> Result<(), String> {
        if self.lost() { Err(self.lost_message()) } else { Ok(()) }
    }

    /// Drops the records of nodes that are no longer members of any shard (`members`), so
    /// that a replaced node can be added again under its new incarnation.
    pub fn retain(&self, members: &BTreeSet<u64>) {
        self.inner.refused.lock().unwrap_or_else(|p| p.into_inner()).retain(|node| members.contains(node));
        let snapshot = {
            let mut known = self.known();
            let before = known.len();
            known.retain(|node, _| members.contains(node));
            if known.len() == before {
                return;
            }
            known.clone()
        };
        if let Err(e) = vow_storage::save_peer_incarnations(&self.inner.db, &snapshot) {
            tracing::warn!(error = %e, "writing peer incarnations failed");
        }
    }

    fn check_peer(&self, node: u64, incarnation: u64) -> Result<(), String> {
        if incarnation == 0 {
            return Ok(());
        }
        match self.known().get(&node).copied() {
            Some(recorded) if recorded != incarnation => {
                self.inner.refused.lock().unwrap_or_else(|p| p.into_inner()).insert(node);
                return Err(format!(
                    "node {node} came back with an empty data directory (incarnation {incarnation:x}, was \
                     {recorded:x}): its votes and acknowledgements do not count until it is replaced — \
                     remove it (`vow cluster remove-node --node-id {node}`), then add it again"
                ));
            }
            Some(_) => return Ok(()),
            None => {}
        }
        self.record(&[(node, incarnation)]);
        Ok(())
    }

    fn record(&self, learned: &[(u64, u64)]) {
        let snapshot = {
            let mut known = self.known();
            for (node, incarnation) in learned {
                known.entry(*node).or_insert(*incarnation);
            }
            known.clone()
        };
        // Durable before the message that taught it is acted on: a restart must not forget a
        // peer whose acknowledgement this node may already have counted.
        if let Err(e) = vow_storage::save_peer_incarnations(&self.inner.db, &snapshot) {
            tracing::warn!(error = %e, "writing peer incarnations failed");
        }
    }

    fn learn_lost(&self, from: u64, known_as: u64) {
        if !self.inner.lost.swap(true, Ordering::Relaxed) {
            tracing::error!(
                node = %self.inner.me,
                told_by = from,
                known_as = format!("{known_as:x}"),
                mine = format!("{:x}", self.inner.mine),
                "{}",
                self.lost_message()
            );
        }
    }

    fn lost_message(&self) -> String {
        let me = self.inner.me;
        format!(
            "node {me} lost its state: it is a member that started again with an empty data directory, so it \
             takes no part in Raft until it is replaced — remove it (`vow cluster remove-node --node-id {me}`), \
             restart it and add it again (`vow cluster add-node`); see docs/operations.md"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(me: u64) -> (tempfile::TempDir, Incarnations) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = vow_storage::open(&dir.path().join("db")).expect("db");
        let inc = Incarnations::open(NodeId(me), db).expect("incarnations");
        (dir, inc)
    }

    #[test]
    fn a_peer_back_under_another_incarnation_is_refused_and_a_wiped_node_learns_it() {
        let (_d1, n1) = open(1);
        let (_d2, n2) = open(2);
        assert_ne!(n1.mine(), n2.mine());
        // n2 talks to n1 for the first time: recorded.
        n1.check_request(2, n2.mine(), 0, &n2.gossip()).expect("first contact");
        assert_eq!(n1.of(NodeId(2)), n2.mine());
        // n2 again, same incarnation: fine, also as a reply.
        n1.check_request(2, n2.mine(), n1.mine(), &n2.gossip()).expect("same incarnation");
        n1.check_reply(NodeId(2), n2.mine()).expect("reply");
        // n2's directory is wiped: a new incarnation. n1 refuses it either way.
        let (_d2b, wiped) = open(2);
        let err = n1.check_request(2, wiped.mine(), 0, &wiped.gossip()).unwrap_err();
        assert!(err.message().contains("node 2 came back with an empty data directory"), "{err:?}");
        assert!(n1.check_reply(NodeId(2), wiped.mine()).is_err());
        assert!(n1.refused(NodeId(2)) && !n1.refused(NodeId(3)), "no leadership goes to node 2");
        assert!(!n1.lost(), "n1 is fine");
        // The wiped node hears from n1, which knows it by its old incarnation: it is lost.
        let err = wiped.check_request(1, n1.mine(), n1.of(NodeId(2)), &n1.gossip()).unwrap_err();
        assert!(err.message().contains("node 2 lost its state"), "{err:?}");
        assert!(wiped.lost() && wiped.may_send().is_err());
        // Gossip tells node 2 too: a sender's map that knows it by another incarnation.
        let (_d2x, wiped_again) = open(2);
        let err = wiped_again.check_request(1, n1.mine(), 0, &n1.gossip()).unwrap_err();
        assert!(err.message().contains("lost its state"), "{err:?}");
        // What a sender knows of third nodes is not adopted.
        let (_d3, n3) = open(3);
        n3.check_request(1, n1.mine(), 0, &n1.gossip()).expect("from n1");
        assert_eq!(n3.of(NodeId(2)), 0);
        // Once node 2 is no longer a member anywhere, it is forgotten and may come back new.
        n1.retain(&BTreeSet::from([1, 3]));
        assert_eq!(n1.of(NodeId(2)), 0);
        assert!(!n1.refused(NodeId(2)));
        let (_d2c, replacement) = open(2);
        n1.check_request(2, replacement.mine(), 0, &replacement.gossip()).expect("the replacement");
    }

    #[test]
    fn records_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let (mine, peer) = {
            let db = vow_storage::open(&path).expect("db");
            let n1 = Incarnations::open(NodeId(1), db).expect("open");
            n1.check_reply(NodeId(2), 42).expect("first");
            (n1.mine(), 42)
        };
        let db = vow_storage::open(&path).expect("db again");
        let n1 = Incarnations::open(NodeId(1), db).expect("reopen");
        assert_eq!((n1.mine(), n1.of(NodeId(2))), (mine, peer));
        assert!(n1.check_reply(NodeId(2), 43).is_err());
    }
}
