//! The `mandate` command line: test, eval, verify-log, and their exit codes.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test fixtures

use std::process::{Command, Output};

fn mandate(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn test_passes_the_examples_and_fails_a_broken_test() {
    let ok = mandate(&["test", "policies/"], None);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("0 failed"), "{}", text(&ok));

    let dir = std::env::temp_dir().join(format!("mandate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/no-destructive-methods.yaml"
    ))
    .unwrap();
    let broken = src.replace(
        "test_other_agent_can_delete if {\n        authz.decision",
        "test_other_agent_can_delete if {\n        not authz.decision",
    );
    assert_ne!(src, broken, "the fixture edit did not apply");
    let file = dir.join("broken.yaml");
    std::fs::write(&file, broken).unwrap();
    let bad = mandate(&["test", file.to_str().unwrap()], None);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(
        text(&bad).contains("FAIL no-destructive-methods") && text(&bad).contains("test_other_agent_can_delete"),
        "{}",
        text(&bad)
    );

    let missing = mandate(&["test", "/nonexistent"], None);
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing));
    assert!(text(&missing).contains("no such file"), "{}", text(&missing));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_prints_the_decision() {
    let input =
        r#"{"attributes":{"request":{"http":{"method":"GET","host":"api.search.example.com","path":"/v1/search"}}}}"#;
    let out = mandate(&["eval", "policies/tool-allowlist.yaml", "--input", "-"], Some(input));
    assert!(out.status.success(), "{}", text(&out));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["allow"], true, "{d}");
    let input = input.replace("GET", "DELETE");
    let out = mandate(&["eval", "policies/tool-allowlist.yaml", "--input", "-"], Some(&input));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["allow"], false, "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("not an allowed tool call"),
        "{d}"
    );
}

#[test]
fn verify_log_accepts_a_chain_and_names_the_broken_line() {
    use mandate_sidecar::decision_log::DecisionLog;
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let log = DecisionLog::new(Box::new(buf.clone()), &[]);
    for i in 0..4 {
        let mut r = serde_json::Map::new();
        r.insert("decision_id".into(), serde_json::json!(i));
        r.insert("result".into(), serde_json::json!("deny"));
        log.write(r).unwrap();
    }
    let good = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let out = mandate(&["verify-log", "-"], Some(&good));
    assert!(
        out.status.success() && text(&out).contains("4 records"),
        "{}",
        text(&out)
    );
    let tampered = good
        .replacen("\"deny\"", "\"allow\"", 3)
        .replacen("\"allow\"", "\"deny\"", 2);
    let out = mandate(&["verify-log", "-"], Some(&tampered));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("line 3"), "{}", text(&out));
}
