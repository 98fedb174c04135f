"""Training decisions: pure functions from (spec, status, observed world) to objects and statuses.

Nothing here performs I/O. ``handlers`` reads the world through ``kube``, calls these
functions, and writes what they return. That keeps every decision unit-testable without a
cluster, and makes the order of operations readable in one place.

Flow: RLAgent (generation g) --> TrainingRun ``<agent>-<g>`` --> Job ``<agent>-<g>`` --> pod;
the pod's termination message (the trainer's JSON summary) becomes the run's status, and the
latest run's status becomes the agent's.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

from rl_operator import models as m
from rl_operator.conditions import get_condition, set_condition
from rl_operator.objects import Event, owner_reference
from rl_operator.settings import OperatorSettings

TRAINER_CONTAINER = "trainer"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
TERMINATION_LOG = "/dev/termination-log"


# ----------------------------------------------------------------------------- RLAgent -> TrainingRun


#: The longest Job name: its pods carry it in their ``job-name`` label (at most 63 characters).
MAX_JOB_NAME = 63


def run_name(agent_name: str, generation: int, ordinal: int = 0) -> str:
    """Deterministic TrainingRun (and Job, and Rollout) name: ``<agent>-<generation>`` for the run
    an agent generation starts, ``<agent>-<generation>-<ordinal>`` for the runs later triggers
    start in the same generation (``rl_operator.triggers``). The agent part is shortened when the
    name would pass 63 characters.

    A restarted operator computes the same name and finds the run it made instead of making
    a second one.
    """
    suffix = f"-{generation}" + (f"-{ordinal}" if ordinal else "")
    return agent_name[:MAX_JOB_NAME - len(suffix)] + suffix


def run_order(run: dict[str, Any]) -> tuple[int, int]:
    """A run's place among its agent's runs: ``(spec.trigger.agentGeneration, spec.trigger.ordinal)``."""
    trigger = run["spec"]["trigger"]
    return int(trigger["agentGeneration"]), int(trigger.get("ordinal") or 0)


def latest_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The agent's latest run (:func:`run_order`), or None."""
    return max(runs, key=run_order, default=None)


TRAINING_FIELDS = ("environment", "algorithm", "training", "evaluation")


def training_snapshot(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of an agent (or run) spec that defines a training run; the rest (approval,
    serving, canary plan, mode) can change without retraining."""
    return {k: spec.get(k) for k in TRAINING_FIELDS}


def desired_training_run(agent: dict[str, Any], runs: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The TrainingRun that the agent's current generation calls for, or None.

    A new run is needed when the agent has none, or when the training-relevant part of its spec
    (environment, algorithm, training, evaluation) differs from its latest run's snapshot and
    no run exists for the agent's current generation yet.

    Args:
        agent: the RLAgent object (as returned by the API server, so defaults are applied).
        runs: the agent's existing TrainingRuns (any order).
    Returns:
        A TrainingRun manifest: a snapshot of the agent's environment, algorithm, training and
        evaluation spec, the trigger, labels and a controller ownerReference; or None.
    Raises:
        pydantic.ValidationError: the agent's spec does not parse (the CRD should have refused it).
    """
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    meta = agent["metadata"]
    generation = int(meta.get("generation") or 1)
    latest = latest_run(runs or [])
    snapshot = training_snapshot(spec.wire())
    if latest is not None and (training_snapshot(latest["spec"]) == snapshot or run_order(latest)[0] >= generation):
        return None  # the spec has its run; or this generation has one already (a spec change is a new generation)
    trigger = m.TrainingTrigger(reason="Created" if latest is None else "SpecChanged", agent_generation=generation)
    run_spec = m.TrainingRunSpec(
        agent_ref=m.ObjectRef(name=meta["name"]),
        trigger=trigger,
        environment=spec.environment,
        algorithm=spec.algorithm,
        training=spec.training,
        evaluation=spec.evaluation,
    )
    return {
        "apiVersion": m.API_VERSION,
        "kind": m.TrainingRun.KIND,
        "metadata": {
            "name": run_name(meta["name"], generation),
            "namespace": meta["namespace"],
            "labels": {m.AGENT_LABEL: meta["name"], "app.kubernetes.io/managed-by": "rlops"},
            "ownerReferences": [owner_reference(agent)],
        },
        "spec": run_spec.wire(),
    }


# ----------------------------------------------------------------------------- TrainingRun -> Job


def artifact_uri(settings: OperatorSettings, run: dict[str, Any]) -> str:
    """Where this run's trainer writes its artifact set (an fsspec URI, no trailing slash)."""
    meta = run["metadata"]
    agent = run["spec"]["agentRef"]["name"]
    return f"{settings.artifact_root.rstrip('/')}/{meta['namespace']}/{agent}/{meta['name']}-{meta['uid'][:8]}"


def run_config(run: dict[str, Any]) -> dict[str, Any]:
    """The trainer's run config (``RLOPS_RUN_CONFIG``): the part of the run spec the trainer reads.

    Placement fields (image, resources, deadlines) stay with the Job; see ``docs/trainer.md``.
    """
    spec = m.TrainingRunSpec.model_validate(run["spec"])
    training = spec.training
    return {
        "agent": spec.agent_ref.name,
        "namespace": run["metadata"]["namespace"],
        "run": run["metadata"]["name"],
        "environment": spec.environment.wire(),
        "algorithm": spec.algorithm.wire(),
        "training": {
            k: v for k, v in training.wire().items() if k in ("totalTimesteps", "seed", "targetReturn", "evalInterval")
        },
        "evaluation": {"episodes": spec.evaluation.episodes},
    }


def desired_job(run: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """The ``batch/v1`` Job that runs one TrainingRun's trainer pod.

    GPU placement: ``nvidia.com/gpu`` limits, the ``nvidia.com/gpu.present=true`` node selector and
    a toleration for the ``nvidia.com/gpu:NoSchedule`` taint (as the NVIDIA GPU operator sets up
    real GPU nodes), all omitted when the spec asks for 0 GPUs.
    """
    spec = m.TrainingRunSpec.model_validate(run["spec"])
    meta = run["metadata"]
    training = spec.training
    labels = {
        m.RUN_LABEL: meta["name"],
        m.AGENT_LABEL: spec.agent_ref.name,
        "app.kubernetes.io/name": "rlops-trainer",
        "app.kubernetes.io/managed-by": "rlops",
    }
    limits, node_selector, tolerations = _placement(training)
    uri = artifact_uri(settings, run)
    env = _trainer_env(run, spec, settings, uri)
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": training.image,
        "command": list(settings.trainer_command),
        "env": env,
        "resources": {"requests": {"cpu": training.resources.cpu, "memory": training.resources.memory}, "limits": limits},
        "securityContext": container_security(settings),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "nodeSelector": node_selector,
        "tolerations": tolerations,
        "securityContext": pod_security(settings),
    }
    mount_artifacts(settings, uri, pod_spec, container)
    init = artifact_dir_container(settings, uri)
    if init is not None:
        pod_spec["initContainers"] = [init]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(run)],
        },
        "spec": {
            "backoffLimit": training.backoff_limit,
            "activeDeadlineSeconds": training.active_deadline_seconds,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def _placement(training: m.TrainingTemplate) -> tuple[dict[str, Any], dict[str, str], list[dict[str, Any]]]:
    """The trainer's ``(limits, nodeSelector, tolerations)``: the template's, plus a GPU's."""
    limits: dict[str, Any] = {"cpu": training.resources.cpu, "memory": training.resources.memory}
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    if training.resources.gpu:
        limits[GPU_RESOURCE] = training.resources.gpu
        node_selector[GPU_PRESENT_LABEL] = "true"
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    node_selector.update(training.node_selector)
    tolerations.extend(t.wire() for t in training.tolerations)
    return limits, node_selector, tolerations


def _trainer_env(run: dict[str, Any], spec: m.TrainingRunSpec, settings: OperatorSettings, uri: str) -> list[dict[str, Any]]:
    """The trainer container's environment: its run config, artifact URI and pod name, the
    trajectories it was started for (a trajectory trigger), and the platform's extra env."""
    env = [
        {"name": "RLOPS_RUN_CONFIG", "value": json.dumps(run_config(run), sort_keys=True)},
        {"name": "RLOPS_ARTIFACT_URI", "value": uri},
        {"name": "RLOPS_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    window = spec.trigger.trajectories
    if window is not None and settings.nats_url:
        # the range the trajectory trigger started the run for (rl_engine.trajectories)
        env.append({"name": "RLOPS_TRAJECTORIES", "value": json.dumps({
            "url": settings.nats_url, "stream": window.stream, "subject": window.subject,
            "firstSequence": window.first_sequence, "lastSequence": window.last_sequence}, sort_keys=True)})
    env.extend({"name": k, "value": v} for k, v in sorted(settings.extra_env.items()))
    return env


#: The trainer pod's init container that makes the run's artifact directory (:func:`mount_artifacts`).
ARTIFACT_DIR_CONTAINER = "artifact-dir"


def artifact_paths(settings: OperatorSettings, uri: str) -> tuple[str, str] | None:
    """Where a ``file://`` artifact ``uri`` lies on the artifact claim: ``(namespace mount path,
    path under it)``, e.g. ``("/var/lib/rlops/artifacts/team-a", "cartpole/cartpole-1-1a2b3c4d")``;
    None without a claim (``settings.artifact_pvc``) or for another scheme.

    The claim ``artifact_pvc`` of a namespace holds that namespace's directory
    ``<root>/<namespace>``, never the whole root, so that a pod of one namespace cannot reach
    another namespace's files (``docs/install.md``)."""
    if not settings.artifact_pvc or not uri.startswith("file://"):
        return None
    root = urlparse(settings.artifact_root).path.rstrip("/")
    path = urlparse(uri).path
    namespace, _, rest = path[len(root) + 1:].partition("/")
    if not path.startswith(root + "/") or not namespace or not rest:
        raise ValueError(f"artifact URI {uri!r} is not under the artifact root {settings.artifact_root!r}")
    return f"{root}/{namespace}", rest


def mount_artifacts(settings: OperatorSettings, uri: str, pod_spec: dict[str, Any], container: dict[str, Any],
                    read_only: bool = False, levels: int = 2) -> None:
    """Mount the artifact claim (``settings.artifact_pvc``, for a ``file://`` root) in
    ``container``: only the directory ``levels`` deep under the namespace's, ``<agent>/<run>``
    (2, the default) or ``<agent>`` (1), as a ``subPath`` at the path it has in the URI, so the
    pod sees that directory and nothing else of the store (``read_only``: the claim and the
    mount read only)."""
    paths = artifact_paths(settings, uri)
    if paths is None:
        return
    base, rest = paths
    sub = "/".join(rest.split("/")[:levels])
    claim: dict[str, Any] = {"claimName": settings.artifact_pvc}
    mounted: dict[str, Any] = {"name": "artifacts", "mountPath": f"{base}/{sub}", "subPath": sub}
    if read_only:
        claim["readOnly"] = mounted["readOnly"] = True
    pod_spec["volumes"] = [{"name": "artifacts", "persistentVolumeClaim": claim}]
    container["volumeMounts"] = [mounted]


def artifact_dir_container(settings: OperatorSettings, uri: str) -> dict[str, Any] | None:
    """The init container that makes a run's artifact directory before the trainer starts, or
    None without an artifact claim.

    The kubelet makes a missing ``subPath`` directory as root, where the non-root trainer could
    not write; this container (the platform's engine image, ``settings.evaluator_image``, as the
    trainer's user, a fixed ``mkdir -p``) mounts the namespace's directory and makes
    ``<agent>/<run>`` in it, owned by the trainer's user."""
    paths = artifact_paths(settings, uri)
    if paths is None:
        return None
    base, rest = paths
    return {
        "name": ARTIFACT_DIR_CONTAINER,
        "image": settings.evaluator_image,
        "command": ["mkdir", "-p", f"{base}/{rest}"],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
        "securityContext": container_security(settings),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "artifacts", "mountPath": base}],
    }


def pod_security(settings: OperatorSettings) -> dict[str, Any]:
    """The securityContext of every pod the operator runs: non-root (``trainer_uid``), volumes
    writable by that user's group where the volume supports it (``fsGroup``)."""
    return {"runAsNonRoot": True, "runAsUser": settings.trainer_uid, "fsGroup": settings.trainer_uid}


def container_security(settings: OperatorSettings) -> dict[str, Any]:
    """The securityContext of every container the operator runs: non-root (``trainer_uid``), no
    privilege escalation, no capabilities, the runtime's default seccomp profile."""
    return {"runAsNonRoot": True, "runAsUser": settings.trainer_uid, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def helper_pod_spec(settings: OperatorSettings, container: dict[str, Any], template: m.TrainingTemplate,
                    uri: str, read_only: bool = False, levels: int = 2) -> dict[str, Any]:
    """The pod of a short Job beside training (the artifact reclaim, the evaluation): ``container``
    without a GPU, as the trainer's non-root user, with the training template's tolerations (and
    the GPU taint's) but not its node selector, and the artifact store's directory of the run
    (``levels`` 2) or of its agent (1) mounted as :func:`mount_artifacts` does (``read_only``:
    read only)."""
    container["securityContext"] = container_security(settings)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
                        *(t.wire() for t in template.tolerations)],
        "securityContext": pod_security(settings),
    }
    mount_artifacts(settings, uri, pod_spec, container, read_only=read_only, levels=levels)
    return pod_spec


#: The artifact-reclaim Job's name prefix: ``rlops-reclaim-<run uid>`` (50 characters).
RECLAIM_PREFIX = "rlops-reclaim-"


def reclaim_job(run: dict[str, Any], agent: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """The Job that deletes an expired run's artifact directory (``artifactReclaimPolicy: Delete``).

    It runs ``python -m rl_engine.artifacts delete <uri> --under <root>/<namespace>/<agent>`` in
    the training image, with the artifact store mounted as training mounts it and the same extra
    environment (store credentials), as the trainer's non-root user, without a GPU, and with the
    training template's tolerations (and the GPU taint's) but not its node selector. It is
    owned by the agent (the run is deleted at once) and removed 10 minutes after it finishes.
    """
    meta, training = run["metadata"], m.RLAgentSpec.model_validate(agent["spec"]).training
    agent_name = agent["metadata"]["name"]
    uri = artifact_uri(settings, run)
    under = f"{settings.artifact_root.rstrip('/')}/{meta['namespace']}/{agent_name}"
    labels = {m.AGENT_LABEL: agent_name, m.RECLAIM_LABEL: meta["name"], "app.kubernetes.io/managed-by": "rlops"}
    container: dict[str, Any] = {
        "name": "reclaim",
        "image": training.image,
        "command": [settings.trainer_command[0], "-m", "rl_engine.artifacts", "delete", uri, "--under", under],
        "env": [{"name": k, "value": v} for k, v in sorted(settings.extra_env.items())],
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
    }
    pod_spec = helper_pod_spec(settings, container, training, uri, levels=1)  # it deletes the run's directory
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{RECLAIM_PREFIX}{meta['uid']}", "namespace": meta["namespace"], "labels": labels,
                     "ownerReferences": [owner_reference(agent)]},
        "spec": {"backoffLimit": 3, "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 600,
                 "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    }


def superseded_status(run: dict[str, Any], by: str, reason: str, at: datetime) -> m.TrainingRunStatus | None:
    """The terminal ``Superseded`` status of a run in progress that a newer run replaces
    (``concurrencyPolicy: Replace``), or None when it has finished already."""
    status = m.TrainingRunStatus.model_validate(run.get("status") or {})
    if status.phase in m.RUN_TERMINAL:
        return None
    status.phase, status.completion_time = "Superseded", at
    message = f"superseded by TrainingRun {by} ({reason}, concurrencyPolicy Replace): its Job was deleted"
    set_condition(status.conditions, "Running", "False", "Superseded", message, at)
    set_condition(status.conditions, "Superseded", "True", reason, message, at)
    return status


def failed_status(run: dict[str, Any], reason: str, message: str, at: datetime) -> tuple[m.TrainingRunStatus, list[Event]]:
    """A terminal ``Failed`` status (and its Event) for a run the operator cannot carry out, e.g.
    a Job the API server refuses (``JobRejected``) or a Job name taken by an object it does not
    own (``JobNotOwned``): the run says why, instead of retrying for ever."""
    status = m.TrainingRunStatus.model_validate(run.get("status") or {})
    if status.phase in m.RUN_TERMINAL:
        return status, []
    status.phase, status.failure_reason, status.failure_message = "Failed", reason, message[:1024]
    status.completion_time = at
    set_condition(status.conditions, "Failed", "True", reason, status.failure_message, at)
    return status, [Event("Warning", "TrainingFailed", f"{reason}: {status.failure_message}")]


def note_ignored_pods(status: m.TrainingRunStatus, ignored: str, at: datetime) -> list[Event]:
    """Record pods that carry the run's label but are not its Job's own (a ``PodsIgnored``
    condition), and return a Warning Event when that set changes."""
    cond = get_condition(status.conditions, "PodsIgnored")
    if not ignored:
        if cond is not None and cond.status == "True":
            set_condition(status.conditions, "PodsIgnored", "False", "None", "", at)
        return []
    if cond is not None and cond.status == "True" and cond.message == ignored[:1024]:
        return []
    set_condition(status.conditions, "PodsIgnored", "True", "NotOwnedByJob", ignored[:1024], at)
    return [Event("Warning", "PodIgnored", f"pods that do not speak for this run: {ignored}"[:1024])]


# ----------------------------------------------------------------------------- Job + pods -> TrainingRun status


def parse_termination_message(text: str | None) -> dict[str, Any] | None:
    """The trainer's JSON summary from a termination message, or None if it is not one.

    With ``FallbackToLogsOnError`` the message may instead be the log's tail; that is not JSON.
    """
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def container_status(pod: dict[str, Any], name: str = TRAINER_CONTAINER) -> dict[str, Any]:
    """The status of the pod's container ``name`` (``containerStatuses``), or ``{}``."""
    return next((cs for cs in (pod.get("status") or {}).get("containerStatuses") or [] if cs.get("name") == name), {})


def container_state(pod: dict[str, Any], name: str = TRAINER_CONTAINER) -> dict[str, Any]:
    """The state (``waiting``, ``running`` or ``terminated``) of the pod's container ``name``."""
    return container_status(pod, name).get("state") or {}


# Why a trainer pod cannot start: the kubelet's waiting reasons that need a human (a wrong image,
# a missing Secret or ConfigMap), as opposed to ContainerCreating.
STUCK_WAITING_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})


def pending_cause(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Why the newest trainer pod is not running: ``(reason, message)`` from its scheduling
    condition (``Unschedulable``: no node fits, e.g. no node without a GPU taint for a CPU
    run) or its trainer container's waiting state (``ImagePullBackOff`` and the like); None
    when it is just starting."""
    for pod in newest_first(pods)[:1]:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return cond.get("reason") or "Unschedulable", cond.get("message") or ""
        waiting = container_state(pod).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING_REASONS:
            return waiting["reason"], waiting.get("message") or ""
    return None


def artifact_dir_failure(pods: list[dict[str, Any]]) -> str | None:
    """Why the init container that makes the run's artifact directory failed (newest pod first),
    or None: the trainer never started."""
    for p in pods:
        cs = next((c for c in (p.get("status") or {}).get("initContainerStatuses") or []
                   if c.get("name") == ARTIFACT_DIR_CONTAINER), {})
        done = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
        if done.get("exitCode"):
            return (f"the run's artifact directory could not be made (exit code {done['exitCode']}; the artifact "
                    f"claim's directory must be writable by the trainer's user): {(done.get('message') or '').strip()}")
    return None


def newest_first(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods, the newest (``creationTimestamp``) first."""
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)


def observe_run(
    run: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], at: datetime,
    assigned_artifact_uri: str | None = None,
) -> tuple[m.TrainingRunStatus, list[Event]]:
    """Derive a TrainingRun's status from its Job and pods, and the Events its change warrants.

    Args:
        run: the TrainingRun object; its current ``status`` is the previous observation.
        job: its Job, or None if not created yet.
        pods: the Job's own pods (any order; the caller drops pods that are not the Job's,
            ``trust.pod_untrusted``).
        at: the observation time (stamped on changed conditions).
        assigned_artifact_uri: where the operator told the trainer to write; a summary naming
            any other artifact URI fails the run (``ArtifactOutsideAssignedRoot``).
    Returns:
        ``(status, events)``. A terminal status (Succeeded/Failed) is returned unchanged: runs
        are immutable once finished.
    """
    prev = m.TrainingRunStatus.model_validate(run.get("status") or {})
    if prev.phase in m.RUN_TERMINAL:
        return prev, []
    status = prev.model_copy(deep=True)
    status.observed_generation = run["metadata"].get("generation")
    events: list[Event] = []
    if job is None:
        status.phase = "Pending"
        return status, events
    status.job_name = job["metadata"]["name"]
    job_status = job.get("status") or {}
    if job_status.get("startTime"):
        status.start_time = job_status["startTime"]
    newest = newest_first(pods)
    complete = job_condition(job, "Complete")
    failed = job_condition(job, "Failed")
    if complete:
        _completed(status, newest, job_status, complete, assigned_artifact_uri)
    elif failed:
        _failed(status, newest, failed)
    elif any((p.get("status") or {}).get("phase") == "Running" for p in pods) or (
        # the pod has exited but the Job controller has not concluded yet: still running, not Pending
        prev.phase == "Running" and any((p.get("status") or {}).get("phase") in ("Succeeded", "Failed") for p in pods)
    ):
        status.phase = "Running"
    else:
        status.phase = "Pending"
    events += _phase_conditions(status, prev, newest, pods, at)

    # Events on a run are Warnings only: its start and success are in its conditions (Running,
    # Complete), and its agent posts one Event for the outcome (AgentTrained). An Event is a write
    # to the API server; at a thousand agents they were a third of the operator's requests.
    if status.phase != prev.phase and status.phase == "Failed":
        events.append(Event("Warning", "TrainingFailed", f"{status.failure_reason}: {status.failure_message}"))
    return status, events


def _completed(status: m.TrainingRunStatus, newest: list[dict[str, Any]], job_status: dict[str, Any],
               complete: dict[str, Any], assigned_artifact_uri: str | None) -> None:
    """A Complete Job: Succeeded with the trainer's summary, or Failed when no pod of the Job's
    own speaks for it, the summary names another artifact, or there is no summary."""
    summary = next(
        (s for p in newest if (s := parse_termination_message(container_state(p).get("terminated", {}).get("message")))),
        None,
    )
    status.completion_time = job_status.get("completionTime") or complete.get("lastTransitionTime")
    if not newest:
        status.phase = "Failed"
        status.failure_reason = "TrainerPodMissing"
        status.failure_message = ("the Job completed, but none of its pods is the Job's own trainer pod "
                                  "(deleted, or ignored: see the PodsIgnored condition)")
    elif summary and summary.get("artifactURI") and assigned_artifact_uri is not None \
            and summary["artifactURI"] != assigned_artifact_uri:
        status.phase = "Failed"
        status.failure_reason = "ArtifactOutsideAssignedRoot"
        status.failure_message = (f"the trainer reported artifact {summary['artifactURI']!r}, not the one the "
                                  f"operator assigned to this run ({assigned_artifact_uri!r})")[:1024]
    elif summary and summary.get("fingerprint") and summary.get("artifactURI"):
        status.phase = "Succeeded"
        status.metrics = summary.get("metrics") or {}
        status.artifact_uri = summary["artifactURI"]
        status.fingerprint = summary["fingerprint"]
        if isinstance(summary.get("trajectories"), dict):
            try:
                status.trajectories = m.TrajectoriesUsed.model_validate(summary["trajectories"])
            except ValueError:  # the trainer's own summary: a malformed one is left out, not fatal
                status.trajectories = None
    else:
        status.phase = "Failed"
        status.failure_reason = "InvalidTerminationMessage"
        status.failure_message = "the trainer exited 0 but left no JSON summary with artifactURI and fingerprint"


def _failed(status: m.TrainingRunStatus, newest: list[dict[str, Any]], failed: dict[str, Any]) -> None:
    """A Failed Job: the trainer's own reason (its summary), or why its artifact directory could
    not be made, or the Job's reason with the trainer's exit code and message (log tail)."""
    status.phase = "Failed"
    status.completion_time = failed.get("lastTransitionTime")
    terminated = next((t for p in newest if (t := container_state(p).get("terminated"))), {})
    summary = parse_termination_message(terminated.get("message"))
    if not terminated and (init := artifact_dir_failure(newest)) is not None:
        status.failure_reason, status.failure_message = "ArtifactDirectoryFailed", init[-1024:]
    elif summary and summary.get("reason"):
        status.failure_reason = summary["reason"]
        status.failure_message = str(summary.get("message", ""))[:1024]
    else:
        status.failure_reason = failed.get("reason") or "JobFailed"
        detail = terminated.get("message") or failed.get("message") or ""
        code = terminated.get("exitCode")
        prefix = f"trainer exited with code {code}: " if code is not None else ""
        status.failure_message = (prefix + detail.strip())[-1024:]


def _phase_conditions(status: m.TrainingRunStatus, prev: m.TrainingRunStatus, newest: list[dict[str, Any]],
                      pods: list[dict[str, Any]], at: datetime) -> list[Event]:
    """The conditions of the run's new phase, and a Warning when a pending trainer cannot start."""
    events: list[Event] = []
    if status.phase == "Running":
        node = next(((p.get("spec") or {}).get("nodeName") for p in newest), None)
        set_condition(status.conditions, "Running", "True", "PodRunning", f"the trainer pod is running on node {node}", at)
    elif status.phase == "Succeeded":
        set_condition(status.conditions, "Running", "False", "Completed", "", at)
        msg = f"mean return {status.metrics.get('meanReturn')}, fingerprint {status.fingerprint}"
        set_condition(status.conditions, "Complete", "True", "TrainingSucceeded", msg, at)
    elif status.phase == "Failed":
        set_condition(status.conditions, "Running", "False", "Failed", "", at)
        set_condition(status.conditions, "Failed", "True", status.failure_reason or "Failed", status.failure_message or "", at)
    elif status.phase == "Pending" and (cause := pending_cause(pods)) is not None:
        before = get_condition(prev.conditions, "Running")
        if before is None or before.reason != cause[0]:
            events.append(Event("Warning", "TrainerNotStarting", f"{cause[0]}: {cause[1]}"[:1024]))
        set_condition(status.conditions, "Running", "False", cause[0], cause[1][:1024], at)
    return events


# ----------------------------------------------------------------------------- TrainingRuns -> RLAgent status


def observe_agent(
    agent: dict[str, Any], runs: list[dict[str, Any]], at: datetime
) -> tuple[m.RLAgentStatus, list[Event]]:
    """Derive an RLAgent's status from its TrainingRuns.

    The latest run is the one made for the highest agent generation. Phases: ``Pending`` (no run
    yet), ``Training``, ``Evaluating`` (latest run Succeeded, the operator measuring its artifact),
    ``Trained`` (measured: ``latestMeanReturn`` is the measured mean return), ``Failed`` (latest
    run Failed, or its evaluation did).
    ``observedGeneration`` is the agent generation that the latest run snapshots.
    """
    prev = m.RLAgentStatus.model_validate(agent.get("status") or {})
    status = prev.model_copy(deep=True)
    events: list[Event] = []
    if not runs:
        status.phase = "Pending"
        return status, events
    latest = latest_run(runs)
    assert latest is not None
    run_status = m.TrainingRunStatus.model_validate(latest.get("status") or {})
    status.latest_run = latest["metadata"]["name"]
    status.observed_generation = max(prev.observed_generation or 0, run_order(latest)[0])
    phase = run_status.phase or "Pending"
    gen = status.observed_generation
    if phase in ("Pending", "Running"):
        status.phase = "Training"
        set_condition(status.conditions, "Training", "True", "RunInProgress", f"TrainingRun {status.latest_run} is {phase}", at, gen)
    else:
        set_condition(status.conditions, "Training", "False", "RunFinished", f"TrainingRun {status.latest_run} {phase}", at, gen)
    evaluated = run_status.evaluation
    if phase == "Succeeded" and evaluated is not None and evaluated.phase == "Failed":
        phase = "Failed"  # trained, but its artifact could not be measured: nothing of it rolls out
        run_status.failure_reason = f"Evaluation{evaluated.reason or 'Failed'}"
        run_status.failure_message = f"the operator's evaluation failed: {evaluated.message or ''}"
    if phase == "Succeeded" and (evaluated is None or evaluated.phase != "Succeeded"):
        status.phase = "Evaluating"
        status.latest_fingerprint = run_status.fingerprint
        set_condition(status.conditions, "Trained", "False", "Evaluating",
                      f"TrainingRun {status.latest_run} trained; the operator is measuring its artifact", at, gen)
    elif phase == "Succeeded":
        assert evaluated is not None
        status.phase = "Trained"
        status.latest_mean_return = evaluated.mean_return
        status.latest_fingerprint = run_status.fingerprint
        set_condition(status.conditions, "Trained", "True", "TrainingSucceeded",
                      f"TrainingRun {status.latest_run}: mean return {status.latest_mean_return} (measured)", at, gen)
    elif phase == "Failed":
        status.phase = "Failed"
        set_condition(status.conditions, "Trained", "False", run_status.failure_reason or "TrainingFailed",
                      f"TrainingRun {status.latest_run} failed: {run_status.failure_message or ''}"[:1024], at, gen)
    if status.phase != prev.phase and status.phase in ("Trained", "Failed"):
        kind = "Normal" if status.phase == "Trained" else "Warning"
        reported = run_status.metrics.get("meanReturn")
        detail = (f": mean evaluation return {status.latest_mean_return} measured by the operator (the trainer "
                  f"reported {reported}), artifact {run_status.artifact_uri}, fingerprint {status.latest_fingerprint}"
                  if status.phase == "Trained" else f": {run_status.failure_reason}: {run_status.failure_message or ''}")
        events.append(Event(kind, f"Agent{status.phase}", f"latest TrainingRun {status.latest_run} {phase}{detail}"[:1024]))
    return status, events
