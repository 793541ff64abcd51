//! `vow dev up|down`: a local cluster of real `vowd` processes on loopback, for development and
//! for the integration tests.
//!
//! `up` starts N processes in the background (data in `DIR/n<id>`, log in `DIR/n<id>/vowd.log`),
//! writes `DIR/cluster.json`, and waits until every node knows a leader of every shard. Run
//! again on the same directory, it restarts any node whose process is gone, on the same ports
//! and data, and waits until every shard has a leader.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use vow_client::{Client, Options};

use crate::ports::{free_port, free_ports};

#[derive(Debug, clap::Subcommand)]
pub enum DevCommand {
    /// Start (or restart the missing nodes of) a local cluster.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long)]
        dir: PathBuf,
        /// Shards of a new cluster (vowd's default).
        #[arg(long, default_value_t = 8)]
        shards: u32,
        /// Extra argument for every vowd (repeatable), e.g. --vowd-arg=--snapshot-logs=100.
        #[arg(long = "vowd-arg", allow_hyphen_values = true)]
        vowd_args: Vec<String>,
        /// Extra argument for one vowd (repeatable), as ID=ARG, e.g. --node-arg=3=--log=debug.
        #[arg(long = "node-arg", allow_hyphen_values = true, value_parser = parse_node_arg)]
        node_args: Vec<(u64, String)>,
        /// How long to wait for the cluster to elect leaders.
        #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
        wait: Duration,
        /// Run the cluster over TLS with API tokens: a CA and node certificates in DIR/tls
        /// (mutual TLS between nodes), admin, writer and reader tokens in DIR/api-tokens.
        /// Prints the environment a client needs.
        #[arg(long)]
        tls: bool,
    },
    /// Stop the cluster's processes (SIGTERM, then SIGKILL after 10 s). Data stays.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// `DIR/cluster.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    pub nodes: Vec<NodeEntry>,
    #[serde(default)]
    pub shards: u32,
    #[serde(default)]
    pub vowd_args: Vec<String>,
    /// Arguments for single nodes, as (node id, argument).
    #[serde(default)]
    pub node_args: Vec<(u64, String)>,
    /// TLS and API tokens (`up --tls`).
    #[serde(default)]
    pub tls: bool,
}

fn parse_node_arg(s: &str) -> Result<(u64, String), String> {
    let (id, arg) = s.split_once('=').ok_or_else(|| format!("{s:?} is not ID=ARG"))?;
    let id = id.parse().map_err(|_| format!("{id:?} in {s:?} is not a node id"))?;
    Ok((id, arg.to_owned()))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeEntry {
    pub node_id: u64,
    pub grpc: String,
    pub http: String,
    /// The peer port (Raft and routing between nodes); given one on the next `up` if missing.
    #[serde(default)]
    pub peer: String,
    pub pid: u32,
}

pub async fn run(cmd: DevCommand, output: crate::Output) -> anyhow::Result<()> {
    match cmd {
        DevCommand::Up { nodes, dir, shards, vowd_args, node_args, wait, tls } => {
            let status = up(nodes, &dir, shards, vowd_args, node_args, wait, tls).await?;
            crate::print_status(output, &status);
            if tls {
                let dir = std::path::absolute(&dir)?;
                eprintln!("# a client of this cluster needs (admin; DIR/api-tokens has writer and reader tokens too):");
                eprintln!("export VOW_TLS_CA={}", dir.join("tls/ca.pem").display());
                eprintln!("export VOW_TOKEN={}", api_token(&dir, "admin")?);
            }
            Ok(())
        }
        DevCommand::Down { dir } => down(&dir).await,
    }
}

/// The vowd binary: `$VOW_VOWD`, else beside this executable, else on PATH.
fn vowd_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VOW_VOWD") {
        return PathBuf::from(p);
    }
    if let Ok(me) = std::env::current_exe() {
        let sibling = me.with_file_name("vowd");
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from("vowd")
}

/// True when `pid` is a live vowd process (not a recycled pid).
pub fn is_vowd_alive(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            // vowd, or a test build of it such as vowd-sabotage.
            cmd.split(|b| *b == 0)
                .next()
                .and_then(|arg0| arg0.rsplit(|b| *b == b'/').next())
                .is_some_and(|name| name.starts_with(b"vowd"))
                && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
        }
        Err(_) => false,
    }
}

fn spawn(dir: &Path, node: &NodeEntry, peers: &str, shards: u32, tls: bool, extra: &[String]) -> anyhow::Result<u32> {
    let data = dir.join(format!("n{}", node.node_id));
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(data.join("vowd.log"))?;
    let vowd = vowd_path();
    let mut cmd = Command::new(&vowd);
    // Every node verifies the completion tokens any node issued: they share one key file.
    if !extra.iter().any(|a| a.starts_with("--completion-keys-file")) {
        cmd.arg("--completion-keys-file").arg(completion_keys(dir)?);
    }
    if tls {
        let t = dir.join("tls");
        cmd.arg("--tls-cert")
            .arg(t.join(format!("node-{}.pem", node.node_id)))
            .arg("--tls-key")
            .arg(t.join(format!("node-{}-key.pem", node.node_id)))
            .arg("--tls-ca")
            .arg(t.join("ca.pem"))
            .arg("--auth-file")
            .arg(dir.join("api-tokens"));
    }
    cmd.arg("--node-id")
        .arg(node.node_id.to_string())
        .arg("--data-dir")
        .arg(&data)
        .arg("--grpc-addr")
        .arg(&node.grpc)
        .arg("--peer-addr")
        .arg(&node.peer)
        .arg("--http-addr")
        .arg(&node.http)
        .arg("--peers")
        .arg(peers)
        .arg("--shards")
        .arg(shards.to_string())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own process group: the cluster outlives this command and ignores the shell's Ctrl-C.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().with_context(|| format!("starting {} (set VOW_VOWD to its path)", vowd.display()))?;
    Ok(child.id())
}

/// The cluster's completion-token key file in `dir`, made with one random key (readable by its
/// owner only) the first time.
fn completion_keys(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("completion-keys");
    if !path.exists() {
        let key: [u8; 32] = rand::random();
        let line: String = key.iter().map(|b| format!("{b:02x}")).collect();
        create_private(&path, &format!("{line}\n"))?;
    }
    Ok(path)
}

/// A cluster CA, a certificate for every node (loopback names, its node URI) and a client
/// certificate in `dir/tls`, made once.
fn dev_certificates(dir: &Path, nodes: &[NodeEntry]) -> anyhow::Result<()> {
    let t = dir.join("tls");
    if !t.join("ca.pem").exists() {
        crate::certs::make_ca(&t, 3650)?;
    }
    let loopback = crate::certs::Subject {
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse()?, "::1".parse()?],
        ..Default::default()
    };
    for node in nodes {
        let cert = t.join(format!("node-{}.pem", node.node_id));
        if !cert.exists() {
            let subject = crate::certs::Subject { node_id: Some(node.node_id), ..loopback.clone() };
            crate::certs::make_cert(&t, &cert, &subject, 365)?;
        }
    }
    // A client certificate names no host: a client is never dialled, and a host name on it
    // would let it pass for a node reached on that host.
    if !t.join("client.pem").exists() {
        crate::certs::make_cert(&t, &t.join("client.pem"), &crate::certs::Subject::default(), 365)?;
    }
    Ok(())
}

/// `dir/api-tokens` with one random token per role, made once (readable by its owner only).
fn dev_tokens(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("api-tokens");
    if path.exists() {
        return Ok(());
    }
    let mut text = String::from("# role name token (vowd --auth-file; re-read when it changes)\n");
    for role in ["admin", "writer", "reader"] {
        text.push_str(&format!("{role} dev-{role} {:032x}\n", rand::random::<u128>()));
    }
    create_private(&path, &text)
}

/// Creates `path` holding `text`, readable by its owner only; fails if it exists.
fn create_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// The token of `role` in a dev cluster's `api-tokens`.
pub fn api_token(dir: &Path, role: &str) -> anyhow::Result<String> {
    let path = dir.join("api-tokens");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() == 3 && f[0] == role)
        .map(|f| f[2].to_owned())
        .with_context(|| format!("{} has no {role} token", path.display()))
}

/// Client options for a dev cluster in `dir`: its CA and admin token when it runs TLS.
pub fn client_security(
    dir: &Path,
    tls: bool,
) -> anyhow::Result<(Option<vow_client::tls::ClientTls>, Option<vow_client::tls::Token>)> {
    if !tls {
        return Ok((None, None));
    }
    let files = vow_client::tls::ClientTlsFiles { ca: dir.join("tls/ca.pem"), cert_and_key: None };
    let tls = vow_client::tls::ClientTls::from_files(&files, &[b"h2"]).map_err(anyhow::Error::msg)?;
    Ok((Some(tls), Some(vow_client::tls::Token::new(api_token(dir, "admin")?))))
}

async fn up(
    n: u64,
    dir: &Path,
    shards: u32,
    vowd_args: Vec<String>,
    node_args: Vec<(u64, String)>,
    wait: Duration,
    tls: bool,
) -> anyhow::Result<vow_client::pb::StatusResponse> {
    if n == 0 || n > 9 {
        bail!("--nodes must be between 1 and 9");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("cluster.json");
    let new_cluster = !file.exists();
    let mut cluster = if file.exists() {
        let text = std::fs::read_to_string(&file)?;
        let c: ClusterFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        if c.tls != tls {
            bail!(
                "{} holds a cluster {} TLS; run `vow dev up` {} --tls, or use another --dir",
                dir.display(),
                if c.tls { "with" } else { "without" },
                if c.tls { "with" } else { "without" }
            );
        }
        if c.nodes.len() as u64 != n {
            bail!(
                "{} holds a {}-node cluster; use --nodes {} or another --dir",
                dir.display(),
                c.nodes.len(),
                c.nodes.len()
            );
        }
        c
    } else {
        let ports = free_ports(3 * n as usize)?;
        let nodes = (1..=n)
            .zip(ports.chunks(3))
            .map(|(id, p)| NodeEntry {
                node_id: id,
                grpc: format!("127.0.0.1:{}", p[0]),
                http: format!("127.0.0.1:{}", p[1]),
                peer: format!("127.0.0.1:{}", p[2]),
                pid: 0,
            })
            .collect();
        ClusterFile { nodes, shards, vowd_args, node_args, tls }
    };
    for node in cluster.nodes.iter_mut().filter(|n| n.peer.is_empty()) {
        node.peer = format!("127.0.0.1:{}", free_port()?);
    }
    if tls {
        dev_certificates(dir, &cluster.nodes)?;
        dev_tokens(dir)?;
    }
    let shards = if cluster.shards == 0 { shards } else { cluster.shards };
    let peers =
        cluster.nodes.iter().map(|e| format!("{}={}@{}", e.node_id, e.grpc, e.peer)).collect::<Vec<_>>().join(",");
    for node in cluster.nodes.iter_mut() {
        if node.pid != 0 && is_vowd_alive(node.pid) {
            continue;
        }
        let mut args = cluster.vowd_args.clone();
        args.extend(cluster.node_args.iter().filter(|(id, _)| *id == node.node_id).map(|(_, a)| a.clone()));
        node.pid = spawn(dir, node, &peers, shards, tls, &args)?;
        eprintln!("started node {} (pid {}) on {}", node.node_id, node.pid, node.grpc);
    }
    cluster.shards = shards;
    let tmp = dir.join("cluster.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&cluster)?)?;
    std::fs::rename(&tmp, &file)?;

    let endpoints: Vec<&str> = cluster.nodes.iter().map(|e| e.grpc.as_str()).collect();
    let (client_tls, token) = client_security(dir, tls)?;
    let options = Options {
        call_timeout: Duration::from_secs(2),
        attempt_timeout: Duration::from_secs(1),
        tls: client_tls,
        token,
        ..Default::default()
    };
    let client = Client::with_options(&endpoints, options.clone())?;
    // A new cluster is up when every node is: two nodes of three elect leaders by themselves,
    // and a third still starting (a slow disk, a busy machine) would be a node that never took
    // part — a test that then kills it, or wipes its disk, tests nothing. A restart (a node of
    // an existing cluster, perhaps one refused until replaced) needs only the leaders.
    let each_node: Vec<Client> = if new_cluster {
        cluster
            .nodes
            .iter()
            .map(|e| {
                Client::with_options(&[e.grpc.as_str()], Options { follow_leader_hints: false, ..options.clone() })
            })
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let led = |s: &vow_client::pb::StatusResponse| !s.shards.is_empty() && s.shards.iter().all(|s| s.leader_id != 0);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Ok(status) = client.status().await
            && led(&status)
        {
            let mut every_node_knows = true;
            for node in &each_node {
                every_node_knows &= node.status().await.is_ok_and(|s| led(&s));
            }
            if every_node_knows {
                return Ok(status);
            }
        }
        for node in &cluster.nodes {
            if !is_vowd_alive(node.pid) {
                let log = dir.join(format!("n{}/vowd.log", node.node_id));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                // A node that died on an error ends its log with a backtrace; the error is
                // what the operator needs, so skip the frames.
                let frame = |l: &&str| {
                    let t = l.trim_start();
                    t.is_empty()
                        || t.starts_with("at ")
                        || t.split_once(": ").is_some_and(|(n, _)| n.parse::<u32>().is_ok())
                        || t == "Stack backtrace:"
                };
                let tail: Vec<&str> = text.lines().rev().filter(|l| !frame(l)).take(8).collect();
                bail!(
                    "node {} exited; last lines of {}:\n{}",
                    node.node_id,
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the cluster did not elect leaders within {wait:?}; see the logs in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval while the cluster elects
    }
}

#[allow(unsafe_code)] // kill(2) on a pid we started; no memory is shared with the callee
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill takes two integers and touches no memory of ours.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

async fn down(dir: &Path) -> anyhow::Result<()> {
    let file = dir.join("cluster.json");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let cluster: ClusterFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let alive: Vec<u32> = cluster.nodes.iter().map(|n| n.pid).filter(|p| *p != 0 && is_vowd_alive(*p)).collect();
    for &pid in &alive {
        signal(pid, libc::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while alive.iter().any(|p| is_vowd_alive(*p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await; // poll for exit after SIGTERM
    }
    for &pid in alive.iter().filter(|p| is_vowd_alive(**p)) {
        eprintln!("node with pid {pid} ignored SIGTERM; killing it");
        signal(pid, libc::SIGKILL);
    }
    eprintln!("stopped {} node(s); data kept in {}", alive.len(), dir.display());
    Ok(())
}

/// A throw-away local cluster, for `vow bench --spawn`.
#[derive(Debug)]
pub struct Spawned {
    dir: PathBuf,
    endpoints: Vec<String>,
    tls: bool,
}

impl Spawned {
    /// Starts `nodes` nodes, secured as `vow dev up --tls` when `tls`.
    pub async fn start(nodes: u64, shards: u32, tls: bool) -> anyhow::Result<Spawned> {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let dir = std::env::temp_dir().join(format!("vow-bench-{}-{stamp:x}", std::process::id()));
        up(nodes, &dir, shards, vec![], vec![], Duration::from_secs(60), tls).await?;
        let text = std::fs::read_to_string(dir.join("cluster.json"))?;
        let cluster: ClusterFile = serde_json::from_str(&text)?;
        let endpoints = cluster.nodes.iter().map(|n| n.grpc.clone()).collect();
        Ok(Spawned { dir, endpoints, tls })
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }

    /// What a client of this cluster presents: its CA and admin token when secured.
    pub fn security(&self) -> anyhow::Result<(Option<vow_client::tls::ClientTls>, Option<vow_client::tls::Token>)> {
        client_security(&self.dir, self.tls)
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        down(&self.dir).await?;
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("removing {}", self.dir.display()))
    }
}
