//! The vow node: everything that runs inside `vowd`.
//!
//! A node opens one RocksDB through `vow-storage` (the log store and state machine of every
//! shard) and one openraft instance per shard ([`shard`], [`raft`]); serves the public gRPC
//! API, the internal Raft and Route transports, health and reflection on one port ([`api`]) and
//! operator endpoints and the HTTP/JSON gateway on another ([`http`], [`gateway`], with its
//! generated [`openapi`] document); checks completion tokens ([`tokens`]); carries every request to its shard's leader
//! ([`router`]) behind protocol-neutral promise operations ([`service`]) and pipeline
//! operations ([`pipelines`]); runs each shard's ready continuations while it leads the shard
//! ([`executor`], calling users' HTTP functions and delivering webhooks through [`functions`],
//! [`webhooks`]); and runs the leader's
//! timeout and retention sweeps ([`sweeper`]) and leader balancing ([`balance`]).
//! [`server::run`] is the entry point; the `vowd` binary only parses [`config::Config`] and
//! calls it.
//!
//! Module dependencies run one way: `server` → `executor`, `http` → `gateway` → `openapi`,
//! `gateway` → `api` → `pipelines`, `api` → `tokens`, `api` → `service` → `router` → `node` →
//! `shard` → `raft`, storage (and `api` → `raft_service` → `shard`); nothing below imports
//! anything above it.
//!
//! Only binaries and tests depend on this crate. Clients use `vow-client`, which does not pull
//! in RocksDB or any of this.

pub mod api;
pub mod auth;
pub mod balance;
pub mod clock;
pub mod config;
pub mod conn;
pub mod convert;
pub mod executor;
pub mod functions;
pub mod gateway;
pub mod http;
pub mod incarnation;
pub mod metrics;
pub mod node;
pub mod openapi;
pub mod peers;
pub mod pipelines;
pub mod raft;
pub mod raft_service;
pub mod router;
pub mod sabotage;
pub mod server;
pub mod service;
pub mod shard;
pub mod sweeper;
pub mod tls;
pub mod tokens;
pub mod watch;
pub mod webhooks;
