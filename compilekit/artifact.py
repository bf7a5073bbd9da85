"""Artifacts: a directory of built files plus `manifest.json`, named by a content-addressed id.

The id is `"sha256:" + sha256(canonical JSON)` of exactly the manifest fields in `ID_FIELDS`:
name, version, recipe, source, toolchain, signature, target and files (relative posix path ->
"sha256:<hex>"). Canonical JSON means `sort_keys=True, separators=(",", ":")`, so key order
never matters. The id deliberately leaves out everything measured or time-dependent (`created`,
`machine`, `accuracy`, `latency`, `passes` with their timings, `status`, `tags`): compiling the
same recipe twice with the same toolchain gives the same id, and re-verifying only refreshes the
manifest. `toolchain` is in because another torch/onnx version can emit different files for the
same recipe, and the id should say which toolchain made them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compilekit.errors import ArtifactError

MANIFEST = "manifest.json"
ID_FIELDS: tuple[str, ...] = ("name", "version", "recipe", "source", "toolchain", "signature", "target", "files")
ID_RE = re.compile(r"sha256:[0-9a-f]{64}")
_REQUIRED = ("id", *ID_FIELDS)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Digest of one file as "sha256:<hex>", read in chunks so multi-GB weights stay out of memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def hash_files(root: Path) -> dict[str, str]:
    """Digest of every regular file under `root` except the top-level manifest, sorted by posix path."""
    root = Path(root)
    out = {}
    for p in root.rglob("*"):
        # Symlinks are skipped: they could point outside the artifact, and rename/copy of the
        # directory would not carry their target.
        if p.is_file() and not p.is_symlink() and p != root / MANIFEST:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return dict(sorted(out.items()))


def canonical_json(obj: Any) -> bytes:
    """The one serialisation the id is computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compute_id(manifest: Mapping) -> str:
    """The content-addressed id over `ID_FIELDS` (see module docstring)."""
    missing = [k for k in ID_FIELDS if k not in manifest]
    if missing:
        raise ArtifactError(f"manifest lacks {', '.join(missing)}; cannot compute its id",
                            hint=f"a manifest needs all of: {', '.join(ID_FIELDS)}")
    try:
        blob = canonical_json({k: manifest[k] for k in ID_FIELDS})
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"manifest is not plain JSON: {e}",
                            hint="use only dicts, lists, str, int, float, bool and None in the manifest") from e
    return f"sha256:{hashlib.sha256(blob).hexdigest()}"


@dataclass(frozen=True)
class Artifact:
    """A stored artifact: its directory and its parsed manifest."""

    path: Path
    manifest: dict

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def tags(self) -> list[str]:
        return list(self.manifest.get("tags") or [])

    @property
    def created(self) -> str:
        return str(self.manifest.get("created") or "")

    @classmethod
    def load(cls, path: Path) -> Artifact:
        """Read `path/manifest.json`; checks its shape, not the files (that is `verify`)."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise ArtifactError(f"artifact directory {path} does not exist",
                                hint="run `compilekit artifacts list` to see stored artifacts")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"{mpath} is missing",
                                hint="the artifact is incomplete; remove it and compile again") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{mpath} cannot be read: {e}",
                                hint="the manifest is corrupt; remove the artifact and compile again") from e
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{mpath} is not a JSON object", hint="remove the artifact and compile again")
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            raise ArtifactError(f"{mpath} lacks {', '.join(missing)}", hint="remove the artifact and compile again")
        if not isinstance(manifest["id"], str) or not ID_RE.fullmatch(manifest["id"]):
            raise ArtifactError(f"{mpath} has a malformed id {manifest['id']!r}",
                                hint='an id looks like "sha256:<64 hex digits>"; remove the artifact and compile again')
        if not isinstance(manifest["files"], dict):
            raise ArtifactError(f"{mpath}: 'files' is not a mapping", hint="remove the artifact and compile again")
        return cls(path, manifest)

    def verify(self) -> None:
        """Re-hash every file and recompute the id; raise `ArtifactError` naming what differs."""
        expected, actual = self.manifest["files"], hash_files(self.path)
        problems = [f"missing file {f}" for f in sorted(expected.keys() - actual.keys())]
        problems += [f"unexpected file {f}" for f in sorted(actual.keys() - expected.keys())]
        problems += [f"{f} has digest {actual[f]}, manifest says {expected[f]}"
                     for f in sorted(expected.keys() & actual.keys()) if actual[f] != expected[f]]
        if problems:
            raise ArtifactError(f"artifact {self.path} is corrupt: " + "; ".join(problems),
                                hint="remove it (`compilekit artifacts remove <id>`) and compile again")
        if (recomputed := compute_id(self.manifest)) != self.id:
            raise ArtifactError(f"artifact {self.path}: manifest id {self.id} does not match its content "
                                f"({recomputed})",
                                hint="the manifest was edited by hand; remove the artifact and compile again")
