#!/usr/bin/env bash
# Every test Mandate has, against real components on this machine (root):
#   1. lint: cargo fmt --check, cargo clippy -D warnings, shellcheck, the Helm
#      chart and policies/ against the CRDs (hack/chart-check.sh);
#   2. the test-cluster lifecycle and fault checks (e2e/cluster_lifecycle.sh);
#   3. a node cluster up, then `cargo test --workspace` (unit tests and the
#      cluster tests), then the end-to-end suite (e2e/helm.sh: Mandate
#      installed with Helm from charts/), then the node down, whatever happened.
# Run `make deps` once first (installs packages, builds Kubernetes, ~6 min).
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
require_root "$0"
cd "$MANDATE_ROOT"

[ -x "$K8S_BIN/kube-apiserver" ] || die "Kubernetes ${K8S_VERSION} is not built; run: make deps"
if [ -f "$CLUSTER_DIR/cluster.env" ]; then
  die "a test cluster is up ($CLUSTER_DIR); stop it (hack/cluster.sh down) or run cargo test --workspace against it"
fi

t0=$SECONDS
# Whatever stops this script, no cluster stays up.
trap '[ -d "$CLUSTER_DIR" ] && { hack/cluster.sh down >/dev/null 2>&1 || log "teardown incomplete; run hack/cluster.sh down"; }' EXIT
log "lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
shellcheck -x -S warning hack/*.sh e2e/*.sh .ci/run
hack/chart-check.sh

log "build"
cargo build --workspace --all-targets --locked

log "cluster lifecycle and faults"
e2e/cluster_lifecycle.sh

log "node up"
hack/cluster.sh up --node

log "cargo test"
export MANDATE_ENVOY="$ENVOY_BIN" MANDATE_OPA="$OPA_BIN" # Envoy tests, OPA cross-checks
cargo test --workspace --locked

log "end-to-end: Helm install on the node"
e2e/helm.sh

log "all tests passed in $((SECONDS - t0))s"
