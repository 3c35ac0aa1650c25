//! The version of a policy: what every decision is logged with.

use mandate_api::crd::AgentPolicySpec;
use sha2::{Digest, Sha256};

/// The policy's version: sha256 over a canonical JSON form of its modules
/// (sorted by name), data (object keys sorted) and entrypoint. Selection,
/// mode and egress do not change what the Rego decides, so they are not in it.
pub fn version(spec: &AgentPolicySpec) -> String {
    let mut modules: Vec<_> = spec.modules.iter().map(|m| (&m.name, &m.rego)).collect();
    modules.sort();
    // serde_json's Value keeps object keys sorted (no preserve_order), so
    // re-serializing the data canonicalizes it.
    // An empty data object is no data; the entrypoint is compared trimmed, as compiled.
    let data = spec
        .data
        .clone()
        .filter(|d| d.as_object().is_none_or(|o| !o.is_empty()));
    // The mode and the egress declarations change what the policy does, so
    // they are part of its version (DryRun -> Enforce is a new version).
    let canonical = serde_json::json!({
        "entrypoint": spec.entrypoint.trim(),
        "modules": modules.iter().map(|(n, r)| serde_json::json!({"name": n, "rego": r})).collect::<Vec<_>>(),
        "data": data.unwrap_or(serde_json::Value::Null),
        "mode": spec.mode,
        "egress": spec.egress,
    });
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    format!("sha256:{digest:x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use mandate_api::crd::{DEFAULT_ENTRYPOINT, PolicyMode, RegoModule};

    fn spec(modules: &[(&str, &str)]) -> AgentPolicySpec {
        AgentPolicySpec {
            agent_selector: None,
            identities: vec![],
            mode: PolicyMode::Enforce,
            modules: modules
                .iter()
                .map(|(n, r)| RegoModule {
                    name: n.to_string(),
                    rego: r.to_string(),
                })
                .collect(),
            data: None,
            entrypoint: DEFAULT_ENTRYPOINT.to_string(),
            egress: vec![],
            tests: vec![],
        }
    }

    const GOOD: &str = "package mandate.authz\nimport rego.v1\ndefault decision := false\ndecision if input.attributes.request.http.method == \"GET\"\n";
    const HELPER: &str = "package mandate.lib\nimport rego.v1\nsafe_methods := {\"GET\", \"HEAD\"}\n";

    #[test]
    fn a_version_is_sha256_hex() {
        let v = version(&spec(&[("authz.rego", GOOD)]));
        assert!(v.starts_with("sha256:") && v.len() == 7 + 64, "{v}");
        assert!(v[7..].chars().all(|c| c.is_ascii_hexdigit()), "{v}");
    }

    #[test]
    fn the_version_is_canonical() {
        let a = spec(&[("authz.rego", GOOD), ("lib.rego", HELPER)]);
        let b = spec(&[("lib.rego", HELPER), ("authz.rego", GOOD)]);
        assert_eq!(version(&a), version(&b), "module order must not change the version");

        let mut with_data = a.clone();
        with_data.data = Some(serde_json::from_str(r#"{"b": 1, "a": {"y": 2, "x": 3}}"#).unwrap());
        let mut same_data = a.clone();
        same_data.data = Some(serde_json::from_str(r#"{"a": {"x": 3, "y": 2}, "b": 1}"#).unwrap());
        assert_eq!(
            version(&with_data),
            version(&same_data),
            "key order must not change the version"
        );
        assert_ne!(version(&a), version(&with_data));

        let mut dry = a.clone();
        dry.mode = PolicyMode::DryRun;
        assert_ne!(
            version(&a),
            version(&dry),
            "DryRun -> Enforce changes what is enforced: a new version, pushed like any other"
        );

        let edited = spec(&[("authz.rego", &GOOD.replace("GET", "PUT")), ("lib.rego", HELPER)]);
        assert_ne!(version(&a), version(&edited));
        let mut other_entry = a.clone();
        other_entry.entrypoint = "data.mandate.authz.allow".into();
        assert_ne!(version(&a), version(&other_entry));
    }

    #[test]
    fn trimmed_entrypoints_and_empty_data_do_not_change_the_version() {
        let a = spec(&[("authz.rego", GOOD)]);
        let mut b = a.clone();
        b.entrypoint = format!("  {}  ", a.entrypoint);
        b.data = Some(serde_json::json!({}));
        assert_eq!(version(&a), version(&b));
    }
}
