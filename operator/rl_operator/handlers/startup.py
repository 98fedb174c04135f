"""Start-up and shutdown: the settings into kopf, the signing key, the approval webhook and its
certificate, the receivers (alerts, audit), the metrics, the resync loops, the kill switch, the
events out; and the watch-cache bookkeeping of every resource."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from datetime import datetime, timezone
from typing import Any

import kopf

from rl_operator import admission, alerts, cache, certs, diffbase, kube, metrics, nats_events, peering, shards
from rl_operator import models as m
from rl_operator.handlers import agents, common, receivers, rollouts, runs
from rl_operator.handlers.runtime import RUNTIME

log = logging.getLogger(__name__)


def _webhook_certs(names: list[str]) -> certs.WebhookCerts:
    """The webhook's certificate files: from the shared Secret (made or renewed here, or issued by
    cert-manager) when ``webhook_cert_secret`` is set, else made in ``cert_dir``."""
    if not RUNTIME.settings.webhook_cert_secret:
        return certs.ensure_webhook_certs(RUNTIME.settings.cert_dir, names)
    ns, name = RUNTIME.settings.webhook_cert_secret.split("/", 1)
    data = kube.ensure_tls_secret(ns, name, lambda d: certs.certs_usable(d, names), lambda: certs.make_webhook_certs(names),
                                  managed=RUNTIME.settings.webhook_cert_managed)
    RUNTIME.webhook_cert.update(names=names, data=data)
    return certs.write_webhook_certs(RUNTIME.settings.cert_dir, data)


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
    if not RUNTIME.settings.webhook_cert_secret or not RUNTIME.settings.webhook_addr:
        return

    async def loop() -> None:
        ns, name = RUNTIME.settings.webhook_cert_secret.split("/", 1)
        while True:
            await asyncio.sleep(60 if RUNTIME.settings.webhook_cert_managed else 6 * 3600)
            current = await asyncio.to_thread(kube.read_secret_data, ns, name)
            if webhook_cert_stale(current, RUNTIME.webhook_cert["names"], RUNTIME.webhook_cert["data"]):
                log.warning("the webhook certificate in Secret %s changed or expires soon: restarting", RUNTIME.settings.webhook_cert_secret)
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
                error = await asyncio.to_thread(shards.claim_ray_cluster, RUNTIME.settings)
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
    settings.execution.max_workers = RUNTIME.settings.workers  # bounded reconcile concurrency
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
    settings.peering.lifetime = RUNTIME.settings.peering_lifetime_seconds
    settings.peering.stealth = True  # no log line per keep-alive
    ns, name = RUNTIME.settings.approval_key_secret.split("/", 1)
    RUNTIME.key = kube.ensure_key_secret(ns, name)
    if RUNTIME.settings.webhook_addr:
        _start_admission()
    log.info("rlops operator settings: %s", RUNTIME.settings)


def _start_admission() -> None:
    """The approval webhook: its server in a thread of its own (``rl_operator.admission``), then
    the MutatingWebhookConfiguration ``rlops.dev`` (a shard's: ``<shard>.rlops.dev``, for its
    namespaces only) pointed at it (through the Service when
    ``webhook_service`` is set, else by URL), with this certificate's CA."""
    host = RUNTIME.settings.webhook_host or RUNTIME.settings.webhook_addr or ""
    names, service = [host, RUNTIME.settings.webhook_addr or ""], None
    if RUNTIME.settings.webhook_service:  # the API server calls it by the Service's name only
        service = certs.service_ref(RUNTIME.settings.webhook_service)
        names = [f"{service[1]}.{service[0]}.svc", f"{service[1]}.{service[0]}.svc.cluster.local"]
    files = _webhook_certs(names)
    server = admission.AdmissionServer(RUNTIME.settings.webhook_addr or "", RUNTIME.settings.webhook_port, str(files.cert),
                                       str(files.key), lambda request: admission.decide(request, RUNTIME.key),
                                       client_ca=RUNTIME.settings.webhook_client_ca)
    server.start()
    RUNTIME.admission = server
    if RUNTIME.settings.shard and kube.delete_webhook_configuration(admission.CONFIGURATION):
        # the single operator's configuration (every namespace, failing closed) would send this
        # shard's Rollouts to an operator that shards replace: it goes
        log.warning("deleted the MutatingWebhookConfiguration %s of the operator of every namespace: shard %s "
                    "serves %s", admission.CONFIGURATION, RUNTIME.settings.shard, ", ".join(RUNTIME.settings.namespaces))
    kube.apply_mutating_webhook_configuration(admission.configuration(admission.client_config(
        files.ca.read_bytes(), url=f"https://{host}:{RUNTIME.settings.webhook_port}", service=service),
        RUNTIME.settings.shard, RUNTIME.settings.namespaces))


@kopf.on.cleanup()
def stop_admission(**_: Any) -> None:
    server, RUNTIME.admission = RUNTIME.admission, None
    if server is not None:
        server.stop()


def _refresh_tokens() -> None:
    """Re-read the receiver's bearer tokens from their Secrets (blocking; run in a thread)."""
    for which, ref in (("alert", RUNTIME.settings.alert_token_secret), ("audit", RUNTIME.settings.audit_token_secret)):
        if which == "audit" and not RUNTIME.settings.audit_receiver:
            continue
        ns, name = ref.split("/", 1)
        try:
            RUNTIME.tokens[which] = alerts.load_token_from_secret(ns, name)
        except Exception as exc:  # keep the last good token; the receiver answers 503 without one
            log.warning("cannot read the %s token Secret %s: %s", which, ref, exc)


async def _keep_tokens_fresh(period: float = 30.0) -> None:
    while True:  # a rotated Secret takes effect within `period` seconds
        await asyncio.sleep(period)
        await asyncio.to_thread(_refresh_tokens)


@kopf.on.startup()
def start_metrics(**_: Any) -> None:
    if RUNTIME.settings.metrics_addr:
        metrics.serve(RUNTIME.settings.metrics_addr)
        log.info("metrics on http://%s/metrics", RUNTIME.settings.metrics_addr)


@kopf.on.startup()
async def start_alert_receiver(memo: kopf.Memo, **_: Any) -> None:
    if not RUNTIME.settings.alert_receiver:
        return
    host, port = RUNTIME.settings.alert_receiver.rsplit(":", 1)
    await asyncio.to_thread(_refresh_tokens)
    memo.token_refresher = asyncio.create_task(_keep_tokens_fresh())
    memo.receiver = await alerts.start_receiver(host, int(port), lambda: RUNTIME.tokens["alert"], receivers.on_alert)


@kopf.on.startup()
async def start_audit_receiver(memo: kopf.Memo, **_: Any) -> None:
    if not RUNTIME.settings.audit_receiver:
        return
    host, port = RUNTIME.settings.audit_receiver.rsplit(":", 1)
    files = await asyncio.to_thread(certs.ensure_webhook_certs, RUNTIME.settings.audit_cert_dir or
                                    f"{RUNTIME.settings.cert_dir}/audit", [host])
    await asyncio.to_thread(_refresh_tokens)
    if getattr(memo, "token_refresher", None) is None:
        memo.token_refresher = asyncio.create_task(_keep_tokens_fresh())
    memo.audit_receiver = await alerts.start_audit_receiver(host, int(port), lambda: RUNTIME.tokens["audit"],
                                                            receivers.on_impersonated_approval, certfile=str(files.cert),
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


def read_kill_switch() -> str | None:
    """The kill switch's reason if its ConfigMap says ``engaged: "true"``, else None.

    Raises:
        kubernetes ApiException: the API server could not be asked (not a 404: no ConfigMap is
        a lifted switch).
    """
    data = kube.read_configmap_data(RUNTIME.settings.operator_namespace, RUNTIME.settings.kill_switch_configmap) or {}
    if str(data.get("engaged", "")).strip().lower() not in ("true", "1", "yes"):
        return None
    return (data.get("reason") or "").strip()[:200] or "no reason given"


def note_kill_switch(reason: str | None) -> bool:
    """Record the switch's state; True when it changed."""
    if reason == RUNTIME.kill_switch:
        return False
    RUNTIME.kill_switch = reason
    metrics.KILL_SWITCH.set(1 if reason is not None else 0)
    if reason is not None:
        log.warning("kill switch ENGAGED (ConfigMap %s/%s): every Rollout frozen, traffic on stable: %s",
                    RUNTIME.settings.operator_namespace, RUNTIME.settings.kill_switch_configmap, reason)
    else:
        log.warning("kill switch lifted (ConfigMap %s/%s): Rollouts resume", RUNTIME.settings.operator_namespace,
                    RUNTIME.settings.kill_switch_configmap)
    return True


async def watch_kill_switch() -> None:
    """Read the kill switch every ``kill_switch_poll_seconds``; when it changes, reconcile every
    unfinished Rollout at once (on the replica that works): engaged, those in progress move all
    traffic to stable; lifted, they resume their step, and those that waited start."""
    while True:
        await asyncio.sleep(RUNTIME.settings.kill_switch_poll_seconds)
        try:
            reason = await asyncio.to_thread(read_kill_switch)
        except Exception as exc:  # the API server unreachable for a moment: the state stays as it was
            log.warning("cannot read the kill switch: %s", exc)
            continue
        if not note_kill_switch(reason) or not RUNTIME.working:
            continue
        for ro in cache.every(m.Rollout.PLURAL):
            if m.rollout_phase(ro) not in m.ROLLOUT_TERMINAL:
                await asyncio.to_thread(_reconcile_quietly, ro["metadata"]["namespace"], ro["metadata"]["name"])


def _reconcile_quietly(namespace: str, name: str) -> None:
    try:
        rollouts.reconcile_rollout(namespace, name)
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
        if not (RUNTIME.working and cache.INDEXED.is_set()):
            replayed = False
            continue
        try:
            client = await common.nats()
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


async def _this_replica_works(settings: kopf.OperatorSettings) -> bool:
    """Whether this replica is the one that works (always, standalone; by the peering records)."""
    if settings.peering.standalone:
        return True
    if peering.IDENTITY is None:
        return False
    records = await asyncio.to_thread(peering.read_records, settings.peering.name)
    return peering.works(records, peering.IDENTITY, settings.peering.priority, datetime.now(timezone.utc))


async def _resync_runs(settings: kopf.OperatorSettings) -> None:
    """Every ``resync_seconds``: note whether this replica works (:attr:`Runtime.working`), and
    if it does, reconcile each unfinished TrainingRun again."""
    working: bool | None = None
    while True:
        await asyncio.sleep(RUNTIME.settings.resync_seconds)
        try:
            works = await _this_replica_works(settings)
        except Exception as exc:  # the API server unreachable for a moment: the next round
            log.warning("resync skipped: cannot read the peering records: %s", exc)
            continue
        RUNTIME.working = works
        if works != working:
            working = works
            log.info("resync of unfinished TrainingRuns: %s", "this replica works" if works else
                     "standing by (another replica works)")
        if not works or not cache.INDEXED.is_set():  # a replica that has just taken over lists first
            continue
        for namespace, name in cache.unfinished_runs():  # on the event loop: kopf's indexes change there
            await asyncio.to_thread(runs.resync_run, namespace, name)


async def _resync_triggers() -> None:
    """The triggers that need the clock or another service (a schedule, a wait, the live
    reward in Prometheus, the trajectories in NATS), on a loop of their own: a service that
    answers slowly delays them, never the resync of the runs."""
    while True:
        await asyncio.sleep(RUNTIME.settings.resync_seconds)
        if not RUNTIME.working or not cache.INDEXED.is_set():
            continue
        for namespace, name in cache.agents_with_triggers():  # a scheduled time came; a wait ended
            await asyncio.to_thread(agents.resync_triggers, namespace, name)
        try:
            await agents.resync_trajectory_triggers()
        except Exception as exc:  # the next round
            log.warning("resync of the trajectory triggers failed: %s", exc)


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
    memo.resync = asyncio.create_task(_resync_runs(settings))
    memo.triggers = asyncio.create_task(_resync_triggers())
    RUNTIME.working = bool(settings.peering.standalone)  # with peering: from the loop's first round
    try:  # before any handler runs: no Rollout moves traffic while the switch is engaged
        note_kill_switch(await asyncio.to_thread(read_kill_switch))
    except Exception as exc:
        log.warning("cannot read the kill switch at start: %s", exc)
    memo.kill_switch = asyncio.create_task(watch_kill_switch())
    if RUNTIME.settings.nats_url and RUNTIME.settings.nats_events:
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
