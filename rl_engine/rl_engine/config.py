"""Run-config schema and validation (torch-free).

The run config is the JSON snapshot of a Kubernetes ``TrainingRun`` spec, in camelCase::

    {"agent": "cartpole", "namespace": "default", "run": "cartpole-1",
     "environment": {"id": "CartPole-v1", "numEnvs": 8, "kwargs": {}},
     "algorithm": {"name": "PPO", "hyperparameters": {"learningRate": 0.00025, ...}},
     "training": {"totalTimesteps": 500000, "seed": 1, "targetReturn": 475,
                  "evalInterval": 10240},
     "evaluation": {"episodes": 20}}

Unknown keys are rejected at every level (``unknown hyperparameter`` inside
``algorithm.hyperparameters``, ``unknown field`` elsewhere). Defaults follow CleanRL's
``ppo.py`` (Huang et al. 2022, "CleanRL", JMLR 23(274)); see ``docs/trainer.md`` for the
full table.

Use :func:`parse_run_config` (raises :class:`rl_engine.errors.InvalidConfig`) rather than
constructing :class:`RunConfig` directly: it turns pydantic errors into one message of the
form ``<dotted.field.path>: <problem>`` per error, joined by ``"; "``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from .errors import InvalidConfig

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "PLANNED_ALGORITHMS",
    "PPOHyperparameters",
    "DQNHyperparameters",
    "PPOAlgorithm",
    "DQNAlgorithm",
    "EnvironmentConfig",
    "AlgorithmConfig",
    "TrainingConfig",
    "EvaluationConfig",
    "RunConfig",
    "parse_run_config",
    "load_run_config",
    "format_validation_error",
]

SUPPORTED_ALGORITHMS = ("PPO", "DQN")
PLANNED_ALGORITHMS: tuple[str, ...] = ()


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
    )


class PPOHyperparameters(_Model):
    """PPO hyperparameters (``algorithm.hyperparameters``); defaults are CleanRL's.

    Units: ``learningRate`` is the Adam step size at iteration 1 (linearly annealed to 0
    over the run when ``annealLR``); ``numSteps`` is env steps per env per rollout, so a
    rollout batch is ``environment.numEnvs * numSteps`` transitions.
    """

    learning_rate: float = Field(2.5e-4, gt=0)
    num_steps: int = Field(128, ge=1)
    gamma: float = Field(0.99, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    clip_coef: float = Field(0.2, gt=0)
    ent_coef: float = Field(0.01, ge=0)
    vf_coef: float = Field(0.5, ge=0)
    max_grad_norm: float = Field(0.5, gt=0)
    update_epochs: int = Field(4, ge=1)
    num_minibatches: int = Field(4, ge=1)
    anneal_lr: bool = Field(True, alias="annealLR")
    norm_adv: bool = True
    clip_vloss: bool = True
    target_kl: float | None = Field(None, gt=0, alias="targetKL")
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 64], min_length=1, max_length=8)
    # HICRA credit assignment (seed 003): {enabled, multiplier|plannerWeight, normalize,
    # normalizationEps|eps|epsilon}; validated by rl_engine.hicra when the trainer starts.
    hicra: dict[str, Any] | None = None


class DQNHyperparameters(_Model):
    """DQN hyperparameters (``algorithm.hyperparameters``); defaults are CleanRL ``dqn.py``'s
    for CartPole, with Double DQN, a Huber loss and gradient clipping on.

    Units: ``bufferSize`` transitions; ``learningStarts``, ``trainFrequency``,
    ``targetNetworkFrequency`` and ``stepsPerIteration`` are env steps summed over all
    ``environment.numEnvs`` copies; epsilon decays linearly from ``startE`` to ``endE`` over
    ``explorationFraction * training.totalTimesteps`` env steps.
    """

    learning_rate: float = Field(2.5e-4, gt=0)
    buffer_size: int = Field(10_000, ge=1)
    learning_starts: int = Field(10_000, ge=0)
    batch_size: int = Field(128, ge=1)
    gamma: float = Field(0.99, ge=0, le=1)
    tau: float = Field(1.0, gt=0, le=1)
    target_network_frequency: int = Field(500, ge=1)
    train_frequency: int = Field(10, ge=1)
    gradient_steps: int = Field(1, ge=1)
    exploration_fraction: float = Field(0.5, ge=0, le=1)
    start_e: float = Field(1.0, ge=0, le=1, alias="startE")
    end_e: float = Field(0.05, ge=0, le=1, alias="endE")
    max_grad_norm: float = Field(10.0, gt=0)
    double_dqn: bool = Field(True, alias="doubleDQN")
    huber_delta: float | None = Field(1.0, gt=0)
    hidden_sizes: list[int] = Field(default_factory=lambda: [120, 84], min_length=1, max_length=8)
    steps_per_iteration: int = Field(1024, ge=1)


class EnvironmentConfig(_Model):
    """``environment``: a Gymnasium id (``CartPole-v1``) or a ``module:Class`` entry point.

    ``backend: gymnasium`` (default) steps ``numEnvs`` copies in a
    ``gymnasium.vector.SyncVectorEnv``; ``kwargs`` go to ``gymnasium.make`` (or to the class
    constructor). ``backend: torch`` steps all copies as tensor ops on the training device
    (:mod:`rl_engine.torch_envs`; CartPole-v1 only), for thousands of copies on a GPU.
    """

    id: str = Field(min_length=1)
    num_envs: int = Field(8, ge=1, le=65536)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    backend: Literal["gymnasium", "torch"] = "gymnasium"


class PPOAlgorithm(_Model):
    """``algorithm`` with ``name: PPO``."""

    name: Literal["PPO"] = "PPO"
    hyperparameters: PPOHyperparameters = Field(default_factory=PPOHyperparameters)


class DQNAlgorithm(_Model):
    """``algorithm`` with ``name: DQN``."""

    name: Literal["DQN"]
    hyperparameters: DQNHyperparameters = Field(default_factory=DQNHyperparameters)


AlgorithmConfig = Annotated[Union[PPOAlgorithm, DQNAlgorithm], Field(discriminator="name")]
"""``algorithm``: ``PPO`` (default) or ``DQN``, each with its own hyperparameters."""


class TrainingConfig(_Model):
    """``training``.

    ``totalTimesteps`` is the env-step budget (summed over all envs). Every
    ``evalInterval`` env steps a deterministic evaluation runs; training stops early when
    its mean return is >= ``targetReturn`` (if set). ``seed`` seeds torch, numpy and the
    environments. ``device: auto`` trains on CUDA when present, else on the CPU.
    """

    total_timesteps: int = Field(ge=1)
    seed: int = Field(1, ge=0, le=2**63 - 1)
    target_return: float | None = None
    eval_interval: int = Field(10240, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EvaluationConfig(_Model):
    """``evaluation``: the final (and periodic) deterministic evaluation.

    ``maxEpisodeSteps`` caps an evaluation episode; when unset the environment's own time
    limit applies, or 10000 steps if it has none.
    """

    episodes: int = Field(10, ge=1, le=10000)
    max_episode_steps: int | None = Field(None, ge=1)


class RunConfig(_Model):
    """The whole validated run config (see the module docstring for the JSON form)."""

    agent: str = Field(min_length=1)
    namespace: str = "default"
    run: str = Field(min_length=1)
    environment: EnvironmentConfig
    algorithm: AlgorithmConfig = Field(default_factory=PPOAlgorithm)
    training: TrainingConfig
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @property
    def batch_size(self) -> int:
        """Env steps per iteration: PPO ``environment.numEnvs * hyperparameters.numSteps``;
        DQN ``stepsPerIteration`` rounded up to whole vector steps."""
        n = self.environment.num_envs
        hp = self.algorithm.hyperparameters
        if isinstance(hp, DQNHyperparameters):
            return -(-hp.steps_per_iteration // n) * n
        return n * hp.num_steps

    @property
    def num_iterations(self) -> int:
        """Iterations: ``totalTimesteps // batch_size`` (CleanRL's rule for PPO)."""
        return max(1, self.training.total_timesteps // self.batch_size)

    @model_validator(mode="after")
    def _check_sizes(self) -> "RunConfig":
        hp = self.algorithm.hyperparameters
        batch = self.batch_size
        env = self.environment
        if env.backend == "gymnasium" and env.num_envs > 1024:
            raise ValueError(
                f"environment.numEnvs: at most 1024 copies with backend gymnasium (one Python "
                f"object each), got {env.num_envs}; use backend: torch for more"
            )
        if isinstance(hp, DQNHyperparameters):
            if hp.batch_size > hp.buffer_size:
                raise ValueError(
                    f"algorithm.hyperparameters.batchSize: must be <= bufferSize "
                    f"({hp.buffer_size}), got {hp.batch_size}"
                )
            if hp.learning_starts >= self.training.total_timesteps:
                raise ValueError(
                    f"algorithm.hyperparameters.learningStarts: must be < "
                    f"training.totalTimesteps ({self.training.total_timesteps}) or no update "
                    f"ever runs, got {hp.learning_starts}"
                )
            return self
        if hp.num_minibatches > batch:
            raise ValueError(
                "algorithm.hyperparameters.numMinibatches: must be <= environment.numEnvs "
                f"* algorithm.hyperparameters.numSteps (= {batch}), got {hp.num_minibatches}"
            )
        if self.training.total_timesteps < batch:
            raise ValueError(
                f"training.totalTimesteps: must be >= one rollout batch (environment.numEnvs "
                f"* algorithm.hyperparameters.numSteps = {batch}), got "
                f"{self.training.total_timesteps}"
            )
        return self

    def snapshot(self) -> dict[str, Any]:
        """The validated config with defaults filled in, as camelCase JSON-able data."""
        return self.model_dump(mode="json", by_alias=True)


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for index, item in enumerate(loc):
        if index == 1 and loc[0] == "algorithm" and item in SUPPORTED_ALGORITHMS:
            continue  # the discriminated union's tag, not a field
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "<root>"


def format_validation_error(err: ValidationError) -> str:
    """One line per pydantic error, ``<dotted.path>: <problem>``, joined by ``"; "``."""
    messages: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(e.get("loc", ()))
        kind = e.get("type", "")
        if kind == "extra_forbidden":
            path = _loc_to_path(loc)
            inside_hp = path.startswith("algorithm.hyperparameters.")
            msg = "unknown hyperparameter" if inside_hp else "unknown field"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "value_error" and not loc:
            # Cross-field checks already start with the field path.
            messages.append(str(e.get("ctx", {}).get("error", e.get("msg", ""))))
            continue
        else:
            msg = e.get("msg", "invalid value")
        if kind not in ("extra_forbidden", "missing") and "input" in e:
            shown = json.dumps(e["input"], default=str)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            msg = f"{msg} (got {shown})"
        messages.append(f"{_loc_to_path(loc)}: {msg}")
    return "; ".join(messages)


def parse_run_config(raw: Any) -> RunConfig:
    """Validate raw run-config data (already parsed from JSON/YAML).

    Args:
        raw: a mapping in the camelCase schema above.

    Returns:
        The frozen, validated :class:`RunConfig` with defaults filled in.

    Raises:
        InvalidConfig: message names each offending field, e.g.
            ``algorithm.hyperparameters.learningRat: unknown hyperparameter``.
    """
    if not isinstance(raw, dict):
        raise InvalidConfig(f"<root>: run config must be a JSON object, got {type(raw).__name__}")
    algorithm = raw.get("algorithm")
    if isinstance(algorithm, dict) and "name" in algorithm:
        name = algorithm["name"]
        if not isinstance(name, str):
            raise InvalidConfig(f"algorithm.name: must be a string, got {name!r}")
        canonical = name.upper()
        if canonical in PLANNED_ALGORITHMS:
            raise InvalidConfig(
                f"algorithm.name: {name} is not implemented yet (supported: "
                f"{', '.join(SUPPORTED_ALGORITHMS)})"
            )
        if canonical not in SUPPORTED_ALGORITHMS:
            raise InvalidConfig(
                f"algorithm.name: unknown algorithm {name!r} (supported: "
                f"{', '.join(SUPPORTED_ALGORITHMS)})"
            )
        raw = {**raw, "algorithm": {**algorithm, "name": canonical}}
    elif isinstance(algorithm, dict):
        raw = {**raw, "algorithm": {**algorithm, "name": "PPO"}}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise InvalidConfig(format_validation_error(err)) from None


def load_run_config(path: str | None = None, env_json: str | None = None) -> RunConfig:
    """Read and validate the run config from a JSON/YAML file or a JSON string.

    Args:
        path: file path (``.json``, ``.yaml`` or ``.yml``; JSON is valid YAML, so any
            other suffix is parsed as YAML). Takes precedence over ``env_json``.
        env_json: the JSON string from ``RLOPS_RUN_CONFIG``.

    Raises:
        InvalidConfig: when neither is given, the file is unreadable, the text does not
            parse, or validation fails.
    """
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise InvalidConfig(f"--config: cannot read {path}: {err}") from None
        try:
            raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise InvalidConfig(f"--config: {path} is not valid JSON/YAML: {err}") from None
    elif env_json:
        try:
            raw = json.loads(env_json)
        except json.JSONDecodeError as err:
            raise InvalidConfig(f"RLOPS_RUN_CONFIG: not valid JSON: {err}") from None
    else:
        raise InvalidConfig("run config: pass --config PATH or set RLOPS_RUN_CONFIG")
    return parse_run_config(raw)
