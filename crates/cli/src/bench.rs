//! `vow bench`: closed-loop load against a vow cluster, with latency percentiles from HDR
//! histograms. Each client is its own connection and runs one operation at a time; throughput
//! is operations completed after the warm-up divided by the measured time.
//!
//! Workloads:
//! - `create-settle`: create a promise with a unique id, then resolve it with a value of
//!   `--value-size` bytes; both steps count as operations.
//! - `get`: linearizable reads of promises created before the run.
//! - `await-latency`: one connection awaits a promise while another resolves it; the latency is
//!   from the resolve being acknowledged to the await returning.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Barrier;
use vow_client::{Client, Options, pb};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// create-settle, get or await-latency (comma-separated for several).
    #[arg(long, default_value = "create-settle")]
    workload: String,
    /// Client counts to run, e.g. 1,16,64.
    #[arg(long, default_value = "1,16,64")]
    clients: String,
    /// Measured time per client count.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Time run before measuring, per client count.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    warmup: Duration,
    /// Bytes of data in each resolve value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Start a local N-node cluster for the run (in a temporary directory) instead of using --endpoints.
    #[arg(long)]
    spawn: Option<u64>,
    /// Write results.json here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One row of results: a target, a workload and a client count.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchResult {
    pub target: String,
    pub workload: String,
    pub clients: usize,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub errors: u64,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

/// Summarises a latency histogram (microseconds) and a count over `elapsed`.
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

struct Recorder {
    hist: Histogram<u64>,
    errors: u64,
    measure_from: Instant,
}

impl Recorder {
    fn record(&mut self, started: Instant, ok: bool) {
        if started < self.measure_from {
            return;
        }
        if ok {
            let us = started.elapsed().as_micros().clamp(1, 60_000_000) as u64;
            let _ = self.hist.record(us);
        } else {
            self.errors += 1;
        }
    }
}

fn client_for(endpoints: &[String]) -> anyhow::Result<Client> {
    Ok(Client::with_options(
        endpoints,
        Options { call_timeout: Duration::from_secs(10), attempt_timeout: Duration::from_secs(5) },
    )?)
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
}

async fn one_client(job: Job, client: Client, waiter: Client) -> Recorder {
    let Job { workload, tag, value, measure_from, until, preloaded } = job;
    let mut rec = Recorder { hist: new_histogram(), errors: 0, measure_from };
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let id = format!("bench-{tag}-{n}");
        match workload.as_str() {
            "create-settle" => {
                let t = Instant::now();
                let created = client.create(pb::CreateRequest { id: id.clone(), ..Default::default() }).await;
                rec.record(t, created.is_ok());
                if created.is_err() {
                    continue;
                }
                let t = Instant::now();
                let v = pb::Value { headers: Default::default(), data: value.clone() };
                let settled = client.resolve(&id, v, None).await;
                rec.record(t, settled.is_ok());
            }
            "get" => {
                let id = &preloaded[(n as usize) % preloaded.len()];
                let t = Instant::now();
                let got = client.get(id).await;
                rec.record(t, got.is_ok());
            }
            "await-latency" => {
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
                // The await must be registered before the resolve; give it a moment.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let v = pb::Value { headers: Default::default(), data: value.clone() };
                let resolved = client.resolve(&id, v, None).await;
                let acked = Instant::now();
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

/// Runs one workload at one client count against `endpoints`.
pub async fn run_one(
    endpoints: &[String],
    workload: &str,
    clients: usize,
    args: &BenchArgs,
    run_id: &str,
) -> anyhow::Result<BenchResult> {
    let preloaded: Arc<Vec<String>> = if workload == "get" {
        let c = client_for(endpoints)?;
        let mut ids = Vec::new();
        for i in 0..1000 {
            let id = format!("bench-{run_id}-get-{clients}-{i}");
            c.create(pb::CreateRequest { id: id.clone(), ..Default::default() })
                .await
                .context("preloading promises for get")?;
            ids.push(id);
        }
        Arc::new(ids)
    } else {
        Arc::new(Vec::new())
    };
    let start_line = Arc::new(Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    let (measure_from, until) = {
        let now = Instant::now() + Duration::from_millis(200);
        (now + args.warmup, now + args.warmup + args.duration)
    };
    for c in 0..clients {
        let client = client_for(endpoints)?;
        let waiter = client_for(endpoints)?;
        let job = Job {
            workload: workload.to_owned(),
            tag: format!("{run_id}-{workload}-{clients}-{c}"),
            value: vec![b'v'; args.value_size],
            measure_from,
            until,
            preloaded: preloaded.clone(),
        };
        let barrier = start_line.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            one_client(job, client, waiter).await
        }));
    }
    start_line.wait().await;
    let mut hist = new_histogram();
    let mut errors = 0;
    for t in tasks {
        let r = t.await?;
        hist.add(&r.hist).context("merging histograms")?;
        errors += r.errors;
    }
    Ok(summarize("vow", workload, clients, &hist, errors, args.duration))
}

pub fn print_table(results: &[BenchResult]) {
    println!(
        "{:<6} {:<14} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "target", "workload", "clients", "ops/s", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "errors"
    );
    for r in results {
        println!(
            "{:<6} {:<14} {:>7} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            r.target, r.workload, r.clients, r.ops_per_sec, r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.max_us, r.errors
        );
    }
}

pub async fn run(args: BenchArgs, endpoints: Vec<String>) -> anyhow::Result<()> {
    let workloads: Vec<String> = args.workload.split(',').map(|s| s.trim().to_owned()).collect();
    for w in &workloads {
        if !["create-settle", "get", "await-latency"].contains(&w.as_str()) {
            bail!("unknown workload {w:?} (create-settle, get, await-latency)");
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
    let spawned = match args.spawn {
        Some(n) => Some(crate::dev::Spawned::start(n).await?),
        None => None,
    };
    let endpoints = spawned.as_ref().map_or(endpoints, |s| s.endpoints());
    let run_id = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis());
    let mut results = Vec::new();
    for w in &workloads {
        for &c in &counts {
            eprintln!("running {w} with {c} clients for {:?} (+{:?} warm-up)", args.duration, args.warmup);
            let r = run_one(&endpoints, w, c, &args, &run_id).await?;
            if r.errors > 0 {
                eprintln!("warning: {} operations failed in {w} with {c} clients", r.errors);
            }
            results.push(r);
        }
    }
    print_table(&results);
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&results)?)?;
        eprintln!("wrote {}", dir.join("results.json").display());
    }
    if let Some(s) = spawned {
        s.stop().await?;
    }
    if results.iter().any(|r| r.errors > 0) {
        bail!("the run had errors (see the errors column)");
    }
    Ok(())
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
}
