//! vow-jepsen: fault-injection consistency testing of a real vow cluster (DESIGN.md §9).
//!
//! [`run::test`] starts N `vowd` processes as hosts in their own network namespaces ([`net`],
//! [`hosts`]), drives concurrent clients ([`workload`]) and a client submitting pipelines
//! ([`pipelines`], chains across shards calling real HTTP functions) while a seeded nemesis ([`nemesis`])
//! kills, pauses, partitions, degrades, reconfigures and re-leads the cluster, heals everything,
//! reads every promise from every node into the history, and checks it ([`checker`]): per-promise
//! linearizability against a write-once register (Porcupine's algorithm), invariants, liveness
//! (writes must succeed, also after the final heal), pipelines (every step settled once with
//! the value its source implies, no acknowledged chain stuck after the heal) and nodes that
//! crashed or panicked by themselves. [`history`] appends the history to disk as the run goes, and [`run::recheck`]
//! checks a stored one again; [`report`] writes the results and an HTML timeline. The cluster runs several
//! shards, each its own Raft group with its own leader; [`shards`] reads who leads what and
//! whether every replica caught up from the nodes' status replies.
//!
//! Needs root (namespaces, iptables, tc). Depends on the client SDK only, never on the server.

pub mod checker;
pub mod clocks;
pub mod disks;
pub mod history;
pub mod hosts;
pub mod nemesis;
pub mod net;
pub mod pipelines;
pub mod report;
pub mod run;
pub mod shards;
pub mod workload;
