"""E2E: the router agent's trajectory trigger starts a run that really trains on the logged
trajectories it was started for (Debian's nats-server with JetStream, the real trainer on the
dev node agent), and the run's status says how many it read, used and skipped, and their range.
"""

from __future__ import annotations

import json

import pytest

from support import wait_for

pytestmark = pytest.mark.timeout(900)

ROUTER = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {{name: router}}
spec:
  environment:
    id: rl_engine.domains:rlops/Router-v0
    numEnvs: 4
    kwargs: {{reward_shaping: {{}}}}
  algorithm:
    name: PPO
    hyperparameters: {{numSteps: 64}}
  training: {{totalTimesteps: 2048, evalInterval: 2048, resources: {{gpu: 1}}}}
  evaluation: {{episodes: 2}}
  serving: {{enabled: false}}
  triggers:
    trajectories: {{threshold: 20, stream: {stream}, subject: {subject}}}
"""


def trajectory(i):
    return json.dumps({
        "trajectory_id": f"t-{i}", "timestamp": "2026-12-04T08:00:00Z",
        "task": {"complexity": 0.8, "ambiguity": 0.3, "urgency": 0.9, "domain": "math"},
        "mode": "planner_executor",
        "reward_components": {"task_completion": 1.0, "efficiency": 0.67, "code_quality": 0.8,
                              "user_feedback": float(i % 2)}}).encode()


def test_a_trajectory_run_trains_on_its_trajectories(cluster, operator, nats_server, namespace):
    stream, subject = f"TRAJ_{namespace.replace('-', '_')}", f"{namespace}.trajectory.v1"
    nats_server.add_stream(stream, [subject])
    assert cluster.apply(ROUTER.format(stream=stream, subject=subject), namespace).returncode == 0
    uid = wait_for(lambda: cluster.get("rlagent", "router", "-n", namespace)["metadata"]["uid"], 30, "agent")

    async def consumer(js):
        try:
            return await js.consumer_info(stream, f"rlops-{uid}")
        except Exception:  # not created yet
            return None

    wait_for(lambda: nats_server.call(consumer), 60, "the trigger's durable consumer")
    seqs = nats_server.publish(subject, [trajectory(i) for i in range(10)])
    seqs += nats_server.publish(subject, [b"{not json", json.dumps({"task": {"domain": "cooking"}}).encode()])
    seqs += nats_server.publish(subject, [trajectory(i) for i in range(10, 20)])

    def trajectory_run():
        runs = cluster.get("trainingruns", "-n", namespace)["items"]
        return next((r for r in runs if r["spec"]["trigger"]["reason"] == "Trajectories"), None)

    run = wait_for(trajectory_run, 60, "the Trajectories run")
    assert run["spec"]["trigger"]["trajectories"]["count"] == 22
    name = run["metadata"]["name"]
    done = wait_for(lambda: (r := cluster.get("trainingrun", name, "-n", namespace)) and
                    (r.get("status") or {}).get("phase") in ("Succeeded", "Failed") and r, 600, "training", interval=3)
    assert done["status"]["phase"] == "Succeeded", f"{done['status']}\n{operator.log()[-3000:]}"
    assert done["status"]["trajectories"] == {
        "stream": stream, "subject": subject, "read": 22, "used": 20, "skipped": 2,
        "firstSequence": seqs[0], "lastSequence": seqs[-1]}
