//! This node's shards and what it can do with them locally: propose and read on the shards it
//! leads (waiting briefly for an election), and change the membership of those shards.
//! [`Node`] is the handle every service, the router and the background tasks share; how a
//! node starts and stops is in `server.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use openraft::ChangeMembers;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::{ChangeMembershipError, ClientWriteError, RaftError};
use vow_core::{Limits, NodeId, ShardId};

use crate::clock::WallClock;
use crate::incarnation::Incarnations;
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::shard::{Shard, ShardError};
use vow_storage::log_store::WalFlusher;
use vow_storage::types::{TypeConfig, VowNode};

/// A membership or leadership operation found no leader for a shard: retry, possibly at another
/// node (a node that was removed, or is cut off, does not know the leader).
#[derive(Debug, thiserror::Error)]
#[error("shard {0} has no leader known to this node")]
pub struct NoLeader(pub ShardId);

/// A membership change that cannot be made now but may succeed if retried: the shard is still
/// committing an earlier change (e.g. a leader without a quorum), or leadership moved.
#[derive(Debug, thiserror::Error)]
#[error("shard {shard}: {reason}")]
pub struct Busy {
    pub shard: ShardId,
    pub reason: String,
}

/// Classifies a failed membership write: retryable conditions become [`Busy`].
fn membership_error(
    shard: ShardId,
    what: String,
    e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
) -> anyhow::Error {
    match &e {
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_)))
        | RaftError::APIError(ClientWriteError::ForwardToLeader(_))
        | RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => {
            anyhow::Error::new(Busy { shard, reason: format!("{what}: {e}") })
        }
        _ => anyhow::Error::new(e).context(what),
    }
}

/// Refuses, as retryable, a membership change on a shard this node leads but whose quorum has
/// not acknowledged it lately: its proposal could not commit, and the caller would wait out
/// openraft's timeouts (a minute) for an answer another node may give at once.
fn in_touch(shard: &Shard) -> Result<(), Busy> {
    match shard.out_of_touch() {
        None => Ok(()),
        Some(silence) => Err(Busy {
            shard: shard.id,
            reason: format!("this node leads it but has heard from no quorum for {} ms", silence.as_millis()),
        }),
    }
}

/// How long a stopping node tries to hand each shard it leads to another voter: within the
/// drain an orchestrator's grace period allows, and well beyond an election's few hundred ms.
const HANDOFF_WITHIN: Duration = Duration::from_secs(5);

/// How long a stopping leader keeps trying to hand a shard off after the last time another voter
/// answered it (ten heartbeats): a shard none of whose other voters answer has no one to take it
/// (they are down, or stopping too, as when a whole cluster stops at once), and waiting out
/// [`HANDOFF_WITHIN`] for them only delays the stop.
const HANDOFF_UNANSWERED: Duration = Duration::from_secs(1);

/// How long a request waits for a shard to elect a leader before answering UNAVAILABLE.
pub const LEADER_WAIT: Duration = Duration::from_secs(3);

/// A cheap, cloneable handle on this node, shared by the API services, the HTTP endpoints and
/// the background tasks.
#[derive(Clone, Debug)]
pub struct Node {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: NodeId,
    cluster_name: String,
    advertise_addr: String,
    shards: Arc<[Shard]>,
    peers: Peers,
    limits: Limits,
    metrics: Metrics,
    wall: WallClock,
    flusher: WalFlusher,
    incarnations: Incarnations,
    shutting_down: AtomicBool,
}

/// What a [`Node`] is made of; see [`Node::new`].
#[derive(Debug)]
pub struct NodeParts {
    pub id: NodeId,
    pub cluster_name: String,
    pub advertise_addr: String,
    pub shards: Arc<[Shard]>,
    pub peers: Peers,
    pub limits: Limits,
    pub wall: WallClock,
    /// The WAL flusher every shard's log shares.
    pub flusher: WalFlusher,
    /// This node's and its peers' incarnations (see [`crate::incarnation`]).
    pub incarnations: Incarnations,
}

impl Node {
    pub fn new(parts: NodeParts) -> Node {
        let NodeParts { id, cluster_name, advertise_addr, shards, peers, limits, wall, flusher, incarnations } = parts;
        Node {
            inner: Arc::new(Inner {
                id,
                cluster_name,
                advertise_addr,
                shards,
                peers,
                limits,
                metrics: Metrics::new(id.0),
                wall,
                flusher,
                incarnations,
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The cluster this node belongs to; peers refuse messages from another cluster.
    pub fn cluster_name(&self) -> &str {
        &self.inner.cluster_name
    }

    pub fn advertise_addr(&self) -> &str {
        &self.inner.advertise_addr
    }

    pub fn shards(&self) -> &[Shard] {
        &self.inner.shards
    }

    pub fn shard(&self, id: ShardId) -> Option<&Shard> {
        self.inner.shards.get(id.0 as usize)
    }

    pub fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// This node's wall clock.
    pub fn wall(&self) -> WallClock {
        self.inner.wall
    }

    /// This node's wall-clock time now (ms since the epoch).
    pub fn wall_ms(&self) -> i64 {
        self.inner.wall.now_ms()
    }

    /// The WAL flusher all shards of this node share (its counters show group commit at work).
    pub fn flusher(&self) -> &WalFlusher {
        &self.inner.flusher
    }

    pub fn incarnations(&self) -> &Incarnations {
        &self.inner.incarnations
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Relaxed)
    }

    /// Marks the node as stopping: `/readyz` fails from now on.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Proposes on `shard` if this node leads it, waiting briefly for an election when no
    /// leader is known. Returns `NotLeader` with the leader's address when another node leads.
    pub async fn write(&self, shard: &Shard, command: &vow_core::Command) -> Result<vow_core::Outcome, ShardError> {
        if crate::sabotage::enabled("ack-before-commit") {
            return shard.predict_and_propose_in_background(command.clone());
        }
        if crate::sabotage::enabled("refuse-writes") {
            let reason = "sabotage refuse-writes: this build takes no write".to_owned();
            return Err(ShardError::Unavailable { shard: shard.id, reason });
        }
        self.with_leader(shard, || shard.propose(command.clone())).await
    }

    /// Waits until this replica of `shard` reflects every write committed before the call.
    pub async fn read_barrier(&self, shard: &Shard) -> Result<(), ShardError> {
        if crate::sabotage::enabled("stale-reads") {
            return Ok(());
        }
        self.with_leader(shard, || shard.read_barrier()).await
    }

    async fn with_leader<T, F, Fut>(&self, shard: &Shard, mut op: F) -> Result<T, ShardError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ShardError>>,
    {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            match op().await {
                Err(ShardError::NotLeader { leader, shard: sid }) => {
                    let other = leader.filter(|(id, _)| *id != self.id());
                    if other.is_some() || tokio::time::Instant::now() >= deadline {
                        return Err(ShardError::NotLeader { shard: sid, leader: other });
                    }
                    // No leader known (or our own stale leadership): wait for an election.
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    shard.wait_for_leader(left).await;
                    tokio::time::sleep(Duration::from_millis(20)).await; // let a stale self-lead settle
                }
                other => return other,
            }
        }
    }

    /// Adds `node` to every shard in `shards` this node leads: as a learner first, caught up
    /// (blocking), then as a voter. Shards led elsewhere are returned for forwarding.
    pub async fn add_node(
        &self,
        id: NodeId,
        node: &VowNode,
        shards: &[ShardId],
    ) -> anyhow::Result<Vec<(ShardId, String)>> {
        let mut elsewhere = Vec::new();
        for &sid in shards {
            let shard = self.shard(sid).with_context(|| format!("no shard {sid}"))?;
            if !shard.is_leader() {
                let (_, leader) = shard.wait_for_leader(LEADER_WAIT).await.ok_or(NoLeader(sid))?;
                if !shard.is_leader() {
                    elsewhere.push((sid, leader.grpc_addr));
                    continue;
                }
            }
            in_touch(shard)?;
            finish_joint(shard).await?;
            let (voters, _) = shard.voters_and_learners();
            if voters.contains(&id) {
                continue;
            }
            shard
                .raft
                .add_learner(id, node.clone(), true)
                .await
                .map_err(|e| membership_error(sid, format!("adding node {id} as learner of shard {sid}"), e))?;
            shard
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(|e| membership_error(sid, format!("promoting node {id} to voter of shard {sid}"), e))?;
            tracing::info!(shard = %sid, node = %id, "member added");
        }
        Ok(elsewhere)
    }

    /// Removes `node` from every shard in `shards` this node leads; returns the others.
    pub async fn remove_node(&self, id: NodeId, shards: &[ShardId]) -> anyhow::Result<Vec<(ShardId, String)>> {
        let mut elsewhere = Vec::new();
        for &sid in shards {
            let shard = self.shard(sid).with_context(|| format!("no shard {sid}"))?;
            if !shard.is_leader() {
                let (_, leader) = shard.wait_for_leader(LEADER_WAIT).await.ok_or(NoLeader(sid))?;
                if !shard.is_leader() {
                    elsewhere.push((sid, leader.grpc_addr));
                    continue;
                }
            }
            in_touch(shard)?;
            finish_joint(shard).await?;
            let (voters, learners) = shard.voters_and_learners();
            if voters.contains(&id) {
                if voters.len() == 1 {
                    anyhow::bail!("node {id} is the only voter of shard {sid}; add another node first");
                }
                shard
                    .raft
                    .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                    .await
                    .map_err(|e| membership_error(sid, format!("removing node {id} from shard {sid}"), e))?;
            } else if learners.contains(&id) {
                shard
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                    .await
                    .map_err(|e| membership_error(sid, format!("removing learner {id} from shard {sid}"), e))?;
            }
            tracing::info!(shard = %sid, node = %id, "member removed");
        }
        Ok(elsewhere)
    }

    /// Asks this node's leaderships in `shards` to move to `to`; returns shards led elsewhere.
    pub async fn transfer_leader(&self, to: NodeId, shards: &[ShardId]) -> anyhow::Result<Vec<(ShardId, String)>> {
        let mut elsewhere = Vec::new();
        for &sid in shards {
            let shard = self.shard(sid).with_context(|| format!("no shard {sid}"))?;
            if shard.is_leader() {
                if to != self.id() {
                    let (voters, _) = shard.voters_and_learners();
                    anyhow::ensure!(voters.contains(&to), "node {to} is not a voter of shard {sid}");
                    shard.raft.trigger().transfer_leader(to).await?;
                    let _ = shard
                        .raft
                        .wait(Some(LEADER_WAIT))
                        .metrics(|m| m.current_leader.is_some_and(|l| l != self.id()), "leadership moved")
                        .await;
                }
            } else {
                let (_, leader) = shard.wait_for_leader(LEADER_WAIT).await.ok_or(NoLeader(sid))?;
                if !shard.is_leader() {
                    elsewhere.push((sid, leader.grpc_addr));
                }
            }
        }
        Ok(elsewhere)
    }

    /// Moves every leadership this node holds to another voter, so that stopping it costs
    /// the cluster no election timeout.
    pub async fn hand_off_leadership(&self) {
        let deadline = tokio::time::Instant::now() + HANDOFF_WITHIN;
        loop {
            // Every shard at once: one after another, a handoff that waits out its timeout on
            // each of eight shards would outlast an orchestrator's grace period.
            let led: Vec<&Shard> = self.shards().iter().filter(|s| s.is_leader()).collect();
            if !led.is_empty() {
                let ids: Vec<u32> = led.iter().map(|s| s.id.0).collect();
                tracing::info!(shards = ?ids, "handing off leadership for shutdown");
                futures::future::join_all(led.into_iter().map(|s| self.hand_off(s))).await;
            }
            // An election this node is running may still make it a leader after the pass (a
            // stop right after a start, while the first elections settle): once it ends, look
            // again.
            let electing = self.shards().iter().any(|s| s.metrics().state == openraft::ServerState::Candidate);
            if !electing || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // poll the elections' end
        }
    }

    /// Moves `shard`'s leadership to another voter within [`HANDOFF_WITHIN`]: to the most
    /// caught-up one, once it holds the whole log (a target that lacks the leader's last entry
    /// ignores the transfer), and again — to it or the next — if it does not take over in time
    /// (a transfer can also be dropped while an election is under way, or a busy node answer
    /// late). Gives up at the deadline, or once no other voter has answered for
    /// [`HANDOFF_UNANSWERED`]: the survivors, if any, then elect a leader on their own.
    async fn hand_off(&self, shard: &Shard) {
        let started = tokio::time::Instant::now();
        let deadline = started + HANDOFF_WITHIN;
        let mut attempt = 0usize;
        while tokio::time::Instant::now() < deadline {
            let metrics = shard.metrics();
            if metrics.current_leader.is_some_and(|l| l != self.id()) {
                tracing::info!(shard = %shard.id, leader = ?metrics.current_leader, attempt, "leadership already moved at shutdown");
                return;
            }
            if started.elapsed() >= HANDOFF_UNANSWERED
                && !voter_answered_within(&metrics, self.id(), HANDOFF_UNANSWERED)
            {
                tracing::warn!(shard = %shard.id, attempt, "leadership not handed off: no other voter answers");
                return;
            }
            let last = metrics.last_log_index.unwrap_or(0);
            let mut voters: Vec<(NodeId, u64)> = metrics
                .membership_config
                .membership()
                .voter_ids()
                .filter(|v| *v != self.id())
                .map(|v| (v, matched_index(&metrics, v)))
                .collect();
            if voters.is_empty() {
                return;
            }
            voters.sort_by_key(|(_, matched)| std::cmp::Reverse(*matched));
            // The most caught-up voter first; on later attempts the others in turn.
            let (to, _) = voters[attempt % voters.len()];
            attempt += 1;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let _ = shard
                .raft
                .wait(Some(left.min(Duration::from_millis(500))))
                .metrics(|m| matched_index(m, to) >= last, "the handoff target holds the whole log")
                .await;
            if shard.raft.trigger().transfer_leader(to).await.is_err() {
                return; // Raft stopped.
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let moved = shard
                .raft
                .wait(Some(left.min(Duration::from_millis(1000))))
                .metrics(|m| m.current_leader.is_some_and(|l| l != self.id()), "leadership handed off")
                .await
                .is_ok();
            if moved {
                tracing::info!(shard = %shard.id, to = %to, attempt, "leadership handed off for shutdown");
                return;
            }
            tracing::debug!(shard = %shard.id, to = %to, attempt, "leadership handoff not taken yet; asking again");
        }
        tracing::warn!(shard = %shard.id, "leadership not handed off in time: the others will elect a leader");
    }
}

/// Whether a voter other than `me` acknowledged this leader within `within` (openraft notes
/// when each follower last answered an append or a heartbeat).
fn voter_answered_within(m: &openraft::RaftMetrics<TypeConfig>, me: NodeId, within: Duration) -> bool {
    let Some(answered) = m.heartbeat.as_ref() else { return false };
    m.membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != me)
        .any(|v| answered.get(&v).cloned().flatten().is_some_and(|at| openraft::Instant::elapsed(&*at) < within))
}

/// The last log index a leader knows `node` to hold (0 when it knows none).
fn matched_index(m: &openraft::RaftMetrics<TypeConfig>, node: NodeId) -> u64 {
    m.replication.as_ref().and_then(|r| r.get(&node).cloned().flatten()).map_or(0, |id| id.index)
}

/// Shards that a request names, or all of them.
pub fn shard_ids(node: &Node, ids: &[u32]) -> Vec<ShardId> {
    if ids.is_empty() {
        (0..node.shards().len() as u32).map(ShardId).collect()
    } else {
        ids.iter().copied().map(ShardId).collect()
    }
}

/// Whether a verified peer certificate names a member of some shard, as this node sees the
/// memberships. A node some shard of which has no member set yet (it is waiting to be added)
/// accepts any certificate of the cluster CA: the leader adding it reaches it before it knows
/// who the members are.
pub fn knows_peer(node: &Node, identity: &crate::tls::Identity) -> bool {
    node.shards().iter().any(|shard| {
        let metrics = shard.raft.metrics();
        let m = metrics.borrow_watched();
        let mut members = m.membership_config.membership().nodes().peekable();
        members.peek().is_none() || members.any(|(id, n)| identity.is(id.0, &n.peer_addr))
    })
}

/// Members of every shard with their addresses, as this node sees them.
pub fn members(node: &Node) -> BTreeMap<NodeId, VowNode> {
    let mut out = BTreeMap::new();
    for shard in node.shards() {
        let m = shard.metrics().membership_config;
        for (id, n) in m.membership().nodes() {
            out.insert(*id, n.clone());
        }
    }
    out
}

/// Finishes a membership change a leader started and did not complete. openraft changes
/// voters in two entries — a joint configuration (old and new voter sets), then the new set
/// alone — and writes the second only inside the call that wrote the first: a call dropped
/// between them, or a leadership lost there, leaves the shard joint. Its voters are then the
/// union of both sets, so "is node N a voter" says yes for a node halfway out; re-adding it
/// did nothing, and the next removal of another node dropped it for good (vow-jepsen seed
/// 25589: a replica left behind for ever). A no-op change is openraft's own second step: it
/// flattens the configuration to its last set before anything is decided from it.
async fn finish_joint(shard: &Shard) -> anyhow::Result<()> {
    let joint = shard.metrics().membership_config.membership().get_joint_config().len() > 1;
    if joint {
        shard.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::new()), false).await.map_err(|e| {
            membership_error(shard.id, format!("finishing a half-done change of shard {}", shard.id), e)
        })?;
        tracing::warn!(shard = %shard.id, "finished a membership change an earlier leader left half done");
    }
    Ok(())
}
