"""PPO building blocks: GAE against an independent reference, agent shapes, non-finite
detection with a real divergent update, reproducibility."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_engine.config import EnvironmentConfig
from rl_engine.envs import make_vector_env, resolve_env_factory
from rl_engine.errors import NonFiniteLoss
from rl_engine.ppo import Agent, PPOConfig, PPOTrainer, compute_gae

torch.set_num_threads(1)


def reference_gae(rewards, values, dones, next_value, gamma, lam):
    """Forward-sum definition (Schulman et al. 2015, eq. 16), independent of the
    backward recursion: A_t = sum_l (gamma*lam)^l delta_{t+l}, stopping after the step
    where the episode ends; delta_t = r_t + gamma V(s_{t+1}) (1 - done_t) - V(s_t)."""
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for n in range(N):
        def v_next(t):
            return next_value[n] if t == T - 1 else values[t + 1][n]

        deltas = [
            rewards[t][n] + gamma * v_next(t) * (1.0 - dones[t][n]) - values[t][n]
            for t in range(T)
        ]
        for t in range(T):
            total, weight = 0.0, 1.0
            for k in range(t, T):
                total += weight * deltas[k]
                if dones[k][n]:
                    break
                weight *= gamma * lam
            adv[t][n] = total
    return adv


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (0.5, 1.0), (1.0, 0.7)])
def test_gae_matches_reference(gamma, lam):
    rng = np.random.default_rng(0)
    T, N = 37, 5
    rewards = rng.normal(size=(T, N))
    values = rng.normal(size=(T, N))
    dones = (rng.random((T, N)) < 0.15).astype(np.float64)
    next_value = rng.normal(size=N)
    adv, ret = compute_gae(
        torch.tensor(rewards), torch.tensor(values), torch.tensor(dones),
        torch.tensor(next_value), gamma, lam,
    )
    expected = np.array(reference_gae(rewards.tolist(), values.tolist(), dones.tolist(),
                                      next_value.tolist(), gamma, lam))
    assert adv.shape == (T, N) and ret.shape == (T, N)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ret.numpy(), expected + values, rtol=1e-10, atol=1e-10)


def test_gae_lambda_one_gives_discounted_monte_carlo_returns():
    # rewards 1, 2, 3 then bootstrap 4, gamma 0.5: 1 + 0.5*2 + 0.25*3 + 0.125*4 = 3.25
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[10.0], [-3.0], [7.0]])  # irrelevant for lambda = 1
    dones = torch.zeros(3, 1)
    _, ret = compute_gae(rewards, values, dones, torch.tensor([4.0]), 0.5, 1.0)
    assert ret[:, 0].tolist() == pytest.approx([3.25, 4.5, 5.0])


def test_gae_does_not_leak_across_episode_end():
    rewards = torch.tensor([[1.0], [100.0]])
    values = torch.zeros(2, 1)
    dones = torch.tensor([[1.0], [0.0]])  # episode ends after step 0
    adv, _ = compute_gae(rewards, values, dones, torch.tensor([0.0]), 0.99, 0.95)
    assert adv[0, 0].item() == pytest.approx(1.0)
    assert adv[1, 0].item() == pytest.approx(100.0)


def test_agent_shapes():
    agent = Agent(obs_dim=4, num_actions=3)
    x = torch.randn(7, 4)
    action, logp, ent, value = agent.get_action_and_value(x)
    assert action.shape == logp.shape == ent.shape == value.shape == (7,)
    assert agent.get_value(x).shape == (7,)
    given = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    a2, logp2, _, _ = agent.get_action_and_value(x, given)
    assert torch.equal(a2, given)
    probs = torch.softmax(agent.actor(x), dim=-1)
    np.testing.assert_allclose(logp2.exp().detach().numpy(),
                               probs[torch.arange(7), given].detach().numpy(), rtol=1e-5)
    assert agent.act_greedy(x).tolist() == probs.argmax(-1).tolist()


def _trainer(seed: int, cfg: PPOConfig, iterations: int = 10) -> PPOTrainer:
    torch.manual_seed(seed)
    factory = resolve_env_factory(EnvironmentConfig(id="CartPole-v1"))
    envs = make_vector_env(factory, 2)
    return PPOTrainer(envs, cfg, iterations, seed, torch.device("cpu"))


def test_huge_learning_rate_raises_non_finite_loss_with_last_finite_values():
    cfg = PPOConfig(learning_rate=1e30, num_steps=32, anneal_lr=False)
    trainer = _trainer(0, cfg)
    with pytest.raises(NonFiniteLoss) as exc:
        for _ in range(3):
            trainer.train_iteration()
    msg = exc.value.message
    assert exc.value.exit_code == 3 and exc.value.reason == "NonFiniteLoss"
    assert "at update 1/10 (epoch 1/4, minibatch 2/4" in msg
    assert "Last finite losses: loss=" in msg and "(update 1, epoch 1, minibatch 1/4)" in msg


def test_same_seed_same_weights_and_metrics():
    cfg = PPOConfig(num_steps=32)
    runs = []
    for _ in range(2):
        trainer = _trainer(3, cfg)
        stats = [trainer.train_iteration() for _ in range(2)]
        trainer.envs.close()
        runs.append((trainer.agent.state_dict(), [s.value_loss for s in stats]))
    (w1, l1), (w2, l2) = runs
    assert l1 == l2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    other = _trainer(4, cfg)
    other.train_iteration()
    other.envs.close()
    assert not all(torch.equal(w1[k], other.agent.state_dict()[k]) for k in w1)


def test_truncated_episodes_bootstrap_from_final_observation():
    # CartPole with a 5-step time limit: every episode is truncated (never terminated),
    # so each truncation step's reward becomes 1 + gamma * V(final_obs) != 1.
    torch.manual_seed(0)
    envs = make_vector_env(lambda: gym.make("CartPole-v1", max_episode_steps=5), 2)
    trainer = PPOTrainer(envs, PPOConfig(num_steps=10, gamma=0.9), 1, 0, torch.device("cpu"))
    trainer.collect_rollout()
    envs.close()
    done_steps = trainer.dones[:, 0].nonzero().flatten().tolist()
    assert done_steps == [4, 9]
    for t in range(10):
        r = trainer.rewards[t, 0].item()
        if t in done_steps:
            assert r != pytest.approx(1.0, abs=1e-6)
        else:
            assert r == 1.0


def test_hicra_disabled_gives_zero_credits_and_skips_every_optimizer_step():
    from prometheus_client import CollectorRegistry

    torch.manual_seed(0)
    envs = make_vector_env(lambda: gym.make("CartPole-v1"), 2)
    cfg = PPOConfig(num_steps=32, hicra={"enabled": False})
    trainer = PPOTrainer(envs, cfg, 2, 0, torch.device("cpu"), hicra_registry=CollectorRegistry())
    before = {k: v.clone() for k, v in trainer.agent.state_dict().items()}
    trainer.train_iteration()
    envs.close()
    assert trainer.optimizer_steps_skipped == cfg.update_epochs * cfg.num_minibatches
    assert all(torch.equal(before[k], v) for k, v in trainer.agent.state_dict().items())


def test_hicra_enabled_normalizes_rewards_and_updates():
    from prometheus_client import CollectorRegistry

    import rl_engine.domains  # noqa: F401 - registers rlops/Router-v0

    torch.manual_seed(0)
    registry = CollectorRegistry()
    envs = make_vector_env(lambda: gym.make("rlops/Router-v0"), 2)
    cfg = PPOConfig(num_steps=32, hicra={"plannerWeight": 2.0})
    trainer = PPOTrainer(envs, cfg, 2, 0, torch.device("cpu"), hicra_registry=registry)
    before = {k: v.clone() for k, v in trainer.agent.state_dict().items()}
    trainer.collect_rollout()
    raw = trainer.rewards.clone()
    trainer.iteration += 1
    trainer.update()
    envs.close()
    assert trainer.optimizer_steps_skipped == 0
    assert not all(torch.equal(before[k], v) for k, v in trainer.agent.state_dict().items())
    # Metrics come from the raw rewards: N=2 trajectories of T=32 steps.
    assert registry.get_sample_value("hicra_depth") == 32.0
    assert registry.get_sample_value("hicra_success_total") == float((raw.sum(0) > 0).sum())
    # The credits GAE saw: zero mean, std 2 (the multiplier) over the batch.
    from rl_engine.hicra import HICRACreditAssigner, build_hicra_from_dict

    credits = HICRACreditAssigner(build_hicra_from_dict({"plannerWeight": 2.0}),
                                  registry=CollectorRegistry())(raw.T.contiguous())
    assert abs(float(credits.mean())) < 1e-5
    assert float(credits.std(unbiased=False)) == pytest.approx(2.0, rel=1e-3)
