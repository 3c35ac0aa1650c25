#!/usr/bin/env bash
# Build the Kubernetes binaries the test clusters run, with `go build` on the
# k8s.io/kubernetes module from the Go module proxy (no registry carries
# release binaries that this machine can reach).
#
#   hack/build-k8s.sh            # build what is missing, print the bin dir
#   hack/build-k8s.sh --force    # rebuild
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, client-go, ...)
# at v0.0.0 and points them at ./staging with replace lines, which only apply
# inside its own repository. A small wrapper module requires
# k8s.io/kubernetes ${K8S_VERSION} and replaces each staging module with the
# published v0.<minor>.<patch> of the same release.
#
# The result lives in $MANDATE_CACHE/k8s/<version>/bin, so only the first run
# on a machine pays (docs/test-cluster.md has the timings). The Go build cache
# is removed afterwards; the module cache stays for a rebuild.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

BINARIES=(kube-apiserver kube-scheduler kube-controller-manager kubelet kube-proxy kubectl)

force=0
[ "${1:-}" = "--force" ] && force=1

have_all() {
  local b
  for b in "${BINARIES[@]}" pause; do
    [ -x "$K8S_BIN/$b" ] || return 1
  done
  [ -f "$K8S_BIN/.complete" ]
}

if ((force == 0)) && have_all; then
  log "Kubernetes ${K8S_VERSION} binaries cached in ${K8S_BIN}"
  echo "$K8S_BIN"
  exit 0
fi

need_go 25
need_cmd gcc gcc

ver="${K8S_VERSION#v}" # 1.35.4
minor="${ver#*.}"
minor="${minor%%.*}" # 35
staging_ver="v0.${ver#*.}" # v0.35.4

work="${MANDATE_CACHE}/k8s/build-${K8S_VERSION}"
rm -rf "$work"
mkdir -p "$work/mod"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOCACHE="$work/gocache"
export GOTOOLCHAIN=local

t0=$SECONDS
log "fetching k8s.io/kubernetes@${K8S_VERSION} from the Go module proxy"
modfile="$(cd "$work/mod" && go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
[ -f "$modfile" ] || die "go mod download k8s.io/kubernetes@${K8S_VERSION} failed; is the Go module proxy reachable (go env GOPROXY)?"
src="$(cd "$work/mod" && go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"

# The staging modules: every `k8s.io/X => ./staging/src/k8s.io/X` line.
mapfile -t staging < <(sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#\1#p' "$modfile")
((${#staging[@]} > 10)) || die "found only ${#staging[@]} staging modules in ${modfile}; has the module layout changed?"
go_line="$(sed -n 's/^go \(.*\)/\1/p' "$modfile")"
go_minor="${go_line#1.}"
need_go "${go_minor%%.*}" # the Go this release asks for (1.37: 1.26)
{
  echo "module mandate.local/k8s-build"
  echo
  echo "go ${go_line}"
  echo
  # godebug as upstream builds it (go.mod's godebug line applies only to the main module)
  sed -n 's/^godebug .*/&/p' "$modfile"
  echo
  echo "require k8s.io/kubernetes ${K8S_VERSION}"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	${m} => ${m} ${staging_ver}"; done
  echo ")"
} >"$work/mod/go.mod"
go_tools_module "$work/mod" "the Kubernetes ${K8S_VERSION} wrapper module" "${BINARIES[@]/#/k8s.io/kubernetes/cmd/}"
log "modules resolved in $((SECONDS - t0))s"

# The version stamped as upstream's hack/lib/version.sh does: /version must
# report it (the injector's native-sidecar check and Helm's kubeVersion read it).
# The module proxy carries no commit hash; the build date is the release's
# time from the proxy's .info.
info="${modfile%.mod}.info"
build_date="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info" 2>/dev/null)"
[ -n "$build_date" ] || build_date="1970-01-01T00:00:00Z"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
  ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=${build_date}"
done

out="$work/bin"
mkdir -p "$out"
for b in "${BINARIES[@]}"; do
  t1=$SECONDS
  (cd "$work/mod" && go build -trimpath -o "$out/$b" -ldflags "$ldflags" "k8s.io/kubernetes/cmd/${b}") >"$work/build-$b.log" 2>&1 || {
    tail -30 "$work/build-$b.log" >&2
    die "building ${b} failed (log: $work/build-$b.log)"
  }
  log "built ${b} in $((SECONDS - t1))s"
done

# The pause image's program, from the same release.
gcc -Os -static -o "$out/pause" "$src/build/pause/linux/pause.c" || die "building pause failed"
strip "$out/pause" 2>/dev/null || true

"$out/kube-apiserver" --version | has "$(re "${K8S_VERSION}")\$" || die "kube-apiserver does not report ${K8S_VERSION}"

rm -rf "$K8S_BIN"
mkdir -p "$(dirname "$K8S_BIN")"
mv "$out" "$K8S_BIN"
touch "$K8S_BIN/.complete"
rm -rf "$work" # the Go build cache (~3 GB); the module cache stays
log "built Kubernetes ${K8S_VERSION} in $((SECONDS - t0))s: $(ls "$K8S_BIN" | tr '\n' ' ')"
echo "$K8S_BIN"
