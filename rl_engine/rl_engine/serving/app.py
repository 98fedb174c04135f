"""The Ray Serve application of one RLAgent: an ingress ``router`` plus one ``policy-<version>``
deployment per served version (import path ``rl_engine.serving.app:build_app``).

The declarative config's ``args`` (see :func:`rl_engine.serving.config.parse_args`) name the
versions and their artifacts; the router's ``user_config`` holds the traffic split
(``{"weights": {"<version>": percent}}``), applied by :meth:`Router.reconfigure` without
restarting any replica. HTTP API, metrics and layout: ``docs/serving.md``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from typing import Any

import numpy as np
from ray import serve
from ray.serve import Application
from ray.util import metrics
from starlette.requests import Request
from starlette.responses import JSONResponse

from .config import (
    REWARD_BUCKETS,
    ROUTER_DEPLOYMENT,
    BadRequest,
    DuplicateFeedback,
    FeedbackLedger,
    FeedbackUnavailable,
    ServingConfig,
    WeightedDeck,
    make_request_id,
    parse_args,
    parse_feedback,
    parse_observation,
    parse_weights,
    policy_deployment_name,
)
# ray.util.metrics names, exported by Ray's metrics agent as ``ray_<name>`` (counters with a
# ``_total`` suffix): the operator's analysis queries them by the same names (docs/serving.md)
from .contract import METRIC_NAMES, METRIC_TAGS

__all__ = ["build_app", "build_policy_app", "Router", "PolicyDeployment", "METRIC_NAMES", "LATENCY_BUCKETS_S",
           "REWARD_BUCKETS"]

logger = logging.getLogger("ray.serve")

#: Latency histogram bucket bounds (seconds).
LATENCY_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
_TAGS = METRIC_TAGS
# Access logs cost more CPU than the request itself here; the metrics count every request.
_LOGGING = {"enable_access_log": False}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _short(err: BaseException, limit: int = 500) -> str:
    text = str(err).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(err).__name__}: {first}"[:limit]


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"body: not valid JSON ({err})") from None


def _subpath(request: Request) -> str:
    """The request path below the application's route prefix ('' for the prefix itself)."""
    path = request.scope.get("path", "")
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/")


def _replica_id() -> str:
    try:
        rid = serve.get_replica_context().replica_id
        return str(getattr(rid, "unique_id", rid))
    except Exception:  # outside a replica (tests calling the class directly)
        return ""


@serve.deployment(
    name="policy",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=128,
    max_constructor_retry_count=3,
    max_surge_percent=100,
    logging_config=_LOGGING,
)
class PolicyDeployment:
    """One version's policy, batched with ``@serve.batch``; CUDA when the replica sees a GPU.

    Called by the router through a handle (``act(observation) -> dict``), or over HTTP when
    it is an application's ingress (:func:`build_policy_app`, the benchmark's baseline).
    ``act`` returns ``{"action": int}``, or ``{"status": 400|500, "error": str}``: a
    non-finite policy output (a corrupt artifact) is a 500 for every request of the batch.

    Args:
        namespace, agent, version: identity (for errors and ``info``).
        artifact_uri: the artifact to load (fsspec URI).
        fingerprint: when set, the replica reads every artifact file once, and the
            fingerprint of those bytes must equal it, or the replica refuses to start (the
            application then shows DEPLOY_FAILED); the policy is built from the same bytes
            (:func:`rl_engine.policy.load_verified_policy`), never from a second read.
        max_batch_size, batch_wait_timeout_s: ``@serve.batch`` parameters.
    """

    def __init__(self, namespace: str, agent: str, version: str, artifact_uri: str, fingerprint: str | None,
                 max_batch_size: int = 32, batch_wait_timeout_s: float = 0.002) -> None:
        import torch

        from ..artifacts import ArtifactError
        from ..policy import load_policy, load_verified_policy

        torch.set_num_threads(int(os.environ.get("RLOPS_TORCH_THREADS", "1")))
        try:
            # Read once, verify, build from the same bytes: no time-of-check/time-of-use gap.
            policy = load_verified_policy(artifact_uri, fingerprint) if fingerprint else load_policy(artifact_uri)
        except ArtifactError as err:
            raise RuntimeError(f"version {version}: {err}") from err
        self.namespace, self.agent, self.version = namespace, agent, version
        self.fingerprint = fingerprint
        self.policy = policy
        self._batched.set_max_batch_size(int(max_batch_size))
        self._batched.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.batches = 0
        self.batched_requests = 0
        logger.info("policy %s/%s %s loaded from %s on %s", namespace, agent, version, artifact_uri, self.policy.device)

    async def act(self, observation: Any) -> dict[str, Any]:
        """One observation -> ``{"action": int}`` or ``{"status": 400|500, "error": str}``."""
        from ..policy import InvalidObservation

        try:
            obs = self.policy.check_observation(observation)
        except InvalidObservation as err:
            return {"status": 400, "error": f"observation: {err}"}
        return await self._batched(obs)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched(self, observations: list[np.ndarray]) -> list[dict[str, Any]]:
        from ..policy import PolicyError

        self.batches += 1
        self.batched_requests += len(observations)
        try:
            actions = self.policy.act(np.stack(observations))
        except PolicyError as err:
            return [{"status": 500, "error": f"policy {self.version}: {err}"}] * len(observations)
        except Exception as err:  # noqa: BLE001 - any policy failure is a 500 for its requests
            return [{"status": 500, "error": f"policy {self.version}: {_short(err)}"}] * len(observations)
        return [{"action": int(a)} for a in actions]

    def info(self) -> dict[str, Any]:
        """Identity and batching statistics of this replica."""
        return {"version": self.version, "fingerprint": self.fingerprint, "uri": self.policy.uri,
                "device": str(self.policy.device), "pid": os.getpid(), "replica": _replica_id(),
                "batches": self.batches, "batchedRequests": self.batched_requests}

    async def __call__(self, request: Request) -> JSONResponse:
        """HTTP ingress mode: ``POST {"observation": [...]}`` -> ``{"action", "version"}``;
        ``GET`` -> :meth:`info`."""
        if request.method == "GET":
            return JSONResponse(self.info())
        if request.method != "POST":
            return _error(405, f"method {request.method} not allowed")
        try:
            obs = parse_observation(await _json_body(request))
        except BadRequest as err:
            return _error(400, str(err))
        result = await self.act(obs)
        if "error" in result:
            return _error(result.get("status", 500), result["error"], version=self.version)
        return JSONResponse({"action": result["action"], "version": self.version})


@serve.deployment(
    name=ROUTER_DEPLOYMENT,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
    max_constructor_retry_count=3,
    max_surge_percent=100,
    logging_config=_LOGGING,
)
class Router:
    """Ingress: splits traffic over the ``policy-<version>`` deployments by weight, takes
    feedback, and records per-version metrics.

    HTTP (below the application's route prefix):

    * ``POST /`` ``{"observation": [...]}`` -> ``{"action", "version", "request_id"}``
    * ``POST /feedback`` ``{"request_id", "reward", "negative"?}`` -> ``{"ok", "version"}``;
      400 for a malformed, forged, altered or expired ``request_id`` or a reward outside
      the declared range, 409 for a second feedback on the same ``request_id`` (this
      replica remembers credited ids until they expire, and refuses ids issued before it
      started), 503 when no feedback key is configured
    * ``GET /`` -> the router's identity (pid, replica id) and current weights

    Request ids are signed with ``args.feedback.key`` (HMAC-SHA256, bound to the version, the
    issue time and ``<namespace>/<agent>``; :func:`rl_engine.serving.config.make_request_id`).

    ``user_config``: ``{"weights": {"<version>": percent}}`` (see
    :func:`rl_engine.serving.config.parse_weights`), applied by :meth:`reconfigure` in place.

    Args:
        args: the application ``args`` (validated again here).
        policies: version -> handle of its ``policy-<version>`` deployment.
    """

    def __init__(self, args: dict[str, Any], policies: dict[str, Any]) -> None:
        self.config: ServingConfig = parse_args(args)
        self.policies = {v: h.options(method_name="act") for v, h in policies.items()}
        self.versions = list(self.config.versions)
        only = {self.versions[0]: 100} if len(self.versions) == 1 else {}
        self.weights: dict[str, int] = {v: only.get(v, 0) for v in self.versions}
        self.deck = WeightedDeck(self.weights)
        self.reconfigurations = 0
        self.started_at = time.time()
        self.scope = f"{self.config.namespace}/{self.config.agent}"
        # Without a configured key, ids are still issued (signed with a key nobody else has)
        # but every feedback is refused with 503: nothing unsigned reaches the metrics.
        self.id_key = self.config.feedback.key or secrets.token_bytes(32)
        self.ledger = FeedbackLedger()
        default_tags = {"namespace": self.config.namespace, "agent": self.config.agent}
        self.m_requests = metrics.Counter(METRIC_NAMES["requests"], "Requests routed to a policy version.", _TAGS)
        self.m_errors = metrics.Counter(METRIC_NAMES["errors"], "Requests a policy version failed (HTTP 5xx).", _TAGS)
        self.m_latency = metrics.Histogram(METRIC_NAMES["latency"], "Request latency through the router (seconds).",
                                           boundaries=LATENCY_BUCKETS_S, tag_keys=_TAGS)
        self.m_feedback = metrics.Counter(METRIC_NAMES["feedback"], "Feedback received for a version.", _TAGS)
        self.m_reward_pos = metrics.Counter(METRIC_NAMES["reward_positive"],
                                            "Sum of the positive feedback rewards of a version.", _TAGS)
        self.m_reward_neg = metrics.Counter(METRIC_NAMES["reward_negative"],
                                            "Sum of the magnitudes of the negative feedback rewards of a version.", _TAGS)
        self.m_negative = metrics.Counter(METRIC_NAMES["negative_feedback"],
                                          "Feedback flagged negative for a version.", _TAGS)
        self.m_reward_scaled = metrics.Histogram(
            METRIC_NAMES["reward_scaled"],
            "Feedback reward of a version as a fraction of the declared range: (reward - min) / (max - min).",
            boundaries=list(REWARD_BUCKETS), tag_keys=_TAGS)
        for m in (self.m_requests, self.m_errors, self.m_latency, self.m_feedback, self.m_reward_pos,
                  self.m_reward_neg, self.m_negative, self.m_reward_scaled):
            m.set_default_tags(default_tags)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new traffic split (no restart). Raises ``ServingConfigError`` if invalid."""
        weights = parse_weights(user_config, self.versions)
        self.weights = weights
        self.deck = WeightedDeck(weights)
        self.reconfigurations += 1
        logger.info("router %s/%s weights %s", self.config.namespace, self.config.agent, weights)

    def info(self) -> dict[str, Any]:
        fb = self.config.feedback
        return {"namespace": self.config.namespace, "agent": self.config.agent, "versions": self.versions,
                "weights": self.weights, "pid": os.getpid(), "replica": _replica_id(),
                "reconfigurations": self.reconfigurations, "startedAt": self.started_at,
                "feedback": {"configured": fb.key is not None, "rewardMin": fb.reward_min, "rewardMax": fb.reward_max,
                             "ttlSeconds": fb.ttl_seconds, "remembered": len(self.ledger)}}

    async def __call__(self, request: Request) -> JSONResponse:
        path = _subpath(request)
        if path == "":
            if request.method == "POST":
                return await self.predict(request)
            if request.method == "GET":
                return JSONResponse(self.info())
        elif path == "/feedback":
            if request.method == "POST":
                return await self.feedback(request)
        else:
            return _error(404, f"no route {path!r}: use POST '' (predict), POST '/feedback', GET ''")
        return _error(405, f"method {request.method} not allowed on {path or '/'!r}")

    async def predict(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            obs = parse_observation(await _json_body(request))
        except BadRequest as err:
            return _error(400, str(err))
        version = self.deck.draw()
        if version is None:
            return _error(503, "no version has traffic (all weights are 0)")
        request_id = make_request_id(version, self.id_key, scope=self.scope)
        tags = {"version": version}
        try:
            result = await self.policies[version].remote(obs)
        except Exception as err:  # noqa: BLE001 - a dead or failing replica is the version's error
            result = {"status": 500, "error": f"policy {version}: {_short(err)}"}
        self.m_requests.inc(1, tags)
        self.m_latency.observe(time.perf_counter() - start, tags)
        if "error" in result:
            status = int(result.get("status", 500))
            if status >= 500:
                self.m_errors.inc(1, tags)
            return _error(status, result["error"], version=version, request_id=request_id)
        return JSONResponse({"action": result["action"], "version": version, "request_id": request_id})

    async def feedback(self, request: Request) -> JSONResponse:
        """Credit one feedback to the version its (verified, unexpired, not yet credited)
        request id names. 400 / 409 / 503 as in the class docstring; nothing is counted then."""
        cfg = self.config.feedback
        try:
            body = await _json_body(request)
            now = time.time()
            fb = parse_feedback(body, self.config.versions, cfg, scope=self.scope, now=now)
            # No await between the check and the record: one event loop, so no double credit.
            self.ledger.credit(fb.request_id, fb.issued_at + cfg.ttl_seconds, now, issued_at=fb.issued_at)
        except FeedbackUnavailable as err:
            return _error(503, str(err))
        except DuplicateFeedback as err:
            return _error(409, str(err))
        except BadRequest as err:
            return _error(400, str(err))
        tags = {"version": fb.version}
        self.m_feedback.inc(1, tags)
        if fb.reward > 0:
            self.m_reward_pos.inc(fb.reward, tags)
        elif fb.reward < 0:
            self.m_reward_neg.inc(-fb.reward, tags)
        self.m_reward_scaled.observe(cfg.scaled(fb.reward), tags)
        if fb.negative:
            self.m_negative.inc(1, tags)
        return JSONResponse({"ok": True, "version": fb.version, "request_id": fb.request_id})


def _policy(cfg: ServingConfig, version: str) -> Application:
    spec = cfg.versions[version]
    actor_options: dict[str, Any] = {"num_cpus": cfg.policy_num_cpus}
    if cfg.policy_num_gpus:
        actor_options["num_gpus"] = cfg.policy_num_gpus
    return PolicyDeployment.options(
        name=policy_deployment_name(version),
        ray_actor_options=actor_options,
        max_ongoing_requests=max(128, 4 * cfg.max_batch_size),
    ).bind(cfg.namespace, cfg.agent, version, spec.artifact_uri, spec.fingerprint,
           cfg.max_batch_size, cfg.batch_wait_timeout_s)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for the declarative config (``import_path:
    rl_engine.serving.app:build_app``): ``router`` -> ``policy-<version>`` for each version.

    Raises:
        rl_engine.serving.config.ServingConfigError: invalid ``args`` (the application
            shows DEPLOY_FAILED with this message).
    """
    cfg = parse_args(args)
    policies = {v: _policy(cfg, v) for v in cfg.versions}
    return Router.bind(dict(args), policies)


def build_policy_app(args: dict[str, Any]) -> Application:
    """A policy deployment as the ingress, no router (the benchmark's baseline): same
    ``args`` as :func:`build_app` with exactly one version."""
    cfg = parse_args(args)
    if len(cfg.versions) != 1:
        raise ValueError(f"args.versions: build_policy_app serves exactly one version, got {len(cfg.versions)}")
    return _policy(cfg, next(iter(cfg.versions)))
