//! `vow-lazyfs MOUNTPOINT --backing DIR --control SOCKET`: serves DIR at MOUNTPOINT, losing
//! what was not fsynced on the control socket's `crash`, until SIGTERM or SIGINT unmounts it.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

/// How often to check whether something else unmounted the filesystem.
const SERVING_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// A FUSE filesystem that forgets unsynced writes on command (a power cut) and injects disk
/// faults. Commands, one a line on the control socket: crash, fail-fsync on|off,
/// fail-write on|off, quota BYTES|off, heal, status.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to mount.
    mountpoint: PathBuf,
    /// The directory to serve.
    #[arg(long)]
    backing: PathBuf,
    /// The unix socket to take commands on.
    #[arg(long)]
    control: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    // Block the signals before any thread starts, so that every thread inherits the mask and
    // they arrive at the sigwait below instead of killing the process mid-request with the
    // mount left behind.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking SIGTERM and SIGINT")?;

    let mount = vow_lazyfs::mount(&vow_lazyfs::Options {
        mountpoint: args.mountpoint,
        backing: args.backing,
        control: args.control,
    })?;

    let (signal_tx, signal_rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                signal_tx.send(signal).ok();
            }
        })
        .context("spawning the signal thread")?;

    loop {
        match signal_rx.recv_timeout(SERVING_CHECK_INTERVAL) {
            Ok(signal) => {
                tracing::info!(%signal, "unmounting");
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if mount.is_serving() => {}
            Err(_) => {
                tracing::warn!("unmounted from outside; exiting");
                break;
            }
        }
    }
    mount.unmount()?;
    Ok(())
}
