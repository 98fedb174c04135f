"""Load a trained policy for inference: :func:`load_policy` and :class:`Policy` (needs torch).

``load_policy(uri)`` rebuilds the network of an artifact written by ``python -m
rl_engine.train`` (``policy.json`` + ``model.pt``, see ``docs/trainer.md``) and wraps it as
a numpy-in, numpy-out deterministic policy: ``Policy.act(observations)`` is the argmax of
the actor's logits, the policy the trainer evaluated.

A policy whose outputs are not finite (e.g. NaN weights) raises :class:`NonFinitePolicyOutput`
instead of returning the argmax of NaNs (which would silently be action 0).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .artifacts import ArtifactError, ArtifactStore
from .networks import load_agent

__all__ = ["Policy", "PolicyError", "InvalidObservation", "NonFinitePolicyOutput", "load_policy", "default_device"]


class PolicyError(RuntimeError):
    """Base class of the errors :class:`Policy` raises."""


class InvalidObservation(PolicyError, ValueError):
    """The observations have the wrong shape, type, or non-finite values (the caller's fault)."""


class NonFinitePolicyOutput(PolicyError):
    """The network produced NaN/inf logits (the policy's fault, e.g. a corrupted artifact)."""


def default_device() -> torch.device:
    """``cuda`` when ``torch.cuda.is_available()``, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Policy:
    """A trained discrete-action policy, deterministic (argmax).

    Attributes:
        uri: the artifact it was loaded from.
        device: where the network runs.
        obs_dim: flattened observation size ``D``.
        observation_shape: the environment's observation shape (``(D,)`` for CartPole).
        num_actions: number of discrete actions ``A``.
        metadata: the artifact's ``metadata.json`` (``{}`` when absent).
    """

    def __init__(self, agent: torch.nn.Module, device: torch.device, uri: str,
                 observation_shape: tuple[int, ...] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self.agent = agent
        self.device = device
        self.uri = uri
        self.obs_dim = int(agent.obs_dim)
        self.num_actions = int(agent.num_actions)
        shape = tuple(int(s) for s in observation_shape) if observation_shape else (self.obs_dim,)
        if math.prod(shape) != self.obs_dim:
            shape = (self.obs_dim,)
        self.observation_shape = shape
        self.metadata = metadata or {}

    def __repr__(self) -> str:
        return f"Policy(uri={self.uri!r}, obs_dim={self.obs_dim}, num_actions={self.num_actions}, device={self.device})"

    def _as_batch(self, observations: Any) -> np.ndarray:
        try:
            arr = np.asarray(observations, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise InvalidObservation(f"observations are not numeric arrays: {err}") from None
        if arr.ndim >= 1 and arr.shape[1:] == self.observation_shape:
            batch = arr.reshape(arr.shape[0], self.obs_dim)
        elif arr.ndim == 2 and arr.shape[1] == self.obs_dim:
            batch = arr
        else:
            raise InvalidObservation(
                f"observations must have shape (batch, {self.obs_dim}) or (batch, *{list(self.observation_shape)}), "
                f"got {list(arr.shape)}")
        if not np.all(np.isfinite(batch)):
            raise InvalidObservation("observations contain NaN or infinite values")
        return batch

    def check_observation(self, observation: Any) -> np.ndarray:
        """Validate one observation (shape ``observation_shape`` or ``(D,)``); returns it as a
        flat float32 ``(D,)`` array. Raises :class:`InvalidObservation`."""
        try:
            arr = np.asarray(observation, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise InvalidObservation(f"observation is not a numeric array: {err}") from None
        if arr.shape != self.observation_shape and arr.shape != (self.obs_dim,):
            raise InvalidObservation(
                f"observation must have shape {list(self.observation_shape)}, got {list(arr.shape)}")
        if not np.all(np.isfinite(arr)):
            raise InvalidObservation("observation contains NaN or infinite values")
        return arr.reshape(self.obs_dim)

    @torch.no_grad()
    def logits(self, observations: Any) -> np.ndarray:
        """The actor's logits, ``(batch, A)`` float32, for observations ``(batch, D)``.
        Raises :class:`InvalidObservation` or :class:`NonFinitePolicyOutput`."""
        batch = self._as_batch(observations)
        x = torch.as_tensor(batch, device=self.device)
        out = self.agent.action_scores(x)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).any(dim=-1).sum())
            raise NonFinitePolicyOutput(
                f"policy {self.uri} produced non-finite logits for {bad} of {len(batch)} observations "
                f"(the artifact's weights are corrupt or the network diverged)")
        return out.float().cpu().numpy()

    def act(self, observations: Any) -> np.ndarray:
        """Deterministic actions ``argmax_a pi(a|s)``.

        Args:
            observations: ``(batch, D)`` (or ``(batch, *observation_shape)``) numbers.

        Returns:
            int64 actions, shape ``(batch,)``.

        Raises:
            InvalidObservation: wrong shape, non-numeric or non-finite observations.
            NonFinitePolicyOutput: the network's outputs are NaN/inf.
        """
        return self.logits(observations).argmax(axis=-1).astype(np.int64)


def load_policy(uri: str, device: str | torch.device | None = None) -> Policy:
    """Load the policy of the artifact at ``uri`` (any fsspec URI).

    Args:
        uri: artifact root, e.g. ``file:///data/runs/cartpole-1``.
        device: torch device; ``None`` picks CUDA when present, else CPU.

    Returns:
        A :class:`Policy` in eval mode.

    Raises:
        rl_engine.artifacts.ArtifactError: ``policy.json`` or ``model.pt`` is missing or
            unreadable, or the weights do not fit the network ``policy.json`` describes.
    """
    dev = default_device() if device is None else torch.device(device)
    try:
        agent = load_agent(uri, device=dev)
    except ArtifactError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.load raises many types (UnpicklingError, RuntimeError, ...)
        raise ArtifactError(f"{uri}: cannot load the policy: {type(err).__name__}: {err}") from err
    store = ArtifactStore(uri)
    try:
        metadata = store.read_json("metadata.json")
    except ArtifactError:
        metadata = {}
    shape = metadata.get("observationShape") if isinstance(metadata, dict) else None
    return Policy(agent, dev, uri, tuple(shape) if shape else None, metadata if isinstance(metadata, dict) else {})
