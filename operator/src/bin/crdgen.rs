//! `mandate-crdgen`: print Mandate's CRDs as YAML (what `crds/` holds).
//!
//! `cargo run -p mandate-operator --bin mandate-crdgen > crds/mandate.dev.yaml`

fn main() -> anyhow::Result<()> {
    print!("{}", mandate_operator::crds_yaml()?);
    Ok(())
}
