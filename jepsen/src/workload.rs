//! The promise workload: concurrent clients over ids that keep being minted, each recorded as
//! one [`Op`].
//!
//! Every [`WINDOW`] a fresh set of [`KEYS_PER_WINDOW`] ids opens (`k<window>-<slot>`), and for
//! [`LOOKBACK_WINDOWS`] windows more the ids of a window still get reads, late settles and
//! searches; then they are left alone. Every client works on the same ids, so creates and
//! settles race, but each client remembers what it last saw of an id and mostly asks for what
//! can still happen (a create for an id it never saw, a settle for a pending one), so a good
//! share of writes take effect: a steady stream of acknowledged writes, over ids that hash to
//! every shard, while each id's history stays small enough for the linearizability search.
//!
//! What an id gets is fixed by its slot and the run's seed ([`Plan`]), the same for every client:
//! some ids get a deadline a few seconds after their window opens, and some of those are settled
//! around the deadline (racing the cluster's timeout) or never (left to time out); some get
//! large values, up to the server's limit and one byte past it. Reads are Get, Await and
//! LocalGet (a stale read of the node's own replica), each sent to one node picked at random
//! that does not follow leader hints, so most go to a follower of the id's shard (an Await
//! waits there, mostly briefly, now and then for seconds); and Search pages over a window's ids
//! by prefix and tag.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use vow_client::{Client, Error, pb};

use crate::history::{Deadline, Entry, Found, Op, OpKind, Outcome, Register, SearchPage, StateFilter};

/// How often a fresh set of ids opens.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Ids that open per window: with two acknowledged writes each (a create and a settle) this is
/// what keeps well over a thousand writes a minute taking effect, faults included, with every
/// id's history a few dozen ops long.
pub const KEYS_PER_WINDOW: u64 = 24;
/// Windows after its own during which an id still gets ops (reads, late settles, searches).
pub const LOOKBACK_WINDOWS: u64 = 3;
/// How long an id is in play: its window and the look-back after it.
pub const GENERATION: Duration = Duration::from_secs(WINDOW.as_secs() * (1 + LOOKBACK_WINDOWS));

/// vowd's default `max_data_bytes` (`vow_core::Limits`; the harness starts vowd without
/// `--max-data-bytes`): the largest value a settle may carry.
pub const MAX_DATA_BYTES: usize = 1 << 20;
/// A record whose encoding exceeds this is sent without its value in a refusal's trailer
/// (vow.proto); the SDK then reads the whole record.
const TRAILER_RECORD_BYTES: usize = 4096;

/// The id of slot `slot` of window `window`.
pub fn key(window: u64, slot: u64) -> String {
    format!("k{window}-{slot}")
}

/// The id prefix of a window's ids (no other window's id starts with it).
pub fn window_prefix(window: u64) -> String {
    format!("k{window}-")
}

/// The tags every create of a window's ids gives them; Search asks by them.
pub fn window_tags(window: u64) -> BTreeMap<String, String> {
    BTreeMap::from([("w".to_owned(), window.to_string())])
}

/// What the workload does with one id; the same for every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The deadline, in milliseconds after the id's window opens (None: the cluster default,
    /// a day away).
    pub deadline_after_ms: Option<u64>,
    /// From when, in milliseconds after the window opens, clients settle it (None: never, so
    /// only its deadline settles it).
    pub settle_from_ms: Option<u64>,
    /// Its settles carry large values.
    pub large: bool,
}

/// splitmix64: a stable hash, so every client derives the same plan from the same id.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The plan of slot `slot` of window `window`: a quarter of the ids get a deadline 1.5–3.5 s
/// after their window opens, and of those a third are settled from 0.4 s before the deadline to
/// 0.4 s after it (racing the timeout), a third never and a third early; an eighth carry large
/// values; the rest are settled from a moment (0–0.4 s) after their window opens, so that awaits
/// find them pending.
pub fn plan(seed: u64, window: u64, slot: u64) -> Plan {
    let h = mix(seed ^ mix(window.wrapping_mul(1_000_003).wrapping_add(slot)));
    let large = slot % 8 == 2;
    if slot % 4 != 1 {
        return Plan { deadline_after_ms: None, settle_from_ms: Some(h % 400), large };
    }
    let deadline = 1_500 + h % 2_000;
    let settle_from_ms = match (h >> 16) % 3 {
        0 => Some(deadline - 400 + (h >> 24) % 800),
        1 => None,
        _ => Some((h >> 24) % 400),
    };
    Plan { deadline_after_ms: Some(deadline), settle_from_ms, large }
}

/// Large settlement data: the value's tag, `|`, then filler that depends on the tag, `len`
/// bytes in all. A history keeps such a value as `"<tag>|<len>"`, so it stays small; reading one
/// back checks every byte (see [`value_text`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LargeValue {
    pub tag: String,
    pub len: usize,
}

impl LargeValue {
    fn filler(tag: &str, j: usize) -> u8 {
        let h = tag.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        b'a' + ((h.wrapping_add(j as u64)) % 26) as u8
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut data = Vec::with_capacity(self.len);
        data.extend_from_slice(self.tag.as_bytes());
        data.push(b'|');
        let head = data.len();
        data.extend((head..self.len.max(head)).map(|j| Self::filler(&self.tag, j)));
        data
    }

    /// How the history records this value.
    pub fn text(&self) -> String {
        format!("{}|{}", self.tag, self.len.max(self.tag.len() + 1))
    }
}

/// Settlement data as the history records it: small values (no `|`) as they are; large ones as
/// `"<tag>|<len>"` when every byte is what the writer sent, and marked `corrupt` otherwise, which
/// no write wrote (a phantom value).
pub fn value_text(data: &[u8]) -> String {
    let Some(bar) = data.iter().position(|&b| b == b'|') else {
        return String::from_utf8_lossy(data).into_owned();
    };
    let tag = String::from_utf8_lossy(&data[..bar]).into_owned();
    let intact = data.iter().enumerate().skip(bar + 1).all(|(j, &b)| b == LargeValue::filler(&tag, j));
    if intact { format!("{tag}|{}", data.len()) } else { format!("{tag}|{}|corrupt", data.len()) }
}

pub fn register_of(p: &pb::Promise) -> Register {
    let value = || value_text(p.value.as_ref().map_or(&[][..], |v| &v.data));
    match pb::State::try_from(p.state) {
        Ok(pb::State::Resolved) => Register::Resolved { value: value() },
        Ok(pb::State::Rejected) => Register::Rejected { value: value() },
        Ok(pb::State::RejectedCanceled) => Register::Canceled { value: value() },
        Ok(pb::State::RejectedTimedout) => Register::TimedOut,
        _ => Register::Pending,
    }
}

/// What a record shows, or None when it does not say: a refusal's record too large for the
/// trailer comes without its value (the SDK reads the whole record by a Get, which may fail), and
/// a settled record without its value cannot tell which settlement it is.
fn observed_of(p: &pb::Promise) -> Option<Register> {
    let register = register_of(p);
    let valued = matches!(register, Register::Resolved { .. } | Register::Rejected { .. } | Register::Canceled { .. });
    let trimmed = valued && p.value.is_none();
    (!trimmed).then_some(register)
}

/// A response (or error) as the history records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub outcome: Outcome,
    pub observed: Option<Register>,
    /// The cluster's dedup flag on an acknowledged write.
    pub deduplicated: bool,
    pub detail: String,
}

fn is_write(kind: OpKind) -> bool {
    matches!(kind, OpKind::Create | OpKind::Resolve | OpKind::Reject | OpKind::Cancel)
}

/// Records a response (or error): `r` is the reply's record and dedup flag.
pub fn classify(kind: OpKind, r: Result<(Option<pb::Promise>, bool), Error>) -> Recorded {
    let write = is_write(kind);
    let recorded = |outcome, observed, detail| Recorded { outcome, observed, deduplicated: false, detail };
    match r {
        // Every write carries an idempotency key unique to its invocation, so a deduplicated
        // answer can only mean the op's own earlier attempt took effect (see the checker).
        Ok((p, dedup)) => Recorded {
            outcome: Outcome::Ok,
            observed: p.as_ref().and_then(observed_of),
            deduplicated: dedup && write,
            detail: String::new(),
        },
        Err(Error::AlreadyExists { current, message }) | Err(Error::AlreadySettled { current, message }) => {
            recorded(Outcome::Fail, current.as_deref().and_then(observed_of), message)
        }
        Err(Error::NotFound(m)) => recorded(Outcome::Fail, Some(Register::Absent), m),
        Err(Error::InvalidArgument(m) | Error::FailedPrecondition(m)) => recorded(Outcome::Fail, None, m),
        // A read that failed changed nothing; a write that failed in an unknown way may have happened.
        Err(e) if write => recorded(Outcome::Info, None, e.to_string()),
        Err(e) => recorded(Outcome::Fail, None, e.to_string()),
    }
}

/// A workload client's connections: one that follows the leader for writes, and one pinned to
/// each node (node id, client) for reads; and where it tells the [`watcher`] what it awaits.
#[derive(Debug)]
pub struct Connections {
    pub writer: Client,
    pub readers: Vec<(u64, Client)>,
    pub in_flight: InFlight,
}

/// One await in flight: the node it waits on, the key and when it was invoked.
type Awaiting = (u64, String, Instant);

/// The awaits in flight, by a token of their client's.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<std::sync::Mutex<HashMap<u64, Awaiting>>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Awaiting>> {
        // A client that panicked holding it left a map that is still whole.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The (node, key) of every await in flight for at least `age`, each once.
    fn older_than(&self, age: Duration) -> BTreeSet<(u64, String)> {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|(_, _, since)| now.saturating_duration_since(*since) >= age)
            .map(|(node, key, _)| (*node, key.clone()))
            .collect()
    }
}

/// How often the [`watcher`] looks at the replicas awaits wait on.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Watches the replicas that awaits wait on: every [`WATCH_EVERY`], for each await in flight
/// for at least [`crate::checker::FIRST_READ_GRACE`], it reads the key from the awaited node's
/// own replica (a `LocalGet` of process `process`, through the documented stale read). These
/// reads are the evidence the "await-late" rule needs at the moments it matters: while a
/// waiter waits. Runs until `until_ns`.
pub async fn watcher(
    process: u64,
    readers: Vec<(u64, Client)>,
    in_flight: InFlight,
    start: Instant,
    until_ns: Arc<AtomicU64>,
    next_id: Arc<AtomicU64>,
    out: mpsc::Sender<Entry>,
) {
    let ctx = Ctx { process, seed: 0, start, epoch_ms_at_start: epoch_ms_at(start), next_id, out };
    while ctx.ns(Instant::now()) < until_ns.load(Ordering::Relaxed) {
        tokio::time::sleep(WATCH_EVERY).await; // the watcher's pace
        for (node, key) in in_flight.older_than(crate::checker::FIRST_READ_GRACE) {
            let Some((_, reader)) = readers.iter().find(|(id, _)| *id == node) else { continue };
            let invoked = Instant::now();
            let r = reader.get_with(&key, pb::Consistency::Stale).await;
            let mut op =
                ctx.op(OpKind::LocalGet, key, invoked, classify(OpKind::LocalGet, r.map(|p| (Some(p), false))));
            op.node = Some(node);
            if !ctx.send(op).await {
                return;
            }
        }
    }
}

/// Milliseconds since the epoch by the harness's clock at the run's start (`start`), so that
/// instants on the run's timeline map to deadlines.
fn epoch_ms_at(start: Instant) -> i64 {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    now_ms - start.elapsed().as_millis() as i64
}

/// What one client is about to do.
#[derive(Debug)]
enum Action {
    Write { kind: OpKind, key: String },
    Read { kind: OpKind, key: String },
    Search { window: u64 },
}

/// One client's choices and what it has seen.
struct Chooser {
    seed: u64,
    rng: StdRng,
    /// What this client last saw of each id (absent from the map: never looked).
    seen: HashMap<String, Register>,
    /// Ids this client saw pending, oldest first: most of its ops settle one of them once its plan
    /// allows, which is what makes most created ids settle while they are in play.
    pending: VecDeque<String>,
}

fn settle_kind(rng: &mut StdRng) -> OpKind {
    match rng.random_range(0..10) {
        0..4 => OpKind::Resolve,
        4..7 => OpKind::Reject,
        _ => OpKind::Cancel,
    }
}

impl Chooser {
    /// Whether the plan of `key` lets clients settle it `now_ms` into the run; None when it
    /// never will, or the id is out of play.
    fn may_settle(&self, key: &str, now_ms: u64) -> Option<bool> {
        let (window, slot) = window_slot(key)?;
        let opened_ms = window * WINDOW.as_millis() as u64;
        if now_ms >= opened_ms + GENERATION.as_millis() as u64 {
            return None;
        }
        let from = plan(self.seed, window, slot).settle_from_ms?;
        Some(now_ms >= opened_ms + from)
    }

    /// Records what an op saw of `key`.
    fn saw(&mut self, key: &str, register: &Register) {
        let before = self.seen.insert(key.to_owned(), register.clone());
        if *register == Register::Pending && before != Some(Register::Pending) {
            self.pending.push_back(key.to_owned());
        }
    }

    /// A settle of an id this client saw pending, if one may be settled now.
    fn follow_up(&mut self, now_ms: u64) -> Option<Action> {
        for _ in 0..self.pending.len() {
            let key = self.pending.pop_front()?;
            if self.seen.get(&key) != Some(&Register::Pending) {
                continue;
            }
            match self.may_settle(&key, now_ms) {
                Some(true) => return Some(Action::Write { kind: settle_kind(&mut self.rng), key }),
                // Not yet: keep it for later.
                Some(false) => self.pending.push_back(key),
                None => {}
            }
        }
        None
    }

    fn next(&mut self, now_ms: u64) -> Action {
        let current = now_ms / WINDOW.as_millis() as u64;
        let window = if current > 0 && self.rng.random_range(0..4) == 0 {
            current.saturating_sub(1 + self.rng.random_range(0..LOOKBACK_WINDOWS))
        } else {
            current
        };
        if self.rng.random_range(0..100) < 3 {
            return Action::Search { window };
        }
        if self.rng.random_range(0..10) < 6
            && let Some(action) = self.follow_up(now_ms)
        {
            return action;
        }
        let key = key(window, self.rng.random_range(0..KEYS_PER_WINDOW));
        let may_settle = self.may_settle(&key, now_ms) == Some(true);
        let roll = self.rng.random_range(0..100);
        // What is still worth asking: writes that can take effect, and now and then one that
        // must be refused (a settle before the create, a second create, a late settle).
        // An id of an earlier window that this client never saw was most likely created by now.
        let creates = if window == current { 60 } else { 15 };
        let write = match self.seen.get(&key) {
            None | Some(Register::Absent) => match roll {
                r if r < creates => Some(OpKind::Create),
                r if r < creates + 10 && may_settle => Some(settle_kind(&mut self.rng)),
                _ => None,
            },
            Some(Register::Pending) => match roll {
                0..5 => Some(OpKind::Create),
                5..50 if may_settle => Some(settle_kind(&mut self.rng)),
                _ => None,
            },
            Some(_) => match roll {
                0..4 => Some(OpKind::Create),
                4..10 => Some(settle_kind(&mut self.rng)),
                _ => None,
            },
        };
        match write {
            Some(kind) => Action::Write { kind, key },
            None => match self.rng.random_range(0..10) {
                0..4 => Action::Read { kind: OpKind::Get, key },
                4..7 => Action::Read { kind: OpKind::LocalGet, key },
                _ => Action::Read { kind: OpKind::Await, key },
            },
        }
    }
}

/// The parsed window and slot of an id this workload made.
fn window_slot(key: &str) -> Option<(u64, u64)> {
    let (w, s) = key.strip_prefix('k')?.split_once('-')?;
    Some((w.parse().ok()?, s.parse().ok()?))
}

/// Everything a client needs besides its connections.
struct Ctx {
    process: u64,
    seed: u64,
    start: Instant,
    epoch_ms_at_start: i64,
    next_id: Arc<AtomicU64>,
    out: mpsc::Sender<Entry>,
}

impl Ctx {
    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_nanos() as u64
    }

    async fn send(&self, op: Op) -> bool {
        self.out.send(Entry::Op(op)).await.is_ok()
    }

    fn op(&self, kind: OpKind, key: String, invoked: Instant, recorded: Recorded) -> Op {
        let Recorded { outcome, observed, deduplicated, detail } = recorded;
        Op {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            process: self.process,
            kind,
            key,
            value: None,
            invoke_ns: self.ns(invoked),
            complete_ns: self.ns(Instant::now()),
            outcome,
            observed,
            deduplicated,
            node: None,
            detail,
            deadline: None,
            tags: BTreeMap::new(),
            search: None,
        }
    }
}

/// A write: its request and how the history records it.
async fn write(ctx: &Ctx, client: &Client, kind: OpKind, key: String, n: u64, rng: &mut StdRng) -> Op {
    let (window, slot) = window_slot(&key).unwrap_or_default();
    let plan = plan(ctx.seed, window, slot);
    let tag = format!("p{}-{n}", ctx.process);
    let invoked = Instant::now();
    match kind {
        OpKind::Create => {
            let deadline = plan.deadline_after_ms.map(|after| {
                let at_ms = window * WINDOW.as_millis() as u64 + after;
                Deadline { ms: ctx.epoch_ms_at_start + at_ms as i64, ns: at_ms * 1_000_000 }
            });
            // Large ids also carry a large param: stored and replicated, and making refusals'
            // records too large for the trailer.
            let param = plan.large.then(|| pb::Value {
                headers: Default::default(),
                data: LargeValue { tag: tag.clone(), len: 64 << 10 }.bytes(),
            });
            let tags = window_tags(window);
            let req = pb::CreateRequest {
                id: key.clone(),
                param,
                deadline_ms: deadline.map_or(0, |d| d.ms),
                tags: tags.clone().into_iter().collect(),
                idempotency_key: format!("c-{tag}"),
                ..Default::default()
            };
            let r = client.create(req).await.map(|r| (r.promise, r.deduplicated));
            let mut op = ctx.op(kind, key, invoked, classify(kind, r));
            op.deadline = deadline;
            op.tags = tags;
            op
        }
        _ => {
            let (data, text) = if plan.large {
                // Past the trailer limit, well into the range, exactly at the limit, and one byte
                // over it (which the cluster must refuse, and never store).
                let len = match rng.random_range(0..10) {
                    0..3 => TRAILER_RECORD_BYTES + 1,
                    3..6 => 200 << 10,
                    6..9 => MAX_DATA_BYTES,
                    _ => MAX_DATA_BYTES + 1,
                };
                let large = LargeValue { tag: tag.clone(), len };
                (large.bytes(), large.text())
            } else {
                (tag.clone().into_bytes(), tag.clone())
            };
            let v = pb::Value { headers: Default::default(), data };
            let key_for_settle = Some(format!("s-{tag}"));
            let r = match kind {
                OpKind::Resolve => client.resolve(&key, v, key_for_settle).await,
                OpKind::Reject => client.reject(&key, v, key_for_settle).await,
                _ => client.cancel(&key, v, key_for_settle).await,
            };
            let r = r.map(|r| (r.promise, r.deduplicated));
            let mut op = ctx.op(kind, key, invoked, classify(kind, r));
            op.value = Some(text);
            op
        }
    }
}

/// One search over a window's ids, page after page (each page an op), as long as the pages go
/// on and at most a few. Returns false when the history recorder is gone.
async fn search(ctx: &Ctx, node: u64, reader: &Client, window: u64, rng: &mut StdRng) -> bool {
    let states = [StateFilter::Pending, StateFilter::Resolved, StateFilter::Rejected, StateFilter::Canceled];
    let state = match rng.random_range(0..10) {
        0..7 => None,
        7 => Some(StateFilter::TimedOut),
        _ => Some(states[rng.random_range(0..states.len())]),
    };
    let limit = rng.random_range(2..=8u32);
    let mut token = String::new();
    for _ in 0..4 {
        let req = pb::SearchRequest {
            id_prefix: window_prefix(window),
            state: state.map_or(pb::State::Unspecified, state_to_pb) as i32,
            tags: window_tags(window).into_iter().collect(),
            limit,
            page_token: token.clone(),
        };
        let invoked = Instant::now();
        let r = reader.search(req).await;
        let (recorded, page) = match r {
            Ok(resp) => {
                let page = SearchPage {
                    id_prefix: window_prefix(window),
                    tags: window_tags(window),
                    state,
                    first: token.is_empty(),
                    last: resp.next_page_token.is_empty(),
                    found: resp
                        .promises
                        .iter()
                        .map(|p| Found { key: p.id.clone(), register: register_of(p) })
                        .collect(),
                };
                token = resp.next_page_token;
                let ok = Recorded { outcome: Outcome::Ok, observed: None, deduplicated: false, detail: String::new() };
                (ok, Some(Box::new(page)))
            }
            Err(e) => (classify(OpKind::Search, Err(e)), None),
        };
        let more = page.as_ref().is_some_and(|p| !p.last);
        let mut op = ctx.op(OpKind::Search, window_prefix(window), invoked, recorded);
        op.node = Some(node);
        op.search = page;
        if !ctx.send(op).await {
            return false;
        }
        if !more {
            break;
        }
    }
    true
}

fn state_to_pb(state: StateFilter) -> pb::State {
    match state {
        StateFilter::Pending => pb::State::Pending,
        StateFilter::Resolved => pb::State::Resolved,
        StateFilter::Rejected => pb::State::Rejected,
        StateFilter::Canceled => pb::State::RejectedCanceled,
        StateFilter::TimedOut => pb::State::RejectedTimedout,
    }
}

/// How long an Await waits: mostly briefly, and one in six for seconds (longer than most pauses), so that a
/// waiter which misses its wake-up shows as "await-late" (see [`crate::checker::await_late`]).
fn await_wait(rng: &mut StdRng) -> Duration {
    if rng.random_range(0..6) == 0 {
        Duration::from_millis(rng.random_range(2_000..10_000))
    } else {
        Duration::from_millis(rng.random_range(50..500))
    }
}

/// One client's loop until `until_ns` (nanoseconds since `start`, read before every op: the run
/// sets it once the final heal has ended). Its choices come from
/// `seed` and what it has seen. Returns the keys it touched.
pub async fn client(
    process: u64,
    conns: Connections,
    seed: u64,
    start: Instant,
    until_ns: Arc<AtomicU64>,
    next_id: Arc<AtomicU64>,
    out: mpsc::Sender<Entry>,
) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let Connections { writer, readers, in_flight } = conns;
    let mut awaits = 0u64;
    let ctx = Ctx { process, seed, start, epoch_ms_at_start: epoch_ms_at(start), next_id, out };
    let mut rng = StdRng::seed_from_u64(seed ^ process.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut chooser =
        Chooser { seed, rng: StdRng::seed_from_u64(rng.random()), seen: HashMap::new(), pending: VecDeque::new() };
    let mut n = 0u64;
    while ctx.ns(Instant::now()) < until_ns.load(Ordering::Relaxed) {
        n += 1;
        let action = chooser.next(start.elapsed().as_millis() as u64);
        // Reads go to a node picked at random, as clients spread over a cluster do: every node
        // must answer linearizably, not only the leader (most are followers of the id's shard).
        let (node, reader) = &readers[rng.random_range(0..readers.len())];
        let op = match action {
            Action::Search { window } => {
                if !search(&ctx, *node, reader, window, &mut rng).await {
                    break;
                }
                continue;
            }
            Action::Write { kind, key } => write(&ctx, &writer, kind, key, n, &mut rng).await,
            Action::Read { kind, key } => {
                let invoked = Instant::now();
                let r = match kind {
                    OpKind::Await => {
                        awaits += 1;
                        let token = process << 40 | awaits;
                        in_flight.lock().insert(token, (*node, key.clone(), invoked));
                        let r = reader.await_settled(&key, await_wait(&mut rng)).await;
                        in_flight.lock().remove(&token);
                        r
                    }
                    OpKind::LocalGet => reader.get_with(&key, pb::Consistency::Stale).await,
                    _ => reader.get(&key).await,
                };
                let mut op = ctx.op(kind, key, invoked, classify(kind, r.map(|p| (Some(p), false))));
                op.node = Some(*node);
                op
            }
        };
        keys.insert(op.key.clone());
        if let Some(seen) = &op.observed {
            chooser.saw(&op.key, seen);
        }
        if !ctx.send(op).await {
            break;
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn promise(state: pb::State, value: &str) -> pb::Promise {
        let value = pb::Value { headers: Default::default(), data: value.as_bytes().to_vec() };
        pb::Promise { id: "k".into(), state: state.into(), value: Some(value), ..Default::default() }
    }

    #[test]
    fn a_deduplicated_answer_is_recorded_as_a_field_of_the_op() {
        let resolved = promise(pb::State::Resolved, "p1-7");
        let r = classify(OpKind::Resolve, Ok((Some(resolved.clone()), true)));
        let want = Register::Resolved { value: "p1-7".into() };
        assert_eq!((r.outcome, r.observed.as_ref(), r.deduplicated), (Outcome::Ok, Some(&want), true));
        assert_eq!(r.detail, "", "the flag lives in its field, not in the text");
        let plain = classify(OpKind::Create, Ok((Some(promise(pb::State::Pending, "")), false)));
        assert_eq!((plain.observed, plain.deduplicated), (Some(Register::Pending), false));
        // Reads have no dedup table; a flag on one would mean nothing.
        assert!(!classify(OpKind::Get, Ok((Some(resolved), true))).deduplicated);
        assert!(classify(OpKind::Cancel, Ok((None, true))).deduplicated, "a cancel is a write");
    }

    #[test]
    fn refusals_fail_with_what_they_showed_and_lost_writes_are_unknown() {
        let current = Some(Box::new(promise(pb::State::RejectedTimedout, "")));
        let refused = classify(OpKind::Resolve, Err(Error::AlreadySettled { message: "settled".into(), current }));
        assert_eq!(refused.outcome, Outcome::Fail);
        assert_eq!(refused.observed, Some(Register::TimedOut));
        let absent = classify(OpKind::Get, Err(Error::NotFound("k".into())));
        assert_eq!((absent.outcome, absent.observed), (Outcome::Fail, Some(Register::Absent)));
        let lost = || Error::Unavailable { message: "deadline".into(), outcome_unknown: true };
        let write = classify(OpKind::Create, Err(lost()));
        assert_eq!((write.outcome, write.observed), (Outcome::Info, None));
        assert_eq!(classify(OpKind::Cancel, Err(lost())).outcome, Outcome::Info);
        let read = classify(OpKind::Await, Err(lost()));
        assert_eq!((read.outcome, read.observed), (Outcome::Fail, None), "a failed read changed nothing");
        let invalid = classify(OpKind::Reject, Err(Error::InvalidArgument("too long".into())));
        assert_eq!((invalid.outcome, invalid.observed), (Outcome::Fail, None));
    }

    #[test]
    fn every_settled_state_is_its_own_register() {
        assert_eq!(register_of(&promise(pb::State::Rejected, "v")), Register::Rejected { value: "v".into() });
        assert_eq!(register_of(&promise(pb::State::RejectedCanceled, "v")), Register::Canceled { value: "v".into() });
        assert_eq!(register_of(&promise(pb::State::RejectedTimedout, "")), Register::TimedOut);
        assert_eq!(register_of(&promise(pb::State::Pending, "")), Register::Pending);
    }

    #[test]
    fn a_trimmed_settled_record_shows_nothing_but_a_trimmed_pending_one_does() {
        let trimmed = |state: pb::State| pb::Promise { state: state.into(), value: None, ..promise(state, "") };
        let refused = |state| Error::AlreadySettled { message: "m".into(), current: Some(Box::new(trimmed(state))) };
        assert_eq!(classify(OpKind::Resolve, Err(refused(pb::State::Resolved))).observed, None);
        assert_eq!(classify(OpKind::Resolve, Err(refused(pb::State::RejectedCanceled))).observed, None);
        assert_eq!(
            classify(OpKind::Resolve, Err(refused(pb::State::RejectedTimedout))).observed,
            Some(Register::TimedOut)
        );
        let exists = Error::AlreadyExists { message: "m".into(), current: Some(Box::new(trimmed(pb::State::Pending))) };
        assert_eq!(classify(OpKind::Create, Err(exists)).observed, Some(Register::Pending));
    }

    #[test]
    fn large_values_are_kept_short_and_checked_byte_for_byte() {
        let large = LargeValue { tag: "p3-17".into(), len: MAX_DATA_BYTES };
        let mut bytes = large.bytes();
        assert_eq!(bytes.len(), MAX_DATA_BYTES);
        assert_eq!(value_text(&bytes), "p3-17|1048576");
        assert_eq!(value_text(&bytes), large.text());
        bytes[MAX_DATA_BYTES / 2] ^= 1;
        assert_eq!(value_text(&bytes), "p3-17|1048576|corrupt");
        // Another writer's filler is not this one's.
        let other = LargeValue { tag: "p4-1".into(), len: 5000 }.bytes();
        let mut swapped = b"p3-17|".to_vec();
        swapped.extend_from_slice(&other[5..]);
        assert!(value_text(&swapped).ends_with("corrupt"));
        assert_eq!(value_text(b"p1-2"), "p1-2", "small values stay as they are");
    }

    #[test]
    fn plans_are_the_same_for_every_client_and_cover_every_kind_of_id() {
        let plans: Vec<Plan> = (0..40).flat_map(|w| (0..KEYS_PER_WINDOW).map(move |s| plan(9, w, s))).collect();
        assert_eq!(plans, (0..40).flat_map(|w| (0..KEYS_PER_WINDOW).map(move |s| plan(9, w, s))).collect::<Vec<_>>());
        let with_deadline: Vec<&Plan> = plans.iter().filter(|p| p.deadline_after_ms.is_some()).collect();
        assert_eq!(with_deadline.len(), plans.len() / 4);
        assert!(with_deadline.iter().any(|p| p.settle_from_ms.is_none()), "some are left to time out");
        assert!(
            with_deadline.iter().any(|p| p.settle_from_ms > p.deadline_after_ms),
            "some settles come after the deadline"
        );
        assert!(plans.iter().filter(|p| p.large).count() >= plans.len() / 8);
        for p in &with_deadline {
            let d = p.deadline_after_ms.unwrap();
            assert!((1_500..3_500).contains(&d), "deadline {d} ms lies within an id's time in play");
            assert!(d < GENERATION.as_millis() as u64);
        }
    }

    #[test]
    fn ids_name_their_window_and_no_window_prefix_takes_in_another() {
        assert_eq!(window_slot(&key(12, 3)), Some((12, 3)));
        assert!(key(12, 3).starts_with(&window_prefix(12)));
        assert!(!key(12, 3).starts_with(&window_prefix(1)));
        assert_eq!(window_slot("x"), None);
    }

    #[test]
    fn every_shard_gets_ids_within_a_few_windows() {
        let shards: BTreeSet<u32> =
            (0..4).flat_map(|w| (0..KEYS_PER_WINDOW).map(move |s| crate::report::shard_of(&key(w, s), 8))).collect();
        assert_eq!(shards.len(), 8, "{shards:?}");
    }
}
