//! The deterministic state machine: DESIGN.md §2 as one pure function.
//!
//! [`apply`] reads the records a command touches through a [`PromiseView`], and returns the
//! outcome, the record changes and the new cluster time. It never writes: the caller commits
//! the changes (RocksDB in the server, a `BTreeMap` in [`MemState`]), so the same log applied to
//! the same state gives the same changes, byte for byte.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::{Change, Command, Outcome, Proposal};
use crate::pipeline::{ContinuationRecord, Join, MAX_JOIN_RECORD_BYTES, Settlement, Status};
use crate::promise::{Promise, PromiseId, State, Value};

/// Read access to the current records, as of the previous command.
pub trait PromiseView {
    type Error;
    fn promise(&self, id: &PromiseId) -> Result<Option<Promise>, Self::Error>;
    fn continuation(&self, id: &str) -> Result<Option<ContinuationRecord>, Self::Error>;
    /// The ids of the continuations stored with `anchor` (see
    /// [`crate::pipeline::Continuation::anchor`]), in id order.
    fn anchored_on(&self, anchor: &PromiseId) -> Result<Vec<String>, Self::Error>;
}

/// The effect of a command on one continuation record; the storage layer derives the anchor
/// and ready index keys from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContinuationChange {
    pub before: Option<ContinuationRecord>,
    pub after: Option<ContinuationRecord>,
}

/// Work an entry leaves for the shard's leader: a continuation whose outcome is now in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Ready { continuation: String },
}

/// What applying one command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    pub changes: Vec<Change>,
    pub continuations: Vec<ContinuationChange>,
    pub effects: Vec<Effect>,
    /// `max(previous cluster time, proposal stamp)`: never runs backwards across leaders.
    pub cluster_time_ms: i64,
}

/// The records one command reads and writes: the view, overlaid with what the command (or
/// the batch it is part of) has changed so far.
struct Tx<'a, V> {
    view: &'a V,
    now: i64,
    index: u64,
    promises: BTreeMap<PromiseId, Option<Promise>>,
    records: BTreeMap<String, Option<ContinuationRecord>>,
    changes: Vec<Change>,
    continuations: Vec<ContinuationChange>,
    effects: Vec<Effect>,
}

impl<V: PromiseView> Tx<'_, V> {
    fn promise(&self, id: &PromiseId) -> Result<Option<Promise>, V::Error> {
        match self.promises.get(id) {
            Some(p) => Ok(p.clone()),
            None => self.view.promise(id),
        }
    }

    fn continuation(&self, id: &str) -> Result<Option<ContinuationRecord>, V::Error> {
        match self.records.get(id) {
            Some(r) => Ok(r.clone()),
            None => self.view.continuation(id),
        }
    }

    fn anchored_on(&self, anchor: &PromiseId) -> Result<Vec<String>, V::Error> {
        let mut ids: BTreeSet<String> = self.view.anchored_on(anchor)?.into_iter().collect();
        for (id, record) in &self.records {
            match record {
                Some(r) if r.continuation.anchor() == anchor => ids.insert(id.clone()),
                _ => ids.remove(id),
            };
        }
        Ok(ids.into_iter().collect())
    }

    /// Records a promise change; a settlement makes the continuations waiting on it ready.
    fn change(&mut self, change: Change) -> Result<(), V::Error> {
        let settled = change.newly_settled().cloned();
        let id = change.after.as_ref().or(change.before.as_ref()).map(|p| p.id.clone());
        if let Some(id) = id {
            self.promises.insert(id, change.after.clone());
        }
        self.changes.push(change);
        if let Some(p) = settled {
            self.source_settled(&p)?;
        }
        Ok(())
    }

    fn put(&mut self, before: Option<ContinuationRecord>, mut after: ContinuationRecord) {
        after.revision = self.index;
        if after.status == Status::Ready && before.as_ref().is_none_or(|b| b.status != Status::Ready) {
            self.effects.push(Effect::Ready { continuation: after.continuation.id.clone() });
        }
        self.records.insert(after.continuation.id.clone(), Some(after.clone()));
        self.continuations.push(ContinuationChange { before, after: Some(after) });
    }

    fn delete(&mut self, before: ContinuationRecord) {
        self.records.insert(before.continuation.id.clone(), None);
        self.continuations.push(ContinuationChange { before: Some(before), after: None });
    }

    /// `p` has just settled: what waits on it is ready, and a join whose target it is can no
    /// longer settle it.
    fn source_settled(&mut self, p: &Promise) -> Result<(), V::Error> {
        for id in self.anchored_on(&p.id)? {
            let Some(record) = self.continuation(&id)? else { continue };
            if record.status != Status::Waiting {
                continue;
            }
            let mut after = record.clone();
            after.status = if record.join.is_some() {
                Status::Done { note: format!("the target was settled ({}) before the join decided", p.state) }
            } else {
                Status::Ready
            };
            self.put(Some(record), after);
        }
        Ok(())
    }

    /// A pending promise whose deadline has passed is timed out by whichever command touches
    /// it first: a settle stamped after the deadline loses to the timeout.
    fn expire_if_due(&mut self, p: Promise) -> Result<Promise, V::Error> {
        if p.state.is_settled() || p.deadline_ms > self.now {
            return Ok(p);
        }
        let mut after = p.clone();
        time_out(&mut after, self.now, self.index);
        self.change(Change { before: Some(p), after: Some(after.clone()) })?;
        Ok(after)
    }

    fn run(&mut self, command: &Command) -> Result<Outcome, V::Error> {
        let (now, index) = (self.now, self.index);
        Ok(match command {
            Command::Create { id, param, deadline_ms, tags, idempotency_key } => match self.promise(id)? {
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
                    self.change(Change { before: None, after: Some(p.clone()) })?;
                    Outcome::Created { promise: p, deduplicated: false }
                }
                Some(existing) => {
                    let current = self.expire_if_due(existing)?;
                    if !idempotency_key.is_empty() && *idempotency_key == current.idempotency_key_create {
                        Outcome::Created { promise: current, deduplicated: true }
                    } else {
                        Outcome::CreateConflict { current }
                    }
                }
            },
            Command::Settle { id, settle_as, value, idempotency_key } => match self.promise(id)? {
                None => Outcome::NotFound,
                Some(existing) => {
                    let current = self.expire_if_due(existing)?;
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
                        self.change(Change { before: Some(current), after: Some(p.clone()) })?;
                        Outcome::Settled { promise: p, deduplicated: false }
                    }
                }
            },
            Command::Timeout { ids } => {
                let mut count = 0;
                let mut seen = BTreeSet::new();
                for id in ids.iter().filter(|id| seen.insert(*id)) {
                    if let Some(p) = self.promise(id)?
                        && !p.state.is_settled()
                        && p.deadline_ms <= now
                    {
                        let mut after = p.clone();
                        time_out(&mut after, now, index);
                        self.change(Change { before: Some(p), after: Some(after) })?;
                        count += 1;
                    }
                }
                Outcome::TimedOut { count }
            }
            Command::Collect { ids, retention_ms } => {
                let mut count = 0;
                let mut seen = BTreeSet::new();
                for id in ids.iter().filter(|id| seen.insert(*id)) {
                    let Some(p) = self.promise(id)? else { continue };
                    if !p.state.is_settled() || p.settled_at_ms.saturating_add(*retention_ms) > now {
                        continue;
                    }
                    // A ready continuation still needs its source's outcome: the promise stays
                    // until it is done. The rest go with the promise they are stored with.
                    let anchored = self.anchored_on(id)?;
                    let mut records = Vec::with_capacity(anchored.len());
                    for cid in &anchored {
                        records.extend(self.continuation(cid)?);
                    }
                    if records.iter().any(|r| r.status == Status::Ready) {
                        continue;
                    }
                    for r in records {
                        self.delete(r);
                    }
                    self.change(Change { before: Some(p), after: None })?;
                    count += 1;
                }
                Outcome::Collected { count }
            }
            Command::Batch { commands } => {
                let mut outcomes = Vec::with_capacity(commands.len());
                for c in commands {
                    outcomes.push(self.run(c)?);
                }
                let applied = !outcomes.iter().any(Outcome::is_failure);
                Outcome::Batch { outcomes, applied }
            }
            Command::Register { continuation, target_deadline_ms } => {
                if let Some(current) = self.continuation(&continuation.id)? {
                    return Ok(if current.continuation == *continuation {
                        Outcome::Registered { record: current, deduplicated: true }
                    } else {
                        Outcome::RegisterConflict { current }
                    });
                }
                let Some(anchor) = self.promise(continuation.anchor())? else { return Ok(Outcome::NotFound) };
                let anchor = self.expire_if_due(anchor)?;
                let join = continuation.combinator.map(|c| Join::new(c, continuation.sources.clone()));
                let status = match (&join, anchor.state.is_settled()) {
                    (_, false) => Status::Waiting,
                    (None, true) => Status::Ready,
                    (Some(_), true) => Status::Done {
                        note: format!("the target was settled ({}) before the join decided", anchor.state),
                    },
                };
                let record = ContinuationRecord {
                    continuation: continuation.clone(),
                    target_deadline_ms: *target_deadline_ms,
                    status,
                    join,
                    registered_at_ms: now,
                    revision: index,
                };
                self.put(None, record.clone());
                let record = self.continuation(&continuation.id)?.unwrap_or(record);
                Outcome::Registered { record, deduplicated: false }
            }
            Command::Offer { join: id, target, index: input, outcome } => {
                let Some(record) = self.continuation(id)? else { return Ok(Outcome::NotFound) };
                if record.continuation.target != *target || record.join.is_none() {
                    return Ok(Outcome::NotFound);
                }
                if record.status != Status::Waiting {
                    return Ok(Outcome::Offered { record });
                }
                let mut after = record.clone();
                let join = after.join.as_mut().expect("checked above");
                let size: usize =
                    join.inputs.iter().flatten().map(Settlement::size_hint).sum::<usize>() + outcome.size_hint();
                if size > MAX_JOIN_RECORD_BYTES && join.decided.is_none() {
                    // Keep the record bounded: the join fails, naming why, and drops its inputs.
                    join.inputs.iter_mut().for_each(|i| *i = None);
                    let why = format!(
                        "the join's inputs total {size} bytes, over the {MAX_JOIN_RECORD_BYTES} a join may hold"
                    );
                    join.decided = Some(Settlement {
                        state: State::Rejected,
                        value: Value { headers: BTreeMap::new(), data: why.into_bytes() },
                    });
                } else if join.offer(*input as usize, outcome.clone()).is_none() {
                    if after.join != record.join {
                        self.put(Some(record), after.clone());
                    }
                    return Ok(Outcome::Offered { record: after });
                }
                after.status = Status::Ready;
                self.put(Some(record), after.clone());
                Outcome::Offered { record: after }
            }
            Command::Complete { done } => {
                let mut count = 0;
                for c in done {
                    let Some(record) = self.continuation(&c.id)? else { continue };
                    if let Status::Done { .. } = record.status {
                        continue;
                    }
                    let mut after = record.clone();
                    after.status = Status::Done { note: c.note.clone() };
                    self.put(Some(record), after);
                    count += 1;
                }
                Outcome::Completed { count }
            }
        })
    }
}

/// Applies the command at log `index`, given the cluster time before it.
pub fn apply<V: PromiseView>(
    view: &V,
    cluster_time_ms: i64,
    index: u64,
    proposal: &Proposal,
) -> Result<Applied, V::Error> {
    let now = cluster_time_ms.max(proposal.stamp_ms);
    let mut tx = Tx {
        view,
        now,
        index,
        promises: BTreeMap::new(),
        records: BTreeMap::new(),
        changes: Vec::new(),
        continuations: Vec::new(),
        effects: Vec::new(),
    };
    let outcome = tx.run(&proposal.command)?;
    if let Outcome::Batch { applied: false, .. } = outcome {
        // All or nothing: a failed batch leaves the state as it found it.
        return Ok(Applied { outcome, changes: vec![], continuations: vec![], effects: vec![], cluster_time_ms: now });
    }
    Ok(Applied {
        outcome,
        changes: tx.changes,
        continuations: tx.continuations,
        effects: tx.effects,
        cluster_time_ms: now,
    })
}

fn time_out(p: &mut Promise, now: i64, index: u64) {
    p.state = State::RejectedTimedout;
    p.settled_at_ms = now;
    p.revision = index;
}

/// An in-memory state: the reference model for tests and the simplest [`PromiseView`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemState {
    pub promises: BTreeMap<PromiseId, Promise>,
    pub continuations: BTreeMap<String, ContinuationRecord>,
    pub cluster_time_ms: i64,
    pub applied_index: u64,
}

impl PromiseView for MemState {
    type Error = std::convert::Infallible;
    fn promise(&self, id: &PromiseId) -> Result<Option<Promise>, Self::Error> {
        Ok(self.promises.get(id).cloned())
    }

    fn continuation(&self, id: &str) -> Result<Option<ContinuationRecord>, Self::Error> {
        Ok(self.continuations.get(id).cloned())
    }

    fn anchored_on(&self, anchor: &PromiseId) -> Result<Vec<String>, Self::Error> {
        Ok(self
            .continuations
            .values()
            .filter(|r| r.continuation.anchor() == anchor)
            .map(|r| r.continuation.id.clone())
            .collect())
    }
}

impl MemState {
    /// Applies the next command (at `applied_index + 1`) and commits its changes.
    pub fn apply(&mut self, proposal: &Proposal) -> Outcome {
        self.apply_with_effects(proposal).0
    }

    /// Like [`MemState::apply`], also returning the effects.
    pub fn apply_with_effects(&mut self, proposal: &Proposal) -> (Outcome, Vec<Effect>) {
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
        for change in applied.continuations {
            match (change.before, change.after) {
                (_, Some(after)) => {
                    self.continuations.insert(after.continuation.id.clone(), after);
                }
                (Some(before), None) => {
                    self.continuations.remove(&before.continuation.id);
                }
                (None, None) => {}
            }
        }
        self.cluster_time_ms = applied.cluster_time_ms;
        self.applied_index = index;
        (applied.outcome, applied.effects)
    }

    /// Every record in its on-disk encoding, in id order: equal states give equal bytes.
    pub fn encoded(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in self.promises.values() {
            out.extend_from_slice(&p.encode());
        }
        for r in self.continuations.values() {
            out.extend_from_slice(&r.encode());
        }
        out.extend_from_slice(&self.cluster_time_ms.to_be_bytes());
        out
    }
}
