"""Training-pod entrypoint: ``python -m rl_engine.train``.

Inputs:
    * run config (JSON/YAML): ``--config PATH``, else env ``RLOPS_RUN_CONFIG`` (JSON).
    * artifact URI: ``--artifact-uri URI``, else env ``RLOPS_ARTIFACT_URI``.
    * termination-message path: env ``RLOPS_TERMINATION_MESSAGE_PATH``
      (default ``/dev/termination-log``).
    * optional env ``RLOPS_TORCH_THREADS``: CPU threads for torch (default 1; the default
      networks are tiny and one thread is fastest).

Exit codes: 0 success, 1 ``TrainerError``, 2 ``InvalidConfig``, 3 ``NonFiniteLoss``.
See ``docs/trainer.md`` for the artifact layout and the termination-message contract.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import random
import sys
import time
import traceback
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
import yaml

from . import __version__, trajectories
from .artifacts import (
    FINGERPRINT_FILE,
    FINGERPRINT_VERSION,
    ArtifactError,
    ArtifactStore,
    canonical_json,
    read_artifact,
)
from .config import DQNHyperparameters, RunConfig, load_run_config
from .dqn import DQNConfig, DQNTrainer
from .envs import accepts_keyword, make_vector_env, resolve_env_factory, space_description
from .errors import InvalidConfig, TrainerFailure
from .evaluation import (
    EpisodeResults,
    baseline_policy,
    has_baseline,
    improvement,
    random_policy,
    run_episodes,
)
from .networks import policy_spec
from .ppo import PPOConfig, PPOTrainer, greedy_policy
from .telemetry import TrainingTelemetry
from .termination import write_termination_message

__all__ = ["main", "run_training", "TrainingResult"]

Log = Callable[[str], None]


def _log(line: str) -> None:
    print(line, flush=True)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


_CONFIRM_STREAM = 1_000_000
_MIN_CONFIRM_EPISODES = 100


def _predictive_lower_bound(returns: np.ndarray, future_episodes: int) -> float:
    """Lower bound of the mean return a fresh ``future_episodes``-episode evaluation will
    show, from the ``n`` observed ``returns``: ``mean - 2 * s * sqrt(1/n + 1/future)``
    (``s`` = sample std, ddof=1; a ~97.5% one-sided normal prediction bound)."""
    n = len(returns)
    if n < 2:
        return float(np.mean(returns))
    spread = np.std(returns, ddof=1) * np.sqrt(1.0 / n + 1.0 / max(future_episodes, 1))
    return float(np.mean(returns) - 2.0 * spread)


def _eval_seeds(seed: int, stream: int, count: int) -> list[int]:
    """Reset seeds for an evaluation: stream 0 = final evaluation, k >= 1 = k-th periodic."""
    return [int(s) for s in np.random.SeedSequence([seed, 7919, stream]).generate_state(count)]


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


class TrainingResult(dict):
    """The success termination payload (a dict), see :func:`run_training`."""


class _Stage:
    """Names the step in progress, for ``TrainerError`` messages."""

    def __init__(self) -> None:
        self.name = "starting"


def _ppo_config(cfg: RunConfig) -> PPOConfig:
    hp = cfg.algorithm.hyperparameters
    return PPOConfig(
        learning_rate=hp.learning_rate,
        num_steps=hp.num_steps,
        gamma=hp.gamma,
        gae_lambda=hp.gae_lambda,
        clip_coef=hp.clip_coef,
        ent_coef=hp.ent_coef,
        vf_coef=hp.vf_coef,
        max_grad_norm=hp.max_grad_norm,
        update_epochs=hp.update_epochs,
        num_minibatches=hp.num_minibatches,
        anneal_lr=hp.anneal_lr,
        norm_adv=hp.norm_adv,
        clip_vloss=hp.clip_vloss,
        target_kl=hp.target_kl,
        hidden_sizes=tuple(hp.hidden_sizes),
        hicra=hp.hicra,
    )


def _dqn_config(cfg: RunConfig) -> DQNConfig:
    hp = cfg.algorithm.hyperparameters
    fields = hp.model_dump(by_alias=False)
    fields["hidden_sizes"] = tuple(fields["hidden_sizes"])
    return DQNConfig(**fields)


def select_device(choice: str) -> torch.device:
    """``training.device``: ``auto`` = CUDA when ``torch.cuda.is_available()``, else CPU.

    Raises:
        InvalidConfig: ``cuda`` was asked for on a machine without CUDA.
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise InvalidConfig("training.device: cuda was requested but torch.cuda.is_available() "
                            "is False on this node")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _make_envs(cfg: RunConfig, factory: Callable[[], gym.Env], device: torch.device) -> Any:
    env = cfg.environment
    if env.backend == "torch":
        from .torch_envs import make_torch_env

        return make_torch_env(env.id, env.num_envs, device, **env.kwargs)
    return make_vector_env(factory, env.num_envs)


def _make_trainer(cfg: RunConfig, envs: Any, device: torch.device) -> Any:
    seed = cfg.training.seed
    if isinstance(cfg.algorithm.hyperparameters, DQNHyperparameters):
        return DQNTrainer(envs, _dqn_config(cfg), cfg.training.total_timesteps, seed, device)
    ppo = _ppo_config(cfg)
    if ppo.hicra is not None:
        from .hicra import build_hicra_from_dict

        build_hicra_from_dict(ppo.hicra, path="algorithm.hyperparameters.hicra")
    return PPOTrainer(envs, ppo, cfg.num_iterations, seed, device)


def _iteration_scalars(st: Any) -> dict[str, float | None]:
    """The per-iteration numbers for the log line and telemetry (snake_case keys)."""
    keys = ("mean_episodic_return", "mean_episodic_length", "steps_per_second",
            "learning_rate", "policy_loss", "value_loss", "entropy", "approx_kl",
            "clip_fraction", "explained_variance", "epsilon", "td_loss", "q_value")
    return {k: getattr(st, k) for k in keys if hasattr(st, k)}


_LOG_FORMAT = (("mean_episodic_return", "return", ".1f"), ("mean_episodic_length", "len", ".1f"),
               ("policy_loss", "pg_loss", ".4f"), ("value_loss", "v_loss", ".4f"),
               ("entropy", "entropy", ".4f"), ("approx_kl", "kl", ".5f"),
               ("clip_fraction", "clipfrac", ".3f"), ("explained_variance", "ev", ".3f"),
               ("epsilon", "eps", ".3f"), ("td_loss", "td_loss", ".4f"),
               ("q_value", "q", ".2f"), ("learning_rate", "lr", ".3g"))


def _iteration_line(st: Any, num_iterations: int, elapsed: float) -> str:
    scalars = _iteration_scalars(st)
    parts = [f"iter {st.iteration}/{num_iterations} step {st.global_step} "
             f"sps {st.steps_per_second:.0f} avg_sps {st.global_step / max(elapsed, 1e-9):.0f}"]
    parts += [f"{label} {_fmt(scalars[key], spec)}" for key, label, spec in _LOG_FORMAT
              if key in scalars]
    return " ".join(parts)


def _successes(trainer: Any, st: Any, target: float | None) -> int | None:
    """Successful episodes of the last iteration: the env's ``is_success`` where it reports
    it, else (with a target) episodes whose return reached ``training.targetReturn``."""
    if trainer.last_rollout_successes is not None:
        return trainer.last_rollout_successes
    if target is None or not trainer.last_rollout_returns:
        return None
    return sum(1 for r in trainer.last_rollout_returns if r >= target)


def _evaluation_record(res: EpisodeResults) -> dict[str, Any]:
    return {
        **res.summary(),
        "seconds": res.seconds,
        "episodeReturns": [float(r) for r in res.returns],
        "episodeLengths": [int(n) for n in res.lengths],
        "seeds": res.seeds,
    }


def run_training(
    cfg: RunConfig, artifact_uri: str, log: Log = _log, stage: _Stage | None = None
) -> TrainingResult:
    """Train, evaluate and write the artifact for a validated run config.

    Args:
        cfg: validated run config.
        artifact_uri: fsspec URI of the artifact directory.
        log: line logger (stdout, flushed, by default).
        stage: updated with the step in progress (for error messages).

    Returns:
        The success termination payload: ``phase``, ``metrics`` (``meanReturn``,
        ``stdReturn``, ``episodes``, ``randomMeanReturn``, ``timesteps``,
        ``trainingSeconds``, ``stepsPerSecond``), ``artifactURI``, ``fingerprint``.

    Raises:
        InvalidConfig: bad environment or artifact URI.
        NonFiniteLoss: NaN/inf during an update.
    """
    stage = stage or _Stage()
    started_at = _utc_now()
    t_start = time.perf_counter()

    stage.name = "opening the artifact URI"
    try:
        store = ArtifactStore(artifact_uri)
    except ArtifactError as err:
        raise InvalidConfig(f"artifactURI: {err}") from None

    stage.name = "setting up torch"
    device = select_device(cfg.training.device)
    threads = None
    if device.type == "cpu":
        threads = int(os.environ.get("RLOPS_TORCH_THREADS", "1"))
        torch.set_num_threads(max(1, threads))
    seed = cfg.training.seed
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    algorithm = cfg.algorithm.name

    log(
        f"rlops trainer {__version__}: device={device} torch={torch.__version__} "
        f"gymnasium={gym.__version__} threads={threads or 'n/a'} "
        f"run={cfg.namespace}/{cfg.run} agent={cfg.agent} artifactURI={artifact_uri} "
        f"config={json.dumps(cfg.snapshot(), separators=(',', ':'))}"
    )

    stage.name = f"reading the trajectories ({trajectories.ENV_VAR})"
    source = trajectories.source_from_env()
    logged = trajectories.read(source, log) if source is not None else None
    extra: dict[str, Any] = {}
    if logged is not None:
        if not logged.records:
            log("trajectories: none valid in the range: training on the environment's own tasks")
        elif cfg.environment.backend == "gymnasium" and accepts_keyword(cfg.environment.id, "trajectories"):
            extra["trajectories"] = logged.records
            logged.trained_on = True
        else:
            log(f"trajectories: {cfg.environment.id} ({cfg.environment.backend} backend) takes no trajectories: "
                "training on the environment's own tasks")

    stage.name = "building the environment (environment.id)"
    # Evaluation always steps the Gymnasium environment (the reference implementation),
    # also when training uses the torch-batched one.
    factory = resolve_env_factory(cfg.environment, extra)
    envs = _make_envs(cfg, factory, device)
    telemetry = TrainingTelemetry.from_env(
        run=f"{cfg.namespace}/{cfg.run}", algorithm=algorithm, env_id=cfg.environment.id,
        total_timesteps=cfg.training.total_timesteps, log=log,
    )
    try:
        trainer = _make_trainer(cfg, envs, device)
        num_iterations = cfg.num_iterations
        eval_episodes = cfg.evaluation.episodes
        max_ep_steps = cfg.evaluation.max_episode_steps
        target = cfg.training.target_return
        policy = greedy_policy(trainer.agent, device)

        iterations: list[dict[str, Any]] = []
        evaluations: list[dict[str, Any]] = []
        last_eval_step = 0
        target_reached = False
        periodic_eval_seconds = 0.0
        setup_seconds = time.perf_counter() - t_start
        log(
            f"training {algorithm} on {cfg.environment.id} ({cfg.environment.backend} "
            f"backend): {cfg.environment.num_envs} envs, {trainer.batch_size} env steps per "
            f"iteration, {num_iterations} iterations, {num_iterations * trainer.batch_size} "
            f"timesteps, target {_fmt(target)} (setup {setup_seconds:.2f}s)"
        )

        t_train = time.perf_counter()
        with telemetry.run_span():
            for _ in range(num_iterations):
                stage.name = f"training (iteration {trainer.iteration + 1}/{num_iterations})"
                with telemetry.iteration(trainer.iteration + 1):
                    st = trainer.train_iteration()
                    elapsed = time.perf_counter() - t_train
                    iterations.append({**st.to_json(), "elapsedSeconds": elapsed})
                    telemetry.record_iteration(
                        st.iteration, st.global_step, _iteration_scalars(st),
                        episodes=st.episodes_finished,
                        successes=_successes(trainer, st, target),
                    )
                log(_iteration_line(st, num_iterations, elapsed))
                if trainer.global_step - last_eval_step < cfg.training.eval_interval:
                    continue
                stage.name = f"periodic evaluation at step {trainer.global_step}"
                last_eval_step = trainer.global_step
                k = len(evaluations) + 1
                res = run_episodes(
                    factory, policy, _eval_seeds(seed, k, eval_episodes),
                    max_episode_steps=max_ep_steps,
                )
                periodic_eval_seconds += res.seconds
                s = res.summary()
                telemetry.record_evaluation(trainer.global_step, s["meanReturn"],
                                            s["stdReturn"], s["successRate"])
                passed = target is not None and s["meanReturn"] >= target
                log(
                    f"eval {k} at step {trainer.global_step}: mean_return "
                    f"{s['meanReturn']:.2f} +- {s['stdReturn']:.2f} (min {s['minReturn']:.1f}, "
                    f"max {s['maxReturn']:.1f}, mean_len {s['meanLength']:.1f}, "
                    + (f"success_rate {s['successRate']:.2f}, " if s["successRate"] is not None
                       else "")
                    + f"{s['episodes']} episodes, {res.seconds:.2f}s)"
                    + (f" >= target {target:g}, confirming on fresh seeds" if passed else "")
                )
                record = {
                    "index": k,
                    "iteration": trainer.iteration,
                    "globalStep": trainer.global_step,
                    **_evaluation_record(res),
                }
                reached = False
                if passed:
                    # A 20-episode pass is noisy: a policy that still fails from ~20% of
                    # start states passes it now and then. Confirm on fresh seeds and
                    # stop only if the final evaluation is predicted to pass as well.
                    confirm_seeds = _eval_seeds(
                        seed, _CONFIRM_STREAM + k, max(_MIN_CONFIRM_EPISODES, eval_episodes)
                    )
                    conf = run_episodes(
                        factory, policy, confirm_seeds, max_episode_steps=max_ep_steps
                    )
                    periodic_eval_seconds += conf.seconds
                    cs = conf.summary()
                    pooled = np.concatenate([res.returns, conf.returns])
                    bound = _predictive_lower_bound(pooled, eval_episodes)
                    reached = bound >= target
                    record["confirmation"] = _evaluation_record(conf)
                    record["predictedLowerBound"] = bound
                    log(
                        f"eval {k} confirmation: mean_return {cs['meanReturn']:.2f} +- "
                        f"{cs['stdReturn']:.2f} (min {cs['minReturn']:.1f}, {cs['episodes']} "
                        f"episodes, {conf.seconds:.2f}s); predicted lower bound {bound:.2f}"
                        + (": target reached, stopping early" if reached else ": not confirmed")
                    )
                record["targetReached"] = reached
                record["elapsedSeconds"] = time.perf_counter() - t_train
                evaluations.append(record)
                if reached:
                    target_reached = True
                    break
        training_seconds = time.perf_counter() - t_train
    finally:
        envs.close()
        telemetry.close()

    timesteps = trainer.global_step
    sps = timesteps / max(training_seconds, 1e-9)
    log(
        f"training finished: {timesteps} timesteps, {trainer.iteration} iterations in "
        f"{training_seconds:.2f}s ({sps:.0f} steps/s, periodic evaluation "
        f"{periodic_eval_seconds:.2f}s)"
    )

    stage.name = "final evaluation"
    final_seeds = _eval_seeds(seed, 0, eval_episodes)
    final = run_episodes(factory, policy, final_seeds, max_episode_steps=max_ep_steps)
    stage.name = "random-policy baseline evaluation"
    random_res = run_episodes(factory, random_policy, final_seeds, max_episode_steps=max_ep_steps)
    env_baseline: EpisodeResults | None = None
    probe = factory()
    try:
        with_baseline = has_baseline(probe)
        baseline_name = getattr(probe.unwrapped, "baseline_name", "baseline")
    finally:
        probe.close()
    if with_baseline:
        stage.name = "environment-baseline evaluation"
        env_baseline = run_episodes(factory, baseline_policy, final_seeds,
                                    max_episode_steps=max_ep_steps)
    fs, rs = final.summary(), random_res.summary()
    summary = {
        **fs,
        "randomMeanReturn": rs["meanReturn"],
        "randomStdReturn": rs["stdReturn"],
        "improvementOverRandom": improvement(fs["meanReturn"], rs["meanReturn"]),
        "deterministic": True,
        "targetReturn": target,
        "targetReached": bool(target is not None and fs["meanReturn"] >= target),
    }
    baseline_text = ""
    if env_baseline is not None:
        es = env_baseline.summary()
        summary.update({
            "baselineName": baseline_name,
            "baselineMeanReturn": es["meanReturn"],
            "baselineStdReturn": es["stdReturn"],
            "baselineSuccessRate": es["successRate"],
            "improvementOverBaseline": improvement(fs["meanReturn"], es["meanReturn"]),
        })
        baseline_text = (f"; baseline {baseline_name} mean_return {es['meanReturn']:.2f} +- "
                         f"{es['stdReturn']:.2f}")
    log(
        f"final evaluation: mean_return {fs['meanReturn']:.2f} +- {fs['stdReturn']:.2f} "
        f"(min {fs['minReturn']:.1f}, max {fs['maxReturn']:.1f}, mean_len "
        f"{fs['meanLength']:.1f}, "
        + (f"success_rate {fs['successRate']:.2f}, " if fs["successRate"] is not None else "")
        + f"{fs['episodes']} episodes, {final.seconds:.2f}s); random policy mean_return "
        f"{rs['meanReturn']:.2f} +- {rs['stdReturn']:.2f}{baseline_text}"
    )

    stage.name = "writing artifacts"
    store.makedirs()
    agent = trainer.agent
    buf = io.BytesIO()
    # clone: the PPO agent's parameters are views of one flat tensor (rl_engine.actor_critic)
    torch.save({k: v.detach().cpu().clone() for k, v in agent.state_dict().items()}, buf)
    store.write_bytes("model.pt", buf.getvalue())
    obs_space = envs.single_observation_space
    act_space = envs.single_action_space
    store.write_json("policy.json", {
        **policy_spec(agent),
        "stateDict": "model.pt",
        "observationShape": list(obs_space.shape),
        "actionSpace": space_description(act_space),
        "deterministicAction": "argmax of the network's action scores",
        "loader": "rl_engine.networks:load_agent",
    })
    store.write_bytes(
        "config_snapshot.yaml",
        yaml.safe_dump(cfg.snapshot(), sort_keys=False, default_flow_style=False).encode("utf-8"),
    )
    store.write_json(
        "training_history.json", {"iterations": iterations, "evaluations": evaluations}
    )
    store.write_json("evaluation.json", {
        "summary": summary,
        "deterministic": _evaluation_record(final),
        "randomBaseline": _evaluation_record(random_res),
        "environmentBaseline": None if env_baseline is None else _evaluation_record(env_baseline),
        "targetReachedDuringTraining": target_reached,
    })
    finished_at = _utc_now()
    store.write_json("metadata.json", {
        "run": cfg.run,
        "namespace": cfg.namespace,
        "agent": cfg.agent,
        "algorithm": cfg.algorithm.name,
        "environment": {
            "id": cfg.environment.id,
            "numEnvs": cfg.environment.num_envs,
            "observationSpace": space_description(obs_space),
            "actionSpace": space_description(act_space),
        },
        "observationShape": list(obs_space.shape),
        "actionShape": list(act_space.shape or ()),
        "numActions": int(act_space.n),
        "device": str(device),
        "torchThreads": threads,
        "seed": seed,
        "timesteps": timesteps,
        "iterations": trainer.iteration,
        "plannedIterations": num_iterations,
        "stoppedEarly": target_reached,
        "environmentBackend": cfg.environment.backend,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gymnasium": gym.__version__,
            "numpy": np.__version__,
            "rlEngine": __version__,
        },
        "timings": {
            "startedAt": started_at,
            "finishedAt": finished_at,
            "setupSeconds": setup_seconds,
            "trainingSeconds": training_seconds,
            "periodicEvaluationSeconds": periodic_eval_seconds,
            "finalEvaluationSeconds": final.seconds + random_res.seconds
            + (env_baseline.seconds if env_baseline is not None else 0.0),
            "stepsPerSecond": sps,
        },
        "files": {
            "model": "model.pt",
            "policy": "policy.json",
            "config": "config_snapshot.yaml",
            "history": "training_history.json",
            "evaluation": "evaluation.json",
            "fingerprint": FINGERPRINT_FILE,
        },
    })

    stage.name = "computing the fingerprint"
    # Read back once: the same code path (and bytes) the serving replica fingerprints.
    snapshot = read_artifact(artifact_uri)
    digests = dict(snapshot.digests)
    fingerprint = snapshot.fingerprint()
    stored_summary = snapshot.summary()
    store.write_json(FINGERPRINT_FILE, {
        "version": FINGERPRINT_VERSION,
        "fingerprint": fingerprint,
        "files": digests,
        "evaluationSummarySha256": hashlib.sha256(canonical_json(stored_summary)).hexdigest(),
    })
    log(f"artifact written to {artifact_uri}: {sorted(digests)} + {FINGERPRINT_FILE}; "
        f"fingerprint {fingerprint}; total {time.perf_counter() - t_start:.2f}s")

    return TrainingResult(
        phase="Succeeded",
        metrics={
            "meanReturn": fs["meanReturn"],
            "stdReturn": fs["stdReturn"],
            "episodes": fs["episodes"],
            "randomMeanReturn": rs["meanReturn"],
            **({"successRate": fs["successRate"]} if fs["successRate"] is not None else {}),
            **({"baselineMeanReturn": summary["baselineMeanReturn"]} if env_baseline else {}),
            "timesteps": timesteps,
            "trainingSeconds": round(training_seconds, 3),
            "stepsPerSecond": round(sps, 1),
        },
        artifactURI=artifact_uri,
        fingerprint=fingerprint,
        **({"trajectories": logged.summary()} if logged is not None else {}),
    )


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise InvalidConfig(f"command line: {message}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _ArgParser(prog="python -m rl_engine.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="run config file (JSON or YAML); default: $RLOPS_RUN_CONFIG")
    p.add_argument(
        "--artifact-uri", help="fsspec URI of the artifact dir; default: $RLOPS_ARTIFACT_URI"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the process exit code (see module docstring)."""
    stage = _Stage()
    try:
        stage.name = "parsing the command line"
        args = _parse_args(argv)
        stage.name = "loading the run config"
        cfg = load_run_config(args.config, os.environ.get("RLOPS_RUN_CONFIG"))
        uri = args.artifact_uri or os.environ.get("RLOPS_ARTIFACT_URI")
        if not uri:
            raise InvalidConfig("artifactURI: pass --artifact-uri or set RLOPS_ARTIFACT_URI")
        result = run_training(cfg, uri, stage=stage)
    except TrainerFailure as failure:
        payload = {"phase": "Failed", "reason": failure.reason, "message": failure.message}
        print(
            f"rlops trainer failed: {failure.reason}: {failure.message}",
            file=sys.stderr, flush=True,
        )
        if not write_termination_message(payload):
            print("warning: could not write the termination message", file=sys.stderr, flush=True)
        return failure.exit_code
    except Exception as err:  # noqa: BLE001 - every failure must produce a termination message
        message = f"{stage.name}: {type(err).__name__}: {err}"
        payload = {"phase": "Failed", "reason": "TrainerError", "message": message}
        traceback.print_exc(file=sys.stderr)
        print(f"rlops trainer failed: TrainerError: {message}", file=sys.stderr, flush=True)
        if not write_termination_message(payload):
            print("warning: could not write the termination message", file=sys.stderr, flush=True)
        return 1
    if not write_termination_message(dict(result)):
        print("warning: could not write the termination message", file=sys.stderr, flush=True)
    _log(f"succeeded: {json.dumps(result, separators=(',', ':'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
