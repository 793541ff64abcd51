//! Conversions between the public protobuf messages and core types, and the one place where
//! outcomes and errors become gRPC statuses.

use std::collections::BTreeMap;

use prost::Message;
use tonic::Status;
use tonic::metadata::MetadataValue;
use vow_api::metadata as md;
use vow_api::v1 as pb;
use vow_core::pipeline::{Action, Combinator, Continuation, On, Status as ContinuationState};
use vow_core::{Command, LimitError, Limits, Outcome, Promise, PromiseId, SettleAs, State, Value};

use crate::pipelines::{Found, Submission, SubmitError};
use crate::shard::ShardError;

pub fn state_to_pb(s: State) -> pb::State {
    match s {
        State::Pending => pb::State::Pending,
        State::Resolved => pb::State::Resolved,
        State::Rejected => pb::State::Rejected,
        State::RejectedCanceled => pb::State::RejectedCanceled,
        State::RejectedTimedout => pb::State::RejectedTimedout,
    }
}

pub fn state_from_pb(s: i32) -> Result<Option<State>, Status> {
    Ok(match pb::State::try_from(s).map_err(|_| Status::invalid_argument(format!("unknown state {s}")))? {
        pb::State::Unspecified => None,
        pb::State::Pending => Some(State::Pending),
        pb::State::Resolved => Some(State::Resolved),
        pb::State::Rejected => Some(State::Rejected),
        pb::State::RejectedCanceled => Some(State::RejectedCanceled),
        pb::State::RejectedTimedout => Some(State::RejectedTimedout),
    })
}

fn value_to_pb(v: Value) -> pb::Value {
    pb::Value { headers: v.headers.into_iter().collect(), data: v.data }
}

fn value_from_pb(v: Option<pb::Value>) -> Value {
    let v = v.unwrap_or_default();
    Value { headers: v.headers.into_iter().collect(), data: v.data }
}

pub fn promise_to_pb(p: Promise) -> pb::Promise {
    pb::Promise {
        id: p.id.into_string(),
        state: state_to_pb(p.state) as i32,
        param: Some(value_to_pb(p.param)),
        value: Some(value_to_pb(p.value)),
        deadline_ms: p.deadline_ms,
        tags: p.tags.into_iter().collect(),
        created_at_ms: p.created_at_ms,
        settled_at_ms: p.settled_at_ms,
        revision: p.revision,
        idempotency_key_create: p.idempotency_key_create,
        idempotency_key_settle: p.idempotency_key_settle,
    }
}

fn invalid(e: LimitError) -> Status {
    Status::invalid_argument(e.0)
}

/// Validates a create request and turns it into a command, resolving its deadline on `now_ms`.
pub fn create_command(limits: &Limits, r: pb::CreateRequest, now_ms: i64) -> Result<Command, Status> {
    let id = limits.check_id(&r.id).map_err(invalid)?;
    let param = value_from_pb(r.param);
    limits.check_value("param", &param).map_err(invalid)?;
    let tags: BTreeMap<String, String> = r.tags.into_iter().collect();
    limits.check_tags(&tags).map_err(invalid)?;
    limits.check_idempotency_key(&r.idempotency_key).map_err(invalid)?;
    let deadline_ms = limits.resolve_deadline(r.deadline_ms, now_ms).map_err(invalid)?;
    Ok(Command::Create { id, param, deadline_ms, tags, idempotency_key: r.idempotency_key })
}

pub fn settle_command(limits: &Limits, r: pb::SettleRequest, settle_as: SettleAs) -> Result<Command, Status> {
    let id = limits.check_id(&r.id).map_err(invalid)?;
    let value = value_from_pb(r.value);
    limits.check_value("value", &value).map_err(invalid)?;
    limits.check_idempotency_key(&r.idempotency_key).map_err(invalid)?;
    Ok(Command::Settle { id, settle_as, value, idempotency_key: r.idempotency_key })
}

/// Largest encoded record a refusal carries whole in its `vow-current-bin` trailer. Trailers
/// travel as HTTP/2 headers, which clients cap (grpcio at 8 KiB, hyper at 16 KiB, both counting
/// the base64 form and every other header): a bigger record would turn the refusal into a
/// protocol error.
pub const CURRENT_TRAILER_MAX_BYTES: usize = 4096;

/// `status` with the current record in its trailer: whole if it is small, otherwise without its
/// param, value and tags and marked `vow-current-trimmed` (a Get returns the whole record).
fn with_current(mut status: Status, current: Promise) -> Status {
    let mut record = promise_to_pb(current);
    let mut bytes = record.encode_to_vec();
    if bytes.len() > CURRENT_TRAILER_MAX_BYTES {
        record.param = None;
        record.value = None;
        record.tags.clear();
        bytes = record.encode_to_vec();
        status.metadata_mut().insert(md::CURRENT_TRIMMED, MetadataValue::from_static("true"));
    }
    status.metadata_mut().insert_bin(md::CURRENT_BIN, MetadataValue::from_bytes(&bytes));
    status
}

/// A domain outcome as the reply to a create or settle.
pub fn outcome_reply(outcome: Outcome) -> Result<pb::PromiseResponse, Status> {
    match outcome {
        Outcome::Created { promise, deduplicated } | Outcome::Settled { promise, deduplicated } => {
            Ok(pb::PromiseResponse { promise: Some(promise_to_pb(promise)), deduplicated, ..Default::default() })
        }
        Outcome::CreateConflict { current } => Err(with_current(
            Status::already_exists(format!(
                "promise {} already exists (state {}) and the idempotency key does not match",
                current.id, current.state
            )),
            current,
        )),
        Outcome::SettleConflict { current } => Err(with_current(
            Status::failed_precondition(format!(
                "promise {} is already {} and this request does not repeat that settlement",
                current.id, current.state
            )),
            current,
        )),
        Outcome::NotFound => Err(Status::not_found("no such promise")),
        Outcome::TimedOut { .. }
        | Outcome::Collected { .. }
        | Outcome::Batch { .. }
        | Outcome::Registered { .. }
        | Outcome::RegisterConflict { .. }
        | Outcome::Offered { .. }
        | Outcome::Completed { .. } => Err(Status::internal("internal command outcome returned to a client")),
    }
}

/// A shard error as a status, with the leader hint and the outcome-unknown marker in metadata.
/// Every shard error is UNAVAILABLE: this replica cannot serve now, another node or a later try
/// may (a stopped shard stops on this node only).
pub fn shard_status(e: &ShardError) -> Status {
    let mut status = Status::unavailable(e.to_string());
    if let ShardError::NotLeader { leader: Some((id, node)), .. } = e {
        add_leader_hint(&mut status, *id, &node.grpc_addr);
    }
    if matches!(e, ShardError::OutcomeUnknown { .. }) {
        mark_outcome_unknown(&mut status);
    }
    status
}

/// Names the shard leader in `status`'s metadata.
pub fn add_leader_hint(status: &mut Status, id: vow_core::NodeId, addr: &str) {
    if let Ok(v) = id.0.to_string().parse() {
        status.metadata_mut().insert(md::LEADER_ID, v);
    }
    if let Ok(v) = addr.parse() {
        status.metadata_mut().insert(md::LEADER_ADDR, v);
    }
}

pub fn mark_outcome_unknown(status: &mut Status) {
    status.metadata_mut().insert(md::OUTCOME_UNKNOWN, MetadataValue::from_static("true"));
}

/// A shard's Raft state as this node's replica sees it.
pub fn shard_to_pb(shard: &crate::shard::Shard) -> pb::ShardStatus {
    let m = shard.metrics();
    let membership = m.membership_config.membership();
    pb::ShardStatus {
        shard_id: shard.id.0,
        leader_id: m.current_leader.map_or(0, |l| l.0),
        term: m.current_term,
        commit_index: m.local_committed.map_or(0, |c| c.index),
        voters: membership.voter_ids().map(|v| v.0).collect(),
        learners: membership.learner_ids().map(|v| v.0).collect(),
        applied_index: m.last_applied.map_or(0, |a| a.index),
    }
}

/// A submitted continuation in core terms (the graph checks come after, in
/// [`vow_core::pipeline::validate`]).
pub fn continuation_from_pb(limits: &Limits, c: pb::Continuation) -> Result<Continuation, Status> {
    let name = if c.id.is_empty() { format!("to {}", c.target) } else { format!("{:?}", c.id) };
    let bad = |why: String| Status::invalid_argument(format!("continuation {name}: {why}"));
    let sources = c
        .sources
        .iter()
        .map(|s| limits.check_id(s).map_err(|e| bad(format!("source: {}", e.0))))
        .collect::<Result<Vec<_>, _>>()?;
    let target = limits.check_id(&c.target).map_err(|e| bad(format!("target: {}", e.0)))?;
    let combinator = match pb::Combinator::try_from(c.combinator) {
        Ok(pb::Combinator::Unspecified) => None,
        Ok(pb::Combinator::All) => Some(Combinator::All),
        Ok(pb::Combinator::Any) => Some(Combinator::Any),
        Ok(pb::Combinator::Race) => Some(Combinator::Race),
        Err(_) => return Err(bad(format!("unknown combinator {}", c.combinator))),
    };
    let on = match pb::On::try_from(c.on) {
        Ok(pb::On::Unspecified | pb::On::Resolved) => On::Resolved,
        Ok(pb::On::Rejected) => On::Rejected,
        Ok(pb::On::Settled) => On::Settled,
        Err(_) => return Err(bad(format!("unknown on {}", c.on))),
    };
    let action = match c.action {
        Some(pb::continuation::Action::Forward(f)) => Action::Forward { recover: f.recover },
        Some(pb::continuation::Action::Invoke(i)) => {
            let headers: BTreeMap<String, String> = i.headers.into_iter().collect();
            limits.check_tags(&headers).map_err(|e| bad(format!("headers: {}", e.0)))?;
            Action::Invoke { url: i.url, headers, timeout_ms: i.timeout_ms, prewarm: i.prewarm }
        }
        Some(pb::continuation::Action::Webhook(_)) => {
            return Err(bad("a webhook is registered with Subscribe (or a Create's webhooks), not submitted".into()));
        }
        None => return Err(bad("no action: give invoke or forward".into())),
    };
    // The target is settled by one continuation, so it names one: the default id.
    let id = if c.id.is_empty() { format!("to:{}", target) } else { c.id };
    Ok(Continuation { id, sources, target, combinator, on, action })
}

pub fn continuation_to_pb(c: Continuation) -> pb::Continuation {
    let combinator = match c.combinator {
        None => pb::Combinator::Unspecified,
        Some(Combinator::All) => pb::Combinator::All,
        Some(Combinator::Any) => pb::Combinator::Any,
        Some(Combinator::Race) => pb::Combinator::Race,
    };
    let on = match c.on {
        On::Resolved => pb::On::Resolved,
        On::Rejected => pb::On::Rejected,
        On::Settled => pb::On::Settled,
    };
    let action = match c.action {
        Action::Forward { recover } => Some(pb::continuation::Action::Forward(pb::Forward { recover })),
        Action::Invoke { url, headers, timeout_ms, prewarm } => Some(pb::continuation::Action::Invoke(pb::Invoke {
            url,
            headers: headers.into_iter().collect(),
            timeout_ms,
            prewarm,
        })),
        // A join's delivery: shown as forwarding its source's outcome to the join's target.
        Action::Deliver { .. } => Some(pb::continuation::Action::Forward(pb::Forward { recover: false })),
        Action::Notify { url, headers } => {
            Some(pb::continuation::Action::Webhook(pb::Webhook { url, headers: headers.into_iter().collect() }))
        }
    };
    pb::Continuation {
        id: c.id,
        sources: c.sources.into_iter().map(PromiseId::into_string).collect(),
        target: c.target.into_string(),
        combinator: combinator as i32,
        on: on as i32,
        action,
    }
}

/// A submitted graph, validated field by field, with each create's deadline resolved on `now_ms`.
pub fn submission_from_pb(limits: &Limits, r: pb::SubmitRequest, now_ms: i64) -> Result<Submission, Status> {
    limits.check_idempotency_key(&r.idempotency_key).map_err(invalid)?;
    if r.traceparent.len() > 512 {
        return Err(Status::invalid_argument("traceparent is longer than 512 bytes"));
    }
    let creates = r.promises.into_iter().map(|c| create_command(limits, c, now_ms)).collect::<Result<_, _>>()?;
    let continuations =
        r.continuations.into_iter().map(|c| continuation_from_pb(limits, c)).collect::<Result<_, _>>()?;
    Ok(Submission { creates, continuations, idempotency_key: r.idempotency_key, traceparent: r.traceparent })
}

pub fn submit_error_status(e: &SubmitError) -> Status {
    match e {
        SubmitError::Invalid(m) => Status::invalid_argument(m.clone()),
        SubmitError::Refused { conflict: true, .. } => Status::already_exists(e.to_string()),
        SubmitError::Refused { conflict: false, .. } => Status::not_found(e.to_string()),
        SubmitError::Unavailable { outcome_unknown, .. } => {
            let mut status = Status::unavailable(e.to_string());
            if *outcome_unknown {
                mark_outcome_unknown(&mut status);
            }
            status
        }
    }
}

pub fn continuation_status_to_pb(found: Found) -> pb::ContinuationStatus {
    let Found { shard, record, progress } = found;
    let note = match &record.status {
        ContinuationState::Done { note } => note.clone(),
        _ => String::new(),
    };
    pb::ContinuationStatus {
        status: record.status.name().to_owned(),
        note,
        attempts: progress.attempts,
        last_error: progress.last_error,
        next_attempt_ms: progress.next_attempt_ms,
        registered_at_ms: record.registered_at_ms,
        shard_id: shard.0,
        continuation: Some(continuation_to_pb(record.continuation)),
    }
}
