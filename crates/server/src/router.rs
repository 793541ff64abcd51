//! The router: the one path from any caller to the leader of a shard.
//!
//! The gRPC handlers, the HTTP endpoints, the continuation executor and membership operations
//! reach a shard through [`Router`]; no other code forwards. It maps a promise id to its shard
//! ([`ShardId::for_promise`]), the shard to its leader — this node's replica's view, or a newer
//! one a peer reported — and carries the already-validated request there: it runs locally when
//! this node leads the shard, otherwise it goes over the internal `Route` RPC
//! (`proto/vow/route/v1/route.proto`) to the leader, whose [`RouteService`] runs it locally or
//! refuses with the leader *it* knows ("not leader {leader, term}"). The sender follows such
//! refusals for at most [`MAX_HOPS`] nodes, keeping any leader of a newer term it hears of; a
//! receiver never passes a request on, so a routed request cannot loop.
//!
//! Nothing in a public request steers this: the target shard and node travel only in the
//! internal RPC's `Target`, which the receiver checks as it checks a Raft message, and the
//! receiver re-derives the shard from the command's own id.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use vow_api::route as wire;
use vow_api::route::route_client::RouteClient;
use vow_core::pipeline::ContinuationRecord;
use vow_core::{Command, NodeId, Outcome, Promise, PromiseId, ShardId, State};

use crate::node::{self, Node};
use crate::shard::{Shard, ShardError};
use vow_storage::state_machine::{SearchFilter, SearchPage};
use vow_storage::types::VowNode;

/// Nodes a request is sent to before the router gives up with "not leader": one stale hop
/// (the leader this node believed in has just lost its leadership) and one more for an
/// election in between.
pub const MAX_HOPS: usize = 3;

/// A shard's leader as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub id: NodeId,
    /// Its addresses: the public one for clients, the peer one for the Route RPC.
    pub node: VowNode,
    /// The term in which `id` leads: of two reports, the later term wins.
    pub term: u64,
}

/// One shard's page of a search.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub filter: SearchFilter,
    pub after: Option<String>,
    pub limit: usize,
    pub max_bytes: usize,
}

/// A membership or leadership change of one shard, made by its leader.
#[derive(Debug, Clone)]
pub enum Change {
    AddNode { id: NodeId, node: VowNode },
    RemoveNode(NodeId),
    TransferLeader(NodeId),
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Retryable: no leader known, leadership moved, an earlier change still committing.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// Only an operator can fix this (e.g. removing a shard's last voter).
    #[error("{0}")]
    Refused(String),
}

/// Whether a routed call changes state: a write lost in transit may still have happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Read,
    Write,
}

/// Why one hop to a peer gave no answer.
#[derive(Debug)]
enum HopError {
    /// The peer does not lead the shard; the leader it knows, if any.
    NotLeader(Option<Leader>),
    /// An answer for the caller: the peer could not serve, or the call failed.
    Failed(ShardError),
}

/// What the leader running a ready continuation knows of it, for `GetContinuation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub attempts: u32,
    pub last_error: String,
    /// Wall-clock ms of the next attempt; 0 when none is scheduled.
    pub next_attempt_ms: i64,
}

/// The progress of the continuations this node runs: written by the executor, read by the
/// routed `ReadContinuation` at this node.
#[derive(Debug, Default)]
pub struct ProgressBoard {
    running: Mutex<std::collections::HashMap<String, Progress>>,
}

impl ProgressBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Progress>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One more attempt of `id`, its error if it failed, and when the next is due (0: none).
    pub fn note(&self, id: &str, error: Option<&str>, next_attempt_ms: i64) {
        let mut all = self.lock();
        let p = all.entry(id.to_owned()).or_default();
        p.attempts += 1;
        if let Some(e) = error {
            p.last_error = e.to_owned();
        }
        p.next_attempt_ms = next_attempt_ms;
    }

    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn get(&self, id: &str) -> Option<Progress> {
        self.lock().get(id).cloned()
    }
}

/// A cheap, cloneable handle; clones share the leader cache.
#[derive(Clone, Debug)]
pub struct Router {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: Node,
    /// Per shard, the newest leader a peer reported in a refusal. It matters only while this
    /// node's own replica knows less (cut off, or behind an election).
    reported: Mutex<Vec<Option<Leader>>>,
    progress: ProgressBoard,
}

impl Router {
    pub fn new(node: Node) -> Router {
        let reported = Mutex::new(vec![None; node.shards().len()]);
        Router { inner: Arc::new(Inner { node, reported, progress: ProgressBoard::default() }) }
    }

    /// The progress of the continuations this node runs.
    pub fn progress(&self) -> &ProgressBoard {
        &self.inner.progress
    }

    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    pub fn shard_count(&self) -> u32 {
        self.inner.node.shards().len() as u32
    }

    /// The shard that owns `id`.
    pub fn shard_of(&self, id: &PromiseId) -> ShardId {
        ShardId::for_promise(id, self.shard_count())
    }

    /// The shard a client's command goes to. The sweepers' commands are proposed by a shard's
    /// own leader and never routed.
    pub fn shard_of_command(&self, command: &Command) -> Result<ShardId, ShardError> {
        let shard = command.promise_id().map(|id| self.shard_of(id)).ok_or_else(|| ShardError::Unavailable {
            shard: ShardId(0),
            reason: "sweeper and executor commands are proposed by a shard's own leader, never routed".into(),
        })?;
        // A batch is one shard's part of a Submit: everything in it belongs to that shard.
        if let Some(other) = command.placement_ids().into_iter().find(|id| self.shard_of(id) != shard) {
            return Err(ShardError::Unavailable {
                shard,
                reason: format!(
                    "a batch for shard {shard} holds {other}, which belongs to shard {}",
                    self.shard_of(other)
                ),
            });
        }
        Ok(shard)
    }

    /// This node's replica of shard `id`.
    pub fn shard(&self, id: ShardId) -> Result<&Shard, ShardError> {
        self.inner
            .node
            .shard(id)
            .ok_or_else(|| ShardError::Unavailable { shard: id, reason: format!("no shard {id} on this node") })
    }

    /// The leader of `shard` as best known here: this replica's view, unless a peer reported
    /// a leader in a later term.
    pub fn leader(&self, shard: ShardId) -> Option<Leader> {
        let local = self.inner.node.shard(shard).and_then(|s| {
            let m = s.metrics();
            let id = m.current_leader?;
            let node = m.membership_config.membership().get_node(&id)?;
            Some(Leader { id, node: node.clone(), term: m.current_term })
        });
        let reported = self.lock_reported().get(shard.0 as usize).cloned().flatten();
        match (local, reported) {
            (Some(l), Some(r)) if r.term > l.term => Some(r),
            (Some(l), _) => Some(l),
            (None, r) => r,
        }
    }

    /// Whether this node leads `shard` now, by its replica's account.
    pub fn leads(&self, shard: ShardId) -> bool {
        self.inner.node.shard(shard).is_some_and(Shard::is_leader)
    }

    fn lock_reported(&self) -> std::sync::MutexGuard<'_, Vec<Option<Leader>>> {
        self.inner.reported.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a peer's report of `shard`'s leader if it is newer than what we had.
    fn learn(&self, shard: ShardId, leader: &Leader) {
        let mut reported = self.lock_reported();
        if let Some(slot) = reported.get_mut(shard.0 as usize)
            && slot.as_ref().is_none_or(|old| leader.term >= old.term)
        {
            *slot = Some(leader.clone());
        }
    }

    /// The leader to send a request for `shard` to, or `None` to run it here (this node
    /// leads, or no leader is known and the local attempt waits for an election).
    fn first_hop(&self, shard: ShardId) -> Option<Leader> {
        if self.leads(shard) {
            return None;
        }
        self.leader(shard).filter(|l| l.id != self.inner.node.id())
    }

    /// Carries one request to the leader of `shard`: `local` runs it here, `remote` at a peer.
    async fn route<T, L, LF, R, RF>(&self, shard: ShardId, local: L, remote: R) -> Result<T, ShardError>
    where
        L: Fn() -> LF,
        LF: Future<Output = Result<T, ShardError>>,
        R: Fn(RouteClient<Channel>, wire::Target) -> RF,
        RF: Future<Output = Result<T, HopError>>,
    {
        let mut next = self.first_hop(shard);
        for _ in 0..MAX_HOPS {
            let Some(leader) = next.take() else {
                match local().await {
                    // Another node leads: our replica knows it, so its term is ours.
                    Err(ShardError::NotLeader { leader: Some((id, node)), .. }) => {
                        let term = self.shard(shard)?.metrics().current_term;
                        next = Some(Leader { id, node, term });
                        continue;
                    }
                    other => return other,
                }
            };
            let channel =
                self.inner.node.peers().channel(&leader.node.peer_addr).map_err(|e| ShardError::Unavailable {
                    shard,
                    reason: format!("bad leader peer address {}: {e}", leader.node.peer_addr),
                })?;
            let client = RouteClient::new(channel).max_decoding_message_size(usize::MAX);
            let target = wire::Target {
                shard_id: shard.0,
                node_id: leader.id.0,
                cluster_name: self.inner.node.cluster_name().to_owned(),
            };
            self.inner.node.metrics().routed_sent();
            match remote(client, target).await {
                Ok(v) => return Ok(v),
                Err(HopError::NotLeader(Some(reported))) => {
                    self.learn(shard, &reported);
                    next = (reported.id != self.inner.node.id()).then_some(reported);
                }
                Err(HopError::NotLeader(None)) => {
                    return Err(ShardError::Unavailable {
                        shard,
                        reason: format!("node {} does not lead shard {shard} and knows no leader", leader.id),
                    });
                }
                Err(HopError::Failed(e)) => return Err(e),
            }
        }
        Err(ShardError::NotLeader { shard, leader: self.leader(shard).map(|l| (l.id, l.node)) })
    }

    /// Proposes `command` at the leader of its shard and returns the replicated outcome.
    /// `timeout` bounds a hop to a peer; the peer answers "outcome unknown" just before it.
    pub async fn write(&self, command: Command, timeout: Option<Duration>) -> Result<Outcome, ShardError> {
        let shard = self.shard_of_command(&command)?;
        self.route(
            shard,
            || self.local_write(shard, &command),
            |mut client, target| {
                let mut request = Request::new(wire::WriteRequest { target: Some(target), command: command.encode() });
                if let Some(t) = timeout {
                    request.set_timeout(t);
                }
                async move {
                    let reply = client.write(request).await.map_err(|s| transport_failure(shard, Effect::Write, &s))?;
                    match reply.into_inner().result {
                        Some(wire::write_reply::Result::Outcome(bytes)) => Outcome::decode(&bytes)
                            .map_err(|e| HopError::Failed(malformed_reply(shard, Effect::Write, e))),
                        Some(wire::write_reply::Result::Refused(r)) => Err(refused(shard, Effect::Write, r)),
                        None => Err(HopError::Failed(empty_reply(shard, Effect::Write))),
                    }
                }
            },
        )
        .await
    }

    /// A linearizable read of `id` at the leader of its shard; `None` when there is no such
    /// promise.
    pub async fn read(&self, id: &PromiseId) -> Result<Option<Promise>, ShardError> {
        let shard = self.shard_of(id);
        if crate::sabotage::enabled("stale-reads") {
            // Whatever this replica has, wherever the leader is.
            return self.local_read(shard, id).await;
        }
        self.route(
            shard,
            || self.local_read(shard, id),
            |mut client, target| {
                let request = Request::new(wire::ReadRequest { target: Some(target), id: id.to_string() });
                async move {
                    let reply = client.read(request).await.map_err(|s| transport_failure(shard, Effect::Read, &s))?;
                    match reply.into_inner().result {
                        Some(wire::read_reply::Result::Record(bytes)) => Promise::decode(&bytes)
                            .map(Some)
                            .map_err(|e| HopError::Failed(malformed_reply(shard, Effect::Read, e))),
                        Some(wire::read_reply::Result::NotFound(_)) => Ok(None),
                        Some(wire::read_reply::Result::Refused(r)) => Err(refused(shard, Effect::Read, r)),
                        None => Err(HopError::Failed(empty_reply(shard, Effect::Read))),
                    }
                }
            },
        )
        .await
    }

    /// One page of `shard`'s matches, read at its leader.
    pub async fn search(&self, shard: ShardId, query: &SearchQuery) -> Result<SearchPage, ShardError> {
        self.route(
            shard,
            || self.local_search(shard, query.clone()),
            |mut client, target| {
                let request = Request::new(wire::SearchRequest {
                    target: Some(target),
                    id_prefix: query.filter.id_prefix.clone(),
                    state: query.filter.state.map_or(0, |s| u32::from(s.code())),
                    tags: query.filter.tags.clone().into_iter().collect(),
                    after: query.after.clone().unwrap_or_default(),
                    has_after: query.after.is_some(),
                    limit: query.limit as u32,
                    max_bytes: query.max_bytes as u64,
                });
                async move {
                    let reply = client.search(request).await.map_err(|s| transport_failure(shard, Effect::Read, &s))?;
                    match reply.into_inner().result {
                        Some(wire::search_reply::Result::Page(page)) => {
                            let promises = page
                                .records
                                .iter()
                                .map(|r| Promise::decode(r))
                                .collect::<Result<Vec<_>, _>>()
                                .map_err(|e| HopError::Failed(malformed_reply(shard, Effect::Read, e)))?;
                            Ok(SearchPage { promises, next_after: page.has_next.then_some(page.next_after) })
                        }
                        Some(wire::search_reply::Result::Refused(r)) => Err(refused(shard, Effect::Read, r)),
                        None => Err(HopError::Failed(empty_reply(shard, Effect::Read))),
                    }
                }
            },
        )
        .await
    }

    /// The continuation `id` if `shard` stores it, read at the shard's leader, with the
    /// leader's progress on it.
    pub async fn read_continuation(
        &self,
        shard: ShardId,
        id: &str,
    ) -> Result<Option<(ContinuationRecord, Progress)>, ShardError> {
        self.route(
            shard,
            || self.local_read_continuation(shard, id),
            |mut client, target| {
                let request = Request::new(wire::ReadContinuationRequest { target: Some(target), id: id.to_owned() });
                async move {
                    let reply = client
                        .read_continuation(request)
                        .await
                        .map_err(|s| transport_failure(shard, Effect::Read, &s))?
                        .into_inner();
                    let progress = Progress {
                        attempts: reply.attempts,
                        last_error: reply.last_error,
                        next_attempt_ms: reply.next_attempt_ms,
                    };
                    match reply.result {
                        Some(wire::read_continuation_reply::Result::Record(bytes)) => {
                            ContinuationRecord::decode(&bytes)
                                .map(|r| Some((r, progress)))
                                .map_err(|e| HopError::Failed(malformed_reply(shard, Effect::Read, e)))
                        }
                        Some(wire::read_continuation_reply::Result::NotFound(_)) => Ok(None),
                        Some(wire::read_continuation_reply::Result::Refused(r)) => Err(refused(shard, Effect::Read, r)),
                        None => Err(HopError::Failed(empty_reply(shard, Effect::Read))),
                    }
                }
            },
        )
        .await
    }

    async fn local_read_continuation(
        &self,
        shard: ShardId,
        id: &str,
    ) -> Result<Option<(ContinuationRecord, Progress)>, ShardError> {
        let s = self.shard(shard)?;
        self.inner.node.read_barrier(s).await?;
        let record = s
            .state
            .continuation(id)
            .map_err(|e| ShardError::Unavailable { shard, reason: format!("reading continuation {id}: {e}") })?;
        Ok(record.map(|r| (r, self.progress().get(id).unwrap_or_default())))
    }

    /// Makes `change` to `shard`'s membership at its leader.
    pub async fn change(&self, shard: ShardId, change: Change) -> Result<(), ChangeError> {
        let outcome = self
            .route(
                shard,
                || self.local_change(shard, change.clone()),
                |mut client, target| {
                    let change = match &change {
                        Change::AddNode { id, node } => wire::membership_request::Change::Add(wire::AddNode {
                            node_id: id.0,
                            grpc_addr: node.grpc_addr.clone(),
                            peer_addr: node.peer_addr.clone(),
                        }),
                        Change::RemoveNode(id) => wire::membership_request::Change::RemoveNodeId(id.0),
                        Change::TransferLeader(to) => wire::membership_request::Change::TransferToNodeId(to.0),
                    };
                    // Adding a node waits for it to catch up, which can take a while.
                    let mut request =
                        Request::new(wire::MembershipRequest { target: Some(target), change: Some(change) });
                    request.set_timeout(Duration::from_secs(120));
                    async move {
                        let reply =
                            client.membership(request).await.map_err(|s| transport_failure(shard, Effect::Read, &s))?;
                        let reply = reply.into_inner();
                        match reply.refused {
                            Some(r) => Err(refused(shard, Effect::Read, r)),
                            None if reply.failed.is_empty() => Ok(Ok(())),
                            None => Ok(Err(reply.failed)),
                        }
                    }
                },
            )
            .await?;
        outcome.map_err(ChangeError::Refused)
    }

    /// Runs a write on this node's replica, which must lead the shard (waiting briefly for an
    /// election when no leader is known).
    async fn local_write(&self, shard: ShardId, command: &Command) -> Result<Outcome, ShardError> {
        self.inner.node.write(self.shard(shard)?, command).await
    }

    async fn local_read(&self, shard: ShardId, id: &PromiseId) -> Result<Option<Promise>, ShardError> {
        self.inner.node.read_barrier(self.shard(shard)?).await?;
        self.replica_record(id)
    }

    /// `id`'s record as this node's replica has it, with no barrier: possibly behind the leader.
    pub fn replica_record(&self, id: &PromiseId) -> Result<Option<Promise>, ShardError> {
        let shard = self.shard_of(id);
        let state = &self.shard(shard)?.state;
        state.get(id).map_err(|e| ShardError::Unavailable { shard, reason: format!("reading promise {id}: {e}") })
    }

    async fn local_search(&self, shard: ShardId, query: SearchQuery) -> Result<SearchPage, ShardError> {
        let s = self.shard(shard)?;
        self.inner.node.read_barrier(s).await?;
        // A scan reads RocksDB for up to a page of records: not on a runtime thread.
        let state = s.state.clone();
        tokio::task::spawn_blocking(move || {
            state.search(&query.filter, query.after.as_deref(), query.limit, query.max_bytes)
        })
        .await
        .map_err(|e| ShardError::Unavailable { shard, reason: format!("search task failed: {e}") })?
        .map_err(|e| ShardError::Unavailable { shard, reason: format!("searching: {e}") })
    }

    /// Makes a change here if this node leads the shard. The outer error is the router's to
    /// act on; the inner one is a refusal for the operator.
    async fn local_change(&self, shard: ShardId, change: Change) -> Result<Result<(), String>, ShardError> {
        let node = &self.inner.node;
        let shards = [shard];
        let result = match change {
            Change::AddNode { id, node: member } => node.add_node(id, &member, &shards).await,
            Change::RemoveNode(id) => node.remove_node(id, &shards).await,
            Change::TransferLeader(to) => node.transfer_leader(to, &shards).await,
        };
        match result {
            Ok(elsewhere) if elsewhere.is_empty() => Ok(Ok(())),
            Ok(_) => Err(ShardError::NotLeader { shard, leader: self.shard(shard)?.leader() }),
            Err(e) if e.downcast_ref::<node::NoLeader>().is_some() || e.downcast_ref::<node::Busy>().is_some() => {
                Err(ShardError::Unavailable { shard, reason: format!("{e:#}") })
            }
            Err(e) => Ok(Err(format!("{e:#}"))),
        }
    }

    /// What a receiver tells the sender about a request it did not carry out.
    fn refusal(&self, e: ShardError) -> wire::Refusal {
        use wire::refusal::Reason;
        let reason = match e {
            ShardError::NotLeader { shard, leader } => {
                let term = self.inner.node.shard(shard).map_or(0, |s| s.metrics().current_term);
                let (leader_id, node) = leader.map_or((0, VowNode::default()), |(id, node)| (id.0, node));
                Reason::NotLeader(wire::NotLeader {
                    leader_id,
                    leader_addr: node.grpc_addr,
                    term,
                    leader_peer_addr: node.peer_addr,
                })
            }
            ShardError::OutcomeUnknown { .. } => Reason::OutcomeUnknown(e.to_string()),
            ShardError::Unavailable { .. } | ShardError::Fatal { .. } => Reason::Unavailable(e.to_string()),
        };
        wire::Refusal { reason: Some(reason) }
    }
}

/// A routed call that failed as a call (the leader unreachable or lost mid-call, a transport
/// or protocol error): a write may have been carried out all the same.
fn transport_failure(shard: ShardId, effect: Effect, s: &Status) -> HopError {
    let reason = format!("routing to the shard leader failed: {}: {}", s.code(), s.message());
    HopError::Failed(match effect {
        Effect::Read => ShardError::Unavailable { shard, reason },
        Effect::Write => ShardError::OutcomeUnknown { shard, reason },
    })
}

fn malformed_reply(shard: ShardId, effect: Effect, e: vow_core::DecodeError) -> ShardError {
    let reason = format!("the shard leader's reply is malformed: {e}");
    match effect {
        Effect::Read => ShardError::Unavailable { shard, reason },
        Effect::Write => ShardError::OutcomeUnknown { shard, reason },
    }
}

fn empty_reply(shard: ShardId, effect: Effect) -> ShardError {
    malformed_reply(shard, effect, vow_core::DecodeError::Invalid("empty reply"))
}

/// A receiver's refusal as the sender acts on it.
fn refused(shard: ShardId, effect: Effect, r: wire::Refusal) -> HopError {
    use wire::refusal::Reason;
    match r.reason {
        Some(Reason::NotLeader(n)) => {
            HopError::NotLeader((n.leader_id != 0 && !n.leader_peer_addr.is_empty()).then_some(Leader {
                id: NodeId(n.leader_id),
                node: VowNode { grpc_addr: n.leader_addr, peer_addr: n.leader_peer_addr },
                term: n.term,
            }))
        }
        Some(Reason::OutcomeUnknown(reason)) => HopError::Failed(ShardError::OutcomeUnknown { shard, reason }),
        Some(Reason::Unavailable(reason)) | Some(Reason::Invalid(reason)) => {
            HopError::Failed(ShardError::Unavailable { shard, reason })
        }
        None => HopError::Failed(empty_reply(shard, effect)),
    }
}

/// The time left before the caller's `grpc-timeout` passes, if it sent one.
pub fn deadline_of<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    // The gRPC spec allows at most 8 digits. More is not a deadline: passed on as one, it made
    // tonic panic re-encoding it for the forwarded call (found by tests/tests/hostile).
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
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
/// caller hears "outcome unknown" from us rather than a bare CANCELLED when it passes.
pub fn write_budget(deadline: Duration) -> Duration {
    let margin = (deadline / 10).clamp(Duration::from_millis(5), Duration::from_millis(100));
    deadline.saturating_sub(margin)
}

/// The receiving side of the internal `Route` RPC: runs a routed request on this node's
/// replica if it leads the shard, or refuses with the leader it knows. It never passes a
/// request on.
#[derive(Debug, Clone)]
pub struct RouteService {
    router: Router,
}

impl RouteService {
    pub fn new(router: Router) -> RouteService {
        RouteService { router }
    }

    /// The shard a routed request is for, after checking it was meant for this node and
    /// cluster.
    fn target(&self, target: Option<wire::Target>) -> Result<ShardId, wire::Refusal> {
        let t = target.ok_or_else(|| invalid("a routed request without a target"))?;
        let node = self.router.node();
        if t.node_id != node.id().0 {
            return Err(invalid(format!("request for node {} reached node {}", t.node_id, node.id())));
        }
        if t.cluster_name != node.cluster_name() {
            return Err(invalid(format!(
                "request from cluster {:?} reached cluster {:?}",
                t.cluster_name,
                node.cluster_name()
            )));
        }
        if t.shard_id >= self.router.shard_count() {
            return Err(invalid(format!("no shard {} (this node has {})", t.shard_id, self.router.shard_count())));
        }
        Ok(ShardId(t.shard_id))
    }

    /// The id's shard must be the one the request names: a node never reads or writes one
    /// shard's promise in another.
    fn check_owner(&self, shard: ShardId, id: &PromiseId) -> Result<(), wire::Refusal> {
        let owner = self.router.shard_of(id);
        if owner == shard {
            return Ok(());
        }
        Err(invalid(format!("promise {id} belongs to shard {owner}, not shard {shard}")))
    }
}

/// The limits a public request's command is checked against at the edge.
fn check_limits(limits: &vow_core::Limits, command: &Command) -> Result<(), vow_core::LimitError> {
    match command {
        Command::Create { id, param, tags, idempotency_key, .. } => {
            limits.check_id(id.as_str())?;
            limits.check_value("param", param)?;
            limits.check_tags(tags)?;
            limits.check_idempotency_key(idempotency_key)
        }
        Command::Settle { id, value, idempotency_key, .. } => {
            limits.check_id(id.as_str())?;
            limits.check_value("value", value)?;
            limits.check_idempotency_key(idempotency_key)
        }
        Command::Batch { commands } => commands.iter().try_for_each(|c| check_limits(limits, c)),
        Command::Register { continuation, .. } => continuation
            .sources
            .iter()
            .chain([&continuation.target])
            .try_for_each(|id| limits.check_id(id.as_str()).map(drop)),
        Command::Offer { target, outcome, .. } => {
            limits.check_id(target.as_str())?;
            limits.check_value("value", &outcome.value)
        }
        Command::Timeout { .. } | Command::Collect { .. } | Command::Complete { .. } => Ok(()),
    }
}

fn invalid(m: impl Into<String>) -> wire::Refusal {
    wire::Refusal { reason: Some(wire::refusal::Reason::Invalid(m.into())) }
}

#[tonic::async_trait]
impl wire::route_server::Route for RouteService {
    async fn write(&self, req: Request<wire::WriteRequest>) -> Result<Response<wire::WriteReply>, Status> {
        self.router.node().metrics().routed_served();
        use wire::write_reply::Result as R;
        let budget = deadline_of(&req).map(write_budget);
        let r = req.into_inner();
        let refuse = |refusal| Ok(Response::new(wire::WriteReply { result: Some(R::Refused(refusal)) }));
        let shard = match self.target(r.target) {
            Ok(s) => s,
            Err(refusal) => return refuse(refusal),
        };
        let command = match Command::decode(&r.command) {
            Ok(
                c @ (Command::Create { .. }
                | Command::Settle { .. }
                | Command::Batch { .. }
                | Command::Register { .. }
                | Command::Offer { .. }),
            ) => c,
            Ok(_) => return refuse(invalid("sweeper and executor commands are not routed")),
            Err(e) => return refuse(invalid(format!("malformed command: {e}"))),
        };
        for id in command.placement_ids() {
            if let Err(refusal) = self.check_owner(shard, id) {
                return refuse(refusal);
            }
        }
        // The sender validated it; checking again costs little and keeps anything that reaches
        // this port from putting an entry into the log that a public request could not.
        if let Err(e) = check_limits(self.router.node().limits(), &command) {
            return refuse(invalid(format!("command over a limit: {}", e.0)));
        }
        let attempt = self.router.local_write(shard, &command);
        let result = match budget {
            None => attempt.await,
            Some(budget) => tokio::time::timeout(budget, attempt).await.unwrap_or_else(|_| {
                Err(ShardError::OutcomeUnknown {
                    shard,
                    reason: "the call's deadline passed before the write's outcome was known".into(),
                })
            }),
        };
        let result = match result {
            Ok(outcome) => R::Outcome(outcome.encode()),
            Err(e) => R::Refused(self.router.refusal(e)),
        };
        Ok(Response::new(wire::WriteReply { result: Some(result) }))
    }

    async fn read(&self, req: Request<wire::ReadRequest>) -> Result<Response<wire::ReadReply>, Status> {
        self.router.node().metrics().routed_served();
        use wire::read_reply::Result as R;
        let r = req.into_inner();
        let refuse = |refusal| Ok(Response::new(wire::ReadReply { result: Some(R::Refused(refusal)) }));
        let shard = match self.target(r.target) {
            Ok(s) => s,
            Err(refusal) => return refuse(refusal),
        };
        let id = match self.router.node().limits().check_id(&r.id) {
            Ok(id) => id,
            Err(e) => return refuse(invalid(e.0)),
        };
        if let Err(refusal) = self.check_owner(shard, &id) {
            return refuse(refusal);
        }
        let result = match self.router.local_read(shard, &id).await {
            Ok(Some(p)) => R::Record(p.encode()),
            Ok(None) => R::NotFound(true),
            Err(e) => R::Refused(self.router.refusal(e)),
        };
        Ok(Response::new(wire::ReadReply { result: Some(result) }))
    }

    async fn read_continuation(
        &self,
        req: Request<wire::ReadContinuationRequest>,
    ) -> Result<Response<wire::ReadContinuationReply>, Status> {
        self.router.node().metrics().routed_served();
        use wire::read_continuation_reply::Result as R;
        let r = req.into_inner();
        let mut reply = wire::ReadContinuationReply::default();
        let shard = match self.target(r.target) {
            Ok(s) => s,
            Err(refusal) => {
                reply.result = Some(R::Refused(refusal));
                return Ok(Response::new(reply));
            }
        };
        reply.result = Some(match self.router.local_read_continuation(shard, &r.id).await {
            Ok(Some((record, progress))) => {
                reply.attempts = progress.attempts;
                reply.last_error = progress.last_error;
                reply.next_attempt_ms = progress.next_attempt_ms;
                R::Record(record.encode())
            }
            Ok(None) => R::NotFound(true),
            Err(e) => R::Refused(self.router.refusal(e)),
        });
        Ok(Response::new(reply))
    }

    async fn search(&self, req: Request<wire::SearchRequest>) -> Result<Response<wire::SearchReply>, Status> {
        self.router.node().metrics().routed_served();
        use wire::search_reply::Result as R;
        let r = req.into_inner();
        let refuse = |refusal| Ok(Response::new(wire::SearchReply { result: Some(R::Refused(refusal)) }));
        let shard = match self.target(r.target) {
            Ok(s) => s,
            Err(refusal) => return refuse(refusal),
        };
        let state = match r.state {
            0 => None,
            code => match u8::try_from(code).ok().map(State::from_code) {
                Some(Ok(s)) => Some(s),
                _ => return refuse(invalid(format!("unknown state code {code}"))),
            },
        };
        let query = SearchQuery {
            filter: SearchFilter { id_prefix: r.id_prefix, state, tags: r.tags.into_iter().collect() },
            after: r.has_after.then_some(r.after),
            limit: r.limit as usize,
            max_bytes: usize::try_from(r.max_bytes).unwrap_or(usize::MAX),
        };
        let result = match self.router.local_search(shard, query).await {
            Ok(page) => R::Page(wire::SearchPage {
                records: page.promises.iter().map(Promise::encode).collect(),
                has_next: page.next_after.is_some(),
                next_after: page.next_after.unwrap_or_default(),
            }),
            Err(e) => R::Refused(self.router.refusal(e)),
        };
        Ok(Response::new(wire::SearchReply { result: Some(result) }))
    }

    async fn membership(
        &self,
        req: Request<wire::MembershipRequest>,
    ) -> Result<Response<wire::MembershipReply>, Status> {
        use wire::membership_request::Change as C;
        self.router.node().metrics().routed_served();
        let r = req.into_inner();
        let refuse =
            |refusal| Ok(Response::new(wire::MembershipReply { refused: Some(refusal), failed: String::new() }));
        let shard = match self.target(r.target) {
            Ok(s) => s,
            Err(refusal) => return refuse(refusal),
        };
        let change = match r.change {
            Some(C::Add(a)) => Change::AddNode {
                id: NodeId(a.node_id),
                node: VowNode { grpc_addr: a.grpc_addr, peer_addr: a.peer_addr },
            },
            Some(C::RemoveNodeId(id)) => Change::RemoveNode(NodeId(id)),
            Some(C::TransferToNodeId(to)) => Change::TransferLeader(NodeId(to)),
            None => return refuse(invalid("a membership request without a change")),
        };
        let reply = match self.router.local_change(shard, change).await {
            Ok(Ok(())) => wire::MembershipReply::default(),
            Ok(Err(failed)) => wire::MembershipReply { refused: None, failed },
            Err(e) => wire::MembershipReply { refused: Some(self.router.refusal(e)), failed: String::new() },
        };
        Ok(Response::new(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(with("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        assert_eq!(with("99999999999H"), None, "more than 8 digits");
        assert_eq!(with("S"), None);
        assert_eq!(with("5q"), None);
        assert_eq!(deadline_of(&Request::new(())), None);
        assert_eq!(write_budget(Duration::from_secs(5)), Duration::from_millis(4900));
        assert_eq!(write_budget(Duration::from_millis(200)), Duration::from_millis(180));
        assert!(write_budget(Duration::from_millis(3)) < Duration::from_millis(3));
    }

    #[test]
    fn refusals_become_what_the_sender_acts_on() {
        use wire::refusal::Reason;
        let shard = ShardId(3);
        let not_leader = |id, addr: &str| wire::Refusal {
            reason: Some(Reason::NotLeader(wire::NotLeader {
                leader_id: id,
                leader_addr: addr.into(),
                term: 7,
                leader_peer_addr: if addr.is_empty() { String::new() } else { format!("{addr}01") },
            })),
        };
        match refused(shard, Effect::Write, not_leader(2, "b:1")) {
            HopError::NotLeader(Some(l)) => {
                let node = VowNode { grpc_addr: "b:1".into(), peer_addr: "b:101".into() };
                assert_eq!(l, Leader { id: NodeId(2), node, term: 7 })
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(refused(shard, Effect::Write, not_leader(0, "")), HopError::NotLeader(None)));
        assert!(matches!(refused(shard, Effect::Write, not_leader(2, "")), HopError::NotLeader(None)));
        let unknown = wire::Refusal { reason: Some(Reason::OutcomeUnknown("x".into())) };
        assert!(matches!(refused(shard, Effect::Write, unknown), HopError::Failed(ShardError::OutcomeUnknown { .. })));
        // A write whose reply is lost or unreadable may have happened; a read may be retried.
        assert!(matches!(
            refused(shard, Effect::Write, wire::Refusal { reason: None }),
            HopError::Failed(ShardError::OutcomeUnknown { .. })
        ));
        assert!(matches!(
            transport_failure(shard, Effect::Read, &Status::unavailable("gone")),
            HopError::Failed(ShardError::Unavailable { .. })
        ));
        assert!(matches!(
            transport_failure(shard, Effect::Write, &Status::internal("h2 protocol error")),
            HopError::Failed(ShardError::OutcomeUnknown { .. })
        ));
    }
}
