#!/usr/bin/env python3
"""The chart check's YAML work (run by hack/chart-check.sh, in its venv).

  chart_check.py crs CRD_FILE FILE...
      Every Mandate custom resource in FILEs validates against the
      openAPIV3Schema of its CRD in CRD_FILE (unknown fields refused, as a
      strict apiserver would).
  chart_check.py crs --expect-invalid CRD_FILE FILE...
      Every document in FILEs is refused, for the reason its annotation
      chart-check.mandate.dev/expect names (the validator's own negative test).
  chart_check.py rendered --crds CRD_FILE --operator-reference REFERENCE_MD --router MOD_RS
                          --namespace NS --pdb API_VERSION RENDERED
      What `helm template` rendered keeps the chart's promises: the CRDs are
      those of CRD_FILE, RBAC is least-privilege, the pod is hardened, the
      webhooks match the operator's routes and exempt kube-system and NS, every
      MANDATE_* variable is one the operator reads, SPIRE mode mounts the
      Workload API, a pinned Service IP is in the certificates' names; with
      credential brokering on (MANDATE_CREDENTIAL_BROKERING=true), and only
      then, the ClusterRole reads secrets (get, list, watch; never a write)
      and creates serviceaccounts/token.

Exit status 1 with one line per problem.
"""

import copy
import re
import sys

import jsonschema
import yaml

# Environment variables the chart sets that the operator in this tree does not
# read yet, with the work that adds them.
PENDING_ENV = {}
# On each document of an --expect-invalid file: text its refusal must contain.
EXPECT_ANNOTATION = "chart-check.mandate.dev/expect"

problems = []


def problem(msg):
    problems.append(msg)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ------------------------------------------------------------------ CRs vs CRDs


def to_json_schema(s):
    """A CRD's structural OpenAPI v3 schema as JSON Schema (draft 7).

    x-kubernetes-preserve-unknown-fields keeps an object open; every other
    object with properties is closed (additionalProperties: false), since
    the apiserver would prune (or, strictly, refuse) unknown fields.
    x-kubernetes-int-or-string becomes integer-or-string; nullable adds null;
    descriptions, defaults, formats and other x-kubernetes-* keys do not
    affect validation here.
    """
    out = {}
    for k, v in s.items():
        if k.startswith("x-kubernetes-") or k in ("nullable", "description", "default", "format"):
            continue
        if k == "properties":
            out[k] = {name: to_json_schema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = to_json_schema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [to_json_schema(x) for x in v]
        else:
            out[k] = copy.deepcopy(v)
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not s.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_validators(crd_file):
    """(apiVersion, kind) -> a validator for the whole object."""
    validators = {}
    for crd in load_all(crd_file):
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for ver in spec["versions"]:
            if not ver.get("served", True):
                continue
            schema = to_json_schema(ver["schema"]["openAPIV3Schema"])
            api_version = f"{spec['group']}/{ver['name']}"
            schema.setdefault("properties", {})
            schema["properties"]["apiVersion"] = {"const": api_version}
            schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
            # The CRD does not describe metadata; check what every object needs.
            schema["properties"]["metadata"] = {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": 253,
                        "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                    },
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            }
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
            schema["additionalProperties"] = False
            jsonschema.Draft7Validator.check_schema(schema)
            validators[(api_version, spec["names"]["kind"])] = (spec["group"], jsonschema.Draft7Validator(schema))
    return validators


def cr_errors(validators, doc):
    """Why `doc` is not a valid Mandate resource ([] when it is)."""
    if not isinstance(doc, dict):
        return ["not a YAML mapping"]
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in validators:
        groups = {g for g, _ in validators.values()}
        known = ", ".join(sorted(f"{a} {k}" for a, k in validators))
        if str(doc.get("apiVersion", "")).split("/")[0] not in groups:
            return [f"{key[0]} {key[1]} is not a Mandate resource (known: {known})"]
        return [f"no served CRD version for {key[0]} {key[1]} (known: {known})"]
    errors = sorted(validators[key][1].iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors]


def cmd_crs(args):
    expect_invalid = False
    if args and args[0] == "--expect-invalid":
        expect_invalid = True
        args = args[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    validators = crd_validators(args[0])
    if not validators:
        sys.exit(f"no CustomResourceDefinition in {args[0]}")
    checked = 0
    for path in args[1:]:
        for i, doc in enumerate(load_all(path)):
            checked += 1
            name = f"{path}#{i + 1} {doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
            errors = cr_errors(validators, doc)
            if expect_invalid:
                meta = doc.get("metadata") or {}
                want = (meta.get("annotations") or {}).get(EXPECT_ANNOTATION)
                if not errors:
                    problem(f"{name}: accepted, but it is invalid (the CR validator lets bad resources through)")
                elif not want:
                    problem(f"{name}: has no {EXPECT_ANNOTATION} annotation saying why it must be refused")
                elif not any(want in e for e in errors):
                    problem(f"{name}: refused, but not for the expected reason ({want!r}): {errors}")
            elif not expect_invalid:
                for e in errors:
                    problem(f"{name}: {e}")
    if checked == 0:
        problem(f"no documents in {' '.join(args[1:])}")
    return checked


# ------------------------------------------------------------ rendered chart


def strip_chart_metadata(crd):
    crd = copy.deepcopy(crd)
    crd["metadata"].pop("labels", None)
    crd["metadata"].pop("annotations", None)
    return crd


def operator_env_names(reference_md):
    """The environment variables mandate-operator reads: its generated flag
    reference (docs/reference/mandate-operator.md, `make reference`; a test
    fails when it drifts from the binary) names each as `[env: NAME=]`."""
    with open(reference_md, encoding="utf-8") as f:
        names = set(re.findall(r"\[env: ([A-Z0-9_]+)=", f.read()))
    if not names:
        raise SystemExit(f"{reference_md} names no environment variable; run make reference")
    return names


def router_paths(mod_rs):
    with open(mod_rs, encoding="utf-8") as f:
        return set(re.findall(r'\.route\(\s*"([^"]+)"', f.read()))


def check_rendered(docs, crd_file, env_known, paths, ns, pdb_version):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    def one(kind):
        items = by_kind.get(kind, [])
        if len(items) != 1:
            problem(f"expected exactly one {kind}, rendered {len(items)}")
            return None
        return items[0]

    # CRDs: exactly the generated ones, plus only Helm's labels and annotations.
    want = {c["metadata"]["name"]: c for c in load_all(crd_file) if c.get("kind") == "CustomResourceDefinition"}
    got = {c["metadata"]["name"]: c for c in by_kind.get("CustomResourceDefinition", [])}
    if got:
        if set(got) != set(want):
            problem(f"rendered CRDs {sorted(got)} differ from {crd_file}'s {sorted(want)}")
        for name in set(got) & set(want):
            if strip_chart_metadata(got[name]) != strip_chart_metadata(want[name]):
                problem(f"rendered CRD {name} differs from {crd_file} (beyond labels and annotations)")

    # Brokered credentials (credentialBrokering.enabled) are on when the
    # Deployment passes MANDATE_CREDENTIAL_BROKERING=true.
    deployments = by_kind.get("Deployment", [])
    brokering = any(
        e.get("name") == "MANDATE_CREDENTIAL_BROKERING" and str(e.get("value")).lower() == "true"
        for d in deployments
        for c in d["spec"]["template"]["spec"].get("containers", [])
        for e in c.get("env", [])
    )
    writes = {"create", "update", "patch", "delete", "deletecollection", "*"}

    # RBAC: no wildcards; namespaced secrets by name; cluster-wide secrets
    # only read, and only with brokering on; serviceaccounts/token only then.
    broker_rules = {"secrets": False, "serviceaccounts/token": False}
    for kind in ("ClusterRole", "Role"):
        for role in by_kind.get(kind, []):
            for rule in role.get("rules", []):
                where = f"{kind} {role['metadata']['name']}: rule {rule}"
                verbs = set(rule.get("verbs", []))
                if "*" in rule.get("verbs", []) + rule.get("resources", []) + rule.get("apiGroups", []):
                    problem(f"{where} uses a wildcard")
                pod_writes = verbs & writes
                if any(r == "pods" or r.startswith("pods/") or r == "*" for r in rule.get("resources", [])) and pod_writes:
                    problem(f"{where} writes pods ({sorted(pod_writes)}): the operator only reads them")
                if "serviceaccounts/token" in rule.get("resources", []):
                    if not brokering:
                        problem(f"{where} mints service-account tokens, but credentialBrokering is off")
                    elif kind != "ClusterRole" or verbs != {"create"} or rule.get("resources") != ["serviceaccounts/token"]:
                        problem(f"{where}: serviceaccounts/token is granted only as create, alone, in the operator's ClusterRole")
                    else:
                        broker_rules["serviceaccounts/token"] = True
                if "secrets" in rule.get("resources", []):
                    if kind == "ClusterRole":
                        if not brokering:
                            problem(f"{where} grants secrets cluster-wide, but credentialBrokering is off")
                        elif verbs & writes:
                            problem(f"{where} writes secrets cluster-wide ({sorted(verbs & writes)}): brokering only reads them")
                        elif verbs != {"get", "list", "watch"} or rule.get("resources") != ["secrets"]:
                            problem(f"{where}: brokering reads secrets with exactly get, list, watch, in a rule of their own")
                        else:
                            broker_rules["secrets"] = True
                        continue
                    reads = verbs & {"get", "list", "watch", "update", "patch", "delete"}
                    if reads and not rule.get("resourceNames"):
                        problem(f"{where} reads or writes secrets without resourceNames")
                    if verbs & {"list", "watch"}:
                        problem(f"{where} lists or watches secrets")
    if brokering:
        for resource, present in broker_rules.items():
            if not present:
                problem(f"credentialBrokering is on, but the operator's ClusterRole has no rule for {resource}")
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        for b in by_kind.get(kind, []):
            if b["roleRef"]["name"] in ("cluster-admin", "admin", "edit"):
                problem(f"{kind} {b['metadata']['name']} binds {b['roleRef']['name']}")

    # The Deployment: hardened, probed, every variable one the operator reads.
    dep = one("Deployment")
    if dep:
        pod = dep["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        (c,) = [c for c in pod["containers"] if c["name"] == "operator"]
        sc = c.get("securityContext", {})
        for key, want_v in (
            ("runAsNonRoot", True),
            ("readOnlyRootFilesystem", True),
            ("allowPrivilegeEscalation", False),
        ):
            if sc.get(key) != want_v:
                problem(f"operator container securityContext.{key} is {sc.get(key)!r}, not {want_v!r}")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problem("operator container does not drop ALL capabilities")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problem(f"operator seccompProfile is {seccomp!r}, not RuntimeDefault")
        for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
            got_p = c.get(probe, {}).get("httpGet", {})
            if got_p.get("path") != path or got_p.get("port") not in (9090, "admin"):
                problem(f"operator {probe} is {got_p}, not {path} on the admin port 9090")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if ports != {"webhook": 9443, "svid": 9444, "policy": 9445, "admin": 9090}:
            problem(f"operator container ports {ports} are not the operator's 9443/9444/9445/9090")
        if dep["spec"]["replicas"] < 2:
            problem(f"{dep['spec']['replicas']} operator replica(s): fewer than two is not highly available")
        env = {e["name"]: e for e in c.get("env", [])}
        for name, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
            if env.get(name, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != field:
                problem(f"{name} is not set from the pod's {field}")
        for name in env:
            if name.startswith("MANDATE_") and name not in env_known and name not in PENDING_ENV:
                problem(f"the Deployment sets {name}, which mandate-operator does not read (docs/reference/mandate-operator.md)")
        if env.get("MANDATE_LEASE_NAMESPACE", {}).get("value") != ns:
            problem(f"the Lease namespace is {env.get('MANDATE_LEASE_NAMESPACE')}, not the release namespace {ns}")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
        source = env.get("MANDATE_IDENTITY_SOURCE", {}).get("value")
        if source not in ("builtin", "spire"):
            problem(f"MANDATE_IDENTITY_SOURCE is {source!r}")
        csi = [v for v in volumes.values() if "csi" in v]
        if source == "spire":
            sock = env.get("SPIFFE_ENDPOINT_SOCKET", {}).get("value", "")
            if len(csi) != 1 or csi[0]["csi"].get("driver") != "csi.spiffe.io" or not csi[0]["csi"].get("readOnly"):
                problem(f"SPIRE mode without a read-only csi.spiffe.io volume: {csi}")
            else:
                mount = mounts.get(csi[0]["name"], {}).get("mountPath")
                if not mount or not sock.startswith(f"unix://{mount.rstrip('/')}/"):
                    problem(f"SPIFFE_ENDPOINT_SOCKET {sock!r} is not in the CSI volume's mount {mount!r}")
        elif csi or "SPIFFE_ENDPOINT_SOCKET" in env:
            problem("built-in CA mode mounts a CSI volume or sets SPIFFE_ENDPOINT_SOCKET")
        if "MANDATE_WEBHOOK_CERT_DIR" in env:
            d = env["MANDATE_WEBHOOK_CERT_DIR"]["value"]
            if not any(m["mountPath"] == d for m in mounts.values()):
                problem(f"MANDATE_WEBHOOK_CERT_DIR {d} is not mounted")

        svc = one("Service")
        if svc:
            ip = svc["spec"].get("clusterIP")
            if ip and ip != "None":
                for var in ("MANDATE_IDENTITY_SANS", "MANDATE_WEBHOOK_SANS"):
                    if var in env and ip not in env[var]["value"].split(","):
                        problem(f"the pinned Service IP {ip} is not in {var}")
            targets = {p["targetPort"] for p in svc["spec"]["ports"]}
            if not targets <= set(ports) | set(ports.values()):
                problem(f"Service targets {targets} are not all container ports {ports}")
            sel = svc["spec"]["selector"]
            labels = dep["spec"]["template"]["metadata"]["labels"]
            if any(labels.get(k) != v for k, v in sel.items()):
                problem("the Service does not select the operator's pods")

    # Webhooks: the operator's routes, on the Service, with the exemptions.
    svc_name = by_kind.get("Service", [{}])[0].get("metadata", {}).get("name")
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        cfg = one(kind)
        if not cfg:
            continue
        for w in cfg["webhooks"]:
            where = f"{kind} {cfg['metadata']['name']} webhook {w['name']}"
            s = w["clientConfig"].get("service", {})
            if s.get("name") != svc_name or s.get("namespace") != ns:
                problem(f"{where} calls {s}, not the Service {ns}/{svc_name}")
            if s.get("path") not in paths:
                problem(f"{where} calls {s.get('path')}, which the operator does not serve ({sorted(paths)})")
            if w.get("sideEffects") != "None" or w.get("admissionReviewVersions") != ["v1"]:
                problem(f"{where}: sideEffects/admissionReviewVersions are not None/[v1]")
            if not 1 <= w.get("timeoutSeconds", 0) <= 30:
                problem(f"{where}: timeoutSeconds {w.get('timeoutSeconds')}")
            if any("pods" in r["resources"] for r in w["rules"]):
                exprs = w.get("namespaceSelector", {}).get("matchExpressions", [])
                enforce = [e for e in exprs if e["key"] == "mandate.dev/enforce" and e["operator"] == "In"]
                names = [e for e in exprs if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "NotIn"]
                if enforce != [{"key": "mandate.dev/enforce", "operator": "In", "values": ["true"]}]:
                    problem(f"{where} does not require mandate.dev/enforce=true on the namespace")
                if not names or not {"kube-system", ns} <= set(names[0]["values"]):
                    problem(f"{where} does not exempt kube-system and {ns} by name")
                if kind.startswith("Mutating") and w.get("reinvocationPolicy") != "IfNeeded":
                    problem(f"{where}: reinvocationPolicy is not IfNeeded")
                if kind.startswith("Validating") and w.get("failurePolicy") != "Fail":
                    problem(f"{where}: the pod guard's failurePolicy is {w.get('failurePolicy')}, not Fail")
            if brokering and any("agentpolicies" in r["resources"] for r in w["rules"]) \
                    and w.get("failurePolicy") != "Fail":
                problem(f"{where}: failurePolicy {w.get('failurePolicy')} with credential brokering on "
                        "(its access review of credentials must not fail open): must be Fail")
    served = {
        w["clientConfig"]["service"]["path"]
        for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
        for cfg in by_kind.get(kind, [])
        for w in cfg["webhooks"]
    }
    if served and served != paths:
        problem(f"webhook paths {sorted(served)} are not exactly the operator's routes {sorted(paths)}")

    pdb = by_kind.get("PodDisruptionBudget", [])
    for p in pdb:
        if p["apiVersion"] != pdb_version:
            problem(f"the PodDisruptionBudget is {p['apiVersion']}, expected {pdb_version} for this Kubernetes version")


def cmd_rendered(args):
    opts = {}
    while args and args[0].startswith("--"):
        opts[args[0][2:]] = args[1]
        args = args[2:]
    if len(args) != 1 or set(opts) != {"crds", "operator-reference", "router", "namespace", "pdb"}:
        sys.exit(__doc__)
    docs = load_all(args[0])
    for d in docs:
        if not all(k in d for k in ("apiVersion", "kind", "metadata")):
            problem(f"a rendered document lacks apiVersion, kind or metadata: {str(d)[:120]}")
    check_rendered(
        [d for d in docs if "kind" in d],
        opts["crds"],
        operator_env_names(opts["operator-reference"]),
        router_paths(opts["router"]),
        opts["namespace"],
        opts["pdb"],
    )
    return len(docs)


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("crs", "rendered"):
        sys.exit(__doc__)
    n = cmd_crs(sys.argv[2:]) if sys.argv[1] == "crs" else cmd_rendered(sys.argv[2:])
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(n)


if __name__ == "__main__":
    main()
