//! State snapshots: rkyv archives read in place (validated, not parsed), so a restart
//! with a million keys rebuilds its index without decoding a message per key. Values in
//! the rebuilt index are slices of the loaded file buffer, not copies.
//!
//! File `"{index:016x}.snap"` = `SHOALSN2` magic, crc32 (LE u32) of the archive, 4 zero
//! bytes, then the archive. The 16-byte header keeps the archive 16-byte aligned.
//! Archives use 64-bit relative pointers (`SHOALSN1`, with 32-bit ones, could not hold
//! more than 2 GiB: a 5,000-node density run's history reached that and the snapshot
//! failed). The archive is serialized after the header in one buffer (no copy).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use rkyv::{Archive, Serialize};

use crate::disk::Disk;
use crate::mvcc::{Mvcc, Version};
use crate::state::{Lease, State};

const MAGIC: &[u8; 8] = b"SHOALSN2";
const OLD_MAGIC: &[u8; 8] = b"SHOALSN1";
const HEADER: usize = 16;

#[derive(Archive, Serialize, Debug)]
pub struct SnapVersion {
    pub mod_rev: i64,
    pub create_rev: i64,
    pub version: i64,
    pub lease: i64,
    /// The stored value, archived straight from the state's shared buffer (no copy).
    #[rkyv(with = BytesAsVec)]
    pub value: Bytes,
}

/// Archives `Bytes` as an `ArchivedVec<u8>`, serializing from the buffer in place.
pub struct BytesAsVec;

impl rkyv::with::ArchiveWith<Bytes> for BytesAsVec {
    type Archived = rkyv::vec::ArchivedVec<u8>;
    type Resolver = rkyv::vec::VecResolver;
    fn resolve_with(field: &Bytes, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::vec::ArchivedVec::resolve_from_len(field.len(), resolver, out);
    }
}

impl<S: rkyv::rancor::Fallible + rkyv::ser::Allocator + rkyv::ser::Writer + ?Sized> rkyv::with::SerializeWith<Bytes, S> for BytesAsVec {
    fn serialize_with(field: &Bytes, s: &mut S) -> Result<Self::Resolver, S::Error> {
        rkyv::vec::ArchivedVec::serialize_from_slice(field.as_ref(), s)
    }
}

#[derive(Archive, Serialize, Debug)]
pub struct SnapKey {
    pub key: Vec<u8>,
    pub versions: Vec<SnapVersion>,
}

#[derive(Archive, Serialize, Debug)]
pub struct SnapLease {
    pub id: i64,
    pub ttl: i64,
}

/// Everything a member needs to resume from `index` without the log before it.
#[derive(Archive, Serialize, Debug)]
pub struct SnapshotData {
    pub index: u64,
    pub term: u64,
    pub rev: i64,
    pub compact_rev: i64,
    pub nospace: bool,
    pub keys: Vec<SnapKey>,
    pub leases: Vec<SnapLease>,
    /// Opaque replication metadata (raft membership), owned by the replication layer.
    pub meta: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path} is corrupt: {reason}; refusing to start (nothing was deleted)")]
    Corrupt { path: String, reason: String },
    #[error("snapshot i/o error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// The file name of the snapshot covering the log up to `index`.
pub fn file_name(index: u64) -> String {
    snap_name(index)
}

fn snap_name(index: u64) -> String {
    format!("{index:016x}.snap")
}

/// Encodes a snapshot of `state` at its applied index.
pub fn encode(state: &State, term: u64, meta: Vec<u8>) -> Result<Vec<u8>, String> {
    let keys = state
        .mvcc
        .keys()
        .iter()
        .map(|(k, vs)| SnapKey {
            key: k.to_vec(),
            versions: vs
                .iter()
                .map(|v| SnapVersion {
                    mod_rev: v.mod_rev,
                    create_rev: v.create_rev,
                    version: v.version,
                    lease: v.lease,
                    value: v.value.clone(),
                })
                .collect(),
        })
        .collect();
    let data = SnapshotData {
        index: state.applied,
        term,
        rev: state.mvcc.rev(),
        compact_rev: state.mvcc.compact_rev(),
        nospace: state.nospace,
        keys,
        leases: state.leases.iter().map(|(id, l)| SnapLease { id: *id, ttl: l.ttl }).collect(),
        meta,
    };
    let mut buf = rkyv::util::AlignedVec::<16>::new();
    buf.extend_from_slice(&[0u8; HEADER]);
    let mut buf = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(&data, buf).map_err(|e| format!("serializing the snapshot: {e}"))?;
    let crc = crc32fast::hash(&buf[HEADER..]);
    buf[..8].copy_from_slice(MAGIC);
    buf[8..12].copy_from_slice(&crc.to_le_bytes());
    Ok(buf.into_vec())
}

/// Writes a snapshot file durably; returns its name.
pub fn save(disk: &dyn Disk, state: &State, term: u64, meta: Vec<u8>) -> std::io::Result<String> {
    let name = snap_name(state.applied);
    disk.write_atomic(&name, &encode(state, term, meta).map_err(std::io::Error::other)?)?;
    Ok(name)
}

/// A loaded snapshot: the state plus what the replication layer stored with it.
pub struct Loaded {
    pub state: State,
    pub term: u64,
    pub meta: Vec<u8>,
}

/// Decodes a snapshot file's bytes into a state. `quota` is the local configuration.
pub fn decode(file: Vec<u8>, quota: u64, path: &str) -> Result<Loaded, SnapshotError> {
    let corrupt = |reason: &str| SnapshotError::Corrupt { path: path.to_string(), reason: reason.to_string() };
    if file.len() >= HEADER && &file[..8] == OLD_MAGIC {
        return Err(corrupt("written by an older Shoal (32-bit archive format SHOALSN1); restore from a peer or an etcd snapshot"));
    }
    if file.len() < HEADER || &file[..8] != MAGIC {
        return Err(corrupt("bad header"));
    }
    let crc = u32::from_le_bytes(file[8..12].try_into().expect("4 bytes"));
    if crc32fast::hash(&file[HEADER..]) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    // rkyv needs the archive aligned; large allocations are, but check rather than assume.
    let file = if (file.as_ptr() as usize + HEADER) % 16 == 0 {
        Bytes::from(file)
    } else {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(file.len());
        aligned.extend_from_slice(&file);
        Bytes::copy_from_slice(&aligned)
    };
    if (file.as_ptr() as usize + HEADER) % 16 != 0 {
        return Err(corrupt("could not align the archive in memory"));
    }
    let archive = &file[HEADER..];
    let a = rkyv::access::<ArchivedSnapshotData, rkyv::rancor::Error>(archive).map_err(|e| corrupt(&e.to_string()))?;
    let mut prev_key: Option<&[u8]> = None;
    let mut keys = BTreeMap::new();
    let mut leases: BTreeMap<i64, Lease> =
        a.leases.iter().map(|l| (l.id.to_native(), Lease { ttl: l.ttl.to_native(), keys: BTreeSet::new() })).collect();
    for k in a.keys.iter() {
        let key: &[u8] = k.key.as_slice();
        if prev_key.is_some_and(|p| p >= key) {
            return Err(corrupt("keys out of order"));
        }
        prev_key = Some(key);
        let key = file.slice_ref(key);
        let mut versions = Vec::with_capacity(k.versions.len());
        for v in k.versions.iter() {
            versions.push(Version {
                mod_rev: v.mod_rev.to_native(),
                create_rev: v.create_rev.to_native(),
                version: v.version.to_native(),
                lease: v.lease.to_native(),
                value: if v.value.is_empty() { Bytes::new() } else { file.slice_ref(v.value.as_slice()) },
            });
        }
        if versions.windows(2).any(|w| w[0].mod_rev >= w[1].mod_rev) {
            return Err(corrupt("key history out of order"));
        }
        if let Some(live) = versions.last().filter(|v| !v.is_tombstone() && v.lease != 0) {
            if let Some(l) = leases.get_mut(&live.lease) {
                l.keys.insert(key.clone());
            }
        }
        keys.insert(key, versions);
    }
    let mvcc = Mvcc::from_parts(keys, a.rev.to_native(), a.compact_rev.to_native());
    let state = State { mvcc, leases, nospace: a.nospace, applied: a.index.to_native(), quota };
    Ok(Loaded { state, term: a.term.to_native(), meta: a.meta.to_vec() })
}

/// Loads the newest snapshot in `disk`, if any. Older snapshots are kept until a newer
/// one is loaded successfully, then removed.
pub fn load_latest(disk: &Arc<dyn Disk>, quota: u64) -> Result<Option<Loaded>, SnapshotError> {
    let io = |name: &str, e| SnapshotError::Io { path: disk.path_of(name).display().to_string(), source: e };
    let mut names: Vec<String> = disk.list().map_err(|e| io("", e))?.into_iter().filter(|n| n.ends_with(".snap")).collect();
    names.sort();
    let Some(newest) = names.pop() else { return Ok(None) };
    let path = disk.path_of(&newest).display().to_string();
    let bytes = disk.read(&newest).map_err(|e| io(&newest, e))?;
    let loaded = decode(bytes, quota, &path)?;
    for old in names {
        if let Err(e) = disk.remove(&old) {
            tracing::warn!(file = %disk.path_of(&old).display(), error = %e, "could not remove an old snapshot");
        }
    }
    Ok(Some(loaded))
}

/// Removes every snapshot older than `keep`.
pub fn remove_older(disk: &dyn Disk, keep: u64) -> std::io::Result<()> {
    for n in disk.list()? {
        if let Some(hex) = n.strip_suffix(".snap") {
            if u64::from_str_radix(hex, 16).is_ok_and(|i| i < keep) {
                disk.remove(&n)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::SimDisk;
    use shoal_proto::etcdserverpb::{LeaseGrantRequest, PutRequest};
    use shoal_proto::shoalstore::{log_command::Cmd, LogCommand};

    #[test]
    fn round_trip() {
        let mut s = State::new(0);
        let mut ev = Vec::new();
        let cmds = [
            Cmd::LeaseGrant(LeaseGrantRequest { ttl: 30, id: 7 }),
            Cmd::Put(PutRequest { key: "a".into(), value: "1".into(), lease: 7, ..Default::default() }),
            Cmd::Put(PutRequest { key: "b".into(), value: "2".into(), ..Default::default() }),
            Cmd::Put(PutRequest { key: "a".into(), value: "3".into(), lease: 7, ..Default::default() }),
        ];
        for (i, c) in cmds.into_iter().enumerate() {
            s.apply(i as u64 + 1, &LogCommand { cmd: Some(c) }, &mut ev).unwrap();
        }
        let d: Arc<dyn Disk> = Arc::new(SimDisk::new());
        save(d.as_ref(), &s, 3, b"meta".to_vec()).unwrap();
        let l = load_latest(&d, 0).unwrap().unwrap();
        assert_eq!(l.term, 3);
        assert_eq!(l.meta, b"meta");
        assert_eq!(l.state.applied, 4);
        assert_eq!(l.state.mvcc.keys(), s.mvcc.keys());
        assert_eq!(l.state.mvcc.rev(), s.mvcc.rev());
        assert_eq!(l.state.leases, s.leases);
        assert_eq!(l.state.mvcc.size(), s.mvcc.size());
    }

    #[test]
    fn corrupt_snapshot_is_refused() {
        let s = State::new(0);
        let mut bytes = encode(&s, 1, vec![]).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        assert!(matches!(decode(bytes, 0, "x"), Err(SnapshotError::Corrupt { .. })));
    }
}
