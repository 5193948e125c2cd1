//! The files the store writes, behind a small trait so tests can cut the power.
//!
//! [`RealDisk`] is a directory; its files append with io_uring (one linked write +
//! fdatasync submission per group commit). [`SimDisk`] keeps files in memory and, on
//! [`SimDisk::power_loss`], drops every byte not yet synced except a seeded-random torn
//! prefix, like a disk whose cache was lost.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use parking_lot::Mutex;

/// One append-only file.
pub trait DiskFile: Send {
    /// Appends `data` at the end of the file and returns once it is durable.
    fn append_durable(&mut self, data: &[u8]) -> io::Result<()>;
    /// Current length in bytes (written, durable or not).
    fn len(&self) -> u64;
}

/// A directory of files.
pub trait Disk: Send + Sync {
    fn list(&self) -> io::Result<Vec<String>>;
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Opens a file for appending at `len` (its content past `len` is discarded);
    /// creates it when missing.
    fn open_append(&self, name: &str, len: u64) -> io::Result<Box<dyn DiskFile>>;
    /// Writes a whole file durably and atomically (temp file, fsync, rename, fsync dir).
    fn write_atomic(&self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Replaces a whole file without waiting for the disk: after a crash it may hold the
    /// old content, the new one, or nothing readable. For hints only.
    fn write_lazy(&self, name: &str, data: &[u8]) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Human-readable location of a file, for error messages.
    fn path_of(&self, name: &str) -> PathBuf;
    /// Bytes used by every file (the on-disk size etcd reports as `dbSize`).
    fn total_bytes(&self) -> u64;
}

/// A real directory.
pub struct RealDisk {
    dir: PathBuf,
    use_uring: bool,
}

impl RealDisk {
    /// Opens (creating) `dir`. `use_uring` selects io_uring appends; otherwise write + fdatasync.
    pub fn open(dir: &Path, use_uring: bool) -> io::Result<RealDisk> {
        std::fs::create_dir_all(dir)?;
        Ok(RealDisk { dir: dir.to_path_buf(), use_uring })
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl Disk for RealDisk {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            if e.file_type()?.is_file() {
                if let Some(n) = e.file_name().to_str() {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        File::open(self.dir.join(name))?.read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn open_append(&self, name: &str, len: u64) -> io::Result<Box<dyn DiskFile>> {
        let path = self.dir.join(name);
        let existed = path.exists();
        let f = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(&path)?;
        if f.metadata()?.len() != len {
            f.set_len(len)?;
            f.sync_all()?;
        }
        if !existed {
            self.sync_dir()?;
        }
        if self.use_uring {
            Ok(Box::new(UringFile::new(f, len)?))
        } else {
            Ok(Box::new(StdFile { f, len }))
        }
    }

    fn write_atomic(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(name))?;
        self.sync_dir()
    }

    fn write_lazy(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, self.dir.join(name))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(name))?;
        self.sync_dir()
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn total_bytes(&self) -> u64 {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return 0 };
        rd.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
    }
}

/// Appends with `write` + `fdatasync` system calls.
struct StdFile {
    f: File,
    len: u64,
}

impl DiskFile for StdFile {
    fn append_durable(&mut self, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.f.write_all_at(data, self.len)?;
        self.f.sync_data()?;
        self.len += data.len() as u64;
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// Appends with one io_uring submission: a write linked to an fdatasync.
struct UringFile {
    f: File,
    len: u64,
    ring: IoUring,
}

impl UringFile {
    fn new(f: File, len: u64) -> io::Result<UringFile> {
        Ok(UringFile { f, len, ring: IoUring::new(8)? })
    }

    /// Submits `entries` and waits for all their completions; returns their results in order.
    fn run(&mut self, entries: &[squeue::Entry]) -> io::Result<[i32; 2]> {
        let mut res = [0i32; 2];
        {
            let mut sq = self.ring.submission();
            for e in entries {
                // SAFETY: the buffers referenced by the entries outlive this call, which
                // waits for every completion before returning.
                unsafe { sq.push(e).map_err(|_| io::Error::other("io_uring submission queue full"))? };
            }
        }
        self.ring.submit_and_wait(entries.len())?;
        let mut seen = 0;
        while seen < entries.len() {
            let Some(cqe) = self.ring.completion().next() else {
                self.ring.submit_and_wait(1)?;
                continue;
            };
            let i = cqe.user_data() as usize;
            if i < res.len() {
                res[i] = cqe.result();
            }
            seen += 1;
        }
        Ok(res)
    }
}

impl DiskFile for UringFile {
    fn append_durable(&mut self, data: &[u8]) -> io::Result<()> {
        let fd = types::Fd(self.f.as_raw_fd());
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            let write = opcode::Write::new(fd, rest.as_ptr(), rest.len().min(u32::MAX as usize) as u32)
                .offset(self.len + done as u64)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(0);
            let sync = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().user_data(1);
            let [w, s] = self.run(&[write, sync])?;
            if w < 0 {
                return Err(io::Error::from_raw_os_error(-w));
            }
            done += w as usize;
            if done == data.len() {
                if s < 0 {
                    return Err(io::Error::from_raw_os_error(-s));
                }
            }
            // A short write cancels the linked fsync (-ECANCELED); the loop writes the
            // rest and syncs again.
        }
        self.len += data.len() as u64;
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }
}

#[derive(Default, Clone)]
struct SimFile {
    /// Bytes that survive a power loss.
    durable: Vec<u8>,
    /// Everything written, durable or not.
    written: Vec<u8>,
}

/// An in-memory disk that can lose power. Cloning shares the same files.
#[derive(Clone, Default)]
pub struct SimDisk {
    files: Arc<Mutex<BTreeMap<String, SimFile>>>,
    /// Appends left before one writes its bytes but fails before they are durable.
    fail_sync: Arc<Mutex<Option<usize>>>,
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// Makes the next append write its data but return an error before syncing, as a
    /// process killed between write and fsync would leave it.
    pub fn fail_next_sync(&self) {
        self.fail_after(0);
    }

    /// Like [`SimDisk::fail_next_sync`], but lets `n` appends succeed first.
    pub fn fail_after(&self, n: usize) {
        *self.fail_sync.lock() = Some(n);
    }

    /// Loses power: every file keeps its durable bytes plus a seeded-random prefix of
    /// what was written after them, the last 0..16 bytes of which are garbage (a torn
    /// sector).
    pub fn power_loss(&self, seed: u64) {
        *self.fail_sync.lock() = None;
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for f in self.files.lock().values_mut() {
            let extra = f.written.len() - f.durable.len();
            let keep = if extra == 0 { 0 } else { (next() % (extra as u64 + 1)) as usize };
            let mut kept = f.written[..f.durable.len() + keep].to_vec();
            let torn = (next() % 17) as usize;
            let n = kept.len();
            for b in kept[n - torn.min(keep)..].iter_mut() {
                *b = next() as u8;
            }
            f.durable = kept.clone();
            f.written = kept;
        }
    }
}

struct SimHandle {
    disk: SimDisk,
    name: String,
}

impl DiskFile for SimHandle {
    fn append_durable(&mut self, data: &[u8]) -> io::Result<()> {
        let mut files = self.disk.files.lock();
        let f = files.get_mut(&self.name).ok_or_else(|| io::Error::other("file removed"))?;
        f.written.extend_from_slice(data);
        let mut fail = self.disk.fail_sync.lock();
        match *fail {
            Some(0) => {
                *fail = None;
                return Err(io::Error::other("simulated crash before fsync"));
            }
            Some(n) => *fail = Some(n - 1),
            None => {}
        }
        f.durable = f.written.clone();
        Ok(())
    }

    fn len(&self) -> u64 {
        self.disk.files.lock().get(&self.name).map_or(0, |f| f.written.len() as u64)
    }
}

impl Disk for SimDisk {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.files.lock().keys().cloned().collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.files
            .lock()
            .get(name)
            .map(|f| f.written.clone())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_string()))
    }

    fn open_append(&self, name: &str, len: u64) -> io::Result<Box<dyn DiskFile>> {
        let mut files = self.files.lock();
        let f = files.entry(name.to_string()).or_default();
        f.written.truncate(len as usize);
        f.durable = f.written.clone();
        Ok(Box::new(SimHandle { disk: self.clone(), name: name.to_string() }))
    }

    fn write_atomic(&self, name: &str, data: &[u8]) -> io::Result<()> {
        self.files.lock().insert(name.to_string(), SimFile { durable: data.to_vec(), written: data.to_vec() });
        Ok(())
    }

    fn write_lazy(&self, name: &str, data: &[u8]) -> io::Result<()> {
        // A rename replaces the whole file: after a crash a real disk shows the old or the
        // new content (or an empty file, which readers treat as no hint). Modelled as the
        // new content surviving.
        self.write_atomic(name, data)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.files.lock().remove(name);
        Ok(())
    }

    fn path_of(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("sim:{name}"))
    }

    fn total_bytes(&self) -> u64 {
        self.files.lock().values().map(|f| f.written.len() as u64).sum()
    }
}

/// An exclusive lock on a data directory, held for the life of the process, so two
/// members never write the same files.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir/LOCK`, failing at once if another process holds it.
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        let path = dir.join("LOCK");
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{} is locked by another process ({e})", path.display())));
        }
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uring_and_std_files_append_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for uring in [true, false] {
            let d = RealDisk::open(dir.path(), uring).unwrap();
            let name = format!("f{uring}");
            let mut f = d.open_append(&name, 0).unwrap();
            f.append_durable(b"hello ").unwrap();
            f.append_durable(b"world").unwrap();
            assert_eq!(f.len(), 11);
            drop(f);
            assert_eq!(d.read(&name).unwrap(), b"hello world");
            // Reopening at a shorter length discards the tail.
            let mut f = d.open_append(&name, 5).unwrap();
            f.append_durable(b"!").unwrap();
            assert_eq!(d.read(&name).unwrap(), b"hello!");
        }
    }

    #[test]
    fn sim_power_loss_keeps_synced_bytes() {
        let d = SimDisk::new();
        let mut f = d.open_append("a", 0).unwrap();
        f.append_durable(b"durable").unwrap();
        d.fail_next_sync();
        assert!(f.append_durable(b"lost-maybe").is_err());
        d.power_loss(7);
        let data = d.read("a").unwrap();
        assert!(data.starts_with(b"durable"));
        assert!(data.len() <= b"durablelost-maybe".len());
    }
}
