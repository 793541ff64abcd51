//! The `vowd` processes, one per namespace, with their data on disk under the run's directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use vow_client::{Client, Options, pb};

use crate::net;

pub const GRPC_PORT: u16 = 7001;
pub const HTTP_PORT: u16 = 7081;

#[derive(Debug)]
pub struct Node {
    pub id: u64,
    child: Option<Child>,
    pub paused: bool,
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
}

pub fn grpc(id: u64) -> String {
    format!("{}:{GRPC_PORT}", net::addr(id))
}

impl Hosts {
    pub fn new(vowd: PathBuf, dir: &Path, n: u64, shards: u32, env: Vec<(String, String)>) -> Hosts {
        Hosts {
            vowd,
            dir: dir.to_path_buf(),
            nodes: (1..=n).map(|id| Node { id, child: None, paused: false }).collect(),
            shards,
            env,
        }
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
        let data = self.dir.join(format!("n{id}"));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.join("vowd.log"))?;
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
            .args(["--heartbeat-ms", "100", "--election-timeout-ms", "500", "--snapshot-logs", "2000"])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting vowd in its namespace")?;
        let node = self.node(id)?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
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
            Command::new("kill").args([sig, &c.id().to_string()]).status()?;
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

    /// Resumes paused nodes and starts dead ones.
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
            Options { call_timeout, attempt_timeout: call_timeout.min(Duration::from_secs(1)), ..Default::default() },
        )?)
    }

    /// A client pinned to one node: it never follows leader hints elsewhere.
    pub fn client_of(&self, id: u64) -> anyhow::Result<Client> {
        let options = Options {
            call_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(1),
            follow_leader_hints: false,
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
