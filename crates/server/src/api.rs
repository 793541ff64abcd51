//! gRPC edge: the public `Promises` and `Cluster` services, plus the internal Raft service,
//! health and reflection, on one listener. Handlers decode, call the node, encode; requests
//! for shards led elsewhere are forwarded once to the leader.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::RecvError;
use tonic::transport::Channel;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status};
use vow_api::metadata as md;
use vow_api::v1 as pb;
use vow_api::v1::cluster_client::ClusterClient;
use vow_api::v1::cluster_server::{Cluster, ClusterServer};
use vow_api::v1::promises_client::PromisesClient;
use vow_api::v1::promises_server::{Promises, PromisesServer};
use vow_core::{NodeId, PromiseId, SettleAs, ShardId};

use crate::convert::{self, shard_status};
use crate::node::{self, Node};
use crate::raft::service::RaftService;
use crate::shard::{Shard, ShardError};
use crate::storage::fitting;
use crate::storage::state_machine::{Announcement, SearchFilter};

/// Default and largest server-side wait of an Await.
const AWAIT_DEFAULT: Duration = Duration::from_secs(30);
const AWAIT_MAX: Duration = Duration::from_secs(300);
/// How often a waiting Await asks the shard leader whether its promise has settled. A replica
/// that is cut off, removed or far behind applies nothing, so without this its waiters would
/// sleep through settlements until their wait ran out; with it they are at most this late.
const AWAIT_RECHECK: Duration = Duration::from_secs(5);
/// Search page size: default and cap.
const SEARCH_DEFAULT_LIMIT: usize = 100;
const SEARCH_MAX_LIMIT: usize = 1000;
/// Encoded bytes of records a Search page carries (at least one record, whatever its size): a
/// page of large records stays well under the 4 MiB a gRPC client accepts by default, and the
/// page token carries on.
pub const SEARCH_PAGE_BYTES: usize = 1 << 20;
/// Metadata on a search forwarded to one shard's leader: search only that shard.
const SEARCH_SHARD: &str = "vow-search-shard";

/// Serves every gRPC service on `listener` until `shutdown` completes.
pub async fn serve(
    node: Node,
    cluster_name: Arc<str>,
    data_dir: PathBuf,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PromisesServer<PromisesApi>>().await;
    health.set_serving::<ClusterServer<ClusterApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vow_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vow_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let raft =
        RaftService { node_id: node.id(), cluster_name, shards: node.shards().into(), data_dir, clock: node.wall() };
    // The builder's tcp_nodelay only applies to listeners it binds itself; ours is bound by the
    // caller, so set it here. Without it, Nagle's algorithm and delayed ACKs add ~40 ms to replies.
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|conn| conn.map(ScalarWrites));
    // A public request is at most the largest command the configured limits allow; anything
    // larger is refused before it is buffered whole. Replies are bounded by the same limits (a
    // record) or by SEARCH_PAGE_BYTES (a page).
    let max_request = node.limits().max_command_bytes() + REQUEST_SLACK_BYTES;
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            PromisesServer::new(PromisesApi { node: node.clone() })
                .max_decoding_message_size(max_request)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(ClusterServer::new(ClusterApi { node }).max_decoding_message_size(REQUEST_SLACK_BYTES))
        .add_service(
            vow_api::raft::raft_server::RaftServer::new(raft)
                .max_decoding_message_size(crate::raft::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(crate::raft::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// A client connection that tells HTTP/2 it cannot write vectored. h2 then copies DATA payloads
/// of up to 1 KiB into its write buffer instead of chaining every payload over 256 bytes, and a
/// unary reply — headers, a message of a few hundred bytes, trailers — leaves in one write. With
/// chaining the trailers could not be buffered behind the chained payload and went out in a
/// second write (and a second read and wake-up at the client) for every reply with a 256-byte
/// value; larger payloads are still chained.
struct ScalarWrites(TcpStream);

impl tokio::io::AsyncRead for ScalarWrites {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ScalarWrites {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl Connected for ScalarWrites {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(md::FORWARDED)
}

/// A copy of `req` for the leader, marked so that it is not forwarded again.
fn forwarded<T>(req: Request<T>) -> Request<T> {
    let timeout = req.metadata().get("grpc-timeout").cloned();
    let mut fwd = Request::new(req.into_inner());
    fwd.metadata_mut().insert(md::FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(t) = timeout {
        fwd.metadata_mut().insert("grpc-timeout", t);
    }
    fwd
}

fn with_leader_hint<T>(mut reply: Response<T>, leader_addr: &str) -> Response<T> {
    if let Ok(v) = leader_addr.parse() {
        reply.metadata_mut().insert(md::LEADER_ADDR, v);
    }
    reply
}

/// Room beyond the largest command for the rest of a request (field tags, the id prefix of a
/// search, a membership request).
const REQUEST_SLACK_BYTES: usize = 64 << 10;

fn channel(node: &Node, addr: &str) -> Result<Channel, Status> {
    node.peers().channel(addr).map_err(|e| Status::unavailable(format!("bad leader address {addr}: {e}")))
}

/// A client for forwarding to the leader at `addr`. Replies are bounded by the leader's limits
/// (one record, or a search page), not by tonic's 4 MiB default.
fn promises_client(node: &Node, addr: &str) -> Result<PromisesClient<Channel>, Status> {
    Ok(PromisesClient::new(channel(node, addr)?).max_decoding_message_size(usize::MAX))
}

/// Whether a forwarded call changes state: a write that failed in transit may have happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Read,
    Write,
}

/// What the client hears when a call forwarded to the leader at `addr` failed. The leader's own
/// answers pass through: domain refusals, and an UNAVAILABLE that says what it means (a leader
/// hint, or the outcome-unknown marker). Anything else — the leader unreachable or lost mid-call,
/// a transport or protocol error, a server error — becomes UNAVAILABLE as the contract promises,
/// marked outcome-unknown for a write since the leader may have carried it out. The hint names
/// whoever this node now believes leads, unless that is the node that just failed.
fn forward_failure(s: Status, effect: Effect, addr: &str, shard: &Shard) -> Status {
    use tonic::Code;
    let definite = match s.code() {
        Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::NotFound
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated => true,
        Code::Unavailable => s.metadata().contains_key(md::OUTCOME_UNKNOWN) || s.metadata().contains_key(md::LEADER_ID),
        _ => false,
    };
    if definite {
        return s;
    }
    let mut out =
        Status::unavailable(format!("forwarding to the leader at {addr} failed: {}: {}", s.code(), s.message()));
    if let Some((id, leader_addr)) = shard.leader().filter(|(_, a)| a != addr) {
        convert::add_leader_hint(&mut out, id, &leader_addr);
    }
    if effect == Effect::Write {
        convert::mark_outcome_unknown(&mut out);
    }
    out
}

/// The time left before the caller's `grpc-timeout` passes, if it sent one.
fn deadline_of<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long a write may wait for its outcome: a little less than the caller's deadline, so the
/// caller hears "outcome unknown" from us rather than tonic's bare CANCELLED when it passes.
fn write_budget(deadline: Duration) -> Duration {
    let margin = (deadline / 10).clamp(Duration::from_millis(5), Duration::from_millis(100));
    deadline.saturating_sub(margin)
}

#[derive(Debug)]
pub struct PromisesApi {
    node: Node,
}

impl PromisesApi {
    /// Runs a write locally or at the shard leader.
    async fn write<F, Fut>(
        &self,
        method: &'static str,
        req: Request<F::Req>,
        command: vow_core::Command,
        call: F,
    ) -> Result<Response<pb::PromiseResponse>, Status>
    where
        F: ForwardCall<Fut = Fut>,
        Fut: Future<Output = Result<Response<pb::PromiseResponse>, Status>>,
    {
        let started = Instant::now();
        let shard = match &command {
            vow_core::Command::Create { id, .. } | vow_core::Command::Settle { id, .. } => self.node.shard_for(id),
            _ => return Err(Status::internal("not a client command")),
        };
        let budget = deadline_of(&req).map(write_budget);
        let attempt = async {
            match self.node.write(shard, command).await {
                Ok(outcome) => convert::outcome_reply(outcome).map(Response::new),
                Err(ShardError::NotLeader { leader: Some((_, addr)), .. }) if !is_forwarded(&req) => {
                    let reply = call.call(promises_client(&self.node, &addr)?, forwarded(req)).await;
                    // Tell the client where the leader is, so its next call goes there directly.
                    reply
                        .map(|r| with_leader_hint(r, &addr))
                        .map_err(|s| forward_failure(s, Effect::Write, &addr, shard))
                }
                Err(e) => Err(shard_status(&e)),
            }
        };
        let result = match budget {
            None => attempt.await,
            Some(budget) => tokio::time::timeout(budget, attempt).await.unwrap_or_else(|_| {
                Err(shard_status(&ShardError::OutcomeUnknown {
                    shard: shard.id,
                    reason: "the call's deadline passed before the write's outcome was known".into(),
                }))
            }),
        };
        self.node.metrics().record(method, &result, started.elapsed());
        result
    }

    /// A linearizable read of one promise, locally or at the shard leader.
    async fn read(
        &self,
        shard: &Shard,
        id: &PromiseId,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::PromiseResponse>, Status> {
        let consistency = pb::Consistency::try_from(req.get_ref().consistency).unwrap_or(pb::Consistency::Linearizable);
        if consistency == pb::Consistency::Linearizable {
            match self.node.read_barrier(shard).await {
                Ok(()) => {}
                Err(ShardError::NotLeader { leader: Some((_, addr)), .. }) if !is_forwarded(&req) => {
                    let reply = promises_client(&self.node, &addr)?
                        .get(forwarded(req))
                        .await
                        .map_err(|s| forward_failure(s, Effect::Read, &addr, shard))?;
                    return Ok(with_leader_hint(reply, &addr));
                }
                Err(e) => return Err(shard_status(&e)),
            }
        }
        match shard.state.get(id) {
            Ok(Some(p)) => {
                Ok(Response::new(pb::PromiseResponse { promise: Some(convert::promise_to_pb(p)), deduplicated: false }))
            }
            Ok(None) => Err(Status::not_found(format!("no promise {id}"))),
            Err(e) => Err(Status::internal(format!("reading promise {id}: {e}"))),
        }
    }

    async fn settle(
        &self,
        method: &'static str,
        req: Request<pb::SettleRequest>,
        settle_as: SettleAs,
    ) -> Result<Response<pb::PromiseResponse>, Status> {
        let command = convert::settle_command(self.node.limits(), req.get_ref().clone(), settle_as)?;
        match settle_as {
            SettleAs::Resolve => self.write(method, req, command, Resolve).await,
            SettleAs::Reject => self.write(method, req, command, Reject).await,
            SettleAs::Cancel => self.write(method, req, command, Cancel).await,
        }
    }

    /// A linearizable read of `id` (at the leader, forwarded if need be).
    async fn read_linearizable(&self, shard: &Shard, id: &PromiseId) -> Result<pb::PromiseResponse, Status> {
        let req =
            Request::new(pb::GetRequest { id: id.to_string(), consistency: pb::Consistency::Linearizable as i32 });
        Ok(self.read(shard, id, req).await?.into_inner())
    }

    /// The record of `id` once it is settled, or after `wait` the record as a linearizable read
    /// finds it then (possibly still pending). Any replica applies every settle, so the wait is
    /// on this replica's announcements, whoever leads; a snapshot install or a lagging listener
    /// makes it look at the replica's state, and every [`AWAIT_RECHECK`] it asks the leader, so
    /// a replica that stopped applying cannot keep a waiter behind for longer than that.
    async fn wait_settled(&self, shard: &Shard, id: &PromiseId, wait: Duration) -> Result<pb::PromiseResponse, Status> {
        let settled =
            |p: &pb::PromiseResponse| p.promise.as_ref().is_some_and(|p| p.state != pb::State::Pending as i32);
        let settled_here = || match shard.state.get(id) {
            Ok(Some(p)) if p.state.is_settled() => {
                Some(pb::PromiseResponse { promise: Some(convert::promise_to_pb(p)), deduplicated: false })
            }
            _ => None,
        };
        // Subscribe before the read: a settle applied after the read is then always heard.
        let mut announcements = shard.subscribe();
        let first = self.read_linearizable(shard, id).await?;
        if settled(&first) {
            return Ok(first);
        }
        let _waiting = self.node.metrics().await_waiting();
        let deadline = tokio::time::Instant::now() + wait;
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + AWAIT_RECHECK, AWAIT_RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = recheck.tick() => {
                    // A failed check (no leader reachable now) is not the waiter's failure.
                    if let Ok(p) = self.read_linearizable(shard, id).await && settled(&p) {
                        return Ok(p);
                    }
                }
                event = announcements.recv() => match event {
                    Ok(Announcement::Settled(settled_id)) if settled_id == *id => {
                        if let Some(p) = settled_here() {
                            return Ok(p);
                        }
                    }
                    Ok(Announcement::Settled(_)) => {}
                    // The state was replaced, or notifications were missed: look at the state.
                    Ok(Announcement::StateReplaced) | Err(RecvError::Lagged(_)) => {
                        if let Some(p) = settled_here() {
                            return Ok(p);
                        }
                    }
                    Err(RecvError::Closed) => return Err(Status::unavailable("shard stopped")),
                },
            }
        }
        // The wait ran out: answer with what is true now, not with the first read.
        self.read_linearizable(shard, id).await
    }

    /// One shard's page of a search, locally or at the shard's leader.
    async fn search_shard(
        &self,
        shard: &Shard,
        req: &pb::SearchRequest,
        filter: &SearchFilter,
        after: Option<&str>,
        limit: usize,
        forwarded_req: bool,
    ) -> Result<(Vec<pb::Promise>, Option<String>), Status> {
        match self.node.read_barrier(shard).await {
            Ok(()) => {
                // A scan reads RocksDB for up to SEARCH_SCAN_LIMIT records: not on a runtime thread.
                let (state, filter, after) = (shard.state.clone(), filter.clone(), after.map(str::to_owned));
                let page = tokio::task::spawn_blocking(move || {
                    state.search(&filter, after.as_deref(), limit, SEARCH_PAGE_BYTES)
                })
                .await
                .map_err(|e| Status::internal(format!("search task failed: {e}")))?
                .map_err(|e| Status::internal(e.to_string()))?;
                Ok((page.promises.into_iter().map(convert::promise_to_pb).collect(), page.next_after))
            }
            Err(ShardError::NotLeader { leader: Some((_, addr)), .. }) if !forwarded_req => {
                let mut fwd = forwarded(Request::new(pb::SearchRequest { limit: limit as u32, ..req.clone() }));
                if let Ok(v) = shard.id.0.to_string().parse() {
                    fwd.metadata_mut().insert(SEARCH_SHARD, v);
                }
                let resp = promises_client(&self.node, &addr)?
                    .search(fwd)
                    .await
                    .map_err(|s| forward_failure(s, Effect::Read, &addr, shard))?
                    .into_inner();
                let next =
                    if resp.next_page_token.is_empty() { None } else { Some(decode_token(&resp.next_page_token)?) };
                Ok((resp.promises, next))
            }
            Err(e) => Err(shard_status(&e)),
        }
    }
}

/// The forwardable client call behind each write method, as a value so that `write` stays one
/// generic function.
trait ForwardCall {
    type Req;
    type Fut;
    fn call(self, client: PromisesClient<Channel>, req: Request<Self::Req>) -> Self::Fut;
}

macro_rules! forward_call {
    ($name:ident, $req:ty, $method:ident) => {
        struct $name;
        impl ForwardCall for $name {
            type Req = $req;
            type Fut = std::pin::Pin<Box<dyn Future<Output = Result<Response<pb::PromiseResponse>, Status>> + Send>>;
            fn call(self, mut client: PromisesClient<Channel>, req: Request<$req>) -> Self::Fut {
                Box::pin(async move { client.$method(req).await })
            }
        }
    };
}

forward_call!(Create, pb::CreateRequest, create);
forward_call!(Resolve, pb::SettleRequest, resolve);
forward_call!(Reject, pb::SettleRequest, reject);
forward_call!(Cancel, pb::SettleRequest, cancel);

fn encode_token(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Result<String, Status> {
    let bad = || Status::invalid_argument("malformed page_token");
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| token.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(bad))
        .collect::<Result<Vec<u8>, Status>>()?;
    String::from_utf8(bytes).map_err(|_| bad())
}

#[tonic::async_trait]
impl Promises for PromisesApi {
    async fn create(&self, req: Request<pb::CreateRequest>) -> Result<Response<pb::PromiseResponse>, Status> {
        let command = convert::create_command(self.node.limits(), req.get_ref().clone(), self.node.wall_ms())?;
        self.write("create", req, command, Create).await
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::PromiseResponse>, Status> {
        let started = Instant::now();
        let id = self.node.limits().check_id(&req.get_ref().id).map_err(|e| Status::invalid_argument(e.0))?;
        let shard = self.node.shard_for(&id).clone();
        let result = self.read(&shard, &id, req).await;
        self.node.metrics().record("get", &result, started.elapsed());
        result
    }

    async fn resolve(&self, req: Request<pb::SettleRequest>) -> Result<Response<pb::PromiseResponse>, Status> {
        self.settle("resolve", req, SettleAs::Resolve).await
    }

    async fn reject(&self, req: Request<pb::SettleRequest>) -> Result<Response<pb::PromiseResponse>, Status> {
        self.settle("reject", req, SettleAs::Reject).await
    }

    async fn cancel(&self, req: Request<pb::SettleRequest>) -> Result<Response<pb::PromiseResponse>, Status> {
        self.settle("cancel", req, SettleAs::Cancel).await
    }

    async fn r#await(&self, req: Request<pb::AwaitRequest>) -> Result<Response<pb::PromiseResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let id = self.node.limits().check_id(&r.id).map_err(|e| Status::invalid_argument(e.0))?;
        let wait = match r.wait_timeout_ms {
            0 => AWAIT_DEFAULT,
            ms => Duration::from_millis(u64::from(ms)).min(AWAIT_MAX),
        };
        let shard = self.node.shard_for(&id).clone();
        let result = self.wait_settled(&shard, &id, wait).await.map(Response::new);
        self.node.metrics().record("await", &result, started.elapsed());
        result
    }

    async fn search(&self, req: Request<pb::SearchRequest>) -> Result<Response<pb::SearchResponse>, Status> {
        let only_shard = req.metadata().get(SEARCH_SHARD).and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
        let forwarded_req = is_forwarded(&req);
        let r = req.into_inner();
        self.node.limits().check_id_prefix(&r.id_prefix).map_err(|e| Status::invalid_argument(e.0))?;
        let filter = SearchFilter {
            id_prefix: r.id_prefix.clone(),
            state: convert::state_from_pb(r.state)?,
            tags: r.tags.clone().into_iter().collect(),
        };
        let limit = match r.limit as usize {
            0 => SEARCH_DEFAULT_LIMIT,
            n => n.min(SEARCH_MAX_LIMIT),
        };
        let after = if r.page_token.is_empty() { None } else { Some(decode_token(&r.page_token)?) };
        let shards: Vec<Shard> = match only_shard {
            Some(s) => {
                vec![self.node.shard(ShardId(s)).ok_or_else(|| Status::not_found(format!("no shard {s}")))?.clone()]
            }
            None => self.node.shards().to_vec(),
        };
        // Each shard returns its next `limit` matches in id order; the merge keeps the first
        // `limit` overall, but never past a shard that stopped early (its resume point).
        let mut all = Vec::new();
        let mut boundary: Option<String> = None;
        for shard in &shards {
            let (promises, next) =
                self.search_shard(shard, &r, &filter, after.as_deref(), limit, forwarded_req).await?;
            all.extend(promises);
            if let Some(n) = next {
                boundary = Some(boundary.map_or(n.clone(), |b: String| b.min(n)));
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(b) = &boundary {
            all.retain(|p| p.id <= *b);
        }
        // The page ends at `limit` records or SEARCH_PAGE_BYTES, whichever comes first.
        let keep = fitting(all.iter().map(prost::Message::encoded_len), limit, SEARCH_PAGE_BYTES);
        let next_page_token = if all.len() > keep {
            all.truncate(keep);
            all.last().map(|p| encode_token(&p.id)).unwrap_or_default()
        } else {
            boundary.as_deref().map(encode_token).unwrap_or_default()
        };
        Ok(Response::new(pb::SearchResponse { promises: all, next_page_token }))
    }
}

#[derive(Debug)]
pub struct ClusterApi {
    node: Node,
}

impl ClusterApi {
    async fn status(&self) -> pb::StatusResponse {
        let members = node::members(&self.node);
        let mut nodes = Vec::new();
        for (id, addr) in members {
            let reachable = id == self.node.id() || reachable(&addr).await;
            nodes.push(pb::NodeStatus { node_id: id.0, grpc_addr: addr, reachable });
        }
        let shards = self
            .node
            .shards()
            .iter()
            .map(|s| {
                let m = s.metrics();
                let membership = m.membership_config.membership();
                pb::ShardStatus {
                    shard_id: s.id.0,
                    leader_id: m.current_leader.map_or(0, |l| l.0),
                    term: m.current_term,
                    commit_index: m.local_committed.map_or(0, |c| c.index),
                    voters: membership.voter_ids().map(|v| v.0).collect(),
                    learners: membership.learner_ids().map(|v| v.0).collect(),
                    applied_index: m.last_applied.map_or(0, |a| a.index),
                }
            })
            .collect();
        pb::StatusResponse { nodes, shards, node_id: self.node.id().0 }
    }

    /// Runs a membership operation here for the shards this node leads, and forwards the rest
    /// to their leaders, one shard per forwarded request.
    async fn membership<F, Fut>(
        &self,
        forwarded_req: bool,
        shard_ids: &[u32],
        local: F,
        remote: impl Fn(ShardId) -> RemoteOp,
    ) -> Result<Response<pb::StatusResponse>, Status>
    where
        F: FnOnce(Vec<ShardId>) -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<(ShardId, String)>>>,
    {
        let shards = node::shard_ids(&self.node, shard_ids);
        let elsewhere = local(shards).await.map_err(|e| {
            if e.downcast_ref::<node::NoLeader>().is_some() || e.downcast_ref::<node::Busy>().is_some() {
                Status::unavailable(format!("{e:#}"))
            } else {
                Status::failed_precondition(format!("{e:#}"))
            }
        })?;
        for (sid, addr) in elsewhere {
            if forwarded_req {
                return Err(Status::unavailable(format!("shard {sid} is led by {addr}, not this node")));
            }
            let mut client = ClusterClient::new(channel(&self.node, &addr)?);
            match remote(sid) {
                RemoteOp::Add(r) => client.add_node(forwarded(Request::new(r))).await?,
                RemoteOp::Remove(r) => client.remove_node(forwarded(Request::new(r))).await?,
                RemoteOp::Transfer(r) => client.transfer_leader(forwarded(Request::new(r))).await?,
            };
        }
        Ok(Response::new(self.status().await))
    }
}

enum RemoteOp {
    Add(pb::AddNodeRequest),
    Remove(pb::RemoveNodeRequest),
    Transfer(pb::TransferLeaderRequest),
}

async fn reachable(addr: &str) -> bool {
    matches!(tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.status().await))
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let fwd = is_forwarded(&req);
        let r = req.into_inner();
        if r.node_id == 0 || r.grpc_addr.is_empty() {
            return Err(Status::invalid_argument("add-node needs a positive node_id and a grpc_addr"));
        }
        let shards = self.node.shards().len();
        if r.shard_count != 0 && r.shard_count as usize != shards {
            return Err(Status::failed_precondition(format!(
                "node {} runs {} shards but this cluster has {shards}; start it with --shards {shards}",
                r.node_id, r.shard_count
            )));
        }
        let (id, addr) = (NodeId(r.node_id), r.grpc_addr.clone());
        let node = self.node.clone();
        self.membership(
            fwd,
            &r.shard_ids,
            |shards| async move { node.add_node(id, &addr, &shards).await },
            |sid| RemoteOp::Add(pb::AddNodeRequest { shard_ids: vec![sid.0], ..r.clone() }),
        )
        .await
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let fwd = is_forwarded(&req);
        let r = req.into_inner();
        let id = NodeId(r.node_id);
        let node = self.node.clone();
        self.membership(
            fwd,
            &r.shard_ids,
            |shards| async move { node.remove_node(id, &shards).await },
            |sid| RemoteOp::Remove(pb::RemoveNodeRequest { node_id: r.node_id, shard_ids: vec![sid.0] }),
        )
        .await
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let fwd = is_forwarded(&req);
        let r = req.into_inner();
        let to = NodeId(r.to_node_id);
        let node = self.node.clone();
        self.membership(
            fwd,
            &r.shard_ids,
            |shards| async move { node.transfer_leader(to, &shards).await },
            |sid| RemoteOp::Transfer(pb::TransferLeaderRequest { to_node_id: r.to_node_id, shard_ids: vec![sid.0] }),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_end_at_the_count_or_the_byte_budget() {
        assert_eq!(fitting([10, 10, 10], 2, 100), 2, "the count ends it");
        assert_eq!(fitting([40, 40, 40], 10, 100), 2, "the bytes end it");
        assert_eq!(fitting([40, 60, 1], 10, 100), 2, "exactly the budget fits");
        assert_eq!(fitting([500, 1], 10, 100), 1, "one record always fits, whatever its size");
        assert_eq!(fitting([], 10, 100), 0);
    }

    #[test]
    fn grpc_timeouts_parse_and_writes_answer_before_them() {
        let with = |v: &'static str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("grpc-timeout", tonic::metadata::MetadataValue::from_static(v));
            deadline_of(&r)
        };
        assert_eq!(with("5000m"), Some(Duration::from_secs(5)));
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("x"), None);
        assert_eq!(with("5q"), None);
        assert_eq!(deadline_of(&Request::new(())), None);
        assert_eq!(write_budget(Duration::from_secs(5)), Duration::from_millis(4900));
        assert_eq!(write_budget(Duration::from_millis(200)), Duration::from_millis(180));
        assert!(write_budget(Duration::from_millis(3)) < Duration::from_millis(3));
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        for id in ["", "a", "{order-1}/step ü"] {
            assert_eq!(decode_token(&encode_token(id)).ok().as_deref(), Some(id));
        }
        assert!(decode_token("abc").is_err());
        assert!(decode_token("zz").is_err());
        assert!(decode_token("ff").is_err());
    }
}
