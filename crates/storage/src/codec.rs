//! Explicit encodings of openraft's types, for the log on disk and for the node-to-node wire.
//!
//! openraft's own serde derives are documented as not stable across versions, so vow encodes
//! every Raft type it stores or sends itself, with [`vow_core::codec`] and a leading format
//! version byte per message. Decoding errors are values: bytes from disk or a peer are never
//! trusted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendError, StreamAppendResult,
    TransferLeaderError, TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{EntryPayload, vote::RaftLeaderId};
use vow_core::codec::{DecodeError, Decoder, Encoder};
use vow_core::{NodeId, Proposal};

use crate::types::{Entry, LeaderId, LogId, Membership, SnapshotMeta, StoredMembership, TypeConfig, Vote, VowNode};

/// Version 2 records each member's peer address beside its public one.
const FORMAT: u8 = 2;

pub fn log_id(e: &mut Encoder, id: &LogId) {
    e.u64(id.leader_id.term).u64(id.leader_id.node_id.0).u64(id.index);
}

pub fn read_log_id(d: &mut Decoder<'_>) -> Result<LogId, DecodeError> {
    let term = d.u64("log id term")?;
    let node = NodeId(d.u64("log id node")?);
    let index = d.u64("log id index")?;
    Ok(LogId::new(LeaderId::new(term, node), index))
}

pub fn opt_log_id(e: &mut Encoder, id: &Option<LogId>) {
    match id {
        None => {
            e.u8(0);
        }
        Some(id) => {
            e.u8(1);
            log_id(e, id);
        }
    }
}

pub fn read_opt_log_id(d: &mut Decoder<'_>) -> Result<Option<LogId>, DecodeError> {
    match d.u8("optional log id")? {
        0 => Ok(None),
        1 => Ok(Some(read_log_id(d)?)),
        _ => Err(DecodeError::Invalid("optional log id")),
    }
}

pub fn vote(e: &mut Encoder, v: &Vote) {
    e.u64(v.leader_id.term).u64(v.leader_id.node_id.0).bool(v.committed);
}

pub fn read_vote(d: &mut Decoder<'_>) -> Result<Vote, DecodeError> {
    let term = d.u64("vote term")?;
    let node = NodeId(d.u64("vote node")?);
    let committed = d.bool("vote committed")?;
    Ok(if committed { Vote::new_committed(term, node) } else { Vote::new(term, node) })
}

pub fn membership(e: &mut Encoder, m: &Membership) {
    let configs = m.get_joint_config();
    e.u64(configs.len() as u64);
    for c in configs {
        e.u64(c.len() as u64);
        for id in c {
            e.u64(id.0);
        }
    }
    let nodes: Vec<_> = m.nodes().collect();
    e.u64(nodes.len() as u64);
    for (id, node) in nodes {
        e.u64(id.0).str(&node.grpc_addr).str(&node.peer_addr);
    }
}

pub fn read_membership(d: &mut Decoder<'_>) -> Result<Membership, DecodeError> {
    let n_configs = d.u64("membership configs")?;
    let mut configs = Vec::new();
    for _ in 0..n_configs {
        let n = d.u64("membership config")?;
        let mut set = BTreeSet::new();
        for _ in 0..n {
            set.insert(NodeId(d.u64("voter id")?));
        }
        configs.push(set);
    }
    let n_nodes = d.u64("membership nodes")?;
    let mut nodes = BTreeMap::new();
    for _ in 0..n_nodes {
        let id = NodeId(d.u64("node id")?);
        let grpc_addr = d.string("node address")?;
        let peer_addr = d.string("node peer address")?;
        nodes.insert(id, VowNode { grpc_addr, peer_addr });
    }
    Membership::new(configs, nodes).map_err(|_| DecodeError::Invalid("membership"))
}

pub fn stored_membership(e: &mut Encoder, m: &StoredMembership) {
    opt_log_id(e, m.log_id());
    membership(e, m.membership());
}

pub fn read_stored_membership(d: &mut Decoder<'_>) -> Result<StoredMembership, DecodeError> {
    let log_id = read_opt_log_id(d)?;
    Ok(StoredMembership::new(log_id, read_membership(d)?))
}

const PAYLOAD_BLANK: u8 = 0;
const PAYLOAD_NORMAL: u8 = 1;
const PAYLOAD_MEMBERSHIP: u8 = 2;

/// A log entry as stored in the log column family and sent in AppendEntries.
pub fn entry(e: &mut Encoder, entry: &Entry) {
    e.u8(FORMAT);
    log_id(e, &entry.log_id);
    match &entry.payload {
        EntryPayload::Blank => {
            e.u8(PAYLOAD_BLANK);
        }
        EntryPayload::Normal(p) => {
            e.u8(PAYLOAD_NORMAL).bytes(&p.encode());
        }
        EntryPayload::Membership(m) => {
            e.u8(PAYLOAD_MEMBERSHIP);
            membership(e, m);
        }
    }
}

pub fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut enc = Encoder::with_capacity(64);
    entry(&mut enc, e);
    enc.into_bytes()
}

pub fn read_entry(d: &mut Decoder<'_>) -> Result<Entry, DecodeError> {
    d.version("log entry", FORMAT)?;
    let log_id = read_log_id(d)?;
    let payload = match d.u8("entry payload")? {
        PAYLOAD_BLANK => EntryPayload::Blank,
        PAYLOAD_NORMAL => EntryPayload::Normal(Arc::new(Proposal::decode(d.bytes("proposal")?)?)),
        PAYLOAD_MEMBERSHIP => EntryPayload::Membership(read_membership(d)?),
        _ => return Err(DecodeError::Invalid("entry payload")),
    };
    Ok(Entry { log_id, payload })
}

pub fn decode_entry(bytes: &[u8]) -> Result<Entry, DecodeError> {
    let mut d = Decoder::new(bytes);
    let e = read_entry(&mut d)?;
    d.finish()?;
    Ok(e)
}

/// Encodes a whole message with the format byte up front.
fn message(f: impl FnOnce(&mut Encoder)) -> Vec<u8> {
    let mut e = Encoder::with_capacity(64);
    e.u8(FORMAT);
    f(&mut e);
    e.into_bytes()
}

fn parse<T>(
    what: &'static str,
    bytes: &[u8],
    f: impl FnOnce(&mut Decoder<'_>) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let mut d = Decoder::new(bytes);
    d.version(what, FORMAT)?;
    let v = f(&mut d)?;
    d.finish()?;
    Ok(v)
}

pub fn encode_vote_request(r: &VoteRequest<TypeConfig>) -> Vec<u8> {
    message(|e| {
        vote(e, &r.vote);
        opt_log_id(e, &r.last_log_id);
        e.bool(r.leadership_transfer);
    })
}

pub fn decode_vote_request(b: &[u8]) -> Result<VoteRequest<TypeConfig>, DecodeError> {
    parse("vote request", b, |d| {
        let mut r = VoteRequest::new(read_vote(d)?, read_opt_log_id(d)?);
        r.leadership_transfer = d.bool("leadership transfer")?;
        Ok(r)
    })
}

pub fn encode_vote_response(r: &VoteResponse<TypeConfig>) -> Vec<u8> {
    message(|e| {
        vote(e, &r.vote);
        e.bool(r.vote_granted);
        opt_log_id(e, &r.last_log_id);
    })
}

pub fn decode_vote_response(b: &[u8]) -> Result<VoteResponse<TypeConfig>, DecodeError> {
    parse("vote response", b, |d| {
        let v = read_vote(d)?;
        let granted = d.bool("vote granted")?;
        Ok(VoteResponse::new(v, read_opt_log_id(d)?, granted))
    })
}

pub fn encode_append_request(r: &AppendEntriesRequest<TypeConfig>) -> Vec<u8> {
    message(|e| {
        vote(e, &r.vote);
        opt_log_id(e, &r.prev_log_id);
        opt_log_id(e, &r.leader_commit);
        e.u64(r.entries.len() as u64);
        for en in &r.entries {
            entry(e, en);
        }
    })
}

pub fn decode_append_request(b: &[u8]) -> Result<AppendEntriesRequest<TypeConfig>, DecodeError> {
    parse("append request", b, |d| {
        let vote = read_vote(d)?;
        let prev_log_id = read_opt_log_id(d)?;
        let leader_commit = read_opt_log_id(d)?;
        let n = d.u64("entry count")?;
        let mut entries = Vec::new();
        for _ in 0..n {
            entries.push(read_entry(d)?);
        }
        Ok(AppendEntriesRequest { vote, prev_log_id, entries, leader_commit })
    })
}

pub fn encode_append_response(r: &AppendEntriesResponse<TypeConfig>) -> Vec<u8> {
    message(|e| match r {
        AppendEntriesResponse::Success => {
            e.u8(0);
        }
        AppendEntriesResponse::PartialSuccess(id) => {
            e.u8(1);
            opt_log_id(e, id);
        }
        AppendEntriesResponse::Conflict => {
            e.u8(2);
        }
        AppendEntriesResponse::HigherVote(v) => {
            e.u8(3);
            vote(e, v);
        }
    })
}

pub fn decode_append_response(b: &[u8]) -> Result<AppendEntriesResponse<TypeConfig>, DecodeError> {
    parse("append response", b, |d| {
        Ok(match d.u8("append response kind")? {
            0 => AppendEntriesResponse::Success,
            1 => AppendEntriesResponse::PartialSuccess(read_opt_log_id(d)?),
            2 => AppendEntriesResponse::Conflict,
            3 => AppendEntriesResponse::HigherVote(read_vote(d)?),
            _ => return Err(DecodeError::Invalid("append response kind")),
        })
    })
}

/// One reply on the streamed AppendEntries RPC: the log id the follower now matches, or why
/// it stopped accepting.
pub fn encode_stream_append_result(r: &StreamAppendResult<TypeConfig>) -> Vec<u8> {
    message(|e| match r {
        Ok(matching) => {
            e.u8(0);
            opt_log_id(e, matching);
        }
        Err(StreamAppendError::Conflict(id)) => {
            e.u8(1);
            log_id(e, id);
        }
        Err(StreamAppendError::HigherVote(v)) => {
            e.u8(2);
            vote(e, v);
        }
    })
}

pub fn decode_stream_append_result(b: &[u8]) -> Result<StreamAppendResult<TypeConfig>, DecodeError> {
    parse("stream append result", b, |d| {
        Ok(match d.u8("stream append result kind")? {
            0 => Ok(read_opt_log_id(d)?),
            1 => Err(StreamAppendError::Conflict(read_log_id(d)?)),
            2 => Err(StreamAppendError::HigherVote(read_vote(d)?)),
            _ => return Err(DecodeError::Invalid("stream append result kind")),
        })
    })
}

pub fn encode_transfer_request(r: &TransferLeaderRequest<TypeConfig>) -> Vec<u8> {
    message(|e| {
        vote(e, r.from_leader());
        e.u64(r.to_node_id().0);
        opt_log_id(e, &r.last_log_id().copied());
    })
}

pub fn decode_transfer_request(b: &[u8]) -> Result<TransferLeaderRequest<TypeConfig>, DecodeError> {
    parse("transfer leader request", b, |d| {
        let from = read_vote(d)?;
        let to = NodeId(d.u64("transfer target")?);
        Ok(TransferLeaderRequest::new(from, to, read_opt_log_id(d)?))
    })
}

pub fn encode_transfer_response(r: &TransferLeaderResponse<TypeConfig>) -> Vec<u8> {
    message(|e| match r {
        Ok(()) => {
            e.u8(0);
        }
        Err(TransferLeaderError::VoteChanged { expected, actual }) => {
            e.u8(1);
            vote(e, expected);
            vote(e, actual);
        }
        Err(TransferLeaderError::LogNotFlushed { expected, actual }) => {
            e.u8(2);
            opt_log_id(e, expected);
            opt_log_id(e, actual);
        }
    })
}

pub fn decode_transfer_response(b: &[u8]) -> Result<TransferLeaderResponse<TypeConfig>, DecodeError> {
    parse("transfer leader response", b, |d| {
        Ok(match d.u8("transfer response kind")? {
            0 => Ok(()),
            1 => Err(TransferLeaderError::VoteChanged { expected: read_vote(d)?, actual: read_vote(d)? }),
            2 => Err(TransferLeaderError::LogNotFlushed { expected: read_opt_log_id(d)?, actual: read_opt_log_id(d)? }),
            _ => return Err(DecodeError::Invalid("transfer response kind")),
        })
    })
}

pub fn snapshot_meta(e: &mut Encoder, m: &SnapshotMeta) {
    opt_log_id(e, &m.last_log_id);
    stored_membership(e, &m.last_membership);
}

pub fn read_snapshot_meta(d: &mut Decoder<'_>) -> Result<SnapshotMeta, DecodeError> {
    let last_log_id = read_opt_log_id(d)?;
    Ok(SnapshotMeta { last_log_id, last_membership: read_stored_membership(d)? })
}

/// The first chunk of a snapshot transfer: the sender's vote and the snapshot's meta.
pub fn encode_snapshot_header(v: &Vote, meta: &SnapshotMeta) -> Vec<u8> {
    message(|e| {
        vote(e, v);
        snapshot_meta(e, meta);
    })
}

pub fn decode_snapshot_header(b: &[u8]) -> Result<(Vote, SnapshotMeta), DecodeError> {
    parse("snapshot header", b, |d| Ok((read_vote(d)?, read_snapshot_meta(d)?)))
}

pub fn encode_snapshot_response(r: &SnapshotResponse<TypeConfig>) -> Vec<u8> {
    message(|e| vote(e, &r.vote))
}

pub fn decode_snapshot_response(b: &[u8]) -> Result<SnapshotResponse<TypeConfig>, DecodeError> {
    parse("snapshot response", b, |d| Ok(SnapshotResponse::new(read_vote(d)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vow_core::{Command, PromiseId, SettleAs, Value};

    fn lid(term: u64, node: u64, index: u64) -> LogId {
        LogId::new(LeaderId::new(term, NodeId(node)), index)
    }

    #[test]
    fn entries_round_trip() {
        let members = Membership::new(
            vec![BTreeSet::from([NodeId(1), NodeId(2)])],
            BTreeMap::from([
                (NodeId(1), VowNode { grpc_addr: "a:1".into(), peer_addr: "a:101".into() }),
                (NodeId(2), VowNode { grpc_addr: "b:2".into(), peer_addr: "b:102".into() }),
                (NodeId(3), VowNode { grpc_addr: "c:3".into(), peer_addr: "c:103".into() }),
            ]),
        )
        .expect("valid membership");
        let proposal = Proposal {
            stamp_ms: 42,
            command: Command::Settle {
                id: PromiseId::new_unchecked("p"),
                settle_as: SettleAs::Reject,
                value: Value::default(),
                idempotency_key: "k".into(),
            },
        };
        for payload in
            [EntryPayload::Blank, EntryPayload::Normal(Arc::new(proposal)), EntryPayload::Membership(members)]
        {
            let e = Entry { log_id: lid(3, 1, 7), payload };
            assert_eq!(decode_entry(&encode_entry(&e)), Ok(e));
        }
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let mut req = VoteRequest::<TypeConfig>::new(Vote::new(5, NodeId(2)), Some(lid(4, 1, 9)));
        req.leadership_transfer = true;
        assert_eq!(decode_vote_request(&encode_vote_request(&req)), Ok(req));
        for r in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(lid(1, 1, 1))),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new_committed(9, NodeId(3))),
        ] {
            assert_eq!(decode_append_response(&encode_append_response(&r)), Ok(r));
        }
        for r in [
            Ok(None),
            Ok(Some(lid(2, 1, 40))),
            Err(StreamAppendError::Conflict(lid(2, 1, 41))),
            Err(StreamAppendError::HigherVote(Vote::new(7, NodeId(2)))),
        ] {
            assert_eq!(decode_stream_append_result(&encode_stream_append_result(&r)), Ok(r));
        }
        assert!(decode_stream_append_result(&[1, 9]).is_err());
        assert!(decode_append_request(&[1, 0xff]).is_err());
        assert!(decode_entry(&[2]).is_err());
    }
}
