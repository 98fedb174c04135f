"""kopf registration: thin handlers that read the world, call the pure decisions, write results.

Order of operations for training (one place):

1. RLAgent created / spec changed / operator resumed -> ensure TrainingRun ``<agent>-<generation>``.
2. TrainingRun created / resumed -> ensure Job ``<run>``.
3. Job or pod event, or the periodic resync -> ``sync_run``: observe Job + pods into the run's
   status, then ``sync_agent``: observe the agent's runs into the agent's status.

Every step is idempotent (deterministic names, create-or-get), so an operator killed at any
point and restarted converges to the same objects: no duplicate runs, no duplicate Jobs.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

import kopf

from rl_operator import kube, training
from rl_operator import models as m
from rl_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

SETTINGS = OperatorSettings.from_env()
_locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)


def _post(obj: dict[str, Any], events: list[training.Event]) -> None:
    for ev in events:
        kopf.event(obj, type=ev.type, reason=ev.reason, message=ev.message[:1024])


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    kube.load_config()
    settings.posting.level = logging.WARNING  # Events are posted explicitly, not from log lines
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    log.info("rlops operator settings: %s", SETTINGS)


# ----------------------------------------------------------------------------- RLAgent


@kopf.on.resume(m.GROUP, m.VERSION, m.RLAgent.PLURAL)
@kopf.on.create(m.GROUP, m.VERSION, m.RLAgent.PLURAL)
@kopf.on.update(m.GROUP, m.VERSION, m.RLAgent.PLURAL, field="spec")
def reconcile_agent(body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
    agent = dict(body)
    desired = training.desired_training_run(agent)
    run, created = kube.create_custom_or_get(desired, m.TrainingRun.PLURAL)
    if created:
        trigger = desired["spec"]["trigger"]
        _post(agent, [training.Event("Normal", "TrainingRunCreated",
                                     f"TrainingRun {run['metadata']['name']} ({trigger['reason']}, generation {trigger['agentGeneration']})")])
    sync_agent(namespace, name)


def sync_agent(namespace: str, name: str) -> None:
    """Recompute an RLAgent's status from its TrainingRuns and write it if it changed."""
    with _locks[("rlagents", namespace, name)]:
        agent = kube.get_custom(namespace, m.RLAgent.PLURAL, name)
        if agent is None:
            return
        runs = kube.list_custom(namespace, m.TrainingRun.PLURAL, f"{m.AGENT_LABEL}={name}")
        owned = [r for r in runs if any(o.get("uid") == agent["metadata"]["uid"] for o in r["metadata"].get("ownerReferences", []))]
        status, events = training.observe_agent(agent, owned, training.now())
        if status.wire() != m.RLAgentStatus.model_validate(agent.get("status") or {}).wire():
            kube.patch_status(namespace, m.RLAgent.PLURAL, name, status.wire())
        _post(agent, events)


# ----------------------------------------------------------------------------- TrainingRun


@kopf.on.resume(m.GROUP, m.VERSION, m.TrainingRun.PLURAL)
@kopf.on.create(m.GROUP, m.VERSION, m.TrainingRun.PLURAL)
def reconcile_run(body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
    run = dict(body)
    phase = (run.get("status") or {}).get("phase")
    if phase not in ("Succeeded", "Failed"):
        job, created = kube.create_job_or_get(training.desired_job(run, SETTINGS))
        if created:
            gpus = run["spec"]["training"].get("resources", {}).get("gpu", 0)
            _post(run, [training.Event("Normal", "JobCreated", f"Job {job['metadata']['name']} created ({gpus} GPU)")])
    sync_run(namespace, name)


@kopf.timer(m.GROUP, m.VERSION, m.TrainingRun.PLURAL, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds,
            when=lambda status, **_: (status or {}).get("phase") not in ("Succeeded", "Failed"))
def resync_run(namespace: str, name: str, **_: Any) -> None:
    sync_run(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={m.RUN_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={m.RUN_LABEL: kopf.PRESENT})
def on_child_event(labels: dict[str, str], namespace: str, type: str | None, **_: Any) -> None:
    sync_run(namespace, labels[m.RUN_LABEL])


def sync_run(namespace: str, name: str) -> None:
    """Recompute a TrainingRun's status from its Job and pods, write it, then sync its agent."""
    with _locks[("trainingruns", namespace, name)]:
        run = kube.get_custom(namespace, m.TrainingRun.PLURAL, name)
        if run is None:
            return
        job = kube.get_job(namespace, name)
        if job is not None and not any(o.get("uid") == run["metadata"]["uid"] for o in job["metadata"].get("ownerReferences", [])):
            log.warning("Job %s/%s is not owned by TrainingRun %s; ignoring it", namespace, name, name)
            job = None
        pods = kube.list_pods(namespace, f"{m.RUN_LABEL}={name}") if job is not None else []
        status, events = training.observe_run(run, job, pods, training.now())
        changed = status.wire() != m.TrainingRunStatus.model_validate(run.get("status") or {}).wire()
        if changed:
            kube.patch_status(namespace, m.TrainingRun.PLURAL, name, status.wire())
        _post(run, events)
    if changed:
        sync_agent(namespace, run["spec"]["agentRef"]["name"])
