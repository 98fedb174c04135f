"""Pure training decisions: RLAgent -> TrainingRun -> Job, and Job/pods -> statuses."""

import json
from datetime import datetime, timezone

import pytest

from rl_operator import models as m
from rl_operator import training
from rl_operator.settings import OperatorSettings

AT = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
FP = "sha256:" + "ab" * 32


def agent(generation=1, **spec):
    body = {"environment": {"id": "CartPole-v1"}, **spec}
    return {
        "apiVersion": m.API_VERSION, "kind": "RLAgent",
        "metadata": {"name": "cartpole", "namespace": "ml", "uid": "u-agent", "generation": generation},
        "spec": m.RLAgentSpec.model_validate(body).wire(),
    }


def run_for(agent_obj, uid="0123456789abcdef"):
    run = training.desired_training_run(agent_obj)
    run["metadata"]["uid"] = uid
    run["metadata"]["generation"] = 1
    return run


def test_run_name_is_deterministic_per_generation():
    first = training.desired_training_run(agent(1))
    assert first["metadata"]["name"] == "cartpole-1"
    second = training.desired_training_run(agent(2, training={"seed": 7}), [first])
    assert second["metadata"]["name"] == "cartpole-2"
    assert second["spec"]["trigger"] == {"reason": "SpecChanged", "agentGeneration": 2}
    owner = second["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "RLAgent" and owner["uid"] == "u-agent" and owner["controller"] is True


def test_changes_outside_training_do_not_retrain():
    first = training.desired_training_run(agent(1))
    assert training.desired_training_run(agent(1), [first]) is None  # a restarted operator: nothing new
    canary_only = agent(2, canary={"steps": [{"setWeight": 50}, {"setWeight": 100}]}, approval={"mode": "auto"})
    assert training.desired_training_run(canary_only, [first]) is None
    retrain = training.desired_training_run(agent(3, algorithm={"hyperparameters": {"learningRate": 0.001}}), [first])
    assert retrain["metadata"]["name"] == "cartpole-3"


def test_job_places_on_gpu_nodes_and_hardens_the_pod():
    run = run_for(agent(training={"resources": {"gpu": 2}, "backoffLimit": 1, "activeDeadlineSeconds": 600,
                                  "nodeSelector": {"pool": "a100"}}))
    job = training.desired_job(run, OperatorSettings(artifact_root="file:///data/art"))
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert job["metadata"]["name"] == "cartpole-1"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "TrainingRun"
    assert spec["backoffLimit"] == 1 and spec["activeDeadlineSeconds"] == 600
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "a100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RLOPS_ARTIFACT_URI"] == "file:///data/art/ml/cartpole/cartpole-1-01234567"
    config = json.loads(env["RLOPS_RUN_CONFIG"])
    assert config["environment"]["id"] == "CartPole-v1"
    assert config["run"] == "cartpole-1" and config["namespace"] == "ml"
    assert set(config["training"]) <= {"totalTimesteps", "seed", "targetReturn", "evalInterval"}


def test_spec_tolerations_reach_the_pod_as_plain_json():
    tolerations = [{"key": "example.com/spot", "operator": "Exists", "effect": "NoSchedule"},
                   {"key": "pool", "value": "a", "effect": "NoExecute", "tolerationSeconds": 30}]
    job = training.desired_job(run_for(agent(training={"tolerations": tolerations})), OperatorSettings())
    pod = json.loads(json.dumps(job))["spec"]["template"]["spec"]  # what the API client sends
    assert pod["tolerations"][1:] == tolerations


def test_zero_gpu_job_has_no_gpu_placement():
    job = training.desired_job(run_for(agent(training={"resources": {"gpu": 0}})), OperatorSettings())
    pod = job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert pod["nodeSelector"] == {} and pod["tolerations"] == []


def job_with(condition=None, **status):
    st = dict(status)
    if condition:
        st["conditions"] = [{"type": condition[0], "status": "True", "reason": condition[1],
                             "lastTransitionTime": "2026-11-22T12:05:00Z"}]
    return {"metadata": {"name": "cartpole-1"}, "status": st}


def pod(phase, terminated=None, name="cartpole-1-x"):
    state = {"terminated": terminated} if terminated else ({"running": {}} if phase == "Running" else {})
    return {"metadata": {"name": name, "creationTimestamp": "2026-11-22T12:00:00Z"},
            "spec": {"nodeName": "gpu-node"},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}}


def test_observe_run_pending_running_succeeded():
    run = run_for(agent())
    status, events = training.observe_run(run, None, [], AT)
    assert status.phase == "Pending" and events == []

    status, events = training.observe_run(run, job_with(startTime="2026-11-22T12:00:00Z", active=1), [pod("Running")], AT)
    assert status.phase == "Running"
    assert events == []  # a run posts Warnings only; its start is the Running condition
    running = next(c for c in status.conditions if c.type == "Running")
    assert (running.status, running.reason, running.message) == ("True", "PodRunning",
                                                                 "the trainer pod is running on node gpu-node")
    run["status"] = status.wire()

    summary = {"phase": "Succeeded", "metrics": {"meanReturn": 500.0}, "artifactURI": "file:///a", "fingerprint": FP}
    done = pod("Succeeded", {"exitCode": 0, "reason": "Completed", "message": json.dumps(summary)})
    status, events = training.observe_run(run, job_with(("Complete", ""), completionTime="2026-11-22T12:04:00Z"), [done], AT)
    assert status.phase == "Succeeded"
    assert status.fingerprint == FP and status.metrics["meanReturn"] == 500.0
    assert events == []  # the agent posts AgentTrained
    complete = next(c for c in status.conditions if c.type == "Complete")
    assert complete.status == "True"
    # terminal: nothing changes any more, whatever the Job does next
    run["status"] = status.wire()
    again, events = training.observe_run(run, None, [], AT)
    assert again.phase == "Succeeded" and events == []


def test_observe_run_failure_reason_from_termination_message():
    run = run_for(agent())
    msg = json.dumps({"phase": "Failed", "reason": "InvalidConfig", "message": "algorithm.hyperparameters.lr: unknown"})
    failed = pod("Failed", {"exitCode": 2, "reason": "Error", "message": msg})
    status, events = training.observe_run(run, job_with(("Failed", "BackoffLimitExceeded")), [failed], AT)
    assert status.phase == "Failed"
    assert status.failure_reason == "InvalidConfig"
    assert "algorithm.hyperparameters.lr" in status.failure_message
    assert events[0].type == "Warning" and events[0].reason == "TrainingFailed"


def test_observe_run_failure_falls_back_to_log_tail_and_job_reason():
    run = run_for(agent())
    failed = pod("Failed", {"exitCode": 137, "reason": "Error", "message": "Traceback...\nKilled"})
    status, _ = training.observe_run(run, job_with(("Failed", "DeadlineExceeded")), [failed], AT)
    assert status.failure_reason == "DeadlineExceeded"
    assert status.failure_message.startswith("trainer exited with code 137") and "Killed" in status.failure_message


def test_a_run_whose_artifact_directory_cannot_be_made_says_so():
    run = run_for(agent())
    failed = pod("Failed")
    failed["status"]["initContainerStatuses"] = [{"name": training.ARTIFACT_DIR_CONTAINER, "state": {"terminated": {
        "exitCode": 1, "message": "mkdir: cannot create directory 'cartpole': Permission denied\n"}}}]
    status, events = training.observe_run(run, job_with(("Failed", "BackoffLimitExceeded")), [failed], AT)
    assert status.failure_reason == "ArtifactDirectoryFailed"
    assert "writable by the trainer's user" in status.failure_message and "Permission denied" in status.failure_message
    assert [e.reason for e in events] == ["TrainingFailed"]


def test_success_without_summary_is_a_failure():
    run = run_for(agent())
    done = pod("Succeeded", {"exitCode": 0, "reason": "Completed", "message": ""})
    status, _ = training.observe_run(run, job_with(("Complete", "")), [done], AT)
    assert status.phase == "Failed" and status.failure_reason == "InvalidTerminationMessage"


def test_a_complete_job_without_its_own_pod_fails_the_run():
    """The caller passes only the Job's own pods: a Job completed by a forged pod that replaced
    the trainer (or whose pod is gone) leaves none, and the run fails with that reason."""
    status, events = training.observe_run(run_for(agent()), job_with(("Complete", "")), [], AT)
    assert status.phase == "Failed" and status.failure_reason == "TrainerPodMissing"
    assert "PodsIgnored" in status.failure_message and events[0].reason == "TrainingFailed"


def test_observe_agent_tracks_latest_generation():
    a = agent(2)
    old = run_for(agent(1))
    old["status"] = {"phase": "Succeeded", "metrics": {"meanReturn": 100.0}, "fingerprint": FP}
    new = run_for(a)
    new["status"] = {"phase": "Running"}
    status, _ = training.observe_agent(a, [old, new], AT)
    assert status.latest_run == "cartpole-2" and status.phase == "Training" and status.observed_generation == 2

    new["status"] = {"phase": "Failed", "failureReason": "NonFiniteLoss", "failureMessage": "loss nan at update 3"}
    status, events = training.observe_agent(a, [old, new], AT)
    assert status.phase == "Failed"
    trained = next(c for c in status.conditions if c.type == "Trained")
    assert trained.status == "False" and trained.reason == "NonFiniteLoss"
    assert [(e.type, e.reason) for e in events] == [("Warning", "AgentFailed")]
    assert events[0].message == "latest TrainingRun cartpole-2 Failed: NonFiniteLoss: loss nan at update 3"

    new["status"] = {"phase": "Succeeded", "metrics": {"meanReturn": 480.0}, "fingerprint": FP,
                     "artifactURI": "file:///a/cartpole-2"}
    status, events = training.observe_agent(a, [old, new], AT)
    # the trainer's own figure is not the agent's: the operator measures the artifact first
    assert status.phase == "Evaluating" and status.latest_mean_return is None and events == []
    new["status"]["evaluation"] = {"phase": "Succeeded", "meanReturn": 471.5, "episodes": 20}
    status, events = training.observe_agent(a, [old, new], AT)
    assert status.phase == "Trained" and status.latest_mean_return == 471.5
    assert [(e.type, e.reason, e.message) for e in events] == [
        ("Normal", "AgentTrained", f"latest TrainingRun cartpole-2 Succeeded: mean evaluation return 471.5 measured "
                                   f"by the operator (the trainer reported 480.0), artifact file:///a/cartpole-2, "
                                   f"fingerprint {FP}")]
    new["status"]["evaluation"] = {"phase": "Failed", "reason": "FingerprintMismatch", "message": "other bytes"}
    status, events = training.observe_agent({**a, "status": {}}, [old, new], AT)
    assert status.phase == "Failed" and [e.reason for e in events] == ["AgentFailed"]
    assert "EvaluationFingerprintMismatch" in events[0].message


@pytest.mark.parametrize("bad", [{"environment": {}}, {"environment": {"id": "X"}, "algorithm": {"name": "A2C"}},
                                 {"environment": {"id": "X"}, "training": {"resources": {"gpu": -1}}}])
def test_models_refuse_bad_specs(bad):
    with pytest.raises(ValueError):
        m.RLAgentSpec.model_validate(bad)


def test_exited_pod_before_job_concludes_stays_running():
    """Between the pod's exit and the Job's Complete condition the run must not flip back to Pending."""
    run = run_for(agent())
    status, _ = training.observe_run(run, job_with(active=1), [pod("Running")], AT)
    run["status"] = status.wire()
    exited = pod("Succeeded", {"exitCode": 0, "reason": "Completed", "message": "{}"})
    status, events = training.observe_run(run, job_with(active=0), [exited], AT)
    assert status.phase == "Running" and events == []


def test_a_stuck_pending_run_says_why_once():
    """A trainer pod that cannot start says so in the run's Running condition (and one Warning
    Event per new cause): no node fits, or the image cannot be pulled. ContainerCreating is not
    a cause."""
    run = run_for(agent())
    job = job_with(active=1)
    unschedulable = pod("Pending")
    unschedulable["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                              "message": "0/3 nodes are available: 3 node(s) had untolerated taint"}]
    status, events = training.observe_run(run, job, [unschedulable], AT)
    assert status.phase == "Pending"
    cond = next(c for c in status.conditions if c.type == "Running")
    assert (cond.status, cond.reason) == ("False", "Unschedulable") and "untolerated taint" in cond.message
    assert [(e.type, e.reason) for e in events] == [("Warning", "TrainerNotStarting")]
    run["status"] = status.wire()
    _, events = training.observe_run(run, job, [unschedulable], AT)
    assert events == []  # same cause: no second Event

    pulling = pod("Pending")
    pulling["status"]["containerStatuses"] = [{"name": training.TRAINER_CONTAINER, "state": {
        "waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "ghcr.io/x/y:1"'}}}]
    status, events = training.observe_run(run, job, [pulling], AT)
    cond = next(c for c in status.conditions if c.type == "Running")
    assert cond.reason == "ImagePullBackOff" and "ghcr.io/x/y:1" in cond.message
    assert [e.reason for e in events] == ["TrainerNotStarting"]

    creating = pod("Pending")
    creating["status"]["containerStatuses"] = [{"name": training.TRAINER_CONTAINER,
                                                "state": {"waiting": {"reason": "ContainerCreating"}}}]
    assert training.pending_cause([creating]) is None


def trajectory_run():
    from rl_operator import triggers

    a = agent(triggers={"trajectories": {"threshold": 5}})
    run = triggers.new_run(a, [], [triggers.Due("Trajectories", window=triggers.Window(6, 11, 16))])
    run["metadata"]["uid"] = "0123456789abcdef"
    return run


def test_a_trajectory_run_tells_its_trainer_the_range():
    env = {e["name"]: e.get("value") for e in training.desired_job(
        trajectory_run(), OperatorSettings(nats_url="nats://nats:4222"))["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["RLOPS_TRAJECTORIES"]) == {
        "url": "nats://nats:4222", "stream": "RL_TRAJECTORIES", "subject": "agent.rl.trajectory.v1",
        "firstSequence": 11, "lastSequence": 16}
    plain = {e["name"] for e in training.desired_job(run_for(agent()), OperatorSettings(nats_url="nats://n:4222"))
             ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "RLOPS_TRAJECTORIES" not in plain


def test_the_trainers_trajectory_counts_reach_the_run_status():
    run = trajectory_run()
    used = {"stream": "RL_TRAJECTORIES", "subject": "agent.rl.trajectory.v1", "read": 6, "used": 5, "skipped": 1,
            "firstSequence": 11, "lastSequence": 16}
    summary = {"phase": "Succeeded", "metrics": {}, "artifactURI": "file:///a", "fingerprint": FP, "trajectories": used}
    done = pod("Succeeded", {"exitCode": 0, "reason": "Completed", "message": json.dumps(summary)})
    status, _ = training.observe_run(run, job_with(("Complete", ""), completionTime="2026-11-22T12:04:00Z"), [done], AT)
    assert status.phase == "Succeeded" and status.wire()["trajectories"] == used


def test_the_reclaim_job_deletes_exactly_the_runs_artifact_and_belongs_to_no_run():
    tolerations = [{"key": "pool", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    owner = agent(training={"nodeSelector": {"pool": "gpu-a100"}, "tolerations": tolerations})
    owner["metadata"]["uid"] = "agent-uid"
    run = run_for(owner, uid="0f6c1c52-0000-4000-8000-00000000abcd")
    settings = OperatorSettings(artifact_root="file:///data/art", artifact_pvc="artifacts",
                                extra_env={"AWS_REGION": "eu-west-1"})
    job = training.reclaim_job(run, owner, settings)
    meta, pod = job["metadata"], job["spec"]["template"]["spec"]
    assert meta["name"] == "rlops-reclaim-0f6c1c52-0000-4000-8000-00000000abcd" and len(meta["name"]) <= 63
    assert m.RUN_LABEL not in meta["labels"] and meta["labels"][m.RECLAIM_LABEL] == "cartpole-1"
    assert [o["uid"] for o in meta["ownerReferences"]] == ["agent-uid"]
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "rl_engine.artifacts", "delete",
                            training.artifact_uri(settings, run), "--under", "file:///data/art/ml/cartpole"]
    assert c["env"] == [{"name": "AWS_REGION", "value": "eu-west-1"}]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "nodeSelector" not in pod
    assert {t["key"] for t in pod["tolerations"]} == {"nvidia.com/gpu", "pool"}
    assert pod["volumes"] == [{"name": "artifacts", "persistentVolumeClaim": {"claimName": "artifacts"}}]
    # the agent's directory of the namespace's claim, which holds the namespace's files only
    assert c["volumeMounts"] == [{"name": "artifacts", "mountPath": "/data/art/ml/cartpole", "subPath": "cartpole"}]
    assert job["spec"]["ttlSecondsAfterFinished"] == 600 and c["securityContext"]["runAsNonRoot"]


def test_a_trainer_sees_only_its_own_runs_directory_of_its_namespaces_claim():
    run = run_for(agent(), uid="0f6c1c52-0000-4000-8000-00000000abcd")
    settings = OperatorSettings(artifact_root="file:///data/art/", artifact_pvc="artifacts")
    pod = training.desired_job(run, settings)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["volumeMounts"] == [{"name": "artifacts", "mountPath": "/data/art/ml/cartpole/cartpole-1-0f6c1c52",
                                  "subPath": "cartpole/cartpole-1-0f6c1c52"}]
    # the kubelet would make that subPath as root: the init container makes it as the trainer
    (init,) = pod["initContainers"]
    assert init["image"] == settings.evaluator_image and init["command"] == [
        "mkdir", "-p", "/data/art/ml/cartpole/cartpole-1-0f6c1c52"]
    assert init["volumeMounts"] == [{"name": "artifacts", "mountPath": "/data/art/ml"}]
    assert init["securityContext"] == c["securityContext"] and init["securityContext"]["runAsUser"] == 1000
    # without a claim (an object store, or no volume), nothing is mounted and nothing made
    for other in (OperatorSettings(artifact_root="file:///data/art"),
                  OperatorSettings(artifact_root="s3://bucket/art", artifact_pvc="artifacts")):
        pod = training.desired_job(run, other)["spec"]["template"]["spec"]
        assert "initContainers" not in pod and "volumeMounts" not in pod["containers"][0]


def test_an_artifact_uri_outside_the_root_is_never_mounted():
    settings = OperatorSettings(artifact_root="file:///data/art", artifact_pvc="artifacts")
    assert training.artifact_paths(settings, "file:///data/art/ml/a/r-1") == ("/data/art/ml", "a/r-1")
    for uri in ("file:///data/artist/ml/a/r", "file:///etc/ml/a/r", "file:///data/art/ml"):
        with pytest.raises(ValueError, match="not under the artifact root"):
            training.artifact_paths(settings, uri)
