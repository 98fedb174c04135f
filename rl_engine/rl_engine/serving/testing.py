"""Helpers for tests and benchmarks of the serving application.

* :func:`poison_artifact`: a copy of a trained artifact whose ``model.pt`` has one layer's
  weights set to NaN (the same state-dict keys and shapes, so it loads and deploys, and
  every inference fails): how the e2e tests inject a faulty canary.
* :func:`shift_action_preference`: a copy whose policy prefers one action a little more: it
  disagrees with the original where the original's choice was close (a shadow-mode candidate).
* :func:`build_echo_app`: a tiny application (no torch) that stands for "an application the
  operator does not own" in tests of the REST adapter's read-modify-write.
"""

from __future__ import annotations

import io
from typing import Any, Callable

from ..artifacts import ArtifactStore, read_artifact

__all__ = ["poison_artifact", "shift_action_preference", "build_echo_app"]


def _rewrite_artifact(src_uri: str, dst_uri: str, change: Callable[[dict], dict[str, Any]]) -> str:
    """Copy an artifact, ``change`` its state dict in place (it returns what to record in
    ``fingerprint.json``), and return the copy's fingerprint (recomputed, so a config naming it
    deploys)."""
    import torch

    src, dst = ArtifactStore(src_uri), ArtifactStore(dst_uri)
    dst.makedirs()
    for rel in src.list_files():
        if rel != "model.pt":
            dst.write_bytes(rel, src.read_bytes(rel))
    state = torch.load(io.BytesIO(src.read_bytes("model.pt")), map_location="cpu", weights_only=True)
    note = change(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    dst.write_bytes("model.pt", buf.getvalue())
    snapshot = read_artifact(dst_uri)
    fingerprint = snapshot.fingerprint()
    # Keep fingerprint.json truthful for the copy (it is not covered by the fingerprint).
    record = src.read_json("fingerprint.json") if "fingerprint.json" in src.list_files() else {}
    if isinstance(record, dict):
        dst.write_json("fingerprint.json", {**record, "fingerprint": fingerprint, "files": dict(snapshot.digests),
                                            **note})
    return fingerprint


def poison_artifact(src_uri: str, dst_uri: str, layer: str | None = None) -> str:
    """Copy the artifact at ``src_uri`` to ``dst_uri`` with NaN weights in one layer.

    Args:
        src_uri: a trained artifact (fsspec URI).
        dst_uri: where to write the copy (fsspec URI; existing files are replaced).
        layer: the state-dict key to poison; default: the actor's first weight matrix.

    Returns:
        The copy's fingerprint (recomputed, so a config naming it deploys).
    """
    import torch

    def change(state: dict) -> dict[str, Any]:
        key = layer or next(k for k in state if k.startswith("actor.") and k.endswith(".weight"))
        if key not in state:
            raise KeyError(f"{src_uri}: model.pt has no layer {key!r} (layers: {', '.join(state)})")
        state[key] = torch.full_like(state[key], float("nan"))
        return {"poisonedLayer": key}

    return _rewrite_artifact(src_uri, dst_uri, change)


def shift_action_preference(src_uri: str, dst_uri: str, action: int, delta: float) -> str:
    """Copy the artifact at ``src_uri`` to ``dst_uri`` with ``delta`` added to the logit of
    ``action`` (the bias of the actor's output layer): a policy that chooses ``action`` wherever
    the original's logit margin against it was below ``delta``, and agrees elsewhere. How the
    e2e tests make a shadow that disagrees with the stable version on a known set of observations.

    Returns:
        The copy's fingerprint.
    """
    def change(state: dict) -> dict[str, Any]:
        key = sorted(k for k in state if k.startswith("actor.") and k.endswith(".bias"))[-1]
        state[key][action] += float(delta)
        return {"shiftedAction": action, "shiftedBy": float(delta)}

    return _rewrite_artifact(src_uri, dst_uri, change)


def build_echo_app(args: dict[str, Any]):
    """``import_path: rl_engine.serving.testing:build_echo_app``: answers every request with
    ``{"echo": args["message"], "pid": ...}``. One replica, no CPU reserved."""
    import os

    from ray import serve

    @serve.deployment(name="echo", ray_actor_options={"num_cpus": 0})
    class Echo:
        def __init__(self, message: str) -> None:
            self.message = message

        async def __call__(self, request) -> dict[str, Any]:
            return {"echo": self.message, "pid": os.getpid()}

    return Echo.bind(str(args.get("message", "")))
