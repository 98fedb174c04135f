"""Reward shaping: weighted sum of trailing-z-score-normalized reward components (torch-free).

Source: seed ``004_85a1da415e255767.txt`` ("Reward Computation"). A trajectory's reward has
four components, each normalized against its own recent history and then mixed with fixed
weights::

    total_reward = normalize(task_completion) * 0.40   # binary + partial credit
                 + normalize(efficiency)      * 0.20   # turns/time vs baseline
                 + normalize(code_quality)    * 0.15   # linters, tests, security
                 + normalize(user_feedback)   * 0.25   # explicit + implicit signals

    # normalize(): z-score across the trailing 1000 trajectories, mapped to [0, 1]
    z = (score - mean) / std
    normalized = (z + 2.0) / 4.0

The seed's map sends ``z = -2`` to 0 and ``z = +2`` to 1; values further out are clipped,
so every normalized component, and hence (weights summing to 1) the shaped reward, is in
``[0, 1]``.

Decisions (not fixed by the seed):

* **The current sample is scored against the window *before* it is added** ("trailing"
  means the previous ``window`` samples). The sample is appended afterwards, so it counts
  for the samples that follow. Scoring against a window that already contains the sample
  would shrink outliers (with ``n`` samples a point can never be more than
  ``(n - 1) / sqrt(n)`` population stds from a mean it contributes to), so a small window
  could never reach the clip points.
* **Population statistics** (``ddof=0``, ``numpy.std``'s default) over the window.
* **Degenerate windows map to 0.5** (the image of ``z = 0``): fewer than 2 samples in the
  window, or a zero standard deviation. ``std`` counts as zero when
  ``std <= 1e-12 * |mean|``, i.e. when the spread is below the float resolution of the
  window's values (exactly-constant streams always give exactly 0.5).
* **Inputs**: a component value must be a finite real number with ``|x| <= 1e100``
  (:data:`MAX_ABS_VALUE`; squared deviations then stay far from float overflow). Anything
  else raises :class:`ValueError` *before* any state changes.

Numerics: :class:`TrailingZScore` keeps a deque of the window plus a sliding Welford
mean / sum of squared deviations, so an update is O(1). Float drift is bounded by an exact
recompute (``math.fsum``, two-pass) every ``window`` updates -- O(1) amortized -- and
immediately whenever a removal cancels most of the running sum of squares (the case where
subtracting a large old value leaves relative garbage behind).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from .errors import InvalidConfig

__all__ = [
    "COMPONENTS",
    "DEFAULT_WINDOW",
    "MAX_ABS_VALUE",
    "RewardWeights",
    "RewardShapingConfig",
    "TrailingZScore",
    "RewardShaper",
    "from_config",
    "parse_reward_shaping_config",
]

#: Reward component names, in the fixed column order of :meth:`RewardShaper.shape_batch`.
COMPONENTS: tuple[str, ...] = ("task_completion", "efficiency", "code_quality", "user_feedback")

#: Trailing window length of the seed ("trailing 1000 trajectories").
DEFAULT_WINDOW = 1000

#: Largest accepted ``|component value|``; keeps squared deviations finite.
MAX_ABS_VALUE = 1e100

#: Upper bound on the configured window (memory: one float per sample per component).
MAX_WINDOW = 1_000_000

#: Tolerance of the weight-sum check.
WEIGHT_SUM_TOL = 1e-6

# std <= _DEGENERATE_REL_STD * |mean| is treated as std == 0.
_DEGENERATE_REL_STD = 1e-12
# Recompute exactly when the running sum of squares falls below this fraction of its peak
# since the last exact recompute (catastrophic cancellation after removing large values).
_CANCELLATION_RATIO = 1e-6


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
    )


class RewardWeights(_Model):
    """Mixing weights of the four components (seed 004 "Component Weights").

    Each weight is a dimensionless fraction in ``[0, 1]``; together they must sum to 1
    (within :data:`WEIGHT_SUM_TOL`), so the shaped reward stays in ``[0, 1]``. camelCase
    aliases: ``taskCompletion``, ``efficiency``, ``codeQuality``, ``userFeedback``.
    """

    task_completion: float = Field(0.40, ge=0, le=1)
    efficiency: float = Field(0.20, ge=0, le=1)
    code_quality: float = Field(0.15, ge=0, le=1)
    user_feedback: float = Field(0.25, ge=0, le=1)

    @model_validator(mode="after")
    def _check_sum(self) -> RewardWeights:
        total = math.fsum(self.as_tuple())
        if abs(total - 1.0) > WEIGHT_SUM_TOL:
            terms = " + ".join(
                f"{to_camel(name)}={getattr(self, name):g}" for name in COMPONENTS
            )
            raise ValueError(f"weights must sum to 1, got {terms} = {total:.12g}")
        return self

    def as_tuple(self) -> tuple[float, float, float, float]:
        """The weights in :data:`COMPONENTS` order."""
        return (self.task_completion, self.efficiency, self.code_quality, self.user_feedback)


class RewardShapingConfig(_Model):
    """``rewardShaping``: ``{"weights": {...}, "window": 1000}``.

    ``window`` is the number of trailing samples (trajectories) each component is
    normalized against, ``2 <= window <= 1_000_000``.
    """

    weights: RewardWeights = Field(default_factory=RewardWeights)
    window: int = Field(DEFAULT_WINDOW, ge=2, le=MAX_WINDOW)


def _check_value(x: Any, what: str) -> float:
    """``x`` as a float, or :class:`ValueError` naming ``what``."""
    if isinstance(x, bool) or not isinstance(x, (Real, np.floating, np.integer)):
        raise ValueError(f"{what}: must be a real number, got {type(x).__name__} {x!r}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{what}: must be finite, got {value!r}")
    if abs(value) > MAX_ABS_VALUE:
        raise ValueError(f"{what}: |value| must be <= {MAX_ABS_VALUE:g}, got {value!r}")
    return value


class TrailingZScore:
    """Z-score of a sample against the trailing ``window`` samples, mapped to ``[0, 1]``.

    ``normalized = clip(((x - mean) / std + 2) / 4, 0, 1)`` where ``mean`` and ``std``
    (population) are over the previous ``window`` samples; the sample itself is *not*
    part of the statistics it is scored with (see the module docstring). Fewer than 2
    samples, or ``std`` == 0 (``std <= 1e-12 * |mean|``), give 0.5.

    Typical use is :meth:`update` (score, then add). :meth:`score` and :meth:`push` are
    the two halves.

    Args:
        window: number of trailing samples kept, ``>= 1`` (``window == 1`` always scores
            0.5: one sample has no spread).
    """

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: must be an integer >= 1, got {window!r}")
        self._window = window
        self._values: deque[float] = deque()
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean over the window
        self._peak_m2 = 0.0
        self._since_recompute = 0

    # -- statistics ---------------------------------------------------------------------

    @property
    def window(self) -> int:
        """Maximum number of trailing samples."""
        return self._window

    def __len__(self) -> int:
        """Number of samples currently in the window (``<= window``)."""
        return len(self._values)

    @property
    def mean(self) -> float:
        """Mean of the window (0.0 when empty)."""
        return self._mean if self._values else 0.0

    @property
    def std(self) -> float:
        """Population standard deviation of the window (0.0 with fewer than 2 samples)."""
        n = len(self._values)
        if n < 2:
            return 0.0
        return math.sqrt(max(self._m2, 0.0) / n)

    def values(self) -> np.ndarray:
        """A copy of the window, oldest first (float64, shape ``(len(self),)``)."""
        return np.fromiter(self._values, dtype=np.float64, count=len(self._values))

    def reset(self) -> None:
        """Forget all samples."""
        self._values.clear()
        self._mean = 0.0
        self._m2 = 0.0
        self._peak_m2 = 0.0
        self._since_recompute = 0

    # -- scoring ------------------------------------------------------------------------

    def z(self, x: float) -> float:
        """Raw z-score of ``x`` against the window (0.0 when the window is degenerate)."""
        value = _check_value(x, "value")
        return self._z(value)

    def _z(self, value: float) -> float:
        if len(self._values) < 2:
            return 0.0
        mean = self._mean
        std = self.std
        if std <= _DEGENERATE_REL_STD * abs(mean) or std == 0.0:
            return 0.0
        return (value - mean) / std

    def score(self, x: float) -> float:
        """Normalized value of ``x`` in ``[0, 1]`` against the window; no state change.

        Raises:
            ValueError: ``x`` is not a finite real number with ``|x| <= 1e100``.
        """
        value = _check_value(x, "value")
        return self._map(self._z(value))

    @staticmethod
    def _map(z: float) -> float:
        return min(1.0, max(0.0, (z + 2.0) / 4.0))

    def push(self, x: float) -> None:
        """Add ``x`` to the window (dropping the oldest sample when full).

        Raises:
            ValueError: ``x`` is not a finite real number with ``|x| <= 1e100``.
        """
        self._push(_check_value(x, "value"))

    def update(self, x: float) -> float:
        """Score ``x`` against the window, then add it; returns the score in ``[0, 1]``.

        Raises:
            ValueError: ``x`` is not a finite real number with ``|x| <= 1e100`` (the
                window is left unchanged).
        """
        value = _check_value(x, "value")
        result = self._map(self._z(value))
        self._push(value)
        return result

    __call__ = update

    # -- sliding Welford ----------------------------------------------------------------

    def _push(self, value: float) -> None:
        if len(self._values) == self._window:
            self._remove(self._values.popleft())
        self._values.append(value)
        n = len(self._values)
        delta = value - self._mean
        self._mean += delta / n
        self._m2 += delta * (value - self._mean)
        self._peak_m2 = max(self._peak_m2, self._m2)
        self._since_recompute += 1
        if self._since_recompute >= self._window:
            self._recompute()

    def _remove(self, old: float) -> None:
        n = len(self._values)  # the deque no longer holds ``old``
        if n == 0:
            self._mean = 0.0
            self._m2 = 0.0
            return
        old_mean = self._mean
        self._mean = old_mean - (old - old_mean) / n
        self._m2 -= (old - old_mean) * (old - self._mean)
        if self._m2 < _CANCELLATION_RATIO * self._peak_m2:
            self._recompute()

    def _recompute(self) -> None:
        """Exact two-pass statistics of the current window (``math.fsum``)."""
        n = len(self._values)
        self._since_recompute = 0
        if n == 0:
            self._mean = self._m2 = self._peak_m2 = 0.0
            return
        mean = math.fsum(self._values) / n
        # one refinement step: removes the rounding of the division above
        mean += math.fsum(v - mean for v in self._values) / n
        self._mean = mean
        self._m2 = math.fsum((v - mean) * (v - mean) for v in self._values)
        self._peak_m2 = self._m2


class RewardShaper:
    """Seed 004 reward shaping: ``sum_k w_k * normalized_k(x_k)`` in ``[0, 1]``.

    Each component of :data:`COMPONENTS` has its own :class:`TrailingZScore` over the
    trailing ``window`` trajectories; a call scores every component against its window and
    then adds the sample. Calls are order-dependent (streaming state).

    Args:
        weights: :class:`RewardWeights` or a mapping accepted by it (snake_case or
            camelCase keys); ``None`` = the seed's 0.40/0.20/0.15/0.25.
        window: trailing window length in samples (trajectories), ``>= 1``.

    Raises:
        ValueError: invalid weights (pydantic ``ValidationError``) or window.
    """

    def __init__(
        self,
        weights: RewardWeights | Mapping[str, float] | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if weights is None:
            weights = RewardWeights()
        elif not isinstance(weights, RewardWeights):
            weights = RewardWeights.model_validate(dict(weights))
        self._weights = weights
        self._w = np.asarray(weights.as_tuple(), dtype=np.float64)
        self._normalizers = {name: TrailingZScore(window) for name in COMPONENTS}
        self._window = window

    @property
    def weights(self) -> RewardWeights:
        return self._weights

    @property
    def window(self) -> int:
        return self._window

    @property
    def normalizers(self) -> Mapping[str, TrailingZScore]:
        """Per-component normalizers (read them; mutating them changes the shaper)."""
        return dict(self._normalizers)

    def reset(self) -> None:
        """Forget the history of every component."""
        for norm in self._normalizers.values():
            norm.reset()

    def _row_values(self, components: Mapping[str, float]) -> list[float]:
        if not isinstance(components, Mapping):
            raise ValueError(
                f"components: must be a mapping of {', '.join(COMPONENTS)}, got "
                f"{type(components).__name__}"
            )
        missing = [name for name in COMPONENTS if name not in components]
        unknown = sorted(str(k) for k in components if k not in COMPONENTS)
        problems = []
        if missing:
            problems.append(f"missing component(s) {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown component(s) {', '.join(unknown)}")
        if problems:
            raise ValueError(
                f"components: {'; '.join(problems)} (expected exactly {', '.join(COMPONENTS)})"
            )
        return [_check_value(components[name], f"components.{name}") for name in COMPONENTS]

    def _shape_row(self, values: Sequence[float]) -> tuple[float, list[float]]:
        normalized = [
            self._normalizers[name].update(v) for name, v in zip(COMPONENTS, values)
        ]
        total = math.fsum(w * n for w, n in zip(self._w, normalized))
        # the weights sum to 1 only within 1e-6, so clip the rounding overshoot
        return min(1.0, max(0.0, total)), normalized

    def normalize(self, components: Mapping[str, float]) -> dict[str, float]:
        """Like :meth:`__call__` but returns the per-component normalized values.

        The state update is the same as :meth:`__call__`'s (each component is scored, then
        added to its window).
        """
        values = self._row_values(components)
        _, normalized = self._shape_row(values)
        return dict(zip(COMPONENTS, normalized))

    def __call__(self, components: Mapping[str, float]) -> float:
        """Shaped reward of one trajectory, in ``[0, 1]``.

        Args:
            components: raw component scores keyed by exactly the names in
                :data:`COMPONENTS` (any real units; each is normalized against its own
                trailing window).

        Raises:
            ValueError: missing or unknown component names (all are named), or a value
                that is not a finite real number with ``|x| <= 1e100``. Nothing is added
                to the windows on error.
        """
        values = self._row_values(components)
        total, _ = self._shape_row(values)
        return total

    def shape_batch(self, batch: Any) -> np.ndarray:
        """Shape ``B`` trajectories, row by row in order (row ``i`` sees rows ``< i``).

        Args:
            batch: array-like of shape ``(B, 4)``, columns in :data:`COMPONENTS` order.

        Returns:
            float64 array of shape ``(B,)`` with values in ``[0, 1]``.

        Raises:
            ValueError: wrong shape, or any non-finite / too-large / non-numeric entry
                (checked for the whole batch before any state changes).
        """
        try:
            arr = np.asarray(batch, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"batch: must be a numeric array of shape (B, 4): {err}") from None
        if arr.ndim != 2 or arr.shape[1] != len(COMPONENTS):
            raise ValueError(
                f"batch: must have shape (B, {len(COMPONENTS)}) with columns "
                f"{', '.join(COMPONENTS)}, got shape {arr.shape}"
            )
        bad = ~np.isfinite(arr) | (np.abs(arr) > MAX_ABS_VALUE)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"batch[{row}, {col}] ({COMPONENTS[col]}): must be finite with |x| <= "
                f"{MAX_ABS_VALUE:g}, got {arr[row, col]!r} ({int(bad.sum())} bad entries)"
            )
        out = np.empty(arr.shape[0], dtype=np.float64)
        for i, row_values in enumerate(arr.tolist()):
            out[i], _ = self._shape_row(row_values)
        return out


def _format_errors(err: ValidationError, path: str) -> str:
    messages: list[str] = []
    for e in err.errors(include_url=False):
        parts = [path] + [f"[{p}]" if isinstance(p, int) else str(p) for p in e.get("loc", ())]
        where = ".".join(p for p in parts if p).replace(".[", "[")
        kind = e.get("type", "")
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "value_error":
            msg = str(e.get("ctx", {}).get("error", e.get("msg", "")))
        else:
            msg = e.get("msg", "invalid value")
            if "input" in e:
                shown = repr(e["input"])
                msg = f"{msg} (got {shown[:77] + '...' if len(shown) > 80 else shown})"
        messages.append(f"{where}: {msg}")
    return "; ".join(messages)


def parse_reward_shaping_config(raw: Any, path: str = "rewardShaping") -> RewardShapingConfig:
    """Validate ``{"weights": {...}, "window": 1000}`` (camelCase or snake_case keys).

    Args:
        raw: the mapping (``None`` = all defaults).
        path: dotted prefix for error messages.

    Raises:
        InvalidConfig: e.g. ``rewardShaping.weights: weights must sum to 1, got
            taskCompletion=0.5 + efficiency=0.2 + codeQuality=0.15 + userFeedback=0.25 =
            1.1`` or ``rewardShaping.weights.effciency: unknown field``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidConfig(f"{path}: must be an object, got {type(raw).__name__}")
    try:
        return RewardShapingConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise InvalidConfig(_format_errors(err, path)) from None


def from_config(raw: Any, path: str = "rewardShaping") -> RewardShaper:
    """A :class:`RewardShaper` from the camelCase config ``{"weights": {...}, "window": N}``.

    Raises:
        InvalidConfig: messages start with the dotted field path (``rewardShaping.weights:
            ...``, ``rewardShaping.window: ...``).
    """
    cfg = parse_reward_shaping_config(raw, path)
    return RewardShaper(cfg.weights, cfg.window)
