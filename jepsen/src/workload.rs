//! The promise-register workload: concurrent clients over a small, moving set of ids — creates,
//! racing resolves and rejects with unique values, gets and awaits — each recorded as one [`Op`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use vow_client::{Client, Error, pb};

use crate::history::{Entry, Op, OpKind, Outcome, Register};

/// Ids in play at once, and how long a generation of ids lasts before the next takes over.
const KEYS_PER_GENERATION: u64 = 5;
pub const GENERATION: Duration = Duration::from_secs(3);

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub outcome: Outcome,
    pub observed: Option<Register>,
    /// The cluster's dedup flag on an acknowledged write.
    pub deduplicated: bool,
    pub detail: String,
}

/// Records a response (or error): `r` is the reply's record and dedup flag.
pub fn classify(kind: OpKind, r: Result<(Option<pb::Promise>, bool), Error>) -> Recorded {
    let write = matches!(kind, OpKind::Create | OpKind::Resolve | OpKind::Reject);
    let recorded = |outcome, observed, detail| Recorded { outcome, observed, deduplicated: false, detail };
    match r {
        // Every write carries an idempotency key unique to its invocation, so a deduplicated
        // answer can only mean the op's own earlier attempt took effect (see the checker).
        Ok((p, dedup)) => Recorded {
            outcome: Outcome::Ok,
            observed: p.as_ref().map(register_of),
            deduplicated: dedup && write,
            detail: String::new(),
        },
        Err(Error::AlreadyExists { current, message }) | Err(Error::AlreadySettled { current, message }) => {
            recorded(Outcome::Fail, current.as_deref().map(register_of), message)
        }
        Err(Error::NotFound(m)) => recorded(Outcome::Fail, Some(Register::Absent), m),
        Err(Error::InvalidArgument(m)) => recorded(Outcome::Fail, None, m),
        // A read that failed changed nothing; a write that failed in an unknown way may have happened.
        Err(e) if write => recorded(Outcome::Info, None, e.to_string()),
        Err(e) => recorded(Outcome::Fail, None, e.to_string()),
    }
}

/// A workload client's connections: one that follows the leader for writes, and one pinned to
/// each node (node id, client) for reads.
#[derive(Debug)]
pub struct Connections {
    pub writer: Client,
    pub readers: Vec<(u64, Client)>,
}

/// One client's loop until `until_ns` (nanoseconds since `start`, read before every op: the run
/// moves it later when the final heal leaves too little load after it). Its choices come from
/// `seed`, so a replay issues the same sequence of operations. Returns the keys it touched.
pub async fn client(
    process: u64,
    conns: Connections,
    seed: u64,
    start: Instant,
    until_ns: Arc<AtomicU64>,
    next_id: Arc<AtomicU64>,
    out: mpsc::Sender<Entry>,
) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let Connections { writer: client, readers } = conns;
    let mut rng = StdRng::seed_from_u64(seed ^ process.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut n = 0u64;
    let ns = |t: Instant| t.saturating_duration_since(start).as_nanos() as u64;
    while ns(Instant::now()) < until_ns.load(Ordering::Relaxed) {
        n += 1;
        let generation = start.elapsed().as_millis() as u64 / GENERATION.as_millis() as u64;
        let key = format!("k{generation}-{}", rng.random_range(0..KEYS_PER_GENERATION));
        keys.insert(key.clone());
        let roll: u32 = rng.random_range(0..100);
        let kind = match roll {
            0..20 => OpKind::Create,
            20..40 => OpKind::Resolve,
            40..60 => OpKind::Reject,
            60..90 => OpKind::Get,
            _ => OpKind::Await,
        };
        let (node, reader) = &readers[rng.random_range(0..readers.len())];
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
            // The roll never picks a final read; were it to, a get is what one is.
            OpKind::Get | OpKind::FinalRead => reader.get(&key).await.map(|p| (Some(p), false)),
            OpKind::Await => reader.await_settled(&key, Duration::from_millis(500)).await.map(|p| (Some(p), false)),
        };
        let Recorded { outcome, observed, deduplicated, detail } = classify(kind, r);
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
            deduplicated,
            node: matches!(kind, OpKind::Get | OpKind::Await).then_some(*node),
            detail,
        };
        if out.send(Entry::Op(op)).await.is_err() {
            break;
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn promise(state: pb::State, value: &str) -> pb::Promise {
        let value = pb::Value { headers: Default::default(), data: value.as_bytes().to_vec() };
        pb::Promise { id: "k".into(), state: state.into(), value: Some(value), ..Default::default() }
    }

    #[test]
    fn a_deduplicated_answer_is_recorded_as_a_field_of_the_op() {
        let resolved = promise(pb::State::Resolved, "p1-7");
        let r = classify(OpKind::Resolve, Ok((Some(resolved.clone()), true)));
        let want = Register::Resolved { value: "p1-7".into() };
        assert_eq!((r.outcome, r.observed.as_ref(), r.deduplicated), (Outcome::Ok, Some(&want), true));
        assert_eq!(r.detail, "", "the flag lives in its field, not in the text");
        let plain = classify(OpKind::Create, Ok((Some(promise(pb::State::Pending, "")), false)));
        assert_eq!((plain.observed, plain.deduplicated), (Some(Register::Pending), false));
        // Reads have no dedup table; a flag on one would mean nothing.
        assert!(!classify(OpKind::Get, Ok((Some(resolved), true))).deduplicated);
    }

    #[test]
    fn refusals_fail_with_what_they_showed_and_lost_writes_are_unknown() {
        let current = Some(Box::new(promise(pb::State::RejectedTimedout, "")));
        let refused = classify(OpKind::Resolve, Err(Error::AlreadySettled { message: "settled".into(), current }));
        assert_eq!(refused.outcome, Outcome::Fail);
        assert_eq!(refused.observed, Some(Register::Rejected { value: String::new() }));
        let absent = classify(OpKind::Get, Err(Error::NotFound("k".into())));
        assert_eq!((absent.outcome, absent.observed), (Outcome::Fail, Some(Register::Absent)));
        let lost = || Error::Unavailable { message: "deadline".into(), outcome_unknown: true };
        let write = classify(OpKind::Create, Err(lost()));
        assert_eq!((write.outcome, write.observed), (Outcome::Info, None));
        let read = classify(OpKind::Await, Err(lost()));
        assert_eq!((read.outcome, read.observed), (Outcome::Fail, None), "a failed read changed nothing");
        let invalid = classify(OpKind::Reject, Err(Error::InvalidArgument("too long".into())));
        assert_eq!((invalid.outcome, invalid.observed), (Outcome::Fail, None));
    }
}
