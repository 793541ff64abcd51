//! The node's HTTP port: the endpoints for operators (`/livez`, `/readyz`, `/metrics` in
//! Prometheus text) and the public HTTP/JSON gateway under `/v1/` ([`crate::gateway`]).

use std::fmt::Write;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use openraft::ServerState;
use tokio::net::TcpListener;

use crate::api::{PromisesApi, Security};
use crate::auth::{ApiGate, GateLayer, Protocol};
use crate::conn::{self, AxumListener};
use crate::node::Node;

pub async fn serve(
    node: Node,
    api: Arc<PromisesApi>,
    listener: TcpListener,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // A JSON body carries data as base64 (4/3 of the bytes) and field names around it.
    let max_body = node.limits().max_command_bytes().saturating_mul(3) / 2 + (64 << 10);
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(node)
        .merge(crate::gateway::router(api, max_body))
        .layer(GateLayer::new(ApiGate { tokens: security.tokens.clone(), protocol: Protocol::Http }));
    let local = listener.local_addr()?;
    let tls = security.tls.as_ref().map(|t| t.http_server.clone());
    let connections = AxumListener::new(conn::accept(listener, conn::Listener::Http, tls), local);
    axum::serve(connections, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// Ready when this node is a member of every shard, every shard has a leader, and this
/// replica has applied everything it knows to be committed.
async fn readyz(State(node): State<Node>) -> (StatusCode, String) {
    if node.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    let mut problems = String::new();
    for shard in node.shards() {
        let m = shard.metrics();
        let member = m.membership_config.membership().get_node(&node.id()).is_some();
        if !member {
            let _ = writeln!(problems, "shard {}: not a member yet", shard.id);
        } else if m.current_leader.is_none() {
            let _ = writeln!(problems, "shard {}: no leader", shard.id);
        } else if m.last_applied.map(|l| l.index) < m.local_committed.map(|c| c.index) {
            let _ = writeln!(problems, "shard {}: catching up", shard.id);
        }
    }
    if problems.is_empty() { (StatusCode::OK, "ready\n".into()) } else { (StatusCode::SERVICE_UNAVAILABLE, problems) }
}

async fn metrics(State(node): State<Node>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE vow_shard_is_leader gauge");
    for shard in node.shards() {
        let m = shard.metrics();
        let labels = format!("node=\"{}\",shard=\"{}\"", node.id(), shard.id);
        let _ = writeln!(out, "vow_shard_is_leader{{{labels}}} {}", u8::from(m.state == ServerState::Leader));
        let _ = writeln!(out, "vow_shard_term{{{labels}}} {}", m.current_term);
        let _ = writeln!(out, "vow_shard_leader_id{{{labels}}} {}", m.current_leader.map_or(0, |l| l.0));
        let _ = writeln!(out, "vow_shard_last_log_index{{{labels}}} {}", m.last_log_index.unwrap_or(0));
        let _ = writeln!(out, "vow_shard_commit_index{{{labels}}} {}", m.local_committed.map_or(0, |c| c.index));
        let _ = writeln!(out, "vow_shard_applied_index{{{labels}}} {}", m.last_applied.map_or(0, |a| a.index));
        let _ = writeln!(out, "vow_shard_snapshot_index{{{labels}}} {}", m.snapshot.map_or(0, |s| s.index));
        let _ = writeln!(out, "vow_shard_purged_index{{{labels}}} {}", m.purged.map_or(0, |p| p.index));
        let proposals = shard.batching.proposals.load(Ordering::Relaxed);
        let _ = writeln!(out, "vow_shard_proposals_total{{{labels}}} {proposals}");
        let batches = shard.batching.batches.load(Ordering::Relaxed);
        let _ = writeln!(out, "vow_shard_proposal_batches_total{{{labels}}} {batches}");
    }
    // One WAL and one flusher for all shards: syncs grow slower than appends when shards share them.
    let _ = writeln!(out, "# TYPE vow_wal_appends_synced_total counter");
    let _ = writeln!(out, "vow_wal_appends_synced_total{{node=\"{}\"}} {}", node.id(), node.flusher().appends_synced());
    let _ = writeln!(out, "# TYPE vow_wal_syncs_total counter");
    let _ = writeln!(out, "vow_wal_syncs_total{{node=\"{}\"}} {}", node.id(), node.flusher().syncs());
    node.metrics().render(&mut out);
    out
}
