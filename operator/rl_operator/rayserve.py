"""The Ray Serve adapter: every call the operator makes to Ray Serve goes through here.

It speaks Ray Serve's declarative REST API on the Ray dashboard (``httpx``; no ray, no torch):

* ``GET  <dashboard>/api/serve/applications/``: status and deployed config of every application.
* ``PUT  <dashboard>/api/serve/applications/``: the *whole* declarative config (every
  application). An application missing from the body is deleted.

So every write here is a read-modify-write: GET the current config, change only the one
application this call is about (insert/replace it, change its router's ``user_config``, or
remove it), and PUT everything back, including the applications the operator does not own,
exactly as they were submitted (their ``deployed_app_config``), and Serve's ``http_options``,
``grpc_options``, ``proxy_location`` and ``target_capacity``. Writes from this process are
serialized by a lock; Ray offers no compare-and-swap, so a concurrent writer elsewhere (another
operator replica, a human's ``serve deploy``) can still race: run one operator replica (leader
election) and deploy other applications through the same API.

One RLAgent = one application, built by :func:`app_config`: name ``<namespace>.<agent>``, route
prefix ``/<namespace>/<agent>``, import path ``rl_engine.serving.app:build_app``, the versions
as ``args``, the traffic split as the ``router`` deployment's ``user_config``. A weight change
(:func:`set_weights`) touches only that ``user_config``: Serve applies it with the router's
``reconfigure()``, restarting no replica. Changing the set of versions changes ``args``, which
rebuilds the application (a rolling restart with surge: new replicas start before old ones stop).

All functions are synchronous (kopf runs sync handlers in threads); timeouts are in seconds.
Layout and HTTP API of the application: ``docs/serving.md``.
"""

from __future__ import annotations

import copy
import re
import threading
import time
from typing import Any, Mapping

import httpx
from rl_engine.serving.contract import (
    DEFAULT_FEEDBACK_PER_CLIENT_PER_MINUTE,
    IMPORT_PATH,
    ROUTER_DEPLOYMENT,
    VERSION_KEYS,
    WEIGHTS_KEY,
    feedback_cap_errors,
)

__all__ = [
    "IMPORT_PATH",
    "ROUTER_DEPLOYMENT",
    "DEFAULT_TIMEOUT_S",
    "RayServeError",
    "RayServeUnavailable",
    "ApplicationNotFound",
    "DeployFailed",
    "app_name",
    "app_config",
    "normalize_weights",
    "deploy_body",
    "with_application",
    "without_application",
    "with_weights",
    "application_versions",
    "application_weights",
    "router_extras",
    "application_summary",
    "failure_message",
    "get_applications",
    "put_applications",
    "apply_application",
    "set_weights",
    "delete_application",
    "application_status",
    "wait_running",
]

DEFAULT_TIMEOUT_S = 10.0
API_PATH = "/api/serve/applications/"
#: Ray Serve application statuses (``ray.serve.schema.ApplicationStatus``).
STATUSES = ("NOT_STARTED", "DEPLOYING", "DEPLOY_FAILED", "RUNNING", "UNHEALTHY", "DELETING")

_write_lock = threading.Lock()


class RayServeError(RuntimeError):
    """A Ray Serve REST call failed or was refused; the message says which and why."""


class RayServeUnavailable(RayServeError):
    """The dashboard could not be reached (connection error or timeout) or answered 5xx."""


class ApplicationNotFound(RayServeError):
    """The named application is not deployed."""


class DeployFailed(RayServeError):
    """The application's status is DEPLOY_FAILED; the message carries Serve's reason."""


# --------------------------------------------------------------------------- pure parts


def app_name(namespace: str, agent: str) -> str:
    """The Serve application name of an RLAgent: ``<namespace>.<agent>`` (namespaces hold no dots,
    so no two agents share a name; a dash would make ``a-b``+``c`` and ``a``+``b-c`` collide)."""
    return f"{namespace}.{agent}"


def normalize_weights(weights: Mapping[str, Any], versions: list[str] | tuple[str, ...] | Any) -> dict[str, int]:
    """Validate a traffic split and fill in the versions it leaves out with 0.

    Args:
        weights: version -> integer percent in [0, 100]; the percents sum to 100.
        versions: the versions the application serves.

    Returns:
        ``{version: percent}`` for every version, in ``versions`` order.

    Raises:
        ValueError: a weight names an unknown version, is not an integer in [0, 100], or
            the weights do not sum to 100.
    """
    names = list(versions)
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights: must be a mapping version -> percent, got {weights!r}")
    out = {v: 0 for v in names}
    for version, w in weights.items():
        if version not in out:
            raise ValueError(f"weights.{version}: not a version of the application (versions: {', '.join(names)})")
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 100:
            raise ValueError(f"weights.{version}: must be an integer percent in [0, 100], got {w!r}")
        out[version] = w
    total = sum(out.values())
    if total != 100:
        raise ValueError(f"weights: must sum to 100, got {total} ({out})")
    return out


def _version_entry(version: str, spec: Any) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        uri, fingerprint = spec.get("artifactURI"), spec.get("fingerprint")
        unknown = sorted(set(spec) - VERSION_KEYS)
        if unknown:
            raise ValueError(f"versions.{version}.{unknown[0]}: unknown field (artifactURI, fingerprint)")
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        uri, fingerprint = spec
    else:
        raise ValueError(f"versions.{version}: must be {{'artifactURI', 'fingerprint'}} or (uri, fingerprint)")
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"versions.{version}.artifactURI: required, a non-empty string")
    entry = {"artifactURI": uri}
    if fingerprint is not None:
        if not isinstance(fingerprint, str) or not fingerprint.startswith("sha256:"):
            raise ValueError(f"versions.{version}.fingerprint: must be 'sha256:<hex>', got {fingerprint!r}")
        entry["fingerprint"] = fingerprint
    return entry


def app_config(
    namespace: str,
    agent: str,
    versions: Mapping[str, Any],
    weights: Mapping[str, int],
    route_prefix: str | None = None,
    *,
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.002,
    import_path: str = IMPORT_PATH,
    feedback_key: str | None = None,
    reward_min: float = -1.0,
    reward_max: float = 1.0,
    feedback_ttl_seconds: int = 600,
    feedback_per_client_per_minute: int = DEFAULT_FEEDBACK_PER_CLIENT_PER_MINUTE,
    feedback_client_header: str = "",
    artifact_root: str | None = None,
    router_extras: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Serve application entry of one RLAgent (pure).

    Args:
        namespace, agent: the RLAgent.
        versions: version -> ``{"artifactURI": ..., "fingerprint": "sha256:..."}`` (or an
            ``(uri, fingerprint)`` pair). Version names: letters, digits, ``.``, ``_``, ``-``.
        weights: version -> percent (integers summing to 100; missing versions get 0).
        route_prefix: default ``/<namespace>/<agent>``.
        max_batch_size, batch_wait_timeout_s: ``@serve.batch`` of the policy deployments.
        import_path: the application builder.
        feedback_key: the application's request-id signing key (HMAC-SHA256), 32 to 256
            lowercase hex digits (derive one per application). ``None``: the router refuses
            every feedback with 503.
        reward_min, reward_max: the declared range of the feedback reward (reward units,
            finite, ``reward_min < reward_max``: ``spec.canary.analysis.rewardRange``).
        feedback_ttl_seconds: feedback is accepted this many seconds after the answer
            (integer in [1, 86400]).
        feedback_per_client_per_minute: feedbacks one client may send to one router replica
            per minute (integer in [0, 1000000]; 0: no cap); more get 429 and are not counted
            (``spec.canary.analysis.feedbackPerClient.maxPerMinute``).
        feedback_client_header: ``""``: a client is its source address; else the HTTP header
            (set by a trusted gateway) whose value names the client
            (``spec.canary.analysis.feedbackPerClient.clientHeader``).
        artifact_root: when set, the serving replicas refuse any artifact URI that is not under
            ``<artifact_root>/<namespace>/<agent>/`` (``args.artifactRoot``).
        router_extras: the router's ``user_config`` besides the weights (``shadow``,
            ``overrideBaseline``, ``circuitBreaker``; validated by the router).

    Returns:
        ``{"name", "route_prefix", "import_path", "args", "deployments": [router user_config]}``;
        ``args.feedback`` is ``{"key"?, "rewardMin", "rewardMax", "ttlSeconds", "perClientPerMinute",
        "clientHeader"}``.

    Raises:
        ValueError: no versions, a malformed version entry, invalid weights, or invalid
            feedback settings (the key's value is never repeated in the message).
    """
    if not namespace or not agent:
        raise ValueError("namespace and agent are required")
    if not versions:
        raise ValueError("versions: at least one version is required")
    entries = {str(v): _version_entry(str(v), spec) for v, spec in versions.items()}
    split = normalize_weights(weights, list(entries))
    feedback = _feedback_args(feedback_key, reward_min, reward_max, feedback_ttl_seconds,
                              feedback_per_client_per_minute, feedback_client_header)
    return {
        "name": app_name(namespace, agent),
        "route_prefix": route_prefix or f"/{namespace}/{agent}",
        "import_path": import_path,
        "args": {
            "agent": agent,
            "namespace": namespace,
            "versions": entries,
            "maxBatchSize": max_batch_size,
            "batchWaitTimeoutS": batch_wait_timeout_s,
            "feedback": feedback,
            **({"artifactRoot": artifact_root} if artifact_root else {}),
        },
        "deployments": [{"name": ROUTER_DEPLOYMENT, "user_config": {WEIGHTS_KEY: split, **(router_extras or {})}}],
    }

def _feedback_args(key: str | None, reward_min: float, reward_max: float, ttl_seconds: int, per_client_per_minute: int,
                   client_header: str) -> dict[str, Any]:
    """``args.feedback`` of :func:`app_config`, validated (ValueError naming the argument; the
    key's value is never repeated)."""
    if key is not None and (not isinstance(key, str) or len(key) % 2 or not re.fullmatch(r"[0-9a-f]{32,256}", key)):
        raise ValueError("feedback_key: must be an even number (32 to 256) of lowercase hex digits")
    if not float("-inf") < reward_min < reward_max < float("inf"):  # also refuses NaN
        raise ValueError(f"reward_min, reward_max: must be finite with reward_min < reward_max, "
                         f"got {reward_min!r}, {reward_max!r}")
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 1 <= ttl_seconds <= 86400:
        raise ValueError(f"feedback_ttl_seconds: must be an integer in [1, 86400], got {ttl_seconds!r}")
    cap_errors = feedback_cap_errors(per_client_per_minute, client_header)
    if cap_errors:
        raise ValueError("; ".join(f"args.feedback.{e}" for e in cap_errors))
    feedback: dict[str, Any] = {"rewardMin": float(reward_min), "rewardMax": float(reward_max), "ttlSeconds": ttl_seconds,
                                "perClientPerMinute": per_client_per_minute, "clientHeader": client_header}
    if key is not None:
        feedback["key"] = key
    return feedback


def application_versions(app: Mapping[str, Any]) -> list[str]:
    """The versions an application entry (as built by :func:`app_config`) serves."""
    return list(((app.get("args") or {}).get("versions") or {}).keys())


def application_weights(app: Mapping[str, Any]) -> dict[str, int] | None:
    """The router's weights in an application entry, or None when it sets none."""
    for dep in app.get("deployments") or []:
        if dep.get("name") == ROUTER_DEPLOYMENT:
            weights = (dep.get("user_config") or {}).get(WEIGHTS_KEY)
            return dict(weights) if isinstance(weights, Mapping) else None
    return None


def router_extras(app: Mapping[str, Any]) -> dict[str, Any] | None:
    """The router's ``user_config`` in an application entry besides the weights (shadow,
    override baseline, circuit breaker), or None when it sets no ``user_config``."""
    for dep in app.get("deployments") or []:
        if dep.get("name") == ROUTER_DEPLOYMENT and isinstance(dep.get("user_config"), Mapping):
            return {k: v for k, v in dep["user_config"].items() if k != WEIGHTS_KEY}
    return None


def with_weights(app: Mapping[str, Any], weights: Mapping[str, int],
                 extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A copy of the application entry whose router ``user_config`` is the new split (and
    ``extras``: shadow, override baseline, circuit breaker); nothing else changes (so Serve
    reconfigures the router in place). Raises ``ValueError``."""
    versions = application_versions(app)
    if not versions:
        raise ValueError(f"application {app.get('name')!r} has no args.versions: not an rlops application")
    split = normalize_weights(weights, versions)
    out = copy.deepcopy(dict(app))
    deployments = list(out.get("deployments") or [])
    for i, dep in enumerate(deployments):
        if dep.get("name") == ROUTER_DEPLOYMENT:
            deployments[i] = {**dep, "user_config": {WEIGHTS_KEY: split, **(extras or {})}}
            break
    else:
        deployments.append({"name": ROUTER_DEPLOYMENT, "user_config": {WEIGHTS_KEY: split, **(extras or {})}})
    out["deployments"] = deployments
    return out


def deploy_body(details: Mapping[str, Any]) -> dict[str, Any]:
    """The PUT body that redeploys exactly what a GET returned (pure).

    Keeps every application (as submitted: its ``deployed_app_config``), in order, except
    those being deleted, and Serve's instance-wide options.

    Raises:
        RayServeError: an application has no declarative config (it was deployed with
            ``serve.run``): a PUT would delete it, so nothing is written.
    """
    body: dict[str, Any] = {}
    for key in ("proxy_location", "http_options", "grpc_options"):
        if details.get(key) is not None:
            body[key] = copy.deepcopy(details[key])
    if details.get("target_capacity") is not None:
        body["target_capacity"] = details["target_capacity"]
    apps = []
    for name, app in (details.get("applications") or {}).items():
        if app.get("status") == "DELETING":
            continue
        config = app.get("deployed_app_config")
        if not config:
            raise RayServeError(
                f"application {name!r} was not deployed through the declarative API (source "
                f"{app.get('source')!r}); a PUT of the full config would delete it, so nothing was written")
        apps.append(copy.deepcopy(config))
    body["applications"] = apps
    return body


def with_application(body: Mapping[str, Any], app: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the PUT body with ``app`` inserted, or replacing the one of the same name (pure)."""
    out = copy.deepcopy(dict(body))
    apps = list(out.get("applications") or [])
    for i, existing in enumerate(apps):
        if existing.get("name") == app["name"]:
            apps[i] = copy.deepcopy(dict(app))
            break
    else:
        apps.append(copy.deepcopy(dict(app)))
    out["applications"] = apps
    return out


def without_application(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A copy of the PUT body without the application ``name`` (pure)."""
    out = copy.deepcopy(dict(body))
    out["applications"] = [a for a in out.get("applications") or [] if a.get("name") != name]
    return out


def application_summary(details: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """A compact view of one application from GET details, or None when absent (pure):
    ``status``, ``message``, ``config`` (deployed_app_config) and per deployment its
    ``status``, ``status_trigger`` and ``replicas`` (``replica_id``, ``actor_id``, ``pid``,
    ``state``, ``start_time_s``)."""
    app = (details.get("applications") or {}).get(name)
    if app is None:
        return None
    deployments = {}
    for dname, dep in (app.get("deployments") or {}).items():
        deployments[dname] = {
            "status": dep.get("status"),
            "status_trigger": dep.get("status_trigger"),
            "message": dep.get("message", ""),
            "user_config": (dep.get("deployment_config") or {}).get("user_config"),
            "target_num_replicas": dep.get("target_num_replicas"),
            "replicas": [
                {k: r.get(k) for k in ("replica_id", "actor_id", "pid", "state", "start_time_s")}
                for r in dep.get("replicas") or []
            ],
        }
    return {"name": name, "status": app.get("status"), "message": app.get("message", ""),
            "route_prefix": app.get("route_prefix"), "config": app.get("deployed_app_config"),
            "deployments": deployments}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_and_last_line(text: Any) -> str:
    """A Serve message without its traceback: the first line, and the last one (the
    exception) when there are more."""
    lines = [line.strip() for line in _ANSI.sub("", str(text or "")).splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} ... {lines[-1]}"


def failure_message(summary: Mapping[str, Any], limit: int = 3000) -> str:
    """The application's message plus those of its deployments that are not HEALTHY (where
    Serve puts the reason, e.g. the replica constructor's exception), each without its
    traceback (first and last line), shortened to ``limit`` characters."""
    parts = [_first_and_last_line(summary.get("message"))]
    for name, dep in (summary.get("deployments") or {}).items():
        if dep.get("status") != "HEALTHY" and dep.get("message"):
            parts.append(f"{name}: {_first_and_last_line(dep['message'])}")
    text = " | ".join(p for p in parts if p) or "(no message)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_subset(expected: Any, actual: Any) -> bool:
    """Every key of ``expected`` is in ``actual`` with an equal value (recursively; lists of
    named objects are matched by ``name``)."""
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and all(k in actual and _is_subset(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list) and expected and all(isinstance(x, Mapping) and "name" in x for x in expected):
        if not isinstance(actual, list):
            return False
        by_name = {a.get("name"): a for a in actual if isinstance(a, Mapping)}
        return all(x["name"] in by_name and _is_subset(x, by_name[x["name"]]) for x in expected)
    return expected == actual


# --------------------------------------------------------------------------- HTTP


def _url(base_url: str) -> str:
    return base_url.rstrip("/") + API_PATH


def get_applications(base_url: str, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """``GET /api/serve/applications/``: Serve's instance details (``applications`` by name,
    each with ``status``, ``message``, ``deployed_app_config``, ``deployments`` with their
    replicas; plus ``http_options``, ``proxy_location`` ...).

    Raises:
        RayServeUnavailable: connection error, timeout or 5xx.
        RayServeError: any other non-200 answer or a body that is not a JSON object.
    """
    url = _url(base_url)
    try:
        resp = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as err:
        raise RayServeUnavailable(f"GET {url}: {type(err).__name__}: {err}") from err
    if resp.status_code >= 500:
        raise RayServeUnavailable(f"GET {url}: HTTP {resp.status_code}: {resp.text[:1000]}")
    if resp.status_code != 200:
        raise RayServeError(f"GET {url}: HTTP {resp.status_code}: {resp.text[:1000]}")
    try:
        details = resp.json()
    except ValueError as err:
        raise RayServeError(f"GET {url}: not JSON: {resp.text[:200]!r}") from err
    if not isinstance(details, dict):
        raise RayServeError(f"GET {url}: expected a JSON object, got {type(details).__name__}")
    details.setdefault("applications", {})
    return details


def put_applications(base_url: str, body: Mapping[str, Any], timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """``PUT /api/serve/applications/`` with the full config. Prefer the read-modify-write
    functions below; this one replaces everything.

    Raises:
        RayServeUnavailable: connection error, timeout or 5xx.
        RayServeError: Serve refused the config (400: the message is Serve's validation error).
    """
    url = _url(base_url)
    try:
        resp = httpx.put(url, json=dict(body), timeout=timeout)
    except httpx.HTTPError as err:
        raise RayServeUnavailable(f"PUT {url}: {type(err).__name__}: {err}") from err
    if resp.status_code >= 500:
        raise RayServeUnavailable(f"PUT {url}: HTTP {resp.status_code}: {resp.text[:2000]}")
    if resp.status_code != 200:
        raise RayServeError(f"PUT {url}: HTTP {resp.status_code}: {resp.text[:2000]}")


def _read_modify_write(base_url: str, change, timeout: float) -> dict[str, Any]:
    with _write_lock:
        body = deploy_body(get_applications(base_url, timeout))
        new_body = change(body)
        if new_body != body:
            put_applications(base_url, new_body, timeout)
        return new_body


def apply_application(base_url: str, app_config: Mapping[str, Any], timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Insert or replace one application (by ``name``), keeping every other application.

    Returns:
        The full config that is now deployed (the PUT body; unchanged config: no PUT).

    Raises:
        ValueError: ``app_config`` has no ``name`` or ``import_path``.
        RayServeError / RayServeUnavailable: see :func:`get_applications`, :func:`put_applications`,
            :func:`deploy_body`.
    """
    if not app_config.get("name") or not app_config.get("import_path"):
        raise ValueError("app_config: 'name' and 'import_path' are required")
    return _read_modify_write(base_url, lambda body: with_application(body, app_config), timeout)


def set_weights(base_url: str, app_name: str, weights: Mapping[str, int], timeout: float = DEFAULT_TIMEOUT_S,
                extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Change the traffic split of one application: only its router's ``user_config``.

    Args:
        weights: version -> integer percent; sum 100; versions left out get 0.
        extras: the rest of the router's ``user_config`` (shadow, override baseline, circuit
            breaker); None or empty: none of them.

    Returns:
        The application's new entry.

    Raises:
        ApplicationNotFound: no such application.
        ValueError: the weights are invalid for the application's versions (nothing written).
        RayServeError / RayServeUnavailable: as for :func:`apply_application`.
    """
    written: dict[str, Any] = {}

    def change(body: dict[str, Any]) -> dict[str, Any]:
        for app in body.get("applications") or []:
            if app.get("name") == app_name:
                written.update(with_weights(app, weights, extras))
                return with_application(body, written)
        raise ApplicationNotFound(f"application {app_name!r} is not deployed")

    _read_modify_write(base_url, change, timeout)
    return written


def delete_application(base_url: str, app_name: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Remove one application, keeping every other one. Returns False if it was not deployed."""
    found = []

    def change(body: dict[str, Any]) -> dict[str, Any]:
        found.extend(a for a in body.get("applications") or [] if a.get("name") == app_name)
        return without_application(body, app_name)

    _read_modify_write(base_url, change, timeout)
    return bool(found)


def application_status(base_url: str, app_name: str, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """The application's Serve status: ``RUNNING``, ``DEPLOYING``, ``DEPLOY_FAILED``,
    ``UNHEALTHY``, ``DELETING``, or ``NOT_STARTED`` (also when it is not deployed at all)."""
    app = (get_applications(base_url, timeout).get("applications") or {}).get(app_name)
    return str(app.get("status")) if app else "NOT_STARTED"


def wait_running(
    base_url: str,
    app_name: str,
    timeout: float,
    expect: Mapping[str, Any] | None = None,
    interval: float = 1.0,
    request_timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Poll until the application is RUNNING with every deployment HEALTHY and every
    replica RUNNING (and, with ``expect``, its deployed config contains ``expect``).

    The first poll waits ``min(interval, 0.5)`` s, a few Serve controller loops, so a status
    from before a write just made is not taken for the result of it.

    Args:
        timeout: overall seconds.
        expect: an application entry (e.g. what :func:`set_weights` returned) that the
            deployed config must contain.
        interval: seconds between polls.

    Returns:
        :func:`application_summary` of the application.

    Raises:
        DeployFailed: status DEPLOY_FAILED (for the expected config), with Serve's message.
        TimeoutError: not running in time; the message has the last status and message.
        RayServeError / RayServeUnavailable: a GET failed (connection errors are retried
            until the timeout).
    """
    deadline = time.monotonic() + timeout
    time.sleep(min(interval, 0.5))
    last = "never answered"
    while True:
        try:
            summary = application_summary(get_applications(base_url, request_timeout), app_name)
        except RayServeUnavailable as err:
            summary, last = None, str(err)
        else:
            if summary is None:
                last = "not deployed"
            elif expect is not None and not _is_subset(dict(expect), summary["config"] or {}):
                last = f"{summary['status']} with another config (ours not applied yet)"
            else:
                status = summary["status"]
                last = f"{status}: {summary['message']}".strip()
                if status == "DEPLOY_FAILED":
                    raise DeployFailed(f"application {app_name!r} DEPLOY_FAILED: {failure_message(summary)}")
                deps = summary["deployments"]
                if status == "RUNNING" and deps and all(
                    d["status"] == "HEALTHY" and d["status_trigger"] != "CONFIG_UPDATE_STARTED"
                    and all(r["state"] == "RUNNING" for r in d["replicas"])
                    and len(d["replicas"]) >= (d["target_num_replicas"] or 0)
                    for d in deps.values()
                ):
                    return summary
                if status == "RUNNING":
                    pending = {n: f"{d['status']}/{d['status_trigger']}" for n, d in deps.items()
                               if d["status"] != "HEALTHY" or d["status_trigger"] == "CONFIG_UPDATE_STARTED"}
                    last = f"RUNNING, deployments settling: {pending}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"application {app_name!r} not running after {timeout:.0f}s (last: {last})")
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
