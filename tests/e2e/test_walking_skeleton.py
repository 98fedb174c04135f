"""E2E: `kubectl apply` an RLAgent; the operator's GPU Job really trains it on the node agent.

Real API server, real scheduler and Job controller, real trainer process (the dev node agent
stands in for the kubelet and runs the pod's command as a local process), real PPO training.
"""

from pathlib import Path
from urllib.parse import urlparse

from support import REPO, wait_for

from rl_engine.artifacts import compute_fingerprint

SAMPLE = (REPO / "manifests" / "samples" / "cartpole.yaml").read_text()


def phase(cluster, kind, name, namespace):
    obj = cluster.get(kind, name, "-n", namespace) or {}
    return (obj.get("status") or {}).get("phase")


def test_cartpole_trains_to_475_and_survives_an_operator_sigkill(cluster, operator, namespace):
    assert cluster.apply(SAMPLE, namespace).returncode == 0

    wait_for(lambda: phase(cluster, "trainingrun", "cartpole-1", namespace) == "Running", 180, "TrainingRun Running")
    pods = cluster.get("pods", "-n", namespace, "-l", "rlops.dev/training-run=cartpole-1")["items"]
    assert len(pods) == 1 and pods[0]["spec"]["nodeName"] == "rlops-local-gpu"

    # SIGKILL the operator mid-training, restart it: it must adopt the Job, not make another.
    operator.kill()
    operator.start()

    final = wait_for(lambda: phase(cluster, "trainingrun", "cartpole-1", namespace) in ("Succeeded", "Failed"),
                     1500, "training to finish", interval=5)
    assert final
    run = cluster.get("trainingrun", "cartpole-1", "-n", namespace)
    status = run["status"]
    assert status["phase"] == "Succeeded", f"{status}\n--- operator log ---\n{operator.log()[-3000:]}"
    # then the operator measures the artifact itself, in an evaluation Job of its own
    run = wait_for(lambda: (r := cluster.get("trainingrun", "cartpole-1", "-n", namespace))["status"]
                   .get("evaluation", {}).get("phase") in ("Succeeded", "Failed") and r, 300, "the operator's evaluation")
    status = run["status"]
    measured = status["evaluation"]
    assert measured["phase"] == "Succeeded", f"{measured}\n--- operator log ---\n{operator.log()[-3000:]}"
    jobs = {j["metadata"]["name"]: j for j in cluster.get("jobs", "-n", namespace)["items"]}
    assert set(jobs) == {"cartpole-1", measured["jobName"]} and measured["jobName"] == f"rlops-eval-{run['metadata']['uid']}"
    assert len(cluster.get("trainingruns", "-n", namespace)["items"]) == 1
    pods = cluster.get("pods", "-n", namespace, "-l", "rlops.dev/training-run=cartpole-1")["items"]
    assert sorted(p["metadata"]["labels"].get("rlops.dev/evaluation", "trainer") for p in pods) == ["trainer", "true"]
    # measured on the run's environment, from a seed the operator drew, on the bytes the trainer wrote
    assert measured["fingerprint"] == status["fingerprint"] and measured["episodes"] == 20 and measured["trusted"]
    # other episodes than the trainer's own: a policy that reached 475 there scores near it here
    assert measured["meanReturn"] >= 400 and measured["randomMeanReturn"] < 50 and measured["signature"].startswith("v1:")
    assert measured["seed"] not in (None, 1)  # not the trainer's seed (spec.training.seed: 1)
    evaluator = jobs[measured["jobName"]]["spec"]["template"]["spec"]["containers"][0]
    assert evaluator["command"][-1] == "rl_engine.evaluate" and measured["image"] == evaluator["image"]

    # CartPole-v1 is solved at a mean return of 475 (its spec's reward_threshold).
    assert status["metrics"]["meanReturn"] >= 475
    assert status["metrics"]["episodes"] == 20
    assert status["startTime"] and status["completionTime"]
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in status["conditions"])

    # The fingerprint in status is the artifact's, recomputed from the files the trainer wrote.
    uri = status["artifactURI"]
    assert uri.startswith(operator.artifact_root)
    files = {p.name for p in Path(urlparse(uri).path).iterdir()}
    assert {"metadata.json", "training_history.json", "config_snapshot.yaml", "evaluation.json"} <= files
    assert status["fingerprint"] == compute_fingerprint(uri)

    agent = wait_for(lambda: phase(cluster, "rlagent", "cartpole", namespace) == "Trained"
                     and cluster.get("rlagent", "cartpole", "-n", namespace), 60, "agent Trained")
    st = agent["status"]
    assert st["latestRun"] == "cartpole-1" and st["observedGeneration"] == 1
    assert st["latestMeanReturn"] == measured["meanReturn"]  # the operator's figure, not the trainer's
    assert st["latestFingerprint"] == status["fingerprint"]

    reasons = {(e["involvedObject"]["kind"], e["reason"]) for e in cluster.get("events", "-n", namespace)["items"]}
    assert {("RLAgent", "TrainingRunCreated"), ("RLAgent", "AgentTrained")} <= reasons
    run = cluster.get("trainingrun", "cartpole-1", "-n", namespace)
    conditions = {c["type"]: c for c in run["status"]["conditions"]}
    assert conditions["Complete"]["status"] == "True" and conditions["Complete"]["reason"] == "TrainingSucceeded"
    assert conditions["Running"]["status"] == "False" and conditions["Running"]["reason"] == "Completed"
    assert conditions["Evaluated"]["status"] == "True" and conditions["ReportedMatchesMeasured"]["status"] == "True"

    table = cluster.kubectl("get", "rla,trun", "-n", namespace).stdout
    for header in ("PHASE", "LATEST RUN", "MEAN RETURN", "AGENT", "AGE"):
        assert header in table, table
    assert "Trained" in table and "Succeeded" in table


FAILING = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata:
  name: typo
spec:
  environment: {id: CartPole-v1}
  algorithm:
    name: PPO
    hyperparameters: {learningRat: 0.001}
  training: {totalTimesteps: 20480, resources: {gpu: 1}}
"""


def test_trainer_failure_reaches_run_and_agent_status(cluster, operator, namespace):
    assert cluster.apply(FAILING, namespace).returncode == 0
    wait_for(lambda: phase(cluster, "trainingrun", "typo-1", namespace) == "Failed", 300, "TrainingRun Failed", interval=2)
    status = cluster.get("trainingrun", "typo-1", "-n", namespace)["status"]
    assert status["failureReason"] == "InvalidConfig"
    assert "learningRat" in status["failureMessage"]
    assert any(c["type"] == "Failed" and c["status"] == "True" and c["reason"] == "InvalidConfig"
               for c in status["conditions"])

    agent = wait_for(lambda: phase(cluster, "rlagent", "typo", namespace) == "Failed"
                     and cluster.get("rlagent", "typo", "-n", namespace), 60, "agent Failed")
    trained = next(c for c in agent["status"]["conditions"] if c["type"] == "Trained")
    assert trained["status"] == "False" and trained["reason"] == "InvalidConfig"
    assert "learningRat" in trained["message"]
    events = cluster.get("events", "-n", namespace)["items"]
    assert any(e["reason"] == "TrainingFailed" and e["type"] == "Warning" for e in events)
