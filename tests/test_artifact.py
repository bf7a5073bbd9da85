"""Artifact ids and verification."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compilekit.artifact import MANIFEST, Artifact, compute_id, hash_files, sha256_file
from compilekit.errors import ArtifactError


def make_manifest(**over) -> dict:
    m = {
        "name": "tiny", "version": "1", "tags": [], "created": "2025-01-01T00:00:00Z", "status": "passed",
        "recipe": {"model": "tiny", "passes": ["fuse.attention"]}, "source": {"kind": "config"},
        "toolchain": {"torch": "2.13.0", "onnx": "1.19"}, "machine": {"cpu": "x86"},
        "signature": {"inputs": ["x"]}, "target": {"name": "onnxruntime"},
        "passes": [{"name": "fuse.attention", "seconds": 0.5}], "accuracy": {"max_abs": 1e-6},
        "latency": {"p50_ms": 1.0}, "files": {"model.onnx": "sha256:" + "0" * 64},
    }
    m.update(over)
    return m


def write_artifact(root: Path, files: dict[str, bytes], **over) -> Artifact:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    m = make_manifest(files=hash_files(root), **over)
    m["id"] = compute_id(m)
    (root / MANIFEST).write_text(json.dumps(m))
    return Artifact.load(root)


def test_sha256_file_and_hash_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "a.bin").write_bytes(b"")
    (tmp_path / MANIFEST).write_text("{}")
    # known digests: sha256("abc") and sha256("")
    abc = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(tmp_path / "b.bin", chunk=1) == abc
    files = hash_files(tmp_path)
    assert list(files) == ["b.bin", "sub/a.bin"]  # manifest excluded, sorted, posix paths
    assert files["sub/a.bin"] == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_compute_id_stable_across_key_order_and_processes():
    m = make_manifest()
    reordered = {k: m[k] for k in reversed(list(m))}
    reordered["recipe"] = dict(reversed(list(m["recipe"].items())))
    assert compute_id(m) == compute_id(reordered)
    assert compute_id(m).startswith("sha256:") and len(compute_id(m)) == 7 + 64
    # another interpreter (different hash seed) gives the same id
    code = ("import json,sys; from compilekit.artifact import compute_id; "
            "print(compute_id(json.loads(sys.stdin.read())))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(m), capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.stdout.strip() == compute_id(m)


@pytest.mark.parametrize("field,value", [
    ("files", {"model.onnx": "sha256:" + "1" * 64}),
    ("recipe", {"model": "tiny", "passes": []}),
    ("toolchain", {"torch": "2.11.0", "onnx": "1.19"}),
    ("version", "2"),
])
def test_compute_id_changes_with_content(field, value):
    assert compute_id(make_manifest(**{field: value})) != compute_id(make_manifest())


@pytest.mark.parametrize("field,value", [
    ("created", "2030-06-01T12:00:00Z"), ("latency", {"p50_ms": 9.0}), ("accuracy", {"max_abs": 0.1}),
    ("machine", {"cpu": "arm"}), ("passes", [{"name": "fuse.attention", "seconds": 7.0}]), ("tags", ["prod"]),
])
def test_compute_id_ignores_measured_values(field, value):
    assert compute_id(make_manifest(**{field: value})) == compute_id(make_manifest())


def test_compute_id_missing_field():
    m = make_manifest()
    del m["signature"]
    with pytest.raises(ArtifactError, match="signature"):
        compute_id(m)


def test_verify_passes_then_detects_tamper_missing_extra(tmp_path):
    art = write_artifact(tmp_path, {"model.onnx": b"graph", "model.onnx.data": b"weights"})
    assert (art.name, art.version, art.tags) == ("tiny", "1", [])
    art.verify()

    (tmp_path / "model.onnx.data").write_bytes(b"WEIGHTS")
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data has digest"):
        art.verify()
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match=r"missing file model\.onnx\.data"):
        art.verify()
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    art.verify()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match=r"unexpected file notes\.txt"):
        art.verify()


def test_verify_detects_edited_manifest(tmp_path):
    art = write_artifact(tmp_path, {"model.onnx": b"graph"})
    edited = Artifact(art.path, {**art.manifest, "recipe": {"model": "other"}})
    with pytest.raises(ArtifactError, match="does not match its content"):
        edited.verify()


@pytest.mark.parametrize("content,match", [
    (None, "is missing"), ("{not json", "cannot be read"), ("[1, 2]", "not a JSON object"),
    ('{"id": "sha256:00", "name": "x"}', "lacks version"),
])
def test_load_errors(tmp_path, content, match):
    if content is not None:
        (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(ArtifactError, match=match) as ei:
        Artifact.load(tmp_path)
    assert ei.value.hint


def test_load_missing_dir_and_bad_id(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        Artifact.load(tmp_path / "nope")
    art = write_artifact(tmp_path, {"model.onnx": b"g"})
    (tmp_path / MANIFEST).write_text(json.dumps({**art.manifest, "id": "md5:abc"}))
    with pytest.raises(ArtifactError, match="malformed id"):
        Artifact.load(tmp_path)
