"""Which replica works: the operator's view of kopf peering, for the loops that run outside
kopf's handlers.

With ``--peering``, every replica writes a keep-alive record into the ClusterKopfPeering
(``status.<identity> = {priority, lifetime, lastseen}``), and kopf pauses the handlers of every
replica that sees a live peer of a higher or equal priority. kopf pauses its own handlers only;
a loop of the operator's own (the resync of unfinished TrainingRuns) asks :func:`works` before
each round, with the same rule on the same records, so that a standby writes nothing.
"""

from __future__ import annotations

import getpass
import os
import secrets
import socket
from datetime import datetime, timedelta
from typing import Any

from rl_operator import kube

GROUP, VERSION, PLURAL = "kopf.dev", "v1", "clusterkopfpeerings"

#: This replica's identity, as given to kopf (set by ``__main__``; None: not started that way).
IDENTITY: str | None = None


def own_identity() -> str:
    """This replica's peering identity: the pod's name (``POD_ID``, as kopf reads it), else
    ``user@host/pid/random`` (a local process). Computed once in ``__main__`` and given to kopf."""
    pod = os.environ.get("POD_ID")
    if pod:
        return pod
    return f"{getpass.getuser()}@{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


def works(records: dict[str, Any] | None, identity: str, priority: int, now: datetime) -> bool:
    """Whether the replica ``identity`` of ``priority`` is the working one, by kopf's rule: its
    own record is there, and no other live record (``lastseen + lifetime`` after ``now``) has a
    priority as high or higher.

    Args:
        records: the peering object's ``status`` (identity -> ``{priority, lifetime, lastseen}``;
            ``lifetime`` in seconds, ``lastseen`` an ISO 8601 time with its offset).
        now: an aware datetime.
    """
    records = records or {}
    if identity not in records:
        return False  # kopf has not announced this replica yet: it does not work either
    for other, rec in records.items():
        if other == identity or not isinstance(rec, dict):
            continue
        try:
            alive = datetime.fromisoformat(str(rec["lastseen"])) + timedelta(seconds=int(rec.get("lifetime", 60))) > now
        except (KeyError, ValueError, TypeError):
            alive = True  # kopf takes a record with no time as seen now; an unreadable one counts as alive
        if alive and int(rec.get("priority", 0)) >= priority:
            return False
    return True


def read_records(name: str) -> dict[str, Any] | None:
    """The ``status`` of the ClusterKopfPeering ``name`` (None when it does not exist).

    Raises:
        kubernetes.client.exceptions.ApiException: the API server refused the read.
    """
    obj = kube.get_cluster_custom(GROUP, VERSION, PLURAL, name)
    return None if obj is None else obj.get("status") or {}
