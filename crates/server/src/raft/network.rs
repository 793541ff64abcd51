//! The sending side of the Raft transport: openraft's network traits over tonic.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use openraft::alias::SnapshotOf;
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use tonic::transport::Channel;
use vow_api::raft::raft_client::RaftClient;
use vow_api::raft::{RaftReply, RaftRequest, SnapshotChunk};
use vow_core::{NodeId, ShardId};

use crate::clock::PeerClocks;
use crate::incarnation::Incarnations;
use crate::peers::Peers;
use vow_storage::codec;
use vow_storage::snapshot::SnapshotFile;
use vow_storage::types::{TypeConfig, Vote, VowNode};

/// Bytes of snapshot data per streamed chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// The least time a streamed AppendEntries may wait for its reply before the stream is
/// declared stalled and dropped (openraft then opens a new one). Longer than a unary call's
/// deadline: dropping a stream throws away every request in flight on it.
const MIN_STREAM_STALL: Duration = Duration::from_millis(250);

/// How long a request that carries only a new commit index may wait for the next request with
/// entries to carry it instead (see [`HoldCommitOnly`]). Far below the heartbeat interval: it
/// only delays when followers apply, which no write waits for.
const COMMIT_HOLD: Duration = Duration::from_millis(2);

/// Creates a shard's clients to its peers.
#[derive(Clone, Debug)]
pub struct NetworkFactory {
    pub peers: Peers,
    pub shard: ShardId,
    pub cluster_name: Arc<str>,
    pub clocks: PeerClocks,
    pub incarnations: Incarnations,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &VowNode) -> PeerClient {
        PeerClient {
            channel: self.peers.channel(&node.peer_addr).map_err(|e| e.to_string()),
            target,
            shard: self.shard,
            cluster_name: self.cluster_name.clone(),
            clocks: self.clocks.clone(),
            incarnations: self.incarnations.clone(),
            session: None,
        }
    }
}

/// One shard's client to one peer.
#[derive(Debug)]
pub struct PeerClient {
    channel: Result<Channel, String>,
    target: NodeId,
    shard: ShardId,
    cluster_name: Arc<str>,
    clocks: PeerClocks,
    incarnations: Incarnations,
    /// The stream one-request calls go over, kept open between them (see [`Session`]).
    session: Option<Session>,
}

/// A replication stream kept open for calls that carry one request each: openraft sends every
/// heartbeat as a stream of its own, and a heartbeat round is what each linearizable read
/// waits for. A new HTTP/2 stream per heartbeat cost request and response headers, a task on
/// each side and openraft's own per-stream task on the follower, on the path of every read.
/// On the open stream a heartbeat is one message each way. A session is used by one call at a
/// time and put back only after that call got its reply: a call given up half-way (timed out,
/// cancelled) drops it, so a late reply can never be read as the next call's.
#[derive(Debug)]
struct Session {
    requests: tokio::sync::mpsc::Sender<RaftRequest>,
    replies: tonic::Streaming<RaftReply>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

fn unreachable(msg: impl Into<String>) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&TransportError(msg.into())))
}

fn status_error(s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        // Not connected, refused, or the peer is another node / another cluster: back off.
        tonic::Code::Unavailable | tonic::Code::FailedPrecondition | tonic::Code::Unknown => {
            unreachable(format!("{}: {}", s.code(), s.message()))
        }
        _ => RPCError::Network(NetworkError::new(&TransportError(format!("{}: {}", s.code(), s.message())))),
    }
}

fn decode_error(e: vow_core::DecodeError) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&TransportError(format!("malformed reply: {e}"))))
}

/// A streamed append's result from `target`'s reply, after checking its incarnation and
/// noting its clock reading.
fn streamed_reply(
    incarnations: &Incarnations,
    clocks: &PeerClocks,
    target: NodeId,
    reply: &RaftReply,
) -> Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>> {
    incarnations.check_reply(target, reply.sender_incarnation).map_err(unreachable)?;
    clocks.observe(target, reply.sender_time_ms);
    codec::decode_stream_append_result(&reply.payload).map_err(decode_error)
}

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        // A node that learned it lost its state sends nothing (see crate::incarnation).
        self.incarnations.may_send().map_err(unreachable)?;
        match &self.channel {
            Ok(c) => Ok(RaftClient::new(c.clone()).max_decoding_message_size(usize::MAX)),
            Err(e) => Err(unreachable(e.clone())),
        }
    }

    /// A reply's message, after checking the peer's incarnation and noting its clock reading.
    /// A peer back under another incarnation is unreachable: its answer must not count.
    fn heard(&self, reply: tonic::Response<RaftReply>) -> Result<RaftReply, RPCError<TypeConfig>> {
        let reply = reply.into_inner();
        self.incarnations.check_reply(self.target, reply.sender_incarnation).map_err(unreachable)?;
        self.clocks.observe(self.target, reply.sender_time_ms);
        Ok(reply)
    }

    fn request(&self, payload: Vec<u8>, option: &RPCOption) -> tonic::Request<RaftRequest> {
        let mut req = tonic::Request::new(header(&self.header(), payload));
        req.set_timeout(option.hard_ttl());
        req
    }

    /// Sends `payload` as the only request of a call on the kept-open session, opening one if
    /// there is none or the old one has closed, and waits up to `stall` for its reply.
    async fn append_one(
        &mut self,
        payload: Vec<u8>,
        setup: Duration,
        stall: Duration,
    ) -> Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>> {
        // As for every call (see `PeerClient::client`): a node that learned it lost its state
        // sends nothing, on an open session neither.
        self.incarnations.may_send().map_err(unreachable)?;
        let payload = bytes::Bytes::from(payload);
        let mut session = match self.session.take() {
            Some(s) if s.requests.try_send(RaftRequest { payload: payload.clone(), ..Default::default() }).is_ok() => s,
            // None yet, or its stream has ended (the connection dropped, the peer restarted),
            // having taken nothing of this request: open a new one.
            _ => self.open_session(payload, setup).await?,
        };
        let reply = match tokio::time::timeout(stall, session.replies.message()).await {
            Ok(Ok(Some(reply))) => reply,
            Ok(Ok(None)) => return Err(unreachable("the peer ended the replication stream")),
            Ok(Err(status)) => return Err(status_error(status)),
            Err(_) => return Err(unreachable(format!("no reply to a streamed append in {stall:?}"))),
        };
        let result = streamed_reply(&self.incarnations, &self.clocks, self.target, &reply)?;
        self.session = Some(session);
        Ok(result)
    }

    /// Opens a session whose first request, carrying the header, is `payload`.
    async fn open_session(&self, payload: bytes::Bytes, setup: Duration) -> Result<Session, RPCError<TypeConfig>> {
        let (requests, queued) = tokio::sync::mpsc::channel(1);
        requests.try_send(header(&self.header(), payload)).map_err(|_| unreachable("session closed"))?;
        let replies = self.open_stream(tokio_stream::wrappers::ReceiverStream::new(queued), setup).await?;
        Ok(Session { requests, replies })
    }

    /// Opens a replication stream carrying `requests`, waiting up to `setup` for the peer to
    /// answer it.
    async fn open_stream(
        &self,
        requests: impl Stream<Item = RaftRequest> + Send + 'static,
        setup: Duration,
    ) -> Result<tonic::Streaming<RaftReply>, RPCError<TypeConfig>> {
        match tokio::time::timeout(setup, self.client()?.stream_append(requests)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(status_error(status)),
            Err(_) => Err(unreachable(format!("no answer to a replication stream in {setup:?}"))),
        }
    }

    fn header(&self) -> Header {
        Header {
            shard: self.shard,
            target: self.target,
            cluster_name: self.cluster_name.clone(),
            incarnations: self.incarnations.clone(),
        }
    }
}

/// What the first (or only) request to a peer says about where it goes and who sends it.
#[derive(Debug, Clone)]
struct Header {
    shard: ShardId,
    target: NodeId,
    cluster_name: Arc<str>,
    incarnations: Incarnations,
}

fn header(h: &Header, payload: impl Into<bytes::Bytes>) -> RaftRequest {
    RaftRequest {
        shard_id: h.shard.0,
        target_node_id: h.target.0,
        cluster_name: h.cluster_name.to_string(),
        payload: payload.into(),
        sender_node_id: h.incarnations.me().0,
        sender_incarnation: h.incarnations.mine(),
        target_incarnation: h.incarnations.of(h.target),
        known_incarnations: h.incarnations.gossip(),
    }
}

/// How fast a follower is assumed to take in a large append at the least (decode, write,
/// fsync) on a loaded machine: each request's reply may take this much longer per byte than the
/// stall timeout. Without it an append of several MiB timed out at 250 ms on a busy follower,
/// the stream was dropped and re-sent, and the follower never caught up.
const STALL_BYTES_PER_SEC: f64 = 4.0 * (1 << 20) as f64;

/// The streamed requests that have no reply yet (when each was sent, and its size), oldest
/// first, and when the last reply came.
#[derive(Debug)]
struct Flight {
    waiting: VecDeque<(Instant, usize)>,
    last_reply: Instant,
}

impl Flight {
    /// Whether the oldest request has waited too long: `stall` plus its size's worth of
    /// [`STALL_BYTES_PER_SEC`], counted from when it was sent or the reply before it came,
    /// whichever is later (requests queued behind a large one wait for it first).
    fn stalled(&self, stall: Duration) -> bool {
        self.waiting.front().is_some_and(|(sent, bytes)| {
            let since = (*sent).max(self.last_reply);
            since.elapsed() > stall_for(stall, *bytes)
        })
    }
}

/// How long a streamed request of `bytes` may wait for its reply: `stall` plus its size's worth
/// of [`STALL_BYTES_PER_SEC`].
fn stall_for(stall: Duration, bytes: usize) -> Duration {
    stall + Duration::from_secs_f64(bytes as f64 / STALL_BYTES_PER_SEC)
}

type InFlight = Arc<Mutex<Flight>>;

fn in_flight(q: &InFlight) -> std::sync::MutexGuard<'_, Flight> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

/// A replication stream's later requests, with those that carry no entries held back a little.
///
/// openraft sends a follower a request without entries whenever the leader's commit index
/// advances and it has no new entries to send with it. Under load that is once per batch: each
/// follower got two requests per batch (the entries, then their commit) and answered both, on
/// every shard. Here such a request waits up to `hold`; if a request with entries comes
/// meanwhile, it goes instead and the held one is dropped. Nothing is lost: every request
/// carries the newest commit index when it is made, and within a stream a request without
/// entries names the last position already sent, which is where the next one starts. openraft
/// acknowledges by position, so the reply to the later request covers the dropped one. A held
/// request that nothing replaces goes when `hold` is up, or at once when the stream ends.
struct HoldCommitOnly<S> {
    input: S,
    hold: Duration,
    held: Option<AppendEntriesRequest<TypeConfig>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    ended: bool,
}

impl<S> HoldCommitOnly<S> {
    fn new(input: S, hold: Duration) -> Self {
        HoldCommitOnly { input, hold, held: None, deadline: Box::pin(tokio::time::sleep(hold)), ended: false }
    }
}

impl<S> Stream for HoldCommitOnly<S>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin,
{
    type Item = AppendEntriesRequest<TypeConfig>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while !this.ended {
            match this.input.poll_next_unpin(cx) {
                Poll::Ready(Some(req)) if req.entries.is_empty() => {
                    // A second one replaces the first (its commit is at least as new) but keeps
                    // the first one's deadline, so no commit waits longer than `hold`.
                    if this.held.is_none() {
                        let at = tokio::time::Instant::now() + this.hold;
                        this.deadline.as_mut().reset(at);
                    }
                    this.held = Some(req);
                }
                Poll::Ready(Some(req)) => {
                    this.held = None;
                    return Poll::Ready(Some(req));
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => break,
            }
        }
        if this.ended || (this.held.is_some() && this.deadline.as_mut().poll(cx).is_ready()) {
            return Poll::Ready(this.held.take());
        }
        Poll::Pending
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    /// Replication on one gRPC stream: requests go out as openraft produces them, without
    /// waiting for the previous reply, so a follower's fsync of one batch overlaps the sending
    /// of the next, and no call pays for a new HTTP/2 stream. A request without a reply after
    /// the RPC's hard TTL (at least [`MIN_STREAM_STALL`]) plus time for its size ends the stream
    /// as unreachable, as a unary call's deadline would.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let setup = option.soft_ttl().max(MIN_STREAM_STALL);
        let (clocks, target, incarnations) = (self.clocks.clone(), self.target, self.incarnations.clone());
        let stall = option.hard_ttl().max(MIN_STREAM_STALL);
        let mut first_header = Some(self.header());
        let sent: InFlight = Arc::new(Mutex::new(Flight { waiting: VecDeque::new(), last_reply: Instant::now() }));
        let sent_in = sent.clone();
        let encode = move |rpc: AppendEntriesRequest<TypeConfig>| {
            let payload = codec::encode_append_request(&rpc);
            in_flight(&sent_in).waiting.push_back((Instant::now(), payload.len()));
            match first_header.take() {
                Some(h) => header(&h, payload),
                None => RaftRequest { payload: payload.into(), ..Default::default() },
            }
        };
        Box::pin(async move {
            // openraft waits out its retry backoff while it produces a request, so take the
            // first one before connecting: a peer that is down is then retried at the backoff's
            // pace. Connecting first, a refused connection failed the stream before openraft
            // was ever asked, and it retried at once — ~80,000 warnings a second per node
            // while one peer of 8 shards was down.
            let mut input = input;
            let Some(first) = input.next().await else {
                return Ok(futures::stream::empty().boxed());
            };
            if input.size_hint().1 == Some(0) {
                // The only request of this call (a heartbeat): over the kept-open session.
                let payload = codec::encode_append_request(&first);
                let stall = stall_for(stall, payload.len());
                let result = self.append_one(payload, setup, stall).await;
                return Ok(futures::stream::once(std::future::ready(result)).boxed());
            }
            let later = HoldCommitOnly::new(input, COMMIT_HOLD);
            let requests = futures::stream::once(async move { first }).chain(later).map(encode);
            let replies = self.open_stream(requests, setup).await?;
            let mut check = tokio::time::interval(stall / 2);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let results = futures::stream::unfold(
                Some((replies, sent, check, clocks, incarnations)),
                move |state| async move {
                    let (mut replies, sent, mut check, clocks, incarnations) = state?;
                    loop {
                        tokio::select! {
                            reply = replies.message() => {
                                let item = match reply {
                                    Ok(Some(reply)) => {
                                        {
                                            let mut flight = in_flight(&sent);
                                            flight.waiting.pop_front();
                                            flight.last_reply = Instant::now();
                                        }
                                        streamed_reply(&incarnations, &clocks, target, &reply)
                                    }
                                    Ok(None) => return None,
                                    Err(status) => Err(status_error(status)),
                                };
                                let next = item.is_ok().then_some((replies, sent, check, clocks, incarnations));
                                return Some((item, next));
                            }
                            _ = check.tick() => {
                                if in_flight(&sent).stalled(stall) {
                                    return Some((Err(unreachable(format!("no reply to a streamed append in {stall:?}"))), None));
                                }
                            }
                        }
                    }
                },
            );
            Ok(results.boxed())
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(codec::encode_append_request(&rpc), &option);
        let reply = self.client()?.append_entries(req).await.map_err(status_error)?;
        codec::decode_append_response(&self.heard(reply)?.payload).map_err(decode_error)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(codec::encode_vote_request(&rpc), &option);
        let reply = self.client()?.vote(req).await.map_err(status_error)?;
        codec::decode_vote_response(&self.heard(reply)?.payload).map_err(decode_error)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(codec::encode_vote_request(&rpc), &option);
        let reply = self.client()?.pre_vote(req).await.map_err(status_error)?;
        codec::decode_vote_response(&self.heard(reply)?.payload).map_err(decode_error)
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(codec::encode_transfer_request(&rpc), &option);
        let reply = self.client()?.transfer_leader(req).await.map_err(status_error)?;
        codec::decode_transfer_response(&self.heard(reply)?.payload).map_err(decode_error)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client()?;
        let header = self.request(codec::encode_snapshot_header(&vote, &snapshot.meta), &option).into_inner();
        // Read the file on a blocking thread, one chunk at a time, with a small buffer between
        // the reader and the stream: memory stays at a few chunks whatever the snapshot size.
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(2);
        let mut file = snapshot.snapshot.file;
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut header = Some(header);
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                let n = file.read(&mut buf)?;
                buf.truncate(n);
                let chunk = SnapshotChunk { header: header.take(), data: buf.into() };
                if tx.blocking_send(chunk).is_err() || n == 0 {
                    return Ok(());
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let call = client.install_snapshot(stream);
        let reply = tokio::select! {
            r = call => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(unreachable(format!("reading snapshot file: {e}")).into()),
            Err(e) => return Err(unreachable(format!("snapshot reader failed: {e}")).into()),
        }
        let reply = reply.map_err(status_error)?;
        codec::decode_snapshot_response(&self.heard(reply)?.payload).map_err(|e| decode_error(e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{EntryPayload, vote::RaftLeaderId};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;
    use vow_storage::types::{Entry, LeaderId, LogId};

    #[test]
    fn a_large_append_gets_time_for_its_size_and_queued_ones_wait_their_turn() {
        let stall = Duration::from_millis(250);
        let long_ago = Instant::now() - Duration::from_millis(1500);
        let flight = |bytes, last_reply| Flight { waiting: VecDeque::from([(long_ago, bytes)]), last_reply };
        assert!(flight(1000, long_ago).stalled(stall), "a small append 1.5 s without a reply");
        assert!(!flight(8 << 20, long_ago).stalled(stall), "8 MiB gets 2 s more");
        assert!(!flight(1000, Instant::now()).stalled(stall), "counted from the reply before it");
        let empty = Flight { waiting: VecDeque::new(), last_reply: long_ago };
        assert!(!empty.stalled(stall));
    }

    fn at(index: u64) -> LogId {
        LogId::new(LeaderId::new(1, NodeId(1)), index)
    }

    /// A pipelined request after position `prev`: `entries` new entries, commit at `commit`.
    fn request(prev: u64, entries: u64, commit: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, NodeId(1)),
            prev_log_id: Some(at(prev)),
            entries: (prev + 1..=prev + entries)
                .map(|i| Entry { log_id: at(i), payload: EntryPayload::Blank })
                .collect(),
            leader_commit: Some(at(commit)),
        }
    }

    type Requests = mpsc::UnboundedSender<AppendEntriesRequest<TypeConfig>>;

    fn held(hold: Duration) -> (Requests, HoldCommitOnly<UnboundedReceiverStream<AppendEntriesRequest<TypeConfig>>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, HoldCommitOnly::new(UnboundedReceiverStream::new(rx), hold))
    }

    fn summary(r: &AppendEntriesRequest<TypeConfig>) -> (u64, usize, u64) {
        (r.prev_log_id.unwrap().index, r.entries.len(), r.leader_commit.unwrap().index)
    }

    #[tokio::test]
    async fn a_commit_only_request_gives_way_to_the_next_request_with_entries() {
        let (tx, mut out) = held(Duration::from_secs(30));
        tx.send(request(4, 4, 2)).unwrap();
        assert_eq!(summary(&out.next().await.unwrap()), (4, 4, 2), "entries go at once");
        tx.send(request(8, 0, 8)).unwrap();
        tx.send(request(8, 3, 8)).unwrap();
        assert_eq!(summary(&out.next().await.unwrap()), (8, 3, 8), "the entries carry the commit instead");
        drop(tx);
        assert!(out.next().await.is_none(), "the held request was dropped, not sent late");
    }

    #[tokio::test]
    async fn a_held_commit_goes_alone_when_nothing_comes_to_carry_it() {
        let hold = Duration::from_millis(100);
        let (tx, mut out) = held(hold);
        let started = Instant::now();
        tx.send(request(8, 0, 8)).unwrap();
        assert_eq!(summary(&out.next().await.unwrap()), (8, 0, 8));
        assert!(started.elapsed() >= hold, "it waited for a request with entries first");
        drop(tx);
        assert!(out.next().await.is_none());
    }

    #[tokio::test]
    async fn a_later_commit_replaces_a_held_one_without_waiting_longer() {
        let hold = Duration::from_millis(2000);
        let (tx, mut out) = held(hold);
        let started = Instant::now();
        tx.send(request(8, 0, 6)).unwrap();
        let first = tokio::spawn(async move {
            let r = out.next().await.map(|r| summary(&r));
            (r, started.elapsed(), out)
        });
        tokio::time::sleep(hold / 2).await;
        tx.send(request(8, 0, 8)).unwrap();
        let (r, waited, mut out) = first.await.unwrap();
        assert_eq!(r, Some((8, 0, 8)), "only the newer commit goes");
        // Had the second commit restarted the hold, it would have gone after 1.5 × hold.
        assert!(waited >= hold && waited < hold * 7 / 5, "went after {waited:?}");
        drop(tx);
        assert!(out.next().await.is_none());
    }

    #[tokio::test]
    async fn the_stream_end_sends_a_held_commit_at_once() {
        let (tx, mut out) = held(Duration::from_secs(30));
        let started = Instant::now();
        tx.send(request(8, 0, 8)).unwrap();
        drop(tx);
        assert_eq!(summary(&out.next().await.unwrap()), (8, 0, 8));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(out.next().await.is_none());
    }
}
