"""What the operator trusts: its own owner chain, its own pods, and its own evaluations. Pure.

A tenant with ``edit`` can create pods and Jobs, label anything, and patch the metadata of
Rollouts and TrainingRuns (their specs are immutable, and only the operator creates them). So
the operator acts on a Rollout only when every link below holds, checked by uid and not by
label or name alone:

- Rollout --controller--> TrainingRun (``spec.trainingRunRef``) --controller--> RLAgent
  (``spec.agentRef``);
- the Rollout's spec (version, artifact URI, fingerprint, evaluation) equals what the run's
  status says, and the run Succeeded; its evaluation is the operator's own measurement
  (``status.evaluation``), with the operator's signature of it;
- the run's artifact URI is the one the operator assigned to that namespace, agent and run;
- the run's status came from the run's own Job and that Job's own pods: controller
  ownerReferences by uid, and a pod whose trainer container is the Job's template (image,
  command, arguments, environment, mounts), so that a hand-made pod adopted by the Job can't
  speak for the trainer.

The evaluation a Rollout carries counts only with the operator's signature of its run's measured
evaluation (:func:`evaluation_signature`). The approval rule itself, with its signature, lives in
``rl_operator.approvals``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from rl_operator import models as m


def controller_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The controller ownerReference of ``obj``, or None."""
    return next((r for r in obj.get("metadata", {}).get("ownerReferences") or [] if r.get("controller")), None)


def controlled_by(obj: dict[str, Any], owner: dict[str, Any], kind: str) -> bool:
    """Whether ``owner`` (of ``kind``) is ``obj``'s controller, by uid."""
    ref = controller_of(obj)
    return (ref is not None and ref.get("kind") == kind and ref.get("uid") == owner["metadata"]["uid"]
            and ref.get("name") == owner["metadata"]["name"])


def run_untrusted(run: dict[str, Any], agent: dict[str, Any] | None) -> str | None:
    """Why the operator must not act on this TrainingRun, or None when it is its own."""
    if agent is None:
        return f"its RLAgent {run['spec']['agentRef']['name']!r} does not exist"
    if not controlled_by(run, agent, m.RLAgent.KIND):
        return (f"it is not controlled by RLAgent {agent['metadata']['name']!r} (uid {agent['metadata']['uid']}): "
                "TrainingRuns are made by the operator from an RLAgent")
    return None


def rollout_untrusted(rollout: dict[str, Any], run: dict[str, Any] | None, agent: dict[str, Any] | None,
                      assigned_artifact_uri: str | None, key: bytes | None = None) -> str | None:
    """Why the operator must not act on this Rollout, or None when it sits in its owner chain.

    Args:
        rollout, run, agent: the Rollout, the TrainingRun its spec names, and that run's RLAgent
            (None when absent).
        assigned_artifact_uri: the artifact URI the operator assigned to the run
            (``training.artifact_uri``), or None to skip that check.
        key: the operator's signing key: ``spec.evaluation`` must carry its signature of the
            run's measured evaluation (None: that check is skipped).
    """
    spec = rollout["spec"]
    if run is None:
        return f"its TrainingRun {spec['trainingRunRef']['name']!r} does not exist"
    if not controlled_by(rollout, run, m.TrainingRun.KIND):
        return (f"it is not controlled by TrainingRun {run['metadata']['name']!r} (uid {run['metadata']['uid']}): "
                "Rollouts are made by the operator from a Succeeded TrainingRun")
    if run["spec"]["agentRef"]["name"] != spec["agentRef"]["name"]:
        return f"spec.agentRef {spec['agentRef']['name']!r} is not its TrainingRun's agent"
    why = run_untrusted(run, agent)
    if why:
        return f"its TrainingRun {run['metadata']['name']!r} is not trusted: {why}"
    status = m.TrainingRunStatus.model_validate(run.get("status") or {})
    if status.phase != "Succeeded":
        return f"its TrainingRun {run['metadata']['name']!r} has not succeeded"
    expected = {
        "version": run["metadata"]["name"],
        "artifactURI": status.artifact_uri,
        "fingerprint": status.fingerprint,
    }
    for field_name, want in expected.items():
        if spec.get(field_name) != want:
            return f"spec.{field_name} {spec.get(field_name)!r} is not its TrainingRun's {want!r}"
    summary = m.EvaluationSummary.model_validate(spec.get("evaluation") or {})
    if summary.signature is None:  # made before the operator measured evaluations: the trainer's figure
        mean = status.metrics.get("meanReturn")
        if summary.mean_return != mean:
            return f"spec.evaluation.meanReturn is not its TrainingRun's {mean!r}"
    else:
        record = status.evaluation
        if record is None or record.phase != "Succeeded":
            return f"its TrainingRun {run['metadata']['name']!r} has no measured evaluation"
        measured = evidence(record)
        if summary_evidence(summary, spec["fingerprint"]) != measured or summary.signature != record.signature:
            return f"spec.evaluation is not its TrainingRun's measured evaluation ({measured})"
        if key is not None and not evaluation_signature_valid(key, record.signature, run["metadata"]["namespace"],
                                                              run["metadata"]["name"], run["metadata"]["uid"], measured):
            return "spec.evaluation does not carry the operator's signature of its TrainingRun's evaluation"
    if assigned_artifact_uri is not None and status.artifact_uri != assigned_artifact_uri:
        return f"its artifact {status.artifact_uri!r} is not where the operator assigned ({assigned_artifact_uri!r})"
    return None


#: Trainer-container fields that must equal the Job template's for a pod to speak for the run.
_CONTAINER_FIELDS = ("image", "command", "args", "env", "envFrom", "workingDir")
#: Volumes the API server adds to every pod (the ServiceAccount token), not part of the template.
_INJECTED_VOLUME_PREFIX = "kube-api-access-"


def _mounts(container: dict[str, Any]) -> list[Any]:
    return sorted((v for v in container.get("volumeMounts") or []
                   if not v.get("name", "").startswith(_INJECTED_VOLUME_PREFIX)), key=lambda v: v.get("mountPath", ""))


def _volumes(pod_spec: dict[str, Any]) -> list[Any]:
    return sorted((v for v in pod_spec.get("volumes") or []
                   if not v.get("name", "").startswith(_INJECTED_VOLUME_PREFIX)), key=lambda v: v.get("name", ""))


def pod_untrusted(pod: dict[str, Any], job: dict[str, Any], container_name: str) -> str | None:
    """Why this pod can't speak for the Job's trainer, or None when it is the Job's own.

    Compared with the Job's pod template: the controller (by uid), the set of containers and
    init containers, the trainer container's image, command, args, env, envFrom, workingDir and
    mounts, and the pod's volumes (less the ServiceAccount token volume the API server injects).
    """
    if not controlled_by(pod, job, "Job"):
        return f"pod {pod['metadata']['name']} is not controlled by Job {job['metadata']['name']} (uid)"
    want = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    have = pod.get("spec") or {}
    names = lambda spec, key: sorted(c.get("name") for c in spec.get(key) or [])  # noqa: E731
    for key in ("containers", "initContainers"):
        if names(have, key) != names(want, key):
            return f"pod {pod['metadata']['name']}: {key} {names(have, key)} differ from the Job's {names(want, key)}"
    w = next((c for c in want.get("containers") or [] if c.get("name") == container_name), None)
    h = next((c for c in have.get("containers") or [] if c.get("name") == container_name), None)
    if w is None or h is None:
        return f"pod {pod['metadata']['name']} has no {container_name} container"
    for key in _CONTAINER_FIELDS:
        if (h.get(key) or None) != (w.get(key) or None):
            return f"pod {pod['metadata']['name']}: the {container_name} container's {key} differs from the Job's"
    if _mounts(h) != _mounts(w):
        return f"pod {pod['metadata']['name']}: the {container_name} container's volumeMounts differ from the Job's"
    if _volumes(have) != _volumes(want):
        return f"pod {pod['metadata']['name']}: volumes differ from the Job's"
    return None


def evidence(record: m.MeasuredEvaluation) -> dict[str, Any]:
    """What the operator's signature of an evaluation covers (:func:`evaluation_signature`),
    numbers normalised so that a JSON round trip through the API server (``500.0`` → ``500``)
    leaves it as it was."""
    def number(x: Any) -> float | None:
        return None if x is None else float(x)

    return {"fingerprint": record.fingerprint, "meanReturn": number(record.mean_return),
            "stdReturn": number(record.std_return), "episodes": record.episodes,
            "randomMeanReturn": number(record.random_mean_return),
            "baselineMeanReturn": number(record.baseline_mean_return), "seed": record.seed,
            "trusted": record.trusted, "image": record.image, "imageID": record.image_id}


def summary_evidence(summary: m.EvaluationSummary, fingerprint: str) -> dict[str, Any]:
    """:func:`evidence` of the measured evaluation a Rollout's ``spec.evaluation`` was made from."""
    return evidence(m.MeasuredEvaluation(
        phase="Succeeded", fingerprint=fingerprint, mean_return=summary.mean_return, std_return=summary.std_return,
        episodes=summary.episodes, random_mean_return=summary.random_mean_return,
        baseline_mean_return=summary.baseline_mean_return, seed=summary.seed, trusted=summary.trusted,
        image=summary.evaluator_image, image_id=summary.evaluator_image_id))


def evaluation_signature(key: bytes, namespace: str, run: str, uid: str, evidence: dict[str, Any]) -> str:
    """The operator's signature of its evaluation of a run's artifact: ``v1:`` + hex HMAC-SHA256
    over the run (namespace, name, uid) and ``evidence`` (``evaluation.evidence``: the fingerprint,
    the figures, the seed, the evaluator's image and digest, whether it was trusted), as
    canonical JSON (sorted keys, no spaces)."""
    body = json.dumps(evidence, sort_keys=True, separators=(",", ":"), allow_nan=False)
    payload = "\n".join(("rlops-evaluation-v1", namespace, run, uid, body))
    return "v1:" + hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def evaluation_signature_valid(key: bytes | None, value: str | None, namespace: str, run: str, uid: str,
                               evidence: dict[str, Any]) -> bool:
    """Whether ``value`` is the operator's signature of exactly this evaluation (constant-time)."""
    if not key or not value:
        return False
    return hmac.compare_digest(value.encode(), evaluation_signature(key, namespace, run, uid, evidence).encode())


def derive_key(key: bytes, purpose: str) -> bytes:
    """A key for one purpose (e.g. ``feedback:<app>``), derived from the operator's key (HMAC-SHA256)."""
    return hmac.new(key, f"rlops-derive-v1\n{purpose}".encode(), hashlib.sha256).digest()
