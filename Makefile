# rlops: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: services ray-up ray-down bench-serve bench-train bench-scale demo test test-unit test-integration test-e2e test-cluster images node-up node-down kuberay-up kuberay-down venv binaries cluster-up cluster-down install crds clean

demo: services ## the local demo: control plane + node agent + operator, Ray Serve, Prometheus; then train manifests/samples/cartpole.yaml
	bash hack/demo.sh

test: venv binaries services ## unit, integration (real API server), e2e (real training, Ray, Prometheus, Alertmanager) and cluster (helm install on a real node)
	$(PY) -m pytest tests -ra

test-unit: venv
	$(PY) -m pytest tests/unit -ra

test-integration: venv binaries services
	$(PY) -m pytest tests/integration -ra

test-e2e: venv binaries services
	$(PY) -m pytest tests/e2e -ra

test-cluster: venv binaries services ## rlops installed with Helm on a real kubelet node: images, operator pod, trainers, Ray (root)
	$(PY) -m pytest tests/cluster -ra

images: venv ## build the operator and engine images with buildah from an mmdebstrap base (root; tags and sizes printed)
	bash hack/images.sh

node-up: venv binaries ## a real kubelet node (containerd, runc, CNI, kube-proxy) joined to RLOPS_CLUSTER_NAME's control plane (root)
	bash hack/node-up.sh

node-down:
	bash hack/node-down.sh

kuberay-up: binaries ## KubeRay's operator (from source) and CRDs on RLOPS_CLUSTER_NAME's control plane, for ray.kuberay.enabled
	bash hack/kuberay-up.sh

kuberay-down:
	bash hack/kuberay-down.sh

bench-scale: venv binaries ## N agents (100, 500, 1000) on one operator, trainers faked by kwok Stages: latencies, CPU, RSS, API requests per agent, webhook p99 (its own cluster)
	$(PY) hack/bench/scale.py --agents $${AGENTS:-100 500 1000}

services: ## Debian's prometheus, prometheus-alertmanager and nats-server (installed once; the tests start them)
	@if [ "$$(id -u)" = 0 ]; then bash hack/install-services.sh; else sudo bash hack/install-services.sh; fi

venv: ## project virtualenv at .venv (both packages, editable)
	bash hack/setup-venv.sh

binaries: ## etcd, kube-*, kubectl, kwok(ctl) from source via the Go module proxy, cached in ~/.cache/rlops/bin
	bash hack/build-binaries.sh

cluster-up: venv ## start the local control plane (kwokctl --runtime binary) with two kwok GPU nodes
	bash hack/cluster-up.sh

cluster-down: ## stop the demo's operator and node agent, delete the local cluster
	bash hack/cluster-down.sh

ray-up: venv ## a local Ray head with Serve (dashboard :8265, Serve HTTP :8000, metrics :8081)
	bash hack/ray-up.sh

ray-down:
	bash hack/ray-down.sh

bench-serve: venv ## the router's overhead vs calling the policy deployment directly (docs/benchmarks.md)
	$(PY) hack/bench/serve_overhead.py --requests 2000 --concurrency 1 8

bench-train: venv ## our PPO/DQN vs Stable-Baselines3 and CleanRL on CartPole-v1 (docs/benchmarks.md; ~15 min)
	bash hack/setup-bench-venv.sh
	.venv-bench/bin/python hack/bench/train_bench.py --seeds $$(seq 1 20) --dqn-seeds 1 2 3 4 5 --json /tmp/train-bench.json

crds: venv binaries ## regenerate crds/, the chart's CRDs and admission policies (from the models), and manifests/base (from the chart)
	$(PY) -m rl_operator.crdgen crds
	$(PY) -m rl_operator.crdgen charts/rlops/crds
	$(PY) -m rl_operator.policygen --helm charts/rlops/templates/admission-policies.yaml
	bash hack/render-manifests.sh

clean: cluster-down
	rm -rf .venv
