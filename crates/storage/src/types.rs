//! vow's openraft type configuration and the types and bounds derived from it.
//!
//! They live with the storage engine because the log store, the state machine and the codec
//! are written against them; the server's Raft transport and shards use them from here.

use std::fmt;
use std::sync::Arc;

use vow_core::{NodeId, Outcome, Proposal};

/// Encoded log entries one AppendEntries carries: entries are added while they fit, and the
/// first always goes. openraft's own bound is a count (`max_payload_entries`, 300), which for
/// large entries makes a message no follower accepts, and replication stalls for good.
pub const APPEND_BUDGET_BYTES: usize = 8 << 20;

/// The largest Raft message a node sends or accepts: one entry of the largest record any
/// configuration allows (a command is smaller than its record), or an append of
/// [`APPEND_BUDGET_BYTES`], with room for the framing. The same on every node whatever its
/// limits, so a leader never sends what a follower refuses.
pub const MAX_MESSAGE_BYTES: usize = vow_core::HARD_MAX_RECORD_BYTES + (1 << 20);
const _: () = assert!(APPEND_BUDGET_BYTES < MAX_MESSAGE_BYTES);

/// About how many bytes an entry takes in an AppendEntries.
pub fn entry_size_hint(entry: &Entry) -> usize {
    const LOG_ID_BYTES: usize = 32;
    LOG_ID_BYTES
        + match &entry.payload {
            openraft::EntryPayload::Normal(p) => p.size_hint(),
            openraft::EntryPayload::Membership(m) => {
                m.nodes().map(|(_, n)| n.grpc_addr.len() + n.peer_addr.len() + LOG_ID_BYTES).sum::<usize>() * 2
                    + LOG_ID_BYTES
            }
            openraft::EntryPayload::Blank => 0,
        }
}

/// What the Raft membership records about a node: where to reach it. Clients are sent to its
/// public gRPC address (leader hints, the shard map); other nodes reach its Raft and routing
/// services on its peer address, a listener of their own that accepts only peers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VowNode {
    pub grpc_addr: String,
    pub peer_addr: String,
}

impl fmt::Display for VowNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (peer {})", self.grpc_addr, self.peer_addr)
    }
}

/// The state machine's reply to one applied entry: the domain outcome for application
/// commands, nothing for blank and membership entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyResponse(pub Option<Outcome>);

openraft::declare_raft_types!(
    /// vow's openraft configuration: log entries carry a [`Proposal`]; node ids are [`NodeId`].
    /// The proposal is shared, not owned: openraft clones every entry it reads back (once per
    /// follower to replicate it, once to apply it), and a deep copy of a command is several
    /// allocations and a copy of its data.
    pub TypeConfig:
        D = Arc<Proposal>,
        R = ApplyResponse,
        NodeId = NodeId,
        Node = VowNode,
);

pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, VowNode>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type LeaderId = openraft::alias::LeaderIdOf<TypeConfig>;
