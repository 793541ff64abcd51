//! openraft wiring: the tonic transport between nodes (client side in [`network`], server side
//! in [`service`]) and the [`Raft`] type of a shard. The type configuration and the explicit
//! codec for Raft messages and log entries live in `vow-storage` ([`vow_storage::types`],
//! [`vow_storage::codec`]), with the log store and state machine written against them.

pub mod network;
pub mod service;

use vow_storage::state_machine::ShardStateMachine;

use vow_storage::types::TypeConfig;

/// One shard's Raft instance.
pub type Raft = openraft::Raft<TypeConfig, ShardStateMachine>;
