"""Fuzz: mutated RLAgent specs through the real API server and the operator (docs/security.md).

Each spec is a valid base spec with one to three mutations drawn from the RLAgent CRD's own
schema: a field set to a boundary value, an out-of-range value, a value of the wrong type or
an odd string; a field deleted; an unknown field added; a map given an odd key; an odd name.
Every spec must end one of two ways:

- refused at admission (400 or 422), with the message naming the field; or
- accepted, and then its first TrainingRun reaches ``Succeeded`` or ``Failed`` with a reason (or
  ``Superseded``, by a later run of its own triggers); or, with ``suspend: true``, it makes no
  run and says so (condition ``TriggerWaiting``, reason ``Suspended``).

And the operator logs no traceback for any of them. The training pods never run: the base
spec pins them to a node pool that does not exist and to a one-minute Job deadline, and the
generator keeps those two settings (or replaces the deadline with a value the API server must
refuse), so every accepted spec ends ``Failed`` with ``DeadlineExceeded`` or another reason
the operator gives (a Job the API server refused, for instance).

``RLOPS_FUZZ_SPECS`` (default 500) and ``RLOPS_FUZZ_SEED`` (default 20261202) choose the specs;
a failure prints the seed, the spec and what happened to it.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import time
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from support import REPO

SPECS = int(os.environ.get("RLOPS_FUZZ_SPECS", "500"))
SEED = int(os.environ.get("RLOPS_FUZZ_SEED", "20261202"))
GROUP, VERSION, PLURAL = "rlops.dev", "v1alpha1", "rlagents"

POOL = ("rlops.dev/test-pool", "none")
DEADLINE = 60  # the smallest activeDeadlineSeconds the schema allows
#: deadlines the API server must refuse: a spec carrying one is refused, so its pods never run
BAD_DEADLINES = (59, 0, -1, 604801, 10**12, "60", 60.5, True, [], {})

BASE: dict[str, Any] = {
    "environment": {"id": "CartPole-v1", "numEnvs": 4, "backend": "gymnasium", "kwargs": {}},
    "algorithm": {"name": "PPO", "hyperparameters": {"learningRate": 0.0003, "gaeLambda": 0.95}},
    "training": {
        "totalTimesteps": 20480, "seed": 1, "evalInterval": 10240, "image": "ghcr.io/rlops/engine:dev",
        "resources": {"gpu": 1, "cpu": "500m", "memory": "1Gi"}, "backoffLimit": 0,
        "activeDeadlineSeconds": DEADLINE, "nodeSelector": {POOL[0]: POOL[1]},
        "tolerations": [{"key": "example.com/spot", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "evaluation": {"episodes": 5},
    "approval": {"mode": "manual"},
    "serving": {"enabled": False},
    "canary": {"steps": [{"setWeight": 10}, {"pause": {"durationSeconds": 30}}, {"setWeight": 50}]},
    "mode": "active",
}

ODD_STRINGS = ("", " ", "a b", "x" * 600, "ünïcødé", "../../etc/passwd", "/abs/path", "-1", "0", "1e3",
               "NaN", "500m", "2Gi", "CartPole-v1", "mod:Class", "a/b", "bad key!", "${HOME}", "\t", "null")
ODD_NUMBERS = (0, -1, 1, 2**31, 2**63 - 1, 2**63, 10**30, -(10**30), 0.5, -0.5, 1e300, -1e300, 1e-300)
WRONG_TYPES = (None, True, False, "x", 7, 3.5, [], [1], {}, {"k": "v"})
ODD_KEYS = ("bad key!", "a/b/c", "x" * 300, "example.com/ok", "-lead", "trail-", "ü", "", "k" * 63, "k" * 64)


def crd_spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / "rlops.dev_rlagents.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def schema_paths(schema: dict[str, Any], path: tuple = ()) -> list[tuple[tuple, dict[str, Any]]]:
    """Every (path, subschema) under ``schema``; array items appear as index 0, map values as key 'k'."""
    out = [(path, schema)] if path else []
    for key, sub in (schema.get("properties") or {}).items():
        out += schema_paths(sub, (*path, key))
    if isinstance(schema.get("items"), dict):
        out += schema_paths(schema["items"], (*path, 0))
    if isinstance(schema.get("additionalProperties"), dict):
        out += schema_paths(schema["additionalProperties"], (*path, "k"))
    return out


def candidates(schema: dict[str, Any]) -> list[Any]:
    """Values worth trying for a field of this schema: boundaries, just-outside, wrong types, odd strings."""
    kind, vals = schema.get("type"), list(WRONG_TYPES)
    if "enum" in schema:
        vals += list(schema["enum"]) * 3 + ["Bogus", str(schema["enum"][0]).lower()]
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        vals += list(ODD_NUMBERS) + [v for b in (lo, hi) if b is not None for v in (b - 1, b, b + 1)]
    elif kind == "number":
        vals += list(ODD_NUMBERS) + ["1.0"]
    elif kind == "string":
        vals += list(ODD_STRINGS)
        if "maxLength" in schema:
            vals += ["y" * schema["maxLength"], "y" * (schema["maxLength"] + 1)]
    elif kind == "boolean":
        vals += [True, False, "true", 1]
    elif kind == "array":
        vals += [[{}], ["x"], [None], [{"unknown": 1}] * 40]
    elif kind == "object":
        vals += [{"unknown": 1}, {"": ""}]
    return vals


def plausible(schema: dict[str, Any], rng: random.Random) -> Any:
    """A value of the right type, mostly inside the schema's bounds (so that about half the specs
    are accepted and go on to the operator)."""
    kind = schema.get("type")
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if kind == "integer":
        lo, hi = schema.get("minimum", 0), schema.get("maximum", 10**6)
        return rng.choice((lo, hi, rng.randint(lo, hi)))
    if kind == "number":
        return rng.choice((0.0, 0.5, 1.0, -1.0, 1e6))
    if kind == "boolean":
        return rng.choice((True, False))
    if kind == "string":
        return rng.choice(("a", "x" * schema.get("maxLength", 64), "CartPole-v1", "1", "500m", "example"))
    if kind == "array":
        return []
    return {}


def _parent(spec: dict[str, Any], path: tuple, create: bool) -> tuple[Any, Any] | None:
    """The container holding ``path``'s last element (created along the way when ``create``)."""
    node: Any = spec
    for i, key in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, dict):
            if key not in node and create:
                node[key] = [] if isinstance(nxt, int) else {}
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int):
            if not node and create:
                node.append([] if isinstance(nxt, int) else {})
            node = node[key] if node else None
        else:
            return None
        if node is None:
            return None
    return node, path[-1]


def set_at(spec: dict[str, Any], path: tuple, value: Any) -> None:
    found = _parent(spec, path, create=True)
    if found is None:
        return
    node, key = found
    if isinstance(node, dict) and not isinstance(key, int):
        node[key] = value
    elif isinstance(node, list) and isinstance(key, int):
        if node:
            node[key] = value
        else:
            node.append(value)


def delete_at(spec: dict[str, Any], path: tuple) -> None:
    found = _parent(spec, path, create=False)
    if found is None:
        return
    node, key = found
    if isinstance(node, dict):
        node.pop(key, None)
    elif isinstance(node, list) and node:
        node.pop()


def safe(spec: dict[str, Any]) -> bool:
    """The pods of an accepted spec can never be scheduled, and its Job fails within a minute."""
    training = spec.get("training")
    if not isinstance(training, dict):
        return False
    selector = training.get("nodeSelector")
    deadline = training.get("activeDeadlineSeconds", "absent")
    return (isinstance(selector, dict) and selector.get(POOL[0]) == POOL[1]
            and (deadline == DEADLINE and type(deadline) is int or deadline in BAD_DEADLINES))


def mutate(rng: random.Random, paths: list[tuple[tuple, dict[str, Any]]]) -> tuple[dict[str, Any], list[str]]:
    """A mutated copy of BASE and what was done to it (retries until ``safe``)."""
    while True:
        spec, done = copy.deepcopy(BASE), []
        for _ in range(rng.choice((1, 1, 2, 3))):
            path, schema = rng.choice(paths)
            op = rng.random()
            if op < 0.6:
                value = plausible(schema, rng) if rng.random() < 0.45 else rng.choice(candidates(schema))
                set_at(spec, path, value)
                done.append(f"set {'.'.join(map(str, path))} = {json.dumps(value)[:60]}")
            elif op < 0.75:
                delete_at(spec, path)
                done.append(f"delete {'.'.join(map(str, path))}")
            elif op < 0.9 and schema.get("type") == "object":
                set_at(spec, (*path, rng.choice(ODD_KEYS)), rng.choice(("v", 1, None, {})))
                done.append(f"add a key under {'.'.join(map(str, path))}")
            else:
                set_at(spec, ("training", "activeDeadlineSeconds"), rng.choice(BAD_DEADLINES))
                done.append("set training.activeDeadlineSeconds to a refused value")
        if safe(spec):
            return spec, done


def agent_name(rng: random.Random, i: int) -> str:
    """Mostly plain names; some at or past the 52-character limit, some with dots."""
    roll = rng.random()
    if roll < 0.08:
        return f"f{i}-" + "n" * rng.choice((46, 47, 48, 49, 60))
    if roll < 0.14:
        return f"f{i}.dotted.name"
    return f"fuzz-{i}"


FIELD = re.compile(r"\b(spec(\.[A-Za-z0-9_\[\]]+)+|metadata\.name)\b")


@pytest.fixture
def api(cluster):
    return client.CustomObjectsApi(config.new_client_from_config(str(cluster.kubeconfig)))


def test_mutated_specs_are_refused_naming_a_field_or_run_to_an_end(cluster, operator, namespace, api):
    rng = random.Random(SEED)
    paths = schema_paths(crd_spec_schema())
    log_start = len(operator.log())
    accepted: dict[str, list[str]] = {}
    problems: list[str] = []
    refused = 0
    for i in range(SPECS):
        spec, done = mutate(rng, paths)
        name = agent_name(rng, i)
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLAgent", "metadata": {"name": name}, "spec": spec}
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict")
            accepted[name] = done
        except ApiException as exc:
            refused += 1
            text = exc.body or ""
            if exc.status not in (400, 422) or not FIELD.search(text):
                problems.append(f"{name}: refused without naming a field ({exc.status}): {text[:300]}; "
                                f"mutations {done}; spec {json.dumps(spec)[:400]}")
    print(f"fuzz seed {SEED}: {SPECS} specs, {refused} refused at admission, {len(accepted)} accepted")
    assert not problems, "\n".join(problems[:20])
    assert refused >= SPECS // 5 and len(accepted) >= SPECS // 5, "the mutations should exercise both outcomes"

    ends = ("Succeeded", "Failed", "Superseded")

    def outcomes() -> dict[str, str]:
        """Each accepted agent's outcome so far: its first run's phase, or Suspended."""
        runs = json.loads(cluster.kubectl("get", "trainingruns", "-n", namespace, "-o", "json").stdout)["items"]
        agents = json.loads(cluster.kubectl("get", "rlagents", "-n", namespace, "-o", "json").stdout)["items"]
        first: dict[str, dict[str, Any]] = {}
        for r in runs:
            a, t = r["spec"]["agentRef"]["name"], r["spec"]["trigger"]
            order = (t["agentGeneration"], t.get("ordinal") or 0)
            if a not in first or order < first[a]["order"]:
                first[a] = {"order": order, "status": r.get("status") or {}}
        out = {}
        for agent in agents:
            a = agent["metadata"]["name"]
            waiting = [c for c in (agent.get("status") or {}).get("conditions", []) if c["type"] == "TriggerWaiting"]
            if agent["spec"].get("suspend") is True and a not in first:
                out[a] = "Suspended" if waiting and waiting[0]["reason"] == "Suspended" else "no TrainingRun"
            else:
                out[a] = (first.get(a, {}).get("status") or {}).get("phase") or "no TrainingRun"
        firsts.update({a: f["status"] for a, f in first.items()})
        return out

    firsts: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 900
    while True:
        phases = outcomes()
        stuck = [a for a in accepted if phases.get(a) not in (*ends, "Suspended")]
        if not stuck or time.monotonic() > deadline:
            break
        time.sleep(5)
    if stuck:
        lines = [f"{a}: {phases.get(a, 'no TrainingRun')} after {accepted[a]}" for a in stuck]
        pytest.fail(f"{len(stuck)} accepted specs did not reach an end:\n" + "\n".join(lines[:20]))
    reasons: dict[str, int] = {}
    for agent in accepted:
        status = firsts.get(agent) or {}
        if status.get("phase") == "Failed":
            assert status.get("failureReason") and status.get("failureMessage") is not None, (agent, status)
        outcome = status.get("failureReason") or phases[agent]
        reasons[outcome] = reasons.get(outcome, 0) + 1
    print(f"fuzz: accepted specs ended as {reasons}")
    log = operator.log()[log_start:]
    for marker in ("Traceback", "failed with an exception"):
        assert marker not in log, log[max(0, log.index(marker) - 2000):][:6000]


def test_the_generator_keeps_pods_unschedulable_and_deadlines_short():
    """The fuzz is only safe to run because of ``safe``: check that it holds for what it generates."""
    rng = random.Random(SEED)
    paths = schema_paths(crd_spec_schema())
    assert any(p == ("training", "nodeSelector", "k") for p, _ in paths)
    seen = {tuple(d) for d in (mutate(rng, paths)[1] for _ in range(200))}
    assert len(seen) > 150  # varied
    unsafe = copy.deepcopy(BASE)
    del unsafe["training"]["nodeSelector"]
    assert not safe(unsafe)
    unsafe = copy.deepcopy(BASE)
    unsafe["training"]["activeDeadlineSeconds"] = 3600
    assert not safe(unsafe)
    assert safe(copy.deepcopy(BASE))
