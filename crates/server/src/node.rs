//! A running vow node: opens storage and shards, serves gRPC and HTTP, runs the sweepers, and
//! shuts down gracefully. [`run`] is the entry point; it takes bound listeners and a shutdown
//! future, so tests run the real server on `127.0.0.1:0`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use openraft::ChangeMembers;
use openraft::errors::{ChangeMembershipError, ClientWriteError, RaftError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use vow_core::{Limits, NodeId, PromiseId, ShardId};

use crate::clock::{PeerClocks, WallClock};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::raft::{TypeConfig, VowNode};
use crate::shard::{Shard, ShardContext, ShardError};
use crate::storage::{self, NodeIdentity, log_store::WalFlusher};

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
    advertise_addr: String,
    shards: Arc<[Shard]>,
    peers: Peers,
    limits: Limits,
    metrics: Metrics,
    wall: WallClock,
    shutting_down: AtomicBool,
}

impl Node {
    pub fn id(&self) -> NodeId {
        self.inner.id
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

    pub fn shard_for(&self, id: &PromiseId) -> &Shard {
        let n = self.inner.shards.len() as u32;
        &self.inner.shards[ShardId::for_promise(id, n).0 as usize]
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

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Relaxed)
    }

    /// Proposes on `shard` if this node leads it, waiting briefly for an election when no
    /// leader is known. Returns `NotLeader` with the leader's address when another node leads.
    pub async fn write(&self, shard: &Shard, command: vow_core::Command) -> Result<vow_core::Outcome, ShardError> {
        if crate::sabotage::enabled("ack-before-commit") {
            return shard.predict_and_propose_in_background(command);
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
    pub async fn add_node(&self, id: NodeId, addr: &str, shards: &[ShardId]) -> anyhow::Result<Vec<(ShardId, String)>> {
        let mut elsewhere = Vec::new();
        for &sid in shards {
            let shard = self.shard(sid).with_context(|| format!("no shard {sid}"))?;
            if !shard.is_leader() {
                let (_, addr) = shard.wait_for_leader(LEADER_WAIT).await.ok_or(NoLeader(sid))?;
                if !shard.is_leader() {
                    elsewhere.push((sid, addr));
                    continue;
                }
            }
            let (voters, _) = shard.voters_and_learners();
            if voters.contains(&id) {
                continue;
            }
            shard
                .raft
                .add_learner(id, VowNode { grpc_addr: addr.to_owned() }, true)
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
                let (_, addr) = shard.wait_for_leader(LEADER_WAIT).await.ok_or(NoLeader(sid))?;
                if !shard.is_leader() {
                    elsewhere.push((sid, addr));
                    continue;
                }
            }
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
                let (_, addr) = shard.wait_for_leader(LEADER_WAIT).await.ok_or(NoLeader(sid))?;
                if !shard.is_leader() {
                    elsewhere.push((sid, addr));
                }
            }
        }
        Ok(elsewhere)
    }

    /// Moves every leadership this node holds to another voter, so that stopping it costs
    /// the cluster no election timeout.
    async fn hand_off_leadership(&self) {
        for shard in self.shards() {
            if !shard.is_leader() {
                continue;
            }
            let metrics = shard.metrics();
            let voters: Vec<NodeId> =
                metrics.membership_config.membership().voter_ids().filter(|v| *v != self.id()).collect();
            // The most caught-up voter takes over.
            let best = voters.iter().copied().max_by_key(|v| {
                metrics.replication.as_ref().and_then(|r| r.get(v).cloned().flatten()).map(|log_id| log_id.index)
            });
            let Some(to) = best else { continue };
            if shard.raft.trigger().transfer_leader(to).await.is_ok() {
                let moved = shard
                    .raft
                    .wait(Some(Duration::from_secs(3)))
                    .metrics(|m| m.current_leader.is_some_and(|l| l != self.id()), "leadership handed off")
                    .await;
                tracing::info!(shard = %shard.id, to = %to, ok = moved.is_ok(), "leadership handed off for shutdown");
            }
        }
    }
}

/// Listeners the node serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

/// Runs a node until `shutdown` completes, then stops gracefully: leaderships are handed off,
/// the servers drain, the Raft instances stop and the database is closed.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let db = storage::open(&config.data_dir.join("db"))
        .with_context(|| format!("opening RocksDB in {}", config.data_dir.display()))?;
    storage::check_identity(
        &db,
        &NodeIdentity { node_id: config.node_id.0, cluster_name: config.cluster_name.clone(), shards: config.shards },
    )?;
    let cluster_name: Arc<str> = config.cluster_name.clone().into();
    let peers = Peers::default();
    let wall = WallClock::with_offset(config.test_clock_offset_ms);
    if config.test_clock_offset_ms != 0 {
        tracing::warn!(
            offset_ms = config.test_clock_offset_ms,
            "TEST CLOCK: this node's wall clock runs off on purpose"
        );
    }
    let ctx = ShardContext {
        node_id: config.node_id,
        cluster_name: cluster_name.clone(),
        db: db.clone(),
        flusher: WalFlusher::spawn_with_failpoint(
            db.clone(),
            crate::sabotage::enabled("wal-fsync-failpoint").then(|| config.data_dir.join("fail-wal-fsync")),
        ),
        peers: peers.clone(),
        clocks: PeerClocks::new(wall),
        queue_bytes: Arc::new(tokio::sync::Semaphore::new(crate::shard::PROPOSAL_QUEUE_BYTES)),
        data_dir: config.data_dir.clone(),
        raft: config.raft.clone(),
    };
    let mut shards = Vec::new();
    for s in 0..config.shards {
        shards.push(Shard::open(&ctx, ShardId(s)).await.with_context(|| format!("opening shard {s}"))?);
    }
    let shards: Arc<[Shard]> = shards.into();
    let node = Node {
        inner: Arc::new(Inner {
            id: config.node_id,
            advertise_addr: config.advertise_addr.clone(),
            shards: shards.clone(),
            peers,
            limits: config.limits.clone(),
            metrics: Metrics::default(),
            wall,
            shutting_down: AtomicBool::new(false),
        }),
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let grpc = tokio::spawn(crate::api::serve(
        node.clone(),
        cluster_name,
        config.data_dir.clone(),
        listeners.grpc,
        wait_stop(stop_rx.clone()),
    ));
    let http = tokio::spawn(crate::http::serve(node.clone(), listeners.http, wait_stop(stop_rx.clone())));

    if !config.initial_members.is_empty() {
        let members: Vec<(NodeId, String)> = config.initial_members.iter().map(|(k, v)| (*k, v.clone())).collect();
        for shard in shards.iter() {
            shard.initialize_if_new(&members).await.with_context(|| format!("initialising shard {}", shard.id))?;
        }
    } else if !config.join.is_empty() {
        tokio::spawn(join_cluster(node.clone(), config.join.clone(), stop_rx.clone()));
    }
    let background: Vec<_> = shards
        .iter()
        .map(|s| tokio::spawn(crate::sweeper::run(s.clone(), config.retention, stop_rx.clone())))
        .chain(shards.iter().map(|s| tokio::spawn(s.clone().run_snapshot_policy(stop_rx.clone()))))
        .collect();
    tracing::info!(node = %config.node_id, grpc = %config.grpc_addr, http = %config.http_addr, shards = config.shards, "vowd started");
    for bug in ["stale-reads", "ack-before-commit", "skip-settled-check", "wal-fsync-failpoint"] {
        if crate::sabotage::enabled(bug) {
            tracing::warn!(bug, "SABOTAGED BUILD: deliberate consistency bug enabled");
        }
    }

    shutdown.await;
    tracing::info!(node = %config.node_id, "shutting down");
    node.inner.shutting_down.store(true, Ordering::Relaxed);
    node.hand_off_leadership().await;
    let _ = stop_tx.send(true);
    for s in background {
        let _ = s.await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    for shard in shards.iter() {
        let _ = shard.raft.shutdown().await;
    }
    // Applied changes still in memory, then the memtables, to disk, so the next start has
    // neither log entries nor WAL to replay (a crash still replays both).
    for shard in shards.iter() {
        if let Err(e) = shard.state.flush() {
            tracing::warn!(shard = %shard.id, error = %e, "writing applied state at shutdown failed; the next start re-applies it");
        }
    }
    if let Err(e) = storage::flush_all(&db) {
        tracing::warn!(error = %e, "flushing memtables at shutdown failed; the next start replays the WAL");
    }
    tracing::info!(node = %config.node_id, "stopped");
    Ok(())
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Asks the seeds to add this node until one succeeds (the cluster may be electing or busy).
async fn join_cluster(node: Node, seeds: Vec<String>, mut stop: watch::Receiver<bool>) {
    use vow_api::v1::cluster_client::ClusterClient;
    let req = vow_api::v1::AddNodeRequest {
        node_id: node.id().0,
        grpc_addr: node.advertise_addr().to_owned(),
        shard_ids: vec![],
        shard_count: node.shards().len() as u32,
    };
    let mut delay = Duration::from_millis(200);
    loop {
        for seed in &seeds {
            let Ok(channel) = node.peers().channel(seed) else { continue };
            let mut request = tonic::Request::new(req.clone());
            request.set_timeout(Duration::from_secs(60));
            match ClusterClient::new(channel).add_node(request).await {
                Ok(_) => {
                    tracing::info!(seed = %seed, "joined the cluster");
                    return;
                }
                // A refusal that retrying cannot fix (another shard count) is the operator's to see.
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                    tracing::error!(seed = %seed, error = %e.message(), "the cluster refuses this node")
                }
                Err(e) => tracing::warn!(seed = %seed, error = %e.message(), "join attempt failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {} // back off between rounds of join attempts
            _ = stop.wait_for(|s| *s) => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Shards that a request names, or all of them.
pub fn shard_ids(node: &Node, ids: &[u32]) -> Vec<ShardId> {
    if ids.is_empty() {
        (0..node.shards().len() as u32).map(ShardId).collect()
    } else {
        ids.iter().copied().map(ShardId).collect()
    }
}

/// Members of every shard with their addresses, as this node sees them.
pub fn members(node: &Node) -> BTreeMap<NodeId, String> {
    let mut out = BTreeMap::new();
    for shard in node.shards() {
        let m = shard.metrics().membership_config;
        for (id, n) in m.membership().nodes() {
            out.insert(*id, n.grpc_addr.clone());
        }
    }
    out
}
