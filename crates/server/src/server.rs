//! A vowd process from start to stop: opens storage and shards, serves gRPC and HTTP, runs the
//! background tasks (sweepers, snapshot policy, leader balancing), joins a cluster if asked,
//! and shuts down gracefully. [`run`] is the entry point; it takes bound listeners and a
//! shutdown future, so tests run the real server on `127.0.0.1:0`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use vow_core::{NodeId, ShardId};

use crate::api::{PromisesApi, Security};
use crate::auth::ApiTokens;
use crate::clock::{PeerClocks, WallClock};
use crate::config::Config;
use crate::executor::Executor;
use crate::functions::Functions;
use crate::incarnation::Incarnations;
use crate::node::{Node, NodeParts};
use crate::peers::Peers;
use crate::router::Router;
use crate::shard::{Shard, ShardContext};
use crate::tls::NodeTls;
use vow_storage::log_store::{Failpoints, WalFlusher};
use vow_storage::types::VowNode;
use vow_storage::{self as storage, NodeIdentity};

/// Listeners the node serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The public gRPC API.
    pub grpc: TcpListener,
    /// Probes, metrics and the HTTP/JSON gateway.
    pub http: TcpListener,
    /// Other nodes: Raft, routed requests, joining.
    pub peer: TcpListener,
}

/// How long a stopping node's public servers (gRPC, HTTP) give calls under way to finish.
const CLIENT_DRAIN: Duration = Duration::from_secs(5);
/// How long its peer server waits for the other nodes' streams (see where it is used).
const PEER_DRAIN: Duration = Duration::from_millis(500);

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
    let security = Security {
        tls: config.tls.as_ref().map(NodeTls::load).transpose().context("loading TLS certificates")?,
        tokens: config.auth_file.as_deref().map(ApiTokens::from_file).transpose().context("loading API tokens")?,
    };
    let peers = Peers::new(security.tls.as_ref().map(|t| t.peer_client.clone()));
    let incarnations = Incarnations::open(config.node_id, db.clone()).context("reading this node's incarnation")?;
    let wall = WallClock::with_offset(config.test_clock_offset_ms);
    if config.test_clock_offset_ms != 0 {
        tracing::warn!(
            offset_ms = config.test_clock_offset_ms,
            "TEST CLOCK: this node's wall clock runs off on purpose"
        );
    }
    let flusher = WalFlusher::spawn_with_failpoints(
        db.clone(),
        Failpoints {
            fail: crate::sabotage::enabled("wal-fsync-failpoint").then(|| config.data_dir.join("fail-wal-fsync")),
            stall: crate::sabotage::enabled("wal-fsync-stall").then(|| config.data_dir.join("stall-wal-fsync")),
        },
    );
    let ctx = ShardContext {
        node_id: config.node_id,
        cluster_name: cluster_name.clone(),
        db: db.clone(),
        flusher: flusher.clone(),
        peers: peers.clone(),
        clocks: PeerClocks::new(wall),
        incarnations: incarnations.clone(),
        queue_bytes: Arc::new(tokio::sync::Semaphore::new(crate::shard::PROPOSAL_QUEUE_BYTES)),
        data_dir: config.data_dir.clone(),
        raft: config.raft.clone(),
    };
    let mut shards = Vec::new();
    for s in 0..config.shards {
        shards.push(Shard::open(&ctx, ShardId(s)).await.with_context(|| format!("opening shard {s}"))?);
    }
    let shards: Arc<[Shard]> = shards.into();
    let node = Node::new(NodeParts {
        id: config.node_id,
        cluster_name: config.cluster_name.clone(),
        advertise_addr: config.advertise_addr.clone(),
        shards: shards.clone(),
        peers,
        limits: config.limits.clone(),
        wall,
        flusher,
        incarnations,
    });
    node.flusher().observe_syncs(node.metrics().wal_synced());
    for shard in node.shards() {
        shard.snapshots().observe(node.metrics().snapshot_done());
    }
    let router = Router::new(node.clone());
    // A function's answer becomes a promise value: no bigger than the limits allow.
    let functions = Functions::new(config.limits.max_data_bytes);
    let keys = config.completion_keys.load().context("loading the completion-token keys")?;
    let executor = Executor::new(router.clone(), functions.clone(), keys.clone());
    let promises_api =
        Arc::new(PromisesApi::new(router.clone(), functions, keys, config.retention, security.tokens.is_some()));

    let (stop_tx, stop_rx) = watch::channel(false);
    let grpc = {
        let (router, api, security, stop) = (router.clone(), promises_api.clone(), security.clone(), stop_rx.clone());
        tokio::spawn(
            async move { crate::api::serve_public(router, api, listeners.grpc, &security, wait_stop(stop)).await },
        )
    };
    let peer = {
        let (data_dir, security, stop) = (config.data_dir.clone(), security.clone(), stop_rx.clone());
        tokio::spawn(async move {
            crate::api::serve_peer(router, data_dir, listeners.peer, &security, wait_stop(stop)).await
        })
    };
    let http = tokio::spawn(crate::http::serve(
        node.clone(),
        promises_api,
        listeners.http,
        security.clone(),
        wait_stop(stop_rx.clone()),
    ));

    if !config.initial_members.is_empty() {
        let members: Vec<(NodeId, VowNode)> = config.initial_members.iter().map(|(k, v)| (*k, v.clone())).collect();
        for shard in shards.iter() {
            shard.initialize_if_new(&members).await.with_context(|| format!("initialising shard {}", shard.id))?;
        }
    } else if !config.join.is_empty() {
        tokio::spawn(join_cluster(
            node.clone(),
            config.join.clone(),
            config.advertise_peer_addr.clone(),
            stop_rx.clone(),
        ));
    }
    let mut background: Vec<_> = shards
        .iter()
        .map(|s| tokio::spawn(crate::sweeper::run(s.clone(), config.retention, stop_rx.clone())))
        .chain(shards.iter().map(|s| tokio::spawn(s.clone().run_snapshot_policy(stop_rx.clone()))))
        .chain(shards.iter().map(|s| {
            tokio::spawn(s.clone().note_leader_changes(node.metrics().leader_changes(s.id.0), stop_rx.clone()))
        }))
        .chain(shards.iter().map(|s| tokio::spawn(executor.clone().run(s.clone(), stop_rx.clone()))))
        .collect();
    if config.balance_leaders {
        background.push(tokio::spawn(crate::balance::run(node.clone(), stop_rx.clone())));
    }
    background.push(tokio::spawn(crate::http::keep_metrics(node.clone(), stop_rx.clone())));
    background.push(tokio::spawn(forget_removed_members(node.clone(), stop_rx.clone())));
    tracing::info!(
        node = %config.node_id,
        grpc = %config.grpc_addr,
        peer = %config.peer_addr,
        http = %config.http_addr,
        shards = config.shards,
        tls = security.tls.is_some(),
        api_tokens = security.tokens.is_some(),
        "vowd started"
    );
    for bug in [
        "stale-reads",
        "ack-before-commit",
        "skip-settled-check",
        "wal-fsync-failpoint",
        "wal-fsync-stall",
        "read-index-without-heartbeat",
        "ack-before-fsync",
        "drop-snapshot-announcements",
        "refuse-writes",
    ] {
        if crate::sabotage::enabled(bug) {
            tracing::warn!(bug, "SABOTAGED BUILD: deliberate consistency bug enabled");
        }
    }

    // Crash-only on a storage failure: after a failed write or fsync nothing says what the disk
    // holds (the page cache may have dropped the data it failed to write), so the node stops at
    // once — without handing off leadership or flushing — and its next start recovers from what
    // is durable, once the disk is sound again. A node left running with stopped shards would
    // only answer errors.
    let failure =
        futures::future::select_all(shards.iter().map(|s| Box::pin(async move { (s.id, s.fatal_error().await) })));
    tokio::select! {
        () = shutdown => {}
        ((shard, reason), _, _) = failure => {
            tracing::error!(%shard, error = %reason, "storage failed: stopping this node; restart it once the disk is sound");
            return Err(StorageFailed { shard, reason }.into());
        }
    }
    tracing::info!(node = %config.node_id, "shutting down");
    node.begin_shutdown();
    node.hand_off_leadership().await;
    let _ = stop_tx.send(true);
    for s in background {
        let _ = s.await;
    }
    // The three servers drain together: the grace period an orchestrator gives covers one
    // drain, not three in a row. Client calls get [`CLIENT_DRAIN`] to finish. The peer port
    // gets much less: with leadership handed off it serves only the other leaders' replication
    // streams, which never end by themselves (waiting for them made every stop take the whole
    // drain) and which they resume with the next leader of nothing here.
    let timeout = tokio::time::timeout;
    let _ = futures::future::join3(timeout(CLIENT_DRAIN, grpc), timeout(CLIENT_DRAIN, http), timeout(PEER_DRAIN, peer))
        .await;
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

/// Why [`run`] ended without being asked to: a shard's storage failed. `vowd` exits with
/// [`StorageFailed::EXIT_CODE`] for it.
#[derive(Debug, thiserror::Error)]
#[error("storage of shard {shard} failed: {reason}")]
pub struct StorageFailed {
    pub shard: ShardId,
    pub reason: String,
}

impl StorageFailed {
    /// `EX_IOERR` from sysexits.h.
    pub const EXIT_CODE: u8 = 74;
}

/// Twice a second, forgets the incarnations of nodes that are no longer a member of any
/// shard, so that a replaced node can be added again (see [`crate::incarnation`]). Not before
/// every shard knows its membership: a node still starting must not forget everyone.
async fn forget_removed_members(node: Node, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut members = std::collections::BTreeSet::new();
        let mut every_shard_knows = true;
        for shard in node.shards() {
            let m = shard.metrics();
            members.extend(m.membership_config.membership().nodes().map(|(id, _)| id.0));
            every_shard_knows &= m.membership_config.membership().nodes().next().is_some();
        }
        if every_shard_knows {
            node.incarnations().retain(&members);
        }
    }
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Asks the seeds (their peer ports) to add this node until one succeeds (the cluster may be electing or busy).
async fn join_cluster(node: Node, seeds: Vec<String>, advertise_peer_addr: String, mut stop: watch::Receiver<bool>) {
    use vow_api::v1::cluster_client::ClusterClient;
    let req = vow_api::v1::AddNodeRequest {
        node_id: node.id().0,
        grpc_addr: node.advertise_addr().to_owned(),
        shard_ids: vec![],
        shard_count: node.shards().len() as u32,
        peer_addr: advertise_peer_addr,
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
