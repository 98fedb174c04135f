"""Schemas and pure helpers of the serving application (no ray, no torch).

* :func:`parse_args`: the application ``args`` of the declarative Serve config ->
  :class:`ServingConfig`.
* :func:`parse_weights`: the router's ``user_config`` -> ``{version: percent}``.
* :func:`make_request_id` / :func:`parse_request_id`: request ids that name the version
  that answered (``<version>.<32 hex>``), so feedback needs no state shared across replicas.
* :func:`parse_observation`, :func:`parse_feedback`: HTTP bodies, with 400-worthy errors.
* :class:`WeightedDeck`: the traffic splitter.

Every error raised here is a :class:`ServingConfigError` or :class:`BadRequest` (both
``ValueError``) whose message names the offending field.
"""

from __future__ import annotations

import math
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

__all__ = [
    "VERSION_RE",
    "ServingConfigError",
    "BadRequest",
    "VersionSpec",
    "ServingConfig",
    "parse_args",
    "parse_weights",
    "make_request_id",
    "parse_request_id",
    "parse_observation",
    "Feedback",
    "parse_feedback",
    "WeightedDeck",
    "policy_deployment_name",
    "ROUTER_DEPLOYMENT",
]

#: Name of the ingress deployment.
ROUTER_DEPLOYMENT = "router"
#: A version name: letters, digits, ``.``, ``_``, ``-``; starts and ends alphanumeric; <= 63.
VERSION_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_ARGS_KEYS = {"agent", "namespace", "versions", "maxBatchSize", "batchWaitTimeoutS", "policyNumCpus", "policyNumGpus"}
_VERSION_KEYS = {"artifactURI", "fingerprint"}
_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ServingConfigError(ValueError):
    """Invalid application ``args`` or router ``user_config``; the message names the field."""


class BadRequest(ValueError):
    """A malformed HTTP request body (answered with 400); the message names the field."""


def policy_deployment_name(version: str) -> str:
    """``policy-<version>``."""
    return f"policy-{version}"


@dataclass(frozen=True)
class VersionSpec:
    """One servable version: its artifact and (optionally) the fingerprint it must have."""

    name: str
    artifact_uri: str
    fingerprint: str | None = None


@dataclass(frozen=True)
class ServingConfig:
    """The parsed application ``args``.

    Attributes:
        agent, namespace: the RLAgent (metric labels ``agent``, ``namespace``).
        versions: version name -> :class:`VersionSpec` (at least one).
        max_batch_size: ``@serve.batch`` max batch size of each policy deployment.
        batch_wait_timeout_s: ``@serve.batch`` wait for a batch to fill (seconds).
        policy_num_cpus: ``ray_actor_options.num_cpus`` of each policy replica.
        policy_num_gpus: ``ray_actor_options.num_gpus`` of each policy replica (Ray hides
            GPUs from actors that request none, so set it > 0 to serve on CUDA).
    """

    agent: str
    namespace: str
    versions: dict[str, VersionSpec]
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.002
    policy_num_cpus: float = 0.0
    policy_num_gpus: float = 0.0


def _number(value: Any, path: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ServingConfigError(f"{path}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ServingConfigError(f"{path}: must be finite, got {value!r}")
    return value


def parse_args(args: Mapping[str, Any]) -> ServingConfig:
    """Validate the application ``args``.

    Example::

        {"agent": "cartpole", "namespace": "default",
         "versions": {"cartpole-1": {"artifactURI": "file:///...", "fingerprint": "sha256:..."}},
         "maxBatchSize": 32, "batchWaitTimeoutS": 0.002}

    Raises:
        ServingConfigError: naming the field, e.g. ``args.versions.v1.artifactURI: required``.
    """
    if not isinstance(args, Mapping):
        raise ServingConfigError(f"args: must be an object, got {type(args).__name__}")
    errors: list[str] = []
    for key in sorted(set(args) - _ARGS_KEYS):
        errors.append(f"args.{key}: unknown field")
    for key in ("agent", "namespace"):
        if not isinstance(args.get(key), str) or not args.get(key):
            errors.append(f"args.{key}: required, a non-empty string")
    versions: dict[str, VersionSpec] = {}
    raw_versions = args.get("versions")
    if not isinstance(raw_versions, Mapping) or not raw_versions:
        errors.append("args.versions: required, an object with at least one version")
    else:
        for name, spec in raw_versions.items():
            path = f"args.versions.{name}"
            if not isinstance(name, str) or not VERSION_RE.match(name):
                errors.append(f"{path}: invalid version name (letters, digits, '.', '_', '-'; "
                              f"alphanumeric at both ends; at most 63 characters)")
                continue
            if not isinstance(spec, Mapping):
                errors.append(f"{path}: must be an object with artifactURI (and fingerprint)")
                continue
            for key in sorted(set(spec) - _VERSION_KEYS):
                errors.append(f"{path}.{key}: unknown field")
            uri = spec.get("artifactURI")
            if not isinstance(uri, str) or not uri:
                errors.append(f"{path}.artifactURI: required, a non-empty string")
                continue
            fp = spec.get("fingerprint")
            if fp is not None and (not isinstance(fp, str) or not _FINGERPRINT_RE.match(fp)):
                errors.append(f"{path}.fingerprint: must be 'sha256:' and 64 lowercase hex digits, got {fp!r}")
                continue
            versions[name] = VersionSpec(name, uri, fp)
    values: dict[str, Any] = {}
    for key, attr, integer, lo, hi, default in (
        ("maxBatchSize", "max_batch_size", True, 1, 4096, 32),
        ("batchWaitTimeoutS", "batch_wait_timeout_s", False, 0.0, 10.0, 0.002),
        ("policyNumCpus", "policy_num_cpus", False, 0.0, 1024.0, 0.0),
        ("policyNumGpus", "policy_num_gpus", False, 0.0, 64.0, 0.0),
    ):
        raw = args.get(key, default)
        try:
            v = _number(raw, f"args.{key}", integer=integer)
        except ServingConfigError as err:
            errors.append(str(err))
            continue
        if not lo <= v <= hi:
            errors.append(f"args.{key}: must be in [{lo}, {hi}], got {raw!r}")
            continue
        values[attr] = v
    if errors:
        raise ServingConfigError("; ".join(errors))
    return ServingConfig(agent=args["agent"], namespace=args["namespace"], versions=versions, **values)


def parse_weights(user_config: Any, versions: Any) -> dict[str, int]:
    """Validate the router's ``user_config`` against the served versions.

    ``{"weights": {"<version>": <percent>, ...}}``: integers in [0, 100] summing to 100;
    versions of the application missing from ``weights`` get 0; naming a version the
    application does not serve is an error.

    Returns:
        ``{version: percent}`` for every served version (in ``versions`` order).

    Raises:
        ServingConfigError: naming the field, e.g. ``user_config.weights: must sum to 100, got 90``.
    """
    names = list(versions)
    if not isinstance(user_config, Mapping):
        raise ServingConfigError(f"user_config: must be an object with 'weights', got {user_config!r}")
    unknown = sorted(set(user_config) - {"weights"})
    if unknown:
        raise ServingConfigError(f"user_config.{unknown[0]}: unknown field")
    weights = user_config.get("weights")
    if not isinstance(weights, Mapping):
        raise ServingConfigError(f"user_config.weights: required, an object version -> percent, got {weights!r}")
    out = {name: 0 for name in names}
    for version, w in weights.items():
        if version not in out:
            raise ServingConfigError(
                f"user_config.weights.{version}: not a version of this application (versions: {', '.join(names)})")
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 100:
            raise ServingConfigError(f"user_config.weights.{version}: must be an integer percent in [0, 100], got {w!r}")
        out[version] = w
    total = sum(out.values())
    if total != 100:
        raise ServingConfigError(f"user_config.weights: must sum to 100, got {total}")
    return out


def make_request_id(version: str) -> str:
    """``<version>.<uuid4 hex>``: the id names the version that answered."""
    return f"{version}.{uuid.uuid4().hex}"


def parse_request_id(request_id: Any) -> str:
    """The version a request id names. Raises :class:`BadRequest` when malformed."""
    if not isinstance(request_id, str):
        raise BadRequest(f"request_id: required, a string, got {request_id!r}")
    version, dot, tail = request_id.rpartition(".")
    if not dot or not VERSION_RE.match(version) or not _HEX32.match(tail):
        raise BadRequest(f"request_id: malformed {request_id[:200]!r} (expected '<version>.<32 hex digits>')")
    return version


def parse_observation(body: Any, max_values: int = 1 << 16) -> np.ndarray:
    """The ``observation`` of a ``{"observation": [...]}`` body as a float32 array.

    Raises:
        BadRequest: not an object, no ``observation``, not a (nested) list of finite
            numbers, empty, ragged, or more than ``max_values`` numbers.
    """
    if not isinstance(body, Mapping):
        raise BadRequest('body: must be a JSON object {"observation": [...]}')
    if "observation" not in body:
        raise BadRequest("observation: required")
    obs = body["observation"]
    if not isinstance(obs, list) or not obs:
        raise BadRequest("observation: must be a non-empty array of numbers")
    try:
        arr = np.asarray(obs, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadRequest("observation: must be a (nested) array of numbers with a regular shape") from None
    if arr.dtype == object or arr.size == 0:
        raise BadRequest("observation: must be a (nested) array of numbers with a regular shape")
    if arr.size > max_values:
        raise BadRequest(f"observation: too large ({arr.size} numbers, at most {max_values})")
    if _has_bool(obs):
        raise BadRequest("observation: must contain numbers, not booleans")
    if not np.all(np.isfinite(arr)):
        raise BadRequest("observation: contains NaN or infinite values")
    return arr


def _has_bool(values: list) -> bool:
    stack = [values]
    while stack:
        for v in stack.pop():
            if isinstance(v, bool):
                return True
            if isinstance(v, list):
                stack.append(v)
    return False


@dataclass(frozen=True)
class Feedback:
    """A parsed ``POST <route>/feedback`` body."""

    request_id: str
    version: str
    reward: float
    negative: bool = False


def parse_feedback(body: Any, versions: Any) -> Feedback:
    """Validate ``{"request_id": str, "reward": number, "negative": bool (optional)}``.

    Raises:
        BadRequest: naming the field; also when the request id names a version this
            application does not serve (so clients cannot create metric series at will).
    """
    if not isinstance(body, Mapping):
        raise BadRequest('body: must be a JSON object {"request_id": ..., "reward": ...}')
    unknown = sorted(set(body) - {"request_id", "reward", "negative"})
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field")
    version = parse_request_id(body.get("request_id"))
    if version not in versions:
        raise BadRequest(f"request_id: names version {version!r}, which this application does not serve")
    reward = body.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise BadRequest(f"reward: required, a number, got {reward!r}")
    if not math.isfinite(reward):
        raise BadRequest("reward: must be finite")
    negative = body.get("negative", False)
    if not isinstance(negative, bool):
        raise BadRequest(f"negative: must be a boolean, got {negative!r}")
    return Feedback(body["request_id"], version, float(reward), negative)


@dataclass
class WeightedDeck:
    """Weighted random choice, drawn without replacement from a shuffled deck of 100 cards.

    Each version has as many cards as its percent. Every draw is random, and every 100
    consecutive draws follow the weights exactly, so the split a router replica produces
    never wanders far from the target (a plain weighted coin over 1000 requests at 50/50
    strays by more than 3 points one time in 17). A new set of weights starts a new deck.
    """

    weights: Mapping[str, int]
    rng: random.Random = field(default_factory=random.Random)
    _deck: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.weights = dict(self.weights)
        self.cards = [v for v, w in self.weights.items() for _ in range(w)]

    def draw(self) -> str | None:
        """A version, or None when no version has a positive weight."""
        if not self.cards:
            return None
        if not self._deck:
            self._deck = list(self.cards)
            self.rng.shuffle(self._deck)
        return self._deck.pop()
