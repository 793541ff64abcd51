//! The pipeline workload: while the faults run, one client submits a chain every
//! [`CHAIN_EVERY`] — four steps over ids that hash to different shards, two calling real HTTP
//! functions (one failing transiently once per call key), two forwarding — and resolves its
//! input. After the final heal every chain is checked ([`check`]):
//!
//! - **exactly once, with the right value**: each step's promise is resolved with the value its
//!   source implies (`v<n>-1`, `v<n>-1`, `v<n>-1-3`, `v<n>-1-3`) by its own continuation, i.e.
//!   with the settle idempotency key `vow-cont:<continuation id>` — a promise is write-once, so
//!   a second settlement would show as another key or another value ("pipeline-wrong");
//! - **no chain stuck**: every chain whose Submit and input resolve were acknowledged completes
//!   within [`SETTLE_AFTER_HEAL`] of the check's start ("pipeline-stuck").
//!
//! A chain whose Submit was not acknowledged may exist in part, or not at all; what of it exists
//! is held to the same values, but it need not complete.
//!
//! The functions are a `vow-functions` process beside the vowd binary, listening on the bridge
//! address, which every node reaches whatever the partition (partitions cut node-to-node
//! traffic only).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use vow_client::{Client, Error, pb};

use crate::history::{Anomaly, PipelineTally};

/// How often the pipeline client submits a chain.
pub const CHAIN_EVERY: Duration = Duration::from_millis(300);
/// How long after the check starts every acknowledged chain must have completed.
pub const SETTLE_AFTER_HEAL: Duration = Duration::from_secs(30);
/// How long one chain's Submit or resolve is retried (same idempotency key) before it counts as
/// not acknowledged.
const RETRY_FOR: Duration = Duration::from_secs(8);
const STEPS: usize = 4;

/// One chain as the client left it.
#[derive(Debug, Clone)]
pub struct Chain {
    pub n: u64,
    pub acknowledged: bool,
}

fn id(n: u64, part: &str) -> String {
    format!("p{n}-{part}")
}

/// What step `i` (1-based) of chain `n` must hold.
fn expected(n: u64, step: usize) -> String {
    match step {
        1 | 2 => format!("v{n}-1"),
        _ => format!("v{n}-1-3"),
    }
}

fn request(n: u64, functions: &str) -> pb::SubmitRequest {
    let step = |i: usize, action: pb::continuation::Action| pb::Continuation {
        id: id(n, &format!("c{i}")),
        sources: vec![if i == 1 { id(n, "in") } else { id(n, &format!("s{}", i - 1)) }],
        target: id(n, &format!("s{i}")),
        combinator: 0,
        on: pb::On::Resolved as i32,
        action: Some(action),
    };
    let invoke = |route: &str| {
        pb::continuation::Action::Invoke(pb::Invoke {
            url: format!("{functions}{route}"),
            headers: Default::default(),
            timeout_ms: 2_000,
            prewarm: false,
        })
    };
    let forward = || pb::continuation::Action::Forward(pb::Forward { recover: false });
    let create = |part: &str| pb::CreateRequest { id: id(n, part), ..Default::default() };
    pb::SubmitRequest {
        promises: std::iter::once(create("in")).chain((1..=STEPS).map(|i| create(&format!("s{i}")))).collect(),
        continuations: vec![
            step(1, invoke("/append/-1")),
            step(2, forward()),
            step(3, invoke("/flaky/1/-3")),
            step(4, forward()),
        ],
        idempotency_key: format!("p{n}"),
        ..Default::default()
    }
}

/// Retries `f` with the same request until it succeeds, is refused for good, or [`RETRY_FOR`]
/// passes.
async fn retried<T, F, Fut>(mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let until = Instant::now() + RETRY_FOR;
    loop {
        match f().await {
            Err(Error::Unavailable { .. }) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => return other,
        }
    }
}

/// Submits chains until `until_ns` (nanoseconds since `start`).
pub async fn client(client: Client, functions: String, start: Instant, until_ns: Arc<AtomicU64>) -> Vec<Chain> {
    let mut chains = Vec::new();
    let mut n = 0;
    while (start.elapsed().as_nanos() as u64) < until_ns.load(Ordering::Relaxed) {
        n += 1;
        let req = request(n, &functions);
        let submitted = retried(|| client.submit(req.clone())).await.is_ok();
        let input = id(n, "in");
        let resolved = submitted
            && retried(|| {
                let value = pb::Value { data: format!("v{n}").into_bytes(), ..Default::default() };
                client.resolve(&input, value, Some(format!("p{n}-in")))
            })
            .await
            .is_ok();
        chains.push(Chain { n, acknowledged: submitted && resolved });
        tokio::time::sleep(CHAIN_EVERY).await;
    }
    chains
}

/// Checks every chain on the healed cluster (see the module docs).
pub async fn check(client: &Client, chains: &[Chain], function_calls: u64) -> (PipelineTally, Vec<Anomaly>) {
    let deadline = Instant::now() + SETTLE_AFTER_HEAL;
    let mut tally = PipelineTally { submitted: chains.len(), function_calls, ..Default::default() };
    let mut anomalies = Vec::new();
    for chain in chains {
        let n = chain.n;
        tally.acknowledged += usize::from(chain.acknowledged);
        let last = id(n, &format!("s{STEPS}"));
        if chain.acknowledged {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
            match client.await_settled(&last, left).await {
                Ok(p) if p.state != pb::State::Pending as i32 => tally.completed += 1,
                other => {
                    tally.stuck += 1;
                    anomalies.push(Anomaly {
                        key: last.clone(),
                        kind: "pipeline-stuck".into(),
                        detail: format!("chain p{n} was acknowledged but had not completed {SETTLE_AFTER_HEAL:?} after the heal: {other:?}"),
                        op_ids: vec![],
                    });
                    continue;
                }
            }
        }
        let mut wrong = Vec::new();
        for i in 1..=STEPS {
            let step = id(n, &format!("s{i}"));
            let record = match client.get(&step).await {
                Ok(p) => p,
                Err(Error::NotFound(_)) if !chain.acknowledged => continue,
                Err(e) => {
                    wrong.push(format!("{step}: unreadable: {e}"));
                    continue;
                }
            };
            if record.state == pb::State::Pending as i32 {
                continue; // only an unacknowledged chain gets here
            }
            let value =
                record.value.as_ref().map(|v| String::from_utf8_lossy(&v.data).into_owned()).unwrap_or_default();
            let key = format!("vow-cont:{}", id(n, &format!("c{i}")));
            if record.state != pb::State::Resolved as i32
                || value != expected(n, i)
                || record.idempotency_key_settle != key
            {
                wrong.push(format!(
                    "{step} is state {} with {value:?} settled by {:?}; expected RESOLVED with {:?} by {key:?}",
                    record.state,
                    record.idempotency_key_settle,
                    expected(n, i)
                ));
            }
        }
        if !wrong.is_empty() {
            tally.wrong += 1;
            anomalies.push(Anomaly {
                key: id(n, "s1"),
                kind: "pipeline-wrong".into(),
                detail: wrong.join("; "),
                op_ids: vec![],
            });
        }
    }
    (tally, anomalies)
}

/// A `vow-functions` process on the bridge address, beside the vowd binary.
#[derive(Debug)]
pub struct Functions {
    child: std::process::Child,
    pub base: String,
}

impl Functions {
    pub fn start(vowd: &Path, listen_ip: &str) -> anyhow::Result<Functions> {
        use std::io::BufRead;
        let bin = vowd.with_file_name("vow-functions");
        let mut child = std::process::Command::new(&bin)
            .args(["--listen", &format!("{listen_ip}:0")])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("vow-functions stdout")?).read_line(&mut line)?;
        let addr = line.trim().strip_prefix("listening on ").with_context(|| format!("vow-functions said {line:?}"))?;
        Ok(Functions { child, base: format!("http://{addr}") })
    }

    /// How many calls the functions served.
    pub fn calls(&self) -> u64 {
        let addr = self.base.trim_start_matches("http://");
        let body = (|| -> anyhow::Result<String> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET /calls HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
        })();
        body.ok()
            .and_then(|b| serde_json::from_str::<std::collections::BTreeMap<String, u64>>(&b).ok())
            .map_or(0, |calls| calls.values().sum())
    }
}

impl Drop for Functions {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_spans_shards_and_names_what_each_step_must_hold() {
        let req = request(7, "http://f");
        assert_eq!(req.promises.len(), STEPS + 1);
        assert_eq!(req.continuations[0].sources, ["p7-in"]);
        assert_eq!(req.continuations[3].target, "p7-s4");
        assert_eq!(expected(7, 2), "v7-1");
        assert_eq!(expected(7, 4), "v7-1-3");
    }
}
