"""Torch-batched classic-control environments: every copy steps as tensor ops on one device.

Why: a ``gymnasium.vector.SyncVectorEnv`` keeps one Python env object per copy, steps them
in a Python loop on the CPU and hands back numpy arrays, so a trainer on a GPU pays a
host<->device copy and ``num_envs`` Python calls per step. Classic-control dynamics are a
handful of arithmetic ops, so all copies can instead live in one ``(num_envs, state_dim)``
tensor on the training device and advance together: a step is a fixed number of kernel
launches whatever ``num_envs`` is, and observations never leave the device
(issue: "A torch-batched path for classic-control environments: all environments step as
tensor ops on the training device").

Supported ids are the keys of :data:`TORCH_ENVS`; build one with :func:`make_torch_env`.

Conventions shared by every env here (``N = num_envs``):

* ``reset(seed)`` returns ``(obs, {})`` with ``obs`` ``(N, obs_dim)`` float32 on the device.
* ``step(actions)`` returns ``(obs, reward, terminated, truncated, info)``: ``obs``
  ``(N, obs_dim)`` float32, ``reward`` ``(N,)`` float32, ``terminated``/``truncated``
  ``(N,)`` bool, all on the device.
* Same-step autoreset (as ``gymnasium.vector.AutoresetMode.SAME_STEP``): a copy whose
  episode ended at this step is reset inside the same call, so its row of ``obs`` is the
  first observation of its next episode. ``info["final_obs"]`` ``(N, obs_dim)`` float32
  holds the observation reached by this step *before* any reset, and
  ``info["_final_obs"]`` ``(N,)`` bool marks the rows that ended
  (``terminated | truncated``). Both keys are present on *every* step (checking whether
  any copy ended would force a device->host sync); in rows where ``_final_obs`` is False,
  ``final_obs`` equals ``obs``.
* Randomness comes from a ``torch.Generator`` on the device, seeded by ``reset(seed)``:
  for a given seed, device and ``num_envs`` the trajectory is reproducible (CPU and CUDA
  streams differ from each other and from Gymnasium's numpy streams).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector.utils import batch_space

from .errors import InvalidConfig
from .scalars import ScalarTensors

__all__ = ["TORCH_ENVS", "TorchCartPole", "make_torch_env"]


class TorchCartPole:
    """``CartPole-v1`` for ``num_envs`` copies at once, as torch tensor ops on ``device``.

    Source: Gymnasium 1.4 ``gymnasium/envs/classic_control/cartpole.py`` (``CartPoleEnv``
    wrapped in ``TimeLimit(max_episode_steps=500)``), the cart-pole of Barto, Sutton &
    Anderson (1983), "Neuronlike adaptive elements that can solve difficult learning
    control problems". Same equations, constants, evaluation order and termination rule;
    only the autoreset (same-step, see the module docstring) and the random streams are
    this module's own.

    Dynamics (SI units, explicit Euler with ``tau = 0.02`` s per step):

    * gravity 9.8 m/s^2, cart mass 1.0 kg, pole mass 0.1 kg, pole half-length 0.5 m;
    * action 1 pushes the cart right with +10 N, action 0 left with -10 N
      (any value other than 1 counts as 0, as in ``CartPoleEnv``; values are not
      validated, to keep ``step`` free of device->host syncs);
    * terminated when ``|x| > 2.4`` m or ``|theta| > 12`` degrees (0.2094... rad), checked
      on the state after the step;
    * truncated when the episode has lasted ``max_episode_steps`` steps (both flags can be
      True on the same step, as with Gymnasium's ``TimeLimit``);
    * reward 1.0 on every step including the terminating one; with
      ``sutton_barto_reward=True``, 0.0 on non-terminating steps and -1.0 on the
      terminating one;
    * initial state: each of the 4 components uniform in ``[-0.05, 0.05)``.

    State / observation layout, shape ``(num_envs, 4)``: cart position ``x`` (m), cart
    velocity ``x_dot`` (m/s), pole angle ``theta`` (rad, 0 = upright), pole angular velocity
    ``theta_dot`` (rad/s).

    Args:
        num_envs: number of copies ``N`` (>= 1).
        device: torch device holding the state and all returned tensors.
        dtype: precision of the internal :attr:`state` and the dynamics, ``torch.float32``
            (default, fast) or ``torch.float64`` (bit-for-bit Gymnasium's arithmetic, which
            runs in float64). Observations are float32 either way, like Gymnasium's.
        max_episode_steps: time limit in steps (CartPole-v1: 500).
        sutton_barto_reward: use the original 0 / -1 reward (see above).

    Attributes:
        num_envs: ``N``.
        device: the ``torch.device``.
        dtype: the state dtype.
        single_observation_space: ``Box((4,), float32)`` with Gymnasium's bounds
            ``[4.8, inf, 0.4189, inf]`` (twice the termination thresholds).
        single_action_space: ``Discrete(2)``.
        observation_space, action_space: the batched spaces (``batch_space``), for
            completeness; the env never checks actions against them.
        elapsed_steps: ``(N,)`` int64 steps taken in each copy's current episode.
    """

    # Physical constants, as in gymnasium's CartPoleEnv.__init__.
    gravity = 9.8
    masscart = 1.0
    masspole = 0.1
    total_mass = masspole + masscart
    length = 0.5  # half the pole's length
    polemass_length = masspole * length
    force_mag = 10.0
    tau = 0.02  # seconds between state updates
    theta_threshold_radians = 12 * 2 * math.pi / 360
    x_threshold = 2.4
    reset_low = -0.05
    reset_high = 0.05

    def __init__(
        self,
        num_envs: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_episode_steps: int = 500,
        sutton_barto_reward: bool = False,
    ) -> None:
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if int(max_episode_steps) < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.num_envs = int(num_envs)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_episode_steps = int(max_episode_steps)
        self.sutton_barto_reward = bool(sutton_barto_reward)

        high = np.array(
            [self.x_threshold * 2, np.inf, self.theta_threshold_radians * 2, np.inf],
            dtype=np.float32,
        )
        self.single_observation_space = gym.spaces.Box(-high, high, dtype=np.float32)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self._generator = torch.Generator(device=self.device)
        self._seeded = False
        self._state: torch.Tensor | None = None
        self.elapsed_steps = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        # Constants as device tensors (rl_engine.scalars: a Python number operand costs a
        # conversion per op). The force enters the dynamics divided by the total mass.
        self._k = ScalarTensors(self.dtype, self.device)
        self._k_int = ScalarTensors(torch.int64, self.device)
        self._force_right = self._k[self.force_mag / self.total_mass]
        self._force_left = self._k[-self.force_mag / self.total_mass]
        self._thresholds = torch.tensor([self.x_threshold, self.theta_threshold_radians],
                                        dtype=self.dtype, device=self.device)
        self._derivative = torch.zeros((self.num_envs, 4), dtype=self.dtype, device=self.device)
        """Scratch ``(N, 4)``: d(state)/dt of the current step."""

    def __repr__(self) -> str:
        return (
            f"TorchCartPole(num_envs={self.num_envs}, device={self.device}, "
            f"dtype={self.dtype}, max_episode_steps={self.max_episode_steps})"
        )

    # ----------------------------------------------------------------------------- state
    @property
    def state(self) -> torch.Tensor:
        """Physical state ``(N, 4)`` in :attr:`dtype` on :attr:`device`
        (``x, x_dot, theta, theta_dot``; see the class docstring for units).

        Assigning copies the value in (any array-like of ``N * 4`` numbers), e.g. to start
        from given states in tests; it does not touch :attr:`elapsed_steps`.
        """
        if self._state is None:
            raise RuntimeError("TorchCartPole: call reset() before using the state")
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        t = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        if t.numel() != self.num_envs * 4:
            raise ValueError(
                f"state must have {self.num_envs} x 4 elements, got shape {tuple(t.shape)}"
            )
        self._state = t.reshape(self.num_envs, 4).clone()

    def _initial_states(self) -> torch.Tensor:
        """Fresh states ``(N, 4)``, each component uniform in ``[-0.05, 0.05)``."""
        u = torch.empty((self.num_envs, 4), dtype=self.dtype, device=self.device)
        return u.uniform_(self.reset_low, self.reset_high, generator=self._generator)

    # ------------------------------------------------------------------------- interface
    def reset(self, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """Start a new episode in every copy.

        Args:
            seed: seeds the device generator. ``None`` keeps the current random stream
                (on the very first reset, seeds it non-deterministically).

        Returns:
            ``(obs, {})`` with ``obs`` ``(N, 4)`` float32 on the device.
        """
        if seed is not None:
            self._generator.manual_seed(int(seed))
            self._seeded = True
        elif not self._seeded:
            self._generator.seed()
            self._seeded = True
        self._state = self._initial_states()
        self.elapsed_steps = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        return self._state.to(torch.float32, copy=True), {}

    def step(
        self, actions: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Advance every copy by one step of ``tau`` seconds, auto-resetting finished ones.

        Args:
            actions: ``(N,)`` integer actions in ``{0, 1}``, a tensor (ideally int64 on the
                device) or anything ``torch.as_tensor`` accepts (e.g. a numpy array).

        Returns:
            ``(obs, reward, terminated, truncated, info)``:

            * ``obs`` ``(N, 4)`` float32: next observations; for copies that ended at this
              step, already the first observation of their next episode.
            * ``reward`` ``(N,)`` float32.
            * ``terminated`` ``(N,)`` bool: pole fell or cart left the track.
            * ``truncated`` ``(N,)`` bool: the episode reached ``max_episode_steps``.
            * ``info["final_obs"]`` ``(N, 4)`` float32: observation reached by this step
              before the reset (valid in rows where the episode ended; equals ``obs``
              elsewhere); ``info["_final_obs"]`` ``(N,)`` bool: ``terminated | truncated``.
        """
        state = self.state  # raises if reset() was never called
        actions = torch.as_tensor(actions, device=self.device)
        if actions.shape != (self.num_envs,):
            raise ValueError(
                f"actions must have shape ({self.num_envs},), got {tuple(actions.shape)}"
            )

        k = self._k
        theta, theta_dot = state[:, 2], state[:, 3]
        # +force_mag for action 1, -force_mag otherwise (over the total mass, see __init__).
        force = torch.where(actions == self._k_int[1], self._force_right, self._force_left)
        costheta = torch.cos(theta)
        sintheta = torch.sin(theta)

        # Gymnasium's CartPoleEnv.step expressions (see
        # https://coneural.org/florian/papers/05_cart_pole.pdf for the derivation), each
        # written as few fused tensor ops (addcmul: a + v * b * c) as it takes; they agree
        # with Gymnasium's float64 states to ~1e-15 (tests/unit/test_torch_envs.py).
        # temp = (force + polemass_length * theta_dot^2 * sin) / total_mass
        temp = torch.addcmul(force, theta_dot * theta_dot, sintheta,
                             value=self.polemass_length / self.total_mass)
        # thetaacc = (g sin - cos temp) / (length (4/3 - masspole cos^2 / total_mass))
        denominator = torch.addcmul(k[self.length * 4.0 / 3.0], costheta, costheta,
                                    value=-self.length * self.masspole / self.total_mass)
        # xacc = temp - polemass_length * thetaacc * cos / total_mass, and
        # d(x, theta)/dt = (x_dot, theta_dot): the derivative, written in place.
        derivative = self._derivative
        thetaacc = torch.addcmul(sintheta.mul_(k[self.gravity]), costheta, temp, value=-1.0)
        torch.div(thetaacc, denominator, out=derivative[:, 3])
        torch.addcmul(temp, derivative[:, 3], costheta,
                      value=-self.polemass_length / self.total_mass, out=derivative[:, 1])
        derivative[:, 0::2] = state[:, 1::2]

        # Explicit Euler: positions advance with the old velocities.
        next_state = torch.add(state, derivative, alpha=self.tau)

        # |x| > 2.4 or |theta| > 12 degrees (exactly Gymnasium's four comparisons).
        terminated = (next_state[:, 0::2].abs() > self._thresholds).any(dim=1)
        elapsed = self.elapsed_steps.add_(self._k_int[1])
        truncated = elapsed >= self._k_int[self.max_episode_steps]

        if self.sutton_barto_reward:
            reward = 0.0 - terminated.to(torch.float32)  # 0.0 (not -0.0) where not terminated
        else:
            reward = torch.ones(self.num_envs, dtype=torch.float32, device=self.device)

        # Same-step autoreset without a host sync: draw fresh states for every copy and
        # keep them only where the episode ended. ``next_state`` is a new tensor that the
        # env never writes to again, so in float32 it is returned as ``final_obs`` as is.
        done = terminated | truncated
        final_obs = next_state.to(torch.float32)
        self._state = torch.where(done.unsqueeze(1), self._initial_states(), next_state)
        elapsed.masked_fill_(done, 0)
        obs = self._state.to(torch.float32, copy=True)

        info = {"final_obs": final_obs, "_final_obs": done}
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        """Release the state tensors (nothing else is held)."""
        self._state = None


#: Environment ids with a torch-batched implementation, mapped to their class.
TORCH_ENVS: dict[str, type] = {"CartPole-v1": TorchCartPole}


def make_torch_env(
    env_id: str, num_envs: int, device: str | torch.device, **kwargs: Any
) -> TorchCartPole:
    """Build the torch-batched implementation of ``env_id``.

    Args:
        env_id: a key of :data:`TORCH_ENVS`.
        num_envs: number of copies.
        device: torch device for the state and all returned tensors.
        **kwargs: passed to the env class (e.g. ``max_episode_steps``,
            ``sutton_barto_reward``, ``dtype``).

    Raises:
        InvalidConfig: ``environment.id: ...`` when ``env_id`` has no torch-batched
            implementation (the message lists the supported ids);
            ``environment.kwargs: ...`` when the class rejects ``kwargs``.
    """
    cls = TORCH_ENVS.get(env_id)
    if cls is None:
        raise InvalidConfig(
            f"environment.id: {env_id!r} has no torch-batched implementation; "
            f"supported ids: {sorted(TORCH_ENVS)}"
        )
    if int(num_envs) < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    try:
        return cls(num_envs=num_envs, device=device, **kwargs)
    except (TypeError, ValueError) as err:
        raise InvalidConfig(
            f"environment.kwargs: {env_id!r} (torch-batched) rejected kwargs "
            f"{sorted(kwargs)}: {err}"
        ) from None
