"""The router's per-client feedback cap (``rl_engine.serving.feedback_cap``): who a client is,
how many feedbacks it may send per minute, and that memory stays bounded whatever keys arrive.

Time runs on a fake clock (the ``limits`` library's and the module's); the router answering 429
is tested in ``test_rayserve_serving.py``, and on real Ray Serve in ``tests/e2e/test_serving.py``.
"""

from __future__ import annotations

import time
import types

import limits.storage.memory
import pytest

from rl_engine.serving import feedback_cap as fc

T = 1_800_000_000.0  # a fixed "now" (Unix seconds)


@pytest.fixture
def clock(monkeypatch):
    """A fake Unix clock for the limiter and the module: ``clock.now`` (seconds), moved by hand."""
    fake = types.SimpleNamespace(now=T)
    module = types.SimpleNamespace(time=lambda: fake.now)
    monkeypatch.setattr(limits.storage.memory, "time", module)
    monkeypatch.setattr(fc, "time", module)
    return fake


def _swept(cap, expected, timeout=5.0):
    """Wait (real time) for the library's expiry sweep, a thread 10 ms after a count, to leave
    ``expected`` clients counted; returns how many are."""
    deadline = time.monotonic() + timeout
    while len(cap) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(cap)


@pytest.mark.parametrize("peer, values, key", [
    ("10.0.0.7", [], "address:10.0.0.7"),
    (None, [], "address:"),
    ("10.0.0.7", ["alice"], "header:alice"),
    ("10.0.0.7", [" spoofed , 203.0.113.9 "], "header:203.0.113.9"),  # appended by the gateway: the last one
    ("10.0.0.7", ["spoofed", "203.0.113.9"], "header:203.0.113.9"),  # a second line of the header, the same
    ("10.0.0.7", ["alice, "], "header:alice"),
    ("10.0.0.7", ["", " , "], "address:10.0.0.7"),  # nothing in it: the address
    ("::1", [], "address:::1"),
])
def test_client_key_is_the_headers_last_element_else_the_address(peer, values, key):
    assert fc.client_key(peer, values) == key


def test_a_long_client_key_is_kept_as_a_digest():
    key = fc.client_key("10.0.0.7", ["x" * 10_000])
    assert key.startswith("sha256:") and len(key) == 7 + 64
    assert key == fc.client_key(None, ["x" * 10_000]) != fc.client_key(None, ["x" * 10_001])
    assert fc.client_key(None, ["y" * 100]) == "header:" + "y" * 100


def test_a_client_gets_its_cap_per_minute_and_others_theirs(clock):
    cap = fc.FeedbackCap(3)
    assert [cap.hit("a") for _ in range(5)] == [True, True, True, False, False]
    assert cap.hit("b") and cap.retry_after("a") == 60
    clock.now += 59.5
    assert not cap.hit("a") and cap.retry_after("a") == 1
    clock.now += 0.5  # the window of a's first feedback has ended
    assert [cap.hit("a") for _ in range(4)] == [True, True, True, False]
    assert cap.retry_after("a") == 60


def test_no_cap_counts_and_keeps_nothing(clock):
    cap = fc.FeedbackCap(0)
    assert all(cap.hit(f"c{i}") for i in range(1000)) and len(cap) == 0


def test_clients_beyond_the_most_counted_share_one_count_until_windows_end(clock):
    cap = fc.FeedbackCap(2, max_clients=3)
    assert all(cap.hit(c) for c in "abc") and len(cap) == 3
    # d and e arrive while 3 clients are counted: both count as one, together at most 2 a minute
    assert [cap.hit("d"), cap.hit("e"), cap.hit("d")] == [True, True, False]
    assert cap.hit("a") and not cap.hit("a")  # a keeps its own count
    clock.now += 60
    assert cap.hit("f") and _swept(cap, 1) == 1  # the others' windows ended: f is counted on its own
    assert cap.hit("d") and cap.hit("d") and not cap.hit("d")


def test_memory_stays_bounded_under_a_flood_of_made_up_clients(clock):
    cap = fc.FeedbackCap(600, max_clients=100)
    allowed = sum(cap.hit(fc.client_key(None, [f"spoofed-{i}"])) for i in range(5000))
    assert len(cap) <= 101  # 100 clients and the shared count
    assert allowed == 100 + 600  # one feedback each for the first 100, then 600 a minute for all the rest
    clock.now += 61
    cap.hit("someone")
    assert _swept(cap, 1) == 1


@pytest.mark.parametrize("per_minute, max_clients", [(-1, 10), (5, 0)])
def test_invalid_caps_are_refused(per_minute, max_clients):
    with pytest.raises(ValueError, match="per_minute must be >= 0 and max_clients >= 1"):
        fc.FeedbackCap(per_minute, max_clients)
