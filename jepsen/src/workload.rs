//! The promise-register workload: concurrent clients over a small, moving set of ids — creates,
//! racing resolves and rejects with unique values, gets and awaits — each recorded as one [`Op`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use vow_client::{Client, Error, pb};

use crate::history::{Op, OpKind, Outcome, Register};

/// Ids in play at once, and how long a generation of ids lasts before the next takes over.
const KEYS_PER_GENERATION: u64 = 5;
const GENERATION: Duration = Duration::from_secs(3);

pub fn register_of(p: &pb::Promise) -> Register {
    let value = || String::from_utf8_lossy(&p.value.as_ref().map(|v| v.data.clone()).unwrap_or_default()).into_owned();
    match pb::State::try_from(p.state) {
        Ok(pb::State::Resolved) => Register::Resolved { value: value() },
        Ok(pb::State::Rejected | pb::State::RejectedCanceled | pb::State::RejectedTimedout) => {
            Register::Rejected { value: value() }
        }
        _ => Register::Pending,
    }
}

/// A response (or error) as the history records it.
fn classify(kind: OpKind, r: Result<(Option<pb::Promise>, bool), Error>) -> (Outcome, Option<Register>, String) {
    let write = matches!(kind, OpKind::Create | OpKind::Resolve | OpKind::Reject);
    match r {
        // Every write carries an idempotency key unique to its invocation, so a deduplicated
        // answer can only mean the client's own earlier attempt took effect: it is this op's write.
        Ok((p, dedup)) => (
            Outcome::Ok,
            p.as_ref().map(register_of),
            if dedup { "took effect on a retried attempt".into() } else { String::new() },
        ),
        Err(Error::AlreadyExists { current, message }) | Err(Error::AlreadySettled { current, message }) => {
            (Outcome::Fail, current.as_deref().map(register_of), message)
        }
        Err(Error::NotFound(m)) => (Outcome::Fail, Some(Register::Absent), m),
        Err(Error::InvalidArgument(m)) => (Outcome::Fail, None, m),
        // A read that failed changed nothing; a write that failed in an unknown way may have happened.
        Err(e) if write => (Outcome::Info, None, e.to_string()),
        Err(e) => (Outcome::Fail, None, e.to_string()),
    }
}

/// One client's loop until `until`. Its choices come from `seed`, so a replay issues the same
/// sequence of operations.
/// A workload client's connections: one that follows the leader for writes, and one pinned to
/// each node for reads.
#[derive(Debug)]
pub struct Connections {
    pub writer: Client,
    pub readers: Vec<Client>,
}

pub async fn client(
    process: u64,
    conns: Connections,
    seed: u64,
    start: Instant,
    until: Instant,
    next_id: Arc<AtomicU64>,
    out: mpsc::Sender<Op>,
) {
    let Connections { writer: client, readers } = conns;
    let mut rng = StdRng::seed_from_u64(seed ^ process.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut n = 0u64;
    let ns = |t: Instant| t.saturating_duration_since(start).as_nanos() as u64;
    while Instant::now() < until {
        n += 1;
        let generation = start.elapsed().as_millis() as u64 / GENERATION.as_millis() as u64;
        let key = format!("k{generation}-{}", rng.random_range(0..KEYS_PER_GENERATION));
        let roll: u32 = rng.random_range(0..100);
        let kind = match roll {
            0..20 => OpKind::Create,
            20..40 => OpKind::Resolve,
            40..60 => OpKind::Reject,
            60..90 => OpKind::Get,
            _ => OpKind::Await,
        };
        let reader = rng.random_range(0..readers.len());
        let value = format!("p{process}-{n}");
        let v = pb::Value { headers: Default::default(), data: value.clone().into_bytes() };
        let invoked = Instant::now();
        let r = match kind {
            OpKind::Create => client
                .create(pb::CreateRequest {
                    id: key.clone(),
                    idempotency_key: format!("c-{value}"),
                    ..Default::default()
                })
                .await
                .map(|r| (r.promise, r.deduplicated)),
            OpKind::Resolve => {
                client.resolve(&key, v, Some(format!("s-{value}"))).await.map(|r| (r.promise, r.deduplicated))
            }
            OpKind::Reject => {
                client.reject(&key, v, Some(format!("s-{value}"))).await.map(|r| (r.promise, r.deduplicated))
            }
            // Reads go to a node picked at random, as clients spread over a cluster do: every node
            // must answer linearizably, not only the leader.
            OpKind::Get => readers[reader].get(&key).await.map(|p| (Some(p), false)),
            OpKind::Await => {
                readers[reader].await_settled(&key, Duration::from_millis(500)).await.map(|p| (Some(p), false))
            }
        };
        let (outcome, observed, detail) = classify(kind, r);
        let op = Op {
            id: next_id.fetch_add(1, Ordering::Relaxed),
            process,
            kind,
            key,
            value: matches!(kind, OpKind::Resolve | OpKind::Reject).then_some(value),
            invoke_ns: ns(invoked),
            complete_ns: ns(Instant::now()),
            outcome,
            observed,
            detail,
        };
        if out.send(op).await.is_err() {
            return;
        }
    }
}
