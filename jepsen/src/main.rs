//! `vow-jepsen test ...` runs one fault-injection test; `vow-jepsen check DIR` re-checks the
//! history a run stored in DIR; `vow-jepsen cleanup` removes leftovers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vow_jepsen::{net, report, run};

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
        /// Faults to inject: kill, pause, partition, netem, membership, transfer, clock, overlap, power, disk (comma-separated), or "all" / "none".
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
        /// Run the cluster secured: TLS on every port, mutual TLS between nodes, API tokens
        /// (certificates made with the `vow` binary beside vowd).
        #[arg(long)]
        tls: bool,
    },
    /// Re-check the history a run stored in DIR (also of a run that was aborted): print the
    /// summary, say whether it agrees with DIR/results.json when there is one, and exit as
    /// `test` does (0 valid, 1 invalid, 2 error or disagreement).
    Check { dir: PathBuf },
    /// Remove namespaces, links and processes left by an interrupted run.
    Cleanup,
}

/// `vow-jepsen check DIR`.
fn check(dir: &Path) -> ExitCode {
    let (results, stored) = match run::recheck(dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if stored.torn_tail {
        println!("note: the history's last line was cut short (the run was killed while writing it); left out");
    }
    println!("{}", results.summary());
    for a in &results.anomalies {
        println!("  {} {}: {}", a.kind, a.key, a.detail);
    }
    let path = dir.join(report::RESULTS);
    match std::fs::read_to_string(&path) {
        Err(_) => println!("no {} (the run did not finish): nothing to compare with", path.display()),
        Ok(text) => match agreement(&text, &results) {
            Ok(()) => println!("agrees with {}", path.display()),
            Err(why) => {
                eprintln!("DISAGREES with {}: {why}", path.display());
                return ExitCode::from(2);
            }
        },
    }
    if results.valid { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Whether the stored `results.json` (its text) reached the verdict and anomalies of `results`.
fn agreement(stored: &str, results: &report::Results) -> Result<(), String> {
    let stored: serde_json::Value = serde_json::from_str(stored).map_err(|e| format!("unreadable: {e}"))?;
    let now = serde_json::to_value(results).map_err(|e| e.to_string())?;
    for field in ["valid", "ops", "anomalies"] {
        if stored[field] != now[field] {
            return Err(format!("{field}: the run had {}, the re-check finds {}", stored[field], now[field]));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { dir } => check(&dir),
        Command::Cleanup => {
            let _lock = match net::exclusive() {
                Ok(lock) => lock,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            net::cleanup();
            let left = net::leftovers();
            if left.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("could not remove: {}", left.join(", "));
                ExitCode::FAILURE
            }
        }
        Command::Test { nodes, shards, time_limit, nemesis, seed, out, vowd, clients, vowd_env, tls } => {
            // Held to the end, the cleanup below included.
            let _lock = match net::exclusive() {
                Ok(lock) => lock,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
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
                tls,
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
