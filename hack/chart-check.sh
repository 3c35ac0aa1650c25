#!/usr/bin/env bash
# Checks of the Helm chart (charts/mandate) and of the custom resources in
# policies/, with no cluster (`make chart-check`; hack/test.sh runs it in lint):
#
#   1. the chart's CRD copy is byte-identical to crds/mandate.dev.yaml;
#   2. every AgentPolicy/AgentIdentity/AgentApproval in policies/ validates
#      against its CRD's schema, and each deliberately broken one in
#      hack/testdata/invalid-crs.yaml is refused for its stated reason;
#   3. `helm lint --strict` with each value set in charts/mandate/ci/;
#   4. `helm template` of each value set (for the Kubernetes version the test
#      cluster runs): validated with kubernetes-validate --strict against
#      Kubernetes 1.35 and 1.37 (custom resources of
#      cert-manager and the Prometheus operator have no schema there and are
#      only named), and checked by hack/chart_check.py (CRDs equal crds/, RBAC
#      least-privilege, hardened pod, webhooks match the operator's routes and
#      exemptions, every MANDATE_* variable is one the operator reads);
#      below the chart's kubeVersion floor (1.35, the oldest version tested)
#      it refuses to render;
#   5. values.schema.json and the chart's own checks refuse bad values
#      (each case must make `helm template` fail with the expected message).
#
# Needs Helm and the validators from `make deps` (hack/install-deps.sh).
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$MANDATE_ROOT"

CHART=charts/mandate
CRDS=crds/mandate.dev.yaml
CHART_CRDS="$CHART/files/mandate.dev.yaml"
NS=mandate-system
RELEASE=mandate
K8S_VERSIONS=(1.35.0 1.37.0)
# Custom resources the chart may render that kubernetes-validate has no schema for.
CUSTOM_KINDS='(ServiceMonitor with api version monitoring.coreos.com/v1|(Certificate|Issuer) with api version cert-manager.io/v1)'

[ -x "$HELM_BIN" ] || die "Helm ${HELM_VERSION} is not installed at ${HELM_BIN}; run: make deps"
[ -x "$CHARTCHECK_VENV/bin/kubernetes-validate" ] || die "kubernetes-validate is not installed in ${CHARTCHECK_VENV}; run: make deps"
PY="$CHARTCHECK_VENV/bin/python"
helm_env
# Helm 3.10 renders for Kubernetes 1.25 offline, below the chart's floor:
# `helm template` renders for the version the test cluster runs (a later
# --kube-version in the arguments wins).
helm() {
  if [ "$1" = template ]; then
    shift
    "$HELM_BIN" template --kube-version "$K8S_VERSION" "$@"
  else
    "$HELM_BIN" "$@"
  fi
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  failures=$((failures + 1))
}
pass() { log "ok: $*"; }

# 1. The chart carries the CRDs as a copy (Helm cannot read outside the chart).
if cmp -s "$CRDS" "$CHART_CRDS"; then
  pass "$CHART_CRDS is identical to $CRDS"
else
  fail "$CHART_CRDS differs from $CRDS; copy it over with: make chart-crds (make crds does both)"
fi

# 2. Custom resources against their CRDs' schemas.
if out="$("$PY" hack/chart_check.py crs "$CRDS" policies/*.yaml 2>&1)"; then
  pass "policies/*.yaml: ${out} resources valid against the CRDs' schemas"
else
  fail "policies/*.yaml do not validate against $CRDS:"$'\n'"$out"
fi
if out="$("$PY" hack/chart_check.py crs --expect-invalid "$CRDS" hack/testdata/invalid-crs.yaml 2>&1)"; then
  pass "hack/testdata/invalid-crs.yaml: all ${out} broken resources refused, each for its reason"
else
  fail "the CR validator does not refuse what it must:"$'\n'"$out"
fi

# kubernetes-validate must itself be able to fail (a schema-less pass would hide everything).
cat >"$tmp/bad-deployment.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec:
  replicas: "two"
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec: {containers: [{name: c, image: i, imagePullPolicy: Sometimes, bogus: 1}]}
EOF
if "$CHARTCHECK_VENV/bin/kubernetes-validate" --strict --quiet -k 1.30.0 "$tmp/bad-deployment.yaml" >/dev/null 2>&1; then
  fail "kubernetes-validate accepted a broken Deployment: it validates nothing"
fi

# validate_manifests FILE LABEL: kubernetes-validate --strict for each version;
# a warning is accepted only for the known custom resources.
validate_manifests() {
  local file="$1" label="$2" v out
  for v in "${K8S_VERSIONS[@]}"; do
    if ! out="$("$CHARTCHECK_VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$file" 2>&1)"; then
      fail "$label: kubernetes-validate --strict -k $v:"$'\n'"$out"
      continue
    fi
    local unexpected
    unexpected="$(printf '%s\n' "$out" | grep -v '^$' | grep -Ev "^WARN .*Couldn't find schema for kind ${CUSTOM_KINDS} " || true)"
    if [ -n "$unexpected" ]; then
      fail "$label: unexpected output from kubernetes-validate -k $v:"$'\n'"$unexpected"
    fi
  done
}

# check_render FILE LABEL PDB_VERSION: the chart's promises on a rendering.
check_render() {
  local out
  if out="$("$PY" hack/chart_check.py rendered --crds "$CRDS" --operator-reference docs/reference/mandate-operator.md \
    --router operator/src/webhook/mod.rs --namespace "$NS" --pdb "$3" "$1" 2>&1)"; then
    return 0
  fi
  fail "$2: the rendered chart breaks its promises:"$'\n'"$out"
}

# 3 + 4. Lint and render each value set.
for values in "$CHART"/ci/*-values.yaml; do
  name="$(basename "$values" -values.yaml)"
  if ! out="$(helm lint --strict "$CHART" -n "$NS" -f "$values" 2>&1)"; then
    fail "helm lint --strict ($name):"$'\n'"$out"
    continue
  fi
  if ! helm template "$RELEASE" "$CHART" -n "$NS" -f "$values" >"$tmp/$name.yaml" 2>"$tmp/$name.err"; then
    fail "helm template ($name): $(cat "$tmp/$name.err")"
    continue
  fi
  before=$failures
  validate_manifests "$tmp/$name.yaml" "$name"
  check_render "$tmp/$name.yaml" "$name" policy/v1
  customs="$(grep -Eo '^kind: (ServiceMonitor|Certificate|Issuer)$' "$tmp/$name.yaml" | sort | uniq -c | awk '{printf "%s%s x%s", sep, $3, $1; sep=", "}' || true)"
  if ((failures == before)); then
    pass "$name: lint --strict, $(grep -c '^kind:' "$tmp/$name.yaml") objects valid on Kubernetes ${K8S_VERSIONS[*]}${customs:+ (not schema-checked: $customs)}"
  fi
done

# The RBAC check must be able to fail: the default rendering with patch on
# pods added is refused (the operator never writes pods).
if [ -f "$tmp/default.yaml" ]; then
  sed 's/verbs: \["get", "list", "watch"\]$/verbs: ["get", "list", "watch", "patch"]/' "$tmp/default.yaml" >"$tmp/pod-patch.yaml"
  if out="$("$PY" hack/chart_check.py rendered --crds "$CRDS" --operator-reference docs/reference/mandate-operator.md \
    --router operator/src/webhook/mod.rs --namespace "$NS" --pdb policy/v1 "$tmp/pod-patch.yaml" 2>&1)"; then
    fail "chart_check.py accepted an operator ClusterRole that patches pods"
  elif grep -q "writes pods" <<<"$out"; then
    pass "an operator role that patches pods is refused"
  else
    fail "chart_check.py refused the pod-patching role, but not for writing pods: $out"
  fi
fi

# Brokered credentials, both ways: off (default), the ClusterRole has no
# secrets and no serviceaccounts/token rule; on (brokering), exactly the
# read-only secrets rule and token create. The check must refuse a secrets
# write with brokering on, and the secrets rule with brokering off.
if [ -f "$tmp/default.yaml" ] && [ -f "$tmp/brokering.yaml" ]; then
  rendered_check() {
    "$PY" hack/chart_check.py rendered --crds "$CRDS" --operator-reference docs/reference/mandate-operator.md \
      --router operator/src/webhook/mod.rs --namespace "$NS" --pdb policy/v1 "$1" 2>&1
  }
  if grep -q 'serviceaccounts/token\|resources: \["secrets"\]$' <(sed -n '/^kind: ClusterRole$/,/^---/p' "$tmp/default.yaml"); then
    fail "the default rendering's ClusterRole names secrets or serviceaccounts/token"
  elif ! grep -q 'serviceaccounts/token' <(sed -n '/^kind: ClusterRole$/,/^---/p' "$tmp/brokering.yaml"); then
    fail "the brokering rendering's ClusterRole has no serviceaccounts/token rule"
  else
    pass "credential brokering: its RBAC is rendered only with credentialBrokering.enabled"
  fi
  sed 's/verbs: \["get", "list", "watch"\]$/verbs: ["get", "list", "watch", "update"]/' "$tmp/brokering.yaml" >"$tmp/secret-write.yaml"
  if out="$(rendered_check "$tmp/secret-write.yaml")"; then
    fail "chart_check.py accepted a brokering ClusterRole that updates secrets"
  elif grep -q "writes secrets cluster-wide" <<<"$out"; then
    pass "a brokering role that writes secrets is refused"
  else
    fail "chart_check.py refused the secret-writing role, but not for writing secrets: $out"
  fi
  # Brokering with an Ignore policy on the AgentPolicy webhook: refused.
  awk '/name: agentpolicies.mandate.dev/{p=1} p && /failurePolicy: Fail/{sub(/Fail/, "Ignore"); p=0} {print}' \
    "$tmp/brokering.yaml" >"$tmp/brokering-ignore.yaml"
  if out="$(rendered_check "$tmp/brokering-ignore.yaml")"; then
    fail "chart_check.py accepted brokering with the AgentPolicy webhook failing open"
  elif grep -q "with credential brokering on" <<<"$out"; then
    pass "brokering with an AgentPolicy webhook that fails open is refused"
  else
    fail "chart_check.py refused the Ignore rendering, but not for that: $out"
  fi
  if ! helm template "$RELEASE" "$CHART" -n "$NS" --set credentialBrokering.enabled=true \
    --set webhook.failurePolicy=Ignore 2>/dev/null |
    awk '/- name: agentpolicies.mandate.dev/{p=1} p && /failurePolicy:/{print; exit}' | grep -q 'failurePolicy: Fail'; then
    fail "with credentialBrokering.enabled and webhook.failurePolicy=Ignore the AgentPolicy webhook is not Fail"
  else
    pass "with brokering on, the AgentPolicy webhook is Fail whatever webhook.failurePolicy says"
  fi
  # The same rendering without the flag (its env entry: the name and value lines).
  sed '/- name: MANDATE_CREDENTIAL_BROKERING$/{N;d}' "$tmp/brokering.yaml" >"$tmp/secret-no-flag.yaml"
  if out="$(rendered_check "$tmp/secret-no-flag.yaml")"; then
    fail "chart_check.py accepted secrets in the ClusterRole with brokering off"
  elif grep -q "but credentialBrokering is off" <<<"$out"; then
    pass "secrets or token rules with brokering off are refused"
  else
    fail "chart_check.py refused the brokering rules without the flag, but not for that: $out"
  fi
fi

# Below the floor: the chart refuses to render (its kubeVersion is the oldest
# Kubernetes its behaviour is tested on).
floor="$(sed -n 's/^kubeVersion: *"\(.*\)"$/\1/p' "$CHART/Chart.yaml")"
if out="$(helm template "$RELEASE" "$CHART" -n "$NS" --kube-version 1.34.9 2>&1)"; then
  fail "the chart renders for Kubernetes 1.34, below its kubeVersion (${floor})"
elif grep -q "chart requires kubeVersion" <<<"$out"; then
  pass "below its kubeVersion (${floor}) the chart refuses to render: $(grep -o 'chart requires kubeVersion.*' <<<"$out" | head -n1)"
else
  fail "helm template --kube-version 1.34.9 failed, but not for the kubeVersion floor: $out"
fi

# 5. Bad values are refused: each case must fail `helm template` with a
# message containing the expected text.
refused=0
expect_refused() {
  local want="$1"
  shift
  local out
  if out="$(helm template "$RELEASE" "$CHART" -n "$NS" "$@" 2>&1 >/dev/null)"; then
    fail "helm template $* was accepted; it must be refused ($want)"
  elif ! grep -qF -- "$want" <<<"$out"; then
    fail "helm template $* was refused, but not for '$want':"$'\n'"$out"
  else
    refused=$((refused + 1))
  fi
}
expect_refused "webhook.failurePolicy" --set webhook.failurePolicy=Maybe
expect_refused "webhook.timeoutSeconds" --set webhook.timeoutSeconds=abc
expect_refused "webhook.timeoutSeconds" --set webhook.timeoutSeconds=2.5
expect_refused "webhook.timeoutSeconds" --set webhook.timeoutSeconds=31
expect_refused "webhook.policyTimeoutSeconds" --set webhook.policyTimeoutSeconds=0
expect_refused "identity.source" --set identity.source=vault
expect_refused "identity.svidServerURL" --set identity.svidServerURL=http://10.0.0.50:9444
expect_refused "operator.replicas" --set operator.replicas=0
expect_refused "operator.nativeSidecars" --set operator.nativeSidecars=sometimes
expect_refused "image.operator.pullPolicy" --set image.operator.pullPolicy=Sometimes
expect_refused "trustDomain" --set trustDomain=Not_A/Domain
expect_refused "service.clusterIP" --set service.clusterIP=ten.zero.zero.fifty
expect_refused "webhook.certificate.source" --set webhook.certificate.source=vault
expect_refused "Additional property webhooks is not allowed" --set webhooks.failurePolicy=Fail
expect_refused "Additional property proxyPrt is not allowed" --set injection.config.proxyPrt=15001
expect_refused "Additional property imagePullPolicy is not allowed" --set injection.config.imagePullPolicy=Always
expect_refused "differs from image.sidecar.pullPolicy" --set image.envoy.pullPolicy=Always
expect_refused "needs webhook.certificate.secretName" --set webhook.certificate.source=secret
expect_refused "needs webhook.certificate.source=certManager" --set webhook.certificate.patchCABundle=false
expect_refused "must be below operator.terminationGracePeriodSeconds" --set operator.shutdownDrainSeconds=30
expect_refused "operator.shutdownDrainSeconds" --set operator.shutdownDrainSeconds=-1
expect_refused "credentialBrokering.enabled" --set-string credentialBrokering.enabled=yes
expect_refused "Additional property enable is not allowed" --set credentialBrokering.enable=true
pass "bad values: ${refused} cases refused by values.schema.json or the chart's checks"

if ((failures)); then
  die "chart check: ${failures} failure(s)"
fi
log "chart check passed"
