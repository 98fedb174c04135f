"""rl_engine.telemetry: spans (InMemorySpanExporter), the once-only tracing_unavailable
warning, Prometheus metrics and their HTTP exposition, TensorBoard event files, progress
output. Seed 000 names the ``reinforcement.loop.*`` telemetry."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import textwrap
import urllib.request
from dataclasses import dataclass

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from rl_engine.errors import InvalidConfig
from rl_engine.telemetry import (
    EVALUATION_EVENT,
    ITERATION_SPAN,
    RUN_SPAN,
    TRACING_UNAVAILABLE,
    TrainingTelemetry,
    configure_tracing,
    count_successes,
    iteration_scalars,
    reset_tracing_warning,
)

OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
)
LABELS = {"run": "default/cartpole-1", "algorithm": "PPO", "env_id": "CartPole-v1"}


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def lines():
    return []


def make(lines, provider=None, **kw) -> TrainingTelemetry:
    """A telemetry with an explicit tracer provider (no global tracing setup, no warning)."""
    kw.setdefault("progress", "off")
    return TrainingTelemetry(
        run=LABELS["run"], algorithm="PPO", env_id="CartPole-v1", total_timesteps=8192,
        log=lines.append, tracer_provider=provider or TracerProvider(), **kw,
    )


def sample(tel: TrainingTelemetry, name: str) -> float | None:
    return tel.registry.get_sample_value(name, LABELS)


# ---- spans ---------------------------------------------------------------------------------


def test_run_and_iteration_spans_carry_rl_attributes(spans, lines):
    provider, exporter = spans
    with make(lines, provider) as tel, tel.run_span():
        for i in (1, 2):
            with tel.iteration(i):
                tel.record_iteration(
                    i, 2048 * i,
                    {"mean_episodic_return": 20.0 * i, "policy_loss": -0.01, "valueLoss": 3.5,
                     "entropy": None, "approx_kl": float("nan")},
                    episodes=10, successes=4,
                )
                if i == 2:
                    tel.record_evaluation(4096, 150.0, 12.5, success_rate=0.25, episodes=20)

    finished = exporter.get_finished_spans()
    assert [s.name for s in finished] == [ITERATION_SPAN, ITERATION_SPAN, RUN_SPAN]
    it1, it2, run = finished
    assert it1.parent.span_id == run.context.span_id
    assert it2.parent.span_id == run.context.span_id
    assert it1.context.trace_id == run.context.trace_id

    a = it2.attributes
    assert a["rl.iteration"] == 2
    assert a["rl.algorithm"] == "PPO"
    assert a["rl.env_id"] == "CartPole-v1"
    assert a["rl.run"] == "default/cartpole-1"
    assert a["rl.global_step"] == 4096
    assert a["rl.average_reward"] == 40.0
    assert a["rl.policy_loss"] == -0.01
    assert a["rl.value_loss"] == 3.5
    assert a["rl.episodes"] == 10
    assert a["rl.successes"] == 4
    assert a["rl.success_rate"] == pytest.approx(0.4)
    assert "rl.entropy" not in a and "rl.approx_kl" not in a  # None / NaN skipped

    assert not it1.events
    (event,) = it2.events
    assert event.name == EVALUATION_EVENT
    assert event.attributes["rl.eval.mean_return"] == 150.0
    assert event.attributes["rl.eval.std_return"] == 12.5
    assert event.attributes["rl.eval.success_rate"] == 0.25
    assert event.attributes["rl.eval.episodes"] == 20
    assert event.attributes["rl.global_step"] == 4096

    assert run.attributes["rl.total_timesteps"] == 8192
    assert run.attributes["rl.global_step"] == 4096
    assert run.attributes["rl.iterations"] == 2
    assert run.attributes["rl.episodes"] == 20


def test_exception_in_an_iteration_marks_the_spans_and_propagates(spans, lines):
    provider, exporter = spans
    tel = make(lines, provider)
    with pytest.raises(RuntimeError, match="diverged"), tel.run_span(), tel.iteration(1):
        raise RuntimeError("diverged")
    tel.close()
    it, run = exporter.get_finished_spans()
    assert it.status.status_code == StatusCode.ERROR
    assert run.status.status_code == StatusCode.ERROR
    assert any(e.name == "exception" for e in it.events)


# ---- tracing setup -------------------------------------------------------------------------


@pytest.fixture
def no_otel_env(monkeypatch):
    for var in OTEL_VARS:
        monkeypatch.delenv(var, raising=False)
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("another test installed a global tracer provider in this process")
    reset_tracing_warning()
    yield monkeypatch
    reset_tracing_warning()


def test_tracing_unavailable_is_logged_once_per_process(no_otel_env, lines):
    for _ in range(2):
        tel = TrainingTelemetry("r", "PPO", "CartPole-v1", 1000, log=lines.append,
                                progress="off")
        with tel.run_span(), tel.iteration(1):  # no-op tracer: still works
            tel.record_iteration(1, 500, {"mean_episodic_return": 1.0})
        tel.close()
        assert tel.tracing.enabled is False
    warnings = [line for line in lines if TRACING_UNAVAILABLE in line]
    assert len(warnings) == 1, lines
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in warnings[0]  # the reason
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)

    reset_tracing_warning()
    configure_tracing(lines.append)
    assert len([line for line in lines if TRACING_UNAVAILABLE in line]) == 2


def test_otlp_requested_without_the_exporter_package_falls_back(no_otel_env, lines):
    try:
        import opentelemetry.exporter.otlp.proto.http  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the OTLP exporter is installed: this test needs it absent")
    no_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    setup = configure_tracing(lines.append)
    assert setup.enabled is False
    assert "opentelemetry-exporter-otlp-proto-http" in setup.detail
    (warning,) = lines
    assert TRACING_UNAVAILABLE in warning and "opentelemetry-exporter-otlp-proto-http" in warning
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _run_child(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    child_env = {k: v for k, v in os.environ.items() if k not in OTEL_VARS}
    child_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=child_env, capture_output=True,
        text=True, timeout=60, check=False,
    )


def test_an_installed_sdk_provider_is_used_as_is():
    # set_tracer_provider works once per process: run this in a child process.
    proc = _run_child("""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from rl_engine.telemetry import TrainingTelemetry
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        lines = []
        with TrainingTelemetry("r", "PPO", "CartPole-v1", 100, lines.append,
                               progress="off") as tel, tel.run_span(), tel.iteration(1):
            tel.record_iteration(1, 100, {"mean_episodic_return": 9.0})
        assert trace.get_tracer_provider() is provider
        assert tel.tracing.enabled, tel.tracing
        print([s.name for s in exporter.get_finished_spans()], lines)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "['reinforcement.loop.iteration', 'reinforcement.loop.run'] []"
    )


def test_console_exporter_from_otel_traces_exporter():
    proc = _run_child("""
        from rl_engine.telemetry import TrainingTelemetry
        lines = []
        with TrainingTelemetry("r", "PPO", "CartPole-v1", 100, lines.append,
                               progress="off") as tel, tel.run_span(), tel.iteration(3):
            tel.record_iteration(3, 100, {"policy_loss": 0.5})
        print(tel.tracing.enabled, lines)
    """, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="trainer-test")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True []"
    # the batch processor flushes at exit; the console exporter writes JSON spans to stderr
    assert '"name": "reinforcement.loop.iteration"' in proc.stderr
    assert '"rl.policy_loss": 0.5' in proc.stderr
    assert '"service.name": "trainer-test"' in proc.stderr


# ---- Prometheus ----------------------------------------------------------------------------


def test_metrics_after_record_iteration(lines):
    clock = FakeClock()
    tel = make(lines, clock=clock)
    assert sample(tel, "reinforcement_loop_iterations_total") == 0.0
    # gauges appear only once known
    assert sample(tel, "reinforcement_loop_batch_success_rate") is None
    assert sample(tel, "reinforcement_loop_summary_average_reward") is None

    clock.t += 2.0
    tel.record_iteration(1, 2048, {"mean_episodic_return": 21.5, "steps_per_second": 1500.0},
                         episodes=8, successes=6)
    assert sample(tel, "reinforcement_loop_iterations_total") == 1.0
    assert sample(tel, "reinforcement_loop_env_steps_total") == 2048.0
    assert sample(tel, "reinforcement_loop_episodes_total") == 8.0
    assert sample(tel, "reinforcement_loop_batch_success_rate") == 0.75
    assert sample(tel, "reinforcement_loop_summary_failures_total") == 2.0
    assert sample(tel, "reinforcement_loop_summary_average_reward") == 21.5
    assert sample(tel, "reinforcement_loop_steps_per_second") == 1500.0
    assert sample(tel, "reinforcement_loop_progress_ratio") == 0.25

    # unknown success: gauge and counter left alone; no trainer SPS: measured (4096 / 4 s)
    clock.t += 4.0
    tel.record_iteration(2, 6144, {"mean_episodic_return": None}, episodes=5, successes=None)
    assert sample(tel, "reinforcement_loop_iterations_total") == 2.0
    assert sample(tel, "reinforcement_loop_env_steps_total") == 6144.0
    assert sample(tel, "reinforcement_loop_episodes_total") == 13.0
    assert sample(tel, "reinforcement_loop_batch_success_rate") == 0.75
    assert sample(tel, "reinforcement_loop_summary_failures_total") == 2.0
    assert sample(tel, "reinforcement_loop_summary_average_reward") == 21.5
    assert sample(tel, "reinforcement_loop_steps_per_second") == 1024.0

    tel.record_evaluation(6144, 180.0, 3.0)
    assert sample(tel, "reinforcement_loop_eval_mean_return") == 180.0
    tel.close()


def test_two_runs_share_one_registry(lines):
    registry = CollectorRegistry()
    a = TrainingTelemetry("a", "PPO", "CartPole-v1", 100, lines.append, registry=registry,
                          progress="off", tracer_provider=TracerProvider())
    b = TrainingTelemetry("b", "DQN", "CartPole-v1", 100, lines.append, registry=registry,
                          progress="off", tracer_provider=TracerProvider())
    a.record_iteration(1, 10, {})
    b.record_iteration(1, 30, {})
    get = registry.get_sample_value
    labels = {"algorithm": "PPO", "env_id": "CartPole-v1"}
    assert get("reinforcement_loop_env_steps_total", {**labels, "run": "a"}) == 10.0
    assert get("reinforcement_loop_env_steps_total",
               {**labels, "run": "b", "algorithm": "DQN"}) == 30.0


def test_http_exposition_serves_the_metrics(lines):
    tel = make(lines, metrics_port=0, metrics_addr="127.0.0.1")
    port = tel.metrics_port
    assert port
    tel.record_iteration(1, 512, {"mean_episodic_return": 10.0}, episodes=2, successes=1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    for name in (
        "reinforcement_loop_batch_success_rate",
        "reinforcement_loop_summary_average_reward",
        "reinforcement_loop_summary_failures_total",
        "reinforcement_loop_env_steps_total",
        "reinforcement_loop_iterations_total",
        "reinforcement_loop_steps_per_second",
        "reinforcement_loop_episodes_total",
    ):
        assert name in body, name
    assert ('reinforcement_loop_env_steps_total{algorithm="PPO",env_id="CartPole-v1",'
            'run="default/cartpole-1"} 512.0') in body
    tel.close()
    tel.close()  # idempotent
    assert tel.metrics_port is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_busy_metrics_port_is_a_warning_not_a_failure(lines):
    first = make(lines, metrics_port=0, metrics_addr="127.0.0.1")
    second = make(lines, metrics_port=first.metrics_port, metrics_addr="127.0.0.1")
    assert second.metrics_port is None
    assert any("reinforcement.loop.metrics_unavailable" in line for line in lines)
    second.record_iteration(1, 10, {})
    first.close()
    second.close()


# ---- TensorBoard ---------------------------------------------------------------------------


def test_tensorboard_scalars_use_cleanrl_tags(tmp_path, lines):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    with make(lines, tensorboard_dir=str(tb)) as tel:
        tel.record_config({"learningRate": 0.00025, "numEnvs": 8})
        tel.record_iteration(1, 1024, {
            "meanEpisodicReturn": 12.5, "policy_loss": -0.02, "value_loss": 4.0,
            "clip_fraction": 0.1, "steps_per_second": 900.0, "learning_rate": 2.5e-4,
            "entropy": None, "approx_kl": math.inf, "custom/thing": 7.0,
        }, episodes=4, successes=1)
        tel.record_iteration(2, 2048, {"mean_episodic_return": 30.0, "policy_loss": -0.01})
        tel.record_evaluation(2048, 99.5, 4.5, success_rate=0.5)

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "charts/episodic_return", "charts/SPS", "charts/learning_rate", "charts/success_rate",
        "losses/policy_loss", "losses/value_loss", "losses/clipfrac", "custom/thing",
        "eval/mean_return", "eval/std_return", "eval/success_rate",
    } <= tags
    assert "losses/entropy" not in tags and "losses/approx_kl" not in tags

    def series(tag):
        return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]

    assert series("charts/episodic_return") == [(1024, 12.5), (2048, 30.0)]
    assert series("losses/policy_loss") == [(1024, -0.02), (2048, -0.01)]
    assert series("charts/success_rate") == [(1024, 0.25)]
    assert series("eval/mean_return") == [(2048, 99.5)]
    assert series("eval/success_rate") == [(2048, 0.5)]
    assert "hyperparameters/text_summary" in acc.Tags()["tensors"]


# ---- progress ------------------------------------------------------------------------------


def test_progress_lines_are_periodic_and_report_steps_sps_and_return(lines):
    clock = FakeClock(0.0)
    tel = make(lines, progress="lines", log_every_seconds=10.0, clock=clock)
    clock.t = 2.0
    tel.record_iteration(1, 2048, {"mean_episodic_return": 21.5}, episodes=3, successes=3)
    assert len(lines) == 1  # the first iteration always reports
    assert lines[0].startswith("progress: step 2048/8192 (25.0%)")
    assert "1024 steps/s" in lines[0]  # 2048 steps in 2 s
    assert "return 21.5" in lines[0]
    assert "success 1.00" in lines[0]

    clock.t = 6.0
    tel.record_iteration(2, 4096, {"mean_episodic_return": 40.0})
    assert len(lines) == 1  # 4 s since the last line < 10 s

    clock.t = 14.0
    tel.record_iteration(3, 6144, {"mean_episodic_return": 55.25}, episodes=2)
    assert len(lines) == 2
    assert "step 6144/8192 (75.0%)" in lines[1]
    assert "341 steps/s" in lines[1]  # 4096 steps in the 12 s since the last line
    assert "return 55.25" in lines[1]
    assert "episodes 5" in lines[1]
    assert "eta " in lines[1]

    clock.t = 15.0
    tel.record_iteration(4, 7000, {"mean_episodic_return": None})
    assert len(lines) == 2
    tel.close()  # the pending state is reported at close
    assert len(lines) == 3
    assert "step 7000/8192" in lines[2] and "return n/a" in lines[2]
    tel.close()
    assert len(lines) == 3


def test_progress_bar_writes_to_a_stream(lines):
    out = io.StringIO()
    with make(lines, progress="bar", progress_file=out) as tel, tel.run_span():
        for i in range(1, 5):
            with tel.iteration(i):
                tel.record_iteration(i, 2048 * i, {"mean_episodic_return": 10.0 * i},
                                     episodes=2, successes=1)
    text = out.getvalue()
    assert "8.19k/8.19k" in text
    assert "return=40" in text
    assert not lines  # the bar replaces the progress lines


def test_progress_auto_picks_lines_off_a_terminal(lines):
    assert make(lines, progress=None, progress_file=io.StringIO()).progress_mode == "lines"
    assert make(lines, progress=True).progress_mode == "bar"
    assert make(lines, progress=False).progress_mode == "lines"
    tel = make(lines, progress="off")
    tel.record_iteration(1, 10, {})
    tel.close()
    assert not lines
    with pytest.raises(ValueError):
        make(lines, progress="fancy")


# ---- from_env and helpers ------------------------------------------------------------------


def test_from_env(tmp_path, lines):
    env = {"RLOPS_TENSORBOARD_DIR": str(tmp_path / "tb"), "RLOPS_METRICS_PORT": "0",
           "RLOPS_PROGRESS": "LINES"}
    tel = TrainingTelemetry.from_env(
        run="r", algorithm="PPO", env_id="CartPole-v1", total_timesteps=100, log=lines.append,
        environ=env, metrics_addr="127.0.0.1", tracer_provider=TracerProvider(),
    )
    try:
        assert tel.tensorboard_dir == str(tmp_path / "tb")
        assert tel.metrics_port
        assert tel.progress_mode == "lines"
    finally:
        tel.close()

    tel = TrainingTelemetry.from_env(
        run="r", algorithm="PPO", env_id="CartPole-v1", total_timesteps=100, log=lines.append,
        environ={"RLOPS_PROGRESS": "off"}, progress="lines", tracer_provider=TracerProvider(),
    )
    assert tel.progress_mode == "lines"  # explicit arguments win
    assert tel.tensorboard_dir is None and tel.metrics_port is None

    kw = {"run": "r", "algorithm": "PPO", "env_id": "E", "total_timesteps": 1,
          "log": lines.append, "tracer_provider": TracerProvider()}
    with pytest.raises(InvalidConfig, match="RLOPS_METRICS_PORT"):
        TrainingTelemetry.from_env(environ={"RLOPS_METRICS_PORT": "http"}, **kw)
    with pytest.raises(InvalidConfig, match="RLOPS_METRICS_PORT"):
        TrainingTelemetry.from_env(environ={"RLOPS_METRICS_PORT": "70000"}, **kw)
    with pytest.raises(InvalidConfig, match="RLOPS_PROGRESS"):
        TrainingTelemetry.from_env(environ={"RLOPS_PROGRESS": "fancy"}, **kw)


@dataclass
class _Stats:  # the shape of ppo.IterationStats (without importing torch)
    iteration: int
    global_step: int
    policy_loss: float
    clip_fraction: float
    episodes_finished: int
    mean_episodic_return: float | None
    steps_per_second: float


def test_iteration_scalars_from_dataclass_and_camel_case_dict():
    st = _Stats(3, 3072, -0.5, 0.2, 7, None, 1234.0)
    expected = {"policy_loss": -0.5, "clip_fraction": 0.2, "mean_episodic_return": None,
                "steps_per_second": 1234.0}
    assert iteration_scalars(st) == expected
    camel = {"iteration": 3, "globalStep": 3072, "policyLoss": -0.5, "clipFraction": 0.2,
             "episodesFinished": 7, "meanEpisodicReturn": None, "stepsPerSecond": 1234.0,
             "note": "text"}
    assert iteration_scalars(camel) == expected
    assert json.dumps(iteration_scalars(st))  # plain floats


def test_count_successes():
    assert count_successes([1.0, 5.0, 9.0], target_return=5.0) == 2
    assert count_successes([1.0, 5.0], is_success=[True, None], target_return=100.0) == 1
    assert count_successes([1.0, 5.0], is_success=[False, True]) == 1
    assert count_successes([1.0, 5.0]) is None
    assert count_successes([1.0, 5.0], is_success=[True, None]) is None
    assert count_successes([]) == 0
    with pytest.raises(ValueError):
        count_successes([1.0], is_success=[True, False])
