//! `vow bench --workload chain`: what pipelining saves. A chain of `--steps` functions runs
//!
//! - **pipelined**: one `Submit` registers every step and waits for the last promise; the
//!   cluster calls each function and settles each step itself;
//! - **orchestrated**: what a client does without pipelining — one Submit creates the step
//!   promises, then for each step it calls the function and resolves the step's promise with
//!   the answer (two round trips per step);
//! - **etcd** (with `--compare vow,etcd`): the same orchestration against etcd, each step's result
//!   a put-if-absent of its key — the obvious alternative a user would build;
//! - **pipelined-cold** / **pipelined-prewarm**: pipelined, against functions that take
//!   `--cold-start-ms` on their first call after a second of idling, without and with `prewarm`.
//!
//! The client sits behind an added round-trip delay (`--rtt-ms 0,5,20`): every connection it
//! makes — to vow, to etcd, to the functions — goes through a proxy in this process that holds
//! each chunk for half the delay in each direction. The cluster's own calls to the functions
//! do not: in a pipelined deployment the functions run next to the store, and the client is the
//! one far away. Latency is end to end, from the first request to holding the last step's value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vow_client::{Client, Options, pb};

use crate::etcd::Etcd;
use crate::results::{ChainResult, new_histogram};

/// What the chain run needs from `vow bench`'s arguments.
#[derive(Debug, Clone)]
pub struct ChainArgs {
    pub steps: usize,
    pub iterations: usize,
    pub rtts_ms: Vec<u64>,
    pub cold_start_ms: u64,
    pub functions: Option<String>,
    pub compare_etcd: bool,
    pub etcd: Vec<String>,
    pub out: Option<PathBuf>,
}

/// A TCP proxy to `upstream` that holds every chunk for `one_way` in each direction.
async fn delay_proxy(upstream: String, one_way: Duration) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(&upstream).await else { return };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pump(ri, wo, one_way));
                tokio::spawn(pump(ro, wi, one_way));
            });
        }
    });
    Ok(addr)
}

/// Copies `from` to `to`, each chunk leaving `delay` after it arrived, in order.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// The example functions: a `vow-functions` process beside this binary, unless given.
struct FunctionsProcess {
    child: Option<std::process::Child>,
    base: String,
}

impl FunctionsProcess {
    fn start(given: Option<String>) -> anyhow::Result<FunctionsProcess> {
        use std::io::BufRead;
        if let Some(base) = given {
            return Ok(FunctionsProcess { child: None, base: base.trim_end_matches('/').to_owned() });
        }
        let bin = std::env::current_exe()?.with_file_name("vow-functions");
        let mut child = std::process::Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--idle-ms", "1000"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} (build it with `cargo build --workspace --bins`)", bin.display()))?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("vow-functions stdout")?).read_line(&mut line)?;
        let addr = line.trim().strip_prefix("listening on ").with_context(|| format!("vow-functions said {line:?}"))?;
        Ok(FunctionsProcess { child: Some(child), base: format!("http://{addr}") })
    }
}

impl Drop for FunctionsProcess {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn create(id: String) -> pb::CreateRequest {
    pb::CreateRequest { id, ..Default::default() }
}

fn text(p: &pb::Promise) -> String {
    String::from_utf8_lossy(&p.value.as_ref().map(|v| v.data.clone()).unwrap_or_default()).into_owned()
}

/// The value the chain's last step holds: the input followed by every step's suffix.
fn expected(steps: usize) -> String {
    std::iter::once("x".to_owned()).chain((1..=steps).map(|i| format!("-{i}"))).collect()
}

struct Setup {
    client: Client,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    /// The functions as the cluster reaches them, and as the client does (through the delay).
    functions: String,
    functions_for_client: String,
    etcd: Option<Etcd>,
    steps: usize,
}

impl Setup {
    /// A resolved input promise for one run of a chain.
    async fn input(&self, run: &str) -> anyhow::Result<()> {
        self.client.create(create(format!("{run}-in"))).await?;
        self.client
            .resolve(&format!("{run}-in"), pb::Value { data: b"x".to_vec(), ..Default::default() }, None)
            .await?;
        Ok(())
    }

    fn chain(&self, run: &str, route: impl Fn(usize) -> String, prewarm: bool) -> pb::SubmitRequest {
        let mut req = pb::SubmitRequest { idempotency_key: run.to_owned(), ..Default::default() };
        for i in 1..=self.steps {
            req.promises.push(create(format!("{run}-s{i}")));
            let source = if i == 1 { format!("{run}-in") } else { format!("{run}-s{}", i - 1) };
            req.continuations.push(pb::Continuation {
                id: format!("{run}-c{i}"),
                sources: vec![source],
                target: format!("{run}-s{i}"),
                combinator: 0,
                on: pb::On::Resolved as i32,
                action: Some(pb::continuation::Action::Invoke(pb::Invoke {
                    url: format!("{}{}", self.functions, route(i)),
                    headers: Default::default(),
                    timeout_ms: 10_000,
                    prewarm,
                })),
            });
        }
        req.wait_for = format!("{run}-s{}", self.steps);
        req.wait_timeout_ms = 60_000;
        req
    }

    async fn pipelined(&self, run: &str, route: impl Fn(usize) -> String, prewarm: bool) -> anyhow::Result<String> {
        let reply = self.client.submit(self.chain(run, route, prewarm)).await?;
        Ok(reply.waited.as_ref().map(text).unwrap_or_default())
    }

    /// Calls a function as the client would, through its delayed connection.
    async fn call(&self, route: &str, body: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let request = hyper::Request::post(format!("{}{route}", self.functions_for_client))
            .header("idempotency-key", route)
            .body(Full::new(Bytes::from(body)))?;
        let response = self.http.request(request).await?;
        ensure!(response.status().is_success(), "the function answered {}", response.status());
        Ok(response.into_body().collect().await?.to_bytes().to_vec())
    }

    async fn orchestrated(&self, run: &str) -> anyhow::Result<String> {
        let creates = pb::SubmitRequest {
            promises: (1..=self.steps).map(|i| create(format!("{run}-s{i}"))).collect(),
            idempotency_key: run.to_owned(),
            ..Default::default()
        };
        self.client.submit(creates).await?;
        let mut value = b"x".to_vec();
        for i in 1..=self.steps {
            value = self.call(&format!("/append/-{i}"), value).await?;
            let v = pb::Value { data: value.clone(), ..Default::default() };
            self.client.resolve(&format!("{run}-s{i}"), v, Some(format!("{run}-r{i}"))).await?;
        }
        Ok(String::from_utf8_lossy(&value).into_owned())
    }

    async fn etcd_orchestrated(&self, run: &str) -> anyhow::Result<String> {
        let etcd = self.etcd.as_ref().context("no etcd")?;
        let mut value = b"x".to_vec();
        for i in 1..=self.steps {
            value = self.call(&format!("/append/-{i}"), value).await?;
            etcd.create_with(&format!("{run}-s{i}"), &value).await.map_err(anyhow::Error::msg)?;
        }
        Ok(String::from_utf8_lossy(&value).into_owned())
    }
}

fn percentile_row(variant: &str, rtt_ms: u64, steps: usize, samples: &[Duration]) -> ChainResult {
    let mut h = new_histogram();
    for s in samples {
        let _ = h.record(s.as_micros().max(1) as u64);
    }
    ChainResult {
        variant: variant.to_owned(),
        rtt_ms,
        steps,
        iterations: samples.len(),
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        max_us: h.max(),
        p50_vs_pipelined: 0.0,
    }
}

pub async fn run(args: ChainArgs, endpoints: Vec<String>) -> anyhow::Result<Vec<ChainResult>> {
    ensure!(args.steps >= 1 && args.steps <= 100, "--steps must be 1 to 100");
    ensure!(args.iterations >= 1, "--iterations must be at least 1");
    let functions = FunctionsProcess::start(args.functions.clone())?;
    let functions_addr = functions.base.trim_start_matches("http://").to_owned();
    let run_id = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis());
    let mut results = Vec::new();
    for &rtt in &args.rtts_ms {
        let one_way = Duration::from_micros(rtt * 500);
        let through = |upstream: &str| {
            let upstream = upstream.to_owned();
            async move { if rtt == 0 { Ok(upstream) } else { delay_proxy(upstream, one_way).await.map(|a| a.to_string()) } }
        };
        let mut proxied = Vec::new();
        for e in &endpoints {
            proxied.push(through(e).await?);
        }
        // Only the endpoints given, through the delay: no shortcut to a leader's real address.
        let options =
            Options { follow_leader_hints: false, call_timeout: Duration::from_secs(90), ..Default::default() };
        let client = Client::with_options(&proxied, options)?;
        let etcd = if args.compare_etcd {
            let first = args.etcd.first().context("no etcd endpoint")?;
            Some(Etcd::connect(&through(first).await?)?)
        } else {
            None
        };
        let setup = Setup {
            client,
            http: HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
            functions: functions.base.clone(),
            functions_for_client: format!("http://{}", through(&functions_addr).await?),
            etcd,
            steps: args.steps,
        };
        let want = expected(args.steps);
        let mut samples: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
        // One untimed round first: connections open, caches warm.
        for i in 0..=args.iterations {
            let timed = i > 0;
            let run = format!("chain-{run_id}-{rtt}-{i}");
            setup.input(&format!("{run}-p")).await?;
            let t = Instant::now();
            let got = setup.pipelined(&format!("{run}-p"), |k| format!("/append/-{k}"), false).await?;
            let took = t.elapsed();
            ensure!(got == want, "pipelined chain ended with {got:?}, not {want:?}");
            if timed {
                samples.entry("pipelined").or_default().push(took);
            }
            let t = Instant::now();
            let got = setup.orchestrated(&format!("{run}-o")).await?;
            let took = t.elapsed();
            ensure!(got == want, "orchestrated chain ended with {got:?}");
            if timed {
                samples.entry("orchestrated").or_default().push(took);
            }
            if setup.etcd.is_some() {
                let t = Instant::now();
                let got = setup.etcd_orchestrated(&format!("{run}-e")).await?;
                let took = t.elapsed();
                ensure!(got == want, "etcd chain ended with {got:?}");
                if timed {
                    samples.entry("etcd-orchestrated").or_default().push(took);
                }
            }
        }
        if rtt == args.rtts_ms[0] && args.cold_start_ms > 0 {
            // Cold functions: every run waits out the idle second first, so each step's
            // instance starts cold.
            let cold = args.cold_start_ms;
            for i in 0..args.iterations {
                for (variant, prewarm) in [("pipelined-cold", false), ("pipelined-prewarm", true)] {
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    let run = format!("cold-{run_id}-{i}-{prewarm}");
                    setup.input(&run).await?;
                    let t = Instant::now();
                    let got = setup.pipelined(&run, |k| format!("/cold/{cold}/-{k}"), prewarm).await?;
                    let took = t.elapsed();
                    ensure!(got == want, "{variant} chain ended with {got:?}");
                    samples.entry(variant).or_default().push(took);
                }
            }
        }
        let base = percentile_row("pipelined", rtt, args.steps, &samples["pipelined"]).p50_us as f64;
        for (variant, s) in &samples {
            let mut row = percentile_row(variant, rtt, args.steps, s);
            row.p50_vs_pipelined = row.p50_us as f64 / base.max(1.0);
            results.push(row);
        }
    }
    print_table(&results);
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&results)?)?;
        crate::plot::chain(&dir.join("chain.svg"), &results)?;
        eprintln!("wrote results.json and chain.svg to {}", dir.display());
    }
    if results.is_empty() {
        bail!("nothing was measured");
    }
    Ok(results)
}

fn print_table(results: &[ChainResult]) {
    println!(
        "{:<20} {:>7} {:>6} {:>10} {:>10} {:>10} {:>14}",
        "variant", "rtt_ms", "steps", "p50_ms", "p99_ms", "max_ms", "p50/pipelined"
    );
    for r in results {
        println!(
            "{:<20} {:>7} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>14.2}",
            r.variant,
            r.rtt_ms,
            r.steps,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.max_us as f64 / 1000.0,
            r.p50_vs_pipelined
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_delay_proxy_adds_its_round_trip_and_keeps_the_bytes() -> anyhow::Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let echo_addr = echo.local_addr()?;
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let proxy = delay_proxy(echo_addr.to_string(), Duration::from_millis(10)).await?;
        let mut s = TcpStream::connect(proxy).await?;
        let t = Instant::now();
        s.write_all(b"hello").await?;
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await?;
        assert_eq!(&got, b"hello");
        assert!(t.elapsed() >= Duration::from_millis(20), "a round trip through it takes {:?}", t.elapsed());
        Ok(())
    }

    #[test]
    fn the_expected_value_names_every_step() {
        assert_eq!(expected(3), "x-1-2-3");
    }
}
