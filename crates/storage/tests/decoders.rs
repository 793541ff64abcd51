//! Hostile input to every decoder of bytes that come from a peer or the disk: the Raft messages
//! and log entries (`codec`), proposals (`vow_core`), and snapshot files (`snapshot::Reader`).
//! Random bytes, valid encodings cut short at every length, and valid encodings with bytes
//! changed must give an error or a value, never a panic, an abort or an allocation sized by
//! an untrusted length.
//!
//! CI runs a fixed budget of cases per decoder; `VOW_FUZZ_CASES=1000000 cargo test --workspace
//! --test decoders --release` runs a longer one (docs/security.md).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;

use openraft::EntryPayload;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, TransferLeaderRequest, VoteRequest, VoteResponse};
use openraft::vote::RaftLeaderId;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vow_core::{Command, NodeId, PromiseId, Proposal, SettleAs, Value};
use vow_storage::codec;
use vow_storage::snapshot;
use vow_storage::types::{
    Entry, LeaderId, LogId, Membership, SnapshotMeta, StoredMembership, TypeConfig, Vote, VowNode,
};

fn cases() -> u32 {
    std::env::var("VOW_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

fn lid(term: u64, index: u64) -> LogId {
    LogId::new(LeaderId::new(term, NodeId(1)), index)
}

fn membership() -> Membership {
    Membership::new(
        vec![BTreeSet::from([NodeId(1), NodeId(2), NodeId(3)])],
        (1..=3)
            .map(|i| (NodeId(i), VowNode { grpc_addr: format!("n{i}:7001"), peer_addr: format!("n{i}:7101") }))
            .collect::<BTreeMap<_, _>>(),
    )
    .expect("membership")
}

fn entries() -> Vec<Entry> {
    let proposal = Proposal {
        stamp_ms: 1_700_000_000_000,
        command: Command::Settle {
            id: PromiseId::new_unchecked("order-1"),
            settle_as: SettleAs::Resolve,
            value: Value { headers: BTreeMap::from([("k".into(), "v".into())]), data: vec![7; 40] },
            idempotency_key: "key".into(),
        },
    };
    vec![
        Entry { log_id: lid(2, 5), payload: EntryPayload::Blank },
        Entry { log_id: lid(2, 6), payload: EntryPayload::Normal(Arc::new(proposal)) },
        Entry { log_id: lid(2, 7), payload: EntryPayload::Membership(membership()) },
    ]
}

/// A valid encoding of every message kind a node decodes.
fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let vote = Vote::new(4, NodeId(2));
    let meta = SnapshotMeta {
        last_log_id: Some(lid(3, 90)),
        last_membership: StoredMembership::new(Some(lid(1, 1)), membership()),
    };
    let append = AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: Some(lid(2, 4)),
        leader_commit: Some(lid(2, 4)),
        entries: entries(),
    };
    let mut out = vec![
        ("vote request", codec::encode_vote_request(&VoteRequest::new(vote, Some(lid(3, 9))))),
        ("vote response", codec::encode_vote_response(&VoteResponse::new(vote, Some(lid(3, 9)), true))),
        ("append request", codec::encode_append_request(&append)),
        ("append response", codec::encode_append_response(&AppendEntriesResponse::HigherVote(vote))),
        ("stream append result", codec::encode_stream_append_result(&Ok(Some(lid(2, 7))))),
        (
            "transfer request",
            codec::encode_transfer_request(&TransferLeaderRequest::new(vote, NodeId(3), Some(lid(2, 7)))),
        ),
        ("snapshot header", codec::encode_snapshot_header(&vote, &meta)),
    ];
    for e in entries() {
        out.push(("entry", codec::encode_entry(&e)));
    }
    out
}

/// Feeds `bytes` to every decoder. Only a panic fails.
fn decode_all(bytes: &[u8]) {
    let _ = codec::decode_entry(bytes);
    let _ = codec::decode_vote_request(bytes);
    let _ = codec::decode_vote_response(bytes);
    let _ = codec::decode_append_request(bytes);
    let _ = codec::decode_append_response(bytes);
    let _ = codec::decode_stream_append_result(bytes);
    let _ = codec::decode_transfer_request(bytes);
    let _ = codec::decode_transfer_response(bytes);
    let _ = codec::decode_snapshot_header(bytes);
    let _ = codec::decode_snapshot_response(bytes);
    let _ = Proposal::decode(bytes);
}

#[test]
fn random_bytes_never_panic_a_decoder() {
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..600), |bytes| {
            decode_all(&bytes);
            Ok(())
        })
        .expect("no decoder panics on random bytes");
}

#[test]
fn valid_messages_cut_short_are_errors_and_mutations_never_panic() {
    for (what, bytes) in samples() {
        for len in 0..bytes.len() {
            decode_all(&bytes[..len]);
        }
        // Cut short, the message's own decoder must refuse it (nothing is silently defaulted).
        let own = |b: &[u8]| -> bool {
            match what {
                "vote request" => codec::decode_vote_request(b).is_ok(),
                "vote response" => codec::decode_vote_response(b).is_ok(),
                "append request" => codec::decode_append_request(b).is_ok(),
                "append response" => codec::decode_append_response(b).is_ok(),
                "stream append result" => codec::decode_stream_append_result(b).is_ok(),
                "transfer request" => codec::decode_transfer_request(b).is_ok(),
                "snapshot header" => codec::decode_snapshot_header(b).is_ok(),
                _ => codec::decode_entry(b).is_ok(),
            }
        };
        assert!(own(&bytes), "{what} decodes whole");
        for len in 0..bytes.len() {
            assert!(!own(&bytes[..len]), "{what} cut to {len} of {} bytes decoded", bytes.len());
        }
    }
    let samples = samples();
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    runner
        .run(
            &(0..samples.len(), proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)),
            |(i, edits)| {
                let mut bytes = samples[i].1.clone();
                for (at, b) in edits {
                    let at = at.index(bytes.len());
                    bytes[at] = b;
                }
                decode_all(&bytes);
                Ok(())
            },
        )
        .expect("no decoder panics on a mutated message");
}

#[test]
fn snapshot_files_that_are_random_truncated_or_altered_are_refused() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    let meta = SnapshotMeta {
        last_log_id: Some(lid(3, 90)),
        last_membership: StoredMembership::new(Some(lid(1, 1)), membership()),
    };
    let mut w = snapshot::Writer::create(dir.path(), &meta)?;
    for i in 0..20u32 {
        w.record(format!("key-{i}").as_bytes(), &[i as u8; 30])?;
    }
    let file = w.finish(&dir.path().join("good.snap"))?;
    let good = std::fs::read(&file.path)?;

    // Reads a file to its end; Ok only for a complete file with a matching checksum.
    let read = |bytes: &[u8]| -> std::io::Result<usize> {
        let path = dir.path().join("probe.snap");
        std::fs::File::create(&path)?.write_all(bytes)?;
        let (_, mut reader) = snapshot::Reader::open(std::fs::File::open(&path)?)?;
        let mut n = 0;
        while reader.next_record()?.is_some() {
            n += 1;
        }
        Ok(n)
    };
    assert_eq!(read(&good)?, 20);
    for len in 0..good.len() {
        assert!(read(&good[..len]).is_err(), "a snapshot cut to {len} of {} bytes was accepted", good.len());
    }
    // Magic, header length, header (the snapshot's meta), then the checksummed records.
    let header_end = 12 + u32::from_be_bytes([good[8], good[9], good[10], good[11]]) as usize;
    let mut runner = TestRunner::new(Config { cases: cases() / 4, failure_persistence: None, ..Config::default() });
    runner
        .run(&(any::<prop::sample::Index>(), 1..=255u8), |(at, flip)| {
            let mut bytes = good.clone();
            let at = at.index(bytes.len());
            bytes[at] ^= flip;
            // A changed byte in a record or the trailer fails the checksum. One in the header
            // may still decode (another snapshot id, say); it must never panic.
            let result = read(&bytes);
            prop_assert!(at < header_end || result.is_err(), "a snapshot with byte {at} changed was accepted");
            Ok(())
        })
        .expect("altered snapshots are refused");
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..400), |bytes| {
            let _ = read(&bytes);
            Ok(())
        })
        .expect("random files never panic the reader");
    Ok(())
}
