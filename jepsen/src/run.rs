//! One test run, start to finish: hosts up, clients and nemesis, heal, final reads, check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc;
use vow_client::{Client, Error};

use crate::history::{Op, Register};
use crate::hosts::{self, Hosts};
use crate::nemesis::{self, Nemesis};
use crate::report::{self, Results, Setup};
use crate::{checker, net, shards, workload};

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

async fn final_reads(hosts: &Hosts, keys: &BTreeSet<String>) -> anyhow::Result<BTreeMap<String, Vec<(u64, Register)>>> {
    let mut finals: BTreeMap<String, Vec<(u64, Register)>> = BTreeMap::new();
    for id in hosts.ids() {
        let addr = hosts::grpc(id);
        for key in keys {
            let reg = match Client::get_local(&addr, key).await {
                Ok(p) => workload::register_of(&p),
                Err(Error::NotFound(_)) => Register::Absent,
                Err(e) => return Err(e).with_context(|| format!("final read of {key} from node {id}")),
            };
            finals.entry(key.clone()).or_default().push((id, reg));
        }
    }
    Ok(finals)
}

/// Runs one test and returns its results (also written to `opts.out`).
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
    let _guard = NetGuard;
    net::setup(opts.nodes)?;
    let mut hosts = Hosts::new(opts.vowd.clone(), &opts.out, opts.nodes, opts.shards, opts.vowd_env.clone());
    for id in hosts.ids() {
        hosts.start(id)?;
    }
    wait_for_leader(&hosts, Duration::from_secs(30)).await?;

    let start = Instant::now();
    let until = start + opts.time_limit;
    let ns = move || start.elapsed().as_nanos() as u64;
    let (tx, mut rx) = mpsc::channel::<Op>(4096);
    let next_id = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for p in 0..opts.clients {
        let writer = hosts.client(Duration::from_secs(3))?;
        let readers = hosts.ids().into_iter().map(|id| hosts.client_of(id)).collect::<anyhow::Result<Vec<_>>>()?;
        clients.push(tokio::spawn(workload::client(
            p,
            workload::Connections { writer, readers },
            opts.seed,
            start,
            until,
            next_id.clone(),
            tx.clone(),
        )));
    }
    drop(tx);
    let collector = tokio::spawn(async move {
        let mut ops = Vec::new();
        while let Some(op) = rx.recv().await {
            ops.push(op);
        }
        ops
    });

    let mut nemesis = Nemesis::default();
    let mut fault_error = None;
    for w in &windows {
        tokio::time::sleep_until((start + w.at).into()).await;
        if let Err(e) = nemesis.apply(&mut hosts, w, ns).await {
            fault_error = Some(e.context(format!("applying {:?}", w.fault)));
            break;
        }
        tokio::time::sleep(w.hold).await;
        nemesis.heal(&mut hosts, ns).await?;
    }
    // Always heal before the final reads, whatever happened above.
    nemesis.heal(&mut hosts, ns).await?;
    for c in clients {
        c.await?;
    }
    let mut ops = collector.await?;
    ops.sort_by_key(|o| o.id);
    if let Some(e) = fault_error {
        return Err(e);
    }
    // A cluster that does not recover after every fault is healed is a finding too: record it
    // as an anomaly and still check and report everything the clients saw.
    let keys: BTreeSet<String> = ops.iter().map(|o| o.key.clone()).collect();
    let recovered = async {
        wait_for_leader(&hosts, Duration::from_secs(30)).await?;
        wait_converged(&hosts, Duration::from_secs(60)).await?;
        final_reads(&hosts, &keys).await
    }
    .await;
    hosts.stop_all();
    let (finals, recovery) = match recovered {
        Ok(f) => (f, None),
        Err(e) => (BTreeMap::new(), Some(e)),
    };
    let mut anomalies = checker::check(&ops, &finals);
    if let Some(e) = recovery {
        anomalies.push(checker::Anomaly {
            key: String::new(),
            kind: "no-recovery".into(),
            detail: format!("after healing: {e:#}"),
            op_ids: vec![],
        });
    }
    let setup = Setup {
        seed: opts.seed,
        nodes: opts.nodes,
        shards: opts.shards,
        time_limit_secs: opts.time_limit.as_secs(),
        nemeses: opts.nemeses.clone(),
        clients: opts.clients,
    };
    let results = Results::new(&ops, anomalies, nemesis.events, setup);
    report::write_all(&opts.out, &results, &ops)?;
    Ok(results)
}
