"""The approval rule, whole and pure: who may approve, reject and promote which artifact, how the
approval is recorded and signed, and when the operator honours it. No I/O.

Its adapters stand beside it: ``admission`` (the webhook server, and :func:`admission.decide`,
which asks the API server a SubjectAccessReview and reads the agent), ``audit`` (who
impersonated the approver, from the API server's audit log) and ``policygen`` (the
ValidatingAdmissionPolicies that hold the verbs in the API server itself, generated from these
names). ``rollout`` calls :func:`manual_approval` and :func:`auto_approval` in its pipeline.

The annotations (on a Rollout):

- ``rlops.dev/approve=<fingerprint>``: approve exactly this artifact (seed 000's "operator
  approval registry" binds approvals to a fingerprint in the same way); ``rlops.dev/reject``;
  ``rlops.dev/promote`` (``=full``). Each needs the ``approve`` verb on ``rollouts.rlops.dev``.
- ``rlops.dev/approved-by``, ``rlops.dev/approved-at``, ``rlops.dev/approval-signature``: written
  by the mutating admission webhook from the approving request (:func:`review`), never by a user;
  ``rlops.dev/approved-via``: who impersonated the approver (the webhook, or the operator from
  the audit log).

The webhook signs what it recorded (:func:`signature`: an HMAC-SHA256, keyed by a Secret only
the operator reads, over the Rollout's namespace, name and uid, the fingerprint, the approver,
the time and the signature of the measured evaluation the approver was shown). The operator
honours an annotation approval only with a valid signature (:func:`manual_approval`): with the
webhook disabled or unregistered, no approval by annotation counts, and a hand-written
``approved-by`` never does. Auto-approval (:func:`auto_approval`) compares the operator's own
measured evaluation with the agent's thresholds, and waits for a person on an untrusted one.

Separation of duties: an approval, a rejection or a promotion by a ServiceAccount
(``system:serviceaccount:*``) is refused unless the agent's ``spec.approval.allowedServiceAccounts``
names it (anyone who can create Secrets or pods in a ServiceAccount's namespace can mint its
token); :func:`note_approvers` warns when a listed one lives in the agent's own namespace.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rl_operator import models as m
from rl_operator.conditions import get_condition, set_condition
from rl_operator.models import OPERATOR_USER, rfc3339
from rl_operator.objects import Event

APPROVE = f"{m.GROUP}/approve"
APPROVED_BY = f"{m.GROUP}/approved-by"
APPROVED_AT = f"{m.GROUP}/approved-at"
APPROVE_NOTES = f"{m.GROUP}/approve-notes"
APPROVED_VIA = f"{m.GROUP}/approved-via"
APPROVAL_SIGNATURE = f"{m.GROUP}/approval-signature"
REJECT = f"{m.GROUP}/reject"
PROMOTE = f"{m.GROUP}/promote"
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


# ----------------------------------------------------------------------------- separation of duties, signatures

def service_account_refusal(user: str, allowed: tuple[str, ...] | list[str], action: str = "approvals") -> str | None:
    """Why ``action`` (approvals, rejections, promotions) by ``user`` is refused under
    separation of duties, or None.

    A ServiceAccount approves, rejects or promotes only when the agent's
    ``spec.approval.allowedServiceAccounts`` names it: a workload must not decide on a person's
    behalf, and anyone who can create Secrets or pods in its namespace can act as it.
    """
    if user.startswith(m.SERVICE_ACCOUNT_PREFIX) and user not in allowed:
        return (f"{user} is a ServiceAccount; {action} by ServiceAccounts count only when the agent's "
                "spec.approval.allowedServiceAccounts names them")
    return None


def signature(key: bytes, namespace: str, name: str, uid: str, fingerprint: str, approved_by: str,
              approved_at: str, evidence: str = "") -> str:
    """The approval signature the admission webhook records: ``v2:`` + hex HMAC-SHA256.

    Covers the Rollout's namespace, name and uid (so it can't be copied to another Rollout or to a
    re-created one of the same name), the approved fingerprint, the approver and the time, and
    ``evidence``: the signature of the evaluation the approver was shown (the Rollout's
    ``spec.evaluation.signature``, :func:`evaluation_signature`), so that an approval names the
    figures it was given.
    """
    payload = "\n".join(("rlops-approval-v2", namespace, name, uid, fingerprint, approved_by, approved_at, evidence))
    return "v2:" + hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def signature_valid(key: bytes | None, value: str | None, namespace: str, name: str, uid: str, fingerprint: str,
                    approved_by: str, approved_at: str, evidence: str = "") -> bool:
    """Whether ``value`` is the webhook's signature for exactly this approval (constant-time)."""
    if not key or not value:
        return False
    want = signature(key, namespace, name, uid, fingerprint, approved_by, approved_at, evidence)
    return hmac.compare_digest(value.encode(), want.encode())


# ----------------------------------------------------------------------------- the operator's check

def check_manual_approval(annotations: dict[str, str], fingerprint: str) -> str | None:
    """Why a manual approval annotation is not acceptable for this artifact, or None if it is."""
    value = annotations.get(APPROVE)
    if value is None:
        return None
    if value != fingerprint:
        return (f"{APPROVE}={value!r} does not name this rollout's artifact: its fingerprint is {fingerprint} "
                "(a stale or wrong fingerprint: the artifact you reviewed is not the one that would ship)")
    return None


def manual_approval(rollout: dict[str, Any], key: bytes | None,
                    allowed_service_accounts: list[str]) -> tuple[m.Approval | None, str | None]:
    """The approval the admission webhook recorded on this Rollout, if it still holds.

    It holds when ``approve`` names the Rollout's fingerprint, and ``approved-by``/``approved-at``
    carry the webhook's signature for exactly this Rollout (namespace, name, uid), fingerprint,
    approver and time, and the approver is not a ServiceAccount that the agent's policy leaves out.

    Returns:
        ``(approval, None)``; or ``(None, why)`` when annotations claim an approval that does not
        hold; or ``(None, None)`` when there is no approval.
    """
    ann = rollout["metadata"].get("annotations") or {}
    meta = rollout["metadata"]
    fingerprint = rollout["spec"]["fingerprint"]
    if APPROVE not in ann and APPROVED_BY not in ann:
        return None, None
    if ann.get(APPROVE) != fingerprint:
        return None, check_manual_approval(ann, fingerprint) or f"{APPROVED_BY} without {APPROVE}"
    by, at = ann.get(APPROVED_BY), ann.get(APPROVED_AT)
    if not by or not at:
        return None, (f"{APPROVE} is set but not recorded by the rlops admission webhook (no {APPROVED_BY}): "
                      "is the webhook registered? Annotation approvals count only through it")
    evidence = (rollout["spec"].get("evaluation") or {}).get("signature") or ""
    if not signature_valid(key, ann.get(APPROVAL_SIGNATURE), meta["namespace"], meta["name"], meta["uid"],
                           fingerprint, by, at, evidence):
        return None, (f"the approval by {by!r} has no valid {APPROVAL_SIGNATURE}: it was not recorded by the "
                      "rlops admission webhook for this Rollout, so it does not count")
    refused = service_account_refusal(by, allowed_service_accounts)
    if refused:
        return None, refused
    return m.Approval(
        approved_by=by,
        approved_at=at,
        fingerprint=fingerprint,
        policy="manual",
        notes=ann.get(APPROVE_NOTES),
        via=ann.get(APPROVED_VIA),
    ), None


def auto_approval(
    spec: m.RolloutSpec, policy: m.ApprovalPolicy, stable: m.ActiveModel | None, at: datetime
) -> tuple[m.Approval | None, str]:
    """Apply the agent's auto-approval thresholds (seed 000) to the operator's measured evaluation:
    a Rollout without one, or with one that ran the tenant's code (``trusted: false``, unless the
    policy allows it), waits for a person. Returns ``(approval or None, why)``."""
    if policy.mode != "auto":
        return None, "approval policy is manual"
    mean = spec.evaluation.mean_return
    auto = policy.auto
    failures: list[str] = []
    if spec.evaluation.signature is None:
        failures.append("no evaluation measured by the operator (the trainer's own figures do not count)")
    elif spec.evaluation.trusted is not True and not auto.allow_untrusted_evaluation:
        failures.append("the evaluation ran in the tenant's own image (trusted: false) and "
                        "spec.approval.auto.allowUntrustedEvaluation is not set")
    if mean is None:
        failures.append("no mean evaluation return")
    else:
        if auto.min_mean_return is not None and mean < auto.min_mean_return:
            failures.append(f"mean return {mean} < minMeanReturn {auto.min_mean_return}")
        base = stable.mean_return if stable else None
        if base is not None:
            if auto.min_improvement_over_stable is not None and mean - base < auto.min_improvement_over_stable:
                failures.append(f"improvement over stable {mean - base:+g} < {auto.min_improvement_over_stable}")
            if auto.min_relative_improvement_over_stable is not None:
                rel = (mean - base) / abs(base) if base else float("inf") if mean > base else 0.0
                if rel < auto.min_relative_improvement_over_stable:
                    failures.append(f"relative improvement {rel:+.3f} < {auto.min_relative_improvement_over_stable}")
    if failures:
        return None, "auto-approval refused: " + "; ".join(failures)
    notes = f"mean return {mean}" + (f", stable {stable.mean_return}" if stable else ", no stable version")
    return m.Approval(approved_by="rlops:auto-approval", approved_at=at, fingerprint=spec.fingerprint,
                      policy="auto", notes=notes), notes


def approval_given(status: m.RolloutStatus, annotations: dict[str, str], agent_spec: m.RLAgentSpec) -> bool:
    """Whether the Rollout may move traffic, as far as its approval goes: an approval already
    recorded in its status, one the webhook recorded on it (:func:`reconcile` still checks its
    signature and fingerprint), or an agent whose policy approves automatically; or a shadow
    (observe mode), which uses Serve before approval. The handler reads Serve only then: a
    Rollout that waits for approval needs nothing from Ray."""
    return (status.approval is not None or bool(annotations.get(APPROVED_BY)) or agent_spec.approval.mode == "auto"
            or agent_spec.mode == "observe" or status.shadow is not None)
