"""Router/collaboration environment (seed ``003_59738506c3080b92.txt``).

Seed 003 describes a PPO loop that tunes a router's *collaboration policy* on synthetic
rollouts, with configurable ``reward_weights`` and HICRA credit assignment over
variable-depth collaborations (step-wise rewards, the planner's first, padded and masked).
:class:`RouterEnv` is a small but real version of that router: each step presents one
task, the agent picks how many agents collaborate on it and in which pattern, and the
outcome is drawn from a quality model that depends on the task and on the mode.

Observation (``Box(0, 1, shape=(8,), float32)``), one task per step:

====  ===========================  ==================================================
idx   feature                      meaning
====  ===========================  ==================================================
0     ``complexity``               how hard the task is, in [0, 1]
1     ``ambiguity``                how under-specified the request is, in [0, 1]
2     ``urgency``                  how much latency hurts for this task, in [0, 1]
3-6   ``domain`` one-hot           code, math, writing, research
7     ``tasks_remaining``          tasks left in the episode (this one included) / ``n_tasks``
====  ===========================  ==================================================

Actions (``Discrete(4)``), the collaboration mode and its agent steps in order:

====  ======================  =====  ======================================  ========  =========
id    mode                    depth  agent steps                             latency   cost
====  ======================  =====  ======================================  ========  =========
0     ``solo``                1      executor                                2.0 s     1.0
1     ``planner_executor``    2      planner, executor                       3.0 s     1.5
2     ``pair_review``         2      executor, reviewer                      3.5 s     1.7
3     ``committee``           4      planner, solver, solver, judge          5.0 s     3.2
====  ======================  =====  ======================================  ========  =========

(cost is in *agent-call units*: one full executor call = 1.0; the committee's two solvers
run in parallel, so the second adds only 0.5 s.)

Outcome model: the collaboration's answer gets a quality score in [0, 1] (think of a
judge's grade) drawn from ``Beta(k * p, k * (1 - p))`` with ``k = 6``, so its mean is the
mode's expected quality::

    p = clip(sigmoid(base[m] + domain_bonus[m, d] - complexity_slope[m] * complexity
                     - ambiguity_slope[m] * ambiguity), 0.02, 0.98)

and the task *succeeds* when its quality is >= 0.5. Solo is best on easy tasks,
planner+executor on complex but clear ones (and math), pair review on ambiguous but
simple ones (and code), the committee on hard, ambiguous ones (and research); deeper
modes are slower and more expensive, which matters more for urgent tasks. Task features
are drawn i.i.d. with the env's RNG (complexity ~ Beta(1.6, 2), ambiguity ~
Beta(1.4, 2.4), urgency ~ U(0, 1), domain uniform). With the default weights each of the
four modes is the best choice for 20-30% of tasks.

Reward of one task (weights ``w`` from ``reward_weights``)::

    reward = w["quality"] * quality - w["latency"] * latency - w["cost"] * cost
    quality = the quality score, in [0, 1]
    latency = urgency * latency_seconds(mode) / 5.0      # urgency-weighted, in [0, 1]
    cost    = cost_units(mode)                           # agent-call units, 1.0 .. 3.2

Default weights ``{"quality": 1.0, "latency": 0.5, "cost": 0.1}``.

With ``reward_shaping`` set (e.g. ``{}``), the reward is seed 004's instead
(``004_85a1da415e255767.txt``): :class:`rl_engine.rewards.RewardShaper` over the task's
``task_completion``, ``efficiency``, ``code_quality`` and ``user_feedback`` components
(:meth:`RouterEnv.reward_components`, reported in ``info["reward_components"]``), each
z-scored over a trailing window of this env copy's tasks and mapped to [0, 1], weighted
0.40 / 0.20 / 0.15 / 0.25 by default.

Per-step ``info``:

* ``depth`` (int >= 1): agent steps in the chosen collaboration.
* ``step_rewards`` (``float32``, shape ``(MAX_DEPTH,) = (4,)``): the reward split over the
  agent steps, the planner/lead agent's first, zero-padded after ``depth``. Every agent
  step is charged its own latency and cost; the quality term is credited to the last
  step (the agent that delivers the answer). ``step_rewards.sum() == reward`` (up to
  float32 rounding). ``step_mask`` (bool, shape ``(4,)``) marks the first ``depth``
  entries, the mask a HICRA credit assigner expects.
* ``mode`` (int), ``task_success`` (bool), ``quality``, ``latency_seconds``,
  ``cost_units`` (floats).

Episode: exactly ``n_tasks`` tasks (default 32), then ``terminated=True``. On the last
step ``info["is_success"]`` is ``True`` when the episode's task success rate (fraction of
tasks whose outcome succeeded) is at least ``success_threshold`` (default 0.75), and
``info["success_rate"]`` holds that rate. It measures quality only, not latency or cost.

Baseline (``baseline_name = "always_solo"``): route every task to a single agent
(action 0), what a router without a collaboration policy does. Mean episode return with
default kwargs over 500 seeded episodes: always-solo 6.2, uniformly random 7.3, best
fixed mode (always committee) 8.1, a four-line rule on complexity/ambiguity 12.1, the
expected-reward oracle (argmax of :meth:`RouterEnv.expected_rewards`) 13.1 (episode
standard deviation about 1.8). PPO with a (64, 64) MLP reaches about 12 in 50k steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

__all__ = [
    "DEFAULT_REWARD_WEIGHTS",
    "DOMAINS",
    "MAX_DEPTH",
    "MODES",
    "RouterEnv",
]

MODES: tuple[str, ...] = ("solo", "planner_executor", "pair_review", "committee")
"""Collaboration modes, indexed by action."""

DOMAINS: tuple[str, ...] = ("code", "math", "writing", "research")
"""Task domains, one-hot at observation indices 3..6."""

ROLES: tuple[tuple[str, ...], ...] = (
    ("executor",),
    ("planner", "executor"),
    ("executor", "reviewer"),
    ("planner", "solver", "solver", "judge"),
)
"""Agent steps of each mode, in order (the planner/lead agent first)."""

MAX_DEPTH = max(len(r) for r in ROLES)
"""Length of ``info["step_rewards"]``."""

# Per agent step: latency in seconds, cost in agent-call units.
_STEP_LATENCY: tuple[tuple[float, ...], ...] = ((2.0,), (1.0, 2.0), (2.0, 1.5), (1.0, 2.0, 0.5, 1.5))
_STEP_COST: tuple[tuple[float, ...], ...] = ((1.0,), (0.5, 1.0), (1.0, 0.7), (0.5, 1.0, 1.0, 0.7))
_LATENCY_REF_SECONDS = 5.0

# Success model, one row per mode.
_BASE = np.array([4.5, 3.4, 3.6, 3.6])
_COMPLEXITY_SLOPE = np.array([8.0, 2.8, 7.0, 2.6])
_AMBIGUITY_SLOPE = np.array([5.0, 5.5, 1.0, 1.8])
_DOMAIN_BONUS = np.array(
    [  # code, math, writing, research
        [0.0, -0.3, 0.8, -0.4],  # solo
        [0.0, 0.8, -0.4, 0.0],  # planner_executor
        [0.8, 0.0, 0.3, -0.4],  # pair_review
        [-0.3, 0.0, -0.6, 0.9],  # committee
    ]
)
_P_MIN, _P_MAX = 0.02, 0.98  # expected quality is clipped to this range
QUALITY_CONCENTRATION = 6.0
"""Quality ~ Beta(k * p, k * (1 - p)) with this ``k``: mean ``p``, variance ``p(1-p)/(k+1)``."""
SUCCESS_QUALITY = 0.5
"""A task succeeds when its quality score reaches this pass mark."""

DEFAULT_REWARD_WEIGHTS: dict[str, float] = {"quality": 1.0, "latency": 0.5, "cost": 0.1}
"""Reward weights used for keys not given in ``reward_weights``."""

OBS_DIM = 3 + len(DOMAINS) + 1


def _validate_weights(reward_weights: Mapping[str, Any] | None) -> dict[str, float]:
    weights = dict(DEFAULT_REWARD_WEIGHTS)
    if reward_weights is None:
        return weights
    if not isinstance(reward_weights, Mapping):
        raise ValueError(
            f"reward_weights must be a mapping of {sorted(DEFAULT_REWARD_WEIGHTS)} to "
            f"non-negative numbers, got {type(reward_weights).__name__}"
        )
    for key, value in reward_weights.items():
        if key not in DEFAULT_REWARD_WEIGHTS:
            raise ValueError(
                f"reward_weights: unknown key {key!r}; known keys are "
                f"{sorted(DEFAULT_REWARD_WEIGHTS)}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(
                f"reward_weights[{key!r}] must be a number, got {type(value).__name__}"
            )
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"reward_weights[{key!r}] must be finite, got {value}")
        if value < 0:
            raise ValueError(f"reward_weights[{key!r}] must be non-negative, got {value}")
        weights[key] = value
    if not any(v > 0 for v in weights.values()):
        raise ValueError("reward_weights: at least one weight must be positive")
    return weights


def _logged_tasks(trajectories: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The logged tasks as rows ``(complexity, ambiguity, urgency, domain index)``, shape
    ``(len(trajectories), 4)``.

    Raises:
        ValueError: no trajectories, or one whose task is not a valid router task.
    """
    if len(trajectories) == 0:
        raise ValueError("trajectories: empty (give None to draw synthetic tasks)")
    rows = np.empty((len(trajectories), 4), dtype=np.float64)
    for i, t in enumerate(trajectories):
        task = t.get("task") if isinstance(t, Mapping) else None
        try:
            values = [float(task[k]) for k in ("complexity", "ambiguity", "urgency")]  # type: ignore[index]
            domain = DOMAINS.index(task["domain"])  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"trajectories[{i}].task: needs complexity, ambiguity, urgency in [0, 1] and a "
                             f"domain of {', '.join(DOMAINS)}") from None
        if not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"trajectories[{i}].task: complexity, ambiguity and urgency must be in [0, 1]")
        rows[i] = (*values, domain)
    return rows


class RouterEnv(gym.Env):
    """Route each task to a collaboration mode; see the module docstring for the layout.

    Args:
        n_tasks: tasks per episode (episode length in steps), >= 1. Default 32.
        reward_weights: weights of the ``quality``, ``latency`` and ``cost`` reward
            components (finite, non-negative, not all zero); missing keys keep their
            defaults :data:`DEFAULT_REWARD_WEIGHTS`.
        success_threshold: task success rate in [0, 1] at which an episode counts as a
            success (``info["is_success"]``). Default 0.75.
        reward_shaping: when given (``{}`` for the defaults, or ``{"weights": {...},
            "window": 1000}``), the reward is seed 004's shaped reward instead:
            :class:`rl_engine.rewards.RewardShaper` over the components in
            ``info["reward_components"]`` (see :meth:`reward_components`), in [0, 1], all
            credited to the last agent step. ``reward_weights`` is then unused.
        trajectories: logged ``agent.rl.trajectory.v1`` records (dicts with ``task`` and, optionally,
            ``reward_components``; :mod:`rl_engine.trajectories`), e.g. those a run of the
            trajectory trigger was started for. Given, the tasks are drawn from the logged
            tasks (uniformly, with replacement, with the env's RNG) instead of the synthetic
            distribution, so the policy trains on the production task mix; the outcomes of
            the modes it picks still come from the outcome model. With ``reward_shaping``, the
            shaper's trailing windows start filled with the logged reward components (the
            last ``window`` of them, in stream order), so that normalization starts from
            production statistics.
        render_mode: only ``None`` is supported.

    Raises:
        ValueError: naming the bad kwarg (and key of ``reward_weights``, or index of
            ``trajectories``).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    baseline_name: ClassVar[str] = "always_solo"

    def __init__(
        self,
        n_tasks: int = 32,
        reward_weights: Mapping[str, float] | None = None,
        success_threshold: float = 0.75,
        reward_shaping: Mapping[str, Any] | None = None,
        trajectories: Sequence[Mapping[str, Any]] | None = None,
        render_mode: str | None = None,
    ) -> None:
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, (int, np.integer)) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")
        if isinstance(success_threshold, bool) or not isinstance(
            success_threshold, (int, float, np.integer, np.floating)
        ) or not (0.0 <= float(success_threshold) <= 1.0):
            raise ValueError(
                f"success_threshold must be a number in [0, 1], got {success_threshold!r}"
            )
        if render_mode is not None:
            raise ValueError(f"render_mode: RouterEnv does not render (got {render_mode!r})")
        self.n_tasks = int(n_tasks)
        self.reward_weights = _validate_weights(reward_weights)
        self.success_threshold = float(success_threshold)
        self.render_mode = render_mode
        self.shaper = None
        if reward_shaping is not None:
            from ..rewards import from_config

            self.shaper = from_config(reward_shaping, path="environment.kwargs.reward_shaping")
        self._logged_tasks = _logged_tasks(trajectories) if trajectories is not None else None
        if self.shaper is not None and trajectories is not None:
            logged = [t["reward_components"] for t in trajectories if t.get("reward_components")]
            for components in logged[-self.shaper.window:]:
                self.shaper(components)

        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(OBS_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(MODES))

        self._tasks: np.ndarray | None = None  # (n_tasks + 1, 3 + 1): c, a, u, domain
        self._t = 0
        self._successes = 0

    # ---- task generation and the outcome model -------------------------------------

    def _draw_tasks(self, n: int) -> np.ndarray:
        rng = self.np_random
        if self._logged_tasks is not None:
            return self._logged_tasks[rng.integers(0, len(self._logged_tasks), size=n)]
        tasks = np.empty((n, 4), dtype=np.float64)
        tasks[:, 0] = rng.beta(1.6, 2.0, size=n)
        tasks[:, 1] = rng.beta(1.4, 2.4, size=n)
        tasks[:, 2] = rng.random(size=n)
        tasks[:, 3] = rng.integers(0, len(DOMAINS), size=n)
        return tasks

    def _obs(self, t: int) -> np.ndarray:
        assert self._tasks is not None
        c, a, u, d = self._tasks[t]
        obs = np.zeros(OBS_DIM, dtype=np.float32)
        obs[0], obs[1], obs[2] = c, a, u
        obs[3 + int(d)] = 1.0
        obs[-1] = max(self.n_tasks - t, 0) / self.n_tasks
        return obs

    @staticmethod
    def _decode(obs: np.ndarray) -> tuple[float, float, float, int]:
        obs = np.asarray(obs, dtype=np.float64).reshape(-1)
        return float(obs[0]), float(obs[1]), float(obs[2]), int(np.argmax(obs[3 : 3 + len(DOMAINS)]))

    @staticmethod
    def expected_quality(obs: np.ndarray) -> np.ndarray:
        """Expected quality ``p`` of each mode for the task in ``obs``, shape ``(4,)``."""
        c, a, _, d = RouterEnv._decode(obs)
        logit = _BASE + _DOMAIN_BONUS[:, d] - _COMPLEXITY_SLOPE * c - _AMBIGUITY_SLOPE * a
        return np.clip(1.0 / (1.0 + np.exp(-logit)), _P_MIN, _P_MAX)

    def _step_costs(self, mode: int, urgency: float) -> np.ndarray:
        """Per agent step ``w_latency * latency + w_cost * cost`` (positive), shape (depth,)."""
        w = self.reward_weights
        lat = np.asarray(_STEP_LATENCY[mode]) * urgency / _LATENCY_REF_SECONDS
        return w["latency"] * lat + w["cost"] * np.asarray(_STEP_COST[mode])

    def expected_rewards(self, obs: np.ndarray) -> np.ndarray:
        """Expected reward of each mode for the task in ``obs`` under this env's weights,
        shape ``(4,)``; its argmax is the optimal (oracle) action."""
        _, _, u, _ = self._decode(obs)
        p = self.expected_quality(obs)
        costs = np.array([self._step_costs(m, u).sum() for m in range(len(MODES))])
        return self.reward_weights["quality"] * p - costs

    def reward_components(self, mode: int, quality: float, success: bool,
                          urgency: float) -> dict[str, float]:
        """Seed 004's four reward components of one routed task (raw, before normalization).

        * ``task_completion``: 1 when the task succeeded, else its quality (binary + partial
          credit);
        * ``efficiency``: the single agent's latency over this mode's (time vs baseline),
          1.0 for solo down to 0.4 for the committee;
        * ``code_quality``: the judge's quality grade of the delivered answer, in [0, 1];
        * ``user_feedback``: a simulated thumbs up (1) or down (0), drawn with probability
          ``quality * (1 - 0.5 * urgency * (1 - efficiency))`` (slow answers to urgent
          tasks annoy users).
        """
        efficiency = sum(_STEP_LATENCY[0]) / sum(_STEP_LATENCY[mode])
        p_up = quality * (1.0 - 0.5 * urgency * (1.0 - efficiency))
        return {
            "task_completion": 1.0 if success else quality,
            "efficiency": efficiency,
            "code_quality": quality,
            "user_feedback": float(self.np_random.random() < p_up),
        }

    def baseline_action(self, obs: np.ndarray) -> int:
        """The baseline router's action: always ``solo`` (0), whatever the task."""
        return 0

    # ---- Gymnasium API --------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        # one extra task so the observation after the last step is a valid task too
        self._tasks = self._draw_tasks(self.n_tasks + 1)
        self._t = 0
        self._successes = 0
        return self._obs(0), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._tasks is None:
            raise RuntimeError("RouterEnv.step() called before reset()")
        if self._t >= self.n_tasks:
            raise RuntimeError("RouterEnv.step() called after the episode ended; call reset()")
        mode = int(action)
        if not 0 <= mode < len(MODES):
            raise ValueError(f"action must be in [0, {len(MODES) - 1}], got {action!r}")

        obs_now = self._obs(self._t)
        urgency = float(self._tasks[self._t, 2])
        p = float(self.expected_quality(obs_now)[mode])
        k = QUALITY_CONCENTRATION
        quality = float(self.np_random.beta(k * p, k * (1.0 - p)))
        success = quality >= SUCCESS_QUALITY

        depth = len(ROLES[mode])
        step_rewards = np.zeros(MAX_DEPTH, dtype=np.float32)
        per_step = -self._step_costs(mode, urgency)
        per_step[-1] += self.reward_weights["quality"] * quality
        components = None
        if self.shaper is not None:
            components = self.reward_components(mode, quality, success, urgency)
            per_step = np.zeros(depth)
            per_step[-1] = self.shaper(components)
        step_rewards[:depth] = per_step
        reward = float(per_step.sum())
        step_mask = np.zeros(MAX_DEPTH, dtype=bool)
        step_mask[:depth] = True

        self._successes += int(success)
        self._t += 1
        terminated = self._t >= self.n_tasks
        info: dict[str, Any] = {
            "mode": mode,
            "depth": depth,
            "step_rewards": step_rewards,
            "step_mask": step_mask,
            "task_success": success,
            "quality": quality,
            "latency_seconds": float(sum(_STEP_LATENCY[mode])),
            "cost_units": float(sum(_STEP_COST[mode])),
        }
        if components is not None:
            info["reward_components"] = components
        if terminated:
            rate = self._successes / self.n_tasks
            info["success_rate"] = rate
            info["is_success"] = bool(rate >= self.success_threshold)
        return self._obs(self._t), reward, terminated, False, info
