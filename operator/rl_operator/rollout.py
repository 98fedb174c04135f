"""Rollout decisions: approval, canary steps, analysis gates, promotion and abort. Pure, no I/O.

``reconcile`` is the whole order of operations for one Rollout, as one linear pipeline in the
manner of Argo Rollouts' ``rollout/canary.go``: each stage may return early with the status to
write and the actions to take. ``handlers`` gathers the observed world (annotations, the agent,
Ray Serve's current weights, the latest analysis) and performs the actions.

Annotations a human uses (on the Rollout):

- ``rlops.dev/approve=<fingerprint>``: approve this exact artifact. The admission webhook refuses
  a wrong or stale fingerprint and a user without the ``approve`` verb, and records who approved
  in ``rlops.dev/approved-by`` / ``rlops.dev/approved-at``, signed in
  ``rlops.dev/approval-signature``; without a valid signature the approval does not count.
- ``rlops.dev/reject=<reason>``: reject (the ``approve`` verb).
- ``rlops.dev/promote`` (any value): leave the current pause or analysis wait; ``=full``: go to
  100% (the ``approve`` verb, enforced by a ValidatingAdmissionPolicy).
- ``rlops.dev/abort=<reason>``: canary weight 0 at once; phase RolledBack (open to ``edit``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rl_engine.serving.contract import BASELINE_KEY, BREAKER_KEY, SHADOW_KEY

from rl_operator import models as m
from rl_operator.approvals import APPROVE, APPROVED_BY, APPROVED_VIA, PROMOTE, REJECT, auto_approval, manual_approval
from rl_operator.conditions import set_condition
from rl_operator.evaluation import rollout_evaluation
from rl_operator.training import Event, owner_reference

ABORT = f"{m.GROUP}/abort"

#: ``Ignored``: the Rollout is not in the operator's owner chain (``trust.rollout_untrusted``).
TERMINAL = m.ROLLOUT_TERMINAL
ACTIVE = m.ROLLOUT_ACTIVE


# ----------------------------------------------------------------------------- creation


def eligible(run: dict[str, Any], agent_spec: m.RLAgentSpec) -> tuple[bool, str]:
    """Whether a TrainingRun's policy may be rolled out: Succeeded, measured by the operator's
    evaluation (``status.evaluation``), and that measured mean return meets
    ``spec.evaluation.minMeanReturn`` (when set). Returns ``(eligible, reason message)``."""
    status = m.TrainingRunStatus.model_validate(run.get("status") or {})
    if status.phase != "Succeeded" or not status.fingerprint or not status.artifact_uri:
        return False, f"TrainingRun {run['metadata']['name']} has not succeeded"
    if status.evaluation is None or status.evaluation.phase != "Succeeded":
        return False, f"TrainingRun {run['metadata']['name']} has not been evaluated by the operator"
    bar = agent_spec.evaluation.min_mean_return
    mean = status.evaluation.mean_return
    if bar is not None and (mean is None or mean < bar):
        return False, f"mean evaluation return {mean} is below the minimum {bar}"
    return True, f"mean evaluation return {mean}" + (f" >= minimum {bar}" if bar is not None else "")


def desired_rollout(run: dict[str, Any]) -> dict[str, Any]:
    """The Rollout for a Succeeded TrainingRun: same name, its artifact, fingerprint and the
    operator's measured evaluation (signed), with the trainer's reported mean return beside it."""
    status = m.TrainingRunStatus.model_validate(run["status"])
    meta = run["metadata"]
    agent = run["spec"]["agentRef"]["name"]
    spec = m.RolloutSpec(
        agent_ref=m.ObjectRef(name=agent),
        training_run_ref=m.ObjectRef(name=meta["name"]),
        version=meta["name"],
        artifact_uri=status.artifact_uri,
        fingerprint=status.fingerprint,
        evaluation=rollout_evaluation(status),
    )
    return {
        "apiVersion": m.API_VERSION,
        "kind": m.Rollout.KIND,
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": {m.AGENT_LABEL: agent, "app.kubernetes.io/managed-by": "rlops"},
            "ownerReferences": [owner_reference(run)],
            # born with the finalizer that its deletion handler needs: kopf would add it in a
            # write of its own, before the first reconcile
            "finalizers": [m.FINALIZER],
        },
        "spec": spec.wire(),
    }


# ----------------------------------------------------------------------------- analysis verdict


@dataclass(frozen=True)
class Measurement:
    """What Prometheus saw over the analysis window (counts are increases over the window).

    ``canary_reward_buckets`` / ``stable_reward_buckets``: the version's reward histogram
    (``rlops_serve_feedback_reward_scaled``) as Prometheus returns it, ``(le, cumulative count)``
    pairs; ``le`` is in units of the declared reward range (0 = ``rewardRange.min``,
    1 = ``rewardRange.max``) and ``float("inf")`` for the last bucket.
    """

    canary_requests: float
    canary_errors: float
    canary_feedback: float = 0.0
    canary_negative: float = 0.0
    canary_reward_buckets: tuple[tuple[float, float], ...] = ()
    stable_feedback: float = 0.0
    stable_negative: float = 0.0
    stable_reward_buckets: tuple[tuple[float, float], ...] = ()
    window_seconds: int = 0
    #: canary answers also asked of the stable version (the override comparison), and the
    #: ones where both chose the same action
    canary_decisions: float = 0.0
    canary_agreements: float = 0.0

    #: Fraction of the feedback cut from each end of the reward distribution before averaging.
    REWARD_TRIM = 0.1

    @staticmethod
    def trimmed_mean(buckets: Any, low: float, high: float, trim: float = 0.1) -> float | None:
        """The ``trim``-trimmed mean of a reward histogram, in reward units; None without feedback.

        Each bucket's feedback counts at the bucket's centre (the router's buckets are centred
        on multiples of 1/20 of the range: exact for rewards on that grid, within 1/40 of the
        range otherwise; the first and last buckets are taken to be as wide as their
        neighbours, clipped to the range). Then a fraction ``trim`` of the total count is cut
        from the low end and from the high end, and the rest is averaged. Fractional counts
        (Prometheus' ``increase``) are fine; a cumulative count lower than the one before it
        (counter resets) is treated as equal to it.

        Args:
            buckets: ``(le, cumulative count)`` pairs, ``le`` in units of the range, last ``inf``.
            low, high: the declared reward range (reward units), ``low < high``.
            trim: fraction in [0, 0.5) cut from each end.
        """
        inf = float("inf")
        points = sorted((float(le), float(count)) for le, count in buckets)
        finite = [le for le, _ in points if le != inf]
        if len(finite) < 2:
            return None
        step = finite[1] - finite[0]
        weights, centres, seen = [], [], 0.0
        for i, (le, count) in enumerate(points):
            weights.append(max(0.0, count - seen))
            seen = max(seen, count)
            if le == inf:
                centre = points[i - 1][0] + step / 2 if i else 1.0
            elif i == 0:
                centre = le - step / 2
            else:
                centre = (points[i - 1][0] + le) / 2
            centres.append(min(1.0, max(0.0, centre)))
        total = sum(weights)
        if total <= 0:
            return None
        for order in (range(len(weights)), range(len(weights) - 1, -1, -1)):
            cut = trim * total
            for i in order:
                taken = min(weights[i], cut)
                weights[i] -= taken
                cut -= taken
                if cut <= 0:
                    break
        kept = sum(weights)
        if kept <= 0:
            return None
        scaled = sum(w * c for w, c in zip(weights, centres)) / kept
        return low + scaled * (high - low)


def judge(meas: Measurement, spec: m.AnalysisSpec, has_stable: bool) -> tuple[str, str, dict[str, Any]]:
    """The analysis verdict for one measurement: ``(phase, message, metrics)``.

    Checks (seed 004, "Rollback Conditions"; the override limit from seed 001): canary error rate
    above ``maxErrorRate`` fails; a canary that chooses another action than the stable version in
    more than ``maxOverrideRate`` of its compared answers fails (once at least half of
    ``minSampleCount`` answers were compared); the canary's reward below the stable's minus ``maxRewardDrop`` fails; the canary's
    negative-feedback rate above ``maxNegativeFeedbackRatio`` times the stable's (floored at 1%
    so that a stable with no negatives does not fail every canary on one) fails. Fewer than
    ``minSampleCount`` canary requests is Inconclusive. Reward and feedback checks need feedback
    on both versions (at least a tenth of ``minSampleCount`` each) and are skipped otherwise.

    A version's reward is the 10%-trimmed mean (:meth:`Measurement.trimmed_mean`) of its
    feedback rewards, which the router only accepts within ``rewardRange``: k feedbacks among
    n, whatever their values, move it by at most k * (max - min) / (0.8 n), and while
    k <= 0.1 n by at most k * d / (0.8 n), d the spread of the central values of the other
    feedback (docs/rollouts.md), so a few extreme rewards weigh no more than central ones.
    """
    metrics: dict[str, Any] = {"canaryRequests": round(meas.canary_requests, 1), "windowSeconds": meas.window_seconds}
    if meas.canary_requests < spec.min_sample_count:
        return "Inconclusive", f"{meas.canary_requests:.0f} canary requests < minSampleCount {spec.min_sample_count}", metrics
    error_rate = meas.canary_errors / meas.canary_requests
    metrics["canaryErrorRate"] = round(error_rate, 4)
    if error_rate > spec.max_error_rate:
        return "Failed", f"canary error rate {error_rate:.1%} > {spec.max_error_rate:.1%}", metrics
    notes = [f"error rate {error_rate:.1%}"]
    if spec.max_override_rate < 1 and has_stable and meas.canary_decisions >= max(1.0, spec.min_sample_count / 2):
        override = 1.0 - meas.canary_agreements / meas.canary_decisions
        metrics.update(canaryDecisions=round(meas.canary_decisions, 1), canaryOverrideRate=round(override, 4))
        if override > spec.max_override_rate:
            return "Failed", (f"canary overrides stable in {override:.1%} of {meas.canary_decisions:.0f} compared "
                              f"answers > maxOverrideRate {spec.max_override_rate:.1%}"), metrics
        notes.append(f"override rate {override:.1%}")
    min_feedback = max(1.0, spec.min_sample_count / 10)
    if has_stable and meas.canary_feedback >= min_feedback and meas.stable_feedback >= min_feedback:
        low, high, trim = spec.reward_range.min, spec.reward_range.max, Measurement.REWARD_TRIM
        canary_reward = Measurement.trimmed_mean(meas.canary_reward_buckets, low, high, trim)
        stable_reward = Measurement.trimmed_mean(meas.stable_reward_buckets, low, high, trim)
        canary_neg = meas.canary_negative / meas.canary_feedback
        stable_neg = meas.stable_negative / meas.stable_feedback
        metrics.update(canaryFeedback=round(meas.canary_feedback, 1), stableFeedback=round(meas.stable_feedback, 1),
                       canaryNegativeRate=round(canary_neg, 4), stableNegativeRate=round(stable_neg, 4))
        if canary_reward is not None and stable_reward is not None:
            metrics.update(canaryTrimmedMeanReward=round(canary_reward, 4),
                           stableTrimmedMeanReward=round(stable_reward, 4))
            if canary_reward < stable_reward - spec.max_reward_drop:
                return "Failed", (f"canary reward {canary_reward:.3f} < stable {stable_reward:.3f} - "
                                  f"{spec.max_reward_drop} (10%-trimmed means)"), metrics
        limit = max(spec.max_negative_feedback_ratio * stable_neg, 0.01)
        if canary_neg > limit:
            return "Failed", (f"canary negative-feedback rate {canary_neg:.1%} > "
                              f"{spec.max_negative_feedback_ratio}x stable {stable_neg:.1%}"), metrics
        if canary_reward is not None and stable_reward is not None:
            notes.append(f"reward {canary_reward:.3f} vs stable {stable_reward:.3f} (10%-trimmed means)")
        else:
            notes.append("reward check skipped: no reward histogram")
    else:
        notes.append("reward/feedback checks skipped: not enough feedback")
    return "Successful", "; ".join(notes), metrics


# ----------------------------------------------------------------------------- observe mode


@dataclass(frozen=True)
class ShadowCounts:
    """The router's comparison counters for a shadow version, since the router started comparing
    (Prometheus' current sums of the counters, not increases: exact counts)."""

    decisions: float
    agreements: float
    override_feedback: float
    override_correct: float


def graduation(counts: ShadowCounts, spec: m.ObserveSpec) -> tuple[bool, str]:
    """Whether a shadow meets the graduation criteria (seed 001: enough decisions, agreement within
    a band, override accuracy), and its progress as one line: ``(graduated, progress)``."""
    decisions = int(counts.decisions)
    agreement = counts.agreements / counts.decisions if counts.decisions else None
    accuracy = counts.override_correct / counts.override_feedback if counts.override_feedback else None
    progress = [f"{decisions}/{spec.min_decisions} decisions"]
    progress.append(f"agreement {agreement:.1%}" if agreement is not None else "agreement -")
    progress.append(f"override accuracy {accuracy:.1%} ({int(counts.override_feedback)} judged)"
                    if accuracy is not None else "override accuracy - (0 judged)")
    missing: list[str] = []
    if decisions < spec.min_decisions:
        missing.append("decisions")
    if agreement is None or not spec.min_agreement <= agreement <= spec.max_agreement:
        missing.append(f"agreement not in [{spec.min_agreement:.0%}, {spec.max_agreement:.0%}]")
    if counts.override_feedback < spec.min_override_feedback:
        missing.append(f"{spec.min_override_feedback} judged overrides")
    elif accuracy is not None and accuracy < spec.min_override_accuracy:
        missing.append(f"override accuracy >= {spec.min_override_accuracy:.0%}")
    line = ", ".join(progress)
    return not missing, line if not missing else f"{line}; waiting for: {', '.join(missing)}"


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


def _end_shadow(st: m.RolloutStatus, spec: m.RolloutSpec, acts: Actions) -> None:
    """A finished Rollout whose candidate still shadows (or waits at weight 0 beside) the stable
    version: the candidate leaves the application."""
    if st.shadow is not None and st.stable_version and st.phase not in ACTIVE:
        acts.deploy = {"versions": {st.stable_version: None}, "weights": {st.stable_version: 100}}


def _shadow(spec: m.RolloutSpec, st: m.RolloutStatus, obs: Observed,
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
    if not _serving_ready(spec, st, obs, acts, weights, "shadow"):
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


# ----------------------------------------------------------------------------- the pipeline


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


def weights_for(stable: str | None, canary: str, canary_weight: int) -> dict[str, int]:
    """Router weights (percent) for a canary weight; without a stable version the canary takes all."""
    if stable is None:
        return {canary: 100}
    return {stable: 100 - canary_weight, canary: canary_weight}


def _deployed(obs: Observed, versions: dict[str, dict[str, str]], exactly: bool = False) -> bool:
    """Whether Serve runs these versions with these very artifacts (same fingerprints); with
    ``exactly``, and no other version."""
    have = obs.serving_versions
    if have is None or any(have.get(v, "absent") != e["fingerprint"] for v, e in versions.items()):
        return False
    return not exactly or set(have) == set(versions)


def same_split(a: dict[str, int] | None, b: dict[str, int] | None) -> bool:
    """Whether two weight maps route the same traffic (versions at 0% count as absent)."""
    return a is not None and b is not None and {k: v for k, v in a.items() if v} == {k: v for k, v in b.items() if v}


def _serving_ready(spec: m.RolloutSpec, st: m.RolloutStatus, obs: Observed, acts: Actions, weights: dict[str, int],
                   role: str) -> bool:
    """Whether Serve runs the candidate (``role``: shadow or canary) beside the stable version
    and is RUNNING; if not, the deploy to make (or the wait) is in ``acts`` / ``st.message``.
    Ready, the router's split converges on ``weights`` (after a restart: a no-op)."""
    versions = {spec.version: {"artifactURI": spec.artifact_uri, "fingerprint": spec.fingerprint}}
    if st.stable_version and obs.active_model:
        versions[st.stable_version] = {"artifactURI": obs.active_model.artifact_uri,
                                       "fingerprint": obs.active_model.fingerprint}
    if not _deployed(obs, versions):
        acts.deploy = {"versions": versions, "weights": weights}
        st.message = f"deploying the {role}'s policy deployment"
        return False
    if obs.app_status != "RUNNING":
        st.message = f"waiting for the serving application: {obs.app_status}"
        return False
    if not same_split(obs.serving_weights, weights):
        acts.set_weights = weights
    return True


def _errors_note(run: m.AnalysisRun, agent_spec: m.RLAgentSpec) -> str:
    """`` (2 in a row; more than 4 roll back)`` for an Error verdict, else empty."""
    if run.phase != "Error":
        return ""
    return f" ({run.consecutive_errors} in a row; more than {agent_spec.canary.analysis.consecutive_error_limit} roll back)"


def _abort(st: m.RolloutStatus, spec: m.RolloutSpec, reason: str, at: datetime, acts: Actions) -> tuple[m.RolloutStatus, Actions]:
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


def _untrusted(st: m.RolloutStatus, spec: m.RolloutSpec, why: str, at: datetime,
               acts: Actions) -> tuple[m.RolloutStatus, Actions]:
    """A Rollout the operator must not act on: roll it back if it had traffic, else ignore it."""
    if st.phase in ACTIVE:
        return _abort(st, spec, f"no longer trusted: {why}", at, acts)
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
    return _abort(st, spec, reason, at, Actions())


def _freeze(st: m.RolloutStatus, spec: m.RolloutSpec, obs: Observed, at: datetime,
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


def reconcile(rollout: dict[str, Any], obs: Observed) -> tuple[m.RolloutStatus, Actions]:
    """One reconcile of a Rollout: the whole canary order of operations.

    Stages, each of which may return early: terminal → abort (annotation, open circuit breaker)
    → shadow (observe mode) → approval → queueing behind another rollout → deploy canary beside
    stable → the current step (setWeight / pause, with the analysis gate) → promotion. Then the
    router's ``user_config`` besides the weights (:func:`router_extras`) follows the new state:
    set with the weights or the deploy, or on its own when only it differs from what runs.

    Args:
        rollout: the Rollout object (its ``status`` is the progress so far: a restart resumes it).
        obs: the observed world.
    Returns:
        ``(status, actions)``.
    """
    st, acts = _pipeline(rollout, obs)
    version = rollout["spec"]["version"]
    acts.router_extras = router_extras(st, version, obs.agent_spec)
    if (acts.set_weights is None and acts.deploy is None and st.phase in ACTIVE and obs.serving_weights
            and obs.serving_extras is not None and obs.serving_extras != acts.router_extras):
        acts.set_weights = dict(obs.serving_weights)
    return st, acts


def _pipeline(rollout: dict[str, Any], obs: Observed) -> tuple[m.RolloutStatus, Actions]:
    spec = m.RolloutSpec.model_validate(rollout["spec"])
    st = m.RolloutStatus.model_validate(rollout.get("status") or {})
    st.observed_generation = rollout["metadata"].get("generation")
    acts = Actions()
    ann = obs.annotations
    at = obs.now
    if st.phase in TERMINAL:
        return st, acts

    # 0. trust: only a Rollout in the operator's owner chain, with an approval for its own artifact
    if obs.untrusted is not None:
        return _untrusted(st, spec, obs.untrusted, at, acts)
    if st.approval is not None and st.approval.fingerprint != spec.fingerprint:
        return _untrusted(st, spec, f"status.approval names {st.approval.fingerprint}, not this Rollout's "
                                    f"artifact {spec.fingerprint}", at, acts)

    # 1. abort, whatever the phase
    if ABORT in ann:
        return _abort(st, spec, f"aborted by annotation: {ann[ABORT] or 'no reason given'}", at, acts)
    if obs.circuit_open is not None and st.phase in ("Progressing", "Paused"):
        return _abort(st, spec, f"circuit breaker open: {obs.circuit_open}", at, acts)

    # 2. approval (in observe mode, after the shadow graduates)
    if st.approval is None:
        if obs.newer_rollout:
            st.phase, st.completed_at = "Superseded", at
            st.message = f"superseded by Rollout {obs.newer_rollout} (a newer TrainingRun) before approval"
            set_condition(st.conditions, "Approved", "False", "Superseded", st.message, at)
            acts.events.append(Event("Normal", "Superseded", st.message))
            _end_shadow(st, spec, acts)
            return st, acts
        if REJECT in ann:
            st.phase, st.completed_at = "Rejected", at
            st.message = f"rejected: {ann[REJECT]}"
            set_condition(st.conditions, "Approved", "False", "Rejected", ann[REJECT], at)
            acts.events.append(Event("Warning", "Rejected", st.message))
            _end_shadow(st, spec, acts)
            return st, acts
        shadowing = _shadow(spec, st, obs, acts)
        if shadowing is not None:
            return shadowing
        approval, refused = manual_approval(rollout, obs.approval_key, obs.agent_spec.approval.allowed_service_accounts)
        why = refused or "waiting for kubectl annotate rollout/" \
            f"{rollout['metadata']['name']} {APPROVE}={spec.fingerprint}"
        if refused and not any(c.type == "Approved" and c.message == refused for c in st.conditions):
            acts.events.append(Event("Warning", "ApprovalRefused", refused))
        if approval is None:
            approval, auto_why = auto_approval(spec, obs.agent_spec.approval, obs.active_model, at)
            if obs.agent_spec.approval.mode == "auto":
                why = auto_why
        if approval is None:
            st.phase, st.message = "AwaitingApproval", why
            set_condition(st.conditions, "Approved", "False", "AwaitingApproval", why, at)
            return st, acts
        st.approval = approval
        who = approval.approved_by + (f" ({approval.via})" if approval.via else "")
        set_condition(st.conditions, "Approved", "True", f"{approval.policy.capitalize()}Approval",
                      f"approved by {who} for {approval.fingerprint}", at)
        acts.events.append(Event("Normal", "Approved", f"{approval.policy} approval by {who} "
                                                       f"for {approval.fingerprint}"))
    elif (st.approval.policy == "manual" and ann.get(APPROVED_VIA) and ann.get(APPROVED_VIA) != st.approval.via
          and ann.get(APPROVED_BY) == st.approval.approved_by):
        # the operator learnt from the audit log, after the fact, that the approval was impersonated
        st.approval.via = ann[APPROVED_VIA]
        set_condition(st.conditions, "Approved", "True", "ManualApproval",
                      f"approved by {st.approval.approved_by} ({st.approval.via}) for {st.approval.fingerprint}", at)

    if not obs.agent_spec.serving.enabled:
        st.phase, st.message = "Approved", "serving is disabled for this agent (spec.serving.enabled=false)"
        return st, acts

    # 3. one rollout at a time per agent
    if st.phase not in ACTIVE and obs.blocking_rollout:
        st.phase, st.message = "Queued", f"waiting for rollout {obs.blocking_rollout} to finish"
        return st, acts

    # 3b. the global kill switch: nothing moves, traffic on stable, until it is lifted
    if obs.frozen is not None:
        return _freeze(st, spec, obs, at, acts)
    if st.weight_before_freeze is not None:
        st.canary_weight, st.weight_before_freeze, st.step_started_at = st.weight_before_freeze, None, at
        set_condition(st.conditions, "Frozen", "False", "KillSwitchLifted", "the kill switch was lifted", at)
        acts.events.append(Event("Normal", "Unfrozen", f"kill switch lifted: canary back to {st.canary_weight}%, "
                                                       f"the current step starts over"))

    # 4. start: the canary deployed beside the stable version, at weight 0
    if st.phase not in ACTIVE:
        st.canary_version = spec.version
        st.stable_version = obs.active_model.version if obs.active_model and obs.active_model.version != spec.version else None
        st.current_step_index, st.step_started_at, st.canary_weight = 0, at, 0
        st.phase = "Progressing"
        set_condition(st.conditions, "Progressing", "True", "Started",
                      f"canary {spec.version} beside stable {st.stable_version or '(none)'}", at)
        acts.events.append(Event("Normal", "RolloutStarted", f"canary {spec.version}, stable {st.stable_version or '(none)'}"))
    if st.phase == "Promoting":
        return _promote(rollout, spec, st, obs, acts)
    if not _serving_ready(spec, st, obs, acts, weights_for(st.stable_version, spec.version, st.canary_weight or 0),
                          "canary"):
        return st, acts

    # 5. the current step
    steps = obs.agent_spec.canary.steps if st.stable_version else [m.CanaryStep(set_weight=100)]
    promote = ann.get(PROMOTE)
    if promote is not None:
        acts.remove_annotations.append(PROMOTE)
    if promote == "full":
        st.current_step_index = len(steps) - 1
        steps = [*steps[:-1], m.CanaryStep(set_weight=100)]
        acts.events.append(Event("Normal", "PromotedFull", "rlops.dev/promote=full: skipping to 100%"))
    while st.current_step_index < len(steps):
        step = steps[st.current_step_index]
        if step.set_weight is not None and st.canary_weight != step.set_weight:
            st.canary_weight = step.set_weight
            st.step_started_at = at
            st.analysis = None
            acts.set_weights = weights_for(st.stable_version, spec.version, step.set_weight)
            acts.events.append(Event("Normal", "StepAdvanced", f"step {st.current_step_index + 1}/{len(steps)}: "
                                                               f"canary weight {step.set_weight}%"))
            st.phase, st.message = "Progressing", f"canary weight {step.set_weight}%"
            if step.set_weight == 100:
                break  # promotion below
            return st, acts
        if step.set_weight == 100:
            break
        # analysis gate: applies while the canary takes traffic below 100%
        verdict = obs.analysis
        if verdict is not None:
            phase, message, metrics = verdict
            last, errors = st.analysis, 0
            if phase == "Error":
                errors = 1 + (last.consecutive_errors if last is not None and last.phase == "Error"
                              and last.step_index == st.current_step_index else 0)
            st.analysis = m.AnalysisRun(phase=phase, message=message, step_index=st.current_step_index,
                                        measured_at=at, metrics=metrics, consecutive_errors=errors)
            if phase == "Failed":
                return _abort(st, spec, f"analysis failed at {st.canary_weight}%: {message}", at, acts)
            limit = obs.agent_spec.canary.analysis.consecutive_error_limit
            if errors > limit:
                return _abort(st, spec, f"analysis could not measure {errors} times in a row at {st.canary_weight}% "
                                        f"(consecutiveErrorLimit {limit}): {message}", at, acts)
        if promote is not None:
            promote = None  # consumed by this step
        elif step.pause is not None:
            duration = step.pause.duration_seconds
            elapsed = (at - (st.step_started_at or at)).total_seconds()
            if duration is None or elapsed < duration:
                st.phase = "Paused"
                st.message = (f"paused at {st.canary_weight}% " +
                              ("until rlops.dev/promote" if duration is None else f"for {duration - elapsed:.0f}s more"))
                return st, acts
        elif st.analysis is None or st.analysis.phase != "Successful" or st.analysis.step_index != st.current_step_index:
            st.phase = "Progressing"
            st.message = f"canary weight {st.canary_weight}%: analysis " + (
                f"{st.analysis.phase}{_errors_note(st.analysis, obs.agent_spec)}: {st.analysis.message}"
                if st.analysis else "pending")
            return st, acts
        st.current_step_index += 1
        st.step_started_at = at
        st.phase = "Progressing"

    # 6. promotion: the canary becomes stable and the old version leaves
    st.phase = "Promoting"
    st.canary_weight = 100
    st.current_step_index = len(steps) - 1
    return _promote(rollout, spec, st, obs, acts)


def _promote(
    rollout: dict[str, Any], spec: m.RolloutSpec, st: m.RolloutStatus, obs: Observed, acts: Actions
) -> tuple[m.RolloutStatus, Actions]:
    """Promotion, one safe stage per reconcile: all traffic to the canary (router user_config
    only); then the application without the old version; then, once RUNNING, Promoted."""
    at = obs.now
    full = weights_for(st.stable_version, spec.version, 100)
    final = {spec.version: {"artifactURI": spec.artifact_uri, "fingerprint": spec.fingerprint}}
    done = _deployed(obs, final, exactly=True)
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
        rollout=rollout["metadata"]["name"], mean_return=spec.evaluation.mean_return, promoted_at=at,
    )
    acts.events.append(Event("Normal", "Promoted", st.message))
    return st, acts
