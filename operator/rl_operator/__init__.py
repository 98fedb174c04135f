"""rlops operator: the kopf controller for RLAgent, TrainingRun and Rollout (``rlops.dev/v1alpha1``).

Layers, top to bottom: ``handlers`` (kopf registration) -> ``training`` (pure decisions) ->
``kube`` (the Kubernetes adapter) and ``models`` (the API types). Lower layers never import
higher ones. This package never imports torch.
"""
