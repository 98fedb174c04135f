"""HICRA credit assignment: masked normalization and scaling of step-wise rewards.

Source: seed ``003_59738506c3080b92.txt``, section "HICRA Credit Assignment". The assigner
consumes a batch of step-wise rollout rewards ``(B, L)`` (``B`` trajectories, ``L`` steps,
optionally masked for variable-depth collaborations), normalizes them over the valid
entries when asked, and scales the result by ``multiplier`` (``planner_weight``). PPO then
computes returns/advantages from these credits instead of the raw rewards. When disabled
the assigner returns zeros and records no telemetry; the trainer should skip optimizer
steps for an all-zero credit batch (:func:`credits_all_zero`).

Decisions (not fixed by the seed):

* **Normalization statistics are over all valid entries of the batch** (every ``(b, t)``
  with ``mask[b, t]``), not per trajectory: per-trajectory normalization would erase all
  signal from single-step trajectories and make credits incomparable across rows. The
  std is the population std (``ddof=0``), so normalized valid credits have mean 0 and
  variance ``(std / (std + eps))**2`` ~= 1. Statistics are computed in float64; the output
  has the input's dtype and device.
* **Degenerate batches give exact zeros**: with ``normalize`` on, if the valid rewards are
  all equal (including a single valid entry, where std = 0), the centred rewards are
  exactly 0 and so are the credits, whatever the multiplier. With no valid entry at all,
  every credit is 0.
* **Padding is never read**: entries outside the mask are exactly 0 in the output and
  their reward values (even NaN/inf padding) do not affect anything. Non-finite rewards
  *inside* the mask raise :class:`ValueError`.
* Credits are targets, not a differentiable path: they are computed under
  ``torch.no_grad()`` and detached.
* ``multiplier`` must be finite and ``>= 0`` (a negative weight would invert the
  learning signal); ``normalization_eps`` must be finite and ``> 0``.

Telemetry (``prometheus_client``, only while enabled; seed metric names):

* ``hicra_planner_reward_ratio`` (Gauge): mean over trajectories of
  ``reward[first valid step] / sum(valid rewards)``, skipping trajectories with no valid
  step or whose total is ~0 (``|total| <= 1e-9 * sum(|valid rewards|)``, or exactly 0).
  Left unchanged when no trajectory qualifies.
* ``hicra_depth`` (Gauge): mean number of valid steps over trajectories with at least
  one valid step (left unchanged when there is none).
* ``hicra_success_total`` (Counter): trajectories whose summed valid raw reward is ``> 0``.

Collectors are created once per registry and shared by every assigner using it.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidConfig

__all__ = [
    "FIELD_ALIASES",
    "HICRAConfig",
    "HICRACreditAssigner",
    "HICRAMetrics",
    "build_hicra_from_dict",
    "credits_all_zero",
    "hicra_metrics",
]

#: Accepted spellings of each :class:`HICRAConfig` field (the canonical name first).
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "enabled": ("enabled",),
    "multiplier": ("multiplier", "planner_weight", "plannerWeight"),
    "normalize": ("normalize",),
    "normalization_eps": ("normalization_eps", "eps", "epsilon", "normalizationEps"),
}
_CANONICAL: dict[str, str] = {
    alias: field for field, aliases in FIELD_ALIASES.items() for alias in aliases
}

# A trajectory total this small relative to its absolute reward mass counts as ~0.
_RATIO_REL_TOL = 1e-9


def _resolve_aliases(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Map every key to its canonical field name.

    Unknown keys are passed through unchanged (pydantic's ``extra="forbid"`` names them).
    The same field given under two spellings is accepted only with equal values.

    Raises:
        ValueError: conflicting values, naming both spellings.
    """
    resolved: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in raw.items():
        field = _CANONICAL.get(key, key) if isinstance(key, str) else key
        if field in resolved:
            first = source[field]
            if resolved[field] != value:
                raise ValueError(
                    f"{field}: conflicting values given as {first!r} ({resolved[field]!r}) "
                    f"and {key!r} ({value!r})"
                )
            continue
        resolved[field] = value
        source[field] = key
    return resolved


class HICRAConfig(BaseModel):
    """HICRA settings (seed 003 "Configuration knobs").

    Fields (aliases in :data:`FIELD_ALIASES`):

    * ``enabled`` -- when ``False`` the assigner emits zeros and records no telemetry.
    * ``multiplier`` (``planner_weight``, ``plannerWeight``) -- dimensionless scale of the
      final credits, finite and ``>= 0``.
    * ``normalize`` -- masked zero-mean/unit-variance scaling over the valid entries.
    * ``normalization_eps`` (``eps``, ``epsilon``, ``normalizationEps``) -- added to the
      std (in reward units) before dividing; finite and ``> 0``.

    Unknown keys are rejected; the same field under two spellings must agree.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    enabled: bool = True
    multiplier: float = Field(1.0, ge=0)
    normalize: bool = True
    normalization_eps: float = Field(1e-8, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return _resolve_aliases(data)
        return data


def _format_errors(err: ValidationError, path: str) -> str:
    messages: list[str] = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e.get("loc", ())]
        where = ".".join([path, *loc]) if path else (".".join(loc) or "<root>")
        kind = e.get("type", "")
        if kind == "extra_forbidden":
            accepted = ", ".join(a for aliases in FIELD_ALIASES.values() for a in aliases)
            msg = f"unknown field (accepted: {accepted})"
        elif kind == "value_error":
            text = str(e.get("ctx", {}).get("error", e.get("msg", "")))
            # alias conflicts already start with the field name
            field, sep, rest = text.partition(": ")
            if not loc and sep and field in FIELD_ALIASES:
                where, msg = (f"{path}.{field}" if path else field), rest
            else:
                msg = text
        else:
            msg = e.get("msg", "invalid value")
            if "input" in e:
                msg = f"{msg} (got {e['input']!r})"
        messages.append(f"{where}: {msg}")
    return "; ".join(messages)


def build_hicra_from_dict(raw: Mapping[str, Any] | None, path: str = "hicra") -> HICRAConfig:
    """Validate a ``hicra`` settings mapping, resolving aliases.

    Accepts the settings themselves (``{"enabled": True, "planner_weight": 2.0}``) or a
    mapping whose only key is ``"hicra"`` holding them (a nested ``hicra:`` block).
    ``None`` gives the defaults.

    Args:
        raw: the settings.
        path: dotted prefix for error messages.

    Returns:
        The frozen :class:`HICRAConfig`.

    Raises:
        InvalidConfig: unknown keys, conflicting aliases (both spellings named, e.g.
            ``hicra.multiplier: conflicting values given as 'multiplier' (1.0) and
            'planner_weight' (2.0)``), or invalid values.
    """
    if raw is None:
        return HICRAConfig()
    if not isinstance(raw, Mapping):
        raise InvalidConfig(f"{path}: must be an object, got {type(raw).__name__}")
    if set(raw) == {"hicra"} and isinstance(raw["hicra"], Mapping):
        raw = raw["hicra"]
    try:
        return HICRAConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise InvalidConfig(_format_errors(err, path)) from None


# -- telemetry ------------------------------------------------------------------------------


class HICRAMetrics:
    """The three HICRA collectors of one registry (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.planner_reward_ratio = _get_or_create(
            registry,
            Gauge,
            "hicra_planner_reward_ratio",
            "Mean over trajectories of first-step (planner) reward / total trajectory reward.",
        )
        self.depth = _get_or_create(
            registry,
            Gauge,
            "hicra_depth",
            "Mean number of valid steps (collaboration depth) per trajectory.",
        )
        self.success = _get_or_create(
            registry,
            Counter,
            "hicra_success",
            "Trajectories whose summed raw reward is positive.",
        )


def _get_or_create(registry: CollectorRegistry, kind: type, name: str, doc: str) -> Any:
    try:
        return kind(name, doc, registry=registry)
    except ValueError:
        # Already registered on this registry by someone else: reuse it if it is the
        # same kind of collector (prometheus_client has no public lookup).
        existing = getattr(registry, "_names_to_collectors", {}).get(name)
        if isinstance(existing, kind):
            return existing
        raise


_METRICS_LOCK = threading.Lock()
_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, HICRAMetrics] = (
    weakref.WeakKeyDictionary()
)


def hicra_metrics(registry: CollectorRegistry | None = None) -> HICRAMetrics:
    """The HICRA collectors on ``registry`` (default: the global registry), created once."""
    registry = REGISTRY if registry is None else registry
    with _METRICS_LOCK:
        metrics = _METRICS.get(registry)
        if metrics is None:
            metrics = HICRAMetrics(registry)
            _METRICS[registry] = metrics
        return metrics


# -- assigner -------------------------------------------------------------------------------


class HICRACreditAssigner:
    """Turns step-wise rewards ``(B, L)`` into HICRA credits ``(B, L)``.

    ``credits = multiplier * (r - mean) / (std + eps)`` on valid entries when
    ``normalize`` (``mean``/``std`` over all valid entries of the batch), else
    ``multiplier * r``; exactly 0 outside the mask; all zeros when disabled.

    Args:
        cfg: :class:`HICRAConfig` (a mapping is passed through
            :func:`build_hicra_from_dict`; ``None`` = defaults).
        registry: registry for the telemetry (default: the global
            ``prometheus_client.REGISTRY``). Collectors are created at construction
            only when enabled, and shared with other assigners on the same registry.
    """

    def __init__(
        self,
        cfg: HICRAConfig | Mapping[str, Any] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not isinstance(cfg, HICRAConfig):
            cfg = build_hicra_from_dict(cfg)
        self.config = cfg
        self.registry = registry
        self.metrics: HICRAMetrics | None = hicra_metrics(registry) if cfg.enabled else None

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any] | None, registry: CollectorRegistry | None = None
    ) -> HICRACreditAssigner:
        """``HICRACreditAssigner(build_hicra_from_dict(raw), registry)``."""
        return cls(build_hicra_from_dict(raw), registry)

    @staticmethod
    def _validate(rewards: Any, mask: Any) -> torch.Tensor:
        if not isinstance(rewards, torch.Tensor):
            raise ValueError(f"rewards: must be a torch.Tensor, got {type(rewards).__name__}")
        if rewards.dim() != 2:
            raise ValueError(f"rewards: must have shape (B, L), got {tuple(rewards.shape)}")
        if not rewards.is_floating_point():
            raise ValueError(f"rewards: must be a floating-point tensor, got {rewards.dtype}")
        if mask is None:
            return torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask: must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != rewards.shape:
            raise ValueError(
                f"mask: shape {tuple(mask.shape)} does not match rewards {tuple(rewards.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: must be a bool tensor (use mask.bool()), got {mask.dtype}")
        if mask.device != rewards.device:
            raise ValueError(f"mask: on {mask.device}, rewards on {rewards.device}")
        return mask

    def __call__(self, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Credits for a batch of step-wise rewards.

        Args:
            rewards: float tensor ``(B, L)``, reward per trajectory step (reward units).
            mask: bool tensor ``(B, L)``, ``True`` for valid steps; ``None`` = all valid.

        Returns:
            Detached tensor ``(B, L)`` with the dtype and device of ``rewards``.

        Raises:
            ValueError: ``rewards`` not a 2-D float tensor, ``mask`` of another shape /
                dtype / device, or a NaN/inf reward inside the mask.
        """
        with torch.no_grad():
            valid = self._validate(rewards, mask)
            r = torch.where(valid, rewards.detach().to(torch.float64), 0.0)
            if not bool(torch.isfinite(r).all()):
                bad = (valid & ~torch.isfinite(rewards)).nonzero()[0].tolist()
                raise ValueError(
                    f"rewards: non-finite value {rewards[bad[0], bad[1]].item()!r} at valid "
                    f"entry {tuple(bad)}"
                )
            cfg = self.config
            if not cfg.enabled:
                return torch.zeros_like(rewards, memory_format=torch.contiguous_format)

            count = int(valid.sum())
            if cfg.normalize:
                if count == 0:
                    centred = r
                else:
                    valid_r = r[valid]
                    if bool(valid_r.max() == valid_r.min()):
                        centred = torch.zeros_like(r)  # constant (or single) entries
                    else:
                        mean = valid_r.mean()
                        centred = torch.where(valid, r - mean, 0.0)
                        std = torch.sqrt(centred.square().sum() / count)
                        centred = centred / (std + cfg.normalization_eps)
                credits = centred * cfg.multiplier
            else:
                credits = r * cfg.multiplier
            credits = torch.where(valid, credits, 0.0)
            self._record(r, valid)
            return credits.to(rewards.dtype)

    def _record(self, r: torch.Tensor, valid: torch.Tensor) -> None:
        """Update the telemetry from raw rewards ``r`` (float64, 0 outside ``valid``)."""
        metrics = self.metrics
        if metrics is None or r.shape[0] == 0:
            return
        depth = valid.sum(dim=1)  # (B,)
        has_steps = depth > 0
        totals = r.sum(dim=1)
        metrics.success.inc(int((totals > 0).sum()))
        if not bool(has_steps.any()):
            return
        metrics.depth.set(float(depth[has_steps].to(torch.float64).mean()))
        first_idx = valid.to(torch.int8).argmax(dim=1)  # first True per row
        first = r.gather(1, first_idx.unsqueeze(1)).squeeze(1)
        mass = r.abs().sum(dim=1)
        usable = has_steps & (totals != 0) & (totals.abs() > _RATIO_REL_TOL * mass)
        if bool(usable.any()):
            ratio = (first[usable] / totals[usable]).mean()
            value = float(ratio)
            if math.isfinite(value):
                metrics.planner_reward_ratio.set(value)


def credits_all_zero(credits: Any, atol: float = 0.0) -> bool:
    """``True`` when every credit is within ``atol`` of 0 (an empty batch counts as zero).

    The PPO trainer skips its optimizer steps for such a batch (seed 003: "guard the PPO
    update so batches with all-zero credits do not trigger optimizer steps"). NaN credits
    are not zero.

    Args:
        credits: tensor (or array-like) of any shape.
        atol: absolute tolerance in credit units, ``>= 0``.
    """
    if not (atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"atol: must be finite and >= 0, got {atol!r}")
    if not isinstance(credits, torch.Tensor):
        credits = torch.as_tensor(credits)
    if credits.numel() == 0:
        return True
    if atol == 0:
        return not bool((credits != 0).any())
    return bool((credits.abs() <= atol).all())
