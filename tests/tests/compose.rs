//! The container deployment under what an orchestrator does to it: three `vow:dev` containers
//! from `deploy/compose/docker-compose.yml` (named like a StatefulSet's pods, one volume each,
//! the same environment for all), a client load of creates and resolves from the host, and in
//! turn a rolling restart, `docker kill` of the busiest leader, a container cut off the network
//! and reconnected, a container removed and recreated on its volume, and a scale from 3 to 5
//! nodes and back. After each: every acknowledged promise reads back resolved (lost = 0), and
//! the client saw only errors that retrying may end (none, so far).
//!
//! Needs the Docker engine, `docker-compose` and the image (`deploy/build-image.sh`, which
//! `make test` runs); `VOW_IMAGE` picks another tag.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::sync::Mutex;
use vow_client::{Client, pb};
use vow_tests::{create_req, http_get, value};

const SUBNET_PREFIX: &str = "10.250.77";

/// A compose project of this test, torn down (containers, network, volumes) when dropped.
struct Project {
    name: String,
    file: String,
}

impl Project {
    fn up() -> anyhow::Result<Project> {
        let file = format!("{}/../deploy/compose/docker-compose.yml", env!("CARGO_MANIFEST_DIR"));
        let p = Project { name: format!("vowtest{}", std::process::id()), file };
        p.compose(&["down", "--volumes", "--remove-orphans"])?;
        p.compose(&["up", "-d", "vow-1", "vow-2", "vow-3"])?;
        Ok(p)
    }

    fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("docker-compose")
            .args(["-p", &self.name, "-f", &self.file])
            .args(args)
            .env("VOW_COMPOSE_SUBNET_PREFIX", SUBNET_PREFIX)
            .output()
            .context("running docker-compose (is it installed?)")?;
        ensure!(
            out.status.success(),
            "docker-compose {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn container(&self, node: u64) -> String {
        format!("{}_vow-{node}_1", self.name)
    }

    fn network(&self) -> String {
        format!("{}_vow", self.name)
    }

    fn docker(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("docker").args(args).output().context("running docker")?;
        ensure!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    fn logs(&self) -> String {
        self.compose(&["logs", "--no-color", "--tail", "40"]).unwrap_or_else(|e| format!("{e:#}"))
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.compose(&["--profile", "scale", "down", "--volumes", "--remove-orphans", "-t", "5"]);
    }
}

fn grpc(node: u64) -> String {
    format!("{SUBNET_PREFIX}.{}:7001", 10 + node)
}

fn http(node: u64) -> String {
    format!("{SUBNET_PREFIX}.{}:7081", 10 + node)
}

fn ready(node: u64) -> bool {
    http_get(&http(node), "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
}

async fn wait_ready(nodes: &[u64], within: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !nodes.iter().all(|n| ready(*n)) {
        ensure!(start.elapsed() < within, "nodes {nodes:?} not all ready after {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await; // poll /readyz
    }
    Ok(start.elapsed())
}

/// The client load: writers creating and resolving promises through every node until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    errors: Arc<Mutex<BTreeMap<String, u32>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(scenario: &str, nodes: &[u64]) -> anyhow::Result<Load> {
        let endpoints: Vec<String> = nodes.iter().map(|n| grpc(*n)).collect();
        let load = Load { stop: Arc::default(), acked: Arc::default(), errors: Arc::default(), tasks: Vec::new() };
        let mut tasks = Vec::new();
        for w in 0..4 {
            let client = Client::connect(&endpoints)?;
            let (stop, acked, errors) = (load.stop.clone(), load.acked.clone(), load.errors.clone());
            let scenario = scenario.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("{scenario}/{w}/{i}");
                    i += 1;
                    let result = async {
                        client.create(create_req(&id, &id)).await?;
                        client.resolve(&id, value("done"), Some(format!("r-{id}"))).await
                    }
                    .await;
                    match result {
                        Ok(_) => acked.lock().await.push(id),
                        Err(e) => {
                            let kind = format!("{e}").split(':').next().unwrap_or_default().to_owned();
                            *errors.lock().await.entry(kind).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await; // back off after an error
                        }
                    }
                }
            }));
        }
        Ok(Load { tasks, ..load })
    }

    /// Stops the load and checks every acknowledged promise reads back resolved.
    async fn finish(self, scenario: &str, nodes: &[u64], started: Instant) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await?;
        }
        let acked = self.acked.lock().await.clone();
        let errors = self.errors.lock().await.clone();
        let endpoints: Vec<String> = nodes.iter().map(|n| grpc(*n)).collect();
        let client = Client::connect(&endpoints)?;
        let mut lost = Vec::new();
        for id in &acked {
            match client.get(id).await {
                Ok(p) if p.state == pb::State::Resolved as i32 => {}
                other => lost.push(format!("{id}: {other:?}")),
            }
        }
        println!(
            "{scenario}: {} create+resolve pairs acknowledged in {:.1} s, errors after the client's retries {errors:?}, lost {}",
            acked.len(),
            started.elapsed().as_secs_f64(),
            lost.len()
        );
        ensure!(lost.is_empty(), "{scenario}: acknowledged promises lost: {lost:?}");
        ensure!(!acked.is_empty(), "{scenario}: nothing was acknowledged");
        ensure!(errors.is_empty(), "{scenario}: the client saw errors: {errors:?}");
        Ok(())
    }
}

async fn status(nodes: &[u64]) -> anyhow::Result<pb::StatusResponse> {
    let endpoints: Vec<String> = nodes.iter().map(|n| grpc(*n)).collect();
    Ok(Client::connect(&endpoints)?.status().await?)
}

async fn wait_voters(nodes: &[u64], voters: &[u64], within: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(s) = status(nodes).await {
            let want: Vec<u64> = voters.to_vec();
            if s.shards.iter().all(|sh| {
                let mut v = sh.voters.clone();
                v.sort_unstable();
                v == want && sh.learners.is_empty() && sh.leader_id != 0
            }) {
                return Ok(());
            }
        }
        ensure!(start.elapsed() < within, "every shard's voters did not become {voters:?} within {within:?}");
        tokio::time::sleep(Duration::from_millis(300)).await; // poll membership
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cluster_survives_what_an_orchestrator_does_to_it() -> anyhow::Result<()> {
    let image = std::env::var("VOW_IMAGE").unwrap_or_else(|_| "vow:dev".into());
    let inspected = Command::new("docker").args(["image", "inspect", &image]).output().context("running docker")?;
    if !inspected.status.success() {
        bail!("the image {image} is missing: build it with deploy/build-image.sh (make test does)");
    }
    let project = Project::up()?;
    let three = [1, 2, 3];
    let result = async {
        let took = wait_ready(&three, Duration::from_secs(60)).await?;
        println!("3 containers ready {took:?} after `up`");

        // A rolling restart: each container in turn, SIGTERM and start, waiting for ready.
        let start = Instant::now();
        let load = Load::start("rolling", &three)?;
        for n in three {
            project.docker(&["restart", "-t", "30", &project.container(n)])?;
            wait_ready(&three, Duration::from_secs(60)).await?;
        }
        load.finish("rolling restart", &three, start).await?;

        // docker kill of the node leading the most shards, then start it again.
        let start = Instant::now();
        let load = Load::start("kill", &three)?;
        tokio::time::sleep(Duration::from_secs(2)).await; // load before the fault
        let s = status(&three).await?;
        let mut led = BTreeMap::<u64, u32>::new();
        for sh in &s.shards {
            *led.entry(sh.leader_id).or_default() += 1;
        }
        let leader = led.iter().max_by_key(|(_, n)| **n).map(|(id, _)| *id).context("no leader")?;
        project.docker(&["kill", &project.container(leader)])?;
        tokio::time::sleep(Duration::from_secs(5)).await; // run without it
        project.docker(&["start", &project.container(leader)])?;
        wait_ready(&three, Duration::from_secs(60)).await?;
        load.finish(&format!("docker kill of node {leader} (leading {} shards)", led[&leader]), &three, start).await?;

        // Cut one container off the network, then reconnect it.
        let start = Instant::now();
        let load = Load::start("partition", &[1, 3])?;
        project.docker(&["network", "disconnect", &project.network(), &project.container(2)])?;
        tokio::time::sleep(Duration::from_secs(5)).await; // run cut off
        project.docker(&[
            "network",
            "connect",
            "--ip",
            &format!("{SUBNET_PREFIX}.12"),
            "--alias",
            "vow-2.vow",
            &project.network(),
            &project.container(2),
        ])?;
        wait_ready(&three, Duration::from_secs(60)).await?;
        load.finish("network disconnect of node 2 and reconnect", &[1, 3], start).await?;

        // Remove a container and create it again on its volume: it comes back as itself.
        let start = Instant::now();
        let load = Load::start("recreate", &[1, 2])?;
        project.compose(&["rm", "-s", "-f", "vow-3"])?;
        project.compose(&["up", "-d", "vow-3"])?;
        wait_ready(&three, Duration::from_secs(60)).await?;
        wait_voters(&three, &three, Duration::from_secs(30)).await?;
        load.finish("node 3 removed and recreated on its volume", &[1, 2], start).await?;

        // Scale 3 -> 5 (the new nodes join by themselves) -> 3 (membership first).
        let start = Instant::now();
        let load = Load::start("scale", &three)?;
        project.compose(&["up", "-d", "vow-4", "vow-5"])?;
        wait_voters(&three, &[1, 2, 3, 4, 5], Duration::from_secs(90)).await?;
        let five = [1, 2, 3, 4, 5];
        wait_ready(&five, Duration::from_secs(60)).await?;
        let admin = Client::connect(&three.map(grpc))?;
        for n in [5, 4] {
            admin.remove_node(n).await.with_context(|| format!("removing node {n}"))?;
        }
        wait_voters(&three, &three, Duration::from_secs(60)).await?;
        project.compose(&["rm", "-s", "-f", "-v", "vow-4", "vow-5"])?;
        load.finish("scale 3 -> 5 -> 3", &three, start).await?;
        anyhow::Ok(())
    }
    .await;
    result.map_err(|e| e.context(project.logs()))
}
