"""The Prometheus analysis provider: measures a canary and its stable version from serving metrics.

The serving router (``rl_engine.serving``) exports per-version counters through Ray's metrics
agent; Prometheus scrapes them. Each query is PromQL templated with the namespace, agent,
version and window, and returns the increase of a counter over the window. ``rollout.judge``
turns the measurement into a verdict (seed 004's rollback conditions).
"""

from __future__ import annotations

from typing import Mapping

import httpx

from rl_operator.rollout import Measurement

#: Exported Prometheus series (``docs/serving.md``): Ray prefixes ``ray_``; counters end in ``_total``.
SERIES: Mapping[str, str] = {
    "requests": "ray_rlops_serve_requests_total",
    "errors": "ray_rlops_serve_errors_total",
    "feedback": "ray_rlops_serve_feedback_total",
    "reward_positive": "ray_rlops_serve_feedback_reward_positive_total",
    "reward_negative": "ray_rlops_serve_feedback_reward_negative_total",
    "negative_feedback": "ray_rlops_serve_negative_feedback_total",
}


class AnalysisError(RuntimeError):
    """Prometheus could not be queried, or answered something that is not a vector."""


def query(series: str, namespace: str, agent: str, version: str, window_seconds: int) -> str:
    """PromQL: the increase of one counter for one version over the window (a scalar-like vector)."""
    selector = f'{SERIES[series]}{{namespace="{namespace}",agent="{agent}",version="{version}"}}'
    return f"sum(increase({selector}[{int(window_seconds)}s]))"


def instant(prometheus_url: str, promql: str, timeout: float = 5.0) -> float:
    """Evaluate an instant query; an empty result is 0.

    Raises:
        AnalysisError: connection failure, non-200, or a non-vector result.
    """
    url = prometheus_url.rstrip("/") + "/api/v1/query"
    try:
        resp = httpx.get(url, params={"query": promql}, timeout=timeout)
    except httpx.HTTPError as err:
        raise AnalysisError(f"GET {url}: {type(err).__name__}: {err}") from err
    if resp.status_code != 200:
        raise AnalysisError(f"GET {url} ({promql}): HTTP {resp.status_code}: {resp.text[:500]}")
    data = resp.json().get("data") or {}
    if data.get("resultType") != "vector":
        raise AnalysisError(f"{promql}: expected a vector, got {data.get('resultType')}")
    result = data.get("result") or []
    return float(result[0]["value"][1]) if result else 0.0


def measure(
    prometheus_url: str, namespace: str, agent: str, canary: str, stable: str | None, window_seconds: int
) -> Measurement:
    """Measure the canary (and the stable version, when there is one) over the last ``window_seconds``."""

    def inc(series: str, version: str) -> float:
        return instant(prometheus_url, query(series, namespace, agent, version, window_seconds))

    def reward(version: str) -> float:
        return inc("reward_positive", version) - inc("reward_negative", version)

    return Measurement(
        canary_requests=inc("requests", canary),
        canary_errors=inc("errors", canary),
        canary_feedback=inc("feedback", canary),
        canary_reward_sum=reward(canary),
        canary_negative=inc("negative_feedback", canary),
        stable_feedback=inc("feedback", stable) if stable else 0.0,
        stable_reward_sum=reward(stable) if stable else 0.0,
        stable_negative=inc("negative_feedback", stable) if stable else 0.0,
        window_seconds=int(window_seconds),
    )
