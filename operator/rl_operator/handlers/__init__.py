"""kopf registration, by resource: thin handlers that read the world, call the pure decisions,
write results. ``agents`` (RLAgent), ``runs`` (TrainingRun, its Jobs and pods), ``rollouts``
(Rollout), ``receivers`` (alerts, audit), ``startup`` (start-up, shutdown, the loops); the
process's state is ``runtime.RUNTIME``; ``common`` holds what they share.

Order of operations for training (one place):

1. RLAgent created / spec changed / operator resumed -> ensure TrainingRun ``<agent>-<generation>``
   and, for a run just made, its Job at once.
2. TrainingRun created / resumed -> ensure Job ``<run>``.
3. Job or pod event, or the operator-wide resync of unfinished runs -> ``sync_run``: observe Job + pods into the run's
   status, then ``sync_agent``: observe the agent's runs into the agent's status.
4. A run Succeeded whose evaluation meets the agent's bar -> ensure Rollout ``<run>``.
5. Rollout created / annotated / every ``rollout_interval_seconds`` while in progress ->
   ``reconcile_rollout``: observe (annotations, the agent, Ray Serve, a Prometheus analysis
   when one is due), run ``rollout.reconcile``, then act: weights, deploys, annotations, the
   agent's ``activeModel``, the Rollout's status and Events.
6. Alertmanager -> the receiver -> ``on_alert`` -> ``abort_agent_rollout`` (weight 0 at once).

Admission: ``admission.decide`` reviews approval annotations on Rollouts (``approvals.review``
plus a SubjectAccessReview), served over HTTPS by ``rl_operator.admission`` in a thread of its
own (reconcile load cannot starve it), failing closed, and called by the API server only when
an approval annotation changes (a CEL matchCondition).

Every step is idempotent (deterministic names, create-or-get), so an operator killed at any
point and restarted converges to the same objects: no duplicate runs, no duplicate Jobs.
"""

from __future__ import annotations

# importing the modules registers their handlers with kopf, in this order
from rl_operator.handlers import common, runtime  # noqa: F401
from rl_operator.handlers import startup, agents, runs, rollouts, receivers  # noqa: F401
from rl_operator.handlers.runtime import RUNTIME

__all__ = ["RUNTIME", "agents", "common", "receivers", "rollouts", "runs", "runtime", "startup"]
