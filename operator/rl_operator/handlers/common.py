"""What every handler module shares: posting Events, ownership, the guarded status write, the
API server's error message, the NATS connection."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, NamedTuple

import kopf

from kubernetes.client.exceptions import ApiException

from rl_operator import cache, jetstream, kube, objects, trust
from rl_operator.handlers.runtime import RUNTIME

log = logging.getLogger(__name__)


def post(obj: dict[str, Any], events: list[objects.Event]) -> None:
    for ev in events:
        try:
            kopf.event(obj, type=ev.type, reason=ev.reason, message=ev.message[:1024])
        except LookupError:  # outside kopf's handlers (the alert and audit receivers): no event queue
            try:
                kube.post_event(obj, ev.type, ev.reason, ev.message)
            except ApiException as exc:  # an Event is worth a log line, not a failed callback
                log.warning("cannot post Event %s on %s: %s", ev.reason, obj["metadata"]["name"], exc.reason)


def owned(owner: dict[str, Any], objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects whose controller is ``owner`` (by uid): a label alone makes nothing ours."""
    return [o for o in objs if trust.controlled_by(o, owner, owner["kind"])]


class Synced(NamedTuple):
    """The outcome of :func:`sync_status`."""

    obj: dict[str, Any]  #: the object as written (or as read, when nothing changed)
    prev: Any  #: its status before
    status: Any  #: its status now
    events: list[objects.Event]
    changed: bool


def sync_status(namespace: str, plural: str, name: str, status_type: type, observe: Any) -> Synced | None:
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


def api_message(exc: ApiException) -> str:
    """The API server's own message from an error response (its Status body), else the body."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.body)
    except ValueError:
        return str(exc.body)


async def nats() -> Any:
    """The operator's NATS connection (``jetstream.TRAJECTORIES.client``), connected on first
    use; None without ``RLOPS_NATS_URL`` or while NATS cannot be reached (logged)."""
    counter = jetstream.TRAJECTORIES
    if not RUNTIME.settings.nats_url:
        return None
    RUNTIME.nats_lock = RUNTIME.nats_lock or asyncio.Lock()
    async with RUNTIME.nats_lock:
        if counter.client is None or counter.client.is_closed:
            counter.url = RUNTIME.settings.nats_url
            try:
                counter.client = await jetstream.connect(RUNTIME.settings.nats_url)
            except Exception as exc:  # not up yet: the triggers say so, the next round tries again
                log.warning("cannot connect to NATS at %s: %s", RUNTIME.settings.nats_url, exc)
                counter.client = None
        return counter.client if counter.client is not None and counter.client.is_connected else None
