//! The HTTP/JSON gateway and completion tokens (issue #16), against real `vowd` processes with
//! eight shards, through `curl` as an outside caller would. Every answer is checked against the
//! OpenAPI document the server itself serves: its status must be one the route documents and
//! its body must match that status's schema.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value as Json, json};
use vow_tests::DevCluster;

/// One HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Header lines, lowercased.
    headers: String,
    body: Json,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).map(str::trim)
    }
}

/// `curl` with `args`, the body (if any) on stdin.
fn curl(args: &[&str], body: Option<&[u8]>) -> anyhow::Result<Reply> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "-H", "Expect:", "--max-time", "60"]).args(args);
    if body.is_some() {
        cmd.args(["--data-binary", "@-"]);
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    if let Some(b) = body {
        stdin.write_all(b)?;
    }
    drop(stdin);
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let status: u16 = head.split_whitespace().nth(1).context("no status")?.parse()?;
    let body =
        if body.is_empty() { Json::Null } else { serde_json::from_str(body).with_context(|| body.to_owned())? };
    Ok(Reply { status, headers: head.to_ascii_lowercase(), body })
}

/// The gateway of one node, with the OpenAPI document it serves.
struct Gateway {
    base: String,
    doc: Json,
}

impl Gateway {
    fn new(http: &str) -> anyhow::Result<Gateway> {
        let base = format!("http://{http}");
        let doc = curl(&[&format!("{base}/v1/openapi.json")], None)?;
        ensure!(doc.status == 200, "openapi.json: {doc:?}");
        Ok(Gateway { base, doc: doc.body })
    }

    /// Calls `method path` and checks the answer against the document's `route` (a path
    /// template such as `/v1/promises/{id}`).
    fn call(
        &self,
        method: &str,
        route: &str,
        path: &str,
        body: Option<Json>,
        headers: &[&str],
    ) -> anyhow::Result<Reply> {
        let url = format!("{}{path}", self.base);
        let mut args = vec!["-X", method, &url];
        for h in headers {
            args.extend(["-H", h]);
        }
        let bytes = body.map(|b| b.to_string().into_bytes());
        let reply = curl(&args, bytes.as_deref())?;
        self.conforms(method, route, &reply).with_context(|| format!("{method} {path} answered {reply:?}"))?;
        Ok(reply)
    }

    fn conforms(&self, method: &str, route: &str, reply: &Reply) -> anyhow::Result<()> {
        let op = &self.doc["paths"][route][method.to_ascii_lowercase()];
        ensure!(op.is_object(), "the document has no {method} {route}");
        let response = &op["responses"][reply.status.to_string()];
        ensure!(response.is_object(), "status {} is not documented for {method} {route}", reply.status);
        if reply.status >= 400 {
            ensure!(reply.header("content-type") == Some("application/json"), "errors are JSON");
        }
        let schema = &response["content"]["application/json"]["schema"];
        validate(&self.doc, schema, &reply.body, "$")
    }
}

/// Checks `value` against the JSON Schema subset the server's generator emits: `$ref`, `type`,
/// `properties`, `additionalProperties`, `items`, `enum`, `required`, `pattern` (digits only).
fn validate(doc: &Json, schema: &Json, value: &Json, at: &str) -> anyhow::Result<()> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.strip_prefix("#/components/schemas/").context("a local $ref")?;
        return validate(doc, &doc["components"]["schemas"][name], value, at);
    }
    if let Some(allowed) = schema["enum"].as_array() {
        ensure!(allowed.contains(value), "{at}: {value} is not one of {allowed:?}");
    }
    let ok = match schema["type"].as_str() {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some(t) => bail!("{at}: unknown type {t}"),
    };
    ensure!(ok, "{at}: {value} is not {}", schema["type"]);
    if schema["pattern"].is_string() {
        let s = value.as_str().unwrap_or_default();
        ensure!(
            s.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) && !s.is_empty(),
            "{at}: {s:?} is not digits"
        );
    }
    if let Some(object) = value.as_object() {
        for name in schema["required"].as_array().into_iter().flatten() {
            ensure!(object.contains_key(name.as_str().unwrap_or_default()), "{at}: {name} missing");
        }
        for (k, v) in object {
            match &schema["properties"][k] {
                Json::Null => match &schema["additionalProperties"] {
                    Json::Bool(false) => bail!("{at}: unexpected property {k}"),
                    Json::Object(_) => validate(doc, &schema["additionalProperties"], v, &format!("{at}.{k}"))?,
                    _ => {}
                },
                s => validate(doc, s, v, &format!("{at}.{k}"))?,
            }
        }
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            validate(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn b64(text: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() { A[(n >> (18 - 6 * i)) as usize & 63] as char } else { '=' });
        }
    }
    out
}

fn state(reply: &Reply) -> &str {
    reply.body["promise"]["state"].as_str().unwrap_or_default()
}

const PROMISE: &str = "/v1/promises/{id}";

#[tokio::test(flavor = "multi_thread")]
async fn every_route_answers_as_its_openapi_document_says() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    cluster.leader().await?;
    // Node 2's gateway: most promises live on shards it does not lead, so requests are routed.
    let gw = Gateway::new(&cluster.node(2).http)?;
    let json_ct = "content-type: application/json";

    // Create: 201 with a Location; `text` stands for base64 data; the key header dedupes (200).
    let create = json!({"id": "order/1", "param": {"text": "hello", "headers": {"k": "v"}}, "tags": {"team": "a"}});
    let r = gw.call("POST", "/v1/promises", "/v1/promises", Some(create.clone()), &[json_ct, "Idempotency-Key: k1"])?;
    ensure!(r.status == 201, "{r:?}");
    ensure!(r.header("location") == Some("/v1/promises/order%2f1"), "{r:?}");
    ensure!(state(&r) == "STATE_PENDING" && r.body["promise"]["param"]["data"] == b64("hello"), "{r:?}");
    ensure!(r.body["deduplicated"] == false && r.body["promise"]["idempotencyKeyCreate"] == "k1");
    let again = gw.call("POST", "/v1/promises", "/v1/promises", Some(create.clone()), &["Idempotency-Key: k1"])?;
    ensure!(again.status == 200 && again.body["deduplicated"] == true, "{again:?}");
    // Another key: 409 with the current record; the key in header and body disagreeing: 400.
    let conflict = gw.call("POST", "/v1/promises", "/v1/promises", Some(create.clone()), &["Idempotency-Key: k2"])?;
    ensure!(conflict.status == 409 && conflict.body["code"] == "ALREADY_EXISTS", "{conflict:?}");
    ensure!(conflict.body["current"]["id"] == "order/1", "{conflict:?}");
    let mixed = json!({"id": "x", "idempotencyKey": "a"});
    let r = gw.call("POST", "/v1/promises", "/v1/promises", Some(mixed), &["Idempotency-Key: b"])?;
    ensure!(r.status == 400 && r.body["code"] == "INVALID_ARGUMENT", "{r:?}");

    // Get, linearizable and stale; a missing id; a bad parameter.
    let r = gw.call("GET", PROMISE, "/v1/promises/order%2F1", None, &[])?;
    ensure!(r.status == 200 && r.body["promise"]["tags"]["team"] == "a", "{r:?}");
    let r = gw.call("GET", PROMISE, "/v1/promises/order%2F1?consistency=stale", None, &[])?;
    ensure!(r.status == 200, "{r:?}");
    let r = gw.call("GET", PROMISE, "/v1/promises/nope", None, &[])?;
    ensure!(r.status == 404 && r.body["code"] == "NOT_FOUND", "{r:?}");
    let r = gw.call("GET", PROMISE, "/v1/promises/order%2F1?consistency=eventual", None, &[])?;
    ensure!(r.status == 400, "{r:?}");

    // Await: a short wait answers pending; a wait that a resolve ends answers resolved.
    let r = gw.call("GET", "/v1/promises/{id}/await", "/v1/promises/order%2F1/await?timeout=200ms", None, &[])?;
    ensure!(r.status == 200 && state(&r) == "STATE_PENDING", "{r:?}");
    let waiter = {
        let base = gw.base.clone();
        std::thread::spawn(move || curl(&[&format!("{base}/v1/promises/order%2F1/await?timeout=30s")], None))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settle = json!({"value": {"text": "done"}});
    let r = gw.call(
        "POST",
        "/v1/promises/{id}/resolve",
        "/v1/promises/order%2F1/resolve",
        Some(settle.clone()),
        &["Idempotency-Key: s1"],
    )?;
    ensure!(r.status == 200 && state(&r) == "STATE_RESOLVED" && r.body["promise"]["value"]["data"] == b64("done"));
    let waited = waiter.join().map_err(|_| anyhow::anyhow!("waiter panicked"))??;
    ensure!(waited.status == 200 && state(&waited) == "STATE_RESOLVED", "{waited:?}");
    // The same settle again is deduplicated; another way is 412 with the record.
    let r = gw.call(
        "POST",
        "/v1/promises/{id}/resolve",
        "/v1/promises/order%2F1/resolve",
        Some(settle),
        &["Idempotency-Key: s1"],
    )?;
    ensure!(r.status == 200 && r.body["deduplicated"] == true, "{r:?}");
    let r = gw.call("POST", "/v1/promises/{id}/reject", "/v1/promises/order%2F1/reject", None, &[])?;
    ensure!(r.status == 412 && r.body["current"]["state"] == "STATE_RESOLVED", "{r:?}");
    let r = gw.call("POST", "/v1/promises/{id}/cancel", "/v1/promises/nope/cancel", None, &[])?;
    ensure!(r.status == 404, "{r:?}");
    // Reject and cancel, with an empty body.
    for (id, how, want) in [("order/2", "reject", "STATE_REJECTED"), ("order/3", "cancel", "STATE_REJECTED_CANCELED")] {
        let r = gw.call("POST", "/v1/promises", "/v1/promises", Some(json!({"id": id, "tags": {"team": "b"}})), &[])?;
        ensure!(r.status == 201, "{r:?}");
        let path = format!("/v1/promises/{}/{how}", id.replace('/', "%2F"));
        let r = gw.call("POST", &format!("/v1/promises/{{id}}/{how}"), &path, None, &[])?;
        ensure!(r.status == 200 && state(&r) == want, "{r:?}");
    }

    // Subscriptions: registered (the same twice is one), a bad URL, a missing promise.
    let hook = json!({"url": "http://127.0.0.1:9/hook", "headers": {"x-team": "a"}});
    let subs = "/v1/promises/{id}/subscriptions";
    let r = gw.call("POST", subs, "/v1/promises/order%2F1/subscriptions", Some(hook.clone()), &[])?;
    ensure!(r.status == 200 && r.body["subscriptionId"].as_str().is_some_and(|s| s.starts_with("sub-")), "{r:?}");
    let again = gw.call("POST", subs, "/v1/promises/order%2F1/subscriptions", Some(hook), &[])?;
    ensure!(again.body == r.body, "{again:?}");
    let r = gw.call("POST", subs, "/v1/promises/order%2F1/subscriptions", Some(json!({"url": "ftp://x"})), &[])?;
    ensure!(r.status == 400, "{r:?}");
    let r = gw.call("POST", subs, "/v1/promises/nope/subscriptions", Some(json!({"url": "http://h/x"})), &[])?;
    ensure!(r.status == 404, "{r:?}");

    // Search across shards, filtered, paged.
    for n in 0..5 {
        let r = gw.call("POST", "/v1/promises", "/v1/promises", Some(json!({"id": format!("batch-{n}")})), &[])?;
        ensure!(r.status == 201, "{r:?}");
    }
    let r = gw.call("GET", "/v1/promises", "/v1/promises?prefix=order%2F&tag=team=b", None, &[])?;
    let ids: Vec<&str> = r.body["promises"].as_array().into_iter().flatten().filter_map(|p| p["id"].as_str()).collect();
    ensure!(r.status == 200 && ids == ["order/2", "order/3"], "{r:?}");
    let r = gw.call("GET", "/v1/promises", "/v1/promises?state=resolved", None, &[])?;
    ensure!(r.body["promises"].as_array().map(Vec::len) == Some(1), "{r:?}");
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let path = format!("/v1/promises?prefix=batch-&limit=2&pageToken={token}");
        let r = gw.call("GET", "/v1/promises", &path, None, &[])?;
        ensure!(r.status == 200, "{r:?}");
        seen.extend(
            r.body["promises"].as_array().into_iter().flatten().filter_map(|p| p["id"].as_str().map(String::from)),
        );
        token = r.body["nextPageToken"].as_str().unwrap_or_default().to_owned();
        if token.is_empty() {
            break;
        }
    }
    ensure!(seen == (0..5).map(|n| format!("batch-{n}")).collect::<Vec<_>>(), "{seen:?}");
    for bad in
        ["/v1/promises?state=done", "/v1/promises?limit=-1", "/v1/promises?tag=novalue", "/v1/promises?colour=red"]
    {
        let r = gw.call("GET", "/v1/promises", bad, None, &[])?;
        ensure!(r.status == 400 && r.body["code"] == "INVALID_ARGUMENT", "{bad}: {r:?}");
    }

    // A pipeline: b follows a; the Submit waits for b.
    let submit = json!({
        "promises": [{"id": "p-a"}, {"id": "p-b"}],
        "continuations": [{"id": "a-to-b", "sources": ["p-a"], "target": "p-b", "forward": {}}],
    });
    let r = gw.call("POST", "/v1/pipelines", "/v1/pipelines", Some(submit.clone()), &["Idempotency-Key: pipe-1"])?;
    ensure!(r.status == 200 && r.body["promises"].as_array().map(Vec::len) == Some(2), "{r:?}");
    let r = gw.call("GET", "/v1/continuations/{id}", "/v1/continuations/a-to-b", None, &[])?;
    ensure!(r.status == 200 && r.body["status"] == "WAITING", "{r:?}");
    let r = gw.call(
        "POST",
        "/v1/promises/{id}/resolve",
        "/v1/promises/p-a/resolve",
        Some(json!({"value": {"text": "v"}})),
        &[],
    )?;
    ensure!(r.status == 200, "{r:?}");
    let r = gw.call("GET", "/v1/promises/{id}/await", "/v1/promises/p-b/await?timeout=20s", None, &[])?;
    ensure!(state(&r) == "STATE_RESOLVED" && r.body["promise"]["value"]["data"] == b64("v"), "{r:?}");
    // The step is proposed done shortly after its target settled.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.call("GET", "/v1/continuations/{id}", "/v1/continuations/a-to-b", None, &[])?;
        ensure!(r.status == 200, "{r:?}");
        if r.body["status"] == "DONE" {
            break;
        }
        ensure!(Instant::now() < deadline, "a-to-b is not DONE: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = gw.call("GET", "/v1/continuations/{id}", "/v1/continuations/none-such", None, &[])?;
    ensure!(r.status == 404, "{r:?}");
    let cyclic = json!({"promises": [{"id": "c1"}], "continuations": [{"id": "loop", "sources": ["c1"], "target": "c1", "forward": {}}]});
    let r = gw.call("POST", "/v1/pipelines", "/v1/pipelines", Some(cyclic), &[])?;
    ensure!(r.status == 400, "{r:?}");

    // Bad bodies: not JSON, an unknown field, a wrong type, too large; an unknown route.
    let url = format!("{}/v1/promises", gw.base);
    for (body, says) in [("{", "not JSON"), (r#"{"id":"z","colour":1}"#, "colour"), (r#"{"id":7}"#, "")] {
        let r = curl(&["-X", "POST", &url], Some(body.as_bytes()))?;
        gw.conforms("POST", "/v1/promises", &r)?;
        ensure!(r.status == 400 && r.body["message"].as_str().is_some_and(|m| m.contains(says)), "{body}: {r:?}");
    }
    let huge = format!(r#"{{"id":"big","param":{{"data":"{}"}}}}"#, "A".repeat(4 << 20));
    let r = curl(&["-X", "POST", &url], Some(huge.as_bytes()))?;
    gw.conforms("POST", "/v1/promises", &r)?;
    ensure!(r.status == 413 && r.body["code"] == "OUT_OF_RANGE", "{r:?}");
    let r = gw.call("GET", PROMISE, "/v1/promises/big", None, &[])?;
    ensure!(r.status == 404, "nothing was created by the refused body: {r:?}");
    let r = curl(&[&format!("{}/v1/nothing-here", gw.base)], None)?;
    ensure!(r.status == 404 && r.body["code"] == "NOT_FOUND", "{r:?}");

    // No quorum: 503 with Retry-After, an error body, and the write's fate marked unknown.
    cluster.kill9(1)?;
    cluster.kill9(3)?;
    let started = Instant::now();
    let r = gw.call("POST", "/v1/promises", "/v1/promises", Some(json!({"id": "during-outage"})), &[])?;
    ensure!(r.status == 503 && r.header("retry-after") == Some("1"), "{r:?}");
    ensure!(started.elapsed() < Duration::from_secs(30), "the 503 came after {:?}", started.elapsed());
    let r = gw.call("GET", PROMISE, "/v1/promises/order%2F1", None, &[])?;
    ensure!(r.status == 503 && r.body["code"] == "UNAVAILABLE", "{r:?}");
    Ok(())
}

/// A completion token lets its holder settle its promise with its operations until it expires;
/// any other use is refused with 403 / PERMISSION_DENIED and settles nothing, over HTTP and gRPC.
#[tokio::test(flavor = "multi_thread")]
async fn completion_tokens_settle_their_promise_and_nothing_else() -> anyhow::Result<()> {
    let cluster = DevCluster::up(3, &[])?;
    cluster.leader().await?;
    let (gw1, gw3) = (Gateway::new(&cluster.node(1).http)?, Gateway::new(&cluster.node(3).http)?);
    let create = |id: &str, ttl_ms: u32, ops: Json| -> anyhow::Result<String> {
        let body = json!({"id": id, "completionTokenTtlMs": ttl_ms, "completionTokenOperations": ops});
        let r = gw1.call("POST", "/v1/promises", "/v1/promises", Some(body), &[])?;
        ensure!(r.status == 201, "{r:?}");
        Ok(r.body["completionToken"].as_str().context("a token")?.to_owned())
    };
    let settle = |gw: &Gateway, id: &str, how: &str, token: &str| {
        let auth = format!("Authorization: Bearer {token}");
        let path = format!("/v1/promises/{id}/{how}");
        gw.call("POST", &format!("/v1/promises/{{id}}/{how}"), &path, Some(json!({"value": {"text": "ok"}})), &[&auth])
    };
    let pending = |id: &str| -> anyhow::Result<()> {
        let r = gw1.call("GET", PROMISE, &format!("/v1/promises/{id}"), None, &[])?;
        ensure!(state(&r) == "STATE_PENDING", "{id} must be untouched: {r:?}");
        Ok(())
    };
    let task = create("task-1", 60_000, json!([]))?;
    let other = create("task-2", 60_000, json!(["OPERATION_RESOLVE"]))?;
    let short = create("task-3", 1, json!([]))?;
    // Forged: the signature altered; for another promise; an operation not allowed; expired;
    // not a token at all. Each 403, nothing settled; on a node other than the issuer.
    let mut forged = task.clone();
    let last = forged.pop().context("empty token")?;
    forged.push(if last == 'A' { 'B' } else { 'A' });
    for (id, how, token) in [
        ("task-1", "resolve", forged.as_str()),
        ("task-1", "resolve", other.as_str()),
        ("task-2", "reject", other.as_str()),
        ("task-3", "resolve", short.as_str()),
        ("task-1", "resolve", "not-a-token"),
    ] {
        let r = settle(&gw3, id, how, token)?;
        ensure!(r.status == 403 && r.body["code"] == "PERMISSION_DENIED", "{id} {how}: {r:?}");
        ensure!(!r.body["message"].as_str().unwrap_or_default().contains(token), "a token never comes back");
        pending(id)?;
    }
    // A malformed Authorization header: 401.
    let r = gw3.call(
        "POST",
        "/v1/promises/{id}/reject",
        "/v1/promises/task-1/reject",
        None,
        &["Authorization: Basic eDp5"],
    )?;
    ensure!(r.status == 401 && r.body["code"] == "UNAUTHENTICATED", "{r:?}");
    pending("task-1")?;
    // gRPC: the same token in metadata; a forged one is PERMISSION_DENIED.
    let mut grpc =
        vow_api::v1::promises_client::PromisesClient::connect(format!("http://{}", cluster.node(2).grpc)).await?;
    let mut request = tonic::Request::new(vow_api::v1::SettleRequest { id: "task-2".into(), ..Default::default() });
    request.metadata_mut().insert("authorization", format!("Bearer {forged}").parse()?);
    let err = grpc.resolve(request).await.expect_err("forged");
    ensure!(err.code() == tonic::Code::PermissionDenied, "{err:?}");
    pending("task-2")?;
    let mut request = tonic::Request::new(vow_api::v1::SettleRequest { id: "task-2".into(), ..Default::default() });
    request.metadata_mut().insert("authorization", format!("Bearer {other}").parse()?);
    let ok = grpc.resolve(request).await?.into_inner();
    ensure!(ok.promise.map(|p| p.state) == Some(vow_api::v1::State::Resolved as i32));
    // The CLI: a token issued by `vow create --token-ttl`, refused for another promise (exit 6,
    // nothing settled) and accepted for its own.
    let endpoints = cluster.endpoints().join(",");
    let out = vow_tests::vow(&[
        "--endpoints",
        &endpoints,
        "create",
        "task-7",
        "--token-ttl",
        "1m",
        "--token-allows",
        "cancel",
    ]);
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: Json = serde_json::from_slice(&out.stdout)?;
    let cli_token = created["completion_token"].as_str().context("the CLI prints the token")?;
    let out = vow_tests::vow(&["--endpoints", &endpoints, "cancel", "task-1", "--token", cli_token]);
    ensure!(out.status.code() == Some(6), "{out:?}");
    pending("task-1")?;
    let out = vow_tests::vow_with(
        &["--endpoints", &endpoints, "cancel", "task-7"],
        &[("VOW_COMPLETION_TOKEN".into(), cli_token.into())],
    );
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The valid token, over HTTP on another node.
    let r = settle(&gw3, "task-1", "reject", &task)?;
    ensure!(r.status == 200 && state(&r) == "STATE_REJECTED", "{r:?}");

    // Rotation: a new key first, the old one kept: old tokens still verify, new ones are signed
    // with the new key; once the old key is dropped, its tokens are refused.
    let keys_file = cluster.dir.path().join("completion-keys");
    let old_key = std::fs::read_to_string(&keys_file)?;
    let before = create("task-4", 60_000, json!([]))?;
    std::fs::write(&keys_file, format!("{}\n{old_key}", "n".repeat(40)))?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = create("task-5", 60_000, json!([]))?;
    ensure!(settle(&gw3, "task-4", "resolve", &before)?.status == 200, "the old key's token still verifies");
    std::fs::write(&keys_file, format!("{}\n", "n".repeat(40)))?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stale = create("task-6", 60_000, json!([]))?;
    ensure!(settle(&gw3, "task-5", "resolve", &after)?.status == 200, "the new key's token verifies");
    let r = settle(&gw3, "task-6", "resolve", &before.replace("task-4", "task-6"))?;
    ensure!(r.status == 403, "{r:?}");
    ensure!(settle(&gw3, "task-6", "resolve", &stale)?.status == 200);
    Ok(())
}

/// The README's `curl` examples, run as written against a node.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_curl_examples_run_as_written() -> anyhow::Result<()> {
    let cluster = DevCluster::up(1, &[])?;
    cluster.leader().await?;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let section = readme
        .split("<!-- gateway-examples -->")
        .nth(1)
        .and_then(|s| s.split("<!-- /gateway-examples -->").next())
        .context("the README marks its gateway examples")?;
    let mut ran = 0;
    for block in section.split("```sh").skip(1) {
        let Some((code, _)) = block.split_once("```") else { continue };
        let script = code.replace("127.0.0.1:7081", &cluster.node(1).http);
        let out = Command::new("bash").args(["-euo", "pipefail", "-c", &script]).output()?;
        ensure!(
            out.status.success(),
            "{script}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    ensure!(ran >= 3, "only {ran} examples found");
    Ok(())
}
