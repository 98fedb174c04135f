"""Artifact I/O through fsspec and the artifact fingerprint (torch-free).

An artifact is a directory-like URI (``file:///data/runs/run-1``, ``s3://bucket/runs/run-1``,
or a plain local path) holding the files listed in :data:`ARTIFACT_FILES` plus
:data:`FINGERPRINT_FILE`.

Fingerprint definition (version 1)::

    h = sha256()
    h.update(b"rlops-artifact-fingerprint/v1\\n")
    for rel_path, file_sha256_hex in sorted(files):     # every file except fingerprint.json
        h.update(rel_path.encode() + b"\\x00" + file_sha256_hex.encode() + b"\\n")
    h.update(b"evaluation-summary\\x00" + canonical_json(summary) + b"\\n")
    fingerprint = "sha256:" + h.hexdigest()

where ``rel_path`` is the file path relative to the artifact root with ``/`` separators,
``summary`` is the ``"summary"`` object of ``evaluation.json`` and ``canonical_json`` is
``json.dumps(summary, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
allow_nan=False)`` encoded as UTF-8. The operator recomputes it with
:func:`compute_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

import fsspec

__all__ = [
    "ARTIFACT_FILES",
    "FINGERPRINT_FILE",
    "FINGERPRINT_VERSION",
    "ArtifactError",
    "ArtifactStore",
    "canonical_json",
    "compute_fingerprint",
    "fingerprint_digest",
    "file_digests",
    "evaluation_summary",
]

FINGERPRINT_FILE = "fingerprint.json"
FINGERPRINT_VERSION = "rlops-artifact-fingerprint/v1"
ARTIFACT_FILES = (
    "model.pt",
    "policy.json",
    "metadata.json",
    "training_history.json",
    "config_snapshot.yaml",
    "evaluation.json",
)
_CHUNK = 1 << 20


class ArtifactError(Exception):
    """The artifact is missing, unreadable or malformed (message names the file)."""


def canonical_json(data: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, ASCII, no NaN/inf.

    Raises:
        ValueError: if ``data`` contains NaN or infinity.
    """
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("utf-8")


def fingerprint_digest(files: dict[str, str], summary: Any) -> str:
    """The fingerprint from per-file sha256 digests and the evaluation summary.

    Args:
        files: relative path (``/``-separated) -> lowercase hex sha256 of the file's bytes;
            must not contain :data:`FINGERPRINT_FILE`.
        summary: the evaluation summary (``evaluation.json["summary"]``).

    Returns:
        ``"sha256:<64 hex chars>"``.
    """
    h = hashlib.sha256()
    h.update(FINGERPRINT_VERSION.encode("utf-8") + b"\n")
    for rel in sorted(files):
        h.update(rel.encode("utf-8") + b"\x00" + files[rel].encode("ascii") + b"\n")
    h.update(b"evaluation-summary\x00" + canonical_json(summary) + b"\n")
    return "sha256:" + h.hexdigest()


class ArtifactStore:
    """A directory-like artifact location opened through fsspec.

    Args:
        uri: ``file://``, ``s3://``, ``memory://`` ... or a plain local path. Remote
            protocols need their fsspec backend installed (e.g. ``s3fs`` for ``s3://``).
    """

    def __init__(self, uri: str) -> None:
        if not uri:
            raise ArtifactError("artifact URI is empty")
        self.uri = uri
        try:
            self.fs, root = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as err:
            raise ArtifactError(f"cannot open artifact URI {uri!r}: {err}") from err
        self.root = root.rstrip("/") or "/"

    def path(self, rel: str) -> str:
        """Backend path of ``rel`` (relative, ``/``-separated) under the artifact root."""
        return posixpath.join(self.root, rel)

    def makedirs(self) -> None:
        """Create the root directory (no-op on object stores)."""
        self.fs.makedirs(self.root, exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write (replace) the file ``rel``."""
        parent = posixpath.dirname(self.path(rel))
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(self.path(rel), "wb") as f:
            f.write(data)

    def write_json(self, rel: str, data: Any) -> None:
        """Write ``data`` as indented, key-sorted JSON (NaN/inf become ``null``)."""
        text = json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False)
        self.write_bytes(rel, (text + "\n").encode("utf-8"))

    def read_bytes(self, rel: str) -> bytes:
        """Read the file ``rel``. Raises :class:`ArtifactError` when missing."""
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                return f.read()
        except FileNotFoundError as err:
            raise ArtifactError(f"{self.uri}: {rel} not found") from err

    def read_json(self, rel: str) -> Any:
        """Read and parse the JSON file ``rel``. Raises :class:`ArtifactError`."""
        try:
            return json.loads(self.read_bytes(rel))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ArtifactError(f"{self.uri}: {rel} is not valid JSON: {err}") from err

    def list_files(self) -> list[str]:
        """Relative paths of all files under the root, sorted."""
        try:
            found = self.fs.find(self.root, withdirs=False)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        out: list[str] = []
        for p in found:
            p = self.fs._strip_protocol(p) if hasattr(self.fs, "_strip_protocol") else p
            if p.startswith(prefix):
                out.append(p[len(prefix):])
            elif p.startswith(prefix.lstrip("/")):  # some backends drop the leading slash
                out.append(p[len(prefix.lstrip("/")):])
        return sorted(out)

    def sha256(self, rel: str) -> str:
        """Lowercase hex sha256 of the file ``rel``, read in 1 MiB chunks."""
        h = hashlib.sha256()
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        except FileNotFoundError as err:
            raise ArtifactError(f"{self.uri}: {rel} not found") from err
        return h.hexdigest()


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if data == data and data not in (float("inf"), float("-inf")) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def file_digests(uri: str) -> dict[str, str]:
    """sha256 hex digest of every file of the artifact except :data:`FINGERPRINT_FILE`.

    Returns:
        relative path -> hex digest, e.g. ``{"model.pt": "9f2c..."}``.

    Raises:
        ArtifactError: if the artifact has no files.
    """
    store = ArtifactStore(uri)
    rels = [r for r in store.list_files() if r != FINGERPRINT_FILE]
    if not rels:
        raise ArtifactError(f"{uri}: no artifact files found")
    return {rel: store.sha256(rel) for rel in rels}


def evaluation_summary(uri: str) -> dict[str, Any]:
    """The ``"summary"`` object of the artifact's ``evaluation.json``.

    Raises:
        ArtifactError: if ``evaluation.json`` is missing or has no ``summary`` object.
    """
    evaluation = ArtifactStore(uri).read_json("evaluation.json")
    summary = evaluation.get("summary") if isinstance(evaluation, dict) else None
    if not isinstance(summary, dict):
        raise ArtifactError(f"{uri}: evaluation.json has no 'summary' object")
    return summary


def compute_fingerprint(uri: str) -> str:
    """Recompute the fingerprint of the artifact stored at ``uri``.

    Reads every file under ``uri`` except ``fingerprint.json`` and the evaluation summary
    (see the module docstring for the exact definition).

    Args:
        uri: artifact root, e.g. ``file:///tmp/x/run-1`` or ``s3://bucket/runs/run-1``.

    Returns:
        ``"sha256:<64 hex chars>"``.

    Raises:
        ArtifactError: the artifact or its ``evaluation.json`` is missing or malformed.
    """
    return fingerprint_digest(file_digests(uri), evaluation_summary(uri))
