//! vowd's configuration: flags, then `VOW_*` environment variables, then an optional TOML file,
//! then defaults — in that order of precedence. With no arguments at all vowd is a single-node
//! cluster on loopback with data in `./vow-data` (the embedded default, also `--dev`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;
use vow_core::{Limits, NodeId};

use crate::shard::RaftOptions;
use crate::tls::TlsFiles;
use vow_storage::types::VowNode;

/// Command-line flags. Every value is optional here so that the TOML file can fill the gaps.
#[derive(Debug, Parser, Default)]
#[command(name = "vowd", version, about = "vow: a distributed promise store (one node)")]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "VOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Single node on loopback with data in ./vow-data (the default when nothing else is given).
    #[arg(long)]
    pub dev: bool,
    /// This node's id (a positive integer, unique in the cluster).
    #[arg(long, env = "VOW_NODE_ID")]
    pub node_id: Option<u64>,
    /// Take the node id from the host name's trailing number, as a StatefulSet names its pods
    /// (`vow-2` is node 2; give the StatefulSet `ordinals: {start: 1}`, ids start at 1).
    #[arg(long, env = "VOW_NODE_ID_FROM_HOSTNAME", conflicts_with = "node_id")]
    pub node_id_from_hostname: bool,
    /// Directory for RocksDB and snapshots.
    #[arg(long, env = "VOW_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on for the public gRPC API.
    #[arg(long, env = "VOW_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
    /// Address clients use to reach this node's gRPC port (default: --grpc-addr, or this
    /// host's name with its port when --grpc-addr listens on every interface, e.g. 0.0.0.0).
    #[arg(long, env = "VOW_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Address to listen on for other nodes: Raft, routed requests, joining (default: the
    /// gRPC host with its port + 100, e.g. 7101). Keep it off networks clients are on.
    #[arg(long, env = "VOW_PEER_ADDR")]
    pub peer_addr: Option<String>,
    /// Address other nodes use to reach the peer port (default: --advertise-addr's host with
    /// the peer port — --peer-addr's, or the gRPC port + 100 — unless --peer-addr names a
    /// host of its own).
    #[arg(long, env = "VOW_ADVERTISE_PEER_ADDR")]
    pub advertise_peer_addr: Option<String>,
    /// Address to listen on for HTTP (/livez, /readyz, /metrics).
    #[arg(long, env = "VOW_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Initial voters as `id=grpc_host:port[@peer_host:port],...`; a member without `@peer`
    /// has the gRPC port + 100 as its peer port. Each of them initialises the cluster with this
    /// same set (idempotently); a node not in the list joins it instead, through --join or,
    /// without it, through the listed nodes. Default: this node alone.
    #[arg(long, env = "VOW_PEERS")]
    pub peers: Option<String>,
    /// Join an existing cluster through any of these nodes' peer ports (`host:port,...`)
    /// instead of initialising one (as a learner of every shard, then a voter).
    #[arg(long, env = "VOW_JOIN")]
    pub join: Option<String>,
    /// Cluster name; a node refuses data or messages of another cluster.
    #[arg(long, env = "VOW_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Number of shards (Raft groups; default 8). Fixed when the cluster is initialised: every
    /// node of a cluster must run the same number.
    #[arg(long, env = "VOW_SHARDS")]
    pub shards: Option<u32>,
    /// Keep shard leadership where an operator or the elections put it, instead of spreading it
    /// over the voters (see the `balance` module).
    #[arg(long, env = "VOW_NO_LEADER_BALANCE")]
    pub no_leader_balance: bool,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, env = "VOW_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Minimum election timeout in milliseconds (the maximum is twice this).
    #[arg(long, env = "VOW_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,
    /// Build a snapshot and purge the log after this many entries (or a quarter of the state's
    /// records, if that is more).
    #[arg(long, env = "VOW_SNAPSHOT_LOGS")]
    pub snapshot_logs: Option<u64>,
    /// How long settled promises are kept, in seconds (default 7 days, at least 60: a client
    /// retrying a write with the same idempotency key must still find its record).
    #[arg(long, env = "VOW_RETENTION_SECS")]
    pub retention_secs: Option<u64>,
    /// Largest param or value data in bytes (default 1 MiB, at most 16 MiB).
    #[arg(long, env = "VOW_MAX_DATA_BYTES")]
    pub max_data_bytes: Option<usize>,
    /// Deadline given to creates without one, in seconds from now (default 1 day).
    #[arg(long, env = "VOW_DEFAULT_DEADLINE_SECS")]
    pub default_deadline_secs: Option<u64>,
    /// File of completion-token keys, one per line, the first signing (see README "Completion
    /// tokens"). Every node of a cluster needs the same file. Default: a single-node cluster
    /// generates one in its data directory; a larger one issues no tokens.
    #[arg(long, env = "VOW_COMPLETION_KEYS_FILE")]
    pub completion_keys_file: Option<PathBuf>,
    /// This node's TLS certificate chain (PEM), presented on every listener and to peers.
    /// With --tls-key and --tls-ca, every listener speaks TLS and peers use mutual TLS.
    #[arg(long, env = "VOW_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "VOW_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): a peer must present a certificate it signed.
    #[arg(long, env = "VOW_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// CA of client certificates on the public ports: clients may then present one (mutual TLS).
    #[arg(long, env = "VOW_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// API tokens with roles, one `<role> <name> <token>` per line (README "Security"). With
    /// it every public call needs a token; the file is re-read when it changes.
    #[arg(long, env = "VOW_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Log filter, e.g. `info` or `vow_server=debug` (RUST_LOG works too).
    #[arg(long, env = "VOW_LOG")]
    pub log: Option<String>,
    /// For tests of clock skew only: run this node's wall clock this many milliseconds off.
    #[arg(long, env = "VOW_TEST_CLOCK_OFFSET_MS", hide = true, allow_hyphen_values = true)]
    pub test_clock_offset_ms: Option<i64>,
}

/// The TOML file: the same settings as the flags, plus the full limits table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<u64>,
    pub node_id_from_hostname: Option<bool>,
    pub data_dir: Option<PathBuf>,
    pub grpc_addr: Option<String>,
    pub advertise_addr: Option<String>,
    pub peer_addr: Option<String>,
    pub advertise_peer_addr: Option<String>,
    pub http_addr: Option<String>,
    pub peers: Option<String>,
    pub join: Option<String>,
    pub cluster_name: Option<String>,
    pub shards: Option<u32>,
    pub no_leader_balance: Option<bool>,
    pub heartbeat_ms: Option<u64>,
    pub election_timeout_ms: Option<u64>,
    pub snapshot_logs: Option<u64>,
    pub retention_secs: Option<u64>,
    pub completion_keys_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub auth_file: Option<PathBuf>,
    pub log: Option<String>,
    #[serde(default)]
    pub limits: FileLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub max_id_bytes: Option<usize>,
    pub max_data_bytes: Option<usize>,
    pub max_headers: Option<usize>,
    pub max_tags: Option<usize>,
    pub max_entry_bytes: Option<usize>,
    pub max_idempotency_key_bytes: Option<usize>,
    pub max_deadline_ahead_secs: Option<u64>,
    pub default_deadline_secs: Option<u64>,
}

/// The resolved configuration of one node.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub grpc_addr: SocketAddr,
    pub advertise_addr: String,
    pub peer_addr: SocketAddr,
    pub advertise_peer_addr: String,
    pub http_addr: SocketAddr,
    /// The initial voters, when this node is one of them (it initialises the cluster with
    /// them); empty when it joins.
    pub initial_members: BTreeMap<NodeId, VowNode>,
    /// Peer addresses to join through, when this node is not an initial voter.
    pub join: Vec<String>,
    pub cluster_name: String,
    pub shards: u32,
    /// Spread shard leadership over the voters (on unless `--no-leader-balance`).
    pub balance_leaders: bool,
    pub raft: RaftOptions,
    pub retention: Duration,
    pub limits: Limits,
    /// Where completion-token keys come from.
    pub completion_keys: KeySource,
    /// TLS on every listener and between peers, when configured.
    pub tls: Option<TlsFiles>,
    /// API tokens with roles, when configured.
    pub auth_file: Option<PathBuf>,
    pub log: String,
    /// See [`Args::test_clock_offset_ms`].
    pub test_clock_offset_ms: i64,
}

/// Where a node's completion-token keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `--completion-keys-file`: shared by every node, watched for rotations.
    File(PathBuf),
    /// `VOW_COMPLETION_KEYS`: comma-separated keys.
    Inline(String),
    /// A single-node cluster's own key, generated at this path on first start.
    Generated(PathBuf),
    /// None configured in a cluster of several nodes: no tokens.
    None,
}

impl KeySource {
    pub fn load(&self) -> anyhow::Result<crate::tokens::CompletionKeys> {
        use crate::tokens::CompletionKeys;
        match self {
            KeySource::File(p) => CompletionKeys::from_file(p),
            KeySource::Inline(list) => CompletionKeys::from_list(list),
            KeySource::Generated(p) => CompletionKeys::generated_at(p),
            KeySource::None => Ok(CompletionKeys::none()),
        }
    }
}

pub const MAX_SHARDS: u32 = 256;
/// Shards of a new cluster unless `--shards` says otherwise: enough to spread leadership over
/// a few nodes, few enough that each node's share of elections and heartbeats stays small.
pub const DEFAULT_SHARDS: u32 = 8;

/// The shortest retention accepted. A client retries a write with the same idempotency key for
/// as long as its call lasts (15 s by default in the Rust SDK), and a held-up attempt can arrive
/// later still; a record collected before then would let the retry act a second time (a
/// retried create would make a new promise). A minute covers the SDK's retries four times.
pub const MIN_RETENTION: Duration = Duration::from_secs(60);

impl Config {
    pub fn from_args(args: Args) -> anyhow::Result<Config> {
        Config::from_args_and_keys(args, std::env::var("VOW_COMPLETION_KEYS").ok().filter(|k| !k.is_empty()))
    }

    /// [`Config::from_args`] with the value of `VOW_COMPLETION_KEYS` given (keys are not a
    /// flag: a command line is visible to every user of the machine).
    pub fn from_args_and_keys(args: Args, inline_keys: Option<String>) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<FileConfig>(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let node_id = if args.node_id_from_hostname || file.node_id_from_hostname.unwrap_or(false) {
            let host = hostname().context("reading this host's name for --node-id-from-hostname")?;
            node_id_from_hostname(&host).map_err(anyhow::Error::msg)?
        } else {
            args.node_id.or(file.node_id).unwrap_or(1)
        };
        if node_id == 0 {
            bail!("--node-id must be a positive integer");
        }
        let grpc = args.grpc_addr.or(file.grpc_addr).unwrap_or_else(|| "127.0.0.1:7001".into());
        let grpc_addr: SocketAddr = grpc.parse().with_context(|| format!("--grpc-addr {grpc:?} is not host:port"))?;
        // Listening on every interface says nothing about how others reach this node: its host
        // name does (a container's name, a pod's), where 0.0.0.0 would send them to themselves.
        let advertise_addr = match args.advertise_addr.or(file.advertise_addr) {
            Some(a) => a,
            None if grpc_addr.ip().is_unspecified() => {
                let host = hostname().context("reading this host's name to advertise (or give --advertise-addr)")?;
                format!("{host}:{}", grpc_addr.port())
            }
            None => grpc.clone(),
        };
        let peer = match args.peer_addr.or(file.peer_addr) {
            Some(p) => p,
            None => default_peer_addr(&grpc).map_err(anyhow::Error::msg)?,
        };
        let peer_addr: SocketAddr = peer.parse().with_context(|| format!("--peer-addr {peer:?} is not host:port"))?;
        let advertise_peer_addr = match args.advertise_peer_addr.or(file.advertise_peer_addr) {
            Some(a) => a,
            // A peer port on a host of its own (another interface) is advertised as it is.
            None if peer_addr.ip() != grpc_addr.ip() && !peer_addr.ip().is_unspecified() => peer.clone(),
            None => {
                let (host, _) = advertise_addr
                    .rsplit_once(':')
                    .with_context(|| format!("--advertise-addr {advertise_addr:?} is not host:port"))?;
                format!("{host}:{}", peer_addr.port())
            }
        };
        let http = args.http_addr.or(file.http_addr).unwrap_or_else(|| "127.0.0.1:7081".into());
        let http_addr: SocketAddr = http.parse().with_context(|| format!("--http-addr {http:?} is not host:port"))?;
        let join: Vec<String> = args
            .join
            .or(file.join)
            .map(|j| j.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        let node = NodeId(node_id);
        let (initial_members, join) = match args.peers.or(file.peers) {
            Some(p) => {
                let voters = parse_peers(&p)?;
                if voters.contains_key(&node) {
                    if !join.is_empty() {
                        bail!("node {node_id} is an initial voter (--peers): it initialises, it does not --join");
                    }
                    (voters, join)
                } else if join.is_empty() {
                    // Not an initial voter (a StatefulSet scaled past them): join through them.
                    (BTreeMap::new(), voters.values().map(|v| v.peer_addr.clone()).collect())
                } else {
                    (BTreeMap::new(), join)
                }
            }
            None if join.is_empty() => (
                BTreeMap::from([(
                    node,
                    VowNode { grpc_addr: advertise_addr.clone(), peer_addr: advertise_peer_addr.clone() },
                )]),
                join,
            ),
            None => (BTreeMap::new(), join),
        };
        let shards = args.shards.or(file.shards).unwrap_or(DEFAULT_SHARDS);
        if shards == 0 || shards > MAX_SHARDS {
            bail!("--shards must be between 1 and {MAX_SHARDS}");
        }
        let defaults = RaftOptions::default();
        let election_min =
            args.election_timeout_ms.or(file.election_timeout_ms).unwrap_or(defaults.election_timeout_min_ms);
        let raft = RaftOptions {
            heartbeat_ms: args.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(defaults.heartbeat_ms),
            election_timeout_min_ms: election_min,
            election_timeout_max_ms: election_min * 2,
            snapshot_logs: args.snapshot_logs.or(file.snapshot_logs).unwrap_or(defaults.snapshot_logs),
        };
        if raft.heartbeat_ms == 0 || raft.heartbeat_ms * 2 > raft.election_timeout_min_ms {
            bail!("the election timeout must be at least twice the heartbeat interval");
        }
        let l = file.limits;
        let d = Limits::default();
        let secs_ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        let limits = Limits {
            max_id_bytes: l.max_id_bytes.unwrap_or(d.max_id_bytes),
            max_data_bytes: args.max_data_bytes.or(l.max_data_bytes).unwrap_or(d.max_data_bytes),
            max_headers: l.max_headers.unwrap_or(d.max_headers),
            max_tags: l.max_tags.unwrap_or(d.max_tags),
            max_entry_bytes: l.max_entry_bytes.unwrap_or(d.max_entry_bytes),
            max_idempotency_key_bytes: l.max_idempotency_key_bytes.unwrap_or(d.max_idempotency_key_bytes),
            max_deadline_ahead_ms: l.max_deadline_ahead_secs.map_or(d.max_deadline_ahead_ms, secs_ms),
            default_deadline_ahead_ms: args
                .default_deadline_secs
                .or(l.default_deadline_secs)
                .map_or(d.default_deadline_ahead_ms, secs_ms),
        };
        limits.validate().map_err(|e| anyhow::anyhow!("invalid limits: {e}"))?;
        let retention = Duration::from_secs(args.retention_secs.or(file.retention_secs).unwrap_or(7 * 24 * 3600));
        if retention < MIN_RETENTION {
            bail!(
                "--retention-secs {} is below the minimum {}: a client retrying a write could find its \
                 record already collected and make it take effect twice",
                retention.as_secs(),
                MIN_RETENTION.as_secs()
            );
        }
        let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("vow-data"));
        let single_node = join.is_empty() && initial_members.len() == 1;
        let completion_keys = match (args.completion_keys_file.or(file.completion_keys_file), inline_keys) {
            (Some(path), _) => KeySource::File(path),
            (None, Some(list)) => KeySource::Inline(list),
            (None, None) if single_node => KeySource::Generated(data_dir.join("completion-keys")),
            (None, None) => KeySource::None,
        };
        let tls = match (
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
            args.tls_ca.or(file.tls_ca),
            args.tls_client_ca.or(file.tls_client_ca),
        ) {
            (Some(cert), Some(key), Some(ca), client_ca) => Some(TlsFiles { cert, key, ca, client_ca }),
            (None, None, None, None) => None,
            _ => bail!("TLS needs --tls-cert, --tls-key and --tls-ca together (--tls-client-ca is optional)"),
        };
        Ok(Config {
            node_id: node,
            data_dir,
            grpc_addr,
            advertise_addr,
            peer_addr,
            advertise_peer_addr,
            http_addr,
            initial_members,
            join,
            cluster_name: args.cluster_name.or(file.cluster_name).unwrap_or_else(|| "vow".into()),
            shards,
            balance_leaders: !(args.no_leader_balance || file.no_leader_balance.unwrap_or(false)),
            raft,
            retention,
            limits,
            completion_keys,
            tls,
            auth_file: args.auth_file.or(file.auth_file),
            // openraft logs every election step at INFO; its warnings are what operators need.
            log: args.log.or(file.log).unwrap_or_else(|| "info,openraft=warn".into()),
            test_clock_offset_ms: args.test_clock_offset_ms.unwrap_or(0),
        })
    }
}

/// This host's name (a container's or pod's): the kernel's, as `hostname` prints it.
fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let name = name.trim();
    anyhow::ensure!(!name.is_empty(), "the host name is empty");
    Ok(name.to_owned())
}

/// The node id in a StatefulSet pod's name: the number after the last `-` (`vow-2` → 2; a
/// fully qualified name counts by its first label).
pub fn node_id_from_hostname(host: &str) -> Result<u64, String> {
    let label = host.split('.').next().unwrap_or(host);
    let ordinal = label
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .ok_or_else(|| format!("host name {host:?} does not end in -<number> (as a StatefulSet's pods do)"))?;
    if ordinal == 0 {
        return Err(format!(
            "host name {host:?} gives node id 0, which is not a node id: start the StatefulSet's \
             ordinals at 1 (spec.ordinals.start: 1)"
        ));
    }
    Ok(ordinal)
}

/// How much a peer port is above its gRPC port when not given.
pub const PEER_PORT_OFFSET: u16 = 100;

/// The peer address of a node given only its gRPC address: the same host, port + 100.
pub fn default_peer_addr(grpc: &str) -> Result<String, String> {
    let (host, port) = grpc.rsplit_once(':').ok_or_else(|| format!("{grpc:?} is not host:port"))?;
    let port: u16 = port.parse().map_err(|_| format!("{grpc:?} is not host:port"))?;
    let peer = port
        .checked_add(PEER_PORT_OFFSET)
        .filter(|_| port != 0)
        .ok_or_else(|| format!("{grpc:?} has no default peer port (port + {PEER_PORT_OFFSET})"))?;
    Ok(format!("{host}:{peer}"))
}

/// Parses `1=host:port[@peer_host:port],2=...`.
pub fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<NodeId, VowNode>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addrs) = part.split_once('=').with_context(|| format!("peer {part:?} is not id=host:port"))?;
        let id: u64 = id.trim().parse().with_context(|| format!("peer id {id:?} is not a number"))?;
        if id == 0 {
            bail!("peer ids must be positive");
        }
        let node = match addrs.trim().split_once('@') {
            Some((grpc, peer)) => VowNode { grpc_addr: grpc.trim().to_owned(), peer_addr: peer.trim().to_owned() },
            None => VowNode {
                grpc_addr: addrs.trim().to_owned(),
                peer_addr: default_peer_addr(addrs.trim()).map_err(|e| anyhow::anyhow!("peer {id}: {e}"))?,
            },
        };
        if out.insert(NodeId(id), node).is_some() {
            bail!("peer {id} is listed twice");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_arguments_is_a_single_node_dev_cluster() -> anyhow::Result<()> {
        let c = Config::from_args(Args::default())?;
        assert_eq!(c.node_id, NodeId(1));
        let me = VowNode { grpc_addr: "127.0.0.1:7001".into(), peer_addr: "127.0.0.1:7101".into() };
        assert_eq!(c.initial_members, BTreeMap::from([(NodeId(1), me)]));
        assert_eq!(c.peer_addr.to_string(), "127.0.0.1:7101");
        assert!(c.tls.is_none() && c.auth_file.is_none());
        assert_eq!(c.data_dir, PathBuf::from("vow-data"));
        Ok(())
    }

    #[test]
    fn flags_win_over_the_file_and_bad_input_is_explained() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("vow.toml");
        std::fs::write(&path, "node_id = 2\nshards = 4\npeers = \"1=a:1,2=b:2\"\n[limits]\nmax_tags = 3\n")?;
        let c = Config::from_args(Args { config: Some(path.clone()), shards: Some(2), ..Args::default() })?;
        assert_eq!((c.node_id, c.shards, c.limits.max_tags), (NodeId(2), 2, 3));
        std::fs::write(&path, "nodeid = 2\n")?;
        let err = Config::from_args(Args { config: Some(path), ..Args::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("nodeid"), "{err:#}");
        let err = Config::from_args(Args { peers: Some("1=a:1,x=b".into()), ..Args::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("not a number"));
        let peers = parse_peers("1=a:7001,2=b:7002@b:9000")?;
        assert_eq!(peers[&NodeId(1)].peer_addr, "a:7101");
        assert_eq!(peers[&NodeId(2)], VowNode { grpc_addr: "b:7002".into(), peer_addr: "b:9000".into() });
        let err = parse_peers("1=a:65500").unwrap_err();
        assert!(format!("{err:#}").contains("no default peer port"), "{err:#}");
        let err = Config::from_args(Args { tls_cert: Some("c".into()), tls_key: Some("k".into()), ..Args::default() })
            .unwrap_err();
        assert!(format!("{err:#}").contains("--tls-ca"), "{err:#}");
        let err = Config::from_args(Args { max_data_bytes: Some(1 << 30), ..Args::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("max_data_bytes"));
        for secs in [0, 59] {
            let err = Config::from_args(Args { retention_secs: Some(secs), ..Args::default() }).unwrap_err();
            assert!(format!("{err:#}").contains("below the minimum 60"), "{err:#}");
        }
        assert!(Config::from_args(Args { retention_secs: Some(60), ..Args::default() }).is_ok());
        Ok(())
    }

    #[test]
    fn statefulset_pods_take_their_id_from_the_host_name_and_join_past_the_initial_voters() -> anyhow::Result<()> {
        assert_eq!(node_id_from_hostname("vow-2"), Ok(2));
        assert_eq!(node_id_from_hostname("vow-12.vow-peer.default.svc.cluster.local"), Ok(12));
        assert!(node_id_from_hostname("vow-0").unwrap_err().contains("ordinals"));
        assert!(node_id_from_hostname("vow").is_err());
        assert!(node_id_from_hostname("vow-x").is_err());
        // Every pod gets the same arguments.
        let peers = "1=vow-1.vow-peer:7001,2=vow-2.vow-peer:7001,3=vow-3.vow-peer:7001";
        let pod = |id: u64, join: Option<&str>| {
            Config::from_args(Args {
                node_id: Some(id),
                peers: Some(peers.into()),
                join: join.map(String::from),
                ..Args::default()
            })
        };
        // An initial voter initialises with all of them...
        let c = pod(2, None)?;
        assert_eq!(c.initial_members.keys().copied().collect::<Vec<_>>(), [NodeId(1), NodeId(2), NodeId(3)]);
        assert!(c.join.is_empty());
        // ...a fourth pod joins through their peer ports, or through --join when given...
        let c = pod(4, None)?;
        assert!(c.initial_members.is_empty());
        assert_eq!(c.join, ["vow-1.vow-peer:7101", "vow-2.vow-peer:7101", "vow-3.vow-peer:7101"]);
        assert_eq!(pod(4, Some("seed:7101"))?.join, ["seed:7101"]);
        // ...and an initial voter told to join is a mistake.
        let err = pod(1, Some("seed:7101")).unwrap_err();
        assert!(format!("{err:#}").contains("initial voter"), "{err:#}");
        Ok(())
    }

    #[test]
    fn a_node_listening_on_every_interface_advertises_its_host_name() -> anyhow::Result<()> {
        let host = hostname()?;
        let c = Config::from_args(Args { grpc_addr: Some("0.0.0.0:7001".into()), ..Args::default() })?;
        assert_eq!(
            (c.advertise_addr.as_str(), c.peer_addr.to_string()),
            (format!("{host}:7001").as_str(), "0.0.0.0:7101".into())
        );
        assert_eq!(c.advertise_peer_addr, format!("{host}:7101"));
        // The advertised peer address is the advertised host with the peer port...
        let c = Config::from_args(Args {
            grpc_addr: Some("0.0.0.0:7001".into()),
            advertise_addr: Some("vow-1.vow-peer:7001".into()),
            peer_addr: Some("0.0.0.0:9000".into()),
            ..Args::default()
        })?;
        assert_eq!(c.advertise_peer_addr, "vow-1.vow-peer:9000");
        // ...unless the peer port listens on an address of its own.
        let c = Config::from_args(Args {
            grpc_addr: Some("127.0.0.1:7001".into()),
            peer_addr: Some("127.0.0.2:7101".into()),
            ..Args::default()
        })?;
        assert_eq!(c.advertise_peer_addr, "127.0.0.2:7101");
        Ok(())
    }
}
