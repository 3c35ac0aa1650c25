#!/usr/bin/env bash
# Transparent egress against the HTTP_PROXY path (issue 15), in one run:
# the latency the redirect adds, with Mandate deciding and with Envoy alone.
#
#   hack/bench-transparent.sh BIN_DIR SIDECAR     (root; hack/bench.sh runs it)
#   MANDATE_BENCH_T_ROUNDS=N MANDATE_BENCH_T_SECONDS=S  (default 3 rounds of 10 s per configuration)
#
# Two network namespaces stand for two agent pods, as sidecar/tests/transparent.rs
# builds one: each with the real egress rules (mandate-egress-init) and the
# injected Envoy bootstrap (mandate-bench bootstrap, the operator's code),
# Envoy and the sidecar as UID 15999. Pod "m" runs Envoy + Mandate; pod "b"
# the same bootstrap with every ext_authz filter removed (Envoy alone). Both
# reach one upstream (mandate-testbin) at 198.51.100.2:8080 over a bridge in a
# third namespace. The load generator (mandate-bench http, open loop) runs as
# the agent, UID 1000, inside the pod, so the rules apply to it:
#   proxy:       GET to Envoy's explicit proxy 127.0.0.1:15001, absolute URI;
#   transparent: GET straight to 198.51.100.2:8080, redirected to :15002;
#   direct:      the same as UID 15999 (exempt from the rules), no Envoy: the floor.
# Each at 1000 requests/s, with a pooled keep-alive connection and with a new
# connection per request; rounds interleaved, medians across rounds.
# Nothing leaves the machine: the namespaces have no route out.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
B="$1" SIDECAR="$2"
ROUNDS="${MANDATE_BENCH_T_ROUNDS:-3}"
ROUND_SECONDS="${MANDATE_BENCH_T_SECONDS:-10}"
[ "$(id -u)" -eq 0 ] || die "the transparent benchmark needs root (network namespaces, nftables)"
for c in ip setpriv nft curl taskset; do need_cmd "$c" "iproute2 util-linux nftables curl"; done

id=$$
NS_UP="mdb-u$id" NS_M="mdb-m$id" NS_B="mdb-b$id"
UP=198.51.100.2
tmp="$(mktemp -d)"
chmod 0755 "$tmp"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for ns in "$NS_M" "$NS_B" "$NS_UP"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# The binaries, where UIDs 1000 and 15999 may run them.
for f in "$B/mandate-bench" "$B/mandate-testbin" "$B/mandate-egress-init" "$SIDECAR" "$ENVOY_BIN"; do
  cp "$f" "$tmp/" || die "cannot copy $f"
done
T="$tmp"
sidecar_bin="$tmp/$(basename "$SIDECAR")"

# The upstream's namespace: a bridge the pods' veths join.
ip netns add "$NS_UP"
ip netns exec "$NS_UP" ip link set lo up
ip netns exec "$NS_UP" ip link add br0 type bridge
ip netns exec "$NS_UP" ip addr add "$UP/24" dev br0
ip netns exec "$NS_UP" ip link set br0 up
n=0
for ns in "$NS_M" "$NS_B"; do
  n=$((n + 1))
  ip netns add "$ns"
  ip link add "mdb$n-$id" type veth peer name "mdb$n-u$id"
  ip link set "mdb$n-$id" netns "$ns"
  ip link set "mdb$n-u$id" netns "$NS_UP"
  ip netns exec "$NS_UP" ip link set "mdb$n-u$id" master br0 up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" ip addr add "198.51.100.$((n * 10))/24" dev "mdb$n-$id"
  ip netns exec "$ns" ip link set "mdb$n-$id" up
  # A new connection per request, 1000/s: let the agent's side reuse TIME_WAIT ports.
  ip netns exec "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1
  mkdir -p "$tmp/$ns"
  chown 15999:15999 "$tmp/$ns"
done

taskset -c 1 ip netns exec "$NS_UP" "$T/mandate-testbin" serve --listen "$UP:8080" --name upstream >"$tmp/upstream.log" 2>&1 &
pids+=($!)

mkdir -p "$tmp/policies"
cat >"$tmp/policies/bench.yaml" <<EOF
apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: bench}
spec:
  modules:
  - name: bench.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := false
      decision if {
        input.attributes.request.http.method == "GET"
        input.parsed_host.name == "$UP"
        input.parsed_host.port == 8080
        input.parsed_path[0] == "v1"
      }
EOF
chmod -R a+rX "$tmp/policies"

# Pod m: the sidecar (one core, one worker, as hack/bench.sh runs it) and Envoy.
taskset -c 0 ip netns exec "$NS_M" setpriv --reuid=15999 --regid=15999 --clear-groups -- \
  "$sidecar_bin" --workers 1 --policy "$tmp/policies" --listen-unix "$tmp/$NS_M/authz.sock" --no-tcp \
  --admin-listen 127.0.0.1:15020 >"$tmp/$NS_M/decisions.log" 2>"$tmp/$NS_M/sidecar.err" &
pids+=($!)
for ns in "$NS_M" "$NS_B"; do
  extra=()
  [ "$ns" = "$NS_B" ] && extra=(--no-authz)
  "$T/mandate-bench" bootstrap --authz-socket "$tmp/$ns/authz.sock" --admin-socket "$tmp/$ns/admin.sock" "${extra[@]}" >"$tmp/$ns/envoy.json"
  # As hack/bench.sh section 3: Envoy on one worker, on the clients' core.
  taskset -c 1 ip netns exec "$ns" setpriv --reuid=15999 --regid=15999 --clear-groups -- \
    "$T/envoy" -c "$tmp/$ns/envoy.json" --concurrency 1 --log-level error --disable-hot-restart \
    --use-dynamic-base-id >"$tmp/$ns/envoy.log" 2>&1 &
  pids+=($!)
done
ok() { [ "$(in_ns "$1" "$2" curl -s -m 2 -o /dev/null -w '%{http_code}' "${@:3}")" = 200 ]; }
wait_for "the upstream" 20 ok "$NS_M" 15999 "http://$UP:8080/v1/search" || die "no upstream: $(cat "$tmp/upstream.log")"
wait_for "the sidecar" 30 ok "$NS_M" 15999 http://127.0.0.1:15020/readyz || die "sidecar: $(cat "$tmp/$NS_M/sidecar.err")"
for ns in "$NS_M" "$NS_B"; do
  wait_for "Envoy in $ns" 30 ok "$ns" 15999 http://127.0.0.1:15021/healthz/ready || die "Envoy: $(tail "$tmp/$ns/envoy.log")"
  ip netns exec "$ns" "$T/mandate-egress-init" | has "egress rules installed" || die "mandate-egress-init failed in $ns"
  # The rules hold: the agent reaches the upstream only through Envoy.
  ok "$ns" 1000 --noproxy '*' "http://$UP:8080/v1/search" || die "the transparent path does not work in $ns"
  ok "$ns" 1000 -x http://127.0.0.1:15001 "http://$UP:8080/v1/search" || die "the proxy path does not work in $ns"
done
ok "$NS_M" 1000 --noproxy '*' "http://$UP:8080/denied" && die "the policy allowed /denied: is Mandate deciding?"
has '"result":"allow"' <"$tmp/$NS_M/decisions.log" || die "no decision logged by the sidecar"

url="http://$UP:8080/v1/search"
# configuration: namespace uid extra-args
declare -A CFG=(
  [m-proxy]="$NS_M 1000 --proxy 127.0.0.1:15001"
  [m-transparent]="$NS_M 1000"
  [b-proxy]="$NS_B 1000 --proxy 127.0.0.1:15001"
  [b-transparent]="$NS_B 1000"
  [direct]="$NS_M 15999"
)
order=(m-proxy m-transparent b-proxy b-transparent direct)
load() { # load CONFIG SECONDS [more args]
  local ns uid rest
  read -r ns uid rest <<<"${CFG[$1]}"
  # shellcheck disable=SC2086 # rest is words on purpose
  taskset -c 1 env -u http_proxy -u HTTP_PROXY ip netns exec "$ns" setpriv --reuid="$uid" --regid="$uid" --clear-groups -- \
    "$T/mandate-bench" http "$url" --rate 1000 --seconds "$2" $rest "${@:3}"
}
for c in "${order[@]}"; do load "$c" 3 >/dev/null || die "warm-up of $c failed"; done
for mode in keepalive new; do
  extra=()
  [ "$mode" = new ] && extra=(--new-connection)
  : >"$tmp/$mode.jsonl"
  for round in $(seq 1 "$ROUNDS"); do
    for c in "${order[@]}"; do
      out="$(load "$c" "$ROUND_SECONDS" "${extra[@]}")" || die "$c failed (round $round, $mode)"
      echo "{\"round\":$round,\"which\":\"$c\",\"r\":$out}" >>"$tmp/$mode.jsonl"
    done
  done
  if [ "$mode" = keepalive ]; then
    echo "one keep-alive connection (pooled), 1000 requests/s:"
  else
    echo "a new connection per request, 1000 requests/s:"
  fi
  python3 "$MANDATE_ROOT/hack/bench_report.py" table "$tmp/$mode.jsonl" direct \
    m-proxy="proxy + Mandate" m-transparent="transparent + Mandate" \
    b-proxy="proxy, Envoy alone" b-transparent="transparent, Envoy alone" direct="direct (no Envoy)" \
    --share "m-transparent-m-proxy=transparent over proxy, Mandate deciding" \
    "b-transparent-b-proxy=the redirect itself (transparent over proxy, Envoy alone)" \
    "m-proxy-b-proxy=Mandate over Envoy alone (proxy)" "m-transparent-b-transparent=Mandate over Envoy alone (transparent)"
done
