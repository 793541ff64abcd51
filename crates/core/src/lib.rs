//! The promise model and its deterministic state machine (DESIGN.md §2).
//!
//! This crate is the heart of vow and the only place its rules live: [`machine::apply`] takes a
//! committed [`Proposal`] and the records it touches and returns the [`Outcome`] and record
//! [`Change`]s. It does no I/O, reads no clock and draws no random numbers — time comes from the
//! leader's stamp inside each proposal — so every replica that applies the same log reaches the
//! same state. [`codec`] is the explicit, versioned binary format for records and proposals.
//! [`Limits`] checks user input before it is proposed. [`pipeline`] holds the rules of promise
//! pipelining: what a continuation does with its sources' outcomes, how combinators decide,
//! and which submitted graphs are refused; [`machine::apply`] registers continuations, makes
//! them ready as their sources settle and reports them as [`Effect`]s for the shard's leader.
//!
//! Anyone may depend on this crate; it depends on nothing but `thiserror`.

pub mod codec;
pub mod command;
pub mod limits;
pub mod machine;
pub mod pipeline;
pub mod promise;

pub use codec::DecodeError;
pub use command::{Change, Command, Outcome, Proposal};
pub use limits::{HARD_MAX_RECORD_BYTES, LimitError, Limits};
pub use machine::{Applied, ContinuationChange, Effect, MemState, PromiseView, apply};
pub use promise::{NodeId, Promise, PromiseId, SettleAs, ShardId, State, Value};
