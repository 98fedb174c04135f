"""The operator's own Prometheus metrics (``/metrics``), from ``prometheus_client``.

Served on ``RLOPS_METRICS_ADDR`` (``host:port``; the chart's Service port ``metrics``). Besides
the process metrics (``process_cpu_seconds_total``, ``process_resident_memory_bytes``), rlops
exports:

* ``rlops_rollout_phase{namespace,rollout,agent,phase}``: 1 for the phase of each unfinished
  Rollout (Pending before its first phase, Shadowing, AwaitingApproval, Approved, Queued, Progressing,
  Paused, Promoting). A finished or deleted
  Rollout leaves the gauges, so the series stay bounded by the Rollouts in flight.
* ``rlops_rollout_canary_weight_percent{namespace,rollout,agent}``: the canary's share of
  traffic (percent, 0-100) of each unfinished Rollout.
* ``rlops_rollout_transitions_total{namespace,phase}``: Rollouts entering each phase
  (``RolledBack`` counts rollbacks, ``Promoted`` promotions).
* ``rlops_analysis_runs_total{namespace,result}``: canary analyses by verdict (Successful,
  Failed, Inconclusive, Error).
* ``rlops_training_runs_finished_total{namespace,phase}`` and
  ``rlops_training_run_duration_seconds{namespace}``: finished TrainingRuns (Succeeded,
  Failed) and their durations (seconds, start to completion).
* ``rlops_admission_reviews_total{result}`` and ``rlops_admission_review_duration_seconds``:
  approval webhook calls (allowed, denied) and their latency (seconds).
* ``rlops_alerts_received_total{action}``: Alertmanager alerts naming an agent (``aborted``
  a canary, or ``none`` in progress).
* ``rlops_reconcile_duration_seconds{kind}`` and ``rlops_reconcile_errors_total{kind}``:
  reconcile passes (kind: rlagent, trainingrun, rollout) and the ones that raised.

Gauges are rebuilt after a restart: kopf resumes every unfinished Rollout, which writes them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import prometheus_client as prom

ROLLOUT_PHASE = prom.Gauge("rlops_rollout_phase", "1 for the current phase of each unfinished Rollout",
                           ["namespace", "rollout", "agent", "phase"])
CANARY_WEIGHT = prom.Gauge("rlops_rollout_canary_weight_percent",
                           "Canary share of traffic of each unfinished Rollout (percent)",
                           ["namespace", "rollout", "agent"])
TRANSITIONS = prom.Counter("rlops_rollout_transitions", "Rollouts entering a phase", ["namespace", "phase"])
ANALYSIS = prom.Counter("rlops_analysis_runs", "Canary analyses by verdict", ["namespace", "result"])
RUNS_FINISHED = prom.Counter("rlops_training_runs_finished", "Finished TrainingRuns by phase",
                             ["namespace", "phase"])
RUN_DURATION = prom.Histogram("rlops_training_run_duration_seconds", "TrainingRun start to completion (seconds)",
                              ["namespace"], buckets=(30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400))
ADMISSIONS = prom.Counter("rlops_admission_reviews", "Approval webhook calls by result", ["result"])
ADMISSION_TIME = prom.Histogram("rlops_admission_review_duration_seconds",
                                "Approval webhook handling time (seconds)",
                                buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
KILL_SWITCH = prom.Gauge("rlops_kill_switch_engaged", "1 while the global kill switch freezes every Rollout")
LIVE_REWARD = prom.Gauge("rlops_agent_live_reward", "The active model's live reward (10%-trimmed mean of its "
                         "feedback rewards over the degradation trigger's window, reward units)",
                         ["namespace", "rlagent", "version"])
ALERTS = prom.Counter("rlops_alerts_received", "Alertmanager alerts naming an agent, by action taken", ["action"])
RECONCILE_TIME = prom.Histogram("rlops_reconcile_duration_seconds", "One reconcile pass (seconds)", ["kind"],
                                buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
RECONCILE_ERRORS = prom.Counter("rlops_reconcile_errors", "Reconcile passes that raised", ["kind"])

# the phase series written last for each Rollout, so that a phase change removes the old one
_phases: dict[tuple[str, str], tuple[str, str]] = {}
_phases_lock = threading.Lock()
_F = TypeVar("_F", bound=Callable[..., Any])


def serve(addr: str) -> None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread. Raises ``OSError`` when the port
    is taken."""
    host, port = addr.rsplit(":", 1)
    prom.start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")


def rollout_written(namespace: str, name: str, agent: str, old_phase: str | None, phase: str | None,
                    weight: int | None, terminal: bool) -> None:
    """Record a Rollout's status as written: its phase and weight gauges (removed once the
    Rollout has finished, ``terminal``) and a transition when the phase changed."""
    phase = phase or "Pending"  # a Rollout with no phase yet
    if phase != (old_phase or "Pending"):
        TRANSITIONS.labels(namespace, phase).inc()
    with _phases_lock:
        last = _phases.pop((namespace, name), None)
        if last is not None and (terminal or last != (agent, phase)):
            _remove(ROLLOUT_PHASE, namespace, name, last[0], last[1])
        if terminal:
            _remove(CANARY_WEIGHT, namespace, name, agent)
            return
        _phases[(namespace, name)] = (agent, phase)
    ROLLOUT_PHASE.labels(namespace, name, agent, phase).set(1)
    CANARY_WEIGHT.labels(namespace, name, agent).set(weight or 0)


def rollout_deleted(namespace: str, name: str) -> None:
    """Drop a deleted Rollout's gauges."""
    with _phases_lock:
        last = _phases.pop((namespace, name), None)
    if last is not None:
        _remove(ROLLOUT_PHASE, namespace, name, last[0], last[1])
        _remove(CANARY_WEIGHT, namespace, name, last[0])


def _remove(metric: prom.Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def run_finished(namespace: str, phase: str, duration_seconds: float | None) -> None:
    """Count a TrainingRun that reached Succeeded or Failed (once, on the transition)."""
    RUNS_FINISHED.labels(namespace, phase).inc()
    if duration_seconds is not None and duration_seconds >= 0:
        RUN_DURATION.labels(namespace).observe(duration_seconds)


@contextlib.contextmanager
def admission() -> Iterator[None]:
    """Time one approval webhook call; an exception (a refusal, or a failed review) counts as denied,
    one refused with code 429 (the webhook had too many reviews in hand) as busy."""
    start = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        ADMISSIONS.labels("busy" if getattr(exc, "code", None) == 429 else "denied").inc()
        raise
    else:
        ADMISSIONS.labels("allowed").inc()
    finally:
        ADMISSION_TIME.observe(time.perf_counter() - start)


def reconciler(kind: str) -> Callable[[_F], _F]:
    """Decorate a reconcile function: its duration, and its exceptions (re-raised) counted."""
    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with RECONCILE_TIME.labels(kind).time():
                try:
                    return fn(*args, **kwargs)
                except Exception:
                    RECONCILE_ERRORS.labels(kind).inc()
                    raise
        return timed  # type: ignore[return-value]
    return wrap
