//! One shard on this node: its Raft instance, a read handle on its state, and the channel
//! that announces settlements. Proposals and linearizable reads go through here, and come back
//! as domain outcomes or typed, retryable [`ShardError`]s.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::{ClientWriteError, Fatal, ForwardToLeader, LinearizableReadError, RaftError};
use openraft::raft::{WriteResponse, WriteResult};
use openraft::{RaftMetrics, ReadPolicy, ServerState};
use rocksdb::DB;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot, watch};
use vow_core::{Command, NodeId, Outcome, Proposal, ShardId};

use crate::clock::PeerClocks;
use crate::peers::Peers;
use crate::raft::Raft;
use crate::raft::network::NetworkFactory;
use vow_storage::log_store::{LogStore, WalFlusher};
use vow_storage::state_machine::{Announcement, ShardState, ShardStateMachine, SnapshotStats};
use vow_storage::types::{TypeConfig, VowNode};

/// Announcements (promise ids) buffered per shard before slow listeners lag (and re-read).
const SETTLED_CHANNEL: usize = 4096;
/// How often each replica checks whether its log has grown enough for a new snapshot.
const SNAPSHOT_CHECK_EVERY: Duration = Duration::from_millis(500);

/// Proposals one batch may carry. The batcher takes whatever is queued, up to this many.
const MAX_BATCH: usize = 256;
/// Proposals queued for a shard's batcher before `propose` waits.
const PROPOSAL_QUEUE: usize = 4096;
/// Bytes of proposals (by [`Proposal::size_hint`]) queued for the batchers of all shards of a
/// node before `propose` waits: 4,096 proposals of a few MiB each would otherwise be ~8 GiB.
pub const PROPOSAL_QUEUE_BYTES: usize = 256 << 20;
/// How long a leader may go without a quorum's acknowledgement, or a follower without word
/// from its leader, before the shard counts as out of touch ([`Shard::out_of_touch`]): many
/// heartbeats (100 ms) and a few election timeouts, so an election does not make it flap.
pub const LEADER_SILENCE: Duration = Duration::from_secs(3);

/// What became of one proposal: applied (with the state machine's outcome) or why not.
type WriteReply = Result<WriteResponse<TypeConfig>, NotWritten>;

/// Why a proposal has no outcome.
#[derive(Debug)]
enum NotWritten {
    /// openraft refused or gave up on it.
    Refused(ClientWriteError<TypeConfig>),
    /// The Raft core stopped before taking the batch: nothing of it was appended.
    NotSubmitted(String),
    /// The Raft core stopped with the entry in flight: it may still commit on the followers.
    InFlight(String),
}

/// How much batching happened on this replica: proposals handed to Raft, and in how many
/// batches (`/metrics`: `vow_shard_proposals_total`, `vow_shard_proposal_batches_total`).
#[derive(Debug, Default)]
pub struct BatchCounters {
    pub proposals: AtomicU64,
    pub batches: AtomicU64,
}

/// A proposal waiting for the batcher, with where its reply goes.
struct Pending {
    proposal: Proposal,
    reply: oneshot::Sender<WriteReply>,
    /// The proposal's share of [`PROPOSAL_QUEUE_BYTES`], given back when the batcher hands it
    /// to Raft.
    _queued: OwnedSemaphorePermit,
}

/// Hands every proposal queued since the last batch to openraft as one `client_write_many`:
/// one message to the Raft core, one log append, one AppendEntries per follower and one
/// apply call for the lot, instead of one of each per proposal. Under load the queue fills
/// while the previous batch is handed over, so batches grow with the load; a lone proposal
/// goes out at once. Ends when every `Shard` handle (the senders) is gone.
async fn run_batcher(raft: Raft, mut queue: mpsc::Receiver<Pending>, counters: Arc<BatchCounters>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Woken by the first proposal, let the request tasks that are ready run first and
        // queue theirs: this task would otherwise run right after each sender (tokio's LIFO
        // slot) and every batch would hold one proposal. With nothing else ready this returns
        // at once, so a lone proposal is not delayed.
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH
            && let Ok(pending) = queue.try_recv()
        {
            batch.push(pending);
        }
        // A caller that has gone (its client gave up and cancelled the call) was not told an
        // outcome, so leaving its proposal out is as true as carrying it out, and it keeps a
        // request that arrives late (after the client retried elsewhere) from acting late.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.proposals.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let (proposals, replies): (Vec<Proposal>, Vec<_>) = batch.drain(..).map(|p| (p.proposal, p.reply)).unzip();
        match raft.client_write_many(proposals.into_iter().map(Arc::new)).await {
            Ok(results) => {
                tokio::spawn(deliver(results, replies));
            }
            Err(fatal) => {
                // Refused at submission: the Raft core had stopped and took none of the batch.
                for reply in replies {
                    let _ = reply.send(Err(NotWritten::NotSubmitted(fatal.to_string())));
                }
            }
        }
    }
}

/// Sends a batch's replies to their callers, in submission order. The batch was handed to the
/// Raft core, so once the core stops (a storage error, a panic, shutdown) every entry not
/// answered yet may still be on the followers and commit there: its outcome is unknown. If the
/// stream ends early the remaining replies are dropped, which `propose` reports the same way.
async fn deliver(
    mut results: BoxStream<'static, Result<WriteResult<TypeConfig>, Fatal<TypeConfig>>>,
    replies: Vec<oneshot::Sender<WriteReply>>,
) {
    let mut stopped: Option<String> = None;
    for reply in replies {
        let result = match &stopped {
            Some(reason) => Err(NotWritten::InFlight(reason.clone())),
            None => match results.next().await {
                Some(Ok(written)) => written.map_err(NotWritten::Refused),
                Some(Err(fatal)) => {
                    let reason = fatal.to_string();
                    stopped = Some(reason.clone());
                    Err(NotWritten::InFlight(reason))
                }
                None => return,
            },
        };
        let _ = reply.send(result);
    }
}

/// Why a shard could not serve a request. Each variant says what the caller may do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShardError {
    /// This node does not lead the shard; retry at the leader, if one is known.
    #[error("node is not the leader of shard {shard}")]
    NotLeader { shard: ShardId, leader: Option<(NodeId, VowNode)> },
    /// Cannot serve now (no quorum, shutting down); retrying later may succeed. The request
    /// did not take effect.
    #[error("shard {shard} unavailable: {reason}")]
    Unavailable { shard: ShardId, reason: String },
    /// The write was proposed but its fate is unknown; retry with the same idempotency key.
    #[error("outcome unknown on shard {shard}: {reason}")]
    OutcomeUnknown { shard: ShardId, reason: String },
    /// Storage failed; the shard has stopped.
    #[error("shard {shard} stopped: {reason}")]
    Fatal { shard: ShardId, reason: String },
}

/// Tunables of a shard's Raft instance.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log) after this many applied entries, or after a quarter
    /// of the last snapshot's record count if that is more (see [`Shard::run_snapshot_policy`]).
    pub snapshot_logs: u64,
}

impl Default for RaftOptions {
    fn default() -> Self {
        RaftOptions {
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            // etcd's default --snapshot-count: a snapshot rewrites the whole state, and every
            // 20,000 entries cost ~10% of each replica's CPU under load.
            snapshot_logs: 100_000,
        }
    }
}

/// Everything a shard needs from its node to start.
#[derive(Debug, Clone)]
pub struct ShardContext {
    pub node_id: NodeId,
    pub cluster_name: Arc<str>,
    pub db: Arc<DB>,
    pub flusher: WalFlusher,
    pub peers: Peers,
    /// This node's clock and its peers' readings, for bounded proposal stamps.
    pub clocks: PeerClocks,
    /// This node's and its peers' incarnations, checked on every Raft message.
    pub incarnations: crate::incarnation::Incarnations,
    /// [`PROPOSAL_QUEUE_BYTES`], shared by the node's shards.
    pub queue_bytes: Arc<Semaphore>,
    pub data_dir: PathBuf,
    pub raft: RaftOptions,
}

/// A cheap, cloneable handle on one shard of this node.
#[derive(Clone)]
pub struct Shard {
    pub id: ShardId,
    pub raft: Raft,
    pub state: ShardState,
    announce: broadcast::Sender<Announcement>,
    proposals: mpsc::Sender<Pending>,
    pub batching: Arc<BatchCounters>,
    node_id: NodeId,
    clocks: PeerClocks,
    queue_bytes: Arc<Semaphore>,
    snapshot_logs: u64,
    snapshots: Arc<SnapshotStats>,
    /// When a leader's append or snapshot last reached this replica ([`Shard::leader_heard`]).
    leader_contact: Arc<AtomicU64>,
}

/// Milliseconds since this process started: a monotonic clock an atomic can hold.
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).finish()
    }
}

/// The share of [`PROPOSAL_QUEUE_BYTES`] a proposal takes while queued: its size, but never
/// more than the whole (one proposal alone always fits).
fn queue_permits(proposal: &Proposal) -> u32 {
    proposal.size_hint().min(PROPOSAL_QUEUE_BYTES) as u32
}

/// Whether a replica that applied up to `applied` and last snapshotted at `snapshotted` should
/// build a snapshot, given the configured floor and the last snapshot's record count.
fn snapshot_due(applied: u64, snapshotted: u64, floor: u64, records: u64) -> bool {
    applied.saturating_sub(snapshotted) >= floor.max(records / 4)
}

impl Shard {
    pub async fn open(ctx: &ShardContext, id: ShardId) -> anyhow::Result<Shard> {
        let (announce, _) = broadcast::channel(SETTLED_CHANNEL);
        let snapshot_dir = ctx.data_dir.join("snapshots").join(format!("shard-{}", id.0));
        let sm = ShardStateMachine::open(ctx.db.clone(), id, snapshot_dir, announce.clone())?;
        let state = sm.reader();
        let snapshots = sm.snapshots();
        let log = LogStore::new(ctx.db.clone(), id, ctx.flusher.clone());
        let config = openraft::Config {
            cluster_name: format!("{}-shard-{}", ctx.cluster_name, id.0),
            heartbeat_interval: ctx.raft.heartbeat_ms,
            election_timeout_min: ctx.raft.election_timeout_min_ms,
            election_timeout_max: ctx.raft.election_timeout_max_ms,
            // Snapshots are triggered by `run_snapshot_policy`, which scales with the state.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: 1000.min(ctx.raft.snapshot_logs),
            install_snapshot_timeout: 10_000,
            // Replicate an entry as soon as it is written locally, so the leader's fsync and the
            // followers' run in parallel instead of one after the other (measured with vow bench).
            broadcast_submitted_on_append: Some(true),
            // A node that was cut off asks before it raises its term: otherwise its higher term
            // deposes the leader of every shard when it returns (with 8 shards, ~1.5 s with no
            // leader on most of them after each heal in vow-jepsen runs).
            enable_pre_vote: Some(true),
            // A restarted leader must win a new election, not resume its old term. Resuming it
            // (openraft's default) together with replicating before the local fsync (above)
            // let two different entries carry one log id: the leader sent entry i to the
            // followers, which made it durable, while its own copy was still unsynced; killed
            // and restarted, it resumed the same term with a log ending before i and proposed
            // another entry at i. The followers already "had" (term, i) and kept theirs, and
            // the replicas diverged — vow-jepsen found it with every node killed at once
            // (`a_restarted_leader_starts_a_new_term`).
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()?;
        let network = NetworkFactory {
            peers: ctx.peers.clone(),
            shard: id,
            cluster_name: ctx.cluster_name.clone(),
            clocks: ctx.clocks.clone(),
            incarnations: ctx.incarnations.clone(),
        };
        let raft = Raft::new(ctx.node_id, Arc::new(config), network, log, sm).await?;
        let (proposals, queue) = mpsc::channel(PROPOSAL_QUEUE);
        let batching = Arc::new(BatchCounters::default());
        tokio::spawn(run_batcher(raft.clone(), queue, batching.clone()));
        Ok(Shard {
            id,
            raft,
            state,
            announce,
            proposals,
            batching,
            node_id: ctx.node_id,
            clocks: ctx.clocks.clone(),
            queue_bytes: ctx.queue_bytes.clone(),
            snapshot_logs: ctx.raft.snapshot_logs,
            snapshots,
            leader_contact: Arc::new(AtomicU64::new(monotonic_ms())),
        })
    }

    /// The newest snapshot of this replica: its size, and an observer of each one built or
    /// installed.
    pub fn snapshots(&self) -> &SnapshotStats {
        &self.snapshots
    }

    /// Notes that a leader's append or snapshot reached this replica just now (or that the
    /// shard has a new leader, see [`Shard::note_leader_changes`]).
    pub fn leader_heard(&self) {
        self.leader_contact.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// Counts every change of the shard's leader in `changes` (`/metrics`), and as contact
    /// with the leader, until `stop`: an election is a quorum's contact. For a node elected
    /// leader it is the last contact it had with a quorum until one acknowledges its appends —
    /// and if none ever does (its voters died right after the election), the silence since the
    /// election is what [`Shard::out_of_touch`] measures.
    pub async fn note_leader_changes(self, changes: metrics::Counter, mut stop: watch::Receiver<bool>) {
        let mut metrics = self.raft.server_metrics();
        let mut leader = metrics.borrow_watched().current_leader;
        loop {
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = metrics.borrow_and_update().current_leader;
            if now != leader {
                leader = now;
                changes.increment(1);
                self.leader_heard();
            }
        }
    }

    /// How long since a leader's append or snapshot last reached this replica (or since start).
    pub fn since_leader_heard(&self) -> std::time::Duration {
        std::time::Duration::from_millis(monotonic_ms().saturating_sub(self.leader_contact.load(Ordering::Relaxed)))
    }

    /// How long the shard's leader and a quorum have been out of touch, as far as this replica
    /// can tell, if that is longer than [`LEADER_SILENCE`]: this node leads the shard and no
    /// quorum acknowledged it lately, or it follows a leader whose appends stopped reaching it.
    /// `None` while in touch, and with a single voter (nobody to be cut off from).
    pub fn out_of_touch(&self) -> Option<Duration> {
        let m = self.metrics();
        if m.membership_config.membership().voter_ids().count() <= 1 {
            return None;
        }
        let silence = match (m.state, m.last_quorum_acked.as_ref()) {
            (ServerState::Leader, Some(acked)) => openraft::Instant::elapsed(&**acked),
            // Elected, and no quorum acknowledged an append since: silent since the election
            // (see `note_leader_changes`). Before, such a leader counted as in touch for ever.
            _ => self.since_leader_heard(),
        };
        (silence > LEADER_SILENCE).then_some(silence)
    }

    /// Builds a snapshot (after which openraft purges the log behind it) whenever the entries
    /// applied since the last one reach `max(snapshot_logs, records / 4)`, until `stop`. The
    /// floor bounds the log of a small shard; the proportional part bounds what snapshots cost
    /// per write on a large one: rewriting all of a 1M-promise shard (~330 MB) every 20,000
    /// entries, as a fixed policy did, halved the write throughput.
    pub async fn run_snapshot_policy(self, mut stop: watch::Receiver<bool>) {
        let mut check = tokio::time::interval(SNAPSHOT_CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = check.tick() => {}
            }
            let m = self.metrics();
            let applied = m.last_applied.map_or(0, |id| id.index);
            let snapshotted = m.snapshot.map_or(0, |id| id.index);
            let records = self.snapshots.records();
            if snapshot_due(applied, snapshotted, self.snapshot_logs, records)
                && let Err(e) = self.raft.trigger().snapshot().await
            {
                tracing::debug!(shard = %self.id, error = %e, "snapshot policy stops: raft stopped");
                return;
            }
        }
    }

    /// The time to stamp on a proposal now: this node's clock, unless a majority of the shard's
    /// voters' clocks read earlier (see [`crate::clock`]).
    pub fn stamp_ms(&self) -> i64 {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        self.clocks.bound(self.node_id, m.membership_config.membership().voter_ids())
    }

    /// Subscribes to what this replica applies from now on that waiters care about: settled
    /// promises, and the replacement of the whole state by a snapshot.
    pub fn subscribe(&self) -> broadcast::Receiver<Announcement> {
        self.announce.subscribe()
    }

    /// Initialises the shard with `members` as voters if it has never been initialised.
    pub async fn initialize_if_new(&self, members: &[(NodeId, VowNode)]) -> anyhow::Result<()> {
        if self.raft.is_initialized().await? {
            return Ok(());
        }
        let nodes: std::collections::BTreeMap<NodeId, VowNode> =
            members.iter().map(|(id, node)| (*id, node.clone())).collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            // Another initial member initialised first and we already heard from it.
            Err(RaftError::APIError(openraft::errors::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Proposes `command`, stamped with this node's clock, and waits for it to be applied.
    /// Concurrent proposals go to Raft together (see [`run_batcher`]).
    pub async fn propose(&self, command: Command) -> Result<Outcome, ShardError> {
        let (reply, replied) = oneshot::channel();
        let proposal = Proposal { stamp_ms: self.stamp_ms(), command };
        let Ok(queued) = self.queue_bytes.clone().acquire_many_owned(queue_permits(&proposal)).await else {
            return Err(ShardError::Unavailable { shard: self.id, reason: "shard is shutting down".into() });
        };
        let pending = Pending { proposal, reply, _queued: queued };
        if self.proposals.send(pending).await.is_err() {
            return Err(ShardError::Unavailable { shard: self.id, reason: "shard is shutting down".into() });
        }
        let Ok(result) = replied.await else {
            return Err(ShardError::OutcomeUnknown { shard: self.id, reason: "shard stopped before replying".into() });
        };
        let shard = self.id;
        match result {
            // The entry was applied; only its reply is missing.
            Ok(written) => written.response.0.ok_or_else(|| ShardError::OutcomeUnknown {
                shard,
                reason: "state machine returned no outcome for a command".into(),
            }),
            Err(NotWritten::Refused(ClientWriteError::ForwardToLeader(f))) => Err(self.not_leader(&f)),
            Err(NotWritten::Refused(ClientWriteError::LogEntryDiscarded(f))) => Err(ShardError::OutcomeUnknown {
                shard,
                reason: format!("leadership changed before the entry committed (new leader {:?})", f.leader_id),
            }),
            Err(NotWritten::Refused(e)) => Err(ShardError::Unavailable { shard, reason: e.to_string() }),
            Err(NotWritten::NotSubmitted(reason)) => {
                Err(ShardError::Unavailable { shard, reason: format!("shard stopped: {reason}") })
            }
            Err(NotWritten::InFlight(reason)) => Err(ShardError::OutcomeUnknown {
                shard,
                reason: format!("shard stopped with the write in flight: {reason}"),
            }),
        }
    }

    /// Sabotage only (`ack-before-commit`): the outcome the command would have on this
    /// replica's current state, returned before the command is even proposed.
    pub fn predict_and_propose_in_background(&self, command: Command) -> Result<Outcome, ShardError> {
        let proposal = Proposal { stamp_ms: self.stamp_ms(), command: command.clone() };
        let predicted = vow_core::apply(&self.state, 0, 0, &proposal)
            .map_err(|e| ShardError::Fatal { shard: self.id, reason: e.to_string() })?;
        let shard = self.clone();
        tokio::spawn(async move { shard.propose(command).await });
        Ok(predicted.outcome)
    }

    /// Returns once this replica's state reflects every write committed before the call
    /// (ReadIndex through the leader). Only the leader can do this.
    pub async fn read_barrier(&self) -> Result<(), ShardError> {
        if crate::sabotage::enabled("read-index-without-heartbeat") && self.is_leader() {
            // The bug: take this replica's own belief that it leads as proof, with no heartbeat
            // round to a majority. A leader cut off from the others keeps answering reads from
            // a state the new leader's writes have moved past.
            return self.wait_applied_to_local_commit().await;
        }
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => Err(self.not_leader(&f)),
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q))) => {
                Err(ShardError::Unavailable { shard: self.id, reason: q.to_string() })
            }
            Err(RaftError::Fatal(e)) => Err(ShardError::Fatal { shard: self.id, reason: e.to_string() }),
        }
    }

    /// Waits until this replica has applied what it knows committed (the sabotaged read
    /// barrier's only step).
    async fn wait_applied_to_local_commit(&self) -> Result<(), ShardError> {
        let committed = self.metrics().local_committed.map_or(0, |id| id.index);
        let applied = |m: &RaftMetrics<TypeConfig>| m.last_applied.map_or(0, |id| id.index) >= committed;
        self.raft
            .wait(Some(Duration::from_secs(5)))
            .metrics(applied, "applied up to the local commit")
            .await
            .map(|_| ())
            .map_err(|e| ShardError::Unavailable { shard: self.id, reason: e.to_string() })
    }

    fn not_leader(&self, f: &ForwardToLeader<TypeConfig>) -> ShardError {
        let leader = match (&f.leader_id, &f.leader_node) {
            (Some(id), Some(node)) => Some((*id, node.clone())),
            (Some(id), None) => self.member(*id).map(|n| (*id, n)),
            _ => None,
        };
        ShardError::NotLeader { shard: self.id, leader }
    }

    /// Completes when this shard's Raft has stopped on a fatal error — a log write or fsync that
    /// failed, a panic in its core — with the error in words; pending while the shard runs.
    ///
    /// It watches the server metrics, which change only with the role, leader, vote or
    /// membership. The full metrics are published again on every turn of the Raft core's loop,
    /// several times per batch, and each publication woke every task waiting on them: with three
    /// such watchers per shard (this one on the runtime's main thread) that was a few thread
    /// wake-ups per batch doing nothing. Both channels close when the core's task ends, after
    /// its last full metrics say whether it failed.
    pub async fn fatal_error(&self) -> String {
        let mut server = self.raft.server_metrics();
        let fatal = || self.raft.metrics().borrow_watched().running_state.as_ref().err().map(|e| e.to_string());
        loop {
            if let Some(reason) = fatal() {
                return reason;
            }
            if server.changed().await.is_err() {
                // The core is gone. Without a fatal error it was a shutdown, not a failure.
                return match fatal() {
                    Some(reason) => reason,
                    None => std::future::pending().await,
                };
            }
        }
    }

    /// A copy of the shard's current Raft metrics.
    pub fn metrics(&self) -> RaftMetrics<TypeConfig> {
        self.raft.metrics().borrow_watched().clone()
    }

    /// A member's addresses, from the current membership.
    pub fn member(&self, id: NodeId) -> Option<VowNode> {
        let m = self.metrics().membership_config;
        m.membership().get_node(&id).cloned()
    }

    /// The current leader and its addresses, as this replica believes.
    pub fn leader(&self) -> Option<(NodeId, VowNode)> {
        let m = self.metrics();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// Waits up to `timeout` for this replica to know a leader.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<(NodeId, VowNode)> {
        let _ = self.raft.wait(Some(timeout)).metrics(|m| m.current_leader.is_some(), "a known leader").await;
        self.leader()
    }

    pub fn voters_and_learners(&self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let m = self.metrics().membership_config;
        (m.membership().voter_ids().collect(), m.membership().learner_ids().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::snapshot_due;

    #[test]
    fn snapshots_come_after_the_floor_or_a_quarter_of_the_state() {
        // A small state: the floor decides.
        assert!(!snapshot_due(19_999, 0, 20_000, 1_000));
        assert!(snapshot_due(20_000, 0, 20_000, 1_000));
        assert!(snapshot_due(45_000, 25_000, 20_000, 0));
        // Two million records (a million promises): every 500,000 entries, not every 20,000.
        assert!(!snapshot_due(1_499_999, 1_000_000, 20_000, 2_000_000));
        assert!(snapshot_due(1_500_000, 1_000_000, 20_000, 2_000_000));
        // A snapshot newer than what is applied (just installed) is never due.
        assert!(!snapshot_due(10, 500, 20_000, 0));
    }
}
