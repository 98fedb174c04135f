"""The receivers' callbacks: Alertmanager's alerts (confirmed by Prometheus) abort a canary;
the audit log names who really made an impersonated approval."""

from __future__ import annotations

import asyncio
import logging



from rl_operator import alerts, analysis, approvals, audit, cache, kube, metrics, objects, shards
from rl_operator import models as m
from rl_operator.handlers import common, rollouts
from rl_operator.handlers.runtime import RUNTIME

log = logging.getLogger(__name__)


async def on_alert(target: alerts.AlertTarget) -> None:
    """Alertmanager receiver callback: a firing alert naming an RLAgent aborts its canary, once
    Prometheus confirms that it fires (``analysis.alert_firing``: an alert posted to
    Alertmanager's API by hand changes nothing). An agent outside this operator's namespaces is
    another shard's: left alone."""
    if not shards.serves(RUNTIME.settings, target.namespace):
        metrics.ALERTS.labels("other_shard").inc()
        log.warning("alert %s for %s/%s: not a namespace this operator serves (%s); ignored", target.alertname,
                    target.namespace, target.agent, ", ".join(RUNTIME.settings.namespaces))
        return
    try:  # anyone who reaches Alertmanager's API can post an alert: Prometheus must say it fires
        confirmed = await asyncio.to_thread(analysis.alert_firing, RUNTIME.settings.prometheus_url, target.labels)
        doubt = "" if confirmed else f"Prometheus at {RUNTIME.settings.prometheus_url} has no firing ALERTS series with its labels"
    except analysis.AnalysisError as exc:
        confirmed, doubt = False, f"Prometheus could not be asked: {exc}"
    if not confirmed:
        metrics.ALERTS.labels("unconfirmed").inc()
        log.warning("alert %s for %s/%s not acted on: %s (labels %s)", target.alertname, target.namespace,
                    target.agent, doubt, target.labels)
        return
    reason = f"alert {target.alertname} firing" + (f": {target.summary}" if target.summary else "")
    name = await asyncio.to_thread(rollouts.abort_agent_rollout, target.namespace, target.agent, reason)
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
        common.post(ro, [objects.Event("Warning", "ApprovedWithImpersonation",
                                  f"{record.user} approved as {record.impersonated} (impersonation, audit ID "
                                  f"{record.audit_id})")])
    return True


async def on_impersonated_approval(record: audit.ImpersonatedApproval) -> None:
    """Audit webhook callback (``alerts.start_receiver``); Rollouts outside this operator's
    namespaces are another shard's."""
    if not shards.serves(RUNTIME.settings, record.namespace):
        return
    if await asyncio.to_thread(record_impersonation, record):
        log.warning("%s/%s: approved by %s impersonating %s", record.namespace, record.name, record.user,
                    record.impersonated)
        await asyncio.to_thread(rollouts.reconcile_rollout, record.namespace, record.name)
