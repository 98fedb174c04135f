"""Helpers for tests and benchmarks of the serving application.

* :func:`poison_artifact`: a copy of a trained artifact whose ``model.pt`` has one layer's
  weights set to NaN (the same state-dict keys and shapes, so it loads and deploys, and
  every inference fails): how the e2e tests inject a faulty canary.
* :func:`build_echo_app`: a tiny application (no torch) that stands for "an application the
  operator does not own" in tests of the REST adapter's read-modify-write.
"""

from __future__ import annotations

import io
from typing import Any

from ..artifacts import ArtifactStore, read_artifact

__all__ = ["poison_artifact", "build_echo_app"]


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

    src, dst = ArtifactStore(src_uri), ArtifactStore(dst_uri)
    dst.makedirs()
    for rel in src.list_files():
        if rel != "model.pt":
            dst.write_bytes(rel, src.read_bytes(rel))
    state = torch.load(io.BytesIO(src.read_bytes("model.pt")), map_location="cpu", weights_only=True)
    key = layer or next(k for k in state if k.startswith("actor.") and k.endswith(".weight"))
    if key not in state:
        raise KeyError(f"{src_uri}: model.pt has no layer {key!r} (layers: {', '.join(state)})")
    state[key] = torch.full_like(state[key], float("nan"))
    buf = io.BytesIO()
    torch.save(state, buf)
    dst.write_bytes("model.pt", buf.getvalue())
    snapshot = read_artifact(dst_uri)
    fingerprint = snapshot.fingerprint()
    # Keep fingerprint.json truthful for the copy (it is not covered by the fingerprint).
    record = src.read_json("fingerprint.json") if "fingerprint.json" in src.list_files() else {}
    if isinstance(record, dict):
        record = {**record, "fingerprint": fingerprint, "files": dict(snapshot.digests), "poisonedLayer": key}
        dst.write_json("fingerprint.json", record)
    return fingerprint


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
