//! Rules of DESIGN.md §2, checked on examples and on random command sequences.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vow_core::{Command, MemState, Outcome, Promise, PromiseId, Proposal, SettleAs, State, Value};

fn id(s: &str) -> PromiseId {
    PromiseId::new_unchecked(s)
}

fn value(s: &str) -> Value {
    Value { headers: BTreeMap::new(), data: s.as_bytes().to_vec() }
}

fn create(stamp_ms: i64, pid: &str, deadline_ms: i64, key: &str) -> Proposal {
    Proposal {
        stamp_ms,
        command: Command::Create {
            id: id(pid),
            param: value("param"),
            deadline_ms,
            tags: BTreeMap::new(),
            idempotency_key: key.into(),
        },
    }
}

fn settle(stamp_ms: i64, pid: &str, settle_as: SettleAs, v: &str, key: &str) -> Proposal {
    Proposal {
        stamp_ms,
        command: Command::Settle { id: id(pid), settle_as, value: value(v), idempotency_key: key.into() },
    }
}

fn promise_of(o: &Outcome) -> &Promise {
    match o {
        Outcome::Created { promise, .. } | Outcome::Settled { promise, .. } => promise,
        Outcome::CreateConflict { current } | Outcome::SettleConflict { current } => current,
        other => panic!("no promise in {other:?}"),
    }
}

#[test]
fn create_is_idempotent_only_with_the_same_key() {
    let mut s = MemState::default();
    let first = s.apply(&create(10, "p", 1000, "k1"));
    assert!(matches!(first, Outcome::Created { deduplicated: false, .. }));
    assert!(matches!(s.apply(&create(11, "p", 1000, "k1")), Outcome::Created { deduplicated: true, .. }));
    assert!(matches!(s.apply(&create(12, "p", 1000, "k2")), Outcome::CreateConflict { .. }));
    // No key never deduplicates: a second keyless create is a conflict.
    s.apply(&create(13, "q", 1000, ""));
    assert!(matches!(s.apply(&create(14, "q", 1000, "")), Outcome::CreateConflict { .. }));
}

#[test]
fn exactly_one_settle_wins_and_retries_with_its_key_are_no_ops() {
    let mut s = MemState::default();
    s.apply(&create(10, "p", 1000, ""));
    let won = s.apply(&settle(11, "p", SettleAs::Resolve, "v1", "a"));
    assert!(matches!(won, Outcome::Settled { deduplicated: false, .. }));
    let retry = s.apply(&settle(12, "p", SettleAs::Resolve, "v-ignored", "a"));
    assert!(matches!(&retry, Outcome::Settled { deduplicated: true, .. }));
    assert_eq!(promise_of(&retry).value, value("v1"), "a retry returns the winning value");
    // Same key, other state: a conflict, not a dedup.
    assert!(matches!(s.apply(&settle(13, "p", SettleAs::Reject, "x", "a")), Outcome::SettleConflict { .. }));
    assert!(matches!(s.apply(&settle(14, "p", SettleAs::Cancel, "x", "b")), Outcome::SettleConflict { .. }));
    assert_eq!(s.promises[&id("p")].state, State::Resolved);
    assert_eq!(s.apply(&settle(15, "missing", SettleAs::Resolve, "x", "")), Outcome::NotFound);
}

#[test]
fn a_settle_stamped_after_the_deadline_loses_to_the_timeout() {
    let mut s = MemState::default();
    s.apply(&create(10, "p", 100, ""));
    let late = s.apply(&settle(100, "p", SettleAs::Resolve, "v", "k"));
    let Outcome::SettleConflict { current } = late else { panic!("late settle won: {late:?}") };
    assert_eq!(current.state, State::RejectedTimedout);
    assert_eq!(current.settled_at_ms, 100);
}

#[test]
fn cluster_time_never_runs_backwards() {
    let mut s = MemState::default();
    s.apply(&create(1_000, "p", 1_500, ""));
    // A new leader with a slow clock stamps 500: time stays at 1000 and the deadline still holds.
    s.apply(&create(500, "q", 1_200, ""));
    assert_eq!(s.cluster_time_ms, 1_000);
    assert_eq!(s.promises[&id("q")].created_at_ms, 1_000);
    // The slow leader's clock cannot revive an expired promise.
    s.apply(&Proposal { stamp_ms: 1_600, command: Command::Timeout { ids: vec![id("p")] } });
    let r = s.apply(&settle(700, "p", SettleAs::Resolve, "v", ""));
    assert_eq!(promise_of(&r).state, State::RejectedTimedout);
}

#[test]
fn timeout_sweep_only_touches_due_pending_promises() {
    let mut s = MemState::default();
    s.apply(&create(10, "due", 50, ""));
    s.apply(&create(10, "later", 500, ""));
    s.apply(&create(10, "done", 50, ""));
    s.apply(&settle(20, "done", SettleAs::Resolve, "v", ""));
    let ids = vec![id("due"), id("due"), id("later"), id("done"), id("gone")];
    let out = s.apply(&Proposal { stamp_ms: 60, command: Command::Timeout { ids } });
    assert_eq!(out, Outcome::TimedOut { count: 1 });
    assert_eq!(s.promises[&id("due")].state, State::RejectedTimedout);
    assert_eq!(s.promises[&id("later")].state, State::Pending);
    assert_eq!(s.promises[&id("done")].state, State::Resolved);
}

#[test]
fn retention_collects_only_old_settled_promises() {
    let mut s = MemState::default();
    s.apply(&create(10, "old", 1_000, ""));
    s.apply(&settle(20, "old", SettleAs::Reject, "e", ""));
    s.apply(&create(10, "pending", 1_000_000, ""));
    s.apply(&create(500, "young", 1_000_000, ""));
    s.apply(&settle(500, "young", SettleAs::Resolve, "v", ""));
    let ids = vec![id("old"), id("pending"), id("young")];
    let out = s.apply(&Proposal { stamp_ms: 520, command: Command::Collect { ids, retention_ms: 100 } });
    assert_eq!(out, Outcome::Collected { count: 1 });
    assert!(!s.promises.contains_key(&id("old")));
    assert!(s.promises.contains_key(&id("pending")) && s.promises.contains_key(&id("young")));
}

#[test]
fn a_create_with_a_past_deadline_is_born_timed_out() {
    let mut s = MemState::default();
    s.apply(&create(1_000, "p", 10, ""));
    assert_eq!(s.promises[&id("p")].state, State::RejectedTimedout);
}

#[test]
fn records_and_proposals_round_trip_and_reject_garbage() {
    let mut s = MemState::default();
    let p = settle(5, "p", SettleAs::Cancel, "v", "k");
    assert_eq!(Proposal::decode(&p.encode()), Ok(p));
    s.apply(&create(1, "p", 100, "k"));
    let rec = s.promises[&id("p")].clone();
    assert_eq!(Promise::decode(&rec.encode()), Ok(rec.clone()));
    let mut bytes = rec.encode();
    bytes[0] = 9;
    assert!(Promise::decode(&bytes).is_err());
    let bytes = rec.encode();
    for cut in 0..bytes.len() {
        assert!(Promise::decode(&bytes[..cut]).is_err(), "prefix of {cut} bytes decoded");
    }
}

fn arb_proposal() -> impl Strategy<Value = Proposal> {
    let pid = prop::sample::select(vec!["a", "b", "c", "d"]);
    let key = prop::sample::select(vec!["", "k1", "k2"]);
    let kind = prop::sample::select(vec![SettleAs::Resolve, SettleAs::Reject, SettleAs::Cancel]);
    prop_oneof![
        (0i64..2_000, pid.clone(), 0i64..2_000, key.clone()).prop_map(|(t, p, d, k)| create(t, p, d, k)),
        (0i64..2_000, pid.clone(), kind, "[a-z]{0,3}", key).prop_map(|(t, p, a, v, k)| settle(t, p, a, &v, k)),
        (0i64..2_000, prop::collection::vec(pid.clone(), 0..4)).prop_map(|(t, ids)| Proposal {
            stamp_ms: t,
            command: Command::Timeout { ids: ids.into_iter().map(id).collect() },
        }),
        (0i64..2_000, prop::collection::vec(pid, 0..4), 0i64..500).prop_map(|(t, ids, r)| Proposal {
            stamp_ms: t,
            command: Command::Collect { ids: ids.into_iter().map(id).collect(), retention_ms: r },
        }),
    ]
}

proptest! {
    // proptest prints the failing case and persists its seed under proptest-regressions/.
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_settled_promise_never_changes_until_collected(log in prop::collection::vec(arb_proposal(), 1..60)) {
        let mut s = MemState::default();
        let mut settled: BTreeMap<PromiseId, Promise> = BTreeMap::new();
        for p in &log {
            let before_time = s.cluster_time_ms;
            s.apply(p);
            prop_assert!(s.cluster_time_ms >= before_time);
            for (pid, rec) in &s.promises {
                if let Some(first) = settled.get(pid) {
                    prop_assert_eq!(first, rec, "settled record changed");
                } else if rec.state.is_settled() {
                    settled.insert(pid.clone(), rec.clone());
                }
            }
            // Collected promises may come back as new promises; forget them.
            settled.retain(|pid, _| s.promises.contains_key(pid));
        }
    }

    #[test]
    fn replaying_the_same_log_gives_identical_state(log in prop::collection::vec(arb_proposal(), 1..60)) {
        let mut a = MemState::default();
        let mut b = MemState::default();
        let out_a: Vec<Outcome> = log.iter().map(|p| a.apply(p)).collect();
        // Replay through the log's own encoding, as a follower would.
        let out_b: Vec<Outcome> = log
            .iter()
            .map(|p| b.apply(&Proposal::decode(&p.encode()).expect("decodes")))
            .collect();
        prop_assert_eq!(out_a, out_b);
        prop_assert_eq!(a.encoded(), b.encoded());
    }

    #[test]
    fn at_most_one_settle_wins_per_promise(log in prop::collection::vec(arb_proposal(), 1..60)) {
        let mut s = MemState::default();
        let mut wins: BTreeMap<PromiseId, u32> = BTreeMap::new();
        for p in &log {
            if let Command::Create { id, .. } = &p.command
                && !s.promises.contains_key(id) { wins.remove(id); }
            if let (Outcome::Settled { deduplicated: false, promise }, _) = (s.apply(p), ()) {
                *wins.entry(promise.id.clone()).or_default() += 1;
            }
        }
        for (pid, n) in wins {
            prop_assert!(n <= 1, "{} settled {} times", pid, n);
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = Proposal::decode(&bytes);
        let _ = Promise::decode(&bytes);
    }
}
