//! The history of a run: every client operation as an invocation and its completion, every
//! final read, and every nemesis event, with times in nanoseconds since the start of the run.
//!
//! A run appends the history to `history.jsonl` as it goes, one [`Entry`] per line, so an aborted
//! run keeps everything up to the abort and `vow-jepsen check` can re-check any stored history.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, LineWriter, Write};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What a run tested: enough to replay it (with the same binaries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    pub seed: u64,
    pub nodes: u64,
    /// Every vowd's `--shards`.
    pub shards: u32,
    pub time_limit_secs: u64,
    pub nemeses: Vec<String>,
    pub clients: u64,
}

/// One violation found in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// The promise it concerns; empty for anomalies of the whole run.
    pub key: String,
    /// Per key: "nonlinearizable", "double-settle", "phantom-value", "lost-settle", "divergence",
    /// "await-not-final", "await-late" (an await kept waiting after its node's replica held the
    /// settlement, see [`crate::checker::await_late`]), "early-timeout" (TIMED_OUT seen more than [`crate::clocks::EARLY_TIMEOUT_BOUND`]
    /// before the deadline by the harness's clock) or "search-mismatch" (a Search page holds a
    /// record its query excludes). Per run: "no-progress" (no write succeeded, or none after the final
    /// heal) and "node-crashed" (see [`crate::checker::check_run`]); the run itself adds "no-recovery" when the
    /// healed cluster does not converge and "node-panic" for a panic in a node's log.
    pub kind: String,
    pub detail: String,
    /// The ops that show the anomaly, ascending: for "nonlinearizable" every op of the key invoked
    /// by the time the smallest failing prefix ends; empty when only final reads show the anomaly.
    pub op_ids: Vec<u64>,
}

/// What a client asked for. Every op names one promise (`key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Create,
    Resolve,
    Reject,
    /// Settles the promise as REJECTED_CANCELED with the op's value.
    Cancel,
    Get,
    Await,
    /// A read of one node's own replica while the run goes (a Get with `Consistency::Stale`):
    /// stale by contract, so it constrains no linearization; it is evidence of what that node's
    /// replica held by the time it returned (see the "await-late" rule).
    LocalGet,
    /// One page of a Search ([`Op::search`] holds the query and what came back); `key` is the
    /// page's id prefix. Every record on the page is a read of its promise during the op.
    Search,
    /// A read of one node's own replica after every fault is healed, the replicas have converged
    /// and no client runs any more: what that node finally holds.
    FinalRead,
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It happened, and `observed` says what the client saw.
    Ok,
    /// It definitely did not take effect (the cluster refused it); `observed` may still carry
    /// what the refusal showed (the current record of ALREADY_EXISTS / FAILED_PRECONDITION, or
    /// absence for NOT_FOUND).
    Fail,
    /// Unknown: timeout, connection lost, outcome-unknown. It may have taken effect at any time
    /// after its invocation, or never.
    Info,
}

/// The state of one promise as the model sees it.
///
/// A `value` is the settlement's data as text; data too large to keep in a history (see
/// [`crate::workload::LargeValue`]) is kept as `"<tag>|<length>"` after its bytes were checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Register {
    Absent,
    Pending,
    Resolved {
        value: String,
    },
    Rejected {
        value: String,
    },
    /// REJECTED_CANCELED, by a Cancel carrying `value`.
    Canceled {
        value: String,
    },
    /// REJECTED_TIMEDOUT: the cluster settled it when its deadline passed.
    TimedOut,
}

impl Register {
    pub fn is_settled(&self) -> bool {
        !matches!(self, Register::Absent | Register::Pending)
    }
}

/// A create's deadline: what the request said, and where that instant lies on the run's
/// timeline by the harness's clock (the true one: the harness runs on the cluster's machine and
/// its wall clock is never skewed), which is what the checker compares completions with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadline {
    /// `CreateRequest.deadline_ms`: milliseconds since the epoch.
    pub ms: i64,
    /// The same instant in nanoseconds since the start of the run.
    pub ns: u64,
}

/// The states a Search can ask for (`SearchRequest.state`); none asked matches every state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateFilter {
    Pending,
    Resolved,
    Rejected,
    Canceled,
    TimedOut,
}

impl StateFilter {
    pub fn matches(self, register: &Register) -> bool {
        matches!(
            (self, register),
            (StateFilter::Pending, Register::Pending)
                | (StateFilter::Resolved, Register::Resolved { .. })
                | (StateFilter::Rejected, Register::Rejected { .. })
                | (StateFilter::Canceled, Register::Canceled { .. })
                | (StateFilter::TimedOut, Register::TimedOut)
        )
    }
}

/// One Search page: the query and the records on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchPage {
    pub id_prefix: String,
    /// Tags every match must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// The state asked for; None matches every state.
    #[serde(default)]
    pub state: Option<StateFilter>,
    /// Asked without a page token: the page starts at the first id of the prefix.
    pub first: bool,
    /// Came back without a next page token: the page runs to the last id of the prefix.
    pub last: bool,
    /// The records on the page, in the order they came (ids ascending).
    pub found: Vec<Found>,
}

/// One record on a Search page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found {
    pub key: String,
    pub register: Register,
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Position in the history, unique.
    pub id: u64,
    /// The client that ran it; a client runs one op at a time.
    pub process: u64,
    pub kind: OpKind,
    pub key: String,
    /// For resolve / reject / cancel: the value written (unique per invocation in a run).
    pub value: Option<String>,
    pub invoke_ns: u64,
    /// For `Info`, when the client gave up; the op may still take effect later.
    pub complete_ns: u64,
    pub outcome: Outcome,
    /// What the response showed the register to be, when it showed anything.
    pub observed: Option<Register>,
    /// An acknowledged write the cluster answered from its dedup table: an earlier attempt of
    /// this same op (the SDK retries with the op's own idempotency key) took effect, and
    /// `observed` is the record as it was when the retry arrived. The cluster's flag, recorded
    /// as it came (`PromiseResponse.deduplicated`).
    #[serde(default)]
    pub deduplicated: bool,
    /// The node a read was sent to (reads are pinned to one node); None for writes, which follow
    /// the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// The cluster's answer in words (error message), for the report.
    pub detail: String,
    /// For a create with a deadline: the deadline it asked for. Every create of one promise
    /// asks for the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Deadline>,
    /// For a create: the tags it gave the promise (Search finds promises by them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// For a search: the query and the page that came back (None if the search failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<Box<SearchPage>>,
}

/// A fault injected or healed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NemesisEvent {
    pub at_ns: u64,
    /// e.g. "kill", "pause", "partition", "heal", "netem", "remove", "add", "transfer"; and
    /// "crashed" when the run finds a node that exited without the nemesis killing it.
    pub action: String,
    pub detail: String,
    /// The nodes a process fault (kill, pause, power loss, disk) acts on; empty for network and
    /// membership faults, heals and crashes (their detail says whom they concern).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<u64>,
}

/// What the pipeline workload ([`crate::pipelines`]) did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineTally {
    pub submitted: usize,
    /// Submit and input resolve both acknowledged: must complete.
    pub acknowledged: usize,
    pub completed: usize,
    pub stuck: usize,
    pub wrong: usize,
    /// The function calls the cluster made (transient failures and repeats after a leader
    /// change included).
    pub function_calls: u64,
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    /// What the run tests; the first line.
    Setup(Setup),
    Op(Op),
    Nemesis(NemesisEvent),
    /// Something the run saw directly rather than in a response (a cluster that did not recover
    /// after the heal, a panic in a node's log): kept so a re-check reports it too.
    Anomaly(Anomaly),
    /// What the pipeline workload did and found (its anomalies are `Anomaly` lines).
    Pipelines(PipelineTally),
}

/// The file a run's history goes to, in its output directory.
pub const FILE: &str = "history.jsonl";

/// Appends a run's history to `history.jsonl` as it happens. Every line reaches the file as soon
/// as it is complete, so a run that aborts, or is killed, leaves its history up to that point.
#[derive(Debug)]
pub struct Writer {
    file: LineWriter<File>,
}

impl Writer {
    /// Starts `dir/history.jsonl`, replacing what an earlier attempt left there.
    pub fn create(dir: &Path) -> anyhow::Result<Writer> {
        let path = dir.join(FILE);
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Writer { file: LineWriter::new(file) })
    }

    pub fn append(&mut self, entry: &Entry) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(entry)?;
        line.push(b'\n');
        self.file.write_all(&line).context("appending to the history")
    }
}

/// A stored history, split by entry type; ops sorted by id as the checker wants them.
#[derive(Debug, Default)]
pub struct Stored {
    pub setup: Option<Setup>,
    pub ops: Vec<Op>,
    pub events: Vec<NemesisEvent>,
    pub anomalies: Vec<Anomaly>,
    pub pipelines: Option<PipelineTally>,
    /// A last line cut short: the run was killed while writing it. It is left out.
    pub torn_tail: bool,
}

/// Reads `dir/history.jsonl`. Only the last line may be unreadable (a run killed mid-line); an
/// unreadable line before it means the file is not a history.
pub fn read(dir: &Path) -> anyhow::Result<Stored> {
    let path = dir.join(FILE);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let lines: Vec<String> = BufReader::new(file).lines().collect::<Result<_, _>>()?;
    let mut stored = Stored::default();
    for (i, line) in lines.iter().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str::<Entry>(line) {
            Ok(Entry::Setup(setup)) => stored.setup = Some(setup),
            Ok(Entry::Op(op)) => stored.ops.push(op),
            Ok(Entry::Nemesis(event)) => stored.events.push(event),
            Ok(Entry::Anomaly(anomaly)) => stored.anomalies.push(anomaly),
            Ok(Entry::Pipelines(tally)) => stored.pipelines = Some(tally),
            Err(_) if i + 1 == lines.len() => stored.torn_tail = true,
            Err(e) => anyhow::bail!("{}:{}: {e}", path.display(), i + 1),
        }
    }
    stored.ops.sort_by_key(|op| op.id);
    Ok(stored)
}
