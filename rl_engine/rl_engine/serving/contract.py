"""The contract between the operator and the serving application: one home, the standard library only.

The operator (``rl_operator.rayserve``, ``rl_operator.analysis``) writes Ray Serve configs and
queries Prometheus; the serving application (:mod:`rl_engine.serving.config`,
:mod:`rl_engine.serving.app`) reads those configs and exports those metrics. Both import the
names below from here, so that they cannot drift apart. The operator image installs
``rl_engine`` without its dependencies for this module alone: it must import nothing outside
the standard library (``tests/unit/test_serving_contract.py`` checks that in a bare interpreter).

* The application: its builder (:data:`IMPORT_PATH`), its ``args`` fields
  (:data:`ARGS_KEYS`, :data:`VERSION_KEYS`, :data:`FEEDBACK_KEYS`), version names
  (:data:`VERSION_RE`), the per-client feedback cap and its check (:func:`feedback_cap_errors`,
  also the CRD's bounds of ``spec.canary.analysis.feedbackPerClient``).
* The deployments: the ``router`` ingress (:data:`ROUTER_DEPLOYMENT`), whose ``user_config``
  holds the traffic split under :data:`WEIGHTS_KEY`, the shadow or override comparison
  (:data:`SHADOW_KEY`, :data:`BASELINE_KEY`) and the circuit breaker (:data:`BREAKER_KEY`,
  :data:`BREAKER_KEYS`); one ``policy-<version>`` per version (:func:`policy_deployment_name`).
* The metrics: the router's ``ray.util.metrics`` names (:data:`METRIC_NAMES`) with their tags
  (:data:`METRIC_TAGS`), and the Prometheus series Ray's metrics agent exports them as
  (:func:`counter_series`, :func:`bucket_series`).
"""

from __future__ import annotations

import re

__all__ = [
    "IMPORT_PATH",
    "ROUTER_DEPLOYMENT",
    "WEIGHTS_KEY",
    "SHADOW_KEY",
    "BASELINE_KEY",
    "BREAKER_KEY",
    "BREAKER_KEYS",
    "USER_CONFIG_KEYS",
    "VERSION_RE",
    "ARGS_KEYS",
    "VERSION_KEYS",
    "FEEDBACK_KEYS",
    "DEFAULT_FEEDBACK_PER_CLIENT_PER_MINUTE",
    "MAX_FEEDBACK_PER_CLIENT_PER_MINUTE",
    "HEADER_NAME_PATTERN",
    "MAX_HEADER_NAME_LENGTH",
    "feedback_cap_errors",
    "METRIC_NAMES",
    "METRIC_TAGS",
    "policy_deployment_name",
    "counter_series",
    "gauge_series",
    "bucket_series",
]

#: The application builder (Serve's ``import_path``).
IMPORT_PATH = "rl_engine.serving.app:build_app"
#: The ingress deployment: it splits traffic between the versions.
ROUTER_DEPLOYMENT = "router"
#: The router's ``user_config``: ``{"weights": {"<version>": <percent>, ...}}``.
WEIGHTS_KEY = "weights"
#: ``"shadow": "<version>"``: every request another version answers is also sent to this
#: version (weight 0) off the response path; its answer is compared, never returned (shadow mode).
SHADOW_KEY = "shadow"
#: ``"overrideBaseline": "<version>"``: every request another version answers is also sent to
#: this version off the response path, to count how often the answering version overrides it.
BASELINE_KEY = "overrideBaseline"
#: ``"circuitBreaker": {"stable": "<version>", "consecutiveErrors": N, "timeoutSeconds"?: T}``:
#: a request another version fails (5xx, or no answer within T seconds) is answered by
#: ``stable`` instead; after N consecutive failures the router sends every request to
#: ``stable`` until its next reconfiguration without a breaker.
BREAKER_KEY = "circuitBreaker"
BREAKER_KEYS = frozenset({"stable", "consecutiveErrors", "timeoutSeconds"})
#: Every field of the router's ``user_config``.
USER_CONFIG_KEYS = frozenset({WEIGHTS_KEY, SHADOW_KEY, BASELINE_KEY, BREAKER_KEY})
#: A version name: letters, digits, ``.``, ``_``, ``-``; starts and ends alphanumeric; <= 63.
VERSION_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
#: The application's ``args`` fields.
ARGS_KEYS = frozenset({"agent", "namespace", "versions", "maxBatchSize", "batchWaitTimeoutS", "policyNumCpus",
                       "policyNumGpus", "artifactRoot", "feedback"})
#: One entry of ``args.versions``: the artifact and the fingerprint it must have.
VERSION_KEYS = frozenset({"artifactURI", "fingerprint"})
#: ``args.feedback``: the request-id signing key, the declared reward range, the TTL, and the
#: per-client cap (``perClientPerMinute``, ``clientHeader``).
FEEDBACK_KEYS = frozenset({"key", "rewardMin", "rewardMax", "ttlSeconds", "perClientPerMinute", "clientHeader"})
#: ``perClientPerMinute`` when not given: feedbacks one client may send to one router replica per
#: minute (10 a second; 0 means no cap). Also the CRD's default.
DEFAULT_FEEDBACK_PER_CLIENT_PER_MINUTE = 600
#: Largest ``perClientPerMinute`` (feedbacks per minute).
MAX_FEEDBACK_PER_CLIENT_PER_MINUTE = 1_000_000
#: ``clientHeader``: empty (the client is its source address) or an HTTP header name, an RFC 9110
#: token (letters, digits and ``!#$%&'*+-.^_`|~``).
HEADER_NAME_PATTERN = r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+)?$"
MAX_HEADER_NAME_LENGTH = 128

#: The router's ``ray.util.metrics`` names, by role.
METRIC_NAMES = {
    "requests": "rlops_serve_requests",
    "errors": "rlops_serve_errors",
    "latency": "rlops_serve_latency_seconds",
    "feedback": "rlops_serve_feedback",
    "reward_positive": "rlops_serve_feedback_reward_positive",
    "reward_negative": "rlops_serve_feedback_reward_negative",
    "negative_feedback": "rlops_serve_negative_feedback",
    "reward_scaled": "rlops_serve_feedback_reward_scaled",
    # shadow / override comparison, tagged with the version under evaluation (the shadow, or
    # the version that answered while an override baseline is set)
    "decisions": "rlops_serve_compared_decisions",
    "agreements": "rlops_serve_compared_agreements",
    "override_feedback": "rlops_serve_override_feedback",
    "override_correct": "rlops_serve_override_correct",
    "mirror_dropped": "rlops_serve_mirror_dropped",
    # circuit breaker, tagged with the version whose failures it counts
    "circuit_open": "rlops_serve_circuit_open",
    "circuit_opens": "rlops_serve_circuit_opens",
    "circuit_fallbacks": "rlops_serve_circuit_fallbacks",
    # feedback refused by the per-client cap (HTTP 429), tagged with the version its (verified) id names
    "feedback_capped": "rlops_serve_feedback_capped",
}
#: The tags (Prometheus labels) of every one of those metrics.
METRIC_TAGS = ("namespace", "agent", "version")
#: Ray's metrics agent exports every application metric with this prefix.
_RAY_PREFIX = "ray_"


def feedback_cap_errors(per_minute: object, client_header: object) -> list[str]:
    """What is wrong with a per-client feedback cap, one message per field, each naming it as in
    ``args.feedback`` (``perClientPerMinute: ...``); empty when both are valid.

    Args:
        per_minute: feedbacks one client may send to one router replica per minute: an integer
            in [0, :data:`MAX_FEEDBACK_PER_CLIENT_PER_MINUTE`], 0 for no cap.
        client_header: ``""`` (the client is the request's source address) or an HTTP header
            name matching :data:`HEADER_NAME_PATTERN`, at most :data:`MAX_HEADER_NAME_LENGTH`
            characters.
    """
    errors = []
    if isinstance(per_minute, bool) or not isinstance(per_minute, int) \
            or not 0 <= per_minute <= MAX_FEEDBACK_PER_CLIENT_PER_MINUTE:
        errors.append(f"perClientPerMinute: must be an integer in [0, {MAX_FEEDBACK_PER_CLIENT_PER_MINUTE}] "
                      f"(0: no cap), got {per_minute!r}")
    if not isinstance(client_header, str) or len(client_header) > MAX_HEADER_NAME_LENGTH \
            or not re.fullmatch(HEADER_NAME_PATTERN, client_header):
        errors.append(f"clientHeader: must be empty (the source address) or an HTTP header name (letters, digits "
                      f"and !#$%&'*+-.^_`|~, at most {MAX_HEADER_NAME_LENGTH} characters), got {client_header!r:.200}")
    return errors


def policy_deployment_name(version: str) -> str:
    """``policy-<version>``: the deployment that serves one version."""
    return f"policy-{version}"


def counter_series(role: str) -> str:
    """The Prometheus series of a counter in :data:`METRIC_NAMES` (``ray_<name>_total``).
    Raises ``KeyError`` for an unknown role."""
    return f"{_RAY_PREFIX}{METRIC_NAMES[role]}_total"


def gauge_series(role: str) -> str:
    """The Prometheus series of a gauge in :data:`METRIC_NAMES` (``ray_<name>``).
    Raises ``KeyError`` for an unknown role."""
    return f"{_RAY_PREFIX}{METRIC_NAMES[role]}"


def bucket_series(role: str) -> str:
    """The bucket series of a histogram in :data:`METRIC_NAMES` (``ray_<name>_bucket``).
    Raises ``KeyError`` for an unknown role."""
    return f"{_RAY_PREFIX}{METRIC_NAMES[role]}_bucket"
