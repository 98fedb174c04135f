"""Environment construction from ``environment.id`` (Gymnasium id or ``module:Class``).

Resolution of ``environment.id``:

1. ``module:Name`` where ``module`` imports and has a callable attribute ``Name``: the
   callable is the environment constructor, called with ``environment.kwargs``.
2. Anything else is passed to ``gymnasium.make`` (which also understands Gymnasium's own
   ``module:EnvId`` form, importing ``module`` to register ``EnvId``).

All failures raise :class:`rl_engine.errors.InvalidConfig` naming ``environment.id`` or
``environment.kwargs``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from .config import EnvironmentConfig
from .errors import InvalidConfig

__all__ = ["resolve_env_factory", "check_spaces", "make_vector_env", "space_description"]


def env_constructor(env_id: str) -> Callable[..., Any] | None:
    """The class or function an environment id builds (``module:attr``, or a registered id's
    entry point), or None when it cannot be found."""
    def load(entry: str) -> Any:
        module_name, _, attr = entry.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr, None)
        except Exception:  # noqa: BLE001 - not importable: not ours to report here
            return None

    target: Any = load(env_id) if ":" in env_id else None
    if callable(target):
        return target
    # a registered id, or "module:id" (the module registers the id when imported)
    registered = env_id.partition(":")[2] if ":" in env_id else env_id
    try:
        entry = gym.spec(registered).entry_point
    except gym.error.Error:
        return None
    return entry if callable(entry) else load(str(entry))


def accepts_keyword(env_id: str, name: str) -> bool:
    """Whether the environment's constructor takes the keyword argument ``name``."""
    ctor = env_constructor(env_id)
    if ctor is None:
        return False
    try:
        params = inspect.signature(ctor).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def resolve_env_factory(env_cfg: EnvironmentConfig,
                        extra_kwargs: dict[str, Any] | None = None) -> Callable[[], gym.Env]:
    """Return a zero-argument factory for one environment instance.

    Builds one instance to validate the id and kwargs, then closes it.

    Args:
        env_cfg: the run config's environment.
        extra_kwargs: more constructor keywords that are not part of the run config (the
            logged ``trajectories`` of :mod:`rl_engine.trajectories`).

    Raises:
        InvalidConfig: unknown id, unimportable module, bad kwargs or a constructor error.
    """
    env_id = env_cfg.id
    kwargs = {**env_cfg.kwargs, **(extra_kwargs or {})}
    factory: Callable[[], gym.Env] | None = None

    if ":" in env_id:
        module_name, _, attr = env_id.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # noqa: BLE001 - report any import failure as config error
            raise InvalidConfig(
                f"environment.id: cannot import module {module_name!r} of {env_id!r}: "
                f"{type(err).__name__}: {err}"
            ) from None
        target = getattr(module, attr, None)
        if callable(target):
            factory = lambda: target(**kwargs)  # noqa: E731
    if factory is None:
        if ":" not in env_id:
            try:
                gym.spec(env_id)
            except gym.error.Error as err:
                raise InvalidConfig(
                    f"environment.id: {env_id!r} is not a registered Gymnasium environment "
                    f"({type(err).__name__}: {err})"
                ) from None
        factory = lambda: gym.make(env_id, disable_env_checker=True, **kwargs)  # noqa: E731

    try:
        env = factory()
    except gym.error.Error as err:
        raise InvalidConfig(
            f"environment.id: cannot make {env_id!r}: {type(err).__name__}: {err}"
        ) from None
    except TypeError as err:
        raise InvalidConfig(
            f"environment.kwargs: {env_id!r} rejected kwargs {sorted(kwargs)}: {err}"
        ) from None
    except Exception as err:  # noqa: BLE001
        raise InvalidConfig(
            f"environment.id: constructing {env_id!r} failed: {type(err).__name__}: {err}"
        ) from None
    try:
        if not isinstance(env, gym.Env):
            raise InvalidConfig(
                f"environment.id: {env_id!r} did not build a gymnasium.Env (got "
                f"{type(env).__name__})"
            )
        check_spaces(env.observation_space, env.action_space, env_id)
    finally:
        try:
            env.close()
        except Exception:  # noqa: BLE001
            pass
    return factory


def space_description(space: gym.Space) -> dict[str, Any]:
    """JSON description of a space, e.g. ``{"type": "Discrete", "n": 2}`` or
    ``{"type": "Box", "shape": [4], "dtype": "float32"}``."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype)}
    return {"type": type(space).__name__, "repr": repr(space)[:200]}


def check_spaces(obs_space: gym.Space, act_space: gym.Space, env_id: str) -> None:
    """PPO here supports ``Box`` observations and ``Discrete(n)`` actions starting at 0.

    Raises:
        InvalidConfig: naming ``environment.id`` and the unsupported space.
    """
    if not isinstance(obs_space, gym.spaces.Box):
        raise InvalidConfig(
            f"environment.id: {env_id!r} has observation space {obs_space}; PPO needs a Box "
            "observation space"
        )
    if not isinstance(act_space, gym.spaces.Discrete) or int(act_space.start) != 0:
        raise InvalidConfig(
            f"environment.id: {env_id!r} has action space {act_space}; PPO currently "
            "supports Discrete(n) actions starting at 0 only"
        )
    if int(np.prod(obs_space.shape)) < 1:
        raise InvalidConfig(f"environment.id: {env_id!r} has an empty observation space")


def make_vector_env(factory: Callable[[], gym.Env], num_envs: int) -> gym.vector.SyncVectorEnv:
    """``num_envs`` copies in a ``SyncVectorEnv`` with same-step autoreset.

    With ``AutoresetMode.SAME_STEP`` the observation returned for a finished sub-env is
    already the first observation of its next episode, and the true final observation is
    in ``info["final_obs"]`` (masked by ``info["_final_obs"]``).
    """
    return gym.vector.SyncVectorEnv(
        [factory for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
