"""Kubernetes-style conditions (metav1.Condition semantics) on the status models."""

from __future__ import annotations

from datetime import datetime

from rl_operator.models import Condition


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: str,
    reason: str,
    message: str,
    at: datetime,
    observed_generation: int | None = None,
) -> Condition:
    """Set the condition ``type_`` in place, and return it.

    ``lastTransitionTime`` moves to ``at`` only when ``status`` changes, as the API conventions
    require; reason, message and observedGeneration are always updated.
    """
    for cond in conditions:
        if cond.type == type_:
            if cond.status != status:
                cond.last_transition_time = at
            cond.status, cond.reason, cond.message = status, reason, message
            cond.observed_generation = observed_generation
            return cond
    cond = Condition(
        type=type_, status=status, reason=reason, message=message,
        last_transition_time=at, observed_generation=observed_generation,
    )
    conditions.append(cond)
    return cond


def get_condition(conditions: list[Condition], type_: str) -> Condition | None:
    """The condition of this type, or None."""
    return next((c for c in conditions if c.type == type_), None)
