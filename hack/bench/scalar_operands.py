#!/usr/bin/env python
"""Benchmark: an elementwise op with a Python-number operand against the same op with a cached
0-dim tensor (``rl_engine.scalars.ScalarTensors``), on the PPO update's and TorchCartPole's
tensor sizes, single-threaded, and ``TorchCartPole.step`` under ``torch.no_grad()`` against
``torch.inference_mode()``. Prints each time and the ratio to the Python-number (or no_grad)
version measured in the same run.

    .venv/bin/python hack/bench/scalar_operands.py
"""

from __future__ import annotations

import timeit

import torch

from rl_engine.scalars import ScalarTensors
from rl_engine.torch_envs import TorchCartPole


def _time(fn, number: int = 5000) -> float:
    """Best of 7 repeats, in microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main() -> None:
    torch.set_num_threads(1)
    k = ScalarTensors(torch.float32, "cpu")
    print("| op | elements | Python number (us) | 0-dim tensor (us) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for n in (64, 256, 32768):
        x = torch.randn(n)
        cases = [
            ("x.mul_(s)", lambda: x.mul_(1.0), lambda: x.mul_(k[1.0])),
            ("x > s", lambda: x > 0.0, lambda: x > k[0.0]),
            ("torch.where(x > 0, x, s)", lambda: torch.where(x > k[0.0], x, 0.0),
             lambda: torch.where(x > k[0.0], x, k[0.0])),
            ("x.clamp(lo, hi)", lambda: x.clamp(0.8, 1.2), lambda: x.clamp(k[0.8], k[1.2])),
        ]
        for name, number_op, tensor_op in cases:
            a, b = _time(number_op), _time(tensor_op)
            print(f"| `{name}` | {n} | {a:.2f} | {b:.2f} | {b / a:.2f} |")

    print()
    print("| TorchCartPole.step, 64 envs | us |  ratio |")
    print("| --- | --- | --- |")
    actions = torch.randint(0, 2, (64,))
    results = {}
    for mode, ctx in (("torch.no_grad()", torch.no_grad), ("torch.inference_mode()",
                                                          torch.inference_mode)):
        with ctx():
            env = TorchCartPole(64, "cpu")
            env.reset(seed=0)
            results[mode] = _time(lambda: env.step(actions), number=2000)
    base = results["torch.no_grad()"]
    for mode, us in results.items():
        print(f"| {mode} | {us:.1f} | {us / base:.2f} |")


if __name__ == "__main__":
    main()
