"""The Ray Serve application of one RLAgent: an ingress ``router`` plus one ``policy-<version>``
deployment per served version (import path ``rl_engine.serving.app:build_app``).

The declarative config's ``args`` (see :func:`rl_engine.serving.config.parse_args`) name the
versions and their artifacts; the router's ``user_config`` holds the traffic split
(``{"weights": {"<version>": percent}}``), applied by :meth:`Router.reconfigure` without
restarting any replica. HTTP API, metrics and layout: ``docs/serving.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from typing import Any, NamedTuple

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
    CircuitBreaker,
    ComparisonLedger,
    RouterConfig,
    DuplicateFeedback,
    Feedback,
    FeedbackLedger,
    FeedbackUnavailable,
    ServingConfig,
    WeightedDeck,
    make_request_id,
    parse_args,
    parse_feedback,
    parse_observation,
    parse_router_config,
    policy_deployment_name,
)
from .feedback_cap import FeedbackCap, client_key
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
#: Mirrored requests (shadow / override baseline) wait in the router until MIRROR_BATCH of them
#: are queued or the oldest has waited MIRROR_WAIT_S seconds, then go to the mirror version in
#: one call (``PolicyDeployment.act_batch``): one round trip per batch, not per request, so
#: that the mirror costs the clients' requests next to nothing.
MIRROR_BATCH = 32
MIRROR_WAIT_S = 0.05
#: How often a gauge that must stay visible is set again (seconds). Ray exports a gauge value
#: once per set and its metrics agent forgets it after two report intervals (at least 1 s each).
GAUGE_REFRESH_S = 1.0
#: Batches in flight at once per router replica, and mirrored requests that may wait; beyond
#: that a mirror is dropped (counted), so that a slow shadow never queues up behind the clients.
MAX_MIRROR_BATCHES = 4
MAX_MIRROR_QUEUE = 1024


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

    async def act_batch(self, observations: list[Any]) -> list[dict[str, Any]]:
        """Many observations in one call (the router's mirror) -> one result per observation, as
        :meth:`act` gives it; one policy forward pass for all the valid ones."""
        from ..policy import InvalidObservation, PolicyError

        out: list[dict[str, Any]] = [{}] * len(observations)
        valid: list[tuple[int, np.ndarray]] = []
        for i, observation in enumerate(observations):
            try:
                valid.append((i, self.policy.check_observation(observation)))
            except InvalidObservation as err:
                out[i] = {"status": 400, "error": f"observation: {err}"}
        if valid:
            try:
                actions = self.policy.act(np.stack([obs for _, obs in valid]))
                results = [{"action": int(a)} for a in actions]
            except PolicyError as err:
                results = [{"status": 500, "error": f"policy {self.version}: {err}"}] * len(valid)
            except Exception as err:  # noqa: BLE001 - as in _batched
                results = [{"status": 500, "error": f"policy {self.version}: {_short(err)}"}] * len(valid)
            for (i, _), result in zip(valid, results):
                out[i] = result
        return out

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


#: The router's metrics: attribute -> (role in METRIC_NAMES, kind, description). Tags: _TAGS.
_ROUTER_METRICS: dict[str, tuple[str, str, str]] = {
    "m_requests": ("requests", "counter", "Requests routed to a policy version."),
    "m_errors": ("errors", "counter", "Requests a policy version failed (HTTP 5xx)."),
    "m_latency": ("latency", "histogram", "Request latency through the router (seconds)."),
    "m_feedback": ("feedback", "counter", "Feedback received for a version."),
    "m_reward_pos": ("reward_positive", "counter", "Sum of the positive feedback rewards of a version."),
    "m_reward_neg": ("reward_negative", "counter",
                     "Sum of the magnitudes of the negative feedback rewards of a version."),
    "m_negative": ("negative_feedback", "counter", "Feedback flagged negative for a version."),
    "m_reward_scaled": ("reward_scaled", "histogram", "Feedback reward of a version as a fraction of the declared "
                                                      "range: (reward - min) / (max - min)."),
    "m_decisions": ("decisions", "counter", "Answers compared with another version's action, by the version evaluated."),
    "m_agreements": ("agreements", "counter", "Compared answers where both versions chose the same action."),
    "m_override_feedback": ("override_feedback", "counter", "Feedback on answers where the compared versions disagreed."),
    "m_override_correct": ("override_correct", "counter", "Of those, feedback that says the evaluated version was right."),
    "m_mirror_dropped": ("mirror_dropped", "counter", "Mirrored requests not compared (queue full, mirror failed)."),
    "m_circuit_open": ("circuit_open", "gauge", "1 while the circuit breaker sends this version's traffic to stable."),
    "m_circuit_opens": ("circuit_opens", "counter", "Times the circuit breaker opened on this version's failures."),
    "m_fallbacks": ("circuit_fallbacks", "counter", "Requests of this version answered by stable (failed, or breaker "
                                                    "open)."),
    "m_feedback_capped": ("feedback_capped", "counter", "Feedback refused by the per-client cap (HTTP 429), by the "
                                                        "version its request id names."),
}


class _Mirrored(NamedTuple):
    """A request waiting to be mirrored: what was answered, and which version it evaluates."""

    obs: np.ndarray
    action: int
    request_id: str
    evaluated: str
    answered_by_evaluated: bool


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
      started), 429 for a valid feedback beyond ``args.feedback.perClientPerMinute`` of its
      client (not counted, the id stays unused), 503 when no feedback key is configured
    * ``GET /`` -> the router's identity (pid, replica id) and current weights

    Request ids are signed with ``args.feedback.key`` (HMAC-SHA256, bound to the version, the
    issue time and ``<namespace>/<agent>``; :func:`rl_engine.serving.config.make_request_id`).

    ``user_config``: ``{"weights": {"<version>": percent}, "shadow"?, "overrideBaseline"?,
    "circuitBreaker"?}`` (see :func:`rl_engine.serving.config.parse_router_config`), applied by
    :meth:`reconfigure` in place:

    * ``shadow: v``: every request another version answers is also sent to ``v`` after the
      answer is ready, off the response path, in batches (:data:`MIRROR_BATCH` requests or
      :data:`MIRROR_WAIT_S` seconds, one ``act_batch`` call each); the two actions are compared
      (``rlops_serve_compared_decisions`` / ``_agreements``, tagged ``version=v``). The client
      only ever gets the answering version's action.
    * ``overrideBaseline: s``: the same mirror, to ``s``, for requests other versions answer;
      counted under the answering version (how often it overrides ``s``).
    * When the two actions differ, the request id is remembered until its feedback: feedback
      that is ``negative`` or below the middle of the reward range condemns the answer given
      (``rlops_serve_override_feedback`` / ``_correct``: the override was right when it
      differed from a condemned answer, or was itself the approved answer).
    * ``circuitBreaker: {stable, consecutiveErrors: N, timeoutSeconds?: T}``: a request another
      version fails (5xx, or no answer within T s: 504) is answered by ``stable`` instead (the
      client sees no error); N consecutive failures open the breaker
      (``rlops_serve_circuit_opens`` + 1, ``rlops_serve_circuit_open`` held at 1): every
      request then goes to ``stable``, with no round trip to the operator, until a
      reconfiguration without it.

    Args:
        args: the application ``args`` (validated again here).
        policies: version -> handle of its ``policy-<version>`` deployment.
    """

    def __init__(self, args: dict[str, Any], policies: dict[str, Any]) -> None:
        self.config: ServingConfig = parse_args(args)
        self.policies = {v: h.options(method_name="act") for v, h in policies.items()}
        self.batch_policies = {v: h.options(method_name="act_batch") for v, h in policies.items()}
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
        self.cap = FeedbackCap(self.config.feedback.per_client_per_minute)
        self.router_config = RouterConfig(dict(self.weights))  # no split before the first reconfigure
        self.breaker: CircuitBreaker | None = None
        self.comparisons = ComparisonLedger()
        self.mirror_queue: list[_Mirrored] = []
        self.mirror_batches = 0  #: batches in flight
        self._mirror_timer: asyncio.Task | None = None
        self.mirrors: set[asyncio.Task] = set()  #: the timer and batch tasks (kept from the GC)
        self.background: set[asyncio.Task] = set()  #: other tasks: the open breaker's gauge keeper
        default_tags = {"namespace": self.config.namespace, "agent": self.config.agent}
        for attr, (role, kind, doc) in _ROUTER_METRICS.items():  # self.m_requests, self.m_errors, ...
            if kind == "histogram":
                bounds = list(REWARD_BUCKETS) if role == "reward_scaled" else LATENCY_BUCKETS_S
                metric = metrics.Histogram(METRIC_NAMES[role], doc, boundaries=bounds, tag_keys=_TAGS)
            else:
                metric = (metrics.Gauge if kind == "gauge" else metrics.Counter)(METRIC_NAMES[role], doc, _TAGS)
            metric.set_default_tags(default_tags)
            setattr(self, attr, metric)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new traffic split, comparison and breaker (no restart). An open breaker stays
        open while the new config keeps the same breaker. Raises ``ServingConfigError`` if invalid."""
        rc = parse_router_config(user_config, self.versions)
        self.router_config, self.weights = rc, rc.weights
        self.deck = WeightedDeck(rc.weights)
        if rc.mirror != self.router_config.mirror and self.mirror_queue:
            for item in self.mirror_queue:  # asked of the previous mirror: no longer compared
                self.m_mirror_dropped.inc(1, {"version": item.evaluated})
            self.mirror_queue = []
        old = self.breaker
        if rc.breaker_stable is None:
            self.breaker = None
        elif old is None or (old.stable, old.threshold, old.timeout) != \
                (rc.breaker_stable, rc.breaker_errors, rc.breaker_timeout):
            self.breaker = CircuitBreaker(rc.breaker_stable, rc.breaker_errors, rc.breaker_timeout)
        self.reconfigurations += 1
        logger.info("router %s/%s weights %s shadow %s baseline %s breaker %s", self.config.namespace,
                    self.config.agent, rc.weights, rc.shadow, rc.baseline,
                    f"{rc.breaker_stable}/{rc.breaker_errors}" if rc.breaker_stable else None)

    def info(self) -> dict[str, Any]:
        fb = self.config.feedback
        rc, breaker = self.router_config, self.breaker
        return {"namespace": self.config.namespace, "agent": self.config.agent, "versions": self.versions,
                "weights": self.weights, "shadow": rc.shadow, "overrideBaseline": rc.baseline,
                "circuitBreaker": None if breaker is None else {
                    "stable": breaker.stable, "consecutiveErrors": breaker.threshold, "timeoutSeconds": breaker.timeout,
                    "open": breaker.open, "consecutiveFailures": breaker.consecutive},
                "mirrorsQueued": len(self.mirror_queue), "mirrorBatchesInFlight": self.mirror_batches, "pid": os.getpid(), "replica": _replica_id(),
                "reconfigurations": self.reconfigurations, "startedAt": self.started_at,
                "feedback": {"configured": fb.key is not None, "rewardMin": fb.reward_min, "rewardMax": fb.reward_max,
                             "ttlSeconds": fb.ttl_seconds, "remembered": len(self.ledger),
                             "perClientPerMinute": fb.per_client_per_minute, "clientHeader": fb.client_header,
                             "clients": len(self.cap)}}

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

    async def _act(self, version: str, obs: np.ndarray, timeout: float | None = None) -> dict[str, Any]:
        """``version``'s answer; a failure (or none within ``timeout`` seconds: 504) as a result."""
        try:
            response = self.policies[version].remote(obs)
            return await (response if timeout is None else asyncio.wait_for(response, timeout))
        except asyncio.TimeoutError:
            return {"status": 504, "error": f"policy {version}: no answer within {timeout:g} s"}
        except Exception as err:  # noqa: BLE001 - a dead or failing replica is the version's error
            return {"status": 500, "error": f"policy {version}: {_short(err)}"}

    def _count(self, version: str, result: dict[str, Any]) -> bool:
        """Count one answer of ``version``; True when it failed (5xx)."""
        tags = {"version": version}
        self.m_requests.inc(1, tags)
        failed = "error" in result and int(result.get("status", 500)) >= 500
        if failed:
            self.m_errors.inc(1, tags)
        return failed

    async def predict(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            obs = parse_observation(await _json_body(request))
        except BadRequest as err:
            return _error(400, str(err))
        version = self.deck.draw()
        if version is None:
            return _error(503, "no version has traffic (all weights are 0)")
        breaker = self.breaker
        guarded = breaker is not None and version != breaker.stable
        if guarded and breaker.open:
            self.m_fallbacks.inc(1, {"version": version})
            version = breaker.stable
            result = await self._act(version, obs)
            self._count(version, result)
        else:
            result = await self._act(version, obs, breaker.timeout if guarded else None)
            failed = self._count(version, result)
            if guarded and (failed or "error" not in result):
                if breaker.record(version, ok=not failed):
                    self.m_circuit_opens.inc(1, {"version": version})
                    self._spawn(self._keep_open_gauge(breaker, version), self.background)
                    logger.warning("router %s: circuit breaker open after %d consecutive failures of %s: all "
                                   "traffic to %s", self.scope, breaker.consecutive, version, breaker.stable)
                if failed:
                    self.m_fallbacks.inc(1, {"version": version})
                    version = breaker.stable
                    result = await self._act(version, obs)
                    self._count(version, result)
        tags = {"version": version}
        self.m_latency.observe(time.perf_counter() - start, tags)
        request_id = make_request_id(version, self.id_key, scope=self.scope)
        if "error" in result:
            return _error(int(result.get("status", 500)), result["error"], version=version, request_id=request_id)
        self._mirror(version, obs, int(result["action"]), request_id)
        return JSONResponse({"action": result["action"], "version": version, "request_id": request_id})

    def _mirror(self, version: str, obs: np.ndarray, action: int, request_id: str) -> None:
        """Queue the request ``version`` answered for the shadow / override baseline: it is sent
        off the response path, in a batch (:data:`MIRROR_BATCH`, :data:`MIRROR_WAIT_S`)."""
        rc = self.router_config
        evaluated = rc.evaluated(version)
        if evaluated is None or rc.mirror is None:
            return
        if len(self.mirror_queue) >= MAX_MIRROR_QUEUE:
            self.m_mirror_dropped.inc(1, {"version": evaluated})
            return
        self.mirror_queue.append(_Mirrored(obs, action, request_id, evaluated, version == evaluated))
        if len(self.mirror_queue) >= MIRROR_BATCH:
            self._spawn(self._flush_mirrors())
        elif self._mirror_timer is None:
            self._mirror_timer = self._spawn(self._flush_mirrors(wait=MIRROR_WAIT_S))

    def _spawn(self, coro: Any, tasks: set[asyncio.Task] | None = None) -> asyncio.Task:
        """Run ``coro`` on the replica's loop, kept in ``tasks`` (default: the mirrors) until done."""
        tasks = self.mirrors if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    async def _keep_open_gauge(self, breaker: CircuitBreaker, version: str) -> None:
        """Hold ``rlops_serve_circuit_open`` at 1 while ``breaker`` is the router's and open, then 0.
        Ray exports a gauge value once per set (the next export sees nothing), so a value set once
        vanishes from Prometheus within two report intervals: it is set again every
        :data:`GAUGE_REFRESH_S`. (The operator reads the ``circuit_opens`` counter, which needs
        no refresh.)"""
        while self.breaker is breaker and breaker.open:
            self.m_circuit_open.set(1, {"version": version})
            await asyncio.sleep(GAUGE_REFRESH_S)
        self.m_circuit_open.set(0, {"version": version})

    async def _flush_mirrors(self, wait: float = 0.0) -> None:
        """Send the queued mirrors, full batches at a time, while fewer than MAX_MIRROR_BATCHES are
        in flight; after ``wait`` seconds (the timer), the first batch may be partial."""
        partial = bool(wait)
        if wait:
            await asyncio.sleep(wait)
            self._mirror_timer = None
        while self.mirror_batches < MAX_MIRROR_BATCHES and (
                len(self.mirror_queue) >= MIRROR_BATCH or (partial and self.mirror_queue)):
            partial = False
            batch, self.mirror_queue = self.mirror_queue[:MIRROR_BATCH], self.mirror_queue[MIRROR_BATCH:]
            self.mirror_batches += 1
            try:
                await self._compare(self.router_config.mirror, batch)
            finally:
                self.mirror_batches -= 1
        if self.mirror_queue and self._mirror_timer is None:  # left behind a full pipeline
            self._mirror_timer = self._spawn(self._flush_mirrors(wait=MIRROR_WAIT_S))

    async def _compare(self, mirror: str | None, batch: list[_Mirrored]) -> None:
        """Ask ``mirror`` for the batch's actions and count the agreements; remember disagreements."""
        try:
            if mirror is None:
                raise RuntimeError("no mirror configured")
            results = await self.batch_policies[mirror].remote([item.obs for item in batch])
        except Exception as err:  # noqa: BLE001 - a failing mirror drops its batch, never an answer
            logger.warning("router %s: mirror %s failed: %s", self.scope, mirror, _short(err))
            results = [{"status": 500}] * len(batch)
        expires = time.time() + self.config.feedback.ttl_seconds
        for item, result in zip(batch, results):
            tags = {"version": item.evaluated}
            if "action" not in result:
                self.m_mirror_dropped.inc(1, tags)
                continue
            self.m_decisions.inc(1, tags)
            if int(result["action"]) == item.action:
                self.m_agreements.inc(1, tags)
            else:
                self.comparisons.add(item.request_id, item.evaluated, item.answered_by_evaluated, expires)

    async def feedback(self, request: Request) -> JSONResponse:
        """Credit one feedback to the version its (verified, unexpired, not yet credited)
        request id names, within its client's cap. 400 / 409 / 429 / 503 as in the class
        docstring; nothing is counted then but a 429 (``rlops_serve_feedback_capped``)."""
        cfg = self.config.feedback
        try:
            body = await _json_body(request)
            now = time.time()
            fb = parse_feedback(body, self.config.versions, cfg, scope=self.scope, now=now)
            # No await from this check to the credit: one event loop, so no double credit.
            self.ledger.check(fb.request_id, now, issued_at=fb.issued_at)
        except FeedbackUnavailable as err:
            return _error(503, str(err))
        except DuplicateFeedback as err:
            return _error(409, str(err))
        except BadRequest as err:
            return _error(400, str(err))
        # The cap counts only feedback that would be counted: spending a client's share takes
        # real, unused request ids, and a refused one stays unused (docs/serving.md).
        client = client_key(request.client.host if request.client else None,
                            request.headers.getlist(cfg.client_header) if cfg.client_header else ())
        if not self.cap.hit(client):
            self.m_feedback_capped.inc(1, {"version": fb.version})
            return self._capped(fb, self.cap.retry_after(client))
        self.ledger.credit(fb.request_id, fb.issued_at + cfg.ttl_seconds, now, issued_at=fb.issued_at)
        self._count_feedback(fb, now)
        return JSONResponse({"ok": True, "version": fb.version, "request_id": fb.request_id})

    def _capped(self, fb: Feedback, retry_after: int) -> JSONResponse:
        """The 429 of a feedback over its client's cap, with ``Retry-After`` (seconds)."""
        cfg = self.config.feedback
        message = (f"feedback: over the cap of {cfg.per_client_per_minute} feedbacks per minute from one client "
                   f"to this router replica (spec.canary.analysis.feedbackPerClient.maxPerMinute); this one was "
                   f"not counted. Send it again in {retry_after} s: its request_id stays unused until "
                   f"{cfg.ttl_seconds} s after the answer")
        return JSONResponse({"error": message, "version": fb.version, "request_id": fb.request_id},
                            status_code=429, headers={"Retry-After": str(retry_after)})

    def _count_feedback(self, fb: Feedback, now: float) -> None:
        """The metrics of one credited feedback, and the override it judges."""
        cfg = self.config.feedback
        tags = {"version": fb.version}
        self.m_feedback.inc(1, tags)
        if fb.reward > 0:
            self.m_reward_pos.inc(fb.reward, tags)
        elif fb.reward < 0:
            self.m_reward_neg.inc(-fb.reward, tags)
        self.m_reward_scaled.observe(cfg.scaled(fb.reward), tags)
        if fb.negative:
            self.m_negative.inc(1, tags)
        judged = self.comparisons.judge(fb.request_id, good=not fb.negative and cfg.scaled(fb.reward) >= 0.5, now=now)
        if judged is not None:
            evaluated, right = judged
            self.m_override_feedback.inc(1, {"version": evaluated})
            if right:
                self.m_override_correct.inc(1, {"version": evaluated})


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
