//! `vow`: the command line for vow. Promise operations and cluster membership go through the
//! Rust client; `vow dev` runs a local multi-node cluster of real `vowd` processes.
//!
//! Records print as tables (for a person) or, with `-o json` / `VOW_OUTPUT=json`, as the JSON
//! documents below, whose keys scripts and tests rely on: keys may be added, never renamed or
//! removed.
//!
//! Exit codes: 0 success, 1 other errors, 2 bad usage or input, 3 not found, 4 already
//! exists / already settled, 5 cluster unavailable, 6 permission denied.

mod bench;
mod certs;
mod chain;
mod dev;
mod etcd;
mod output;
mod pipeline;
mod plot;
mod ports;
mod results;

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use output::{Output, state_name};
use serde_json::json;
use vow_client::{Client, Error, Options, Settle, pb};

/// The bench spends much of its time allocating (request and response messages, HTTP/2 frames);
/// glibc's malloc and free were ~9% of its CPU profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "vow", version, about = "Command line for vow, the distributed promise store")]
struct Cli {
    /// Cluster endpoints, `host:port,...` (any node will do).
    #[arg(long, env = "VOW_ENDPOINTS", default_value = "127.0.0.1:7001", global = true)]
    endpoints: String,
    /// Give up after this long, retries included (e.g. 500ms, 15s, 2m).
    #[arg(long, default_value = "15s", global = true, value_parser = parse_duration)]
    timeout: Duration,
    /// CA certificate (PEM) the nodes' certificates chain to: connect over TLS.
    #[arg(long, env = "VOW_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --tls-key.
    #[arg(long, env = "VOW_TLS_CERT", global = true, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "VOW_TLS_KEY", global = true, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// API token sent with every call (prefer the environment variable: a command line is
    /// visible to every user of the machine).
    #[arg(long, env = "VOW_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// How records are printed: `table` for reading, `json` for scripts (stable keys).
    #[arg(short = 'o', long, env = "VOW_OUTPUT", value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a pending promise.
    Create {
        id: String,
        #[command(flatten)]
        value: ValueArgs,
        /// Tag as key=value (repeatable).
        #[arg(long = "tag", value_parser = parse_kv)]
        tags: Vec<(String, String)>,
        /// Absolute deadline in milliseconds since the epoch.
        #[arg(long, conflicts_with = "deadline_in")]
        deadline_ms: Option<i64>,
        /// Deadline relative to now (e.g. 30s, 10m, 2h); default: the cluster's.
        #[arg(long, value_parser = parse_duration)]
        deadline_in: Option<Duration>,
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Also issue a completion token valid this long (e.g. 1h): whoever holds it may settle
        /// this promise, and nothing else (printed as `completion_token`).
        #[arg(long, value_parser = parse_duration)]
        token_ttl: Option<Duration>,
        /// What the token allows (repeatable): resolve, reject, cancel. Default: resolve, reject.
        #[arg(long = "token-allows", requires = "token_ttl", value_parser = ["resolve", "reject", "cancel"])]
        token_allows: Vec<String>,
        /// POST the record to this URL once the promise settles (repeatable; see `vow subscribe`).
        #[arg(long = "webhook")]
        webhooks: Vec<String>,
    },
    /// Register a webhook: once the promise settles, its record is POSTed to URL, signed with
    /// the cluster's webhook secret (`vow webhook-secret`). Prints the subscription id.
    Subscribe {
        id: String,
        url: String,
        /// Header sent with every delivery, key=value (repeatable).
        #[arg(long = "header", value_parser = parse_kv)]
        headers: Vec<(String, String)>,
    },
    /// Print settlements as they happen, one per line (JSON lines with -o json, each with the
    /// `resume_token` to pass to --from after a restart). Runs until interrupted or --count.
    Watch {
        /// Only promises with this id prefix.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Only these promises (repeatable); those already settled come first.
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Resume after this token (from an earlier line) instead of starting now.
        #[arg(long)]
        from: Option<String>,
        /// Stop after this many settlements.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print the secret webhook receivers check `Vow-Signature` with, derived from the
    /// cluster's signing key (the first key of the file every node is started with).
    WebhookSecret {
        /// The cluster's completion-keys file (`vowd --completion-keys-file`).
        #[arg(long, env = "VOW_COMPLETION_KEYS_FILE")]
        keys_file: std::path::PathBuf,
    },
    /// Read a promise (linearizable unless --stale).
    Get {
        id: String,
        /// Read the answering node's replica, which may lag.
        #[arg(long)]
        stale: bool,
    },
    /// Resolve a pending promise with a value.
    Resolve(SettleArgs),
    /// Reject a pending promise with a value.
    Reject(SettleArgs),
    /// Cancel a pending promise.
    Cancel(SettleArgs),
    /// Wait for a promise to settle; prints it (still pending if the wait runs out).
    Await {
        id: String,
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Find promises by id prefix, state and tags.
    Search {
        #[arg(long, default_value = "")]
        prefix: String,
        /// pending, resolved, rejected, canceled or timedout.
        #[arg(long, value_parser = parse_state)]
        state: Option<pb::State>,
        #[arg(long = "tag", value_parser = parse_kv)]
        tags: Vec<(String, String)>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Pipelines: graphs of continuations run by the cluster (YAML or JSON files).
    #[command(subcommand)]
    Pipeline(PipelineCommand),
    /// Cluster status and membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// A local development cluster of vowd processes.
    #[command(subcommand)]
    Dev(dev::DevCommand),
    /// Certificates: a cluster CA and the node and client certificates it signs.
    #[command(subcommand)]
    Tls(certs::TlsCommand),
    /// Measure throughput and latency against a cluster.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum PipelineCommand {
    /// Create a pipeline's promises and register its continuations (file format: see
    /// `crates/cli/src/pipeline.rs` or the README); `-` reads stdin.
    Submit {
        file: String,
        /// Wait until the pipeline's `wait_for` (or its last target) settles and print it.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
    /// Where continuations stand: by id, or every continuation of a pipeline file.
    Show {
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        file: Option<String>,
    },
}

fn read_file_or_stdin(path: &str) -> anyhow::Result<String> {
    if path == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Nodes, shards, leaders, terms and indexes (in a table, `*` marks the node that answered).
    Status,
    /// Add a running node (started with --join or with no --peers) to every shard.
    AddNode {
        #[arg(long)]
        node_id: u64,
        /// The node's gRPC address as clients reach it.
        #[arg(long)]
        addr: String,
        /// The node's peer address as other nodes reach it (default: --addr's port + 100).
        #[arg(long, default_value = "")]
        peer_addr: String,
    },
    /// Remove a node from every shard.
    RemoveNode {
        #[arg(long)]
        node_id: u64,
    },
    /// Move every shard's leadership to a node.
    TransferLeader {
        #[arg(long)]
        to: u64,
    },
}

#[derive(Debug, clap::Args)]
struct ValueArgs {
    /// Data as a UTF-8 string.
    #[arg(long, conflicts_with = "data_file")]
    data: Option<String>,
    /// Data from a file ("-" for stdin).
    #[arg(long)]
    data_file: Option<String>,
    /// Header as key=value (repeatable).
    #[arg(long = "header", value_parser = parse_kv)]
    headers: Vec<(String, String)>,
}

#[derive(Debug, clap::Args)]
struct SettleArgs {
    id: String,
    #[command(flatten)]
    value: ValueArgs,
    #[arg(long)]
    idempotency_key: Option<String>,
    /// A completion token for this promise (from `vow create --token-ttl`); also read from
    /// `VOW_COMPLETION_TOKEN`.
    #[arg(long, env = "VOW_COMPLETION_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not key=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 250ms, 30s, 5m or 2h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("{s:?} has an unknown unit {unit:?} (use ms, s, m, h or d)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_state(s: &str) -> Result<pb::State, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "pending" => pb::State::Pending,
        "resolved" => pb::State::Resolved,
        "rejected" => pb::State::Rejected,
        "canceled" | "cancelled" | "rejected_canceled" => pb::State::RejectedCanceled,
        "timedout" | "timed_out" | "rejected_timedout" => pb::State::RejectedTimedout,
        _ => return Err(format!("unknown state {s:?} (pending, resolved, rejected, canceled, timedout)")),
    })
}

impl ValueArgs {
    fn into_value(self) -> anyhow::Result<pb::Value> {
        let data = match (self.data, self.data_file) {
            (Some(d), _) => d.into_bytes(),
            (None, Some(f)) if f == "-" => {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
                buf
            }
            (None, Some(f)) => std::fs::read(&f).with_context(|| format!("reading --data-file {f}"))?,
            (None, None) => Vec::new(),
        };
        Ok(pb::Value { headers: self.headers.into_iter().collect(), data })
    }
}

fn value_json(v: &Option<pb::Value>) -> serde_json::Value {
    let v = v.clone().unwrap_or_default();
    let headers: std::collections::BTreeMap<_, _> = v.headers.into_iter().collect();
    match String::from_utf8(v.data) {
        Ok(s) => json!({ "headers": headers, "data": s }),
        Err(e) => {
            json!({ "headers": headers, "data_hex": e.as_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>() })
        }
    }
}

fn promise_json(p: &pb::Promise) -> serde_json::Value {
    let tags: std::collections::BTreeMap<_, _> = p.tags.clone().into_iter().collect();
    json!({
        "id": p.id,
        "state": state_name(p.state),
        "param": value_json(&p.param),
        "value": value_json(&p.value),
        "deadline_ms": p.deadline_ms,
        "tags": tags,
        "created_at_ms": p.created_at_ms,
        "settled_at_ms": p.settled_at_ms,
        "revision": p.revision,
    })
}

fn response_json(r: &pb::PromiseResponse) -> serde_json::Value {
    let mut v = r.promise.as_ref().map(promise_json).unwrap_or(serde_json::Value::Null);
    if r.deduplicated {
        v["deduplicated"] = json!(true);
    }
    if !r.completion_token.is_empty() {
        v["completion_token"] = json!(r.completion_token);
    }
    v
}

fn search_json(r: &pb::SearchResponse) -> serde_json::Value {
    json!({
        "promises": r.promises.iter().map(promise_json).collect::<Vec<_>>(),
        "next_page_token": r.next_page_token,
    })
}

fn print_promise(output: Output, p: &pb::Promise) {
    print!("{}", output.render(|| promise_json(p), || output::promise_table(p, false)));
}

fn print_response(output: Output, r: &pb::PromiseResponse) {
    print!("{}", output.render(|| response_json(r), || output::response_table(r)));
}

pub fn print_status(output: Output, s: &pb::StatusResponse) {
    print!("{}", output.render(|| status_json(s), || output::status_table(s)));
}

/// TLS and the API token from the global flags.
fn security(cli: &Cli) -> anyhow::Result<(Option<vow_client::tls::ClientTls>, Option<vow_client::tls::Token>)> {
    let tls = match &cli.tls_ca {
        Some(ca) => {
            let files = vow_client::tls::ClientTlsFiles {
                ca: ca.clone(),
                cert_and_key: cli.tls_cert.clone().zip(cli.tls_key.clone()),
            };
            Some(vow_client::tls::ClientTls::from_files(&files, &[b"h2"]).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let token = cli.token.as_deref().filter(|t| !t.trim().is_empty()).map(vow_client::tls::Token::new);
    Ok((tls, token))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let output = cli.output;
    let endpoints: Vec<&str> = cli.endpoints.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let security = security(&cli)?;
    let client = || -> anyhow::Result<Client> {
        let options = Options {
            call_timeout: cli.timeout,
            attempt_timeout: cli.timeout.min(Duration::from_secs(5)),
            tls: security.0.clone(),
            token: security.1.clone(),
            ..Default::default()
        };
        Ok(Client::with_options(&endpoints, options)?)
    };
    match cli.command {
        Command::Create {
            id,
            value,
            tags,
            deadline_ms,
            deadline_in,
            idempotency_key,
            token_ttl,
            token_allows,
            webhooks,
        } => {
            let deadline_ms = match (deadline_ms, deadline_in) {
                (Some(ms), _) => ms,
                (None, Some(d)) => now_ms().saturating_add(d.as_millis() as i64),
                (None, None) => 0,
            };
            let req = pb::CreateRequest {
                id,
                param: Some(value.into_value()?),
                deadline_ms,
                tags: tags.into_iter().collect::<HashMap<_, _>>(),
                idempotency_key: idempotency_key.unwrap_or_default(),
                completion_token_ttl_ms: match token_ttl {
                    None => 0,
                    Some(d) => u32::try_from(d.as_millis()).map_err(|_| {
                        anyhow::Error::new(Error::InvalidArgument("--token-ttl is over 49 days".into()))
                    })?,
                },
                completion_token_operations: token_allows
                    .iter()
                    .map(|op| match op.as_str() {
                        "resolve" => pb::Operation::Resolve as i32,
                        "reject" => pb::Operation::Reject as i32,
                        _ => pb::Operation::Cancel as i32,
                    })
                    .collect(),
                webhooks: webhooks.into_iter().map(|url| pb::Webhook { url, headers: HashMap::new() }).collect(),
            };
            print_response(output, &client()?.create(req).await?);
        }
        Command::Get { id, stale } => {
            let consistency = if stale { pb::Consistency::Stale } else { pb::Consistency::Linearizable };
            print_promise(output, &client()?.get_with(&id, consistency).await?);
        }
        Command::Resolve(a) => {
            let v = a.value.into_value()?;
            let r =
                client()?.settle_with_token(Settle::Resolve, &a.id, v, a.idempotency_key, a.token.as_deref()).await?;
            print_response(output, &r);
        }
        Command::Reject(a) => {
            let v = a.value.into_value()?;
            let r =
                client()?.settle_with_token(Settle::Reject, &a.id, v, a.idempotency_key, a.token.as_deref()).await?;
            print_response(output, &r);
        }
        Command::Cancel(a) => {
            let v = a.value.into_value()?;
            let r =
                client()?.settle_with_token(Settle::Cancel, &a.id, v, a.idempotency_key, a.token.as_deref()).await?;
            print_response(output, &r);
        }
        Command::Subscribe { id, url, headers } => {
            let sub = client()?.subscribe(&id, &url, headers.into_iter().collect()).await?;
            print!("{}", output.render(|| json!({ "subscription_id": sub }), || format!("{sub}\n")));
        }
        Command::Watch { prefix, ids, from, count } => {
            let client = client()?;
            let mut watch = client.watch(ids, &prefix, from);
            let mut seen = 0u64;
            while count.is_none_or(|c| seen < c) {
                let event = watch.next().await?;
                let Some(p) = event.promise else { continue };
                seen += 1;
                let line = output.render(
                    || {
                        let mut v = promise_json(&p);
                        v["resume_token"] = json!(event.resume_token);
                        v
                    },
                    || {
                        format!(
                            "{}\t{}\t{}\n",
                            p.id,
                            state_name(p.state),
                            String::from_utf8_lossy(&p.value.clone().unwrap_or_default().data)
                        )
                    },
                );
                // One line per settlement, whatever the renderer does with whitespace.
                println!("{}", line.trim_end().replace('\n', " "));
            }
        }
        Command::WebhookSecret { keys_file } => {
            let text =
                std::fs::read_to_string(&keys_file).with_context(|| format!("reading {}", keys_file.display()))?;
            let key = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .ok_or_else(|| anyhow::anyhow!("{} holds no key", keys_file.display()))?;
            println!("{}", vow_client::webhook::secret_of(key.as_bytes()));
        }
        Command::Await { id, wait } => print_promise(output, &client()?.await_settled(&id, wait).await?),
        Command::Search { prefix, state, tags, limit, page_token } => {
            let req = pb::SearchRequest {
                id_prefix: prefix,
                state: state.map_or(0, |s| s as i32),
                tags: tags.into_iter().collect(),
                limit,
                page_token,
            };
            let resp = client()?.search(req).await?;
            print!("{}", output.render(|| search_json(&resp), || output::search_table(&resp)));
        }
        Command::Pipeline(PipelineCommand::Submit { file, wait, wait_timeout }) => {
            let spec = pipeline::parse(&read_file_or_stdin(&file)?)?;
            let mut req = spec.to_request(now_ms())?;
            if wait {
                req.wait_for = spec.default_wait().context("--wait: the pipeline has no continuation to wait for")?;
                req.wait_timeout_ms = wait_timeout.as_millis().min(u128::from(u32::MAX)) as u32;
            }
            let resp = client()?.submit(req).await?;
            let as_json = || {
                let promises: Vec<_> = resp.promises.iter().map(promise_json).collect();
                match &resp.waited {
                    Some(w) => json!({ "promises": promises, "waited": promise_json(w) }),
                    None => json!({ "promises": promises }),
                }
            };
            let as_table = || match &resp.waited {
                Some(w) => output::promise_table(w, false),
                None => {
                    format!("submitted: {} promises, {} continuations\n", resp.promises.len(), spec.continuations.len())
                }
            };
            print!("{}", output.render(as_json, as_table));
        }
        Command::Pipeline(PipelineCommand::Show { ids, file }) => {
            let ids = match file {
                Some(f) => pipeline::parse(&read_file_or_stdin(&f)?)?.continuation_ids(),
                None if ids.is_empty() => anyhow::bail!("name continuation ids, or a pipeline --file"),
                None => ids,
            };
            pipeline::show(&client()?, output, &ids).await?;
        }
        Command::Cluster(c) => {
            let client = client()?;
            let status = match c {
                ClusterCommand::Status => client.status().await?,
                ClusterCommand::AddNode { node_id, addr, peer_addr } => {
                    client.add_node(node_id, &addr, &peer_addr).await?
                }
                ClusterCommand::RemoveNode { node_id } => client.remove_node(node_id).await?,
                ClusterCommand::TransferLeader { to } => client.transfer_leader(to).await?,
            };
            print_status(output, &status);
        }
        Command::Dev(d) => dev::run(d, output).await?,
        Command::Tls(t) => certs::run(t)?,
        Command::Bench(b) => {
            let target = bench::VowTarget {
                endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
                tls: security.0.clone(),
                token: security.1.clone(),
            };
            bench::run(b, target).await?
        }
    }
    Ok(())
}

fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    json!({
        "answered_by": s.node_id,
        "nodes": s.nodes.iter().map(|n| json!({
            "node_id": n.node_id, "grpc_addr": n.grpc_addr, "peer_addr": n.peer_addr,
            "reachable": n.reachable, "leads": output::leads(s, n.node_id),
        })).collect::<Vec<_>>(),
        "shards": s.shards.iter().map(|sh| json!({
            "shard_id": sh.shard_id, "leader_id": sh.leader_id, "term": sh.term,
            "commit_index": sh.commit_index, "applied_index": sh.applied_index,
            "voters": sh.voters, "learners": sh.learners,
        })).collect::<Vec<_>>(),
    })
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Error>() {
        Some(Error::NotFound(_)) => 3,
        Some(Error::AlreadyExists { .. } | Error::AlreadySettled { .. }) => 4,
        Some(Error::Unavailable { .. }) => 5,
        Some(Error::PermissionDenied(_) | Error::Unauthenticated(_)) => 6,
        Some(Error::InvalidArgument(_) | Error::Client(_)) => 2,
        _ => 1,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = cli.output;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("VOW_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(
                Error::AlreadyExists { current: Some(p), .. } | Error::AlreadySettled { current: Some(p), .. },
            ) = e.downcast_ref::<Error>()
            {
                match output {
                    Output::Json => eprintln!("current: {}", promise_json(p)),
                    Output::Table => eprint!("current:\n{}", output::promise_table(p, false)),
                }
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_kv("novalue").is_err());
        assert_eq!(parse_kv("a=b=c"), Ok(("a".into(), "b=c".into())));
    }

    #[test]
    fn status_json_keeps_its_keys_and_counts_what_each_node_leads() {
        let shard =
            |shard_id, leader_id| pb::ShardStatus { shard_id, leader_id, voters: vec![1, 2], ..Default::default() };
        let node = |node_id| pb::NodeStatus {
            node_id,
            grpc_addr: format!("h:{node_id}"),
            reachable: true,
            peer_addr: format!("h:1{node_id}"),
        };
        let s =
            pb::StatusResponse { nodes: vec![node(1), node(2)], shards: vec![shard(0, 2), shard(1, 2)], node_id: 1 };
        let v = status_json(&s);
        assert_eq!(v["answered_by"], 1);
        assert_eq!(
            v["nodes"][0],
            json!({"node_id": 1, "grpc_addr": "h:1", "peer_addr": "h:11", "reachable": true, "leads": 0})
        );
        assert_eq!(v["nodes"][1]["leads"], 2);
        assert_eq!(
            v["shards"][0],
            json!({"shard_id": 0, "leader_id": 2, "term": 0, "commit_index": 0, "applied_index": 0,
                   "voters": [1, 2], "learners": []})
        );
    }

    #[test]
    fn output_is_a_global_option_defaulting_to_table() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.output);
        // Scripts set VOW_OUTPUT, which this test process must not inherit.
        if std::env::var_os("VOW_OUTPUT").is_none() {
            assert_eq!(parse(&["vow", "get", "x"]).ok(), Some(Output::Table));
        }
        assert_eq!(parse(&["vow", "-o", "json", "get", "x"]).ok(), Some(Output::Json));
        assert_eq!(parse(&["vow", "cluster", "status", "--output", "table"]).ok(), Some(Output::Table));
        assert!(parse(&["vow", "-o", "yaml", "get", "x"]).is_err());
    }

    #[test]
    fn binary_data_is_shown_as_hex() {
        let v = value_json(&Some(pb::Value { headers: HashMap::new(), data: vec![0xff, 0x00] }));
        assert_eq!(v["data_hex"], "ff00");
    }
}
