"""The router environment with seed 004's shaped reward (``reward_shaping``)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from rl_engine.domains.router import RouterEnv
from rl_engine.envs import resolve_env_factory
from rl_engine.config import EnvironmentConfig
from rl_engine.errors import InvalidConfig
from rl_engine.rewards import COMPONENTS, RewardShaper


def _episode(env, actions):
    env.reset(seed=3)
    out = []
    for a in actions:
        _, reward, _, _, info = env.step(a)
        out.append((reward, info))
    return out


def test_shaped_reward_is_the_shaper_applied_to_the_reported_components():
    env = RouterEnv(n_tasks=64, reward_shaping={"weights": {"taskCompletion": 0.7, "efficiency": 0.1,
                                                            "codeQuality": 0.1, "userFeedback": 0.1},
                                                "window": 16})
    reference = RewardShaper({"task_completion": 0.7, "efficiency": 0.1, "code_quality": 0.1,
                              "user_feedback": 0.1}, window=16)
    steps = _episode(env, [i % 4 for i in range(64)])
    for reward, info in steps:
        comps = info["reward_components"]
        assert set(comps) == set(COMPONENTS)
        assert reward == pytest.approx(reference(comps))
        assert 0.0 <= reward <= 1.0
        depth = info["depth"]
        assert info["step_rewards"][: depth - 1].tolist() == [0.0] * (depth - 1)
        assert info["step_rewards"][depth - 1] == pytest.approx(reward, abs=1e-6)
    efficiencies = {info["mode"]: info["reward_components"]["efficiency"] for _, info in steps}
    assert efficiencies[0] == 1.0 and efficiencies[3] == pytest.approx(0.4)


def test_without_shaping_the_reward_is_the_weighted_router_reward():
    _, info = _episode(RouterEnv(), [1])[0]
    assert "reward_components" not in info


def test_bad_shaping_weights_name_the_field():
    with pytest.raises(InvalidConfig, match=r"^environment\.kwargs\.reward_shaping\.weights"):
        RouterEnv(reward_shaping={"weights": {"taskCompletion": 0.9}})
    cfg = EnvironmentConfig(id="rl_engine.domains.router:RouterEnv",
                            kwargs={"reward_shaping": {"window": 1}})
    with pytest.raises(InvalidConfig, match="reward_shaping.window"):
        resolve_env_factory(cfg)


def test_shaped_router_through_gymnasium_id():
    import rl_engine.domains  # noqa: F401

    env = gym.make("rlops/Router-v0", reward_shaping={})
    env.reset(seed=0)
    rewards = [env.step(env.action_space.sample())[1] for _ in range(32)]
    assert all(0.0 <= r <= 1.0 for r in rewards) and np.std(rewards) > 0


LOGGED = [{"task": {"complexity": 0.9, "ambiguity": 0.1, "urgency": 0.2, "domain": "research"},
           "reward_components": {"task_completion": 1.0, "efficiency": 0.4, "code_quality": 0.9, "user_feedback": 1.0}},
          {"task": {"complexity": 0.1, "ambiguity": 0.8, "urgency": 1.0, "domain": "code"},
           "reward_components": {"task_completion": 0.3, "efficiency": 1.0, "code_quality": 0.3, "user_feedback": 0.0}}]


def test_logged_trajectories_are_the_task_mix():
    """Given trajectories, every task the router sees is one of the logged tasks."""
    env = RouterEnv(trajectories=LOGGED)
    rows = {(0.9, 0.1, 0.2, 3), (0.1, 0.8, 1.0, 0)}
    obs, _ = env.reset(seed=5)
    seen = set()
    for _ in range(64):
        c, a, u = (round(float(x), 6) for x in obs[:3])
        seen.add((c, a, u, int(np.argmax(obs[3:7]))))
        obs, _, terminated, _, _ = env.step(env.action_space.sample())
        if terminated:
            obs, _ = env.reset()
    assert seen == rows


def test_logged_reward_components_warm_the_shaper():
    env = RouterEnv(trajectories=LOGGED * 2, reward_shaping={"window": 2})
    assert [len(env.shaper.normalizers[c]) for c in COMPONENTS] == [2] * len(COMPONENTS)
    # the window of two holds the last two logged trajectories' components
    assert env.shaper.normalizers["efficiency"].mean == pytest.approx(0.7)
    assert env.shaper.normalizers["user_feedback"].mean == pytest.approx(0.5)


def test_bad_logged_tasks_name_the_index():
    with pytest.raises(ValueError, match=r"trajectories\[1\]\.task"):
        RouterEnv(trajectories=[LOGGED[0], {"task": {"complexity": 2.0, "ambiguity": 0, "urgency": 0, "domain": "code"}}])


def test_the_factory_passes_trajectories_to_environments_that_take_them():
    from rl_engine.envs import accepts_keyword

    assert accepts_keyword("rl_engine.domains:rlops/Router-v0", "trajectories")
    assert not accepts_keyword("CartPole-v1", "trajectories")
    factory = resolve_env_factory(EnvironmentConfig(id="rl_engine.domains:rlops/Router-v0"), {"trajectories": LOGGED})
    assert factory().unwrapped._logged_tasks.shape == (2, 4)
