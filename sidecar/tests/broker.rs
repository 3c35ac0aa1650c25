//! Brokered credentials, as a hostile agent meets them, against a real
//! Envoy 1.40 running the bootstrap the pod webhook injects (TLS
//! interception on), in front of the real `mandate-sidecar` binary. The
//! sidecar gets its policy set the way it does in a pod: pushed over the
//! policy stream (mutual TLS with its SVID, from a test SPIFFE Workload
//! API) by a policy server this test runs, whose sets carry `Credential`s
//! as the operator sends them. Upstreams are real HTTPS servers that
//! record the headers and query each request arrived with (and answer the
//! agent without echoing them). The agent is curl, using Envoy as its
//! proxy (`https://` URLs are CONNECTs, intercepted):
//! - an allowed GET arrives with `authorization: Bearer <secret>`, which the
//!   agent never had; its own `Authorization: Bearer stolen` is dropped;
//! - with `agentSupplied: Deny`, a request carrying its own value is denied;
//!   without one, the custom header arrives with the secret;
//! - a request policy denies (a POST) reaches nothing;
//! - query-parameter mode: the parameter arrives with the (escaped) secret,
//!   whatever spellings of it the agent sent;
//! - a credential the operator marks unavailable: denied with its reason;
//! - plain HTTP to a brokered destination: denied (never sent in clear);
//! - a new set with a new value is in force for the next request;
//! - `tls: true` (Envoy originates TLS) gets the credential too;
//! - neither the decision log nor the sidecar's or Envoy's diagnostics
//!   hold any secret, nor does anything the agent received.
//!
//! Everything binds to loopback. Envoy: `$MANDATE_ENVOY`, else where `make
//! deps` installs it.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mandate_e2e::workload_api::{TestCa, WorkloadApi};
use mandate_operator::webhook::inject::{InjectConfig, Sockets, envoy_bootstrap_at};
use mandate_proto::policy::v1::policies_server::{Policies, PoliciesServer};
use mandate_proto::policy::v1::{
    AckRequest, AckResponse, Credential as WireCredential, Policy as WirePolicy, PolicySet as WireSet, SubscribeRequest,
};
use mandate_testsupport::{Process, envoy, eventually, free_port, http_get, http_ok, secs};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

const TD: &str = "example.org";
const AGENT_ID: &str = "spiffe://example.org/ns/agents/agent/researcher";
const OPERATOR_ID: &str = "spiffe://example.org/mandate/operator";

/// The secrets: each must reach its upstream and nothing else.
const SECRET: &str = "brokered-secret-v1-7c1d0f";
const SECRET_V2: &str = "brokered-secret-v2-93ab4e";
const QUERY_SECRET: &str = "query secret&=/v1-2d7e";
const KEY_SECRET: &str = "x-api-key-secret-55e0aa";

/// The destinations (all `localhost`, on these ports).
#[derive(Debug, Clone, Copy)]
struct Ports {
    /// Authorization header, agentSupplied Drop.
    header: u16,
    /// Query parameter `api_key`.
    query: u16,
    /// Header `X-Api-Key`, agentSupplied Deny.
    deny: u16,
    /// The operator has no value (unavailable).
    missing: u16,
    /// Plain HTTP.
    plain: u16,
}

/// The policy: CONNECTs to localhost, GETs to brokered destinations
/// (`input.credential.brokered`), never a POST.
fn spec(p: Ports, originate_tls: bool) -> serde_json::Value {
    let yaml = format!(
        r#"
egress:
- {{host: localhost, port: {header}, tls: {originate_tls}, credential: {{secretKeyRef: {{name: api, key: token}}}}}}
- {{host: localhost, port: {query}, credential: {{secretKeyRef: {{name: api, key: q}}, queryParameter: api_key}}}}
- {{host: localhost, port: {deny}, credential: {{secretKeyRef: {{name: api, key: k}}, header: X-Api-Key, agentSupplied: Deny}}}}
- {{host: localhost, port: {missing}, credential: {{secretKeyRef: {{name: missing, key: token}}}}}}
- {{host: localhost, port: {plain}, credential: {{secretKeyRef: {{name: api, key: token}}}}}}
modules:
- name: authz.rego
  rego: |
    package mandate.authz
    import rego.v1
    default decision := false
    decision if {{
      input.attributes.request.http.method == "CONNECT"
      input.parsed_host.name == "localhost"
    }}
    decision if {{
      input.attributes.request.http.method == "GET"
      input.credential.brokered
    }}
    decision := {{"allow": false, "reason": "writes need a ticket"}} if {{
      input.attributes.request.http.method == "POST"
    }}
"#,
        header = p.header,
        query = p.query,
        deny = p.deny,
        missing = p.missing,
        plain = p.plain,
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn credential(port: u16, header: &str, query: &str, prefix: &str, value: &str) -> WireCredential {
    WireCredential {
        policy: "agents/broker".into(),
        host: "localhost".into(),
        port: u32::from(port),
        header: header.into(),
        query_parameter: query.into(),
        prefix: prefix.into(),
        value: value.as_bytes().to_vec(),
        source: format!(
            "secret agents/api key {}",
            if query.is_empty() { header } else { query }
        ),
        version: "1".into(),
        ..WireCredential::default()
    }
}

/// The set the operator would send, with `token` as the Authorization value.
fn wire_set(p: Ports, token: &str, version: &str, originate_tls: bool) -> WireSet {
    let spec = spec(p, originate_tls);
    let parsed: mandate_api::crd::AgentPolicySpec = serde_json::from_value(spec.clone()).unwrap();
    let mut header = credential(p.header, "authorization", "", "Bearer ", token);
    header.version = version.into();
    let mut deny = credential(p.deny, "x-api-key", "", "", KEY_SECRET);
    deny.deny_agent_supplied = true;
    let missing = WireCredential {
        value: vec![],
        unavailable: "Secret agents/missing not found".into(),
        source: "secret agents/missing key token".into(),
        ..credential(p.missing, "authorization", "", "Bearer ", "")
    };
    WireSet {
        set_version: format!("sha256:test-{version}-{originate_tls}"),
        policies: vec![WirePolicy {
            namespace: "agents".into(),
            name: "broker".into(),
            version: mandate_policy::version(&parsed),
            spec_json: spec.to_string(),
        }],
        withheld: vec![],
        credentials: vec![
            header,
            credential(p.query, "", "api_key", "", QUERY_SECRET),
            deny,
            missing,
            credential(p.plain, "authorization", "", "Bearer ", SECRET),
        ],
    }
}

/// The policy service, as the operator serves it: the current set at once,
/// then every set pushed; acks recorded.
#[derive(Debug, Clone, Default)]
struct PolicyServer(Arc<Mutex<ServerState>>);

#[derive(Debug, Default)]
struct ServerState {
    current: Option<WireSet>,
    streams: Vec<mpsc::Sender<Result<WireSet, Status>>>,
    acked: Vec<String>,
}

impl PolicyServer {
    fn push(&self, set: WireSet) {
        let mut s = self.0.lock().unwrap();
        s.streams.retain(|tx| tx.try_send(Ok(set.clone())).is_ok());
        s.current = Some(set);
    }

    fn acked(&self, version: &str) -> bool {
        self.0.lock().unwrap().acked.iter().any(|v| v == version)
    }
}

#[tonic::async_trait]
impl Policies for PolicyServer {
    type SubscribeStream = tokio_stream::wrappers::ReceiverStream<Result<WireSet, Status>>;

    async fn subscribe(&self, _: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let mut s = self.0.lock().unwrap();
        if let Some(set) = &s.current {
            let _ = tx.try_send(Ok(set.clone()));
        }
        s.streams.push(tx);
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn ack(&self, req: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        self.0.lock().unwrap().acked.push(req.into_inner().set_version);
        Ok(Response::new(AckResponse {}))
    }
}

/// What an upstream received: its port, "METHOD path?query", the headers.
#[derive(Debug, Clone)]
struct Seen {
    port: u16,
    line: String,
    headers: Vec<(String, String)>,
}

type SeenLog = Arc<Mutex<Vec<Seen>>>;

/// An upstream recording each request; it answers without echoing what it
/// received (the agent must never see a credential).
fn upstream_app(port: u16, seen: SeenLog) -> axum::Router {
    axum::Router::new().fallback(move |req: axum::extract::Request| {
        let seen = seen.clone();
        async move {
            let line = format!(
                "{} {}",
                req.method(),
                req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
            );
            let headers = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("?").to_string()))
                .collect();
            seen.lock().unwrap().push(Seen { port, line, headers });
            format!("upstream on {port} saw {} {}", req.method(), req.uri().path())
        }
    })
}

/// The policy server, upstreams, sidecar and Envoy; removed on drop.
struct Stack {
    dir: PathBuf,
    ports: Ports,
    proxy: u16,
    admin: u16,
    seen: SeenLog,
    policies: PolicyServer,
    _api: WorkloadApi,
    _sidecar: Process,
    _envoy: Process,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A CA and a leaf for `names`, as PEM material.
fn tls_material(names: &[&str]) -> Result<(String, mandate_identity::certs::Material)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test upstream CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?
        .signed_by(&leaf_key, &issuer)?;
    Ok((
        ca_cert.pem(),
        mandate_identity::certs::Material {
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
            ca_pem: None,
        },
    ))
}

impl Stack {
    async fn start() -> Result<Self> {
        // Short: unix socket paths must fit in 108 bytes.
        let dir = std::env::temp_dir().join(format!("mandate-broker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let ports = Ports {
            header: free_port(),
            query: free_port(),
            deny: free_port(),
            missing: free_port(),
            plain: free_port(),
        };
        let mut tasks = Vec::new();

        // HTTPS upstreams for `localhost`, with a CA only Envoy trusts; and one plain.
        let seen: SeenLog = Arc::default();
        let (upstream_ca, material) = tls_material(&["localhost"])?;
        std::fs::write(dir.join("upstream-ca.pem"), upstream_ca)?;
        let certs = Arc::new(mandate_identity::certs::CertStore::new(material)?);
        for port in [ports.header, ports.query, ports.deny, ports.missing] {
            let (app, certs) = (upstream_app(port, seen.clone()), certs.clone());
            tasks.push(tokio::spawn(async move {
                let _ = mandate_operator::webhook::serve(
                    format!("127.0.0.1:{port}").parse().unwrap(),
                    certs,
                    app,
                    std::future::pending(),
                )
                .await;
            }));
        }
        let plain = tokio::net::TcpListener::bind(("127.0.0.1", ports.plain)).await?;
        let app = upstream_app(ports.plain, seen.clone());
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(plain, app).await;
        }));

        // The trust domain: the agent's SVID from the Workload API, the
        // operator's for the policy service.
        let ca = TestCa::new(TD)?;
        let api = WorkloadApi::start(&dir, "wl.sock").await?;
        api.set(ca.response(&[&ca.mint(AGENT_ID, Duration::from_secs(3600))?]));
        let op = ca.mint(OPERATOR_ID, Duration::from_secs(3600))?;
        let bundle = vec![CertificateDer::from(ca.bundle_der())];
        let op_svid = mandate_identity::workload::WorkloadSvid {
            spiffe_id: op.spiffe_id.clone(),
            chain: vec![CertificateDer::from(op.cert_der.clone())],
            key_der: op.key_der.clone(),
            bundle: bundle.clone(),
            not_before: std::time::SystemTime::now(),
            not_after: op.not_after,
            serial: op.serial.clone(),
        };
        let op_certs = Arc::new(mandate_identity::certs::CertStore::new(op_svid.material())?);
        let verifier = mandate_identity::verify::SpiffeVerifier::new(bundle, TD, Arc::new(|_| true));
        let mtls = op_certs.server_config_mtls(verifier)?;
        let policies = PolicyServer::default();
        policies.push(wire_set(ports, SECRET, "1", false));
        let policy_port = free_port();
        let router = tonic::service::Routes::new(PoliciesServer::new(policies.clone())).into_axum_router();
        tasks.push(tokio::spawn(async move {
            let _ = mandate_operator::webhook::serve_tls(
                format!("127.0.0.1:{policy_port}").parse().unwrap(),
                mtls,
                router,
                std::future::pending(),
            )
            .await;
        }));

        // The sidecar, as injected: SVID from the Workload API, policies
        // pushed, interception on.
        let admin = free_port();
        let authz = dir.join("authz.sock");
        let sds = dir.join("sds.sock");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-sidecar"));
        cmd.args(["--identity-source", "spire", "--trust-domain", TD])
            .args(["--agent-spiffe-id", AGENT_ID, "--agent-pod", "agent-0"])
            .env("SPIFFE_ENDPOINT_SOCKET", api.endpoint())
            .args(["--policy-server", &format!("https://127.0.0.1:{policy_port}")])
            .arg("--listen-unix")
            .arg(&authz)
            .arg("--no-tcp")
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .arg("--sds-socket")
            .arg(&sds)
            .arg("--ca-bundle-dir")
            .arg(dir.join("bundle"))
            .env(
                "MANDATE_LOG",
                "debug,h2=info,hyper=info,tonic=info,tower=info,rustls=info",
            );
        let sidecar = Process::spawn_split(
            "mandate-sidecar",
            &mut cmd,
            Some(&dir.join("decisions.log")),
            &dir.join("sidecar.err"),
        )?;
        let ready = format!("http://127.0.0.1:{admin}/readyz");
        eventually("the sidecar to be ready (SVID, pushed set)", secs(60), async || {
            http_ok(&ready).await
        })
        .await
        .with_context(|| std::fs::read_to_string(dir.join("sidecar.err")).unwrap_or_default())?;

        let cfg = InjectConfig {
            proxy_port: free_port(),
            envoy_health_port: free_port(),
            transparent_port: free_port(),
            upstream_ca_file: dir.join("upstream-ca.pem").display().to_string(),
            tls_interception: true,
            ..InjectConfig::default()
        };
        let bootstrap = envoy_bootstrap_at(
            &cfg,
            &Sockets {
                authz: &authz.display().to_string(),
                admin: &dir.join("envoy-admin.sock").display().to_string(),
                sds: &sds.display().to_string(),
            },
            "127.0.0.1",
        );
        let envoy = Process::spawn_split(
            &format!("Envoy at {} (run make deps)", envoy().display()),
            tokio::process::Command::new(envoy()).args([
                "--config-yaml",
                &bootstrap,
                "--log-level",
                "warn",
                "--use-dynamic-base-id",
                "--disable-hot-restart",
            ]),
            Some(&dir.join("envoy.log")),
            &dir.join("envoy.err"),
        )?;
        let health = format!("http://127.0.0.1:{}/healthz/ready", cfg.envoy_health_port);
        eventually("Envoy's readiness listener", secs(30), async || http_ok(&health).await)
            .await
            .with_context(|| std::fs::read_to_string(dir.join("envoy.err")).unwrap_or_default())?;
        Ok(Self {
            dir,
            ports,
            proxy: cfg.proxy_port,
            admin,
            seen,
            policies,
            _api: api,
            _sidecar: sidecar,
            _envoy: envoy,
            tasks,
        })
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn decisions(&self) -> Vec<serde_json::Value> {
        self.read("decisions.log")
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The last decision record of a request (not a CONNECT) to `port` with `path`.
    fn record(&self, port: u16, path: &str) -> serde_json::Value {
        self.decisions()
            .into_iter()
            .rev()
            .find(|d| d["request"]["path"] == path && d["request"]["host"] == format!("localhost:{port}"))
            .unwrap_or_default()
    }

    fn seen_on(&self, port: u16) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.port == port)
            .cloned()
            .collect()
    }

    fn clear_seen(&self) {
        self.seen.lock().unwrap().clear();
    }

    async fn metrics(&self) -> String {
        http_get(&format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// curl as the agent, through Envoy as its proxy, trusting the pod's
    /// bundle: (exit code, everything it received, headers included, and
    /// its status).
    async fn curl(&self, url: &str, extra: &[&str]) -> Result<(i32, String, u16)> {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-i", "--max-time", "20"])
            .args(["-x", &format!("http://127.0.0.1:{}", self.proxy)])
            .arg("--cacert")
            .arg(self.dir.join("bundle/bundle.crt"))
            .args(["-w", "\n%{http_code}"])
            .args(extra)
            .arg(url)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .await
            .context("running curl")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let status = text.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
        Ok((out.status.code().unwrap_or(-1), text, status))
    }

    /// Push a set and wait until the sidecar reports it in force.
    async fn push(&self, set: WireSet) -> Result<()> {
        let version = set.set_version.clone();
        self.policies.push(set);
        eventually("the pushed set in force", secs(30), async || {
            self.policies.acked(&version)
        })
        .await
        .with_context(|| self.read("sidecar.err"))
    }
}

fn header<'a>(s: &'a Seen, name: &str) -> Vec<&'a str> {
    s.headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// As the sidecar escapes a query value.
fn escaped(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn brokered_credentials_reach_only_allowed_tls_requests_and_never_the_agent() -> Result<()> {
    let s = Stack::start().await?;
    let p = s.ports;
    let mut agent_saw = String::new();

    // Allowed, intercepted: the upstream gets the brokered Authorization;
    // the agent's own is dropped.
    let url = format!("https://localhost:{}/v1/models", p.header);
    let (rc, out, status) = s.curl(&url, &["-H", "Authorization: Bearer stolen"]).await?;
    agent_saw.push_str(&out);
    ensure!(
        rc == 0 && status == 200 && out.contains(&format!("upstream on {} saw GET /v1/models", p.header)),
        "allowed GET: rc {rc}: {out}\n{}",
        s.read("sidecar.err")
    );
    let seen = s.seen_on(p.header);
    ensure!(seen.len() == 1, "{seen:?}");
    ensure!(
        header(&seen[0], "authorization") == [format!("Bearer {SECRET}")],
        "the upstream saw {:?}",
        seen[0].headers
    );
    ensure!(
        !format!("{seen:?}").contains("stolen"),
        "the agent's own arrived: {seen:?}"
    );
    // Mandate's own steering headers stay inside the pod (the decision id
    // goes upstream, for correlation).
    let internal: Vec<_> = seen[0]
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-mandate-") && k != "x-mandate-decision-id")
        .collect();
    ensure!(
        internal.is_empty(),
        "the upstream saw Mandate's internal headers: {internal:?}"
    );
    let rec = s.record(p.header, "/v1/models");
    ensure!(rec["result"] == "allow", "{rec}");
    ensure!(
        rec["credential"]["source"] == "secret agents/api key authorization"
            && rec["credential"]["version"] == "1"
            && rec["credential"]["injected"] == true,
        "{rec}"
    );
    ensure!(
        rec["request"]["headers"]["authorization"] == "[REDACTED]",
        "the agent's header is logged redacted: {rec}"
    );

    // Denied by policy: reaches nothing, so the upstream never sees the secret.
    s.clear_seen();
    let url = format!("https://localhost:{}/v1/files", p.header);
    let (rc, out, status) = s.curl(&url, &["-X", "POST", "-d", "{}"]).await?;
    agent_saw.push_str(&out);
    ensure!(
        rc == 0 && status == 403 && out.contains("writes need a ticket"),
        "POST: rc {rc}: {out}"
    );
    ensure!(
        s.seen_on(p.header).is_empty(),
        "a denied request arrived: {:?}",
        s.seen_on(p.header)
    );
    let rec = s.record(p.header, "/v1/files");
    ensure!(
        rec["result"] == "deny" && rec["credential"]["injected"] == false,
        "{rec}"
    );

    // Query parameter: set (escaped), every spelling of the agent's own gone.
    let url = format!(
        "https://localhost:{}/v1/search?q=1&api_key=stolen&api%5Fkey=stolen2",
        p.query
    );
    let (rc, out, status) = s.curl(&url, &["-H", "Authorization: Bearer stolen"]).await?;
    agent_saw.push_str(&out);
    ensure!(
        rc == 0 && status == 200,
        "query: rc {rc}: {out}\n{}",
        s.read("sidecar.err")
    );
    let seen = s.seen_on(p.query);
    ensure!(seen.len() == 1, "{seen:?}");
    let line = &seen[0].line;
    ensure!(
        line.contains(&format!("api_key={}", escaped(QUERY_SECRET))) && line.contains("q=1"),
        "the upstream saw {line}"
    );
    ensure!(
        !line.contains("stolen") && line.matches("api").count() == 1,
        "the agent's own parameter arrived: {line}"
    );
    ensure!(
        header(&seen[0], "authorization").is_empty(),
        "the agent's Authorization arrived: {seen:?}"
    );

    // agentSupplied: Deny: its own value (or any Authorization) is a deny;
    // without one, the custom header arrives, with no prefix.
    for own in ["X-Api-Key: mine", "x_api_key: mine", "Authorization: Basic bWU6eA=="] {
        let url = format!("https://localhost:{}/v1/items", p.deny);
        let (rc, out, status) = s.curl(&url, &["-H", own]).await?;
        agent_saw.push_str(&out);
        ensure!(
            rc == 0 && status == 403 && out.contains("agentSupplied: Deny"),
            "{own}: rc {rc}: {out}"
        );
    }
    ensure!(s.seen_on(p.deny).is_empty(), "{:?}", s.seen_on(p.deny));
    let (rc, out, status) = s.curl(&format!("https://localhost:{}/v1/items", p.deny), &[]).await?;
    agent_saw.push_str(&out);
    ensure!(rc == 0 && status == 200, "deny mode, no own value: {out}");
    let seen = s.seen_on(p.deny);
    ensure!(
        seen.len() == 1 && header(&seen[0], "x-api-key") == [KEY_SECRET],
        "{seen:?}"
    );

    // Unavailable: denied with the operator's reason; nothing arrives.
    let (rc, out, status) = s
        .curl(&format!("https://localhost:{}/v1/models", p.missing), &[])
        .await?;
    agent_saw.push_str(&out);
    ensure!(
        rc == 0 && status == 403 && out.contains("Secret agents/missing not found"),
        "unavailable: rc {rc}: {out}"
    );
    ensure!(s.seen_on(p.missing).is_empty());

    // Plain HTTP to a brokered destination: denied, never sent in clear.
    let (rc, out, status) = s.curl(&format!("http://localhost:{}/v1/models", p.plain), &[]).await?;
    agent_saw.push_str(&out);
    ensure!(
        rc == 0 && status == 403 && out.contains("a brokered credential is sent only over TLS"),
        "plain HTTP: rc {rc}: {out}"
    );
    ensure!(s.seen_on(p.plain).is_empty(), "{:?}", s.seen_on(p.plain));

    // A new value, pushed: in force for the next request.
    s.clear_seen();
    s.push(wire_set(p, SECRET_V2, "2", false)).await?;
    let (rc, out, status) = s
        .curl(&format!("https://localhost:{}/v1/models", p.header), &[])
        .await?;
    agent_saw.push_str(&out);
    ensure!(rc == 0 && status == 200, "after the update: {out}");
    let seen = s.seen_on(p.header);
    ensure!(
        seen.len() == 1 && header(&seen[0], "authorization") == [format!("Bearer {SECRET_V2}")],
        "{seen:?}"
    );
    ensure!(s.record(p.header, "/v1/models")["credential"]["version"] == "2");

    // Envoy originating TLS (`tls: true`): the agent speaks plain HTTP to
    // its proxy, the upstream leg is TLS, and the credential goes there.
    s.clear_seen();
    s.push(wire_set(p, SECRET_V2, "3", true)).await?;
    let (rc, out, status) = s
        .curl(
            &format!("http://localhost:{}/v1/models", p.header),
            &["-H", "Authorization: Bearer stolen"],
        )
        .await?;
    agent_saw.push_str(&out);
    ensure!(
        rc == 0 && status == 200,
        "originated TLS: {out}\n{}",
        s.read("sidecar.err")
    );
    let seen = s.seen_on(p.header);
    ensure!(
        seen.len() == 1 && header(&seen[0], "authorization") == [format!("Bearer {SECRET_V2}")],
        "{seen:?}"
    );

    // No secret anywhere but where it was sent.
    let escaped_query = escaped(QUERY_SECRET);
    for (what, text) in [
        ("the decision log", s.read("decisions.log")),
        ("the sidecar's diagnostics", s.read("sidecar.err")),
        ("Envoy's diagnostics", s.read("envoy.err") + &s.read("envoy.log")),
        ("what the agent received", agent_saw.clone()),
    ] {
        for secret in [SECRET, SECRET_V2, QUERY_SECRET, escaped_query.as_str(), KEY_SECRET] {
            ensure!(!text.contains(secret), "{what} holds the secret {secret:?}:\n{text}");
        }
    }
    ensure!(
        s.read("sidecar.err").contains("brokered credential in force"),
        "the credentials in force are named (not their values)"
    );
    let m = s.metrics().await;
    for result in ["injected", "unavailable", "agent_supplied_denied", "not_tls"] {
        let want = format!("mandate_sidecar_credentials_injected_total{{result=\"{result}\"}}");
        ensure!(m.contains(&want), "{want} is not in the metrics:\n{m}");
    }
    Ok(())
}
