"""The Kubernetes adapter: every call the operator makes to the API server goes through here.

Uses the official ``kubernetes`` client (synchronous; kopf runs sync handlers in threads).
Objects cross this boundary as plain JSON dicts, exactly as the API serves them.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.util.retry import Retry

from rl_operator import models as m

log = logging.getLogger(__name__)


#: Retries of the client library's HTTP layer (urllib3): connection errors, and answers 429 (the
#: API server's rate limiting; its Retry-After is honoured) and 5xx, with exponential backoff
#: (0.25 s, 0.5 s, 1 s, ...). Every write the operator makes is safe to repeat: creates are by
#: name (a repeat gets 409, read as "exists"), status writes carry a resourceVersion or are
#: idempotent merge patches.
RETRIES = Retry(total=5, connect=3, read=2, status=5, backoff_factor=0.25,
                status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                respect_retry_after_header=True, raise_on_status=False)


#: Connections kept open to the API server (urllib3's pool size): more than the reconcile
#: workers, the webhook's threads and the receivers use at once.
POOL_CONNECTIONS = 64


def load_config() -> None:
    """In-cluster service-account credentials when in a pod, else ``$KUBECONFIG`` / ``~/.kube/config``;
    the client retries as :data:`RETRIES` says, over at most :data:`POOL_CONNECTIONS` kept-alive
    connections."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    cfg = client.Configuration.get_default_copy()
    cfg.retries = RETRIES
    cfg.connection_pool_maxsize = POOL_CONNECTIONS
    client.Configuration.set_default(cfg)
    with _shared_lock:
        _shared.clear()  # the next call makes a client with this configuration


_shared: dict[int, client.ApiClient] = {}
_shared_lock = threading.Lock()


def _api() -> client.ApiClient:
    """The process's one ApiClient, shared by every thread (urllib3's pool is thread-safe): its
    connections to the API server stay open across calls. (A new ApiClient per call opened a new
    connection, with a TLS handshake on both ends, for every request: 30% of the operator's CPU
    with 1,000 agents in flight.)"""
    # keyed by the default configuration object: a later load (another kubeconfig) gets a new client
    key = id(getattr(client.Configuration, "_default", None))
    api = _shared.get(key)
    if api is None:
        with _shared_lock:
            api = _shared.get(key)
            if api is None:
                _shared.clear()
                api = _shared[key] = client.ApiClient()
    return api


def _plain(obj: Any) -> dict[str, Any]:
    return _api().sanitize_for_serialization(obj)


def _custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(_api())


def get_custom(namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    """One rlops.dev object, or None if it does not exist."""
    try:
        return _custom().get_namespaced_custom_object(m.GROUP, m.VERSION, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def get_cluster_custom(group: str, version: str, plural: str, name: str) -> dict[str, Any] | None:
    """One cluster-scoped custom object (any group), or None if it does not exist."""
    try:
        return _custom().get_cluster_custom_object(group, version, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def list_custom(namespace: str, plural: str, label_selector: str = "") -> list[dict[str, Any]]:
    result = _custom().list_namespaced_custom_object(
        m.GROUP, m.VERSION, namespace, plural, label_selector=label_selector
    )
    return list(result.get("items", []))


def create_custom_or_get(body: dict[str, Any], plural: str) -> tuple[dict[str, Any], bool]:
    """Create a rlops.dev object; if one with that name exists, return it instead.

    Returns:
        ``(object, created)``.
    """
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        return _custom().create_namespaced_custom_object(m.GROUP, m.VERSION, ns, plural, body), True
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = get_custom(ns, plural, name)
    if existing is None:  # deleted between our create and get: let the next event retry
        raise RuntimeError(f"{plural}/{name} conflicted on create but is gone")
    return existing, False


class Conflict(RuntimeError):
    """A write named a resourceVersion the object no longer has: it was read from a stale copy."""


def patch_status(namespace: str, plural: str, name: str, status: dict[str, Any],
                 resource_version: str | None = None) -> dict[str, Any] | None:
    """Merge-patch the ``status`` subresource of a rlops.dev object. Returns the object, or None
    when it is gone (deleted since it was read, e.g. with its namespace): nothing to record.

    With ``resource_version`` (of the copy the status was computed from) the API server applies
    the patch only to that version of the object; raises :class:`Conflict` otherwise.
    """
    body: dict[str, Any] = {"status": status}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        return _custom().patch_namespaced_custom_object_status(m.GROUP, m.VERSION, namespace, plural, name, body)
    except ApiException as exc:
        if exc.status == 404:
            return None
        if exc.status == 409 and resource_version:
            raise Conflict(f"{plural}/{namespace}/{name} changed since resourceVersion {resource_version}") from exc
        raise


def get_job(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _plain(client.BatchV1Api(_api()).read_namespaced_job(name, namespace))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def create_job_or_get(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create a Job; if one with that name exists, return it instead. Returns ``(job, created)``."""
    ns = body["metadata"]["namespace"]
    try:
        return _plain(client.BatchV1Api(_api()).create_namespaced_job(ns, body)), True
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = get_job(ns, body["metadata"]["name"])
    if existing is None:
        raise RuntimeError(f"jobs/{body['metadata']['name']} conflicted on create but is gone")
    return existing, False


def delete_job(namespace: str, name: str) -> bool:
    """Delete a Job and its pods (background propagation). False if it was gone already."""
    try:
        client.BatchV1Api(_api()).delete_namespaced_job(name, namespace, propagation_policy="Background")
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def delete_custom(namespace: str, plural: str, name: str) -> bool:
    """Delete one rlops.dev object (its children go by garbage collection). False if it was gone."""
    try:
        _custom().delete_namespaced_custom_object(m.GROUP, m.VERSION, namespace, plural, name,
                                                  propagation_policy="Background")
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def list_pods(namespace: str, label_selector: str) -> list[dict[str, Any]]:
    pods = client.CoreV1Api(_api()).list_namespaced_pod(namespace, label_selector=label_selector)
    return [_plain(p) for p in pods.items]


def patch_custom(namespace: str, plural: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """Merge-patch a rlops.dev object (metadata only: the operator never writes a user's spec)."""
    return _custom().patch_namespaced_custom_object(m.GROUP, m.VERSION, namespace, plural, name, body)


def subject_access_review(body: dict[str, Any]) -> tuple[bool, str]:
    """Ask the API server whether a user may do something. Returns ``(allowed, reason)``; raises
    ApiException or a timeout after 5 s (the webhook's review then fails closed, freeing its thread)."""
    result = client.AuthorizationV1Api(_api()).create_subject_access_review(body, _request_timeout=5)
    return bool(result.status.allowed), result.status.reason or ""


def apply_mutating_webhook_configuration(body: dict[str, Any]) -> None:
    """Create the MutatingWebhookConfiguration ``body``, or replace the stored one with it (its
    webhooks whole: a field the new one drops goes; labels merged). Called once per operator
    start: replicas starting at once converge (a conflict is re-read and retried)."""
    api = client.AdmissionregistrationV1Api(_api())
    name = body["metadata"]["name"]
    for _ in range(5):
        try:
            current = _plain(api.read_mutating_webhook_configuration(name))
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                api.create_mutating_webhook_configuration(body)
                return
            except ApiException as exc2:
                if exc2.status != 409:
                    raise
                continue
        labels = {**(current["metadata"].get("labels") or {}), **(body["metadata"].get("labels") or {})}
        try:
            api.replace_mutating_webhook_configuration(name, {**body, "metadata": {**current["metadata"], "labels": labels}})
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
    raise RuntimeError(f"MutatingWebhookConfiguration {name}: still conflicting after 5 tries")


def delete_webhook_configuration(name: str, validating: bool = False) -> bool:
    """Delete the MutatingWebhookConfiguration ``name`` (with ``validating``: the
    ValidatingWebhookConfiguration); False when there was none."""
    api = client.AdmissionregistrationV1Api(_api())
    try:
        (api.delete_validating_webhook_configuration if validating else api.delete_mutating_webhook_configuration)(name)
        return True
    except ApiException as exc:
        if exc.status != 404:
            raise
        return False


def claim(namespace: str, name: str, holder: str, annotations: dict[str, str], duration_seconds: int,
          now: datetime | None = None) -> str:
    """Claim a thing outside Kubernetes (a Ray cluster) for ``holder`` through the Lease
    ``namespace/name``, or renew the claim: ``spec.holderIdentity`` = ``holder`` and
    ``spec.renewTime`` = now. A claim not renewed for ``duration_seconds`` (its holder is gone)
    may be taken over. The create, and every update (guarded by the read's resourceVersion), is
    atomic, so of two operators that claim at once exactly one wins.

    Returns:
        The holder on record afterwards: ``holder`` when the claim is ours, else the other
        (live) holder, whose claim is left as it is.
    """
    api = client.CoordinationV1Api(_api())
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    spec = {"holderIdentity": holder, "leaseDurationSeconds": duration_seconds, "renewTime": stamp}
    for _ in range(3):
        try:
            api.create_namespaced_lease(namespace, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace, "annotations": annotations,
                             "labels": {"app.kubernetes.io/part-of": "rlops"}},
                "spec": {**spec, "acquireTime": stamp}})
            return holder
        except ApiException as exc:
            if exc.status != 409:
                raise
        lease = _plain(api.read_namespaced_lease(name, namespace))
        current = lease.get("spec") or {}
        other = current.get("holderIdentity") or ""
        if other and other != holder:
            renewed = current.get("renewTime") or current.get("acquireTime")
            age = (now or datetime.now(timezone.utc)) - datetime.fromisoformat(renewed.replace("Z", "+00:00")) \
                if renewed else None
            if age is None or age.total_seconds() < int(current.get("leaseDurationSeconds") or duration_seconds):
                return other
        lease["spec"] = {**current, **spec, **({} if other == holder else {"acquireTime": stamp})}
        try:
            api.replace_namespaced_lease(name, namespace, lease)
            return holder
        except ApiException as exc:
            if exc.status not in (404, 409):  # deleted or changed since the read: read again
                raise
    raise Conflict(f"Lease {namespace}/{name}: still conflicting after 3 tries")


def ensure_key_secret(namespace: str, name: str, field: str = "key", nbytes: int = 32) -> bytes:
    """Read a random key from a Secret, creating the Secret with a new key if it is missing.

    Returns the key's bytes. Two operators starting at once agree: the loser of the create
    race (409) reads the winner's key.
    """
    core = client.CoreV1Api(_api())
    for _ in range(2):
        found = read_secret_data(namespace, name)
        if found is not None:
            return found[0][field]
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/managed-by": "rlops"}},
                "data": {field: base64.b64encode(secrets.token_bytes(nbytes)).decode()}}
        try:
            core.create_namespaced_secret(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
    raise RuntimeError(f"secret {namespace}/{name} could not be read or created")


def read_configmap_data(namespace: str, name: str) -> dict[str, str] | None:
    """A ConfigMap's data, or None when it does not exist."""
    try:
        cm = client.CoreV1Api(_api()).read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return dict(cm.data or {})


def read_secret_data(namespace: str, name: str) -> tuple[dict[str, bytes], str] | None:
    """A Secret's data (base64-decoded) and its resourceVersion, or None when it does not exist."""
    try:
        secret = client.CoreV1Api(_api()).read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
    return data, secret.metadata.resource_version


def ensure_tls_secret(
    namespace: str, name: str, usable: Callable[[dict[str, bytes]], bool], make: Callable[[], dict[str, bytes]],
    managed: bool = False, wait_seconds: float = 300.0, poll_seconds: float = 5.0,
) -> dict[str, bytes]:
    """The data of a ``kubernetes.io/tls`` Secret that ``usable`` accepts, making it when needed.

    Not ``managed``: a missing Secret is created with ``make()``'s data, an unusable one (expiring,
    other names) replaced, compare-and-swap on its resourceVersion. Replicas starting at once
    agree: the loser of a create or replace race (409) reads the winner's certificate.
    ``managed`` (cert-manager writes the Secret): only read, waiting up to ``wait_seconds``.

    Raises:
        TimeoutError: managed, and no usable data after ``wait_seconds``.
        ApiException: an API error other than the races above (e.g. 403).
    """
    core = client.CoreV1Api(_api())
    deadline = time.monotonic() + wait_seconds
    while True:
        found = read_secret_data(namespace, name)
        if found is not None and usable(found[0]):
            return found[0]
        if managed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Secret {namespace}/{name} has no usable certificate (is cert-manager issuing it?)")
            time.sleep(poll_seconds)
            continue
        data = make()
        body = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/managed-by": "rlops"}},
                "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
        try:
            if found is None:
                core.create_namespaced_secret(namespace, body)
            else:
                body["metadata"]["resourceVersion"] = found[1]
                core.replace_namespaced_secret(name, namespace, body)
            return data
        except ApiException as exc:
            if exc.status != 409:
                raise


def post_event(obj: dict[str, Any], type: str, reason: str, message: str) -> None:
    """Create a core/v1 Event about ``obj`` (as ``kopf.event`` would), from outside kopf's handlers.

    The receivers' callbacks run in aiohttp tasks, where kopf's event queue is not available.
    """
    meta = obj["metadata"]
    now = datetime.now(timezone.utc)
    body = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": obj.get("apiVersion", ""), "kind": obj.get("kind", ""),
                           "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
        "type": type, "reason": reason, "message": message[:1024], "source": {"component": "rlops"},
        "reportingComponent": "rlops", "reportingInstance": "rlops-operator",
        "firstTimestamp": now.isoformat(), "lastTimestamp": now.isoformat(), "count": 1,
    }
    client.CoreV1Api(_api()).create_namespaced_event(meta["namespace"], body)
