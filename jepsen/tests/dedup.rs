//! A real retried settle, end to end: a settle whose first answer is lost and whose retry (same
//! idempotency key) the server answers from its dedup table is recorded with the server's
//! `deduplicated` flag and checks as the op's own write. Under the old rule (a deduplicated ack
//! only reads) this history was a phantom value. Starts one `vowd` on loopback (no root needed).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vow_client::{Client, pb};
use vow_jepsen::checker::check;
use vow_jepsen::history::{Op, OpKind, Register};
use vow_jepsen::workload::{self, Recorded};

/// Kills the node when the test ends, however it ends.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

fn vowd() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let vowd = exe.parent().and_then(|p| p.parent()).expect("target directory").join("vowd");
    assert!(vowd.exists(), "{} missing: build the binaries first (make build)", vowd.display());
    vowd
}

fn value(v: &str) -> pb::Value {
    pb::Value { headers: Default::default(), data: v.as_bytes().to_vec() }
}

/// Records one answer as the workload does.
fn op(id: u64, process: u64, kind: OpKind, span: (Instant, Instant), start: Instant, answer: Recorded) -> Op {
    let ns = |t: Instant| t.duration_since(start).as_nanos() as u64;
    Op {
        id,
        process,
        kind,
        key: "k".into(),
        value: matches!(kind, OpKind::Resolve | OpKind::Reject).then(|| format!("p{process}-1")),
        invoke_ns: ns(span.0),
        complete_ns: ns(span.1),
        outcome: answer.outcome,
        observed: answer.observed,
        deduplicated: answer.deduplicated,
        node: None,
        detail: answer.detail,
        deadline: None,
        tags: Default::default(),
        search: None,
    }
}

#[tokio::test]
async fn a_retried_settle_answered_from_the_dedup_table_is_its_own_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (grpc, http) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
    let log = std::fs::File::create(dir.path().join("vowd.log")).expect("log file");
    let child = Command::new(vowd())
        .args(["--node-id", "1", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--grpc-addr", &grpc, "--http-addr", &http, "--peers", &format!("1={grpc}"), "--shards", "1"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("starting vowd");
    let _node = Node(child);
    let client = Client::connect(&[&grpc]).expect("client");
    let start = Instant::now();

    // The create, retried until the new node has elected itself.
    let deadline = start + Duration::from_secs(30);
    let (created, create_span) = loop {
        let invoked = Instant::now();
        let req = pb::CreateRequest { id: "k".into(), idempotency_key: "c-p0-1".into(), ..Default::default() };
        match client.create(req).await {
            Ok(r) => break (r, (invoked, Instant::now())),
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the node: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await; // poll until it leads
            }
            Err(e) => panic!("the node never took the create: {e}; see {}", dir.path().display()),
        }
    };
    let create = workload::classify(OpKind::Create, Ok((created.promise, created.deduplicated)));

    // Process 1's resolve: the first attempt takes effect but its answer is lost; the retry, with
    // the same idempotency key as the SDK sends, is answered from the dedup table.
    let invoked = Instant::now();
    let first = client.resolve("k", value("p1-1"), Some("s-p1-1".into())).await.expect("first attempt");
    assert!(!first.deduplicated);
    let retry = client.resolve("k", value("p1-1"), Some("s-p1-1".into())).await.expect("retry");
    let resolve_span = (invoked, Instant::now());
    assert!(retry.deduplicated, "the server did not deduplicate the retry: {retry:?}");
    let resolve = workload::classify(OpKind::Resolve, Ok((retry.promise, retry.deduplicated)));
    assert!(resolve.deduplicated, "the flag is recorded as a field of the op");

    // Process 2's reject loses, and shows the winner; then a get.
    let invoked = Instant::now();
    let refused = client.reject("k", value("p2-1"), Some("s-p2-1".into())).await.map(|r| (r.promise, r.deduplicated));
    let reject = workload::classify(OpKind::Reject, refused);
    let reject_span = (invoked, Instant::now());
    let invoked = Instant::now();
    let got = client.get("k").await.map(|p| (Some(p), false));
    let get = workload::classify(OpKind::Get, got);
    let get_span = (invoked, Instant::now());

    let mut history = vec![
        op(0, 0, OpKind::Create, create_span, start, create),
        // The resolve's answer is the retry's, and nothing else in the history writes "p1-1".
        op(1, 1, OpKind::Resolve, resolve_span, start, resolve),
        op(2, 2, OpKind::Reject, reject_span, start, reject),
        op(3, 3, OpKind::Get, get_span, start, get),
    ];
    let won = Register::Resolved { value: "p1-1".into() };
    assert_eq!(history[2].observed.as_ref(), Some(&won), "the reject was refused with the winner");
    assert_eq!(history[3].observed.as_ref(), Some(&won));
    assert_eq!(check(&history), vec![], "{history:#?}");

    // A deduplicated reply that claimed the other, refused settlement could not be explained:
    // the check has teeth on this real history.
    history[1].observed = Some(Register::Rejected { value: "p2-1".into() });
    let kinds: Vec<String> = check(&history).into_iter().map(|a| a.kind).collect();
    assert_eq!(kinds, ["nonlinearizable", "phantom-value"]);
}
