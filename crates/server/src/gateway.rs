//! The HTTP/JSON gateway: the public `Promises` API for callers that speak plain HTTP (external
//! systems, webhooks' senders, workflow engines, `curl`).
//!
//! Every route decodes its JSON body (the protobuf JSON mapping of the same `vow.v1` message the
//! gRPC method takes: lowerCamelCase names, bytes as base64, enums by name), calls the very
//! method the gRPC service runs ([`PromisesApi`]), and encodes the reply the same way, so a
//! record looks the same over both and the gateway has no logic of its own. Errors are JSON
//! `{code, message, current}`; [`ROUTES`] is the one list of what is served, and the OpenAPI
//! document at `/v1/openapi.json` is generated from it and the proto descriptors
//! ([`crate::openapi`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use base64::Engine;
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value as Json, json};
use tonic::Code;
use vow_api::metadata as md;
use vow_api::v1 as pb;
use vow_api::v1::promises_server::Promises as _;

use crate::api::{AWAIT_DEFAULT, AWAIT_MAX, PromisesApi};
use crate::openapi::{In, Param, Route};

const ID: Param = Param {
    name: "id",
    location: In::Path,
    ty: "string",
    description: "The promise id, percent-encoded (an id may hold `/`).",
    repeated: false,
};

/// Statuses every route may answer with: an unreadable request, no leader reachable, an
/// internal error.
const SETTLE_ERRORS: &[u16] = &[400, 401, 403, 404, 412, 413, 500, 503];

/// A settle route: they differ only in what they do.
const fn settle_route(path: &'static str, operation_id: &'static str, summary: &'static str) -> Route {
    Route {
        method: Method::POST,
        path,
        operation_id,
        summary,
        request: Some("SettleRequest"),
        response: "PromiseResponse",
        params: &[ID],
        ok: &[200],
        errors: SETTLE_ERRORS,
    }
}

pub const ROUTES: &[Route] = &[
    Route {
        method: Method::POST,
        path: "/v1/promises",
        operation_id: "createPromise",
        summary: "Create a promise. 201 when created, 200 when the same idempotency key created it \
                  before. The `Idempotency-Key` header may stand for the body's `idempotencyKey`. \
                  With `completionTokenTtlMs` the reply carries a completion token.",
        request: Some("CreateRequest"),
        response: "PromiseResponse",
        params: &[],
        ok: &[200, 201],
        errors: &[400, 409, 412, 413, 500, 503],
    },
    Route {
        method: Method::GET,
        path: "/v1/promises",
        operation_id: "searchPromises",
        summary: "Promises matching every given filter, in id order, a page at a time.",
        request: None,
        response: "SearchResponse",
        params: &[
            Param { name: "prefix", location: In::Query, ty: "string", description: "Id prefix.", repeated: false },
            Param {
                name: "state",
                location: In::Query,
                ty: "string",
                description: "pending, resolved, rejected, canceled or timedout (or a STATE_* name).",
                repeated: false,
            },
            Param {
                name: "tag",
                location: In::Query,
                ty: "string",
                description: "`key=value`; every tag given must match.",
                repeated: true,
            },
            Param {
                name: "limit",
                location: In::Query,
                ty: "integer",
                description: "Page size: default 100, at most 1000.",
                repeated: false,
            },
            Param {
                name: "pageToken",
                location: In::Query,
                ty: "string",
                description: "The previous page's `nextPageToken`.",
                repeated: false,
            },
        ],
        ok: &[200],
        errors: &[400, 500, 503],
    },
    Route {
        method: Method::GET,
        path: "/v1/promises/{id}",
        operation_id: "getPromise",
        summary: "The promise's record.",
        request: None,
        response: "PromiseResponse",
        params: &[
            ID,
            Param {
                name: "consistency",
                location: In::Query,
                ty: "string",
                description: "`linearizable` (default: through the shard leader) or `stale` (this node's replica).",
                repeated: false,
            },
        ],
        ok: &[200],
        errors: &[400, 404, 500, 503],
    },
    settle_route(
        "/v1/promises/{id}/resolve",
        "resolvePromise",
        "Resolve the promise. A completion token goes in `Authorization: Bearer`.",
    ),
    settle_route(
        "/v1/promises/{id}/reject",
        "rejectPromise",
        "Reject the promise. A completion token goes in `Authorization: Bearer`.",
    ),
    settle_route(
        "/v1/promises/{id}/cancel",
        "cancelPromise",
        "Cancel the promise. A completion token goes in `Authorization: Bearer`.",
    ),
    Route {
        method: Method::GET,
        path: "/v1/promises/{id}/await",
        operation_id: "awaitPromise",
        summary: "The record once the promise settles, or when the timeout passes (then still pending).",
        request: None,
        response: "PromiseResponse",
        params: &[
            ID,
            Param {
                name: "timeout",
                location: In::Query,
                ty: "string",
                description: "How long to wait: `30s` (default), `500ms`, `2m`; at most 300 s.",
                repeated: false,
            },
        ],
        ok: &[200],
        errors: &[400, 404, 500, 503],
    },
    Route {
        method: Method::POST,
        path: "/v1/promises/{id}/subscriptions",
        operation_id: "subscribePromise",
        summary: "Register a webhook (gRPC Subscribe): once the promise settles, its record is POSTed to \
                  `url`, signed in `Vow-Signature`. The answer names the subscription; \
                  `/v1/continuations/{subscriptionId}` shows its deliveries.",
        request: Some("SubscribeRequest"),
        response: "SubscribeResponse",
        params: &[ID],
        ok: &[200],
        errors: &[400, 404, 412, 413, 500, 503],
    },
    Route {
        method: Method::POST,
        path: "/v1/pipelines",
        operation_id: "submitPipeline",
        summary: "Create a pipeline's promises and register its continuations (gRPC Submit). The \
                  `Idempotency-Key` header may stand for the body's `idempotencyKey`.",
        request: Some("SubmitRequest"),
        response: "SubmitResponse",
        params: &[],
        ok: &[200],
        errors: &[400, 404, 409, 412, 413, 500, 503],
    },
    Route {
        method: Method::GET,
        path: "/v1/continuations/{id}",
        operation_id: "getContinuation",
        summary: "Where a continuation stands: WAITING, READY or DONE.",
        request: None,
        response: "ContinuationStatus",
        params: &[Param {
            name: "id",
            location: In::Path,
            ty: "string",
            description: "The continuation id, percent-encoded.",
            repeated: false,
        }],
        ok: &[200],
        errors: &[400, 404, 500, 503],
    },
];

/// The gateway's shared state.
#[derive(Debug, Clone)]
pub struct Gateway {
    api: Arc<PromisesApi>,
    openapi: Arc<Json>,
}

/// The gateway's routes, with bodies of up to `max_body` bytes.
pub fn router(api: Arc<PromisesApi>, max_body: usize) -> axum::Router {
    let gateway = Gateway { api, openapi: Arc::new(crate::openapi::document(ROUTES)) };
    let mut router = axum::Router::new();
    for route in ROUTES {
        router = router.route(route.path, handler(route.operation_id));
    }
    // Routes sharing a path are merged by axum; the document route stays out of the table.
    router
        .route("/v1/openapi.json", get(|State(g): State<Gateway>| async move { axum::Json((*g.openapi).clone()) }))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route; see /v1/openapi.json") })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(max_body, read_body_in_time))
        .with_state(gateway)
}

/// How long a request's body may take to arrive once its head has.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the whole body within [`BODY_READ_TIMEOUT`] before any handler runs: a client sending
/// a body a byte at a time holds its connection that long at most, and a body over `max_body`
/// is refused (413) once that many bytes have come, never buffered whole.
async fn read_body_in_time(
    State(max_body): State<usize>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, max_body)).await {
        Ok(Ok(bytes)) => next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await,
        Ok(Err(e)) if is_length_limit(&e) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "OUT_OF_RANGE",
            format!("the request body is larger than {max_body} bytes"),
        ),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", format!("reading the request body: {e}")),
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            "DEADLINE_EXCEEDED",
            format!("the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs()),
        ),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn handler(operation_id: &str) -> MethodRouter<Gateway> {
    match operation_id {
        "createPromise" => post(create),
        "searchPromises" => get(search),
        "getPromise" => get(get_promise),
        "resolvePromise" => post(|g, p, h, b| settle(g, p, h, b, Settle::Resolve)),
        "rejectPromise" => post(|g, p, h, b| settle(g, p, h, b, Settle::Reject)),
        "cancelPromise" => post(|g, p, h, b| settle(g, p, h, b, Settle::Cancel)),
        "awaitPromise" => get(await_promise),
        "submitPipeline" => post(submit),
        "subscribePromise" => post(subscribe),
        "getContinuation" => get(get_continuation),
        other => unreachable!("route {other} has no handler"),
    }
}

/// A failed request: the status, and the JSON body `{code, message, current?}` (boxed: an
/// error is the rare path, and a `Result` stays small).
#[derive(Debug)]
pub struct ApiError(Box<Response>);

impl ApiError {
    fn new(response: Response) -> ApiError {
        ApiError(Box::new(response))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        *self.0
    }
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "code": code, "message": message.into() }))).into_response()
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message))
}

/// The HTTP status of a gRPC code, and the code's canonical name.
pub fn http_status(code: Code) -> (StatusCode, &'static str) {
    match code {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        Code::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        Code::AlreadyExists => (StatusCode::CONFLICT, "ALREADY_EXISTS"),
        Code::FailedPrecondition => (StatusCode::PRECONDITION_FAILED, "FAILED_PRECONDITION"),
        Code::OutOfRange => (StatusCode::PAYLOAD_TOO_LARGE, "OUT_OF_RANGE"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "DEADLINE_EXCEEDED"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
        Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "UNIMPLEMENTED"),
        Code::Cancelled => (StatusCode::SERVICE_UNAVAILABLE, "CANCELLED"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> ApiError {
        let (http, code) = http_status(status.code());
        let mut body = json!({ "code": code, "message": status.message() });
        let meta = status.metadata();
        if let Some(current) = meta.get_bin(md::CURRENT_BIN).and_then(|v| v.to_bytes().ok())
            && let Ok(record) = pb::Promise::decode(current)
            && let Ok(record) = serde_json::to_value(record)
        {
            body["current"] = record;
            if meta.get(md::CURRENT_TRIMMED).is_some() {
                body["currentTrimmed"] = json!(true);
            }
        }
        let unknown = meta.get(md::OUTCOME_UNKNOWN).is_some();
        if unknown {
            body["outcomeUnknown"] = json!(true);
        }
        let mut response = (http, axum::Json(body)).into_response();
        if http == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if unknown {
            response.headers_mut().insert("vow-outcome-unknown", HeaderValue::from_static("true"));
        }
        ApiError::new(response)
    }
}

fn reply_json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    (status, axum::Json(body)).into_response()
}

/// How long a call may take before the gateway answers 503 (a write: with its outcome marked
/// unknown, so the caller retries with the same idempotency key). An Await gets this on top of
/// its wait.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a service call for at most `limit`.
async fn bounded<T>(limit: Duration, call: impl Future<Output = Result<T, tonic::Status>>) -> Result<T, ApiError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(tonic::Status::unavailable(format!("no answer within {} s", limit.as_secs())).into()),
    }
}

/// A gRPC request carrying what the HTTP request says about its caller (the completion token)
/// and the gateway's deadline, so a write's answer comes before it: "outcome unknown" if its
/// fate is not known by then.
fn grpc_request<T>(message: T, headers: &HeaderMap) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    if let Some(auth) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Ok(v) = auth.parse()
    {
        request.metadata_mut().insert("authorization", v);
    }
    request
}

/// Decodes a JSON body into a `vow.v1` message; an empty body is the message's default. In
/// a `Value` (a create's `param`, a settle's `value`) `"text"` may stand for `"data"`, as UTF-8
/// rather than base64.
fn body<T: DeserializeOwned + Default>(raw: Result<Bytes, BytesRejection>, values: &[&str]) -> Result<T, ApiError> {
    let raw = raw.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "OUT_OF_RANGE" } else { "INVALID_ARGUMENT" };
        ApiError::new(error(status, code, e.body_text()))
    })?;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let mut json: Json = serde_json::from_slice(&raw).map_err(|e| bad_request(format!("the body is not JSON: {e}")))?;
    for path in values {
        text_to_data(&mut json, path)?;
    }
    serde_json::from_value(json).map_err(|e| bad_request(format!("the body does not match the message: {e}")))
}

/// Replaces `{"text": "..."}` by `{"data": "<base64>"}` in the `Value` at `path`
/// (`param`, `value`, or `promises[].param`).
fn text_to_data(json: &mut Json, path: &str) -> Result<(), ApiError> {
    if let Some((list, rest)) = path.split_once("[].") {
        if let Some(Json::Array(items)) = json.get_mut(list) {
            for item in items {
                text_to_data(item, rest)?;
            }
        }
        return Ok(());
    }
    let Some(Json::Object(value)) = json.get_mut(path) else { return Ok(()) };
    let Some(text) = value.remove("text") else { return Ok(()) };
    let Json::String(text) = text else { return Err(bad_request(format!("{path}.text must be a string"))) };
    if value.contains_key("data") {
        return Err(bad_request(format!("{path}: give data (base64) or text, not both")));
    }
    value.insert("data".into(), Json::String(base64::engine::general_purpose::STANDARD.encode(text)));
    Ok(())
}

/// The `Idempotency-Key` header, merged into the body's own key.
fn idempotency_key(headers: &HeaderMap, body_key: &mut String) -> Result<(), ApiError> {
    let Some(h) = headers.get("idempotency-key") else { return Ok(()) };
    let h = h.to_str().map_err(|_| bad_request("the Idempotency-Key header is not text"))?;
    if !body_key.is_empty() && body_key != h {
        return Err(bad_request("the Idempotency-Key header and the body's idempotencyKey differ"));
    }
    *body_key = h.to_owned();
    Ok(())
}

/// The query's `(key, value)` pairs, refusing keys the route does not take.
fn query(raw: Option<String>, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(bad_request(format!("unknown query parameter {k:?}; this route takes {allowed:?}")));
    }
    Ok(pairs)
}

fn single<'a>(pairs: &'a [(String, String)], key: &str) -> Result<Option<&'a str>, ApiError> {
    let mut found = pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let first = found.next();
    if found.next().is_some() {
        return Err(bad_request(format!("query parameter {key:?} is given twice")));
    }
    Ok(first)
}

/// `30s`, `500ms`, `2m`, or a number of seconds.
pub fn parse_wait(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (digits, unit_ms) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000)
    } else {
        (text, 1000)
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("timeout {text:?} is not like 30s, 500ms or 2m"))?;
    Ok(std::time::Duration::from_millis(n.saturating_mul(unit_ms)))
}

async fn create(
    State(g): State<Gateway>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req: pb::CreateRequest = body(raw, &["param"])?;
    idempotency_key(&headers, &mut req.idempotency_key)?;
    let id = req.id.clone();
    let reply = bounded(CALL_TIMEOUT, g.api.create(grpc_request(req, &headers))).await?.into_inner();
    let status = if reply.deduplicated { StatusCode::OK } else { StatusCode::CREATED };
    let mut response = reply_json(status, &reply);
    let location: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/promises/{location}")) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

async fn get_promise(
    State(g): State<Gateway>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = query(raw, &["consistency"])?;
    let consistency = match single(&q, "consistency")? {
        None | Some("linearizable") => pb::Consistency::Linearizable,
        Some("stale") => pb::Consistency::Stale,
        Some(other) => return Err(bad_request(format!("consistency {other:?} is not linearizable or stale"))),
    };
    let req = pb::GetRequest { id, consistency: consistency as i32 };
    let reply = bounded(CALL_TIMEOUT, g.api.get(tonic::Request::new(req))).await?;
    Ok(reply_json(StatusCode::OK, reply.get_ref()))
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Resolve,
    Reject,
    Cancel,
}

async fn settle(
    State(g): State<Gateway>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
    how: Settle,
) -> Result<Response, ApiError> {
    let mut req: pb::SettleRequest = body(raw, &["value"])?;
    if !req.id.is_empty() && req.id != id {
        return Err(bad_request("the body's id differs from the id in the path"));
    }
    req.id = id;
    idempotency_key(&headers, &mut req.idempotency_key)?;
    let req = grpc_request(req, &headers);
    let reply = match how {
        Settle::Resolve => bounded(CALL_TIMEOUT, g.api.resolve(req)).await?,
        Settle::Reject => bounded(CALL_TIMEOUT, g.api.reject(req)).await?,
        Settle::Cancel => bounded(CALL_TIMEOUT, g.api.cancel(req)).await?,
    };
    Ok(reply_json(StatusCode::OK, reply.get_ref()))
}

async fn await_promise(
    State(g): State<Gateway>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = query(raw, &["timeout"])?;
    let wait = match single(&q, "timeout")? {
        None => AWAIT_DEFAULT,
        Some(t) => parse_wait(t).map_err(bad_request)?.clamp(Duration::from_millis(1), AWAIT_MAX),
    };
    let wait_timeout_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
    let call = g.api.r#await(tonic::Request::new(pb::AwaitRequest { id, wait_timeout_ms }));
    let reply = bounded(wait + CALL_TIMEOUT, call).await?;
    Ok(reply_json(StatusCode::OK, reply.get_ref()))
}

fn state_param(s: &str) -> Result<pb::State, ApiError> {
    Ok(match s.to_ascii_lowercase().trim_start_matches("state_") {
        "pending" => pb::State::Pending,
        "resolved" => pb::State::Resolved,
        "rejected" => pb::State::Rejected,
        "canceled" | "rejected_canceled" => pb::State::RejectedCanceled,
        "timedout" | "rejected_timedout" => pb::State::RejectedTimedout,
        _ => return Err(bad_request(format!("state {s:?} is not pending, resolved, rejected, canceled or timedout"))),
    })
}

async fn search(State(g): State<Gateway>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = query(raw, &["prefix", "state", "tag", "limit", "pageToken"])?;
    let mut req = pb::SearchRequest {
        id_prefix: single(&q, "prefix")?.unwrap_or_default().to_owned(),
        page_token: single(&q, "pageToken")?.unwrap_or_default().to_owned(),
        ..Default::default()
    };
    if let Some(s) = single(&q, "state")? {
        req.state = state_param(s)? as i32;
    }
    if let Some(l) = single(&q, "limit")? {
        req.limit = l.parse().map_err(|_| bad_request(format!("limit {l:?} is not a non-negative integer")))?;
    }
    for (_, tag) in q.iter().filter(|(k, _)| k == "tag") {
        let (k, v) = tag.split_once('=').ok_or_else(|| bad_request(format!("tag {tag:?} is not key=value")))?;
        req.tags.insert(k.to_owned(), v.to_owned());
    }
    let reply = bounded(CALL_TIMEOUT, g.api.search(tonic::Request::new(req))).await?;
    Ok(reply_json(StatusCode::OK, reply.get_ref()))
}

async fn submit(
    State(g): State<Gateway>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req: pb::SubmitRequest = body(raw, &["promises[].param"])?;
    idempotency_key(&headers, &mut req.idempotency_key)?;
    if req.traceparent.is_empty()
        && let Some(t) = headers.get("traceparent").and_then(|v| v.to_str().ok())
    {
        req.traceparent = t.to_owned();
    }
    let wait = match req.wait_timeout_ms {
        0 => AWAIT_DEFAULT,
        ms => Duration::from_millis(u64::from(ms)).min(AWAIT_MAX),
    };
    let limit = if req.wait_for.is_empty() { CALL_TIMEOUT } else { CALL_TIMEOUT + wait };
    let reply = bounded(limit, g.api.submit(grpc_request(req, &headers))).await?;
    Ok(reply_json(StatusCode::OK, reply.get_ref()))
}

async fn subscribe(
    State(g): State<Gateway>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req: pb::SubscribeRequest = body(raw, &[])?;
    if !req.id.is_empty() && req.id != id {
        return Err(bad_request("the body's id differs from the id in the path"));
    }
    req.id = id;
    let reply = bounded(CALL_TIMEOUT, g.api.subscribe(grpc_request(req, &headers))).await?;
    Ok(reply_json(StatusCode::OK, reply.get_ref()))
}

async fn get_continuation(State(g): State<Gateway>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let call = g.api.get_continuation(tonic::Request::new(pb::GetContinuationRequest { id }));
    let reply = bounded(CALL_TIMEOUT, call).await?;
    Ok(reply_json(StatusCode::OK, reply.get_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_a_handler_and_a_unique_operation() {
        let mut seen = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(seen.insert(r.operation_id), "{} twice", r.operation_id);
            let _ = handler(r.operation_id);
            assert!(r.path.starts_with("/v1/"));
        }
    }

    #[test]
    fn text_stands_for_base64_data() {
        let mut v = json!({"param": {"text": "héllo"}, "promises": [{"param": {"text": "a"}}]});
        text_to_data(&mut v, "param").expect("convert");
        text_to_data(&mut v, "promises[].param").expect("convert");
        assert_eq!(v["param"]["data"], "aMOpbGxv");
        assert_eq!(v["promises"][0]["param"]["data"], "YQ==");
        let mut both = json!({"value": {"text": "a", "data": "YQ=="}});
        assert!(text_to_data(&mut both, "value").is_err());
    }

    #[test]
    fn waits_parse() {
        assert_eq!(parse_wait("30s"), Ok(std::time::Duration::from_secs(30)));
        assert_eq!(parse_wait("250ms"), Ok(std::time::Duration::from_millis(250)));
        assert_eq!(parse_wait("2m"), Ok(std::time::Duration::from_secs(120)));
        assert_eq!(parse_wait("7"), Ok(std::time::Duration::from_secs(7)));
        assert!(parse_wait("soon").is_err());
    }

    #[test]
    fn the_document_has_every_route_and_the_schemas_they_name() {
        let doc = crate::openapi::document(ROUTES);
        let schemas = &doc["components"]["schemas"];
        for route in ROUTES {
            let op = &doc["paths"][route.path][route.method.as_str().to_ascii_lowercase()];
            assert_eq!(op["operationId"], route.operation_id);
            for name in route.request.iter().chain([&route.response]) {
                assert!(schemas[name].is_object(), "schema {name}");
            }
        }
        let promise = &schemas["Promise"]["properties"];
        assert_eq!(promise["deadlineMs"]["type"], "string", "64-bit integers are strings");
        assert_eq!(promise["state"]["$ref"], "#/components/schemas/State");
        assert_eq!(schemas["Value"]["properties"]["headers"]["additionalProperties"]["type"], "string");
        assert_eq!(schemas["CreateRequest"]["properties"]["completionTokenTtlMs"]["type"], "integer");
        assert_eq!(schemas["SearchResponse"]["properties"]["promises"]["type"], "array");
        assert!(schemas["State"]["enum"].as_array().is_some_and(|e| e.contains(&json!("STATE_PENDING"))));
        assert!(schemas["Value"].get("properties").and_then(|p| p.get("headers_entry")).is_none());
    }
}
