"""Run-config validation: every error names the offending field (torch-free, fast)."""

from __future__ import annotations

import copy
import json

import pytest

from rl_engine.config import load_run_config, parse_run_config
from rl_engine.errors import InvalidConfig

BASE = {
    "agent": "cartpole",
    "namespace": "default",
    "run": "cartpole-1",
    "environment": {"id": "CartPole-v1", "numEnvs": 8, "kwargs": {}},
    "algorithm": {
        "name": "PPO",
        "hyperparameters": {
            "learningRate": 0.00025, "numSteps": 128, "gamma": 0.99, "gaeLambda": 0.95,
            "clipCoef": 0.2, "entCoef": 0.01, "vfCoef": 0.5, "maxGradNorm": 0.5,
            "updateEpochs": 4, "numMinibatches": 4, "annealLR": True, "normAdv": True,
            "clipVloss": True,
        },
    },
    "training": {"totalTimesteps": 500000, "seed": 1, "targetReturn": 475, "evalInterval": 10240},
    "evaluation": {"episodes": 20},
}


def _with(path: str, value, base=BASE):
    cfg = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value
    return cfg


def _without(path: str, base=BASE):
    cfg = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    del node[leaf]
    return cfg


def test_example_config_is_valid_and_keeps_values():
    cfg = parse_run_config(BASE)
    hp = cfg.algorithm.hyperparameters
    assert (hp.learning_rate, hp.num_steps) == (0.00025, 128)
    assert hp.anneal_lr is True and hp.clip_vloss is True
    assert cfg.environment.num_envs == 8
    assert cfg.training.target_return == 475
    assert cfg.evaluation.episodes == 20
    assert cfg.batch_size == 1024
    assert cfg.num_iterations == 500000 // 1024
    snap = cfg.snapshot()
    assert snap["algorithm"]["hyperparameters"]["annealLR"] is True
    assert snap["training"]["evalInterval"] == 10240


def test_minimal_config_gets_cleanrl_defaults():
    cfg = parse_run_config({
        "agent": "a", "run": "r", "environment": {"id": "CartPole-v1"},
        "algorithm": {"name": "PPO"}, "training": {"totalTimesteps": 5000},
    })
    hp = cfg.algorithm.hyperparameters
    assert hp.learning_rate == 2.5e-4 and hp.num_steps == 128 and hp.gamma == 0.99
    assert hp.gae_lambda == 0.95 and hp.clip_coef == 0.2 and hp.ent_coef == 0.01
    assert hp.vf_coef == 0.5 and hp.max_grad_norm == 0.5 and hp.update_epochs == 4
    assert hp.num_minibatches == 4 and hp.anneal_lr and hp.norm_adv and hp.clip_vloss
    assert hp.target_kl is None
    assert cfg.namespace == "default"
    assert cfg.training.seed == 1 and cfg.training.target_return is None
    assert cfg.evaluation.episodes == 10


def _error(raw) -> str:
    with pytest.raises(InvalidConfig) as exc:
        parse_run_config(raw)
    assert exc.value.reason == "InvalidConfig" and exc.value.exit_code == 2
    return exc.value.message


def test_unknown_hyperparameter_is_named():
    raw = _with("algorithm.hyperparameters.learningRat", 0.001)
    assert "algorithm.hyperparameters.learningRat: unknown hyperparameter" in _error(raw)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("algorithm.hyperparameters.learningRate", -1.0, "algorithm.hyperparameters.learningRate:"),
        ("algorithm.hyperparameters.learningRate", "x", "algorithm.hyperparameters.learningRate:"),
        ("algorithm.hyperparameters.gamma", 1.5, "algorithm.hyperparameters.gamma:"),
        ("algorithm.hyperparameters.numSteps", 0, "algorithm.hyperparameters.numSteps:"),
        ("environment.numEnvs", "eight", "environment.numEnvs:"),
        ("environment.numEnvs", 0, "environment.numEnvs:"),
        ("environment.id", "", "environment.id:"),
        ("environment.render", True, "environment.render: unknown field"),
        ("training.totalTimesteps", -5, "training.totalTimesteps:"),
        ("training.evalIntervall", 5, "training.evalIntervall: unknown field"),
        ("evaluation.episodes", 0, "evaluation.episodes:"),
    ],
)
def test_bad_values_name_the_field(path, value, expected):
    assert expected in _error(_with(path, value))


def test_nan_learning_rate_is_rejected():
    assert "algorithm.hyperparameters.learningRate" in _error(
        _with("algorithm.hyperparameters.learningRate", float("nan"))
    )


def test_missing_required_fields_are_named():
    assert "training.totalTimesteps: required field is missing" in _error(
        _without("training.totalTimesteps")
    )
    assert "environment: required field is missing" in _error(_without("environment"))
    assert "environment.id: required field is missing" in _error(_without("environment.id"))


def test_several_errors_are_all_reported():
    raw = _with("environment.numEnvs", -1, _with("algorithm.hyperparameters.foo", 1))
    message = _error(raw)
    assert "environment.numEnvs" in message
    assert "algorithm.hyperparameters.foo: unknown hyperparameter" in message


def test_dqn_has_its_own_hyperparameters():
    cfg = parse_run_config(_with("algorithm", {"name": "dqn", "hyperparameters": {"bufferSize": 5000, "doubleDQN": False}}))
    assert cfg.algorithm.name == "DQN"
    assert cfg.algorithm.hyperparameters.buffer_size == 5000
    assert cfg.algorithm.hyperparameters.double_dqn is False
    assert cfg.algorithm.hyperparameters.huber_delta == 1.0
    # A PPO knob is unknown to DQN, and the error path has no union tag in it.
    message = _error(_with("algorithm", {"name": "DQN", "hyperparameters": {"numSteps": 8}}))
    assert message == "algorithm.hyperparameters.numSteps: unknown hyperparameter"
    message = _error(_with("algorithm", {"name": "DQN", "hyperparameters": {"batchSize": 20000}}))
    assert message.startswith("algorithm.hyperparameters.batchSize: must be <= bufferSize")


def test_dqn_learning_starts_must_leave_room_to_learn():
    raw = _with("algorithm", {"name": "DQN", "hyperparameters": {"learningStarts": 10**9}})
    assert _error(raw).startswith("algorithm.hyperparameters.learningStarts:")


def test_torch_backend_and_env_count_limits():
    assert parse_run_config(_with("environment.backend", "torch")).environment.backend == "torch"
    big = _with("environment.numEnvs", 4096)
    assert _error(big).startswith("environment.numEnvs:") and "backend: torch" in _error(big)
    big_torch = _with("environment.backend", "torch", _with("training.totalTimesteps", 10**6, big))
    assert parse_run_config(big_torch).environment.num_envs == 4096
    assert _error(_with("environment.backend", "jax")).startswith("environment.backend:")


def test_unknown_algorithm():
    assert "algorithm.name: unknown algorithm 'A3C'" in _error(_with("algorithm.name", "A3C"))


def test_algorithm_name_is_case_insensitive():
    assert parse_run_config(_with("algorithm.name", "ppo")).algorithm.name == "PPO"


def test_budget_smaller_than_one_batch_is_rejected():
    message = _error(_with("training.totalTimesteps", 1000))
    assert message.startswith("training.totalTimesteps:") and "1024" in message


def test_too_many_minibatches_is_rejected():
    raw = _with("algorithm.hyperparameters.numMinibatches", 2048)
    assert _error(raw).startswith("algorithm.hyperparameters.numMinibatches:")


def test_non_object_config():
    assert _error([1, 2]).startswith("<root>:")


def test_load_from_yaml_file_and_env_json(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "agent: a\nrun: r\nenvironment:\n  id: CartPole-v1\n"
        "training:\n  totalTimesteps: 2048\nalgorithm:\n  hyperparameters:\n    numSteps: 64\n"
    )
    cfg = load_run_config(str(path))
    assert cfg.algorithm.hyperparameters.num_steps == 64
    assert cfg.training.total_timesteps == 2048
    from_env = load_run_config(None, json.dumps(BASE))
    assert from_env == parse_run_config(BASE)
    # The file wins over the environment variable.
    assert load_run_config(str(path), json.dumps(BASE)).training.total_timesteps == 2048


def test_load_errors_name_the_source(tmp_path):
    with pytest.raises(InvalidConfig, match="RLOPS_RUN_CONFIG: not valid JSON"):
        load_run_config(None, "{not json")
    with pytest.raises(InvalidConfig, match="pass --config PATH or set RLOPS_RUN_CONFIG"):
        load_run_config(None, None)
    with pytest.raises(InvalidConfig, match="--config: cannot read"):
        load_run_config(str(tmp_path / "missing.json"))
