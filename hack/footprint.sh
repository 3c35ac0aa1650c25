#!/usr/bin/env bash
# The sidecar's footprint, as `make bench` reports it: binary size, text
# section, and resident memory with 100 policies loaded after 1000 decisions.
#
#   hack/footprint.sh [SIDECAR...]   (default: target/release/mandate-sidecar)
#
# Several binaries (e.g. one built from an earlier commit) are measured the
# same way in one run, one line each. Needs curl; the load comes from
# mandate-bench (built here). Everything listens on 127.0.0.1.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$MANDATE_ROOT"
need_cmd curl curl
need_cmd taskset util-linux
need_cmd size binutils

cargo build --release -q -p mandate-bench
BENCH="$MANDATE_ROOT/target/release/mandate-bench"
(($# > 0)) || {
  cargo build --release -q -p mandate-sidecar
  set -- "$MANDATE_ROOT/target/release/mandate-sidecar"
}

tmp="$(mktemp -d)"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
ready() { curl -sf "$1" >/dev/null; }

mkdir -p "$tmp/p100"
for i in $(seq 1 100); do
  sed -e "s/name: tool-allowlist/name: tool-allowlist-$i/" -e "s#path: /v1/search#path: /v$i/search#" \
    policies/tool-allowlist.yaml >"$tmp/p100/p$i.yaml"
done

printf '%-60s %10s %10s %9s %s\n' "sidecar" "size" "text" "policies" "RSS after 1000 decisions"
for sidecar in "$@"; do
  [ -x "$sidecar" ] || die "no sidecar binary at $sidecar"
  read -r grpc admin <<<"$(free_port 2)"
  taskset -c 0 "$sidecar" --workers 1 --policy "$tmp/p100" \
    --listen "127.0.0.1:$grpc" --admin-listen "127.0.0.1:$admin" >/dev/null 2>"$tmp/err" &
  pid=$!
  wait_for "the sidecar with 100 policies" 60 ready "http://127.0.0.1:$admin/readyz" || die "$(cat "$tmp/err")"
  loaded="$(curl -s "http://127.0.0.1:$admin/metrics" | grep -c '^mandate_sidecar_policy_info')"
  taskset -c 1 "$BENCH" grpc "127.0.0.1:$grpc" --rate 500 --seconds 2 >/dev/null
  rss="$(awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$pid/status")"
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
  pid=""
  printf '%-60s %8.1fMB %8.1fMB %9s %s\n' "$sidecar" \
    "$(($(stat -c %s "$sidecar") / 1000))e-3" "$(($(size -A "$sidecar" | awk '$1 == ".text" {print $2}') / 1000))e-3" \
    "$loaded" "$rss"
done
