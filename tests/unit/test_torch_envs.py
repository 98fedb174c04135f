"""Torch-batched CartPole (rl_engine.torch_envs) against Gymnasium's own CartPole-v1:
step-by-step dynamics equivalence, same-step autoreset bookkeeping, seeding, the episode
length of a random policy, and the env-id registry."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

from rl_engine.errors import InvalidConfig
from rl_engine.torch_envs import TORCH_ENVS, TorchCartPole, make_torch_env

torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gym_cartpoles(n: int, max_episode_steps: int, sutton_barto_reward: bool = False):
    """``n`` reference envs (``gym.make`` -> TimeLimit(CartPoleEnv)), reset with seeds 0..n-1."""
    envs = [
        gym.make(
            "CartPole-v1",
            max_episode_steps=max_episode_steps,
            sutton_barto_reward=sutton_barto_reward,
        )
        for _ in range(n)
    ]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    return envs


def _run_against_gymnasium(dtype, n, steps, max_episode_steps, sutton_barto_reward=False):
    """Step ``n`` Gymnasium envs and one TorchCartPole in lockstep with the same random
    actions. After every step, compare everything; when a copy's episode ends, reset the
    Gymnasium env and copy its new initial state into the torch env's row, so the two stay
    comparable across episodes. Returns the largest deviations and the end counts."""
    envs = _gym_cartpoles(n, max_episode_steps, sutton_barto_reward)
    tenv = TorchCartPole(
        n, dtype=dtype, max_episode_steps=max_episode_steps,
        sutton_barto_reward=sutton_barto_reward,
    )
    tenv.reset(seed=123)
    tenv.state = np.stack([env.unwrapped.state for env in envs])

    rng = np.random.default_rng(7)
    worst = {"state": 0.0, "obs": 0.0, "final_obs": 0.0}
    n_term = n_trunc = 0
    for _ in range(steps):
        actions = rng.integers(0, 2, size=n)
        obs, reward, terminated, truncated, info = tenv.step(torch.as_tensor(actions))
        assert obs.dtype == torch.float32 and obs.shape == (n, 4)
        assert reward.dtype == torch.float32 and reward.shape == (n,)
        assert terminated.dtype == torch.bool and truncated.dtype == torch.bool
        assert torch.equal(info["_final_obs"], terminated | truncated)

        new_state = tenv.state.clone()
        for i, env in enumerate(envs):
            g_obs, g_rew, g_term, g_trunc, _ = env.step(int(actions[i]))
            assert bool(terminated[i]) == g_term
            assert bool(truncated[i]) == g_trunc
            assert float(reward[i]) == g_rew
            if g_term or g_trunc:
                n_term += g_term
                n_trunc += g_trunc
                worst["final_obs"] = max(
                    worst["final_obs"], float(np.abs(info["final_obs"][i].numpy() - g_obs).max())
                )
                env.reset()
                new_state[i] = torch.as_tensor(env.unwrapped.state, dtype=dtype)
            else:
                worst["obs"] = max(worst["obs"], float(np.abs(obs[i].numpy() - g_obs).max()))
                worst["state"] = max(
                    worst["state"],
                    float(np.abs(tenv.state[i].double().numpy() - env.unwrapped.state).max()),
                )
                assert torch.equal(info["final_obs"][i], obs[i])
        tenv.state = new_state
    return worst, n_term, n_trunc


@pytest.mark.parametrize("sutton_barto_reward", [False, True])
def test_float64_dynamics_match_gymnasium(sutton_barto_reward):
    # max_episode_steps=40 so both terminations and truncations (and some steps where
    # both happen) occur within a few hundred steps.
    worst, n_term, n_trunc = _run_against_gymnasium(
        torch.float64, n=16, steps=400, max_episode_steps=40,
        sutton_barto_reward=sutton_barto_reward,
    )
    assert n_term > 50 and n_trunc > 5
    assert worst["state"] < 1e-12
    assert worst["obs"] < 1e-6  # float32 casts of (near-)identical float64 states
    assert worst["final_obs"] < 1e-6


def test_float32_dynamics_close_to_gymnasium_over_short_horizon():
    worst, n_term, _ = _run_against_gymnasium(
        torch.float32, n=16, steps=60, max_episode_steps=500
    )
    assert n_term > 0
    assert worst["state"] < 1e-4
    assert worst["obs"] < 1e-4
    assert worst["final_obs"] < 1e-4


def test_spaces_and_defaults_match_gymnasium():
    ref = gym.make("CartPole-v1")
    env = TorchCartPole(3)
    assert env.single_observation_space == ref.observation_space
    assert env.single_observation_space.dtype == np.float32
    assert env.single_action_space == gym.spaces.Discrete(2)
    assert env.observation_space.shape == (3, 4)
    assert env.action_space == gym.spaces.MultiDiscrete([2, 2, 2])
    assert env.max_episode_steps == gym.spec("CartPole-v1").max_episode_steps == 500
    assert env.device == torch.device("cpu")


def test_reset_shapes_and_initial_range():
    env = TorchCartPole(1000)
    obs, info = env.reset(seed=0)
    assert info == {}
    assert obs.shape == (1000, 4) and obs.dtype == torch.float32
    # uniform on [-0.05, 0.05): fills the interval, std 0.1 / sqrt(12) ~ 0.0289
    assert bool((obs.abs() < 0.05).all())
    assert float(obs.abs().max()) > 0.0495
    assert abs(float(obs.mean())) < 0.003
    assert abs(float(obs.std()) - 0.1 / 12**0.5) < 0.002
    assert bool((env.elapsed_steps == 0).all())


def test_truncation_and_autoreset_at_max_episode_steps():
    n, limit = 4, 5
    env = TorchCartPole(n, max_episode_steps=limit, dtype=torch.float64)
    env.reset(seed=0)
    env.state = torch.zeros(n, 4)
    # Alternating pushes from rest keep the pole near upright: no termination.
    for t in range(1, limit + 1):
        before = env.state.clone()
        actions = torch.full((n,), t % 2, dtype=torch.int64)
        obs, reward, terminated, truncated, info = env.step(actions)
        assert not bool(terminated.any())
        assert torch.equal(reward, torch.ones(n))
        if t < limit:
            assert not bool(truncated.any())
            assert not bool(info["_final_obs"].any())
            assert torch.equal(info["final_obs"], obs)
            assert bool((env.elapsed_steps == t).all())
        else:
            assert bool(truncated.all())
            assert bool(info["_final_obs"].all())
            # The true final observation is one Euler step from ``before`` ...
            expected_final = before.clone()
            expected_final[:, 0] += env.tau * before[:, 1]
            assert torch.allclose(info["final_obs"][:, 0].double(), expected_final[:, 0])
            assert bool((info["final_obs"].abs() > 0).any())
            # ... while the returned obs is a fresh initial state.
            assert bool((obs.abs() < 0.05).all())
            assert not torch.equal(obs, info["final_obs"])
            assert torch.equal(obs, env.state.float())
            assert bool((env.elapsed_steps == 0).all())
    # The next episode runs its full length again.
    for t in range(1, limit + 1):
        _, _, terminated, truncated, _ = env.step(torch.full((n,), t % 2, dtype=torch.int64))
        assert bool(truncated.all()) == (t == limit)


def test_termination_autoreset_only_in_finished_rows():
    env = TorchCartPole(4, dtype=torch.float64)
    env.reset(seed=0)
    falling = [0.0, 0.0, 0.2, 2.0]  # theta + tau * theta_dot > 12 degrees after one step
    off_track = [2.39, 1.0, 0.0, 0.0]  # x + tau * x_dot > 2.4
    upright = [0.0, 0.0, 0.0, 0.0]
    env.state = torch.tensor([falling, upright, off_track, upright], dtype=torch.float64)
    obs, reward, terminated, truncated, info = env.step(torch.tensor([1, 0, 1, 1]))
    mask = torch.tensor([True, False, True, False])
    assert torch.equal(terminated, mask)
    assert not bool(truncated.any())
    assert torch.equal(info["_final_obs"], mask)
    assert torch.equal(reward, torch.ones(4))  # reward 1 on the terminating step too
    final = info["final_obs"]
    assert float(final[0, 2]) > env.theta_threshold_radians
    assert float(final[2, 0]) > env.x_threshold
    assert bool((obs[mask].abs() < 0.05).all())  # fresh episodes in ended rows
    assert torch.equal(obs[~mask], final[~mask])  # untouched elsewhere
    assert env.elapsed_steps.tolist() == [0, 1, 0, 1]


def test_terminated_and_truncated_on_the_same_step():
    env = TorchCartPole(2, max_episode_steps=1, sutton_barto_reward=True)
    env.reset(seed=0)
    env.state = torch.tensor([[0.0, 0.0, 0.2, 2.0], [0.0, 0.0, 0.0, 0.0]])
    _, reward, terminated, truncated, info = env.step(torch.tensor([0, 0]))
    assert terminated.tolist() == [True, False]
    assert truncated.tolist() == [True, True]
    assert info["_final_obs"].tolist() == [True, True]
    assert reward.tolist() == [-1.0, 0.0]


def _rollout(env: TorchCartPole, seed: int, steps: int = 60) -> torch.Tensor:
    obs, _ = env.reset(seed=seed)
    actions_gen = torch.Generator(device=env.device).manual_seed(99)
    out = [obs]
    for _ in range(steps):
        actions = torch.randint(0, 2, (env.num_envs,), generator=actions_gen, device=env.device)
        obs, *_ = env.step(actions)
        out.append(obs)
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_reproduces_and_different_seeds_differ(device):
    env = TorchCartPole(32, device=device)
    a = _rollout(env, seed=5)
    b = _rollout(TorchCartPole(32, device=device), seed=5)
    c = _rollout(env, seed=6)
    assert a.device.type == torch.device(device).type
    assert torch.equal(a, b)  # includes the autoreset draws (episodes end within 60 steps)
    assert not torch.equal(a[0], c[0])
    # reset(None) continues the stream rather than restarting it.
    first, _ = env.reset(seed=5)
    again, _ = env.reset()
    assert not torch.equal(first, again)


def test_random_policy_episode_length_matches_gymnasium():
    """Mean length of the first episode of each copy under uniform random actions: the
    torch env and Gymnasium's own vectorised CartPole must agree (both ~22 steps)."""
    n = 4096

    torch_env = TorchCartPole(n)
    torch_env.reset(seed=0)
    gen = torch.Generator().manual_seed(1)
    first_len = torch.zeros(n, dtype=torch.int64)
    alive = torch.ones(n, dtype=torch.bool)
    for t in range(1, 501):
        _, _, terminated, truncated, _ = torch_env.step(torch.randint(0, 2, (n,), generator=gen))
        ended = (terminated | truncated) & alive
        first_len[ended] = t
        alive &= ~ended
        if not bool(alive.any()):
            break
    torch_mean = first_len.double().mean().item()

    gym_env = CartPoleVectorEnv(num_envs=n)
    gym_env.reset(seed=0)
    rng = np.random.default_rng(1)
    g_len = np.zeros(n)
    g_alive = np.ones(n, dtype=bool)
    for t in range(1, 501):
        _, _, terminated, truncated, _ = gym_env.step(rng.integers(0, 2, size=n))
        ended = (terminated | truncated) & g_alive
        g_len[ended] = t
        g_alive &= ~ended
        if not g_alive.any():
            break
    gym_mean = float(g_len.mean())

    # Standard error of each mean is ~12 / sqrt(4096) ~ 0.2 steps.
    assert 19.0 < torch_mean < 26.0
    assert abs(torch_mean - gym_mean) < 1.5, (torch_mean, gym_mean)


def test_numpy_actions_and_input_checks():
    env = TorchCartPole(3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(3, dtype=torch.int64))
    env.reset(seed=0)
    obs, *_ = env.step(np.array([0, 1, 0]))
    assert obs.shape == (3, 4)
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="dtype"):
        TorchCartPole(3, dtype=torch.float16)
    env.close()


def test_registry_and_make_torch_env():
    assert TORCH_ENVS == {"CartPole-v1": TorchCartPole}
    env = make_torch_env("CartPole-v1", 8, "cpu", max_episode_steps=200, dtype=torch.float64)
    assert isinstance(env, TorchCartPole)
    assert (env.num_envs, env.max_episode_steps, env.dtype) == (8, 200, torch.float64)

    with pytest.raises(InvalidConfig) as err:
        make_torch_env("Acrobot-v1", 8, "cpu")
    assert err.value.message.startswith("environment.id:")
    assert "Acrobot-v1" in err.value.message and "CartPole-v1" in err.value.message
    assert err.value.exit_code == 2

    with pytest.raises(InvalidConfig) as err:
        make_torch_env("CartPole-v1", 8, "cpu", render_mode="human")
    assert err.value.message.startswith("environment.kwargs:")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_sync():
    env = TorchCartPole(1024, device="cuda")
    env.reset(seed=0)
    actions = torch.randint(0, 2, (1024,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(50):
            obs, *_, info = env.step(actions)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert obs.device.type == "cuda" and info["final_obs"].device.type == "cuda"
