#!/usr/bin/env bash
# Start the local control plane: etcd, kube-apiserver (RBAC on), kube-controller-manager,
# kube-scheduler and kwok-controller as local processes (kwokctl --runtime binary), from the
# binaries hack/build-binaries.sh built from source. Then add two kwok GPU nodes.
# kwok-controller manages only nodes annotated kwok.x-k8s.io/node=fake (kwokctl's default is
# all nodes, which would fake the pods of the dev node agent's node too).
# Idempotent: a running cluster is left as it is.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$root/hack/build-binaries.sh" >/dev/null
kwokctl() { "$bindir/kwokctl" --name "$cluster_name" "$@"; }

if kubectl get --raw /readyz >/dev/null 2>&1; then
  say "cluster '$cluster_name' already running (KUBECONFIG=$KUBECONFIG)"
else
  if kwokctl get clusters 2>/dev/null | grep -qx "$cluster_name"; then
    say "restarting stopped cluster '$cluster_name'"
    kwokctl start cluster --wait 2m >"$clusterdir/kwokctl.log" 2>&1 || { tail -20 "$clusterdir/kwokctl.log"; exit 1; }
  else
    say "creating cluster '$cluster_name' (kwokctl --runtime binary; RBAC on)"
    mkdir -p "$(dirname "$KUBECONFIG")"
    kwokctl create cluster --runtime binary \
      --kubeconfig "$KUBECONFIG" \
      --etcd-binary "$bindir/etcd" \
      --kube-apiserver-binary "$bindir/kube-apiserver" \
      --kube-controller-manager-binary "$bindir/kube-controller-manager" \
      --kube-scheduler-binary "$bindir/kube-scheduler" \
      --kwok-controller-binary "$bindir/kwok" \
      --kube-authorization=true \
      --extra-args kwok-controller=manage-all-nodes=false \
      --extra-args kwok-controller=manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
      --wait 2m >"$clusterdir/kwokctl.log" 2>&1 || { tail -20 "$clusterdir/kwokctl.log"; exit 1; }
  fi
fi
for _ in $(seq 60); do kubectl get ns default >/dev/null 2>&1 && break; sleep 1; done
kubectl apply -f "$root/hack/kwok-gpu-nodes.yaml" >/dev/null
say "control plane up: $(kubectl version -o json | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])' 2>/dev/null || echo '?')"
say "export KUBECONFIG=$KUBECONFIG"
