"""The operator's reads, from watch caches (kopf indexes) instead of the API server.

kopf already watches every kind the operator handles; ``@kopf.index`` keeps what those watches
deliver in memory, and kopf starts the handlers only once every index holds its first full
list. Reads here are O(1) lookups in those indexes: an agent, a run, a Rollout by name; an
agent's runs and Rollouts; a run's Job and pods. The API server is called only to create, to
write a real change, and when a write finds the cache stale (a resourceVersion conflict: the
caller re-reads the object from the API).

Objects in the indexes are the watch's objects without ``metadata.managedFields`` and kopf's
annotations (the bulk of a stored object, never read here); Jobs and pods keep their containers'
environment as a digest (:func:`_slim_containers`). Readers get deep copies: they may change them freely.

The operator's own writes (:func:`create_custom_or_get`, :func:`create_job_or_get`,
:func:`patch_status`, :func:`patch_custom`) are remembered until the watch delivers them (client-go's
MutationCache): a read returns the written copy while the watch's copy is older (a smaller
``resourceVersion``), so a reconcile never acts on a state older than its own last write, even
a few milliseconds after it. An entry goes once the watch holds that version or a newer one,
or after :data:`WRITTEN_TTL_SECONDS` (an object deleted before its watch event came).

Before :func:`bind` (kopf's start-up: unit tests, scripts) every read goes to the API server
through :mod:`rl_operator.kube`, with the same results.
"""

from __future__ import annotations

import copy
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import kopf

from rl_operator import kube
from rl_operator import models as m

_INDEXES: dict[str, Any] = {}


def _slim(body: kopf.Body | dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    """The object without what the operator never reads: ``metadata.managedFields`` and kopf's
    own annotations (``kopf.zalando.org/last-handled-configuration`` is a second copy of the spec).
    Of a Job or a pod (``kind``; :func:`_slim_containers`), the containers' environment is kept as
    its digest."""
    obj = dict(body)
    meta = dict(obj.get("metadata") or {})
    meta.pop("managedFields", None)
    if meta.get("annotations"):
        meta["annotations"] = {k: v for k, v in meta["annotations"].items() if not k.startswith("kopf.zalando.org/")}
    obj["metadata"] = meta
    template = (obj.get("spec") or {}).get("template") or {}
    if kind == "Job" and template.get("spec"):
        obj["spec"] = {**obj["spec"], "template": {**template, "spec": _slim_containers(template["spec"])}}
    elif kind == "Pod" and obj.get("spec"):
        obj["spec"] = _slim_containers(obj["spec"])
    return obj


def _slim_containers(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """A pod spec whose containers' ``env`` is its digest (``models.digest``). The operator only
    compares a pod's environment with its Job's (``trust.pod_untrusted``), and a trainer's holds
    the run config, with the agent's ``kwargs``: the cache keeps a few bytes instead of two more
    copies of them. Both sides of that comparison come from this cache."""
    out = dict(pod_spec)
    for key in ("containers", "initContainers"):
        if out.get(key):
            out[key] = [{**c, "env": m.digest(c["env"])} if c.get("env") else c for c in out[key]]
    return out


@kopf.index(m.GROUP, m.VERSION, m.RLAgent.PLURAL)
async def rlagents_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    obj = _slim(body)
    _seen(m.RLAgent.PLURAL, obj)
    return {(namespace, name): obj}


@kopf.index(m.GROUP, m.VERSION, m.TrainingRun.PLURAL)
async def trainingruns_idx(namespace: str, name: str, body: kopf.Body, labels: dict[str, str], **_: Any
                           ) -> dict[Any, Any]:
    obj = _slim(body)
    _seen(m.TrainingRun.PLURAL, obj)
    return {(namespace, name): obj, ("agent", namespace, labels.get(m.AGENT_LABEL, "")): obj}


@kopf.index(m.GROUP, m.VERSION, m.Rollout.PLURAL)
async def rollouts_idx(namespace: str, name: str, body: kopf.Body, labels: dict[str, str], **_: Any
                       ) -> dict[Any, Any]:
    obj = _slim(body)
    _seen(m.Rollout.PLURAL, obj)
    return {(namespace, name): obj, ("agent", namespace, labels.get(m.AGENT_LABEL, "")): obj}


@kopf.index("batch", "v1", "jobs", labels={m.RUN_LABEL: kopf.PRESENT})
async def jobs_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    obj = _slim(body, "Job")
    _seen(JOBS, obj)
    return {(namespace, name): obj}


@kopf.index("", "v1", "pods", labels={m.RUN_LABEL: kopf.PRESENT})
async def pods_idx(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[m.RUN_LABEL]): _slim(body, "Pod")}


JOBS = "jobs"  #: the key of Jobs among the operator's own writes

_PLURAL_INDEX = {m.RLAgent.PLURAL: "rlagents_idx", m.TrainingRun.PLURAL: "trainingruns_idx",
                 m.Rollout.PLURAL: "rollouts_idx"}


@kopf.on.startup()
def bind(**kwargs: Any) -> None:
    """Keep kopf's live index objects (empty now, filled by the watches before any handler)."""
    for name in (*_PLURAL_INDEX.values(), "jobs_idx", "pods_idx"):
        _INDEXES[name] = kwargs[name]


#: Set once kopf has run a handler on this replica: kopf holds every handler until all its
#: indexes are filled from their first listing, so from then on the cache is complete. A replica
#: that starts as a standby lists nothing until it takes over; before this is set, its
#: operator-wide loops must not read an absent Job as a missing one.
INDEXED = threading.Event()


def unbind() -> None:
    INDEXED.clear()
    _INDEXES.clear()
    with _written_guard:
        _written.clear()
        _by_agent.clear()


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
    """An RLAgent, TrainingRun or Rollout by name (the operator's own newer write, if any), or None."""
    if not _INDEXES:
        return kube.get_custom(namespace, plural, name)
    found = _values(_PLURAL_INDEX[plural], (namespace, name))
    return _newest(plural, namespace, name, found[0] if found else None)


def get_custom_confirmed(namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    """Like :func:`get_custom`, but a miss is confirmed with the API server before it counts:
    for the reads whose absence leads to a verdict that stays (a run failed as outside its
    agent's owner chain, a Rollout ignored). The cache can miss an object that exists: a
    replica that has just taken over lists the kinds one after another."""
    found = get_custom(namespace, plural, name)
    return found if found is not None or not _INDEXES else kube.get_custom(namespace, plural, name)


def unfinished_runs() -> list[tuple[str, str]]:
    """(namespace, name) of every TrainingRun in the watch cache that has not finished
    (``models.RUN_TERMINAL``), or whose evaluation is in progress (none before :func:`bind`). Call it on kopf's event loop, where the indexes change."""
    idx = _INDEXES.get(_PLURAL_INDEX[m.TrainingRun.PLURAL])
    if idx is None:
        return []
    def unfinished(run: dict[str, Any]) -> bool:
        status = run.get("status") or {}
        # trained, and not yet measured: its evaluation Job may still have to be made (a
        # transient error when its trainer finished), or its outcome read
        measuring = status.get("phase") == "Succeeded" and (status.get("evaluation") or {}).get("phase") not in (
            "Succeeded", "Failed")
        return status.get("phase") not in m.RUN_TERMINAL or measuring

    return sorted(key for key, store in idx.items() if len(key) == 2 and any(unfinished(run) for run in store))


def agents_with_triggers() -> list[tuple[str, str]]:
    """(namespace, name) of every RLAgent in the watch cache whose triggers need the clock: a
    schedule or a degradation trigger (``spec.triggers``), or a trigger that waits (condition
    ``TriggerWaiting``);
    not those with a trajectory trigger (``cache.agents(with_trajectory_trigger=True)``).
    Call it on kopf's event loop, where the indexes change."""
    idx = _INDEXES.get(_PLURAL_INDEX[m.RLAgent.PLURAL])
    if idx is None:
        return []

    def needs(agent: dict[str, Any]) -> bool:
        wanted = (agent.get("spec") or {}).get("triggers") or {}
        if wanted.get("trajectories"):
            return False  # the round of the trajectory triggers plans them
        return bool(wanted.get("schedule") or wanted.get("degradation")) or any(
            c.get("type") == "TriggerWaiting" and c.get("status") == "True"
            for c in (agent.get("status") or {}).get("conditions") or [])

    return sorted(key for key, store in idx.items() if any(needs(a) for a in store))


def every(plural: str, where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
    """Every RLAgent, TrainingRun or Rollout in the watch cache (copies; with ``where``, only
    those it accepts, tested before copying). Call it on kopf's event loop, where the indexes change."""
    idx = _INDEXES.get(_PLURAL_INDEX[plural])
    if idx is None:
        return []
    return [copy.deepcopy(o) for key, store in sorted(idx.items(), key=lambda kv: tuple(map(str, kv[0])))
            if len(key) == 2  # (namespace, name), not ("agent", namespace, agent)
            for o in list(store) if where is None or where(o)]


def agents(with_trajectory_trigger: bool = False) -> list[dict[str, Any]]:
    """Every RLAgent in the watch cache (copies), or those with ``spec.triggers.trajectories``.
    Call it on kopf's event loop, where the indexes change."""
    if not with_trajectory_trigger:
        return every(m.RLAgent.PLURAL)
    return every(m.RLAgent.PLURAL, lambda a: bool(((a.get("spec") or {}).get("triggers") or {}).get("trajectories")))


def list_custom(namespace: str, plural: str, agent: str) -> list[dict[str, Any]]:
    """The TrainingRuns or Rollouts labelled with this agent (``rlops.dev/agent``), each in the
    newer of the watch's and the operator's own last written version."""
    if not _INDEXES:
        return kube.list_custom(namespace, plural, f"{m.AGENT_LABEL}={agent}")
    found = {o["metadata"]["name"]: o for o in _values(_PLURAL_INDEX[plural], ("agent", namespace, agent))}
    with _written_guard:
        names = set(found) | _by_agent.get((plural, namespace, agent), set())
    out = [_newest(plural, namespace, n, found.get(n)) for n in sorted(names)]
    return [o for o in out if o is not None]


# ----------------------------------------------------------------------------- the operator's own writes

#: Seconds a written copy is kept when the watch never delivers it (the object was deleted).
WRITTEN_TTL_SECONDS = 30.0

#: (plural, namespace, name) -> (the object as the API server answered a write, when)
_written: dict[tuple[str, str, str], tuple[dict[str, Any], float]] = {}
#: (plural, namespace, agent label) -> names in _written: lists find objects the watch has not delivered yet
_by_agent: dict[tuple[str, str, str], set[str]] = {}
_written_guard = threading.Lock()
_writes = [0]


def _rv(obj: dict[str, Any]) -> int | None:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


def _forget(key: tuple[str, str, str]) -> None:
    """Drop a written copy (the caller holds ``_written_guard``)."""
    entry = _written.pop(key, None)
    if entry is None:
        return
    agent_key = (key[0], key[1], (entry[0]["metadata"].get("labels") or {}).get(m.AGENT_LABEL, ""))
    names = _by_agent.get(agent_key)
    if names is not None:
        names.discard(key[2])
        if not names:
            del _by_agent[agent_key]


def remember(plural: str, obj: dict[str, Any] | None) -> dict[str, Any] | None:
    """Keep ``obj``, just returned by a write to the API server, until the watch delivers it.
    Returns ``obj``."""
    if obj is None or not _INDEXES or _rv(obj) is None:
        return obj
    meta = obj["metadata"]
    key = (plural, meta["namespace"], meta["name"])
    now = time.monotonic()
    with _written_guard:
        current = _written.get(key)
        if current is None or (_rv(current[0]) or 0) < (_rv(obj) or 0):
            _forget(key)
            _written[key] = (_slim(obj, "Job" if plural == JOBS else None), now)
            agent = (meta.get("labels") or {}).get(m.AGENT_LABEL, "")
            _by_agent.setdefault((plural, key[1], agent), set()).add(key[2])
        _writes[0] += 1
        if _writes[0] % 256 == 0:  # the expired ones, now and then: memory stays bounded
            for k in [k for k, (_, at) in _written.items() if now - at > WRITTEN_TTL_SECONDS]:
                _forget(k)
    return obj


def _seen(plural: str, obj: dict[str, Any]) -> None:
    """The watch delivered ``obj``: a written copy that is not newer is no longer needed."""
    meta = obj.get("metadata") or {}
    key = (plural, meta.get("namespace", ""), meta.get("name", ""))
    if key not in _written:  # a dict lookup: cheap on every event
        return
    with _written_guard:
        entry = _written.get(key)
        if entry is not None and (_rv(obj) is None or _rv(entry[0]) is None or _rv(obj) >= _rv(entry[0])):
            _forget(key)


def _newest(plural: str, namespace: str, name: str, cached: dict[str, Any] | None) -> dict[str, Any] | None:
    """``cached`` (the watch's copy), or the operator's own written copy when that is newer."""
    key = (plural, namespace, name)
    if key not in _written:
        return cached
    with _written_guard:
        entry = _written.get(key)
        if entry is None:
            return cached
        written, at = entry
        expired = time.monotonic() - at > WRITTEN_TTL_SECONDS
        if expired or (cached is not None and (_rv(cached) is None or _rv(written) is None
                                               or _rv(cached) >= _rv(written))):
            _forget(key)
            return cached
        return copy.deepcopy(written)


def create_custom_or_get(body: dict[str, Any], plural: str) -> tuple[dict[str, Any], bool]:
    """:func:`rl_operator.kube.create_custom_or_get`, remembered."""
    obj, created = kube.create_custom_or_get(body, plural)
    remember(plural, obj)
    return obj, created


def create_job_or_get(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """:func:`rl_operator.kube.create_job_or_get`, remembered: a reconcile that runs again before
    the watch delivers the Job (the resync timer, a restart's resume) finds it, and creates none."""
    job, created = kube.create_job_or_get(body)
    remember(JOBS, job)
    return job, created


def patch_status(namespace: str, plural: str, name: str, status: dict[str, Any],
                 resource_version: str | None = None) -> dict[str, Any] | None:
    """:func:`rl_operator.kube.patch_status`, remembered."""
    return remember(plural, kube.patch_status(namespace, plural, name, status, resource_version))


def patch_custom(namespace: str, plural: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """:func:`rl_operator.kube.patch_custom`, remembered."""
    return remember(plural, kube.patch_custom(namespace, plural, name, body))


def get_job(namespace: str, name: str) -> dict[str, Any] | None:
    """The Job of that name that carries a run label, or None."""
    if not _INDEXES:
        return kube.get_job(namespace, name)
    found = _values("jobs_idx", (namespace, name))
    return _newest(JOBS, namespace, name, found[0] if found else None)


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
