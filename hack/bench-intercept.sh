#!/usr/bin/env bash
# TLS interception against CONNECT passthrough (issue 16), in one run: what
# deciding inside HTTPS adds, for the first request to a new host (the leaf
# minted on demand included), new connections to a known host, and requests
# on a warm connection.
#
#   hack/bench-intercept.sh BIN_DIR SIDECAR     (root; hack/bench.sh runs it)
#   MANDATE_BENCH_I_ROUNDS=N MANDATE_BENCH_I_REQUESTS=M  (default 3 rounds of 200 requests per case)
#
# One network namespace stands for an agent pod, as hack/bench-transparent.sh
# builds it: the real egress rules (mandate-egress-init), the injected Envoy
# bootstrap (mandate-bench bootstrap, the operator's code) and the sidecar
# serving ext_authz and SDS, both as UID 15999. An HTTPS upstream
# (mandate-bench serve-tls, a CA of its own that Envoy is given) answers at
# 198.51.100.2:443 for every name under bench.test and pass.test; the pod's
# hosts file maps the names there. The client (mandate-bench tls, UID 1000,
# sequential requests, no TLS resumption) connects to 198.51.100.2:443 and
# the rules send it to Envoy's transparent listener:
#   intercept:   h<n>.bench.test, declared (Intercept): Envoy terminates TLS
#                with a leaf from the pod CA and decides each request inside;
#   passthrough: p<n>.pass.test, declared Passthrough: decided on the SNI,
#                the agent's TLS goes through to the upstream untouched.
# Both are decided by the same sidecar and policy. The sidecar's CPU time
# over the "first request" runs gives the CPU per minted leaf.
# Nothing leaves the machine: the namespaces have no route out.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
B="$1" SIDECAR="$2"
ROUNDS="${MANDATE_BENCH_I_ROUNDS:-3}"
REQUESTS="${MANDATE_BENCH_I_REQUESTS:-200}"
[ "$(id -u)" -eq 0 ] || die "the interception benchmark needs root (network namespaces, nftables)"
for c in ip setpriv nft openssl taskset; do need_cmd "$c" "iproute2 util-linux nftables openssl"; done
# Fresh names per round must stay under the sidecar's bound on live names (1024).
((ROUNDS * REQUESTS + 1 < 1000)) || die "ROUNDS x REQUESTS must stay under 1000 (the sidecar keeps 1024 leaves)"

id=$$
NS_UP="mdi-u$id" NS_M="mdi-m$id"
UP=198.51.100.2
tmp="$(mktemp -d)"
chmod 0755 "$tmp"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for ns in "$NS_M" "$NS_UP"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "/etc/netns/$NS_M" "$tmp"
}
trap cleanup EXIT

for f in "$B/mandate-bench" "$B/mandate-egress-init" "$SIDECAR" "$ENVOY_BIN"; do
  cp "$f" "$tmp/" || die "cannot copy $f"
done
T="$tmp"
sidecar_bin="$tmp/$(basename "$SIDECAR")"

# The upstream's certificate, for every name the benchmark uses.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench upstream CA" \
  -keyout "$tmp/up-ca.key" -out "$tmp/up-ca.crt" 2>/dev/null || die "openssl: the upstream CA"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=bench upstream" \
  -keyout "$tmp/up.key" -out "$tmp/up.csr" 2>/dev/null || die "openssl: the upstream key"
printf 'subjectAltName=DNS:*.bench.test,DNS:*.pass.test\n' >"$tmp/san.ext"
openssl x509 -req -in "$tmp/up.csr" -CA "$tmp/up-ca.crt" -CAkey "$tmp/up-ca.key" -CAcreateserial -days 2 \
  -extfile "$tmp/san.ext" -out "$tmp/up.crt" 2>/dev/null || die "openssl: the upstream certificate"
chmod 0644 "$tmp"/*.crt "$tmp"/*.key

ip netns add "$NS_UP"
ip netns add "$NS_M"
ip link add "mdi-$id" type veth peer name "mdi-u$id"
ip link set "mdi-$id" netns "$NS_M"
ip link set "mdi-u$id" netns "$NS_UP"
ip netns exec "$NS_UP" ip link set lo up
ip netns exec "$NS_UP" ip addr add "$UP/24" dev "mdi-u$id"
ip netns exec "$NS_UP" ip link set "mdi-u$id" up
ip netns exec "$NS_M" ip link set lo up
ip netns exec "$NS_M" ip addr add 198.51.100.10/24 dev "mdi-$id"
ip netns exec "$NS_M" ip link set "mdi-$id" up
ip netns exec "$NS_M" sysctl -qw net.ipv4.tcp_tw_reuse=1
mkdir -p "$tmp/m/ca"
chown -R 15999:15999 "$tmp/m"

# The pod's hosts file (ip netns exec puts it in place of /etc/hosts): Envoy
# resolves the names from it.
mkdir -p "/etc/netns/$NS_M"
{
  echo "127.0.0.1 localhost"
  for n in $(seq 0 $((ROUNDS * REQUESTS + 1))); do echo "$UP h$n.bench.test p$n.pass.test"; done
} >"/etc/netns/$NS_M/hosts"

taskset -c 1 ip netns exec "$NS_UP" "$T/mandate-bench" serve-tls --listen "$UP:443" \
  --cert "$tmp/up.crt" --key "$tmp/up.key" --plain "$UP:80" >"$tmp/upstream.log" 2>&1 &
pids+=($!)

mkdir -p "$tmp/policies"
cat >"$tmp/policies/bench.yaml" <<'EOF'
apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: bench}
spec:
  egress:
  - {host: "*.bench.test", port: 443}
  - {host: "*.pass.test", port: 443, tlsMode: Passthrough}
  - {host: "*.bench.test", port: 80}
  modules:
  - name: bench.rego
    rego: |
      package mandate.authz
      import rego.v1
      default decision := false
      tls_host if endswith(input.parsed_host.name, ".bench.test")
      tls_host if endswith(input.parsed_host.name, ".pass.test")
      # The connection, on its server name; then each request inside.
      decision if {
        input.attributes.request.http.method == "CONNECT"
        tls_host
        input.parsed_host.port == 443
      }
      decision if {
        input.attributes.request.http.method == "GET"
        tls_host
        input.attributes.request.http.path == "/v1/models"
      }
EOF
chmod -R a+rX "$tmp/policies"

taskset -c 0 ip netns exec "$NS_M" setpriv --reuid=15999 --regid=15999 --clear-groups -- \
  "$sidecar_bin" --workers 1 --policy "$tmp/policies" --listen-unix "$tmp/m/authz.sock" --no-tcp \
  --sds-socket "$tmp/m/sds.sock" --ca-bundle-dir "$tmp/m/ca" --system-roots "$tmp/up-ca.crt" \
  --admin-listen 127.0.0.1:15020 >"$tmp/m/decisions.log" 2>"$tmp/m/sidecar.err" &
sidecar_pid=$!
pids+=("$sidecar_pid")
"$T/mandate-bench" bootstrap --authz-socket "$tmp/m/authz.sock" --admin-socket "$tmp/m/admin.sock" \
  --upstream-ca "$tmp/up-ca.crt" >"$tmp/m/envoy.json"
taskset -c 1 ip netns exec "$NS_M" setpriv --reuid=15999 --regid=15999 --clear-groups -- \
  "$T/envoy" -c "$tmp/m/envoy.json" --concurrency 1 --log-level error --disable-hot-restart \
  --use-dynamic-base-id >"$tmp/m/envoy.log" 2>&1 &
pids+=($!)
ok() { [ "$(in_ns "$NS_M" 15999 curl -s -m 2 -o /dev/null -w '%{http_code}' "$@")" = 200 ]; }
wait_for "the sidecar" 30 ok http://127.0.0.1:15020/readyz || die "sidecar: $(cat "$tmp/m/sidecar.err")"
wait_for "Envoy" 30 ok http://127.0.0.1:15021/healthz/ready || die "Envoy: $(tail "$tmp/m/envoy.log")"
ip netns exec "$NS_M" "$T/mandate-egress-init" | has "egress rules installed" || die "mandate-egress-init failed"
# The agent trusts the pod CA (intercepted names) and the upstream's (passthrough).
cat "$tmp/m/ca/ca.crt" "$tmp/up-ca.crt" >"$tmp/trust.pem"
chmod 0644 "$tmp/trust.pem"

client() { # client NAME MODE REQUESTS START [plain]
  local to=(--connect "$UP:443" --ca "$tmp/trust.pem")
  [ "${5:-}" = plain ] && to=(--connect "$UP:80")
  taskset -c 1 env -u http_proxy -u HTTP_PROXY -u https_proxy -u HTTPS_PROXY \
    ip netns exec "$NS_M" setpriv --reuid=1000 --regid=1000 --clear-groups -- \
    "$T/mandate-bench" tls "${to[@]}" --name "$1" --mode "$2" --requests "$3" --start "$4"
}
# Both paths work, and are what they claim: the intercepted name's leaf comes
# from the pod CA, the passthrough name's certificate is the upstream's.
client "h$((ROUNDS * REQUESTS + 1)).bench.test" new-connection 1 0 >/dev/null || die "the intercepted path does not work"
client "p$((ROUNDS * REQUESTS + 1)).pass.test" new-connection 1 0 >/dev/null || die "the passthrough path does not work"
issuer() { # issuer NAME: the issuer of the certificate the agent is shown for NAME
  in_ns "$NS_M" 1000 openssl s_client -connect "$UP:443" -servername "$1" </dev/null 2>&1 |
    sed -n 's/^issuer=//p' | head -n1
}
got="$(issuer "h$((ROUNDS * REQUESTS + 1)).bench.test")"
[[ "$got" == *Mandate* ]] || die "the bench.test name was not intercepted (issuer: '$got')"
got="$(issuer "p$((ROUNDS * REQUESTS + 1)).pass.test")"
[[ "$got" == *"bench upstream CA"* ]] || die "the pass.test name was intercepted or failed (issuer: '$got')"
grep -q '"path":"intercept"' "$tmp/m/decisions.log" || die "no decision inside intercepted TLS was logged"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$sidecar_pid/stat"; }
tick_ms=$((1000 / $(getconf CLK_TCK)))
known=$((ROUNDS * REQUESTS + 1))
declare -A cpu=([intercept]=0 [passthrough]=0)
for mode in first new-connection keepalive; do : >"$tmp/$mode.jsonl"; done
for round in $(seq 1 "$ROUNDS"); do
  start=$(((round - 1) * REQUESTS))
  for arm in intercept passthrough; do
    if [ "$arm" = intercept ]; then fresh="h{n}.bench.test" name="h$known.bench.test"; else fresh="p{n}.pass.test" name="p$known.pass.test"; fi
    before="$(cpu_ticks)"
    out="$(client "$fresh" first "$REQUESTS" "$start")" || die "$arm, first requests, round $round failed"
    cpu[$arm]=$((cpu[$arm] + $(cpu_ticks) - before))
    echo "{\"round\":$round,\"which\":\"$arm\",\"r\":$out}" >>"$tmp/first.jsonl"
    out="$(client "$name" new-connection "$REQUESTS" 0)" || die "$arm, new connections, round $round failed"
    echo "{\"round\":$round,\"which\":\"$arm\",\"r\":$out}" >>"$tmp/new-connection.jsonl"
    out="$(client "$name" keepalive "$((REQUESTS * 5))" 0)" || die "$arm, keep-alive, round $round failed"
    echo "{\"round\":$round,\"which\":\"$arm\",\"r\":$out}" >>"$tmp/keepalive.jsonl"
  done
  # The same requests in plain HTTP, decided one by one as inside interception.
  out="$(client "h$known.bench.test" keepalive "$((REQUESTS * 5))" 0 plain)" || die "plain HTTP, keep-alive, round $round failed"
  echo "{\"round\":$round,\"which\":\"plain\",\"r\":$out}" >>"$tmp/keepalive.jsonl"
done
for mode in first new-connection keepalive; do
  case "$mode" in
    first) echo "the first request to a new host (a new name, a new connection; intercept mints its leaf):" ;;
    new-connection) echo "a new connection per request to a known host (its leaf cached):" ;;
    keepalive) echo "requests on one warm connection:" ;;
  esac
  if [ "$mode" = keepalive ]; then
    # Passthrough decides nothing on a warm connection; plain HTTP decides
    # each request as interception does: the difference is TLS's own cost.
    python3 "$MANDATE_ROOT/hack/bench_report.py" table "$tmp/$mode.jsonl" plain \
      intercept="intercept (each request decided)" plain="plain HTTP (each request decided)" \
      passthrough="passthrough (nothing decided)" \
      --share "intercept-plain=terminating and re-originating TLS (both decided per request)" \
      "intercept-passthrough=deciding each request inside HTTPS"
  else
    python3 "$MANDATE_ROOT/hack/bench_report.py" table "$tmp/$mode.jsonl" passthrough \
      intercept="intercept (decided inside)" passthrough="passthrough (decided on SNI)" \
      --share "intercept-passthrough=interception's cost"
  fi
done
minted="$(in_ns "$NS_M" 15999 curl -s http://127.0.0.1:15020/metrics | sed -n 's/^mandate_sidecar_intercept_leaves_minted_total{kind="new"} \([0-9]*\).*/\1/p')"
n=$((ROUNDS * REQUESTS))
echo "the sidecar's CPU over the first-request runs ($n new names each; clock tick ${tick_ms} ms):"
echo "  intercept:   $((cpu[intercept] * tick_ms)) ms, $(python3 -c "print(f'{${cpu[intercept]} * $tick_ms / $n:.2f}')") ms per new host (a leaf minted and two decisions)"
echo "  passthrough: $((cpu[passthrough] * tick_ms)) ms, $(python3 -c "print(f'{${cpu[passthrough]} * $tick_ms / $n:.2f}')") ms per new host (one decision)"
echo "  per minted leaf (the difference): $(python3 -c "print(f'{(${cpu[intercept]} - ${cpu[passthrough]}) * $tick_ms / $n:.2f}')") ms; leaves minted in all: ${minted:-unknown}"
