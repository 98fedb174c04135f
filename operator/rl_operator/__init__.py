"""rlops operator: the kopf controller for RLAgent, TrainingRun and Rollout (``rlops.dev/v1alpha1``).

Layers, top to bottom: ``handlers`` (kopf registration and I/O glue, by resource) -> the pure
decisions (``training``, ``evaluation``, ``triggers``, ``rollout``/``canary``/``traffic``/``verdicts``,
``approvals``) beside the adapters (``kube``, ``cache``, ``rayserve``, ``analysis``, ``alerts``,
``admission``, ``jetstream``) -> ``models``, ``objects``, ``conditions`` and ``settings``. Lower
layers never import higher ones; ``docs/architecture.md`` has the import graph, drawn from the
code (``hack/import_graph.py``). This package never imports torch.
"""
