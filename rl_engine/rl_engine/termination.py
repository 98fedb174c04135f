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


def _truncate_utf8(text: str, max_bytes: int) -> str:
    if max_bytes <= len(_ELLIPSIS):
        return _ELLIPSIS[: max(max_bytes, 0)]
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    cut = raw[: max_bytes - len(_ELLIPSIS)].decode("utf-8", errors="ignore")
    return cut + _ELLIPSIS


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
        over = len(encoded) - (limit - 1)
        if over <= 0:
            break
        current = data[key].encode("utf-8")
        # JSON escaping can make the encoded string longer than its raw bytes; iterate.
        target = max(len(current) - over, 0)
        while True:
            data[key] = _truncate_utf8(data[key], target)
            encoded = _dumps(data)
            if len(encoded) < limit or target == 0:
                break
            target = max(target - (len(encoded) - (limit - 1)), 0)
    if len(encoded) < limit:
        return encoded
    minimal = {k: data[k] for k in ("phase", "reason") if k in data}
    minimal["message"] = "termination message truncated"
    return _dumps(minimal)[: limit - 1]


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
