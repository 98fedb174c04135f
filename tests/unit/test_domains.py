"""Domain environments (``rl_engine.domains``): the router of seed 003 and the gate of
seed 001 follow the Gymnasium API, are reproducible, validate their kwargs, compute the
documented rewards, and reward using the features (a feature-based heuristic clearly
beats both a random policy and the env's own baseline)."""

from __future__ import annotations

import importlib
import math
import warnings

import gymnasium as gym
import numpy as np
import pyarrow.csv as pacsv
import pytest
from gymnasium.utils.env_checker import check_env
from rl_engine.domains.gate import DEFAULT_DATASET, GateEnv, make_synthetic_gate_dataset
from rl_engine.domains.router import MAX_DEPTH, MODES, RouterEnv
from rl_engine.evaluation import random_policy, run_episodes

from rl_engine import domains

ROUTER_ID, GATE_ID = "rlops/Router-v0", "rlops/Gate-v0"


@pytest.fixture(scope="module")
def gate_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    csv = make_synthetic_gate_dataset(str(d / "cands.csv"), rows=600, seed=3)
    parquet = make_synthetic_gate_dataset(str(d / "cands.parquet"), rows=600, seed=3, format="parquet")
    return {"dir": d, "csv": csv, "parquet": parquet}


def _rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        obs, r, term, _, _ = env.step(a)
        out += [obs, r, term]
        if term:
            break
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- registration and the Gymnasium API ------------------------------------------------


def test_ids_registered_idempotently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(domains)
        domains.register_envs()
    assert gym.spec(ROUTER_ID).entry_point == "rl_engine.domains.router:RouterEnv"
    assert gym.spec(GATE_ID).entry_point == "rl_engine.domains.gate:GateEnv"
    assert domains.RouterEnv is RouterEnv and domains.GateEnv is GateEnv


@pytest.mark.parametrize("env_id", [ROUTER_ID, GATE_ID])
def test_check_env_passes_without_warnings(env_id):
    env = gym.make(env_id).unwrapped  # unwrapped but with its spec, for the close check
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env)
    assert isinstance(env.observation_space, gym.spaces.Box)
    assert env.observation_space.dtype == np.float32
    assert isinstance(env.action_space, gym.spaces.Discrete) and env.action_space.start == 0
    env.close()


def test_trainer_resolves_both_forms_of_the_id():
    from rl_engine.config import EnvironmentConfig
    from rl_engine.envs import resolve_env_factory

    for env_id in ("rl_engine.domains.router:RouterEnv", "rl_engine.domains:rlops/Gate-v0"):
        env = resolve_env_factory(EnvironmentConfig(id=env_id, kwargs={}))()
        env.reset(seed=0)
        env.close()


@pytest.mark.parametrize(
    "make, n_actions, baseline",
    [(RouterEnv, len(MODES), ("always_solo", 0)), (GateEnv, 2, ("pass_all", 1))],
)
def test_baseline_protocol(make, n_actions, baseline):
    env = make()
    obs, _ = env.reset(seed=0)
    assert make.baseline_name == baseline[0]
    assert env.baseline_action(obs) == baseline[1]
    assert env.action_space.n == n_actions


@pytest.mark.parametrize("make", [RouterEnv, GateEnv])
def test_seeding_is_reproducible(make):
    actions = [i % make().action_space.n for i in range(40)]
    a = _rollout(make(), 11, actions)
    b = _rollout(make(), 11, actions)
    _same(a, b)
    c = _rollout(make(), 12, actions)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


# ---- router ------------------------------------------------------------------------------


def test_router_episode_layout_and_hicra_info():
    env = RouterEnv(n_tasks=10)
    obs, info = env.reset(seed=5)
    assert obs.shape == (8,) and obs.dtype == np.float32
    assert obs[3:7].sum() == 1.0 and obs[7] == 1.0
    depths = {0: 1, 1: 2, 2: 2, 3: 4}
    for t in range(10):
        action = t % 4
        obs, reward, term, trunc, info = env.step(action)
        assert info["depth"] == depths[action]
        sr = info["step_rewards"]
        assert sr.dtype == np.float32 and sr.shape == (MAX_DEPTH,)
        assert np.all(sr[info["depth"]:] == 0)
        np.testing.assert_array_equal(info["step_mask"], np.arange(MAX_DEPTH) < info["depth"])
        assert float(sr.sum()) == pytest.approx(reward, abs=1e-5)
        assert 0.0 <= info["quality"] <= 1.0
        assert info["task_success"] == (info["quality"] >= 0.5)
        assert term == (t == 9) and not trunc
        assert ("is_success" in info) == term
    assert obs[7] == 0.0
    assert isinstance(info["is_success"], bool)
    assert info["is_success"] == (info["success_rate"] >= env.success_threshold)


def test_router_reward_is_the_weighted_sum_of_components():
    weights = {"quality": 2.0, "latency": 0.25, "cost": 0.3}
    env = RouterEnv(reward_weights=weights)
    obs, _ = env.reset(seed=1)
    for t in range(32):
        action = (t * 3) % 4
        urgency = float(obs[2])
        obs, reward, *_, info = env.step(action)
        expected = (
            2.0 * info["quality"]
            - 0.25 * urgency * info["latency_seconds"] / 5.0
            - 0.3 * info["cost_units"]
        )
        assert reward == pytest.approx(expected, abs=1e-6)  # urgency is float32 in obs
    # missing keys keep their defaults
    assert RouterEnv(reward_weights={"cost": 0.0}).reward_weights == {
        "quality": 1.0, "latency": 0.5, "cost": 0.0
    }


@pytest.mark.parametrize(
    "weights, words",
    [
        ({"speed": 1.0}, ["'speed'", "unknown"]),
        ({"cost": -0.1}, ["'cost'", "non-negative"]),
        ({"latency": math.nan}, ["'latency'", "finite"]),
        ({"quality": math.inf}, ["'quality'", "finite"]),
        ({"quality": "high"}, ["'quality'", "number"]),
        ({"quality": 0, "latency": 0, "cost": 0}, ["at least one"]),
        ([1.0, 2.0], ["reward_weights", "mapping"]),
    ],
)
def test_router_rejects_bad_reward_weights(weights, words):
    with pytest.raises(ValueError) as exc:
        RouterEnv(reward_weights=weights)
    for w in words:
        assert w in str(exc.value)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"n_tasks": 0}, "n_tasks"), ({"success_threshold": 1.5}, "success_threshold")],
)
def test_router_rejects_bad_kwargs(kwargs, word):
    with pytest.raises(ValueError, match=word):
        RouterEnv(**kwargs)


# ---- gate --------------------------------------------------------------------------------


def test_gate_default_dataset_is_the_bundled_sample():
    env = GateEnv()
    assert env.dataset == DEFAULT_DATASET and DEFAULT_DATASET.endswith("gate_candidates.csv")
    assert env.num_rows == 2000
    # strings and timestamps are not features; the label is not either
    assert env.feature_columns == [
        "signal_strength", "momentum_20d", "rsi_14", "volatility_20d", "volume_ratio",
        "spread_bps", "news_sentiment", "hour_of_day", "sector_code", "feed_latency_ms",
    ]
    assert env.observation_space.shape == (10,)
    # z-scores with the dataset's statistics, clipped to [-10, 10] (spread_bps is heavy-tailed)
    z = env.features.astype(np.float64)
    assert np.abs(z).max() <= 10.0
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=0.01)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=0.02)


def test_gate_reads_csv_and_parquet_alike(gate_files):
    a, b = GateEnv(gate_files["csv"]), GateEnv(gate_files["parquet"])
    assert a.feature_columns == b.feature_columns
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.outcomes, b.outcomes)
    actions = [1, 0] * 40
    _same(_rollout(a, 4, actions), _rollout(b, 4, actions))


def test_gate_reads_any_fsspec_uri(gate_files):
    import fsspec

    with open(gate_files["csv"], "rb") as src, fsspec.open("memory://gate-test/cands.csv", "wb") as f:
        f.write(src.read())
    gz = make_synthetic_gate_dataset(str(gate_files["dir"] / "cands.csv.gz"), rows=600, seed=3)
    ref = GateEnv(gate_files["csv"])
    for uri in ("memory://gate-test/cands.csv", "file://" + gate_files["csv"], gz):
        np.testing.assert_array_equal(GateEnv(uri).outcomes, ref.outcomes)


def test_gate_reward_is_outcome_minus_cost_when_passed(gate_files):
    table = pacsv.read_csv(gate_files["csv"])
    outcomes = table.column("outcome").to_numpy()
    signal = table.column("signal_strength").to_numpy()
    env = GateEnv(gate_files["csv"], call_cost=0.2, episode_length=50)
    obs, info = env.reset(seed=9)
    start = info["row"]
    rng = np.random.default_rng(0)
    total = 0.0
    for t in range(50):
        row = start + t
        z = (signal[row] - signal.mean()) / signal.std()
        assert obs[0] == pytest.approx(z, abs=1e-4)  # the current candidate's features
        action = int(rng.integers(0, 2))
        obs, reward, term, _, info = env.step(action)
        assert info["row"] == row and info["outcome"] == outcomes[row]
        assert reward == (pytest.approx(outcomes[row] - 0.2) if action == 1 else 0.0)
        total += reward
    assert term
    window = outcomes[start : start + 50]
    assert info["pass_all_return"] == pytest.approx(float((window - 0.2).sum()))
    assert info["is_success"] == (total >= info["pass_all_return"])


def test_gate_pass_all_scores_the_pass_all_return(gate_files):
    env = GateEnv(gate_files["csv"], episode_length=30)
    env.reset(seed=2)
    total = 0.0
    for _ in range(30):
        _, r, term, _, info = env.step(1)
        total += r
    assert term and info["is_success"] is True and info["pass_rate"] == 1.0
    assert info["miss_rate"] == 0.0
    assert total == pytest.approx(info["pass_all_return"])
    assert info["oracle_return"] >= total


def test_gate_feature_columns_and_label(gate_files):
    env = GateEnv(gate_files["parquet"], feature_columns=["spread_bps", "signal_strength"],
                  label_column="news_sentiment")
    assert env.observation_space.shape == (2,)
    assert env.feature_columns == ["spread_bps", "signal_strength"]
    # default features: every numeric column except the chosen label
    assert "outcome" in GateEnv(gate_files["csv"], label_column="news_sentiment").feature_columns


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"label_column": "pnl"}, ["label_column", "'pnl'"]),
        ({"label_column": "symbol"}, ["label_column", "'symbol'", "not numeric"]),
        ({"feature_columns": ["signal_strength", "nope"]}, ["feature_columns", "'nope'"]),
        ({"feature_columns": ["symbol"]}, ["feature_columns", "'symbol'", "not numeric"]),
        ({"feature_columns": ["outcome"]}, ["feature_columns", "label"]),
        ({"feature_columns": []}, ["feature_columns"]),
        ({"episode_length": 601}, ["episode_length", "600 rows"]),
        ({"episode_length": 0}, ["episode_length"]),
        ({"call_cost": -1.0}, ["call_cost"]),
        ({"call_cost": math.nan}, ["call_cost"]),
    ],
)
def test_gate_bad_kwargs_raise_value_error(gate_files, kwargs, words):
    with pytest.raises(ValueError) as exc:
        GateEnv(gate_files["csv"], **kwargs)
    for w in words:
        assert w in str(exc.value)


def test_gate_bad_datasets_raise_value_error(tmp_path):
    cases = [
        (str(tmp_path / "missing.csv"), ["dataset", "not found"]),
        ("memory://nowhere/missing.parquet", ["dataset", "not found"]),
        (_write(tmp_path / "empty.csv", "a,outcome\n"), ["dataset", "no rows"]),
        (_write(tmp_path / "blank.csv", ""), ["dataset"]),
        (_write(tmp_path / "nolabel.csv", "a,b\n1,2\n"), ["label_column", "'outcome'"]),
        (_write(tmp_path / "nofeat.csv", "name,outcome\nx,1\n"), ["dataset", "no numeric feature"]),
        (_write(tmp_path / "nulls.csv", "a,outcome\n1,2\n,3\n"), ["'a'", "missing"]),
        (_write(tmp_path / "data.json", "{}"), ["dataset", "format"]),
        (_write(tmp_path / "bad.parquet", "not parquet"), ["dataset", "parquet"]),
    ]
    for uri, words in cases:
        with pytest.raises(ValueError) as exc:
            GateEnv(uri, episode_length=1)
        for w in words:
            assert w in str(exc.value), (uri, str(exc.value))


def test_synthetic_dataset_is_deterministic(tmp_path):
    a = make_synthetic_gate_dataset(str(tmp_path / "a.csv"), rows=100, seed=7)
    b = make_synthetic_gate_dataset(str(tmp_path / "sub" / "b.csv"), rows=100, seed=7)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    with pytest.raises(ValueError, match="format"):
        make_synthetic_gate_dataset(str(tmp_path / "c.json"), format="json")


# ---- learnable in principle: a feature-based heuristic beats random and the baseline -----


def _per_obs(fn):
    return lambda obs, envs: np.array([fn(o) for o in obs])


def _router_rule(o):
    """Hand-written routing from the features only: solo for easy and clear tasks, pair
    review for ambiguous simple ones, planner+executor for complex clear ones, else the
    committee."""
    c, a = o[0], o[1]
    if c < 0.3 and a < 0.3:
        return 0
    if a >= c:
        return 2 if c < 0.4 else 3
    return 1 if a < 0.35 else 3


def _gate_rule(columns):
    i = {n: k for k, n in enumerate(columns)}

    def rule(o):
        score = (o[i["signal_strength"]] + 0.6 * o[i["news_sentiment"]]
                 - 0.5 * o[i["spread_bps"]] + 0.3 * o[i["volume_ratio"]])
        return int(score > -0.2)

    return rule


def _mean_returns(env_id, seeds):
    make = lambda: gym.make(env_id)
    probe = make().unwrapped
    baseline = _per_obs(lambda o: probe.baseline_action(o))
    heuristic = _per_obs(_router_rule if env_id == ROUTER_ID else _gate_rule(probe.feature_columns))
    out = {
        name: run_episodes(make, policy, seeds).returns
        for name, policy in (("random", random_policy), ("baseline", baseline), ("heuristic", heuristic))
    }
    if env_id == ROUTER_ID:
        out["oracle"] = run_episodes(
            make, _per_obs(lambda o: int(np.argmax(probe.expected_rewards(o)))), seeds
        ).returns
    return out


@pytest.mark.parametrize("env_id, margin", [(ROUTER_ID, 3.0), (GATE_ID, 8.0)])
def test_feature_heuristic_clearly_beats_random_and_baseline(env_id, margin):
    r = _mean_returns(env_id, list(range(1000, 1200)))
    heur = r["heuristic"].mean()
    for other in ("random", "baseline"):
        # a clear margin, also several standard errors of the difference
        diff = r["heuristic"] - r[other]
        assert heur - r[other].mean() > margin, (env_id, other, {k: v.mean() for k, v in r.items()})
        assert diff.mean() > 5 * diff.std() / math.sqrt(len(diff))
    if env_id == ROUTER_ID:
        assert r["oracle"].mean() >= heur - 0.5
