"""Schemas and pure helpers of the serving application (no ray, no torch).

* :func:`parse_args`: the application ``args`` of the declarative Serve config ->
  :class:`ServingConfig`.
* :func:`parse_weights`: the router's ``user_config`` -> ``{version: percent}``;
  :func:`parse_router_config`: the whole ``user_config`` (weights, shadow or override
  baseline, circuit breaker) -> :class:`RouterConfig`.
* :class:`CircuitBreaker`: consecutive failures of the versions it guards, and when it opens.
* :class:`ComparisonLedger`: the answers on which the compared versions disagreed, until
  their feedback judges who was right.
* :func:`make_request_id` / :func:`parse_request_id`: request ids that name the version
  that answered and when, signed with the application's feedback key (HMAC-SHA256), so that
  feedback can be credited without state shared across replicas and cannot be forged.
* :func:`parse_observation`, :func:`parse_feedback`: HTTP bodies, with 400-worthy errors.
* :class:`FeedbackLedger`: the ids already credited, so each is credited at most once.
* :class:`WeightedDeck`: the traffic splitter.

Every error raised here is a :class:`ServingConfigError` or :class:`BadRequest` (both
``ValueError``) whose message names the offending field.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import random
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..artifacts import uri_parts
# the names the operator writes and reads too (router, versions, args fields): one home
from .contract import (
    ARGS_KEYS as _ARGS_KEYS,
    DEFAULT_FEEDBACK_PER_CLIENT_PER_MINUTE,
    FEEDBACK_KEYS as _FEEDBACK_KEYS,
    BASELINE_KEY,
    BREAKER_KEY,
    BREAKER_KEYS as _BREAKER_KEYS,
    ROUTER_DEPLOYMENT,
    SHADOW_KEY,
    USER_CONFIG_KEYS as _USER_CONFIG_KEYS,
    VERSION_KEYS as _VERSION_KEYS,
    VERSION_RE,
    WEIGHTS_KEY,
    feedback_cap_errors,
    policy_deployment_name,
)

__all__ = [
    "VERSION_RE",
    "ServingConfigError",
    "BadRequest",
    "DuplicateFeedback",
    "FeedbackUnavailable",
    "VersionSpec",
    "FeedbackConfig",
    "REWARD_BUCKETS",
    "ServingConfig",
    "parse_args",
    "parse_weights",
    "RouterConfig",
    "parse_router_config",
    "CircuitBreaker",
    "ComparisonLedger",
    "make_request_id",
    "parse_request_id",
    "RequestId",
    "parse_observation",
    "Feedback",
    "parse_feedback",
    "FeedbackLedger",
    "WeightedDeck",
    "policy_deployment_name",
    "ROUTER_DEPLOYMENT",
]

_KEY_RE = re.compile(r"^[0-9a-f]{32,256}$")
_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ServingConfigError(ValueError):
    """Invalid application ``args`` or router ``user_config``; the message names the field."""


class BadRequest(ValueError):
    """A malformed HTTP request body (answered with 400); the message names the field."""


class DuplicateFeedback(ValueError):
    """Feedback for a request id that was already credited (answered with 409)."""


class FeedbackUnavailable(RuntimeError):
    """Feedback cannot be taken at all (answered with 503): no feedback key is configured,
    or the ledger of credited ids is full."""


@dataclass(frozen=True)
class VersionSpec:
    """One servable version: its artifact and (optionally) the fingerprint it must have."""

    name: str
    artifact_uri: str
    fingerprint: str | None = None


#: How long after an answer its feedback is accepted, by default (seconds; ``args.feedback.ttlSeconds``).
DEFAULT_FEEDBACK_TTL_S = 600
#: Longest ``args.feedback.ttlSeconds`` (seconds).
MAX_FEEDBACK_TTL_S = 86400
#: A request id issued up to this many seconds "in the future" is accepted (clock differences
#: between router replicas on different nodes).
CLOCK_SKEW_S = 60
#: Upper bounds of the ``rlops_serve_feedback_reward_scaled`` histogram, in units of the
#: declared reward range (0 = ``rewardMin``, 1 = ``rewardMax``): 0.025, 0.075, ..., 0.975.
#: With the ``+Inf`` bucket that is 21 buckets, each centred on a multiple of 1/20 of the
#: range (0, 0.05, ..., 1), so a reward on that grid (the ends, the middle, quarters, fifths,
#: tenths of the range) is recovered exactly from its bucket, whatever the exporter does with
#: a value on a bucket bound; any other reward is off by at most 1/40 of the range.
REWARD_BUCKETS: tuple[float, ...] = tuple((2 * i + 1) / 40 for i in range(20))


@dataclass(frozen=True)
class FeedbackConfig:
    """``args.feedback``: how request ids are signed and which feedback is accepted.

    Attributes:
        key: the HMAC-SHA256 key of this application's request ids (the bytes of
            ``args.feedback.key``, 32 to 256 hex digits). ``None``: no key was configured,
            and every feedback is refused with 503 (fail closed: unsigned feedback would let
            anyone who reaches the endpoint steer the canary analysis).
        reward_min, reward_max: the declared range of the feedback reward (reward units,
            ``min < max``, both finite); a reward outside it is refused with 400.
        ttl_seconds: feedback is accepted for this many seconds after the answer.
        per_client_per_minute: feedbacks one client may send to one router replica per minute
            (``perClientPerMinute``); more get 429 and are not counted. 0: no cap.
        client_header: ``clientHeader``: ``""``, the client is the request's source address;
            else the name of the HTTP header (set by a trusted gateway) whose value names the
            client (:func:`rl_engine.serving.feedback_cap.client_key`).
    """

    key: bytes | None = field(default=None, repr=False)
    reward_min: float = -1.0
    reward_max: float = 1.0
    ttl_seconds: int = DEFAULT_FEEDBACK_TTL_S
    per_client_per_minute: int = DEFAULT_FEEDBACK_PER_CLIENT_PER_MINUTE
    client_header: str = ""

    def scaled(self, reward: float) -> float:
        """The reward's position in the declared range, ``(reward - min) / (max - min)``,
        clipped to [0, 1] (unitless; the value observed by the reward histogram)."""
        x = (float(reward) - self.reward_min) / (self.reward_max - self.reward_min)
        return min(1.0, max(0.0, x))


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
        artifact_root: ``args.artifactRoot`` (``None`` when not given): every version's
            artifact URI is under ``<artifact_root>/<namespace>/<agent>/``.
        feedback: ``args.feedback`` (:class:`FeedbackConfig`; without it, no key: feedback
            is refused with 503).
    """

    agent: str
    namespace: str
    versions: dict[str, VersionSpec]
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.002
    policy_num_cpus: float = 0.0
    policy_num_gpus: float = 0.0
    artifact_root: str | None = None
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)


def _check_under_root(errors: list[str], args: Mapping[str, Any], versions: Mapping[str, VersionSpec]) -> str | None:
    root = args.get("artifactRoot")
    if root is None:
        return None
    if not isinstance(root, str) or not root:
        errors.append(f"args.artifactRoot: must be a non-empty fsspec URI, got {root!r}")
        return None
    try:
        root_scheme, root_parts = uri_parts(root)
    except ValueError as err:
        errors.append(f"args.artifactRoot: {root!r}: {err}")
        return None
    namespace, agent = args.get("namespace"), args.get("agent")
    if not isinstance(namespace, str) or not isinstance(agent, str) or not namespace or not agent:
        return root  # reported above
    for key, value in (("namespace", namespace), ("agent", agent)):
        if "/" in value or "\\" in value or value in (".", ".."):
            errors.append(f"args.{key}: must be a single path segment when artifactRoot is set, got {value!r}")
            return root
    expected = root.rstrip("/") + f"/{namespace}/{agent}/"
    prefix = root_parts + [namespace, agent]
    for name, spec in versions.items():
        path = f"args.versions.{name}.artifactURI"
        try:
            scheme, parts = uri_parts(spec.artifact_uri)
        except ValueError as err:
            errors.append(f"{path}: {spec.artifact_uri!r}: {err}")
            continue
        if scheme != root_scheme or len(parts) <= len(prefix) or parts[:len(prefix)] != prefix:
            errors.append(f"{path}: {spec.artifact_uri!r} is outside this agent's artifact directory: "
                          f"version {name} must be under {expected!r}")
    return root


def _number(value: Any, path: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ServingConfigError(f"{path}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ServingConfigError(f"{path}: must be finite, got {value!r}")
    return value


def _parse_feedback_args(errors: list[str], raw: Any) -> FeedbackConfig:
    """``args.feedback`` -> :class:`FeedbackConfig` (absent: no key, default range and TTL)."""
    if raw is None:
        return FeedbackConfig()
    if not isinstance(raw, Mapping):
        errors.append("args.feedback: must be an object with key, rewardMin, rewardMax, ttlSeconds, "
                      f"perClientPerMinute, clientHeader, got {raw!r}")
        return FeedbackConfig()
    bad = len(errors)
    for k in sorted(set(raw) - _FEEDBACK_KEYS, key=str):
        errors.append(f"args.feedback.{k}: unknown field")
    key = raw.get("key")
    if key is not None and (not isinstance(key, str) or not _KEY_RE.match(key) or len(key) % 2):
        # Never echo the value: it is a secret.
        errors.append("args.feedback.key: must be an even number (32 to 256) of lowercase hex digits")
    values: dict[str, float] = {}
    for name, default, integer in (("rewardMin", -1.0, False), ("rewardMax", 1.0, False),
                                   ("ttlSeconds", DEFAULT_FEEDBACK_TTL_S, True)):
        try:
            values[name] = _number(raw.get(name, default), f"args.feedback.{name}", integer=integer)
        except ServingConfigError as err:
            errors.append(str(err))
    if "rewardMin" in values and "rewardMax" in values and not values["rewardMin"] < values["rewardMax"]:
        errors.append(f"args.feedback: rewardMin ({values['rewardMin']}) must be less than rewardMax "
                      f"({values['rewardMax']})")
    if "ttlSeconds" in values and not 1 <= values["ttlSeconds"] <= MAX_FEEDBACK_TTL_S:
        errors.append(f"args.feedback.ttlSeconds: must be in [1, {MAX_FEEDBACK_TTL_S}], got {values['ttlSeconds']!r}")
    per_minute = raw.get("perClientPerMinute", DEFAULT_FEEDBACK_PER_CLIENT_PER_MINUTE)
    header = raw.get("clientHeader", "")
    errors += [f"args.feedback.{e}" for e in feedback_cap_errors(per_minute, header)]
    if len(errors) > bad:
        return FeedbackConfig()
    return FeedbackConfig(key=bytes.fromhex(key) if key is not None else None,
                          reward_min=float(values["rewardMin"]), reward_max=float(values["rewardMax"]),
                          ttl_seconds=int(values["ttlSeconds"]), per_client_per_minute=per_minute,
                          client_header=header)


def parse_args(args: Mapping[str, Any]) -> ServingConfig:
    """Validate the application ``args``.

    Example::

        {"agent": "cartpole", "namespace": "default",
         "versions": {"cartpole-1": {"artifactURI": "file:///...", "fingerprint": "sha256:..."}},
         "maxBatchSize": 32, "batchWaitTimeoutS": 0.002,
         "artifactRoot": "file:///var/lib/rlops/artifacts",
         "feedback": {"key": "<64 hex>", "rewardMin": -1.0, "rewardMax": 1.0, "ttlSeconds": 600,
                      "perClientPerMinute": 600, "clientHeader": ""}}

    ``artifactRoot`` (optional, an fsspec URI): when given, each version's ``artifactURI``
    must have the same scheme and sit strictly under ``<artifactRoot>/<namespace>/<agent>/``,
    compared by path components (one trailing ``/`` ignored); URIs with ``..``, ``.`` or
    empty components, chained URIs (``::``) and ``file://host/`` URIs are refused.

    ``feedback`` (optional, :class:`FeedbackConfig`): ``key`` (32 to 256 hex digits: the
    HMAC-SHA256 key of the request ids; without it every feedback is refused with 503),
    ``rewardMin`` < ``rewardMax`` (finite, reward units; default -1 and 1), ``ttlSeconds``
    (integer in [1, 86400], default 600), ``perClientPerMinute`` (integer in [0, 1000000],
    default 600, 0: no cap: feedbacks one client may send to one router replica per minute),
    ``clientHeader`` (``""``: the client is the source address; else an HTTP header name).
    Error messages never repeat the key.

    Raises:
        ServingConfigError: naming the field, e.g. ``args.versions.v1.artifactURI: required``,
            or ``args.versions.v1.artifactURI: ... version v1 must be under
            'file:///var/lib/rlops/artifacts/default/cartpole/'``.
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
    artifact_root = _check_under_root(errors, args, versions)
    feedback = _parse_feedback_args(errors, args.get("feedback"))
    if errors:
        raise ServingConfigError("; ".join(errors))
    return ServingConfig(agent=args["agent"], namespace=args["namespace"], versions=versions,
                         artifact_root=artifact_root, feedback=feedback, **values)


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
    unknown = sorted(set(user_config) - _USER_CONFIG_KEYS)
    if unknown:
        raise ServingConfigError(f"user_config.{unknown[0]}: unknown field")
    weights = user_config.get(WEIGHTS_KEY)
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


_REQUEST_ID_DOMAIN = "rlops.request-id.v1"
_ISSUED_RE = re.compile(r"^(0|[1-9][0-9]{0,11})$")
_NONCE_RE = re.compile(r"^[0-9a-f]{16}$")
_SIGNATURE_RE = re.compile(r"^[0-9a-f]{32}$")
_REQUEST_ID_FORMAT = "'<version>.<issued>.<nonce>.<signature>', as returned by a predict call"


def _signature(key: bytes, scope: str, version: str, issued: str, nonce: str) -> str:
    message = "\x00".join((_REQUEST_ID_DOMAIN, scope, version, issued, nonce)).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def make_request_id(version: str, key: bytes, *, scope: str = "", issued_at: float | None = None) -> str:
    """A signed request id: ``<version>.<issued>.<nonce>.<signature>``.

    ``issued`` is the Unix time in whole seconds (decimal), ``nonce`` 16 random hex digits,
    ``signature`` the first 32 hex digits (128 bits) of HMAC-SHA256 under ``key`` of
    ``scope``, ``version``, ``issued`` and ``nonce``. The id names the version that answered
    and when, and only a holder of the key can make one.

    Args:
        version: the version that answered.
        key: the application's feedback key (bytes).
        scope: binds the id to one application (the router uses ``<namespace>/<agent>``).
        issued_at: Unix time in seconds (default: now).
    """
    issued = str(int(time.time() if issued_at is None else issued_at))
    nonce = secrets.token_hex(8)
    return f"{version}.{issued}.{nonce}.{_signature(key, scope, version, issued, nonce)}"


@dataclass(frozen=True)
class RequestId:
    """A verified request id: the version that answered, and when (Unix seconds)."""

    version: str
    issued_at: int


def parse_request_id(request_id: Any, key: bytes, *, scope: str = "", ttl_seconds: float = DEFAULT_FEEDBACK_TTL_S,
                     now: float | None = None) -> RequestId:
    """Verify a request id made by :func:`make_request_id` with the same ``key`` and ``scope``.

    Args:
        request_id: the id as the client sent it.
        key, scope: as given to :func:`make_request_id`.
        ttl_seconds: the id is accepted until this many seconds after it was issued.
        now: Unix time in seconds (default: now).

    Raises:
        BadRequest: not a string or malformed; a signature that does not match (a forged
            or altered id); issued more than ``CLOCK_SKEW_S`` (60) seconds in the future;
            or expired (issued more than ``ttl_seconds`` ago).
    """
    if not isinstance(request_id, str):
        raise BadRequest(f"request_id: required, a string, got {request_id!r}")
    parts = request_id.rsplit(".", 3) if len(request_id) <= 160 else []
    if (len(parts) != 4 or not VERSION_RE.match(parts[0]) or not _ISSUED_RE.match(parts[1])
            or not _NONCE_RE.match(parts[2]) or not _SIGNATURE_RE.match(parts[3])):
        raise BadRequest(f"request_id: malformed {request_id[:200]!r} (expected {_REQUEST_ID_FORMAT})")
    version, issued, nonce, signature = parts
    if not hmac.compare_digest(signature, _signature(key, scope, version, issued, nonce)):
        raise BadRequest("request_id: invalid signature: not an id issued by this application (forged or "
                         "altered); send the request_id of a predict answer unchanged")
    now = time.time() if now is None else now
    age = now - int(issued)
    if age < -CLOCK_SKEW_S:
        raise BadRequest(f"request_id: issued {-age:.0f} s in the future (clock difference between router replicas?)")
    if age > ttl_seconds:
        raise BadRequest(f"request_id: expired: issued {age:.0f} s ago; feedback is accepted for {ttl_seconds:g} s "
                         "after the answer")
    return RequestId(version, int(issued))


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
    """A parsed ``POST <route>/feedback`` body (``issued_at``: when the id was issued, Unix seconds)."""

    request_id: str
    version: str
    reward: float
    negative: bool = False
    issued_at: int = 0


def parse_feedback(body: Any, versions: Any, config: FeedbackConfig, *, scope: str = "",
                   now: float | None = None) -> Feedback:
    """Validate ``{"request_id": str, "reward": number, "negative": bool (optional)}``.

    Args:
        body: the decoded JSON body.
        versions: the versions this application serves.
        config: the application's :class:`FeedbackConfig` (key, reward range, TTL).
        scope: as given to :func:`make_request_id` (the router uses ``<namespace>/<agent>``).
        now: Unix time in seconds (default: now).

    Raises:
        FeedbackUnavailable: ``config`` has no key (nothing is accepted: fail closed).
        BadRequest: naming the field: a malformed, forged, altered or expired request id
            (:func:`parse_request_id`), one that names a version this application does not
            serve (so clients cannot create metric series at will), a reward that is not a
            finite number within [``reward_min``, ``reward_max``], a non-boolean
            ``negative``, an unknown field.
    """
    if config.key is None:
        raise FeedbackUnavailable("feedback is not configured for this application (no feedback key in "
                                  "args.feedback): no feedback is accepted")
    if not isinstance(body, Mapping):
        raise BadRequest('body: must be a JSON object {"request_id": ..., "reward": ...}')
    unknown = sorted(set(body) - {"request_id", "reward", "negative"}, key=str)
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field")
    rid = parse_request_id(body.get("request_id"), config.key, scope=scope, ttl_seconds=config.ttl_seconds, now=now)
    if rid.version not in versions:
        raise BadRequest(f"request_id: names version {rid.version!r}, which this application does not serve")
    reward = body.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise BadRequest(f"reward: required, a number, got {reward!r}")
    if isinstance(reward, float) and not math.isfinite(reward):
        raise BadRequest(f"reward: must be a finite number within the declared reward range "
                         f"[{config.reward_min:g}, {config.reward_max:g}], got {reward!r}")
    if not config.reward_min <= reward <= config.reward_max:  # exact for ints of any size too
        raise BadRequest(f"reward: {reward!r} is outside the declared reward range [{config.reward_min:g}, "
                         f"{config.reward_max:g}] (spec.canary.analysis.rewardRange)")
    negative = body.get("negative", False)
    if not isinstance(negative, bool):
        raise BadRequest(f"negative: must be a boolean, got {negative!r}")
    return Feedback(body["request_id"], rid.version, float(reward), negative, rid.issued_at)


#: Default capacity of a :class:`FeedbackLedger` (unexpired ids per router replica).
LEDGER_MAX_ENTRIES = 250_000


class FeedbackLedger:
    """The request ids already credited, each kept until it expires: at most one feedback per
    request id within its TTL.

    Memory is bounded: expired ids are dropped on every call (a heap ordered by expiry), and
    with ``max_entries`` unexpired ids held, further feedback is refused (:class:`FeedbackUnavailable`,
    503) rather than forgetting an id that could then be credited a second time.

    The ledger lives in one router replica: with several router replicas, each keeps its own,
    and the same id could be credited once per replica. (The application runs one router.)
    A new replica (a restart, a redeploy) starts with an empty ledger, so it refuses ids issued
    before it started (``started_at``, Unix seconds): the replica it replaced may have credited them.
    """

    def __init__(self, max_entries: int = LEDGER_MAX_ENTRIES, started_at: float | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries: must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.started_at = time.time() if started_at is None else started_at
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._expiry

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            _, rid = heapq.heappop(self._heap)
            self._expiry.pop(rid, None)

    def credit(self, request_id: str, expires_at: float, now: float | None = None, *,
               issued_at: float | None = None) -> None:
        """Record ``request_id`` as credited until ``expires_at`` (Unix seconds).

        Raises:
            DuplicateFeedback, FeedbackUnavailable: as :meth:`check`; nothing is recorded then.
        """
        self.check(request_id, now, issued_at=issued_at)
        self._expiry[request_id] = expires_at
        heapq.heappush(self._heap, (expires_at, request_id))

    def check(self, request_id: str, now: float | None = None, *, issued_at: float | None = None) -> None:
        """Whether :meth:`credit` would record ``request_id`` now (Unix seconds); records nothing.

        Raises:
            DuplicateFeedback: it was already credited and has not expired, or it was issued
                (``issued_at``, Unix seconds) in a whole second before this ledger started.
            FeedbackUnavailable: ``max_entries`` unexpired ids are held.
        """
        self._purge(time.time() if now is None else now)
        if issued_at is not None and issued_at < int(self.started_at):
            raise DuplicateFeedback("request_id: issued before this router replica started: the replica it "
                                    "replaced may already have received its feedback (at most one feedback per "
                                    "answer)")
        if request_id in self._expiry:
            raise DuplicateFeedback(f"request_id: feedback for {request_id[:200]!r} was already received "
                                    "(at most one feedback per answer)")
        if len(self._expiry) >= self.max_entries:
            raise FeedbackUnavailable(f"feedback: {len(self._expiry)} answers already received feedback within "
                                      "the TTL, the most this router replica remembers; retry later")


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


#: Most consecutive failures a circuit breaker may wait for.
MAX_BREAKER_ERRORS = 1000
#: Longest a circuit breaker may wait for a guarded version's answer (seconds).
MAX_BREAKER_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RouterConfig:
    """The router's parsed ``user_config``.

    Attributes:
        weights: ``{version: percent}`` for every served version (:func:`parse_weights`).
        shadow: the version every request is mirrored to (weight 0), or None.
        baseline: the version every request another version answers is mirrored to, so that
            the answering version's overrides of it are counted, or None.
        breaker_stable: the version a failed request falls back to, or None (no breaker).
        breaker_errors: consecutive failures that open the breaker (>= 1; 0 without breaker).
        breaker_timeout: seconds the router waits for a guarded version's answer before it
            counts a failure and asks stable instead (None: it waits as long as the client).
    """

    weights: dict[str, int]
    shadow: str | None = None
    baseline: str | None = None
    breaker_stable: str | None = None
    breaker_errors: int = 0
    breaker_timeout: float | None = None

    @property
    def mirror(self) -> str | None:
        """The version requests are mirrored to (the shadow or the baseline), or None."""
        return self.shadow or self.baseline

    def evaluated(self, answered_by: str) -> str | None:
        """The version a comparison is counted for, when ``answered_by`` answered: the shadow,
        or (override baseline) the answering version; None when nothing is compared."""
        if self.shadow is not None:
            return self.shadow if answered_by != self.shadow else None
        if self.baseline is not None:
            return answered_by if answered_by != self.baseline else None
        return None


def parse_router_config(user_config: Any, versions: Any) -> RouterConfig:
    """Validate the router's whole ``user_config`` against the served versions.

    ``{"weights": {...}, "shadow"?: "<version>", "overrideBaseline"?: "<version>",
    "circuitBreaker"?: {"stable": "<version>", "consecutiveErrors": N, "timeoutSeconds"?: T}}``:

    * ``weights``: as :func:`parse_weights`.
    * ``shadow``: a served version at weight 0 (a shadow never answers a client).
    * ``overrideBaseline``: a served version; not with ``shadow``.
    * ``circuitBreaker.stable``: a served version (it may have weight 0: it still answers the
      requests that fall back to it); ``consecutiveErrors``: an integer in [1, 1000];
      ``timeoutSeconds``: a number in (0, 60] (optional).

    Raises:
        ServingConfigError: naming the field, e.g. ``user_config.shadow: version v2 has
            weight 10: a shadow takes no traffic``.
    """
    weights = parse_weights(user_config, versions)
    names = ", ".join(weights)

    def served(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in weights:
            raise ServingConfigError(f"user_config.{key}: must name a version of this application "
                                     f"(versions: {names}), got {value!r}")
        return value

    shadow = baseline = stable = None
    errors, timeout = 0, None
    if user_config.get(SHADOW_KEY) is not None:
        shadow = served(SHADOW_KEY, user_config[SHADOW_KEY])
        if weights[shadow]:
            raise ServingConfigError(f"user_config.{SHADOW_KEY}: version {shadow} has weight {weights[shadow]}: "
                                     "a shadow takes no traffic (weight 0)")
    if user_config.get(BASELINE_KEY) is not None:
        if shadow is not None:
            raise ServingConfigError(f"user_config.{BASELINE_KEY}: not with {SHADOW_KEY} (one comparison at a time)")
        baseline = served(BASELINE_KEY, user_config[BASELINE_KEY])
    breaker = user_config.get(BREAKER_KEY)
    if breaker is not None:
        if not isinstance(breaker, Mapping):
            raise ServingConfigError(f"user_config.{BREAKER_KEY}: must be an object with stable, consecutiveErrors, "
                                     f"got {breaker!r}")
        for k in sorted(set(breaker) - _BREAKER_KEYS, key=str):
            raise ServingConfigError(f"user_config.{BREAKER_KEY}.{k}: unknown field")
        stable = served(f"{BREAKER_KEY}.stable", breaker.get("stable"))
        errors = breaker.get("consecutiveErrors")
        if isinstance(errors, bool) or not isinstance(errors, int) or not 1 <= errors <= MAX_BREAKER_ERRORS:
            raise ServingConfigError(f"user_config.{BREAKER_KEY}.consecutiveErrors: must be an integer in "
                                     f"[1, {MAX_BREAKER_ERRORS}], got {errors!r}")
        if breaker.get("timeoutSeconds") is not None:
            path = f"user_config.{BREAKER_KEY}.timeoutSeconds"
            timeout = float(_number(breaker["timeoutSeconds"], path))
            if not 0 < timeout <= MAX_BREAKER_TIMEOUT_S:
                raise ServingConfigError(f"{path}: must be a number in (0, {MAX_BREAKER_TIMEOUT_S:g}], got {timeout!r}")
    return RouterConfig(weights, shadow, baseline, stable, errors, timeout)


class CircuitBreaker:
    """Consecutive failures of the versions other than ``stable``, in one router replica.

    Every request another version answers is recorded: a success resets the count; a failure
    (a 5xx, or no answer within ``timeout``) adds one, and ``threshold`` consecutive failures
    open the breaker. Open, it stays open (the router sends every request to ``stable``) until
    the router is reconfigured without it.

    Args:
        stable: the version failed requests fall back to.
        threshold: consecutive failures that open the breaker (>= 1).
        timeout: seconds to wait for another version's answer before it counts as a failure
            (None: no limit).
    """

    def __init__(self, stable: str, threshold: int, timeout: float | None = None) -> None:
        if threshold < 1:
            raise ValueError(f"threshold: must be >= 1, got {threshold}")
        self.stable, self.threshold, self.timeout = stable, threshold, timeout
        self.consecutive = 0
        self.open = False
        self.opened_by: str | None = None  #: the version whose failures opened it

    def record(self, version: str, ok: bool) -> bool:
        """Record one answer of ``version`` (not ``stable``); True when this failure opened the breaker."""
        if ok:
            self.consecutive = 0
            return False
        self.consecutive += 1
        if not self.open and self.consecutive >= self.threshold:
            self.open, self.opened_by = True, version
            return True
        return False


#: Default capacity of a :class:`ComparisonLedger` (disagreements awaiting feedback per router replica).
COMPARISON_MAX_ENTRIES = 100_000


class ComparisonLedger:
    """The answers on which the two compared versions disagreed, kept until their feedback
    arrives or their request id expires: the feedback then says whether the override (the
    evaluated version's different action) would have been right.

    Memory is bounded: expired entries are dropped on every call, and beyond ``max_entries``
    the oldest entry is dropped (its feedback is then not counted as judging an override).
    """

    def __init__(self, max_entries: int = COMPARISON_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries: must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, str, bool]] = {}  # insertion order = expiry order

    def __len__(self) -> int:
        return len(self._entries)

    def _purge(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries))
            if self._entries[oldest][0] >= now and len(self._entries) <= self.max_entries:
                break
            del self._entries[oldest]

    def add(self, request_id: str, evaluated: str, answered_by_evaluated: bool, expires_at: float,
            now: float | None = None) -> None:
        """Remember a disagreement: ``evaluated`` (the version whose overrides are counted) did
        not give the action of the answer ``request_id``; ``answered_by_evaluated``: whether the
        client got the evaluated version's action (override baseline) or the other's (shadow).
        ``expires_at``: Unix seconds (the request id's feedback deadline)."""
        self._entries[request_id] = (expires_at, evaluated, answered_by_evaluated)
        self._purge(time.time() if now is None else now)

    def judge(self, request_id: str, good: bool, now: float | None = None) -> tuple[str, bool] | None:
        """The feedback on ``request_id`` arrived, ``good`` (not negative, reward at or above the
        middle of the declared range) or not. Returns ``(evaluated version, override right)``
        and forgets the entry, or None when the versions agreed (or the entry expired).

        The override was right when the feedback condemns the answer the client got instead of
        the evaluated version's (shadow), or approves the evaluated version's own answer (baseline)."""
        self._purge(time.time() if now is None else now)
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        _, evaluated, answered_by_evaluated = entry
        return evaluated, good if answered_by_evaluated else not good
