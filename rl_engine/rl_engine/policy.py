"""Load a trained policy for inference: :func:`load_policy` and :class:`Policy` (needs torch).

``load_policy(uri)`` rebuilds the network of an artifact written by ``python -m
rl_engine.train`` (``policy.json`` + ``model.pt``, see ``docs/trainer.md``) and wraps it as
a numpy-in, numpy-out deterministic policy: ``Policy.act(observations)`` is the argmax of
the actor's logits, the policy the trainer evaluated.

``load_verified_policy(uri, fingerprint)`` is what serving uses: it reads every file of the
artifact once (:func:`rl_engine.artifacts.read_artifact`), checks the fingerprint of those
bytes, and builds the policy from the same in-memory bytes, so no file is read twice and a
file swapped on the storage after the check is never loaded. Both loaders take bytes only
from the snapshot, refuse file names in the artifact's metadata that are absolute, contain
``..`` or are not fingerprinted, build only allow-listed network classes
(:data:`rl_engine.networks.NETWORK_CLASSES`) and load weights with ``weights_only=True``.

A policy whose outputs are not finite (e.g. NaN weights) raises :class:`NonFinitePolicyOutput`
instead of returning the argmax of NaNs (which would silently be action 0).
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch

from .artifacts import ArtifactError, ArtifactSnapshot, read_artifact
from .networks import network_from_spec

__all__ = ["Policy", "PolicyError", "InvalidObservation", "NonFinitePolicyOutput", "load_policy",
           "load_verified_policy", "policy_from_snapshot", "default_device"]


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
        fingerprint: the fingerprint of the bytes the policy was built from (``None`` when
            the artifact has no ``evaluation.json`` summary, so none can be computed).
    """

    def __init__(self, agent: torch.nn.Module, device: torch.device, uri: str,
                 observation_shape: tuple[int, ...] | None = None,
                 metadata: dict[str, Any] | None = None, fingerprint: str | None = None) -> None:
        self.agent = agent
        self.device = device
        self.uri = uri
        self.fingerprint = fingerprint
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


def policy_from_snapshot(snapshot: ArtifactSnapshot, device: str | torch.device | None = None) -> Policy:
    """Build the policy from the bytes of an artifact already read (no file is read here).

    Uses ``policy.json`` (network class from the allow-list and its constructor arguments),
    the weights file it names in ``stateDict`` (default ``model.pt``; loaded with
    ``torch.load(..., weights_only=True)``) and ``metadata.json`` when present.

    Args:
        snapshot: from :func:`rl_engine.artifacts.read_artifact`.
        device: torch device; ``None`` picks CUDA when present, else CPU.

    Returns:
        A :class:`Policy` in eval mode.

    Raises:
        rl_engine.artifacts.UnsafeArtifactReference: ``stateDict`` or a ``metadata.json``
            ``files`` entry is absolute, has ``..``, or names a file that is not fingerprinted.
        rl_engine.artifacts.ArtifactError: ``policy.json`` or the weights are missing or
            unreadable, the class is not allow-listed, or the weights do not fit the network.
    """
    dev = default_device() if device is None else torch.device(device)
    uri = snapshot.uri
    snapshot.check_metadata_references()
    spec = snapshot.json("policy.json")
    if not isinstance(spec, dict):
        raise ArtifactError(f"{uri}: policy.json must be an object")
    weights = snapshot.file(spec.get("stateDict", "model.pt"), where="policy.json stateDict")
    try:
        network = network_from_spec(spec)
        state = torch.load(io.BytesIO(weights), map_location=dev, weights_only=True)
        network.load_state_dict(state)
        agent = network.to(dev).eval()
    except Exception as err:  # noqa: BLE001 - torch.load raises many types (UnpicklingError, RuntimeError, ...)
        raise ArtifactError(f"{uri}: cannot load the policy: {type(err).__name__}: {err}") from err
    metadata = snapshot.json("metadata.json") if "metadata.json" in snapshot.files else {}
    if not isinstance(metadata, dict):
        metadata = {}
    shape = metadata.get("observationShape")
    try:
        fingerprint: str | None = snapshot.fingerprint()
    except ArtifactError:
        fingerprint = None
    return Policy(agent, dev, uri, tuple(shape) if shape else None, metadata, fingerprint)


def load_policy(uri: str, device: str | torch.device | None = None) -> Policy:
    """Load the policy of the artifact at ``uri`` (any fsspec URI), without checking a
    fingerprint. Each file is read once (:func:`rl_engine.artifacts.read_artifact`).

    Args:
        uri: artifact root, e.g. ``file:///data/runs/cartpole-1``.
        device: torch device; ``None`` picks CUDA when present, else CPU.

    Returns:
        A :class:`Policy` in eval mode.

    Raises:
        rl_engine.artifacts.ArtifactError: as :func:`policy_from_snapshot`, or the artifact
            has no files.
    """
    return policy_from_snapshot(read_artifact(uri), device)


def load_verified_policy(uri: str, fingerprint: str, device: str | torch.device | None = None) -> Policy:
    """Read the artifact once, check its fingerprint, and build the policy from those bytes.

    Every file under ``uri`` (except ``fingerprint.json``) is read exactly once; the
    fingerprint is computed over those bytes and the policy is built from them, so the
    policy served is the one whose fingerprint was checked, whatever happens to the storage.

    Args:
        uri: artifact root, e.g. ``file:///data/runs/cartpole-1``.
        fingerprint: the approved fingerprint, ``"sha256:<64 hex>"``.
        device: torch device; ``None`` picks CUDA when present, else CPU.

    Returns:
        A :class:`Policy` in eval mode, with ``policy.fingerprint == fingerprint``.

    Raises:
        rl_engine.artifacts.FingerprintMismatch: the bytes read have another fingerprint
            (the message names the artifact, both fingerprints, and the changed files).
        rl_engine.artifacts.ArtifactError: as :func:`policy_from_snapshot`, or no usable
            ``evaluation.json`` summary.
    """
    snapshot = read_artifact(uri)
    snapshot.verify(fingerprint)
    return policy_from_snapshot(snapshot, device)
