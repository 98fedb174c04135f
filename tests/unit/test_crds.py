"""The committed CRDs are exactly what the models generate, and they are structural."""

from pathlib import Path

import pytest
import yaml

from rl_operator import crdgen
from rl_operator import models as m

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", list(crdgen.KINDS))
def test_committed_crd_matches_models(kind):
    committed = (ROOT / "crds" / crdgen.filename(kind)).read_text()
    assert committed == crdgen.render(kind), f"crds/{crdgen.filename(kind)} is stale: run `make crds`"
    chart = (ROOT / "charts" / "rlops" / "crds" / crdgen.filename(kind)).read_text()
    assert chart == committed, f"charts/rlops/crds/{crdgen.filename(kind)} is stale: run `make crds`"


def test_committed_peering_crd_is_generated():
    committed = (ROOT / "crds" / crdgen.PEERING_FILENAME).read_text()
    assert committed == crdgen.render_peering(), "crds/kopf.dev_clusterkopfpeerings.yaml is stale: run `make crds`"
    assert (ROOT / "charts" / "rlops" / "crds" / crdgen.PEERING_FILENAME).read_text() == committed
    assert crdgen.PEERING_FILENAME in (ROOT / "crds" / "kustomization.yaml").read_text()


def _walk(node, path="$"):
    yield path, node
    for key in ("properties", "additionalProperties", "items"):
        child = node.get(key)
        if isinstance(child, dict) and key == "properties":
            for name, sub in child.items():
                yield from _walk(sub, f"{path}.{name}")
        elif isinstance(child, dict):
            yield from _walk(child, f"{path}[{key}]")


@pytest.mark.parametrize("kind", list(crdgen.KINDS))
def test_schema_is_structural(kind):
    schema = yaml.safe_load(crdgen.render(kind))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert not {"$ref", "$defs", "anyOf", "title"} & set(node), f"{path} is not structural: {sorted(node)}"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"


def test_agent_crd_names_and_columns():
    crd = crdgen.crd("RLAgent")
    assert crd["spec"]["names"]["shortNames"] == ["rla"]
    assert crd["spec"]["names"]["categories"] == ["rlops"]
    columns = {c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert {"Phase", "Latest Run", "Mean Return", "Age"} <= columns
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["environment"]
    assert spec["properties"]["algorithm"]["properties"]["name"]["enum"] == ["PPO", "DQN"]
    assert spec["properties"]["training"]["properties"]["resources"]["properties"]["gpu"]["minimum"] == 0
    # optional sub-objects default to {} so that the API server fills in their own defaults
    assert spec["properties"]["training"]["default"] == {}


def test_exclusive_bounds_are_openapi_v3_flags():
    """pydantic's gt/lt (JSON Schema 2020-12 numbers) become a bound plus a boolean flag, the only
    form a CustomResourceDefinition takes."""
    node = crdgen.structural({"type": "number", "exclusiveMinimum": 0, "maximum": 5}, {}, in_spec=True)
    assert node == {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 5}


def test_a_phase_is_read_as_its_kinds_literal_and_an_unknown_one_is_refused():
    assert m.rollout_phase({"status": {"phase": "Paused"}}) == "Paused"
    assert m.run_phase({"status": {}}) is None and m.agent_phase(None) is None
    for read, kind in ((m.rollout_phase, "Rollout"), (m.run_phase, "TrainingRun"), (m.agent_phase, "RLAgent")):
        with pytest.raises(ValueError, match=f"{kind} x: status.phase 'Bogus' is none of"):
            read({"metadata": {"name": "x"}, "status": {"phase": "Bogus"}})
    # the API server refuses such a status too: every kind's phase is an enum in its CRD
    for plural in ("rlagents", "trainingruns", "rollouts"):
        crd = yaml.safe_load((ROOT / "crds" / f"rlops.dev_{plural}.yaml").read_text())
        phase = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]
        assert phase.get("enum"), (plural, phase)
