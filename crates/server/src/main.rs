//! `vowd`: one vow node. See `vowd --help` and the README's configuration reference.

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use vow_server::config::{Args, Config};
use vow_server::server::{self, Listeners};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            match e.downcast_ref::<server::StorageFailed>() {
                Some(_) => std::process::ExitCode::from(server::StorageFailed::EXIT_CODE),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

/// Turns transparent huge pages off for this process. mimalloc asks for them on the memory it
/// maps, and a node's allocations move through fresh memory all the time (log entries, batches,
/// the records of a write-behind generation): each first touch of a huge page cleared 2 MiB.
/// Under 64-client create-settle load on 8 shards that page clearing was ~3.5% of the cluster's
/// CPU samples (docs/performance.md, "Huge pages, and letting appends meet"). The setting is the
/// process's, so it covers every thread however early it started. If the kernel refuses,
/// nothing else changes.
#[allow(unsafe_code)] // prctl(2) with PR_SET_THP_DISABLE takes plain integers and touches no memory of ours
fn no_transparent_huge_pages() {
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        tracing::debug!("transparent huge pages stay on: {}", std::io::Error::last_os_error());
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    // As everywhere else, the flag (or VOW_LOG) wins; then RUST_LOG; then the file or default.
    let explicit_log = args.log.clone();
    let config = Config::from_args(args)?;
    let filter = match explicit_log {
        Some(log) => EnvFilter::new(log),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    no_transparent_huge_pages();
    let grpc =
        TcpListener::bind(config.grpc_addr).await.with_context(|| format!("binding gRPC on {}", config.grpc_addr))?;
    let http =
        TcpListener::bind(config.http_addr).await.with_context(|| format!("binding HTTP on {}", config.http_addr))?;
    let peer = TcpListener::bind(config.peer_addr)
        .await
        .with_context(|| format!("binding the peer port on {}", config.peer_addr))?;
    server::run(config, Listeners { grpc, http, peer }, shutdown_signal()).await
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops vowd");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
