//! openraft wiring: the tonic transport between nodes (client side in [`network`], server side
//! in [`service`]) and the [`Raft`] type of a shard. The type configuration and the explicit
//! codec for Raft messages and log entries live in `vow-storage` ([`vow_storage::types`],
//! [`vow_storage::codec`]), with the log store and state machine written against them.

pub mod network;
pub mod service;

use vow_storage::state_machine::ShardStateMachine;

// TODO(router-split): imports move to vow_storage directly; these re-exports keep the old
// `crate::raft::...` paths compiling until then.
pub use vow_storage::codec;
pub use vow_storage::types::{
    APPEND_BUDGET_BYTES, ApplyResponse, Entry, LeaderId, LogId, MAX_MESSAGE_BYTES, Membership, SnapshotMeta,
    StoredMembership, TypeConfig, Vote, VowNode, entry_size_hint,
};

/// One shard's Raft instance.
pub type Raft = openraft::Raft<TypeConfig, ShardStateMachine>;
