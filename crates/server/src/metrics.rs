//! A node's metrics, kept by the `metrics` crate's Prometheus recorder (one per node, not the
//! process-wide one: tests run several nodes in one process) and served on `/metrics` in the
//! Prometheus text format with HELP and TYPE for every family.
//!
//! Request handles are registered once at start, so the request path only touches atomics.
//! Raft and storage state that openraft and the WAL flusher already keep (terms, indexes, sync
//! counts) is read when `/metrics` is scraped ([`Metrics::render`]); what happens between
//! scrapes (latencies, fsyncs, leader changes) is recorded as it happens.

use std::fmt;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tonic::Status;
use vow_storage::state_machine::{SnapshotDone, SnapshotKind};

/// Methods whose requests are counted and timed.
const METHODS: [&str; 9] = ["create", "get", "resolve", "reject", "cancel", "await", "search", "submit", "subscribe"];
/// How a request ended: answered, a replicated domain answer (exists, settled, not found, bad
/// input — not a failure of the node), or an error.
const OUTCOMES: [&str; 3] = ["ok", "domain", "error"];

/// Latency buckets in seconds: from a local read to an Await's longest wait.
const SECONDS_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0, 300.0];
/// Snapshot file sizes in bytes: 4 KiB to 64 GiB, by fours.
fn bytes_buckets() -> [f64; 13] {
    std::array::from_fn(|i| 4096.0 * 4f64.powi(i as i32))
}
/// Appends per WAL fsync: how well group commit groups.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

const METADATA: Metadata<'static> = Metadata::new("vow", Level::INFO, Some(module_path!()));

/// The per-shard values read from openraft and the shard at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardGauges {
    pub is_leader: bool,
    pub term: u64,
    pub leader_id: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    pub proposals: u64,
    pub proposal_batches: u64,
    pub snapshot_bytes: u64,
    pub snapshot_records: u64,
}

/// What a continuation's attempt was: a function call, or a webhook delivery.
#[derive(Debug, Clone, Copy)]
pub enum Attempt {
    Function,
    Webhook,
}

/// How an attempt ended: answered (or delivered), to be retried, or given up for good.
#[derive(Debug, Clone, Copy)]
pub enum AttemptResult {
    Ok,
    Retry,
    Failed,
}

const ATTEMPTS: [&str; 2] = ["function", "webhook"];
const ATTEMPT_RESULTS: [&str; 3] = ["ok", "retry", "failed"];

/// The metrics of one node.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    node: String,
    /// `[method][outcome]`.
    requests: Vec<Vec<(Counter, Histogram)>>,
    awaits_waiting: Gauge,
    routed_sent: Counter,
    routed_served: Counter,
    wal_sync_seconds: Histogram,
    wal_sync_batch: Histogram,
    /// `[kind][result]`.
    attempts: Vec<Vec<Counter>>,
    attempts_running: Gauge,
    continuations_done: Counter,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").field("node", &self.node).finish_non_exhaustive()
    }
}

/// Counts one Await as waiting (`vow_awaits_waiting`), or one attempt as running
/// (`vow_continuation_attempts_running`), for as long as it lives.
#[derive(Debug)]
pub struct Waiting<'a>(&'a Gauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl Metrics {
    pub fn new(node: u64) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full("vow_wal_sync_appends".into()), &BATCH_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full("vow_snapshot_bytes".into()), &bytes_buckets()))
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let node = node.to_string();
        let m = |name: &'static str, labels: Vec<Label>| Key::from_parts(name, labels);
        let describe = |kind: Kind, name: &'static str, unit: Option<Unit>, help: &'static str| {
            let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            match kind {
                Kind::Counter => recorder.describe_counter(name, unit, help),
                Kind::Gauge => recorder.describe_gauge(name, unit, help),
                Kind::Histogram => recorder.describe_histogram(name, unit, help),
            }
        };
        for &(kind, name, unit, help) in DESCRIPTIONS {
            describe(kind, name, unit, help);
        }
        let labels = |extra: &[(&'static str, &'static str)]| {
            let mut l = vec![Label::new("node", node.clone())];
            l.extend(extra.iter().map(|(k, v)| Label::new(*k, *v)));
            l
        };
        let requests = METHODS
            .iter()
            .map(|method| {
                OUTCOMES
                    .iter()
                    .map(|outcome| {
                        let l = labels(&[("method", method), ("outcome", outcome)]);
                        (
                            recorder.register_counter(&m("vow_requests_total", l.clone()), &METADATA),
                            recorder.register_histogram(&m("vow_request_duration_seconds", l), &METADATA),
                        )
                    })
                    .collect()
            })
            .collect();
        let attempts = ATTEMPTS
            .iter()
            .map(|kind| {
                ATTEMPT_RESULTS
                    .iter()
                    .map(|result| {
                        let l = labels(&[("kind", kind), ("result", result)]);
                        recorder.register_counter(&m("vow_continuation_attempts_total", l), &METADATA)
                    })
                    .collect()
            })
            .collect();
        recorder
            .register_gauge(&m("vow_build_info", labels(&[("version", env!("CARGO_PKG_VERSION"))])), &METADATA)
            .set(1.0);
        Metrics {
            awaits_waiting: recorder.register_gauge(&m("vow_awaits_waiting", labels(&[])), &METADATA),
            routed_sent: recorder
                .register_counter(&m("vow_routed_requests_total", labels(&[("direction", "sent")])), &METADATA),
            routed_served: recorder
                .register_counter(&m("vow_routed_requests_total", labels(&[("direction", "served")])), &METADATA),
            wal_sync_seconds: recorder.register_histogram(&m("vow_wal_sync_seconds", labels(&[])), &METADATA),
            wal_sync_batch: recorder.register_histogram(&m("vow_wal_sync_appends", labels(&[])), &METADATA),
            attempts,
            attempts_running: recorder.register_gauge(&m("vow_continuation_attempts_running", labels(&[])), &METADATA),
            continuations_done: recorder.register_counter(&m("vow_continuations_done_total", labels(&[])), &METADATA),
            requests,
            recorder,
            handle,
            node,
        }
    }

    /// Counts and times one request of `method` (one of [`METHODS`]).
    pub fn record<T>(&self, method: &str, result: &Result<T, Status>, elapsed: Duration) {
        let Some(m) = METHODS.iter().position(|x| *x == method) else { return };
        let o = match result {
            Ok(_) => 0,
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::AlreadyExists
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::NotFound
                        | tonic::Code::InvalidArgument
                ) =>
            {
                1
            }
            Err(_) => 2,
        };
        let (count, duration) = &self.requests[m][o];
        count.increment(1);
        duration.record(elapsed.as_secs_f64());
    }

    /// Counts a request this node's router sent to another node's leader.
    pub fn routed_sent(&self) {
        self.routed_sent.increment(1);
    }

    /// Counts a routed request this node served for another node.
    pub fn routed_served(&self) {
        self.routed_served.increment(1);
    }

    /// Marks an Await as waiting on this node until the returned guard is dropped.
    pub fn await_waiting(&self) -> Waiting<'_> {
        self.awaits_waiting.increment(1.0);
        Waiting(&self.awaits_waiting)
    }

    /// What the WAL flusher calls after each fsync: how long it took and how many appends (of
    /// every shard) it made durable.
    pub fn wal_synced(&self) -> impl Fn(Duration, usize) + Send + Sync + 'static {
        let (seconds, batch) = (self.wal_sync_seconds.clone(), self.wal_sync_batch.clone());
        move |took, appends| {
            seconds.record(took.as_secs_f64());
            batch.record(appends as f64);
        }
    }

    /// What a shard's snapshots call after each one built or installed.
    pub fn snapshot_done(&self) -> impl Fn(SnapshotDone) + Send + Sync + 'static {
        let histograms = |name: &'static str| {
            [SnapshotKind::Built, SnapshotKind::Installed].map(|kind| {
                let labels = vec![Label::new("node", self.node.clone()), Label::new("kind", kind.as_str())];
                self.recorder.register_histogram(&Key::from_parts(name, labels), &METADATA)
            })
        };
        let (seconds, bytes) = (histograms("vow_snapshot_duration_seconds"), histograms("vow_snapshot_bytes"));
        move |done| {
            seconds[done.kind as usize].record(done.took.as_secs_f64());
            bytes[done.kind as usize].record(done.bytes as f64);
        }
    }

    /// A gauge of the ready continuations a shard's leader on this node is running: calling,
    /// delivering, waiting to retry, or done and waiting to be marked so (0 where it does not
    /// lead).
    pub fn continuations_active(&self, shard: u32) -> Gauge {
        let labels = vec![Label::new("node", self.node.clone()), Label::new("shard", shard.to_string())];
        self.recorder.register_gauge(&Key::from_parts("vow_continuations_active", labels), &METADATA)
    }

    /// Counts one function call or webhook delivery by how it ended.
    pub fn attempt(&self, kind: Attempt, result: AttemptResult) {
        self.attempts[kind as usize][result as usize].increment(1);
    }

    /// Marks a function call or webhook delivery as running until the guard is dropped.
    pub fn attempt_running(&self) -> Waiting<'_> {
        self.attempts_running.increment(1.0);
        Waiting(&self.attempts_running)
    }

    /// The counter of continuations proposed done (their `Complete` committed), for a task.
    pub fn continuations_done_counter(&self) -> Counter {
        self.continuations_done.clone()
    }

    /// A counter of leader changes of `shard` seen by this node, for a task watching openraft.
    pub fn leader_changes(&self, shard: u32) -> Counter {
        let labels = vec![Label::new("node", self.node.clone()), Label::new("shard", shard.to_string())];
        self.recorder.register_counter(&Key::from_parts("vow_shard_leader_changes_total", labels), &METADATA)
    }

    /// Drains the histograms' sample buffers into their buckets; run every few seconds, or
    /// the buffers grow between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The whole exposition: the values read now (`shards`, the WAL counters), then everything
    /// recorded.
    pub fn render(&self, shards: &[(u32, ShardGauges)], wal_syncs: u64, wal_appends_synced: u64) -> String {
        let gauge = |name: &'static str, shard: u32, v: u64| {
            let labels = vec![Label::new("node", self.node.clone()), Label::new("shard", shard.to_string())];
            self.recorder.register_gauge(&Key::from_parts(name, labels), &METADATA).set(v as f64);
        };
        let counter = |name: &'static str, labels: Vec<Label>, v: u64| {
            self.recorder.register_counter(&Key::from_parts(name, labels), &METADATA).absolute(v);
        };
        for (id, s) in shards {
            gauge("vow_shard_is_leader", *id, u64::from(s.is_leader));
            gauge("vow_shard_term", *id, s.term);
            gauge("vow_shard_leader_id", *id, s.leader_id);
            gauge("vow_shard_last_log_index", *id, s.last_log_index);
            gauge("vow_shard_commit_index", *id, s.commit_index);
            gauge("vow_shard_applied_index", *id, s.applied_index);
            gauge("vow_shard_apply_lag", *id, s.commit_index.saturating_sub(s.applied_index));
            gauge("vow_shard_snapshot_index", *id, s.snapshot_index);
            gauge("vow_shard_purged_index", *id, s.purged_index);
            gauge("vow_shard_snapshot_bytes", *id, s.snapshot_bytes);
            gauge("vow_shard_snapshot_records", *id, s.snapshot_records);
            let labels = vec![Label::new("node", self.node.clone()), Label::new("shard", id.to_string())];
            counter("vow_shard_proposals_total", labels.clone(), s.proposals);
            counter("vow_shard_proposal_batches_total", labels, s.proposal_batches);
        }
        let node = || vec![Label::new("node", self.node.clone())];
        self.recorder.register_gauge(&Key::from_parts("vow_node_shards", node()), &METADATA).set(shards.len() as f64);
        counter("vow_wal_syncs_total", node(), wal_syncs);
        counter("vow_wal_appends_synced_total", node(), wal_appends_synced);
        self.handle.run_upkeep();
        self.handle.render()
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// HELP text of every family.
const DESCRIPTIONS: &[(Kind, &str, Option<Unit>, &str)] = &[
    (Kind::Counter, "vow_requests_total", None, "Public requests by method and outcome (ok, domain answer, error)."),
    (
        Kind::Histogram,
        "vow_request_duration_seconds",
        Some(Unit::Seconds),
        "Public request latency by method and outcome.",
    ),
    (Kind::Gauge, "vow_awaits_waiting", None, "Await calls waiting on this node."),
    (
        Kind::Counter,
        "vow_routed_requests_total",
        None,
        "Requests routed between nodes: sent to another node's leader, or served for another node.",
    ),
    (
        Kind::Histogram,
        "vow_wal_sync_seconds",
        Some(Unit::Seconds),
        "Duration of each WAL fsync (shared by every shard of the node).",
    ),
    (Kind::Histogram, "vow_wal_sync_appends", None, "Log appends made durable by each WAL fsync (group commit)."),
    (Kind::Counter, "vow_wal_syncs_total", None, "WAL fsyncs since the node started."),
    (Kind::Counter, "vow_wal_appends_synced_total", None, "Log appends made durable since the node started."),
    (
        Kind::Counter,
        "vow_shard_leader_changes_total",
        None,
        "Times this node saw a shard's leader change (elections, transfers).",
    ),
    (Kind::Gauge, "vow_shard_is_leader", None, "1 if this node leads the shard."),
    (Kind::Gauge, "vow_shard_term", None, "The shard's current Raft term on this node."),
    (Kind::Gauge, "vow_shard_leader_id", None, "The shard's leader as this node knows it (0: none)."),
    (Kind::Gauge, "vow_shard_last_log_index", None, "Index of the last entry in this node's log of the shard."),
    (Kind::Gauge, "vow_shard_commit_index", None, "The shard's commit index as this node knows it."),
    (Kind::Gauge, "vow_shard_applied_index", None, "Index of the last entry this node applied to the shard's state."),
    (Kind::Gauge, "vow_shard_apply_lag", None, "Committed entries of the shard this node has not applied yet."),
    (Kind::Gauge, "vow_shard_snapshot_index", None, "Last log index covered by the shard's snapshot on this node."),
    (
        Kind::Gauge,
        "vow_shard_purged_index",
        None,
        "Entries up to this index are purged from this node's log of the shard.",
    ),
    (Kind::Counter, "vow_shard_proposals_total", None, "Commands this node proposed to the shard as its leader."),
    (Kind::Counter, "vow_shard_proposal_batches_total", None, "Raft entries those proposals were batched into."),
    (Kind::Gauge, "vow_shard_snapshot_bytes", None, "Size of the shard's newest snapshot on this node (0: none yet)."),
    (Kind::Gauge, "vow_shard_snapshot_records", None, "Records in the shard's newest snapshot on this node."),
    (
        Kind::Histogram,
        "vow_snapshot_duration_seconds",
        Some(Unit::Seconds),
        "Time to build a snapshot here, or to install one received from a leader.",
    ),
    (Kind::Histogram, "vow_snapshot_bytes", None, "Size of each snapshot built or installed here."),
    (
        Kind::Gauge,
        "vow_continuations_active",
        None,
        "Ready continuations this node's leader of the shard is running, retrying or marking done.",
    ),
    (
        Kind::Counter,
        "vow_continuation_attempts_total",
        None,
        "Function calls and webhook deliveries by how they ended (ok, retry, failed for good).",
    ),
    (Kind::Gauge, "vow_continuation_attempts_running", None, "Function calls and webhook deliveries under way."),
    (Kind::Counter, "vow_continuations_done_total", None, "Continuations this node ran and marked done."),
    (Kind::Gauge, "vow_build_info", None, "Always 1; the version in a label."),
    (Kind::Gauge, "vow_node_shards", None, "Shards of the cluster."),
];
