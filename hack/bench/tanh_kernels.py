#!/usr/bin/env python
"""Benchmark: a hidden layer's ``addmm``/``baddbmm`` + PyTorch's CPU ``tanh`` kernel against
``rl_engine.actor_critic._affine_tanh`` (``2 sigmoid(2 z) - 1`` with the doubling folded into
the product, what the PPO trainer uses for large CPU activations), on the agent's
activation shapes, single-threaded. Prints each time and the ratio to the ``torch.tanh`` version measured
in the same run, and the largest absolute difference between the two.

    .venv/bin/python hack/bench/tanh_kernels.py
"""

from __future__ import annotations

import timeit

import torch

from rl_engine.actor_critic import _affine_tanh
from rl_engine.scalars import ScalarTensors


def main() -> None:
    torch.set_num_threads(1)
    print("| output elements | product + torch.tanh (us) | _affine_tanh (us) | ratio | max abs diff |")
    print("| --- | --- | --- | --- | --- |")
    k = ScalarTensors(torch.float32, "cpu")
    for shape in [(16, 64), (32, 64), (64, 64), (64, 128), (2, 128, 64), (2, 256, 64),
                  (2, 1024, 64)]:
        # a layer's pre-activation: x (rows, 64) @ w (64, cols) + b, then tanh
        rows, cols = shape[-2], shape[-1]
        x = torch.randn(*shape[:-1], 64)
        w = torch.randn(*shape[:-2], 64, cols) / 8
        b = torch.randn(*shape[:-2], 1, cols) if len(shape) == 3 else torch.randn(cols)
        product = torch.addmm if len(shape) == 2 else torch.baddbmm
        n = 2000
        base = min(timeit.repeat(lambda: torch.tanh(product(b, x, w)), number=n, repeat=5))
        ours = min(timeit.repeat(lambda: _affine_tanh(b, x, w, k, min_elements=0), number=n, repeat=5))
        diff = float((_affine_tanh(b, x, w, k, min_elements=0) - torch.tanh(product(b, x, w))).abs().max())
        print(f"| {rows * cols * (shape[0] if len(shape) == 3 else 1)} | {base / n * 1e6:.1f} | "
              f"{ours / n * 1e6:.1f} | {ours / base:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
