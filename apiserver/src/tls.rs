//! The cluster CA, the serving certificate and the admin credential, kept in the data
//! directory: created on first start, reused after (so a kubeconfig keeps working across
//! restarts). The serving certificate is re-issued at every start for the current
//! addresses.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

/// What the server and its clients need.
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Bearer token of the admin user (written to the kubeconfig).
    pub admin_token: String,
    pub dir: PathBuf,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "shoal-ca");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p
}

pub(crate) fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).with_context(|| format!("while writing {}", tmp.display()))?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("while writing {}", path.display()))?;
    Ok(())
}

/// Loads the CA and admin token from `dir` (creating them on first use) and issues a
/// serving certificate for `hosts` (names and IP addresses).
pub fn load_or_create(dir: &Path, hosts: &[String]) -> anyhow::Result<Credentials> {
    std::fs::create_dir_all(dir).with_context(|| format!("while creating {}", dir.display()))?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let ca_keypair = if ca_key.exists() && ca_crt.exists() {
        let pem = std::fs::read_to_string(&ca_key).with_context(|| format!("while reading {}", ca_key.display()))?;
        KeyPair::from_pem(&pem).with_context(|| format!("{} is not a usable private key", ca_key.display()))?
    } else {
        let key = KeyPair::generate().context("while generating the CA key")?;
        let cert = ca_params().self_signed(&key).context("while signing the CA certificate")?;
        write_private(&ca_key, &key.serialize_pem())?;
        write_private(&ca_crt, &cert.pem())?;
        key
    };
    let ca_pem = std::fs::read_to_string(&ca_crt).with_context(|| format!("while reading {}", ca_crt.display()))?;
    // The issuer is rebuilt from the same distinguished name and key: certificates it
    // signs chain to the stored CA certificate.
    let issuer = Issuer::new(ca_params(), ca_keypair);

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-apiserver");
    params.distinguished_name = dn;
    let mut sans = Vec::new();
    for h in hosts {
        match h.parse::<IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(h.clone().try_into().with_context(|| format!("{h:?} is not a valid DNS name"))?)),
        }
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let key = KeyPair::generate().context("while generating the serving key")?;
    let cert = params.signed_by(&key, &issuer).context("while signing the serving certificate")?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    write_private(&dir.join("apiserver.crt"), &cert_pem)?;
    write_private(&dir.join("apiserver.key"), &key_pem)?;

    let token_file = dir.join("admin.token");
    let admin_token = match std::fs::read_to_string(&token_file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let t = crate::meta::random_hex(32);
            write_private(&token_file, &t)?;
            t
        }
    };
    Ok(Credentials { ca_pem, cert_pem, key_pem, admin_token, dir: dir.to_path_buf() })
}

impl Credentials {
    /// A rustls server configuration offering HTTP/2 and HTTP/1.1.
    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let certs: Vec<rustls::pki_types::CertificateDer<'static>> = pem_blocks(&self.cert_pem, "CERTIFICATE")
            .into_iter()
            .map(rustls::pki_types::CertificateDer::from)
            .collect();
        let key_der = pem_blocks(&self.key_pem, "PRIVATE KEY").into_iter().next().context("the serving key PEM holds no PRIVATE KEY block")?;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key_der.into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("while choosing TLS versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("while loading the serving certificate")?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A kubeconfig for the admin user against `server` (`https://host:port`).
    pub fn kubeconfig(&self, server: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: shoal\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: shoal-admin\n  user:\n    token: {}\ncontexts:\n- name: shoal\n  context:\n    cluster: shoal\n    user: shoal-admin\n    namespace: default\ncurrent-context: shoal\npreferences: {{}}\n",
            self.admin_token
        )
    }

    /// Writes the admin kubeconfig to `path` (mode 0600).
    pub fn write_kubeconfig(&self, path: &Path, server: &str) -> anyhow::Result<()> {
        write_private(path, &self.kubeconfig(server))
    }
}

/// The DER contents of every `-----BEGIN <label>-----` block of a PEM text.
fn pem_blocks(pem: &str, label: &str) -> Vec<Vec<u8>> {
    let (begin, end) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(i) = rest.find(&begin) {
        let after = &rest[i + begin.len()..];
        let Some(j) = after.find(&end) else { break };
        let b64: String = after[..j].chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64) {
            out.push(der);
        }
        rest = &after[j + end.len()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_persist_and_build_a_server_config() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let b = load_or_create(dir.path(), &["localhost".into()]).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem, "the CA is created once");
        assert_eq!(a.admin_token, b.admin_token);
        assert_eq!(a.admin_token.len(), 64);
        a.server_config().unwrap();
        assert!(a.kubeconfig("https://127.0.0.1:6443").contains("certificate-authority-data: "));
    }
}
