//! How applying commands registers continuations, makes them ready and finishes them: the
//! replicated half of pipelining (DESIGN.md §4), on the in-memory reference state.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vow_core::pipeline::{Action, Combinator, Completion, Continuation, On, Settlement, Status};
use vow_core::{Command, Effect, MemState, Outcome, PromiseId, Proposal, SettleAs, State, Value};

fn id(s: &str) -> PromiseId {
    PromiseId::new_unchecked(s)
}

fn at(stamp_ms: i64, command: Command) -> Proposal {
    Proposal { stamp_ms, command }
}

fn create(pid: &str, deadline_ms: i64) -> Command {
    Command::Create {
        id: id(pid),
        param: Value::default(),
        deadline_ms,
        tags: BTreeMap::new(),
        idempotency_key: format!("create-{pid}"),
    }
}

fn settle(pid: &str, settle_as: SettleAs, data: &str) -> Command {
    Command::Settle {
        id: id(pid),
        settle_as,
        value: Value { headers: BTreeMap::new(), data: data.as_bytes().to_vec() },
        idempotency_key: String::new(),
    }
}

fn forward(cid: &str, source: &str, target: &str) -> Continuation {
    Continuation {
        id: cid.into(),
        sources: vec![id(source)],
        target: id(target),
        combinator: None,
        on: On::Resolved,
        action: Action::Forward { recover: false },
    }
}

fn register(c: Continuation) -> Command {
    Command::Register { continuation: c, target_deadline_ms: 10_000 }
}

fn complete(ids: &[&str], note: &str) -> Command {
    Command::Complete { done: ids.iter().map(|id| Completion { id: (*id).into(), note: note.into() }).collect() }
}

fn ready(cid: &str) -> Vec<Effect> {
    vec![Effect::Ready { continuation: cid.into() }]
}

fn status(s: &MemState, cid: &str) -> Status {
    s.continuations[cid].status.clone()
}

#[test]
fn a_continuation_waits_for_its_source_and_is_ready_once_it_settles() {
    let mut s = MemState::default();
    s.apply(&at(1, create("a", 10_000)));
    s.apply(&at(1, create("b", 10_000)));
    let (outcome, effects) = s.apply_with_effects(&at(2, register(forward("c1", "a", "b"))));
    assert!(matches!(outcome, Outcome::Registered { deduplicated: false, .. }), "{outcome:?}");
    assert_eq!(effects, vec![], "the source is pending");
    assert_eq!(status(&s, "c1"), Status::Waiting);

    let (_, effects) = s.apply_with_effects(&at(3, settle("a", SettleAs::Resolve, "v")));
    assert_eq!(effects, ready("c1"));
    assert_eq!(status(&s, "c1"), Status::Ready);

    let done = complete(&["c1", "missing"], "settled b");
    assert_eq!(s.apply(&at(4, done.clone())), Outcome::Completed { count: 1 }, "a missing one is skipped");
    assert_eq!(status(&s, "c1"), Status::Done { note: "settled b".into() });
    let (again, effects) = s.apply_with_effects(&at(5, done));
    assert!(again == Outcome::Completed { count: 0 } && effects.is_empty(), "completing twice changes nothing");
    assert_eq!(status(&s, "c1"), Status::Done { note: "settled b".into() });
}

#[test]
fn a_continuation_registered_on_a_settled_source_is_ready_at_once() {
    let mut s = MemState::default();
    s.apply(&at(1, create("a", 10_000)));
    s.apply(&at(2, settle("a", SettleAs::Reject, "no")));
    s.apply(&at(2, create("b", 10_000)));
    let (_, effects) = s.apply_with_effects(&at(3, register(forward("c1", "a", "b"))));
    assert_eq!(effects, ready("c1"));
    // A timeout makes it ready too: the deadline is a settlement like any other.
    s.apply(&at(3, create("t", 100)));
    s.apply(&at(3, register(forward("c2", "t", "b"))));
    let (_, effects) = s.apply_with_effects(&at(200, Command::Timeout { ids: vec![id("t")] }));
    assert_eq!(effects, ready("c2"));
}

#[test]
fn registering_is_idempotent_and_needs_the_anchor() {
    let mut s = MemState::default();
    s.apply(&at(1, create("a", 10_000)));
    s.apply(&at(1, create("b", 10_000)));
    s.apply(&at(2, register(forward("c1", "a", "b"))));
    assert!(matches!(
        s.apply(&at(3, register(forward("c1", "a", "b")))),
        Outcome::Registered { deduplicated: true, .. }
    ));
    assert!(matches!(s.apply(&at(3, register(forward("c1", "b", "a")))), Outcome::RegisterConflict { .. }));
    assert_eq!(s.apply(&at(3, register(forward("c2", "missing", "b")))), Outcome::NotFound);
}

#[test]
fn a_batch_applies_whole_or_not_at_all() {
    let mut s = MemState::default();
    s.apply(&at(
        1,
        Command::Create {
            id: id("taken"),
            param: Value::default(),
            deadline_ms: 10_000,
            tags: BTreeMap::new(),
            idempotency_key: "someone-else".into(),
        },
    ));
    let batch = Command::Batch {
        commands: vec![
            create("x", 10_000),
            create("y", 10_000),
            register(forward("c1", "x", "y")),
            create("taken", 10_000),
        ],
    };
    let before = s.encoded();
    let Outcome::Batch { outcomes, applied } = s.apply(&at(2, batch)) else { panic!("a batch answers a batch") };
    assert!(!applied);
    assert!(matches!(outcomes[3], Outcome::CreateConflict { .. }), "the failing part is named: {outcomes:?}");
    let mut unchanged = before;
    unchanged.splice(unchanged.len() - 8.., 2i64.to_be_bytes());
    assert_eq!(s.encoded(), unchanged, "nothing but the cluster time moved");

    let good =
        Command::Batch { commands: vec![create("x", 10_000), create("y", 10_000), register(forward("c1", "x", "y"))] };
    let Outcome::Batch { applied, .. } = s.apply(&at(3, good.clone())) else { panic!() };
    assert!(applied && s.continuations.contains_key("c1"));
    // Retried (a lost reply), it is a no-op that still succeeds.
    let Outcome::Batch { outcomes, applied } = s.apply(&at(4, good)) else { panic!() };
    assert!(applied, "{outcomes:?}");
    assert!(matches!(outcomes[2], Outcome::Registered { deduplicated: true, .. }));
}

fn join(cid: &str, combinator: Combinator, sources: &[&str], target: &str) -> Continuation {
    Continuation {
        id: cid.into(),
        sources: sources.iter().map(|s| id(s)).collect(),
        target: id(target),
        combinator: Some(combinator),
        on: On::Resolved,
        action: Action::Forward { recover: false },
    }
}

fn offer(cid: &str, target: &str, index: u32, state: State, data: &str) -> Command {
    Command::Offer {
        join: cid.into(),
        target: id(target),
        index,
        outcome: Settlement { state, value: Value { headers: BTreeMap::new(), data: data.as_bytes().to_vec() } },
    }
}

#[test]
fn a_join_decides_on_its_target_shard_as_inputs_arrive() {
    let mut s = MemState::default();
    s.apply(&at(1, create("t", 10_000)));
    let all = join("j", Combinator::All, &["a", "b"], "t");
    assert_eq!(all.deliveries().len(), 2);
    assert_eq!(all.deliveries()[1].action, Action::Deliver { join: "j".into(), index: 1 });
    s.apply(&at(2, register(all)));
    assert_eq!(status(&s, "j"), Status::Waiting);
    let (_, effects) = s.apply_with_effects(&at(3, offer("j", "t", 1, State::Resolved, "B")));
    assert!(effects.is_empty());
    let (_, effects) = s.apply_with_effects(&at(3, offer("j", "t", 1, State::Resolved, "B")));
    assert!(effects.is_empty(), "a redelivered input changes nothing");
    let (_, effects) = s.apply_with_effects(&at(4, offer("j", "t", 0, State::Resolved, "A")));
    assert_eq!(effects, ready("j"));
    let decided = s.continuations["j"].decided().cloned().expect("decided");
    assert_eq!(decided.state, State::Resolved);
    assert!(String::from_utf8(decided.value.data).unwrap().contains("\"id\":\"a\""));
    assert_eq!(s.apply(&at(5, offer("j", "other", 0, State::Resolved, ""))), Outcome::NotFound, "wrong target");
}

#[test]
fn a_join_whose_target_settles_first_is_done_without_running() {
    let mut s = MemState::default();
    s.apply(&at(1, create("t", 100)));
    s.apply(&at(2, register(join("j", Combinator::Race, &["a", "b"], "t"))));
    let (_, effects) = s.apply_with_effects(&at(500, Command::Timeout { ids: vec![id("t")] }));
    assert!(effects.is_empty());
    assert!(matches!(status(&s, "j"), Status::Done { .. }));
    let (_, effects) = s.apply_with_effects(&at(501, offer("j", "t", 0, State::Resolved, "late")));
    assert!(effects.is_empty(), "a finished join takes no input");
}

#[test]
fn retention_keeps_a_source_until_its_ready_continuations_are_done() {
    let mut s = MemState::default();
    s.apply(&at(1, create("a", 10_000)));
    s.apply(&at(1, create("b", 10_000)));
    s.apply(&at(2, register(forward("c1", "a", "b"))));
    s.apply(&at(3, settle("a", SettleAs::Resolve, "v")));
    let collect = |t| at(t, Command::Collect { ids: vec![id("a")], retention_ms: 10 });
    assert_eq!(s.apply(&collect(100)), Outcome::Collected { count: 0 }, "c1 still needs a's value");
    s.apply(&at(101, complete(&["c1"], "")));
    assert_eq!(s.apply(&collect(102)), Outcome::Collected { count: 1 });
    assert!(s.continuations.is_empty(), "the done continuation went with its source");
}

fn arb_log() -> impl Strategy<Value = Vec<Proposal>> {
    let pid = prop::sample::select(vec!["a", "b", "c", "d"]);
    let cid = prop::sample::select(vec!["c1", "c2", "c3"]);
    let kind = prop::sample::select(vec![SettleAs::Resolve, SettleAs::Reject, SettleAs::Cancel]);
    let command = prop_oneof![
        (pid.clone(), 0i64..2_000).prop_map(|(p, d)| create(p, d)),
        (pid.clone(), kind).prop_map(|(p, k)| settle(p, k, "v")),
        prop::collection::vec(pid.clone(), 0..3)
            .prop_map(|ids| Command::Timeout { ids: ids.into_iter().map(id).collect() }),
        (prop::collection::vec(pid.clone(), 0..3), 0i64..300)
            .prop_map(|(ids, r)| Command::Collect { ids: ids.into_iter().map(id).collect(), retention_ms: r }),
        (cid.clone(), pid.clone(), pid.clone()).prop_map(|(c, s, t)| register(forward(c, s, t))),
        (cid.clone(), pid.clone(), pid.clone()).prop_map(|(c, s, t)| register(join(c, Combinator::All, &[s, "d"], t))),
        (cid.clone(), pid.clone(), 0u32..2).prop_map(|(c, t, i)| offer(c, t, i, State::Resolved, "x")),
        prop::collection::vec(cid, 0..3).prop_map(|cs| complete(&cs, "")),
    ];
    prop::collection::vec((0i64..2_000, command).prop_map(|(t, c)| at(t, c)), 1..60)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every continuation becomes ready at most once, and only when its outcome is in: a
    /// single-source one when its source is settled, a join when it has decided.
    #[test]
    fn continuations_are_ready_once_and_only_with_their_outcome(log in arb_log()) {
        let mut s = MemState::default();
        let mut readied: BTreeMap<String, u32> = BTreeMap::new();
        for p in &log {
            let (_, effects) = s.apply_with_effects(p);
            for Effect::Ready { continuation } in effects {
                let record = &s.continuations[&continuation];
                prop_assert_eq!(&record.status, &Status::Ready);
                match &record.join {
                    Some(_) => prop_assert!(record.decided().is_some()),
                    None => {
                        let source = &s.promises[&record.continuation.sources[0]];
                        prop_assert!(source.state.is_settled());
                    }
                }
                *readied.entry(continuation).or_default() += 1;
            }
            // A collected continuation may be registered anew.
            readied.retain(|c, _| s.continuations.contains_key(c));
            for (c, n) in &readied {
                prop_assert!(*n <= 1, "{} was made ready {} times", c, n);
            }
        }
    }

    #[test]
    fn replaying_a_pipeline_log_gives_identical_state(log in arb_log()) {
        let mut a = MemState::default();
        let mut b = MemState::default();
        let out_a: Vec<_> = log.iter().map(|p| a.apply_with_effects(p)).collect();
        let out_b: Vec<_> =
            log.iter().map(|p| b.apply_with_effects(&Proposal::decode(&p.encode()).expect("decodes"))).collect();
        prop_assert_eq!(out_a, out_b);
        prop_assert_eq!(a.encoded(), b.encoded());
    }
}
