"""The operator's watch-cache reads and per-object locks (rl_operator.cache)."""

from __future__ import annotations

import gc
import json
import threading

from rl_operator import cache
from rl_operator import models as m


def test_reads_come_from_the_indexes_as_copies_the_reader_may_change():
    run = {"metadata": {"name": "a-1", "namespace": "t", "labels": {m.AGENT_LABEL: "a"}}, "status": {"phase": "Running"}}
    cache.bind(rlagents_idx={}, trainingruns_idx={("t", "a-1"): [run], ("agent", "t", "a"): [run]}, rollouts_idx={},
               jobs_idx={}, pods_idx={("t", "a-1"): [{"metadata": {"name": "p"}}]})
    try:
        got = cache.get_custom("t", m.TrainingRun.PLURAL, "a-1")
        assert got == run and got is not run
        got["status"]["phase"] = "Failed"
        assert run["status"]["phase"] == "Running"
        assert [r["metadata"]["name"] for r in cache.list_custom("t", m.TrainingRun.PLURAL, "a")] == ["a-1"]
        assert cache.list_custom("t", m.Rollout.PLURAL, "a") == []
        assert cache.get_custom("t", m.RLAgent.PLURAL, "a") is None
        assert cache.get_job("t", "a-1") is None
        assert cache.list_pods("t", "a-1") == [{"metadata": {"name": "p"}}]
    finally:
        cache.unbind()


def test_locks_serialize_one_object_and_do_not_outlive_their_use():
    inside, order = threading.Event(), []

    def second() -> None:
        with cache.locked("trainingruns", "t", "a-1"):
            order.append("second")

    with cache.locked("trainingruns", "t", "a-1"):
        t = threading.Thread(target=second)
        t.start()
        inside.wait(0.2)
        order.append("first")
        with cache.locked("trainingruns", "t", "a-1"):  # re-entrant in one thread
            pass
    t.join(5)
    assert order == ["first", "second"]
    for i in range(1000):
        with cache.locked("rollouts", "t", f"r-{i}"):
            pass
    gc.collect()
    assert cache.lock_count() == 0


def _rollout(name: str, rv: int, phase: str) -> dict:
    return {"metadata": {"name": name, "namespace": "t", "resourceVersion": str(rv), "labels": {m.AGENT_LABEL: "a"}},
            "status": {"phase": phase}}


def test_the_operators_own_write_wins_until_the_watch_delivers_it(monkeypatch):
    """client-go's MutationCache: a reconcile never reads a copy older than its own last write."""
    stored = _rollout("a-1", 10, "AwaitingApproval")
    index = {("t", "a-1"): [stored], ("agent", "t", "a"): [stored]}
    cache.bind(rlagents_idx={}, trainingruns_idx={}, rollouts_idx=index, jobs_idx={}, pods_idx={})
    try:
        cache.remember(m.Rollout.PLURAL, _rollout("a-1", 12, "Progressing"))
        cache.remember(m.Rollout.PLURAL, _rollout("a-1", 11, "Approved"))  # an older answer never wins
        assert cache.get_custom("t", m.Rollout.PLURAL, "a-1")["status"]["phase"] == "Progressing"
        # a create whose watch event has not come yet is found by name and in its agent's list
        cache.remember(m.Rollout.PLURAL, _rollout("a-2", 13, "AwaitingApproval"))
        assert [r["metadata"]["name"] for r in cache.list_custom("t", m.Rollout.PLURAL, "a")] == ["a-1", "a-2"]
        assert cache.list_custom("t", m.Rollout.PLURAL, "a")[0]["status"]["phase"] == "Progressing"
        # the watch catches up (its index function sees the version, then the index holds it)
        newer = _rollout("a-1", 14, "Progressing")
        cache._seen(m.Rollout.PLURAL, newer)
        index[("t", "a-1")] = [newer]
        assert cache.get_custom("t", m.Rollout.PLURAL, "a-1")["metadata"]["resourceVersion"] == "14"
        assert ("rollouts", "t", "a-1") not in cache._written
        # an object deleted before its watch event came: its written copy lapses
        clock = [cache.time.monotonic() + cache.WRITTEN_TTL_SECONDS + 1]
        monkeypatch.setattr(cache.time, "monotonic", lambda: clock[0])
        assert cache.get_custom("t", m.Rollout.PLURAL, "a-2") is None
        assert [r["metadata"]["name"] for r in cache.list_custom("t", m.Rollout.PLURAL, "a")] == ["a-1"]
        assert not cache._by_agent
    finally:
        cache.unbind()


def test_a_job_just_created_is_found_before_its_watch_event():
    """The resync timer or a resume that reconciles a run again creates no second Job."""
    cache.bind(rlagents_idx={}, trainingruns_idx={}, rollouts_idx={}, jobs_idx={}, pods_idx={})
    try:
        job = {"metadata": {"name": "a-1", "namespace": "t", "resourceVersion": "7", "labels": {m.RUN_LABEL: "a-1"}}}
        assert cache.get_job("t", "a-1") is None
        cache.remember(cache.JOBS, job)
        assert cache.get_job("t", "a-1") == job
    finally:
        cache.unbind()


def test_cached_copies_leave_out_what_is_never_read():
    body = {"metadata": {"name": "a", "managedFields": [{"manager": "kubectl"}],
                         "annotations": {"kopf.zalando.org/last-handled-configuration": "{...}", "rlops.dev/approve": "x"}},
            "spec": {"k": 1}}
    slim = cache._slim(body)
    assert slim["metadata"] == {"name": "a", "annotations": {"rlops.dev/approve": "x"}} and slim["spec"] == {"k": 1}
    assert "managedFields" in body["metadata"]  # the watch's own object is left as it is


def test_a_cached_job_and_pod_keep_their_environment_as_a_digest():
    """The trainer's environment holds the run config (a tenant's kwargs: up to megabytes): the
    cache keeps its digest, and the pod-versus-Job comparison still sees any difference."""
    from rl_operator import trust

    env = [{"name": "RLOPS_RUN_CONFIG", "value": "x" * 100_000}]
    container = {"name": "trainer", "image": "engine", "env": env}
    job = {"metadata": {"name": "a-1", "uid": "job-uid"}, "spec": {"template": {"spec": {"containers": [container]}}}}
    pod = {"metadata": {"name": "a-1-x", "ownerReferences": [{"kind": "Job", "name": "a-1", "uid": "job-uid",
                                                               "controller": True}]},
           "spec": {"containers": [dict(container)]}}
    slim_job, slim_pod = cache._slim(job, "Job"), cache._slim(pod, "Pod")
    assert slim_job["spec"]["template"]["spec"]["containers"][0]["env"] == m.digest(env)
    assert len(json.dumps(slim_pod)) < 1000 and job["spec"]["template"]["spec"]["containers"][0]["env"] == env
    assert trust.pod_untrusted(slim_pod, slim_job, "trainer") is None
    changed = {**pod, "spec": {"containers": [{**container, "env": [{"name": "RLOPS_RUN_CONFIG", "value": "y"}]}]}}
    assert "env differs" in trust.pod_untrusted(cache._slim(changed, "Pod"), slim_job, "trainer")


def test_unfinished_runs_are_the_resyncs_work():
    """The operator-wide resync visits the runs that have not finished (Succeeded and measured by
    the operator, Failed, Superseded), by name (not the per-agent keys of the same index), and
    nothing before the indexes are bound. A Succeeded run whose evaluation has not ended (or not
    started: its Job may still have to be made) is not finished."""
    assert cache.unfinished_runs() == []

    def run(name, phase, evaluation=None):
        status = {"phase": phase} if phase else {}
        if evaluation:
            status["evaluation"] = {"phase": evaluation}
        return {"metadata": {"name": name, "namespace": "t"}, "status": status}

    runs = {name: run(name, *phase) for name, phase in
            [("a-1", ("Succeeded", "Succeeded")), ("a-2", ("Running",)), ("b-1", ("Failed",)), ("c-1", (None,)),
             ("d-1", ("Pending",)), ("e-1", ("Superseded",)), ("f-1", ("Succeeded",)),
             ("g-1", ("Succeeded", "Failed")), ("h-1", ("Succeeded", "Running"))]}
    index = {("t", n): [r] for n, r in runs.items()}
    index[("agent", "t", "a")] = [runs["a-1"], runs["a-2"]]
    cache.bind(rlagents_idx={}, trainingruns_idx=index, rollouts_idx={}, jobs_idx={}, pods_idx={})
    try:
        assert cache.unfinished_runs() == [("t", "a-2"), ("t", "c-1"), ("t", "d-1"), ("t", "f-1"), ("t", "h-1")]
    finally:
        cache.unbind()


def test_agents_whose_triggers_need_the_clock():
    def agent(name, schedule=None, waiting=None):
        return {"metadata": {"name": name, "namespace": "t"},
                "spec": {"triggers": {"schedule": schedule} if schedule else {}},
                "status": {"conditions": [{"type": "TriggerWaiting", "status": waiting}]} if waiting else {}}

    agents = [agent("plain"), agent("cron", schedule={"cron": "0 2 * * *"}), agent("waits", waiting="True"),
              agent("waited", waiting="False")]
    cache.bind(rlagents_idx={("t", a["metadata"]["name"]): [a] for a in agents}, trainingruns_idx={},
               rollouts_idx={}, jobs_idx={}, pods_idx={})
    try:
        assert cache.agents_with_triggers() == [("t", "cron"), ("t", "waits")]
    finally:
        cache.unbind()
