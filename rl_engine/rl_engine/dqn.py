"""Deep Q-Networks, in one readable module (CleanRL ``dqn.py`` layout, Huang et al. 2022).

* DQN: Mnih et al. 2015, "Human-level control through deep reinforcement learning",
  Nature 518 -- experience replay, a target network, an epsilon-greedy behaviour policy.
* Double DQN: van Hasselt et al. 2016, "Deep Reinforcement Learning with Double
  Q-learning", AAAI (arXiv:1509.06461) -- the online network picks the next action, the
  target network scores it.
* Huber (smooth L1) TD loss and global gradient-norm clipping, as in SB3's DQN; the
  ``gradient_clip`` knob of seed ``002_0d4b42cc872a97fa.txt`` ("Training Fails with NaN
  Loss": exploding gradients) is ``max_grad_norm``.

A NaN/inf loss, gradient norm or weight stops the run with
:class:`rl_engine.errors.NonFiniteLoss`, naming the env step and the last finite values.

Counts are *env steps* summed over all copies (``N = num_envs`` per vector step), like
``training.totalTimesteps``: ``learning_starts``, ``train_frequency``,
``target_network_frequency`` and the epsilon schedule all use that clock. With ``N = 1``
this is CleanRL's and SB3's step counter. Truncated episodes (time limits) are not terminal:
the stored next observation is the true final one and the target bootstraps from it.

Shapes: ``N`` envs, ``D = prod(observation_shape)``, ``A`` actions, ``M`` batch size.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import NonFiniteLoss
from .vector import EpisodeTracker, as_tensor_env, count_successes

__all__ = ["DQNConfig", "QNetwork", "ReplayBuffer", "DQNTrainer", "DQNIterationStats",
           "linear_schedule", "td_targets"]


@dataclass(frozen=True)
class DQNConfig:
    """DQN hyperparameters (defaults: CleanRL ``dqn.py`` for CartPole, plus Double DQN,
    Huber loss and gradient clipping).

    Attributes:
        learning_rate: Adam step size.
        buffer_size: replay capacity (transitions).
        learning_starts: env steps of pure exploration before the first update.
        batch_size: transitions per gradient step (``M``).
        gamma: discount factor per env step.
        tau: target-network soft-update coefficient (1.0 = hard copy).
        target_network_frequency: env steps between target updates.
        train_frequency: env steps between training phases.
        gradient_steps: gradient steps per training phase.
        exploration_fraction: fraction of ``total_timesteps`` over which epsilon decays.
        start_e: initial epsilon.
        end_e: final epsilon.
        max_grad_norm: global L2 gradient-norm clip.
        double_dqn: use the Double DQN target.
        huber_delta: Huber loss threshold (``None`` = mean squared error).
        hidden_sizes: ReLU hidden-layer widths of the Q-network.
        steps_per_iteration: env steps per :meth:`DQNTrainer.train_iteration` (logging,
            evaluation and telemetry granularity; rounded up to whole vector steps).
    """

    learning_rate: float = 2.5e-4
    buffer_size: int = 10_000
    learning_starts: int = 10_000
    batch_size: int = 128
    gamma: float = 0.99
    tau: float = 1.0
    target_network_frequency: int = 500
    train_frequency: int = 10
    gradient_steps: int = 1
    exploration_fraction: float = 0.5
    start_e: float = 1.0
    end_e: float = 0.05
    max_grad_norm: float = 10.0
    double_dqn: bool = True
    huber_delta: float | None = 1.0
    hidden_sizes: tuple[int, ...] = (120, 84)
    steps_per_iteration: int = 1024


def linear_schedule(start_e: float, end_e: float, duration: float, t: float) -> float:
    """Epsilon at env step ``t``: linear from ``start_e`` to ``end_e`` over ``duration``
    steps, then constant (CleanRL's schedule)."""
    frac = 1.0 if duration <= 0 else min(1.0, max(0.0, t / duration))
    return start_e + frac * (end_e - start_e)


class QNetwork(nn.Module):
    """MLP ``Q(s, .)`` with ReLU hidden layers.

    Args:
        obs_dim: ``D``.
        num_actions: ``A``.
        hidden_sizes: hidden widths.
    """

    def __init__(self, obs_dim: int, num_actions: int, hidden_sizes: tuple[int, ...] = (120, 84)):
        super().__init__()
        self.obs_dim = int(obs_dim)
        self.num_actions = int(num_actions)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        layers: list[nn.Module] = []
        last = self.obs_dim
        for width in self.hidden_sizes:
            layers += [nn.Linear(last, width), nn.ReLU()]
            last = width
        layers.append(nn.Linear(last, self.num_actions))
        self.q = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Q-values, ``(B, A)`` for observations ``(B, D)``."""
        return self.q(x)

    def action_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores whose argmax is the greedy action (the Q-values), ``(B, A)``."""
        return self.q(x)

    @torch.no_grad()
    def act_greedy(self, x: torch.Tensor) -> torch.Tensor:
        """Greedy actions ``argmax_a Q(s, a)``, ``(B,)``."""
        return self.q(x).argmax(dim=-1)


class ReplayBuffer:
    """Uniform experience replay in preallocated tensors on the training device.

    Stores ``(obs, action, reward, next_obs, terminated)``; ``next_obs`` is the true final
    observation for finished episodes, and only ``terminated`` (not truncation) stops
    bootstrapping.

    Args:
        capacity: transitions kept (oldest overwritten first).
        obs_dim: ``D``.
        device: storage device.
        seed: seeds the sampling generator.
    """

    def __init__(self, capacity: int, obs_dim: int, device: torch.device, seed: int) -> None:
        self.capacity = int(capacity)
        self.device = device
        self.obs = torch.zeros((capacity, obs_dim), device=device)
        self.next_obs = torch.zeros((capacity, obs_dim), device=device)
        self.actions = torch.zeros(capacity, dtype=torch.long, device=device)
        self.rewards = torch.zeros(capacity, device=device)
        self.terminated = torch.zeros(capacity, device=device)
        self.pos = 0
        self.size = 0
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed) % 2**63)

    def add(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
            next_obs: torch.Tensor, terminated: torch.Tensor) -> None:
        """Add ``N`` transitions (each argument has leading dimension ``N``)."""
        n = obs.shape[0]
        idx = (torch.arange(n, device=self.device) + self.pos) % self.capacity
        self.obs[idx] = obs
        self.actions[idx] = actions
        self.rewards[idx] = rewards
        self.next_obs[idx] = next_obs
        self.terminated[idx] = terminated.float()
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """``batch_size`` uniform draws (with replacement): ``(obs (M, D), actions (M,),
        rewards (M,), next_obs (M, D), terminated (M,))``."""
        idx = torch.randint(0, self.size, (batch_size,), device=self.device,
                            generator=self.generator)
        return (self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx],
                self.terminated[idx])


def td_targets(rewards: torch.Tensor, next_obs: torch.Tensor, terminated: torch.Tensor,
               online: QNetwork, target: QNetwork, gamma: float, double: bool) -> torch.Tensor:
    """One-step TD targets ``r + gamma * (1 - terminated) * Q_target(s', a*)``.

    ``a* = argmax_a Q_online(s', a)`` for Double DQN (van Hasselt et al. 2016, eq. 4),
    else ``argmax_a Q_target(s', a)`` (Mnih et al. 2015).

    Args:
        rewards: ``(M,)``; next_obs: ``(M, D)``; terminated: ``(M,)`` in {0, 1}.

    Returns:
        Targets, ``(M,)`` (no gradient).
    """
    with torch.no_grad():
        q_next_target = target(next_obs)
        if double:
            best = online(next_obs).argmax(dim=-1, keepdim=True)
        else:
            best = q_next_target.argmax(dim=-1, keepdim=True)
        q_next = q_next_target.gather(-1, best).squeeze(-1)
        return rewards + gamma * (1.0 - terminated) * q_next


@dataclass
class DQNIterationStats:
    """Metrics of one :meth:`DQNTrainer.train_iteration`. Times are seconds."""

    iteration: int
    global_step: int
    learning_rate: float
    epsilon: float
    td_loss: float | None
    q_value: float | None
    gradient_steps: int
    episodes_finished: int
    mean_episodic_return: float | None
    mean_episodic_length: float | None
    steps_per_second: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """camelCase dict for ``training_history.json``."""
        out = {}
        for key, value in asdict(self).items():
            head, *rest = key.split("_")
            out[head + "".join(w.capitalize() for w in rest)] = value
        return out


class DQNTrainer:
    """Runs DQN on a vector env (Gymnasium or torch-batched, see :mod:`rl_engine.vector`).

    Args:
        envs: vector env with ``Box`` observations and ``Discrete`` actions.
        cfg: hyperparameters.
        total_timesteps: env-step budget of the run (for the epsilon schedule).
        seed: seeds the env resets, exploration and replay sampling (seed torch yourself
            before constructing the trainer, for the network init).
        device: torch device of the networks and the replay buffer.
        recent_episodes: window for ``mean_episodic_return``.
    """

    def __init__(self, envs: Any, cfg: DQNConfig, total_timesteps: int, seed: int,
                 device: torch.device, recent_episodes: int = 20) -> None:
        self.envs = as_tensor_env(envs, device)
        self.cfg = cfg
        self.total_timesteps = int(total_timesteps)
        self.device = device
        self.num_envs = self.envs.num_envs
        self.obs_dim = int(np.prod(self.envs.single_observation_space.shape))
        self.num_actions = int(self.envs.single_action_space.n)
        self.vector_steps_per_iteration = max(1, math.ceil(cfg.steps_per_iteration / self.num_envs))
        self.batch_size = self.vector_steps_per_iteration * self.num_envs

        self.agent = QNetwork(self.obs_dim, self.num_actions, cfg.hidden_sizes).to(device)
        self.target = QNetwork(self.obs_dim, self.num_actions, cfg.hidden_sizes).to(device)
        self.target.load_state_dict(self.agent.state_dict())
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=cfg.learning_rate,
                                          fused=True)
        self.buffer = ReplayBuffer(cfg.buffer_size, self.obs_dim, device, seed)
        self.explore = torch.Generator(device=device)
        self.explore.manual_seed(int(seed) % 2**63 + 1)

        self.next_obs = self.envs.reset(seed=seed)
        self.global_step = 0
        self.iteration = 0
        self.gradient_steps_done = 0
        self._next_train = cfg.learning_starts + cfg.train_frequency
        self._next_target = cfg.learning_starts + cfg.target_network_frequency
        self.episodes = EpisodeTracker(self.num_envs)
        self.recent_returns: deque[float] = deque(maxlen=recent_episodes)
        self.recent_lengths: deque[int] = deque(maxlen=recent_episodes)
        self.episodes_finished = 0
        self.last_rollout_successes: int | None = None
        self.last_rollout_returns: list[float] = []
        self._last_finite: dict[str, Any] | None = None

    @property
    def epsilon(self) -> float:
        """Exploration rate at the current env step."""
        cfg = self.cfg
        return linear_schedule(cfg.start_e, cfg.end_e,
                               cfg.exploration_fraction * self.total_timesteps, self.global_step)

    @torch.no_grad()
    def _act(self, obs: torch.Tensor) -> torch.Tensor:
        """Epsilon-greedy actions ``(N,)``: each copy explores independently."""
        n = obs.shape[0]
        eps = self.epsilon
        greedy = self.agent(obs).argmax(dim=-1)
        if eps <= 0.0:
            return greedy
        explore = torch.rand(n, device=self.device, generator=self.explore) < eps
        random = torch.randint(0, self.num_actions, (n,), device=self.device,
                               generator=self.explore)
        return torch.where(explore, random, greedy)

    def _fail(self, what: str, values: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        if self._last_finite is None:
            last = "none (no finite loss was computed before)"
        else:
            lf = self._last_finite
            vals = ", ".join(f"{k}={v:.6g}" for k, v in lf["values"].items())
            last = f"{vals} (global step {lf['global_step']}, gradient step {lf['gradient_step']})"
        raise NonFiniteLoss(
            f"non-finite {what} at global step {self.global_step} (gradient step "
            f"{self.gradient_steps_done + 1}, iteration {self.iteration}): {shown}. "
            f"Last finite values: {last}. Check algorithm.hyperparameters.learningRate and "
            f"maxGradNorm, and the environment's rewards."
        )

    def _gradient_step(self) -> torch.Tensor:
        """One Adam step on a replay minibatch; returns ``[td_loss, mean Q, grad_norm]`` as
        a ``(3,)`` tensor (checked for finiteness once per training phase, so the device
        is not synchronised after every step)."""
        cfg = self.cfg
        obs, actions, rewards, next_obs, terminated = self.buffer.sample(cfg.batch_size)
        targets = td_targets(rewards, next_obs, terminated, self.agent, self.target,
                             cfg.gamma, cfg.double_dqn)
        q = self.agent(obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        if cfg.huber_delta is None:
            loss = F.mse_loss(q, targets)
        else:
            loss = F.huber_loss(q, targets, delta=cfg.huber_delta)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.agent.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        return torch.stack([loss.detach(), q.detach().mean(), grad_norm.detach()])

    def _train_phase(self) -> torch.Tensor:
        """``gradient_steps`` gradient steps; returns their ``(steps, 3)`` statistics.

        Raises:
            NonFiniteLoss: naming the first gradient step whose TD loss, mean Q or
                gradient norm is not finite, and the last finite values before it.
        """
        first = self.gradient_steps_done
        rows = torch.stack([self._gradient_step() for _ in range(self.cfg.gradient_steps)])
        finite = torch.isfinite(rows).all(dim=-1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            names = ("tdLoss", "qValue", "gradNorm")
            if bad > 0:
                self._last_finite = {"global_step": self.global_step,
                                     "gradient_step": first + bad,
                                     "values": dict(zip(names, rows[bad - 1].tolist()))}
            self.gradient_steps_done = first + bad
            what = "TD loss" if not bool(torch.isfinite(rows[bad, :2]).all()) else "gradient norm"
            self._fail(what, dict(zip(names, rows[bad].tolist())))
        self.gradient_steps_done = first + len(rows)
        self._last_finite = {"global_step": self.global_step,
                             "gradient_step": self.gradient_steps_done,
                             "values": dict(zip(("tdLoss", "qValue", "gradNorm"),
                                                rows[-1].tolist()))}
        return rows

    def _update_target(self) -> None:
        tau = self.cfg.tau
        with torch.no_grad():
            for t, o in zip(self.target.parameters(), self.agent.parameters()):
                if tau >= 1.0:
                    t.copy_(o)
                else:
                    t.mul_(1.0 - tau).add_(o, alpha=tau)

    def train_iteration(self) -> DQNIterationStats:
        """Act for ``steps_per_iteration`` env steps, storing transitions and training every
        ``train_frequency`` env steps once ``learning_starts`` is passed.

        Raises:
            NonFiniteLoss: see the module docstring.
        """
        cfg = self.cfg
        self.iteration += 1
        t0 = time.perf_counter()
        successes: int | None = None
        step_rewards: list[torch.Tensor] = []
        step_dones: list[torch.Tensor] = []
        phases: list[torch.Tensor] = []
        steps_before = self.gradient_steps_done
        for _ in range(self.vector_steps_per_iteration):
            obs = self.next_obs
            actions = self._act(obs)
            out = self.envs.step(actions)
            self.global_step += self.num_envs
            done = out.done
            step_rewards.append(out.reward)
            step_dones.append(done)
            next_obs = out.obs
            if bool(done.any()):
                next_obs = torch.where(done.unsqueeze(-1), out.final_obs, out.obs)
                if out.success is not None:
                    successes = count_successes(out.success.cpu().numpy(), done.cpu().numpy(),
                                                successes)
            self.buffer.add(obs, actions, out.reward, next_obs, out.terminated)
            self.next_obs = out.obs
            while self.global_step >= self._next_train:
                self._next_train += cfg.train_frequency
                phases.append(self._train_phase())
            while self.global_step >= self._next_target:
                self._next_target += cfg.target_network_frequency
                self._update_target()
        td_loss = q_value = None
        if phases:
            means = torch.cat(phases).mean(dim=0).tolist()
            td_loss, q_value = means[0], means[1]
            if not all(bool(torch.isfinite(p).all()) for p in self.agent.parameters()):
                self._fail("network parameters after an optimizer step",
                           {"tdLoss": td_loss, "qValue": q_value})
        episode_returns, lengths = self.episodes.record(torch.stack(step_rewards),
                                                        torch.stack(step_dones))
        finished = len(episode_returns)
        self.recent_returns.extend(episode_returns)
        self.recent_lengths.extend(lengths)
        self.episodes_finished += finished
        self.last_rollout_successes = successes
        self.last_rollout_returns = episode_returns
        seconds = time.perf_counter() - t0
        return DQNIterationStats(
            iteration=self.iteration,
            global_step=self.global_step,
            learning_rate=cfg.learning_rate,
            epsilon=self.epsilon,
            td_loss=td_loss,
            q_value=q_value,
            gradient_steps=self.gradient_steps_done - steps_before,
            episodes_finished=finished,
            mean_episodic_return=float(np.mean(self.recent_returns)) if self.recent_returns else None,
            mean_episodic_length=float(np.mean(self.recent_lengths)) if self.recent_lengths else None,
            steps_per_second=self.batch_size / max(seconds, 1e-9),
            seconds=seconds,
        )
