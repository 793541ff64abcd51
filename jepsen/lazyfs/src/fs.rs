//! The FUSE side: a passthrough tree over the backing directory, with every change to a regular
//! file's bytes routed through the [`Disk`] model.
//!
//! Inode numbers are the mount's own, handed out on first sight of a backing inode and never
//! reused, so that a file created where a deleted one was is never mistaken for it. Metadata
//! operations (create, mkdir, unlink, rmdir, rename) go straight to the backing directory and
//! are durable at once — a lenience: a real filesystem can also lose directory entries that were
//! not fsynced with their directory.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::fs::{PermissionsExt, fchown, lchown};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenAccMode,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::disk::{CrashReport, Disk};

/// How long the kernel may cache an entry or attributes: not at all, because a crash changes
/// file sizes behind the kernel's back and a stale size would hide the lost tail.
const TTL: Duration = Duration::ZERO;

/// Open files and directories at once; past this, open gives EMFILE rather than growing the
/// handle table without bound.
const HANDLES_MAX: usize = 65_536;

/// Entries in one directory listing; a bigger directory is refused rather than snapshotted.
const DIR_ENTRIES_MAX: usize = 1_000_000;

/// Block size statfs reports under a quota.
const QUOTA_BLOCK_BYTES: u64 = 4096;

/// Open flags that describe how to open, not how to do I/O: the backing file is opened for
/// reading and writing with none of them, and O_APPEND in particular must not reach it, since
/// the kernel already turned appends into writes at explicit offsets.
const OPEN_FLAGS_NOT_PASSED: i32 = libc::O_ACCMODE
    | libc::O_CREAT
    | libc::O_EXCL
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_DIRECT
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_NOCTTY;

/// The inode table: which backing path each of the mount's inodes stands for.
#[derive(Debug)]
struct Inodes {
    paths: HashMap<INodeNo, PathBuf>,
    /// Backing inode number to the mount's; an entry goes when the backing file loses its name.
    by_backing: HashMap<u64, INodeNo>,
    next: u64,
}

impl Inodes {
    fn new(root: PathBuf, root_backing_ino: u64) -> Self {
        Self {
            paths: HashMap::from([(INodeNo::ROOT, root)]),
            by_backing: HashMap::from([(root_backing_ino, INodeNo::ROOT)]),
            next: INodeNo::ROOT.0 + 1,
        }
    }

    /// The mount's inode for the backing inode `backing_ino`, now found at `path`.
    fn intern(&mut self, backing_ino: u64, path: PathBuf) -> INodeNo {
        let ino = *self.by_backing.entry(backing_ino).or_insert_with(|| {
            let ino = INodeNo(self.next);
            self.next += 1;
            ino
        });
        self.paths.insert(ino, path);
        ino
    }

    fn path(&self, ino: INodeNo) -> Result<&Path, Errno> {
        self.paths.get(&ino).map(PathBuf::as_path).ok_or(Errno::ENOENT)
    }

    /// The backing inode `backing_ino` lost its last name: forget it, so that a new file that
    /// gets the same backing inode number gets a new inode of the mount.
    fn forget(&mut self, backing_ino: u64) -> Option<INodeNo> {
        let ino = self.by_backing.remove(&backing_ino)?;
        self.paths.remove(&ino);
        Some(ino)
    }

    /// `from` is now called `to`: so is everything under it.
    fn renamed(&mut self, from: &Path, to: &Path) {
        for path in self.paths.values_mut() {
            if let Ok(rest) = path.strip_prefix(from) {
                *path = if rest.as_os_str().is_empty() { to.to_path_buf() } else { to.join(rest) };
            }
        }
    }
}

#[derive(Debug)]
struct Handle {
    ino: INodeNo,
    file: File,
    /// Opened with O_SYNC or O_DSYNC: every write is also an fdatasync.
    sync_writes: bool,
}

/// Everything the mount knows: the inode table, the open handles and the disk model. The
/// kernel's request loop and the control socket both act on it, under one lock.
#[derive(Debug)]
pub(crate) struct Tree {
    root: PathBuf,
    inodes: Inodes,
    files: HashMap<u64, Handle>,
    dirs: HashMap<u64, Vec<(INodeNo, FileType, OsString)>>,
    next_handle: u64,
    pub(crate) disk: Disk,
}

impl Tree {
    pub(crate) fn new(root: PathBuf) -> io::Result<Self> {
        let root_backing_ino = fs::metadata(&root)?.ino();
        let used_bytes = regular_file_bytes(&root)?;
        Ok(Self {
            inodes: Inodes::new(root.clone(), root_backing_ino),
            root,
            files: HashMap::new(),
            dirs: HashMap::new(),
            next_handle: 1,
            disk: Disk::new(used_bytes),
        })
    }

    /// The power went out: see [`Disk::crash`]. Then counts the bytes on disk again for the
    /// quota, since the crash shrank files.
    pub(crate) fn crash(&mut self) -> io::Result<CrashReport> {
        let inodes = &self.inodes;
        let report = self.disk.crash(|ino| inodes.path(ino).ok().map(Path::to_path_buf));
        self.recount()?;
        Ok(report)
    }

    /// Counts the bytes of regular files in the backing directory again.
    pub(crate) fn recount(&mut self) -> io::Result<()> {
        let used_bytes = regular_file_bytes(&self.root)?;
        self.disk.set_used_bytes(used_bytes);
        Ok(())
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        if name.is_empty() || name == "." || name == ".." || name.as_encoded_bytes().contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        Ok(self.inodes.path(parent)?.join(name))
    }

    fn lookup(&mut self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let path = self.child(parent, name)?;
        let metadata = fs::symlink_metadata(&path)?;
        let ino = self.inodes.intern(metadata.ino(), path);
        attr(ino, &metadata)
    }

    fn getattr(&self, ino: INodeNo, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        let metadata = match fh.and_then(|fh| self.files.get(&fh.0)) {
            Some(handle) => handle.file.metadata()?,
            None => fs::symlink_metadata(self.inodes.path(ino)?)?,
        };
        attr(ino, &metadata)
    }

    #[allow(clippy::too_many_arguments)] // one per attribute the kernel can set
    fn setattr(
        &mut self,
        ino: INodeNo,
        fh: Option<FileHandle>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<FileAttr, Errno> {
        let handle = fh.and_then(|fh| self.files.get(&fh.0));
        if let Some(size) = size {
            match handle {
                Some(handle) => self.disk.set_len(ino, &handle.file, size)?,
                None => {
                    let file = OpenOptions::new().read(true).write(true).open(self.inodes.path(ino)?)?;
                    self.disk.set_len(ino, &file, size)?;
                }
            }
        }
        if let Some(mode) = mode {
            let permissions = Permissions::from_mode(mode & 0o7777);
            match handle {
                Some(handle) => handle.file.set_permissions(permissions)?,
                None => fs::set_permissions(self.inodes.path(ino)?, permissions)?,
            }
        }
        if uid.is_some() || gid.is_some() {
            match handle {
                Some(handle) => fchown(&handle.file, uid, gid)?,
                None => lchown(self.inodes.path(ino)?, uid, gid)?,
            }
        }
        if atime.is_some() || mtime.is_some() {
            let mut times = FileTimes::new();
            if let Some(atime) = atime {
                times = times.set_accessed(system_time(atime));
            }
            if let Some(mtime) = mtime {
                times = times.set_modified(system_time(mtime));
            }
            match handle {
                Some(handle) => handle.file.set_times(times)?,
                None => File::open(self.inodes.path(ino)?)?.set_times(times)?,
            }
        }
        self.getattr(ino, fh)
    }

    fn new_handle(&mut self) -> Result<u64, Errno> {
        if self.files.len() + self.dirs.len() >= HANDLES_MAX {
            return Err(Errno::EMFILE);
        }
        let fh = self.next_handle;
        self.next_handle += 1;
        Ok(fh)
    }

    fn open(&mut self, ino: INodeNo, flags: OpenFlags) -> Result<FileHandle, Errno> {
        let file = backing_options(flags).open(self.inodes.path(ino)?)?;
        let fh = self.new_handle()?;
        self.files.insert(fh, Handle { ino, file, sync_writes: flags.0 & libc::O_DSYNC != 0 });
        Ok(FileHandle(fh))
    }

    fn create(
        &mut self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(FileAttr, FileHandle), Errno> {
        let path = self.child(parent, name)?;
        // Writable whatever the caller asked for: creating needs it (O_CREAT|O_RDONLY is legal)
        // and so does the truncation below.
        let mut options = backing_options(OpenFlags(flags));
        options.write(true);
        let (file, created) = match options.clone().create_new(true).mode(mode & !umask & 0o7777).open(&path) {
            Ok(file) => (file, true),
            // The kernel asks to create only names it saw missing; another process may have
            // won the race. Without O_EXCL that is an open (and O_TRUNC a truncation, below).
            Err(error) if error.kind() == ErrorKind::AlreadyExists && flags & libc::O_EXCL == 0 => {
                (options.open(&path)?, false)
            }
            Err(error) => return Err(error.into()),
        };
        let metadata = file.metadata()?;
        let ino = self.inodes.intern(metadata.ino(), path);
        if created {
            self.disk.created(ino);
        } else if flags & libc::O_TRUNC != 0 {
            self.disk.set_len(ino, &file, 0)?;
        }
        let fh = self.new_handle()?;
        self.files.insert(fh, Handle { ino, file, sync_writes: flags & libc::O_DSYNC != 0 });
        Ok((self.getattr(ino, Some(FileHandle(fh)))?, FileHandle(fh)))
    }

    fn handle(&self, fh: FileHandle) -> Result<&Handle, Errno> {
        self.files.get(&fh.0).ok_or(Errno::EBADF)
    }

    fn read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let handle = self.handle(fh)?;
        let mut bytes = vec![0; usize::try_from(size).map_err(|_| Errno::EINVAL)?];
        let mut filled = 0;
        while filled < bytes.len() {
            match handle.file.read_at(&mut bytes[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
        bytes.truncate(filled);
        Ok(bytes)
    }

    fn write(&mut self, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let handle = self.files.get(&fh.0).ok_or(Errno::EBADF)?;
        let written = self.disk.write(handle.ino, &handle.file, offset, data)?;
        if handle.sync_writes {
            self.disk.fsync(handle.ino)?;
        }
        Ok(written)
    }

    fn fallocate(&mut self, fh: FileHandle, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        let handle = self.files.get(&fh.0).ok_or(Errno::EBADF)?;
        self.disk.fallocate(handle.ino, &handle.file, offset, length, mode)
    }

    fn mkdir(&mut self, parent: INodeNo, name: &OsStr, mode: u32, umask: u32) -> Result<FileAttr, Errno> {
        let path = self.child(parent, name)?;
        DirBuilder::new().mode(mode & !umask & 0o7777).create(&path)?;
        self.lookup(parent, name)
    }

    fn unlink(&mut self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let path = self.child(parent, name)?;
        let metadata = fs::symlink_metadata(&path)?;
        fs::remove_file(&path)?;
        self.gone(&metadata);
        Ok(())
    }

    fn rmdir(&mut self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let path = self.child(parent, name)?;
        let metadata = fs::symlink_metadata(&path)?;
        fs::remove_dir(&path)?;
        self.gone(&metadata);
        Ok(())
    }

    /// A name was removed or replaced; with no hard links made through the mount, that was the
    /// backing inode's last name (a file the backing directory already held with more links
    /// keeps its content, but the mount forgets its unsynced state: a lenience).
    fn gone(&mut self, metadata: &Metadata) {
        let ino = self.inodes.forget(metadata.ino());
        let size_bytes = if metadata.is_file() { metadata.len() } else { 0 };
        self.disk.removed(ino, size_bytes);
    }

    fn rename(
        &mut self,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if !flags.is_empty() {
            // RENAME_NOREPLACE and RENAME_EXCHANGE: nothing vow or RocksDB uses.
            return Err(Errno::EINVAL);
        }
        let from = self.child(parent, name)?;
        let to = self.child(new_parent, new_name)?;
        let moved = fs::symlink_metadata(&from)?;
        let replaced = fs::symlink_metadata(&to).ok();
        fs::rename(&from, &to)?;
        if let Some(replaced) = replaced.filter(|replaced| replaced.ino() != moved.ino()) {
            self.gone(&replaced);
        }
        self.inodes.renamed(&from, &to);
        Ok(())
    }

    fn opendir(&mut self, ino: INodeNo) -> Result<FileHandle, Errno> {
        let path = self.inodes.path(ino)?.to_path_buf();
        let mut entries =
            vec![(ino, FileType::Directory, OsString::from(".")), (ino, FileType::Directory, OsString::from(".."))];
        for entry in fs::read_dir(&path)? {
            let entry = entry?;
            if entries.len() >= DIR_ENTRIES_MAX {
                return Err(Errno::ENOMEM);
            }
            let kind = FileType::from_std(entry.file_type()?).ok_or(Errno::EIO)?;
            let child = self.inodes.intern(entry.ino(), entry.path());
            entries.push((child, kind, entry.file_name()));
        }
        let fh = self.new_handle()?;
        self.dirs.insert(fh, entries);
        Ok(FileHandle(fh))
    }

    fn statfs(&self) -> Result<Space, Errno> {
        let stat = nix::sys::statvfs::statvfs(&self.root).map_err(|errno| Errno::from_i32(errno as i32))?;
        let backing = Space {
            blocks: stat.blocks(),
            blocks_free: stat.blocks_free(),
            blocks_available: stat.blocks_available(),
            files: stat.files(),
            files_free: stat.files_free(),
            block_bytes: u32::try_from(stat.block_size()).unwrap_or(u32::MAX),
            name_max: u32::try_from(stat.name_max()).unwrap_or(u32::MAX),
            fragment_bytes: u32::try_from(stat.fragment_size()).unwrap_or(u32::MAX),
        };
        let Some(quota_bytes) = self.disk.faults().quota_bytes else {
            return Ok(backing);
        };
        let free = quota_bytes.saturating_sub(self.disk.used_bytes()) / QUOTA_BLOCK_BYTES;
        Ok(Space {
            blocks: quota_bytes / QUOTA_BLOCK_BYTES,
            blocks_free: free,
            blocks_available: free,
            block_bytes: QUOTA_BLOCK_BYTES as u32,
            fragment_bytes: QUOTA_BLOCK_BYTES as u32,
            ..backing
        })
    }
}

/// What statfs reports: the backing filesystem's numbers, or the quota's when one is set.
#[derive(Debug, Clone, Copy)]
struct Space {
    blocks: u64,
    blocks_free: u64,
    blocks_available: u64,
    files: u64,
    files_free: u64,
    block_bytes: u32,
    name_max: u32,
    fragment_bytes: u32,
}

/// Options to open a backing file: readable always (saving old bytes reads them, even through a
/// handle the caller opened write-only), writable if the caller may write.
fn backing_options(flags: OpenFlags) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(flags.acc_mode() != OpenAccMode::O_RDONLY).custom_flags(flags.0 & !OPEN_FLAGS_NOT_PASSED);
    options
}

fn system_time(time: TimeOrNow) -> SystemTime {
    match time {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn attr(ino: INodeNo, metadata: &Metadata) -> Result<FileAttr, Errno> {
    let kind = FileType::from_std(metadata.file_type()).ok_or(Errno::EIO)?;
    let time = |secs: i64, nanos: i64| {
        let since_epoch = Duration::new(secs.unsigned_abs(), u32::try_from(nanos).unwrap_or(0));
        if secs >= 0 { UNIX_EPOCH + since_epoch } else { UNIX_EPOCH - since_epoch }
    };
    Ok(FileAttr {
        ino,
        size: metadata.len(),
        blocks: metadata.blocks(),
        atime: time(metadata.atime(), metadata.atime_nsec()),
        mtime: time(metadata.mtime(), metadata.mtime_nsec()),
        ctime: time(metadata.ctime(), metadata.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind,
        perm: (metadata.mode() & 0o7777) as u16,
        nlink: u32::try_from(metadata.nlink()).unwrap_or(u32::MAX),
        uid: metadata.uid(),
        gid: metadata.gid(),
        rdev: u32::try_from(metadata.rdev()).unwrap_or(0),
        blksize: u32::try_from(metadata.blksize()).unwrap_or(4096),
        flags: 0,
    })
}

/// Total size of the regular files under `root`, as the quota counts it.
fn regular_file_bytes(root: &Path) -> io::Result<u64> {
    let mut total_bytes = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if file_type.is_file() {
                // A file deleted since read_dir listed it takes no space.
                match entry.metadata() {
                    Ok(metadata) => total_bytes += metadata.len(),
                    Err(error) if error.kind() == ErrorKind::NotFound => {}
                    Err(error) => return Err(error),
                }
            }
        }
    }
    Ok(total_bytes)
}

/// The [`Filesystem`] the kernel talks to: decodes each request, runs it on the [`Tree`] and
/// replies.
#[derive(Debug)]
pub(crate) struct LazyFs {
    tree: Arc<Mutex<Tree>>,
}

impl LazyFs {
    pub(crate) fn new(tree: Arc<Mutex<Tree>>) -> Self {
        Self { tree }
    }

    fn tree(&self) -> MutexGuard<'_, Tree> {
        lock(&self.tree)
    }
}

/// Locks the tree. A panic while it was held leaves the model as it was at the panic, which
/// is still the best account of what is unsynced, so a poisoned lock is used anyway.
pub(crate) fn lock(tree: &Mutex<Tree>) -> MutexGuard<'_, Tree> {
    tree.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn reply_entry(reply: ReplyEntry, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(errno) => reply.error(errno),
    }
}

fn reply_attr(reply: ReplyAttr, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.attr(&TTL, &attr),
        Err(errno) => reply.error(errno),
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(errno) => reply.error(errno),
    }
}

fn reply_open(reply: ReplyOpen, result: Result<FileHandle, Errno>) {
    match result {
        // No FOPEN_KEEP_CACHE: every open drops the kernel's cached pages of the file, so a
        // process opening a file after a crash reads what the crash left.
        Ok(fh) => reply.opened(fh, FopenFlags::empty()),
        Err(errno) => reply.error(errno),
    }
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.tree().lookup(parent, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.tree().getattr(ino, fh));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.tree().setattr(ino, fh, mode, uid, gid, size, atime, mtime);
        reply_attr(reply, result);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = self.tree().inodes.path(ino).and_then(|path| fs::read_link(path).map_err(Errno::from));
        match result {
            Ok(target) => reply.data(target.as_os_str().as_encoded_bytes()),
            Err(errno) => reply.error(errno),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        reply_entry(reply, self.tree().mkdir(parent, name, mode, umask));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.tree().unlink(parent, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.tree().rmdir(parent, name));
    }

    fn symlink(&self, _req: &Request, _parent: INodeNo, _link_name: &OsStr, _target: &Path, reply: ReplyEntry) {
        // Neither vow nor RocksDB makes links; supporting them would mean tracking more than one
        // name per inode.
        reply.error(Errno::ENOSYS);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.tree().rename(parent, name, newparent, newname, flags));
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        // ENOSYS makes the kernel stop asking (it asks for security.capability on every write).
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        reply_open(reply, self.tree().open(ino, flags));
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.tree().read(fh, offset, size) {
            Ok(bytes) => reply.data(&bytes),
            Err(errno) => reply.error(errno),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.tree().write(fh, offset, data) {
            Ok(written) => reply.written(written),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close() makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.tree().files.remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(reply, self.tree().disk.fsync(ino));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply_open(reply, self.tree().opendir(ino));
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let tree = self.tree();
        let Some(entries) = tree.dirs.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, (ino, kind, name)) in entries.iter().enumerate().skip(skip) {
            // The offset handed out is where the next call starts.
            if reply.add(*ino, index as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.tree().dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Directory entries are durable at once here, so there is nothing to make durable.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.tree().statfs() {
            Ok(space) => reply.statfs(
                space.blocks,
                space.blocks_free,
                space.blocks_available,
                space.files,
                space.files_free,
                space.block_bytes,
                space.name_max,
                space.fragment_bytes,
            ),
            Err(errno) => reply.error(errno),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.tree().create(parent, name, mode, umask, flags) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::empty()),
            Err(errno) => reply.error(errno),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.tree().fallocate(fh, offset, length, mode));
    }
}
