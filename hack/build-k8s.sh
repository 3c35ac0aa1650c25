#!/usr/bin/env bash
# Build the Kubernetes v1.20.2 binaries the test clusters run, from Debian
# bookworm's `kubernetes` source package (no registry carries them).
#
#   hack/build-k8s.sh            # build what is missing, print the bin dir
#   hack/build-k8s.sh --force    # rebuild
#
# The result lives in $MANDATE_CACHE/k8s/<version>/bin, so only the first run
# on a machine pays (~5 minutes on 2 cores). The Go build cache is removed
# afterwards (~1 GB).
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

for c in go dpkg-source rsync; do need_cmd "$c" "golang-go dpkg-dev rsync"; done
[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] ||
  die "Debian's reflect2 sources are missing; run: make deps (apt-get install golang-github-modern-go-reflect2-dev)"

work="${MANDATE_CACHE}/k8s/build-${K8S_DEB_VERSION}"
src_tar_dir="${MANDATE_CACHE}/k8s/src-${K8S_DEB_VERSION}"

# 1. The source package. apt-get source needs a deb-src entry; add one with the
#    same mirrors and keyring as the machine's own sources.
if [ ! -f "$src_tar_dir/.complete" ]; then
  require_root "fetching the kubernetes source package"
  srcs=/etc/apt/sources.list.d/mandate-deb-src.sources
  if ! apt-cache showsrc "kubernetes=${K8S_DEB_VERSION}" 2>/dev/null | has "^Version: $(re "${K8S_DEB_VERSION}")$"; then
    if [ ! -f "$srcs" ]; then
      log "adding Debian deb-src entries (${srcs})"
      cat >"$srcs" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    apt-get update -qq
  fi
  rm -rf "$src_tar_dir"
  mkdir -p "$src_tar_dir"
  log "downloading source package kubernetes=${K8S_DEB_VERSION}"
  (cd "$src_tar_dir" && apt-get source -qq --download-only "kubernetes=${K8S_DEB_VERSION}") ||
    die "apt-get source kubernetes=${K8S_DEB_VERSION} failed; is deb.debian.org reachable and does bookworm still carry that version?"
  touch "$src_tar_dir/.complete"
fi

# 2. Unpack into a GOPATH: module mode fails on this tree (go.mod needs updates).
rm -rf "$work"
mkdir -p "$work/gopath/src/k8s.io"
log "unpacking source"
dsc=$(ls "$src_tar_dir"/kubernetes_*.dsc)
dpkg-source --no-check -x "$dsc" "$work/kubernetes" >/dev/null
ln -s "$work/kubernetes" "$work/gopath/src/k8s.io/kubernetes"
tree="$work/gopath/src/k8s.io/kubernetes"

# 3. Fix one: vendored reflect2 v1.0.1 breaks with Go >= 1.18; use Debian's 1.0.2.
rm -rf "$tree/vendor/github.com/modern-go/reflect2"
mkdir -p "$tree/vendor/github.com/modern-go/reflect2"
cp -rL /usr/share/gocode/src/github.com/modern-go/reflect2/. "$tree/vendor/github.com/modern-go/reflect2/"

export GOPATH="$work/gopath" GO111MODULE=off CGO_ENABLED=0 GOCACHE="$work/gocache"

# 4. Fix two: the generated OpenAPI definitions are not shipped.
if [ ! -f "$tree/pkg/generated/openapi/zz_generated.openapi.go" ]; then
  log "generating OpenAPI definitions (make gen_openapi)"
  (cd "$tree" && make gen_openapi >"$work/gen_openapi.log" 2>&1) || {
    tail -30 "$work/gen_openapi.log" >&2
    die "make gen_openapi failed; full log in $work/gen_openapi.log"
  }
fi

# 5. Build, with the version stamped so /version reports v1.20.2.
commit="faecb196815e248d3ecfb03c680a4507229c2a56" # upstream v1.20.2 tag
ldflags="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=20"
  ldflags+=" -X ${pkg}.gitCommit=${commit} -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=2021-01-13T13:20:00Z"
done

out="$work/bin"
mkdir -p "$out"
for b in "${BINARIES[@]}"; do
  log "go build ./cmd/${b}"
  (cd "$tree" && go build -o "$out/$b" -ldflags "$ldflags" "./cmd/$b") ||
    die "building ${b} failed"
done

# The pause image's program, from the same tree.
gcc -Os -static -o "$out/pause" "$tree/build/pause/linux/pause.c" || die "building pause failed"
strip "$out/pause" 2>/dev/null || true

"$out/kube-apiserver" --version | has "$(re "${K8S_VERSION}")" || die "kube-apiserver does not report ${K8S_VERSION}"

rm -rf "$K8S_BIN"
mkdir -p "$(dirname "$K8S_BIN")"
mv "$out" "$K8S_BIN"
touch "$K8S_BIN/.complete"
# The Go cache and the unpacked tree are ~2 GB; the source package stays cached.
rm -rf "$work"
log "built: $(ls "$K8S_BIN" | tr '\n' ' ')"
echo "$K8S_BIN"
