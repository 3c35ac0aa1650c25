//! The rules a current apiserver enforces itself, from the CRDs alone (CEL
//! `x-kubernetes-validations`, the schema, strict field validation), tested
//! against the real kube-apiserver with no Mandate webhook in the way (the
//! namespace carries no label any test's webhook selects), so that each rule
//! is seen holding on its own:
//! - policies without modules, with an entrypoint outside `data`, or with an
//!   egress host that is a URL are refused with the rule's message;
//! - identities with an empty selector, a non-SPIFFE template or a malformed
//!   TTL are refused;
//! - an approval's spec cannot change; its decision moves one way only (it
//!   cannot be reversed, re-attributed, reopened or removed), and a decision
//!   records who and when;
//! - `kubectl apply` of an object with a misspelled field fails naming the
//!   field, and with `--validate=warn` the user sees the warning;
//! - every example in `policies/`, and the README's, is accepted.
//!
//! The webhooks keep every one of these rules too (`webhooks.rs`), so nothing
//! depends on CEL alone; rules that need the namespace (a SPIFFE ID bound to
//! it, overlapping selectors) stay in the webhook, since CRD rules cannot read
//! `metadata.namespace`.
//!
//! Needs a running test cluster (`hack/cluster.sh up`); `make test` does it.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use anyhow::{Result, ensure};
use mandate_e2e::{Cluster, KubectlOutput, TestNamespace};
use mandate_testsupport::manifests::DENY_ALL as MODULE;
use mandate_testsupport::{agent_identity, agent_policy};
use serde_json::{Value, json};

fn policy(spec: Value) -> Value {
    agent_policy("p")
        .module("authz.rego", MODULE)
        .identity("a")
        .merge(spec)
        .json()
}

fn identity(spec: Value) -> Value {
    agent_identity("i").merge(spec).json()
}

async fn apply(ns: &TestNamespace, obj: &Value, extra: &[&str]) -> Result<KubectlOutput> {
    let mut args = vec!["apply", "-n", ns.name(), "-f", "-"];
    args.extend_from_slice(extra);
    ns.cluster().kubectl_output(&args, &obj.to_string()).await
}

/// `obj` is refused, and the message the user sees says `why`.
async fn refused(ns: &TestNamespace, what: &str, obj: &Value, why: &str) -> Result<()> {
    let out = apply(ns, obj, &[]).await?;
    ensure!(!out.success, "{what}: accepted:\n{}", out.stdout);
    ensure!(
        out.stderr.contains(why),
        "{what}: refused without saying '{why}':\n{}",
        out.stderr
    );
    eprintln!("refused, {what}: {}", out.stderr.trim());
    Ok(())
}

async fn accepted(ns: &TestNamespace, what: &str, obj: &Value) -> Result<()> {
    let out = apply(ns, obj, &[]).await?;
    ensure!(out.success, "{what}: refused:\n{}", out.stderr);
    Ok(())
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn the_apiserver_enforces_the_crd_rules_on_its_own() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    cluster
        .with_namespace("crd-rules", async |ns| {
            policies(ns).await?;
            identities(ns).await?;
            approvals(ns).await?;
            misspelled_fields(ns).await?;
            examples(ns).await
        })
        .await
}

async fn policies(ns: &TestNamespace) -> Result<()> {
    refused(
        ns,
        "a policy without modules",
        &policy(json!({"modules": []})),
        "spec.modules needs at least one Rego module",
    )
    .await?;
    refused(
        ns,
        "an entrypoint outside data",
        &policy(json!({"entrypoint": "mandate.authz.decision"})),
        "spec.entrypoint names a rule under data",
    )
    .await?;
    for host in [
        "https://api.example.com",
        "api.example.com:443",
        "api.example.com/v1",
        "",
    ] {
        refused(
            ns,
            &format!("egress host '{host}'"),
            &policy(json!({"egress": [{"host": host, "port": 443}]})),
            "a host name alone",
        )
        .await?;
    }
    refused(
        ns,
        "an egress port out of range",
        &policy(json!({"egress": [{"host": "api.example.com", "port": 70000}]})),
        "spec.egress[0].port",
    )
    .await?;
    let key = json!({"secretKeyRef": {"name": "api", "key": "token"}});
    refused(
        ns,
        "a brokered credential under a wildcard host",
        &policy(json!({"egress": [{"host": "*.example.com", "port": 443, "credential": key}]})),
        "a brokered credential needs an exact host",
    )
    .await?;
    refused(
        ns,
        "a credential with two sources",
        &policy(
            json!({"egress": [{"host": "api.example.com", "port": 443, "credential": {
            "secretKeyRef": {"name": "api", "key": "token"},
            "serviceAccountToken": {"serviceAccountName": "agent"}}}]}),
        ),
        "name exactly one source",
    )
    .await?;
    refused(
        ns,
        "a credential in a header and a query parameter",
        &policy(
            json!({"egress": [{"host": "api.example.com", "port": 443, "credential": {
            "secretKeyRef": {"name": "api", "key": "token"}, "header": "X-Api-Key", "queryParameter": "key"}}]}),
        ),
        "a header or a query parameter, not both",
    )
    .await?;
    accepted(
        ns,
        "a good policy",
        &policy(json!({"egress": [{"host": "*.example.com", "port": 443, "tls": true},
                                  {"host": "api.example.com", "port": 443, "credential": key}]})),
    )
    .await
}

async fn identities(ns: &TestNamespace) -> Result<()> {
    let empty = "spec.selector selects pods by what they lack";
    refused(ns, "an empty selector", &identity(json!({"selector": {}})), empty).await?;
    refused(
        ns,
        "a selector of absences only",
        &identity(json!({"selector": {"matchExpressions": [
            {"key": "app", "operator": "NotIn", "values": ["web"]},
            {"key": "debug", "operator": "DoesNotExist"}]}})),
        empty,
    )
    .await?;
    refused(
        ns,
        "a selector of empty lists",
        &identity(json!({"selector": {"matchLabels": {}, "matchExpressions": []}})),
        empty,
    )
    .await?;
    let sel = json!({"matchLabels": {"agent": "x"}});
    refused(
        ns,
        "a template that is not a SPIFFE ID",
        &identity(json!({"selector": sel, "spiffeIdTemplate": "https://example.org/{name}"})),
        "spec.spiffeIdTemplate must be a spiffe:// URI",
    )
    .await?;
    refused(
        ns,
        "a malformed TTL",
        &identity(json!({"selector": sel, "svidTtl": "10 minutes"})),
        "spec.svidTtl is a duration like 10m",
    )
    .await?;
    accepted(
        ns,
        "a good identity",
        &identity(json!({"selector": sel, "svidTtl": "15m"})),
    )
    .await?;
    // An expression selector is a selector too.
    let mut by_expr = identity(json!({"selector": {"matchExpressions": [{"key": "agent", "operator": "Exists"}]}}));
    by_expr["metadata"]["name"] = json!("j");
    accepted(ns, "a selector by expression", &by_expr).await
}

async fn approvals(ns: &TestNamespace) -> Result<()> {
    let approval = json!({
        "apiVersion": "mandate.dev/v1alpha1", "kind": "AgentApproval", "metadata": {"name": "a1"},
        "spec": {"agent": "a", "action": {"method": "DELETE", "host": "api.example.com", "path": "/x"},
                 "reason": "destructive", "policy": "p", "policyVersion": "sha256:00", "expiresAt": "2099-01-01T00:00:00Z"},
    });
    accepted(ns, "an approval", &approval).await?;
    let cluster = ns.cluster();
    let patch = |target: &'static str, body: Value| {
        let ns = ns.name().to_string();
        async move {
            let mut args = vec!["patch", "-n", &ns, "agentapproval", "a1", "--type=merge", "-p"];
            let body = body.to_string();
            args.push(&body);
            if target == "status" {
                args.push("--subresource=status");
            }
            cluster.kubectl_output(&args, "").await
        }
    };
    let changed = patch("spec", json!({"spec": {"action": {"host": "other.example.com"}}})).await?;
    ensure!(
        !changed.success && changed.stderr.contains("an AgentApproval's spec cannot change"),
        "a changed spec: {changed:?}"
    );
    let undecided = patch("status", json!({"status": {"phase": "Approved"}})).await?;
    ensure!(
        !undecided.success
            && undecided
                .stderr
                .contains("records status.decidedBy and status.decidedAt"),
        "an approval without who decided: {undecided:?}"
    );
    let pending_by = patch(
        "status",
        json!({"status": {"phase": "Pending", "decidedBy": "mallory"}}),
    )
    .await?;
    ensure!(
        !pending_by.success && pending_by.stderr.contains("not on a Pending approval"),
        "a Pending approval with a decider: {pending_by:?}"
    );
    let decided = patch(
        "status",
        json!({"status": {"phase": "Approved", "decidedBy": "ann", "decidedAt": "2026-01-01T00:00:00Z"}}),
    )
    .await?;
    ensure!(decided.success, "a recorded decision: {decided:?}");
    for (what, status) in [
        ("reversed", json!({"phase": "Denied"})),
        ("re-attributed", json!({"decidedBy": "mallory"})),
        (
            "reopened",
            json!({"phase": "Pending", "decidedBy": null, "decidedAt": null}),
        ),
    ] {
        let out = patch("status", json!({"status": status})).await?;
        ensure!(
            !out.success && out.stderr.contains("a decision cannot change"),
            "a decision {what}: {out:?}"
        );
    }
    // Removing the status (which the status rules cannot see) to decide
    // afresh: refused by the rule on the whole object.
    let removed = cluster
        .kubectl_output(
            &[
                "patch",
                "-n",
                ns.name(),
                "agentapproval",
                "a1",
                "--subresource=status",
                "--type=json",
                "-p",
                r#"[{"op": "remove", "path": "/status"}]"#,
            ],
            "",
        )
        .await?;
    ensure!(
        !removed.success && removed.stderr.contains("a decision cannot change or be removed"),
        "a decision removed: {removed:?}"
    );
    let now = cluster
        .kubectl(&[
            "get",
            "-n",
            ns.name(),
            "agentapproval",
            "a1",
            "-o",
            "jsonpath={.status.phase}/{.status.decidedBy}",
        ])
        .await?;
    ensure!(now == "Approved/ann", "the decision changed: {now}");
    Ok(())
}

async fn misspelled_fields(ns: &TestNamespace) -> Result<()> {
    let mut typo = policy(json!({}));
    typo["metadata"]["name"] = json!("typo");
    typo["spec"]["entrypiont"] = json!("data.mandate.authz.other");
    let strict = apply(ns, &typo, &[]).await?;
    ensure!(
        !strict.success && strict.stderr.contains(r#"unknown field "spec.entrypiont""#),
        "a misspelled field under kubectl's default (strict) validation: {strict:?}"
    );
    let warn = apply(ns, &typo, &["--validate=warn"]).await?;
    ensure!(
        warn.success && warn.stderr.contains("Warning") && warn.stderr.contains(r#"unknown field "spec.entrypiont""#),
        "a misspelled field with --validate=warn: {warn:?}"
    );
    // What was stored is the policy without the misspelled field.
    let stored = ns
        .cluster()
        .kubectl(&[
            "get",
            "-n",
            ns.name(),
            "agentpolicy",
            "typo",
            "-o",
            "jsonpath={.spec.entrypoint}",
        ])
        .await?;
    ensure!(stored == "data.mandate.authz.decision", "stored entrypoint: {stored}");
    Ok(())
}

async fn examples(ns: &TestNamespace) -> Result<()> {
    let dir = mandate_e2e::repo_dir().join("policies");
    let dir = dir.to_string_lossy();
    let out = ns
        .cluster()
        .kubectl_output(&["apply", "-n", ns.name(), "-f", &dir], "")
        .await?;
    ensure!(out.success, "the examples in policies/ were refused:\n{}", out.stderr);
    // The README's example (an AgentIdentity and an AgentPolicy), as a user
    // would apply it.
    let readme = std::fs::read_to_string(mandate_e2e::repo_dir().join("README.md"))?;
    let example = readme
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .filter(|y| y.contains("kind: AgentPolicy") && y.contains("kind: AgentIdentity"))
        .ok_or_else(|| {
            anyhow::anyhow!("README.md's first yaml block is not the AgentIdentity + AgentPolicy example")
        })?;
    let out = ns
        .cluster()
        .kubectl_output(&["apply", "-n", ns.name(), "-f", "-"], example)
        .await?;
    ensure!(out.success, "the README's example was refused:\n{}", out.stderr);
    Ok(())
}
