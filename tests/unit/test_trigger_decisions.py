"""Training triggers, concurrency policy and run history (rl_operator.triggers): pure decisions."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from rl_operator import models as m
from rl_operator import training, triggers

NOW = datetime(2026, 12, 3, 2, 0, 30, tzinfo=timezone.utc)
CREATED = "2026-12-01T00:00:00Z"


def agent(generation=1, annotations=None, status=None, **spec):
    body = {"environment": {"id": "CartPole-v1"}, **spec}
    return {"apiVersion": m.API_VERSION, "kind": "RLAgent",
            "metadata": {"name": "cartpole", "namespace": "t", "uid": "u-1", "generation": generation,
                         "creationTimestamp": CREATED, "annotations": annotations or {}},
            "spec": m.RLAgentSpec.model_validate(body).wire(), "status": status or {}}


def run_of(a, phase="Succeeded", runs=(), due=None):
    body = triggers.new_run(a, list(runs), due or [triggers.Due("Created")])
    body["metadata"]["creationTimestamp"] = CREATED
    body["status"] = {"phase": phase}
    return body


def test_a_new_agent_calls_for_its_first_run():
    p = triggers.plan(agent(), [], NOW)
    assert p.run["metadata"]["name"] == "cartpole-1"
    assert p.run["spec"]["trigger"] == {"reason": "Created", "agentGeneration": 1}
    assert p.supersede == [] and p.waiting is None


def test_nothing_is_due_when_the_latest_run_matches_the_spec():
    a = agent()
    assert triggers.plan(a, [run_of(a)], NOW).run is None


def test_manual_retrain_one_run_per_new_value():
    a = agent()
    first = run_of(a)
    a["metadata"]["annotations"][triggers.RETRAIN] = "2026-12-03"
    p = triggers.plan(a, [first], NOW)
    assert p.run["metadata"]["name"] == "cartpole-1-1"
    assert p.run["spec"]["trigger"] == {"reason": "Manual", "agentGeneration": 1, "ordinal": 1, "nonce": "2026-12-03"}
    second = run_of(a, runs=[first], due=p.due)
    # the run made for that value satisfies it (even before the agent's status records it)
    assert triggers.plan(a, [first, second], NOW).run is None
    a["status"] = {"lastRetrain": "2026-12-03"}
    assert triggers.plan(a, [first], NOW).run is None  # recorded: its run may be gone (history)
    a["metadata"]["annotations"][triggers.RETRAIN] = "again"
    assert triggers.plan(a, [first, second], NOW).run["metadata"]["name"] == "cartpole-1-2"


def test_a_schedule_counts_from_when_it_is_first_seen():
    """As a CronJob's times count from its creation, an agent's count from when the operator
    first sees its schedule: adding "0 2 * * *" at 10:00 does not run today's 02:00 at once."""
    a = agent(triggers={"schedule": {"cron": "0 * * * *"}})
    first = run_of(a)
    p = triggers.plan(a, [first], NOW)
    assert p.run is None and p.due == [] and p.last_schedule_time == NOW
    a["status"] = {"lastScheduleTime": "2026-12-03T02:00:30Z"}
    assert triggers.plan(a, [first], NOW).last_schedule_time is None
    assert triggers.plan(a, [first], NOW + timedelta(minutes=59)).run is None
    assert triggers.plan(a, [first], NOW + timedelta(minutes=60)).due[0].reason == "Scheduled"


def test_schedule_runs_the_most_recent_missed_time_once():
    a = agent(triggers={"schedule": {"cron": "0 * * * *"}}, status={"lastScheduleTime": CREATED})  # hourly
    first = run_of(a)
    p = triggers.plan(a, [first], NOW)  # 2026-12-03 02:00:30: 50 hourly times missed since the last one
    assert p.last_schedule_time == datetime(2026, 12, 3, 2, 0, tzinfo=timezone.utc)
    assert p.due == [triggers.Due("Scheduled", scheduled_time=datetime(2026, 12, 3, 2, 0, tzinfo=timezone.utc))]
    assert p.run["spec"]["trigger"]["scheduledTime"] == "2026-12-03T02:00:00Z"
    done = run_of(a, runs=[first], due=p.due)
    assert triggers.plan(a, [first, done], NOW).run is None
    assert triggers.plan(a, [first, done], NOW + timedelta(minutes=59)).run is None
    nxt = triggers.plan(a, [first, done], NOW + timedelta(hours=1))
    assert nxt.due[0].scheduled_time == datetime(2026, 12, 3, 3, 0, tzinfo=timezone.utc)
    assert nxt.run["metadata"]["name"] == "cartpole-1-2"


def test_schedule_time_zone_and_starting_deadline():
    # 03:00 in Berlin is 02:00 UTC in December
    a = agent(triggers={"schedule": {"cron": "0 3 * * *", "timeZone": "Europe/Berlin", "startingDeadlineSeconds": 60}},
              status={"lastScheduleTime": CREATED})
    first = run_of(a)
    at = triggers.plan(a, [first], NOW).due[0].scheduled_time
    assert at == datetime(2026, 12, 3, 2, 0, tzinfo=timezone.utc) and at.utcoffset() == timedelta(0)  # recorded in UTC
    late = triggers.plan(a, [first], NOW + timedelta(seconds=61))
    assert late.run is None and late.due == []  # missed by more than the deadline: not run


def test_an_invalid_schedule_is_a_problem_not_a_run():
    a = agent(triggers={"schedule": {"cron": "61 * * * *"}})
    p = triggers.plan(a, [run_of(a)], NOW)
    assert p.run is None and "spec.triggers.schedule.cron" in p.problem
    a = agent(triggers={"schedule": {"cron": "0 * * * *", "timeZone": "Mars/Olympus"}})
    p = triggers.plan(a, [run_of(a)], NOW)
    assert p.run is None and "spec.triggers.schedule.timeZone" in p.problem


@pytest.mark.parametrize(("policy", "created", "supersede", "waits"), [
    ("Allow", True, [], False),
    ("Forbid", False, [], True),
    ("Replace", True, ["cartpole-1"], False),
])
def test_concurrency_policy_with_a_run_in_progress(policy, created, supersede, waits):
    old = agent(concurrencyPolicy=policy)
    busy = run_of(old, phase="Pending")
    new = agent(generation=2, concurrencyPolicy=policy, training={"totalTimesteps": 4096})
    p = triggers.plan(new, [busy], NOW)
    assert (p.run is not None) == created and p.supersede == supersede
    assert (p.waiting is not None) == waits
    if created:
        assert p.run["metadata"]["name"] == "cartpole-2" and p.run["spec"]["trigger"]["reason"] == "SpecChanged"
    else:
        assert "Forbid" in p.waiting and "cartpole-1" in p.waiting


def test_the_default_policy_replaces_a_stale_run():
    assert m.RLAgentSpec.model_validate({"environment": {"id": "X"}}).concurrency_policy == "Replace"


def test_suspend_starts_nothing():
    a = agent(suspend=True)
    p = triggers.plan(a, [], NOW)
    assert p.run is None and "spec.suspend" in p.waiting


def test_several_due_triggers_share_one_run():
    since = {"lastScheduleTime": CREATED}
    a = agent(annotations={triggers.RETRAIN: "x"}, triggers={"schedule": {"cron": "0 * * * *"}}, status=since)
    first = run_of(agent())
    b = agent(generation=2, annotations={triggers.RETRAIN: "x"}, triggers={"schedule": {"cron": "0 * * * *"}},
              training={"totalTimesteps": 4096}, status=since)
    p = triggers.plan(b, [first], NOW)
    assert [d.reason for d in p.due] == ["SpecChanged", "Manual", "Scheduled"]
    assert p.run["spec"]["trigger"]["reason"] == "SpecChanged"
    assert p.run["spec"]["trigger"]["nonce"] == "x" and p.run["spec"]["trigger"]["scheduledTime"] == "2026-12-03T02:00:00Z"
    assert triggers.plan(a, [run_of(a)], NOW).run is not None


def test_history_keeps_the_limits_and_what_still_counts():
    a = agent(successfulRunsHistoryLimit=2, failedRunsHistoryLimit=1)
    runs = []
    for i, phase in enumerate(["Succeeded", "Failed", "Succeeded", "Superseded", "Succeeded", "Succeeded", "Failed"]):
        runs.append(run_of(a, phase=phase, runs=runs, due=[triggers.Due("Manual", nonce=str(i))]))
    names = [r["metadata"]["name"] for r in runs]
    assert names[0] == "cartpole-1" and names[1] == "cartpole-1-1"
    # newest first: Failed 1-6 is kept (the latest, and the failed limit 1); Superseded 1-3 and
    # Failed 1-1 are over the failed limit; Succeeded 1-5 and 1-4 are kept (limit 2), and 1-2 and
    # cartpole-1 are over it ...
    a["status"] = {"activeModel": {"version": "cartpole-1", "fingerprint": "sha256:" + "a" * 64,
                                   "artifactURI": "file:///a"}}
    rollouts = [{"metadata": {"name": "cartpole-1-2"}, "status": {"phase": "AwaitingApproval"}}]
    expired = triggers.expired_runs(a, runs, rollouts)
    # ... except the active model's run (cartpole-1) and a run whose Rollout is not finished (1-2)
    assert expired == ["cartpole-1-1", "cartpole-1-3"]


def test_runs_in_progress_never_expire():
    a = agent(successfulRunsHistoryLimit=0, failedRunsHistoryLimit=0)
    runs = [run_of(a, phase="Running")]
    assert triggers.expired_runs(a, runs, []) == []


def test_long_agent_names_keep_run_names_within_63_characters():
    name = "a" * 52
    assert training.run_name(name, 12345, 0) == f"{name}-12345"
    long = training.run_name(name, 12345, 7)
    assert len(long) <= 63 and long.endswith("-12345-7")


def test_a_run_made_before_a_restart_is_recorded_not_repeated():
    """The operator made a run and stopped before the agent's status recorded it: the run itself
    says what it stands for, and the next plan records that instead of making a second run (so
    that the value stays handled once the history limits delete the run)."""
    a = agent(annotations={triggers.RETRAIN: "n1"}, triggers={"schedule": {"cron": "0 * * * *"}},
              status={"lastScheduleTime": CREATED})
    first = run_of(agent())
    made = triggers.plan(a, [first], NOW)
    second = run_of(a, runs=[first], due=made.due)
    p = triggers.plan(a, [first, second], NOW)
    assert p.run is None
    assert p.last_retrain == "n1" and p.last_schedule_time == datetime(2026, 12, 3, 2, 0, tzinfo=timezone.utc)


def test_note_plan_records_and_explains():
    status = m.RLAgentStatus()
    waiting = triggers.Plan(None, [], [], "concurrencyPolicy Forbid: the Manual trigger waits for cartpole-1", None,
                            NOW, "n1")
    events = triggers.note_plan(status, waiting, NOW)
    assert status.last_retrain == "n1" and status.last_schedule_time == NOW
    cond = next(c for c in status.conditions if c.type == "TriggerWaiting")
    assert (cond.status, cond.reason) == ("True", "ConcurrencyPolicy") and "Forbid" in cond.message
    assert [e.reason for e in events] == ["TriggerWaiting"]
    assert triggers.note_plan(status, waiting, NOW) == []  # said once
    bad = triggers.Plan(None, [], [], None, "spec.triggers.schedule.cron: not a cron expression: 'x'")
    events = triggers.note_plan(status, bad, NOW)
    assert [(e.type, e.reason) for e in events] == [("Warning", "TriggerInvalid")]
    assert next(c for c in status.conditions if c.type == "TriggerWaiting").status == "False"
    assert status.last_retrain == "n1"  # a plan that records nothing keeps what was recorded


def test_a_generation_with_a_run_calls_for_no_spec_change_run():
    """A spec change is a new generation: a run of the agent's generation, or of a later one
    (one a test, or a restore from a backup, put there), means the spec has its run, whatever
    its snapshot says. The operator never loops making runs of one generation."""
    a = agent()
    other = agent(generation=7, training={"totalTimesteps": 4096})
    later = run_of(other)  # cartpole-7, with another snapshot
    assert triggers.plan(a, [run_of(a), later], NOW).run is None
    assert training.desired_training_run(a, [later]) is None


TRAJ = {"trajectories": {"threshold": 5, "stream": "RL_TRAJECTORIES", "subject": "agent.rl.trajectory.v1"}}


def test_the_trajectory_threshold_starts_a_run_for_the_range_read():
    a = agent(triggers=TRAJ)
    first = run_of(a)
    assert triggers.plan(a, [first], NOW, triggers.Window(4, 10, 13)).run is None  # below the threshold
    p = triggers.plan(a, [first], NOW, triggers.Window(6, 10, 15))
    assert p.run["spec"]["trigger"] == {
        "reason": "Trajectories", "agentGeneration": 1, "ordinal": 1,
        "trajectories": {"stream": "RL_TRAJECTORIES", "subject": "agent.rl.trajectory.v1", "firstSequence": 10,
                         "lastSequence": 15, "count": 6}}
    assert p.handled_sequence == 15


def test_a_count_alone_starts_no_run():
    """Counted but not read (no sequence range): the trigger only tells whether it waits."""
    a = agent(triggers=TRAJ)
    first = run_of(a)
    p = triggers.plan(a, [first], NOW, triggers.Window(9))
    assert p.run is None and p.waiting is None and p.handled_sequence is None
    busy = run_of(a, phase="Running")
    a["spec"]["concurrencyPolicy"] = "Forbid"
    p = triggers.plan(a, [busy], NOW, triggers.Window(9))
    assert p.run is None and p.waiting == f"concurrencyPolicy Forbid: the Trajectories trigger waits for {busy['metadata']['name']}"
    assert triggers.blocked(a, [busy]) == ("concurrencyPolicy Forbid", " for cartpole-1")
    assert triggers.blocked(a, [first]) is None


def test_trajectories_a_run_was_made_for_before_a_restart_are_acknowledged_not_run_again():
    """The operator stopped after it created the run and before the consumer acknowledged: the
    same trajectories (and more) are read again; the run found for them is the record."""
    a = agent(triggers=TRAJ)
    first = run_of(a)
    made = run_of(a, runs=[first], due=[triggers.Due("Trajectories", window=triggers.Window(6, 10, 15))])
    p = triggers.plan(a, [first, made], NOW, triggers.Window(8, 10, 17))
    assert p.run is None and p.handled_sequence == 15
    # the rest, read again from 16 on once those are acknowledged: a new run (if enough)
    assert triggers.plan(a, [first, made], NOW, triggers.Window(2, 16, 17)).run is None
    later = triggers.plan(a, [first, made], NOW, triggers.Window(5, 16, 20))
    assert later.run["spec"]["trigger"]["trajectories"]["firstSequence"] == 16


def test_a_trajectory_problem_is_reported_only_with_the_trigger():
    a = agent(triggers=TRAJ)
    assert triggers.plan(a, [run_of(a)], NOW, None, "no stream").problem == "no stream"
    plain = agent()
    assert triggers.plan(plain, [run_of(plain)], NOW, None, "no stream").problem is None


DEGRADATION = {"degradation": {"margin": 0.1, "windowSeconds": 60, "minFeedback": 10}}
PROMOTED = datetime(2026, 12, 3, 1, 0, 0, tzinfo=timezone.utc)


def serving_agent(baseline=None, degraded_at=None, **triggers_spec):
    active = {"version": "cartpole-1", "fingerprint": "sha256:" + "a" * 64, "artifactURI": "file:///a",
              "promotedAt": PROMOTED.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if baseline is not None:
        active["baselineReward"] = baseline
    if degraded_at is not None:
        active["degradedAt"] = degraded_at
    return agent(status={"activeModel": active}, triggers=triggers_spec or DEGRADATION)


def test_the_first_full_window_after_promotion_is_the_baseline():
    a = serving_agent()
    live = triggers.LiveReward("cartpole-1", 0.62, 40)
    assert triggers.baseline_to_record(a, live, PROMOTED + timedelta(seconds=59)) is None  # window not full yet
    assert triggers.baseline_to_record(a, live, PROMOTED + timedelta(seconds=60)) == 0.62
    assert triggers.baseline_to_record(a, live._replace(feedback=9), NOW) is None  # too little feedback
    assert triggers.baseline_to_record(a, live._replace(version="other"), NOW) is None
    assert triggers.baseline_to_record(serving_agent(baseline=0.5), live, NOW) is None  # recorded already
    fixed = serving_agent(degradation={**DEGRADATION["degradation"], "baseline": 0.7})
    assert triggers.baseline_to_record(fixed, live, NOW) is None  # a fixed baseline is never measured


def test_a_live_reward_below_baseline_minus_margin_starts_one_run():
    a = serving_agent(baseline=0.6)
    first = run_of(a)
    within = triggers.plan(a, [first], NOW, live=triggers.LiveReward("cartpole-1", 0.55, 40))
    assert within.run is None and within.degradation[0] is False
    p = triggers.plan(a, [first], NOW, live=triggers.LiveReward("cartpole-1", 0.45, 40))
    assert p.run["spec"]["trigger"] == {"reason": "Degraded", "agentGeneration": 1, "ordinal": 1, "degraded": {
        "version": "cartpole-1", "liveReward": 0.45, "baselineReward": 0.6}}
    status = m.RLAgentStatus.model_validate(a["status"])
    events = triggers.note_plan(status, p, NOW)
    assert status.active_model.degraded_at == NOW
    cond = next(c for c in status.conditions if c.type == "Degraded")
    assert (cond.status, cond.reason) == ("True", "LiveRewardBelowBaseline")
    assert [(e.type, e.reason) for e in events] == [("Warning", "Degraded")]
    # once per active model: its run exists (or degradedAt is set), nothing more
    made = run_of(a, runs=[first], due=p.due)
    assert triggers.plan(a, [first, made], NOW, live=triggers.LiveReward("cartpole-1", 0.3, 40)).run is None
    later = serving_agent(baseline=0.6, degraded_at="2026-12-03T02:00:00Z")
    assert triggers.plan(later, [first], NOW, live=triggers.LiveReward("cartpole-1", 0.3, 40)).run is None


def test_no_verdict_without_enough_feedback_a_baseline_or_the_active_version():
    a = serving_agent()
    assert triggers.plan(a, [run_of(a)], NOW, live=triggers.LiveReward("cartpole-1", 0.1, 40)).degradation is None
    b = serving_agent(baseline=0.6)
    assert triggers.plan(b, [run_of(b)], NOW, live=triggers.LiveReward("cartpole-1", 0.1, 9)).degradation is None
    assert triggers.plan(b, [run_of(b)], NOW, live=triggers.LiveReward("old", 0.1, 40)).degradation is None
