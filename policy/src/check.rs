//! Compiling an AgentPolicy and computing its version. No Kubernetes here:
//! the reconciler, the admission webhook and the CLI all call this.

use std::collections::BTreeSet;

use regorus::Engine;

use mandate_api::crd::AgentPolicySpec;

/// Upper bound on the Rego source plus data of one policy. Policies are
/// stored in etcd (objects up to ~1.5 MiB) and pushed to every sidecar; a
/// policy beyond this is a mistake or an attack.
pub const MAX_POLICY_BYTES: usize = 512 * 1024;

/// Why a policy does not compile. Messages are for the admin who wrote it:
/// they name the module, line and column where there is one.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the policy has no modules; add at least one under spec.modules")]
    NoModules,
    #[error("module name '{0}' is used twice; module names must be unique")]
    DuplicateModule(String),
    #[error("module {index} has an empty name; give each module a name such as authz.rego")]
    EmptyModuleName { index: usize },
    #[error("modules and data total {size} bytes, over the limit of {limit} bytes; split the policy or move data out")]
    TooLarge { size: usize, limit: usize },
    #[error("spec.data must be a JSON object (it is merged into `data` at the root); it is {0}")]
    DataNotObject(&'static str),
    #[error("spec.data cannot be loaded: {0}")]
    BadData(String),
    #[error("entrypoint '{0}' is not a rule reference like data.mandate.authz.decision")]
    BadEntrypoint(String),
    #[error("{0}")]
    Rego(String),
    #[error("entrypoint '{entrypoint}' is not defined by any module: {detail}")]
    MissingEntrypoint { entrypoint: String, detail: String },
    #[error("{0}")]
    TestsFailed(String),
    #[error("{module}:{line}:{col}: brackets nest deeper than {limit} levels")]
    TooDeep {
        module: String,
        line: usize,
        col: usize,
        limit: usize,
    },
    #[error("entrypoint '{0}' names a function; name a rule whose value is the decision")]
    EntrypointIsFunction(String),
}

impl PolicyError {
    /// A short, bounded reason for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoModules | Self::DuplicateModule(_) | Self::EmptyModuleName { .. } => "InvalidModules",
            Self::TooLarge { .. } => "TooLarge",
            Self::DataNotObject(_) | Self::BadData(_) => "InvalidData",
            Self::BadEntrypoint(_) | Self::MissingEntrypoint { .. } | Self::EntrypointIsFunction(_) => {
                "InvalidEntrypoint"
            }
            Self::TooDeep { .. } => "TooDeep",
            Self::Rego(_) => "RegoError",
            Self::TestsFailed(_) => "TestsFailed",
        }
    }
}

/// Deepest nesting of `[`, `{` and `(` accepted in a module.
pub const MAX_NESTING: usize = 32;

/// The first place where brackets nest deeper than `limit` (1-based line
/// and column), outside strings and comments.
fn nesting_too_deep(rego: &str, limit: usize) -> Option<(usize, usize)> {
    let mut depth = 0usize;
    let mut raw = false; // inside a `raw string`, which may span lines
    for (n, line) in rego.lines().enumerate() {
        let mut chars = line.char_indices();
        let mut quoted = false;
        while let Some((i, c)) = chars.next() {
            if raw {
                raw = c != '`';
                continue;
            }
            if quoted {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => quoted = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '#' => break,
                '"' => quoted = true,
                '`' => raw = true,
                '[' | '{' | '(' => {
                    depth += 1;
                    if depth > limit {
                        return Some((n + 1, i + 1));
                    }
                }
                ']' | '}' | ')' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    None
}

/// Longest one test rule may run.
pub const TEST_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// One `test_` rule's outcome.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TestResult {
    /// The test module's name.
    pub module: String,
    /// The rule's name (`test_...`).
    pub name: String,
    pub passed: bool,
    /// Why it failed: `false`, `undefined`, or the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// All of a policy's test results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestReport {
    pub results: Vec<TestResult>,
}

impl TestReport {
    pub fn failures(&self) -> impl Iterator<Item = &TestResult> {
        self.results.iter().filter(|r| !r.passed)
    }

    pub fn all_passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// `2 of 5 tests failed: a.rego test_x (undefined); ...` or `5 tests passed`.
    pub fn summary(&self) -> String {
        let failed: Vec<String> = self
            .failures()
            .map(|r| format!("{} {} ({})", r.module, r.name, r.detail.as_deref().unwrap_or("failed")))
            .collect();
        if failed.is_empty() {
            format!("{} test(s) passed", self.results.len())
        } else {
            format!(
                "{} of {} test(s) failed: {}",
                failed.len(),
                self.results.len(),
                failed.join("; ")
            )
        }
    }
}

/// Run the policy's test modules: every rule named `test_*` must be `true`.
/// The policy must compile first (the error is the compile error).
pub fn run_tests(spec: &AgentPolicySpec) -> Result<TestReport, PolicyError> {
    compile(spec)?;
    if spec.tests.is_empty() {
        return Ok(TestReport::default());
    }
    let mut engine = Engine::new();
    engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
        limit: TEST_TIME_LIMIT,
        check_interval: std::num::NonZeroU32::MIN,
    });
    let mut names: BTreeSet<&str> = spec.modules.iter().map(|m| m.name.as_str()).collect();
    if let Some(dup) = spec.tests.iter().find(|t| !names.insert(t.name.as_str())) {
        return Err(PolicyError::DuplicateModule(dup.name.clone()));
    }
    for m in spec.modules.iter().chain(&spec.tests) {
        engine
            .add_policy(m.name.clone(), m.rego.clone())
            .map_err(|e| PolicyError::Rego(rego_message(&e.to_string())))?;
    }
    if let Some(data) = &spec.data {
        engine
            .add_data_json(&data.to_string())
            .map_err(|e| PolicyError::BadData(e.to_string()))?;
    }
    let mut report = TestReport::default();
    for t in &spec.tests {
        let Some(package) = package_of(&t.rego) else {
            return Err(PolicyError::Rego(format!("{}: no package declaration", t.name)));
        };
        let rules = test_rule_names(&t.rego);
        if rules.is_empty() {
            report.results.push(TestResult {
                module: t.name.clone(),
                name: "(none)".into(),
                passed: false,
                detail: Some("the module defines no test_ rules".into()),
            });
        }
        for rule in rules {
            let outcome = engine.eval_rule(format!("data.{package}.{rule}"));
            let (passed, detail) = match outcome {
                Ok(regorus::Value::Bool(true)) => (true, None),
                Ok(regorus::Value::Undefined) => (false, Some("undefined".to_string())),
                Ok(v) => (false, Some(format!("got {v}"))),
                Err(e) => (false, Some(format!("error: {e}"))),
            };
            report.results.push(TestResult {
                module: t.name.clone(),
                name: rule,
                passed,
                detail,
            });
        }
    }
    Ok(report)
}

/// `package a.b` → `a.b`.
fn package_of(rego: &str) -> Option<String> {
    rego.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("package "))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
}

/// Names of the rules a test module defines at the start of a line: `test_x if ...`,
/// `test_x { ... }`, `test_x := ...`. Each once, in order.
fn test_rule_names(rego: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    rego.lines()
        .filter_map(|l| {
            let name: String = l
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (name.starts_with("test_") && seen.insert(name.clone())).then_some(name)
        })
        .collect()
}

/// A policy that compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// `sha256:<64 hex>`, see [`version`].
    pub version: String,
    /// The Rego packages the modules define.
    pub packages: Vec<String>,
}

pub use mandate_core::version::version;

/// Compile the policy's modules and data with regorus and check its entrypoint.
pub fn compile(spec: &AgentPolicySpec) -> Result<Compiled, PolicyError> {
    if spec.modules.is_empty() {
        return Err(PolicyError::NoModules);
    }
    let mut names = BTreeSet::new();
    for (index, m) in spec.modules.iter().enumerate() {
        if m.name.trim().is_empty() {
            return Err(PolicyError::EmptyModuleName { index });
        }
        if !names.insert(m.name.as_str()) {
            return Err(PolicyError::DuplicateModule(m.name.clone()));
        }
    }
    let data_json = match &spec.data {
        None => None,
        Some(v @ serde_json::Value::Object(_)) => Some(v.to_string()),
        Some(other) => return Err(PolicyError::DataNotObject(json_kind(other))),
    };
    let size = spec.modules.iter().map(|m| m.rego.len() + m.name.len()).sum::<usize>()
        + data_json.as_ref().map_or(0, String::len);
    if size > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge {
            size,
            limit: MAX_POLICY_BYTES,
        });
    }
    let rule = spec.entrypoint.trim();
    if !is_rule_ref(rule) {
        return Err(PolicyError::BadEntrypoint(spec.entrypoint.clone()));
    }
    // regorus parses deeply nested literals in exponential time (and can
    // overflow its stack): refuse them before it sees them.
    for m in &spec.modules {
        if let Some((line, col)) = nesting_too_deep(&m.rego, MAX_NESTING) {
            return Err(PolicyError::TooDeep {
                module: m.name.clone(),
                line,
                col,
                limit: MAX_NESTING,
            });
        }
    }
    if let Some((package, name)) = rule.rsplit_once('.') {
        let package = package.strip_prefix("data.").unwrap_or(package);
        let defines_function = spec.modules.iter().any(|m| {
            package_of(&m.rego).as_deref() == Some(package)
                && m.rego.lines().any(|l| {
                    l.trim_start()
                        .strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('('))
                })
        });
        if defines_function {
            return Err(PolicyError::EntrypointIsFunction(spec.entrypoint.trim().to_string()));
        }
    }

    let mut engine = Engine::new();
    for m in &spec.modules {
        engine
            .add_policy(m.name.clone(), m.rego.clone())
            .map_err(|e| PolicyError::Rego(rego_message(&e.to_string())))?;
    }
    if let Some(json) = data_json {
        engine
            .add_data_json(&json)
            .map_err(|e| PolicyError::BadData(e.to_string()))?;
    }
    let packages = engine.get_packages().map_err(|e| PolicyError::Rego(e.to_string()))?;
    // Data at a package's path would silently shadow its rules.
    if let Some(data) = &spec.data {
        for p in &packages {
            let path = p.strip_prefix("data.").unwrap_or(p);
            let mut at = Some(data);
            for seg in path.split('.') {
                at = at.and_then(|v| v.get(seg));
            }
            if at.is_some() {
                return Err(PolicyError::BadData(format!(
                    "spec.data has a value at {path}, the path of a package: it would hide the package's rules; move it elsewhere"
                )));
            }
        }
    }
    engine
        .compile_with_entrypoint(&rule.into())
        .map_err(|e| PolicyError::MissingEntrypoint {
            entrypoint: rule.to_string(),
            detail: e.to_string(),
        })?;
    Ok(Compiled {
        version: version(spec),
        packages,
    })
}

/// regorus reports `--> file:line:col`, a source excerpt, then `error: text`.
/// Lead with `file:line:col: text` (what editors and CI annotations read),
/// and keep the excerpt below it.
fn rego_message(raw: &str) -> String {
    let raw = raw.trim();
    let location = raw.lines().find_map(|l| l.trim().strip_prefix("--> "));
    let text = raw.lines().find_map(|l| l.trim().strip_prefix("error: "));
    match (location, text) {
        (Some(loc), Some(text)) => format!("{loc}: {text}\n{raw}"),
        _ => raw.to_string(),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `data.a.b_c.d`: `data` then one or more identifier segments.
fn is_rule_ref(s: &str) -> bool {
    let mut parts = s.split('.');
    parts.next() == Some("data")
        && s.split('.').count() > 1
        && parts.all(|p| {
            let mut cs = p.chars();
            cs.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
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
    fn a_good_policy_compiles_and_has_a_sha256_version() {
        let c = compile(&spec(&[("authz.rego", GOOD)])).unwrap();
        assert!(
            c.version.starts_with("sha256:") && c.version.len() == 7 + 64,
            "{}",
            c.version
        );
        assert!(
            c.packages.iter().any(|p| p.contains("mandate.authz")),
            "{:?}",
            c.packages
        );
    }

    #[test]
    fn a_syntax_error_names_module_line_and_column() {
        let bad = "package mandate.authz\nimport rego.v1\ndecision if {\n  input.x ==\n}\n";
        let err = compile(&spec(&[("authz.rego", bad)])).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.reason(), "RegoError");
        assert!(
            msg.starts_with("authz.rego:5:"),
            "message does not lead with module:line:col: {msg}"
        );
        assert!(
            msg.lines()
                .any(|l| l.contains("authz.rego:5:") || l.contains("authz.rego:4:")),
            "no line:col: {msg}"
        );
    }

    #[test]
    fn a_missing_entrypoint_is_reported() {
        let mut s = spec(&[("authz.rego", GOOD)]);
        s.entrypoint = "data.mandate.authz.nope".into();
        let err = compile(&s).unwrap_err();
        assert_eq!(err.reason(), "InvalidEntrypoint", "{err}");
        assert!(err.to_string().contains("data.mandate.authz.nope"), "{err}");
        s.entrypoint = "mandate.authz.decision".into();
        assert_eq!(
            compile(&s).unwrap_err(),
            PolicyError::BadEntrypoint("mandate.authz.decision".into())
        );
    }

    #[test]
    fn bad_modules_and_data_are_reported() {
        assert_eq!(compile(&spec(&[])).unwrap_err(), PolicyError::NoModules);
        assert_eq!(
            compile(&spec(&[("a.rego", GOOD), ("a.rego", HELPER)])).unwrap_err(),
            PolicyError::DuplicateModule("a.rego".into())
        );
        let mut s = spec(&[("authz.rego", GOOD)]);
        s.data = Some(serde_json::json!([1, 2]));
        assert_eq!(compile(&s).unwrap_err(), PolicyError::DataNotObject("an array"));
    }

    #[test]
    fn tests_pass_fail_and_name_what_failed() {
        let mut s = spec(&[("authz.rego", GOOD)]);
        s.tests = vec![RegoModule {
            name: "authz_test.rego".into(),
            rego: "package mandate.authz_test\nimport rego.v1\nimport data.mandate.authz\n\
                   test_get_allowed if authz.decision with input as {\"attributes\": {\"request\": {\"http\": {\"method\": \"GET\"}}}}\n\
                   test_delete_denied if not authz.decision with input as {\"attributes\": {\"request\": {\"http\": {\"method\": \"DELETE\"}}}}\n\
                   test_wrong if authz.decision with input as {\"attributes\": {\"request\": {\"http\": {\"method\": \"PUT\"}}}}\n"
                .into(),
        }];
        let report = run_tests(&s).unwrap();
        assert_eq!(report.results.len(), 3, "{report:?}");
        let failed: Vec<_> = report.failures().map(|r| r.name.as_str()).collect();
        assert_eq!(failed, ["test_wrong"]);
        assert!(report.summary().contains("1 of 3"), "{}", report.summary());
        assert!(
            report.summary().contains("authz_test.rego test_wrong (undefined)"),
            "{}",
            report.summary()
        );
    }

    #[test]
    fn hostile_shapes_are_refused_before_regorus_sees_them() {
        let deep = format!(
            "package mandate.authz\nimport rego.v1\ndecision := {}1{}\n",
            "[".repeat(40),
            "]".repeat(40)
        );
        let err = compile(&spec(&[("authz.rego", &deep)])).unwrap_err();
        assert_eq!(err.reason(), "TooDeep", "{err}");
        assert!(err.to_string().starts_with("authz.rego:3:"), "{err}");
        // Brackets inside strings and comments do not count.
        let fine = format!("{GOOD}# {}\nx := \"{}\"\n", "[".repeat(100), "{".repeat(100));
        assert!(compile(&spec(&[("authz.rego", &fine)])).is_ok());

        let func = "package mandate.authz\nimport rego.v1\ndecision(x) := true if x\n";
        assert_eq!(
            compile(&spec(&[("authz.rego", func)])).unwrap_err().reason(),
            "InvalidEntrypoint"
        );

        let mut shadow = spec(&[("authz.rego", GOOD)]);
        shadow.data = Some(serde_json::json!({"mandate": {"authz": {"decision": false}}}));
        let err = compile(&shadow).unwrap_err();
        assert!(err.to_string().contains("mandate.authz"), "{err}");
    }

    #[test]
    fn an_absurdly_large_policy_is_refused_before_parsing() {
        let huge = format!("{GOOD}\n# {}\n", "x".repeat(MAX_POLICY_BYTES));
        let err = compile(&spec(&[("authz.rego", &huge)])).unwrap_err();
        assert_eq!(err.reason(), "TooLarge", "{err}");
    }
}
