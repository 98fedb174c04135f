"""Proximal Policy Optimization with a clipped objective, in one readable module.

Follows CleanRL's single-file ``ppo.py`` design (Huang et al. 2022) for discrete actions:

* PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
  arXiv:1707.06347 -- clipped surrogate objective, value loss, entropy bonus, several
  epochs of minibatch Adam updates per rollout.
* GAE(lambda): Schulman et al. 2015, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation", arXiv:1506.02438.
* Implementation details as in "The 37 Implementation Details of PPO" (Huang et al.
  2022, ICLR blog track): orthogonal init, Adam eps 1e-5, linear LR annealing, advantage
  normalization per minibatch, clipped value loss, global gradient-norm clipping.

One deviation from CleanRL, for correctness: when an episode is *truncated* (time limit)
rather than terminated, the reward of that step is bootstrapped with ``gamma * V(s_final)``
of the true final observation (Pardo et al. 2018, arXiv:1712.00378), instead of being
treated as a terminal state.

How it is computed (the loss and the updates are the ones above): rollouts act with the actor
alone and score the whole batch once afterwards; the update computes the loss's gradient by
hand on the agent's parameters viewed as one flat tensor (:mod:`rl_engine.actor_critic`,
checked against autograd in the tests). See docs/trainer.md, "How PPO spends its time".

Shapes use ``T = num_steps`` (rollout length), ``N = num_envs``, ``B = T * N``,
``D = prod(observation_space.shape)`` and ``A = action_space.n``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions.categorical import Categorical

from .actor_critic import (
    FlatActorCritic, FlatAdam, PPOLossCoefficients, host_actor_logits, loss_values,
)
from .errors import NonFiniteLoss
from .vector import EpisodeTracker, GymTensorEnv, as_tensor_env, count_successes

__all__ = [
    "PPOConfig",
    "Agent",
    "compute_gae",
    "PPOTrainer",
    "IterationStats",
    "policy_spec",
    "agent_from_spec",
    "load_agent",
    "greedy_policy",
]


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (defaults: CleanRL ``ppo.py``).

    Attributes:
        learning_rate: Adam step size at iteration 1 (annealed linearly to 0 if
            ``anneal_lr``).
        num_steps: env steps per env per rollout (``T``).
        gamma: discount factor per env step.
        gae_lambda: GAE lambda.
        clip_coef: PPO ratio clip epsilon (also the value-clip range if ``clip_vloss``).
        ent_coef: entropy bonus coefficient.
        vf_coef: value-loss coefficient.
        max_grad_norm: global L2 gradient-norm clip.
        update_epochs: passes over the rollout batch per iteration.
        num_minibatches: minibatches per epoch (minibatch size ``B // num_minibatches``).
        anneal_lr: linearly anneal the learning rate to 0 over the run.
        norm_adv: normalize advantages per minibatch (zero mean, unit std).
        clip_vloss: use the clipped value loss.
        target_kl: stop the epochs of an iteration early once the approximate KL
            exceeds this (``None`` = never).
        hidden_sizes: widths of the hidden ``tanh`` layers of the actor and the critic.
        hicra: HICRA credit assignment (seed 003) settings for
            :func:`rl_engine.hicra.build_hicra_from_dict`; ``None`` = off (raw rewards).
            When set, the rollout rewards, viewed as ``N`` trajectories of length ``T``,
            are replaced by the assigner's credits before GAE, and an iteration whose
            credits are all zero skips its optimizer steps.
    """

    learning_rate: float = 2.5e-4
    num_steps: int = 128
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    update_epochs: int = 4
    num_minibatches: int = 4
    anneal_lr: bool = True
    norm_adv: bool = True
    clip_vloss: bool = True
    target_kl: float | None = None
    hidden_sizes: tuple[int, ...] = (64, 64)
    hicra: dict[str, Any] | None = None


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weight init with gain ``std`` and constant bias (in place)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, out_std: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers += [layer_init(nn.Linear(last, width)), nn.Tanh()]
        last = width
    layers.append(layer_init(nn.Linear(last, out_dim), std=out_std))
    return nn.Sequential(*layers)


class Agent(nn.Module):
    """Separate actor and critic MLPs (``tanh`` hidden layers) for discrete actions.

    Args:
        obs_dim: ``D``, the flattened observation size.
        num_actions: ``A``, the number of discrete actions.
        hidden_sizes: hidden layer widths, shared by actor and critic shapes.
    """

    def __init__(self, obs_dim: int, num_actions: int, hidden_sizes: tuple[int, ...] = (64, 64)):
        super().__init__()
        self.obs_dim = int(obs_dim)
        self.num_actions = int(num_actions)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.critic = _mlp(self.obs_dim, self.hidden_sizes, 1, out_std=1.0)
        self.actor = _mlp(self.obs_dim, self.hidden_sizes, self.num_actions, out_std=0.01)

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        """State values ``V(s)``.

        Args:
            x: observations, shape ``(B, D)``, float32.

        Returns:
            Values, shape ``(B,)``.
        """
        return self.critic(x).squeeze(-1)

    def get_action_and_value(
        self, x: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or score) actions and evaluate the critic.

        Args:
            x: observations, shape ``(B, D)``.
            action: actions to score, shape ``(B,)`` int64; sampled from the policy when
                ``None``.

        Returns:
            ``(action, log_prob, entropy, value)``, each of shape ``(B,)``.
        """
        logits = self.actor(x)
        log_probs = torch.log_softmax(logits, dim=-1)
        if action is None:
            action = Categorical(logits=logits, validate_args=False).sample()
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        log_prob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        return action, log_prob, entropy, self.get_value(x)

    def action_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores whose argmax is the deterministic action (the actor's logits), ``(B, A)``."""
        return self.actor(x)

    @torch.no_grad()
    def act_greedy(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic actions ``argmax_a pi(a|s)``, shape ``(B,)`` for ``x`` of ``(B, D)``."""
        return self.actor(x).argmax(dim=-1)


def gumbel_noise(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``log E`` with ``E ~ Exp(1)``, from the global torch RNG, of ``shape``.

    ``argmax(logits - gumbel_noise(...))`` is distributed as ``softmax(logits)``: the
    Gumbel-max trick (``-log E`` is standard Gumbel; Gumbel 1954, Maddison et al. 2014,
    arXiv:1411.0494). A rollout draws its ``(T, N, A)`` noise at once, so sampling an
    action costs one subtraction and one argmax per step.
    """
    return torch.empty(shape, device=device).exponential_().log_()


def policy_spec(agent: Agent) -> dict[str, Any]:
    """JSON description of the network needed to rebuild ``agent`` before loading weights."""
    return {
        "class": "rl_engine.ppo:Agent",
        "obsDim": agent.obs_dim,
        "numActions": agent.num_actions,
        "hiddenSizes": list(agent.hidden_sizes),
        "activation": "tanh",
    }


def agent_from_spec(spec: dict[str, Any]) -> Agent:
    """Inverse of :func:`policy_spec` (fresh weights; load ``model.pt`` afterwards)."""
    return Agent(spec["obsDim"], spec["numActions"], tuple(spec["hiddenSizes"]))


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    next_value: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015, arXiv:1506.02438, eq. 16).

    ``delta_t = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t)`` and
    ``A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}``, computed backwards; the
    value after the last step is ``next_value``.

    Args:
        rewards: ``r_t``, shape ``(T, N)``.
        values: ``V(s_t)``, shape ``(T, N)``.
        dones: 1.0 where the episode ended *at* step ``t`` (after acting in ``s_t``), so
            ``s_{t+1}`` belongs to a new episode; shape ``(T, N)``. For a truncated (not
            terminated) episode, fold the bootstrap ``gamma * V(s_final)`` into ``r_t``.
        next_value: ``V(s_T)``, the value of the observation after the rollout, ``(N,)``.
        gamma: discount factor.
        gae_lambda: GAE lambda.

    Returns:
        ``(advantages, returns)``, each ``(T, N)``; ``returns = advantages + values`` (the
        TD(lambda) value targets).
    """
    nonterminal = 1.0 - dones
    following = torch.cat((values[1:], next_value.unsqueeze(0)))  # V(s_{t+1})
    deltas = rewards + gamma * following * nonterminal - values
    decay = (gamma * gae_lambda) * nonterminal
    advantages = torch.empty_like(rewards)
    if advantages.device.type == "cpu":
        # The same recursion in numpy (views of the tensors): a fraction of the per-call cost.
        d, k, adv = deltas.detach().numpy(), decay.detach().numpy(), advantages.numpy()
        last = np.zeros_like(adv[0])
        for t in reversed(range(rewards.shape[0])):
            last = adv[t] = d[t] + k[t] * last
    else:
        last_gae = torch.zeros_like(next_value)
        for t in reversed(range(rewards.shape[0])):
            last_gae = torch.addcmul(deltas[t], decay[t], last_gae, out=advantages[t])
    return advantages, advantages + values


@dataclass
class IterationStats:
    """Metrics of one PPO iteration (one rollout + its update). Times are seconds."""

    iteration: int
    global_step: int
    learning_rate: float
    policy_loss: float
    value_loss: float
    entropy: float
    old_approx_kl: float
    approx_kl: float
    clip_fraction: float
    explained_variance: float
    episodes_finished: int
    mean_episodic_return: float | None
    mean_episodic_length: float | None
    rollout_seconds: float
    update_seconds: float
    steps_per_second: float

    def to_json(self) -> dict[str, Any]:
        """camelCase dict for ``training_history.json``."""
        return {_camel(k): v for k, v in asdict(self).items()}


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.capitalize() for w in rest)


_ROLLOUT_BUFFERS = ("obs", "logits", "actions", "rewards", "terminated", "truncated", "final_obs")
"""The :class:`PPOTrainer` buffers a rollout loop writes (the rest are derived after it)."""


class PPOTrainer:
    """Runs PPO iterations on a vector env.

    Args:
        envs: a ``gymnasium.vector.VectorEnv`` with ``autoreset_mode=SAME_STEP``, or a
            torch-batched env (:mod:`rl_engine.torch_envs`), with ``Box`` observations and
            ``Discrete`` actions (see :mod:`rl_engine.vector`).
        cfg: hyperparameters.
        num_iterations: iterations in the whole run (for LR annealing).
        seed: seeds the env resets, the action space and the minibatch shuffling (seed
            torch yourself before constructing the trainer, for the network init).
        device: torch device for the network and rollout buffers.
        recent_episodes: window for ``mean_episodic_return``.
        hicra_registry: ``prometheus_client`` registry for the HICRA metrics (default
            registry when ``None``).
    """

    def __init__(
        self,
        envs: gym.vector.VectorEnv,
        cfg: PPOConfig,
        num_iterations: int,
        seed: int,
        device: torch.device,
        recent_episodes: int = 20,
        hicra_registry: Any = None,
    ) -> None:
        self.envs = as_tensor_env(envs, device)
        envs = self.envs
        self.cfg = cfg
        self.num_iterations = max(1, num_iterations)
        self.device = device
        self.num_envs = envs.num_envs
        self.obs_shape = envs.single_observation_space.shape
        self.obs_dim = int(np.prod(self.obs_shape))
        self.num_actions = int(envs.single_action_space.n)
        self.batch_size = self.num_envs * cfg.num_steps
        self.minibatch_size = max(1, self.batch_size // cfg.num_minibatches)
        self.minibatches_per_epoch = math.ceil(self.batch_size / self.minibatch_size)

        self.agent = Agent(self.obs_dim, self.num_actions, cfg.hidden_sizes).to(device)
        # The agent's parameters become views of one flat tensor: the update writes the
        # PPO gradient there by hand and Adam steps that one tensor (rl_engine.actor_critic).
        self.net = FlatActorCritic(self.agent)
        self.optimizer = FlatAdam(self.net.flat, eps=1e-5)
        self.learning_rate = cfg.learning_rate
        """The learning rate of the last update (annealed when ``cfg.anneal_lr``)."""
        self.loss_coefficients = PPOLossCoefficients(
            clip_coef=cfg.clip_coef, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef,
            norm_adv=cfg.norm_adv, clip_vloss=cfg.clip_vloss)
        self.rng = np.random.default_rng(seed)
        self.hicra = None
        if cfg.hicra is not None:
            from .hicra import HICRACreditAssigner, build_hicra_from_dict

            self.hicra = HICRACreditAssigner(build_hicra_from_dict(cfg.hicra), registry=hicra_registry)

        T, N = cfg.num_steps, self.num_envs
        self.obs = torch.zeros((T, N, self.obs_dim), device=device)
        self.logits = torch.zeros((T, N, self.num_actions), device=device)
        """The actor's logits at each step, ``(T, N, A)`` (the log-probabilities come from
        them after the rollout)."""
        self.actions = torch.zeros((T, N), dtype=torch.long, device=device)
        self.logprobs = torch.zeros((T, N), device=device)
        self.rewards = torch.zeros((T, N), device=device)
        self.dones = torch.zeros((T, N), device=device)
        """1.0 where an episode ended at step ``t`` (``terminated | truncated``)."""
        self.terminated = torch.zeros((T, N), dtype=torch.bool, device=device)
        self.truncated = torch.zeros((T, N), dtype=torch.bool, device=device)
        self.final_obs = torch.zeros((T, N, self.obs_dim), device=device)
        """The true final observation where an episode ended at step ``t`` (else stale)."""
        self._host: dict[str, torch.Tensor] = {}
        """Host buffers of a Gymnasium env's rollout (the buffers themselves on the CPU)."""
        if isinstance(self.envs, GymTensorEnv):
            for key in _ROLLOUT_BUFFERS:
                buf = getattr(self, key)
                on_cpu = buf.device.type == "cpu"
                self._host[key] = buf if on_cpu else torch.zeros_like(buf, device="cpu")
        self.values = torch.zeros((T, N), device=device)
        self._done_flags = torch.zeros((T, N), dtype=torch.bool, device=device)
        self.next_value = torch.zeros(N, device=device)
        """``V(s_T)`` of the observation after the last rollout, ``(N,)``."""

        self.next_obs = self.envs.reset(seed=seed)
        self.global_step = 0
        self.iteration = 0
        self.episodes = EpisodeTracker(N)
        self.recent_returns: deque[float] = deque(maxlen=recent_episodes)
        self.recent_lengths: deque[int] = deque(maxlen=recent_episodes)
        self.episodes_finished = 0
        self.last_rollout_successes: int | None = None
        self.last_rollout_returns: list[float] = []
        self.optimizer_steps_skipped = 0
        self._last_finite: dict[str, Any] | None = None
        self._rollout_nonfinite_reward = False

    @torch.inference_mode()
    def collect_rollout(self) -> int:
        """Fill the ``(T, N)`` buffers with one rollout; returns episodes finished in it.

        Per step only the actor runs (Gumbel-max sampling, the noise drawn for the whole
        rollout at once) and its logits and the step's outcome are stored; the done flags,
        the episode statistics, the log-probabilities, the values, ``V(s_T)`` and the
        bootstrap values of truncated episodes come after the last step, batched (the
        critic alone, with the same weights). A
        Gymnasium vector env steps on the host, so its rollout runs there in numpy (a host
        copy of the actor; no per-step tensor calls) and reaches the training device once;
        a torch-batched env's rollout stays on its device without a host sync per step.
        Also sets :attr:`last_rollout_successes` (episodes the env reported ``is_success``
        for, or ``None`` if it reports none).
        """
        cfg = self.cfg
        T, N = cfg.num_steps, self.num_envs
        if isinstance(self.envs, GymTensorEnv):
            successes = self._rollout_on_host()
        else:
            successes = self._rollout_on_device()
        self.global_step += T * N
        torch.logical_or(self.terminated, self.truncated, out=self._done_flags)
        self.dones.copy_(self._done_flags)

        ended, lengths = self.episodes.record(self.rewards, self.dones)
        self.recent_returns.extend(ended)
        self.recent_lengths.extend(lengths)
        self.episodes_finished += len(ended)
        self.last_rollout_successes = successes
        self.last_rollout_returns = ended

        # One critic pass: the rollout's observations, s_T, and truncated final states.
        batch = T * N
        bootstrap = self.truncated & ~self.terminated
        inputs = (self.obs.view(batch, self.obs_dim), self.next_obs, self.final_obs[bootstrap])
        values = self.net.critic_values(torch.cat(inputs))
        log_probs = torch.log_softmax(self.logits.view(batch, self.num_actions), dim=-1)
        self.logprobs.copy_(log_probs.gather(-1, self.actions.view(batch, 1)).view(T, N))
        self.values.copy_(values[:batch].view(T, N))
        self.next_value.copy_(values[batch : batch + N])
        # Time-limit truncation: bootstrap with gamma * V(s_final) (Pardo et al.).
        self.rewards[bootstrap] += cfg.gamma * values[batch + N :]
        self._rollout_nonfinite_reward = not bool(torch.isfinite(self.rewards).all())
        return len(ended)

    def _rollout_on_host(self) -> int | None:
        """The rollout loop for a Gymnasium vector env, in numpy on the host; returns the
        successes counted (see :attr:`last_rollout_successes`)."""
        T, N = self.cfg.num_steps, self.num_envs
        obs, logits, actions, rewards, terminated, truncated, final_obs = (
            self._host[k].numpy() for k in _ROLLOUT_BUFFERS)
        layers = self.net.host_actor()
        noise = gumbel_noise((T, N, self.num_actions), torch.device("cpu")).numpy()
        step_env = self.envs.step_numpy
        successes: int | None = None
        next_obs = self.next_obs.cpu().numpy()
        for step in range(T):
            obs[step] = next_obs
            logits[step] = host_actor_logits(layers, next_obs)
            np.argmax(logits[step] - noise[step], axis=-1, out=actions[step])
            out = step_env(actions[step])
            rewards[step] = out.reward
            terminated[step] = out.terminated
            truncated[step] = out.truncated
            if out.final_obs is not None:  # some copy finished
                final_obs[step] = out.final_obs
                successes = count_successes(out.success, out.done, successes)
            next_obs = out.obs
        self.next_obs = torch.from_numpy(next_obs).to(self.device)
        if self.device.type != "cpu":  # on the CPU the buffers are these host tensors
            for key in _ROLLOUT_BUFFERS:
                getattr(self, key).copy_(self._host[key])
        return successes

    def _rollout_on_device(self) -> int | None:
        """The rollout loop for a torch-batched env, in tensor ops on its device; returns
        the successes counted (see :attr:`last_rollout_successes`)."""
        T, N = self.cfg.num_steps, self.num_envs
        net = self.net
        noise = gumbel_noise((T, N, self.num_actions), self.device)
        successes: int | None = None
        for step in range(T):
            self.obs[step] = self.next_obs
            logits = net.actor_logits(self.next_obs)
            self.logits[step] = logits
            torch.argmax(logits.sub_(noise[step]), dim=-1, out=self.actions[step])
            out = self.envs.step(self.actions[step])
            self.rewards[step] = out.reward
            self.terminated[step] = out.terminated
            self.truncated[step] = out.truncated
            if out.final_obs is not None:
                self.final_obs[step] = out.final_obs
            if out.success is not None:  # (a host sync; no torch env here reports success)
                successes = count_successes(out.success.cpu().numpy(), out.done.cpu().numpy(),
                                            successes)
            self.next_obs = out.obs
        return successes

    def _fail(self, epoch: int, minibatch: int, losses: dict[str, float], what: str) -> None:
        shown = ", ".join(f"{k}={v:.6g}" for k, v in losses.items())
        if self._last_finite is None:
            last = "none (no finite loss was computed before)"
        else:
            lf = self._last_finite
            vals = ", ".join(f"{k}={v:.6g}" for k, v in lf["losses"].items())
            where = f"update {lf['iteration']}, epoch {lf['epoch']}, minibatch {lf['minibatch']}"
            last = f"{vals} ({where})"
        hint = ""
        if self._rollout_nonfinite_reward:
            hint = " The rollout contained non-finite rewards."
        raise NonFiniteLoss(
            f"non-finite {what} at update {self.iteration}/{self.num_iterations} (epoch "
            f"{epoch}/{self.cfg.update_epochs}, minibatch "
            f"{minibatch}/{self.minibatches_per_epoch}, "
            f"global step {self.global_step}): {shown}. Last finite losses: {last}.{hint}"
        )

    @torch.inference_mode()
    def update(self) -> dict[str, float]:
        """GAE + ``update_epochs`` epochs of clipped-PPO minibatch updates.

        The gradient of each minibatch is computed by hand
        (:meth:`rl_engine.actor_critic.FlatActorCritic.ppo_loss_and_grad`, equal to
        autograd's through :meth:`Agent.get_action_and_value` up to rounding); one host
        sync per minibatch reads its losses and gradient norm.

        Returns:
            Loss metrics of the last minibatch (``policy_loss``, ``value_loss``,
            ``entropy``, ``old_approx_kl``, ``approx_kl``), ``clip_fraction`` over all
            scored rows, ``explained_variance`` of the value targets and the
            ``learning_rate`` used.

        Raises:
            NonFiniteLoss: a loss, the gradient norm or a parameter became NaN/inf.
        """
        cfg = self.cfg
        if cfg.anneal_lr:
            frac = 1.0 - (self.iteration - 1.0) / self.num_iterations
            self.learning_rate = frac * cfg.learning_rate
        lr = self.learning_rate

        rewards = self.rewards
        skip_steps = False
        if self.hicra is not None:
            from .hicra import credits_all_zero

            # (T, N) -> N trajectories of length T (every step of a rollout is valid).
            rewards = self.hicra(self.rewards.T.contiguous()).T.contiguous()
            skip_steps = credits_all_zero(rewards)
        advantages, returns = compute_gae(
            rewards, self.values, self.dones, self.next_value, cfg.gamma, cfg.gae_lambda
        )

        # One (B, D + A + 4) table, shuffled once per epoch; minibatches are row slices, split
        # into the loss's inputs: obs (M, D), one-hot actions (M, A) and four (M, 1) columns.
        D, A = self.obs_dim, self.num_actions
        columns = (D, A, 1, 1, 1, 1)
        b_values = self.values.reshape(-1)
        b_returns = returns.reshape(-1)
        table = torch.cat((
            self.obs.reshape(-1, D),
            nn.functional.one_hot(self.actions.reshape(-1), A).to(self.obs.dtype),
            torch.stack((self.logprobs.reshape(-1), advantages.reshape(-1), b_returns, b_values),
                        1),
        ), 1)

        net = self.net
        clipped_rows = 0.0
        scored_rows = 0
        stats: dict[str, float] = {}
        for epoch in range(1, cfg.update_epochs + 1):
            order = torch.from_numpy(self.rng.permutation(self.batch_size)).to(self.device)
            shuffled = table.index_select(0, order)
            for mb_index, rows in enumerate(shuffled.split(self.minibatch_size), 1):
                last = mb_index == self.minibatches_per_epoch
                values, kl = net.ppo_loss_and_grad(*rows.split(columns, 1),
                                                   self.loss_coefficients, want_kl=last)
                got = loss_values(values.tolist(), len(rows), self.loss_coefficients)
                grad_norm = got.pop("gradNorm")
                clipped = got.pop("clipped")
                losses = got
                if not all(math.isfinite(v) for v in losses.values()):
                    self._fail(epoch, mb_index, losses, "loss")
                clipped_rows += clipped
                scored_rows += len(rows)
                stats.update(policy_loss=got["policyLoss"], value_loss=got["valueLoss"],
                             entropy=got["entropy"])
                if kl is not None:
                    stats["old_approx_kl"], stats["approx_kl"] = kl.tolist()
                if skip_steps:
                    # All-zero HICRA credits carry no learning signal (seed 003): no step.
                    self.optimizer_steps_skipped += 1
                    continue
                if not math.isfinite(grad_norm):
                    self._fail(epoch, mb_index, {**losses, "gradNorm": grad_norm}, "gradient norm")
                # Global-norm clipping with torch.nn.utils.clip_grad_norm_'s rule.
                clip = cfg.max_grad_norm / (grad_norm + 1e-6)
                if clip < 1.0:
                    net.grad.mul_(clip)
                self.optimizer.step(lr)
                self._last_finite = {
                    "iteration": self.iteration,
                    "epoch": epoch,
                    "minibatch": f"{mb_index}/{self.minibatches_per_epoch}",
                    "losses": losses,
                }
            if cfg.target_kl is not None and stats["approx_kl"] > cfg.target_kl:
                break

        # A finite loss and gradient can still overflow the weights in Adam's step; the
        # next minibatch's loss catches that, and this check covers the last one.
        if not bool(torch.isfinite(net.flat).all()):
            self._fail(epoch, mb_index, stats, "network parameters after the last optimizer step")

        y_pred = b_values.cpu().numpy()
        y_true = b_returns.cpu().numpy()
        var_y = float(np.var(y_true))
        explained_var = float("nan") if var_y == 0 else 1.0 - float(np.var(y_true - y_pred)) / var_y
        stats["clip_fraction"] = clipped_rows / max(scored_rows, 1)
        stats["explained_variance"] = explained_var
        stats["learning_rate"] = lr
        return stats

    def train_iteration(self) -> IterationStats:
        """One rollout of ``B`` env steps followed by one update.

        Raises:
            NonFiniteLoss: see :meth:`update`.
        """
        self.iteration += 1
        t0 = time.perf_counter()
        finished = self.collect_rollout()
        t1 = time.perf_counter()
        s = self.update()
        t2 = time.perf_counter()
        recent_r = float(np.mean(self.recent_returns)) if self.recent_returns else None
        recent_l = float(np.mean(self.recent_lengths)) if self.recent_lengths else None
        return IterationStats(
            iteration=self.iteration,
            global_step=self.global_step,
            learning_rate=s["learning_rate"],
            policy_loss=s["policy_loss"],
            value_loss=s["value_loss"],
            entropy=s["entropy"],
            old_approx_kl=s["old_approx_kl"],
            approx_kl=s["approx_kl"],
            clip_fraction=s["clip_fraction"],
            explained_variance=s["explained_variance"],
            episodes_finished=finished,
            mean_episodic_return=recent_r,
            mean_episodic_length=recent_l,
            rollout_seconds=t1 - t0,
            update_seconds=t2 - t1,
            steps_per_second=self.batch_size / max(t2 - t0, 1e-9),
        )


def greedy_policy(agent: Agent, device: torch.device) -> Callable[..., np.ndarray]:
    """Wrap ``agent`` as a numpy argmax policy ``(obs (B, *obs_shape), envs=None) -> (B,)``
    (the signature :func:`rl_engine.evaluation.run_episodes` expects)."""

    def act(obs: np.ndarray, envs: Any = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device).reshape(len(obs), -1)
        return agent.act_greedy(x).cpu().numpy()

    return act


def load_agent(uri: str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the trained network of an artifact; see :func:`rl_engine.networks.load_agent`."""
    from .networks import load_agent as _load

    return _load(uri, device)
