//! Disks that can lose power: with the `power` or `disk` nemesis, each host's data directory is
//! a `vow-lazyfs` mount (served by threads of this process) over a backing directory beside it.
//!
//! A power loss is `kill -9` of the node followed by the filesystem's `crash`: every file
//! loses what was written to it since its last fsync, as after a power cut (the node is dead by
//! then, so nothing races the rollback). Disk faults are the same filesystem failing writes or
//! fsyncs with EIO, or refusing to grow past a quota with ENOSPC; the heal lifts them.
//!
//! The mounts live as long as the run's [`crate::hosts::Hosts`]; one left by a run that was
//! killed is found by [`leftovers`] and detached by [`cleanup`].

use std::path::{Path, PathBuf};

use anyhow::Context;
use vow_lazyfs::{Client, Command, Mount, Options};

/// The filesystem type the kernel shows for our mounts in `/proc/mounts`.
const FSTYPE: &str = "fuse.vow-lazyfs";

/// One host's mounted disk.
#[derive(Debug)]
pub struct Disk {
    /// Declared first so it drops (unmounts) before anything else of the disk.
    mount: Mount,
    control: PathBuf,
}

impl Disk {
    /// Mounts a fresh disk for the host whose files live in `host_dir`: the data directory
    /// `host_dir/disk` over `host_dir/backing`, commands on `host_dir/lazyfs.sock`.
    pub fn mount(host_dir: &Path) -> anyhow::Result<Disk> {
        let (mountpoint, backing) = (host_dir.join("disk"), host_dir.join("backing"));
        std::fs::create_dir_all(&mountpoint)?;
        std::fs::create_dir_all(&backing)?;
        let control = host_dir.join("lazyfs.sock");
        let mount = vow_lazyfs::mount(&Options { mountpoint, backing, control: control.clone() })
            .with_context(|| format!("mounting a vow-lazyfs disk in {}", host_dir.display()))?;
        Ok(Disk { mount, control })
    }

    /// The directory the node keeps its data in.
    pub fn data_dir(&self) -> &Path {
        self.mount.mountpoint()
    }

    /// Sends one command and returns the filesystem's answer (the text after `ok`).
    pub fn send(&self, command: Command) -> anyhow::Result<String> {
        let what = command.to_string();
        Client::new(&self.control).send(command).with_context(|| format!("vow-lazyfs {what}"))
    }

    /// Bytes of files on the disk now (what a quota counts).
    pub fn used_bytes(&self) -> anyhow::Result<u64> {
        let status = self.send(Command::Status)?;
        field(&status, "used_bytes").with_context(|| format!("no used_bytes in {status:?}"))
    }
}

/// The number after `name=` in a status line such as `dirty_files=3 used_bytes=123`.
fn field(status: &str, name: &str) -> Option<u64> {
    status.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// Whether this machine can mount the disks (FUSE is there).
pub fn available() -> bool {
    Path::new("/dev/fuse").exists()
}

/// Our mounts an earlier run left behind, by mountpoint.
pub fn leftovers() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_source, mountpoint, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            // /proc/mounts escapes spaces and the like as octal; our paths have none.
            (fstype == FSTYPE).then(|| PathBuf::from(mountpoint))
        })
        .collect()
}

/// Detaches every mount [`leftovers`] finds.
pub fn cleanup() {
    for mountpoint in leftovers() {
        if let Err(e) = vow_lazyfs::unmount_stale(&mountpoint) {
            eprintln!("warning: could not detach {}: {e}", mountpoint.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_by_name() {
        let status = "dirty_files=2 dirty_bytes=4096 used_bytes=123456 quota=off fail_fsync=false";
        assert_eq!(field(status, "used_bytes"), Some(123_456));
        assert_eq!(field(status, "dirty_files"), Some(2));
        assert_eq!(field(status, "quota"), None, "not a number");
        assert_eq!(field(status, "used"), None, "whole names only");
    }
}
