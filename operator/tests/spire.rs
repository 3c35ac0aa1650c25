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

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use mandate_api::crd::AgentPolicy;
use mandate_e2e::workload_api::{TestCa, WorkloadApi};
use mandate_e2e::{Cluster, TestNamespace, secs};
use mandate_testsupport::manifests::ALLOW_GET;
use mandate_testsupport::{Process, agent_identity, agent_policy, free_port, try_eventually, workspace_binary};
use serde_json::json;

mod support;
use support::operator_command;

const TD: &str = "example.org";
const OPERATOR_ID: &str = "spiffe://example.org/mandate/operator";

/// A sidecar in SPIRE mode and the Workload API it gets its SVID from.
struct Sidecar {
    sidecar: support::Sidecar,
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
        let admin = free_port();
        let err = dir.join(format!("{pod}.err"));
        let mut cmd = tokio::process::Command::new(workspace_binary("mandate-sidecar")?);
        cmd.args(["--listen", &format!("127.0.0.1:{}", free_port())])
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
            .env("SPIFFE_ENDPOINT_SOCKET", api.endpoint());
        let process = Process::spawn_split("mandate-sidecar", &mut cmd, None, &err)?;
        Ok(Self {
            sidecar: support::Sidecar { process, admin },
            _api: api,
        })
    }

    /// `name=version` of each policy in force (from its metrics).
    async fn in_force(&self) -> Vec<String> {
        self.sidecar.in_force().await
    }

    async fn ready(&self) -> bool {
        self.sidecar.ready().await
    }

    fn log(&self) -> String {
        self.sidecar.log()
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
    let (admin, identity_port, policy_port) = (free_port(), free_port(), free_port());
    let mut cmd = operator_command(cluster, admin);
    cmd.arg("--no-webhooks")
        .args(["--watch-namespace", agents.name(), "--lease-namespace", op.name()])
        .args(["--operator-namespace", op.name(), "--trust-domain", TD])
        .args(["--identity-source", "spire"])
        .args(["--identity-addr", &format!("127.0.0.1:{identity_port}")])
        .args(["--policy-addr", &format!("127.0.0.1:{policy_port}")])
        .env("SPIFFE_ENDPOINT_SOCKET", operator_api.endpoint());
    let operator = support::Operator::spawn(cmd, admin, log)?;
    let ready = async || operator.ready().await;

    // Connected to its Workload API with no SVID issued: not ready.
    try_eventually("the operator to open its Workload API stream", secs(60), async || {
        Ok(operator_api.open_streams() > 0)
    })
    .await?;
    ensure!(!ready().await, "the operator is ready without an SVID");
    operator_api.set(ca.response(&[&ca.mint(OPERATOR_ID, Duration::from_secs(3600))?]));
    try_eventually("the operator to be ready", secs(60), async || Ok(ready().await)).await?;

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
    agents
        .apply(&agent_identity("alpha").match_label("agent", "alpha").manifest())
        .await?;
    let policy = agent_policy("alpha-policy")
        .identity("alpha")
        .module("p.rego", ALLOW_GET);
    agents.apply(&policy.manifest()).await?;
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
    try_eventually("alpha-policy to be Ready", secs(30), async || {
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
    try_eventually("alpha-0's set", secs(30), async || {
        Ok(first.in_force().await == want && first.ready().await)
    })
    .await
    .with_context(|| first.log())?;

    // The operator's SVID rotates; a sidecar subscribing afterwards gets its set.
    let rotated = ca.mint(OPERATOR_ID, Duration::from_secs(1800))?;
    operator_api.set(ca.response(&[&rotated]));
    try_eventually("the operator to present the rotated SVID", secs(30), async || {
        Ok(std::fs::read_to_string(log)?
            .lines()
            .any(|l| l.contains("presents the rotated SVID") && l.contains(&rotated.serial)))
    })
    .await?;
    let second = Sidecar::start(dir, "alpha-1", "alpha", &alpha_id, &ca, None, policy_port).await?;
    try_eventually("alpha-1's set after the rotation", secs(30), async || {
        Ok(second.in_force().await == want && second.ready().await)
    })
    .await
    .with_context(|| second.log())?;

    // An SVID from another CA, with a bundle holding that CA (so the sidecar
    // takes it) and the real one (so it trusts the operator): the operator,
    // verifying against SPIRE's bundle, refuses it.
    let rogue = TestCa::new(TD)?;
    let stranger = Sidecar::start(dir, "alpha-2", "alpha", &alpha_id, &rogue, Some(&ca), policy_port).await?;
    try_eventually("the rogue sidecar to be refused", secs(30), async || {
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
    try_eventually("the operator to be refused", secs(30), async || {
        Ok(lost.log().contains("peer SVID refused: not issued by the trust bundle"))
    })
    .await
    .with_context(|| lost.log())?;
    ensure!(lost.in_force().await.is_empty() && !lost.ready().await);
    ensure!(first.in_force().await == want, "alpha-0 lost its set:\n{}", first.log());
    Ok(())
}
