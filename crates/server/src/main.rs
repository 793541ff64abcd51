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
