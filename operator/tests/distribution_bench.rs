//! The policy-distribution benchmark (not run by `cargo test`; `make
//! bench-distribution` runs it against the test cluster and prints the
//! figures): 50 sidecar processes subscribed for one agent, 20 policy
//! changes applied, apply → enforced-everywhere latency p50/p99 (taken from
//! the sidecars' own log timestamps of the swap); then the operator's
//! memory with 1 000 policies and 10 000 identities' worth of objects.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // a benchmark harness

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::ResourceExt;
use kube::api::{Patch, PatchParams, PostParams};
use mandate_api::crd::{AgentIdentity, AgentPolicy};
use mandate_e2e::{Cluster, http_get, secs};
use serde_json::json;

mod support;
use support::port;

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
    let mut operator = tokio::process::Command::new(&operator_bin)
        .args(["--admin-addr", &format!("127.0.0.1:{admin}"), "--no-webhooks"])
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
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log)?))
        .kill_on_drop(true)
        .spawn()?;
    let pid = operator.id().context("no operator pid")?;
    let deadline = tokio::time::Instant::now() + secs(60);
    while !matches!(
        http_get(&format!("http://127.0.0.1:{admin}/readyz")).await,
        Ok((200, _))
    ) {
        ensure!(tokio::time::Instant::now() < deadline, "operator not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ns.create::<ServiceAccount>(&serde_json::from_value(json!({"metadata": {"name": "agent-sa"}}))?)
        .await?;
    ns.create::<AgentIdentity>(&serde_json::from_value(json!({
        "metadata": {"name": "agent"}, "spec": {"selector": {"matchLabels": {"agent": "bench"}}}}))?)
        .await?;
    let policies = ns.api::<AgentPolicy>();
    let apply = |i: usize| {
        let p: AgentPolicy = serde_json::from_value(json!({
            "apiVersion": "mandate.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "p"},
            "spec": {"identities": ["agent"], "modules": [{"name": "p.rego", "rego": rego(i)}]}}))
        .unwrap();
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
    let sidecar_bin = PathBuf::from(env!("CARGO_BIN_EXE_mandate-operator")).with_file_name("mandate-sidecar");
    let mut children = Vec::new();
    let mut logs = Vec::new();
    for i in 0..SIDECARS {
        // Pods bound to no real node: they exist (tokens bind to them) but never run.
        let pod = ns
            .create::<Pod>(&serde_json::from_value(json!({
                "metadata": {"name": format!("agent-{i}"), "labels": {"agent": "bench"},
                             "annotations": {"mandate.dev/injected": "bench"}},
                "spec": {"serviceAccountName": "agent-sa", "nodeName": "no-such-node",
                         "containers": [{"name": "c", "image": "none:1"}]},
            }))?)
            .await?;
        let tr = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec!["mandate".into()],
                expiration_seconds: Some(3600),
                bound_object_ref: Some(BoundObjectReference {
                    kind: Some("Pod".into()),
                    api_version: Some("v1".into()),
                    name: Some(pod.name_any()),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..TokenRequest::default()
        };
        let token = ns
            .api::<ServiceAccount>()
            .create_token_request("agent-sa", &PostParams::default(), &tr)
            .await?
            .status
            .context("no token")?
            .token;
        let tok = dir.join(format!("{i}.token"));
        std::fs::write(&tok, token)?;
        let err = dir.join(format!("{i}.err"));
        children.push(
            tokio::process::Command::new(&sidecar_bin)
                .args([
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
                .arg(dir.join("bundle.pem"))
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(&err)?))
                .kill_on_drop(true)
                .spawn()?,
        );
        logs.push(err);
    }

    // The time each sidecar logged `version` in force, once all have.
    let enforced_at = |version: String| {
        let logs = logs.clone();
        async move {
            let deadline = tokio::time::Instant::now() + secs(60);
            loop {
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
                    return Ok::<_, anyhow::Error>(times.into_iter().max().unwrap());
                }
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "only {} of {} sidecars enforce {version}",
                    times.len(),
                    logs.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let first = mandate_policy::version(&serde_json::from_value(json!({
        "identities": ["agent"], "modules": [{"name": "p.rego", "rego": rego(0)}]}))?);
    enforced_at(first).await?;

    let mut lat = Vec::new();
    for i in 1..=CHANGES {
        let spec = serde_json::from_value(json!({
            "identities": ["agent"], "modules": [{"name": "p.rego", "rego": rego(i)}]}))?;
        let v = mandate_policy::version(&spec);
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
        let p: AgentPolicy = serde_json::from_value(json!({
            "apiVersion": "mandate.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": format!("scale-{i}")},
            "spec": {"identities": [format!("id-{}", i % 100)], "modules": [{"name": "p.rego", "rego": rego(i)}]}}))?;
        policies.create(&PostParams::default(), &p).await?;
    }
    let ids = ns.api::<AgentIdentity>();
    for i in 0..10_000 {
        let id: AgentIdentity = serde_json::from_value(json!({
            "metadata": {"name": format!("id-{i}")},
            "spec": {"selector": {"matchLabels": {"agent": format!("a{i}")}}}}))?;
        ids.create(&PostParams::default(), &id).await?;
    }
    // Let the operator reconcile them all (each policy Ready).
    let deadline = tokio::time::Instant::now() + secs(600);
    loop {
        let list = policies.list(&Default::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.version.as_ref()).is_some())
            .count();
        if ready >= 1001 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {ready} policies reconciled"
        );
        tokio::time::sleep(secs(1)).await;
    }
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
