//! SPIRE mode (`--identity-source spire`) against a real kube-apiserver,
//! with SPIFFE Workload API servers the test stands up in place of SPIRE
//! agents (tonic on unix sockets, `workload.spiffe.io` required, SVIDs
//! minted with rcgen by one test CA; SPIRE itself cannot be had here):
//! the operator runs no CA and no signing service, is not ready until the
//! Workload API gives it its SVID, then serves the policy service with that
//! SVID; a sidecar process in SPIRE mode, whose SVID comes from its own
//! Workload API socket, verifies the operator with the Workload API's bundle
//! and receives its identity's policies; the operator takes a rotated SVID
//! and a sidecar subscribing afterwards still gets its set; a sidecar whose
//! SVID comes from another CA is refused by the operator, and one whose
//! bundle lacks the real CA refuses the operator.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use mandate_api::crd::AgentPolicy;
use mandate_e2e::workload_api::{TestCa, WorkloadApi};
use mandate_e2e::{Cluster, TestNamespace, http_get, secs};
use serde_json::json;

mod support;
use support::{port, sibling};

const TD: &str = "example.org";
const OPERATOR_ID: &str = "spiffe://example.org/mandate/operator";

async fn until(what: &str, timeout: Duration, mut probe: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if probe().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Sidecar {
    _child: tokio::process::Child,
    admin: u16,
    err: PathBuf,
    _api: WorkloadApi,
}

impl Sidecar {
    /// A sidecar in SPIRE mode for `pod` of identity `identity`, its SVID
    /// (for `spiffe_id`, by `ca`) served by a Workload API of its own.
    async fn start(
        dir: &Path,
        pod: &str,
        identity: &str,
        spiffe_id: &str,
        ca: &TestCa,
        also_trusted: Option<&TestCa>,
        policy_port: u16,
    ) -> Result<Self> {
        let api = WorkloadApi::start(dir, &format!("{pod}.sock")).await?;
        let mut resp = ca.response(&[&ca.mint(spiffe_id, Duration::from_secs(3600))?]);
        if let Some(other) = also_trusted {
            resp.svids[0].bundle.extend(other.bundle_der());
        }
        api.set(resp);
        let admin = port();
        let err = dir.join(format!("{pod}.err"));
        let child = tokio::process::Command::new(sibling("mandate-sidecar")?)
            .args(["--listen", &format!("127.0.0.1:{}", port())])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--identity-source", "spire", "--trust-domain", TD])
            .args(["--policy-server", &format!("https://127.0.0.1:{policy_port}")])
            .args([
                "--agent-pod",
                pod,
                "--agent-identity",
                identity,
                "--agent-spiffe-id",
                spiffe_id,
            ])
            .env("SPIFFE_ENDPOINT_SOCKET", api.endpoint())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&err)?))
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self {
            _child: child,
            admin,
            err,
            _api: api,
        })
    }

    /// `name=version` of each policy in force (from its metrics).
    async fn in_force(&self) -> Vec<String> {
        let Ok((_, m)) = http_get(&format!("http://127.0.0.1:{}/metrics", self.admin)).await else {
            return vec![];
        };
        m.lines()
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
            .collect()
    }

    async fn ready(&self) -> bool {
        matches!(
            http_get(&format!("http://127.0.0.1:{}/readyz", self.admin)).await,
            Ok((200, _))
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn spire_mode_policy_stream_with_svids_from_the_workload_api() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("spire-op").await?;
    let agents = cluster.namespace("spire-agents").await?;
    // Short: unix socket paths must fit in 108 bytes.
    let dir = std::env::temp_dir().join(format!("mandate-spire-op-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("operator.log");
    let result = run(&cluster, &op, &agents, &dir, &log).await;
    if result.is_err() {
        eprintln!("operator log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    result?;
    let _ = std::fs::remove_dir_all(&dir);
    op.delete().await?;
    agents.delete().await
}

async fn run(cluster: &Cluster, op: &TestNamespace, agents: &TestNamespace, dir: &Path, log: &Path) -> Result<()> {
    let ca = TestCa::new(TD)?;
    let operator_api = WorkloadApi::start(dir, "operator.sock").await?;
    let (admin, identity_port, policy_port) = (port(), port(), port());
    let out = std::fs::File::create(log)?;
    let _operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-operator"))
        .args(["--admin-addr", &format!("127.0.0.1:{admin}"), "--no-webhooks"])
        .args(["--watch-namespace", agents.name(), "--lease-namespace", op.name()])
        .args(["--operator-namespace", op.name(), "--trust-domain", TD])
        .args(["--identity-source", "spire"])
        .args(["--identity-addr", &format!("127.0.0.1:{identity_port}")])
        .args(["--policy-addr", &format!("127.0.0.1:{policy_port}")])
        .env("SPIFFE_ENDPOINT_SOCKET", operator_api.endpoint())
        .env("KUBECONFIG", &op.cluster().info().kubeconfig)
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .kill_on_drop(true)
        .spawn()?;
    let ready = async || {
        matches!(
            http_get(&format!("http://127.0.0.1:{admin}/readyz")).await,
            Ok((200, _))
        )
    };

    // Connected to its Workload API with no SVID issued: not ready.
    until("the operator to open its Workload API stream", secs(60), async || {
        Ok(operator_api.open_streams() > 0)
    })
    .await?;
    ensure!(!ready().await, "the operator is ready without an SVID");
    operator_api.set(ca.response(&[&ca.mint(OPERATOR_ID, Duration::from_secs(3600))?]));
    until("the operator to be ready", secs(60), async || Ok(ready().await)).await?;

    // No built-in CA: no CA Secret, no published bundle, no signing service.
    ensure!(
        op.api::<Secret>().get_opt("mandate-spiffe-ca").await?.is_none(),
        "a CA Secret in SPIRE mode"
    );
    ensure!(
        op.api::<ConfigMap>().get_opt("mandate-trust-bundle").await?.is_none(),
        "a trust bundle ConfigMap in SPIRE mode"
    );
    ensure!(
        tokio::net::TcpStream::connect(("127.0.0.1", identity_port))
            .await
            .is_err(),
        "a signing service listens in SPIRE mode"
    );

    // An identity, its pods (marked injected, as the webhook would) and a policy.
    let ns = agents.name();
    cluster
        .kubectl_with_input(
            &["apply", "-n", ns, "-f", "-"],
            &json!({"apiVersion": "mandate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": {"name": "alpha"},
                    "spec": {"selector": {"matchLabels": {"agent": "alpha"}}}})
            .to_string(),
        )
        .await?;
    let policy = json!({"apiVersion": "mandate.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "alpha-policy"},
        "spec": {"identities": ["alpha"], "modules": [{"name": "p.rego",
            "rego": "package mandate.authz\nimport rego.v1\ndefault decision := false\ndecision if input.attributes.request.http.method == \"GET\"\n"}]}});
    cluster
        .kubectl_with_input(&["apply", "-n", ns, "-f", "-"], &policy.to_string())
        .await?;
    for pod in ["alpha-0", "alpha-1", "alpha-2"] {
        agents
            .create::<Pod>(&serde_json::from_value(json!({
                "metadata": {"name": pod, "labels": {"agent": "alpha"}, "annotations": {"mandate.dev/injected": "test"}},
                "spec": {"containers": [{"name": "c", "image": "mandate.local/busybox:1", "command": ["sleep", "3600"]}]},
            }))?)
            .await?;
    }
    let policies = agents.api::<AgentPolicy>();
    let mut version = String::new();
    until("alpha-policy to be Ready", secs(30), async || {
        version = policies
            .get_status("alpha-policy")
            .await?
            .status
            .and_then(|s| s.version)
            .unwrap_or_default();
        Ok(!version.is_empty())
    })
    .await?;
    let want = vec![format!("{ns}/alpha-policy={version}")];
    let alpha_id = mandate_core::spiffe_id::spiffe_id(None, TD, ns, "alpha")?;

    // A sidecar with alpha's SVID from SPIRE: it verifies the operator with
    // the Workload API's bundle, is verified by the operator with its own,
    // and receives alpha's set.
    let first = Sidecar::start(dir, "alpha-0", "alpha", &alpha_id, &ca, None, policy_port).await?;
    until("alpha-0's set", secs(30), async || {
        Ok(first.in_force().await == want && first.ready().await)
    })
    .await
    .with_context(|| first.log())?;

    // The operator's SVID rotates; a sidecar subscribing afterwards gets its set.
    let rotated = ca.mint(OPERATOR_ID, Duration::from_secs(1800))?;
    operator_api.set(ca.response(&[&rotated]));
    until("the operator to present the rotated SVID", secs(30), async || {
        Ok(std::fs::read_to_string(log)?
            .lines()
            .any(|l| l.contains("presents the rotated SVID") && l.contains(&rotated.serial)))
    })
    .await?;
    let second = Sidecar::start(dir, "alpha-1", "alpha", &alpha_id, &ca, None, policy_port).await?;
    until("alpha-1's set after the rotation", secs(30), async || {
        Ok(second.in_force().await == want && second.ready().await)
    })
    .await
    .with_context(|| second.log())?;

    // An SVID from another CA, with a bundle holding that CA (so the sidecar
    // takes it) and the real one (so it trusts the operator): the operator,
    // verifying against SPIRE's bundle, refuses it.
    let rogue = TestCa::new(TD)?;
    let stranger = Sidecar::start(dir, "alpha-2", "alpha", &alpha_id, &rogue, Some(&ca), policy_port).await?;
    until("the rogue sidecar to be refused", secs(30), async || {
        Ok(stranger
            .log()
            .lines()
            .any(|l| l.contains("no policy stream") && !l.contains("no valid SVID yet")))
    })
    .await
    .with_context(|| stranger.log())?;
    ensure!(
        !stranger.log().contains("peer SVID refused"),
        "the rogue sidecar refused the operator instead:\n{}",
        stranger.log()
    );
    ensure!(
        stranger.in_force().await.is_empty() && !stranger.ready().await,
        "a sidecar with another CA's SVID got policies:\n{}",
        stranger.log()
    );
    // And one whose bundle lacks the real CA refuses the operator.
    let lost = Sidecar::start(dir, "alpha-3", "alpha", &alpha_id, &rogue, None, policy_port).await?;
    until("the operator to be refused", secs(30), async || {
        Ok(lost.log().contains("peer SVID refused: not issued by the trust bundle"))
    })
    .await
    .with_context(|| lost.log())?;
    ensure!(lost.in_force().await.is_empty() && !lost.ready().await);
    ensure!(first.in_force().await == want, "alpha-0 lost its set:\n{}", first.log());
    Ok(())
}
