"""RLAgent handlers: its triggers start TrainingRuns, its status follows its runs, finished runs
expire, the live reward is measured for the degradation trigger, and its Serve application goes
with it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from kubernetes.client.exceptions import ApiException

from rl_operator import analysis, approvals, cache, jetstream, kube, metrics, nats_events, objects, rayserve, training, triggers
from rl_operator import models as m
from rl_operator.handlers import common, rollouts, runs
from rl_operator.handlers.runtime import RUNTIME

log = logging.getLogger(__name__)


@kopf.on.resume(m.GROUP, m.VERSION, m.RLAgent.PLURAL)
@kopf.on.create(m.GROUP, m.VERSION, m.RLAgent.PLURAL)
@kopf.on.update(m.GROUP, m.VERSION, m.RLAgent.PLURAL, field="spec")
@kopf.on.update(m.GROUP, m.VERSION, m.RLAgent.PLURAL, field=("metadata", "annotations", triggers.RETRAIN))
def reconcile_agent(body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
    # the generation is handled: a new run, or a change that needs none (canary plan, approval, ...);
    # recorded in the same status write as the rest (one write, not two that race)
    reconcile_triggers(namespace, name, handled_generation=body["metadata"].get("generation"))


def reconcile_triggers(namespace: str, name: str, handled_generation: int | None = None,
                       trajectories: triggers.Window | None = None) -> triggers.Plan | None:
    """Start the TrainingRun that the agent's triggers call for now, if any (``triggers.plan``):
    supersede the runs in progress first under ``concurrencyPolicy: Replace``; record what was
    handled and what waits in the agent's status; delete the runs over its history limits.

    Called by the agent's handlers (spec or rlops.dev/retrain changed), when a run finishes (a
    trigger that waited under Forbid), and by the resync loop for agents with a schedule or a
    trajectory trigger (with ``trajectories`` read from the stream: a run may start for them).
    Returns the plan carried out (None: no agent)."""
    with cache.locked("agent-triggers", namespace, name):
        agent = cache.get_custom(namespace, m.RLAgent.PLURAL, name)
        if agent is None or agent["metadata"].get("deletionTimestamp"):
            return None  # being deleted: no new run (its runs go by garbage collection)
        agent_runs = common.owned(agent, cache.list_custom(namespace, m.TrainingRun.PLURAL, name))
        counted, problem = jetstream.TRAJECTORIES.seen(agent["metadata"]["uid"])
        with RUNTIME.live_lock:
            live = RUNTIME.live.get(agent["metadata"]["uid"])
        plan = triggers.plan(agent, agent_runs, objects.now(), trajectories or counted, problem, live)
        if plan.run is not None:
            new_name = plan.run["metadata"]["name"]
            reason = plan.run["spec"]["trigger"]["reason"]
            for old in plan.supersede:
                _supersede(namespace, old, new_name, reason)
            try:
                new_run, created = cache.create_custom_or_get(plan.run, m.TrainingRun.PLURAL)
            except ApiException as exc:
                if exc.status == 403 and "NamespaceTerminating" in (exc.body or ""):
                    return None  # the namespace goes, and the agent with it
                raise
            if created:
                nats_events.OUTBOX.put(nats_events.training_request(new_run))
                trigger = plan.run["spec"]["trigger"]
                also = [d.reason for d in plan.due[1:]]
                common.post(agent, [objects.Event("Normal", "TrainingRunCreated",
                                             f"TrainingRun {new_name} ({trigger['reason']}"
                                             f"{' + ' + ', '.join(also) if also else ''}, generation "
                                             f"{trigger['agentGeneration']})"
                                             f"{'; superseded: ' + ', '.join(plan.supersede) if plan.supersede else ''}")])
                # its Job now, not after the run's watch event has queued behind every other
                # object's; the run's own handler then finds the Job and writes the run's status
                runs.ensure_job(new_run)
        sync_agent(namespace, name, handled_generation=handled_generation, plan=plan)
        expire_runs(namespace, name)
        return plan


def _supersede(namespace: str, name: str, by: str, reason: str) -> None:
    """A run in progress replaced by a newer one (``concurrencyPolicy: Replace``): its Job goes
    (with its pods), and its status says ``Superseded`` and by which run."""
    with cache.locked("trainingruns", namespace, name):
        run = cache.get_custom(namespace, m.TrainingRun.PLURAL, name)
        if run is None:
            return
        status = training.superseded_status(run, by, reason, objects.now())
        if status is None:
            return
        kube.delete_job(namespace, name)
        cache.patch_status(namespace, m.TrainingRun.PLURAL, name, status.wire())
        runs.run_phase_changed(run, m.TrainingRunStatus.model_validate(run.get("status") or {}), status)


def expire_runs(namespace: str, agent_name: str) -> None:
    """Delete the agent's finished runs over its history limits (``triggers.expired_runs``);
    their Jobs, pods and Rollouts follow by garbage collection."""
    agent = cache.get_custom(namespace, m.RLAgent.PLURAL, agent_name)
    if agent is None:
        return
    agent_runs = common.owned(agent, cache.list_custom(namespace, m.TrainingRun.PLURAL, agent_name))
    agent_rollouts = cache.list_custom(namespace, m.Rollout.PLURAL, agent_name)
    reclaim = m.RLAgentSpec.model_validate(agent["spec"]).artifact_reclaim_policy == "Delete"
    by_name = {r["metadata"]["name"]: r for r in agent_runs}
    for name in triggers.expired_runs(agent, agent_runs, agent_rollouts):
        if reclaim:  # the Job first: once the run is gone, nothing would remember its artifact
            job, created = kube.create_job_or_get(training.reclaim_job(by_name[name], agent, RUNTIME.settings))
            if created:
                common.post(agent, [objects.Event("Normal", "ArtifactReclaimed", f"deleting the artifact of expired "
                                             f"TrainingRun {name} (Job {job['metadata']['name']})")])
        if kube.delete_custom(namespace, m.TrainingRun.PLURAL, name):
            log.info("%s/%s: deleted TrainingRun %s (over the history limits)", namespace, agent_name, name)


@metrics.reconciler("rlagent")
def sync_agent(namespace: str, name: str, handled_generation: int | None = None,
               plan: triggers.Plan | None = None) -> None:
    """Recompute an RLAgent's status from its TrainingRuns and write it if it changed.

    ``handled_generation``: the agent's generation that the caller has acted on
    (``observedGeneration``). ``plan``: the triggers' plan the caller carried out (what waits,
    what cannot work, a schedule seen for the first time). A run the caller just created or
    wrote is read back from the cache, which holds the operator's own writes until the watch
    delivers them."""
    with cache.locked("rlagents", namespace, name):
        def observe(agent: dict[str, Any]) -> tuple[m.RLAgentStatus, list[objects.Event]]:
            agent_runs = cache.list_custom(namespace, m.TrainingRun.PLURAL, name)
            at = objects.now()
            status, events = training.observe_agent(agent, common.owned(agent, agent_runs), at)
            if handled_generation is not None:
                status.observed_generation = max(status.observed_generation or 0, handled_generation)
            if plan is not None:
                events += triggers.note_plan(status, plan, at)
            events += approvals.note_approvers(status, m.RLAgentSpec.model_validate(agent["spec"]), namespace, at)
            return status, events

        synced = common.sync_status(namespace, m.RLAgent.PLURAL, name, m.RLAgentStatus, observe)
        if synced is not None:
            common.post(synced.obj, synced.events)


def measure_live_reward(agent: dict[str, Any]) -> None:
    """The degradation trigger's measurement of the agent's active model (Prometheus), kept for
    its plans (:data:`RUNTIME.live`) and exported (``rlops_agent_live_reward``); the first one over a
    full window after promotion is recorded as its baseline (``triggers.baseline_to_record``)."""
    namespace, name = agent["metadata"]["namespace"], agent["metadata"]["name"]
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    active = m.RLAgentStatus.model_validate(agent.get("status") or {}).active_model
    uid = agent["metadata"]["uid"]
    wanted = spec.triggers.degradation
    if wanted is None or active is None:
        with RUNTIME.live_lock:
            RUNTIME.live.pop(uid, None)
        return
    rewards = spec.canary.analysis.reward_range
    try:
        feedback, reward = analysis.live_reward(RUNTIME.settings.prometheus_url, namespace, name, active.version,
                                                wanted.window_seconds, rewards.min, rewards.max)
    except analysis.AnalysisError as exc:
        log.warning("RLAgent %s/%s: cannot measure the live reward of %s: %s", namespace, name, active.version, exc)
        with RUNTIME.live_lock:
            RUNTIME.live.pop(uid, None)
        return
    live = triggers.LiveReward(active.version, reward, feedback)
    with RUNTIME.live_lock:
        RUNTIME.live[uid] = live
    if reward is not None:
        metrics.LIVE_REWARD.labels(namespace, name, active.version).set(reward)
    baseline = triggers.baseline_to_record(agent, live, objects.now())
    if baseline is not None:
        with cache.locked("rlagents", namespace, name):
            cache.patch_status(namespace, m.RLAgent.PLURAL, name, {"activeModel": {
                "baselineReward": round(baseline, 6),
                "baselineMeasuredAt": m.rfc3339(objects.now())}})
        common.post(agent, [objects.Event("Normal", "BaselineRecorded", (
            f"the live reward of {active.version} over its first {wanted.window_seconds} s with all traffic: "
            f"{baseline:.3f} (10%-trimmed mean of {feedback:.0f} feedbacks), the degradation trigger's baseline"))])


def resync_triggers(namespace: str, name: str, trajectories: triggers.Window | None = None) -> triggers.Plan | None:
    """One agent's triggers planned again (the resync: its schedule, a trigger that waits, new
    trajectories, its active model's live reward); an error is logged (None)."""
    try:
        agent = cache.get_custom(namespace, m.RLAgent.PLURAL, name)
        if agent is not None and ((agent.get("spec") or {}).get("triggers") or {}).get("degradation"):
            measure_live_reward(agent)
        return reconcile_triggers(namespace, name, trajectories=trajectories)
    except Exception as exc:  # the next round tries again
        log.warning("resync of the triggers of RLAgent %s/%s failed: %s", namespace, name, exc)
        return None


async def resync_trajectory_triggers() -> None:
    """One round of the trajectory triggers (on kopf's event loop): count each agent's new
    trajectories; at the threshold, read them, plan the agent's triggers with them, and
    acknowledge what a run now stands for (``rl_operator.jetstream``)."""
    counter = jetstream.TRAJECTORIES
    await common.nats()
    agents = cache.agents(with_trajectory_trigger=True)
    for agent in agents:
        namespace, name = agent["metadata"]["namespace"], agent["metadata"]["name"]
        trigger = m.RLAgentSpec.model_validate(agent["spec"]).triggers.trajectories
        assert trigger is not None
        read = None
        try:
            counted = await counter.count(agent, trigger)
            if counted is not None and counted.count >= trigger.threshold:
                agent_runs = common.owned(agent, cache.list_custom(namespace, m.TrainingRun.PLURAL, name))
                if triggers.blocked(agent, agent_runs) is None:
                    read = await counter.read(agent, trigger, counted.count)
        except Exception as exc:  # NATS unreachable for a moment: the next round
            log.warning("RLAgent %s/%s: cannot count its trajectories: %s", namespace, name, exc)
            counter.unavailable(agent, f"spec.triggers.trajectories: cannot read stream {trigger.stream!r}: {exc}")
        plan = await asyncio.to_thread(resync_triggers, namespace, name, read.window if read else None)
        if read is not None:
            await read.settle(plan.handled_sequence if plan else None)
    if agents or counter.client is not None:
        await counter.forget_others(agents, RUNTIME.settings.namespaces)


@kopf.on.update(m.GROUP, m.VERSION, m.RLAgent.PLURAL, field="spec")
def nudge_waiting_rollouts(namespace: str, name: str, old: Any, new: Any, **_: Any) -> None:
    """An agent's spec changed (approval policy, serving enabled, ...): its Rollouts that wait
    without a timer (``rollouts.WAITING``) are reconciled now. Resumed (``spec.suspend`` true -> false):
    its latest run, if Succeeded, gets the Rollout it did not get while suspended."""
    rollouts.reconcile_waiting_rollouts(namespace, name)
    if (old or {}).get("suspend") and not (new or {}).get("suspend"):  # old, new: the spec (a field handler)
        agent = cache.get_custom(namespace, m.RLAgent.PLURAL, name)
        latest = training.latest_run(common.owned(agent, cache.list_custom(namespace, m.TrainingRun.PLURAL, name))) \
            if agent else None
        if latest is not None and m.run_phase(latest) == "Succeeded":
            runs.ensure_rollout(latest)


def may_serve(spec: dict[str, Any] | None, status: dict[str, Any] | None, **_: Any) -> bool:
    """Whether an agent may have a Serve application: serving enabled, or a version promoted.
    Only those carry the operator's finalizer; deleting any other agent waits for nobody."""
    return bool(((spec or {}).get("serving") or {}).get("enabled", True) or (status or {}).get("activeModel"))


@kopf.on.delete(m.GROUP, m.VERSION, m.RLAgent.PLURAL, when=may_serve)
def on_agent_deleted(status: dict[str, Any], namespace: str, name: str, **_: Any) -> None:
    """The agent's finalizer, while it may serve (:func:`may_serve`): its Serve application goes
    before the agent does, so no traffic is left with no object to manage it. Ray unreachable:
    retried (the agent stays Terminating). TrainingRuns, Jobs and Rollouts go by ownerReference
    garbage collection; a Rollout still in progress takes its own canary off traffic
    (``rollouts.on_rollout_deleted``)."""
    if not (status or {}).get("activeModel"):
        return  # no version was ever promoted: nothing of this agent's serves but a live Rollout's canary
    try:
        if rayserve.delete_application(RUNTIME.settings.ray_dashboard_url, rayserve.app_name(namespace, name)):
            log.info("deleted Serve application of %s/%s", namespace, name)
    except rayserve.RayServeError as exc:
        raise kopf.TemporaryError(f"cannot delete the Serve application of {namespace}/{name}: {exc}", delay=10)
