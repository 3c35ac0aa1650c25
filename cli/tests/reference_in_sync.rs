//! docs/reference/mandate.md must be what `mandate --help` and each
//! subcommand's `--help` print (`make reference` regenerates it).

mod reference;

#[test]
fn the_cli_reference_matches_the_binary() {
    reference::check(
        env!("CARGO_BIN_EXE_mandate"),
        "mandate",
        "cli/tests/reference_in_sync.rs",
    );
}
