//! The Envoy bootstrap the pod webhook injects, run by a real Envoy 1.40 in
//! front of mandate-sidecar on a unix socket (as in an injected pod), with
//! the agent using Envoy as its HTTP proxy:
//! - plain HTTP through the proxy: allowed requests reach the upstream,
//!   denied ones get 403 with a decision id;
//! - CONNECT (what HTTPS_PROXY makes clients send) is decided on host and
//!   port: an allowed tunnel carries bytes, a denied one gets 403;
//! - a host the policy declares `tls: true` is reached over TLS that Envoy
//!   originates and verifies against the configured CA;
//! - an agent cannot force or forge the TLS route with the steering header;
//! - with the sidecar gone, everything is denied.
//!
//! Envoy: `$MANDATE_ENVOY`, else where `make deps` installs it.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mandate_operator::webhook::inject::{InjectConfig, Sockets, envoy_bootstrap_at};
use mandate_testsupport::{envoy, eventually, free_port, http_ok, secs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Send `request` (raw HTTP/1.1) to the proxy and read until the server closes.
async fn raw(proxy: u16, request: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy)).await?;
    s.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .with_context(|| {
            format!(
                "no complete answer within 10s to {}",
                request.lines().next().unwrap_or("")
            )
        })??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn status(resp: &str) -> u16 {
    resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Requests `/flaky` has had (it answers 503, which a retry policy replays).
static FLAKY_HITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// An upstream answering "plain <path>" (or "tls <path>" when served over TLS).
fn upstream(kind: &'static str) -> axum::Router {
    axum::Router::new()
        .route(
            "/v1/flaky",
            axum::routing::any(|| async {
                FLAKY_HITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "flaky")
            }),
        )
        .fallback(move |req: axum::extract::Request| async move {
            let steer = req
                .headers()
                .get("x-mandate-upstream-tls")
                .map(|v| v.to_str().unwrap_or("?").to_string());
            // What of the agent's own forwarding and Envoy-control headers arrived.
            let forwarded: Vec<String> = req
                .headers()
                .iter()
                .filter(|(k, _)| {
                    let k = k.as_str();
                    (k.starts_with("x-envoy-") && k != "x-envoy-expected-rq-timeout-ms")
                        || k.starts_with("x-forwarded-")
                        || k == "forwarded"
                        || k == "x-real-ip"
                })
                .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                .collect();
            format!("{kind} {} steer={steer:?} fwd={forwarded:?}", req.uri().path())
        })
}

const POLICY: &str = r#"apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: egress}
spec:
  egress:
  - {host: localhost, port: 443, tls: true, trust: trusted}
  modules:
  - name: egress.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := false
      # Plain reads of the data API on loopback, and reads of the TLS host.
      decision if {
        input.attributes.request.http.method == "GET"
        not startswith(input.attributes.request.http.path, "/admin")
      }
      # Tunnels only to the allowed port.
      decision if {
        input.attributes.request.http.method == "CONNECT"
        input.attributes.request.http.host == concat(":", ["127.0.0.1", data.tunnel_port])
      }
  data: {tunnel_port: "TUNNEL_PORT"}
"#;

#[tokio::test]
async fn the_injected_bootstrap_proxies_decides_tunnels_and_originates_tls() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("mandate-injected-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies"))?;

    // Upstreams: plain HTTP, a TCP echo for tunnels, and HTTPS for `localhost`.
    let plain = free_port();
    let plain_l = tokio::net::TcpListener::bind(("127.0.0.1", plain)).await?;
    tokio::spawn(async move { axum::serve(plain_l, upstream("plain")).await });
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let echo_port = echo.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf).await {
                    let _ = s.write_all(&buf[..n]).await;
                }
            });
        }
    });
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test upstream CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])?.signed_by(&leaf_key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    let certs = Arc::new(mandate_operator::webhook::tls::CertStore::new(
        mandate_operator::webhook::tls::Material {
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
            ca_pem: None,
        },
    )?);
    let tls_port = free_port();
    tokio::spawn(mandate_operator::webhook::serve(
        format!("127.0.0.1:{tls_port}").parse()?,
        certs,
        upstream("tls"),
        std::future::pending(),
    ));

    std::fs::write(
        dir.join("policies/egress.yaml"),
        POLICY.replace("TUNNEL_PORT", &echo_port.to_string()),
    )?;
    let admin = free_port();
    let socket = dir.join("authz.sock");
    let mut sidecar = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-sidecar"))
        .arg("--policy")
        .arg(dir.join("policies"))
        .arg("--listen-unix")
        .arg(&socket)
        .arg("--no-tcp")
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .stdout(Stdio::from(std::fs::File::create(dir.join("decisions.log"))?))
        .stderr(Stdio::from(std::fs::File::create(dir.join("sidecar.err"))?))
        .kill_on_drop(true)
        .spawn()?;
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    eventually("the sidecar to be ready", secs(30), async || http_ok(&ready).await).await?;

    let cfg = InjectConfig {
        proxy_port: free_port(),
        envoy_health_port: free_port(),
        transparent_port: free_port(),
        upstream_ca_file: dir.join("ca.pem").display().to_string(),
        ..InjectConfig::default()
    };
    let admin_socket = dir.join("envoy-admin.sock");
    let bootstrap = envoy_bootstrap_at(
        &cfg,
        &Sockets {
            authz: &socket.display().to_string(),
            admin: &admin_socket.display().to_string(),
            sds: &dir.join("sds.sock").display().to_string(),
        },
        "127.0.0.1",
    );
    let _envoy = tokio::process::Command::new(envoy())
        .args([
            "--config-yaml",
            &bootstrap,
            "--log-level",
            "warn",
            "--use-dynamic-base-id",
        ])
        .args(["--disable-hot-restart"])
        .stdout(Stdio::from(std::fs::File::create(dir.join("envoy.log"))?))
        .stderr(Stdio::from(std::fs::File::create(dir.join("envoy.err"))?))
        .kill_on_drop(true)
        .spawn()
        .context("starting Envoy (run make deps)")?;
    let health = format!("http://127.0.0.1:{}/healthz/ready", cfg.envoy_health_port);
    eventually("Envoy's readiness listener", secs(30), async || http_ok(&health).await)
        .await
        .with_context(|| std::fs::read_to_string(dir.join("envoy.err")).unwrap_or_default())?;
    // Envoy's admin (what /healthz/ready just reached) is a unix socket
    // only Envoy's user may open; no loopback port serves it.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&admin_socket)?.permissions());
    ensure!(
        mode & 0o777 == 0o600,
        "Envoy's admin socket has mode {:o}",
        mode & 0o777
    );
    let p = cfg.proxy_port;

    // Plain HTTP through the proxy.
    let r = raw(
        p,
        &format!(
            "GET http://127.0.0.1:{plain}/v1/data HTTP/1.1\r\nHost: 127.0.0.1:{plain}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await?;
    ensure!(status(&r) == 200 && r.contains("plain /v1/data"), "allowed GET: {r}");
    ensure!(r.to_ascii_lowercase().contains("x-mandate-decision-id"), "{r}");
    let r = raw(
        p,
        &format!("GET http://127.0.0.1:{plain}/admin HTTP/1.1\r\nHost: 127.0.0.1:{plain}\r\nConnection: close\r\n\r\n"),
    )
    .await?;
    ensure!(status(&r) == 403 && r.contains("decision_id"), "denied GET: {r}");
    let r = raw(
        p,
        &format!(
            "DELETE http://127.0.0.1:{plain}/v1/data HTTP/1.1\r\nHost: 127.0.0.1:{plain}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await?;
    ensure!(status(&r) == 403, "denied DELETE: {r}");

    // Paths are normalized before policy sees them: a dot-segment or a
    // doubled slash cannot walk a GET past the policy's "/admin" rule, and
    // escaped slashes are refused.
    for (path, want) in [
        ("/v1/../admin", 403),
        ("//admin", 403),
        ("/v1/./..//admin/", 403),
        ("/v1%2F..%2Fadmin", 400),
        ("/v1%5Cadmin", 400),
        ("/v1/./data", 200),
    ] {
        let r = raw(
            p,
            &format!(
                "GET http://127.0.0.1:{plain}{path} HTTP/1.1\r\nHost: 127.0.0.1:{plain}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await?;
        ensure!(status(&r) == want, "GET {path}: want {want}: {r}");
    }

    // The agent cannot steer a plain host onto the TLS route: the sidecar
    // overwrites the header with its own answer (the plain upstream answers),
    // and Mandate's steering headers never reach an upstream.
    let r = raw(
        p,
        &format!(
            "GET http://127.0.0.1:{plain}/v1/x HTTP/1.1\r\nHost: 127.0.0.1:{plain}\r\nx-mandate-upstream-tls: true\r\nConnection: close\r\n\r\n"
        ),
    )
    .await?;
    ensure!(
        status(&r) == 200 && r.contains("plain /v1/x steer=None"),
        "forged steering: {r}"
    );

    // The agent's own Envoy-control and forwarding headers are dropped
    // before ext_authz: no forged client address, no retry policy that
    // replays one allowed request.
    let r = raw(
        p,
        &format!(
            "GET http://127.0.0.1:{plain}/v1/fwd HTTP/1.1\r\nHost: 127.0.0.1:{plain}\r\nx-forwarded-for: 10.9.9.9\r\nx-forwarded-host: evil.example\r\nforwarded: for=10.9.9.9\r\nx-real-ip: 10.9.9.9\r\nx-envoy-original-dst-host: 10.9.9.9:80\r\nx-envoy-upstream-rq-timeout-ms: 1\r\nx-envoy-internal: true\r\nConnection: close\r\n\r\n"
        ),
    )
    .await?;
    // What arrives is what Envoy itself writes: it treats the agent as an
    // external client (x-envoy-external-address, no x-envoy-internal).
    for forged in [
        "10.9.9.9",
        "evil.example",
        "x-envoy-original-dst-host",
        "x-envoy-internal",
        "x-real-ip",
    ] {
        ensure!(
            status(&r) == 200 && !r.contains(forged),
            "the agent's {forged} arrived: {r}"
        );
    }
    ensure!(r.contains("x-envoy-external-address=127.0.0.1"), "{r}");
    let r = raw(
        p,
        &format!(
            "GET http://127.0.0.1:{plain}/v1/flaky HTTP/1.1\r\nHost: 127.0.0.1:{plain}\r\nx-envoy-retry-on: 5xx\r\nx-envoy-max-retries: 5\r\nConnection: close\r\n\r\n"
        ),
    )
    .await?;
    ensure!(status(&r) == 503, "flaky: {r}");
    let hits = FLAKY_HITS.load(std::sync::atomic::Ordering::SeqCst);
    ensure!(
        hits == 1,
        "one allowed request reached the upstream {hits} times (the agent's retry policy was honoured)"
    );

    // TLS origination to the declared host: the agent speaks plain HTTP to
    // the proxy; Envoy verifies the upstream's certificate against the CA.
    let r = raw(
        p,
        &format!(
            "GET http://localhost:{tls_port}/secure HTTP/1.1\r\nHost: localhost:{tls_port}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await?;
    ensure!(status(&r) == 200 && r.contains("tls /secure"), "TLS origination: {r}");

    // CONNECT: decided on host and port.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p)).await?;
    s.write_all(format!("CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: 127.0.0.1:{echo_port}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .context("no answer to an allowed CONNECT")??;
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    ensure!(status(&head) == 200, "allowed CONNECT: {head}");
    s.write_all(b"ping").await?;
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
    ensure!(&buf[..n] == b"ping", "the tunnel did not carry bytes: {:?}", &buf[..n]);
    let r = raw(
        p,
        &format!("CONNECT 127.0.0.1:{plain} HTTP/1.1\r\nHost: 127.0.0.1:{plain}\r\nConnection: close\r\n\r\n"),
    )
    .await?;
    ensure!(status(&r) == 403, "denied CONNECT: {r}");

    let log = std::fs::read_to_string(dir.join("decisions.log"))?;
    ensure!(
        log.contains("\"CONNECT\""),
        "CONNECTs are not in the decision log:\n{log}"
    );

    // No sidecar: denied.
    sidecar.kill().await?;
    let r = raw(
        p,
        &format!(
            "GET http://127.0.0.1:{plain}/v1/data HTTP/1.1\r\nHost: 127.0.0.1:{plain}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await?;
    ensure!(status(&r) == 403, "with the sidecar gone: {r}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
