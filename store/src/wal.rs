//! The write-ahead log: numbered entries in segment files, appended in batches (one
//! batch = one group commit = one durable append).
//!
//! Layout: segment `"{first_index:016x}.wal"` = magic `SHOALWL1`, then batches.
//! A batch = `[body_len u32 LE][crc32 u32 LE of body][body]`, body = records
//! `[index u64 LE][len u32 LE][payload]`.
//!
//! Recovery: because each batch is made durable before the next is written, only the
//! last batch of the last segment can be incomplete after a crash. A bad batch (short,
//! or checksum mismatch) with no valid batch after it is that torn tail: it is truncated
//! and logged. A bad batch followed by a valid one is corruption: opening fails, naming
//! the file and offset, and nothing is deleted.

use std::sync::Arc;

use bytes::Bytes;

use crate::disk::{Disk, DiskFile};

const MAGIC: &[u8; 8] = b"SHOALWL1";
const BATCH_HEADER: usize = 8;
const RECORD_HEADER: usize = 12;
/// A segment is closed once it grows past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path} is corrupt at offset {offset}: {reason}; refusing to start (nothing was deleted; restore the member from a peer or a snapshot)")]
    Corrupt { path: String, offset: u64, reason: String },
    #[error("write-ahead log i/o error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// One log entry as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    pub data: Bytes,
}

/// What recovery found besides the entries.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// A torn tail that was cut off: (file, offset, bytes dropped).
    pub truncated: Option<(String, u64, u64)>,
    pub segments: usize,
}

pub struct Wal {
    disk: Arc<dyn Disk>,
    /// (first index, file name) of every segment, oldest first. The last one is open.
    segments: Vec<(u64, String)>,
    file: Box<dyn DiskFile>,
    /// Index the next entry gets (one past the last, or the first index of the log).
    next_index: u64,
    buf: Vec<u8>,
}

fn seg_name(first: u64) -> String {
    format!("{first:016x}.wal")
}

fn parse_seg_name(n: &str) -> Option<u64> {
    let hex = n.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Parses one batch at `off`; returns its records and the offset after it, or why not.
fn parse_batch(data: &[u8], off: usize) -> Result<(Vec<(u64, std::ops::Range<usize>)>, usize), String> {
    if data.len() - off < BATCH_HEADER {
        return Err("short batch header".into());
    }
    let len = u32::from_le_bytes(data[off..off + 4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(data[off + 4..off + 8].try_into().expect("4 bytes"));
    let start = off + BATCH_HEADER;
    if len == 0 || data.len() - start < len {
        return Err(format!("batch of {len} bytes runs past the end of the file"));
    }
    let body = &data[start..start + len];
    if crc32fast::hash(body) != crc {
        return Err("batch checksum mismatch".into());
    }
    let mut recs = Vec::new();
    let mut p = 0;
    while p < body.len() {
        if body.len() - p < RECORD_HEADER {
            return Err("record header past the end of its batch".into());
        }
        let index = u64::from_le_bytes(body[p..p + 8].try_into().expect("8 bytes"));
        let rlen = u32::from_le_bytes(body[p + 8..p + 12].try_into().expect("4 bytes")) as usize;
        p += RECORD_HEADER;
        if body.len() - p < rlen {
            return Err("record past the end of its batch".into());
        }
        recs.push((index, start + p..start + p + rlen));
        p += rlen;
    }
    Ok((recs, start + len))
}

impl Wal {
    /// Opens the log in `disk`, returning every entry with index > `after` (the index
    /// covered by the loaded snapshot) in order.
    pub fn open(disk: Arc<dyn Disk>, after: Option<u64>) -> Result<(Wal, Vec<Entry>, RecoveryReport), WalError> {
        let io = |name: &str, e: std::io::Error| WalError::Io { path: disk.path_of(name).display().to_string(), source: e };
        let mut segments: Vec<(u64, String)> =
            disk.list().map_err(|e| io("", e))?.into_iter().filter_map(|n| parse_seg_name(&n).map(|i| (i, n))).collect();
        segments.sort();
        let mut entries: Vec<Entry> = Vec::new();
        let mut report = RecoveryReport { segments: segments.len(), ..Default::default() };
        let mut next_index = after.map_or(0, |a| a + 1);
        let mut open_len = MAGIC.len() as u64;
        let mut recreate_last = false;
        let nsegs = segments.len();
        for (si, (_, name)) in segments.iter().enumerate() {
            let path = disk.path_of(name).display().to_string();
            let corrupt = |offset: usize, reason: String| WalError::Corrupt { path: path.clone(), offset: offset as u64, reason };
            let data = disk.read(name).map_err(|e| io(name, e))?;
            let is_last = si + 1 == nsegs;
            if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
                if is_last && data.len() <= MAGIC.len() {
                    // Crashed while creating the segment: its header never became durable.
                    tracing::warn!(file = %path, bytes = data.len(), "recreating a segment whose creation was interrupted");
                    report.truncated = Some((path.clone(), 0, data.len() as u64));
                    recreate_last = true;
                    break;
                }
                return Err(corrupt(0, "bad segment header".into()));
            }
            let data = Bytes::from(data);
            let mut off = MAGIC.len();
            while off < data.len() {
                match parse_batch(&data, off) {
                    Ok((recs, next)) => {
                        for (index, r) in recs {
                            if index > next_index {
                                return Err(corrupt(off, format!("entry {index} found where entry {next_index} was expected: entries are missing")));
                            }
                            if after.is_some_and(|a| index <= a) {
                                next_index = next_index.max(index + 1);
                                continue;
                            }
                            // An entry at or below the last one replaces the suffix from it
                            // (raft overwrote a conflicting tail).
                            while entries.last().is_some_and(|e| e.index >= index) {
                                entries.pop();
                            }
                            entries.push(Entry { index, data: data.slice(r) });
                            next_index = index + 1;
                        }
                        off = next;
                    }
                    Err(reason) => {
                        let valid_after = Self::valid_batch_after(&data, off);
                        if !is_last || valid_after {
                            return Err(corrupt(off, reason));
                        }
                        tracing::warn!(file = %path, offset = off, dropped_bytes = data.len() - off, %reason,
                            "truncating torn tail of the write-ahead log (a write that was never acknowledged)");
                        report.truncated = Some((path.clone(), off as u64, (data.len() - off) as u64));
                        break;
                    }
                }
            }
            if is_last {
                open_len = off as u64;
            }
        }
        if let Some(e) = entries.last() {
            next_index = e.index + 1;
        }
        let (segments, file) = if let Some((_, name)) = segments.last() {
            let file = if recreate_last {
                let mut f = disk.open_append(name, 0).map_err(|e| io(name, e))?;
                f.append_durable(MAGIC).map_err(|e| io(name, e))?;
                f
            } else {
                disk.open_append(name, open_len).map_err(|e| io(name, e))?
            };
            (segments, file)
        } else {
            let name = seg_name(next_index);
            let mut file = disk.open_append(&name, 0).map_err(|e| io(&name, e))?;
            file.append_durable(MAGIC).map_err(|e| io(&name, e))?;
            (vec![(next_index, name)], file)
        };
        Ok((Wal { disk, segments, file, next_index, buf: Vec::with_capacity(1 << 16) }, entries, report))
    }

    /// Scans forward from a bad batch for any valid batch. Only used on the recovery path.
    fn valid_batch_after(data: &[u8], bad: usize) -> bool {
        (bad + 1..data.len().saturating_sub(BATCH_HEADER)).any(|o| {
            let len = u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes")) as usize;
            len > RECORD_HEADER && parse_batch(data, o).is_ok()
        })
    }

    /// Index of the last entry (0 for an empty log).
    pub fn last_index(&self) -> u64 {
        self.next_index.saturating_sub(1)
    }

    /// Appends entries as one durable batch. Indexes must continue the log (or restart
    /// at or below the last one, replacing the suffix).
    pub fn append<'a>(&mut self, entries: impl IntoIterator<Item = (u64, &'a [u8])>) -> std::io::Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; BATCH_HEADER]);
        let mut last = None;
        for (index, data) in entries {
            self.buf.extend_from_slice(&index.to_le_bytes());
            self.buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(data);
            last = Some(index);
        }
        let Some(last) = last else { return Ok(()) };
        let body_len = (self.buf.len() - BATCH_HEADER) as u32;
        let crc = crc32fast::hash(&self.buf[BATCH_HEADER..]);
        self.buf[0..4].copy_from_slice(&body_len.to_le_bytes());
        self.buf[4..8].copy_from_slice(&crc.to_le_bytes());
        if self.file.len() > SEGMENT_BYTES {
            self.rotate()?;
        }
        self.file.append_durable(&self.buf)?;
        self.next_index = last + 1;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let first = self.next_index;
        let name = seg_name(first);
        let mut file = self.disk.open_append(&name, 0)?;
        file.append_durable(MAGIC)?;
        self.file = file;
        self.segments.push((first, name));
        Ok(())
    }

    /// Deletes segments whose every entry is at or below `index` (covered by a snapshot).
    pub fn purge_to(&mut self, index: u64) -> std::io::Result<()> {
        // Segment i holds [first_i, first_{i+1}); it is covered when first_{i+1} <= index + 1.
        while self.segments.len() > 1 && self.segments[1].0 <= index + 1 {
            let (_, name) = self.segments.remove(0);
            self.disk.remove(&name)?;
        }
        Ok(())
    }

    /// Starts a new segment so that older ones can be purged after a snapshot.
    pub fn roll(&mut self) -> std::io::Result<()> {
        if self.file.len() > MAGIC.len() as u64 {
            self.rotate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::SimDisk;

    fn open(d: &SimDisk, after: u64) -> Result<(Wal, Vec<Entry>, RecoveryReport), WalError> {
        Wal::open(Arc::new(d.clone()), Some(after))
    }

    #[test]
    fn appends_survive_reopen() {
        let d = SimDisk::new();
        let (mut w, e, _) = open(&d, 0).unwrap();
        assert!(e.is_empty());
        w.append([(1, &b"a"[..]), (2, &b"bb"[..])]).unwrap();
        w.append([(3, &b"ccc"[..])]).unwrap();
        drop(w);
        let (w, e, r) = open(&d, 0).unwrap();
        assert_eq!(e.iter().map(|e| e.index).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(e[2].data.as_ref(), b"ccc");
        assert_eq!(w.last_index(), 3);
        assert!(r.truncated.is_none());
        // Entries covered by a snapshot are skipped.
        let (_, e, _) = open(&d, 2).unwrap();
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn torn_tail_is_truncated_and_log_continues() {
        let d = SimDisk::new();
        let (mut w, _, _) = open(&d, 0).unwrap();
        w.append([(1, &b"one"[..])]).unwrap();
        d.fail_next_sync();
        assert!(w.append([(2, &[7u8; 100][..])]).is_err());
        drop(w);
        // Keep only part of the unsynced batch.
        let name = d.list().unwrap()[0].clone();
        let data = d.read(&name).unwrap();
        let cut = data.len() - 40;
        drop(d.open_append(&name, cut as u64).unwrap());
        let (mut w, e, r) = open(&d, 0).unwrap();
        assert_eq!(e.len(), 1);
        assert!(r.truncated.is_some());
        w.append([(2, &b"two"[..])]).unwrap();
        drop(w);
        let (_, e, r) = open(&d, 0).unwrap();
        assert_eq!(e.len(), 2);
        assert!(r.truncated.is_none());
    }

    #[test]
    fn corruption_in_the_middle_refuses_to_start() {
        let d = SimDisk::new();
        let (mut w, _, _) = open(&d, 0).unwrap();
        for i in 1..=3u64 {
            w.append([(i, &b"payload-xyz"[..])]).unwrap();
        }
        drop(w);
        let name = d.list().unwrap()[0].clone();
        let mut data = d.read(&name).unwrap();
        data[MAGIC.len() + BATCH_HEADER + RECORD_HEADER + 2] ^= 0xff;
        d.write_atomic(&name, &data).unwrap();
        match open(&d, 0) {
            Err(WalError::Corrupt { offset, .. }) => assert_eq!(offset, MAGIC.len() as u64),
            other => panic!("expected corruption, got {:?}", other.map(|x| x.1)),
        }
        // Nothing was deleted.
        assert_eq!(d.read(&name).unwrap(), data);
    }

    #[test]
    fn interrupted_segment_creation_is_recreated() {
        let d = SimDisk::new();
        let (mut w, _, _) = open(&d, 0).unwrap();
        w.append([(1, &b"x"[..])]).unwrap();
        drop(w);
        // A second segment whose header write never became durable: garbage bytes.
        d.write_atomic(&seg_name(2), b"SHO\x01").unwrap();
        let (mut w, e, r) = open(&d, 0).unwrap();
        assert_eq!(e.len(), 1);
        assert!(r.truncated.is_some());
        w.append([(2, &b"y"[..])]).unwrap();
        drop(w);
        let (_, e, _) = open(&d, 0).unwrap();
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn rotation_and_purge() {
        let d = SimDisk::new();
        let (mut w, _, _) = open(&d, 0).unwrap();
        w.append([(1, &b"x"[..])]).unwrap();
        w.roll().unwrap();
        w.append([(2, &b"y"[..])]).unwrap();
        assert_eq!(d.list().unwrap().len(), 2);
        w.purge_to(1).unwrap();
        assert_eq!(d.list().unwrap().len(), 1);
        drop(w);
        let (_, e, _) = open(&d, 1).unwrap();
        assert_eq!(e.len(), 1);
    }
}
