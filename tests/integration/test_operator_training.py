"""The operator against a real API server: RLAgent -> TrainingRun -> Job, statuses and events.

These agents select a node label nothing carries, so their pods stay Pending: this tier checks
what the operator writes, the e2e tier checks that it really trains.
"""

import json

from support import wait_for

UNSCHEDULABLE = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata:
  name: lander
spec:
  environment: {{id: CartPole-v1, numEnvs: 4}}
  training:
    totalTimesteps: {steps}
    resources: {{gpu: 2, cpu: "1", memory: 1Gi}}
    backoffLimit: 1
    activeDeadlineSeconds: 900
    nodeSelector: {{rlops.dev/test-pool: none}}
"""


def test_agent_creates_one_run_and_one_job_per_generation(cluster, operator, namespace):
    assert cluster.apply(UNSCHEDULABLE.format(steps=20000), namespace).returncode == 0
    run = wait_for(lambda: cluster.get("trainingrun", "lander-1", "-n", namespace), 60, "TrainingRun lander-1")
    agent = cluster.get("rlagent", "lander", "-n", namespace)
    assert run["metadata"]["ownerReferences"][0]["uid"] == agent["metadata"]["uid"]
    assert run["spec"]["trigger"] == {"reason": "Created", "agentGeneration": 1}
    assert run["spec"]["training"]["totalTimesteps"] == 20000

    job = wait_for(lambda: cluster.get("job", "lander-1", "-n", namespace), 60, "Job lander-1")
    assert job["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["activeDeadlineSeconds"] == 900
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "rlops.dev/test-pool": "none"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert json.loads(env["RLOPS_RUN_CONFIG"])["run"] == "lander-1"
    assert env["RLOPS_ARTIFACT_URI"].startswith(operator.artifact_root)

    status = wait_for(lambda: (cluster.get("rlagent", "lander", "-n", namespace).get("status") or {}).get("phase") == "Training"
                      and cluster.get("rlagent", "lander", "-n", namespace)["status"], 60, "agent phase Training")
    assert status["latestRun"] == "lander-1" and status["observedGeneration"] == 1
    assert any(c["type"] == "Training" and c["status"] == "True" for c in status["conditions"])
    # kopf's last-handled state stays in the operator's memory: nothing of it written onto the objects
    for kind, obj in (("rlagent", "lander"), ("trainingrun", "lander-1")):
        annotations = cluster.get(kind, obj, "-n", namespace)["metadata"].get("annotations") or {}
        assert not [k for k in annotations if k.startswith("kopf.zalando.org/")], (kind, annotations)

    # A spec change is a new generation: a second run, snapshotting the new spec.
    assert cluster.apply(UNSCHEDULABLE.format(steps=30000), namespace).returncode == 0
    run2 = wait_for(lambda: cluster.get("trainingrun", "lander-2", "-n", namespace), 60, "TrainingRun lander-2")
    assert run2["spec"]["trigger"] == {"reason": "SpecChanged", "agentGeneration": 2}
    assert run2["spec"]["training"]["totalTimesteps"] == 30000
    wait_for(lambda: cluster.get("job", "lander-2", "-n", namespace), 60, "Job lander-2")
    wait_for(lambda: (cluster.get("rlagent", "lander", "-n", namespace)["status"]).get("observedGeneration") == 2,
             60, "agent observedGeneration 2")
    # the default concurrencyPolicy (Replace): the first run, still Pending, is superseded and its Job goes
    wait_for(lambda: (cluster.get("trainingrun", "lander-1", "-n", namespace).get("status") or {}).get("phase")
             == "Superseded", 30, "lander-1 Superseded")
    wait_for(lambda: cluster.get("job", "lander-1", "-n", namespace) is None, 30, "Job lander-1 deleted")

    # Metadata-only changes are not a new generation: still exactly two runs and one Job.
    cluster.kubectl("label", "rlagent", "lander", "-n", namespace, "team=rl")
    operator_restarts_do_not_duplicate(cluster, operator, namespace)


def operator_restarts_do_not_duplicate(cluster, operator, namespace):
    operator.kill()
    seen = len(operator.log())
    operator.start()

    def resumed() -> int:  # objects the restarted operator has processed (kopf: "Resuming/Updating is processed")
        fresh = [line for line in operator.log()[seen:].splitlines() if "is processed" in line]
        return sum(any(f"[{namespace}/{obj}] " in line for line in fresh) for obj in ("lander", "lander-1", "lander-2"))

    wait_for(lambda: resumed() == 3, 60, "the restarted operator to resume the agent and both runs")
    runs = cluster.get("trainingruns", "-n", namespace)["items"]
    jobs = cluster.get("jobs", "-n", namespace)["items"]
    assert sorted(r["metadata"]["name"] for r in runs) == ["lander-1", "lander-2"]
    assert sorted(j["metadata"]["name"] for j in jobs) == ["lander-2"]


def test_training_run_spec_is_immutable(cluster, operator, namespace):
    assert cluster.apply(UNSCHEDULABLE.format(steps=20000), namespace).returncode == 0
    wait_for(lambda: cluster.get("trainingrun", "lander-1", "-n", namespace), 60, "TrainingRun lander-1")
    proc = cluster.kubectl("patch", "trainingrun", "lander-1", "-n", namespace, "--type=merge",
                           "-p", '{"spec":{"training":{"totalTimesteps":5}}}', check=False)
    assert proc.returncode != 0 and "spec is immutable" in proc.stderr, proc.stderr


def test_events_mark_the_transitions(cluster, operator, namespace):
    assert cluster.apply(UNSCHEDULABLE.format(steps=20000), namespace).returncode == 0
    wait_for(lambda: cluster.get("job", "lander-1", "-n", namespace), 60, "Job lander-1")

    def reasons():
        items = cluster.get("events", "-n", namespace)["items"]
        return {(e["involvedObject"]["kind"], e["reason"]) for e in items}

    wait_for(lambda: ("RLAgent", "TrainingRunCreated") in reasons(), 30, "events")
    # the pod cannot be scheduled: the run says why, with a Warning (a run posts no Normal Events)
    wait_for(lambda: ("TrainingRun", "TrainerNotStarting") in reasons(), 60, "TrainerNotStarting")
    normal = [(e["involvedObject"]["kind"], e["reason"]) for e in cluster.get("events", "-n", namespace)["items"]
              if e["involvedObject"]["kind"] == "TrainingRun" and e["type"] == "Normal"]
    assert normal == []


def test_the_resync_repairs_what_no_event_reports(cluster, operator, namespace):
    """A change that no watch event brings to a handler (here: a run's status written behind the
    operator's back) is repaired by the operator-wide resync of unfinished runs, within a few
    periods (``RLOPS_RESYNC_SECONDS=5`` in the tests). No kopf timer on the agent: an agent that
    cannot serve carries no finalizer."""
    def run_phase():
        return ((cluster.get("trainingrun", "lander-1", "-n", namespace) or {}).get("status") or {}).get("phase")

    manifest = UNSCHEDULABLE.format(steps=20000) + "  serving: {enabled: false}\n"
    assert cluster.apply(manifest, namespace).returncode == 0
    wait_for(lambda: run_phase() == "Pending", 60, "run Pending")
    cluster.kubectl("patch", "trainingrun", "lander-1", "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", '{"status": {"phase": "Running"}}')
    assert run_phase() == "Running"
    wait_for(lambda: run_phase() == "Pending", 30, "the resync's repair")
    assert cluster.get("rlagent", "lander", "-n", namespace)["metadata"].get("finalizers") is None
