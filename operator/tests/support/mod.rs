//! Shared by the operator's cluster tests: a `mandate-operator` process
//! ([`Operator`]); one serving the webhooks on 127.0.0.1, with webhook
//! configurations scoped to the test's namespaces (removed afterwards)
//! ([`Webhooks`]); what a sidecar process reports on its admin port. The
//! helpers that need no cluster (waits, ports, manifests, processes) are in
//! mandate-testsupport.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // each test file uses a part; fixtures

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use mandate_e2e::{Cluster, TestNamespace, http_get, secs};
use mandate_testsupport::{Process, eventually, free_port, http_ok, try_eventually};
use serde_json::{Value, json};

/// How a test pod that stands for an agent departs from an injected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Mandate's marker, and the sidecar's token in `mandate-token`, which
    /// only `mandate-sidecar` mounts: what the signer asks of a pod (tests
    /// without webhooks write what the injector would).
    Injected,
    /// No marker: never injected.
    Plain,
    /// Injected, but the agent projects its own token for the signer's audience.
    OwnToken,
    /// Injected, but the agent mounts the sidecar's token volume.
    MountsToken,
}

/// A pod manifest of `shape`: an agent container `c` and a `mandate-sidecar`
/// (both running `image`, sleeping), run as `sa`, with `labels`; `node`
/// pins it to a node (a missing one keeps it from ever running).
pub fn agent_pod(name: &str, sa: &str, labels: Value, image: &str, node: Option<&str>, shape: Shape) -> Value {
    let token = |volume: &str| json!({"name": volume, "projected": {"sources": [{"serviceAccountToken": {"audience": "mandate", "expirationSeconds": 3600, "path": "token"}}]}});
    let sleeper = |name: &str, uid: i64| {
        json!({"name": name, "image": image, "command": ["sleep", "3600"],
        "securityContext": {"runAsUser": uid, "allowPrivilegeEscalation": false}})
    };
    let mut agent = sleeper("c", 1000);
    let mut sidecar = sleeper(mandate_api::names::SIDECAR_CONTAINER, 15999);
    sidecar["volumeMounts"] = json!([{"name": "mandate-token", "mountPath": "/var/run/secrets/mandate"}]);
    let mut volumes = vec![token("mandate-token")];
    match shape {
        Shape::Injected | Shape::Plain => {}
        Shape::OwnToken => {
            volumes.push(token("mine"));
            agent["volumeMounts"] = json!([{"name": "mine", "mountPath": "/t"}]);
        }
        Shape::MountsToken => agent["volumeMounts"] = json!([{"name": "mandate-token", "mountPath": "/t"}]),
    }
    let annotations = if shape == Shape::Plain {
        json!({})
    } else {
        json!({ mandate_api::names::INJECTED_ANNOTATION: "by-the-test" })
    };
    let mut spec = json!({"serviceAccountName": sa, "containers": [sidecar, agent], "volumes": volumes});
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    json!({"metadata": {"name": name, "labels": labels, "annotations": annotations}, "spec": spec})
}

/// Label `ns` `mandate.dev/enforce=true`, or take the label off.
pub async fn set_enforced(cluster: &Cluster, ns: &str, on: bool) -> Result<()> {
    let value = if on { json!("true") } else { Value::Null };
    Api::<Namespace>::all(cluster.client())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"mandate.dev/enforce": value}}})),
        )
        .await?;
    Ok(())
}

/// A `mandate-operator` command for `cluster` with its admin endpoint on
/// 127.0.0.1:`admin`; the test adds the rest of its arguments.
pub fn operator_command(cluster: &Cluster, admin: u16) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-operator"));
    cmd.args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .env("KUBECONFIG", &cluster.info().kubeconfig);
    cmd
}

/// A `mandate-operator` process (killed when dropped) and its admin port.
#[derive(Debug)]
pub struct Operator {
    pub process: Process,
    pub admin: u16,
}

impl Operator {
    /// Start `cmd` (from [`operator_command`] with `admin`), its output appended to `log`.
    pub fn spawn(mut cmd: tokio::process::Command, admin: u16, log: &Path) -> Result<Self> {
        let process = Process::spawn("mandate-operator", &mut cmd, log)?;
        Ok(Self { process, admin })
    }

    /// [`Operator::spawn`], then wait up to `timeout` until it is ready.
    pub async fn start(cmd: tokio::process::Command, admin: u16, log: &Path, timeout: Duration) -> Result<Self> {
        let op = Self::spawn(cmd, admin, log)?;
        op.wait_ready(timeout).await?;
        Ok(op)
    }

    /// `http://127.0.0.1:<admin><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        http_ok(&self.url("/readyz")).await
    }

    /// Wait until `/readyz` answers 200; on timeout the error carries the log.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        eventually("the operator to be ready", timeout, async || self.ready().await)
            .await
            .with_context(|| format!("operator not ready:\n{}", self.logs()))
    }

    pub fn logs(&self) -> String {
        self.process.log()
    }
}

/// `name=version` of each policy a sidecar has in force, sorted (from the
/// `mandate_sidecar_policy_info` metric on its admin port); none when the
/// port does not answer.
pub async fn policies_in_force(admin: u16) -> Vec<String> {
    let Ok((_, m)) = http_get(&format!("http://127.0.0.1:{admin}/metrics")).await else {
        return vec![];
    };
    let mut out: Vec<String> = m
        .lines()
        .filter(|l| l.starts_with("mandate_sidecar_policy_info{"))
        .filter_map(|l| {
            let field = |k: &str| {
                l.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .map(str::to_string)
            };
            Some(format!("{}={}", field("policy")?, field("version")?))
        })
        .collect();
    out.sort();
    out
}

/// A `mandate-sidecar` process (killed when dropped) and its admin port.
#[derive(Debug)]
pub struct Sidecar {
    pub process: Process,
    pub admin: u16,
}

impl Sidecar {
    /// `name=version` of each policy it has in force.
    pub async fn in_force(&self) -> Vec<String> {
        policies_in_force(self.admin).await
    }

    /// Whether its `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        http_ok(&format!("http://127.0.0.1:{}/readyz", self.admin)).await
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// The operator process, its webhook configurations, and a way to reach them.
pub struct Webhooks {
    pub child: Option<Process>,
    pub cluster: Cluster,
    pub name: String,
    pub port: u16,
    pub log: PathBuf,
    pub op_ns: String,
    /// Extra operator arguments (images...).
    pub extra_args: Vec<String>,
    /// The operator's admin port (`/metrics`).
    pub admin: u16,
}

impl Drop for Webhooks {
    fn drop(&mut self) {
        // Cluster-scoped: remove them whatever happened (synchronously).
        for kind in ["mutatingwebhookconfiguration", "validatingwebhookconfiguration"] {
            let _ = std::process::Command::new(&self.cluster.info().kubectl)
                .arg("--kubeconfig")
                .arg(&self.cluster.info().kubeconfig)
                .args(["delete", kind, &self.name, "--ignore-not-found", "--wait=false"])
                .output();
        }
    }
}

fn configurations(name: &str, port: u16, test: &str) -> (Value, Value) {
    let hook = |hook: &str, path: &str, ops: Value, group: &str, version: &str, resources: Value, enforced: bool| {
        let mut labels = json!({"mandate.dev/test": test});
        if enforced {
            labels["mandate.dev/enforce"] = json!("true");
        }
        json!({
            "name": hook,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}{path}")},
            "rules": [{"operations": ops, "apiGroups": [group], "apiVersions": [version], "resources": resources}],
            "namespaceSelector": {"matchLabels": labels},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
        })
    };
    let mut pods = hook(
        "pods.mandate.dev",
        "/mutate/pods",
        json!(["CREATE"]),
        "",
        "v1",
        json!(["pods"]),
        true,
    );
    pods["reinvocationPolicy"] = json!("IfNeeded");
    let mutating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            pods,
            hook("approvals.mandate.dev", "/mutate/agentapprovals", json!(["UPDATE"]), "mandate.dev", "v1alpha1",
                 json!(["agentapprovals", "agentapprovals/status"]), false),
        ],
    });
    // As in the chart: the namespace itself is matched by its labels (old and new).
    let mut namespaces = hook(
        "namespaces.mandate.dev",
        "/validate/namespaces",
        json!(["UPDATE"]),
        "",
        "v1",
        json!(["namespaces"]),
        true,
    );
    namespaces["objectSelector"] = namespaces["namespaceSelector"].take();
    namespaces["rules"][0]["scope"] = json!("Cluster");
    if let Some(hook) = namespaces.as_object_mut() {
        hook.remove("namespaceSelector");
    }
    let validating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            hook("pods.mandate.dev", "/validate/pods", json!(["CREATE", "UPDATE"]), "", "v1", json!(["pods", "pods/ephemeralcontainers"]), true),
            namespaces,
            hook("agentpolicies.mandate.dev", "/validate/agentpolicies", json!(["CREATE", "UPDATE"]), "mandate.dev",
                 "v1alpha1", json!(["agentpolicies"]), false),
            hook("agentidentities.mandate.dev", "/validate/agentidentities", json!(["CREATE", "UPDATE"]), "mandate.dev",
                 "v1alpha1", json!(["agentidentities"]), false),
            hook("approvals.mandate.dev", "/validate/agentapprovals", json!(["UPDATE"]), "mandate.dev", "v1alpha1",
                 json!(["agentapprovals", "agentapprovals/status"]), false),
        ],
    });
    (mutating, validating)
}

impl Webhooks {
    /// Label `agents` as enforced, create the webhook configurations (no
    /// caBundle), start the operator, and wait until it has written the
    /// caBundle and is ready.
    pub async fn start(cluster: &Cluster, op: &TestNamespace, agents: &TestNamespace) -> Result<Self> {
        Self::start_with(cluster, op, agents, vec![]).await
    }

    /// [`Webhooks::start`] with more operator arguments.
    pub async fn start_with(
        cluster: &Cluster,
        op: &TestNamespace,
        agents: &TestNamespace,
        extra_args: Vec<String>,
    ) -> Result<Self> {
        let test = agents.name().to_string();
        for (ns, enforce) in [(agents.name(), true), (op.name(), false)] {
            let mut labels = json!({"mandate.dev/test": test});
            if enforce {
                labels["mandate.dev/enforce"] = json!("true");
            }
            Api::<Namespace>::all(cluster.client())
                .patch(
                    ns,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": labels}})),
                )
                .await?;
        }
        let name = format!("mandate-test-{test}");
        let port = free_port();
        let (m, v) = configurations(&name, port, &test);
        let pp = PostParams::default();
        Api::<MutatingWebhookConfiguration>::all(cluster.client())
            .create(&pp, &serde_json::from_value(m)?)
            .await?;
        Api::<ValidatingWebhookConfiguration>::all(cluster.client())
            .create(&pp, &serde_json::from_value(v)?)
            .await?;
        let mut hooks = Self {
            child: None,
            cluster: cluster.clone(),
            name,
            port,
            log: std::env::temp_dir().join(format!("mandate-webhooks-{test}.log")),
            op_ns: op.name().into(),
            extra_args,
            admin: 0,
        };
        hooks.start_operator(agents.name()).await?;
        Ok(hooks)
    }

    pub async fn start_operator(&mut self, agents: &str) -> Result<()> {
        let admin = free_port();
        self.admin = admin;
        let mut cmd = operator_command(&self.cluster, admin);
        cmd.args(["--watch-namespace", agents, "--lease-namespace", &self.op_ns])
            .args(["--operator-namespace", &self.op_ns, "--trust-domain", "example.org"])
            .args([
                "--webhook-addr",
                &format!("127.0.0.1:{}", self.port),
                "--webhook-san",
                "127.0.0.1",
            ])
            .args(["--mutating-webhook-configuration", &self.name])
            .args(["--validating-webhook-configuration", &self.name])
            .args(["--webhook-cert-reload-seconds", "1"])
            // The pre-1.29 path unless the test picks the mode.
            .args(
                (!self.extra_args.iter().any(|a| a == "--native-sidecars"))
                    .then_some(["--native-sidecars", "never"])
                    .as_slice()
                    .concat(),
            )
            // No CA unless the test asks for it (with an address of its own).
            .args(
                (!self.extra_args.iter().any(|a| a == "--identity-addr"))
                    .then_some("--no-identity")
                    .as_slice(),
            )
            .args(&self.extra_args)
            .env("MANDATE_LOG", "info,mandate_operator=debug");
        self.child = Some(Process::spawn("mandate-operator", &mut cmd, &self.log)?);
        let readyz = format!("http://127.0.0.1:{admin}/readyz");
        try_eventually("the operator's webhooks to be ready", secs(60), async || {
            Ok(http_ok(&readyz).await && self.ca_bundle_written().await?)
        })
        .await
        .with_context(|| format!("the operator's webhooks never became ready:\n{}", self.logs()))
    }

    /// Whether every webhook in both configurations has the Secret's CA.
    pub async fn ca_bundle_written(&self) -> Result<bool> {
        let Some(ca) = self.secret_ca().await? else {
            return Ok(false);
        };
        let m = Api::<MutatingWebhookConfiguration>::all(self.cluster.client())
            .get(&self.name)
            .await?;
        let v = Api::<ValidatingWebhookConfiguration>::all(self.cluster.client())
            .get(&self.name)
            .await?;
        let bundles: Vec<Option<Vec<u8>>> = m
            .webhooks
            .iter()
            .flatten()
            .map(|w| w.client_config.ca_bundle.clone().map(|b| b.0))
            .chain(
                v.webhooks
                    .iter()
                    .flatten()
                    .map(|w| w.client_config.ca_bundle.clone().map(|b| b.0)),
            )
            .collect();
        Ok(bundles.iter().all(|b| b.as_deref() == Some(ca.as_bytes())))
    }

    pub async fn secret_ca(&self) -> Result<Option<String>> {
        let s = Api::<Secret>::namespaced(self.cluster.client(), &self.op_ns)
            .get_opt("mandate-webhook-tls")
            .await?;
        Ok(s.and_then(|s| {
            s.data?
                .get("ca.crt")
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        }))
    }

    /// `(count, mean seconds)` of the operator's answers to one webhook.
    pub async fn admission_latency(&self, webhook: &str) -> Result<(u64, f64)> {
        let (_, body) = http_get(&format!("http://127.0.0.1:{}/metrics", self.admin)).await?;
        let value = |name: &str| {
            body.lines()
                .find(|l| l.starts_with(name) && l.contains(&format!("webhook=\"{webhook}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        let count = value("mandate_operator_admission_duration_seconds_count").unwrap_or(0.0);
        let sum = value("mandate_operator_admission_duration_seconds_sum").unwrap_or(0.0);
        Ok((count as u64, if count > 0.0 { sum / count } else { 0.0 }))
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// POST `body` to a webhook path over TLS, trusting `ca`: (HTTP status, body).
    pub async fn post(&self, path: &str, body: &str, ca: &str) -> Result<(u16, String)> {
        let ca_file = std::env::temp_dir().join(format!("mandate-ca-{}-{}.pem", self.port, std::process::id()));
        std::fs::write(&ca_file, ca)?;
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&ca_file)
            .args(["-H", "content-type: application/json", "--data-binary", body])
            .args(["-w", "\n%{http_code}"])
            .arg(format!("https://127.0.0.1:{}{path}", self.port))
            .output()
            .await
            .context("running curl")?;
        ensure!(
            out.status.success(),
            "curl to {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').context("no status from curl")?;
        Ok((code.trim().parse()?, body.to_string()))
    }
}
