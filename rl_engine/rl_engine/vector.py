"""One tensor interface over the two ways the trainers step environments.

* :class:`GymTensorEnv` wraps a ``gymnasium.vector.VectorEnv`` (numpy, one Python env
  object per copy) and converts at the boundary.
* A torch-batched env (:mod:`rl_engine.torch_envs`) already speaks tensors on the training
  device; :class:`TorchBatchedEnv` only adds the success/step-reward fields.

Both return a :class:`VecStep` whose tensors live on the training device, so PPO and DQN
have a single code path. Shapes use ``N = num_envs`` and ``D = prod(observation_shape)``.

Same-step autoreset (Gymnasium's ``AutoresetMode.SAME_STEP``) is assumed on both paths: the
observation returned for a finished copy is already the first one of its next episode; the
true final observation is ``VecStep.final_obs`` (rows where ``VecStep.done``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

__all__ = [
    "VecStep", "HostStep", "count_successes", "TensorVecEnv", "GymTensorEnv",
    "TorchBatchedEnv", "as_tensor_env", "EpisodeTracker",
]


@dataclass
class VecStep:
    """The outcome of one vector step.

    Attributes:
        obs: next observations, ``(N, D)`` float32 (already reset where ``done``).
        reward: rewards of this step, ``(N,)`` float32.
        terminated: ``(N,)`` bool, the MDP reached a terminal state.
        truncated: ``(N,)`` bool, cut by a time limit (bootstrap from ``final_obs``).
        final_obs: ``(N, D)`` float32 true final observations, valid only in rows where
            ``terminated | truncated``; may be ``None`` when no copy finished (the
            Gymnasium path), while the torch-batched path always returns a tensor so it
            never has to synchronise with the device to find out.
        success: ``(N,)`` float32, 1.0/0.0 where an episode ended and the env reported
            ``info["is_success"]`` on its last step, NaN elsewhere; ``None`` when no
            finished episode reported it.
    """

    obs: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    final_obs: torch.Tensor | None
    success: torch.Tensor | None

    @property
    def done(self) -> torch.Tensor:
        """``terminated | truncated``, ``(N,)`` bool."""
        return self.terminated | self.truncated


@dataclass
class HostStep:
    """:class:`VecStep`'s fields as numpy arrays on the host (same shapes and meanings),
    plus ``done`` = ``terminated | truncated``; ``final_obs`` and ``success`` are ``None``
    unless a copy finished."""

    obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    done: np.ndarray
    final_obs: np.ndarray | None
    success: np.ndarray | None


def count_successes(success: np.ndarray | None, done: np.ndarray,
                    total: int | None = None) -> int | None:
    """``total`` plus the episodes that ended with ``is_success`` true, among ``done`` rows
    whose success is known (not NaN); ``total`` unchanged (``None`` = no episode has
    reported success yet) when no ended row reported it."""
    if success is None:
        return total
    known = success[done]
    known = known[~np.isnan(known)]
    return (total or 0) + int(known.sum()) if known.size else total


class TensorVecEnv(Protocol):
    """What the trainers need from a vector env (see the module docstring)."""

    num_envs: int
    device: torch.device
    single_observation_space: gym.spaces.Box
    single_action_space: gym.spaces.Discrete

    def reset(self, seed: int | None = None) -> torch.Tensor: ...

    def step(self, actions: torch.Tensor) -> VecStep: ...

    def close(self) -> None: ...


class GymTensorEnv:
    """A ``gymnasium.vector.VectorEnv`` behind the tensor interface.

    Args:
        envs: vector env created with ``autoreset_mode=AutoresetMode.SAME_STEP``.
        device: where returned tensors live.
    """

    def __init__(self, envs: gym.vector.VectorEnv, device: torch.device) -> None:
        self.envs = envs
        self.device = torch.device(device)
        self.num_envs = envs.num_envs
        self.single_observation_space = envs.single_observation_space
        self.single_action_space = envs.single_action_space
        self.obs_dim = int(np.prod(self.single_observation_space.shape))

    def _t(self, x: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        arr = np.asarray(x)
        if dtype == torch.float32 and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        elif dtype == torch.bool and arr.dtype != np.bool_:
            arr = arr.astype(np.bool_)
        # from_numpy shares memory (cheaper than as_tensor); a copy happens only to move to
        # another device.
        out = torch.from_numpy(np.ascontiguousarray(arr))
        return out if self.device.type == "cpu" else out.to(self.device)

    def reset(self, seed: int | None = None) -> torch.Tensor:
        """Reset every copy; returns observations ``(N, D)``."""
        self.envs.action_space.seed(seed)
        obs, _ = self.envs.reset(seed=seed)
        return self._t(obs).reshape(self.num_envs, self.obs_dim)

    def step_numpy(self, actions: np.ndarray) -> HostStep:
        """Step every copy with ``actions`` ``(N,)`` (numpy); the outcome stays on the host.

        For trainers that run a whole rollout on the host (PPO's Gymnasium path) and move
        it to the training device once.
        """
        obs, reward, terminated, truncated, info = self.envs.step(actions)
        done = np.logical_or(terminated, truncated)
        final_obs = success = None
        if done.any():
            final_obs = np.zeros((self.num_envs, self.obs_dim), dtype=np.float32)
            mask = info.get("_final_obs", done)
            for i in np.nonzero(np.logical_and(done, mask))[0]:
                final_obs[i] = np.asarray(info["final_obs"][i], dtype=np.float32).reshape(-1)
            # Same-step autoreset: the finished episodes' last infos are in "final_info".
            last = info.get("final_info", {})
            if "is_success" in last:
                success = np.full(self.num_envs, np.nan, dtype=np.float32)
                have = np.logical_and(done, last.get("_is_success", done))
                success[have] = np.asarray(last["is_success"], dtype=np.float32)[have]
        return HostStep(
            obs=np.asarray(obs, dtype=np.float32).reshape(self.num_envs, self.obs_dim),
            reward=np.asarray(reward, dtype=np.float32),
            terminated=np.asarray(terminated, dtype=np.bool_),
            truncated=np.asarray(truncated, dtype=np.bool_),
            done=done,
            final_obs=final_obs,
            success=success,
        )

    def step(self, actions: torch.Tensor) -> VecStep:
        """Step every copy with ``actions`` ``(N,)`` int64."""
        out = self.step_numpy(actions.cpu().numpy())
        return VecStep(
            obs=self._t(out.obs),
            reward=self._t(out.reward),
            terminated=self._t(out.terminated, torch.bool),
            truncated=self._t(out.truncated, torch.bool),
            final_obs=None if out.final_obs is None else self._t(out.final_obs),
            success=None if out.success is None else self._t(out.success),
        )

    def close(self) -> None:
        self.envs.close()


class TorchBatchedEnv:
    """A torch-batched env (:mod:`rl_engine.torch_envs`) behind the tensor interface; no copy
    leaves the device."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.device = torch.device(env.device)
        self.num_envs = env.num_envs
        self.single_observation_space = env.single_observation_space
        self.single_action_space = env.single_action_space

    def reset(self, seed: int | None = None) -> torch.Tensor:
        obs, _ = self.env.reset(seed=seed)
        return obs.float()

    def step(self, actions: torch.Tensor) -> VecStep:
        obs, reward, terminated, truncated, info = self.env.step(actions)
        final_obs = info.get("final_obs")
        return VecStep(
            obs=obs.float(),
            reward=reward.float(),
            terminated=terminated,
            truncated=truncated,
            final_obs=None if final_obs is None else final_obs.float(),
            success=info.get("is_success"),
        )

    def close(self) -> None:
        self.env.close()


def as_tensor_env(envs: Any, device: torch.device) -> TensorVecEnv:
    """Wrap ``envs`` (a Gymnasium vector env, a torch-batched env, or already a tensor env)."""
    if isinstance(envs, (GymTensorEnv, TorchBatchedEnv)):
        return envs
    if isinstance(envs, gym.vector.VectorEnv):
        return GymTensorEnv(envs, device)
    return TorchBatchedEnv(envs)


class EpisodeTracker:
    """Returns and lengths of the episodes that end during rollouts, kept across rollouts.

    A trainer hands it each rollout's raw rewards and done flags once, after the rollout,
    instead of updating per-env counters with tensor ops at every step; the unfinished
    episode of each env carries over to the next rollout.

    Args:
        num_envs: ``N``.
    """

    def __init__(self, num_envs: int) -> None:
        self.carry_return = np.zeros(num_envs, dtype=np.float64)
        """Return so far of each env's unfinished episode, ``(N,)``."""
        self.carry_length = np.zeros(num_envs, dtype=np.int64)
        """Steps so far of each env's unfinished episode, ``(N,)``."""

    def record(self, rewards: torch.Tensor, dones: torch.Tensor) -> tuple[list[float], list[int]]:
        """Account for one rollout.

        Args:
            rewards: raw rewards ``(T, N)`` (before any bootstrap is folded in).
            dones: ``(T, N)``, nonzero where an episode ended at step ``t``.

        Returns:
            ``(returns, lengths)`` of the episodes that ended, in the order they ended
            (by step, then by env); returns are summed in float64.
        """
        r = rewards.detach().to("cpu", torch.float64).numpy()
        d = dones.detach().cpu().numpy() != 0
        steps, num_envs = r.shape
        csum = np.zeros((steps + 1, num_envs))
        np.cumsum(r, axis=0, out=csum[1:])  # csum[t + 1] = r_0 + ... + r_t
        steps_ended, envs_ended = np.nonzero(d)  # in the order they ended
        # The previous end in the same env (-1: none in this rollout, the carry applies).
        by_env = np.lexsort((steps_ended, envs_ended))
        t, n = steps_ended[by_env], envs_ended[by_env]
        first = np.ones(len(t), dtype=bool)
        first[1:] = n[1:] != n[:-1]
        prev = np.where(first, -1, np.roll(t, 1))
        ret = csum[t + 1, n] - csum[prev + 1, n] + np.where(first, self.carry_return[n], 0.0)
        length = t - prev + np.where(first, self.carry_length[n], 0)
        returns = np.empty_like(ret)
        lengths = np.empty_like(length)
        returns[by_env], lengths[by_env] = ret, length
        # The carry: what follows each env's last end (or everything, with the old carry).
        last = np.full(num_envs, -1)
        last[n] = t  # sorted by step within an env, so the last end wins
        ended = last >= 0
        columns = np.arange(num_envs)
        self.carry_return = np.where(ended, 0.0, self.carry_return) + csum[steps] - csum[last + 1, columns]
        self.carry_length = np.where(ended, 0, self.carry_length) + (steps - 1 - last)
        return returns.tolist(), lengths.tolist()
