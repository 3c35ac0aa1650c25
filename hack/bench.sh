#!/usr/bin/env bash
# Mandate's performance figures, measured in one run on this machine beside
# the peers that matter: OPA 0.70 (`opa bench`) for evaluation; a no-op
# Check server (the floor of gRPC and of Envoy's ext_authz on this machine)
# and Envoy alone for latency. Prints a report; README.md quotes one.
#
#   hack/bench.sh            (needs make deps: Envoy, OPA, h2load)
#   MANDATE_BENCH_SIDECAR=target/x86_64-unknown-linux-musl/release/mandate-sidecar hack/bench.sh
#                            measures another sidecar binary (e.g. the images' musl build)
#   MANDATE_BENCH_ROUNDS=N, MANDATE_BENCH_ROUND_SECONDS=S   (default 5 rounds of 4 s)
#   MANDATE_BENCH_ONLY=transparent   only section 4 (transparent egress vs HTTP_PROXY; root)
#   MANDATE_BENCH_ONLY=intercept     only section 5 (TLS interception vs passthrough; root)
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
need_cmd chrt util-linux
need_cmd h2load nghttp2-client

log "building release binaries"
# The sidecar on its own, as the image builds it (features resolved for it alone).
cargo build --release -q -p mandate-sidecar
cargo build --release -q -p mandate-bench -p mandate-e2e --bins
B="$MANDATE_ROOT/target/release"
# The sidecar measured (e.g. the images' static musl build); tools come from $B.
SIDECAR="${MANDATE_BENCH_SIDECAR:-$B/mandate-sidecar}"
[ -x "$SIDECAR" ] || die "no sidecar binary at $SIDECAR"
ROUNDS="${MANDATE_BENCH_ROUNDS:-5}"
ROUND_SECONDS="${MANDATE_BENCH_ROUND_SECONDS:-4}"

if [ "${MANDATE_BENCH_ONLY:-}" = transparent ]; then
  exec hack/bench-transparent.sh "$B" "$SIDECAR"
fi
if [ "${MANDATE_BENCH_ONLY:-}" = intercept ]; then
  exec hack/bench-intercept.sh "$B" "$SIDECAR"
fi

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
echo "sidecar: $SIDECAR ($(file -b "$SIDECAR" | grep -o -E '(statically|dynamically) linked|static-pie linked' | head -1))"
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
# A latency figure at 1000/s on a VM is mostly how fast an idle vCPU wakes
# up (it halts between requests). Each latency section runs twice: as the
# machine is, then with both cores kept awake by idle-priority spinners
# (SCHED_IDLE: any real task preempts them at once) — the VM's counterpart of
# disabling deep C-states, as latency benchmarks on bare metal do.
spinners=()
awake() {
  for core in 0 1; do
    chrt --idle 0 taskset -c "$core" sh -c 'while :; do :; done' &
    spinners+=($!)
    pids+=($!)
  done
}
asleep() {
  for p in "${spinners[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${spinners[@]}"; do wait "$p" 2>/dev/null || true; done
  spinners=()
}
passes=("as is" "cores kept awake")

echo "== 2. Check over gRPC on loopback at 1000/s (sidecar on one core, tool-allowlist policy, decision"
echo "   log to a file; the same client against a no-op Check server is the floor: what gRPC and this"
echo "   machine cost before any decision; $ROUNDS interleaved rounds of ${ROUND_SECONDS}s, medians across rounds)"
read -r grpc admin noop <<<"$(free_port 3)"
taskset -c 0 "$SIDECAR" --workers 1 --policy policies/tool-allowlist.yaml \
  --listen "127.0.0.1:$grpc" --listen-unix "$tmp/authz.sock" --admin-listen "127.0.0.1:$admin" \
  >"$tmp/decisions.log" 2>"$tmp/sidecar.err" &
pids+=($!)
wait_for "the sidecar" 30 ready "http://127.0.0.1:$admin/readyz" || die "sidecar did not start: $(cat "$tmp/sidecar.err")"
TOKIO_WORKER_THREADS=1 taskset -c 0 "$B/mandate-bench" serve-noop "127.0.0.1:$noop" --unix "$tmp/noop.sock" &
pids+=($!)
wait_for "the no-op server" 10 port_in_use "$noop" || die "no-op server did not start"
for port in "$grpc" "$noop"; do
  taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$port" --rate 1000 --seconds 3 >/dev/null # warm-up
done
for pass in "${passes[@]}"; do
  [ "$pass" = "as is" ] || awake
  : >"$tmp/grpc.jsonl"
  for round in $(seq 1 "$ROUNDS"); do
    for which in sidecar noop; do
      port=$grpc; [ "$which" = noop ] && port=$noop
      out="$(taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$port" --rate 1000 --seconds "$ROUND_SECONDS")"
      echo "{\"round\":$round,\"which\":\"$which\",\"r\":$out}" >>"$tmp/grpc.jsonl"
    done
  done
  asleep
  echo "$pass:"
  python3 hack/bench_report.py rounds "$tmp/grpc.jsonl" sidecar=sidecar noop="no-op server" \
    --share "sidecar-noop=the sidecar's share (minus the no-op server, same round)"
done
# So far the log holds only decisions made at 1000/s (warm-ups included).
python3 hack/bench_report.py handler "$tmp/decisions.log"
# An independent client (nghttp2's h2load, in C), back to back on one
# connection: every request finds the server awake.
"$B/mandate-bench" grpc-body "$tmp/check.bin"
for which in sidecar noop; do
  port=$grpc; [ "$which" = noop ] && port=$noop
  taskset -c 1 h2load -n 20000 -c 1 -m 1 -d "$tmp/check.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
    --log-file="$tmp/h2load-$which.tsv" "http://127.0.0.1:$port/envoy.service.auth.v3.Authorization/Check" >"$tmp/h2load-$which.out" \
    || die "h2load failed: $(tail -3 "$tmp/h2load-$which.out")"
done
echo "back to back (h2load -c 1 -m 1, 20 000 requests):"
python3 hack/bench_report.py h2load "$tmp/h2load-sidecar.tsv" "$tmp/h2load-noop.tsv"
echo "max:        $(taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$grpc" --max --seconds 5 --concurrency 32)"
echo "baseline, a no-op Check server, max:       $(taskset -c 1 "$B/mandate-bench" grpc "127.0.0.1:$noop" --max --seconds 5 --concurrency 32)"
"$B/mandate" verify-log "$tmp/decisions.log" | sed 's/^/decision log: /'
echo "the whole Check handler in process, no gRPC (input, evaluation, chained log record written to a file, response;"
echo "  $B's build): $(taskset -c 0 "$B/mandate-bench" handler policies/tool-allowlist.yaml --log "$tmp/handler.log" --seconds 3)"

echo
echo "== 3. Envoy + sidecar vs Envoy alone, HTTP at 1000 requests/s (Envoy --concurrency 1; ext_authz"
echo "   over a unix socket as in an injected pod; the same ext_authz filter calling the no-op Check"
echo "   server is the floor; $ROUNDS interleaved rounds of ${ROUND_SECONDS}s, medians across rounds)"
read -r up with with_noop without eadmin <<<"$(free_port 5)"
taskset -c 1 "$B/mandate-testbin" serve --listen "127.0.0.1:$up" --name upstream >/dev/null 2>&1 &
pids+=($!)
render_template "$MANDATE_ROOT/hack/bench-envoy.yaml" "$tmp/envoy.yaml" ENVOY_ADMIN="$eadmin" \
  WITH_AUTHZ="$with" WITH_NOOP_AUTHZ="$with_noop" WITHOUT_AUTHZ="$without" \
  SIDECAR_SOCKET="$tmp/authz.sock" NOOP_SOCKET="$tmp/noop.sock" UPSTREAM="$up"
taskset -c 1 "$ENVOY_BIN" -c "$tmp/envoy.yaml" --concurrency 1 --log-level error --use-dynamic-base-id >"$tmp/envoy.log" 2>&1 &
pids+=($!)
wait_for "Envoy" 30 ready "http://127.0.0.1:$eadmin/ready" || die "Envoy did not start: $(tail "$tmp/envoy.log")"
wait_for "the upstream via Envoy" 30 ready "http://127.0.0.1:$without/v1/search" || die "no upstream"
for port in "$with" "$with_noop" "$without"; do
  taskset -c 1 "$B/mandate-bench" http "http://127.0.0.1:$port/v1/search" --host api.search.example.com --rate 1000 --seconds 3 >/dev/null # warm-up
done
for pass in "${passes[@]}"; do
  [ "$pass" = "as is" ] || awake
  : >"$tmp/http.jsonl"
  for round in $(seq 1 "$ROUNDS"); do
    for which in sidecar noop alone; do
      case $which in sidecar) port=$with ;; noop) port=$with_noop ;; *) port=$without ;; esac
      out="$(taskset -c 1 "$B/mandate-bench" http "http://127.0.0.1:$port/v1/search" --host api.search.example.com --rate 1000 --seconds "$ROUND_SECONDS")"
      echo "{\"round\":$round,\"which\":\"$which\",\"r\":$out}" >>"$tmp/http.jsonl"
    done
  done
  asleep
  echo "$pass:"
  python3 hack/bench_report.py rounds "$tmp/http.jsonl" sidecar="Envoy + Mandate" noop="Envoy + no-op ext_authz" alone="Envoy alone" \
    --share "sidecar-alone=added by Mandate over Envoy alone" "noop-alone=added by a no-op ext_authz over Envoy alone" \
    "sidecar-noop=the sidecar's share (over the no-op ext_authz)"
done

echo
echo "== 4. Transparent egress vs HTTP_PROXY, at 1000 requests/s through Envoy, the same policy and upstream"
echo "   (agent UID 1000 in a pod's network namespace with the real egress rules; Envoy alone on both paths"
echo "   isolates the redirect; direct, without Envoy, is the floor; hack/bench-transparent.sh)"
if [ "$(id -u)" -eq 0 ]; then
  hack/bench-transparent.sh "$B" "$SIDECAR"
else
  echo "   skipped: needs root (network namespaces, nftables)"
fi

echo
echo "== 5. TLS interception vs CONNECT passthrough: the first request to a new host (leaf minted), new"
echo "   connections to a known host, warm connections; sequential HTTPS requests as the agent (UID 1000)"
echo "   through the transparent path, the same sidecar and policy deciding both (hack/bench-intercept.sh)"
if [ "$(id -u)" -eq 0 ]; then
  hack/bench-intercept.sh "$B" "$SIDECAR"
else
  echo "   skipped: needs root (network namespaces, nftables)"
fi

echo "== 6. Sidecar footprint: size, and memory with 100 policies loaded"
hack/footprint.sh "$SIDECAR"
