//! Standalone mode: AgentPolicy YAML files (the very files a user would
//! `kubectl apply`), read from disk and re-read when they change.
//!
//! A file that does not parse or whose policies do not compile is reported,
//! and the policies it held before stay in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use mandate_api::crd::PolicyDocument;
use serde::Deserialize;

use mandate_policy::engine::{EngineKind, LoadedPolicy, PolicySet};

/// One file's last good content.
#[derive(Debug, Clone)]
struct FileState {
    stamp: (Option<SystemTime>, u64),
    policies: Vec<LoadedPolicy>,
}

/// What a reload found wrong, for the log and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    pub message: String,
}

/// Watches a list of files and directories.
#[derive(Debug)]
pub struct Loader {
    roots: Vec<PathBuf>,
    files: BTreeMap<PathBuf, FileState>,
    engine: EngineKind,
}

impl Loader {
    pub fn new(roots: Vec<PathBuf>) -> Self {
        Self {
            roots,
            files: BTreeMap::new(),
            engine: EngineKind::Auto,
        }
    }

    /// Choose the evaluator for the policies loaded from now on.
    pub fn with_engine(mut self, engine: EngineKind) -> Self {
        self.engine = engine;
        self
    }

    fn list(&self) -> (Vec<PathBuf>, Vec<LoadError>) {
        yaml_files(&self.roots)
    }

    /// Re-read what changed. Returns the new set when anything in force
    /// changed, and every problem found (each also keeps the old policies).
    pub fn reload(&mut self) -> (Option<PolicySet>, Vec<LoadError>) {
        let (paths, mut errors) = self.list();
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|p, _| paths.contains(p));
        changed |= self.files.len() != before;
        for path in paths {
            let stamp = match std::fs::metadata(&path) {
                Ok(m) => (m.modified().ok(), m.len()),
                Err(e) => {
                    errors.push(LoadError {
                        file: path.clone(),
                        message: format!("cannot stat: {e}"),
                    });
                    continue;
                }
            };
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            match load_file_for(&path, self.engine) {
                Ok(policies) => {
                    self.files.insert(path, FileState { stamp, policies });
                    changed = true;
                }
                Err(message) => {
                    errors.push(LoadError {
                        file: path.clone(),
                        message,
                    });
                    // Keep the previous policies; remember the stamp so the
                    // same broken content is reported once, not every poll.
                    let policies = self.files.get(&path).map(|f| f.policies.clone()).unwrap_or_default();
                    self.files.insert(path, FileState { stamp, policies });
                }
            }
        }
        let set = changed.then(|| PolicySet {
            policies: self.files.values().flat_map(|f| f.policies.clone()).collect(),
            ..PolicySet::default()
        });
        (set, errors)
    }
}

/// Parse and compile every AgentPolicy in one YAML file (documents of other
/// kinds are an error: a typo in `kind` must not silently drop a policy).
pub fn load_file(path: &Path) -> Result<Vec<LoadedPolicy>, String> {
    load_file_for(path, EngineKind::Auto)
}

/// [`load_file`], choosing the evaluator.
pub fn load_file_for(path: &Path, engine: EngineKind) -> Result<Vec<LoadedPolicy>, String> {
    parse_file(path)?
        .into_iter()
        .map(|(name, policy)| {
            LoadedPolicy::compile_for(name.clone(), &policy.spec, engine).map_err(|e| format!("policy {name}: {e}"))
        })
        .collect()
}

/// The AgentPolicies in one YAML file (several documents allowed), each with
/// its name (`namespace/name`, or `name`). A document of another kind is an
/// error, as is a file without any AgentPolicy.
pub fn parse_file(path: &Path) -> Result<Vec<(String, PolicyDocument)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| format!("document {}: not YAML: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != "AgentPolicy" {
            return Err(format!("document {}: kind '{kind}' is not AgentPolicy", i + 1));
        }
        let policy: PolicyDocument =
            serde_yaml::from_value(value).map_err(|e| format!("document {}: not a valid AgentPolicy: {e}", i + 1))?;
        let name = match (&policy.metadata.namespace, &policy.metadata.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            (None, Some(n)) => n.clone(),
            (_, None) => return Err(format!("document {}: metadata.name is missing", i + 1)),
        };
        out.push((name, policy));
    }
    if out.is_empty() {
        return Err("no AgentPolicy in the file".into());
    }
    Ok(out)
}

/// The YAML files under `roots` (each a file or a directory), sorted per directory.
pub fn yaml_files(roots: &[PathBuf]) -> (Vec<PathBuf>, Vec<LoadError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for root in roots {
        if root.is_dir() {
            match std::fs::read_dir(root) {
                Ok(entries) => {
                    let mut v: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| {
                            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                        })
                        .collect();
                    v.sort();
                    out.extend(v);
                }
                Err(e) => errors.push(LoadError {
                    file: root.clone(),
                    message: format!("cannot read directory: {e}"),
                }),
            }
        } else if root.is_file() {
            out.push(root.clone());
        } else {
            errors.push(LoadError {
                file: root.clone(),
                message: "no such file or directory".into(),
            });
        }
    }
    (out, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: get-only}
spec:
  modules:
  - name: authz.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := false
      decision if input.attributes.request.http.method == "GET"
"#;

    #[test]
    fn a_broken_edit_keeps_the_previous_version() {
        let dir = std::env::temp_dir().join(format!("mandate-loader-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let mut loader = Loader::new(vec![dir.clone()]);
        let (set, errors) = loader.reload();
        assert!(errors.is_empty(), "{errors:?}");
        let v1 = set.unwrap().policies[0].version.clone();

        // Same length, different content would share a stamp only within
        // the mtime granularity; write a visibly different file.
        std::fs::write(&file, GOOD.replace("decision if input", "decision if {input")).unwrap();
        let (set, errors) = loader.reload();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("authz.rego:"), "{}", errors[0].message);
        assert!(set.is_none() || set.unwrap().policies[0].version == v1);
        assert_eq!(loader.files.values().next().unwrap().policies[0].version, v1);

        std::fs::write(&file, "kind: Deployment\n").unwrap();
        let (_, errors) = loader.reload();
        assert!(errors[0].message.contains("not AgentPolicy"), "{errors:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
