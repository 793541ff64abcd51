//! Harness for the multi-process tests: a [`DevCluster`] is a real cluster of `vowd` processes
//! started with `vow dev up` in a temporary directory, torn down (and killed, if need be) when
//! dropped. The binaries come from the same target directory as the test executable, so run
//! `cargo build --bins` first (the README's test command does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use vow_client::{Client, Options, pb};

// The CLI's port picker (ports below the kernel's ephemeral range, which connections never
// take), compiled in here too: the tests start nodes of their own beside `vow dev up`'s.
#[path = "../../crates/cli/src/ports.rs"]
mod ports;
pub use ports::{free_port, free_ports};

#[derive(Debug, Deserialize, Clone)]
pub struct NodeEntry {
    pub node_id: u64,
    pub grpc: String,
    pub http: String,
    /// Its peer port (Raft, routing, joining).
    pub peer: String,
    pub pid: u32,
}

#[derive(Debug, Deserialize)]
struct ClusterFile {
    nodes: Vec<NodeEntry>,
    #[serde(default)]
    tls: bool,
}

/// The directory holding the workspace binaries (`vow`, `vowd`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe.parent().and_then(Path::parent).expect("target directory").to_path_buf();
    for bin in ["vow", "vowd"] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: run `cargo build --workspace --bins` before the tests",
            dir.join(bin).display()
        );
    }
    dir
}

/// Runs the `vow` CLI with `args`.
pub fn vow(args: &[&str]) -> Output {
    vow_with(args, &[])
}

/// Runs the `vow` CLI with `args` and extra environment (which the vowd it starts inherit;
/// `VOW_VOWD` there picks another vowd binary). Records print as JSON (`VOW_OUTPUT=json`, as a
/// script would ask), so tests parse stdout; `-o table` in `args` or `env` overrides it.
pub fn vow_with(args: &[&str], env: &[(String, String)]) -> Output {
    let dir = bin_dir();
    Command::new(dir.join("vow"))
        .args(args)
        .env("VOW_VOWD", dir.join("vowd"))
        .env("VOW_OUTPUT", "json")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running vow")
}

/// The test-only build of vowd with deliberate bugs and failpoints (`scripts/test.sh` builds it).
pub fn sabotaged_vowd() -> PathBuf {
    let path = bin_dir().join("vowd-sabotage");
    assert!(path.exists(), "{} is missing: build it as scripts/test.sh does", path.display());
    path
}

#[derive(Debug)]
pub struct DevCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeEntry>,
    /// Started with `--tls`: TLS everywhere, API tokens required.
    pub tls: bool,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl DevCluster {
    /// Starts `n` nodes; `vowd_args` go to every vowd.
    pub fn up(n: usize, vowd_args: &[&str]) -> anyhow::Result<DevCluster> {
        Self::up_with(n, vowd_args, &[])
    }

    /// Starts `n` nodes with `dev up` arguments of its own (`--node-arg=ID=ARG`, `--shards`)
    /// and `vowd_args` for every vowd.
    pub fn up_with(n: usize, vowd_args: &[&str], up_args: &[&str]) -> anyhow::Result<DevCluster> {
        Self::up_env(n, vowd_args, up_args, &[])
    }

    /// As [`DevCluster::up_with`], with extra environment for `vow dev up` and the vowd it starts.
    pub fn up_env(n: usize, vowd_args: &[&str], up_args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<DevCluster> {
        let dir = tempfile::Builder::new().prefix("vow-test-").tempdir()?;
        let mut args: Vec<String> = vec!["dev".into(), "up".into(), "--nodes".into(), n.to_string()];
        args.push("--dir".into());
        args.push(dir.path().display().to_string());
        for a in vowd_args {
            args.push(format!("--vowd-arg={a}"));
        }
        args.extend(up_args.iter().map(|a| a.to_string()));
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut c = DevCluster { dir, nodes: vec![], tls: false, args, env };
        c.reup()?;
        Ok(c)
    }

    /// A node's data directory.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("n{id}"))
    }

    /// `vow dev up` again: restarts any node whose process is gone.
    pub fn reup(&mut self) -> anyhow::Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let out = vow_with(&args, &self.env);
        if !out.status.success() {
            bail!("vow dev up failed: {}\n{}", String::from_utf8_lossy(&out.stderr), self.logs());
        }
        let text = std::fs::read_to_string(self.dir.path().join("cluster.json"))?;
        let file = serde_json::from_str::<ClusterFile>(&text)?;
        self.nodes = file.nodes;
        self.tls = file.tls;
        Ok(())
    }

    /// The cluster CA (`--tls` clusters).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("tls/ca.pem")
    }

    /// The API token of `role` (admin, writer, reader) of a `--tls` cluster.
    pub fn token(&self, role: &str) -> anyhow::Result<String> {
        let path = self.dir.path().join("api-tokens");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() == 3 && f[0] == role)
            .map(|f| f[2].to_owned())
            .with_context(|| format!("no {role} token in {}", path.display()))
    }

    /// Client options reaching this cluster: its CA and the admin token when it runs TLS.
    pub fn options(&self) -> Options {
        self.options_as("admin")
    }

    /// Client options with the token of `role`.
    pub fn options_as(&self, role: &str) -> Options {
        if !self.tls {
            return Options::default();
        }
        let files = vow_client::tls::ClientTlsFiles { ca: self.ca(), cert_and_key: None };
        Options {
            tls: Some(vow_client::tls::ClientTls::from_files(&files, &[b"h2"]).expect("the cluster CA loads")),
            token: Some(vow_client::tls::Token::new(self.token(role).expect("token"))),
            ..Options::default()
        }
    }

    /// Environment for the `vow` command line to reach this cluster.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        if !self.tls {
            return Vec::new();
        }
        vec![
            ("VOW_TLS_CA".into(), self.ca().display().to_string()),
            ("VOW_TOKEN".into(), self.token("admin").expect("admin token")),
        ]
    }

    pub fn down(&self) -> anyhow::Result<()> {
        let out = vow(&["dev", "down", "--dir", &self.dir.path().display().to_string()]);
        if !out.status.success() {
            bail!("vow dev down failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The `--peers` value naming this cluster's nodes (`id=grpc@peer,...`).
    pub fn peers_arg(&self) -> String {
        self.nodes.iter().map(|n| format!("{}={}@{}", n.node_id, n.grpc, n.peer)).collect::<Vec<_>>().join(",")
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.grpc.clone()).collect()
    }

    pub fn node(&self, id: u64) -> &NodeEntry {
        self.nodes.iter().find(|n| n.node_id == id).expect("node in cluster")
    }

    pub fn client(&self) -> Client {
        Client::with_options(&self.endpoints(), self.options()).expect("client")
    }

    /// A client that only knows one node (it still follows leader hints it is given).
    pub fn client_of(&self, id: u64) -> Client {
        Client::with_options(&[self.node(id).grpc.as_str()], self.options()).expect("client")
    }

    pub async fn status(&self) -> anyhow::Result<pb::StatusResponse> {
        Ok(self.client().status().await?)
    }

    /// The leader of shard 0, waiting for one to be elected.
    pub async fn leader(&self) -> anyhow::Result<u64> {
        self.wait_for("a leader", Duration::from_secs(30), |s| {
            s.shards.first().map(|sh| sh.leader_id).filter(|l| *l != 0)
        })
        .await
    }

    /// The leader of the shard that holds `id`, waiting for one to be elected. Tests that act
    /// on "the leader" use ids with one hash tag (`{tag}/...`), so this is the leader of every
    /// id they use.
    pub async fn leader_of(&self, id: &str) -> anyhow::Result<u64> {
        let id = vow_core::PromiseId::new_unchecked(id);
        self.wait_for(&format!("a leader of {id}'s shard"), Duration::from_secs(30), |s| {
            let shard = vow_core::ShardId::for_promise(&id, s.shards.len() as u32);
            s.shards.get(shard.0 as usize).map(|sh| sh.leader_id).filter(|l| *l != 0)
        })
        .await
    }

    /// Polls the cluster status (through any node) until `f` yields a value.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&pb::StatusResponse) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(s) = self.status().await
                && let Some(v) = f(&s)
            {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("timed out waiting for {what}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // status poll interval
        }
    }

    /// Status as one node sees it.
    pub async fn status_of(&self, id: u64) -> anyhow::Result<pb::StatusResponse> {
        let c = Client::with_options(
            &[self.node(id).grpc.as_str()],
            Options { call_timeout: Duration::from_secs(2), attempt_timeout: Duration::from_secs(1), ..self.options() },
        )?;
        Ok(c.status().await?)
    }

    pub fn kill9(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, "-9")
    }

    /// SIGTERM: the graceful stop an orchestrator would send.
    pub fn term(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, "-TERM")
    }

    /// SIGSTOP: the node stops running (a long pause) but keeps its sockets and state.
    pub fn pause(&self, id: u64) -> anyhow::Result<()> {
        self.send(id, "-STOP")
    }

    /// SIGCONT after [`DevCluster::pause`].
    pub fn resume(&self, id: u64) -> anyhow::Result<()> {
        self.send(id, "-CONT")
    }

    fn send(&self, id: u64, sig: &str) -> anyhow::Result<()> {
        let pid = self.node(id).pid;
        let ok = Command::new("kill").args([sig, &pid.to_string()]).status().context("kill")?.success();
        if !ok {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    /// A node's `/metrics` text.
    pub fn metrics_of(&self, id: u64) -> anyhow::Result<String> {
        http_get(&self.node(id).http, "/metrics")
    }

    /// A gauge or counter from a node's `/metrics` (summed over its labels).
    pub fn metric(&self, id: u64, name: &str) -> anyhow::Result<f64> {
        let text = self.metrics_of(id)?;
        Ok(text
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// A per-shard gauge from a node's `/metrics`, e.g. `vow_shard_purged_index` of shard 3.
    pub fn shard_metric(&self, id: u64, shard: u32, name: &str) -> anyhow::Result<u64> {
        let label = format!("shard=\"{shard}\"");
        let text = self.metrics_of(id)?;
        let line = text.lines().find(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(&label));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no {name} for {label} on node {id}"))
    }

    /// Waits until every node but `behind` has purged its log of `shard` past `last_index`, so
    /// that whichever of them leads when `behind` returns must send it a snapshot (leadership
    /// can move meanwhile; a leader that had not purged yet would catch it up from its log).
    pub async fn wait_purged_past(&self, shard: u32, behind: u64, last_index: u64) -> anyhow::Result<()> {
        let others: Vec<u64> = self.nodes.iter().map(|n| n.node_id).filter(|&id| id != behind).collect();
        eventually("the other replicas to purge their logs past the node left behind", Duration::from_secs(30), || {
            for &id in &others {
                if self.shard_metric(id, shard, "vow_shard_purged_index")? <= last_index {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await
    }

    fn signal(&self, id: u64, sig: &str) -> anyhow::Result<()> {
        let pid = self.node(id).pid;
        let ok = Command::new("kill").args([sig, &pid.to_string()]).status().context("kill")?.success();
        if !ok {
            bail!("kill {sig} {pid} failed");
        }
        // Wait until the process is really gone (or a zombie), so a restart finds its port free.
        for _ in 0..1000 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10)); // poll for process exit
        }
        bail!("process {pid} survived kill {sig}")
    }

    /// The tail of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let path = self.dir.path().join(format!("n{}/vowd.log", n.node_id));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // A node that died ends its log with a backtrace; what killed it comes before.
            let frame = |l: &&str| {
                let t = l.trim_start();
                t.starts_with("at ") || t.split_once(": ").is_some_and(|(n, _)| n.parse::<u32>().is_ok())
            };
            let lines: Vec<&str> = text.lines().filter(|l| !frame(l)).collect();
            let causes =
                lines.iter().filter(|l| l.contains("panicked") || l.contains("ERROR") || l.starts_with("Error"));
            let tail = lines.iter().rev().take(15).rev();
            out.push_str(&format!("--- node {} ({})\n", n.node_id, path.display()));
            for l in causes.take(5).chain(tail) {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("n{id}/vowd.log"))).unwrap_or_default()
    }
}

/// A `vowd` started outside `vow dev`, to join a running cluster: its ports are picked (and its
/// data directory made, beside the cluster's nodes) before it starts, so clients can be told
/// about it first. Killed when dropped.
#[derive(Debug)]
pub struct Joiner {
    pub id: u64,
    pub grpc: String,
    pub http: String,
    pub peer: String,
    /// TLS arguments (certificate, key, CA, API tokens) when the cluster runs TLS.
    tls_args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
}

impl DevCluster {
    /// A node `id` ready to join this cluster; see [`Joiner::start`].
    pub fn joiner(&self, id: u64) -> anyhow::Result<Joiner> {
        let dir = self.data_dir(id);
        std::fs::create_dir_all(&dir)?;
        let mut tls_args = Vec::new();
        if self.tls {
            let t = self.dir.path().join("tls");
            let cert = t.join(format!("node-{id}.pem"));
            let out = vow(&[
                "tls",
                "cert",
                "--ca-dir",
                &t.display().to_string(),
                "--out",
                &cert.display().to_string(),
                "--node-id",
                &id.to_string(),
                "--ip",
                "127.0.0.1",
            ]);
            if !out.status.success() {
                bail!("vow tls cert failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            for (flag, path) in [
                ("--tls-cert", cert.clone()),
                ("--tls-key", t.join(format!("node-{id}-key.pem"))),
                ("--tls-ca", t.join("ca.pem")),
                ("--auth-file", self.dir.path().join("api-tokens")),
            ] {
                tls_args.extend([flag.to_owned(), path.display().to_string()]);
            }
        }
        let addrs: Vec<String> = free_ports(3)?.into_iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let [grpc, http, peer] = <[String; 3]>::try_from(addrs).expect("three ports");
        Ok(Joiner { id, grpc, http, peer, tls_args, dir, child: None })
    }
}

impl Joiner {
    /// Starts the node with `--join` through the node whose peer port is `via`.
    pub fn start(&mut self, via: &str) -> anyhow::Result<()> {
        self.start_with(&["--join", via])
    }

    /// Starts the node as a StatefulSet's pod past the initial voters starts: with the same
    /// `--peers` as they have (`peers`, see [`DevCluster::peers_arg`]), which it is not among.
    pub fn start_as_pod(&mut self, peers: &str) -> anyhow::Result<()> {
        self.start_with(&["--peers", peers])
    }

    fn start_with(&mut self, how: &[&str]) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("vowd.log"))?;
        let child = Command::new(bin_dir().join("vowd"))
            .args(["--node-id", &self.id.to_string(), "--data-dir", &self.dir.display().to_string()])
            .args(["--grpc-addr", &self.grpc, "--http-addr", &self.http, "--peer-addr", &self.peer])
            .args(how)
            .args(&self.tls_args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// The last `lines` of its log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("vowd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        format!("--- node {}\n{}", self.id, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }
}

impl Drop for Joiner {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        // An assertion failed with the cluster up: what the nodes logged goes to the test's
        // output (shown only for a failing test), so a failure in CI can be read afterwards.
        if std::thread::panicking() {
            eprintln!("the nodes' logs when the test failed:\n{}", self.logs());
        }
        if self.down().is_err() {
            for n in &self.nodes {
                let _ = Command::new("kill").args(["-9", &n.pid.to_string()]).status();
            }
        }
        self.keep_logs();
    }
}

impl DevCluster {
    /// With `VOW_TEST_LOGS=DIR`, copies every node's log to `DIR/<test>-<pid>/n<id>.log` before
    /// the cluster's directory goes: the way to read what the nodes did in a run that failed.
    fn keep_logs(&self) {
        let Some(root) = std::env::var_os("VOW_TEST_LOGS") else { return };
        let test = std::thread::current().name().unwrap_or("test").replace("::", "-");
        let to = PathBuf::from(root).join(format!("{test}-{}", std::process::id()));
        if std::fs::create_dir_all(&to).is_err() {
            return;
        }
        for entry in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
            let log = entry.path().join("vowd.log");
            if log.exists() {
                let _ = std::fs::copy(&log, to.join(format!("{}.log", entry.file_name().to_string_lossy())));
            }
        }
    }
}

/// Polls `check` every 20 ms until it holds; an error from it ends the wait. Fails with `what`
/// (and the time waited) after `timeout`.
pub async fn eventually(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check()? {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // the poll interval
    }
    Ok(())
}

/// A plain HTTP/1.1 GET, for the node's operator endpoints.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub fn value(data: &str) -> pb::Value {
    pb::Value { headers: Default::default(), data: data.as_bytes().to_vec() }
}

pub fn create_req(id: &str, key: &str) -> pb::CreateRequest {
    pb::CreateRequest {
        id: id.into(),
        param: Some(value("param")),
        deadline_ms: 0,
        tags: Default::default(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// A running `vow-functions` process (the example HTTP functions pipelines call), killed when
/// dropped.
#[derive(Debug)]
pub struct Functions {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Functions {
    /// Starts it on a free port; `args` go to `vow-functions`.
    pub fn start(args: &[&str]) -> anyhow::Result<Functions> {
        use std::io::BufRead;
        let bin = bin_dir().join("vow-functions");
        anyhow::ensure!(bin.exists(), "{} is missing: run `cargo build --workspace --bins`", bin.display());
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting vow-functions")?;
        let stdout = child.stdout.take().context("vow-functions stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = line.trim().strip_prefix("listening on ").with_context(|| format!("vow-functions said {line:?}"))?;
        Ok(Functions { child, base: format!("http://{addr}") })
    }

    /// The URL of a function route, e.g. `url("/append/x")`.
    pub fn url(&self, route: &str) -> String {
        format!("{}{route}", self.base)
    }

    /// How many calls each Idempotency-Key (continuation id) made.
    pub fn calls(&self) -> anyhow::Result<std::collections::BTreeMap<String, u32>> {
        let addr = self.base.trim_start_matches("http://");
        let text = http_get(addr, "/calls")?;
        let body = text.split("\r\n\r\n").nth(1).context("no body in /calls answer")?;
        Ok(serde_json::from_str(body)?)
    }

    /// The deliveries webhook receiver `name` (`/hooks/{name}/{n}`) got, refused ones included:
    /// `[{"body", "signature", "idempotencyKey"}]`.
    pub fn hooks(&self, name: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let addr = self.base.trim_start_matches("http://");
        let text = http_get(addr, &format!("/hooks/{name}"))?;
        let body = text.split("\r\n\r\n").nth(1).context("no body in /hooks answer")?;
        Ok(serde_json::from_str(body)?)
    }
}

impl Drop for Functions {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
