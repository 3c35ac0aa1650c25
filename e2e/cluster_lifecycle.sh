#!/usr/bin/env bash
# Lifecycle and fault tests of hack/cluster.sh, on this machine, as root:
#
#   - control plane: up, a second up is refused, down, and again;
#   - a missing Kubernetes build, a missing command and a port in use are each
#     refused before anything changes, with what to do;
#   - node: up with a pod running, a crash (every process killed -9, mounts,
#     iptables rules, bridges and cgroups left behind), up again (cleans the
#     leftovers), down;
#   - after each down, the host is exactly as before: sysctls, iptables rules,
#     links, routes, mounts, directories, processes.
#
# Needs no running cluster; refuses to start when one is up.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/../hack/lib.sh"
require_root "$0"

CLUSTER="$MANDATE_ROOT/hack/cluster.sh"
ETCD_EXE="$(readlink -f "$(command -v etcd)")"
K=("$K8S_BIN/kubectl" --kubeconfig "$CLUSTER_DIR/kubeconfig")
failures=0
tmp="$(mktemp -d)"
listener=""
started=0
cleanup() {
  if [ -n "$listener" ]; then kill "$listener" 2>/dev/null || true; fi
  # A check that stopped this script must not leave its cluster behind.
  if ((started)) && [ -d "$CLUSTER_DIR" ]; then "$CLUSTER" down >/dev/null 2>&1 || log "teardown incomplete: run hack/cluster.sh down"; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

pass() { log "PASS: $*"; }
fail() {
  log "FAIL: $*"
  failures=$((failures + 1))
}

# The host state a cluster may touch, normalized (no counters, no empty tables).
snapshot() (
  set +e +o pipefail # absent things are part of the picture, not errors
  for k in "${SYSCTLS[@]}"; do
    echo "sysctl $k=$(sysctl -n "$k" 2>/dev/null)"
  done
  iptables-save 2>/dev/null | awk '
    /^\*/ {t = substr($0, 2); next}
    /^:(INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) / {next}
    /^:/ {print "iptables " t " chain " $1; next}
    /^-A/ {print "iptables " t " " $0}'
  ip -o link show | awk -F': ' '{print "link " $2}' | sed 's/@.*//'
  ip route show | sed 's/^/route /'
  awk '{print "mount " $5}' /proc/self/mountinfo | sort
  for k in /var/lib/mandate-kubelet /var/log/pods /var/log/containers "$CLUSTER_DIR" /run/netns \
    /var/lib/cni /run/containerd /var/lib/kubelet /etc/cni /opt/cni; do
    [ -e "$k" ] && find "$k" | sort | sed 's/^/path /'
  done
  ls -d /sys/fs/cgroup/*/kubepods 2>/dev/null | sed 's/^/cgroup /'
  node_processes | sed 's/^/pid /'
)

# node_processes: the processes of a node, known by the binary they run (the
# Kubernetes and containerd builds, etcd) rather than by what their command
# line mentions: a `grep containerd` running at that moment is not one.
node_processes() {
  local d exe
  for d in /proc/[0-9]*; do
    exe="$(readlink "$d/exe" 2>/dev/null)" || continue
    case "$exe" in
      "$K8S_BIN"/* | "$CONTAINERD_BIN"/* | "$ETCD_EXE") echo "${d#/proc/} $exe" ;;
    esac
  done
}

expect_clean() { # WHAT
  # A decoy whose command line names the node's programs (as a `grep
  # containerd` would): the snapshot must not count it as the node's.
  sh -c 'sleep 30; : containerd kube-apiserver etcd --name mandate-test' &
  local decoy=$!
  snapshot >"$tmp/after"
  kill "$decoy" 2>/dev/null || true
  wait "$decoy" 2>/dev/null || true
  if diff -u "$tmp/before" "$tmp/after" >"$tmp/diff"; then
    pass "$1: the host is as it was"
  else
    fail "$1: the host changed:"
    cat "$tmp/diff" >&2
  fi
}

# expect_refused WHAT PATTERN CMD...: CMD fails, says PATTERN, changes nothing.
expect_refused() {
  local what="$1" pattern="$2"
  shift 2
  if "$@" >"$tmp/out" 2>&1; then
    fail "$what: succeeded"
    cat "$tmp/out" >&2
    "$CLUSTER" down >/dev/null 2>&1 || true
  elif grep -q -- "$pattern" "$tmp/out"; then
    pass "$what: refused with: $(grep -m1 -- "$pattern" "$tmp/out")"
  else
    fail "$what: failed without saying '$pattern':"
    cat "$tmp/out" >&2
  fi
  expect_clean "$what"
}

node_ready() {
  [ "$("${K[@]}" get node localhost -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}
pod_running() {
  [ "$("${K[@]}" get pod "$1" -o 'jsonpath={.status.phase}' 2>/dev/null)" = Running ]
}

if [ -d "$CLUSTER_DIR" ]; then
  die "a test cluster is up or left behind ($CLUSTER_DIR); these tests start their own: run hack/cluster.sh down first"
fi
ensure_kernel_modules # loading a module is not the cluster's change to undo
snapshot >"$tmp/before"
started=1

# ---- control plane, twice in a row
for round in 1 2; do
  if "$CLUSTER" up >"$tmp/out" 2>&1; then
    v="$("${K[@]}" version -o json 2>/dev/null | grep -o '"gitVersion": *"[^"]*"' | tail -n1)"
    if [[ "$v" == *"\"${K8S_VERSION}\""* ]]; then pass "control plane $round: up, server $v"; else fail "control plane $round: server version '$v'"; fi
    if "$CLUSTER" up >"$tmp/out2" 2>&1; then
      fail "control plane $round: a second up succeeded"
    elif grep -q "already up" "$tmp/out2" && "${K[@]}" get --raw /readyz >/dev/null 2>&1; then
      pass "control plane $round: a second up is refused and the cluster still answers"
    else
      fail "control plane $round: second up: $(cat "$tmp/out2")"
    fi
  else
    fail "control plane $round: up failed"
    cat "$tmp/out" >&2
  fi
  "$CLUSTER" down >/dev/null 2>&1 || fail "control plane $round: down failed"
  expect_clean "control plane $round down"
done

# ---- refused before anything changes
expect_refused "up without the Kubernetes build" "hack/build-k8s.sh" \
  env MANDATE_CACHE="$tmp/empty-cache" "$CLUSTER" up --node

mkdir -p "$tmp/path"
for f in /usr/local/sbin/* /usr/local/bin/* /usr/sbin/* /usr/bin/* /sbin/* /bin/*; do
  [ -e "$tmp/path/$(basename "$f")" ] || ln -s "$f" "$tmp/path/$(basename "$f")" 2>/dev/null || true
done
rm -f "$tmp/path/runc"
expect_refused "up --node without runc" "missing: runc.*make deps" \
  env PATH="$tmp/path" "$CLUSTER" up --node
expect_refused "up --node without the containerd build" "hack/build-containerd.sh" \
  env MANDATE_CACHE="$tmp/empty-cache" MANDATE_K8S_BIN="$K8S_BIN" "$CLUSTER" up --node

python3 -c 'import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", 10248)); s.listen(); time.sleep(600)' &
listener=$!
wait_for "a listener on 10248" 10 port_in_use 10248 || fail "could not start the port squatter"
snapshot >"$tmp/before-port" # the squatter itself is not the cluster's doing
cp "$tmp/before" "$tmp/before.saved"
cp "$tmp/before-port" "$tmp/before"
expect_refused "up --node with port 10248 taken" "port 10248 .*in use by .*python" "$CLUSTER" up --node
kill "$listener" 2>/dev/null || true
wait "$listener" 2>/dev/null || true
listener=""
cp "$tmp/before.saved" "$tmp/before"

# ---- interrupted part-way: what was started is torn down, nothing half-up remains
apiserver_answers() { "${K[@]}" get --raw /readyz; }
"$CLUSTER" up --node >"$tmp/out" 2>&1 &
starter=$!
if wait_for "the apiserver of the starting node" 60 apiserver_answers; then
  kill -TERM "$starter" || true
  wait "$starter" && fail "interrupted up: exited 0" || pass "interrupted up: exited non-zero ($(grep -m1 'tearing down' "$tmp/out"))"
  [ ! -e "$CLUSTER_DIR/cluster.env" ] && pass "interrupted up: no cluster.env left for tests to trust" ||
    fail "interrupted up: cluster.env remains"
else
  fail "interrupted up: the apiserver never answered"
  wait "$starter" || true
  cat "$tmp/out" >&2
fi
expect_clean "interrupted up"

# ---- node: up, crash, up again (cleans up), down
if "$CLUSTER" up --node >"$tmp/out" 2>&1; then
  node_ready && pass "node: up and Ready" || fail "node: up but not Ready"
  "${K[@]}" run sleeper --image=mandate.local/busybox:1 --image-pull-policy=Never --restart=Never \
    --command -- /bin/sleep 3600 >/dev/null || fail "node: kubectl run failed"
  if wait_for "pod sleeper Running" 60 pod_running sleeper; then
    pass "node: a pod runs"
  else
    fail "node: pod sleeper did not run"
  fi

  # Crash: kill -9 every process the cluster started, leave everything else.
  # (pid files hold "PID STARTTIME")
  for p in "$CLUSTER_DIR"/pids/*.pid; do kill -KILL -- "-$(cut -d' ' -f1 "$p")" 2>/dev/null || true; done
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $(re "$CLUSTER_DIR")/" 2>/dev/null || true
  all_dead() {
    local p
    for p in "$CLUSTER_DIR"/pids/*.pid; do
      [ "$(awk '{print $3}' "/proc/$(cut -d' ' -f1 "$p")/stat" 2>/dev/null || echo Z)" = Z ] || return 1
    done
  }
  wait_for "the killed processes to be gone" 20 all_dead || fail "node: processes survived kill -9"
  if "$CLUSTER" up --node >"$tmp/out" 2>&1 && grep -q "earlier run left these behind" "$tmp/out"; then
    pass "node: up after a crash cleaned up: $(grep -A20 'left these behind' "$tmp/out" | grep '^  ' | tr -s ' ' | tr '\n' ';' | cut -c1-200)"
    wait_for "node Ready again" 60 node_ready && pass "node: Ready again after the crash" || fail "node: not Ready after the crash"
  else
    fail "node: up after a crash"
    cat "$tmp/out" >&2
  fi
else
  fail "node: up failed"
  cat "$tmp/out" >&2
fi
"$CLUSTER" down >"$tmp/out" 2>&1 || {
  fail "node: down failed"
  cat "$tmp/out" >&2
}
expect_clean "node down"

if ((failures)); then
  die "${failures} cluster lifecycle check(s) failed"
fi
log "all cluster lifecycle checks passed"
