"""Rollout handlers: observe the world for one Rollout (the agent, Ray Serve, a Prometheus
analysis when due), run ``rollout.reconcile``, and carry out its actions; aborts from outside the
canary (an alert, a deleted Rollout)."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import kopf

from rl_engine.serving.contract import BREAKER_KEY, SHADOW_KEY

from rl_operator import analysis, approvals, cache, kube, metrics, nats_events, objects, rayserve, rollout, traffic, training, trust, verdicts
from rl_operator import models as m
from rl_operator.handlers import agents, common
from rl_operator.handlers.runtime import RUNTIME

log = logging.getLogger(__name__)


#: Phases that wait on a person or on the agent's spec, not on time: no periodic reconcile. An
#: approval annotation (on_rollout) or a change of the agent's spec (agents.nudge_waiting_rollouts)
#: moves them on.
WAITING = frozenset({"AwaitingApproval", "Approved"})


def rollout_ticks(status: dict[str, Any] | None, annotations: dict[str, str] | None = None, **_: Any) -> bool:
    """Whether a Rollout needs the periodic reconcile: not finished, and not waiting on a person
    or on the agent's spec. An AwaitingApproval Rollout whose approval is recorded but not yet
    acted on (Ray Serve was down) still ticks."""
    phase = (status or {}).get("phase")
    if phase in m.ROLLOUT_TERMINAL:
        return False
    return phase not in WAITING or (phase == "AwaitingApproval" and approvals.APPROVED_BY in (annotations or {}))


@kopf.on.resume(m.GROUP, m.VERSION, m.Rollout.PLURAL)
@kopf.on.create(m.GROUP, m.VERSION, m.Rollout.PLURAL)
@kopf.on.update(m.GROUP, m.VERSION, m.Rollout.PLURAL, field="metadata.annotations")
def on_rollout(namespace: str, name: str, **_: Any) -> None:
    reconcile_rollout(namespace, name)


# initial_delay: the create/resume handler makes the first reconcile (a timer runs at once otherwise)
@kopf.timer(m.GROUP, m.VERSION, m.Rollout.PLURAL, interval=RUNTIME.settings.rollout_interval_seconds,
            initial_delay=RUNTIME.settings.rollout_interval_seconds, when=rollout_ticks)
def tick_rollout(namespace: str, name: str, **_: Any) -> None:
    reconcile_rollout(namespace, name)


def reconcile_waiting_rollouts(namespace: str, agent: str, but: str | None = None) -> None:
    for ro in cache.list_custom(namespace, m.Rollout.PLURAL, agent):
        if ro["metadata"]["name"] != but and m.rollout_phase(ro) in WAITING:
            reconcile_rollout(namespace, ro["metadata"]["name"])


class Serving(NamedTuple):
    """What Serve runs for one agent (all None/empty when it has no application)."""

    versions: dict[str, str | None] | None  #: version -> the fingerprint Serve was given
    weights: dict[str, int] | None  #: the router's split, percent
    status: str | None  #: the application's status (RUNNING, DEPLOYING, ...)
    entries: dict[str, Any]  #: version -> its entry as deployed (artifactURI, fingerprint)
    extras: dict[str, Any] | None = None  #: the router's user_config besides the weights


def _serving(namespace: str, agent: str) -> Serving:
    """The agent's Serve application, read from Serve's REST API."""
    details = rayserve.get_applications(RUNTIME.settings.ray_dashboard_url)
    summary = rayserve.application_summary(details, rayserve.app_name(namespace, agent))
    config = (summary or {}).get("config") or {}
    if not summary or not config:
        return Serving(None, None, None, {})
    entries = (config.get("args") or {}).get("versions") or {}
    versions = {v: (entries.get(v) or {}).get("fingerprint") for v in rayserve.application_versions(config)}
    return Serving(versions, rayserve.application_weights(config), summary["status"], entries,
                   rayserve.router_extras(config))


@metrics.reconciler("rollout")
def reconcile_rollout(namespace: str, name: str) -> None:
    """Observe the world for one Rollout, run the pure pipeline, and carry out its actions.

    Reads come from the caches, which return the operator's own last write of an object until
    the watch delivers it (``rl_operator.cache``): this state machine moves traffic, and must
    never act on a copy older than its own last write (a stale "not started" would restart the
    canary at 0%), nor on an agent's or a sibling Rollout's status older than the operator's
    last write of it (its stable version, a Rollout that still looks in progress). Rollout
    reconciles are few: on an annotation (the index holds that event's copy before the handler
    runs), on a change of the agent's spec, and every 2 s only while a canary runs."""
    with cache.locked("rollouts", namespace, name):
        ro = cache.get_custom(namespace, m.Rollout.PLURAL, name)
        if ro is None or m.rollout_phase(ro) in m.ROLLOUT_TERMINAL:
            return
        agent_name = ro["spec"]["agentRef"]["name"]
        agent = cache.get_custom_confirmed(namespace, m.RLAgent.PLURAL, agent_name)
        run = cache.get_custom_confirmed(namespace, m.TrainingRun.PLURAL, ro["spec"]["trainingRunRef"]["name"])
        untrusted = trust.rollout_untrusted(ro, run, agent, training.artifact_uri(RUNTIME.settings, run) if run else None,
                                            RUNTIME.key)
        if agent is None:
            if untrusted:
                _write_rollout(ro, *_ignored(ro, untrusted))
            return
        agent_spec = m.RLAgentSpec.model_validate(agent["spec"])
        agent_status = m.RLAgentStatus.model_validate(agent.get("status") or {})
        others = cache.list_custom(namespace, m.Rollout.PLURAL, agent_name)
        blocking = next((o["metadata"]["name"] for o in others if o["metadata"]["name"] != name
                         and m.rollout_phase(o) in m.ROLLOUT_ACTIVE), None)
        newer = _newer_rollout(namespace, run, others) if run is not None else None
        now = objects.now()
        status = m.RolloutStatus.model_validate(ro.get("status") or {})
        obs = traffic.Observed(now=now, annotations=dict(ro["metadata"].get("annotations") or {}),
                               agent_spec=agent_spec, active_model=agent_status.active_model,
                               blocking_rollout=blocking, newer_rollout=newer, approval_key=RUNTIME.key,
                               untrusted=untrusted, frozen=RUNTIME.kill_switch)
        entries: dict[str, Any] = {}
        if traffic.reads_serving(status, obs):
            observed = _observe_serving(obs, ro, status)
            if observed is None:
                return
            entries = observed
        new_status, acts = rollout.reconcile(ro, obs)
        _carry_out(ro, agent, agent_spec, acts, entries, new_status)


def _observe_serving(obs: traffic.Observed, ro: dict[str, Any], status: m.RolloutStatus) -> dict[str, Any] | None:
    """Fill ``obs`` with what Ray Serve runs for the agent, what its router reports, and the
    analysis when one is due; returns Serve's entries of the versions it runs. Ray Serve
    unreachable: the Rollout's message says so, and None (nothing moves)."""
    namespace, agent_name, version = ro["metadata"]["namespace"], ro["spec"]["agentRef"]["name"], ro["spec"]["version"]
    try:
        serving = _serving(namespace, agent_name)
    except rayserve.RayServeError as exc:
        _write_rollout(ro, status.model_copy(update={"message": f"Ray Serve unavailable: {exc}"}), [])
        return None
    obs.serving_versions, obs.serving_weights, obs.app_status = serving.versions, serving.weights, serving.status
    obs.serving_extras = serving.extras
    _observe_router(obs, namespace, agent_name, version, status)
    if obs.frozen is None and (window := traffic.analysis_window(status, obs.agent_spec, obs.now)) is not None:
        try:
            meas = analysis.measure(RUNTIME.settings.prometheus_url, namespace, agent_name, version,
                                    status.stable_version, window)
            obs.analysis = verdicts.judge(meas, obs.agent_spec.canary.analysis, status.stable_version is not None)
        except analysis.AnalysisError as exc:
            obs.analysis = ("Error", str(exc)[:500], {})
        metrics.ANALYSIS.labels(namespace, obs.analysis[0]).inc()
    return serving.entries


def _carry_out(ro: dict[str, Any], agent: dict[str, Any], agent_spec: m.RLAgentSpec, acts: traffic.Actions,
               entries: dict[str, Any], new_status: m.RolloutStatus) -> None:
    """The reconcile's actions, in order: Serve (weights, then deploys), the annotations it
    consumed, the agent's active model, the Rollout's status and Events, the agent's shadow."""
    namespace, name, agent_name = ro["metadata"]["namespace"], ro["metadata"]["name"], agent["metadata"]["name"]
    _act(namespace, agent_name, agent_spec, acts, entries)
    if acts.remove_annotations:
        cache.patch_custom(namespace, m.Rollout.PLURAL, name,
                           {"metadata": {"annotations": {k: None for k in acts.remove_annotations}}})
    if acts.promote_active_model is not None:
        _set_active_model(namespace, agent_name, acts.promote_active_model, name)
    _write_rollout(ro, new_status, acts.events)
    if new_status.shadow is not None:
        _set_agent_shadow(agent, name, new_status)


def _set_agent_shadow(agent: dict[str, Any], rollout_name: str, st: m.RolloutStatus) -> None:
    """The agent's ``status.shadow``: its latest shadow's progress (``kubectl get rla``)."""
    sh = st.shadow
    assert sh is not None
    if sh.graduated_at is not None:
        state = "graduated"
    elif sh.ended:
        state = "ended"
    elif st.phase == "Shadowing":
        state = "shadowing"
    else:
        state = (st.phase or "pending").lower()
    counts = verdicts.ShadowCounts(sh.decisions, sh.agreements, sh.override_feedback, sh.override_correct)
    spec = m.RLAgentSpec.model_validate(agent["spec"])
    summary = m.ShadowSummary(rollout=rollout_name, progress=f"{state}: {verdicts.graduation(counts, spec.observe)[1]}",
                              graduated_at=sh.graduated_at).wire()
    if (agent.get("status") or {}).get("shadow") != summary:
        meta = agent["metadata"]
        cache.patch_status(meta["namespace"], m.RLAgent.PLURAL, meta["name"], {"shadow": summary})


def _observe_router(obs: traffic.Observed, namespace: str, agent: str, version: str,
                    status: m.RolloutStatus) -> None:
    """What the router reports through Prometheus: a shadow's comparison counters, and whether
    the circuit breaker opened for a canary. A Prometheus error leaves them unmeasured (the
    shadow waits; the breaker's fallback already protects the clients, and the analysis or an
    alert still aborts)."""
    extras = obs.serving_extras or {}
    try:
        if status.phase == "Shadowing" and obs.app_status == "RUNNING" and extras.get(SHADOW_KEY) == version:
            obs.shadow = analysis.shadow_counts(RUNTIME.settings.prometheus_url, namespace, agent, version)
        elif status.phase in ("Progressing", "Paused") and BREAKER_KEY in extras and \
                analysis.circuit_open(RUNTIME.settings.prometheus_url, namespace, agent, version):
            errors = extras[BREAKER_KEY].get("consecutiveErrors")
            obs.circuit_open = (f"{errors} consecutive canary errors: the router sent all traffic to stable "
                                f"{extras[BREAKER_KEY].get('stable')}")
    except analysis.AnalysisError as exc:
        log.warning("rollout %s/%s: %s", namespace, version, exc)
        if status.phase == "Shadowing":  # the shadow's message says why it does not progress
            obs.shadow_error = f"Prometheus: {str(exc)[:300]}"


def _newer_rollout(namespace: str, run: dict[str, Any], rollouts: list[dict[str, Any]]) -> str | None:
    """A Rollout among ``rollouts`` (the agent's) made from a TrainingRun newer than ``run``."""
    order = training.run_order(run)
    for other in rollouts:
        other_run = cache.get_custom(namespace, m.TrainingRun.PLURAL, other["spec"]["trainingRunRef"]["name"])
        if other_run is not None and training.run_order(other_run) > order:
            return other["metadata"]["name"]
    return None


#: The spec that stands for an agent that is gone (its Rollout is ignored or rolled back).
_NO_AGENT = m.RLAgentSpec(environment=m.EnvironmentSpec(id="-"))


def _act_on_abort(namespace: str, agent: str, acts: traffic.Actions) -> None:
    """Carry out an abort's serving actions, with the agent's spec read fresh (the placeholder
    when the agent is gone) and Serve's entries of the versions it runs."""
    agent_obj = kube.get_custom(namespace, m.RLAgent.PLURAL, agent)
    spec = m.RLAgentSpec.model_validate(agent_obj["spec"]) if agent_obj else _NO_AGENT
    _act(namespace, agent, spec, acts, _serving(namespace, agent).entries)


def _ignored(ro: dict[str, Any], why: str) -> tuple[m.RolloutStatus, list[objects.Event]]:
    """The status and Events for a Rollout outside the owner chain, when no agent is left to consult."""
    status, acts = rollout.reconcile(ro, traffic.Observed(now=objects.now(), annotations={}, agent_spec=_NO_AGENT,
                                                          active_model=None, untrusted=why))
    return status, acts.events


def _act(namespace: str, agent: str, spec: m.RLAgentSpec, acts: traffic.Actions, entries: dict[str, Any]) -> None:
    """Carry out serving actions: weights first (the router's user_config only), then deploys."""
    app = rayserve.app_name(namespace, agent)
    if acts.set_weights is not None:
        rayserve.set_weights(RUNTIME.settings.ray_dashboard_url, app, acts.set_weights, extras=acts.router_extras)
    if acts.deploy is not None:
        versions = {v: (e if e is not None else entries[v]) for v, e in acts.deploy["versions"].items()}
        reward = spec.canary.analysis.reward_range
        per_client = spec.canary.analysis.feedback_per_client
        key = RUNTIME.key
        config = rayserve.app_config(
            namespace, agent, versions, acts.deploy["weights"], max_batch_size=spec.serving.max_batch_size,
            feedback_key=trust.derive_key(key, f"feedback:{app}").hex() if key else None,
            reward_min=reward.min, reward_max=reward.max, feedback_per_client_per_minute=per_client.max_per_minute,
            feedback_client_header=per_client.client_header, artifact_root=RUNTIME.settings.artifact_root,
            router_extras=acts.router_extras)
        rayserve.apply_application(RUNTIME.settings.ray_dashboard_url, config)


def _set_active_model(namespace: str, agent: str, model: m.ActiveModel, rollout_name: str) -> None:
    # a merge patch: the previous model's baseline and degradation go explicitly
    active = {"baselineReward": None, "baselineMeasuredAt": None, "degradedAt": None, **model.wire()}
    with cache.locked("rlagents", namespace, agent):
        cache.patch_status(namespace, m.RLAgent.PLURAL, agent, {"activeModel": active, "latestRollout": rollout_name})


def _write_rollout(ro: dict[str, Any], status: m.RolloutStatus, events: list[objects.Event]) -> None:
    namespace, name = ro["metadata"]["namespace"], ro["metadata"]["name"]
    old = m.RolloutStatus.model_validate(ro.get("status") or {})
    if status.wire() != old.wire():
        cache.patch_status(namespace, m.Rollout.PLURAL, name, status.wire())
        if status.phase != old.phase:
            nats_events.OUTBOX.put(nats_events.model_deployed({**ro, "status": status.wire()}))
    metrics.rollout_written(namespace, name, ro["spec"]["agentRef"]["name"], old.phase, status.phase,
                            status.canary_weight, status.phase in m.ROLLOUT_TERMINAL)
    common.post(ro, events)
    if status.phase in m.ROLLOUT_TERMINAL and old.phase not in m.ROLLOUT_TERMINAL:
        # its run was kept for it: now it may be over the history limits
        agents.expire_runs(namespace, ro["spec"]["agentRef"]["name"])


def abort_agent_rollout(namespace: str, agent: str, reason: str) -> str | None:
    """Abort the agent's in-progress Rollout (canary weight 0 at once). Returns its name, or None."""
    for ro in kube.list_custom(namespace, m.Rollout.PLURAL, f"{m.AGENT_LABEL}={agent}"):
        if m.rollout_phase(ro) not in m.ROLLOUT_ACTIVE:
            continue
        name = ro["metadata"]["name"]
        with cache.locked("rollouts", namespace, name):
            ro = kube.get_custom(namespace, m.Rollout.PLURAL, name)
            if ro is None or m.rollout_phase(ro) not in m.ROLLOUT_ACTIVE:
                continue
            status, acts = traffic.abort(ro, reason, objects.now())
            _act_on_abort(namespace, agent, acts)
            _write_rollout(ro, status, acts.events)
        return name
    return None


@kopf.on.delete(m.GROUP, m.VERSION, m.Rollout.PLURAL)
def on_rollout_deleted(namespace: str, name: str, **_: Any) -> None:
    """The Rollout's finalizer: deleted mid-canary, its canary goes to weight 0 (traffic on the
    stable version) and leaves the application; with no stable version the application goes."""
    metrics.rollout_deleted(namespace, name)
    with cache.locked("rollouts", namespace, name):
        ro = kube.get_custom(namespace, m.Rollout.PLURAL, name)
        if ro is None or m.rollout_phase(ro) not in m.ROLLOUT_ACTIVE:
            return
        agent = ro["spec"]["agentRef"]["name"]
        status, acts = traffic.abort(ro, "the Rollout was deleted", objects.now())
        try:
            if status.stable_version is None:
                rayserve.delete_application(RUNTIME.settings.ray_dashboard_url, rayserve.app_name(namespace, agent))
            else:
                _act_on_abort(namespace, agent, acts)
        except rayserve.ApplicationNotFound:
            pass
        except rayserve.RayServeError as exc:
            raise kopf.TemporaryError(f"cannot take the canary of {namespace}/{name} off traffic: {exc}", delay=5)
        common.post(ro, acts.events)
        log.warning("Rollout %s/%s deleted mid-canary: canary weight 0", namespace, name)
