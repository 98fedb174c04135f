"""Rollout decisions: approval, canary steps, analysis gates, promotion and abort. Pure, no I/O.

``reconcile`` is the whole order of operations for one Rollout, in the manner of Argo Rollouts'
``rollout/canary.go``: the stages in :data:`STAGES`, in that order, each a small function of the
reconcile in progress (:class:`Pass`) that returns the verdict ending it (the status to write and
the actions to take) or None to go on. ``handlers`` gathers the observed world (annotations, the agent,
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

from collections.abc import Callable
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

    The stages of :data:`STAGES`, until one returns a verdict: finished → trust → abort
    (annotation, open circuit breaker) → superseded → rejected → shadow (observe mode) → approval
    → serving disabled → queueing behind another rollout → kill switch → start → promotion under
    way → deploy the canary beside stable → the steps (setWeight / pause, with the analysis gate)
    → promotion. Then the
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
        return _untrusted(st, spec, p.obs.untrusted, p.at, p.acts)
    if st.approval is not None and st.approval.fingerprint != spec.fingerprint:
        return _untrusted(st, spec, f"status.approval names {st.approval.fingerprint}, not this Rollout's "
                                    f"artifact {spec.fingerprint}", p.at, p.acts)
    return None


def abort_requested(p: Pass) -> Verdict | None:
    """``rlops.dev/abort``, whatever the phase, or the router's open circuit breaker during the canary."""
    if ABORT in p.ann:
        return _abort(p.st, p.spec, f"aborted by annotation: {p.ann[ABORT] or 'no reason given'}", p.at, p.acts)
    if p.obs.circuit_open is not None and p.st.phase in ("Progressing", "Paused"):
        return _abort(p.st, p.spec, f"circuit breaker open: {p.obs.circuit_open}", p.at, p.acts)
    return None


def _closed_before_approval(p: Pass, phase: str, why: str, message: str, event: Event) -> Verdict:
    """End an unapproved Rollout in ``phase`` (also the Approved condition's reason, ``why`` its message)."""
    st = p.st
    st.phase, st.completed_at, st.message = phase, p.at, message
    set_condition(st.conditions, "Approved", "False", phase, why, p.at)
    p.acts.events.append(event)
    _end_shadow(st, p.spec, p.acts)
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
    return _shadow(p.spec, p.st, p.obs, p.acts) if p.st.approval is None else None


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
        return _freeze(st, p.spec, p.obs, p.at, p.acts)
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
    return None if _serving_ready(p.spec, p.st, p.obs, p.acts, weights, "canary") else p.done()


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
        return _abort(st, p.spec, f"analysis failed at {st.canary_weight}%: {message}", p.at, p.acts)
    limit = p.obs.agent_spec.canary.analysis.consecutive_error_limit
    if errors > limit:
        return _abort(st, p.spec, f"analysis could not measure {errors} times in a row at {st.canary_weight}% "
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
        f"{st.analysis.phase}{_errors_note(st.analysis, p.obs.agent_spec)}: {st.analysis.message}"
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


def _pipeline(rollout: dict[str, Any], obs: Observed) -> Verdict:
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
        rollout=p.rollout["metadata"]["name"], mean_return=spec.evaluation.mean_return, promoted_at=at,
    )
    acts.events.append(Event("Normal", "Promoted", st.message))
    return st, acts
