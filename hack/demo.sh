#!/usr/bin/env bash
# make demo: from nothing to a trained CartPole policy, through the real API server.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
t0=$SECONDS
bash "$root/hack/start-local.sh"

sample="$root/manifests/samples/cartpole.yaml"
agent=cartpole
if kubectl get rlagent "$agent" >/dev/null 2>&1; then
  say "deleting the previous demo's RLAgent $agent (its TrainingRuns and Jobs are garbage-collected)"
  kubectl delete rlagent "$agent" --wait=true >/dev/null
  kubectl wait --for=delete "trainingrun/$agent-1" "job/$agent-1" --timeout=60s >/dev/null 2>&1 || true
fi
say "kubectl apply -f manifests/samples/cartpole.yaml"
kubectl apply -f "$sample"

run="$agent-1"
say "waiting for TrainingRun $run (real PPO training on this machine's CPU; ~1-3 minutes)"
last="" deadline=$((SECONDS + 1800)) phase=""
while [ $SECONDS -lt $deadline ]; do
  phase=$(kubectl get trainingrun "$run" -o jsonpath='{.status.phase}' 2>/dev/null || true)
  log=$(kubectl get pods -l "rlops.dev/training-run=$run" -o jsonpath='{.items[0].metadata.annotations.rlops\.dev/node-agent-log\.trainer}' 2>/dev/null || true)
  progress=""
  [ -n "$log" ] && [ -f "$log" ] && progress=$( (grep -v '^\s*$' "$log" || true) | tail -1 | cut -c1-150)
  line="[$((SECONDS - t0))s] TrainingRun $run: ${phase:-<none>}${progress:+ | $progress}"
  [ "$line" != "$last" ] && echo "$line"
  last=$line
  case "$phase" in Succeeded|Failed) break ;; esac
  sleep 3
done
echo
kubectl get rla,trun -o wide
echo
if [ "$phase" != Succeeded ]; then
  kubectl describe trainingrun "$run" | tail -20
  say "TrainingRun $run did not succeed (phase: ${phase:-none}); operator log: $clusterdir/logs/operator.log"
  exit 1
fi
mean=$(kubectl get trainingrun "$run" -o jsonpath='{.status.metrics.meanReturn}')
fp=$(kubectl get trainingrun "$run" -o jsonpath='{.status.fingerprint}')
uri=$(kubectl get trainingrun "$run" -o jsonpath='{.status.artifactURI}')
say "TrainingRun $run Succeeded in $((SECONDS - t0))s: mean evaluation return $mean"
echo "    fingerprint: $fp"
echo "    artifact:    $uri"
cat <<MSG

The cluster is still running. To use it:
    export KUBECONFIG=$KUBECONFIG
    export PATH=$bindir:\$PATH
    kubectl get rla,trun -o wide
    kubectl get events --field-selector involvedObject.name=$run
Logs: operator $clusterdir/logs/operator.log, node agent $clusterdir/logs/node-agent.log
Stop everything: make cluster-down
MSG
