"""rlops trainer engine.

The trainer runs inside a training pod as ``python -m rl_engine.train`` (see
:mod:`rl_engine.train` and ``docs/trainer.md``). This package root and the modules
:mod:`rl_engine.artifacts`, :mod:`rl_engine.config` and :mod:`rl_engine.errors` do not
import torch, so the operator can import them (e.g.
:func:`rl_engine.artifacts.compute_fingerprint`) without the deep-learning stack.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
