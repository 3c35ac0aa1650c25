//! `mandate-operator`: the control plane of Mandate.
//!
//! Not built yet: the reconcilers, webhooks, SPIFFE CA and policy distribution
//! arrive with issues 3, 5, 6 and 7. Until then this binary only parses its
//! command line and refuses to run, so nobody mistakes it for a working operator.

use clap::Parser;

/// Mandate's operator (not built yet; see README.md "Not built yet").
#[derive(Debug, Parser)]
#[command(name = "mandate-operator", version, about)]
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
    anyhow::bail!("mandate-operator is not built yet: see README.md, \"Not built yet\"")
}
