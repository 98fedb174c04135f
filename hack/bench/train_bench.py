#!/usr/bin/env python
"""Benchmark: our PPO and DQN trainers against Stable-Baselines3 (and CleanRL's ``ppo.py``).

One process runs every contender, one after another, on CartPole-v1 with one protocol:

* train; every ``--eval-every`` env steps (10,240; checked at the first iteration boundary at
  or after each multiple, i.e. after a policy update) stop the clock, run a deterministic
  ``--eval-episodes``-episode evaluation (greedy / ``deterministic=True`` actions) on separate
  Gymnasium CartPole-v1 envs reset with fixed seeds (the same seeds for every contender and
  every evaluation), then resume the clock;
* "solved" = the evaluation mean return >= ``--target`` (475); time to solve = training wall
  time up to that evaluation, evaluation time excluded; steps to solve = env steps by then;
* steps/s = env steps / training wall time (evaluation excluded) at the last check;
* each run is capped by a step budget and by ``--max-seconds`` of training time ("not solved"
  when a cap is hit first);
* ``torch.set_num_threads(1)`` for every contender (the networks are tiny);
* seeds are interleaved (seed 1: every contender, then seed 2, ...) so that background load
  on the machine hits all contenders alike; medians over seeds are reported.

Contenders (``--contenders``; a contender whose library or module is missing is skipped with
a message):

* ``sb3-ppo``: SB3 PPO with CleanRL's ``ppo.py`` CartPole defaults (4 envs in a DummyVecEnv,
  n_steps 128, minibatch 128, 4 epochs, lr 2.5e-4 annealed linearly, gamma 0.99, GAE 0.95,
  clip 0.2 (and value clip 0.2), ent 0.01, vf 0.5, max_grad_norm 0.5, separate 64-64 tanh
  actor and critic).
* ``cleanrl-ppo``: CleanRL 1.2.0's ``cleanrl/ppo.py``, run unmodified in this process with its
  own command line (``runpy``); the only hook is a ``gym.vector.SyncVectorEnv`` subclass that
  counts env steps and, before the env step that follows a multiple of 10,240 steps (that is,
  after the update), pauses the clock and evaluates the script's ``agent`` (read from the
  script's globals). Its stdout (one line per episode) goes to /dev/null and its TensorBoard
  files to a temporary directory.
* ``rlops-ppo``: ``rl_engine.ppo.PPOTrainer`` on a Gymnasium ``SyncVectorEnv`` (4 envs, same
  hyperparameters), as ``python -m rl_engine.train`` builds it.
* ``rlops-ppo-torch``: the same trainer on ``rl_engine.torch_envs.TorchCartPole``
  (``--torch-num-envs`` x ``--torch-num-steps``).
* ``sb3-dqn``: SB3 DQN with the rl-baselines3-zoo CartPole-v1 hyperparameters (1 env, lr
  2.3e-3, batch 64, buffer 100k, learning_starts 1000, gamma 0.99, target update every 10
  steps, train_freq 256, gradient_steps 128, epsilon 1 -> 0.04 over 0.16 x 50k steps, MLP
  256-256 ReLU, Huber loss, max_grad_norm 10, no Double DQN).
* ``rlops-dqn``: ``rl_engine.dqn.DQNTrainer`` with the same hyperparameters.

    .venv-bench/bin/python hack/bench/train_bench.py --seeds 1 2 3 --json /tmp/train-bench.json

Progress goes to stderr; the table and the ratio lines to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import runpy
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import gymnasium
import numpy as np
import torch

ENV_ID = "CartPole-v1"
ALL_CONTENDERS = ["sb3-ppo", "cleanrl-ppo", "rlops-ppo", "rlops-ppo-torch", "sb3-dqn", "rlops-dqn"]

# CleanRL ppo.py defaults (CartPole-v1).
PPO = dict(learning_rate=2.5e-4, num_envs=4, num_steps=128, num_minibatches=4, update_epochs=4,
           gamma=0.99, gae_lambda=0.95, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5,
           max_grad_norm=0.5)
# rl-baselines3-zoo hyperparams/dqn.yml, CartPole-v1 (n_timesteps 5e4, n_envs 1).
DQN = dict(learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000,
           gamma=0.99, target_update_interval=10, train_freq=256, gradient_steps=128,
           exploration_fraction=0.16, exploration_final_eps=0.04, net=(256, 256),
           max_grad_norm=10.0, zoo_timesteps=50_000)

Act = Callable[[np.ndarray], np.ndarray]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """The contender cannot run here (missing library or module); the message says why."""


class StopTraining(Exception):
    """Raised from inside a foreign training loop (CleanRL) to end it."""


# --------------------------------------------------------------------------- the protocol


class Evaluator:
    """Deterministic evaluation: ``episodes`` CartPole-v1 episodes, one env per episode,
    reset with seeds ``seed0 + i``; the alive envs' observations are batched into one
    forward pass per step."""

    def __init__(self, episodes: int, seed0: int) -> None:
        self.seeds = [seed0 + i for i in range(episodes)]
        self.envs = [gymnasium.make(ENV_ID, disable_env_checker=True) for _ in self.seeds]

    def __call__(self, act: Act) -> np.ndarray:
        n = len(self.envs)
        obs = np.stack([env.reset(seed=s)[0] for env, s in zip(self.envs, self.seeds)])
        obs = obs.astype(np.float32)
        returns = np.zeros(n)
        alive = np.ones(n, dtype=bool)
        while alive.any():
            idx = np.flatnonzero(alive)
            actions = np.asarray(act(obs[idx])).reshape(-1)
            for j, i in enumerate(idx):
                o, r, terminated, truncated, _ = self.envs[i].step(int(actions[j]))
                returns[i] += r
                obs[i] = o
                if terminated or truncated:
                    alive[i] = False
        return returns


@dataclass
class RunResult:
    contender: str
    seed: int
    config: dict[str, Any]
    solved: bool = False
    time_to_solve_s: float | None = None
    steps_to_solve: int | None = None
    steps: int = 0
    train_seconds: float = 0.0
    steps_per_second: float | None = None
    eval_seconds: float = 0.0
    stop_reason: str = ""
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    error: str | None = None


class Protocol:
    """The clock, the periodic evaluation and the budgets, shared by every contender.

    Call :meth:`start` right before the first training step and :meth:`check` at every
    iteration boundary (after an update); ``check`` returns True when the run must stop.
    """

    def __init__(self, args: argparse.Namespace, evaluator: Evaluator, result: RunResult,
                 max_steps: int) -> None:
        self.every = args.eval_every
        self.target = args.target
        self.max_seconds = args.max_seconds
        self.max_steps = max_steps
        self.evaluator = evaluator
        self.r = result
        self.next_eval = self.every
        self.t0: float | None = None
        self.eval_s = 0.0
        self.done = False

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def train_seconds(self) -> float:
        assert self.t0 is not None
        return time.perf_counter() - self.t0 - self.eval_s

    def check(self, steps: int, act: Act) -> bool:
        if self.done:
            return True
        train_s = self.train_seconds()
        self.r.steps, self.r.train_seconds = int(steps), train_s
        self.r.steps_per_second = steps / train_s if train_s > 0 else None
        if steps >= self.next_eval:
            t = time.perf_counter()
            returns = self.evaluator(act)
            dt = time.perf_counter() - t
            self.eval_s += dt
            self.r.eval_seconds = self.eval_s
            mean = float(returns.mean())
            self.r.evaluations.append({"steps": int(steps), "trainSeconds": round(train_s, 4),
                                       "meanReturn": mean, "minReturn": float(returns.min()),
                                       "evalSeconds": round(dt, 4)})
            while self.next_eval <= steps:
                self.next_eval += self.every
            if mean >= self.target:
                self.r.solved = True
                self.r.time_to_solve_s = train_s
                self.r.steps_to_solve = int(steps)
                self.r.stop_reason = "solved"
                self.done = True
                return True
        if train_s >= self.max_seconds:
            self.r.stop_reason = f"max-seconds ({self.max_seconds:g} s)"
            self.done = True
        elif steps >= self.max_steps:
            self.r.stop_reason = f"max-steps ({self.max_steps})"
            self.done = True
        return self.done


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def torch_act(fn: Callable[[torch.Tensor], torch.Tensor]) -> Act:
    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return fn(torch.as_tensor(obs, dtype=torch.float32)).cpu().numpy()
    return act


# --------------------------------------------------------------------------- contenders


def sb3_hook(p: Protocol) -> Any:
    """An SB3 callback that runs the protocol: the clock starts with training, and each
    rollout start (that is, after the previous update or training phase) is a check."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Hook(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.stop = False

        def _act(self, obs: np.ndarray) -> np.ndarray:
            return self.model.predict(obs, deterministic=True)[0]

        def _on_training_start(self) -> None:
            p.start()

        def _on_rollout_start(self) -> None:
            if self.model.num_timesteps > 0:
                self.stop = p.check(self.model.num_timesteps, self._act)

        def _on_step(self) -> bool:
            return not self.stop

        def _on_training_end(self) -> None:
            p.check(self.model.num_timesteps, self._act)

    return Hook()


def drive(trainer: Any, p: Protocol, max_iterations: int | None = None) -> None:
    """Run one of our trainers under the protocol (a check after every iteration), until
    the protocol stops it or ``max_iterations`` (PPO's LR schedule) are done."""
    act = torch_act(trainer.agent.act_greedy)
    p.start()
    try:
        while True:
            trainer.train_iteration()
            if p.check(trainer.global_step, act):
                break
            if max_iterations is not None and trainer.iteration >= max_iterations:
                p.r.stop_reason = f"max-steps ({trainer.global_step}, {max_iterations} iterations)"
                break
    finally:
        trainer.envs.close()


def run_sb3_ppo(args: argparse.Namespace, seed: int, p: Protocol) -> None:
    try:
        from stable_baselines3 import PPO as SB3PPO
        from stable_baselines3.common.env_util import make_vec_env
    except ImportError as err:
        raise Skip(f"stable-baselines3 is not installed ({err}); use .venv-bench") from None

    total = args.ppo_total_timesteps
    envs = make_vec_env(ENV_ID, n_envs=PPO["num_envs"], seed=seed)
    model = SB3PPO(
        "MlpPolicy", envs, learning_rate=lambda progress: progress * PPO["learning_rate"],
        n_steps=PPO["num_steps"], batch_size=PPO["num_envs"] * PPO["num_steps"] // PPO["num_minibatches"],
        n_epochs=PPO["update_epochs"], gamma=PPO["gamma"], gae_lambda=PPO["gae_lambda"],
        clip_range=PPO["clip_coef"], clip_range_vf=PPO["clip_coef"], ent_coef=PPO["ent_coef"],
        vf_coef=PPO["vf_coef"], max_grad_norm=PPO["max_grad_norm"],
        policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh),
        seed=seed, device="cpu", verbose=0)
    p.r.config = {"numEnvs": PPO["num_envs"], "numSteps": PPO["num_steps"], "batch": 512,
                  "minibatch": 128, "epochs": 4, "vecEnv": "DummyVecEnv", "lrHorizon": total}
    model.learn(total_timesteps=total, callback=sb3_hook(p))
    envs.close()


def _rlops_ppo(args: argparse.Namespace, seed: int, p: Protocol, torch_path: bool) -> None:
    from rl_engine.ppo import PPOConfig, PPOTrainer

    device = torch.device("cpu")
    if torch_path:
        try:
            from rl_engine.torch_envs import TorchCartPole
        except ImportError as err:
            raise Skip(f"rl_engine.torch_envs is not importable yet ({err})") from None
        num_envs, num_steps = args.torch_num_envs, args.torch_num_steps
        envs = TorchCartPole(num_envs, device)
    else:
        from rl_engine.envs import make_vector_env

        num_envs, num_steps = PPO["num_envs"], PPO["num_steps"]
        envs = make_vector_env(lambda: gymnasium.make(ENV_ID, disable_env_checker=True), num_envs)
    cfg = PPOConfig(
        learning_rate=PPO["learning_rate"], num_steps=num_steps, gamma=PPO["gamma"],
        gae_lambda=PPO["gae_lambda"], clip_coef=PPO["clip_coef"], ent_coef=PPO["ent_coef"],
        vf_coef=PPO["vf_coef"], max_grad_norm=PPO["max_grad_norm"],
        update_epochs=PPO["update_epochs"], num_minibatches=PPO["num_minibatches"])
    batch = num_envs * num_steps
    num_iterations = max(1, args.ppo_total_timesteps // batch)
    seed_everything(seed)
    trainer = PPOTrainer(envs, cfg, num_iterations, seed, device)
    p.r.config = {"numEnvs": num_envs, "numSteps": num_steps, "batch": batch,
                  "minibatch": batch // cfg.num_minibatches, "epochs": cfg.update_epochs,
                  "vecEnv": type(envs).__name__, "lrHorizon": num_iterations * batch}
    drive(trainer, p, num_iterations)


def run_rlops_ppo(args, seed, p):
    _rlops_ppo(args, seed, p, torch_path=False)


def run_rlops_ppo_torch(args, seed, p):
    _rlops_ppo(args, seed, p, torch_path=True)


def run_cleanrl_ppo(args: argparse.Namespace, seed: int, p: Protocol) -> None:
    try:
        spec = importlib.util.find_spec("cleanrl.ppo")  # cleanrl is a namespace package
    except ImportError:
        spec = None
    if spec is None or not spec.origin:
        raise Skip("cleanrl is not installed (hack/setup-bench-venv.sh installs cleanrl 1.2.0)")
    script = spec.origin
    try:
        import gym
    except ImportError as err:
        raise Skip(f"CleanRL's ppo.py needs gym 0.23.1, not importable ({err})") from None

    original = gym.vector.SyncVectorEnv
    state: dict[str, Any] = {"steps": 0, "agent": None, "script": {}}

    def act(obs: np.ndarray) -> np.ndarray:
        agent = state["agent"]
        with torch.no_grad():
            return agent.actor(torch.as_tensor(obs, dtype=torch.float32)).argmax(-1).numpy()

    class HookedSyncVectorEnv(original):  # type: ignore[misc, valid-type]
        def step(self, actions):  # noqa: ANN001
            if state["agent"] is None:
                state["script"] = sys._getframe(1).f_globals  # the script's globals
                state["agent"] = state["script"]["agent"]
                p.start()
            elif state["steps"] % batch == 0 and p.check(state["steps"], act):
                raise StopTraining
            state["steps"] += self.num_envs
            return super().step(actions)

    batch = PPO["num_envs"] * PPO["num_steps"]
    argv = [script, "--seed", str(seed), "--env-id", ENV_ID, "--cuda", "False",
            "--total-timesteps", str(args.ppo_total_timesteps),
            "--num-envs", str(PPO["num_envs"]), "--num-steps", str(PPO["num_steps"])]
    p.r.config = {"numEnvs": 4, "numSteps": 128, "batch": batch, "minibatch": 128, "epochs": 4,
                  "vecEnv": "gym 0.23.1 SyncVectorEnv", "lrHorizon": args.ppo_total_timesteps,
                  "argv": argv[1:]}
    old_argv, old_cwd = sys.argv, os.getcwd()
    gym.vector.SyncVectorEnv = HookedSyncVectorEnv
    with tempfile.TemporaryDirectory(prefix="cleanrl-bench-") as tmp:
        try:
            sys.argv = argv
            os.chdir(tmp)  # runs/ (TensorBoard) lands here
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                try:
                    # gym 0.23.1 warns about its own deprecated env.seed() on every env.
                    warnings.filterwarnings("ignore", message=r".*env\.seed\(seed\)")
                    runpy.run_path(script, run_name="__main__")
                except StopTraining:
                    # Stopped mid-loop: close what the script would have closed at its end
                    # (its TensorBoard writer's thread would otherwise outlive the run).
                    for name in ("envs", "writer"):
                        obj = state["script"].get(name)
                        if obj is not None:
                            obj.close()
        finally:
            gym.vector.SyncVectorEnv = original
            sys.argv = old_argv
            os.chdir(old_cwd)
    if not p.done and state["agent"] is not None:
        p.check(state["steps"], act)  # the budget ended the script's own loop


def _dqn_exploration_fraction(max_steps: int) -> float:
    # The zoo decays epsilon over 0.16 x 50k = 8,000 steps; keep that length whatever the cap.
    return DQN["exploration_fraction"] * DQN["zoo_timesteps"] / max_steps


def run_sb3_dqn(args: argparse.Namespace, seed: int, p: Protocol) -> None:
    try:
        from stable_baselines3 import DQN as SB3DQN
        from stable_baselines3.common.env_util import make_vec_env
    except ImportError as err:
        raise Skip(f"stable-baselines3 is not installed ({err}); use .venv-bench") from None

    total = args.dqn_max_steps
    envs = make_vec_env(ENV_ID, n_envs=1, seed=seed)
    model = SB3DQN(
        "MlpPolicy", envs, learning_rate=DQN["learning_rate"], batch_size=DQN["batch_size"],
        buffer_size=DQN["buffer_size"], learning_starts=DQN["learning_starts"],
        gamma=DQN["gamma"], target_update_interval=DQN["target_update_interval"],
        train_freq=DQN["train_freq"], gradient_steps=DQN["gradient_steps"],
        exploration_fraction=_dqn_exploration_fraction(total),
        exploration_final_eps=DQN["exploration_final_eps"], max_grad_norm=DQN["max_grad_norm"],
        policy_kwargs=dict(net_arch=list(DQN["net"])), seed=seed, device="cpu", verbose=0)
    p.r.config = {"numEnvs": 1, "trainFreq": 256, "gradientSteps": 128, "batch": 64,
                  "epsilonDecaySteps": int(DQN["exploration_fraction"] * DQN["zoo_timesteps"])}
    model.learn(total_timesteps=total, callback=sb3_hook(p))
    envs.close()


def run_rlops_dqn(args: argparse.Namespace, seed: int, p: Protocol) -> None:
    try:
        from rl_engine.dqn import DQNConfig, DQNTrainer
    except ImportError as err:
        raise Skip(f"rl_engine.dqn is not importable yet ({err})") from None
    from rl_engine.envs import make_vector_env

    total = args.dqn_max_steps
    cfg = DQNConfig(
        learning_rate=DQN["learning_rate"], buffer_size=DQN["buffer_size"],
        learning_starts=DQN["learning_starts"], batch_size=DQN["batch_size"],
        gamma=DQN["gamma"], tau=1.0, target_network_frequency=DQN["target_update_interval"],
        train_frequency=DQN["train_freq"], gradient_steps=DQN["gradient_steps"],
        exploration_fraction=_dqn_exploration_fraction(total), start_e=1.0,
        end_e=DQN["exploration_final_eps"], max_grad_norm=DQN["max_grad_norm"],
        double_dqn=False, huber_delta=1.0, hidden_sizes=tuple(DQN["net"]),
        steps_per_iteration=DQN["train_freq"])
    envs = make_vector_env(lambda: gymnasium.make(ENV_ID, disable_env_checker=True), 1)
    seed_everything(seed)
    trainer = DQNTrainer(envs, cfg, total, seed, torch.device("cpu"))
    p.r.config = {"numEnvs": 1, "trainFreq": 256, "gradientSteps": 128, "batch": 64,
                  "epsilonDecaySteps": int(DQN["exploration_fraction"] * DQN["zoo_timesteps"]),
                  "vecEnv": "SyncVectorEnv"}
    drive(trainer, p)


RUNNERS = {"sb3-ppo": run_sb3_ppo, "cleanrl-ppo": run_cleanrl_ppo, "rlops-ppo": run_rlops_ppo,
           "rlops-ppo-torch": run_rlops_ppo_torch, "sb3-dqn": run_sb3_dqn,
           "rlops-dqn": run_rlops_dqn}


# --------------------------------------------------------------------------- reporting


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(results: list[RunResult], contenders: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in contenders:
        runs = [r for r in results if r.contender == name and r.error is None]
        if not runs:
            continue
        # Unsolved runs count as infinitely slow, so the median is honest about failures.
        tts = [r.time_to_solve_s if r.solved else math.inf for r in runs]
        sts = [r.steps_to_solve if r.solved else math.inf for r in runs]
        sps = [r.steps_per_second for r in runs if r.steps_per_second]
        out[name] = {"runs": len(runs), "solved": sum(r.solved for r in runs),
                     "medianTimeToSolve": _median(tts), "medianStepsToSolve": _median(sts),
                     "medianStepsPerSecond": _median(sps), "config": runs[0].config}
    return out


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "not solved"
    return format(x, spec)


def ratio_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = []

    def sps(a: str, b: str) -> None:
        if a in summary and b in summary:
            x, y = summary[a]["medianStepsPerSecond"], summary[b]["medianStepsPerSecond"]
            if x and y:
                lines.append(f"{a} steps/s = {x / y:.2f} x {b}")

    def tts(a: str, b: str) -> None:
        if a in summary and b in summary:
            x, y = summary[a]["medianTimeToSolve"], summary[b]["medianTimeToSolve"]
            if x is None or y is None:
                return
            if math.isinf(x) or math.isinf(y):
                lines.append(f"time to solve {a} / {b} = n/a ({a}: {_fmt(x, '.1f')}, "
                             f"{b}: {_fmt(y, '.1f')})")
            else:
                lines.append(f"time to solve {a} / {b} = {x / y:.2f}")

    for ours in ("rlops-ppo", "rlops-ppo-torch"):
        for ref in ("sb3-ppo", "cleanrl-ppo"):
            sps(ours, ref)
    for ours in ("rlops-ppo", "rlops-ppo-torch"):
        for ref in ("sb3-ppo", "cleanrl-ppo"):
            tts(ours, ref)
    sps("rlops-dqn", "sb3-dqn")
    tts("rlops-dqn", "sb3-dqn")
    return lines


def table(summary: dict[str, dict[str, Any]]) -> str:
    rows = ["| contender | config | seeds solved | median time to solve (s) | median steps to solve "
            "| median steps/s |", "| --- | --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        c = s["config"]
        conf = f"{c.get('numEnvs')} envs"
        if "numSteps" in c:
            conf += f" x {c['numSteps']} steps"
        rows.append(f"| {name} | {conf} | {s['solved']}/{s['runs']} | "
                    f"{_fmt(s['medianTimeToSolve'], '.1f')} | "
                    f"{_fmt(s['medianStepsToSolve'], '.0f')} | "
                    f"{_fmt(s['medianStepsPerSecond'], '.0f')} |")
    return "\n".join(rows)


def _finite(obj: Any) -> Any:
    """JSON has no infinity: unsolved medians become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isinf(obj):
        return None
    return obj


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "gymnasium": gymnasium.__version__, "numpy": np.__version__}
    for mod in ("stable_baselines3", "gym"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    try:
        from importlib import metadata
        out["cleanrl"] = metadata.version("cleanrl")
    except Exception:  # noqa: BLE001
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--dqn-seeds", type=int, nargs="+",
                    help="seeds for the DQN contenders (default: --seeds); DQN runs take ~10x longer")
    ap.add_argument("--contenders", nargs="+", default=ALL_CONTENDERS, choices=ALL_CONTENDERS)
    ap.add_argument("--eval-every", type=int, default=10_240, help="env steps between evaluations")
    ap.add_argument("--eval-episodes", type=int, default=10)
    ap.add_argument("--eval-seed", type=int, default=10_000,
                    help="evaluation episode i is reset with seed eval_seed + i")
    ap.add_argument("--target", type=float, default=475.0, help="solved: eval mean return >= this")
    ap.add_argument("--max-seconds", type=float, default=180.0,
                    help="training-time cap per run (evaluation excluded)")
    ap.add_argument("--ppo-total-timesteps", type=int, default=500_000,
                    help="PPO step cap and LR-annealing horizon (CleanRL's total_timesteps)")
    ap.add_argument("--dqn-max-steps", type=int, default=100_000,
                    help="DQN step cap (epsilon still decays over the zoo's 8,000 steps)")
    ap.add_argument("--torch-num-envs", type=int, default=64)
    ap.add_argument("--torch-num-steps", type=int, default=16,
                    help="rollout length of rlops-ppo-torch (batch = envs x steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for everyone")
    ap.add_argument("--json", help="write every per-seed result and the summary here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    evaluator = Evaluator(args.eval_episodes, args.eval_seed)
    load0 = os.getloadavg()
    log(f"train bench: contenders={args.contenders} seeds={args.seeds} torch threads="
        f"{torch.get_num_threads()} load={load0[0]:.2f} versions={versions()}")
    results: list[RunResult] = []
    skipped: dict[str, str] = {}
    t_all = time.perf_counter()
    dqn_seeds = args.dqn_seeds if args.dqn_seeds is not None else args.seeds
    for seed in sorted(set(args.seeds) | set(dqn_seeds)):
        for name in args.contenders:
            is_dqn = name.endswith("dqn")
            if name in skipped or seed not in (dqn_seeds if is_dqn else args.seeds):
                continue
            r = RunResult(name, seed, {})
            p = Protocol(args, evaluator, r,
                         args.dqn_max_steps if is_dqn else args.ppo_total_timesteps)
            log(f"seed {seed}: {name} start (load {os.getloadavg()[0]:.2f})")
            t = time.perf_counter()
            try:
                RUNNERS[name](args, seed, p)
            except Skip as why:
                skipped[name] = str(why)
                log(f"{name}: SKIPPED: {why}")
                continue
            except Exception as err:  # noqa: BLE001 - report, keep benchmarking the others
                r.error = f"{type(err).__name__}: {err}"
                log(f"{name} seed {seed}: ERROR {r.error}\n{traceback.format_exc()}")
            r.wall_seconds = time.perf_counter() - t
            results.append(r)
            if r.error is None:
                log(f"seed {seed}: {name} end: {r.stop_reason or 'stopped'}; steps {r.steps}, "
                    f"train {r.train_seconds:.1f} s, {r.steps_per_second or 0:.0f} steps/s, "
                    f"time to solve {_fmt(r.time_to_solve_s, '.1f')} s, eval {r.eval_seconds:.1f} s, "
                    f"evals {[round(e['meanReturn']) for e in r.evaluations]}; torch threads "
                    f"{torch.get_num_threads()}")
    load1 = os.getloadavg()

    summary = summarize(results, args.contenders)
    print(f"CartPole-v1, PPO seeds {args.seeds}, DQN seeds {dqn_seeds}, eval every {args.eval_every} steps "
          f"({args.eval_episodes} deterministic episodes, target {args.target:g}), "
          f"torch threads {args.threads}, {os.cpu_count()} CPUs, load average "
          f"{load0[0]:.2f} -> {load1[0]:.2f}, {time.perf_counter() - t_all:.0f} s total")
    print(table(summary))
    print()
    for line in ratio_lines(summary):
        print(line)
    for name, why in skipped.items():
        print(f"{name}: skipped: {why}")
    for r in results:
        if r.error:
            print(f"{r.contender} seed {r.seed}: error: {r.error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "versions": versions(), "cpus": os.cpu_count(),
                       "loadAverage": {"start": load0, "end": load1}, "skipped": skipped,
                       "summary": _finite(summary), "ratios": ratio_lines(summary),
                       "runs": [asdict(r) for r in results]}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
