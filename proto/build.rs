//! Generates the Rust for `mandate/**/*.proto` with tonic-prost-build, using
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
    println!("cargo:rerun-if-changed=mandate");
    Ok(())
}
