"""What the canary's stages observe and do, pure: the observed world (:class:`Observed`), the
actions (:class:`Actions`), and the moves that several stages share: the candidate deployed beside
the stable version, the router's weights, rolling back, holding for the kill switch, and observe
mode's shadow. The stages themselves, in order, are in ``canary.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rl_engine.serving.contract import BASELINE_KEY, BREAKER_KEY, SHADOW_KEY

from rl_operator import models as m
from rl_operator.approvals import approval_given
from rl_operator.conditions import set_condition
from rl_operator.objects import Event
from rl_operator.verdicts import ShadowCounts, graduation

ABORT = f"{m.GROUP}/abort"

#: ``Ignored``: the Rollout is not in the operator's owner chain (``trust.rollout_untrusted``).
TERMINAL = m.ROLLOUT_TERMINAL
ACTIVE = m.ROLLOUT_ACTIVE


def router_extras(st: m.RolloutStatus, version: str, agent_spec: m.RLAgentSpec) -> dict[str, Any]:
    """What the router's ``user_config`` holds besides the weights for this Rollout's state: the
    shadow while Shadowing; the circuit breaker and the override baseline while the canary takes
    traffic beside a stable version; nothing otherwise."""
    if st.stable_version is None:
        return {}
    if st.phase == "Shadowing":
        return {SHADOW_KEY: version}
    if st.phase in ("Progressing", "Paused") and 0 < (st.canary_weight or 0) < 100:
        extras: dict[str, Any] = {}
        breaker = agent_spec.canary.circuit_breaker
        if breaker.consecutive_errors:
            extras[BREAKER_KEY] = {"stable": st.stable_version, "consecutiveErrors": breaker.consecutive_errors,
                                   "timeoutSeconds": breaker.timeout_seconds}
        if agent_spec.canary.analysis.max_override_rate < 1:
            extras[BASELINE_KEY] = st.stable_version
        return extras
    return {}


def end_shadow(st: m.RolloutStatus, spec: m.RolloutSpec, acts: Actions) -> None:
    """A finished Rollout whose candidate still shadows (or waits at weight 0 beside) the stable
    version: the candidate leaves the application."""
    if st.shadow is not None and st.stable_version and st.phase not in ACTIVE:
        acts.deploy = {"versions": {st.stable_version: None}, "weights": {st.stable_version: 100}}


def shadow_step(spec: m.RolloutSpec, st: m.RolloutStatus, obs: Observed,
            acts: Actions) -> tuple[m.RolloutStatus, Actions] | None:
    """Observe mode, before approval: the candidate is deployed beside the stable version at
    weight 0 and the router mirrors every request to it, until the graduation criteria hold.
    Returns None when the Rollout goes on to approval (graduated, the shadow ended, or no shadow
    applies: active mode, no stable version, serving disabled)."""
    at, agent = obs.now, obs.agent_spec
    if st.phase != "Shadowing":
        am = obs.active_model
        if (agent.mode != "observe" or st.shadow is not None or am is None or am.version == spec.version
                or not agent.serving.enabled):
            return None
        if obs.blocking_rollout:
            st.phase, st.message = "Queued", f"waiting for rollout {obs.blocking_rollout} to finish"
            return st, acts
        st.phase, st.stable_version, st.canary_version, st.canary_weight = "Shadowing", am.version, spec.version, 0
        st.shadow = m.ShadowStatus(started_at=at)
        set_condition(st.conditions, "Graduated", "False", "Shadowing",
                      f"{spec.version} shadows stable {am.version}", at)
        acts.events.append(Event("Normal", "ShadowStarted", f"{spec.version} shadows stable {am.version}: every "
                                                            "request is mirrored to it; clients get stable's answers"))
    assert st.shadow is not None and st.stable_version is not None
    if agent.mode != "observe":
        st.shadow.ended = "spec.mode was set to active before graduation"
        st.phase, st.message = "AwaitingApproval", st.shadow.ended
        set_condition(st.conditions, "Graduated", "False", "ShadowEnded", st.shadow.ended, at)
        acts.events.append(Event("Normal", "ShadowEnded", st.shadow.ended))
        acts.set_weights = {st.stable_version: 100, spec.version: 0}
        return None
    weights = {st.stable_version: 100, spec.version: 0}
    if not serving_ready(spec, st, obs, acts, weights, "shadow"):
        return st, acts
    if obs.shadow is None:
        st.message = (f"shadowing: cannot measure: {obs.shadow_error}" if obs.shadow_error
                      else "shadowing: no measurement yet")
        return st, acts
    c = obs.shadow
    graduated, progress = graduation(c, agent.observe)
    counted = {"decisions": int(c.decisions), "agreements": int(c.agreements),
               "override_feedback": int(c.override_feedback), "override_correct": int(c.override_correct)}
    if any(getattr(st.shadow, k) != v for k, v in counted.items()) or st.shadow.measured_at is None:
        # written when the counts change, not on every reconcile
        st.shadow = st.shadow.model_copy(update={
            **counted, "measured_at": at,
            "agreement_rate": round(c.agreements / c.decisions, 4) if c.decisions else None,
            "override_accuracy": round(c.override_correct / c.override_feedback, 4) if c.override_feedback else None})
    if not graduated:
        st.message = f"shadowing: {progress}"
        return st, acts
    st.shadow.graduated_at = at
    st.phase, st.message = "AwaitingApproval", f"graduated: {progress}"
    set_condition(st.conditions, "Graduated", "True", "CriteriaMet", progress, at)
    acts.events.append(Event("Normal", "Graduated", f"{spec.version} graduated from shadow mode: {progress}"))
    acts.set_weights = weights  # the same split, without the shadow (router_extras of the new phase)
    return None


@dataclass
class Observed:
    """What the handler observed before calling ``reconcile``."""

    now: datetime
    annotations: dict[str, str]
    agent_spec: m.RLAgentSpec
    active_model: m.ActiveModel | None
    #: Ray Serve: versions deployed in the agent's application, each with the fingerprint of the
    #: artifact it serves, and the router's weights (None: no app).
    serving_versions: dict[str, str | None] | None = None
    serving_weights: dict[str, int] | None = None
    #: Ray Serve application status (RUNNING, DEPLOYING, ...), None if absent.
    app_status: str | None = None
    #: Another Rollout of the same agent that is Progressing or Paused (blocks this one).
    blocking_rollout: str | None = None
    #: A Rollout of the same agent made from a newer TrainingRun: an unapproved Rollout is
    #: Superseded by it (nobody approves a stale artifact by mistake).
    newer_rollout: str | None = None
    #: The latest analysis verdict (phase, message, metrics), if the handler ran one.
    analysis: tuple[str, str, dict[str, Any]] | None = None
    #: The key the admission webhook signs approvals with (None: not loaded; no annotation
    #: approval then counts).
    approval_key: bytes | None = None
    #: Why the Rollout is outside the operator's owner chain (``trust.rollout_untrusted``), or None.
    untrusted: str | None = None
    #: The global kill switch's reason while it is engaged (``rlops-kill-switch``), else None.
    frozen: str | None = None
    #: The router's ``user_config`` besides the weights (shadow, baseline, breaker; None: no app).
    serving_extras: dict[str, Any] | None = None
    #: Observe mode: the shadow's comparison counters (None: not measured).
    shadow: ShadowCounts | None = None
    #: Observe mode: why the shadow's counters could not be read (Prometheus' error), or None.
    shadow_error: str | None = None
    #: Why the router's circuit breaker is open for this canary (None: closed or not measured).
    circuit_open: str | None = None


@dataclass
class Actions:
    """What the handler must do, in this order: set weights, deploy, then the rest.

    ``deploy`` is ``{"versions": {version: {artifactURI, fingerprint} or None}, "weights": {...}}``;
    a None entry keeps that version's deployment as it is currently deployed.
    """

    deploy: dict[str, Any] | None = None
    set_weights: dict[str, int] | None = None
    remove_annotations: list[str] = field(default_factory=list)
    promote_active_model: m.ActiveModel | None = None
    events: list[Event] = field(default_factory=list)
    #: The router's ``user_config`` besides the weights, for ``set_weights`` and ``deploy``.
    router_extras: dict[str, Any] = field(default_factory=dict)


def analysis_window(status: m.RolloutStatus, agent_spec: m.RLAgentSpec, now: datetime) -> int | None:
    """The metrics window (seconds) to judge the canary on now, or None when no analysis is due.

    Due while the canary takes traffic beside a stable version (0 < weight < 100, phase
    Progressing or Paused) and the last measurement is at least ``analysis.intervalSeconds``
    old. The window is the time at this step, at least 10 s and at most
    ``analysis.windowSeconds``: a measurement never reaches back into the previous step's weight.
    """
    if status.phase not in ("Progressing", "Paused") or not status.stable_version \
            or not 0 < (status.canary_weight or 0) < 100:
        return None
    plan = agent_spec.canary.analysis
    last = status.analysis.measured_at if status.analysis else None
    if last is not None and (now - last).total_seconds() < plan.interval_seconds:
        return None
    at_step = (now - (status.step_started_at or now)).total_seconds()
    return int(min(plan.window_seconds, max(10.0, at_step)))


def reads_serving(status: m.RolloutStatus, obs: Observed) -> bool:
    """Whether a reconcile must read Ray Serve first: the Rollout is approved, the agent serves,
    no other Rollout of the agent runs, and the Rollout is trusted (or, distrusted mid-canary,
    must be rolled back). Otherwise the decision needs nothing of Serve, and Serve is not asked."""
    return (approval_given(status, obs.annotations, obs.agent_spec) and obs.agent_spec.serving.enabled
            and not obs.blocking_rollout and (not obs.untrusted or status.phase in ACTIVE))


def weights_for(stable: str | None, canary: str, canary_weight: int) -> dict[str, int]:
    """Router weights (percent) for a canary weight; without a stable version the canary takes all."""
    if stable is None:
        return {canary: 100}
    return {stable: 100 - canary_weight, canary: canary_weight}


def deployed(obs: Observed, versions: dict[str, dict[str, str]], exactly: bool = False) -> bool:
    """Whether Serve runs these versions with these very artifacts (same fingerprints); with
    ``exactly``, and no other version."""
    have = obs.serving_versions
    if have is None or any(have.get(v, "absent") != e["fingerprint"] for v, e in versions.items()):
        return False
    return not exactly or set(have) == set(versions)


def same_split(a: dict[str, int] | None, b: dict[str, int] | None) -> bool:
    """Whether two weight maps route the same traffic (versions at 0% count as absent)."""
    return a is not None and b is not None and {k: v for k, v in a.items() if v} == {k: v for k, v in b.items() if v}


def serving_ready(spec: m.RolloutSpec, st: m.RolloutStatus, obs: Observed, acts: Actions, weights: dict[str, int],
                   role: str) -> bool:
    """Whether Serve runs the candidate (``role``: shadow or canary) beside the stable version
    and is RUNNING; if not, the deploy to make (or the wait) is in ``acts`` / ``st.message``.
    Ready, the router's split converges on ``weights`` (after a restart: a no-op)."""
    versions = {spec.version: {"artifactURI": spec.artifact_uri, "fingerprint": spec.fingerprint}}
    if st.stable_version and obs.active_model:
        versions[st.stable_version] = {"artifactURI": obs.active_model.artifact_uri,
                                       "fingerprint": obs.active_model.fingerprint}
    if not deployed(obs, versions):
        acts.deploy = {"versions": versions, "weights": weights}
        st.message = f"deploying the {role}'s policy deployment"
        return False
    if obs.app_status != "RUNNING":
        st.message = f"waiting for the serving application: {obs.app_status}"
        return False
    if not same_split(obs.serving_weights, weights):
        acts.set_weights = weights
    return True


def errors_note(run: m.AnalysisRun, agent_spec: m.RLAgentSpec) -> str:
    """`` (2 in a row; more than 4 roll back)`` for an Error verdict, else empty."""
    if run.phase != "Error":
        return ""
    return f" ({run.consecutive_errors} in a row; more than {agent_spec.canary.analysis.consecutive_error_limit} roll back)"


def roll_back(st: m.RolloutStatus, spec: m.RolloutSpec, reason: str, at: datetime, acts: Actions) -> tuple[m.RolloutStatus, Actions]:
    st.phase = "RolledBack"
    st.abort_reason = reason
    st.aborted_at = at
    st.completed_at = at
    st.message = f"rolled back: {reason}"
    if st.stable_version is not None and st.canary_version is not None:
        # weight 0 first (the router's user_config: immediate, no restart), then drop the canary
        acts.set_weights = weights_for(st.stable_version, spec.version, 0)
        acts.deploy = {"versions": {st.stable_version: None}, "weights": {st.stable_version: 100}}
    st.canary_weight = 0
    set_condition(st.conditions, "Progressing", "False", "RolledBack", reason, at)
    set_condition(st.conditions, "Completed", "True", "RolledBack", reason, at)
    acts.events.append(Event("Warning", "RolledBack", f"canary {spec.version} weight 0: {reason}"))
    return st, acts


def distrust(st: m.RolloutStatus, spec: m.RolloutSpec, why: str, at: datetime,
               acts: Actions) -> tuple[m.RolloutStatus, Actions]:
    """A Rollout the operator must not act on: roll it back if it had traffic, else ignore it."""
    if st.phase in ACTIVE:
        return roll_back(st, spec, f"no longer trusted: {why}", at, acts)
    st.phase, st.completed_at = "Ignored", at
    st.message = f"ignored: {why}"
    set_condition(st.conditions, "Trusted", "False", "NotInOwnerChain", why, at)
    acts.events.append(Event("Warning", "Ignored", f"the operator ignores this Rollout: {why}"))
    return st, acts


def abort(rollout: dict[str, Any], reason: str, at: datetime) -> tuple[m.RolloutStatus, Actions]:
    """Abort a Rollout (annotation, failed analysis or a firing alert): canary weight 0 at once."""
    st = m.RolloutStatus.model_validate(rollout.get("status") or {})
    spec = m.RolloutSpec.model_validate(rollout["spec"])
    if st.phase in TERMINAL:
        return st, Actions()
    return roll_back(st, spec, reason, at, Actions())


def hold_frozen(st: m.RolloutStatus, spec: m.RolloutSpec, obs: Observed, at: datetime,
            acts: Actions) -> tuple[m.RolloutStatus, Actions]:
    """The kill switch is engaged: a Rollout that has not started waits; one in progress holds
    its step with all traffic on the stable version (the canary's weight is restored when the
    switch is lifted). A first Rollout (no stable version) cannot move traffic anywhere: it holds."""
    why = f"frozen by the kill switch: {obs.frozen}"
    if st.phase not in ACTIVE:
        st.phase = "Approved" if st.phase in (None, "Pending", "AwaitingApproval") else st.phase
        st.message = f"{why}; starts when it is lifted"
    elif st.stable_version is None:
        st.message = f"{why}; no stable version to move traffic to: held at {st.canary_weight or 0}%"
    else:
        if st.weight_before_freeze is None:
            st.weight_before_freeze = st.canary_weight or 0
        st.canary_weight = 0
        st.message = f"{why}; all traffic on stable {st.stable_version}"
        weights = weights_for(st.stable_version, spec.version, 0)
        if not same_split(obs.serving_weights, weights):
            acts.set_weights = weights
    before = next((c for c in st.conditions if c.type == "Frozen"), None)
    if before is None or before.status != "True":
        acts.events.append(Event("Warning", "Frozen", st.message))
    set_condition(st.conditions, "Frozen", "True", "KillSwitch", why, at)
    return st, acts
