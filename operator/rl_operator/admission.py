"""The approval webhook's server and its MutatingWebhookConfiguration, out of reconcile's way.

Why not kopf's admission server: kopf serves webhooks on the operator's event loop and runs a
sync handler in the executor that every reconcile shares. With hundreds of agents in flight
the review queued behind reconciles, the API server's call timed out, and the webhook (which
fails closed) refused the operator's own writes. Here the server has its own thread, its own
event loop and its own small thread pool, so no reconcile load can starve it.

And the API server calls it only when it matters: the configuration carries a CEL
``matchCondition`` (GA in Kubernetes 1.30) that is true only when one of the reviewed
annotations (:data:`REVIEWED`) is added, changed or removed. Status writes, spec writes and
other annotations never reach the webhook; the ``rollouts/status`` subresource is not in its
rules at all.

The review itself is :func:`decide`: the pure rule :func:`rl_operator.approvals.review`, plus a
SubjectAccessReview and, for a ServiceAccount's decision, the agent's allowed ServiceAccounts,
through the Kubernetes adapter; the operator hands it to :class:`AdmissionServer`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from rl_operator import approvals, kube, metrics
from rl_operator import models as m

log = logging.getLogger(__name__)

CONFIGURATION = m.GROUP  # MutatingWebhookConfiguration "rlops.dev" (the chart's RBAC names it)
WEBHOOK = f"approval.{m.GROUP}"
PATH = "/approval"
#: The annotations the webhook reviews: an approval, rejection or promotion, and the record it writes.
REVIEWED = (*approvals.DECISIONS, *approvals.RECORDED)
#: Seconds the API server waits for an answer (then the request fails: failurePolicy Fail).
TIMEOUT_SECONDS = 10


class Denied(Exception):
    """The review refuses the request; ``code`` is the HTTP status the API server reports."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.message, self.code = message, code


#: review(request) -> the annotations to set (a value of None removes the key); raises Denied.
Review = Callable[[dict[str, Any]], dict[str, str | None]]


def match_expression(keys: tuple[str, ...] = REVIEWED) -> str:
    """The CEL condition under which the API server calls the webhook: on CREATE, when the new
    object carries one of ``keys``; on UPDATE, when one of them is added, removed or changed.

    Presence and value are compared separately (no stand-in value for "absent" that a user could
    write to look unchanged).
    """
    def has(obj: str, key: str) -> str:
        return f"(has({obj}.metadata.annotations) && '{key}' in {obj}.metadata.annotations)"

    on_create = " || ".join(has("object", k) for k in keys)
    on_update = " || ".join(
        f"{has('object', k)} != {has('oldObject', k)} || ({has('object', k)} && {has('oldObject', k)} && "
        f"object.metadata.annotations['{k}'] != oldObject.metadata.annotations['{k}'])" for k in keys)
    return f"request.operation == 'CREATE' ? ({on_create}) : ({on_update})"


def client_config(ca_pem: bytes, *, url: str | None = None, service: tuple[str, str, int] | None = None
                  ) -> dict[str, Any]:
    """How the API server reaches the server: a Service ``(namespace, name, port)`` in a
    cluster, else an HTTPS ``url`` (base, without :data:`PATH`); ``ca_pem`` is the CA bundle."""
    out: dict[str, Any] = {"caBundle": base64.b64encode(ca_pem).decode()}
    if service is not None:
        namespace, name, port = service
        out["service"] = {"namespace": namespace, "name": name, "port": port, "path": PATH}
    elif url:
        out["url"] = url.rstrip("/") + PATH
    else:
        raise ValueError("a webhook client config needs a Service or a URL")
    return out


def configuration_name(shard: str | None = None) -> str:
    """The configuration's name: ``rlops.dev``, or ``<shard>.rlops.dev`` for one shard of
    several (each shard's webhook reviews its own namespaces)."""
    return f"{shard}.{CONFIGURATION}" if shard else CONFIGURATION


def configuration(client: dict[str, Any], shard: str | None = None, namespaces: tuple[str, ...] = ()
                  ) -> dict[str, Any]:
    """The ``MutatingWebhookConfiguration`` named :func:`configuration_name`: Rollout CREATE and
    UPDATE, failing closed, called only under :func:`match_expression`; with ``namespaces``,
    only for Rollouts in those namespaces (a ``namespaceSelector`` on their names)."""
    selector = ({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                                       "values": sorted(namespaces)}]} if namespaces else {})
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": configuration_name(shard), "labels": {"app.kubernetes.io/part-of": "rlops"}},
        "webhooks": [{
            "name": WEBHOOK,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "reinvocationPolicy": "Never",
            "timeoutSeconds": TIMEOUT_SECONDS,
            "rules": [{"apiGroups": [m.GROUP], "apiVersions": ["*"], "resources": [m.Rollout.PLURAL],
                       "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}],
            "matchConditions": [{"name": "approval-annotations-change", "expression": match_expression()}],
            "namespaceSelector": selector,
            "clientConfig": client,
        }],
    }


def json_patch(annotations: dict[str, str] | None, changes: dict[str, str | None]) -> list[dict[str, Any]]:
    """RFC 6902 operations that apply ``changes`` (None removes) to an object whose current
    annotations are ``annotations`` (None: the object has no annotations map)."""
    ops: list[dict[str, Any]] = []
    current = annotations
    for key, value in changes.items():
        path = "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")
        if value is None:
            if current is not None and key in current:
                ops.append({"op": "remove", "path": path})
            continue
        if current is None:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
            current = {}
        ops.append({"op": "add", "path": path, "value": value})
    return ops


def answer(review: dict[str, Any], decide: Review) -> dict[str, Any]:
    """The ``AdmissionReview`` response to ``review`` (an ``admission.k8s.io/v1`` AdmissionReview):
    allowed with a JSONPatch of the annotations ``decide`` returns, or refused with its
    :class:`Denied` message and code. Raises ValueError when ``review`` has no request."""
    request = review.get("request")
    if not isinstance(request, dict) or "uid" not in request:
        raise ValueError("not an AdmissionReview: no request.uid")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    try:
        with metrics.admission():
            changes = decide(request)
    except Denied as exc:
        response.update(allowed=False, status={"code": exc.code, "message": exc.message})
    except Exception as exc:  # noqa: BLE001 - fail closed, and say why, instead of an HTTP 500
        log.exception("approval review of %s/%s failed", request.get("namespace"), request.get("name"))
        response.update(allowed=False, status={"code": 500, "message": f"approval review failed: {exc}"})
    else:
        obj = request.get("object") or {}
        ops = json_patch(obj.get("metadata", {}).get("annotations"), changes)
        if ops:
            response.update(patchType="JSONPatch", patch=base64.b64encode(json.dumps(ops).encode()).decode())
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


class AdmissionServer:
    """The webhook's HTTPS server in a thread of its own, with its own event loop and a pool of
    ``workers`` threads for the reviews (a review makes a SubjectAccessReview call). With
    ``client_ca`` (a PEM file), a caller must present a client certificate signed by that CA (the
    API server's, configured in its AdmissionConfiguration): the TLS handshake fails for anyone
    else, so nobody but the API server gets a review (and its signature) or spends its
    SubjectAccessReviews.

    At most ``workers + max_waiting`` reviews are in hand at once (each waiting one holds its
    body); a review beyond that is refused at once, code 429, without a SubjectAccessReview: a
    flood delays no approval for longer than the reviews already in hand take, and fails closed.

    ``POST /approval``: an AdmissionReview; answered by :func:`answer`. ``GET /healthz``: 200.
    """

    def __init__(self, host: str, port: int, certfile: str, keyfile: str, decide: Review, *, workers: int = 4,
                 client_max_size: int = 4 * 1024 * 1024, client_ca: str | None = None, max_waiting: int = 32):
        self.host, self.port = host, port
        self._capacity, self._in_hand = workers + max_waiting, 0  # _in_hand: only the loop's thread touches it
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.load_cert_chain(certfile, keyfile)
        if client_ca:  # only the API server (its client certificate, signed by this CA) may call
            self._ssl.verify_mode = ssl.CERT_REQUIRED
            self._ssl.load_verify_locations(client_ca)
        self._decide = decide
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlops-admission")
        self._client_max_size = client_max_size
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rlops-admission-loop", daemon=True)
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        async def review(request: web.Request) -> web.Response:
            try:
                body = json.loads(await request.read())
                if not isinstance(body, dict):
                    raise ValueError("the body is not a JSON object")
                if self._in_hand >= self._capacity:
                    return web.json_response(answer(body, self._busy))
                self._in_hand += 1
                try:
                    out = await asyncio.get_running_loop().run_in_executor(self._pool, answer, body, self._decide)
                finally:
                    self._in_hand -= 1
            except web.HTTPRequestEntityTooLarge:
                return web.json_response({"error": f"body larger than {self._client_max_size} bytes"}, status=413)
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                return web.json_response({"error": f"bad AdmissionReview: {exc}"}, status=400)
            return web.json_response(out)

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = web.Application(client_max_size=self._client_max_size)
        app.router.add_post(PATH, review)
        app.router.add_get("/healthz", healthz)
        return app

    def _busy(self, _request: dict[str, Any]) -> dict[str, str | None]:
        raise Denied(f"the rlops approval webhook has {self._capacity} reviews in hand; retry in a few seconds",
                     code=429)

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl).start()

    def start(self, timeout: float = 30.0) -> None:
        """Start the thread and listen; raises what binding the port raised (OSError)."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout)
        log.info("approval webhook listening on https://%s:%s%s (own thread and event loop)", self.host, self.port, PATH)

    def stop(self, timeout: float = 10.0) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- the review


def decide(request: dict[str, Any], key: bytes | None) -> dict[str, str | None]:
    """The approval webhook's review of one Rollout CREATE or UPDATE (an AdmissionReview's
    ``request``): approvals name the artifact's fingerprint and come from users with the
    ``approve`` verb. Returns the annotations to record (None removes one); raises
    :class:`Denied` (400 malformed or mismatched, 403 no RBAC verb). ``key``: the operator's
    signing key (None: not loaded yet; every approval is refused).

    Failing closed, and registered while the operator is down (the configuration stays): no
    approval can bypass this check. It records (and signs) the approver; the
    ValidatingAdmissionPolicies in ``manifests/base/admission-policies.yaml`` hold the verbs even
    without it.
    """
    body = request.get("object") or {}
    old = request.get("oldObject")
    userinfo = request.get("userInfo") or {}
    namespace = request.get("namespace") or body.get("metadata", {}).get("namespace", "")
    name = request.get("name") or body.get("metadata", {}).get("name", "")
    old_ann = dict(old.get("metadata", {}).get("annotations") or {}) if old else None
    new_ann = dict(body.get("metadata", {}).get("annotations") or {})
    allowed_sas: tuple[str, ...] = ()
    # the agent's allowedServiceAccounts matter for a ServiceAccount's decision only: read fresh
    # from the API server (never the cache), and only then
    if approvals.decisions(old_ann, new_ann) and str(userinfo.get("username", "")).startswith(m.SERVICE_ACCOUNT_PREFIX):
        agent = kube.get_custom(namespace, m.RLAgent.PLURAL, body["spec"]["agentRef"]["name"])
        if agent is not None:
            allowed_sas = tuple(m.RLAgentSpec.model_validate(agent["spec"]).approval.allowed_service_accounts)
    target = approvals.Target(namespace=namespace, name=name, uid=body.get("metadata", {}).get("uid", ""),
                              fingerprint=body.get("spec", {}).get("fingerprint", ""), allowed_service_accounts=allowed_sas,
                              evidence=(body.get("spec", {}).get("evaluation") or {}).get("signature") or "")
    who = approvals.Requester(user=userinfo.get("username", ""), impersonator=approvals.impersonator(userinfo))
    verdict = approvals.review(old_ann, new_ann, target, who, datetime.now(timezone.utc), key)
    if verdict.error:
        raise Denied(verdict.error, code=400)
    if verdict.permission:
        allowed, why = kube.subject_access_review(approvals.sar_body(userinfo, namespace, name, verdict.permission))
        if not allowed:
            raise Denied(
                f"user {userinfo.get('username')!r} may not {verdict.permission} rollouts.rlops.dev in namespace "
                f"{namespace!r}: setting {', '.join(approvals.decisions(old_ann, new_ann))} needs the RBAC verb "
                f"'{verdict.permission}' (e.g. ClusterRole rlops-approver){': ' + why if why else ''}", code=403)
    return dict(verdict.annotations)
