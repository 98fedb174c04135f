"""0-dim tensors standing in for Python numbers in hot tensor loops.

Why: PyTorch (2.15, CPU) turns a Python number operand of an elementwise op (``x * 2.0``,
``x > 0``, ``torch.where(c, x, 0.0)``, ``x.clamp(0.8, 1.2)``) into a tensor on every call, an
extra ``aten::to`` of ~2-3 µs: more than the op itself costs on a ``(256,)`` vector, and the
PPO update and the torch-batched envs run a few hundred such ops per iteration. A 0-dim
tensor of the operand's dtype and device is used as is (``hack/bench/scalar_operands.py``
measures both; docs/benchmarks.md). Scalar *parameters* (``alpha=``, ``value=``, ``beta=``)
do not pay this and stay Python numbers.
"""

from __future__ import annotations

import torch

__all__ = ["ScalarTensors"]


class ScalarTensors(dict):
    """A cache of 0-dim tensors of one dtype and device, keyed by value.

    ``k = ScalarTensors(torch.float32, device); x.mul_(k[2.0])`` multiplies by a 0-dim
    float32 tensor made once, on first use, instead of by a Python float.

    Args:
        dtype: dtype of every tensor in the cache.
        device: device of every tensor in the cache.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.dtype = dtype
        self.device = torch.device(device)

    def __missing__(self, value: float) -> torch.Tensor:
        t = torch.tensor(value, dtype=self.dtype, device=self.device)
        self[value] = t
        return t
