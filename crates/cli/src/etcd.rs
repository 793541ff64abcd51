//! etcd as the benchmark's peer: a promise store built the way a user would build one on etcd.
//! Create is a transaction "if version(key) == 0 then put", settle is "if version(key) == 1
//! then put", reads are linearizable Range calls. `Spawned` runs a local three-member cluster
//! from Debian's `etcd-server` (installing it if missing), with etcd's default fsync durability.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use vow_client::transport::H2Channel;

pub mod pb {
    #![allow(missing_debug_implementations, clippy::all)] // generated code
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::request_op::Request;

#[derive(Clone, Debug)]
pub struct Etcd {
    kv: KvClient<H2Channel>,
}

fn key(id: &str) -> Vec<u8> {
    format!("/promises/{id}").into_bytes()
}

impl Etcd {
    pub fn connect(endpoint: &str) -> anyhow::Result<Etcd> {
        // The same transport as vow's own client, so that the comparison is of the servers.
        let channel = H2Channel::new(endpoint).map_err(anyhow::Error::msg)?;
        Ok(Etcd { kv: KvClient::new(channel) })
    }

    /// Puts `value` if the key's version is `version` (0 = absent).
    async fn put_if_version(&self, id: &str, version: i64, value: Vec<u8>) -> Result<(), String> {
        let k = key(id);
        let req = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Version as i32,
                key: k.clone(),
                target_union: Some(TargetUnion::Version(version)),
            }],
            success: vec![pb::RequestOp { request: Some(Request::RequestPut(pb::PutRequest { key: k, value })) }],
            failure: vec![],
        };
        let mut request = tonic::Request::new(req);
        request.set_timeout(Duration::from_secs(10));
        let resp = self.kv.clone().txn(request).await.map_err(|s| format!("{}: {}", s.code(), s.message()))?;
        if resp.into_inner().succeeded { Ok(()) } else { Err(format!("version of {id} is not {version}")) }
    }

    pub async fn create(&self, id: &str) -> Result<(), String> {
        self.put_if_version(id, 0, b"PENDING".to_vec()).await
    }

    /// Puts `value` under `id` if the key is absent: a step's result, written once.
    pub async fn create_with(&self, id: &str, value: &[u8]) -> Result<(), String> {
        let mut v = b"RESOLVED:".to_vec();
        v.extend_from_slice(value);
        self.put_if_version(id, 0, v).await
    }

    pub async fn settle(&self, id: &str, value: &[u8]) -> Result<(), String> {
        let mut v = b"RESOLVED:".to_vec();
        v.extend_from_slice(value);
        self.put_if_version(id, 1, v).await
    }

    pub async fn get(&self, id: &str) -> Result<(), String> {
        let req = pb::RangeRequest { key: key(id), range_end: vec![], limit: 1, serializable: false };
        let mut request = tonic::Request::new(req);
        request.set_timeout(Duration::from_secs(10));
        let resp = self.kv.clone().range(request).await.map_err(|s| format!("{}: {}", s.code(), s.message()))?;
        if resp.into_inner().kvs.is_empty() { Err(format!("{id} not found")) } else { Ok(()) }
    }
}

/// A local etcd cluster for the run; killed and removed on `stop` (or drop).
#[derive(Debug)]
pub struct Spawned {
    dir: PathBuf,
    children: Vec<Child>,
    endpoints: Vec<String>,
}

/// The etcd binary, installing Debian's etcd-server when it is missing.
fn etcd_binary() -> anyhow::Result<PathBuf> {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    eprintln!("etcd not found; installing Debian's etcd-server");
    let sudo = if Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0")) {
        vec![]
    } else {
        vec!["sudo"]
    };
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let mut all = sudo.clone();
        all.extend_from_slice(args);
        let ok = Command::new(all[0]).args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive").status()?.success();
        if !ok {
            bail!("{} failed", all.join(" "));
        }
        Ok(())
    };
    apt(&["apt-get", "update", "-qq"])?;
    apt(&["apt-get", "install", "-y", "-qq", "etcd-server"])?;
    Ok(PathBuf::from("/usr/bin/etcd"))
}

impl Spawned {
    pub async fn start(members: u64) -> anyhow::Result<Spawned> {
        let bin = etcd_binary()?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let dir = std::env::temp_dir().join(format!("vow-bench-etcd-{}-{stamp:x}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ports: Vec<(u16, u16)> =
            crate::ports::free_ports(2 * members as usize).map(|p| p.chunks(2).map(|c| (c[0], c[1])).collect())?;
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut children = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("e{i}.log")))?;
            let child = Command::new(&bin)
                .args(["--name", &format!("e{i}"), "--data-dir"])
                .arg(dir.join(format!("e{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-cluster",
                    &cluster,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "vow-bench",
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            children.push(child);
        }
        let endpoints: Vec<String> = ports.iter().map(|(c, _)| format!("127.0.0.1:{c}")).collect();
        let spawned = Spawned { dir, children, endpoints };
        // Ready when a linearizable read succeeds (it needs a leader and a quorum).
        let client = Etcd::connect(&spawned.endpoints[0])?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match client.get("ready-probe").await {
                Ok(()) => break,
                Err(e) if e.contains("not found") => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("etcd did not become ready: {e} (logs in {})", spawned.dir.display())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await, // poll while etcd elects
            }
        }
        Ok(spawned)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }

    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}
