"""The Prometheus analysis provider: measures a canary and its stable version from serving metrics.

The serving router (``rl_engine.serving``) exports per-version counters and a reward histogram
through Ray's metrics agent; Prometheus scrapes them. Each query is PromQL templated with the
namespace, agent, version and window: the increase of a counter over the window, or of every
bucket of the reward histogram (``rlops_serve_feedback_reward_scaled``: the feedback reward as a
fraction of the declared range). ``verdicts.judge`` turns the measurement into a verdict (seed
004's rollback conditions), comparing 10%-trimmed mean rewards computed from those buckets.
"""

from __future__ import annotations

import json
from typing import Mapping

import httpx
from rl_engine.serving import contract

from rl_operator.verdicts import Measurement, ShadowCounts

#: Exported Prometheus series (``docs/serving.md``), named by the serving application's own
#: contract: Ray prefixes ``ray_``; counters end in ``_total``.
SERIES: Mapping[str, str] = {
    **{role: contract.counter_series(role) for role in
       ("requests", "errors", "feedback", "reward_positive", "reward_negative", "negative_feedback", "decisions",
        "agreements", "override_feedback", "override_correct")},
    "reward_scaled_bucket": contract.bucket_series("reward_scaled"),
    "circuit_opens": contract.counter_series("circuit_opens"),
}


class AnalysisError(RuntimeError):
    """Prometheus could not be queried, or answered something that is not a vector."""


def query(series: str, namespace: str, agent: str, version: str, window_seconds: int, by: str = "") -> str:
    """PromQL: the increase of one counter for one version over the window (a scalar-like
    vector; with ``by="le"``, one element per histogram bucket)."""
    selector = _selector(series, namespace, agent, version)
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping}(increase({selector}[{int(window_seconds)}s]))"


def instant(prometheus_url: str, promql: str, timeout: float = 5.0) -> float:
    """Evaluate an instant query; an empty result is 0.

    Raises:
        AnalysisError: connection failure, non-200, or a non-vector result.
    """
    result = instant_vector(prometheus_url, promql, timeout)
    return float(result[0]["value"][1]) if result else 0.0


def histogram(prometheus_url: str, promql: str, timeout: float = 5.0) -> tuple[tuple[float, float], ...]:
    """Evaluate a ``sum by (le)`` query: ``((le, cumulative count), ...)`` sorted by ``le``
    (``float("inf")`` for ``+Inf``); empty when the series does not exist yet.

    Raises:
        AnalysisError: as :func:`instant`, or an element without a numeric ``le`` label.
    """
    out = []
    for element in instant_vector(prometheus_url, promql, timeout):
        try:
            out.append((float(element["metric"]["le"]), float(element["value"][1])))
        except (KeyError, TypeError, ValueError) as err:
            raise AnalysisError(f"{promql}: a bucket without a numeric 'le' label: {element!r:.200}") from err
    return tuple(sorted(out))


def instant_vector(prometheus_url: str, promql: str, timeout: float = 5.0) -> list[dict]:
    """Evaluate an instant query: the ``result`` list of Prometheus' answer (``metric``, ``value``).

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
    return list(data.get("result") or [])


def measure(
    prometheus_url: str, namespace: str, agent: str, canary: str, stable: str | None, window_seconds: int
) -> Measurement:
    """Measure the canary (and the stable version, when there is one) over the last ``window_seconds``.

    Counts are increases over the window; the reward histograms are the increase of every
    bucket of ``rlops_serve_feedback_reward_scaled`` (see :class:`rl_operator.verdicts.Measurement`).

    Raises:
        AnalysisError: Prometheus could not be queried or answered something unexpected.
    """

    def inc(series: str, version: str) -> float:
        return instant(prometheus_url, query(series, namespace, agent, version, window_seconds))

    def rewards(version: str) -> tuple[tuple[float, float], ...]:
        return histogram(prometheus_url, query("reward_scaled_bucket", namespace, agent, version, window_seconds,
                                               by="le"))

    return Measurement(
        canary_requests=inc("requests", canary),
        canary_errors=inc("errors", canary),
        canary_feedback=inc("feedback", canary),
        canary_negative=inc("negative_feedback", canary),
        canary_reward_buckets=rewards(canary),
        stable_feedback=inc("feedback", stable) if stable else 0.0,
        stable_negative=inc("negative_feedback", stable) if stable else 0.0,
        stable_reward_buckets=rewards(stable) if stable else (),
        window_seconds=int(window_seconds),
        canary_decisions=inc("decisions", canary) if stable else 0.0,
        canary_agreements=inc("agreements", canary) if stable else 0.0,
    )


def _selector(series: str, namespace: str, agent: str, version: str) -> str:
    return f'{SERIES[series]}{{namespace="{namespace}",agent="{agent}",version="{version}"}}'


def shadow_counts(prometheus_url: str, namespace: str, agent: str, version: str) -> ShadowCounts:
    """The router's comparison counters of a shadow version, summed as they stand (exact counts
    since the router started comparing it, not extrapolated increases). A router restart resets
    them, which only delays graduation.

    Raises:
        AnalysisError: Prometheus could not be queried or answered something unexpected.
    """
    def total(series: str) -> float:
        return instant(prometheus_url, f"sum({_selector(series, namespace, agent, version)})")

    return ShadowCounts(decisions=total("decisions"), agreements=total("agreements"),
                        override_feedback=total("override_feedback"), override_correct=total("override_correct"))


def circuit_open(prometheus_url: str, namespace: str, agent: str, version: str) -> bool:
    """Whether a router replica has opened its circuit breaker on this (canary) version's
    failures. It reads the count of openings, not the ``circuit_open`` gauge: a counter stays
    in Prometheus from its first scrape on, where a gauge can slip between two scrapes.

    Raises:
        AnalysisError: Prometheus could not be queried or answered something unexpected.
    """
    return instant(prometheus_url, f"sum({_selector('circuit_opens', namespace, agent, version)})") > 0


def live_reward(prometheus_url: str, namespace: str, agent: str, version: str, window_seconds: int,
                low: float, high: float) -> tuple[float, float | None]:
    """One version's feedbacks over the last ``window_seconds`` and the 10%-trimmed mean of
    their rewards (reward units, ``low``..``high`` the agent's reward range; None without
    feedback): the degradation trigger's live reward.

    Raises:
        AnalysisError: Prometheus could not be queried or answered something unexpected.
    """
    feedback = instant(prometheus_url, query("feedback", namespace, agent, version, window_seconds))
    buckets = histogram(prometheus_url, query("reward_scaled_bucket", namespace, agent, version, window_seconds, by="le"))
    return feedback, Measurement.trimmed_mean(buckets, low, high, Measurement.REWARD_TRIM)


#: Prometheus' own series of its alerting rules' alerts: one per alert while it is pending or firing.
ALERTS_SERIES = "ALERTS"
#: The alert labels that select its ``ALERTS`` series (the rest are compared one by one).
ALERT_KEYS = ("alertname", "namespace", "rlagent")


def alert_firing(prometheus_url: str, labels: Mapping[str, str], timeout: float = 5.0) -> bool:
    """Whether Prometheus itself fires this alert: an ``ALERTS{alertstate="firing"}`` series with
    its ``alertname``, ``namespace`` and ``rlagent`` whose every other label (the rule's own and
    its expression's, ``version`` among them) equals the alert's. The alert may carry labels that
    the series lacks (Prometheus' external labels, added on the way to Alertmanager). An alert
    posted to Alertmanager's API by hand has no such series.

    Args:
        labels: the alert's labels, as Alertmanager delivered them.
    Raises:
        AnalysisError: Prometheus could not be queried or answered something unexpected.
    """
    matchers = ",".join(f"{k}={json.dumps(labels.get(k, ''))}" for k in ALERT_KEYS)
    for element in instant_vector(prometheus_url, f'{ALERTS_SERIES}{{alertstate="firing",{matchers}}}', timeout):
        series = {k: v for k, v in (element.get("metric") or {}).items() if k not in ("__name__", "alertstate")}
        if all(labels.get(k) == v for k, v in series.items()):
            return True
    return False
