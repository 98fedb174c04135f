"""The operator/serving contract in one home (rl_engine.serving.contract), used by both sides."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rl_engine.serving import contract
from rl_engine.serving import config as serving_config
from rl_operator import analysis
from rl_operator import rayserve

ROOT = Path(__file__).resolve().parents[2]
FINGERPRINT = "sha256:" + "ab" * 32


def test_the_contract_imports_only_the_standard_library():
    """The operator image installs rl_engine without its dependencies: the contract, and the
    packages above it, must import in an interpreter with no site-packages at all (``-S``)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); "
            "import rl_engine.serving.contract; "
            "print(' '.join(sorted(m for m in set(sys.modules) - before "
            "if m.split('.')[0] not in sys.stdlib_module_names)))")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT / "rl_engine")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == {"rl_engine", "rl_engine.serving", "rl_engine.serving.contract"}


def test_an_application_the_operator_writes_is_one_the_serving_side_reads():
    app = rayserve.with_weights(
        rayserve.app_config("team-a", "router", {"v1": {"artifactURI": "file:///a/1", "fingerprint": FINGERPRINT},
                                                 "v2": ("file:///a/2", FINGERPRINT)}, {"v1": 100}),
        {"v1": 90, "v2": 10})
    assert app["import_path"] == contract.IMPORT_PATH
    parsed = serving_config.parse_args(app["args"])
    assert list(parsed.versions) == ["v1", "v2"] and parsed.versions["v2"].fingerprint == FINGERPRINT
    (router,) = [d for d in app["deployments"] if d["name"] == contract.ROUTER_DEPLOYMENT]
    assert serving_config.parse_weights(router["user_config"], ["v1", "v2"]) == {"v1": 90, "v2": 10}
    assert rayserve.application_weights(app) == {"v1": 90, "v2": 10}


def test_a_version_entry_field_the_serving_side_refuses_the_operator_refuses_too():
    with pytest.raises(ValueError, match=r"versions\.v1\.checksum: unknown field"):
        rayserve.app_config("t", "a", {"v1": {"artifactURI": "file:///a", "checksum": "x"}}, {"v1": 100})
    with pytest.raises(serving_config.ServingConfigError, match=r"versions\.v1\.checksum"):
        serving_config.parse_args({"agent": "a", "namespace": "t",
                                   "versions": {"v1": {"artifactURI": "file:///a", "checksum": "x"}}})


def test_the_series_the_analysis_queries_are_the_ones_the_router_exports():
    """Each series of the operator's PromQL is a metric of the contract, in its exported name,
    and the one docs/serving.md lists; the alerting rules' series too."""
    exported = {contract.counter_series(role) for role in contract.METRIC_NAMES} \
        | {contract.bucket_series(role) for role in contract.METRIC_NAMES} \
        | {contract.gauge_series(role) for role in contract.METRIC_NAMES}
    assert set(analysis.SERIES.values()) <= exported
    doc = (ROOT / "docs" / "serving.md").read_text()
    for series in analysis.SERIES.values():
        assert f"`{series}" in doc, series
    for rules in ("manifests/prometheus/rules.yaml", "manifests/prometheus/prometheusrule.yaml"):
        used = set(re.findall(r"\bray_rlops_serve_\w+", (ROOT / rules).read_text()))
        assert used and used <= exported, (rules, used - exported)
    with pytest.raises(KeyError):
        contract.counter_series("latency_p99")
