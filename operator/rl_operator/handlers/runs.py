"""TrainingRun handlers: its Job, its status from the Job and pods, the operator's evaluation Job,
and the Rollout of a run measured good enough."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import kopf

from kubernetes.client.exceptions import ApiException

from rl_operator import cache, evaluation, metrics, nats_events, objects, rollout, training, trust
from rl_operator import models as m
from rl_operator.handlers import agents, common, rollouts
from rl_operator.handlers.runtime import RUNTIME

log = logging.getLogger(__name__)


@kopf.on.resume(m.GROUP, m.VERSION, m.TrainingRun.PLURAL)
@kopf.on.create(m.GROUP, m.VERSION, m.TrainingRun.PLURAL)
def reconcile_run(body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
    run = dict(body)
    phase = m.run_phase(run)
    if phase not in m.RUN_TERMINAL and not ensure_job(run):
        return
    sync_run(namespace, name)
    if phase == "Succeeded":
        ensure_rollout(run)


def ensure_job(run: dict[str, Any]) -> bool:
    """The run's training Job, created unless it exists (create-or-get). False when the run was
    failed instead: not in its agent's owner chain, its Job refused by the API server, or a Job
    of the run's name that the run does not control.

    Raises:
        ApiException: a transient error (409, 429, 5xx, no answer): kopf retries with backoff.
    """
    namespace, name = run["metadata"]["namespace"], run["metadata"]["name"]
    agent = cache.get_custom_confirmed(namespace, m.RLAgent.PLURAL, run["spec"]["agentRef"]["name"])
    why = trust.run_untrusted(run, agent)
    if why:
        fail_run(run, "NotInOwnerChain", f"the operator ignores this TrainingRun: {why}")
        return False
    try:
        with cache.locked("jobs", namespace, name):  # the agent's handler, the run's, and the resync
            job = cache.get_job(namespace, name)
            if job is None:
                job, _created = cache.create_job_or_get(training.desired_job(run, RUNTIME.settings))
    except ApiException as exc:
        if exc.status is None or not 400 <= exc.status < 500 or exc.status in (409, 429):
            raise
        fail_run(run, "JobRejected", f"the API server refused the training Job ({exc.status} {exc.reason}): "
                                      f"{common.api_message(exc)}")
        return False
    if not trust.controlled_by(job, run, m.TrainingRun.KIND):  # a Job squatting the run's name
        fail_run(run, "JobNotOwned", _job_not_owned(namespace, name))
        return False
    return True


def resync_run(namespace: str, name: str) -> None:
    """One unfinished TrainingRun reconciled again (the resync); an error is logged, and the next
    round tries again."""
    run = cache.get_custom(namespace, m.TrainingRun.PLURAL, name)
    if run is None:
        return
    try:
        reconcile_run(run, namespace, name)
    except Exception as exc:  # the next round, or the next Job or pod event, tries again
        log.warning("resync of TrainingRun %s/%s failed: %s", namespace, name, exc)


@kopf.on.event("batch", "v1", "jobs", labels={m.RUN_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={m.RUN_LABEL: kopf.PRESENT})
def on_child_event(labels: dict[str, str], namespace: str, type: str | None, **_: Any) -> None:
    cache.INDEXED.set()
    sync_run(namespace, labels[m.RUN_LABEL])


def _job_not_owned(namespace: str, name: str) -> str:
    return f"Job {namespace}/{name} exists but is not controlled by this TrainingRun (uid)"


def fail_run(run: dict[str, Any], reason: str, message: str) -> None:
    """Set a run Failed with a reason (once), and sync its agent."""
    namespace, name = run["metadata"]["namespace"], run["metadata"]["name"]
    with cache.locked("trainingruns", namespace, name):
        status, events = training.failed_status(run, reason, message, objects.now())
        if events and cache.patch_status(namespace, m.TrainingRun.PLURAL, name, status.wire()) is not None:
            run_phase_changed(run, m.TrainingRunStatus.model_validate(run.get("status") or {}), status)
            common.post(run, events)
    agents.sync_agent(namespace, run["spec"]["agentRef"]["name"])


def run_phase_changed(run: dict[str, Any], prev: m.TrainingRunStatus, status: m.TrainingRunStatus) -> None:
    """After a run's status write: its event out on a new phase, and the metrics of a finished run."""
    if prev.phase == status.phase:
        return
    nats_events.OUTBOX.put(nats_events.training_status({**run, "status": status.wire()}))
    if status.phase in m.RUN_TERMINAL:
        namespace = run["metadata"]["namespace"]
        took = (status.completion_time - status.start_time).total_seconds() \
            if status.completion_time and status.start_time else None
        metrics.run_finished(namespace, status.phase, took)


@metrics.reconciler("trainingrun")
def sync_run(namespace: str, name: str) -> None:
    """Recompute a TrainingRun's status from its Job and pods, write it, then sync its agent.

    Only the run's own Job (controller by uid) and that Job's own pods (``trust.pod_untrusted``)
    count: a Job that a tenant made with the run's name fails the run (``JobNotOwned``), and a
    pod that a tenant made with its labels is ignored, with a condition and an Event.
    """
    with cache.locked("trainingruns", namespace, name):
        def observe(run: dict[str, Any]) -> tuple[m.TrainingRunStatus, list[objects.Event]]:
            job = cache.get_job(namespace, name)
            at = objects.now()
            if job is not None and not trust.controlled_by(job, run, m.TrainingRun.KIND):
                return training.failed_status(run, "JobNotOwned", _job_not_owned(namespace, name), at)
            pods = cache.list_pods(namespace, name)  # the trainer's and the evaluator's
            trainer_pods = [p for p in pods if not evaluation.is_evaluation(p)] if job is not None else []
            verdicts = [(pod, trust.pod_untrusted(pod, job, training.TRAINER_CONTAINER)) for pod in trainer_pods]
            status, events = training.observe_run(run, job, [p for p, why in verdicts if why is None], at,
                                                  training.artifact_uri(RUNTIME.settings, run))
            ignored = "; ".join(why for _, why in verdicts if why)
            events += training.note_ignored_pods(status, ignored, at)
            if status.phase == "Succeeded":  # the operator's own measurement of the artifact
                eval_job = cache.get_job(namespace, evaluation.job_name(run))
                if eval_job is not None and not trust.controlled_by(eval_job, run, m.TrainingRun.KIND):
                    eval_job = None
                eval_pods = [p for p in pods if evaluation.is_evaluation(p) and eval_job is not None and
                             trust.pod_untrusted(p, eval_job, evaluation.EVALUATOR_CONTAINER) is None]
                status, measured = evaluation.observe_evaluation({**run, "status": status.wire()}, eval_job,
                                                                 eval_pods, at, RUNTIME.key)
                events += measured
            return status, events

        synced = common.sync_status(namespace, m.TrainingRun.PLURAL, name, m.TrainingRunStatus, observe)
        if synced is None:
            return  # gone (deleted since read)
        if synced.changed:
            run_phase_changed(synced.obj, synced.prev, synced.status)
        common.post(synced.obj, synced.events)
    run = synced.obj
    agent_name = run["spec"]["agentRef"]["name"]
    if synced.changed:
        agents.sync_agent(namespace, agent_name)
    if synced.status.phase == "Succeeded" and synced.status.evaluation is None and _ensure_evaluation_job(run):
        sync_run(namespace, name)  # its status says Pending at once; the Job's events do the rest
    elif synced.status.phase == "Succeeded":
        ensure_rollout(run)
    if synced.changed and synced.status.phase in m.RUN_TERMINAL:
        agents.reconcile_triggers(namespace, agent_name)  # a trigger that waited for it (Forbid); the history


def _ensure_evaluation_job(run: dict[str, Any]) -> bool:
    """The operator's evaluation Job for a run whose trainer succeeded (``rl_operator.evaluation``),
    made with a seed drawn now (create-or-get: a Job made before a restart keeps its seed). False
    when it was not made: the agent is gone, or the API server refused the Job (a quota), or a Job
    of its name that the run does not control (the run's evaluation then fails, with the reason).

    Raises:
        ApiException: a transient error (409, 429, 5xx, no answer): kopf or the resync retries.
    """
    namespace = run["metadata"]["namespace"]
    if cache.get_custom(namespace, m.RLAgent.PLURAL, run["spec"]["agentRef"]["name"]) is None:
        return False
    name = evaluation.job_name(run)
    try:
        with cache.locked("jobs", namespace, name):
            job = cache.get_job(namespace, name)
            if job is None:
                job, _ = cache.create_job_or_get(
                    evaluation.evaluation_job(run, RUNTIME.settings, secrets.randbelow(evaluation.SEED_BOUND)))
    except ApiException as exc:
        if exc.status is None or not 400 <= exc.status < 500 or exc.status in (409, 429):
            raise  # transient: kopf, or the next event or resync, tries again
        reason, message = "JobRejected", f"the API server refused the evaluation Job ({exc.status}): {common.api_message(exc)}"
    else:
        if trust.controlled_by(job, run, m.TrainingRun.KIND):
            return True
        reason, message = "JobNotOwned", f"Job {namespace}/{name} exists but is not controlled by this TrainingRun (uid)"
    with cache.locked("trainingruns", namespace, run["metadata"]["name"]):
        cache.patch_status(namespace, m.TrainingRun.PLURAL, run["metadata"]["name"], {"evaluation": {
            "phase": "Failed", "jobName": name, "reason": reason, "message": message[:1024]}})
    common.post(run, [objects.Event("Warning", "EvaluationFailed", f"{reason}: {message}"[:1024])])
    agents.sync_agent(namespace, run["spec"]["agentRef"]["name"])
    return False


def ensure_rollout(run: dict[str, Any]) -> None:
    """A Succeeded run whose measured evaluation passes the agent's bar gets its Rollout
    (create-or-get). Until the operator has measured it, nothing happens (no Event)."""
    ns = run["metadata"]["namespace"]
    measured = ((run.get("status") or {}).get("evaluation") or {}).get("phase")
    if measured != "Succeeded":
        return
    agent = cache.get_custom(ns, m.RLAgent.PLURAL, run["spec"]["agentRef"]["name"])
    if agent is None or cache.get_custom(ns, m.Rollout.PLURAL, run["metadata"]["name"]) is not None:
        return
    if trust.run_untrusted(run, agent):
        return  # reconcile_run already failed it with the reason
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    if spec.suspend:
        return  # a suspended agent's latest run gets its Rollout when it is resumed (agents.nudge_waiting_rollouts)
    ok, why = rollout.eligible(run, spec)
    if not ok:
        common.post(run, [objects.Event("Normal", "RolloutSkipped", why)])
        return
    obj, created = cache.create_custom_or_get(rollout.desired_rollout(run), m.Rollout.PLURAL)
    if created:
        common.post(agent, [objects.Event("Normal", "RolloutCreated",
                                     f"Rollout {obj['metadata']['name']} for {obj['spec']['fingerprint']} ({why})")])
        rollouts.reconcile_waiting_rollouts(ns, agent["metadata"]["name"], but=obj["metadata"]["name"])  # superseded?
