"""E2E: the figures an approver reads are measured by the operator, not reported by the trainer.

The operator's trainer command is swapped for ``lying_trainer.py``: it trains for real, then
reports a mean return of 1e9 (a tenant's own trainer image could). The run keeps that as
``reported``; the operator's evaluation Job measures the artifact, the Rollout carries the
measured figures, and auto-approval (``minMeanReturn: 1000``, which the lie would pass) refuses.
Real training, a real evaluation Job run by the dev node agent, a real API server.
"""

from __future__ import annotations

import sys

from support import REPO, wait_for

LIAR = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {name: liar}
spec:
  environment: {id: CartPole-v1, numEnvs: 4}
  training: {totalTimesteps: 8192, evalInterval: 4096, seed: 3, resources: {gpu: 1}}
  evaluation: {episodes: 10}
  approval: {mode: auto, auto: {minMeanReturn: 1000}}
  serving: {enabled: false}
"""


def test_a_trainer_that_reports_1e9_is_measured_and_not_auto_approved(cluster, operator, namespace):
    operator.extra_env["RLOPS_TRAINER_COMMAND"] = f"{sys.executable} {REPO / 'tests' / 'e2e' / 'lying_trainer.py'}"
    operator.kill()
    operator.start()
    try:
        assert cluster.apply(LIAR, namespace).returncode == 0
        run = wait_for(lambda: (r := cluster.get("trainingrun", "liar-1", "-n", namespace)) and
                       (r.get("status") or {}).get("evaluation", {}).get("phase") in ("Succeeded", "Failed") and r,
                       900, "training and the operator's evaluation", interval=3)
    finally:
        del operator.extra_env["RLOPS_TRAINER_COMMAND"]
        operator.kill()
        operator.start()
    status = run["status"]
    measured = status["evaluation"]
    assert status["metrics"]["meanReturn"] == 1e9  # kept as what the trainer reported
    assert measured["phase"] == "Succeeded" and measured["fingerprint"] == status["fingerprint"]
    assert measured["meanReturn"] <= 500 and measured["episodes"] == 10  # CartPole-v1 caps a return at 500
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["ReportedMatchesMeasured"]["status"] == "False"
    events = cluster.get("events", "-n", namespace, "--field-selector", "involvedObject.name=liar-1")["items"]
    assert any(e["reason"] == "ReportedFiguresDiffer" and e["type"] == "Warning" for e in events), events
    rollout = wait_for(lambda: (r := cluster.get("rollout", "liar-1", "-n", namespace)) and
                       (r.get("status") or {}).get("phase") == "AwaitingApproval" and r, 60, "the Rollout")
    evaluation = rollout["spec"]["evaluation"]
    assert evaluation["meanReturn"] == measured["meanReturn"] and evaluation["reportedMeanReturn"] == 1e9
    assert evaluation["trusted"] is True and evaluation["signature"] == measured["signature"]
    message = rollout["status"]["message"]
    assert "auto-approval refused" in message and "< minMeanReturn 1000" in message, message
    agent = cluster.get("rlagent", "liar", "-n", namespace)["status"]
    assert agent["phase"] == "Trained" and agent["latestMeanReturn"] == measured["meanReturn"]
    print(f"\nthe trainer reported 1e9; the operator measured {measured['meanReturn']} over {measured['episodes']} "
          f"episodes (seed {measured['seed']}): not auto-approved")
