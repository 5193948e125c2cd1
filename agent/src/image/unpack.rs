//! Unpacks one image layer (a tar, gzip-compressed or not) into a directory that overlayfs
//! can use as a lower layer: OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) become overlay
//! whiteouts (a 0/0 character device, the `trusted.overlay.opaque` attribute). The
//! uncompressed stream is hashed on the way, giving the layer's diff ID.

use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Hashes what is read through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Hex of a SHA-256.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A layer's tar stream from its blob, by the blob's magic bytes.
fn decompressed(blob: &Path) -> io::Result<Box<dyn Read>> {
    let mut f = BufReader::new(fs::File::open(blob)?);
    let mut magic = [0u8; 4];
    let n = {
        let buf = io::BufRead::fill_buf(&mut f)?;
        let n = buf.len().min(4);
        magic[..n].copy_from_slice(&buf[..n]);
        n
    };
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        return Ok(Box::new(flate2::read::MultiGzDecoder::new(f)));
    }
    if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "zstd-compressed layers are not supported (gzip and uncompressed are)",
        ));
    }
    Ok(Box::new(f))
}

/// The path of an entry inside `root`, refusing anything that would leave it.
fn inside(root: &Path, p: &Path) -> io::Result<PathBuf> {
    let mut out = root.to_path_buf();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("layer entry {} leaves the layer", p.display()),
                ))
            }
        }
    }
    Ok(out)
}

/// Unpacks `blob` into `dest` (which must not exist yet; it is created through a temporary
/// sibling and renamed, so a crash never leaves a half layer under the final name).
/// Returns the diff ID (`sha256:` of the uncompressed tar).
pub fn unpack_layer(blob: &Path, dest: &Path) -> io::Result<String> {
    let tmp = dest.with_extension("partial");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let mut reader = Hashing {
        inner: decompressed(blob)?,
        hash: Sha256::new(),
    };
    {
        let mut ar = tar::Archive::new(&mut reader);
        ar.set_preserve_permissions(true);
        ar.set_preserve_ownerships(true);
        ar.set_unpack_xattrs(true);
        ar.set_overwrite(true);
        ar.set_preserve_mtime(true);
        for entry in ar.entries()? {
            let mut e = entry?;
            let path = e.path()?.into_owned();
            let Some(fname) = path.file_name().and_then(|f| f.to_str()) else {
                continue;
            };
            if fname == ".wh..wh..opq" {
                let dir = inside(&tmp, path.parent().unwrap_or(Path::new("")))?;
                fs::create_dir_all(&dir)?;
                rustix::fs::setxattr(
                    &dir,
                    "trusted.overlay.opaque",
                    b"y",
                    rustix::fs::XattrFlags::empty(),
                )?;
                continue;
            }
            if let Some(hidden) = fname.strip_prefix(".wh.") {
                let parent = inside(&tmp, path.parent().unwrap_or(Path::new("")))?;
                fs::create_dir_all(&parent)?;
                let target = parent.join(hidden);
                let _ = fs::remove_dir_all(&target).or_else(|_| fs::remove_file(&target));
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &target,
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )?;
                continue;
            }
            e.unpack_in(&tmp)?;
        }
    }
    // Drain the tar padding so the hash covers the whole stream.
    io::copy(&mut reader, &mut io::sink())?;
    let diff_id = format!("sha256:{}", hex(&reader.hash.finalize()));
    let _ = fs::remove_dir_all(dest);
    fs::rename(&tmp, dest)?;
    Ok(diff_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            if p.ends_with('/') {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            } else {
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts_and_diff_id_is_the_uncompressed_hash() {
        let dir = tempfile::tempdir().unwrap();
        let raw = tar_of(&[
            ("etc/", b""),
            ("etc/passwd", b"root:x:0:0"),
            ("etc/.wh.shadow", b""),
            ("var/.wh..wh..opq", b""),
            ("var/new", b"x"),
        ]);
        let want = format!("sha256:{}", hex(&Sha256::digest(&raw)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &raw).unwrap();
        let blob = dir.path().join("blob");
        fs::write(&blob, gz.finish().unwrap()).unwrap();
        let dest = dir.path().join("layer");
        assert_eq!(unpack_layer(&blob, &dest).unwrap(), want);
        assert_eq!(fs::read(dest.join("etc/passwd")).unwrap(), b"root:x:0:0");
        assert!(fs::symlink_metadata(dest.join("etc/shadow"))
            .unwrap()
            .file_type()
            .is_char_device());
        assert_eq!(
            rustix::fs::getxattr(dest.join("var"), "trusted.overlay.opaque", &mut [0u8; 4])
                .unwrap(),
            1
        );
        assert!(!dest.with_extension("partial").exists());
        // Uncompressed layers unpack too.
        fs::write(&blob, &raw).unwrap();
        assert_eq!(
            unpack_layer(&blob, &dir.path().join("layer2")).unwrap(),
            want
        );
    }

    #[test]
    fn entries_leaving_the_layer_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = tar_of(&[("a", b"x")]);
        // Rewrite the name field of the first header to a whiteout that climbs out.
        let name = b"../../.wh.etc";
        raw[..100].fill(0);
        raw[..name.len()].copy_from_slice(name);
        let mut h = tar::Header::from_byte_slice(&raw[..512]).clone();
        h.set_cksum();
        raw[..512].copy_from_slice(h.as_bytes());
        let blob = dir.path().join("blob");
        fs::write(&blob, &raw).unwrap();
        assert!(unpack_layer(&blob, &dir.path().join("l")).is_err());
    }
}
