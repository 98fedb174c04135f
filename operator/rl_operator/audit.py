"""Who really approved: approvals made with impersonation, from the API server's audit webhook.

Kubernetes (1.34) gives admission only the impersonated identity: ``kubectl --as=bob annotate
rollout ... rlops.dev/approve=...`` reaches the approval webhook as ``bob``, and ``approved-by``
records ``bob``. The API server's audit events carry both: ``user`` (who authenticated) and
``impersonatedUser``. With the API server's audit webhook pointed at the operator
(``--audit-webhook-config-file``; ``hack/cluster-up.sh`` sets it up locally, ``docs/security.md``
says how elsewhere), the operator reads them here and records the real user on the Rollout
(``rlops.dev/approved-via: impersonated by <user>``, and ``status.approval.via``).

Pure: parses an ``audit.k8s.io/v1`` ``EventList`` (the webhook's body) into
:class:`ImpersonatedApproval` records. The caller matches each with the Rollout's recorded
approval (same approver, close in time) before writing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rl_operator import models as m
from rl_operator.approvals import APPROVE

#: How far apart (seconds) the audited request and the webhook's ``approved-at`` may be.
MAX_SKEW_SECONDS = 120.0
_ESCAPED_APPROVE = APPROVE.replace("~", "~0").replace("/", "~1")


class _User(BaseModel):
    model_config = ConfigDict(extra="ignore")
    username: str = ""


class _ObjectRef(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    api_group: str = Field("", alias="apiGroup")
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""


class _ResponseStatus(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: int = 0


class AuditEvent(BaseModel):
    """The fields of an ``audit.k8s.io/v1`` ``Event`` that this module reads."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    audit_id: str = Field("", alias="auditID")
    stage: str = ""
    verb: str = ""
    user: _User = Field(default_factory=_User)
    impersonated_user: _User | None = Field(None, alias="impersonatedUser")
    object_ref: _ObjectRef | None = Field(None, alias="objectRef")
    response_status: _ResponseStatus | None = Field(None, alias="responseStatus")
    request_object: Any = Field(None, alias="requestObject")
    request_received_timestamp: datetime | None = Field(None, alias="requestReceivedTimestamp")


class EventList(BaseModel):
    """The audit webhook's body."""

    model_config = ConfigDict(extra="ignore")
    kind: str = "EventList"
    items: list[AuditEvent] = Field(default_factory=list)


@dataclass(frozen=True)
class ImpersonatedApproval:
    """A Rollout write, made with impersonation, that set ``rlops.dev/approve``."""

    namespace: str
    name: str
    user: str
    """Who authenticated (the impersonator)."""
    impersonated: str
    """Whom they acted as: the ``approved-by`` the webhook recorded."""
    at: datetime
    audit_id: str


def _sets_approve(request_object: Any) -> bool:
    """Whether a request body (an object, a merge patch or a JSON patch) sets ``rlops.dev/approve``."""
    if isinstance(request_object, dict):
        annotations = (request_object.get("metadata") or {}).get("annotations") or {}
        return isinstance(annotations, dict) and annotations.get(APPROVE) is not None
    if isinstance(request_object, list):  # JSON patch
        for op in request_object:
            if not isinstance(op, dict) or op.get("op") not in ("add", "replace"):
                continue
            path = str(op.get("path", ""))
            if path == f"/metadata/annotations/{_ESCAPED_APPROVE}":
                return True
            value = op.get("value")
            if path == "/metadata/annotations" and isinstance(value, dict) and value.get(APPROVE) is not None:
                return True
            if path == "/metadata" and _sets_approve({"metadata": value}):
                return True
    return False


def impersonated_approvals(events: EventList) -> list[ImpersonatedApproval]:
    """The successful, impersonated writes to Rollouts that set the approve annotation.

    Needs the audit policy to log Rollout ``update``/``patch`` at level ``Request`` (so that
    ``requestObject`` is there); events at other levels, other stages, other resources or
    subresources, failed requests and requests without ``impersonatedUser`` are skipped.
    """
    out = []
    for ev in events.items:
        ref = ev.object_ref
        if (ev.stage != "ResponseComplete" or ev.verb not in ("update", "patch") or ev.impersonated_user is None
                or ref is None or ref.api_group != m.GROUP or ref.resource != m.Rollout.PLURAL or ref.subresource
                or not ref.namespace or not ref.name or ev.request_received_timestamp is None
                or not 200 <= (ev.response_status.code if ev.response_status else 0) < 300
                or not _sets_approve(ev.request_object)):
            continue
        out.append(ImpersonatedApproval(namespace=ref.namespace, name=ref.name, user=ev.user.username,
                                        impersonated=ev.impersonated_user.username,
                                        at=ev.request_received_timestamp, audit_id=ev.audit_id))
    return out


def parse(body: bytes) -> EventList:
    """The webhook body as an :class:`EventList`.

    Raises:
        ValueError: not JSON, or not an ``EventList`` (the message names the field).
    """
    try:
        events = EventList.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ValueError(f"{where}: {first['msg']}") from None
    if events.kind != "EventList":
        raise ValueError(f"kind: expected EventList, got {events.kind!r}")
    return events


def matches(record: ImpersonatedApproval, annotations: dict[str, str], approved_by_key: str,
            approved_at_key: str) -> bool:
    """Whether the Rollout's recorded approval is the one this audited request made: same
    approver, and ``approved-at`` within :data:`MAX_SKEW_SECONDS` of the request."""
    if annotations.get(approved_by_key) != record.impersonated:
        return False
    try:
        at = datetime.fromisoformat(annotations.get(approved_at_key, "").replace("Z", "+00:00"))
    except ValueError:
        return False
    return abs((at - record.at).total_seconds()) <= MAX_SKEW_SECONDS
