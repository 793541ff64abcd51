//! gRPC edge: the public `Promises` and `Cluster` services, the internal Raft and Route
//! services, health and reflection, on one listener. Handlers decode and validate, call the
//! promise service or the router, and encode; none of them forwards anything itself.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use vow_api::metadata as md;
use vow_api::v1 as pb;
use vow_api::v1::cluster_server::{Cluster, ClusterServer};
use vow_api::v1::promises_server::{Promises, PromisesServer};
use vow_core::{NodeId, PromiseId, SettleAs, ShardId};
use vow_storage::types::VowNode;

use crate::auth::{ApiGate, ApiTokens, Denial, Gate, GateLayer, Protocol};
use crate::conn::{self, ConnInfo};
use crate::convert::{self, shard_status};
use crate::functions::Functions;
use crate::node::{self, Node};
use crate::pipelines::Pipelines;
use crate::raft_service::RaftService;
use crate::router::{self, Change, ChangeError, RouteService, Router};
use crate::service::{self, Consistency};
use crate::tls::NodeTls;
use crate::tokens::{self, CompletionKeys, TokenError};
use crate::watch;
use crate::webhooks;

/// Webhooks one Create may register.
const MAX_WEBHOOKS: usize = 16;
const NO_KEYS_FOR_WEBHOOKS: &str =
    "this cluster has no keys to sign webhook deliveries with: start every node with --completion-keys-file";
use vow_storage::state_machine::SearchFilter;

/// Default and largest server-side wait of an Await.
pub const AWAIT_DEFAULT: Duration = Duration::from_secs(30);
pub const AWAIT_MAX: Duration = Duration::from_secs(300);
/// Search page size: default and cap.
const SEARCH_DEFAULT_LIMIT: usize = 100;
const SEARCH_MAX_LIMIT: usize = 1000;
/// Encoded bytes of records a Search page carries (at least one record, whatever its size): a
/// page of large records stays well under the 4 MiB a gRPC client accepts by default, and the
/// page token carries on.
pub const SEARCH_PAGE_BYTES: usize = 1 << 20;

/// Streams a connection may have reset by the peer before the server accepted them: a few per
/// shard for every connection's peer, which carries all of them.
const PENDING_RESET_STREAMS: usize = 1024;

/// Serves the public gRPC services — `Promises`, `Cluster`, health, reflection — on
/// `listener` until `shutdown` completes, every call through the API gate.
pub async fn serve_public(
    router: Router,
    promises_api: Arc<PromisesApi>,
    listener: TcpListener,
    security: &Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node = router.node().clone();
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
    let tls = security.tls.as_ref().map(|t| t.grpc_server.clone());
    let incoming = conn::incoming(conn::accept(listener, conn::Listener::Grpc, tls));
    // A public request is at most the largest command the configured limits allow; anything
    // larger is refused before it is buffered whole. Replies are bounded by the same limits (a
    // record) or by SEARCH_PAGE_BYTES (a page).
    let max_request = node.limits().max_command_bytes() + REQUEST_SLACK_BYTES;
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_max_pending_accept_reset_streams(Some(PENDING_RESET_STREAMS))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .timeout(CALL_TIMEOUT)
        .layer(GateLayer::new(ApiGate { tokens: security.tokens.clone(), protocol: Protocol::Grpc }))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            PromisesServer::from_arc(promises_api)
                .max_decoding_message_size(max_request)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            ClusterServer::new(ClusterApi { router: router.clone() }).max_decoding_message_size(REQUEST_SLACK_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Serves what nodes call on each other — Raft, routed requests (`Route`), and `AddNode` for a
/// node joining — on the peer listener until `shutdown` completes. With TLS only a certificate
/// of the cluster CA gets a connection, and the peer gate lets Raft and routing through only
/// for a member's certificate.
pub async fn serve_peer(
    router: Router,
    data_dir: PathBuf,
    listener: TcpListener,
    security: &Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node = router.node().clone();
    let raft = RaftService {
        node_id: node.id(),
        cluster_name: node.cluster_name().into(),
        shards: node.shards().into(),
        data_dir,
        clock: node.wall(),
        incarnations: node.incarnations().clone(),
    };
    let tls = security.tls.as_ref().map(|t| t.peer_server.clone());
    let gate = PeerGate { node: node.clone(), tls: tls.is_some() };
    let incoming = conn::incoming(conn::accept(listener, conn::Listener::Peer, tls));
    // A routed command is no larger than the public request it came from.
    let max_request = node.limits().max_command_bytes() + REQUEST_SLACK_BYTES;
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Each peer sends every shard's Raft traffic and routed requests over one connection.
        // Around a fault many of those calls are cancelled at once; past h2's default of 20
        // streams reset before they were accepted, the connection was torn down with
        // RESOURCE_EXHAUSTED, failing every shard's traffic with that peer (seen in vow-jepsen
        // runs with 8 shards).
        .http2_max_pending_accept_reset_streams(Some(PENDING_RESET_STREAMS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .timeout(CALL_TIMEOUT)
        .layer(GateLayer::new(gate))
        .add_service(
            ClusterServer::new(ClusterApi { router: router.clone() }).max_decoding_message_size(REQUEST_SLACK_BYTES),
        )
        .add_service(
            vow_api::route::route_server::RouteServer::new(RouteService::new(router))
                .max_decoding_message_size(max_request)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            vow_api::raft::raft_server::RaftServer::new(raft)
                .max_decoding_message_size(vow_storage::types::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(vow_storage::types::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// TLS and API tokens of a node's listeners (both optional: `vowd --dev` has neither).
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub tls: Option<NodeTls>,
    pub tokens: Option<ApiTokens>,
}

/// The peer listener's gate: it serves Raft, routing and joining, nothing else, and with TLS
/// only to a certificate that names a member — or, for a node not yet part of any cluster
/// (it has shards no member set has reached), to any certificate of the cluster CA, since the
/// leader adding it must reach it before it knows who the members are.
struct PeerGate {
    node: Node,
    tls: bool,
}

const JOIN_PATH: &str = "/vow.v1.Cluster/AddNode";

impl Gate for PeerGate {
    fn check(&self, req: &http::request::Parts) -> Result<(), Denial> {
        let path = req.uri.path();
        let join = path == JOIN_PATH;
        if !(join || path.starts_with("/vow.raft.v1.Raft/") || path.starts_with("/vow.route.v1.Route/")) {
            return Err(Denial::PermissionDenied(format!(
                "{path} is not served on the peer port: it serves only Raft, routing and joining"
            )));
        }
        if !self.tls || join {
            // Joining: the handler checks the certificate names the node being added.
            return Ok(());
        }
        let identity = req.extensions.get::<ConnInfo>().and_then(|c| c.identity.clone());
        let Some(identity) = identity else {
            return Err(Denial::Unauthenticated("the peer port needs a certificate of the cluster CA".into()));
        };
        if node::knows_peer(&self.node, &identity) {
            Ok(())
        } else {
            Err(Denial::PermissionDenied("the certificate does not name a member of this cluster".into()))
        }
    }
}

/// Streams one client connection may have open at once on the public port: enough for a client
/// multiplexing many calls, few enough that one connection cannot hold unbounded server state.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// How often a node pings an HTTP/2 client (or peer) that has been quiet, and how long it waits
/// for the answer before closing the connection: a client that is gone, or one that holds a
/// connection open without speaking HTTP/2, is dropped within a minute.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest header block (gRPC metadata) a request may carry: tokens and tracing headers
/// fit many times over; h2's default (16 MiB per stream) would let a connection pin gigabytes.
const MAX_HEADER_LIST_BYTES: u32 = 64 << 10;

/// The longest any call may take on the gRPC and peer ports: the longest Await, plus slack for
/// a routed one. A client that opens a stream and sends its request a byte at a time holds the
/// stream that long at most. (Watch streams run on: the limit ends at the reply's headers.)
const CALL_TIMEOUT: Duration = Duration::from_secs(AWAIT_MAX.as_secs() + 30);

/// Room beyond the largest command for the rest of a request (field tags, the id prefix of a
/// search, a membership request).
const REQUEST_SLACK_BYTES: usize = 64 << 10;

/// The public `Promises` service: decodes and validates, calls [`service::Promises`], encodes.
/// The HTTP gateway ([`crate::gateway`]) calls the same methods, so both protocols share one
/// behaviour.
#[derive(Debug)]
pub struct PromisesApi {
    promises: service::Promises,
    pipelines: Pipelines,
    keys: CompletionKeys,
    /// How long settled promises are kept: a watch cannot resume from before it.
    retention: Duration,
    /// The cluster checks API tokens (`--auth-file`): a bearer credential on a settle that is
    /// not a completion token is an API token the gate already accepted. Without them, any
    /// bearer credential on a settle is taken for a completion token and must verify as one.
    api_tokens: bool,
}

impl PromisesApi {
    pub fn new(
        router: Router,
        functions: Functions,
        keys: CompletionKeys,
        retention: Duration,
        api_tokens: bool,
    ) -> PromisesApi {
        PromisesApi {
            promises: service::Promises::new(router.clone()),
            pipelines: Pipelines::new(router, functions),
            keys,
            retention,
            api_tokens,
        }
    }

    fn node(&self) -> &Node {
        self.promises.router().node()
    }

    /// Tells a client that reached this node for a shard led elsewhere where the leader is, so
    /// its next call goes there directly.
    fn hinted<T>(&self, mut reply: Response<T>, shard: ShardId) -> Response<T> {
        let router = self.promises.router();
        if !router.leads(shard)
            && let Some(leader) = router.leader(shard).filter(|l| l.id != self.node().id())
            && let Ok(v) = leader.node.grpc_addr.parse()
        {
            reply.metadata_mut().insert(md::LEADER_ADDR, v);
        }
        reply
    }

    async fn write<T>(
        &self,
        method: &'static str,
        req: &Request<T>,
        command: vow_core::Command,
    ) -> Result<Response<pb::PromiseResponse>, Status> {
        let started = Instant::now();
        let shard = self.promises.router().shard_of_command(&command).map_err(|e| shard_status(&e))?;
        let budget = router::deadline_of(req).map(router::write_budget);
        let result = match self.promises.write(command, budget).await {
            Ok(outcome) => {
                unbatch(outcome).and_then(convert::outcome_reply).map(|r| self.hinted(Response::new(r), shard))
            }
            Err(e) => Err(shard_status(&e)),
        };
        self.node().metrics().record(method, &result, started.elapsed());
        result
    }

    async fn settle(
        &self,
        method: &'static str,
        req: Request<pb::SettleRequest>,
        settle_as: SettleAs,
    ) -> Result<Response<pb::PromiseResponse>, Status> {
        let command = convert::settle_command(self.node().limits(), req.get_ref().clone(), settle_as)?;
        if let vow_core::Command::Settle { id, .. } = &command {
            self.check_completion_token(&req, id, settle_as)?;
        }
        self.write(method, &req, command).await
    }

    /// A settle that presents a completion token (`authorization: Bearer vct1...`) goes ahead
    /// only if the token allows this operation on this promise now. An API token, or no
    /// credential, is not checked here: who may write at all is the gate's business
    /// (`auth.rs`), which let this request through.
    fn check_completion_token<T>(&self, req: &Request<T>, id: &PromiseId, settle_as: SettleAs) -> Result<(), Status> {
        let Some(auth) = req.metadata().get("authorization") else { return Ok(()) };
        let token = auth
            .to_str()
            .ok()
            .and_then(crate::auth::bearer_token)
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        if self.api_tokens && !crate::auth::is_completion_token(token) {
            return Ok(());
        }
        self.keys.verify(token, id, settle_as.into(), self.node().wall_ms()).map_err(|e| match e {
            TokenError::NoKeys => Status::permission_denied(format!("{e}: the token cannot be checked")),
            e => Status::permission_denied(format!("{e}; nothing was settled")),
        })
    }

    /// The webhooks a Create registers with its promise, checked before anything is written.
    fn subscriptions(&self, r: &pb::CreateRequest) -> Result<Vec<vow_core::pipeline::Continuation>, Status> {
        if r.webhooks.is_empty() {
            return Ok(Vec::new());
        }
        if r.webhooks.len() > MAX_WEBHOOKS {
            return Err(Status::invalid_argument(format!("at most {MAX_WEBHOOKS} webhooks per create")));
        }
        if !self.keys.configured() {
            return Err(Status::failed_precondition(NO_KEYS_FOR_WEBHOOKS));
        }
        let id = self.node().limits().check_id(&r.id).map_err(|e| Status::invalid_argument(e.0))?;
        let mut out: Vec<vow_core::pipeline::Continuation> = Vec::new();
        for w in &r.webhooks {
            let c = webhooks::subscription(self.node().limits(), &id, &w.url, w.headers.clone().into_iter().collect())
                .map_err(Status::invalid_argument)?;
            if !out.iter().any(|o| o.id == c.id) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// What a Create asks its completion token to allow, checked before anything is written.
    fn token_request(&self, r: &pb::CreateRequest) -> Result<Option<(Vec<tokens::Operation>, Duration)>, Status> {
        if r.completion_token_ttl_ms == 0 {
            if !r.completion_token_operations.is_empty() {
                return Err(Status::invalid_argument(
                    "completion_token_operations needs completion_token_ttl_ms (the token's lifetime)",
                ));
            }
            return Ok(None);
        }
        let ttl = Duration::from_millis(u64::from(r.completion_token_ttl_ms));
        if ttl > tokens::MAX_TTL {
            return Err(Status::invalid_argument(format!(
                "completion_token_ttl_ms is over the {} s a token may live",
                tokens::MAX_TTL.as_secs()
            )));
        }
        if !self.keys.configured() {
            return Err(Status::failed_precondition(
                "this cluster has no completion-token keys: start every node with --completion-keys-file",
            ));
        }
        let mut ops = Vec::new();
        for op in &r.completion_token_operations {
            let op = match pb::Operation::try_from(*op) {
                Ok(pb::Operation::Resolve) => tokens::Operation::Resolve,
                Ok(pb::Operation::Reject) => tokens::Operation::Reject,
                Ok(pb::Operation::Cancel) => tokens::Operation::Cancel,
                _ => return Err(Status::invalid_argument(format!("unknown completion token operation {op}"))),
            };
            if !ops.contains(&op) {
                ops.push(op);
            }
        }
        if ops.is_empty() {
            ops = vec![tokens::Operation::Resolve, tokens::Operation::Reject];
        }
        Ok(Some((ops, ttl)))
    }
}

fn watch_status(e: &watch::WatchError) -> Status {
    match e {
        watch::WatchError::Invalid(m) => Status::invalid_argument(m.clone()),
        watch::WatchError::TooOld => Status::failed_precondition(e.to_string()),
        watch::WatchError::Storage { .. } => Status::unavailable(e.to_string()),
    }
}

/// A Create sent with its webhooks is a batch of the create and their registrations, applied
/// whole or not at all; its answer is the create's.
fn unbatch(outcome: vow_core::Outcome) -> Result<vow_core::Outcome, Status> {
    let vow_core::Outcome::Batch { mut outcomes, applied } = outcome else { return Ok(outcome) };
    if outcomes.is_empty() {
        return Err(Status::internal("an empty batch"));
    }
    let first = outcomes.remove(0);
    if !applied && !first.is_failure() {
        let why = outcomes.iter().find(|o| o.is_failure());
        return Err(Status::aborted(format!("a webhook could not be registered ({why:?}); nothing was written")));
    }
    Ok(first)
}

fn record_reply(id: &PromiseId, record: Option<vow_core::Promise>) -> Result<pb::PromiseResponse, Status> {
    match record {
        Some(p) => Ok(pb::PromiseResponse { promise: Some(convert::promise_to_pb(p)), ..Default::default() }),
        None => Err(Status::not_found(format!("no promise {id}"))),
    }
}

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

type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::WatchEvent, Status>>;

#[tonic::async_trait]
impl Promises for PromisesApi {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.into_inner();
        let limits = self.node().limits();
        if r.ids.len() > watch::MAX_IDS {
            return Err(Status::invalid_argument(format!("at most {} ids per watch", watch::MAX_IDS)));
        }
        let ids = r
            .ids
            .iter()
            .map(|id| limits.check_id(id).map_err(|e| Status::invalid_argument(e.0)))
            .collect::<Result<_, _>>()?;
        limits.check_id_prefix(&r.id_prefix).map_err(|e| Status::invalid_argument(e.0))?;
        let shards = self.promises.router().shard_count();
        let from = match r.resume_token.as_str() {
            "" => None,
            t => Some(watch::ResumeToken::decode(t, shards).map_err(Status::invalid_argument)?),
        };
        let filter = watch::Filter { ids, prefix: r.id_prefix };
        let mut events = watch::start(self.node().shards().into(), filter, from, self.retention)
            .await
            .map_err(|e| watch_status(&e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let event = event
                    .map(|e| pb::WatchEvent {
                        promise: e.promise.map(convert::promise_to_pb),
                        resume_token: e.resume_token,
                    })
                    .map_err(|e| watch_status(&e));
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn create(&self, req: Request<pb::CreateRequest>) -> Result<Response<pb::PromiseResponse>, Status> {
        let token = self.token_request(req.get_ref())?;
        let command = convert::create_command(self.node().limits(), req.get_ref().clone(), self.node().wall_ms())?;
        let subscriptions = self.subscriptions(req.get_ref())?;
        let subscription_ids: Vec<String> = subscriptions.iter().map(|c| c.id.clone()).collect();
        let command = if subscriptions.is_empty() {
            command
        } else {
            let registers = subscriptions
                .into_iter()
                .map(|continuation| vow_core::Command::Register { continuation, target_deadline_ms: i64::MAX });
            vow_core::Command::Batch { commands: std::iter::once(command).chain(registers).collect() }
        };
        let mut reply = self.write("create", &req, command).await?;
        reply.get_mut().subscription_ids = subscription_ids;
        if let Some((ops, ttl)) = token {
            let id = self.node().limits().check_id(&req.get_ref().id).map_err(|e| Status::invalid_argument(e.0))?;
            let expires_ms = self.node().wall_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
            // The promise exists now; a token that cannot be made is the only thing missing, and
            // a retry with the same idempotency key asks again.
            reply.get_mut().completion_token = self.keys.issue(&id, &ops, expires_ms).map_err(|e| {
                Status::unavailable(format!("the promise was created but {e}; retry with the same idempotency key"))
            })?;
        }
        Ok(reply)
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::PromiseResponse>, Status> {
        let started = Instant::now();
        let r = req.get_ref();
        let id = self.node().limits().check_id(&r.id).map_err(|e| Status::invalid_argument(e.0))?;
        let consistency = match pb::Consistency::try_from(r.consistency) {
            Ok(pb::Consistency::Stale) => Consistency::Stale,
            Ok(pb::Consistency::Linearizable) => Consistency::Linearizable,
            Err(_) => return Err(Status::invalid_argument(format!("unknown consistency {}", r.consistency))),
        };
        let shard = self.promises.router().shard_of(&id);
        let result = match self.promises.get(&id, consistency).await {
            Ok(record) => record_reply(&id, record).map(|r| match consistency {
                Consistency::Linearizable => self.hinted(Response::new(r), shard),
                Consistency::Stale => Response::new(r),
            }),
            Err(e) => Err(shard_status(&e)),
        };
        self.node().metrics().record("get", &result, started.elapsed());
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
        let id = self.node().limits().check_id(&r.id).map_err(|e| Status::invalid_argument(e.0))?;
        let wait = match r.wait_timeout_ms {
            0 => AWAIT_DEFAULT,
            ms => Duration::from_millis(u64::from(ms)).min(AWAIT_MAX),
        };
        let result = match self.promises.await_settled(&id, wait).await {
            Ok(record) => record_reply(&id, record).map(Response::new),
            Err(e) => Err(shard_status(&e)),
        };
        self.node().metrics().record("await", &result, started.elapsed());
        result
    }

    async fn submit(&self, req: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let wait_for = match r.wait_for.as_str() {
            "" => None,
            id => Some(self.node().limits().check_id(id).map_err(|e| Status::invalid_argument(e.0))?),
        };
        let wait = match r.wait_timeout_ms {
            0 => AWAIT_DEFAULT,
            ms => Duration::from_millis(u64::from(ms)).min(AWAIT_MAX),
        };
        let submission = convert::submission_from_pb(self.node().limits(), r, self.node().wall_ms())?;
        let result = async {
            let created = self.pipelines.submit(submission).await.map_err(|e| convert::submit_error_status(&e))?;
            let waited = match wait_for {
                None => None,
                Some(id) => match self.promises.await_settled(&id, wait).await {
                    Ok(Some(p)) => Some(convert::promise_to_pb(p)),
                    Ok(None) => return Err(Status::not_found(format!("no promise {id} to wait for"))),
                    Err(e) => return Err(shard_status(&e)),
                },
            };
            Ok(Response::new(pb::SubmitResponse {
                promises: created.into_iter().map(convert::promise_to_pb).collect(),
                waited,
            }))
        }
        .await;
        self.node().metrics().record("submit", &result, started.elapsed());
        result
    }

    async fn get_continuation(
        &self,
        req: Request<pb::GetContinuationRequest>,
    ) -> Result<Response<pb::ContinuationStatus>, Status> {
        let id = req.into_inner().id;
        if id.is_empty() || id.len() > 2 * vow_core::pipeline::MAX_CONTINUATION_ID_BYTES {
            return Err(Status::invalid_argument("a continuation id is 1 to 256 bytes"));
        }
        match self.pipelines.get(&id).await {
            Ok(Some(found)) => Ok(Response::new(convert::continuation_status_to_pb(found))),
            Ok(None) => Err(Status::not_found(format!("no continuation {id}"))),
            Err(e) => Err(shard_status(&e)),
        }
    }

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Result<Response<pb::SubscribeResponse>, Status> {
        let started = Instant::now();
        let budget = router::deadline_of(&req).map(router::write_budget);
        let r = req.into_inner();
        let id = self.node().limits().check_id(&r.id).map_err(|e| Status::invalid_argument(e.0))?;
        if !self.keys.configured() {
            return Err(Status::failed_precondition(NO_KEYS_FOR_WEBHOOKS));
        }
        let continuation = webhooks::subscription(self.node().limits(), &id, &r.url, r.headers.into_iter().collect())
            .map_err(Status::invalid_argument)?;
        let subscription_id = continuation.id.clone();
        // A subscription's retries are bounded from its promise's settlement, not a deadline.
        let command = vow_core::Command::Register { continuation, target_deadline_ms: i64::MAX };
        let result = match self.promises.write(command, budget).await {
            Ok(vow_core::Outcome::Registered { .. }) => Ok(Response::new(pb::SubscribeResponse { subscription_id })),
            Ok(vow_core::Outcome::NotFound) => Err(Status::not_found(format!("no promise {id}"))),
            Ok(other) => Err(Status::internal(format!("unexpected answer to a subscription: {other:?}"))),
            Err(e) => Err(shard_status(&e)),
        };
        self.node().metrics().record("subscribe", &result, started.elapsed());
        result
    }

    async fn search(&self, req: Request<pb::SearchRequest>) -> Result<Response<pb::SearchResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        self.node().limits().check_id_prefix(&r.id_prefix).map_err(|e| Status::invalid_argument(e.0))?;
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
        let result = match self.promises.search(filter, after, limit, SEARCH_PAGE_BYTES).await {
            Ok(page) => Ok(Response::new(pb::SearchResponse {
                promises: page.promises.into_iter().map(convert::promise_to_pb).collect(),
                next_page_token: page.next_after.as_deref().map(encode_token).unwrap_or_default(),
            })),
            Err(e) => Err(shard_status(&e)),
        };
        self.node().metrics().record("search", &result, started.elapsed());
        result
    }
}

/// The public `Cluster` service: status, placement, membership. Membership changes go to each
/// shard's leader through the router.
#[derive(Debug)]
pub struct ClusterApi {
    router: Router,
}

impl ClusterApi {
    fn node(&self) -> &Node {
        self.router.node()
    }

    async fn status(&self) -> pb::StatusResponse {
        let node = self.node();
        let members = node::members(node);
        let mut nodes = Vec::new();
        for (id, member) in members {
            let reachable = id == node.id() || reachable(&member.grpc_addr).await;
            nodes.push(pb::NodeStatus {
                node_id: id.0,
                grpc_addr: member.grpc_addr,
                reachable,
                peer_addr: member.peer_addr,
            });
        }
        let shards = node.shards().iter().map(convert::shard_to_pb).collect();
        pb::StatusResponse { nodes, shards, node_id: node.id().0 }
    }

    /// Makes `change` on each named shard (all when none are named). The shards are
    /// independent groups, so their changes run at once: adding a node waits for it to catch up
    /// on every shard, which one after another took ~12 s for 8 shards.
    async fn change(
        &self,
        shard_ids: &[u32],
        change: impl Fn() -> Change,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let count = self.router.shard_count();
        if let Some(bad) = shard_ids.iter().find(|s| **s >= count) {
            return Err(Status::invalid_argument(format!(
                "no shard {bad}: this cluster has shards 0 to {}",
                count - 1
            )));
        }
        // Each shard's change runs to its end in a task of its own: dropped halfway (by the
        // first other shard's error, or a caller gone away), a change between openraft's two
        // membership steps would leave its shard in a joint configuration.
        let changes = node::shard_ids(self.node(), shard_ids).into_iter().map(|shard| {
            let (router, change) = (self.router.clone(), change());
            tokio::spawn(async move { router.change(shard, change).await })
        });
        for done in futures::future::join_all(changes).await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(ChangeError::Shard(e))) => return Err(shard_status(&e)),
                Ok(Err(ChangeError::Refused(m))) => return Err(Status::failed_precondition(m)),
                Err(e) => return Err(Status::internal(format!("a membership change failed: {e}"))),
            }
        }
        Ok(Response::new(self.status().await))
    }

    fn shard_leader(&self, shard: ShardId) -> pb::ShardLeader {
        let leader = self.router.leader(shard);
        pb::ShardLeader {
            shard_id: shard.0,
            leader_id: leader.as_ref().map_or(0, |l| l.id.0),
            leader_grpc_addr: leader.map(|l| l.node.grpc_addr).unwrap_or_default(),
        }
    }
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
        // A node joining over the peer port proves who it is with its certificate: it may add
        // itself, no other node.
        let joining = req.extensions().get::<ConnInfo>().filter(|c| c.listener == conn::Listener::Peer).cloned();
        let r = req.into_inner();
        if r.node_id == 0 || r.grpc_addr.is_empty() {
            return Err(Status::invalid_argument("add-node needs a positive node_id and a grpc_addr"));
        }
        let peer_addr = if r.peer_addr.is_empty() {
            crate::config::default_peer_addr(&r.grpc_addr)
                .map_err(|e| Status::invalid_argument(format!("add-node: {e}; give its peer_addr")))?
        } else {
            r.peer_addr.clone()
        };
        if let Some(identity) = joining.and_then(|c| c.identity)
            && !identity.is(r.node_id, &peer_addr)
        {
            return Err(Status::permission_denied(format!(
                "the certificate presented does not name node {} at {peer_addr}: a node may add only itself",
                r.node_id
            )));
        }
        let shards = self.router.shard_count();
        if r.shard_count != 0 && r.shard_count != shards {
            return Err(Status::failed_precondition(format!(
                "node {} runs {} shards but this cluster has {shards}; start it with --shards {shards}",
                r.node_id, r.shard_count
            )));
        }
        let (id, member) = (NodeId(r.node_id), VowNode { grpc_addr: r.grpc_addr, peer_addr });
        self.change(&r.shard_ids, || Change::AddNode { id, node: member.clone() }).await
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let r = req.into_inner();
        self.change(&r.shard_ids, || Change::RemoveNode(NodeId(r.node_id))).await
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let r = req.into_inner();
        self.change(&r.shard_ids, || Change::TransferLeader(NodeId(r.to_node_id))).await
    }

    async fn locate(&self, req: Request<pb::LocateRequest>) -> Result<Response<pb::LocateResponse>, Status> {
        let id = self.node().limits().check_id(&req.get_ref().id).map_err(|e| Status::invalid_argument(e.0))?;
        let leader = self.shard_leader(self.router.shard_of(&id));
        Ok(Response::new(pb::LocateResponse {
            shard_id: leader.shard_id,
            leader_id: leader.leader_id,
            leader_grpc_addr: leader.leader_grpc_addr,
        }))
    }

    async fn shard_map(&self, _req: Request<pb::ShardMapRequest>) -> Result<Response<pb::ShardMapResponse>, Status> {
        let shards = self.router.shard_count();
        let leaders = (0..shards).map(|s| self.shard_leader(ShardId(s))).collect();
        Ok(Response::new(pb::ShardMapResponse { shards, leaders }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
