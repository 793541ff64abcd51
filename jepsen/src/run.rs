//! One test run, start to finish: hosts up, clients and nemesis, heal, final reads, check; and
//! the re-check of a stored run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc;
use vow_client::{Client, Error};

use crate::checker::{self, Anomaly};
use crate::history::{self, Entry, Op, OpKind, Outcome, Register};
use crate::hosts::{self, Hosts};
use crate::nemesis::{self, Nemesis};
use crate::report::{self, Results, Setup};
use crate::{net, pipelines, shards, workload};

#[derive(Debug, Clone)]
pub struct Opts {
    pub nodes: u64,
    /// Every vowd's `--shards`.
    pub shards: u32,
    pub time_limit: Duration,
    pub nemeses: Vec<String>,
    pub seed: u64,
    pub out: PathBuf,
    pub vowd: PathBuf,
    pub clients: u64,
    /// Extra environment for every vowd (e.g. the sabotage switch of a test build).
    pub vowd_env: Vec<(String, String)>,
    /// TLS everywhere and API tokens.
    pub tls: bool,
}

/// Removes our namespaces when dropped, whatever happened.
struct NetGuard;

impl Drop for NetGuard {
    fn drop(&mut self) {
        net::cleanup();
    }
}

/// How long one round of status requests may take.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// Waits until every one of the run's shards has a leader by that leader's own account (see
/// [`shards::leaders`]). Asking any one node is not enough: a node that was removed, or cut off,
/// may not know the leader.
async fn wait_for_leader(hosts: &Hosts, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let statuses = hosts.statuses(STATUS_WAIT).await;
        // A node with another shard count (a vowd that ignored `--shards`) would not run the
        // cluster the run says it tests.
        let missing = match shards::shard_count_mismatch(hosts.shards, &statuses) {
            Some(wrong) => wrong,
            None if statuses.is_empty() => "no node answered".to_owned(),
            None => match shards::every_shard_led(hosts.shards, &statuses) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            },
        };
        if Instant::now() > deadline {
            bail!("{missing} within {within:?}; see the node logs in {}", hosts.dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // poll while the cluster elects
    }
}

/// Waits until, for every shard, every node has applied what that shard's leader has committed,
/// so final reads compare converged replicas.
async fn wait_converged(hosts: &Hosts, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let statuses = hosts.statuses(STATUS_WAIT).await;
        let missing = match shards::converged(&hosts.ids(), hosts.shards, &statuses) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            bail!("replicas did not converge within {within:?}: {missing}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // poll convergence
    }
}

/// How long the clients keep going after the final heal, at least: more than a generation of
/// promise ids, so fresh ids are created and settled after it and the liveness rule (a write must
/// succeed after the final heal) is never judged on ids whose writes were all done before it.
const LOAD_AFTER_HEAL: Duration = workload::GENERATION.saturating_add(Duration::from_secs(1));

/// Tries per final read: one transient error must not cost the run its final reads.
const FINAL_READ_TRIES: u32 = 3;

/// Reads every key from every node's own replica, each read an op of the history (`FinalRead`,
/// process `process`) sent to `out`. Errors once every read is done if a read failed on every try
/// (the op records the failure and constrains nothing).
async fn final_reads(
    hosts: &Hosts,
    keys: &BTreeSet<String>,
    process: u64,
    ids: &AtomicU64,
    ns: impl Fn() -> u64,
    out: &mpsc::Sender<Entry>,
) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for node in hosts.ids() {
        let addr = hosts::grpc(node);
        for key in keys {
            let invoke_ns = ns();
            let mut answer = Client::get_local_with(&addr, key, hosts.options()).await;
            for _ in 1..FINAL_READ_TRIES {
                if matches!(answer, Ok(_) | Err(Error::NotFound(_))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await; // a retry after a transient error
                answer = Client::get_local_with(&addr, key, hosts.options()).await;
            }
            let (outcome, observed, detail) = match answer {
                Ok(p) => (Outcome::Ok, Some(workload::register_of(&p)), String::new()),
                Err(Error::NotFound(_)) => (Outcome::Ok, Some(Register::Absent), String::new()),
                Err(e) => {
                    failed.push(format!("{key} from node {node}: {e}"));
                    (Outcome::Fail, None, e.to_string())
                }
            };
            let op = Op {
                id: ids.fetch_add(1, Ordering::Relaxed),
                process,
                kind: OpKind::FinalRead,
                key: key.clone(),
                value: None,
                invoke_ns,
                complete_ns: ns(),
                outcome,
                observed,
                deduplicated: false,
                node: Some(node),
                detail,
                deadline: None,
                tags: Default::default(),
                search: None,
            };
            out.send(Entry::Op(op)).await.context("the history recorder stopped")?;
        }
    }
    match failed.first() {
        None => Ok(()),
        Some(first) => bail!("{} final reads failed, e.g. {first}", failed.len()),
    }
}

/// Owns the history file: appends every entry as it arrives and returns them all at the end.
async fn record(mut entries: mpsc::Receiver<Entry>, mut file: history::Writer) -> anyhow::Result<history::Stored> {
    let mut stored = history::Stored::default();
    while let Some(entry) = entries.recv().await {
        file.append(&entry)?;
        match entry {
            Entry::Setup(setup) => stored.setup = Some(setup),
            Entry::Op(op) => stored.ops.push(op),
            Entry::Nemesis(event) => stored.events.push(event),
            Entry::Anomaly(anomaly) => stored.anomalies.push(anomaly),
            Entry::Pipelines(tally) => stored.pipelines = Some(tally),
        }
    }
    stored.ops.sort_by_key(|o| o.id);
    Ok(stored)
}

/// Sends the nemesis events recorded since the last call to the history.
async fn forward_events(nemesis: &Nemesis, sent: &mut usize, out: &mpsc::Sender<Entry>) -> anyhow::Result<()> {
    for event in &nemesis.events[*sent..] {
        out.send(Entry::Nemesis(event.clone())).await.context("the history recorder stopped")?;
    }
    *sent = nemesis.events.len();
    Ok(())
}

/// The anomalies the node logs under `dir` show: one "node-panic" per node whose log holds a
/// panic or an abort (see [`hosts::crash_lines`]), quoting the first few such lines.
pub fn log_anomalies(dir: &Path) -> Vec<Anomaly> {
    let mut anomalies = Vec::new();
    for (node, path) in hosts::node_logs(dir) {
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let text = String::from_utf8_lossy(&bytes);
        let lines = hosts::crash_lines(&text);
        if lines.is_empty() {
            continue;
        }
        let shown: Vec<&str> = lines.iter().take(3).copied().collect();
        anomalies.push(Anomaly {
            key: String::new(),
            kind: "node-panic".to_owned(),
            detail: format!("node {node}: {} crash lines in its log: {}", lines.len(), shown.join(" | ")),
            op_ids: Vec::new(),
        });
    }
    anomalies
}

/// Everything wrong with a stored run: what its history shows ([`checker::check_run`]), what
/// the run saw directly and stored, and what the node logs in `dir` show. The run and
/// `vow-jepsen check` both judge this way, so they agree.
fn judge(dir: &Path, stored: &history::Stored) -> Vec<Anomaly> {
    let mut anomalies = checker::check_run(&stored.ops, &stored.events);
    anomalies.extend(stored.anomalies.iter().cloned());
    anomalies.extend(log_anomalies(dir));
    anomalies
}

/// Re-checks the run stored in `dir` (its `history.jsonl` and node logs), as `vow-jepsen check`
/// does; works on the history of an aborted run too.
pub fn recheck(dir: &Path) -> anyhow::Result<(Results, history::Stored)> {
    let stored = history::read(dir)?;
    let setup =
        stored.setup.clone().with_context(|| format!("{} has no setup line", dir.join(history::FILE).display()))?;
    let results = Results::new(&stored.ops, judge(dir, &stored), stored.events.clone(), setup)
        .with_pipelines(stored.pipelines.clone());
    Ok((results, stored))
}

/// Runs one test and returns its results (also written to `opts.out`). The history goes to
/// `opts.out/history.jsonl` as the run goes, so a run that fails midway leaves it behind.
pub async fn test(opts: &Opts) -> anyhow::Result<Results> {
    // Namespaces, iptables and tc need root.
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref().ok() != Some("0") {
        bail!("vow-jepsen must run as root (it creates network namespaces and iptables rules)");
    }
    let leftovers = net::leftovers();
    if !leftovers.is_empty() {
        bail!("leftovers of an earlier run would interfere: {}; run `vow-jepsen cleanup`", leftovers.join(", "));
    }
    if opts.nodes < 1 || opts.nodes > 9 {
        bail!("--nodes must be between 1 and 9");
    }
    if opts.shards < 1 {
        bail!("--shards must be at least 1");
    }
    let windows = nemesis::plan(&opts.nemeses, opts.time_limit, opts.seed)?;
    // A node's data outlives its process on purpose (a killed node restarts on it), so node data
    // already in `out` would start this run on an earlier run's promises (the key names repeat)
    // and shard count.
    if let Some(old) = (1..=9).map(|id| opts.out.join(format!("n{id}"))).find(|d| d.exists()) {
        bail!("{} holds node data of an earlier run; give a fresh --out", old.display());
    }
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let setup = Setup {
        seed: opts.seed,
        nodes: opts.nodes,
        shards: opts.shards,
        time_limit_secs: opts.time_limit.as_secs(),
        nemeses: opts.nemeses.clone(),
        clients: opts.clients,
    };
    let (tx, rx) = mpsc::channel::<Entry>(4096);
    let recorder = tokio::spawn(record(rx, history::Writer::create(&opts.out)?));
    tx.send(Entry::Setup(setup.clone())).await?;
    let _guard = NetGuard;
    net::setup(opts.nodes)?;
    let mut hosts = Hosts::new(opts.vowd.clone(), &opts.out, opts.nodes, opts.shards, opts.vowd_env.clone());
    if opts.nemeses.iter().any(|n| n == "clock") {
        hosts = hosts.with_fake_clocks()?;
    }
    if opts.nemeses.iter().any(|n| nemesis::ON_LAZY_DISKS.contains(&n.as_str())) {
        hosts = hosts.with_lazy_disks()?;
    }
    if opts.tls {
        hosts = hosts.with_tls()?;
    }
    for id in hosts.ids() {
        hosts.start(id)?;
    }
    wait_for_leader(&hosts, Duration::from_secs(30)).await?;
    let functions = pipelines::Functions::start(&opts.vowd, net::BRIDGE_ADDR)?;

    let start = Instant::now();
    let ns = move || start.elapsed().as_nanos() as u64;
    // The clients run until the run sets their end, after the final heal has actually ended (a
    // heal that re-adds a removed node can end past the time limit; clients that had stopped by
    // then would leave the liveness rule nothing to judge after it).
    let until_ns = Arc::new(AtomicU64::new(u64::MAX));
    let next_id = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    let readers =
        || hosts.ids().into_iter().map(|id| Ok((id, hosts.client_of(id)?))).collect::<anyhow::Result<Vec<_>>>();
    let in_flight = workload::InFlight::default();
    // Process ids: 0.. the clients, then the final reads, then the watcher.
    let watcher = tokio::spawn(workload::watcher(
        opts.clients + 1,
        readers()?,
        in_flight.clone(),
        start,
        until_ns.clone(),
        next_id.clone(),
        tx.clone(),
    ));
    for p in 0..opts.clients {
        let writer = hosts.client(Duration::from_secs(3))?;
        clients.push(tokio::spawn(workload::client(
            p,
            workload::Connections { writer, readers: readers()?, in_flight: in_flight.clone() },
            opts.seed,
            start,
            until_ns.clone(),
            next_id.clone(),
            tx.clone(),
        )));
    }

    let chains = tokio::spawn(pipelines::client(
        hosts.client(Duration::from_secs(3))?,
        functions.base.clone(),
        start,
        until_ns.clone(),
    ));

    let mut nemesis = Nemesis::default();
    let mut forwarded = 0;
    let mut fault_error = None;
    for w in &windows {
        tokio::time::sleep_until((start + w.at).into()).await;
        let applied = nemesis.apply(&mut hosts, w, ns).await;
        forward_events(&nemesis, &mut forwarded, &tx).await?;
        if let Err(e) = applied {
            fault_error = Some(e.context(format!("applying {:?}", w.fault)));
            break;
        }
        tokio::time::sleep(w.hold).await;
        nemesis.heal(&mut hosts, ns).await?;
        forward_events(&nemesis, &mut forwarded, &tx).await?;
    }
    // Always heal before the final reads, whatever happened above; then keep the load going
    // long enough after it to show whether the cluster takes writes again.
    nemesis.heal(&mut hosts, ns).await?;
    forward_events(&nemesis, &mut forwarded, &tx).await?;
    let end_ns = (opts.time_limit.as_nanos() as u64).max(ns() + LOAD_AFTER_HEAL.as_nanos() as u64);
    until_ns.store(end_ns, Ordering::Relaxed);
    // The keys the clients touched, for the final reads.
    let mut keys = BTreeSet::new();
    for c in clients {
        keys.extend(c.await?);
    }
    watcher.await?;
    let chains = chains.await?;
    if let Some(e) = fault_error {
        return Err(e);
    }
    // A node that crashed after the last heal is not restarted: its final reads fail, as they
    // should, and its crash is recorded.
    nemesis.record_crashes(&mut hosts, ns());
    forward_events(&nemesis, &mut forwarded, &tx).await?;
    // A cluster that does not recover after every fault is healed is a finding too: record it
    // as an anomaly and still check and report everything the clients saw.
    let recovered = async {
        wait_for_leader(&hosts, Duration::from_secs(30)).await?;
        wait_converged(&hosts, Duration::from_secs(60)).await?;
        final_reads(&hosts, &keys, opts.clients, &next_id, ns, &tx).await?;
        // Every acknowledged chain completes on the healed cluster, each step settled once.
        let (tally, anomalies) =
            pipelines::check(&hosts.client(Duration::from_secs(10))?, &chains, functions.calls()).await;
        for a in anomalies {
            tx.send(Entry::Anomaly(a)).await?;
        }
        tx.send(Entry::Pipelines(tally)).await?;
        anyhow::Ok(())
    }
    .await;
    nemesis.record_crashes(&mut hosts, ns());
    forward_events(&nemesis, &mut forwarded, &tx).await?;
    hosts.stop_all();
    if let Err(e) = recovered {
        let anomaly = Anomaly {
            key: String::new(),
            kind: "no-recovery".into(),
            detail: format!("after healing: {e:#}"),
            op_ids: vec![],
        };
        tx.send(Entry::Anomaly(anomaly)).await?;
    }
    drop(tx);
    let stored = recorder.await??;
    let results = Results::new(&stored.ops, judge(&opts.out, &stored), stored.events.clone(), setup)
        .with_pipelines(stored.pipelines.clone());
    report::write_all(&opts.out, &results, &stored.ops)?;
    Ok(results)
}
