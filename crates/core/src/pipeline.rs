//! Pipelines (DESIGN.md §4): continuations, what each does with its sources' outcomes, and the
//! checks a submitted graph must pass before anything of it is proposed.
//!
//! A continuation says "when these sources settle, settle `target`": with the sources' outcome
//! itself (`Forward`) or with what an HTTP function answers when given it (`Invoke`). The
//! rules here are pure, like the rest of this crate: [`step`] decides what one source's outcome
//! means for the target, [`Join::offer`] decides a combinator over several sources as their
//! outcomes arrive (in log order on the join's shard, so every replica decides the same), and
//! [`validate`] refuses graphs that could never complete or would complete twice.
//!
//! The `on` filter follows JavaScript's `then` / `catch` / `finally`: a continuation whose
//! filter does not match its source's outcome does not run, and the outcome passes through to
//! its target unchanged, so a rejection flows down a chain of `then` steps to the first `catch`
//! (`on: rejected`) and a resolution skips the catches.

use std::collections::{BTreeMap, BTreeSet};

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::promise::{PromiseId, SettleAs, State, Value};

/// Most continuations one Submit may register.
pub const MAX_CONTINUATIONS: usize = 1_000;
/// Most sources one continuation may join.
pub const MAX_SOURCES: usize = 16;
/// Most bytes a join's record may hold. Its inputs are kept until it decides (`all` resolves
/// with every one of them), so an offer that would take the record past this decides the join
/// as a rejection instead: a record must stay well inside
/// [`crate::HARD_MAX_RECORD_BYTES`], which bounds snapshot records and Raft messages.
pub const MAX_JOIN_RECORD_BYTES: usize = crate::HARD_MAX_RECORD_BYTES / 2;
/// Separates a join's id from the index of the source whose delivery continuation it names
/// (`<join id>#<index>`); user continuation ids may not contain it.
pub const DELIVERY_SEPARATOR: char = '#';
/// Longest continuation id, in bytes.
pub const MAX_CONTINUATION_ID_BYTES: usize = 256;
/// Longest function URL, in bytes.
pub const MAX_URL_BYTES: usize = 2_048;

/// Which source outcomes make a continuation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum On {
    #[default]
    Resolved,
    /// Any rejection: rejected, canceled or timed out (a catch).
    Rejected,
    /// Any settlement (a finally).
    Settled,
}

impl On {
    pub fn matches(self, state: State) -> bool {
        match self {
            On::Resolved => state == State::Resolved,
            On::Rejected => state.is_settled() && state != State::Resolved,
            On::Settled => state.is_settled(),
        }
    }
}

/// How several sources combine into the one outcome the action runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combinator {
    /// Resolved with every source's outcome once all resolve; rejected by the first rejection.
    All,
    /// Resolved by the first resolution; rejected with every outcome once all reject.
    Any,
    /// Settled as the first source to settle.
    Race,
}

/// What a continuation does when it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Settle the target with the outcome; with `recover`, a rejection resolves it instead
    /// (a catch that handles the error).
    Forward { recover: bool },
    /// POST the outcome to an HTTP function; its answer settles the target.
    Invoke { url: String, headers: BTreeMap<String, String>, timeout_ms: u32, prewarm: bool },
    /// Internal, never submitted: offer the source's outcome to join `join` (on the target's
    /// shard) as input `index`. The server registers one per source of a join.
    Deliver { join: String, index: u32 },
    /// A webhook (`Subscribe`): POST the source's record to `url`. Settles nothing: its
    /// target is its source, and it runs on any settlement.
    Notify { url: String, headers: BTreeMap<String, String> },
}

/// One step of a pipeline: when `sources` settle, run `action` (if `on` matches) and settle
/// `target`. With one source `combinator` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    pub id: String,
    pub sources: Vec<PromiseId>,
    pub target: PromiseId,
    pub combinator: Option<Combinator>,
    pub on: On,
    pub action: Action,
}

/// A settled outcome: what a source ended as, or what a join decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub state: State,
    pub value: Value,
}

/// What a continuation's target gets, given the outcome it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Settle the target with this, now: no function to call.
    Settle { settle_as: SettleAs, value: Value },
    /// Call the function with the outcome; its answer settles the target.
    Invoke,
    /// Offer the outcome to the join the continuation delivers to.
    Deliver,
    /// Send the source's record to the webhook.
    Notify,
}

/// The settle that passes `outcome` on unchanged. A timeout cannot be written by a settle, so
/// a timed-out outcome passes on as a rejection, its value marked with
/// `vow-source-state: REJECTED_TIMEDOUT`.
pub fn pass_on(outcome: &Settlement) -> (SettleAs, Value) {
    match outcome.state {
        State::Resolved => (SettleAs::Resolve, outcome.value.clone()),
        State::RejectedCanceled => (SettleAs::Cancel, outcome.value.clone()),
        State::Rejected | State::Pending => (SettleAs::Reject, outcome.value.clone()),
        State::RejectedTimedout => {
            let mut value = outcome.value.clone();
            value.headers.insert("vow-source-state".to_owned(), "REJECTED_TIMEDOUT".to_owned());
            (SettleAs::Reject, value)
        }
    }
}

/// What the target of a continuation with filter `on` and `action` gets once the outcome it
/// runs on (its source's, or its join's) is `outcome`.
pub fn step(on: On, action: &Action, outcome: &Settlement) -> Next {
    match action {
        Action::Deliver { .. } => return Next::Deliver,
        Action::Notify { .. } => return Next::Notify,
        _ => {}
    }
    if !on.matches(outcome.state) {
        let (settle_as, value) = pass_on(outcome);
        return Next::Settle { settle_as, value };
    }
    match action {
        Action::Forward { recover: true } if outcome.state != State::Resolved => {
            Next::Settle { settle_as: SettleAs::Resolve, value: outcome.value.clone() }
        }
        Action::Forward { .. } => {
            let (settle_as, value) = pass_on(outcome);
            Next::Settle { settle_as, value }
        }
        Action::Invoke { .. } => Next::Invoke,
        Action::Deliver { .. } => Next::Deliver,
        Action::Notify { .. } => Next::Notify,
    }
}

/// A combinator's state over its sources, as their outcomes arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub combinator: Combinator,
    pub sources: Vec<PromiseId>,
    /// Each source's outcome once it arrived, by the source's position.
    pub inputs: Vec<Option<Settlement>>,
    /// What the join decided, once it has.
    pub decided: Option<Settlement>,
}

impl Join {
    pub fn new(combinator: Combinator, sources: Vec<PromiseId>) -> Self {
        let inputs = vec![None; sources.len()];
        Join { combinator, sources, inputs, decided: None }
    }

    /// Takes source `index`'s outcome and returns the decision if this input made it. A
    /// repeated input (a redelivery) and any input after the decision change nothing, so a
    /// source's outcome may be delivered more than once.
    pub fn offer(&mut self, index: usize, outcome: Settlement) -> Option<&Settlement> {
        if self.decided.is_some() || self.inputs.get(index).is_none_or(Option::is_some) {
            return None;
        }
        let state = outcome.state;
        self.inputs[index] = Some(outcome);
        let all_in = self.inputs.iter().all(Option::is_some);
        let decided = match self.combinator {
            Combinator::Race => self.inputs[index].clone(),
            Combinator::All if state != State::Resolved => self.inputs[index].clone(),
            Combinator::Any if state == State::Resolved => self.inputs[index].clone(),
            Combinator::All if all_in => Some(Settlement { state: State::Resolved, value: self.list() }),
            Combinator::Any if all_in => Some(Settlement { state: State::Rejected, value: self.list() }),
            Combinator::All | Combinator::Any => None,
        };
        self.decided = decided;
        self.decided.as_ref()
    }

    /// Every source's outcome as one value: a JSON array, in the sources' order, of
    /// `{"id": ..., "state": ..., "value": <base64 data>, "headers": {...}}`, with
    /// `content-type: application/json`.
    fn list(&self) -> Value {
        let items: Vec<String> = self
            .sources
            .iter()
            .zip(&self.inputs)
            .filter_map(|(id, input)| {
                let input = input.as_ref()?;
                let headers: Vec<String> =
                    input.value.headers.iter().map(|(k, v)| format!("{}:{}", json_string(k), json_string(v))).collect();
                Some(format!(
                    "{{\"id\":{},\"state\":{},\"value\":\"{}\",\"headers\":{{{}}}}}",
                    json_string(id.as_str()),
                    json_string(input.state.name()),
                    base64(&input.value.data),
                    headers.join(",")
                ))
            })
            .collect();
        let headers = BTreeMap::from([("content-type".to_owned(), "application/json".to_owned())]);
        Value { headers, data: format!("[{}]", items.join(",")).into_bytes() }
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Standard base64 with padding (RFC 4648 §4), as the protobuf JSON mapping writes bytes.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

const CONTINUATION_FORMAT: u8 = 1;

impl Continuation {
    /// Encodes the continuation for the log and the state column family (format version 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        self.encode_into(&mut e);
        e.into_bytes()
    }

    pub(crate) fn encode_into(&self, e: &mut Encoder) {
        e.u8(CONTINUATION_FORMAT).str(&self.id).u64(self.sources.len() as u64);
        for s in &self.sources {
            e.str(s.as_str());
        }
        e.str(self.target.as_str());
        e.u8(match self.combinator {
            None => 0,
            Some(Combinator::All) => 1,
            Some(Combinator::Any) => 2,
            Some(Combinator::Race) => 3,
        });
        e.u8(match self.on {
            On::Resolved => 1,
            On::Rejected => 2,
            On::Settled => 3,
        });
        match &self.action {
            Action::Forward { recover } => {
                e.u8(1).bool(*recover);
            }
            Action::Invoke { url, headers, timeout_ms, prewarm } => {
                e.u8(2).str(url).map(headers).u64(u64::from(*timeout_ms)).bool(*prewarm);
            }
            Action::Deliver { join, index } => {
                e.u8(3).str(join).u64(u64::from(*index));
            }
            Action::Notify { url, headers } => {
                e.u8(4).str(url).map(headers);
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        let c = Continuation::decode_from(&mut d)?;
        d.finish()?;
        Ok(c)
    }

    pub(crate) fn decode_from(d: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        d.version("continuation", CONTINUATION_FORMAT)?;
        let id = d.string("continuation id")?;
        let count = d.u64("source count")?;
        // Each source takes at least one byte: a count beyond what is left is corrupt, and
        // must not size an allocation.
        if count > d.remaining() as u64 {
            return Err(DecodeError::Invalid("source count"));
        }
        let sources =
            (0..count).map(|_| d.string("source id").map(PromiseId::new_unchecked)).collect::<Result<_, _>>()?;
        let target = PromiseId::new_unchecked(d.string("target id")?);
        let combinator = match d.u8("combinator")? {
            0 => None,
            1 => Some(Combinator::All),
            2 => Some(Combinator::Any),
            3 => Some(Combinator::Race),
            _ => return Err(DecodeError::Invalid("combinator")),
        };
        let on = match d.u8("on")? {
            1 => On::Resolved,
            2 => On::Rejected,
            3 => On::Settled,
            _ => return Err(DecodeError::Invalid("on")),
        };
        let action = match d.u8("action")? {
            1 => Action::Forward { recover: d.bool("recover")? },
            2 => Action::Invoke {
                url: d.string("function url")?,
                headers: d.map("function headers")?,
                timeout_ms: d.u32("function timeout")?,
                prewarm: d.bool("prewarm")?,
            },
            3 => Action::Deliver { join: d.string("join id")?, index: d.u32("join input")? },
            4 => Action::Notify { url: d.string("webhook url")?, headers: d.map("webhook headers")? },
            _ => return Err(DecodeError::Invalid("action")),
        };
        Ok(Continuation { id, sources, target, combinator, on, action })
    }

    /// The promise whose shard stores this continuation: a join's target (the join state lives
    /// with it), otherwise the one source, whose settlement makes it ready.
    pub fn anchor(&self) -> &PromiseId {
        match self.combinator {
            Some(_) => &self.target,
            None => &self.sources[0],
        }
    }

    /// The delivery continuations a join needs, one per source, each stored on its source's
    /// shard: `<join id>#<index>`, run on any settlement.
    pub fn deliveries(&self) -> Vec<Continuation> {
        if self.combinator.is_none() {
            return Vec::new();
        }
        self.sources
            .iter()
            .enumerate()
            .map(|(i, source)| Continuation {
                id: format!("{}{DELIVERY_SEPARATOR}{i}", self.id),
                sources: vec![source.clone()],
                target: self.target.clone(),
                combinator: None,
                on: On::Settled,
                action: Action::Deliver { join: self.id.clone(), index: i as u32 },
            })
            .collect()
    }
}

impl Settlement {
    pub(crate) fn encode_into(&self, e: &mut Encoder) {
        e.u8(self.state.code());
        self.value.encode(e);
    }

    pub(crate) fn decode_from(d: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(Settlement { state: State::from_code(d.u8("settlement state")?)?, value: Value::decode(d)? })
    }

    /// Roughly the bytes it takes in a record.
    pub fn size_hint(&self) -> usize {
        16 + self.value.data.len() + self.value.headers.iter().map(|(k, v)| k.len() + v.len() + 8).sum::<usize>()
    }
}

/// A continuation the executor finished, and how (shown by `GetContinuation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub id: String,
    pub note: String,
}

/// Where a registered continuation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The outcome it runs on is not in yet: its source is pending, its join undecided.
    Waiting,
    /// The outcome is in; the leader of the continuation's shard runs it.
    Ready,
    /// Finished: its target is settled, or can no longer be settled by it; `note` says how.
    Done { note: String },
}

impl Status {
    pub fn name(&self) -> &'static str {
        match self {
            Status::Waiting => "WAITING",
            Status::Ready => "READY",
            Status::Done { .. } => "DONE",
        }
    }
}

/// A continuation as its shard stores it (key range `S 0x04`, see `vow-storage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContinuationRecord {
    pub continuation: Continuation,
    /// The target's deadline: the executor retries transient failures until then, after which
    /// the target has timed out anyway.
    pub target_deadline_ms: i64,
    pub status: Status,
    /// A join's state, for a continuation with a combinator; `None` otherwise.
    pub join: Option<Join>,
    pub registered_at_ms: i64,
    /// The log index of its last change.
    pub revision: u64,
}

const RECORD_FORMAT: u8 = 1;

impl ContinuationRecord {
    /// The outcome this continuation runs on when it is stored with a join: the join's
    /// decision. Single-source continuations run on their source's record instead.
    pub fn decided(&self) -> Option<&Settlement> {
        self.join.as_ref().and_then(|j| j.decided.as_ref())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u8(RECORD_FORMAT);
        self.continuation.encode_into(&mut e);
        e.i64(self.target_deadline_ms);
        match &self.status {
            Status::Waiting => e.u8(1),
            Status::Ready => e.u8(2),
            Status::Done { note } => e.u8(3).str(note),
        };
        match &self.join {
            None => {
                e.u8(0);
            }
            Some(join) => {
                e.u8(1).u64(join.inputs.len() as u64);
                for input in &join.inputs {
                    match input {
                        None => {
                            e.u8(0);
                        }
                        Some(s) => {
                            e.u8(1);
                            s.encode_into(&mut e);
                        }
                    }
                }
                match &join.decided {
                    None => {
                        e.u8(0);
                    }
                    Some(s) => {
                        e.u8(1);
                        s.encode_into(&mut e);
                    }
                }
            }
        }
        e.i64(self.registered_at_ms).u64(self.revision);
        e.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        d.version("continuation record", RECORD_FORMAT)?;
        let continuation = Continuation::decode_from(&mut d)?;
        let target_deadline_ms = d.i64("target deadline")?;
        let status = match d.u8("continuation status")? {
            1 => Status::Waiting,
            2 => Status::Ready,
            3 => Status::Done { note: d.string("done note")? },
            _ => return Err(DecodeError::Invalid("continuation status")),
        };
        let optional = |d: &mut Decoder<'_>| -> Result<Option<Settlement>, DecodeError> {
            match d.u8("optional settlement")? {
                0 => Ok(None),
                1 => Ok(Some(Settlement::decode_from(d)?)),
                _ => Err(DecodeError::Invalid("optional settlement")),
            }
        };
        let join = match (d.u8("join")?, continuation.combinator) {
            (0, None) => None,
            (1, Some(combinator)) => {
                let n = d.u64("join inputs")?;
                if n != continuation.sources.len() as u64 {
                    return Err(DecodeError::Invalid("join inputs"));
                }
                let inputs = (0..n).map(|_| optional(&mut d)).collect::<Result<_, _>>()?;
                let decided = optional(&mut d)?;
                Some(Join { combinator, sources: continuation.sources.clone(), inputs, decided })
            }
            _ => return Err(DecodeError::Invalid("join")),
        };
        let registered_at_ms = d.i64("registered at")?;
        let revision = d.u64("revision")?;
        d.finish()?;
        Ok(ContinuationRecord { continuation, target_deadline_ms, status, join, registered_at_ms, revision })
    }
}

/// Why a submitted graph is refused; each names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("a pipeline may register at most {MAX_CONTINUATIONS} continuations, this one has {0}")]
    TooManyContinuations(usize),
    #[error("continuation {0:?}: {1}")]
    Invalid(String, String),
    #[error("continuation ids must be unique; {0:?} is given twice")]
    DuplicateId(String),
    #[error(
        "promise {target:?} is the target of both {first:?} and {second:?}; a promise is settled by one continuation"
    )]
    TwoSettlers { target: String, first: String, second: String },
    #[error("continuation {id:?} targets {target:?}, which this pipeline does not create")]
    UnknownTarget { id: String, target: String },
    #[error("the continuations form a cycle: {0}")]
    Cycle(String),
}

/// Checks a graph before any of it is proposed: `created` are the promises the same Submit
/// creates. Sources may be promises that exist already (the server checks they do); targets
/// must be created by the Submit, each settled by one continuation, and no chain of
/// continuations may lead back to its own start (it would wait on itself forever).
pub fn validate(created: &BTreeSet<PromiseId>, continuations: &[Continuation]) -> Result<(), GraphError> {
    if continuations.len() > MAX_CONTINUATIONS {
        return Err(GraphError::TooManyContinuations(continuations.len()));
    }
    let mut ids = BTreeSet::new();
    let mut settler: BTreeMap<&PromiseId, &str> = BTreeMap::new();
    for c in continuations {
        check_one(c)?;
        if !ids.insert(c.id.as_str()) {
            return Err(GraphError::DuplicateId(c.id.clone()));
        }
        if !created.contains(&c.target) {
            return Err(GraphError::UnknownTarget { id: c.id.clone(), target: c.target.to_string() });
        }
        if let Some(first) = settler.insert(&c.target, &c.id) {
            return Err(GraphError::TwoSettlers {
                target: c.target.to_string(),
                first: first.to_owned(),
                second: c.id.clone(),
            });
        }
    }
    find_cycle(continuations)
}

fn check_one(c: &Continuation) -> Result<(), GraphError> {
    let invalid = |why: String| Err(GraphError::Invalid(c.id.clone(), why));
    if c.id.is_empty() || c.id.len() > MAX_CONTINUATION_ID_BYTES {
        return invalid(format!("the id must be 1 to {MAX_CONTINUATION_ID_BYTES} bytes"));
    }
    if c.id.contains(DELIVERY_SEPARATOR) || c.id.contains('\0') {
        return invalid(format!("the id may not contain {DELIVERY_SEPARATOR:?} or NUL"));
    }
    match c.action {
        Action::Deliver { .. } => return invalid("deliveries are registered by the server, not submitted".into()),
        Action::Notify { .. } => return invalid("webhooks are registered with Subscribe, not submitted".into()),
        _ => {}
    }
    match (c.combinator, c.sources.len()) {
        (_, 0) => return invalid("it names no source".into()),
        (_, n) if n > MAX_SOURCES => return invalid(format!("at most {MAX_SOURCES} sources, it has {n}")),
        (None, n) if n > 1 => return invalid(format!("{n} sources need a combinator (all, any or race)")),
        _ => {}
    }
    if let Some(dup) = c.sources.iter().enumerate().find(|(i, s)| c.sources[..*i].contains(s)) {
        return invalid(format!("source {:?} is named twice", dup.1.as_str()));
    }
    if c.sources.contains(&c.target) {
        return invalid(format!("{:?} is both a source and the target", c.target.as_str()));
    }
    if let Action::Invoke { url, .. } = &c.action {
        let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
        if !scheme_ok || url.len() > MAX_URL_BYTES || url.chars().any(char::is_whitespace) {
            return invalid(format!("the function URL must be http:// or https://, at most {MAX_URL_BYTES} bytes"));
        }
    }
    Ok(())
}

/// A cycle among source → target edges, named by the promises on it, if there is one.
fn find_cycle(continuations: &[Continuation]) -> Result<(), GraphError> {
    let mut edges: BTreeMap<&PromiseId, Vec<&PromiseId>> = BTreeMap::new();
    for c in continuations {
        for s in &c.sources {
            edges.entry(s).or_default().push(&c.target);
        }
    }
    // Iterative depth-first search: 0 = unseen, 1 = on the current path, 2 = done.
    let mut mark: BTreeMap<&PromiseId, u8> = BTreeMap::new();
    for &start in edges.keys() {
        if mark.get(start).copied().unwrap_or(0) != 0 {
            continue;
        }
        let mut path: Vec<(&PromiseId, usize)> = vec![(start, 0)];
        mark.insert(start, 1);
        while let Some((node, next)) = path.last_mut() {
            let outs = edges.get(*node).map_or(&[][..], Vec::as_slice);
            if let Some(&to) = outs.get(*next) {
                *next += 1;
                match mark.get(to).copied().unwrap_or(0) {
                    0 => {
                        mark.insert(to, 1);
                        path.push((to, 0));
                    }
                    1 => {
                        let from = path.iter().position(|(p, _)| *p == to).unwrap_or(0);
                        let mut names: Vec<&str> = path[from..].iter().map(|(p, _)| p.as_str()).collect();
                        names.push(to.as_str());
                        return Err(GraphError::Cycle(names.join(" -> ")));
                    }
                    _ => {}
                }
            } else {
                mark.insert(node, 2);
                path.pop();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(s: &str) -> PromiseId {
        PromiseId::new_unchecked(s)
    }

    fn settled(state: State, data: &str) -> Settlement {
        Settlement { state, value: Value { headers: BTreeMap::new(), data: data.as_bytes().to_vec() } }
    }

    fn forward(cid: &str, sources: &[&str], target: &str) -> Continuation {
        Continuation {
            id: cid.to_owned(),
            sources: sources.iter().map(|s| id(s)).collect(),
            target: id(target),
            combinator: (sources.len() > 1).then_some(Combinator::All),
            on: On::Resolved,
            action: Action::Forward { recover: false },
        }
    }

    fn created(ids: &[&str]) -> BTreeSet<PromiseId> {
        ids.iter().map(|s| id(s)).collect()
    }

    #[test]
    fn outcomes_run_matching_steps_and_pass_through_the_others() {
        let invoke = Action::Invoke { url: "http://f".into(), headers: BTreeMap::new(), timeout_ms: 0, prewarm: false };
        let ok = settled(State::Resolved, "v");
        let err = settled(State::Rejected, "e");
        assert_eq!(step(On::Resolved, &invoke, &ok), Next::Invoke);
        // A then-step does not run on a rejection: the rejection flows on to the target.
        let passed = Next::Settle { settle_as: SettleAs::Reject, value: err.value.clone() };
        assert_eq!(step(On::Resolved, &invoke, &err), passed);
        // A catch runs on it, and skips a resolution, which flows on.
        assert_eq!(step(On::Rejected, &invoke, &err), Next::Invoke);
        assert_eq!(
            step(On::Rejected, &invoke, &ok),
            Next::Settle { settle_as: SettleAs::Resolve, value: ok.value.clone() }
        );
        assert_eq!(step(On::Settled, &invoke, &err), Next::Invoke);
        // A recovering forward turns the rejection it catches into a resolution.
        let recovered = step(On::Rejected, &Action::Forward { recover: true }, &err);
        assert_eq!(recovered, Next::Settle { settle_as: SettleAs::Resolve, value: err.value.clone() });
        // A timeout cannot be written by a settle: it passes on as a marked rejection.
        let Next::Settle { settle_as, value } = step(On::Resolved, &invoke, &settled(State::RejectedTimedout, ""))
        else {
            panic!("a timeout passes through a then-step");
        };
        assert_eq!(settle_as, SettleAs::Reject);
        assert_eq!(value.headers.get("vow-source-state").map(String::as_str), Some("REJECTED_TIMEDOUT"));
        let canceled = step(On::Resolved, &invoke, &settled(State::RejectedCanceled, "c"));
        assert!(matches!(canceled, Next::Settle { settle_as: SettleAs::Cancel, .. }));
    }

    #[test]
    fn all_waits_for_every_resolution_and_fails_fast() {
        let mut join = Join::new(Combinator::All, vec![id("a"), id("b")]);
        assert_eq!(join.offer(1, settled(State::Resolved, "B")), None);
        assert_eq!(join.offer(1, settled(State::Rejected, "again")), None, "a redelivery changes nothing");
        let decided = join.offer(0, settled(State::Resolved, "A\"")).cloned().expect("both are in");
        assert_eq!(decided.state, State::Resolved);
        assert_eq!(
            String::from_utf8(decided.value.data).unwrap(),
            r#"[{"id":"a","state":"RESOLVED","value":"QSI=","headers":{}},{"id":"b","state":"RESOLVED","value":"Qg==","headers":{}}]"#
        );
        let mut failing = Join::new(Combinator::All, vec![id("a"), id("b"), id("c")]);
        assert_eq!(failing.offer(2, settled(State::Resolved, "C")), None);
        assert_eq!(failing.offer(0, settled(State::Rejected, "no")), Some(&settled(State::Rejected, "no")));
        assert_eq!(failing.offer(1, settled(State::Resolved, "B")), None, "decided already");
        assert_eq!(failing.offer(7, settled(State::Resolved, "?")), None, "no such source");
    }

    #[test]
    fn any_takes_the_first_resolution_and_race_the_first_settlement() {
        let mut any = Join::new(Combinator::Any, vec![id("a"), id("b")]);
        assert_eq!(any.offer(0, settled(State::Rejected, "x")), None);
        assert_eq!(any.offer(1, settled(State::Resolved, "y")), Some(&settled(State::Resolved, "y")));
        let mut none = Join::new(Combinator::Any, vec![id("a"), id("b")]);
        assert_eq!(none.offer(0, settled(State::Rejected, "x")), None);
        let all_failed = none.offer(1, settled(State::RejectedTimedout, "")).cloned().expect("all are in");
        assert_eq!(all_failed.state, State::Rejected);
        assert!(String::from_utf8(all_failed.value.data).unwrap().contains("REJECTED_TIMEDOUT"));
        let mut race = Join::new(Combinator::Race, vec![id("a"), id("b")]);
        assert_eq!(race.offer(1, settled(State::Rejected, "first")), Some(&settled(State::Rejected, "first")));
        assert_eq!(race.offer(0, settled(State::Resolved, "late")), None);
    }

    fn arb_continuation() -> impl Strategy<Value = Continuation> {
        let action = prop_oneof![
            any::<bool>().prop_map(|recover| Action::Forward { recover }),
            (".{0,20}", proptest::collection::btree_map(".{0,5}", ".{0,5}", 0..3), any::<u32>(), any::<bool>())
                .prop_map(|(url, headers, timeout_ms, prewarm)| Action::Invoke { url, headers, timeout_ms, prewarm }),
            (".{0,20}", proptest::collection::btree_map(".{0,5}", ".{0,5}", 0..3))
                .prop_map(|(url, headers)| Action::Notify { url, headers }),
        ];
        let combinator = prop_oneof![
            Just(None),
            Just(Some(Combinator::All)),
            Just(Some(Combinator::Any)),
            Just(Some(Combinator::Race))
        ];
        let on = prop_oneof![Just(On::Resolved), Just(On::Rejected), Just(On::Settled)];
        (".{0,10}", proptest::collection::vec(".{1,10}", 0..4), ".{1,10}", combinator, on, action).prop_map(
            |(id, sources, target, combinator, on, action)| Continuation {
                id,
                sources: sources.into_iter().map(PromiseId::new_unchecked).collect(),
                target: PromiseId::new_unchecked(target),
                combinator,
                on,
                action,
            },
        )
    }

    proptest! {
        #[test]
        fn continuations_survive_their_encoding(c in arb_continuation()) {
            prop_assert_eq!(Continuation::decode(&c.encode()), Ok(c));
        }

        #[test]
        fn a_cut_or_damaged_encoding_is_an_error_not_a_panic(c in arb_continuation(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
            let bytes = c.encode();
            let cut = cut % bytes.len();
            prop_assert!(Continuation::decode(&bytes[..cut]).is_err());
            let mut damaged = bytes.clone();
            let at = flip.0 % damaged.len();
            damaged[at] ^= flip.1 | 1;
            let _ = Continuation::decode(&damaged);
        }
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn a_chain_and_a_join_are_valid_graphs() {
        let chain =
            [forward("c1", &["in"], "s1"), forward("c2", &["s1"], "s2"), forward("c3", &["s2", "other"], "out")];
        // "in" and "other" may exist already; the targets are created here.
        assert_eq!(validate(&created(&["s1", "s2", "out"]), &chain), Ok(()));
    }

    #[test]
    fn bad_graphs_are_refused_naming_the_problem() {
        let targets = created(&["a", "b", "c"]);
        let cycle = [forward("c1", &["a"], "b"), forward("c2", &["b"], "c"), forward("c3", &["c"], "a")];
        assert_eq!(validate(&targets, &cycle), Err(GraphError::Cycle("a -> b -> c -> a".into())));
        let twice = [forward("c1", &["x"], "a"), forward("c2", &["y"], "a")];
        assert!(matches!(validate(&targets, &twice), Err(GraphError::TwoSettlers { .. })));
        let dup = [forward("c1", &["x"], "a"), forward("c1", &["y"], "b")];
        assert_eq!(validate(&targets, &dup), Err(GraphError::DuplicateId("c1".into())));
        let unknown = [forward("c1", &["x"], "elsewhere")];
        assert!(matches!(validate(&targets, &unknown), Err(GraphError::UnknownTarget { .. })));
        let mut self_loop = forward("c1", &["a"], "a");
        assert!(matches!(validate(&targets, &[self_loop.clone()]), Err(GraphError::Invalid(..))));
        self_loop.sources = vec![id("x"), id("y")];
        self_loop.combinator = None;
        let err = validate(&targets, &[self_loop]).unwrap_err().to_string();
        assert!(err.contains("need a combinator"), "{err}");
        let mut bad_url = forward("c1", &["x"], "a");
        bad_url.action =
            Action::Invoke { url: "ftp://f".into(), headers: BTreeMap::new(), timeout_ms: 0, prewarm: false };
        assert!(validate(&targets, &[bad_url]).unwrap_err().to_string().contains("http://"));
        let many: Vec<Continuation> = (0..=MAX_CONTINUATIONS).map(|i| forward(&format!("c{i}"), &["x"], "a")).collect();
        assert_eq!(validate(&targets, &many), Err(GraphError::TooManyContinuations(MAX_CONTINUATIONS + 1)));
    }
}
