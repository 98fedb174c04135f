#!/usr/bin/env python
"""Benchmark: loading the serving export as a state dict + class path (what artifacts ship,
``rl_engine.networks.load_agent``) against TorchScript (the alternative the issue names).

Both load a CartPole-sized PPO actor (64-64 tanh) from bytes in memory, ``--loads`` times
each, alternating; then each model answers a (32, 4) batch ``--forwards`` times. Prints the
medians and the state dict's figures as ratios to TorchScript's, measured in the same run.

    .venv/bin/python hack/bench/policy_load.py
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from typing import Callable

import torch

from rl_engine.networks import network_from_spec, policy_spec
from rl_engine.ppo import Agent


class _Greedy(torch.nn.Module):
    """What a TorchScript export would hold: the actor's logits."""

    def __init__(self, actor: torch.nn.Module) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actor(x)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loads", type=int, default=200)
    ap.add_argument("--forwards", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)

    agent = Agent(4, 2)
    buf = io.BytesIO()
    torch.save(agent.state_dict(), buf)
    state_bytes = buf.getvalue()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(_Greedy(agent.actor)), buf)
    script_bytes = buf.getvalue()
    spec = policy_spec(agent)

    def load_state_dict() -> torch.nn.Module:
        net = network_from_spec(spec)
        net.load_state_dict(torch.load(io.BytesIO(state_bytes), weights_only=True))
        return net.eval()

    def load_script() -> torch.nn.Module:
        return torch.jit.load(io.BytesIO(script_bytes)).eval()

    x = torch.zeros(32, 4)
    loaded = {"state dict + class": load_state_dict(), "torchscript": load_script()}
    forward = {"state dict + class": lambda: loaded["state dict + class"].act_greedy(x),
               "torchscript": lambda: loaded["torchscript"](x).argmax(-1)}
    loads = {name: [] for name in loaded}
    for _ in range(args.loads):  # alternate, so background load hits both alike
        loads["state dict + class"].append(_median_seconds(load_state_dict, 1))
        loads["torchscript"].append(_median_seconds(load_script, 1))
    sizes = {"state dict + class": len(state_bytes), "torchscript": len(script_bytes)}
    fwd = {name: _median_seconds(fn, args.forwards) for name, fn in forward.items()}
    load = {name: statistics.median(v) for name, v in loads.items()}
    print("| export | load median (ms) | greedy forward (32, 4) median (us) | bytes |")
    print("| --- | --- | --- | --- |")
    for name in loaded:
        print(f"| {name} | {load[name] * 1e3:.2f} | {fwd[name] * 1e6:.1f} | {sizes[name]} |")
    a, b = "state dict + class", "torchscript"
    print(f"\nstate dict / torchscript: load x{load[a] / load[b]:.2f}, forward x{fwd[a] / fwd[b]:.2f}")


if __name__ == "__main__":
    main()
