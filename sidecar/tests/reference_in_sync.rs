//! docs/reference/mandate-sidecar.md must be what `mandate-sidecar --help`
//! prints (`make reference` regenerates it).

#[path = "../../cli/tests/reference/mod.rs"]
mod reference;

#[test]
fn the_sidecar_reference_matches_the_binary() {
    reference::check(
        env!("CARGO_BIN_EXE_mandate-sidecar"),
        "mandate-sidecar",
        "sidecar/tests/reference_in_sync.rs",
    );
}
