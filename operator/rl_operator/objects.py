"""Small helpers about Kubernetes objects that every decision module uses: an Event to post, the
time now (whole seconds, UTC, as the API server writes times), and a controller owner reference."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on an object: ``type`` is Normal or Warning."""

    type: str
    reason: str
    message: str


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    """A controller ownerReference to ``obj`` (a Kubernetes object as a dict)."""
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
