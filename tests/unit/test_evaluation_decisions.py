"""The operator's own evaluation of a trained artifact (rl_operator.evaluation, trust): pure, no cluster."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from rl_operator import evaluation, rollout, training, trust
from rl_operator import models as m
from rl_operator.settings import OperatorSettings

AT = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
FP = "sha256:" + "ab" * 32
KEY = b"k" * 32
SETTINGS = OperatorSettings(artifact_root="file:///data/art", artifact_pvc="artifacts",
                            evaluator_image="registry.example/rlops/engine@sha256:" + "1" * 64)


def trained_run(env_id="CartPole-v1", image="ghcr.io/rlops/engine:0.1.0", metrics=None):
    agent = {"apiVersion": m.API_VERSION, "kind": "RLAgent",
             "metadata": {"name": "cp", "namespace": "ml", "uid": "u-agent", "generation": 1},
             "spec": m.RLAgentSpec.model_validate({"environment": {"id": env_id, "kwargs": {"a": 1}},
                                                   "training": {"image": image},
                                                   "evaluation": {"episodes": 20}}).wire()}
    run = training.desired_training_run(agent)
    run["metadata"].update(uid="run-uid-0001", generation=1)
    run["status"] = {"phase": "Succeeded", "fingerprint": FP, "artifactURI": training.artifact_uri(SETTINGS, run),
                     "metrics": metrics or {"meanReturn": 480.0, "stdReturn": 20.0, "episodes": 20}}
    return agent, run


def pod_of(job, *, phase="Running", terminated=None, image_id="registry.example/rlops/engine@sha256:" + "1" * 64):
    state = {"terminated": terminated} if terminated is not None else {"running": {}}
    return {"metadata": {"name": job["metadata"]["name"] + "-x", "creationTimestamp": "2026-12-07T12:00:00Z",
                         "labels": job["spec"]["template"]["metadata"]["labels"]},
            "spec": job["spec"]["template"]["spec"],
            "status": {"phase": phase, "containerStatuses": [
                {"name": evaluation.EVALUATOR_CONTAINER, "imageID": image_id, "state": state}]}}


def finished(job, condition):
    return {**job, "status": {"conditions": [{"type": condition, "status": "True"}]}}


def measured_message(fingerprint=FP, mean=471.5):
    return json.dumps({"phase": "Succeeded", "fingerprint": fingerprint, "seed": 7, "evaluation": {
        "meanReturn": mean, "stdReturn": 12.0, "minReturn": 430.0, "maxReturn": 500.0, "episodes": 20,
        "randomMeanReturn": 22.0}})


def test_the_evaluation_job_runs_the_platforms_image_on_a_read_only_artifact_with_the_operators_seed():
    _, run = trained_run()
    job = evaluation.evaluation_job(run, SETTINGS, seed=12345)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert job["metadata"]["name"] == "rlops-eval-run-uid-0001"
    assert container["image"] == SETTINGS.evaluator_image  # not the tenant's trainer image
    assert container["command"] == ["python", "-m", "rl_engine.evaluate"]
    config = json.loads(next(e["value"] for e in container["env"] if e["name"] == "RLOPS_EVALUATION"))
    assert config == {"artifactURI": run["status"]["artifactURI"], "fingerprint": FP,
                      "environment": {"id": "CartPole-v1", "kwargs": {"a": 1}}, "episodes": 20, "seed": 12345}
    rest = run["status"]["artifactURI"].removeprefix("file:///data/art/ml/")
    assert rest.count("/") == 1  # <agent>/<run>: the run's own directory, nothing else of the store
    assert container["volumeMounts"] == [{"name": "artifacts", "mountPath": f"/data/art/ml/{rest}", "subPath": rest,
                                          "readOnly": True}]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "artifacts", "readOnly": True}
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and "nodeSelector" not in pod
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    labels = job["metadata"]["labels"]
    assert labels[m.RUN_LABEL] == run["metadata"]["name"] and labels[m.EVALUATION_LABEL] == "true"
    assert job["spec"]["template"]["metadata"]["annotations"] == {evaluation.SEED_ANNOTATION: "12345"}
    assert job["metadata"]["ownerReferences"][0]["uid"] == "run-uid-0001"


@pytest.mark.parametrize(("env_id", "trusted"), [("CartPole-v1", True), ("rl_engine.envs:RouterEnv", True),
                                                 ("tenant_envs.pricing:PricingEnv", False)])
def test_an_environment_of_the_tenants_own_code_is_evaluated_in_its_image_and_marked_untrusted(env_id, trusted):
    _, run = trained_run(env_id=env_id, image="ghcr.io/rlops/engine:tenant-build")
    job = evaluation.evaluation_job(run, SETTINGS, seed=1234)
    image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == (SETTINGS.evaluator_image if trusted else "ghcr.io/rlops/engine:tenant-build")
    done = pod_of(job, phase="Succeeded", terminated={"exitCode": 0, "message": measured_message()})
    # what a tenant with edit can change on the Job (its own annotations) changes nothing recorded
    job["metadata"]["annotations"] = {"rlops.dev/evaluation-trusted": "true", evaluation.SEED_ANNOTATION: "1"}
    status, _ = evaluation.observe_evaluation(run, finished(job, "Complete"), [done], AT, KEY)
    assert status.evaluation.trusted is trusted and status.evaluation.seed == 1234


def test_measured_figures_become_the_runs_signed_evaluation():
    _, run = trained_run()
    job = evaluation.evaluation_job(run, SETTINGS, seed=7)
    status, events = evaluation.observe_evaluation(run, job, [], AT, KEY)
    assert status.evaluation.phase == "Pending" and status.evaluation.seed == 7 and events == []
    status, _ = evaluation.observe_evaluation(run, job, [pod_of(job)], AT, KEY)
    assert status.evaluation.phase == "Running"
    done = pod_of(job, phase="Succeeded", terminated={"exitCode": 0, "message": measured_message()})
    status, events = evaluation.observe_evaluation(run, finished(job, "Complete"), [done], AT, KEY)
    record = status.evaluation
    assert (record.phase, record.mean_return, record.std_return, record.episodes, record.random_mean_return) == \
        ("Succeeded", 471.5, 12.0, 20, 22.0)
    assert record.fingerprint == FP and record.trusted is True and record.image == SETTINGS.evaluator_image
    assert record.image_id.endswith("@sha256:" + "1" * 64) and record.measured_at == AT
    assert trust.evaluation_signature_valid(KEY, record.signature, "ml", run["metadata"]["name"], "run-uid-0001",
                                            trust.evidence(record))
    assert events == []  # 471.5 is within 3 standard errors + 5% of the reported 480
    assert next(c for c in status.conditions if c.type == "Evaluated").status == "True"
    # a finished evaluation stays as it is
    again, _ = evaluation.observe_evaluation({**run, "status": status.wire()}, finished(job, "Failed"), [], AT, KEY)
    assert again.evaluation == record


def test_a_trainer_that_grades_itself_is_caught():
    """The trainer reports 1e9; the operator measures 23 (a random-like policy): the Rollout
    gets the measured figure, and the gap is a Warning and a condition."""
    _, run = trained_run(metrics={"meanReturn": 1e9, "stdReturn": 0.0, "episodes": 20})
    job = evaluation.evaluation_job(run, SETTINGS, seed=7)
    done = pod_of(job, phase="Succeeded", terminated={"exitCode": 0, "message": measured_message(mean=23.0)})
    status, events = evaluation.observe_evaluation(run, finished(job, "Complete"), [done], AT, KEY)
    assert status.evaluation.mean_return == 23.0
    assert [e.reason for e in events] == ["ReportedFiguresDiffer"] and "1e+09" in events[0].message
    cond = next(c for c in status.conditions if c.type == "ReportedMatchesMeasured")
    assert cond.status == "False" and cond.reason == "ReportedFiguresDiffer"
    summary = evaluation.rollout_evaluation(status)
    assert (summary.mean_return, summary.reported_mean_return, summary.trusted) == (23.0, 1e9, True)


@pytest.mark.parametrize(("job_condition", "message", "reason"), [
    ("Complete", measured_message(fingerprint="sha256:" + "cd" * 32), "FingerprintMismatch"),
    ("Complete", "not json: the log's tail", "InvalidEvaluation"),
    ("Failed", json.dumps({"phase": "Failed", "reason": "FingerprintMismatch", "message": "model.pt changed"}),
     "FingerprintMismatch"),
    ("Failed", json.dumps({"phase": "Failed", "reason": "InvalidArtifact", "message": "no policy.json"}),
     "InvalidArtifact"),
])
def test_an_evaluation_that_cannot_measure_the_reported_bytes_fails_with_the_reason(job_condition, message, reason):
    _, run = trained_run()
    job = evaluation.evaluation_job(run, SETTINGS, seed=7)
    done = pod_of(job, phase="Failed", terminated={"exitCode": 1, "message": message})
    status, events = evaluation.observe_evaluation(run, finished(job, job_condition), [done], AT, KEY)
    assert status.evaluation.phase == "Failed" and status.evaluation.reason == reason
    assert [e.reason for e in events] == ["EvaluationFailed"] and status.evaluation.signature is None
    ok, why = rollout.eligible({**run, "status": status.wire()}, m.RLAgentSpec.model_validate(
        {"environment": {"id": "CartPole-v1"}}))
    assert not ok and "not been evaluated" in why


def test_without_the_signing_key_nothing_is_signed_or_called_measured():
    _, run = trained_run()
    job = evaluation.evaluation_job(run, SETTINGS, seed=7)
    done = pod_of(job, phase="Succeeded", terminated={"exitCode": 0, "message": measured_message()})
    status, _ = evaluation.observe_evaluation(run, finished(job, "Complete"), [done], AT, None)
    assert status.evaluation.phase == "Pending" and status.evaluation.signature is None


def chain():
    """An agent, its Succeeded and measured run, and the Rollout the operator makes from it."""
    agent, run = trained_run()
    job = evaluation.evaluation_job(run, SETTINGS, seed=7)
    done = pod_of(job, phase="Succeeded", terminated={"exitCode": 0, "message": measured_message()})
    status, _ = evaluation.observe_evaluation(run, finished(job, "Complete"), [done], AT, KEY)
    run["status"] = status.wire()
    ro = rollout.desired_rollout(run)
    ro["metadata"]["uid"] = "ro-uid"
    return agent, run, ro


def test_a_rollout_carries_the_measured_evaluation_and_its_signature_which_the_operator_checks():
    agent, run, ro = chain()
    ev = ro["spec"]["evaluation"]
    assert ev["meanReturn"] == 471.5 and ev["reportedMeanReturn"] == 480.0 and ev["trusted"] is True
    assert ev["evaluatorImageID"].endswith("1" * 64) and ev["signature"] == run["status"]["evaluation"]["signature"]
    uri = run["status"]["artifactURI"]
    assert trust.rollout_untrusted(ro, run, agent, uri, KEY) is None
    # through the API server, 471.5 stays 471.5 but 20.0 may come back as 20: still the same evidence
    ro["spec"]["evaluation"]["episodes"] = 20.0
    assert trust.rollout_untrusted(json.loads(json.dumps(ro)), run, agent, uri, KEY) is None


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda run, ro: ro["spec"]["evaluation"].update(meanReturn=499.0), "measured evaluation"),
    (lambda run, ro: ro["spec"]["evaluation"].update(trusted=False), "measured evaluation"),
    (lambda run, ro: ro["spec"]["evaluation"].update(signature="v1:" + "0" * 64), "measured evaluation"),
    (lambda run, ro: run["status"]["evaluation"].update(meanReturn=499.0), "measured evaluation"),
    (lambda run, ro: (run["status"]["evaluation"].update(meanReturn=499.0),
                      ro["spec"]["evaluation"].update(meanReturn=499.0)), "signature"),
    (lambda run, ro: run["status"].pop("evaluation"), "no measured evaluation"),
])
def test_an_evaluation_that_is_not_the_operators_measurement_is_not_trusted(mutate, words):
    agent, run, ro = chain()
    mutate(run, ro)
    why = trust.rollout_untrusted(ro, run, agent, run["status"]["artifactURI"], KEY)
    assert why is not None and words in why, why
