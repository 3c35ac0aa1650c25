//! Proves the local test node: pods from locally built images run, their logs
//! are readable with kubectl, a Service routes to them, a pod with an Envoy
//! sidecar proxies a request from another pod, pods reach the apiserver's
//! Service, and no pod has a way off this machine.
//!
//! Needs `hack/cluster.sh up --node` (root); `make test` does all of it.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Pod, Service};
use mandate_e2e::{Check, Cluster, TestNamespace, pods, secs};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

const TESTBIN: &str = "mandate.local/testbin:dev";
const ENVOY: &str = "mandate.local/envoy:1.40.0";

/// Connect (a client per test: each test has its own runtime) and load the
/// testbin image into the node once per test binary.
async fn cluster() -> Result<Cluster> {
    static LOADED: OnceCell<()> = OnceCell::const_new();
    let cluster = Cluster::connect().await?;
    cluster.require_node()?;
    LOADED
        .get_or_try_init(|| cluster.load_image(TESTBIN, Path::new(env!("CARGO_BIN_EXE_mandate-testbin"))))
        .await?;
    Ok(cluster)
}

fn pod(spec: Value) -> Result<Pod> {
    serde_json::from_value(spec).context("building a Pod")
}

/// A pod that runs `mandate-testbin ARGS...` once and ends.
fn client_pod(name: &str, args: &[&str]) -> Result<Pod> {
    pod(json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "client", "image": TESTBIN, "imagePullPolicy": "Never",
                "command": ["/usr/local/bin/mandate-testbin"], "args": args,
            }],
        },
    }))
}

/// Run a client pod to its end; its logs, and whether it succeeded.
async fn run_client(ns: &TestNamespace, name: &str, args: &[&str]) -> Result<(String, bool)> {
    ns.create(&client_pod(name, args)?).await?;
    let pod = ns.wait_pod_finished(name, secs(60)).await?;
    let logs = ns.logs(name, "client").await?;
    Ok((logs, pods::succeeded(&pod)))
}

/// What `mandate-testbin get` printed.
struct Answer {
    status: u16,
    /// Response headers, names lower-cased.
    headers: Vec<(String, String)>,
    /// The JSON body (the echo server's description of the request it saw).
    body: Value,
}

fn parse_get(out: &str) -> Result<Answer> {
    // Skip the client's "retrying: ..." lines.
    let out = &out[out.find("HTTP ").with_context(|| format!("no status line in: {out}"))?..];
    let (head, body) = out
        .split_once("\n\n")
        .with_context(|| format!("no blank line in: {out}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP "))
        .with_context(|| format!("no status line in: {out}"))?
        .trim()
        .parse()?;
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    let body = serde_json::from_str(body.trim()).with_context(|| format!("body is not JSON: {body}"))?;
    Ok(Answer { status, headers, body })
}

fn echo_pod(name: &str, listen: &str) -> Value {
    json!({
        "name": "app", "image": TESTBIN, "imagePullPolicy": "Never",
        "command": ["/usr/local/bin/mandate-testbin"],
        "args": ["serve", "--listen", listen, "--name", name],
    })
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn pod_runs_its_logs_are_readable_and_a_service_routes_to_it() -> Result<()> {
    let cluster = cluster().await?;
    cluster
        .with_namespace("smoke-svc", async |ns| {
            let mut app = echo_pod("echo", "0.0.0.0:8080");
            app["readinessProbe"] = json!({"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1});
            ns.create(&pod(json!({
                "metadata": {"name": "echo", "labels": {"app": "echo"}},
                "spec": {"containers": [app]},
            }))?)
            .await?;
            let svc: Service = serde_json::from_value(json!({
                "metadata": {"name": "echo"},
                "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]},
            }))?;
            let svc = ns.create(&svc).await?;
            let cluster_ip = svc
                .spec
                .and_then(|s| s.cluster_ip)
                .context("Service has no ClusterIP")?;

            ns.wait_pod_ready("echo", secs(90)).await?;

            // kubectl logs: apiserver -> kubelet -> containerd's log file.
            let logs = ns.cluster().kubectl(&["-n", ns.name(), "logs", "echo"]).await?;
            ensure!(logs.contains("listening on 0.0.0.0:8080"), "unexpected logs: {logs}");

            // The Service has the pod as its endpoint...
            ns.wait(
                "echo",
                "Service echo to have a ready endpoint",
                secs(30),
                |ep: Option<&Endpoints>| {
                    let ready = ep
                        .and_then(|e| e.subsets.as_ref())
                        .map(|s| s.iter().any(|s| s.addresses.as_ref().is_some_and(|a| !a.is_empty())))
                        .unwrap_or(false);
                    if ready {
                        Check::Done
                    } else {
                        Check::Pending(format!("{ep:?}"))
                    }
                },
            )
            .await?;

            // ...and another pod reaches it through the ClusterIP (kube-proxy's rules).
            // kube-proxy programs the new Service within a second or two; the
            // client retries refused connections until then (at most 30 s).
            let url = format!("http://{cluster_ip}/through-service");
            let (out, ok) = run_client(ns, "client", &["get", &url, "--retry-for", "30"]).await?;
            ensure!(ok, "client failed: {out}");
            let Answer { status, body, .. } = parse_get(&out)?;
            ensure!(status == 200, "status {status}: {out}");
            ensure!(body["server"] == "echo", "answered by {}: {out}", body["server"]);
            ensure!(body["path"] == "/through-service", "{out}");

            // The request shows in the server's log, read with kubectl again.
            let logs = ns
                .cluster()
                .kubectl(&["-n", ns.name(), "logs", "echo", "-c", "app"])
                .await?;
            ensure!(
                logs.contains("request GET /through-service"),
                "request not logged: {logs}"
            );
            Ok(())
        })
        .await
}

const ENVOY_CONFIG: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 9901}}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 0.0.0.0, port_value: 15001}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: app}
                response_headers_to_add:
                - header: {key: x-mandate-smoke, value: via-envoy}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
"#;

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn a_pod_with_an_envoy_sidecar_proxies_a_request_from_another_pod() -> Result<()> {
    let cluster = cluster().await?;
    cluster
        .with_namespace("smoke-envoy", async |ns| {
            let cm: ConfigMap = serde_json::from_value(json!({
                "metadata": {"name": "envoy"},
                "data": {"envoy.yaml": ENVOY_CONFIG},
            }))?;
            ns.create(&cm).await?;
            // The app listens on loopback only: from outside the pod, Envoy is the only way in.
            ns.create(&pod(json!({
                "metadata": {"name": "app"},
                "spec": {
                    "containers": [
                        echo_pod("app", "127.0.0.1:8080"),
                        {
                            "name": "envoy", "image": ENVOY, "imagePullPolicy": "Never",
                            "command": ["/usr/local/bin/envoy"],
                            "args": ["-c", "/etc/envoy/envoy.yaml", "--log-level", "warn",
                                     "--base-id-path", "/tmp/base-id", "--use-dynamic-base-id"],
                            "readinessProbe": {"tcpSocket": {"port": 15001}, "periodSeconds": 1},
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/envoy"}],
                        },
                    ],
                    "volumes": [{"name": "config", "configMap": {"name": "envoy"}}],
                },
            }))?)
            .await?;
            let app = ns.wait_pod_ready("app", secs(90)).await?;
            let ip = app.status.and_then(|s| s.pod_ip).context("ready pod has no IP")?;

            let url = format!("http://{ip}:15001/via-envoy");
            let (out, ok) = run_client(ns, "client", &["get", &url]).await?;
            ensure!(ok, "client failed: {out}");
            let Answer { status, headers, body } = parse_get(&out)?;
            ensure!(status == 200, "status {status}: {out}");
            ensure!(body["server"] == "app" && body["path"] == "/via-envoy", "{out}");
            // Proof the request crossed Envoy: the header its route adds on the
            // way back, and the headers its router adds on the way in.
            ensure!(
                headers.iter().any(|(k, v)| k == "x-mandate-smoke" && v == "via-envoy"),
                "no x-mandate-smoke response header: {out}"
            );
            ensure!(
                body["headers"].get("x-envoy-expected-rq-timeout-ms").is_some(),
                "the upstream saw no Envoy router headers: {out}"
            );

            // The app itself is not reachable from another pod.
            let direct = format!("{ip}:8080");
            let (out, ok) = run_client(ns, "direct", &["connect", &direct, "--timeout", "3"]).await?;
            ensure!(!ok, "the app's loopback port was reachable from another pod: {out}");
            ensure!(out.contains("refused"), "expected 'connection refused', got: {out}");
            Ok(())
        })
        .await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn pods_reach_the_apiserver_service_and_nothing_beyond_this_machine() -> Result<()> {
    let cluster = cluster().await?;
    cluster
        .with_namespace("smoke-net", async |ns| {
            // In-cluster clients (the operator, later) use the kubernetes Service.
            let (out, ok) = run_client(ns, "apiserver", &["connect", "10.0.0.1:443"]).await?;
            ensure!(ok, "a pod could not reach the apiserver at 10.0.0.1:443: {out}");

            // 203.0.113.1 is a documentation address (TEST-NET-3): pods have no
            // route to anything but the cluster's own ranges, so the connect
            // fails at once and no packet is sent.
            let (out, ok) = run_client(ns, "outside", &["connect", "203.0.113.1:80", "--timeout", "3"]).await?;
            ensure!(!ok, "a pod reached an address off this machine: {out}");
            ensure!(
                out.contains("unreachable"),
                "expected 'network unreachable', got: {out}"
            );
            Ok(())
        })
        .await
}
