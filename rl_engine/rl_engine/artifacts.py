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

Every file under the root except ``fingerprint.json`` is hashed: there is no separate
manifest, so a file added, removed, renamed or changed after approval changes the
fingerprint (``fingerprint.json`` is a record for humans and is never loaded).

Read-once loading: :func:`read_artifact` reads each file exactly once into an
:class:`ArtifactSnapshot`; the fingerprint is computed from those bytes and loaders take
their bytes from the same snapshot (:meth:`ArtifactSnapshot.file`), so what is verified is
what is loaded, even if the storage changes in between. A file name that the artifact's own
metadata gives (``policy.json`` ``stateDict``, ``metadata.json`` ``files``) must be a
relative ``/``-separated path inside the root, without ``.``/``..`` components, naming a
hashed file; anything else raises :class:`UnsafeArtifactReference`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import fsspec

__all__ = [
    "ARTIFACT_FILES",
    "FINGERPRINT_FILE",
    "FINGERPRINT_VERSION",
    "ArtifactError",
    "ArtifactSnapshot",
    "ArtifactStore",
    "FingerprintMismatch",
    "UnsafeArtifactReference",
    "check_reference",
    "read_artifact",
    "canonical_json",
    "compute_fingerprint",
    "fingerprint_digest",
    "file_digests",
    "evaluation_summary",
    "uri_parts",
    "delete_artifact",
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
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")


class ArtifactError(Exception):
    """The artifact is missing, unreadable or malformed (message names the file)."""


class FingerprintMismatch(ArtifactError):
    """The fingerprint of the bytes read is not the expected (approved) one.

    Attributes:
        uri: the artifact.
        expected: the fingerprint it had to have (``"sha256:<hex>"``).
        actual: the fingerprint of the bytes that were read.
        changed: files whose digest differs from ``fingerprint.json``'s record (``+name``:
            not in the record, ``-name``: in the record but absent); empty when there is no
            usable record. Diagnostic only: the record itself is not trusted.
    """

    def __init__(self, uri: str, expected: str, actual: str, changed: list[str], note: str) -> None:
        self.uri, self.expected, self.actual, self.changed = uri, expected, actual, changed
        super().__init__(
            f"artifact {uri}: fingerprint {actual} does not match the expected {expected}; {note}")


class UnsafeArtifactReference(ArtifactError):
    """A file name given by the artifact's own metadata is absolute, contains ``.``/``..``
    components, or names a file outside the hashed set (message names the field and path)."""


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


_SCHEME_OR_DRIVE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def check_reference(rel: Any, hashed: Mapping[str, Any], *, uri: str, where: str) -> str:
    """Check a file name that artifact metadata gives, e.g. ``policy.json`` ``stateDict``.

    Args:
        rel: the name as found in the metadata.
        hashed: the hashed files of the artifact (relative path -> anything).
        uri: the artifact (for the message).
        where: the field that gave the name, e.g. ``"policy.json stateDict"``.

    Returns:
        ``rel``, a relative ``/``-separated path naming a hashed file.

    Raises:
        UnsafeArtifactReference: not a non-empty string; absolute (``/x``, ``C:x``,
            ``s3://x``) or with backslashes; with empty, ``.`` or ``..`` components; or not
            one of the hashed files (``fingerprint.json`` never is).
    """
    prefix = f"{uri}: {where} names"
    if not isinstance(rel, str) or not rel:
        raise UnsafeArtifactReference(f"{prefix} {rel!r}: must be a non-empty relative file path")
    if rel.startswith("/") or "\\" in rel or _SCHEME_OR_DRIVE.match(rel):
        raise UnsafeArtifactReference(
            f"{prefix} {rel!r}: absolute paths and URIs are refused (name a file relative to the artifact root)")
    parts = rel.split("/")
    if ".." in parts:
        raise UnsafeArtifactReference(f"{prefix} {rel!r}: '..' components are refused")
    if any(p in ("", ".") for p in parts):
        raise UnsafeArtifactReference(f"{prefix} {rel!r}: empty or '.' path components are refused")
    if rel not in hashed:
        raise UnsafeArtifactReference(
            f"{prefix} {rel!r}: unknown file, not one of the artifact's fingerprinted files "
            f"({', '.join(sorted(hashed)) or 'none'})")
    return rel


@dataclass(frozen=True)
class ArtifactSnapshot:
    """Every file of an artifact, each read once, with its sha256 (see :func:`read_artifact`).

    Attributes:
        uri: the artifact root.
        files: relative path -> bytes, every file except :data:`FINGERPRINT_FILE`.
        digests: relative path -> lowercase hex sha256 of those bytes.
        record: the bytes of :data:`FINGERPRINT_FILE` (``None`` when absent): not hashed,
            never loaded, only used to say which file changed on a mismatch.
    """

    uri: str
    files: Mapping[str, bytes]
    digests: Mapping[str, str]
    record: bytes | None = field(default=None, repr=False)

    def file(self, rel: Any, where: str | None = None) -> bytes:
        """The bytes of a hashed file.

        Args:
            rel: relative path; when it comes from artifact metadata, pass ``where`` (the
                field that named it) so the message says where the name came from.

        Raises:
            UnsafeArtifactReference: ``rel`` is absolute, has ``.``/``..`` components,
                or is not a hashed file (when ``where`` is given).
            ArtifactError: ``rel`` is not in the artifact (``"<uri>: <rel> not found"``).
        """
        if where is None and isinstance(rel, str) and rel not in self.files:
            raise ArtifactError(f"{self.uri}: {rel} not found")
        return self.files[check_reference(rel, self.files, uri=self.uri, where=where or "the loader")]

    def json(self, rel: Any, where: str | None = None) -> Any:
        """:meth:`file` parsed as JSON. Raises :class:`ArtifactError` when not valid JSON."""
        data = self.file(rel, where)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ArtifactError(f"{self.uri}: {rel} is not valid JSON: {err}") from err

    def summary(self) -> dict[str, Any]:
        """The ``"summary"`` object of ``evaluation.json``.

        Raises:
            ArtifactError: ``evaluation.json`` is missing, not JSON, or has no ``summary`` object.
        """
        evaluation = self.json("evaluation.json")
        summary = evaluation.get("summary") if isinstance(evaluation, dict) else None
        if not isinstance(summary, dict):
            raise ArtifactError(f"{self.uri}: evaluation.json has no 'summary' object")
        return summary

    def fingerprint(self) -> str:
        """The fingerprint of exactly these bytes: ``"sha256:<64 hex>"`` (module docstring).

        Raises:
            ArtifactError: no usable ``evaluation.json`` summary.
        """
        return fingerprint_digest(dict(self.digests), self.summary())

    def verify(self, expected: str) -> str:
        """Check that these bytes have the fingerprint ``expected``; returns it.

        Raises:
            FingerprintMismatch: they do not; the message names the artifact, both
                fingerprints and the files that differ from ``fingerprint.json``'s record.
            ArtifactError: no usable ``evaluation.json`` summary.
        """
        actual = self.fingerprint()
        if actual == expected:
            return actual
        changed, note = self._changes()
        raise FingerprintMismatch(self.uri, expected, actual, changed, note)

    def _changes(self) -> tuple[list[str], str]:
        try:
            recorded = json.loads(self.record or b"null")
            recorded = recorded.get("files") if isinstance(recorded, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            recorded = None
        if not isinstance(recorded, dict):
            return [], (f"no {FINGERPRINT_FILE} record tells which file changed "
                        f"(fingerprinted files: {', '.join(sorted(self.files))})")
        changed = sorted(
            [rel for rel, d in self.digests.items() if rel in recorded and recorded[rel] != d]
            + [f"+{rel}" for rel in self.digests if rel not in recorded]
            + [f"-{rel}" for rel in recorded if rel not in self.digests])
        if not changed:
            return [], (f"every file matches {FINGERPRINT_FILE}'s record, so the record was rewritten too "
                        f"or the artifact is not the one approved")
        return changed, (f"files differing from {FINGERPRINT_FILE}'s record "
                         f"(+ added, - removed): {', '.join(changed)}")

    def check_metadata_references(self) -> None:
        """Check every file name in ``metadata.json`` ``files`` (when present) with
        :func:`check_reference`; ``{"fingerprint": "fingerprint.json"}`` is the one name
        allowed outside the hashed set.

        Raises:
            UnsafeArtifactReference: naming the key and the path.
            ArtifactError: ``metadata.json`` is not valid JSON.
        """
        if "metadata.json" not in self.files:
            return
        metadata = self.json("metadata.json")
        files = metadata.get("files") if isinstance(metadata, dict) else None
        if files is None:
            return
        if not isinstance(files, dict):
            raise UnsafeArtifactReference(f"{self.uri}: metadata.json files: must be an object name -> path")
        for key, rel in sorted(files.items()):
            if key == "fingerprint" and rel == FINGERPRINT_FILE:
                continue
            check_reference(rel, self.files, uri=self.uri, where=f"metadata.json files.{key}")


def read_artifact(uri: str) -> ArtifactSnapshot:
    """Read every file of the artifact once, into memory, and hash it.

    Each file is opened and read exactly once; everything derived from the snapshot (the
    fingerprint, the loaded policy) comes from those bytes. Memory: the artifact's size.

    Args:
        uri: artifact root (any fsspec URI or a local path).

    Returns:
        An :class:`ArtifactSnapshot`.

    Raises:
        ArtifactError: the URI cannot be opened, has no files, or a listed file vanished.
    """
    store = ArtifactStore(uri)
    rels = store.list_files()
    files: dict[str, bytes] = {}
    record: bytes | None = None
    for rel in rels:
        data = store.read_bytes(rel)
        if rel == FINGERPRINT_FILE:
            record = data
        else:
            files[rel] = data
    if not files:
        raise ArtifactError(f"{uri}: no artifact files found")
    digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    return ArtifactSnapshot(uri, files, digests, record)


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

    Reads every file under ``uri`` except ``fingerprint.json`` once (:func:`read_artifact`)
    and hashes those bytes with the evaluation summary parsed from the same bytes (see the
    module docstring for the exact definition). The trainer and the serving replica use
    this same code path, so they agree on the same bytes.

    Args:
        uri: artifact root, e.g. ``file:///tmp/x/run-1`` or ``s3://bucket/runs/run-1``.

    Returns:
        ``"sha256:<64 hex chars>"``.

    Raises:
        ArtifactError: the artifact or its ``evaluation.json`` is missing or malformed.
    """
    return read_artifact(uri).fingerprint()


def uri_parts(uri: str) -> tuple[str, list[str]]:
    """``(scheme, path components)`` of an fsspec URI or absolute local path, for prefix checks.

    A plain path is scheme ``file``; the scheme is lower-cased; one trailing ``/`` is dropped.
    Raises ValueError (the reason) for chained URIs (``::``), a ``file://host/...`` URI, a
    relative local path, and empty, ``.`` or ``..`` path components.
    """
    if "::" in uri:
        raise ValueError("chained URIs ('::') are refused")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if not _SCHEME_RE.match(scheme):
            raise ValueError(f"invalid scheme {scheme!r}")
        scheme = scheme.lower()
        if scheme == "file" and not rest.startswith("/"):
            raise ValueError("a file URI must be file:///<absolute path>")
    else:
        scheme, rest = "file", uri
        if not rest.startswith("/"):
            raise ValueError("a local path must be absolute")
    if rest.startswith("/"):  # the root of the file system (file:///x, memory:///x)
        rest = rest[1:]
    if rest.endswith("/"):
        rest = rest[:-1]
    parts = rest.split("/") if rest else []
    if ".." in parts:
        raise ValueError("'..' path components are refused")
    if any(p in ("", ".") for p in parts):
        raise ValueError("empty or '.' path components are refused")
    return scheme, parts


def delete_artifact(uri: str, under: str) -> bool:
    """Delete the artifact directory at ``uri`` (every file in it), which must lie strictly
    below ``under`` (same scheme, compared by path component: :func:`uri_parts`).

    Returns:
        True when something was deleted, False when nothing was there (idempotent).

    Raises:
        ValueError: ``uri`` is not strictly below ``under``, or either is malformed.
    """
    scheme, parts = uri_parts(uri)
    root_scheme, root_parts = uri_parts(under)
    if scheme != root_scheme or len(parts) <= len(root_parts) or parts[:len(root_parts)] != root_parts:
        raise ValueError(f"{uri!r} is not below {under!r}: refused")
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return False
    fs.rm(path, recursive=True)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m rl_engine.artifacts delete <uri> --under <prefix>``: what the operator's
    artifact-reclaim Job runs (``spec.artifactReclaimPolicy: Delete``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m rl_engine.artifacts", description="Artifact store maintenance.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("delete", help="delete one artifact directory")
    d.add_argument("uri", help="the artifact's fsspec URI")
    d.add_argument("--under", required=True, help="refuse unless the URI is strictly below this prefix")
    args = p.parse_args(argv)
    try:
        deleted = delete_artifact(args.uri, args.under)
    except (ValueError, OSError) as err:
        print(f"error: {err}")
        return 2
    print(f"{'deleted' if deleted else 'nothing at'} {args.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
