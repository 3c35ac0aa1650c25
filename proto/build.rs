//! Generates the Rust for `mandate/**/*.proto` (and the SPIFFE Workload
//! API's X.509 server side, `spiffe/workload/workload.proto`) with tonic-prost-build, using
//! the protoc that `protoc-bin-vendored` ships (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["mandate/identity/v1/identity.proto", "mandate/policy/v1/policy.proto"],
        &["."],
    )?;
    // The SPIFFE Workload API (X.509 part), server side only: for tests that
    // stand up a Workload API of their own. Clients use the `spiffe` crate.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().build_client(false).compile_with_config(
        config,
        &["spiffe/workload/workload.proto"],
        &["."],
    )?;
    println!("cargo:rerun-if-changed=mandate");
    println!("cargo:rerun-if-changed=spiffe");
    Ok(())
}
