//! The control socket: one command a line in, one reply a line out.
//!
//! ```text
//! crash                  -> ok crash files=2 bytes=8192 failed=0
//! fail-fsync on|off      -> ok fail-fsync on
//! fail-write on|off      -> ok fail-write off
//! quota BYTES|off        -> ok quota 1048576 used_bytes=4096
//! heal                   -> ok heal
//! status                 -> ok dirty_files=1 dirty_bytes=10 used_bytes=4096 quota=off ...
//! anything else          -> error unknown command "..."
//! ```
//!
//! `crash` is meant for a moment when no process has the mount open for writing (the node it
//! stands for is dead): it rewrites files under whoever still has them open.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::disk::Faults;
use crate::fs::{Tree, lock};

/// Longest command line accepted; the longest real one is `quota` with 20 digits.
const LINE_BYTES_MAX: u64 = 256;

/// How long a client may take to send its next line (or read its reply) before the server
/// drops it, so one stuck client cannot keep the others out.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// One command on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The power went out: every file loses what was not fsynced.
    Crash,
    /// fsync and fdatasync fail with EIO while on.
    FailFsync(bool),
    /// write fails with EIO while on.
    FailWrite(bool),
    /// Growing files past this many bytes in total gives ENOSPC; `None` lifts the quota.
    Quota(Option<u64>),
    /// Every fault off.
    Heal,
    /// One line: unsynced files and bytes, faults, counters.
    Status,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on_off = |on: bool| if on { "on" } else { "off" };
        match self {
            Command::Crash => f.write_str("crash"),
            Command::FailFsync(on) => write!(f, "fail-fsync {}", on_off(*on)),
            Command::FailWrite(on) => write!(f, "fail-write {}", on_off(*on)),
            Command::Quota(Some(bytes)) => write!(f, "quota {bytes}"),
            Command::Quota(None) => f.write_str("quota off"),
            Command::Heal => f.write_str("heal"),
            Command::Status => f.write_str("status"),
        }
    }
}

impl FromStr for Command {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let on_off = |word: &str| match word {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(format!("expected on or off, got {word:?}")),
        };
        match words.as_slice() {
            ["crash"] => Ok(Command::Crash),
            ["fail-fsync", on] => on_off(on).map(Command::FailFsync),
            ["fail-write", on] => on_off(on).map(Command::FailWrite),
            ["quota", "off"] => Ok(Command::Quota(None)),
            ["quota", bytes] => bytes
                .parse()
                .map(|bytes| Command::Quota(Some(bytes)))
                .map_err(|_| format!("expected a byte count or off, got {bytes:?}")),
            ["heal"] => Ok(Command::Heal),
            ["status"] => Ok(Command::Status),
            _ => Err(format!("unknown command {line:?}")),
        }
    }
}

/// Carries out `command` on the mount's state; the text is the reply after `ok ` or `error `.
pub(crate) fn execute(tree: &mut Tree, command: Command) -> Result<String, String> {
    let faults = tree.disk.faults();
    match command {
        Command::Crash => {
            let report = tree.crash().map_err(|error| format!("crash: {error}"))?;
            tracing::info!(files = report.files, bytes = report.bytes, failed = report.failed, "crash");
            let summary = format!("crash files={} bytes={} failed={}", report.files, report.bytes, report.failed);
            if report.failures.is_empty() {
                Ok(summary)
            } else {
                Err(format!("{summary}: {}", report.failures.join("; ")))
            }
        }
        Command::FailFsync(on) => {
            tree.disk.set_faults(Faults { fail_fsync: on, ..faults });
            Ok(command.to_string())
        }
        Command::FailWrite(on) => {
            tree.disk.set_faults(Faults { fail_write: on, ..faults });
            Ok(command.to_string())
        }
        Command::Quota(quota_bytes) => {
            // Count afresh: the quota is about what is on disk, and the running total may have
            // drifted (a file deleted while open, a write that failed half-way).
            tree.recount().map_err(|error| format!("quota: {error}"))?;
            tree.disk.set_faults(Faults { quota_bytes, ..faults });
            Ok(format!("{command} used_bytes={}", tree.disk.used_bytes()))
        }
        Command::Heal => {
            tree.disk.set_faults(Faults::default());
            Ok(command.to_string())
        }
        Command::Status => Ok(tree.disk.status().to_string()),
    }
}

/// The thread answering the control socket, until [`Server::stop`].
#[derive(Debug)]
pub(crate) struct Server {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `path` (replacing a socket a previous run left behind) and answers it on a thread.
    pub(crate) fn start(path: &Path, tree: Arc<Mutex<Tree>>) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let listener = UnixListener::bind(path)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("lazyfs-control".into()).spawn({
            let stopping = Arc::clone(&stopping);
            move || serve(&listener, &tree, &stopping)
        })?;
        Ok(Self { path: path.to_path_buf(), stopping, thread: Some(thread) })
    }

    /// Stops answering and removes the socket.
    pub(crate) fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept; if the connection fails the thread is not accepting any more.
        if UnixStream::connect(&self.path).is_ok() && thread.join().is_err() {
            tracing::warn!("control thread panicked");
        }
        std::fs::remove_file(&self.path).ok();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(listener: &UnixListener, tree: &Mutex<Tree>, stopping: &AtomicBool) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let result = stream.and_then(|stream| answer(stream, tree));
        if let Err(error) = result {
            tracing::warn!(%error, "control connection");
        }
    }
}

/// Answers one connection's commands, one at a time, until it closes.
fn answer(stream: UnixStream, tree: &Mutex<Tree>) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if (&mut reader).take(LINE_BYTES_MAX).read_line(&mut line)? == 0 {
            return Ok(());
        }
        let reply = match line.parse::<Command>() {
            Ok(command) => execute(&mut lock(tree), command),
            Err(error) => Err(error),
        };
        match reply {
            Ok(text) => writeln!(writer, "ok {text}")?,
            Err(text) => writeln!(writer, "error {text}")?,
        }
    }
}

/// Why a command on the control socket did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached or broke mid-command.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The filesystem answered `error ...`.
    #[error("refused: {0}")]
    Refused(String),
    /// The answer was neither `ok ...` nor `error ...`.
    #[error("malformed reply {0:?}")]
    Malformed(String),
}

/// Sends commands to a running mount's control socket; one connection per command.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// A client of the control socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Sends `command`; returns the reply after `ok `.
    pub fn send(&self, command: Command) -> Result<String, Error> {
        let io_error = |source| Error::Io { path: self.path.clone(), source };
        let mut stream = UnixStream::connect(&self.path).map_err(io_error)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io_error)?;
        writeln!(stream, "{command}").map_err(io_error)?;
        let mut line = String::new();
        BufReader::new(stream).take(LINE_BYTES_MAX * 16).read_line(&mut line).map_err(io_error)?;
        let line = line.trim_end();
        if let Some(text) = line.strip_prefix("ok") {
            Ok(text.trim_start().to_string())
        } else if let Some(text) = line.strip_prefix("error ") {
            Err(Error::Refused(text.to_string()))
        } else {
            Err(Error::Malformed(line.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_reads_back_as_it_is_written() {
        let commands = [
            Command::Crash,
            Command::FailFsync(true),
            Command::FailFsync(false),
            Command::FailWrite(true),
            Command::FailWrite(false),
            Command::Quota(Some(1 << 20)),
            Command::Quota(None),
            Command::Heal,
            Command::Status,
        ];
        for command in commands {
            assert_eq!(command.to_string().parse::<Command>(), Ok(command));
        }
    }

    #[test]
    fn malformed_commands_are_refused_with_a_reason() {
        for line in ["", "crash now", "fail-fsync maybe", "quota -1", "reboot"] {
            let error = line.parse::<Command>().expect_err(line);
            assert!(!error.is_empty());
        }
    }
}
