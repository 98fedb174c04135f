"""The Ray Serve application that serves an RLAgent's trained versions (see ``docs/serving.md``).

* :mod:`rl_engine.serving.config` (no ray, no torch): the application's ``args`` and the
  router's ``user_config`` schemas, request ids, feedback bodies, the shuffled-deck splitter.
* :mod:`rl_engine.serving.feedback_cap` (no ray, no torch): the cap on feedback per client
  (who a client is, its count per minute).
* :mod:`rl_engine.serving.app` (ray, torch): ``build_app(args)``, the ``router`` and
  ``policy-<version>`` deployments. Import path: ``rl_engine.serving.app:build_app``.
* :mod:`rl_engine.serving.testing`: helpers for tests and benchmarks (a NaN-poisoned copy of
  an artifact, a tiny echo application).

Importing this package imports neither ray nor torch.
"""
