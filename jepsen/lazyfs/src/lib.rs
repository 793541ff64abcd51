//! A FUSE filesystem for vow-jepsen's power-loss and disk nemeses, in the manner of LazyFS.
//!
//! [`mount`] serves a directory (the backing directory) at a mountpoint. Reads and writes pass
//! straight through, but the filesystem remembers, for every file changed since its last fsync,
//! how to put it back (its size then and the bytes since overwritten). The control socket's
//! `crash` command does that to every such file at once: what a database wrote without fsyncing
//! it is gone, as after a power cut. The same socket switches on disk faults — EIO on write or
//! fsync, a quota that gives ENOSPC — see [`Command`].
//!
//! Directory entries are durable at once: a crash never undoes a create, unlink or rename, only
//! file contents (a real filesystem may also lose unsynced entries; this one is lenient there).
//! A file created and never fsynced is left empty.
//!
//! The harness runs the `vow-lazyfs` binary (one per node) and talks to it with [`Client`];
//! tests can [`mount`] in-process. Main types: [`Options`], [`Mount`], [`Command`], [`Client`].
//! Depends on nothing else in vow, and nothing in vow depends on it but the harness.

mod control;
mod disk;
mod fs;

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::{Arc, Mutex};

pub use control::{Client, Command, Error as ControlError};
pub use disk::{Counters, Faults, Status};

/// Where to mount what, and where to listen for commands.
#[derive(Debug, Clone)]
pub struct Options {
    /// The directory the filesystem appears at.
    pub mountpoint: PathBuf,
    /// The directory whose files it serves; must not be under the mountpoint.
    pub backing: PathBuf,
    /// The unix socket for [`Command`]s; a stale socket file there is replaced.
    pub control: PathBuf,
}

/// Why mounting or unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on one of the paths failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// To which path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The backing directory is the mountpoint or under it: serving it would recurse into itself.
    #[error("backing directory {backing} is inside the mountpoint {mountpoint}")]
    BackingInsideMount {
        /// The backing directory.
        backing: PathBuf,
        /// The mountpoint.
        mountpoint: PathBuf,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// A mounted filesystem; dropping it unmounts (see [`Mount::unmount`]).
#[derive(Debug)]
pub struct Mount {
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    control: control::Server,
}

/// Mounts `options.backing` at `options.mountpoint` and answers `options.control`, both on
/// threads of this process. Needs root (or fusermount3) and `/dev/fuse`.
pub fn mount(options: &Options) -> Result<Mount, Error> {
    let backing = options.backing.canonicalize().map_err(io_error("backing directory", &options.backing))?;
    let mountpoint = options.mountpoint.canonicalize().map_err(io_error("mountpoint", &options.mountpoint))?;
    if backing.starts_with(&mountpoint) {
        return Err(Error::BackingInsideMount { backing, mountpoint });
    }
    let tree = fs::Tree::new(backing.clone()).map_err(io_error("backing directory", &backing))?;
    let tree = Arc::new(Mutex::new(tree));

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("vow-lazyfs:{}", backing.display())),
        fuser::MountOption::Subtype("vow-lazyfs".into()),
        // The kernel checks permissions against the attributes, as for a local filesystem.
        fuser::MountOption::DefaultPermissions,
    ];
    // Nodes may run as users other than the one that mounted.
    config.acl = fuser::SessionACL::All;
    // One request at a time: the tree is behind one lock anyway, and the order in which the
    // kernel sent writes is then the order they reach the backing files.
    config.n_threads = Some(1);

    let control = control::Server::start(&options.control, Arc::clone(&tree))
        .map_err(io_error("control socket", &options.control))?;
    let session =
        fuser::spawn_mount(fs::LazyFs::new(tree), &mountpoint, &config).map_err(io_error("mount", &mountpoint))?;
    tracing::info!(mountpoint = %mountpoint.display(), backing = %backing.display(), "mounted");
    Ok(Mount { mountpoint, session: Some(session), control })
}

impl Mount {
    /// Where the filesystem is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether the kernel still sends requests: false once something else unmounted it.
    pub fn is_serving(&self) -> bool {
        self.session.as_ref().is_some_and(|session| !session.guard.is_finished())
    }

    /// Unmounts and stops the control socket. If the mount is busy (a process still has a file
    /// or its working directory there), detaches it lazily instead: it disappears from the
    /// namespace now and the last user closing ends the connection.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.unmount_now()
    }

    fn unmount_now(&mut self) -> Result<(), Error> {
        self.control.stop();
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => {
                tracing::info!(mountpoint = %self.mountpoint.display(), "unmounted");
                Ok(())
            }
            Err(error) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), %error, "busy; detaching lazily");
                unmount_stale(&self.mountpoint)
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(error) = self.unmount_now() {
            tracing::warn!(%error, "unmount");
        }
    }
}

/// Detaches whatever FUSE filesystem is mounted at `mountpoint` — one left behind by a daemon
/// that died — lazily, like `fusermount3 -u -z`. Succeeds if nothing is mounted there.
pub fn unmount_stale(mountpoint: &Path) -> Result<(), Error> {
    use nix::errno::Errno;
    match nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
        // EINVAL: not a mountpoint; ENOENT: no such path. Nothing to undo either way.
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
        // Not root: the setuid helper may unmount what this user mounted.
        Err(Errno::EPERM) => {
            let output = Process::new("fusermount3")
                .args(["-u", "-z", "-q", "--"])
                .arg(mountpoint)
                .output()
                .map_err(io_error("fusermount3 -u", mountpoint))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(Error::Io {
                    what: "fusermount3 -u",
                    path: mountpoint.to_path_buf(),
                    source: std::io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_string()),
                })
            }
        }
        Err(errno) => Err(Error::Io { what: "umount", path: mountpoint.to_path_buf(), source: errno.into() }),
    }
}
