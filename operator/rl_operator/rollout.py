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

from typing import Any

from rl_operator import canary, traffic
from rl_operator import models as m
from rl_operator.traffic import ACTIVE, Actions, Observed
from rl_operator.evaluation import rollout_evaluation
from rl_operator.objects import owner_reference

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

def reconcile(rollout: dict[str, Any], obs: Observed) -> tuple[m.RolloutStatus, Actions]:
    """One reconcile of a Rollout: the whole canary order of operations.

    The stages of :data:`canary.STAGES`, until one returns a verdict: finished → trust → abort
    (annotation, open circuit breaker) → superseded → rejected → shadow (observe mode) → approval
    → serving disabled → queueing behind another rollout → kill switch → start → promotion under
    way → deploy the canary beside stable → the steps (setWeight / pause, with the analysis gate)
    → promotion. Then the
    router's ``user_config`` besides the weights (:func:`traffic.router_extras`) follows the new state:
    set with the weights or the deploy, or on its own when only it differs from what runs.

    Args:
        rollout: the Rollout object (its ``status`` is the progress so far: a restart resumes it).
        obs: the observed world.
    Returns:
        ``(status, actions)``.
    """
    st, acts = canary.run(rollout, obs)
    version = rollout["spec"]["version"]
    acts.router_extras = traffic.router_extras(st, version, obs.agent_spec)
    if (acts.set_weights is None and acts.deploy is None and st.phase in ACTIVE and obs.serving_weights
            and obs.serving_extras is not None and obs.serving_extras != acts.router_extras):
        acts.set_weights = dict(obs.serving_weights)
    return st, acts
