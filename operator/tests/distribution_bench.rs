//! The policy-distribution benchmark (not run by `cargo test`; `make
//! bench-distribution` runs it against the test cluster and prints the
//! figures): 50 sidecar processes subscribed for one agent, 20 policy
//! changes applied, apply → enforced-everywhere latency p50/p99 (taken from
//! the sidecars' own log timestamps of the swap); then the operator's
//! memory with 1 000 policies and 10 000 identities' worth of objects.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // a benchmark harness

use std::path::PathBuf;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Patch, PatchParams, PostParams};
use mandate_api::crd::{AgentIdentity, AgentPolicy};
use mandate_e2e::{Cluster, secs};
use mandate_testsupport::{
    Process, agent_identity, agent_policy, eventually, free_port as port, http_ok, wait_for, workspace_binary,
};
use serde_json::json;

mod support;
use support::{Shape, agent_pod, set_enforced};

const TD: &str = "example.org";
const SIDECARS: usize = 50;
const CHANGES: usize = 20;

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// The process's peak resident set so far.
fn peak_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn rego(i: usize) -> String {
    format!(
        "package mandate.authz\nimport rego.v1\ndefault decision := false\ndecision if input.attributes.request.http.path == \"/v{i}\"\n"
    )
}

#[tokio::test]
#[ignore = "a benchmark: make bench-distribution"]
async fn distribution_benchmark() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("bench-op").await?;
    let ns = cluster.namespace("bench-agents").await?;
    let log = std::env::temp_dir().join(format!("mandate-bench-{}.log", ns.name()));
    let (identity, policy) = (port(), port());
    let admin = port();
    // The operator binary: this build's, or another one to compare (e.g. the
    // static musl build in the images: MANDATE_BENCH_OPERATOR=target/x86_64-unknown-linux-musl/release/mandate-operator).
    let operator_bin = std::env::var_os("MANDATE_BENCH_OPERATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mandate-operator")));
    println!("operator binary: {}", operator_bin.display());
    let mut cmd = tokio::process::Command::new(&operator_bin);
    cmd.args(["--admin-addr", &format!("127.0.0.1:{admin}"), "--no-webhooks"])
        .args(["--watch-namespace", ns.name(), "--lease-namespace", op.name()])
        .args(["--operator-namespace", op.name(), "--trust-domain", TD])
        .args([
            "--identity-addr",
            &format!("127.0.0.1:{identity}"),
            "--identity-san",
            "127.0.0.1",
        ])
        .args(["--policy-addr", &format!("127.0.0.1:{policy}")])
        .env("KUBECONFIG", &cluster.info().kubeconfig)
        .env("MANDATE_LOG", "warn")
        // As the chart runs it: glibc's malloc limited to two arenas (without
        // it, fragmentation across per-thread arenas costs ~60 MiB here; musl
        // builds ignore it).
        .env("MALLOC_ARENA_MAX", "2");
    let mut operator = Process::spawn_split("mandate-operator", &mut cmd, None, &log)?;
    let pid = operator.id().context("no operator pid")?;
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    eventually("the operator to be ready", secs(60), async || http_ok(&readyz).await)
        .await
        .context("operator not ready")?;
    ns.create_service_account("agent-sa").await?;
    set_enforced(&cluster, ns.name(), true).await?;
    ns.create::<AgentIdentity>(&agent_identity("agent").match_label("agent", "bench").parse()?)
        .await?;
    let policies = ns.api::<AgentPolicy>();
    let policy_i = |i: usize| agent_policy("p").identity("agent").module("p.rego", &rego(i));
    let apply = |i: usize| {
        let p: AgentPolicy = policy_i(i).parse().unwrap();
        let policies = policies.clone();
        async move {
            policies
                .patch("p", &PatchParams::apply("bench").force(), &Patch::Apply(&p))
                .await
        }
    };
    apply(0).await?;

    let bundle = op
        .api::<ConfigMap>()
        .get("mandate-trust-bundle")
        .await?
        .data
        .and_then(|d| d.get("bundle.pem").cloned())
        .context("no bundle")?;
    let dir = std::env::temp_dir().join(format!("mandate-bench-{}", ns.name()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bundle.pem"), &bundle)?;
    let sidecar_bin = workspace_binary("mandate-sidecar")?;
    let mut children = Vec::new();
    let mut logs = Vec::new();
    for i in 0..SIDECARS {
        // Pods bound to no real node: they exist (tokens bind to them) but never run.
        let pod = ns
            .create::<Pod>(&serde_json::from_value(agent_pod(
                &format!("agent-{i}"),
                "agent-sa",
                json!({"agent": "bench"}),
                "none:1",
                Some("no-such-node"),
                Shape::Injected,
            ))?)
            .await?;
        let token = ns.pod_token("agent-sa", &pod, "mandate", 3600).await?;
        let tok = dir.join(format!("{i}.token"));
        std::fs::write(&tok, token)?;
        let err = dir.join(format!("{i}.err"));
        let mut cmd = tokio::process::Command::new(&sidecar_bin);
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{}", port()),
            "--admin-listen",
            &format!("127.0.0.1:{}", port()),
        ])
        .args(["--svid-server", &format!("https://127.0.0.1:{identity}")])
        .args(["--policy-server", &format!("https://127.0.0.1:{policy}")])
        .args(["--trust-domain", TD, "--agent-pod", &pod.name_any(), "--log", "info"])
        .arg("--svid-token-file")
        .arg(&tok)
        .arg("--trust-bundle-file")
        .arg(dir.join("bundle.pem"));
        children.push(Process::spawn_split("mandate-sidecar", &mut cmd, None, &err)?);
        logs.push(err);
    }

    // The time each sidecar logged `version` in force, once all have.
    let enforced_at = |version: String| {
        let logs = logs.clone();
        async move {
            let mut enforcing = 0;
            wait_for(format!("every sidecar to enforce {version}"), secs(60))
                .until_some(async || {
                    let mut times = Vec::new();
                    for l in &logs {
                        let text = std::fs::read_to_string(l).unwrap_or_default();
                        let line = text
                            .lines()
                            .find(|x| x.contains("policy in force (pushed)") && x.contains(&version));
                        if let Some(t) = line.and_then(|x| x.split_whitespace().next()) {
                            // Strip ANSI colour codes around the timestamp.
                            let clean: String = t.replace("\u{1b}[2m", "").replace("\u{1b}[0m", "");
                            if let Ok(ts) = clean.parse::<jiff::Timestamp>() {
                                times.push(ts);
                            }
                        }
                    }
                    if times.len() == logs.len() {
                        return Ok(times.into_iter().max());
                    }
                    enforcing = times.len();
                    Ok(None)
                })
                .await
                .with_context(|| format!("only {enforcing} of {} sidecars enforce {version}", logs.len()))
        }
    };
    let first = mandate_policy::version(&policy_i(0).spec()?);
    enforced_at(first).await?;

    let mut lat = Vec::new();
    for i in 1..=CHANGES {
        let v = mandate_policy::version(&policy_i(i).spec()?);
        let t0 = jiff::Timestamp::now();
        apply(i).await?;
        let done = enforced_at(v).await?;
        lat.push(done.duration_since(t0).as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "apply -> enforced in all {SIDECARS} sidecars, {CHANGES} changes: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 <= 1000 ms)",
        pct(0.5),
        pct(0.99),
        lat.last().unwrap()
    );
    println!("operator RSS with {SIDECARS} streams: {:.1} MiB", rss_mib(pid));

    // Scale: 1 000 policies and 10 000 identities' worth of objects.
    for i in 0..1000 {
        let p: AgentPolicy = agent_policy(&format!("scale-{i}"))
            .identity(&format!("id-{}", i % 100))
            .module("p.rego", &rego(i))
            .parse()?;
        policies.create(&PostParams::default(), &p).await?;
    }
    let ids = ns.api::<AgentIdentity>();
    for i in 0..10_000 {
        let id: AgentIdentity = agent_identity(&format!("id-{i}"))
            .match_label("agent", &format!("a{i}"))
            .parse()?;
        ids.create(&PostParams::default(), &id).await?;
    }
    // Let the operator reconcile them all (each policy Ready).
    let mut ready = 0;
    wait_for("the operator to reconcile all 1 001 policies", secs(600))
        .every(secs(1))
        .until_ok(async || {
            let list = policies.list(&Default::default()).await?;
            ready = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.version.as_ref()).is_some())
                .count();
            Ok(ready >= 1001)
        })
        .await
        .with_context(|| format!("only {ready} policies reconciled"))?;
    println!(
        "operator RSS with 1 000 policies, 10 000 identities, {SIDECARS} streams: {:.1} MiB, peak {:.1} MiB (target <= 150 MiB)",
        rss_mib(pid),
        peak_mib(pid)
    );
    operator.kill().await?;
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);
    op.delete().await?;
    ns.delete().await
}
