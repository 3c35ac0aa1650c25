//! The admission webhooks against a real kube-apiserver, served by a
//! `mandate-operator` process on 127.0.0.1 with the certificate it generates
//! and the caBundle it writes into the webhook configurations itself:
//! - agent pods in an enforced namespace come back with Envoy, the sidecar,
//!   their volumes and the proxy environment; other pods are untouched;
//!   re-creating or re-submitting an injected pod changes nothing; forged
//!   or odd pods are refused with a reason;
//! - `kubectl apply` of a policy that does not compile fails with
//!   module:line:col, one whose test fails names the test, a good one passes;
//!   overlapping or malformed identities are refused;
//! - an approval records its approver from the request, not the object;
//! - hostile agent pods (host namespaces, hostPath, privileged, added
//!   capabilities, privilege escalation, the proxy's UID, root keeping
//!   SETUID, no UID at all) are refused with the reason, forged injected
//!   ones too; an ordinary one gets allowPrivilegeEscalation: false;
//! - a rotated certificate is served and trusted without a restart;
//! - with the operator down, pods in enforced namespaces are refused while
//!   kube-system is unaffected.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::time::Duration;

mod support;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use mandate_api::crd::AgentApproval;
use mandate_e2e::{Cluster, TestNamespace, secs};
use mandate_testsupport::manifests::ALLOW_GET as GOOD;
use mandate_testsupport::{agent_identity, agent_policy, try_eventually, wait_for};
use serde_json::{Value, json};
use support::Webhooks;

fn pod(name: &str, labels: Value, extra: Value) -> Pod {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"securityContext": {"runAsUser": 1000, "runAsNonRoot": true},
                 "containers": [{"name": "agent", "image": "mandate.local/busybox:1", "command": ["sleep", "3600"],
                                 "env": [{"name": "HTTPS_PROXY", "value": "http://elsewhere:3128"}]}]},
    });
    merge(&mut p, extra);
    serde_json::from_value(p).expect("a pod")
}

/// A pod's containers without the mount of its ServiceAccount token, whose
/// volume name (`kube-api-access-<random>`) the apiserver makes per pod.
fn containers_without_token_mount(p: &Pod) -> Vec<k8s_openapi::api::core::v1::Container> {
    let mut cs = p.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default();
    for c in &mut cs {
        if let Some(m) = c.volume_mounts.as_mut() {
            m.retain(|m| !m.name.starts_with("kube-api-access-"));
        }
    }
    cs
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn names(p: &Pod) -> Vec<String> {
    p.spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

fn env(p: &Pod, container: &str, var: &str) -> Option<String> {
    p.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?
        .env
        .iter()
        .flatten()
        .find(|e| e.name == var)?
        .value
        .clone()
}

async fn identity(ns: &TestNamespace, name: &str, selector: Value) -> Result<()> {
    ns.apply(&agent_identity(name).selector(selector).manifest()).await?;
    Ok(())
}

/// Create `p`, retrying while the webhooks' view of a just-created identity
/// catches up (the only delay is the operator's watch).
async fn create_agent_pod(ns: &TestNamespace, p: &Pod, want_injected: bool) -> Result<Pod> {
    let api = ns.api::<Pod>();
    let deadline = tokio::time::Instant::now() + secs(20);
    loop {
        let created = api.create(&PostParams::default(), p).await?;
        let injected = names(&created).contains(&"mandate-sidecar".to_string());
        if injected == want_injected || tokio::time::Instant::now() > deadline {
            return Ok(created);
        }
        api.delete(&p.name_any(), &DeleteParams::default().grace_period(0))
            .await?;
        mandate_e2e::wait_until(
            api.clone(),
            &p.name_any(),
            "the pod to be gone",
            secs(30),
            |x: Option<&Pod>| {
                if x.is_none() {
                    mandate_e2e::Check::Done
                } else {
                    mandate_e2e::Check::Pending("still there".into())
                }
            },
        )
        .await?;
    }
}

fn review(kind: &str, group: &str, resource: &str, op: &str, object: Value, old: Value) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "0000-test", "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": resource},
            "namespace": object["metadata"]["namespace"], "operation": op,
            "userInfo": {"username": "tester"}, "object": object, "oldObject": old,
        },
    })
    .to_string()
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn agent_pods_are_injected_others_untouched_and_odd_ones_refused() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("wh-op").await?;
    let agents = cluster.namespace("wh-agents").await?;
    let hooks = Webhooks::start(&cluster, &op, &agents).await?;
    identity(&agents, "researcher", json!({"matchLabels": {"agent": "researcher"}})).await?;

    // An agent pod: injected, proxy env set, its own HTTPS_PROXY kept with a warning.
    let p = pod("agent-1", json!({"agent": "researcher"}), json!({}));
    let got = create_agent_pod(&agents, &p, true).await?;
    ensure!(
        names(&got) == ["mandate-envoy", "mandate-sidecar", "agent"],
        "containers: {:?}\n{}",
        names(&got),
        hooks.logs()
    );
    ensure!(env(&got, "agent", "HTTP_PROXY").as_deref() == Some("http://127.0.0.1:15001"));
    ensure!(env(&got, "agent", "NO_PROXY").as_deref() == Some("localhost,127.0.0.1,::1"));
    ensure!(env(&got, "agent", "HTTPS_PROXY").as_deref() == Some("http://elsewhere:3128"));
    // Interception: the agent trusts the pod CA, from a read-only mount.
    ensure!(env(&got, "agent", "SSL_CERT_FILE").as_deref() == Some(mandate_api::names::CA_BUNDLE_FILE));
    ensure!(env(&got, "agent", "NODE_EXTRA_CA_CERTS").as_deref() == Some(mandate_api::names::POD_CA_FILE));
    let agent_mounts: Vec<_> = got
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .filter(|c| c.name == "agent")
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .filter(|m| m.name == mandate_api::names::CA_VOLUME)
        .map(|m| m.read_only)
        .collect();
    ensure!(agent_mounts == [Some(true)], "the agent's CA mount: {agent_mounts:?}");
    let ann = got.annotations();
    ensure!(
        ann.get("mandate.dev/identity").map(String::as_str) == Some("researcher"),
        "{ann:?}"
    );
    ensure!(
        ann.get("mandate.dev/proxy-env-warning")
            .is_some_and(|w| w.contains("HTTPS_PROXY")),
        "{ann:?}"
    );
    ensure!(
        env(&got, "mandate-sidecar", "MANDATE_AGENT_SPIFFE_ID").as_deref()
            == Some(&*format!("spiffe://example.org/ns/{}/agent/researcher", agents.name())),
        "{:?}",
        env(&got, "mandate-sidecar", "MANDATE_AGENT_SPIFFE_ID")
    );
    let vols: Vec<String> = got
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    ensure!(
        vols.contains(&"mandate-run".into()) && vols.contains(&"mandate-policies".into()),
        "{vols:?}"
    );
    let sc = got.spec.as_ref().unwrap().containers[1]
        .security_context
        .clone()
        .unwrap();
    ensure!(
        sc.run_as_non_root == Some(true)
            && sc.read_only_root_filesystem == Some(true)
            && sc.allow_privilege_escalation == Some(false),
        "{sc:?}"
    );
    ensure!(
        got.spec.as_ref().unwrap().containers[1].lifecycle.is_some(),
        "no start-up ordering guard on a pre-1.29 cluster"
    );

    // The same spec again: the same injection.
    let again = create_agent_pod(
        &agents,
        &pod("agent-2", json!({"agent": "researcher"}), json!({})),
        true,
    )
    .await?;
    ensure!(containers_without_token_mount(&again) == containers_without_token_mount(&got));

    // An already injected pod (its manifest re-submitted): nothing changes.
    let mut injected = serde_json::to_value(&got)?;
    injected["metadata"] = json!({"name": "agent-3", "labels": got.labels(), "annotations": got.annotations()});
    injected.as_object_mut().unwrap().remove("status");
    let resubmitted: Pod = serde_json::from_value(injected.clone())?;
    let third = agents.create(&resubmitted).await?;
    ensure!(third.spec.as_ref().unwrap().containers == got.spec.as_ref().unwrap().containers);
    // ... and a re-invocation of the webhook on it returns no patch.
    let ca = hooks.secret_ca().await?.context("no CA")?;
    let mut obj = injected.clone();
    obj["metadata"]["namespace"] = json!(agents.name());
    let (code, body) = hooks
        .post(
            "/mutate/pods",
            &review("Pod", "", "pods", "CREATE", obj.clone(), Value::Null),
            &ca,
        )
        .await?;
    let answer: Value = serde_json::from_str(&body)?;
    ensure!(
        code == 200 && answer["response"]["allowed"] == true && answer["response"]["patch"].is_null(),
        "{body}"
    );

    // Not an agent, or not an enforced namespace: untouched.
    let plain = agents
        .create(&pod("bystander", json!({"app": "web"}), json!({})))
        .await?;
    ensure!(names(&plain) == ["agent"], "{:?}", names(&plain));
    let elsewhere = op
        .create(&pod("elsewhere", json!({"agent": "researcher"}), json!({})))
        .await?;
    ensure!(names(&elsewhere) == ["agent"], "{:?}", names(&elsewhere));

    // Odd pods: refused with a reason, never injected half-way.
    let refused = |what: &'static str, p: Pod, needle: &'static str| {
        let agents = &agents;
        async move {
            match agents.api::<Pod>().create(&PostParams::default(), &p).await {
                Ok(_) => bail!("{what}: admitted"),
                Err(e) => {
                    ensure!(e.to_string().contains(needle), "{what}: {e}");
                    Ok(())
                }
            }
        }
    };
    let opt_in = json!({"mandate.dev/inject": "true"});
    refused(
        "hostNetwork",
        pod("hostnet", opt_in.clone(), json!({"spec": {"hostNetwork": true}})),
        "hostNetwork",
    )
    .await?;
    refused(
        "a container named like ours",
        pod(
            "squatter",
            opt_in.clone(),
            json!({"spec": {"containers": [{"name": "mandate-sidecar", "image": "evil:1"}]}}),
        ),
        "reserved",
    )
    .await?;
    let mut forged = injected.clone();
    forged["metadata"]["name"] = json!("forged");
    forged["spec"]["containers"][1]["image"] = json!("evil/allow-all:1");
    refused(
        "a forged injection",
        serde_json::from_value(forged)?,
        "not the ones Mandate injects",
    )
    .await?;
    // Mandate's containers exactly as injected, but with the agent's own
    // container slipped in before them (it would start before the proxy).
    let mut early = injected.clone();
    early["metadata"]["name"] = json!("early");
    early["spec"]["containers"]
        .as_array_mut()
        .context("no containers")?
        .insert(
            0,
            json!({"name": "early", "image": "evil/early:1", "securityContext": {"allowPrivilegeEscalation": false}}),
        );
    refused(
        "a container placed before Mandate's",
        serde_json::from_value(early)?,
        "must be the first two of containers",
    )
    .await?;

    // The guard, asked directly about an agent pod without the sidecar (as
    // if the mutating webhook had been bypassed): refused.
    let mut bare = serde_json::to_value(pod("bare", json!({"agent": "researcher"}), json!({})))?;
    bare["metadata"]["namespace"] = json!(agents.name());
    let (_, body) = hooks
        .post(
            "/validate/pods",
            &review("Pod", "", "pods", "CREATE", bare, Value::Null),
            &ca,
        )
        .await?;
    let answer: Value = serde_json::from_str(&body)?;
    ensure!(
        answer["response"]["allowed"] == false
            && answer["response"]["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("does not carry")),
        "{body}"
    );
    // Garbage bodies: 400 with the reason, and the server carries on.
    for junk in [
        "",
        "{",
        "[1,2]",
        r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
    ] {
        let (code, body) = hooks.post("/mutate/pods", junk, &ca).await?;
        ensure!(
            code == 400 && body.contains("AdmissionReview"),
            "{junk:?}: {code} {body}"
        );
    }
    let (code, body) = hooks
        .post(
            "/mutate/pods",
            &review("Pod", "", "pods", "CREATE", obj, Value::Null),
            &ca,
        )
        .await?;
    ensure!(code == 200, "after garbage: {code} {body}");

    // Two identities may not claim the same pods.
    let overlap = identity(
        &agents,
        "copycat",
        json!({"matchLabels": {"agent": "researcher", "x": "y"}}),
    )
    .await;
    ensure!(
        overlap.as_ref().is_err_and(|e| e.to_string().contains("researcher")),
        "{overlap:?}"
    );
    let bad = agents
        .apply(
            &agent_identity("bad-id")
                .match_label("agent", "other")
                .spiffe_id_template("spiffe://elsewhere.org/{name}")
                .manifest(),
        )
        .await;
    ensure!(
        bad.as_ref().is_err_and(|e| e.to_string().contains("trust domain")),
        "{bad:?}"
    );
    // A hostile tenant templates an ID in another namespace, or Mandate's own.
    for (name, template) in [
        ("steal-ns", "spiffe://{trustDomain}/ns/victim/agent/{name}"),
        ("steal-operator", "spiffe://{trustDomain}/mandate/operator"),
    ] {
        let stolen = agents
            .apply(
                &agent_identity(name)
                    .match_label("agent", name)
                    .spiffe_id_template(template)
                    .manifest(),
            )
            .await;
        ensure!(
            stolen
                .as_ref()
                .is_err_and(|e| e.to_string().contains("outside the agent's namespace")),
            "{template}: {stolen:?}"
        );
    }
    identity(&agents, "writer", json!({"matchLabels": {"agent": "writer"}})).await?;
    // Two identities may not resolve to one SPIFFE ID (it would name neither).
    // (Retried while the webhook's view of the just-created writer catches up.)
    let twin = agent_identity("twin")
        .match_label("agent", "twin")
        .spiffe_id_template("spiffe://{trustDomain}/ns/{namespace}/agent/writer")
        .manifest();
    let mut last = String::new();
    wait_for("the twin identity to be refused", secs(20))
        .until(async || match agents.apply(&twin).await {
            Err(e) if e.to_string().contains("the SPIFFE ID of AgentIdentity writer") => true,
            other => {
                last = format!("{other:?}");
                false
            }
        })
        .await
        .with_context(|| format!("an identity resolving to writer's SPIFFE ID was admitted: {last}"))?;
    // Admitted once before the webhook saw writer? Then it is gone now.
    let _ = agents
        .api::<mandate_api::crd::AgentIdentity>()
        .delete("twin", &DeleteParams::default())
        .await;

    // Every answer is counted and timed.
    let (count, mean) = hooks.admission_latency("mutate-pods").await?;
    ensure!(count >= 8, "only {count} pod admissions counted");
    eprintln!(
        "mutate-pods: {count} admissions, mean {:.2} ms inside the operator",
        mean * 1000.0
    );

    drop(hooks);
    op.delete().await?;
    agents.delete().await
}

fn policy_yaml(name: &str, rego: &str, test: &str) -> String {
    agent_policy(name)
        .module("authz.rego", rego)
        .test("authz_test.rego", test)
        .manifest()
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn kubectl_apply_refuses_bad_policies_with_the_reason_and_approvals_record_the_approver() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("wh-op").await?;
    let agents = cluster.namespace("wh-policies").await?;
    let hooks = Webhooks::start(&cluster, &op, &agents).await?;
    let apply = |yaml: String| {
        let agents = &agents;
        async move { agents.apply(&yaml).await }
    };
    let passing = "package mandate.authz_test\nimport rego.v1\nimport data.mandate.authz\ntest_get if authz.decision with input as {\"attributes\": {\"request\": {\"http\": {\"method\": \"GET\"}}}}\n";
    let failing = "package mandate.authz_test\nimport rego.v1\nimport data.mandate.authz\ntest_delete_allowed if authz.decision with input as {\"attributes\": {\"request\": {\"http\": {\"method\": \"DELETE\"}}}}\n";

    let syntax = apply(policy_yaml(
        "broken",
        "package mandate.authz\nimport rego.v1\ndecision if {\n  input.x ==\n}\n",
        passing,
    ))
    .await;
    let e = syntax
        .err()
        .context("a policy with a syntax error was admitted")?
        .to_string();
    ensure!(e.contains("denied the request") && e.contains("authz.rego:5:"), "{e}");

    let tests_fail = apply(policy_yaml("untested", GOOD, failing)).await;
    let e = tests_fail
        .err()
        .context("a policy whose test fails was admitted")?
        .to_string();
    ensure!(e.contains("test_delete_allowed"), "{e}");

    apply(policy_yaml("good", GOOD, passing))
        .await
        .context("a good policy was refused")?;

    // An approval: the approver is whoever sent the request, whatever the object says.
    let approvals = agents.api::<AgentApproval>();
    let a: AgentApproval = serde_json::from_value(json!({
        "apiVersion": "mandate.dev/v1alpha1", "kind": "AgentApproval",
        "metadata": {"name": "delete-7"},
        "spec": {"agent": "researcher", "action": {"method": "DELETE", "host": "api.example.com", "path": "/items/7"},
                 "reason": "deletes need a human", "policy": "good", "policyVersion": "sha256:00",
                 "expiresAt": "2099-01-01T00:00:00Z"},
    }))?;
    approvals.create(&PostParams::default(), &a).await?;
    let decided = approvals
        .patch_status(
            "delete-7",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Approved", "decidedBy": "mallory", "decidedAt": "2020-01-01T00:00:00Z"}}),
            ),
        )
        .await
        .context("approving")?;
    let st = decided.status.clone().context("no status")?;
    ensure!(
        st.decided_by
            .as_deref()
            .is_some_and(|u| u != "mallory" && !u.is_empty()),
        "approver taken from the object: {st:?}"
    );
    let again = approvals
        .patch_status(
            "delete-7",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Denied"}})),
        )
        .await;
    ensure!(
        again.as_ref().is_err_and(|e| e.to_string().contains("already decided")),
        "{again:?}"
    );
    let respec = approvals
        .patch(
            "delete-7",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"action": {"path": "/items/8"}}})),
        )
        .await;
    ensure!(
        respec.as_ref().is_err_and(|e| e.to_string().contains("cannot change")),
        "{respec:?}"
    );

    drop(hooks);
    op.delete().await?;
    agents.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn a_rotated_certificate_is_served_and_with_the_operator_down_enforced_pods_are_refused() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("wh-op").await?;
    let agents = cluster.namespace("wh-down").await?;
    let mut hooks = Webhooks::start(&cluster, &op, &agents).await?;
    let first = hooks.secret_ca().await?.context("no CA")?;

    // Rotate: remove the Secret; the operator issues a new CA and
    // certificate, serves it and rewrites the caBundles, without a restart.
    Api::<Secret>::namespaced(cluster.client(), op.name())
        .delete("mandate-webhook-tls", &DeleteParams::default())
        .await?;
    let mut second = String::new();
    wait_for("the rotated certificate to be served and trusted", secs(30))
        .every(Duration::from_millis(200))
        .until_ok(async || {
            if let Some(ca) = hooks.secret_ca().await?
                && ca != first
                && hooks.ca_bundle_written().await?
                && hooks.post("/mutate/pods", "{", &ca).await.is_ok()
            {
                second = ca;
                return Ok(true);
            }
            Ok(false)
        })
        .await
        .with_context(|| format!("no rotation:\n{}", hooks.logs()))?;
    ensure!(
        hooks.post("/mutate/pods", "{", &first).await.is_err(),
        "the old certificate is still served"
    );
    let _ = second;
    let p = pod("after-rotation", json!({"mandate.dev/inject": "true"}), json!({}));
    let got = create_agent_pod(&agents, &p, true).await?;
    ensure!(
        names(&got).contains(&"mandate-sidecar".to_string()),
        "{:?}",
        names(&got)
    );

    // Operator down: enforced namespace refuses pods; kube-system does not care.
    let mut child = hooks.child.take().context("no operator")?;
    child.kill().await?;
    let refused = agents
        .api::<Pod>()
        .create(
            &PostParams::default(),
            &pod("while-down", json!({"app": "x"}), json!({})),
        )
        .await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("pods.mandate.dev")),
        "a pod was admitted with the webhook down: {refused:?}"
    );
    let system: Api<Pod> = Api::namespaced(cluster.client(), "kube-system");
    let name = format!("mandate-test-{}", agents.name());
    system
        .create(&PostParams::default(), &pod(&name, json!({"app": "x"}), json!({})))
        .await
        .context("kube-system was affected")?;
    system.delete(&name, &DeleteParams::default().grace_period(0)).await?;

    // Back up: pods are admitted (and injected) again.
    hooks.start_operator(agents.name()).await?;
    let back = create_agent_pod(
        &agents,
        &pod("back", json!({"mandate.dev/inject": "true"}), json!({})),
        true,
    )
    .await?;
    ensure!(names(&back).contains(&"mandate-envoy".to_string()));

    drop(hooks);
    op.delete().await?;
    agents.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn spire_mode_injection_mounts_the_workload_api_through_the_apiserver() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("wh-op").await?;
    let agents = cluster.namespace("wh-spire").await?;
    // SPIRE mode; no policy service here (--no-identity), only the injection.
    let hooks = Webhooks::start_with(
        &cluster,
        &op,
        &agents,
        [
            "--identity-source",
            "spire",
            "--spiffe-endpoint-socket",
            "unix:///nonexistent/agent.sock",
            "--operator-spiffe-id",
            "spiffe://example.org/spire/operator",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await?;
    identity(&agents, "researcher", json!({"matchLabels": {"agent": "researcher"}})).await?;
    let got = create_agent_pod(
        &agents,
        &pod("agent-1", json!({"agent": "researcher"}), json!({})),
        true,
    )
    .await?;
    ensure!(
        names(&got) == ["mandate-envoy", "mandate-sidecar", "agent"],
        "containers: {:?}\n{}",
        names(&got),
        hooks.logs()
    );
    // The pod as the apiserver stored it: the CSI volume, no token, no bundle.
    let spec = got.spec.as_ref().context("no spec")?;
    let vols = spec.volumes.clone().unwrap_or_default();
    let csi = vols
        .iter()
        .find(|v| v.name == "mandate-spiffe-workload-api")
        .and_then(|v| v.csi.as_ref())
        .with_context(|| format!("no SPIFFE CSI volume: {vols:?}"))?;
    ensure!(csi.driver == "csi.spiffe.io" && csi.read_only == Some(true), "{csi:?}");
    ensure!(
        vols.iter().all(
            |v| v.name != "mandate-token" && v.name != "mandate-bundle" && v.projected.is_none()
                // the pod's own ServiceAccount token, projected by the apiserver (not ours)
                || v.name.starts_with("kube-api-access-")
        ),
        "a token or bundle volume in SPIRE mode: {vols:?}"
    );
    ensure!(
        env(&got, "mandate-sidecar", "SPIFFE_ENDPOINT_SOCKET").as_deref()
            == Some("unix:///spiffe-workload-api/spire-agent.sock")
    );
    ensure!(env(&got, "mandate-sidecar", "MANDATE_IDENTITY_SOURCE").as_deref() == Some("spire"));
    ensure!(
        env(&got, "mandate-sidecar", "MANDATE_OPERATOR_SPIFFE_ID").as_deref()
            == Some("spiffe://example.org/spire/operator")
    );
    ensure!(
        env(&got, "mandate-sidecar", "MANDATE_AGENT_SPIFFE_ID").as_deref()
            == Some(format!("spiffe://example.org/ns/{}/agent/researcher", agents.name()).as_str())
    );
    ensure!(env(&got, "mandate-sidecar", "MANDATE_AGENT_IDENTITY").as_deref() == Some("researcher"));
    ensure!(env(&got, "mandate-sidecar", "MANDATE_SVID_SERVER").is_none());
    let sidecar = spec
        .containers
        .iter()
        .find(|c| c.name == "mandate-sidecar")
        .context("no sidecar")?;
    ensure!(
        sidecar
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "mandate-spiffe-workload-api"
                && m.mount_path == "/spiffe-workload-api"
                && m.read_only == Some(true)),
        "{:?}",
        sidecar.volume_mounts
    );
    // The stored pod passes the guard as injected (an update is admitted).
    agents
        .api::<Pod>()
        .patch(
            "agent-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .with_context(|| hooks.logs())?;
    op.delete().await?;
    agents.delete().await
}

/// The pod's one container `agent` with this securityContext.
fn agent_container(sc: Value) -> Value {
    json!({"spec": {"containers": [{"name": "agent", "image": "mandate.local/busybox:1", "command": ["sleep", "3600"],
                                    "securityContext": sc}]}})
}

/// Every container of the pod, ordinary and init, by name.
fn container<'a>(p: &'a Pod, name: &str) -> Option<&'a k8s_openapi::api::core::v1::Container> {
    let spec = p.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn hostile_agent_pods_are_refused_with_the_reason_and_ordinary_ones_cannot_escalate() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("wh-op").await?;
    let agents = cluster.namespace("wh-posture").await?;
    let hooks = Webhooks::start(&cluster, &op, &agents).await?;
    identity(&agents, "researcher", json!({"matchLabels": {"agent": "researcher"}})).await?;
    let researcher = json!({"agent": "researcher"});

    // An ordinary agent pod (UID 1000, nothing else said): admitted, and
    // every container of its own, init ones too, cannot gain privileges.
    let ordinary = pod(
        "ordinary",
        researcher.clone(),
        json!({"spec": {"initContainers": [{"name": "setup", "image": "mandate.local/busybox:1", "command": ["true"],
                                             "securityContext": {"readOnlyRootFilesystem": true}}]}}),
    );
    let got = create_agent_pod(&agents, &ordinary, true).await?;
    for name in ["agent", "setup"] {
        let sc = container(&got, name)
            .and_then(|c| c.security_context.clone())
            .with_context(|| format!("{name} has no securityContext\n{}", hooks.logs()))?;
        ensure!(sc.allow_privilege_escalation == Some(false), "{name}: {sc:?}");
        if name == "setup" {
            ensure!(
                sc.read_only_root_filesystem == Some(true),
                "{name}'s own fields kept: {sc:?}"
            );
        }
    }

    // Hostile agents, each trying one way out of mediation.
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "hostPID",
            json!({"spec": {"hostPID": true}}),
            &["spec.hostPID", "/proc"],
        ),
        ("hostIPC", json!({"spec": {"hostIPC": true}}), &["spec.hostIPC"]),
        (
            "hostPath",
            json!({"spec": {"volumes": [{"name": "node-root", "hostPath": {"path": "/"}}]}}),
            &["volume node-root is a hostPath volume"],
        ),
        (
            "privileged",
            agent_container(json!({"privileged": true})),
            &["container agent (containers)", "privileged: true"],
        ),
        (
            "NET_ADMIN",
            agent_container(json!({"capabilities": {"add": ["NET_ADMIN"]}})),
            &["container agent", "adds capability NET_ADMIN"],
        ),
        (
            "SETUID",
            agent_container(json!({"capabilities": {"add": ["CAP_SETUID"]}})),
            &["adds capability CAP_SETUID", "NET_BIND_SERVICE"],
        ),
        (
            "allowPrivilegeEscalation",
            agent_container(json!({"allowPrivilegeEscalation": true})),
            &["container agent", "allowPrivilegeEscalation: true"],
        ),
        (
            "the proxy's UID",
            json!({"spec": {"securityContext": {"runAsUser": 15999}}}),
            &["runs as UID 15999", "the UID of Mandate's proxy"],
        ),
        (
            "root keeping SETUID",
            json!({"spec": {"securityContext": {"runAsUser": 0, "runAsNonRoot": false}}}),
            &["runs as root", "SETUID"],
        ),
        (
            "no runAsUser",
            json!({"spec": {"securityContext": null}}),
            &["container agent (containers) has no runAsUser", "runAsUser"],
        ),
        (
            "an init container adding SYS_ADMIN",
            json!({"spec": {"initContainers": [{"name": "setup", "image": "mandate.local/busybox:1",
                                                 "securityContext": {"capabilities": {"add": ["sys_admin"]}}}]}}),
            &["container setup (initContainers)", "sys_admin"],
        ),
    ];
    let api = agents.api::<Pod>();
    for (i, (what, extra, needles)) in cases.into_iter().enumerate() {
        let p = pod(&format!("hostile-{i}"), researcher.clone(), extra);
        match api.create(&PostParams::default(), &p).await {
            Ok(created) => bail!("{what}: admitted as {:?}\n{}", names(&created), hooks.logs()),
            Err(e) => {
                let e = e.to_string();
                ensure!(e.contains("Mandate cannot inject this agent pod"), "{what}: {e}");
                for n in needles {
                    ensure!(e.contains(n), "{what}: {e:?} does not say {n:?}");
                }
            }
        }
    }

    // Forged injected pods (Mandate's containers and marker copied from a
    // real one) are held to the same rules: by the mutating webhook...
    let mut injected = serde_json::to_value(&got)?;
    injected["metadata"] = json!({"name": "x", "namespace": agents.name(), "labels": got.labels(),
                                  "annotations": got.annotations()});
    injected.as_object_mut().context("a pod")?.remove("status");
    let forge = |name: &str, change: &dyn Fn(&mut Value)| -> Result<Value> {
        let mut v = injected.clone();
        v["metadata"]["name"] = json!(name);
        change(&mut v);
        Ok(v)
    };
    let agent_index = got
        .spec
        .as_ref()
        .context("no spec")?
        .containers
        .iter()
        .position(|c| c.name == "agent")
        .context("no agent container")?;
    let host_pid = forge("forged-hostpid", &|v| v["spec"]["hostPID"] = json!(true))?;
    let escalating = forge("forged-escalation", &|v| {
        v["spec"]["containers"][agent_index]["securityContext"] = json!({});
    })?;
    let proxy_uid = forge("forged-proxy-uid", &|v| {
        v["spec"]["containers"][agent_index]["securityContext"]["runAsUser"] = json!(15999);
    })?;
    for (what, forged, needle) in [
        ("hostPID", &host_pid, "spec.hostPID"),
        (
            "allowPrivilegeEscalation unset",
            &escalating,
            "does not set securityContext.allowPrivilegeEscalation: false",
        ),
        ("the proxy's UID", &proxy_uid, "runs as UID 15999"),
    ] {
        match api
            .create(&PostParams::default(), &serde_json::from_value(forged.clone())?)
            .await
        {
            Ok(_) => bail!("forged, {what}: admitted\n{}", hooks.logs()),
            Err(e) => {
                let e = e.to_string();
                ensure!(
                    e.contains("not the ones Mandate injects") && e.contains(needle),
                    "forged, {what}: {e}"
                );
            }
        }
    }
    // ... and by the guard, asked directly (as if the mutating webhook had
    // been bypassed), on creation and on an update of an injected pod.
    let ca = hooks.secret_ca().await?.context("no CA")?;
    let ask = async |op: &str, object: &Value, old: Value| -> Result<Value> {
        let (code, body) = hooks
            .post(
                "/validate/pods",
                &review("Pod", "", "pods", op, object.clone(), old),
                &ca,
            )
            .await?;
        ensure!(code == 200, "{code} {body}");
        Ok(serde_json::from_str(&body)?)
    };
    let allowed = ask("CREATE", &injected, Value::Null).await?;
    ensure!(
        allowed["response"]["allowed"] == true,
        "the injected pod itself: {allowed}"
    );
    for (op, old) in [("CREATE", Value::Null), ("UPDATE", injected.clone())] {
        let answer = ask(op, &host_pid, old).await?;
        ensure!(
            answer["response"]["allowed"] == false
                && answer["response"]["status"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("spec.hostPID")),
            "the guard, {op} of a forged hostPID pod: {answer}"
        );
    }
    // The injected pod as stored passes the guard on an update.
    api.patch(
        "ordinary",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
    )
    .await
    .with_context(|| hooks.logs())?;

    drop(hooks);
    op.delete().await?;
    agents.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn relabelling_an_injected_pod_or_its_namespace_cannot_change_its_identity_shed_a_policy_or_opt_out() -> Result<()>
{
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("wh-op").await?;
    let agents = cluster.namespace("wh-labels").await?;
    let hooks = Webhooks::start(&cluster, &op, &agents).await?;
    identity(&agents, "researcher", json!({"matchLabels": {"agent": "researcher"}})).await?;
    identity(&agents, "writer", json!({"matchLabels": {"agent": "writer"}})).await?;
    // A policy bound by label, as an admin writes a guardrail for a tier.
    agents
        .apply(
            &agent_policy("gold-guardrail")
                .module("p.rego", GOOD)
                .set("agentSelector", json!({"matchLabels": {"tier": "gold"}}))
                .manifest(),
        )
        .await?;
    let labels = json!({"agent": "researcher", "tier": "gold", "team": "a"});
    create_agent_pod(&agents, &pod("relabelled", labels, json!({})), true).await?;
    let api = agents.api::<Pod>();
    let relabel = |labels: Value| {
        let api = api.clone();
        async move {
            api.patch(
                "relabelled",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            )
            .await
        }
    };
    // A label nothing binds by: allowed.
    relabel(json!({"team": "b"}))
        .await
        .with_context(|| format!("an unrelated label change was refused\n{}", hooks.logs()))?;
    // The hostile changes: shed the guardrail, or become another agent.
    for (what, labels, needles) in [
        (
            "drop the tier label",
            json!({"tier": null}),
            &["gold-guardrail (would stop binding it)", "re-create the pod"][..],
        ),
        (
            "become the writer",
            json!({"agent": "writer"}),
            &["AgentIdentity writer instead of AgentIdentity researcher"][..],
        ),
        (
            "leave every identity",
            json!({"agent": null}),
            &["no identity (not an agent)"][..],
        ),
    ] {
        match relabel(labels).await {
            Ok(_) => bail!("{what}: the label change was admitted\n{}", hooks.logs()),
            Err(kube::Error::Api(s)) => {
                for needle in needles {
                    ensure!(s.message.contains(needle), "{what}: {}", s.message);
                }
            }
            Err(e) => bail!("{what}: {e}"),
        }
    }
    let now = api.get("relabelled").await?;
    let l = now.labels();
    ensure!(
        l.get("tier").map(String::as_str) == Some("gold") && l.get("agent").map(String::as_str) == Some("researcher"),
        "{l:?}"
    );

    // The namespace's opt-in cannot be taken back while the pod runs: not
    // removed, not changed; another label of the namespace can change.
    let namespaces = Api::<Namespace>::all(cluster.client());
    let label_ns = |value: Value| {
        let namespaces = namespaces.clone();
        let name = agents.name().to_string();
        async move {
            namespaces
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": value}})),
                )
                .await
        }
    };
    for (what, labels) in [
        ("remove the opt-in", json!({"mandate.dev/enforce": null})),
        ("turn it to false", json!({"mandate.dev/enforce": "false"})),
    ] {
        match label_ns(labels).await {
            Ok(_) => bail!("{what}: the namespace update was admitted\n{}", hooks.logs()),
            Err(kube::Error::Api(s)) => ensure!(
                s.message
                    .contains("1 running agent pod(s) Mandate injected (relabelled)")
                    && s.message.contains("Delete the agent pods"),
                "{what}: {}",
                s.message
            ),
            Err(e) => bail!("{what}: {e}"),
        }
    }
    label_ns(json!({"team": "a"}))
        .await
        .with_context(|| format!("an unrelated namespace label was refused\n{}", hooks.logs()))?;
    let enforced = async || -> Result<bool> {
        let n = namespaces.get(agents.name()).await?;
        Ok(n.labels().get("mandate.dev/enforce").map(String::as_str) == Some("true"))
    };
    ensure!(enforced().await?, "the opt-in is gone");
    // With the pod gone, the opt-out is the admin's to make.
    api.delete("relabelled", &DeleteParams::default().grace_period(0))
        .await?;
    try_eventually("the pod to be gone", secs(30), async || {
        Ok(api.get_opt("relabelled").await?.is_none())
    })
    .await?;
    label_ns(json!({"mandate.dev/enforce": null}))
        .await
        .with_context(|| format!("the opt-out with no agent pod left was refused\n{}", hooks.logs()))?;
    ensure!(!enforced().await?, "the opt-out did not take");
    drop(hooks);
    op.delete().await?;
    agents.delete().await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn switching_a_webhook_off_in_its_configuration_is_reported() -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
    use k8s_openapi::api::events::v1::Event;

    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("wh-op").await?;
    let agents = cluster.namespace("wh-drift").await?;
    let hooks = Webhooks::start_with(
        &cluster,
        &op,
        &agents,
        vec!["--webhook-drift-check-seconds".into(), "1".into()],
    )
    .await?;
    let name = hooks.name.clone();
    let drift = async |kind: &str, webhook: &str| -> Result<Option<f64>> {
        let (_, body) = mandate_e2e::http_get(&format!("http://127.0.0.1:{}/metrics", hooks.admin)).await?;
        let series = format!(
            "mandate_operator_webhook_drift{{kind=\"{kind}\",configuration=\"{name}\",webhook=\"{webhook}\"}} "
        );
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok()))
    };
    let events = async |needle: &str| -> Result<bool> {
        let list = Api::<Event>::all(cluster.client()).list(&Default::default()).await?;
        Ok(list.items.iter().any(|e| {
            e.reason.as_deref() == Some("WebhookDrift")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                && e.note.as_deref().is_some_and(|n| n.contains(needle))
        }))
    };
    // As configured: checked, and nothing found.
    for (kind, webhook) in [
        ("mutating", "pods.mandate.dev"),
        ("validating", "pods.mandate.dev"),
        ("validating", "namespaces.mandate.dev"),
    ] {
        try_eventually("a clean check", secs(30), async || {
            Ok(drift(kind, webhook).await? == Some(0.0))
        })
        .await
        .with_context(|| hooks.logs())?;
    }
    let validating = Api::<ValidatingWebhookConfiguration>::all(cluster.client());
    let mutating = Api::<MutatingWebhookConfiguration>::all(cluster.client());
    let json_patch = |ops: Value| -> Result<Patch<Value>> { Ok(Patch::Json(serde_json::from_value(ops)?)) };
    // Whoever may edit the configurations turns the guard off, lets pods
    // opt out by label, and drops the namespace guard.
    validating
        .patch(
            &name,
            &PatchParams::default(),
            &json_patch(json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]))?,
        )
        .await?;
    mutating
        .patch(
            &name,
            &PatchParams::default(),
            &json_patch(json!([{"op": "add", "path": "/webhooks/0/objectSelector",
                "value": {"matchExpressions": [{"key": "skip-mandate", "operator": "DoesNotExist"}]}}]))?,
        )
        .await?;
    let before = validating.get(&name).await?;
    let position = before
        .webhooks
        .iter()
        .flatten()
        .position(|w| w.name == "namespaces.mandate.dev")
        .context("no namespace guard in the test configuration")?;
    validating
        .patch(
            &name,
            &PatchParams::default(),
            &json_patch(json!([{"op": "remove", "path": format!("/webhooks/{position}")}]))?,
        )
        .await?;
    for (kind, webhook, needle) in [
        ("validating", "pods.mandate.dev", "failurePolicy is Ignore"),
        ("mutating", "pods.mandate.dev", "it has an objectSelector"),
        (
            "validating",
            "namespaces.mandate.dev",
            "the validating webhook namespaces.mandate.dev is gone",
        ),
    ] {
        try_eventually("the drift to be reported", secs(30), async || {
            Ok(drift(kind, webhook).await? == Some(1.0) && events(needle).await?)
        })
        .await
        .with_context(|| format!("{kind} {webhook}: {needle}\n{}", hooks.logs()))?;
    }
    // Put back: the series return to 0.
    validating
        .patch(
            &name,
            &PatchParams::default(),
            &json_patch(json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Fail"}]))?,
        )
        .await?;
    try_eventually("the repaired guard to be clean", secs(30), async || {
        Ok(drift("validating", "pods.mandate.dev").await? == Some(0.0))
    })
    .await
    .with_context(|| hooks.logs())?;
    ensure!(
        drift("mutating", "pods.mandate.dev").await? == Some(1.0),
        "the objectSelector is still there"
    );
    drop(hooks);
    op.delete().await?;
    agents.delete().await
}
