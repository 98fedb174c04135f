"""Domain environments from the project's seed documents, registered with Gymnasium.

Importing this package registers (idempotently, safe to re-import):

=====================  ==============================================  ==========================
Gymnasium id           entry point                                     seed document
=====================  ==============================================  ==========================
``rlops/Router-v0``    :class:`rl_engine.domains.router.RouterEnv`     ``003_59738506c3080b92``
``rlops/Gate-v0``      :class:`rl_engine.domains.gate.GateEnv`         ``001_0aff069b2710dfe1``
=====================  ==============================================  ==========================

Both are fixed-length episodes (no ``max_episode_steps``). A trainer config can name them
as ``environment.id: rl_engine.domains.router:RouterEnv`` (constructor called with
``environment.kwargs``) or, through Gymnasium's ``module:EnvId`` form, as
``rl_engine.domains:rlops/Router-v0`` (which imports this package to register the id).

Each env class has a ``baseline_name`` class attribute and a ``baseline_action(obs)``
method (the environment's own baseline policy: ``always_solo`` for the router,
``pass_all`` for the gate).

The env classes are imported lazily (``rl_engine.domains.GateEnv`` imports pyarrow only
when first used).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

__all__ = ["ENV_IDS", "GateEnv", "RouterEnv", "make_synthetic_gate_dataset", "register_envs"]

ENV_IDS: dict[str, str] = {
    "rlops/Router-v0": "rl_engine.domains.router:RouterEnv",
    "rlops/Gate-v0": "rl_engine.domains.gate:GateEnv",
}
"""Gymnasium id -> entry point of every environment registered by this package."""


def register_envs() -> None:
    """Register :data:`ENV_IDS` with Gymnasium; ids already registered are left alone."""
    for env_id, entry_point in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point)


register_envs()

_LAZY = {
    "RouterEnv": "rl_engine.domains.router",
    "GateEnv": "rl_engine.domains.gate",
    "make_synthetic_gate_dataset": "rl_engine.domains.gate",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
