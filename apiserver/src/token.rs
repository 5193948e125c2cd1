//! Service account tokens (`serviceaccounts/<name>/token`, what `kubectl create token`
//! calls): JWTs signed ES256 with a key kept in the data directory, bound to the service
//! account (and optionally a pod or secret) and an expiry, with upstream's claims. Checking
//! such tokens on requests is the authentication work of the next issue.

use std::path::Path;

use anyhow::Context;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

use crate::status::{ApiError, FieldError};

/// The issuer and default audience of tokens (upstream's default).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The signing key.
pub struct Signer {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.kid)
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl Signer {
    /// Loads `dir/sa.key` (PKCS#8, PEM), creating it on first use.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Signer> {
        let path = dir.join("sa.key");
        let pem = match std::fs::read_to_string(&path) {
            Ok(p) => p,
            Err(_) => {
                let k = rcgen::KeyPair::generate().context("while generating the service account key")?;
                let pem = k.serialize_pem();
                crate::tls::write_private(&path, &pem)?;
                pem
            }
        };
        let b64body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(b64body).context("sa.key is not PEM")?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng).map_err(|e| anyhow::anyhow!("sa.key is not a P-256 PKCS#8 key: {e}"))?;
        let kid = b64(&ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref()).as_ref()[..16]);
        Ok(Signer { key, kid, rng })
    }

    /// A signed JWT with these claims.
    pub fn sign(&self, claims: &Value) -> Result<String, ApiError> {
        let header = json!({"alg": "ES256", "kid": self.kid});
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let sig = self.key.sign(&self.rng, input.as_bytes()).map_err(|_| ApiError::internal("signing the token failed"))?;
        Ok(format!("{input}.{}", b64(sig.as_ref())))
    }

    /// The claims of a token this signer issued, if its signature is valid and it has not
    /// expired at `now` (unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Option<Value> {
        use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
        let mut parts = token.rsplitn(2, '.');
        let (sig, input) = (parts.next()?, parts.next()?);
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).ok()?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.key.public_key().as_ref()).verify(input.as_bytes(), &sig).ok()?;
        let (_, claims) = input.split_once('.')?;
        let claims: Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).ok()?).ok()?;
        (claims.get("exp").and_then(Value::as_i64)? > now).then_some(claims)
    }
}

/// Validates a TokenRequest and returns (audiences, expiration seconds, bound object).
pub fn check_request(req: &Value, sa: &str) -> Result<(Vec<String>, i64, Option<Value>), ApiError> {
    let spec = req.get("spec").cloned().unwrap_or(json!({}));
    let mut errs = Vec::new();
    let exp = spec.get("expirationSeconds").and_then(Value::as_i64).unwrap_or(3600);
    if exp < 600 {
        errs.push(FieldError::invalid("spec.expirationSeconds", exp, "may not specify a duration less than 10 minutes"));
    }
    if exp > 1 << 32 {
        errs.push(FieldError::too_long("spec.expirationSeconds", 1 << 32));
    }
    let auds: Vec<String> = spec.get("audiences").and_then(Value::as_array).map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default();
    let bound = spec.get("boundObjectRef").filter(|b| !b.is_null()).cloned();
    if let Some(b) = &bound {
        let kind = b.get("kind").and_then(Value::as_str).unwrap_or("");
        if !matches!(kind, "Pod" | "Secret" | "Node") {
            errs.push(FieldError::not_supported("spec.boundObjectRef.kind", kind, &["Pod", "Secret", "Node"]));
        }
        if b.get("name").and_then(Value::as_str).unwrap_or("").is_empty() {
            errs.push(FieldError::required("spec.boundObjectRef.name", ""));
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid("TokenRequest", "authentication.k8s.io", sa, &errs));
    }
    Ok((if auds.is_empty() { vec![ISSUER.to_string()] } else { auds }, exp, bound))
}

/// The claims of a service account token (upstream's private `kubernetes.io` claim).
pub fn claims(ns: &str, sa: &Value, auds: &[String], exp_secs: i64, bound: Option<(&str, &str, &str)>, now: i64) -> Value {
    let name = sa.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    let uid = sa.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("");
    let mut k8s = json!({"namespace": ns, "serviceaccount": {"name": name, "uid": uid}});
    if let Some((kind, bname, buid)) = bound {
        k8s[kind.to_lowercase()] = json!({"name": bname, "uid": buid});
    }
    json!({
        "aud": auds,
        "exp": now + exp_secs,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "jti": crate::meta::new_uid(),
        "kubernetes.io": k8s,
        "sub": format!("system:serviceaccount:{ns}:{name}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn verify_accepts_its_own_tokens_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Signer::load_or_create(dir.path()).unwrap();
        let t = s.sign(&json!({"sub": "system:node:n1", "exp": 2_000})).unwrap();
        assert_eq!(s.verify(&t, 1_000).unwrap()["sub"], "system:node:n1");
        assert!(s.verify(&t, 2_000).is_none(), "expired");
        let mut bad = t.clone().into_bytes();
        let i = t.find('.').unwrap() + 3;
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        assert!(s.verify(std::str::from_utf8(&bad).unwrap(), 1_000).is_none(), "tampered claims");
        let other = Signer::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert!(other.verify(&t, 1_000).is_none(), "another signer's token");
        assert!(s.verify("not.a.token", 1_000).is_none());
    }

    #[test]
    fn tokens_verify_with_the_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Signer::load_or_create(dir.path()).unwrap();
        let again = Signer::load_or_create(dir.path()).unwrap();
        assert_eq!(s.kid, again.kid, "the key persists");
        let c = claims("ns", &json!({"metadata": {"name": "default", "uid": "u"}}), &[ISSUER.into()], 3600, Some(("Pod", "p", "pu")), 1_000);
        assert_eq!(c["sub"], "system:serviceaccount:ns:default");
        assert_eq!(c["kubernetes.io"]["pod"]["uid"], "pu");
        let t = s.sign(&c).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let pk = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, s.key.public_key().as_ref());
        pk.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig).unwrap();
        let (auds, exp, _) = check_request(&json!({"spec": {}}), "default").unwrap();
        assert_eq!((auds, exp), (vec![ISSUER.to_string()], 3600));
        assert_eq!(check_request(&json!({"spec": {"expirationSeconds": 60}}), "default").unwrap_err().code, 422);
    }
}
