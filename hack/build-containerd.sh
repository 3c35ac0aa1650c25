#!/usr/bin/env bash
# Build the container runtime the test node runs: containerd, its runc shim
# and ctr, with `go build` on the github.com/containerd/containerd module
# from the Go module proxy. Debian bookworm carries containerd 1.6, which
# Kubernetes 1.35 no longer tests against; 1.35 is the last release that
# supports containerd 1.x at all, so the node runs the newest 1.7.
#
#   hack/build-containerd.sh            # build what is missing, print the bin dir
#   hack/build-containerd.sh --force    # rebuild
#
# runc comes from Debian (bookworm's 1.1.5).
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

BINARIES=(containerd containerd-shim-runc-v2 ctr)

force=0
[ "${1:-}" = "--force" ] && force=1

have_all() {
  local b
  for b in "${BINARIES[@]}"; do [ -x "$CONTAINERD_BIN/$b" ] || return 1; done
  [ -f "$CONTAINERD_BIN/.complete" ]
}

if ((force == 0)) && have_all; then
  log "containerd ${CONTAINERD_VERSION} cached in ${CONTAINERD_BIN}"
  echo "$CONTAINERD_BIN"
  exit 0
fi
need_go 25

work="${MANDATE_CACHE}/containerd/build-${CONTAINERD_VERSION}"
rm -rf "$work"
mkdir -p "$work/mod" "$work/bin"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOCACHE="$work/gocache" GOTOOLCHAIN=local
t0=$SECONDS
# v2 and later live at the module path's /vN.
module=github.com/containerd/containerd
major="${CONTAINERD_VERSION#v}"
major="${major%%.*}"
if ((major >= 2)); then module+="/v${major}"; fi
cat >"$work/mod/go.mod" <<EOF
module mandate.local/containerd-build

go 1.25.0

require ${module} ${CONTAINERD_VERSION}
EOF
go_tools_module "$work/mod" "containerd ${CONTAINERD_VERSION}" "${BINARIES[@]/#/${module}/cmd/}"
pkg="${module}/version"
ldflags="-s -w -X ${pkg}.Version=${CONTAINERD_VERSION} -X ${pkg}.Package=github.com/containerd/containerd"
for b in "${BINARIES[@]}"; do
  # no_btrfs: its snapshotter needs cgo and btrfs headers; the node uses overlayfs.
  (cd "$work/mod" && go build -trimpath -tags "no_btrfs urfave_cli_no_docs" -ldflags "$ldflags" \
    -o "$work/bin/$b" "${module}/cmd/${b}") >"$work/build-$b.log" 2>&1 || {
    tail -30 "$work/build-$b.log" >&2
    die "building ${b} ${CONTAINERD_VERSION} failed (log: $work/build-$b.log)"
  }
done
"$work/bin/containerd" --version | has "$(re "${CONTAINERD_VERSION}")" || die "containerd does not report ${CONTAINERD_VERSION}"
rm -rf "$CONTAINERD_BIN"
mkdir -p "$(dirname "$CONTAINERD_BIN")"
mv "$work/bin" "$CONTAINERD_BIN"
touch "$CONTAINERD_BIN/.complete"
rm -rf "$work"
log "built containerd ${CONTAINERD_VERSION} in $((SECONDS - t0))s"
echo "$CONTAINERD_BIN"
