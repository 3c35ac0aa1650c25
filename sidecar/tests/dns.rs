//! The sidecar's DNS resolver, against real components: the
//! `mandate-sidecar` binary with `--dns-listen` on loopback, a real DNS
//! server upstream (Debian's dnsmasq, with its query log), and a real client
//! (`dig`, Debian's bind9-dnsutils) over UDP and TCP.
//!
//! A name a policy declares gets the upstream's answer; every other name is
//! NXDOMAIN and, as dnsmasq's own log shows, never reaches the upstream —
//! whatever a hostile agent tries (case and trailing-dot variants, long
//! exfiltration labels, TXT for an allowed name, a name that merely ends
//! with an allowed one, garbage packets). Upstream down is SERVFAIL; a
//! policy file edit takes effect without a restart.
//!
//! dnsmasq and dig: `make deps` (hack/install-deps.sh) installs them.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::net::UdpSocket;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use mandate_testsupport::{Process, eventually, free_port, http_get, secs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A program from Debian, in PATH or the sbin directories; a clear failure
/// (not a skip) when it is not installed.
fn debian_tool(name: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} is not installed: run `make deps` (hack/install-deps.sh installs Debian's {package})")
        })
}

const POLICY: &str = r#"apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: dns}
spec:
  modules:
  - name: authz.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := false
  egress:
  - {host: allowed.example, port: 443, tls: true}
  - {host: "*.wild.example", port: 443}
"#;

const LATER: &str = r#"apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: later}
spec:
  modules:
  - name: authz.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := false
  egress:
  - {host: Later.Example., port: 443}
"#;

/// dnsmasq + the sidecar, on loopback, torn down on drop.
struct Stack {
    dir: PathBuf,
    dnsmasq: Option<Process>,
    _sidecar: Process,
    /// dnsmasq's port.
    upstream: u16,
    /// The sidecar's DNS port.
    dns: u16,
    admin: u16,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_dnsmasq(dir: &Path, port: u16) -> Result<Process> {
    let bin = debian_tool("dnsmasq", "dnsmasq-base")?;
    let log = dir.join("dnsmasq.log");
    Process::spawn(
        "dnsmasq",
        tokio::process::Command::new(bin).args([
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--keep-in-foreground",
            "--log-queries",
            &format!("--log-facility={}", log.display()),
            "--pid-file=",
            "--address=/allowed.example/192.0.2.10",
            "--address=/evilallowed.example/192.0.2.66",
            "--address=/evil.example/192.0.2.66",
            "--address=/wild.example/192.0.2.30",
            "--address=/later.example/192.0.2.40",
            "--address=/db.agents.svc.cluster.local/10.96.0.20",
            "--txt-record=allowed.example,upstream-txt-data",
        ]),
        &dir.join("dnsmasq.out"),
    )
}

impl Stack {
    async fn start(name: &str) -> Result<Self> {
        let dig = debian_tool("dig", "bind9-dnsutils")?;
        let dir = std::env::temp_dir().join(format!("mandate-dns-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies"))?;
        std::fs::write(dir.join("policies/dns.yaml"), POLICY)?;
        let (upstream, dns, admin, grpc) = (free_port(), free_port(), free_port(), free_port());
        let dnsmasq = start_dnsmasq(&dir, upstream)?;
        let log = dir.join("dnsmasq.log");
        eventually("dnsmasq to answer", secs(20), async || {
            dig_at(&dig, upstream, "allowed.example", "A", false)
                .await
                .is_ok_and(|a| a.status == "NOERROR")
        })
        .await
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;

        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-sidecar"));
        cmd.arg("--policy")
            .arg(dir.join("policies"))
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--reload-interval-ms", "100"])
            // Both loopbacks; ::1 is skipped where IPv6 is off.
            .args(["--dns-listen", &format!("127.0.0.1:{dns},[::1]:{dns}")])
            .args(["--dns-upstream", &format!("127.0.0.1:{upstream}")])
            .args(["--dns-cluster-domain", "cluster.local"]);
        let sidecar = Process::spawn_split("mandate-sidecar", &mut cmd, None, &dir.join("sidecar.err"))?;
        let ready = format!("http://127.0.0.1:{admin}/readyz");
        eventually("the sidecar to be ready", secs(30), async || {
            http_get(&ready).await.is_ok_and(|(s, _)| s == 200)
        })
        .await
        .with_context(|| std::fs::read_to_string(dir.join("sidecar.err")).unwrap_or_default())?;
        Ok(Self {
            dir,
            dnsmasq: Some(dnsmasq),
            _sidecar: sidecar,
            upstream,
            dns,
            admin,
        })
    }

    /// What reached dnsmasq.
    fn upstream_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.err")).unwrap_or_default()
    }

    async fn dig(&self, name: &str, qtype: &str, tcp: bool) -> Result<Dig> {
        dig_at(&debian_tool("dig", "bind9-dnsutils")?, self.dns, name, qtype, tcp).await
    }

    /// The sidecar's answer to `name`, over UDP and TCP (the same on both).
    async fn both(&self, name: &str, qtype: &str) -> Result<Dig> {
        let udp = self.dig(name, qtype, false).await?;
        let tcp = self.dig(name, qtype, true).await?;
        ensure!(
            (&udp.status, &udp.answers) == (&tcp.status, &tcp.answers),
            "{name} {qtype}: UDP said {udp:?}, TCP {tcp:?}"
        );
        Ok(udp)
    }
}

/// What dig saw.
#[derive(Debug, Clone)]
struct Dig {
    status: String,
    /// The answer section's records, each `name ttl class type data`,
    /// whitespace collapsed.
    answers: Vec<String>,
    flags: String,
    raw: String,
}

async fn dig_at(bin: &Path, port: u16, name: &str, qtype: &str, tcp: bool) -> Result<Dig> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=5"])
        .arg(if tcp { "+tcp" } else { "+notcp" })
        .args([name, qtype]);
    let out = tokio::time::timeout(secs(15), cmd.output())
        .await
        .context("dig did not finish")??;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "dig {name} {qtype} failed: {raw}");
    let status = raw
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .with_context(|| format!("no status in dig's output: {raw}"))?
        .to_string();
    let flags = raw
        .split(";; flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_default()
        .to_string();
    let answers = raw
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|s| {
            s.lines()
                .take_while(|l| !l.trim().is_empty())
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        })
        .unwrap_or_default();
    Ok(Dig {
        status,
        answers,
        flags,
        raw,
    })
}

/// The record data of each answer of type `t`.
fn data(d: &Dig, t: &str) -> Vec<String> {
    d.answers
        .iter()
        .filter_map(|a| {
            let f: Vec<&str> = a.split(' ').collect();
            (f.get(3) == Some(&t)).then(|| f[4..].join(" "))
        })
        .collect()
}

#[tokio::test]
async fn only_names_a_policy_declares_reach_the_upstream() -> Result<()> {
    let s = Stack::start("allow").await?;

    // Allowed names get the upstream's answer, over UDP and TCP.
    let a = s.both("allowed.example", "A").await?;
    assert_eq!(
        (a.status.as_str(), data(&a, "A")),
        ("NOERROR", vec!["192.0.2.10".into()]),
        "{}",
        a.raw
    );
    let a = s.both("ALLOWED.Example.", "A").await?;
    assert_eq!(data(&a, "A"), ["192.0.2.10"], "any case, the root dot: {}", a.raw);
    let a = s.both("x.y.wild.example", "A").await?;
    assert_eq!(
        data(&a, "A"),
        ["192.0.2.30"],
        "a subdomain of *.wild.example: {}",
        a.raw
    );
    // The cluster's own names (and what the search list makes of short ones).
    let a = s.both("db.agents.svc.cluster.local", "A").await?;
    assert_eq!(data(&a, "A"), ["10.96.0.20"], "{}", a.raw);
    let log = s.upstream_log();
    for arrived in [
        "query[A] allowed.example from",
        "query[A] x.y.wild.example from",
        "query[A] db.agents.svc.cluster.local from",
    ] {
        assert!(log.contains(arrived), "dnsmasq never saw {arrived}:\n{log}");
    }
    assert!(!log.contains("ALLOWED"), "the name is forwarded in lower case:\n{log}");

    // Everything else: NXDOMAIN, no records, and never forwarded.
    let exfil = format!(
        "{}.evil.example",
        "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpjqwey3emvtgo2djnjvwy3d"
    );
    let hostile = [
        ("evil.example", "A"),
        ("EVIL.example.", "A"),
        ("Evil.Example", "AAAA"),
        (exfil.as_str(), "A"),
        (exfil.as_str(), "TXT"),
        ("evilallowed.example", "A"),
        ("allowed.example.evil.example", "A"),
        ("evil.allowed.example", "A"),
        ("wild.example", "A"),
        ("evilwild.example", "A"),
        ("cluster.local.evil.example", "A"),
    ];
    for (name, qtype) in hostile {
        let a = s.both(name, qtype).await?;
        assert_eq!(a.status, "NXDOMAIN", "{name} {qtype}: {}", a.raw);
        assert!(a.answers.is_empty(), "{name}: {}", a.raw);
        assert!(a.flags.contains("aa"), "answered as an authority: {}", a.raw);
    }

    // TXT (and other data-carrying types) for an allowed name: no data.
    for qtype in ["TXT", "ANY", "NULL", "MX"] {
        let a = s.both("allowed.example", qtype).await?;
        assert_eq!(a.status, "NOERROR", "{qtype}: {}", a.raw);
        assert!(a.answers.is_empty(), "{qtype} must carry nothing: {}", a.raw);
    }
    // Not IN: refused.
    let chaos = tokio::process::Command::new(debian_tool("dig", "bind9-dnsutils")?)
        .args([
            "@127.0.0.1",
            "-p",
            &s.dns.to_string(),
            "+tries=1",
            "+time=5",
            "version.bind",
            "CH",
            "TXT",
        ])
        .output()
        .await?;
    assert!(String::from_utf8_lossy(&chaos.stdout).contains("status: REFUSED"));

    // Garbage: dropped (UDP) or the connection closed (TCP); the next query is answered.
    let udp = UdpSocket::bind("127.0.0.1:0")?;
    for junk in [
        &b""[..],
        b"\x00",
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        &[0x41; 3000],
    ] {
        udp.send_to(junk, ("127.0.0.1", s.dns))?;
    }
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.dns)).await?;
    tcp.write_all(b"\x00\x0dgarbage-bytes").await?;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(secs(10), tcp.read_to_end(&mut rest)).await??;
    assert_eq!(n, 0, "a TCP connection sending garbage is closed unanswered");
    let mut huge = tokio::net::TcpStream::connect(("127.0.0.1", s.dns)).await?;
    huge.write_all(&[0xff, 0xff]).await?;
    let n = tokio::time::timeout(secs(10), huge.read_to_end(&mut rest)).await??;
    assert_eq!(n, 0, "a 64 KiB query is not read");
    let a = s.both("allowed.example", "A").await?;
    assert_eq!(data(&a, "A"), ["192.0.2.10"], "still serving after garbage: {}", a.raw);

    // None of the refused queries reached the upstream.
    let log = s.upstream_log();
    assert!(!log.contains("evil"), "a refused name reached the upstream:\n{log}");
    assert!(
        !log.contains("mfrggzdf"),
        "the exfiltration label reached the upstream:\n{log}"
    );
    for t in ["TXT", "ANY", "NULL", "MX", "type="] {
        assert!(
            !log.contains(&format!("query[{t}")),
            "a {t} query was forwarded:\n{log}"
        );
    }
    assert!(!log.contains("version.bind"), "{log}");

    // Refusals are logged and counted.
    let err = s.stderr();
    assert!(
        err.contains("DNS query refused") && err.contains("evil.example"),
        "{err}"
    );
    let (_, metrics) = http_get(&format!("http://127.0.0.1:{}/metrics", s.admin)).await?;
    for result in ["forwarded", "refused", "malformed"] {
        assert!(
            metrics.contains(&format!("mandate_sidecar_dns_queries_total{{result=\"{result}\"}}")),
            "{result}:\n{metrics}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_policy_edit_adds_a_name_and_upstream_down_is_servfail() -> Result<()> {
    let mut s = Stack::start("reload").await?;
    let a = s.both("later.example", "A").await?;
    assert_eq!(a.status, "NXDOMAIN", "not declared yet: {}", a.raw);
    assert!(!s.upstream_log().contains("later.example"));

    // A second policy file, picked up by the reload loop: the name resolves.
    std::fs::write(s.dir.join("policies/later.yaml"), LATER)?;
    eventually(
        "later.example to resolve once its policy is loaded",
        secs(20),
        async || {
            s.dig("later.example", "A", false)
                .await
                .is_ok_and(|a| data(&a, "A") == ["192.0.2.40"])
        },
    )
    .await?;
    let a = s.both("later.example", "A").await?;
    assert_eq!(data(&a, "A"), ["192.0.2.40"]);
    // And goes again when the file goes.
    std::fs::remove_file(s.dir.join("policies/later.yaml"))?;
    eventually("later.example to be refused again", secs(20), async || {
        s.dig("later.example", "A", false)
            .await
            .is_ok_and(|a| a.status == "NXDOMAIN")
    })
    .await?;

    // The upstream goes away: SERVFAIL, never an invented answer.
    s.dnsmasq.take().unwrap().kill().await?;
    for tcp in [false, true] {
        let a = s.dig("allowed.example", "A", tcp).await?;
        assert_eq!(a.status, "SERVFAIL", "tcp={tcp}: {}", a.raw);
        assert!(a.answers.is_empty());
    }
    // A refused name is still refused (not a SERVFAIL that invites retries elsewhere).
    assert_eq!(s.dig("evil.example", "A", false).await?.status, "NXDOMAIN");
    // And back: answers again.
    s.dnsmasq = Some(start_dnsmasq(&s.dir, s.upstream)?);
    eventually("answers once the upstream is back", secs(20), async || {
        s.dig("allowed.example", "A", false)
            .await
            .is_ok_and(|a| data(&a, "A") == ["192.0.2.10"])
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_sidecar_does_not_start_when_no_dns_address_binds() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("mandate-dns-nobind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies"))?;
    std::fs::write(dir.join("policies/dns.yaml"), POLICY)?;
    // Taken: the resolver's port is in use on 127.0.0.1.
    let taken = UdpSocket::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    for listen in [format!("127.0.0.1:{port}"), "192.0.2.1:5353".to_string()] {
        let out = tokio::time::timeout(
            secs(30),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_mandate-sidecar"))
                .arg("--policy")
                .arg(dir.join("policies"))
                .args(["--listen", &format!("127.0.0.1:{}", free_port())])
                .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
                .args(["--dns-listen", &listen, "--dns-upstream", "127.0.0.1:53"])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("the sidecar kept running")??;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{listen}: started anyway");
        assert!(err.contains("DNS resolver") && err.contains(&listen), "{listen}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
