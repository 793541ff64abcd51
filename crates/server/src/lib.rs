//! The vow node: everything that runs inside `vowd`.
//!
//! A node opens one RocksDB ([`storage`]) and one openraft instance per shard ([`shard`],
//! [`raft`]); serves the public gRPC API, the internal Raft transport, health and reflection on
//! one port ([`api`]) and operator endpoints on another ([`http`]); and runs the leader's
//! timeout and retention sweeps ([`sweeper`]). [`node::run`] is the entry point; the `vowd`
//! binary only parses [`config::Config`] and calls it.
//!
//! Only binaries and tests depend on this crate. Clients use `vow-client`, which does not pull
//! in RocksDB or any of this.

pub mod api;
pub mod clock;
pub mod config;
pub mod convert;
pub mod http;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod raft;
pub mod sabotage;
pub mod shard;
pub mod storage;
pub mod sweeper;
