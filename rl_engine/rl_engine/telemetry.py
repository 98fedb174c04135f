"""Training telemetry: OpenTelemetry spans, Prometheus metrics, TensorBoard scalars, progress.

The telemetry contract comes from seed 000 (``../shared/seeds/000_00f0123c5438188c.txt``,
the RL rollout runbook): the reinforcement-learning loop "emits OpenTelemetry spans and
structured metrics via the ``reinforcement.loop.*`` namespace" (``batch.success_rate``,
``summary.average_reward``, ``summary.failures``), and "falls back gracefully when tracing is
unavailable but logs a warning (``reinforcement.loop.tracing_unavailable``)".

One :class:`TrainingTelemetry` per training run::

    with TrainingTelemetry.from_env(run="default/cartpole-1", algorithm="PPO",
                                    env_id="CartPole-v1", total_timesteps=500_000,
                                    log=log) as tel, tel.run_span():
        for i in range(1, num_iterations + 1):
            with tel.iteration(i):
                st = trainer.train_iteration()
                tel.record_iteration(st.iteration, st.global_step, iteration_scalars(st),
                                     episodes=st.episodes_finished)

Outputs (each optional except the spans, which are no-ops without an exporter):

* **Spans** (tracer ``rl_engine``): ``reinforcement.loop.run`` around the run and
  ``reinforcement.loop.iteration`` around each training iteration (attributes ``rl.*``);
  evaluations are ``reinforcement.loop.evaluation`` span events. Exporters come from the
  standard ``OTEL_*`` variables, see :func:`configure_tracing`.
* **Prometheus metrics** (names are seed 000's ``reinforcement.loop.*`` with dots turned into
  underscores; labels ``run``, ``algorithm``, ``env_id``) in a private
  :class:`prometheus_client.CollectorRegistry`, served over HTTP when ``metrics_port`` is set:

  ===============================================  =======  ==========================================
  metric                                           type     meaning
  ===============================================  =======  ==========================================
  ``reinforcement_loop_batch_success_rate``        gauge    fraction (0..1) of the episodes finished
                                                            in the last iteration that succeeded
  ``reinforcement_loop_summary_average_reward``    gauge    mean episodic return of recent episodes
  ``reinforcement_loop_summary_failures_total``    counter  episodes judged unsuccessful
  ``reinforcement_loop_env_steps_total``           counter  env steps (summed over vector envs)
  ``reinforcement_loop_iterations_total``          counter  training iterations
  ``reinforcement_loop_episodes_total``            counter  training episodes finished
  ``reinforcement_loop_steps_per_second``          gauge    training throughput, env steps / second
  ``reinforcement_loop_progress_ratio``            gauge    global step / total timesteps (0..1)
  ``reinforcement_loop_eval_mean_return``          gauge    mean return of the latest evaluation
  ===============================================  =======  ==========================================

* **TensorBoard** scalars (CleanRL's tag names: ``charts/episodic_return``,
  ``losses/policy_loss``, ...; x axis = global env step) under ``tensorboard_dir``.
* **Progress**: a tqdm bar over env steps (on a terminal) or a ``progress: ...`` log line every
  ``log_every_seconds`` (in a pod, where stderr is not a terminal).

Environment variables read by :meth:`TrainingTelemetry.from_env`:

========================  ===========================================================
``RLOPS_TENSORBOARD_DIR``  TensorBoard log directory (unset/empty: no TensorBoard)
``RLOPS_METRICS_PORT``     port of the Prometheus ``/metrics`` endpoint (unset: none)
``RLOPS_PROGRESS``         ``auto`` (default), ``bar``, ``lines`` or ``off``
========================  ===========================================================

This module imports torch only when TensorBoard output is enabled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Self

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge

from . import __version__
from .errors import InvalidConfig

__all__ = [
    "EVALUATION_EVENT",
    "ITERATION_SPAN",
    "PROGRESS_MODES",
    "RUN_SPAN",
    "TRACER_NAME",
    "TRACING_UNAVAILABLE",
    "TracingSetup",
    "TrainingTelemetry",
    "configure_tracing",
    "count_successes",
    "iteration_scalars",
    "reset_tracing_warning",
]

Log = Callable[[str], None]

TRACER_NAME = "rl_engine"
RUN_SPAN = "reinforcement.loop.run"
ITERATION_SPAN = "reinforcement.loop.iteration"
EVALUATION_EVENT = "reinforcement.loop.evaluation"
TRACING_UNAVAILABLE = "reinforcement.loop.tracing_unavailable"
METRICS_UNAVAILABLE = "reinforcement.loop.metrics_unavailable"
TENSORBOARD_UNAVAILABLE = "reinforcement.loop.tensorboard_unavailable"

PROGRESS_MODES = ("auto", "bar", "lines", "off")

ENV_TENSORBOARD_DIR = "RLOPS_TENSORBOARD_DIR"
ENV_METRICS_PORT = "RLOPS_METRICS_PORT"
ENV_PROGRESS = "RLOPS_PROGRESS"

LABELS = ("run", "algorithm", "env_id")


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Tracing setup
# --------------------------------------------------------------------------------------------

_tracing_lock = threading.Lock()
_tracing_warned = False


@dataclass(frozen=True)
class TracingSetup:
    """Outcome of :func:`configure_tracing`.

    Attributes:
        enabled: spans are recorded by a real (non no-op) tracer provider.
        detail: what was found or installed, or why tracing is unavailable.
    """

    enabled: bool
    detail: str


def reset_tracing_warning() -> None:
    """Forget that ``reinforcement.loop.tracing_unavailable`` was logged (for tests)."""
    global _tracing_warned
    with _tracing_lock:
        _tracing_warned = False


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _otlp_exporter() -> Any:
    """The OTLP span exporter for ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` (optional packages).

    Raises:
        ImportError: the exporter package is not installed.
    """
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip().lower()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore
                OTLPSpanExporter,
            )
        except ImportError as err:
            raise ImportError(
                f"opentelemetry-exporter-otlp-proto-grpc is not installed ({err})"
            ) from None
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore
                OTLPSpanExporter,
            )
        except ImportError as err:
            raise ImportError(
                f"opentelemetry-exporter-otlp-proto-http is not installed ({err})"
            ) from None
    return OTLPSpanExporter()  # endpoint, headers, timeout: from the OTEL_EXPORTER_OTLP_* vars


def _install_provider(log: Log) -> TracingSetup:
    """Decide and (maybe) install the global tracer provider; called under the lock."""
    from opentelemetry.sdk.trace import TracerProvider

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return TracingSetup(True, "an OpenTelemetry SDK tracer provider is already installed")
    if isinstance(current, trace.NoOpTracerProvider):
        return TracingSetup(False, "a no-op tracer provider is installed")
    if not isinstance(current, trace.ProxyTracerProvider):
        return TracingSetup(True, f"tracer provider {type(current).__name__} is already installed")

    env = os.environ
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return TracingSetup(False, "OTEL_SDK_DISABLED is set")
    endpoint_set = bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    exporters_var = (env.get("OTEL_TRACES_EXPORTER") or "").strip()
    if not exporters_var and not endpoint_set:
        return TracingSetup(
            False,
            "no span exporter configured (OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_TRACES_EXPORTER "
            "are unset)",
        )
    names = [n.strip().lower() for n in exporters_var.split(",") if n.strip()] or ["otlp"]
    if names == ["none"]:
        return TracingSetup(False, "OTEL_TRACES_EXPORTER=none")

    exporters: list[Any] = []
    problems: list[str] = []
    for name in names:
        if name == "none":
            continue
        if name == "otlp":
            try:
                exporters.append(_otlp_exporter())
            except Exception as err:  # noqa: BLE001 - ImportError or a bad OTEL_* value
                problems.append(f"otlp: {err}")
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter(out=sys.stderr))
        else:
            problems.append(f"{name}: unsupported OTEL_TRACES_EXPORTER (supported: otlp, console)")
    if not exporters:
        return TracingSetup(False, "; ".join(problems))

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, Any] = {}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = "rlops-trainer"
    provider = TracerProvider(resource=Resource.create(attributes))  # shuts down at exit
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    detail = f"installed an SDK tracer provider exporting to {', '.join(names)}"
    if problems:
        detail += f" (skipped {'; '.join(problems)})"
        log(f"warning: tracing: {detail}")
    return TracingSetup(True, detail)


def configure_tracing(log: Log | None = None) -> TracingSetup:
    """Make sure spans go somewhere, or say once why they don't.

    * An OpenTelemetry SDK tracer provider (or any other real one) is already installed
      globally, e.g. by a test with an ``InMemorySpanExporter``: left as it is.
    * ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER``
      (``otlp``, ``console``, ``none``; comma-separated) is set and the exporter is
      importable: installs an SDK ``TracerProvider`` with a ``BatchSpanProcessor`` per
      exporter as the global provider. OTLP uses ``opentelemetry-exporter-otlp-proto-http``
      (``-grpc`` when ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``), an optional package that is not
      a dependency of ``rlops-engine``; endpoint, headers and timeout come from the standard
      ``OTEL_EXPORTER_OTLP_*`` variables. ``service.name`` defaults to ``rlops-trainer``
      (``OTEL_SERVICE_NAME`` overrides).
    * Otherwise training goes on with the no-op tracer, and the warning
      ``reinforcement.loop.tracing_unavailable`` (with the reason) is logged through ``log``
      once per process (:func:`reset_tracing_warning` re-arms it).

    Args:
        log: line logger for the warning; default: stderr.

    Returns:
        Whether spans are recorded, and the detail.
    """
    global _tracing_warned
    log = log or _stderr_log
    with _tracing_lock:
        setup = _install_provider(log)
        warn = not setup.enabled and not _tracing_warned
        if warn:
            _tracing_warned = True
    if warn:
        log(
            f"warning: {TRACING_UNAVAILABLE}: {setup.detail}; training continues with the "
            "no-op tracer (no spans exported)"
        )
    return setup


# --------------------------------------------------------------------------------------------
# Scalars and success judgement
# --------------------------------------------------------------------------------------------

# Canonical (snake_case) scalar key -> TensorBoard tag. Tags follow CleanRL's ppo.py/dqn.py.
_TAGS: dict[str, str] = {
    "mean_episodic_return": "charts/episodic_return",
    "mean_episodic_length": "charts/episodic_length",
    "learning_rate": "charts/learning_rate",
    "steps_per_second": "charts/SPS",
    "epsilon": "charts/epsilon",
    "gradient_steps": "charts/gradient_steps",
    "policy_loss": "losses/policy_loss",
    "value_loss": "losses/value_loss",
    "entropy": "losses/entropy",
    "old_approx_kl": "losses/old_approx_kl",
    "approx_kl": "losses/approx_kl",
    "clip_fraction": "losses/clipfrac",
    "explained_variance": "losses/explained_variance",
    "td_loss": "losses/td_loss",
    "q_value": "losses/q_values",
    "rollout_seconds": "time/rollout_seconds",
    "update_seconds": "time/update_seconds",
    "seconds": "time/iteration_seconds",
}

# Other spellings (CleanRL's tag leaves, train.py's log words) -> canonical key.
_ALIASES: dict[str, str] = {
    "episodic_return": "mean_episodic_return",
    "average_reward": "mean_episodic_return",
    "episodic_length": "mean_episodic_length",
    "sps": "steps_per_second",
    "pg_loss": "policy_loss",
    "v_loss": "value_loss",
    "clipfrac": "clip_fraction",
    "q_values": "q_value",
    "iteration_seconds": "seconds",
}

# Keys that are record_iteration's explicit arguments or bookkeeping, not scalars.
_NOT_SCALARS = frozenset(
    {"iteration", "global_step", "episodes_finished", "elapsed_seconds", "successes"}
)

_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


def _canonical(key: str) -> str:
    if "/" in key:
        return key
    snake = _CAMEL.sub(r"_\1", key).lower()
    return _ALIASES.get(snake, snake)


def _finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is None, not a number, a bool, or not finite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def iteration_scalars(stats: Any) -> dict[str, float | None]:
    """The scalars of a trainer's per-iteration stats, for :meth:`TrainingTelemetry.record_iteration`.

    Args:
        stats: a dataclass (``ppo.IterationStats``, ``dqn.DQNIterationStats``) or a mapping
            (snake_case or camelCase keys, e.g. ``IterationStats.to_json()``).

    Returns:
        ``{snake_case_key: value}`` without ``iteration``, ``global_step`` and
        ``episodes_finished`` (explicit arguments of ``record_iteration``) and without
        non-numeric values; None values are kept (they are skipped when recorded).
    """
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        items = dataclasses.asdict(stats).items()
    else:
        items = dict(stats).items()
    out: dict[str, float | None] = {}
    for key, value in items:
        name = _canonical(str(key))
        if name in _NOT_SCALARS:
            continue
        if value is None:
            out[name] = None
        elif isinstance(value, (bool, str, bytes)):
            continue
        else:
            try:
                out[name] = float(value)  # non-finite kept: record_iteration skips it
            except (TypeError, ValueError):
                continue
    return out


def count_successes(
    returns: Sequence[float],
    is_success: Sequence[bool | None] | None = None,
    target_return: float | None = None,
) -> int | None:
    """How many of a batch's finished episodes succeeded, or None when that is unknown.

    An episode succeeded if the env says so (``info["is_success"]``, passed here as
    ``is_success[i]``; None where the env does not define it), else if its return is at least
    ``target_return``. If any episode can be judged neither way the count is None (unknown),
    and the success-rate gauge and failure counter are left alone.

    Args:
        returns: episodic returns of the episodes finished in the batch.
        is_success: per-episode ``info["is_success"]`` (same order), or None.
        target_return: the run's ``training.targetReturn``, or None.
    """
    if is_success is not None and len(is_success) != len(returns):
        raise ValueError(
            f"is_success has {len(is_success)} entries for {len(returns)} episodes"
        )
    count = 0
    for i, ret in enumerate(returns):
        flag = None if is_success is None else is_success[i]
        if flag is not None:
            count += bool(flag)
        elif target_return is not None:
            count += float(ret) >= target_return
        else:
            return None
    return count


# --------------------------------------------------------------------------------------------
# Prometheus metric families (one set per registry)
# --------------------------------------------------------------------------------------------


@dataclass
class _Families:
    success_rate: Gauge
    average_reward: Gauge
    failures: Counter
    env_steps: Counter
    iterations: Counter
    episodes: Counter
    steps_per_second: Gauge
    progress: Gauge
    eval_mean_return: Gauge


_families_lock = threading.Lock()
_families: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()


def _families_for(registry: CollectorRegistry) -> _Families:
    """Registers the metric families in ``registry`` once; later telemetries share them."""
    with _families_lock:
        fam = _families.get(registry)
        if fam is None:
            kw = {"labelnames": LABELS, "registry": registry}
            fam = _Families(
                success_rate=Gauge(
                    "reinforcement_loop_batch_success_rate",
                    "Fraction (0..1) of the episodes finished in the last training iteration "
                    "that succeeded (info['is_success'], else return >= target return)",
                    **kw,
                ),
                average_reward=Gauge(
                    "reinforcement_loop_summary_average_reward",
                    "Mean episodic return of recent training episodes",
                    **kw,
                ),
                failures=Counter(
                    "reinforcement_loop_summary_failures",
                    "Training episodes judged unsuccessful",
                    **kw,
                ),
                env_steps=Counter(
                    "reinforcement_loop_env_steps",
                    "Environment steps taken by training, summed over the vector envs",
                    **kw,
                ),
                iterations=Counter(
                    "reinforcement_loop_iterations", "Training iterations completed", **kw
                ),
                episodes=Counter(
                    "reinforcement_loop_episodes", "Training episodes finished", **kw
                ),
                steps_per_second=Gauge(
                    "reinforcement_loop_steps_per_second",
                    "Training throughput of the last iteration, env steps per second",
                    **kw,
                ),
                progress=Gauge(
                    "reinforcement_loop_progress_ratio",
                    "Env steps taken / total timesteps of the run (0..1)",
                    **kw,
                ),
                eval_mean_return=Gauge(
                    "reinforcement_loop_eval_mean_return",
                    "Mean episodic return of the latest evaluation (deterministic policy)",
                    **kw,
                ),
            )
            _families[registry] = fam
        return fam


# --------------------------------------------------------------------------------------------
# TrainingTelemetry
# --------------------------------------------------------------------------------------------


def _progress_mode(progress: bool | str | None, stream: IO[str]) -> str:
    if progress is True:
        mode = "bar"
    elif progress is False:
        mode = "lines"
    else:
        mode = (progress or "auto").strip().lower()
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress: {progress!r} is not one of {', '.join(PROGRESS_MODES)}")
    if mode == "auto":
        try:
            tty = bool(stream.isatty())
        except (AttributeError, ValueError):
            tty = False
        mode = "bar" if tty else "lines"
    return mode


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


class TrainingTelemetry:
    """Spans, Prometheus metrics, TensorBoard scalars and progress output of one training run.

    Args:
        run: run name (``namespace/name``), the ``run`` label and ``rl.run`` attribute.
        algorithm: algorithm name (``PPO``), the ``algorithm`` label.
        env_id: environment id (``CartPole-v1``), the ``env_id`` label.
        total_timesteps: env-step budget of the run (summed over vector envs); the progress
            bar's total.
        log: line logger (the trainer's stdout logger); receives progress lines and warnings.
        tensorboard_dir: TensorBoard log directory (created); None: no TensorBoard output.
        metrics_port: serve ``registry`` on ``http://metrics_addr:metrics_port/metrics``
            (``prometheus_client.start_http_server``; 0 picks a free port, see
            :attr:`metrics_port`); None: no HTTP server.
        registry: Prometheus registry for the metrics; default: a new private one.
        progress: ``"bar"``/True (tqdm bar over env steps), ``"lines"``/False (a
            ``progress: ...`` log line every ``log_every_seconds``), ``"off"``, or
            None/``"auto"``: the bar when ``progress_file`` is a terminal, else lines.
        log_every_seconds: minimum wall-clock seconds between progress lines ("lines" mode).
        tracer_provider: tracer provider for the spans (tests pass one with an
            ``InMemorySpanExporter``); None: the global one, after :func:`configure_tracing`.
        progress_file: stream of the tqdm bar; default ``sys.stderr``.
        metrics_addr: listen address of the metrics server.
        clock: monotonic clock in seconds (tests inject a fake one).

    A metrics server that cannot start (port in use) or a TensorBoard directory that cannot
    be written is logged as ``reinforcement.loop.metrics_unavailable`` /
    ``reinforcement.loop.tensorboard_unavailable``; training goes on without it.
    """

    def __init__(
        self,
        run: str,
        algorithm: str,
        env_id: str,
        total_timesteps: int,
        log: Log,
        tensorboard_dir: str | None = None,
        metrics_port: int | None = None,
        registry: CollectorRegistry | None = None,
        progress: bool | str | None = None,
        log_every_seconds: float = 10.0,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        progress_file: IO[str] | None = None,
        metrics_addr: str = "0.0.0.0",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run = run
        self.algorithm = algorithm
        self.env_id = env_id
        self.total_timesteps = int(total_timesteps)
        self.log = log
        self.log_every_seconds = float(log_every_seconds)
        self._clock = clock
        self._progress_file = progress_file if progress_file is not None else sys.stderr
        self.progress_mode = _progress_mode(progress, self._progress_file)
        self._closed = False

        # tracing
        if tracer_provider is not None:
            self.tracing = TracingSetup(True, "tracer provider passed explicitly")
            self._tracer = tracer_provider.get_tracer(TRACER_NAME, __version__)
        else:
            self.tracing = configure_tracing(log)
            self._tracer = trace.get_tracer(TRACER_NAME, __version__)
        self._run_span: trace.Span | None = None
        self._iteration_span: trace.Span | None = None

        # metrics
        self.registry = registry if registry is not None else CollectorRegistry()
        fam = _families_for(self.registry)
        labels = {"run": run, "algorithm": algorithm, "env_id": env_id}
        self._fam = fam
        self._labels = labels
        # Counters start at 0 (exposed right away); gauges are exposed once first set, so an
        # unknown success rate or return is absent rather than a misleading 0.
        self._m_failures = fam.failures.labels(**labels)
        self._m_env_steps = fam.env_steps.labels(**labels)
        self._m_iterations = fam.iterations.labels(**labels)
        self._m_episodes = fam.episodes.labels(**labels)
        self._http_server: Any = None
        self._http_thread: threading.Thread | None = None
        if metrics_port is not None:
            self._start_metrics_server(int(metrics_port), metrics_addr)

        # TensorBoard
        self.tensorboard_dir = tensorboard_dir
        self._writer: Any = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=tensorboard_dir, flush_secs=10)
            except Exception as err:  # noqa: BLE001 - telemetry must not stop training
                log(f"warning: {TENSORBOARD_UNAVAILABLE}: {tensorboard_dir}: "
                    f"{type(err).__name__}: {err}")

        # progress state
        self._bar: Any = None
        now = clock()
        self._t_start = now
        self._last_record_time: float | None = None
        self._last_global_step = 0
        self._line_time = now
        self._line_step = 0
        self._pending_line = False
        self._iterations = 0
        self._episodes = 0
        self._last: dict[str, Any] = {}

    # ---- construction from the environment --------------------------------------------------

    @classmethod
    def from_env(
        cls,
        *,
        run: str,
        algorithm: str,
        env_id: str,
        total_timesteps: int,
        log: Log,
        environ: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> TrainingTelemetry:
        """A telemetry configured by ``RLOPS_TENSORBOARD_DIR``, ``RLOPS_METRICS_PORT`` and
        ``RLOPS_PROGRESS`` (``auto|bar|lines|off``); ``kwargs`` (any ``__init__`` argument)
        take precedence over them.

        Args:
            environ: the variables; default ``os.environ``.

        Raises:
            InvalidConfig: ``RLOPS_METRICS_PORT`` is not a port number (0..65535) or
                ``RLOPS_PROGRESS`` is not one of the modes.
        """
        env = os.environ if environ is None else environ
        opts: dict[str, Any] = {}
        tb = (env.get(ENV_TENSORBOARD_DIR) or "").strip()
        if tb:
            opts["tensorboard_dir"] = tb
        port = (env.get(ENV_METRICS_PORT) or "").strip()
        if port:
            try:
                value = int(port)
            except ValueError:
                value = -1
            if not 0 <= value <= 65535:
                raise InvalidConfig(f"{ENV_METRICS_PORT}: {port!r} is not a port number (0..65535)")
            opts["metrics_port"] = value
        mode = (env.get(ENV_PROGRESS) or "").strip().lower()
        if mode:
            if mode not in PROGRESS_MODES:
                raise InvalidConfig(
                    f"{ENV_PROGRESS}: {mode!r} is not one of {', '.join(PROGRESS_MODES)}"
                )
            opts["progress"] = mode
        opts.update(kwargs)
        return cls(run=run, algorithm=algorithm, env_id=env_id,
                   total_timesteps=total_timesteps, log=log, **opts)

    # ---- metrics server ---------------------------------------------------------------------

    def _start_metrics_server(self, port: int, addr: str) -> None:
        from prometheus_client import start_http_server

        try:
            self._http_server, self._http_thread = start_http_server(
                port, addr=addr, registry=self.registry
            )
        except OSError as err:
            self.log(f"warning: {METRICS_UNAVAILABLE}: cannot serve Prometheus metrics on "
                     f"{addr}:{port}: {err}; training continues without the endpoint")

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics server listens on (the chosen one for port 0), or None."""
        return None if self._http_server is None else int(self._http_server.server_port)

    # ---- spans ------------------------------------------------------------------------------

    def _base_attributes(self) -> dict[str, Any]:
        return {"rl.run": self.run, "rl.algorithm": self.algorithm, "rl.env_id": self.env_id}

    @contextlib.contextmanager
    def run_span(self) -> Iterator[trace.Span]:
        """The ``reinforcement.loop.run`` span around the whole run (current while open, so
        iteration spans are its children). Exceptions are recorded on it and re-raised. At
        exit it gets ``rl.global_step``, ``rl.iterations`` and ``rl.episodes``."""
        self._ensure_bar()
        now = self._clock()
        if self._iterations == 0:
            self._t_start = self._line_time = now
        attributes = {**self._base_attributes(), "rl.total_timesteps": self.total_timesteps}
        with self._tracer.start_as_current_span(RUN_SPAN, attributes=attributes) as span:
            self._run_span = span
            try:
                yield span
            finally:
                if span.is_recording():
                    span.set_attributes({
                        "rl.global_step": self._last_global_step,
                        "rl.iterations": self._iterations,
                        "rl.episodes": self._episodes,
                    })
                self._run_span = None

    @contextlib.contextmanager
    def iteration(self, index: int) -> Iterator[trace.Span]:
        """The ``reinforcement.loop.iteration`` span around training iteration ``index``.

        Attributes: ``rl.iteration``, ``rl.algorithm``, ``rl.env_id``, ``rl.run``; after
        :meth:`record_iteration` also ``rl.global_step``, ``rl.average_reward``, ``rl.episodes``,
        ``rl.successes``, ``rl.success_rate`` and one ``rl.<scalar>`` per finite scalar
        (``rl.policy_loss``, ``rl.value_loss``, ``rl.steps_per_second``, ...).
        Exceptions are recorded on the span (status ERROR) and re-raised.
        """
        attributes = {"rl.iteration": int(index), **self._base_attributes()}
        with self._tracer.start_as_current_span(ITERATION_SPAN, attributes=attributes) as span:
            outer = self._iteration_span
            self._iteration_span = span
            try:
                yield span
            finally:
                self._iteration_span = outer

    # ---- recording --------------------------------------------------------------------------

    def _gauge(self, family: Gauge, value: float) -> None:
        family.labels(**self._labels).set(value)

    def record_iteration(
        self,
        iteration: int,
        global_step: int,
        scalars: Mapping[str, float | None],
        episodes: int = 0,
        successes: int | None = None,
    ) -> None:
        """Record one finished training iteration.

        Args:
            iteration: 1-based iteration number.
            global_step: env steps taken so far (summed over vector envs).
            scalars: per-iteration values, e.g. :func:`iteration_scalars` of the trainer's
                stats: ``mean_episodic_return`` (mean return of recent episodes),
                ``steps_per_second`` (env steps / second), losses, ... Keys may be snake_case,
                camelCase, CleanRL leaf names (``SPS``, ``clipfrac``) or full TensorBoard tags
                (``custom/x``). None and non-finite values are skipped everywhere.
            episodes: training episodes finished during this iteration.
            successes: how many of those succeeded (see :func:`count_successes`); None when
                unknown: the success-rate gauge and failure counter are then left alone.

        Updates the Prometheus metrics, writes TensorBoard scalars at ``global_step``, sets
        attributes on the current iteration span, and advances the progress output.
        """
        now = self._clock()
        global_step = int(global_step)
        episodes = max(0, int(episodes))
        values: dict[str, float] = {}
        for key, value in scalars.items():
            name = _canonical(str(key))
            if name in _NOT_SCALARS:
                continue
            f = _finite(value)
            if f is not None:
                values[name] = f

        delta_steps = max(0, global_step - self._last_global_step)
        since = self._last_record_time if self._last_record_time is not None else self._t_start
        sps = values.get("steps_per_second")
        if sps is None and delta_steps and now > since:
            sps = delta_steps / (now - since)
        success_rate = None
        if successes is not None and episodes > 0:
            successes = min(max(0, int(successes)), episodes)
            success_rate = successes / episodes
        average = values.get("mean_episodic_return")

        # Prometheus
        self._m_iterations.inc()
        if delta_steps:
            self._m_env_steps.inc(delta_steps)
        if episodes:
            self._m_episodes.inc(episodes)
        if average is not None:
            self._gauge(self._fam.average_reward, average)
        if sps is not None:
            self._gauge(self._fam.steps_per_second, sps)
        if success_rate is not None:
            self._gauge(self._fam.success_rate, success_rate)
            self._m_failures.inc(episodes - successes)  # type: ignore[operator]
        if self.total_timesteps > 0:
            self._gauge(self._fam.progress, min(1.0, global_step / self.total_timesteps))

        # TensorBoard
        if self._writer is not None:
            for name, value in values.items():
                tag = name if "/" in name else _TAGS.get(name, f"charts/{name}")
                self._writer.add_scalar(tag, value, global_step)
            if "steps_per_second" not in values and sps is not None:
                self._writer.add_scalar("charts/SPS", sps, global_step)
            if success_rate is not None:
                self._writer.add_scalar("charts/success_rate", success_rate, global_step)

        # span
        span = self._iteration_span
        if span is not None and span.is_recording():
            attrs: dict[str, Any] = {
                "rl.iteration": int(iteration),
                "rl.global_step": global_step,
                "rl.episodes": episodes,
            }
            for name, value in values.items():
                attrs["rl." + name.replace("/", ".")] = value
            if average is not None:
                attrs["rl.average_reward"] = average
            if sps is not None:
                attrs["rl.steps_per_second"] = sps
            if success_rate is not None:
                attrs["rl.successes"] = successes
                attrs["rl.success_rate"] = success_rate
            span.set_attributes(attrs)

        # bookkeeping and progress
        self._iterations += 1
        self._episodes += episodes
        self._last_global_step = max(self._last_global_step, global_step)
        self._last_record_time = now
        self._last = {"average": average, "success_rate": success_rate, "sps": sps}
        self._advance_progress(delta_steps, now)

    def record_evaluation(
        self,
        global_step: int,
        mean_return: float,
        std_return: float,
        success_rate: float | None = None,
        episodes: int | None = None,
    ) -> None:
        """Record an evaluation of the current policy at ``global_step`` env steps.

        TensorBoard ``eval/mean_return``, ``eval/std_return`` (and ``eval/success_rate``,
        ``eval/episodes`` when given), the ``reinforcement_loop_eval_mean_return`` gauge, and a
        ``reinforcement.loop.evaluation`` event on the current iteration span (else the run
        span) with ``rl.global_step``, ``rl.eval.mean_return``, ``rl.eval.std_return``,
        ``rl.eval.success_rate``, ``rl.eval.episodes``.
        """
        global_step = int(global_step)
        values = {
            "mean_return": _finite(mean_return),
            "std_return": _finite(std_return),
            "success_rate": _finite(success_rate),
            "episodes": _finite(episodes),
        }
        if values["mean_return"] is not None:
            self._gauge(self._fam.eval_mean_return, values["mean_return"])
        if self._writer is not None:
            for name, value in values.items():
                if value is not None:
                    self._writer.add_scalar(f"eval/{name}", value, global_step)
        span = self._iteration_span or self._run_span
        if span is not None and span.is_recording():
            attrs: dict[str, Any] = {"rl.global_step": global_step}
            for name, value in values.items():
                if value is not None:
                    attrs[f"rl.eval.{name}"] = int(value) if name == "episodes" else value
            span.add_event(EVALUATION_EVENT, attributes=attrs)

    def record_config(self, config: Mapping[str, Any]) -> None:
        """Write the run config as CleanRL's ``hyperparameters`` TensorBoard text table."""
        if self._writer is None:
            return
        rows = "\n".join(f"|{k}|{v}|" for k, v in config.items())
        self._writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    # ---- progress ---------------------------------------------------------------------------

    def _ensure_bar(self) -> None:
        if self.progress_mode != "bar" or self._bar is not None or self._closed:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=self.total_timesteps or None,
            desc=f"{self.algorithm} {self.env_id}",
            unit="step",
            unit_scale=True,
            file=self._progress_file,
            dynamic_ncols=True,
            mininterval=0.5,
            smoothing=0.1,
        )

    def _advance_progress(self, delta_steps: int, now: float) -> None:
        if self.progress_mode == "bar":
            self._ensure_bar()
            if self._bar is None:
                return
            postfix = {}
            if self._last["average"] is not None:
                postfix["return"] = f"{self._last['average']:.4g}"
            if self._last["success_rate"] is not None:
                postfix["success"] = f"{self._last['success_rate']:.2f}"
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(delta_steps)
        elif self.progress_mode == "lines":
            self._pending_line = True
            first = self._iterations == 1
            done = self.total_timesteps > 0 and self._last_global_step >= self.total_timesteps
            if first or done or now - self._line_time >= self.log_every_seconds:
                self._emit_line(now)

    def _emit_line(self, now: float) -> None:
        step = self._last_global_step
        window = now - self._line_time
        sps = (step - self._line_step) / window if window > 0 and step > self._line_step else None
        if sps is None:
            sps = self._last["sps"]
        elapsed = now - self._t_start
        parts = [f"progress: step {step}"]
        if self.total_timesteps > 0:
            parts[0] += f"/{self.total_timesteps} ({100.0 * step / self.total_timesteps:.1f}%)"
        parts.append("n/a steps/s" if sps is None else f"{sps:.0f} steps/s")
        average = self._last["average"]
        parts.append("return n/a" if average is None else f"return {average:.4g}")
        parts.append(f"episodes {self._episodes}")
        if self._last["success_rate"] is not None:
            parts.append(f"success {self._last['success_rate']:.2f}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total_timesteps > step > 0 and elapsed > 0:
            parts.append(f"eta {_duration((self.total_timesteps - step) * elapsed / step)}")
        self.log(" | ".join(parts))
        self._line_time = now
        self._line_step = step
        self._pending_line = False

    # ---- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Emit the last progress line if one is pending, close the bar, flush and close the
        TensorBoard writer, stop the metrics server. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.progress_mode == "lines" and self._pending_line:
            self._emit_line(self._clock())
        if self._bar is not None:
            try:
                self._bar.close()
            finally:
                self._bar = None
        if self._writer is not None:
            try:
                self._writer.flush()
                self._writer.close()
            except Exception as err:  # noqa: BLE001
                self.log(f"warning: {TENSORBOARD_UNAVAILABLE}: closing the writer: {err}")
            self._writer = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
            self._http_server = self._http_thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
