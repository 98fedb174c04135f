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
   from the models so that the two cannot drift). A ServiceAccount changes them only when the
   agent's ``spec.approval.allowedServiceAccounts`` named it before the change, and never
   changes that list (anyone who can create Secrets or pods in an SA's namespace can act as it).
3. ``rlops.dev-rollout-annotations``: on a Rollout, ``rlops.dev/approve``, ``rlops.dev/reject``
   and ``rlops.dev/promote`` (``promote=full`` too) need the ``approve`` verb on
   ``rollouts.rlops.dev``; the recorded ``approved-by``/``approved-at``/``approval-signature``
   change only with an approval, and ``approved-by`` must be the requesting user;
   ``approved-via`` changes only with an approval or by the operator (from the audit log).
   ``rlops.dev/abort`` stays open to ``edit``: it only ever sends traffic back to the stable
   version, which an approver approved (``docs/security.md``).
4. ``rlops.dev-bounded-arguments``: the free-form ``spec.environment.kwargs`` and
   ``spec.algorithm.hyperparameters`` of an RLAgent hold scalars, short lists and small maps
   only (a CRD's own rules cannot look inside free-form values).
5. ``rlops.dev-trainer-images``: an RLAgent's ``spec.training.image`` is one the platform allows
   (the chart's ``training.allowedImages``, written into the policy).
6. ``rlops.dev-reserved-job-labels`` and ``rlops.dev-reserved-pod-labels``: the labels the
   operator acts on (``models.RESERVED_LABELS``) are set on Jobs by the operator only, and on
   pods by the Job controller only, for a Job.
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
from rl_operator.approvals import APPROVAL_SIGNATURE, APPROVE, APPROVE_VERB, APPROVED_AT, APPROVED_BY, APPROVED_VIA, \
    PROMOTE, REJECT

APPROVER_ROLE = "rlops-approver"
#: What the webhook records, less ``approved-via`` (which the operator also writes, from the audit log).
RECORDED = (APPROVED_BY, APPROVED_AT, APPROVAL_SIGNATURE)
VIA = APPROVED_VIA


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


#: The users the Job controller acts as: its own ServiceAccount (kube-controller-manager with
#: ``--use-service-account-credentials``, as kubeadm and managed clusters run it) or the
#: controller manager's shared identity.
JOB_CONTROLLER_USERS = ("system:serviceaccount:kube-system:job-controller", "system:kube-controller-manager")


#: The trainer images an agent may name by default (the chart's ``training.allowedImages``): the
#: repository of the engine image.
DEFAULT_ALLOWED_IMAGES = (m.DEFAULT_TRAINER_IMAGE.rsplit(":", 1)[0],)
#: The chart's template of that list, as a CEL list literal (JSON is one).
HELM_ALLOWED_IMAGES = "{{ .Values.training.allowedImages | toJson }}"


def _trainer_images(helm: bool) -> list[dict[str, Any]]:
    """``rlops.dev-trainer-images``: an RLAgent's ``spec.training.image`` is one that the
    platform allows: a repository (any tag or digest of it), a whole reference, a prefix ending
    in ``/``, or ``*``. The list is written into the policy itself (the chart renders it from
    ``training.allowedImages``; ``helm``: that template, else :data:`DEFAULT_ALLOWED_IMAGES`).
    Not a policy parameter: the API server (1.34) kept refusing every agent with "no params
    found" after the parameter's ConfigMap was deleted and made again (an uninstall and install)."""
    image = "object.spec.training.image"
    allowed = ("variables.allowed.exists(a, a == '*' || {i} == a || {i}.startsWith(a + ':') || "
               "{i}.startsWith(a + '@') || (a.endsWith('/') && {i}.startsWith(a)))").format(i=image)
    return _policy(
        f"{m.GROUP}-trainer-images",
        [_rule(["rlagents"], ["CREATE", "UPDATE"])],
        [{"expression": f"!has(object.spec.training) || !has({image}) || {allowed}",
          "messageExpression": (f"'spec.training.image: ' + {image} + ' is not an allowed trainer image (the platform "
                                "allows: ' + variables.allowed.join(', ') + '; the chart value training.allowedImages)'"),
          "reason": "Invalid"}],
        [{"name": "allowed", "expression": HELM_ALLOWED_IMAGES if helm else json.dumps(list(DEFAULT_ALLOWED_IMAGES))}],
    )


def _reserved(labels: str) -> str:
    """CEL: the reserved labels among ``labels`` (a map), as ``key=value`` strings in the fixed
    order of ``models.RESERVED_LABELS`` (so that two of them compare with ``==``)."""
    return f"{_lit(list(m.RESERVED_LABELS))}.filter(k, k in {labels}).map(k, k + '=' + {labels}[k])"


def _labels_of(obj: str, path: str = "metadata") -> str:
    """CEL: the labels map at ``<obj>.<path>.labels``, or an empty map."""
    parts = f"{obj}.{path}".split(".")
    checks = " && ".join(f"has({'.'.join(parts[:i + 1])})" for i in range(1, len(parts)))
    return f"{checks} && has({obj}.{path}.labels) ? {obj}.{path}.labels : {{}}"


def _reserved_labels(operator_user: str) -> list[dict[str, Any]]:
    """The policies that reserve the operator's labels (``models.RESERVED_LABELS``) on Jobs and pods.

    A Job with one (on itself or in its pod template), or with one changed, is the operator's
    alone. A pod may carry one only when the Job controller made it for a Job (its controller
    ownerReference), from such a Job's template; a change of one on an existing pod is refused.
    Objects that keep their reserved labels as they were pass (status writes, finalizers, the
    garbage collector), whoever writes them."""
    names = ", ".join(m.RESERVED_LABELS)
    job_vars = [  # a variable may use only the ones before it
        {"name": "labels", "expression": _labels_of("object")},
        {"name": "templateLabels", "expression": _labels_of("object", "spec.template.metadata")},
        {"name": "oldLabels", "expression": "request.operation == 'UPDATE' ? "
                                            f"({_labels_of('oldObject')}) : {{}}"},
        {"name": "oldTemplateLabels", "expression": "request.operation == 'UPDATE' ? "
                                                    f"({_labels_of('oldObject', 'spec.template.metadata')}) : {{}}"},
        {"name": "reserved", "expression": f"{_reserved('variables.labels')} + "
                                           f"{_reserved('variables.templateLabels')}"},
        {"name": "oldReserved", "expression": f"{_reserved('variables.oldLabels')} + "
                                              f"{_reserved('variables.oldTemplateLabels')}"},
    ]
    docs = _policy(
        f"{m.GROUP}-reserved-job-labels",
        [{"apiGroups": ["batch"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"], "resources": ["jobs"]}],
        [{
            "expression": f"variables.reserved == variables.oldReserved || request.userInfo.username == {_lit(operator_user)}",
            "messageExpression": (f"'the labels {names} on a Job and its pod template are set by the rlops operator "
                                  "only; ' + request.userInfo.username + ' may not set or change them'"),
            "reason": "Forbidden",
        }],
        job_vars,
    )
    made_for_a_job = ("has(object.metadata.ownerReferences) && object.metadata.ownerReferences.exists(r, "
                      "has(r.controller) && r.controller && r.kind == 'Job' && r.apiVersion.startsWith('batch/'))")
    pod_vars = [
        {"name": "labels", "expression": _labels_of("object")},
        {"name": "reserved", "expression": _reserved("variables.labels")},
        {"name": "oldLabels", "expression": f"request.operation == 'UPDATE' ? ({_labels_of('oldObject')}) : {{}}"},
        {"name": "oldReserved", "expression": _reserved("variables.oldLabels")},
    ]
    docs += _policy(
        f"{m.GROUP}-reserved-pod-labels",
        [{"apiGroups": [""], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"], "resources": ["pods"]}],
        [{
            "expression": (f"variables.reserved == variables.oldReserved || (request.operation == 'CREATE' && "
                           f"request.userInfo.username in {_lit(list(JOB_CONTROLLER_USERS))} && {made_for_a_job})"),
            "messageExpression": (f"'the labels {names} on a pod are set by the Job controller, from a Job of the "
                                  "rlops operator, only; ' + request.userInfo.username + ' may not set or change them'"),
            "reason": "Forbidden",
        }],
        pod_vars,
    )
    return docs


def policies(operator_user: str = m.OPERATOR_USER, helm: bool = False) -> list[dict[str, Any]]:
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
        as_before = f"(request.operation == 'UPDATE' ? {unchanged} : {is_default})"
        changing = (f"(request.operation == 'UPDATE' ? 'changing spec.{field_name}' : "
                    f"'a spec.{field_name} other than the default') + ' ({what})'")
        agent_checks.append({
            "expression": f"{as_before} || variables.mayApprove",
            "messageExpression": f"{changing} + " + _refusal("", "rlagents"),
            "reason": "Forbidden",
        })
        # a ServiceAccount's token can be minted by anyone who may create Secrets or pods in its
        # namespace: it decides promotion only when a person listed it on this very agent
        agent_checks.append({
            "expression": f"{as_before} || !variables.isServiceAccount || variables.listedBefore",
            "messageExpression": (f"{changing} + ' by a ServiceAccount needs the agent\\'s "
                                  f"spec.approval.allowedServiceAccounts (set by a person) to name it; ' + "
                                  "request.userInfo.username + ' is not listed'"),
            "reason": "Forbidden",
        })
    agent_checks.append({
        "expression": ("!variables.isServiceAccount || (request.operation == 'UPDATE' ? "
                       "variables.oldServiceAccounts == variables.serviceAccounts : "
                       "size(variables.serviceAccounts) == 0)"),
        "messageExpression": ("'spec.approval.allowedServiceAccounts is set by a person, never by a ServiceAccount; ' + "
                              "request.userInfo.username + ' is one'"),
        "reason": "Forbidden",
    })
    sas = "spec.approval.allowedServiceAccounts"
    docs += _policy(
        f"{m.GROUP}-promotion-policy",
        [_rule(["rlagents"], ["CREATE", "UPDATE"])],
        agent_checks,
        [{"name": "mayApprove", "expression": _may_approve("rlagents")},
         {"name": "isServiceAccount",
          "expression": f"request.userInfo.username.startsWith({_lit(m.SERVICE_ACCOUNT_PREFIX)})"},
         {"name": "serviceAccounts",
          "expression": f"has(object.spec.approval) && has(object.{sas}) ? object.{sas} : []"},
         {"name": "oldServiceAccounts",
          "expression": (f"request.operation == 'UPDATE' && has(oldObject.spec.approval) && has(oldObject.{sas}) "
                         f"? oldObject.{sas} : []")},
         {"name": "listedBefore", "expression": "request.userInfo.username in variables.oldServiceAccounts"}],
    )
    docs += _policy(
        f"{m.GROUP}-bounded-arguments",
        [_rule(["rlagents"], ["CREATE", "UPDATE"])],
        [{"expression": (f"!has(object.spec.{parent}) || !has(object.spec.{parent}.{name}) || "
                         f"{m.free_form_bound(f'object.spec.{parent}.{name}')}"),
          "message": f"spec.{parent}.{name}: {m.FREE_FORM_BOUND_MESSAGE}", "reason": "Invalid"}
         for parent, name in (("environment", "kwargs"), ("algorithm", "hyperparameters"))],
    )
    docs += _trainer_images(helm)
    docs += _reserved_labels(operator_user)
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


def render(helm: bool = False) -> str:
    """The policies as YAML (``helm``: the chart's template, whose allowed trainer images come
    from its values)."""
    header = ("# Generated by `make crds` (python -m rl_operator.policygen) from rl_operator/models.py. Do not edit.\n"
              "# The API server enforces these itself: they hold while the operator is down (docs/security.md).\n")
    return header + yaml.safe_dump_all(policies(helm=helm), sort_keys=False, width=120)


#: Prepended to the chart's copy (``charts/rlops/templates/admission-policies.yaml``): the
#: policies name the operator's ServiceAccount in ``rlops-system``, so the chart installs there.
HELM_HEADER = '{{- include "rlops.checkNamespace" . -}}\n'


def main(argv: list[str] | None = None) -> int:
    """``policygen [--helm] OUT``: write the policies to OUT (``--helm``: the chart's template)."""
    args = sys.argv[1:] if argv is None else argv
    helm = "--helm" in args
    args = [a for a in args if a != "--helm"]
    out = Path(args[0] if args else "charts/rlops/templates/admission-policies.yaml")
    out.write_text((HELM_HEADER if helm else "") + render(helm))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
