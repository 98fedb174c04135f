"""Generate the ValidatingAdmissionPolicies that guard promotion, from the pydantic models.

``python -m rl_operator.policygen --helm charts/rlops/templates/admission-policies.yaml``
(``make crds``) writes them into the chart, from which ``manifests/base`` is rendered;
``tests/unit/test_trust.py`` fails when the committed file drifts.

The API server evaluates these rules itself (CEL, ``admissionregistration.k8s.io/v1``), so they
hold while the operator is down and need no webhook:

1. ``rlops.dev-operator-creates``: only the operator's ServiceAccount creates TrainingRuns and
   Rollouts. RBAC already withholds ``create`` from tenants; this keeps it so if RBAC drifts.
   ``rlops.dev-operator-finalizer``: only the operator removes its finalizer from RLAgents and
   Rollouts (deletion must not skip taking traffic off).
2. ``rlops.dev-promotion-policy``: ``spec.approval`` and ``spec.canary`` (steps and analysis
   thresholds) of an RLAgent change only with the ``approve`` verb on ``rlagents.rlops.dev``.
   A new agent without that verb gets the defaults (the CEL compares with them, generated here
   from the models so that the two cannot drift).
3. ``rlops.dev-rollout-annotations``: on a Rollout, ``rlops.dev/approve``, ``rlops.dev/reject``
   and ``rlops.dev/promote`` (``promote=full`` too) need the ``approve`` verb on
   ``rollouts.rlops.dev``; the recorded ``approved-by``/``approved-at``/``approval-signature``
   change only with an approval, and ``approved-by`` must be the requesting user;
   ``approved-via`` changes only with an approval or by the operator (from the audit log).
   ``rlops.dev/abort`` stays open to ``edit``: it only ever sends traffic back to the stable
   version, which an approver approved (``docs/security.md``).
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from rl_operator import models as m

APPROVE_VERB = "approve"
APPROVER_ROLE = "rlops-approver"
ANN = f"{m.GROUP}/"
APPROVE, REJECT, PROMOTE = ANN + "approve", ANN + "reject", ANN + "promote"
RECORDED = (ANN + "approved-by", ANN + "approved-at", ANN + "approval-signature")
VIA = ANN + "approved-via"


def _lit(value: Any) -> str:
    """A CEL literal for a JSON scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # CEL accepts JSON string escapes in double quotes
    return repr(value)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None`` or ``list[X]``, if any."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def cel_equals(expr: str, model: type[BaseModel], value: dict[str, Any]) -> str:
    """CEL that holds exactly when ``expr`` (an object of ``model``'s schema) equals ``value``.

    Absent optional fields must stay absent and empty lists may be absent; numbers are compared
    through ``double()``/``int()`` so that ``2`` and ``2.0`` compare equal whatever the encoding.

    Args:
        expr: a CEL expression for the object (e.g. ``object.spec.canary``).
        model: the pydantic model of that object.
        value: its wire form (camelCase, as ``_Model.wire()`` returns).
    """
    terms: list[str] = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        sub = f"{expr}.{key}"
        if key not in value:
            terms.append(f"!has({sub})")
            continue
        v = value[key]
        inner = _model_of(info.annotation)
        if isinstance(v, dict) and inner is not None:
            terms.append(f"has({sub}) && {cel_equals(sub, inner, v)}")
        elif isinstance(v, list):
            if not v:
                terms.append(f"(!has({sub}) || size({sub}) == 0)")
                continue
            item_model = _model_of(typing.get_args(info.annotation)[0]) if typing.get_args(info.annotation) else None
            parts = [f"size({sub}) == {len(v)}"]
            for i, item in enumerate(v):
                parts.append(cel_equals(f"{sub}[{i}]", item_model, item) if item_model else f"{sub}[{i}] == {_lit(item)}")
            terms.append(f"has({sub}) && " + " && ".join(f"({p})" for p in parts))
        elif isinstance(v, bool) or isinstance(v, str):
            terms.append(f"has({sub}) && {sub} == {_lit(v)}")
        elif isinstance(v, float):
            terms.append(f"has({sub}) && double({sub}) == {_lit(v)}")
        elif isinstance(v, int):
            terms.append(f"has({sub}) && int({sub}) == {_lit(v)}")
        else:
            raise TypeError(f"cannot express {sub}={v!r} in CEL")
    return "(" + " && ".join(f"({t})" for t in terms) + ")" if terms else "true"


def _policy(name: str, rules: list[dict[str, Any]], validations: list[dict[str, Any]],
            variables: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    spec: dict[str, Any] = {
        "failurePolicy": "Fail",
        "matchConstraints": {"resourceRules": rules},
        "validations": validations,
    }
    if variables:
        spec["variables"] = variables
    policy = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
              "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "rlops"}}, "spec": spec}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "rlops"}},
               "spec": {"policyName": name, "validationActions": ["Deny"]}}
    return [policy, binding]


def _rule(resources: list[str], operations: list[str]) -> dict[str, Any]:
    return {"apiGroups": [m.GROUP], "apiVersions": ["*"], "operations": operations, "resources": resources}


def _may_approve(resource: str) -> str:
    return (f"authorizer.group('{m.GROUP}').resource('{resource}').namespace(request.namespace)"
            f".name(request.name).check('{APPROVE_VERB}').allowed()")


def _refusal(what: str, resource: str) -> str:
    """A messageExpression naming the user, the field and the verb they lack."""
    return (f"'{what} needs the \\'{APPROVE_VERB}\\' verb on {resource}.{m.GROUP} (ClusterRole {APPROVER_ROLE}); '"
            " + request.userInfo.username + ' does not have it'")


def _changed(key: str) -> str:
    old, new = "variables.oldAnnotations", "variables.annotations"
    return (f"(('{key}' in {new}) != ('{key}' in {old}) || "
            f"(('{key}' in {new}) && {new}['{key}'] != {old}['{key}']))")


def policies(operator_user: str = m.OPERATOR_USER) -> list[dict[str, Any]]:
    """Every ValidatingAdmissionPolicy and its binding, in apply order.

    Args:
        operator_user: the operator's user name (its ServiceAccount), the only one allowed to
            create TrainingRuns and Rollouts.
    """
    docs: list[dict[str, Any]] = []
    docs += _policy(
        f"{m.GROUP}-operator-creates",
        [_rule(["trainingruns", "rollouts"], ["CREATE"])],
        [{
            "expression": f"request.userInfo.username == {_lit(operator_user)}",
            "messageExpression": ("'only the rlops operator creates ' + request.resource.resource + "
                                  "' (from an RLAgent); ' + request.userInfo.username + ' may not'"),
            "reason": "Forbidden",
        }],
    )
    fin = f"{m.GROUP}/finalizer"
    docs += _policy(
        f"{m.GROUP}-operator-finalizer",
        [_rule(["rlagents", "rollouts"], ["UPDATE"])],
        [{
            # the finalizer takes a deleted canary off traffic and a deleted agent's Serve app down
            "expression": (f"!has(oldObject.metadata.finalizers) || !({_lit(fin)} in oldObject.metadata.finalizers) "
                           f"|| (has(object.metadata.finalizers) && {_lit(fin)} in object.metadata.finalizers) "
                           f"|| request.userInfo.username == {_lit(operator_user)}"),
            "message": (f"only the rlops operator removes the {fin} finalizer (it takes traffic off a deleted "
                        "canary and removes a deleted agent's Serve application)"),
            "reason": "Forbidden",
        }],
    )
    default_approval = m.ApprovalPolicy().wire()
    default_canary = m.CanarySpec().wire()
    agent_checks = []
    for field_name, model, default, what in (
            ("approval", m.ApprovalPolicy, default_approval, "the approval policy"),
            ("canary", m.CanarySpec, default_canary, "canary steps and analysis thresholds")):
        path = f"object.spec.{field_name}"
        unchanged = f"(has(oldObject.spec.{field_name}) == has({path}) && (!has({path}) || {path} == oldObject.spec.{field_name}))"
        is_default = f"(!has({path}) || {cel_equals(path, model, default)})"
        agent_checks.append({
            "expression": (f"(request.operation == 'UPDATE' ? {unchanged} : {is_default}) "
                           "|| variables.mayApprove"),
            "messageExpression": (f"(request.operation == 'UPDATE' ? 'changing spec.{field_name}' : "
                                  f"'a spec.{field_name} other than the default') + ' ({what})' + "
                                  + _refusal("", "rlagents")),
            "reason": "Forbidden",
        })
    docs += _policy(
        f"{m.GROUP}-promotion-policy",
        [_rule(["rlagents"], ["CREATE", "UPDATE"])],
        agent_checks,
        [{"name": "mayApprove", "expression": _may_approve("rlagents")}],
    )
    by, at, sig = RECORDED
    docs += _policy(
        f"{m.GROUP}-rollout-annotations",
        [_rule(["rollouts"], ["UPDATE"])],
        [
            {
                "expression": f"!{_changed(APPROVE)} || variables.mayApprove",
                "messageExpression": _refusal(f"setting {APPROVE}", "rollouts"),
                "reason": "Forbidden",
            },
            {
                "expression": f"!{_changed(REJECT)} || variables.mayApprove",
                "messageExpression": _refusal(f"setting {REJECT}", "rollouts"),
                "reason": "Forbidden",
            },
            {
                # adding or changing promote moves the canary on; removing it (the operator, once
                # the step has consumed it) is harmless
                "expression": (f"!('{PROMOTE}' in variables.annotations) || ('{PROMOTE}' in variables.oldAnnotations"
                               f" && variables.oldAnnotations['{PROMOTE}'] == variables.annotations['{PROMOTE}'])"
                               " || variables.mayApprove"),
                "messageExpression": _refusal(f"setting {PROMOTE} (skipping a pause, an analysis or, with =full, "
                                              "the whole canary)", "rollouts"),
                "reason": "Forbidden",
            },
            {
                "expression": f"!({' || '.join(_changed(k) for k in RECORDED)}) || {_changed(APPROVE)}",
                "message": (f"{by}, {at} and {sig} are recorded by the rlops admission webhook from the "
                            f"approving request; set {APPROVE}=<fingerprint> instead"),
                "reason": "Forbidden",
            },
            {
                "expression": (f"!{_changed(VIA)} || {_changed(APPROVE)} || "
                               f"request.userInfo.username == {_lit(operator_user)}"),
                "message": (f"{VIA} is recorded by rlops (by the admission webhook from the approving request, or "
                            "by the operator from the API server's audit log)"),
                "reason": "Forbidden",
            },
            {
                "expression": (f"!{_changed(APPROVE)} || !('{by}' in variables.annotations) || "
                               f"variables.annotations['{by}'] == request.userInfo.username"),
                "message": f"{by} must name the user who sets {APPROVE}",
                "reason": "Forbidden",
            },
        ],
        [
            {"name": "annotations",
             "expression": "has(object.metadata.annotations) ? object.metadata.annotations : {}"},
            {"name": "oldAnnotations",
             "expression": "has(oldObject.metadata.annotations) ? oldObject.metadata.annotations : {}"},
            {"name": "mayApprove", "expression": _may_approve("rollouts")},
        ],
    )
    return docs


def render() -> str:
    header = ("# Generated by `make crds` (python -m rl_operator.policygen) from rl_operator/models.py. Do not edit.\n"
              "# The API server enforces these itself: they hold while the operator is down (docs/security.md).\n")
    return header + yaml.safe_dump_all(policies(), sort_keys=False, width=120)


#: Prepended to the chart's copy (``charts/rlops/templates/admission-policies.yaml``): the
#: policies name the operator's ServiceAccount in ``rlops-system``, so the chart installs there.
HELM_HEADER = '{{- include "rlops.checkNamespace" . -}}\n'


def main(argv: list[str] | None = None) -> int:
    """``policygen [--helm] OUT``: write the policies to OUT (``--helm``: the chart's template)."""
    args = sys.argv[1:] if argv is None else argv
    helm = "--helm" in args
    args = [a for a in args if a != "--helm"]
    out = Path(args[0] if args else "charts/rlops/templates/admission-policies.yaml")
    out.write_text((HELM_HEADER if helm else "") + render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
