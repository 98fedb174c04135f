"""Unit tests of the serving application's pure parts (``rl_engine.serving.config``) and of the
policy loader (``rl_engine.policy``) on a real (untrained) network saved as an artifact.

The Ray Serve application itself runs in ``tests/e2e/test_serving.py``.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from rl_engine.artifacts import (
    FINGERPRINT_FILE,
    ArtifactError,
    ArtifactStore,
    FingerprintMismatch,
    UnsafeArtifactReference,
    compute_fingerprint,
    file_digests,
)
from rl_engine.policy import InvalidObservation, NonFinitePolicyOutput, load_policy, load_verified_policy
from rl_engine.ppo import Agent, policy_spec
from rl_engine.serving import config as sc
from rl_engine.serving.testing import poison_artifact
from support import count_opens as _count_opens

FP = "sha256:" + "a" * 64
ARGS = {"agent": "cartpole", "namespace": "default",
        "versions": {"v1": {"artifactURI": "file:///x/v1", "fingerprint": FP}, "v2": {"artifactURI": "file:///x/v2"}},
        "maxBatchSize": 16, "batchWaitTimeoutS": 0.005}


# ----------------------------------------------------------------- application args


def test_parse_args():
    cfg = sc.parse_args(ARGS)
    assert cfg.agent == "cartpole" and cfg.namespace == "default"
    assert cfg.versions == {"v1": sc.VersionSpec("v1", "file:///x/v1", FP), "v2": sc.VersionSpec("v2", "file:///x/v2")}
    assert (cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.policy_num_cpus, cfg.policy_num_gpus) == (16, 0.005, 0, 0)
    defaults = sc.parse_args({k: v for k, v in ARGS.items() if k in ("agent", "namespace", "versions")})
    assert (defaults.max_batch_size, defaults.batch_wait_timeout_s) == (32, 0.002)


@pytest.mark.parametrize("change, fragment", [
    ({"agent": ""}, "args.agent: required"),
    ({"versions": {}}, "args.versions: required"),
    ({"versions": {"bad name": {"artifactURI": "file:///x"}}}, "args.versions.bad name: invalid version name"),
    ({"versions": {"-v": {"artifactURI": "file:///x"}}}, "invalid version name"),
    ({"versions": {"v1": {"artifactURI": ""}}}, "args.versions.v1.artifactURI: required"),
    ({"versions": {"v1": {"artifactURI": "f", "fingerprint": "sha256:xyz"}}}, "fingerprint: must be"),
    ({"versions": {"v1": {"artifactURI": "f", "weight": 1}}}, "args.versions.v1.weight: unknown field"),
    ({"maxBatchSize": 0}, "args.maxBatchSize: must be in"),
    ({"maxBatchSize": 2.5}, "args.maxBatchSize: must be an integer"),
    ({"batchWaitTimeoutS": "fast"}, "args.batchWaitTimeoutS: must be a number"),
    ({"batchWaitTimeoutS": float("nan")}, "must be finite"),
    ({"replicas": 2}, "args.replicas: unknown field"),
])
def test_parse_args_errors_name_the_field(change, fragment):
    with pytest.raises(sc.ServingConfigError, match=fragment.replace(".", r"\.")):
        sc.parse_args({**ARGS, **change})


def test_parse_args_joins_errors():
    with pytest.raises(sc.ServingConfigError) as exc:
        sc.parse_args({"agent": "", "namespace": "", "versions": None})
    assert str(exc.value).count(";") == 2


ROOT = "file:///var/lib/rlops/artifacts"


def _rooted(uri: str, **extra) -> dict:
    return {"agent": "cartpole", "namespace": "default", "artifactRoot": ROOT,
            "versions": {"v1": {"artifactURI": uri, "fingerprint": FP}}, **extra}


@pytest.mark.parametrize("root, uri", [
    (ROOT, ROOT + "/default/cartpole/cartpole-1-0a1b2c3d"),
    (ROOT + "/", ROOT + "/default/cartpole/cartpole-1-0a1b2c3d/"),
    (ROOT, "/var/lib/rlops/artifacts/default/cartpole/run-1"),  # a plain path is file://
    ("s3://bucket/rlops", "s3://bucket/rlops/default/cartpole/run-1"),
    ("S3://bucket/rlops", "s3://bucket/rlops/default/cartpole/run-1"),
])
def test_artifact_root_accepts_uris_under_the_agents_directory(root, uri):
    cfg = sc.parse_args({**_rooted(uri), "artifactRoot": root})
    assert cfg.artifact_root == root and cfg.versions["v1"].artifact_uri == uri
    assert sc.parse_args(ARGS).artifact_root is None


@pytest.mark.parametrize("uri, fragment", [
    (ROOT + "/default/other-agent/run-1", "outside this agent's artifact directory"),
    (ROOT + "/team-b/cartpole/run-1", "outside this agent's artifact directory"),
    (ROOT + "/default/cartpole", "outside this agent's artifact directory"),  # the directory itself
    (ROOT + "/default/cartpole-2/run-1", "outside this agent's artifact directory"),  # a sibling prefix
    ("file:///var/lib/rlops/artifacts-evil/default/cartpole/run-1", "outside this agent's artifact directory"),
    ("s3://var/lib/rlops/artifacts/default/cartpole/run-1", "outside this agent's artifact directory"),
    ("memory:///var/lib/rlops/artifacts/default/cartpole/run-1", "outside this agent's artifact directory"),
    (ROOT + "/default/cartpole/../../team-b/cartpole/run-1", "'..' path components are refused"),
    (ROOT + "/default/cartpole/run-1/..", "'..' path components are refused"),
    (ROOT + "/default/cartpole/./run-1", "'.' path components"),
    (ROOT + "/default//cartpole/run-1", "empty or '.' path components"),
    ("simplecache::" + ROOT + "/default/cartpole/run-1", "chained URIs"),
    ("file://evil-host/var/lib/rlops/artifacts/default/cartpole/run-1", "file:///<absolute path>"),
    ("var/lib/rlops/artifacts/default/cartpole/run-1", "must be absolute"),
])
def test_artifact_root_refuses_uris_outside_the_agents_directory(uri, fragment):
    with pytest.raises(sc.ServingConfigError) as exc:
        sc.parse_args(_rooted(uri))
    msg = str(exc.value)
    assert msg.startswith("args.versions.v1.artifactURI: ") and fragment in msg
    if "outside" in fragment:
        assert f"version v1 must be under '{ROOT}/default/cartpole/'" in msg


@pytest.mark.parametrize("change, fragment", [
    ({"artifactRoot": ""}, "args.artifactRoot: must be a non-empty fsspec URI"),
    ({"artifactRoot": 3}, "args.artifactRoot: must be a non-empty fsspec URI"),
    ({"artifactRoot": ROOT + "/../x"}, "args.artifactRoot: "),
    ({"namespace": "default/cartpole", "agent": "run-1"}, "args.namespace: must be a single path segment"),
    ({"agent": ".."}, "args.agent: must be a single path segment"),
])
def test_artifact_root_errors(change, fragment):
    with pytest.raises(sc.ServingConfigError, match=re.escape(fragment)):
        sc.parse_args({**_rooted(ROOT + "/default/cartpole/run-1"), **change})


# ----------------------------------------------------------------- router user_config


def test_parse_weights_fills_missing_versions_with_zero():
    assert sc.parse_weights({"weights": {"v2": 100}}, ["v1", "v2"]) == {"v1": 0, "v2": 100}


@pytest.mark.parametrize("user_config, fragment", [
    (None, "user_config: must be an object"),
    ({}, "user_config.weights: required"),
    ({"weights": {"v1": 50}}, "must sum to 100, got 50"),
    ({"weights": {"v9": 100}}, "user_config.weights.v9: not a version"),
    ({"weights": {"v1": 50.0, "v2": 50}}, "integer percent"),
    ({"weights": {"v1": 100}, "sticky": True}, "user_config.sticky: unknown field"),
])
def test_parse_weights_errors(user_config, fragment):
    with pytest.raises(sc.ServingConfigError, match=fragment):
        sc.parse_weights(user_config, ["v1", "v2"])


# ----------------------------------------------------------------- request ids, bodies


KEY = bytes.fromhex("5e" * 32)
SCOPE = "default/cartpole"
T = 1_800_000_000.0  # a fixed "now" (Unix seconds)
FB = sc.FeedbackConfig(key=KEY, reward_min=-1.0, reward_max=1.0, ttl_seconds=600)


def _rid(version="v1", issued_at=T, key=KEY, scope=SCOPE):
    return sc.make_request_id(version, key, scope=scope, issued_at=issued_at)


def _check(rid, now=T, key=KEY, scope=SCOPE, ttl=600):
    return sc.parse_request_id(rid, key, scope=scope, ttl_seconds=ttl, now=now)


def test_request_ids_are_signed_and_name_the_version_and_issue_time():
    for version in ("v1", "cartpole-12", "run.3_b"):
        rid = _rid(version)
        assert re.fullmatch(re.escape(version) + r"\.1800000000\.[0-9a-f]{16}\.[0-9a-f]{32}", rid), rid
        assert _check(rid) == sc.RequestId(version, 1_800_000_000)
    assert _rid() != _rid()  # a fresh nonce each time


def test_a_made_up_request_id_is_refused():
    # The old contract: "<version>." + any 32 hex digits. And the new shape with a guessed signature.
    for forged in ("v1." + "0" * 32, f"v1.{int(T)}.{'0' * 16}.{'0' * 32}", f"v1.{int(T)}.{'ab' * 8}.{'f' * 32}"):
        with pytest.raises(sc.BadRequest, match="request_id"):
            _check(forged)
    with pytest.raises(sc.BadRequest, match="invalid signature"):
        _check(_rid(key=bytes.fromhex("5f" * 32)))  # another application's key
    with pytest.raises(sc.BadRequest, match="invalid signature"):
        _check(_rid(scope="default/other-agent"))  # same key, another application


def _tampered(rid: str) -> list[str]:
    version, issued, nonce, sig = rid.rsplit(".", 3)
    flip = lambda text, i: text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1:]  # noqa: E731
    return [f"v2.{issued}.{nonce}.{sig}",                      # credit another version
            f"{version}.{int(issued) + 500}.{nonce}.{sig}",    # make it younger
            f"{version}.{issued}.{flip(nonce, 0)}.{sig}",      # another answer
            f"{version}.{issued}.{nonce}.{flip(sig, 31)}"]     # one signature digit


def test_a_tampered_request_id_is_refused():
    rid = _rid("v1")
    assert _check(rid).version == "v1"
    for bad in _tampered(rid):
        with pytest.raises(sc.BadRequest, match="invalid signature"):
            _check(bad, now=T + 10)


def test_an_expired_request_id_is_refused():
    rid = _rid(issued_at=T)
    assert _check(rid, now=T + 600).issued_at == int(T)  # the last second of the TTL
    with pytest.raises(sc.BadRequest, match=r"expired: issued 601 s ago; feedback is accepted for 600 s"):
        _check(rid, now=T + 601)
    with pytest.raises(sc.BadRequest, match="expired"):
        _check(rid, now=T + 31, ttl=30)
    assert _check(_rid(issued_at=T + 60), now=T).version == "v1"  # clock skew between replicas
    with pytest.raises(sc.BadRequest, match="in the future"):
        _check(_rid(issued_at=T + 61), now=T)


@pytest.mark.parametrize("rid", [None, 3, "", "v1", "v1.xyz", "v1." + "A" * 32, "." + "0" * 32,
                                 "bad name.1.0000000000000000." + "0" * 32, "v1.1.0000000000000000." + "0" * 31,
                                 "v1.01.0000000000000000." + "0" * 32, "v1." + "1" * 200])
def test_malformed_request_ids(rid):
    with pytest.raises(sc.BadRequest, match="request_id"):
        _check(rid)


def test_parse_args_feedback():
    assert sc.parse_args(ARGS).feedback == sc.FeedbackConfig(key=None, reward_min=-1.0, reward_max=1.0,
                                                              ttl_seconds=600, per_client_per_minute=600,
                                                              client_header="")
    cfg = sc.parse_args({**ARGS, "feedback": {"key": "5e" * 32, "rewardMin": 0, "rewardMax": 5, "ttlSeconds": 30}})
    assert cfg.feedback == sc.FeedbackConfig(key=KEY, reward_min=0.0, reward_max=5.0, ttl_seconds=30)
    assert "5e5e" not in repr(cfg)  # the key is a secret: not in reprs (logs)
    assert [cfg.feedback.scaled(r) for r in (0, 2.5, 5, 1.25)] == [0.0, 0.5, 1.0, 0.25]


@pytest.mark.parametrize("cap, per_minute, header", [
    ({}, 600, ""),
    ({"perClientPerMinute": 0}, 0, ""),
    ({"perClientPerMinute": 1_000_000, "clientHeader": "X-Forwarded-For"}, 1_000_000, "X-Forwarded-For"),
    ({"clientHeader": "x-client_id.v2~!#$%&'*+^`|"}, 600, "x-client_id.v2~!#$%&'*+^`|"),
])
def test_parse_args_feedback_per_client_cap(cap, per_minute, header):
    fb = sc.parse_args({**ARGS, "feedback": {"key": "5e" * 32, **cap}}).feedback
    assert (fb.per_client_per_minute, fb.client_header) == (per_minute, header)


@pytest.mark.parametrize("feedback, fragment", [
    ({"key": "XYZ" * 20}, "args.feedback.key: must be an even number (32 to 256) of lowercase hex digits"),
    ({"key": "ab" * 8}, "args.feedback.key: must be"),
    ({"key": "a" * 33}, "args.feedback.key: must be"),
    ({"rewardMin": 1, "rewardMax": 1}, "args.feedback: rewardMin (1) must be less than rewardMax (1)"),
    ({"rewardMin": 2}, "rewardMin (2) must be less than rewardMax (1.0)"),
    ({"rewardMax": float("inf")}, "args.feedback.rewardMax: must be finite"),
    ({"rewardMin": "low"}, "args.feedback.rewardMin: must be a number"),
    ({"ttlSeconds": 0}, "args.feedback.ttlSeconds: must be in [1, 86400]"),
    ({"ttlSeconds": 1.5}, "args.feedback.ttlSeconds: must be an integer"),
    ({"secret": "x"}, "args.feedback.secret: unknown field"),
    ({"perClientPerMinute": -1}, "args.feedback.perClientPerMinute: must be an integer in [0, 1000000] (0: no cap), "
                                 "got -1"),
    ({"perClientPerMinute": 1_000_001}, "args.feedback.perClientPerMinute: must be an integer in [0, 1000000]"),
    ({"perClientPerMinute": 60.0}, "args.feedback.perClientPerMinute: must be an integer"),
    ({"perClientPerMinute": True}, "args.feedback.perClientPerMinute: must be an integer"),
    ({"perClientPerMinute": "600"}, "args.feedback.perClientPerMinute: must be an integer"),
    ({"clientHeader": "X Client"}, "args.feedback.clientHeader: must be empty (the source address) or an HTTP header "
                                   "name (letters, digits and !#$%&'*+-.^_`|~, at most 128 characters), got 'X Client'"),
    ({"clientHeader": "X-Client:"}, "args.feedback.clientHeader: must be empty"),
    ({"clientHeader": "X-Client\n"}, "args.feedback.clientHeader: must be empty"),
    ({"clientHeader": "é"}, "args.feedback.clientHeader: must be empty"),
    ({"clientHeader": "x" * 129}, "args.feedback.clientHeader: must be empty"),
    ({"clientHeader": None}, "args.feedback.clientHeader: must be empty"),
    ("on", "args.feedback: must be an object"),
])
def test_parse_args_feedback_errors(feedback, fragment):
    with pytest.raises(sc.ServingConfigError, match=re.escape(fragment)) as exc:
        sc.parse_args({**ARGS, "feedback": feedback})
    assert "XYZ" not in str(exc.value)


def test_parse_observation():
    arr = sc.parse_observation({"observation": [1, 2.5, -3, 4]})
    assert arr.dtype == np.float32 and arr.tolist() == [1, 2.5, -3, 4]
    assert sc.parse_observation({"observation": [[1, 2], [3, 4]]}).shape == (2, 2)


@pytest.mark.parametrize("body, fragment", [
    ([1, 2], "body: must be a JSON object"),
    ({}, "observation: required"),
    ({"observation": []}, "non-empty"),
    ({"observation": 3}, "non-empty array"),
    ({"observation": [1, "a"]}, "numbers"),
    ({"observation": [[1, 2], [3]]}, "regular shape"),
    ({"observation": [1, True]}, "not booleans"),
    ({"observation": [1, float("nan")]}, "NaN or infinite"),
    ({"observation": [0.0] * 70000}, "too large"),
])
def test_parse_observation_errors(body, fragment):
    with pytest.raises(sc.BadRequest, match=fragment):
        sc.parse_observation(body)


def test_parse_feedback():
    rid = _rid("v2")
    fb = sc.parse_feedback({"request_id": rid, "reward": -1}, ["v1", "v2"], FB, scope=SCOPE, now=T)
    assert fb == sc.Feedback(rid, "v2", -1.0, False, int(T))
    assert sc.parse_feedback({"request_id": rid, "reward": 0.5, "negative": True}, ["v2"], FB, scope=SCOPE,
                             now=T).negative is True
    assert sc.parse_feedback({"request_id": rid, "reward": 1}, ["v2"], FB, scope=SCOPE, now=T).reward == 1.0


@pytest.mark.parametrize("body, fragment", [
    ("x", "body: must be a JSON object"),
    ({"reward": 1}, "request_id: required"),
    ({"request_id": "v1.zz", "reward": 1}, "request_id: malformed"),
    ({"request_id": "v1." + "0" * 32, "reward": 1}, "request_id: malformed"),
    ({"request_id": _rid("v3"), "reward": 1}, "names version 'v3'"),
    ({"request_id": _rid("v1")}, "reward: required"),
    ({"request_id": _rid("v1"), "reward": True}, "reward: required, a number"),
    ({"request_id": _rid("v1"), "reward": 1, "negative": 1}, "negative: must be a boolean"),
    ({"request_id": _rid("v1"), "reward": 1, "score": 1}, "score: unknown field"),
])
def test_parse_feedback_errors(body, fragment):
    with pytest.raises(sc.BadRequest, match=fragment):
        sc.parse_feedback(body, ["v1", "v2"], FB, scope=SCOPE, now=T)


@pytest.mark.parametrize("reward", [1e300, -1e300, 1.0000001, -1.5, 10 ** 400, -(10 ** 400), 2])
def test_a_reward_outside_the_declared_range_is_refused(reward):
    with pytest.raises(sc.BadRequest, match=r"outside the declared reward range \[-1, 1\]"):
        sc.parse_feedback({"request_id": _rid(), "reward": reward}, ["v1"], FB, scope=SCOPE, now=T)
    wide = sc.FeedbackConfig(key=KEY, reward_min=-1e301, reward_max=1e301)
    if abs(reward) < 1e301:
        assert sc.parse_feedback({"request_id": _rid(), "reward": reward}, ["v1"], wide, scope=SCOPE,
                                 now=T).reward == float(reward)


@pytest.mark.parametrize("reward", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_reward_is_refused(reward):
    body = json.loads(json.dumps({"request_id": _rid(), "reward": reward}))  # Python's json reads NaN/Infinity
    with pytest.raises(sc.BadRequest, match=r"reward: must be a finite number within the declared reward range"):
        sc.parse_feedback(body, ["v1"], FB, scope=SCOPE, now=T)


def test_without_a_key_no_feedback_is_accepted():
    cfg = sc.FeedbackConfig(key=None)
    with pytest.raises(sc.FeedbackUnavailable, match="feedback is not configured"):
        sc.parse_feedback({"request_id": _rid(), "reward": 0.5}, ["v1"], cfg, scope=SCOPE, now=T)


def test_ledger_credits_each_request_id_once_until_it_expires():
    ledger = sc.FeedbackLedger()
    ledger.credit("a", expires_at=T + 600, now=T)
    with pytest.raises(sc.DuplicateFeedback, match="already received"):
        ledger.credit("a", expires_at=T + 600, now=T + 599)
    ledger.credit("b", expires_at=T + 10, now=T)
    assert len(ledger) == 2
    ledger.credit("c", expires_at=T + 700, now=T + 11)  # "b" has expired: forgotten
    assert len(ledger) == 2 and "b" not in ledger and "a" in ledger
    ledger.credit("d", expires_at=T + 2000, now=T + 701)  # "a" and "c" too
    assert len(ledger) == 1


def test_a_new_ledger_refuses_ids_issued_before_it_started():
    # A restarted router has forgotten what it credited: ids from before its start are refused.
    ledger = sc.FeedbackLedger(started_at=T + 100.5)
    with pytest.raises(sc.DuplicateFeedback, match="issued before this router replica started"):
        ledger.credit("a", expires_at=T + 600, now=T + 101, issued_at=T + 99)
    ledger.credit("b", expires_at=T + 700, now=T + 101, issued_at=T + 100)  # the same second
    assert len(ledger) == 1


def test_ledger_memory_is_bounded_and_full_means_refused_not_forgotten():
    ledger = sc.FeedbackLedger(max_entries=3)
    for rid in "abc":
        ledger.credit(rid, expires_at=T + 600, now=T)
    with pytest.raises(sc.FeedbackUnavailable, match="retry later"):
        ledger.credit("d", expires_at=T + 600, now=T + 1)
    with pytest.raises(sc.DuplicateFeedback):
        ledger.credit("a", expires_at=T + 600, now=T + 1)  # still remembered
    ledger.credit("d", expires_at=T + 1200, now=T + 601)  # a, b, c expired
    assert len(ledger) == 1


# ----------------------------------------------------------------- the router's feedback endpoint


class _Metric:
    """Stands for a ray.util.metrics Counter/Histogram: records (version, value)."""

    def __init__(self, name, description="", tag_keys=None, boundaries=None):
        self.name, self.boundaries, self.values = name, boundaries, []

    def set_default_tags(self, tags):
        pass

    def inc(self, value=1.0, tags=None):
        self.values.append(((tags or {}).get("version"), value))

    observe = inc


class _Policy:
    def options(self, **_):
        return self

    async def remote(self, observation):
        return {"action": 1}


def _send(router, path, body, headers=(), client=None):
    """The router's response to a POST of ``body`` from ``client`` ((host, port), as the Serve proxy passes it)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    from starlette.requests import Request
    scope = {"type": "http", "method": "POST", "path": "/default/cartpole" + path, "root_path": "/default/cartpole",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "query_string": b"", "client": client}
    return asyncio.run(router(Request(scope, receive)))


def _post(router, path, body, headers=(), client=None):
    resp = _send(router, path, body, headers, client)
    return resp.status_code, json.loads(resp.body)


def _router(monkeypatch, feedback):
    from rl_engine.serving import app
    monkeypatch.setattr(app.metrics, "Counter", _Metric)
    monkeypatch.setattr(app.metrics, "Histogram", _Metric)
    router = app.Router.func_or_class({**ARGS, "feedback": feedback}, {"v1": _Policy(), "v2": _Policy()})
    router.reconfigure({"weights": {"v1": 50, "v2": 50}})
    return router


def _counted(router):
    return {m.name: list(m.values) for m in (router.m_feedback, router.m_reward_pos, router.m_reward_neg,
                                            router.m_negative, router.m_reward_scaled)}


def test_router_feedback_codes(monkeypatch):
    router = _router(monkeypatch, {"key": "5e" * 32, "ttlSeconds": 600})
    assert router.m_reward_scaled.boundaries == list(sc.REWARD_BUCKETS)
    answers = [_post(router, "", {"observation": [0.0, 0.0, 0.0, 0.0]}) for _ in range(2)]
    assert [code for code, _ in answers] == [200, 200]
    (_, first), (_, second) = answers
    rid = first["request_id"]
    # Signed with the application's key and scope: the pure check accepts it.
    assert sc.parse_request_id(rid, KEY, scope=SCOPE).version == first["version"]

    assert _post(router, "/feedback", {"request_id": rid, "reward": -0.5, "negative": True}) == \
        (200, {"ok": True, "version": first["version"], "request_id": rid})
    before = _counted(router)
    assert before["rlops_serve_feedback_reward_scaled"] == [(first["version"], 0.25)]

    code, body = _post(router, "/feedback", {"request_id": rid, "reward": 1.0})
    assert code == 409 and "already received" in body["error"]
    forged = f"{first['version']}.{rid.rsplit('.', 3)[1]}.{'0' * 16}.{'0' * 32}"
    for bad, fragment in (({"request_id": forged, "reward": 1.0}, "invalid signature"),
                          ({"request_id": _tampered(rid)[1], "reward": 1.0}, "invalid signature"),
                          ({"request_id": first["version"] + "." + "0" * 32, "reward": 1.0}, "malformed"),
                          ({"request_id": second["request_id"], "reward": 1e300}, "outside the declared reward"),
                          ({"request_id": second["request_id"], "reward": -1e300}, "outside the declared reward")):
        code, body = _post(router, "/feedback", bad)
        assert code == 400 and fragment in body["error"], (bad, body)
    code, body = _post(router, "/feedback", b'{"request_id": "%s", "reward": NaN}' % second["request_id"].encode())
    assert code == 400 and "finite" in body["error"]
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 601)
    code, body = _post(router, "/feedback", {"request_id": second["request_id"], "reward": 1.0})
    assert code == 400 and "expired" in body["error"]
    assert _counted(router) == before, "a refused feedback was counted"

    # A redeploy or restart: the new replica's ledger is empty, so it refuses ids issued before it started.
    monkeypatch.setattr(time, "time", lambda: real_time() + 2)  # well within the TTL
    restarted = _router(monkeypatch, {"key": "5e" * 32, "ttlSeconds": 600})
    code, body = _post(restarted, "/feedback", {"request_id": rid, "reward": 1.0})
    assert code == 409 and "issued before this router replica started" in body["error"]


def test_router_caps_the_feedback_of_each_client_and_keeps_refused_ids_usable(monkeypatch):
    router = _router(monkeypatch, {"key": "5e" * 32, "perClientPerMinute": 3, "clientHeader": "X-Client-Id"})
    ids = [_post(router, "", {"observation": [0.0] * 4})[1] for _ in range(8)]
    alice, bob = [("X-Client-Id", "alice")], [("X-Client-Id", "bob")]
    codes = [_post(router, "/feedback", {"request_id": a["request_id"], "reward": 1.0}, alice)[0] for a in ids[:5]]
    assert codes == [200, 200, 200, 429, 429]
    resp = _send(router, "/feedback", {"request_id": ids[3]["request_id"], "reward": 1.0}, alice)
    body = json.loads(resp.body)
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) in range(1, 61), resp.headers
    assert body["error"].startswith("feedback: over the cap of 3 feedbacks per minute from one client to this router "
                                    "replica (spec.canary.analysis.feedbackPerClient.maxPerMinute); this one was not "
                                    "counted. Send it again in "), body
    assert (body["version"], body["request_id"]) == (ids[3]["version"], ids[3]["request_id"])
    # Only feedback that would be counted is capped: the cheaper checks answer first, whatever the cap.
    assert _post(router, "/feedback", {"request_id": ids[0]["request_id"], "reward": 1.0}, alice)[0] == 409
    assert _post(router, "/feedback", {"request_id": ids[5]["request_id"], "reward": 9.0}, alice)[0] == 400
    # The header's last element names the client (what the nearest gateway wrote); another client is counted apart.
    assert _post(router, "/feedback", {"request_id": ids[5]["request_id"], "reward": 1.0},
                 [("X-Client-Id", "bob, alice")])[0] == 429
    # A refused id was not used up: another client (or alice, a minute later) may send it.
    assert [_post(router, "/feedback", {"request_id": a["request_id"], "reward": -1.0}, bob)[0]
            for a in ids[3:6]] == [200, 200, 200]
    # Without the header, the client is the source address.
    assert [_post(router, "/feedback", {"request_id": a["request_id"], "reward": 1.0}, client=("10.0.0.7", 5000))[0]
            for a in ids[6:8]] == [200, 200]
    counted = _counted(router)
    assert len(counted["rlops_serve_feedback"]) == 3 + 3 + 2
    assert counted["rlops_serve_feedback_reward_negative"] == [(a["version"], 1.0) for a in ids[3:6]]
    assert router.m_feedback_capped.values == [(a["version"], 1) for a in (ids[3], ids[4], ids[3], ids[5])]
    info = router.info()["feedback"]
    assert (info["perClientPerMinute"], info["clientHeader"], info["clients"], info["remembered"]) == \
        (3, "X-Client-Id", 3, 8)


def test_router_without_a_cap_counts_every_feedback(monkeypatch):
    router = _router(monkeypatch, {"key": "5e" * 32, "perClientPerMinute": 0})
    ids = [_post(router, "", {"observation": [0.0] * 4})[1]["request_id"] for _ in range(700)]
    assert {_post(router, "/feedback", {"request_id": rid, "reward": 1.0})[0] for rid in ids} == {200}
    assert len(router.m_feedback.values) == 700 and router.m_feedback_capped.values == []


def test_router_without_a_feedback_key_refuses_all_feedback(monkeypatch):
    router = _router(monkeypatch, {"rewardMin": 0, "rewardMax": 1})
    code, answer = _post(router, "", {"observation": [0.0, 0.0, 0.0, 0.0]})
    assert code == 200 and answer["request_id"].startswith(answer["version"] + ".")
    code, body = _post(router, "/feedback", {"request_id": answer["request_id"], "reward": 1.0})
    assert code == 503 and "feedback is not configured" in body["error"]
    assert not any(_counted(router).values())


# ----------------------------------------------------------------- traffic split


def test_deck_follows_weights_exactly_per_100_draws_and_is_random():
    deck = sc.WeightedDeck({"a": 10, "b": 90, "c": 0}, random.Random(1))
    draws = [deck.draw() for _ in range(1000)]
    for block in range(10):
        assert collections.Counter(draws[block * 100:(block + 1) * 100]) == {"a": 10, "b": 90}
    assert draws[:100] != draws[100:200]  # shuffled, not a fixed pattern
    other = sc.WeightedDeck({"a": 10, "b": 90, "c": 0}, random.Random(2))
    assert [other.draw() for _ in range(100)] != draws[:100]


def test_deck_split_stays_within_3_points_from_any_start():
    deck = sc.WeightedDeck({"a": 50, "b": 50}, random.Random(7))
    for _ in range(37):
        deck.draw()
    share = collections.Counter(deck.draw() for _ in range(1000))["a"] / 10
    assert abs(share - 50) <= 3


def test_deck_without_weight_draws_nothing():
    assert sc.WeightedDeck({"a": 0}).draw() is None
    assert sc.WeightedDeck({}).draw() is None


def test_serving_config_imports_neither_ray_nor_torch():
    code = ("import sys, rl_engine.serving, rl_engine.serving.config; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------- policy loader


def _save_artifact(tmp_path, obs_dim=4, num_actions=2, seed=0) -> tuple[str, Agent]:
    torch.manual_seed(seed)
    agent = Agent(obs_dim, num_actions)
    uri = f"file://{tmp_path / 'artifact'}"
    store = ArtifactStore(uri)
    store.makedirs()
    buf = io.BytesIO()
    torch.save(agent.state_dict(), buf)
    store.write_bytes("model.pt", buf.getvalue())
    store.write_json("policy.json", {**policy_spec(agent), "stateDict": "model.pt"})
    store.write_json("metadata.json", {"observationShape": [obs_dim]})
    store.write_json("evaluation.json", {"summary": {"meanReturn": 1.0}})
    return uri, agent


def test_load_policy_acts_like_the_greedy_agent(tmp_path):
    uri, agent = _save_artifact(tmp_path)
    policy = load_policy(uri)
    assert policy.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (policy.obs_dim, policy.num_actions, policy.observation_shape) == (4, 2, (4,))
    obs = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    actions = policy.act(obs)
    assert actions.shape == (64,) and actions.dtype == np.int64
    assert actions.tolist() == agent.act_greedy(torch.as_tensor(obs)).tolist()
    assert policy.check_observation([1, 2, 3, 4]).shape == (4,)


@pytest.mark.parametrize("obs", [np.zeros((2, 3)), np.zeros(4), [[1, 2, 3, float("nan")]], [["a", "b", "c", "d"]]])
def test_invalid_observations(tmp_path, obs):
    policy = load_policy(_save_artifact(tmp_path)[0], device="cpu")
    with pytest.raises(InvalidObservation):
        policy.act(obs)


def test_nan_poisoned_artifact_raises_on_inference(tmp_path):
    uri, _ = _save_artifact(tmp_path)
    bad_uri = f"file://{tmp_path / 'bad'}"
    fingerprint = poison_artifact(uri, bad_uri)
    assert fingerprint == compute_fingerprint(bad_uri) != compute_fingerprint(uri)
    state = torch.load(tmp_path / "bad" / "model.pt", weights_only=True)
    assert torch.isnan(state["actor.0.weight"]).all() and not torch.isnan(state["critic.0.weight"]).any()
    assert sorted((tmp_path / "bad").iterdir()) and json.loads((tmp_path / "bad" / "policy.json").read_text())
    policy = load_policy(bad_uri, device="cpu")  # loads fine: same keys and shapes
    with pytest.raises(NonFinitePolicyOutput, match="non-finite logits for 3 of 3 observations"):
        policy.act(np.zeros((3, 4)))


def test_load_policy_errors_are_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no artifact files found"):
        load_policy(f"file://{tmp_path / 'missing'}")
    (tmp_path / "nopolicy").mkdir()
    (tmp_path / "nopolicy" / "model.pt").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="policy.json not found"):
        load_policy(f"file://{tmp_path / 'nopolicy'}")
    uri, _ = _save_artifact(tmp_path)
    (tmp_path / "artifact" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot load the policy"):
        load_policy(uri)


# ----------------------------------------------------------------- read-once, verified loading


def _weights(agent: Agent) -> bytes:
    """The agent's state dict with every actor weight negated (same keys and shapes)."""
    state = {k: (-v if k.startswith("actor.") else v) for k, v in agent.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _same_weights(policy, agent: Agent) -> bool:
    mine, theirs = policy.agent.state_dict(), agent.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k].cpu(), theirs[k]) for k in mine)


ARTIFACT_FILES = {"model.pt": 1, "policy.json": 1, "metadata.json": 1, "evaluation.json": 1}


def test_weights_swapped_after_hashing_are_never_served(tmp_path, monkeypatch):
    uri, agent = _save_artifact(tmp_path)
    approved = compute_fingerprint(uri)
    tampered = _weights(agent)

    # The harness works: hash then load as two reads (the old way) serves the swapped weights.
    _count_opens(monkeypatch, swap={"model.pt": tampered})
    assert compute_fingerprint(uri) == approved
    assert not _same_weights(load_policy(uri, device="cpu"), agent)
    monkeypatch.undo()

    # Read once: the policy is built from the bytes that were hashed, whatever the disk holds next.
    uri, agent = _save_artifact(tmp_path / "again")
    approved = compute_fingerprint(uri)
    opens = _count_opens(monkeypatch, swap={"model.pt": _weights(agent)})
    policy = load_verified_policy(uri, approved, device="cpu")
    assert dict(opens) == ARTIFACT_FILES  # one read per file, no second read of anything
    assert (tmp_path / "again" / "artifact" / "model.pt").read_bytes() == _weights(agent)  # swapped on disk
    assert _same_weights(policy, agent) and policy.fingerprint == approved
    obs = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    assert policy.act(obs).tolist() == agent.act_greedy(torch.as_tensor(obs)).tolist()


def test_policy_deployment_reads_once_and_serves_the_hashed_bytes(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from rl_engine.serving.app import PolicyDeployment

    uri, agent = _save_artifact(tmp_path)
    approved = compute_fingerprint(uri)
    opens = _count_opens(monkeypatch, swap={"model.pt": _weights(agent)})
    replica = PolicyDeployment.func_or_class("default", "cartpole", "v1", uri, approved)
    assert dict(opens) == ARTIFACT_FILES
    assert _same_weights(replica.policy, agent) and replica.policy.fingerprint == approved
    monkeypatch.undo()
    # The file now on disk is not the approved one: a new replica refuses to start.
    with pytest.raises(RuntimeError, match=r"version v1: artifact .* fingerprint sha256:\w+ does not match"):
        PolicyDeployment.func_or_class("default", "cartpole", "v1", uri, approved)


def test_tampered_weights_are_refused(tmp_path):
    uri, agent = _save_artifact(tmp_path)
    approved = compute_fingerprint(uri)
    (tmp_path / "artifact" / FINGERPRINT_FILE).write_text(json.dumps({"files": file_digests(uri)}))
    (tmp_path / "artifact" / "model.pt").write_bytes(_weights(agent))
    with pytest.raises(FingerprintMismatch) as exc:
        load_verified_policy(uri, approved, device="cpu")
    actual = compute_fingerprint(uri)
    assert exc.value.changed == ["model.pt"] and actual != approved
    assert f"artifact {uri}: fingerprint {actual} does not match the expected {approved}" in str(exc.value)
    assert "model.pt" in str(exc.value)
    assert load_verified_policy(uri, actual, device="cpu").fingerprint == actual


@pytest.mark.parametrize("state_dict, fragment", [
    ("ABS", "absolute paths and URIs are refused"),
    ("../outside/model.pt", "'..' components are refused"),
    ("sub/../model.pt", "'..' components are refused"),
    (FINGERPRINT_FILE, "unknown file"),  # present, but not fingerprinted
    ("other.pt", "unknown file"),
])
def test_weights_outside_the_fingerprinted_files_are_refused(tmp_path, state_dict, fragment):
    uri, agent = _save_artifact(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.pt").write_bytes(_weights(agent))
    (tmp_path / "artifact" / FINGERPRINT_FILE).write_bytes(_weights(agent))
    if state_dict == "ABS":
        state_dict = str(outside / "model.pt")
    spec = json.loads((tmp_path / "artifact" / "policy.json").read_text())
    (tmp_path / "artifact" / "policy.json").write_text(json.dumps({**spec, "stateDict": state_dict}))
    approved = compute_fingerprint(uri)  # approval of the artifact as it is, reference included
    for load in (lambda: load_verified_policy(uri, approved, device="cpu"), lambda: load_policy(uri, device="cpu")):
        with pytest.raises(UnsafeArtifactReference, match=re.escape(fragment)) as exc:
            load()
        assert f"policy.json stateDict names {state_dict!r}" in str(exc.value)


def test_metadata_references_outside_the_artifact_are_refused(tmp_path):
    uri, _ = _save_artifact(tmp_path)
    (tmp_path / "artifact" / "metadata.json").write_text(json.dumps(
        {"observationShape": [4], "files": {"model": "model.pt", "policy": "/etc/passwd"}}))
    with pytest.raises(UnsafeArtifactReference, match="metadata.json files.policy names '/etc/passwd'"):
        load_verified_policy(uri, compute_fingerprint(uri), device="cpu")
