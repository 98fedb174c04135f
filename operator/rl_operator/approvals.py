"""Admission review of approval annotations on Rollouts (pure; the webhook lives in ``handlers``).

An approval is ``rlops.dev/approve=<fingerprint>`` on a Rollout. The mutating admission webhook
refuses an approval that names another fingerprint (stale or wrong), refuses users who lack the
``approve`` verb on ``rollouts.rlops.dev`` (a SubjectAccessReview), and records the approver's
identity from the admission request in ``rlops.dev/approved-by`` and ``rlops.dev/approved-at``,
which nobody else may write. Seed 000 ("operator approval registry") binds approvals to a
fingerprint in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rl_operator.rollout import APPROVE, APPROVED_AT, APPROVED_BY, REJECT, check_manual_approval

APPROVE_VERB = "approve"
_RECORDED = (APPROVED_BY, APPROVED_AT)


@dataclass
class Review:
    """The webhook's verdict: refuse with ``error``; else check ``permission`` (a verb), then set ``annotations``."""

    error: str | None = None
    permission: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)


def review(old: dict[str, str] | None, new: dict[str, str], fingerprint: str, user: str, at: datetime) -> Review:
    """Review one CREATE (``old`` is None) or UPDATE of a Rollout's annotations.

    Args:
        old, new: the annotations before and after.
        fingerprint: the Rollout's ``spec.fingerprint``.
        user: the requesting user's name (from the admission request's userInfo).
        at: now.
    """
    old = old or {}
    approve_changed = new.get(APPROVE) is not None and new.get(APPROVE) != old.get(APPROVE)
    reject_changed = new.get(REJECT) is not None and new.get(REJECT) != old.get(REJECT)
    if not approve_changed and any(new.get(k) != old.get(k) for k in _RECORDED):
        return Review(error=f"{APPROVED_BY} and {APPROVED_AT} are recorded by the rlops admission webhook "
                            f"from the approving request; set {APPROVE}=<fingerprint> instead")
    if approve_changed:
        wrong = check_manual_approval(new, fingerprint)
        if wrong:
            return Review(error=f"approval refused: {wrong}")
        return Review(permission=APPROVE_VERB,
                      annotations={APPROVED_BY: user, APPROVED_AT: at.strftime("%Y-%m-%dT%H:%M:%SZ")})
    if reject_changed:
        return Review(permission=APPROVE_VERB)
    return Review()


def sar_body(userinfo: dict[str, Any], namespace: str, name: str, verb: str = APPROVE_VERB) -> dict[str, Any]:
    """A SubjectAccessReview asking whether this user may ``verb`` this Rollout."""
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": userinfo.get("username"),
            "groups": list(userinfo.get("groups") or []),
            "uid": userinfo.get("uid"),
            "extra": {k: list(v) for k, v in (userinfo.get("extra") or {}).items()},
            "resourceAttributes": {"group": "rlops.dev", "resource": "rollouts", "verb": verb,
                                   "namespace": namespace, "name": name},
        },
    }
