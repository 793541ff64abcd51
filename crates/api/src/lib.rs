//! Generated gRPC code for vow's protocols, and nothing else.
//!
//! [`v1`] is the public API (`proto/vow/v1/vow.proto`): the `Promises` and `Cluster` services that
//! functions, the CLI and the Rust SDK speak. [`raft`] is the internal node-to-node transport
//! (`proto/vow/raft/v1/raft.proto`), [`route`] the internal request routing between nodes
//! (`proto/vow/route/v1/route.proto`). [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection and
//! the HTTP gateway's OpenAPI document. The [`v1`] messages also implement serde's traits in the
//! protobuf JSON mapping (pbjson), which is what the HTTP gateway speaks.
//! Clients and servers both depend on this crate; it has no logic of its own.

#![allow(missing_debug_implementations)] // generated code; the messages derive Debug themselves

pub mod v1 {
    tonic::include_proto!("vow.v1");
    // serde in the protobuf JSON mapping, for the HTTP gateway.
    include!(concat!(env!("OUT_DIR"), "/vow.v1.serde.rs"));
}

pub mod raft {
    tonic::include_proto!("vow.raft.v1");
}

pub mod route {
    tonic::include_proto!("vow.route.v1");
}

/// Encoded descriptors of every vow proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vow_descriptor");

/// Metadata keys shared by server and clients.
pub mod metadata {
    /// Node id of the shard leader, when known (on UNAVAILABLE).
    pub const LEADER_ID: &str = "vow-leader-id";
    /// gRPC address of the shard leader, when known (on UNAVAILABLE).
    pub const LEADER_ADDR: &str = "vow-leader-addr";
    /// "true" when a write may or may not have taken effect.
    pub const OUTCOME_UNKNOWN: &str = "vow-outcome-unknown";
    /// The current record (an encoded `v1.Promise`) on ALREADY_EXISTS / FAILED_PRECONDITION.
    pub const CURRENT_BIN: &str = "vow-current-bin";
    /// "true" when [`CURRENT_BIN`] leaves out the record's param, value and tags because the
    /// whole record would not fit in a trailer; a Get returns the whole record.
    pub const CURRENT_TRIMMED: &str = "vow-current-trimmed";
}
