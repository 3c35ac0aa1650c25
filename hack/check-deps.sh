#!/usr/bin/env bash
# The crate boundaries that make the data plane small and reviewable, checked
# on the resolved dependency graph (cargo tree, normal dependencies only):
#   - mandate-sidecar links neither kube, k8s-openapi nor mandate-operator;
#   - the shared crates (api without its kube feature, core, policy,
#     identity, runtime) link no Kubernetes client either;
#   - mandate-core has no async runtime (its rules are pure functions).
# Fails naming the path by which a forbidden crate came in.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$MANDATE_ROOT"

fail=0
# forbid PACKAGE CRATE...: PACKAGE's normal dependency tree has none of CRATE.
forbid() {
  local pkg="$1" tree c
  shift
  tree="$(cargo tree --locked -p "$pkg" -e normal --prefix depth --format '{p}')" || die "cargo tree -p $pkg failed"
  for c in "$@"; do
    if grep -Eq "^[0-9]+${c} v" <<<"$tree"; then
      log "FAIL: $pkg depends on $c:"
      cargo tree --locked -p "$pkg" -e normal -i "$c" 2>/dev/null | sed 's/^/  /' | head -n 20 >&2
      fail=1
    fi
  done
}

forbid mandate-sidecar kube kube-core kube-client k8s-openapi mandate-operator
for pkg in mandate-api mandate-core mandate-policy mandate-identity mandate-runtime; do
  forbid "$pkg" kube kube-core kube-client k8s-openapi mandate-operator
done
forbid mandate-core tokio

((fail == 0)) || die "a crate boundary is broken (see above)"
log "crate boundaries hold: the sidecar and the shared crates link no Kubernetes client or operator; mandate-core has no async runtime"
