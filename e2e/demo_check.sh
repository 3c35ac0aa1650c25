#!/usr/bin/env bash
# The README's first command, run as a user would (`make demo`), and what it
# prints checked: a demo that no test runs breaks silently (it did).
#
#   e2e/demo_check.sh
#
# Passes when the demo exits 0 and its output shows:
#   - an allowed call (HTTP 200, decision ALLOW) and denied ones (HTTP 403,
#     decision DENY) through Envoy, each with its decision id;
#   - the DryRun policy's verdict logged without blocking;
#   - the decision log's hash chain verified, and an edited record caught;
#   - with the sidecar stopped, the call is denied and no decision is recorded;
#   - the example policies' own tests passing.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/../hack/lib.sh"
cd "$MANDATE_ROOT"

out="$(mktemp)"
trap 'rm -f "$out"' EXIT
failures=0
pass() { log "PASS: demo: $*"; }
fail() {
  log "FAIL: demo: $*"
  failures=$((failures + 1))
}

# expect WHAT REGEX: the demo printed a line matching REGEX.
expect() {
  if grep -Eq -- "$2" "$out"; then pass "$1"; else fail "$1 (no line matching /$2/)"; fi
}
# expect_after WHAT CALL_REGEX RESULT_REGEX: the line right after the call's
# line (its decision record) matches RESULT_REGEX.
expect_after() {
  local got
  got="$(grep -E -A1 -- "$2" "$out" | sed -n 2p)"
  if [[ "$got" =~ $3 ]]; then pass "$1: ${got#"${got%%[![:space:]]*}"}"; else fail "$1: after /$2/ expected /$3/, got '$got'"; fi
}

t0=$SECONDS
if ! make -s demo >"$out" 2>&1; then
  cat "$out" >&2
  die "make demo failed (output above)"
fi
log "make demo ran in $((SECONDS - t0))s"

expect "an allowed call passes Envoy" '^  GET +api\.search\.example\.com/v1/search\?q=rust -> HTTP 200$'
expect_after "the allowed call's decision" 'GET +api\.search\.example\.com/v1/search\?q=rust -> HTTP 200' \
  'decision ALLOW .*\(id [0-9a-f]{32}\)'
expect "a destructive call is refused by Envoy" '^  DELETE api\.tickets\.example\.com/v2/tickets/7 -> HTTP 403$'
expect_after "the refused call's decision" 'DELETE api\.tickets\.example\.com/v2/tickets/7 -> HTTP 403' \
  'decision DENY .*\(id [0-9a-f]{32}\)'
expect "an unknown host is refused" '^  GET +evil\.example\.net/exfiltrate -> HTTP 403$'
expect "the DryRun policy's verdict is logged" 'pii-egress.* DryRun -> deny'
expect "the decision log's hash chain verifies" '^  ok: [0-9]+ records in 1 chain\(s\)$'
expect "an edited record is caught" '^  BROKEN: '
if [ "$(grep -Ec '^  ok: ' "$out")" -eq 1 ]; then pass "only the untouched log verifies"; else fail "the edited log verified too"; fi
stopped="$(sed -n '/^Stopping the sidecar/,/^Run the example/p' "$out")"
if grep -Eq -- '-> HTTP 403$' <<<"$stopped" && grep -q "no decision recorded" <<<"$stopped" && ! grep -q "HTTP 200" <<<"$stopped"; then
  pass "with the sidecar stopped, Envoy denies and nothing is recorded"
else
  fail "with the sidecar stopped: $stopped"
fi
expect "the example policies' tests pass" 'passed, 0 failed'

# The README's example AgentPolicy passes its own tests (the apiserver's view
# of the whole example is checked by operator/tests/crd_rules.rs).
python3 - "$MANDATE_ROOT/README.md" "$out.policy.yaml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"```yaml\n(.*?)```", text, re.S)
docs = [d for d in (block.group(1) if block else "").split("\n---\n") if "kind: AgentPolicy" in d]
open(sys.argv[2], "w").write(docs[0] if docs else "")
PY
if [ -s "$out.policy.yaml" ] && tested="$("$MANDATE_ROOT/target/debug/mandate" test "$out.policy.yaml" 2>&1)"; then
  pass "the README's example policy passes its tests: ${tested}"
else
  fail "the README's example policy: ${tested:-no AgentPolicy in the first yaml block of README.md}"
fi
rm -f "$out.policy.yaml"

if ((failures)); then
  echo "---- make demo printed:" >&2
  cat "$out" >&2
  die "${failures} demo check(s) failed"
fi
log "the demo works as the README says"
