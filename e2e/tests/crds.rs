//! Mandate's CRDs in a real apiserver: they install and become Established,
//! `kubectl explain` shows the field descriptions, `kubectl get` shows the
//! printer columns, and the schema rejects malformed objects with a message
//! that says what is wrong. Works on either cluster shape.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use mandate_e2e::testsupport::wait_for;
use mandate_e2e::{Cluster, secs};

/// Retry `kubectl ARGS` until its output contains `needle` (the apiserver
/// publishes a new CRD's OpenAPI a moment after it is Established).
async fn kubectl_until(cluster: &Cluster, args: &[&str], needle: &str, timeout: Duration) -> Result<String> {
    wait_for(format!("kubectl {} to show '{needle}'", args.join(" ")), timeout)
        .every(Duration::from_millis(250))
        .until_some(async || match cluster.kubectl(args).await {
            Ok(out) if out.contains(needle) => Ok(Some(out)),
            Ok(out) => Err(anyhow!("last output:\n{out}")),
            Err(e) => Err(e),
        })
        .await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn crds_install_and_explain_themselves() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    for (path, needle) in [
        ("agentpolicy.spec.modules", "The Rego modules of the policy"),
        ("agentpolicy.spec.mode", "DryRun"),
        ("agentpolicy.status.version", "sha256:<hex>"),
        ("agentidentity.spec.spiffeIdTemplate", "{trustDomain}"),
        ("agentapproval.status.decidedBy", "authenticated user"),
    ] {
        kubectl_until(&cluster, &["explain", path], needle, secs(30)).await?;
    }
    Ok(())
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn kubectl_get_shows_the_printer_columns_and_the_schema_rejects_bad_input() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    cluster
        .with_namespace("crds", async |ns| {
            let policy = r#"
apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: allow-get}
spec:
  mode: DryRun
  modules:
  - name: authz.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := false
      decision if input.attributes.request.http.method == "GET"
"#;
            cluster
                .kubectl_with_input(&["-n", ns.name(), "apply", "-f", "-"], policy)
                .await?;
            let table = cluster.kubectl(&["-n", ns.name(), "get", "agentpolicies"]).await?;
            let header = table.lines().next().context("no output from kubectl get")?;
            for col in ["NAME", "MODE", "VERSION", "READY", "AGE"] {
                ensure!(header.contains(col), "column {col} missing from:\n{table}");
            }
            ensure!(table.contains("allow-get") && table.contains("DryRun"), "{table}");
            // The short name and the category work too.
            let short = cluster.kubectl(&["-n", ns.name(), "get", "apol", "-o", "name"]).await?;
            ensure!(short.trim() == "agentpolicy.mandate.dev/allow-get", "{short}");
            let cat = cluster
                .kubectl(&["-n", ns.name(), "get", "mandate", "-o", "name"])
                .await?;
            ensure!(cat.contains("agentpolicy.mandate.dev/allow-get"), "{cat}");

            // Malformed objects are refused with a message naming the field.
            for (bad, expect) in [
                (policy.replace("mode: DryRun", "mode: Permissive"), "spec.mode"),
                (
                    policy.replace("  modules:", "  egress: [{host: x.example, port: 70000}]\n  modules:"),
                    "spec.egress",
                ),
                (policy.replace("    rego: |", "    source: |"), "spec.modules"),
                // data must be a JSON object (it is merged into `data` at the root)
                (policy.replace("  modules:", "  data: [1, 2]\n  modules:"), "spec.data"),
            ] {
                let bad = bad.replace("allow-get", "bad");
                match cluster
                    .kubectl_with_input(&["-n", ns.name(), "apply", "-f", "-"], &bad)
                    .await
                {
                    Ok(out) => bail!("a malformed AgentPolicy was accepted ({expect}): {out}"),
                    Err(e) => {
                        let msg = format!("{e:#}");
                        ensure!(msg.contains(expect), "rejection does not name {expect}: {msg}");
                    }
                }
            }

            let identity = r#"
apiVersion: mandate.dev/v1alpha1
kind: AgentIdentity
metadata: {name: researcher}
spec:
  selector: {matchLabels: {app: researcher}}
  principal: {kind: Human, name: alice@example.com}
"#;
            cluster
                .kubectl_with_input(&["-n", ns.name(), "apply", "-f", "-"], identity)
                .await?;
            let table = cluster.kubectl(&["-n", ns.name(), "get", "agentidentities"]).await?;
            let header = table.lines().next().context("no output from kubectl get")?;
            for col in ["NAME", "SPIFFE ID", "PODS", "READY", "AGE"] {
                ensure!(header.contains(col), "column {col} missing from:\n{table}");
            }
            Ok(())
        })
        .await
}
