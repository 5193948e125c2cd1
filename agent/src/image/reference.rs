//! Image references as Docker and the CRI spell them: `busybox`, `busybox:1.36`,
//! `registry.local:5000/team/app@sha256:…`. A name without a registry is on Docker Hub
//! (`docker.io`), and a one-part Hub name is under `library/`.

use std::fmt;

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `registry.local:5000`, `127.0.0.1:5000`.
    pub registry: String,
    /// `library/busybox`, `team/app`.
    pub repository: String,
    /// The tag (`latest` when neither a tag nor a digest is given).
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

/// Why a reference is not one.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("couldn't parse image name {name:?}: {why}")]
pub struct BadReference {
    name: String,
    why: &'static str,
}

fn bad(name: &str, why: &'static str) -> BadReference {
    BadReference {
        name: name.to_string(),
        why,
    }
}

impl Reference {
    /// Parses and normalizes a reference, as upstream's `docker.io/distribution/reference`
    /// ParseNormalizedNamed does.
    pub fn parse(s: &str) -> Result<Reference, BadReference> {
        if s.is_empty() || s.len() > 4096 {
            return Err(bad(s, "empty or longer than 4096 bytes"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad(s, "only sha256 digests are supported"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(bad(s, "a sha256 digest is 64 lowercase hex digits"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[slash..].rfind(':') {
            Some(i) => (&rest[..slash + i], Some(rest[slash + i + 1..].to_string())),
            None => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad(s, "invalid tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if repository.is_empty() || !repository.split('/').all(component_ok) {
            return Err(bad(
                s,
                "repository name must be lowercase letters, digits and separators",
            ));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository` (what `RepoDigests` and `RepoTags` start with).
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The tag or digest to ask the registry's manifest endpoint for.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The host to connect to (Docker Hub's API is not at `docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_as_upstream() {
        let d = "sha256:".to_string() + &"a".repeat(64);
        let cases: &[(&str, &str)] = &[
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("team/app:v2", "docker.io/team/app:v2"),
            ("localhost/app", "localhost/app:latest"),
            ("127.0.0.1:5000/busybox:1", "127.0.0.1:5000/busybox:1"),
            (
                "registry.local:5000/a/b/c",
                "registry.local:5000/a/b/c:latest",
            ),
        ];
        for (i, want) in cases {
            assert_eq!(Reference::parse(i).unwrap().to_string(), *want, "{i}");
        }
        let r = Reference::parse(&format!("127.0.0.1:5000/busybox@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_ref(), d);
        let r = Reference::parse(&format!("busybox:1@{d}")).unwrap();
        assert_eq!(
            (r.tag.as_deref(), r.digest.as_deref()),
            (Some("1"), Some(d.as_str()))
        );
        assert_eq!(
            Reference::parse("busybox").unwrap().api_host(),
            "registry-1.docker.io"
        );
    }

    #[test]
    fn bad_references_are_refused() {
        for s in [
            "",
            "Busybox",
            "busybox:",
            "busybox@sha256:xyz",
            "busybox@md5:aa",
            "a//b",
            "busybox:-x",
            "-a",
        ] {
            assert!(Reference::parse(s).is_err(), "{s:?} accepted");
        }
    }
}
