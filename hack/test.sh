#!/usr/bin/env bash
# Every test Mandate has, against real components on this machine (root):
#   1. lint: cargo fmt --check, cargo clippy -D warnings, shellcheck, the crate
#      boundaries (hack/check-deps.sh: the sidecar links no kube), the Helm
#      chart and policies/ against the CRDs (hack/chart-check.sh);
#   2. the README's demo, run as `make demo` and its output checked
#      (e2e/demo_check.sh);
#   3. the test-cluster lifecycle and fault checks (e2e/cluster_lifecycle.sh);
#   4. a node up (Kubernetes ${K8S_NEWEST}, then again ${K8S_FLOOR}, the chart's
#      floor), each time `cargo test --workspace`
#      with the cluster-tests features (unit tests and the cluster tests; injected pods with native sidecars
#      and with the pre-1.29 path), then the end-to-end suite (e2e/helm.sh:
#      Mandate installed with Helm from charts/), then the node down,
#      whatever happened.
# Each phase's time is printed as it ends, and all of them at the end.
# Run `make deps` once first (installs packages, builds Kubernetes and
# containerd; docs/test-cluster.md has the times).
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
require_root "$0"
cd "$MANDATE_ROOT"

for v in "$K8S_NEWEST" "$K8S_FLOOR"; do
  [ -x "${MANDATE_CACHE}/k8s/$v/bin/kube-apiserver" ] || die "Kubernetes $v is not built; run: make deps"
done
for v in "$CONTAINERD_NEWEST" "$CONTAINERD_FLOOR"; do
  [ -x "${MANDATE_CACHE}/containerd/$v/bin/containerd" ] || die "containerd $v is not built; run: make deps"
done
if [ -f "$CLUSTER_DIR/cluster.env" ]; then
  die "a test cluster is up ($CLUSTER_DIR); stop it (hack/cluster.sh down) or run cargo test --workspace against it"
fi

t0=$SECONDS
# Whatever stops this script, no cluster stays up, and the phases are shown.
finish() {
  local rc=$?
  [ -d "$CLUSTER_DIR" ] && { hack/cluster.sh down >/dev/null 2>&1 || log "teardown incomplete; run hack/cluster.sh down"; }
  phase_summary "test phases (Kubernetes ${K8S_NEWEST} with containerd ${CONTAINERD_NEWEST}, and ${K8S_FLOOR} with ${CONTAINERD_FLOOR}):"
  exit "$rc"
}
trap finish EXIT

# (chained: phase runs it on the left of ||, where set -e does not apply)
lint() {
  cargo fmt --all -- --check &&
    cargo clippy --workspace --all-targets --locked -- -D warnings &&
    shellcheck -x -S warning hack/*.sh e2e/*.sh .ci/run &&
    hack/check-deps.sh &&
    hack/chart-check.sh
}
phase "lint (fmt, clippy, shellcheck, crate boundaries, chart)" lint
# The cluster tests are ignored without this feature (plain `cargo test`
# passes anywhere); the build and the test run use the same features.
CLUSTER_TESTS=(--features "mandate-operator/cluster-tests mandate-e2e/cluster-tests mandate-sidecar/root-tests")
phase "rust build" cargo build --workspace --all-targets --locked "${CLUSTER_TESTS[@]}"
phase "demo (make demo, output checked)" e2e/demo_check.sh
phase "cluster lifecycle and faults" e2e/cluster_lifecycle.sh
# on_kubernetes K8S CONTAINERD WHAT: a node of that version up, the cargo
# tests and the end-to-end suite against it, the node down.
on_kubernetes() {
  export MANDATE_K8S_VERSION="$1" MANDATE_CONTAINERD_VERSION="$2"
  local what="$3"
  phase "node up (Kubernetes $1, containerd $2)" hack/cluster.sh up --node
  local server
  server="$("${MANDATE_CACHE}/k8s/$1/bin/kubectl" --kubeconfig "$CLUSTER_DIR/kubeconfig" version -o json | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' | tail -n1)"
  [ "$server" = "$1" ] || die "asked for a Kubernetes $1 node, but the apiserver says ${server:-nothing}"
  log "testing against Kubernetes ${server} ($what)"
  phase "cargo test on $1 (unit, apiserver, node, Envoy)" cargo test --workspace --locked "${CLUSTER_TESTS[@]}"
  phase "end-to-end on $1: Helm install (native sidecars)" e2e/helm.sh
  phase "node down ($1)" hack/cluster.sh down
  unset MANDATE_K8S_VERSION MANDATE_CONTAINERD_VERSION
}
export MANDATE_ENVOY="$ENVOY_BIN" MANDATE_OPA="$OPA_BIN" # Envoy tests, OPA cross-checks
export MANDATE_PY_CLIENTS="$PYCLIENTS_DIR" # requests and httpx for the egress tests
on_kubernetes "$K8S_NEWEST" "$CONTAINERD_NEWEST" "the newest that runs here"
on_kubernetes "$K8S_FLOOR" "$CONTAINERD_FLOOR" "the chart's kubeVersion floor"

log "all tests passed in $((SECONDS - t0))s"
