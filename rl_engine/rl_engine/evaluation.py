"""Policy evaluation: deterministic (argmax) episodes and a random-policy baseline.

Episode ``j`` always starts from ``env.reset(seed=seeds[j])``, so with a deterministic
policy its return depends only on its seed, not on how episodes are spread over the
parallel environment copies. Each copy runs whole episodes (no copy is cut short), so the
mean is not biased toward short episodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym
import numpy as np

__all__ = [
    "EpisodeResults",
    "run_episodes",
    "random_policy",
    "baseline_policy",
    "has_baseline",
    "improvement",
    "DEFAULT_MAX_EPISODE_STEPS",
]

DEFAULT_MAX_EPISODE_STEPS = 10_000
"""Cap for an evaluation episode when neither the env nor the config sets a limit."""


@dataclass
class EpisodeResults:
    """Returns and lengths of finished evaluation episodes.

    Attributes:
        returns: undiscounted return of each episode, shape ``(episodes,)``.
        lengths: env steps of each episode, shape ``(episodes,)``.
        seeds: reset seed of each episode.
        seconds: wall time of the evaluation (seconds).
        successes: 1.0/0.0 per episode from the env's final ``info["is_success"]``, NaN
            where the env did not report it, shape ``(episodes,)``.
    """

    returns: np.ndarray
    lengths: np.ndarray
    seeds: list[int]
    seconds: float
    successes: np.ndarray | None = None

    @property
    def success_rate(self) -> float | None:
        """Fraction of episodes with ``is_success`` true, over the episodes that reported
        it; ``None`` when the environment defines no success."""
        if self.successes is None:
            return None
        known = self.successes[~np.isnan(self.successes)]
        return float(np.mean(known)) if known.size else None

    def summary(self) -> dict[str, Any]:
        """Mean/std (population)/min/max of returns and lengths, the episode count, and
        ``successRate`` (``None`` when the environment defines no success)."""
        r, n = self.returns, self.lengths
        return {
            "successRate": self.success_rate,
            "episodes": int(len(r)),
            "meanReturn": float(np.mean(r)),
            "stdReturn": float(np.std(r)),
            "minReturn": float(np.min(r)),
            "maxReturn": float(np.max(r)),
            "meanLength": float(np.mean(n)),
            "stdLength": float(np.std(n)),
            "minLength": int(np.min(n)),
            "maxLength": int(np.max(n)),
        }


def random_policy(obs: np.ndarray, envs: list[gym.Env]) -> np.ndarray:
    """Uniform random actions, shape ``(B,)``, from each env's own action space (which
    :func:`run_episodes` seeds per episode)."""
    return np.asarray([env.action_space.sample() for env in envs])


def has_baseline(env: gym.Env) -> bool:
    """Whether ``env`` defines its own baseline policy (``baseline_action(obs) -> int`` on
    the unwrapped env, e.g. the gate environment's "pass all")."""
    return callable(getattr(env.unwrapped, "baseline_action", None))


def baseline_policy(obs: np.ndarray, envs: list[gym.Env]) -> np.ndarray:
    """The environment's own baseline: ``env.unwrapped.baseline_action(obs_i)`` per copy,
    shape ``(B,)``."""
    return np.asarray([env.unwrapped.baseline_action(o) for env, o in zip(envs, obs)])


def improvement(mean_return: float, reference: float) -> dict[str, float | None]:
    """How far ``mean_return`` is above ``reference``: ``absolute`` (return units) and
    ``relative`` (``absolute / |reference|``, ``None`` when the reference is 0)."""
    diff = float(mean_return - reference)
    return {"absolute": diff, "relative": diff / abs(reference) if reference else None}


def run_episodes(
    make_env: Callable[[], gym.Env],
    policy: Callable[[np.ndarray, list[gym.Env]], np.ndarray],
    seeds: list[int],
    max_parallel: int = 32,
    max_episode_steps: int | None = None,
) -> EpisodeResults:
    """Run ``len(seeds)`` episodes with batched action selection.

    Args:
        make_env: factory for one environment copy (at most ``max_parallel`` are made).
        policy: ``(obs of shape (B, *obs_shape), the B envs) -> actions (B,)``.
        seeds: one reset seed per episode (the env's action space is seeded with it too).
        max_parallel: environment copies stepped together.
        max_episode_steps: cap per episode; ``None`` means the env's own time limit, or
            :data:`DEFAULT_MAX_EPISODE_STEPS` if it has none.

    Returns:
        :class:`EpisodeResults` in the order of ``seeds``.
    """
    t0 = time.perf_counter()
    total = len(seeds)
    returns = np.zeros(total, dtype=np.float64)
    lengths = np.zeros(total, dtype=np.int64)
    successes = np.full(total, np.nan, dtype=np.float64)
    envs = [make_env() for _ in range(max(1, min(max_parallel, total)))]
    if max_episode_steps is None:
        spec = getattr(envs[0], "spec", None)
        limit = getattr(spec, "max_episode_steps", None) if spec is not None else None
        max_episode_steps = limit or DEFAULT_MAX_EPISODE_STEPS

    next_episode = 0
    # slot -> (episode index, current obs)
    slots: dict[int, tuple[int, Any]] = {}

    def start(slot: int) -> None:
        nonlocal next_episode
        ep = next_episode
        next_episode += 1
        envs[slot].action_space.seed(seeds[ep])
        obs, _ = envs[slot].reset(seed=seeds[ep])
        slots[slot] = (ep, obs)

    try:
        for slot in range(len(envs)):
            if next_episode < total:
                start(slot)
        while slots:
            active = sorted(slots)
            batch = np.stack([np.asarray(slots[s][1], dtype=np.float32) for s in active])
            actions = policy(batch, [envs[s] for s in active])
            for slot, action in zip(active, actions):
                ep, _ = slots[slot]
                obs, reward, terminated, truncated, info = envs[slot].step(
                    action.item() if hasattr(action, "item") else action
                )
                returns[ep] += float(reward)
                lengths[ep] += 1
                if "is_success" in info:
                    successes[ep] = float(bool(info["is_success"]))
                if terminated or truncated or lengths[ep] >= max_episode_steps:
                    del slots[slot]
                    if next_episode < total:
                        start(slot)
                else:
                    slots[slot] = (ep, obs)
    finally:
        for env in envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001
                pass
    reported = None if np.isnan(successes).all() else successes
    return EpisodeResults(returns, lengths, list(seeds), time.perf_counter() - t0, reported)


def finite_or_none(x: float) -> float | None:
    """``x`` if finite else ``None`` (for JSON)."""
    return x if math.isfinite(x) else None
