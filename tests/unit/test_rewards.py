"""Seed 004 reward shaping: trailing z-score normalization and weighted mixing (fast, torch-free)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_engine.errors import InvalidConfig
from rl_engine.rewards import (
    COMPONENTS,
    RewardShaper,
    RewardWeights,
    TrailingZScore,
    from_config,
    parse_reward_shaping_config,
)

FAST = settings(max_examples=60, deadline=None, database=None)

values = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
wide_values = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
windows = st.integers(min_value=2, max_value=12)


def _reference(prev: list[float], x: float) -> float | None:
    """Naive numpy score of ``x`` against ``prev``; ``None`` when numerically borderline."""
    if len(prev) < 2:
        return 0.5
    arr = np.asarray(prev, dtype=np.float64)
    mean, std = float(arr.mean()), float(arr.std())
    if std == 0.0 or std <= 1e-13 * abs(mean):
        return 0.5
    scale = max(1.0, float(np.abs(arr).max()), abs(x))
    if std <= 1e-6 * scale:
        return None  # too close to the degenerate threshold / float resolution to compare
    return min(1.0, max(0.0, ((x - mean) / std + 2.0) / 4.0))


@st.composite
def weight_sets(draw) -> dict[str, float]:
    raw = draw(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=4, max_size=4))
    total = sum(raw)
    if total == 0:
        raw, total = [1.0, 0.0, 0.0, 0.0], 1.0
    w = [x / total for x in raw]
    w[0] = max(0.0, 1.0 - sum(w[1:]))  # exact-ish sum of 1
    return dict(zip(COMPONENTS, w))


# -- TrailingZScore ---------------------------------------------------------------------


@FAST
@given(stream=st.lists(wide_values, max_size=80), window=windows)
def test_normalized_outputs_always_in_unit_interval(stream, window):
    norm = TrailingZScore(window)
    for x in stream:
        out = norm.update(x)
        assert 0.0 <= out <= 1.0
        assert len(norm) <= window


@FAST
@given(c=wide_values, n=st.integers(min_value=1, max_value=40), window=windows)
def test_constant_stream_maps_to_one_half(c, n, window):
    norm = TrailingZScore(window)
    assert [norm.update(c) for _ in range(n)] == [0.5] * n
    assert norm.std == 0.0


def test_fewer_than_two_samples_give_one_half():
    norm = TrailingZScore(10)
    assert norm.update(123.0) == 0.5  # empty window
    assert norm.update(-5.0) == 0.5  # one sample: no spread
    assert norm.score(1e6) == 1.0  # two samples now


@FAST
@given(
    base=st.lists(values, min_size=2, max_size=30),
    k=st.floats(min_value=-6.0, max_value=6.0),
)
def test_z_score_mapping_against_window(base, k):
    norm = TrailingZScore(len(base))
    for x in base:
        norm.push(x)
    arr = np.asarray(base)
    mean, std = arr.mean(), arr.std()
    if std <= 1e-6 * max(1.0, np.abs(arr).max()):
        return
    x = mean + k * std
    expected = min(1.0, max(0.0, (k + 2.0) / 4.0))
    assert norm.score(x) == pytest.approx(expected, abs=1e-7)


def test_two_std_above_the_mean_is_clipped_to_one():
    norm = TrailingZScore(1000)
    for x in (1.0, 3.0) * 50:  # mean 2, population std 1
        norm.push(x)
    assert norm.mean == pytest.approx(2.0) and norm.std == pytest.approx(1.0)
    assert norm.score(4.0) == pytest.approx(1.0)  # z = +2
    assert norm.score(100.0) == 1.0  # clipped
    assert norm.score(0.0) == pytest.approx(0.0)  # z = -2
    assert norm.score(-100.0) == 0.0
    assert norm.score(2.0) == pytest.approx(0.5)
    assert norm.score(3.0) == pytest.approx(0.75)


def test_current_sample_is_scored_before_it_joins_the_window():
    norm = TrailingZScore(3)
    for x in (0.0, 2.0):  # mean 1, std 1
        norm.push(x)
    assert norm.update(3.0) == 1.0  # z = +2 against [0, 2], not against [0, 2, 3]
    assert list(norm.values()) == [0.0, 2.0, 3.0]


@FAST
@given(stream=st.lists(values, max_size=80), window=windows)
def test_matches_naive_numpy_recomputation(stream, window):
    norm = TrailingZScore(window)
    for i, x in enumerate(stream):
        prev = stream[max(0, i - window) : i]
        expected = _reference(prev, x)
        got = norm.update(x)
        if expected is not None:
            assert got == pytest.approx(expected, abs=1e-6), (prev, x)
    tail = np.asarray(stream[-window:], dtype=np.float64)
    assert norm.values().tolist() == tail.tolist()
    if len(tail):
        assert norm.mean == pytest.approx(float(tail.mean()), rel=1e-9, abs=1e-9)
    if len(tail) >= 2:
        assert norm.std == pytest.approx(float(tail.std()), rel=1e-6, abs=1e-9)


@FAST
@given(
    prefix_a=st.lists(wide_values, max_size=30),
    prefix_b=st.lists(wide_values, max_size=30),
    window=windows,
    data=st.data(),
)
def test_window_forgets_samples_older_than_window(prefix_a, prefix_b, window, data):
    # after `window` shared samples, whatever came before no longer matters
    tail = data.draw(st.lists(values, min_size=window, max_size=window + 10))
    probes = data.draw(st.lists(values, min_size=1, max_size=5))
    a, b = TrailingZScore(window), TrailingZScore(window)
    for x in prefix_a + tail:
        a.update(x)
    for x in prefix_b + tail:
        b.update(x)
    assert a.values().tolist() == b.values().tolist() == tail[-window:]
    last = tail[-window:]
    for p in probes:
        expected = _reference(last, p)
        if expected is not None:
            assert a.score(p) == pytest.approx(expected, abs=1e-6)
            assert b.score(p) == pytest.approx(expected, abs=1e-6)
        a.update(p)
        b.update(p)
        last = last[1:] + [p]


def test_no_drift_after_large_values_leave_the_window():
    norm = TrailingZScore(5)
    for x in [1e12, -3e11, 7e10, 1e12, 5e11] + [1.0, 2.0, 3.0, 4.0, 5.0]:
        norm.update(x)
    assert norm.mean == 3.0
    assert norm.std == pytest.approx(math.sqrt(2.0), rel=1e-12)
    for x in [7.0] * 5:  # then constant: exactly degenerate again
        norm.update(x)
    assert norm.std == 0.0 and norm.score(1e6) == 0.5


def test_long_stream_stays_accurate():
    rng = np.random.default_rng(0)
    stream = rng.normal(50.0, 10.0, size=5000) * rng.choice([1.0, 1e4], size=5000)
    norm = TrailingZScore(100)
    for x in stream:
        norm.update(float(x))
    tail = stream[-100:]
    assert norm.mean == pytest.approx(tail.mean(), rel=1e-12)
    assert norm.std == pytest.approx(tail.std(), rel=1e-10)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e101, "1.0", None, True])
def test_invalid_inputs_raise_value_error_and_change_nothing(bad):
    norm = TrailingZScore(4)
    norm.update(1.0)
    norm.update(2.0)
    before = norm.values().tolist()
    for method in (norm.update, norm.score, norm.push):
        with pytest.raises(ValueError):
            method(bad)
    assert norm.values().tolist() == before


@pytest.mark.parametrize("window", [0, -1, 2.5, True])
def test_invalid_window(window):
    with pytest.raises(ValueError, match="window"):
        TrailingZScore(window)


# -- weights ----------------------------------------------------------------------------


def test_default_weights_are_the_seed_weights():
    w = RewardWeights()
    assert w.as_tuple() == (0.40, 0.20, 0.15, 0.25)
    camel = RewardWeights.model_validate(
        {"taskCompletion": 0.4, "efficiency": 0.2, "codeQuality": 0.15, "userFeedback": 0.25}
    )
    assert camel == w


@FAST
@given(raw=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=4, max_size=4))
def test_weights_not_summing_to_one_are_rejected(raw):
    total = math.fsum(raw)
    if abs(total - 1.0) <= 1e-5:
        return
    with pytest.raises(ValueError, match="must sum to 1"):
        RewardWeights(**dict(zip(COMPONENTS, raw)))
    camel = {"taskCompletion": raw[0], "efficiency": raw[1], "codeQuality": raw[2], "userFeedback": raw[3]}
    with pytest.raises(InvalidConfig) as err:
        from_config({"weights": camel})
    msg = str(err.value)
    assert msg.startswith("rewardShaping.weights: weights must sum to 1")
    assert "taskCompletion=" in msg and "userFeedback=" in msg


@FAST
@given(w=weight_sets())
def test_weights_summing_to_one_are_accepted(w):
    assert math.fsum(RewardWeights(**w).as_tuple()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "weights, where",
    [
        ({"taskCompletion": 1.2, "efficiency": -0.2, "codeQuality": 0.0, "userFeedback": 0.0},
         "rewardShaping.weights.taskCompletion"),
        ({"taskCompletion": math.nan}, "rewardShaping.weights.taskCompletion"),
        ({"efficiency": math.inf}, "rewardShaping.weights.efficiency"),
        ({"effciency": 0.2}, "rewardShaping.weights.effciency: unknown field"),
    ],
)
def test_invalid_weights_name_the_field(weights, where):
    with pytest.raises(InvalidConfig) as err:
        from_config({"weights": weights})
    assert str(err.value).startswith(where)


def test_config_parsing():
    cfg = parse_reward_shaping_config({"weights": {"taskCompletion": 0.4}, "window": 50})
    assert cfg.window == 50 and cfg.weights == RewardWeights()
    assert parse_reward_shaping_config(None).window == 1000
    shaper = from_config({"window": 10})
    assert shaper.window == 10 and shaper.weights == RewardWeights()
    with pytest.raises(InvalidConfig, match=r"^rewardShaping\.window: "):
        from_config({"window": 1})
    with pytest.raises(InvalidConfig, match=r"^rewardShaping\.extra: unknown field"):
        from_config({"extra": 1})
    with pytest.raises(InvalidConfig, match=r"^rewardShaping: must be an object"):
        from_config([1, 2])
    with pytest.raises(InvalidConfig, match=r"^spec\.rewards\.window: "):
        from_config({"window": 0}, path="spec.rewards")


# -- RewardShaper -----------------------------------------------------------------------


rows = st.lists(st.tuples(*[wide_values] * 4), max_size=40)


@FAST
@given(w=weight_sets(), batch=rows, window=windows)
def test_shaped_reward_in_unit_interval_and_is_the_weighted_sum(w, batch, window):
    shaper = RewardShaper(w, window=window)
    shadow = {name: TrailingZScore(window) for name in COMPONENTS}
    for row in batch:
        out = shaper(dict(zip(COMPONENTS, row)))
        assert 0.0 <= out <= 1.0
        expected = sum(w[name] * shadow[name].update(x) for name, x in zip(COMPONENTS, row))
        assert out == pytest.approx(min(1.0, max(0.0, expected)), abs=1e-12)


@FAST
@given(batch=rows, window=windows)
def test_shape_batch_equals_row_by_row_calls(batch, window):
    a, b = RewardShaper(window=window), RewardShaper(window=window)
    arr = np.asarray(batch, dtype=np.float64).reshape(-1, 4)
    got = a.shape_batch(arr)
    assert got.shape == (len(batch),) and got.dtype == np.float64
    expected = [b(dict(zip(COMPONENTS, row))) for row in batch]
    assert got.tolist() == expected
    assert np.all((got >= 0) & (got <= 1))


def test_constant_components_shape_to_one_half():
    shaper = RewardShaper()
    outs = [shaper(dict(zip(COMPONENTS, (1.0, 3.0, 0.7, -1.0)))) for _ in range(20)]
    assert outs == pytest.approx([0.5] * 20)


def test_shaper_uses_each_component_window_separately():
    shaper = RewardShaper({"task_completion": 1.0, "efficiency": 0.0, "code_quality": 0.0,
                           "user_feedback": 0.0}, window=4)
    for tc in (0.0, 2.0, 0.0, 2.0):  # mean 1, std 1
        shaper(dict(zip(COMPONENTS, (tc, 5.0, 5.0, 5.0))))
    assert shaper(dict(zip(COMPONENTS, (3.0, 100.0, -100.0, 0.0)))) == pytest.approx(1.0)
    assert shaper.normalizers["efficiency"].values().tolist() == [5.0, 5.0, 5.0, 100.0]


def test_missing_or_unknown_components_are_named_and_change_nothing():
    shaper = RewardShaper(window=5)
    shaper(dict.fromkeys(COMPONENTS, 1.0))
    with pytest.raises(ValueError) as err:
        shaper({"task_completion": 1.0, "efficiency": 1.0, "bogus": 2.0})
    msg = str(err.value)
    assert "code_quality" in msg and "user_feedback" in msg and "bogus" in msg
    assert "task_completion," not in msg.split("(expected")[0]
    with pytest.raises(ValueError, match="components.code_quality"):
        shaper({**dict.fromkeys(COMPONENTS, 1.0), "code_quality": math.nan})
    assert all(len(n) == 1 for n in shaper.normalizers.values())


def test_shape_batch_rejects_bad_input_before_any_update():
    shaper = RewardShaper(window=5)
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        shaper.shape_batch(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        shaper.shape_batch(np.zeros(4))
    bad = np.zeros((3, 4))
    bad[2, 1] = math.inf
    with pytest.raises(ValueError, match=r"batch\[2, 1\] \(efficiency\)"):
        shaper.shape_batch(bad)
    assert all(len(n) == 0 for n in shaper.normalizers.values())
    assert shaper.shape_batch(np.zeros((0, 4))).shape == (0,)
