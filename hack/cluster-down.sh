#!/usr/bin/env bash
# Stop the operator and node agent started by the demo (and KubeRay's operator, if started), and
# delete the local cluster; the demo's Ray head, Prometheus and Alertmanager stop too.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
stop_bg operator
stop_bg node-agent
stop_bg kuberay
if [ "$cluster_name" = rlops ]; then
  bash "$root/hack/ray-down.sh" >/dev/null 2>&1 || true
  bash "$root/hack/prom-down.sh" >/dev/null 2>&1 || true
fi
if [ -x "$bindir/kwokctl" ]; then
  "$bindir/kwokctl" --name "$cluster_name" delete cluster 2>/dev/null || true
fi
rm -f "$KUBECONFIG"
say "cluster '$cluster_name' deleted"
