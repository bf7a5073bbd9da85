"""The local artifact store: one directory per content-addressed id, and an OCI image layout of the same.

    root/sha256/<hex>/manifest.json + files   the working view (what runners load)
    root/oci-layout, root/index.json           an OCI image layout: each artifact's OCI manifest (the same
    root/blobs/sha256/<digest>                 bytes `compilekit push` uploads), config and file blobs;
                                               index entries tagged `org.opencontainers.image.ref.name`
                                               = name:version (the newest artifact of that name holds it)
    root/.tmp/                                 staging for in-progress writes

Every write is staged under `.tmp` (same filesystem) and renamed into place, so `sha256/` and `blobs/`
only ever hold complete files, even under Ctrl-C or two processes committing at once; `index.json` is
rewritten under a lock. File blobs are hard links to the artifact's files, so the layout costs no space.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compilekit.artifact import MANIFEST, Artifact, compute_id, hash_files
from compilekit.errors import ArtifactError

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
ID_NOTE = "dev.compilekit.id"

ENV_VAR = "COMPILEKIT_REGISTRY"
MIN_PREFIX = 6
_HEX_RE = re.compile(r"[0-9a-f]+")
_LIST_HINT = "run `compilekit artifacts list` to see stored artifacts"


def default_store_path() -> Path:
    """`$COMPILEKIT_REGISTRY`, else `./artifacts` (relative to the working directory)."""
    return Path(os.environ.get(ENV_VAR) or "artifacts")


def _fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry lives in the parent, not in the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """Content-addressed artifacts on the local filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._objects = self.root / "sha256"
        self._tmp = self.root / ".tmp"
        self._blobs = self.root / "blobs" / "sha256"

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _dir(self, artifact_id: str) -> Path:
        return self._objects / artifact_id.removeprefix("sha256:")

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """Yield a fresh empty dir under root/.tmp; it is removed on exit unless `commit` moved it.

        `finally` (not `except Exception`) so KeyboardInterrupt cleans up too; the exception,
        if any, propagates unchanged.
        """
        self._tmp.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix="stage-", dir=self._tmp))
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _write_manifest(self, dest: Path, manifest: dict) -> None:
        """Atomically (re)place dest/manifest.json. The temp file goes in .tmp, not in `dest`, so a
        concurrent `verify` of `dest` never sees a stray file."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="manifest-", suffix=".json", dir=self._tmp)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest / MANIFEST)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(dest)

    def commit(self, staged: Path, manifest: dict, *, digests: dict[str, str] | None = None) -> Artifact:
        """Hash `staged`, fill the manifest's `files` and `id`, and move it to root/sha256/<hex>.

        `digests`: the files' digests, already computed from the very bytes written (a pull hashes each
        blob as it streams it to disk), so they are not hashed a second time; the file names must match.

        The caller's dict is not modified; the returned Artifact holds the filled copy. If the id
        is already stored, its files are kept and only its manifest is replaced (the latest
        verification wins). A stored copy whose files no longer match is replaced by `staged`.
        """
        staged = Path(staged)
        if not staged.is_dir() or staged.resolve().parent != self._tmp.resolve():
            raise ArtifactError(f"{staged} is not a staging directory of {self.root}",
                                hint="write the files inside `with store.staging() as staged:` and commit there")
        if digests is not None:
            present = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*")
                             if p.is_file() and not p.is_symlink() and p != staged / MANIFEST)
            if present != sorted(digests):
                raise ArtifactError(f"the staged files {present} are not the files {sorted(digests)} given digests for")
            files = dict(sorted(digests.items()))
        else:
            files = hash_files(staged)
        manifest = {**manifest, "files": files}
        manifest["id"] = compute_id(manifest)
        dest = self._dir(manifest["id"])
        self._write_manifest(staged, manifest)  # before the rename: sha256/ never holds a manifest-less dir
        self._objects.mkdir(parents=True, exist_ok=True)
        # A few rounds, because a concurrent commit/remove of the same id can change `dest` between steps.
        err: OSError | None = None
        for _ in range(5):
            try:
                os.rename(staged, dest)  # atomic; fails with ENOTEMPTY/EEXIST if another copy won the race
            except OSError as e:
                err = e
                if not dest.is_dir():  # not the "already stored" case: maybe a concurrent remove, retry
                    continue
            else:
                _fsync_dir(self._objects)
                return self._publish(Artifact(dest, manifest))
            try:
                intact = hash_files(dest) == manifest["files"]
            except OSError:  # removed while we were hashing it
                continue
            if not intact:
                # Repair: move the corrupt copy aside atomically, then retry the rename.
                trash = self._tmp / f"broken-{uuid.uuid4().hex}"
                try:
                    os.rename(dest, trash)
                except OSError:
                    pass
                shutil.rmtree(trash, ignore_errors=True)
                continue
            try:
                self._write_manifest(dest, manifest)
            except FileNotFoundError:  # removed just now; the staged copy can still go in
                continue
            shutil.rmtree(staged, ignore_errors=True)
            return self._publish(Artifact(dest, manifest))
        raise ArtifactError(f"could not store {manifest['id']} under {self._objects}: {err}",
                            hint="check permissions and free space; if another process is removing the same "
                                 "artifact, retry")

    # ----------------------------------------------------------------------------- OCI image layout
    @contextmanager
    def _index_lock(self) -> Iterator[None]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".index.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def index(self) -> dict:
        try:
            return json.loads((self.root / "index.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []}

    def _write_atomic(self, dest: Path, data: bytes) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="write-", dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _put_blob(self, digest: str, *, data: bytes | None = None, source: Path | None = None) -> None:
        dest = self._blobs / digest.removeprefix("sha256:")
        if source is not None:
            # A hard link to the artifact's (just hashed) file. A blob that exists but is another inode may be
            # a stale copy of a repaired artifact: replace it.
            if dest.exists() and os.path.samefile(dest, source):
                return
            self._tmp.mkdir(parents=True, exist_ok=True)
            tmp = self._tmp / f"blob-{uuid.uuid4().hex}"
            try:
                os.link(source, tmp)
            except OSError:  # another filesystem, or no hard links: copy
                shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        elif not dest.exists():
            self._write_atomic(dest, data or b"")

    def _publish(self, artifact: Artifact) -> Artifact:
        """Write the artifact's OCI manifest, config and file blobs into the layout and (re)point its index
        entry; the tag name:version moves to it."""
        from compilekit.registry.oci import ARTIFACT_TYPE, MANIFEST_TYPE, package

        pkg = package(artifact)
        tag = f"{artifact.name}:{artifact.version}"
        entry = {"mediaType": MANIFEST_TYPE, "digest": pkg.digest, "size": len(pkg.manifest),
                 "artifactType": ARTIFACT_TYPE, "annotations": {REF_NAME: tag, ID_NOTE: artifact.id}}
        with self._index_lock():  # blobs too: gc must never see a blob that is written but not yet indexed
            self._blobs.mkdir(parents=True, exist_ok=True)
            for blob in pkg.layers:
                self._put_blob(blob.digest, source=blob.path)
            self._put_blob(pkg.config.digest, data=pkg.config.data)
            self._put_blob(pkg.digest, data=pkg.manifest)
            index = self.index()
            kept = []
            for e in index.get("manifests", []):
                notes = dict(e.get("annotations") or {})
                if notes.get(ID_NOTE) == artifact.id:
                    continue  # this artifact's previous manifest (an older verification)
                if notes.get(REF_NAME) == tag:
                    notes.pop(REF_NAME)  # the tag moves to the newest artifact of this name:version
                    e = {**e, "annotations": notes}
                kept.append(e)
            index["manifests"] = [*kept, entry]
            self._write_atomic(self.root / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            self._write_atomic(self.root / "index.json", json.dumps(index, indent=2).encode())
        return artifact

    def _unpublish(self, artifact_id: str) -> None:
        if not (self.root / "index.json").exists():
            return
        with self._index_lock():
            index = self.index()
            index["manifests"] = [e for e in index.get("manifests", [])
                                  if (e.get("annotations") or {}).get(ID_NOTE) != artifact_id]
            self._write_atomic(self.root / "index.json", json.dumps(index, indent=2).encode())

    def _referenced_blobs(self) -> set[str]:
        refs: set[str] = set()
        for entry in self.index().get("manifests", []):
            refs.add(entry["digest"])
            path = self._blobs / entry["digest"].removeprefix("sha256:")
            try:
                body = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            refs.add(body.get("config", {}).get("digest", ""))
            refs.update(layer.get("digest", "") for layer in body.get("layers", []))
        return refs

    def _scan(self) -> tuple[list[Artifact], list[tuple[Path, str]]]:
        good: list[Artifact] = []
        broken: list[tuple[Path, str]] = []
        if not self._objects.is_dir():
            return good, broken
        for entry in sorted(self._objects.iterdir()):
            try:
                if not entry.is_dir() or len(entry.name) != 64 or not _HEX_RE.fullmatch(entry.name):
                    raise ArtifactError(f"{entry.name} is not an artifact directory (sha256/<64 hex>)")
                art = Artifact.load(entry)
                if art.id != f"sha256:{entry.name}":
                    raise ArtifactError(f"manifest id {art.id} does not match its directory name")
            except ArtifactError as e:
                broken.append((entry, e.message))
            else:
                good.append(art)
        return good, broken

    def list(self) -> list[Artifact]:
        """All loadable artifacts, newest `created` first. Broken entries are skipped (see `list_broken`).

        Only manifests are read; re-hashing every file is `Artifact.verify`'s job, not a listing's.
        """
        return sorted(self._scan()[0], key=lambda a: (a.created, a.id), reverse=True)

    def list_broken(self) -> list[tuple[Path, str]]:
        """Entries under sha256/ that `list` skipped, with the reason."""
        return self._scan()[1]

    def resolve(self, ref: str) -> Artifact:
        """Find one artifact by id, id prefix, `name:version` or `name`.

        - "sha256:<hex>" with at least 6 hex digits: an id or a unique id prefix.
        - bare hex of 6+ digits: tried as an id prefix first, then as a name.
        - "name:version" / "name": the newest `created` among matches (like a tag that moves).
        """
        ref = ref.strip()
        hexpart = ref.removeprefix("sha256:").lower()
        explicit = ref.startswith("sha256:")
        if explicit and (len(hexpart) < MIN_PREFIX or not _HEX_RE.fullmatch(hexpart)):
            raise ArtifactError(f"{ref!r} is not a valid id prefix",
                                hint=f"give at least {MIN_PREFIX} hex digits after 'sha256:'; {_LIST_HINT}")
        if explicit or (len(hexpart) >= MIN_PREFIX and _HEX_RE.fullmatch(hexpart)):
            dirs = [d for d in self._objects.glob(f"{hexpart}*") if d.is_dir()] if self._objects.is_dir() else []
            if len(dirs) == 1:
                return self._load_stored(dirs[0])
            if len(dirs) > 1:
                raise ArtifactError(f"id prefix {ref!r} is ambiguous; it matches:\n" + self._describe(dirs),
                                    hint="give more digits of the id")
            if explicit:
                raise ArtifactError(f"no artifact with id {ref!r} in {self.root}", hint=_LIST_HINT)
        arts = self.list()
        matches = [a for a in arts if a.name == ref]
        if not matches and ":" in ref:
            name, _, version = ref.rpartition(":")
            matches = [a for a in arts if a.name == name and str(a.version) == version]
        if matches:
            return matches[0]  # list() is newest-first
        names = sorted({f"{a.name}:{a.version}" for a in arts})
        raise ArtifactError(f"no artifact matches {ref!r} in {self.root}"
                            + (f"; stored: {', '.join(names)}" if names else " (the store is empty)"),
                            hint=_LIST_HINT)

    def _load_stored(self, d: Path) -> Artifact:
        art = Artifact.load(d)
        if art.id != f"sha256:{d.name}":
            raise ArtifactError(f"{d}: manifest id {art.id} does not match its directory name",
                                hint="remove the directory and compile again")
        return art

    @staticmethod
    def _describe(dirs: list[Path]) -> str:
        lines = []
        for d in sorted(dirs):
            try:
                a = Artifact.load(d)
                lines.append(f"  sha256:{d.name}  {a.name}:{a.version}  {a.created}")
            except ArtifactError:
                lines.append(f"  sha256:{d.name}  (broken)")
        return "\n".join(lines)

    def gc(self, *, stale_seconds: float = 3600.0) -> dict[str, int]:
        """Delete broken entries under sha256/ and staging leftovers in .tmp older than `stale_seconds` (a
        crashed or killed compile's; a running compile's staging dir is younger and stays)."""
        import time

        removed = {"broken": 0, "stale_staging": 0, "blobs": 0}
        for path, _reason in self.list_broken():
            trash = self._tmp / f"broken-{uuid.uuid4().hex}"
            self._tmp.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(path, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            self._unpublish(f"sha256:{path.name}")
            removed["broken"] += 1
        if self._tmp.is_dir():
            now = time.time()
            for entry in self._tmp.iterdir():
                try:
                    old = now - entry.stat().st_mtime > stale_seconds
                except FileNotFoundError:
                    continue
                if old:
                    (shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True))
                    removed["stale_staging"] += 1
        if self._blobs.is_dir():
            with self._index_lock():  # no commit may publish between the scan and the delete
                referenced = self._referenced_blobs()
                for blob in self._blobs.iterdir():
                    if f"sha256:{blob.name}" not in referenced:
                        blob.unlink(missing_ok=True)
                        removed["blobs"] += 1
        return removed

    def remove(self, ref: str) -> Artifact:
        """Delete one artifact; it vanishes atomically (renamed into .tmp before the rmtree)."""
        art = self.resolve(ref)
        self._tmp.mkdir(parents=True, exist_ok=True)
        trash = self._tmp / f"removed-{uuid.uuid4().hex}"
        try:
            os.rename(art.path, trash)
        except FileNotFoundError:
            raise ArtifactError(f"{art.id} was removed by someone else meanwhile", hint=_LIST_HINT) from None
        shutil.rmtree(trash, ignore_errors=True)
        self._unpublish(art.id)
        return art
