"""Dependency floors that are security boundaries, not conveniences."""

from __future__ import annotations

import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import Version

from support import REPO


def requirement(name: str) -> Requirement:
    project = tomllib.loads((REPO / "rl_engine" / "pyproject.toml").read_text())["project"]
    return next(r for r in map(Requirement, project["dependencies"]) if r.name == name)


def test_no_torch_whose_weights_only_load_can_run_code_is_admitted():
    """Before 2.6, ``torch.load(weights_only=True)`` could run code from the file
    (CVE-2025-32434); observe mode loads a candidate's weights before anyone approved them."""
    torch = requirement("torch")
    assert not torch.specifier.contains("2.5.1") and torch.specifier.contains("2.6.0"), str(torch)
    assert Version(version("torch")) >= Version("2.6")
