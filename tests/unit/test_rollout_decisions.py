"""The canary state machine, the analysis verdict and the approval review: pure, no cluster.

``World`` applies the pipeline's actions to a dict standing for Ray Serve's state, so a whole
rollout can be stepped through reconcile by reconcile.
"""

from datetime import datetime, timedelta, timezone

import pytest

from rl_operator import approvals
from rl_operator import models as m
from rl_operator import rollout as r

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
FP = "sha256:" + "c" * 64
OLD_FP = "sha256:" + "a" * 64
STABLE = m.ActiveModel(version="cp-1", fingerprint=OLD_FP, artifact_uri="file:///a/cp-1", mean_return=480.0)


def make_rollout(annotations=None, status=None, mean=500.0):
    return {
        "metadata": {"name": "cp-2", "namespace": "ml", "generation": 1, "annotations": annotations or {}},
        "spec": m.RolloutSpec(agent_ref=m.ObjectRef(name="cp"), training_run_ref=m.ObjectRef(name="cp-2"),
                              version="cp-2", artifact_uri="file:///a/cp-2", fingerprint=FP,
                              evaluation=m.EvaluationSummary(mean_return=mean)).wire(),
        "status": status or {},
    }


def agent_spec(**kw):
    return m.RLAgentSpec.model_validate({"environment": {"id": "CartPole-v1"}, **kw})


APPROVED = {r.APPROVE: FP, r.APPROVED_BY: "alice", r.APPROVED_AT: "2026-11-22T12:00:00Z"}


class World:
    """Ray Serve's state for one application, changed only by the pipeline's actions."""

    def __init__(self, stable=STABLE, spec=None):
        self.stable = stable
        self.spec = spec or agent_spec()
        self.versions = {stable.version: stable.fingerprint} if stable else None
        self.weights = {stable.version: 100} if stable else None
        self.weight_history = []
        self.now = T0

    def step(self, ro, analysis=None, annotations=None, blocking=None):
        ro["metadata"]["annotations"] = annotations if annotations is not None else ro["metadata"]["annotations"]
        obs = r.Observed(now=self.now, annotations=dict(ro["metadata"]["annotations"]), agent_spec=self.spec,
                         active_model=self.stable, serving_versions=self.versions,
                         serving_weights=self.weights, app_status="RUNNING" if self.versions else None,
                         blocking_rollout=blocking, analysis=analysis)
        status, acts = r.reconcile(ro, obs)
        if acts.set_weights is not None:
            self.weights = dict(acts.set_weights)
            self.weight_history.append(dict(acts.set_weights))
        if acts.deploy is not None:
            self.versions = {v: (e or {"fingerprint": self.versions[v]})["fingerprint"]
                             for v, e in acts.deploy["versions"].items()}
            if acts.set_weights is None:
                self.weights = dict(acts.deploy["weights"])
        for key in acts.remove_annotations:
            ro["metadata"]["annotations"].pop(key, None)
        ro["status"] = status.wire()
        return status, acts


OK = ("Successful", "error rate 0.0%", {})


def test_waits_for_approval_and_says_how():
    world = World()
    st, acts = world.step(make_rollout())
    assert st.phase == "AwaitingApproval"
    assert f"{r.APPROVE}={FP}" in st.message
    assert acts.deploy is None and acts.set_weights is None


def test_stale_fingerprint_is_not_an_approval():
    st, _ = World().step(make_rollout({r.APPROVE: OLD_FP, r.APPROVED_BY: "alice"}))
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

    st, acts = world.step(ro, annotations={**APPROVED, r.PROMOTE: "true"})
    assert r.PROMOTE in acts.remove_annotations and r.PROMOTE not in ro["metadata"]["annotations"]
    assert st.phase == "Promoting" and world.weights == {"cp-1": 0, "cp-2": 100}
    st, acts = world.step(ro)
    assert world.versions == {"cp-2": FP}  # the old version's deployment leaves after the traffic did
    st, acts = world.step(ro)
    assert st.phase == "Promoted" and acts.promote_active_model.version == "cp-2"
    assert acts.promote_active_model.fingerprint == FP
    assert [w["cp-2"] for w in world.weight_history] == [10, 50, 100]


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
    st, acts = r.abort(ro, "alert RLOpsCanaryErrorRateHigh firing", T0)
    assert st.phase == "RolledBack" and acts.set_weights == {"cp-1": 100, "cp-2": 0}
    st, acts = world.step(make_rollout({**APPROVED, r.ABORT: "bad vibes"}, status=ro["status"] | {"phase": "Paused"}))
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
    st, _ = world.step(ro, annotations={**APPROVED, r.PROMOTE: "full"})
    assert world.weights == {"cp-1": 0, "cp-2": 100} and st.phase == "Promoting"


def test_reject_and_queue():
    st, _ = World().step(make_rollout({r.REJECT: "reward hacking in eval"}))
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


SPEC = m.AnalysisSpec()


@pytest.mark.parametrize(("meas", "phase", "words"), [
    (r.Measurement(canary_requests=50, canary_errors=0), "Inconclusive", "minSampleCount"),
    (r.Measurement(canary_requests=1000, canary_errors=60), "Failed", "error rate 6.0%"),
    (r.Measurement(canary_requests=1000, canary_errors=40), "Successful", "skipped"),
    (r.Measurement(canary_requests=1000, canary_errors=0, canary_feedback=100, canary_reward_sum=80,
                   stable_feedback=100, stable_reward_sum=90), "Failed", "mean reward 0.800 < stable 0.900"),
    (r.Measurement(canary_requests=1000, canary_errors=0, canary_feedback=100, canary_reward_sum=88,
                   stable_feedback=100, stable_reward_sum=90), "Successful", "mean reward 0.880"),
    (r.Measurement(canary_requests=1000, canary_errors=0, canary_feedback=100, canary_reward_sum=90,
                   canary_negative=9, stable_feedback=100, stable_reward_sum=90, stable_negative=4),
     "Failed", "negative-feedback rate 9.0%"),
])
def test_judge_follows_seed_004(meas, phase, words):
    verdict, message, _ = r.judge(meas, SPEC, has_stable=True)
    assert verdict == phase and words in message


def test_review_of_approval_annotations():
    at = T0
    ok = approvals.review({}, {r.APPROVE: FP}, FP, "alice", at)
    assert ok.error is None and ok.permission == "approve"
    assert ok.annotations == {r.APPROVED_BY: "alice", r.APPROVED_AT: "2026-11-22T12:00:00Z"}
    stale = approvals.review({}, {r.APPROVE: OLD_FP}, FP, "alice", at)
    assert "stale or wrong fingerprint" in stale.error
    forged = approvals.review({}, {r.APPROVED_BY: "root"}, FP, "mallory", at)
    assert "recorded by the rlops admission webhook" in forged.error
    reject = approvals.review({}, {r.REJECT: "no"}, FP, "bob", at)
    assert reject.error is None and reject.permission == "approve"
    unrelated = approvals.review(APPROVED, {**APPROVED, "kopf.zalando.org/last": "{}"}, FP, "operator", at)
    assert unrelated.error is None and unrelated.permission is None
    sar = approvals.sar_body({"username": "bob", "groups": ["devs"]}, "ml", "cp-2")
    assert sar["spec"]["resourceAttributes"] == {"group": "rlops.dev", "resource": "rollouts", "verb": "approve",
                                                 "namespace": "ml", "name": "cp-2"}
