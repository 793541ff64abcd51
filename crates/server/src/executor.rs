//! The continuation executor: runs a shard's ready continuations while this node leads it.
//!
//! # Lifecycle
//!
//! One task per shard ([`run`]) follows openraft's metrics channel. When the replica becomes
//! leader of term T it subscribes to the shard's announcements, then scans the ready index
//! (`S 0x06`): everything made ready under earlier leaders, or before a restart, is found by
//! the scan, and everything made ready after it is announced (an `Announcement::Ready` per
//! effect of an applied entry; a snapshot install or a lagging subscription triggers another
//! scan). Each ready continuation gets a worker. When the replica stops leading T — a vote, a
//! transfer, a shutdown — the term's task is dropped and every worker with it, wherever it was.
//!
//! # Why a continuation is never lost or doubled
//!
//! A worker settles the target through the router with the idempotency key
//! `vow-cont:<continuation id>`; then the leader proposes `Complete` on its own shard, which
//! takes the continuation out of the ready index (gathered for [`COMPLETE_AFTER`], many in one
//! entry). Readiness is replicated state, so a new leader finds
//! every continuation whose target may not be settled yet. If the old leader settled the
//! target but died before `Complete`, the new one settles again with the same key: the target's
//! shard answers "deduplicated" (or, if a function answered differently the second time, "already
//! settled"), never a second settlement. Functions are called at least once: every attempt of a
//! continuation carries the same `Idempotency-Key`.
//!
//! A webhook subscription is a continuation too (`Action::Notify`, see [`crate::webhooks`]):
//! it settles nothing; its worker POSTs the settled record, signed, until the receiver takes it,
//! then it is proposed done like any other. A new leader redoes a delivery whose `Complete` was
//! not applied, so a receiver may get a delivery more than once, never none.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::vote::RaftLeaderId;
use rand::Rng;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use vow_core::pipeline::{self, Action, Completion, ContinuationRecord, Next, On, Settlement, Status};
use vow_core::{Command, Outcome, PromiseId, SettleAs, Value};

use crate::convert;
use crate::functions::{Answer, Call, DEFAULT_TIMEOUT, Delivery, Functions};
use crate::metrics::{Attempt, AttemptResult};
use crate::router::Router;
use crate::shard::{Shard, ShardError};
use crate::tokens::CompletionKeys;
use crate::webhooks;
use vow_storage::state_machine::Announcement;

/// Ready continuations one scan picks up; the next scan takes the rest.
const SCAN_LIMIT: usize = 1000;
/// How often a leader scans the ready index anyway: picks up what a full scan left behind.
const RESCAN_EVERY: Duration = Duration::from_secs(5);
/// Function calls and webhook deliveries a node has in flight at once, over all its shards
/// (continuations waiting out a retry's backoff hold none).
pub const MAX_RUNNING: usize = 256;
/// How long a leader gathers finished continuations before proposing them done in one
/// `Complete` entry (or sooner, at [`COMPLETE_BATCH`] of them): one entry for many, and none
/// on the path of the chains still running (a 10-step chain took 15.1 ms at p50 with one
/// `Complete` per step, 12.8 ms without; `vow bench --workload chain --rtt-ms 0`).
const COMPLETE_AFTER: Duration = Duration::from_millis(20);
const COMPLETE_BATCH: usize = 1000;
/// Retry backoff: the first wait, and the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A webhook receiver that is down is tried less often: its deliveries wait for it for a day.
const WEBHOOK_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A shard's `vow_continuations_active` gauge while this node leads it: back to 0 when the term
/// ends (the task holding it is dropped).
struct ActiveGauge(metrics::Gauge);

impl Drop for ActiveGauge {
    fn drop(&mut self) {
        self.0.set(0.0);
    }
}

/// The node's executor state, shared by its shards' tasks. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Executor {
    router: Router,
    functions: Functions,
    /// Signs webhook deliveries.
    keys: CompletionKeys,
    running: Arc<Semaphore>,
}

impl Executor {
    pub fn new(router: Router, functions: Functions, keys: CompletionKeys) -> Executor {
        Executor { router, functions, keys, running: Arc::new(Semaphore::new(MAX_RUNNING)) }
    }

    pub fn functions(&self) -> &Functions {
        &self.functions
    }

    fn note_attempt(&self, id: &str, error: Option<&str>, next: Option<Duration>) {
        let now = self.router.node().wall_ms();
        self.router.progress().note(id, error, next.map_or(0, |d| now + d.as_millis() as i64));
    }

    /// Runs `shard`'s ready continuations whenever this node leads it, until `stop`.
    pub async fn run(self, shard: Shard, mut stop: watch::Receiver<bool>) {
        // The server metrics change only with the role, leader, vote or membership (see
        // `Shard::fatal_error` for why not the full metrics).
        let mut metrics = shard.raft.server_metrics();
        loop {
            let led = {
                let m = metrics.borrow_watched();
                (m.state == ServerState::Leader).then(|| m.vote.leader_id().term())
            };
            let Some(term) = led else {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    changed = metrics.changed() => if changed.is_err() { return },
                }
                continue;
            };
            let still_leading = async {
                loop {
                    if metrics.changed().await.is_err() {
                        return;
                    }
                    let m = metrics.borrow_watched();
                    if m.state != ServerState::Leader || m.vote.leader_id().term() != term {
                        return;
                    }
                }
            };
            tracing::debug!(shard = %shard.id, term, "executor starts");
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = still_leading => {}
                // It returns only when the shard's announcements end: the shard is gone.
                _ = self.lead(&shard) => return,
            }
            tracing::debug!(shard = %shard.id, term, "executor stops");
        }
    }

    /// One term of leadership: runs what is ready, as it becomes ready. Dropped when the term
    /// ends, and its workers with it.
    async fn lead(&self, shard: &Shard) {
        let metrics = self.router.node().metrics();
        let active_gauge = ActiveGauge(metrics.continuations_active(shard.id.0));
        let mut announcements = shard.subscribe();
        // Continuations being run, and those run but not yet proposed done: a rescan must not
        // start either again.
        let mut active: HashSet<String> = HashSet::new();
        let mut workers: JoinSet<(String, Option<Completion>)> = JoinSet::new();
        let mut finished: Vec<Completion> = Vec::new();
        let mut propose_at: Option<tokio::time::Instant> = None;
        let mut completing: JoinSet<Vec<String>> = JoinSet::new();
        let mut rescan = tokio::time::interval(RESCAN_EVERY);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut start: Vec<String> = Vec::new();
            let mut propose_now = false;
            tokio::select! {
                _ = rescan.tick() => start = self.scan(shard).await,
                event = announcements.recv() => match event {
                    Ok(Announcement::Ready(id)) => start.push(id),
                    Ok(Announcement::Settled(_)) => {}
                    Ok(Announcement::StateReplaced) | Err(RecvError::Lagged(_)) => start = self.scan(shard).await,
                    Err(RecvError::Closed) => return,
                },
                Some(ran) = workers.join_next() => match ran {
                    Ok((_, Some(done))) => {
                        propose_at.get_or_insert_with(|| tokio::time::Instant::now() + COMPLETE_AFTER);
                        finished.push(done);
                        propose_now = finished.len() >= COMPLETE_BATCH;
                    }
                    Ok((id, None)) => {
                        active.remove(&id);
                        self.router.progress().forget(&id);
                    }
                    Err(e) => tracing::error!(shard = %shard.id, error = %e, "a continuation's worker failed"),
                },
                _ = sleep_until_some(propose_at) => propose_now = true,
                Some(proposed) = completing.join_next() => {
                    for id in proposed.unwrap_or_default() {
                        active.remove(&id);
                        self.router.progress().forget(&id);
                    }
                }
            }
            if propose_now && !finished.is_empty() {
                propose_at = None;
                let done = std::mem::take(&mut finished);
                let shard = shard.clone();
                let done_counter = metrics.continuations_done_counter();
                completing.spawn(async move {
                    let ids: Vec<String> = done.iter().map(|c| c.id.clone()).collect();
                    // Failing, this node is losing the shard: the next leader runs them again,
                    // and their settles are deduplicated.
                    match shard.propose(Command::Complete { done }).await {
                        Ok(_) => done_counter.increment(ids.len() as u64),
                        Err(e) => tracing::debug!(shard = %shard.id, error = %e, "proposing continuations done failed"),
                    }
                    ids
                });
            }
            for id in start {
                if active.insert(id.clone()) {
                    let (this, shard) = (self.clone(), shard.clone());
                    workers.spawn(async move {
                        let done = this.execute(&shard, &id).await;
                        (id, done)
                    });
                }
            }
            active_gauge.0.set(active.len() as f64);
        }
    }

    async fn scan(&self, shard: &Shard) -> Vec<String> {
        let state = shard.state.clone();
        match tokio::task::spawn_blocking(move || state.ready(SCAN_LIMIT)).await {
            Ok(Ok(ids)) => ids,
            Ok(Err(e)) => {
                tracing::error!(shard = %shard.id, error = %e, "reading the ready continuations failed");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(shard = %shard.id, error = %e, "ready scan task failed");
                Vec::new()
            }
        }
    }

    /// Runs one continuation to its end, its target settled (or beyond reach), and says how
    /// it ended, to be proposed done. `None` if it is not ready (anymore).
    async fn execute(&self, shard: &Shard, id: &str) -> Option<Completion> {
        let record = match shard.state.continuation(id) {
            Ok(Some(r)) if r.status == Status::Ready => r,
            Ok(_) => return None,
            Err(e) => {
                tracing::error!(shard = %shard.id, continuation = id, error = %e, "reading a continuation failed");
                return None;
            }
        };
        let note = match self.outcome(shard, &record) {
            Err(note) => note,
            Ok(_) if matches!(record.continuation.action, Action::Notify { .. }) => self.notify(shard, &record).await,
            Ok(outcome) => self.step(&record, &outcome).await,
        };
        tracing::debug!(shard = %shard.id, continuation = id, note, "continuation ran");
        Some(Completion { id: id.to_owned(), note })
    }

    /// The outcome the continuation runs on: its join's decision, or its source's settlement.
    fn outcome(&self, shard: &Shard, record: &ContinuationRecord) -> Result<(PromiseId, Settlement), String> {
        let c = &record.continuation;
        if let Some(decided) = record.decided() {
            return Ok((c.target.clone(), decided.clone()));
        }
        let source = &c.sources[0];
        match shard.state.get(source) {
            Ok(Some(p)) if p.state.is_settled() => Ok((source.clone(), Settlement { state: p.state, value: p.value })),
            Ok(Some(_)) => Err(format!("source {source} is not settled; nothing to run")),
            Ok(None) => Err(format!("source {source} no longer exists")),
            Err(e) => Err(format!("reading source {source}: {e}")),
        }
    }

    /// Does what the continuation's step says and settles its target; returns how it ended.
    async fn step(&self, record: &ContinuationRecord, (source, outcome): &(PromiseId, Settlement)) -> String {
        let c = &record.continuation;
        match pipeline::step(c.on, &c.action, outcome) {
            Next::Settle { settle_as, value } => self.settle(record, settle_as, value).await,
            Next::Deliver => self.deliver(record, outcome).await,
            // Run by `execute`, which has the shard to read the record from.
            Next::Notify => "a webhook is not a step".into(),
            Next::Invoke => match self.invoke(record, source, outcome).await {
                Answer::Resolve(value) => self.settle(record, SettleAs::Resolve, value).await,
                Answer::Reject(value) => self.settle(record, SettleAs::Reject, value).await,
                Answer::Adopt(promise) => self.adopt(record, promise).await,
                Answer::Transient(why) => format!("gave up at the target's deadline; last error: {why}"),
            },
        }
    }

    /// Calls the function until it answers for good or the target's deadline passes.
    async fn invoke(&self, record: &ContinuationRecord, source: &PromiseId, outcome: &Settlement) -> Answer {
        let c = &record.continuation;
        let Action::Invoke { url, headers, timeout_ms, .. } = &c.action else {
            return Answer::Reject(Value::default());
        };
        let timeout = if *timeout_ms == 0 { DEFAULT_TIMEOUT } else { Duration::from_millis(u64::from(*timeout_ms)) };
        let call = Call {
            url,
            headers,
            timeout,
            continuation: &c.id,
            source,
            source_state: outcome.state,
            target: &c.target,
            input: &outcome.value,
        };
        let mut backoff = Backoff::default();
        loop {
            let answer = {
                // A permit per attempt, not per continuation: one waiting out its backoff (for a
                // function that is down, or a webhook receiver, for up to a day) holds none.
                let _permit = self.running.acquire().await;
                let _running = self.router.node().metrics().attempt_running();
                self.functions.call(&call).await
            };
            let result = if matches!(answer, Answer::Transient(_)) { AttemptResult::Retry } else { AttemptResult::Ok };
            self.router.node().metrics().attempt(Attempt::Function, result);
            match answer {
                Answer::Transient(why) => {
                    let Some(wait) = backoff.next(self.left(record)) else {
                        self.note_attempt(&c.id, Some(&why), None);
                        return Answer::Transient(why);
                    };
                    tracing::debug!(continuation = %c.id, error = %why, ?wait, "function call failed; retrying");
                    self.note_attempt(&c.id, Some(&why), Some(wait));
                    tokio::time::sleep(wait).await;
                }
                answer => {
                    self.note_attempt(&c.id, None, None);
                    return answer;
                }
            }
        }
    }

    /// Time left until the target's deadline.
    fn left(&self, record: &ContinuationRecord) -> Duration {
        let now = self.router.node().wall_ms();
        Duration::from_millis(record.target_deadline_ms.saturating_sub(now).max(0) as u64)
    }

    /// Proposes `command` through the router until it has an outcome or the target's deadline
    /// passes (`None`; the target has timed out by then).
    async fn write_until_deadline(&self, record: &ContinuationRecord, command: Command) -> Option<Outcome> {
        let mut backoff = Backoff::default();
        loop {
            match self.router.write(command.clone(), Some(Duration::from_secs(10))).await {
                Ok(outcome) => return Some(outcome),
                Err(
                    e @ (ShardError::NotLeader { .. }
                    | ShardError::Unavailable { .. }
                    | ShardError::OutcomeUnknown { .. }
                    | ShardError::Fatal { .. }),
                ) => {
                    let wait = backoff.next(self.left(record))?;
                    tracing::debug!(continuation = %record.continuation.id, error = %e, ?wait, "write failed; retrying");
                    self.note_attempt(&record.continuation.id, Some(&e.to_string()), Some(wait));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// [`Executor::write_until_deadline`], waiting (with backoff, until the target's deadline)
    /// while the write answers NOT_FOUND: `missing` (the target, a join) is still on its way —
    /// its part of the Submit not applied yet on its shard. `Err` with the continuation's note
    /// once the deadline passes.
    async fn write_when_present(
        &self,
        record: &ContinuationRecord,
        command: Command,
        missing: &str,
    ) -> Result<Option<Outcome>, String> {
        let mut backoff = Backoff::default();
        loop {
            match self.write_until_deadline(record, command.clone()).await {
                Some(Outcome::NotFound) => {
                    let Some(wait) = backoff.next(self.left(record)) else {
                        return Err(format!("{missing} never appeared before the target's deadline"));
                    };
                    let why = format!("{missing} does not exist yet");
                    tracing::debug!(continuation = %record.continuation.id, ?wait, "{why}; retrying");
                    self.note_attempt(&record.continuation.id, Some(&why), Some(wait));
                    tokio::time::sleep(wait).await;
                }
                other => return Ok(other),
            }
        }
    }

    /// Settles the target, exactly once whoever tries: the idempotency key is the
    /// continuation's. A target not created yet is waited for, until its deadline: a Submit
    /// writes each shard's part at once, so a continuation whose source is settled already can
    /// run before the shard holding its target has applied that part (a ten-step chain broke at
    /// a step this way under load).
    async fn settle(&self, record: &ContinuationRecord, settle_as: SettleAs, mut value: Value) -> String {
        let c = &record.continuation;
        let mut settle_as = settle_as;
        if let Err(e) = self.router.node().limits().check_value("value", &value) {
            // A joined list or a function's answer can outgrow what a promise holds.
            settle_as = SettleAs::Reject;
            value = Value {
                headers: Default::default(),
                data: format!("the outcome cannot be stored: {}", e.0).into_bytes(),
            };
        }
        let command =
            Command::Settle { id: c.target.clone(), settle_as, value, idempotency_key: format!("vow-cont:{}", c.id) };
        match self.write_when_present(record, command, &format!("target {}", c.target)).await {
            Err(note) => note,
            Ok(Some(Outcome::Settled { promise, deduplicated: false })) => {
                format!("settled {} as {}", promise.id, promise.state)
            }
            Ok(Some(Outcome::Settled { promise, deduplicated: true })) => {
                format!("settled {} as {} (by an earlier attempt)", promise.id, promise.state)
            }
            Ok(Some(Outcome::SettleConflict { current })) => format!("{} was already {}", current.id, current.state),
            Ok(Some(other)) => format!("unexpected answer settling {}: {other:?}", c.target),
            Ok(None) => format!("gave up settling {} at its deadline", c.target),
        }
    }

    /// Offers the outcome to the join, on the target's shard. A join not registered yet (its
    /// part of the Submit still on its way) is waited for, until the target's deadline.
    async fn deliver(&self, record: &ContinuationRecord, outcome: &Settlement) -> String {
        let c = &record.continuation;
        let Action::Deliver { join, index } = &c.action else { return "not a delivery".into() };
        let command =
            Command::Offer { join: join.clone(), target: c.target.clone(), index: *index, outcome: outcome.clone() };
        match self.write_when_present(record, command, &format!("join {join}")).await {
            Err(note) => note,
            Ok(Some(Outcome::Offered { .. })) => format!("delivered to join {join}"),
            Ok(Some(other)) => format!("unexpected answer delivering to {join}: {other:?}"),
            Ok(None) => format!("gave up delivering to {join} at the target's deadline"),
        }
    }

    /// Delivers the settled record to the webhook until the receiver takes it (2xx), says it
    /// is gone (410), or [`webhooks::RETRY_WINDOW`] after the settlement has passed.
    async fn notify(&self, shard: &Shard, record: &ContinuationRecord) -> String {
        let c = &record.continuation;
        let Action::Notify { url, headers } = &c.action else { return "not a webhook".into() };
        let source = &c.sources[0];
        let promise = match shard.state.get(source) {
            Ok(Some(p)) if p.state.is_settled() => p,
            Ok(_) => return format!("{source} is not settled; nothing to deliver"),
            Err(e) => return format!("reading {source}: {e}"),
        };
        let until = promise.settled_at_ms.saturating_add(webhooks::RETRY_WINDOW.as_millis() as i64);
        let body = webhooks::body(&c.id, convert::promise_to_pb(promise));
        let mut backoff = Backoff { cap: WEBHOOK_BACKOFF_MAX, ..Backoff::default() };
        loop {
            let now = self.router.node().wall_ms();
            let why = match self.keys.sign_webhook(now, &body) {
                None => "this node has no keys to sign deliveries with (--completion-keys-file)".to_owned(),
                Some(signature) => match self.deliver_once(url, headers, &c.id, &signature, &body).await {
                    Delivery::Delivered => {
                        self.note_attempt(&c.id, None, None);
                        return format!("delivered to {url}");
                    }
                    Delivery::Gone(why) => return format!("given up: {why}"),
                    Delivery::Retry(why) => why,
                },
            };
            let left = Duration::from_millis(until.saturating_sub(self.router.node().wall_ms()).max(0) as u64);
            let Some(wait) = backoff.next(left) else {
                return format!(
                    "gave up {} h after the settlement; last error: {why}",
                    webhooks::RETRY_WINDOW.as_secs() / 3600
                );
            };
            tracing::debug!(subscription = %c.id, error = %why, ?wait, "webhook delivery failed; retrying");
            self.note_attempt(&c.id, Some(&why), Some(wait));
            tokio::time::sleep(wait).await;
        }
    }

    /// One delivery attempt, under a permit.
    async fn deliver_once(
        &self,
        url: &str,
        headers: &std::collections::BTreeMap<String, String>,
        subscription: &str,
        signature: &str,
        body: &[u8],
    ) -> Delivery {
        let _permit = self.running.acquire().await;
        let metrics = self.router.node().metrics();
        let delivery = {
            let _running = metrics.attempt_running();
            self.functions.deliver(url, headers, subscription, signature, body.to_vec()).await
        };
        let result = match delivery {
            Delivery::Delivered => AttemptResult::Ok,
            Delivery::Retry(_) => AttemptResult::Retry,
            Delivery::Gone(_) => AttemptResult::Failed,
        };
        metrics.attempt(Attempt::Webhook, result);
        delivery
    }

    /// The function handed its result over to `promise`: the target settles as it does, by a
    /// forwarding continuation stored with that promise.
    async fn adopt(&self, record: &ContinuationRecord, promise: PromiseId) -> String {
        let c = &record.continuation;
        if let Err(e) = self.router.node().limits().check_id(promise.as_str()) {
            let why = format!("the function answered with an invalid promise id: {}", e.0);
            return self
                .settle(record, SettleAs::Reject, Value { headers: Default::default(), data: why.into_bytes() })
                .await;
        }
        let forward = pipeline::Continuation {
            id: format!("{}{}adopt", c.id, pipeline::DELIVERY_SEPARATOR),
            sources: vec![promise.clone()],
            target: c.target.clone(),
            combinator: None,
            on: On::Settled,
            action: Action::Forward { recover: false },
        };
        let command = Command::Register { continuation: forward, target_deadline_ms: record.target_deadline_ms };
        match self.write_until_deadline(record, command).await {
            Some(Outcome::Registered { .. }) => format!("the target follows promise {promise}"),
            Some(Outcome::NotFound) => {
                let why = format!("the function answered with promise {promise}, which does not exist");
                self.settle(record, SettleAs::Reject, Value { headers: Default::default(), data: why.into_bytes() })
                    .await
            }
            Some(other) => format!("unexpected answer adopting {promise}: {other:?}"),
            None => format!("gave up adopting {promise} at the target's deadline"),
        }
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
struct Backoff {
    attempt: u32,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { attempt: 0, cap: BACKOFF_MAX }
    }
}

impl Backoff {
    /// The next wait, or `None` if `left` does not allow one.
    fn next(&mut self, left: Duration) -> Option<Duration> {
        if left.is_zero() {
            return None;
        }
        let cap = BACKOFF_FIRST.saturating_mul(1 << self.attempt.min(12)).min(self.cap);
        self.attempt += 1;
        let wait = Duration::from_millis(rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64));
        Some(wait.min(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_stops_at_the_deadline() {
        let mut b = Backoff::default();
        let first = b.next(Duration::from_secs(60)).unwrap();
        assert!(first >= BACKOFF_FIRST / 2 && first <= BACKOFF_FIRST);
        for _ in 0..20 {
            assert!(b.next(Duration::from_secs(60)).unwrap() <= BACKOFF_MAX);
        }
        assert_eq!(b.next(Duration::from_millis(3)), Some(Duration::from_millis(3)), "never past the deadline");
        assert_eq!(b.next(Duration::ZERO), None);
    }
}
