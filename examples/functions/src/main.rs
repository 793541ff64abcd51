//! `vow-functions`: small, real HTTP functions that pipelines call — in the tests, the README
//! examples and the chain benchmark. One process serves them all on one port:
//!
//! | route | does |
//! |---|---|
//! | `POST /upper` | answers the body in upper case (a stand-in for a transform such as resize) |
//! | `POST /append/{text}` | answers the body followed by `text` |
//! | `POST /flaky/{n}/{text}` | answers 503 to the first `n` calls with a given `Idempotency-Key`, then as `/append/{text}` |
//! | `POST /fail` | answers 422 with "permanent failure: <body>" (a final rejection) |
//! | `POST /adopt/{id}` | answers 202 with `Vow-Promise: {id}`: "my result is that promise" |
//! | `POST /cold/{ms}/{text}` | as `/append/{text}`, but its instance (one per `text`), idle for over a second, first takes `ms` to start; a request with `Vow-Prewarm: 1` starts it without a call |
//! | `POST /delay/{ms}/{text}` | as `/append/{text}` after `ms` |
//! | `GET /calls` | how many calls each `Idempotency-Key` made, as JSON |
//! | `POST /hooks/{name}/{n}` | a webhook receiver: records each delivery (body and headers) under `name`, answering 503 to the first `n` |
//! | `GET /hooks/{name}` | the deliveries `name` received, as JSON `[{"body", "signature", "idempotencyKey"}]` |
//!
//! `vow-functions --listen 127.0.0.1:0` prints `listening on ADDR` once it serves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: String,
    /// How long an instance stays warm after its last request (`/cold`).
    #[arg(long, default_value_t = 1000)]
    idle_ms: u64,
}

#[derive(Default)]
struct Functions {
    /// Calls per Idempotency-Key (prewarm requests are not calls).
    calls: Mutex<BTreeMap<String, u32>>,
    /// `/cold`: per function (its `text`), when its instance started warming and when it was
    /// last used.
    instances: Mutex<BTreeMap<String, (Instant, Instant)>>,
    idle: Duration,
    /// `/hooks`: every delivery each receiver got, refused ones included.
    hooks: Mutex<BTreeMap<String, Vec<serde_json::Value>>>,
}

type Shared = Arc<Functions>;

impl Functions {
    /// Counts the call and returns how many this key made, this one included.
    fn count(&self, headers: &HeaderMap) -> u32 {
        let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let n = calls.entry(key).or_default();
        *n += 1;
        *n
    }

    /// `/cold`: how long a request to function `name` must wait for its instance to be warm.
    fn start_instance(&self, name: &str, start_ms: u64) -> Duration {
        let now = Instant::now();
        let start = Duration::from_millis(start_ms);
        let mut instances = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        let started = match instances.get(name) {
            Some((started, last)) if now.duration_since(*last) <= self.idle => *started,
            _ => now,
        };
        let ready = started + start;
        instances.insert(name.to_owned(), (started, ready.max(now)));
        ready.saturating_duration_since(now)
    }
}

fn prewarm(headers: &HeaderMap) -> bool {
    headers.get("vow-prewarm").is_some_and(|v| v == "1")
}

fn appended(body: &Bytes, text: &str) -> Response {
    let mut out = body.to_vec();
    out.extend_from_slice(text.as_bytes());
    ([("content-type", "text/plain"), ("vow-step", text)], out).into_response()
}

async fn upper(State(f): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if prewarm(&headers) {
        return StatusCode::NO_CONTENT.into_response();
    }
    f.count(&headers);
    ([("content-type", "text/plain")], body.to_ascii_uppercase()).into_response()
}

async fn append(State(f): State<Shared>, Path(text): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if prewarm(&headers) {
        return StatusCode::NO_CONTENT.into_response();
    }
    f.count(&headers);
    appended(&body, &text)
}

async fn flaky(
    State(f): State<Shared>,
    Path((failures, text)): Path<(u32, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if prewarm(&headers) {
        return StatusCode::NO_CONTENT.into_response();
    }
    if f.count(&headers) <= failures {
        return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
    }
    appended(&body, &text)
}

async fn fail(State(f): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if prewarm(&headers) {
        return StatusCode::NO_CONTENT.into_response();
    }
    f.count(&headers);
    let mut out = b"permanent failure: ".to_vec();
    out.extend_from_slice(&body);
    (StatusCode::UNPROCESSABLE_ENTITY, out).into_response()
}

async fn adopt(State(f): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if prewarm(&headers) {
        return StatusCode::NO_CONTENT.into_response();
    }
    f.count(&headers);
    (StatusCode::ACCEPTED, [("vow-promise", id)]).into_response()
}

async fn cold(
    State(f): State<Shared>,
    Path((start_ms, text)): Path<(u64, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let wait = f.start_instance(&text, start_ms);
    if prewarm(&headers) {
        return StatusCode::NO_CONTENT.into_response();
    }
    f.count(&headers);
    tokio::time::sleep(wait).await;
    appended(&body, &text)
}

async fn delay(
    State(f): State<Shared>,
    Path((ms, text)): Path<(u64, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if prewarm(&headers) {
        return StatusCode::NO_CONTENT.into_response();
    }
    f.count(&headers);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    appended(&body, &text)
}

async fn hook(
    State(f): State<Shared>,
    Path((name, failures)): Path<(String, usize)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let delivery = serde_json::json!({
        "body": String::from_utf8_lossy(&body),
        "signature": header("vow-signature"),
        "idempotencyKey": header("idempotency-key"),
    });
    let mut hooks = f.hooks.lock().unwrap_or_else(|p| p.into_inner());
    let received = hooks.entry(name).or_default();
    received.push(delivery);
    if received.len() <= failures {
        return (StatusCode::SERVICE_UNAVAILABLE, "not yet").into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn hooks(State(f): State<Shared>, Path(name): Path<String>) -> Response {
    let hooks = f.hooks.lock().unwrap_or_else(|p| p.into_inner());
    axum::Json(serde_json::json!(hooks.get(&name).cloned().unwrap_or_default())).into_response()
}

async fn calls(State(f): State<Shared>) -> Response {
    let calls = f.calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
    axum::Json(serde_json::json!(calls)).into_response()
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let state: Shared = Arc::new(Functions { idle: Duration::from_millis(args.idle_ms), ..Default::default() });
    let app = Router::new()
        .route("/upper", post(upper))
        .route("/append/{text}", post(append))
        .route("/flaky/{failures}/{text}", post(flaky))
        .route("/fail", post(fail))
        .route("/adopt/{id}", post(adopt))
        .route("/cold/{start_ms}/{text}", post(cold))
        .route("/delay/{ms}/{text}", post(delay))
        .route("/calls", get(calls))
        .route("/hooks/{name}/{failures}", post(hook))
        .route("/hooks/{name}", get(hooks))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
