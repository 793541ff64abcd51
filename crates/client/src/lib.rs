//! The Rust client for vow.
//!
//! [`Client`] talks to a cluster through any of several endpoints. Every call has a deadline;
//! within it the client retries what is safe to retry: "not the leader" (following the leader
//! hint), unreachable nodes (trying the next endpoint), and writes whose outcome is unknown —
//! always with the same idempotency key, which the client generates when the caller gives none,
//! so a retried create or settle takes effect at most once.
//!
//! A call about one promise goes straight to the leader of the promise's shard: the client
//! caches the cluster's shard map (`Cluster.ShardMap`), computes the shard with vow-core's
//! placement hash, and corrects the cache from leader hints (`routing.rs` has the rules). Without
//! a map (an older server, no node reachable yet) it goes round its endpoints as before.
//!
//! [`Client::watch`] gives a [`Watch`] stream of settlements that resumes by itself on another
//! node after a loss; [`webhook`] checks the signature of a webhook delivery (the one definition
//! of the scheme, which the server signs with); [`Client::settle_with_token`] presents a
//! completion token.
//!
//! The message types are the generated ones of `proto/vow/v1/vow.proto`, re-exported as [`pb`].
//! Calls travel over [`transport::H2Channel`], one HTTP/2 connection per endpoint driven by the
//! `h2` crate. This crate depends on the API definitions, tonic, h2 and HMAC only; it never pulls
//! in RocksDB or server code.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use prost::Message;
use tokio::time::Instant;
use tonic::{Code, Status};
use transport::H2Channel;
use vow_api::metadata as md;
pub use vow_api::v1 as pb;
use vow_api::v1::cluster_client::ClusterClient;
use vow_api::v1::promises_client::PromisesClient;
use vow_core::ShardId;

use crate::routing::{Choice, Endpoints, MapFetch};

mod routing;
pub mod tls;
pub mod transport;
mod watch;
pub mod webhook;

pub use watch::Watch;

/// What went wrong, in the terms a caller acts on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Create on an existing id with another idempotency key; `current` is the record.
    #[error("already exists: {message}")]
    AlreadyExists { message: String, current: Option<Box<pb::Promise>> },
    /// Settle on a promise that is already settled another way; `current` is the record.
    #[error("already settled: {message}")]
    AlreadySettled { message: String, current: Option<Box<pb::Promise>> },
    /// The cluster cannot do this as it is set up (no keys to sign completion tokens or webhooks
    /// with, another shard count, a node refused for losing its state); nothing was done.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The request breaks a limit (named in the message) or is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The caller's credential (an API token's role, a completion token) does not allow the
    /// call; nothing was done.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The cluster needs an API token and got none it knows (`Options::token`); nothing was done.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The cluster could not serve the call before its deadline. When `outcome_unknown` is set,
    /// a write may have taken effect: retry it with the same idempotency key to find out.
    #[error("unavailable{}: {message}", if *outcome_unknown { " (outcome unknown)" } else { "" })]
    Unavailable { message: String, outcome_unknown: bool },
    /// A bad endpoint or another client-side problem.
    #[error("{0}")]
    Client(String),
    #[error("{code}: {message}")]
    Other { code: String, message: String },
}

impl Error {
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::Unavailable { outcome_unknown: true, .. })
    }

    fn from_status(s: &Status, outcome_unknown: bool) -> Error {
        let current = || {
            let bytes = s.metadata().get_bin(md::CURRENT_BIN)?.to_bytes().ok()?;
            pb::Promise::decode(bytes.as_ref()).ok().map(Box::new)
        };
        let message = s.message().to_owned();
        match s.code() {
            Code::AlreadyExists => Error::AlreadyExists { message, current: current() },
            // A settle conflict carries the settled record; any other refusal is about the cluster.
            Code::FailedPrecondition => match current() {
                Some(current) => Error::AlreadySettled { message, current: Some(current) },
                None => Error::FailedPrecondition(message),
            },
            Code::NotFound => Error::NotFound(message),
            Code::InvalidArgument => Error::InvalidArgument(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
                Error::Unavailable { message: format!("{}: {message}", s.code()), outcome_unknown }
            }
            code => Error::Other { code: format!("{code:?}"), message },
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Client settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Total time a call may take, retries included (an Await gets its wait on top; a
    /// membership change's single attempt may run up to a minute longer, but it is not retried
    /// past this).
    pub call_timeout: Duration,
    /// Time one attempt may take (an Await attempt gets its wait on top).
    pub attempt_timeout: Duration,
    /// Move to the leader when a node says where it is (on redirects and forwarded replies),
    /// and send calls about a promise to its shard's leader by the cached shard map. Off for a
    /// client that must talk only to the endpoints it was given.
    pub follow_leader_hints: bool,
    /// TLS to the nodes (`None`: plain text, as `vowd --dev` and `vow dev up` serve).
    pub tls: Option<tls::ClientTls>,
    /// The API token sent with every call (README "Security"); a settle with a completion
    /// token sends that one instead.
    pub token: Option<tls::Token>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            call_timeout: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(5),
            follow_leader_hints: true,
            tls: None,
            token: None,
        }
    }
}

/// A handle on a cluster. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct Client {
    endpoints: Arc<Mutex<Endpoints>>,
    options: Options,
}

/// What a call is about, which decides where its first attempt goes.
#[derive(Debug, Clone, Copy)]
enum Route<'a> {
    /// Any node serves it (search, status, membership): the endpoint rotation.
    Any,
    /// One promise: its shard's leader by the cached map, when there is one.
    Promise(&'a str),
}

/// How long one node may take to answer a shard-map fetch (at most the attempt timeout).
const MAP_FETCH_TIMEOUT: Duration = Duration::from_secs(1);

fn normalize(addr: &str) -> String {
    addr.trim().trim_start_matches("http://").trim_end_matches('/').to_owned()
}

/// Backoff between attempts: 25 ms doubling to 1 s, with jitter so clients spread out.
fn backoff(attempt: u32) -> Duration {
    let base = 25u64.saturating_mul(1 << attempt.min(6)).min(1000);
    Duration::from_millis(base / 2 + rand::random::<u64>() % (base / 2 + 1))
}

/// The generated clients on `channel`. A reply is bounded by the server's own limits (one
/// record, or a Search page bounded by bytes), not by tonic's 4 MiB default, which a node with
/// a larger `--max-data-bytes` would exceed with a committed write's reply.
fn promises(channel: H2Channel) -> PromisesClient<H2Channel> {
    PromisesClient::new(channel).max_decoding_message_size(usize::MAX)
}

fn cluster(channel: H2Channel) -> ClusterClient<H2Channel> {
    ClusterClient::new(channel).max_decoding_message_size(usize::MAX)
}

/// A fresh idempotency key for a call whose caller gave none.
fn generated_key() -> String {
    format!("vow-client-{:032x}", rand::random::<u128>())
}

impl Client {
    /// A client for the cluster reachable at any of `endpoints` (`host:port`). Connections are
    /// made lazily, so this fails only for malformed addresses. Call it inside a tokio runtime.
    pub fn connect<S: AsRef<str>>(endpoints: &[S]) -> Result<Client> {
        Self::with_options(endpoints, Options::default())
    }

    pub fn with_options<S: AsRef<str>>(endpoints: &[S], options: Options) -> Result<Client> {
        let addrs: Vec<String> = endpoints.iter().map(|e| normalize(e.as_ref())).filter(|e| !e.is_empty()).collect();
        if addrs.is_empty() {
            return Err(Error::Client("no endpoints given".into()));
        }
        let security = transport::Security { tls: options.tls.clone(), token: options.token.clone() };
        let endpoints = Endpoints::new(addrs, security).map_err(Error::Client)?;
        Ok(Client { endpoints: Arc::new(Mutex::new(endpoints)), options })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Endpoints> {
        lock(&self.endpoints)
    }

    /// The shard of a call about a promise, by the cached map (`None` without one, or when the
    /// client must keep to its endpoints). A missing map, or a shard without a known leader,
    /// starts a fetch in the background: the call itself never waits for the map.
    fn shard_of(&self, route: Route<'_>) -> Option<ShardId> {
        let Route::Promise(id) = route else { return None };
        if !self.options.follow_leader_hints {
            return None;
        }
        let mut e = self.lock();
        let shard = e.shard_of(id);
        if e.map_looks_stale(shard) {
            self.refresh_map(&mut e);
        }
        shard
    }

    /// Fetches the shard map in the background, if [`Endpoints::start_refresh`] allows one now.
    fn refresh_map(&self, e: &mut Endpoints) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let Some(fetch) = e.start_refresh(Instant::now()) else { return };
        let timeout = self.options.attempt_timeout.min(MAP_FETCH_TIMEOUT);
        runtime.spawn(fetch_map(Arc::clone(&self.endpoints), fetch, timeout));
    }

    /// Follows a leader hint: prefer that address, adding it if it is a member we did not know,
    /// and record it as the leader of the call's `shard`.
    fn follow_hint(&self, metadata: &tonic::metadata::MetadataMap, shard: Option<ShardId>) -> bool {
        let Some(addr) = metadata.get(md::LEADER_ADDR).and_then(|v| v.to_str().ok()).map(normalize) else {
            return false;
        };
        self.lock().follow_hint(&addr, shard, Instant::now())
    }

    /// Runs `op` with retries until it succeeds, fails for good, or the call deadline passes.
    /// `route` decides only where each attempt goes.
    async fn call<T, F, Fut>(&self, effect: Effect, patience: Patience, route: Route<'_>, mut op: F) -> Result<T>
    where
        F: FnMut(H2Channel, Duration) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let (extra_attempt_time, extra_retry_time) = match patience {
            Patience::Default => (Duration::ZERO, Duration::ZERO),
            Patience::LongAttempt(d) => (d, Duration::ZERO),
            Patience::LongCall(d) => (d, d),
        };
        // No attempt runs past `deadline`; no new attempt starts after `retry_until`.
        let deadline = start + self.options.call_timeout + extra_attempt_time;
        let retry_until = start + self.options.call_timeout + extra_retry_time;
        let mut attempt = 0u32;
        let mut rotate = 0u32;
        let mut outcome_unknown = false;
        loop {
            // The map may arrive or change during the call: look it up for every attempt.
            let shard = self.shard_of(route);
            let (Choice { index, routed }, channel) = {
                let e = self.lock();
                let choice = e.choose(shard, rotate);
                (choice, e.channel(choice.index))
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let per_attempt = (self.options.attempt_timeout + extra_attempt_time).min(left);
            let result = tokio::time::timeout(per_attempt, op(channel, per_attempt)).await;
            let status = match result {
                Ok(Ok(v)) => {
                    // A node that forwarded the call to the leader says so: go there next time.
                    if !(self.options.follow_leader_hints && self.follow_hint(v.metadata(), shard)) {
                        self.lock().answered(index);
                    } else {
                        self.lock().reached(index);
                    }
                    return Ok(v.into_inner());
                }
                Ok(Err(s)) => s,
                Err(_) => Status::deadline_exceeded("attempt timed out"),
            };
            let retryable =
                matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled);
            // A failed attempt of a write may still have happened; remember it for the final error.
            outcome_unknown |= status.metadata().contains_key(md::OUTCOME_UNKNOWN)
                || matches!(status.code(), Code::DeadlineExceeded | Code::Unknown | Code::Cancelled);
            if !retryable {
                // See `Effect`: after an attempt that may have happened, only these refusals are
                // final; any other (not found, a server error, a message over a limit) could be
                // contradicted by that attempt.
                // A conflict carries the current record, which says what the lost attempt did;
                // a FAILED_PRECONDITION without one (the cluster cannot do this now) does not.
                let final_refusal = matches!(status.code(), Code::AlreadyExists | Code::FailedPrecondition)
                    && status.metadata().contains_key(md::CURRENT_BIN);
                if effect == Effect::Write && outcome_unknown && !final_refusal {
                    return Err(Error::Unavailable {
                        message: format!(
                            "{:?}: {} (an earlier attempt of this write may have taken effect or still may)",
                            status.code(),
                            status.message()
                        ),
                        outcome_unknown: true,
                    });
                }
                return Err(Error::from_status(&status, false));
            }
            if Instant::now() + backoff(attempt) >= retry_until {
                return Err(Error::from_status(&status, outcome_unknown));
            }
            if self.options.follow_leader_hints && self.follow_hint(status.metadata(), shard) {
                rotate = 0;
            } else {
                let mut e = self.lock();
                let preferred = e.preferred;
                // A cached leader that failed is dropped from the map (a fetch is due). If the map
                // had sent this try elsewhere, the next one starts the rotation at the preferred
                // endpoint; otherwise the rotation moves on, as it always did.
                e.failed(index, shard, Instant::now());
                if !(routed && index != preferred) {
                    rotate += 1;
                }
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }

    fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    /// Creates a promise. Give an idempotency key to make your own retries safe; without one
    /// the client makes one up for its internal retries.
    pub async fn create(&self, mut req: pb::CreateRequest) -> Result<pb::PromiseResponse> {
        let generated = req.idempotency_key.is_empty();
        if generated {
            req.idempotency_key = generated_key();
        }
        let result = self
            .call(Effect::Write, Patience::Default, Route::Promise(&req.id), |c, t| {
                let req = Self::request(req.clone(), t);
                async move { promises(c).create(req).await }
            })
            .await;
        let mut resp = self.with_whole_current(&req.id, result).await?;
        // A deduplicated answer to a key we invented can only be our own earlier attempt.
        if generated {
            resp.deduplicated = false;
        }
        Ok(resp)
    }

    /// A refusal whose current record came trimmed (too large for a trailer: the server leaves
    /// out its param, value and tags, and always sends both values otherwise) gets the whole
    /// record by a Get. For a settled record that is the same record; for a pending one (a
    /// create refused), the record as of the Get.
    async fn with_whole_current<T>(&self, id: &str, result: Result<T>) -> Result<T> {
        let trimmed = |c: &Option<Box<pb::Promise>>| c.as_ref().is_some_and(|p| p.param.is_none() && p.value.is_none());
        match result {
            Err(Error::AlreadyExists { message, current }) if trimmed(&current) => {
                let current = self.get(id).await.map(Box::new).ok().or(current);
                Err(Error::AlreadyExists { message, current })
            }
            Err(Error::AlreadySettled { message, current }) if trimmed(&current) => {
                let current = self.get(id).await.map(Box::new).ok().or(current);
                Err(Error::AlreadySettled { message, current })
            }
            other => other,
        }
    }

    /// Reads a promise through the shard leader (linearizable).
    pub async fn get(&self, id: &str) -> Result<pb::Promise> {
        self.get_with(id, pb::Consistency::Linearizable).await
    }

    pub async fn get_with(&self, id: &str, consistency: pb::Consistency) -> Result<pb::Promise> {
        let req = pb::GetRequest { id: id.to_owned(), consistency: consistency as i32 };
        let resp = self
            .call(Effect::Read, Patience::Default, Route::Promise(id), |c, t| {
                let req = Self::request(req.clone(), t);
                async move { promises(c).get(req).await }
            })
            .await?;
        resp.promise.ok_or_else(|| Error::Client("server returned no promise".into()))
    }

    /// Reads a promise from one node's own replica only, with no retries elsewhere: what that
    /// node has applied, which may lag the leader.
    pub async fn get_local(endpoint: &str, id: &str) -> Result<pb::Promise> {
        Self::get_local_with(endpoint, id, Options::default()).await
    }

    /// [`Client::get_local`] with `options`' TLS and token.
    pub async fn get_local_with(endpoint: &str, id: &str, options: Options) -> Result<pb::Promise> {
        let c = Client::with_options(&[endpoint], options)?;
        let channel = c.lock().channel(0);
        let req = pb::GetRequest { id: id.to_owned(), consistency: pb::Consistency::Stale as i32 };
        let resp = promises(channel)
            .get(Self::request(req, Duration::from_secs(5)))
            .await
            .map_err(|s| Error::from_status(&s, false))?
            .into_inner();
        resp.promise.ok_or_else(|| Error::Client("server returned no promise".into()))
    }

    pub async fn resolve(
        &self,
        id: &str,
        value: pb::Value,
        idempotency_key: Option<String>,
    ) -> Result<pb::PromiseResponse> {
        self.settle(Settle::Resolve, id, value, idempotency_key).await
    }

    pub async fn reject(
        &self,
        id: &str,
        value: pb::Value,
        idempotency_key: Option<String>,
    ) -> Result<pb::PromiseResponse> {
        self.settle(Settle::Reject, id, value, idempotency_key).await
    }

    pub async fn cancel(
        &self,
        id: &str,
        value: pb::Value,
        idempotency_key: Option<String>,
    ) -> Result<pb::PromiseResponse> {
        self.settle(Settle::Cancel, id, value, idempotency_key).await
    }

    async fn settle(
        &self,
        how: Settle,
        id: &str,
        value: pb::Value,
        key: Option<String>,
    ) -> Result<pb::PromiseResponse> {
        self.settle_with_token(how, id, value, key, None).await
    }

    /// Settles `id` as `how`, presenting `token` (a completion token from the promise's
    /// Create) when given: the cluster refuses with [`Error::PermissionDenied`], settling
    /// nothing, unless the token allows this operation on this promise now.
    pub async fn settle_with_token(
        &self,
        how: Settle,
        id: &str,
        value: pb::Value,
        key: Option<String>,
        token: Option<&str>,
    ) -> Result<pb::PromiseResponse> {
        let authorization = match token {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
                    .map_err(|_| Error::InvalidArgument("a completion token is ASCII text".into()))?,
            ),
        };
        let generated = key.as_deref().is_none_or(str::is_empty);
        let req = pb::SettleRequest {
            id: id.to_owned(),
            value: Some(value),
            idempotency_key: key.filter(|k| !k.is_empty()).unwrap_or_else(generated_key),
        };
        let result = self
            .call(Effect::Write, Patience::Default, Route::Promise(id), |c, t| {
                let mut req = Self::request(req.clone(), t);
                if let Some(a) = &authorization {
                    req.metadata_mut().insert("authorization", a.clone());
                }
                async move {
                    let mut client = promises(c);
                    match how {
                        Settle::Resolve => client.resolve(req).await,
                        Settle::Reject => client.reject(req).await,
                        Settle::Cancel => client.cancel(req).await,
                    }
                }
            })
            .await;
        let mut resp = self.with_whole_current(id, result).await?;
        if generated {
            resp.deduplicated = false;
        }
        Ok(resp)
    }

    /// Waits up to `wait` for the promise to settle and returns it (still pending if the wait
    /// ran out). Survives leader changes: a broken wait is resumed elsewhere.
    pub async fn await_settled(&self, id: &str, wait: Duration) -> Result<pb::Promise> {
        let until = Instant::now() + wait;
        let resp = self
            .call(Effect::Read, Patience::LongCall(wait), Route::Promise(id), |c, _| {
                let left = until.saturating_duration_since(Instant::now());
                let req = pb::AwaitRequest { id: id.to_owned(), wait_timeout_ms: left.as_millis().max(1) as u32 };
                let req = Self::request(req, left + self.options.attempt_timeout);
                async move { promises(c).r#await(req).await }
            })
            .await?;
        resp.promise.ok_or_else(|| Error::Client("server returned no promise".into()))
    }

    /// Submits a pipeline: its promises and continuations (see `Submit` in `vow.proto`).
    /// Without an idempotency key the client makes one up, so its own retries after a lost
    /// reply complete the same graph instead of conflicting with it. With `wait_for` set the
    /// call lasts up to `wait_timeout_ms` (30 s when 0).
    pub async fn submit(&self, mut req: pb::SubmitRequest) -> Result<pb::SubmitResponse> {
        if req.idempotency_key.is_empty() {
            req.idempotency_key = generated_key();
        }
        if req.wait_for.is_empty() {
            return self
                .call(Effect::Write, Patience::Default, Route::Any, |c, t| {
                    let req = Self::request(req.clone(), t);
                    async move { promises(c).submit(req).await }
                })
                .await;
        }
        // Like an Await: a retry after a lost node waits only for what is left.
        let wait =
            Duration::from_millis(u64::from(if req.wait_timeout_ms == 0 { 30_000 } else { req.wait_timeout_ms }));
        let until = Instant::now() + wait;
        self.call(Effect::Write, Patience::LongCall(wait), Route::Any, |c, _| {
            let left = until.saturating_duration_since(Instant::now());
            let mut req = req.clone();
            req.wait_timeout_ms = left.as_millis().max(1) as u32;
            let req = Self::request(req, left + self.options.attempt_timeout);
            async move { promises(c).submit(req).await }
        })
        .await
    }

    /// Where a continuation stands (waiting, ready with its attempts, or done).
    /// Settlements as they happen: those of `ids`, or with `id_prefix` (neither: all), from
    /// `resume_token` (a [`Watch::resume_token`] of an earlier watch) or from now. Resumes by
    /// itself after a node is lost, and drops the repeats a resume brings.
    pub fn watch(&self, ids: Vec<String>, id_prefix: &str, resume_token: Option<String>) -> Watch {
        let request =
            pb::WatchRequest { ids, id_prefix: id_prefix.to_owned(), resume_token: resume_token.unwrap_or_default() };
        Watch::new(self.clone(), request)
    }

    /// Registers a webhook: once `id` settles, its record is POSTed to `url`, signed (see the
    /// proto). Subscribing the same URL and headers again is the same subscription. Returns
    /// the subscription id (its deliveries: [`Client::get_continuation`]).
    pub async fn subscribe(
        &self,
        id: &str,
        url: &str,
        headers: std::collections::HashMap<String, String>,
    ) -> Result<String> {
        let req = pb::SubscribeRequest { id: id.to_owned(), url: url.to_owned(), headers };
        let reply = self
            .call(Effect::Write, Patience::Default, Route::Promise(id), |c, t| {
                let req = Self::request(req.clone(), t);
                async move { promises(c).subscribe(req).await }
            })
            .await?;
        Ok(reply.subscription_id)
    }

    pub async fn get_continuation(&self, id: &str) -> Result<pb::ContinuationStatus> {
        let req = pb::GetContinuationRequest { id: id.to_owned() };
        self.call(Effect::Read, Patience::Default, Route::Any, |c, t| {
            let req = Self::request(req.clone(), t);
            async move { promises(c).get_continuation(req).await }
        })
        .await
    }

    pub async fn search(&self, req: pb::SearchRequest) -> Result<pb::SearchResponse> {
        self.call(Effect::Read, Patience::Default, Route::Any, |c, t| {
            let req = Self::request(req.clone(), t);
            async move { promises(c).search(req).await }
        })
        .await
    }

    pub async fn status(&self) -> Result<pb::StatusResponse> {
        self.call(Effect::Read, Patience::Default, Route::Any, |c, t| {
            let req = Self::request(pb::StatusRequest {}, t);
            async move { cluster(c).status(req).await }
        })
        .await
    }

    /// The shard `id` is placed on and that shard's leader, as the answering node knows it.
    pub async fn locate(&self, id: &str) -> Result<pb::LocateResponse> {
        let req = pb::LocateRequest { id: id.to_owned() };
        self.call(Effect::Read, Patience::Default, Route::Any, |c, t| {
            let req = Self::request(req.clone(), t);
            async move { cluster(c).locate(req).await }
        })
        .await
    }

    /// The shard count and every shard's leader, as the answering node knows them. The client
    /// also takes the answer as its cached map.
    pub async fn shard_map(&self) -> Result<pb::ShardMapResponse> {
        let since = self.lock().changes();
        let resp = self
            .call(Effect::Read, Patience::Default, Route::Any, |c, t| {
                let req = Self::request(pb::ShardMapRequest {}, t);
                async move { cluster(c).shard_map(req).await }
            })
            .await?;
        if self.options.follow_leader_hints {
            self.lock().install(&resp, since, Instant::now());
        }
        Ok(resp)
    }

    /// Adds a node to every shard (learner, caught up, then voter). Can take a while for a
    /// node that has much to catch up.
    /// Adds node `node_id`, reachable by clients at `grpc_addr` and by other nodes at
    /// `peer_addr` (empty: `grpc_addr`'s host with its port + 100, vowd's default).
    pub async fn add_node(&self, node_id: u64, grpc_addr: &str, peer_addr: &str) -> Result<pb::StatusResponse> {
        let req = pb::AddNodeRequest {
            node_id,
            grpc_addr: grpc_addr.to_owned(),
            shard_ids: vec![],
            shard_count: 0,
            peer_addr: peer_addr.to_owned(),
        };
        self.call(Effect::Write, Patience::LongAttempt(Duration::from_secs(60)), Route::Any, |c, t| {
            let req = Self::request(req.clone(), t);
            async move { cluster(c).add_node(req).await }
        })
        .await
    }

    pub async fn remove_node(&self, node_id: u64) -> Result<pb::StatusResponse> {
        let req = pb::RemoveNodeRequest { node_id, shard_ids: vec![] };
        self.call(Effect::Write, Patience::LongAttempt(Duration::from_secs(10)), Route::Any, |c, t| {
            let req = Self::request(req.clone(), t);
            async move { cluster(c).remove_node(req).await }
        })
        .await
    }

    /// Moves the leadership of every shard to `to_node_id`.
    pub async fn transfer_leader(&self, to_node_id: u64) -> Result<pb::StatusResponse> {
        self.transfer_leader_of(to_node_id, &[]).await
    }

    /// Moves the leadership of the shards `shard_ids` (every shard when empty) to `to_node_id`.
    pub async fn transfer_leader_of(&self, to_node_id: u64, shard_ids: &[u32]) -> Result<pb::StatusResponse> {
        let req = pb::TransferLeaderRequest { to_node_id, shard_ids: shard_ids.to_vec() };
        self.call(Effect::Write, Patience::LongAttempt(Duration::from_secs(5)), Route::Any, |c, t| {
            let req = Self::request(req.clone(), t);
            async move { cluster(c).transfer_leader(req).await }
        })
        .await
    }
}

fn lock(endpoints: &Mutex<Endpoints>) -> std::sync::MutexGuard<'_, Endpoints> {
    endpoints.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fetches the shard map from the first node that gives one (each asked once, for at most
/// `timeout`) and installs it. No retries beyond that: the next call that finds the map stale
/// starts another fetch, at most once per [`routing::MAP_REFRESH_EVERY`].
async fn fetch_map(endpoints: Arc<Mutex<Endpoints>>, fetch: MapFetch, timeout: Duration) {
    /// Ends the fetch even if the task is dropped half-way (its runtime shutting down), so a
    /// later call can start another.
    struct Ending<'a> {
        endpoints: &'a Mutex<Endpoints>,
        unsupported: bool,
    }
    impl Drop for Ending<'_> {
        fn drop(&mut self) {
            lock(self.endpoints).end_refresh(Instant::now(), self.unsupported);
        }
    }
    let mut ending = Ending { endpoints: &endpoints, unsupported: false };
    let mut unimplemented = 0;
    for channel in &fetch.channels {
        let req = Client::request(pb::ShardMapRequest {}, timeout);
        match tokio::time::timeout(timeout, cluster(channel.clone()).shard_map(req)).await {
            Ok(Ok(resp)) => {
                lock(&endpoints).install(resp.get_ref(), fetch.since, Instant::now());
                return;
            }
            Ok(Err(s)) if s.code() == Code::Unimplemented => unimplemented += 1,
            Ok(Err(s)) => tracing::debug!(error = %s, "fetching the shard map"),
            Err(_) => tracing::debug!("fetching the shard map: timed out"),
        }
    }
    ending.unsupported = unimplemented == fetch.channels.len();
}

/// How much longer than [`Options::call_timeout`] a call may take.
#[derive(Debug, Clone, Copy)]
enum Patience {
    Default,
    /// One attempt may run this much longer (a membership change waits for a node to catch
    /// up), but attempts that fail fast are retried only within the default budget: without a
    /// quorum, `add_node` reports the cluster unavailable after `call_timeout`, not a minute.
    LongAttempt(Duration),
    /// The whole call may run this much longer, retrying throughout (an Await's wait: a node
    /// lost halfway through is replaced for the rest of it).
    LongCall(Duration),
}

/// Whether a call changes state, which decides what a refusal after a lost attempt means.
///
/// A write attempt whose fate is unknown (timed out, connection lost) may still be on its way:
/// held in a partitioned link or by a paused node, it can reach the leader after later attempts
/// were answered. "Already exists" and "already settled" stay true whatever arrives later, but
/// "not found" does not: the promise may be created next and the late attempt then settle it.
/// So a write refused as not found after such an attempt fails as outcome unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Read,
    Write,
}

/// How a settle settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Resolve,
    Reject,
    Cancel,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_are_checked_and_normalised() {
        assert!(Client::connect::<&str>(&[]).is_err());
        assert!(matches!(Client::connect(&["not a host:port"]), Err(Error::Client(_))));
        let c = Client::connect(&["http://127.0.0.1:1/", "127.0.0.1:2"]).expect("valid");
        assert_eq!(c.lock().addrs, vec!["127.0.0.1:1", "127.0.0.1:2"]);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        // Each attempt's backoff lies in [base/2, base] for a base doubling from 25 ms to 1 s.
        let bounds = |attempt: u32| {
            let base = 25u64.saturating_mul(1 << attempt.min(6)).min(1000);
            (Duration::from_millis(base / 2), Duration::from_millis(base))
        };
        for attempt in 0..20 {
            let (low, high) = bounds(attempt);
            for _ in 0..50 {
                let b = backoff(attempt);
                assert!(low <= b && b <= high, "attempt {attempt}: {b:?} outside [{low:?}, {high:?}]");
            }
        }
        // Growth: the lowest possible backoff of a later attempt is above the highest of an
        // early one, until the cap; past it, all sit in the capped range.
        assert!(bounds(3).0 > bounds(0).1, "{:?} vs {:?}", bounds(3), bounds(0));
        assert!(bounds(6).0 > bounds(3).1);
        assert_eq!(bounds(6), (Duration::from_millis(500), Duration::from_millis(1000)), "capped at 1 s");
        let (early, late): (Duration, Duration) =
            ((0..200).map(|_| backoff(0)).sum(), (0..200).map(|_| backoff(5)).sum());
        assert!(late > early * 8, "mean backoff grows: {early:?} vs {late:?} over 200 draws");
    }

    /// A server that lets the first attempt of a call time out and refuses the next with
    /// `code` (trailers only, with a current record in `vow-current-bin` if `current`),
    /// counting the attempts.
    async fn lose_then_refuse(code: Code, current: bool) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut conn = h2::server::handshake(tcp).await.expect("handshake");
            let mut held = Vec::new();
            let mut attempts = 0;
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                attempts += 1;
                if attempts == 1 {
                    held.push(respond); // never answered: the client's attempt times out
                    continue;
                }
                let mut reply = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", (code as i32).to_string())
                    .header("grpc-message", "refused");
                if current {
                    use base64::Engine;
                    let record =
                        pb::Promise { id: "p".into(), state: pb::State::Resolved as i32, ..Default::default() };
                    let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(record.encode_to_vec());
                    reply = reply.header(md::CURRENT_BIN, encoded);
                }
                let _ = respond.send_response(reply.body(()).expect("response"), true);
            }
            attempts
        });
        (addr, server)
    }

    #[tokio::test]
    async fn after_a_lost_attempt_only_already_exists_and_already_settled_are_final() {
        let options = Options {
            call_timeout: Duration::from_secs(3),
            attempt_timeout: Duration::from_millis(200),
            follow_leader_hints: false,
            ..Default::default()
        };
        for (code, current, unknown) in [
            (Code::Internal, false, true),
            (Code::OutOfRange, false, true),
            (Code::NotFound, false, true),
            (Code::InvalidArgument, false, true),
            // Without the record it is no settle conflict (no keys, a node refused...).
            (Code::FailedPrecondition, false, true),
            (Code::FailedPrecondition, true, false),
            (Code::AlreadyExists, true, false),
        ] {
            let (addr, server) = lose_then_refuse(code, current).await;
            let client = Client::with_options(&[addr.as_str()], options.clone()).expect("client");
            let err = client.resolve("p", pb::Value::default(), Some("k".into())).await.expect_err("refused");
            assert_eq!(err.is_outcome_unknown(), unknown, "{code:?} after a lost attempt: {err:?}");
            if !unknown {
                assert!(
                    matches!(
                        err,
                        Error::AlreadyExists { current: Some(_), .. } | Error::AlreadySettled { current: Some(_), .. }
                    ),
                    "{err:?}"
                );
            }
            drop(client);
            server.abort();
        }
    }

    /// What a fake node answers to one call.
    enum Reply {
        /// The encoded reply message, and a leader hint to send with it.
        Ok(Vec<u8>, Option<String>),
        /// A refusal (trailers only), with a leader hint.
        Refuse(Code, Option<String>),
    }

    /// One call a fake node received: its method path and request message.
    type Call = (String, Vec<u8>);

    /// A fake node: each call (method path, request message) is recorded and answered by
    /// `answer`. Serves every connection it is given until aborted.
    struct FakeNode {
        addr: String,
        calls: Arc<Mutex<Vec<Call>>>,
        server: tokio::task::JoinHandle<()>,
    }

    impl FakeNode {
        async fn start(answer: impl Fn(&str, &[u8]) -> Reply + Send + Sync + 'static) -> FakeNode {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr").to_string();
            let calls = Arc::new(Mutex::new(Vec::new()));
            let answer = Arc::new(answer);
            let recorded = Arc::clone(&calls);
            let server = tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (answer, recorded) = (Arc::clone(&answer), Arc::clone(&recorded));
                    tokio::spawn(async move {
                        let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                        while let Some(Ok((req, mut respond))) = conn.accept().await {
                            let path = req.uri().path().to_owned();
                            let mut body = req.into_body();
                            let mut bytes = Vec::new();
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                bytes.extend_from_slice(&chunk);
                            }
                            let message = bytes.get(5..).unwrap_or_default().to_vec(); // after the gRPC frame header
                            let reply = answer(&path, &message);
                            recorded.lock().expect("calls").push((path, message));
                            let head = |hint: &Option<String>| {
                                let mut b = http::Response::builder().header("content-type", "application/grpc");
                                if let Some(h) = hint {
                                    b = b.header(md::LEADER_ADDR, h.as_str());
                                }
                                b
                            };
                            match reply {
                                Reply::Ok(msg, hint) => {
                                    let Ok(mut stream) =
                                        respond.send_response(head(&hint).body(()).expect("head"), false)
                                    else {
                                        continue;
                                    };
                                    let mut framed = vec![0u8];
                                    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                                    framed.extend_from_slice(&msg);
                                    let _ = stream.send_data(framed.into(), false);
                                    let mut trailers = http::HeaderMap::new();
                                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                                    let _ = stream.send_trailers(trailers);
                                }
                                Reply::Refuse(code, hint) => {
                                    let head = head(&hint)
                                        .header("grpc-status", (code as i32).to_string())
                                        .header("grpc-message", "refused")
                                        .body(())
                                        .expect("head");
                                    let _ = respond.send_response(head, true);
                                }
                            }
                        }
                    });
                }
            });
            FakeNode { addr, calls, server }
        }

        /// The ids of the Creates this node was sent.
        fn creates(&self) -> Vec<String> {
            let calls = self.calls.lock().expect("calls");
            calls
                .iter()
                .filter(|(p, _)| p.ends_with("/Create"))
                .map(|(_, m)| pb::CreateRequest::decode(m.as_slice()).expect("a CreateRequest").id)
                .collect()
        }

        fn shard_map_calls(&self) -> usize {
            self.calls.lock().expect("calls").iter().filter(|(p, _)| p.ends_with("/ShardMap")).count()
        }
    }

    impl Drop for FakeNode {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    /// Answers a Create as its leader would.
    fn created() -> Reply {
        Reply::Ok(pb::PromiseResponse::default().encode_to_vec(), None)
    }

    fn shard_map(leaders: &[&str]) -> Reply {
        let resp = pb::ShardMapResponse {
            shards: leaders.len() as u32,
            leaders: leaders
                .iter()
                .enumerate()
                .map(|(s, a)| pb::ShardLeader {
                    shard_id: s as u32,
                    leader_id: s as u64 + 1,
                    leader_grpc_addr: a.to_string(),
                })
                .collect(),
        };
        Reply::Ok(resp.encode_to_vec(), None)
    }

    fn shard_of(id: &str, shards: u32) -> u32 {
        ShardId::for_promise(&vow_core::PromiseId::new_unchecked(id), shards).0
    }

    fn quick() -> Options {
        Options { call_timeout: Duration::from_secs(5), attempt_timeout: Duration::from_secs(1), ..Default::default() }
    }

    /// Polls until the client has a shard map (it is fetched in the background).
    async fn map_loaded(client: &Client) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while client.lock().leader_addrs().is_none() {
            assert!(Instant::now() < deadline, "the client never loaded the shard map");
            tokio::time::sleep(Duration::from_millis(5)).await; // poll interval
        }
    }

    #[tokio::test]
    async fn calls_about_a_promise_go_straight_to_its_shards_leader() {
        let b = FakeNode::start(|_, _| created()).await;
        let c = FakeNode::start(|_, _| created()).await;
        let leaders = [b.addr.clone(), c.addr.clone()];
        let a = FakeNode::start(move |path, _| {
            if path.ends_with("/ShardMap") { shard_map(&[&leaders[0], &leaders[1]]) } else { created() }
        })
        .await;
        // The client knows A only; the map, fetched lazily, names B and C.
        let client = Client::with_options(&[a.addr.as_str()], quick()).expect("client");
        client.create(pb::CreateRequest { id: "first".into(), ..Default::default() }).await.expect("create");
        map_loaded(&client).await;
        let ids: Vec<String> = (0..40).map(|n| format!("p-{n}")).collect();
        for id in &ids {
            client.create(pb::CreateRequest { id: id.clone(), ..Default::default() }).await.expect("create");
        }
        let on = |shard| ids.iter().filter(|id| shard_of(id, 2) == shard).cloned().collect::<Vec<_>>();
        assert_eq!(b.creates(), on(0), "shard 0's creates went to its leader B");
        assert_eq!(c.creates(), on(1), "shard 1's creates went to its leader C");
        assert_eq!(a.creates(), ["first"], "only the call before the map went to A");
        assert_eq!(a.shard_map_calls(), 1);
    }

    #[tokio::test]
    async fn a_hint_moves_the_shard_and_a_dead_leader_falls_back_to_the_endpoints() {
        let c = FakeNode::start(|_, _| created()).await;
        let c_addr = c.addr.clone();
        // B has lost shard 0 to C and says so; it still leads shard 1.
        let b = FakeNode::start(move |_, m| {
            let id = pb::CreateRequest::decode(m).map(|r| r.id).unwrap_or_default();
            if shard_of(&id, 2) == 0 { Reply::Refuse(Code::Unavailable, Some(c_addr.clone())) } else { created() }
        })
        .await;
        // A dead address for the map to name.
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dead_addr = dead.local_addr().expect("addr").to_string();
        drop(dead);
        // A's first map predates the move of shard 0; later ones know it.
        let (first, later) = ([b.addr.clone(), dead_addr.clone()], [c.addr.clone(), dead_addr]);
        let maps = std::sync::atomic::AtomicUsize::new(0);
        let a = FakeNode::start(move |path, _| {
            if !path.ends_with("/ShardMap") {
                return created();
            }
            let l = if maps.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 { &first } else { &later };
            shard_map(&[&l[0], &l[1]])
        })
        .await;
        let client = Client::with_options(&[a.addr.as_str()], quick()).expect("client");
        let map = client.shard_map().await.expect("shard map");
        assert_eq!(map.shards, 2);
        let ids: Vec<String> = (0..20).map(|n| format!("q-{n}")).collect();
        for id in &ids {
            client.create(pb::CreateRequest { id: id.clone(), ..Default::default() }).await.expect("create");
        }
        let on = |shard| ids.iter().filter(|id| shard_of(id, 2) == shard).cloned().collect::<Vec<_>>();
        let (s0, s1) = (on(0), on(1));
        // Shard 0: the stale entry cost B one refusal, then the hint sent everything to C.
        assert_eq!(b.creates(), [s0[0].clone()]);
        let on_shard =
            |ids: Vec<String>, shard| ids.into_iter().filter(|id| shard_of(id, 2) == shard).collect::<Vec<_>>();
        assert_eq!(on_shard(c.creates(), 0), s0);
        // Shard 1: its leader was dead; its calls fell back to the endpoint rotation (A, or C
        // where the last hint pointed), each answered once.
        let mut fell_back = on_shard(a.creates(), 1);
        fell_back.extend(on_shard(c.creates(), 1));
        fell_back.sort();
        let mut want = s1.clone();
        want.sort();
        assert_eq!(fell_back, want);
        let endpoints = client.lock();
        let cached = endpoints.leader_addrs().expect("map");
        assert_eq!(cached, [Some(c.addr.as_str()), None], "the dead leader is not believed again at once");
    }

    #[tokio::test]
    async fn without_a_shard_map_the_client_works_as_before() {
        // An older server: no ShardMap.
        let a = FakeNode::start(|path, _| {
            if path.ends_with("/ShardMap") { Reply::Refuse(Code::Unimplemented, None) } else { created() }
        })
        .await;
        let client = Client::with_options(&[a.addr.as_str()], quick()).expect("client");
        for n in 0..20 {
            client.create(pb::CreateRequest { id: format!("r-{n}"), ..Default::default() }).await.expect("create");
            tokio::time::sleep(Duration::from_millis(10)).await; // spread the calls over the refresh interval
        }
        assert_eq!(a.creates().len(), 20);
        assert_eq!(a.shard_map_calls(), 1, "an old server is not asked for the map again at once");
        assert!(matches!(client.shard_map().await, Err(Error::Other { .. })));

        // A client that must keep to its endpoints never asks for the map, even from a new server.
        let leaders = ["127.0.0.1:1".to_owned()];
        let b = FakeNode::start(
            move |path, _| if path.ends_with("/ShardMap") { shard_map(&[&leaders[0]]) } else { created() },
        )
        .await;
        let options = Options { follow_leader_hints: false, ..quick() };
        let client = Client::with_options(&[b.addr.as_str()], options).expect("client");
        for n in 0..5 {
            client.create(pb::CreateRequest { id: format!("s-{n}"), ..Default::default() }).await.expect("create");
        }
        assert_eq!(b.creates().len(), 5);
        assert_eq!(b.shard_map_calls(), 0);
        assert!(client.lock().leader_addrs().is_none());
    }

    #[test]
    fn statuses_map_to_what_callers_act_on() {
        let mut s = Status::unavailable("no leader");
        s.metadata_mut().insert(md::OUTCOME_UNKNOWN, "true".parse().expect("ascii"));
        assert!(Error::from_status(&s, true).is_outcome_unknown());
        assert!(matches!(Error::from_status(&Status::not_found("x"), false), Error::NotFound(_)));
        assert!(matches!(Error::from_status(&Status::already_exists("x"), false), Error::AlreadyExists { .. }));
    }
}
