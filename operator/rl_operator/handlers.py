"""kopf registration: thin handlers that read the world, call the pure decisions, write results.

Order of operations for training (one place):

1. RLAgent created / spec changed / operator resumed -> ensure TrainingRun ``<agent>-<generation>``
   and, for a run just made, its Job at once.
2. TrainingRun created / resumed -> ensure Job ``<run>``.
3. Job or pod event, or the operator-wide resync of unfinished runs -> ``sync_run``: observe Job + pods into the run's
   status, then ``sync_agent``: observe the agent's runs into the agent's status.
4. A run Succeeded whose evaluation meets the agent's bar -> ensure Rollout ``<run>``.
5. Rollout created / annotated / every ``rollout_interval_seconds`` while in progress ->
   ``reconcile_rollout``: observe (annotations, the agent, Ray Serve, a Prometheus analysis
   when one is due), run ``rollout.reconcile``, then act: weights, deploys, annotations, the
   agent's ``activeModel``, the Rollout's status and Events.
6. Alertmanager -> the receiver -> ``on_alert`` -> ``abort_agent_rollout`` (weight 0 at once).

Admission: ``admission.decide`` reviews approval annotations on Rollouts (``approvals.review``
plus a SubjectAccessReview), served over HTTPS by ``rl_operator.admission`` in a thread of its
own (reconcile load cannot starve it), failing closed, and called by the API server only when
an approval annotation changes (a CEL matchCondition).

Every step is idempotent (deterministic names, create-or-get), so an operator killed at any
point and restarted converges to the same objects: no duplicate runs, no duplicate Jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import threading
from datetime import datetime, timezone
from typing import Any, NamedTuple

import kopf

from kubernetes.client.exceptions import ApiException
from rl_engine.serving.contract import BREAKER_KEY, SHADOW_KEY

from rl_operator import admission, alerts, analysis, approvals, audit, cache, certs, diffbase, evaluation, jetstream, kube, metrics, nats_events, peering, rayserve, rollout, shards, traffic, training, triggers, trust, verdicts
from rl_operator import models as m
from rl_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

SETTINGS = OperatorSettings.from_env()
#: The operator's signing key (``settings.approval_key_secret``), loaded at start-up.
_KEY: dict[str, bytes | None] = {"value": None}


def _post(obj: dict[str, Any], events: list[training.Event]) -> None:
    for ev in events:
        try:
            kopf.event(obj, type=ev.type, reason=ev.reason, message=ev.message[:1024])
        except LookupError:  # outside kopf's handlers (the alert and audit receivers): no event queue
            try:
                kube.post_event(obj, ev.type, ev.reason, ev.message)
            except ApiException as exc:  # an Event is worth a log line, not a failed callback
                log.warning("cannot post Event %s on %s: %s", ev.reason, obj["metadata"]["name"], exc.reason)


_WEBHOOK_CERT: dict[str, Any] = {}  # the certificate this process serves: names, data


def _webhook_certs(names: list[str]) -> certs.WebhookCerts:
    """The webhook's certificate files: from the shared Secret (made or renewed here, or issued by
    cert-manager) when ``webhook_cert_secret`` is set, else made in ``cert_dir``."""
    if not SETTINGS.webhook_cert_secret:
        return certs.ensure_webhook_certs(SETTINGS.cert_dir, names)
    ns, name = SETTINGS.webhook_cert_secret.split("/", 1)
    data = kube.ensure_tls_secret(ns, name, lambda d: certs.certs_usable(d, names), lambda: certs.make_webhook_certs(names),
                                  managed=SETTINGS.webhook_cert_managed)
    _WEBHOOK_CERT.update(names=names, data=data)
    return certs.write_webhook_certs(SETTINGS.cert_dir, data)


def webhook_cert_stale(current: tuple[dict[str, bytes], str] | None, names: list[str], served: dict[str, bytes]) -> bool:
    """Whether the process must restart onto a new webhook certificate: the Secret now holds
    another one (renewed by a replica or by cert-manager), or the served one expires within 30
    days (the restart renews it)."""
    return current is None or current[0] != served or not certs.certs_usable(served, names)


@kopf.on.startup()
async def watch_webhook_cert(memo: kopf.Memo, **_: Any) -> None:
    """Every 6 hours (every minute when cert-manager writes the Secret: it may re-issue at any
    time): when the shared webhook certificate changed or is due for renewal, stop the operator
    (SIGTERM, a clean kopf shutdown), so that Kubernetes restarts it onto the new one."""
    if not SETTINGS.webhook_cert_secret or not SETTINGS.webhook_addr:
        return

    async def loop() -> None:
        ns, name = SETTINGS.webhook_cert_secret.split("/", 1)
        while True:
            await asyncio.sleep(60 if SETTINGS.webhook_cert_managed else 6 * 3600)
            current = await asyncio.to_thread(kube.read_secret_data, ns, name)
            if webhook_cert_stale(current, _WEBHOOK_CERT["names"], _WEBHOOK_CERT["data"]):
                log.warning("the webhook certificate in Secret %s changed or expires soon: restarting", SETTINGS.webhook_cert_secret)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    memo.cert_watch = asyncio.create_task(loop())


@kopf.on.startup()
async def keep_ray_claim(memo: kopf.Memo, **_: Any) -> None:
    """Renew this operator's claim on its Ray cluster (``rl_operator.shards``; first made before
    kopf started) every third of its lifetime. Lost to another shard (this operator stalled for
    longer than the claim counts): stop, so that one operator alone writes that Serve config."""
    async def loop() -> None:
        while True:
            await asyncio.sleep(shards.CLAIM_SECONDS / 3)
            try:
                error = await asyncio.to_thread(shards.claim_ray_cluster, SETTINGS)
            except Exception as exc:  # the API server unreachable for a moment: try again
                log.warning("could not renew the claim on the Ray cluster: %s", exc)
                continue
            if error:
                log.error("stopping: %s", error)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    memo.ray_claim = asyncio.create_task(loop())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    kube.load_config()
    settings.posting.level = logging.WARNING  # Events are posted explicitly, not from log lines
    settings.execution.max_workers = SETTINGS.workers  # bounded reconcile concurrency
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Jobs and pods filtered by the API server, not after decoding: only the ones that carry a
    # run's label reach this process, and only the operator (Jobs) and the Job controller (their
    # pods) may set it (rl_operator.policygen), so no tenant's Job or pod fills its memory
    for group, plural in (("batch", "jobs"), ("", "pods")):
        settings.watching.label_selectors[
            lambda r, g=group, p=plural: r.group == g and r.plural == p] = m.RUN_LABEL
    # our own finalizer name: a ValidatingAdmissionPolicy lets only the operator remove it
    settings.persistence.finalizer = m.FINALIZER
    # the last-handled state in memory, not as an annotation: one PATCH less per handled change
    settings.persistence.diffbase_storage = diffbase.STORAGE
    # Used only with --peering (kopf.run makes peering mandatory then; standalone otherwise:
    # a mandatory peering without one would pause the operator for ever).
    settings.peering.lifetime = SETTINGS.peering_lifetime_seconds
    settings.peering.stealth = True  # no log line per keep-alive
    ns, name = SETTINGS.approval_key_secret.split("/", 1)
    _KEY["value"] = kube.ensure_key_secret(ns, name)
    if SETTINGS.webhook_addr:
        _start_admission()
    log.info("rlops operator settings: %s", SETTINGS)


_ADMISSION: dict[str, admission.AdmissionServer] = {}


def _start_admission() -> None:
    """The approval webhook: its server in a thread of its own (``rl_operator.admission``), then
    the MutatingWebhookConfiguration ``rlops.dev`` (a shard's: ``<shard>.rlops.dev``, for its
    namespaces only) pointed at it (through the Service when
    ``webhook_service`` is set, else by URL), with this certificate's CA."""
    host = SETTINGS.webhook_host or SETTINGS.webhook_addr or ""
    names, service = [host, SETTINGS.webhook_addr or ""], None
    if SETTINGS.webhook_service:  # the API server calls it by the Service's name only
        service = certs.service_ref(SETTINGS.webhook_service)
        names = [f"{service[1]}.{service[0]}.svc", f"{service[1]}.{service[0]}.svc.cluster.local"]
    files = _webhook_certs(names)
    server = admission.AdmissionServer(SETTINGS.webhook_addr or "", SETTINGS.webhook_port, str(files.cert),
                                       str(files.key), lambda request: admission.decide(request, _KEY["value"]),
                                       client_ca=SETTINGS.webhook_client_ca)
    server.start()
    _ADMISSION["server"] = server
    if SETTINGS.shard and kube.delete_webhook_configuration(admission.CONFIGURATION):
        # the single operator's configuration (every namespace, failing closed) would send this
        # shard's Rollouts to an operator that shards replace: it goes
        log.warning("deleted the MutatingWebhookConfiguration %s of the operator of every namespace: shard %s "
                    "serves %s", admission.CONFIGURATION, SETTINGS.shard, ", ".join(SETTINGS.namespaces))
    kube.apply_mutating_webhook_configuration(admission.configuration(admission.client_config(
        files.ca.read_bytes(), url=f"https://{host}:{SETTINGS.webhook_port}", service=service),
        SETTINGS.shard, SETTINGS.namespaces))


@kopf.on.cleanup()
def stop_admission(**_: Any) -> None:
    server = _ADMISSION.pop("server", None)
    if server is not None:
        server.stop()


_tokens: dict[str, str | None] = {"alert": None, "audit": None}


def _refresh_tokens() -> None:
    """Re-read the receiver's bearer tokens from their Secrets (blocking; run in a thread)."""
    for which, ref in (("alert", SETTINGS.alert_token_secret), ("audit", SETTINGS.audit_token_secret)):
        if which == "audit" and not SETTINGS.audit_receiver:
            continue
        ns, name = ref.split("/", 1)
        try:
            _tokens[which] = alerts.load_token_from_secret(ns, name)
        except Exception as exc:  # keep the last good token; the receiver answers 503 without one
            log.warning("cannot read the %s token Secret %s: %s", which, ref, exc)


async def _keep_tokens_fresh(period: float = 30.0) -> None:
    while True:  # a rotated Secret takes effect within `period` seconds
        await asyncio.sleep(period)
        await asyncio.to_thread(_refresh_tokens)


@kopf.on.startup()
def start_metrics(**_: Any) -> None:
    if SETTINGS.metrics_addr:
        metrics.serve(SETTINGS.metrics_addr)
        log.info("metrics on http://%s/metrics", SETTINGS.metrics_addr)


@kopf.on.startup()
async def start_alert_receiver(memo: kopf.Memo, **_: Any) -> None:
    if not SETTINGS.alert_receiver:
        return
    host, port = SETTINGS.alert_receiver.rsplit(":", 1)
    await asyncio.to_thread(_refresh_tokens)
    memo.token_refresher = asyncio.create_task(_keep_tokens_fresh())
    memo.receiver = await alerts.start_receiver(host, int(port), lambda: _tokens["alert"], on_alert)


@kopf.on.startup()
async def start_audit_receiver(memo: kopf.Memo, **_: Any) -> None:
    if not SETTINGS.audit_receiver:
        return
    host, port = SETTINGS.audit_receiver.rsplit(":", 1)
    files = await asyncio.to_thread(certs.ensure_webhook_certs, SETTINGS.audit_cert_dir or
                                    f"{SETTINGS.cert_dir}/audit", [host])
    await asyncio.to_thread(_refresh_tokens)
    if getattr(memo, "token_refresher", None) is None:
        memo.token_refresher = asyncio.create_task(_keep_tokens_fresh())
    memo.audit_receiver = await alerts.start_audit_receiver(host, int(port), lambda: _tokens["audit"],
                                                            on_impersonated_approval, certfile=str(files.cert),
                                                            keyfile=str(files.key))


@kopf.on.cleanup()
async def stop_alert_receiver(memo: kopf.Memo, **_: Any) -> None:
    for task in (getattr(memo, "token_refresher", None), getattr(memo, "cert_watch", None),
                 getattr(memo, "ray_claim", None)):
        if task is not None:
            task.cancel()
    for runner in (getattr(memo, "receiver", None), getattr(memo, "audit_receiver", None)):
        if runner is not None:
            await runner.cleanup()


# ----------------------------------------------------------------------------- RLAgent


@kopf.on.resume(m.GROUP, m.VERSION, m.RLAgent.PLURAL)
@kopf.on.create(m.GROUP, m.VERSION, m.RLAgent.PLURAL)
@kopf.on.update(m.GROUP, m.VERSION, m.RLAgent.PLURAL, field="spec")
@kopf.on.update(m.GROUP, m.VERSION, m.RLAgent.PLURAL, field=("metadata", "annotations", triggers.RETRAIN))
def reconcile_agent(body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
    # the generation is handled: a new run, or a change that needs none (canary plan, approval, ...);
    # recorded in the same status write as the rest (one write, not two that race)
    reconcile_triggers(namespace, name, handled_generation=body["metadata"].get("generation"))


def reconcile_triggers(namespace: str, name: str, handled_generation: int | None = None,
                       trajectories: triggers.Window | None = None) -> triggers.Plan | None:
    """Start the TrainingRun that the agent's triggers call for now, if any (``triggers.plan``):
    supersede the runs in progress first under ``concurrencyPolicy: Replace``; record what was
    handled and what waits in the agent's status; delete the runs over its history limits.

    Called by the agent's handlers (spec or rlops.dev/retrain changed), when a run finishes (a
    trigger that waited under Forbid), and by the resync loop for agents with a schedule or a
    trajectory trigger (with ``trajectories`` read from the stream: a run may start for them).
    Returns the plan carried out (None: no agent)."""
    with cache.locked("agent-triggers", namespace, name):
        agent = cache.get_custom(namespace, m.RLAgent.PLURAL, name)
        if agent is None or agent["metadata"].get("deletionTimestamp"):
            return None  # being deleted: no new run (its runs go by garbage collection)
        runs = _owned(agent, cache.list_custom(namespace, m.TrainingRun.PLURAL, name))
        counted, problem = jetstream.TRAJECTORIES.seen(agent["metadata"]["uid"])
        with _LIVE_GUARD:
            live = _LIVE.get(agent["metadata"]["uid"])
        plan = triggers.plan(agent, runs, training.now(), trajectories or counted, problem, live)
        if plan.run is not None:
            new_name = plan.run["metadata"]["name"]
            reason = plan.run["spec"]["trigger"]["reason"]
            for old in plan.supersede:
                _supersede(namespace, old, new_name, reason)
            try:
                new_run, created = cache.create_custom_or_get(plan.run, m.TrainingRun.PLURAL)
            except ApiException as exc:
                if exc.status == 403 and "NamespaceTerminating" in (exc.body or ""):
                    return None  # the namespace goes, and the agent with it
                raise
            if created:
                nats_events.OUTBOX.put(nats_events.training_request(new_run))
                trigger = plan.run["spec"]["trigger"]
                also = [d.reason for d in plan.due[1:]]
                _post(agent, [training.Event("Normal", "TrainingRunCreated",
                                             f"TrainingRun {new_name} ({trigger['reason']}"
                                             f"{' + ' + ', '.join(also) if also else ''}, generation "
                                             f"{trigger['agentGeneration']})"
                                             f"{'; superseded: ' + ', '.join(plan.supersede) if plan.supersede else ''}")])
                # its Job now, not after the run's watch event has queued behind every other
                # object's; the run's own handler then finds the Job and writes the run's status
                _ensure_job(new_run)
        sync_agent(namespace, name, handled_generation=handled_generation, plan=plan)
        _expire_runs(namespace, name)
        return plan


def _supersede(namespace: str, name: str, by: str, reason: str) -> None:
    """A run in progress replaced by a newer one (``concurrencyPolicy: Replace``): its Job goes
    (with its pods), and its status says ``Superseded`` and by which run."""
    with cache.locked("trainingruns", namespace, name):
        run = cache.get_custom(namespace, m.TrainingRun.PLURAL, name)
        if run is None:
            return
        status = training.superseded_status(run, by, reason, training.now())
        if status is None:
            return
        kube.delete_job(namespace, name)
        cache.patch_status(namespace, m.TrainingRun.PLURAL, name, status.wire())
        _run_phase_changed(run, m.TrainingRunStatus.model_validate(run.get("status") or {}), status)


def _expire_runs(namespace: str, agent_name: str) -> None:
    """Delete the agent's finished runs over its history limits (``triggers.expired_runs``);
    their Jobs, pods and Rollouts follow by garbage collection."""
    agent = cache.get_custom(namespace, m.RLAgent.PLURAL, agent_name)
    if agent is None:
        return
    runs = _owned(agent, cache.list_custom(namespace, m.TrainingRun.PLURAL, agent_name))
    rollouts = cache.list_custom(namespace, m.Rollout.PLURAL, agent_name)
    reclaim = m.RLAgentSpec.model_validate(agent["spec"]).artifact_reclaim_policy == "Delete"
    by_name = {r["metadata"]["name"]: r for r in runs}
    for name in triggers.expired_runs(agent, runs, rollouts):
        if reclaim:  # the Job first: once the run is gone, nothing would remember its artifact
            job, created = kube.create_job_or_get(training.reclaim_job(by_name[name], agent, SETTINGS))
            if created:
                _post(agent, [training.Event("Normal", "ArtifactReclaimed", f"deleting the artifact of expired "
                                             f"TrainingRun {name} (Job {job['metadata']['name']})")])
        if kube.delete_custom(namespace, m.TrainingRun.PLURAL, name):
            log.info("%s/%s: deleted TrainingRun %s (over the history limits)", namespace, agent_name, name)


def _owned(owner: dict[str, Any], objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects whose controller is ``owner`` (by uid): a label alone makes nothing ours."""
    return [o for o in objs if trust.controlled_by(o, owner, owner["kind"])]


class Synced(NamedTuple):
    """The outcome of :func:`_sync_status`."""

    obj: dict[str, Any]  #: the object as written (or as read, when nothing changed)
    prev: Any  #: its status before
    status: Any  #: its status now
    events: list[training.Event]
    changed: bool


def _sync_status(namespace: str, plural: str, name: str, status_type: type, observe: Any) -> Synced | None:
    """Compute an object's status with ``observe(obj) -> (status, events)`` from the cached copy
    and write it only when it differs, guarded by that copy's resourceVersion. A conflict means
    the cache was behind: re-read the object from the API server and compute again (3 tries).
    None when the object is gone."""
    obj = cache.get_custom(namespace, plural, name)
    for _ in range(3):
        if obj is None:
            return None
        prev = status_type.model_validate(obj.get("status") or {})
        status, events = observe(obj)
        if status.wire() == prev.wire():
            return Synced(obj, prev, status, events, False)
        try:
            written = cache.patch_status(namespace, plural, name, status.wire(), obj["metadata"].get("resourceVersion"))
        except kube.Conflict:
            obj = kube.get_custom(namespace, plural, name)  # the cache was behind: the API server's copy
            continue
        return Synced(written, prev, status, events, True) if written is not None else None
    raise kube.Conflict(f"{plural}/{namespace}/{name}: status write conflicted 3 times")  # kopf retries


@metrics.reconciler("rlagent")
def sync_agent(namespace: str, name: str, handled_generation: int | None = None,
               plan: triggers.Plan | None = None) -> None:
    """Recompute an RLAgent's status from its TrainingRuns and write it if it changed.

    ``handled_generation``: the agent's generation that the caller has acted on
    (``observedGeneration``). ``plan``: the triggers' plan the caller carried out (what waits,
    what cannot work, a schedule seen for the first time). A run the caller just created or
    wrote is read back from the cache, which holds the operator's own writes until the watch
    delivers them."""
    with cache.locked("rlagents", namespace, name):
        def observe(agent: dict[str, Any]) -> tuple[m.RLAgentStatus, list[training.Event]]:
            runs = cache.list_custom(namespace, m.TrainingRun.PLURAL, name)
            at = training.now()
            status, events = training.observe_agent(agent, _owned(agent, runs), at)
            if handled_generation is not None:
                status.observed_generation = max(status.observed_generation or 0, handled_generation)
            if plan is not None:
                events += triggers.note_plan(status, plan, at)
            events += approvals.note_approvers(status, m.RLAgentSpec.model_validate(agent["spec"]), namespace, at)
            return status, events

        synced = _sync_status(namespace, m.RLAgent.PLURAL, name, m.RLAgentStatus, observe)
        if synced is not None:
            _post(synced.obj, synced.events)


# ----------------------------------------------------------------------------- TrainingRun


@kopf.on.resume(m.GROUP, m.VERSION, m.TrainingRun.PLURAL)
@kopf.on.create(m.GROUP, m.VERSION, m.TrainingRun.PLURAL)
def reconcile_run(body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
    run = dict(body)
    phase = (run.get("status") or {}).get("phase")
    if phase not in m.RUN_TERMINAL and not _ensure_job(run):
        return
    sync_run(namespace, name)
    if phase == "Succeeded":
        ensure_rollout(run)


def _ensure_job(run: dict[str, Any]) -> bool:
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
        _fail_run(run, "NotInOwnerChain", f"the operator ignores this TrainingRun: {why}")
        return False
    try:
        with cache.locked("jobs", namespace, name):  # the agent's handler, the run's, and the resync
            job = cache.get_job(namespace, name)
            if job is None:
                job, _created = cache.create_job_or_get(training.desired_job(run, SETTINGS))
    except ApiException as exc:
        if exc.status is None or not 400 <= exc.status < 500 or exc.status in (409, 429):
            raise
        _fail_run(run, "JobRejected", f"the API server refused the training Job ({exc.status} {exc.reason}): "
                                      f"{_api_message(exc)}")
        return False
    if not trust.controlled_by(job, run, m.TrainingRun.KIND):  # a Job squatting the run's name
        _fail_run(run, "JobNotOwned", _job_not_owned(namespace, name))
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


_LIVE: dict[str, triggers.LiveReward] = {}  #: the last live reward of each agent's active model, by uid
_LIVE_GUARD = threading.Lock()


def measure_live_reward(agent: dict[str, Any]) -> None:
    """The degradation trigger's measurement of the agent's active model (Prometheus), kept for
    its plans (:data:`_LIVE`) and exported (``rlops_agent_live_reward``); the first one over a
    full window after promotion is recorded as its baseline (``triggers.baseline_to_record``)."""
    namespace, name = agent["metadata"]["namespace"], agent["metadata"]["name"]
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    active = m.RLAgentStatus.model_validate(agent.get("status") or {}).active_model
    uid = agent["metadata"]["uid"]
    wanted = spec.triggers.degradation
    if wanted is None or active is None:
        with _LIVE_GUARD:
            _LIVE.pop(uid, None)
        return
    rewards = spec.canary.analysis.reward_range
    try:
        feedback, reward = analysis.live_reward(SETTINGS.prometheus_url, namespace, name, active.version,
                                                wanted.window_seconds, rewards.min, rewards.max)
    except analysis.AnalysisError as exc:
        log.warning("RLAgent %s/%s: cannot measure the live reward of %s: %s", namespace, name, active.version, exc)
        with _LIVE_GUARD:
            _LIVE.pop(uid, None)
        return
    live = triggers.LiveReward(active.version, reward, feedback)
    with _LIVE_GUARD:
        _LIVE[uid] = live
    if reward is not None:
        metrics.LIVE_REWARD.labels(namespace, name, active.version).set(reward)
    baseline = triggers.baseline_to_record(agent, live, training.now())
    if baseline is not None:
        with cache.locked("rlagents", namespace, name):
            cache.patch_status(namespace, m.RLAgent.PLURAL, name, {"activeModel": {
                "baselineReward": round(baseline, 6),
                "baselineMeasuredAt": m.rfc3339(training.now())}})
        _post(agent, [training.Event("Normal", "BaselineRecorded", (
            f"the live reward of {active.version} over its first {wanted.window_seconds} s with all traffic: "
            f"{baseline:.3f} (10%-trimmed mean of {feedback:.0f} feedbacks), the degradation trigger's baseline"))])


def resync_triggers(namespace: str, name: str, trajectories: triggers.Window | None = None) -> triggers.Plan | None:
    """One agent's triggers planned again (the resync: its schedule, a trigger that waits, new
    trajectories, its active model's live reward); an error is logged (None)."""
    try:
        agent = cache.get_custom(namespace, m.RLAgent.PLURAL, name)
        if agent is not None and ((agent.get("spec") or {}).get("triggers") or {}).get("degradation"):
            measure_live_reward(agent)
        return reconcile_triggers(namespace, name, trajectories=trajectories)
    except Exception as exc:  # the next round tries again
        log.warning("resync of the triggers of RLAgent %s/%s failed: %s", namespace, name, exc)
        return None


_NATS_LOCK: asyncio.Lock | None = None


async def _nats() -> Any:
    """The operator's NATS connection (``jetstream.TRAJECTORIES.client``), connected on first
    use; None without ``RLOPS_NATS_URL`` or while NATS cannot be reached (logged)."""
    global _NATS_LOCK
    counter = jetstream.TRAJECTORIES
    if not SETTINGS.nats_url:
        return None
    _NATS_LOCK = _NATS_LOCK or asyncio.Lock()
    async with _NATS_LOCK:
        if counter.client is None or counter.client.is_closed:
            counter.url = SETTINGS.nats_url
            try:
                counter.client = await jetstream.connect(SETTINGS.nats_url)
            except Exception as exc:  # not up yet: the triggers say so, the next round tries again
                log.warning("cannot connect to NATS at %s: %s", SETTINGS.nats_url, exc)
                counter.client = None
        return counter.client if counter.client is not None and counter.client.is_connected else None


_WORKING = {"value": False}  #: whether this replica works (peering), as the resync loop last saw
#: the global kill switch: its reason while engaged, else None (``watch_kill_switch``)
KILL_SWITCH: dict[str, str | None] = {"reason": None}


def read_kill_switch() -> str | None:
    """The kill switch's reason if its ConfigMap says ``engaged: "true"``, else None.

    Raises:
        kubernetes ApiException: the API server could not be asked (not a 404: no ConfigMap is
        a lifted switch).
    """
    data = kube.read_configmap_data(SETTINGS.operator_namespace, SETTINGS.kill_switch_configmap) or {}
    if str(data.get("engaged", "")).strip().lower() not in ("true", "1", "yes"):
        return None
    return (data.get("reason") or "").strip()[:200] or "no reason given"


def _note_kill_switch(reason: str | None) -> bool:
    """Record the switch's state; True when it changed."""
    if reason == KILL_SWITCH["reason"]:
        return False
    KILL_SWITCH["reason"] = reason
    metrics.KILL_SWITCH.set(1 if reason is not None else 0)
    if reason is not None:
        log.warning("kill switch ENGAGED (ConfigMap %s/%s): every Rollout frozen, traffic on stable: %s",
                    SETTINGS.operator_namespace, SETTINGS.kill_switch_configmap, reason)
    else:
        log.warning("kill switch lifted (ConfigMap %s/%s): Rollouts resume", SETTINGS.operator_namespace,
                    SETTINGS.kill_switch_configmap)
    return True


async def watch_kill_switch() -> None:
    """Read the kill switch every ``kill_switch_poll_seconds``; when it changes, reconcile every
    unfinished Rollout at once (on the replica that works): engaged, those in progress move all
    traffic to stable; lifted, they resume their step, and those that waited start."""
    while True:
        await asyncio.sleep(SETTINGS.kill_switch_poll_seconds)
        try:
            reason = await asyncio.to_thread(read_kill_switch)
        except Exception as exc:  # the API server unreachable for a moment: the state stays as it was
            log.warning("cannot read the kill switch: %s", exc)
            continue
        if not _note_kill_switch(reason) or not _WORKING["value"]:
            continue
        for ro in cache.every(m.Rollout.PLURAL):
            if (ro.get("status") or {}).get("phase") not in m.ROLLOUT_TERMINAL:
                await asyncio.to_thread(_reconcile_quietly, ro["metadata"]["namespace"], ro["metadata"]["name"])


def _reconcile_quietly(namespace: str, name: str) -> None:
    try:
        reconcile_rollout(namespace, name)
    except Exception as exc:  # its own timer tries again
        log.warning("Rollout %s/%s: reconcile after the kill switch changed failed: %s", namespace, name, exc)


async def publish_events() -> None:
    """The events out (``rl_operator.nats_events``), on kopf's event loop: while this replica
    works and its watch cache is complete, publish what the reconciles put in the outbox, every
    second. Each time it starts working (start-up, takeover), it first creates the missing
    streams and queues the events of the states that changed since the last event the streams
    hold (what the replica before it may have left unpublished)."""
    outbox = nats_events.OUTBOX
    replayed = False
    while True:
        await asyncio.sleep(1.0)
        if not (_WORKING["value"] and cache.INDEXED.is_set()):
            replayed = False
            continue
        try:
            client = await _nats()
            if client is None:
                continue
            if not replayed:
                await nats_events.ensure_streams(client)
                since = await nats_events.last_published(client)
                again = nats_events.replay(cache.every(m.TrainingRun.PLURAL), cache.every(m.Rollout.PLURAL), since)
                for event in again:
                    outbox.put(event)
                replayed = True
                log.info("events out: %d events of states changed since %s queued again", len(again),
                         since.isoformat() if since else "ever")
            await outbox.drain(client)
        except Exception as exc:  # NATS gone for a moment: the events wait
            log.warning("events out: %s", exc)


async def resync_trajectory_triggers() -> None:
    """One round of the trajectory triggers (on kopf's event loop): count each agent's new
    trajectories; at the threshold, read them, plan the agent's triggers with them, and
    acknowledge what a run now stands for (``rl_operator.jetstream``)."""
    counter = jetstream.TRAJECTORIES
    await _nats()
    agents = cache.agents(with_trajectory_trigger=True)
    for agent in agents:
        namespace, name = agent["metadata"]["namespace"], agent["metadata"]["name"]
        trigger = m.RLAgentSpec.model_validate(agent["spec"]).triggers.trajectories
        assert trigger is not None
        read = None
        try:
            counted = await counter.count(agent, trigger)
            if counted is not None and counted.count >= trigger.threshold:
                runs = _owned(agent, cache.list_custom(namespace, m.TrainingRun.PLURAL, name))
                if triggers.blocked(agent, runs) is None:
                    read = await counter.read(agent, trigger, counted.count)
        except Exception as exc:  # NATS unreachable for a moment: the next round
            log.warning("RLAgent %s/%s: cannot count its trajectories: %s", namespace, name, exc)
            counter.unavailable(agent, f"spec.triggers.trajectories: cannot read stream {trigger.stream!r}: {exc}")
        plan = await asyncio.to_thread(resync_triggers, namespace, name, read.window if read else None)
        if read is not None:
            await read.settle(plan.handled_sequence if plan else None)
    if agents or counter.client is not None:
        await counter.forget_others(agents, SETTINGS.namespaces)


@kopf.on.startup()
async def start_resync(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """The safety net for missed Job and pod events, and the clock of the triggers: every
    ``resync_seconds``, each unfinished TrainingRun in the watch cache is reconciled again (with
    nothing missed, that makes no API request); on a second loop, each agent with a schedule,
    a degradation or trajectory trigger, or a waiting trigger plans its triggers (a scheduled
    time starts its run within ``resync_seconds``).

    One loop for the operator, not a kopf timer per object: kopf keeps a finalizer on every
    object with a timer, which cost a write per agent and made deleting an agent wait for the
    operator. kopf pauses its handlers on a standby replica, not this loop: the loop asks
    :func:`rl_operator.peering.works` first, so a standby writes nothing."""
    async def this_replica_works() -> bool:
        if settings.peering.standalone:
            return True
        if peering.IDENTITY is None:
            return False
        records = await asyncio.to_thread(peering.read_records, settings.peering.name)
        return peering.works(records, peering.IDENTITY, settings.peering.priority, datetime.now(timezone.utc))

    async def loop() -> None:
        working: bool | None = None
        while True:
            await asyncio.sleep(SETTINGS.resync_seconds)
            try:
                works = await this_replica_works()
            except Exception as exc:  # the API server unreachable for a moment: the next round
                log.warning("resync skipped: cannot read the peering records: %s", exc)
                continue
            _WORKING["value"] = works
            if works != working:
                working = works
                log.info("resync of unfinished TrainingRuns: %s", "this replica works" if works else
                         "standing by (another replica works)")
            if not works or not cache.INDEXED.is_set():  # a replica that has just taken over lists first
                continue
            for namespace, name in cache.unfinished_runs():  # on the event loop: kopf's indexes change there
                await asyncio.to_thread(resync_run, namespace, name)

    async def triggers_loop() -> None:
        """The triggers that need the clock or another service (a schedule, a wait, the live
        reward in Prometheus, the trajectories in NATS), on a loop of their own: a service that
        answers slowly delays them, never the resync of the runs."""
        while True:
            await asyncio.sleep(SETTINGS.resync_seconds)
            if not _WORKING["value"] or not cache.INDEXED.is_set():
                continue
            for namespace, name in cache.agents_with_triggers():  # a scheduled time came; a wait ended
                await asyncio.to_thread(resync_triggers, namespace, name)
            try:
                await resync_trajectory_triggers()
            except Exception as exc:  # the next round
                log.warning("resync of the trajectory triggers failed: %s", exc)

    memo.resync = asyncio.create_task(loop())
    memo.triggers = asyncio.create_task(triggers_loop())
    _WORKING["value"] = bool(settings.peering.standalone)  # with peering: from the loop's first round
    try:  # before any handler runs: no Rollout moves traffic while the switch is engaged
        _note_kill_switch(await asyncio.to_thread(read_kill_switch))
    except Exception as exc:
        log.warning("cannot read the kill switch at start: %s", exc)
    memo.kill_switch = asyncio.create_task(watch_kill_switch())
    if SETTINGS.nats_url and SETTINGS.nats_events:
        nats_events.OUTBOX.enabled = True
        memo.events_out = asyncio.create_task(publish_events())


@kopf.on.event(m.GROUP, m.VERSION, m.RLAgent.PLURAL)
@kopf.on.event(m.GROUP, m.VERSION, m.TrainingRun.PLURAL)
@kopf.on.event(m.GROUP, m.VERSION, m.Rollout.PLURAL)
async def forget_deleted(type: str | None, uid: str | None, **_: Any) -> None:
    """A deleted object's last-handled state leaves the operator's memory (``rl_operator.diffbase``).
    Async: it runs on kopf's event loop, the only thread that touches that storage.

    Its first call also marks the watch cache complete (:data:`rl_operator.cache.INDEXED`):
    kopf runs no handler before every index has its first listing."""
    cache.INDEXED.set()
    if type == "DELETED":
        diffbase.STORAGE.forget(uid)


@kopf.on.event("batch", "v1", "jobs", labels={m.RUN_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={m.RUN_LABEL: kopf.PRESENT})
def on_child_event(labels: dict[str, str], namespace: str, type: str | None, **_: Any) -> None:
    cache.INDEXED.set()
    sync_run(namespace, labels[m.RUN_LABEL])


def _job_not_owned(namespace: str, name: str) -> str:
    return f"Job {namespace}/{name} exists but is not controlled by this TrainingRun (uid)"


def _api_message(exc: ApiException) -> str:
    """The API server's own message from an error response (its Status body), else the body."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.body)
    except ValueError:
        return str(exc.body)


def _fail_run(run: dict[str, Any], reason: str, message: str) -> None:
    """Set a run Failed with a reason (once), and sync its agent."""
    namespace, name = run["metadata"]["namespace"], run["metadata"]["name"]
    with cache.locked("trainingruns", namespace, name):
        status, events = training.failed_status(run, reason, message, training.now())
        if events and cache.patch_status(namespace, m.TrainingRun.PLURAL, name, status.wire()) is not None:
            _run_phase_changed(run, m.TrainingRunStatus.model_validate(run.get("status") or {}), status)
            _post(run, events)
    sync_agent(namespace, run["spec"]["agentRef"]["name"])


def _run_phase_changed(run: dict[str, Any], prev: m.TrainingRunStatus, status: m.TrainingRunStatus) -> None:
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
        def observe(run: dict[str, Any]) -> tuple[m.TrainingRunStatus, list[training.Event]]:
            job = cache.get_job(namespace, name)
            at = training.now()
            if job is not None and not trust.controlled_by(job, run, m.TrainingRun.KIND):
                return training.failed_status(run, "JobNotOwned", _job_not_owned(namespace, name), at)
            pods = cache.list_pods(namespace, name)  # the trainer's and the evaluator's
            trainer_pods = [p for p in pods if not evaluation.is_evaluation(p)] if job is not None else []
            verdicts = [(pod, trust.pod_untrusted(pod, job, training.TRAINER_CONTAINER)) for pod in trainer_pods]
            status, events = training.observe_run(run, job, [p for p, why in verdicts if why is None], at,
                                                  training.artifact_uri(SETTINGS, run))
            ignored = "; ".join(why for _, why in verdicts if why)
            events += training.note_ignored_pods(status, ignored, at)
            if status.phase == "Succeeded":  # the operator's own measurement of the artifact
                eval_job = cache.get_job(namespace, evaluation.job_name(run))
                if eval_job is not None and not trust.controlled_by(eval_job, run, m.TrainingRun.KIND):
                    eval_job = None
                eval_pods = [p for p in pods if evaluation.is_evaluation(p) and eval_job is not None and
                             trust.pod_untrusted(p, eval_job, evaluation.EVALUATOR_CONTAINER) is None]
                status, measured = evaluation.observe_evaluation({**run, "status": status.wire()}, eval_job,
                                                                 eval_pods, at, _KEY["value"])
                events += measured
            return status, events

        synced = _sync_status(namespace, m.TrainingRun.PLURAL, name, m.TrainingRunStatus, observe)
        if synced is None:
            return  # gone (deleted since read)
        if synced.changed:
            _run_phase_changed(synced.obj, synced.prev, synced.status)
        _post(synced.obj, synced.events)
    run = synced.obj
    agent_name = run["spec"]["agentRef"]["name"]
    if synced.changed:
        sync_agent(namespace, agent_name)
    if synced.status.phase == "Succeeded" and synced.status.evaluation is None and _ensure_evaluation_job(run):
        sync_run(namespace, name)  # its status says Pending at once; the Job's events do the rest
    elif synced.status.phase == "Succeeded":
        ensure_rollout(run)
    if synced.changed and synced.status.phase in m.RUN_TERMINAL:
        reconcile_triggers(namespace, agent_name)  # a trigger that waited for it (Forbid); the history


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
                    evaluation.evaluation_job(run, SETTINGS, secrets.randbelow(evaluation.SEED_BOUND)))
    except ApiException as exc:
        if exc.status is None or not 400 <= exc.status < 500 or exc.status in (409, 429):
            raise  # transient: kopf, or the next event or resync, tries again
        reason, message = "JobRejected", f"the API server refused the evaluation Job ({exc.status}): {_api_message(exc)}"
    else:
        if trust.controlled_by(job, run, m.TrainingRun.KIND):
            return True
        reason, message = "JobNotOwned", f"Job {namespace}/{name} exists but is not controlled by this TrainingRun (uid)"
    with cache.locked("trainingruns", namespace, run["metadata"]["name"]):
        cache.patch_status(namespace, m.TrainingRun.PLURAL, run["metadata"]["name"], {"evaluation": {
            "phase": "Failed", "jobName": name, "reason": reason, "message": message[:1024]}})
    _post(run, [training.Event("Warning", "EvaluationFailed", f"{reason}: {message}"[:1024])])
    sync_agent(namespace, run["spec"]["agentRef"]["name"])
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
        return  # a suspended agent's latest run gets its Rollout when it is resumed (nudge_waiting_rollouts)
    ok, why = rollout.eligible(run, spec)
    if not ok:
        _post(run, [training.Event("Normal", "RolloutSkipped", why)])
        return
    obj, created = cache.create_custom_or_get(rollout.desired_rollout(run), m.Rollout.PLURAL)
    if created:
        _post(agent, [training.Event("Normal", "RolloutCreated",
                                     f"Rollout {obj['metadata']['name']} for {obj['spec']['fingerprint']} ({why})")])
        _reconcile_waiting_rollouts(ns, agent["metadata"]["name"], but=obj["metadata"]["name"])  # superseded?


# ----------------------------------------------------------------------------- Rollout


#: Phases that wait on a person or on the agent's spec, not on time: no periodic reconcile. An
#: approval annotation (on_rollout) or a change of the agent's spec (nudge_waiting_rollouts)
#: moves them on.
WAITING = frozenset({"AwaitingApproval", "Approved"})


def rollout_ticks(status: dict[str, Any] | None, annotations: dict[str, str] | None = None, **_: Any) -> bool:
    """Whether a Rollout needs the periodic reconcile: not finished, and not waiting on a person
    or on the agent's spec. An AwaitingApproval Rollout whose approval is recorded but not yet
    acted on (Ray Serve was down) still ticks."""
    phase = (status or {}).get("phase")
    if phase in m.ROLLOUT_TERMINAL:
        return False
    return phase not in WAITING or (phase == "AwaitingApproval" and approvals.APPROVED_BY in (annotations or {}))


@kopf.on.resume(m.GROUP, m.VERSION, m.Rollout.PLURAL)
@kopf.on.create(m.GROUP, m.VERSION, m.Rollout.PLURAL)
@kopf.on.update(m.GROUP, m.VERSION, m.Rollout.PLURAL, field="metadata.annotations")
def on_rollout(namespace: str, name: str, **_: Any) -> None:
    reconcile_rollout(namespace, name)


# initial_delay: the create/resume handler makes the first reconcile (a timer runs at once otherwise)
@kopf.timer(m.GROUP, m.VERSION, m.Rollout.PLURAL, interval=SETTINGS.rollout_interval_seconds,
            initial_delay=SETTINGS.rollout_interval_seconds, when=rollout_ticks)
def tick_rollout(namespace: str, name: str, **_: Any) -> None:
    reconcile_rollout(namespace, name)


@kopf.on.update(m.GROUP, m.VERSION, m.RLAgent.PLURAL, field="spec")
def nudge_waiting_rollouts(namespace: str, name: str, old: Any, new: Any, **_: Any) -> None:
    """An agent's spec changed (approval policy, serving enabled, ...): its Rollouts that wait
    without a timer (``WAITING``) are reconciled now. Resumed (``spec.suspend`` true -> false):
    its latest run, if Succeeded, gets the Rollout it did not get while suspended."""
    _reconcile_waiting_rollouts(namespace, name)
    if (old or {}).get("suspend") and not (new or {}).get("suspend"):  # old, new: the spec (a field handler)
        agent = cache.get_custom(namespace, m.RLAgent.PLURAL, name)
        latest = training.latest_run(_owned(agent, cache.list_custom(namespace, m.TrainingRun.PLURAL, name))) \
            if agent else None
        if latest is not None and (latest.get("status") or {}).get("phase") == "Succeeded":
            ensure_rollout(latest)


def _reconcile_waiting_rollouts(namespace: str, agent: str, but: str | None = None) -> None:
    for ro in cache.list_custom(namespace, m.Rollout.PLURAL, agent):
        if ro["metadata"]["name"] != but and (ro.get("status") or {}).get("phase") in WAITING:
            reconcile_rollout(namespace, ro["metadata"]["name"])


class Serving(NamedTuple):
    """What Serve runs for one agent (all None/empty when it has no application)."""

    versions: dict[str, str | None] | None  #: version -> the fingerprint Serve was given
    weights: dict[str, int] | None  #: the router's split, percent
    status: str | None  #: the application's status (RUNNING, DEPLOYING, ...)
    entries: dict[str, Any]  #: version -> its entry as deployed (artifactURI, fingerprint)
    extras: dict[str, Any] | None = None  #: the router's user_config besides the weights


def _serving(namespace: str, agent: str) -> Serving:
    """The agent's Serve application, read from Serve's REST API."""
    details = rayserve.get_applications(SETTINGS.ray_dashboard_url)
    summary = rayserve.application_summary(details, rayserve.app_name(namespace, agent))
    config = (summary or {}).get("config") or {}
    if not summary or not config:
        return Serving(None, None, None, {})
    entries = (config.get("args") or {}).get("versions") or {}
    versions = {v: (entries.get(v) or {}).get("fingerprint") for v in rayserve.application_versions(config)}
    return Serving(versions, rayserve.application_weights(config), summary["status"], entries,
                   rayserve.router_extras(config))


@metrics.reconciler("rollout")
def reconcile_rollout(namespace: str, name: str) -> None:
    """Observe the world for one Rollout, run the pure pipeline, and carry out its actions.

    Reads come from the caches, which return the operator's own last write of an object until
    the watch delivers it (``rl_operator.cache``): this state machine moves traffic, and must
    never act on a copy older than its own last write (a stale "not started" would restart the
    canary at 0%), nor on an agent's or a sibling Rollout's status older than the operator's
    last write of it (its stable version, a Rollout that still looks in progress). Rollout
    reconciles are few: on an annotation (the index holds that event's copy before the handler
    runs), on a change of the agent's spec, and every 2 s only while a canary runs."""
    with cache.locked("rollouts", namespace, name):
        ro = cache.get_custom(namespace, m.Rollout.PLURAL, name)
        if ro is None or (ro.get("status") or {}).get("phase") in m.ROLLOUT_TERMINAL:
            return
        agent_name = ro["spec"]["agentRef"]["name"]
        agent = cache.get_custom_confirmed(namespace, m.RLAgent.PLURAL, agent_name)
        run = cache.get_custom_confirmed(namespace, m.TrainingRun.PLURAL, ro["spec"]["trainingRunRef"]["name"])
        untrusted = trust.rollout_untrusted(ro, run, agent, training.artifact_uri(SETTINGS, run) if run else None,
                                            _KEY["value"])
        if agent is None:
            if untrusted:
                _write_rollout(ro, *_ignored(ro, untrusted))
            return
        agent_spec = m.RLAgentSpec.model_validate(agent["spec"])
        agent_status = m.RLAgentStatus.model_validate(agent.get("status") or {})
        others = cache.list_custom(namespace, m.Rollout.PLURAL, agent_name)
        blocking = next((o["metadata"]["name"] for o in others if o["metadata"]["name"] != name
                         and (o.get("status") or {}).get("phase") in m.ROLLOUT_ACTIVE), None)
        newer = _newer_rollout(namespace, run, others) if run is not None else None
        now = training.now()
        status = m.RolloutStatus.model_validate(ro.get("status") or {})
        obs = traffic.Observed(now=now, annotations=dict(ro["metadata"].get("annotations") or {}),
                               agent_spec=agent_spec, active_model=agent_status.active_model,
                               blocking_rollout=blocking, newer_rollout=newer, approval_key=_KEY["value"],
                               untrusted=untrusted, frozen=KILL_SWITCH["reason"])
        entries: dict[str, Any] = {}
        if approvals.approval_given(status, obs.annotations, agent_spec) and agent_spec.serving.enabled and not blocking and (not untrusted or status.phase in m.ROLLOUT_ACTIVE):
            try:
                serving = _serving(namespace, agent_name)
                obs.serving_versions, obs.serving_weights, obs.app_status = serving.versions, serving.weights, serving.status
                obs.serving_extras, entries = serving.extras, serving.entries
            except rayserve.RayServeError as exc:
                _write_rollout(ro, status.model_copy(update={"message": f"Ray Serve unavailable: {exc}"}), [])
                return
            _observe_router(obs, namespace, agent_name, ro["spec"]["version"], status)
            if obs.frozen is None and (window := traffic.analysis_window(status, agent_spec, now)) is not None:
                try:
                    meas = analysis.measure(SETTINGS.prometheus_url, namespace, agent_name, ro["spec"]["version"],
                                            status.stable_version, window)
                    obs.analysis = verdicts.judge(meas, agent_spec.canary.analysis, status.stable_version is not None)
                except analysis.AnalysisError as exc:
                    obs.analysis = ("Error", str(exc)[:500], {})
                metrics.ANALYSIS.labels(namespace, obs.analysis[0]).inc()
        new_status, acts = rollout.reconcile(ro, obs)
        _act(namespace, agent_name, agent_spec, acts, entries)
        if acts.remove_annotations:
            cache.patch_custom(namespace, m.Rollout.PLURAL, name,
                              {"metadata": {"annotations": {k: None for k in acts.remove_annotations}}})
        if acts.promote_active_model is not None:
            _set_active_model(namespace, agent_name, acts.promote_active_model, name)
        _write_rollout(ro, new_status, acts.events)
        if new_status.shadow is not None:
            _set_agent_shadow(agent, name, new_status)


def _set_agent_shadow(agent: dict[str, Any], rollout_name: str, st: m.RolloutStatus) -> None:
    """The agent's ``status.shadow``: its latest shadow's progress (``kubectl get rla``)."""
    sh = st.shadow
    assert sh is not None
    if sh.graduated_at is not None:
        state = "graduated"
    elif sh.ended:
        state = "ended"
    elif st.phase == "Shadowing":
        state = "shadowing"
    else:
        state = (st.phase or "pending").lower()
    counts = verdicts.ShadowCounts(sh.decisions, sh.agreements, sh.override_feedback, sh.override_correct)
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    summary = m.ShadowSummary(rollout=rollout_name, progress=f"{state}: {verdicts.graduation(counts, spec.observe)[1]}",
                              graduated_at=sh.graduated_at).wire()
    if (agent.get("status") or {}).get("shadow") != summary:
        meta = agent["metadata"]
        cache.patch_status(meta["namespace"], m.RLAgent.PLURAL, meta["name"], {"shadow": summary})


def _observe_router(obs: traffic.Observed, namespace: str, agent: str, version: str,
                    status: m.RolloutStatus) -> None:
    """What the router reports through Prometheus: a shadow's comparison counters, and whether
    the circuit breaker opened for a canary. A Prometheus error leaves them unmeasured (the
    shadow waits; the breaker's fallback already protects the clients, and the analysis or an
    alert still aborts)."""
    extras = obs.serving_extras or {}
    try:
        if status.phase == "Shadowing" and obs.app_status == "RUNNING" and extras.get(SHADOW_KEY) == version:
            obs.shadow = analysis.shadow_counts(SETTINGS.prometheus_url, namespace, agent, version)
        elif status.phase in ("Progressing", "Paused") and BREAKER_KEY in extras and \
                analysis.circuit_open(SETTINGS.prometheus_url, namespace, agent, version):
            errors = extras[BREAKER_KEY].get("consecutiveErrors")
            obs.circuit_open = (f"{errors} consecutive canary errors: the router sent all traffic to stable "
                                f"{extras[BREAKER_KEY].get('stable')}")
    except analysis.AnalysisError as exc:
        log.warning("rollout %s/%s: %s", namespace, version, exc)
        if status.phase == "Shadowing":  # the shadow's message says why it does not progress
            obs.shadow_error = f"Prometheus: {str(exc)[:300]}"


def _newer_rollout(namespace: str, run: dict[str, Any], rollouts: list[dict[str, Any]]) -> str | None:
    """A Rollout among ``rollouts`` (the agent's) made from a TrainingRun newer than ``run``."""
    order = training.run_order(run)
    for other in rollouts:
        other_run = cache.get_custom(namespace, m.TrainingRun.PLURAL, other["spec"]["trainingRunRef"]["name"])
        if other_run is not None and training.run_order(other_run) > order:
            return other["metadata"]["name"]
    return None


def _ignored(ro: dict[str, Any], why: str) -> tuple[m.RolloutStatus, list[training.Event]]:
    """The status and Events for a Rollout outside the owner chain, when no agent is left to consult."""
    agent = m.RLAgentSpec(environment=m.EnvironmentSpec(id="-"))
    status, acts = rollout.reconcile(ro, traffic.Observed(now=training.now(), annotations={}, agent_spec=agent,
                                                          active_model=None, untrusted=why))
    return status, acts.events


def _act(namespace: str, agent: str, spec: m.RLAgentSpec, acts: traffic.Actions, entries: dict[str, Any]) -> None:
    """Carry out serving actions: weights first (the router's user_config only), then deploys."""
    app = rayserve.app_name(namespace, agent)
    if acts.set_weights is not None:
        rayserve.set_weights(SETTINGS.ray_dashboard_url, app, acts.set_weights, extras=acts.router_extras)
    if acts.deploy is not None:
        versions = {v: (e if e is not None else entries[v]) for v, e in acts.deploy["versions"].items()}
        reward = spec.canary.analysis.reward_range
        per_client = spec.canary.analysis.feedback_per_client
        key = _KEY["value"]
        config = rayserve.app_config(
            namespace, agent, versions, acts.deploy["weights"], max_batch_size=spec.serving.max_batch_size,
            feedback_key=trust.derive_key(key, f"feedback:{app}").hex() if key else None,
            reward_min=reward.min, reward_max=reward.max, feedback_per_client_per_minute=per_client.max_per_minute,
            feedback_client_header=per_client.client_header, artifact_root=SETTINGS.artifact_root,
            router_extras=acts.router_extras)
        rayserve.apply_application(SETTINGS.ray_dashboard_url, config)


def _set_active_model(namespace: str, agent: str, model: m.ActiveModel, rollout_name: str) -> None:
    # a merge patch: the previous model's baseline and degradation go explicitly
    active = {"baselineReward": None, "baselineMeasuredAt": None, "degradedAt": None, **model.wire()}
    with cache.locked("rlagents", namespace, agent):
        cache.patch_status(namespace, m.RLAgent.PLURAL, agent, {"activeModel": active, "latestRollout": rollout_name})


def _write_rollout(ro: dict[str, Any], status: m.RolloutStatus, events: list[training.Event]) -> None:
    namespace, name = ro["metadata"]["namespace"], ro["metadata"]["name"]
    old = m.RolloutStatus.model_validate(ro.get("status") or {})
    if status.wire() != old.wire():
        cache.patch_status(namespace, m.Rollout.PLURAL, name, status.wire())
        if status.phase != old.phase:
            nats_events.OUTBOX.put(nats_events.model_deployed({**ro, "status": status.wire()}))
    metrics.rollout_written(namespace, name, ro["spec"]["agentRef"]["name"], old.phase, status.phase,
                            status.canary_weight, status.phase in m.ROLLOUT_TERMINAL)
    _post(ro, events)
    if status.phase in m.ROLLOUT_TERMINAL and old.phase not in m.ROLLOUT_TERMINAL:
        # its run was kept for it: now it may be over the history limits
        _expire_runs(namespace, ro["spec"]["agentRef"]["name"])


def abort_agent_rollout(namespace: str, agent: str, reason: str) -> str | None:
    """Abort the agent's in-progress Rollout (canary weight 0 at once). Returns its name, or None."""
    for ro in kube.list_custom(namespace, m.Rollout.PLURAL, f"{m.AGENT_LABEL}={agent}"):
        if (ro.get("status") or {}).get("phase") not in m.ROLLOUT_ACTIVE:
            continue
        name = ro["metadata"]["name"]
        with cache.locked("rollouts", namespace, name):
            ro = kube.get_custom(namespace, m.Rollout.PLURAL, name)
            if ro is None or (ro.get("status") or {}).get("phase") not in m.ROLLOUT_ACTIVE:
                continue
            status, acts = traffic.abort(ro, reason, training.now())
            agent_obj = kube.get_custom(namespace, m.RLAgent.PLURAL, agent)
            spec = m.RLAgentSpec.model_validate(agent_obj["spec"]) if agent_obj else None
            entries = _serving(namespace, agent).entries
            _act(namespace, agent, spec or m.RLAgentSpec(environment=m.EnvironmentSpec(id="-")), acts, entries)
            _write_rollout(ro, status, acts.events)
        return name
    return None


async def on_alert(target: alerts.AlertTarget) -> None:
    """Alertmanager receiver callback: a firing alert naming an RLAgent aborts its canary, once
    Prometheus confirms that it fires (``analysis.alert_firing``: an alert posted to
    Alertmanager's API by hand changes nothing). An agent outside this operator's namespaces is
    another shard's: left alone."""
    if not shards.serves(SETTINGS, target.namespace):
        metrics.ALERTS.labels("other_shard").inc()
        log.warning("alert %s for %s/%s: not a namespace this operator serves (%s); ignored", target.alertname,
                    target.namespace, target.agent, ", ".join(SETTINGS.namespaces))
        return
    try:  # anyone who reaches Alertmanager's API can post an alert: Prometheus must say it fires
        confirmed = await asyncio.to_thread(analysis.alert_firing, SETTINGS.prometheus_url, target.labels)
        doubt = "" if confirmed else f"Prometheus at {SETTINGS.prometheus_url} has no firing ALERTS series with its labels"
    except analysis.AnalysisError as exc:
        confirmed, doubt = False, f"Prometheus could not be asked: {exc}"
    if not confirmed:
        metrics.ALERTS.labels("unconfirmed").inc()
        log.warning("alert %s for %s/%s not acted on: %s (labels %s)", target.alertname, target.namespace,
                    target.agent, doubt, target.labels)
        return
    reason = f"alert {target.alertname} firing" + (f": {target.summary}" if target.summary else "")
    name = await asyncio.to_thread(abort_agent_rollout, target.namespace, target.agent, reason)
    metrics.ALERTS.labels("aborted" if name else "none").inc()
    if name:
        log.warning("rolled back %s/%s on %s", target.namespace, name, reason)
    else:
        log.info("alert %s for %s/%s: no rollout in progress", target.alertname, target.namespace, target.agent)


def record_impersonation(record: audit.ImpersonatedApproval) -> bool:
    """Record on the Rollout who really made an approval with impersonation: annotation
    ``rlops.dev/approved-via`` (the operator alone may write it after the fact) and an Event.
    Only when the Rollout's recorded approval is the audited one (same approver, close in time)."""
    with cache.locked("rollouts", record.namespace, record.name):
        ro = kube.get_custom(record.namespace, m.Rollout.PLURAL, record.name)
        if ro is None:
            return False
        ann = ro["metadata"].get("annotations") or {}
        if not audit.matches(record, ann, approvals.APPROVED_BY, approvals.APPROVED_AT):
            log.info("audit %s: %s/%s approval by %s (as %s) is no longer the recorded one", record.audit_id,
                     record.namespace, record.name, record.user, record.impersonated)
            return False
        via = f"impersonated by {record.user}"
        if ann.get(approvals.APPROVED_VIA) == via:
            return False
        cache.patch_custom(record.namespace, m.Rollout.PLURAL, record.name, {"metadata": {"annotations": {approvals.APPROVED_VIA: via}}})
        _post(ro, [training.Event("Warning", "ApprovedWithImpersonation",
                                  f"{record.user} approved as {record.impersonated} (impersonation, audit ID "
                                  f"{record.audit_id})")])
    return True


async def on_impersonated_approval(record: audit.ImpersonatedApproval) -> None:
    """Audit webhook callback (``alerts.start_receiver``); Rollouts outside this operator's
    namespaces are another shard's."""
    if not shards.serves(SETTINGS, record.namespace):
        return
    if await asyncio.to_thread(record_impersonation, record):
        log.warning("%s/%s: approved by %s impersonating %s", record.namespace, record.name, record.user,
                    record.impersonated)
        await asyncio.to_thread(reconcile_rollout, record.namespace, record.name)


def may_serve(spec: dict[str, Any] | None, status: dict[str, Any] | None, **_: Any) -> bool:
    """Whether an agent may have a Serve application: serving enabled, or a version promoted.
    Only those carry the operator's finalizer; deleting any other agent waits for nobody."""
    return bool(((spec or {}).get("serving") or {}).get("enabled", True) or (status or {}).get("activeModel"))


@kopf.on.delete(m.GROUP, m.VERSION, m.RLAgent.PLURAL, when=may_serve)
def on_agent_deleted(status: dict[str, Any], namespace: str, name: str, **_: Any) -> None:
    """The agent's finalizer, while it may serve (:func:`may_serve`): its Serve application goes
    before the agent does, so no traffic is left with no object to manage it. Ray unreachable:
    retried (the agent stays Terminating). TrainingRuns, Jobs and Rollouts go by ownerReference
    garbage collection; a Rollout still in progress takes its own canary off traffic
    (``on_rollout_deleted``)."""
    if not (status or {}).get("activeModel"):
        return  # no version was ever promoted: nothing of this agent's serves but a live Rollout's canary
    try:
        if rayserve.delete_application(SETTINGS.ray_dashboard_url, rayserve.app_name(namespace, name)):
            log.info("deleted Serve application of %s/%s", namespace, name)
    except rayserve.RayServeError as exc:
        raise kopf.TemporaryError(f"cannot delete the Serve application of {namespace}/{name}: {exc}", delay=10)


@kopf.on.delete(m.GROUP, m.VERSION, m.Rollout.PLURAL)
def on_rollout_deleted(namespace: str, name: str, **_: Any) -> None:
    """The Rollout's finalizer: deleted mid-canary, its canary goes to weight 0 (traffic on the
    stable version) and leaves the application; with no stable version the application goes."""
    metrics.rollout_deleted(namespace, name)
    with cache.locked("rollouts", namespace, name):
        ro = kube.get_custom(namespace, m.Rollout.PLURAL, name)
        if ro is None or (ro.get("status") or {}).get("phase") not in m.ROLLOUT_ACTIVE:
            return
        agent = ro["spec"]["agentRef"]["name"]
        status, acts = traffic.abort(ro, "the Rollout was deleted", training.now())
        try:
            if status.stable_version is None:
                rayserve.delete_application(SETTINGS.ray_dashboard_url, rayserve.app_name(namespace, agent))
            else:
                agent_obj = kube.get_custom(namespace, m.RLAgent.PLURAL, agent)
                spec = m.RLAgentSpec.model_validate(agent_obj["spec"]) if agent_obj else \
                    m.RLAgentSpec(environment=m.EnvironmentSpec(id="-"))
                _act(namespace, agent, spec, acts, _serving(namespace, agent).entries)
        except rayserve.ApplicationNotFound:
            pass
        except rayserve.RayServeError as exc:
            raise kopf.TemporaryError(f"cannot take the canary of {namespace}/{name} off traffic: {exc}", delay=5)
        _post(ro, acts.events)
        log.warning("Rollout %s/%s deleted mid-canary: canary weight 0", namespace, name)
