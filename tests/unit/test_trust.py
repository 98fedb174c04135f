"""The operator's trust checks (owner chain, pods, admission policies): pure, no cluster."""

import copy

import pytest
import yaml

from rl_operator import models as m, objects
from rl_operator import approvals, policygen, training, trust
from rl_operator.settings import OperatorSettings
from support import REPO

SETTINGS = OperatorSettings(artifact_root="file:///var/lib/rlops/artifacts")
FP = "sha256:" + "b" * 64


def _obj(kind, name, uid, owner=None, **rest):
    meta = {"name": name, "namespace": "ml", "uid": uid}
    if owner is not None:
        meta["ownerReferences"] = [objects.owner_reference(owner)]
    return {"apiVersion": m.API_VERSION, "kind": kind, "metadata": meta, **rest}


def chain():
    """An agent, its Succeeded run and that run's Rollout, as the operator makes them."""
    agent = _obj("RLAgent", "cp", "uid-agent", spec={"environment": {"id": "CartPole-v1"}})
    run = training.desired_training_run(agent)
    run["metadata"]["uid"] = "uid-run-0001"
    uri = training.artifact_uri(SETTINGS, run)
    run["status"] = {"phase": "Succeeded", "artifactURI": uri, "fingerprint": FP, "metrics": {"meanReturn": 500.0}}
    from rl_operator import rollout

    ro = rollout.desired_rollout(run)
    ro["metadata"]["uid"] = "uid-rollout"
    return agent, run, ro, uri


def test_the_operators_own_chain_is_trusted():
    agent, run, ro, uri = chain()
    assert trust.run_untrusted(run, agent) is None
    assert trust.rollout_untrusted(ro, run, agent, uri) is None


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda a, r, o: o["metadata"].pop("ownerReferences"), "not controlled by TrainingRun"),
    (lambda a, r, o: o["metadata"]["ownerReferences"][0].update(uid="uid-other"), "not controlled by TrainingRun"),
    (lambda a, r, o: o["metadata"]["ownerReferences"][0].update(controller=False), "not controlled by TrainingRun"),
    (lambda a, r, o: r["metadata"]["ownerReferences"][0].update(uid="uid-other"), "not controlled by RLAgent"),
    (lambda a, r, o: o["spec"].update(fingerprint="sha256:" + "f" * 64), "spec.fingerprint"),
    (lambda a, r, o: o["spec"].update(artifactURI="file:///tmp/evil"), "spec.artifactURI"),
    (lambda a, r, o: o["spec"]["evaluation"].update(meanReturn=10_000), "meanReturn"),
    (lambda a, r, o: o["spec"].update(version="cp-9"), "spec.version"),
    (lambda a, r, o: r["status"].update(phase="Running"), "has not succeeded"),
    (lambda a, r, o: (r["status"].update(artifactURI="file:///tmp/x"), o["spec"].update(artifactURI="file:///tmp/x")),
     "not where the operator assigned"),
])
def test_anything_outside_the_chain_is_not_trusted(mutate, words):
    agent, run, ro, uri = chain()
    mutate(agent, run, ro)
    why = trust.rollout_untrusted(ro, run, agent, uri)
    assert why is not None and words in why


def test_missing_links_are_not_trusted():
    agent, run, ro, uri = chain()
    assert "does not exist" in trust.rollout_untrusted(ro, None, agent, uri)
    assert "does not exist" in trust.rollout_untrusted(ro, run, None, uri)


def _job_and_pod():
    agent, run, _, _ = chain()
    job = training.desired_job(run, SETTINGS)
    job["metadata"]["uid"] = "uid-job"
    tpl = copy.deepcopy(job["spec"]["template"]["spec"])
    tpl["volumes"] = [{"name": "kube-api-access-x1", "projected": {"sources": []}}]
    tpl["containers"][0]["volumeMounts"] = [{"name": "kube-api-access-x1", "mountPath": "/var/run/secrets"}]
    pod = {"metadata": {"name": "cp-1-abcde", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"], "uid": "uid-job",
         "controller": True}]}, "spec": tpl}
    return job, pod


def test_the_jobs_own_pod_speaks_for_the_run():
    job, pod = _job_and_pod()
    assert trust.pod_untrusted(pod, job, training.TRAINER_CONTAINER) is None


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda p: p["metadata"].pop("ownerReferences"), "not controlled by Job"),
    (lambda p: p["metadata"]["ownerReferences"][0].update(uid="uid-mine"), "not controlled by Job"),
    (lambda p: p["spec"]["containers"][0].update(image="evil:latest"), "image"),
    (lambda p: p["spec"]["containers"][0].update(command=["sh", "-c", "echo forged > /dev/termination-log"]),
     "command"),
    (lambda p: p["spec"]["containers"][0]["env"].append({"name": "PYTHONPATH", "value": "/evil"}), "env"),
    (lambda p: p["spec"]["containers"].append({"name": "sidecar", "image": "evil"}), "containers"),
    (lambda p: p["spec"].setdefault("initContainers", []).append({"name": "init", "image": "evil"}), "initContainers"),
    (lambda p: p["spec"]["volumes"].append({"name": "mine", "hostPath": {"path": "/"}}), "volumes"),
    (lambda p: p["spec"]["containers"][0]["volumeMounts"].append({"name": "mine", "mountPath": "/tmp"}),
     "volumeMounts"),
])
def test_a_hand_made_pod_is_not_the_trainer(mutate, words):
    job, pod = _job_and_pod()
    mutate(pod)
    why = trust.pod_untrusted(pod, job, training.TRAINER_CONTAINER)
    assert why is not None and words in why


def test_trainer_summary_outside_the_assigned_root_fails_the_run():
    _, run, _, uri = chain()
    run["status"] = {}
    job, pod = _job_and_pod()
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    msg = '{"artifactURI": "file:///tmp/evil", "fingerprint": "%s", "metrics": {"meanReturn": 500}}' % FP
    pod["status"] = {"containerStatuses": [{"name": "trainer", "state": {"terminated": {"message": msg}}}]}
    status, _ = training.observe_run(run, job, [pod], objects.now(), uri)
    assert status.phase == "Failed" and status.failure_reason == "ArtifactOutsideAssignedRoot"
    good = msg.replace("file:///tmp/evil", uri)
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = good
    status, _ = training.observe_run(run, job, [pod], objects.now(), uri)
    assert status.phase == "Succeeded" and status.artifact_uri == uri


def test_signatures_bind_every_field():
    base = ("ml", "cp-2", "uid", FP, "bob", "2026-12-02T00:00:00Z")
    sig = approvals.signature(b"k" * 32, *base)
    assert approvals.signature_valid(b"k" * 32, sig, *base)
    for i in range(len(base)):
        changed = list(base)
        changed[i] = changed[i] + "x"
        assert not approvals.signature_valid(b"k" * 32, sig, *changed)
    assert not approvals.signature_valid(None, sig, *base)
    assert trust.derive_key(b"k", "feedback:a") != trust.derive_key(b"k", "feedback:b")


def test_committed_admission_policies_match_the_models():
    chart = (REPO / "charts" / "rlops" / "templates" / "admission-policies.yaml").read_text()
    assert chart == policygen.HELM_HEADER + policygen.render(helm=True), "run `make crds`"
    # the chart's default trainer images are the policies' default (manifests/base is rendered with them)
    values = yaml.safe_load((REPO / "charts" / "rlops" / "values.yaml").read_text())
    assert tuple(values["training"]["allowedImages"]) == policygen.DEFAULT_ALLOWED_IMAGES
    # manifests/base is rendered from the chart (tests/integration/test_chart.py checks all of it)
    rendered = (REPO / "manifests" / "base" / "admission-policies.yaml").read_text()
    def objects(text):  # helm orders resources by kind
        return sorted((d for d in yaml.safe_load_all(text) if d), key=lambda d: (d["kind"], d["metadata"]["name"]))
    assert objects(rendered) == objects(policygen.render()), "run `make crds`"


def test_default_comparison_covers_every_policy_field():
    expr = policygen.cel_equals("object.spec.canary", m.CanarySpec, m.CanarySpec().wire())
    for step in m.CanarySpec().wire()["steps"]:
        key = "setWeight" if "setWeight" in step else "pause"
        assert key in expr
    for field in m.AnalysisSpec().wire():
        assert f"object.spec.canary.analysis.{field}" in expr
    approval = policygen.cel_equals("a", m.ApprovalPolicy, m.ApprovalPolicy().wire())
    assert '!has(a.auto.minMeanReturn)' in approval and 'a.mode == "manual"' in approval


def test_the_webhook_is_announced_through_its_service_in_a_cluster():
    from rl_operator import admission, certs
    assert admission.client_config(b"CA", service=certs.service_ref("rlops-system/rlops-operator:443")) == {
        "service": {"namespace": "rlops-system", "name": "rlops-operator", "port": 443, "path": "/approval"},
        "caBundle": "Q0E="}
    assert admission.client_config(b"CA", url="https://127.0.0.1:9443/") == {
        "url": "https://127.0.0.1:9443/approval", "caBundle": "Q0E="}
    with pytest.raises(ValueError, match="Service or a URL"):
        admission.client_config(b"CA")
    for bad in ("rlops-operator:443", "rlops-system/rlops-operator", "rlops-system/:443", "a/b:https"):
        with pytest.raises(ValueError, match="namespace/name:port"):
            certs.service_ref(bad)
