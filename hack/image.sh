#!/usr/bin/env bash
# Container images without a registry: pack a binary (static, or dynamic plus
# the libraries ldd names) into an OCI image with umoci, turn it into a
# docker-archive with skopeo, and import it into the test node's containerd.
#
#   hack/image.sh build REF BINARY [--as PATH] [--add SRC:DEST]... [--add-bin SRC:DEST]...
#                                  [--entrypoint ARG]... [--busybox-applets] [--user UID:GID]
#       (--add copies one file; --add-bin copies a program with the libraries ldd names)
#       e.g. hack/image.sh build mandate.local/echo:dev target/debug/mandate-e2e-echo
#   hack/image.sh import TAR...        # into the running node's containerd (k8s.io namespace)
#   hack/image.sh base                 # build (if needed) and print the base images:
#                                      # pause, busybox, envoy
#   hack/image.sh sidecar REF DIR      # a sidecar image from DIR's binaries (tests)
#   hack/image.sh mandate              # Mandate's images as images/Dockerfile makes them
#                                      # (static musl release binaries, user 65532), plus the
#                                      # test agent; prints the archives (import them with import)
#
# Archives are cached under $MANDATE_CACHE/images, rebuilt when their inputs change.
# References should not use the tag `latest`: pods use them with imagePullPolicy Never.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

IMAGES_DIR="${MANDATE_CACHE}/images"
PAUSE_REF="mandate.local/pause:3.2"
BUSYBOX_REF="mandate.local/busybox:1"
ENVOY_REF="mandate.local/envoy:${ENVOY_VERSION}"

usage() {
  awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2
  exit 2
}

archive_path() { # REF -> path of its docker-archive
  local safe="${1//[\/:]/_}"
  echo "${IMAGES_DIR}/${safe}.tar"
}

# copy_with_libs BIN ROOTFS DEST: put BIN at ROOTFS/DEST and, when it is
# dynamically linked, every library ldd names at the same path in ROOTFS.
copy_with_libs() {
  local bin="$1" rootfs="$2" dest="$3"
  install -D -m 0755 "$bin" "${rootfs}${dest}"
  if ldd "$bin" >/dev/null 2>&1; then
    local lib
    for lib in $(ldd "$bin" | grep -o '/[^ ]*' | sort -u); do
      [ -e "$lib" ] || die "ldd names ${lib} for ${bin}, but it does not exist"
      mkdir -p "${rootfs}$(dirname "$lib")"
      cp -L "$lib" "${rootfs}${lib}"
    done
  fi
}

# build REF BINARY [options]: see the header.
cmd_build() {
  [ $# -ge 2 ] || usage
  local ref="$1" bin="$2"
  shift 2
  [[ "$ref" == *:* ]] || die "image reference '${ref}' needs a tag (e.g. ${ref}:dev)"
  [[ "$ref" != *:latest ]] || die "do not tag test images 'latest': kubelet would try to pull them"
  [ -f "$bin" ] || die "binary '${bin}' not found; build it first"
  local as adds=() bins=() entry=() applets=0 user=""
  as="/usr/local/bin/$(basename "$bin")"
  while [ $# -gt 0 ]; do
    case "$1" in
      --as) as="$2"; shift 2 ;;
      --busybox-applets) applets=1; shift ;;
      --add) adds+=("$2"); shift 2 ;;
      --add-bin) bins+=("$2"); shift 2 ;;
      --entrypoint) entry+=("$2"); shift 2 ;;
      --user) user="$2"; shift 2 ;;
      *) die "unknown option '$1' for build" ;;
    esac
  done
  [ ${#entry[@]} -gt 0 ] || entry=("$as")
  for c in umoci skopeo; do need_cmd "$c" "$c"; done

  local out
  out="$(archive_path "$ref")"
  # Rebuild only when something that goes into the image changed.
  local key a
  key="$( {
    echo "$ref" "$as" "$applets" "$user" "${entry[@]}"
    sha256sum <"$bin"
    for a in "${adds[@]}" "${bins[@]}"; do echo "$a"; sha256sum <"${a%%:*}"; done
    sha256sum <"$0"
  } | sha256sum | cut -c1-64)"
  if [ -f "$out" ] && [ "$(cat "$out.key" 2>/dev/null)" = "$key" ]; then
    echo "$out"
    return 0
  fi

  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"; trap - RETURN' RETURN
  local rootfs="$tmp/rootfs"
  mkdir -p "$rootfs"/{etc,tmp,proc,sys,dev}
  chmod 1777 "$rootfs/tmp"
  printf 'root:x:0:0:root:/:/bin/sh\nnonroot:x:65532:65532:nonroot:/:/bin/false\nmandate-proxy:x:15999:15999:mandate-proxy:/:/bin/false\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\nmandate-proxy:x:15999:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
  copy_with_libs "$bin" "$rootfs" "$as"
  if ((applets)); then
    local app
    mkdir -p "$rootfs/bin"
    for app in $("$bin" --list); do
      [ -e "$rootfs/bin/$app" ] || ln -s "$as" "$rootfs/bin/$app"
    done
  fi
  for a in "${adds[@]}"; do
    [ -e "${a%%:*}" ] || die "--add source '${a%%:*}' not found"
    install -D -m 0755 "${a%%:*}" "${rootfs}${a#*:}"
  done
  for a in "${bins[@]}"; do
    [ -e "${a%%:*}" ] || die "--add-bin source '${a%%:*}' not found"
    copy_with_libs "${a%%:*}" "$rootfs" "${a#*:}"
  done

  local tag="${ref##*:}" layout="$tmp/oci"
  umoci init --layout "$layout" >/dev/null
  umoci new --image "$layout:$tag" >/dev/null
  umoci insert --rootless --image "$layout:$tag" "$rootfs" / >/dev/null
  local cfg=(--config.entrypoint "${entry[0]}")
  for a in "${entry[@]:1}"; do cfg+=(--config.entrypoint "$a"); done
  [ -z "$user" ] || cfg+=(--config.user "$user")
  umoci config --image "$layout:$tag" "${cfg[@]}" --config.workingdir / \
    --config.env PATH=/usr/local/bin:/usr/bin:/bin --architecture amd64 --os linux >/dev/null
  mkdir -p "$IMAGES_DIR"
  # Written aside and renamed into place (archive first, then its key), so a
  # build running at the same time (tests in one binary run in parallel)
  # never reads half an archive.
  rm -f "$out.$$.tmp"
  skopeo copy --quiet "oci:$layout:$tag" "docker-archive:$out.$$.tmp:$ref" >/dev/null
  echo "$key" >"$out.key.$$.tmp"
  mv -f "$out.$$.tmp" "$out"
  mv -f "$out.key.$$.tmp" "$out.key"
  log "built image ${ref} -> ${out}"
  echo "$out"
}

# containerd socket of the running test node.
node_socket() {
  local sock="${CLUSTER_DIR}/containerd/containerd.sock"
  [ -S "$sock" ] || die "no test node is running (no ${sock}); start one with: hack/cluster.sh up --node"
  echo "$sock"
}

cmd_import() {
  [ $# -ge 1 ] || usage
  local sock t
  sock="$(node_socket)"
  for t in "$@"; do
    [ -f "$t" ] || die "image archive '${t}' not found"
    "$CONTAINERD_BIN/ctr" --address "$sock" --namespace k8s.io images import --no-unpack=false "$t" >/dev/null ||
      die "importing ${t} into containerd failed"
    log "imported $(basename "$t")"
  done
}

cmd_base() {
  local pause="${K8S_BIN}/pause" tmp
  [ -x "$pause" ] || die "no pause binary in ${K8S_BIN}; run hack/build-k8s.sh"
  [ -x "$ENVOY_BIN" ] || die "no Envoy at ${ENVOY_BIN}; run make deps"
  need_cmd busybox busybox-static
  cmd_build "$PAUSE_REF" "$pause" --as /pause
  # busybox: the tools a client pod needs (sh, wget, nc, ...), as symlinks.
  tmp="$(mktemp -d)"
  cp "$(command -v busybox)" "$tmp/busybox"
  cmd_build "$BUSYBOX_REF" "$tmp/busybox" --as /bin/busybox --busybox-applets --entrypoint /bin/sh
  rm -rf "$tmp"
  # Envoy verifies the upstreams it originates TLS to against the system CAs,
  # as in the official images.
  [ -f /etc/ssl/certs/ca-certificates.crt ] || die "no /etc/ssl/certs/ca-certificates.crt; run make deps"
  cmd_build "$ENVOY_REF" "$ENVOY_BIN" --as /usr/local/bin/envoy \
    --add /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt
}

# sidecar_extras DIR: the --add-bin options that put the egress init step
# (DIR's mandate-egress-init, and Debian's nft with its libraries) into a
# sidecar image.
sidecar_extras() {
  [ -x /usr/sbin/nft ] || die "no /usr/sbin/nft (Debian's nftables); run make deps"
  [ -x "$1/mandate-egress-init" ] || die "no $1/mandate-egress-init; build it first"
  echo --add-bin "$1/mandate-egress-init:/usr/local/bin/mandate-egress-init" --add-bin /usr/sbin/nft:/usr/sbin/nft
}

# sidecar REF DIR: a sidecar image from DIR's mandate-sidecar (a debug
# build, for tests), with the egress init step and the system CAs (which the
# sidecar publishes to the agent beside the pod's interception CA).
cmd_sidecar() {
  [ $# -eq 2 ] || usage
  [ -f /etc/ssl/certs/ca-certificates.crt ] || die "no /etc/ssl/certs/ca-certificates.crt; run make deps"
  # shellcheck disable=SC2046 # the options are words
  cmd_build "$1" "$2/mandate-sidecar" --user 15999:15999 \
    --add /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt $(sidecar_extras "$2")
}

# Mandate's images, built as images/Dockerfile builds them: the release
# binaries, static (musl), user 65532 (the chart and the injector run as
# that user), on a base with CA certificates. The test agent image too.
MUSL_TARGET="x86_64-unknown-linux-musl"
cmd_mandate() {
  local version target_args=() out b static=1
  version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "${MANDATE_ROOT}/Cargo.toml" | head -n1)"
  [ -n "$version" ] || die "no workspace version in Cargo.toml"
  if command -v musl-gcc >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | has "^${MUSL_TARGET}\$"; then
    target_args=(--target "$MUSL_TARGET")
    out="${MANDATE_ROOT}/target/${MUSL_TARGET}/release"
    log "building static release binaries (${MUSL_TARGET})"
  else
    # Without the musl target (rustup could not fetch it): glibc binaries,
    # packed with the libraries ldd names. Same code, not static.
    static=0
    out="${MANDATE_ROOT}/target/release"
    log "warning: no ${MUSL_TARGET} target or musl-gcc; building glibc release binaries (images carry their libraries)"
  fi
  # The sidecar is built on its own, so its features are resolved for it
  # alone: built beside the operator, the shared mandate-api crate would be
  # compiled with the operator's `kube` feature.
  (cd "$MANDATE_ROOT" && cargo build --release --locked --quiet "${target_args[@]}" -p mandate-sidecar) ||
    die "the release build of the sidecar failed"
  (cd "$MANDATE_ROOT" && cargo build --release --locked --quiet "${target_args[@]}" \
    -p mandate-operator -p mandate-cli -p mandate-e2e \
    --bin mandate-operator --bin mandate --bin mandate-testbin) || die "the release build failed"
  if ((static)); then
    for b in mandate-operator mandate-sidecar mandate-egress-init mandate mandate-testbin; do
      file -b "$out/$b" | has 'static' || die "$out/$b is not statically linked"
    done
  fi
  local certs=/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt
  cmd_build "mandate.local/operator:${version}" "$out/mandate-operator" --user 65532:65532 --add "$certs"
  # The CLI beside the sidecar, from the same build (copied with its libraries
  # when dynamic: both binaries need the same ones).
  # shellcheck disable=SC2046 # the options are words
  cmd_build "mandate.local/sidecar:${version}" "$out/mandate-sidecar" --user 15999:15999 --add "$certs" \
    --add "$out/mandate:/usr/local/bin/mandate" $(sidecar_extras "$out")
  cmd_build "mandate.local/testbin:${version}" "$out/mandate-testbin" --user 65532:65532
}

case "${1:-}" in
  mandate) shift; cmd_mandate "$@" ;;
  build) shift; cmd_build "$@" ;;
  sidecar) shift; cmd_sidecar "$@" ;;
  import) shift; cmd_import "$@" ;;
  base) shift; cmd_base "$@" ;;
  *) usage ;;
esac
