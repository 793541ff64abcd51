//! Checks a recorded history against the write-once register that a vow promise is meant to be.
//!
//! # Model
//!
//! Each key is an independent register whose state is a [`Register`], initially `Absent`. Because
//! keys never interact, the history is split by key and each part is checked on its own
//! (P-compositionality), which keeps every search small even when a run touches thousands of keys.
//!
//! Every op is mapped to one or two model steps (see `classify`):
//!
//! * an acknowledged create moves `Absent -> Pending`; an acknowledged resolve / reject / cancel
//!   moves `Pending -> Resolved{v}` / `Rejected{v}` / `Canceled{v}`. A *deduplicated* acknowledgement is the same write:
//!   the workload gives every invocation its own idempotency key, so the cluster can only have
//!   deduplicated the op's own earlier attempt (an SDK retry), never someone else's write;
//! * the reply of an acknowledged write is a read too. A plain reply shows the record the write
//!   left (so it must be `Pending`, or the settlement written); a deduplicated reply shows the
//!   record when the retry arrived, later within the op, so a deduplicated create may see a
//!   settlement made since (a reply no later state can explain, such as `Absent`, fails). A
//!   create's reply may also show `TimedOut`: a create that arrives after its deadline makes the
//!   promise timed out at once (the timeout below, placed between the create and its reply);
//! * an acknowledged get / await / final read, and any refused op that showed a register, is a
//!   read that must see exactly that register (refusals did not take effect, but what they showed
//!   was true at some instant while they ran);
//! * an op with an unknown outcome (`Info`) that writes may take effect at any instant after its
//!   invocation, or never; when it does, a create or settle the register would have refused is a
//!   no-op. Unknown reads, and refusals that showed nothing, constrain nothing and are dropped;
//! * a promise created with a deadline may be timed out by the cluster: a write
//!   `Pending -> TimedOut` by the system that may happen at any instant from
//!   `deadline - EARLY_TIMEOUT_BOUND` on (by the harness's true clock; cluster time may run late,
//!   never more than the bound early), or never, exactly like a settle with unknown outcome. As
//!   with any settlement, a promise that timed out can never be settled later, and one that was
//!   settled can never time out. A TIMED_OUT seen earlier than the bound allows is also reported
//!   on its own, as `early-timeout`;
//! * a Search page is a read of every record on it, each at its own instant within the op (a
//!   page merges every shard's part, each read at its shard's leader). A page asked for every
//!   state also shows which promises did *not* exist: a promise of the page's prefix, carrying
//!   the page's tags, whose id lies within the stretch of ids the page covers and which is not
//!   on it was `Absent` at some instant within the op. A page covers from its first record (from
//!   the start of the prefix on a first page) to its last record (to the end of the prefix on a
//!   last page); between pages the server resumes after a point the page token hides, so nothing
//!   is claimed for ids between two pages.
//!
//! The final reads of every node (kind `FinalRead`) come after every other op, so they take part
//! in the search like any read: an acknowledged create that no node holds at the end, or a get
//! that saw a settlement the final reads contradict, fails the key.
//!
//! # Algorithm
//!
//! Linearizability per key is decided with the Wing-Gong / Lowe search as Porcupine implements it:
//! the ops' call and return events are sorted by time into a doubly linked list; a depth-first
//! search repeatedly picks a call that comes before the first remaining return (an op that may be
//! linearized next), applies its step to the model, and on success unlinks the op's call and return
//! and descends. Reaching a return means the op it belongs to cannot be placed any more, so the
//! search backtracks. Every (set of linearized ops, model state) pair is remembered so each is
//! explored at most once. Ops with unknown outcome have no return event (it would be at +infinity),
//! so they never block the search and it succeeds once every op with a known outcome is placed.
//!
//! Two prunings keep the search small without losing completeness:
//!
//! * an unknown-outcome write that would be a no-op is never linearized, since leaving it
//!   unplaced keeps every option that placing it as a no-op would;
//! * a read that can be placed now is placed now, and it is never tried the other way: a read
//!   changes no state and every op that had to precede it is already placed, so if some
//!   linearization places it later, moving it here yields another one. When the search backtracks
//!   over such a read it therefore backtracks further at once. This stops long-running awaits that
//!   overlap one another from making the search exponential.
//!
//! When a key fails, the smallest failing prefix of its history is found by binary search over the
//! ops' completion times (a prefix cut at time `t` keeps ops invoked by `t`; those still running at
//! `t` have unknown outcome). Non-linearizability of a prefix carries over to every longer one, so
//! the first completion time whose prefix fails names the op whose response could not be explained.
//!
//! Besides linearizability, [`check`] reports direct invariant violations (double settles, phantom
//! values, lost settles, divergent replicas, awaits that returned a non-final value, timeouts seen
//! before their deadline, search pages with records the query excludes) that are easier to read in
//! a report than a failed search, including evidence from the final reads of every node.
//! [`check_run`] adds what only the whole run shows: awaits that kept waiting after their node's
//! replica held the settlement (judged outside fault windows, see [`await_late`]), liveness (a run in which no write succeeds, or
//! none after the final heal, is invalid, as in Jepsen's `stats` checker) and nodes that exited
//! without the nemesis killing them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::clocks::EARLY_TIMEOUT_BOUND;
use crate::history::{Deadline, NemesisEvent, Op, OpKind, Outcome, Register};

pub use crate::history::Anomaly;

/// Checks linearizability of one key's ops (in any order) against the write-once register model.
pub fn check_key(key: &str, ops: &[Op]) -> Result<(), Anomaly> {
    let refs: Vec<&Op> = ops.iter().collect();
    check_key_refs(key, &refs)
}

/// Checks every key's linearizability plus the invariants listed on [`Anomaly::kind`], with the
/// history's `FinalRead` ops as the final reads of every node and each Search page split into
/// reads of the promises it speaks about (see [`search_reads`]). Anomalies come out grouped by
/// key in key order; an empty result means every key is consistent.
pub fn check(ops: &[Op]) -> Vec<Anomaly> {
    let (derived, mismatches) = search_reads(ops);
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops.iter().filter(|op| op.kind != OpKind::Search).chain(&derived) {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let keys: Vec<(&str, Vec<&Op>)> = by_key.into_iter().collect();
    let per_key = parallel_map(&keys, |(key, key_ops)| check_one(key, key_ops));
    let mut anomalies: Vec<Anomaly> = per_key.into_iter().flatten().chain(mismatches).collect();
    // Stable: each key's anomalies keep the order `check_one` gives them.
    anomalies.sort_by(|a, b| a.key.cmp(&b.key));
    anomalies
}

/// The reads a history's Search pages make (see the module docs), as ops of kind `Search` on
/// the promise each speaks about, with the page's id, process and interval; and a
/// "search-mismatch" anomaly for each record that a page's query excludes (another prefix,
/// another state). Failed searches show nothing.
pub fn search_reads(ops: &[Op]) -> (Vec<Op>, Vec<Anomaly>) {
    // Every promise the history names, and for each the tag sets of the creates that may have
    // made it.
    let mut created_with: BTreeMap<&str, Vec<&BTreeMap<String, String>>> = BTreeMap::new();
    for op in ops.iter().filter(|op| op.kind != OpKind::Search) {
        let tags = created_with.entry(op.key.as_str()).or_default();
        if op.kind == OpKind::Create && op.outcome != Outcome::Fail {
            tags.push(&op.tags);
        }
    }
    let mut reads = Vec::new();
    let mut mismatches = Vec::new();
    for op in ops.iter().filter(|op| op.kind == OpKind::Search && op.outcome == Outcome::Ok) {
        let Some(page) = op.search.as_deref() else { continue };
        let read = |key: &str, register: Register| Op {
            id: op.id,
            process: op.process,
            kind: OpKind::Search,
            key: key.to_owned(),
            value: None,
            invoke_ns: op.invoke_ns,
            complete_ns: op.complete_ns,
            outcome: Outcome::Ok,
            observed: Some(register),
            deduplicated: false,
            node: op.node,
            detail: String::new(),
            deadline: None,
            tags: BTreeMap::new(),
            search: None,
        };
        for found in &page.found {
            let wrong_prefix = !found.key.starts_with(&page.id_prefix);
            let wrong_state = page.state.is_some_and(|s| !s.matches(&found.register));
            if wrong_prefix || wrong_state {
                mismatches.push(Anomaly {
                    key: found.key.clone(),
                    kind: "search-mismatch".to_owned(),
                    detail: format!(
                        "search #{} for prefix {:?}, state {:?}, tags {:?} returned {} in state {}",
                        op.id,
                        page.id_prefix,
                        page.state,
                        page.tags,
                        found.key,
                        show(&found.register)
                    ),
                    op_ids: vec![op.id],
                });
            }
            reads.push(read(&found.key, found.register.clone()));
        }
        // Absence is shown only by a page that asked for every state, and only within the ids
        // it covers.
        if page.state.is_some() || (!page.first && page.found.is_empty()) {
            continue;
        }
        let lower = if page.first { None } else { page.found.first().map(|f| f.key.as_str()) };
        let upper = if page.last { None } else { page.found.last().map(|f| f.key.as_str()) };
        let on_page: HashSet<&str> = page.found.iter().map(|f| f.key.as_str()).collect();
        let carries_tags = |creates: &[&BTreeMap<String, String>]| {
            creates.iter().all(|tags| page.tags.iter().all(|(k, v)| tags.get(k) == Some(v)))
        };
        let missing = created_with
            .range(page.id_prefix.as_str()..)
            .take_while(|(key, _)| key.starts_with(&page.id_prefix))
            .filter(|(key, _)| lower.is_none_or(|l| **key >= l) && upper.is_none_or(|u| **key <= u))
            .filter(|(key, creates)| !on_page.contains(**key) && carries_tags(creates));
        for (key, _) in missing {
            reads.push(read(key, Register::Absent));
        }
    }
    (reads, mismatches)
}

/// Everything the stored history of a run shows: [`check`] per key, then [`liveness`] and
/// [`crashes`] for the run as a whole. `vow-jepsen test` and `vow-jepsen check` both use it, so a
/// re-check of a stored history finds what the run found.
pub fn check_run(ops: &[Op], events: &[NemesisEvent]) -> Vec<Anomaly> {
    let mut anomalies = check(ops);
    anomalies.extend(await_late(ops, events));
    anomalies.extend(liveness(ops, events));
    anomalies.extend(crashes(events));
    anomalies
}

fn is_write(op: &Op) -> bool {
    matches!(op.kind, OpKind::Create | OpKind::Resolve | OpKind::Reject | OpKind::Cancel)
}

/// When the last heal of the run completed (0 if there was none): every fault has ended by then.
pub fn final_heal_ns(events: &[NemesisEvent]) -> u64 {
    events.iter().filter(|e| e.action == "heal").map(|e| e.at_ns).max().unwrap_or(0)
}

/// A cluster that refuses or drops every write breaks no safety rule, so it must fail here: the
/// run is invalid ("no-progress") when no write succeeded at all, or none that was invoked after
/// the final heal (the cluster did not come back). Jepsen's `stats` checker makes the same call.
pub fn liveness(ops: &[Op], events: &[NemesisEvent]) -> Option<Anomaly> {
    let writes: Vec<&Op> = ops.iter().filter(|op| is_write(op)).collect();
    let count = |ops: &[&Op], outcome: Outcome| ops.iter().filter(|op| op.outcome == outcome).count();
    let tally = |ops: &[&Op]| {
        format!(
            "{} write attempts: {} refused, {} with unknown outcome",
            ops.len(),
            count(ops, Outcome::Fail),
            count(ops, Outcome::Info)
        )
    };
    let detail = if count(&writes, Outcome::Ok) == 0 {
        format!("no write succeeded during the run ({})", tally(&writes))
    } else {
        let heal_ns = final_heal_ns(events);
        let after: Vec<&Op> = writes.iter().copied().filter(|op| op.invoke_ns >= heal_ns).collect();
        if count(&after, Outcome::Ok) > 0 {
            return None;
        }
        format!("no write invoked after the final heal at {heal_ns} ns succeeded ({})", tally(&after))
    };
    Some(Anomaly { key: String::new(), kind: "no-progress".to_owned(), detail, op_ids: Vec::new() })
}

/// How long an await may still take to return a settlement once its node's replica holds it.
/// Waking is local (the replica announces every settle it applies, and a snapshot install tells
/// every waiter to look again), so an await still waiting this long after is one that missed
/// its wake-up.
pub const AWAIT_WAKE_BOUND: Duration = Duration::from_millis(1500);

/// How long after a network fault heals awaits are not judged: a connection in TCP
/// retransmission backoff may stay silent for seconds after the network is whole again, and an
/// await's first read crosses one (it is served by the shard's leader).
pub const NETWORK_RECOVERY: Duration = Duration::from_secs(10);

/// The stretches of the run during which some fault was in force, each with the event that
/// started it: from that event to the heal that ended it (or the end of the run), network faults
/// stretched by [`NETWORK_RECOVERY`].
fn troubled(events: &[NemesisEvent]) -> Vec<(u64, u64, &NemesisEvent)> {
    let mut sorted: Vec<&NemesisEvent> = events.iter().collect();
    sorted.sort_by_key(|e| e.at_ns);
    let mut spans = Vec::new();
    let mut open: Vec<&NemesisEvent> = Vec::new();
    for e in sorted {
        if e.action == "heal" {
            for fault in open.drain(..) {
                let network = matches!(fault.action.as_str(), "partition" | "netem");
                let tail = if network { NETWORK_RECOVERY } else { Duration::ZERO };
                spans.push((fault.at_ns, e.at_ns.saturating_add(tail.as_nanos() as u64), fault));
            }
        } else {
            open.push(e);
        }
    }
    spans.extend(open.iter().map(|fault| (fault.at_ns, u64::MAX, *fault)));
    spans
}

/// How much later than an await a stale read must have been invoked to count as evidence
/// against it: longer than an await's first read takes on a loaded cluster, so that read is
/// over by the time the evidence is taken, unless a fault held it back.
pub const FIRST_READ_GRACE: Duration = Duration::from_millis(250);

/// Awaits that kept waiting after their node's replica held the settlement they returned
/// ("await-late"). The evidence is a `LocalGet` of the same key on the same node, invoked at
/// least [`FIRST_READ_GRACE`] after the await was, that saw a settlement and returned more than
/// [`AWAIT_WAKE_BOUND`] before the await did. An await's first read is served by the shard's
/// leader, so a fault in force while it may still run (up to the evidence's return) can hold it
/// back for any time: such awaits are not judged (see [`troubled`]). A pause of the await's own
/// node is the exception: it holds the await and the evidence alike (neither runs while the
/// node is stopped), and the snapshot installs that catch a paused node up are exactly what a
/// waiter must not miss.
pub fn await_late(ops: &[Op], events: &[NemesisEvent]) -> Vec<Anomaly> {
    let spans = troubled(events);
    let calm = |op: &Op, until_ns: u64| {
        spans.iter().all(|&(from, to, fault)| {
            let apart = to < op.invoke_ns || from > until_ns;
            let own_pause = fault.action == "pause" && op.node.is_some_and(|n| fault.nodes == [n]);
            apart || own_pause
        })
    };
    let settled = |op: &Op| op.outcome == Outcome::Ok && op.observed.as_ref().is_some_and(Register::is_settled);
    let mut local: HashMap<(&str, u64), Vec<&Op>> = HashMap::new();
    for op in ops.iter().filter(|op| op.kind == OpKind::LocalGet && settled(op)) {
        if let Some(node) = op.node {
            local.entry((op.key.as_str(), node)).or_default().push(op);
        }
    }
    let bound_ns = AWAIT_WAKE_BOUND.as_nanos() as u64;
    let mut late: BTreeMap<&str, Vec<(&Op, &Op)>> = BTreeMap::new();
    let grace_ns = FIRST_READ_GRACE.as_nanos() as u64;
    for wait in ops.iter().filter(|op| op.kind == OpKind::Await && settled(op)) {
        let Some(node) = wait.node else { continue };
        let evidence = local.get(&(wait.key.as_str(), node)).into_iter().flatten().find(|get| {
            get.invoke_ns >= wait.invoke_ns.saturating_add(grace_ns)
                && get.complete_ns.saturating_add(bound_ns) < wait.complete_ns
                && calm(wait, get.complete_ns)
        });
        if let Some(get) = evidence {
            late.entry(wait.key.as_str()).or_default().push((wait, get));
        }
    }
    late.into_iter()
        .map(|(key, pairs)| {
            let described: Vec<String> = pairs
                .iter()
                .map(|(wait, get)| {
                    format!(
                        "{} returned {} ms after {} had shown node {} holding the settlement",
                        describe(wait),
                        (wait.complete_ns - get.complete_ns) / 1_000_000,
                        describe(get),
                        get.node.unwrap_or_default()
                    )
                })
                .collect();
            let mut op_ids: Vec<u64> = pairs.iter().flat_map(|(w, g)| [w.id, g.id]).collect();
            op_ids.sort_unstable();
            Anomaly {
                key: key.to_owned(),
                kind: "await-late".to_owned(),
                detail: format!(
                    "awaits kept waiting more than {AWAIT_WAKE_BOUND:?} after their node's replica held the settlement: {}",
                    described.join("; ")
                ),
                op_ids,
            }
        })
        .collect()
}

/// A node that exited without the nemesis killing it (a panic, a fatal storage error): the run
/// records a "crashed" event for each before it restarts the node.
pub fn crashes(events: &[NemesisEvent]) -> Vec<Anomaly> {
    events
        .iter()
        .filter(|e| e.action == "crashed")
        .map(|e| Anomaly {
            key: String::new(),
            kind: "node-crashed".to_owned(),
            detail: format!("at {} ns: {}", e.at_ns, e.detail),
            op_ids: Vec::new(),
        })
        .collect()
}

/// The final reads among one key's ops: (node, register it held).
fn finals_of(ops: &[&Op]) -> Vec<(u64, Register)> {
    ops.iter()
        .filter(|op| op.kind == OpKind::FinalRead && op.outcome != Outcome::Info)
        .filter_map(|op| Some((op.node.unwrap_or_default(), op.observed.clone()?)))
        .collect()
}

/// All checks for one key, in a fixed order so reports are stable.
fn check_one(key: &str, ops: &[&Op]) -> Vec<Anomaly> {
    let finals = finals_of(ops);
    let mut out = Vec::new();
    if let Err(anomaly) = check_key_refs(key, ops) {
        out.push(anomaly);
    }
    out.extend(double_settle(key, ops));
    out.extend(phantom_values(key, ops, &finals));
    out.extend(lost_settles(key, ops, &finals));
    out.extend(divergence(key, &finals, key_deadline(ops.iter().copied()).is_some()));
    out.extend(await_not_final(key, ops, &finals));
    out.extend(early_timeout(key, ops));
    out
}

/// Runs `f` over `items` on all cores; keys differ a lot in cost, so workers pull indices from a
/// shared counter instead of taking fixed chunks. Results keep the order of `items`.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get).min(items.len());
    if workers <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    std::thread::scope(|scope| {
        let (next, f) = (&next, &f);
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        for handle in handles {
            match handle.join() {
                Ok(done) => {
                    for (i, result) in done {
                        slots[i] = Some(result);
                    }
                }
                // A bug in the checker must not be reported as a clean run.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    slots.into_iter().map(|slot| slot.expect("every index is claimed by exactly one worker")).collect()
}

// ---------------------------------------------------------------------------------------------
// Linearizability
// ---------------------------------------------------------------------------------------------

/// Interned id of `Register::Absent`.
const ABSENT: u32 = 0;
/// Interned id of `Register::Pending`.
const PENDING: u32 = 1;
/// Interned id of `Register::TimedOut`.
const TIMED_OUT: u32 = 2;
/// A register no state ever is: `Read(NEVER)` is a reply that nothing can explain.
const NEVER: u32 = u32::MAX;

/// Registers interned to small ids, so a search state is one machine word and cheap to hash.
#[derive(Debug)]
struct Interner {
    ids: HashMap<Register, u32>,
}

impl Interner {
    fn new() -> Self {
        let mut interner = Interner { ids: HashMap::new() };
        interner.id(&Register::Absent);
        interner.id(&Register::Pending);
        interner.id(&Register::TimedOut);
        interner
    }

    fn id(&mut self, register: &Register) -> u32 {
        let next = u32::try_from(self.ids.len()).expect("fewer than 2^32 distinct registers per key");
        *self.ids.entry(register.clone()).or_insert(next)
    }
}

/// What an op does to the model when it is linearized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Acknowledged create: requires `Absent`, leaves `Pending`.
    Create,
    /// Acknowledged settle: requires `Pending`, leaves the settled register.
    Settle(u32),
    /// Saw exactly this register; changes nothing.
    Read(u32),
    /// Create with unknown outcome: applies only to `Absent` (otherwise it was refused).
    MaybeCreate,
    /// Settle with unknown outcome: applies only to `Pending` (otherwise it was refused).
    MaybeSettle(u32),
}

impl Step {
    /// The state after this step, or None if the step cannot happen in `state`. Unknown-outcome
    /// writes that would be refused also return None: not linearizing them is never worse.
    fn apply(self, state: u32) -> Option<u32> {
        match self {
            Step::Create | Step::MaybeCreate => (state == ABSENT).then_some(PENDING),
            Step::Settle(to) | Step::MaybeSettle(to) => (state == PENDING).then_some(to),
            Step::Read(seen) => (state == seen).then_some(state),
        }
    }

    fn is_read(self) -> bool {
        matches!(self, Step::Read(_))
    }

    /// What this step becomes for an op still running at a prefix's cut: writes may or may not
    /// have happened, and reads have not answered yet so they constrain nothing.
    fn unfinished(self) -> Option<Step> {
        match self {
            Step::Create | Step::MaybeCreate => Some(Step::MaybeCreate),
            Step::Settle(to) | Step::MaybeSettle(to) => Some(Step::MaybeSettle(to)),
            Step::Read(_) => None,
        }
    }
}

/// An op as the search sees it.
#[derive(Debug, Clone, Copy)]
struct ModelOp {
    step: Step,
    invoke: u64,
    /// None for ops whose outcome is unknown: they may take effect arbitrarily late, or never.
    complete: Option<u64>,
}

/// The register a resolve / reject / cancel writes, or None for other kinds.
fn settle_register(op: &Op) -> Option<Register> {
    // A settle without a value is malformed; the empty value still lets it be checked.
    let value = op.value.clone().unwrap_or_default();
    match op.kind {
        OpKind::Resolve => Some(Register::Resolved { value }),
        OpKind::Reject => Some(Register::Rejected { value }),
        OpKind::Cancel => Some(Register::Canceled { value }),
        OpKind::Create | OpKind::Get | OpKind::Await | OpKind::LocalGet | OpKind::Search | OpKind::FinalRead => None,
    }
}

/// The earliest deadline any create of the key that may have taken effect asked for: the
/// promise's own deadline is one of them, so the cluster may time it out from this one on.
fn key_deadline<'a>(ops: impl IntoIterator<Item = &'a Op>) -> Option<Deadline> {
    ops.into_iter()
        .filter(|op| op.kind == OpKind::Create && op.outcome != Outcome::Fail)
        .filter_map(|op| op.deadline)
        .min_by_key(|d| d.ns)
}

fn early_timeout_bound_ns() -> u64 {
    u64::try_from(EARLY_TIMEOUT_BOUND.as_nanos()).unwrap_or(u64::MAX)
}

/// What the reply of an acknowledged write adds to its write, as a read (see the module docs):
/// None when the write itself explains it, `Read(NEVER)` when nothing can.
fn reply_read(op: &Op, written: u32, interner: &mut Interner) -> Option<Step> {
    let seen = interner.id(op.observed.as_ref()?);
    if seen == written {
        return None;
    }
    // A deduplicated create's reply shows the record when the retry came, so a settlement made
    // since may show; nothing turns a promise back into `Absent`. A create applied after its
    // deadline leaves the promise timed out at once, which its reply shows. A settlement is
    // final, so every settle's reply must show it.
    let later_read = op.kind == OpKind::Create && ((op.deduplicated && seen != ABSENT) || seen == TIMED_OUT);
    Some(Step::Read(if later_read { seen } else { NEVER }))
}

/// Appends the model steps of `op` in the history cut at `cutoff` (None = the whole history) to
/// `out`: none if the op does not belong to that prefix or constrains nothing, two for an
/// acknowledged write whose reply is a read of its own.
fn classify(op: &Op, interner: &mut Interner, cutoff: Option<u64>, out: &mut Vec<ModelOp>) {
    if cutoff.is_some_and(|t| op.invoke_ns > t) {
        return;
    }
    let settled = settle_register(op).map(|r| interner.id(&r));
    let steps: [Option<Step>; 2] = match (op.outcome, op.kind) {
        // A replica's own view may lag the cluster's by any amount: no linearization point.
        (_, OpKind::LocalGet) => [None, None],
        (Outcome::Info, OpKind::Create) => [Some(Step::MaybeCreate), None],
        (Outcome::Info, OpKind::Resolve | OpKind::Reject | OpKind::Cancel) => [settled.map(Step::MaybeSettle), None],
        (Outcome::Info, OpKind::Get | OpKind::Await | OpKind::Search | OpKind::FinalRead) => [None, None],
        (Outcome::Ok, OpKind::Create) => [Some(Step::Create), reply_read(op, PENDING, interner)],
        (Outcome::Ok, OpKind::Resolve | OpKind::Reject | OpKind::Cancel) => match settled {
            Some(to) => [Some(Step::Settle(to)), reply_read(op, to, interner)],
            None => [None, None],
        },
        (Outcome::Ok, OpKind::Get | OpKind::Await | OpKind::Search | OpKind::FinalRead) | (Outcome::Fail, _) => {
            [op.observed.as_ref().map(|seen| Step::Read(interner.id(seen))), None]
        }
    };
    for step in steps.into_iter().flatten() {
        let model = if op.outcome == Outcome::Info {
            Some(ModelOp { step, invoke: op.invoke_ns, complete: None })
        } else if cutoff.is_some_and(|t| op.complete_ns > t) {
            step.unfinished().map(|step| ModelOp { step, invoke: op.invoke_ns, complete: None })
        } else {
            // A completion recorded before the invocation (clock trouble) is read as an instant op.
            Some(ModelOp { step, invoke: op.invoke_ns, complete: Some(op.complete_ns.max(op.invoke_ns)) })
        };
        out.extend(model);
    }
}

/// The model of one key's history cut at `cutoff` (None = all of it): its ops' steps, and the
/// cluster's timeout of the promise when a create gave it a deadline.
fn model_of(ops: &[&Op], cutoff: Option<u64>) -> Vec<ModelOp> {
    let mut interner = Interner::new();
    let mut model = Vec::with_capacity(ops.len() + 1);
    for op in ops {
        classify(op, &mut interner, cutoff, &mut model);
    }
    let in_prefix = |t: u64| cutoff.is_none_or(|cut| t <= cut);
    if let Some(deadline) = key_deadline(ops.iter().copied().filter(|op| in_prefix(op.invoke_ns))) {
        let earliest = deadline.ns.saturating_sub(early_timeout_bound_ns());
        if in_prefix(earliest) {
            model.push(ModelOp { step: Step::MaybeSettle(TIMED_OUT), invoke: earliest, complete: None });
        }
    }
    model
}

/// What a search found.
#[derive(Debug, Clone, Copy)]
struct SearchResult {
    linearizable: bool,
    /// Most ops with a known outcome that were linearized at once.
    longest: usize,
    /// Ops with a known outcome, all of which must be linearized.
    required: usize,
}

/// Marks the end of a linked list.
const NIL: usize = usize::MAX;
/// The list's sentinel head node.
const HEAD: usize = 0;

/// One frame of the depth-first search: the op placed and the state before it.
#[derive(Debug, Clone, Copy)]
struct Frame {
    op: usize,
    before: u32,
    /// A read placed as soon as it could be; backtracking over it means its parent fails too.
    forced: bool,
}

/// The call / return event list, doubly linked so ops can be unlinked and relinked in LIFO order.
#[derive(Debug)]
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// For node n > 0: the op it belongs to and whether it is the op's call.
    op_of: Vec<usize>,
    is_call: Vec<bool>,
    call_node: Vec<usize>,
    return_node: Vec<Option<usize>>,
}

impl Events {
    fn new(ops: &[ModelOp]) -> Self {
        // (time, is return, op): on equal times calls sort first, so ops that touch are concurrent.
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            events.push((op.invoke, false, i));
            if let Some(complete) = op.complete {
                events.push((complete, true, i));
            }
        }
        events.sort_unstable();
        let nodes = events.len() + 1;
        let mut list = Events {
            next: (1..=nodes).map(|n| if n == nodes { NIL } else { n }).collect(),
            prev: (0..nodes).map(|n| if n == 0 { NIL } else { n - 1 }).collect(),
            op_of: vec![NIL; nodes],
            is_call: vec![false; nodes],
            call_node: vec![NIL; ops.len()],
            return_node: vec![None; ops.len()],
        };
        for (n, &(_, is_return, op)) in events.iter().enumerate() {
            let node = n + 1;
            list.op_of[node] = op;
            list.is_call[node] = !is_return;
            if is_return {
                list.return_node[op] = Some(node);
            } else {
                list.call_node[op] = node;
            }
        }
        list
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    /// Undoes `unlink(node)`; valid because relinks happen in the reverse order of unlinks.
    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call_node[op]);
        if let Some(ret) = self.return_node[op] {
            self.unlink(ret);
        }
    }

    fn unlift(&mut self, op: usize) {
        if let Some(ret) = self.return_node[op] {
            self.relink(ret);
        }
        self.relink(self.call_node[op]);
    }
}

/// Porcupine's search over one key's model ops; see the module docs.
fn search(ops: &[ModelOp]) -> SearchResult {
    let required = ops.iter().filter(|op| op.complete.is_some()).count();
    let mut result = SearchResult { linearizable: true, longest: 0, required };
    if required == 0 {
        return result;
    }
    let mut events = Events::new(ops);
    // The cache key: a bitset of linearized ops, then the model state in the last word.
    let words = ops.len().div_ceil(64);
    let mut key = vec![0u64; words + 1];
    let mut cache: HashSet<Vec<u64>> = HashSet::new();
    let mut stack: Vec<Frame> = Vec::with_capacity(ops.len());
    let mut state = ABSENT;
    let mut placed_required = 0usize;
    let mut entry = events.next[HEAD];
    loop {
        if placed_required == required {
            return result;
        }
        // While a known-outcome op is unplaced its return is still listed, so `entry` cannot run
        // off the end before reaching a return; NIL is handled as a return anyway, defensively.
        let mut backtrack = entry == NIL || !events.is_call[entry];
        if !backtrack {
            let i = events.op_of[entry];
            let step = ops[i].step;
            if let Some(after) = step.apply(state) {
                key[i / 64] |= 1 << (i % 64);
                key[words] = u64::from(after);
                if !cache.contains(&key[..]) {
                    cache.insert(key.clone());
                    stack.push(Frame { op: i, before: state, forced: step.is_read() });
                    state = after;
                    events.lift(i);
                    if ops[i].complete.is_some() {
                        placed_required += 1;
                        result.longest = result.longest.max(placed_required);
                    }
                    entry = events.next[HEAD];
                    continue;
                }
                key[i / 64] &= !(1 << (i % 64));
                key[words] = u64::from(state);
                // The read could be placed here and its successor state already failed, so by the
                // read-first argument this state fails too.
                backtrack = step.is_read();
            }
            if !backtrack {
                entry = events.next[entry];
                continue;
            }
        }
        loop {
            let Some(frame) = stack.pop() else {
                result.linearizable = false;
                return result;
            };
            events.unlift(frame.op);
            key[frame.op / 64] &= !(1 << (frame.op % 64));
            state = frame.before;
            key[words] = u64::from(state);
            if ops[frame.op].complete.is_some() {
                placed_required -= 1;
            }
            if !frame.forced {
                entry = events.next[events.call_node[frame.op]];
                break;
            }
        }
    }
}

/// Searches the history of one key cut at `cutoff` (None = all of it).
fn search_prefix(ops: &[&Op], cutoff: Option<u64>) -> SearchResult {
    search(&model_of(ops, cutoff))
}

fn check_key_refs(key: &str, ops: &[&Op]) -> Result<(), Anomaly> {
    let full = search_prefix(ops, None);
    if full.linearizable {
        return Ok(());
    }
    // Candidate cut points: completions of ops with a known outcome; only a response can make a
    // prefix unexplainable.
    let mut cuts: Vec<u64> = model_of(ops, None).iter().filter_map(|op| op.complete).collect();
    cuts.sort_unstable();
    cuts.dedup();
    // The prefix cut at the last completion is equivalent to the whole history, which failed:
    // everything after it has unknown outcome. Binary search for the first failing cut.
    let (mut lo, mut hi) = (0usize, cuts.len().saturating_sub(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if search_prefix(ops, Some(cuts[mid])).linearizable {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let cut = cuts.get(lo).copied().unwrap_or(u64::MAX);
    let mut prefix: Vec<&Op> = ops.iter().copied().filter(|op| op.invoke_ns <= cut).collect();
    prefix.sort_by_key(|op| op.id);
    let culprits: Vec<String> = prefix
        .iter()
        .filter(|op| op.outcome != Outcome::Info && op.complete_ns.max(op.invoke_ns) == cut)
        .map(|op| describe(op))
        .collect();
    let detail = format!(
        "no linearization: longest prefix {} of {} ops; the history first becomes non-linearizable when {} \
         completes at {cut} ns (smallest failing prefix: {} of {} ops)",
        full.longest,
        full.required,
        culprits.join(" and "),
        prefix.len(),
        ops.len(),
    );
    Err(Anomaly {
        key: key.to_owned(),
        kind: "nonlinearizable".to_owned(),
        detail,
        op_ids: prefix.iter().map(|op| op.id).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------------------------

/// A register in words, for details.
fn show(register: &Register) -> String {
    match register {
        Register::Absent => "absent".to_owned(),
        Register::Pending => "pending".to_owned(),
        Register::Resolved { value } => format!("resolved({value:?})"),
        Register::Rejected { value } => format!("rejected({value:?})"),
        Register::Canceled { value } => format!("canceled({value:?})"),
        Register::TimedOut => "timed-out".to_owned(),
    }
}

/// An op in words, for details:
/// `#id p<process> kind(value) outcome [deduplicated] -> observed [invoke..complete]`.
fn describe(op: &Op) -> String {
    let kind = match op.kind {
        OpKind::Create => "create".to_owned(),
        OpKind::Resolve => "resolve".to_owned(),
        OpKind::Reject => "reject".to_owned(),
        OpKind::Cancel => "cancel".to_owned(),
        OpKind::Get => "get".to_owned(),
        OpKind::Await => "await".to_owned(),
        OpKind::LocalGet => format!("local-get@n{}", op.node.unwrap_or_default()),
        OpKind::Search => "search".to_owned(),
        OpKind::FinalRead => format!("final-read@n{}", op.node.unwrap_or_default()),
    };
    let value = op.value.as_ref().map(|v| format!("({v:?})")).unwrap_or_default();
    let outcome = match op.outcome {
        Outcome::Ok => "ok",
        Outcome::Fail => "fail",
        Outcome::Info => "info",
    };
    let dedup = if op.deduplicated { " deduplicated" } else { "" };
    let observed = op.observed.as_ref().map(|r| format!(" -> {}", show(r))).unwrap_or_default();
    format!(
        "#{} p{} {kind}{value} {outcome}{dedup}{observed} [{}..{}]",
        op.id, op.process, op.invoke_ns, op.complete_ns
    )
}

fn is_settle(op: &Op) -> bool {
    matches!(op.kind, OpKind::Resolve | OpKind::Reject | OpKind::Cancel)
}

fn ids(ops: &[&Op]) -> Vec<u64> {
    let mut ids: Vec<u64> = ops.iter().map(|op| op.id).collect();
    ids.sort_unstable();
    ids
}

/// Groups `items` by register, keeping first-seen order (registers have no order of their own).
fn group_by_register<T>(items: impl IntoIterator<Item = (Register, T)>) -> Vec<(Register, Vec<T>)> {
    let mut groups: Vec<(Register, Vec<T>)> = Vec::new();
    for (register, item) in items {
        match groups.iter_mut().find(|(r, _)| *r == register) {
            Some((_, members)) => members.push(item),
            None => groups.push((register, vec![item])),
        }
    }
    groups
}

/// Two different settlements were both acknowledged as the one that settled the promise. A
/// deduplicated acknowledgement counts: it says the op's own earlier attempt settled it.
fn double_settle(key: &str, ops: &[&Op]) -> Option<Anomaly> {
    let acks: Vec<&Op> = ops.iter().copied().filter(|op| is_settle(op) && op.outcome == Outcome::Ok).collect();
    let groups = group_by_register(acks.iter().filter_map(|op| Some((settle_register(op)?, *op))));
    if groups.len() < 2 {
        return None;
    }
    let mut sorted = acks.clone();
    sorted.sort_by_key(|op| op.id);
    let described: Vec<String> = sorted.iter().map(|op| describe(op)).collect();
    Some(Anomaly {
        key: key.to_owned(),
        kind: "double-settle".to_owned(),
        detail: format!("{} different settlements were acknowledged: {}", groups.len(), described.join("; ")),
        op_ids: ids(&acks),
    })
}

/// A settled value was seen that no resolve / reject on the key could have written.
fn phantom_values(key: &str, ops: &[&Op], finals: &[(u64, Register)]) -> Vec<Anomaly> {
    let could_write = |register: &Register, outcome_ok: fn(Outcome) -> bool| {
        ops.iter().any(|op| outcome_ok(op.outcome) && settle_register(op).as_ref() == Some(register))
    };
    // Refused writes definitely did not happen, so their values do not count as written. A
    // timeout carries no value; the linearizability check covers who may time a promise out.
    let written = |register: &Register| could_write(register, |o| o != Outcome::Fail);
    let is_phantom = |register: &Register| {
        matches!(register, Register::Resolved { .. } | Register::Rejected { .. } | Register::Canceled { .. })
            && !written(register)
    };
    // Final reads are reported by node, below.
    let seen_by_ops = ops.iter().filter(|op| op.kind != OpKind::FinalRead).filter_map(|op| {
        let seen = op.observed.as_ref().filter(|r| is_phantom(r))?;
        Some((seen.clone(), (Some(*op), None)))
    });
    let seen_finally = finals.iter().filter(|(_, r)| is_phantom(r)).map(|(node, r)| (r.clone(), (None, Some(*node))));
    group_by_register(seen_by_ops.chain(seen_finally))
        .into_iter()
        .map(|(register, sightings)| {
            let observers: Vec<&Op> = sightings.iter().filter_map(|(op, _)| *op).collect();
            let nodes: Vec<String> = sightings.iter().filter_map(|(_, node)| node.map(|n| n.to_string())).collect();
            let mut detail = format!("{} was observed but no resolve/reject on this key wrote it", show(&register));
            if !observers.is_empty() {
                let seen: Vec<String> = ids(&observers).iter().map(|id| format!("#{id}")).collect();
                detail.push_str(&format!("; seen by ops {}", seen.join(", ")));
            }
            if !nodes.is_empty() {
                detail.push_str(&format!("; final read on nodes {}", nodes.join(", ")));
            }
            if could_write(&register, |o| o == Outcome::Fail) {
                detail.push_str(" (only a refused op tried to write it)");
            }
            Anomaly { key: key.to_owned(), kind: "phantom-value".to_owned(), detail, op_ids: ids(&observers) }
        })
        .collect()
}

/// After healing, a node does not hold a settlement that a client was told had happened.
fn lost_settles(key: &str, ops: &[&Op], finals: &[(u64, Register)]) -> Vec<Anomaly> {
    let acks = ops.iter().filter(|op| is_settle(op) && op.outcome == Outcome::Ok);
    let groups = group_by_register(acks.filter_map(|op| Some((settle_register(op)?, *op))));
    groups
        .into_iter()
        .filter_map(|(acked, ackers)| {
            let wrong: Vec<String> = finals
                .iter()
                .filter(|(_, r)| *r != acked)
                .map(|(node, r)| format!("node {node} holds {}", show(r)))
                .collect();
            if wrong.is_empty() {
                return None;
            }
            let acked_by: Vec<String> = ids(&ackers).iter().map(|id| format!("#{id}")).collect();
            Some(Anomaly {
                key: key.to_owned(),
                kind: "lost-settle".to_owned(),
                detail: format!(
                    "{} was acknowledged by {} but after healing {}",
                    show(&acked),
                    acked_by.join(", "),
                    wrong.join(", ")
                ),
                op_ids: ids(&ackers),
            })
        })
        .collect()
}

/// After healing, nodes disagree about the key. A promise with a deadline is the exception when
/// some nodes hold it pending and the others timed out: the cluster times promises out by
/// itself, also while the final reads go from node to node, and whether the pending reads came
/// before the timeout is for the linearizability search to judge.
fn divergence(key: &str, finals: &[(u64, Register)], may_time_out: bool) -> Option<Anomaly> {
    let groups = group_by_register(finals.iter().map(|(node, r)| (r.clone(), *node)));
    let timing_out = |(r, _): &(Register, Vec<u64>)| matches!(r, Register::Pending | Register::TimedOut);
    if groups.len() < 2 || (may_time_out && groups.iter().all(timing_out)) {
        return None;
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(r, nodes)| {
            let nodes: Vec<String> = nodes.iter().map(u64::to_string).collect();
            format!("{} on nodes {}", show(r), nodes.join(", "))
        })
        .collect();
    Some(Anomaly {
        key: key.to_owned(),
        kind: "divergence".to_owned(),
        detail: format!("final reads differ: {}", parts.join("; ")),
        op_ids: Vec::new(),
    })
}

/// An await returned a settlement that is not what the promise finally holds. With diverged final
/// reads (reported separately) only a settlement no node holds is flagged.
fn await_not_final(key: &str, ops: &[&Op], finals: &[(u64, Register)]) -> Option<Anomaly> {
    let final_registers: Vec<Register> = group_by_register(finals.iter().map(|(n, r)| (r.clone(), *n)))
        .into_iter()
        .map(|(register, _)| register)
        .collect();
    if final_registers.is_empty() {
        return None;
    }
    let bad: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|op| op.kind == OpKind::Await && op.outcome == Outcome::Ok)
        .filter(|op| op.observed.as_ref().is_some_and(|seen| seen.is_settled() && !final_registers.contains(seen)))
        .collect();
    if bad.is_empty() {
        return None;
    }
    let mut sorted = bad.clone();
    sorted.sort_by_key(|op| op.id);
    let described: Vec<String> = sorted.iter().map(|op| describe(op)).collect();
    let finals_shown: Vec<String> = final_registers.iter().map(show).collect();
    Some(Anomaly {
        key: key.to_owned(),
        kind: "await-not-final".to_owned(),
        detail: format!(
            "awaits returned a non-final settlement: {}; final: {}",
            described.join("; "),
            finals_shown.join(" / ")
        ),
        op_ids: ids(&bad),
    })
}

/// TIMED_OUT seen by an op that completed more than [`EARLY_TIMEOUT_BOUND`] before the deadline
/// (by the harness's clock, on which every op's times and the deadline lie): the cluster timed
/// the promise out early, which no clock it runs on may cause while at most a minority of the
/// voters' clocks run fast.
fn early_timeout(key: &str, ops: &[&Op]) -> Option<Anomaly> {
    let deadline = key_deadline(ops.iter().copied())?;
    let bound_ns = early_timeout_bound_ns();
    let early: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|op| op.outcome != Outcome::Info && op.observed == Some(Register::TimedOut))
        .filter(|op| op.complete_ns.saturating_add(bound_ns) < deadline.ns)
        .collect();
    if early.is_empty() {
        return None;
    }
    let mut sorted = early.clone();
    sorted.sort_by_key(|op| op.id);
    let described: Vec<String> = sorted
        .iter()
        .map(|op| format!("{} ({} ms before the deadline)", describe(op), (deadline.ns - op.complete_ns) / 1_000_000))
        .collect();
    Some(Anomaly {
        key: key.to_owned(),
        kind: "early-timeout".to_owned(),
        detail: format!(
            "deadline_ms={} ({} ns into the run by the harness's clock), but TIMED_OUT was seen more than \
             {EARLY_TIMEOUT_BOUND:?} before it: {}",
            deadline.ms,
            deadline.ns,
            described.join("; ")
        ),
        op_ids: ids(&early),
    })
}
