"""The local content-addressed store: commit, dedupe, resolve, crash safety, concurrency."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import threading
from pathlib import Path

import pytest

from compilekit.artifact import MANIFEST, Artifact, compute_id
from compilekit.errors import ArtifactError
from compilekit.registry import LocalStore, default_store_path


def manifest(name: str = "tiny", version: str = "1", created: str = "2025-01-01T00:00:00Z", **over) -> dict:
    m = {"name": name, "version": version, "tags": [], "created": created, "status": "passed",
         "recipe": {"model": name}, "source": {"kind": "config"}, "toolchain": {"torch": "2.13.0"},
         "machine": {"cpu": "x86"}, "signature": {"inputs": ["x"]}, "target": {"name": "onnxruntime"},
         "passes": [], "accuracy": {}, "latency": {"p50_ms": 1.0}}
    m.update(over)
    return m


def put(store: LocalStore, files: dict[str, bytes] | None = None, **kw) -> Artifact:
    with store.staging() as staged:
        for rel, data in (files or {"model.onnx": b"graph"}).items():
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / rel).write_bytes(data)
        return store.commit(staged, manifest(**kw))


def stored_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "sha256").iterdir()) if (root / "sha256").exists() else []


def test_default_store_path(monkeypatch, tmp_path):
    monkeypatch.delenv("COMPILEKIT_REGISTRY", raising=False)
    assert default_store_path() == Path("artifacts")
    monkeypatch.setenv("COMPILEKIT_REGISTRY", str(tmp_path))
    assert default_store_path() == tmp_path


def test_commit_layout_and_verify(tmp_path):
    store = LocalStore(tmp_path)
    m = manifest()
    with store.staging() as staged:
        (staged / "model.onnx").write_bytes(b"graph")
        (staged / "weights").mkdir()
        (staged / "weights" / "model.onnx.data").write_bytes(b"w" * 1000)
        art = store.commit(staged, m)
    assert "files" not in m and "id" not in m  # caller's dict untouched
    hexd = art.id.removeprefix("sha256:")
    assert art.path == tmp_path / "sha256" / hexd
    assert sorted(art.manifest["files"]) == ["model.onnx", "weights/model.onnx.data"]
    assert art.id == compute_id(art.manifest)
    on_disk = Artifact.load(art.path)
    assert on_disk.manifest == art.manifest
    on_disk.verify()
    assert list((tmp_path / ".tmp").iterdir()) == []  # staging cleaned, no stray manifest temp files

    (art.path / "weights" / "model.onnx.data").write_bytes(b"x" * 1000)
    with pytest.raises(ArtifactError, match=r"weights/model\.onnx\.data"):
        on_disk.verify()
    (art.path / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        Artifact.load(art.path)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_staging_leaves_nothing(tmp_path, exc):
    store = LocalStore(tmp_path)
    with pytest.raises(exc):
        with store.staging() as staged:
            (staged / "model.onnx").write_bytes(b"half")
            raise exc()
    assert stored_dirs(tmp_path) == []
    assert list((tmp_path / ".tmp").iterdir()) == []
    assert store.list() == [] and store.list_broken() == []


def test_uncommitted_staging_is_removed(tmp_path):
    store = LocalStore(tmp_path)
    with store.staging() as staged:
        (staged / "f").write_bytes(b"x")
    assert not staged.exists() and stored_dirs(tmp_path) == []


def test_commit_rejects_foreign_dir(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ArtifactError, match="not a staging directory"):
        LocalStore(tmp_path / "store").commit(tmp_path / "elsewhere", manifest())


def test_identical_content_dedupes_and_latest_manifest_wins(tmp_path):
    store = LocalStore(tmp_path)
    a = put(store, created="2025-01-01T00:00:00Z")
    b = put(store, created="2025-02-02T00:00:00Z", latency={"p50_ms": 2.0})
    assert a.id == b.id and a.path == b.path
    assert stored_dirs(tmp_path) == [a.id.removeprefix("sha256:")]
    reread = Artifact.load(a.path)
    assert reread.created == "2025-02-02T00:00:00Z" and reread.manifest["latency"] == {"p50_ms": 2.0}
    reread.verify()
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_recommit_repairs_corrupt_copy(tmp_path):
    store = LocalStore(tmp_path)
    a = put(store)
    (a.path / "model.onnx").write_bytes(b"tampered")
    b = put(store)
    assert b.id == a.id
    Artifact.load(b.path).verify()
    assert (b.path / "model.onnx").read_bytes() == b"graph"


def test_resolve(tmp_path):
    store = LocalStore(tmp_path)
    v1 = put(store, {"m": b"1"}, version="1", created="2025-01-01T00:00:00Z")
    v2 = put(store, {"m": b"2"}, version="2", created="2025-03-01T00:00:00Z")
    v1b = put(store, {"m": b"1b"}, version="1", created="2025-02-01T00:00:00Z")
    other = put(store, {"m": b"o"}, name="other", created="2024-01-01T00:00:00Z")
    hex1 = v1.id.removeprefix("sha256:")

    assert store.resolve(v1.id).id == v1.id
    assert store.resolve(hex1[:6]).id == v1.id
    assert store.resolve("sha256:" + hex1[:10].upper()).id == v1.id
    assert store.resolve("tiny:2").id == v2.id
    assert store.resolve("tiny:1").id == v1b.id  # two builds of tiny:1: the newest wins
    assert store.resolve("tiny").id == v2.id
    assert store.resolve("other").id == other.id
    assert [a.id for a in store.list()] == [v2.id, v1b.id, v1.id, other.id]

    with pytest.raises(ArtifactError, match="no artifact matches 'nope'") as ei:
        store.resolve("nope")
    assert "tiny:2" in str(ei.value) and "compilekit artifacts list" in ei.value.hint
    with pytest.raises(ArtifactError, match="no artifact matches"):
        store.resolve("tiny:9")
    with pytest.raises(ArtifactError, match="no artifact with id"):
        store.resolve(compute_id(manifest(name="ghost", files={})))
    with pytest.raises(ArtifactError, match="not a valid id prefix"):
        store.resolve("sha256:" + hex1[:5])


def test_resolve_ambiguous_prefix(tmp_path):
    store = LocalStore(tmp_path)
    art = put(store)
    target = art.id.removeprefix("sha256:")
    # Real ids sharing 6 digits are too rare to build, so plant a directory that shares the prefix.
    twin = target[:6] + ("0" if target[6] != "0" else "1") * 58
    (tmp_path / "sha256" / twin).mkdir()
    with pytest.raises(ArtifactError, match="ambiguous") as ei:
        store.resolve(target[:6])
    assert target in str(ei.value) and twin in str(ei.value)
    assert store.resolve(target[:7]).id == art.id


def test_commit_losing_rename_race(tmp_path, monkeypatch):
    """Another writer stores the same id between our hashing and our rename: we fall back to it."""
    import compilekit.registry.local as local

    store = LocalStore(tmp_path)
    real_rename, raced = local.os.rename, {}

    def rename(src, dst):
        if "rival" not in raced and Path(dst).parent == tmp_path / "sha256":
            raced["rival"] = None  # set first: the rival's own commit calls rename too
            raced["rival"] = put(store, created="2025-01-01T00:00:00Z")  # the rival wins first
        return real_rename(src, dst)

    monkeypatch.setattr(local.os, "rename", rename)
    mine = put(store, created="2025-05-05T00:00:00Z")
    assert mine.id == raced["rival"].id and len(stored_dirs(tmp_path)) == 1
    assert Artifact.load(mine.path).created == "2025-05-05T00:00:00Z"
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_list_skips_broken(tmp_path):
    store = LocalStore(tmp_path)
    good = put(store)
    bad_json = tmp_path / "sha256" / ("a" * 64)
    bad_json.mkdir()
    (bad_json / MANIFEST).write_text("{oops")
    moved = tmp_path / "sha256" / ("b" * 64)
    moved.mkdir()
    (moved / MANIFEST).write_text(json.dumps(good.manifest))  # id does not match directory
    (tmp_path / "sha256" / "stray.txt").write_text("x")

    assert [a.id for a in store.list()] == [good.id]
    broken = dict(store.list_broken())
    assert set(broken) == {bad_json, moved, tmp_path / "sha256" / "stray.txt"}
    assert "cannot be read" in broken[bad_json] and "does not match" in broken[moved]
    assert store.resolve("tiny").id == good.id
    with pytest.raises(ArtifactError, match="does not match its directory"):
        store.resolve("b" * 64)


def test_remove(tmp_path):
    store = LocalStore(tmp_path)
    a = put(store, {"m": b"1"})
    b = put(store, {"m": b"2"}, version="2")
    assert store.remove(a.id[:13]).id == a.id
    assert [x.id for x in store.list()] == [b.id]
    assert not a.path.exists() and list((tmp_path / ".tmp").iterdir()) == []
    with pytest.raises(ArtifactError):
        store.remove(a.id)


def test_concurrent_commits_threads(tmp_path):
    store = LocalStore(tmp_path)
    barrier = threading.Barrier(8)
    results: list[Artifact] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with store.staging() as staged:
                (staged / "model.onnx").write_bytes(b"same" * 10000)
                barrier.wait()
                results.append(store.commit(staged, manifest(created=f"2025-01-0{i + 1}T00:00:00Z")))
        except BaseException as e:  # surfaced below; a thread's exception would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 8 and len({r.id for r in results}) == 1
    assert len(stored_dirs(tmp_path)) == 1
    Artifact.load(results[0].path).verify()
    assert list((tmp_path / ".tmp").iterdir()) == []


def _commit_in_process(root: str, start) -> str:
    start.wait()
    return put(LocalStore(Path(root)), {"model.onnx": b"proc" * 10000}).id


def test_concurrent_commits_processes(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as mgr:
        start = mgr.Event()
        with ctx.Pool(4) as pool:
            pending = [pool.apply_async(_commit_in_process, (str(tmp_path), start)) for _ in range(4)]
            start.set()
            ids = {p.get(timeout=60) for p in pending}
    assert len(ids) == 1 and len(stored_dirs(tmp_path)) == 1
    LocalStore(tmp_path).resolve(ids.pop()).verify()


def test_gc_removes_broken_entries_and_stale_staging_only(tmp_path):
    import os
    import time

    from click.testing import CliRunner

    from compilekit.cli import cli

    store = LocalStore(tmp_path)
    keep = put(store)
    gone = put(store, {"model.onnx": b"other"}, name="other")
    (gone.path / MANIFEST).unlink()  # broken: no manifest
    old = tmp_path / ".tmp" / "stage-crashed"
    old.mkdir(parents=True)
    (old / "model.onnx").write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    young = tmp_path / ".tmp" / "stage-running"
    young.mkdir()
    out = CliRunner().invoke(cli, ["artifacts", "gc", "--registry", str(tmp_path)])
    assert out.exit_code == 0 and "removed 1 broken entries, 1 stale staging dirs and 3 unreferenced blobs" in out.output
    assert stored_dirs(tmp_path) == [keep.id.removeprefix("sha256:")]
    assert not old.exists() and young.exists()  # a compile still staging keeps its directory
    out = CliRunner().invoke(cli, ["artifacts", "rm", keep.id, "--registry", str(tmp_path)])
    assert out.exit_code == 0 and stored_dirs(tmp_path) == []


def test_store_is_an_oci_image_layout(tmp_path):
    """The store root is an OCI image layout: each artifact's manifest (the bytes push uploads), config and
    file blobs (hard links, no copies), and an index whose name:version tag moves to the newest artifact."""
    import hashlib
    import os

    from compilekit.registry.oci import ARTIFACT_TYPE, package

    store = LocalStore(tmp_path)
    first = put(store, {"model.onnx": b"graph", "weights/model.onnx.data": b"w" * 1000})
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((tmp_path / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["digest"] == package(first).digest and entry["artifactType"] == ARTIFACT_TYPE
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "tiny:1"
    blobs = tmp_path / "blobs" / "sha256"
    for blob in blobs.iterdir():  # every blob is named by its content
        assert f"sha256:{hashlib.sha256(blob.read_bytes()).hexdigest()}" == f"sha256:{blob.name}"
    body = json.loads((blobs / entry["digest"].removeprefix("sha256:")).read_bytes())
    data_digest = first.manifest["files"]["weights/model.onnx.data"]
    assert os.path.samefile(blobs / data_digest.removeprefix("sha256:"), first.path / "weights" / "model.onnx.data")
    assert {layer["digest"] for layer in body["layers"]} == set(first.manifest["files"].values())
    # Same name:version, new content: the tag moves; the older manifest stays, untagged.
    second = put(store, {"model.onnx": b"graph v2"})
    index = json.loads((tmp_path / "index.json").read_text())
    tags = {e["annotations"]["dev.compilekit.id"]: e["annotations"].get("org.opencontainers.image.ref.name")
            for e in index["manifests"]}
    assert tags == {first.id: None, second.id: "tiny:1"}
    # Removing an artifact drops its entry; gc then deletes the blobs only it used.
    store.remove(first.id)
    assert [e["annotations"]["dev.compilekit.id"] for e in json.loads((tmp_path / "index.json").read_text())["manifests"]] \
        == [second.id]
    assert store.gc()["blobs"] == 4  # first's manifest, config, weights blob and its model.onnx
    assert (blobs / package(second).digest.removeprefix("sha256:")).exists()


def test_commit_with_known_digests_needs_the_same_files(tmp_path):
    store = LocalStore(tmp_path)
    digest = "sha256:" + hashlib.sha256(b"graph").hexdigest()
    with store.staging() as staged:
        (staged / "model.onnx").write_bytes(b"graph")
        with pytest.raises(ArtifactError, match="not the files"):
            store.commit(staged, manifest(), digests={"other.onnx": digest})
        art = store.commit(staged, manifest(), digests={"model.onnx": digest})
    assert art.manifest["files"] == {"model.onnx": digest}
    art.verify()
