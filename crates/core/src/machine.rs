//! The deterministic state machine: DESIGN.md §2 as one pure function.
//!
//! [`apply`] reads the records a command touches through a [`PromiseView`], and returns the
//! outcome, the record changes and the new cluster time. It never writes: the caller commits
//! the changes (RocksDB in the server, a `BTreeMap` in [`MemState`]), so the same log applied to
//! the same state gives the same changes, byte for byte.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::{Change, Command, Outcome, Proposal};
use crate::promise::{Promise, PromiseId, State, Value};

/// Read access to the current records, as of the previous command.
pub trait PromiseView {
    type Error;
    fn promise(&self, id: &PromiseId) -> Result<Option<Promise>, Self::Error>;
}

/// What applying one command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    pub changes: Vec<Change>,
    /// `max(previous cluster time, proposal stamp)`: never runs backwards across leaders.
    pub cluster_time_ms: i64,
}

/// Applies the command at log `index`, given the cluster time before it.
pub fn apply<V: PromiseView>(
    view: &V,
    cluster_time_ms: i64,
    index: u64,
    proposal: &Proposal,
) -> Result<Applied, V::Error> {
    let now = cluster_time_ms.max(proposal.stamp_ms);
    let mut changes = Vec::new();
    let outcome = match &proposal.command {
        Command::Create { id, param, deadline_ms, tags, idempotency_key } => match view.promise(id)? {
            None => {
                let mut p = Promise {
                    id: id.clone(),
                    state: State::Pending,
                    param: param.clone(),
                    value: Value::default(),
                    deadline_ms: *deadline_ms,
                    tags: tags.clone(),
                    created_at_ms: now,
                    settled_at_ms: 0,
                    idempotency_key_create: idempotency_key.clone(),
                    idempotency_key_settle: String::new(),
                    revision: index,
                };
                if p.deadline_ms <= now {
                    time_out(&mut p, now, index);
                }
                changes.push(Change { before: None, after: Some(p.clone()) });
                Outcome::Created { promise: p, deduplicated: false }
            }
            Some(existing) => {
                let current = expire_if_due(existing, now, index, &mut changes);
                if !idempotency_key.is_empty() && *idempotency_key == current.idempotency_key_create {
                    Outcome::Created { promise: current, deduplicated: true }
                } else {
                    Outcome::CreateConflict { current }
                }
            }
        },
        Command::Settle { id, settle_as, value, idempotency_key } => match view.promise(id)? {
            None => Outcome::NotFound,
            Some(existing) => {
                let current = expire_if_due(existing, now, index, &mut changes);
                if current.state.is_settled() {
                    if !idempotency_key.is_empty()
                        && *idempotency_key == current.idempotency_key_settle
                        && settle_as.state() == current.state
                    {
                        Outcome::Settled { promise: current, deduplicated: true }
                    } else {
                        Outcome::SettleConflict { current }
                    }
                } else {
                    let mut p = current.clone();
                    p.state = settle_as.state();
                    p.value = value.clone();
                    p.settled_at_ms = now;
                    p.idempotency_key_settle = idempotency_key.clone();
                    p.revision = index;
                    changes.push(Change { before: Some(current), after: Some(p.clone()) });
                    Outcome::Settled { promise: p, deduplicated: false }
                }
            }
        },
        Command::Timeout { ids } => {
            let mut count = 0;
            let mut seen = BTreeSet::new();
            for id in ids.iter().filter(|id| seen.insert(*id)) {
                if let Some(p) = view.promise(id)?
                    && !p.state.is_settled()
                    && p.deadline_ms <= now
                {
                    let mut after = p.clone();
                    time_out(&mut after, now, index);
                    changes.push(Change { before: Some(p), after: Some(after) });
                    count += 1;
                }
            }
            Outcome::TimedOut { count }
        }
        Command::Collect { ids, retention_ms } => {
            let mut count = 0;
            let mut seen = BTreeSet::new();
            for id in ids.iter().filter(|id| seen.insert(*id)) {
                if let Some(p) = view.promise(id)?
                    && p.state.is_settled()
                    && p.settled_at_ms.saturating_add(*retention_ms) <= now
                {
                    changes.push(Change { before: Some(p), after: None });
                    count += 1;
                }
            }
            Outcome::Collected { count }
        }
    };
    Ok(Applied { outcome, changes, cluster_time_ms: now })
}

fn time_out(p: &mut Promise, now: i64, index: u64) {
    p.state = State::RejectedTimedout;
    p.settled_at_ms = now;
    p.revision = index;
}

/// A pending promise whose deadline has passed is timed out by whichever command touches it
/// first: a settle stamped after the deadline loses to the timeout.
fn expire_if_due(p: Promise, now: i64, index: u64, changes: &mut Vec<Change>) -> Promise {
    if p.state.is_settled() || p.deadline_ms > now {
        return p;
    }
    let mut after = p.clone();
    time_out(&mut after, now, index);
    changes.push(Change { before: Some(p), after: Some(after.clone()) });
    after
}

/// An in-memory state: the reference model for tests and the simplest [`PromiseView`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemState {
    pub promises: BTreeMap<PromiseId, Promise>,
    pub cluster_time_ms: i64,
    pub applied_index: u64,
}

impl PromiseView for MemState {
    type Error = std::convert::Infallible;
    fn promise(&self, id: &PromiseId) -> Result<Option<Promise>, Self::Error> {
        Ok(self.promises.get(id).cloned())
    }
}

impl MemState {
    /// Applies the next command (at `applied_index + 1`) and commits its changes.
    pub fn apply(&mut self, proposal: &Proposal) -> Outcome {
        let index = self.applied_index + 1;
        let Ok(applied) = apply(self, self.cluster_time_ms, index, proposal);
        for change in applied.changes {
            match (change.before, change.after) {
                (_, Some(after)) => {
                    self.promises.insert(after.id.clone(), after);
                }
                (Some(before), None) => {
                    self.promises.remove(&before.id);
                }
                (None, None) => {}
            }
        }
        self.cluster_time_ms = applied.cluster_time_ms;
        self.applied_index = index;
        applied.outcome
    }

    /// Every record in its on-disk encoding, in id order: equal states give equal bytes.
    pub fn encoded(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in self.promises.values() {
            out.extend_from_slice(&p.encode());
        }
        out.extend_from_slice(&self.cluster_time_ms.to_be_bytes());
        out
    }
}
