"""The operator's own evaluation of a trained artifact: pure decisions, no I/O.

The trainer reports its figures, but it runs the tenant's code. So once a run's trainer has
succeeded, the operator measures the artifact itself (seed 000's approval gate asks for evidence
an approver can trust; Kargo and Argo Rollouts verify nothing before a person is asked):

1. :func:`evaluation_job`: a Job ``rlops-eval-<run uid>`` runs ``python -m rl_engine.evaluate``
   from the platform's engine image (``settings.evaluator_image``, not the tenant's), with the
   artifact mounted read only and a seed the operator draws now, after training ended. An
   environment that needs the tenant's code (an entry point outside ``rl_engine``) can only be
   evaluated in the tenant's own image: the record says ``trusted: false``.
2. :func:`observe_evaluation`: that Job's pod reports the fingerprint it computed from the bytes
   it read and the figures it measured (termination message); they become the run's
   ``status.evaluation``, signed with the operator's key (``trust.evaluation_signature``).
   A fingerprint other than the trainer's fails the evaluation; a mean return far from the
   trainer's own (:func:`reported_gap`) is a Warning and a condition.
3. The Rollout carries the measured figures and their signature (:func:`rollout_evaluation`), and
   the approval's signature covers that signature: an approval names the evidence it was given.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from rl_operator import models as m
from rl_operator import trust
from rl_operator.conditions import set_condition
from rl_operator.settings import OperatorSettings
from rl_operator.objects import Event
from rl_operator.training import artifact_uri, container_state, container_status, helper_pod_spec, \
    job_condition, newest_first, owner_reference, parse_termination_message

EVALUATOR_CONTAINER = "evaluator"
#: The evaluation Job's name: ``rlops-eval-<run uid>`` (47 characters).
JOB_PREFIX = "rlops-eval-"
#: The seed the operator drew, on the evaluation Job's pod template: read back from there (the
#: cache keeps annotations, not the containers' environment), where nobody can change it (a
#: running Job's template is immutable; the Job's own annotations are open to ``edit``).
SEED_ANNOTATION = f"{m.GROUP}/evaluation-seed"
#: Seeds are drawn below this (numpy's SeedSequence takes any non-negative integer).
SEED_BOUND = 2**31
#: Environment entry points whose code the engine image itself carries (``rl_engine...:Class``).
ENGINE_MODULE = "rl_engine."
#: A reported mean return this many standard errors (of the difference of the two means) away
#: from the measured one, plus 5% of the larger, is a gap worth a Warning.
GAP_STANDARD_ERRORS = 3.0
GAP_RELATIVE = 0.05


def job_name(run: dict[str, Any]) -> str:
    """The evaluation Job of a run: ``rlops-eval-<run uid>``."""
    return f"{JOB_PREFIX}{run['metadata']['uid']}"


def trusted_environment(env_id: str) -> bool:
    """Whether the platform's engine image can build this environment by itself: a Gymnasium
    registry id, or an entry point in ``rl_engine``. Any other ``module:Class`` is the tenant's code."""
    return ":" not in env_id or env_id.startswith(ENGINE_MODULE)


def evaluation_config(run: dict[str, Any], settings: OperatorSettings, seed: int) -> dict[str, Any]:
    """What the evaluator reads (``$RLOPS_EVALUATION``, ``rl_engine.evaluate``): the artifact and
    the fingerprint the trainer reported, the run's environment and episodes, and the seed."""
    spec = m.TrainingRunSpec.model_validate(run["spec"])
    status = m.TrainingRunStatus.model_validate(run.get("status") or {})
    return {"artifactURI": status.artifact_uri or artifact_uri(settings, run), "fingerprint": status.fingerprint,
            "environment": {"id": spec.environment.id, "kwargs": spec.environment.kwargs},
            "episodes": spec.evaluation.episodes, "seed": seed}


def evaluation_job(run: dict[str, Any], settings: OperatorSettings, seed: int) -> dict[str, Any]:
    """The ``batch/v1`` Job that measures a Succeeded run's artifact.

    The platform's evaluator image (``settings.evaluator_image``), or the run's own trainer image
    when its environment needs the tenant's code (:func:`trusted_environment`); the artifact
    store mounted read only; no GPU; non-root, as training runs; the training template's
    tolerations (and the GPU taint's), not its node selector; one retry and a 30-minute deadline;
    the seed on the pod template (:data:`SEED_ANNOTATION`). It carries the run's label (the
    operator watches it with the run's Job) and ``rlops.dev/evaluation``, and is owned by the run."""
    spec = m.TrainingRunSpec.model_validate(run["spec"])
    meta = run["metadata"]
    trusted = trusted_environment(spec.environment.id)
    uri = evaluation_config(run, settings, seed)["artifactURI"]
    labels = {m.RUN_LABEL: meta["name"], m.AGENT_LABEL: spec.agent_ref.name, m.EVALUATION_LABEL: "true",
              "app.kubernetes.io/name": "rlops-evaluator", "app.kubernetes.io/managed-by": "rlops"}
    container: dict[str, Any] = {
        "name": EVALUATOR_CONTAINER,
        "image": settings.evaluator_image if trusted else spec.training.image,
        "command": [settings.trainer_command[0], "-m", "rl_engine.evaluate"],
        "env": [{"name": "RLOPS_EVALUATION", "value": json.dumps(evaluation_config(run, settings, seed),
                                                                 sort_keys=True)},
                {"name": "RLOPS_ARTIFACT_URI", "value": uri},  # for people and tools reading the pod
                {"name": "PYTHONUNBUFFERED", "value": "1"},
                *({"name": k, "value": v} for k, v in sorted(settings.extra_env.items()))],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = helper_pod_spec(settings, container, spec.training, uri, read_only=True)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(run), "namespace": meta["namespace"], "labels": labels,
                     "ownerReferences": [owner_reference(run)]},
        "spec": {"backoffLimit": 1, "activeDeadlineSeconds": 1800,
                 "template": {"metadata": {"labels": labels, "annotations": {SEED_ANNOTATION: str(seed)}},
                              "spec": pod_spec}},
    }


def is_evaluation(obj: dict[str, Any]) -> bool:
    """Whether a Job or pod with a run's label is that run's evaluation (not its trainer)."""
    return (obj.get("metadata", {}).get("labels") or {}).get(m.EVALUATION_LABEL) == "true"


def reported_gap(metrics: dict[str, Any], measured: m.MeasuredEvaluation) -> str | None:
    """Why the trainer's reported mean return does not fit the measured one, or None.

    The two means come from different episodes (other seeds), so they differ by chance: the gap
    counts when it exceeds :data:`GAP_STANDARD_ERRORS` standard errors of the difference of two
    means (``sqrt(s_r^2 / n_r + s_m^2 / n_m)``, population standard deviations) plus
    :data:`GAP_RELATIVE` of the larger mean's size."""
    reported, mean = metrics.get("meanReturn"), measured.mean_return
    if not isinstance(reported, (int, float)) or mean is None or not math.isfinite(reported):
        return None
    std_r = float(metrics.get("stdReturn") or 0.0)
    n_r = max(int(metrics.get("episodes") or 1), 1)
    se = math.sqrt(std_r ** 2 / n_r + (measured.std_return or 0.0) ** 2 / max(measured.episodes or 1, 1))
    tolerance = GAP_STANDARD_ERRORS * se + GAP_RELATIVE * max(abs(reported), abs(mean))
    if abs(reported - mean) <= tolerance:
        return None
    return (f"the trainer reported a mean return of {reported:g}, the operator's evaluation measured {mean:g} "
            f"± {measured.std_return or 0:g} over {measured.episodes} episodes (more than {tolerance:.3g} apart)")


#: The evaluator's figures (``rl_engine.evaluate``) that the record keeps, by field.
_FIGURES = {"mean_return": "meanReturn", "std_return": "stdReturn", "min_return": "minReturn",
            "max_return": "maxReturn", "random_mean_return": "randomMeanReturn",
            "baseline_mean_return": "baselineMeanReturn"}


def _failed(record: m.MeasuredEvaluation, reason: str, message: str) -> list[Event]:
    record.phase, record.reason, record.message = "Failed", reason, message[:1024]
    return [Event("Warning", "EvaluationFailed", f"{reason}: {record.message}")]


def observe_evaluation(run: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]],
                       at: datetime, key: bytes | None) -> tuple[m.TrainingRunStatus, list[Event]]:
    """The run's status with ``evaluation`` observed from its evaluation Job and that Job's own
    pods, and the Events its change warrants.

    Args:
        run: a TrainingRun whose trainer succeeded.
        job: its evaluation Job (None: not made yet).
        pods: that Job's own pods (the caller drops others, ``trust.pod_untrusted``).
        at: now.
        key: the operator's signing key; None leaves a finished evaluation unsigned and Running.
    Returns:
        ``(status, events)``; a finished evaluation (Succeeded, Failed) is returned unchanged.
    """
    status = m.TrainingRunStatus.model_validate(run.get("status") or {})
    before = status.evaluation
    if job is None or (before is not None and before.phase in ("Succeeded", "Failed")):
        return status, []
    meta = job["metadata"]
    template = (job.get("spec") or {}).get("template") or {}
    record = before.model_copy(deep=True) if before is not None else m.MeasuredEvaluation(phase="Pending")
    container = next(iter((template.get("spec") or {}).get("containers") or []), {})
    seed = ((template.get("metadata") or {}).get("annotations") or {}).get(SEED_ANNOTATION, "")
    spec = m.TrainingRunSpec.model_validate(run["spec"])
    record.job_name, record.image = meta["name"], container.get("image")
    record.seed = int(seed) if seed.isdigit() else None
    # from the run's immutable spec, as the Job's image was chosen: nothing a tenant can edit
    record.trusted = trusted_environment(spec.environment.id)
    record.episodes = spec.evaluation.episodes
    events: list[Event] = []
    pods = newest_first(pods)
    terminated = next((t for p in pods if (t := container_state(p, EVALUATOR_CONTAINER).get("terminated"))), {})
    summary = parse_termination_message(terminated.get("message")) or {}
    if job_condition(job, "Complete"):
        figures = summary.get("evaluation") if summary.get("phase") == "Succeeded" else None
        if not isinstance(figures, dict) or not isinstance(figures.get("meanReturn"), (int, float)):
            events = _failed(record, "InvalidEvaluation", "the evaluator exited 0 but left no figures")
        elif summary.get("fingerprint") != status.fingerprint:
            events = _failed(record, "FingerprintMismatch", f"the evaluator read an artifact of fingerprint "
                             f"{summary.get('fingerprint')}, not the trainer's {status.fingerprint}")
        elif key is not None:
            events = _measured(run, status, record, summary["fingerprint"], figures, pods, at, key)
    elif job_condition(job, "Failed"):
        events = _failed(record, str(summary.get("reason") or "EvaluatorFailed"),
                         str(summary.get("message") or terminated.get("message") or "the evaluation Job failed"))
    elif any((p.get("status") or {}).get("phase") == "Running" for p in pods):
        record.phase = "Running"
    if record.phase == "Succeeded":
        set_condition(status.conditions, "Evaluated", "True", "Measured",
                      f"mean return {record.mean_return:g} ± {record.std_return or 0:g} over {record.episodes} episodes "
                      f"(seed {record.seed}), evaluator {record.image}"
                      + ("" if record.trusted else ": the tenant's own image (untrusted)"), at)
    elif record.phase == "Failed":
        set_condition(status.conditions, "Evaluated", "False", record.reason or "Failed", record.message or "", at)
    status.evaluation = record
    return status, events


def _measured(run: dict[str, Any], status: m.TrainingRunStatus, record: m.MeasuredEvaluation, fingerprint: str,
              figures: dict[str, Any], pods: list[dict[str, Any]], at: datetime, key: bytes) -> list[Event]:
    """Record a finished evaluation's figures (``pods``: newest first), sign the record, and
    compare the trainer's reported figures with them (condition ``ReportedMatchesMeasured``)."""
    meta = run["metadata"]
    record.fingerprint = fingerprint
    for field_name, key_name in _FIGURES.items():
        value = figures.get(key_name)
        setattr(record, field_name, float(value) if isinstance(value, (int, float)) else None)
    record.episodes = int(figures.get("episodes") or record.episodes or 0)
    record.image_id = (container_status(pods[0], EVALUATOR_CONTAINER).get("imageID") or "") if pods else ""
    record.phase, record.measured_at = "Succeeded", at
    record.signature = trust.evaluation_signature(key, meta["namespace"], meta["name"], meta["uid"],
                                                  trust.evidence(record))
    gap = reported_gap(status.metrics, record)
    set_condition(status.conditions, "ReportedMatchesMeasured", "False" if gap else "True",
                  "ReportedFiguresDiffer" if gap else "WithinTolerance", gap or "", at)
    return [Event("Warning", "ReportedFiguresDiffer", gap)] if gap else []


def rollout_evaluation(run_status: m.TrainingRunStatus) -> m.EvaluationSummary:
    """A Rollout's ``spec.evaluation`` from its run: the measured figures with their signature,
    and the trainer's reported mean return beside them."""
    record = run_status.evaluation
    reported = run_status.metrics.get("meanReturn")
    if record is None:  # a run evaluated before the operator measured evaluations
        return m.EvaluationSummary(mean_return=reported, std_return=run_status.metrics.get("stdReturn"),
                                   episodes=run_status.metrics.get("episodes"))
    return m.EvaluationSummary(
        mean_return=record.mean_return, std_return=record.std_return, episodes=record.episodes,
        random_mean_return=record.random_mean_return, baseline_mean_return=record.baseline_mean_return,
        seed=record.seed, trusted=record.trusted, evaluator_image=record.image, evaluator_image_id=record.image_id,
        reported_mean_return=reported, signature=record.signature)
