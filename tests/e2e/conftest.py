"""E2E fixtures for the serving tier: a real local Ray head with Ray Serve (``hack/ray-up.sh``).

The session's head is its own instance (``RLOPS_RAY_NAME=rlops-test``) on free ports, so it
never disturbs the demo's (``rlops``); ``hack/ray-down.sh`` stops it at the end of the session
(``RLOPS_KEEP_TEST_RAY=1`` keeps it). Nothing here mocks Ray. Shared helpers live in
``tests/support.py`` (never import from a conftest: pytest loads every conftest.py as the
module ``conftest``).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field

import httpx
import pytest

from support import REPO, free_ports

TEST_RAY = os.environ.get("RLOPS_TEST_RAY_NAME", "rlops-test")
_LABELS = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> ``[(series name, labels, value)]``."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            labels_text, _, value = rest.rpartition("}")
            labels = {k: v for k, v in _LABELS.findall(labels_text)}
        else:
            name, _, value = line.partition(" ")
            labels = {}
        try:
            out.append((name.strip(), labels, float(value.split()[0])))
        except (ValueError, IndexError):
            continue
    return out


@dataclass
class RayHead:
    """A running local Ray head: dashboard (Serve REST API), Serve HTTP and metrics URLs."""

    name: str
    dashboard: str
    serve: str
    metrics: str
    env: dict[str, str] = field(repr=False)

    def metrics_text(self) -> str:
        return httpx.get(self.metrics, timeout=10).text

    def metric(self, series: str, **labels: str) -> float | None:
        """Sum of ``series`` over every exported sample whose labels include ``labels``
        (Ray exports one sample per worker process); None when there is none."""
        values = [v for name, lab, v in parse_metrics(self.metrics_text())
                  if name == series and all(lab.get(k) == want for k, want in labels.items())]
        return sum(values) if values else None

    def wait_metric(self, series: str, expected: float, timeout: float = 60, **labels: str) -> float:
        """Wait until :meth:`metric` equals ``expected`` (metrics reach the agent every
        ``RAY_metrics_report_interval_ms``); returns the value, fails with the last one."""
        last: float | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.metric(series, **labels)
            if last is not None and abs(last - expected) < 1e-6 * max(1.0, abs(expected)):
                return last
            time.sleep(1)
        pytest.fail(f"{series}{labels} = {last}, expected {expected} (after {timeout:.0f}s)")


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    """``hack/ray-up.sh`` on free ports (instance ``rlops-test``), ``hack/ray-down.sh`` at the end."""
    dashboard, serve, metrics, gcs, client, agent, agent_grpc, runtime_env = free_ports(8)
    env = {
        **os.environ,
        "RLOPS_RAY_NAME": TEST_RAY,
        "RLOPS_RAY_DASHBOARD_PORT": str(dashboard),
        "RLOPS_SERVE_PORT": str(serve),
        "RLOPS_RAY_METRICS_PORT": str(metrics),
        "RLOPS_RAY_GCS_PORT": str(gcs),
        "RLOPS_RAY_CLIENT_PORT": str(client),
        "RLOPS_RAY_AGENT_PORT": str(agent),
        "RLOPS_RAY_AGENT_GRPC_PORT": str(agent_grpc),
        "RLOPS_RAY_RUNTIME_ENV_PORT": str(runtime_env),
        # Workers push metrics to the metrics agent every second instead of every 10 s.
        "RAY_metrics_report_interval_ms": "1000",
    }
    # A head left over from an interrupted session has other ports: replace it.
    subprocess.run(["bash", str(REPO / "hack" / "ray-down.sh")], env=env, check=False, timeout=120)
    subprocess.run(["bash", str(REPO / "hack" / "ray-up.sh")], env=env, check=True, timeout=600)
    head = RayHead(name=TEST_RAY, dashboard=f"http://127.0.0.1:{dashboard}", serve=f"http://127.0.0.1:{serve}",
                   metrics=f"http://127.0.0.1:{metrics}/metrics", env=env)
    yield head
    if not os.environ.get("RLOPS_KEEP_TEST_RAY"):
        subprocess.run(["bash", str(REPO / "hack" / "ray-down.sh")], env=env, check=False, timeout=120)
