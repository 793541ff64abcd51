//! The model of a disk that keeps what was fsynced and loses the rest when the power goes.
//!
//! Writes reach the backing file at once, so reads need no model at all. What the model keeps is
//! the way back: for each file changed since its last fsync, its size at that fsync and the bytes
//! below that size as they were then, saved the first time something overwrote or cut them off.
//! A crash writes those bytes back and truncates the file to the synced size; an fsync forgets
//! them. The model also owns the injected faults (EIO on write or fsync, a quota that gives
//! ENOSPC) and the counters the status line reports.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use fuser::{Errno, INodeNo};

/// `fallocate` mode bit that preallocates without changing the file size (linux/falloc.h).
const FALLOC_FL_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;

/// One file's way back to its state at its last fsync.
#[derive(Debug)]
struct Unsynced {
    /// The size at the last fsync (or when the mount first saw the file change): a crash
    /// truncates the file back to it.
    synced_size_bytes: u64,
    /// The size now, kept so that the status line need not stat every dirty file.
    size_bytes: u64,
    /// Bytes below `synced_size_bytes` as they were at the last fsync, in non-overlapping ranges
    /// keyed by offset. A byte is saved only the first time it changes after an fsync (a later
    /// save would hold an already-changed value), so this never holds more than
    /// `synced_size_bytes` bytes however often the file is rewritten.
    saved: BTreeMap<u64, Vec<u8>>,
}

impl Unsynced {
    fn new(size_bytes: u64) -> Self {
        Self { synced_size_bytes: size_bytes, size_bytes, saved: BTreeMap::new() }
    }

    /// Saves the bytes of `[start, end)` (clipped to the synced size) that no earlier change
    /// since the last fsync has saved, reading them from `file` before they are overwritten.
    ///
    /// Bytes at or past the file's current size need no read: they lie below the synced size
    /// only if a truncation cut them off, and that truncation saved them.
    fn save(&mut self, file: &File, start: u64, end: u64) -> io::Result<()> {
        let end = end.min(self.synced_size_bytes).min(self.size_bytes);
        if start >= end {
            return Ok(());
        }
        let mut gaps = Vec::new();
        let mut cursor = start;
        if let Some((&offset, bytes)) = self.saved.range(..=start).next_back() {
            cursor = cursor.max(offset + len_u64(bytes));
        }
        for (&offset, bytes) in self.saved.range(start..end) {
            if offset > cursor {
                gaps.push((cursor, offset));
            }
            cursor = cursor.max(offset + len_u64(bytes));
        }
        if cursor < end {
            gaps.push((cursor, end));
        }
        for (gap_start, gap_end) in gaps {
            let mut bytes = vec![0; usize_of(gap_end - gap_start)?];
            file.read_exact_at(&mut bytes, gap_start)?;
            self.saved.insert(gap_start, bytes);
        }
        Ok(())
    }

    fn saved_bytes(&self) -> u64 {
        self.saved.values().map(|bytes| len_u64(bytes)).sum()
    }

    /// Bytes a crash would change: those appended past the synced size and those saved below it.
    fn dirty_bytes(&self) -> u64 {
        self.size_bytes.saturating_sub(self.synced_size_bytes) + self.saved_bytes()
    }
}

/// The faults the control socket can switch on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// fsync and fdatasync fail with EIO (and keep the file's unsynced state).
    pub fail_fsync: bool,
    /// write fails with EIO and changes nothing.
    pub fail_write: bool,
    /// Total bytes of regular files under the mount beyond which growing a file gives ENOSPC.
    pub quota_bytes: Option<u64>,
}

/// What happened on the mount since it started, for the status line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Successful fsync and fdatasync calls on files.
    pub fsyncs: u64,
    /// `crash` commands carried out.
    pub crashes: u64,
    /// Errors returned because of `fail-fsync` or `fail-write`.
    pub injected_eio: u64,
    /// Errors returned because of the quota.
    pub injected_enospc: u64,
}

/// A snapshot of the model, one line on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Files a crash would change.
    pub dirty_files: usize,
    /// Bytes a crash would drop or write back.
    pub dirty_bytes: u64,
    /// Total size of the regular files under the mount, as the quota counts it.
    pub used_bytes: u64,
    /// The faults switched on.
    pub faults: Faults,
    /// What happened so far.
    pub counters: Counters,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on_off = |on: bool| if on { "on" } else { "off" };
        write!(
            f,
            "dirty_files={} dirty_bytes={} used_bytes={} quota=",
            self.dirty_files, self.dirty_bytes, self.used_bytes
        )?;
        match self.faults.quota_bytes {
            Some(bytes) => write!(f, "{bytes}")?,
            None => f.write_str("off")?,
        }
        write!(
            f,
            " fail_fsync={} fail_write={} fsyncs={} crashes={} injected_eio={} injected_enospc={}",
            on_off(self.faults.fail_fsync),
            on_off(self.faults.fail_write),
            self.counters.fsyncs,
            self.counters.crashes,
            self.counters.injected_eio,
            self.counters.injected_enospc,
        )
    }
}

/// What a crash did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CrashReport {
    /// Files put back to their state at their last fsync.
    pub files: usize,
    /// Bytes dropped past the synced sizes or written back below them.
    pub bytes: u64,
    /// Files that could not be put back.
    pub failed: usize,
    /// The first few of those, with why.
    pub failures: Vec<String>,
}

/// How many failures a crash report names; the rest are only counted.
const CRASH_FAILURES_NAMED_MAX: usize = 4;

/// The unsynced state of every file on the mount, the faults and the counters.
#[derive(Debug, Default)]
pub struct Disk {
    /// Keyed by inode so that a rename carries the state along; ordered so that a crash
    /// walks the files in the same order every time.
    unsynced: BTreeMap<INodeNo, Unsynced>,
    faults: Faults,
    used_bytes: u64,
    counters: Counters,
}

impl Disk {
    /// A model with nothing unsynced, whose regular files total `used_bytes`.
    pub fn new(used_bytes: u64) -> Self {
        Self { used_bytes, ..Self::default() }
    }

    /// Writes `data` at `offset` of `file` (the backing file of inode `ino`), saving what it
    /// overwrites below the synced size first.
    pub fn write(&mut self, ino: INodeNo, file: &File, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        if self.faults.fail_write {
            self.counters.injected_eio += 1;
            return Err(Errno::EIO);
        }
        let written = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        if data.is_empty() {
            return Ok(0);
        }
        let size_bytes = file.metadata()?.len();
        let end = offset.checked_add(len_u64(data)).ok_or(Errno::EFBIG)?;
        let grown_bytes = end.saturating_sub(size_bytes);
        self.reserve(grown_bytes)?;
        let unsynced = self.unsynced.entry(ino).or_insert_with(|| Unsynced::new(size_bytes));
        unsynced.size_bytes = size_bytes;
        unsynced.save(file, offset, end)?;
        file.write_all_at(data, offset)?;
        unsynced.size_bytes = size_bytes.max(end);
        self.used_bytes += grown_bytes;
        Ok(written)
    }

    /// Truncates or extends `file` (the backing file of inode `ino`) to `len_bytes`, saving
    /// what a truncation cuts off below the synced size first.
    pub fn set_len(&mut self, ino: INodeNo, file: &File, len_bytes: u64) -> Result<(), Errno> {
        let size_bytes = file.metadata()?.len();
        if len_bytes == size_bytes {
            return Ok(());
        }
        self.reserve(len_bytes.saturating_sub(size_bytes))?;
        let unsynced = self.unsynced.entry(ino).or_insert_with(|| Unsynced::new(size_bytes));
        unsynced.size_bytes = size_bytes;
        unsynced.save(file, len_bytes, size_bytes)?;
        file.set_len(len_bytes)?;
        unsynced.size_bytes = len_bytes;
        self.used_bytes = (self.used_bytes + len_bytes).saturating_sub(size_bytes);
        Ok(())
    }

    /// `fallocate`: mode 0 extends the file if the range ends past it (a crash cuts the extension
    /// off like any other); `FALLOC_FL_KEEP_SIZE` preallocates, which changes nothing a reader can
    /// see, so it is a no-op. Punching holes and the other modes are not supported.
    pub fn fallocate(&mut self, ino: INodeNo, file: &File, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        match mode {
            0 => {
                let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
                if end > file.metadata()?.len() {
                    self.set_len(ino, file, end)?;
                }
                Ok(())
            }
            FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// fsync or fdatasync of inode `ino`: what it holds now survives a crash.
    pub fn fsync(&mut self, ino: INodeNo) -> Result<(), Errno> {
        if self.faults.fail_fsync {
            self.counters.injected_eio += 1;
            return Err(Errno::EIO);
        }
        self.unsynced.remove(&ino);
        self.counters.fsyncs += 1;
        Ok(())
    }

    /// Inode `ino` was just created (empty): until an fsync, a crash leaves it empty.
    pub fn created(&mut self, ino: INodeNo) {
        self.unsynced.insert(ino, Unsynced::new(0));
    }

    /// A regular file of `size_bytes` left the tree (unlinked, or replaced by a rename); `ino`
    /// is its inode if the mount knew it. Its unsynced state goes with it: removing a name is
    /// durable here, so nothing a crash could do would bring the file back.
    pub fn removed(&mut self, ino: Option<INodeNo>, size_bytes: u64) {
        if let Some(ino) = ino {
            self.unsynced.remove(&ino);
        }
        self.used_bytes = self.used_bytes.saturating_sub(size_bytes);
    }

    /// The power went out: every file changed since its last fsync gets back its saved bytes and
    /// its synced size. `path_of` names the backing file of an inode, or `None` if it has no
    /// name any more (nothing to put back then).
    pub fn crash(&mut self, path_of: impl Fn(INodeNo) -> Option<PathBuf>) -> CrashReport {
        let mut report = CrashReport::default();
        for (ino, unsynced) in std::mem::take(&mut self.unsynced) {
            let Some(path) = path_of(ino) else { continue };
            match roll_back(&path, &unsynced) {
                Ok(()) => {
                    report.files += 1;
                    report.bytes += unsynced.dirty_bytes();
                }
                Err(error) => {
                    report.failed += 1;
                    if report.failures.len() < CRASH_FAILURES_NAMED_MAX {
                        report.failures.push(format!("{}: {error}", path.display()));
                    }
                }
            }
        }
        self.counters.crashes += 1;
        report
    }

    /// Resets the total the quota counts against, after something changed sizes behind the
    /// model's back (a crash, or files written to the backing directory directly).
    pub fn set_used_bytes(&mut self, used_bytes: u64) {
        self.used_bytes = used_bytes;
    }

    /// The total size of regular files, as the quota counts it.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// The faults switched on.
    pub fn faults(&self) -> Faults {
        self.faults
    }

    /// Switches faults on or off.
    pub fn set_faults(&mut self, faults: Faults) {
        self.faults = faults;
    }

    /// A snapshot for the status line.
    pub fn status(&self) -> Status {
        Status {
            dirty_files: self.unsynced.len(),
            dirty_bytes: self.unsynced.values().map(Unsynced::dirty_bytes).sum(),
            used_bytes: self.used_bytes,
            faults: self.faults,
            counters: self.counters,
        }
    }

    /// Checks that growing the files by `grown_bytes` stays inside the quota.
    fn reserve(&mut self, grown_bytes: u64) -> Result<(), Errno> {
        let Some(quota_bytes) = self.faults.quota_bytes else {
            return Ok(());
        };
        if grown_bytes > 0 && self.used_bytes.saturating_add(grown_bytes) > quota_bytes {
            self.counters.injected_enospc += 1;
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }
}

/// Puts one backing file back to its state at its last fsync.
fn roll_back(path: &std::path::Path, unsynced: &Unsynced) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    for (&offset, bytes) in &unsynced.saved {
        file.write_all_at(bytes, offset)?;
    }
    file.set_len(unsynced.synced_size_bytes)
}

fn len_u64(bytes: &[u8]) -> u64 {
    // usize is at most 64 bits on every target fuser supports.
    bytes.len() as u64
}

fn usize_of(bytes: u64) -> io::Result<usize> {
    usize::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    const INO: INodeNo = INodeNo(7);

    /// A backing file holding `content`, as if fsynced.
    fn backing(content: &[u8]) -> (tempfile::TempDir, PathBuf, File) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, content).expect("write");
        let file = OpenOptions::new().read(true).write(true).open(&path).expect("open");
        (dir, path, file)
    }

    fn crash(disk: &mut Disk, path: &std::path::Path) -> CrashReport {
        let path = path.to_path_buf();
        disk.crash(move |ino| (ino == INO).then(|| path.clone()))
    }

    #[test]
    fn crash_undoes_overwrites_appends_and_truncations_since_the_last_fsync() {
        let (_dir, path, file) = backing(b"0123456789");
        let mut disk = Disk::new(10);
        disk.write(INO, &file, 2, b"ab").expect("write");
        disk.set_len(INO, &file, 4).expect("truncate");
        disk.write(INO, &file, 3, b"xyzxyzxyz").expect("write");
        disk.write(INO, &file, 0, b"Q").expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"Q1axyzxyzxyz");

        let report = crash(&mut disk, &path);

        assert_eq!(report.files, 1);
        assert_eq!(report.failed, 0);
        assert_eq!(fs::read(&path).expect("read"), b"0123456789");
        assert_eq!(disk.status().dirty_files, 0);
    }

    #[test]
    fn an_fsync_makes_what_came_before_it_survive() {
        let (_dir, path, file) = backing(b"abc");
        let mut disk = Disk::new(3);
        disk.write(INO, &file, 3, b"def").expect("write");
        disk.fsync(INO).expect("fsync");
        disk.write(INO, &file, 0, b"XYZ").expect("write");
        disk.write(INO, &file, 6, b"ghi").expect("write");

        crash(&mut disk, &path);

        assert_eq!(fs::read(&path).expect("read"), b"abcdef");
    }

    #[test]
    fn a_byte_is_saved_once_however_often_it_is_rewritten() {
        let (_dir, path, file) = backing(&[b'.'; 100]);
        let mut disk = Disk::new(100);
        for round in 0..50u8 {
            disk.write(INO, &file, u64::from(round), &[round; 10]).expect("write");
        }
        // Bytes 0..59 were overwritten; each is held once.
        assert_eq!(disk.status().dirty_bytes, 59);

        crash(&mut disk, &path);

        assert_eq!(fs::read(&path).expect("read"), vec![b'.'; 100]);
    }

    #[test]
    fn a_created_file_is_empty_after_a_crash_and_keeps_an_fsynced_prefix() {
        let (_dir, path, file) = backing(b"");
        let mut disk = Disk::new(0);
        disk.created(INO);
        disk.write(INO, &file, 0, b"never synced").expect("write");
        crash(&mut disk, &path);
        assert_eq!(fs::read(&path).expect("read"), b"");

        disk.write(INO, &file, 0, b"synced").expect("write");
        disk.fsync(INO).expect("fsync");
        disk.write(INO, &file, 6, b" and not").expect("write");
        crash(&mut disk, &path);
        assert_eq!(fs::read(&path).expect("read"), b"synced");
    }

    #[test]
    fn a_removed_file_is_not_brought_back() {
        let (_dir, path, file) = backing(b"abc");
        let mut disk = Disk::new(3);
        disk.write(INO, &file, 0, b"xyz").expect("write");
        disk.removed(Some(INO), 3);
        assert_eq!(disk.status().dirty_files, 0);
        assert_eq!(disk.used_bytes(), 0);
        assert_eq!(crash(&mut disk, &path).files, 0);
    }

    #[test]
    fn faults_refuse_and_count_and_leave_the_data_alone() {
        let (_dir, path, file) = backing(b"abc");
        let mut disk = Disk::new(3);
        disk.set_faults(Faults { fail_write: true, ..Faults::default() });
        assert_eq!(disk.write(INO, &file, 0, b"x"), Err(Errno::EIO));
        assert_eq!(fs::read(&path).expect("read"), b"abc");

        disk.set_faults(Faults { fail_fsync: true, ..Faults::default() });
        disk.write(INO, &file, 3, b"d").expect("write");
        assert_eq!(disk.fsync(INO), Err(Errno::EIO));
        assert_eq!(disk.status().dirty_files, 1, "a failed fsync keeps nothing");

        disk.set_faults(Faults { quota_bytes: Some(6), ..Faults::default() });
        assert_eq!(disk.write(INO, &file, 4, b"efg"), Err(Errno::ENOSPC));
        assert_eq!(disk.set_len(INO, &file, 7), Err(Errno::ENOSPC));
        assert_eq!(disk.fallocate(INO, &file, 0, 7, 0), Err(Errno::ENOSPC));
        disk.write(INO, &file, 4, b"ef").expect("fits the quota");

        let status = disk.status();
        assert_eq!(status.counters.injected_eio, 2);
        assert_eq!(status.counters.injected_enospc, 3);
        assert_eq!(status.used_bytes, 6);
    }

    #[test]
    fn fallocate_grows_for_mode_zero_and_ignores_keep_size() {
        let (_dir, path, file) = backing(b"ab");
        let mut disk = Disk::new(2);
        disk.fallocate(INO, &file, 0, 1 << 20, FALLOC_FL_KEEP_SIZE).expect("keep size");
        assert_eq!(fs::metadata(&path).expect("stat").len(), 2);
        disk.fallocate(INO, &file, 2, 6, 0).expect("mode 0");
        assert_eq!(fs::metadata(&path).expect("stat").len(), 8);
        assert_eq!(disk.fallocate(INO, &file, 0, 1, libc::FALLOC_FL_PUNCH_HOLE), Err(Errno::EOPNOTSUPP));
        crash(&mut disk, &path);
        assert_eq!(fs::read(&path).expect("read"), b"ab");
    }

    #[test]
    fn the_status_line_names_every_fault_and_counter() {
        let mut disk = Disk::new(5);
        disk.set_faults(Faults { fail_fsync: true, fail_write: false, quota_bytes: Some(1024) });
        assert_eq!(
            disk.status().to_string(),
            "dirty_files=0 dirty_bytes=0 used_bytes=5 quota=1024 fail_fsync=on fail_write=off \
             fsyncs=0 crashes=0 injected_eio=0 injected_enospc=0"
        );
    }
}
