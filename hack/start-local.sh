#!/usr/bin/env bash
# Bring up everything the local demo and tests need, idempotently:
#   control plane (hack/cluster-up.sh), CRDs + RBAC (manifests/overlays/local),
#   the dev node agent (hack/node_agent.py), and the operator as a local process running as
#   the rlops-operator ServiceAccount.
# Env: RLOPS_NO_OPERATOR=1 skips the operator (tests start their own); RLOPS_AGENT_CPU_PODS=1
# lets the node agent's node take CPU-only pods (gpu: 0) too (the demo sets it; the tests keep
# the GPU taint, so that their CPU-only specs stay unscheduled).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$root/hack/setup-venv.sh"
bash "$root/hack/cluster-up.sh"

say "installing CRDs and RBAC (kubectl apply -k manifests/overlays/local)"
kubectl apply -k "$root/manifests/overlays/local" >/dev/null
kubectl wait --for condition=Established --timeout=60s crd/rlagents.rlops.dev crd/trainingruns.rlops.dev crd/rollouts.rlops.dev >/dev/null

node=${RLOPS_AGENT_NODE:-rlops-local-gpu}
start_bg node-agent "$clusterdir/logs/node-agent.log" "$venv/bin/python" "$root/hack/node_agent.py" \
  --kubeconfig "$KUBECONFIG" --node-name "$node" --gpus 1 --state-dir "$clusterdir/state/node-agent" --path-prepend "$venv/bin" \
  $([ "${RLOPS_AGENT_CPU_PODS:-0}" = 1 ] && echo --cpu-pods)
for _ in $(seq 60); do kubectl get node "$node" >/dev/null 2>&1 && break; sleep 1; done
kubectl wait --for condition=Ready --timeout=90s "node/$node" >/dev/null || { tail -30 "$clusterdir/logs/node-agent.log"; exit 1; }
say "node $node Ready (dev node agent: pods bound to it run as local processes)"

if [ -z "${RLOPS_NO_OPERATOR:-}" ]; then
  opcfg=$(bash "$root/hack/operator-kubeconfig.sh")
  audit=""  # the API server's audit webhook points at this receiver (hack/cluster-up.sh)
  [ -s "$clusterdir/audit-port" ] && audit="127.0.0.1:$(cat "$clusterdir/audit-port")"
  client_ca=""  # the API server presents a client certificate of this CA to the webhook (hack/cluster-up.sh)
  [ -s "$clusterdir/webhook-client/ca.crt" ] && client_ca="$clusterdir/webhook-client/ca.crt"
  start_bg operator "$clusterdir/logs/operator.log" env KUBECONFIG="$opcfg" RLOPS_AUDIT_RECEIVER="$audit" \
    RLOPS_AUDIT_CERT_DIR="$clusterdir/audit-certs" RLOPS_WEBHOOK_CLIENT_CA="$client_ca" \
    RLOPS_ARTIFACT_ROOT="file://$clusterdir/artifacts" "$venv/bin/python" -m rl_operator --liveness http://127.0.0.1:8089/healthz
  for _ in $(seq 60); do curl -sf http://127.0.0.1:8089/healthz >/dev/null && break; sleep 1; done
  curl -sf http://127.0.0.1:8089/healthz >/dev/null || { tail -30 "$clusterdir/logs/operator.log"; exit 1; }
  say "operator running as system:serviceaccount:rlops-system:rlops-operator (log $clusterdir/logs/operator.log)"
fi
