//! VolumeBinding: a pod's PersistentVolumeClaims constrain its node. A bound claim's
//! volume may be tied to nodes (local volumes: node affinity); an unbound claim of a
//! WaitForFirstConsumer class needs either an Available volume of its class usable from
//! the node or a provisioner; an unbound claim of an Immediate class makes the pod wait
//! (the binder binds it first). Upstream's messages. After the node is chosen the driver
//! writes `volume.kubernetes.io/selected-node` on the unbound claims and waits for the
//! binder before it binds the pod (upstream's PreBind).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use super::Ctx;
use crate::model::{Interner, PodInfo, Term};

/// A claim as the scheduler reads it.
#[derive(Clone, Debug)]
pub struct Claim {
    pub class: Arc<str>,
    pub volume: Option<Arc<str>>,
    pub storage: i128,
    pub modes: Vec<Arc<str>>,
}

/// A volume as the scheduler reads it.
#[derive(Clone, Debug)]
pub struct Volume {
    pub class: Arc<str>,
    pub available: bool,
    pub storage: i128,
    pub modes: Vec<Arc<str>>,
    /// Required node affinity (any term); None: usable from every node.
    pub terms: Option<Vec<Term>>,
}

/// Claims, volumes and classes from the API.
#[derive(Default, Debug)]
pub struct Volumes {
    pub claims: HashMap<String, Claim>,
    pub volumes: HashMap<String, Volume>,
    /// Class name → (WaitForFirstConsumer, has a provisioner).
    pub classes: HashMap<String, (bool, bool)>,
}

fn strs(v: Option<&Value>) -> Vec<Arc<str>> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).map(Arc::from).collect()
}

fn storage(v: Option<&Value>) -> i128 {
    v.and_then(Value::as_str).and_then(shoal_client::quantity::parse).unwrap_or(0)
}

impl Volumes {
    pub fn claim_from(v: &Value) -> Claim {
        Claim {
            class: Arc::from(v.pointer("/spec/storageClassName").and_then(Value::as_str).unwrap_or("")),
            volume: v.pointer("/spec/volumeName").and_then(Value::as_str).filter(|n| !n.is_empty()).map(Arc::from),
            storage: storage(v.pointer("/spec/resources/requests/storage")),
            modes: strs(v.pointer("/spec/accessModes")),
        }
    }

    pub fn volume_from(v: &Value, names: &mut Interner) -> Volume {
        let terms = v.pointer("/spec/nodeAffinity/required/nodeSelectorTerms").and_then(Value::as_array).map(|t| t.iter().map(|t| crate::model::compile_term_pub(t, names)).collect());
        Volume {
            class: Arc::from(v.pointer("/spec/storageClassName").and_then(Value::as_str).unwrap_or("")),
            available: v.pointer("/status/phase").and_then(Value::as_str) == Some("Available") && v.pointer("/spec/claimRef").is_none_or(Value::is_null),
            storage: storage(v.pointer("/spec/capacity/storage")),
            modes: strs(v.pointer("/spec/accessModes")),
            terms,
        }
    }

    pub fn class_from(v: &Value) -> (bool, bool) {
        let p = v.get("provisioner").and_then(Value::as_str).unwrap_or("");
        (v.get("volumeBindingMode").and_then(Value::as_str) == Some("WaitForFirstConsumer"), !p.is_empty() && p != "kubernetes.io/no-provisioner")
    }
}

/// What one pod's claims require of a node, worked out once per cycle.
#[derive(Debug, Default)]
pub struct Check {
    /// Per bound claim: its volume's node terms.
    bound: Vec<Vec<Term>>,
    /// Per unbound WaitForFirstConsumer claim without a provisioner: the usable volumes'
    /// terms (None: a volume usable from any node).
    unbound: Vec<Vec<Option<Vec<Term>>>>,
    /// Claims the driver must have bound on the chosen node before binding the pod.
    pub to_bind: Vec<String>,
}

impl Check {
    /// Err: the pod cannot be scheduled anywhere now (upstream's PreFilter rejections).
    pub fn compute(p: &PodInfo, vols: &Volumes) -> Result<Check, String> {
        let mut c = Check::default();
        for name in &p.claims {
            let key = format!("{}/{name}", p.namespace);
            let claim = vols.claims.get(&key).ok_or_else(|| format!("persistentvolumeclaim \"{name}\" not found"))?;
            match &claim.volume {
                Some(v) => {
                    if let Some(terms) = vols.volumes.get(&**v).and_then(|v| v.terms.clone()) {
                        c.bound.push(terms);
                    }
                }
                None => {
                    let (wait_first, provisioner) = vols.classes.get(&*claim.class).copied().unwrap_or((false, false));
                    if !wait_first {
                        return Err("pod has unbound immediate PersistentVolumeClaims".into());
                    }
                    c.to_bind.push(key);
                    if !provisioner {
                        let usable = vols
                            .volumes
                            .values()
                            .filter(|v| v.available && v.class == claim.class && v.storage >= claim.storage && claim.modes.iter().all(|m| v.modes.contains(m)))
                            .map(|v| v.terms.clone())
                            .collect();
                        c.unbound.push(usable);
                    }
                }
            }
        }
        Ok(c)
    }

    /// The node-level verdict: None when the node can serve every claim, else the reason.
    pub fn filter(&self, c: &Ctx, i: usize) -> Option<u32> {
        let ok = |terms: &[Term]| terms.iter().any(|t| super::affinity::term_matches(t, c, i));
        if !self.bound.iter().all(|t| ok(t)) {
            return Some(super::VOLUME_AFFINITY);
        }
        if !self.unbound.iter().all(|usable| usable.iter().any(|t| t.as_deref().is_none_or(ok))) {
            return Some(super::VOLUME_BIND);
        }
        None
    }
}
