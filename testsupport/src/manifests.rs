//! AgentPolicy and AgentIdentity manifests for tests.
//!
//! A builder holds the manifest as JSON, so a test may also build what the
//! types cannot hold (an out-of-range port, an empty selector) to see it
//! refused. Take it as JSON ([`AgentPolicyBuilder::json`]), as the text
//! `kubectl apply -f -` reads ([`AgentPolicyBuilder::manifest`]), or as a
//! type: [`AgentPolicyBuilder::spec`], [`AgentPolicyBuilder::document`], or
//! any type that deserializes from the whole object
//! ([`AgentPolicyBuilder::parse`], e.g. the operator's `AgentPolicy`).

use anyhow::{Context, Result};
use mandate_api::crd::{AgentIdentitySpec, AgentPolicySpec, GROUP, PolicyDocument, PolicyMode, VERSION};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

/// `mandate.dev/v1alpha1`.
pub fn api_version() -> String {
    format!("{GROUP}/{VERSION}")
}

/// A module of package `mandate.authz` denying by default, then `rules`.
pub fn authz_rego(rules: &str) -> String {
    format!("package mandate.authz\nimport rego.v1\ndefault decision := false\n{rules}\n")
}

/// A module that denies everything.
pub const DENY_ALL: &str = "package mandate.authz\nimport rego.v1\ndefault decision := false\n";

/// A module that allows GETs and denies the rest.
pub const ALLOW_GET: &str = "package mandate.authz\nimport rego.v1\ndefault decision := false\ndecision if input.attributes.request.http.method == \"GET\"\n";

fn object(kind: &str, name: &str, namespace: Option<&str>, spec: &Map<String, Value>) -> Value {
    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(name));
    if let Some(ns) = namespace {
        metadata.insert("namespace".into(), json!(ns));
    }
    json!({"apiVersion": api_version(), "kind": kind, "metadata": metadata, "spec": spec})
}

fn push(spec: &mut Map<String, Value>, key: &str, item: Value) {
    match spec.get_mut(key) {
        Some(Value::Array(items)) => items.push(item),
        _ => {
            spec.insert(key.into(), Value::Array(vec![item]));
        }
    }
}

/// An AgentPolicy named `name`, with an empty spec to fill.
pub fn agent_policy(name: &str) -> AgentPolicyBuilder {
    AgentPolicyBuilder {
        name: name.into(),
        namespace: None,
        spec: Map::new(),
    }
}

/// An AgentPolicy manifest being built.
#[derive(Debug, Clone)]
pub struct AgentPolicyBuilder {
    name: String,
    namespace: Option<String>,
    spec: Map<String, Value>,
}

impl AgentPolicyBuilder {
    /// In namespace `ns` (`metadata.namespace`).
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = Some(ns.into());
        self
    }

    /// Bind the AgentIdentity `identity` (appended to `spec.identities`).
    pub fn identity(mut self, identity: &str) -> Self {
        push(&mut self.spec, "identities", json!(identity));
        self
    }

    /// A Rego module (appended to `spec.modules`).
    pub fn module(mut self, name: &str, rego: &str) -> Self {
        push(&mut self.spec, "modules", json!({"name": name, "rego": rego}));
        self
    }

    /// A Rego test module (appended to `spec.tests`).
    pub fn test(mut self, name: &str, rego: &str) -> Self {
        push(&mut self.spec, "tests", json!({"name": name, "rego": rego}));
        self
    }

    /// `spec.mode`.
    pub fn mode(self, mode: PolicyMode) -> Self {
        let mode = match mode {
            PolicyMode::Enforce => "Enforce",
            PolicyMode::DryRun => "DryRun",
        };
        self.set("mode", json!(mode))
    }

    /// `spec.data`.
    pub fn data(self, data: Value) -> Self {
        self.set("data", data)
    }

    /// `spec.entrypoint`.
    pub fn entrypoint(self, entrypoint: &str) -> Self {
        self.set("entrypoint", json!(entrypoint))
    }

    /// Set the spec field `key` to `value` as given (no checks): also for
    /// specs the apiserver should refuse.
    pub fn set(mut self, key: &str, value: Value) -> Self {
        self.spec.insert(key.into(), value);
        self
    }

    /// Set every field of `fields` (a JSON object) in the spec, as given.
    pub fn merge(mut self, fields: Value) -> Self {
        if let Value::Object(fields) = fields {
            self.spec.extend(fields);
        }
        self
    }

    /// The whole object, as JSON.
    pub fn json(&self) -> Value {
        object("AgentPolicy", &self.name, self.namespace.as_deref(), &self.spec)
    }

    /// The whole object as text, for `kubectl apply -f -` (JSON is YAML).
    pub fn manifest(&self) -> String {
        self.json().to_string()
    }

    /// The spec, as the sidecar and the CLI read it.
    pub fn spec(&self) -> Result<AgentPolicySpec> {
        serde_json::from_value(Value::Object(self.spec.clone()))
            .with_context(|| format!("AgentPolicy {}: not a valid spec", self.name))
    }

    /// The policy document, as a policy file holds it.
    pub fn document(&self) -> Result<PolicyDocument> {
        self.parse()
    }

    /// The whole object as any type that reads it (the operator's `AgentPolicy`).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.json()).with_context(|| format!("AgentPolicy {}: not a valid object", self.name))
    }
}

/// An AgentIdentity named `name`, with an empty spec to fill.
pub fn agent_identity(name: &str) -> AgentIdentityBuilder {
    AgentIdentityBuilder {
        name: name.into(),
        namespace: None,
        spec: Map::new(),
    }
}

/// An AgentIdentity manifest being built.
#[derive(Debug, Clone)]
pub struct AgentIdentityBuilder {
    name: String,
    namespace: Option<String>,
    spec: Map<String, Value>,
}

impl AgentIdentityBuilder {
    /// In namespace `ns` (`metadata.namespace`).
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = Some(ns.into());
        self
    }

    /// Select pods labelled `key=value` (added to `spec.selector.matchLabels`).
    pub fn match_label(mut self, key: &str, value: &str) -> Self {
        let selector = self.spec.entry("selector").or_insert_with(|| json!({}));
        if !selector.is_object() {
            *selector = json!({});
        }
        if let Some(selector) = selector.as_object_mut() {
            let labels = selector.entry("matchLabels").or_insert_with(|| json!({}));
            if !labels.is_object() {
                *labels = json!({});
            }
            if let Some(labels) = labels.as_object_mut() {
                labels.insert(key.into(), json!(value));
            }
        }
        self
    }

    /// `spec.selector`, as given.
    pub fn selector(self, selector: Value) -> Self {
        self.set("selector", selector)
    }

    /// `spec.svidTtl`.
    pub fn svid_ttl(self, ttl: &str) -> Self {
        self.set("svidTtl", json!(ttl))
    }

    /// `spec.spiffeIdTemplate`.
    pub fn spiffe_id_template(self, template: &str) -> Self {
        self.set("spiffeIdTemplate", json!(template))
    }

    /// Set the spec field `key` to `value` as given (no checks).
    pub fn set(mut self, key: &str, value: Value) -> Self {
        self.spec.insert(key.into(), value);
        self
    }

    /// Set every field of `fields` (a JSON object) in the spec, as given.
    pub fn merge(mut self, fields: Value) -> Self {
        if let Value::Object(fields) = fields {
            self.spec.extend(fields);
        }
        self
    }

    /// The whole object, as JSON.
    pub fn json(&self) -> Value {
        object("AgentIdentity", &self.name, self.namespace.as_deref(), &self.spec)
    }

    /// The whole object as text, for `kubectl apply -f -`.
    pub fn manifest(&self) -> String {
        self.json().to_string()
    }

    /// The spec, typed.
    pub fn spec(&self) -> Result<AgentIdentitySpec> {
        serde_json::from_value(Value::Object(self.spec.clone()))
            .with_context(|| format!("AgentIdentity {}: not a valid spec", self.name))
    }

    /// The whole object as any type that reads it (the operator's `AgentIdentity`).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.json()).with_context(|| format!("AgentIdentity {}: not a valid object", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_builds_to_json_a_spec_and_a_document() {
        let p = agent_policy("p")
            .namespace("agents")
            .identity("alpha")
            .identity("beta")
            .module("p.rego", &authz_rego("decision if input.x"))
            .test("p_test.rego", "package t")
            .mode(PolicyMode::DryRun);
        assert_eq!(
            p.json(),
            json!({"apiVersion": "mandate.dev/v1alpha1", "kind": "AgentPolicy",
                   "metadata": {"name": "p", "namespace": "agents"},
                   "spec": {"identities": ["alpha", "beta"], "mode": "DryRun",
                            "modules": [{"name": "p.rego", "rego": "package mandate.authz\nimport rego.v1\ndefault decision := false\ndecision if input.x\n"}],
                            "tests": [{"name": "p_test.rego", "rego": "package t"}]}})
        );
        let spec = p.spec().unwrap();
        assert_eq!(spec.identities, ["alpha", "beta"]);
        assert_eq!(spec.mode, PolicyMode::DryRun);
        assert_eq!(spec.entrypoint, mandate_api::crd::DEFAULT_ENTRYPOINT);
        let doc = p.document().unwrap();
        assert_eq!(doc.metadata.name.as_deref(), Some("p"));
        assert_eq!(doc.spec, spec);
        let again: Value = serde_json::from_str(&p.manifest()).unwrap();
        assert_eq!(again, p.json());
        assert_eq!(authz_rego(""), format!("{DENY_ALL}\n"));
        assert_eq!(
            ALLOW_GET,
            authz_rego("decision if input.attributes.request.http.method == \"GET\"")
        );
    }

    #[test]
    fn what_the_types_cannot_hold_is_still_built() {
        let p = agent_policy("p")
            .module("a.rego", DENY_ALL)
            .set("egress", json!([{"host": "x", "port": 70000}]));
        assert_eq!(p.json()["spec"]["egress"][0]["port"], 70000);
        assert!(p.spec().is_err());
        let p = agent_policy("p").merge(json!({"modules": [], "entrypoint": "x"}));
        assert_eq!(p.json()["spec"], json!({"modules": [], "entrypoint": "x"}));
    }

    #[test]
    fn an_identity_builds_its_selector() {
        let i = agent_identity("researcher")
            .match_label("agent", "researcher")
            .match_label("tier", "a")
            .svid_ttl("1m");
        assert_eq!(
            i.json(),
            json!({"apiVersion": "mandate.dev/v1alpha1", "kind": "AgentIdentity",
                   "metadata": {"name": "researcher"},
                   "spec": {"selector": {"matchLabels": {"agent": "researcher", "tier": "a"}}, "svidTtl": "1m"}})
        );
        let spec = i.spec().unwrap();
        assert_eq!(spec.svid_ttl.as_deref(), Some("1m"));
        let empty = agent_identity("i").selector(json!({}));
        assert_eq!(empty.json()["spec"], json!({"selector": {}}));
    }
}
