//! docs/reference/mandate-operator.md must be what `mandate-operator --help`
//! prints (`make reference` regenerates it).

#[path = "../../cli/tests/reference/mod.rs"]
mod reference;

#[test]
fn the_operator_reference_matches_the_binary() {
    reference::check(
        env!("CARGO_BIN_EXE_mandate-operator"),
        "mandate-operator",
        "operator/tests/reference_in_sync.rs",
    );
}
