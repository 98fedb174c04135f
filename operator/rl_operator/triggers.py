"""Training triggers: which TrainingRun an agent calls for now, what happens to the runs still in
progress, and which finished runs go. Pure functions; ``handlers`` reads the agent and its runs
from the watch cache, calls :func:`plan` and :func:`expired_runs`, and writes what they return.

Triggers (``spec.trigger.reason`` of the run they start), in the order they win when several are
due at once (one run serves every trigger due at that moment):

- ``Created`` / ``SpecChanged``: the training part of the agent's spec (environment, algorithm,
  training, evaluation) differs from its latest run's snapshot, or it has no run;
- ``Manual``: the annotation ``rlops.dev/retrain`` holds a value that no run was made for yet
  (one run per new value: ``kubectl annotate rla x rlops.dev/retrain=$(date +%s) --overwrite``);
- ``Scheduled``: a time of ``spec.triggers.schedule`` (cron, in ``timeZone``) has come since the
  last scheduled run. As with a CronJob, only the most recent missed time runs, and with
  ``startingDeadlineSeconds`` set, not if it is older than that.
- ``Trajectories``: ``spec.triggers.trajectories.threshold`` new trajectories have arrived on
  the NATS JetStream stream since the last run this trigger started. The operator reads them
  through a durable consumer per agent (``rl_operator.jetstream``): the run records their
  sequence range, and only then does the consumer acknowledge them, so a restart of the
  operator in between neither loses nor counts them twice (the run found for the range is
  the record that they were handled).
- ``Degraded``: the active model's live reward (the 10%-trimmed mean of its feedback rewards
  over ``spec.triggers.degradation.windowSeconds``, from Prometheus) is below its baseline minus
  ``margin``, with at least ``minFeedback`` feedbacks in the window. The baseline is
  ``baseline`` when set, else the live reward over the model's first full window after it took
  all traffic (``status.activeModel.baselineReward``, :func:`baseline_to_record`). One run per
  active model (``status.activeModel.degradedAt``): the run it starts, once promoted, is the
  next active model, with a baseline of its own.

When a run of the agent is still ``Pending`` or ``Running``, ``spec.concurrencyPolicy`` decides
(CronJob's names): ``Allow`` starts the new run beside it; ``Forbid`` keeps the trigger waiting
until no run is in progress; ``Replace`` supersedes the runs in progress (their Jobs are deleted
and their phase is ``Superseded``), then starts the new run.

``spec.suspend: true`` starts no run at all; the triggers wait (a scheduled time within its
deadline still runs when the agent is resumed).

Runs of one agent are ordered by ``(spec.trigger.agentGeneration, spec.trigger.ordinal)``: the
run a generation starts has ordinal 0 and is named ``<agent>-<generation>``; the runs that later
triggers start in the same generation have ordinals 1, 2, ... and are named
``<agent>-<generation>-<ordinal>``.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from rl_operator import models as m
from rl_operator.conditions import get_condition, set_condition
from rl_operator.objects import Event
from rl_operator.training import desired_training_run, run_name, run_order

RETRAIN = f"{m.GROUP}/retrain"


class Due(NamedTuple):
    """A trigger that calls for a run now."""

    reason: str  #: Created, SpecChanged, Manual, Scheduled or Trajectories
    nonce: str | None = None  #: the rlops.dev/retrain value (Manual)
    scheduled_time: datetime | None = None  #: the cron time it stands for (Scheduled)
    window: "Window | None" = None  #: the new trajectories (Trajectories)
    degraded: m.DegradedModel | None = None  #: the degraded active model (Degraded)


class LiveReward(NamedTuple):
    """The active model's live reward over the degradation trigger's window (Prometheus)."""

    version: str  #: the version measured
    reward: float | None  #: 10%-trimmed mean of its feedback rewards, reward units (None: no feedback)
    feedback: float  #: feedbacks in the window


class Window(NamedTuple):
    """The trajectories that arrived since the trajectory trigger's last run: how many, and
    (once the operator has read them) their first and last stream sequence numbers."""

    count: int
    first: int | None = None
    last: int | None = None


class Plan(NamedTuple):
    """What the agent's triggers call for now (:func:`plan`)."""

    run: dict[str, Any] | None  #: the TrainingRun to create, or None
    supersede: list[str]  #: runs in progress to supersede first (Replace)
    due: list[Due]  #: every trigger the new run serves (empty: no run)
    waiting: str | None  #: why a due trigger waits (Forbid, suspend), for the agent's condition
    problem: str | None  #: a trigger that cannot work (an invalid schedule or time zone)
    #: to record in the agent's status.lastScheduleTime: the scheduled time the new run (or an
    #: existing run) stands for, or now when the schedule is seen for the first time
    last_schedule_time: datetime | None = None
    #: to record in the agent's status.lastRetrain: the rlops.dev/retrain value a run stands for
    last_retrain: str | None = None
    #: the last stream sequence of the trajectories that a run (the new one, or one made before
    #: a restart) stands for: the durable consumer acknowledges up to there
    handled_sequence: int | None = None
    #: the degradation verdict for the agent's condition Degraded: (degraded?, message), None
    #: when there is none (no trigger, no active model, no measurement, too little feedback)
    degradation: tuple[bool, str] | None = None


def in_progress(run: dict[str, Any]) -> bool:
    return m.run_phase(run) not in m.RUN_TERMINAL


def _time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def last_scheduled_time(schedule: m.ScheduleTrigger, since: datetime, now: datetime) -> datetime | None:
    """The most recent time of ``schedule`` after ``since`` and at or before ``now``, or None
    (in UTC).

    Args:
        since, now: aware datetimes.
    Raises:
        ValueError: the cron expression or the time zone is invalid.
    """
    try:
        tz = ZoneInfo(schedule.time_zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"spec.triggers.schedule.timeZone: unknown time zone {schedule.time_zone!r}") from exc
    if not croniter.is_valid(schedule.cron):
        raise ValueError(f"spec.triggers.schedule.cron: not a cron expression: {schedule.cron!r}")
    # croniter steps from a start time: the latest time at or before now (a second past now, so
    # that a time equal to now counts)
    prev = croniter(schedule.cron, now.astimezone(tz).replace(microsecond=0) + timedelta(seconds=1)).get_prev(datetime)
    prev = prev.astimezone(timezone.utc)
    return prev if prev > since else None


class _Seen(NamedTuple):
    due: list[Due]
    problem: str | None
    last_schedule_time: datetime | None
    last_retrain: str | None
    handled_sequence: int | None
    degradation: tuple[bool, str] | None


def _degradation(spec: m.RLAgentSpec, status: m.RLAgentStatus, runs: list[dict[str, Any]],
                 live: LiveReward | None) -> tuple[Due | None, tuple[bool, str] | None]:
    """The Degraded trigger, if due, and the verdict for the condition."""
    wanted, active = spec.triggers.degradation, status.active_model
    if wanted is None or active is None or live is None or live.version != active.version or live.reward is None \
            or live.feedback < wanted.min_feedback:
        return None, None
    baseline = wanted.baseline if wanted.baseline is not None else active.baseline_reward
    if baseline is None:
        return None, None
    degraded = live.reward < baseline - wanted.margin
    message = (f"the live reward of {active.version} is {'below' if degraded else 'within'} its baseline "
               f"{baseline:.3f} minus {wanted.margin:g} (10%-trimmed mean over {wanted.window_seconds} s)")
    done = active.degraded_at is not None or any(
        (r["spec"]["trigger"].get("degraded") or {}).get("version") == active.version for r in runs)
    if not degraded or done:
        return None, (degraded, message)
    return Due("Degraded", degraded=m.DegradedModel(version=active.version, live_reward=round(live.reward, 6),
                                                    baseline_reward=round(baseline, 6))), (True, message)


def baseline_to_record(agent: dict[str, Any], live: LiveReward | None, now: datetime) -> float | None:
    """The live reward to record as the active model's baseline (``status.activeModel.
    baselineReward``), or None: only with the degradation trigger and no fixed baseline, none
    recorded yet, a window that starts after the model took all traffic, and enough feedback."""
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    active = m.RLAgentStatus.model_validate(agent.get("status") or {}).active_model
    wanted = spec.triggers.degradation
    if wanted is None or wanted.baseline is not None or active is None or active.baseline_reward is not None:
        return None
    if live is None or live.version != active.version or live.reward is None or live.feedback < wanted.min_feedback:
        return None
    if active.promoted_at is None or (now - active.promoted_at).total_seconds() < wanted.window_seconds:
        return None
    return live.reward


def _due(agent: dict[str, Any], runs: list[dict[str, Any]], now: datetime, trajectories: Window | None,
         live: LiveReward | None = None) -> _Seen:
    """The triggers that call for a run now (winner first), a trigger that cannot work, and what
    the agent's status should record as handled even with no new run: the scheduled time and
    retrain value of runs it does not record yet (made just before a restart), or now when the
    schedule is new (a CronJob's times count from its creation; an agent's, from when the
    operator first sees its schedule)."""
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    status = m.RLAgentStatus.model_validate(agent.get("status") or {})
    due: list[Due] = []
    problem, record_time, record_retrain = None, None, None
    spec_run = desired_training_run(agent, runs)
    if spec_run is not None:
        due.append(Due(spec_run["spec"]["trigger"]["reason"]))
    nonce = (agent["metadata"].get("annotations") or {}).get(RETRAIN)
    if nonce and nonce != status.last_retrain:
        if any(r["spec"]["trigger"].get("nonce") == nonce for r in runs):
            record_retrain = nonce
        else:
            due.append(Due("Manual", nonce=nonce))
    schedule = spec.triggers.schedule
    if schedule is not None:
        run_times = [t for r in runs if (t := _time(r["spec"]["trigger"].get("scheduledTime"))) is not None]
        since = max([t for t in (status.last_schedule_time, *run_times) if t is not None], default=None)
        if since is None:
            since = record_time = now
        elif status.last_schedule_time is None or since > status.last_schedule_time:
            record_time = since
        try:
            t = last_scheduled_time(schedule, since, now)
        except ValueError as exc:
            t, problem = None, str(exc)
        if t is not None and (schedule.starting_deadline_seconds is None
                              or (now - t).total_seconds() <= schedule.starting_deadline_seconds):
            due.append(Due("Scheduled", scheduled_time=t))
    handled = None
    wanted = spec.triggers.trajectories
    if wanted is not None and trajectories is not None and trajectories.count >= wanted.threshold:
        first = trajectories.first
        ends = [w["lastSequence"] for r in runs if (w := r["spec"]["trigger"].get("trajectories"))]
        if first is not None and any(end >= first for end in ends):
            handled = max(ends)  # a run made for them before a restart: acknowledge, start none
        else:
            due.append(Due("Trajectories", window=trajectories))
    degraded, verdict = _degradation(spec, status, runs, live)
    if degraded is not None:
        due.append(degraded)
    return _Seen(due, problem, record_time, record_retrain, handled, verdict)


def blocked(agent: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Why no run can start now whatever is due (suspend; a run in progress under Forbid), as
    (cause, what it waits for), or None. The trajectory trigger asks before it reads the
    trajectories."""
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    if spec.suspend:
        return "spec.suspend is true", ""
    busy = sorted(r["metadata"]["name"] for r in runs if in_progress(r))
    if busy and spec.concurrency_policy == "Forbid":
        return "concurrencyPolicy Forbid", f" for {', '.join(busy)}"
    return None


def plan(agent: dict[str, Any], runs: list[dict[str, Any]], now: datetime,
         trajectories: Window | None = None, trajectory_problem: str | None = None,
         live: LiveReward | None = None) -> Plan:
    """The run the agent's triggers call for now, under its concurrency policy and suspend.

    Args:
        agent: the RLAgent (defaults applied).
        runs: its TrainingRuns (any order; only those it controls).
        now: an aware datetime.
        trajectories: the trajectories that arrived since the trajectory trigger's last run
            (``rl_operator.jetstream``); without ``first``/``last`` they only count towards
            ``TriggerWaiting``, no run starts for them.
        trajectory_problem: why the trajectories cannot be counted (no NATS, no stream).
        live: the active model's live reward (the degradation trigger).
    """
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    seen = _due(agent, runs, now, trajectories, live)
    due = seen.due
    if spec.triggers.trajectories is None:
        trajectory_problem = None
    problem = "; ".join(p for p in (seen.problem, trajectory_problem) if p) or None
    why = blocked(agent, runs) if due else None
    waiting = f"{why[0]}: {_reasons(due)} waits{why[1]}" if why else None
    due = [d for d in due if d.window is None or d.window.first is not None]  # read first, then run
    if not due or waiting:
        return Plan(None, [], [], waiting, problem, seen.last_schedule_time, seen.last_retrain, seen.handled_sequence,
                    seen.degradation)
    busy = sorted(r["metadata"]["name"] for r in runs if in_progress(r))
    supersede = busy if spec.concurrency_policy == "Replace" else []
    scheduled = next((d.scheduled_time for d in due if d.scheduled_time), None)
    nonce = next((d.nonce for d in due if d.nonce), None)
    window = next((d.window for d in due if d.window), None)
    return Plan(new_run(agent, runs, due), supersede, due, None, problem, scheduled or seen.last_schedule_time,
                nonce or seen.last_retrain, window.last if window else seen.handled_sequence, seen.degradation)


def note_plan(status: m.RLAgentStatus, plan: Plan, at: datetime) -> list[Event]:
    """Record a carried-out plan in the agent's status: the handled schedule time and retrain
    value, and the conditions ``TriggerWaiting`` (a due trigger waits: Forbid, suspend) and
    ``TriggerInvalid`` (a schedule that cannot work). Returns the Events for what changed."""
    events: list[Event] = []
    if plan.last_schedule_time is not None:
        status.last_schedule_time = max(t for t in (status.last_schedule_time, plan.last_schedule_time) if t)
    if plan.last_retrain is not None:
        status.last_retrain = plan.last_retrain
    degraded = next((d.degraded for d in plan.due if d.degraded), None)
    if degraded is not None and status.active_model is not None and status.active_model.version == degraded.version:
        status.active_model.degraded_at = at
    if plan.degradation is not None:
        is_degraded, message = plan.degradation
        before = get_condition(status.conditions, "Degraded")
        if is_degraded and (before is None or before.status != "True"):
            events.append(Event("Warning", "Degraded", message))
        set_condition(status.conditions, "Degraded", "True" if is_degraded else "False",
                      "LiveRewardBelowBaseline" if is_degraded else "LiveRewardWithinMargin", message, at)
    before = get_condition(status.conditions, "TriggerWaiting")
    if plan.waiting:
        reason = "Suspended" if plan.waiting.startswith("spec.suspend") else "ConcurrencyPolicy"
        if before is None or before.status != "True" or before.message != plan.waiting:
            events.append(Event("Normal", "TriggerWaiting", plan.waiting))
        set_condition(status.conditions, "TriggerWaiting", "True", reason, plan.waiting, at)
    elif before is not None:
        set_condition(status.conditions, "TriggerWaiting", "False", "NothingWaits", "", at)
    before = get_condition(status.conditions, "TriggerInvalid")
    if plan.problem:
        if before is None or before.status != "True" or before.message != plan.problem:
            events.append(Event("Warning", "TriggerInvalid", plan.problem))
        reason = "InvalidSchedule" if plan.problem.startswith("spec.triggers.schedule") else "TrajectoriesUnavailable"
        set_condition(status.conditions, "TriggerInvalid", "True", reason, plan.problem, at)
    elif before is not None:
        set_condition(status.conditions, "TriggerInvalid", "False", "Valid", "", at)
    return events


def _reasons(due: list[Due]) -> str:
    return "the " + " and ".join(d.reason for d in due) + " trigger" + ("s" if len(due) > 1 else "")


def new_run(agent: dict[str, Any], runs: list[dict[str, Any]], due: list[Due]) -> dict[str, Any]:
    """The TrainingRun manifest for the due triggers (``due[0]`` names the reason)."""
    meta = agent["metadata"]
    generation = int(meta.get("generation") or 1)
    body = desired_training_run(agent, [])  # the snapshot of the agent's spec now
    assert body is not None
    same_generation = [run_order(r)[1] for r in runs if run_order(r)[0] == generation]
    ordinal = 0 if not same_generation else max(same_generation) + 1
    trigger = body["spec"]["trigger"]
    trigger.update(reason=due[0].reason, agentGeneration=generation)
    if ordinal:
        trigger["ordinal"] = ordinal
    nonce = next((d.nonce for d in due if d.nonce), None)
    if nonce:
        trigger["nonce"] = nonce
    scheduled = next((d.scheduled_time for d in due if d.scheduled_time), None)
    if scheduled:
        trigger["scheduledTime"] = m.rfc3339(scheduled)
    degraded = next((d.degraded for d in due if d.degraded), None)
    if degraded is not None:
        trigger["degraded"] = degraded.wire()
    window = next((d.window for d in due if d.window), None)
    if window is not None:
        wanted = m.RLAgentSpec.model_validate(agent["spec"]).triggers.trajectories
        assert wanted is not None and window.first is not None and window.last is not None
        trigger["trajectories"] = m.TrajectoryWindow(
            stream=wanted.stream, subject=wanted.subject, first_sequence=window.first, last_sequence=window.last,
            count=window.count).wire()
    body["metadata"]["name"] = run_name(meta["name"], generation, ordinal)
    return body



def expired_runs(agent: dict[str, Any], runs: list[dict[str, Any]], rollouts: list[dict[str, Any]]) -> list[str]:
    """The finished runs over the agent's history limits, oldest last, by name (sorted).

    ``successfulRunsHistoryLimit`` Succeeded and ``failedRunsHistoryLimit`` Failed or Superseded
    runs are kept, the newest first. Never expired: a run in progress, the agent's latest run,
    the run its active model came from, and a run whose Rollout (same name) is not finished.
    """
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    status = m.RLAgentStatus.model_validate(agent.get("status") or {})
    keep = {r["metadata"]["name"] for r in rollouts if m.rollout_phase(r) not in m.ROLLOUT_TERMINAL}
    if status.active_model is not None:
        keep.add(status.active_model.version)
    if runs:
        keep.add(max(runs, key=run_order)["metadata"]["name"])
    finished = sorted((r for r in runs if not in_progress(r)), key=run_order, reverse=True)
    succeeded = [r for r in finished if r["status"]["phase"] == "Succeeded"]
    failed = [r for r in finished if r["status"]["phase"] != "Succeeded"]
    over = succeeded[spec.successful_runs_history_limit:] + failed[spec.failed_runs_history_limit:]
    return sorted(r["metadata"]["name"] for r in over if r["metadata"]["name"] not in keep)
