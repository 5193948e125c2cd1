//! Writes the store as a bbolt database file in etcd's backend layout, the format
//! `etcdctl snapshot save` expects from the Maintenance.Snapshot stream (and that
//! `etcdctl snapshot status` opens offline). Only writing is needed.
//!
//! bbolt layout used here (page size 4096): pages 0 and 1 are meta pages, page 2 the
//! (empty) freelist, page 3 the root bucket's leaf holding the buckets `key` and `meta`,
//! then each bucket's B+tree (leaf pages, branch pages above them when needed). Bucket
//! `key` maps etcd revisions (8-byte big-endian main, `_`, 8-byte sub; tombstones add
//! `t`) to encoded `mvccpb.KeyValue`s, as etcd stores them.

use prost::Message;
use shoal_proto::mvccpb;

use crate::mvcc::Mvcc;

const PAGE: usize = 4096;
const PAGE_HEADER: usize = 16;
const ELEM: usize = 16;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const META: u16 = 0x04;
const FREELIST: u16 = 0x10;
const BUCKET_LEAF_FLAG: u32 = 0x01;
const MAGIC: u32 = 0xED0C_DAED;

struct Writer {
    pages: Vec<u8>,
}

impl Writer {
    fn next_pgid(&self) -> u64 {
        (self.pages.len() / PAGE) as u64
    }

    /// Appends one page (with overflow pages when `body` needs them); returns its id.
    fn page(&mut self, flags: u16, count: u16, body: &[u8]) -> u64 {
        let id = self.next_pgid();
        let total = PAGE_HEADER + body.len();
        let npages = total.div_ceil(PAGE).max(1);
        let start = self.pages.len();
        self.pages.resize(start + npages * PAGE, 0);
        let p = &mut self.pages[start..];
        p[0..8].copy_from_slice(&id.to_le_bytes());
        p[8..10].copy_from_slice(&flags.to_le_bytes());
        p[10..12].copy_from_slice(&count.to_le_bytes());
        p[12..16].copy_from_slice(&((npages - 1) as u32).to_le_bytes());
        p[PAGE_HEADER..PAGE_HEADER + body.len()].copy_from_slice(body);
        id
    }

    /// Writes a leaf page of sorted (key, value, flags) items.
    fn leaf(&mut self, items: &[(Vec<u8>, Vec<u8>, u32)]) -> u64 {
        let n = items.len();
        let mut body = vec![0u8; n * ELEM];
        let mut data = Vec::new();
        for (i, (k, v, f)) in items.iter().enumerate() {
            let pos = (n * ELEM + data.len() - i * ELEM) as u32;
            let e = &mut body[i * ELEM..(i + 1) * ELEM];
            e[0..4].copy_from_slice(&f.to_le_bytes());
            e[4..8].copy_from_slice(&pos.to_le_bytes());
            e[8..12].copy_from_slice(&(k.len() as u32).to_le_bytes());
            e[12..16].copy_from_slice(&(v.len() as u32).to_le_bytes());
            data.extend_from_slice(k);
            data.extend_from_slice(v);
        }
        body.extend_from_slice(&data);
        self.page(LEAF, n as u16, &body)
    }

    /// Writes a branch page over (first key, child page) pairs.
    fn branch(&mut self, children: &[(Vec<u8>, u64)]) -> u64 {
        let n = children.len();
        let mut body = vec![0u8; n * ELEM];
        let mut data = Vec::new();
        for (i, (k, pgid)) in children.iter().enumerate() {
            let pos = (n * ELEM + data.len() - i * ELEM) as u32;
            let e = &mut body[i * ELEM..(i + 1) * ELEM];
            e[0..4].copy_from_slice(&pos.to_le_bytes());
            e[4..8].copy_from_slice(&(k.len() as u32).to_le_bytes());
            e[8..16].copy_from_slice(&pgid.to_le_bytes());
            data.extend_from_slice(k);
        }
        body.extend_from_slice(&data);
        self.page(BRANCH, n as u16, &body)
    }

    /// Writes a whole B+tree of sorted items; returns its root page.
    fn tree(&mut self, items: &[(Vec<u8>, Vec<u8>, u32)]) -> u64 {
        // Leaves: fill each up to one page (a lone oversized item gets overflow pages).
        let mut level: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut start = 0;
        while start < items.len() || (items.is_empty() && level.is_empty()) {
            let mut size = PAGE_HEADER;
            let mut end = start;
            while end < items.len() {
                let add = ELEM + items[end].0.len() + items[end].1.len();
                if end > start && size + add > PAGE {
                    break;
                }
                size += add;
                end += 1;
            }
            let id = self.leaf(&items[start..end]);
            level.push((items.get(start).map(|i| i.0.clone()).unwrap_or_default(), id));
            start = end;
            if items.is_empty() {
                break;
            }
        }
        // Branch levels until one root remains.
        while level.len() > 1 {
            let mut next = Vec::new();
            let mut i = 0;
            while i < level.len() {
                let mut size = PAGE_HEADER;
                let mut j = i;
                while j < level.len() && (j == i || size + ELEM + level[j].0.len() <= PAGE) {
                    size += ELEM + level[j].0.len();
                    j += 1;
                }
                let id = self.branch(&level[i..j]);
                next.push((level[i].0.clone(), id));
                i = j;
            }
            level = next;
        }
        level[0].1
    }
}

fn rev_key(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&(main as u64).to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&(sub as u64).to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

fn fnv64a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Encodes the whole MVCC history (every retained version) as an etcd backend file.
pub fn encode(mvcc: &Mvcc, consistent_index: u64) -> Vec<u8> {
    // Revision-ordered versions; sub-revisions number the keys written in one revision.
    let mut versions: Vec<(i64, &[u8], &crate::mvcc::Version)> = Vec::new();
    for (k, vs) in mvcc.keys() {
        for v in vs {
            versions.push((v.mod_rev, k.as_ref(), v));
        }
    }
    versions.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut items = Vec::with_capacity(versions.len());
    let mut sub = 0;
    let mut last_rev = 0;
    for (rev, key, v) in versions {
        sub = if rev == last_rev { sub + 1 } else { 0 };
        last_rev = rev;
        let kv = mvccpb::KeyValue {
            key: bytes::Bytes::copy_from_slice(key),
            create_revision: v.create_rev,
            mod_revision: v.mod_rev,
            version: v.version,
            value: v.value.clone(),
            lease: v.lease,
        };
        items.push((rev_key(rev, sub, v.is_tombstone()), kv.encode_to_vec(), 0u32));
    }
    let mut meta_items: Vec<(Vec<u8>, Vec<u8>, u32)> = vec![
        (b"consistent_index".to_vec(), consistent_index.to_be_bytes().to_vec(), 0),
        (b"finishedCompactRev".to_vec(), rev_key(mvcc.compact_rev(), 0, false), 0),
    ];
    meta_items.sort();

    let mut w = Writer { pages: vec![0u8; 3 * PAGE] };
    // Page 2: an empty freelist.
    {
        let p = &mut w.pages[2 * PAGE..3 * PAGE];
        p[0..8].copy_from_slice(&2u64.to_le_bytes());
        p[8..10].copy_from_slice(&FREELIST.to_le_bytes());
    }
    // Reserve page 3 for the root leaf by writing the bucket trees after it.
    w.pages.resize(4 * PAGE, 0);
    let key_root = w.tree(&items);
    let meta_root = w.tree(&meta_items);
    let bucket = |root: u64| {
        let mut v = root.to_le_bytes().to_vec();
        v.extend_from_slice(&0u64.to_le_bytes());
        v
    };
    let root_items = vec![(b"key".to_vec(), bucket(key_root), BUCKET_LEAF_FLAG), (b"meta".to_vec(), bucket(meta_root), BUCKET_LEAF_FLAG)];
    // Write the root leaf into page 3 (it is small: two bucket headers).
    let mut tmp = Writer { pages: Vec::new() };
    tmp.leaf(&root_items);
    let mut root_page = tmp.pages;
    root_page[0..8].copy_from_slice(&3u64.to_le_bytes());
    w.pages[3 * PAGE..4 * PAGE].copy_from_slice(&root_page[..PAGE]);
    let hwm = w.next_pgid();
    for (pg, txid) in [(0u64, 1u64), (1, 2)] {
        let off = pg as usize * PAGE;
        let p = &mut w.pages[off..off + PAGE];
        p[0..8].copy_from_slice(&pg.to_le_bytes());
        p[8..10].copy_from_slice(&META.to_le_bytes());
        let m = &mut p[PAGE_HEADER..PAGE_HEADER + 64];
        m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        m[4..8].copy_from_slice(&2u32.to_le_bytes());
        m[8..12].copy_from_slice(&(PAGE as u32).to_le_bytes());
        m[12..16].copy_from_slice(&0u32.to_le_bytes());
        m[16..24].copy_from_slice(&3u64.to_le_bytes());
        m[24..32].copy_from_slice(&0u64.to_le_bytes());
        m[32..40].copy_from_slice(&2u64.to_le_bytes());
        m[40..48].copy_from_slice(&hwm.to_le_bytes());
        m[48..56].copy_from_slice(&txid.to_le_bytes());
        let sum = fnv64a(&m[0..56]);
        m[56..64].copy_from_slice(&sum.to_le_bytes());
    }
    w.pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn pages_are_consistent() {
        let mut m = Mvcc::new();
        for i in 0..2000 {
            let w = m.begin_write();
            m.put(w, Bytes::from(format!("key-{i:05}")), Bytes::from(vec![b'v'; 100]), 0);
            m.end_write(true);
        }
        let db = encode(&m, 2000);
        assert_eq!(db.len() % PAGE, 0);
        let hwm = u64::from_le_bytes(db[PAGE_HEADER + 40..PAGE_HEADER + 48].try_into().unwrap());
        assert_eq!(hwm as usize * PAGE, db.len());
        // Every page header carries its own id, and overflow pages are skipped over.
        let mut pg = 0usize;
        while pg < hwm as usize {
            let p = &db[pg * PAGE..];
            assert_eq!(u64::from_le_bytes(p[0..8].try_into().unwrap()), pg as u64);
            pg += 1 + u32::from_le_bytes(p[12..16].try_into().unwrap()) as usize;
        }
    }
}
