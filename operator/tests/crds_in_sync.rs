//! crds/ must hold exactly what the Rust types generate.

#[test]
fn committed_crds_match_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/mandate.dev.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = mandate_operator::crds_yaml().expect("CRDs serialize");
    assert!(
        committed == generated,
        "crds/mandate.dev.yaml is out of date with the Rust types; regenerate it:\n  \
         cargo run -p mandate-operator --bin mandate-crdgen > crds/mandate.dev.yaml"
    );
}

/// The Helm chart carries a copy (Helm cannot read files outside the chart).
#[test]
fn the_charts_copy_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/mandate/files/mandate.dev.yaml");
    let copy = std::fs::read_to_string(path).unwrap_or_default();
    let generated = mandate_operator::crds_yaml().expect("CRDs serialize");
    assert!(
        copy == generated,
        "charts/mandate/files/mandate.dev.yaml is out of date with the Rust types; regenerate both:\n  make crds"
    );
}
