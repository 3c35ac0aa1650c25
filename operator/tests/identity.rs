//! The built-in SPIFFE CA against a real kube-apiserver (TokenRequest and
//! TokenReview are real): a sidecar process holding a pod-bound token for a
//! pod that an AgentIdentity selects obtains an X.509-SVID whose only URI SAN
//! is that identity's SPIFFE ID, and becomes ready; the operator refuses a
//! token of a pod no identity selects, a token for another audience, a forged
//! token, a token of a deleted pod, garbage CSRs and CSRs asking for another
//! SPIFFE ID, extra SANs or a CA; a client that does not trust the bundle,
//! or expects another server ID, cannot talk to the signing service; with a
//! one-minute TTL the sidecar renews at half-life and stays ready; the
//! identity's status and `mandate agents` show the pod's SVID.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::DeleteParams;
use mandate_e2e::{Cluster, TestNamespace, http_get, secs};
use mandate_identity::verify::{SpiffeVerifier, spiffe_id_of};
use mandate_proto::identity::v1::SignSvidRequest;
use mandate_proto::identity::v1::identity_client::IdentityClient;
use mandate_testsupport::manifests::DENY_ALL;
use mandate_testsupport::{
    Process, agent_identity, agent_policy, eventually, free_port, http_ok, try_eventually, wait_for, workspace_binary,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

mod support;
use support::{Shape, agent_pod, operator_command, set_enforced};

const TD: &str = "example.org";

struct Operator {
    op: support::Operator,
    port: u16,
}

impl Operator {
    async fn start(op: &TestNamespace, agents: &TestNamespace) -> Result<Self> {
        let port = free_port();
        let admin = free_port();
        let log = std::env::temp_dir().join(format!("mandate-identity-{}.log", agents.name()));
        let mut cmd = operator_command(op.cluster(), admin);
        cmd.arg("--no-webhooks")
            .args(["--watch-namespace", agents.name(), "--lease-namespace", op.name()])
            .args(["--operator-namespace", op.name(), "--trust-domain", TD])
            .args([
                "--identity-addr",
                &format!("127.0.0.1:{port}"),
                "--identity-san",
                "127.0.0.1",
                "--policy-addr",
                "127.0.0.1:0",
            ])
            .env("MANDATE_LOG", "info,mandate_operator=debug");
        let op = support::Operator::start(cmd, admin, &log, secs(60)).await?;
        Ok(Self { op, port })
    }

    fn logs(&self) -> String {
        self.op.logs()
    }
}

async fn bundle_pem(op: &TestNamespace) -> Result<String> {
    let cm = op.api::<ConfigMap>().get("mandate-trust-bundle").await?;
    cm.data
        .and_then(|d| d.get("bundle.pem").cloned())
        .context("no bundle.pem")
}

/// A TLS channel to the signing service, verifying it as `server_id` against `roots`.
async fn client(
    port: u16,
    roots: Vec<CertificateDer<'static>>,
    server_id: &str,
) -> Result<IdentityClient<tonic::transport::Channel>> {
    let verifier = SpiffeVerifier::exactly(roots, TD, server_id);
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_with_connector(tower::service_fn(move |_: hyper::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let tls = connector
                    .connect(ServerName::try_from("mandate-operator").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(IdentityClient::new(channel))
}

fn csr(sans: &[&str], ca: bool) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = sans
        .iter()
        .map(|s| {
            if s.starts_with("spiffe://") {
                rcgen::SanType::URI(s.to_string().try_into().unwrap())
            } else {
                rcgen::SanType::DnsName(s.to_string().try_into().unwrap())
            }
        })
        .collect();
    if ca {
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    }
    p.serialize_request(&key).unwrap().der().to_vec()
}

async fn pod(ns: &TestNamespace, name: &str, sa: &str, labels: serde_json::Value) -> Result<Pod> {
    shaped_pod(ns, name, sa, labels, Shape::Injected).await
}

async fn shaped_pod(ns: &TestNamespace, name: &str, sa: &str, labels: serde_json::Value, shape: Shape) -> Result<Pod> {
    let manifest = agent_pod(name, sa, labels, "mandate.local/busybox:1", None, shape);
    ns.create::<Pod>(&serde_json::from_value(manifest)?).await
}

async fn token(ns: &TestNamespace, sa: &str, pod: &Pod, audience: &str) -> Result<String> {
    ns.pod_token(sa, pod, audience, 600).await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn sidecars_get_their_agents_svid_and_nothing_else_is_signed() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("id-op").await?;
    let agents = cluster.namespace("id-agents").await?;
    let operator = Operator::start(&op, &agents).await?;
    let result = run(&cluster, &op, &agents, &operator).await;
    if result.is_err() {
        eprintln!("operator log:\n{}", operator.logs());
    }
    result?;
    drop(operator);
    op.delete().await?;
    agents.delete().await
}

async fn run(cluster: &Cluster, op: &TestNamespace, agents: &TestNamespace, operator: &Operator) -> Result<()> {
    set_enforced(cluster, agents.name(), true).await?;
    for sa in ["agent-sa", "other-sa"] {
        agents.create_service_account(sa).await?;
    }
    agents
        .apply(
            &agent_identity("researcher")
                .match_label("agent", "researcher")
                .svid_ttl("1m")
                .manifest(),
        )
        .await?;
    let agent = pod(agents, "agent-1", "agent-sa", json!({"agent": "researcher"})).await?;
    let stranger = pod(agents, "stranger", "other-sa", json!({"app": "web"})).await?;
    let want = format!("spiffe://{TD}/ns/{}/agent/researcher", agents.name());

    let bundle = bundle_pem(op).await?;
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(bundle.as_bytes()).collect::<Result<_, _>>()?;
    let server_id = format!("spiffe://{TD}/mandate/operator");
    let mut c = client(operator.port, roots.clone(), &server_id).await?;

    // The agent's pod-bound token: an SVID with exactly its SPIFFE ID.
    let good = token(agents, "agent-sa", &agent, "mandate").await?;
    let resp = c
        .sign_svid(SignSvidRequest {
            csr: csr(&[], false),
            token: good.clone(),
        })
        .await
        .context("signing the agent's SVID")?
        .into_inner();
    ensure!(resp.spiffe_id == want && resp.identity == "researcher", "{resp:?}");
    let leaf = &resp.cert_chain[0];
    ensure!(spiffe_id_of(leaf).map_err(anyhow::Error::msg)? == want);
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)?;
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    ensure!((60..=120).contains(&life), "TTL from the identity (1m): {life}s");
    ensure!(!cert.is_ca());

    // Refusals, each with a reason.
    let refused = |what: &'static str, token: String, csr_der: Vec<u8>, needle: &'static str| {
        let mut c = c.clone();
        async move {
            match c.sign_svid(SignSvidRequest { csr: csr_der, token }).await {
                Ok(r) => bail!("{what}: signed {:?}", r.into_inner().spiffe_id),
                Err(s) => {
                    ensure!(
                        s.code() == tonic::Code::PermissionDenied && s.message().contains(needle),
                        "{what}: {} {}",
                        s.code(),
                        s.message()
                    );
                    Ok(())
                }
            }
        }
    };
    // Only injected pods, holding the sidecar's token where only the
    // sidecar reads it, in enforced namespaces: a token bound to any other
    // pod of the agent's is refused whatever it is for.
    for (name, shape, needle) in [
        ("plain", Shape::Plain, "not injected"),
        ("own-token", Shape::OwnToken, "projects a ServiceAccount token"),
        ("mounts-token", Shape::MountsToken, "mounts mandate-token"),
    ] {
        let p = shaped_pod(agents, name, "agent-sa", json!({"agent": "researcher"}), shape).await?;
        refused(
            name,
            token(agents, "agent-sa", &p, "mandate").await?,
            csr(&[], false),
            needle,
        )
        .await?;
    }
    set_enforced(cluster, agents.name(), false).await?;
    refused(
        "a namespace Mandate does not enforce",
        good.clone(),
        csr(&[], false),
        "is not labelled mandate.dev/enforce=true",
    )
    .await?;
    set_enforced(cluster, agents.name(), true).await?;
    refused(
        "a pod no identity selects",
        token(agents, "other-sa", &stranger, "mandate").await?,
        csr(&[], false),
        "not an agent",
    )
    .await?;
    refused(
        "another audience",
        token(agents, "agent-sa", &agent, "https://kubernetes.default.svc").await?,
        csr(&[], false),
        "token",
    )
    .await?;
    refused("a forged token", format!("{good}x"), csr(&[], false), "not valid").await?;
    refused("no token", String::new(), csr(&[], false), "no service-account token").await?;
    refused("a garbage CSR", good.clone(), b"not a csr".to_vec(), "CSR").await?;
    refused(
        "a CSR for another SPIFFE ID",
        good.clone(),
        csr(&[&format!("spiffe://{TD}/ns/{}/agent/admin", agents.name())], false),
        "SAN",
    )
    .await?;
    refused(
        "a CSR with an extra SAN",
        good.clone(),
        csr(&[&want, "evil.example.com"], false),
        "SAN",
    )
    .await?;
    refused(
        "a CSR asking to sign certificates",
        good.clone(),
        csr(&[], true),
        "certificate signing",
    )
    .await?;

    // The signing service only talks to clients that trust the bundle, and
    // is only accepted by them as the operator.
    let other_ca = mandate_operator::spiffe::ca::Ca::generate(TD)?;
    for (what, roots, id) in [
        ("a client with another bundle", other_ca.bundle_der(), server_id.clone()),
        (
            "a client expecting another server ID",
            roots.clone(),
            format!("spiffe://{TD}/not/the/operator"),
        ),
    ] {
        // The handshake fails when the channel connects (or at the first call).
        if let Ok(mut c) = client(operator.port, roots, &id).await {
            let call = c
                .sign_svid(SignSvidRequest {
                    csr: csr(&[], false),
                    token: good.clone(),
                })
                .await;
            ensure!(call.is_err(), "{what} completed a call");
        }
    }

    // A sidecar process: no SVID, not ready; with it, ready, and deciding as
    // the agent.
    let dir = std::env::temp_dir().join(format!("mandate-svid-{}", agents.name()));
    std::fs::create_dir_all(dir.join("policies"))?;
    std::fs::write(dir.join("token"), &good)?;
    std::fs::write(dir.join("bundle.pem"), &bundle)?;
    std::fs::write(
        dir.join("policies/p.yaml"),
        "apiVersion: mandate.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: p}\nspec:\n  modules:\n  - name: p.rego\n    rego: |\n      package mandate.authz\n      import rego.v1\n      decision if input.agent.spiffe_id != \"\"\n",
    )?;
    let admin = free_port();
    let grpc = free_port();
    let mut cmd = tokio::process::Command::new(workspace_binary("mandate-sidecar")?);
    cmd.arg("--policy")
        .arg(dir.join("policies"))
        .args([
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .args([
            "--svid-server",
            &format!("https://127.0.0.1:{}", operator.port),
            "--trust-domain",
            TD,
        ])
        .arg("--svid-token-file")
        .arg(dir.join("token"))
        .arg("--trust-bundle-file")
        .arg(dir.join("bundle.pem"));
    let sidecar = Process::spawn_split("mandate-sidecar", &mut cmd, None, &dir.join("sidecar.err"))?;
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    eventually("the sidecar to be ready", secs(30), async || http_ok(&readyz).await)
        .await
        .with_context(|| format!("the sidecar never became ready:\n{}", sidecar.log()))?;
    let err = std::fs::read_to_string(dir.join("sidecar.err"))?;
    ensure!(err.contains("X.509-SVID obtained") && err.contains(&want), "{err}");
    let (_, metrics) = http_get(&format!("http://127.0.0.1:{admin}/metrics")).await?;
    ensure!(metrics.contains("mandate_sidecar_svid_valid 1"), "{metrics}");

    // With a one-minute TTL the sidecar renews at half-life and stays ready
    // throughout.
    wait_for("the sidecar to renew its SVID (a second one within 75s)", secs(75))
        .every(Duration::from_millis(250))
        .until_ok(async || {
            let (code, body) = http_get(&readyz).await?;
            ensure!(code == 200, "the sidecar stopped being ready while renewing: {body}");
            let err = std::fs::read_to_string(dir.join("sidecar.err"))?;
            Ok(err.matches("X.509-SVID obtained").count() >= 2)
        })
        .await
        .with_context(|| format!("sidecar log:\n{}", sidecar.log()))?;

    // The identity's status shows which pod obtained an SVID, and until when.
    let id: mandate_api::crd::AgentIdentity = agents
        .api::<mandate_api::crd::AgentIdentity>()
        .get_status("researcher")
        .await?;
    let svids = id.status.map(|s| s.svids).unwrap_or_default();
    ensure!(
        svids
            .iter()
            .any(|s| s.pod == "agent-1" && s.expires_at.0 > k8s_openapi::jiff::Timestamp::now()),
        "{svids:?}"
    );

    // `mandate agents`: the identity, its SPIFFE ID, its pod with its SVID,
    // and the policy bound to it.
    agents
        .apply(
            &agent_policy("for-researcher")
                .identity("researcher")
                .module("p.rego", DENY_ALL)
                .manifest(),
        )
        .await?;
    let mandate = workspace_binary("mandate")?;
    let mut last = String::new();
    wait_for("`mandate agents` to show agent-1's SVID and policy", secs(30))
        .every(Duration::from_millis(200))
        .until_ok(async || {
            let out = tokio::process::Command::new(&mandate)
                .args(["agents", "-n", agents.name()])
                .env("KUBECONFIG", &cluster.info().kubeconfig)
                .output()
                .await?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = text
                .lines()
                .find(|l| l.contains("agent-1"))
                .unwrap_or_default()
                .to_string();
            last = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
            Ok(out.status.success()
                && line.contains("researcher")
                && line.contains(&want)
                && !line.contains("no SVID")
                && line.contains("for-researcher(Enforce)"))
        })
        .await
        .with_context(|| format!("mandate agents:\n{last}"))?;

    // A token whose pod is gone: refused (the apiserver or the UID check).
    let doomed = pod(agents, "agent-2", "agent-sa", json!({"agent": "researcher"})).await?;
    let doomed_token = token(agents, "agent-sa", &doomed, "mandate").await?;
    agents
        .api::<Pod>()
        .delete("agent-2", &DeleteParams::default().grace_period(0))
        .await?;
    let pods = agents.api::<Pod>();
    try_eventually("agent-2 to be deleted", secs(30), async || {
        Ok(pods.get_opt("agent-2").await?.is_none())
    })
    .await
    .context("agent-2 is not deleted")?;
    let mut c2 = c.clone();
    let replay = c2
        .sign_svid(SignSvidRequest {
            csr: csr(&[], false),
            token: doomed_token,
        })
        .await;
    ensure!(
        replay
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::PermissionDenied),
        "a deleted pod's token: {replay:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
