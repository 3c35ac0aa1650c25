//! `mandate-sidecar`: the per-pod decision engine of Mandate.
//!
//! Not built yet: the ext_authz Check service, the decision engine and the decision log
//! arrive with issue 4. Until then this binary only parses its
//! command line and refuses to run, so nobody mistakes it for a working sidecar.

use clap::Parser;

/// Mandate's sidecar (not built yet; see README.md "Not built yet").
#[derive(Debug, Parser)]
#[command(name = "mandate-sidecar", version, about)]
struct Args {
    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, env = "MANDATE_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log)?)
        .init();
    anyhow::bail!("mandate-sidecar is not built yet: see README.md, \"Not built yet\"")
}
