"""The Alertmanager adapter: the webhook receiver that turns firing rollback alerts into aborts.

Alertmanager (route ``rlops_action="rollback"``, grouped by ``namespace`` and ``rlagent``; see
``docs/alerting.md``) POSTs its webhook payload (version ``"4"``) to ``POST /api/v1/alerts`` with
``Authorization: Bearer <token>``. Each **firing** alert that names an RLAgent (labels
``namespace`` and ``rlagent``) becomes an :class:`AlertTarget` handed to the operator's
``on_alert`` callback, which aborts that agent's canary once Prometheus confirms that the alert
really fires (its ``ALERTS`` series: anyone who can reach Alertmanager's API can post an alert). Resolved alerts do nothing: a rollback
is not undone when the error rate recovers.

Two parts:

- pure: :class:`WebhookPayload` (the payload's pydantic model), :func:`classify` and
  :func:`targets` (payload -> targets; no I/O);
- I/O at the edges: :func:`start_receiver` (aiohttp server) and :func:`load_token_from_secret`
  (the bearer token from a Kubernetes Secret, through the official ``kubernetes`` client).

Payload format: Alertmanager's webhook_config documentation ("The Alertmanager will send HTTP POST
requests in the following JSON format"), unchanged as version ``"4"`` since Alertmanager 0.9.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rl_operator import audit

log = logging.getLogger(__name__)

#: Where the receiver listens for Alertmanager's webhook.
ALERTS_PATH = "/api/v1/alerts"
AUDIT_PATH = "/api/v1/audit"
#: The Secret holding the bearer token Alertmanager sends (``credentials_file`` on its side).
TOKEN_SECRET_NAMESPACE = "rlops-system"
TOKEN_SECRET_NAME = "rlops-alertmanager"
TOKEN_SECRET_KEY = "token"
#: Alert labels naming the RLAgent (``rlagent`` is set by the rule from the metric's ``agent``).
NAMESPACE_LABEL = "namespace"
AGENT_LABEL = "rlagent"
VERSION_LABEL = "version"
#: The only webhook payload version this receiver understands.
PAYLOAD_VERSION = "4"


# ----------------------------------------------------------------------------- pure part


class _Wire(BaseModel):
    # Alertmanager may add fields in later versions: ignore what we do not know.
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class Alert(_Wire):
    """One alert of a webhook notification."""

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: datetime = Field(alias="startsAt")
    ends_at: datetime | None = Field(default=None, alias="endsAt")
    """``0001-01-01T00:00:00Z`` while firing (Alertmanager's zero time)."""
    generator_url: str = Field(default="", alias="generatorURL")
    fingerprint: str = ""
    """Alertmanager's hash of the alert's labels: stable across notifications of one alert."""


class WebhookPayload(_Wire):
    """Alertmanager's webhook notification body (version ``"4"``): one group of alerts."""

    version: Literal["4"]
    group_key: str = Field(default="", alias="groupKey")
    truncated_alerts: int = Field(default=0, alias="truncatedAlerts")
    status: Literal["firing", "resolved"]
    receiver: str = ""
    group_labels: dict[str, str] = Field(default_factory=dict, alias="groupLabels")
    common_labels: dict[str, str] = Field(default_factory=dict, alias="commonLabels")
    common_annotations: dict[str, str] = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field(default="", alias="externalURL")
    alerts: list[Alert]


@dataclass(frozen=True)
class AlertTarget:
    """A firing alert naming one RLAgent: what the operator rolls back."""

    namespace: str
    agent: str
    """The RLAgent's name (alert label ``rlagent``)."""
    alertname: str
    summary: str
    """The alert's ``summary`` annotation ("" if none)."""
    starts_at: datetime
    fingerprint: str
    version: str | None = None
    """The serving version the alert is about (label ``version``), if the rule carries one."""
    labels: dict[str, str] = field(default_factory=dict)
    """All the alert's labels: the operator asks Prometheus for the ``ALERTS`` series with these
    (``analysis.alert_firing``) before it acts, so that an alert posted to Alertmanager's API by
    hand changes nothing."""

    def wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["starts_at"] = self.starts_at.isoformat()
        return d


@dataclass(frozen=True)
class Classified:
    """A payload's alerts, sorted by what the receiver does with them."""

    matched: list[AlertTarget] = field(default_factory=list)
    """Firing alerts with ``namespace`` and ``rlagent`` labels: rolled back."""
    unmatched: list[Alert] = field(default_factory=list)
    """Firing alerts missing one of those labels: logged and ignored."""
    resolved: list[Alert] = field(default_factory=list)
    """Resolved alerts: ignored (a rollback is not undone)."""


def classify(payload: WebhookPayload) -> Classified:
    """Sort a payload's alerts into matched targets, unmatched firing alerts and resolved alerts.

    Alerts are classified one by one (a group's ``status`` is ``firing`` while any of its alerts
    fires). Order is kept; nothing is deduplicated (an agent whose two versions both fire yields
    two targets: the ``on_alert`` callback must be idempotent anyway, since Alertmanager repeats
    notifications).
    """
    out = Classified()
    for alert in payload.alerts:
        if alert.status == "resolved":
            out.resolved.append(alert)
            continue
        namespace, agent = alert.labels.get(NAMESPACE_LABEL), alert.labels.get(AGENT_LABEL)
        if not namespace or not agent:
            out.unmatched.append(alert)
            continue
        out.matched.append(AlertTarget(
            namespace=namespace,
            agent=agent,
            alertname=alert.labels.get("alertname", ""),
            summary=alert.annotations.get("summary", ""),
            starts_at=alert.starts_at,
            fingerprint=alert.fingerprint,
            version=alert.labels.get(VERSION_LABEL) or None,
            labels=dict(alert.labels),
        ))
    return out


def targets(payload: WebhookPayload) -> list[AlertTarget]:
    """The firing alerts of ``payload`` that name an RLAgent; unmatched ones are logged."""
    classified = classify(payload)
    _log_unmatched(classified.unmatched)
    return classified.matched


def _log_unmatched(alerts: list[Alert]) -> None:
    for alert in alerts:
        log.warning("ignoring firing alert %s without %r and %r labels: %s",
                    alert.labels.get("alertname", "?"), NAMESPACE_LABEL, AGENT_LABEL, alert.labels)


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line message naming each problem: ``invalid JSON: ...`` or ``alerts.0.status: ...``."""
    problems = []
    for err in exc.errors(include_url=False)[:10]:
        if err["type"] == "json_invalid":
            return f"invalid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
        where = ".".join(str(p) for p in err["loc"]) or "body"
        problems.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(problems)
    return "invalid webhook payload: " + "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


# ----------------------------------------------------------------------------- HTTP part


@dataclass
class ReceiverStats:
    """Counters of one receiver, for logs, tests and ``GET /healthz``."""

    notifications: int = 0
    """Authenticated, well-formed notifications."""
    unauthorized: int = 0
    """Requests refused with 401 (missing or wrong bearer token)."""
    unconfigured: int = 0
    """Requests refused with 503 (no token configured)."""
    malformed: int = 0
    """Requests refused with 400 (bad JSON or schema)."""
    callbacks_ok: int = 0
    callbacks_failed: int = 0
    audit_events: int = 0
    """Audit events received on ``POST /api/v1/audit``."""


#: ``runner.app[STATS]``: the receiver's :class:`ReceiverStats`.
STATS = web.AppKey("rlops_alert_stats", ReceiverStats)

OnAlert = Callable[[AlertTarget], Awaitable[None]]
OnAudit = Callable[[audit.ImpersonatedApproval], Awaitable[None]]


def _bearer(request: web.Request) -> bytes | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip().encode()


def _refuse_unauthorized(request: web.Request, token: Callable[[], str | None], stats: ReceiverStats,
                         what: str) -> web.Response | None:
    """The 503/401 answer when the request's bearer token is not ``token()``; None when it is."""
    try:
        expected = (token() or "").strip()
    except Exception:  # a broken token source must not become a 500 with a traceback
        log.exception("reading the %s token failed", what)
        expected = ""
    if not expected:
        stats.unconfigured += 1
        log.error("%s from %s refused: no %s token configured", what, request.remote, what)
        return web.json_response({"error": f"no {what} token configured"}, status=503)
    presented = _bearer(request)
    if presented is None or not hmac.compare_digest(presented, expected.encode()):
        stats.unauthorized += 1
        log.warning("%s from %s refused: %s bearer token", what, request.remote,
                    "missing" if presented is None else "wrong")
        return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="rlops"'})
    return None


def make_app(token: Callable[[], str | None], on_alert: OnAlert, *,
             callback_timeout: float = 8.0, client_max_size: int = 4 * 1024 * 1024) -> web.Application:
    """The receiver's aiohttp application (see :func:`start_receiver`)."""
    stats = ReceiverStats()

    async def receive_alerts(request: web.Request) -> web.Response:
        refusal = _refuse_unauthorized(request, token, stats, "alert")
        if refusal is not None:
            return refusal
        try:
            body = await request.read()
            payload = WebhookPayload.model_validate_json(body)
        except web.HTTPRequestEntityTooLarge:
            stats.malformed += 1
            return web.json_response({"error": f"body larger than {client_max_size} bytes"}, status=413)
        except ValidationError as exc:
            stats.malformed += 1
            message = describe_validation_error(exc)
            log.warning("alert from %s refused: %s", request.remote, message)
            return web.json_response({"error": message}, status=400)

        stats.notifications += 1
        classified = classify(payload)
        _log_unmatched(classified.unmatched)
        matched = []
        for target in classified.matched:
            entry = target.wire()
            where = f"alert {target.alertname} for {target.namespace}/{target.agent}"
            try:
                await asyncio.wait_for(on_alert(target), timeout=callback_timeout)
            except TimeoutError:
                entry.update(ok=False, error=f"TimeoutError: on_alert took longer than {callback_timeout}s")
                log.error("%s: callback timed out after %ss", where, callback_timeout)
            except Exception as exc:  # one failed abort must not hide the others
                entry.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                log.exception("%s: callback failed", where)
            else:
                entry["ok"] = True
                log.info("%s (version %s): rollback requested: %s", where, target.version, target.summary)
            if entry["ok"]:
                stats.callbacks_ok += 1
            else:
                stats.callbacks_failed += 1
            matched.append(entry)
        return web.json_response({
            "matched": matched,
            "unmatched": len(classified.unmatched),
            "resolved": len(classified.resolved),
            "failed": sum(1 for m in matched if not m["ok"]),
        })

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "stats": asdict(stats)})

    app = web.Application(client_max_size=client_max_size)
    app[STATS] = stats
    app.router.add_post(ALERTS_PATH, receive_alerts)
    app.router.add_get("/healthz", healthz)
    return app


async def start_receiver(host: str, port: int, token: Callable[[], str | None], on_alert: OnAlert,
                         *, callback_timeout: float = 8.0) -> web.AppRunner:
    """Serve Alertmanager's webhook on ``http://host:port`` until ``await runner.cleanup()``.

    Routes:

    - ``POST /api/v1/alerts``: the webhook. ``Authorization: Bearer <token()>`` is required
      (compared with :func:`hmac.compare_digest`): 401 if missing or wrong, 503 if ``token()``
      gives nothing (no Secret yet). A body that is not JSON or not a version-4 payload: 400
      with ``{"error": "<the problem, naming the field>"}``. Otherwise ``on_alert(target)`` is
      awaited for each firing target, in order, each within ``callback_timeout`` seconds; an
      exception (or timeout) is logged and reported as that entry's ``error``, and the others still
      run. Answer 200: ``{"matched": [{namespace, agent, alertname, summary, starts_at,
      fingerprint, version, ok, error?}, ...], "unmatched": n, "resolved": n, "failed": n}``.
      Alertmanager retries only 5xx answers; a failed callback is re-delivered with the group's
      next notification (``repeat_interval``), so ``on_alert`` must be idempotent.
    - ``GET /healthz``: ``{"ok": true, "stats": {...}}`` (:class:`ReceiverStats`).

    Args:
        host, port: where to listen; port 0 picks a free one (see ``runner.addresses``).
        token: called on every request, so it must be cheap (return a cached value); a new
            Secret value takes effect at once. Surrounding whitespace is ignored.
        on_alert: the abort callback. Keep it under ``callback_timeout`` (Alertmanager gives a
            notification attempt max(``group_interval``, 10 s), then tries again later).

    Returns:
        The started runner; ``runner.app[STATS]`` holds the counters.
    """
    runner = await _serve(make_app(token, on_alert, callback_timeout=callback_timeout), host, port)
    log.info("Alertmanager receiver listening on %s%s", _url(runner), ALERTS_PATH)
    return runner


async def _serve(app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
                 ) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def make_audit_app(token: Callable[[], str | None], on_audit: OnAudit, *, callback_timeout: float = 8.0,
                   client_max_size: int = 16 * 1024 * 1024) -> web.Application:
    """The audit receiver's aiohttp application (see :func:`start_audit_receiver`)."""
    stats = ReceiverStats()

    async def receive_audit(request: web.Request) -> web.Response:
        refusal = _refuse_unauthorized(request, token, stats, "audit")
        if refusal is not None:
            return refusal
        try:
            events = audit.parse(await request.read())
        except web.HTTPRequestEntityTooLarge:
            stats.malformed += 1
            return web.json_response({"error": f"body larger than {client_max_size} bytes"}, status=413)
        except ValueError as exc:
            stats.malformed += 1
            log.warning("audit events from %s refused: %s", request.remote, exc)
            return web.json_response({"error": str(exc)}, status=400)
        stats.audit_events += len(events.items)
        records = audit.impersonated_approvals(events)
        for record in records:
            try:
                await asyncio.wait_for(on_audit(record), timeout=callback_timeout)
            except Exception:  # the API server does not re-send a batch it got a 2xx for: log it
                log.exception("recording the impersonated approval of %s/%s failed", record.namespace, record.name)
        return web.json_response({"events": len(events.items), "impersonatedApprovals": len(records)})

    app = web.Application(client_max_size=client_max_size)
    app[STATS] = stats
    app.router.add_post(AUDIT_PATH, receive_audit)
    return app


async def start_audit_receiver(host: str, port: int, token: Callable[[], str | None], on_audit: OnAudit, *,
                               certfile: str | None = None, keyfile: str | None = None,
                               callback_timeout: float = 8.0) -> web.AppRunner:
    """Serve the API server's audit webhook on ``https://host:port`` (plain ``http`` without a
    certificate, for tests only: the API server sends its bearer token over TLS only).

    ``POST /api/v1/audit``: an ``audit.k8s.io/v1`` ``EventList`` with ``Authorization: Bearer
    <token()>`` (401 if missing or wrong, 503 if ``token()`` gives nothing; 400 naming the field
    if the body is not an EventList). ``on_audit(record)`` is awaited for each impersonated
    approval in it (:func:`rl_operator.audit.impersonated_approvals`), each within
    ``callback_timeout`` seconds; failures are logged (the API server does not re-send a batch it
    got a 2xx for). Answer 200 ``{"events": n, "impersonatedApprovals": n}``.

    Returns:
        The started runner; ``runner.app[STATS]`` holds the counters.
    """
    context = None
    if certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile, keyfile)
    runner = await _serve(make_audit_app(token, on_audit, callback_timeout=callback_timeout), host, port, context)
    scheme = "https" if context else "http"
    log.info("audit webhook receiver listening on %s%s", _url(runner).replace("http", scheme, 1), AUDIT_PATH)
    return runner


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


# ----------------------------------------------------------------------------- token


def load_token_from_secret(namespace: str = TOKEN_SECRET_NAMESPACE, name: str = TOKEN_SECRET_NAME,
                           key: str = TOKEN_SECRET_KEY, *, api_client: Any = None) -> str | None:
    """The bearer token stored under ``key`` in Secret ``namespace/name`` (whitespace stripped).

    Uses ``CoreV1Api.read_namespaced_secret`` (synchronous: call it from a thread, or at start-up
    after ``kube.load_config()``; ``api_client`` defaults to the client's global configuration).
    The operator needs ``get`` on that Secret.

    Returns:
        The token, or None if the Secret or its key does not exist or the value is empty.

    Raises:
        ApiException: any API error other than 404 (e.g. 403).
        ValueError: the value is not base64 of UTF-8 text.
    """
    try:
        secret = client.CoreV1Api(api_client).read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            log.warning("alert token Secret %s/%s not found", namespace, name)
            return None
        raise
    encoded = (secret.data or {}).get(key)
    if not encoded:
        log.warning("alert token Secret %s/%s has no key %r", namespace, name, key)
        return None
    try:
        value = base64.b64decode(encoded, validate=True).decode("utf-8").strip()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"Secret {namespace}/{name} key {key!r} is not base64 of UTF-8 text") from exc
    return value or None
