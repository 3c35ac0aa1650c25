//! Policy distribution against a real kube-apiserver with sidecar
//! processes: sidecars authenticated by their SVIDs receive the policy set
//! bound to their identity (and only that, whatever pod they claim); the
//! policy's status counts them in force; a change reaches all of them (the
//! time is printed); a version that fails its tests, forced in past
//! admission, leaves the last good one in force and status says so; with
//! the operator killed the sidecars keep deciding with the last set, and
//! after a restart they resync; a client without an SVID is refused.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::path::Path;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use mandate_api::crd::{AgentPolicy, PolicyMode};
use mandate_e2e::{Cluster, TestNamespace, secs};
use mandate_testsupport::manifests::authz_rego;
use mandate_testsupport::{
    AgentPolicyBuilder, Process, agent_identity, agent_policy, free_port, try_eventually, workspace_binary,
};
use serde_json::json;

mod support;
use support::{Operator, Shape, Sidecar, agent_pod, operator_command, set_enforced};

const TD: &str = "example.org";

struct Ports {
    identity: u16,
    policy: u16,
}

async fn start_operator(op: &TestNamespace, agents: &TestNamespace, ports: &Ports, log: &Path) -> Result<Operator> {
    let admin = free_port();
    let mut cmd = operator_command(op.cluster(), admin);
    cmd.arg("--no-webhooks")
        .args(["--watch-namespace", agents.name(), "--lease-namespace", op.name()])
        .args([
            "--operator-namespace",
            op.name(),
            "--trust-domain",
            TD,
            "--lease-duration-seconds",
            "3",
        ])
        .args([
            "--identity-addr",
            &format!("127.0.0.1:{}", ports.identity),
            "--identity-san",
            "127.0.0.1",
        ])
        .args(["--policy-addr", &format!("127.0.0.1:{}", ports.policy)]);
    Operator::start(cmd, admin, log, secs(60)).await
}

fn policy(name: &str, identity: &str, rego_body: &str, test: Option<&str>) -> AgentPolicyBuilder {
    let p = agent_policy(name)
        .identity(identity)
        .module("p.rego", &authz_rego(rego_body));
    match test {
        Some(t) => p.test("p_test.rego", t),
        None => p,
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn sidecars_receive_their_agents_policies_and_keep_them_through_operator_loss() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("dist-op").await?;
    let agents = cluster.namespace("dist-agents").await?;
    let log = std::env::temp_dir().join(format!("mandate-dist-{}.log", agents.name()));
    let ports = Ports {
        identity: free_port(),
        policy: free_port(),
    };
    let operator = start_operator(&op, &agents, &ports, &log).await?;
    let result = run(&op, &agents, &ports, &log, operator).await;
    if result.is_err() {
        eprintln!("operator log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    result?;
    op.delete().await?;
    agents.delete().await
}

async fn run(op: &TestNamespace, agents: &TestNamespace, ports: &Ports, log: &Path, operator: Operator) -> Result<()> {
    let mut operator = Some(operator);
    agents.create_service_account("agent-sa").await?;
    set_enforced(agents.cluster(), agents.name(), true).await?;
    for id in ["alpha", "beta"] {
        agents
            .apply(&agent_identity(id).match_label("agent", id).manifest())
            .await?;
    }
    let apply = |p: AgentPolicyBuilder| async move { agents.apply(&p.manifest()).await };
    apply(policy(
        "alpha-policy",
        "alpha",
        "decision if input.attributes.request.http.method == \"GET\"",
        None,
    ))
    .await?;
    apply(policy(
        "beta-policy",
        "beta",
        "decision if input.attributes.request.http.method == \"HEAD\"",
        None,
    ))
    .await?;

    // Pods (marked injected, as the webhook would) and their tokens.
    let bundle = {
        let cm = op.api::<ConfigMap>().get("mandate-trust-bundle").await?;
        cm.data
            .and_then(|d| d.get("bundle.pem").cloned())
            .context("no bundle")?
    };
    let dir = std::env::temp_dir().join(format!("mandate-dist-{}", agents.name()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bundle.pem"), &bundle)?;
    let mut sidecars = Vec::new();
    for (pod_name, agent, claim) in [
        ("alpha-0", "alpha", "alpha-0"),
        ("alpha-1", "alpha", "alpha-1"),
        ("alpha-2", "alpha", "alpha-2"),
        ("beta-0", "beta", "beta-0"),
        // An alpha sidecar claiming beta's pod: refused.
        ("alpha-3", "alpha", "beta-0"),
    ] {
        let pod = agents
            .create::<Pod>(&serde_json::from_value(agent_pod(
                pod_name,
                "agent-sa",
                json!({"agent": agent}),
                "mandate.local/busybox:1",
                None,
                Shape::Injected,
            ))?)
            .await?;
        let token = agents.pod_token("agent-sa", &pod, "mandate", 600).await?;
        std::fs::write(dir.join(format!("{pod_name}.token")), token)?;
        let admin = free_port();
        let err = dir.join(format!("{pod_name}.err"));
        let mut cmd = tokio::process::Command::new(workspace_binary("mandate-sidecar")?);
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .args(["--svid-server", &format!("https://127.0.0.1:{}", ports.identity)])
        .args(["--policy-server", &format!("https://127.0.0.1:{}", ports.policy)])
        .args(["--trust-domain", TD, "--agent-pod", claim])
        .arg("--svid-token-file")
        .arg(dir.join(format!("{pod_name}.token")))
        .arg("--trust-bundle-file")
        .arg(dir.join("bundle.pem"));
        sidecars.push(Sidecar {
            process: Process::spawn_split("mandate-sidecar", &mut cmd, None, &err)?,
            admin,
        });
    }
    let intruder = sidecars.pop().context("no intruder")?;
    let beta = sidecars.pop().context("no beta")?;
    let ns = agents.name();
    let policies = agents.api::<AgentPolicy>();
    let version = async |name: &str| -> Result<String> {
        let p = policies.get_status(name).await?;
        p.status.and_then(|s| s.version).context("no version yet")
    };
    try_eventually("alpha-policy to be Ready", secs(30), async || {
        Ok(version("alpha-policy").await.is_ok())
    })
    .await?;
    let v1 = version("alpha-policy").await?;
    let beta_v = version("beta-policy").await?;

    // Each alpha sidecar has exactly alpha's policy; beta's has beta's.
    for s in &sidecars {
        try_eventually("an alpha sidecar's set", secs(30), async || {
            Ok(s.in_force().await == [format!("{ns}/alpha-policy={v1}")] && s.ready().await)
        })
        .await
        .with_context(|| s.log())?;
    }
    try_eventually("beta's set", secs(30), async || {
        Ok(beta.in_force().await == [format!("{ns}/beta-policy={beta_v}")])
    })
    .await
    .with_context(|| beta.log())?;
    // The intruder's claim on beta's pod is refused: it has no set, and is not ready.
    try_eventually("the intruder to be refused", secs(30), async || {
        Ok(intruder.log().contains("is not an agent of"))
    })
    .await
    .with_context(|| intruder.log())?;
    ensure!(
        intruder.in_force().await.is_empty() && !intruder.ready().await,
        "{}",
        intruder.log()
    );

    // Status: 3 of alpha's 4 pods run the version (the intruder's pod,
    // alpha-3, has a sidecar that runs nothing: it counts as stale).
    try_eventually("alpha-policy 3/4 in force", secs(30), async || {
        let p = policies.get_status("alpha-policy").await?;
        Ok(p.status.and_then(|s| s.in_force).as_deref() == Some("3/4"))
    })
    .await?;

    // Acks are the operator's record, not the sidecar's word.
    forged_acks(agents, &dir, ports, &v1).await?;

    // A change reaches every sidecar.
    let started = tokio::time::Instant::now();
    apply(policy(
        "alpha-policy",
        "alpha",
        "decision if input.attributes.request.http.method in {\"GET\", \"HEAD\"}",
        None,
    ))
    .await?;
    try_eventually("alpha-policy's new version", secs(30), async || {
        Ok(version("alpha-policy").await? != v1)
    })
    .await?;
    let v2 = version("alpha-policy").await?;
    for s in &sidecars {
        try_eventually("the new version in a sidecar", secs(30), async || {
            Ok(s.in_force().await == [format!("{ns}/alpha-policy={v2}")])
        })
        .await?;
    }
    eprintln!("apply -> enforced in 3 sidecars: {:?}", started.elapsed());

    // A version that fails its tests, forced in (no webhook here): the last
    // good one stays in force, and status says why.
    let failing = "package mandate.authz_test\nimport rego.v1\nimport data.mandate.authz\ntest_delete if authz.decision with input as {\"attributes\": {\"request\": {\"http\": {\"method\": \"DELETE\"}}}}\n";
    apply(policy(
        "alpha-policy",
        "alpha",
        "decision if input.attributes.request.http.method == \"POST\"",
        Some(failing),
    ))
    .await?;
    try_eventually("status to explain the failing version", secs(30), async || {
        let p = policies.get_status("alpha-policy").await?;
        let st = p.status.clone().unwrap_or_default();
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready").cloned();
        Ok(st.observed_generation == p.metadata.generation
            && ready.is_some_and(|c| c.status == "False" && c.message.contains("stays in force")))
    })
    .await?;
    ensure!(version("alpha-policy").await? == v2);
    for s in &sidecars {
        ensure!(
            s.in_force().await == [format!("{ns}/alpha-policy={v2}")],
            "a sidecar left the last good version"
        );
    }

    // Operator down: the sidecars keep their set and stay ready.
    if let Some(mut operator) = operator.take() {
        operator.process.kill().await?;
    }
    for s in &sidecars {
        try_eventually("the sidecar to notice the lost stream", secs(30), async || {
            Ok(s.log().contains("no policy stream") || s.log().contains("stream ended"))
        })
        .await?;
        ensure!(
            s.ready().await && s.in_force().await == [format!("{ns}/alpha-policy={v2}")],
            "{}",
            s.log()
        );
    }
    // A good change while it is down, then a restart: they resync.
    apply(policy(
        "alpha-policy",
        "alpha",
        "decision if input.attributes.request.http.method == \"OPTIONS\"",
        None,
    ))
    .await?;
    let _restarted = start_operator(op, agents, ports, log).await?;
    try_eventually("alpha-policy's version after the restart", secs(60), async || {
        Ok(version("alpha-policy").await? != v2)
    })
    .await?;
    let v3 = version("alpha-policy").await?;
    for s in &sidecars {
        try_eventually("the resync", secs(60), async || {
            Ok(s.in_force().await == [format!("{ns}/alpha-policy={v3}")])
        })
        .await
        .with_context(|| s.log())?;
    }

    // DryRun -> Enforce (here the other way) is a new version, pushed like any other.
    let dry = policy(
        "alpha-policy",
        "alpha",
        "decision if input.attributes.request.http.method == \"OPTIONS\"",
        None,
    )
    .mode(PolicyMode::DryRun);
    apply(dry).await?;
    try_eventually("the DryRun version", secs(30), async || {
        Ok(version("alpha-policy").await? != v3)
    })
    .await?;
    let v4 = version("alpha-policy").await?;
    for s in &sidecars {
        try_eventually("the DryRun version in a sidecar", secs(30), async || {
            Ok(s.in_force().await == [format!("{ns}/alpha-policy={v4}")])
        })
        .await?;
    }

    // No SVID, no stream: a TLS client without a client certificate is refused.
    let roots = rustls::pki_types::pem::PemObject::pem_slice_iter(bundle.as_bytes())
        .collect::<Result<Vec<rustls::pki_types::CertificateDer<'static>>, _>>()?;
    let verifier =
        mandate_identity::verify::SpiffeVerifier::exactly(roots, TD, &format!("spiffe://{TD}/mandate/operator"));
    let tls =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ports.policy)).await?;
    let handshake = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(rustls::pki_types::ServerName::try_from("mandate-operator")?, tcp)
        .await;
    if let Ok(mut stream) = handshake {
        // TLS 1.3 reports the refused client certificate on the first read.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(secs(5), stream.read(&mut buf)).await;
        ensure!(
            matches!(read, Ok(Err(_)) | Ok(Ok(0))),
            "a client without an SVID got an answer: {read:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A hostile agent that holds its pod's token (so an SVID of its identity)
/// tries to make status count a sidecar that runs nothing, or another pod's
/// sidecar as in force: by the annotation acks used to be, by acking on a
/// connection that never subscribed, for another pod, for a set never sent,
/// and with a lie about what is in force. Only the last kind of ack lands,
/// and what is recorded is what the operator sent, not the claim.
async fn forged_acks(agents: &TestNamespace, dir: &Path, ports: &Ports, v1: &str) -> Result<()> {
    use mandate_api::crd::AgentIdentity;
    use mandate_proto::policy::v1::policies_client::PoliciesClient;
    use mandate_proto::policy::v1::{AckRequest, SubscribeRequest};
    use mandate_sidecar::svid;

    let ns = agents.name();
    let alpha_v1 = vec![format!("{ns}/alpha-policy={v1}")];
    let pods = agents.api::<Pod>();
    let uid = async |name: &str| -> Result<String> { pods.get(name).await?.metadata.uid.context("no uid") };
    let acks = async || -> Result<Vec<mandate_api::crd::SidecarAck>> {
        let id = agents.api::<AgentIdentity>().get_status("alpha").await?;
        Ok(id.status.map(|s| s.sidecars).unwrap_or_default())
    };
    let in_force = async || -> Result<Option<String>> {
        let p = agents.api::<AgentPolicy>().get_status("alpha-policy").await?;
        Ok(p.status.and_then(|s| s.in_force))
    };

    // The real sidecars' acks: one entry per pod, from what was sent.
    let recorded = acks().await?;
    let names: Vec<&str> = recorded.iter().map(|a| a.pod.as_str()).collect();
    ensure!(
        names == ["alpha-0", "alpha-1", "alpha-2"],
        "status.sidecars: {recorded:?}"
    );
    for a in &recorded {
        ensure!(
            a.in_force == alpha_v1 && a.pod_uid == uid(&a.pod).await?,
            "ack entry {a:?}"
        );
    }
    let alpha0_set = recorded[0].set_version.clone();

    // The annotation acks used to be: it counts for nothing now.
    let annotate = json!({"metadata": {"annotations": {"mandate.dev/policies-in-force": alpha_v1[0]}}});
    pods.patch(
        "alpha-3",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&annotate),
    )
    .await?;

    // An SVID of alpha, from alpha-3's token, on a connection of its own.
    let operator_id = format!("spiffe://{TD}/mandate/operator");
    let cfg = svid::SvidConfig {
        server: format!("https://127.0.0.1:{}", ports.identity),
        token_file: dir.join("alpha-3.token"),
        bundle_file: dir.join("bundle.pem"),
        trust_domain: TD.into(),
        server_id: operator_id.clone(),
    };
    let svid = svid::fetch(&cfg).await?;
    let roots = svid::Bundle::File(dir.join("bundle.pem")).load()?;
    let channel = svid::channel(
        &format!("https://127.0.0.1:{}", ports.policy),
        roots,
        TD,
        &operator_id,
        Some(&svid),
    )
    .await?;
    let mut client = PoliciesClient::new(channel);
    let ack = |pod: &str, set: &str| AckRequest {
        pod: pod.into(),
        set_version: set.into(),
        in_force: alpha_v1.clone(),
    };
    let refused = async |client: &mut PoliciesClient<_>, req: AckRequest, needle: &str| -> Result<()> {
        let what = format!("an ack for {} of set {}", req.pod, req.set_version);
        match client.ack(req).await {
            Ok(_) => anyhow::bail!("{what} was accepted"),
            Err(s) => ensure!(
                s.message().contains(needle),
                "{what}: refused for {s:?}, not for {needle:?}"
            ),
        }
        Ok(())
    };
    // No stream on this connection: refused, even for a set alpha-0 runs.
    refused(
        &mut client,
        ack("alpha-0", &alpha0_set),
        "no policy stream for this pod",
    )
    .await?;
    refused(
        &mut client,
        ack("alpha-3", &alpha0_set),
        "no policy stream for this pod",
    )
    .await?;
    // Another identity's pod: refused before anything else.
    refused(&mut client, ack("beta-0", &alpha0_set), "is not an agent of").await?;

    // Subscribed as alpha-3, on this connection: it is sent alpha's set.
    let mut stream = client
        .subscribe(SubscribeRequest { pod: "alpha-3".into() })
        .await?
        .into_inner();
    let set = tokio::time::timeout(secs(30), stream.message())
        .await
        .context("no set within 30s")??
        .context("the stream ended")?;
    // A set never sent, and a pod this stream is not for: refused.
    refused(&mut client, ack("alpha-3", "0000"), "was never sent").await?;
    refused(
        &mut client,
        ack("alpha-0", &set.set_version),
        "no policy stream for this pod",
    )
    .await?;
    // Every refusal (and the annotation) left the count where it was.
    ensure!(
        in_force().await?.as_deref() == Some("3/4"),
        "in force after forged acks"
    );
    ensure!(
        acks().await?.len() == 3,
        "an entry from a refused ack: {:?}",
        acks().await?
    );

    // The set it was sent, acked with a lie about what is in force: the
    // record is the operator's copy of the set.
    let mut lie = ack("alpha-3", &set.set_version);
    lie.in_force = vec![format!("{ns}/beta-policy=whatever")];
    client.ack(lie).await?;
    let entry = acks()
        .await?
        .into_iter()
        .find(|a| a.pod == "alpha-3")
        .context("no entry for alpha-3")?;
    ensure!(
        entry.in_force == alpha_v1 && entry.set_version == set.set_version && entry.pod_uid == uid("alpha-3").await?,
        "alpha-3's entry: {entry:?}"
    );
    try_eventually("alpha-policy 4/4 in force", secs(30), async || {
        Ok(in_force().await?.as_deref() == Some("4/4"))
    })
    .await?;
    drop(stream);
    Ok(())
}
