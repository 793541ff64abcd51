//! Rules of DESIGN.md §2, checked on examples and on random command sequences.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::Index;
use vow_core::codec::Encoder;
use vow_core::pipeline::{Action, Combinator, Completion, Continuation, On, Settlement};
use vow_core::{Command, DecodeError, MemState, Outcome, Promise, PromiseId, Proposal, SettleAs, State, Value};

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

// Decoding mutated valid encodings. Arbitrary bytes almost never get past the version byte and
// the first length prefix, so the decoder's deeper paths (maps, values, id lists, the settle
// kind, trailing bytes) are reached only by starting from real encodings and damaging them.

/// Short strings with multi-byte characters, so that a cut or a flipped bit can land inside one.
fn arb_text() -> impl Strategy<Value = String> {
    "[a-z{}é€𝄞]{0,6}"
}

fn arb_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(arb_text(), arb_text(), 0..3)
}

fn arb_value() -> impl Strategy<Value = Value> {
    (arb_map(), prop::collection::vec(any::<u8>(), 0..24)).prop_map(|(headers, data)| Value { headers, data })
}

fn arb_id() -> impl Strategy<Value = PromiseId> {
    arb_text().prop_map(PromiseId::new_unchecked)
}

fn arb_ids() -> impl Strategy<Value = Vec<PromiseId>> {
    prop::collection::vec(arb_id(), 0..4)
}

fn arb_promise() -> impl Strategy<Value = Promise> {
    let state = prop::sample::select(vec![
        State::Pending,
        State::Resolved,
        State::Rejected,
        State::RejectedCanceled,
        State::RejectedTimedout,
    ]);
    (
        (arb_id(), state, arb_value(), arb_value(), any::<i64>(), arb_map()),
        (any::<i64>(), any::<i64>(), arb_text(), arb_text(), any::<u64>()),
    )
        .prop_map(
            |((id, state, param, value, deadline_ms, tags), (created, settled, key_create, key_settle, revision))| {
                Promise {
                    id,
                    state,
                    param,
                    value,
                    deadline_ms,
                    tags,
                    created_at_ms: created,
                    settled_at_ms: settled,
                    idempotency_key_create: key_create,
                    idempotency_key_settle: key_settle,
                    revision,
                }
            },
        )
}

/// Which variant a command is. Exhaustive on purpose: a new variant does not compile here until
/// it is counted, and then `arb_every_command` must generate it for the test to pass.
fn variant(c: &Command) -> usize {
    match c {
        Command::Create { .. } => 0,
        Command::Settle { .. } => 1,
        Command::Timeout { .. } => 2,
        Command::Collect { .. } => 3,
        Command::Batch { .. } => 4,
        Command::Register { .. } => 5,
        Command::Offer { .. } => 6,
        Command::Complete { .. } => 7,
    }
}
const COMMAND_VARIANTS: usize = 8;

fn arb_continuation() -> impl Strategy<Value = Continuation> {
    let action = prop_oneof![
        any::<bool>().prop_map(|recover| Action::Forward { recover }),
        (arb_text(), arb_map(), any::<u32>(), any::<bool>())
            .prop_map(|(url, headers, timeout_ms, prewarm)| Action::Invoke { url, headers, timeout_ms, prewarm }),
        (arb_text(), any::<u32>()).prop_map(|(join, index)| Action::Deliver { join, index }),
        (arb_text(), arb_map()).prop_map(|(url, headers)| Action::Notify { url, headers }),
    ];
    let combinator =
        prop::sample::select(vec![None, Some(Combinator::All), Some(Combinator::Any), Some(Combinator::Race)]);
    let on = prop::sample::select(vec![On::Resolved, On::Rejected, On::Settled]);
    (arb_text(), prop::collection::vec(arb_id(), 1..4), arb_id(), combinator, on, action).prop_map(
        |(id, sources, target, combinator, on, action)| Continuation { id, sources, target, combinator, on, action },
    )
}

/// One command of every variant, so that every case covers them all.
fn arb_every_command() -> impl Strategy<Value = Vec<Command>> {
    let kind = prop::sample::select(vec![SettleAs::Resolve, SettleAs::Reject, SettleAs::Cancel]);
    (
        (arb_id(), arb_value(), any::<i64>(), arb_map(), arb_text()),
        (arb_id(), kind, arb_value(), arb_text()),
        arb_ids(),
        (arb_ids(), any::<i64>()),
        (arb_continuation(), any::<i64>(), arb_id()),
        (arb_text(), arb_id(), any::<u32>(), arb_value(), arb_text()),
    )
        .prop_map(|(create, settle, timeout, collect, register, offer)| {
            let create_command = Command::Create {
                id: create.0.clone(),
                param: create.1.clone(),
                deadline_ms: create.2,
                tags: create.3.clone(),
                idempotency_key: create.4.clone(),
            };
            let register_command = Command::Register { continuation: register.0, target_deadline_ms: register.1 };
            vec![
                Command::Create {
                    id: create.0,
                    param: create.1,
                    deadline_ms: create.2,
                    tags: create.3,
                    idempotency_key: create.4,
                },
                Command::Settle { id: settle.0, settle_as: settle.1, value: settle.2, idempotency_key: settle.3 },
                Command::Timeout { ids: timeout },
                Command::Collect { ids: collect.0, retention_ms: collect.1 },
                Command::Batch { commands: vec![create_command, register_command.clone()] },
                register_command,
                Command::Offer {
                    join: offer.0,
                    target: offer.1,
                    index: offer.2,
                    outcome: Settlement { state: State::Rejected, value: offer.3 },
                },
                Command::Complete { done: vec![Completion { id: register.2.into_string(), note: offer.4 }] },
            ]
        })
}

fn varint_bytes(v: u64) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u64(v);
    e.into_bytes()
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Where the length and count prefixes of an encoding lie, found by walking the value in the
/// codec's field order. The walk must end exactly at the encoding's length, so a format change
/// shows up here instead of silently aiming the prefix mutations at other bytes.
#[derive(Debug, Default)]
struct Layout {
    end: usize,
    /// Offset, width and value of each prefix.
    prefixes: Vec<(usize, usize, u64)>,
}

impl Layout {
    fn fixed(&mut self, width: usize) -> &mut Self {
        self.end += width;
        self
    }

    fn varint(&mut self, v: u64) -> &mut Self {
        self.fixed(varint_bytes(v).len())
    }

    fn i64(&mut self, v: i64) -> &mut Self {
        self.varint(zigzag(v))
    }

    fn prefix(&mut self, v: usize) -> &mut Self {
        let width = varint_bytes(v as u64).len();
        self.prefixes.push((self.end, width, v as u64));
        self.fixed(width)
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.prefix(b.len()).fixed(b.len())
    }

    fn map(&mut self, m: &BTreeMap<String, String>) -> &mut Self {
        self.prefix(m.len());
        for (k, v) in m {
            self.bytes(k.as_bytes()).bytes(v.as_bytes());
        }
        self
    }

    fn value(&mut self, v: &Value) -> &mut Self {
        self.map(&v.headers).bytes(&v.data)
    }

    fn ids(&mut self, ids: &[PromiseId]) -> &mut Self {
        self.prefix(ids.len());
        for id in ids {
            self.bytes(id.as_str().as_bytes());
        }
        self
    }
}

fn promise_layout(p: &Promise) -> Layout {
    let mut l = Layout::default();
    l.fixed(1).bytes(p.id.as_str().as_bytes()).fixed(1).value(&p.param).value(&p.value);
    l.i64(p.deadline_ms).map(&p.tags).i64(p.created_at_ms).i64(p.settled_at_ms);
    l.bytes(p.idempotency_key_create.as_bytes()).bytes(p.idempotency_key_settle.as_bytes()).varint(p.revision);
    l
}

fn continuation_layout(l: &mut Layout, c: &Continuation) {
    l.fixed(1).bytes(c.id.as_bytes()).ids(&c.sources).bytes(c.target.as_str().as_bytes()).fixed(2).fixed(1);
    match &c.action {
        Action::Forward { .. } => {
            l.fixed(1);
        }
        Action::Invoke { url, headers, timeout_ms, .. } => {
            l.bytes(url.as_bytes()).map(headers).varint(u64::from(*timeout_ms)).fixed(1);
        }
        Action::Deliver { join, index } => {
            l.bytes(join.as_bytes()).varint(u64::from(*index));
        }
        Action::Notify { url, headers } => {
            l.bytes(url.as_bytes()).map(headers);
        }
    }
}

fn proposal_layout(p: &Proposal) -> Layout {
    let mut l = Layout::default();
    l.fixed(1).i64(p.stamp_ms);
    command_layout(&mut l, &p.command);
    l
}

fn command_layout(l: &mut Layout, command: &Command) {
    l.fixed(1);
    match command {
        Command::Create { id, param, deadline_ms, tags, idempotency_key } => {
            l.bytes(id.as_str().as_bytes()).value(param).i64(*deadline_ms).map(tags).bytes(idempotency_key.as_bytes());
        }
        Command::Settle { id, value, idempotency_key, .. } => {
            l.bytes(id.as_str().as_bytes()).fixed(1).value(value).bytes(idempotency_key.as_bytes());
        }
        Command::Timeout { ids } => {
            l.ids(ids);
        }
        Command::Collect { ids, retention_ms } => {
            l.i64(*retention_ms).ids(ids);
        }
        Command::Batch { commands } => {
            l.prefix(commands.len());
            for c in commands {
                command_layout(l, c);
            }
        }
        Command::Register { continuation, target_deadline_ms } => {
            continuation_layout(l, continuation);
            l.i64(*target_deadline_ms);
        }
        Command::Offer { join, target, index, outcome } => {
            l.bytes(join.as_bytes()).bytes(target.as_str().as_bytes()).varint(u64::from(*index)).fixed(1);
            l.value(&outcome.value);
        }
        Command::Complete { done } => {
            l.prefix(done.len());
            for c in done {
                l.bytes(c.id.as_bytes()).bytes(c.note.as_bytes());
            }
        }
    }
}

/// What a damaged length or count prefix says instead.
#[derive(Debug, Clone)]
enum NewLength {
    Plus(u64),
    Minus(u64),
    Zero,
    Max,
    Any(u64),
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBits {
        at: Index,
        mask: u8,
    },
    Truncate {
        at: Index,
    },
    Insert {
        at: Index,
        byte: u8,
    },
    Delete {
        at: Index,
    },
    /// Rewrites one of the encoding's prefixes (as the layout found them) as a varint of another
    /// value, possibly of another width.
    Prefix {
        which: Index,
        to: NewLength,
    },
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let to = prop_oneof![
        (1u64..4).prop_map(NewLength::Plus),
        (1u64..4).prop_map(NewLength::Minus),
        Just(NewLength::Zero),
        Just(NewLength::Max),
        any::<u64>().prop_map(NewLength::Any),
    ];
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(at, mask)| Mutation::FlipBits { at, mask }),
        any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<Index>().prop_map(|at| Mutation::Delete { at }),
        (any::<Index>(), to).prop_map(|(which, to)| Mutation::Prefix { which, to }),
    ]
}

/// Applies `m` to `bytes`. Prefix offsets come from the undamaged encoding's layout: after an
/// earlier mutation that shifted bytes they may miss, which is just another kind of damage.
fn mutate(bytes: &mut Vec<u8>, layout: &Layout, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::FlipBits { at, mask } if len > 0 => bytes[at.index(len)] ^= mask,
        Mutation::Truncate { at } => bytes.truncate(at.index(len + 1)),
        Mutation::Insert { at, byte } => bytes.insert(at.index(len + 1), *byte),
        Mutation::Delete { at } if len > 0 => {
            bytes.remove(at.index(len));
        }
        Mutation::Prefix { which, to } if !layout.prefixes.is_empty() => {
            let (offset, width, old) = layout.prefixes[which.index(layout.prefixes.len())];
            if offset + width <= len {
                let new = match to {
                    NewLength::Plus(d) => old.saturating_add(*d),
                    NewLength::Minus(d) => old.saturating_sub(*d),
                    NewLength::Zero => 0,
                    NewLength::Max => u64::MAX,
                    NewLength::Any(v) => *v,
                };
                bytes.splice(offset..offset + width, varint_bytes(new));
            }
        }
        _ => {}
    }
}

/// Checks one encoding: it round-trips and its layout spans it exactly, no strict prefix of it
/// decodes, and damage never panics the decoder. Whatever still decodes after damage must be a
/// value the codec can write and read back.
fn check_damaged<T: PartialEq + std::fmt::Debug>(
    encoded: &[u8],
    original: &T,
    layout: &Layout,
    cut: &Index,
    mutations: &[Mutation],
    decode: impl Fn(&[u8]) -> Result<T, DecodeError>,
    encode: impl Fn(&T) -> Vec<u8>,
) -> Result<(), TestCaseError> {
    let decoded = decode(encoded);
    prop_assert_eq!(decoded.as_ref(), Ok(original), "an undamaged encoding round-trips");
    prop_assert_eq!(layout.end, encoded.len(), "the layout walk disagrees with the encoding");
    let at = cut.index(encoded.len());
    prop_assert!(decode(&encoded[..at]).is_err(), "a strict prefix of {} bytes decoded", at);
    let mut bytes = encoded.to_vec();
    for m in mutations {
        mutate(&mut bytes, layout, m);
        if let Ok(v) = decode(&bytes) {
            prop_assert_eq!(decode(&encode(&v)), Ok(v), "a damaged input decoded to a value that does not round-trip");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn decoding_damaged_valid_encodings_never_panics(
        record in arb_promise(),
        commands in arb_every_command(),
        stamp_ms in any::<i64>(),
        mutations in prop::collection::vec(prop::collection::vec(arb_mutation(), 1..4), 1 + COMMAND_VARIANTS),
        cuts in prop::collection::vec(any::<Index>(), 1 + COMMAND_VARIANTS),
    ) {
        let covered: std::collections::BTreeSet<usize> = commands.iter().map(variant).collect();
        prop_assert_eq!(covered.len(), COMMAND_VARIANTS, "every command variant is generated");
        check_damaged(
            &record.encode(),
            &record,
            &promise_layout(&record),
            &cuts[0],
            &mutations[0],
            Promise::decode,
            Promise::encode,
        )?;
        for (i, command) in commands.into_iter().enumerate() {
            let proposal = Proposal { stamp_ms, command };
            check_damaged(
                &proposal.encode(),
                &proposal,
                &proposal_layout(&proposal),
                &cuts[i + 1],
                &mutations[i + 1],
                Proposal::decode,
                Proposal::encode,
            )?;
        }
    }
}
