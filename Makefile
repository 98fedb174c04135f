# rlops: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: demo test test-unit test-integration test-e2e venv binaries cluster-up cluster-down install crds clean

demo: ## the local demo: control plane + node agent + operator, then train manifests/samples/cartpole.yaml
	bash hack/demo.sh

test: venv binaries ## unit, integration (real API server) and e2e (real training) tiers
	$(PY) -m pytest tests -ra

test-unit: venv
	$(PY) -m pytest tests/unit -ra

test-integration: venv binaries
	$(PY) -m pytest tests/integration -ra

test-e2e: venv binaries
	$(PY) -m pytest tests/e2e -ra

venv: ## project virtualenv at .venv (both packages, editable)
	bash hack/setup-venv.sh

binaries: ## etcd, kube-*, kubectl, kwok(ctl) from source via the Go module proxy, cached in ~/.cache/rlops/bin
	bash hack/build-binaries.sh

cluster-up: venv ## start the local control plane (kwokctl --runtime binary) with two kwok GPU nodes
	bash hack/cluster-up.sh

cluster-down: ## stop the demo's operator and node agent, delete the local cluster
	bash hack/cluster-down.sh

crds: venv ## regenerate crds/ from operator/rl_operator/models.py
	$(PY) -m rl_operator.crdgen crds

clean: cluster-down
	rm -rf .venv
