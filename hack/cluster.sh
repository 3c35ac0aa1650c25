#!/usr/bin/env bash
# A real, current Kubernetes on this machine, for tests (the version is
# K8S_VERSION in hack/lib.sh; hack/build-k8s.sh builds it). Two shapes:
#
#   hack/cluster.sh up            control plane: etcd + kube-apiserver on 127.0.0.1
#                                 (~2 s; for operator and webhook tests; no root needed)
#   hack/cluster.sh up --node     a node where pods really run: the control plane on a
#                                 private address (10.200.0.1, on a bridge with no ports)
#                                 plus scheduler, controller-manager, containerd, kubelet,
#                                 kube-proxy and a CNI bridge (~20 s; root)
#   hack/cluster.sh down          stop everything and undo every change (idempotent)
#   hack/cluster.sh status        say what runs
#   hack/cluster.sh env           print `export KUBECONFIG=... PATH=...` for a shell:
#                                 eval "$(hack/cluster.sh env)"; kubectl get nodes
#
# State, logs and the admin kubeconfig live in $MANDATE_CLUSTER_DIR
# (default /var/tmp/mandate-cluster). Nothing listens beyond this machine:
# servers bind to 127.0.0.1 or to 10.200.0.1, which exists only on the
# mandate0 bridge; guard rules drop anything for the cluster's ranges, and the
# cloud metadata range, that would leave by a real interface.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

# Addresses and ranges of the node shape (TESTING.md: "In-cluster operator...").
NODE_IP="10.200.0.1"
HOST_RANGE="10.200.0.0/24"
SERVICE_CIDR="10.0.0.0/24"
SERVICE_IP="10.0.0.1"
POD_CIDR="10.244.0.0/16"
POD_SUBNET="10.244.0.0/24"
HOST_BRIDGE="mandate0"
CNI_BRIDGE="mandatecni0"
METADATA_RANGE="169.254.0.0/16"
GUARD_OUT="MANDATE-GUARD-OUT"
GUARD_FWD="MANDATE-GUARD-FWD"
NODE_NAME="localhost"

APISERVER_PORT_NODE=6443
KUBELET_PORT=10250

# Directories the node writes outside CLUSTER_DIR. KUBELET_ROOT is ours alone
# and always removed. The shared ones are fixed by kubelet (pod logs, device
# plugins), libcni (its cache), containerd's shims (sockets in
# /run/containerd/s) and the CRI plugin (network namespaces): at teardown,
# what the node added to them is removed, and they are removed if it made them.
KUBELET_ROOT="/var/lib/mandate-kubelet"
SHARED_DIRS=(/var/log/pods /var/log/containers /var/lib/cni /run/containerd /var/lib/kubelet /run/netns)


PIDS="$CLUSTER_DIR/pids"
LOGS="$CLUSTER_DIR/logs"
PKI="$CLUSTER_DIR/pki"
CTRD_DIR="$CLUSTER_DIR/containerd"
CTRD_SOCK="$CTRD_DIR/containerd.sock"

usage() {
  awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2
  exit 2
}

# ---------------------------------------------------------------- processes

# start NAME CMD...: run CMD detached, in its own session, logging to
# $LOGS/NAME.log, and remember its pid and start time (so a reused pid is
# never mistaken for it).
start() {
  local name="$1" pid
  shift
  mkdir -p "$PIDS" "$LOGS"
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null 9>&- & # fd 9 is the lock
  pid=$!
  echo "$pid $(starttime "$pid")" >"$PIDS/$name.pid"
}

# starttime PID: field 22 of /proc/PID/stat (after the command name, which may
# hold spaces), or nothing.
starttime() {
  sed -n 's/^.*) //p' "/proc/$1/stat" 2>/dev/null | awk '{print $20}'
}

# ours NAME: the pid recorded for NAME, if that very process still runs
# (same start time, not a zombie).
ours() {
  local pid st
  [ -f "$PIDS/$1.pid" ] || return 1
  read -r pid st <"$PIDS/$1.pid" || return 1
  [ -n "$pid" ] && [ -n "$st" ] && [ "$(starttime "$pid")" = "$st" ] || return 1
  [ "$(sed -n 's/^.*) //p' "/proc/$pid/stat" 2>/dev/null | awk '{print $1}')" != Z ] || return 1
  echo "$pid"
}

alive() { ours "$1" >/dev/null; }

# stop NAME: TERM, then KILL after 10 s, the whole process group.
stop() {
  local name="$1" pid
  if pid="$(ours "$name")"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while alive "$name" && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDS/$name.pid"
}

# fail_start WHAT LOGNAME: report a component that did not come up, with the
# end of its log, and exit non-zero (cmd_up's EXIT trap tears down).
fail_start() {
  log "$1 did not start; last lines of $LOGS/$2.log:"
  tail -n 25 "$LOGS/$2.log" >&2 || true
  die "$1 did not start (see above)"
}

# EXIT trap while starting: never leave half a cluster for tests to trust.
up_exit() {
  local rc=$?
  ((rc == 0)) && return 0
  log "start failed; tearing down what was started"
  do_down || log "teardown incomplete; run: hack/cluster.sh down"
  exit "$rc"
}

# ---------------------------------------------------------------- checks

# port_owner PORT: the process listening on PORT, if any.
port_owner() {
  ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:(([^)]*' | head -n1 | sed 's/users:((//'
}

require_free_port() { # PORT WHAT
  if port_in_use "$1"; then
    die "port $1 (for $2) is in use by $(port_owner "$1" || echo 'an unknown process'); stop that process or run: hack/cluster.sh down"
  fi
}

preflight() {
  local node="$1" missing=() c
  local bins=(kube-apiserver kubectl) b
  ((node)) && bins+=(kube-scheduler kube-controller-manager kubelet kube-proxy pause)
  for b in "${bins[@]}"; do
    [ -x "$K8S_BIN/$b" ] || die "no ${b} in ${K8S_BIN}; build the Kubernetes binaries with: hack/build-k8s.sh"
  done
  for c in etcd openssl ss python3; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  if ((node)); then
    for c in runc iptables ip conntrack umoci skopeo busybox sysctl mount; do
      command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    for c in containerd containerd-shim-runc-v2 ctr; do
      [ -x "$CONTAINERD_BIN/$c" ] || missing+=("$CONTAINERD_BIN/$c (hack/build-containerd.sh)")
    done
    [ -x /usr/lib/cni/bridge ] || missing+=("/usr/lib/cni/bridge (containernetworking-plugins)")
  fi
  ((${#missing[@]} == 0)) || die "missing: ${missing[*]}; install them with: make deps"
  if ((node)); then
    require_root "hack/cluster.sh up --node"
    ensure_kernel_modules
  fi
}

# leftovers: print what an earlier run left behind (nothing if clean).
leftovers() {
  [ -d "$CLUSTER_DIR" ] && echo "state directory $CLUSTER_DIR"
  local n
  for n in "$PIDS"/*.pid; do
    [ -f "$n" ] && alive "$(basename "$n" .pid)" && echo "process $(basename "$n" .pid)"
  done
  ip link show "$HOST_BRIDGE" >/dev/null 2>&1 && echo "interface $HOST_BRIDGE"
  ip link show "$CNI_BRIDGE" >/dev/null 2>&1 && echo "interface $CNI_BRIDGE"
  if command -v iptables >/dev/null 2>&1; then
    iptables -S "$GUARD_OUT" >/dev/null 2>&1 && echo "iptables chain $GUARD_OUT"
    iptables -S "$GUARD_FWD" >/dev/null 2>&1 && echo "iptables chain $GUARD_FWD"
  fi
  [ -e "$KUBELET_ROOT" ] && echo "directory $KUBELET_ROOT"
  our_mounts | sed 's/^/mount /'
  pgrep -f "containerd-shim-runc-v2 .*-address $(re "$CTRD_SOCK")" >/dev/null 2>&1 && echo "containerd shims"
  return 0
}

# our_mounts: mount points under the directories the node owns, deepest first.
our_mounts() {
  awk '{print $5}' /proc/self/mountinfo |
    grep -E "^($(re "$KUBELET_ROOT")|$(re "$CLUSTER_DIR"))(/|$)" |
    awk '{print length, $0}' | sort -rn | cut -d' ' -f2-
}

# ---------------------------------------------------------------- PKI

# make_pki MODE: a CA, the apiserver's serving certificate and the
# service-account signing key. Admin and components authenticate with tokens.
make_pki() {
  local node="$1"
  mkdir -p "$PKI"
  local sans="IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  ((node)) && sans="IP:${NODE_IP},IP:${SERVICE_IP},${sans}"
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$sans" >"$PKI/apiserver.ext"
  ossl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 30 \
    -subj "/CN=mandate-test-ca"
  ossl req -newkey rsa:2048 -nodes -keyout "$PKI/apiserver.key" -out "$PKI/apiserver.csr" \
    -subj "/CN=kube-apiserver"
  ossl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -out "$PKI/apiserver.crt" -days 30 -extfile "$PKI/apiserver.ext"
  ossl genrsa -out "$PKI/sa.key" 2048
  ossl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"
  # token,user,uid,"group1,group2"
  local entry t
  : >"$PKI/tokens.csv"
  chmod 600 "$PKI/tokens.csv" "$PKI"/*.key
  for entry in 'admin,admin,"system:masters"' \
    system:kube-scheduler,kube-scheduler \
    system:kube-controller-manager,kube-controller-manager \
    system:kube-proxy,kube-proxy \
    "system:node:${NODE_NAME},kubelet,\"system:nodes\""; do
    t="$(token)"
    echo "${t},${entry}" >>"$PKI/tokens.csv"
  done
}

# ossl ARGS...: openssl, failing loudly with its own message.
ossl() {
  openssl "$@" >/dev/null 2>"$PKI/openssl.err" || die "openssl $1 failed: $(cat "$PKI/openssl.err")"
}

token() {
  local t
  t="$(openssl rand -hex 24)" && [ ${#t} -eq 48 ] || die "openssl rand failed"
  echo "$t"
}

# kubeconfig USER FILE SERVER: a kubeconfig for USER's token from tokens.csv.
kubeconfig() {
  local user="$1" file="$2" server="$3" tok
  tok="$(awk -F, -v u="$user" '$2 == u {print $1}' "$PKI/tokens.csv")"
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mandate-test
  cluster:
    server: ${server}
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: ${user}
  user:
    token: ${tok}
contexts:
- name: mandate-test
  context: {cluster: mandate-test, user: "${user}"}
current-context: mandate-test
EOF
  chmod 600 "$file"
}

# ---------------------------------------------------------------- control plane

start_control_plane() {
  local node="$1" bind port etcd_port
  read -r etcd_port port <<<"$(free_port 2)"
  if ((node)); then
    bind="$NODE_IP"
    port="$APISERVER_PORT_NODE"
  else
    bind="127.0.0.1"
  fi
  local server="https://${bind}:${port}"

  start etcd etcd --name mandate-test --data-dir "$CLUSTER_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:${etcd_port}" \
    --advertise-client-urls "http://127.0.0.1:${etcd_port}" \
    --listen-peer-urls "http://127.0.0.1:0" \
    --initial-advertise-peer-urls "http://127.0.0.1:2380" \
    --initial-cluster "mandate-test=http://127.0.0.1:2380" \
    --unsafe-no-fsync --log-level warn
  wait_for "etcd" 20 curl -sf "http://127.0.0.1:${etcd_port}/health" || fail_start etcd etcd

  local args=(
    --etcd-servers "http://127.0.0.1:${etcd_port}"
    --bind-address "$bind" --secure-port "$port"
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key"
    --client-ca-file "$PKI/ca.crt"
    --token-auth-file "$PKI/tokens.csv"
    --service-account-issuer "https://kubernetes.default.svc.cluster.local"
    --service-account-key-file "$PKI/sa.pub"
    --service-account-signing-key-file "$PKI/sa.key"
    --api-audiences "https://kubernetes.default.svc.cluster.local"
    --service-cluster-ip-range "$SERVICE_CIDR"
    --allow-privileged=true
    --profiling=false
    --v=1
  )
  if ((node)); then
    # The node is named localhost but kubelet listens on NODE_IP.
    # shellcheck disable=SC2054 # "Node,RBAC" is one flag value
    args+=(--advertise-address "$NODE_IP" --authorization-mode "Node,RBAC"
      --kubelet-preferred-address-types InternalIP,Hostname
      --enable-admission-plugins NodeRestriction)
  else
    # No controller-manager makes ServiceAccounts and no kubelet runs pods:
    # the ServiceAccount admission plugin would reject every pod.
    args+=(--advertise-address 127.0.0.1 --authorization-mode RBAC
      --disable-admission-plugins ServiceAccount --endpoint-reconciler-type none)
  fi
  start kube-apiserver "$K8S_BIN/kube-apiserver" "${args[@]}"

  kubeconfig admin "$CLUSTER_DIR/kubeconfig" "$server"
  wait_for "kube-apiserver /readyz" 60 "$K8S_BIN/kubectl" --kubeconfig "$CLUSTER_DIR/kubeconfig" \
    get --raw /readyz || fail_start kube-apiserver kube-apiserver
  SERVER="$server"
}

# ---------------------------------------------------------------- node

# save_host_state: the sysctls' values, and what the shared directories hold,
# before the node changes either.
save_host_state() {
  local f="$CLUSTER_DIR/sysctl.saved" k v d list
  [ -f "$f" ] && return 0 # a crashed run's file holds the true originals
  : >"$f.tmp"
  for k in "${SYSCTLS[@]}"; do
    v="$(sysctl -n "$k" 2>/dev/null)" && printf '%s=%s\n' "$k" "$v" >>"$f.tmp"
  done
  mkdir -p "$CLUSTER_DIR/shared"
  for d in "${SHARED_DIRS[@]}"; do
    list="$CLUSTER_DIR/shared/$(echo "$d" | tr / _)"
    if [ -e "$d" ]; then
      find "$d" -mindepth 1 2>/dev/null | sort >"$list"
    else
      echo "<absent>" >"$list"
    fi
  done
  mv "$f.tmp" "$f"
}

# restore_host_state: remove what the node added to the shared directories
# (or the directories it created), then put the sysctls back.
restore_host_state() {
  local f="$CLUSTER_DIR/sysctl.saved" line d list e
  for d in "${SHARED_DIRS[@]}"; do
    list="$CLUSTER_DIR/shared/$(echo "$d" | tr / _)"
    [ -f "$list" ] && [ -e "$d" ] || continue
    if [ "$(cat "$list")" = "<absent>" ]; then
      find "$d" -mindepth 1 -depth 2>/dev/null | while IFS= read -r e; do umount -l "$e" 2>/dev/null; done || true
      rm -rf "$d" || log "could not remove $d"
    else
      find "$d" -mindepth 1 2>/dev/null | sort | comm -13 "$list" - | sort -r |
        while IFS= read -r e; do
          umount -l "$e" 2>/dev/null || true # network namespaces are bind mounts
          rm -rf "$e" || log "could not remove $e"
        done || true
    fi
  done
  rm -rf "$CLUSTER_DIR/shared"
  if [ -f "$f" ]; then
    while IFS= read -r line; do
      sysctl -q -w "$line" >/dev/null 2>&1 || log "could not restore sysctl $line"
    done <"$f"
    rm -f "$f"
  fi
}

# The private address the apiserver and kubelet use, on a bridge with no ports,
# routes that keep the cluster's ranges on it, and guard rules.
setup_host_network() {
  local uplinks
  ip link add "$HOST_BRIDGE" type bridge
  ip link set "$HOST_BRIDGE" addrgenmode none 2>/dev/null || true
  ip addr add "${NODE_IP}/32" dev "$HOST_BRIDGE"
  ip link set "$HOST_BRIDGE" up
  ip route add "$SERVICE_CIDR" dev "$HOST_BRIDGE"
  ip route add "$HOST_RANGE" dev "$HOST_BRIDGE"
  ip route add "$POD_CIDR" dev "$HOST_BRIDGE" metric 1000

  # Guards: nothing for the cluster's ranges or the metadata range leaves by a
  # real interface, and nothing is forwarded out of one.
  iptables -N "$GUARD_OUT"
  iptables -N "$GUARD_FWD"
  iptables -A "$GUARD_OUT" -d "$METADATA_RANGE" -j DROP
  uplinks="$(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 |
    grep -vE "^(lo|${HOST_BRIDGE}|${CNI_BRIDGE}|veth.*|cni.*)$" || true)"
  local dev r
  for dev in $uplinks; do
    for r in "$SERVICE_CIDR" "$HOST_RANGE" "$POD_CIDR"; do
      iptables -A "$GUARD_OUT" -o "$dev" -d "$r" -j DROP
    done
    iptables -A "$GUARD_FWD" -o "$dev" -j DROP
  done
  iptables -I OUTPUT 1 -j "$GUARD_OUT"
  iptables -I FORWARD 1 -j "$GUARD_FWD"
}

teardown_host_network() {
  while iptables -D OUTPUT -j "$GUARD_OUT" 2>/dev/null; do :; done
  while iptables -D FORWARD -j "$GUARD_FWD" 2>/dev/null; do :; done
  iptables -F "$GUARD_OUT" 2>/dev/null || true
  iptables -X "$GUARD_OUT" 2>/dev/null || true
  iptables -F "$GUARD_FWD" 2>/dev/null || true
  iptables -X "$GUARD_FWD" 2>/dev/null || true
  ip link del "$HOST_BRIDGE" 2>/dev/null || true # takes its address and routes with it
  ip link del "$CNI_BRIDGE" 2>/dev/null || true
}

write_containerd_config() {
  mkdir -p "$CTRD_DIR" "$CLUSTER_DIR/cni/net.d"
  cat >"$CTRD_DIR/config.toml" <<EOF
version = 2
root = "$CTRD_DIR/root"
state = "$CTRD_DIR/state"
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = "$CTRD_DIR/containerd.sock.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "mandate.local/pause:3.2"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$CTRD_DIR/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CLUSTER_DIR/cni/net.d"
EOF
  # Pods get the cluster's ranges through the bridge's gateway and no default
  # route: their traffic cannot leave this machine.
  cat >"$CLUSTER_DIR/cni/net.d/10-mandate.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "mandate",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "${CNI_BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$CLUSTER_DIR/cni/ipam",
        "ranges": [[{"subnet": "${POD_SUBNET}"}]],
        "routes": [{"dst": "${HOST_RANGE}"}, {"dst": "${SERVICE_CIDR}"}, {"dst": "${POD_CIDR}"}]
      }
    }
  ]
}
EOF
}

write_kubelet_config() {
  : >"$CLUSTER_DIR/resolv.conf" # no cluster DNS, and no way out
  cat >"$CLUSTER_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: ${NODE_IP}
port: ${KUBELET_PORT}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://${CTRD_SOCK}
cgroupDriver: cgroupfs
# This machine has cgroup v1 only; kubelet 1.35 refuses it unless told (KEP-5573).
failCgroupV1: false
failSwapOn: false
makeIPTablesUtilChains: false
resolvConf: $CLUSTER_DIR/resolv.conf
staticPodPath: ""
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
}

write_proxy_config() {
  cat >"$CLUSTER_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: ${POD_CIDR}
# NodePorts only on the private address: nothing arriving by a real interface
# is forwarded to a pod.
nodePortAddresses: ["${NODE_IP}/32"]
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clientConnection: {kubeconfig: $CLUSTER_DIR/kube-proxy.kubeconfig}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# controllers: every controller but those a single test node has no use for
# (pod CIDRs are static; no cloud), among the ones this release knows (1.37
# moved the cloud controllers out of kube-controller-manager).
controllers() {
  local known c list="*"
  known="$("$K8S_BIN/kube-controller-manager" --help 2>&1 | sed -n 's/.*All controllers: \(.*\)$/\1/p' | tr -d ' ' | tr ',' '\n')"
  [ -n "$known" ] || die "kube-controller-manager --help lists no controllers (has its help text changed?)"
  for c in node-ipam-controller cloud-node-lifecycle-controller node-route-controller service-lb-controller; do
    grep -qx "$c" <<<"$known" && list+=",-$c"
  done
  echo "$list"
}

start_node() {
  local server="$1"
  sysctl -q -w net.bridge.bridge-nf-call-iptables=1 >/dev/null 2>&1 || true
  mkdir -p "$KUBELET_ROOT"

  write_containerd_config
  # containerd finds its shim on PATH.
  start containerd env PATH="$CONTAINERD_BIN:$PATH" "$CONTAINERD_BIN/containerd" --config "$CTRD_DIR/config.toml"
  wait_for "containerd" 20 "$CONTAINERD_BIN/ctr" --address "$CTRD_SOCK" version || fail_start containerd containerd
  # Base images from the cache (built once per machine).
  local imgs
  imgs="$("$MANDATE_ROOT/hack/image.sh" base)" || fail_start "base images" containerd
  # shellcheck disable=SC2086
  "$MANDATE_ROOT/hack/image.sh" import $imgs || fail_start "image import" containerd

  kubeconfig system:kube-scheduler "$CLUSTER_DIR/scheduler.kubeconfig" "$server"
  kubeconfig system:kube-controller-manager "$CLUSTER_DIR/controller-manager.kubeconfig" "$server"
  kubeconfig system:kube-proxy "$CLUSTER_DIR/kube-proxy.kubeconfig" "$server"
  kubeconfig "system:node:${NODE_NAME}" "$CLUSTER_DIR/kubelet.kubeconfig" "$server"

  start kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" \
    --secure-port 0 --leader-elect=false --v=1
  start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" \
    --secure-port 0 --leader-elect=false \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-cidr "$POD_CIDR" --service-cluster-ip-range "$SERVICE_CIDR" \
    --controllers "$(controllers)" --v=1

  write_kubelet_config
  # Pod networking is containerd's CNI plugin's (the config above).
  start kubelet "$K8S_BIN/kubelet" \
    --config "$CLUSTER_DIR/kubelet.yaml" \
    --kubeconfig "$CLUSTER_DIR/kubelet.kubeconfig" \
    --root-dir "$KUBELET_ROOT" --cert-dir "$CLUSTER_DIR/kubelet-pki" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" \
    --v=1

  write_proxy_config
  start kube-proxy "$K8S_BIN/kube-proxy" --config "$CLUSTER_DIR/kube-proxy.yaml" \
    --hostname-override "$NODE_NAME" --v=1

  local k=("$K8S_BIN/kubectl" --kubeconfig "$CLUSTER_DIR/kubeconfig")
  wait_for "node ${NODE_NAME} Ready" 90 node_ready || fail_start "kubelet (node never became Ready)" kubelet
  alive kube-scheduler || fail_start kube-scheduler kube-scheduler
  alive kube-controller-manager || fail_start kube-controller-manager kube-controller-manager
  alive kube-proxy || fail_start kube-proxy kube-proxy
  wait_for "the default ServiceAccount" 60 "${k[@]}" -n default get serviceaccount default ||
    fail_start "kube-controller-manager (no default ServiceAccount)" kube-controller-manager
  wait_for "kube-proxy's service rules" 30 iptables -t nat -S KUBE-SERVICES ||
    fail_start "kube-proxy (no KUBE-SERVICES chain)" kube-proxy
}

node_ready() {
  [ "$("$K8S_BIN/kubectl" --kubeconfig "$CLUSTER_DIR/kubeconfig" get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = "True" ]
}

# ---------------------------------------------------------------- teardown

kill_pods() {
  # Everything kubelet started lives under the kubepods cgroups.
  local cg pid
  for cg in /sys/fs/cgroup/*/kubepods; do
    [ -d "$cg" ] || continue
    find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u | while read -r pid; do
      kill -KILL "$pid" 2>/dev/null || true
    done || true
  done
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $(re "$CTRD_SOCK")" 2>/dev/null || true
}

remove_kubepods_cgroups() {
  local cg
  for cg in /sys/fs/cgroup/*/kubepods; do
    [ -d "$cg" ] || continue
    # children first
    find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}

flush_kube_iptables() {
  local table chain
  for table in filter nat mangle; do
    # unlink from built-in chains first, then flush and delete
    iptables -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' | sed 's/^-A/-D/' |
      while read -r rule; do
        # shellcheck disable=SC2086
        eval iptables -t "$table" $rule 2>/dev/null || true
      done || true
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
      iptables -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
      iptables -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
}

# try CMD...: a teardown step; a failure is reported, and teardown goes on.
try() { "$@" || log "teardown step failed: $*"; }

do_down() {
  if [ ! -d "$CLUSTER_DIR" ]; then
    # The fixed-name host resources are this script's whatever became of the
    # state directory; anything else without state is not provably ours.
    if [ -n "$(leftovers)" ]; then
      require_root "hack/cluster.sh down"
      log "no state in $CLUSTER_DIR, but these remain; removing them:"
      leftovers | sed 's/^/  /' >&2
      try teardown_host_network
      try rm -rf "$KUBELET_ROOT"
    else
      log "no cluster state in $CLUSTER_DIR; nothing to do"
    fi
    return 0
  fi
  local mode="" node=0
  [ -f "$CLUSTER_DIR/cluster.env" ] && mode="$(sed -n 's/^MANDATE_CLUSTER_MODE=//p' "$CLUSTER_DIR/cluster.env")"
  if [ "$mode" = "node" ] || [ -d "$CTRD_DIR" ] || [ -f "$CLUSTER_DIR/sysctl.saved" ]; then node=1; fi
  if ((node)); then
    require_root "hack/cluster.sh down (for a node)"
    try stop kube-proxy
    try stop kubelet
    try kill_pods
    try stop kube-controller-manager
    try stop kube-scheduler
    try stop containerd
  fi
  try stop kube-apiserver
  try stop etcd
  # any process of this cluster whose pid file was lost: all of them name
  # files in the cluster dir on their command lines
  pkill -KILL -f -- "$(re "$CLUSTER_DIR")/" 2>/dev/null || true
  if ((node)); then
    local m
    for m in $(our_mounts); do umount -l "$m" 2>/dev/null || log "could not unmount $m"; done
    try remove_kubepods_cgroups
    try flush_kube_iptables
    conntrack -D -d "$SERVICE_CIDR" >/dev/null 2>&1 || true
    try teardown_host_network
    try restore_host_state
    try rm -rf "$KUBELET_ROOT"
  fi
  local left
  left="$(leftovers | grep -v "^state directory" || true)"
  if [ -n "$left" ]; then
    log "teardown left these behind (state kept in $CLUSTER_DIR so a rerun can retry):"
    echo "$left" >&2
    return 1
  fi
  rm -rf "$CLUSTER_DIR"
  log "cluster down"
}

# ---------------------------------------------------------------- commands

cmd_up() {
  local node=0
  case "${1:-}" in
    --node) node=1 ;;
    "" | --control-plane) ;;
    *) die "unknown option '$1' (use --node for a node, nothing for the control plane)" ;;
  esac
  if [ -f "$CLUSTER_DIR/cluster.env" ] && alive kube-apiserver; then
    die "a test cluster is already up ($(sed -n 's/^MANDATE_CLUSTER_MODE=//p' "$CLUSTER_DIR/cluster.env"), kubeconfig $CLUSTER_DIR/kubeconfig); run hack/cluster.sh down first"
  fi
  preflight "$node"

  local left
  left="$(leftovers)"
  if [ -n "$left" ]; then
    log "an earlier run left these behind; cleaning up:"
    echo "$left" | sed 's/^/  /' >&2
    do_down || die "could not clean up after the earlier run; see above, fix by hand, then retry"
  fi
  if ((node)); then
    require_root "hack/cluster.sh up --node"
    if iptables -t nat -S 2>/dev/null | has '^-N KUBE-'; then
      die "iptables has KUBE-* chains that this script did not make (another Kubernetes on this machine?); refusing to start"
    fi
    if compgen -G "/sys/fs/cgroup/*/kubepods" >/dev/null; then
      die "kubepods cgroups exist that this script did not make (another kubelet on this machine?); refusing to start"
    fi
    if ip route show | has "^(10\.0\.0\.|10\.200\.0\.|10\.244\.)"; then
      die "this machine already routes part of ${SERVICE_CIDR}, ${HOST_RANGE} or ${POD_CIDR}; the node needs them to itself"
    fi
    local p
    for p in "$APISERVER_PORT_NODE" "$KUBELET_PORT" 10248 10249 10256; do
      require_free_port "$p" "the node"
    done
  fi

  local t0=$SECONDS
  # From here on, any failure or Ctrl-C tears down what was started.
  trap up_exit EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$CLUSTER_DIR"
  chmod 700 "$CLUSTER_DIR"
  # Mark the mode first, so a crash from here on is cleaned up as what it was.
  echo "MANDATE_CLUSTER_MODE=$( ((node)) && echo node || echo control-plane)" >"$CLUSTER_DIR/cluster.env"
  make_pki "$node"
  if ((node)); then
    save_host_state
    setup_host_network
  fi
  start_control_plane "$node"
  local server="$SERVER"
  if ((node)); then start_node "$server"; fi

  cat >"$CLUSTER_DIR/cluster.env" <<EOF
MANDATE_CLUSTER_MODE=$( ((node)) && echo node || echo control-plane)
MANDATE_KUBECONFIG=$CLUSTER_DIR/kubeconfig
MANDATE_KUBECTL=$K8S_BIN/kubectl
MANDATE_APISERVER=$server
MANDATE_CONTAINERD_SOCK=$( ((node)) && echo "$CTRD_SOCK")
MANDATE_CTR=$( ((node)) && echo "$CONTAINERD_BIN/ctr")
MANDATE_NODE_NAME=$( ((node)) && echo "$NODE_NAME")
MANDATE_K8S_VERSION=$K8S_VERSION
EOF
  trap - EXIT INT TERM
  log "$( ((node)) && echo node || echo 'control plane') up in $((SECONDS - t0))s at ${server}"
  log "kubeconfig: $CLUSTER_DIR/kubeconfig   (eval \"\$(hack/cluster.sh env)\")"
}

cmd_status() {
  if [ ! -f "$CLUSTER_DIR/cluster.env" ]; then
    echo "no test cluster (state dir $CLUSTER_DIR absent)"
    return 1
  fi
  cat "$CLUSTER_DIR/cluster.env"
  local n rc=0
  for n in "$PIDS"/*.pid; do
    [ -f "$n" ] || continue
    n="$(basename "$n" .pid)"
    if alive "$n"; then echo "running: $n"; else echo "DEAD:    $n (log: $LOGS/$n.log)"; rc=1; fi
  done
  return $rc
}

# lock: one up or down at a time for this cluster dir (a second up's
# leftover cleanup would otherwise kill the first's processes).
lock() {
  exec 9>"${CLUSTER_DIR}.lock"
  flock -n 9 || die "another hack/cluster.sh up or down is running for ${CLUSTER_DIR}; wait for it to finish"
}

case "${1:-}" in
  up) shift; lock; cmd_up "$@" ;;
  down) lock; do_down ;;
  status) cmd_status ;;
  env)
    echo "export KUBECONFIG=$CLUSTER_DIR/kubeconfig"
    echo "export PATH=$K8S_BIN:\$PATH # kubectl ${K8S_VERSION}"
    ;;
  *) usage ;;
esac
