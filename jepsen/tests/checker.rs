//! Checker tests: hand-written histories that must pass or must be caught, a cross-check of the
//! linearizability search against brute force on small random histories, and a throughput check.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use vow_jepsen::checker::{Anomaly, await_late, check, check_key, check_run};
use vow_jepsen::clocks::EARLY_TIMEOUT_BOUND;
use vow_jepsen::history::{Deadline, Found, NemesisEvent, Op, OpKind, Outcome, Register, SearchPage, StateFilter};

const OK: Outcome = Outcome::Ok;
const FAIL: Outcome = Outcome::Fail;
const INFO: Outcome = Outcome::Info;

type Finals = BTreeMap<String, Vec<(u64, Register)>>;

fn resolved(value: &str) -> Register {
    Register::Resolved { value: value.to_owned() }
}

fn rejected(value: &str) -> Register {
    Register::Rejected { value: value.to_owned() }
}

fn canceled(value: &str) -> Register {
    Register::Canceled { value: value.to_owned() }
}

/// [`EARLY_TIMEOUT_BOUND`] in nanoseconds, the unit of a history's times.
const BOUND: u64 = EARLY_TIMEOUT_BOUND.as_nanos() as u64;

/// A deadline from which the cluster may time a promise out at `earliest_ns` on the history's
/// clock: the deadline itself lies [`EARLY_TIMEOUT_BOUND`] later.
fn deadline_from(earliest_ns: u64) -> Deadline {
    let ns = earliest_ns + BOUND;
    Deadline { ms: 1_700_000_000_000 + (ns / 1_000_000) as i64, ns }
}

/// Builds a history, numbering ops in the order they are added; ops go to key "k" unless `on` says otherwise.
#[derive(Clone)]
struct History {
    ops: Vec<Op>,
    key: String,
}

impl History {
    fn new() -> Self {
        History { ops: Vec::new(), key: "k".to_owned() }
    }

    fn on(&mut self, key: &str) -> &mut Self {
        key.clone_into(&mut self.key);
        self
    }

    fn add(
        &mut self,
        process: u64,
        kind: OpKind,
        value: Option<&str>,
        (invoke_ns, complete_ns): (u64, u64),
        outcome: Outcome,
        observed: Option<Register>,
    ) -> u64 {
        let id = self.ops.len() as u64;
        self.ops.push(Op {
            id,
            process,
            kind,
            key: self.key.clone(),
            value: value.map(str::to_owned),
            invoke_ns,
            complete_ns,
            outcome,
            observed,
            deduplicated: false,
            node: None,
            detail: String::new(),
            deadline: None,
            tags: Default::default(),
            search: None,
        });
        id
    }

    fn create(&mut self, p: u64, span: (u64, u64), outcome: Outcome, observed: Option<Register>) -> u64 {
        self.add(p, OpKind::Create, None, span, outcome, observed)
    }

    fn resolve(&mut self, p: u64, v: &str, span: (u64, u64), outcome: Outcome, observed: Option<Register>) -> u64 {
        self.add(p, OpKind::Resolve, Some(v), span, outcome, observed)
    }

    fn reject(&mut self, p: u64, v: &str, span: (u64, u64), outcome: Outcome, observed: Option<Register>) -> u64 {
        self.add(p, OpKind::Reject, Some(v), span, outcome, observed)
    }

    fn get(&mut self, p: u64, span: (u64, u64), outcome: Outcome, observed: Option<Register>) -> u64 {
        self.add(p, OpKind::Get, None, span, outcome, observed)
    }

    fn await_(&mut self, p: u64, span: (u64, u64), outcome: Outcome, observed: Option<Register>) -> u64 {
        self.add(p, OpKind::Await, None, span, outcome, observed)
    }

    fn cancel(&mut self, p: u64, v: &str, span: (u64, u64), outcome: Outcome, observed: Option<Register>) -> u64 {
        self.add(p, OpKind::Cancel, Some(v), span, outcome, observed)
    }

    /// A create asking for `deadline`, with the tags `w=1` (as the workload tags its ids).
    fn create_due(
        &mut self,
        p: u64,
        deadline: Option<Deadline>,
        span: (u64, u64),
        outcome: Outcome,
        observed: Option<Register>,
    ) -> u64 {
        let id = self.create(p, span, outcome, observed);
        let op = &mut self.ops[id as usize];
        op.deadline = deadline;
        op.tags = [("w".to_owned(), "1".to_owned())].into();
        id
    }

    /// One search page over the ids starting with "w1-" that carry the tag `w=1`.
    fn search(&mut self, p: u64, span: (u64, u64), page: Page<'_>) -> u64 {
        let key = std::mem::replace(&mut self.key, "w1-".to_owned());
        let id = self.add(p, OpKind::Search, None, span, OK, None);
        self.key = key;
        self.ops[id as usize].search = Some(Box::new(SearchPage {
            id_prefix: "w1-".to_owned(),
            tags: [("w".to_owned(), "1".to_owned())].into(),
            state: page.state,
            first: page.first,
            last: page.last,
            found: page
                .found
                .iter()
                .map(|(key, register)| Found { key: (*key).to_owned(), register: register.clone() })
                .collect(),
        }));
        id
    }

    /// Marks write `id` as answered from the cluster's dedup table: the SDK retried it with its
    /// own idempotency key after an attempt whose answer was lost had taken effect.
    fn dedup(&mut self, id: u64) {
        self.ops[id as usize].deduplicated = true;
    }

    fn check(&self) -> Vec<Anomaly> {
        check(&self.ops)
    }

    /// Checks with the final reads of the current key from the given nodes.
    fn check_with(&self, finals: &[(u64, Register)]) -> Vec<Anomaly> {
        let mut all = Finals::new();
        all.insert(self.key.clone(), finals.to_vec());
        check(&with_finals(&self.ops, &all))
    }
}

/// A search page as a test writes it.
struct Page<'a> {
    state: Option<StateFilter>,
    first: bool,
    last: bool,
    found: &'a [(&'a str, Register)],
}

/// The only page of a search for every state.
fn whole<'a>(found: &'a [(&'a str, Register)]) -> Page<'a> {
    Page { state: None, first: true, last: true, found }
}

/// `ops` followed by final reads as the run makes them: after every other op has completed, one
/// node after another, each read of a key its own op.
fn with_finals(ops: &[Op], finals: &Finals) -> Vec<Op> {
    let mut all = ops.to_vec();
    let mut t = ops.iter().map(|op| op.complete_ns).max().unwrap_or(0) + 10;
    for (key, reads) in finals {
        for (node, register) in reads {
            all.push(Op {
                id: all.len() as u64,
                process: 1_000,
                kind: OpKind::FinalRead,
                key: key.clone(),
                value: None,
                invoke_ns: t,
                complete_ns: t + 1,
                outcome: OK,
                observed: Some(register.clone()),
                deduplicated: false,
                node: Some(*node),
                detail: String::new(),
                deadline: None,
                tags: Default::default(),
                search: None,
            });
            t += 2;
        }
    }
    all
}

/// The anomaly kinds, sorted, for compact assertions.
fn kinds(anomalies: &[Anomaly]) -> Vec<&str> {
    let mut kinds: Vec<&str> = anomalies.iter().map(|a| a.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds
}

fn find<'a>(anomalies: &'a [Anomaly], kind: &str) -> &'a Anomaly {
    anomalies.iter().find(|a| a.kind == kind).unwrap_or_else(|| panic!("no {kind} in {anomalies:#?}"))
}

// ---------------------------------------------------------------------------------------------
// Linearizable histories
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_history_is_valid() {
    assert_eq!(check(&[]), vec![]);
    assert_eq!(check_key("k", &[]), Ok(()));
}

#[test]
fn sequential_create_resolve_get_is_valid() {
    let mut h = History::new();
    h.get(2, (0, 5), FAIL, Some(Register::Absent)); // NOT_FOUND, concurrent with the create
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.get(1, (20, 30), OK, Some(Register::Pending));
    h.resolve(1, "a", (40, 50), OK, Some(resolved("a")));
    h.resolve(2, "b", (55, 58), FAIL, Some(resolved("a"))); // FAILED_PRECONDITION shows the winner
    h.get(1, (60, 70), OK, Some(resolved("a")));
    h.await_(1, (80, 90), OK, Some(resolved("a")));
    h.create(2, (95, 99), FAIL, Some(resolved("a"))); // ALREADY_EXISTS shows the record
    assert_eq!(h.check_with(&[(1, resolved("a")), (2, resolved("a")), (3, resolved("a"))]), vec![]);
    assert_eq!(check_key("k", &h.ops), Ok(()));
}

#[test]
fn racing_resolve_and_reject_where_one_wins_is_valid() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.await_(3, (15, 65), OK, Some(resolved("a")));
    h.resolve(1, "a", (20, 60), OK, Some(resolved("a")));
    // Completes before the winning resolve does, yet already saw it: the resolve took effect first.
    h.reject(2, "b", (25, 50), FAIL, Some(resolved("a")));
    h.get(4, (55, 70), OK, Some(resolved("a")));
    // The other way round on a second key: the reject wins.
    h.on("k2");
    h.create(1, (100, 110), OK, Some(Register::Pending));
    h.resolve(1, "c", (120, 160), FAIL, Some(rejected("d")));
    h.reject(2, "d", (125, 150), OK, Some(rejected("d")));
    h.await_(3, (115, 155), OK, Some(rejected("d")));
    let mut finals = Finals::new();
    finals.insert("k".to_owned(), vec![(1, resolved("a")), (2, resolved("a"))]);
    finals.insert("k2".to_owned(), vec![(1, rejected("d")), (2, rejected("d"))]);
    assert_eq!(check(&with_finals(&h.ops, &finals)), vec![]);
}

#[test]
fn unknown_resolve_observed_later_is_valid() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 30), INFO, None);
    // An unknown-outcome write may take effect long after the client gave up on it.
    h.get(2, (40, 50), OK, Some(Register::Pending));
    h.get(2, (100, 110), OK, Some(resolved("a")));
    h.reject(3, "b", (120, 130), FAIL, Some(resolved("a")));
    assert_eq!(h.check_with(&[(1, resolved("a")), (2, resolved("a"))]), vec![]);
}

#[test]
fn unknown_resolve_never_observed_is_valid() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 30), INFO, None);
    h.get(2, (40, 50), OK, Some(Register::Pending));
    h.reject(2, "b", (60, 70), OK, Some(rejected("b")));
    h.get(3, (80, 90), OK, Some(rejected("b")));
    assert_eq!(h.check_with(&[(1, rejected("b")), (2, rejected("b"))]), vec![]);
}

#[test]
fn unknown_create_that_takes_effect_late_is_valid() {
    let mut h = History::new();
    h.create(1, (0, 10), INFO, None);
    h.get(2, (20, 30), FAIL, Some(Register::Absent));
    h.get(2, (40, 50), OK, Some(Register::Pending));
    assert_eq!(h.check(), vec![]);
}

#[test]
fn a_deduplicated_create_is_its_own_create_and_its_reply_a_later_read() {
    // The first attempt created the promise and its answer was lost; before the SDK's retry came
    // back from the dedup table, another client settled the promise, and the retry shows that.
    let mut h = History::new();
    let create = h.create(1, (0, 100), OK, Some(resolved("a")));
    h.dedup(create);
    h.resolve(2, "a", (20, 30), OK, Some(resolved("a")));
    h.get(3, (40, 50), OK, Some(resolved("a")));
    assert_eq!(h.check_with(&[(1, resolved("a")), (2, resolved("a"))]), vec![]);

    // It is the only create: nothing else made the promise the resolve settled.
    let mut h = History::new();
    let create = h.create(1, (0, 100), OK, Some(Register::Pending));
    h.dedup(create);
    h.get(2, (10, 20), OK, Some(Register::Pending));
    assert_eq!(h.check(), vec![]);
    h.create(3, (110, 120), OK, Some(Register::Pending));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"], "a second acknowledged create");

    // Without the flag, the reply is the promise the create just made: a settled one is wrong.
    let mut h = History::new();
    h.create(1, (0, 100), OK, Some(resolved("a")));
    h.resolve(2, "a", (20, 30), OK, Some(resolved("a")));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);

    // No reply, deduplicated or not, can show a promise that is not there.
    let mut h = History::new();
    let create = h.create(1, (0, 100), OK, Some(Register::Absent));
    h.dedup(create);
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
}

#[test]
fn reads_concurrent_with_a_write_may_see_old_or_new_value() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 60), OK, Some(resolved("a")));
    h.get(2, (30, 40), OK, Some(Register::Pending));
    h.get(3, (35, 50), OK, Some(resolved("a")));
    // Overlaps the read that saw the new value, so it may still come before the write.
    h.get(4, (40, 70), OK, Some(Register::Pending));
    h.await_(5, (15, 80), OK, Some(Register::Pending));
    assert_eq!(h.check(), vec![]);
}

#[test]
fn a_deduplicated_settle_is_the_settle_of_its_own_value() {
    // Each op has its own idempotency key, so the dedup table can only have answered with this
    // op's own earlier attempt: nobody else writes "a", and it is not a phantom.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    let retried = h.resolve(1, "a", (20, 60), OK, Some(resolved("a")));
    h.dedup(retried);
    h.reject(2, "b", (30, 40), FAIL, Some(resolved("a")));
    h.get(3, (70, 80), OK, Some(resolved("a")));
    assert_eq!(h.check_with(&[(1, resolved("a")), (2, resolved("a"))]), vec![]);

    // Its settlement is durable like any other acknowledged one.
    let anomalies = h.check_with(&[(1, Register::Pending), (2, Register::Pending)]);
    assert_eq!(kinds(&anomalies), ["lost-settle", "nonlinearizable"], "{anomalies:#?}");
    assert_eq!(find(&anomalies, "lost-settle").op_ids, [retried]);

    // A settlement is final, so the reply, deduplicated or not, must show it.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.reject(2, "b", (15, 25), INFO, None);
    let retried = h.resolve(1, "a", (20, 60), OK, Some(rejected("b")));
    h.dedup(retried);
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
}

#[test]
fn ops_that_observed_nothing_are_ignored() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(2, "x", (20, 30), FAIL, None); // refused before reaching the register
    h.get(3, (20, 30), INFO, None); // timed out
    h.await_(4, (20, 30), OK, None); // answered without a record
    h.get(1, (40, 50), OK, Some(Register::Pending));
    assert_eq!(h.check(), vec![]);
}

// ---------------------------------------------------------------------------------------------
// Histories that must be caught
// ---------------------------------------------------------------------------------------------

#[test]
fn stale_read_after_acknowledged_resolve_is_caught() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 30), OK, Some(resolved("a")));
    let stale = h.get(2, (40, 50), OK, Some(Register::Pending));
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["nonlinearizable"], "{anomalies:#?}");
    let a = &anomalies[0];
    assert_eq!(a.key, "k");
    assert_eq!(a.op_ids, [0, 1, 2]);
    assert!(a.detail.starts_with("no linearization: longest prefix 2 of 3 ops"), "{}", a.detail);
    assert!(a.detail.contains(&format!("#{stale} ")), "{}", a.detail);
    assert_eq!(check_key("k", &h.ops).map_err(|a| a.kind), Err("nonlinearizable".to_owned()));
}

#[test]
fn reported_prefix_ends_at_the_first_unexplainable_response() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 30), OK, Some(resolved("a")));
    h.get(2, (40, 50), OK, Some(resolved("a")));
    let bad = h.get(2, (60, 70), OK, Some(Register::Pending));
    h.await_(3, (65, 200), OK, Some(resolved("a"))); // running when the bad read answered
    h.get(2, (80, 90), OK, Some(resolved("a"))); // invoked after it: not part of the prefix
    h.get(2, (100, 110), OK, Some(resolved("a")));
    let a = check_key("k", &h.ops).unwrap_err();
    assert_eq!(a.op_ids, [0, 1, 2, 3, 4]);
    assert!(a.detail.contains(&format!("#{bad} ")), "{}", a.detail);
    assert!(a.detail.contains("smallest failing prefix: 5 of 7 ops"), "{}", a.detail);
}

#[test]
fn two_acknowledged_settles_with_different_values_are_caught() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    let first = h.resolve(1, "a", (20, 30), OK, Some(resolved("a")));
    let second = h.reject(2, "b", (40, 50), OK, Some(rejected("b")));
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["double-settle", "nonlinearizable"], "{anomalies:#?}");
    assert_eq!(find(&anomalies, "double-settle").op_ids, [first, second]);

    // Concurrent settles: still only one of them may be acknowledged.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 50), OK, Some(resolved("a")));
    h.resolve(2, "b", (25, 45), OK, Some(resolved("b")));
    assert_eq!(kinds(&h.check()), ["double-settle", "nonlinearizable"]);
}

#[test]
fn a_deduplicated_ack_of_a_losing_value_is_a_double_settle() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 30), OK, Some(resolved("a")));
    let retry = h.reject(2, "b", (40, 50), OK, Some(rejected("b")));
    h.dedup(retry);
    assert_eq!(kinds(&h.check()), ["double-settle", "nonlinearizable"]);
}

#[test]
fn value_never_written_is_a_phantom() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    let reader = h.get(2, (20, 30), OK, Some(resolved("zzz")));
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["nonlinearizable", "phantom-value"], "{anomalies:#?}");
    assert_eq!(find(&anomalies, "phantom-value").op_ids, [reader]);

    // A value only a refused op tried to write never reached the register either.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.reject(1, "x", (20, 30), FAIL, None);
    h.await_(2, (15, 40), OK, Some(rejected("x")));
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["nonlinearizable", "phantom-value"], "{anomalies:#?}");
    assert!(find(&anomalies, "phantom-value").detail.contains("refused"));

    // The right value under the wrong settlement kind is not what was written.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 30), INFO, None);
    h.get(2, (40, 50), OK, Some(rejected("a")));
    assert_eq!(kinds(&h.check()), ["nonlinearizable", "phantom-value"]);

    // A final read can show a phantom too.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    let anomalies = h.check_with(&[(1, resolved("q")), (2, resolved("q"))]);
    assert_eq!(kinds(&anomalies), ["nonlinearizable", "phantom-value"], "{anomalies:#?}");
    let phantom = find(&anomalies, "phantom-value");
    assert!(phantom.detail.contains("final read on nodes 1, 2"), "{}", phantom.detail);
    assert_eq!(phantom.op_ids, Vec::<u64>::new(), "final reads are named by node");
}

#[test]
fn settled_then_pending_again_is_caught() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 30), INFO, None);
    h.get(2, (40, 50), OK, Some(resolved("a")));
    h.get(2, (60, 70), OK, Some(Register::Pending));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);

    // Both reads overlap the resolve, but one follows the other.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 100), OK, Some(resolved("a")));
    h.get(2, (30, 40), OK, Some(resolved("a")));
    h.get(3, (50, 60), OK, Some(Register::Pending));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
}

#[test]
fn read_of_absent_after_acknowledged_create_is_caught() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.get(2, (20, 30), FAIL, Some(Register::Absent));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);

    // A second plain (not deduplicated) acknowledged create means the promise was created twice.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.create(2, (20, 30), OK, Some(Register::Pending));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
}

#[test]
fn acknowledged_settle_missing_after_healing_is_a_lost_settle() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    let ack = h.resolve(1, "a", (20, 30), OK, Some(resolved("a")));
    h.get(2, (40, 50), OK, Some(resolved("a")));
    let anomalies = h.check_with(&[(1, Register::Pending), (2, Register::Pending), (3, Register::Pending)]);
    assert_eq!(kinds(&anomalies), ["lost-settle", "nonlinearizable"], "{anomalies:#?}");
    assert_eq!(find(&anomalies, "lost-settle").op_ids, [ack]);

    let anomalies = h.check_with(&[(1, resolved("a")), (2, Register::Absent), (3, resolved("a"))]);
    assert_eq!(kinds(&anomalies), ["divergence", "lost-settle", "nonlinearizable"], "{anomalies:#?}");
    assert!(find(&anomalies, "lost-settle").detail.contains("node 2 holds absent"));
}

#[test]
fn nodes_that_disagree_after_healing_diverge() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 30), INFO, None);
    let anomalies = h.check_with(&[(1, resolved("a")), (2, Register::Pending), (3, Register::Pending)]);
    // Node 2 is read after node 1: the promise went back from settled to pending.
    assert_eq!(kinds(&anomalies), ["divergence", "nonlinearizable"], "{anomalies:#?}");
    assert_eq!(
        find(&anomalies, "divergence").detail,
        "final reads differ: resolved(\"a\") on nodes 1; pending on nodes 2, 3"
    );
    // Read the other way round, the late resolve explains the reads; the replicas still differ.
    let anomalies = h.check_with(&[(1, Register::Pending), (2, resolved("a"))]);
    assert_eq!(kinds(&anomalies), ["divergence"], "{anomalies:#?}");
}

#[test]
fn await_returning_a_value_that_is_not_final_is_caught() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.await_(4, (5, 15), OK, Some(Register::Pending)); // an await that gave up pending is fine
    h.resolve(1, "a", (20, 30), INFO, None);
    h.reject(2, "b", (20, 30), INFO, None);
    let bad = h.await_(3, (10, 40), OK, Some(resolved("a")));
    let anomalies = h.check_with(&[(1, rejected("b")), (2, rejected("b"))]);
    assert_eq!(kinds(&anomalies), ["await-not-final", "nonlinearizable"], "{anomalies:#?}");
    assert_eq!(find(&anomalies, "await-not-final").op_ids, [bad]);
}

#[test]
fn final_reads_are_part_of_the_linearizability_check() {
    // An acknowledged create that no node holds at the end, on a promise nobody settled: no
    // settle was acknowledged, so only the final reads in the search can see it.
    let mut h = History::new();
    let create = h.create(1, (0, 10), OK, Some(Register::Pending));
    h.get(2, (20, 30), OK, Some(Register::Pending));
    let anomalies = h.check_with(&[(1, Register::Absent), (2, Register::Absent), (3, Register::Absent)]);
    assert_eq!(kinds(&anomalies), ["nonlinearizable"], "{anomalies:#?}");
    assert!(anomalies[0].op_ids.contains(&create));
    assert!(anomalies[0].detail.contains("final-read@n1"), "{}", anomalies[0].detail);
    assert_eq!(h.check_with(&[(1, Register::Pending), (2, Register::Pending)]), vec![]);

    // A get saw one unknown settle win, the final reads the other: both were possible, not both.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "w", (20, 30), INFO, None);
    h.resolve(2, "v", (20, 30), INFO, None);
    h.get(3, (40, 50), OK, Some(resolved("w")));
    let anomalies = h.check_with(&[(1, resolved("v")), (2, resolved("v"))]);
    assert_eq!(kinds(&anomalies), ["nonlinearizable"], "{anomalies:#?}");
    assert_eq!(h.check_with(&[(1, resolved("w")), (2, resolved("w"))]), vec![]);

    // A final read that failed shows nothing and constrains nothing.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    let mut ops = with_finals(&h.ops, &Finals::from([("k".to_owned(), vec![(1, Register::Absent)])]));
    ops[1].outcome = FAIL;
    ops[1].observed = None;
    assert_eq!(check(&ops), vec![]);
}

fn event(at_ns: u64, action: &str) -> NemesisEvent {
    NemesisEvent { at_ns, action: action.to_owned(), detail: format!("{action} at {at_ns}"), nodes: Vec::new() }
}

#[test]
fn a_run_in_which_no_write_succeeds_is_invalid() {
    // A cluster that refuses every write and reads nothing back breaks no safety rule.
    let mut h = History::new();
    h.create(1, (0, 10), FAIL, None); // e.g. INVALID_ARGUMENT
    h.resolve(2, "a", (0, 10), INFO, None); // e.g. UNAVAILABLE
    h.get(3, (20, 30), FAIL, Some(Register::Absent));
    h.await_(3, (40, 50), FAIL, Some(Register::Absent));
    assert_eq!(h.check(), vec![], "nothing unsafe happened");
    let anomalies = check_run(&h.ops, &[event(5, "heal")]);
    assert_eq!(kinds(&anomalies), ["no-progress"], "{anomalies:#?}");
    assert_eq!(
        anomalies[0].detail,
        "no write succeeded during the run (2 write attempts: 1 refused, 1 with unknown outcome)"
    );
    assert_eq!(anomalies[0].key, "", "it concerns the whole run");
    // No heal at all (an aborted history): the whole run still counts.
    assert_eq!(kinds(&check_run(&h.ops, &[])), ["no-progress"]);
}

#[test]
fn a_run_in_which_no_write_succeeds_after_the_final_heal_is_invalid() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(2, "a", (20, 30), OK, Some(resolved("a")));
    h.on("k2");
    h.create(1, (100, 110), INFO, None);
    h.create(2, (120, 130), FAIL, None);
    let early = check_run(&h.ops, &[event(5, "kill"), event(15, "heal")]);
    assert_eq!(early, vec![], "the resolve came after the only heal");
    let anomalies =
        check_run(&h.ops, &[event(5, "kill"), event(15, "heal"), event(40, "partition"), event(90, "heal")]);
    assert_eq!(kinds(&anomalies), ["no-progress"], "{anomalies:#?}");
    assert_eq!(
        anomalies[0].detail,
        "no write invoked after the final heal at 90 ns succeeded (2 write attempts: 1 refused, 1 with unknown outcome)"
    );
    // One write that gets through after the heal is enough; reads are not.
    h.on("k");
    h.get(3, (140, 150), OK, Some(resolved("a")));
    assert_eq!(kinds(&check_run(&h.ops, &[event(90, "heal")])), ["no-progress"]);
    h.on("k3");
    h.create(3, (160, 170), OK, Some(Register::Pending));
    assert_eq!(check_run(&h.ops, &[event(90, "heal")]), vec![]);
}

#[test]
fn a_node_that_exits_by_itself_makes_the_run_invalid() {
    let mut h = History::new();
    h.create(1, (20, 30), OK, Some(Register::Pending));
    let killed = [event(5, "kill"), event(10, "heal")];
    assert_eq!(check_run(&h.ops, &killed), vec![], "a kill by the nemesis is the fault under test");
    let crashed = [event(5, "kill"), event(10, "crashed"), event(10, "heal")];
    let anomalies = check_run(&h.ops, &crashed);
    assert_eq!(kinds(&anomalies), ["node-crashed"], "{anomalies:#?}");
    assert_eq!(anomalies[0].detail, "at 10 ns: crashed at 10");
}

const SEC: u64 = 1_000_000_000;

/// A promise resolved at 1 s, an await on node 2 from 0.5 s that returned it at `returned_ns`,
/// and a stale read of node 2's replica from `local_invoke_ns` that returned it by 2 s.
fn await_and_local_read(returned_ns: u64, local_invoke_ns: u64) -> History {
    let mut h = History::new();
    h.create(1, (0, SEC / 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (SEC, SEC + SEC / 10), OK, Some(resolved("a")));
    let wait = h.await_(2, (SEC / 2, returned_ns), OK, Some(resolved("a")));
    h.ops[wait as usize].node = Some(2);
    let local = h.add(3, OpKind::LocalGet, None, (local_invoke_ns, 2 * SEC), OK, Some(resolved("a")));
    h.ops[local as usize].node = Some(2);
    h
}

#[test]
fn an_await_that_outwaits_its_replica_is_late() {
    // Returned 3 s after node 2's own replica showed the settlement: the waiter missed its wake-up.
    let h = await_and_local_read(5 * SEC, SEC);
    assert_eq!(h.check(), vec![], "late, but nothing it saw was wrong");
    let anomalies = check_run(&h.ops, &[]);
    assert_eq!(kinds(&anomalies), ["await-late"], "{anomalies:#?}");
    assert_eq!(anomalies[0].op_ids, [2, 3]);
    assert!(anomalies[0].detail.contains("returned 3000 ms after #3"), "{}", anomalies[0].detail);
    // Within the bound, the wake-up is in time.
    assert_eq!(check_run(&await_and_local_read(3 * SEC, SEC).ops, &[]), vec![]);
    // A stale read invoked before the await, or so soon after it that its first read may
    // still run, proves nothing.
    assert_eq!(check_run(&await_and_local_read(5 * SEC, SEC / 4).ops, &[]), vec![]);
    assert_eq!(check_run(&await_and_local_read(5 * SEC, SEC / 2 + SEC / 10).ops, &[]), vec![]);
    // Another node's replica is not this one's.
    let mut other = await_and_local_read(5 * SEC, SEC);
    other.ops[3].node = Some(3);
    assert_eq!(check_run(&other.ops, &[]), vec![]);
    // A stale read that saw it still pending is no evidence.
    let mut pending = await_and_local_read(5 * SEC, SEC);
    pending.ops[3].observed = Some(Register::Pending);
    assert_eq!(check_run(&pending.ops, &[]), vec![]);
}

#[test]
fn awaits_are_not_judged_late_while_a_fault_holds_them_back() {
    let h = await_and_local_read(5 * SEC, SEC);
    // A kill healed before the await began leaves it judged; one during it does not.
    let before = [event(SEC / 10, "kill"), event(SEC / 5, "heal")];
    assert_eq!(kinds(&await_late(&h.ops, &before)), ["await-late"]);
    let during = [event(3 * SEC / 2, "pause"), event(6 * SEC, "heal")];
    assert_eq!(await_late(&h.ops, &during), vec![]);
    // A pause of the await's own node holds the evidence back too, so it excuses nothing.
    let mut own_pause = [event(SEC, "pause"), event(3 * SEC / 2, "heal")];
    own_pause[0].nodes = vec![2];
    assert_eq!(kinds(&await_late(&h.ops, &own_pause)), ["await-late"]);
    own_pause[0].nodes = vec![1];
    assert_eq!(await_late(&h.ops, &own_pause), vec![]);
    let unhealed = [event(SEC, "kill")];
    assert_eq!(await_late(&h.ops, &unhealed), vec![]);
    // A fault that begins once the evidence is in cannot have held back the first read, which
    // was over by then.
    let after_evidence = [event(5 * SEC / 2, "pause"), event(6 * SEC, "heal")];
    assert_eq!(kinds(&await_late(&h.ops, &after_evidence)), ["await-late"]);
    // A network fault keeps connections in TCP backoff for a while after its heal.
    let partition = [event(SEC / 10, "partition"), event(SEC / 5, "heal")];
    assert_eq!(await_late(&h.ops, &partition), vec![]);
    let long_ago = [event(0, "partition"), event(1, "heal")];
    let mut later = h.clone();
    for op in &mut later.ops {
        op.invoke_ns += 20 * SEC;
        op.complete_ns += 20 * SEC;
    }
    assert_eq!(kinds(&await_late(&later.ops, &long_ago)), ["await-late"]);
}

#[test]
fn a_local_read_constrains_no_linearization() {
    // A replica may lag: a stale read of "pending" after the acknowledged resolve is allowed,
    // where a Get's would not be.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 30), OK, Some(resolved("a")));
    h.add(2, OpKind::LocalGet, None, (40, 50), OK, Some(Register::Pending));
    h.add(2, OpKind::LocalGet, None, (60, 70), FAIL, Some(Register::Absent));
    assert_eq!(h.check(), vec![]);
    // It still may not see a value nobody wrote.
    h.add(2, OpKind::LocalGet, None, (80, 90), OK, Some(resolved("b")));
    assert_eq!(kinds(&h.check()), ["phantom-value"]);
}

#[test]
fn anomalies_come_out_in_key_order_and_serialize() {
    let mut h = History::new();
    for key in ["c", "a", "b"] {
        h.on(key);
        h.create(1, (0, 10), OK, Some(Register::Pending));
        h.get(2, (20, 30), OK, Some(if key == "a" { Register::Pending } else { Register::Absent }));
    }
    let anomalies = h.check();
    let keys: Vec<&str> = anomalies.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(keys, ["b", "c"]);
    let json = serde_json::to_value(&anomalies[0]).unwrap();
    assert_eq!(json["kind"], "nonlinearizable");
    assert_eq!(json["key"], "b");
    assert_eq!(json["op_ids"], serde_json::json!([4, 5]));
    assert!(json["detail"].is_string());
}

#[test]
fn many_overlapping_awaits_do_not_blow_up_a_failing_search() {
    // 60 awaits span the whole history; without placing reads eagerly the search would try 2^60
    // subsets of them before giving up.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (20, 30), OK, Some(resolved("a")));
    for p in 0..60 {
        h.await_(10 + p, (15, 1_000), OK, Some(resolved("a")));
    }
    for p in 0..30 {
        h.resolve(100 + p, &format!("late-{p}"), (25, 35), INFO, None);
    }
    h.get(2, (40, 50), OK, Some(Register::Pending));
    let started = Instant::now();
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Cancel, deadlines and timeouts, Search
// ---------------------------------------------------------------------------------------------

#[test]
fn a_cancel_is_a_settlement_of_its_own() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.await_(3, (15, 50), OK, Some(canceled("c")));
    h.cancel(1, "c", (20, 40), OK, Some(canceled("c")));
    h.resolve(2, "a", (25, 35), FAIL, Some(canceled("c")));
    h.get(2, (60, 70), OK, Some(canceled("c")));
    assert_eq!(h.check_with(&[(1, canceled("c")), (2, canceled("c"))]), vec![]);

    // Acknowledged alongside another settlement: two settlements.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    let cancel = h.cancel(1, "c", (20, 30), OK, Some(canceled("c")));
    let resolve = h.resolve(2, "a", (40, 50), OK, Some(resolved("a")));
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["double-settle", "nonlinearizable"], "{anomalies:#?}");
    assert_eq!(find(&anomalies, "double-settle").op_ids, [cancel, resolve]);

    // The canceled value under another state is not what the cancel wrote, and one nobody
    // canceled with is a phantom.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.cancel(1, "c", (20, 30), INFO, None);
    h.get(2, (40, 50), OK, Some(rejected("c")));
    assert_eq!(kinds(&h.check()), ["nonlinearizable", "phantom-value"]);
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.get(2, (40, 50), OK, Some(canceled("zzz")));
    assert_eq!(kinds(&h.check()), ["nonlinearizable", "phantom-value"]);

    // A lost cancel is a lost settle.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.cancel(1, "c", (20, 30), OK, Some(canceled("c")));
    assert_eq!(kinds(&h.check_with(&[(1, Register::Pending)])), ["lost-settle", "nonlinearizable"]);
}

#[test]
fn a_promise_may_time_out_at_any_instant_from_its_deadline_or_never() {
    let mut h = History::new();
    h.create_due(1, Some(deadline_from(100)), (0, 10), OK, Some(Register::Pending));
    h.get(2, (20, 30), OK, Some(Register::Pending));
    // Cluster time may run late: still pending well after the deadline.
    h.get(2, (150, 160), OK, Some(Register::Pending));
    h.await_(3, (150, 300), OK, Some(Register::TimedOut));
    h.resolve(1, "a", (310, 320), FAIL, Some(Register::TimedOut));
    h.get(2, (400, 410), OK, Some(Register::TimedOut));
    assert_eq!(h.check_with(&[(1, Register::TimedOut), (2, Register::TimedOut)]), vec![]);

    // Or never: a settle acknowledged after the deadline (a slow clock) and no timeout.
    let mut h = History::new();
    h.create_due(1, Some(deadline_from(100)), (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (200, 210), OK, Some(resolved("a")));
    assert_eq!(h.check_with(&[(1, resolved("a"))]), vec![]);
}

#[test]
fn a_timed_out_promise_is_never_settled_and_a_settled_one_never_times_out() {
    // The resolve is acknowledged after a read saw the timeout.
    let mut h = History::new();
    h.create_due(1, Some(deadline_from(100)), (0, 10), OK, Some(Register::Pending));
    h.get(2, (150, 160), OK, Some(Register::TimedOut));
    h.resolve(1, "a", (170, 180), OK, Some(resolved("a")));
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["nonlinearizable"], "{anomalies:#?}");

    // The resolve won the race with the timeout, yet the promise is later seen timed out.
    let mut h = History::new();
    h.create_due(1, Some(deadline_from(100)), (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (90, 130), OK, Some(resolved("a")));
    h.get(2, (140, 150), OK, Some(Register::TimedOut));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
    let anomalies = h.check_with(&[(1, Register::TimedOut)]);
    assert_eq!(kinds(&anomalies), ["lost-settle", "nonlinearizable"], "{anomalies:#?}");

    // The same race lost: the resolve is refused with the timed-out record.
    let mut h = History::new();
    h.create_due(1, Some(deadline_from(100)), (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (90, 130), FAIL, Some(Register::TimedOut));
    h.get(2, (140, 150), OK, Some(Register::TimedOut));
    assert_eq!(h.check_with(&[(1, Register::TimedOut), (2, Register::TimedOut)]), vec![]);
}

#[test]
fn only_a_promise_given_a_deadline_times_out() {
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.get(2, (1_000, 1_010), OK, Some(Register::TimedOut));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
    // A refused create's deadline is not the promise's.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.create_due(2, Some(deadline_from(50)), (20, 30), FAIL, Some(Register::Pending));
    h.get(2, (1_000, 1_010), OK, Some(Register::TimedOut));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
}

#[test]
fn a_timeout_while_the_final_reads_go_from_node_to_node_is_no_divergence() {
    // The final reads come at 20 ns and after; the promise may time out from 15 ns on.
    let mut h = History::new();
    h.create_due(1, Some(deadline_from(15)), (0, 10), OK, Some(Register::Pending));
    let finals = [(1, Register::Pending), (2, Register::Pending), (3, Register::TimedOut)];
    assert_eq!(h.check_with(&finals), vec![]);
    // The other way round the promise came back from its timeout.
    let finals = [(1, Register::TimedOut), (2, Register::Pending)];
    assert_eq!(kinds(&h.check_with(&finals)), ["nonlinearizable"]);
    // Without a deadline, or with a settlement among them, nodes that differ diverge.
    let finals = [(1, Register::Pending), (2, resolved("a")), (3, Register::TimedOut)];
    assert!(kinds(&h.check_with(&finals)).contains(&"divergence"));
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    let finals = [(1, Register::Pending), (2, Register::TimedOut)];
    assert_eq!(kinds(&h.check_with(&finals)), ["divergence", "nonlinearizable"]);
}

#[test]
fn a_create_after_its_deadline_leaves_the_promise_timed_out() {
    let mut h = History::new();
    h.create_due(1, Some(deadline_from(100)), (150, 170), OK, Some(Register::TimedOut));
    h.resolve(2, "a", (180, 190), FAIL, Some(Register::TimedOut));
    assert_eq!(h.check_with(&[(1, Register::TimedOut)]), vec![]);
    // A deduplicated one may show the timeout too; nothing may show it on a create without one.
    let mut h = History::new();
    let retried = h.create_due(1, Some(deadline_from(100)), (50, 170), OK, Some(Register::TimedOut));
    h.dedup(retried);
    assert_eq!(h.check(), vec![]);
    let mut h = History::new();
    h.create_due(1, None, (150, 170), OK, Some(Register::TimedOut));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
}

#[test]
fn a_timeout_seen_before_its_deadline_less_the_bound_is_an_early_timeout() {
    // The deadline lies at 2 s into the run; the cluster may time the promise out from 1.5 s on.
    let deadline = deadline_from(1_500_000_000);
    assert_eq!(deadline.ns, 2_000_000_000);
    let earliest = deadline.ns - BOUND;
    let mut h = History::new();
    h.create_due(1, Some(deadline), (0, 10), OK, Some(Register::Pending));
    // Seen by a read that completed just in time: cluster time ran ahead, within the bound.
    h.get(2, (earliest - 100, earliest), OK, Some(Register::TimedOut));
    assert_eq!(h.check(), vec![]);
    // One nanosecond earlier is too early, whoever sees it: a read, a refusal, a final read.
    let early = h.get(3, (earliest - 300, earliest - 1), OK, Some(Register::TimedOut));
    let refused = h.resolve(4, "a", (100, 200), FAIL, Some(Register::TimedOut));
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["early-timeout", "nonlinearizable"], "{anomalies:#?}");
    let a = find(&anomalies, "early-timeout");
    assert_eq!(a.op_ids, [early, refused]);
    assert_eq!(a.key, "k");
    assert!(a.detail.contains(&format!("deadline_ms={}", deadline.ms)), "{}", a.detail);
    assert!(a.detail.contains("1999 ms before the deadline"), "{}", a.detail);

    // The earliest deadline a create that may have taken effect asked for counts: an unknown
    // create's, not a refused one's.
    let mut h = History::new();
    h.create_due(1, Some(deadline_from(5_000_000_000)), (0, 10), OK, Some(Register::Pending));
    h.create_due(2, Some(deadline_from(100)), (0, 10), INFO, None);
    h.create_due(3, Some(deadline_from(0)), (0, 10), FAIL, Some(Register::Pending));
    h.get(2, (150, 160), OK, Some(Register::TimedOut));
    assert_eq!(h.check(), vec![]);
    h.get(2, (50, 60), OK, Some(Register::TimedOut));
    assert_eq!(kinds(&h.check()), ["early-timeout", "nonlinearizable"]);
}

#[test]
fn a_clock_skewed_run_is_judged_by_the_harness_clock_alone() {
    // A fast leader stamps the timeout early: its deadline by the node's clock has passed, but
    // the harness's clock, the true one, says it is 2 s early.
    let mut h = History::new();
    let deadline = deadline_from(3_000_000_000);
    h.create_due(1, Some(deadline), (0, 10), OK, Some(Register::Pending));
    let seen = h.await_(2, (20, 1_000_000_000), OK, Some(Register::TimedOut));
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["early-timeout", "nonlinearizable"], "{anomalies:#?}");
    assert_eq!(find(&anomalies, "early-timeout").op_ids, [seen]);
    assert!(find(&anomalies, "early-timeout").detail.contains("2500 ms before the deadline"));
    // The final reads after the deadline see it timed out: not early.
    let mut h = History::new();
    h.create_due(1, Some(deadline_from(20)), (0, 10), OK, Some(Register::Pending));
    assert_eq!(h.check_with(&[(1, Register::TimedOut), (2, Register::TimedOut)]), vec![]);
}

#[test]
fn a_search_page_is_a_read_of_every_record_on_it() {
    let mut h = History::new();
    for key in ["w1-a", "w1-b", "w1-c"] {
        h.on(key);
        h.create_due(1, None, (0, 10), OK, Some(Register::Pending));
    }
    h.on("w1-a");
    h.resolve(1, "a", (20, 30), OK, Some(resolved("a")));
    let found = [("w1-a", resolved("a")), ("w1-b", Register::Pending), ("w1-c", Register::Pending)];
    h.search(2, (40, 50), whole(&found));
    assert_eq!(h.check(), vec![]);
    // Each record is read at its own instant within the page: overlapping the resolve, the
    // page may show it before or after.
    let mut concurrent = h.clone();
    concurrent.search(3, (25, 45), whole(&[("w1-a", Register::Pending), ("w1-b", Register::Pending)]));
    // (w1-c is missing from it: see below.)
    let anomalies = concurrent.check();
    assert_eq!(kinds(&anomalies), ["nonlinearizable"], "{anomalies:#?}");
    assert_eq!(anomalies[0].key, "w1-c");
    // A stale record after the resolve completed is caught on its own key.
    let stale = h.search(
        3,
        (40, 50),
        whole(&[("w1-a", Register::Pending), ("w1-b", Register::Pending), ("w1-c", Register::Pending)]),
    );
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["nonlinearizable"], "{anomalies:#?}");
    assert_eq!(anomalies[0].key, "w1-a");
    assert!(anomalies[0].op_ids.contains(&stale));
    assert!(anomalies[0].detail.contains(&format!("#{stale} p3 search")), "{}", anomalies[0].detail);
}

#[test]
fn a_promise_a_page_covers_but_leaves_out_was_absent() {
    let history = || {
        let mut h = History::new();
        for key in ["w1-a", "w1-b", "w1-c"] {
            h.on(key);
            h.create_due(1, None, (0, 10), OK, Some(Register::Pending));
        }
        h
    };
    let a_and_c = [("w1-a", Register::Pending), ("w1-c", Register::Pending)];
    // The only page: it covers every id of the prefix, so an acknowledged create is missing.
    let mut h = history();
    let page = h.search(2, (40, 50), whole(&a_and_c));
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["nonlinearizable"], "{anomalies:#?}");
    assert_eq!((anomalies[0].key.as_str(), anomalies[0].op_ids.contains(&page)), ("w1-b", true));
    // A middle page between the two: still covered.
    let mut h = history();
    h.search(2, (40, 50), Page { state: None, first: false, last: false, found: &a_and_c });
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
    // Past the page's last record, with more pages to come, or before the first record of a
    // later page: not covered (the page token hides where the server resumed).
    let mut h = history();
    h.search(2, (40, 50), Page { state: None, first: true, last: false, found: &[("w1-a", Register::Pending)] });
    h.search(2, (50, 60), Page { state: None, first: false, last: true, found: &[("w1-c", Register::Pending)] });
    assert_eq!(h.check(), vec![]);
    // Asked for one state, a page shows only what it holds.
    let mut h = history();
    h.search(2, (40, 50), Page { state: Some(StateFilter::Pending), first: true, last: true, found: &a_and_c });
    assert_eq!(h.check(), vec![]);
    // A promise created without the page's tags does not match, nor does one still being
    // created.
    let mut h = history();
    h.ops[1].tags.clear();
    h.search(2, (40, 50), whole(&a_and_c));
    assert_eq!(h.check(), vec![]);
    let mut h = history();
    h.ops[1].invoke_ns = 30;
    h.ops[1].complete_ns = 60;
    h.search(2, (40, 50), whole(&a_and_c));
    assert_eq!(h.check(), vec![]);
}

#[test]
fn a_record_the_query_excludes_is_a_search_mismatch() {
    let mut h = History::new();
    h.on("w1-a");
    h.create_due(1, None, (0, 10), OK, Some(Register::Pending));
    let page =
        Page { state: Some(StateFilter::Resolved), first: true, last: true, found: &[("w1-a", Register::Pending)] };
    let id = h.search(2, (40, 50), page);
    let anomalies = h.check();
    assert_eq!(kinds(&anomalies), ["search-mismatch"], "{anomalies:#?}");
    assert_eq!((anomalies[0].key.as_str(), anomalies[0].op_ids.as_slice()), ("w1-a", &[id][..]));
    let mut h = History::new();
    h.on("w2-a");
    h.create_due(1, None, (0, 10), OK, Some(Register::Pending));
    h.search(2, (40, 50), whole(&[("w2-a", Register::Pending)]));
    assert_eq!(kinds(&h.check()), ["search-mismatch"]);
}

#[test]
fn an_await_on_a_follower_that_gives_up_pending_read_pending_within_its_wait() {
    // The follower's Await gave up after its wait and answered pending: fine while the settle
    // may come after some instant of the wait, a stale read once it was acknowledged before.
    let mut h = History::new();
    h.create(1, (0, 10), OK, Some(Register::Pending));
    h.resolve(1, "a", (100, 110), OK, Some(resolved("a")));
    h.await_(2, (20, 600), OK, Some(Register::Pending));
    assert_eq!(h.check(), vec![]);
    h.await_(3, (120, 600), OK, Some(Register::Pending));
    assert_eq!(kinds(&h.check()), ["nonlinearizable"]);
}

// ---------------------------------------------------------------------------------------------
// Cross-check against brute force
// ---------------------------------------------------------------------------------------------

/// A small deterministic PRNG (splitmix64), so the tests need no extra dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What a part of the brute force is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartKind {
    /// The effect of an op (for a read, the read).
    Effect,
    /// The reply of an acknowledged write that shows a later state than the write left: a
    /// deduplicated write's (the cluster read the register when the retry arrived), or a create's
    /// that shows the promise timed out (it arrived after the deadline). It comes after the write
    /// and within the op.
    Reply,
    /// The cluster's timeout of the promise: optional, from the earliest deadline a create that
    /// may have taken effect asked for, less the bound.
    Timeout,
}

/// One thing the brute force places.
#[derive(Debug, Clone, Copy)]
struct Part<'a> {
    op: &'a Op,
    kind: PartKind,
    invoke: u64,
    /// None: optional, and never blocks another part.
    complete: Option<u64>,
}

fn is_write(op: &Op) -> bool {
    matches!(op.kind, OpKind::Create | OpKind::Resolve | OpKind::Reject | OpKind::Cancel)
}

/// Whether an acknowledged write's reply is placed as a part of its own.
fn late_reply(op: &Op) -> bool {
    let shows_timeout = op.kind == OpKind::Create && op.observed == Some(Register::TimedOut);
    op.outcome == Outcome::Ok && is_write(op) && op.observed.is_some() && (op.deduplicated || shows_timeout)
}

/// The parts of one key's history, each op's effect before its reply, and the timeout last.
fn brute_parts(ops: &[Op]) -> Vec<Part<'_>> {
    let mut parts = Vec::new();
    for op in ops {
        let relevant = match op.outcome {
            Outcome::Info => is_write(op),
            Outcome::Ok => is_write(op) || op.observed.is_some(),
            Outcome::Fail => op.observed.is_some(),
        };
        let complete = (op.outcome != Outcome::Info).then_some(op.complete_ns);
        if relevant {
            parts.push(Part { op, kind: PartKind::Effect, invoke: op.invoke_ns, complete });
        }
        if late_reply(op) {
            parts.push(Part { op, kind: PartKind::Reply, invoke: op.invoke_ns, complete });
        }
    }
    let due = ops
        .iter()
        .filter(|op| op.kind == OpKind::Create && op.outcome != Outcome::Fail && op.deadline.is_some())
        .min_by_key(|op| op.deadline.map(|d| d.ns));
    if let Some(op) = due {
        let invoke = op.deadline.map_or(0, |d| d.ns.saturating_sub(BOUND));
        parts.push(Part { op, kind: PartKind::Timeout, invoke, complete: None });
    }
    parts
}

/// The model step of `part` from `state`, written straight from the spec: None if impossible.
fn brute_step(part: Part<'_>, state: &Register) -> Option<Register> {
    let op = part.op;
    match part.kind {
        PartKind::Reply => return (op.observed.as_ref() == Some(state)).then(|| state.clone()),
        PartKind::Timeout => {
            // Like a settle with unknown outcome: takes effect on a pending promise, or not at all.
            return Some(if *state == Register::Pending { Register::TimedOut } else { state.clone() });
        }
        PartKind::Effect => {}
    }
    let value = op.value.clone().unwrap_or_default();
    let target = match op.kind {
        OpKind::Create => Some(Register::Pending),
        OpKind::Resolve => Some(Register::Resolved { value }),
        OpKind::Reject => Some(Register::Rejected { value }),
        OpKind::Cancel => Some(Register::Canceled { value }),
        _ => None,
    };
    let requires = if op.kind == OpKind::Create { Register::Absent } else { Register::Pending };
    match op.outcome {
        // An unknown write takes effect if the register lets it, or is a no-op.
        Outcome::Info => Some(if *state == requires { target? } else { state.clone() }),
        Outcome::Ok if is_write(op) => {
            let after = (*state == requires).then_some(target?)?;
            // A plain reply shows the register the write left; a later one is its own part.
            let reply_ok = late_reply(op) || op.observed.is_none() || op.observed.as_ref() == Some(&after);
            reply_ok.then_some(after)
        }
        Outcome::Ok | Outcome::Fail => (op.observed.as_ref() == Some(state)).then(|| state.clone()),
    }
}

/// Tries every order of the parts that respects real time, with unknown-outcome writes and the
/// timeout optional and every reply after its own write. Failed (placed parts, state) pairs are
/// remembered so histories of twenty ops stay cheap.
fn brute_force_linearizable(ops: &[Op]) -> bool {
    type Failed = HashSet<(Vec<bool>, Register)>;
    fn go(parts: &[Part<'_>], used: &mut [bool], state: &Register, failed: &mut Failed) -> bool {
        if parts.iter().zip(used.iter()).all(|(p, u)| *u || p.complete.is_none()) {
            return true;
        }
        if failed.contains(&(used.to_vec(), state.clone())) {
            return false;
        }
        for x in 0..parts.len() {
            // An unplaced part with a known outcome that returned before x was invoked must come first.
            let blocked = |y: usize| !used[y] && parts[y].complete.is_some_and(|c| c < parts[x].invoke);
            // A reply follows its own write, the part just before it.
            let early_reply = parts[x].kind == PartKind::Reply && !used[x - 1];
            if used[x] || early_reply || (0..parts.len()).any(blocked) {
                continue;
            }
            if let Some(next) = brute_step(parts[x], state) {
                used[x] = true;
                if go(parts, used, &next, failed) {
                    return true;
                }
                used[x] = false;
            }
        }
        failed.insert((used.to_vec(), state.clone()));
        false
    }
    let parts = brute_parts(ops);
    go(&parts, &mut vec![false; parts.len()], &Register::Absent, &mut Failed::new())
}

fn random_register(rng: &mut Rng) -> Register {
    match rng.below(9) {
        0 => Register::Absent,
        1 => Register::Pending,
        2 => resolved("a"),
        3 => resolved("b"),
        4 => rejected("a"),
        5 => rejected("b"),
        6 => canceled("a"),
        7 => canceled("b"),
        _ => Register::TimedOut,
    }
}

fn random_small_history(rng: &mut Rng) -> Vec<Op> {
    let mut h = History::new();
    let n = 1 + rng.below(9);
    // A third of the histories are of a promise with a deadline that may pass while they run;
    // now and then creates ask for different ones.
    let due = rng.chance(33).then(|| rng.below(30));
    for p in 0..n {
        let invoke = rng.below(20);
        let span = (invoke, invoke + rng.below(12));
        let outcome = match rng.below(10) {
            0..=5 => OK,
            6 | 7 => FAIL,
            _ => INFO,
        };
        let value = if rng.chance(50) { "a" } else { "b" };
        let kind = rng.below(7);
        // An acknowledged write's reply mostly shows what the write left, as the cluster's does.
        let left = match kind {
            0 if due.is_some() && rng.chance(20) => Register::TimedOut,
            0 => Register::Pending,
            1 => resolved(value),
            2 => rejected(value),
            _ => canceled(value),
        };
        let observed = match outcome {
            Outcome::Info => None,
            Outcome::Fail => rng.chance(80).then(|| random_register(rng)),
            Outcome::Ok if kind < 4 && rng.chance(70) => Some(left),
            Outcome::Ok => Some(random_register(rng)),
        };
        let id = match kind {
            0 => {
                let deadline = due.map(|t| if rng.chance(15) { rng.below(30) } else { t }).map(deadline_from);
                h.create_due(p, deadline, span, outcome, observed)
            }
            1 => h.resolve(p, value, span, outcome, observed),
            2 => h.reject(p, value, span, outcome, observed),
            3 => h.cancel(p, value, span, outcome, observed),
            4 => h.get(p, span, outcome, observed),
            5 => h.await_(p, span, outcome, observed),
            _ => h.add(p, OpKind::FinalRead, None, span, outcome, observed),
        };
        if outcome == OK && kind < 4 && rng.chance(20) {
            h.dedup(id);
        }
    }
    h.ops
}

#[test]
fn search_agrees_with_brute_force_on_small_random_histories() {
    let mut rng = Rng(7);
    let (mut valid, mut invalid) = (0, 0);
    for round in 0..40_000 {
        let ops = random_small_history(&mut rng);
        let expected = brute_force_linearizable(&ops);
        let got = check_key("k", &ops);
        assert_eq!(got.is_ok(), expected, "round {round}: {got:?}\n{ops:#?}");
        if let Err(anomaly) = got {
            invalid += 1;
            // The reported prefix must itself be non-linearizable.
            let prefix: Vec<Op> = ops.iter().filter(|op| anomaly.op_ids.contains(&op.id)).cloned().collect();
            assert!(!brute_force_linearizable(&prefix), "round {round}: prefix {:?} is linearizable", anomaly.op_ids);
            assert!(check_key("k", &prefix).is_err(), "round {round}");
        } else {
            valid += 1;
        }
    }
    eprintln!("brute force: {valid} linearizable, {invalid} not");
    // Both answers must be exercised for the comparison to mean anything.
    assert!(valid > 2_000 && invalid > 2_000, "valid {valid}, invalid {invalid}");
}

/// Turns one op of a valid history into a likely-invalid one by changing what it observed.
fn perturb(ops: &mut [Op], rng: &mut Rng) {
    let observers: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].observed.is_some()).collect();
    if observers.is_empty() {
        return;
    }
    let i = observers[rng.below(observers.len() as u64) as usize];
    // Reuse values that were really written, so the change is subtle rather than a phantom.
    let written: Vec<Register> = ops
        .iter()
        .filter_map(|op| match (op.kind, &op.value) {
            (OpKind::Resolve, Some(v)) => Some(resolved(v)),
            (OpKind::Reject, Some(v)) => Some(rejected(v)),
            (OpKind::Cancel, Some(v)) => Some(canceled(v)),
            _ => None,
        })
        .collect();
    let due = ops.iter().any(|op| op.deadline.is_some());
    ops[i].observed = Some(match rng.below(4) {
        0 => Register::Absent,
        1 => Register::Pending,
        2 if due => Register::TimedOut,
        _ if written.is_empty() => Register::Pending,
        _ => written[rng.below(written.len() as u64) as usize].clone(),
    });
}

#[test]
fn search_agrees_with_brute_force_on_near_valid_histories() {
    let mut rng = Rng(11);
    let (mut valid, mut invalid) = (0, 0);
    for round in 0..5_000 {
        let (mut ops, _) = generated_valid_run(1, 2 + rng.below(4), 4, 1_000 + round);
        assert!(brute_force_linearizable(&ops), "round {round}: generator made an invalid history");
        if rng.chance(70) {
            perturb(&mut ops, &mut rng);
        }
        let expected = brute_force_linearizable(&ops);
        let got = check_key(&ops[0].key, &ops);
        assert_eq!(got.is_ok(), expected, "round {round}: {got:?}\n{ops:#?}");
        if expected { valid += 1 } else { invalid += 1 }
    }
    eprintln!("near-valid: {valid} linearizable, {invalid} not");
    assert!(valid > 1_000 && invalid > 1_000, "valid {valid}, invalid {invalid}");
}

// ---------------------------------------------------------------------------------------------
// Throughput
// ---------------------------------------------------------------------------------------------

/// A valid history: `procs` clients per key each run `per_proc` ops with overlapping intervals;
/// each op takes effect at a random instant inside its interval and its response is computed from
/// the model at that instant. A third of the keys get a deadline, and the cluster times the
/// promise out at a random instant after it, or a create arriving later makes it timed out at
/// once. Also returns the final reads of three agreeing nodes.
fn generated_valid_run(keys: usize, procs: u64, per_proc: usize, seed: u64) -> (Vec<Op>, Finals) {
    let mut rng = Rng(seed);
    let mut ops = Vec::new();
    let mut finals = Finals::new();
    for k in 0..keys {
        let key = format!("key-{k:05}");
        let deadline = rng.chance(33).then(|| deadline_from(rng.below(150)));
        // When the cluster's timeout fires (if the promise is pending then).
        let times_out_at = deadline.map(|d| d.ns - BOUND + rng.below(60));
        // (effect instant, op or None for the timeout, whether an unknown-outcome write took effect)
        let mut planned: Vec<(u64, Option<Op>, bool)> = Vec::new();
        if let Some(at) = times_out_at {
            planned.push((at, None, true));
        }
        for process in 0..procs {
            let mut t = rng.below(30);
            for _ in 0..per_proc {
                let invoke = t;
                let at = invoke + 1 + rng.below(40);
                let complete = at + 1 + rng.below(40);
                t = complete + rng.below(20);
                let kind = match rng.below(100) {
                    0..15 => OpKind::Create,
                    15..27 => OpKind::Resolve,
                    27..35 => OpKind::Reject,
                    35..42 => OpKind::Cancel,
                    42..75 => OpKind::Get,
                    _ => OpKind::Await,
                };
                let value = matches!(kind, OpKind::Resolve | OpKind::Reject | OpKind::Cancel)
                    .then(|| format!("{key}-{}", planned.len()));
                let outcome = match rng.below(100) {
                    0..8 => INFO,
                    8..12 => FAIL, // refused without showing anything
                    _ => OK,
                };
                let op = Op {
                    id: 0,
                    process,
                    kind,
                    key: key.clone(),
                    value,
                    invoke_ns: invoke,
                    complete_ns: complete,
                    outcome,
                    observed: None,
                    // An acknowledged write may have been retried; its reply is the same.
                    deduplicated: outcome == OK && rng.chance(10),
                    node: None,
                    detail: String::new(),
                    deadline: if kind == OpKind::Create { deadline } else { None },
                    tags: Default::default(),
                    search: None,
                };
                planned.push((at, Some(op), rng.chance(50)));
            }
        }
        planned.sort_by_key(|(at, op, _)| (*at, op.as_ref().map_or(0, |op| op.process + 1)));
        let mut state = Register::Absent;
        for (at, op, takes_effect) in planned {
            let Some(mut op) = op else {
                if state == Register::Pending {
                    state = Register::TimedOut;
                }
                continue;
            };
            // A create after the timeout's instant makes the promise timed out at once.
            let created = if times_out_at.is_some_and(|t| at >= t) { Register::TimedOut } else { Register::Pending };
            let target = match (op.kind, &op.value) {
                (OpKind::Resolve, Some(value)) => Some(Register::Resolved { value: value.clone() }),
                (OpKind::Reject, Some(value)) => Some(Register::Rejected { value: value.clone() }),
                (OpKind::Cancel, Some(value)) => Some(Register::Canceled { value: value.clone() }),
                _ => None,
            };
            let settle = matches!(op.kind, OpKind::Resolve | OpKind::Reject | OpKind::Cancel);
            match op.outcome {
                Outcome::Info => {
                    if takes_effect {
                        match (op.kind, &state) {
                            (OpKind::Create, Register::Absent) => state = created,
                            (_, Register::Pending) if settle => state = target.clone().expect("settles carry a value"),
                            _ => {}
                        }
                    }
                }
                Outcome::Fail => {}
                Outcome::Ok => match (op.kind, &state) {
                    (OpKind::Create, Register::Absent) => {
                        state = created;
                        op.observed = Some(state.clone());
                    }
                    (_, Register::Pending) if settle => {
                        state = target.clone().expect("settles carry a value");
                        op.observed = Some(state.clone());
                    }
                    (OpKind::Get | OpKind::Await, Register::Absent) | (OpKind::Create, _) | (_, Register::Absent) => {
                        op.outcome = FAIL;
                        op.observed = Some(state.clone());
                    }
                    _ if settle => {
                        op.outcome = FAIL;
                        op.observed = Some(state.clone());
                    }
                    _ => op.observed = Some(state.clone()),
                },
            }
            // Only an acknowledged write comes from the dedup table.
            if op.outcome != OK || !is_write(&op) {
                op.deduplicated = false;
            }
            op.id = ops.len() as u64;
            ops.push(op);
        }
        finals.insert(key, (1..=3).map(|node| (node, state.clone())).collect());
    }
    (ops, finals)
}

#[test]
fn two_thousand_keys_of_fifty_ops_check_quickly() {
    let (ops, finals) = generated_valid_run(2_000, 5, 10, 42);
    assert_eq!(ops.len(), 100_000);
    let ops = with_finals(&ops, &finals);
    let started = Instant::now();
    let anomalies = check(&ops);
    let elapsed = started.elapsed();
    eprintln!("checked {} ops on {} keys in {elapsed:?}", ops.len(), finals.len());
    assert_eq!(anomalies, vec![], "a generated valid history was rejected");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn long_keys_with_one_corrupted_response_check_quickly() {
    // 200 keys of 200 ops from 10 concurrent clients, each with one response altered: failing
    // searches are exhaustive and run again for the smallest prefix, the checker's worst case.
    let (mut ops, finals) = generated_valid_run(200, 10, 20, 9);
    let mut rng = Rng(3);
    for chunk in ops.chunks_mut(200) {
        perturb(chunk, &mut rng);
    }
    let ops = with_finals(&ops, &finals);
    let started = Instant::now();
    let anomalies = check(&ops);
    let elapsed = started.elapsed();
    let failing = anomalies.iter().filter(|a| a.kind == "nonlinearizable").count();
    eprintln!(
        "checked {} corrupted ops on {} keys in {elapsed:?}: {failing} keys nonlinearizable",
        ops.len(),
        finals.len()
    );
    assert!(failing > 50, "only {failing} keys caught");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}
