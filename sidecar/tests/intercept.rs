//! TLS interception against a real Envoy 1.40: Envoy terminates the
//! agent's TLS with a leaf it fetches on demand from mandate-sidecar's SDS
//! (`on_demand_secret` certificate selector, DELTA_GRPC on a unix socket),
//! decides each decrypted request with the sidecar's ext_authz, and
//! re-originates TLS to an HTTPS upstream this test serves with its own CA.
//! With real curl (and Python's urllib):
//! - a declared host: GET /v1/models reaches the upstream, POST /v1/files
//!   gets the policy's 403 and body, both decided inside HTTPS (the decision
//!   log has method and path);
//! - the client's leaf has exactly one SAN and chains to `ca.crt`;
//! - an undeclared SNI, a Passthrough one, and no SNI fail the handshake,
//!   nothing reaches the upstream, and each refusal is logged;
//! - a leaf is renewed (pushed again) before it expires;
//! - a policy change that removes the host fails the next handshake;
//! - with a bound of one name, an evicted name is removed and comes back
//!   at its next handshake.
//!
//! Everything binds to loopback. Envoy: `$MANDATE_ENVOY`, else where `make
//! deps` installs it.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mandate_testsupport::{Process, envoy, eventually, free_port, http_get, http_ok, secs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use x509_parser::prelude::*;

/// The intercepted host, one the policy declares Passthrough, one it does not declare.
const HOST: &str = "api.intercept.test";
const PINNED: &str = "pinned.intercept.test";
const UNDECLARED: &str = "undeclared.intercept.test";
/// Intercepted too (the eviction test's second name).
const SECOND: &str = "second.intercept.test";

const POLICY: &str = r#"apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: models}
spec:
  egress:
  - {host: HOST_NAME, port: 443}
  - {host: second.intercept.test, port: 443, tlsMode: Intercept}
  - {host: pinned.intercept.test, port: 443, tlsMode: Passthrough}
  modules:
  - name: authz.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := false
      decision if {
        input.attributes.request.http.method == "GET"
        input.attributes.request.http.path == "/v1/models"
      }
      decision := {"allow": false, "http_status": 403, "reason": "uploads need a ticket",
                   "body": "uploads are not allowed"} if {
        input.attributes.request.http.method == "POST"
        input.attributes.request.http.path == "/v1/files"
      }
"#;

const ENVOY_CONFIG: &str = r#"
node: {id: intercept-test, cluster: mandate-test}   # without both, the first on-demand handshake aborts Envoy
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: ENVOY_ADMIN}}
static_resources:
  listeners:
  - name: bump
    address: {socket_address: {address: 127.0.0.1, port_value: FRONT}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}
    filter_chains:
    - filter_chain_match: {transport_protocol: tls}
      transport_socket_connect_timeout: 10s
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          disable_stateless_session_resumption: true
          disable_stateful_session_resumption: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            custom_tls_certificate_selector:
              name: envoy.tls.certificate_selectors.on_demand_secret
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.cert_selectors.on_demand_secret.v3.Config
                config_source:
                  resource_api_version: V3
                  initial_fetch_timeout: 5s
                  api_config_source:
                    api_type: DELTA_GRPC
                    transport_api_version: V3
                    grpc_services: [{envoy_grpc: {cluster_name: mandate_sds}}]
                certificate_mapper:
                  name: envoy.tls.certificate_mappers.sni
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.cert_mappers.sni.v3.SNI
                    default_value: mandate-no-sni
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bumped
          route_config:
            virtual_hosts:
            - name: bumped
              domains: ["*"]
              routes: [{match: {prefix: /}, route: {cluster: upstream_tls, timeout: 10s}}]
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              include_tls_session: true
              status_on_error: {code: 403}
              with_request_body: {max_request_bytes: 65536, allow_partial_message: true}
              grpc_service: {envoy_grpc: {cluster_name: mandate_authz}, timeout: 2s}
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: mandate_authz
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: mandate_authz
      endpoints: [{lb_endpoints: [{endpoint: {address: {pipe: {path: AUTHZ_SOCKET}}}}]}]
  - name: mandate_sds
    type: STATIC
    connect_timeout: 1s
    # One gRPC stream per subscribed name: room for more than the sidecar's bound.
    circuit_breakers: {thresholds: [{max_requests: 4096}]}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: mandate_sds
      endpoints: [{lb_endpoints: [{endpoint: {address: {pipe: {path: SDS_SOCKET}}}}]}]
  - name: upstream_tls
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: upstream_tls
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UPSTREAM}}}}]}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          validation_context: {trusted_ca: {filename: UPSTREAM_CA}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        upstream_http_protocol_options: {auto_sni: true, auto_san_validation: true}
        explicit_http_config: {http_protocol_options: {}}
"#;

/// Upstream, sidecar and Envoy on loopback; removed on drop.
struct Stack {
    dir: PathBuf,
    front: u16,
    admin: u16,
    seen: Arc<Mutex<Vec<String>>>,
    _sidecar: Process,
    _envoy: Process,
    upstream: tokio::task::JoinHandle<()>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.upstream.abort();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// An HTTPS server with its own CA, recording "METHOD path host" of each request.
fn upstream_app(seen: Arc<Mutex<Vec<String>>>) -> axum::Router {
    axum::Router::new().fallback(move |req: axum::extract::Request| {
        let seen = seen.clone();
        async move {
            let host = req
                .headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("")
                .to_string();
            seen.lock()
                .unwrap()
                .push(format!("{} {} {host}", req.method(), req.uri().path()));
            format!("upstream saw {} {}", req.method(), req.uri().path())
        }
    })
}

impl Stack {
    async fn start(name: &str, sidecar_args: &[&str]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("mandate-intercept-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies"))?;
        std::fs::write(dir.join("policies/models.yaml"), POLICY.replace("HOST_NAME", HOST))?;

        // The upstream, with a CA of its own that only Envoy trusts.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test upstream CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate()?;
        let leaf = rcgen::CertificateParams::new([HOST, SECOND, PINNED, UNDECLARED].map(String::from).to_vec())?
            .signed_by(&leaf_key, &issuer)?;
        std::fs::write(dir.join("upstream-ca.pem"), ca_cert.pem())?;
        let certs = Arc::new(mandate_operator::webhook::tls::CertStore::new(
            mandate_operator::webhook::tls::Material {
                cert_pem: leaf.pem(),
                key_pem: leaf_key.serialize_pem(),
                ca_pem: None,
            },
        )?);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let upstream_port = free_port();
        let upstream = tokio::spawn({
            let app = upstream_app(seen.clone());
            async move {
                let _ = mandate_operator::webhook::serve(
                    format!("127.0.0.1:{upstream_port}").parse().unwrap(),
                    certs,
                    app,
                    std::future::pending(),
                )
                .await;
            }
        });

        let (admin, front, envoy_admin) = (free_port(), free_port(), free_port());
        let authz = dir.join("authz.sock");
        let sds = dir.join("sds.sock");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-sidecar"));
        cmd.arg("--policy")
            .arg(dir.join("policies"))
            .arg("--listen-unix")
            .arg(&authz)
            .arg("--no-tcp")
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--reload-interval-ms", "100", "--agent-pod", "agent-0"])
            .arg("--sds-socket")
            .arg(&sds)
            .arg("--ca-bundle-dir")
            .arg(dir.join("bundle"))
            .args(sidecar_args);
        let sidecar = Process::spawn_split(
            "mandate-sidecar",
            &mut cmd,
            Some(&dir.join("decisions.log")),
            &dir.join("sidecar.err"),
        )?;
        let ready = format!("http://127.0.0.1:{admin}/readyz");
        eventually("the sidecar to be ready", secs(30), async || http_ok(&ready).await)
            .await
            .with_context(|| std::fs::read_to_string(dir.join("sidecar.err")).unwrap_or_default())?;

        let cfg = ENVOY_CONFIG
            .replace("ENVOY_ADMIN", &envoy_admin.to_string())
            .replace("FRONT", &front.to_string())
            .replace("AUTHZ_SOCKET", &authz.display().to_string())
            .replace("SDS_SOCKET", &sds.display().to_string())
            .replace("UPSTREAM_CA", &dir.join("upstream-ca.pem").display().to_string())
            .replace("UPSTREAM", &upstream_port.to_string());
        std::fs::write(dir.join("envoy.yaml"), cfg)?;
        let envoy = Process::spawn_split(
            &format!("Envoy at {} (run make deps)", envoy().display()),
            tokio::process::Command::new(envoy()).args([
                "-c",
                &dir.join("envoy.yaml").to_string_lossy(),
                "--log-level",
                "warn",
                "--use-dynamic-base-id",
            ]),
            Some(&dir.join("envoy.log")),
            &dir.join("envoy.err"),
        )?;
        let envoy_ready = format!("http://127.0.0.1:{envoy_admin}/ready");
        eventually("Envoy to be ready", secs(30), async || http_ok(&envoy_ready).await)
            .await
            .with_context(|| std::fs::read_to_string(dir.join("envoy.err")).unwrap_or_default())?;
        Ok(Self {
            dir,
            front,
            admin,
            seen,
            _sidecar: sidecar,
            _envoy: envoy,
            upstream,
        })
    }

    fn bundle(&self) -> PathBuf {
        self.dir.join("bundle/bundle.crt")
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("bundle/ca.crt")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.err")).unwrap_or_default()
    }

    fn decisions(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("decisions.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    async fn metrics(&self) -> String {
        http_get(&format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// curl `https://<name>:<front><path>` resolved to loopback, trusting
    /// only the published bundle: its exit code, and the body and status.
    async fn curl(&self, name: &str, path: &str, extra: &[&str]) -> Result<(i32, String)> {
        let url = format!("https://{name}:{}{path}", self.front);
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--max-time", "20"])
            .args(["--resolve", &format!("{name}:{}:127.0.0.1", self.front)])
            .arg("--cacert")
            .arg(self.bundle())
            .args(["-w", "\n%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()
            .await
            .context("running curl")?;
        Ok((
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    /// A TLS handshake as `name` trusting `ca.crt` alone: the leaf served.
    async fn leaf(&self, name: &str) -> Result<Vec<u8>> {
        leaf_from(self.front, name, &self.ca()).await
    }
}

async fn leaf_from(port: u16, name: &str, ca: &Path) -> Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let tls = tokio::time::timeout(
        Duration::from_secs(15),
        connector.connect(ServerName::try_from(name.to_string())?, tcp),
    )
    .await
    .context("the handshake did not finish within 15s")??;
    let (_, conn) = tls.get_ref();
    let chain = conn.peer_certificates().context("no certificate")?;
    Ok(chain.first().context("an empty chain")?.to_vec())
}

/// (serial, SANs, issuer) of a DER certificate.
fn describe(der: &[u8]) -> (String, Vec<String>, String) {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let sans = cert
        .subject_alternative_name()
        .unwrap()
        .map(|s| s.value.general_names.iter().map(|g| format!("{g:?}")).collect())
        .unwrap_or_default();
    (cert.raw_serial_as_string(), sans, cert.issuer().to_string())
}

fn status(out: &str) -> u16 {
    out.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(0)
}

/// Python's urllib (the standard library only) as the agent: GET `url`
/// with `name` resolved to loopback, trusting `bundle`.
async fn python_get(name: &str, url: &str, bundle: &Path) -> Result<(bool, String)> {
    const SCRIPT: &str = r#"
import socket, ssl, sys, urllib.request
name, url, bundle = sys.argv[1:4]
real = socket.getaddrinfo
socket.getaddrinfo = lambda host, *a, **k: real("127.0.0.1" if host == name else host, *a, **k)
ctx = ssl.create_default_context(cafile=bundle)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
try:
    with opener.open(url, timeout=20) as r:
        print(r.status, r.read().decode())
except Exception as e:
    print("ERROR", type(e).__name__, e)
    sys.exit(3)
"#;
    let out = tokio::process::Command::new("python3")
        .args(["-c", SCRIPT, name, url])
        .arg(bundle)
        .output()
        .await
        .context("running python3")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[tokio::test]
async fn envoy_intercepts_declared_hosts_with_leaves_from_the_sidecar() -> Result<()> {
    let s = Stack::start("main", &["--leaf-lifetime-seconds", "10"]).await?;

    // The published bundle: the system roots, then the pod CA; ca.crt alone.
    let ca_pem = std::fs::read_to_string(s.ca())?;
    let bundle = std::fs::read_to_string(s.bundle())?;
    ensure!(bundle.ends_with(&ca_pem) && bundle.len() > ca_pem.len(), "bundle.crt");
    ensure!(ca_pem.matches("BEGIN CERTIFICATE").count() == 1, "ca.crt: {ca_pem}");

    // Allowed, inside HTTPS: reaches the upstream.
    let (rc, out) = s.curl(HOST, "/v1/models", &[]).await?;
    ensure!(
        rc == 0 && status(&out) == 200 && out.contains("upstream saw GET /v1/models"),
        "GET /v1/models: rc {rc}: {out}\n{}",
        s.stderr()
    );
    ensure!(
        s.seen()
            .iter()
            .any(|l| l.starts_with("GET /v1/models api.intercept.test")),
        "{:?}",
        s.seen()
    );
    // Denied with the policy's response; never reaches the upstream.
    let (rc, out) = s
        .curl(
            HOST,
            "/v1/files",
            &["-X", "POST", "-H", "content-type: application/json", "-d", "{}"],
        )
        .await?;
    ensure!(
        rc == 0 && status(&out) == 403 && out.contains("uploads are not allowed"),
        "POST /v1/files: rc {rc}: {out}"
    );
    ensure!(!s.seen().iter().any(|l| l.starts_with("POST")), "{:?}", s.seen());
    // Both decided on the decrypted request: method and path in the log.
    let decisions = s.decisions();
    let find = |method: &str, path: &str, result: &str| {
        decisions.iter().any(|d| {
            d["request"]["method"] == method
                && d["request"]["path"] == path
                && d["result"] == result
                && d["request"]["host"].as_str().is_some_and(|h| h.starts_with(HOST))
        })
    };
    ensure!(
        find("GET", "/v1/models", "allow") && find("POST", "/v1/files", "deny"),
        "{decisions:#?}"
    );

    // Python's urllib trusts the bundle too.
    let (ok, out) = python_get(HOST, &format!("https://{HOST}:{}/v1/models", s.front), &s.bundle()).await?;
    ensure!(
        ok && out.starts_with("200 upstream saw GET /v1/models"),
        "python: {out}"
    );

    // The leaf: one SAN, issued by the pod CA, verified against ca.crt alone.
    let leaf = s.leaf(HOST).await?;
    let (serial, sans, issuer) = describe(&leaf);
    ensure!(sans == [format!("DNSName({HOST:?})")], "SANs: {sans:?}");
    ensure!(issuer.contains("Mandate pod CA agent-0"), "issuer {issuer}");

    // Refused: undeclared, Passthrough and no SNI fail the handshake, and
    // nothing reaches the upstream.
    let before = s.seen().len();
    for name in [UNDECLARED, PINNED] {
        let (rc, out) = s.curl(name, "/v1/models", &[]).await?;
        ensure!(rc != 0 && status(&out) == 0, "{name}: rc {rc}: {out}");
        ensure!(s.leaf(name).await.is_err(), "{name}: a rustls handshake completed");
    }
    let no_sni = format!("https://127.0.0.1:{}/v1/models", s.front);
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "20", "-k", &no_sni])
        .output()
        .await?;
    ensure!(!out.status.success(), "no SNI (even with -k): {out:?}");
    let (ok, out) = python_get(
        UNDECLARED,
        &format!("https://{UNDECLARED}:{}/v1/models", s.front),
        &s.bundle(),
    )
    .await?;
    ensure!(!ok && out.contains("ERROR"), "python to an undeclared host: {out}");
    ensure!(s.seen().len() == before, "reached the upstream: {:?}", s.seen());
    eventually("each refusal logged with its name and reason", secs(10), async || {
        let err = s.stderr();
        [
            (UNDECLARED, "undeclared"),
            (PINNED, "passthrough"),
            ("mandate-no-sni", "no_sni"),
        ]
        .iter()
        .all(|(name, reason)| {
            err.lines()
                .any(|l| l.contains("TLS interception refused") && l.contains(name) && l.contains(reason))
        })
    })
    .await
    .with_context(|| s.stderr())?;

    // Renewed at half-life (5 s) and pushed: a later handshake gets a new leaf.
    eventually("a renewed leaf", secs(30), async || {
        s.leaf(HOST).await.is_ok_and(|l| describe(&l).0 != serial)
    })
    .await?;
    let (rc, out) = s.curl(HOST, "/v1/models", &[]).await?;
    ensure!(rc == 0 && status(&out) == 200, "after renewal: rc {rc}: {out}");
    let m = s.metrics().await;
    for want in [
        "mandate_sidecar_intercept_leaves_minted_total{kind=\"new\"}",
        "mandate_sidecar_intercept_leaves_minted_total{kind=\"renewal\"}",
        "mandate_sidecar_intercept_refusals_total{reason=\"undeclared\"}",
        "mandate_sidecar_intercept_refusals_total{reason=\"passthrough\"}",
        "mandate_sidecar_intercept_refusals_total{reason=\"no_sni\"}",
        "mandate_sidecar_intercept_ca_expiry_timestamp_seconds",
    ] {
        ensure!(m.contains(want), "{want} is not in the metrics:\n{m}");
    }

    // A policy change that removes the host: the next new handshake fails.
    std::fs::write(
        s.dir.join("policies/models.yaml"),
        POLICY.replace("HOST_NAME", "elsewhere.intercept.test"),
    )?;
    eventually("a handshake to the removed host to fail", secs(30), async || {
        s.curl(HOST, "/v1/models", &[]).await.is_ok_and(|(rc, _)| rc != 0)
    })
    .await?;
    ensure!(s.leaf(HOST).await.is_err(), "rustls still completes a handshake");
    ensure!(
        s.stderr()
            .lines()
            .any(|l| l.contains("TLS interception refused") && l.contains(HOST) && l.contains("undeclared")),
        "{}",
        s.stderr()
    );
    // The other declared host is still intercepted.
    let (rc, out) = s.curl(SECOND, "/v1/models", &[]).await?;
    ensure!(rc == 0 && status(&out) == 200, "{SECOND}: rc {rc}: {out}");
    Ok(())
}

#[tokio::test]
async fn an_evicted_name_is_removed_and_issued_again_at_its_next_handshake() -> Result<()> {
    let s = Stack::start("evict", &["--max-intercepted-names", "1"]).await?;
    let a = describe(&s.leaf(HOST).await?).0;
    // The second name takes the only place: the first is evicted.
    let b = s.leaf(SECOND).await?;
    ensure!(describe(&b).1 == [format!("DNSName({SECOND:?})")]);
    eventually("the eviction to be counted", secs(10), async || {
        s.metrics()
            .await
            .contains("mandate_sidecar_intercept_leaves_evicted_total 1")
    })
    .await?;
    // The first is issued again (a new leaf), evicting the second.
    let again = describe(&s.leaf(HOST).await?).0;
    ensure!(again != a, "the evicted leaf was served again");
    let (rc, out) = s.curl(SECOND, "/v1/models", &[]).await?;
    ensure!(
        rc == 0 && status(&out) == 200,
        "{SECOND} after its eviction: rc {rc}: {out}"
    );
    let m = s.metrics().await;
    ensure!(m.contains("mandate_sidecar_intercept_leaves 1"), "{m}");
    ensure!(
        m.contains("mandate_sidecar_intercept_leaves_evicted_total 3"),
        "three evictions: {m}"
    );
    Ok(())
}

#[tokio::test]
async fn the_sidecar_does_not_start_when_it_cannot_publish_the_ca() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("mandate-intercept-nodir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies"))?;
    std::fs::write(dir.join("policies/models.yaml"), POLICY.replace("HOST_NAME", HOST))?;
    // A file where the directory should be.
    std::fs::write(dir.join("bundle"), "")?;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-sidecar"))
        .arg("--policy")
        .arg(dir.join("policies"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--sds-socket")
        .arg(dir.join("sds.sock"))
        .arg("--ca-bundle-dir")
        .arg(dir.join("bundle"))
        .output()
        .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "it started: {err}");
    ensure!(
        err.contains("--ca-bundle-dir") && err.contains(&dir.join("bundle").display().to_string()),
        "{err}"
    );
    // And --sds-socket needs --ca-bundle-dir.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-sidecar"))
        .arg("--policy")
        .arg(dir.join("policies"))
        .arg("--sds-socket")
        .arg(dir.join("sds.sock"))
        .output()
        .await?;
    ensure!(!out.status.success(), "--sds-socket alone was accepted");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
