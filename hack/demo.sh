#!/usr/bin/env bash
# make demo: from nothing to a trained CartPole policy, through the real API server.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
t0=$SECONDS
# the demo's node takes CPU-only pods too, so that every sample in manifests/samples runs
RLOPS_AGENT_CPU_PODS=${RLOPS_AGENT_CPU_PODS:-1} bash "$root/hack/start-local.sh"

sample="$root/manifests/samples/cartpole.yaml"
agent=cartpole
if [ "${RLOPS_DEMO_SERVE:-1}" = 1 ]; then
  # before any delete: an agent's finalizer removes its Serve application, so Ray must be up
  say "starting a local Ray head with Ray Serve (hack/ray-up.sh)"
  bash "$root/hack/ray-up.sh" >"$clusterdir/logs/ray-up.log" 2>&1 || { tail -20 "$clusterdir/logs/ray-up.log"; exit 1; }
  # the canary analysis queries Prometheus (scraping Ray's metrics), and Alertmanager calls the
  # operator's receiver with the token of Secret rlops-system/rlops-alertmanager
  say "starting Prometheus and Alertmanager (hack/prom-up.sh): the canary analysis and the rollback alerts"
  bash "$root/hack/prom-up.sh" >"$clusterdir/logs/prom-up.log" 2>&1 || { tail -20 "$clusterdir/logs/prom-up.log"; exit 1; }
  kubectl -n rlops-system create secret generic rlops-alertmanager --from-file=token="$cache/services/alert-token" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
fi
if kubectl get rlagent "$agent" >/dev/null 2>&1; then
  say "deleting the previous demo's RLAgent $agent (its TrainingRuns and Jobs are garbage-collected)"
  kubectl delete rlagent "$agent" --wait=true --timeout=120s >/dev/null
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
fp=$(kubectl get trainingrun "$run" -o jsonpath='{.status.fingerprint}')
uri=$(kubectl get trainingrun "$run" -o jsonpath='{.status.artifactURI}')
say "TrainingRun $run Succeeded in $((SECONDS - t0))s; the operator now measures its artifact itself (an evaluation Job)"
deadline=$((SECONDS + 600)) ephase=""
while [ $SECONDS -lt $deadline ]; do
  ephase=$(kubectl get trainingrun "$run" -o jsonpath='{.status.evaluation.phase}' 2>/dev/null || true)
  case "$ephase" in Succeeded|Failed) break ;; esac
  sleep 2
done
if [ "$ephase" != Succeeded ]; then
  kubectl get trainingrun "$run" -o jsonpath='{.status.evaluation}'; echo
  say "the operator's evaluation of $run did not succeed (phase: ${ephase:-none}); operator log: $clusterdir/logs/operator.log"
  exit 1
fi
mean=$(kubectl get trainingrun "$run" -o jsonpath='{.status.evaluation.meanReturn}')
reported=$(kubectl get trainingrun "$run" -o jsonpath='{.status.metrics.meanReturn}')
seed=$(kubectl get trainingrun "$run" -o jsonpath='{.status.evaluation.seed}')
say "measured in $((SECONDS - t0))s: mean evaluation return $mean (the trainer reported $reported; seed $seed)"
echo "    fingerprint: $fp"
echo "    artifact:    $uri"

served=""
if [ "${RLOPS_DEMO_SERVE:-1}" = 1 ]; then
  # The rest of the story: the run's Rollout waits for an approval bound to this fingerprint;
  # approved, the policy goes to Ray Serve (the first version of an agent goes to 100% at once).
  for _ in $(seq 60); do kubectl get rollout "$run" >/dev/null 2>&1 && break; sleep 1; done
  kubectl get rollout "$run" -o wide
  say "kubectl annotate rollout/$run rlops.dev/approve=$fp"
  kubectl annotate rollout/"$run" "rlops.dev/approve=$fp" >/dev/null
  deadline=$((SECONDS + 300)) rphase=""
  while [ $SECONDS -lt $deadline ]; do
    # phase and message from one read (two reads can straddle a status write)
    IFS='|' read -r rphase msg < <(kubectl get rollout "$run" -o jsonpath='{.status.phase}|{.status.message}{"\n"}')
    line="[$((SECONDS - t0))s] Rollout $run: $rphase | $msg"
    [ "$line" != "$last" ] && echo "$line"
    last=$line
    case "$rphase" in Promoted|RolledBack|Rejected) break ;; esac
    sleep 2
  done
  if [ "$rphase" = Promoted ]; then
    say "the policy answers on Ray Serve: POST http://127.0.0.1:${RLOPS_SERVE_PORT:-8000}/default/$agent"
    curl -s -X POST "http://127.0.0.1:${RLOPS_SERVE_PORT:-8000}/default/$agent" \
      -H 'content-type: application/json' -d '{"observation": [0.01, -0.02, 0.03, 0.04]}'
    echo
    served=yes
  else
    say "Rollout $run ended $rphase (operator log: $clusterdir/logs/operator.log)"
  fi
fi
echo
kubectl get rla,trun,rlro -o wide
echo
say "TrainingRun $run Succeeded: mean evaluation return $mean, fingerprint $fp"
cat <<MSG

The cluster is still running. To use it:
    export KUBECONFIG=$KUBECONFIG
    export PATH=$bindir:\$PATH
    kubectl get rla,trun,rlro -o wide
    kubectl get events --field-selector involvedObject.name=$run
MSG
[ -n "$served" ] && cat <<MSG
    curl -X POST http://127.0.0.1:${RLOPS_SERVE_PORT:-8000}/default/$agent -d '{"observation": [0, 0, 0, 0]}'
    kubectl patch rla $agent --type=merge -p '{"spec":{"training":{"seed":2}}}'   # retrain: a canary rollout follows
    .venv/bin/python hack/demo_load.py   # client traffic for the canary's analysis (Prometheus: http://127.0.0.1:9090)
  Approve the new Rollout as above; its canary then goes 10% -> 25% -> 50% -> 100% under analysis.
  A policy trained from another seed chooses another action than $run on many near-upright
  states: the default override limit (20%) rolls it back. To see it promoted, retrain with
  '{"spec":{"training":{"seed":2},"canary":{"analysis":{"maxOverrideRate":1}}}}' instead.
MSG
cat <<MSG
Logs: operator $clusterdir/logs/operator.log, node agent $clusterdir/logs/node-agent.log
Stop everything: make cluster-down
MSG
