//! vow-jepsen: fault-injection consistency testing of a real vow cluster (DESIGN.md §9).
//!
//! [`run::test`] starts N `vowd` processes as hosts in their own network namespaces ([`net`],
//! [`hosts`]), drives concurrent clients ([`workload`]) while a seeded nemesis ([`nemesis`])
//! kills, pauses, partitions, degrades, reconfigures and re-leads the cluster, heals everything,
//! reads every promise from every node, and checks the history ([`checker`]): per-promise
//! linearizability against a write-once register (Porcupine's algorithm) plus invariants.
//! [`report`] writes the results, the history and an HTML timeline. The cluster runs several
//! shards, each its own Raft group with its own leader; [`shards`] reads who leads what and
//! whether every replica caught up from the nodes' status replies.
//!
//! Needs root (namespaces, iptables, tc). Depends on the client SDK only, never on the server.

pub mod checker;
pub mod clocks;
pub mod history;
pub mod hosts;
pub mod nemesis;
pub mod net;
pub mod report;
pub mod run;
pub mod shards;
pub mod workload;
