"""The router's shadow comparison, override accounting and circuit breaker (pure parts, and the
Router class driven in-process with scripted policies; the e2e tier runs them on Ray Serve)."""

from __future__ import annotations

import asyncio
import json

import pytest

from rl_engine.serving import config as sc

ARGS = {"agent": "cartpole", "namespace": "default",
        "versions": {"v1": {"artifactURI": "file:///x/v1"}, "v2": {"artifactURI": "file:///x/v2"}},
        "feedback": {"key": "5e" * 32, "rewardMin": 0, "rewardMax": 1}}


# ----------------------------------------------------------------- user_config


def test_router_config_parses_shadow_baseline_and_breaker():
    rc = sc.parse_router_config({"weights": {"v1": 100}, "shadow": "v2"}, ["v1", "v2"])
    assert (rc.weights, rc.shadow, rc.mirror, rc.evaluated("v1"), rc.evaluated("v2")) == \
        ({"v1": 100, "v2": 0}, "v2", "v2", "v2", None)
    rc = sc.parse_router_config({"weights": {"v1": 90, "v2": 10}, "overrideBaseline": "v1",
                                 "circuitBreaker": {"stable": "v1", "consecutiveErrors": 3}}, ["v1", "v2"])
    assert (rc.mirror, rc.evaluated("v2"), rc.evaluated("v1"), rc.breaker_stable, rc.breaker_errors) == \
        ("v1", "v2", None, "v1", 3)
    assert sc.parse_router_config({"weights": {"v1": 100}}, ["v1", "v2"]).evaluated("v1") is None


@pytest.mark.parametrize("user_config, fragment", [
    ({"weights": {"v1": 90, "v2": 10}, "shadow": "v2"}, "user_config.shadow: version v2 has weight 10"),
    ({"weights": {"v1": 100}, "shadow": "v3"}, "user_config.shadow: must name a version"),
    ({"weights": {"v1": 100}, "shadow": "v2", "overrideBaseline": "v1"}, "user_config.overrideBaseline: not with"),
    ({"weights": {"v1": 100}, "overrideBaseline": ["v1"]}, "user_config.overrideBaseline: must name a version"),
    ({"weights": {"v1": 100}, "circuitBreaker": {"stable": "v3", "consecutiveErrors": 1}},
     "user_config.circuitBreaker.stable: must name a version"),
    ({"weights": {"v1": 100}, "circuitBreaker": {"stable": "v1", "consecutiveErrors": 0}},
     "user_config.circuitBreaker.consecutiveErrors: must be an integer in [1, 1000]"),
    ({"weights": {"v1": 100}, "circuitBreaker": {"stable": "v1", "consecutiveErrors": True}},
     "consecutiveErrors: must be an integer"),
    ({"weights": {"v1": 100}, "circuitBreaker": {"stable": "v1", "consecutiveErrors": 2, "x": 1}},
     "user_config.circuitBreaker.x: unknown field"),
    ({"weights": {"v1": 100}, "circuitBreaker": {"stable": "v1", "consecutiveErrors": 2, "timeoutSeconds": 0}},
     "user_config.circuitBreaker.timeoutSeconds: must be a number in (0, 60]"),
    ({"weights": {"v1": 100}, "circuitBreaker": {"stable": "v1", "consecutiveErrors": 2, "timeoutSeconds": "2s"}},
     "user_config.circuitBreaker.timeoutSeconds: must be a number"),
    ({"weights": {"v1": 100}, "mirror": "v2"}, "user_config.mirror: unknown field"),
])
def test_router_config_errors_name_the_field(user_config, fragment):
    with pytest.raises(sc.ServingConfigError, match=None) as err:
        sc.parse_router_config(user_config, ["v1", "v2"])
    assert fragment in str(err.value)


def test_breaker_opens_on_the_nth_consecutive_failure_only():
    b = sc.CircuitBreaker("v1", 3)
    assert [b.record("v2", ok) for ok in (False, False, True, False, False)] == [False] * 5
    assert not b.open and b.consecutive == 2
    assert b.record("v2", False) and b.open and b.opened_by == "v2"
    assert not b.record("v2", False), "it opens once"
    with pytest.raises(ValueError):
        sc.CircuitBreaker("v1", 0)


def test_comparison_ledger_judges_overrides_once_and_forgets_expired_or_oldest():
    ledger = sc.ComparisonLedger(max_entries=2)
    ledger.add("a", "v2", False, expires_at=100, now=0)  # shadow v2 disagreed with the answer given
    ledger.add("b", "v2", True, expires_at=100, now=0)  # v2 answered and overrode the baseline
    assert ledger.judge("a", good=False, now=1) == ("v2", True)  # the answer given was condemned
    assert ledger.judge("a", good=False, now=1) is None  # once
    assert ledger.judge("b", good=False, now=1) == ("v2", False)  # v2's own answer was condemned
    ledger.add("c", "v2", False, expires_at=10, now=0)
    assert ledger.judge("c", good=True, now=11) is None  # expired
    for rid in ("d", "e", "f"):
        ledger.add(rid, "v2", False, expires_at=100, now=0)
    assert len(ledger) == 2 and ledger.judge("d", good=True, now=1) is None  # the oldest went


# ----------------------------------------------------------------- the Router, in-process


class _Metric:
    def __init__(self, name, description="", tag_keys=None, boundaries=None):
        self.name, self.values = name, []

    def set_default_tags(self, tags):
        pass

    def inc(self, value=1.0, tags=None):
        self.values.append(((tags or {}).get("version"), value))

    observe = set = inc

    def total(self, version):
        return sum(v for t, v in self.values if t == version)


class _Scripted:
    """A policy's deployment handle: ``act(observation) -> result`` scripts its answers; the
    ``act`` and ``act_batch`` methods count their calls."""

    def __init__(self, act):
        self.act, self.calls, self.batches = act, 0, []

    def options(self, method_name):
        return _Method(self, method_name)


class _Method:
    def __init__(self, policy, name):
        self.policy, self.name = policy, name

    async def remote(self, arg):
        await asyncio.sleep(0)
        if self.name == "act_batch":
            self.policy.batches.append(len(arg))
            return [self.policy.act(o) for o in arg]
        self.policy.calls += 1
        result = self.policy.act(arg)
        return await result if asyncio.iscoroutine(result) else result


def _router(monkeypatch, v1, v2, user_config):
    from rl_engine.serving import app
    for kind in ("Counter", "Histogram", "Gauge"):
        monkeypatch.setattr(app.metrics, kind, _Metric)
    router = app.Router.func_or_class(ARGS, {"v1": _Scripted(v1), "v2": _Scripted(v2)})
    router.reconfigure(user_config)
    return router


async def _call(router, path, body):
    from starlette.requests import Request
    raw = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/default/cartpole" + path, "root_path": "/default/cartpole",
             "headers": [], "query_string": b""}
    resp = await router(Request(scope, receive))
    return resp.status_code, json.loads(resp.body)


def _serve(router, observations):
    """POST each observation, then let every mirror finish: [(status, body), ...]."""
    async def go():
        out = [await _call(router, "", {"observation": obs}) for obs in observations]
        while router.mirrors:
            await asyncio.gather(*list(router.mirrors))
        assert not router.mirror_queue
        return out
    return asyncio.run(go())


def _feedback(router, items):
    async def go():
        return [await _call(router, "/feedback", {"request_id": rid, "reward": r, "negative": neg})
                for rid, r, neg in items]
    return asyncio.run(go())


def _fail(observation):
    return {"status": 500, "error": "policy v2: NaN logits"}


def test_breaker_answers_every_failed_canary_request_from_stable_then_opens(monkeypatch):
    router = _router(monkeypatch, lambda o: {"action": 0}, _fail,
                     {"weights": {"v1": 50, "v2": 50}, "circuitBreaker": {"stable": "v1", "consecutiveErrors": 5}})
    answers = _serve(router, [[0.0] * 4] * 100)
    assert all(code == 200 and body["version"] == "v1" for code, body in answers), "a client saw a failure"
    assert router.breaker.open and router.m_circuit_opens.values == [("v2", 1)]  # opened once
    assert router.m_circuit_open.values[0] == ("v2", 1)
    canary_calls = router.policies["v2"].policy.calls
    assert canary_calls == 5 and router.m_errors.total("v2") == 5, "open: the canary gets no more requests"
    assert router.m_fallbacks.total("v2") == 50  # every request drawn for the canary


def test_the_open_gauge_is_set_again_until_a_config_without_the_breaker_then_zero(monkeypatch):
    """Ray exports a gauge value once per set: the open breaker's gauge is set again every
    GAUGE_REFRESH_S, with no traffic, until the operator's rollback config drops the breaker."""
    from rl_engine.serving import app
    monkeypatch.setattr(app, "GAUGE_REFRESH_S", 0.01)
    router = _router(monkeypatch, lambda o: {"action": 0}, _fail,
                     {"weights": {"v1": 0, "v2": 100}, "circuitBreaker": {"stable": "v1", "consecutiveErrors": 2}})

    async def go():
        for _ in range(2):
            await _call(router, "", {"observation": [0.0] * 4})
        assert router.breaker.open and len(router.background) == 1
        await asyncio.sleep(0.1)  # no requests: the keeper alone sets it
        kept = list(router.m_circuit_open.values)
        # a weight change that keeps the breaker keeps it open, and the gauge at 1
        router.reconfigure({"weights": {"v1": 50, "v2": 50}, "circuitBreaker": {"stable": "v1", "consecutiveErrors": 2}})
        await asyncio.sleep(0.05)
        assert router.m_circuit_open.values[-1] == ("v2", 1) and router.background
        router.reconfigure({"weights": {"v1": 100, "v2": 0}})  # the operator's rollback
        await asyncio.sleep(0.05)
        return kept

    kept = asyncio.run(go())
    assert len(kept) >= 4 and set(kept) == {("v2", 1)}, kept
    assert router.breaker is None and router.m_circuit_open.values[-1] == ("v2", 0) and not router.background
    assert router.m_circuit_opens.total("v2") == 1


def test_breaker_state_survives_a_weight_change_with_the_same_breaker(monkeypatch):
    flaky = iter([_fail(None), _fail(None), {"action": 1}, _fail(None), _fail(None)] + [{"action": 1}] * 100)
    breaker = {"stable": "v1", "consecutiveErrors": 3}
    router = _router(monkeypatch, lambda o: {"action": 0}, lambda o: next(flaky),
                     {"weights": {"v1": 0, "v2": 100}, "circuitBreaker": breaker})
    answers = _serve(router, [[0.0] * 4] * 5)
    assert [b["version"] for _, b in answers] == ["v1", "v1", "v2", "v1", "v1"]
    assert not router.breaker.open and router.breaker.consecutive == 2  # a success reset the count
    kept = router.breaker
    router.reconfigure({"weights": {"v1": 50, "v2": 50}, "circuitBreaker": breaker})
    assert router.breaker is kept
    router.reconfigure({"weights": {"v1": 50, "v2": 50}, "circuitBreaker": {**breaker, "consecutiveErrors": 4}})
    assert router.breaker is not kept and router.breaker.consecutive == 0


def test_a_canary_that_does_not_answer_in_time_is_a_failure_answered_by_stable(monkeypatch):
    """A hung canary (no answer, no error) must not hang the clients: after timeoutSeconds the
    router answers from stable and counts a failure; the failures open the breaker."""
    async def hang(observation):
        await asyncio.sleep(3600)

    router = _router(monkeypatch, lambda o: {"action": 0}, hang,
                     {"weights": {"v1": 0, "v2": 100},
                      "circuitBreaker": {"stable": "v1", "consecutiveErrors": 3, "timeoutSeconds": 0.02}})
    assert router.info()["circuitBreaker"]["timeoutSeconds"] == 0.02  # the router's GET shows it
    answers = _serve(router, [[0.0] * 4] * 10)
    assert [(code, body["version"]) for code, body in answers] == [(200, "v1")] * 10
    assert router.policies["v2"].policy.calls == 3 and router.m_errors.total("v2") == 3
    assert router.breaker.open and router.m_circuit_opens.total("v2") == 1


def test_a_4xx_from_the_canary_is_the_clients_error_not_a_breaker_failure(monkeypatch):
    router = _router(monkeypatch, lambda o: {"action": 0}, lambda o: {"status": 400, "error": "observation: shape"},
                     {"weights": {"v1": 0, "v2": 100}, "circuitBreaker": {"stable": "v1", "consecutiveErrors": 1}})
    (code, body), = _serve(router, [[0.0] * 4])
    assert code == 400 and not router.breaker.open and router.breaker.consecutive == 0


def test_shadow_answers_nothing_and_its_agreement_and_override_accuracy_are_counted(monkeypatch):
    # stable v1 picks 1 when obs[0] > 0; the shadow v2 always picks 1: they disagree when obs[0] <= 0
    router = _router(monkeypatch, lambda o: {"action": int(o[0] > 0)}, lambda o: {"action": 1},
                     {"weights": {"v1": 100}, "shadow": "v2"})
    observations = [[1.0, 0, 0, 0]] * 7 + [[-1.0, 0, 0, 0]] * 3
    answers = _serve(router, observations)
    assert all(b["version"] == "v1" for _, b in answers)
    assert router.m_decisions.total("v2") == 10 and router.m_agreements.total("v2") == 7
    assert router.m_requests.total("v2") == 0, "the shadow is not a version that answers"
    # feedback on the 3 disagreements: 2 condemn stable's answer (shadow right), 1 approves it
    rids = [b["request_id"] for _, b in answers]
    codes = _feedback(router, [(rids[7], 0.1, False), (rids[8], 0.9, True), (rids[9], 0.8, False),
                               (rids[0], 0.0, True)])  # an agreement: judges no override
    assert [c for c, _ in codes] == [200] * 4
    assert router.m_override_feedback.total("v2") == 3 and router.m_override_correct.total("v2") == 2


def test_override_baseline_counts_the_canarys_overrides_of_stable(monkeypatch):
    router = _router(monkeypatch, lambda o: {"action": 0}, lambda o: {"action": int(o[0] > 0)},
                     {"weights": {"v1": 0, "v2": 100}, "overrideBaseline": "v1"})
    answers = _serve(router, [[1.0, 0, 0, 0]] * 2 + [[-1.0, 0, 0, 0]] * 6)
    assert router.m_decisions.total("v2") == 8 and router.m_agreements.total("v2") == 6
    _feedback(router, [(answers[0][1]["request_id"], 1.0, False), (answers[1][1]["request_id"], 0.0, False)])
    assert router.m_override_feedback.total("v2") == 2 and router.m_override_correct.total("v2") == 1


def test_mirrors_go_in_batches_one_round_trip_each(monkeypatch):
    from rl_engine.serving import app
    router = _router(monkeypatch, lambda o: {"action": 0}, lambda o: {"action": 0},
                     {"weights": {"v1": 100}, "shadow": "v2"})
    _serve(router, [[0.0] * 4] * (2 * app.MIRROR_BATCH + 5))
    shadow = router.batch_policies["v2"].policy
    assert shadow.calls == 0 and sum(shadow.batches) == 2 * app.MIRROR_BATCH + 5
    assert max(shadow.batches) == app.MIRROR_BATCH and len(shadow.batches) == 3
    assert router.m_decisions.total("v2") == 2 * app.MIRROR_BATCH + 5


def test_a_failing_or_saturated_shadow_never_touches_the_answer(monkeypatch):
    from rl_engine.serving import app
    router = _router(monkeypatch, lambda o: {"action": 0}, _fail, {"weights": {"v1": 100}, "shadow": "v2"})
    answers = _serve(router, [[0.0] * 4] * 4)
    assert all(c == 200 and b["version"] == "v1" for c, b in answers)
    assert router.m_decisions.total("v2") == 0 and router.m_mirror_dropped.total("v2") == 4

    async def hang(observations):
        await asyncio.sleep(3600)

    router = _router(monkeypatch, lambda o: {"action": 0}, lambda o: {"action": 0},
                     {"weights": {"v1": 100}, "shadow": "v2"})
    router.batch_policies["v2"].remote = hang
    in_flight = app.MAX_MIRROR_BATCHES * app.MIRROR_BATCH
    n = in_flight + app.MAX_MIRROR_QUEUE + 10

    async def flood():
        out = [await _call(router, "", {"observation": [0.0] * 4}) for _ in range(n)]
        await asyncio.sleep(2 * app.MIRROR_WAIT_S)
        state = (router.mirror_batches, len(router.mirror_queue))
        for task in list(router.mirrors):
            task.cancel()
        return out, state

    out, (batches, queued) = asyncio.run(flood())
    assert all(c == 200 for c, _ in out)
    assert batches == app.MAX_MIRROR_BATCHES and queued == app.MAX_MIRROR_QUEUE
    assert router.m_mirror_dropped.total("v2") == 10


def test_a_new_mirror_drops_what_waited_for_the_old_one(monkeypatch):
    router = _router(monkeypatch, lambda o: {"action": 0}, lambda o: {"action": 0},
                     {"weights": {"v1": 100}, "shadow": "v2"})

    async def go():
        await _call(router, "", {"observation": [0.0] * 4})
        router.reconfigure({"weights": {"v1": 100}})
        while router.mirrors:
            await asyncio.gather(*list(router.mirrors))

    asyncio.run(go())
    assert router.m_decisions.total("v2") == 0 and router.m_mirror_dropped.total("v2") == 1
