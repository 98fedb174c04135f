"""Seed 003 HICRA credit assignment: masked normalization, scaling, config aliases, telemetry."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from rl_engine.errors import InvalidConfig
from rl_engine.hicra import (
    HICRAConfig,
    HICRACreditAssigner,
    build_hicra_from_dict,
    credits_all_zero,
    hicra_metrics,
)

FAST = settings(max_examples=60, deadline=None, database=None)

METRICS = ("hicra_planner_reward_ratio", "hicra_depth", "hicra_success_total")


@st.composite
def batches(draw, min_valid: int = 0):
    """``(rewards float64 (B, L), mask bool (B, L))`` with rewards in [-100, 100]."""
    b = draw(st.integers(min_value=1, max_value=5))
    n = draw(st.integers(min_value=1, max_value=6))
    cells = st.floats(min_value=-100.0, max_value=100.0, allow_nan=False)
    rewards = draw(st.lists(st.lists(cells, min_size=n, max_size=n), min_size=b, max_size=b))
    mask = draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b))
    m = torch.tensor(mask, dtype=torch.bool)
    if int(m.sum()) < min_valid:
        m = torch.ones_like(m)
    return torch.tensor(rewards, dtype=torch.float64), m


def _assigner(registry=None, **cfg) -> HICRACreditAssigner:
    return HICRACreditAssigner(HICRAConfig(**cfg), registry=registry or CollectorRegistry())


def _metric_values(registry: CollectorRegistry) -> tuple:
    return tuple(registry.get_sample_value(name) for name in METRICS)


# -- masking and normalization ----------------------------------------------------------


@FAST
@given(batch=batches(), normalize=st.booleans(), data=st.data())
def test_mask_is_respected(batch, normalize, data):
    rewards, mask = batch
    assigner = _assigner(normalize=normalize, multiplier=1.5)
    credits = assigner(rewards, mask)
    assert credits.shape == rewards.shape and credits.dtype == rewards.dtype
    assert torch.all(credits[~mask] == 0)
    # anything in the padding (even NaN/inf) leaves the valid credits unchanged
    pad = data.draw(st.sampled_from([math.nan, math.inf, -1e9, 0.0, 42.0]))
    altered = torch.where(mask, rewards, torch.full_like(rewards, pad))
    assert torch.equal(assigner(altered, mask), credits)


@FAST
@given(batch=batches(min_valid=2))
def test_normalized_credits_have_zero_mean_unit_variance_over_valid_entries(batch):
    rewards, mask = batch
    valid = rewards[mask]
    if float(valid.std(unbiased=False)) < 1e-3:
        return  # (near-)constant: covered by the degenerate-case tests
    credits = _assigner(normalize=True)(rewards, mask)[mask]
    assert float(credits.mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(credits.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    # an affine change of the rewards (positive scale) gives the same credits
    again = _assigner(normalize=True)(rewards * 3.0 - 7.0, mask)[mask]
    assert torch.allclose(again, credits, atol=1e-6)


@FAST
@given(batch=batches(), normalize=st.booleans(), m=st.floats(min_value=0.0, max_value=50.0))
def test_multiplier_scales_linearly(batch, normalize, m):
    rewards, mask = batch
    base = _assigner(normalize=normalize, multiplier=1.0)(rewards, mask)
    scaled = _assigner(normalize=normalize, multiplier=m)(rewards, mask)
    assert torch.allclose(scaled, base * m, rtol=1e-12, atol=1e-12)


@FAST
@given(batch=batches(), m=st.floats(min_value=0.0, max_value=5.0))
def test_without_normalization_credits_are_scaled_masked_rewards(batch, m):
    rewards, mask = batch
    credits = _assigner(normalize=False, multiplier=m)(rewards, mask)
    assert torch.equal(credits, torch.where(mask, rewards * m, torch.zeros_like(rewards)))


@FAST
@given(batch=batches())
def test_mask_none_means_all_valid(batch):
    rewards, _ = batch
    assigner = _assigner()
    assert torch.equal(assigner(rewards), assigner(rewards, torch.ones_like(rewards, dtype=torch.bool)))


def test_hand_example():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    credits = _assigner(multiplier=2.0, normalization_eps=1e-12)(rewards, mask)
    # valid: [1, 2, 3, 0, -1], mean 1, population std sqrt(2)
    s = math.sqrt(2.0)
    expected = torch.tensor([[0.0, 2 / s, 4 / s], [-2 / s, -4 / s, 0.0]])
    assert torch.allclose(credits, expected, atol=1e-6)
    assert credits.dtype == torch.float32


@pytest.mark.parametrize(
    "rewards, mask",
    [
        ([[5.0, 1.0], [2.0, 3.0]], [[False, True], [False, False]]),  # single valid entry
        ([[4.0, 4.0], [4.0, 9.0]], [[True, True], [True, False]]),  # constant valid entries
        ([[1.0, 2.0], [3.0, 4.0]], [[False, False], [False, False]]),  # everything masked
        ([[0.1, 0.1, 0.1]], None),  # constant, not exactly representable
    ],
)
def test_degenerate_batches_give_exact_zero_credits(rewards, mask):
    r = torch.tensor(rewards, dtype=torch.float64)
    m = None if mask is None else torch.tensor(mask)
    credits = _assigner(multiplier=3.0)(r, m)
    assert torch.equal(credits, torch.zeros_like(r))
    assert credits_all_zero(credits)


def test_all_masked_rows_are_zero_and_others_still_normalized():
    rewards = torch.tensor([[1.0, 3.0], [7.0, 7.0]])
    mask = torch.tensor([[True, True], [False, False]])
    credits = _assigner(normalization_eps=1e-12)(rewards, mask)
    assert torch.allclose(credits, torch.tensor([[-1.0, 1.0], [0.0, 0.0]]), atol=1e-6)


def test_empty_batch():
    credits = _assigner()(torch.zeros((0, 4)))
    assert credits.shape == (0, 4)


def test_dtype_and_device_are_preserved():
    for dtype in (torch.float32, torch.float64, torch.float16):
        r = torch.tensor([[1.0, 2.0, 4.0]], dtype=dtype)
        out = _assigner()(r)
        assert out.dtype == dtype and out.device == r.device and not out.requires_grad
        off = _assigner(enabled=False)(r)
        assert off.dtype == dtype and off.shape == r.shape


@pytest.mark.parametrize(
    "rewards, mask, match",
    [
        (torch.tensor([[1.0, math.nan]]), None, "non-finite"),
        (torch.tensor([[1.0, math.inf]]), torch.tensor([[True, True]]), "non-finite"),
        (torch.zeros((2, 3)), torch.ones((2, 2), dtype=torch.bool), "shape"),
        (torch.zeros((2, 3)), torch.ones((2, 3)), "bool"),
        (torch.zeros(3), None, r"shape \(B, L\)"),
        (torch.zeros((1, 2, 3)), None, r"shape \(B, L\)"),
        (torch.zeros((2, 3), dtype=torch.long), None, "floating-point"),
        ([[1.0, 2.0]], None, "torch.Tensor"),
    ],
)
def test_invalid_inputs_raise_value_error(rewards, mask, match):
    for enabled in (True, False):
        with pytest.raises(ValueError, match=match):
            _assigner(enabled=enabled)(rewards, mask)


# -- disabled ---------------------------------------------------------------------------


@FAST
@given(batch=batches())
def test_disabled_returns_zeros_and_records_nothing(batch):
    rewards, mask = batch
    registry = CollectorRegistry()
    on = _assigner(registry)
    on(torch.tensor([[1.0, 2.0], [3.0, -4.0]]))
    before = _metric_values(registry)
    off = HICRACreditAssigner(HICRAConfig(enabled=False), registry=registry)
    credits = off(rewards, mask)
    assert torch.equal(credits, torch.zeros_like(rewards))
    assert credits_all_zero(credits)
    assert _metric_values(registry) == before


def test_disabled_assigner_registers_no_metrics():
    registry = CollectorRegistry()
    HICRACreditAssigner(HICRAConfig(enabled=False), registry=registry)(torch.ones((2, 2)))
    assert _metric_values(registry) == (None, None, None)


# -- telemetry --------------------------------------------------------------------------


def test_metrics_on_a_hand_example():
    registry = CollectorRegistry()
    assigner = _assigner(registry)
    assert _metric_values(registry) == (0.0, 0.0, 0.0)  # registered up front when enabled
    rewards = torch.tensor(
        [
            [2.0, 1.0, 1.0, 99.0],  # first 2, total 4 -> 0.5, depth 3, success
            [5.0, 1.0, -2.0, 0.0],  # first valid is step 1: 1 / (1 - 2) = -1, depth 2, no success
            [1.0, -1.0, 0.0, 0.0],  # total 0 -> skipped for the ratio, depth 2, no success
            [3.0, 3.0, 3.0, 3.0],  # fully masked: no depth, no ratio, no success
            [0.0, 0.0, 0.0, 6.0],  # first 0, total 6 -> 0, depth 4, success
        ]
    )
    mask = torch.tensor(
        [
            [True, True, True, False],
            [False, True, True, False],
            [True, True, False, False],
            [False, False, False, False],
            [True, True, True, True],
        ]
    )
    assigner(rewards, mask)
    ratio, depth, success = _metric_values(registry)
    assert ratio == pytest.approx((0.5 - 1.0 + 0.0) / 3)
    assert depth == pytest.approx((3 + 2 + 2 + 4) / 4)
    assert success == 2.0
    # the counter accumulates, the gauges track the latest batch
    assigner(torch.tensor([[1.0, 3.0]]))
    ratio, depth, success = _metric_values(registry)
    assert (ratio, depth, success) == (pytest.approx(0.25), 2.0, 3.0)


def test_metrics_use_raw_rewards_not_credits():
    registry = CollectorRegistry()
    _assigner(registry, multiplier=0.0)(torch.tensor([[2.0, 2.0]]))
    assert _metric_values(registry) == (0.5, 2.0, 1.0)


def test_ratio_gauge_unchanged_when_no_trajectory_qualifies():
    registry = CollectorRegistry()
    assigner = _assigner(registry)
    assigner(torch.tensor([[1.0, 1.0]]))
    assigner(torch.tensor([[1.0, -1.0]]))  # total 0
    assert registry.get_sample_value("hicra_planner_reward_ratio") == 0.5
    assert registry.get_sample_value("hicra_depth") == 2.0


def test_assigners_sharing_a_registry_share_collectors():
    registry = CollectorRegistry()
    a, b = _assigner(registry), _assigner(registry)
    assert a.metrics is b.metrics is hicra_metrics(registry)
    a(torch.tensor([[1.0]]))
    b(torch.tensor([[2.0], [3.0]]))
    assert registry.get_sample_value("hicra_success_total") == 3.0
    other = CollectorRegistry()
    assert hicra_metrics(other) is not a.metrics


# -- config -----------------------------------------------------------------------------


def test_defaults():
    cfg = build_hicra_from_dict({})
    assert cfg == HICRAConfig() == build_hicra_from_dict(None)
    assert (cfg.enabled, cfg.multiplier, cfg.normalize, cfg.normalization_eps) == (True, 1.0, True, 1e-8)


@pytest.mark.parametrize("key", ["multiplier", "planner_weight", "plannerWeight"])
def test_multiplier_aliases(key):
    assert build_hicra_from_dict({key: 2.5}).multiplier == 2.5
    assert HICRAConfig.model_validate({key: 2.5}).multiplier == 2.5


@pytest.mark.parametrize("key", ["normalization_eps", "eps", "epsilon", "normalizationEps"])
def test_eps_aliases(key):
    assert build_hicra_from_dict({key: 1e-6}).normalization_eps == 1e-6


def test_nested_hicra_block():
    cfg = build_hicra_from_dict({"hicra": {"enabled": False, "planner_weight": 0.5}})
    assert cfg.enabled is False and cfg.multiplier == 0.5


@FAST
@given(
    pair=st.sampled_from(
        [("multiplier", "planner_weight"), ("planner_weight", "plannerWeight"),
         ("eps", "epsilon"), ("normalization_eps", "normalizationEps"), ("eps", "normalization_eps")]
    ),
    a=st.floats(min_value=1e-6, max_value=10.0),
    b=st.floats(min_value=1e-6, max_value=10.0),
)
def test_conflicting_aliases_are_rejected_and_equal_ones_accepted(pair, a, b):
    first, second = pair
    field = "multiplier" if "eps" not in first and "epsilon" not in first else "normalization_eps"
    if a == b:
        assert getattr(build_hicra_from_dict({first: a, second: b}), field) == a
        return
    with pytest.raises(InvalidConfig) as err:
        build_hicra_from_dict({first: a, second: b})
    msg = str(err.value)
    assert msg.startswith(f"hicra.{field}: conflicting values")
    assert repr(first) in msg and repr(second) in msg


@pytest.mark.parametrize(
    "raw, prefix",
    [
        ({"plannerweight": 1.0}, "hicra.plannerweight: unknown field"),
        ({"multiplier": -1.0}, "hicra.multiplier: "),
        ({"multiplier": math.inf}, "hicra.multiplier: "),
        ({"eps": 0.0}, "hicra.normalization_eps: "),
        ({"epsilon": math.nan}, "hicra.normalization_eps: "),
        ({"enabled": "maybe"}, "hicra.enabled: "),
    ],
)
def test_invalid_config_names_the_field(raw, prefix):
    with pytest.raises(InvalidConfig) as err:
        build_hicra_from_dict(raw)
    assert str(err.value).startswith(prefix)


def test_invalid_config_types():
    with pytest.raises(InvalidConfig, match=r"^hicra: must be an object"):
        build_hicra_from_dict([1])
    with pytest.raises(InvalidConfig, match=r"^spec\.hicra\.foo: unknown field"):
        build_hicra_from_dict({"foo": 1}, path="spec.hicra")


def test_assigner_from_dict():
    registry = CollectorRegistry()
    assigner = HICRACreditAssigner.from_dict({"plannerWeight": 2.0, "normalize": False}, registry)
    assert torch.equal(assigner(torch.tensor([[1.0, 2.0]])), torch.tensor([[2.0, 4.0]]))


# -- credits_all_zero -------------------------------------------------------------------


@FAST
@given(batch=batches())
def test_credits_all_zero_property(batch):
    rewards, mask = batch
    credits = _assigner(multiplier=0.0)(rewards, mask)
    assert credits_all_zero(credits)
    nonzero = torch.where(mask, rewards, torch.zeros_like(rewards))
    assert credits_all_zero(nonzero) == (not bool((nonzero != 0).any()))


def test_credits_all_zero():
    assert credits_all_zero(torch.zeros((3, 4)))
    assert credits_all_zero(torch.zeros(0))
    assert credits_all_zero(-torch.zeros(2))  # -0.0 is zero
    assert not credits_all_zero(torch.tensor([0.0, 1e-30]))
    assert not credits_all_zero(torch.tensor([0.0, math.nan]))
    assert credits_all_zero(torch.tensor([0.0, 1e-9]), atol=1e-6)
    assert credits_all_zero([[0.0, 0.0]])
    with pytest.raises(ValueError, match="atol"):
        credits_all_zero(torch.zeros(1), atol=-1.0)
