//! The operator against a real kube-apiserver (either test-cluster shape):
//! policies compile to a stable version and become Ready; broken ones get
//! Compiled=False with module:line:col and an event, and keep the last good
//! version; bad input never wedges the operator; an identity's pod count
//! follows its pods; of two replicas one leads, and when it dies the other
//! takes over.
//!
//! Each test runs its own operator process(es), limited to the test's
//! namespace, with the leader Lease in that namespace.

#![allow(clippy::expect_used)] // test fixtures may panic on their own bugs

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use mandate_api::crd::{AgentIdentity, AgentPolicy};
use mandate_e2e::{Check, Cluster, TestNamespace, http_get, secs};
use mandate_testsupport::manifests::ALLOW_GET as GOOD;
use mandate_testsupport::{agent_identity, agent_policy, free_port, wait_for};
use serde_json::json;

mod support;
use support::operator_command;

/// One `mandate-operator` process, killed when dropped.
struct Operator {
    op: support::Operator,
    admin: String,
    identity: String,
}

impl Operator {
    async fn start(cluster: &Cluster, ns: &str, identity: &str) -> Result<Self> {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("mandate-operator-{ns}-{identity}.log"));
        let mut cmd = operator_command(cluster, port);
        cmd.args([
            "--watch-namespace",
            ns,
            "--lease-namespace",
            ns,
            "--lease-duration-seconds",
            "3",
        ])
        .args(["--identity", identity, "--trust-domain", "example.org"])
        // Reconcilers only: no webhooks, no CA (their own tests cover them).
        .args(["--no-webhooks", "--no-identity"])
        .env("MANDATE_LOG", "info,mandate_operator=debug");
        let op = support::Operator::start(cmd, port, &log, secs(30))
            .await
            .with_context(|| format!("operator {identity} never became ready"))?;
        Ok(Self {
            op,
            admin: format!("http://127.0.0.1:{port}"),
            identity: identity.into(),
        })
    }

    fn logs(&self) -> String {
        self.op.logs()
    }

    /// The value of the `mandate_operator_leader` gauge.
    async fn leader_gauge(&self) -> Result<u8> {
        let (_, body) = http_get(&format!("{}/metrics", self.admin)).await?;
        body.lines()
            .find_map(|l| l.strip_prefix("mandate_operator_leader "))
            .map(|v| u8::from(v.trim() == "1"))
            .with_context(|| format!("no leader gauge in metrics:\n{body}"))
    }
}

async fn setup(prefix: &str) -> Result<(Cluster, TestNamespace)> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let ns = cluster.namespace(prefix).await?;
    Ok((cluster, ns))
}

const BROKEN: &str = "package mandate.authz\nimport rego.v1\ndecision if {\n  input.x ==\n}\n";

fn policy(name: &str, rego: &str) -> AgentPolicy {
    agent_policy(name)
        .module("authz.rego", rego)
        .parse()
        .expect("a valid AgentPolicy")
}

async fn apply(ns: &TestNamespace, p: &AgentPolicy) -> Result<()> {
    ns.api::<AgentPolicy>()
        .patch(&p.name_any(), &PatchParams::apply("e2e").force(), &Patch::Apply(p))
        .await
        .with_context(|| format!("applying AgentPolicy {}", p.name_any()))?;
    Ok(())
}

fn condition(p: &AgentPolicy, type_: &str) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Wait until the policy's status describes its current generation and `Compiled` is `want`.
async fn wait_compiled(ns: &TestNamespace, name: &str, want: bool) -> Result<AgentPolicy> {
    let want_s = if want { "True" } else { "False" };
    ns.wait(
        name,
        &format!("AgentPolicy {name} Compiled={want_s}"),
        secs(30),
        |p: Option<&AgentPolicy>| {
            let Some(p) = p else {
                return Check::Pending("absent".into());
            };
            let current = p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation;
            match condition(p, "Compiled") {
                Some((s, _, _)) if current && s == want_s => Check::Done,
                other => Check::Pending(format!("current={current} Compiled={other:?}")),
            }
        },
    )
    .await?
    .context("policy vanished")
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn a_policy_compiles_to_a_stable_version_and_becomes_ready() -> Result<()> {
    let (cluster, ns) = setup("op-ready").await?;
    let op = Operator::start(&cluster, ns.name(), "solo").await?;

    let good = policy("allow-get", GOOD);
    apply(&ns, &good).await?;
    let got = wait_compiled(&ns, "allow-get", true).await?;
    let status = got.status.clone().context("no status")?;
    let expected = mandate_policy::version(&good.spec);
    ensure!(
        status.version.as_deref() == Some(expected.as_str()),
        "version {:?} != {expected}",
        status.version
    );
    ensure!(
        status.short_version.as_deref() == expected.get(7..19),
        "{:?}",
        status.short_version
    );
    ensure!(
        condition(&got, "Ready").is_some_and(|(s, _, _)| s == "True"),
        "{:?}",
        got.status
    );

    // The same policy under another name has the same version; an edit changes it.
    apply(&ns, &policy("same", GOOD)).await?;
    let same = wait_compiled(&ns, "same", true).await?;
    ensure!(
        same.status.and_then(|s| s.version) == status.version,
        "same source, different version"
    );
    apply(&ns, &policy("allow-get", &GOOD.replace("GET", "HEAD"))).await?;
    let edited = ns
        .wait(
            "allow-get",
            "the edit to be compiled",
            secs(30),
            |p: Option<&AgentPolicy>| match p {
                Some(p) if p.status.as_ref().and_then(|s| s.observed_generation) == Some(2) => Check::Done,
                other => Check::Pending(format!("{:?}", other.and_then(|p| p.status.clone()))),
            },
        )
        .await?
        .context("vanished")?;
    let edited_short = edited
        .status
        .as_ref()
        .and_then(|s| s.short_version.clone())
        .context("no short version")?;
    ensure!(
        edited.status.and_then(|s| s.version) != status.version,
        "an edit kept the version"
    );

    // kubectl get shows the columns with the version.
    let table = cluster
        .kubectl(&["-n", ns.name(), "get", "agentpolicies", "allow-get"])
        .await?;
    ensure!(
        table.contains("True") && table.contains("Enforce") && table.contains(&edited_short),
        "no short version {edited_short} in:\n{table}"
    );

    let (_, metrics) = http_get(&format!("{}/metrics", op.admin)).await?;
    ensure!(
        metrics.contains(r#"mandate_operator_reconciles_total{kind="AgentPolicy",result="ok"}"#),
        "{metrics}"
    );
    drop(op);
    ns.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn a_broken_policy_says_where_and_keeps_the_last_good_version() -> Result<()> {
    let (cluster, ns) = setup("op-broken").await?;
    let op = Operator::start(&cluster, ns.name(), "solo").await?;

    apply(&ns, &policy("p", BROKEN)).await?;
    let got = wait_compiled(&ns, "p", false).await?;
    let (_, reason, message) = condition(&got, "Compiled").context("no Compiled condition")?;
    ensure!(reason == "RegoError", "{reason}");
    ensure!(
        message.starts_with("authz.rego:5:1:"),
        "message lacks module:line:col: {message}"
    );
    ensure!(
        got.status.as_ref().and_then(|s| s.version.clone()).is_none(),
        "a broken policy got a version"
    );

    // A Warning event on the policy says the same.
    let events: Api<Event> = ns.api();
    let mut seen = vec![];
    wait_for("a CompileFailed event on p", secs(20))
        .every(Duration::from_millis(200))
        .until_ok(async || {
            seen = events
                .list(&ListParams::default().fields("involvedObject.name=p"))
                .await?
                .items;
            Ok(seen.iter().any(|e| e.reason.as_deref() == Some("CompileFailed")))
        })
        .await
        .with_context(|| format!("no CompileFailed event: {seen:?}"))?;

    // Fixed, it becomes Ready; broken again, the last good version stays, and status says so.
    apply(&ns, &policy("p", GOOD)).await?;
    let fixed = wait_compiled(&ns, "p", true).await?;
    let good_version = fixed.status.and_then(|s| s.version).context("no version")?;
    apply(&ns, &policy("p", BROKEN)).await?;
    let broken = wait_compiled(&ns, "p", false).await?;
    ensure!(broken.status.as_ref().and_then(|s| s.version.clone()) == Some(good_version.clone()));
    let (ready, _, why) = condition(&broken, "Ready").context("no Ready")?;
    ensure!(
        ready == "False" && why.contains(&good_version) && why.contains("stays in force"),
        "{why}"
    );
    drop(op);
    ns.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn bad_input_gets_a_condition_and_never_wedges_the_operator() -> Result<()> {
    let (cluster, ns) = setup("op-bad").await?;
    let op = Operator::start(&cluster, ns.name(), "solo").await?;
    let api = ns.api::<AgentPolicy>();
    let pp = PatchParams::apply("e2e").force();

    let huge = format!("{GOOD}\n# {}\n", "x".repeat(600 * 1024));
    let cases = [
        (
            "missing-entry",
            json!({"modules": [{"name": "a.rego", "rego": GOOD}], "data": {"k": 1}, "entrypoint": "data.mandate.authz.nope"}),
            "InvalidEntrypoint",
        ),
        (
            "dup-modules",
            json!({"modules": [{"name": "a.rego", "rego": GOOD}, {"name": "a.rego", "rego": GOOD}]}),
            "InvalidModules",
        ),
        (
            "huge",
            json!({"modules": [{"name": "a.rego", "rego": huge}]}),
            "TooLarge",
        ),
        (
            "rego-error",
            json!({"modules": [{"name": "a.rego", "rego": BROKEN}]}),
            "RegoError",
        ),
    ];
    // These two never reach the operator: the CRD's own rules refuse them
    // (the operator's handling of such specs, for objects stored before a
    // CRD upgrade, is unit-tested in policy.rs).
    let refused_by_the_apiserver = [
        (
            "bad-entry",
            json!({"modules": [{"name": "a.rego", "rego": GOOD}], "entrypoint": "mandate authz"}),
            "spec.entrypoint names a rule under data",
        ),
        (
            "no-modules",
            json!({"modules": []}),
            "spec.modules needs at least one Rego module",
        ),
    ];
    for (name, spec, why) in &refused_by_the_apiserver {
        let obj = agent_policy(name).merge(spec.clone()).json();
        match api.patch(name, &pp, &Patch::Apply(&obj)).await {
            Ok(_) => bail!("{name} was accepted by the apiserver"),
            Err(e) => ensure!(
                e.to_string().contains(why),
                "{name} refused without saying '{why}': {e}"
            ),
        }
    }
    for (name, spec, _) in &cases {
        let obj = agent_policy(name).merge(spec.clone()).json();
        api.patch(name, &pp, &Patch::Apply(&obj))
            .await
            .with_context(|| format!("applying {name}"))?;
    }
    for (name, _, reason) in &cases {
        let got = wait_compiled(&ns, name, false).await?;
        let (_, r, msg) = condition(&got, "Compiled").context("no condition")?;
        ensure!(r == *reason, "{name}: reason {r} (want {reason}): {msg}");
    }
    // After all that, a good policy still reconciles, and the operator is alive.
    apply(&ns, &policy("after", GOOD)).await?;
    wait_compiled(&ns, "after", true).await?;
    ensure!(
        http_get(&format!("{}/livez", op.admin)).await?.0 == 200,
        "operator not live"
    );
    drop(op);
    ns.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn an_identity_resolves_and_counts_its_pods() -> Result<()> {
    let (cluster, ns) = setup("op-identity").await?;
    let op = Operator::start(&cluster, ns.name(), "solo").await?;
    let ids = ns.api::<AgentIdentity>();
    let id: AgentIdentity = agent_identity("researcher")
        .match_label("agent", "researcher")
        .parse()?;
    ids.patch("researcher", &PatchParams::apply("e2e").force(), &Patch::Apply(&id))
        .await?;
    let want_id = format!("spiffe://example.org/ns/{}/agent/researcher", ns.name());
    let count = |n: i32| {
        let want_id = want_id.clone();
        move |i: Option<&AgentIdentity>| match i.and_then(|i| i.status.as_ref()) {
            // The namespace is not enforced and the pods were never
            // injected: they are reported, not counted as bound.
            Some(s)
                if s.bound_pods == 0
                    && s.unmediated_pods == n
                    && s.spiffe_id.as_deref() == Some(want_id.as_str())
                    && s.conditions.iter().any(|c| {
                        c.type_ == "Mediated"
                            && c.status == if n == 0 { "True" } else { "False" }
                            && (n == 0 || c.reason == "NamespaceNotEnforced")
                    }) =>
            {
                Check::Done
            }
            other => Check::Pending(format!("{other:?}")),
        }
    };
    ns.wait("researcher", "0 unmediated pods", secs(30), count(0)).await?;

    // Pods that match (and one that does not). On a control plane they stay
    // Pending, which is enough: the count is of pods that are this agent.
    let pods = ns.api::<Pod>();
    for (name, agent) in [("r1", "researcher"), ("r2", "researcher"), ("other", "writer")] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"agent": agent}},
            "spec": {"containers": [{"name": "c", "image": "mandate.local/busybox:1", "imagePullPolicy": "Never",
                                     "command": ["/bin/sleep", "3600"]}]},
        }))?;
        ns.create(&pod).await?;
    }
    ns.wait("researcher", "2 unmediated pods", secs(30), count(2)).await?;
    pods.delete(
        "r1",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await?;
    ns.wait("researcher", "1 unmediated pod", secs(60), count(1)).await?;

    let table = cluster.kubectl(&["-n", ns.name(), "get", "agentidentities"]).await?;
    ensure!(table.contains(&want_id), "{table}");
    drop(op);
    ns.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn one_replica_leads_and_the_other_takes_over_when_it_dies() -> Result<()> {
    let (cluster, ns) = setup("op-leader").await?;
    let a = Operator::start(&cluster, ns.name(), "replica-a").await?;
    let b = Operator::start(&cluster, ns.name(), "replica-b").await?;
    let leases = ns.api::<Lease>();
    let holder = |want: Option<String>| {
        move |l: Option<&Lease>| {
            let h = l.and_then(|l| l.spec.as_ref()).and_then(|s| s.holder_identity.clone());
            match (&h, &want) {
                (Some(h), Some(w)) if h == w => Check::Done,
                (Some(_), None) => Check::Done,
                _ => Check::Pending(format!("holder {h:?}")),
            }
        }
    };
    let lease = ns
        .wait("mandate-operator", "a leader", secs(30), holder(None))
        .await?
        .context("no lease")?;
    let leader = lease.spec.and_then(|s| s.holder_identity).context("no holder")?;
    let (mut leading, following) = if leader == a.identity { (a, b) } else { (b, a) };
    ensure!(leading.identity == leader, "the lease names {leader}, neither replica");

    // Exactly one replica runs the reconcilers.
    ensure!(
        leading.leader_gauge().await? == 1,
        "the lease holder does not say it leads"
    );
    ensure!(following.leader_gauge().await? == 0, "both replicas lead");
    apply(&ns, &policy("before", GOOD)).await?;
    wait_compiled(&ns, "before", true).await?;

    // Kill the leader outright (no lease release): the other takes over once it expires.
    leading.op.process.kill().await?;
    ns.wait(
        "mandate-operator",
        "the follower to take the lease",
        secs(30),
        holder(Some(following.identity.clone())),
    )
    .await?;
    apply(&ns, &policy("after", GOOD)).await?;
    wait_compiled(&ns, "after", true).await?;
    ensure!(
        following.leader_gauge().await? == 1,
        "the new leader does not say it leads:\n{}",
        following.logs()
    );
    let lease = leases.get("mandate-operator").await?;
    ensure!(
        lease.spec.and_then(|s| s.lease_transitions) >= Some(1),
        "no lease transition recorded"
    );
    drop(following);
    ns.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn an_unreadable_status_is_rewritten_and_the_rest_reconcile() -> Result<()> {
    let (cluster, ns) = setup("op-unreadable").await?;
    let op = Operator::start(&cluster, ns.name(), "solo").await?;
    let ids = ns.api::<AgentIdentity>();
    let identity = |name: &str| -> Result<AgentIdentity> { agent_identity(name).match_label("agent", name).parse() };
    let resolved = |i: Option<&AgentIdentity>| match i.and_then(|i| i.status.as_ref()).and_then(|s| s.spiffe_id.clone())
    {
        Some(_) => Check::Done,
        None => Check::Pending("no SPIFFE ID yet".into()),
    };
    let pp = PatchParams::apply("e2e").force();
    ids.patch("corrupt", &pp, &Patch::Apply(identity("corrupt")?)).await?;
    ns.wait("corrupt", "corrupt to resolve", secs(30), resolved).await?;

    // Another writer puts a status the apiserver stores but our types cannot
    // read (boundPods beyond i32).
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        cluster.client(),
        ns.name(),
        &kube::api::ApiResource::erase::<AgentIdentity>(&()),
    );
    // (The PATCH answers with the object as stored: read that, since the
    // operator may repair it before a later GET.) Apiservers from 1.37 check
    // integer formats themselves and refuse the value: there no such status
    // can be stored, and the operator's lenient read is covered by the unit
    // tests in lenient.rs; the rest of this test still runs.
    let written = raw
        .patch_status(
            "corrupt",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"boundPods": 99_999_999_999_i64}})),
        )
        .await;
    match written {
        Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("format int32") => {
            eprintln!("this apiserver refuses an out-of-range status itself: {}", e.message);
        }
        written => {
            let stored = written.context("writing an out-of-range status")?;
            ensure!(
                stored.data["status"]["boundPods"] == json!(99_999_999_999_i64),
                "the apiserver did not keep the out-of-range value, so this test proves nothing: {:?}",
                stored.data["status"]
            );
            // The operator reads the object without the status it cannot
            // parse and writes a good one back.
            let mut status = json!(null);
            wait_for("the operator to repair corrupt's status", secs(30))
                .every(Duration::from_millis(200))
                .until_ok(async || {
                    status = raw.get("corrupt").await?.data["status"].clone();
                    Ok(status["boundPods"] == json!(0))
                })
                .await
                .with_context(|| format!("status never repaired: {status:?}\n{}", op.logs()))?;
        }
    }
    // ...and every other identity still reconciles, also after a fresh list
    // (a new operator lists them all, the unreadable one included).
    ids.patch("fine", &pp, &Patch::Apply(identity("fine")?)).await?;
    ns.wait("fine", "fine to resolve", secs(30), resolved).await?;
    drop(op);
    let op = Operator::start(&cluster, ns.name(), "second").await?;
    ids.patch("later", &pp, &Patch::Apply(identity("later")?)).await?;
    ns.wait("later", "later to resolve after a restart", secs(30), resolved)
        .await?;
    drop(op);
    ns.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn a_policy_whose_tests_fail_is_not_ready_and_keeps_the_last_good_version() -> Result<()> {
    let (cluster, ns) = setup("op-tests").await?;
    let op = Operator::start(&cluster, ns.name(), "solo").await?;
    let with_tests = |expect_put: bool| -> AgentPolicy {
        let test = format!(
            "package mandate.authz_test\nimport rego.v1\nimport data.mandate.authz\n\
             test_get if authz.decision with input as {{\"attributes\": {{\"request\": {{\"http\": {{\"method\": \"GET\"}}}}}}}}\n\
             test_put if {}authz.decision with input as {{\"attributes\": {{\"request\": {{\"http\": {{\"method\": \"PUT\"}}}}}}}}\n",
            if expect_put { "" } else { "not " }
        );
        agent_policy("tested")
            .module("authz.rego", GOOD)
            .test("authz_test.rego", &test)
            .parse()
            .expect("a valid AgentPolicy")
    };
    apply(&ns, &with_tests(false)).await?;
    let good = ns
        .wait(
            "tested",
            "Tested=True and Ready",
            secs(30),
            |p: Option<&AgentPolicy>| match p {
                Some(p)
                    if condition(p, "Tested").is_some_and(|c| c.0 == "True")
                        && condition(p, "Ready").is_some_and(|c| c.0 == "True") =>
                {
                    Check::Done
                }
                other => Check::Pending(format!("{:?}", other.and_then(|p| p.status.clone()))),
            },
        )
        .await?
        .context("vanished")?;
    let version = good.status.and_then(|s| s.version).context("no version")?;

    // A test that now fails (it expects PUT to be allowed): not Ready, and
    // the status names the failing test; the last good version stays.
    apply(&ns, &with_tests(true)).await?;
    let bad = ns
        .wait("tested", "Tested=False", secs(30), |p: Option<&AgentPolicy>| match p {
            Some(p)
                if p.status.as_ref().and_then(|s| s.observed_generation) == Some(2)
                    && condition(p, "Tested").is_some_and(|c| c.0 == "False") =>
            {
                Check::Done
            }
            other => Check::Pending(format!("{:?}", other.and_then(|p| p.status.clone()))),
        })
        .await?
        .context("vanished")?;
    let (_, reason, message) = condition(&bad, "Tested").context("no Tested")?;
    ensure!(
        reason == "TestsFailed" && message.contains("authz_test.rego test_put (undefined)"),
        "{reason}: {message}"
    );
    ensure!(
        condition(&bad, "Ready").is_some_and(|c| c.0 == "False"),
        "{:?}",
        bad.status
    );
    ensure!(
        bad.status.and_then(|s| s.version) == Some(version),
        "the version moved to one whose tests fail"
    );
    drop(op);
    ns.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn sigterm_releases_the_lease_for_a_fast_handover() -> Result<()> {
    let (cluster, ns) = setup("op-sigterm").await?;
    let mut a = Operator::start(&cluster, ns.name(), "replica-a").await?;
    let leases = ns.api::<Lease>();
    ns.wait(
        "mandate-operator",
        "replica-a to lead",
        secs(30),
        |l: Option<&Lease>| match l.and_then(|l| l.spec.as_ref()).and_then(|s| s.holder_identity.clone()) {
            Some(h) if h == "replica-a" => Check::Done,
            other => Check::Pending(format!("holder {other:?}")),
        },
    )
    .await?;
    let pid = a.op.process.id().context("no pid")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -TERM failed");
    // Draining: not ready at once, the lease handed over, and the process
    // still serving (the default drain is 5 s).
    wait_for("/readyz to answer 503 during the drain", secs(3))
        .until_ok(async || match http_get(&format!("{}/readyz", a.admin)).await {
            Ok((200, _)) => Ok(false),
            Ok((503, _)) => Ok(true),
            other => bail!("/readyz during the drain: {other:?}"),
        })
        .await
        .with_context(|| a.logs())?;
    ns.wait(
        "mandate-operator",
        "the lease released",
        secs(5),
        |l: Option<&Lease>| match l.and_then(|l| l.spec.as_ref()).and_then(|s| s.holder_identity.clone()) {
            None => Check::Done,
            other => Check::Pending(format!("holder {other:?}")),
        },
    )
    .await?;
    ensure!(
        a.op.process.child().try_wait()?.is_none() && http_get(&format!("{}/livez", a.admin)).await?.0 == 200,
        "the operator stopped serving before its drain ended:\n{}",
        a.logs()
    );
    let exit = tokio::time::timeout(secs(20), a.op.process.child().wait())
        .await
        .context("the operator did not exit on SIGTERM")??;
    ensure!(
        exit.success(),
        "the operator exited with {exit} on SIGTERM:\n{}",
        a.logs()
    );
    // Released (no holder), not merely left to expire.
    let lease = leases.get("mandate-operator").await?;
    let holder = lease.spec.and_then(|s| s.holder_identity);
    ensure!(
        holder.is_none(),
        "the lease still names {holder:?} after SIGTERM:\n{}",
        a.logs()
    );
    ns.delete().await
}
