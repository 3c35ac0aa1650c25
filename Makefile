# The few commands a contributor needs. Cluster targets need root.
.PHONY: deps demo test e2e images bench bench-distribution lint chart-check build crds chart-crds reference cluster-up node-up cluster-down cluster-status

## deps: install packages (Debian, PyPI, npm) and build Kubernetes v1.37.2 + containerd v2.2.9 and the chart's floor, v1.35.4 + containerd v1.7.35, from their Go modules (cached in ~/.cache/mandate; versions in hack/lib.sh)
deps:
	hack/install-deps.sh
	hack/build-k8s.sh >/dev/null
	hack/build-containerd.sh >/dev/null
	MANDATE_K8S_VERSION=v1.35.4 hack/build-k8s.sh >/dev/null
	MANDATE_CONTAINERD_VERSION=v1.7.35 hack/build-containerd.sh >/dev/null

## demo: an agent's calls through a real Envoy + mandate-sidecar with the example policies (no cluster)
demo:
	hack/install-deps.sh
	hack/demo.sh

## bench: the performance figures, beside OPA and Envoy alone (release build)
bench:
	hack/bench.sh

## test: every test: lint and chart checks, cluster lifecycle checks, then on a real node
## every cargo test and the Helm end-to-end suite (installs what it needs first)
test: deps
	hack/test.sh

## e2e: the end-to-end suite alone: Mandate installed with Helm on a real node (root)
e2e:
	e2e/helm.sh

## images: Mandate's images as images/Dockerfile builds them, packed here without Docker
images:
	hack/image.sh mandate

## lint: rustfmt and clippy, as CI runs them
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	shellcheck -x -S warning hack/*.sh e2e/*.sh .ci/run
	hack/check-deps.sh
	hack/chart-check.sh

## chart-check: the Helm chart (lint, kubernetes-validate, schema, CRD copy) and policies/ against the CRDs
chart-check:
	hack/chart-check.sh

build:
	cargo build --workspace --all-targets

## crds: regenerate crds/ and the chart's copy from the Rust types (a test fails when they drift)
crds:
	cargo run -q -p mandate-operator --bin mandate-crdgen > crds/mandate.dev.yaml
	$(MAKE) -s chart-crds

## reference: regenerate docs/reference/ (the binaries' flags and subcommands, from their --help; a test fails when they drift)
reference:
	hack/reference.sh

## chart-crds: copy crds/mandate.dev.yaml into the chart (Helm reads only files inside it)
chart-crds:
	cp crds/mandate.dev.yaml charts/mandate/files/mandate.dev.yaml

## cluster-up: etcd + kube-apiserver on 127.0.0.1; node-up: a node where pods run
cluster-up:
	hack/cluster.sh up
node-up:
	hack/cluster.sh up --node
cluster-down:
	hack/cluster.sh down
cluster-status:
	hack/cluster.sh status

# Policy distribution: 50 sidecar processes, apply -> enforced p50/p99, and
# the operator's memory with 1 000 policies and 10 000 identities (needs a
# test cluster: make cluster-up).
bench-distribution:
	cargo build --release -q --workspace --bins
	cargo test --release -q -p mandate-operator --test distribution_bench -- --ignored --nocapture
