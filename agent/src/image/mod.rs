//! The node's image store: images pulled from registries or imported from tarballs, kept
//! content-addressed (a layer shared by many images is unpacked once), each layer unpacked
//! into a directory that overlayfs stacks into a container's root.
//!
//! On disk, under the store's root:
//! - `blobs/sha256/<hex>`: manifests and image configs (small; layer blobs are unpacked and
//!   dropped),
//! - `layers/<diff id hex>/`: unpacked layers,
//! - `images.json`: the images (names, digests, layers, config), replaced atomically.

pub mod reference;
pub mod registry;
pub mod unpack;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use reference::Reference;
pub use registry::{Credentials, Registry, RegistryError};
use unpack::hex;

/// What a container started from an image runs, unless the pod says otherwise.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// One image in the store.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Image {
    /// The config digest (`sha256:…`), the image ID.
    pub id: String,
    /// `docker.io/library/busybox:1.36`
    pub repo_tags: Vec<String>,
    /// `docker.io/library/busybox@sha256:<manifest digest>`
    pub repo_digests: Vec<String>,
    /// Diff IDs, lowest layer first.
    pub layers: Vec<String>,
    /// Bytes of the layers as shipped.
    pub size: u64,
    pub config: ImageConfig,
    /// When it came to the node (Unix seconds; 0 for images recorded before this field).
    #[serde(default)]
    pub added: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] reference::BadReference),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn invalid(m: impl Into<String>) -> ImageError {
    ImageError::Invalid(m.into())
}

#[derive(Default, Serialize, Deserialize)]
struct Index {
    images: Vec<Image>,
}

/// The store.
pub struct ImageStore {
    root: PathBuf,
    index: Mutex<Index>,
    registry: Registry,
    /// One pull per reference at a time; others wait for it.
    pulls: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped whenever the image list changes.
    generation: std::sync::atomic::AtomicU64,
}

/// A manifest's parts.
struct Manifest {
    config: String,
    layers: Vec<(String, u64)>,
}

fn parse_manifest(body: &[u8]) -> Result<Manifest, ImageError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("undecodable manifest: {e}")))?;
    let config = v["config"]["digest"]
        .as_str()
        .ok_or_else(|| {
            invalid("manifest has no config digest (schema 1 manifests are not supported)")
        })?
        .to_string();
    let layers = v["layers"]
        .as_array()
        .ok_or_else(|| invalid("manifest has no layers"))?
        .iter()
        .map(|l| {
            Ok((
                l["digest"]
                    .as_str()
                    .ok_or_else(|| invalid("layer without digest"))?
                    .to_string(),
                l["size"].as_u64().unwrap_or(0),
            ))
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    for (d, _) in layers.iter().chain([(config.clone(), 0)].iter()) {
        check_digest(d)?;
    }
    Ok(Manifest { config, layers })
}

fn check_digest(d: &str) -> Result<&str, ImageError> {
    match d.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(h),
        _ => Err(invalid(format!("unsupported digest {d:?} (sha256 only)"))),
    }
}

/// Picks linux/amd64 from an image index; None when `body` is not an index.
fn pick_platform(body: &[u8]) -> Option<Result<String, ImageError>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let ms = v["manifests"].as_array()?;
    if v.get("layers").is_some() {
        return None;
    }
    let pick = ms
        .iter()
        .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")
        .or_else(|| ms.iter().find(|m| m.get("platform").is_none()));
    Some(
        pick.and_then(|m| m["digest"].as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                invalid("no matching manifest for linux/amd64 in the manifest list entries")
            }),
    )
}

fn image_config(body: &[u8]) -> Result<(ImageConfig, Vec<String>), ImageError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("undecodable image config: {e}")))?;
    let strs = |x: &Value| {
        x.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let c = &v["config"];
    let diff_ids: Vec<String> = strs(&v["rootfs"]["diff_ids"]);
    for d in &diff_ids {
        check_digest(d)?;
    }
    Ok((
        ImageConfig {
            entrypoint: strs(&c["Entrypoint"]),
            cmd: strs(&c["Cmd"]),
            env: strs(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
            user: c["User"].as_str().unwrap_or_default().to_string(),
        },
        diff_ids,
    ))
}

fn sha256_file(p: &Path) -> io::Result<String> {
    let mut h = Sha256::new();
    io::copy(&mut fs::File::open(p)?, &mut h)?;
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

impl ImageStore {
    /// Opens (or creates) the store at `root`.
    pub fn open(root: &Path, insecure_registries: Vec<String>) -> Result<ImageStore, ImageError> {
        fs::create_dir_all(root.join("blobs/sha256"))?;
        fs::create_dir_all(root.join("layers"))?;
        fs::create_dir_all(root.join("tmp"))?;
        // Left-overs of an interrupted pull or import.
        for e in fs::read_dir(root.join("tmp"))?.flatten() {
            let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
        }
        let index = match fs::read(root.join("images.json")) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| invalid(format!("{}: {e}", root.join("images.json").display())))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Index::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(ImageStore {
            root: root.to_path_buf(),
            index: Mutex::new(index),
            registry: Registry::new(insecure_registries),
            pulls: Mutex::new(HashMap::new()),
            // Starts above 0 so the first node status carries the images.
            generation: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// A number that changes whenever an image is added or removed.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn save(&self, idx: &Index) -> io::Result<()> {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.root.join("images.json.tmp");
        fs::write(&tmp, serde_json::to_vec(idx)?)?;
        fs::File::open(&tmp)?.sync_all()?;
        fs::rename(tmp, self.root.join("images.json"))
    }

    /// The image a reference (`busybox`, `name@digest`, an image ID) names, if present.
    pub fn get(&self, name: &str) -> Option<Image> {
        let idx = self.index.lock();
        if let Some(i) = idx
            .images
            .iter()
            .find(|i| i.id == name || i.id.strip_prefix("sha256:") == Some(name))
        {
            return Some(i.clone());
        }
        let r = Reference::parse(name).ok()?;
        idx.images
            .iter()
            .find(|i| match &r.digest {
                Some(d) => i.repo_digests.contains(&format!("{}@{d}", r.name())),
                None => i.repo_tags.contains(&r.to_string()),
            })
            .cloned()
    }

    /// All images.
    pub fn list(&self) -> Vec<Image> {
        self.index.lock().images.clone()
    }

    /// Directories of the image's layers, top layer first (overlayfs' `lowerdir` order).
    pub fn layer_dirs(&self, img: &Image) -> Vec<PathBuf> {
        img.layers.iter().rev().map(|d| self.layer_dir(d)).collect()
    }

    fn layer_dir(&self, diff_id: &str) -> PathBuf {
        self.root
            .join("layers")
            .join(diff_id.trim_start_matches("sha256:"))
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        self.root.join("tmp").join(format!("{what}-{}", random_hex(8)))
    }

    /// Stores a small blob under its digest after checking it.
    fn put_blob(&self, digest: &str, body: &[u8]) -> Result<(), ImageError> {
        let h = check_digest(digest)?;
        let got = format!("sha256:{}", hex(&Sha256::digest(body)));
        if got != digest {
            return Err(RegistryError::Digest {
                digest: digest.into(),
                got,
            }
            .into());
        }
        let p = self.root.join("blobs/sha256").join(h);
        if !p.exists() {
            let tmp = self.tmp_path("blob");
            fs::write(&tmp, body)?;
            fs::rename(tmp, p)?;
        }
        Ok(())
    }

    /// Stores a manifest's image config and reads it, checking that it lists as many
    /// layers as the manifest.
    fn config_of(&self, m: &Manifest, cfg: &[u8]) -> Result<(ImageConfig, Vec<String>), ImageError> {
        self.put_blob(&m.config, cfg)?;
        let (config, diff_ids) = image_config(cfg)?;
        if diff_ids.len() != m.layers.len() {
            return Err(invalid(format!("manifest has {} layers but the config {}", m.layers.len(), diff_ids.len())));
        }
        Ok((config, diff_ids))
    }

    /// Unpacks a layer blob (already digest-checked) unless its diff ID is present.
    fn add_layer(&self, blob: &Path, want_diff_id: &str) -> Result<(), ImageError> {
        let dest = self.layer_dir(want_diff_id);
        if dest.exists() {
            return Ok(());
        }
        let staged = self.tmp_path("layer");
        let got = unpack::unpack_layer(blob, &staged)?;
        if got != want_diff_id {
            let _ = fs::remove_dir_all(&staged);
            return Err(invalid(format!(
                "layer diff ID {got} does not match the image config's {want_diff_id}"
            )));
        }
        if let Err(e) = fs::rename(&staged, &dest) {
            // Another pull of an image sharing the layer got there first.
            let _ = fs::remove_dir_all(&staged);
            if !dest.exists() {
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Records an image (merging names with an existing one of the same ID).
    fn record(&self, mut img: Image) -> Result<Image, ImageError> {
        let mut idx = self.index.lock();
        // A tag moves to the new image.
        for other in idx.images.iter_mut() {
            if other.id != img.id {
                other.repo_tags.retain(|t| !img.repo_tags.contains(t));
            }
        }
        if let Some(old) = idx.images.iter_mut().find(|i| i.id == img.id) {
            for t in img.repo_tags.drain(..) {
                if !old.repo_tags.contains(&t) {
                    old.repo_tags.push(t);
                }
            }
            for d in img.repo_digests.drain(..) {
                if !old.repo_digests.contains(&d) {
                    old.repo_digests.push(d);
                }
            }
            img = old.clone();
        } else {
            img.added = shoal_client::time::now_secs();
            idx.images.push(img.clone());
        }
        self.save(&idx)?;
        Ok(img)
    }

    /// Pulls `name` from its registry (or returns it when present and `always` is false).
    pub async fn pull(
        &self,
        name: &str,
        creds: Option<&Credentials>,
        always: bool,
    ) -> Result<Image, ImageError> {
        let r = Reference::parse(name)?;
        if !always {
            if let Some(i) = self.get(name) {
                return Ok(i);
            }
        }
        let lock = self.pulls.lock().entry(r.to_string()).or_default().clone();
        let _one = lock.lock().await;
        if !always {
            if let Some(i) = self.get(name) {
                return Ok(i);
            }
        }
        let mut token = None;
        let (_, mut body, mut digest) = self
            .registry
            .manifest(&r, r.manifest_ref(), creds, &mut token)
            .await?;
        if let Some(pick) = pick_platform(&body) {
            let d = pick?;
            (_, body, digest) = self.registry.manifest(&r, &d, creds, &mut token).await?;
        }
        let m = parse_manifest(&body)?;
        self.put_blob(&digest, &body)?;
        let cfg_path = self.tmp_path("config");
        self.registry
            .blob_to_file(&r, &m.config, &cfg_path, creds, &mut token)
            .await?;
        let cfg = fs::read(&cfg_path)?;
        let _ = fs::remove_file(&cfg_path);
        let (config, diff_ids) = self.config_of(&m, &cfg)?;
        for ((blob, _), diff) in m.layers.iter().zip(&diff_ids) {
            if self.layer_dir(diff).exists() {
                continue;
            }
            let p = self.tmp_path("blob");
            let res = self
                .registry
                .blob_to_file(&r, blob, &p, creds, &mut token)
                .await;
            let res = match res {
                // Unpacking is disk work: tell the scheduler this thread blocks.
                Ok(_) => blocking(|| self.add_layer(&p, diff)),
                Err(e) => Err(e.into()),
            };
            let _ = fs::remove_file(&p);
            res?;
        }
        let mut tags = vec![];
        if r.tag.is_some() && r.digest.is_none() {
            tags.push(r.to_string());
        }
        let img = Image {
            id: m.config,
            repo_tags: tags,
            repo_digests: vec![format!("{}@{digest}", r.name())],
            layers: diff_ids,
            size: m.layers.iter().map(|l| l.1).sum::<u64>() + cfg.len() as u64,
            config,
            added: 0,
        };
        self.record(img)
    }

    /// Imports an OCI layout (directory or tarball) or a docker-archive tarball (as written
    /// by `docker save`/`skopeo copy … docker-archive:`). `name` names an image whose
    /// archive carries only a tag or no name. Returns the images imported.
    pub fn import(&self, path: &Path, name: Option<&str>) -> Result<Vec<Image>, ImageError> {
        let staged;
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            staged = self.tmp_path("import");
            fs::create_dir_all(&staged)?;
            let f = fs::File::open(path)
                .map_err(|e| invalid(format!("open {}: {e}", path.display())))?;
            let mut ar = tar::Archive::new(io::BufReader::new(f));
            ar.unpack(&staged).map_err(|e| {
                invalid(format!(
                    "{} is not a readable tar archive: {e}",
                    path.display()
                ))
            })?;
            staged.clone()
        };
        let res = if dir.join("oci-layout").exists() {
            self.import_oci(&dir, name)
        } else if dir.join("manifest.json").exists() {
            self.import_docker(&dir, name)
        } else {
            Err(invalid(format!("{} is neither an OCI layout (no oci-layout file) nor a docker-archive (no manifest.json)", path.display())))
        };
        if dir != path {
            let _ = fs::remove_dir_all(&dir);
        }
        res
    }

    fn name_for(
        &self,
        given: Option<&str>,
        annotated: Option<&str>,
    ) -> Result<Option<Reference>, ImageError> {
        let n = match (given, annotated) {
            (Some(g), _) => g.to_string(),
            (None, Some(a)) if a.contains(['/', ':']) => a.to_string(),
            (None, Some(a)) => return Err(invalid(format!("the archive names its image only by the tag {a:?}; give the image name (shoal image import --name REPO:{a} FILE)"))),
            (None, None) => return Ok(None),
        };
        Ok(Some(Reference::parse(&n)?))
    }

    fn import_oci(&self, dir: &Path, name: Option<&str>) -> Result<Vec<Image>, ImageError> {
        let blob = |d: &str| -> Result<PathBuf, ImageError> {
            Ok(dir.join("blobs/sha256").join(check_digest(d)?))
        };
        let index: Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)
            .map_err(|e| invalid(format!("index.json: {e}")))?;
        let mut out = vec![];
        for desc in index["manifests"].as_array().into_iter().flatten() {
            let ann = &desc["annotations"];
            let annotated = ann["io.containerd.image.name"]
                .as_str()
                .or(ann["org.opencontainers.image.ref.name"].as_str());
            let r = self.name_for(name, annotated)?;
            let mut digest = desc["digest"]
                .as_str()
                .ok_or_else(|| invalid("index.json entry without digest"))?
                .to_string();
            let mut body = fs::read(blob(&digest)?)?;
            if let Some(pick) = pick_platform(&body) {
                digest = pick?;
                body = fs::read(blob(&digest)?)?;
            }
            self.put_blob(&digest, &body)?;
            let m = parse_manifest(&body)?;
            let cfg = fs::read(blob(&m.config)?)?;
            let (config, diff_ids) = self.config_of(&m, &cfg)?;
            for ((l, _), diff) in m.layers.iter().zip(&diff_ids) {
                let p = blob(l)?;
                let got = sha256_file(&p)?;
                if &got != l {
                    return Err(RegistryError::Digest {
                        digest: l.clone(),
                        got,
                    }
                    .into());
                }
                self.add_layer(&p, diff)?;
            }
            let img = Image {
                id: m.config,
                repo_tags: r
                    .iter()
                    .filter(|r| r.digest.is_none())
                    .map(|r| r.to_string())
                    .collect(),
                repo_digests: r.iter().map(|r| format!("{}@{digest}", r.name())).collect(),
                layers: diff_ids,
                size: m.layers.iter().map(|l| l.1).sum::<u64>() + cfg.len() as u64,
                config,
                added: 0,
            };
            out.push(self.record(img)?);
        }
        if out.is_empty() {
            return Err(invalid("the OCI layout's index.json lists no image"));
        }
        Ok(out)
    }

    fn import_docker(&self, dir: &Path, name: Option<&str>) -> Result<Vec<Image>, ImageError> {
        let manifest: Value = serde_json::from_slice(&fs::read(dir.join("manifest.json"))?)
            .map_err(|e| invalid(format!("manifest.json: {e}")))?;
        let safe = |p: &str| -> Result<PathBuf, ImageError> {
            if p.split('/').any(|c| c == "..") || p.starts_with('/') {
                return Err(invalid(format!(
                    "manifest.json names {p:?} outside the archive"
                )));
            }
            Ok(dir.join(p))
        };
        let mut out = vec![];
        for m in manifest.as_array().into_iter().flatten() {
            let cfg_path = safe(
                m["Config"]
                    .as_str()
                    .ok_or_else(|| invalid("manifest.json entry without Config"))?,
            )?;
            let cfg = fs::read(&cfg_path)?;
            let id = format!("sha256:{}", hex(&Sha256::digest(&cfg)));
            self.put_blob(&id, &cfg)?;
            let (config, diff_ids) = image_config(&cfg)?;
            let layers: Vec<&str> = m["Layers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_str())
                .collect();
            if layers.len() != diff_ids.len() {
                return Err(invalid(format!(
                    "manifest.json lists {} layers but the config {}",
                    layers.len(),
                    diff_ids.len()
                )));
            }
            let mut size = cfg.len() as u64;
            for (l, diff) in layers.iter().zip(&diff_ids) {
                let p = safe(l)?;
                size += fs::metadata(&p)?.len();
                self.add_layer(&p, diff)?;
            }
            let tags: Vec<&str> = m["RepoTags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str())
                .collect();
            let mut repo_tags = vec![];
            match name {
                Some(n) => repo_tags.push(Reference::parse(n)?.to_string()),
                None => {
                    for t in tags {
                        repo_tags.push(Reference::parse(t)?.to_string());
                    }
                }
            }
            out.push(self.record(Image {
                id,
                repo_tags,
                repo_digests: vec![],
                layers: diff_ids,
                size,
                config,
                added: 0,
            })?);
        }
        if out.is_empty() {
            return Err(invalid("manifest.json lists no image"));
        }
        Ok(out)
    }

    /// Removes an image (its layers stay while another image uses them).
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        let img = self
            .get(name)
            .ok_or_else(|| invalid(format!("no such image: {name}")))?;
        let mut idx = self.index.lock();
        idx.images.retain(|i| i.id != img.id);
        let used: std::collections::HashSet<&String> =
            idx.images.iter().flat_map(|i| i.layers.iter()).collect();
        for l in &img.layers {
            if !used.contains(l) {
                let _ = fs::remove_dir_all(self.layer_dir(l));
            }
        }
        let _ = fs::remove_file(
            self.root
                .join("blobs/sha256")
                .join(img.id.trim_start_matches("sha256:")),
        );
        self.save(&idx)?;
        Ok(())
    }

    /// Bytes used by unpacked layers (for image garbage collection by disk thresholds).
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Runs blocking work, moving other tasks off this thread on a multi-thread runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// `n` random bytes as hex (names of temporary files and containers; not secrets).
pub fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut b = vec![0u8; n];
    let _ = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    hex(&b)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes an OCI layout of a one-layer image holding `files` to `dir`; returns the
    /// layer's diff ID.
    pub fn oci_layout(dir: &Path, name: &str, files: &[(&str, &[u8])], cmd: &[&str]) -> String {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, p, *data).unwrap();
        }
        let raw = b.into_inner().unwrap();
        let diff = format!("sha256:{}", hex(&Sha256::digest(&raw)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &raw).unwrap();
        let layer = gz.finish().unwrap();
        let put = |body: &[u8]| {
            let d = hex(&Sha256::digest(body));
            fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
            fs::write(dir.join("blobs/sha256").join(&d), body).unwrap();
            (format!("sha256:{d}"), body.len())
        };
        let (ld, ls) = put(&layer);
        let cfg = serde_json::to_vec(&serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": cmd, "Env": ["PATH=/bin"]}, "rootfs": {"type": "layers", "diff_ids": [diff]}})).unwrap();
        let (cd, cs) = put(&cfg);
        let man = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs}, "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": ls}]})).unwrap();
        let (md, ms) = put(&man);
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        fs::write(dir.join("index.json"), serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": name}}]})).unwrap()).unwrap();
        diff
    }

    #[test]
    fn oci_layouts_import_from_a_directory_and_a_tarball() {
        let d = tempfile::tempdir().unwrap();
        let layout = d.path().join("layout");
        let diff = oci_layout(
            &layout,
            "127.0.0.1:5000/tools:1",
            &[("bin/hello", b"#!/bin/sh\necho hi\n")],
            &["/bin/hello"],
        );
        let store = ImageStore::open(&d.path().join("store"), vec![]).unwrap();
        let imgs = store.import(&layout, None).unwrap();
        assert_eq!(imgs[0].repo_tags, vec!["127.0.0.1:5000/tools:1"]);
        assert_eq!(imgs[0].layers, vec![diff.clone()]);
        assert_eq!(imgs[0].config.cmd, vec!["/bin/hello"]);
        let got = store.get("127.0.0.1:5000/tools:1").unwrap();
        assert_eq!(
            fs::read(store.layer_dirs(&got)[0].join("bin/hello")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert!(store.get(&got.repo_digests[0]).is_some(), "found by digest");
        assert!(store.get(&got.id).is_some(), "found by ID");
        // A tarball of the layout, with only a tag inside: refused without --name, named with it.
        let tar_path = d.path().join("img.tar");
        let mut b = tar::Builder::new(fs::File::create(&tar_path).unwrap());
        let layout2 = d.path().join("layout2");
        oci_layout(&layout2, "2", &[("bin/x", b"x")], &["/bin/x"]);
        b.append_dir_all(".", &layout2).unwrap();
        b.finish().unwrap();
        drop(b);
        let e = store.import(&tar_path, None).unwrap_err().to_string();
        assert!(e.contains("only by the tag \"2\""), "{e}");
        let imgs = store.import(&tar_path, Some("tools:2")).unwrap();
        assert_eq!(imgs[0].repo_tags, vec!["docker.io/library/tools:2"]);
        // Persisted.
        drop(store);
        let store = ImageStore::open(&d.path().join("store"), vec![]).unwrap();
        assert_eq!(store.list().len(), 2);
        store.remove("tools:2").unwrap();
        assert_eq!(store.list().len(), 1);
        assert!(store.get("127.0.0.1:5000/tools:1").is_some());
    }

    #[test]
    fn a_corrupt_layer_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let layout = d.path().join("layout");
        oci_layout(&layout, "x.io/a:1", &[("f", b"data")], &["/f"]);
        // Corrupt the largest blob that is gzip (the layer).
        for e in fs::read_dir(layout.join("blobs/sha256")).unwrap().flatten() {
            let b = fs::read(e.path()).unwrap();
            if b.starts_with(&[0x1f, 0x8b]) {
                let mut b = b;
                let n = b.len();
                b[n - 5] ^= 0xff;
                fs::write(e.path(), b).unwrap();
            }
        }
        let store = ImageStore::open(&d.path().join("store"), vec![]).unwrap();
        let e = store.import(&layout, None).unwrap_err().to_string();
        assert!(e.contains("unexpected commit digest"), "{e}");
        assert!(store.list().is_empty());
    }

    #[test]
    fn manifest_lists_pick_linux_amd64() {
        let idx = br#"{"manifests":[{"digest":"sha256:aa","platform":{"os":"linux","architecture":"arm64"}},{"digest":"sha256:bb","platform":{"os":"linux","architecture":"amd64"}}]}"#;
        assert_eq!(pick_platform(idx).unwrap().unwrap(), "sha256:bb");
        assert!(pick_platform(br#"{"config":{},"layers":[]}"#).is_none());
        let only_arm = br#"{"manifests":[{"digest":"sha256:aa","platform":{"os":"linux","architecture":"arm64"}}]}"#;
        assert!(pick_platform(only_arm).unwrap().is_err());
    }
}
