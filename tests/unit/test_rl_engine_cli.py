"""End-to-end tests of ``python -m rl_engine.train``: artifacts, termination message,
fingerprint, exit codes. Real training runs, no mocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from rl_engine.artifacts import FINGERPRINT_FILE, compute_fingerprint
from rl_engine.train import main

SHORT_RUN = {
    "agent": "cartpole",
    "namespace": "tests",
    "run": "cartpole-short",
    "environment": {"id": "CartPole-v1", "numEnvs": 4},
    "algorithm": {"name": "PPO", "hyperparameters": {"numSteps": 128}},
    "training": {"totalTimesteps": 20480, "seed": 1, "evalInterval": 5120},
    "evaluation": {"episodes": 10},
}

ENV_MODULE = textwrap.dedent(
    '''
    import gymnasium as gym

    class NaNRewardCartPole(gym.Wrapper):
        """CartPole whose rewards are NaN: the first PPO loss is NaN."""

        def __init__(self):
            super().__init__(gym.make("CartPole-v1"))

        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, float("nan"), terminated, truncated, info

    class CrashingCartPole(gym.Wrapper):
        """CartPole that raises after a few steps (an unexpected trainer error)."""

        def __init__(self, crash_after=20):
            super().__init__(gym.make("CartPole-v1"))
            self.steps = 0
            self.crash_after = crash_after

        def step(self, action):
            self.steps += 1
            if self.steps > self.crash_after:
                raise RuntimeError("simulator crashed")
            return self.env.step(action)
    '''
)


def _run_cli(config: dict, artifact_uri: str, term_path: Path, extra_env=None, cwd=None):
    env = {
        **os.environ,
        "RLOPS_RUN_CONFIG": json.dumps(config),
        "RLOPS_ARTIFACT_URI": artifact_uri,
        "RLOPS_TERMINATION_MESSAGE_PATH": str(term_path),
        **(extra_env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "rl_engine.train"], env=env, cwd=cwd,
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("short-run")
    uri = (root / "artifact" / "run-1").as_uri()
    term = root / "termination-log"
    proc = _run_cli(SHORT_RUN, uri, term)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "uri": uri, "dir": root / "artifact" / "run-1", "term": term,
            "proc": proc}


def test_cli_writes_all_artifacts(short_run):
    d = short_run["dir"]
    expected = {"model.pt", "policy.json", "metadata.json", "training_history.json",
                "config_snapshot.yaml", "evaluation.json", FINGERPRINT_FILE}
    assert {p.name for p in d.iterdir()} == expected

    meta = json.loads((d / "metadata.json").read_text())
    assert meta["run"] == "cartpole-short" and meta["agent"] == "cartpole"
    assert meta["algorithm"] == "PPO" and meta["environment"]["id"] == "CartPole-v1"
    assert meta["observationShape"] == [4] and meta["numActions"] == 2
    assert meta["device"] == "cpu" and meta["versions"]["torch"] and meta["versions"]["gymnasium"]
    assert meta["timings"]["trainingSeconds"] > 0
    assert meta["timesteps"] == 20480

    history = json.loads((d / "training_history.json").read_text())
    assert [it["iteration"] for it in history["iterations"]] == list(range(1, 41))
    assert history["iterations"][-1]["globalStep"] == 20480
    assert all(k in history["iterations"][0] for k in ("policyLoss", "valueLoss", "entropy"))
    assert [ev["globalStep"] for ev in history["evaluations"]] == [5120, 10240, 15360, 20480]

    snapshot = yaml.safe_load((d / "config_snapshot.yaml").read_text())
    assert snapshot["algorithm"]["hyperparameters"]["learningRate"] == 2.5e-4  # default filled
    assert snapshot["environment"]["numEnvs"] == 4

    evaluation = json.loads((d / "evaluation.json").read_text())
    assert evaluation["summary"]["episodes"] == 10
    assert len(evaluation["deterministic"]["episodeReturns"]) == 10
    assert len(evaluation["randomBaseline"]["episodeReturns"]) == 10

    log = short_run["proc"].stdout.splitlines()
    assert log[0].startswith("rlops trainer") and "device=cpu" in log[0] and "config=" in log[0]
    assert any(line.startswith("iter 40/40 step 20480") for line in log)
    assert any(line.startswith("eval 4 at step 20480") for line in log)


def test_termination_message_and_fingerprint(short_run):
    raw = short_run["term"].read_bytes()
    assert len(raw) < 4096
    msg = json.loads(raw)
    assert msg["phase"] == "Succeeded"
    assert set(msg["metrics"]) == {"meanReturn", "stdReturn", "episodes", "randomMeanReturn",
                                   "timesteps", "trainingSeconds", "stepsPerSecond"}
    assert msg["metrics"]["episodes"] == 10 and msg["metrics"]["timesteps"] == 20480
    assert msg["artifactURI"] == short_run["uri"]
    assert msg["fingerprint"] == compute_fingerprint(short_run["uri"])
    stored = json.loads((short_run["dir"] / FINGERPRINT_FILE).read_text())
    assert stored["fingerprint"] == msg["fingerprint"]
    assert set(stored["files"]) == {"model.pt", "policy.json", "metadata.json",
                                    "training_history.json", "config_snapshot.yaml",
                                    "evaluation.json"}


def test_changing_an_artifact_changes_the_fingerprint(short_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(short_run["dir"], copy)
    original = json.loads(short_run["term"].read_text())["fingerprint"]
    assert compute_fingerprint(copy.as_uri()) == original
    model = bytearray((copy / "model.pt").read_bytes())
    model[-30] ^= 0xFF
    (copy / "model.pt").write_bytes(bytes(model))
    assert compute_fingerprint(copy.as_uri()) != original


def test_short_training_beats_random_policy(short_run):
    metrics = json.loads(short_run["term"].read_text())["metrics"]
    # Random CartPole lasts ~22 steps; 20k steps of PPO reliably give > 100.
    assert metrics["randomMeanReturn"] < 40
    assert metrics["meanReturn"] > 100
    assert metrics["meanReturn"] > 3 * metrics["randomMeanReturn"]


def test_saved_policy_reloads_and_reproduces_evaluation(short_run):
    import gymnasium as gym
    import torch

    from rl_engine.ppo import load_agent

    agent = load_agent(short_run["uri"])
    evaluation = json.loads((short_run["dir"] / "evaluation.json").read_text())
    det = evaluation["deterministic"]
    env = gym.make("CartPole-v1")
    for seed, expected in list(zip(det["seeds"], det["episodeReturns"]))[:3]:
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            action = agent.act_greedy(torch.as_tensor(obs, dtype=torch.float32)[None])[0]
            obs, reward, terminated, truncated, _ = env.step(int(action))
            total += reward
            done = terminated or truncated
        assert total == expected


def test_nan_rewards_exit_3_with_non_finite_loss(tmp_path):
    (tmp_path / "rlops_test_envs.py").write_text(ENV_MODULE)
    config = {**SHORT_RUN, "environment": {"id": "rlops_test_envs:NaNRewardCartPole", "numEnvs": 2},
              "training": {"totalTimesteps": 2048}}
    term = tmp_path / "termination-log"
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    proc = _run_cli(config, (tmp_path / "art").as_uri(), term,
                    extra_env={"PYTHONPATH": pythonpath})
    assert proc.returncode == 3, proc.stderr[-2000:]
    msg = json.loads(term.read_bytes())
    assert msg["phase"] == "Failed" and msg["reason"] == "NonFiniteLoss"
    assert "non-finite loss at update 1/8 (epoch 1/4, minibatch 1/4" in msg["message"]
    assert "Last finite losses: none" in msg["message"]
    assert "non-finite rewards" in msg["message"]
    assert "NonFiniteLoss" in proc.stderr
    assert not (tmp_path / "art" / "model.pt").exists()


def _main_with_env(monkeypatch, tmp_path, config, argv=()):
    term = tmp_path / "termination-log"
    monkeypatch.setenv("RLOPS_TERMINATION_MESSAGE_PATH", str(term))
    monkeypatch.setenv("RLOPS_ARTIFACT_URI", (tmp_path / "art").as_uri())
    if config is None:
        monkeypatch.delenv("RLOPS_RUN_CONFIG", raising=False)
    else:
        monkeypatch.setenv("RLOPS_RUN_CONFIG", json.dumps(config))
    code = main(list(argv))
    return code, json.loads(term.read_bytes())


def test_unknown_hyperparameter_exits_2(monkeypatch, tmp_path, capsys):
    config = {**SHORT_RUN, "algorithm": {"name": "PPO", "hyperparameters": {"learningRat": 1e-3}}}
    code, msg = _main_with_env(monkeypatch, tmp_path, config)
    assert code == 2
    assert msg == {"phase": "Failed", "reason": "InvalidConfig",
                   "message": "algorithm.hyperparameters.learningRat: unknown hyperparameter"}
    assert "learningRat" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env_id", "kwargs", "expected"),
    [
        ("NoSuchEnv-v0", {}, "environment.id: 'NoSuchEnv-v0' is not a registered"),
        ("no_such_module_xyz:Env", {}, "environment.id: cannot import module 'no_such_module_xyz'"),
        ("CartPole-v1", {"no_such_kwarg": 1}, "environment.kwargs:"),
        ("Pendulum-v1", {}, "environment.id: 'Pendulum-v1' has action space Box"),
    ],
)
def test_bad_environment_exits_2_naming_the_field(monkeypatch, tmp_path, env_id, kwargs, expected):
    config = {**SHORT_RUN, "environment": {"id": env_id, "kwargs": kwargs}}
    code, msg = _main_with_env(monkeypatch, tmp_path, config)
    assert code == 2 and msg["reason"] == "InvalidConfig"
    assert msg["message"].startswith(expected), msg["message"]


def test_config_file_and_missing_inputs(monkeypatch, tmp_path):
    code, msg = _main_with_env(monkeypatch, tmp_path, None)
    assert code == 2 and "RLOPS_RUN_CONFIG" in msg["message"]

    bad = tmp_path / "run.yaml"
    bad.write_text(yaml.safe_dump({**SHORT_RUN, "algorithm": {"name": "A2C"}}))
    code, msg = _main_with_env(monkeypatch, tmp_path, None, ["--config", str(bad)])
    assert code == 2 and msg["message"].startswith("algorithm.name: unknown algorithm 'A2C'")

    hicra = {**SHORT_RUN, "algorithm": {"name": "PPO", "hyperparameters": {
        "hicra": {"multiplier": 1.0, "plannerWeight": 2.0}}}}
    code, msg = _main_with_env(monkeypatch, tmp_path, hicra)
    assert code == 2 and msg["message"].startswith("algorithm.hyperparameters.hicra.multiplier:")

    code, msg = _main_with_env(monkeypatch, tmp_path, SHORT_RUN, ["--bogus-flag"])
    assert code == 2 and msg["message"].startswith("command line:")


def test_unexpected_error_exits_1_naming_the_step(monkeypatch, tmp_path):
    (tmp_path / "rlops_test_envs_crash.py").write_text(ENV_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {**SHORT_RUN, "environment": {"id": "rlops_test_envs_crash:CrashingCartPole",
                                           "numEnvs": 2},
              "training": {"totalTimesteps": 1024}}
    code, msg = _main_with_env(monkeypatch, tmp_path, config)
    assert code == 1 and msg["reason"] == "TrainerError"
    assert msg["message"].startswith("training (iteration 1/4): RuntimeError: simulator crashed")


# ----------------------------------------------------------------------------- the operator's evaluator


def _evaluate(config: dict, term: Path):
    env = {**os.environ, "RLOPS_EVALUATION": json.dumps(config), "RLOPS_TERMINATION_MESSAGE_PATH": str(term)}
    return subprocess.run([sys.executable, "-m", "rl_engine.evaluate"], env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_evaluator_measures_the_artifact_itself_on_seeds_of_its_own(short_run, tmp_path):
    """``python -m rl_engine.evaluate`` reads the artifact, checks the trainer's fingerprint from
    the bytes it read, and measures the policy on the run's environment from its own seed: the
    same seed gives the same figures, another seed other episodes; the random policy is
    measured beside it."""
    reported = json.loads(short_run["term"].read_text())
    config = {"artifactURI": short_run["uri"], "fingerprint": reported["fingerprint"],
              "environment": {"id": "CartPole-v1"}, "episodes": 8, "seed": 1234}
    before = {p: p.read_bytes() for p in short_run["dir"].iterdir()}
    proc = _evaluate(config, tmp_path / "term")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "term").read_text())
    assert out["phase"] == "Succeeded" and out["fingerprint"] == reported["fingerprint"] and out["seed"] == 1234
    figures = out["evaluation"]
    assert figures["episodes"] == 8 and figures["meanReturn"] > 3 * figures["randomMeanReturn"]
    assert {p: p.read_bytes() for p in short_run["dir"].iterdir()} == before  # it wrote nothing there
    from rl_engine.evaluate import evaluate, evaluation_seeds
    again = evaluate(config)["evaluation"]
    assert {k: again[k] for k in ("meanReturn", "stdReturn")} == {k: figures[k] for k in ("meanReturn", "stdReturn")}
    assert set(evaluation_seeds(1234, 8)).isdisjoint(evaluation_seeds(1235, 8))
    assert set(evaluation_seeds(1, 8)).isdisjoint(json.loads((short_run["dir"] / "evaluation.json").read_text())
                                                 ["deterministic"]["seeds"])  # never the trainer's own episodes


def test_the_evaluator_refuses_bytes_other_than_the_trainer_reported(short_run, tmp_path):
    copy = tmp_path / "run-1"
    shutil.copytree(short_run["dir"], copy)
    reported = json.loads(short_run["term"].read_text())["fingerprint"]
    (copy / "training_history.json").write_text("{}")  # changed after the trainer hashed it
    proc = _evaluate({"artifactURI": copy.as_uri(), "fingerprint": reported, "environment": {"id": "CartPole-v1"},
                      "episodes": 2, "seed": 1}, tmp_path / "term")
    out = json.loads((tmp_path / "term").read_text())
    assert proc.returncode == 1 and out["reason"] == "FingerprintMismatch", out
    assert "training_history.json" in out["message"]
    proc = _evaluate({"artifactURI": copy.as_uri(), "fingerprint": reported, "environment": {"id": "NoSuchEnv-v0"},
                      "episodes": 2, "seed": 1}, tmp_path / "term2")
    out = json.loads((tmp_path / "term2").read_text())
    assert proc.returncode == 1 and out["reason"] == "FingerprintMismatch"  # the bytes are checked first
    proc = _evaluate({"artifactURI": short_run["uri"], "fingerprint": reported}, tmp_path / "term3")
    out = json.loads((tmp_path / "term3").read_text())
    assert proc.returncode == 2 and out["reason"] == "InvalidConfig" and "environment: missing" in out["message"]
