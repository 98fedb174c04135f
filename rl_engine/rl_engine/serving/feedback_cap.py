"""The per-client feedback cap of a router replica (``args.feedback.perClientPerMinute``).

A client may send at most N feedbacks per minute to one router replica; more get 429 and are
not counted. One client of the Serve port could otherwise fetch many answers and supply most of
a canary's feedback. The counting is the ``limits`` library's fixed window, in this replica's
memory: a client's window is the 60 s from its first counted feedback. The client is the
request's source address, or the value of a header a trusted gateway sets
(:func:`client_key`). Design, and what the cap bounds: ``docs/serving.md``.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Iterable

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

__all__ = ["MAX_CLIENTS", "OVERFLOW_CLIENT", "MAX_KEY_LENGTH", "client_key", "FeedbackCap"]

#: Most clients one router replica counts at once. Each costs about 300 bytes in ``limits``'
#: MemoryStorage, whose expiry sweep (10 ms after a count, in a thread of its own) walks them
#: all: about 3 ms at 10,000. A client first seen while this many are counted is counted in one
#: shared count, :data:`OVERFLOW_CLIENT`, until counted clients' windows end: a flood of made-up
#: keys neither grows memory nor lifts the cap on the keys that flood.
MAX_CLIENTS = 10_000
#: The shared count of the clients first seen while :data:`MAX_CLIENTS` are counted.
OVERFLOW_CLIENT = "overflow:"
#: Longest client key kept as it is (characters); a longer one is kept as its SHA-256 digest.
MAX_KEY_LENGTH = 128


def client_key(peer: str | None, header_values: Iterable[str] = ()) -> str:
    """The client a feedback counts against.

    Args:
        peer: the request's source address as the Serve proxy saw it (``request.client.host``),
            None when unknown.
        header_values: every value of the configured ``clientHeader`` in the request, in order
            (empty when none is configured or the request has none). A proxy appends to a
            header (``X-Forwarded-For: <client>, <proxy>``), or adds another line of it.

    Returns:
        ``header:<value>`` with the last comma-separated element of the header (what the
        gateway nearest to Ray Serve wrote; elements before it came from further away, or from
        the client itself), else ``address:<peer>`` (``address:`` when unknown). A key longer
        than :data:`MAX_KEY_LENGTH` becomes ``sha256:<64 hex>``.
    """
    elements = [e.strip() for value in header_values for e in value.split(",")]
    last = next((e for e in reversed(elements) if e), "")
    key = f"header:{last}" if last else f"address:{peer or ''}"
    if len(key) > MAX_KEY_LENGTH:
        return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return key


class FeedbackCap:
    """At most ``per_minute`` feedbacks per client and fixed window of 60 s, in one router replica.

    Args:
        per_minute: feedbacks per client per minute; 0: no cap (nothing is counted or kept).
        max_clients: most clients counted at once (:data:`MAX_CLIENTS`); memory stays within
            about 300 bytes each, whatever keys the requests carry.

    Raises:
        ValueError: ``per_minute < 0`` or ``max_clients < 1``.
    """

    def __init__(self, per_minute: int, max_clients: int = MAX_CLIENTS) -> None:
        if per_minute < 0 or max_clients < 1:
            raise ValueError(f"per_minute must be >= 0 and max_clients >= 1, got {per_minute}, {max_clients}")
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._item = RateLimitItemPerMinute(max(per_minute, 1), namespace="feedback")
        self._storage = MemoryStorage() if per_minute else None
        self._limiter = FixedWindowRateLimiter(self._storage) if self._storage is not None else None

    def __len__(self) -> int:
        """Clients counted now (their window has not ended)."""
        return 0 if self._storage is None else len(self._storage.storage)

    def _counted_as(self, client: str) -> str:
        if len(self) < self.max_clients or self._storage.get(self._item.key_for(client)):
            return client
        return OVERFLOW_CLIENT

    def hit(self, client: str) -> bool:
        """Count one feedback of ``client`` (a :func:`client_key`); False when it is over the cap
        (the caller refuses it: it counts nowhere else)."""
        if self._limiter is None:
            return True
        return self._limiter.hit(self._item, self._counted_as(client))

    def retry_after(self, client: str) -> int:
        """Whole seconds (>= 1) until ``client``'s window ends and it may send feedback again."""
        if self._limiter is None:
            return 1
        reset = self._limiter.get_window_stats(self._item, self._counted_as(client)).reset_time
        return max(1, math.ceil(reset - time.time()))
