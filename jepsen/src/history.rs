//! The history of a run: every client operation as an invocation and its completion, and every
//! nemesis event, with times in nanoseconds since the start of the run.

use serde::{Deserialize, Serialize};

/// What a client asked for. Every op names one promise (`key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Create,
    Resolve,
    Reject,
    Get,
    Await,
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Register {
    Absent,
    Pending,
    Resolved { value: String },
    Rejected { value: String },
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
    /// For resolve / reject: the value written (unique per invocation in a run).
    pub value: Option<String>,
    pub invoke_ns: u64,
    /// For `Info`, when the client gave up; the op may still take effect later.
    pub complete_ns: u64,
    pub outcome: Outcome,
    /// What the response showed the register to be, when it showed anything.
    pub observed: Option<Register>,
    /// The cluster's answer in words (error message, dedup flag), for the report.
    pub detail: String,
}

/// A fault injected or healed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NemesisEvent {
    pub at_ns: u64,
    /// e.g. "kill", "restart", "pause", "resume", "partition", "heal", "netem", "remove", "add", "transfer".
    pub action: String,
    pub detail: String,
}
