//! Engine-level decision cases as data: every file in tests/cases/ holds
//! policies, an input document (or several) and the decision they must make,
//! and runs through the engine the sidecar uses (`LoadedPolicy::compile_for`,
//! `PolicySet::decide`). Every failing case is reported, by file name.
//!
//! A case (unknown fields are errors):
//!
//! ```yaml
//! description: what the case shows
//! engine: both            # vm (EngineKind::Auto), interpreter, or both (which must also agree)
//! policies:
//! - name: get-only        # inline: name, mode (default Enforce), modules, data, entrypoint
//!   mode: Enforce
//!   modules:
//!   - name: p.rego
//!     rego: |
//!       package mandate.authz
//!       ...
//!   evaluator: vm         # what `vm` compiles it for (default vm; interpreter when the VM cannot)
//! - file: policies/no-destructive-methods.yaml   # or an AgentPolicy file, from the repo root
//! input: {attributes: {request: {http: {method: GET}}}}   # or inputs: [..], each deciding alike
//! expect:
//!   allow: false
//!   escalate: false                        # optional, as every field below
//!   reason: "get-only: denied by policy"   # exact; and/or reason_contains: [..]
//!   http_status: 451
//!   body: '{"why":"no"}'
//!   headers: {x-why: policy}               # the whole map
//!   verdicts:                              # every policy's, in order
//!   - {name: get-only, mode: Enforce, result: deny, reason: denied by policy}
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use mandate_api::crd::{AgentPolicySpec, PolicyDocument};
use mandate_policy::engine::{Decision, EngineKind, LoadedPolicy, PolicySet};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    description: String,
    engine: Engine,
    policies: Vec<Policy>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    inputs: Option<Vec<Value>>,
    expect: Expect,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Engine {
    Vm,
    Interpreter,
    Both,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Evaluator {
    Vm,
    Interpreter,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Policy {
    /// Inline: the policy's name (with `file`: instead of `metadata.name`).
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    modules: Option<Vec<Module>>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    entrypoint: Option<String>,
    /// An AgentPolicy YAML file, relative to the repository root.
    #[serde(default)]
    file: Option<PathBuf>,
    /// What the `vm` engine compiles it for.
    #[serde(default)]
    evaluator: Option<Evaluator>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Module {
    name: String,
    rego: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    allow: bool,
    #[serde(default)]
    escalate: Option<bool>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    reason_contains: Vec<String>,
    #[serde(default)]
    http_status: Option<u16>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    verdicts: Option<Vec<Verdict>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Verdict {
    name: String,
    #[serde(default)]
    mode: Option<String>,
    result: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    reason_contains: Vec<String>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The policy's name and spec, inline or from its file.
fn spec(p: &Policy) -> Result<(String, AgentPolicySpec), String> {
    if let Some(file) = &p.file {
        if p.mode.is_some() || p.modules.is_some() || p.data.is_some() || p.entrypoint.is_some() {
            return Err(format!(
                "{}: `file` takes no mode, modules, data or entrypoint",
                file.display()
            ));
        }
        let text = std::fs::read_to_string(repo_root().join(file)).map_err(|e| format!("{}: {e}", file.display()))?;
        let doc: PolicyDocument = serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        let name = p
            .name
            .clone()
            .or(doc.metadata.name)
            .ok_or_else(|| format!("{}: no metadata.name and no name", file.display()))?;
        return Ok((name, doc.spec));
    }
    let name = p.name.clone().ok_or("an inline policy needs a name (or give a file)")?;
    let modules = p
        .modules
        .as_ref()
        .ok_or_else(|| format!("policy {name}: no modules and no file"))?;
    let mut spec = serde_json::Map::new();
    spec.insert("modules".into(), serde_json::json!(modules));
    if let Some(mode) = &p.mode {
        spec.insert("mode".into(), Value::from(mode.as_str()));
    }
    if let Some(data) = &p.data {
        spec.insert("data".into(), data.clone());
    }
    if let Some(entrypoint) = &p.entrypoint {
        spec.insert("entrypoint".into(), Value::from(entrypoint.as_str()));
    }
    let spec = serde_json::from_value(Value::Object(spec)).map_err(|e| format!("policy {name}: {e}"))?;
    Ok((name, spec))
}

/// The set compiled for one engine, each policy checked to run on the
/// evaluator the case expects.
fn compile(case: &Case, kind: EngineKind) -> Result<PolicySet, String> {
    let mut policies = Vec::new();
    for p in &case.policies {
        let (name, spec) = spec(p)?;
        let loaded = LoadedPolicy::compile_for(name.clone(), &spec, kind)
            .map_err(|e| format!("policy {name} does not compile: {e}"))?;
        let want = match kind {
            EngineKind::Interpreter => "interpreter",
            EngineKind::Auto => match p.evaluator.unwrap_or(Evaluator::Vm) {
                Evaluator::Vm => "vm",
                Evaluator::Interpreter => "interpreter",
            },
        };
        if loaded.evaluator() != want {
            return Err(format!(
                "policy {name} runs on the {}, not the {want}",
                loaded.evaluator()
            ));
        }
        policies.push(loaded);
    }
    Ok(PolicySet {
        policies,
        ..PolicySet::default()
    })
}

/// Every way `d` differs from `e`.
fn mismatches(d: &Decision, e: &Expect) -> Vec<String> {
    let mut out = Vec::new();
    if d.allow != e.allow {
        out.push(format!("allow is {}, expected {}", d.allow, e.allow));
    }
    if let Some(esc) = e.escalate
        && d.escalate != esc
    {
        out.push(format!("escalate is {}, expected {esc}", d.escalate));
    }
    if let Some(reason) = &e.reason
        && d.reason != *reason
    {
        out.push(format!("reason is {:?}, expected {reason:?}", d.reason));
    }
    for part in &e.reason_contains {
        if !d.reason.contains(part.as_str()) {
            out.push(format!("reason {:?} does not contain {part:?}", d.reason));
        }
    }
    if let Some(status) = e.http_status
        && d.http_status != Some(status)
    {
        out.push(format!("http_status is {:?}, expected {status}", d.http_status));
    }
    if let Some(body) = &e.body
        && d.body.as_deref() != Some(body.as_str())
    {
        out.push(format!("body is {:?}, expected {body:?}", d.body));
    }
    if let Some(headers) = &e.headers
        && d.headers != *headers
    {
        out.push(format!("headers are {:?}, expected {headers:?}", d.headers));
    }
    if let Some(verdicts) = &e.verdicts {
        if d.verdicts.len() != verdicts.len() {
            out.push(format!(
                "{} verdicts, expected {}: {:?}",
                d.verdicts.len(),
                verdicts.len(),
                d.verdicts
            ));
        }
        for (i, (got, want)) in d.verdicts.iter().zip(verdicts).enumerate() {
            let mut wrong = Vec::new();
            if got.name != want.name {
                wrong.push(format!("name {:?}, expected {:?}", got.name, want.name));
            }
            if let Some(mode) = &want.mode
                && got.mode != mode
            {
                wrong.push(format!("mode {:?}, expected {mode:?}", got.mode));
            }
            if got.result != want.result {
                wrong.push(format!("result {:?}, expected {:?}", got.result, want.result));
            }
            let reason = got.reason.as_deref();
            if let Some(r) = &want.reason
                && reason != Some(r.as_str())
            {
                wrong.push(format!("reason {reason:?}, expected {r:?}"));
            }
            for part in &want.reason_contains {
                if !reason.is_some_and(|r| r.contains(part.as_str())) {
                    wrong.push(format!("reason {reason:?} does not contain {part:?}"));
                }
            }
            if !wrong.is_empty() {
                out.push(format!("verdict {i}: {}", wrong.join("; ")));
            }
        }
    }
    out
}

/// Run one case: every problem, none when it holds.
fn run(case: &Case) -> Vec<String> {
    if case.description.trim().is_empty() {
        return vec!["the description is empty".into()];
    }
    let inputs: Vec<&Value> = match (&case.input, &case.inputs) {
        (Some(one), None) => vec![one],
        (None, Some(many)) if !many.is_empty() => many.iter().collect(),
        _ => return vec!["give exactly one of `input` and `inputs` (not empty)".into()],
    };
    let engines: &[(&str, EngineKind)] = match case.engine {
        Engine::Vm => &[("vm", EngineKind::Auto)],
        Engine::Interpreter => &[("interpreter", EngineKind::Interpreter)],
        Engine::Both => &[("vm", EngineKind::Auto), ("interpreter", EngineKind::Interpreter)],
    };
    let mut problems = Vec::new();
    let mut sets = Vec::new();
    for (label, kind) in engines {
        match compile(case, *kind) {
            Ok(set) => sets.push((*label, set)),
            Err(e) => problems.push(format!("{label}: {e}")),
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    for (i, input) in inputs.iter().enumerate() {
        let at = if inputs.len() > 1 {
            format!("input {i}, ")
        } else {
            String::new()
        };
        let decisions: Vec<(&str, Decision)> = sets.iter().map(|(l, s)| (*l, s.decide(input))).collect();
        for (label, d) in &decisions {
            for m in mismatches(d, &case.expect) {
                problems.push(format!("{at}{label}: {m}"));
            }
        }
        // both: the VM and the interpreter must give the same whole decision
        if let [(_, vm), (_, interp)] = decisions.as_slice()
            && vm != interp
        {
            problems.push(format!(
                "{at}the VM and the interpreter disagree:\n  vm: {vm:?}\n  interpreter: {interp:?}"
            ));
        }
    }
    problems
}

#[test]
fn every_decision_case_holds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    let stray: Vec<_> = files
        .iter()
        .filter(|p| p.extension().is_none_or(|x| x != "yaml"))
        .collect();
    assert!(stray.is_empty(), "not .yaml, so never run: {stray:?}");
    assert!(!files.is_empty(), "no cases in {}", dir.display());
    let mut failed = String::new();
    for path in &files {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let problems = match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_yaml::from_str::<Case>(&t).map_err(|e| e.to_string()))
        {
            Ok(case) => run(&case),
            Err(e) => vec![format!("not a case: {e}")],
        };
        for p in problems {
            let _ = writeln!(failed, "{file}: {p}");
        }
    }
    assert!(failed.is_empty(), "failing decision cases:\n{failed}");
}
