"""Unit tests of the serving application's pure parts (``rl_engine.serving.config``) and of the
policy loader (``rl_engine.policy``) on a real (untrained) network saved as an artifact.

The Ray Serve application itself runs in ``tests/e2e/test_serving.py``.
"""

from __future__ import annotations

import collections
import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from rl_engine.artifacts import ArtifactError, ArtifactStore, compute_fingerprint
from rl_engine.policy import InvalidObservation, NonFinitePolicyOutput, load_policy
from rl_engine.ppo import Agent, policy_spec
from rl_engine.serving import config as sc
from rl_engine.serving.testing import poison_artifact

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


def test_request_ids_name_the_version():
    for version in ("v1", "cartpole-12", "run.3_b"):
        rid = sc.make_request_id(version)
        assert rid.startswith(version + ".") and sc.parse_request_id(rid) == version
    assert sc.make_request_id("v1") != sc.make_request_id("v1")


@pytest.mark.parametrize("rid", [None, 3, "", "v1", "v1.xyz", "v1." + "A" * 32, "." + "0" * 32, "bad name." + "0" * 32])
def test_malformed_request_ids(rid):
    with pytest.raises(sc.BadRequest, match="request_id"):
        sc.parse_request_id(rid)


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
    rid = sc.make_request_id("v2")
    fb = sc.parse_feedback({"request_id": rid, "reward": -1}, ["v1", "v2"])
    assert fb == sc.Feedback(rid, "v2", -1.0, False)
    assert sc.parse_feedback({"request_id": rid, "reward": 0.5, "negative": True}, ["v2"]).negative is True


@pytest.mark.parametrize("body, fragment", [
    ("x", "body: must be a JSON object"),
    ({"reward": 1}, "request_id: required"),
    ({"request_id": "v1.zz", "reward": 1}, "request_id: malformed"),
    ({"request_id": "v3." + "0" * 32, "reward": 1}, "names version 'v3'"),
    ({"request_id": "v1." + "0" * 32}, "reward: required"),
    ({"request_id": "v1." + "0" * 32, "reward": True}, "reward: required, a number"),
    ({"request_id": "v1." + "0" * 32, "reward": float("inf")}, "reward: must be finite"),
    ({"request_id": "v1." + "0" * 32, "reward": 1, "negative": 1}, "negative: must be a boolean"),
    ({"request_id": "v1." + "0" * 32, "reward": 1, "score": 1}, "score: unknown field"),
])
def test_parse_feedback_errors(body, fragment):
    with pytest.raises(sc.BadRequest, match=fragment):
        sc.parse_feedback(body, ["v1", "v2"])


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
    with pytest.raises(ArtifactError, match="policy.json not found"):
        load_policy(f"file://{tmp_path / 'missing'}")
    uri, _ = _save_artifact(tmp_path)
    (tmp_path / "artifact" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot load the policy"):
        load_policy(uri)
