"""The canary state machine, the analysis verdict and the approval review: pure, no cluster.

``World`` applies the pipeline's actions to a dict standing for Ray Serve's state, so a whole
rollout can be stepped through reconcile by reconcile.
"""

import random
from datetime import datetime, timedelta, timezone

import pytest

from rl_operator import approvals
from rl_operator import models as m
from rl_operator import canary
from rl_operator import rollout as r
from rl_operator import traffic as t
from rl_operator import verdicts as v

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
FP = "sha256:" + "c" * 64
OLD_FP = "sha256:" + "a" * 64
STABLE = m.ActiveModel(version="cp-1", fingerprint=OLD_FP, artifact_uri="file:///a/cp-1", mean_return=480.0)


#: The operator's signature of the Rollout's measured evaluation (checked by ``trust.rollout_untrusted``,
#: not by these decisions; an approval's signature covers it).
EVAL_SIG = "v1:" + "e" * 64


def make_rollout(annotations=None, status=None, mean=500.0, trusted=True, measured=True):
    evaluation = m.EvaluationSummary(mean_return=mean, trusted=trusted, signature=EVAL_SIG) if measured else \
        m.EvaluationSummary(mean_return=mean)  # a Rollout made from the trainer's figures (before measuring)
    return {
        "metadata": {"name": "cp-2", "namespace": "ml", "uid": UID, "generation": 1,
                     "annotations": annotations or {}},
        "spec": m.RolloutSpec(agent_ref=m.ObjectRef(name="cp"), training_run_ref=m.ObjectRef(name="cp-2"),
                              version="cp-2", artifact_uri="file:///a/cp-2", fingerprint=FP,
                              evaluation=evaluation).wire(),
        "status": status or {},
    }


def agent_spec(**kw):
    return m.RLAgentSpec.model_validate({"environment": {"id": "CartPole-v1"}, **kw})


UID = "0f6c1c52-0000-4000-8000-000000000002"
KEY = b"k" * 32


def signed(by="alice", at="2026-11-22T12:00:00Z", fp=FP, uid=UID, key=KEY):
    """Annotations as the admission webhook records an approval by ``by``."""
    return {approvals.APPROVE: fp, approvals.APPROVED_BY: by, approvals.APPROVED_AT: at,
            approvals.APPROVAL_SIGNATURE: approvals.signature(key, "ml", "cp-2", uid, fp, by, at, EVAL_SIG)}


APPROVED = signed()


class World:
    """Ray Serve's state for one application, changed only by the pipeline's actions."""

    def __init__(self, stable=STABLE, spec=None):
        self.stable = stable
        self.spec = spec or agent_spec()
        self.versions = {stable.version: stable.fingerprint} if stable else None
        self.weights = {stable.version: 100} if stable else None
        self.weight_history = []
        self.extras = {} if stable else None  #: the router's user_config besides the weights
        self.now = T0

    def step(self, ro, analysis=None, annotations=None, blocking=None, frozen=None, shadow=None, circuit_open=None,
             newer=None, shadow_error=None):
        ro["metadata"]["annotations"] = annotations if annotations is not None else ro["metadata"]["annotations"]
        obs = t.Observed(now=self.now, annotations=dict(ro["metadata"]["annotations"]), agent_spec=self.spec,
                         active_model=self.stable, serving_versions=self.versions,
                         serving_weights=self.weights, app_status="RUNNING" if self.versions else None,
                         blocking_rollout=blocking, analysis=analysis, approval_key=KEY, frozen=frozen,
                         serving_extras=self.extras, shadow=shadow, circuit_open=circuit_open, newer_rollout=newer,
                         shadow_error=shadow_error)
        status, acts = r.reconcile(ro, obs)
        if acts.set_weights is not None:
            self.weights = dict(acts.set_weights)
            self.weight_history.append(dict(acts.set_weights))
            self.extras = dict(acts.router_extras)
        if acts.deploy is not None:
            self.versions = {v: (e or {"fingerprint": self.versions[v]})["fingerprint"]
                             for v, e in acts.deploy["versions"].items()}
            self.extras = dict(acts.router_extras)
            if acts.set_weights is None:
                self.weights = dict(acts.deploy["weights"])
            else:
                self.weights = {v: self.weights.get(v, 0) for v in self.versions}
        for key in acts.remove_annotations:
            ro["metadata"]["annotations"].pop(key, None)
        ro["status"] = status.wire()
        return status, acts


OK = ("Successful", "error rate 0.0%", {})


def test_waits_for_approval_and_says_how():
    world = World()
    st, acts = world.step(make_rollout())
    assert st.phase == "AwaitingApproval"
    assert f"{approvals.APPROVE}={FP}" in st.message
    assert acts.deploy is None and acts.set_weights is None


def test_stale_fingerprint_is_not_an_approval():
    st, _ = World().step(make_rollout({approvals.APPROVE: OLD_FP, approvals.APPROVED_BY: "alice"}))
    assert st.phase == "AwaitingApproval" and "stale or wrong fingerprint" in st.message


def test_full_canary_to_promotion():
    world = World(spec=agent_spec(canary={"steps": [{"setWeight": 10}, {"pause": {"durationSeconds": 30}},
                                                    {"setWeight": 50}, {"pause": {}}, {"setWeight": 100}]}))
    ro = make_rollout(APPROVED)
    st, acts = world.step(ro)
    assert st.approval.approved_by == "alice" and st.approval.fingerprint == FP
    assert acts.deploy == {"versions": {"cp-2": {"artifactURI": "file:///a/cp-2", "fingerprint": FP},
                                        "cp-1": {"artifactURI": "file:///a/cp-1", "fingerprint": OLD_FP}},
                           "weights": {"cp-1": 100, "cp-2": 0}}
    assert {e.reason for e in acts.events} >= {"Approved", "RolloutStarted"}

    st, acts = world.step(ro)  # deployed and RUNNING: first step
    assert world.weights == {"cp-1": 90, "cp-2": 10} and st.canary_weight == 10
    assert [e.reason for e in acts.events] == ["StepAdvanced"]

    st, _ = world.step(ro, analysis=("Inconclusive", "3 canary requests < minSampleCount 100", {}))
    assert st.phase == "Progressing" and st.canary_weight == 10 and "Inconclusive" in st.message

    st, _ = world.step(ro, analysis=OK)  # gate passes: into the 30 s pause
    assert st.phase == "Paused" and st.current_step_index == 1
    world.now += timedelta(seconds=31)
    st, _ = world.step(ro, analysis=OK)
    assert world.weights == {"cp-1": 50, "cp-2": 50} and st.current_step_index == 2

    st, _ = world.step(ro, analysis=OK)  # indefinite pause: waits for promote
    world.now += timedelta(hours=5)
    st, _ = world.step(ro, analysis=OK)
    assert st.phase == "Paused" and "rlops.dev/promote" in st.message

    st, acts = world.step(ro, annotations={**APPROVED, approvals.PROMOTE: "true"})
    assert approvals.PROMOTE in acts.remove_annotations and approvals.PROMOTE not in ro["metadata"]["annotations"]
    assert st.phase == "Promoting" and world.weights == {"cp-1": 0, "cp-2": 100}
    st, acts = world.step(ro)
    assert world.versions == {"cp-2": FP}  # the old version's deployment leaves after the traffic did
    st, acts = world.step(ro)
    assert st.phase == "Promoted" and acts.promote_active_model.version == "cp-2"
    assert acts.promote_active_model.fingerprint == FP
    assert [w["cp-2"] for w in world.weight_history] == [10, 50, 100]


def test_measurements_that_cannot_be_taken_roll_back_after_the_error_limit():
    """Prometheus unreachable: the canary holds its weight for consecutiveErrorLimit (4) errors in
    a row and is rolled back at the next; a measurement that succeeds, whatever its verdict,
    starts the count again."""
    world = World()
    ro = make_rollout(APPROVED)
    world.step(ro)
    world.step(ro)  # canary at 10%
    down = ("Error", "GET http://prom:9090/api/v1/query: ConnectError: [Errno 111] Connection refused", {})
    for n in (1, 2, 3):
        st, _ = world.step(ro, analysis=down)
        assert (st.phase, st.canary_weight, st.analysis.consecutive_errors) == ("Progressing", 10, n)
    assert st.message.startswith("canary weight 10%: analysis Error (3 in a row; more than 4 roll back): GET")
    st, _ = world.step(ro, analysis=("Inconclusive", "3 canary requests < minSampleCount 100", {}))
    assert st.analysis.consecutive_errors == 0
    for n in (1, 2, 3, 4):
        st, acts = world.step(ro, analysis=down)
        assert st.phase == "Progressing" and acts.set_weights is None, n
    st, acts = world.step(ro, analysis=down)
    assert st.phase == "RolledBack" and acts.set_weights == {"cp-1": 100, "cp-2": 0}
    assert st.abort_reason == ("analysis could not measure 5 times in a row at 10% (consecutiveErrorLimit 4): "
                               "GET http://prom:9090/api/v1/query: ConnectError: [Errno 111] Connection refused")


@pytest.mark.parametrize("limit, rolled_back_at", [(0, 1), (1, 2)])
def test_the_error_limit_is_the_agents(limit, rolled_back_at):
    world = World(spec=agent_spec(canary={"analysis": {"consecutiveErrorLimit": limit}}))
    ro = make_rollout(APPROVED)
    world.step(ro)
    world.step(ro)
    for _ in range(rolled_back_at):
        st, _ = world.step(ro, analysis=("Error", "ReadTimeout", {}))
    assert st.phase == "RolledBack" and st.analysis.consecutive_errors == rolled_back_at


def test_failed_analysis_rolls_back_at_once():
    world = World()
    ro = make_rollout(APPROVED)
    world.step(ro)
    world.step(ro)
    st, acts = world.step(ro, analysis=("Failed", "canary error rate 40.0% > 5.0%", {"canaryErrorRate": 0.4}))
    assert st.phase == "RolledBack" and st.canary_weight == 0
    assert acts.set_weights == {"cp-1": 100, "cp-2": 0}
    assert acts.deploy["versions"] == {"cp-1": None}  # then the canary's deployment goes
    assert "analysis failed at 10%" in st.abort_reason
    assert any(e.type == "Warning" and e.reason == "RolledBack" for e in acts.events)
    again, acts = world.step(ro)
    assert again.phase == "RolledBack" and acts.set_weights is None and acts.deploy is None


def test_abort_annotation_and_abort_function():
    world = World()
    ro = make_rollout(APPROVED)
    world.step(ro)
    world.step(ro)
    st, acts = t.abort(ro, "alert RLOpsCanaryErrorRateHigh firing", T0)
    assert st.phase == "RolledBack" and acts.set_weights == {"cp-1": 100, "cp-2": 0}
    st, acts = world.step(make_rollout({**APPROVED, t.ABORT: "bad vibes"}, status=ro["status"] | {"phase": "Paused"}))
    assert st.phase == "RolledBack" and "bad vibes" in st.abort_reason


def test_restart_mid_step_changes_no_traffic():
    world = World()
    ro = make_rollout(APPROVED)
    world.step(ro)
    world.step(ro)
    world.step(ro, analysis=OK)  # paused at 10%
    before = list(world.weight_history)
    for _ in range(3):  # what a restarted operator does: reconcile from the stored status
        st, acts = world.step(ro)
        assert acts.set_weights is None and acts.deploy is None
    assert world.weight_history == before and st.canary_weight == 10


def test_serve_is_read_only_once_approval_is_given():
    spec, status = agent_spec(), m.RolloutStatus(phase="AwaitingApproval")
    assert not approvals.approval_given(status, {}, spec)
    assert approvals.approval_given(status, APPROVED, spec)  # reconcile still checks the signature
    assert approvals.approval_given(status, {}, agent_spec(approval={"mode": "auto"}))
    approved = m.RolloutStatus(phase="Approved", approval=m.Approval(approved_by="alice", fingerprint=FP, policy="manual",
                                                                     approved_at=T0))
    assert approvals.approval_given(approved, {}, spec)


@pytest.mark.parametrize(("status", "seconds_later", "window"), [
    (dict(phase="Progressing", stable_version="cp-1", canary_weight=10), 3, 10),    # at least 10 s
    (dict(phase="Progressing", stable_version="cp-1", canary_weight=10), 30, 30),   # the time at this step
    (dict(phase="Paused", stable_version="cp-1", canary_weight=50), 600, 60),       # at most windowSeconds
    (dict(phase="Progressing", stable_version="cp-1", canary_weight=10, measured=2), 30, None),  # measured 2 s ago
    (dict(phase="Progressing", stable_version="cp-1", canary_weight=10, measured=5), 30, 30),    # interval is 5 s
    (dict(phase="Progressing", stable_version=None, canary_weight=10), 30, None),   # nothing to compare with
    (dict(phase="Progressing", stable_version="cp-1", canary_weight=100), 30, None),
    (dict(phase="AwaitingApproval", stable_version="cp-1", canary_weight=0), 30, None),
])
def test_analysis_is_due_every_interval_over_the_time_at_this_step(status, seconds_later, window):
    measured = status.pop("measured", None)
    now = T0 + timedelta(seconds=seconds_later)
    st = m.RolloutStatus(**status, step_started_at=T0,
                         analysis=m.AnalysisRun(phase="Successful", message="ok", step_index=0,
                                                measured_at=now - timedelta(seconds=measured))
                         if measured is not None else None)
    assert t.analysis_window(st, agent_spec(), now) == window


def test_first_rollout_without_stable_goes_straight_to_100():
    world = World(stable=None)
    ro = make_rollout(APPROVED)
    st, acts = world.step(ro)
    assert acts.deploy["weights"] == {"cp-2": 100} and st.stable_version is None
    for _ in range(3):
        st, acts = world.step(ro)
        if st.phase == "Promoted":
            break
    assert st.phase == "Promoted" and world.versions == {"cp-2": FP} and world.weights == {"cp-2": 100}


def test_same_version_name_with_another_artifact_is_redeployed():
    """A re-created agent's run cp-2 may reuse a name Serve still runs with an older artifact."""
    world = World(stable=None)
    world.versions, world.weights = {"cp-2": OLD_FP}, {"cp-2": 100}
    ro = make_rollout(APPROVED)
    st, acts = world.step(ro)
    assert acts.deploy is not None and acts.deploy["versions"]["cp-2"]["fingerprint"] == FP
    for _ in range(3):
        st, _ = world.step(ro)
    assert st.phase == "Promoted" and world.versions == {"cp-2": FP}


def test_promote_full_skips_to_100():
    world = World()
    ro = make_rollout(APPROVED)
    world.step(ro)
    world.step(ro)
    st, _ = world.step(ro, annotations={**APPROVED, approvals.PROMOTE: "full"})
    assert world.weights == {"cp-1": 0, "cp-2": 100} and st.phase == "Promoting"


def test_reject_and_queue():
    st, _ = World().step(make_rollout({approvals.REJECT: "reward hacking in eval"}))
    assert st.phase == "Rejected" and "reward hacking" in st.message
    st, acts = World().step(make_rollout(APPROVED), blocking="cp-1")
    assert st.phase == "Queued" and acts.deploy is None


@pytest.mark.parametrize(("auto", "mean", "approved"), [
    ({"minMeanReturn": 490}, 500.0, True),
    ({"minMeanReturn": 490}, 480.0, False),
    ({"minImprovementOverStable": 10}, 495.0, True),   # stable 480
    ({"minImprovementOverStable": 30}, 495.0, False),
    ({"minRelativeImprovementOverStable": 0.0}, 470.0, False),
])
def test_auto_approval_policy(auto, mean, approved):
    world = World(spec=agent_spec(approval={"mode": "auto", "auto": auto}))
    st, _ = world.step(make_rollout(mean=mean))
    assert (st.approval is not None) == approved
    if approved:
        assert st.approval.policy == "auto" and st.approval.approved_by == "rlops:auto-approval"
    else:
        assert st.phase == "AwaitingApproval" and "auto-approval refused" in st.message


def test_auto_approval_trusts_only_the_operators_own_measurement():
    """Auto-approval compares the operator's measured figures with its thresholds: a Rollout with
    the trainer's figures only waits for a person, and so does one whose evaluation ran the
    tenant's code, unless the policy (written with the approve verb) allows that."""
    policy = {"mode": "auto", "auto": {"minMeanReturn": 100}}
    st, _ = World(spec=agent_spec(approval=policy)).step(make_rollout(measured=False))
    assert st.approval is None and "no evaluation measured by the operator" in st.message
    st, _ = World(spec=agent_spec(approval=policy)).step(make_rollout(trusted=False))
    assert st.approval is None and "trusted: false" in st.message and "allowUntrustedEvaluation" in st.message
    allowing = {"mode": "auto", "auto": {"minMeanReturn": 100, "allowUntrustedEvaluation": True}}
    st, _ = World(spec=agent_spec(approval=allowing)).step(make_rollout(trusted=False))
    assert st.approval is not None and st.approval.policy == "auto"


def test_an_approval_signature_covers_the_evaluation_it_was_given():
    """The webhook signs the approval together with the signature of the evaluation the
    approver saw: the same approval over another evaluation does not hold."""
    assert review({}, {approvals.APPROVE: FP}, "alice", target=approvals.Target("ml", "cp-2", UID, FP, evidence=EVAL_SIG)
                  ).annotations[approvals.APPROVAL_SIGNATURE] == signed()[approvals.APPROVAL_SIGNATURE]
    other = make_rollout(signed())
    other["spec"]["evaluation"]["signature"] = "v1:" + "f" * 64
    st, _ = World().step(other)
    assert st.approval is None and "no valid" in st.message


SPEC = m.AnalysisSpec()


def rewards_histogram(rewards, low=-1.0, high=1.0):
    """The reward histogram Prometheus returns for these feedback rewards: ``(le, cumulative count)``
    over the router's buckets (``rlops_serve_feedback_reward_scaled``, rewards scaled to [low, high])."""
    from rl_engine.serving.config import REWARD_BUCKETS, FeedbackConfig

    scale = FeedbackConfig(reward_min=low, reward_max=high).scaled
    scaled = sorted(scale(x) for x in rewards)
    bounds = list(REWARD_BUCKETS) + [float("inf")]
    return tuple((le, float(sum(1 for x in scaled if x <= le))) for le in bounds)


def feedback(canary, stable, canary_negative=0, stable_negative=0, **kw):
    """A measurement with 1000 canary requests and these feedback rewards on each version."""
    return v.Measurement(canary_requests=1000, canary_errors=0,
                         canary_feedback=len(canary), canary_reward_buckets=rewards_histogram(canary, **kw),
                         canary_negative=canary_negative,
                         stable_feedback=len(stable), stable_reward_buckets=rewards_histogram(stable, **kw),
                         stable_negative=stable_negative)


@pytest.mark.parametrize(("meas", "phase", "words"), [
    (v.Measurement(canary_requests=50, canary_errors=0), "Inconclusive", "minSampleCount"),
    (v.Measurement(canary_requests=1000, canary_errors=60), "Failed", "error rate 6.0%"),
    (v.Measurement(canary_requests=1000, canary_errors=40), "Successful", "skipped"),
    (feedback([0.8] * 100, [0.9] * 100), "Failed", "canary reward 0.800 < stable 0.900 - 0.05 (10%-trimmed means)"),
    (feedback([0.9] * 70 + [0.8] * 30, [0.9] * 100), "Successful", "reward 0.875 vs stable 0.900"),
    (feedback([0.9] * 100, [0.9] * 100, canary_negative=9, stable_negative=4), "Failed", "negative-feedback rate 9.0%"),
])
def test_judge_follows_seed_004(meas, phase, words):
    verdict, message, _ = v.judge(meas, SPEC, has_stable=True)
    assert verdict == phase and words in message, message


def honest(mean, n=1000, sd=0.1, seed=0):
    """n feedback rewards around ``mean`` (a normal distribution clipped to the default range [-1, 1])."""
    rng = random.Random(seed)
    return [min(1.0, max(-1.0, rng.gauss(mean, sd))) for _ in range(n)]


def mean(xs):
    return sum(xs) / len(xs)


# Sample sizes: 1000 honest feedbacks per version; the attacker adds k = 100 (9.1% of the
# 1100 in the window), every one at an end of the declared range [-1, 1].
ATTACK = 100


def test_extreme_feedback_cannot_make_a_bad_canary_pass(monkeypatch):
    stable, canary = honest(0.5, seed=1), honest(0.42, seed=2)
    assert v.judge(feedback(canary, stable), SPEC, True)[0] == "Failed"
    poisoned = canary + [1.0] * ATTACK
    assert mean(poisoned) > mean(stable) - SPEC.max_reward_drop, "the attack would fool a plain mean"
    verdict, message, metrics = v.judge(feedback(poisoned, stable), SPEC, True)
    assert verdict == "Failed" and "canary reward" in message, message
    assert metrics["canaryTrimmedMeanReward"] < 0.45
    monkeypatch.setattr(v.Measurement, "REWARD_TRIM", 0.0)  # without the trimming, the attack works
    assert v.judge(feedback(poisoned, stable), SPEC, True)[0] == "Successful"


def test_extreme_feedback_cannot_make_a_good_canary_fail(monkeypatch):
    stable, canary = honest(0.5, seed=1), honest(0.5, seed=3)
    assert v.judge(feedback(canary, stable), SPEC, True)[0] == "Successful"
    poisoned = canary + [-1.0] * ATTACK
    assert mean(poisoned) < mean(stable) - SPEC.max_reward_drop, "the attack would fool a plain mean"
    verdict, message, metrics = v.judge(feedback(poisoned, stable), SPEC, True)
    assert verdict == "Successful" and "reward" in message, message
    monkeypatch.setattr(v.Measurement, "REWARD_TRIM", 0.0)
    assert v.judge(feedback(poisoned, stable), SPEC, True)[0] == "Failed"


@pytest.mark.parametrize("k", [1, 10, 50, 100])
def test_trimmed_mean_moves_at_most_as_documented(k):
    # docs/rollouts.md: k of n feedbacks, whatever their values in [min, max], move the 10%-trimmed
    # mean by at most k * (max - min) / (0.8 n), and, for k <= 0.1 n, by at most k * d / (0.8 n)
    # (d: spread of the other feedback's central values; here all of it lies in [-0.2, 0.4]).
    n, rng = 1000, random.Random(k)
    base = [rng.choice([-0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4]) for _ in range(n)]  # on the bucket grid
    t0 = v.Measurement.trimmed_mean(rewards_histogram(base), -1.0, 1.0, 0.1)
    assert t0 == pytest.approx(mean(sorted(base)[100:900]))  # exact on the grid
    for extreme in (-1.0, 1.0):
        t1 = v.Measurement.trimmed_mean(rewards_histogram(base[k:] + [extreme] * k), -1.0, 1.0, 0.1)
        assert abs(t1 - t0) <= k * 2.0 / (0.8 * n) + 1e-9
        assert abs(t1 - t0) <= k * 0.6 / (0.8 * n) + 1e-9
        assert abs(t1 - t0) < abs(extreme - t0) * k / n or k == 0  # less than a plain mean moves


def test_trimmed_mean_reads_prometheus_buckets():
    assert v.Measurement.trimmed_mean((), -1, 1) is None
    assert v.Measurement.trimmed_mean(rewards_histogram([]), -1, 1) is None
    # Rewards on the grid of 1/20 of the range come back exactly, in reward units (range [1, 5]: stars).
    assert v.Measurement.trimmed_mean(rewards_histogram([1, 2, 3, 4, 5] * 20, 1, 5), 1, 5) == pytest.approx(3.0)
    assert v.Measurement.trimmed_mean(rewards_histogram([1] * 10, 1, 5), 1, 5) == pytest.approx(1.0)
    assert v.Measurement.trimmed_mean(rewards_histogram([5] * 10, 1, 5), 1, 5) == pytest.approx(5.0)
    # Elsewhere within 1/40 of the range; fractional counts (increase()) and resets are tolerated.
    assert v.Measurement.trimmed_mean(rewards_histogram([0.33] * 10), -1, 1) == pytest.approx(0.33, abs=0.05)
    buckets = [(le, 0.9 * count) for le, count in rewards_histogram([-1.0] * 25 + [0.0] * 50 + [0.9] * 25)]
    assert buckets[14] == (0.725, 67.5)
    buckets[14] = (0.725, 60.0)  # one bucket's increase() came out lower than the one before it
    assert v.Measurement.trimmed_mean(buckets, -1, 1, 0.0) == pytest.approx((-22.5 + 0.9 * 22.5) / 90)


def test_measure_reads_the_reward_histogram_by_bucket(monkeypatch):
    from rl_operator import analysis

    asked = []
    canary = rewards_histogram([0.4] * 30 + [-1.0] * 3)

    class Resp:
        status_code = 200

        def __init__(self, result):
            self.result = result

        def json(self):
            return {"data": {"resultType": "vector", "result": self.result}}

    def get(url, params, timeout):
        q = params["query"]
        asked.append(q)
        if "reward_scaled_bucket" in q:
            rows = canary if 'version="cp-2"' in q else ()
            return Resp([{"metric": {"le": "+Inf" if le == float("inf") else repr(le)}, "value": [0, str(c)]}
                         for le, c in reversed(rows)])
        return Resp([{"metric": {}, "value": [0, "33" if "feedback_total" in q else "1000"]}])

    monkeypatch.setattr(analysis.httpx, "get", get)
    meas = analysis.measure("http://prom", "ml", "cp", "cp-2", "cp-1", 60)
    assert 'sum by (le)(increase(ray_rlops_serve_feedback_reward_scaled_bucket{namespace="ml",agent="cp",' \
           'version="cp-2"}[60s]))' in asked
    assert meas.canary_reward_buckets == canary and meas.stable_reward_buckets == ()
    assert meas.canary_feedback == 33 and meas.canary_requests == 1000
    assert v.Measurement.trimmed_mean(meas.canary_reward_buckets, -1, 1) == pytest.approx(0.4)


def test_reward_range_default_and_rule():
    assert (SPEC.reward_range.min, SPEC.reward_range.max) == (-1.0, 1.0)
    spec = m.AnalysisSpec.model_validate({"rewardRange": {"min": 1, "max": 5}})
    assert spec.wire()["rewardRange"] == {"min": 1.0, "max": 5.0}
    rules = m.RewardRange.model_json_schema()["x-kubernetes-validations"]
    assert len(rules) == 1 and rules[0]["rule"].endswith("self.min < self.max")
    assert rules[0]["message"] == "rewardRange.min must be less than rewardRange.max"
    with pytest.raises(ValueError):
        m.RewardRange.model_validate({"min": float("-inf")})


TARGET = approvals.Target(namespace="ml", name="cp-2", uid=UID, fingerprint=FP, evidence=EVAL_SIG)


def review(old, new, user, target=TARGET, key=KEY, impersonator=None):
    return approvals.review(old, new, target, approvals.Requester(user, impersonator), T0, key)


def test_review_of_approval_annotations():
    ok = review({}, {approvals.APPROVE: FP}, "alice")
    assert ok.error is None and ok.permission == "approve"
    assert ok.annotations.pop(approvals.APPROVED_VIA, "absent") is None  # clears an earlier approval's record
    assert {approvals.APPROVE: FP, **ok.annotations} == signed()
    stale = review({}, {approvals.APPROVE: OLD_FP}, "alice")
    assert "stale or wrong fingerprint" in stale.error
    forged = review({}, {approvals.APPROVED_BY: "root"}, "mallory")
    assert "recorded by the rlops admission webhook" in forged.error
    forged_sig = review({}, {approvals.APPROVAL_SIGNATURE: "v1:00"}, "mallory")
    assert "recorded by the rlops admission webhook" in forged_sig.error
    reject = review({}, {approvals.REJECT: "no"}, "bob")
    assert reject.error is None and reject.permission == "approve"
    unrelated = review(APPROVED, {**APPROVED, "kopf.zalando.org/last": "{}"}, "operator")
    assert unrelated.error is None and unrelated.permission is None
    assert "signing key" in review({}, {approvals.APPROVE: FP}, "alice", key=None).error
    via = review({}, {approvals.APPROVE: FP}, "alice", impersonator="admin")
    assert via.annotations[approvals.APPROVED_VIA] == "impersonated by admin"


def test_only_the_operator_records_an_impersonator_after_the_fact():
    later = {**APPROVED, approvals.APPROVED_VIA: "impersonated by root"}
    assert review(APPROVED, later, m.OPERATOR_USER).error is None  # from the API server's audit log
    assert "recorded by the rlops admission webhook" in review(APPROVED, later, "mallory").error
    assert "recorded by the rlops admission webhook" in review(later, APPROVED, "mallory").error  # nor remove it
    rewritten = {**later, approvals.APPROVED_BY: "root"}
    assert "recorded by the rlops admission webhook" in review(APPROVED, rewritten, m.OPERATOR_USER).error
    # the status shows it, on the approval it belongs to, even when it arrives after the approval
    st, _ = World().step(make_rollout(APPROVED))
    assert st.approval.approved_by == "alice" and st.approval.via is None
    st, _ = World().step(make_rollout(later, status=st.wire()))
    assert st.approval.via == "impersonated by root" and st.approval.approved_by == "alice"
    assert "(impersonated by root)" in next(c.message for c in st.conditions if c.type == "Approved")


def test_service_account_approvals_need_the_policy_to_name_them():
    robot = "system:serviceaccount:ml:ci"
    refused = review({}, {approvals.APPROVE: FP}, robot)
    assert "is a ServiceAccount" in refused.error and "allowedServiceAccounts" in refused.error
    allowed = review({}, {approvals.APPROVE: FP}, robot,
                     target=approvals.Target("ml", "cp-2", UID, FP, allowed_service_accounts=(robot,), evidence=EVAL_SIG))
    assert allowed.error is None and allowed.annotations[approvals.APPROVED_BY] == robot
    # the operator re-checks on reconcile: a signed approval by an unlisted ServiceAccount does not count
    st, acts = World().step(make_rollout(signed(by=robot)))
    assert st.phase == "AwaitingApproval" and "is a ServiceAccount" in st.message
    assert [e.reason for e in acts.events] == ["ApprovalRefused"]
    st, _ = World(spec=agent_spec(approval={"allowedServiceAccounts": [robot]})).step(make_rollout(signed(by=robot)))
    assert st.approval is not None and st.approval.approved_by == robot


@pytest.mark.parametrize("decision", [{approvals.REJECT: "no"}, {approvals.PROMOTE: "true"}, {approvals.PROMOTE: "full"},
                                      {approvals.APPROVE: FP, approvals.PROMOTE: "full"}],
                         ids=["reject", "promote", "promote-full", "approve-and-promote"])
def test_a_service_account_rejects_or_promotes_only_when_the_policy_names_it(decision):
    """Anyone who may create Secrets or pods in a ServiceAccount's namespace can mint its token:
    every decision that needs the approve verb also needs the agent to list the account."""
    robot = "system:serviceaccount:ml:ci"
    refused = review({}, decision, robot)
    assert "is a ServiceAccount" in refused.error and "allowedServiceAccounts" in refused.error
    listed = approvals.Target("ml", "cp-2", UID, FP, allowed_service_accounts=(robot,))
    ok = review({}, decision, robot, target=listed)
    assert ok.error is None and ok.permission == "approve"
    assert review({}, decision, "bob").permission == "approve"  # a person: the verb alone (RBAC)
    # the operator removing a consumed promote decides nothing
    assert review({approvals.PROMOTE: "true"}, {}, m.OPERATOR_USER).permission is None


def test_an_approver_service_account_in_the_agents_namespace_is_a_warning():
    spec = agent_spec(approval={"allowedServiceAccounts": ["system:serviceaccount:ml:ci",
                                                           "system:serviceaccount:approvers:ci"]})
    status = m.RLAgentStatus()
    events = approvals.note_approvers(status, spec, "ml", T0)
    cond = next(c for c in status.conditions if c.type == "ApproversIsolated")
    assert cond.status == "False" and cond.reason == "ServiceAccountInAgentNamespace"
    assert "system:serviceaccount:ml:ci" in cond.message and "approvers:ci" not in cond.message
    assert [e.reason for e in events] == ["ApproverInAgentNamespace"]
    assert approvals.note_approvers(status, spec, "ml", T0) == []  # once, not on every sync
    moved = agent_spec(approval={"allowedServiceAccounts": ["system:serviceaccount:approvers:ci"]})
    assert approvals.note_approvers(status, moved, "ml", T0) == []
    assert next(c for c in status.conditions if c.type == "ApproversIsolated").status == "True"
    untouched = m.RLAgentStatus()
    approvals.note_approvers(untouched, agent_spec(), "ml", T0)
    assert untouched.conditions == []  # an agent that lists no ServiceAccount gets no condition


@pytest.mark.parametrize(("annotations", "words"), [
    ({approvals.APPROVE: FP, approvals.APPROVED_BY: "alice", approvals.APPROVED_AT: "2026-11-22T12:00:00Z"}, "no valid"),
    ({**signed(), approvals.APPROVED_BY: "bob"}, "no valid"),                        # approver swapped after signing
    ({**signed(), approvals.APPROVED_AT: "2027-01-01T00:00:00Z"}, "no valid"),       # time swapped
    (signed(uid="another-uid"), "no valid"),                                # copied from another Rollout
    (signed(key=b"x" * 32), "no valid"),                                    # signed with another key
    ({approvals.APPROVE: FP}, "not recorded by the rlops admission webhook"),        # webhook disabled or unregistered
    ({approvals.APPROVED_BY: "alice"}, "without"),
])
def test_unsigned_or_altered_approvals_never_count(annotations, words):
    st, _ = World().step(make_rollout(annotations))
    assert st.approval is None and st.phase == "AwaitingApproval"
    assert words in st.message


def test_approval_for_another_artifact_in_status_is_not_trusted():
    ro = make_rollout(APPROVED)
    world = World()
    world.step(ro)
    ro["status"]["approval"]["fingerprint"] = OLD_FP
    st, acts = world.step(ro)
    assert st.phase == "RolledBack" and "status.approval names" in st.abort_reason
    assert t.same_split(world.weights, {"cp-1": 100}) and world.versions == {"cp-1": OLD_FP}


def test_untrusted_rollout_is_ignored_or_rolled_back():
    world = World()
    st, _ = world.step(make_rollout(APPROVED))
    obs = t.Observed(now=T0, annotations=APPROVED, agent_spec=agent_spec(), active_model=STABLE,
                     untrusted="it is not controlled by TrainingRun 'cp-2'")
    fresh, acts = r.reconcile(make_rollout(APPROVED), obs)
    assert fresh.phase == "Ignored" and fresh.approval is None and acts.deploy is None and acts.set_weights is None
    assert [e.reason for e in acts.events] == ["Ignored"]
    ro = make_rollout(APPROVED)
    ro["status"] = st.wire()
    assert st.phase in t.ACTIVE
    later, acts = r.reconcile(ro, obs)
    assert later.phase == "RolledBack" and acts.set_weights == {"cp-1": 100, "cp-2": 0}
    sar = approvals.sar_body({"username": "bob", "groups": ["devs"]}, "ml", "cp-2")
    assert sar["spec"]["resourceAttributes"] == {"group": "rlops.dev", "resource": "rollouts", "verb": "approve",
                                                 "namespace": "ml", "name": "cp-2"}


def test_only_rollouts_that_move_with_time_keep_the_periodic_reconcile():
    from rl_operator.handlers.rollouts import rollout_ticks
    for phase in (None, "Queued", "Progressing", "Paused", "Promoting"):
        assert rollout_ticks({"phase": phase} if phase else None), phase
    for phase in ("Promoted", "RolledBack", "Rejected", "Ignored", "Approved", "AwaitingApproval"):
        assert not rollout_ticks({"phase": phase}, {}), phase
    # an approval the webhook recorded but the operator could not act on yet (Ray Serve down)
    assert rollout_ticks({"phase": "AwaitingApproval"}, {"rlops.dev/approved-by": "bob"})
    assert not rollout_ticks({"phase": "Promoted"}, {"rlops.dev/approved-by": "bob"})


def test_the_kill_switch_pins_traffic_to_stable_and_holds_the_step():
    world = World(spec=agent_spec(canary={"steps": [{"setWeight": 10}, {"pause": {"durationSeconds": 30}},
                                                    {"setWeight": 50}, {"setWeight": 100}]}))
    ro = make_rollout(APPROVED)
    world.step(ro)
    world.step(ro)
    st, _ = world.step(ro, analysis=OK)
    assert st.phase == "Paused" and world.weights == {"cp-1": 90, "cp-2": 10}
    st, acts = world.step(ro, frozen="incident 42")
    assert world.weights == {"cp-1": 100, "cp-2": 0} and st.canary_weight == 0 and st.weight_before_freeze == 10
    assert [(e.type, e.reason) for e in acts.events] == [("Warning", "Frozen")]
    frozen = next(c for c in st.conditions if c.type == "Frozen")
    assert (frozen.status, frozen.reason) == ("True", "KillSwitch") and "incident 42" in frozen.message
    # time passes, analysis passes, promote is asked: nothing moves while frozen
    world.now += timedelta(minutes=10)
    st, acts = world.step(ro, analysis=OK, annotations={**APPROVED, approvals.PROMOTE: "true"}, frozen="incident 42")
    assert world.weights == {"cp-1": 100, "cp-2": 0} and st.current_step_index == 1 and acts.events == []
    ro["metadata"]["annotations"].pop(approvals.PROMOTE)
    # lifted: back to 10%, the pause starts over
    st, acts = world.step(ro, analysis=OK)
    assert world.weights == {"cp-1": 90, "cp-2": 10} and st.canary_weight == 10 and st.weight_before_freeze is None
    assert st.phase == "Paused" and st.step_started_at == world.now
    assert "Unfrozen" in [e.reason for e in acts.events]
    world.now += timedelta(seconds=31)
    world.step(ro, analysis=OK)
    assert world.weights == {"cp-1": 50, "cp-2": 50}


def test_the_kill_switch_holds_a_rollout_that_has_not_started():
    world = World()
    ro = make_rollout(APPROVED)
    st, acts = world.step(ro, frozen="maintenance")
    assert st.phase == "Approved" and "starts when it is lifted" in st.message and acts.deploy is None
    assert world.weights == {"cp-1": 100}
    st, acts = world.step(ro)
    assert st.phase == "Progressing" and acts.deploy is not None


def test_the_kill_switch_cannot_move_a_first_rollout_anywhere():
    world = World(stable=None)
    ro = make_rollout(APPROVED)
    st, acts = world.step(ro)  # started: its deployment asked for
    assert st.phase == "Progressing" and st.stable_version is None
    st, acts = world.step(ro, frozen="x")
    assert acts.set_weights is None and acts.deploy is None and "no stable version" in st.message
    assert st.phase == "Progressing"


# ----------------------------------------------------------------- override limit, circuit breaker


def test_the_canary_carries_the_breaker_and_the_override_baseline_only_while_it_shares_traffic():
    world = World(spec=agent_spec(canary={"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]}))
    ro = make_rollout(APPROVED)
    world.step(ro)  # deploy at weight 0: nothing to guard yet
    assert world.extras == {}
    world.step(ro)
    assert world.weights == {"cp-1": 90, "cp-2": 10}
    assert world.extras == {"circuitBreaker": {"stable": "cp-1", "consecutiveErrors": 5, "timeoutSeconds": 2.0},
                            "overrideBaseline": "cp-1"}
    world.extras = {}  # a router that lost them (redeployed by hand): the next reconcile restores them
    _, acts = world.step(ro, analysis=OK)
    assert acts.set_weights == {"cp-1": 90, "cp-2": 10} and "circuitBreaker" in world.extras
    st, _ = world.step(ro, annotations={**APPROVED, approvals.PROMOTE: "true"})
    assert st.canary_weight == 100 and world.extras == {}


def test_breaker_off_and_no_override_limit_leave_the_router_as_before():
    world = World(spec=agent_spec(canary={"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}],
                                          "circuitBreaker": {"consecutiveErrors": 0},
                                          "analysis": {"maxOverrideRate": 1}}))
    ro = make_rollout(APPROVED)
    world.step(ro)
    world.step(ro)
    assert world.weights == {"cp-1": 90, "cp-2": 10} and world.extras == {}


def test_an_open_circuit_breaker_rolls_the_canary_back_with_the_reason():
    world = World()
    ro = make_rollout(APPROVED)
    world.step(ro)
    world.step(ro)
    st, acts = world.step(ro, circuit_open="5 consecutive canary errors: the router sent all traffic to stable cp-1")
    assert st.phase == "RolledBack" and st.abort_reason.startswith("circuit breaker open: 5 consecutive")
    assert world.weights == {"cp-1": 100} and world.extras == {} and set(world.versions) == {"cp-1"}


@pytest.mark.parametrize("decisions, agreements, phase", [
    (1000, 850, "Successful"), (1000, 790, "Failed"), (40, 0, "Successful"),  # 40 < minSampleCount / 2: not judged
])
def test_judge_fails_a_canary_that_overrides_stable_too_often(decisions, agreements, phase):
    meas = v.Measurement(canary_requests=1000, canary_errors=0, canary_decisions=decisions,
                         canary_agreements=agreements, window_seconds=30)
    verdict, message, metrics = v.judge(meas, m.AnalysisSpec(), has_stable=True)
    assert verdict == phase, message
    if phase == "Failed":
        assert "canary overrides stable in 21.0% of 1000 compared answers > maxOverrideRate 20.0%" in message
        assert metrics["canaryOverrideRate"] == 0.21


# ----------------------------------------------------------------- observe (shadow) mode

OBSERVE = {"mode": "observe", "observe": {"minDecisions": 100, "minOverrideFeedback": 5}}


def counts(decisions, agreements, judged=0, correct=0):
    return v.ShadowCounts(decisions, agreements, judged, correct)


def test_shadow_deploys_beside_stable_mirrors_and_graduates_not_one_decision_early():
    world = World(spec=agent_spec(**OBSERVE))
    ro = make_rollout(APPROVED)  # an approval given early counts only after graduation
    st, acts = world.step(ro)
    assert st.phase == "Shadowing" and st.approval is None and st.canary_weight == 0
    assert acts.deploy["weights"] == {"cp-1": 100, "cp-2": 0} and world.extras == {"shadow": "cp-2"}
    assert [e.reason for e in acts.events] == ["ShadowStarted"]
    st, _ = world.step(ro)
    assert st.phase == "Shadowing" and "no measurement yet" in st.message
    st, _ = world.step(ro, shadow_error="Prometheus: GET http://prom:9090/api/v1/query: ConnectError")
    assert st.phase == "Shadowing" and st.message == \
        "shadowing: cannot measure: Prometheus: GET http://prom:9090/api/v1/query: ConnectError"
    st, _ = world.step(ro, shadow=counts(99, 85, 10, 7))
    assert st.phase == "Shadowing" and st.shadow.decisions == 99 and st.shadow.agreement_rate == round(85 / 99, 4)
    assert "99/100 decisions" in st.message and "waiting for: decisions" in st.message
    assert world.weights == {"cp-1": 100, "cp-2": 0}
    st, acts = world.step(ro, shadow=counts(100, 86, 10, 7))
    assert st.shadow.graduated_at == T0 and st.shadow.override_accuracy == 0.7
    cond = next(c for c in st.conditions if c.type == "Graduated")
    assert cond.status == "True" and "100/100 decisions" in cond.message
    # on through the normal approval: the early approval counts now, and the canary starts
    assert st.approval is not None and st.phase == "Progressing"
    assert {"Graduated", "Approved", "RolloutStarted"} <= {e.reason for e in acts.events}
    assert "shadow" not in world.extras
    st, _ = world.step(ro)
    assert world.weights["cp-2"] == 10 and "circuitBreaker" in world.extras


@pytest.mark.parametrize("c, missing", [
    (counts(500, 499, 10, 9), "agreement not in [80%, 95%]"),
    (counts(500, 300, 10, 9), "agreement not in [80%, 95%]"),
    (counts(500, 450, 4, 4), "5 judged overrides"),
    (counts(500, 450, 10, 5), "override accuracy >= 60%"),
])
def test_shadow_does_not_graduate_outside_the_criteria(c, missing):
    graduated, progress = v.graduation(c, m.ObserveSpec.model_validate(OBSERVE["observe"]))
    assert not graduated and missing in progress


def test_shadow_without_approval_waits_for_it_after_graduation_and_a_reject_removes_the_candidate():
    world = World(spec=agent_spec(**OBSERVE))
    ro = make_rollout()
    world.step(ro)
    st, _ = world.step(ro, shadow=counts(100, 90, 5, 5))
    assert st.phase == "AwaitingApproval" and st.message.startswith("waiting for kubectl annotate")
    assert set(world.versions) == {"cp-1", "cp-2"} and world.extras == {}
    st, acts = world.step(ro, annotations={approvals.REJECT: "not now"})
    assert st.phase == "Rejected" and set(world.versions) == {"cp-1"} and world.weights == {"cp-1": 100}


def test_a_newer_run_supersedes_a_shadow_and_its_candidate_leaves():
    world = World(spec=agent_spec(**OBSERVE))
    ro = make_rollout()
    world.step(ro)
    st, _ = world.step(ro, newer="cp-3")
    assert st.phase == "Superseded" and set(world.versions) == {"cp-1"}


def test_setting_mode_active_ends_the_shadow_without_graduation():
    world = World(spec=agent_spec(**OBSERVE))
    ro = make_rollout()
    world.step(ro)
    world.spec = agent_spec()
    st, acts = world.step(ro)
    assert st.phase == "AwaitingApproval" and st.shadow.ended and st.shadow.graduated_at is None
    assert world.extras == {} and [e.reason for e in acts.events] == ["ShadowEnded"]


def test_observe_mode_without_a_stable_version_rolls_out_the_first_policy_as_active_mode_does():
    world = World(stable=None, spec=agent_spec(**OBSERVE))
    st, _ = world.step(make_rollout())
    assert st.phase == "AwaitingApproval" and st.shadow is None


def test_shadow_queues_behind_another_rollout_and_an_abort_removes_it():
    world = World(spec=agent_spec(**OBSERVE))
    ro = make_rollout()
    st, acts = world.step(ro, blocking="cp-0")
    assert st.phase == "Queued" and acts.deploy is None
    world.step(ro)
    st, _ = world.step(ro, annotations={t.ABORT: "enough"})
    assert st.phase == "RolledBack" and set(world.versions) == {"cp-1"} and world.extras == {}


def test_a_graduated_shadow_is_approved_automatically_when_the_agents_policy_says_so():
    world = World(spec=agent_spec(**OBSERVE, approval={"mode": "auto", "auto": {"minMeanReturn": 400}}))
    ro = make_rollout(mean=500.0)
    st, _ = world.step(ro)
    assert st.phase == "Shadowing" and st.approval is None, "auto-approval waits for graduation"
    st, acts = world.step(ro, shadow=counts(100, 90, 5, 5))
    assert st.approval.policy == "auto" and st.phase == "Progressing"
    assert {"Graduated", "Approved", "RolloutStarted"} <= {e.reason for e in acts.events}


# ----------------------------------------------------------------------------- the stages, one at a time


def a_pass(annotations=None, status=None, **observed):
    ro = make_rollout(annotations, status)
    obs = t.Observed(now=T0, annotations=dict(ro["metadata"]["annotations"]), agent_spec=observed.pop("spec", agent_spec()),
                     active_model=STABLE, approval_key=KEY, **observed)
    return canary.Pass(rollout=ro, spec=m.RolloutSpec.model_validate(ro["spec"]),
                  st=m.RolloutStatus.model_validate(ro["status"]), obs=obs)


def test_a_stage_goes_on_with_none_and_ends_the_reconcile_with_its_verdict():
    progressing = {"phase": "Progressing", "approval": {"policy": "manual", "approvedBy": "alice", "fingerprint": FP,
                                "approvedAt": "2026-11-22T11:00:00Z"},
                   "stableVersion": "cp-1", "canaryVersion": "cp-2", "canaryWeight": 10}
    assert canary.queue(a_pass(blocking_rollout="cp-1")) is not None
    assert canary.queue(a_pass(status=progressing, blocking_rollout="cp-1")) is None  # a started Rollout is never queued
    p = a_pass({approvals.REJECT: "reward hacking"})
    st, acts = canary.rejected(p)
    cond = next(c for c in st.conditions if c.type == "Approved")
    assert st.phase == "Rejected" and (cond.reason, cond.message) == ("Rejected", "reward hacking")
    assert [e.reason for e in acts.events] == ["Rejected"]
    st, _ = canary.superseded(a_pass(newer_rollout="cp-3"))
    cond = next(c for c in st.conditions if c.type == "Approved")
    assert st.phase == "Superseded" and cond.reason == "Superseded" and "cp-3" in cond.message
    assert canary.superseded(a_pass()) is None and canary.rejected(a_pass()) is None
    st, acts = canary.abort_requested(a_pass(status=progressing, circuit_open="5 errors in a row"))
    assert st.phase == "RolledBack" and acts.set_weights == {"cp-1": 100, "cp-2": 0}
    assert canary.abort_requested(a_pass(circuit_open="5 errors in a row")) is None  # no canary yet: nothing to roll back


def test_a_step_holds_for_its_pause_its_analysis_or_until_promoted():
    spec = agent_spec(canary={"steps": [{"setWeight": 10}, {"pause": {"durationSeconds": 60}}, {"setWeight": 50},
                                        {"setWeight": 100}]})
    at_pause = {"phase": "Progressing", "stableVersion": "cp-1", "canaryVersion": "cp-2", "canaryWeight": 10,
                "currentStepIndex": 1, "stepStartedAt": "2026-11-22T11:59:30Z"}
    st, _ = canary.steps(a_pass(status=at_pause, spec=spec))
    assert st.phase == "Paused" and st.message == "paused at 10% for 30s more"
    p = a_pass({approvals.PROMOTE: ""}, at_pause, spec=spec)
    st, acts = canary.steps(p)  # promoted out of the pause: the next step sets 50%
    assert st.canary_weight == 50 and acts.set_weights == {"cp-1": 50, "cp-2": 50} and p.promote is None
    assert acts.remove_annotations == [approvals.PROMOTE]
    at_fifty = {**at_pause, "canaryWeight": 50, "currentStepIndex": 2}
    st, acts = canary.steps(a_pass(status=at_fifty, spec=spec))
    assert st.message == "canary weight 50%: analysis pending" and acts.set_weights is None
    p = a_pass(status=at_fifty, spec=spec, analysis=OK)
    assert canary.steps(p) is None and p.st.canary_weight == 100  # analysis passed, the last step: promotion follows
    st, _ = canary.steps(a_pass(status=at_fifty, spec=spec, analysis=("Failed", "canary error rate 9% above 5%", {})))
    assert st.phase == "RolledBack" and "canary error rate 9% above 5%" in st.abort_reason


def test_the_stages_are_one_ordered_list_that_ends_with_promotion():
    names = [s.__name__ for s in canary.STAGES]
    assert names.index("trust") < names.index("approve") < names.index("queue") < names.index("deploy") \
        < names.index("steps") < names.index("promote") == len(names) - 1
    # an untrusted Rollout goes no further, even with an abort or an approval on it
    st, _ = r.reconcile(make_rollout({t.ABORT: "x", **APPROVED}), t.Observed(
        now=T0, annotations={t.ABORT: "x", **APPROVED}, agent_spec=agent_spec(), active_model=STABLE,
        approval_key=KEY, untrusted="not made by the operator"))
    assert st.phase == "Ignored"
