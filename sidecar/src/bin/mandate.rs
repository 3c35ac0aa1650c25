//! `mandate`: Mandate's command line for policy authors and auditors.
//!
//!   mandate test policies/                 run each AgentPolicy's Rego tests
//!   mandate eval policy.yaml --input in.json   print the decision for one input
//!   mandate verify-log decisions.log       check a decision log's hash chain
//!
//! (Also usable as `kubectl mandate` once installed as `kubectl-mandate`.)

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mandate_operator::crd::AgentPolicy;
use mandate_operator::policy;
use mandate_sidecar::decision_log;
use mandate_sidecar::engine::{LoadedPolicy, PolicySet};
use mandate_sidecar::loader;

#[derive(Debug, Parser)]
#[command(
    name = "mandate",
    version,
    about = "Test and evaluate AgentPolicies; verify decision logs"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the `test_` rules of each AgentPolicy's test modules; exit 1 if any fails.
    Test {
        /// AgentPolicy YAML files, or directories of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print every test, not only failures.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Decide one input (a JSON document as the sidecar builds it) with the
    /// policies in FILES, and print the decision as JSON.
    Eval {
        /// AgentPolicy YAML files, or directories of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The input document (JSON), `-` for standard input.
        #[arg(long, short)]
        input: PathBuf,
    },
    /// Check a decision log's hash chain; exit 1 at the first broken line.
    VerifyLog {
        /// The log (the sidecar's standard output), `-` for standard input.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<bool> {
    match args.command {
        Command::Test { paths, verbose } => test(&paths, verbose),
        Command::Eval { paths, input } => eval(&paths, &input),
        Command::VerifyLog { file } => {
            let text = read(&file)?;
            match decision_log::verify(&text) {
                Ok(v) => {
                    println!("ok: {} records in {} chain(s)", v.records, v.chains);
                    Ok(true)
                }
                Err(e) => {
                    println!("BROKEN: {e}");
                    Ok(false)
                }
            }
        }
    }
}

fn read(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        return std::io::read_to_string(std::io::stdin()).context("reading standard input");
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// YAML files under the paths (a path may be a file or a directory).
fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let (files, errors) = loader::yaml_files(paths);
    if let Some(e) = errors.first() {
        bail!("{}: {}", e.file.display(), e.message);
    }
    Ok(files)
}

/// Every AgentPolicy in a YAML file, with its display name.
fn policies_in(path: &Path) -> Result<Vec<(String, AgentPolicy)>> {
    loader::parse_file(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn test(paths: &[PathBuf], verbose: bool) -> Result<bool> {
    let (mut passed, mut failed, mut policies) = (0usize, 0usize, 0usize);
    for file in files(paths)? {
        for (name, p) in policies_in(&file)? {
            policies += 1;
            let label = format!("{} ({})", name, file.display());
            match policy::run_tests(&p.spec) {
                Err(e) => {
                    failed += 1;
                    println!("FAIL {label}: {e}");
                }
                Ok(report) if report.results.is_empty() => {
                    println!("---- {label}: no tests");
                }
                Ok(report) => {
                    for r in &report.results {
                        if r.passed {
                            passed += 1;
                            if verbose {
                                println!("PASS {label}: {} {}", r.module, r.name);
                            }
                        } else {
                            failed += 1;
                            println!(
                                "FAIL {label}: {} {} ({})",
                                r.module,
                                r.name,
                                r.detail.as_deref().unwrap_or("failed")
                            );
                        }
                    }
                }
            }
        }
    }
    if policies == 0 {
        bail!(
            "no AgentPolicy found in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "{}: {passed} passed, {failed} failed, in {policies} policies",
        if failed == 0 { "PASS" } else { "FAIL" }
    );
    Ok(failed == 0)
}

fn eval(paths: &[PathBuf], input: &Path) -> Result<bool> {
    let mut set = PolicySet::default();
    for file in files(paths)? {
        for (name, p) in policies_in(&file)? {
            let loaded = LoadedPolicy::compile(name.clone(), &p).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            set.policies.push(loaded);
        }
    }
    let doc: serde_json::Value = serde_json::from_str(&read(input)?).context("the input is not JSON")?;
    let d = set.decide(&doc);
    let out = serde_json::json!({
        "allow": d.allow,
        "escalate": d.escalate,
        "reason": d.reason,
        "http_status": d.http_status,
        "headers": d.headers,
        "body": d.body,
        "policies": d.verdicts,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(true)
}
