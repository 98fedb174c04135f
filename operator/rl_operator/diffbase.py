"""kopf's last-handled state of each object, kept in the operator's memory instead of on the object.

kopf finds an object's changes (what makes ``@kopf.on.update`` fire, and whether
``@kopf.on.create`` has run) by comparing it with the "essence" it last handled. By default it
stores that essence on the object, as the annotation
``kopf.zalando.org/last-handled-configuration``: one more PATCH of every agent, run and Rollout
after each handled change, a second copy of its spec, and one more watch event for every
operator to decode. Here kopf keeps it in a dict (kopf's ``DiffBaseStorage`` extension point),
keyed by the object's uid.

What the memory loses on a restart, or on a standby's takeover, kopf's own logic covers: an
object with no stored essence counts as not yet handled, so its ``on.create`` handlers run
again. rlops's handlers are level-triggered (they compute the desired state from what exists
and create or write only the difference), so that second run changes nothing that is already
right: no duplicate TrainingRun, Job or Rollout (the same as ``on.resume``, which runs on a
restart anyway).

An entry goes when the watch reports its object deleted (:func:`forget`); a size bound is not
needed beyond that: one short JSON string per live object. The free-form maps a tenant writes
(``spec.environment.kwargs``, ``spec.algorithm.hyperparameters``) are kept as their digest: a
change of them still changes the essence, and no handler reads them from it.
"""

from __future__ import annotations

import json
from typing import Any, cast

import kopf

from rl_operator import models as m

#: kopf's storage prefix: annotations under it (an older operator's last-handled configuration,
#: progress records) are kopf's bookkeeping, not part of what users changed.
KOPF_PREFIX = "kopf.zalando.org/"


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """kopf's diff-base (last handled essence) per object uid, in this process's memory.

    Called by kopf from its event loop only (``fetch`` and ``store`` are synchronous and never
    wait), so the dict needs no lock."""

    def __init__(self) -> None:
        super().__init__()
        self._essences: dict[str, str] = {}

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        essence = super().build(body=body, extra_fields=extra_fields)
        annotations = essence.get("metadata", {}).get("annotations")
        if annotations:
            for key in [k for k in annotations if k.startswith(KOPF_PREFIX)]:
                del annotations[key]
            self.remove_empty_stanzas(essence)
        for parent, name in m.FREE_FORM_FIELDS:  # the tenant's large maps: a change still shows, as a new digest
            part = (essence.get("spec") or {}).get(parent)
            if isinstance(part, dict) and part.get(name):
                part[name] = m.digest(part[name])
        return essence

    def fetch(self, *, body: kopf.Body) -> Any:
        encoded = self._essences.get(body.metadata.uid or "")
        return cast(Any, json.loads(encoded)) if encoded is not None else None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        # nothing goes into ``patch``: no write to the object
        self._essences[body.metadata.uid or ""] = json.dumps(essence, separators=(",", ":"))

    def forget(self, uid: str | None) -> None:
        """Drop a deleted object's entry (a no-op when there is none)."""
        self._essences.pop(uid or "", None)

    def __len__(self) -> int:
        return len(self._essences)


STORAGE = MemoryDiffBaseStorage()
