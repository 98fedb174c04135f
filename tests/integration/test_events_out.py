"""The events out (``RLOPS_NATS_EVENTS``): what the operator publishes to Debian's nats-server
with JetStream, checked against the JSON Schemas in docs/events/ (docs/lifecycle.md).

The deployment events of a real canary are checked in tests/e2e/test_rollout.py.
"""

from __future__ import annotations

import pytest

from support import PENDING_AGENT as AGENT, published_events as published, wait_for

pytestmark = pytest.mark.timeout(300)

def uid_of(cluster, kind, name, namespace):
    return wait_for(lambda: (o := cluster.get(kind, name, "-n", namespace)) and o["metadata"]["uid"], 30, f"{kind} {name}")


def test_training_events_are_published_once_each_with_their_ids(cluster, operator, nats_server, namespace):
    """A run's request and each phase it enters, as the operator writes them: Pending, then
    Superseded when a newer run replaces it."""
    assert cluster.apply(AGENT.format(name="e", extra=""), namespace).returncode == 0
    first = uid_of(cluster, "trainingrun", "e-1", namespace)
    requests = wait_for(lambda: published(nats_server, "agent.rl.training.request.v1", namespace), 30, "the request")
    assert requests == [(f"{first}:request", {
        "training_job_id": f"{namespace}/e-1", "run_uid": first, "timestamp": requests[0][1]["timestamp"],
        "requester": "rlops-operator", "trigger_reason": "created", "namespace": namespace, "agent": "e",
        "agent_generation": 1, "training_config": {"algorithm": "PPO", "environment": "CartPole-v1",
                                                   "total_timesteps": 20480}})]
    wait_for(lambda: [i for i, _ in published(nats_server, "agent.rl.training.status.v1", namespace)]
             == [f"{first}:status:Pending"], 30, "the Pending status")
    cluster.kubectl("annotate", "rlagent", "e", "-n", namespace, "rlops.dev/retrain=again")
    second = uid_of(cluster, "trainingrun", "e-1-1", namespace)
    statuses = wait_for(lambda: (found := published(nats_server, "agent.rl.training.status.v1", namespace))
                        and len(found) == 3 and found, 30, "Superseded and the new run's Pending")
    assert sorted(i for i, _ in statuses) == sorted([f"{first}:status:Pending", f"{first}:status:Superseded",
                                                     f"{second}:status:Pending"])
    superseded = next(p for i, p in statuses if i.endswith("Superseded"))
    assert superseded["training_job_id"] == f"{namespace}/e-1" and superseded["reason"] == "Manual"
    assert "superseded by TrainingRun e-1-1" in superseded["message"]
    requests = published(nats_server, "agent.rl.training.request.v1", namespace)
    assert [(i, p["trigger_reason"]) for i, p in requests] == [(f"{first}:request", "created"),
                                                               (f"{second}:request", "manual")]


def test_events_survive_a_nats_outage_and_an_operator_restart(cluster, operator, nats_server, namespace):
    """NATS down while a run is created, then the operator killed with the events unpublished:
    the next operator publishes them (at least once; by their ids, JetStream keeps one each)."""
    nats_server.stop()
    try:
        assert cluster.apply(AGENT.format(name="o", extra=""), namespace).returncode == 0
        uid = uid_of(cluster, "trainingrun", "o-1", namespace)
        wait_for(lambda: (cluster.get("trainingrun", "o-1", "-n", namespace).get("status") or {}).get("phase")
                 == "Pending", 30, "o-1 Pending")
        operator.kill()
    finally:
        nats_server.start()
    operator.start()
    wait_for(lambda: [i for i, _ in published(nats_server, "agent.rl.training.request.v1", namespace)]
             == [f"{uid}:request"], 60, "the request, published by the next operator")
    wait_for(lambda: [i for i, _ in published(nats_server, "agent.rl.training.status.v1", namespace)]
             == [f"{uid}:status:Pending"], 30, "the Pending status, published by the next operator")
