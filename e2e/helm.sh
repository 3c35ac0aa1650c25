#!/usr/bin/env bash
# The end-to-end suite: Mandate installed with Helm from charts/ on a real
# single-node cluster, used the way a cluster admin uses it, with kubectl.
#
#   e2e/helm.sh            (root; `make e2e`, and part of `make test`)
#
# Uses the running node cluster (hack/cluster.sh up --node) or brings one up
# and takes it down again. Builds Mandate's images as images/Dockerfile does
# (static binaries), imports them into the node's containerd, installs the
# chart, then checks, each step waiting on a condition with a deadline:
#   - an agent pod in an enforced namespace runs with Envoy + mandate-sidecar
#     injected and holds an X.509-SVID for its AgentIdentity;
#   - allowed requests reach an upstream pod; denied ones get 403 with a
#     decision id that is in the sidecar's decision log with the policy version;
#   - a DryRun policy's violation is logged but does not block;
#   - a changed policy is enforced without restarting anything;
#   - a bad policy is refused by kubectl apply with the reason;
#   - killing the sidecar container denies traffic until it is back;
#   - with every operator pod gone the last policy stays enforced, and the
#     sidecar resyncs when the operator is back;
#   - helm upgrade keeps the CRDs and the policies;
#   - a pod in an unlabelled namespace, and one in kube-system (even labelled
#     for enforcement), is untouched.
# On failure it prints the pods, events and logs that explain it.
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/../hack/lib.sh"
require_root "$0"
cd "$MANDATE_ROOT"

RELEASE=mandate
OP_NS=mandate-system
AGENTS=mandate-e2e-agents
PLAIN=mandate-e2e-plain
SERVICE_IP=10.0.0.50 # pinned: the test cluster has no DNS for sidecars to find the operator
TRUST_DOMAIN=e2e.mandate.test
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
TESTBIN="mandate.local/testbin:${VERSION}"

tmp="$(mktemp -d)"
started=0
K() { "$K8S_BIN/kubectl" --kubeconfig "$CLUSTER_DIR/kubeconfig" "$@"; }
H() { "$HELM_BIN" --kubeconfig "$CLUSTER_DIR/kubeconfig" "$@"; }
export HELM_CACHE_HOME="$tmp/helm/cache" HELM_CONFIG_HOME="$tmp/helm/config" HELM_DATA_HOME="$tmp/helm/data"

dump() {
  log "state of the cluster at the failure:"
  K get pods -A -o wide || true
  local ns p c
  for ns in "$OP_NS" "$AGENTS" "$PLAIN"; do
    echo "--- events in $ns"
    K get events -n "$ns" --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 || true
    for p in $(K get pods -n "$ns" -o name 2>/dev/null); do
      for c in $(K get -n "$ns" "$p" -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}' 2>/dev/null); do
        echo "--- logs $ns/${p#pod/}/$c"
        K logs -n "$ns" "$p" -c "$c" --tail=60 2>&1 || true
      done
    done
  done
}
dumped=0
fail() {
  log "FAIL: $*"
  dumped=1
  dump
  exit 1
}
pass() { log "ok: $*"; }

cleanup() {
  local rc=$?
  # A command that failed under set -e, not through fail: explain it too.
  if ((rc != 0 && !dumped)) && [ -f "$CLUSTER_DIR/kubeconfig" ]; then
    log "FAIL: exit status $rc"
    dump
  fi
  if ((started)); then
    hack/cluster.sh down >/dev/null 2>&1 || log "teardown incomplete; run hack/cluster.sh down"
  elif [ -f "$CLUSTER_DIR/cluster.env" ]; then
    # A cluster that was up before stays up, without what this suite made.
    H uninstall "$RELEASE" -n "$OP_NS" >/dev/null 2>&1 || true
    K label ns kube-system mandate.dev/enforce- >/dev/null 2>&1 || true
    K delete pod -n kube-system mandate-e2e-probe --grace-period=0 --wait=false >/dev/null 2>&1 || true
    K delete configmap -n kube-system mandate-trust-bundle >/dev/null 2>&1 || true
    K delete ns "$AGENTS" "$PLAIN" "$OP_NS" --wait=false >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT

# until_ok DESCRIPTION SECONDS COMMAND...: wait_for, failing the suite with
# the cluster's state on timeout.
until_ok() {
  wait_for "$@" || fail "timed out waiting for $1"
}

# ------------------------------------------------------------------ setup

[ -x "$HELM_BIN" ] || die "no Helm at $HELM_BIN; run make deps"
need_cmd jq jq
need_cmd curl curl
if [ -f "$CLUSTER_DIR/cluster.env" ]; then
  grep -qx 'MANDATE_CLUSTER_MODE=node' "$CLUSTER_DIR/cluster.env" ||
    die "a control-plane-only cluster is up; this suite needs a node (hack/cluster.sh down; hack/cluster.sh up --node)"
  if H status "$RELEASE" -n "$OP_NS" >/dev/null 2>&1; then
    die "Mandate is already installed in this cluster ($OP_NS/$RELEASE); uninstall it first"
  fi
else
  log "bringing up a node"
  started=1
  hack/cluster.sh up --node
fi

# A previous run on this cluster may still be deleting its namespaces.
namespaces_gone() {
  local all
  all="$(K get ns -o name)" || return 1
  ! grep -Eq "^namespace/(${OP_NS}|${AGENTS}|${PLAIN})\$" <<<"$all"
}
wait_for "a previous run's namespaces to be deleted" 180 namespaces_gone || die "namespaces $OP_NS/$AGENTS/$PLAIN are still there"

log "building and importing Mandate's images"
built="$(hack/image.sh mandate)" || fail "building Mandate's images"
mapfile -t images <<<"$built"
hack/image.sh import "${images[@]}" || fail "importing Mandate's images"

cat >"$tmp/values.yaml" <<EOF
trustDomain: ${TRUST_DOMAIN}
image:
  operator: {repository: mandate.local/operator, tag: "${VERSION}", pullPolicy: Never}
  sidecar: {repository: mandate.local/sidecar, tag: "${VERSION}", pullPolicy: Never}
  envoy: {repository: mandate.local/envoy, tag: "${ENVOY_VERSION}", pullPolicy: Never}
service:
  clusterIP: ${SERVICE_IP}
identity:
  svidServerURL: https://${SERVICE_IP}:9444
  policyServerURL: https://${SERVICE_IP}:9445
EOF

# CRDs applied earlier with kubectl (the cargo tests on this node do) are
# adopted into the release the way charts/mandate/README.md tells admins to.
for crd in $(K get crd -o name | grep '\.mandate\.dev$' || true); do
  K annotate "$crd" meta.helm.sh/release-name="$RELEASE" meta.helm.sh/release-namespace="$OP_NS" --overwrite >/dev/null
  K label "$crd" app.kubernetes.io/managed-by=Helm --overwrite >/dev/null
  log "adopted ${crd#*/} into the release"
done

log "helm install $RELEASE charts/mandate"
t_install=$SECONDS
H install "$RELEASE" charts/mandate -n "$OP_NS" --create-namespace -f "$tmp/values.yaml" --wait --timeout 180s ||
  fail "helm install"
ready="$(K get deploy -n "$OP_NS" -o jsonpath='{.items[0].status.readyReplicas}')"
[ "$ready" = 2 ] || fail "the operator has ${ready:-0} ready replicas, want 2"
pass "helm install: 2 operator replicas ready in $((SECONDS - t_install))s"
K get crd agentpolicies.mandate.dev agentidentities.mandate.dev agentapprovals.mandate.dev >/dev/null ||
  fail "the chart did not install the CRDs"

K create ns "$AGENTS" >/dev/null
K label ns "$AGENTS" mandate.dev/enforce=true >/dev/null
K create ns "$PLAIN" >/dev/null

# ------------------------------------------------------------------ upstream

# The upstream the agent calls, in a namespace that is not enforced: it
# also shows that such pods are left alone, even when they ask for injection.
K apply -n "$PLAIN" -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: upstream
  labels: {app: upstream, agent: researcher, mandate.dev/inject: "true"}
spec:
  containers:
  - name: serve
    image: ${TESTBIN}
    imagePullPolicy: Never
    args: [serve]
    env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
EOF

pod_ready() { [ "$(K get pod -n "$1" "$2" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
until_ok "the upstream pod to be ready" 120 pod_ready "$PLAIN" upstream
up="$(K get pod -n "$PLAIN" upstream -o json)"
[ "$(jq '.spec.containers | length' <<<"$up")" = 1 ] && [ "$(jq -r '.metadata.annotations["mandate.dev/injected"] // ""' <<<"$up")" = "" ] ||
  fail "a pod in an unlabelled namespace was changed: $(jq -c '[.spec.containers[].name, .metadata.annotations]' <<<"$up")"
UP_IP="$(jq -r .status.podIP <<<"$up")"
pass "a pod in an unlabelled namespace is untouched (even with mandate.dev/inject=true)"

# ------------------------------------------------------------------ policies

policy() { # NAME MODE REGO-BODY
  cat <<EOF
apiVersion: mandate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: $1}
spec:
  identities: [researcher]
  mode: $2
  modules:
  - name: authz.rego
    rego: |
      package mandate.authz
      import rego.v1
$(sed 's/^/      /' <<<"$3")
EOF
}
READS_ONLY='default decision := {"allow": false, "reason": "only reads of /allowed"}
decision := true if {
  input.attributes.request.http.method == "GET"
  startswith(input.attributes.request.http.path, "/allowed")
}'
# The change: every GET allowed.
READS_ANY='default decision := {"allow": false, "reason": "only reads"}
decision := true if input.attributes.request.http.method == "GET"'
SHADOW='default decision := true
decision := {"allow": false, "reason": "shadow paths will be denied"} if {
  contains(input.attributes.request.http.path, "shadow")
}'

policy reads-only Enforce "$READS_ONLY" | K apply -n "$AGENTS" -f - >/dev/null || fail "applying reads-only"
policy shadow DryRun "$SHADOW" | K apply -n "$AGENTS" -f - >/dev/null || fail "applying shadow"
has_version() { [ -n "$(K get agentpolicy -n "$AGENTS" "$1" -o jsonpath='{.status.version}')" ]; }
until_ok "reads-only to be compiled" 60 has_version reads-only
until_ok "shadow to be compiled" 60 has_version shadow
pass "AgentPolicies applied and compiled"

# ------------------------------------------------------------------ the agent

AGENT_POD="$(cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: agent
  labels: {agent: researcher}
spec:
  # An explicit UID: Mandate refuses an agent whose UID it cannot see.
  securityContext: {runAsUser: 1000, runAsNonRoot: true}
  containers:
  - name: agent
    image: ${TESTBIN}
    imagePullPolicy: Never
    args: [agent]
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
EOF
)"
# Created right after its AgentIdentity (one apply of both, as GitOps does):
# the very first pod must come out injected.
K apply -n "$AGENTS" -f - >/dev/null <<EOF || fail "applying the AgentIdentity"
apiVersion: mandate.dev/v1alpha1
kind: AgentIdentity
metadata: {name: researcher}
spec:
  selector: {matchLabels: {agent: researcher}}
  svidTtl: 10m
EOF
K apply -n "$AGENTS" -f - <<<"$AGENT_POD" >/dev/null || fail "creating the agent pod"
[ -n "$(K get pod -n "$AGENTS" agent -o jsonpath='{.metadata.annotations.mandate\.dev/injected}')" ] ||
  fail "the agent pod, created right after its AgentIdentity, was not injected"
until_ok "the agent pod to be ready" 180 pod_ready "$AGENTS" agent
agent="$(K get pod -n "$AGENTS" agent -o json)"
names="$(jq -c '[.spec.initContainers[]?.name, .spec.containers[].name]' <<<"$agent")"
[ "$names" = '["mandate-egress-init","mandate-envoy","mandate-sidecar","agent"]' ] || fail "the agent pod's containers are $names (the egress rules' init container first)"
# On this cluster (>= 1.29) the chart's default (nativeSidecars: auto) injects
# native sidecars: restartable init containers.
restartable="$(jq -c '[.spec.initContainers[]? | select(.restartPolicy == "Always") | .name]' <<<"$agent")"
[ "$restartable" = '["mandate-envoy","mandate-sidecar"]' ] || fail "Envoy and the sidecar are not native sidecars: restartable init containers are $restartable"
AGENT_IP="$(jq -r .status.podIP <<<"$agent")"
AGENT_UID="$(jq -r .metadata.uid <<<"$agent")"
pass "the agent pod runs with Envoy and mandate-sidecar injected as native sidecars ($names; restartable: $restartable)"

# A hostile operator of the agent attaches an ephemeral container (it would
# share the pod's network with no proxy and no decision): refused.
if out="$(K debug -n "$AGENTS" agent --image="$TESTBIN" --image-pull-policy=Never -c debugger -- true 2>&1)"; then
  fail "kubectl debug attached an ephemeral container to the agent pod: $out"
fi
has "ephemeral containers .kubectl debug. are refused on agent pods" <<<"$out" || fail "kubectl debug was refused, but not by Mandate: $out"
[ "$(K get pod -n "$AGENTS" agent -o jsonpath='{.spec.ephemeralContainers}')" = "" ] ||
  fail "the agent pod has an ephemeral container after the refusal"
pass "kubectl debug on the agent pod is refused by the pod guard, with the reason"
# Relabelling the pod away from its identity (to shed its policies) is
# refused by the guard with the reason; its labels stay as they were.
if out="$(K label pod -n "$AGENTS" agent agent=nobody --overwrite 2>&1)"; then
  fail "relabelling the agent pod away from its identity was admitted: $out"
fi
has "would make the agent pod's identity no identity" <<<"$out" ||
  fail "relabelling the agent pod was refused, but not by Mandate: $out"
[ "$(K get pod -n "$AGENTS" agent -o jsonpath='{.metadata.labels.agent}')" = "researcher" ] ||
  fail "the agent pod's labels changed despite the refusal"
pass "relabelling an injected pod away from its identity is refused by the pod guard, with the reason"
# Taking the namespace's opt-in back while the agent runs (so that the next
# pod starts unguarded) is refused by the namespace guard.
if out="$(K label ns "$AGENTS" mandate.dev/enforce- 2>&1)"; then
  K label ns "$AGENTS" mandate.dev/enforce=true --overwrite >/dev/null 2>&1 || true
  fail "removing the namespace's opt-in with an agent running was admitted: $out"
fi
has "running agent pod.s. Mandate injected .agent." <<<"$out" ||
  fail "removing the opt-in was refused, but not by Mandate: $out"
[ "$(K get ns "$AGENTS" -o jsonpath='{.metadata.labels.mandate\.dev/enforce}')" = "true" ] ||
  fail "the namespace's opt-in is gone despite the refusal"
pass "removing the namespace's opt-in while an injected agent runs is refused by the namespace guard, with the reason"

svid_issued() {
  K get agentidentity -n "$AGENTS" researcher -o json | jq -e '.status.svids[]? | select(.pod == "agent")' >/dev/null
}
until_ok "the agent's SVID to be recorded on its AgentIdentity" 60 svid_issued
SPIFFE_ID="$(K get agentidentity -n "$AGENTS" researcher -o jsonpath='{.status.spiffeId}')"
[ -n "$SPIFFE_ID" ] || fail "AgentIdentity researcher has no status.spiffeId"
pass "the agent holds an X.509-SVID for $SPIFFE_ID"

# Envoy's admin is a unix socket the agent cannot mount, and the egress
# rules refuse the agent every Mandate port on loopback (Envoy's readiness
# listener too), while its own loopback service answers (the control: the
# agent reaches loopback when it bypasses its proxy).
agent_get() { curl -sf --max-time 15 "http://${AGENT_IP}:8080/do?method=GET&direct=1&url=http://127.0.0.1:$1"; }
r="$(agent_get 8080/own)" && [ -n "$(jq -r '.status // empty' <<<"$r")" ] ||
  fail "the agent cannot reach its own loopback service: $r"
for port in 15000 15021; do
  r="$(agent_get "$port/ready")" || fail "the agent's request to 127.0.0.1:$port failed: $r"
  [ "$(jq -r '.status // empty' <<<"$r")" = "" ] && [ -n "$(jq -r '.error // empty' <<<"$r")" ] ||
    fail "the agent reached Mandate's loopback port $port: $r"
done
pass "the agent cannot reach Envoy's admin (a unix socket in Mandate's volume, no loopback port)"

# do METHOD PATH: the agent makes a request to the upstream through its
# proxy; prints the agent's JSON account of the response.
do_req() {
  curl -sf --max-time 10 "http://${AGENT_IP}:8080/do?method=$1&url=http://${UP_IP}:8080$2"
}
status_is() { # WANT METHOD PATH
  [ "$(do_req "$2" "$3" | jq -r .status)" = "$1" ]
}
sidecar_log() { K logs -n "$AGENTS" agent -c mandate-sidecar 2>/dev/null; }
# record ID: the sidecar's decision-log line for decision ID.
record() { sidecar_log | grep -F "\"decision_id\":\"$1\"" | head -n1; }
in_force() { [ "$(K get agentpolicy -n "$AGENTS" "$1" -o jsonpath='{.status.inForce}')" = "1/1" ]; }
until_ok "reads-only to be 1/1 in force" 60 in_force reads-only

# ------------------------------------------------------------------ decisions

r="$(do_req GET /allowed/1)" || fail "the agent could not make a request"
[ "$(jq -r .status <<<"$r")" = 200 ] && jq -r .body <<<"$r" | has '"server":"upstream"' ||
  fail "an allowed GET did not reach the upstream: $r"
pass "an allowed request reaches the upstream"

r="$(do_req POST /allowed/1)"
[ "$(jq -r .status <<<"$r")" = 403 ] || fail "a POST was not denied: $r"
id="$(jq -r '.body | fromjson | .decision_id' <<<"$r")"
reason="$(jq -r '.body | fromjson | .reason' <<<"$r")"
[[ "$reason" == *"only reads"* ]] || fail "the denial's reason is '$reason'"
version="$(K get agentpolicy -n "$AGENTS" reads-only -o jsonpath='{.status.version}')"
until_ok "decision $id in the sidecar's log" 20 record "$id"
rec="$(record "$id")"
jq -e --arg v "$version" --arg s "$SPIFFE_ID" --arg p "$AGENTS/reads-only" '
  .result == "deny" and .agent.identity == "researcher" and .agent.spiffe_id == $s
  and any(.policies[]; .name == $p and .version == $v and .result == "deny")' <<<"$rec" >/dev/null ||
  fail "the decision record does not name the agent and policy version $version: $rec"
pass "a denied request gets 403 with decision $id, logged with reads-only@${version:0:19}…"

r="$(do_req GET /allowed/shadow)"
[ "$(jq -r .status <<<"$r")" = 200 ] || fail "a DryRun violation blocked the request: $r"
id="$(jq -r '.headers["x-mandate-decision-id"]' <<<"$r")"
until_ok "decision $id in the sidecar's log" 20 record "$id"
jq -e --arg p "$AGENTS/shadow" '.result == "allow" and any(.policies[]; .name == $p and .mode == "DryRun" and .result == "deny")' \
  <<<"$(record "$id")" >/dev/null || fail "the DryRun violation was not logged: $(record "$id")"
pass "a DryRun policy's violation is logged but does not block"

# ------------------------------------------------------------------ a change

# The sidecar's status: a native sidecar's is among the init containers'.
sidecar_status() {
  K get pod -n "$AGENTS" agent -o json |
    jq -e '[(.status.containerStatuses // [])[], (.status.initContainerStatuses // [])[] | select(.name == "mandate-sidecar")] | first'
}
restarts() { sidecar_status | jq -r .restartCount; }
before="$(restarts)"
status_is 403 GET /secret || fail "GET /secret was not denied before the change"
ms() { echo $(($(date +%s%N) / 1000000)); }
t0=$(ms)
policy reads-only Enforce "$READS_ANY" |
  K apply -n "$AGENTS" -f - >/dev/null || fail "applying the changed policy"
until_ok "the changed policy to be enforced" 30 status_is 200 GET /secret
t_enforced=$(($(ms) - t0))
new_version="$(K get agentpolicy -n "$AGENTS" reads-only -o jsonpath='{.status.version}')"
[ "$new_version" != "$version" ] || fail "the policy's version did not change"
until_ok "the new version to be 1/1 in force" 30 in_force reads-only
[ "$(restarts)" = "$before" ] && [ "$(K get pod -n "$AGENTS" agent -o jsonpath='{.metadata.uid}')" = "$AGENT_UID" ] ||
  fail "the change restarted something"
pass "a changed policy is enforced in ${t_enforced} ms (kubectl apply -> allowed in the pod) without a restart, and is 1/1 in force"

# ------------------------------------------------------------------ bad input

bad="$(policy broken Enforce 'decision := true if {
  input.attributes.request.http.method ==
}' | K apply -n "$AGENTS" -f - 2>&1)" && fail "a policy with a syntax error was accepted"
grep -Eq 'authz\.rego:[0-9]+:[0-9]+' <<<"$bad" || fail "the refusal does not name module:line:col: $bad"
K get agentpolicy -n "$AGENTS" broken >/dev/null 2>&1 && fail "the refused policy is in the cluster"
pass "a bad policy is refused by kubectl apply: $(grep -o 'authz\.rego:[0-9]*:[0-9]*[^"]*' <<<"$bad" | head -n1 | cut -c1-90)"

# ------------------------------------------------------------------ the sidecar dies

sock="$(sed -n 's/^MANDATE_CONTAINERD_SOCK=//p' "$CLUSTER_DIR/cluster.env")"
cid="$(sidecar_status | jq -r '.containerID | sub("containerd://"; "")')"
before="$(restarts)"
"$CONTAINERD_BIN/ctr" --address "$sock" --namespace k8s.io task kill --signal SIGKILL "$cid" >/dev/null || fail "ctr task kill"
denied_while_down=0
back_and_allowing() {
  local s
  s="$(do_req GET /allowed/2 | jq -r .status)"
  if [ "$s" = 403 ]; then denied_while_down=$((denied_while_down + 1)); fi
  [ "$s" = 200 ] && [ "$(restarts)" -gt "$before" ] && pod_ready "$AGENTS" agent
}
deadline=$((SECONDS + 120))
until back_and_allowing; do
  ((SECONDS < deadline)) || fail "the sidecar did not come back within 120s"
  sleep 0.2
done
((denied_while_down > 0)) || fail "no request was seen denied while the sidecar was down"
pass "with the sidecar killed, requests were denied ($denied_while_down seen) until kubelet restarted it"

# ------------------------------------------------------------------ the operator goes away

K scale deploy -n "$OP_NS" -l app.kubernetes.io/name=mandate --replicas=0 >/dev/null || fail "scaling the operator down"
no_operator() { [ -z "$(K get pods -n "$OP_NS" -l app.kubernetes.io/name=mandate -o name)" ]; }
until_ok "every operator pod to be gone" 90 no_operator
for _ in 1 2 3 4 5; do
  status_is 200 GET /secret || fail "with no operator, an allowed request was not allowed"
  status_is 403 DELETE /secret || fail "with no operator, a denied request was not denied"
done
pass "with every operator pod gone, the last policy stays enforced"
K scale deploy -n "$OP_NS" -l app.kubernetes.io/name=mandate --replicas=2 >/dev/null || fail "scaling the operator up"
operator_ready() { [ "$(K get deploy -n "$OP_NS" -l app.kubernetes.io/name=mandate -o jsonpath='{.items[0].status.readyReplicas}')" = 2 ]; }
until_ok "the operator to be back with 2 ready replicas" 120 operator_ready
# Ready replicas come before kube-proxy routes the Service to them (the
# apiserver then sees "connection refused"): wait until the webhook answers.
webhook_answers() { policy reads-only Enforce "$READS_ONLY" | K apply --dry-run=server -n "$AGENTS" -f - >/dev/null 2>&1; }
until_ok "the validating webhook to answer through its Service" 60 webhook_answers
# The sidecar reconnects to a new replica and keeps what it enforced (a
# replica that has not loaded its caches must not hand it an empty set).
for _ in 1 2 3 4 5; do
  status_is 200 GET /secret || fail "after the operator's return, the policy in force was lost"
done
# The sidecar resyncs: a change made now is enforced.
policy reads-only Enforce "$READS_ONLY" | K apply -n "$AGENTS" -f - >/dev/null || fail "re-applying reads-only"
until_ok "the policy applied after the operator's return to be enforced" 60 status_is 403 GET /secret
status_is 200 GET /allowed/after-return || fail "the policy applied after the operator's return denies what it allows"
pass "the operator is back and the sidecar resynced"

# ------------------------------------------------------------------ helm upgrade

# A changed pod template: the operator's replicas roll (one at a time, the
# PodDisruptionBudget holding one), and the sidecar's stream moves with them.
H upgrade "$RELEASE" charts/mandate -n "$OP_NS" -f "$tmp/values.yaml" --set webhook.timeoutSeconds=7 \
  --set-string operator.podAnnotations.e2e-upgrade=1 --wait --timeout 180s >/dev/null || fail "helm upgrade"
[ "$(K get mutatingwebhookconfiguration -l app.kubernetes.io/instance="$RELEASE" -o jsonpath='{.items[0].webhooks[0].timeoutSeconds}')" = 7 ] ||
  fail "helm upgrade did not change the webhook timeout"
K get crd agentpolicies.mandate.dev >/dev/null || fail "helm upgrade removed the CRDs"
[ "$(K get agentpolicy -n "$AGENTS" -o name | wc -l)" = 2 ] || fail "helm upgrade lost policies"
until_ok "enforcement after the upgrade" 30 status_is 403 POST /allowed/1
until_ok "the validating webhook to answer after the upgrade" 60 webhook_answers
policy reads-only Enforce "$READS_ANY" | K apply -n "$AGENTS" -f - >/dev/null || fail "applying after the upgrade"
until_ok "a change after the upgrade to be enforced" 60 status_is 200 GET /secret
pass "helm upgrade (operator rolled) keeps the CRDs and the policies; changes are still pushed"

# ------------------------------------------------------------------ kube-system

K label ns kube-system mandate.dev/enforce=true --overwrite >/dev/null
K apply -n kube-system -f - >/dev/null <<EOF || fail "creating a pod in kube-system"
apiVersion: v1
kind: Pod
metadata:
  name: mandate-e2e-probe
  labels: {agent: researcher, mandate.dev/inject: "true"}
spec:
  containers: [{name: c, image: ${TESTBIN}, imagePullPolicy: Never, args: [serve]}]
EOF
p="$(K get pod -n kube-system mandate-e2e-probe -o json)"
K delete pod -n kube-system mandate-e2e-probe --grace-period=0 --force >/dev/null 2>&1 || true
K label ns kube-system mandate.dev/enforce- >/dev/null
[ "$(jq '.spec.containers | length' <<<"$p")" = 1 ] && [ "$(jq -r '.metadata.annotations["mandate.dev/injected"] // ""' <<<"$p")" = "" ] ||
  fail "a kube-system pod was injected: $(jq -c '[.spec.containers[].name]' <<<"$p")"
ks="$(K get pods -n kube-system -o json)" || fail "listing kube-system's pods"
if jq -e '.items[].spec | (.containers + (.initContainers // []))[] | select(.name | startswith("mandate-"))' <<<"$ks" >/dev/null; then
  fail "a kube-system pod carries Mandate's containers"
fi
if K get configmap -n kube-system mandate-trust-bundle >/dev/null 2>&1; then
  fail "the operator published its trust bundle into kube-system"
fi
pass "kube-system is never affected, even labelled for enforcement"

# The chart's own webhook configurations, checked for drift all along (a
# webhook deleted, set to Ignore, narrowed), were never reported.
# (Only the chart's: the operator tests before this run leave their own.)
whc="$(K get mutatingwebhookconfiguration -l app.kubernetes.io/instance="$RELEASE" -o jsonpath='{.items[0].metadata.name}')" ||
  fail "finding the chart's webhook configuration"
sel="reason=WebhookDrift,involvedObject.name=$whc"
drift="$(K get events -A --field-selector "$sel" -o name 2>&1)" || fail "listing events: $drift"
[ -z "$drift" ] || fail "the chart's webhook configurations were reported as drifted: $(K get events -A --field-selector "$sel" -o jsonpath='{.items[*].message}')"
pass "the chart's webhook configurations pass the operator's drift check"

log "what kubectl shows:"
K get agentpolicies,agentidentities -n "$AGENTS" >&2
log "e2e: all checks passed in ${SECONDS}s"
