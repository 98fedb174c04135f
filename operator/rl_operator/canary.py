"""The canary pipeline of a Rollout, pure: its stages in order (:data:`STAGES`), each a small
function of the reconcile in progress (:class:`Pass`) that returns the verdict ending it (the
status to write and the actions to take) or None to go on, in the manner of Argo Rollouts'
``rollout/canary.go``. ``rollout.reconcile`` runs them; ``handlers`` gathers the observed world
(``traffic.Observed``) and performs the ``traffic.Actions``; the moves that several stages share
are in ``traffic.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rl_operator import models as m
from rl_operator.approvals import APPROVE, APPROVED_BY, APPROVED_VIA, PROMOTE, REJECT, auto_approval, manual_approval
from rl_operator.conditions import set_condition
from rl_operator.traffic import (ABORT, ACTIVE, TERMINAL, Actions, Observed, deployed, distrust, end_shadow, errors_note,
                                 hold_frozen, roll_back, same_split, serving_ready, shadow_step, weights_for)
from rl_operator.objects import Event

Verdict = tuple[m.RolloutStatus, Actions]
"""What one reconcile decided: the status to write and the actions to take."""


@dataclass
class Pass:
    """One reconcile of a Rollout in progress: what was observed, the status being written and
    the actions gathered so far. Each stage reads it and may change it."""

    rollout: dict[str, Any]
    spec: m.RolloutSpec
    st: m.RolloutStatus
    obs: Observed
    acts: Actions = field(default_factory=Actions)
    #: The canary steps this Rollout follows (one ``setWeight: 100`` without a stable version).
    steps: list[m.CanaryStep] = field(default_factory=list)
    #: ``rlops.dev/promote``'s value while it has not been used by a step (None: absent or used).
    promote: str | None = None

    @property
    def at(self) -> datetime:
        return self.obs.now

    @property
    def ann(self) -> dict[str, str]:
        return self.obs.annotations

    def done(self) -> Verdict:
        return self.st, self.acts


Stage = Callable[[Pass], "Verdict | None"]


"""A stage of the canary: the verdict that ends this reconcile, or None to go on to the next."""


def finished(p: Pass) -> Verdict | None:
    """A finished Rollout (Promoted, RolledBack, Rejected, Superseded, Ignored) never changes."""
    return p.done() if p.st.phase in TERMINAL else None


def trust(p: Pass) -> Verdict | None:
    """Only a Rollout in the operator's owner chain, with an approval of its own artifact, is acted on."""
    st, spec = p.st, p.spec
    if p.obs.untrusted is not None:
        return distrust(st, spec, p.obs.untrusted, p.at, p.acts)
    if st.approval is not None and st.approval.fingerprint != spec.fingerprint:
        return distrust(st, spec, f"status.approval names {st.approval.fingerprint}, not this Rollout's "
                                    f"artifact {spec.fingerprint}", p.at, p.acts)
    return None


def abort_requested(p: Pass) -> Verdict | None:
    """``rlops.dev/abort``, whatever the phase, or the router's open circuit breaker during the canary."""
    if ABORT in p.ann:
        return roll_back(p.st, p.spec, f"aborted by annotation: {p.ann[ABORT] or 'no reason given'}", p.at, p.acts)
    if p.obs.circuit_open is not None and p.st.phase in ("Progressing", "Paused"):
        return roll_back(p.st, p.spec, f"circuit breaker open: {p.obs.circuit_open}", p.at, p.acts)
    return None


def _closed_before_approval(p: Pass, phase: str, why: str, message: str, event: Event) -> Verdict:
    """End an unapproved Rollout in ``phase`` (also the Approved condition's reason, ``why`` its message)."""
    st = p.st
    st.phase, st.completed_at, st.message = phase, p.at, message
    set_condition(st.conditions, "Approved", "False", phase, why, p.at)
    p.acts.events.append(event)
    end_shadow(st, p.spec, p.acts)
    return p.done()


def superseded(p: Pass) -> Verdict | None:
    """An unapproved Rollout that a newer TrainingRun's Rollout replaces: nobody approves a stale artifact."""
    if p.st.approval is not None or not p.obs.newer_rollout:
        return None
    message = f"superseded by Rollout {p.obs.newer_rollout} (a newer TrainingRun) before approval"
    return _closed_before_approval(p, "Superseded", message, message, Event("Normal", "Superseded", message))


def rejected(p: Pass) -> Verdict | None:
    """``rlops.dev/reject=<reason>`` on an unapproved Rollout."""
    if p.st.approval is not None or REJECT not in p.ann:
        return None
    message = f"rejected: {p.ann[REJECT]}"
    return _closed_before_approval(p, "Rejected", p.ann[REJECT], message, Event("Warning", "Rejected", message))


def shadow(p: Pass) -> Verdict | None:
    """Observe mode, before approval: the candidate shadows the stable version until it graduates."""
    return shadow_step(p.spec, p.st, p.obs, p.acts) if p.st.approval is None else None


def approve(p: Pass) -> Verdict | None:
    """Wait for an approval (the annotation the webhook signed, or the auto-approval policy) and
    record it; of an approval already recorded, learn who really sent it (the audit log)."""
    st, spec, obs, ann, at = p.st, p.spec, p.obs, p.ann, p.at
    if st.approval is not None:
        if (st.approval.policy == "manual" and ann.get(APPROVED_VIA) and ann.get(APPROVED_VIA) != st.approval.via
                and ann.get(APPROVED_BY) == st.approval.approved_by):
            st.approval.via = ann[APPROVED_VIA]
            set_condition(st.conditions, "Approved", "True", "ManualApproval",
                          f"approved by {st.approval.approved_by} ({st.approval.via}) for {st.approval.fingerprint}", at)
        return None
    approval, refused = manual_approval(p.rollout, obs.approval_key, obs.agent_spec.approval.allowed_service_accounts)
    why = refused or f"waiting for kubectl annotate rollout/{p.rollout['metadata']['name']} {APPROVE}={spec.fingerprint}"
    if refused and not any(c.type == "Approved" and c.message == refused for c in st.conditions):
        p.acts.events.append(Event("Warning", "ApprovalRefused", refused))
    if approval is None:
        approval, auto_why = auto_approval(spec, obs.agent_spec.approval, obs.active_model, at)
        if obs.agent_spec.approval.mode == "auto":
            why = auto_why
    if approval is None:
        st.phase, st.message = "AwaitingApproval", why
        set_condition(st.conditions, "Approved", "False", "AwaitingApproval", why, at)
        return p.done()
    st.approval = approval
    who = approval.approved_by + (f" ({approval.via})" if approval.via else "")
    set_condition(st.conditions, "Approved", "True", f"{approval.policy.capitalize()}Approval",
                  f"approved by {who} for {approval.fingerprint}", at)
    p.acts.events.append(Event("Normal", "Approved", f"{approval.policy} approval by {who} for {approval.fingerprint}"))
    return None


def serving_disabled(p: Pass) -> Verdict | None:
    """An approved Rollout of an agent whose serving is off goes no further."""
    if p.obs.agent_spec.serving.enabled:
        return None
    p.st.phase, p.st.message = "Approved", "serving is disabled for this agent (spec.serving.enabled=false)"
    return p.done()


def queue(p: Pass) -> Verdict | None:
    """One rollout at a time per agent: a Rollout that has not started waits for the active one."""
    if p.st.phase in ACTIVE or not p.obs.blocking_rollout:
        return None
    p.st.phase, p.st.message = "Queued", f"waiting for rollout {p.obs.blocking_rollout} to finish"
    return p.done()


def freeze(p: Pass) -> Verdict | None:
    """The global kill switch: nothing moves, traffic on stable, until it is lifted; once lifted,
    the canary's weight comes back and its step starts over."""
    st = p.st
    if p.obs.frozen is not None:
        return hold_frozen(st, p.spec, p.obs, p.at, p.acts)
    if st.weight_before_freeze is not None:
        st.canary_weight, st.weight_before_freeze, st.step_started_at = st.weight_before_freeze, None, p.at
        set_condition(st.conditions, "Frozen", "False", "KillSwitchLifted", "the kill switch was lifted", p.at)
        p.acts.events.append(Event("Normal", "Unfrozen", f"kill switch lifted: canary back to {st.canary_weight}%, "
                                                         f"the current step starts over"))
    return None


def start(p: Pass) -> Verdict | None:
    """The canary starts beside the active model's version (the stable one), at weight 0."""
    st, spec, am = p.st, p.spec, p.obs.active_model
    if st.phase in ACTIVE:
        return None
    st.canary_version = spec.version
    st.stable_version = am.version if am and am.version != spec.version else None
    st.current_step_index, st.step_started_at, st.canary_weight = 0, p.at, 0
    st.phase = "Progressing"
    set_condition(st.conditions, "Progressing", "True", "Started",
                  f"canary {spec.version} beside stable {st.stable_version or '(none)'}", p.at)
    p.acts.events.append(Event("Normal", "RolloutStarted", f"canary {spec.version}, stable {st.stable_version or '(none)'}"))
    return None


def promoting(p: Pass) -> Verdict | None:
    """A promotion under way goes on (:func:`_promote`)."""
    return _promote(p) if p.st.phase == "Promoting" else None


def deploy(p: Pass) -> Verdict | None:
    """The canary's policy deployment runs beside the stable one, and the router's split is the
    current weight's, before any step is taken."""
    weights = weights_for(p.st.stable_version, p.spec.version, p.st.canary_weight or 0)
    return None if serving_ready(p.spec, p.st, p.obs, p.acts, weights, "canary") else p.done()


def steps(p: Pass) -> Verdict | None:
    """The canary steps from the current one: ``setWeight`` moves traffic (one step per
    reconcile), ``pause`` holds (for its duration, or until ``rlops.dev/promote``), a step without
    a pause waits for a Successful analysis at that step; a Failed one, or too many Errors in a
    row, rolls back. None once the last step is done (or one sets 100%): promotion follows."""
    st = p.st
    p.steps = list(p.obs.agent_spec.canary.steps) if st.stable_version else [m.CanaryStep(set_weight=100)]
    p.promote = p.ann.get(PROMOTE)
    if p.promote is not None:
        p.acts.remove_annotations.append(PROMOTE)
    if p.promote == "full":
        st.current_step_index = len(p.steps) - 1
        p.steps = [*p.steps[:-1], m.CanaryStep(set_weight=100)]
        p.acts.events.append(Event("Normal", "PromotedFull", "rlops.dev/promote=full: skipping to 100%"))
    while st.current_step_index < len(p.steps):
        step = p.steps[st.current_step_index]
        if step.set_weight is not None and st.canary_weight != step.set_weight:
            _set_weight(p, step.set_weight)
            return None if step.set_weight == 100 else p.done()
        if step.set_weight == 100:
            return None
        verdict = _analyse(p)
        if verdict is None:
            verdict = _hold(p, step)
        if verdict is not None:
            return verdict
        st.current_step_index += 1
        st.step_started_at = p.at
        st.phase = "Progressing"
    return None


def _set_weight(p: Pass, weight: int) -> None:
    st = p.st
    st.canary_weight, st.step_started_at, st.analysis = weight, p.at, None
    p.acts.set_weights = weights_for(st.stable_version, p.spec.version, weight)
    p.acts.events.append(Event("Normal", "StepAdvanced", f"step {st.current_step_index + 1}/{len(p.steps)}: "
                                                         f"canary weight {weight}%"))
    st.phase, st.message = "Progressing", f"canary weight {weight}%"


def _analyse(p: Pass) -> Verdict | None:
    """Record the handler's analysis verdict at the current step; a Failed one, or more Errors in
    a row than ``consecutiveErrorLimit``, rolls back."""
    st, verdict = p.st, p.obs.analysis
    if verdict is None:
        return None
    phase, message, metrics = verdict
    last, errors = st.analysis, 0
    if phase == "Error":
        errors = 1 + (last.consecutive_errors if last is not None and last.phase == "Error"
                      and last.step_index == st.current_step_index else 0)
    st.analysis = m.AnalysisRun(phase=phase, message=message, step_index=st.current_step_index,
                                measured_at=p.at, metrics=metrics, consecutive_errors=errors)
    if phase == "Failed":
        return roll_back(st, p.spec, f"analysis failed at {st.canary_weight}%: {message}", p.at, p.acts)
    limit = p.obs.agent_spec.canary.analysis.consecutive_error_limit
    if errors > limit:
        return roll_back(st, p.spec, f"analysis could not measure {errors} times in a row at {st.canary_weight}% "
                                  f"(consecutiveErrorLimit {limit}): {message}", p.at, p.acts)
    return None


def _hold(p: Pass, step: m.CanaryStep) -> Verdict | None:
    """Whether the current step holds: ``rlops.dev/promote`` releases it once; a pause holds for
    its duration (or until promoted); a step without a pause holds until its analysis succeeds."""
    st = p.st
    if p.promote is not None:
        p.promote = None  # used by this step
        return None
    if step.pause is not None:
        duration = step.pause.duration_seconds
        elapsed = (p.at - (st.step_started_at or p.at)).total_seconds()
        if duration is not None and elapsed >= duration:
            return None
        st.phase = "Paused"
        st.message = (f"paused at {st.canary_weight}% " +
                      ("until rlops.dev/promote" if duration is None else f"for {duration - elapsed:.0f}s more"))
        return p.done()
    if st.analysis is not None and st.analysis.phase == "Successful" and st.analysis.step_index == st.current_step_index:
        return None
    st.phase = "Progressing"
    st.message = f"canary weight {st.canary_weight}%: analysis " + (
        f"{st.analysis.phase}{errors_note(st.analysis, p.obs.agent_spec)}: {st.analysis.message}"
        if st.analysis else "pending")
    return p.done()


def promote(p: Pass) -> Verdict:
    """The steps are done: the canary becomes stable and the old version leaves (:func:`_promote`)."""
    p.st.phase, p.st.canary_weight = "Promoting", 100
    p.st.current_step_index = len(p.steps) - 1
    return _promote(p)


#: The canary's order of operations: the first stage that returns a verdict ends the reconcile.


STAGES: tuple[Stage, ...] = (
    finished, trust, abort_requested,                    # what ends or stops a Rollout, whatever its phase
    superseded, rejected, shadow, approve,               # before approval
    serving_disabled, queue, freeze, start, promoting,   # before traffic moves
    deploy, steps, promote,                              # the canary
)


def run(rollout: dict[str, Any], obs: Observed) -> Verdict:
    """The stages of :data:`STAGES` in order, until one returns the verdict of this reconcile."""
    p = Pass(rollout=rollout, spec=m.RolloutSpec.model_validate(rollout["spec"]),
             st=m.RolloutStatus.model_validate(rollout.get("status") or {}), obs=obs)
    p.st.observed_generation = rollout["metadata"].get("generation")
    for stage in STAGES:
        verdict = stage(p)
        if verdict is not None:
            return verdict
    raise AssertionError("the last stage (promote) always returns a verdict")


def _promote(p: Pass) -> Verdict:
    """Promotion, one safe stage per reconcile: all traffic to the canary (router user_config
    only); then the application without the old version; then, once RUNNING, Promoted."""
    spec, st, obs, acts, at = p.spec, p.st, p.obs, p.acts, p.at
    full = weights_for(st.stable_version, spec.version, 100)
    final = {spec.version: {"artifactURI": spec.artifact_uri, "fingerprint": spec.fingerprint}}
    done = deployed(obs, final, exactly=True)
    if not same_split(obs.serving_weights, full) and not done:
        acts.set_weights = full
        st.message = "promoting: all traffic to the canary"
        return st, acts
    if not done:
        acts.deploy = {"versions": final, "weights": {spec.version: 100}}
        st.message = f"promoting: removing the previous version {st.stable_version}"
        return st, acts
    if obs.app_status != "RUNNING":
        st.message = f"promoting: waiting for the serving application: {obs.app_status}"
        return st, acts
    st.phase, st.completed_at = "Promoted", at
    st.message = f"{spec.version} is stable at 100%"
    set_condition(st.conditions, "Progressing", "False", "Promoted", st.message, at)
    set_condition(st.conditions, "Completed", "True", "Promoted", st.message, at)
    acts.promote_active_model = m.ActiveModel(
        version=spec.version, fingerprint=spec.fingerprint, artifact_uri=spec.artifact_uri,
        rollout=p.rollout["metadata"]["name"], mean_return=spec.evaluation.mean_return, promoted_at=at,
    )
    acts.events.append(Event("Normal", "Promoted", st.message))
    return st, acts
