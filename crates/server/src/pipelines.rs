//! Pipelines in vow's own terms, for every protocol edge: `Submit` (create a graph's promises
//! and register its continuations) and `GetContinuation`. Like [`crate::service`], it reaches
//! shards only through the [`Router`].
//!
//! A Submit becomes one `Batch` command per shard it touches — that shard's creates, then its
//! registrations — sent to the shards at once. Each batch applies whole or not at all. A
//! single-source continuation is registered on its source's shard; a join on its target's
//! shard, with one delivery continuation per source on that source's shard. What a failed part
//! leaves is reported, and the same Submit again (with its idempotency key) completes it: the
//! creates deduplicate by key and the registrations by content.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::future::join_all;
use vow_core::pipeline::{self, Action, Continuation, ContinuationRecord};
use vow_core::{Command, Outcome, Promise, PromiseId, ShardId};

use crate::functions::Functions;
use crate::router::{Progress, Router};
use crate::shard::ShardError;

/// A Submit, validated field by field at the edge.
#[derive(Debug, Clone)]
pub struct Submission {
    /// `Command::Create`s.
    pub creates: Vec<Command>,
    pub continuations: Vec<Continuation>,
    pub idempotency_key: String,
    /// W3C trace context, passed to every function of the graph.
    pub traceparent: String,
}

/// Why a Submit did not register the whole graph.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The graph is refused whole; nothing was proposed.
    #[error("{0}")]
    Invalid(String),
    /// A shard refused its part (an id taken, a source missing); `registered` names what did
    /// apply.
    #[error("{problem}; {registered}")]
    Refused { problem: String, conflict: bool, registered: String },
    /// A shard could not be reached; the same Submit again completes the graph.
    #[error("{problem}; {registered}; submit again with the same idempotency key to complete it")]
    Unavailable { problem: String, registered: String, outcome_unknown: bool },
}

/// A continuation as the shard storing it has it, with its leader's progress.
#[derive(Debug, Clone)]
pub struct Found {
    pub shard: ShardId,
    pub record: ContinuationRecord,
    pub progress: Progress,
}

/// Submit and GetContinuation. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pipelines {
    router: Router,
    functions: Functions,
}

impl Pipelines {
    pub fn new(router: Router, functions: Functions) -> Pipelines {
        Pipelines { router, functions }
    }

    /// Creates the promises and registers the continuations; the created records in request
    /// order.
    pub async fn submit(&self, mut s: Submission) -> Result<Vec<Promise>, SubmitError> {
        let mut created = BTreeSet::new();
        let mut deadlines = BTreeMap::new();
        for c in &mut s.creates {
            let Command::Create { id, deadline_ms, idempotency_key, .. } = c else {
                return Err(SubmitError::Invalid("only creates may be submitted as promises".into()));
            };
            if !created.insert(id.clone()) {
                return Err(SubmitError::Invalid(format!("promise {id} is created twice")));
            }
            deadlines.insert(id.clone(), *deadline_ms);
            if idempotency_key.is_empty() && !s.idempotency_key.is_empty() {
                *idempotency_key = format!("vow-submit:{}", s.idempotency_key);
            }
        }
        pipeline::validate(&created, &s.continuations).map_err(|e| SubmitError::Invalid(e.to_string()))?;
        for c in &mut s.continuations {
            if let Action::Invoke { url, headers, .. } = &mut c.action {
                if !url.starts_with("http://") {
                    return Err(SubmitError::Invalid(format!(
                        "continuation {:?}: only http:// function URLs are supported so far",
                        c.id
                    )));
                }
                if !s.traceparent.is_empty() {
                    headers.insert("traceparent".to_owned(), s.traceparent.clone());
                }
            }
        }

        // Each shard's part: its creates first, then what is registered there.
        let mut parts: BTreeMap<ShardId, Vec<Command>> = BTreeMap::new();
        for c in &s.creates {
            let id = c.promise_id().expect("a create names its promise");
            parts.entry(self.router.shard_of(id)).or_default().push(c.clone());
        }
        for c in &s.continuations {
            let target_deadline_ms = deadlines[&c.target];
            for registered in std::iter::once(c.clone()).chain(c.deliveries()) {
                let shard = self.router.shard_of(registered.anchor());
                parts
                    .entry(shard)
                    .or_default()
                    .push(Command::Register { continuation: registered, target_deadline_ms });
            }
        }
        let sent = join_all(parts.into_iter().map(|(shard, commands)| async move {
            if crate::sabotage::enabled("late-submit-creates")
                && commands.iter().any(|c| matches!(c, Command::Create { .. }))
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let result =
                self.router.write(Command::Batch { commands: commands.clone() }, Some(Duration::from_secs(10))).await;
            (shard, commands, result)
        }))
        .await;

        let mut records: BTreeMap<PromiseId, Promise> = BTreeMap::new();
        let (mut applied, mut refused, mut unavailable) = (Vec::new(), Vec::new(), Vec::new());
        let mut outcome_unknown = false;
        for (shard, commands, result) in sent {
            match result {
                Ok(Outcome::Batch { outcomes, applied: true }) => {
                    applied.push(shard);
                    for o in outcomes {
                        if let Outcome::Created { promise, .. } = o {
                            records.insert(promise.id.clone(), promise);
                        }
                    }
                }
                Ok(Outcome::Batch { outcomes, applied: false }) => {
                    let why = commands.iter().zip(&outcomes).find_map(|(c, o)| failure(c, o));
                    refused.push((shard, why.unwrap_or_else(|| ("refused".to_owned(), false))));
                }
                Ok(other) => refused.push((shard, (format!("unexpected outcome {other:?}"), false))),
                Err(e) => {
                    outcome_unknown |= matches!(e, ShardError::OutcomeUnknown { .. });
                    unavailable.push(format!("shard {shard}: {e}"));
                }
            }
        }
        let registered = if applied.is_empty() {
            "nothing was registered".to_owned()
        } else {
            let shards: Vec<String> = applied.iter().map(ToString::to_string).collect();
            format!("the parts on shards {} were registered", shards.join(", "))
        };
        if let Some((shard, (why, conflict))) = refused.into_iter().next() {
            return Err(SubmitError::Refused {
                problem: format!("shard {shard} refused its part: {why}"),
                conflict,
                registered,
            });
        }
        if !unavailable.is_empty() {
            return Err(SubmitError::Unavailable { problem: unavailable.join("; "), registered, outcome_unknown });
        }
        self.prewarm(&s.continuations);
        Ok(s.creates.iter().filter_map(|c| c.promise_id().and_then(|id| records.remove(id))).collect())
    }

    /// Tells every function with `prewarm` a call is coming, in the background.
    fn prewarm(&self, continuations: &[Continuation]) {
        for c in continuations {
            if let Action::Invoke { url, headers, prewarm: true, .. } = &c.action {
                let (functions, url, headers) = (self.functions.clone(), url.clone(), headers.clone());
                tokio::spawn(async move { functions.prewarm(&url, &headers).await });
            }
        }
    }

    /// The continuation `id`, from whichever shard stores it (each is asked at its leader).
    pub async fn get(&self, id: &str) -> Result<Option<Found>, ShardError> {
        let shards = (0..self.router.shard_count()).map(ShardId);
        let answers =
            join_all(shards.map(|shard| async move { (shard, self.router.read_continuation(shard, id).await) })).await;
        let mut first_error = None;
        for (shard, answer) in answers {
            match answer {
                Ok(Some((record, progress))) => return Ok(Some(Found { shard, record, progress })),
                Ok(None) => {}
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        match first_error {
            // The shard that did not answer may be the one holding it.
            Some(e) => Err(e),
            None => Ok(None),
        }
    }
}

/// What a failed command of a batch says, and whether it is a conflict (else a missing id).
fn failure(command: &Command, outcome: &Outcome) -> Option<(String, bool)> {
    Some(match (command, outcome) {
        (_, Outcome::CreateConflict { current }) => (
            format!(
                "promise {} already exists (state {}) and the idempotency key does not match",
                current.id, current.state
            ),
            true,
        ),
        (_, Outcome::RegisterConflict { current }) => {
            (format!("continuation {} is already registered with another definition", current.continuation.id), true)
        }
        (Command::Register { continuation, .. }, Outcome::NotFound) => {
            let shown = continuation.id.split(pipeline::DELIVERY_SEPARATOR).next().unwrap_or_default();
            (format!("continuation {shown}: promise {} does not exist", continuation.anchor()), false)
        }
        _ => return None,
    })
}
