"""EpisodeTracker against a step-by-step reference, across rollouts (carry-over)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_engine.vector import EpisodeTracker


def _reference(rollouts, num_envs):
    """Per-step counters, the obvious way."""
    ret = [0.0] * num_envs
    length = [0] * num_envs
    out = []
    for rewards, dones in rollouts:
        ended_r, ended_l = [], []
        for t in range(len(rewards)):
            for n in range(num_envs):
                ret[n] += float(rewards[t][n])
                length[n] += 1
                if dones[t][n]:
                    ended_r.append(ret[n])
                    ended_l.append(length[n])
                    ret[n], length[n] = 0.0, 0
        out.append((ended_r, ended_l))
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(1, 4), st.integers(0, 2**32 - 1),
       st.floats(0.0, 0.9))
def test_matches_a_step_by_step_reference(num_envs, steps, num_rollouts, seed, p_done):
    rng = np.random.default_rng(seed)
    rollouts = [(rng.normal(size=(steps, num_envs)).astype(np.float32),
                 rng.random((steps, num_envs)) < p_done) for _ in range(num_rollouts)]
    tracker = EpisodeTracker(num_envs)
    got = [tracker.record(torch.from_numpy(r), torch.from_numpy(d.astype(np.float32)))
           for r, d in rollouts]
    expected = _reference(rollouts, num_envs)
    for (gr, gl), (er, el) in zip(got, expected):
        np.testing.assert_allclose(gr, er, rtol=1e-6, atol=1e-5)
        assert gl == el
