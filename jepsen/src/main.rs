//! `vow-jepsen test ...` runs one fault-injection test; `vow-jepsen cleanup` removes leftovers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vow_jepsen::{net, run};

#[derive(Debug, Parser)]
#[command(name = "vow-jepsen", about = "Fault-injection consistency testing of a real vow cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one test and check its history.
    Test {
        #[arg(long, default_value_t = 5)]
        nodes: u64,
        /// Shards (Raft groups) of the cluster: every vowd is started with `--shards N`.
        #[arg(long, default_value_t = 8)]
        shards: u32,
        /// Seconds of load and faults.
        #[arg(long, default_value_t = 60)]
        time_limit: u64,
        /// Faults to inject: kill, pause, partition, netem, membership, transfer (comma-separated), or "all" / "none".
        #[arg(long, default_value = "all")]
        nemesis: String,
        /// Seeds the operation and fault schedule (default: from the clock; printed either way).
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        out: PathBuf,
        /// The vowd binary (default: beside this executable).
        #[arg(long)]
        vowd: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        clients: u64,
        /// Extra environment for every vowd as KEY=VALUE (repeatable).
        #[arg(long = "vowd-env")]
        vowd_env: Vec<String>,
    },
    /// Remove namespaces, links and processes left by an interrupted run.
    Cleanup,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Cleanup => {
            net::cleanup();
            let left = net::leftovers();
            if left.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("could not remove: {}", left.join(", "));
                ExitCode::FAILURE
            }
        }
        Command::Test { nodes, shards, time_limit, nemesis, seed, out, vowd, clients, vowd_env } => {
            let seed = seed.unwrap_or_else(|| rand::random::<u32>().into());
            let nemeses: Vec<String> = match nemesis.as_str() {
                "all" => vow_jepsen::nemesis::ALL.iter().map(|s| s.to_string()).collect(),
                "none" | "" => vec![],
                list => list.split(',').map(|s| s.trim().to_owned()).collect(),
            };
            let vowd = vowd.unwrap_or_else(|| {
                std::env::current_exe().map(|e| e.with_file_name("vowd")).unwrap_or_else(|_| PathBuf::from("vowd"))
            });
            let vowd_env = vowd_env
                .iter()
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect();
            let opts = run::Opts {
                nodes,
                shards,
                time_limit: Duration::from_secs(time_limit),
                nemeses,
                seed,
                out,
                vowd,
                clients,
                vowd_env,
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(async {
                tokio::select! {
                    r = run::test(&opts) => r,
                    _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
                }
            });
            // The run's guard cleans up on every path; this covers an interrupt mid-setup too.
            net::cleanup();
            match result {
                Ok(results) => {
                    println!("{}", results.summary());
                    if results.valid { ExitCode::SUCCESS } else { ExitCode::from(1) }
                }
                Err(e) => {
                    eprintln!("error (seed {seed}): {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
