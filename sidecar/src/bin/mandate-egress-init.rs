//! `mandate-egress-init`: installs a pod's egress rules (transparent
//! egress) in its network namespace, then exits. The injector runs it as
//! the pod's first init container, as root with only NET_ADMIN; the rules
//! are in [`mandate_sidecar::egress_rules`].

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use clap::Parser;
use mandate_sidecar::egress_rules::{EgressRules, TABLE};

/// Install the pod's egress rules: every TCP connection of every UID but the
/// proxy's goes to Envoy's transparent listener, DNS to the sidecar's
/// resolver, all other traffic is refused. Fails (and so does the pod) if
/// the rules cannot be installed.
#[derive(Debug, Parser)]
#[command(name = "mandate-egress-init", version, about, long_about = None)]
struct Args {
    /// The proxy's UID (Envoy and mandate-sidecar): the only one exempt.
    #[arg(long, default_value_t = 15999)]
    proxy_uid: u32,
    /// Envoy's explicit forward proxy port (HTTP_PROXY), on loopback.
    #[arg(long, default_value_t = 15001)]
    proxy_port: u16,
    /// Envoy's transparent listener port, the target of the TCP redirect.
    #[arg(long, default_value_t = 15002)]
    transparent_port: u16,
    /// The sidecar's DNS resolver port, the target of port 53's redirect.
    #[arg(long, default_value_t = 15053)]
    dns_port: u16,
    /// The nft binary.
    #[arg(long, default_value = "/usr/sbin/nft")]
    nft: PathBuf,
    /// Print the ruleset and exit, installing nothing.
    #[arg(long)]
    print: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rules = EgressRules {
        proxy_uid: args.proxy_uid,
        proxy_port: args.proxy_port,
        transparent_port: args.transparent_port,
        dns_port: args.dns_port,
        ..EgressRules::default()
    };
    if let Err(e) = rules.check() {
        eprintln!("mandate-egress-init: {e}");
        return ExitCode::from(2);
    }
    let ruleset = rules.ruleset();
    if args.print {
        print!("{ruleset}");
        return ExitCode::SUCCESS;
    }
    match install(&args.nft, &ruleset) {
        Ok(listed) => {
            println!(
                "mandate-egress-init: egress rules installed (proxy UID {})",
                args.proxy_uid
            );
            print!("{listed}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mandate-egress-init: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Apply the ruleset in one transaction, then read the table back.
fn install(nft: &std::path::Path, ruleset: &str) -> Result<String, String> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", nft.display()))?;
    child
        .stdin
        .take()
        .ok_or("nft's stdin is not a pipe")?
        .write_all(ruleset.as_bytes())
        .map_err(|e| format!("cannot write the ruleset to nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("waiting for nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft refused the egress rules ({}): {} (the container needs CAP_NET_ADMIN and a kernel with nf_tables)",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let listed = Command::new(nft)
        .args(["list", "table", "inet", TABLE])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nft.display()))?;
    let text = String::from_utf8_lossy(&listed.stdout).into_owned();
    if !listed.status.success() || !text.contains("filter_output") || !text.contains("nat_output") {
        return Err(format!(
            "the egress rules are not in place after nft applied them: {}",
            String::from_utf8_lossy(&listed.stderr).trim()
        ));
    }
    Ok(text)
}
