//! The node's HTTP port: the endpoints for operators (`/livez`, `/readyz`, `/metrics` in
//! Prometheus text) and the public HTTP/JSON gateway under `/v1/` ([`crate::gateway`]).

use std::fmt::Write;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use openraft::ServerState;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::api::{PromisesApi, Security};
use crate::auth::{ApiGate, GateLayer, Protocol};
use crate::conn::{self, Conn};
use crate::metrics::ShardGauges;
use crate::node::Node;

/// How long a client may take to send a request's head, counted from when the server starts
/// waiting for it — so also how long a kept-alive connection may sit idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connections may take to finish their requests once the node shuts down.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

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
    let tls = security.tls.as_ref().map(|t| t.http_server.clone());
    serve_connections(conn::accept(listener, conn::Listener::Http, tls), app, shutdown).await;
    Ok(())
}

/// Serves HTTP/1.1 on each accepted connection until `shutdown`, then lets the open requests
/// finish for up to [`DRAIN_TIMEOUT`]. Each connection has [`HEADER_READ_TIMEOUT`] to send a
/// request's head (hyper enforces it only with a timer, which `axum::serve` does not give it:
/// that is why this loop is ours).
async fn serve_connections(mut conns: mpsc::Receiver<Conn>, app: Router, shutdown: impl Future<Output = ()>) {
    // Each connection's task holds a receiver; the sender sees them all dropped once they end.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            c = conns.recv() => match c { Some(c) => c, None => break },
            () = &mut shutdown => break,
        };
        tokio::spawn(serve_connection(conn, app.clone(), stop_rx.clone()));
    }
    drop(conns);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, stop_tx.closed()).await;
}

async fn serve_connection(conn: Conn, app: Router, mut stop: watch::Receiver<bool>) {
    let info = conn.info().clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        // As tonic does on the gRPC ports: the auth gate reads the connection from here.
        request.extensions_mut().insert(info.clone());
        tower_service::Service::call(&mut app.clone(), request)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(conn), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        r = connection.as_mut() => r,
        () = async { let _ = stop.wait_for(|s| *s).await; } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Ready when this node is a member of every shard, every shard has a leader that is in
/// touch — this node leads it and a quorum acknowledged it lately, or its leader's appends
/// reach this node — and this replica has applied everything it knows to be committed. A node
/// cut off from the quorum is not ready, though it may still believe in a leader.
async fn readyz(State(node): State<Node>) -> (StatusCode, String) {
    if node.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    if let Err(lost) = node.incarnations().may_send() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{lost}\n"));
    }
    let mut problems = String::new();
    for shard in node.shards() {
        let m = shard.metrics();
        let member = m.membership_config.membership().get_node(&node.id()).is_some();
        if !member {
            let _ = writeln!(problems, "shard {}: not a member yet", shard.id);
        } else if m.current_leader.is_none() {
            let _ = writeln!(problems, "shard {}: no leader", shard.id);
        } else if let Some(silence) = shard.out_of_touch() {
            let _ = writeln!(
                problems,
                "shard {}: no contact between its leader and a quorum for {} ms",
                shard.id,
                silence.as_millis().min(u128::from(u64::MAX))
            );
        } else if m.last_applied.map(|l| l.index) < m.local_committed.map(|c| c.index) {
            let _ = writeln!(problems, "shard {}: catching up", shard.id);
        }
    }
    if problems.is_empty() { (StatusCode::OK, "ready\n".into()) } else { (StatusCode::SERVICE_UNAVAILABLE, problems) }
}

async fn metrics(State(node): State<Node>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let shards: Vec<(u32, ShardGauges)> = node
        .shards()
        .iter()
        .map(|shard| {
            let m = shard.metrics();
            let gauges = ShardGauges {
                is_leader: m.state == ServerState::Leader,
                term: m.current_term,
                leader_id: m.current_leader.map_or(0, |l| l.0),
                last_log_index: m.last_log_index.unwrap_or(0),
                commit_index: m.local_committed.map_or(0, |c| c.index),
                applied_index: m.last_applied.map_or(0, |a| a.index),
                snapshot_index: m.snapshot.map_or(0, |s| s.index),
                purged_index: m.purged.map_or(0, |p| p.index),
                proposals: shard.batching.proposals.load(Ordering::Relaxed),
                proposal_batches: shard.batching.batches.load(Ordering::Relaxed),
                snapshot_bytes: shard.snapshots().bytes(),
                snapshot_records: shard.snapshots().records(),
            };
            (shard.id.0, gauges)
        })
        .collect();
    let flusher = node.flusher();
    let text = node.metrics().render(&shards, flusher.syncs(), flusher.appends_synced());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

/// Drains the histograms' sample buffers every few seconds (unscraped, they would grow). The
/// shards count their own leader changes (`Shard::note_leader_changes`).
pub async fn keep_metrics(node: Node, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => node.metrics().upkeep(),
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}
