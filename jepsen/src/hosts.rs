//! The `vowd` processes, one per namespace, with their data on disk under the run's directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use vow_client::tls::{ClientTls, ClientTlsFiles, Token};
use vow_client::{Client, Options, pb};

use crate::clocks::FakeClock;
use crate::disks::Disk;
use crate::net;

pub const GRPC_PORT: u16 = 7001;
pub const HTTP_PORT: u16 = 7081;

#[derive(Debug)]
pub struct Node {
    pub id: u64,
    child: Option<Child>,
    pub paused: bool,
    /// The node's shifted wall clock, when the run injects clock faults.
    clock: Option<FakeClock>,
    /// The node's data directory as a disk that can lose power, when the run injects power
    /// loss or disk faults.
    disk: Option<Disk>,
}

/// The cluster's processes.
#[derive(Debug)]
pub struct Hosts {
    pub vowd: PathBuf,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    /// Every vowd's `--shards`: fixed when the cluster is initialised, so the same on every
    /// start and restart.
    pub shards: u32,
    /// Extra environment for every vowd (the sabotage switch in tests).
    pub env: Vec<(String, String)>,
    /// TLS and the API token clients use, when the run is secured ([`Hosts::with_tls`]).
    pub security: Option<Secured>,
}

/// A secured run's material: node certificates in `dir/tls`, API tokens in `dir/api-tokens`.
#[derive(Debug, Clone)]
pub struct Secured {
    pub dir: PathBuf,
    pub tls: ClientTls,
    pub token: Token,
}

pub fn grpc(id: u64) -> String {
    format!("{}:{GRPC_PORT}", net::addr(id))
}

impl Hosts {
    pub fn new(vowd: PathBuf, dir: &Path, n: u64, shards: u32, env: Vec<(String, String)>) -> Hosts {
        Hosts {
            vowd,
            dir: dir.to_path_buf(),
            nodes: (1..=n).map(|id| Node { id, child: None, paused: false, clock: None, disk: None }).collect(),
            shards,
            env,
            security: None,
        }
    }

    /// Secures the run: a cluster CA and a certificate for every node (its namespace address
    /// and node id) made by the `vow` binary beside vowd, and an admin token every client
    /// presents. Call before the nodes start.
    pub fn with_tls(mut self) -> anyhow::Result<Hosts> {
        let vow = self.vowd.with_file_name("vow");
        let tls = self.dir.join("tls");
        let run = |args: &[String]| -> anyhow::Result<()> {
            let out = Command::new(&vow).args(args).output().with_context(|| format!("running {}", vow.display()))?;
            anyhow::ensure!(out.status.success(), "vow {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        run(&["tls".into(), "ca".into(), "--dir".into(), tls.display().to_string()])?;
        for id in self.ids() {
            run(&[
                "tls".into(),
                "cert".into(),
                "--ca-dir".into(),
                tls.display().to_string(),
                "--out".into(),
                tls.join(format!("node-{id}.pem")).display().to_string(),
                "--node-id".into(),
                id.to_string(),
                "--ip".into(),
                net::addr(id).to_string(),
            ])?;
        }
        let token = format!("{:032x}", rand::random::<u128>());
        std::fs::write(self.dir.join("api-tokens"), format!("admin jepsen {token}\n"))?;
        let files = ClientTlsFiles { ca: tls.join("ca.pem"), cert_and_key: None };
        let client_tls = ClientTls::from_files(&files, &[b"h2"]).map_err(anyhow::Error::msg)?;
        self.security = Some(Secured { dir: self.dir.clone(), tls: client_tls, token: Token::new(token) });
        Ok(self)
    }

    /// Client options for this run: plain, or its CA and token.
    pub fn options(&self) -> Options {
        match &self.security {
            None => Options::default(),
            Some(s) => Options { tls: Some(s.tls.clone()), token: Some(s.token.clone()), ..Options::default() },
        }
    }

    /// Puts every node on a fake wall clock of its own (libfaketime), at offset zero until
    /// [`Hosts::set_clock_offset`] moves it. Call before the nodes start.
    pub fn with_fake_clocks(mut self) -> anyhow::Result<Hosts> {
        anyhow::ensure!(
            crate::clocks::available(),
            "clock faults need {} (scripts/setup.sh installs libfaketime)",
            crate::clocks::LIBFAKETIME
        );
        for node in &mut self.nodes {
            let dir = self.dir.join(format!("n{}", node.id));
            std::fs::create_dir_all(&dir)?;
            node.clock = Some(FakeClock::create(&dir)?);
        }
        Ok(self)
    }

    /// Moves node `id`'s wall clock to `offset_ms` from true time; it takes effect at once, in
    /// the running process.
    pub fn set_clock_offset(&mut self, id: u64, offset_ms: i64) -> anyhow::Result<()> {
        let clock = self.node(id)?.clock.as_ref().with_context(|| format!("node {id} has no fake clock"))?;
        Ok(clock.set_offset_ms(offset_ms)?)
    }

    /// Every fake clock back to true time (a no-op without clock faults).
    pub fn reset_clocks(&mut self) -> anyhow::Result<()> {
        for node in &self.nodes {
            if let Some(clock) = &node.clock {
                clock.set_offset_ms(0)?;
            }
        }
        Ok(())
    }

    /// Gives every node a data directory on a disk that can lose power ([`crate::disks`]).
    /// Call before the nodes start.
    pub fn with_lazy_disks(mut self) -> anyhow::Result<Hosts> {
        anyhow::ensure!(crate::disks::available(), "power-loss and disk faults need /dev/fuse");
        for node in &mut self.nodes {
            node.disk = Some(Disk::mount(&self.dir.join(format!("n{}", node.id)))?);
        }
        Ok(self)
    }

    pub fn has_lazy_disks(&self) -> bool {
        self.nodes.iter().all(|n| n.disk.is_some())
    }

    /// Node `id`'s disk, if the run gave it one.
    pub fn disk(&self, id: u64) -> anyhow::Result<&Disk> {
        let node = self.nodes.iter().find(|n| n.id == id).with_context(|| format!("no node {id}"))?;
        node.disk.as_ref().with_context(|| format!("node {id} has no lazy disk (run with the power or disk nemesis)"))
    }

    /// The power goes out on node `id`: `kill -9`, then its disk loses what was not fsynced.
    /// Returns the filesystem's account of what it rolled back.
    pub fn power_loss(&mut self, id: u64) -> anyhow::Result<String> {
        self.kill(id)?;
        self.disk(id)?.send(vow_lazyfs::Command::Crash)
    }

    /// Lifts every disk fault (a no-op without lazy disks).
    pub fn heal_disks(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            if let Some(disk) = &node.disk {
                disk.send(vow_lazyfs::Command::Heal)?;
            }
        }
        Ok(())
    }

    /// Node `id`'s fake clock, for a task that moves it on its own (a strobe).
    pub fn clock_of(&self, id: u64) -> Option<FakeClock> {
        self.nodes.iter().find(|n| n.id == id).and_then(|n| n.clock.clone())
    }

    pub fn has_fake_clocks(&self) -> bool {
        self.nodes.iter().all(|n| n.clock.is_some())
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| grpc(n.id)).collect()
    }

    fn node(&mut self, id: u64) -> anyhow::Result<&mut Node> {
        self.nodes.iter_mut().find(|n| n.id == id).with_context(|| format!("no node {id}"))
    }

    pub fn start(&mut self, id: u64) -> anyhow::Result<()> {
        let peers = self.nodes.iter().map(|n| format!("{}={}", n.id, grpc(n.id))).collect::<Vec<_>>().join(",");
        let host_dir = self.dir.join(format!("n{id}"));
        std::fs::create_dir_all(&host_dir)?;
        // The log stays off the lazy disk: a power loss must not take the evidence with it.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(host_dir.join("vowd.log"))?;
        let data = match self.nodes.iter().find(|n| n.id == id).and_then(|n| n.disk.as_ref()) {
            Some(disk) => disk.data_dir().to_path_buf(),
            None => host_dir,
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net::ns(id)])
            .arg(&self.vowd)
            .args(["--node-id", &id.to_string(), "--data-dir"])
            .arg(&data)
            .args([
                "--grpc-addr",
                &grpc(id),
                "--http-addr",
                &format!("{}:{HTTP_PORT}", net::addr(id)),
                "--peers",
                &peers,
            ])
            .args(["--shards", &self.shards.to_string()])
            .args(self.security.iter().flat_map(|s| {
                let t = s.dir.join("tls");
                [
                    "--tls-cert".into(),
                    t.join(format!("node-{id}.pem")).into_os_string(),
                    "--tls-key".into(),
                    t.join(format!("node-{id}-key.pem")).into_os_string(),
                    "--tls-ca".into(),
                    t.join("ca.pem").into_os_string(),
                    "--auth-file".into(),
                    s.dir.join("api-tokens").into_os_string(),
                ]
            }))
            .args(["--heartbeat-ms", "100", "--election-timeout-ms", "500"])
            // Snapshots every 2,000 entries unless the run asks for its own interval
            // (`--vowd-env VOW_SNAPSHOT_LOGS=100`: snapshot-heavy runs, installs under faults).
            .args(
                self.env
                    .iter()
                    .all(|(k, _)| k != "VOW_SNAPSHOT_LOGS")
                    .then_some(["--snapshot-logs", "2000"])
                    .into_iter()
                    .flatten(),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(
                self.nodes
                    .iter()
                    .find(|n| n.id == id)
                    .and_then(|n| n.clock.as_ref())
                    .map(FakeClock::env)
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting vowd in its namespace")?;
        let node = self.node(id)?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// How node `id`'s process ended, if it has, in words ("exit status: 74").
    pub fn exit_status(&mut self, id: u64) -> Option<String> {
        let child = self.node(id).ok()?.child.as_mut()?;
        child.try_wait().ok().flatten().map(|status| status.to_string())
    }

    pub fn is_running(&mut self, id: u64) -> bool {
        match self.node(id) {
            Ok(n) => n.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))),
            Err(_) => false,
        }
    }

    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id)?;
        if let Some(mut c) = node.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
        node.paused = false;
        Ok(())
    }

    fn signal(&mut self, id: u64, sig: &str) -> anyhow::Result<()> {
        let node = self.node(id)?;
        if let Some(c) = &node.child {
            let status = Command::new("kill").args([sig, &c.id().to_string()]).status()?;
            // A pause that did not happen would pass for one that did.
            anyhow::ensure!(status.success(), "kill {sig} of node {id} failed: {status}");
        }
        Ok(())
    }

    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, "-STOP")?;
        self.node(id)?.paused = true;
        Ok(())
    }

    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, "-CONT")?;
        self.node(id)?.paused = false;
        Ok(())
    }

    /// Nodes whose process exited although nothing here stopped it (a panic, a fatal storage
    /// error, an abort), with the exit status in words. `kill` takes a node's process handle
    /// before it signals, so only such exits are left to find; they are forgotten here, so the
    /// caller must record them, and a later [`Hosts::heal`] starts the node again.
    pub fn reap_crashed(&mut self) -> Vec<(u64, String)> {
        let mut crashed = Vec::new();
        for node in &mut self.nodes {
            if let Some(status) = node.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                node.child = None;
                node.paused = false;
                crashed.push((node.id, status.to_string()));
            }
        }
        crashed
    }

    /// Resumes paused nodes and starts dead ones: those the nemesis killed, and those that
    /// crashed, which the caller must have taken from [`Hosts::reap_crashed`] first.
    pub fn heal(&mut self) -> anyhow::Result<Vec<u64>> {
        let mut healed = Vec::new();
        for id in self.ids() {
            if self.node(id)?.paused {
                self.resume(id)?;
                healed.push(id);
            }
            if !self.is_running(id) {
                self.start(id)?;
                healed.push(id);
            }
        }
        Ok(healed)
    }

    pub fn stop_all(&mut self) {
        for id in self.ids() {
            let _ = self.resume(id);
            let _ = self.kill(id);
        }
    }

    /// A client that knows every node, with short deadlines so faults end ops quickly.
    pub fn client(&self, call_timeout: Duration) -> anyhow::Result<Client> {
        Ok(Client::with_options(
            &self.endpoints(),
            Options { call_timeout, attempt_timeout: call_timeout.min(Duration::from_secs(1)), ..self.options() },
        )?)
    }

    /// A client pinned to one node: it never follows leader hints elsewhere.
    pub fn client_of(&self, id: u64) -> anyhow::Result<Client> {
        let options = Options {
            call_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(1),
            follow_leader_hints: false,
            ..self.options()
        };
        Ok(Client::with_options(&[grpc(id)], options)?)
    }

    /// Every node's status, asked of all nodes at once so the replies describe about the same
    /// moment; a node that does not answer within `within` is left out.
    pub async fn statuses(&self, within: Duration) -> Vec<(u64, pb::StatusResponse)> {
        let mut asks = tokio::task::JoinSet::new();
        for id in self.ids() {
            let Ok(c) = self.client_of(id) else { continue };
            asks.spawn(async move { (id, tokio::time::timeout(within, c.status()).await) });
        }
        let mut replies = Vec::new();
        while let Some(reply) = asks.join_next().await {
            if let Ok((id, Ok(Ok(s)))) = reply {
                replies.push((id, s));
            }
        }
        replies.sort_by_key(|(id, _)| *id);
        replies
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// What in a node's log shows it died of a bug rather than a fault: a Rust panic, or the
/// runtime aborting the process.
const CRASH_MARKS: &[&str] = &["panicked at", "fatal runtime error"];

/// The lines of a node's log that show a panic or an abort (see [`CRASH_MARKS`]).
pub fn crash_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|line| CRASH_MARKS.iter().any(|mark| line.contains(mark))).collect()
}

/// Every node log under a run's directory (`n<id>/vowd.log`), by node id. The logs span every
/// restart of the node, since each start appends to the same file.
pub fn node_logs(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut logs: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let id = entry.file_name().to_str()?.strip_prefix('n')?.parse().ok()?;
            let log = entry.path().join("vowd.log");
            log.exists().then_some((id, log))
        })
        .collect();
    logs.sort();
    logs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_and_aborts_are_found_in_a_log_and_nothing_else() {
        let log = "\
2026-11-29T10:00:00Z  INFO vowd started node=1
2026-11-29T10:00:01Z  WARN shard 3: leader lost; election started
thread 'tokio-runtime-worker' panicked at crates/server/src/shard.rs:120:9:
called `Option::unwrap()` on a `None` value
2026-11-29T10:00:02Z  INFO vowd started node=1
fatal runtime error: stack overflow
2026-11-29T10:00:03Z ERROR request failed: unavailable (the word panic alone is not a panic)
";
        assert_eq!(
            crash_lines(log),
            [
                "thread 'tokio-runtime-worker' panicked at crates/server/src/shard.rs:120:9:",
                "fatal runtime error: stack overflow"
            ]
        );
        assert!(crash_lines("").is_empty());
    }

    #[test]
    fn a_node_that_exits_by_itself_is_reaped_and_a_killed_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut hosts = Hosts::new(PathBuf::from("vowd"), dir.path(), 3, 1, vec![]);
        let spawn = |script: &str| Command::new("sh").args(["-c", script]).spawn().unwrap();
        hosts.nodes[0].child = Some(spawn("exit 3"));
        hosts.nodes[1].child = Some(spawn("sleep 30"));
        hosts.nodes[2].child = Some(spawn("sleep 30"));
        hosts.kill(2).unwrap(); // the nemesis's kill: expected, never reported
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let crashed = loop {
            let crashed = hosts.reap_crashed();
            if !crashed.is_empty() || std::time::Instant::now() > deadline {
                break crashed;
            }
            std::thread::sleep(Duration::from_millis(10)); // poll until `exit 3` has exited
        };
        assert_eq!(crashed, [(1, "exit status: 3".to_owned())]);
        assert!(hosts.reap_crashed().is_empty(), "a crash is reported once");
        assert!(hosts.is_running(3) && !hosts.is_running(1) && !hosts.is_running(2));
    }

    #[test]
    fn node_logs_are_found_by_node_directory() {
        let dir = tempfile::tempdir().unwrap();
        for node in ["n2", "n1", "n10", "nx", "other"] {
            std::fs::create_dir(dir.path().join(node)).unwrap();
            std::fs::write(dir.path().join(node).join("vowd.log"), "").unwrap();
        }
        std::fs::create_dir(dir.path().join("n3")).unwrap(); // no log yet
        let ids: Vec<u64> = node_logs(dir.path()).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, [1, 2, 10]);
    }
}
