"""Kubernetes termination message: encoding under the 4 KiB limit (torch-free).

Kubernetes keeps at most 4096 bytes of ``terminationMessagePath``. The trainer writes one
JSON object there:

* success: ``{"phase": "Succeeded", "metrics": {...}, "artifactURI": ..., "fingerprint": ...}``
* failure: ``{"phase": "Failed", "reason": "<CamelCase>", "message": "<text>"}``

:func:`encode_termination_message` guarantees fewer than :data:`MAX_BYTES` bytes by
shortening the longest string values (``message`` first), marking cuts with ``...``.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = [
    "MAX_BYTES",
    "DEFAULT_PATH",
    "encode_termination_message",
    "write_termination_message",
]

MAX_BYTES = 4096
DEFAULT_PATH = "/dev/termination-log"
_ELLIPSIS = "..."


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=str).encode("utf-8")


def _sanitize(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return value


def encode_termination_message(payload: dict[str, Any], limit: int = MAX_BYTES) -> bytes:
    """Compact UTF-8 JSON of ``payload``, always shorter than ``limit`` bytes.

    NaN/inf numbers become ``null``. If the JSON is too long, ``message`` is shortened
    first, then other string values (longest first); as a last resort only ``phase``
    and ``reason`` are kept.

    Args:
        payload: flat-ish JSON-able dict (nested dicts allowed).
        limit: exclusive byte limit (default 4096).

    Returns:
        The encoded bytes, ``len(result) < limit``.
    """
    data = _sanitize(dict(payload))
    encoded = _dumps(data)
    if len(encoded) < limit:
        return encoded
    keys = [k for k, v in data.items() if isinstance(v, str)]
    keys.sort(key=lambda k: (k != "message", -len(data[k])))
    for key in keys:
        if len(encoded) < limit:
            break
        text = data[key]
        # Longest prefix (in characters) whose payload still fits; JSON escaping makes the
        # encoded size non-linear in the prefix length, so search instead of computing it.
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(_dumps({**data, key: text[:mid] + _ELLIPSIS})) < limit:
                lo = mid
            else:
                hi = mid - 1
        data[key] = text[:lo] + _ELLIPSIS
        encoded = _dumps(data)
    if len(encoded) < limit:
        return encoded
    minimal = {k: str(data[k])[:128] for k in ("phase", "reason") if k in data}
    minimal["message"] = "termination message truncated"
    return _dumps(minimal)


def write_termination_message(payload: dict[str, Any], path: str | None = None) -> bool:
    """Write ``payload`` (via :func:`encode_termination_message`) to ``path``.

    Args:
        payload: the message dict.
        path: defaults to ``$RLOPS_TERMINATION_MESSAGE_PATH`` or ``/dev/termination-log``.

    Returns:
        ``True`` if written; ``False`` if the path could not be written (e.g. running
        outside Kubernetes) -- the caller still reports on stdout/stderr.
    """
    path = path or os.environ.get("RLOPS_TERMINATION_MESSAGE_PATH") or DEFAULT_PATH
    data = encode_termination_message(payload)
    try:
        with open(path, "wb") as f:
            f.write(data)
        return True
    except OSError:
        return False
