//! The example policies in policies/ decide the same under OPA 0.70 as under
//! Mandate's engine, for the same inputs; and their Rego tests pass under
//! `opa test` as under `mandate test`. Mandate's two evaluators (regorus' VM,
//! which decides requests, and its interpreter, which runs tests and the
//! policies the VM cannot compile) give the same whole decision.
//!
//! OPA: `$MANDATE_OPA`, else where `make deps` installs it.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test fixtures

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use mandate_api::crd::{PolicyDocument as AgentPolicy, PolicyMode};
use mandate_policy::engine::{EngineKind, LoadedPolicy, PolicySet};
use mandate_testsupport::opa;
use serde_json::{Value, json};

fn policies() -> Result<Vec<(PathBuf, AgentPolicy)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            let p: AgentPolicy = serde_yaml::from_str(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("{}", path.display()))?;
            out.push((path, p));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(
        out.len() >= 4,
        "expected at least four example policies, found {}",
        out.len()
    );
    Ok(out)
}

/// Write a policy's modules (and tests, and data) as files OPA reads.
fn bundle(p: &AgentPolicy, with_tests: bool) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "mandate-opa-{}-{}-{}",
        p.metadata.name.as_deref().unwrap_or("p"),
        with_tests,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let tests = if with_tests { p.spec.tests.as_slice() } else { &[] };
    for m in p.spec.modules.iter().chain(tests) {
        std::fs::write(dir.join(&m.name), &m.rego)?;
    }
    if let Some(data) = &p.spec.data {
        std::fs::write(dir.join("data.json"), data.to_string())?;
    }
    Ok(dir)
}

fn jwt(claims: Value) -> String {
    use std::fmt::Write;
    // base64url without padding, by hand (test-only; no crate needed)
    fn b64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                let c = A.get(((n >> (18 - 6 * i)) & 63) as usize).copied().unwrap_or(b'A');
                let _ = write!(out, "{}", c as char);
            }
        }
        out
    }
    format!(
        "Bearer {}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(claims.to_string().as_bytes())
    )
}

/// Inputs as the sidecar builds them, across methods, hosts, paths, agents and tokens.
fn inputs() -> Vec<Value> {
    let mut v = Vec::new();
    let admin = jwt(json!({"sub": "alice", "role": "admin"}));
    let guest = jwt(json!({"sub": "bob", "role": "guest"}));
    let none = Value::Null;
    let ticket = json!({"title": "printer on fire"});
    let personal = json!({"title": "call me", "email": "ann@example.com", "phone": "555-0100"});
    for (method, host, path, body) in [
        ("GET", "api.search.example.com", "/v1/search", &none),
        ("POST", "api.tickets.example.com", "/v2/tickets", &ticket),
        ("POST", "api.tickets.example.com", "/v2/tickets", &personal),
        ("DELETE", "api.tickets.example.com", "/v2/tickets/7", &none),
        ("GET", "data.internal.example", "/datasets/sales", &none),
        ("PUT", "data.internal.example", "/datasets/sales", &personal),
        ("GET", "data.internal.example", "/admin", &none),
        ("GET", "people.example.com", "/people", &none),
        ("POST", "people.example.com", "/people", &ticket),
        ("GET", "people.example.com", "/people/bob", &none),
        ("GET", "people.example.com", "/people/alice", &none),
        ("PATCH", "evil.example.net", "/x", &none),
    ] {
        for (agent, auth) in [("researcher", &guest), ("operator-bot", &admin)] {
            let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            v.push(json!({
                "attributes": {"request": {"http": {
                    "method": method, "host": host, "path": path,
                    "headers": {"authorization": auth, ":method": method},
                }}},
                "parsed_path": segments,
                "parsed_query": {},
                "parsed_body": body,
                "truncated_body": false,
                "version": {"encoding": "protojson", "ext_authz": "v3"},
                "agent": {"identity": agent},
            }));
        }
    }
    v
}

/// What OPA's value means, by the same rule the sidecar applies.
fn allowed(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::Object(o) => {
            o.get("allow").and_then(Value::as_bool).unwrap_or(false)
                && !o.get("escalate").and_then(Value::as_bool).unwrap_or(false)
        }
        _ => false,
    }
}

#[test]
fn example_policies_decide_alike_under_opa_and_mandate() -> Result<()> {
    let opa = opa();
    ensure!(opa.exists(), "no OPA at {} (run make deps)", opa.display());
    let inputs = inputs();
    let mut compared = 0;
    for (path, p) in policies()? {
        let name = p.metadata.name.clone().unwrap_or_default();
        let loaded = LoadedPolicy::compile(name.clone(), &p.spec)?;
        // Every example runs on the VM (the performance figures assume it).
        ensure!(loaded.evaluator() == "vm", "{name} does not compile for regorus' VM");
        let set = PolicySet {
            policies: vec![loaded],
            ..PolicySet::default()
        };
        let interpreted = PolicySet {
            policies: vec![LoadedPolicy::compile_for(
                name.clone(),
                &p.spec,
                EngineKind::Interpreter,
            )?],
            ..PolicySet::default()
        };
        let dir = bundle(&p, false)?;
        let (mut allows, mut denies) = (0, 0);
        for (i, input) in inputs.iter().enumerate() {
            // (Not inside the bundle: OPA would load it as data.)
            let input_file = dir.with_extension(format!("input-{i}.json"));
            std::fs::write(&input_file, input.to_string())?;
            let out = std::process::Command::new(&opa)
                .args(["eval", "--format", "json", "--data"])
                .arg(&dir)
                .arg("--input")
                .arg(&input_file)
                .arg(&p.spec.entrypoint)
                .output()
                .context("running opa eval")?;
            if !out.status.success() {
                bail!(
                    "opa eval failed for {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let result: Value = serde_json::from_slice(&out.stdout)?;
            let opa_value = result["result"][0]["expressions"][0]["value"].clone();
            let opa_allows = allowed(&opa_value);
            let ours = set.decide(input);
            let theirs = interpreted.decide(input);
            ensure!(
                ours == theirs,
                "{name}: input {i}: the VM decided {ours:?}, the interpreter {theirs:?}"
            );
            // A DryRun policy never blocks: compare its own verdict.
            let dry_run = p.spec.mode == PolicyMode::DryRun;
            let ours_allows = if dry_run {
                ours.verdicts.first().is_some_and(|v| v.result == "allow")
            } else {
                ours.allow
            };
            ensure!(
                ours_allows == opa_allows,
                "{name}: input {i} ({} {}{} as {}): OPA says {opa_value}, Mandate says allow={} ({})",
                input["attributes"]["request"]["http"]["method"],
                input["attributes"]["request"]["http"]["host"],
                input["attributes"]["request"]["http"]["path"],
                input["agent"]["identity"],
                ours_allows,
                ours.reason
            );
            if let Some(status) = opa_value
                .get("http_status")
                .and_then(Value::as_u64)
                .filter(|_| !opa_allows && !dry_run)
            {
                ensure!(
                    ours.http_status == u16::try_from(status).ok(),
                    "{name}: input {i}: status differs"
                );
            }
            compared += 1;
            if opa_allows { allows += 1 } else { denies += 1 }
        }
        // The inputs exercise both outcomes of every policy, or this proves little.
        ensure!(
            allows > 0 && denies > 0,
            "{name}: {allows} allowed, {denies} denied: the inputs do not exercise it"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    ensure!(compared >= 80, "only {compared} decisions compared");
    Ok(())
}

#[test]
fn example_policy_tests_pass_under_opa_test_too() -> Result<()> {
    let opa = opa();
    ensure!(opa.exists(), "no OPA at {} (run make deps)", opa.display());
    for (path, p) in policies()? {
        ensure!(!p.spec.tests.is_empty(), "{} has no tests", path.display());
        let report = mandate_policy::run_tests(&p.spec).map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(report.all_passed(), "{}: mandate: {}", path.display(), report.summary());
        let dir = bundle(&p, true)?;
        let out = std::process::Command::new(&opa)
            .arg("test")
            .arg(&dir)
            .arg("-v")
            .output()?;
        ensure!(
            out.status.success(),
            "{}: opa test failed:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let passed = String::from_utf8_lossy(&out.stdout).matches("PASS").count();
        ensure!(
            passed >= report.results.len(),
            "{}: OPA ran {passed} tests, Mandate {}",
            path.display(),
            report.results.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
