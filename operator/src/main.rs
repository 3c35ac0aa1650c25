//! `mandate-operator`: reconciles Mandate's custom resources.
//!
//! This file only wires: parse the flags ([`mandate_operator::args`]), set
//! up logging, and run the operator ([`mandate_operator::run`]), whose
//! tasks one supervisor watches and drains on SIGTERM or on a task's failure.

use clap::Parser as _;
use mandate_operator::args::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.check()?;
    mandate_runtime::init_tracing(&args.log, args.log_json)?;
    args.check_lease()?;
    mandate_operator::run::run(args).await
}
