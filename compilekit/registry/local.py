"""The local artifact store: one directory per content-addressed id.

    root/sha256/<hex>/manifest.json + files
    root/.tmp/                              staging for in-progress writes

Every write is staged under `.tmp` (same filesystem) and renamed into place, so `sha256/` only
ever holds complete artifacts, even under Ctrl-C or two processes committing at once.
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

    def commit(self, staged: Path, manifest: dict) -> Artifact:
        """Hash `staged`, fill the manifest's `files` and `id`, and move it to root/sha256/<hex>.

        The caller's dict is not modified; the returned Artifact holds the filled copy. If the id
        is already stored, its files are kept and only its manifest is replaced (the latest
        verification wins). A stored copy whose files no longer match is replaced by `staged`.
        """
        staged = Path(staged)
        if not staged.is_dir() or staged.resolve().parent != self._tmp.resolve():
            raise ArtifactError(f"{staged} is not a staging directory of {self.root}",
                                hint="write the files inside `with store.staging() as staged:` and commit there")
        manifest = {**manifest, "files": hash_files(staged)}
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
                return Artifact(dest, manifest)
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
            return Artifact(dest, manifest)
        raise ArtifactError(f"could not store {manifest['id']} under {self._objects}: {err}",
                            hint="check permissions and free space; if another process is removing the same "
                                 "artifact, retry")

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

        removed = {"broken": 0, "stale_staging": 0}
        for path, _reason in self.list_broken():
            trash = self._tmp / f"broken-{uuid.uuid4().hex}"
            self._tmp.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(path, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
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
        return art
