//! `vow bench`: closed-loop load against vow and, for comparison, etcd — the obvious alternative a
//! user would try (create = "put if absent", settle = "put if version is 1", both durable).
//!
//! Each client is its own connection and runs one operation at a time; throughput is operations
//! completed after the warm-up divided by the measured time; latencies go into HDR histograms.
//! With `--compare vow,etcd` both targets run the same workload, interleaved per client count.
//!
//! Workloads:
//! - `create-settle`: create a promise with a unique id, then resolve it with a value of
//!   `--value-size` bytes; both steps count as operations.
//! - `get`: linearizable reads of promises created before the run.
//! - `await-latency` (vow only): one connection awaits a promise while another resolves it; the
//!   latency is from the resolve being acknowledged to the await returning.
//! - `chain`: a chain of `--steps` functions, pipelined against orchestrated by the client, behind
//!   added round trips (`--rtt-ms`); see [`crate::chain`]. Runs alone.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::sync::Barrier;
use vow_client::{Client, Options, pb};

use crate::etcd::{self, Etcd};
use crate::results::{BenchResult, new_histogram};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// create-settle, get, await-latency (comma-separated for several), or chain (alone).
    #[arg(long, default_value = "create-settle")]
    workload: String,
    /// Client counts to run, e.g. 1,16,64,256.
    #[arg(long, default_value = "1,16,64")]
    clients: String,
    /// Measured time per run.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Time run before measuring, per run.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    warmup: Duration,
    /// Bytes of data in each resolve value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Targets to run, e.g. `vow` or `vow,etcd` (side by side, with ratios).
    #[arg(long, default_value = "vow")]
    compare: String,
    /// Start local N-node clusters of each target (in temporary directories) instead of using endpoints.
    #[arg(long)]
    spawn: Option<u64>,
    /// Shards of a spawned vow cluster (vowd's default: 8).
    #[arg(long, default_value_t = 8)]
    shards: u32,
    /// etcd client endpoints (`host:port,...`) when not spawning.
    #[arg(long, default_value = "127.0.0.1:2379")]
    etcd_endpoints: String,
    /// Write results.json, throughput.svg and latency.svg here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Stop each run after this many promises were created (the scale test's loader) instead of
    /// after --duration; throughput is then over the time the run took.
    #[arg(long)]
    promises: Option<u64>,
    /// chain: functions per chain.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// chain: timed chains per variant and delay.
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// chain: added client round trips to run, in ms.
    #[arg(long, default_value = "0,5,20")]
    rtt_ms: String,
    /// chain: a function's start-up time after idling (the cold/prewarm variants; 0: skip them).
    #[arg(long, default_value_t = 100)]
    cold_start_ms: u64,
    /// chain: base URL of running `vow-functions`; default: start one beside this binary.
    #[arg(long)]
    functions: Option<String>,
}

/// Summarises a latency histogram (microseconds) and an error count over `elapsed`.
pub fn summarize(
    target: &str,
    workload: &str,
    clients: usize,
    h: &Histogram<u64>,
    errors: u64,
    elapsed: Duration,
) -> BenchResult {
    let ops = h.len();
    BenchResult {
        target: target.to_owned(),
        workload: workload.to_owned(),
        clients,
        step: 0,
        ops,
        ops_per_sec: if elapsed.is_zero() { 0.0 } else { ops as f64 / elapsed.as_secs_f64() },
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        errors,
    }
}

/// A system under test, as one client connection sees it.
#[derive(Clone)]
enum Conn {
    Vow(Client),
    Etcd(Etcd),
}

impl Conn {
    async fn create(&self, id: &str) -> Result<(), String> {
        match self {
            Conn::Vow(c) => c
                .create(pb::CreateRequest { id: id.to_owned(), ..Default::default() })
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Conn::Etcd(e) => e.create(id).await,
        }
    }

    async fn settle(&self, id: &str, value: &[u8]) -> Result<(), String> {
        match self {
            Conn::Vow(c) => {
                let v = pb::Value { headers: Default::default(), data: value.to_vec() };
                c.resolve(id, v, None).await.map(drop).map_err(|e| e.to_string())
            }
            Conn::Etcd(e) => e.settle(id, value).await,
        }
    }

    async fn get(&self, id: &str) -> Result<(), String> {
        match self {
            Conn::Vow(c) => c.get(id).await.map(drop).map_err(|e| e.to_string()),
            Conn::Etcd(e) => e.get(id).await,
        }
    }
}

struct Recorder {
    hist: Histogram<u64>,
    errors: u64,
    measure_from: Instant,
    progress: Arc<AtomicU64>,
}

impl Recorder {
    fn record(&mut self, started: Instant, ok: bool) {
        self.progress.fetch_add(1, Ordering::Relaxed);
        if started < self.measure_from {
            return;
        }
        if ok {
            let _ = self.hist.record(started.elapsed().as_micros().clamp(1, 60_000_000) as u64);
        } else {
            self.errors += 1;
        }
    }
}

/// What one client of a run does.
struct Job {
    workload: String,
    /// Makes this client's promise ids unique.
    tag: String,
    value: Vec<u8>,
    measure_from: Instant,
    until: Instant,
    /// Ids to read, for `get`.
    preloaded: Arc<Vec<String>>,
    progress: Arc<AtomicU64>,
    /// Promises left to create, when the run is bounded by count rather than time.
    budget: Option<Arc<AtomicU64>>,
}

async fn one_client(job: Job, conn: Conn, waiter: Option<Client>) -> Recorder {
    let Job { workload, tag, value, measure_from, until, preloaded, progress, budget } = job;
    let mut rec = Recorder { hist: new_histogram(), errors: 0, measure_from, progress };
    let mut n = 0u64;
    while Instant::now() < until {
        if let Some(b) = &budget
            && b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(1)).is_err()
        {
            break;
        }
        n += 1;
        let id = format!("bench-{tag}-{n}");
        match workload.as_str() {
            "create-settle" => {
                let t = Instant::now();
                let created = conn.create(&id).await;
                rec.record(t, created.is_ok());
                if created.is_err() {
                    continue;
                }
                let t = Instant::now();
                let settled = conn.settle(&id, &value).await;
                rec.record(t, settled.is_ok());
            }
            "get" => {
                let t = Instant::now();
                let got = conn.get(&preloaded[(n as usize) % preloaded.len()]).await;
                rec.record(t, got.is_ok());
            }
            "await-latency" => {
                let (Conn::Vow(client), Some(waiter)) = (&conn, &waiter) else { return rec };
                if client.create(pb::CreateRequest { id: id.clone(), ..Default::default() }).await.is_err() {
                    rec.errors += 1;
                    continue;
                }
                let w = waiter.clone();
                let wid = id.clone();
                let waiting = tokio::spawn(async move {
                    let p = w.await_settled(&wid, Duration::from_secs(10)).await;
                    (Instant::now(), p.map(|p| p.state == pb::State::Resolved as i32).unwrap_or(false))
                });
                // The await must reach the server before the resolve for the measurement to mean anything.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let v = pb::Value { headers: Default::default(), data: value.clone() };
                let resolved = client.resolve(&id, v, None).await;
                let acked = Instant::now();
                rec.progress.fetch_add(1, Ordering::Relaxed);
                match (resolved, waiting.await) {
                    (Ok(_), Ok((returned, true))) if acked >= measure_from => {
                        let us = returned.saturating_duration_since(acked).as_micros().clamp(1, 60_000_000) as u64;
                        let _ = rec.hist.record(us);
                    }
                    (Ok(_), Ok((_, true))) => {}
                    _ => rec.errors += 1,
                }
            }
            other => unreachable!("workload {other} was validated"),
        }
    }
    rec
}

/// A vow cluster and how its clients are secured.
#[derive(Debug, Clone, Default)]
pub struct VowTarget {
    pub endpoints: Vec<String>,
    pub tls: Option<vow_client::tls::ClientTls>,
    pub token: Option<vow_client::tls::Token>,
}

/// Where each target is reached.
struct Endpoints {
    vow: VowTarget,
    /// `vow-tls`: a spawned cluster running `vow dev up --tls`.
    vow_tls: VowTarget,
    etcd: Vec<String>,
}

impl VowTarget {
    fn spawned(s: &crate::dev::Spawned) -> anyhow::Result<VowTarget> {
        let (tls, token) = s.security()?;
        Ok(VowTarget { endpoints: s.endpoints(), tls, token })
    }
}

impl Endpoints {
    fn vow(&self, target: &str) -> &VowTarget {
        if target == "vow-tls" { &self.vow_tls } else { &self.vow }
    }
}

fn vow_client(target: &VowTarget, c: usize) -> anyhow::Result<Client> {
    // Start each client at a different node; the client then follows leader hints.
    let mut rotated = target.endpoints.clone();
    let n = rotated.len().max(1);
    rotated.rotate_left(c % n);
    Ok(Client::with_options(
        &rotated,
        Options {
            call_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
            tls: target.tls.clone(),
            token: target.token.clone(),
            ..Default::default()
        },
    )?)
}

fn conn(target: &str, ep: &Endpoints, c: usize) -> anyhow::Result<Conn> {
    Ok(match target {
        "vow" | "vow-tls" => Conn::Vow(vow_client(ep.vow(target), c)?),
        _ => Conn::Etcd(Etcd::connect(&ep.etcd[c % ep.etcd.len()])?),
    })
}

/// Runs one workload at one client count against one target. Returns the summary and the histogram.
async fn run_one(
    target: &str,
    ep: &Endpoints,
    workload: &str,
    clients: usize,
    args: &BenchArgs,
    run_id: &str,
) -> anyhow::Result<(BenchResult, Histogram<u64>)> {
    let preloaded: Arc<Vec<String>> = if workload == "get" {
        let c = conn(target, ep, 0)?;
        let mut ids = Vec::new();
        for i in 0..1000 {
            let id = format!("bench-{run_id}-{target}-get-{clients}-{i}");
            c.create(&id).await.map_err(|e| anyhow::anyhow!("preloading promises for get: {e}"))?;
            ids.push(id);
        }
        Arc::new(ids)
    } else {
        Arc::new(Vec::new())
    };
    let progress = Arc::new(AtomicU64::new(0));
    let start_line = Arc::new(Barrier::new(clients + 1));
    let now = Instant::now() + Duration::from_millis(200);
    let budget = args.promises.map(|n| Arc::new(AtomicU64::new(n)));
    let (measure_from, until) = match budget {
        // Count-bounded: measure everything, stop when the budget is spent.
        Some(_) => (now, now + Duration::from_secs(24 * 3600)),
        None => (now + args.warmup, now + args.warmup + args.duration),
    };
    let mut tasks = Vec::new();
    for c in 0..clients {
        let connection = conn(target, ep, c)?;
        let waiter = if workload == "await-latency" { Some(vow_client(ep.vow(target), c + 1)?) } else { None };
        let job = Job {
            workload: workload.to_owned(),
            tag: format!("{run_id}-{target}-{workload}-{clients}-{c}"),
            value: vec![b'v'; args.value_size],
            measure_from,
            until,
            preloaded: preloaded.clone(),
            progress: progress.clone(),
            budget: budget.clone(),
        };
        let barrier = start_line.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            one_client(job, connection, waiter).await
        }));
    }
    let bar = (!args.quiet).then(|| {
        let total = (args.warmup + args.duration).as_secs().max(1);
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix:>34} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!("{target} {workload} x{clients}"));
        bar
    });
    start_line.wait().await;
    if let Some(bar) = &bar {
        if let Some(n) = args.promises {
            bar.set_length(n);
        }
        while Instant::now() < until && !tasks.iter().all(|t| t.is_finished()) {
            tokio::time::sleep(Duration::from_millis(250)).await; // progress refresh
            let done = match args.promises {
                Some(n) => n - budget.as_ref().map_or(0, |b| b.load(Ordering::Relaxed)),
                None => now.elapsed().as_secs(),
            };
            bar.set_position(done.min(bar.length().unwrap_or(0)));
            bar.set_message(format!("{} ops", progress.load(Ordering::Relaxed)));
        }
        bar.finish_and_clear();
    }
    let mut hist = new_histogram();
    let mut errors = 0;
    for t in tasks {
        let r = t.await?;
        hist.add(&r.hist).context("merging histograms")?;
        errors += r.errors;
    }
    let elapsed = if args.promises.is_some() { now.elapsed() } else { args.duration };
    Ok((summarize(target, workload, clients, &hist, errors, elapsed), hist))
}

pub fn print_table(results: &[BenchResult]) {
    println!(
        "{:<6} {:<14} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>16}",
        "target",
        "workload",
        "clients",
        "ops/s",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us",
        "errors",
        "vs etcd ops, p99"
    );
    for r in results {
        let ratio = match etcd_peer(results, r) {
            Some(p) if r.target != "etcd" && p.ops_per_sec > 0.0 && p.p99_us > 0 => {
                format!("{:.2}x, {:.2}x", r.ops_per_sec / p.ops_per_sec, r.p99_us as f64 / p.p99_us as f64)
            }
            _ => String::new(),
        };
        println!(
            "{:<6} {:<14} {:>7} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>16}",
            r.target,
            r.workload,
            r.clients,
            r.ops_per_sec,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            r.errors,
            ratio
        );
    }
}

/// The etcd run that `r` is compared with: the same workload and step.
fn etcd_peer<'a>(results: &'a [BenchResult], r: &BenchResult) -> Option<&'a BenchResult> {
    results.iter().find(|p| p.target == "etcd" && p.workload == r.workload && p.step == r.step)
}

pub async fn run(args: BenchArgs, vow: VowTarget) -> anyhow::Result<()> {
    let workloads: Vec<String> = args.workload.split(',').map(|s| s.trim().to_owned()).collect();
    if workloads.iter().any(|w| w == "chain") {
        if workloads.len() > 1 {
            bail!("the chain workload runs alone");
        }
        return run_chain(&args, vow.endpoints).await;
    }
    for w in &workloads {
        if !["create-settle", "get", "await-latency"].contains(&w.as_str()) {
            bail!("unknown workload {w:?} (create-settle, get, await-latency)");
        }
    }
    let targets: Vec<String> = args.compare.split(',').map(|s| s.trim().to_owned()).collect();
    for t in &targets {
        if !["vow", "vow-tls", "etcd"].contains(&t.as_str()) {
            bail!("unknown target {t:?} (vow, vow-tls, etcd)");
        }
        if t == "vow-tls" && args.spawn.is_none() {
            bail!(
                "the vow-tls target is a spawned cluster: give --spawn N (for your own TLS cluster, use target vow with --tls-ca and --token)"
            );
        }
    }
    let counts: Vec<usize> = args
        .clients
        .split(',')
        .map(|s| s.trim().parse::<usize>().map_err(|_| anyhow::anyhow!("--clients {s:?} is not a number")))
        .collect::<anyhow::Result<_>>()?;
    if counts.iter().any(|c| *c == 0 || *c > 4096) {
        bail!("client counts must be between 1 and 4096");
    }
    let vow_cluster = match (args.spawn, targets.iter().any(|t| t == "vow")) {
        (Some(n), true) => Some(crate::dev::Spawned::start(n, args.shards, false).await?),
        _ => None,
    };
    let vow_tls_cluster = match (args.spawn, targets.iter().any(|t| t == "vow-tls")) {
        (Some(n), true) => Some(crate::dev::Spawned::start(n, args.shards, true).await?),
        _ => None,
    };
    let etcd_cluster = match (args.spawn, targets.iter().any(|t| t == "etcd")) {
        (Some(n), true) => Some(etcd::Spawned::start(n).await?),
        _ => None,
    };
    let ep = Endpoints {
        vow: vow_cluster.as_ref().map_or(Ok(vow), VowTarget::spawned)?,
        vow_tls: vow_tls_cluster.as_ref().map_or(Ok(VowTarget::default()), VowTarget::spawned)?,
        etcd: etcd_cluster.as_ref().map_or_else(
            || args.etcd_endpoints.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
            |s| s.endpoints(),
        ),
    };
    let run_id = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis());
    let mut results = Vec::new();
    let mut histograms = Vec::new();
    for w in &workloads {
        for (step, &c) in counts.iter().enumerate() {
            // Ids are unique per step, so a client count given twice does not re-create ids.
            let step_id = format!("{run_id}-{step}");
            for t in &targets {
                if t == "etcd" && w == "await-latency" {
                    continue; // etcd has watches, not awaits; the comparison would not be like for like
                }
                let (mut r, h) = run_one(t, &ep, w, c, &args, &step_id).await?;
                r.step = step;
                if r.errors > 0 {
                    eprintln!("warning: {} operations failed: {t} {w} with {c} clients", r.errors);
                }
                results.push(r.clone());
                histograms.push((r, h));
            }
        }
    }
    print_table(&results);
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&results)?)?;
        crate::plot::throughput(&dir.join("throughput.svg"), &results)?;
        crate::plot::latency_cdf(&dir.join("latency.svg"), &histograms)?;
        eprintln!("wrote results.json, throughput.svg and latency.svg to {}", dir.display());
    }
    for s in [vow_cluster, vow_tls_cluster].into_iter().flatten() {
        s.stop().await?;
    }
    if let Some(s) = etcd_cluster {
        s.stop();
    }
    if results.iter().any(|r| r.errors > 0) {
        bail!("the run had errors (see the errors column)");
    }
    Ok(())
}

/// `--workload chain`, on the given or spawned clusters.
async fn run_chain(args: &BenchArgs, vow_endpoints: Vec<String>) -> anyhow::Result<()> {
    let compare_etcd = args.compare.split(',').any(|t| t.trim() == "etcd");
    let vow_cluster = match args.spawn {
        Some(n) => Some(crate::dev::Spawned::start(n, args.shards, false).await?),
        None => None,
    };
    let etcd_cluster = match (args.spawn, compare_etcd) {
        (Some(n), true) => Some(etcd::Spawned::start(n).await?),
        _ => None,
    };
    let rtts_ms = args
        .rtt_ms
        .split(',')
        .map(|s| s.trim().parse::<u64>().map_err(|_| anyhow::anyhow!("--rtt-ms {s:?} is not a number")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if rtts_ms.is_empty() {
        bail!("--rtt-ms names no delay");
    }
    let chain_args = crate::chain::ChainArgs {
        steps: args.steps,
        iterations: args.iterations,
        rtts_ms,
        cold_start_ms: args.cold_start_ms,
        functions: args.functions.clone(),
        compare_etcd,
        etcd: etcd_cluster.as_ref().map_or_else(
            || args.etcd_endpoints.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
            |s| s.endpoints(),
        ),
        out: args.out.clone(),
    };
    let endpoints = vow_cluster.as_ref().map_or(vow_endpoints, |s| s.endpoints());
    let result = crate::chain::run(chain_args, endpoints).await;
    if let Some(s) = vow_cluster {
        s.stop().await?;
    }
    if let Some(s) = etcd_cluster {
        s.stop();
    }
    result.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            h.record(us).expect("in range");
        }
        let r = summarize("vow", "get", 4, &h, 2, Duration::from_secs(2));
        assert_eq!(r.ops, 1000);
        assert!((r.ops_per_sec - 500.0).abs() < 1e-9);
        assert!((499..=501).contains(&r.p50_us), "{}", r.p50_us);
        assert!((989..=991).contains(&r.p99_us), "{}", r.p99_us);
        assert_eq!(r.max_us, 1000);
        assert_eq!(r.errors, 2);
    }

    #[test]
    fn results_serialize_with_the_documented_fields() -> anyhow::Result<()> {
        let r = summarize("vow", "create-settle", 64, &new_histogram(), 0, Duration::from_secs(1));
        let v: serde_json::Value = serde_json::to_value(&r)?;
        for field in [
            "target",
            "workload",
            "clients",
            "ops_per_sec",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
            "errors",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["clients"], 64);
        Ok(())
    }

    #[test]
    fn a_client_count_given_twice_is_compared_step_by_step() {
        let row = |target: &str, step: usize, ops_per_sec: f64| BenchResult {
            target: target.to_owned(),
            step,
            ops_per_sec,
            ..summarize(target, "create-settle", 64, &new_histogram(), 0, Duration::from_secs(1))
        };
        let results = [row("vow", 0, 300.0), row("etcd", 0, 100.0), row("vow", 1, 400.0), row("etcd", 1, 200.0)];
        let peer = |i: usize| etcd_peer(&results, &results[i]).map(|p| p.ops_per_sec);
        assert_eq!(peer(0), Some(100.0));
        assert_eq!(peer(2), Some(200.0), "the second vow run is compared with the etcd run beside it");
    }
}
