//! `mandate`: Mandate's command line for policy authors and auditors.
//!
//!   mandate test policies/                 run each AgentPolicy's Rego tests
//!   mandate eval policy.yaml --input in.json   print the decision for one input
//!   mandate verify-log decisions.log       check a decision log's hash chain
//!   mandate agents [-n NS | -A]            agents, identities, pods, policies (from the cluster)
//!
//! (Also usable as `kubectl mandate` once installed as `kubectl-mandate`.)

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mandate_api::crd::PolicyDocument;
use mandate_policy as policy;
use mandate_policy::engine::{LoadedPolicy, PolicySet};
use mandate_sidecar::decision_log;
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
    /// List the agents in the cluster (kubeconfig as kubectl finds it): each
    /// AgentIdentity, its SPIFFE ID, its pods (and their SVIDs' expiry), and
    /// the AgentPolicies bound to it.
    Agents {
        /// Namespace (default: the kubeconfig's).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
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
        Command::Agents {
            namespace,
            all_namespaces,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(agents(namespace, all_namespaces))
        }
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
fn policies_in(path: &Path) -> Result<Vec<(String, PolicyDocument)>> {
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
            let loaded = LoadedPolicy::compile(name.clone(), &p.spec).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
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

/// `mandate agents`: one line per (identity, pod), policies bound to the identity.
async fn agents(namespace: Option<String>, all: bool) -> Result<bool> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ListParams;
    use kube::{Api, ResourceExt};
    use mandate_api::crd::AgentIdentity;
    use mandate_core::binding;

    let client = kube::Client::try_default()
        .await
        .context("connecting to the cluster (kubeconfig or in-cluster)")?;
    let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    use mandate_api::crd::AgentPolicy;
    let (ids, pols, pods): (Api<AgentIdentity>, Api<AgentPolicy>, Api<Pod>) = if all {
        (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        )
    } else {
        (
            Api::namespaced(client.clone(), &ns),
            Api::namespaced(client.clone(), &ns),
            Api::namespaced(client.clone(), &ns),
        )
    };
    let lp = ListParams::default();
    let (ids, pols, pods) = (ids.list(&lp).await?, pols.list(&lp).await?, pods.list(&lp).await?);
    println!(
        "{:<20} {:<20} {:<56} {:<28} {:<22} POLICIES",
        "NAMESPACE", "IDENTITY", "SPIFFE ID", "POD", "SVID EXPIRES"
    );
    for id in &ids.items {
        let id_ns = id.namespace().unwrap_or_default();
        let name = id.name_any();
        let status = id.status.clone().unwrap_or_default();
        let mine: Vec<&Pod> = pods
            .items
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(id_ns.as_str()))
            .filter(|p| binding::selects(&id.spec.selector, p.labels()))
            .collect();
        let bound: Vec<String> = pols
            .items
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(id_ns.as_str()))
            .filter(|p| {
                p.spec.identities.contains(&name)
                    || mine
                        .iter()
                        .any(|pod| binding::policy_binds(&p.spec, None, pod.labels()))
            })
            .map(|p| format!("{}({:?})", p.name_any(), p.spec.mode))
            .collect();
        let policies = if bound.is_empty() {
            "-".to_string()
        } else {
            bound.join(",")
        };
        let spiffe = status.spiffe_id.clone().unwrap_or_else(|| "(unresolved)".into());
        if mine.is_empty() {
            println!("{id_ns:<20} {name:<20} {spiffe:<56} {:<28} {:<22} {policies}", "-", "-");
        }
        for pod in mine {
            let pod_name = pod.name_any();
            let injected = pod.annotations().contains_key(mandate_api::names::INJECTED_ANNOTATION);
            let expires = if injected {
                status
                    .svids
                    .iter()
                    .find(|s| s.pod == pod_name)
                    .map(|s| s.expires_at.0.to_string())
                    .unwrap_or_else(|| "no SVID".into())
            } else {
                // Selected, but never injected: no proxy, no decision.
                "UNMEDIATED".into()
            };
            println!("{id_ns:<20} {name:<20} {spiffe:<56} {pod_name:<28} {expires:<22} {policies}");
        }
        // Posture: what its pods still hold, and how broad its account is.
        if let Some(p) = &status.posture {
            for c in &p.held_credentials {
                println!("  {id_ns}/{name} holds: {c}");
            }
            for r in &p.broad_rbac {
                println!("  {id_ns}/{name} may: {r}");
            }
            if !p.egress.is_empty() {
                // One line: each declared destination, and whether Mandate brokers its credential.
                let dests: Vec<String> = p
                    .egress
                    .iter()
                    .map(|e| format!("{}:{}{}", e.host, e.port, if e.brokered { " (brokered)" } else { "" }))
                    .collect();
                let unbrokered = p.egress.iter().filter(|e| !e.brokered).count();
                println!(
                    "  {id_ns}/{name} egress ({unbrokered} of {} not brokered): {}",
                    p.egress.len(),
                    dests.join(", ")
                );
            }
        }
    }
    Ok(true)
}
