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

__all__ = ["VecStep", "TensorVecEnv", "GymTensorEnv", "TorchBatchedEnv", "as_tensor_env"]


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

    def step(self, actions: torch.Tensor) -> VecStep:
        """Step every copy with ``actions`` ``(N,)`` int64."""
        obs, reward, terminated, truncated, info = self.envs.step(actions.cpu().numpy())
        done = np.logical_or(terminated, truncated)
        final_obs = success = None
        if done.any():
            final = np.zeros((self.num_envs, self.obs_dim), dtype=np.float32)
            mask = info.get("_final_obs", done)
            for i in np.nonzero(np.logical_and(done, mask))[0]:
                final[i] = np.asarray(info["final_obs"][i], dtype=np.float32).reshape(-1)
            final_obs = self._t(final)
            # Same-step autoreset: the finished episodes' last infos are in "final_info".
            last = info.get("final_info", {})
            if "is_success" in last:
                s = np.full(self.num_envs, np.nan, dtype=np.float32)
                have = np.logical_and(done, last.get("_is_success", done))
                s[have] = np.asarray(last["is_success"], dtype=np.float32)[have]
                success = self._t(s)
        return VecStep(
            obs=self._t(obs).reshape(self.num_envs, self.obs_dim),
            reward=self._t(reward),
            terminated=self._t(terminated, torch.bool),
            truncated=self._t(truncated, torch.bool),
            final_obs=final_obs,
            success=success,
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
