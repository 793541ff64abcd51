//! openraft wiring: the sending side of the tonic transport between nodes ([`network`]; the
//! receiving side is `raft_service.rs`, beside the other gRPC services, since it hands messages
//! to shards) and the [`Raft`] type of a shard. The type configuration and the explicit
//! codec for Raft messages and log entries live in `vow-storage` ([`vow_storage::types`],
//! [`vow_storage::codec`]), with the log store and state machine written against them.

pub mod network;

use vow_storage::state_machine::ShardStateMachine;

use vow_storage::types::TypeConfig;

/// One shard's Raft instance.
pub type Raft = openraft::Raft<TypeConfig, ShardStateMachine>;
