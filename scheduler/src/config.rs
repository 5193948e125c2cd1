//! The scheduler's configuration file, in the shape of upstream's
//! `KubeSchedulerConfiguration` (`kubescheduler.config.k8s.io/v1`): top-level
//! `percentageOfNodesToScore` and `parallelism`, and per profile the `schedulerName`,
//! score plugins enabled with weights or disabled (`*` for all), and its own
//! `percentageOfNodesToScore`. Unknown fields are refused, as upstream's strict decoding
//! does; filter plugins cannot be disabled (they guard correctness).

use std::collections::HashMap;

use serde::Deserialize;

use crate::framework::{Profile, Weights};

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    api_version: String,
    kind: String,
    #[serde(default)]
    percentage_of_nodes_to_score: Option<u32>,
    #[serde(default)]
    parallelism: Option<u32>,
    #[serde(default)]
    profiles: Vec<FileProfile>,
    /// Accepted for compatibility with upstream files; Shoal elects through its own Lease.
    #[serde(default)]
    leader_election: Option<serde_json::Value>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileProfile {
    scheduler_name: String,
    #[serde(default)]
    percentage_of_nodes_to_score: Option<u32>,
    #[serde(default)]
    plugins: Option<Plugins>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Plugins {
    #[serde(default)]
    score: Option<PluginSet>,
    #[serde(default)]
    multi_point: Option<PluginSet>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PluginSet {
    #[serde(default)]
    enabled: Vec<PluginRef>,
    #[serde(default)]
    disabled: Vec<PluginRef>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PluginRef {
    name: String,
    #[serde(default)]
    weight: Option<i64>,
}

/// Profiles by schedulerName from the file's text; `default` is the profile
/// `default-scheduler` starts from (`--scheduler-profile`).
pub fn parse(text: &str, default: &Profile) -> Result<HashMap<String, Profile>, String> {
    let f: File = serde_norway::from_str(text).map_err(|e| format!("not a valid KubeSchedulerConfiguration: {e}"))?;
    if f.kind != "KubeSchedulerConfiguration" || !f.api_version.starts_with("kubescheduler.config.k8s.io/") {
        return Err(format!("expected kind KubeSchedulerConfiguration of kubescheduler.config.k8s.io, got {} {}", f.api_version, f.kind));
    }
    let _ = f.leader_election;
    let mut out = HashMap::new();
    for p in &f.profiles {
        if p.scheduler_name.is_empty() {
            return Err("profiles[].schedulerName must not be empty".into());
        }
        let mut prof = match p.scheduler_name.as_str() {
            "default-scheduler" => default.clone(),
            n => Profile::builtin(n).unwrap_or_else(Profile::kubernetes),
        };
        if let Some(pct) = p.percentage_of_nodes_to_score.or(f.percentage_of_nodes_to_score) {
            // 0 means "the default" upstream; Shoal's default scores every node.
            prof.percentage_of_nodes_to_score = if pct == 0 { 100 } else { pct };
        }
        if let Some(par) = f.parallelism {
            prof.parallelism = par;
        }
        if let Some(plugins) = &p.plugins {
            for set in [&plugins.multi_point, &plugins.score].into_iter().flatten() {
                for d in &set.disabled {
                    if d.name == "*" {
                        prof.weights = Weights::zero();
                    } else {
                        *prof.weights.of_plugin_mut(&d.name).ok_or_else(|| format!("profile {}: unknown score plugin {:?}", p.scheduler_name, d.name))? = 0;
                    }
                }
                for e in &set.enabled {
                    let w = prof.weights.of_plugin_mut(&e.name).ok_or_else(|| format!("profile {}: unknown score plugin {:?}", p.scheduler_name, e.name))?;
                    *w = e.weight.unwrap_or(1);
                }
            }
        }
        prof.validate().map_err(|e| format!("profile {}: {e}", p.scheduler_name))?;
        if out.insert(p.scheduler_name.clone(), prof).is_some() {
            return Err(format!("profile {} appears twice", p.scheduler_name));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_upstream_shaped_files() {
        let text = r#"
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
percentageOfNodesToScore: 50
parallelism: 2
profiles:
- schedulerName: default-scheduler
  plugins:
    score:
      disabled: [{name: ImageLocality}]
      enabled: [{name: NodeResourcesFit, weight: 5}]
- schedulerName: batch
  percentageOfNodesToScore: 0
  plugins:
    score:
      disabled: [{name: "*"}]
      enabled: [{name: NodeResourcesBalancedAllocation, weight: 3}]
"#;
        let p = parse(text, &Profile::shoal()).unwrap();
        let d = &p["default-scheduler"];
        assert_eq!((d.weights.image_locality, d.weights.node_resources_least_allocated, d.weights.node_affinity, d.percentage_of_nodes_to_score, d.parallelism), (0, 5, 25, 50, 2));
        let b = &p["batch"];
        assert_eq!(b.weights, Weights { node_resources_balanced_allocation: 3, ..Weights::zero() });
        assert_eq!(b.percentage_of_nodes_to_score, 100);
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let base = "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n";
        assert!(parse(&format!("{base}profiles: [{{schedulerName: x, plugins: {{score: {{enabled: [{{name: Magic}}]}}}}}}]\n"), &Profile::shoal()).unwrap_err().contains("unknown score plugin \"Magic\""));
        assert!(parse(&format!("{base}percentageOfNodesToScore: 150\nprofiles: [{{schedulerName: x}}]\n"), &Profile::shoal()).unwrap_err().contains("percentageOfNodesToScore must be between 1 and 100"));
        assert!(parse(&format!("{base}bogusField: 1\n"), &Profile::shoal()).unwrap_err().contains("unknown field `bogusField`"));
        assert!(parse("apiVersion: v1\nkind: ConfigMap\n", &Profile::shoal()).unwrap_err().contains("expected kind KubeSchedulerConfiguration"));
        assert!(parse(&format!("{base}profiles: [{{schedulerName: a}}, {{schedulerName: a}}]\n"), &Profile::shoal()).unwrap_err().contains("appears twice"));
    }
}
