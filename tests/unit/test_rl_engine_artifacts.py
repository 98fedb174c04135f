"""Artifact fingerprint and termination-message encoding (torch-free, fast)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid

import pytest

from rl_engine.artifacts import (
    FINGERPRINT_FILE,
    ArtifactError,
    ArtifactStore,
    FingerprintMismatch,
    UnsafeArtifactReference,
    check_reference,
    compute_fingerprint,
    file_digests,
    read_artifact,
)
from rl_engine.termination import encode_termination_message, write_termination_message
from support import count_opens as _count_opens

SUMMARY = {"episodes": 3, "meanReturn": 12.5, "stdReturn": 0.5, "randomMeanReturn": 2.0}


def _make_artifact(root) -> str:
    (root / "sub").mkdir(parents=True)
    (root / "model.pt").write_bytes(b"\x00\x01weights")
    (root / "metadata.json").write_text('{"run": "r"}\n')
    (root / "sub" / "extra.txt").write_text("x")
    (root / "evaluation.json").write_text(json.dumps({"summary": SUMMARY, "other": [1, 2]}))
    return root.as_uri()


def _by_hand(root, summary) -> str:
    """Independent implementation of the documented fingerprint definition."""
    files = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.is_file() and p.name != FINGERPRINT_FILE
    )
    h = hashlib.sha256(b"rlops-artifact-fingerprint/v1\n")
    for rel in files:
        digest = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        h.update(f"{rel}\0{digest}\n".encode())
    canon = json.dumps(summary, sort_keys=True, separators=(",", ":")).encode()
    h.update(b"evaluation-summary\0" + canon + b"\n")
    return "sha256:" + h.hexdigest()


def test_fingerprint_matches_documented_definition(tmp_path):
    uri = _make_artifact(tmp_path)
    fp = compute_fingerprint(uri)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fp == _by_hand(tmp_path, SUMMARY)
    # Plain paths and file:// URIs agree.
    assert compute_fingerprint(str(tmp_path)) == fp
    assert set(file_digests(uri)) == {
        "model.pt", "metadata.json", "sub/extra.txt", "evaluation.json"
    }


def test_fingerprint_changes_with_any_file_and_ignores_fingerprint_json(tmp_path):
    uri = _make_artifact(tmp_path)
    before = compute_fingerprint(uri)
    (tmp_path / FINGERPRINT_FILE).write_text('{"fingerprint": "whatever"}')
    assert compute_fingerprint(uri) == before

    (tmp_path / "model.pt").write_bytes(b"\x00\x01weightz")
    changed = compute_fingerprint(uri)
    assert changed != before

    (tmp_path / "sub" / "new.bin").write_bytes(b"")
    assert compute_fingerprint(uri) != changed


def test_fingerprint_depends_on_file_names(tmp_path):
    uri = _make_artifact(tmp_path)
    before = compute_fingerprint(uri)
    (tmp_path / "metadata.json").rename(tmp_path / "metadata2.json")
    assert compute_fingerprint(uri) != before


def test_fingerprint_over_memory_filesystem():
    uri = f"memory://rlops-test-{uuid.uuid4().hex}/run-1"
    store = ArtifactStore(uri)
    store.write_bytes("model.pt", b"abc")
    store.write_json("evaluation.json", {"summary": SUMMARY})
    first = compute_fingerprint(uri)
    store.write_json("evaluation.json", {"summary": {**SUMMARY, "meanReturn": 12.6}})
    assert compute_fingerprint(uri) != first
    assert store.list_files() == ["evaluation.json", "model.pt"]


def test_missing_evaluation_is_an_artifact_error(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"abc")
    with pytest.raises(ArtifactError, match="evaluation.json not found"):
        compute_fingerprint(tmp_path.as_uri())
    with pytest.raises(ArtifactError, match="no artifact files"):
        compute_fingerprint((tmp_path / "empty").as_uri())


def test_torch_free_modules_do_not_import_torch():
    code = (
        "import sys, rl_engine, rl_engine.artifacts, rl_engine.config, rl_engine.errors, "
        "rl_engine.termination\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_termination_message_is_truncated_below_4096_bytes(tmp_path):
    payload = {"phase": "Failed", "reason": "TrainerError", "message": "é\"\\" * 5000}
    data = encode_termination_message(payload)
    assert len(data) < 4096
    decoded = json.loads(data)
    assert decoded["phase"] == "Failed" and decoded["reason"] == "TrainerError"
    assert decoded["message"].endswith("...") and decoded["message"].startswith("é\"\\")

    small = {"phase": "Succeeded", "metrics": {"meanReturn": float("nan")}, "fingerprint": "x"}
    assert json.loads(encode_termination_message(small)) == {
        "phase": "Succeeded", "metrics": {"meanReturn": None}, "fingerprint": "x"
    }
    path = tmp_path / "termination-log"
    assert write_termination_message(payload, str(path))
    assert path.stat().st_size < 4096
    assert not write_termination_message(payload, str(tmp_path / "no" / "such" / "dir"))


# ----------------------------------------------------------------- read-once snapshot


def test_read_artifact_reads_each_file_once_and_hashes_what_it_read(tmp_path, monkeypatch):
    uri = _make_artifact(tmp_path)
    approved = compute_fingerprint(uri)
    opens = _count_opens(monkeypatch, swap={"model.pt": b"tampered"})
    snap = read_artifact(uri)
    assert dict(opens) == {"model.pt": 1, "metadata.json": 1, "extra.txt": 1, "evaluation.json": 1}
    assert (tmp_path / "model.pt").read_bytes() == b"tampered"  # the swap happened
    assert snap.file("model.pt") == b"\x00\x01weights"          # the bytes hashed are the bytes kept
    assert snap.digests["model.pt"] == hashlib.sha256(b"\x00\x01weights").hexdigest()
    assert snap.fingerprint() == approved == snap.verify(approved)
    assert dict(opens) == {"model.pt": 1, "metadata.json": 1, "extra.txt": 1, "evaluation.json": 1}
    monkeypatch.undo()
    assert compute_fingerprint(uri) != approved


def _record(root, uri) -> None:
    (root / FINGERPRINT_FILE).write_text(json.dumps({"files": file_digests(uri)}))


def test_fingerprint_mismatch_names_the_artifact_both_fingerprints_and_the_files(tmp_path):
    uri = _make_artifact(tmp_path)
    approved = compute_fingerprint(uri)
    _record(tmp_path, uri)
    (tmp_path / "model.pt").write_bytes(b"other weights")
    (tmp_path / "sub" / "new.bin").write_bytes(b"")
    (tmp_path / "metadata.json").unlink()
    snap = read_artifact(uri)
    with pytest.raises(FingerprintMismatch) as exc:
        snap.verify(approved)
    err = exc.value
    assert isinstance(err, ArtifactError)
    assert (err.expected, err.actual) == (approved, compute_fingerprint(uri))
    assert err.changed == ["+sub/new.bin", "-metadata.json", "model.pt"]
    for part in (uri, approved, err.actual, "model.pt", "+sub/new.bin", "-metadata.json"):
        assert part in str(err)


def test_fingerprint_mismatch_without_record_lists_the_files(tmp_path):
    uri = _make_artifact(tmp_path)
    approved = compute_fingerprint(uri)
    (tmp_path / "evaluation.json").write_text(json.dumps({"summary": {**SUMMARY, "meanReturn": 99}}))
    with pytest.raises(FingerprintMismatch, match="no fingerprint.json record") as exc:
        read_artifact(uri).verify(approved)
    assert approved in str(exc.value) and uri in str(exc.value)
    assert "evaluation.json, metadata.json, model.pt, sub/extra.txt" in str(exc.value)


def test_fingerprint_json_is_neither_hashed_nor_loadable(tmp_path):
    uri = _make_artifact(tmp_path)
    (tmp_path / FINGERPRINT_FILE).write_text("{}")
    snap = read_artifact(uri)
    assert FINGERPRINT_FILE not in snap.files and snap.record == b"{}"
    with pytest.raises(UnsafeArtifactReference, match="unknown file"):
        snap.file(FINGERPRINT_FILE, where="policy.json stateDict")
    with pytest.raises(ArtifactError, match="fingerprint.json not found"):
        snap.file(FINGERPRINT_FILE)


@pytest.mark.parametrize("rel, fragment", [
    ("/etc/passwd", "absolute paths"),
    ("C:/weights.pt", "absolute paths"),
    ("s3://bucket/model.pt", "absolute paths"),
    ("file:///tmp/model.pt", "absolute paths"),
    ("sub\\..\\model.pt", "absolute paths"),
    ("../other/model.pt", "'..' components"),
    ("sub/../model.pt", "'..' components"),
    ("./model.pt", "'.' path components"),
    ("sub//extra.txt", "empty or '.'"),
    ("missing.pt", "unknown file"),
    (FINGERPRINT_FILE, "unknown file"),
    ("", "non-empty relative"),
    (None, "non-empty relative"),
])
def test_unsafe_references_are_refused(tmp_path, rel, fragment):
    uri = _make_artifact(tmp_path)
    (tmp_path / FINGERPRINT_FILE).write_text("{}")
    snap = read_artifact(uri)
    with pytest.raises(UnsafeArtifactReference, match=re.escape(fragment)) as exc:
        snap.file(rel, where="policy.json stateDict")
    assert "policy.json stateDict" in str(exc.value) and uri in str(exc.value)


def test_safe_references_are_the_hashed_bytes(tmp_path):
    uri = _make_artifact(tmp_path)
    snap = read_artifact(uri)
    assert snap.file("sub/extra.txt", where="metadata.json files.extra") == b"x"
    assert check_reference("model.pt", snap.files, uri=uri, where="w") == "model.pt"


@pytest.mark.parametrize("files, fragment", [
    ({"model": "/abs/model.pt"}, "files.model names '/abs/model.pt': absolute"),
    ({"history": "../run-0/training_history.json"}, "files.history names"),
    ({"config": "config_snapshot.yaml"}, "unknown file"),
    ({"evaluation": FINGERPRINT_FILE}, "unknown file"),
    (["model.pt"], "must be an object"),
])
def test_metadata_file_references_are_checked(tmp_path, files, fragment):
    uri = _make_artifact(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({"files": files}))
    with pytest.raises(UnsafeArtifactReference, match=re.escape(fragment)):
        read_artifact(uri).check_metadata_references()


def test_metadata_file_references_as_the_trainer_writes_them_pass(tmp_path):
    uri = _make_artifact(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps(
        {"files": {"model": "model.pt", "evaluation": "evaluation.json", "fingerprint": FINGERPRINT_FILE}}))
    read_artifact(uri).check_metadata_references()


def test_delete_artifact_only_below_the_given_prefix(tmp_path):
    from rl_engine.artifacts import delete_artifact, main

    root = tmp_path / "art"
    run = root / "ns" / "agent" / "run-1"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"x")
    sibling = root / "ns" / "other"
    sibling.mkdir()
    under = f"file://{root}/ns/agent"
    for bad in (f"file://{root}/ns/agent", f"file://{root}/ns/other", f"file://{root}/ns/agent/../other",
                f"{root}/ns/agent/run-1::file://x"):
        with pytest.raises(ValueError):
            delete_artifact(bad, under)
    assert sibling.exists()
    assert main(["delete", f"file://{run}", "--under", under]) == 0 and not run.exists()
    assert delete_artifact(f"file://{run}", under) is False  # already gone: nothing to do
    assert main(["delete", f"file://{sibling}", "--under", under]) == 2 and sibling.exists()
