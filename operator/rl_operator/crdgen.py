"""Generate the CustomResourceDefinitions in ``crds/`` from the pydantic models.

``python -m rl_operator.crdgen crds/`` (``make crds``) writes one YAML file per kind;
``tests/unit/test_crds.py`` fails when the committed files drift from this output.

Pydantic emits JSON Schema (draft 2020-12) with ``$ref``/``$defs``, ``anyOf`` for optionals and
``title`` everywhere; a Kubernetes *structural* schema needs every node typed and inlined.
``structural`` performs that translation and adds the CRD defaults (``default: {}`` on
optional sub-objects of ``spec``, so the API server fills in their own defaults).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from rl_operator import models as m

_DROP = {"title", "$defs"}


def structural(schema: dict[str, Any], defs: dict[str, Any], *, in_spec: bool) -> dict[str, Any]:
    """Translate one pydantic JSON-Schema node into a structural OpenAPI v3 node.

    Args:
        schema: the node, as produced by ``model_json_schema(by_alias=True)``.
        defs: the ``$defs`` table of the root schema, for resolving ``$ref``.
        in_spec: True under ``spec`` (keep defaults, default sub-objects to ``{}``);
            False under ``status`` (no defaults: the operator writes status whole).
    Returns:
        A new dict; the input is not modified.
    """
    node = copy.deepcopy(schema)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**copy.deepcopy(target), **node}
    if "anyOf" in node:  # Optional[X] -> X (absence, not null, is how the API says "unset")
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express anyOf {branches} structurally")
        node = {**structural(branches[0], defs, in_spec=in_spec), **node}
    for key in _DROP:
        node.pop(key, None)
    keep_absent = bool(node.pop(m.NO_DEFAULT, False))
    if node.get("default", 0) is None or not in_spec:
        node.pop("default", None)
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node.pop("additionalProperties", None)
        return node
    if "properties" in node:
        node["type"] = "object"
        node.pop("additionalProperties", None)  # extra="forbid" is pruning's job on the server
        required = set(node.get("required", []))
        props = {}
        for name, sub in node["properties"].items():
            child = structural(sub, defs, in_spec=in_spec)
            if in_spec and name not in required and child.get("type") == "object" and "default" not in child \
                    and not child.pop("x-keep-absent", False):
                child["default"] = {}
            child.pop("x-keep-absent", None)
            props[name] = child
        node["properties"] = props
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = structural(node["additionalProperties"], defs, in_spec=in_spec)
    if isinstance(node.get("items"), dict):
        node["items"] = structural(node["items"], defs, in_spec=in_spec)
    if node.get("format") == "date-time":
        node["type"] = "string"
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        # JSON Schema 2020-12 (pydantic's gt/lt) -> OpenAPI v3.0 (Kubernetes): a bound and a flag
        if isinstance(node.get(exclusive), (int, float)) and not isinstance(node[exclusive], bool):
            node[bound], node[exclusive] = node[exclusive], True
    if keep_absent:
        node["x-keep-absent"] = True  # read (and removed) by the parent's properties loop
    return node


def _schema_of(model: type[BaseModel], *, in_spec: bool) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}), in_spec=in_spec)


def _column(name: str, path: str, type_: str = "string", priority: int = 0, **extra: Any) -> dict[str, Any]:
    col = {"name": name, "type": type_, "jsonPath": path, **extra}
    if priority:
        col["priority"] = priority
    return col


_AGE = _column("Age", ".metadata.creationTimestamp", "date")

KINDS: dict[str, dict[str, Any]] = {
    "RLAgent": {
        "models": (m.RLAgentSpec, m.RLAgentStatus),
        "plural": "rlagents",
        "short": ["rla"],
        "columns": [
            _column("Phase", ".status.phase"),
            _column("Latest Run", ".status.latestRun"),
            _column("Mean Return", ".status.latestMeanReturn", "number"),
            _column("Active", ".status.activeModel.version"),
            _column("Shadow", ".status.shadow.progress"),
            _column("Env", ".spec.environment.id", priority=1),
            _column("Algorithm", ".spec.algorithm.name", priority=1),
            _column("Fingerprint", ".status.latestFingerprint", priority=1),
            _column("Last Schedule", ".status.lastScheduleTime", "date", priority=1),
            _column("Suspend", ".spec.suspend", "boolean", priority=1),
            _AGE,
        ],
        # Children are named <agent>-<generation>; a Job name (and so its pods' job-name
        # label) must stay within 63 characters (training.run_name shortens the agent part of
        # the longer names of runs that later triggers start).
        "root_rules": [
            m._cel("self.metadata.name.size() <= 52", "metadata.name must be at most 52 characters")
        ],
    },
    "TrainingRun": {
        "models": (m.TrainingRunSpec, m.TrainingRunStatus),
        "plural": "trainingruns",
        "short": ["trun"],
        "columns": [
            _column("Agent", ".spec.agentRef.name"),
            _column("Trigger", ".spec.trigger.reason"),
            _column("Phase", ".status.phase"),
            _column("Mean Return", ".status.evaluation.meanReturn", "number"),
            _column("Evaluation", ".status.evaluation.phase"),
            _column("Reason", ".status.failureReason"),
            _column("Reported", ".status.metrics.meanReturn", "number", priority=1),
            _column("Fingerprint", ".status.fingerprint", priority=1),
            _column("Artifact", ".status.artifactURI", priority=1),
            _AGE,
        ],
        "root_rules": [],
    },
    "Rollout": {
        "models": (m.RolloutSpec, m.RolloutStatus),
        "plural": "rollouts",
        "short": ["rlro"],
        "columns": [
            _column("Agent", ".spec.agentRef.name"),
            _column("Phase", ".status.phase"),
            _column("Weight", ".status.canaryWeight", "integer"),
            _column("Stable", ".status.stableVersion"),
            _column("Approved By", ".status.approval.approvedBy"),
            _column("Mean Return", ".spec.evaluation.meanReturn", "number", priority=1),
            _column("Trusted", ".spec.evaluation.trusted", "boolean", priority=1),
            _column("Evaluator", ".spec.evaluation.evaluatorImageID", priority=1),
            _column("Fingerprint", ".spec.fingerprint", priority=1),
            _column("Analysis", ".status.analysis.phase", priority=1),
            _column("Agreement", ".status.shadow.agreementRate", "number", priority=1),
            _column("Message", ".status.message", priority=1),
            _AGE,
        ],
        "root_rules": [],
    },
}


def crd(kind: str) -> dict[str, Any]:
    """The full CustomResourceDefinition manifest for one kind (a JSON-ready dict)."""
    info = KINDS[kind]
    spec_model, status_model = info["models"]
    root: dict[str, Any] = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _schema_of(spec_model, in_spec=True),
            "status": _schema_of(status_model, in_spec=False),
        },
    }
    if info["root_rules"]:
        root["x-kubernetes-validations"] = info["root_rules"]
    plural = info["plural"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{m.GROUP}"},
        "spec": {
            "group": m.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": info["short"],
                "categories": ["rlops"],
            },
            "versions": [
                {
                    "name": m.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": info["columns"],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render(kind: str) -> str:
    """The YAML text committed as ``crds/rlops.dev_<plural>.yaml``."""
    header = "# Generated by `make crds` (python -m rl_operator.crdgen) from rl_operator/models.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(kind), sort_keys=False, width=120)


def filename(kind: str) -> str:
    return f"{m.GROUP}_{KINDS[kind]['plural']}.yaml"


PEERING_FILENAME = "kopf.dev_clusterkopfpeerings.yaml"


def peering_crd() -> dict[str, Any]:
    """kopf's ClusterKopfPeering (``kopf.dev/v1``): the object through which the operator's
    replicas see each other (``--peering``); each writes a keep-alive record with its priority
    under ``status``, and only the highest works."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "clusterkopfpeerings.kopf.dev"},
        "spec": {
            "scope": "Cluster",
            "group": "kopf.dev",
            "names": {"kind": "ClusterKopfPeering", "plural": "clusterkopfpeerings", "singular": "clusterkopfpeering"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}},
            }],
        },
    }


def render_peering() -> str:
    """The YAML text committed as ``crds/kopf.dev_clusterkopfpeerings.yaml``."""
    return "# Generated by `make crds` (python -m rl_operator.crdgen). Do not edit.\n" + yaml.safe_dump(
        peering_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "crds")
    out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        (out / filename(kind)).write_text(render(kind))
        print(f"wrote {out / filename(kind)}")
    (out / PEERING_FILENAME).write_text(render_peering())
    print(f"wrote {out / PEERING_FILENAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
