"""Admission review of approval annotations on Rollouts (pure; the webhook lives in ``handlers``).

An approval is ``rlops.dev/approve=<fingerprint>`` on a Rollout. The mutating admission webhook
refuses an approval that names another fingerprint (stale or wrong), refuses users who lack the
``approve`` verb on ``rollouts.rlops.dev`` (a SubjectAccessReview), and records the approver's
identity from the admission request in ``rlops.dev/approved-by`` and ``rlops.dev/approved-at``,
which nobody else may write. Seed 000 ("operator approval registry") binds approvals to a
fingerprint in the same way.

The webhook also signs what it recorded (``rlops.dev/approval-signature``: an HMAC-SHA256, keyed
by a Secret only the operator reads, over the Rollout's namespace, name and uid, the fingerprint,
the approver and the time). The operator honours an annotation approval only with a valid
signature: with the webhook disabled or unregistered, no approval by annotation counts, and a
hand-written ``approved-by`` never does.

Separation of duties: an approval, a rejection or a promotion by a ServiceAccount
(``system:serviceaccount:*``) is refused unless the agent's ``spec.approval.allowedServiceAccounts``
names it (anyone who can create Secrets or pods in a ServiceAccount's namespace can mint its token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rl_operator.rollout import APPROVAL_SIGNATURE, APPROVE, APPROVED_AT, APPROVED_BY, APPROVED_VIA, PROMOTE, \
    REJECT, check_manual_approval
from rl_operator import models as m
from rl_operator.conditions import get_condition, set_condition
from rl_operator.models import OPERATOR_USER, rfc3339
from rl_operator.training import Event
from rl_operator.trust import service_account_refusal, signature

APPROVE_VERB = "approve"
RECORDED = (APPROVED_BY, APPROVED_AT, APPROVED_VIA, APPROVAL_SIGNATURE)
#: The annotations that decide promotion, and what the refusal calls an action of each.
DECISIONS = {APPROVE: "approvals", REJECT: "rejections", PROMOTE: "promotions"}


def decisions(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """The deciding annotations (:data:`DECISIONS`) that ``new`` sets to a new value (added or
    changed; a removal decides nothing: the operator removes ``promote`` once a step took it)."""
    old = old or {}
    return [k for k in DECISIONS if new.get(k) is not None and new.get(k) != old.get(k)]


@dataclass
class Review:
    """The webhook's verdict: refuse with ``error``; else check ``permission`` (a verb), then set ``annotations``."""

    error: str | None = None
    permission: str | None = None
    annotations: dict[str, str | None] = field(default_factory=dict)  # None removes one


@dataclass(frozen=True)
class Requester:
    """Who sent the admission request: ``user`` as authorized, and the user who impersonated
    them (``kubectl --as``), when the API server reports one."""

    user: str
    impersonator: str | None = None


@dataclass(frozen=True)
class Target:
    """The Rollout under review and what its approval is bound to."""

    namespace: str
    name: str
    uid: str
    fingerprint: str
    allowed_service_accounts: tuple[str, ...] = ()
    #: The signature of the evaluation the approver is shown (``spec.evaluation.signature``): the
    #: approval's signature covers it.
    evidence: str = ""


def review(old: dict[str, str] | None, new: dict[str, str], target: Target, who: Requester, at: datetime,
           key: bytes | None) -> Review:
    """Review one CREATE (``old`` is None) or UPDATE of a Rollout's annotations.

    Args:
        old, new: the annotations before and after.
        target: the Rollout (identity, fingerprint, the agent's allowed ServiceAccounts).
        who: the requesting user (from the admission request's userInfo).
        at: now.
        key: the approval signing key; None refuses every approval (the key is not loaded yet).
    """
    old = old or {}
    decided = decisions(old, new)
    approve_changed = APPROVE in decided
    if not approve_changed and who.user == OPERATOR_USER and all(
            new.get(k) == old.get(k) for k in RECORDED if k != APPROVED_VIA):
        return Review()  # the operator records an impersonator from the audit log (rl_operator.audit)
    if not approve_changed and any(new.get(k) != old.get(k) for k in RECORDED):
        return Review(error=f"{APPROVED_BY} and {APPROVED_AT} are recorded by the rlops admission webhook "
                            f"from the approving request; set {APPROVE}=<fingerprint> instead")
    for ann in decided:  # separation of duties: a ServiceAccount decides only when listed
        wrong = service_account_refusal(who.user, target.allowed_service_accounts, DECISIONS[ann])
        if wrong:
            return Review(error=f"{ann} refused: {wrong}")
    if approve_changed:
        wrong = check_manual_approval(new, target.fingerprint)
        if wrong:
            return Review(error=f"approval refused: {wrong}")
        if key is None:
            return Review(error="approval refused: the operator has not loaded its approval signing key yet; retry")
        stamp = rfc3339(at)
        recorded = {APPROVED_BY: who.user, APPROVED_AT: stamp}
        # a new approval replaces the record of an earlier one, impersonator included
        recorded[APPROVED_VIA] = f"impersonated by {who.impersonator}" if who.impersonator else None
        recorded[APPROVAL_SIGNATURE] = signature(key, target.namespace, target.name, target.uid, target.fingerprint,
                                                 who.user, stamp, target.evidence)
        return Review(permission=APPROVE_VERB, annotations=recorded)
    return Review(permission=APPROVE_VERB) if decided else Review()  # reject, promote: the verb


def impersonator(userinfo: dict[str, Any]) -> str | None:
    """The user behind an impersonated request, if the API server reports it in ``extra``.

    Kubernetes 1.34 puts no such key in admission requests by default; kept for API servers
    (and authenticating proxies) that do.
    """
    extra = userinfo.get("extra") or {}
    for key in ("authentication.kubernetes.io/impersonator", "impersonator.kubernetes.io/original-user"):
        values = extra.get(key) or []
        if values:
            return str(values[0])
    return None


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


#: The agent condition that says whether an approver ServiceAccount shares the agent's namespace.
APPROVERS_ISOLATED = "ApproversIsolated"


def note_approvers(status: m.RLAgentStatus, spec: m.RLAgentSpec, namespace: str, at: datetime) -> list[Event]:
    """Warn when ``spec.approval.allowedServiceAccounts`` lists a ServiceAccount of the agent's own
    namespace: whoever may create Secrets or pods there (the agent's own tenants, with ``edit``)
    can mint its token and approve as it. Sets the condition :data:`APPROVERS_ISOLATED` (False,
    reason ``ServiceAccountInAgentNamespace``; True once none is left) and returns a Warning Event
    when it turns False. An agent that never listed one gets no condition."""
    local = [sa for sa in spec.approval.allowed_service_accounts
             if sa.startswith(f"{m.SERVICE_ACCOUNT_PREFIX}{namespace}:")]
    before = get_condition(status.conditions, APPROVERS_ISOLATED)
    if not local:
        if before is not None or spec.approval.allowed_service_accounts:
            set_condition(status.conditions, APPROVERS_ISOLATED, "True", "ServiceAccountsElsewhere",
                          "no ServiceAccount in spec.approval.allowedServiceAccounts lives in this agent's namespace", at)
        return []
    message = (f"spec.approval.allowedServiceAccounts lists {', '.join(local)}, in this agent's own namespace "
               f"{namespace}: anyone who may create Secrets or pods here can mint its token and approve as it. "
               "Keep approver ServiceAccounts in a namespace where tenants create neither")
    set_condition(status.conditions, APPROVERS_ISOLATED, "False", "ServiceAccountInAgentNamespace", message, at)
    if before is not None and before.status == "False" and before.message == message:
        return []
    return [Event("Warning", "ApproverInAgentNamespace", message)]
