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
