#!/usr/bin/env bash
# Mandate's performance figures, measured in one run on this machine beside
# the peers that matter: OPA 0.70 (`opa bench`) for evaluation, Envoy alone
# for the added latency. Prints a report; README.md quotes one.
#
#   hack/bench.sh            (needs make deps: Envoy and OPA)
#
# Everything listens on 127.0.0.1. The sidecar runs on one core (taskset -c 0,
# one tokio worker); clients, Envoy and the upstream run on the other core.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$MANDATE_ROOT"

[ -x "$OPA_BIN" ] || die "no OPA at $OPA_BIN; run make deps"
[ -x "$ENVOY_BIN" ] || die "no Envoy at $ENVOY_BIN; run make deps"
need_cmd taskset util-linux
need_cmd curl curl

log "building release binaries"
cargo build --release -q -p mandate-sidecar -p mandate-e2e --bins
B="$MANDATE_ROOT/target/release"

tmp="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

ready() { curl -sf "$1" >/dev/null; }

cat >"$tmp/input.json" <<'EOF'
{"attributes": {"request": {"http": {"method": "GET", "host": "api.search.example.com",
  "path": "/v1/search", "headers": {"accept": "application/json", "user-agent": "agent/1.0",
  "authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJib2IiLCJyb2xlIjoiZ3Vlc3QifQ."}}}},
 "parsed_path": ["v1", "search"], "parsed_query": {}, "parsed_body": null, "truncated_body": false,
 "version": {"encoding": "protojson", "ext_authz": "v3"}, "agent": {"identity": "researcher"}}
EOF

echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r)"
echo
echo "== 1. Evaluation per decision: Mandate (regorus, compiled once) vs OPA 0.70 (opa bench)"
echo "(mandate: a whole decision from the JSON input; mandate eval: from an input already converted,"
echo " as opa bench has it, on regorus' VM; interpreter: the same on regorus' interpreter;"
echo " speedup is opa over mandate eval)"
printf '%-24s %14s %14s %12s %14s %8s\n' policy "mandate ns/op" "mandate eval" "interpreter" "opa ns/op" "speedup"
for f in policies/*.yaml; do
  name="$(basename "$f" .yaml)"
  out="$(taskset -c 0 "$B/mandate-bench" engine "$f" --input "$tmp/input.json" --seconds 2)"
  ours="$(sed -n 's/.*"ns_per_op":\([0-9]*\).*/\1/p' <<<"$out")"
  eval_only="$(sed -n 's/.*"eval_ns_per_op":\([0-9]*\).*/\1/p' <<<"$out")"
  interp="$(sed -n 's/.*"interpreter_ns_per_op":\([0-9]*\).*/\1/p' <<<"$out")"
  entry="$("$B/mandate-bench" export "$f" "$tmp/opa-$name")"
  opa_json="$(taskset -c 0 "$OPA_BIN" bench -d "$tmp/opa-$name" -i "$tmp/input.json" "$entry" --format json --fail=false --count 1)"
  theirs="$(python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(round(d["T"]/d["N"]))' <<<"$opa_json")"
  printf '%-24s %14s %14s %12s %14s %7sx\n' "$name" "$ours" "$eval_only" "$interp" "$theirs" "$(python3 -c "print(round($theirs/$eval_only, 1))")"
done

echo
echo "== 2. Check over gRPC on loopback (sidecar on one core, tool-allowlist policy, decision log to a file)"
grpc=$(free_port) admin=$(free_port)
TOKIO_WORKER_THREADS=1 taskset -c 0 "$B/mandate-sidecar" --policy policies/tool-allowlist.yaml \
  --listen "127.0.0.1:$grpc" --listen-unix "$tmp/authz.sock" --admin-listen "127.0.0.1:$admin" \
  >"$tmp/decisions.log" 2>"$tmp/sidecar.err" &
pids+=($!)
wait_for "the sidecar" 30 ready "http://127.0.0.1:$admin/readyz" || die "sidecar did not start: $(cat "$tmp/sidecar.err")"
taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$grpc" --rate 1000 --seconds 10 >/dev/null # warm-up
echo "at 1000/s:  $(taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$grpc" --rate 1000 --seconds 10)"
echo "max:        $(taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$grpc" --max --seconds 5 --concurrency 32)"
# The floor: the same client against a Check server that allows at once.
noop=$(free_port)
TOKIO_WORKER_THREADS=1 taskset -c 0 "$B/mandate-bench" serve-noop "127.0.0.1:$noop" &
pids+=($!)
wait_for "the no-op server" 10 port_in_use "$noop" || die "no-op server did not start"
taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$noop" --rate 1000 --seconds 3 >/dev/null
echo "baseline, a no-op Check server, at 1000/s: $(taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$noop" --rate 1000 --seconds 10)"
echo "baseline, a no-op Check server, max:       $(taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$noop" --max --seconds 5 --concurrency 32)"
"$B/mandate" verify-log "$tmp/decisions.log" | sed 's/^/decision log: /'
python3 - "$tmp/decisions.log" <<'PY'
import json, sys
lat = sorted(json.loads(l)["latency_us"] for l in open(sys.argv[1]) if l.startswith("{"))
pick = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))]
print(f"inside the handler (input + evaluation, from the log): p50 {pick(0.5)} us, p99 {pick(0.99)} us over {len(lat)} decisions")
PY

echo
echo "== 3. Envoy + sidecar vs Envoy alone, HTTP at 1000 requests/s (Envoy --concurrency 1;"
echo "   ext_authz over the sidecar's unix socket, as in an injected pod)"
up=$(free_port) with=$(free_port) without=$(free_port) eadmin=$(free_port)
taskset -c 1 "$B/mandate-testbin" serve --listen "127.0.0.1:$up" --name upstream >/dev/null 2>&1 &
pids+=($!)
sed -e "s/ENVOY_ADMIN/$eadmin/; s/WITH_AUTHZ/$with/; s/WITHOUT_AUTHZ/$without/; s#SIDECAR_SOCKET#$tmp/authz.sock#; s/UPSTREAM/$up/g" \
  "$MANDATE_ROOT/hack/bench-envoy.yaml" >"$tmp/envoy.yaml"
taskset -c 1 "$ENVOY_BIN" -c "$tmp/envoy.yaml" --concurrency 1 --log-level error --use-dynamic-base-id >"$tmp/envoy.log" 2>&1 &
pids+=($!)
wait_for "Envoy" 30 ready "http://127.0.0.1:$eadmin/ready" || die "Envoy did not start: $(tail "$tmp/envoy.log")"
wait_for "the upstream via Envoy" 30 ready "http://127.0.0.1:$without/v1/search" || die "no upstream"
for port in "$with" "$without"; do
  taskset -c 1 "$B/mandate-bench" http "http://127.0.0.1:$port/v1/search" --host api.search.example.com --rate 1000 --seconds 3 >/dev/null # warm-up
done
a="$(taskset -c 1 "$B/mandate-bench" http "http://127.0.0.1:$with/v1/search" --host api.search.example.com --rate 1000 --seconds 10)"
b="$(taskset -c 1 "$B/mandate-bench" http "http://127.0.0.1:$without/v1/search" --host api.search.example.com --rate 1000 --seconds 10)"
echo "envoy + sidecar: $a"
echo "envoy alone:     $b"
python3 - "$a" "$b" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"added by the sidecar: p50 {a['p50_us'] - b['p50_us']:.1f} us, p99 {a['p99_us'] - b['p99_us']:.1f} us")
PY

echo
echo "== 4. Sidecar memory with 100 policies loaded"
mkdir -p "$tmp/p100"
for i in $(seq 1 100); do
  sed -e "s/name: tool-allowlist/name: tool-allowlist-$i/" -e "s#path: /v1/search#path: /v$i/search#" \
    policies/tool-allowlist.yaml >"$tmp/p100/p$i.yaml"
done
g2=$(free_port) a2=$(free_port)
TOKIO_WORKER_THREADS=1 taskset -c 0 "$B/mandate-sidecar" --policy "$tmp/p100" \
  --listen "127.0.0.1:$g2" --admin-listen "127.0.0.1:$a2" >/dev/null 2>"$tmp/sidecar100.err" &
pid=$!
pids+=("$pid")
wait_for "the sidecar with 100 policies" 60 ready "http://127.0.0.1:$a2/readyz" || die "$(cat "$tmp/sidecar100.err")"
loaded="$(curl -s "http://127.0.0.1:$a2/metrics" | grep -c '^mandate_sidecar_policy_info')"
taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$g2" --rate 500 --seconds 2 >/dev/null
echo "policies loaded: $loaded; RSS after 1000 decisions: $(awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$pid/status")"
