//! SPIRE mode (`--identity-source spire`): the real `mandate-sidecar`
//! binary against a SPIFFE Workload API server the test stands up (tonic on
//! a unix socket, requiring `workload.spiffe.io: true`, SVIDs minted with
//! rcgen; SPIRE itself cannot be had here). The sidecar is not ready and
//! denies before it holds an SVID; becomes ready once the Workload API
//! pushes one; policy sees the SVID's SPIFFE ID in `input.agent` and every
//! decision record carries it with the AgentIdentity; a rotation pushed on
//! the stream is taken (the new expiry is in force); SVIDs with another
//! SPIFFE ID, or that do not chain to their bundle, are not taken; with the
//! Workload API gone the current SVID serves until it expires, then every
//! decision is a deny; and a Workload API that comes back is picked up.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use mandate_e2e::workload_api::{TestCa, WorkloadApi, fetch_raw};
use mandate_testsupport::{eventually, free_port, http_get, secs};

const TD: &str = "example.org";
const ID: &str = "spiffe://example.org/ns/agents/agent/researcher";

/// Allows only when policy sees the SVID's SPIFFE ID and the identity.
const POLICY: &str = r#"apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: who}
spec:
  modules:
  - name: authz.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := {"allow": false, "reason": "not the researcher"}
      decision := true if {
        input.agent.spiffe_id == "spiffe://example.org/ns/agents/agent/researcher"
        input.agent.identity == "researcher"
      }
"#;

fn temp_dir(name: &str) -> PathBuf {
    // Short: a unix socket path must fit in 108 bytes.
    let dir = std::env::temp_dir().join(format!("mandate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Sidecar {
    _child: tokio::process::Child,
    grpc: u16,
    admin: u16,
    dir: PathBuf,
}

impl Sidecar {
    async fn start(dir: &Path, endpoint: &str) -> Result<Self> {
        std::fs::write(dir.join("who.yaml"), POLICY)?;
        let (grpc, admin) = (free_port(), free_port());
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-sidecar"))
            .args(["--policy", dir.join("who.yaml").to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--identity-source", "spire", "--trust-domain", TD])
            .args(["--agent-spiffe-id", ID, "--agent-identity", "researcher"])
            .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
            .env("MANDATE_LOG", "info,mandate_operator=debug")
            .stdout(Stdio::from(std::fs::File::create(dir.join("decisions.log"))?))
            .stderr(Stdio::from(std::fs::File::create(dir.join("sidecar.log"))?))
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self {
            _child: child,
            grpc,
            admin,
            dir: dir.to_path_buf(),
        })
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.log")).unwrap_or_default()
    }

    fn decisions(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("decisions.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn ready(&self) -> (u16, String) {
        http_get(&format!("http://127.0.0.1:{}/readyz", self.admin))
            .await
            .unwrap_or((0, String::new()))
    }

    /// A metric's value (the first sample with that name).
    async fn metric(&self, name: &str) -> Option<f64> {
        let (_, text) = http_get(&format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .ok()?;
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// Decide one GET; (allowed, the decision record).
    async fn decide(&self) -> Result<(bool, serde_json::Value)> {
        let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{}", self.grpc)).await?;
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/tools".into(),
                        host: "api.example.com".into(),
                        ..HttpRequest::default()
                    }),
                }),
                ..AttributeContext::default()
            }),
        };
        let resp = client.check(req).await?.into_inner();
        let allowed = resp.status.map(|s| s.code) == Some(0);
        let record = self.decisions().pop().context("no decision record")?;
        Ok((allowed, record))
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as f64
}

#[tokio::test]
async fn the_test_workload_api_requires_the_spiffe_metadata() -> Result<()> {
    let dir = temp_dir("wlapi-md");
    let api = WorkloadApi::start(&dir, "agent.sock").await?;
    let ca = TestCa::new(TD)?;
    api.set(ca.response(&[&ca.mint(ID, Duration::from_secs(600))?]));

    let refused = fetch_raw(&api.socket, false).await?;
    let status = refused.expect_err("a call without workload.spiffe.io must be refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(api.refused(), 1);

    let ok = fetch_raw(&api.socket, true)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    assert_eq!(ok.svids.len(), 1);
    assert_eq!(ok.svids[0].spiffe_id, ID);
    assert_eq!(api.refused(), 1);
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn spire_mode_svid_from_the_workload_api_rotation_and_expiry() -> Result<()> {
    let dir = temp_dir("spire");
    let ca = TestCa::new(TD)?;
    let api = WorkloadApi::start(&dir, "agent.sock").await?;
    let sidecar = Sidecar::start(&dir, &api.endpoint()).await?;
    let fail = |what: &str| format!("{what}\n--- sidecar log ---\n{}", sidecar.logs());

    // Connected, no SVID issued yet: not ready, and every decision a deny.
    eventually("the sidecar to open the Workload API stream", secs(30), async || {
        api.open_streams() > 0
    })
    .await
    .with_context(|| fail("no stream"))?;
    let (code, body) = sidecar.ready().await;
    ensure!(
        code == 503 && body.contains("SVID"),
        "ready before an SVID: {code} {body}"
    );
    let (allowed, record) = sidecar.decide().await?;
    ensure!(!allowed, "allowed without an SVID: {record}");
    ensure!(
        record["reason"].as_str().unwrap_or_default().contains("no valid SVID"),
        "{record}"
    );
    assert_eq!(sidecar.metric("mandate_sidecar_svid_valid").await, Some(0.0));

    // The first SVID: ready; policy and the record see who the SVID says.
    let first = ca.mint(ID, Duration::from_secs(3600))?;
    api.set(ca.response(&[&first]));
    eventually("ready with the first SVID", secs(30), async || {
        sidecar.ready().await.0 == 200
    })
    .await
    .with_context(|| fail("never ready"))?;
    let (allowed, record) = sidecar.decide().await?;
    ensure!(allowed, "denied with the SVID: {record}");
    assert_eq!(record["agent"]["spiffe_id"], ID);
    assert_eq!(record["agent"]["identity"], "researcher");
    assert_eq!(
        sidecar.metric("mandate_sidecar_svid_expiry_timestamp_seconds").await,
        Some(unix(first.not_after))
    );
    ensure!(
        sidecar.logs().contains(&first.serial),
        "{}",
        fail("first serial not logged")
    );

    // Rotation, pushed on the open stream: the new SVID is the one in force.
    let rotated = ca.mint(ID, Duration::from_secs(1800))?;
    api.set(ca.response(&[&rotated]));
    eventually("the rotated SVID in force", secs(30), async || {
        sidecar.metric("mandate_sidecar_svid_expiry_timestamp_seconds").await == Some(unix(rotated.not_after))
    })
    .await
    .with_context(|| fail("rotation not taken"))?;
    ensure!(
        sidecar.logs().contains(&rotated.serial),
        "{}",
        fail("rotated serial not logged")
    );
    assert_eq!(sidecar.metric("mandate_sidecar_svid_updates_total").await, Some(2.0));
    let (allowed, record) = sidecar.decide().await?;
    ensure!(allowed && record["agent"]["spiffe_id"] == ID, "{record}");

    // Not taken: an SVID for another SPIFFE ID than the pod's identity, and
    // one that does not chain to the bundle sent with it.
    let other = ca.mint(
        "spiffe://example.org/ns/agents/agent/intruder",
        Duration::from_secs(3600),
    )?;
    api.set(ca.response(&[&other]));
    eventually("the other ID refused", secs(30), async || {
        sidecar
            .logs()
            .contains("but not spiffe://example.org/ns/agents/agent/researcher")
    })
    .await
    .with_context(|| fail("an SVID for another ID was not refused"))?;
    let rogue_ca = TestCa::new(TD)?;
    let rogue = rogue_ca.mint(ID, Duration::from_secs(3600))?;
    let mut forged = rogue_ca.response(&[&rogue]);
    forged.svids[0].bundle = ca.bundle_der();
    api.set(forged);
    eventually("the forged SVID refused", secs(30), async || {
        sidecar.logs().contains("does not verify against its bundle")
    })
    .await
    .with_context(|| fail("an SVID not chaining to its bundle was not refused"))?;
    assert_eq!(
        sidecar.metric("mandate_sidecar_svid_expiry_timestamp_seconds").await,
        Some(unix(rotated.not_after)),
        "the refused SVIDs replaced the rotated one"
    );
    let (allowed, record) = sidecar.decide().await?;
    ensure!(allowed && record["agent"]["spiffe_id"] == ID, "{record}");

    // A short-lived SVID, then the Workload API goes away: the SVID serves
    // until it expires, then nothing is allowed and the sidecar is not ready.
    // 20 s: enough that a busy 2-core machine decides before the expiry.
    let short = ca.mint(ID, Duration::from_secs(20))?;
    api.set(ca.response(&[&short]));
    eventually("the short SVID in force", secs(30), async || {
        sidecar.metric("mandate_sidecar_svid_expiry_timestamp_seconds").await == Some(unix(short.not_after))
    })
    .await
    .with_context(|| fail("short SVID not taken"))?;
    api.stop();
    let (allowed, record) = sidecar.decide().await?;
    ensure!(
        SystemTime::now() < short.not_after,
        "the machine is too slow for this check"
    );
    ensure!(allowed, "denied while the SVID is still valid: {record}");
    assert_eq!(sidecar.ready().await.0, 200);
    eventually("not ready after the expiry", secs(45), async || {
        sidecar.ready().await.0 == 503
    })
    .await
    .with_context(|| fail("still ready after the SVID expired"))?;
    ensure!(SystemTime::now() >= short.not_after - Duration::from_secs(1));
    let (allowed, record) = sidecar.decide().await?;
    ensure!(!allowed, "allowed after the SVID expired: {record}");
    ensure!(
        record["reason"].as_str().unwrap_or_default().contains("no valid SVID"),
        "{record}"
    );
    assert_eq!(sidecar.metric("mandate_sidecar_svid_valid").await, Some(0.0));
    assert_eq!(
        sidecar.metric("mandate_sidecar_svid_expiry_timestamp_seconds").await,
        Some(0.0)
    );

    // The Workload API comes back (same socket): the sidecar reconnects.
    drop(api);
    let api = WorkloadApi::start(&dir, "agent.sock").await?;
    let again = ca.mint(ID, Duration::from_secs(3600))?;
    api.set(ca.response(&[&again]));
    eventually("ready again", secs(60), async || sidecar.ready().await.0 == 200)
        .await
        .with_context(|| fail("did not recover"))?;
    let (allowed, record) = sidecar.decide().await?;
    ensure!(allowed && record["agent"]["spiffe_id"] == ID, "{record}");
    drop(sidecar);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
