//! Policies compiled once per version, and the decision over all of them.
//!
//! Deny wins: every Enforce policy must allow. DryRun policies are evaluated
//! and logged but never decide: no policy, no Enforce policy, an undefined
//! result, an error or a timeout is a deny with a reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use mandate_api::crd::{AgentPolicySpec, PolicyMode, TlsMode};

use crate::credential::{Brokered, Credential, Declaration};
use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::program::Program;
use regorus::rvm::vm::RegoVM;
use regorus::{CompiledPolicy, Engine};
use serde_json::Value;

/// The most VM instructions one evaluation may run: a backstop behind the
/// time limit, which is the bound that matters (100 M instructions take
/// about a second; regorus' own default, 25 000, is too small for a policy
/// that walks a few thousand items of data).
pub const MAX_INSTRUCTIONS: usize = 100_000_000;

/// Why a policy could not be loaded for evaluation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// It fails the checks the operator makes (see [`crate::check`]).
    #[error(transparent)]
    Invalid(#[from] crate::check::PolicyError),
    /// regorus refused it for evaluation.
    #[error("{0}")]
    Compile(String),
}

/// Why one evaluation failed (regorus' own message): a deny.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

/// Idle VMs kept per policy (one per concurrent evaluation is enough).
const VM_POOL: usize = 16;

/// Which evaluator runs a policy's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum EngineKind {
    /// regorus' bytecode VM where the policy compiles for it (3-6x faster),
    /// the tree-walking interpreter otherwise.
    #[default]
    Auto,
    /// Always regorus' tree-walking interpreter.
    Interpreter,
}

/// One policy, compiled.
#[derive(Clone)]
pub struct LoadedPolicy {
    /// `namespace/name` (standalone: the name, or `file:name` when unnamed).
    pub name: String,
    pub version: String,
    pub mode: PolicyMode,
    pub entrypoint: String,
    compiled: CompiledPolicy,
    /// The same policy as VM bytecode, when regorus' VM compiler supports
    /// every construct it uses (it does not support `with`, for one).
    program: Option<Arc<Program>>,
    /// `data` for the VM.
    data: regorus::Value,
    /// VMs with this policy loaded, reused across evaluations (each
    /// execution starts from a clean state: regorus clears every cache and
    /// register of the previous one).
    vms: Arc<std::sync::Mutex<Vec<RegoVM>>>,
    /// `input.policy` for this policy, built once.
    policy_value: regorus::Value,
    /// Hosts declared in `egress` with `tls: true` (exact, or `*.suffix`),
    /// normalized by [`normalize_host`].
    pub tls_hosts: Vec<String>,
    /// Every host declared in `egress` (exact, or `*.suffix`), normalized by
    /// [`normalize_host`]: the names the sidecar's DNS resolver answers.
    pub egress_hosts: Vec<String>,
    /// Hosts declared in `egress` with `tlsMode: Intercept` (the default),
    /// normalized: TLS to them is terminated in the pod so that each
    /// request is decided whole (unless another policy declares the host
    /// Passthrough, see [`PolicySet::intercepts`]).
    pub intercept_hosts: Vec<String>,
    /// Hosts declared in `egress` with `tlsMode: Passthrough`, normalized:
    /// never decrypted.
    pub passthrough_hosts: Vec<String>,
    /// The `egress` destinations that broker a credential, from the spec:
    /// known whether or not a value for them is in the set, so that a
    /// request to one without its value is denied, never sent bare.
    pub brokered: Vec<Declaration>,
}

impl std::fmt::Debug for LoadedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPolicy")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("evaluator", &self.evaluator())
            .finish()
    }
}

impl LoadedPolicy {
    /// Check the policy (the same checks the operator makes) and compile it
    /// for its entrypoint.
    pub fn compile(name: String, spec: &AgentPolicySpec) -> Result<Self, EngineError> {
        Self::compile_for(name, spec, EngineKind::Auto)
    }

    /// [`LoadedPolicy::compile`], choosing the evaluator.
    pub fn compile_for(name: String, spec: &AgentPolicySpec, kind: EngineKind) -> Result<Self, EngineError> {
        let checked = crate::check::compile(spec)?;
        let mut engine = Engine::new();
        for m in &spec.modules {
            engine
                .add_policy(m.name.clone(), m.rego.clone())
                .map_err(|e| EngineError::Compile(e.to_string()))?;
        }
        if let Some(data) = &spec.data {
            engine
                .add_data_json(&data.to_string())
                .map_err(|e| EngineError::Compile(e.to_string()))?;
        }
        let compiled = engine
            .compile_with_entrypoint(&spec.entrypoint.trim().into())
            .map_err(|e| EngineError::Compile(e.to_string()))?;
        let entrypoint = spec.entrypoint.trim().to_string();
        let program = match kind {
            EngineKind::Interpreter => None,
            EngineKind::Auto => match Compiler::compile_from_policy(&compiled, &[entrypoint.as_str()]) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::info!(policy = %name, reason = %e, "the policy runs on the interpreter, not the VM");
                    None
                }
            },
        };
        let data = spec
            .data
            .as_ref()
            .map(|d| regorus::Value::from(d.clone()))
            .unwrap_or_else(regorus::Value::new_object);
        let policy_value = regorus::Value::from(serde_json::json!({"name": name, "version": checked.version}));
        let tls_hosts = spec
            .egress
            .iter()
            .filter(|e| e.tls)
            .map(|e| normalize_host(&e.host))
            .collect();
        let egress_hosts = spec.egress.iter().map(|e| normalize_host(&e.host)).collect();
        let hosts_in = |mode: TlsMode| {
            spec.egress
                .iter()
                .filter(|e| e.tls_mode == mode)
                .map(|e| normalize_host(&e.host))
                .collect::<Vec<_>>()
        };
        let brokered = spec
            .egress
            .iter()
            .filter_map(|e| Declaration::from_spec(&name, e))
            .collect();
        Ok(Self {
            policy_value,
            brokered,
            tls_hosts,
            egress_hosts,
            intercept_hosts: hosts_in(TlsMode::Intercept),
            passthrough_hosts: hosts_in(TlsMode::Passthrough),
            program,
            data,
            vms: Arc::default(),
            name,
            version: checked.version,
            mode: spec.mode,
            entrypoint,
            compiled,
        })
    }

    /// `vm` or `interpreter`.
    pub fn evaluator(&self) -> &'static str {
        if self.program.is_some() { "vm" } else { "interpreter" }
    }

    /// Evaluate the entrypoint on one input.
    pub fn evaluate(&self, input: regorus::Value) -> Result<regorus::Value, EvalError> {
        match &self.program {
            Some(program) => {
                // A poisoned pool (a panic elsewhere while it was held) only
                // costs the reuse: a fresh VM is made.
                let pooled = self.vms.lock().ok().and_then(|mut p| p.pop());
                let mut vm = match pooled {
                    Some(vm) => vm,
                    None => {
                        let mut vm = RegoVM::new_with_policy(self.compiled.clone());
                        vm.load_program(program.clone());
                        vm.set_max_instructions(MAX_INSTRUCTIONS);
                        vm.set_data(self.data.clone()).map_err(|e| EvalError(e.to_string()))?;
                        vm
                    }
                };
                vm.set_input(input);
                let out = vm.execute().map_err(|e| EvalError(e.to_string()));
                // Drop the input now rather than keep it alive in the pool.
                vm.set_input(regorus::Value::Null);
                if let Ok(mut pool) = self.vms.lock()
                    && pool.len() < VM_POOL
                {
                    pool.push(vm);
                }
                out
            }
            None => self
                .compiled
                .eval_with_input(input)
                .map_err(|e| EvalError(e.to_string())),
        }
    }
}

/// The policies in force, swapped whole when any of them changes.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub policies: Vec<LoadedPolicy>,
    /// The brokered credentials the operator sent with the set (never any
    /// from files).
    pub credentials: Vec<Credential>,
    /// Where the set came from.
    pub origin: SetOrigin,
}

/// Where a policy set came from, which says why a declared credential may
/// have no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SetOrigin {
    /// AgentPolicy files (`--policy`): they carry no credential values.
    #[default]
    Files,
    /// Pushed by the operator, with the credentials it could supply.
    Operator,
}

/// What one policy said.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PolicyVerdict {
    pub name: String,
    pub version: String,
    pub mode: &'static str,
    /// allow | deny | error
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The decision over the whole set.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub allow: bool,
    pub escalate: bool,
    pub reason: String,
    /// The response a deny carries, if the deciding policy set one.
    pub http_status: Option<u16>,
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
    pub verdicts: Vec<PolicyVerdict>,
}

/// One policy's result, interpreted.
#[derive(Debug, Clone, PartialEq, Default)]
struct Outcome {
    allow: bool,
    escalate: bool,
    reason: Option<String>,
    http_status: Option<u16>,
    headers: BTreeMap<String, String>,
    body: Option<String>,
    error: bool,
}

/// Interpret a policy's value: `true`/`false`, or `{allow, escalate, reason,
/// http_status, headers, body}`. Anything else denies.
fn interpret(value: Result<regorus::Value, EvalError>) -> Outcome {
    let deny = |reason: String, error: bool| Outcome {
        reason: Some(reason),
        error,
        ..Outcome::default()
    };
    let value = match value {
        Ok(v) => v,
        Err(EvalError(e)) => {
            let reason = if e.contains("instruction limit") {
                format!("evaluation exceeded its instruction limit: {e}")
            } else if e.contains("time limit") || e.contains("execution timer") || e.contains("exceeded") {
                format!("evaluation exceeded its time limit: {e}")
            } else {
                format!("evaluation failed: {e}")
            };
            return deny(reason, true);
        }
    };
    if value == regorus::Value::Undefined {
        return deny("the policy's decision is undefined for this request".into(), false);
    }
    let json: Value = match serde_json::to_value(&value) {
        Ok(j) => j,
        Err(e) => return deny(format!("the decision is not JSON: {e}"), true),
    };
    match json {
        Value::Bool(true) => Outcome {
            allow: true,
            ..Outcome::default()
        },
        Value::Bool(false) => deny("denied by policy".into(), false),
        Value::Object(o) => {
            let allow = o.get("allow").and_then(Value::as_bool).unwrap_or(false);
            let escalate = o.get("escalate").and_then(Value::as_bool).unwrap_or(false);
            let reason = o.get("reason").and_then(|r| r.as_str().map(str::to_string));
            let http_status = o
                .get("http_status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
                .filter(|s| (200..600).contains(s));
            let headers = o
                .get("headers")
                .and_then(Value::as_object)
                .map(|h| {
                    h.iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k.to_ascii_lowercase(), v.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            let body = match o.get("body") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(other.to_string()),
            };
            let reason = reason.or_else(|| (!allow).then(|| "denied by policy".to_string()));
            Outcome {
                allow: allow && !escalate,
                escalate,
                reason,
                http_status,
                headers,
                body,
                error: false,
            }
        }
        other => deny(
            format!("the decision must be a boolean or an object, not {other}"),
            true,
        ),
    }
}

impl PolicySet {
    /// Decide: evaluate every policy on `input` (with `input.policy` set per policy).
    pub fn decide(&self, input: &Value) -> Decision {
        // Converted once; each policy gets a cheap copy with its own `policy`.
        self.decide_prepared(regorus::Value::from(input.clone()))
    }

    /// [`PolicySet::decide`] on an input already converted to a regorus value.
    pub fn decide_prepared(&self, base: regorus::Value) -> Decision {
        if self.policies.is_empty() {
            return Decision {
                reason: "no policy is loaded".into(),
                ..Decision::default()
            };
        }
        let mut decision = Decision {
            allow: true,
            ..Decision::default()
        };
        let mut enforced = 0usize;
        let policy_key = regorus::Value::from("policy");
        for p in &self.policies {
            let mut doc = base.clone();
            if let Ok(m) = doc.as_object_mut() {
                m.insert(policy_key.clone(), p.policy_value.clone());
            }
            let out = interpret(p.evaluate(doc));
            let mode = match p.mode {
                PolicyMode::Enforce => "Enforce",
                PolicyMode::DryRun => "DryRun",
            };
            decision.verdicts.push(PolicyVerdict {
                name: p.name.clone(),
                version: p.version.clone(),
                mode,
                result: if out.error {
                    "error"
                } else if out.allow {
                    "allow"
                } else {
                    "deny"
                },
                reason: out.reason.clone(),
            });
            if p.mode == PolicyMode::DryRun {
                continue;
            }
            enforced += 1;
            if !out.allow && decision.allow {
                // The first Enforce policy that denies decides the response.
                decision.allow = false;
                decision.escalate = out.escalate;
                decision.reason = match (out.escalate, out.reason) {
                    (true, r) => format!(
                        "{}: escalation to a human is required, and approvals are not available yet",
                        r.unwrap_or_else(|| "escalated".into())
                    ),
                    (false, r) => format!("{}: {}", p.name, r.unwrap_or_else(|| "denied".into())),
                };
                decision.http_status = out.http_status;
                decision.headers = out.headers;
                decision.body = out.body;
            } else if out.allow && decision.allow {
                decision.headers.extend(out.headers);
            }
        }
        if enforced == 0 {
            // Only DryRun policies: their verdicts are logged, and the agent
            // is where it would be with no policy at all. Adding a DryRun
            // policy, or removing the last Enforce one, must never turn
            // deny-all into allow-all.
            decision = Decision {
                verdicts: decision.verdicts,
                reason: "no Enforce policy applies to this agent (DryRun policies are only logged): denied".into(),
                ..Decision::default()
            };
        } else if decision.allow {
            decision.reason = "allowed by every policy".into();
        }
        decision
    }
}

impl PolicySet {
    /// Whether a policy in force declares `host` (an authority, port or not)
    /// as an egress destination Envoy reaches over TLS.
    pub fn originates_tls(&self, authority: &str) -> bool {
        let host = match authority.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => authority,
        };
        let host = normalize_host(host);
        self.policies
            .iter()
            .flat_map(|p| &p.tls_hosts)
            .any(|pattern| host_matches(pattern, &host))
    }

    /// Whether a policy in force declares the DNS name `name` (any case, a
    /// trailing dot or not) as an egress host, exactly or under a `*.suffix`
    /// pattern: the names the sidecar's resolver answers (besides the
    /// cluster's own).
    pub fn resolves(&self, name: &str) -> bool {
        let name = normalize_host(name);
        self.policies
            .iter()
            .flat_map(|p| &p.egress_hosts)
            .any(|pattern| host_matches(pattern, &name))
    }

    /// The credential brokered for requests to `host` (any case, a trailing
    /// dot or not) on `port`, declared by an Enforce policy in force: `None`
    /// when no destination that matches declares one, else the value to
    /// send or why there is none (a deny). DryRun policies broker nothing:
    /// a credential widens what the agent can do, and adding a DryRun
    /// policy must never do that.
    pub fn brokered(&self, host: &str, port: u16) -> Option<Brokered<'_>> {
        let no_value = match self.origin {
            SetOrigin::Files => "policies loaded from files carry no brokered credentials (the operator supplies them)",
            SetOrigin::Operator => "the operator sent no value for it",
        };
        crate::credential::resolve(
            self.brokering().flat_map(|p| &p.brokered),
            &self.credentials,
            &normalize_host(host),
            port,
            no_value,
        )
    }

    /// The policies whose credential declarations are in force.
    fn brokering(&self) -> impl Iterator<Item = &LoadedPolicy> {
        self.policies.iter().filter(|p| p.mode == PolicyMode::Enforce)
    }

    /// Credentials the operator sent that no Enforce policy in force
    /// declares (they are never used).
    pub fn undeclared_credentials(&self) -> impl Iterator<Item = &Credential> {
        self.credentials.iter().filter(|c| {
            !self
                .brokering()
                .flat_map(|p| &p.brokered)
                .any(|d| d.policy == c.policy && d.host == c.host && d.port == c.port)
        })
    }
}

impl PolicySet {
    /// Whether TLS from the agent to the DNS name (or IP address) `name`, as
    /// a ClientHello's SNI gives it (any case, a trailing dot or not), is
    /// intercepted: a policy in force declares it (exactly or under a
    /// `*.suffix` pattern) with `tlsMode: Intercept`, and no policy in force
    /// declares it Passthrough. Passthrough wins: a client that pins its
    /// server's certificate breaks on any other.
    pub fn intercepts(&self, name: &str) -> bool {
        let name = normalize_host(name);
        !name.is_empty()
            && self
                .policies
                .iter()
                .flat_map(|p| &p.intercept_hosts)
                .any(|pattern| host_matches(pattern, &name))
            && !self.passes_through_normalized(&name)
    }

    /// Whether a policy in force declares `name` (normalized as
    /// [`PolicySet::intercepts`] does) with `tlsMode: Passthrough`: TLS to it
    /// is never decrypted, whatever other policies declare.
    pub fn passes_through(&self, name: &str) -> bool {
        self.passes_through_normalized(&normalize_host(name))
    }

    fn passes_through_normalized(&self, name: &str) -> bool {
        self.policies
            .iter()
            .flat_map(|p| &p.passthrough_hosts)
            .any(|pattern| host_matches(pattern, name))
    }
}

/// A host name as policies compare it: ASCII lower case, one trailing dot
/// (the DNS root) removed.
pub fn normalize_host(host: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.to_ascii_lowercase()
}

/// Whether the normalized `host` is the normalized `pattern`: exactly, or,
/// for `*.suffix`, a strict subdomain of `suffix` (at a label boundary, so
/// `*.example.com` matches neither `example.com` nor `evilexample.com`).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|rest| rest.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty()),
        None => !pattern.is_empty() && pattern == host,
    }
}

/// A shared, swappable policy set.
pub type SharedPolicies = Arc<arc_swap::ArcSwap<PolicySet>>;

// The decisions themselves are tested as data: tests/cases/*.yaml, run by
// tests/cases.rs on the VM and the interpreter.

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    fn set(egress: serde_json::Value) -> PolicySet {
        let spec: AgentPolicySpec = serde_json::from_value(serde_json::json!({
            "modules": [{"name": "authz.rego", "rego": "package mandate.authz\nimport rego.v1\ndefault decision := false\n"}],
            "egress": egress,
        }))
        .unwrap();
        PolicySet {
            policies: vec![LoadedPolicy::compile("p".into(), &spec).unwrap()],
            ..PolicySet::default()
        }
    }

    #[test]
    fn hosts_match_exactly_or_as_strict_subdomains() {
        assert!(host_matches("api.example.com", "api.example.com"));
        assert!(!host_matches("api.example.com", "x.api.example.com"));
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", ".example.com"));
        assert!(!host_matches("*.example.com", "evilexample.com"));
        assert!(!host_matches("*.example.com", "example.com.evil"));
        assert!(!host_matches("", ""));
        assert_eq!(normalize_host("API.Example.COM."), "api.example.com");
        assert_eq!(normalize_host("*.Example.com."), "*.example.com");
    }

    #[test]
    fn resolves_declared_hosts_in_any_case_with_or_without_the_root_dot() {
        let s = set(serde_json::json!([
            {"host": "API.example.com", "port": 443, "tls": true},
            {"host": "*.Files.example.", "port": 80},
        ]));
        assert_eq!(s.policies[0].egress_hosts, ["api.example.com", "*.files.example"]);
        for yes in [
            "api.example.com",
            "API.EXAMPLE.COM.",
            "a.files.example",
            "x.y.FILES.example.",
        ] {
            assert!(s.resolves(yes), "{yes}");
        }
        for no in [
            "example.com",
            "x.api.example.com",
            "files.example",
            "evilfiles.example",
            "api.example.com.evil",
            "api.example.com..",
            "",
            ".",
        ] {
            assert!(!s.resolves(no), "{no}");
        }
        assert!(!PolicySet::default().resolves("api.example.com"));
    }

    fn two(a: serde_json::Value, b: serde_json::Value) -> PolicySet {
        let mut s = set(a);
        s.policies.extend(set(b).policies);
        s
    }

    #[test]
    fn declared_hosts_are_intercepted_by_default_and_passthrough_ones_are_not() {
        let s = set(serde_json::json!([
            {"host": "API.example.com", "port": 443},
            {"host": "*.intercept.example", "port": 443, "tlsMode": "Intercept"},
            {"host": "pinned.example", "port": 443, "tlsMode": "Passthrough"},
            {"host": "10.1.2.3", "port": 443},
        ]));
        assert_eq!(
            s.policies[0].intercept_hosts,
            ["api.example.com", "*.intercept.example", "10.1.2.3"]
        );
        assert_eq!(s.policies[0].passthrough_hosts, ["pinned.example"]);
        for yes in [
            "api.example.com",
            "API.EXAMPLE.COM.",
            "a.intercept.example",
            "x.y.intercept.example",
            "10.1.2.3",
        ] {
            assert!(s.intercepts(yes), "{yes}");
            assert!(!s.passes_through(yes), "{yes}");
        }
        for no in [
            "pinned.example",
            "intercept.example",
            "evilintercept.example",
            "x.api.example.com",
            "undeclared.example",
            "mandate-no-sni",
            "",
            ".",
        ] {
            assert!(!s.intercepts(no), "{no}");
        }
        assert!(s.passes_through("Pinned.Example."));
        assert!(!s.passes_through("api.example.com"));
        assert!(!PolicySet::default().intercepts("api.example.com"));
        assert!(!PolicySet::default().passes_through("api.example.com"));
    }

    #[test]
    fn passthrough_in_any_policy_wins_over_intercept_in_another() {
        // Exact passthrough under an intercepted wildcard.
        let s = two(
            serde_json::json!([{"host": "*.example.com", "port": 443}]),
            serde_json::json!([{"host": "pinned.example.com", "port": 443, "tlsMode": "Passthrough"}]),
        );
        assert!(s.intercepts("api.example.com"));
        assert!(!s.intercepts("pinned.example.com"));
        assert!(s.passes_through("pinned.example.com"));
        // A passthrough wildcard over an exact intercept, in either order.
        for (a, b) in [
            (
                serde_json::json!([{"host": "api.example.com", "port": 443}]),
                serde_json::json!([{"host": "*.example.com", "port": 443, "tlsMode": "Passthrough"}]),
            ),
            (
                serde_json::json!([{"host": "*.example.com", "port": 443, "tlsMode": "Passthrough"}]),
                serde_json::json!([{"host": "api.example.com", "port": 443}]),
            ),
        ] {
            let s = two(a, b);
            assert!(!s.intercepts("api.example.com"));
            assert!(s.passes_through("api.example.com"));
        }
        // The same host both ways in one policy: passthrough.
        let s = set(serde_json::json!([
            {"host": "both.example", "port": 443},
            {"host": "both.example", "port": 8443, "tlsMode": "Passthrough"},
        ]));
        assert!(!s.intercepts("both.example"));
        // DryRun policies are in force for this too: their egress is declared.
        let mut dry = set(serde_json::json!([{"host": "dry.example", "port": 443}]));
        dry.policies[0].mode = PolicyMode::DryRun;
        assert!(dry.intercepts("dry.example"));
    }

    #[test]
    fn destinations_that_broker_credentials_are_known_with_or_without_a_value() {
        use crate::credential::{Credential, Placement, SecretValue};
        let mut s = set(serde_json::json!([
            {"host": "API.example.com.", "port": 443, "credential": {"secretKeyRef": {"name": "s", "key": "token"}}},
            {"host": "*.files.example", "port": 8443, "credential": {
                "secretKeyRef": {"name": "s", "key": "k"}, "queryParameter": "key", "agentSupplied": "Deny"}},
            {"host": "plain.example", "port": 443},
        ]));
        let brokered = &s.policies[0].brokered;
        assert_eq!(brokered.len(), 2);
        assert_eq!(brokered[0].host, "api.example.com");
        assert_eq!(brokered[0].placement, Placement::Header("authorization".into()));
        assert_eq!(brokered[0].prefix, "Bearer ");
        assert!(!brokered[0].deny_agent_supplied);
        assert_eq!(brokered[1].placement, Placement::QueryParameter("key".into()));
        assert_eq!(brokered[1].prefix, "");
        assert!(brokered[1].deny_agent_supplied);
        // Files: declared, never a value, and the reason says so.
        let b = s.brokered("api.EXAMPLE.com.", 443).unwrap();
        assert!(b.credential.unwrap_err().contains("loaded from files"));
        assert!(s.brokered("api.example.com", 80).is_none(), "another port");
        assert!(s.brokered("plain.example", 443).is_none());
        assert!(s.brokered("x.files.example", 8443).is_some());
        assert!(s.brokered("files.example", 8443).is_none());
        // Pushed, with a value for one of them.
        s.origin = SetOrigin::Operator;
        s.credentials.push(Credential {
            policy: "p".into(),
            host: "api.example.com".into(),
            port: 443,
            placement: Placement::Header("authorization".into()),
            prefix: "Bearer ".into(),
            deny_agent_supplied: false,
            value: Ok(SecretValue::new(b"t".to_vec())),
            source: "secret ns/s key token".into(),
            version: "1".into(),
            expires_unix: 0,
        });
        assert!(s.brokered("api.example.com", 443).unwrap().credential.is_ok());
        let why = s.brokered("a.files.example", 8443).unwrap().credential.unwrap_err();
        assert!(why.contains("the operator sent no value"), "{why}");
        assert_eq!(s.undeclared_credentials().count(), 0);
        // A DryRun policy brokers nothing (it must not widen what the agent can do).
        s.policies[0].mode = PolicyMode::DryRun;
        assert!(s.brokered("api.example.com", 443).is_none());
        assert_eq!(s.undeclared_credentials().count(), 1);
        s.policies[0].mode = PolicyMode::Enforce;
        s.credentials[0].port = 444;
        assert_eq!(s.undeclared_credentials().count(), 1);
    }

    #[test]
    fn tls_origination_normalizes_the_authority_like_dns_names() {
        let s = set(serde_json::json!([
            {"host": "API.example.com", "port": 443, "tls": true},
            {"host": "*.tls.example", "port": 443, "tls": true},
            {"host": "plain.example", "port": 80},
        ]));
        for yes in [
            "api.example.com",
            "api.example.com:443",
            "API.example.com.:443",
            "api.example.com.",
            "a.tls.example.:8443",
        ] {
            assert!(s.originates_tls(yes), "{yes}");
        }
        for no in [
            "plain.example",
            "plain.example.:80",
            "tls.example:443",
            "eviltls.example",
        ] {
            assert!(!s.originates_tls(no), "{no}");
        }
    }
}
