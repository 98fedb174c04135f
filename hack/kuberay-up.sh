#!/usr/bin/env bash
# KubeRay's operator against the local control plane: its CRDs (RayCluster, RayService, RayJob)
# from its own Go module, and the operator built from that module by hack/build-binaries.sh,
# run as a local process like the control plane's (no registry holds its image here). The
# RayClusters it makes are real pods on the real node (hack/node-up.sh). Idempotent.
#
#   RLOPS_CLUSTER_NAME=rlops-cluster bash hack/kuberay-up.sh
#
# The operator reaches a Ray head's dashboard (RayService, RayJob) through the API server's
# Service proxy (--use-kubernetes-proxy): there is no cluster DNS on this machine.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$root/hack/build-binaries.sh" >/dev/null
mod=github.com/ray-project/kuberay/ray-operator
src=$(cd "$root/hack/tools/kuberay" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' "$mod")
for kind in rayclusters rayservices rayjobs; do  # too big for client-side apply's annotation
  kubectl apply --server-side --force-conflicts -f "$src/config/crd/bases/ray.io_$kind.yaml" >/dev/null
done
for _ in $(seq 30); do  # (kubectl wait errors out while a new CRD has no conditions yet)
  kubectl wait --for condition=Established crd/rayclusters.ray.io crd/rayservices.ray.io crd/rayjobs.ray.io \
    --timeout=30s >/dev/null 2>&1 && break
  sleep 1
done
port=${RLOPS_KUBERAY_HEALTH_PORT:-18082}
start_bg kuberay "$clusterdir/logs/kuberay.log" "$bindir/ray-operator" --kubeconfig "$KUBECONFIG" \
  --enable-leader-election=false --metrics-addr 0 --health-probe-bind-address "127.0.0.1:$port" \
  --use-kubernetes-proxy --log-stdout-encoder console
for _ in $(seq 60); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && { say "KubeRay operator ready ($(basename "$(dirname "$(readlink -f "$bindir/ray-operator")")"))"; exit 0; }
  sleep 1
done
echo "KubeRay's operator did not become ready; log: $clusterdir/logs/kuberay.log" >&2
tail -20 "$clusterdir/logs/kuberay.log" >&2
exit 1
