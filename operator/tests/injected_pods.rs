//! The data path of an injected agent pod, on the node cluster (pods really
//! run, from images built here): the operator's webhook injects Envoy and
//! mandate-sidecar into an agent pod in an enforced namespace; the pod comes
//! up Running; the agent in it calls an upstream pod through the proxy
//! environment the webhook set: allowed requests pass, denied ones get 403
//! with a decision id that is in the sidecar's decision log, and with the
//! sidecar container killed everything is denied until kubelet restarts it.
//! The sidecar holds an X.509-SVID from the operator's CA, obtained with the
//! pod's projected token, and decides as that SPIFFE ID.
//! This runs the configuration the webhook really injected, not a copy.
//! Its policy is pushed by the operator to the sidecar over mutual TLS with
//! that SVID; the policy's status counts the sidecar as running its version
//! (`1/1`); a change is enforced without restarting anything.
//!
//! It runs twice: with native sidecars (restartable init containers, the
//! default on Kubernetes >= 1.29), where the agent's own init container already
//! calls out through the ready proxy and is decided, and with
//! `--native-sidecars never` (ordinary containers held by a postStart hook,
//! the pre-1.29 path).
//!
//! Needs `hack/cluster.sh up --node` (root); `make test` does all of it.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use mandate_e2e::{Cluster, TestNamespace, http_get, secs};
use mandate_testsupport::{agent_identity, free_port_on, wait_for, workspace_binary};
use serde_json::{Value, json};

mod support;
use support::Webhooks;

const TESTBIN: &str = "mandate.local/testbin:dev";
const SIDECAR: &str = "mandate.local/sidecar:dev";

const POLICY: &str = r#"apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: reads-only}
spec:
  identities: [researcher]
  modules:
  - name: authz.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := {"allow": false, "reason": "only reads of /allowed"}
      decision := true if {
        input.attributes.request.http.method == "GET"
        startswith(input.attributes.request.http.path, "/allowed")
        input.agent.identity == "researcher"
      }
"#;

/// Ask the agent (over its pod IP) to make a request; the outcome it saw.
async fn agent_does(agent_ip: &str, method: &str, url: &str) -> Result<Value> {
    let (code, body) = http_get(&format!("http://{agent_ip}:8080/do?method={method}&url={url}")).await?;
    ensure!(code == 200, "the agent itself answered {code}: {body}");
    Ok(serde_json::from_str(&body)?)
}

/// The status of a container of a pod, ordinary or init (native sidecars
/// are init containers).
fn status_of<'a>(pod: &'a Pod, name: &str) -> Option<&'a ContainerStatus> {
    let st = pod.status.as_ref()?;
    st.container_statuses
        .iter()
        .flatten()
        .chain(st.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
}

/// The containerd id of a container of a pod.
fn container_id(pod: &Pod, name: &str) -> Option<String> {
    status_of(pod, name)?
        .container_id
        .as_ref()
        .map(|id| id.trim_start_matches("containerd://").to_string())
}

/// When a container's current run started (running, or terminated).
fn started_at(pod: &Pod, name: &str) -> Option<Time> {
    let state = status_of(pod, name)?.state.as_ref()?;
    state
        .running
        .as_ref()
        .and_then(|r| r.started_at.clone())
        .or_else(|| state.terminated.as_ref().and_then(|t| t.started_at.clone()))
}

/// Probes here ask the apiserver or the agent pod: every 200 ms.
const EVERY: Duration = Duration::from_millis(200);

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn an_injected_agent_pod_is_decided_by_its_native_sidecars() -> Result<()> {
    injected_agent(true).await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn an_injected_agent_pod_is_decided_by_its_sidecar_before_native_sidecars() -> Result<()> {
    injected_agent(false).await
}

/// One at a time: each test runs an operator with a CA of its own, and an
/// operator publishes its trust bundle into every enforced namespace (a
/// cluster runs one operator), so two at once would overwrite each other's.
static ONE_OPERATOR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn injected_agent(native: bool) -> Result<()> {
    let _alone = ONE_OPERATOR.lock().await;
    let cluster = Cluster::connect().await?;
    cluster.require_node()?;
    cluster.install_crds().await?;
    cluster
        .load_image(TESTBIN, &workspace_binary("mandate-testbin")?)
        .await?;
    cluster
        .load_sidecar_image(SIDECAR, &workspace_binary("mandate-sidecar")?)
        .await?;
    let mode = if native { "native" } else { "never" };
    let op = cluster.namespace(&format!("inj-op-{mode}")).await?;
    let agents = cluster.namespace(&format!("inj-{mode}")).await?;
    // The sidecars reach the operator's signing service on the node's
    // address (the test cluster's own bridge).
    let node_ip = cluster
        .info()
        .apiserver
        .trim_start_matches("https://")
        .split(':')
        .next()
        .context("no apiserver host")?
        .to_string();
    let port = free_port_on(&node_ip)?;
    let policy_port = free_port_on(&node_ip)?;
    let hooks = Webhooks::start_with(
        &cluster,
        &op,
        &agents,
        vec![
            "--sidecar-image".into(),
            SIDECAR.into(),
            "--identity-addr".into(),
            format!("{node_ip}:{port}"),
            "--identity-san".into(),
            node_ip.clone(),
            "--svid-server-url".into(),
            format!("https://{node_ip}:{port}"),
            "--policy-addr".into(),
            format!("{node_ip}:{policy_port}"),
            "--policy-server-url".into(),
            format!("https://{node_ip}:{policy_port}"),
            "--native-sidecars".into(),
            // auto: the operator reads the apiserver's /version (1.29 and later: native)
            if native { "auto" } else { "never" }.into(),
        ],
    )
    .await?;
    let result = run(&cluster, &agents, native).await;
    if result.is_err() {
        eprintln!("operator log:\n{}", hooks.logs());
        eprintln!("{}", agents.dump().await);
    }
    drop(hooks);
    result?;
    op.delete().await?;
    agents.delete().await
}

async fn run(cluster: &Cluster, agents: &TestNamespace, native: bool) -> Result<()> {
    // The upstream the agent calls (not an agent: not injected).
    agents
        .create::<Pod>(&serde_json::from_value(json!({
            "metadata": {"name": "upstream", "labels": {"app": "upstream"}},
            "spec": {"containers": [{
                "name": "serve", "image": TESTBIN, "imagePullPolicy": "Never",
                "command": ["/usr/local/bin/mandate-testbin"], "args": ["serve"],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
            }]},
        }))?)
        .await?;
    let upstream = agents.wait_pod_ready("upstream", secs(90)).await?;
    ensure!(
        upstream.spec.as_ref().unwrap().containers.len() == 1,
        "the upstream was injected"
    );
    let up_ip = upstream.status.and_then(|s| s.pod_ip).context("upstream has no IP")?;

    // Its policy (pushed by the operator) and its identity.
    agents.apply(POLICY).await?;
    agents
        .apply(
            &agent_identity("researcher")
                .match_label("agent", "researcher")
                .manifest(),
        )
        .await?;

    // The agent: a pod that says nothing about Mandate. With native sidecars
    // its own init container runs behind the ready proxy and is decided: it
    // fetches an allowed URL through it (and fails the pod otherwise).
    let mut agent_pod = json!({
        "metadata": {"name": "agent", "labels": {"agent": "researcher"}},
        // An explicit UID: Mandate refuses an agent whose UID it cannot see.
        "spec": {"securityContext": {"runAsUser": 1000, "runAsNonRoot": true}, "containers": [{
            "name": "agent", "image": TESTBIN, "imagePullPolicy": "Never",
            "command": ["/usr/local/bin/mandate-testbin"], "args": ["agent"],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        }]},
    });
    if native {
        // busybox wget: an ordinary client that honours http_proxy.
        agent_pod["spec"]["initContainers"] = json!([{
            "name": "warm-up", "image": "mandate.local/busybox:1", "imagePullPolicy": "Never",
            "command": ["wget", "-S", "-O", "-", format!("http://{up_ip}:8080/allowed/warm-up")],
        }]);
    }
    let agent_pod: Pod = serde_json::from_value(agent_pod)?;
    let running = create_injected(agents, &agent_pod).await?;
    let api = agents.api::<Pod>();
    let spec = running.spec.as_ref().unwrap();
    let names = |cs: &[k8s_openapi::api::core::v1::Container]| cs.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    let (containers, init) = (
        names(&spec.containers),
        names(spec.init_containers.as_deref().unwrap_or_default()),
    );
    if native {
        ensure!(containers == ["agent"], "{containers:?}");
        ensure!(
            init == ["mandate-egress-init", "mandate-envoy", "mandate-sidecar", "warm-up"],
            "{init:?}"
        );
        // Ours are restartable init containers, started before the agent's
        // own init container, which found the proxy ready.
        for c in &spec.init_containers.as_ref().unwrap()[1..3] {
            ensure!(
                c.restart_policy.as_deref() == Some("Always"),
                "{} is not a native sidecar",
                c.name
            );
        }
        let sidecar_started = started_at(&running, "mandate-sidecar").context("the sidecar never started")?;
        let warm_up_started = started_at(&running, "warm-up").context("warm-up never started")?;
        let agent_started = started_at(&running, "agent").context("the agent never started")?;
        ensure!(
            sidecar_started.0 <= warm_up_started.0 && warm_up_started.0 <= agent_started.0,
            "start order: sidecar {sidecar_started:?}, warm-up {warm_up_started:?}, agent {agent_started:?}"
        );
        let warm_up = status_of(&running, "warm-up").context("no warm-up status")?;
        let exit = warm_up
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code);
        ensure!(exit == Some(0) && warm_up.restart_count == 0, "warm-up: {warm_up:?}");
        let log = agents.logs("agent", "mandate-sidecar").await?;
        ensure!(
            log.lines()
                .any(|l| l.contains("/allowed/warm-up") && l.contains(r#""result":"allow""#)),
            "the init container's request was not decided by the sidecar:\n{log}"
        );
    } else {
        ensure!(
            containers == ["mandate-envoy", "mandate-sidecar", "agent"],
            "{containers:?}"
        );
        // The egress rules go in before anything else runs, on this path too.
        ensure!(init == ["mandate-egress-init"], "{init:?}");
    }
    let ip = running
        .status
        .clone()
        .and_then(|s| s.pod_ip)
        .context("agent has no IP")?;

    // Allowed: reaches the upstream, with the decision id.
    let allowed = agent_does(&ip, "GET", &format!("http://{up_ip}:8080/allowed/1")).await?;
    ensure!(allowed["status"] == 200, "allowed GET: {allowed}");
    ensure!(
        allowed["body"]
            .as_str()
            .is_some_and(|b| b.contains("\"server\":\"upstream\"")),
        "{allowed}"
    );
    ensure!(allowed["headers"]["x-mandate-decision-id"].is_string(), "{allowed}");

    // Denied: 403 from the proxy, with the reason and a decision id that the
    // sidecar's log has, with the policy version.
    let denied = agent_does(&ip, "POST", &format!("http://{up_ip}:8080/allowed/1")).await?;
    ensure!(denied["status"] == 403, "denied POST: {denied}");
    let body: Value = serde_json::from_str(denied["body"].as_str().unwrap_or("{}")).unwrap_or_default();
    let id = body["decision_id"]
        .as_str()
        .context("no decision id in the denial")?
        .to_string();
    ensure!(
        body["reason"].as_str().is_some_and(|r| r.contains("only reads")),
        "{denied}"
    );
    let log = agents.logs("agent", "mandate-sidecar").await?;
    let record = log
        .lines()
        .find(|l| l.contains(&id))
        .with_context(|| format!("decision {id} is not in the sidecar's log:\n{log}"))?;
    let record: Value = serde_json::from_str(record)?;
    // The agent is who its SVID says: the identity's SPIFFE ID, from the
    // operator's CA, obtained with the pod's own token.
    let want = format!("spiffe://example.org/ns/{}/agent/researcher", agents.name());
    ensure!(
        record["result"] == "deny"
            && record["policies"][0]["version"]
                .as_str()
                .is_some_and(|v| v.starts_with("sha256:"))
            && record["agent"]["identity"] == "researcher"
            && record["agent"]["spiffe_id"] == want.as_str()
            && record["agent"]["pod"] == "agent",
        "{record}"
    );
    let other = agent_does(&ip, "GET", &format!("http://{up_ip}:8080/secret")).await?;
    ensure!(other["status"] == 403, "GET outside the allowed path: {other}");

    // The policy's status counts this sidecar as running its version.
    let policies = agents.api::<mandate_api::crd::AgentPolicy>();
    wait_for("reads-only to be 1/1 in force", secs(30))
        .every(EVERY)
        .until_some(async || {
            let p = policies.get_status("reads-only").await?;
            Ok((p.status.and_then(|s| s.in_force).as_deref() == Some("1/1")).then_some(()))
        })
        .await?;

    // A change is pushed and enforced without restarting anything.
    let applied = tokio::time::Instant::now();
    agents
        .apply(&POLICY.replace(r#"startswith(input.attributes.request.http.path, "/allowed")"#, "true"))
        .await?;
    wait_for("the changed policy to be enforced", secs(30))
        .every(EVERY)
        .until_some(async || {
            let r = agent_does(&ip, "GET", &format!("http://{up_ip}:8080/secret")).await?;
            Ok((r["status"] == 200).then_some(()))
        })
        .await?;
    eprintln!("apply -> enforced in the pod: {:?}", applied.elapsed());
    wait_for("the new version to be 1/1 in force", secs(30))
        .every(EVERY)
        .until_some(async || {
            let p = policies.get_status("reads-only").await?;
            let st = p.status.unwrap_or_default();
            let current = st.version == Some(mandate_policy::version(&p.spec));
            Ok((current && st.in_force.as_deref() == Some("1/1")).then_some(()))
        })
        .await?;

    // Kill the sidecar: everything is denied until it is back.
    let restarts = |p: &Pod| status_of(p, "mandate-sidecar").map(|c| c.restart_count).unwrap_or(0);
    let before = restarts(&running);
    let id = container_id(&running, "mandate-sidecar").context("no sidecar container id")?;
    let sock = cluster
        .info()
        .containerd_socket
        .clone()
        .context("no containerd socket")?;
    let ctr = cluster.info().ctr.clone().context("no ctr for the node")?;
    let out = tokio::process::Command::new(ctr)
        .arg("--address")
        .arg(&sock)
        .args(["--namespace", "k8s.io", "task", "kill", "--signal", "SIGKILL", &id])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "ctr task kill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // While it is down (before kubelet has it back and ready), requests are
    // denied; at least one attempt must land in that window.
    let mut denied_while_down = 0;
    wait_for("the sidecar to be restarted and ready", secs(120))
        .every(EVERY)
        .until_some(async || {
            let r = agent_does(&ip, "GET", &format!("http://{up_ip}:8080/allowed/2")).await?;
            let pod = api.get("agent").await?;
            let back =
                restarts(&pod) > before && matches!(mandate_e2e::pods::ready(Some(&pod)), mandate_e2e::Check::Done);
            match r["status"].as_u64() {
                Some(200) if back => Ok(Some(())),
                Some(403) => {
                    denied_while_down += 1;
                    Ok(None)
                }
                _ => Ok(None),
            }
        })
        .await?;
    ensure!(
        denied_while_down > 0,
        "no request was seen denied while the sidecar was down"
    );
    let after = agent_does(&ip, "GET", &format!("http://{up_ip}:8080/allowed/3")).await?;
    ensure!(after["status"] == 200, "after the restart: {after}");
    let pod = api.get("agent").await?;
    ensure!(
        restarts(&pod) > before,
        "the sidecar was not restarted: {}",
        pod.name_any()
    );
    Ok(())
}

/// The red team on the real node (issue 15): a hostile agent, UID 1000, in
/// an injected pod with native sidecars, tries each way around transparent
/// egress with `mandate-testbin probe` (run with `kubectl exec`, direct
/// connections, no proxy variable read). An upstream in another namespace
/// (not enforced) logs every arrival: HTTP, TCP echo on 9000 and 9002, UDP
/// on 9001, and DNS (the agent pod's nameserver, so the sidecar forwards
/// allowed names to it). A decoy pod is the other address of a forged Host.
#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn a_hostile_agent_on_the_node_cannot_get_around_transparent_egress() -> Result<()> {
    let _alone = ONE_OPERATOR.lock().await;
    let t0 = tokio::time::Instant::now();
    let cluster = Cluster::connect().await?;
    cluster.require_node()?;
    cluster.install_crds().await?;
    cluster
        .load_image(TESTBIN, &workspace_binary("mandate-testbin")?)
        .await?;
    cluster
        .load_sidecar_image(SIDECAR, &workspace_binary("mandate-sidecar")?)
        .await?;
    let op = cluster.namespace("rt-op").await?;
    let agents = cluster.namespace("rt").await?;
    let outside = cluster.namespace("rt-up").await?;
    let node_ip = cluster
        .info()
        .apiserver
        .trim_start_matches("https://")
        .split(':')
        .next()
        .context("no apiserver host")?
        .to_string();
    let port = free_port_on(&node_ip)?;
    let policy_port = free_port_on(&node_ip)?;
    let mut args: Vec<String> = [
        "--sidecar-image",
        SIDECAR,
        "--identity-addr",
        &format!("{node_ip}:{port}"),
        "--identity-san",
        &node_ip,
        "--svid-server-url",
        &format!("https://{node_ip}:{port}"),
        "--policy-addr",
        &format!("{node_ip}:{policy_port}"),
        "--policy-server-url",
        &format!("https://{node_ip}:{policy_port}"),
        "--native-sidecars",
        "auto",
    ]
    .map(String::from)
    .into();
    // MANDATE_TEST_TRANSPARENT_EGRESS=false: the same attempts without the
    // rules, to see the checks fail (they must).
    if std::env::var("MANDATE_TEST_TRANSPARENT_EGRESS").as_deref() == Ok("false") {
        let file = std::env::temp_dir().join(format!("mandate-rt-inject-{}.yaml", agents.name()));
        std::fs::write(&file, "transparentEgress: false\n")?;
        args.extend(["--inject-config".into(), file.to_string_lossy().into_owned()]);
    }
    let hooks = Webhooks::start_with(&cluster, &op, &agents, args).await?;
    let result = red_team(&cluster, &agents, &outside).await;
    if result.is_err() {
        eprintln!("operator log:\n{}", hooks.logs());
        eprintln!("{}", agents.dump().await);
        eprintln!("{}", outside.dump().await);
    }
    drop(hooks);
    result?;
    eprintln!("red team on the node: {:?}", t0.elapsed());
    op.delete().await?;
    outside.delete().await?;
    agents.delete().await
}

/// `mandate-testbin probe ARGS` in the agent container (as its UID): the
/// JSON line it printed and its exit code.
async fn probe(cluster: &Cluster, ns: &str, args: &[&str]) -> Result<(Value, i32)> {
    let mut all = vec![
        "-n",
        ns,
        "exec",
        "agent",
        "-c",
        "agent",
        "--",
        "/usr/local/bin/mandate-testbin",
        "probe",
        "--timeout",
        "3",
    ];
    all.extend_from_slice(args);
    let out = cluster.kubectl_output(&all, "").await?;
    let line = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("probe {args:?} printed no result: {} {}", out.stdout, out.stderr))?;
    let code = if out.success {
        0
    } else {
        out.stderr
            .split("exit code ")
            .nth(1)
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(-1)
    };
    Ok((serde_json::from_str(line)?, code))
}

async fn red_team(cluster: &Cluster, agents: &TestNamespace, outside: &TestNamespace) -> Result<()> {
    for (name, args) in [
        (
            "upstream",
            json!([
                "serve",
                "--tcp-echo",
                "9000",
                "--tcp-echo",
                "9002",
                "--udp",
                "9001",
                "--dns",
                "53"
            ]),
        ),
        ("decoy", json!(["serve"])),
    ] {
        outside
            .create::<Pod>(&serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"containers": [{
                    "name": "serve", "image": TESTBIN, "imagePullPolicy": "Never",
                    "command": ["/usr/local/bin/mandate-testbin"], "args": args,
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "DNS_ANSWER", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    ],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                }]},
            }))?)
            .await?;
    }
    let ip_of = |p: Pod| p.status.and_then(|s| s.pod_ip).context("no pod IP");
    let up = ip_of(outside.wait_pod_ready("upstream", secs(90)).await?)?;
    let decoy = ip_of(outside.wait_pod_ready("decoy", secs(90)).await?)?;

    let policy = format!(
        r#"apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: red-team}}
spec:
  identities: [red-team]
  egress:
  - {{host: allowed.example, port: 8080}}
  modules:
  - name: authz.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := {{"allow": false, "reason": "red team: not allowed"}}
      decision := true if {{
        input.attributes.request.http.method == "GET"
        input.parsed_host.name == "{up}"
        input.parsed_host.port == 8080
        startswith(input.parsed_path[0], "allowed")
      }}
      decision := true if {{
        input.attributes.request.http.method == "CONNECT"
        input.egress.path == "raw"
        input.parsed_host.name == "{up}"
        input.parsed_host.port == 9000
      }}
"#
    );
    agents.apply(&policy).await?;
    agents
        .apply(&agent_identity("red-team").match_label("agent", "red-team").manifest())
        .await?;
    let agent_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "agent", "labels": {"agent": "red-team"}},
        "spec": {
            "securityContext": {"runAsUser": 1000, "runAsNonRoot": true},
            // The upstream is the pod's nameserver: the sidecar forwards
            // the names policy allows there, and only those.
            "dnsPolicy": "None",
            "dnsConfig": {"nameservers": [up.clone()]},
            "containers": [{
                "name": "agent", "image": TESTBIN, "imagePullPolicy": "Never",
                "command": ["/usr/local/bin/mandate-testbin"], "args": ["agent"],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
            }],
        },
    }))?;
    let running = create_injected(agents, &agent_pod).await?;
    let pod_ip = ip_of(running)?;
    // The policy is in force before anything is tried.
    let policies = agents.api::<mandate_api::crd::AgentPolicy>();
    wait_for("red-team to be 1/1 in force", secs(30))
        .every(EVERY)
        .until_some(async || {
            let p = policies.get_status("red-team").await?;
            Ok((p.status.and_then(|s| s.in_force).as_deref() == Some("1/1")).then_some(()))
        })
        .await?;

    let ns = agents.name().to_string();
    let mut failures: Vec<String> = vec![];
    let mut seen: Vec<String> = vec![];
    // What the answers held, beside their outcomes.
    let mut answers: Vec<String> = vec![];
    let mut expect = async |args: &[&str], want: &[&str], code: i32| -> Result<Value> {
        let (r, c) = probe(cluster, &ns, args).await?;
        let outcome = r["outcome"].as_str().unwrap_or_default().to_string();
        seen.push(format!("{args:?} -> {outcome} (exit {c})"));
        if !want.contains(&outcome.as_str()) || c != code {
            failures.push(format!("{args:?}: wanted {want:?} (exit {code}), got {r} (exit {c})"));
        }
        Ok(r)
    };
    let (up8080, up9000, up9002, up9001) = (
        format!("{up}:8080"),
        format!("{up}:9000"),
        format!("{up}:9002"),
        format!("{up}:9001"),
    );
    // Allowed, ignoring the proxy: arrives.
    let ok = expect(&["http", &format!("http://{up8080}/allowed-rt")], &["connected"], 0).await?;
    if ok["status"] != 200 {
        answers.push(format!("the allowed request: {ok}"));
    }
    // A path no policy allows, and a forged Host sent to another address.
    expect(&["http", &format!("http://{up8080}/denied-rt")], &["denied"], 10).await?;
    expect(
        &[
            "http",
            &format!("http://{decoy}:8080/allowed-forged"),
            "--host",
            &up8080,
        ],
        &["denied"],
        10,
    )
    .await?;
    // Raw TCP: the allowed port echoes, another is closed undecided.
    expect(&["tcp", &up9000], &["connected"], 0).await?;
    expect(&["tcp", &up9002], &["closed", "refused"], 10).await?;
    // UDP anywhere: refused by the kernel.
    expect(&["udp", &up9001], &["refused"], 10).await?;
    // DNS, whatever server is asked: the allowed name is forwarded (to the
    // pod's nameserver, the upstream) and answered; others are NXDOMAIN.
    let dns = expect(&["dns", "allowed.example", &up], &["connected"], 0).await?;
    if dns["answers"] != json!([up.clone()]) {
        answers.push(format!("allowed.example: {dns}"));
    }
    expect(&["dns", "secret-udp.evil.example", &up], &["nxdomain"], 10).await?;
    expect(&["dns", "secret-tcp.evil.example", &up, "--tcp"], &["nxdomain"], 10).await?;
    // A server that is not one: the query is still answered, by the sidecar.
    expect(&["dns", "secret-other.evil.example", &decoy], &["nxdomain"], 10).await?;
    let txt = expect(&["dns", "allowed.example", &up, "--type", "TXT"], &["connected"], 0).await?;
    if txt["answers"] != json!([]) {
        answers.push(format!("TXT of an allowed name: {txt}"));
    }
    // Mandate's ports: Envoy's admin (a Unix socket here, so nothing would
    // listen on 15000 anyway), the sidecar's admin and Envoy's readiness.
    for target in [
        "127.0.0.1:15000".to_string(),
        "127.0.0.1:15020".into(),
        "127.0.0.1:15021".into(),
        format!("{pod_ip}:15020"),
        format!("{pod_ip}:15021"),
    ] {
        expect(&["tcp", &target], &["refused"], 10).await?;
    }
    failures.extend(answers);
    eprintln!("probes:\n  {}", seen.join("\n  "));

    // What arrived: the allowed, and nothing denied.
    let up_log = outside.logs("upstream", "serve").await?;
    let decoy_log = outside.logs("decoy", "serve").await?;
    for want in ["GET /allowed-rt", "tcp 9000 from", "dns allowed.example. A"] {
        if !up_log.contains(want) {
            failures.push(format!("'{want}' never reached the upstream"));
        }
    }
    for never in ["denied-rt", "allowed-forged", "tcp 9002", "udp 9001", "evil", "TXT"] {
        if up_log.contains(never) || decoy_log.contains(never) {
            failures.push(format!("'{never}' reached the outside"));
        }
    }
    // Each denial with its reason in the sidecar's log.
    let log = agents.logs("agent", "mandate-sidecar").await?;
    let denied = |needle: &str, reason: &str| {
        log.lines()
            .any(|l| l.contains(needle) && l.contains(r#""result":"deny""#) && l.contains(reason))
    };
    for (needle, reason) in [
        ("/denied-rt", "red team: not allowed"),
        ("allowed-forged", "original destination and Host disagree"),
        (up9002.as_str(), "red team: not allowed"),
    ] {
        if !denied(needle, reason) {
            failures.push(format!("no deny for {needle} ({reason}) in the decision log"));
        }
    }
    for name in [
        "secret-udp.evil.example",
        "secret-tcp.evil.example",
        "secret-other.evil.example",
    ] {
        if !log.lines().any(|l| l.contains("DNS query refused") && l.contains(name)) {
            failures.push(format!("no refusal of {name} in the sidecar's log"));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} checks failed:\n{}\nupstream:\n{up_log}\ndecoy:\n{decoy_log}\nsidecar:\n{log}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// Create the pod `agent` and wait until it runs injected. The webhook sees
/// a just-created identity within a moment; until then the pod is not (yet)
/// an agent and goes in uninjected: it is then deleted and created again.
async fn create_injected(agents: &TestNamespace, agent_pod: &Pod) -> Result<Pod> {
    let api = agents.api::<Pod>();
    wait_for("the agent pod to be created injected", secs(20))
        .every(EVERY)
        .until_some(async || {
            let created = api.create(&Default::default(), agent_pod).await?;
            let spec = created.spec.as_ref().unwrap();
            if spec.containers.len() + spec.init_containers.as_ref().map_or(0, Vec::len) >= 3 {
                return Ok(Some(()));
            }
            api.delete("agent", &kube::api::DeleteParams::default().grace_period(0))
                .await?;
            wait_for("the uninjected pod to go", secs(30))
                .every(EVERY)
                .until_some(async || Ok(api.get_opt("agent").await?.is_none().then_some(())))
                .await?;
            Ok(None)
        })
        .await?;
    agents.wait_pod_ready("agent", secs(120)).await
}
