//! Snapshot files: one shard's state, streamed to and from disk, never held in memory whole.
//!
//! Format (version 2, whose meta records members' peer addresses): the magic `VOWSNAP1`; a u32
//! length, the version byte and the snapshot meta ([`crate::codec::snapshot_meta`]); then records `u32 key length, key, u32 value
//! length, value` where the key is the state key without its shard prefix; then a record with
//! key length `u32::MAX` followed by the record count (u64) and the FNV-1a-64 checksum of
//! every record byte. All integers are big-endian. A file that does not end in a matching
//! trailer is refused, so a torn transfer is never installed.
//!
//! Files are named `snap-<term>-<index>-<nonce>.snap` in the shard's snapshot directory, written
//! under a temporary name and renamed into place after an fsync. The random nonce keeps a file
//! built here and one received from the leader apart even when both are at the same log id: a
//! rename never replaces a file someone else wrote or is reading.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use vow_core::codec::{Decoder, Encoder};

use crate::codec;
use crate::corrupt;
use crate::types::SnapshotMeta;

const MAGIC: &[u8; 8] = b"VOWSNAP1";
const TRAILER: u32 = u32::MAX;
/// A key or value larger than this is corruption, not data (the largest value is a promise
/// record of at most a few tens of MiB).
const MAX_FIELD_BYTES: u32 = 64 << 20;

/// Version of the meta in a file's header: 2 since members carry peer addresses (version 1
/// files are refused, as their data directories are).
const META_FORMAT: u8 = 2;
/// Snapshot data as openraft moves it around: an open file plus where it lives.
#[derive(Debug)]
pub struct SnapshotFile {
    pub path: PathBuf,
    pub file: File,
}

impl SnapshotFile {
    pub fn open(path: PathBuf) -> io::Result<Self> {
        let file = File::open(&path)?;
        Ok(SnapshotFile { path, file })
    }
}

#[derive(Debug)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Writes a snapshot file record by record.
#[derive(Debug)]
pub struct Writer {
    out: BufWriter<File>,
    tmp: PathBuf,
    count: u64,
    sum: Fnv,
}

impl Writer {
    pub fn create(dir: &Path, meta: &SnapshotMeta) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("build-{:016x}.tmp", rand::random::<u64>()));
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let mut e = Encoder::new();
        e.u8(META_FORMAT);
        codec::snapshot_meta(&mut e, meta);
        let header = e.into_bytes();
        out.write_all(MAGIC)?;
        out.write_all(&(header.len() as u32).to_be_bytes())?;
        out.write_all(&header)?;
        Ok(Writer { out, tmp, count: 0, sum: Fnv::new() })
    }

    pub fn record(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        for field in [key, value] {
            let len = (field.len() as u32).to_be_bytes();
            self.out.write_all(&len)?;
            self.out.write_all(field)?;
            self.sum.update(&len);
            self.sum.update(field);
        }
        self.count += 1;
        Ok(())
    }

    /// Writes the trailer, syncs, and moves the file to `final_path`. Returns the file opened for
    /// reading before the rename, so the caller holds this very file even if a newer snapshot
    /// replaces it on disk before the caller gets to read it.
    pub fn finish(mut self, final_path: &Path) -> io::Result<SnapshotFile> {
        self.out.write_all(&TRAILER.to_be_bytes())?;
        self.out.write_all(&self.count.to_be_bytes())?;
        self.out.write_all(&self.sum.0.to_be_bytes())?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let reading = File::open(&self.tmp)?;
        fs::rename(&self.tmp, final_path)?;
        if let Some(dir) = final_path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(SnapshotFile { path: final_path.to_owned(), file: reading })
    }
}

/// Reads a snapshot file: first the meta, then the records.
#[derive(Debug)]
pub struct Reader {
    input: BufReader<File>,
    count: u64,
    sum: Fnv,
    done: bool,
}

impl Reader {
    pub fn open(file: File) -> io::Result<(SnapshotMeta, Reader)> {
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a vow snapshot file"));
        }
        let len = read_u32(&mut input)?;
        if len > MAX_FIELD_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot header too large"));
        }
        let mut header = vec![0u8; len as usize];
        input.read_exact(&mut header)?;
        let mut d = Decoder::new(&header);
        d.version("snapshot meta", META_FORMAT).map_err(corrupt)?;
        let meta = codec::read_snapshot_meta(&mut d).map_err(corrupt)?;
        d.finish().map_err(corrupt)?;
        Ok((meta, Reader { input, count: 0, sum: Fnv::new(), done: false }))
    }

    /// The next record, or `None` after a verified trailer.
    pub fn next_record(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let klen = read_u32(&mut self.input)?;
        if klen == TRAILER {
            let mut b = [0u8; 8];
            self.input.read_exact(&mut b)?;
            let count = u64::from_be_bytes(b);
            self.input.read_exact(&mut b)?;
            let sum = u64::from_be_bytes(b);
            if count != self.count || sum != self.sum.0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot checksum mismatch"));
            }
            self.done = true;
            return Ok(None);
        }
        let key = self.field(klen)?;
        let vlen = read_u32(&mut self.input)?;
        let value = self.field(vlen)?;
        self.count += 1;
        Ok(Some((key, value)))
    }

    fn field(&mut self, len: u32) -> io::Result<Vec<u8>> {
        if len > MAX_FIELD_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot record too large"));
        }
        let mut buf = vec![0u8; len as usize];
        self.input.read_exact(&mut buf)?;
        self.sum.update(&len.to_be_bytes());
        self.sum.update(&buf);
        Ok(buf)
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// A fresh file name for a snapshot at `meta`'s log id: no other file has it or will get it.
pub fn file_name(meta: &SnapshotMeta) -> String {
    let (term, index) = meta.last_log_id.map_or((0, 0), |id| (id.leader_id.term, id.index));
    format!("snap-{term:020}-{index:020}-{:016x}.snap", rand::random::<u64>())
}

/// The newest complete snapshot file in `dir`; older ones and leftovers are removed.
pub fn latest(dir: &Path) -> io::Result<Option<PathBuf>> {
    let Ok(rd) = fs::read_dir(dir) else { return Ok(None) };
    let mut snaps = Vec::new();
    for entry in rd {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if name.starts_with("snap-") && name.ends_with(".snap") {
            snaps.push((name, path));
        }
    }
    // Names are zero-padded, so lexical order is (term, index) order; the index decides.
    snaps.sort_by(|a, b| index_of(&a.0).cmp(&index_of(&b.0)).then(a.0.cmp(&b.0)));
    let newest = snaps.pop().map(|(_, p)| p);
    for (_, old) in snaps {
        let _ = fs::remove_file(old);
    }
    Ok(newest)
}

/// The log index in a snapshot file name (`snap-<term>-<index>[-<nonce>].snap`).
fn index_of(name: &str) -> u64 {
    name.trim_end_matches(".snap").split('-').nth(2).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Removes temporary files of interrupted builds or transfers (never a complete snapshot).
pub fn clean_temporaries(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for entry in rd.flatten() {
            if entry.path().extension().is_some_and(|e| e == "tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{LeaderId, LogId, StoredMembership};
    use openraft::vote::RaftLeaderId;
    use vow_core::NodeId;

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(LogId::new(LeaderId::new(2, NodeId(1)), index)),
            last_membership: StoredMembership::default(),
        }
    }

    #[test]
    fn files_round_trip_and_torn_files_are_refused() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut w = Writer::create(dir.path(), &meta(7))?;
        w.record(b"k1", b"v1")?;
        w.record(b"k2", &[0u8; 1000])?;
        let path = dir.path().join(file_name(&meta(7)));
        w.finish(&path)?;
        let (m, mut r) = Reader::open(File::open(&path)?)?;
        assert_eq!(m, meta(7));
        assert_eq!(r.next_record()?, Some((b"k1".to_vec(), b"v1".to_vec())));
        assert!(r.next_record()?.is_some());
        assert_eq!(r.next_record()?, None);

        let bytes = fs::read(&path)?;
        let torn = dir.path().join("torn");
        fs::write(&torn, &bytes[..bytes.len() - 3])?;
        let (_, mut r) = Reader::open(File::open(&torn)?)?;
        let mut result = Ok(Some((vec![], vec![])));
        while let Ok(Some(_)) = result {
            result = r.next_record();
        }
        assert!(result.is_err(), "a torn file must not read to a clean end");
        Ok(())
    }

    #[test]
    fn latest_picks_the_highest_index_and_removes_the_rest() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut held = None;
        for i in [3, 12, 5] {
            let file = Writer::create(dir.path(), &meta(i))?.finish(&dir.path().join(file_name(&meta(i))))?;
            if i == 3 {
                held = Some(file);
            }
        }
        let newest = latest(dir.path())?.expect("a snapshot");
        assert_eq!(index_of(newest.file_name().and_then(|n| n.to_str()).unwrap_or_default()), 12);
        assert_eq!(fs::read_dir(dir.path())?.count(), 1);
        // A file handed out by `finish` stays readable after `latest` removed it from the directory.
        let (m, _) = Reader::open(held.expect("file of index 3").file)?;
        assert_eq!(m, meta(3));
        Ok(())
    }
}
