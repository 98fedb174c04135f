"""The operator's /metrics (rl_operator.metrics): bounded Rollout series, counters, and the
real HTTP endpoint scraped and parsed as Prometheus does."""

from __future__ import annotations

import uuid

import pytest

from rl_operator import metrics
from support import free_port, sample, scrape


@pytest.fixture
def ns() -> str:
    return f"ns-{uuid.uuid4().hex[:8]}"  # the registry is process-wide: each test its own labels


def series(name: str, ns: str) -> list[dict[str, str]]:
    family = {"rlops_rollout_phase": metrics.ROLLOUT_PHASE,
              "rlops_rollout_canary_weight_percent": metrics.CANARY_WEIGHT}[name]
    return [s.labels for m in family.collect() for s in m.samples if s.labels.get("namespace") == ns]


def test_a_phase_change_replaces_the_series_and_a_finished_rollout_leaves(ns):
    metrics.rollout_written(ns, "r1", "a", None, "AwaitingApproval", None, False)
    metrics.rollout_written(ns, "r1", "a", "AwaitingApproval", "Progressing", 10, False)
    metrics.rollout_written(ns, "r1", "a", "Progressing", "Paused", 10, False)
    metrics.rollout_written(ns, "r1", "a", "Paused", "Paused", 10, False)  # no change: no transition
    assert series("rlops_rollout_phase", ns) == [{"namespace": ns, "rollout": "r1", "agent": "a", "phase": "Paused"}]
    assert metrics.CANARY_WEIGHT.labels(ns, "r1", "a")._value.get() == 10
    assert metrics.TRANSITIONS.labels(ns, "Paused")._value.get() == 1
    metrics.rollout_written(ns, "r1", "a", "Paused", "RolledBack", 0, True)
    assert series("rlops_rollout_phase", ns) == [] and series("rlops_rollout_canary_weight_percent", ns) == []
    assert metrics.TRANSITIONS.labels(ns, "RolledBack")._value.get() == 1


def test_a_rollout_without_a_phase_counts_no_transition_on_each_write(ns):
    for _ in range(3):
        metrics.rollout_written(ns, "r1", "a", None, None, None, False)
    assert metrics.TRANSITIONS.labels(ns, "Pending")._value.get() == 0
    assert series("rlops_rollout_phase", ns) == [{"namespace": ns, "rollout": "r1", "agent": "a", "phase": "Pending"}]
    metrics.rollout_written(ns, "r1", "a", None, "AwaitingApproval", None, False)
    assert metrics.TRANSITIONS.labels(ns, "AwaitingApproval")._value.get() == 1


def test_many_rollouts_finishing_leave_no_series(ns):
    for i in range(200):
        metrics.rollout_written(ns, f"r{i}", "a", None, "Progressing", 25, False)
    assert len(series("rlops_rollout_phase", ns)) == 200
    for i in range(200):
        metrics.rollout_written(ns, f"r{i}", "a", "Progressing", "Promoted", 100, True)
    assert series("rlops_rollout_phase", ns) == [] and series("rlops_rollout_canary_weight_percent", ns) == []
    assert not [k for k in metrics._phases if k[0] == ns]


def test_deleted_rollout_leaves_and_a_second_delete_is_harmless(ns):
    metrics.rollout_written(ns, "r1", "a", None, "Progressing", 50, False)
    metrics.rollout_deleted(ns, "r1")
    metrics.rollout_deleted(ns, "r1")
    assert series("rlops_rollout_phase", ns) == [] and series("rlops_rollout_canary_weight_percent", ns) == []


def test_admission_counts_denials_and_times_every_call():
    allowed = metrics.ADMISSIONS.labels("allowed")._value.get()
    denied = metrics.ADMISSIONS.labels("denied")._value.get()
    with metrics.admission():
        pass
    with pytest.raises(ValueError), metrics.admission():
        raise ValueError("no")
    assert metrics.ADMISSIONS.labels("allowed")._value.get() == allowed + 1
    assert metrics.ADMISSIONS.labels("denied")._value.get() == denied + 1


def test_reconciler_counts_errors_and_reraises():
    kind = f"k{uuid.uuid4().hex[:6]}"

    @metrics.reconciler(kind)
    def boom(x: int) -> int:
        if x:
            raise RuntimeError("x")
        return 7

    assert boom(0) == 7
    with pytest.raises(RuntimeError):
        boom(1)
    assert metrics.RECONCILE_ERRORS.labels(kind)._value.get() == 1
    assert boom.__name__ == "boom"


def test_the_endpoint_serves_prometheus_text(ns):
    port = free_port()
    metrics.serve(f"127.0.0.1:{port}")
    metrics.rollout_written(ns, "r1", "agent-x", None, "Progressing", 25, False)
    metrics.run_finished(ns, "Succeeded", 42.0)
    scraped = scrape(f"http://127.0.0.1:{port}/metrics")
    assert sample(scraped, "rlops_rollout_canary_weight_percent", namespace=ns, rollout="r1", agent="agent-x") == 25
    assert sample(scraped, "rlops_training_runs_finished_total", namespace=ns, phase="Succeeded") == 1
    assert sample(scraped, "rlops_training_run_duration_seconds_sum", namespace=ns) == 42.0
    assert sample(scraped, "process_resident_memory_bytes") > 0
