"""``python -m rl_engine.evaluate``: the operator's own evaluation of a trained artifact.

The trainer reports its figures (mean return, fingerprint) in its termination message, but the
trainer runs the tenant's code: what an approver reads, and what auto-approval compares with its
thresholds, is measured here instead, in a Job that the operator makes once the trainer has
finished, from the engine image the platform pins (not the tenant's), with the artifact mounted
read only and a seed that the operator draws after training ended.

Input: the evaluation config, JSON, in ``$RLOPS_EVALUATION`` (or ``--config FILE``)::

    {"artifactURI": "file:///var/lib/rlops/artifacts/ml/cartpole/cartpole-1-1a2b3c4d",
     "fingerprint": "sha256:...",          # what the trainer reported
     "environment": {"id": "CartPole-v1", "kwargs": {}},   # the run's, from the operator
     "episodes": 20, "seed": 1234567, "maxEpisodeSteps": null}

What it does:

1. reads every file of the artifact once and computes the fingerprint from those bytes
   (:func:`rl_engine.policy.load_verified_policy`): other bytes than the trainer reported fail
   with ``FingerprintMismatch``;
2. builds the policy from the same bytes and the environment from the run's spec (never from the
   artifact's own config);
3. runs ``episodes`` deterministic (argmax) episodes from reset seeds drawn from ``seed``, then
   the random policy and, where the environment has one, its baseline policy on the same seeds.

Output: the termination message (under 4 KiB)::

    {"phase": "Succeeded", "fingerprint": "sha256:...", "seed": 1234567,
     "evaluation": {"meanReturn", "stdReturn", "minReturn", "maxReturn", "meanLength", "episodes",
                    "successRate", "randomMeanReturn", "randomStdReturn",
                    "baselineName"?, "baselineMeanReturn"?, "seconds"}}

or ``{"phase": "Failed", "reason": "FingerprintMismatch" | "InvalidArtifact" | "InvalidConfig" |
"EvaluatorError", "message": ...}`` with exit code 1 (2 for ``InvalidConfig``).

Returns are undiscounted episode returns in the environment's reward units; ``seconds`` is the
wall time of the three evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

import numpy as np

from rl_engine.artifacts import ArtifactError, FingerprintMismatch
from rl_engine.config import EnvironmentConfig
from rl_engine.envs import resolve_env_factory
from rl_engine.errors import InvalidConfig, TrainerFailure
from rl_engine.evaluation import baseline_policy, has_baseline, random_policy, run_episodes
from rl_engine.termination import write_termination_message

__all__ = ["evaluation_seeds", "evaluate", "main"]

#: The stream of the evaluator's reset seeds (the trainer's final evaluation uses another), so that
#: an evaluation seed never replays the trainer's own episodes.
SEED_STREAM = 104_729


def evaluation_seeds(seed: int, episodes: int) -> list[int]:
    """The reset seed of each evaluation episode, drawn from ``seed`` (numpy's SeedSequence)."""
    return [int(s) for s in np.random.SeedSequence([seed, SEED_STREAM]).generate_state(episodes)]


def _config(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidConfig("evaluation config: not a JSON object")
    for key in ("artifactURI", "fingerprint", "environment", "episodes", "seed"):
        if key not in raw:
            raise InvalidConfig(f"evaluation config: {key}: missing")
    if not isinstance(raw["episodes"], int) or not 1 <= raw["episodes"] <= 10_000:
        raise InvalidConfig("evaluation config: episodes: an integer from 1 to 10000")
    if not isinstance(raw["seed"], int) or raw["seed"] < 0:
        raise InvalidConfig("evaluation config: seed: a non-negative integer")
    return raw


def evaluate(config: dict[str, Any]) -> dict[str, Any]:
    """Measure the artifact that ``config`` names (see the module docstring); returns the
    termination message of a success.

    Raises:
        InvalidConfig: the config or the environment it names is invalid.
        rl_engine.artifacts.FingerprintMismatch: the bytes read are not the reported fingerprint's.
        rl_engine.artifacts.ArtifactError: the artifact is missing or cannot be loaded.
    """
    from rl_engine.policy import load_verified_policy  # torch: imported once the config is known good

    cfg = _config(config)
    try:
        env_cfg = EnvironmentConfig.model_validate({**cfg["environment"], "backend": "gymnasium"})
    except ValueError as err:
        raise InvalidConfig(f"evaluation config: environment: {err}") from None
    policy = load_verified_policy(cfg["artifactURI"], cfg["fingerprint"], device="cpu")
    factory = resolve_env_factory(env_cfg)
    seeds = evaluation_seeds(cfg["seed"], cfg["episodes"])
    steps = cfg.get("maxEpisodeSteps")
    measured = run_episodes(factory, lambda obs, _envs: policy.act(obs), seeds, max_episode_steps=steps)
    random_res = run_episodes(factory, random_policy, seeds, max_episode_steps=steps)
    summary: dict[str, Any] = {k: v for k, v in measured.summary().items()
                               if k in ("meanReturn", "stdReturn", "minReturn", "maxReturn", "meanLength",
                                        "episodes", "successRate")}
    random_summary = random_res.summary()
    summary.update(randomMeanReturn=random_summary["meanReturn"], randomStdReturn=random_summary["stdReturn"])
    seconds = measured.seconds + random_res.seconds
    probe = factory()
    try:
        with_baseline, name = has_baseline(probe), getattr(probe.unwrapped, "baseline_name", "baseline")
    finally:
        probe.close()
    if with_baseline:
        base = run_episodes(factory, baseline_policy, seeds, max_episode_steps=steps)
        summary.update(baselineName=name, baselineMeanReturn=base.summary()["meanReturn"])
        seconds += base.seconds
    summary["seconds"] = round(seconds, 3)
    return {"phase": "Succeeded", "fingerprint": policy.fingerprint, "seed": cfg["seed"], "evaluation": summary}


def _failure(reason: str, message: str, code: int) -> int:
    print(f"rlops evaluator failed: {reason}: {message}", file=sys.stderr, flush=True)
    write_termination_message({"phase": "Failed", "reason": reason, "message": message})
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; returns the process exit code (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m rl_engine.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="evaluation config file (JSON); default: $RLOPS_EVALUATION")
    args = parser.parse_args(argv)
    try:
        text = open(args.config).read() if args.config else os.environ.get("RLOPS_EVALUATION")
        if not text:
            raise InvalidConfig("evaluation config: pass --config or set RLOPS_EVALUATION")
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise InvalidConfig(f"evaluation config: not JSON: {err}") from None
        result = evaluate(raw)
    except FingerprintMismatch as err:
        return _failure("FingerprintMismatch", str(err), 1)
    except ArtifactError as err:
        return _failure("InvalidArtifact", str(err), 1)
    except TrainerFailure as failure:
        return _failure(failure.reason, failure.message, failure.exit_code)
    except Exception as err:  # noqa: BLE001 - every failure must produce a termination message
        traceback.print_exc(file=sys.stderr)
        return _failure("EvaluatorError", f"{type(err).__name__}: {err}", 1)
    write_termination_message(result)
    print(f"rlops evaluator: {json.dumps(result, separators=(',', ':'))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
