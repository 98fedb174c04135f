"""The serving export: a network's class path plus its state dict, and the loader.

An artifact's ``policy.json`` names the network class (``"class": "rl_engine.ppo:Agent"`` or
``"rl_engine.dqn:QNetwork"``) and the constructor arguments; ``model.pt`` holds the
``state_dict``. The serving code rebuilds the class and loads the weights. This was chosen
over TorchScript because both load in about the same time (``hack/bench/policy_load.py``,
see ``docs/benchmarks.md``) and ``torch.jit`` is deprecated in torch 2.x; a state dict
also loads with ``weights_only=True`` (no pickled code).

Every network here has ``obs_dim``, ``num_actions``, ``action_scores(x) -> (B, A)`` (the
greedy action is their argmax) and ``act_greedy(x) -> (B,)``.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from .dqn import QNetwork
from .ppo import Agent

__all__ = ["NETWORK_CLASSES", "policy_spec", "network_from_spec", "load_agent"]

NETWORK_CLASSES: dict[str, type[nn.Module]] = {
    "rl_engine.ppo:Agent": Agent,
    "rl_engine.dqn:QNetwork": QNetwork,
}
"""Class paths an artifact may name (an allow-list: no arbitrary import from artifacts)."""


def policy_spec(network: nn.Module) -> dict[str, Any]:
    """JSON description needed to rebuild ``network`` before loading its weights."""
    for path, cls in NETWORK_CLASSES.items():
        if type(network) is cls:
            return {
                "class": path,
                "obsDim": network.obs_dim,
                "numActions": network.num_actions,
                "hiddenSizes": list(network.hidden_sizes),
                "activation": "tanh" if cls is Agent else "relu",
            }
    raise TypeError(f"no serving export for {type(network).__name__}")


def network_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Inverse of :func:`policy_spec` (fresh weights).

    Raises:
        ValueError: the class path is not in :data:`NETWORK_CLASSES`.
    """
    path = spec.get("class", "rl_engine.ppo:Agent")
    cls = NETWORK_CLASSES.get(path)
    if cls is None:
        raise ValueError(f"policy.json: unknown network class {path!r} (known: "
                         f"{', '.join(NETWORK_CLASSES)})")
    return cls(spec["obsDim"], spec["numActions"], tuple(spec["hiddenSizes"]))


def load_agent(uri: str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the trained network of an artifact (``policy.json`` + ``model.pt``).

    Args:
        uri: artifact root URI (fsspec), as written by ``python -m rl_engine.train``.
        device: where to put the network.

    Returns:
        The network in eval mode; ``act_greedy(obs (B, D))`` is the evaluated policy.

    Raises:
        rl_engine.artifacts.ArtifactError: ``policy.json`` or ``model.pt`` is missing.
        ValueError: ``policy.json`` names an unknown class.
    """
    from .artifacts import ArtifactStore

    store = ArtifactStore(uri)
    spec = store.read_json("policy.json")
    network = network_from_spec(spec)
    state = torch.load(io.BytesIO(store.read_bytes(spec.get("stateDict", "model.pt"))),
                       map_location=device, weights_only=True)
    network.load_state_dict(state)
    return network.to(device).eval()
