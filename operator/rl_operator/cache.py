"""The operator's reads, from watch caches (kopf indexes) instead of the API server.

kopf already watches every kind the operator handles; ``@kopf.index`` keeps what those watches
deliver in memory, and kopf starts the handlers only once every index holds its first full
list. Reads here are O(1) lookups in those indexes: an agent, a run, a Rollout by name; an
agent's runs and Rollouts; a run's Job and pods. The API server is called only to create, to
write a real change, and when a write finds the cache stale (a resourceVersion conflict: the
caller re-reads the object from the API).

Objects in the indexes are the watch's objects without ``metadata.managedFields`` (the bulk of
a stored object, never read here). Readers get deep copies: they may change them freely.

Before :func:`bind` (kopf's start-up: unit tests, scripts) every read goes to the API server
through :mod:`rl_operator.kube`, with the same results.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kopf

from rl_operator import kube
from rl_operator import models as m

_INDEXES: dict[str, Any] = {}


def _slim(body: kopf.Body) -> dict[str, Any]:
    obj = dict(body)
    meta = dict(obj.get("metadata") or {})
    meta.pop("managedFields", None)
    obj["metadata"] = meta
    return obj


@kopf.index(m.GROUP, m.VERSION, m.RLAgent.PLURAL)
async def rlagents_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): _slim(body)}


@kopf.index(m.GROUP, m.VERSION, m.TrainingRun.PLURAL)
async def trainingruns_idx(namespace: str, name: str, body: kopf.Body, labels: dict[str, str], **_: Any
                           ) -> dict[Any, Any]:
    obj = _slim(body)
    return {(namespace, name): obj, ("agent", namespace, labels.get(m.AGENT_LABEL, "")): obj}


@kopf.index(m.GROUP, m.VERSION, m.Rollout.PLURAL)
async def rollouts_idx(namespace: str, name: str, body: kopf.Body, labels: dict[str, str], **_: Any
                       ) -> dict[Any, Any]:
    obj = _slim(body)
    return {(namespace, name): obj, ("agent", namespace, labels.get(m.AGENT_LABEL, "")): obj}


@kopf.index("batch", "v1", "jobs", labels={m.RUN_LABEL: kopf.PRESENT})
async def jobs_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): _slim(body)}


@kopf.index("", "v1", "pods", labels={m.RUN_LABEL: kopf.PRESENT})
async def pods_idx(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[m.RUN_LABEL]): _slim(body)}


_PLURAL_INDEX = {m.RLAgent.PLURAL: "rlagents_idx", m.TrainingRun.PLURAL: "trainingruns_idx",
                 m.Rollout.PLURAL: "rollouts_idx"}


@kopf.on.startup()
def bind(**kwargs: Any) -> None:
    """Keep kopf's live index objects (empty now, filled by the watches before any handler)."""
    for name in (*_PLURAL_INDEX.values(), "jobs_idx", "pods_idx"):
        _INDEXES[name] = kwargs[name]


def unbind() -> None:
    _INDEXES.clear()


def _values(index: str, key: Any) -> list[dict[str, Any]]:
    idx = _INDEXES[index]
    try:
        store = idx[key]
    except KeyError:
        return []
    # list() of the store's dict is one C call under the GIL: safe against the event loop's
    # updates from another thread
    return [copy.deepcopy(v) for v in list(store)]


def get_custom(namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    """An RLAgent, TrainingRun or Rollout by name, or None."""
    if not _INDEXES:
        return kube.get_custom(namespace, plural, name)
    found = _values(_PLURAL_INDEX[plural], (namespace, name))
    return found[0] if found else None


def list_custom(namespace: str, plural: str, agent: str) -> list[dict[str, Any]]:
    """The TrainingRuns or Rollouts labelled with this agent (``rlops.dev/agent``)."""
    if not _INDEXES:
        return kube.list_custom(namespace, plural, f"{m.AGENT_LABEL}={agent}")
    return _values(_PLURAL_INDEX[plural], ("agent", namespace, agent))


def get_job(namespace: str, name: str) -> dict[str, Any] | None:
    """The Job of that name that carries a run label, or None."""
    if not _INDEXES:
        return kube.get_job(namespace, name)
    found = _values("jobs_idx", (namespace, name))
    return found[0] if found else None


def list_pods(namespace: str, run: str) -> list[dict[str, Any]]:
    """The pods labelled with this run (``rlops.dev/training-run``)."""
    if not _INDEXES:
        return kube.list_pods(namespace, f"{m.RUN_LABEL}={run}")
    return _values("pods_idx", (namespace, run))


# ----------------------------------------------------------------------------- per-object locks


class _Lock:
    __slots__ = ("lock", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.RLock()


_locks: "weakref.WeakValueDictionary[tuple[str, str, str], _Lock]" = weakref.WeakValueDictionary()
_locks_guard = threading.Lock()


@contextmanager
def locked(kind: str, namespace: str, name: str) -> Iterator[None]:
    """Serialize the operator's read-compute-write of one object across threads. A lock lives
    only while someone holds or waits for it (a weak mapping): memory stays bounded by the work
    in flight, not by the number of objects ever seen."""
    with _locks_guard:
        holder = _locks.get((kind, namespace, name))
        if holder is None:
            holder = _locks[(kind, namespace, name)] = _Lock()
    with holder.lock:
        yield


def lock_count() -> int:
    return len(_locks)
