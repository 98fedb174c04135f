"""Canary analysis verdicts, pure: what was measured of a canary and its stable version, and
what it means (``judge``); observe mode's shadow counts and when a shadow graduates.

``analysis.py`` takes the measurements from Prometheus; ``canary.py`` acts on the verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rl_operator import models as m

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
