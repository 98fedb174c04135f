"""DQN building blocks: Double-DQN targets against a hand computation, the replay buffer,
the epsilon schedule, NaN detection naming the step, CPU reproducibility, time limits."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_engine.dqn import DQNConfig, DQNTrainer, QNetwork, ReplayBuffer, linear_schedule, td_targets
from rl_engine.envs import make_vector_env
from rl_engine.errors import NonFiniteLoss

torch.set_num_threads(1)
CPU = torch.device("cpu")


class _FixedQ(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)

    def forward(self, x):
        return self.table[x[:, 0].long()]


def test_double_dqn_target_uses_online_argmax_and_target_values():
    # Two next states. Online prefers action 1 in state 0 and action 0 in state 1;
    # the target network would pick the other action in both.
    online = _FixedQ([[0.0, 1.0], [5.0, 2.0]])
    target = _FixedQ([[10.0, 3.0], [1.0, 7.0]])
    next_obs = torch.tensor([[0.0], [1.0]])
    rewards = torch.tensor([1.0, 2.0])
    terminated = torch.tensor([0.0, 1.0])
    double = td_targets(rewards, next_obs, terminated, online, target, 0.5, double=True)
    vanilla = td_targets(rewards, next_obs, terminated, online, target, 0.5, double=False)
    # state 0: online argmax = 1 -> target Q = 3; vanilla max target = 10. state 1: terminal.
    assert double.tolist() == [1.0 + 0.5 * 3.0, 2.0]
    assert vanilla.tolist() == [1.0 + 0.5 * 10.0, 2.0]


def test_replay_buffer_wraps_and_keeps_the_newest():
    buf = ReplayBuffer(5, 2, CPU, seed=0)
    for i in range(3):
        obs = torch.full((3, 2), float(i))
        buf.add(obs, torch.full((3,), i), torch.full((3,), float(i)), obs + 1,
                torch.zeros(3, dtype=torch.bool))
    assert buf.size == 5 and buf.pos == 4
    assert sorted(buf.rewards.tolist()) == [1.0, 1.0, 2.0, 2.0, 2.0]
    obs, actions, rewards, next_obs, term = buf.sample(64)
    assert obs.shape == (64, 2) and actions.shape == (64,) and term.shape == (64,)
    assert torch.equal(next_obs, obs + 1) and set(rewards.tolist()) <= {1.0, 2.0}


def test_linear_schedule():
    assert linear_schedule(1.0, 0.05, 100, 0) == 1.0
    assert linear_schedule(1.0, 0.05, 100, 50) == pytest.approx(0.525)
    assert linear_schedule(1.0, 0.05, 100, 1000) == pytest.approx(0.05)
    assert linear_schedule(1.0, 0.05, 0, 0) == pytest.approx(0.05)


def _trainer(seed, cfg, num_envs=2, total=20_000, make=lambda: gym.make("CartPole-v1")):
    torch.manual_seed(seed)
    return DQNTrainer(make_vector_env(make, num_envs), cfg, total, seed, CPU)


SMALL = DQNConfig(learning_starts=200, train_frequency=4, target_network_frequency=100,
                  batch_size=32, buffer_size=2000, steps_per_iteration=256, hidden_sizes=(32,))


def test_same_seed_same_weights_and_losses():
    runs = []
    for _ in range(2):
        trainer = _trainer(5, SMALL)
        stats = [trainer.train_iteration() for _ in range(3)]
        runs.append((trainer.agent.state_dict(), [s.td_loss for s in stats]))
    (w1, l1), (w2, l2) = runs
    assert l1 == l2 and l1[-1] is not None
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    other = _trainer(6, SMALL)
    for _ in range(3):
        other.train_iteration()
    assert not all(torch.equal(w1[k], other.agent.state_dict()[k]) for k in w1)


def test_iteration_counts_env_steps_and_gradient_steps():
    trainer = _trainer(0, SMALL, num_envs=4)
    st = trainer.train_iteration()
    assert st.global_step == 256 and trainer.global_step == 256
    # learning starts after 200 env steps; one gradient step every 4 env steps after that.
    assert st.gradient_steps == (256 - 200) // 4
    assert 0.0 < st.epsilon < 1.0


def test_huge_learning_rate_raises_non_finite_loss_naming_the_step():
    cfg = DQNConfig(**{**SMALL.__dict__, "learning_rate": 1e30, "max_grad_norm": 1e30})
    trainer = _trainer(0, cfg)
    with pytest.raises(NonFiniteLoss) as exc:
        for _ in range(20):
            trainer.train_iteration()
    msg = exc.value.message
    assert exc.value.exit_code == 3
    assert msg.startswith("non-finite ") and "at global step " in msg and "(gradient step " in msg
    assert "Last finite values: tdLoss=" in msg


class _NaNAfter(gym.Wrapper):
    def __init__(self, env, after):
        super().__init__(env)
        self.after, self.t = after, 0

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        self.t += 1
        return obs, (float("nan") if self.t > self.after else r), term, trunc, info


def test_nan_rewards_stop_the_run_and_say_so():
    trainer = _trainer(0, SMALL, make=lambda: _NaNAfter(gym.make("CartPole-v1"), 150))
    with pytest.raises(NonFiniteLoss) as exc:
        for _ in range(5):
            trainer.train_iteration()
    assert "non-finite TD loss" in exc.value.message


def test_truncation_bootstraps_and_stores_the_final_observation():
    make = lambda: gym.make("CartPole-v1", max_episode_steps=5)  # noqa: E731
    trainer = _trainer(0, DQNConfig(**{**SMALL.__dict__, "learning_starts": 10_000}), num_envs=1,
                       make=make)
    trainer.train_iteration()
    buf = trainer.buffer
    n = buf.size
    # Every 5th transition ends an episode by truncation: stored as not terminated, with the
    # true final observation (not the next episode's first one) as next_obs.
    # (A random CartPole episode can also terminate before step 5; those rows are skipped.)
    assert n == 256
    checked = 0
    for i in range(0, 40):
        if i % 5 != 4:
            assert torch.equal(buf.next_obs[i], buf.obs[i + 1])
        elif buf.terminated[i] == 0:
            assert not torch.equal(buf.next_obs[i], buf.obs[i + 1])
            checked += 1
    assert checked >= 4


def test_qnetwork_shapes():
    net = QNetwork(4, 3, (16, 8))
    x = torch.zeros(7, 4)
    assert net(x).shape == (7, 3) and net.act_greedy(x).shape == (7,)
    assert np.array_equal(net.action_scores(x).argmax(-1).numpy(), net.act_greedy(x).numpy())


def test_success_of_finished_episodes_is_counted_from_final_info():
    import rl_engine.domains  # noqa: F401 - registers rlops/Router-v0

    make = lambda: gym.make("rlops/Router-v0", n_tasks=4)  # noqa: E731
    trainer = _trainer(0, DQNConfig(**{**SMALL.__dict__, "steps_per_iteration": 32}),
                       num_envs=2, make=make)
    st = trainer.train_iteration()
    # 32 env steps over 2 copies of 4-task episodes: 8 episodes, each judged by the env.
    assert st.episodes_finished == 8
    assert trainer.last_rollout_successes is not None
    assert 0 <= trainer.last_rollout_successes <= 8
